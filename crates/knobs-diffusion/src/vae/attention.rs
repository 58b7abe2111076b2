//! The VAE mid-block self-attention over spatial positions: diffusers' `Attention` with a
//! GroupNorm in front, biased `to_q/to_k/to_v/to_out.0` and a residual connection. The SD VAE
//! uses one head as wide as the channels.
use knobs_nn::ops::attention;
use knobs_nn::{Device, GroupNorm, Init, Linear, Tensor, impl_module};

#[derive(Debug)]
pub struct VaeAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
}
impl_module!(VaeAttention {
    "group_norm" => group_norm, "to_q" => to_q, "to_k" => to_k, "to_v" => to_v, "to_out.0" => to_out,
});

impl VaeAttention {
    pub fn new(channels: usize, heads: usize, groups: usize, eps: f64, init: &mut Init, device: &Device) -> Self {
        assert!(heads > 0 && channels.is_multiple_of(heads), "channels must split evenly into heads");
        VaeAttention {
            group_norm: GroupNorm::new(groups, channels, eps, device),
            to_q: Linear::new(channels, channels, true, init, device),
            to_k: Linear::new(channels, channels, true, init, device),
            to_v: Linear::new(channels, channels, true, init, device),
            to_out: Linear::new(channels, channels, true, init, device),
            heads,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens: Tensor<3> = self.group_norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let q = self.to_q.forward(tokens.clone());
        let k = self.to_k.forward(tokens.clone());
        let v = self.to_v.forward(tokens);
        let scale = ((c / self.heads) as f64).powf(-0.5);
        let out = attention(q, k, v, self.heads, scale);
        let out: Tensor<4> = self.to_out.forward(out).swap_dims(1, 2).reshape([b, c, h, w]);
        out + x
    }
}
