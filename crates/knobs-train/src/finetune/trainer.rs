//! The training loop shared by every method: sample a batch (instance images, plus class
//! images for prior preservation), take the denoising loss, and step AdamW on exactly what
//! the method made trainable. Every random draw is keyed by (seed, step), and checkpoints
//! hold the trained parameters, the optimizer moments and the loss history, so a killed run
//! resumes bit-identically.
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use image::RgbImage;
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::io::{LoadOptions, atomic_write, load_state_dict};
use knobs_nn::optim::{Ema, Grads, LossScaler, clip_grad_norm, collect_grads, scale_grads};
use knobs_nn::{Device, ModuleExt};
use rand::Rng;
use rand::rngs::StdRng;
use regex::Regex;

pub use super::outputs::Summary;
use super::buckets::{self, Buckets, Size};
use super::parallel;
use super::config::{MixedPrecision, TrainConfig};
use super::methods::Attached;
use super::data::{self, Example};
use super::outputs::{Sampling, save_grid, size_of, write_samples};
use super::plot;
use crate::checkpoint::{Checkpoints, State, check_same, decode_history, encode_history, meta, sub_dict};
use crate::latent_cache::LatentCache;
use crate::objective::{ImageSizes, LossOptions, Objective, resolution};
use crate::progress::{Progress, Tick, peak_rss_bytes};
use crate::rng::step_rng;

pub(crate) struct Batch {
    pub images: Vec<RgbImage>,
    pub sizes: Vec<ImageSizes>,
    pub prompts: Vec<String>,
    /// The first `instances` entries are instance examples, the rest class examples.
    pub instances: usize,
}

/// Draws `n` examples into `batch`, each cropped to `size`; with `same_size`, only examples that
/// train at that size (its bucket). `caption_dropout` is the chance of training one under the
/// empty prompt (drawn only when positive, so that runs without it keep their random stream).
#[allow(clippy::too_many_arguments)]
fn draw(examples: &[Example], n: usize, cfg: &TrainConfig, size: Size, same_size: bool, caption_dropout: f64, rng: &mut StdRng, batch: &mut Batch) {
    let pool: Vec<&Example> = examples.iter().filter(|e| !same_size || e.size == size).collect();
    for _ in 0..n {
        let ex = pool[rng.random_range(0..pool.len())];
        let (image, sizes) = data::crop_to(ex, size, !cfg.data.random_crop, cfg.data.random_flip, rng);
        batch.images.push(image);
        batch.sizes.push(sizes);
        let dropped = caption_dropout > 0.0 && rng.random_bool(caption_dropout);
        batch.prompts.push(if dropped { String::new() } else { ex.prompt.clone() });
    }
}

fn add_grads(acc: &mut Option<Grads>, g: Grads) {
    match acc {
        None => *acc = Some(g),
        Some(acc) => {
            for (k, v) in g {
                let e = acc.get_mut(&k).expect("same trainable set every micro-step");
                *e = e.clone() + v;
            }
        }
    }
}

fn write_log(out: &Path, history: &[f64]) -> Result<()> {
    let mut csv = String::from("step,loss\n");
    for (i, l) in history.iter().enumerate() {
        csv.push_str(&format!("{},{l}\n", i + 1));
    }
    atomic_write(out.join("loss.csv"), csv.as_bytes())?;
    let png = knobs_world::dataset::encode_png(&plot::loss_curve(history))?;
    atomic_write(out.join("loss.png"), &png)?;
    Ok(())
}

pub fn validation_prompts(cfg: &TrainConfig, instances: &[Example]) -> Vec<String> {
    if cfg.run.validation_prompts.is_empty() { vec![instances[0].prompt.clone()] } else { cfg.run.validation_prompts.clone() }
}

