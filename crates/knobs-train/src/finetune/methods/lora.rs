//! LoRA: low-rank adapters on the UNet's attention projections (optionally its convolutions
//! and the text encoder's attention), saved as PEFT folders plus one diffusers or kohya file.
use std::path::PathBuf;

use anyhow::Result;
use knobs_adapters::{AdapterConfig, Pattern};
use knobs_adapters::lora::LoraConfig;
use knobs_diffusion::loaders::{Component, LoraFile, PipelineAdapters};
use knobs_diffusion::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

use super::{ADAPTER, Attached, Defaults, OptionGroup, TrainMethod};
use crate::finetune::config::{TrainConfig, defaults_from_clap};
use crate::finetune::outputs::{KOHYA_FILE, LORA_FILE, LYCORIS_FILE};

/// LoRA file layouts `--format` writes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoraFormat {
    /// PEFT folders + diffusers `pytorch_lora_weights.safetensors`.
    #[value(alias = "peft")]
    Diffusers,
    /// kohya-ss keys with `.alpha` and `ss_*` / `modelspec.*` metadata.
    Kohya,
}

/// LoRA's settings (also the rank of IA3-free methods that train a LoRA: pivotal, hyper-lora).
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[command(next_help_heading = "LoRA (lora, pivotal, hyper-lora)")]
pub struct LoraOptions {
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// LoRA alpha (default: the rank, a scale of 1).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Comma-separated UNet module names for LoRA.
    #[arg(long, value_delimiter = ',', default_value = "to_q,to_k,to_v,to_out.0")]
    pub target_modules: Vec<String>,
    /// Comma-separated text-encoder module names (with --train-text-encoder).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,out_proj")]
    pub text_encoder_target_modules: Vec<String>,
    /// Dropout on the LoRA branch's input while training (PEFT's `lora_dropout`).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Also adapt the UNet's convolutions (LoCon).
    #[arg(long)]
    pub conv: bool,
    /// LoRA file format.
    #[arg(long, value_enum, default_value_t = LoraFormat::Diffusers)]
    pub format: LoraFormat,
}

defaults_from_clap!(LoraOptions);

impl LoraOptions {
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }
    pub fn config(&self, targets: Vec<String>) -> LoraConfig {
        LoraConfig { lora_dropout: self.lora_dropout, ..LoraConfig::new(self.rank, self.alpha(), Pattern::Names(targets)) }
    }
}

/// Attaches the UNet LoRA (and the text encoder's with `--train-text-encoder`); returns its
/// parameters.
pub fn attach_lora(cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
    attach_with(cfg, sd, adapters, |targets| Box::new(cfg.lora.config(targets)))
}

/// Attaches `config(targets)` to the UNet at LoRA's target flags (with `--conv` its
/// convolutions) and, with `--train-text-encoder`, to the text encoder (both of SDXL's, as
/// diffusers' and kohya's SDXL scripts); the shared attach of
/// every low-rank-family method.
pub fn attach_with(cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, config: impl Fn(Vec<String>) -> Box<dyn AdapterConfig>) -> Result<Attached> {
    let o = &cfg.lora;
    let mut targets = o.target_modules.clone();
    if o.conv {
        targets.extend(["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out"].map(String::from));
    }
    adapters.add(sd, Component::Unet, ADAPTER, config(targets))?;
    if cfg.train_text_encoder {
        for c in Component::text_encoders(sd) {
            adapters.add(sd, c, ADAPTER, config(o.text_encoder_target_modules.clone()))?;
        }
    }
    Ok(Attached { trainable: adapters.parameter_paths(sd, ADAPTER)?, placeholder: None })
}

/// PEFT folders (`unet_<method>/`, ...) and, with `--format kohya`, one LyCORIS file as
/// kohya's trainers write for LoHa, LoKr and DoRA.
pub fn save_peft_and_lycoris(cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, method: &str) -> Result<Vec<PathBuf>> {
    let mut out = adapters.save_peft(sd, ADAPTER, &cfg.out, method)?;
    if cfg.lora.format == LoraFormat::Kohya {
        let path = cfg.out.join(LYCORIS_FILE);
        adapters.save_lycoris_file(sd, ADAPTER, &path)?;
        out.push(path);
    }
    Ok(out)
}

/// PEFT folders (`unet_lora/`, `text_encoder_lora/`) and the LoRA file in `--format`.
pub fn save_lora(cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Vec<PathBuf>> {
    let mut out = adapters.save_peft(sd, ADAPTER, &cfg.out, "lora")?;
    let (path, layout) = match cfg.lora.format {
        LoraFormat::Diffusers => (cfg.out.join(LORA_FILE), LoraFile::Diffusers),
        LoraFormat::Kohya => (cfg.out.join(KOHYA_FILE), LoraFile::Kohya),
    };
    adapters.save_lora_file(sd, ADAPTER, &path, layout)?;
    out.push(path);
    Ok(out)
}

pub struct Lora;

impl TrainMethod for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }
    fn about(&self) -> &'static str {
        "low-rank adapters on attention (and convolutions with --conv)"
    }
    fn defaults(&self) -> Defaults {
        Defaults { learning_rate: 1e-3, max_train_steps: 300 }
    }
    fn options(&self) -> &'static [OptionGroup] {
        &[OptionGroup::Lora, OptionGroup::TextEncoder]
    }
    fn attach(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<Attached> {
        attach_lora(cfg, sd, adapters)
    }
    fn save(&self, cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters, _: &Attached) -> Result<Vec<PathBuf>> {
        save_lora(cfg, sd, adapters)
    }
}
