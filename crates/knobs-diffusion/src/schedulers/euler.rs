//! EulerDiscreteScheduler and EulerAncestralDiscreteScheduler (k-diffusion's Euler samplers):
//! they walk a decreasing list of sigmas = sqrt((1 - acp) / acp), interpolated at the chosen
//! timesteps, ending at 0. Like diffusers they keep a step index that advances on every step.
use std::path::Path;

use knobs_nn::{Error, Result, Tensor};

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{NoiseSchedule, spaced_timesteps};
use super::{Scheduler, StepOutput, need_noise};

/// What both Euler variants share: sigmas, timesteps and the step index.
#[derive(Debug, Clone)]
struct Sigmas {
    config: SchedulerConfig,
    /// sqrt((1 - acp) / acp) per training timestep, ascending in t.
    train_sigmas: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps_exact: Vec<f32>,
    timesteps: Vec<i64>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

fn must(key: &str, ok: bool, supported: &str) -> Result<()> {
    if ok { Ok(()) } else { Err(Error::param(key, format!("not supported by the Euler schedulers; supported: {supported}"))) }
}

impl Sigmas {
    fn new(config: SchedulerConfig) -> Result<Self> {
        let c = &config;
        must("interpolation_type", c.interpolation_type.as_deref().is_none_or(|v| v == "linear"), "linear")?;
        must("use_karras_sigmas", !c.use_karras_sigmas, "false")?;
        must("use_exponential_sigmas", !c.use_exponential_sigmas, "false")?;
        must("use_beta_sigmas", !c.use_beta_sigmas, "false")?;
        must("timestep_type", c.timestep_type.as_deref().is_none_or(|v| v == "discrete"), "discrete")?;
        must("final_sigmas_type", c.final_sigmas_type.as_deref().is_none_or(|v| v == "zero"), "zero")?;
        let mut acp = NoiseSchedule::from_config(c).alphas_cumprod;
        if c.rescale_betas_zero_snr {
            // Zero terminal SNR would make the first sigma infinite; diffusers uses 2^-24.
            *acp.last_mut().unwrap() = 2f32.powi(-24);
        }
        let train_sigmas: Vec<f32> = acp.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let n = train_sigmas.len();
        Ok(Sigmas {
            config,
            sigmas: train_sigmas.iter().rev().copied().chain([0.0]).collect(),
            timesteps_exact: (0..n).rev().map(|t| t as f32).collect(),
            timesteps: (0..n as i64).rev().collect(),
            train_sigmas,
            step_index: None,
            begin_index: None,
        })
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        let spacing = c.spacing_or(TimestepSpacing::Linspace);
        let ts: Vec<f32> = spaced_timesteps(spacing, c.num_train_timesteps, c.steps_offset, n)?
            .into_iter()
            .map(|t| t as f32)
            .collect();
        let last = self.train_sigmas.len() - 1;
        let mut sigmas = Vec::with_capacity(ts.len() + 1);
        for &t in &ts {
            // numpy.interp on the integer grid, clamped at both ends.
            let t = (t as f64).clamp(0.0, last as f64);
            let lo = (t.floor() as usize).min(last);
            let hi = (lo + 1).min(last);
            let (a, b) = (self.train_sigmas[lo] as f64, self.train_sigmas[hi] as f64);
            sigmas.push((a + (b - a) * (t - lo as f64)) as f32);
        }
        sigmas.push(0.0);
        self.sigmas = sigmas;
        self.timesteps = ts.iter().map(|t| t.round_ties_even() as i64).collect();
        self.timesteps_exact = ts;
        self.step_index = None;
        self.begin_index = None;
        Ok(())
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(0.0f32, f32::max) as f64;
        match self.config.spacing_or(TimestepSpacing::Linspace) {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    /// The current step index, found from `t` on first use (the second match when `t`
    /// repeats, as diffusers does so that image-to-image starts mid-chain correctly).
    fn index(&mut self, t: i64) -> Result<usize> {
        if let Some(i) = self.step_index {
            return Ok(i);
        }
        let i = match self.begin_index {
            Some(b) => b,
            None => {
                let hits: Vec<usize> = (0..self.timesteps.len()).filter(|&i| self.timesteps[i] == t).collect();
                *hits.get(if hits.len() > 1 { 1 } else { 0 }).ok_or_else(|| {
                    Error::Invalid(format!("Euler: timestep {t} is not in the schedule {:?}", self.timesteps))
                })?
            }
        };
        if i + 1 >= self.sigmas.len() {
            return Err(Error::Invalid(format!("Euler: step index {i} is past the last step")));
        }
        self.step_index = Some(i);
        Ok(i)
    }

    fn scale_model_input(&mut self, sample: Tensor<4>, t: i64) -> Result<Tensor<4>> {
        let i = self.index(t)?;
        let sigma = self.sigmas[i];
        Ok(sample.div_scalar((sigma * sigma + 1.0).sqrt()))
    }

    /// Moves to the step after `i`; `index` refuses to run past the chain's end.
    fn advance(&mut self, i: usize) {
        self.step_index = Some(i + 1);
    }
}

macro_rules! euler_common {
    ($ty:ident) => {
        impl $ty {
            pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
                Self::new(SchedulerConfig::from_dir(dir)?)
            }
            /// The sigmas of the chain, one per timestep plus the final 0.
            pub fn sigmas(&self) -> &[f32] {
                &self.s.sigmas
            }
            /// Starts the chain at step `i` (image-to-image), as diffusers' `set_begin_index`.
            pub fn set_begin_index(&mut self, i: usize) {
                self.s.begin_index = Some(i);
            }
            pub fn step_index(&self) -> Option<usize> {
                self.s.step_index
            }
        }
    };
}

macro_rules! euler_scheduler_impl {
    () => {
        fn config(&self) -> &SchedulerConfig {
            &self.s.config
        }
        fn set_timesteps(&mut self, n: usize) -> Result<()> {
            self.s.set_timesteps(n)
        }
        fn timesteps(&self) -> &[i64] {
            &self.s.timesteps
        }
        fn model_timesteps(&self) -> Vec<f32> {
            self.s.timesteps_exact.clone()
        }
        fn init_noise_sigma(&self) -> f64 {
            self.s.init_noise_sigma()
        }
        fn scale_model_input(&mut self, sample: Tensor<4>, t: i64) -> Result<Tensor<4>> {
            self.s.scale_model_input(sample, t)
        }
    };
}

/// Euler's method on the probability-flow ODE (no churn: diffusers' defaults `s_churn = 0`).
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    s: Sigmas,
}

impl EulerDiscreteScheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        Ok(EulerDiscreteScheduler { s: Sigmas::new(config)? })
    }
}
euler_common!(EulerDiscreteScheduler);

