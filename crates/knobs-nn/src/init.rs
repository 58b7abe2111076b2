//! Seeded initialisation drawn on the CPU, so that a seed gives the same weights on every
//! backend and every run.
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal, Uniform};

pub struct Init {
    rng: StdRng,
    /// False: `uniform` and `normal` give zeros (see [`Init::for_loading`]).
    draw: bool,
}

impl Init {
    pub fn new(seed: u64) -> Self {
        Init { rng: StdRng::seed_from_u64(seed), draw: true }
    }

    /// Zeros instead of random draws, for a model whose every weight is about to be loaded
    /// from a file: drawing SD-1.5's 860M values would take seconds, and the placeholders
    /// cost neither time nor memory (see [`Init::placeholder`]).
    pub fn for_loading() -> Self {
        Init { rng: StdRng::seed_from_u64(0), draw: false }
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    fn tensor<const D: usize>(shape: [usize; D], values: Vec<f32>, device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// Zeros that hold no memory: one zero broadcast to `shape` (a view with zero strides),
    /// which shapes, dtypes and reads see as the full tensor, on every backend. A zeroed
    /// vector per weight, as before on the CPU, was mapped lazily but left its untouched
    /// blocks in the heap as it was replaced: a load that followed freed memory (the UNet's
    /// once the text encoders are released) then placed tensors there rather than in the
    /// pages already faulted in, 1.5 GB more resident for SDXL's UNet. (`Tensor::zeros`
    /// writes every value: on the CPU 3.4 GB for SD-1.5's UNet, a third of its load time; on
    /// a GPU the whole model in f32 beside the weights that replace it.)
    fn placeholder<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::<D>::zeros([1; D], device).expand(shape)
    }

    /// Uniform in `[-bound, bound)`.
    pub fn uniform<const D: usize>(&mut self, shape: [usize; D], bound: f64, device: &Device) -> Tensor<D> {
        if !self.draw {
            return Self::placeholder(shape, device);
        }
        let n = shape.iter().product();
        let dist = Uniform::new(-bound as f32, bound as f32).unwrap();
        let values = (0..n).map(|_| dist.sample(&mut self.rng)).collect();
        Self::tensor(shape, values, device)
    }

    /// Normal with mean 0.
    pub fn normal<const D: usize>(&mut self, shape: [usize; D], std: f64, device: &Device) -> Tensor<D> {
        if !self.draw {
            return Self::placeholder(shape, device);
        }
        let n = shape.iter().product();
        let dist = Normal::new(0.0f32, std as f32).unwrap();
        let values = (0..n).map(|_| dist.sample(&mut self.rng)).collect();
        Self::tensor(shape, values, device)
    }

    /// Standard normal values (for noise) as a plain vector.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        let dist = Normal::new(0.0f32, 1.0).unwrap();
        (0..n).map(|_| dist.sample(&mut self.rng)).collect()
    }

    pub fn next_u64(&mut self) -> u64 {
        self.rng.random()
    }
}
