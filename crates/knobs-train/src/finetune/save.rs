//! The files each method leaves behind, in the formats the ecosystem loads: a diffusers model
//! folder (DreamBooth), PEFT folders and diffusers / kohya LoRA files, diffusers or A1111
//! textual-inversion embeddings, A1111-style hypernetworks as safetensors.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use knobs_adapters::formats::diffusers::{self as diffusers_lora, DiffusersKeys};
use knobs_adapters::formats::lora_files::ComponentLora;
use knobs_adapters::formats::{kohya, peft};
use knobs_adapters::hypernetwork;
use knobs_adapters::{AdaptedModel, AdapterConfig};
use knobs_diffusion::clip::embeddings;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::io::{state_dict, write_safetensors};

use super::config::{LoraFormat, Method, TrainConfig};
use super::setup::{ADAPTER, Prepared};

pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
pub const KOHYA_FILE: &str = "lora_kohya.safetensors";
pub const EMBEDDING_FILE: &str = "learned_embeds.safetensors";
/// The A1111-style hypernetwork (`knobs generate --hypernetwork`).
pub const HYPERNETWORK_FILE: &str = "hypernetwork.safetensors";

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

fn save_model_folder(cfg: &TrainConfig, sd: &StableDiffusion) -> Result<Vec<PathBuf>> {
    let dir = cfg.out.join("model");
    copy_dir(&cfg.model, &dir)?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let unet = weights_file(&dir.join("unet"));
    write_safetensors(&unet, &state_dict(&sd.unet), &meta)?;
    if cfg.train_text_encoder {
        write_safetensors(weights_file(&dir.join("text_encoder")), &state_dict(&sd.text_encoder), &meta)?;
    }
    Ok(vec![dir])
}

fn save_adapters(cfg: &TrainConfig, sd: &mut StableDiffusion, p: &Prepared) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut components: Vec<(&str, ComponentLora)> = Vec::new();
    let folder = if cfg.method == Method::Ia3 { "ia3" } else { "lora" };
    if let Some(config) = &p.unet_adapter {
        let mut unet = AdaptedModel::new(&mut sd.unet, 0);
        unet.adopt(ADAPTER, config.clone())?;
        if cfg.method == Method::Hypernetwork {
            // Not a PEFT method: one safetensors file with A1111's keys and settings.
            let path = cfg.out.join(HYPERNETWORK_FILE);
            hypernetwork::save(&unet, ADAPTER, &path)?;
            return Ok(vec![path]);
        }
        let dir = cfg.out.join(format!("unet_{folder}"));
        peft::save(&unet, ADAPTER, &dir)?;
        out.push(dir);
        if config.peft_type() == knobs_adapters::PeftType::Lora {
            components.push(("unet", ComponentLora::from_adapter(&unet, ADAPTER)?));
        }
    }
    if let Some(config) = &p.text_encoder_adapter {
        let mut te = AdaptedModel::new(&mut sd.text_encoder, 0);
        te.adopt(ADAPTER, config.clone() as Box<dyn AdapterConfig>)?;
        let dir = cfg.out.join(format!("text_encoder_{folder}"));
        peft::save(&te, ADAPTER, &dir)?;
        out.push(dir);
        components.push(("text_encoder", ComponentLora::from_adapter(&te, ADAPTER)?));
    }
    if !components.is_empty() {
        let refs: Vec<(&str, &ComponentLora)> = components.iter().map(|(n, c)| (*n, c)).collect();
        let path = match cfg.format {
            LoraFormat::Diffusers => {
                let path = cfg.out.join(LORA_FILE);
                diffusers_lora::save(&path, &refs, DiffusersKeys::Diffusers)?;
                path
            }
            LoraFormat::Kohya => {
                let path = cfg.out.join(KOHYA_FILE);
                kohya::save(&path, &refs, Some("stable-diffusion-v1/lora"))?;
                path
            }
        };
        out.push(path);
    }
    Ok(out)
}

fn save_embedding(cfg: &TrainConfig, sd: &mut StableDiffusion, token: &str) -> Result<Vec<PathBuf>> {
    let table = &mut sd.text_encoder.text_model.embeddings.token_embedding;
    table.merge_adapter(ADAPTER)?;
    let emb = embeddings::from_model(token, &sd.tokenizer, &sd.text_encoder);
    sd.text_encoder.text_model.embeddings.token_embedding.unmerge_adapter(ADAPTER);
    let emb = emb?;
    let path = cfg.out.join(EMBEDDING_FILE);
    embeddings::save_diffusers(&path, &emb)?;
    let mut out = vec![path];
    if cfg.a1111_embedding {
        let path = cfg.out.join(format!("{token}.safetensors"));
        embeddings::save_a1111(&path, &emb)?;
        out.push(path);
    }
    Ok(out)
}

/// Writes the method's outputs into `cfg.out`; returns their paths.
pub fn save_outputs(cfg: &TrainConfig, sd: &mut StableDiffusion, p: &Prepared) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if cfg.method == Method::Dreambooth {
        out.extend(save_model_folder(cfg, sd)?);
    }
    out.extend(save_adapters(cfg, sd, p)?);
    if let Some(token) = &p.placeholder {
        out.extend(save_embedding(cfg, sd, token)?);
    }
    Ok(out)
}

/// Bytes on disk of files and folders.
pub fn size_of(paths: &[PathBuf]) -> u64 {
    fn walk(p: &Path) -> u64 {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p).map(|d| d.filter_map(|e| e.ok()).map(|e| walk(&e.path())).sum()).unwrap_or(0),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    paths.iter().map(|p| walk(p)).sum()
}
