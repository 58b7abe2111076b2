//! One file per layer. Each is a plain struct with a `forward`, named like its PyTorch twin.
mod conv2d;
mod embedding;
mod linear;
mod norm;

pub use conv2d::Conv2d;
pub use embedding::Embedding;
pub use linear::Linear;
pub use norm::{GroupNorm, LayerNorm};
