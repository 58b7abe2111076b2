//! The VAE decoder: latents -> image, doubling the resolution in every block but the last.
use knobs_nn::{Conv2d, Device, GroupNorm, Init, Tensor, impl_module};

use super::config::VaeConfig;
use super::mid_block::MidBlock2D;
use super::resnet::ResnetBlock2D;
use crate::upsample::Upsample2D;

#[derive(Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsampler: Option<Upsample2D>,
}
impl_module!(UpDecoderBlock2D { "resnets" => resnets, "upsamplers.0" => upsampler });

impl UpDecoderBlock2D {
    pub fn forward(&self, mut x: Tensor<4>) -> Tensor<4> {
        for r in &self.resnets {
            x = r.forward(x);
        }
        match &self.upsampler {
            Some(u) => {
                let [_, _, h, w] = x.dims();
                u.forward(x, [2 * h, 2 * w])
            }
            None => x,
        }
    }
}

#[derive(Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock2D,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}
impl_module!(Decoder {
    "conv_in" => conv_in, "mid_block" => mid_block, "up_blocks" => up_blocks,
    "conv_norm_out" => conv_norm_out, "conv_out" => conv_out,
});

impl Decoder {
    pub fn new(cfg: &VaeConfig, init: &mut Init, device: &Device) -> Self {
        let (g, eps) = (cfg.norm_num_groups, 1e-6);
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let conv_in = Conv2d::new(cfg.latent_channels, rev[0], 3, 1, 1, true, init, device);
        let mid_block = MidBlock2D::new(rev[0], g, cfg.mid_block_add_attention, init, device);
        let mut up_blocks = Vec::new();
        let mut c_prev = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            // Decoder blocks have one resnet more than encoder blocks.
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock2D::new(if j == 0 { c_prev } else { c }, c, g, eps, init, device))
                .collect();
            let upsampler = (i + 1 < rev.len()).then(|| Upsample2D::new(c, init, device));
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
            c_prev = c;
        }
        let last = *rev.last().unwrap();
        Decoder {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(g, last, eps, device),
            conv_out: Conv2d::new(last, cfg.out_channels, 3, 1, 1, true, init, device),
        }
    }

    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut h = self.mid_block.forward(self.conv_in.forward(z));
        for b in &self.up_blocks {
            h = b.forward(h);
        }
        self.conv_out.forward(self.conv_norm_out.forward_silu(h))
    }
}
