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

use anyhow::{Result, bail};
use image::RgbImage;
use knobs_diffusion::clip::embeddings::expand_prompt;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_diffusion::pipeline::sdxl::{SdxlText, time_ids};
use knobs_diffusion::unet::AddedCond;
use knobs_nn::burn::tensor::TensorData;
use knobs_diffusion::schedulers::{DdpmScheduler, PredictionType};
use knobs_diffusion::unet::UNetConfig;
use knobs_diffusion::vae::{DiagonalGaussian, VaeConfig};
use knobs_nn::hash::fnv1a_seeded;
use knobs_nn::{Device, ModuleExt, Tensor};
use knobs_world::images::to_tensor;
use rand::Rng;
use rand::rngs::StdRng;

use crate::latent_cache::LatentCache;
use crate::loss::{min_snr_weights, per_sample_mse};
use crate::rng::normal_vec;

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

/// What one step's UNet call takes, and the target it is scored against.
pub struct UnetInputs {
    noisy: Tensor<4>,
    t: Vec<i64>,
    target: Tensor<4>,
    context: Tensor<3>,
    added: Option<AddedCond>,
}

/// What the loss needs that does not change between steps.
pub struct Objective {
    pub ddpm: DdpmScheduler,
    prediction: PredictionType,
    latent_scale: f32,
    device: Device,
    /// Posteriors by image content, when latents are cached.
    latents: Option<LatentCache>,
    /// Prompt encodings by prompt, used while the text encoders are frozen.
    contexts: Mutex<HashMap<String, Encoded>>,
}

/// One prompt's encoding: the UNet's context `[1, 77, D]` and, for SDXL, the pooled
/// embedding `[1, P]`.
#[derive(Clone)]
struct Encoded {
    context: Tensor<3>,
    pooled: Option<Tensor<2>>,
}

/// Where a training image came from, for SDXL's micro-conditioning (diffusers' SDXL scripts):
/// its size before resizing and the top-left corner of the crop taken from the resized image,
/// both `(height, width)` / `(top, left)` in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSizes {
    pub original: (u32, u32),
    pub crop_top_left: (u32, u32),
}

impl ImageSizes {
    /// An image used as it is: its own size, uncropped.
    pub fn of(image: &RgbImage) -> Self {
        ImageSizes { original: (image.height(), image.width()), crop_top_left: (0, 0) }
    }
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
    pub fn cache_latents(self) -> Self {
        self.with_latent_cache(LatentCache::in_memory())
    }

    /// [`Objective::cache_latents`] into `cache` (which may also keep them on disk).
    pub fn with_latent_cache(mut self, cache: LatentCache) -> Self {
        self.latents = Some(cache);
        self
    }

    /// With latents cached: how many posteriors were read from a `--latent-cache` folder and
    /// how many were encoded.
    pub fn latent_counts(&self) -> Option<(usize, usize)> {
        self.latents.as_ref().map(LatentCache::counts)
    }

    /// How many posteriors and prompt embeddings are cached.
    pub fn cached_counts(&self) -> (usize, usize) {
        let latents = self.latents.as_ref().map_or(0, LatentCache::len);
        (latents, self.contexts.lock().expect("prompt cache").len())
    }

    /// The VAE posterior of each image, `[B, C, h, w]` on the objective's device, outside
    /// autodiff.
    fn posterior(&self, sd: &StableDiffusion, images: &[RgbImage]) -> Result<DiagonalGaussian> {
        let Some(cache) = &self.latents else {
            return Ok(sd.vae.encode(to_tensor(images, &self.device.clone().inner())?));
        };
        let device = self.device.clone().inner();
        let mut means = Vec::with_capacity(images.len());
        let mut logvars = Vec::with_capacity(images.len());
        for image in images {
            let p = cache.posterior(image_key(image), &device, || Ok(sd.vae.encode(to_tensor(std::slice::from_ref(image), &device)?)))?;
            means.push(p.mean);
            logvars.push(p.logvar);
        }
        Ok(DiagonalGaussian { mean: Tensor::cat(means, 0), logvar: Tensor::cat(logvars, 0) })
    }

