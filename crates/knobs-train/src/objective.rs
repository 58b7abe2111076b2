//! The denoising objective every training loop shares: VAE latents of the images (outside
//! autodiff), noise and timesteps drawn from the step's random stream, the UNet's prediction
//! against the scheduler's target (noise or velocity), per sample.
//!
//! Work that gives the same result every step is done once: the prompt embeddings while the
//! text encoder is frozen (always), and, with [`Objective::cache_latents`], each distinct
//! image's posterior (an image and its flip are two entries; noise is still drawn per step).
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Result;
use image::RgbImage;
use knobs_diffusion::clip::embeddings::expand_prompt;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_diffusion::schedulers::{DdpmScheduler, PredictionType};
use knobs_diffusion::unet::UNetConfig;
use knobs_diffusion::vae::{DiagonalGaussian, VaeConfig};
use knobs_nn::hash::fnv1a_seeded;
use knobs_nn::{Device, ModuleExt, Tensor, cpu};
use knobs_world::images::to_tensor;
use rand::Rng;
use rand::rngs::StdRng;

use crate::loss::{min_snr_weights, per_sample_mse};
use crate::rng::normal;

/// The training resolution a model was made for: its UNet's sample size (64 when unset, as
/// diffusers) times the VAE's downscale factor.
fn pixels(unet: &UNetConfig, vae: &VaeConfig) -> u32 {
    (unet.sample_size.unwrap_or(64) * vae.downscale_factor()) as u32
}

/// [`pixels`] of a loaded pipeline.
pub fn resolution(sd: &StableDiffusion) -> u32 {
    pixels(&sd.unet.config, &sd.vae.config)
}

/// [`pixels`] of a pipeline folder, from its configs alone.
pub fn resolution_of(model: &Path) -> Result<u32> {
    let unet = UNetConfig::from_file(model.join("unet").join("config.json"))?;
    let vae = VaeConfig::from_file(model.join("vae").join("config.json"))?;
    Ok(pixels(&unet, &vae))
}

/// Settings of the loss beyond the model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossOptions {
    /// Adds per-channel constant noise of this scale (the "noise offset" trick).
    pub noise_offset: f64,
    /// Min-SNR weighting with this gamma.
    pub snr_gamma: Option<f64>,
}

/// What the loss needs that does not change between steps.
pub struct Objective {
    pub ddpm: DdpmScheduler,
    prediction: PredictionType,
    latent_scale: f32,
    device: Device,
    /// Posteriors by image content, when latents are cached.
    latents: Option<Mutex<HashMap<u64, DiagonalGaussian>>>,
    /// Prompt embeddings `[1, 77, D]` by expanded prompt, used while the text encoder is frozen.
    contexts: Mutex<HashMap<String, Tensor<3>>>,
}

/// A key for an image's content (pixels and size).
fn image_key(image: &RgbImage) -> u64 {
    let size = [image.width().to_le_bytes(), image.height().to_le_bytes()].concat();
    fnv1a_seeded(image.as_raw(), knobs_nn::hash::fnv1a(&size))
}

impl Objective {
    /// The objective of `sd`'s own scheduler; the graph lives on `device`.
    pub fn new(sd: &StableDiffusion, device: &Device) -> Self {
        Objective {
            ddpm: DdpmScheduler::new(sd.scheduler_config.clone()),
            prediction: sd.scheduler_config.prediction_type,
            latent_scale: sd.vae.scaling_factor() as f32,
            device: device.clone(),
            latents: None,
            contexts: Mutex::new(HashMap::new()),
        }
    }

    /// Encodes each distinct image once (kohya's and diffusers' `--cache_latents`), one at a
    /// time, so a batch's posteriors do not depend on what else is in it.
    pub fn cache_latents(mut self) -> Self {
        self.latents = Some(Mutex::new(HashMap::new()));
        self
    }

