//! The training loop shared by every method: sample a batch (instance images, plus class
//! images for prior preservation), encode with the frozen VAE, noise at random timesteps,
//! predict with the UNet conditioned on the prompt, and step AdamW on whatever the method
//! made trainable. Every random draw is keyed by (seed, step), and checkpoints hold the
//! trained parameters, the optimizer moments and the loss history, so a killed run resumes
//! bit-identically.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use image::RgbImage;
use knobs_diffusion::clip::embeddings::expand_prompt;
use knobs_diffusion::pipeline::{GenerateRequest, StableDiffusion};
use knobs_diffusion::schedulers::{DdpmScheduler, PredictionType};
use knobs_nn::io::{LoadOptions, atomic_write, load_state_dict};
use knobs_nn::optim::{AdamW, AdamWConfig, Grads, clip_grad_norm, collect_grads, scale_grads};
use knobs_nn::{Device, ModuleExt, Tensor, cpu, cpu_autodiff};
use knobs_world::images::{from_tensor, grid, to_tensor};
use rand::Rng;
use rand::rngs::StdRng;
use serde::Serialize;

use super::config::TrainConfig;
use super::data::{self, Example};
use super::{plot, save, setup};
use crate::checkpoint::{Checkpoints, State, check_same, decode_history, encode_history, meta, sub_dict};
use crate::loss::{min_snr_weights, per_sample_mse};
use crate::progress::{Progress, Tick, peak_rss_bytes};
use crate::rng::{normal, step_rng};

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub method: String,
    pub steps: u64,
    pub seconds: f64,
    pub seconds_per_step: f64,
    pub trainable_params: usize,
    pub outputs: Vec<PathBuf>,
    pub output_bytes: u64,
    pub peak_rss_bytes: Option<u64>,
    pub final_loss: f64,
}

struct Batch {
    images: Vec<RgbImage>,
    prompts: Vec<String>,
    /// The first `instances` entries are instance examples, the rest class examples.
    instances: usize,
}

fn draw(examples: &[Example], n: usize, cfg: &TrainConfig, res: u32, rng: &mut StdRng, batch: &mut Batch) {
    for _ in 0..n {
        let ex = &examples[rng.random_range(0..examples.len())];
        batch.images.push(data::crop(ex, res, cfg.center_crop, cfg.random_flip, rng));
        batch.prompts.push(ex.prompt.clone());
    }
}

/// Everything the loss needs that does not change between steps.
struct Objective {
    ddpm: DdpmScheduler,
    prediction: PredictionType,
    latent_scale: f32,
    device: Device,
}

