//! DreamBooth: the whole UNet (and the text encoder with `--train-text-encoder`) trains;
//! prior preservation (`--class-prompt`) is the shared trainer's. Saved as a full diffusers
//! pipeline folder `OUT/model`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use knobs_diffusion::loaders::{Component, PipelineAdapters};
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::ModuleExt;
use knobs_nn::io::{FloatDtype, param_refs, write_tensor_refs};

use super::{Attached, Defaults, OptionGroup, TrainMethod};
use crate::finetune::config::TrainConfig;

/// Copies every file of the base pipeline folder (what DreamBooth does not change).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn weights_file(dir: &Path) -> PathBuf {
    if dir.join("model.safetensors").exists() { dir.join("model.safetensors") } else { dir.join("diffusion_pytorch_model.safetensors") }
}

pub struct Dreambooth;

impl TrainMethod for Dreambooth {
    fn name(&self) -> &'static str {
        "dreambooth"
    }
    fn about(&self) -> &'static str {
        "full fine-tune of the UNet (and the text encoder with --train-text-encoder)"
    }
    fn defaults(&self) -> Defaults {
        Defaults { learning_rate: 5e-5, max_train_steps: 300 }
    }
    fn options(&self) -> &'static [OptionGroup] {
        &[OptionGroup::TextEncoder]
    }
    fn attach(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, _: &mut PipelineAdapters) -> Result<Attached> {
        let mut parts = vec![Component::Unet];
        if cfg.train_text_encoder {
            parts.extend(Component::text_encoders(sd));
        }
        let trainable = sd.param_paths().into_iter().filter(|p| parts.iter().any(|c| p.starts_with(&format!("{c}.")))).collect();
        Ok(Attached { trainable, placeholder: None })
    }
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, _: &mut PipelineAdapters, _: &Attached) -> Result<Vec<PathBuf>> {
        let dir = cfg.out.join("model");
        copy_dir(&cfg.model()?, &dir)?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_tensor_refs(weights_file(&dir.join("unet")), &param_refs(&sd.unet), &meta, FloatDtype::F32)?;
        if cfg.train_text_encoder {
            write_tensor_refs(weights_file(&dir.join("text_encoder")), &param_refs(&sd.text_encoder), &meta, FloatDtype::F32)?;
            if let Some(te2) = &sd.text_encoder_2 {
                write_tensor_refs(weights_file(&dir.join("text_encoder_2")), &param_refs(te2), &meta, FloatDtype::F32)?;
            }
        }
        Ok(vec![dir])
    }
}
