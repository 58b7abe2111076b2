//! LoRA (Hu et al. 2021): a low-rank update `scale * B A` beside a frozen weight, on Linear,
//! Conv2d (LoCon) and Embedding layers.
mod combine;
mod config;
mod layer;

pub use combine::{Combination, combine};
pub use config::{LoraConfig, LoraInit};
pub use layer::{LoraConv2d, LoraEmbedding, LoraLinear};
