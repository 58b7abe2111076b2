//! The fuzz targets: every reader of a file a user hands knobs, each run on a scratch folder
//! that holds the mutated file under the name the reader looks for (and, where a reader reads
//! a folder, fixed valid companions).
use std::path::{Path, PathBuf};

use anyhow::Result;
use knobs_adapters::formats::{lora_files, lycoris, peft};
use knobs_diffusion::clip::ClipTokenizer;
use knobs_diffusion::clip::embeddings;
use knobs_diffusion::schedulers::SchedulerConfig;
use knobs_nn::io::{LoadOptions, load_state_dict, read_safetensors};

pub struct Target {
    pub name: &'static str,
    /// Where the mutated bytes go in the scratch folder.
    pub file: &'static str,
    /// Fixed files the reader needs beside it: (name in the scratch folder, source).
    pub companions: Vec<(&'static str, PathBuf)>,
    pub seeds: Vec<PathBuf>,
    pub run: fn(&Path) -> Result<()>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    root().join("crates/knobs-diffusion/tests/fixtures")
}

/// Every file of the committed seed folder `seeds/<name>`.
fn seeds(name: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(name);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    v.sort();
    v
}

fn with(mut a: Vec<PathBuf>, b: impl IntoIterator<Item = PathBuf>) -> Vec<PathBuf> {
    a.extend(b);
    a
}

fn adapter_methods(names: &[&str]) -> Vec<PathBuf> {
    names.iter().map(|n| fixtures().join("adapter_methods").join(n)).collect()
}

fn tiny_sdxl(names: &[&str]) -> Vec<PathBuf> {
    names.iter().map(|n| fixtures().join("tiny-sdxl").join(n)).collect()
}

fn base(names: &[&str]) -> Vec<PathBuf> {
    names.iter().map(|n| root().join("models/knobs-base").join(n)).collect()
}

fn safetensors(dir: &Path) -> Result<()> {
    let sd = read_safetensors(dir.join("file.safetensors"))?;
    for key in sd.tensors.keys() {
        sd.f32(key)?;
    }
    Ok(())
}

fn lora_file(dir: &Path) -> Result<()> {
    lora_files::read(dir.join("lora.safetensors"))?;
    Ok(())
}

fn lycoris_file(dir: &Path) -> Result<()> {
    lycoris::read(&read_safetensors(dir.join("lycoris.safetensors"))?)?;
    Ok(())
}

fn peft_folder(dir: &Path) -> Result<()> {
    peft::read_config(dir)?;
    let sd = read_safetensors(dir.join(peft::WEIGHTS_FILE))?;
    for key in sd.tensors.keys() {
        sd.f32(key)?;
    }
    Ok(())
}

fn adapter_config(dir: &Path) -> Result<()> {
    peft::read_config(dir)?;
    Ok(())
}

fn unet_config(dir: &Path) -> Result<()> {
    knobs_diffusion::unet::UNetConfig::from_file(dir.join("config.json"))?.validate()?;
    Ok(())
}

fn vae_config(dir: &Path) -> Result<()> {
    knobs_diffusion::vae::VaeConfig::from_file(dir.join("config.json"))?.validate()?;
    Ok(())
}

fn clip_config(dir: &Path) -> Result<()> {
    knobs_diffusion::clip::ClipTextConfig::from_file(dir.join("config.json"))?.validate()?;
    Ok(())
}

/// The config read, and every sampler built from it and set to 25 steps, as `generate` does.
fn scheduler_config(dir: &Path) -> Result<()> {
    let config = SchedulerConfig::from_file(dir.join("scheduler_config.json"))?;
    for kind in knobs_diffusion::pipeline::SchedulerKind::ALL {
        if let Ok(mut s) = kind.build(&config) {
            let _ = s.set_timesteps(25);
        }
    }
    Ok(())
}

fn model_index(dir: &Path) -> Result<()> {
    knobs_diffusion::pipeline::check_model_index(dir)?;
    Ok(())
}

/// A tokenizer folder read and one prompt tokenized.
fn tokenizer(dir: &Path) -> Result<()> {
    let tok = ClipTokenizer::from_dir(dir)?;
    tok.encode("a photo of a sks dog, 4k")?;
    Ok(())
}

fn embedding(dir: &Path) -> Result<()> {
    let path = dir.join("embedding.safetensors");
    let one = embeddings::read(&path, None).map(drop);
    let two = embeddings::read_sdxl(&path, None).map(drop);
    one.or(two)?;
    Ok(())
}

fn hypernetwork(dir: &Path) -> Result<()> {
    knobs_adapters::hypernetwork::read(dir.join("hypernetwork.safetensors"))?;
    Ok(())
}

fn train_toml(dir: &Path) -> Result<()> {
    knobs_train::finetune::TrainConfig::from_toml(&dir.join("train.toml"))?.validate()?;
    Ok(())
}

/// The newest checkpoint read as `--resume` reads it: its settings and loss history, then its
/// model tensors loaded into a small model.
fn checkpoint(dir: &Path) -> Result<()> {
    let ckpts = knobs_train::checkpoint::Checkpoints::new(dir, "train");
    let Some((_, ck)) = ckpts.latest()? else { return Ok(()) };
    knobs_train::checkpoint::meta(&ck, "config")?;
    knobs_train::checkpoint::decode_history(knobs_train::checkpoint::meta(&ck, "loss_history")?)?;
    let mut model = knobs_nn::toy::TinyNet::new(0, &knobs_nn::cpu());
    load_state_dict(&mut model, &knobs_train::checkpoint::sub_dict(&ck, "model."), LoadOptions { allow_missing: true, allow_unexpected: true, ..Default::default() })?;
    Ok(())
}

fn caption(dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(dir.join("caption.txt"))?;
    knobs_world::parse_prompt(&text);
    Ok(())
}

pub fn all() -> Vec<Target> {
    let lycoris_files = ["lokr_lycoris.safetensors", "oft_lycoris.safetensors", "lokr_both_lycoris.safetensors", "oft_constrained_lycoris.safetensors"];
    let peft_configs = ["loha_peft", "loha_cp_peft", "lokr_peft", "lokr_cp_peft", "oft_peft", "oft_coft_peft", "dora_peft"];
    vec![
        Target {
            name: "safetensors",
            file: "file.safetensors",
            companions: vec![],
            seeds: with(seeds("lora"), with(seeds("embedding"), adapter_methods(&lycoris_files[..1]))),
            run: safetensors,
        },
        Target { name: "lora-file", file: "lora.safetensors", companions: vec![], seeds: seeds("lora"), run: lora_file },
        Target { name: "lycoris-file", file: "lycoris.safetensors", companions: vec![], seeds: adapter_methods(&lycoris_files), run: lycoris_file },
        Target {
            name: "peft-weights",
            file: peft::WEIGHTS_FILE,
            companions: vec![(peft::CONFIG_FILE, fixtures().join("adapter_methods/lokr_cp_peft").join(peft::CONFIG_FILE))],
            seeds: vec![fixtures().join("adapter_methods/lokr_cp_peft").join(peft::WEIGHTS_FILE)],
            run: peft_folder,
        },
        Target {
            name: "adapter-config",
            file: peft::CONFIG_FILE,
            companions: vec![],
            seeds: with(
                peft_configs.iter().map(|d| fixtures().join("adapter_methods").join(d).join(peft::CONFIG_FILE)).collect(),
                tiny_sdxl(&["goldens/lora/peft/unet/adapter_config.json"]),
            ),
            run: adapter_config,
        },
        Target {
            name: "unet-config",
            file: "config.json",
            companions: vec![],
            seeds: with(tiny_sdxl(&["unet/config.json"]), base(&["unet/config.json"])),
            run: unet_config,
        },
        Target {
            name: "vae-config",
            file: "config.json",
            companions: vec![],
            seeds: with(tiny_sdxl(&["vae/config.json"]), base(&["vae/config.json"])),
            run: vae_config,
        },
        Target {
            name: "clip-config",
            file: "config.json",
            companions: vec![],
            seeds: with(tiny_sdxl(&["text_encoder/config.json", "text_encoder_2/config.json"]), base(&["text_encoder/config.json"])),
            run: clip_config,
        },
        Target {
            name: "scheduler-config",
            file: "scheduler_config.json",
            companions: vec![],
            seeds: with(tiny_sdxl(&["scheduler/scheduler_config.json"]), base(&["scheduler/scheduler_config.json"])),
            run: scheduler_config,
        },
        Target {
            name: "model-index",
            file: "model_index.json",
            companions: ["tokenizer", "text_encoder", "unet", "vae", "scheduler", "tokenizer_2", "text_encoder_2"]
                .iter()
                .map(|c| (*c, PathBuf::new()))
                .collect(),
            seeds: with(tiny_sdxl(&["model_index.json"]), base(&["model_index.json"])),
            run: model_index,
        },
        Target {
            name: "tokenizer-json",
            file: "tokenizer.json",
            companions: vec![("tokenizer_config.json", fixtures().join("tiny-sdxl/tokenizer/tokenizer_config.json"))],
            seeds: tiny_sdxl(&["tokenizer/tokenizer.json"]),
            run: tokenizer,
        },
        Target {
            name: "tokenizer-vocab",
            file: "vocab.json",
            companions: vec![("merges.txt", fixtures().join("tiny-sdxl/tokenizer/merges.txt"))],
            seeds: tiny_sdxl(&["tokenizer/vocab.json"]),
            run: tokenizer,
        },
        Target {
            name: "embedding",
            file: "embedding.safetensors",
            companions: vec![],
            seeds: with(seeds("embedding"), tiny_sdxl(&["goldens/textual_inversion/tiny-ti.safetensors"])),
            run: embedding,
        },
        Target { name: "hypernetwork", file: "hypernetwork.safetensors", companions: vec![], seeds: seeds("hypernetwork"), run: hypernetwork },
        Target { name: "train-toml", file: "train.toml", companions: vec![], seeds: seeds("toml"), run: train_toml },
        Target { name: "checkpoint", file: "train-00000002.safetensors", companions: vec![], seeds: seeds("checkpoint"), run: checkpoint },
        Target { name: "caption", file: "caption.txt", companions: vec![], seeds: seeds("caption"), run: caption },
    ]
}
