use burn::tensor::module::linear;
use burn::tensor::{DType, Device, Tensor};

use crate::adapter::{LinearAdapter, Slot, SlotEntry};
use crate::init::Init;
use crate::module::{LayerMut, LayerRef, Module, Visitor, VisitorMut, join};
use crate::ops::Products;
use crate::param::{ParamMut, ParamRef, f32_value, half_on_cpu, value_as};

/// `y = x W^T + b`, with the weight stored as PyTorch does (`[out, in]`) so files map 1:1.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor<2>,
    pub bias: Option<Tensor<1>>,
    pub adapters: Slot<dyn LinearAdapter>,
}

impl Linear {
    /// PyTorch's default initialisation (uniform in ±1/sqrt(in)).
    pub fn new(d_in: usize, d_out: usize, bias: bool, init: &mut Init, device: &Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        Linear {
            weight: init.uniform([d_out, d_in], bound, device),
            bias: bias.then(|| init.uniform([d_out], bound, device)),
            adapters: Slot::default(),
        }
    }

    pub fn from_tensors(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Linear { weight, bias, adapters: Slot::default() }
    }

    pub fn d_in(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn d_out(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The base layer alone, ignoring adapters.
    pub fn forward_base<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        // Mixed precision on the CPU: the kernel on the widened input, rounded once. bf16
        // products where the CPU has them (the weight rounded in packing, as autocast rounds
        // it), else f32 ones with the weight as stored: burn's bf16 product was slower than
        // f32, and kept a narrowed copy of the weight.
        if let Some(dtype) = half_on_cpu(&x) {
            return value_as(&self.base(f32_value(&x), Products::for_dtype(dtype)), dtype);
        }
        // f32 input: f32 products, or bf16 ones inside a bf16 model's generation (`autocast`).
        self.base(x, crate::ops::autocast::products_for_f32())
    }

    fn base<const D: usize>(&self, x: Tensor<D>, products: Products) -> Tensor<D> {
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        if let Some(y) = crate::ops::linear_as(&x.clone().reshape([rows, self.d_in()]), &self.weight, self.bias.as_ref(), products) {
            dims[D - 1] = self.d_out();
            return y.reshape(dims);
        }
        // In the input's dtype: f32, or the narrower one of mixed precision.
        let dtype = x.dtype();
        linear(x, value_as(&self.weight, dtype).transpose(), self.bias.as_ref().map(|b| value_as(b, dtype)))
    }

    /// `forward(x) + residual`, the sum written once by the layer's product where it can be
    /// (no adapter live, f32 activations, nothing differentiated: [`crate::ops::linear_added_as`]).
    pub fn forward_added<const D: usize>(&self, x: Tensor<D>, residual: Tensor<D>) -> Tensor<D> {
        if !self.adapters.has_live() {
            let dims = residual.dims();
            let rows = dims[..D - 1].iter().product::<usize>();
            let (x2, r2) = (x.clone().reshape([rows, self.d_in()]), residual.clone().reshape([rows, self.d_out()]));
            if let Some(y) = crate::ops::linear_added_as(&x2, &self.weight, self.bias.as_ref(), &r2, crate::ops::autocast::products_for_f32()) {
                return y.reshape(dims);
            }
        }
        self.forward(x) + residual
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if !self.adapters.has_live() {
            return self.forward_base(x);
        }
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let live: Vec<_> = self.adapters.live().collect();
        let dtype = x.dtype();
        // Adapters compute in f32 (they are small, and what trains); under mixed precision
        // only the base matmul runs in the input's dtype.
        let y = self.chain(&live, f32_value(&x.reshape([rows, self.d_in()])), dtype);
        dims[D - 1] = self.d_out();
        value_as(&y, dtype).reshape(dims)
    }

    /// The layer wrapped by `live` adapters, the last one outermost.
    fn chain(&self, live: &[&SlotEntry<dyn LinearAdapter>], x: Tensor<2>, base_dtype: DType) -> Tensor<2> {
        match live.split_last() {
            None => f32_value(&self.forward_base(value_as(&x, base_dtype))),
            Some((outer, rest)) => outer.adapter.forward(x, self, &|x| self.chain(rest, x, base_dtype), outer.weight()),
        }
    }
}

impl Module for Linear {
    fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
        v.layer(prefix, LayerRef::Linear(self));
        v.param(&join(prefix, "weight"), ParamRef::D2(&self.weight));
        if let Some(b) = &self.bias {
            v.param(&join(prefix, "bias"), ParamRef::D1(b));
        }
        self.adapters.visit(prefix, v);
    }
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
        v.layer(prefix, LayerMut::Linear(self));
        v.param(&join(prefix, "weight"), ParamMut::D2(&mut self.weight));
        if let Some(b) = &mut self.bias {
            v.param(&join(prefix, "bias"), ParamMut::D1(b));
        }
        self.adapters.visit_mut(prefix, v);
    }
}

weight_and_bias_merging!(Linear, 2);
