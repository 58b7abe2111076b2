pub mod adapter;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod judge;
pub mod pretrain;
pub mod train;
pub mod world;
