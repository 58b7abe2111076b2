//! `knobs bench`: the training step of each method and one generation step, timed the way
//! `knobs train` and `knobs generate` run them, so that the README's speed tables come from
//! one command. A training step is the trainer's: VAE encode and text encoder (frozen), UNet
//! forward and backward, gradient clipping, AdamW, as `../shared/reference/bench_builtin.py`
//! does in PyTorch. A generation step is one DDIM step with classifier-free guidance plus the
//! VAE decode, as `gen_time.py --steps 1`.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use image::RgbImage;
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::{GenerateRequest, SchedulerKind, StableDiffusion};
use knobs_nn::optim::{AdamW, AdamWConfig, clip_grad_norm, collect_grads};
use knobs_nn::ModuleExt;
use knobs_nn::burn::tensor::DType;
use knobs_nn::io::FloatDtype;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::finetune::config::{MixedPrecision, TrainConfig};
use crate::finetune::methods::Method;
use crate::finetune::trainer::set_trainable;
use crate::objective::{ImageSizes, LossOptions, Objective, resolution};
use crate::progress::peak_rss_bytes;
use crate::rng::step_rng;

/// What can be timed, with the `--method` each training mode stands for.
pub const MODES: &[(&str, Option<&str>)] = &[
    ("full", Some("dreambooth")),
    ("lora", Some("lora")),
    ("dora", Some("dora")),
    ("loha", Some("loha")),
    ("lokr", Some("lokr")),
    ("oft", Some("oft")),
    ("ia3", Some("ia3")),
    ("ti", Some("textual-inversion")),
    ("generate", None),
];

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: PathBuf,
    /// Pixels; `None`: the model's own.
    pub resolution: Option<u32>,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    /// What the UNet computes in (`--mixed-precision`; no loss scaling: timing only).
    pub mixed_precision: MixedPrecision,
    /// Training steps under burn's balanced checkpointing (`--gradient-checkpointing`).
    pub gradient_checkpointing: bool,
    /// How frozen weight matrices and kernels are kept (`--weights-dtype`; without it, f32 for
    /// training and `MixedPrecision::generation_weights`' for generation).
    pub weights_dtype: Option<FloatDtype>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub mode: String,
    pub median_s: f64,
    pub mean_s: f64,
    pub min_s: f64,
    pub steps: usize,
    pub batch: usize,
    pub resolution: u32,
    pub threads: usize,
    /// Where it ran, as `--device` names it.
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default)]
    pub weights_dtype: FloatDtype,
    pub load_s: f64,
    pub peak_rss_bytes: Option<u64>,
    pub trainable_params: usize,
    pub model_bytes: u64,
    /// Where a training step's time goes, median seconds of each part (empty for
    /// generation): `vae_encode` is timed on its own call, outside the step; `forward` is
    /// the step's VAE encode and text encoder (`encode`) then its UNet forward and loss
    /// (`unet_forward`); then `backward` and
    /// `optimizer` (gradient clipping and AdamW). The PyTorch peers print the same parts.
    #[serde(default)]
    pub phases: Vec<(String, f64)>,
    /// Seconds of each timed step, in order (a slow step shows where the median hides it).
    #[serde(default)]
    pub times_s: Vec<f64>,
    /// Resident memory in bytes after each part of the last training step (`encode`,
    /// `forward`, `backward`, `optimizer`; empty for generation and off Linux): the growth
    /// over `forward` is what the forward pass holds for the backward, which the peak alone
    /// hides behind the load's.
    #[serde(default)]
    pub resident_after: Vec<(String, u64)>,
}

/// Bytes of the model's weight files.
fn model_bytes(dir: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p).map(|d| d.filter_map(|e| e.ok()).map(|e| walk(&e.path())).sum()).unwrap_or(0),
            Ok(m) if p.extension().is_some_and(|e| e == "safetensors") => m.len(),
            _ => 0,
        }
    }
    walk(dir)
}

/// The `--method` a mode times (`None`: generation), or an error naming `--modes`.
pub fn method_of(mode: &str) -> Result<Option<&'static str>> {
    match MODES.iter().find(|(m, _)| *m == mode) {
        Some(&(_, method)) => Ok(method),
        None => bail!("--modes: unknown mode `{mode}`; known: {}", MODES.iter().map(|(m, _)| *m).collect::<Vec<_>>().join(", ")),
    }
}

