//! knobs-adapters: adapters that attach to any model built on `knobs-nn` layers, found by
//! module path, with PEFT's semantics and file format. Nothing here knows about diffusion.
//!
//! One folder per method (`lora/` with DoRA, `loha/`, `lokr/`, `oft/`, `ia3/`, `tokens/` for textual
//! inversion, `hypernetwork/`, `hyperlora/`), each holding its config, its layers and how it
//! attaches, behind the [`AdapterConfig`] interface. [`AdaptedModel`] manages several named
//! adapters on one model; `formats/` reads and writes files.
pub mod formats;
pub mod generated;
pub mod hypernetwork;
pub mod hyperlora;
pub mod ia3;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lycoris;
mod merged;
mod manager;
mod method;
pub mod oft;
mod target;
pub mod tokens;

pub use manager::AdaptedModel;
pub use method::{AdapterConfig, PeftType, config_from_peft_json, strip_adapter_name};
pub use target::{Pattern, Targets};

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error(transparent)]
    Nn(#[from] knobs_nn::Error),
    #[error("target `{pattern}` matches no layer of the model; closest layer names: {near:?}")]
    NoMatch { pattern: String, near: Vec<String> },
    #[error("{0}")]
    Config(String),
    #[error("no adapter named `{0}`; loaded adapters: {1:?}")]
    Unknown(String, Vec<String>),
}

pub type Result<T, E = AdapterError> = std::result::Result<T, E>;
