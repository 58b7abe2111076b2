//! The training methods, one file each, behind [`TrainMethod`], listed once in [`REGISTRY`].
//! A method decides its defaults, what it attaches and exactly which parameters train, and
//! what it writes at the end; the data, the loss, the optimizer, checkpoints and samples are
//! the shared trainer's. A method with a loop of its own (HyperLoRA) runs it instead.
//!
//! Adding a method: a new file here implementing [`TrainMethod`] and one line in
//! [`REGISTRY`]; options of its own are one more struct flattened into `TrainConfig`.
pub mod dora;
pub mod dreambooth;
pub mod hyper_lora;
pub mod hypernetwork;
pub mod ia3;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod oft;
pub mod pivotal;
pub mod textual_inversion;

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Result, bail};
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::config::TrainConfig;
use super::trainer::Summary;
use crate::progress::Progress;

/// The adapter name every method trains under (PEFT's default).
pub const ADAPTER: &str = "default";

/// Learning rate and steps when none are given: diffusers' example commands, scaled so that
/// each method finishes in minutes on the built-in model.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub learning_rate: f64,
    pub max_train_steps: u64,
}

/// Option groups of `TrainConfig` that belong to some methods only; setting one that the
/// chosen method does not read is an error naming the flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionGroup {
    Lora,
    Tokens,
    Hypernetwork,
    HyperLora,
    Lokr,
    Oft,
    /// `--train-text-encoder`.
    TextEncoder,
}

/// What a method attached: the pipeline's trainable parameters (pipeline paths, before
/// `--train-only` narrows them) and the placeholder token, if it added one.
#[derive(Debug, Default)]
pub struct Attached {
    pub trainable: BTreeSet<String>,
    pub placeholder: Option<String>,
}

pub trait TrainMethod: Sync {
    /// The `--method` value.
    fn name(&self) -> &'static str;
    /// One line for `--help`.
    fn about(&self) -> &'static str;
    fn defaults(&self) -> Defaults;
    /// The method-only option groups it reads.
    fn options(&self) -> &'static [OptionGroup] {
        &[]
    }
    /// Rules of its own, beyond the shared ones.
    fn validate(&self, cfg: &TrainConfig) -> Result<()> {
        require_steps(cfg)
    }
    /// Attaches what the method trains to `sd` (through `adapters`) and returns exactly the
    /// parameters it learns.
    fn attach(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached>;
    /// Writes the trained result into `cfg.out`; returns the files and folders written.
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, attached: &Attached) -> Result<Vec<PathBuf>>;
    /// Whether the method trains in a loop of its own ([`TrainMethod::run`]) instead of the
    /// shared trainer.
    fn own_loop(&self) -> bool {
        false
    }
    fn run(&self, _cfg: &TrainConfig, _progress: Progress) -> Result<Summary> {
        bail!("--method {} trains in the shared loop", self.name())
    }
}

/// The rule of every method that trains in the shared loop.
pub fn require_steps(cfg: &TrainConfig) -> Result<()> {
    if cfg.max_train_steps() == 0 {
        bail!("--max-train-steps must be at least 1");
    }
    Ok(())
}

/// Every method, in the order `--help` and `knobs compare` list them. A new method adds one
/// line.
pub static REGISTRY: &[Method] = &[
    Method(&dreambooth::Dreambooth),
    Method(&textual_inversion::TextualInversion),
    Method(&lora::Lora),
    Method(&dora::Dora),
    Method(&loha::Loha),
    Method(&lokr::Lokr),
    Method(&oft::Oft),
    Method(&ia3::Ia3),
    Method(&pivotal::Pivotal),
    Method(&hypernetwork::Hypernetwork),
    Method(&hyper_lora::HyperLora),
];

/// A registered method: what `--method` and the TOML `method` key hold.
#[derive(Clone, Copy)]
pub struct Method(pub &'static dyn TrainMethod);

impl Method {
    pub fn all() -> &'static [Method] {
        REGISTRY
    }
    pub fn parse(name: &str) -> Result<Method> {
        match REGISTRY.iter().find(|m| m.name() == name) {
            Some(m) => Ok(*m),
            None => bail!("--method: unknown method `{name}`; known: {}", Self::names().join(", ")),
        }
    }
    pub fn names() -> Vec<&'static str> {
        REGISTRY.iter().map(|m| m.name()).collect()
    }
}

impl Default for Method {
    fn default() -> Self {
        Method(&lora::Lora)
    }
}

impl std::ops::Deref for Method {
    type Target = dyn TrainMethod;
    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl clap::ValueEnum for Method {
    fn value_variants<'a>() -> &'a [Self] {
        REGISTRY
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()).help(self.about()))
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Method::parse(&name).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_registered_once_and_round_trips_by_name() {
        let names = Method::names();
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        for m in Method::all() {
            assert_eq!(Method::parse(m.name()).unwrap(), *m);
            let json = serde_json::to_string(m).unwrap();
            assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), *m);
            let v = clap::ValueEnum::to_possible_value(m).unwrap();
            assert_eq!(v.get_name(), m.name());
            assert!(!m.about().is_empty());
        }
        assert!(Method::parse("boft").unwrap_err().to_string().contains("known: dreambooth"));
    }
}
