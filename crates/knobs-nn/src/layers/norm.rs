use burn::tensor::{Device, Tensor};

use crate::param::f32_value;

use crate::module::{Module, Visitor, VisitorMut, join};
use crate::param::{ParamMut, ParamRef};

/// `torch.nn.GroupNorm` over `[N, C, ...]`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, device: &Device) -> Self {
        GroupNorm { weight: Tensor::ones([channels], device), bias: Tensor::zeros([channels], device), groups, eps }
    }

    /// Statistics in f32 whatever the input's dtype (mixed precision), the result in it.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.over_positions(x, crate::ops::group_norm)
    }

    /// `silu(self.forward(x))`, in one pass where nothing is differentiated.
    pub fn forward_silu<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.over_positions(x, crate::ops::group_norm_silu)
    }

    /// `op` on `x` as `[N, C, positions]`.
    fn over_positions<const D: usize>(&self, x: Tensor<D>, op: fn(Tensor<3>, Tensor<1>, Tensor<1>, usize, f64) -> Tensor<3>) -> Tensor<D> {
        let dims = x.dims();
        let (n, c) = (dims[0], dims[1]);
        let positions = dims[2..].iter().product::<usize>();
        // Weights kept in half precision (frozen) are widened, as the input is.
        op(x.reshape([n, c, positions]), f32_value(&self.weight), f32_value(&self.bias), self.groups, self.eps).reshape(dims)
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, device: &Device) -> Self {
        LayerNorm { weight: Tensor::ones([dim], device), bias: Tensor::zeros([dim], device), eps }
    }

    /// Statistics in f32 whatever the input's dtype (mixed precision), the result in it.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::ops::layer_norm(x, f32_value(&self.weight), f32_value(&self.bias), self.eps)
    }
}

macro_rules! affine_module {
    ($ty:ty) => {
        impl Module for $ty {
            fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
                v.param(&join(prefix, "weight"), ParamRef::D1(&self.weight));
                v.param(&join(prefix, "bias"), ParamRef::D1(&self.bias));
            }
            fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
                v.param(&join(prefix, "weight"), ParamMut::D1(&mut self.weight));
                v.param(&join(prefix, "bias"), ParamMut::D1(&mut self.bias));
            }
        }
    };
}
affine_module!(GroupNorm);
affine_module!(LayerNorm);
