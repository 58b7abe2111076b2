//! HyperLoRA on the UNet (HyperDreamBooth's hypernetwork, see `knobs_adapters::hyperlora`):
//!
//! - [`pretrain`]: trains the hypernetwork over many procedural concepts
//!   (`knobs_world::concept::random_concept`, never a held-out one) with the diffusion loss of
//!   the frozen base model carrying the generated LoRA. Each step takes one concept, conditions
//!   the network on its learned code or (with probability `image_prob`) on the frozen judge's
//!   embeddings of some of its reference images, and steps AdamW on the network. Checkpoints
//!   and per-step random streams make a paused run resume bit-identically. The result is
//!   `OUT/hyperlora/` (safetensors + JSON config).
//! - [`personalize`]: `knobs train --method hyper-lora`: one forward pass from the instance
//!   images to a LoRA (zero-shot), then optionally a few steps of a zero-initialised
//!   higher-rank LoRA on top ("rank-relaxed" fast fine-tuning). Writes an ordinary LoRA (PEFT
//!   folder + diffusers file) and the compact code file.
mod personalization;
mod pretraining;

use std::path::{Path, PathBuf};

use anyhow::Result;
use image::RgbImage;
use knobs_adapters::hyperlora::HyperLoraConfig;
use knobs_diffusion::clip::embeddings::expand_prompt;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_diffusion::schedulers::DdpmScheduler;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Device, Tensor, cpu};
use knobs_world::images::to_tensor;
use rand::Rng;
use rand::rngs::StdRng;

use crate::loss::per_sample_mse;
use crate::rng::normal;

pub use personalization::{PersonalizeConfig, PersonalizeSummary, lora_from_code, personalize, run_train};
pub use pretraining::{HyperPretrainConfig, Outcome, pretrain, training_concepts};

/// The adapter name of the generated LoRA while training.
pub const ADAPTER: &str = "hyperlora";
/// The folder `pretrain` writes under its `--out`.
pub const SUBDIR: &str = "hyperlora";
/// The compact per-concept file of `knobs train --method hyper-lora`.
pub const CODE_FILE: &str = "hyperlora_code.safetensors";
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
pub const PEFT_DIR: &str = "unet_lora";

/// The training resolution of `sd` (the UNet's sample size times the VAE factor).
fn resolution(sd: &StableDiffusion) -> u32 {
    (sd.unet.config.sample_size.unwrap_or(64) * sd.vae_scale_factor()) as u32
}

fn embeddings_tensor(rows: &[Vec<f32>], device: &Device) -> Tensor<2> {
    let d = rows[0].len();
    Tensor::from_data(TensorData::new(rows.concat(), [rows.len(), d]), device)
}

/// The denoising loss of `sd` (with whatever LoRA is attached) on `images` with `prompts`:
/// VAE latents (outside autodiff), noise and timesteps from `rng`, epsilon / v target.
fn diffusion_loss(sd: &StableDiffusion, ddpm: &DdpmScheduler, images: &[RgbImage], prompts: &[String], rng: &mut StdRng, dev: &Device) -> Result<Tensor<1>> {
    let posterior = sd.vae.encode(to_tensor(images, &cpu())?);
    let latents = posterior.sample(normal(rng, posterior.mean.dims(), &cpu())) * sd.vae.scaling_factor();
    let latents = Tensor::<4>::from_data(latents.into_data(), dev);
    let noise = normal(rng, latents.dims(), dev);
    let t: Vec<i64> = (0..images.len()).map(|_| rng.random_range(0..ddpm.num_train_timesteps() as i64)).collect();
    let noisy = ddpm.add_noise(latents.clone(), noise.clone(), &t)?;
    let target = ddpm.training_target(latents, noise, &t)?;
    let prompts = prompts.iter().map(|p| expand_prompt(p, &sd.tokenizer)).collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let context = sd.text_encoder.forward(sd.tokenizer.encode_tensor(&refs, dev)?).last_hidden_state;
    let t_float = Tensor::<1>::from_floats(t.iter().map(|&x| x as f32).collect::<Vec<_>>().as_slice(), dev);
    Ok(per_sample_mse(sd.unet.forward(noisy, t_float, context), target).mean())
}

/// A hypernetwork folder: `DIR/hyperlora/` as `pretrain` writes it, or that folder itself.
pub fn hyper_dir(dir: &Path) -> PathBuf {
    if dir.join(SUBDIR).join(knobs_adapters::hyperlora::CONFIG_FILE).exists() { dir.join(SUBDIR) } else { dir.to_path_buf() }
}

/// FNV-1a of the hypernetwork's config JSON: ties a code file to its network.
fn config_hash(c: &HyperLoraConfig) -> Result<String> {
    let text = serde_json::to_string(c)?;
    Ok(format!("{:016x}", knobs_nn::hash::fnv1a(text.as_bytes())))
}