    /// Each prompt's encoding: SD-1.x/2.x's last hidden state, or SDXL's two penultimate
    /// states side by side plus the pooled embedding (as its pipeline encodes prompts).
    fn encode(&self, sd: &StableDiffusion, prompts: &[String]) -> Result<Encoded> {
        let dev = &self.device;
        let encode = |texts: &[&str]| -> Result<Encoded> {
            if let Some(text) = SdxlText::of(sd) {
                let parts = texts.iter().map(|t| text.encode(t, None, 0, dev)).collect::<Result<Vec<_>, _>>()?;
                let pooled = Tensor::cat(parts.iter().map(|p| p.pooled.clone()).collect(), 0);
                return Ok(Encoded { context: Tensor::cat(parts.into_iter().map(|p| p.embeds).collect(), 0), pooled: Some(pooled) });
            }
            let texts = texts.iter().map(|p| expand_prompt(p, &sd.tokenizer)).collect::<Result<Vec<_>, _>>()?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            Ok(Encoded { context: sd.text_encoder.try_forward(sd.tokenizer.encode_tensor(&refs, dev)?)?.last_hidden_state, pooled: None })
        };
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        if sd.text_encoder.num_trainable_params() > 0 || sd.text_encoder_2.num_trainable_params() > 0 {
            return encode(&refs);
        }
        let mut cache = self.contexts.lock().expect("prompt cache");
        let mut rows = Vec::with_capacity(prompts.len());
        for p in prompts {
            if !cache.contains_key(p) {
                if sd.text_encoder.is_released() {
                    bail!("the prompt `{p}` was not among those encoded before the text encoders were released");
                }
                cache.insert(p.clone(), encode(&[p.as_str()])?);
            }
            rows.push(cache[p].clone());
        }
        let pooled = rows.iter().map(|r| r.pooled.clone()).collect::<Option<Vec<_>>>().map(|p| Tensor::cat(p, 0));
        Ok(Encoded { context: Tensor::cat(rows.into_iter().map(|r| r.context).collect(), 0), pooled })
    }

    /// Encodes each of `prompts` now, while the text encoders are frozen, so that a run can
    /// release them (see [`knobs_diffusion::clip::ClipTextModel::release`]) and still take every loss.
    pub fn encode_ahead(&self, sd: &StableDiffusion, prompts: &[String]) -> Result<()> {
        for p in prompts {
            self.encode(sd, std::slice::from_ref(p))?;
        }
        Ok(())
    }

    /// The loss of each image under its prompt, `[B]`, each image taken as it is (SDXL: its
    /// own size, uncropped). Draws, in order: the posterior sample, the noise, the offset
    /// noise (only when used), the timesteps.
    pub fn per_sample(&self, sd: &StableDiffusion, images: &[RgbImage], prompts: &[String], rng: &mut StdRng, o: LossOptions) -> Result<Tensor<1>> {
        let sizes: Vec<ImageSizes> = images.iter().map(ImageSizes::of).collect();
        self.per_sample_sized(sd, images, &sizes, prompts, rng, o)
    }

    /// [`Self::per_sample`] with each image's original size and crop, SDXL's time ids
    /// (the target size is the training image's).
    pub fn per_sample_sized(&self, sd: &StableDiffusion, images: &[RgbImage], sizes: &[ImageSizes], prompts: &[String], rng: &mut StdRng, o: LossOptions) -> Result<Tensor<1>> {
        let all: Vec<usize> = (0..images.len()).collect();
        self.per_sample_rows(sd, images, sizes, prompts, rng, o, &all)
    }

    /// [`Self::per_sample_sized`] of the batch's `rows` only, in that order: the random draws
    /// are the whole batch's (so a batch split over devices, each taking its rows, draws what
    /// one device would), the work only the rows'. The batch's images share one size.
    #[allow(clippy::too_many_arguments)]
    pub fn per_sample_rows(&self, sd: &StableDiffusion, images: &[RgbImage], sizes: &[ImageSizes], prompts: &[String], rng: &mut StdRng, o: LossOptions, rows: &[usize]) -> Result<Tensor<1>> {
        let inputs = self.unet_inputs(sd, images, sizes, prompts, rng, o, rows)?;
        self.loss(sd, inputs, o)
    }

