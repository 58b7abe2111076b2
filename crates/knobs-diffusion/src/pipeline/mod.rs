//! Text to image, as diffusers' `StableDiffusionPipeline` and `StableDiffusionXLPipeline`:
//! encode the prompt (and the negative prompt for classifier-free guidance), denoise seeded
//! latents with the chosen scheduler, decode with the VAE. An SDXL folder is the same
//! pipeline with a second tokenizer and text encoder and the UNet's added conditioning
//! (`sdxl`). Loading and generating are separate steps and every component is a public
//! field, so adapters or new token embeddings can be attached in between.
pub mod request;
pub mod sdxl;

pub use request::{GenerateRequest, SchedulerKind};

use std::path::{Path, PathBuf};

use knobs_nn::burn::tensor::{DType, TensorData};
use knobs_nn::{Device, Error, Init, Result, Tensor, impl_module};
use serde_json::Value;

use crate::clip::embeddings::expand_prompt;
use crate::clip::{ClipTextModel, ClipTokenizer};
use crate::schedulers::SchedulerConfig;
use crate::unet::{AddedCond, UNet2DConditionModel};
use crate::vae::AutoencoderKL;

/// The component folders a pipeline needs, as named in `model_index.json`.
pub const COMPONENTS: [&str; 5] = ["tokenizer", "text_encoder", "unet", "vae", "scheduler"];
/// The further folders of an SDXL pipeline.
pub const SDXL_COMPONENTS: [&str; 2] = ["tokenizer_2", "text_encoder_2"];

/// The dtype each part of a pipeline keeps its weight matrices and kernels in as it loads
/// (`--weights-dtype`): one for all (`From<DType>`), or the text encoders apart from the UNet
/// and VAE, as generation under bf16 keeps them (the text encoders computing in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightsAs {
    pub text_encoders: DType,
    pub unet_and_vae: DType,
}

impl From<DType> for WeightsAs {
    fn from(dtype: DType) -> Self {
        WeightsAs { text_encoders: dtype, unet_and_vae: dtype }
    }
}

#[derive(Debug)]
pub struct StableDiffusion {
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// SDXL's second tokenizer and text encoder (a `CLIPTextModelWithProjection`); `None`
    /// for SD-1.x/2.x.
    pub tokenizer_2: Option<ClipTokenizer>,
    pub text_encoder_2: Option<ClipTextModel>,
    /// SDXL's `force_zeros_for_empty_prompt` (`model_index.json`): without a negative
    /// prompt the unconditional branch gets zero embeddings instead of `""`'s.
    pub force_zeros_for_empty_prompt: bool,
    pub scheduler_config: SchedulerConfig,
    /// The scheduler class `model_index.json` names (e.g. `DDIMScheduler`).
    pub scheduler_class: String,
    pub device: Device,
}

// The trainable components under their folder names, so that a trainer, an optimizer or an
// adapter pattern sees the pipeline as one model (`unet.down_blocks...`, `text_encoder...`).
impl_module!(StableDiffusion { "text_encoder" => text_encoder, "text_encoder_2" => text_encoder_2, "unet" => unet, "vae" => vae });

/// What `model_index.json` says beyond the component folders.
struct Index {
    scheduler_class: String,
    sdxl: bool,
    force_zeros_for_empty_prompt: bool,
}

/// Reads `model_index.json` and checks that every component is listed and has its folder
/// (SDXL's second tokenizer and text encoder too when it lists them).
fn check_index(dir: &Path) -> Result<Index> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "model folder not found"));
    }
    let path = dir.join("model_index.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::file(&path, format!("cannot read ({e}); a diffusers pipeline folder has one")))?;
    let index: Value = serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    // Each entry is `[library, class]`; `[null, null]` means the component is absent.
    let class_of = |name: &str| index.get(name).and_then(|v| v.get(1)).and_then(Value::as_str);
    let sdxl = class_of("text_encoder_2").is_some();
    if sdxl && class_of("text_encoder").is_none() {
        return Err(Error::key(&path, "text_encoder", "is null: an SDXL refiner (text_encoder_2 only) is not supported; use an SDXL base pipeline"));
    }
    let mut scheduler_class = String::new();
    let needed = if sdxl { [&COMPONENTS[..], &SDXL_COMPONENTS[..]].concat() } else { COMPONENTS.to_vec() };
    for name in needed {
        let class = class_of(name).ok_or_else(|| {
            Error::key(&path, name, "component not listed; a Stable Diffusion pipeline needs tokenizer, text_encoder, unet, vae and scheduler (SDXL also tokenizer_2 and text_encoder_2)")
        })?;
        let folder = dir.join(name);
        if !folder.is_dir() {
            return Err(Error::file(&folder, format!("component folder `{name}` ({class}) not found")));
        }
        if name == "scheduler" {
            scheduler_class = class.to_string();
        }
    }
    // diffusers' SDXL pipelines default the flag to true.
    let force_zeros_for_empty_prompt = sdxl && index.get("force_zeros_for_empty_prompt").and_then(Value::as_bool).unwrap_or(true);
    Ok(Index { scheduler_class, sdxl, force_zeros_for_empty_prompt })
}

