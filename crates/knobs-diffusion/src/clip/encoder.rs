//! The pre-LayerNorm transformer stack (`CLIPEncoder`, `CLIPEncoderLayer`, `CLIPMLP`).
use knobs_nn::burn::tensor::activation::sigmoid;
use knobs_nn::checkpoint::checkpointed_if;
use knobs_nn::ops::gelu;
use knobs_nn::{Device, Init, LayerNorm, Linear, Tensor, impl_module};

use super::attention::ClipAttention;
use super::config::{Activation, ClipTextConfig};

#[derive(Debug, Clone)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Activation,
}
impl_module!(ClipMlp { "fc1" => fc1, "fc2" => fc2 });

impl ClipMlp {
    pub fn new(cfg: &ClipTextConfig, act: Activation, init: &mut Init, device: &Device) -> Self {
        ClipMlp {
            fc1: Linear::new(cfg.hidden_size, cfg.intermediate_size, true, init, device),
            fc2: Linear::new(cfg.intermediate_size, cfg.hidden_size, true, init, device),
            act,
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.fc1.forward(x);
        let h = match self.act {
            Activation::QuickGelu => h.clone() * sigmoid(h * 1.702),
            Activation::Gelu => gelu(h),
        };
        self.fc2.forward(h)
    }
}

#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}
impl_module!(ClipEncoderLayer {
    "self_attn" => self_attn,
    "layer_norm1" => layer_norm1,
    "mlp" => mlp,
    "layer_norm2" => layer_norm2,
});

impl ClipEncoderLayer {
    pub fn new(cfg: &ClipTextConfig, act: Activation, init: &mut Init, device: &Device) -> Self {
        ClipEncoderLayer {
            self_attn: ClipAttention::new(cfg, init, device),
            layer_norm1: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, device),
            mlp: ClipMlp::new(cfg, act, init, device),
            layer_norm2: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, device),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

#[derive(Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
    /// Each layer keeps only its input for the backward pass, which runs it again
    /// (`knobs_nn::checkpoint`; transformers' `gradient_checkpointing_enable`).
    pub gradient_checkpointing: bool,
}
impl_module!(ClipEncoder { "layers" => layers });

impl ClipEncoder {
    pub fn new(cfg: &ClipTextConfig, act: Activation, init: &mut Init, device: &Device) -> Self {
        ClipEncoder { layers: (0..cfg.num_hidden_layers).map(|_| ClipEncoderLayer::new(cfg, act, init, device)).collect(), gradient_checkpointing: false }
    }

    /// Runs the first `n` layers and returns the input followed by each layer's output, as
    /// transformers' `hidden_states` (so `n + 1` tensors).
    pub fn forward_layers(&self, x: Tensor<3>, n: usize) -> Vec<Tensor<3>> {
        let mut states = Vec::with_capacity(n + 1);
        // A layer takes nothing beside its input: the block's second tensor is an empty one.
        let nothing = Tensor::<1>::empty([0], &x.device());
        states.push(x);
        for layer in self.layers.iter().take(n) {
            let next = checkpointed_if(self.gradient_checkpointing, layer, states.last().unwrap().clone(), &nothing, |l, x, _| l.forward(x));
            states.push(next);
        }
        states
    }
}
