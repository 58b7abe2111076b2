//! knobs-train: everything that changes weights. The base-model recipe (`pretrain`), the
//! fine-tuning trainer and its methods, and the pieces they share: per-step random streams,
//! learning-rate schedules, checkpoints and logs.
pub mod bench;
pub mod builtin;
pub mod checkpoint;
pub mod finetune;
pub mod hyperlora;
pub mod latent_cache;
pub mod loss;
pub mod lr;
pub mod memory;
pub mod objective;
pub mod pretrain;
pub mod progress;
pub mod rng;
