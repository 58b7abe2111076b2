//! LoRA (Hu et al. 2021): a low-rank update `scale * B A` beside a frozen weight, on Linear,
//! Conv2d (LoCon) and Embedding layers.
mod combine;
mod config;
pub mod dora;
mod extract;
mod layer;
mod resize;

pub use combine::{Combination, combine};
pub use config::{LoraConfig, LoraInit};
pub use dora::{DoraConv2d, DoraLinear};
pub use extract::{Extracted, extract};
pub use layer::{LoraConv2d, LoraEmbedding, LoraLinear};
pub use resize::{RankTarget, Resized, resize};
