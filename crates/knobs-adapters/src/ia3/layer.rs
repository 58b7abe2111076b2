//! IA3 (Liu et al. 2022): a learned per-channel scale. On ordinary targets it scales the
//! output, `y = base(x) * l`; on feed-forward targets the input, `y = W (x * l) + b`; as PEFT.
use knobs_nn::param::{ParamMut, ParamRef};
use knobs_nn::{Adapter, Conv2dAdapter, LinearAdapter, Tensor, Visitor, VisitorMut};

use crate::PeftType;

/// PEFT guards the division in unmerge the same way.
const UNMERGE_EPS: f64 = 1e-8;

/// `1 + weight * (l - 1)`: weight 1 gives `l`, weight 0 the identity.
fn weighted<const D: usize>(l: &Tensor<D>, weight: f32) -> Tensor<D> {
    if weight == 1.0 { l.clone() } else { (l.clone() - 1.0) * weight as f64 + 1.0 }
}

#[derive(Debug, Clone)]
pub struct Ia3Linear {
    /// `[out, 1]`, or `[1, in]` for a feed-forward target (PEFT's shapes).
    pub l: Tensor<2>,
    pub feedforward: bool,
}

impl Adapter for Ia3Linear {
    fn method(&self) -> &'static str {
        PeftType::Ia3.as_str()
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        v.param(&format!("{layer}.ia3_l.{adapter}"), ParamRef::D2(&self.l));
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        v.param(&format!("{layer}.ia3_l.{adapter}"), ParamMut::D2(&mut self.l));
    }
}

impl LinearAdapter for Ia3Linear {
    fn forward(&self, x: Tensor<2>, _: &knobs_nn::Linear, inner: &dyn Fn(Tensor<2>) -> Tensor<2>, weight: f32) -> Tensor<2> {
        let l = weighted(&self.l, weight);
        if self.feedforward {
            let n = l.dims()[1];
            inner(x * l.reshape([1, n]))
        } else {
            let n = l.dims()[0];
            inner(x) * l.reshape([1, n])
        }
    }
    fn merge(&self, w: Tensor<2>, b: Option<Tensor<1>>, _unmerged: &Tensor<2>, weight: f32) -> knobs_nn::Result<(Tensor<2>, Option<Tensor<1>>)> {
        let l = weighted(&self.l.clone().inner(), weight);
        if self.feedforward {
            Ok((w * l, b))
        } else {
            let n = l.dims()[0];
            Ok((w * l.clone(), b.map(|b| b * l.reshape([n]))))
        }
    }
    fn unmerge(&self, w: Tensor<2>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<2>, Option<Tensor<1>>) {
        let l = weighted(&self.l.clone().inner(), weight) + UNMERGE_EPS;
        if self.feedforward {
            (w / l, b)
        } else {
            let n = l.dims()[0];
            (w / l.clone(), b.map(|b| b / l.reshape([n])))
        }
    }
}

#[derive(Debug, Clone)]
pub struct Ia3Conv2d {
    /// `[1, out, 1, 1]`, or `[1, in, 1, 1]` for a feed-forward target.
    pub l: Tensor<4>,
    pub feedforward: bool,
}

impl Adapter for Ia3Conv2d {
    fn method(&self) -> &'static str {
        PeftType::Ia3.as_str()
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        v.param(&format!("{layer}.ia3_l.{adapter}"), ParamRef::D4(&self.l));
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        v.param(&format!("{layer}.ia3_l.{adapter}"), ParamMut::D4(&mut self.l));
    }
}

impl Ia3Conv2d {
    /// The scale laid out along the weight's output (dim 0) or input (dim 1) axis.
    fn along_weight(&self, weight: f32) -> Tensor<4> {
        let l = weighted(&self.l.clone().inner(), weight);
        if self.feedforward { l } else { l.swap_dims(0, 1) }
    }
}

impl Conv2dAdapter for Ia3Conv2d {
    fn forward(&self, x: Tensor<4>, _: &knobs_nn::Conv2d, inner: &dyn Fn(Tensor<4>) -> Tensor<4>, weight: f32) -> Tensor<4> {
        let l = weighted(&self.l, weight);
        if self.feedforward { inner(x * l) } else { inner(x) * l }
    }
    fn merge(&self, w: Tensor<4>, b: Option<Tensor<1>>, _unmerged: &Tensor<4>, weight: f32) -> knobs_nn::Result<(Tensor<4>, Option<Tensor<1>>)> {
        let l = self.along_weight(weight);
        let n = l.dims().iter().product::<usize>();
        let b = if self.feedforward { b } else { b.map(|b| b * l.clone().reshape([n])) };
        Ok((w * l, b))
    }
    fn unmerge(&self, w: Tensor<4>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<4>, Option<Tensor<1>>) {
        let l = self.along_weight(weight) + UNMERGE_EPS;
        let n = l.dims().iter().product::<usize>();
        let b = if self.feedforward { b } else { b.map(|b| b / l.clone().reshape([n])) };
        (w / l, b)
    }
}
