//! Text to image, as diffusers' `StableDiffusionPipeline`: encode the prompt (and the negative
//! prompt for classifier-free guidance), denoise seeded latents with the chosen scheduler,
//! decode with the VAE. Loading and generating are separate steps and every component is a
//! public field, so adapters or new token embeddings can be attached in between.
pub mod request;
pub mod sdxl;

pub use request::{GenerateRequest, SchedulerKind};

use std::path::{Path, PathBuf};

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Device, Error, Init, Result, Tensor, impl_module};
use serde_json::Value;

use crate::clip::embeddings::expand_prompt;
use crate::clip::{ClipTextModel, ClipTokenizer};
use crate::schedulers::SchedulerConfig;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;

/// The component folders a pipeline needs, as named in `model_index.json`.
pub const COMPONENTS: [&str; 5] = ["tokenizer", "text_encoder", "unet", "vae", "scheduler"];

#[derive(Debug)]
pub struct StableDiffusion {
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    /// The scheduler class `model_index.json` names (e.g. `DDIMScheduler`).
    pub scheduler_class: String,
    pub device: Device,
}

// The trainable components under their folder names, so that a trainer, an optimizer or an
// adapter pattern sees the pipeline as one model (`unet.down_blocks...`, `text_encoder...`).
impl_module!(StableDiffusion { "text_encoder" => text_encoder, "unet" => unet, "vae" => vae });

/// Reads `model_index.json` and checks that every component is listed and has its folder.
/// Returns the scheduler's class name.
fn check_index(dir: &Path) -> Result<String> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "model folder not found"));
    }
    let path = dir.join("model_index.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::file(&path, format!("cannot read ({e}); a diffusers pipeline folder has one")))?;
    let index: Value = serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    let mut scheduler_class = String::new();
    for name in COMPONENTS {
        // Each entry is `[library, class]`; `[null, null]` means the component is absent.
        let class = index.get(name).and_then(|v| v.get(1)).and_then(Value::as_str).ok_or_else(|| {
            Error::key(&path, name, "component not listed; a Stable Diffusion pipeline needs tokenizer, text_encoder, unet, vae and scheduler")
        })?;
        let folder = dir.join(name);
        if !folder.is_dir() {
            return Err(Error::file(&folder, format!("component folder `{name}` ({class}) not found")));
        }
        if name == "scheduler" {
            scheduler_class = class.to_string();
        }
    }
    Ok(scheduler_class)
}

