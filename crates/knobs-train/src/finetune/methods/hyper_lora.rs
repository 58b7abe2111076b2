//! HyperDreamBooth-style HyperLoRA: a pretrained hypernetwork predicts a LoRA from the
//! instance images (`--hypernetwork-dir`), then optional code optimisation and rank-relaxed
//! steps. It runs its own loop (`crate::hyperlora`) and writes an ordinary LoRA.
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

use super::{Attached, Defaults, OptionGroup, TrainMethod};
use crate::finetune::config::{TrainConfig, defaults_from_clap};
use crate::finetune::trainer::Summary;
use crate::progress::Progress;

#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "HyperLoRA (hyper-lora)")]
pub struct HyperLoraOptions {
    /// The hypernetwork folder `knobs hyper pretrain` wrote (default with the built-in base
    /// model: the built-in models/hyperlora).
    #[arg(long)]
    pub hypernetwork_dir: Option<PathBuf>,
    /// Judge folder whose image embeddings feed the hypernetwork (default: models/judge).
    #[arg(long)]
    pub judge: Option<PathBuf>,
    /// Optimise the concept's code through the frozen hypernetwork for this many steps (from
    /// the zero-shot code) before any rank-relaxed steps.
    #[arg(long, default_value_t = 0)]
    pub hyper_code_steps: u64,
}

defaults_from_clap!(HyperLoraOptions);

pub struct HyperLora;

impl TrainMethod for HyperLora {
    fn name(&self) -> &'static str {
        "hyper-lora"
    }
    fn about(&self) -> &'static str {
        "a pretrained hypernetwork predicts a LoRA from the images; optional rank-relaxed steps"
    }
    fn defaults(&self) -> Defaults {
        // Zero-shot by default; `--max-train-steps N` adds rank-relaxed fine-tuning.
        Defaults { learning_rate: 1e-3, max_train_steps: 0 }
    }
    fn options(&self) -> &'static [OptionGroup] {
        &[OptionGroup::Lora, OptionGroup::HyperLora]
    }
    fn validate(&self, cfg: &TrainConfig) -> Result<()> {
        // Its short steps run at a constant rate without accumulation, validation or
        // checkpoints, on the UNet only, writing a diffusers LoRA.
        let defaults = TrainConfig::default();
        let o = &defaults.optim;
        let unused = [
            ("--gradient-accumulation-steps", cfg.optim.gradient_accumulation_steps != o.gradient_accumulation_steps),
            ("--lr-scheduler", cfg.optim.lr_scheduler != o.lr_scheduler),
            ("--optimizer", cfg.optim.optimizer != o.optimizer),
            ("--validation-steps", cfg.run.validation_steps != defaults.run.validation_steps),
            ("--class-prompt", cfg.data.class_prompt.is_some()),
            ("--resume", cfg.run.resume.is_some()),
            ("--train-only", !cfg.freeze.train_only.is_empty()),
            ("--conv", cfg.lora.conv),
            ("--format", cfg.lora.format != defaults.lora.format),
        ];
        if let Some((flag, _)) = unused.iter().find(|(_, set)| *set) {
            bail!("{flag} is not used by --method hyper-lora");
        }
        if cfg.lora.rank == 0 {
            bail!("--rank must be at least 1");
        }
        Ok(())
    }
    fn attach(&self, _: &TrainConfig, _: &mut StableDiffusion, _: &mut PipelineAdapters) -> Result<Attached> {
        bail!("--method hyper-lora runs its own loop")
    }
    fn save(&self, _: &TrainConfig, _: &mut StableDiffusion, _: &mut PipelineAdapters, _: &Attached) -> Result<Vec<PathBuf>> {
        bail!("--method hyper-lora writes its files in its own loop")
    }
    fn own_loop(&self) -> bool {
        true
    }
    fn run(&self, cfg: &TrainConfig, progress: Progress) -> Result<Summary> {
        let model = cfg.model()?;
        let hyper = match &cfg.hyper_lora.hypernetwork_dir {
            Some(d) => d.clone(),
            None => crate::builtin::hypernetwork_for(&model)
                .context("--method hyper-lora needs --hypernetwork-dir DIR (made by `knobs hyper pretrain`); the built-in one fits only the built-in base model")?,
        };
        let judge = crate::builtin::judge_or_default(cfg.hyper_lora.judge.as_deref())?;
        crate::hyperlora::run_train(cfg, &model, &hyper, &judge, progress)
    }
}
