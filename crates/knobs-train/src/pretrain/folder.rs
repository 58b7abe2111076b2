//! Writes the base model as a diffusers folder: the same file names, config keys and tensor
//! names that `StableDiffusionPipeline.from_pretrained` reads.
use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use knobs_diffusion::clip::ClipTextModel;
use knobs_diffusion::unet::UNet2DConditionModel;
use knobs_diffusion::vae::AutoencoderKL;
use knobs_nn::Module;
use knobs_nn::io::{atomic_write, state_dict, write_safetensors};
use serde_json::{Value, json};

use super::recipe;

const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const TRANSFORMERS_WEIGHTS: &str = "model.safetensors";

/// A component folder counts as written once its weights are: they are written last.
pub fn is_complete(dir: &Path) -> bool {
    dir.join("config.json").exists() && (dir.join(DIFFUSERS_WEIGHTS).exists() || dir.join(TRANSFORMERS_WEIGHTS).exists())
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    Ok(atomic_write(path, serde_json::to_string_pretty(value)?.as_bytes())?)
}

fn write_component<M: Module + ?Sized>(dir: &Path, config: &Value, model: &M, weights: &str) -> Result<()> {
    write_json(&dir.join("config.json"), config)?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(dir.join(weights), &state_dict(model), &meta)?;
    Ok(())
}

pub fn write_vae(dir: &Path, vae: &AutoencoderKL, scaling_factor: f64) -> Result<()> {
    let mut config = recipe::vae_config();
    config["scaling_factor"] = json!(scaling_factor);
    write_component(dir, &config, vae, DIFFUSERS_WEIGHTS)
}

pub fn write_unet(dir: &Path, unet: &UNet2DConditionModel) -> Result<()> {
    write_component(dir, &recipe::unet_config(), unet, DIFFUSERS_WEIGHTS)
}

pub fn write_text_encoder(dir: &Path, config: &Value, text_encoder: &ClipTextModel) -> Result<()> {
    write_component(dir, config, text_encoder, TRANSFORMERS_WEIGHTS)
}

/// `scheduler/` and `model_index.json`: what turns the component folders into a pipeline.
pub fn write_pipeline_files(model_dir: &Path) -> Result<()> {
    write_json(&model_dir.join("scheduler").join("scheduler_config.json"), &recipe::scheduler_config())?;
    let index = json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    });
    write_json(&model_dir.join("model_index.json"), &index)
}
