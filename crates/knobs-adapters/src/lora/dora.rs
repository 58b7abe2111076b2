//! DoRA (Liu et al. 2024), PEFT's `use_dora`: the adapted weight `W + s B A` is split into a
//! learned per-output magnitude `m` and a direction, `W' = m * (W + s B A) / ||W + s B A||`,
//! the norm taken over each output row and treated as a constant in the backward pass (as
//! PEFT does, section 4.3 of the paper). Run unmerged, the layer adds
//! `(m / n - 1) * (inner(x) - bias) + (m / n) * s * B(A(x))`, PEFT's exact expression, so with
//! several adapters DoRA rescales what the earlier ones added too, as PEFT does.

use knobs_nn::ops::conv2d;
use knobs_nn::burn::tensor::ops::ConvOptions;
use knobs_nn::param::{ParamMut, ParamRef, f32_value};
use knobs_nn::{Adapter, Conv2d, Conv2dAdapter, Init, Linear, LinearAdapter, Tensor, Visitor, VisitorMut};

use super::layer::{LoraConv2d, LoraLinear, dropout};
use crate::PeftType;

/// The magnitude's name; PEFT's files write it without `.weight` (`<layer>.lora_magnitude_vector`).
const MAGNITUDE: &str = "lora_magnitude_vector";

/// Row norms of `w + delta`, `[out]`, out of autodiff.
fn row_norms(w: Tensor<2>, delta: Tensor<2>) -> Tensor<1> {
    let [out, _] = w.dims();
    (w + delta).detach().powi_scalar(2).sum_dim(1).sqrt().reshape([out])
}

/// Norms of each output filter of `w + delta`, `[1, out, 1, 1]` (PEFT's conv magnitude shape).
fn filter_norms(w: Tensor<4>, delta: Tensor<4>) -> Tensor<4> {
    let [out, c, kh, kw] = w.dims();
    (w + delta).detach().reshape([out, c * kh * kw]).powi_scalar(2).sum_dim(1).sqrt().reshape([1, out, 1, 1])
}

#[derive(Debug, Clone)]
pub struct DoraLinear {
    pub lora: LoraLinear,
    /// `[out]`, starting at the row norms of the adapted weight.
    pub magnitude: Tensor<1>,
    /// The norms the last merge divided by, for unmerging (PEFT caches them the same way: the
    /// merged weight no longer tells them). Kept after an unmerge: a later adapter's merge
    /// replays this unmerge to find the layer's own weight.
    merged_norm: crate::merged::Merged<Tensor<1>>,
}

impl DoraLinear {
    pub fn new(base: &Linear, lora: LoraLinear) -> Self {
        let magnitude = row_norms(f32_value(&base.weight), lora.delta_weight());
        DoraLinear { lora, magnitude, merged_norm: Default::default() }
    }
}

impl Adapter for DoraLinear {
    fn method(&self) -> &'static str {
        PeftType::Lora.as_str()
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        self.lora.visit(layer, adapter, v);
        v.param(&format!("{layer}.{MAGNITUDE}.{adapter}"), ParamRef::D1(&self.magnitude));
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        self.lora.visit_mut(layer, adapter, v);
        v.param(&format!("{layer}.{MAGNITUDE}.{adapter}"), ParamMut::D1(&mut self.magnitude));
    }
    fn set_training(&mut self, training: bool) {
        self.lora.training = training;
    }
}

impl LinearAdapter for DoraLinear {
    fn forward(&self, x: Tensor<2>, base: &Linear, inner: &dyn Fn(Tensor<2>) -> Tensor<2>, weight: f32) -> Tensor<2> {
        let s = self.lora.scale * weight as f64;
        let w = f32_value(&base.weight);
        let out = w.dims()[0];
        let norm = row_norms(w.clone(), self.lora.delta_weight() * weight as f64);
        let ratio = (self.magnitude.clone() / norm).reshape([1, out]);
        let dropped = self.lora.training && self.lora.dropout > 0.0;
        let xd = dropout(x.clone(), self.lora.dropout, self.lora.training);
        let lora = xd.clone().matmul(self.lora.a.clone().transpose()).matmul(self.lora.b.clone().transpose()) * s;
        let y = inner(x);
        // With dropout PEFT recomputes the base product on the dropped input.
        let base_result = if dropped {
            xd.matmul(w.transpose())
        } else {
            match &base.bias {
                Some(b) => y.clone() - f32_value(b).reshape([1, out]),
                None => y.clone(),
            }
        };
        y + (ratio.clone() - 1.0) * base_result + ratio * lora
    }
    fn merge(&self, w: Tensor<2>, b: Option<Tensor<1>>, unmerged: &Tensor<2>, weight: f32) -> knobs_nn::Result<(Tensor<2>, Option<Tensor<1>>)> {
        let delta = self.lora.delta_weight() * weight as f64;
        let norm = row_norms(unmerged.clone(), delta.clone());
        let out = norm.dims()[0];
        let factor = (self.magnitude.clone().inner() / norm.clone()).reshape([out, 1]);
        self.merged_norm.set(norm);
        Ok((factor * (w + delta), b))
    }
    fn unmerge(&self, w: Tensor<2>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<2>, Option<Tensor<1>>) {
        let norm = self.merged_norm.get();
        let out = norm.dims()[0];
        let factor = (self.magnitude.clone().inner() / norm).reshape([out, 1]);
        (w / factor - self.lora.delta_weight() * weight as f64, b)
    }
}

