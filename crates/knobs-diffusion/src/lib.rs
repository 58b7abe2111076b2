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
