//! diffusers `Attention` (the default processor): multi-head scaled dot-product attention,
//! self-attention when no context is given, cross-attention over `context` otherwise.
use knobs_nn::burn::tensor::activation::softmax;
use knobs_nn::burn::tensor::module::attention;
use knobs_nn::burn::tensor::ops::AttentionModuleOptions;
use knobs_nn::{Device, Init, Linear, Tensor, impl_module};

#[derive(Debug)]
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
        let [b, n, _] = hidden.dims();
        let (k, v) = self.key_value(context.unwrap_or_else(|| hidden.clone()));
        let q = self.to_q.forward(hidden);
        let inner = q.dims()[2];
        let out = self.attend(self.split_heads(q), self.split_heads(k), self.split_heads(v));
        self.to_out.forward(out.swap_dims(1, 2).reshape([b, n, inner]))
    }

    /// `[B, N, heads * d]` -> `[B, heads, N, d]`.
    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, n, inner] = x.dims();
        x.reshape([b, n, self.heads, inner / self.heads]).swap_dims(1, 2)
    }

    /// softmax(q k^T * scale) v per head, `[B, H, N, d]`.
    fn attend(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        if !(q.is_tracked() || k.is_tracked() || v.is_tracked()) {
            // No gradient needed: the backend's fused kernel (flash attention on the CPU)
            // never materialises the N x M scores, about twice as fast here. Autodiff has no
            // fused backward, so it would decompose the op anyway.
            let autodiff = q.is_autodiff();
            let options = AttentionModuleOptions { scale: Some(self.scale), ..Default::default() };
            let out = attention(q.inner(), k.inner(), v.inner(), None, None, options);
            return if autodiff { out.autodiff() } else { out };
        }
        let [b, h, n, d] = q.dims();
        let m = k.dims()[2];
        // Scaling q (N x d) is cheaper than scaling the scores (N x M); heads fold into the
        // batch so that one batched matmul covers them all.
        let q = (q * self.scale).reshape([b * h, n, d]);
        let k = k.reshape([b * h, m, d]);
        let v = v.reshape([b * h, m, d]);
        let probs = softmax(q.matmul(k.swap_dims(1, 2)), 2);
        probs.matmul(v).reshape([b, h, n, d])
    }
}
