pub mod adapter;
pub mod demo;
pub mod generate;
