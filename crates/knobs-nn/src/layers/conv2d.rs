use burn::tensor::{DType, Device};
use burn::tensor::Tensor;
use crate::ops::{Products, conv2d_as, conv2d_frozen, conv2d_frozen_copy};
use burn::tensor::ops::ConvOptions;

use crate::adapter::{Conv2dAdapter, Slot, SlotEntry};
use crate::init::Init;
use crate::module::{LayerMut, LayerRef, Module, Visitor, VisitorMut, join};
use crate::param::{ParamMut, ParamRef, f32_value, half_on_cpu, value_as};

/// A 2-D convolution over NCHW input; weight `[out, in/groups, kh, kw]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor<4>,
    pub bias: Option<Tensor<1>>,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
    pub adapters: Slot<dyn Conv2dAdapter>,
}

weight_and_bias_merging!(Conv2d, 4);

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        init: &mut Init,
        device: &Device,
    ) -> Self {
        let bound = 1.0 / ((c_in * kernel * kernel) as f64).sqrt();
        Conv2d {
            weight: init.uniform([c_out, c_in, kernel, kernel], bound, device),
            bias: bias.then(|| init.uniform([c_out], bound, device)),
            stride,
            padding,
            groups: 1,
            adapters: Slot::default(),
        }
    }

    pub fn kernel(&self) -> usize {
        self.weight.dims()[2]
    }
    pub fn c_in(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }
    pub fn c_out(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn options(&self) -> ConvOptions<2> {
        ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], self.groups)
    }

    pub fn forward_base(&self, x: Tensor<4>) -> Tensor<4> {
        // Mixed precision on the CPU: the kernels on the widened input, rounded once, with
        // bf16 products where the CPU has them (as Linear).
        if let Some(dtype) = half_on_cpu(&x) {
            return value_as(&self.base(f32_value(&x), Products::for_dtype(dtype)), dtype);
        }
        // f32 input: as Linear.
        self.base(x, crate::ops::autocast::products_for_f32())
    }

    fn base(&self, x: Tensor<4>, products: Products) -> Tensor<4> {
        let dtype = x.dtype();
        // Mixed precision: the convolution in the input's dtype. The layer's own weight, when
        // frozen and not converted, stays as it is between calls; a frozen half-precision one
        // with f32 input is widened inside the op (which keeps the half-precision storage for
        // the backward pass) and takes the same kernel, so both storages give the same bits.
        let (weight, bias) = (&self.weight, self.bias.as_ref().map(|b| value_as(b, dtype)));
        if weight.dtype() == dtype {
            conv2d_frozen(x, weight.clone(), bias, self.options(), products)
        } else if !weight.is_require_grad() {
            let stored = if dtype == DType::F32 { weight.clone() } else { value_as(weight, dtype) };
            conv2d_frozen_copy(x, stored, bias, self.options(), products)
        } else {
            let weight = value_as(weight, dtype);
            conv2d_as(x, weight, bias, self.options(), products)
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let live: Vec<_> = self.adapters.live().collect();
        if live.is_empty() {
            return self.forward_base(x);
        }
        // Adapters compute in f32, the base convolution in the input's dtype (as Linear).
        let dtype = x.dtype();
        value_as(&self.chain(&live, f32_value(&x), dtype), dtype)
    }

    /// The layer wrapped by `live` adapters, the last one outermost.
    fn chain(&self, live: &[&SlotEntry<dyn Conv2dAdapter>], x: Tensor<4>, base_dtype: DType) -> Tensor<4> {
        match live.split_last() {
            // `forward_base` on the input narrowed, widened again (without the copies under
            // mixed precision on the CPU: `precision::on_rounded`).
            None => crate::ops::precision::on_rounded(&x, base_dtype, |x, products| self.base(x, products)).unwrap_or_else(|| f32_value(&self.forward_base(value_as(&x, base_dtype)))),
            Some((outer, rest)) => outer.adapter.forward(x, self, &|x| self.chain(rest, x, base_dtype), outer.weight()),
        }
    }

}

impl Module for Conv2d {
    fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
        v.layer(prefix, LayerRef::Conv2d(self));
        v.param(&join(prefix, "weight"), ParamRef::D4(&self.weight));
        if let Some(b) = &self.bias {
            v.param(&join(prefix, "bias"), ParamRef::D1(b));
        }
        self.adapters.visit(prefix, v);
    }
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
        v.layer(prefix, LayerMut::Conv2d(self));
        v.param(&join(prefix, "weight"), ParamMut::D4(&mut self.weight));
        if let Some(b) = &mut self.bias {
            v.param(&join(prefix, "bias"), ParamMut::D1(b));
        }
        self.adapters.visit_mut(prefix, v);
    }
}