/// Checks a pipeline folder's `model_index.json` and component folders without loading them.
pub fn check_model_index(dir: impl AsRef<Path>) -> Result<()> {
    check_index(dir.as_ref()).map(drop)
}

/// What the UNet is conditioned on through one sampling run: `context` (its
/// `encoder_hidden_states`) and, for SDXL, the pooled embedding and time ids; with guidance
/// the batch is `[negative x n, positive x n]`.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub context: Tensor<3>,
    pub added: Option<AddedCond>,
}

impl StableDiffusion {
    /// Block gradient checkpointing in the UNet and the text encoders (diffusers'
    /// `--gradient_checkpointing`): each resnet, transformer block and encoder layer with
    /// something to differentiate keeps only its inputs and runs again in the backward pass.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.unet.set_gradient_checkpointing(on);
        self.text_encoder.set_gradient_checkpointing(on);
        if let Some(encoder) = &mut self.text_encoder_2 {
            encoder.set_gradient_checkpointing(on);
        }
    }

    /// Loads a diffusers pipeline folder (`model_index.json` plus the `tokenizer`,
    /// `text_encoder`, `unet`, `vae` and `scheduler` folders; SDXL's also `tokenizer_2` and
    /// `text_encoder_2`). Inference wants the plain (non-autodiff) device, `knobs_nn::cpu()`.
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_dir_as(dir, device, DType::F32)
    }

    /// [`Self::from_dir`] with every weight matrix and kernel stored in `weights`' dtype for
    /// its part as it loads (see [`knobs_nn::ParamMut::assign_as`]): the same model as storing them so
    /// after loading ([`knobs_nn::ModuleExt::store_frozen_as`]), without its f32 peak.
    pub fn from_dir_as(dir: impl AsRef<Path>, device: &Device, weights: impl Into<WeightsAs>) -> Result<Self> {
        Self::from_dir_with(dir.as_ref(), device, weights.into(), false)
    }

    /// [`Self::from_dir_as`], the UNet's weights deferred when `defer_unet` (see
    /// [`Self::load_for_one_generation`]).
    pub(crate) fn from_dir_with(dir: &Path, device: &Device, weights: WeightsAs, defer_unet: bool) -> Result<Self> {
        // What a pipeline dropped before this one kept for its weights goes before this load.
        knobs_nn::ops::release_unused_weight_transforms();
        let index = check_index(dir)?;
        let (tokenizer_2, text_encoder_2) = if index.sdxl {
            let te2 = ClipTextModel::from_dir_as(dir.join("text_encoder_2"), device, weights.text_encoders)?;
            if te2.text_projection.is_none() {
                return Err(Error::file(dir.join("text_encoder_2"), "SDXL's second text encoder must be a CLIPTextModelWithProjection (no text_projection found)"));
            }
            (Some(ClipTokenizer::from_dir(dir.join("tokenizer_2"))?), Some(te2))
        } else {
            (None, None)
        };
        Ok(StableDiffusion {
            dir: dir.to_path_buf(),
            tokenizer: ClipTokenizer::from_dir(dir.join("tokenizer"))?,
            text_encoder: ClipTextModel::from_dir_as(dir.join("text_encoder"), device, weights.text_encoders)?,
            unet: if defer_unet {
                UNet2DConditionModel::deferred_from_dir_as(dir.join("unet"), device, weights.unet_and_vae)?
            } else {
                UNet2DConditionModel::from_dir_as(dir.join("unet"), device, weights.unet_and_vae)?
            },
            vae: AutoencoderKL::from_dir_as(dir.join("vae"), device, weights.unet_and_vae)?,
            tokenizer_2,
            text_encoder_2,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            scheduler_config: SchedulerConfig::from_dir(dir.join("scheduler"))?,
            scheduler_class: index.scheduler_class,
            device: device.clone(),
        })
    }

    /// Whether this is an SDXL pipeline (two text encoders, added conditioning).
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// Each tokenizer with its text encoder: one pair, or SDXL's two.
    pub fn text_pairs_mut(&mut self) -> Vec<(&mut ClipTokenizer, &mut ClipTextModel)> {
        let mut pairs = vec![(&mut self.tokenizer, &mut self.text_encoder)];
        if let (Some(t), Some(e)) = (self.tokenizer_2.as_mut(), self.text_encoder_2.as_mut()) {
            pairs.push((t, e));
        }
        pairs
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

    /// The pixel multiple every image side must be: the VAE's downscale times the UNet's (each
    /// level halves the latent; odd sizes would not line up with the skips).
    pub fn size_unit(&self) -> usize {
        self.vae_scale_factor() << (self.unet.config.block_out_channels.len() - 1)
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
        let unit = self.size_unit();
        for (key, v) in [("height", h), ("width", w)] {
            if v == 0 || v % unit != 0 {
                return Err(Error::param(key, format!("{v} is not a positive multiple of {unit} (VAE scale x UNet downsampling)")));
            }
        }
        Ok([req.num_images, c, h / f, w / f])
    }

    /// Everything the UNet is conditioned on for `req` (whose image is `height` x `width`):
    /// the prompt encodings and, for SDXL, the pooled embedding and time ids.
    pub fn condition(&self, req: &GenerateRequest, height: usize, width: usize) -> Result<Conditioning> {
        if let Some(given) = &req.conditioning {
            return self.check_given(given, req).map(|()| given.clone());
        }
        if self.is_sdxl() {
            return sdxl::condition(self, req, height, width);
        }
        if let Some(field) = req.sdxl_fields().first() {
            return Err(Error::param(*field, "is SDXL conditioning; this is an SD-1.x/2.x model"));
        }
        Ok(Conditioning { context: self.encode_prompt(req)?, added: None })
    }

    /// [`Self::condition`] at the request's own image size: what
    /// [`GenerateRequest::conditioning`] takes to generate it later without the text encoders.
    pub fn condition_for(&self, req: &GenerateRequest) -> Result<Conditioning> {
        let shape = self.latent_shape(req)?;
        let f = self.vae_scale_factor();
        self.condition(req, shape[2] * f, shape[3] * f)
    }

    /// Whether encodings given with a request fit it: one row per image, twice that with
    /// guidance, and SDXL's added conditioning exactly on an SDXL model.
    fn check_given(&self, given: &Conditioning, req: &GenerateRequest) -> Result<()> {
        let rows = if req.uses_guidance() { 2 } else { 1 } * req.num_images;
        let have = given.context.dims()[0];
        if have != rows {
            return Err(Error::param("conditioning", format!("holds {have} rows; this request needs {rows} (num_images, twice with guidance)")));
        }
        if given.added.is_some() != self.is_sdxl() {
            return Err(Error::param("conditioning", "an SDXL model needs the pooled embedding and time ids with the context, an SD-1.x/2.x model takes neither"));
        }
        Ok(())
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
        let f = self.vae_scale_factor();
        let Conditioning { context, added } = self.condition(req, shape[2] * f, shape[3] * f)?;
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
                self.unet.check_inputs(&input, &tt, &context, added.as_ref())?;
            }
            let pred = self.unet.forward_with_cond(input, tt, context.clone(), added.as_ref());
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

    /// [`Self::generate_with`] for a caller that generates once (`knobs generate`): each
    /// model's weights are released once its part is done, and the next part reuses their
    /// memory. The same images; the pipeline encodes and denoises nothing afterwards (an
    /// error naming the released model).
    ///
    /// With the UNet's weights deferred ([`Self::load_for_one_generation`]) the prompt is
    /// encoded first, the text encoders are released and the UNet's weights are read into
    /// their memory, so the two are never resident together (SDXL at 1024 px in bf16: peak
    /// 10.2 -> 6.8 GB, no slower: the steps and the decode reuse pages faulted in already).
    /// Otherwise the text encoders go with the UNet once the latents are denoised.
    /// The UNet and its kept packings go before the VAE decode, where SD-1.x's peak is.
    pub fn generate_once(&mut self, req: &GenerateRequest, progress: &mut dyn FnMut(usize, usize)) -> Result<Tensor<4>> {
        let encoded;
        let req = if self.unet.is_deferred() && req.conditioning.is_none() {
            req.validate()?;
            encoded = GenerateRequest { conditioning: Some(self.condition_for(req)?), ..req.clone() };
            self.release_text_encoders();
            &encoded
        } else {
            req
        };
        self.unet.load_deferred_weights()?;
        let latents = self.generate_latents_with(req, progress)?;
        self.release_text_encoders();
        self.unet.release();
        knobs_nn::ops::release_unused_weight_transforms();
        Ok(self.decode_latents(latents))
    }

    fn release_text_encoders(&mut self) {
        for (_, encoder) in self.text_pairs_mut() {
            encoder.release();
        }
    }
}

/// Classifier-free guidance on a `[uncond; cond]` prediction: `u + scale (c - u)`.
pub(crate) fn guide(pred: Tensor<4>, scale: f64) -> Tensor<4> {
    let mut halves = pred.chunk(2, 0);
    let cond = halves.pop().expect("two halves");
    let uncond = halves.pop().expect("two halves");
    uncond.clone() + (cond - uncond).mul_scalar(scale)
}
