//! The VAE encoder: image -> `2 * latent_channels` moments (mean and log-variance).
use knobs_nn::burn::tensor::ops::PadMode;
use knobs_nn::{Conv2d, Device, GroupNorm, Init, Tensor, impl_module};

use super::config::VaeConfig;
use super::mid_block::MidBlock2D;
use super::resnet::ResnetBlock2D;

/// Halves the resolution with a stride-2 3x3 conv. diffusers builds the VAE's with padding 0
/// and pads right and bottom by one first, so the window grid is not centred as with padding 1.
#[derive(Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
}
impl_module!(Downsample2D { "conv" => conv });

impl Downsample2D {
    pub fn new(channels: usize, init: &mut Init, device: &Device) -> Self {
        Downsample2D { conv: Conv2d::new(channels, channels, 3, 2, 0, true, init, device) }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        // (left, right, top, bottom)
        self.conv.forward(x.pad((0, 1, 0, 1), PadMode::Constant(0.0)))
    }
}

#[derive(Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
}
impl_module!(DownEncoderBlock2D { "resnets" => resnets, "downsamplers.0" => downsampler });

impl DownEncoderBlock2D {
    pub fn forward(&self, mut x: Tensor<4>) -> Tensor<4> {
        for r in &self.resnets {
            x = r.forward(x);
        }
        match &self.downsampler {
            Some(d) => d.forward(x),
            None => x,
        }
    }
}

#[derive(Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: MidBlock2D,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}
impl_module!(Encoder {
    "conv_in" => conv_in, "down_blocks" => down_blocks, "mid_block" => mid_block,
    "conv_norm_out" => conv_norm_out, "conv_out" => conv_out,
});

impl Encoder {
    pub fn new(cfg: &VaeConfig, init: &mut Init, device: &Device) -> Self {
        let (ch, g, eps) = (&cfg.block_out_channels, cfg.norm_num_groups, 1e-6);
        let conv_in = Conv2d::new(cfg.in_channels, ch[0], 3, 1, 1, true, init, device);
        let mut down_blocks = Vec::new();
        let mut c_prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock2D::new(if j == 0 { c_prev } else { c }, c, g, eps, init, device))
                .collect();
            let downsampler = (i + 1 < ch.len()).then(|| Downsample2D::new(c, init, device));
            down_blocks.push(DownEncoderBlock2D { resnets, downsampler });
            c_prev = c;
        }
        let top = *ch.last().unwrap();
        Encoder {
            conv_in,
            down_blocks,
            mid_block: MidBlock2D::new(top, g, cfg.mid_block_add_attention, init, device),
            conv_norm_out: GroupNorm::new(g, top, eps, device),
            conv_out: Conv2d::new(top, 2 * cfg.latent_channels, 3, 1, 1, true, init, device),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = self.conv_in.forward(x);
        for b in &self.down_blocks {
            h = b.forward(h);
        }
        h = self.mid_block.forward(h);
        self.conv_out.forward(self.conv_norm_out.forward_silu(h))
    }
}
