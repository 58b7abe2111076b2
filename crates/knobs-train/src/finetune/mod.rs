//! `knobs train`: one trainer for every method. The data, the denoising loss, the optimizer,
//! checkpoints and samples are shared (`trainer`); a method (`methods/`, one file each)
//! decides what is attached and trained and what is written at the end.
pub mod buckets;
pub mod config;
pub mod data;
pub mod methods;
pub mod outputs;
mod parallel;
pub mod plot;
mod text_encoders;
pub mod trainer;

pub use config::TrainConfig;
pub use methods::Method;
pub use outputs::Summary;
pub use trainer::run;
