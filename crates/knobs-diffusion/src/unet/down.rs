//! `CrossAttnDownBlock2D` and `DownBlock2D`: resnets (each followed by a transformer in the
//! cross-attention kind), then an optional stride-2 conv. Every layer's output is kept as a
//! skip connection for the up path.
use knobs_nn::burn::tensor::ops::PadMode;
use knobs_nn::checkpoint::checkpointed_if;
use knobs_nn::{Conv2d, Device, Init, Tensor, impl_module};

use super::config::BlockPlan;
use super::resnet::ResnetBlock2D;
use super::transformer::Transformer2DModel;

/// diffusers `Downsample2D` with a conv. With `padding` 0 diffusers pads right and bottom by
/// one first, so both paddings halve even sizes exactly.
#[derive(Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
}
impl_module!(Downsample2D { "conv" => conv });

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, init: &mut Init, device: &Device) -> Self {
        Downsample2D { conv: Conv2d::new(channels, channels, 3, 2, padding, true, init, device) }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        if self.conv.padding == 0 {
            return self.conv.forward(x.pad((0, 1, 0, 1), PadMode::Constant(0.0)));
        }
        self.conv.forward(x)
    }
}

/// Settings shared by every block of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct BlockCommon {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub use_linear_projection: bool,
}

/// One down block; `attentions` is empty for `DownBlock2D`.
#[derive(Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Vec<Downsample2D>,
    /// Each resnet keeps only its inputs for the backward pass, which runs it again
    /// (`knobs_nn::checkpoint`).
    pub gradient_checkpointing: bool,
}
impl_module!(DownBlock { "resnets" => resnets, "attentions" => attentions, "downsamplers" => downsamplers });

impl DownBlock {
    pub fn new(c_in: usize, plan: &BlockPlan, downsample: Option<usize>, common: BlockCommon, init: &mut Init, device: &Device) -> Self {
        let c = plan.channels;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..plan.layers {
            let cin = if i == 0 { c_in } else { c };
            resnets.push(ResnetBlock2D::new(cin, c, common.temb, common.groups, common.eps, 1.0, init, device));
            if plan.cross_attn {
                attentions.push(Transformer2DModel::new(
                    c, plan.heads, plan.transformer_layers, plan.cross_attention_dim, common.groups,
                    common.use_linear_projection, init, device,
                ));
            }
        }
        let downsamplers = downsample.map(|pad| Downsample2D::new(c, pad, init, device)).into_iter().collect();
        DownBlock { resnets, attentions, downsamplers, gradient_checkpointing: false }
    }

    /// Runs the block, pushing each layer's output onto `skips`.
    pub fn forward(&self, mut x: Tensor<4>, temb_act: &Tensor<2>, context: &Tensor<3>, skips: &mut Vec<Tensor<4>>) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = checkpointed_if(self.gradient_checkpointing, resnet, x, temb_act, ResnetBlock2D::forward);
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x, context);
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        x
    }
}
