//! Timestep conditioning: the fixed sinusoidal projection (`time_proj`, no parameters) and
//! the two-layer MLP on top of it (`time_embedding`).
use knobs_nn::ops::silu;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Device, Init, Linear, Tensor, impl_module};

/// diffusers `Timesteps`: `[B]` float timesteps -> `[B, dim]` sin/cos features.
#[derive(Debug, Clone)]
pub struct Timesteps {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl Timesteps {
    pub fn new(dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Self {
        Timesteps { dim, flip_sin_to_cos, freq_shift }
    }

    /// The frequencies `exp(-ln(10000) * i / (half - shift))`, computed in f32 step by step
    /// as PyTorch does: at t ~ 1000 one ulp of a frequency moves the phase by ~1e-4.
    fn frequencies(&self) -> Vec<f32> {
        let half = self.dim / 2;
        let denom = (half as f64 - self.freq_shift) as f32;
        let ln = -(10000f64.ln() as f32);
        (0..half).map(|i| (ln * i as f32 / denom).exp()).collect()
    }

    /// On the host: a handful of values, and a GPU's sine and cosine are approximations (Vulkan
    /// asks for 2^-11 absolute error, and only within [-pi, pi]) that put 9e-5 of error into
    /// these features at t ~ 1000 on an H200. The argument is the f32 product PyTorch forms;
    /// its sine taken in f64 and rounded is what a correctly rounded f32 sine gives.
    pub fn forward(&self, timesteps: Tensor<1>) -> Tensor<2> {
        let device = timesteps.device();
        let times = timesteps.to_data().convert::<f32>().try_into_vec::<f32>().expect("converted to f32");
        let freqs = self.frequencies();
        let mut features = Vec::with_capacity(times.len() * self.dim);
        for t in &times {
            let args = || freqs.iter().map(|f| (t * f) as f64);
            let (sin, cos) = (args().map(|a| a.sin() as f32), args().map(|a| a.cos() as f32));
            if self.flip_sin_to_cos {
                features.extend(cos.chain(sin));
            } else {
                features.extend(sin.chain(cos));
            }
            if self.dim % 2 == 1 {
                features.push(0.0);
            }
        }
        Tensor::from_data(TensorData::new(features, [times.len(), self.dim]), &device)
    }
}

/// diffusers `TimestepEmbedding` with SiLU and no conditioning projection.
#[derive(Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}
impl_module!(TimestepEmbedding { "linear_1" => linear_1, "linear_2" => linear_2 });

impl TimestepEmbedding {
    pub fn new(in_dim: usize, dim: usize, init: &mut Init, device: &Device) -> Self {
        TimestepEmbedding { linear_1: Linear::new(in_dim, dim, true, init, device), linear_2: Linear::new(dim, dim, true, init, device) }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}
