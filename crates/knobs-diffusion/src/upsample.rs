//! diffusers `Upsample2D` (shared by the UNet and the VAE decoder): nearest-neighbour
//! upsampling, then a 3x3 conv.
use knobs_nn::burn::tensor::module::interpolate;
use knobs_nn::burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use knobs_nn::{Conv2d, Device, Init, Tensor, impl_module};

#[derive(Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}
impl_module!(Upsample2D { "conv" => conv });

impl Upsample2D {
    pub fn new(channels: usize, init: &mut Init, device: &Device) -> Self {
        Upsample2D { conv: Conv2d::new(channels, channels, 3, 1, 1, true, init, device) }
    }

    /// Nearest upsampling to `size`: twice the input in the usual case, the skip's size when
    /// a UNet input is not divisible by its total downsampling (diffusers' `upsample_size`).
    pub fn forward(&self, x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let up = if size == [2 * h, 2 * w] {
            knobs_nn::ops::nearest2x(x)
        } else {
            interpolate(x, InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size))
        };
        self.conv.forward(up)
    }
}
