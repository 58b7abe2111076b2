//! UNetMidBlock2D without time embedding: resnet, then (attention, resnet) pairs.
use knobs_nn::{Device, Init, Tensor, impl_module};

use super::attention::VaeAttention;
use super::resnet::ResnetBlock2D;

#[derive(Debug)]
pub struct MidBlock2D {
    /// Empty when the config sets `mid_block_add_attention: false`.
    pub attentions: Vec<VaeAttention>,
    pub resnets: Vec<ResnetBlock2D>,
}
impl_module!(MidBlock2D { "attentions" => attentions, "resnets" => resnets });

impl MidBlock2D {
    pub fn new(channels: usize, groups: usize, add_attention: bool, init: &mut Init, device: &Device) -> Self {
        let eps = 1e-6;
        let resnet0 = ResnetBlock2D::new(channels, channels, groups, eps, init, device);
        // diffusers passes attention_head_dim = channels, hence a single head.
        let attentions = if add_attention { vec![VaeAttention::new(channels, 1, groups, eps, init, device)] } else { vec![] };
        let resnet1 = ResnetBlock2D::new(channels, channels, groups, eps, init, device);
        MidBlock2D { attentions, resnets: vec![resnet0, resnet1] }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = self.resnets[0].forward(x);
        if let Some(attn) = self.attentions.first() {
            h = attn.forward(h);
        }
        self.resnets[1].forward(h)
    }
}
