//! LoKr: Kronecker product of a small and a (low-rank) large factor, saved as a PEFT folder (and a LyCORIS file with --format kohya).
//! Rank, alpha and targets are LoRA's flags; the split is its own.
use std::path::PathBuf;

use anyhow::{Result, bail};
use knobs_adapters::lokr::LokrConfig;
use knobs_adapters::lycoris::LycorisOptions;
use knobs_adapters::{AdapterConfig, Pattern};
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

use super::lora::{attach_with, save_peft_and_lycoris};
use super::{Attached, Defaults, OptionGroup, TrainMethod};
use crate::finetune::config::{TrainConfig, defaults_from_clap};

#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "LoKr (lokr)")]
pub struct LokrOptions {
    /// Preferred size of the small Kronecker factor; -1 splits each side near its square root.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub decompose_factor: i64,
    /// Also make the small factor a low-rank product.
    #[arg(long)]
    pub decompose_both: bool,
}

defaults_from_clap!(LokrOptions);

pub struct Lokr;

impl TrainMethod for Lokr {
    fn name(&self) -> &'static str {
        "lokr"
    }
    fn about(&self) -> &'static str {
        "LoKr: Kronecker product of a small and a low-rank factor (LyCORIS)"
    }
    fn defaults(&self) -> Defaults {
        Defaults { learning_rate: 1e-3, max_train_steps: 300 }
    }
    fn options(&self) -> &'static [OptionGroup] {
        &[OptionGroup::Lora, OptionGroup::Lokr, OptionGroup::TextEncoder]
    }
    fn validate(&self, cfg: &TrainConfig) -> Result<()> {
        let f = cfg.lokr.decompose_factor;
        if f == 0 || f < -1 {
            bail!("--decompose-factor must be -1 or a positive size, got {f}");
        }
        super::require_steps(cfg)
    }
    fn attach(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
        attach_with(cfg, sd, adapters, |targets| -> Box<dyn AdapterConfig> {
            let options = LycorisOptions::new(cfg.lora.rank, cfg.lora.alpha(), Pattern::Names(targets));
            Box::new(LokrConfig { decompose_factor: cfg.lokr.decompose_factor, decompose_both: cfg.lokr.decompose_both, ..LokrConfig::new(options) })
        })
    }
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, _: &Attached) -> Result<Vec<PathBuf>> {
        save_peft_and_lycoris(cfg, sd, adapters, self.name())
    }
}
