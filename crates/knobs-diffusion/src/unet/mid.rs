//! `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs, at the lowest resolution.
use knobs_nn::checkpoint::checkpointed_if;
use knobs_nn::{Device, Init, Tensor, impl_module};

use super::config::BlockPlan;
use super::down::BlockCommon;
use super::resnet::ResnetBlock2D;
use super::transformer::Transformer2DModel;

#[derive(Debug)]
pub struct UNetMidBlock2DCrossAttn {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    /// Each resnet keeps only its inputs for the backward pass, which runs it again
    /// (`knobs_nn::checkpoint`).
    pub gradient_checkpointing: bool,
}
impl_module!(UNetMidBlock2DCrossAttn { "resnets" => resnets, "attentions" => attentions });

impl UNetMidBlock2DCrossAttn {
    /// `plan` is the deepest down block's (its channels, heads and context width);
    /// diffusers builds one (transformer, resnet) pair.
    pub fn new(plan: &BlockPlan, output_scale_factor: f64, common: BlockCommon, init: &mut Init, device: &Device) -> Self {
        let c = plan.channels;
        let resnet = |init: &mut Init| ResnetBlock2D::new(c, c, common.temb, common.groups, common.eps, output_scale_factor, init, device);
        let first = resnet(init);
        let attn = Transformer2DModel::new(
            c, plan.heads, plan.transformer_layers, plan.cross_attention_dim, common.groups,
            common.use_linear_projection, init, device,
        );
        let second = resnet(init);
        UNetMidBlock2DCrossAttn { resnets: vec![first, second], attentions: vec![attn], gradient_checkpointing: false }
    }

    pub fn forward(&self, x: Tensor<4>, temb_act: &Tensor<2>, context: &Tensor<3>) -> Tensor<4> {
        let resnet = |r: &ResnetBlock2D, x| checkpointed_if(self.gradient_checkpointing, r, x, temb_act, ResnetBlock2D::forward);
        let mut x = resnet(&self.resnets[0], x);
        for (attn, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet(r, attn.forward(x, context));
        }
        x
    }
}
