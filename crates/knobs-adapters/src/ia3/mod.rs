//! IA3: learned scaling vectors on keys, values and feed-forward activations.
mod config;
mod layer;

pub use config::Ia3Config;
pub use layer::{Ia3Conv2d, Ia3Linear};
