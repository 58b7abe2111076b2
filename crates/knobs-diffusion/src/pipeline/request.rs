//! What one text-to-image call asks for, with diffusers' `StableDiffusionPipeline.__call__`
//! defaults, and the choice of sampler.
use std::fmt;
use std::str::FromStr;

use knobs_nn::{Error, Result, Tensor};

use crate::schedulers::{
    DdimScheduler, DdpmScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, Scheduler, SchedulerConfig,
};

/// The samplers the pipeline can drive, each built from the model's scheduler config as
/// diffusers' `SchedulerClass.from_config(pipe.scheduler.config)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    Ddpm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 4] = [Self::Ddim, Self::Euler, Self::EulerAncestral, Self::Ddpm];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Ddpm => "ddpm",
        }
    }

    /// The diffusers class a `model_index.json` names for this sampler.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Ddpm => "DDPMScheduler",
        }
    }

    pub fn from_class_name(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == class)
    }

    /// Whether a step draws fresh noise (then the pipeline feeds it from the request's seed).
    pub fn is_stochastic(self) -> bool {
        matches!(self, Self::EulerAncestral | Self::Ddpm)
    }

    pub fn build(self, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
        let c = config.clone();
        Ok(match self {
            Self::Ddim => Box::new(DdimScheduler::new(c)),
            Self::Euler => Box::new(EulerDiscreteScheduler::new(c)?),
            Self::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(c)?),
            Self::Ddpm => Box::new(DdpmScheduler::new(c)),
        })
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
            Error::param("scheduler", format!("unknown scheduler `{s}`; supported: {}", names.join(", ")))
        })
    }
}

/// One generation. `Default` gives diffusers' defaults (50 steps, guidance 7.5, empty
/// negative prompt, size from the model, one image, the model's own scheduler).
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    /// The unconditional branch of classifier-free guidance; "" as diffusers.
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance scale; at or below 1 the unconditional branch is skipped.
    pub guidance_scale: f64,
    /// `None`: the scheduler class named in `model_index.json` (DDIM when unsupported).
    pub scheduler: Option<SchedulerKind>,
    /// Image size in pixels; `None`: the UNet's `sample_size` times the VAE scale factor
    /// (or the size of `latents` when given).
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_images: usize,
    /// Seeds the initial latents (unless `latents` is given) and every stochastic step.
    pub seed: u64,
    /// Unit-variance initial latents `[num_images, C, H/f, W/f]`, diffusers' `latents=`:
    /// they are multiplied by the scheduler's `init_noise_sigma`.
    pub latents: Option<Tensor<4>>,
    /// SDXL only (an error on other models). What the second text encoder reads; `None`:
    /// `prompt` (diffusers' `prompt_2`).
    pub prompt_2: Option<String>,
    /// SDXL: the negative prompt of the second encoder; `None`: `negative_prompt`.
    pub negative_prompt_2: Option<String>,
    /// SDXL micro-conditioning, in pixels `(height, width)`: the size the image is meant to
    /// have come from (default: the output size) ...
    pub original_size: Option<(usize, usize)>,
    /// ... its crop's top-left corner `(top, left)` (default `(0, 0)`) ...
    pub crop_top_left: Option<(usize, usize)>,
    /// ... and the target size (default: the output size).
    pub target_size: Option<(usize, usize)>,
    /// The encodings [`super::StableDiffusion::condition`] gave earlier for a request like
    /// this one (diffusers' `prompt_embeds` and its kin): used as they are, the prompts and
    /// micro-conditioning fields are then not read, so no text encoder runs.
    pub conditioning: Option<super::Conditioning>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 50,
            guidance_scale: 7.5,
            scheduler: None,
            height: None,
            width: None,
            num_images: 1,
            seed: 0,
            latents: None,
            prompt_2: None,
            negative_prompt_2: None,
            original_size: None,
            crop_top_left: None,
            target_size: None,
            conditioning: None,
        }
    }
}

impl GenerateRequest {
    pub fn new(prompt: impl Into<String>) -> Self {
        GenerateRequest { prompt: prompt.into(), ..Default::default() }
    }

    /// diffusers' `do_classifier_free_guidance`.
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::param("steps", "must be at least 1"));
        }
        if self.num_images == 0 {
            return Err(Error::param("num_images", "must be at least 1"));
        }
        if !self.guidance_scale.is_finite() {
            return Err(Error::param("guidance_scale", format!("must be finite, got {}", self.guidance_scale)));
        }
        Ok(())
    }

    /// The SDXL-only fields that are set, by name (an SD-1.x/2.x pipeline refuses them).
    pub fn sdxl_fields(&self) -> Vec<&'static str> {
        let set = [
            ("prompt_2", self.prompt_2.is_some()),
            ("negative_prompt_2", self.negative_prompt_2.is_some()),
            ("original_size", self.original_size.is_some()),
            ("crop_top_left", self.crop_top_left.is_some()),
            ("target_size", self.target_size.is_some()),
        ];
        set.into_iter().filter(|(_, on)| *on).map(|(n, _)| n).collect()
    }
}