impl Scheduler for EulerDiscreteScheduler {
    euler_scheduler_impl!();

    fn step(&mut self, model_output: Tensor<4>, t: i64, sample: Tensor<4>, _noise: Option<Tensor<4>>) -> Result<StepOutput> {
        let i = self.s.index(t)?;
        let (sigma, next) = (self.s.sigmas[i], self.s.sigmas[i + 1]);
        let x0 = match self.s.config.prediction_type {
            PredictionType::Sample => model_output,
            PredictionType::Epsilon => sample.clone() - model_output.mul_scalar(sigma),
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                model_output.mul_scalar(-sigma / s2.sqrt()) + sample.clone().div_scalar(s2)
            }
        };
        let derivative = (sample.clone() - x0.clone()).div_scalar(sigma);
        let prev = sample + derivative.mul_scalar(next - sigma);
        self.s.advance(i);
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
}

/// Euler steps down to `sigma_down`, then fresh noise of std `sigma_up` brings the sample
/// back to the next sigma; `noise` is required whenever `sigma_up > 0`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    s: Sigmas,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::param("prediction_type", "`sample` is not supported by EulerAncestral; supported: epsilon, v_prediction"));
        }
        Ok(EulerAncestralDiscreteScheduler { s: Sigmas::new(config)? })
    }
}
euler_common!(EulerAncestralDiscreteScheduler);

impl Scheduler for EulerAncestralDiscreteScheduler {
    euler_scheduler_impl!();

    fn step(&mut self, model_output: Tensor<4>, t: i64, sample: Tensor<4>, noise: Option<Tensor<4>>) -> Result<StepOutput> {
        let i = self.s.index(t)?;
        let (sigma, next) = (self.s.sigmas[i], self.s.sigmas[i + 1]);
        let x0 = match self.s.config.prediction_type {
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                model_output.mul_scalar(-sigma / s2.sqrt()) + sample.clone().div_scalar(s2)
            }
            _ => sample.clone() - model_output.mul_scalar(sigma),
        };
        let sigma_up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
        // Clamped so that rounding never takes the square root of a tiny negative number.
        let sigma_down = (next * next - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = (sample.clone() - x0.clone()).div_scalar(sigma);
        let mut prev = sample.clone() + derivative.mul_scalar(sigma_down - sigma);
        if sigma_up > 0.0 {
            prev = prev + need_noise(noise, &sample, "EulerAncestral")?.mul_scalar(sigma_up);
        }
        self.s.advance(i);
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
}
