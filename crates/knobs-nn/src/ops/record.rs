//! What every fused op does to appear in burn's autodiff graph as one op: take its inputs'
//! nodes as the op's parents, run the CPU kernel on their plain values, and keep what the
//! backward pass needs as the op's state.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
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
/// Three forms:
/// - `record!(op, strategy, [x, w], body)`: compute bound (under any strategy the output is
///   kept, so nothing before it is recomputed); the state is `body`'s.
/// - `record!(op, strategy, [x, w], keep [0], body)`: the same, and the inputs at the listed
///   positions (maybe none: `keep []`) go to burn's checkpointer instead of into the state:
///   the state is `(body's, Vec<NodeId>)`, and the backward pass gets them back with
///   [`kept`]. Under balanced checkpointing an input that is cheap to recompute (a norm's or
///   an activation's output) is then recomputed, not held from the forward pass to the backward.
/// - `record!(op, strategy, [x], keep [0], recompute |ids| retro, body)`: also memory bound:
///   `retro` (a `RetroForward`, given the inputs' node ids) recomputes the output in the
///   backward pass when a later op needs it, under balanced checkpointing.
macro_rules! record {
    ($op:expr, $strategy:expr, [$($t:ident),+], $($rest:tt)+) => {
        match $strategy {
            Some(burn::tensor::GradientCheckpointingStrategy::Balanced) => {
                $crate::ops::record::record!(@on burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing, $op, [$($t),+], $($rest)+)
            }
            _ => $crate::ops::record::record!(@on burn::backend::autodiff::checkpoint::strategy::NoCheckpointing, $op, [$($t),+], $($rest)+),
        }
    };
    (@on $strategy:ty, $op:expr, [$($t:ident),+], keep [$($k:expr),*], recompute $retro:expr, $body:expr) => {{
        $crate::ops::record::record!(@inputs $strategy, [$($t),+], parents, inputs);
        let (out, state) = $body;
        let ids: Vec<burn::backend::autodiff::NodeId> = inputs.iter().map(|t| t.id()).collect();
        let prep = $op.prepare::<$strategy>(parents.try_into().ok()?).memory_bound().retro_forward($retro(&ids)).parents(inputs.iter());
        $crate::ops::record::record!(@finish prep, inputs, [$($k),*], out, state)
    }};
    (@on $strategy:ty, $op:expr, [$($t:ident),+], keep [$($k:expr),*], $body:expr) => {{
        $crate::ops::record::record!(@inputs $strategy, [$($t),+], parents, inputs);
        let (out, state) = $body;
        let prep = $op.prepare::<$strategy>(parents.try_into().ok()?).compute_bound();
        $crate::ops::record::record!(@finish prep, inputs, [$($k),*], out, state)
    }};
    (@on $strategy:ty, $op:expr, [$($t:ident),+], $body:expr) => {{
        use burn::backend::autodiff::ops::OpsKind;
        $crate::ops::record::record!(@inputs $strategy, [$($t),+], parents, inputs);
        drop(inputs);
        let (out, state) = $body;
        let out = match $op.prepare::<$strategy>(parents.try_into().ok()?).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Some(burn::tensor::Tensor::from_primitive::<B>(out))
    }};
    // The listed tensors as plain primitives under their own names; their node guards in
    // `$parents`, the autodiff tensors themselves in `$inputs`.
    (@inputs $strategy:ty, [$($t:ident),+], $parents:ident, $inputs:ident) => {
        #[allow(unused_imports)]
        use burn::backend::autodiff::ops::Backward;
        type B = burn::backend::Autodiff<burn::backend::Flex, $strategy>;
        let mut $parents = Vec::new();
        let mut $inputs = Vec::new();
        $(
            let $t = {
                let input = $t.try_into_primitive::<B>().ok()?;
                $inputs.push(input.clone());
                let (primitive, node) = input.into_parts();
                $parents.push(node);
                primitive
            };
        )+
    };
    (@finish $prep:ident, $inputs:ident, [$($k:expr),*], $out:ident, $state:ident) => {{
        use burn::backend::autodiff::ops::OpsKind;
        let out = match $prep.stateful() {
            // `keep []` checkpoints nothing.
            #[allow(unused_mut)]
            OpsKind::Tracked(mut prep) => {
                let kept = vec![$(prep.checkpoint(&$inputs[$k])),*];
                prep.finish(($state, kept), $out)
            }
            OpsKind::UnTracked(prep) => prep.finish($out),
        };
        drop($inputs);
        Some(burn::tensor::Tensor::from_primitive::<B>(out))
    }};
}
pub(crate) use record;

/// An input that [`record!`]'s `keep` sent to the checkpointer, back in the backward pass
/// (recomputed there if that is what the strategy chose).
pub(crate) fn kept(checkpointer: &mut Checkpointer, id: NodeId) -> FlexTensor {
    checkpointer.retrieve_node_output::<FlexTensor>(id)
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::{max_rel, values};
    use crate::ops::{gelu, low_rank, silu};
    use crate::{Init, cpu, cpu_autodiff, cpu_autodiff_checkpointed};
    use burn::tensor::{Device, Tensor};

    /// A chain of ops that hand their inputs to the checkpointer (the activations are also
    /// recomputed under balanced checkpointing): the gradients are the same with and without
    /// checkpointing, and the same as burn's own ops give.
    #[test]
    fn kept_and_recomputed_inputs_give_the_same_gradients() {
        let mut init = Init::new(11);
        let (x, a, b) = (init.normal::<2>([6, 40], 1.0, &cpu()), init.normal::<2>([3, 40], 1.0, &cpu()), init.normal::<2>([5, 3], 1.0, &cpu()));
        let probe = init.normal::<2>([6, 5], 1.0, &cpu());
        let grads = |device: &Device, fused: bool| {
            let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), device).require_grad();
            let (x, a, b) = (on(&x), on(&a), on(&b));
            let h = if fused { gelu(silu(x.clone())) } else { burn::tensor::activation::gelu(burn::tensor::activation::silu(x.clone())) };
            let y = if fused { low_rank(h, a.clone(), b.clone(), 0.5) } else { low_rank::decomposed(h, a.clone(), b.clone(), 0.5) };
            let g = (y * Tensor::<2>::from_data(probe.to_data(), device)).sum().backward();
            [values(x.grad(&g).unwrap()), values(a.grad(&g).unwrap()), values(b.grad(&g).unwrap())]
        };
        let want = grads(&cpu_autodiff(), false);
        for (device, name) in [(cpu_autodiff(), "plain"), (cpu_autodiff_checkpointed(), "checkpointed")] {
            for (got, want) in grads(&device, true).iter().zip(&want) {
                let err = max_rel(got, want);
                assert!(err < 1e-5, "{name}: {err}");
            }
        }
    }
}
