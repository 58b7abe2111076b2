//! OFT on Linear (the input rotated before the layer, as PEFT runs it, so adapters added
//! earlier are rotated too) and Conv2d (the layer's own kernel rotated along its flattened
//! `in * k * k` axis and added as a change, which is what PEFT merges; PEFT 0.21's unmerged
//! k x k path unfolds and folds the input, which sums overlapping patches and does not equal
//! its own merged layer, so knobs follows the merged form).

use knobs_nn::ops::conv2d;
use knobs_nn::param::{ParamMut, ParamRef, f32_value};
use knobs_nn::{Adapter, Conv2d, Conv2dAdapter, Linear, LinearAdapter, Tensor, Visitor, VisitorMut};

use super::rotation::{Rotation, invert_blocks};
use crate::PeftType;

/// `w` `[out, blocks * bs]` times the block-diagonal `R^T`: each block of columns `W_b R_b^T`.
fn rotate_columns(w: Tensor<2>, r: Tensor<3>) -> Tensor<2> {
    let [out, n] = w.dims();
    let [blocks, bs, _] = r.dims();
    debug_assert_eq!(blocks * bs, n);
    w.reshape([out, blocks, bs]).swap_dims(0, 1).matmul(r.swap_dims(1, 2)).swap_dims(0, 1).reshape([out, n])
}

fn visit_q(q: &Tensor<2>, layer: &str, adapter: &str, v: &mut dyn Visitor) {
    v.param(&format!("{layer}.oft_R.{adapter}.weight"), ParamRef::D2(q));
}
fn visit_q_mut(q: &mut Tensor<2>, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
    v.param(&format!("{layer}.oft_R.{adapter}.weight"), ParamMut::D2(q));
}

#[derive(Debug, Clone)]
pub struct OftLinear {
    /// `oft_R.weight`: `[blocks (1 with block_share), bs(bs-1)/2]`.
    pub q: Tensor<2>,
    pub rotation: Rotation,
}

impl Adapter for OftLinear {
    fn method(&self) -> &'static str {
        PeftType::Oft.as_str()
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        visit_q(&self.q, layer, adapter, v)
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        visit_q_mut(&mut self.q, layer, adapter, v)
    }
}

impl LinearAdapter for OftLinear {
    /// `inner(x R)`: each block of input features rotated, `x_b R_b`.
    fn forward(&self, x: Tensor<2>, _: &Linear, inner: &dyn Fn(Tensor<2>) -> Tensor<2>, weight: f32) -> Tensor<2> {
        let r = self.rotation.blocks(&self.q, weight);
        let [rows, n] = x.dims();
        let [blocks, bs, _] = r.dims();
        let rotated = x.reshape([rows, blocks, bs]).swap_dims(0, 1).matmul(r).swap_dims(0, 1).reshape([rows, n]);
        inner(rotated)
    }
    fn merge(&self, w: Tensor<2>, b: Option<Tensor<1>>, _unmerged: &Tensor<2>, weight: f32) -> knobs_nn::Result<(Tensor<2>, Option<Tensor<1>>)> {
        Ok((rotate_columns(w, self.rotation.blocks(&self.q.clone().inner(), weight)), b))
    }
    fn unmerge(&self, w: Tensor<2>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<2>, Option<Tensor<1>>) {
        (rotate_columns(w, invert_blocks(self.rotation.blocks(&self.q.clone().inner(), weight))), b)
    }
}

#[derive(Debug, Clone)]
pub struct OftConv2d {
    pub q: Tensor<2>,
    pub rotation: Rotation,
    /// `W R^T - W` as the last merge added it, for unmerging (the rotation of the layer's own
    /// kernel, which the merged weight no longer shows apart from other adapters).
    pub merged_delta: crate::merged::Merged<Tensor<4>>,
}

impl OftConv2d {
    pub fn new(q: Tensor<2>, rotation: Rotation) -> Self {
        OftConv2d { q, rotation, merged_delta: Default::default() }
    }

    /// `W R^T - W` for kernel `w`, rotated along its flattened `in * k * k` axis.
    fn delta(&self, w: Tensor<4>, r: Tensor<3>) -> Tensor<4> {
        let dims = w.dims();
        let [out, c, kh, kw] = dims;
        rotate_columns(w.clone().reshape([out, c * kh * kw]), r).reshape(dims) - w
    }
}

impl Adapter for OftConv2d {
    fn method(&self) -> &'static str {
        PeftType::Oft.as_str()
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        visit_q(&self.q, layer, adapter, v)
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        visit_q_mut(&mut self.q, layer, adapter, v)
    }
}

impl Conv2dAdapter for OftConv2d {
    /// `inner(x) + conv(x, W R^T - W)`: the layer's own kernel rotated, beside whatever
    /// `inner` adds.
    fn forward(&self, x: Tensor<4>, base: &Conv2d, inner: &dyn Fn(Tensor<4>) -> Tensor<4>, weight: f32) -> Tensor<4> {
        let delta = self.delta(f32_value(&base.weight), self.rotation.blocks(&self.q, weight));
        inner(x.clone()) + conv2d(x, delta, None, base.options())
    }
    fn merge(&self, w: Tensor<4>, b: Option<Tensor<1>>, unmerged: &Tensor<4>, weight: f32) -> knobs_nn::Result<(Tensor<4>, Option<Tensor<1>>)> {
        let delta = self.delta(unmerged.clone(), self.rotation.blocks(&self.q.clone().inner(), weight));
        self.merged_delta.set(delta.clone());
        Ok((w + delta, b))
    }
    fn unmerge(&self, w: Tensor<4>, b: Option<Tensor<1>>, _weight: f32) -> (Tensor<4>, Option<Tensor<1>>) {
        let delta = self.merged_delta.get();
        (w - delta, b)
    }
}
