//! diffusers `Transformer2DModel` (continuous input) and its `BasicTransformerBlock`s:
//! the image is flattened to tokens, refined by self-attention, cross-attention over the
//! text and a GEGLU feed-forward, then folded back and added to the input.
use knobs_nn::checkpoint::checkpointed_if;
use knobs_nn::ops::geglu;
use knobs_nn::{Conv2d, Device, GroupNorm, Init, LayerNorm, Linear, Module, Tensor, Visitor, VisitorMut, impl_module};

use super::attention::Attention;

/// diffusers `FeedForward` with GEGLU: `net.2(a * gelu(b))` where `[a, b] = net.0.proj(x)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub proj: Linear,
    pub out: Linear,
}
impl_module!(FeedForward { "net.0.proj" => proj, "net.2" => out });

impl FeedForward {
    pub fn new(dim: usize, inner: usize, init: &mut Init, device: &Device) -> Self {
        FeedForward { proj: Linear::new(dim, 2 * inner, true, init, device), out: Linear::new(inner, dim, true, init, device) }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.out.forward(geglu(self.proj.forward(x)))
    }

    /// `forward(x) + residual`, the residual joined by `net.2`'s product.
    pub fn forward_added(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        self.out.forward_added(geglu(self.proj.forward(x)), residual)
    }
}

#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}
impl_module!(BasicTransformerBlock {
    "norm1" => norm1, "attn1" => attn1, "norm2" => norm2, "attn2" => attn2, "norm3" => norm3, "ff" => ff,
});

impl BasicTransformerBlock {
    pub fn new(dim: usize, heads: usize, dim_head: usize, context_dim: usize, init: &mut Init, device: &Device) -> Self {
        BasicTransformerBlock {
            norm1: LayerNorm::new(dim, 1e-5, device),
            attn1: Attention::new(dim, None, heads, dim_head, false, init, device),
            norm2: LayerNorm::new(dim, 1e-5, device),
            attn2: Attention::new(dim, Some(context_dim), heads, dim_head, false, init, device),
            norm3: LayerNorm::new(dim, 1e-5, device),
            ff: FeedForward::new(dim, 4 * dim, init, device),
        }
    }

    pub fn forward(&self, x: Tensor<3>, context: &Tensor<3>) -> Tensor<3> {
        let x = self.attn1.forward_added(self.norm1.forward(x.clone()), None, x);
        let x = self.attn2.forward_added(self.norm2.forward(x.clone()), Some(context.clone()), x);
        self.ff.forward_added(self.norm3.forward(x.clone()), x)
    }
}

/// `proj_in` / `proj_out`: a 1x1 conv (SD 1.x) or a linear over tokens (SD 2.x).
#[derive(Debug, Clone)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Module for Projection {
    fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
        match self {
            Projection::Conv(c) => c.visit(prefix, v),
            Projection::Linear(l) => l.visit(prefix, v),
        }
    }
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
        match self {
            Projection::Conv(c) => c.visit_mut(prefix, v),
            Projection::Linear(l) => l.visit_mut(prefix, v),
        }
    }
}

impl Projection {
    fn new(linear: bool, c_in: usize, c_out: usize, init: &mut Init, device: &Device) -> Self {
        if linear {
            Projection::Linear(Linear::new(c_in, c_out, true, init, device))
        } else {
            Projection::Conv(Conv2d::new(c_in, c_out, 1, 1, 0, true, init, device))
        }
    }
}

#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
    /// Each transformer block keeps only its input for the backward pass, which runs it again
    /// (`knobs_nn::checkpoint`).
    pub gradient_checkpointing: bool,
}
impl_module!(Transformer2DModel {
    "norm" => norm, "proj_in" => proj_in, "transformer_blocks" => transformer_blocks, "proj_out" => proj_out,
});

impl Transformer2DModel {
    /// `heads` heads of `channels / heads` each, as the UNet's cross-attention blocks build it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        groups: usize,
        use_linear_projection: bool,
        init: &mut Init,
        device: &Device,
    ) -> Self {
        let dim_head = channels / heads;
        let inner = heads * dim_head;
        Transformer2DModel {
            // diffusers fixes this eps at 1e-6, whatever the UNet's norm_eps.
            norm: GroupNorm::new(groups, channels, 1e-6, device),
            proj_in: Projection::new(use_linear_projection, channels, inner, init, device),
            transformer_blocks: (0..layers).map(|_| BasicTransformerBlock::new(inner, heads, dim_head, context_dim, init, device)).collect(),
            proj_out: Projection::new(use_linear_projection, inner, channels, init, device),
            gradient_checkpointing: false,
        }
    }

    /// `x` `[B, C, H, W]`, `context` `[B, M, context_dim]` -> `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>, context: &Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let normed = self.norm.forward(x.clone());
        let mut tokens: Tensor<3> = match &self.proj_in {
            Projection::Conv(conv) => {
                let y = conv.forward(normed);
                let inner = y.dims()[1];
                y.reshape([b, inner, h * w]).swap_dims(1, 2)
            }
            Projection::Linear(l) => l.forward(normed.reshape([b, c, h * w]).swap_dims(1, 2)),
        };
        for block in &self.transformer_blocks {
            tokens = checkpointed_if(self.gradient_checkpointing, block, tokens, context, BasicTransformerBlock::forward);
        }
        let inner = tokens.dims()[2];
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(tokens.swap_dims(1, 2).reshape([b, inner, h, w])),
            Projection::Linear(l) => l.forward(tokens).swap_dims(1, 2).reshape([b, c, h, w]),
        };
        out + x
    }
}
