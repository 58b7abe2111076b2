//! `x W^T` for a frozen weight stored in half precision, as one operation with its own
//! backward. burn's ops would keep the widened f32 copy of `W` for the input gradient, so a
//! model stored in f16 would hold both precisions until the backward pass; this op keeps only
//! the half-precision weight (shared with the parameter) and widens it again when needed.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::Flex;
use burn::tensor::{DType, Tensor};

use super::record::record;

/// `x` `[rows, in]` times the transpose of the frozen half-precision `w` `[out, in]`; `None`
/// when this op does not apply (no autodiff, a trainable or f32 weight, another backend).
pub fn linear(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    if !x.is_autodiff() || w.is_require_grad() || w.dtype() == DType::F32 || x.dtype() != DType::F32 {
        return None;
    }
    let half = w.clone().inner();
    let x = x.clone();
    record!(FrozenLinear, x.gradient_checkpointing_strategy(), [x], {
        let x = Tensor::<2>::from_primitive::<Flex>(x);
        (x.matmul(half.clone().cast(DType::F32).transpose()).try_into_primitive::<Flex>().ok()?, half)
    })
}

#[derive(Debug)]
struct FrozenLinear;

impl Backward<Flex, 1> for FrozenLinear {
    /// The half-precision weight, outside autodiff.
    type State = Tensor<2>;

    fn backward(self, ops: Ops<Tensor<2>, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = Tensor::<2>::from_primitive::<Flex>(grads.consume::<Flex>(&ops.node));
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let dx = grad.matmul(ops.state.cast(DType::F32));
            grads.register::<Flex>(node.id, dx.try_into_primitive::<Flex>().expect("a flex tensor"));
        }
    }
}
