//! What every fused op does to appear in burn's autodiff graph as one op: take its inputs'
//! nodes as the op's parents, run the CPU kernel on their plain values, and keep what the
//! backward pass needs as the op's state.
use burn::tensor::Tensor;

use crate::param::autodiff_with;

/// `t` on autodiff: as it is when it already is, else lifted untracked under `strategy`, so
/// that a plain input (a first layer's, a cached text encoding) meets trainable weights on
/// one backend type.
pub(crate) fn lifted<const D: usize>(t: &Tensor<D>, strategy: Option<burn::tensor::GradientCheckpointingStrategy>) -> Tensor<D> {
    if t.is_autodiff() { t.clone() } else { autodiff_with(t.clone(), strategy) }
}

/// Records `$body` as the op `$op` (a `Backward<Flex, N>` with N the tensors listed) on
/// `Autodiff<Flex, _>` under `$strategy` (an `Option<GradientCheckpointingStrategy>`, the
/// inputs'). Each strategy is its own backend type, hence the macro. The listed tensors
/// (autodiff tensors, moved) are seen by `$body` under the same names as their plain CPU
/// primitives; `$body` returns the output's primitive and the op's state. Expands to an
/// `Option<Tensor>`, `None` (through `?`) when a tensor is not on the CPU backend.
///
/// The ops are compute bound: under any strategy their output is kept, so nothing before them
/// is recomputed.
macro_rules! record {
    ($op:expr, $strategy:expr, [$($t:ident),+], $body:expr) => {
        match $strategy {
            Some(burn::tensor::GradientCheckpointingStrategy::Balanced) => {
                $crate::ops::record::record!(@on burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing, $op, [$($t),+], $body)
            }
            _ => $crate::ops::record::record!(@on burn::backend::autodiff::checkpoint::strategy::NoCheckpointing, $op, [$($t),+], $body),
        }
    };
    (@on $strategy:ty, $op:expr, [$($t:ident),+], $body:expr) => {{
        use burn::backend::autodiff::ops::{Backward, OpsKind};
        type B = burn::backend::Autodiff<burn::backend::Flex, $strategy>;
        let mut parents = Vec::new();
        $(
            let $t = {
                let (primitive, node) = $t.try_into_primitive::<B>().ok()?.into_parts();
                parents.push(node);
                primitive
            };
        )+
        let (out, state) = $body;
        let out = match $op.prepare::<$strategy>(parents.try_into().ok()?).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Some(burn::tensor::Tensor::from_primitive::<B>(out))
    }};
}
pub(crate) use record;