impl Objective {
    fn loss(&self, cfg: &TrainConfig, sd: &StableDiffusion, batch: &Batch, rng: &mut StdRng) -> Result<Tensor<1>> {
        let b = batch.images.len();
        let dev = &self.device;
        // The VAE is frozen and runs outside autodiff; its latents enter the graph as data.
        let posterior = sd.vae.encode(to_tensor(&batch.images, &cpu())?);
        let latents = posterior.sample(normal(rng, posterior.mean.dims(), &cpu())) * self.latent_scale;
        let latents = Tensor::<4>::from_data(latents.into_data(), dev);
        let dims = latents.dims();
        let mut noise = normal(rng, dims, dev);
        if cfg.noise_offset > 0.0 {
            noise = noise + normal(rng, [dims[0], dims[1], 1, 1], dev).mul_scalar(cfg.noise_offset).expand(dims);
        }
        let t: Vec<i64> = (0..b).map(|_| rng.random_range(0..self.ddpm.num_train_timesteps() as i64)).collect();
        let noisy = self.ddpm.add_noise(latents.clone(), noise.clone(), &t)?;
        let target = self.ddpm.training_target(latents, noise, &t)?;
        let prompts = batch.prompts.iter().map(|p| expand_prompt(p, &sd.tokenizer)).collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let context = sd.text_encoder.forward(sd.tokenizer.encode_tensor(&refs, dev)?).last_hidden_state;
        let t_float = Tensor::<1>::from_floats(t.iter().map(|&x| x as f32).collect::<Vec<_>>().as_slice(), dev);
        let mut per = per_sample_mse(sd.unet.forward(noisy, t_float, context), target);
        if let Some(gamma) = cfg.snr_gamma {
            per = per * Tensor::<1>::from_floats(min_snr_weights(&self.ddpm.snr(&t)?, gamma, self.prediction).as_slice(), dev);
        }
        let n = batch.instances;
        let instance = per.clone().slice([0..n]).mean();
        Ok(if n < b { instance + per.slice([n..b]).mean() * cfg.prior_loss_weight } else { instance })
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
    if cfg.validation_prompts.is_empty() { vec![instances[0].prompt.clone()] } else { cfg.validation_prompts.clone() }
}

/// Images of each validation prompt with the seeds `knobs generate --seed 0 --num-images 4`
/// uses, so that a saved adapter loaded there reproduces them.
fn set_training(sd: &mut StableDiffusion, training: bool) {
    sd.for_each_layer_mut(|_, mut layer| layer.set_training(training));
}

pub fn sample(cfg: &TrainConfig, sd: &StableDiffusion, prompts: &[String]) -> Result<Vec<RgbImage>> {
    let mut out = Vec::new();
    for p in prompts {
        let mut req = GenerateRequest::new(p.clone());
        req.steps = cfg.validation_inference_steps;
        req.guidance_scale = cfg.guidance_scale;
        req.num_images = 4;
        req.seed = 0;
        out.extend(from_tensor(sd.generate(&req)?.mul_scalar(2.0).sub_scalar(1.0))?);
    }
    Ok(out)
}

fn save_grid(path: &Path, images: &[RgbImage]) -> Result<()> {
    Ok(atomic_write(path, &knobs_world::dataset::encode_png(&grid(images, 4))?)?)
}

fn resume_checkpoints(cfg: &TrainConfig, ckpts: &Checkpoints) -> Result<Option<(u64, knobs_nn::io::StateDict)>> {
    match &cfg.resume {
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

pub fn run(cfg: &TrainConfig, progress: Progress) -> Result<Summary> {
    cfg.validate()?;
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("--out {}: cannot create", cfg.out.display()))?;
    let dev = cpu_autodiff();
    let mut sd = StableDiffusion::from_dir(&cfg.model, &dev).with_context(|| format!("--model {}", cfg.model.display()))?;
    sd.vae.for_inference();
    let res = cfg.resolution.unwrap_or(sd.unet.config.sample_size.unwrap_or(64) * sd.vae_scale_factor()) as u32;
    let instances = data::instance_examples(cfg, res)?;
    let classes = if cfg.with_prior_preservation() { data::class_examples(cfg, res)? } else { Vec::new() };
    let prepared = setup::prepare(cfg, &mut sd)?;
    let trainable_params = sd.num_trainable_params();
    let objective = Objective {
        ddpm: DdpmScheduler::new(sd.scheduler_config.clone()),
        prediction: sd.scheduler_config.prediction_type,
        latent_scale: sd.vae.scaling_factor() as f32,
        device: dev.clone(),
    };
    let lr_scales = cfg.lr_scales()?;
    let mut opt = AdamW::new(AdamWConfig {
        lr: cfg.learning_rate(),
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.adam_weight_decay,
    });
    let ckpts = Checkpoints::new(cfg.out.join("checkpoints"), "train");
    let fingerprint = cfg.fingerprint();
    let mut history: Vec<f64> = Vec::new();
    let mut first = 0;
    if let Some((step, ck)) = resume_checkpoints(cfg, &ckpts)? {
        check_same(&ck, "config", &fingerprint)?;
        load_state_dict(&mut sd, &sub_dict(&ck, "model."), LoadOptions { allow_missing: true, allow_unexpected: false })?;
        opt.load_state(&sub_dict(&ck, "optim."), &dev)?;
        history = decode_history(meta(&ck, "loss_history")?)?;
        first = step;
    }
    let prompts = validation_prompts(cfg, &instances);
    let total = cfg.max_train_steps();
    let accum = cfg.gradient_accumulation_steps;
    let validation_dir = cfg.out.join("validation");
    for step in first..total {
        let mut grads = None;
        let mut value = 0.0;
        for micro in 0..accum {
            let mut rng = step_rng(cfg.seed, "train", step * accum + micro);
            let mut batch = Batch { images: Vec::new(), prompts: Vec::new(), instances: cfg.train_batch_size };
            draw(&instances, cfg.train_batch_size, cfg, res, &mut rng, &mut batch);
            if !classes.is_empty() {
                draw(&classes, cfg.train_batch_size, cfg, res, &mut rng, &mut batch);
            }
            let loss = objective.loss(cfg, &sd, &batch, &mut rng)? / accum as f64;
            value += loss.clone().into_scalar::<f32>() as f64;
            add_grads(&mut grads, collect_grads(&sd, &loss.backward()));
        }
        if !value.is_finite() {
            bail!("loss became {value} at step {step}; stopped. The last good checkpoint is in {}", ckpts.dir.display());
        }
        let mut grads = grads.expect("at least one micro-step");
        clip_grad_norm(&mut grads, cfg.max_grad_norm);
        if let Some(g) = cfg.grad_scale {
            scale_grads(&mut grads, g, |_| true);
        }
        let lr = cfg.learning_rate() * cfg.lr_scheduler.factor(step, cfg.lr_warmup_steps, total);
        opt.step(&mut sd, &grads, |path| lr * lr_scales.iter().find(|(r, _)| r.is_match(path)).map_or(1.0, |(_, f)| *f));
        history.push(value);
        progress(&Tick { phase: "train", step: step + 1, total, loss: value });
        let done = step + 1 == total;
        if done || (cfg.checkpointing_steps > 0 && (step + 1) % cfg.checkpointing_steps == 0) {
            let mut state = State::default();
            state.trainable(&sd);
            state.optimizer(&opt);
            state.meta.insert("config".into(), fingerprint.clone());
            state.meta.insert("loss_history".into(), encode_history(&history));
            ckpts.save(step + 1, state)?;
            write_log(&cfg.out, &history)?;
        }
        if cfg.validation_steps > 0 && (step + 1) % cfg.validation_steps == 0 && !done {
            // Validation samples as inference draws them: adapter dropout off, then back on.
            set_training(&mut sd, false);
            let grid = sample(cfg, &sd, &prompts);
            set_training(&mut sd, true);
            save_grid(&validation_dir.join(format!("step-{:06}.png", step + 1)), &grid?)?;
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    // From here on the pipeline is exactly what `knobs generate` builds from the saved files.
    sd.for_inference();
    sd.device = cpu();
    let samples = sample(cfg, &sd, &prompts)?;
    save_grid(&cfg.out.join("samples.png"), &samples)?;
    for (i, img) in samples.iter().take(4).enumerate() {
        atomic_write(cfg.out.join("samples").join(format!("{i}.png")), &knobs_world::dataset::encode_png(img)?)?;
    }
    let outputs = save::save_outputs(cfg, &mut sd, &prepared)?;
    let steps_run = total - first;
    let summary = Summary {
        method: cfg.method.name().to_string(),
        steps: total,
        seconds: train_seconds,
        seconds_per_step: train_seconds / steps_run.max(1) as f64,
        trainable_params,
        output_bytes: save::size_of(&outputs),
        outputs,
        peak_rss_bytes: peak_rss_bytes(),
        final_loss: history.last().copied().unwrap_or(f64::NAN),
    };
    atomic_write(cfg.out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(summary)
}
