//! diffusers `Attention` (the default processor): multi-head scaled dot-product attention,
//! self-attention when no context is given, cross-attention over `context` otherwise.
use knobs_nn::ops::attention;
use knobs_nn::{Device, Init, Linear, Tensor, impl_module};

#[derive(Debug, Clone)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// `to_out.0` in the checkpoint (`to_out.1` is a dropout without parameters).
    pub to_out: Linear,
    pub heads: usize,
    pub scale: f64,
}
impl_module!(Attention { "to_q" => to_q, "to_k" => to_k, "to_v" => to_v, "to_out.0" => to_out });

impl Attention {
    /// `context_dim` is the width of the context for cross-attention (`None`: self-attention).
    /// `qkv_bias` is diffusers' `bias` (false in UNet blocks); `to_out` always has a bias.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        qkv_bias: bool,
        init: &mut Init,
        device: &Device,
    ) -> Self {
        let inner = heads * dim_head;
        let kv_dim = context_dim.unwrap_or(query_dim);
        Attention {
            to_q: Linear::new(query_dim, inner, qkv_bias, init, device),
            to_k: Linear::new(kv_dim, inner, qkv_bias, init, device),
            to_v: Linear::new(kv_dim, inner, qkv_bias, init, device),
            to_out: Linear::new(inner, query_dim, true, init, device),
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
        }
    }

    /// Keys and values `[B, M, inner]` from the context. The one place K/V are computed, so
    /// that a method conditioning them (e.g. a context hypernetwork) has a single hook.
    pub fn key_value(&self, context: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        (self.to_k.forward(context.clone()), self.to_v.forward(context))
    }

    /// `hidden` `[B, N, query_dim]`, `context` `[B, M, context_dim]` -> `[B, N, query_dim]`.
    pub fn forward(&self, hidden: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        self.to_out.forward(self.attend(hidden, context))
    }

    /// `forward(hidden, context) + residual`, the residual joined by `to_out`'s product.
    pub fn forward_added(&self, hidden: Tensor<3>, context: Option<Tensor<3>>, residual: Tensor<3>) -> Tensor<3> {
        self.to_out.forward_added(self.attend(hidden, context), residual)
    }

    /// The heads' attention, before `to_out`.
    fn attend(&self, hidden: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let (k, v) = self.key_value(context.unwrap_or_else(|| hidden.clone()));
        let q = self.to_q.forward(hidden);
        attention(q, k, v, self.heads, self.scale)
    }
}
