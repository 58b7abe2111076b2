//! LoRA on each layer kind: `y = base(x) + scale * B(A(dropout(x)))`, scale applying to the
//! adapter branch only, exactly as PEFT.
use knobs_nn::burn::tensor::module::embedding;
use knobs_nn::ops::{conv2d, low_rank};
use knobs_nn::burn::tensor::ops::ConvOptions;
use knobs_nn::burn::tensor::Int;
use knobs_nn::param::{ParamMut, ParamRef};
use knobs_nn::{Adapter, Conv2d, Conv2dAdapter, Embedding, EmbeddingAdapter, Init, Linear, LinearAdapter, Tensor, Visitor, VisitorMut};

use crate::PeftType;

pub(crate) fn dropout<const D: usize>(x: Tensor<D>, p: f64, training: bool) -> Tensor<D> {
    if !training || p == 0.0 {
        return x;
    }
    let keep = knobs_nn::dropout::keep_mask(x.dims(), 1.0 - p, &x.device());
    x * keep / (1.0 - p)
}

/// PEFT's Kaiming-uniform (a = sqrt(5)) bound for a fan-in, or N(0, 1/r) for `gaussian`.
fn init_down<const D: usize>(shape: [usize; D], fan_in: usize, r: usize, gaussian: bool, init: &mut Init, device: &knobs_nn::Device) -> Tensor<D> {
    if gaussian { init.normal(shape, 1.0 / r as f64, device) } else { init.uniform(shape, 1.0 / (fan_in as f64).sqrt(), device) }
}

#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// Down projection `[r, in]` (`lora_A`).
    pub a: Tensor<2>,
    /// Up projection `[out, r]` (`lora_B`).
    pub b: Tensor<2>,
    pub scale: f64,
    pub dropout: f64,
    pub training: bool,
}

impl LoraLinear {
    pub fn new(base: &Linear, r: usize, scale: f64, dropout: f64, gaussian: bool, init: &mut Init) -> Self {
        let device = base.weight.device();
        LoraLinear {
            a: init_down([r, base.d_in()], base.d_in(), r, gaussian, init, &device),
            b: Tensor::zeros([base.d_out(), r], &device),
            scale,
            dropout,
            training: false,
        }
    }
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    /// `scale * B A`, the change this adapter makes to the weight.
    pub fn delta_weight(&self) -> Tensor<2> {
        self.b.clone().inner().matmul(self.a.clone().inner()) * self.scale
    }
}

impl Adapter for LoraLinear {
    fn method(&self) -> &'static str {
        PeftType::Lora.as_str()
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        v.param(&format!("{layer}.lora_A.{adapter}.weight"), ParamRef::D2(&self.a));
        v.param(&format!("{layer}.lora_B.{adapter}.weight"), ParamRef::D2(&self.b));
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        v.param(&format!("{layer}.lora_A.{adapter}.weight"), ParamMut::D2(&mut self.a));
        v.param(&format!("{layer}.lora_B.{adapter}.weight"), ParamMut::D2(&mut self.b));
    }
    fn set_training(&mut self, training: bool) {
        self.training = training;
    }
}

impl LinearAdapter for LoraLinear {
    fn forward(&self, x: Tensor<2>, _: &knobs_nn::Linear, inner: &dyn Fn(Tensor<2>) -> Tensor<2>, weight: f32) -> Tensor<2> {
        // One op for the branch (knobs_nn::ops::low_rank), which scales the rank-r values and
        // takes a half-precision input as it is (`takes_half_input`); dropout works in f32.
        let dropped = if self.training && self.dropout > 0.0 { dropout(knobs_nn::param::f32_value(&x), self.dropout, true) } else { x.clone() };
        let branch = low_rank(dropped, self.a.clone(), self.b.clone(), self.scale * weight as f64);
        inner(x) + branch
    }
    fn merge(&self, w: Tensor<2>, b: Option<Tensor<1>>, _unmerged: &Tensor<2>, weight: f32) -> knobs_nn::Result<(Tensor<2>, Option<Tensor<1>>)> {
        Ok((w + self.delta_weight() * weight as f64, b))
    }
    fn unmerge(&self, w: Tensor<2>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<2>, Option<Tensor<1>>) {
        (w - self.delta_weight() * weight as f64, b)
    }
    fn adds_to_output(&self) -> bool {
        true
    }
    fn takes_half_input(&self) -> bool {
        true
    }
}

/// LoCon: a k x k down convolution with the base layer's stride and padding, then a 1x1 up.
#[derive(Debug, Clone)]
pub struct LoraConv2d {
    /// `[r, in, k, k]`
    pub a: Tensor<4>,
    /// `[out, r, 1, 1]`
    pub b: Tensor<4>,
    pub scale: f64,
    pub dropout: f64,
    pub training: bool,
    pub stride: usize,
    pub padding: usize,
}

