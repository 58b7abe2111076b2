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
use knobs_adapters::hyperlora::HyperLoraConfig;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Device, Tensor};


pub use personalization::{PersonalizeConfig, lora_from_code, personalize, run_train};
pub use pretraining::{HyperPretrainConfig, Outcome, pretrain, training_concepts};

/// The adapter name of the generated LoRA while training.
pub const ADAPTER: &str = "hyperlora";
/// The folder `pretrain` writes under its `--out`.
pub const SUBDIR: &str = "hyperlora";
/// The compact per-concept file of `knobs train --method hyper-lora`.
pub const CODE_FILE: &str = "hyperlora_code.safetensors";
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
pub const PEFT_DIR: &str = "unet_lora";

fn embeddings_tensor(rows: &[Vec<f32>], device: &Device) -> Tensor<2> {
    let d = rows[0].len();
    Tensor::from_data(TensorData::new(rows.concat(), [rows.len(), d]), device)
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
