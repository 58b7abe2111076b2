//! Generation time of a run's result against the bare base, in this process: the same prompt,
//! seed, steps and guidance for all, the best of a few repeats each. Adapters are timed
//! attached (unmerged) and then merged into the weights; a merged LoRA or IA3 should cost what
//! the base costs.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use knobs_diffusion::pipeline::{GenerateRequest, StableDiffusion};
use knobs_nn::ModuleExt;
use serde_json::{Value, json};

use knobs_diffusion::loaders::PipelineAdapters;

use super::adapters::{Artefacts, attach_all};
use crate::cmd::generate::AdapterArgs;

/// Each configuration is timed this many times; the fastest counts.
pub const REPEATS: usize = 5;
/// The guidance every timing uses (as `knobs eval`'s default).
const GUIDANCE: f64 = 5.0;

pub struct Timer {
    base_dir: PathBuf,
    base: Option<StableDiffusion>,
    steps: usize,
}

/// A pipeline for inference: every parameter out of autodiff (as attaching an adapter leaves
/// its component), so that every configuration runs the same kind of tensors.
fn load(dir: &Path) -> Result<StableDiffusion> {
    let mut sd = StableDiffusion::from_dir(dir, &knobs_nn::device::inference()).with_context(|| format!("loading {}", dir.display()))?;
    sd.for_inference();
    Ok(sd)
}

impl Timer {
    pub fn new(base_dir: &Path, steps: usize) -> Timer {
        Timer { base_dir: base_dir.to_path_buf(), base: None, steps }
    }

    /// Milliseconds for one image of `prompt` with each pipeline: the best of [`REPEATS`],
    /// taken in turns so that a change in machine load touches every pipeline alike.
    fn time(&self, pipelines: &[&StableDiffusion], prompt: &str) -> Result<Vec<f64>> {
        let req = GenerateRequest { prompt: prompt.to_string(), steps: self.steps, guidance_scale: GUIDANCE, num_images: 1, seed: 0, ..Default::default() };
        let mut best = vec![f64::INFINITY; pipelines.len()];
        for _ in 0..REPEATS {
            for (sd, best) in pipelines.iter().zip(&mut best) {
                let start = Instant::now();
                sd.generate(&req).with_context(|| format!("generating \"{prompt}\""))?;
                *best = best.min(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(best)
    }

    /// The run's result as it is used: attached (unmerged), and with every adapter merged;
    /// `None` for the merged one when there is nothing to merge.
    fn adapted(&self, a: &Artefacts) -> Result<(StableDiffusion, Option<StableDiffusion>, &'static str)> {
        if let Some(model) = &a.model {
            return Ok((load(model)?, None, "a full model folder: nothing to merge"));
        }
        let attach = || -> Result<(StableDiffusion, PipelineAdapters, Vec<String>)> {
            let mut sd = load(&self.base_dir)?;
            // Embeddings and hypernetworks exactly as `knobs generate` attaches them.
            let specs = a.hypernetworks.iter().map(|p| p.display().to_string()).collect();
            let mut adapters = AdapterArgs { lora: Vec::new(), embedding: a.embeddings.clone(), hypernetwork: specs }.apply(&mut sd)?;
            let attached = attach_all(&mut sd, &mut adapters, a)?;
            Ok((sd, adapters, attached))
        };
        let (unmerged, _, attached) = attach()?;
        if !a.hypernetworks.is_empty() {
            return Ok((unmerged, None, "a hypernetwork is non-linear: it cannot be merged"));
        }
        if attached.is_empty() {
            return Ok((unmerged, None, "embeddings are rows of the token table: nothing to merge"));
        }
        let (mut merged, mut adapters, attached) = attach()?;
        for name in &attached {
            adapters.merge(&mut merged, name)?;
        }
        Ok((unmerged, Some(merged), "adapters attached (unmerged), and merged into the weights"))
    }

    /// Base, unmerged and merged milliseconds (`artefacts` `None`: the base row itself).
    pub fn measure(&mut self, prompt: &str, artefacts: Option<&Artefacts>) -> Result<Value> {
        if self.base.is_none() {
            self.base = Some(load(&self.base_dir)?);
        }
        let base = self.base.as_ref().expect("loaded above");
        let (base_ms, unmerged_ms, merged_ms, note) = match artefacts {
            None => {
                let t = self.time(&[base], prompt)?;
                (t[0], t[0], t[0], "the base model: nothing attached")
            }
            Some(a) => match self.adapted(a)? {
                (unmerged, Some(merged), note) => {
                    let t = self.time(&[base, &unmerged, &merged], prompt)?;
                    (t[0], t[1], t[2], note)
                }
                (unmerged, None, note) => {
                    let t = self.time(&[base, &unmerged], prompt)?;
                    (t[0], t[1], t[1], note)
                }
            },
        };
        Ok(json!({
            "base_ms": base_ms,
            "unmerged_ms": unmerged_ms,
            "merged_ms": merged_ms,
            "prompt": prompt,
            "steps": self.steps,
            "guidance": GUIDANCE,
            "images": 1,
            "repeats": REPEATS,
            "note": note,
        }))
    }
}