#[derive(Debug, Clone)]
pub struct DoraConv2d {
    pub lora: LoraConv2d,
    /// `[1, out, 1, 1]`.
    pub magnitude: Tensor<4>,
    merged_norm: crate::merged::Merged<Tensor<4>>,
}

impl DoraConv2d {
    pub fn new(base: &Conv2d, lora: LoraConv2d) -> Self {
        let magnitude = filter_norms(f32_value(&base.weight), lora.delta_weight());
        DoraConv2d { lora, magnitude, merged_norm: Default::default() }
    }
}

impl Adapter for DoraConv2d {
    fn method(&self) -> &'static str {
        PeftType::Lora.as_str()
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        self.lora.visit(layer, adapter, v);
        v.param(&format!("{layer}.{MAGNITUDE}.{adapter}"), ParamRef::D4(&self.magnitude));
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        self.lora.visit_mut(layer, adapter, v);
        v.param(&format!("{layer}.{MAGNITUDE}.{adapter}"), ParamMut::D4(&mut self.magnitude));
    }
    fn set_training(&mut self, training: bool) {
        self.lora.training = training;
    }
}

impl Conv2dAdapter for DoraConv2d {
    fn forward(&self, x: Tensor<4>, base: &Conv2d, inner: &dyn Fn(Tensor<4>) -> Tensor<4>, weight: f32) -> Tensor<4> {
        let s = self.lora.scale * weight as f64;
        let w = f32_value(&base.weight);
        let out = w.dims()[0];
        let ratio = self.magnitude.clone() / filter_norms(w.clone(), self.lora.delta_weight() * weight as f64);
        let dropped = self.lora.training && self.lora.dropout > 0.0;
        let xd = dropout(x.clone(), self.lora.dropout, self.lora.training);
        let down = ConvOptions::new([self.lora.stride; 2], [self.lora.padding; 2], [1, 1], 1);
        let h = conv2d(xd.clone(), self.lora.a.clone(), None, down);
        let lora = conv2d(h, self.lora.b.clone(), None, ConvOptions::new([1, 1], [0, 0], [1, 1], 1)) * s;
        let y = inner(x);
        let base_result = if dropped {
            conv2d(xd, w, None, base.options())
        } else {
            match &base.bias {
                Some(b) => y.clone() - f32_value(b).reshape([1, out, 1, 1]),
                None => y.clone(),
            }
        };
        y + (ratio.clone() - 1.0) * base_result + ratio * lora
    }
    fn merge(&self, w: Tensor<4>, b: Option<Tensor<1>>, unmerged: &Tensor<4>, weight: f32) -> knobs_nn::Result<(Tensor<4>, Option<Tensor<1>>)> {
        let delta = self.lora.delta_weight() * weight as f64;
        let norm = filter_norms(unmerged.clone(), delta.clone());
        let factor = (self.magnitude.clone().inner() / norm.clone()).swap_dims(0, 1);
        self.merged_norm.set(norm);
        Ok((factor * (w + delta), b))
    }
    fn unmerge(&self, w: Tensor<4>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<4>, Option<Tensor<1>>) {
        let norm = self.merged_norm.get();
        let factor = (self.magnitude.clone().inner() / norm).swap_dims(0, 1);
        (w / factor - self.lora.delta_weight() * weight as f64, b)
    }
}

/// Attaches DoRA in place of plain LoRA on a Linear or Conv2d.
pub fn attach(layer: knobs_nn::LayerMut<'_>, name: &str, r: usize, scale: f64, dropout: f64, gaussian: bool, init: &mut Init) -> crate::Result<()> {
    match layer {
        knobs_nn::LayerMut::Linear(l) => {
            let lora = LoraLinear::new(l, r, scale, dropout, gaussian, init);
            let dora = DoraLinear::new(l, lora);
            l.adapters.insert(name, Box::new(dora));
        }
        knobs_nn::LayerMut::Conv2d(l) => {
            let lora = LoraConv2d::new(l, r, scale, dropout, gaussian, init);
            let dora = DoraConv2d::new(l, lora);
            l.adapters.insert(name, Box::new(dora));
        }
        knobs_nn::LayerMut::Embedding(_) => {
            return Err(crate::AdapterError::Config("DoRA on embedding layers is not supported by knobs; target Linear or Conv2d layers".into()));
        }
    }
    Ok(())
}
