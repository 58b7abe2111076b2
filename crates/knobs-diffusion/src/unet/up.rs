//! `CrossAttnUpBlock2D` and `UpBlock2D`: each resnet takes the running features concatenated
//! with one skip from the down path (last in, first out), then an optional nearest 2x
//! upsampling followed by a 3x3 conv.
use knobs_nn::checkpoint::checkpointed_if;
use knobs_nn::{Device, Init, Tensor, impl_module};

use super::config::BlockPlan;
use super::down::BlockCommon;
use super::resnet::ResnetBlock2D;
use super::transformer::Transformer2DModel;
pub use crate::upsample::Upsample2D;

/// One up block; `attentions` is empty for `UpBlock2D`.
#[derive(Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Vec<Upsample2D>,
    /// Each resnet keeps only its inputs for the backward pass, which runs it again
    /// (`knobs_nn::checkpoint`).
    pub gradient_checkpointing: bool,
}
impl_module!(UpBlock { "resnets" => resnets, "attentions" => attentions, "upsamplers" => upsamplers });

impl UpBlock {
    /// `prev` is the width of the features coming from below, `skip_in` the width of the
    /// block's last skip (the down block one level up); the others carry `plan.channels`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(prev: usize, skip_in: usize, plan: &BlockPlan, upsample: bool, common: BlockCommon, init: &mut Init, device: &Device) -> Self {
        let c = plan.channels;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..plan.layers {
            let skip = if i == plan.layers - 1 { skip_in } else { c };
            let cin = if i == 0 { prev } else { c };
            resnets.push(ResnetBlock2D::new(cin + skip, c, common.temb, common.groups, common.eps, 1.0, init, device));
            if plan.cross_attn {
                attentions.push(Transformer2DModel::new(
                    c, plan.heads, plan.transformer_layers, plan.cross_attention_dim, common.groups,
                    common.use_linear_projection, init, device,
                ));
            }
        }
        let upsamplers = if upsample { vec![Upsample2D::new(c, init, device)] } else { Vec::new() };
        UpBlock { resnets, attentions, upsamplers, gradient_checkpointing: false }
    }

    /// Runs the block, popping one skip per resnet off `skips`.
    pub fn forward(&self, mut x: Tensor<4>, temb_act: &Tensor<2>, context: &Tensor<3>, skips: &mut Vec<Tensor<4>>) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("the UNet pushes one skip per up-block resnet");
            x = checkpointed_if(self.gradient_checkpointing, resnet, Tensor::cat(vec![x, skip], 1), temb_act, ResnetBlock2D::forward);
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x, context);
            }
        }
        for up in &self.upsamplers {
            let [h, w] = match skips.last() {
                Some(s) => [s.dims()[2], s.dims()[3]],
                None => [x.dims()[2] * 2, x.dims()[3] * 2],
            };
            x = up.forward(x, [h, w]);
        }
        x
    }
}
