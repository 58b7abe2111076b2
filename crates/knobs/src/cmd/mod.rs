pub mod adapter;
pub mod demo;
pub mod generate;
pub mod pretrain;
pub mod train;
pub mod world;
