//! AutoencoderKL (the Stable Diffusion VAE), built from `vae/config.json` with parameter paths
//! equal to diffusers' `state_dict` keys.
pub mod attention;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod mid_block;
pub mod model;
pub mod resnet;

pub use config::VaeConfig;
pub use model::{AutoencoderKL, DiagonalGaussian};
