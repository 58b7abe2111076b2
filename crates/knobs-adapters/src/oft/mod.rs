//! OFT (Qiu et al. 2023), as PEFT's `OFTModel` since 0.18: the weight is multiplied by a
//! block-diagonal orthogonal matrix on its input side, `W' = W R^T`, each block `R` made from
//! a skew-symmetric `Q` by the Cayley transform `(I - Q)(I + Q)^-1` or its Neumann series;
//! COFT keeps each `Q` within a radius of zero.
mod config;
pub mod diag;
mod layer;
mod rotation;

pub use config::OftConfig;
pub use layer::{OftConv2d, OftLinear};
pub use rotation::Rotation;
