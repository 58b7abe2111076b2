use burn::tensor::module::layer_norm;
use burn::tensor::{DType, Device, Tensor};

use crate::param::value_as;

use crate::module::{Module, Visitor, VisitorMut, join};
use crate::param::{ParamMut, ParamRef};

/// `torch.nn.GroupNorm` over `[N, C, ...]`.
#[derive(Debug)]
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
        let dtype = x.dtype();
        if dtype != DType::F32 {
            return value_as(&self.forward(x.cast(DType::F32)), dtype);
        }
        let dims = x.dims();
        let (n, c) = (dims[0], dims[1]);
        let per_group = dims[1..].iter().product::<usize>() / self.groups;
        let g: Tensor<3> = x.reshape([n, self.groups, per_group]);
        let centered = g.clone() - g.mean_dim(2);
        let var = centered.clone().powi_scalar(2).mean_dim(2);
        let normed: Tensor<D> = (centered / (var + self.eps).sqrt()).reshape(dims);
        let mut affine = [1; D];
        affine[1] = c;
        normed * self.weight.clone().reshape(affine) + self.bias.clone().reshape(affine)
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Debug)]
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
        let dtype = x.dtype();
        if dtype != DType::F32 {
            return value_as(&self.forward(x.cast(DType::F32)), dtype);
        }
        layer_norm(x, self.weight.clone(), Some(self.bias.clone()), self.eps)
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
