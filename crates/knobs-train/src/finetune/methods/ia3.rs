//! IA3: learned scaling vectors on the UNet's keys, values and feed-forward input, saved as a
//! PEFT folder.
use std::path::PathBuf;

use anyhow::Result;
use knobs_adapters::Pattern;
use knobs_adapters::ia3::Ia3Config;
use knobs_diffusion::loaders::{Component, PipelineAdapters};
use knobs_diffusion::pipeline::StableDiffusion;

use super::{ADAPTER, Attached, Defaults, TrainMethod};
use crate::finetune::config::TrainConfig;

pub struct Ia3;

impl TrainMethod for Ia3 {
    fn name(&self) -> &'static str {
        "ia3"
    }
    fn about(&self) -> &'static str {
        "learned scaling vectors on keys, values and feed-forward activations"
    }
    fn defaults(&self) -> Defaults {
        Defaults { learning_rate: 5e-3, max_train_steps: 300 }
    }
    fn attach(&self, _: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
        let names = |n: &[&str]| Pattern::Names(n.iter().map(|s| s.to_string()).collect());
        adapters.add(sd, Component::Unet, ADAPTER, Box::new(Ia3Config::new(names(&["to_k", "to_v", "ff.net.2"]), names(&["ff.net.2"]))))?;
        Ok(Attached { trainable: adapters.parameter_paths(sd, ADAPTER)?, placeholder: None })
    }
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, _: &Attached) -> Result<Vec<PathBuf>> {
        Ok(adapters.save_peft(sd, ADAPTER, &cfg.out, "ia3")?)
    }
}
