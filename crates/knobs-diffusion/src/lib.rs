//! knobs-diffusion: the Stable Diffusion 1.x / 2.x model family, config-driven from each
//! component's diffusers `config.json`, with parameter paths equal to diffusers' and
//! transformers' `state_dict` keys. Models know adapters only through the slots of the
//! `knobs-nn` layers they are built from; `loaders` is the one place that attaches, loads,
//! weighs, merges and saves a pipeline's adapters.
pub mod clip;
pub mod loaders;
pub mod pipeline;
pub mod schedulers;
pub mod single_file;
pub mod unet;
mod upsample;
pub mod vae;

/// Upper bounds for the sizes a model config may give, far above any real model, so that a
/// corrupt or hostile `config.json` is refused by key instead of overflowing or asking for
/// terabytes when the model is built.
pub mod limits {
    use knobs_nn::{Error, Result};

    pub const CHANNELS: usize = 1 << 15;
    pub const LAYERS: usize = 256;
    pub const BLOCKS: usize = 16;
    pub const HEADS: usize = 4096;
    pub const VOCAB: usize = 1 << 22;
    pub const POSITIONS: usize = 1 << 16;
    pub const SAMPLE_SIZE: usize = 1 << 14;
    pub const TIMESTEPS: usize = 1 << 16;

    /// `value` of `key` must be at most `max`.
    pub fn at_most(key: &str, value: usize, max: usize) -> Result<()> {
        if value > max {
            return Err(Error::param(key, format!("{value} is more than this port accepts ({max})")));
        }
        Ok(())
    }
}
