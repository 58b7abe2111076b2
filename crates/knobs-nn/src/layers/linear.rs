use burn::tensor::module::linear;
use burn::tensor::{DType, Device, Tensor};

use crate::adapter::{LinearAdapter, Slot, SlotEntry};
use crate::init::Init;
use crate::module::{LayerMut, LayerRef, Module, Visitor, VisitorMut, join};
use crate::ops::Products;
use crate::param::{ParamMut, ParamRef, f32_value, half_on_cpu, value_as};

/// `y = x W^T + b`, with the weight stored as PyTorch does (`[out, in]`) so files map 1:1.
#[derive(Debug, Clone)]
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
            // bf16 in and out where the op takes them as they are (`ops::linear`'s `takes_bf16`).
            if let Some(y) = self.base_op(&x, Products::for_dtype(dtype)) {
                return y;
            }
            return value_as(&self.base(f32_value(&x), Products::for_dtype(dtype)), dtype);
        }
        // f32 input: f32 products, or bf16 ones inside a bf16 model's generation (`autocast`).
        self.base(x, crate::ops::autocast::products_for_f32())
    }

    /// The layer's own op ([`crate::ops::linear_as`]) on `x`, where it applies.
    fn base_op<const D: usize>(&self, x: &Tensor<D>, products: Products) -> Option<Tensor<D>> {
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let y = crate::ops::linear_as(&x.clone().reshape([rows, self.d_in()]), &self.weight, self.bias.as_ref(), products)?;
        dims[D - 1] = self.d_out();
        Some(y.reshape(dims))
    }

    fn base<const D: usize>(&self, x: Tensor<D>, products: Products) -> Tensor<D> {
        if let Some(y) = self.base_op(&x, products) {
            return y;
        }
        // In the input's dtype: f32, or the narrower one of mixed precision.
        let dtype = x.dtype();
        linear(x, value_as(&self.weight, dtype).transpose(), self.bias.as_ref().map(|b| value_as(b, dtype)))
    }

    /// `forward(x) + residual`, the residual added by the base layer's product as it writes its
    /// output where it can be ([`crate::ops::linear_added_as`]: f32 activations, nothing
    /// differentiated), under live adapters that add to the output ([`LinearAdapter::adds_to_output`]).
    pub fn forward_added<const D: usize>(&self, x: Tensor<D>, residual: Tensor<D>) -> Tensor<D> {
        let live: Vec<_> = self.adapters.live().collect();
        if !live.iter().all(|e| e.adapter.adds_to_output()) {
            return self.forward(x) + residual;
        }
        let dims = residual.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let (x, residual) = (x.reshape([rows, self.d_in()]), residual.reshape([rows, self.d_out()]));
        if live.is_empty() {
            return self.base_added(x, residual).reshape(dims);
        }
        let dtype = x.dtype();
        let y = if takes_as_it_is(&x, &live) {
            self.chain(&live, x, &|x| f32_value(&self.base_added(x, residual.clone())))
        } else {
            self.chain(&live, f32_value(&x), &|x| f32_value(&self.base_added(value_as(&x, dtype), residual.clone())))
        };
        value_as(&y, dtype).reshape(dims)
    }

    /// The base layer's output plus `residual`, in one op where it applies.
    fn base_added(&self, x: Tensor<2>, residual: Tensor<2>) -> Tensor<2> {
        if let Some(y) = crate::ops::linear_added_as(&x, &self.weight, self.bias.as_ref(), &residual, crate::ops::autocast::products_for_f32()) {
            return y;
        }
        self.forward_base(x) + residual
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if !self.adapters.has_live() {
            return self.forward_base(x);
        }
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let live: Vec<_> = self.adapters.live().collect();
        let dtype = x.dtype();
        let x = x.reshape([rows, self.d_in()]);
        let y = if takes_as_it_is(&x, &live) {
            self.chain(&live, x, &|x| f32_value(&self.forward_base(x)))
        } else {
            self.chain(&live, f32_value(&x), &|x| self.base_of_f32(x, dtype))
        };
        dims[D - 1] = self.d_out();
        value_as(&y, dtype).reshape(dims)
    }

    /// The base layer's output in f32 on the adapters' f32 input `x`, for a layer whose input
    /// came in `dtype`: [`Self::forward_base`] on `x` narrowed to `dtype`, widened again
    /// (without the copies under mixed precision on the CPU: `precision::on_rounded`).
    fn base_of_f32(&self, x: Tensor<2>, dtype: DType) -> Tensor<2> {
        crate::ops::precision::on_rounded(&x, dtype, |x, products| self.base(x, products)).unwrap_or_else(|| f32_value(&self.forward_base(value_as(&x, dtype))))
    }

    /// The live adapters, outermost last, round `base` (the layer's own output, in f32).
    fn chain(&self, live: &[&SlotEntry<dyn LinearAdapter>], x: Tensor<2>, base: &dyn Fn(Tensor<2>) -> Tensor<2>) -> Tensor<2> {
        match live.split_last() {
            None => base(x),
            Some((outer, rest)) => outer.adapter.forward(x, self, &|x| self.chain(rest, x, base), outer.weight()),
        }
    }
}

/// Whether the live adapters all take `x` in its half precision on the CPU as it is
/// ([`LinearAdapter::takes_half_input`]), the layer's own product taking it so too.
fn takes_as_it_is(x: &Tensor<2>, live: &[&SlotEntry<dyn LinearAdapter>]) -> bool {
    half_on_cpu(x).is_some() && live.iter().all(|e| e.adapter.takes_half_input())
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
