//! `knobs pretrain`: the recipe that makes the built-in base model. Two phases, each resumable
//! from its own checkpoints: the VAE learns to compress 32x32 renderings to 16x16x4 latents,
//! then the text encoder and UNet learn, together and from scratch, to denoise those latents
//! given captions. The result is a diffusers folder (`<out>/model`).
pub mod base;
pub mod folder;
pub mod recipe;
pub mod tokenizer;
pub mod vae;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use crate::progress::{Progress, Tick};

/// One phase's optimisation budget.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Phase {
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainConfig {
    /// Work folder: `checkpoints/` while training, `model/` when done.
    pub out: PathBuf,
    pub seed: u64,
    pub vae: Phase,
    pub base: Phase,
    pub ema_decay: f64,
    /// Min-SNR-gamma loss weighting (Hang et al. 2023): converges several times faster.
    pub snr_gamma: f64,
    /// Fraction of captions replaced by "" so that classifier-free guidance works.
    pub caption_dropout: f64,
    /// Scenes whose latents are cached for the base phase.
    pub latent_cache: usize,
    pub checkpoint_every: u64,
    /// Stop after this many seconds (with a checkpoint); the next run resumes.
    pub max_seconds: Option<f64>,
}

impl PretrainConfig {
    pub fn recipe(out: PathBuf) -> Self {
        PretrainConfig {
            out,
            seed: 0,
            vae: Phase { steps: 2000, batch: 16, lr: 1e-3, warmup: 50 },
            base: Phase { steps: 9000, batch: 32, lr: 5e-4, warmup: 200 },
            ema_decay: 0.999,
            snr_gamma: 5.0,
            caption_dropout: 0.1,
            latent_cache: 8192,
            checkpoint_every: 200,
            max_seconds: None,
        }
    }
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.out.join("checkpoints")
    }
    pub fn model_dir(&self) -> PathBuf {
        self.out.join("model")
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished(PathBuf),
    /// Stopped at the time limit after saving a checkpoint; run again to continue.
    Paused { phase: &'static str, step: u64 },
}

/// Wall-clock budget shared by the phases of one run.
pub struct Deadline {
    start: Instant,
    limit: Option<f64>,
}

impl Deadline {
    pub fn new(limit: Option<f64>) -> Self {
        Deadline { start: Instant::now(), limit }
    }
    pub fn passed(&self) -> bool {
        self.limit.is_some_and(|l| self.start.elapsed().as_secs_f64() >= l)
    }
    /// Whether a loop that has completed `step` of `total` steps stops here; a finished one never pauses.
    pub fn pauses_at(&self, step: u64, total: u64) -> bool {
        step < total && self.passed()
    }
}

pub fn run(config: &PretrainConfig, progress: Progress) -> anyhow::Result<Outcome> {
    let deadline = Deadline::new(config.max_seconds);
    tokenizer::write(&config.model_dir().join("tokenizer"))?;
    let vae = match vae::train(config, &deadline, progress)? {
        ControlFlow::Continue(vae) => vae,
        ControlFlow::Break(step) => return Ok(Outcome::Paused { phase: "vae", step }),
    };
    match base::train(config, &vae, &deadline, progress)? {
        ControlFlow::Continue(()) => Ok(Outcome::Finished(config.model_dir())),
        ControlFlow::Break(step) => Ok(Outcome::Paused { phase: "base", step }),
    }
}