    /// The first half of [`Self::per_sample_rows`]: the latents, noise, timesteps and prompt
    /// embeddings (the VAE and text encoder's work), before the UNet runs. Apart so that
    /// `knobs bench` can time the two halves.
    #[allow(clippy::too_many_arguments)]
    pub fn unet_inputs(&self, sd: &StableDiffusion, images: &[RgbImage], sizes: &[ImageSizes], prompts: &[String], rng: &mut StdRng, o: LossOptions, rows: &[usize]) -> Result<UnetInputs> {
        let dev = &self.device;
        let n = images.len();
        // The whole batch in order (one device) takes its draws and images as they are.
        let whole = rows.iter().copied().eq(0..n);
        let pick = |v: Vec<f32>, per: usize| -> Vec<f32> { if whole { v } else { rows.iter().flat_map(|&r| v[r * per..(r + 1) * per].to_vec()).collect() } };
        let posterior = if whole {
            self.posterior(sd, images)?
        } else {
            self.posterior(sd, &rows.iter().map(|&r| images[r].clone()).collect::<Vec<_>>())?
        };
        let [_, c, h, w] = posterior.mean.dims();
        let dims = [rows.len(), c, h, w];
        let per = c * h * w;
        let eps = Tensor::from_data(TensorData::new(pick(normal_vec(rng, n * per), per), dims), &posterior.mean.device());
        let latents = posterior.sample(eps) * self.latent_scale;
        let latents = Tensor::<4>::from_data(latents.into_data(), dev);
        let mut noise = Tensor::<4>::from_data(TensorData::new(pick(normal_vec(rng, n * per), per), dims), dev);
        if o.noise_offset > 0.0 {
            let offset = Tensor::<4>::from_data(TensorData::new(pick(normal_vec(rng, n * c), c), [rows.len(), c, 1, 1]), dev);
            noise = noise + offset.mul_scalar(o.noise_offset).expand(dims);
        }
        let all_t: Vec<i64> = (0..n).map(|_| rng.random_range(0..self.ddpm.num_train_timesteps() as i64)).collect();
        let t: Vec<i64> = rows.iter().map(|&r| all_t[r]).collect();
        let noisy = self.ddpm.add_noise(latents.clone(), noise.clone(), &t)?;
        let target = self.ddpm.training_target(latents, noise, &t)?;
        let prompts: Vec<String> = rows.iter().map(|&r| prompts[r].clone()).collect();
        let Encoded { context, pooled } = self.encode(sd, &prompts)?;
        let added = pooled.map(|text_embeds| {
            let ids: Vec<f32> = rows.iter().flat_map(|&r| time_ids(sizes[r].original, sizes[r].crop_top_left, (images[r].height(), images[r].width()))).collect();
            AddedCond { text_embeds, time_ids: Tensor::from_data(TensorData::new(ids, [rows.len(), 6]), dev) }
        });
        Ok(UnetInputs { noisy, t, target, context, added })
    }

    /// The second half of [`Self::per_sample_rows`]: the UNet's prediction against the
    /// target, per sample.
    pub fn loss(&self, sd: &StableDiffusion, inputs: UnetInputs, o: LossOptions) -> Result<Tensor<1>> {
        let UnetInputs { noisy, t, target, context, added } = inputs;
        let dev = &self.device;
        let t_float = Tensor::<1>::from_floats(t.iter().map(|&x| x as f32).collect::<Vec<_>>().as_slice(), dev);
        let mut per = per_sample_mse(sd.unet.forward_with_cond(noisy, t_float, context, added.as_ref()), target);
        if let Some(gamma) = o.snr_gamma {
            per = per * Tensor::<1>::from_floats(min_snr_weights(&self.ddpm.snr(&t)?, gamma, self.prediction).as_slice(), dev);
        }
        Ok(per)
    }
}
