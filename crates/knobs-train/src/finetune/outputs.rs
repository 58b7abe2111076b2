//! What every run leaves besides the method's own files: the names of those files (so that
//! other commands find them), the end-of-run samples and `summary.json`.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Result;
use image::RgbImage;
use knobs_diffusion::pipeline::{Conditioning, GenerateRequest, StableDiffusion};
use knobs_diffusion::unet::AddedCond;
use knobs_nn::io::atomic_write;
use knobs_world::images::{from_tensor, grid};
use serde::Serialize;

pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
pub const KOHYA_FILE: &str = "lora_kohya.safetensors";
/// LoHa, LoKr and DoRA with `--format kohya`.
pub const LYCORIS_FILE: &str = "lycoris_kohya.safetensors";
pub const EMBEDDING_FILE: &str = "learned_embeds.safetensors";
/// The A1111-style hypernetwork (`knobs generate --hypernetwork`).
pub const HYPERNETWORK_FILE: &str = "hypernetwork.safetensors";

/// What a training run reports (`summary.json`, `knobs train --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub method: String,
    pub steps: u64,
    /// Loading and training, not the samples and files written after.
    pub seconds: f64,
    pub seconds_per_step: Option<f64>,
    pub trainable_params: usize,
    pub outputs: Vec<PathBuf>,
    pub output_bytes: u64,
    pub peak_rss_bytes: Option<u64>,
    pub final_loss: Option<f64>,
    /// Measures of one method only (HyperLoRA's zero-shot time, code size, ...).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Summary {
    /// Writes `OUT/summary.json`.
    pub fn write(&self, out: &Path) -> Result<()> {
        Ok(atomic_write(out.join("summary.json"), serde_json::to_string_pretty(self)?.as_bytes())?)
    }
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

/// How samples are drawn: `per_prompt` images of each prompt with the seeds `knobs generate
/// --seed 0 --num-images N` uses, so that the saved files loaded there reproduce them.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub per_prompt: usize,
    pub steps: usize,
    pub guidance: f64,
}

impl Sampling {
    fn request(&self, prompt: &str) -> GenerateRequest {
        GenerateRequest { steps: self.steps, guidance_scale: self.guidance, num_images: self.per_prompt, seed: 0, ..GenerateRequest::new(prompt) }
    }
}

/// One sampling's prompt encodings, made while the text encoders were still loaded, by
/// prompt; a prompt not in here is encoded when it is drawn.
#[derive(Default)]
pub struct SampleEncodings(HashMap<String, Conditioning>);

impl SampleEncodings {
    /// The encodings of `prompts` under `s` (none when it draws no images).
    pub fn encode(sd: &StableDiffusion, prompts: &[String], s: Sampling) -> Result<Self> {
        let mut map = HashMap::new();
        if s.per_prompt > 0 {
            for p in prompts {
                // Kept outside autodiff: sampling records no graph.
                let c = sd.condition_for(&s.request(p))?;
                let added = c.added.map(|a| AddedCond { text_embeds: a.text_embeds.inner(), time_ids: a.time_ids.inner() });
                map.insert(p.clone(), Conditioning { context: c.context.inner(), added });
            }
        }
        Ok(SampleEncodings(map))
    }
}

/// `per_prompt` images of each prompt, as `knobs generate` draws them.
pub fn sample(sd: &StableDiffusion, prompts: &[String], s: Sampling, given: &SampleEncodings) -> Result<Vec<RgbImage>> {
    let mut out = Vec::new();
    for p in prompts {
        let req = GenerateRequest { conditioning: given.0.get(p).cloned(), ..s.request(p) };
        out.extend(from_tensor(sd.generate(&req)?.mul_scalar(2.0).sub_scalar(1.0))?);
    }
    Ok(out)
}

/// A grid of images, `per_row` across.
pub fn save_grid(path: &Path, images: &[RgbImage], per_row: usize) -> Result<()> {
    Ok(atomic_write(path, &knobs_world::dataset::encode_png(&grid(images, per_row.max(1)))?)?)
}

/// The end-of-run samples: `OUT/samples.png` (a row per prompt) and the first prompt's
/// images as `OUT/samples/<i>.png`. Nothing when `per_prompt` is 0.
pub fn write_samples(out: &Path, sd: &StableDiffusion, prompts: &[String], s: Sampling, given: &SampleEncodings) -> Result<()> {
    if s.per_prompt == 0 || prompts.is_empty() {
        return Ok(());
    }
    let images = sample(sd, prompts, s, given)?;
    save_grid(&out.join("samples.png"), &images, s.per_prompt)?;
    for (i, img) in images.iter().take(s.per_prompt).enumerate() {
        atomic_write(out.join("samples").join(format!("{i}.png")), &knobs_world::dataset::encode_png(img)?)?;
    }
    Ok(())
}
