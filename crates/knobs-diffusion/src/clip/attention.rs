//! CLIP's multi-head self-attention (`CLIPAttention`), causal as the text encoder uses it.
use knobs_nn::burn::tensor::module::attention;
use knobs_nn::burn::tensor::ops::AttentionModuleOptions;
use knobs_nn::{Device, Init, Linear, Tensor, impl_module};

use super::config::ClipTextConfig;

#[derive(Debug, Clone)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}
impl_module!(ClipAttention { "q_proj" => q_proj, "k_proj" => k_proj, "v_proj" => v_proj, "out_proj" => out_proj });

impl ClipAttention {
    pub fn new(cfg: &ClipTextConfig, init: &mut Init, device: &Device) -> Self {
        let d = cfg.hidden_size;
        ClipAttention {
            q_proj: Linear::new(d, d, true, init, device),
            k_proj: Linear::new(d, d, true, init, device),
            v_proj: Linear::new(d, d, true, init, device),
            out_proj: Linear::new(d, d, true, init, device),
            heads: cfg.num_attention_heads,
        }
    }

    /// `[B, S, D] -> [B, S, D]`; position i sees positions 0..=i only. The fused op scales
    /// by head_dim^-0.5, as transformers does.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let split = |t: Tensor<3>| t.reshape([b, s, self.heads, d / self.heads]).swap_dims(1, 2);
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
        let y = attention(q, k, v, None, None, options);
        self.out_proj.forward(y.swap_dims(1, 2).reshape([b, s, d]))
    }
}
