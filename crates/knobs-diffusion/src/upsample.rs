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
        let [b, c, h, w] = x.dims();
        let up = if size == [2 * h, 2 * w] {
            // Each pixel repeated into a 2x2 block by broadcasting: exactly torch's nearest 2x.
            let blocks: Tensor<6> = x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]);
            blocks.reshape([b, c, 2 * h, 2 * w])
        } else {
            interpolate(x, InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size))
        };
        self.conv.forward(up)
    }
}
