//! Phase 2: text encoder and UNet, trained together from scratch on cached VAE latents of the
//! world. Epsilon prediction on SD's noise schedule, min-SNR weighting, caption dropout for
//! classifier-free guidance, EMA weights for sampling.
use std::ops::ControlFlow;

use anyhow::{Result, anyhow, bail};
use knobs_diffusion::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use knobs_diffusion::schedulers::{DdpmScheduler, SchedulerConfig};
use knobs_diffusion::unet::{UNet2DConditionModel, UNetConfig};
use knobs_diffusion::vae::{AutoencoderKL, VaeConfig};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::optim::{AdamW, AdamWConfig, Ema};
use knobs_nn::{Device, Init, ModuleExt, Tensor, impl_module};
use knobs_world::{Scene, caption, render};
use rand::Rng;
use serde_json::Value;

use super::{Deadline, PretrainConfig, Progress, Tick, folder, recipe};
use crate::checkpoint::{Checkpoints, State, check_same, restore};
use knobs_world::images::to_tensor;
use crate::loss::{min_snr_weights, per_sample_mse};
use crate::lr::LrSchedule;
use crate::rng::{normal, normal_vec, step_rng};

/// The two trained components under their folder names.
pub struct Base {
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
}
impl_module!(Base { "text_encoder" => text_encoder, "unet" => unet });

/// Scenes with the mean and standard deviation of their VAE posteriors, encoded once.
pub struct LatentCache {
    pub scenes: Vec<Scene>,
    mean: Vec<f32>,
    std: Vec<f32>,
    per: usize,
    /// Latent side length.
    side: usize,
}

impl LatentCache {
    pub fn build(vae: &AutoencoderKL, seed: u64, n: usize) -> Result<Self> {
        let dev = knobs_nn::device::inference();
        let scenes: Vec<Scene> = (0..n as u64).map(|i| knobs_world::sample(seed, i).0).collect();
        let (mut mean, mut std) = (Vec::new(), Vec::new());
        for chunk in scenes.chunks(128) {
            let images: Vec<_> = chunk.iter().map(|s| render(s, recipe::IMAGE_SIZE as u32)).collect();
            let posterior = vae.encode(to_tensor(&images, &dev)?);
            mean.extend(to_vec(posterior.mean.clone())?);
            std.extend(to_vec(posterior.std())?);
        }
        let per = mean.len() / n;
        Ok(LatentCache { scenes, mean, std, per, side: latent_side(&vae.config) })
    }

    /// Latent samples of the scenes `idx` (reparameterised with `eps`), already scaled.
    fn batch(&self, idx: &[usize], eps: &[f32], scale: f32, device: &Device) -> Tensor<4> {
        let s = self.side;
        let mut v = Vec::with_capacity(idx.len() * self.per);
        for (k, &i) in idx.iter().enumerate() {
            let r = i * self.per..(i + 1) * self.per;
            let e = &eps[k * self.per..(k + 1) * self.per];
            v.extend(self.mean[r.clone()].iter().zip(&self.std[r]).zip(e).map(|((m, sd), z)| (m + sd * z) * scale));
        }
        Tensor::from_data(TensorData::new(v, [idx.len(), self.per / (s * s), s, s]), device)
    }
}

fn latent_side(vae: &VaeConfig) -> usize {
    recipe::IMAGE_SIZE / vae.downscale_factor()
}

/// A finished VAE from an earlier recipe is kept by design (phases resume), so one whose latents
/// the recipe's UNet cannot take must be an error naming the folder, not a panic in the first step.
fn check_vae_fits(vae: &VaeConfig, unet: &UNetConfig, model_dir: &std::path::Path) -> Result<()> {
    let side = latent_side(vae);
    let (channels, unet_side) = (unet.in_channels, unet.sample_size.unwrap_or(side));
    if vae.latent_channels != channels || side != unet_side {
        bail!(
            "{}: this VAE makes {side}x{side}x{} latents, but the recipe's UNet takes {unet_side}x{unet_side}x{channels} \
             (a VAE from another recipe?); delete that folder to train a new one",
            model_dir.join("vae").display(),
            vae.latent_channels
        );
    }
    Ok(())
}

