//! Noise schedulers with diffusers' semantics: DDPM (training: `add_noise`, `get_velocity`,
//! `snr`; ancestral sampling), DDIM, Euler and Euler-ancestral sampling. All read the same
//! `scheduler_config.json` ([`SchedulerConfig`]); sampling goes through the [`Scheduler`] trait.
//!
//! Randomness is never drawn here: steps that need noise take it as an argument, so a sampling
//! loop is reproducible from the caller's seed and matches a reference given the same noise.
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod euler;
pub mod schedule;

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing, VarianceType};
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use euler::{EulerAncestralDiscreteScheduler, EulerDiscreteScheduler};
pub use schedule::NoiseSchedule;

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Error, Result, Tensor};

/// What one denoising step returns, as diffusers' `SchedulerOutput`.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub prev_sample: Tensor<4>,
    pub pred_original_sample: Tensor<4>,
}

/// The sampling interface a pipeline drives:
/// ```ignore
/// sched.set_timesteps(n)?;
/// let mut x = noise * sched.init_noise_sigma();
/// for (i, &t) in sched.timesteps().to_vec().iter().enumerate() {
///     let inp = sched.scale_model_input(x.clone(), t)?;
///     let eps = unet(inp, sched.model_timesteps()[i]);
///     x = sched.step(eps, t, x, noise_for_step)?.prev_sample;
/// }
/// ```
pub trait Scheduler {
    fn config(&self) -> &SchedulerConfig;
    /// Chooses the `num_inference_steps` timesteps of the sampling chain.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The chain's timesteps, descending (for Euler with `linspace` spacing these are the
    /// fractional timesteps rounded; [`Scheduler::model_timesteps`] has the exact values).
    fn timesteps(&self) -> &[i64];
    /// The timestep values diffusers hands the denoising model at each step.
    fn model_timesteps(&self) -> Vec<f32> {
        self.timesteps().iter().map(|&t| t as f32).collect()
    }
    /// The standard deviation of the initial noise: multiply unit Gaussian latents by it.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The model input for timestep `t` (identity except for sigma-based schedulers).
    fn scale_model_input(&mut self, sample: Tensor<4>, _t: i64) -> Result<Tensor<4>> {
        Ok(sample)
    }
    /// One step from `t` to the previous timestep. `noise` (unit Gaussian, shaped like `sample`)
    /// is needed only by stochastic steps; those return an error without it.
    fn step(&mut self, model_output: Tensor<4>, t: i64, sample: Tensor<4>, noise: Option<Tensor<4>>) -> Result<StepOutput>;
}

/// `values[b]` as a tensor shaped `[B, 1, 1, ...]` on `like`'s device, to scale each sample of
/// a batch by its own coefficient.
pub(crate) fn per_sample<const D: usize>(values: Vec<f32>, like: &Tensor<D>) -> Result<Tensor<D>> {
    let batch = like.dims()[0];
    if values.len() != batch {
        return Err(Error::Invalid(format!("{} timesteps given for a batch of {batch}", values.len())));
    }
    let mut shape = [1usize; D];
    shape[0] = batch;
    Ok(Tensor::from_data(TensorData::new(values, shape), &like.device()))
}

/// Checks that a noise tensor has the sample's shape.
pub(crate) fn need_noise(noise: Option<Tensor<4>>, sample: &Tensor<4>, who: &str) -> Result<Tensor<4>> {
    let noise = noise.ok_or_else(|| Error::Invalid(format!("{who}: this step is stochastic and needs a noise tensor")))?;
    if noise.dims() != sample.dims() {
        return Err(Error::Invalid(format!("{who}: noise shape {:?} differs from sample shape {:?}", noise.dims(), sample.dims())));
    }
    Ok(noise)
}

/// The predicted clean sample from a model output at cumulative alpha `acp`.
pub(crate) fn pred_original(pred: PredictionType, model_output: Tensor<4>, sample: Tensor<4>, acp: f32) -> Tensor<4> {
    let (a, b) = (acp.sqrt(), (1.0 - acp).sqrt());
    match pred {
        PredictionType::Epsilon => (sample - model_output.mul_scalar(b)).div_scalar(a),
        PredictionType::Sample => model_output,
        PredictionType::VPrediction => sample.mul_scalar(a) - model_output.mul_scalar(b),
    }
}
