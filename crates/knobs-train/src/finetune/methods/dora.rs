//! DoRA: LoRA with a learned magnitude per output channel (PEFT's `use_dora`), saved as a
//! PEFT folder. Every LoRA flag applies.
use std::path::PathBuf;

use anyhow::Result;
use knobs_adapters::AdapterConfig;
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;

use super::lora::{attach_with, save_peft_and_lycoris};
use super::{Attached, Defaults, OptionGroup, TrainMethod};
use crate::finetune::config::TrainConfig;

pub struct Dora;

impl TrainMethod for Dora {
    fn name(&self) -> &'static str {
        "dora"
    }
    fn about(&self) -> &'static str {
        "DoRA: LoRA's direction change plus a learned magnitude per output channel"
    }
    fn defaults(&self) -> Defaults {
        Defaults { learning_rate: 1e-3, max_train_steps: 300 }
    }
    fn options(&self) -> &'static [OptionGroup] {
        &[OptionGroup::Lora, OptionGroup::TextEncoder]
    }
    fn attach(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
        attach_with(cfg, sd, adapters, |targets| -> Box<dyn AdapterConfig> {
            let mut c = cfg.lora.config(targets);
            c.use_dora = true;
            Box::new(c)
        })
    }
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, _: &Attached) -> Result<Vec<PathBuf>> {
        save_peft_and_lycoris(cfg, sd, adapters, self.name())
    }
}
