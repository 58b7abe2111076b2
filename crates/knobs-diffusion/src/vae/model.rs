//! AutoencoderKL: encoder + `quant_conv` to a diagonal Gaussian over latents, and
//! `post_quant_conv` + decoder back to images. Parameter paths equal diffusers' keys.
use std::path::Path;

use knobs_nn::burn::tensor::DType;
use knobs_nn::io::{LoadOptions, load_file};
use knobs_nn::ops::autocast;
use knobs_nn::param::{f32_value, value_as};
use knobs_nn::{Conv2d, Device, Error, Init, Result, Tensor, impl_module};

use super::config::VaeConfig;
use super::decoder::Decoder;
use super::encoder::Encoder;

/// The weights file of a diffusers component folder.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

#[derive(Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    pub config: VaeConfig,
    /// What encode and decode compute in: f32, or bf16 under `--mixed-precision bf16`, as
    /// diffusers' training scripts cast the frozen VAE to the weight dtype (not fp16, whose
    /// range SD's VAE overflows). Inputs and results stay f32. Without autodiff on the CPU,
    /// bf16 keeps f32 activations and rounds the products only (`autocast::plan`).
    pub compute_dtype: DType,
}
impl_module!(AutoencoderKL {
    "encoder" => encoder, "decoder" => decoder, "quant_conv" => quant_conv, "post_quant_conv" => post_quant_conv,
});

/// The encoder's posterior `N(mean, exp(logvar))` per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor<4>,
    /// Clamped to [-30, 20] as diffusers does, so that `exp` stays finite.
    pub logvar: Tensor<4>,
}

impl DiagonalGaussian {
    /// Splits `[B, 2L, H, W]` moments into mean and log-variance along the channels.
    pub fn from_moments(moments: Tensor<4>) -> Self {
        let mut halves = moments.chunk(2, 1);
        let logvar = halves.pop().unwrap().clamp(-30.0, 20.0);
        DiagonalGaussian { mean: halves.pop().unwrap(), logvar }
    }
    pub fn std(&self) -> Tensor<4> {
        self.logvar.clone().mul_scalar(0.5).exp()
    }
    pub fn var(&self) -> Tensor<4> {
        self.logvar.clone().exp()
    }
    /// `mean + std * noise` for unit Gaussian `noise` (reparameterised, so gradients reach
    /// the encoder).
    pub fn sample(&self, noise: Tensor<4>) -> Tensor<4> {
        self.mean.clone() + self.std() * noise
    }
    pub fn mode(&self) -> Tensor<4> {
        self.mean.clone()
    }
    /// KL divergence to N(0, I), summed over each sample's latent elements: `[B]`.
    pub fn kl(&self) -> Tensor<1> {
        let [b, ..] = self.mean.dims();
        let terms = self.mean.clone().powi_scalar(2) + self.var() - self.logvar.clone().add_scalar(1.0);
        let per: Tensor<2> = terms.reshape([b as i64, -1]);
        per.sum_dim(1).mul_scalar(0.5).reshape([b])
    }
}

impl AutoencoderKL {
    /// A randomly initialised model (PyTorch default init, GroupNorm ones/zeros).
    pub fn new(config: VaeConfig, init: &mut Init, device: &Device) -> Result<Self> {
        config.validate()?;
        let lat = config.latent_channels;
        Ok(AutoencoderKL {
            encoder: Encoder::new(&config, init, device),
            decoder: Decoder::new(&config, init, device),
            quant_conv: config.use_quant_conv.then(|| Conv2d::new(2 * lat, 2 * lat, 1, 1, 0, true, init, device)),
            post_quant_conv: config.use_post_quant_conv.then(|| Conv2d::new(lat, lat, 1, 1, 0, true, init, device)),
            config,
            compute_dtype: DType::F32,
        })
    }

    /// Loads a diffusers `vae` folder (`config.json` + `diffusion_pytorch_model.safetensors`).
    /// Missing or unexpected tensors are errors naming the file and key.
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_dir_as(dir, device, DType::F32)
    }

    /// [`Self::from_dir`] with the weight matrices and kernels stored in `weights` as they
    /// load (see [`knobs_nn::ParamMut::assign_as`]).
    pub fn from_dir_as(dir: impl AsRef<Path>, device: &Device, weights: DType) -> Result<Self> {
        let dir = dir.as_ref();
        let config = VaeConfig::from_file(dir.join("config.json"))?;
        let file = dir.join(WEIGHTS_FILE);
        if !file.is_file() {
            return Err(Error::file(&file, "weights file not found"));
        }
        let mut model = Self::new(config, &mut Init::for_loading(), device)?;
        load_file(&mut model, &file, LoadOptions::frozen_as(weights))?;
        Ok(model)
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }
    pub fn shift_factor(&self) -> Option<f64> {
        self.config.shift_factor
    }

    /// The posterior over latents of images in [-1, 1], `[B, C, H, W]` with H, W divisible
    /// by the downscale factor.
    pub fn encode(&self, x: Tensor<4>) -> DiagonalGaussian {
        let (dtype, products) = autocast::plan(self.compute_dtype, &x);
        let moments = autocast::with_products(products, || {
            let moments = self.encoder.forward(value_as(&x, dtype));
            match &self.quant_conv {
                Some(q) => q.forward(moments),
                None => moments,
            }
        });
        let posterior = DiagonalGaussian::from_moments(f32_value(&moments));
        // Its large activations are gone; the UNet's step, next, needs none of their blocks.
        knobs_nn::allocator::release_kept();
        posterior
    }

    /// Images (roughly in [-1, 1]) from unscaled latents.
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let (dtype, products) = autocast::plan(self.compute_dtype, &z);
        let images = autocast::with_products(products, || {
            let z = value_as(&z, dtype);
            let z = match &self.post_quant_conv {
                Some(p) => p.forward(z),
                None => z,
            };
            f32_value(&self.decoder.forward(z))
        });
        knobs_nn::allocator::release_kept();
        images
    }

    /// Latents as the UNet sees them: `(z - shift) * scaling_factor`.
    pub fn scale_latents(&self, z: Tensor<4>) -> Tensor<4> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        z.sub_scalar(shift).mul_scalar(self.config.scaling_factor)
    }

    /// The inverse of [`AutoencoderKL::scale_latents`], before `decode`.
    pub fn unscale_latents(&self, z: Tensor<4>) -> Tensor<4> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        z.div_scalar(self.config.scaling_factor).add_scalar(shift)
    }
}
