//! DDPMScheduler: the training-side scheduler (noising, v-targets, SNR) and ancestral sampling.
use std::path::Path;

use knobs_nn::{Error, Result, Tensor};

use super::config::{PredictionType, SchedulerConfig, VarianceType};
use super::schedule::{NoiseSchedule, integer_timesteps};
use super::{Scheduler, StepOutput, need_noise, pred_original};

#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<i64>,
    num_inference_steps: Option<usize>,
}

impl DdpmScheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let schedule = NoiseSchedule::from_config(&config);
        let timesteps = (0..config.num_train_timesteps as i64).rev().collect();
        DdpmScheduler { config, schedule, timesteps, num_inference_steps: None }
    }

    /// From a pipeline's `scheduler` folder, as `DDPMScheduler.from_pretrained(.., subfolder="scheduler")`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::new(SchedulerConfig::from_dir(dir)?))
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
    pub fn betas(&self) -> &[f32] {
        &self.schedule.betas
    }
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }
    pub fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    /// Noisy samples at `timesteps` (one per sample): the model input during training.
    pub fn add_noise<const D: usize>(&self, original: Tensor<D>, noise: Tensor<D>, timesteps: &[i64]) -> Result<Tensor<D>> {
        self.schedule.add_noise(original, noise, timesteps)
    }

    pub fn get_velocity<const D: usize>(&self, sample: Tensor<D>, noise: Tensor<D>, timesteps: &[i64]) -> Result<Tensor<D>> {
        self.schedule.get_velocity(sample, noise, timesteps)
    }

    /// `alphas_cumprod / (1 - alphas_cumprod)` at each timestep.
    pub fn snr(&self, timesteps: &[i64]) -> Result<Vec<f32>> {
        self.schedule.snr(timesteps)
    }

    /// The regression target of a training step for this config's `prediction_type`:
    /// the noise, the velocity or the clean latents.
    pub fn training_target<const D: usize>(&self, latents: Tensor<D>, noise: Tensor<D>, timesteps: &[i64]) -> Result<Tensor<D>> {
        match self.config.prediction_type {
            PredictionType::Epsilon => Ok(noise),
            PredictionType::VPrediction => self.get_velocity(latents, noise, timesteps),
            PredictionType::Sample => Ok(latents),
        }
    }

    /// The timestep that follows `t` in the chain; -1 after the last.
    pub fn previous_timestep(&self, t: i64) -> Result<i64> {
        if self.num_inference_steps.is_none() {
            return Ok(t - 1);
        }
        let i = self
            .timesteps
            .iter()
            .position(|&x| x == t)
            .ok_or_else(|| Error::Invalid(format!("DDPM: timestep {t} is not in the schedule {:?}", self.timesteps)))?;
        Ok(self.timesteps.get(i + 1).copied().unwrap_or(-1))
    }
}

impl Scheduler for DdpmScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.timesteps = integer_timesteps(&self.config, n)?;
        self.num_inference_steps = Some(n);
        Ok(())
    }

    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// Ancestral step; `noise` is required for every `t > 0` (the last step adds none).
    fn step(&mut self, model_output: Tensor<4>, t: i64, sample: Tensor<4>, noise: Option<Tensor<4>>) -> Result<StepOutput> {
        let prev_t = self.previous_timestep(t)?;
        let acp_t = self.schedule.acp(t)?;
        let acp_prev = if prev_t >= 0 { self.schedule.acp(prev_t)? } else { 1.0 };
        let (beta_t, beta_prev) = (1.0 - acp_t, 1.0 - acp_prev);
        let alpha_t = acp_t / acp_prev;
        let current_beta = 1.0 - alpha_t;

        let mut x0 = pred_original(self.config.prediction_type, model_output, sample.clone(), acp_t);
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0 = x0.clamp(-r, r);
        }
        // Posterior mean of q(x_{t-1} | x_t, x_0), eq. (7) of the DDPM paper.
        let x0_coeff = acp_prev.sqrt() * current_beta / beta_t;
        let xt_coeff = alpha_t.sqrt() * beta_prev / beta_t;
        let mut prev = x0.clone().mul_scalar(x0_coeff) + sample.clone().mul_scalar(xt_coeff);
        if t > 0 {
            let noise = need_noise(noise, &sample, "DDPM")?;
            let variance = match self.config.variance_type {
                VarianceType::FixedSmall => (beta_prev / beta_t * current_beta).max(1e-20),
                VarianceType::FixedLarge => current_beta,
            };
            prev = prev + noise.mul_scalar(variance.sqrt());
        }
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
}
