//! `knobs train`: one trainer for every method. The data, the noise-prediction loss and the
//! optimizer are shared; a method only decides what is attached and trained (`setup`) and
//! what is written at the end (`save`).
pub mod config;
pub mod data;
pub mod plot;
pub mod save;
pub mod setup;
pub mod trainer;

pub use config::{LoraFormat, Method, TrainConfig};
pub use trainer::{Summary, run};