    /// How many posteriors and prompt embeddings are cached.
    pub fn cached_counts(&self) -> (usize, usize) {
        let latents = self.latents.as_ref().map_or(0, |c| c.lock().expect("latent cache").len());
        (latents, self.contexts.lock().expect("prompt cache").len())
    }

    /// The VAE posterior of each image, `[B, C, h, w]` on the CPU.
    fn posterior(&self, sd: &StableDiffusion, images: &[RgbImage]) -> Result<DiagonalGaussian> {
        let Some(cache) = &self.latents else {
            return Ok(sd.vae.encode(to_tensor(images, &cpu())?));
        };
        let mut cache = cache.lock().expect("latent cache");
        let mut means = Vec::with_capacity(images.len());
        let mut logvars = Vec::with_capacity(images.len());
        for image in images {
            let key = image_key(image);
            if !cache.contains_key(&key) {
                cache.insert(key, sd.vae.encode(to_tensor(std::slice::from_ref(image), &cpu())?));
            }
            let p = &cache[&key];
            means.push(p.mean.clone());
            logvars.push(p.logvar.clone());
        }
        Ok(DiagonalGaussian { mean: Tensor::cat(means, 0), logvar: Tensor::cat(logvars, 0) })
    }

    /// The text encoder's last hidden state for each prompt, `[B, 77, D]`.
    fn context(&self, sd: &StableDiffusion, prompts: &[String]) -> Result<Tensor<3>> {
        let dev = &self.device;
        let encode = |texts: &[&str]| -> Result<Tensor<3>> { Ok(sd.text_encoder.forward(sd.tokenizer.encode_tensor(texts, dev)?).last_hidden_state) };
        if sd.text_encoder.num_trainable_params() > 0 {
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            return encode(&refs);
        }
        let mut cache = self.contexts.lock().expect("prompt cache");
        let mut rows = Vec::with_capacity(prompts.len());
        for p in prompts {
            if !cache.contains_key(p) {
                cache.insert(p.clone(), encode(&[p.as_str()])?);
            }
            rows.push(cache[p].clone());
        }
        Ok(Tensor::cat(rows, 0))
    }

    /// The loss of each image under its prompt, `[B]`. Draws, in order: the posterior
    /// sample, the noise, the offset noise (only when used), the timesteps.
    pub fn per_sample(&self, sd: &StableDiffusion, images: &[RgbImage], prompts: &[String], rng: &mut StdRng, o: LossOptions) -> Result<Tensor<1>> {
        let dev = &self.device;
        let posterior = self.posterior(sd, images)?;
        let latents = posterior.sample(normal(rng, posterior.mean.dims(), &cpu())) * self.latent_scale;
        let latents = Tensor::<4>::from_data(latents.into_data(), dev);
        let dims = latents.dims();
        let mut noise = normal(rng, dims, dev);
        if o.noise_offset > 0.0 {
            noise = noise + normal(rng, [dims[0], dims[1], 1, 1], dev).mul_scalar(o.noise_offset).expand(dims);
        }
        let t: Vec<i64> = (0..images.len()).map(|_| rng.random_range(0..self.ddpm.num_train_timesteps() as i64)).collect();
        let noisy = self.ddpm.add_noise(latents.clone(), noise.clone(), &t)?;
        let target = self.ddpm.training_target(latents, noise, &t)?;
        let prompts = prompts.iter().map(|p| expand_prompt(p, &sd.tokenizer)).collect::<Result<Vec<_>, _>>()?;
        let context = self.context(sd, &prompts)?;
        let t_float = Tensor::<1>::from_floats(t.iter().map(|&x| x as f32).collect::<Vec<_>>().as_slice(), dev);
        let mut per = per_sample_mse(sd.unet.forward(noisy, t_float, context), target);
        if let Some(gamma) = o.snr_gamma {
            per = per * Tensor::<1>::from_floats(min_snr_weights(&self.ddpm.snr(&t)?, gamma, self.prediction).as_slice(), dev);
        }
        Ok(per)
    }
}