impl LoraConv2d {
    pub fn new(base: &Conv2d, r: usize, scale: f64, dropout: f64, gaussian: bool, init: &mut Init) -> Self {
        let device = base.weight.device();
        let k = base.kernel();
        LoraConv2d {
            a: init_down([r, base.c_in(), k, k], base.c_in() * k * k, r, gaussian, init, &device),
            b: Tensor::zeros([base.c_out(), r, 1, 1], &device),
            scale,
            dropout,
            training: false,
            stride: base.stride,
            padding: base.padding,
        }
    }
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    pub fn delta_weight(&self) -> Tensor<4> {
        let [r, c_in, kh, kw] = self.a.dims();
        let out = self.b.dims()[0];
        let b = self.b.clone().inner().reshape([out, r]);
        let a = self.a.clone().inner().reshape([r, c_in * kh * kw]);
        (b.matmul(a) * self.scale).reshape([out, c_in, kh, kw])
    }
}

impl Adapter for LoraConv2d {
    fn method(&self) -> &'static str {
        PeftType::Lora.as_str()
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        v.param(&format!("{layer}.lora_A.{adapter}.weight"), ParamRef::D4(&self.a));
        v.param(&format!("{layer}.lora_B.{adapter}.weight"), ParamRef::D4(&self.b));
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        v.param(&format!("{layer}.lora_A.{adapter}.weight"), ParamMut::D4(&mut self.a));
        v.param(&format!("{layer}.lora_B.{adapter}.weight"), ParamMut::D4(&mut self.b));
    }
    fn set_training(&mut self, training: bool) {
        self.training = training;
    }
}

impl Conv2dAdapter for LoraConv2d {
    fn forward(&self, x: Tensor<4>, _: &knobs_nn::Conv2d, inner: &dyn Fn(Tensor<4>) -> Tensor<4>, weight: f32) -> Tensor<4> {
        let down = ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], 1);
        let h = conv2d(dropout(x.clone(), self.dropout, self.training), self.a.clone(), None, down);
        let h = conv2d(h, self.b.clone(), None, ConvOptions::new([1, 1], [0, 0], [1, 1], 1));
        inner(x) + h * (self.scale * weight as f64)
    }
    fn merge(&self, w: Tensor<4>, b: Option<Tensor<1>>, _unmerged: &Tensor<4>, weight: f32) -> knobs_nn::Result<(Tensor<4>, Option<Tensor<1>>)> {
        Ok((w + self.delta_weight() * weight as f64, b))
    }
    fn unmerge(&self, w: Tensor<4>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<4>, Option<Tensor<1>>) {
        (w - self.delta_weight() * weight as f64, b)
    }
}

/// LoRA on an embedding table: rows of `A^T` looked up, then projected by `B`.
#[derive(Debug, Clone)]
pub struct LoraEmbedding {
    /// `[r, num_embeddings]` (`lora_embedding_A`)
    pub a: Tensor<2>,
    /// `[dim, r]` (`lora_embedding_B`)
    pub b: Tensor<2>,
    pub scale: f64,
}

impl LoraEmbedding {
    /// PEFT starts A at zero and B normal for embeddings.
    pub fn new(base: &Embedding, r: usize, scale: f64, init: &mut Init) -> Self {
        let device = base.weight.device();
        LoraEmbedding {
            a: Tensor::zeros([r, base.num_embeddings()], &device),
            b: init.normal([base.dim(), r], 1.0, &device),
            scale,
        }
    }
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    /// The change to the table `[num, dim]`.
    pub fn delta_weight(&self) -> Tensor<2> {
        self.b.clone().inner().matmul(self.a.clone().inner()).transpose() * self.scale
    }
}

impl Adapter for LoraEmbedding {
    fn method(&self) -> &'static str {
        PeftType::Lora.as_str()
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        v.param(&format!("{layer}.lora_embedding_A.{adapter}"), ParamRef::D2(&self.a));
        v.param(&format!("{layer}.lora_embedding_B.{adapter}"), ParamRef::D2(&self.b));
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        v.param(&format!("{layer}.lora_embedding_A.{adapter}"), ParamMut::D2(&mut self.a));
        v.param(&format!("{layer}.lora_embedding_B.{adapter}"), ParamMut::D2(&mut self.b));
    }
}

impl EmbeddingAdapter for LoraEmbedding {
    fn output(&self, ids: &Tensor<2, Int>, y: Tensor<3>, weight: f32) -> Tensor<3> {
        let h = embedding(self.a.clone().transpose(), ids.clone());
        let [bsz, seq, r] = h.dims();
        let h = h.reshape([bsz * seq, r]).matmul(self.b.clone().transpose());
        y + h.reshape([bsz, seq, self.b.dims()[0]]) * (self.scale * weight as f64)
    }
    fn merge(&self, table: Tensor<2>, weight: f32) -> knobs_nn::Result<Tensor<2>> {
        Ok(table + self.delta_weight() * weight as f64)
    }
    fn unmerge(&self, table: Tensor<2>, weight: f32) -> Tensor<2> {
        table - self.delta_weight() * weight as f64
    }
}