fn to_vec(t: Tensor<4>) -> Result<Vec<f32>> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow!("{e:?}"))
}

pub fn new_base(config: &PretrainConfig, tokenizer: &ClipTokenizer, device: &Device) -> Result<(Base, Value)> {
    let te_json = recipe::text_encoder_config(tokenizer.vocab_size(), tokenizer.bos_id(), tokenizer.eos_id());
    let mut init = Init::new(config.seed ^ 0xba5e);
    let text_encoder = ClipTextModel::new(ClipTextConfig::from_json(&te_json.to_string())?, &mut init, device)?;
    let unet = UNet2DConditionModel::new(serde_json::from_value::<UNetConfig>(recipe::unet_config())?, &mut init, device)?;
    Ok((Base { text_encoder, unet }, te_json))
}

/// Trains (or resumes) the base phase and writes the finished folder.
pub fn train(config: &PretrainConfig, vae: &AutoencoderKL, deadline: &Deadline, progress: Progress) -> Result<ControlFlow<u64>> {
    let model_dir = config.model_dir();
    if folder::is_complete(&model_dir.join("unet")) && folder::is_complete(&model_dir.join("text_encoder")) {
        return Ok(ControlFlow::Continue(()));
    }
    let phase = config.base;
    let dev = knobs_nn::device::training();
    let tokenizer = ClipTokenizer::from_dir(model_dir.join("tokenizer"))?;
    let (mut base, te_json) = new_base(config, &tokenizer, &dev)?;
    check_vae_fits(&vae.config, &base.unet.config, &model_dir)?;
    base.train_only(|_| true);
    let mut ema = Ema::new(&base, config.ema_decay);
    let mut opt = AdamW::new(AdamWConfig { lr: phase.lr, ..Default::default() });
    let ckpts = Checkpoints::new(config.checkpoint_dir(), "base");
    let fingerprint = serde_json::to_string(&(config.seed, phase, config.snr_gamma, config.caption_dropout, config.latent_cache))?;
    let mut start = 0;
    if let Some((step, sd)) = ckpts.latest()? {
        check_same(&sd, "phase", &fingerprint)?;
        restore(&sd, &mut base, &mut opt, Some(&mut ema), &dev)?;
        start = step;
    }
    let sched_config = SchedulerConfig::from_json_str(&recipe::scheduler_config().to_string())?;
    let prediction = sched_config.prediction_type;
    let ddpm = DdpmScheduler::new(sched_config);
    let cache = LatentCache::build(vae, config.seed, config.latent_cache)?;
    let scale = vae.scaling_factor() as f32;
    let b = phase.batch;
    for step in start..phase.steps {
        let mut rng = step_rng(config.seed, "base", step);
        let idx: Vec<usize> = (0..b).map(|_| rng.random_range(0..cache.scenes.len())).collect();
        let captions: Vec<String> = idx
            .iter()
            .map(|&i| if rng.random_bool(config.caption_dropout) { String::new() } else { caption(&cache.scenes[i], &mut rng) })
            .collect();
        let eps = normal_vec(&mut rng, b * cache.per);
        let latents = cache.batch(&idx, &eps, scale, &dev);
        let t: Vec<i64> = (0..b).map(|_| rng.random_range(0..ddpm.num_train_timesteps() as i64)).collect();
        let noise = normal(&mut rng, latents.dims(), &dev);
        let noisy = ddpm.add_noise(latents.clone(), noise.clone(), &t)?;
        let target = ddpm.training_target(latents, noise, &t)?;
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let context = base.text_encoder.forward(tokenizer.encode_tensor(&refs, &dev)?).last_hidden_state;
        let t_float = Tensor::<1>::from_floats(t.iter().map(|&x| x as f32).collect::<Vec<_>>().as_slice(), &dev);
        let pred = base.unet.forward(noisy, t_float, context);
        let per_sample = per_sample_mse(pred, target);
        let weights = min_snr_weights(&ddpm.snr(&t)?, config.snr_gamma, prediction);
        let loss = (per_sample * Tensor::<1>::from_floats(weights.as_slice(), &dev)).mean();
        let value = loss.clone().into_scalar::<f32>() as f64;
        ckpts.check_loss("base-model", value, step)?;
        let lr = phase.lr * LrSchedule::Cosine.factor(step, phase.warmup, phase.steps);
        opt.minimise(&mut base, loss, 1.0, lr);
        ema.update(&base);
        progress(&Tick { phase: "base", step: step + 1, total: phase.steps, loss: value, seconds_per_step: None });
        let pausing = deadline.pauses_at(step + 1, phase.steps);
        ckpts.save_if_due(step + 1, phase.steps, config.checkpoint_every, pausing, || {
            let mut state = State::of(&base, &opt, "phase", &fingerprint);
            state.ema(&ema);
            state
        })?;
        if pausing {
            write_preview(config, &tokenizer, &ema)?;
            return Ok(ControlFlow::Break(step + 1));
        }
    }
    ema.copy_to(&mut base);
    base.for_inference();
    write_components(&model_dir, &base, &te_json)?;
    Ok(ControlFlow::Continue(()))
}

