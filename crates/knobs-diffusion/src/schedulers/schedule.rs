//! The noise schedule (betas, cumulative alphas) and the inference timestep spacings, shared
//! by every scheduler. Values are stored in f32 as torch keeps them, so that coefficients
//! derived from them round the same way diffusers' do.
use knobs_nn::{Error, Result, Tensor};

use super::config::{BetaSchedule, SchedulerConfig, TimestepSpacing};

#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
}

/// `n` evenly spaced values from `start` to `end` inclusive, as numpy/torch `linspace`.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = end;
    v
}

/// Glide's cosine schedule: betas from the ratio of consecutive alpha-bar values, capped.
fn squaredcos_cap_v2(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// Rescales betas so that the last timestep has zero SNR (arXiv 2305.08891, Algorithm 1).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut acp = 1.0f64;
    let mut sqrt_acp: Vec<f64> = betas
        .iter()
        .map(|&b| {
            acp *= 1.0 - b as f64;
            acp.sqrt()
        })
        .collect();
    let (first, last) = (sqrt_acp[0], sqrt_acp[sqrt_acp.len() - 1]);
    for s in &mut sqrt_acp {
        *s = (*s - last) * first / (first - last);
    }
    let acp: Vec<f64> = sqrt_acp.iter().map(|s| s * s).collect();
    (0..acp.len()).map(|i| (1.0 - if i == 0 { acp[0] } else { acp[i] / acp[i - 1] }) as f32).collect()
}

impl NoiseSchedule {
    pub fn from_config(cfg: &SchedulerConfig) -> Self {
        let n = cfg.num_train_timesteps;
        let betas64 = match (&cfg.trained_betas, cfg.beta_schedule) {
            (Some(b), _) => b.clone(),
            (None, BetaSchedule::Linear) => linspace(cfg.beta_start, cfg.beta_end, n),
            (None, BetaSchedule::ScaledLinear) => {
                linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n).into_iter().map(|b| b * b).collect()
            }
            (None, BetaSchedule::SquaredcosCapV2) => squaredcos_cap_v2(n),
        };
        let mut betas: Vec<f32> = betas64.into_iter().map(|b| b as f32).collect();
        if cfg.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        // torch's CPU cumprod multiplies the f32 alphas in double and rounds each prefix.
        let mut acc = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        NoiseSchedule { betas, alphas_cumprod }
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// `alphas_cumprod[t]`, with an error naming `t` when it lies outside the schedule.
    pub fn acp(&self, t: i64) -> Result<f32> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i).copied())
            .ok_or_else(|| Error::Invalid(format!("timestep {t} outside 0..{}", self.alphas_cumprod.len())))
    }

    /// `(sqrt(acp[t]), sqrt(1 - acp[t]))` per sample, in f32 as torch computes them.
    fn coefficients<const D: usize>(&self, timesteps: &[i64], like: &Tensor<D>) -> Result<(Tensor<D>, Tensor<D>)> {
        let acp = timesteps.iter().map(|&t| self.acp(t)).collect::<Result<Vec<_>>>()?;
        let a = super::per_sample(acp.iter().map(|a| a.sqrt()).collect(), like)?;
        let b = super::per_sample(acp.iter().map(|a| (1.0 - a).sqrt()).collect(), like)?;
        Ok((a, b))
    }

    /// The forward process: `sqrt(acp[t]) * original + sqrt(1 - acp[t]) * noise`, one
    /// timestep per sample of the batch.
    pub fn add_noise<const D: usize>(&self, original: Tensor<D>, noise: Tensor<D>, timesteps: &[i64]) -> Result<Tensor<D>> {
        let (a, b) = self.coefficients(timesteps, &original)?;
        Ok(original * a + noise * b)
    }

    /// The v-prediction target: `sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * sample`.
    pub fn get_velocity<const D: usize>(&self, sample: Tensor<D>, noise: Tensor<D>, timesteps: &[i64]) -> Result<Tensor<D>> {
        let (a, b) = self.coefficients(timesteps, &sample)?;
        Ok(noise * a - sample * b)
    }

    /// Signal-to-noise ratio `acp / (1 - acp)` per timestep (for min-SNR loss weighting),
    /// computed as diffusers' `compute_snr`: `(sqrt(acp) / sqrt(1 - acp))^2` in f32.
    pub fn snr(&self, timesteps: &[i64]) -> Result<Vec<f32>> {
        timesteps
            .iter()
            .map(|&t| {
                let a = self.acp(t)?;
                Ok((a.sqrt() / (1.0 - a).sqrt()).powi(2))
            })
            .collect()
    }
}

/// The descending inference timesteps for `n` steps before any rounding, as diffusers'
/// `set_timesteps` computes them (numpy float64 arithmetic, including its `arange` length).
pub fn spaced_timesteps(spacing: TimestepSpacing, num_train: usize, steps_offset: i64, n: usize) -> Result<Vec<f64>> {
    if n == 0 || n > num_train {
        return Err(Error::Invalid(format!(
            "num_inference_steps must be in 1..={num_train} (num_train_timesteps), got {n}"
        )));
    }
    let t = num_train as f64;
    Ok(match spacing {
        TimestepSpacing::Linspace => linspace(0.0, t - 1.0, n).into_iter().rev().collect(),
        TimestepSpacing::Leading => {
            let ratio = (num_train / n) as f64;
            (0..n).rev().map(|i| i as f64 * ratio + steps_offset as f64).collect()
        }
        TimestepSpacing::Trailing => {
            let step = -(t / n as f64);
            let len = ((0.0 - t) / step).ceil() as usize;
            (0..len).map(|i| (t + i as f64 * step).round_ties_even() - 1.0).collect()
        }
    })
}

/// The integer inference timesteps of DDPM and DDIM for `n` steps: the config's spacing
/// (leading when unset), rounded as numpy's `round` does (ties to even).
pub fn integer_timesteps(config: &SchedulerConfig, n: usize) -> Result<Vec<i64>> {
    let spacing = config.spacing_or(TimestepSpacing::Leading);
    let values = spaced_timesteps(spacing, config.num_train_timesteps, config.steps_offset, n)?;
    Ok(values.iter().map(|v| v.round_ties_even() as i64).collect())
}