/// Times `mode` (one of [`MODES`]) in this process.
pub fn measure(mode: &str, o: &BenchOptions) -> Result<Measurement> {
    let method = method_of(mode)?;
    if o.steps == 0 || o.batch == 0 {
        bail!("--steps and --batch must be at least 1");
    }
    let dev = if method.is_some() { knobs_nn::device::training() } else { knobs_nn::device::inference() };
    let loaded = Instant::now();
    let weights = match method {
        Some(_) => o.weights_dtype.unwrap_or(FloatDtype::F32).dtype().into(),
        None => o.mixed_precision.generation_weights(o.weights_dtype),
    };
    let mut sd = StableDiffusion::load_as(&o.model, &dev, weights).with_context(|| format!("--model {}", o.model.display()))?;
    let load_s = loaded.elapsed().as_secs_f64();
    o.mixed_precision.apply(&mut sd);
    let res = o.resolution.unwrap_or_else(|| resolution(&sd));
    let (times, trainable_params, phases, resident_after) = match method {
        Some(method) => train_steps(method, &mut sd, res, o)?,
        None => (generate_steps(&sd, res, o)?, 0, Vec::new(), Vec::new()),
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Measurement {
        mode: mode.to_string(),
        median_s: sorted[sorted.len() / 2],
        mean_s: times.iter().sum::<f64>() / times.len() as f64,
        min_s: sorted[0],
        steps: times.len(),
        batch: o.batch,
        resolution: res,
        threads: knobs_nn::threads(),
        device: knobs_nn::device::selected().to_string(),
        mixed_precision: o.mixed_precision,
        gradient_checkpointing: o.gradient_checkpointing && method.is_some(),
        weights_dtype: match weights.unet_and_vae {
            DType::BF16 => FloatDtype::BF16,
            DType::F16 => FloatDtype::F16,
            _ => FloatDtype::F32,
        },
        load_s,
        peak_rss_bytes: peak_rss_bytes(),
        trainable_params,
        model_bytes: model_bytes(&o.model),
        phases,
        times_s: times,
        resident_after,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds of each timed step, the number of trainable values, the median seconds of each
/// phase and the resident bytes after each part of the last step, by name.
type StepTimes = (Vec<f64>, usize, Vec<(String, f64)>, Vec<(String, u64)>);

/// Seconds of each timed step, the number of trainable values and the median of each phase.
fn train_steps(method: &str, sd: &mut StableDiffusion, res: u32, o: &BenchOptions) -> Result<StepTimes> {
    let mut cfg = TrainConfig { method: Method::parse(method)?, model: Some(o.model.clone()), ..Default::default() };
    cfg.tokens.placeholder_token = Some("<knobs-bench>".into());
    cfg.tokens.initializer_token = Some(one_token_word(sd)?);
    sd.vae.for_inference();
    sd.set_gradient_checkpointing(o.gradient_checkpointing);
    let mut adapters = PipelineAdapters::new(0);
    let attached = cfg.method.attach(&cfg, sd, &mut adapters)?;
    let trainable = set_trainable(&cfg, sd, &attached.trainable)?;
    let objective = Objective::new(sd, &knobs_nn::device::training());
    let mut opt = AdamW::new(AdamWConfig { lr: cfg.learning_rate(), ..Default::default() });
    let word = attached.placeholder.as_deref().unwrap_or("sks");
    let prompts = vec![format!("a photo of {word}"); o.batch];
    // A GPU queues work: a phase ends when the device has run it.
    let sync = || knobs_nn::device::inference().sync().map_err(|e| anyhow::anyhow!("--device {}: {e:?}", knobs_nn::device::selected()));
    let mut times = Vec::new();
    let mut phases: [Vec<f64>; 6] = Default::default();
    // The last step's, each read once the part's work has run on the device.
    let mut resident = Vec::new();
    let resident_at = |part: &str| crate::progress::rss_bytes().map(|b| (part.to_string(), b));
    for step in 0..o.warmup + o.steps {
        let mut rng = step_rng(0, "bench", step as u64);
        let images: Vec<RgbImage> = (0..o.batch).map(|_| RgbImage::from_fn(res, res, |_, _| image::Rgb(rng.random()))).collect();
        let started = Instant::now();
        let sizes: Vec<ImageSizes> = images.iter().map(ImageSizes::of).collect();
        let rows: Vec<usize> = (0..o.batch).collect();
        let inputs = objective.unet_inputs(sd, &images, &sizes, &prompts, &mut rng, LossOptions::default(), &rows)?;
        sync()?;
        let encoded = started.elapsed().as_secs_f64();
        resident.clear();
        resident.extend(resident_at("encode"));
        let loss = objective.loss(sd, inputs, LossOptions::default())?.mean();
        sync()?;
        let forward = started.elapsed().as_secs_f64();
        resident.extend(resident_at("forward"));
        let mut grads = collect_grads(sd, &loss.backward());
        sync()?;
        let backward = started.elapsed().as_secs_f64() - forward;
        resident.extend(resident_at("backward"));
        clip_grad_norm(&mut grads, cfg.optim.max_grad_norm);
        opt.step(sd, &grads, |_| cfg.learning_rate());
        sync()?;
        let total = started.elapsed().as_secs_f64();
        resident.extend(resident_at("optimizer"));
        let encode = Instant::now();
        drop(sd.vae.encode(knobs_world::images::to_tensor(&images, &knobs_nn::device::inference())?));
        sync()?;
        if step >= o.warmup {
            times.push(total);
            for (part, s) in phases.iter_mut().zip([encode.elapsed().as_secs_f64(), encoded, forward - encoded, forward, backward, total - forward - backward]) {
                part.push(s);
            }
        }
    }
    // `forward` is `encode` (the VAE and text encoder) then `unet_forward`.
    let names = ["vae_encode", "encode", "unet_forward", "forward", "backward", "optimizer"];
    Ok((times, trainable, names.iter().zip(phases).map(|(n, v)| (n.to_string(), median(v))).collect(), resident))
}

/// A word the tokenizer holds as one token, to start the textual-inversion rows from.
fn one_token_word(sd: &StableDiffusion) -> Result<String> {
    for word in ["photo", "a", "star", "dog"] {
        if sd.tokenizer.tokenize(word).map(|ids| ids.len() == 1).unwrap_or(false) {
            return Ok(word.to_string());
        }
    }
    bail!("{}: the tokenizer has none of the words the textual-inversion bench starts from", sd.dir.display())
}

fn generate_steps(sd: &StableDiffusion, res: u32, o: &BenchOptions) -> Result<Vec<f64>> {
    let mut req = GenerateRequest::new("a photo of a sks dog");
    req.steps = 1;
    req.guidance_scale = 7.5;
    req.scheduler = Some(SchedulerKind::Ddim);
    req.height = Some(res as usize);
    req.width = Some(res as usize);
    let mut times = Vec::new();
    for step in 0..o.warmup + o.steps {
        let started = Instant::now();
        sd.generate(&req)?;
        if step >= o.warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}
