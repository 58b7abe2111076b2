//! OFT: an orthogonal block rotation of each adapted weight's input side, saved as a PEFT
//! folder. Targets are LoRA's flags; the block size and COFT are its own.
use std::path::PathBuf;

use anyhow::{Result, bail};
use knobs_adapters::oft::OftConfig;
use knobs_adapters::{AdapterConfig, Pattern};
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

use super::lora::attach_with;
use super::{ADAPTER, Attached, Defaults, OptionGroup, TrainMethod};
use crate::finetune::config::{TrainConfig, defaults_from_clap};

#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "OFT (oft)")]
pub struct OftOptions {
    /// Input features per rotation block (PEFT's `oft_block_size`; adjusted to a divisor of
    /// each layer's width, as PEFT does).
    #[arg(long, default_value_t = 32)]
    pub oft_block_size: usize,
    /// Constrained OFT: keep each rotation within `--coft-eps` of the identity.
    #[arg(long)]
    pub coft: bool,
    #[arg(long, default_value_t = 6e-5)]
    pub coft_eps: f64,
    /// One rotation block shared by all blocks of a layer.
    #[arg(long)]
    pub block_share: bool,
}

defaults_from_clap!(OftOptions);

pub struct Oft;

impl TrainMethod for Oft {
    fn name(&self) -> &'static str {
        "oft"
    }
    fn about(&self) -> &'static str {
        "OFT: orthogonal block rotations of the weights (Cayley-Neumann, as PEFT)"
    }
    fn defaults(&self) -> Defaults {
        Defaults { learning_rate: 1e-3, max_train_steps: 300 }
    }
    fn options(&self) -> &'static [OptionGroup] {
        &[OptionGroup::Lora, OptionGroup::Oft, OptionGroup::TextEncoder]
    }
    fn validate(&self, cfg: &TrainConfig) -> Result<()> {
        let changed: Vec<String> = crate::finetune::config::changed_flags(&cfg.lora).into_iter().filter(|f| !f.contains("target-modules") && f != "--conv").collect();
        if let Some(flag) = changed.first() {
            bail!("{flag} is not used by --method oft (it reads only --target-modules, --text-encoder-target-modules and --conv)");
        }
        if cfg.oft.oft_block_size < 2 {
            bail!("--oft-block-size must be at least 2, got {}", cfg.oft.oft_block_size);
        }
        if cfg.oft.coft_eps.is_nan() || cfg.oft.coft_eps <= 0.0 {
            bail!("--coft-eps must be positive, got {}", cfg.oft.coft_eps);
        }
        super::require_steps(cfg)
    }
    fn attach(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
        attach_with(cfg, sd, adapters, |targets| -> Box<dyn AdapterConfig> {
            let o = &cfg.oft;
            Box::new(OftConfig { coft: o.coft, eps: o.coft_eps, block_share: o.block_share, ..OftConfig::new(o.oft_block_size, Pattern::Names(targets)) })
        })
    }
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, _: &Attached) -> Result<Vec<PathBuf>> {
        Ok(adapters.save_peft(sd, ADAPTER, &cfg.out, self.name())?)
    }
}