fn write_components(dir: &std::path::Path, base: &Base, te_json: &Value) -> Result<()> {
    folder::write_text_encoder(&dir.join("text_encoder"), te_json, &base.text_encoder)?;
    folder::write_unet(&dir.join("unet"), &base.unet)?;
    folder::write_pipeline_files(dir)
}

/// A paused run leaves `<out>/preview`: a complete pipeline with the EMA weights so far, so
/// that a long run can be judged (`knobs eval --model <out>/preview`) before it finishes.
fn write_preview(config: &PretrainConfig, tokenizer: &ClipTokenizer, ema: &Ema) -> Result<()> {
    let dir = config.out.join("preview");
    let model_dir = config.model_dir();
    for part in ["tokenizer", "vae"] {
        std::fs::create_dir_all(dir.join(part))?;
        for entry in std::fs::read_dir(model_dir.join(part))? {
            let entry = entry?;
            std::fs::copy(entry.path(), dir.join(part).join(entry.file_name()))?;
        }
    }
    let (mut snapshot, te_json) = new_base(config, tokenizer, &knobs_nn::device::inference())?;
    ema.copy_to(&mut snapshot);
    write_components(&dir, &snapshot, &te_json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> (VaeConfig, UNetConfig) {
        let vae = VaeConfig::from_json_str(&recipe::vae_config().to_string()).unwrap();
        let unet = serde_json::from_value::<UNetConfig>(recipe::unet_config()).unwrap();
        (vae, unet)
    }

    #[test]
    fn the_recipe_vae_fits_the_recipe_unet() {
        let (vae, unet) = configs();
        check_vae_fits(&vae, &unet, std::path::Path::new("out/model")).unwrap();
    }

    #[test]
    fn a_vae_from_another_recipe_is_an_error_naming_its_folder() {
        let (mut vae, unet) = configs();
        vae.latent_channels = 8;
        let e = check_vae_fits(&vae, &unet, std::path::Path::new("out/model")).unwrap_err().to_string();
        assert!(e.contains("out/model/vae") && e.contains("16x16x8") && e.contains("16x16x4"), "{e}");
        let (mut vae, unet) = configs();
        vae.block_out_channels.push(64);
        let e = check_vae_fits(&vae, &unet, std::path::Path::new("out/model")).unwrap_err().to_string();
        assert!(e.contains("8x8x4") && e.contains("16x16x4"), "{e}");
    }
}
