//! LoHa: Hadamard product of two low-rank products on the UNet's attention (and convolutions
//! with --conv), saved as a PEFT folder (and a LyCORIS file with --format kohya). Rank, alpha and targets are LoRA's flags.
use std::path::PathBuf;

use anyhow::Result;
use knobs_adapters::loha::LohaConfig;
use knobs_adapters::lycoris::LycorisOptions;
use knobs_adapters::{AdapterConfig, Pattern};
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;

use super::lora::{attach_with, save_peft_and_lycoris};
use super::{Attached, Defaults, OptionGroup, TrainMethod};
use crate::finetune::config::TrainConfig;

pub struct Loha;

impl TrainMethod for Loha {
    fn name(&self) -> &'static str {
        "loha"
    }
    fn about(&self) -> &'static str {
        "LoHa: Hadamard product of two low-rank products (LyCORIS), rank r reaching r^2"
    }
    fn defaults(&self) -> Defaults {
        Defaults { learning_rate: 1e-3, max_train_steps: 300 }
    }
    fn options(&self) -> &'static [OptionGroup] {
        &[OptionGroup::Lora, OptionGroup::TextEncoder]
    }
    fn attach(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
        attach_with(cfg, sd, adapters, |targets| -> Box<dyn AdapterConfig> {
            Box::new(LohaConfig::new(LycorisOptions::new(cfg.lora.rank, cfg.lora.alpha(), Pattern::Names(targets))))
        })
    }
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, _: &Attached) -> Result<Vec<PathBuf>> {
        save_peft_and_lycoris(cfg, sd, adapters, self.name())
    }
}