fn resume_checkpoints(cfg: &TrainConfig, ckpts: &Checkpoints) -> Result<Option<(u64, knobs_nn::io::StateDict)>> {
    match &cfg.run.resume {
        Some(dir) => {
            let dir = if dir.join("checkpoints").is_dir() { dir.join("checkpoints") } else { dir.clone() };
            let found = Checkpoints::new(&dir, &ckpts.prefix).latest()?;
            found.map(Some).with_context(|| format!("--resume {}: no checkpoint found there", dir.display()))
        }
        // The same command run again continues (or, finished, just re-saves) its own run;
        // checkpoints of different settings are never mixed in.
        None => match ckpts.latest()? {
            Some((step, ck)) if meta(&ck, "config")? == cfg.fingerprint() => Ok(Some((step, ck))),
            Some(_) => bail!(
                "--out {} already holds checkpoints of a run with other settings; pass --resume {} to continue that run, or choose another --out",
                cfg.out.display(),
                cfg.out.display()
            ),
            None => Ok(None),
        },
    }
}

/// Refuses a checkpoint made with other settings, naming each setting that differs.
fn check_settings(ck: &knobs_nn::io::StateDict, fingerprint: &str) -> Result<()> {
    let have = meta(ck, "config")?;
    if have == fingerprint {
        return Ok(());
    }
    let settings = |s: &str| match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(mut m)) => {
            // Fingerprints of AdamW runs carry no optimizer (see TrainConfig::fingerprint).
            m.entry("optimizer").or_insert("adamw".into());
            // Nor do f32 runs a mixed precision.
            m.entry("mixed_precision").or_insert("no".into());
            m
        }
        _ => Default::default(),
    };
    let (then, now) = (settings(have), settings(fingerprint));
    let show = |v: Option<&serde_json::Value>| v.map_or("unset".to_string(), |v| v.as_str().map_or_else(|| v.to_string(), String::from));
    let differ: Vec<String> = now
        .iter()
        .filter(|(k, v)| then.get(*k) != Some(*v))
        .map(|(k, v)| format!("--{} {} (the checkpoint's run: {})", k.replace('_', "-"), show(Some(v)), show(then.get(k))))
        .collect();
    if differ.is_empty() {
        return check_same(ck, "config", fingerprint);
    }
    bail!("{}: this run's settings differ from the checkpoint's: {}; resume with the same settings or choose another --out", ck.file.display(), differ.join(", "))
}

/// [`StableDiffusion::size_unit`], which bucket sides are multiples of.
fn size_unit(sd: &StableDiffusion, res: u32) -> Result<u32> {
    let unit = sd.size_unit() as u32;
    if res < unit {
        bail!("--bucket: the resolution {res} is below this model's size unit of {unit} pixels");
    }
    Ok(unit)
}

/// Switches train-only adapter behaviour (dropout) on every layer.
fn set_adapter_training(sd: &mut StableDiffusion, training: bool) {
    sd.for_each_layer_mut(|_, mut layer| layer.set_training(training));
}

/// Makes exactly `learned`, narrowed by `--train-only` (tuning by freezing), trainable and
/// freezes everything else. What the pipeline never reads (SDXL's first text encoder's last
/// layer) stays frozen: it would get no gradient. Returns the number of trainable values.
pub fn set_trainable(cfg: &TrainConfig, sd: &mut StableDiffusion, learned: &BTreeSet<String>) -> Result<usize> {
    let only: Vec<Regex> = cfg.freeze.train_only.iter().map(|p| Regex::new(p)).collect::<Result<_, _>>()?;
    let unused = knobs_diffusion::pipeline::sdxl::unused_param_prefixes(sd);
    sd.train_only(|path| {
        learned.contains(path) && (only.is_empty() || only.iter().any(|r| r.is_match(path))) && !unused.iter().any(|u| path.starts_with(u.as_str()))
    });
    let n = sd.num_trainable_params();
    if n == 0 {
        bail!("nothing to train: --train-only {:?} matches none of the parameters that --method {} learns", cfg.freeze.train_only, cfg.method);
    }
    Ok(n)
}

/// The pipeline as the shared loop holds it, on `dev`: weight matrices and kernels in
/// --weights-dtype as they load (before adapters attach: what the method trains is widened
/// back to f32 by set_trainable), the VAE out of autodiff, the UNet (and under bf16 the VAE)
/// computing in --mixed-precision's dtype, its blocks checkpointed under
/// --gradient-checkpointing.
pub(crate) fn load_for_training(cfg: &TrainConfig, model: &Path, dev: &Device) -> Result<StableDiffusion> {
    let mut sd = StableDiffusion::load_as(model, dev, cfg.memory.weights_dtype.dtype()).with_context(|| format!("--model {}", model.display()))?;
    sd.vae.for_inference();
    cfg.optim.mixed_precision.apply(&mut sd);
    sd.set_gradient_checkpointing(cfg.memory.gradient_checkpointing);
    Ok(sd)
}

