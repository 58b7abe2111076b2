pub mod adapter;
pub mod demo;
