//! `scheduler/scheduler_config.json`, read once and checked, so that every scheduler built from
//! it (DDPM for training, DDIM or Euler for sampling) sees the same validated settings, as
//! diffusers' `Scheduler.from_config` does.
use std::path::Path;

use knobs_nn::{Error, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceType {
    FixedSmall,
    FixedLarge,
}

/// The settings shared by the schedulers. Defaults are diffusers' DDPM/DDIM defaults, except
/// `timestep_spacing`, whose default depends on the scheduler (Euler uses `linspace`).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: i64,
    pub set_alpha_to_one: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub rescale_betas_zero_snr: bool,
    pub variance_type: VarianceType,
    /// Euler-only settings, kept so that Euler can refuse the variants it does not implement.
    pub interpolation_type: Option<String>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Raw::default().validate().expect("defaults are valid")
    }
}

/// The file as written; strings are checked in `validate` so that errors can name the key.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct Raw {
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: String,
    trained_betas: Option<Vec<f64>>,
    prediction_type: String,
    timestep_spacing: Option<String>,
    steps_offset: i64,
    set_alpha_to_one: bool,
    clip_sample: bool,
    clip_sample_range: f64,
    thresholding: bool,
    rescale_betas_zero_snr: bool,
    variance_type: Option<String>,
    interpolation_type: Option<String>,
    use_karras_sigmas: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    timestep_type: Option<String>,
    final_sigmas_type: Option<String>,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            rescale_betas_zero_snr: false,
            variance_type: None,
            interpolation_type: None,
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            timestep_type: None,
            final_sigmas_type: None,
        }
    }
}

fn choose<T: Copy>(key: &str, value: &str, options: &[(&str, T)]) -> Result<T> {
    options.iter().find(|(name, _)| *name == value).map(|(_, v)| *v).ok_or_else(|| {
        let names: Vec<_> = options.iter().map(|(n, _)| *n).collect();
        Error::param(key, format!("unsupported value `{value}`; supported: {}", names.join(", ")))
    })
}

pub(crate) fn parse_spacing(value: &str) -> Result<TimestepSpacing> {
    use TimestepSpacing::*;
    choose("timestep_spacing", value, &[("leading", Leading), ("trailing", Trailing), ("linspace", Linspace)])
}

impl Raw {
    fn validate(self) -> Result<SchedulerConfig> {
        use BetaSchedule::*;
        use PredictionType::*;
        let beta_schedule = choose(
            "beta_schedule",
            &self.beta_schedule,
            &[("linear", Linear), ("scaled_linear", ScaledLinear), ("squaredcos_cap_v2", SquaredcosCapV2)],
        )?;
        let prediction_type = choose(
            "prediction_type",
            &self.prediction_type,
            &[("epsilon", Epsilon), ("v_prediction", VPrediction), ("sample", Sample)],
        )?;
        let timestep_spacing = self.timestep_spacing.as_deref().map(parse_spacing).transpose()?;
        let variance_type = match self.variance_type.as_deref() {
            None => VarianceType::FixedSmall,
            Some(v) => choose(
                "variance_type",
                v,
                &[("fixed_small", VarianceType::FixedSmall), ("fixed_large", VarianceType::FixedLarge)],
            )?,
        };
        if self.thresholding {
            return Err(Error::param("thresholding", "dynamic thresholding is not supported; supported: false"));
        }
        if self.num_train_timesteps < 2 {
            return Err(Error::param("num_train_timesteps", "must be at least 2"));
        }
        crate::limits::at_most("num_train_timesteps", self.num_train_timesteps, crate::limits::TIMESTEPS)?;
        if let Some(b) = self.trained_betas.as_ref().filter(|b| b.len() != self.num_train_timesteps) {
            return Err(Error::param(
                "trained_betas",
                format!("has {} values but num_train_timesteps is {}", b.len(), self.num_train_timesteps),
            ));
        }
        let uses_range = self.trained_betas.is_none() && beta_schedule != SquaredcosCapV2;
        if uses_range && !(self.beta_start > 0.0 && self.beta_end > 0.0 && self.beta_end < 1.0) {
            return Err(Error::param("beta_start", "beta_start and beta_end must lie in (0, 1)"));
        }
        Ok(SchedulerConfig {
            num_train_timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            beta_schedule,
            trained_betas: self.trained_betas,
            prediction_type,
            timestep_spacing,
            steps_offset: self.steps_offset,
            set_alpha_to_one: self.set_alpha_to_one,
            clip_sample: self.clip_sample,
            clip_sample_range: self.clip_sample_range,
            rescale_betas_zero_snr: self.rescale_betas_zero_snr,
            variance_type,
            interpolation_type: self.interpolation_type,
            use_karras_sigmas: self.use_karras_sigmas.unwrap_or(false),
            use_exponential_sigmas: self.use_exponential_sigmas.unwrap_or(false),
            use_beta_sigmas: self.use_beta_sigmas.unwrap_or(false),
            timestep_type: self.timestep_type,
            final_sigmas_type: self.final_sigmas_type,
        })
    }
}

impl SchedulerConfig {
    /// Parses the JSON text of a `scheduler_config.json`; errors name the key at fault.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| Error::Invalid(format!("scheduler config: {e}")))?;
        raw.validate()
    }

    /// Reads `scheduler_config.json`; errors name the file and the key at fault.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let raw: Raw = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        raw.validate().map_err(|e| e.in_file(path))
    }

    /// Reads `<dir>/scheduler_config.json` (`dir` is the pipeline's `scheduler` folder).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("scheduler_config.json"))
    }

    /// The spacing, or `default` (the scheduler's own default) when the file has none.
    pub fn spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }
}
