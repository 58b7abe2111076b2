//! Pivotal tuning: textual inversion and LoRA trained together (the new token's rows and the
//! LoRA in one optimizer), saved as both an embedding and a LoRA.
use std::path::PathBuf;

use anyhow::Result;
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;

use super::lora::{attach_lora, save_lora};
use super::textual_inversion::{add_placeholder, check_tokens, save_embedding};
use super::{Attached, Defaults, OptionGroup, TrainMethod};
use crate::finetune::config::TrainConfig;

pub struct Pivotal;

impl TrainMethod for Pivotal {
    fn name(&self) -> &'static str {
        "pivotal"
    }
    fn about(&self) -> &'static str {
        "textual inversion and LoRA trained together"
    }
    fn defaults(&self) -> Defaults {
        Defaults { learning_rate: 1e-3, max_train_steps: 300 }
    }
    fn options(&self) -> &'static [OptionGroup] {
        &[OptionGroup::Lora, OptionGroup::Tokens, OptionGroup::TextEncoder]
    }
    fn validate(&self, cfg: &TrainConfig) -> Result<()> {
        check_tokens(cfg)
    }
    fn attach(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
        let mut attached = add_placeholder(cfg, sd, adapters)?;
        attached.trainable.extend(attach_lora(cfg, sd, adapters)?.trainable);
        Ok(attached)
    }
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, attached: &Attached) -> Result<Vec<PathBuf>> {
        let mut out = save_lora(cfg, sd, adapters)?;
        out.extend(save_embedding(cfg, sd, attached)?);
        Ok(out)
    }
}