/// The method's adapters attached to `sd` and its trainable set made (with how many values
/// train); adapter dropout on, as for every method while training.
pub(crate) fn attach_for_training(cfg: &TrainConfig, sd: &mut StableDiffusion, adapters: &mut PipelineAdapters) -> Result<(Attached, usize)> {
    let attached = cfg.method.attach(cfg, sd, adapters)?;
    let trainable = set_trainable(cfg, sd, &attached.trainable)?;
    set_adapter_training(sd, true);
    Ok((attached, trainable))
}

/// The denoising objective on `dev`, caching latents under --cache-latents (in memory) or
/// --latent-cache (on disk too).
pub(crate) fn objective_for(cfg: &TrainConfig, sd: &StableDiffusion, dev: &Device) -> Result<Objective> {
    let objective = Objective::new(sd, dev);
    Ok(match &cfg.memory.latent_cache {
        Some(dir) => objective.with_latent_cache(LatentCache::on_disk(dir, &sd.vae)?),
        None if cfg.memory.cache_latents => objective.cache_latents(),
        None => objective,
    })
}

/// Runs `cfg`: the method's own loop if it has one, else the shared one.
pub fn run(cfg: &TrainConfig, progress: Progress) -> Result<Summary> {
    cfg.validate()?;
    if cfg.method.own_loop() {
        return cfg.method.run(cfg, progress);
    }
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("--out {}: cannot create", cfg.out.display()))?;
    let model = cfg.model()?;
    let dev = knobs_nn::device::training();
    let mut sd = load_for_training(cfg, &model, &dev)?;
    let res = cfg.data.resolution.map_or_else(|| resolution(&sd), |r| r as u32);
    let buckets = if cfg.data.bucket { Some(Buckets::new(res, size_unit(&sd, res)?)) } else { None };
    let instances = match &buckets {
        Some(b) => data::instance_examples_bucketed(cfg, res, b)?,
        None => data::instance_examples(cfg, res)?,
    };
    let classes = if cfg.with_prior_preservation() { data::class_examples(cfg, &model, res)? } else { Vec::new() };
    let mut adapters = PipelineAdapters::new(cfg.optim.seed);
    let (attached, trainable_params) = attach_for_training(cfg, &mut sd, &mut adapters)?;
    let objective = objective_for(cfg, &sd, &dev)?;
    let prompts = validation_prompts(cfg, &instances);
    let sampling = Sampling { per_prompt: cfg.run.num_samples, steps: cfg.run.sample_steps, guidance: cfg.run.guidance_scale };
    let validation = Sampling { per_prompt: if cfg.run.validation_steps > 0 { 4 } else { 0 }, ..sampling };
    let encoded = super::text_encoders::encode_and_release(cfg, &mut sd, &objective, &[&instances, &classes], &prompts, validation, sampling)?;
    // After the release: the estimate counts what stays loaded.
    let memory = crate::memory::estimate(cfg, &sd, res);
    crate::memory::check(cfg, &memory)?;
    let devices = parallel::targets(cfg)?;
    let mut replicas = parallel::replicas(cfg, &model, &devices)?;
    let loss_options = LossOptions { noise_offset: cfg.optim.noise_offset, snr_gamma: cfg.optim.snr_gamma };
    let lr_scales = cfg.lr_scales()?;
    let o = &cfg.optim;
    let mut opt = o.optimizer.build(o, cfg.learning_rate());
    let ckpts = Checkpoints::new(cfg.out.join("checkpoints"), "train");
    let fingerprint = cfg.fingerprint();
    let mut history: Vec<f64> = Vec::new();
    let mut first = 0;
    // The average starts from the parameters as attached; a resumed run loads its own.
    let mut ema = o.ema_decay.map(|d| Ema::new(&sd, d));
    let mut scaler = (o.mixed_precision == MixedPrecision::Fp16).then(LossScaler::default);
    if let Some((step, ck)) = resume_checkpoints(cfg, &ckpts)? {
        check_settings(&ck, &fingerprint)?;
        load_state_dict(&mut sd, &sub_dict(&ck, "model."), LoadOptions { allow_missing: true, ..Default::default() })?;
        opt.load_state(&sub_dict(&ck, "optim."), &dev)?;
        if let Some(e) = &mut ema {
            e.load_state(&ck, &dev)?;
        }
        history = decode_history(meta(&ck, "loss_history")?)?;
        parallel::broadcast(&sd, &mut replicas)?;
        if let Some(s) = &mut scaler {
            let text = meta(&ck, "loss_scale")?;
            *s = LossScaler::decode(text).with_context(|| format!("{}: unreadable loss_scale `{text}`", ck.file.display()))?;
        }
        first = step;
    }
    let total = cfg.max_train_steps();
    let accum = o.gradient_accumulation_steps;
    // Per device: the step's batch is split over --devices.
    let batch_size = o.train_batch_size * devices.len();
    let looping = Instant::now();
    for step in first..total {
        let mut grads = None;
        let mut value = 0.0;
        for micro in 0..accum {
            let mut rng = step_rng(o.seed, "train", step * accum + micro);
            // Adapter dropout's masks: seeded from their own stream per micro-step, so a run (and
            // a resumed one) draws the same masks. With --devices each device's thread seeds its own.
            let dropout_seed: u64 = step_rng(o.seed, "dropout", step * accum + micro).random();
            knobs_nn::dropout::seed_thread(dropout_seed);
            let mut batch = Batch { images: Vec::new(), sizes: Vec::new(), prompts: Vec::new(), instances: batch_size };
            // With buckets, a batch is one bucket's, picked by drawing an image (so buckets come
            // up as often as they hold images); class images are fitted to it.
            let size = match &buckets {
                Some(_) => instances[rng.random_range(0..instances.len())].size,
                None => (res, res),
            };
            draw(&instances, batch_size, cfg, size, buckets.is_some(), cfg.data.caption_dropout, &mut rng, &mut batch);
            if !classes.is_empty() {
                draw(&classes, batch_size, cfg, size, false, 0.0, &mut rng, &mut batch);
            }
            if !replicas.is_empty() {
                let (v, g) = parallel::step((&sd, &objective), &replicas, &batch, (&rng, dropout_seed), loss_options, cfg.data.prior_loss_weight, accum as usize)?;
                value += v;
                add_grads(&mut grads, g);
                continue;
            }
            let per = objective.per_sample_sized(&sd, &batch.images, &batch.sizes, &batch.prompts, &mut rng, loss_options)?;
            let (n, b) = (batch.instances, batch.images.len());
            let instance = per.clone().slice(0..n).mean();
            let loss = if n < b { instance + per.slice(n..b).mean() * cfg.data.prior_loss_weight } else { instance } / accum as f64;
            value += loss.clone().into_scalar::<f32>() as f64;
            let loss = match &scaler {
                Some(s) => loss * s.scale(),
                None => loss,
            };
            add_grads(&mut grads, collect_grads(&sd, &loss.backward()));
        }
        if !value.is_finite() {
            bail!("loss became {value} at step {step}; stopped. The last good checkpoint is in {}", ckpts.dir.display());
        }
        let mut grads = grads.expect("at least one micro-step");
        // fp16: a step whose scaled gradients overflowed is skipped (the scale is halved).
        let finite = scaler.as_mut().is_none_or(|s| s.unscale_and_update(&mut grads));
        if finite {
            clip_grad_norm(&mut grads, o.max_grad_norm);
            if let Some(g) = cfg.freeze.grad_scale {
                scale_grads(&mut grads, g, |_| true);
            }
            let lr = cfg.learning_rate() * o.lr_scheduler.factor(step, o.lr_warmup_steps, total);
            opt.step(&mut sd, &grads, &|path| lr * lr_scales.iter().find(|(r, _)| r.is_match(path)).map_or(1.0, |(_, f)| *f));
            if let Some(e) = &mut ema {
                e.update(&sd);
            }
            parallel::broadcast(&sd, &mut replicas)?;
        }
        // Before any checkpoint is written: a full fine-tune's gradients are a model's size.
        drop(grads);
        history.push(value);
        let seconds_per_step = looping.elapsed().as_secs_f64() / (step + 1 - first) as f64;
        progress(&Tick { phase: "train", step: step + 1, total, loss: value, seconds_per_step: Some(seconds_per_step) });
        let done = step + 1 == total;
        if done || (cfg.run.checkpointing_steps > 0 && (step + 1) % cfg.run.checkpointing_steps == 0) {
            let mut state = State::default();
            state.trainable(&sd);
            state.optimizer(opt.as_ref());
            if let Some(e) = &ema {
                state.ema(e);
            }
            state.meta.insert("config".into(), fingerprint.clone());
            state.meta.insert("loss_history".into(), encode_history(&history));
            if let Some(s) = &scaler {
                state.meta.insert("loss_scale".into(), s.encode());
            }
            ckpts.save(step + 1, state)?;
            // The final log is written once, after the loop.
            if !done {
                write_log(&cfg.out, &history)?;
            }
        }
        if cfg.run.validation_steps > 0 && (step + 1) % cfg.run.validation_steps == 0 && !done {
            // Validation samples as inference draws them: adapter dropout off, then back on.
            set_adapter_training(&mut sd, false);
            let images = super::outputs::sample(&sd, &prompts, validation, &encoded.validation);
            set_adapter_training(&mut sd, true);
            save_grid(&cfg.out.join("validation").join(format!("step-{:06}.png", step + 1)), &images?, 4)?;
        }
    }
    // After the loop, not with the last checkpoint: a run killed between the two and resumed
    // with nothing left to train still ends with the whole history.
    write_log(&cfg.out, &history)?;
    let train_seconds = started.elapsed().as_secs_f64();
    let steps_run = total - first;
    // From here on the pipeline is exactly what `knobs generate` builds from the saved files:
    // adapter dropout off, every parameter out of autodiff.
    set_adapter_training(&mut sd, false);
    // The trained values, taken while they are still marked trainable, to restore after the
    // EMA files are written.
    let trained = ema.as_ref().map(|_| Ema::new(&sd, 0.0));
    sd.for_inference();
    sd.device = dev.clone().inner();
    // Samples and files as `knobs generate` makes them: in f32.
    MixedPrecision::No.apply(&mut sd);
    write_samples(&cfg.out, &sd, &prompts, sampling, &encoded.samples)?;
    let mut outputs = cfg.method.save(cfg, &mut sd, &mut adapters, &attached)?;
    if let (Some(e), Some(trained)) = (&ema, &trained) {
        // The same files from the averaged parameters, then the trained ones back.
        e.copy_to(&mut sd);
        let ema_cfg = TrainConfig { out: cfg.out.join("ema"), ..cfg.clone() };
        std::fs::create_dir_all(&ema_cfg.out).with_context(|| format!("--out {}: cannot create ema/", cfg.out.display()))?;
        outputs.extend(cfg.method.save(&ema_cfg, &mut sd, &mut adapters, &attached)?);
        trained.copy_to(&mut sd);
    }
    let mut extra = std::collections::BTreeMap::new();
    extra.insert("estimated_peak_bytes".to_string(), serde_json::json!(memory.total()));
    extra.insert("text_encoders_released".to_string(), serde_json::json!(sd.text_encoder.is_released()));
    extra.insert("blocks_recomputed".to_string(), serde_json::json!(knobs_nn::checkpoint::blocks_recomputed()));
    // The first device's: with --devices each replica caches the rows it computes.
    if let Some((read, encoded)) = objective.latent_counts() {
        extra.insert("latents_read".to_string(), serde_json::json!(read));
        extra.insert("latents_encoded".to_string(), serde_json::json!(encoded));
    }
    if buckets.is_some() {
        extra.insert("buckets".to_string(), serde_json::json!(buckets::counts(instances.iter().map(|e| e.size))));
    }
    let summary = Summary {
        method: cfg.method.to_string(),
        steps: total,
        seconds: train_seconds,
        seconds_per_step: (steps_run > 0).then(|| train_seconds / steps_run as f64),
        trainable_params,
        output_bytes: size_of(&outputs),
        outputs,
        peak_rss_bytes: peak_rss_bytes(),
        final_loss: history.last().copied(),
        extra,
    };
    summary.write(&cfg.out)?;
    Ok(summary)
}