impl StableDiffusion {
    /// Loads a diffusers pipeline folder (`model_index.json` plus the `tokenizer`,
    /// `text_encoder`, `unet`, `vae` and `scheduler` folders). Inference wants the plain
    /// (non-autodiff) device, `knobs_nn::cpu()`.
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let scheduler_class = check_index(dir)?;
        Ok(StableDiffusion {
            dir: dir.to_path_buf(),
            tokenizer: ClipTokenizer::from_dir(dir.join("tokenizer"))?,
            text_encoder: ClipTextModel::from_dir(dir.join("text_encoder"), device)?,
            unet: UNet2DConditionModel::from_dir(dir.join("unet"), device)?,
            vae: AutoencoderKL::from_dir(dir.join("vae"), device)?,
            scheduler_config: SchedulerConfig::from_dir(dir.join("scheduler"))?,
            scheduler_class,
            device: device.clone(),
        })
    }

    /// The model's own scheduler when it is one we implement (PNDM, the SD-1.5 default, is
    /// not: DDIM is then used, and [`Self::default_scheduler_is_substitute`] says so).
    pub fn default_scheduler(&self) -> SchedulerKind {
        SchedulerKind::from_class_name(&self.scheduler_class).unwrap_or(SchedulerKind::Ddim)
    }
    pub fn default_scheduler_is_substitute(&self) -> bool {
        SchedulerKind::from_class_name(&self.scheduler_class).is_none()
    }

    /// Pixels per latent: `2^(len(vae.block_out_channels) - 1)`, diffusers' `vae_scale_factor`.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config.downscale_factor()
    }

    /// `[num_images, C, H/f, W/f]` for a request, checked against given latents.
    pub fn latent_shape(&self, req: &GenerateRequest) -> Result<[usize; 4]> {
        let f = self.vae_scale_factor();
        let c = self.unet.config.in_channels;
        let (mut h, mut w) = (req.height, req.width);
        if let Some(l) = &req.latents {
            let [b, lc, lh, lw] = l.dims();
            if b != req.num_images || lc != c {
                return Err(Error::param("latents", format!("shape {:?}: need [{}, {c}, H, W] (num_images, UNet in_channels)", l.dims(), req.num_images)));
            }
            for (key, given, lat) in [("height", &mut h, lh), ("width", &mut w, lw)] {
                match *given {
                    Some(v) if v != lat * f => {
                        return Err(Error::param(key, format!("{v} does not match the latents ({lat} x {f} = {})", lat * f)));
                    }
                    _ => *given = Some(lat * f),
                }
            }
        }
        let default = self.unet.config.sample_size.map(|s| s * f);
        let need = |key: &str, v: Option<usize>| {
            v.or(default).ok_or_else(|| Error::param(key, "the UNet config has no sample_size: give height and width"))
        };
        let (h, w) = (need("height", h)?, need("width", w)?);
        // Each UNet level halves the latent; odd sizes would not line up with the skips.
        let unit = f << (self.unet.config.block_out_channels.len() - 1);
        for (key, v) in [("height", h), ("width", w)] {
            if v == 0 || v % unit != 0 {
                return Err(Error::param(key, format!("{v} is not a positive multiple of {unit} (VAE scale x UNet downsampling)")));
            }
        }
        Ok([req.num_images, c, h / f, w / f])
    }

    /// The UNet's `encoder_hidden_states`: `[uncond x n, cond x n]` with guidance, else
    /// `[cond x n]`, as diffusers' `encode_prompt` with `num_images_per_prompt = n`.
    pub fn encode_prompt(&self, req: &GenerateRequest) -> Result<Tensor<3>> {
        let n = req.num_images;
        // Multi-vector textual-inversion tokens expand to all their vectors, as diffusers does.
        let prompt = expand_prompt(&req.prompt, &self.tokenizer)?;
        let negative = expand_prompt(&req.negative_prompt, &self.tokenizer)?;
        let texts: Vec<&str> = if req.uses_guidance() { vec![&negative, &prompt] } else { vec![&prompt] };
        let ids = self.tokenizer.encode_tensor(&texts, &self.device)?;
        let hidden = self.text_encoder.try_forward(ids)?.last_hidden_state;
        let parts = hidden.chunk(texts.len(), 0).into_iter().map(|t| t.repeat_dim(0, n)).collect();
        Ok(Tensor::cat(parts, 0))
    }

    fn noise(&self, rng: &mut Init, shape: [usize; 4]) -> Tensor<4> {
        let values = rng.normal_vec(shape.iter().product());
        Tensor::from_data(TensorData::new(values, shape), &self.device)
    }

    /// The denoised latents (before `/ scaling_factor`).
    pub fn generate_latents(&self, req: &GenerateRequest) -> Result<Tensor<4>> {
        self.generate_latents_with(req, &mut |_, _| {})
    }

    /// [`Self::generate_latents`], calling `progress(done, total)` after each step.
    pub fn generate_latents_with(&self, req: &GenerateRequest, progress: &mut dyn FnMut(usize, usize)) -> Result<Tensor<4>> {
        req.validate()?;
        let shape = self.latent_shape(req)?;
        let kind = req.scheduler.unwrap_or_else(|| self.default_scheduler());
        let mut sched = kind.build(&self.scheduler_config)?;
        // Before the latents: sigma schedulers derive init_noise_sigma from the chain.
        sched.set_timesteps(req.steps)?;
        let mut rng = Init::new(req.seed);
        let start = match &req.latents {
            Some(l) => l.clone(),
            None => self.noise(&mut rng, shape),
        };
        let mut x = start.mul_scalar(sched.init_noise_sigma());
        let context = self.encode_prompt(req)?;
        let guided = req.uses_guidance();
        let batch = if guided { 2 * shape[0] } else { shape[0] };
        let timesteps = sched.timesteps().to_vec();
        let model_t = sched.model_timesteps();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guided { Tensor::cat(vec![x.clone(), x.clone()], 0) } else { x.clone() };
            let input = sched.scale_model_input(input, t)?;
            let tt = Tensor::<1>::from_data(TensorData::new(vec![model_t[i]], [1]), &self.device);
            if i == 0 {
                debug_assert_eq!(input.dims()[0], batch);
                self.unet.check_inputs(&input, &tt, &context)?;
            }
            let pred = self.unet.forward(input, tt, context.clone());
            let pred = if guided { guide(pred, req.guidance_scale) } else { pred };
            let noise = kind.is_stochastic().then(|| self.noise(&mut rng, shape));
            x = sched.step(pred, t, x, noise)?.prev_sample;
            progress(i + 1, total);
        }
        Ok(x)
    }

    /// Images in [0, 1] from denoised latents: `vae.decode(latents / scaling_factor)`, then
    /// diffusers' denormalisation `(x / 2 + 0.5).clamp(0, 1)`.
    pub fn decode_latents(&self, latents: Tensor<4>) -> Tensor<4> {
        let image = self.vae.decode(latents.div_scalar(self.vae.scaling_factor()));
        image.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0)
    }

    /// Images `[num_images, 3, H, W]` in [0, 1].
    pub fn generate(&self, req: &GenerateRequest) -> Result<Tensor<4>> {
        self.generate_with(req, &mut |_, _| {})
    }

    pub fn generate_with(&self, req: &GenerateRequest, progress: &mut dyn FnMut(usize, usize)) -> Result<Tensor<4>> {
        Ok(self.decode_latents(self.generate_latents_with(req, progress)?))
    }
}

/// Classifier-free guidance on a `[uncond; cond]` prediction: `u + scale (c - u)`.
pub(crate) fn guide(pred: Tensor<4>, scale: f64) -> Tensor<4> {
    let mut halves = pred.chunk(2, 0);
    let cond = halves.pop().expect("two halves");
    let uncond = halves.pop().expect("two halves");
    uncond.clone() + (cond - uncond).mul_scalar(scale)
}
