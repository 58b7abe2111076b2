//! DDIMScheduler: deterministic (eta = 0) or partly stochastic sampling in few steps.
use std::path::Path;

use knobs_nn::{Error, Result, Tensor};

use super::config::{PredictionType, SchedulerConfig};
use super::schedule::{NoiseSchedule, integer_timesteps};
use super::{Scheduler, StepOutput, need_noise, pred_original};

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    /// The alpha-bar "before" the first training step: 1, or `alphas_cumprod[0]`.
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    num_inference_steps: Option<usize>,
    /// Weight of the fresh noise in each step: 0 is DDIM, 1 is DDPM-like.
    pub eta: f64,
    /// Re-derive the noise prediction from the clipped x0 (Glide), as diffusers' flag.
    pub use_clipped_model_output: bool,
}

impl DdimScheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let schedule = NoiseSchedule::from_config(&config);
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { schedule.alphas_cumprod[0] };
        let timesteps = (0..config.num_train_timesteps as i64).rev().collect();
        DdimScheduler {
            config,
            schedule,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps: None,
            eta: 0.0,
            use_clipped_model_output: false,
        }
    }

    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::new(SchedulerConfig::from_dir(dir)?))
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn acp_or_final(&self, t: i64) -> Result<f32> {
        if t >= 0 { self.schedule.acp(t) } else { Ok(self.final_alpha_cumprod) }
    }

    /// sigma_t(eta)^2 / eta^2 of formula (16) of the DDIM paper.
    fn variance(&self, t: i64, prev_t: i64) -> Result<f32> {
        let (acp_t, acp_prev) = (self.schedule.acp(t)?, self.acp_or_final(prev_t)?);
        Ok((1.0 - acp_prev) / (1.0 - acp_t) * (1.0 - acp_t / acp_prev))
    }
}

impl Scheduler for DdimScheduler {
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

    /// `noise` is needed only when `eta > 0`.
    fn step(&mut self, model_output: Tensor<4>, t: i64, sample: Tensor<4>, noise: Option<Tensor<4>>) -> Result<StepOutput> {
        let n = self
            .num_inference_steps
            .ok_or_else(|| Error::Invalid("DDIM: call set_timesteps before step".into()))?;
        // diffusers steps back by the leading stride whatever the spacing; kept for parity.
        let prev_t = t - (self.config.num_train_timesteps / n) as i64;
        let acp_t = self.schedule.acp(t)?;
        let acp_prev = self.acp_or_final(prev_t)?;
        let beta_t = 1.0 - acp_t;

        let pred = self.config.prediction_type;
        let mut x0 = pred_original(pred, model_output.clone(), sample.clone(), acp_t);
        let mut eps = match pred {
            PredictionType::Epsilon => model_output,
            PredictionType::Sample => (sample.clone() - x0.clone().mul_scalar(acp_t.sqrt())).div_scalar(beta_t.sqrt()),
            PredictionType::VPrediction => model_output.mul_scalar(acp_t.sqrt()) + sample.clone().mul_scalar(beta_t.sqrt()),
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0 = x0.clamp(-r, r);
        }
        let std_dev = self.eta as f32 * self.variance(t, prev_t)?.sqrt();
        if self.use_clipped_model_output {
            eps = (sample.clone() - x0.clone().mul_scalar(acp_t.sqrt())).div_scalar(beta_t.sqrt());
        }
        // Formula (12): x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.
        let direction = eps.mul_scalar((1.0 - acp_prev - std_dev * std_dev).sqrt());
        let mut prev = x0.clone().mul_scalar(acp_prev.sqrt()) + direction;
        if self.eta > 0.0 {
            prev = prev + need_noise(noise, &sample, "DDIM with eta > 0")?.mul_scalar(std_dev);
        }
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
}
