//! What an op with its own backward pass needs to appear in burn's autodiff graph on any
//! backend (`record!` is the CPU backend's kernels'): its inputs' nodes as the op's parents, their
//! plain values to the forward pass, and the state the backward pass reads.
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend};

/// The output of `forward` (given the inputs' plain values, it returns the output and the
/// state) recorded as `op` on `Autodiff<IB, C>`; `None` when `forward` gives none.
pub(crate) fn recorded<IB: Backend, C: CheckpointStrategy, Op: Backward<IB, N>, const N: usize>(
    op: Op,
    inputs: [FloatTensor<Autodiff<IB, C>>; N],
    forward: impl FnOnce([FloatTensor<IB>; N]) -> Option<(FloatTensor<IB>, Op::State)>,
) -> Option<FloatTensor<Autodiff<IB, C>>> {
    let (plain, parents): (Vec<_>, Vec<_>) = inputs.into_iter().map(|t| t.into_parts()).unzip();
    let (out, state) = forward(plain.try_into().ok()?)?;
    Some(match op.prepare::<C>(parents.try_into().ok()?).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    })
}

/// The output of `forward` (given the input's plain value) recorded as `op` on `Autodiff<IB,
/// C>`, for an op cheap to redo: the input goes to burn's checkpointer (the state is its id,
/// which the backward pass gets back with `retrieve_node_output`), and the op is memory
/// bound, so under balanced checkpointing `retro` (given the input's id) recomputes the
/// output where a later op needs it instead of it being held.
// Used by the GPU backends' ops only.
#[cfg_attr(not(any(test, feature = "cuda", feature = "wgpu", feature = "vulkan")), allow(dead_code))]
pub(crate) fn recorded_elementwise<IB: Backend, C: CheckpointStrategy, Op: Backward<IB, 1, State = NodeId>, R: RetroForward>(
    op: Op,
    input: FloatTensor<Autodiff<IB, C>>,
    retro: impl FnOnce(NodeId) -> R,
    forward: impl FnOnce(FloatTensor<IB>) -> FloatTensor<IB>,
) -> FloatTensor<Autodiff<IB, C>> {
    match op.prepare::<C>([input.node()]).memory_bound().retro_forward(retro(input.id())).parents([&input]).stateful() {
        OpsKind::Tracked(mut prep) => {
            let state = prep.checkpoint(&input);
            prep.finish(state, forward(input.into_primitive()))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(input.into_primitive())),
    }
}

/// Gives each parent that takes part (`Some`) its gradient, in order.
// Used by the GPU backends' ops only.
#[cfg_attr(not(any(test, feature = "cuda", feature = "wgpu", feature = "vulkan")), allow(dead_code))]
pub(crate) fn register<IB: Backend, const N: usize>(grads: &mut Gradients, parents: [Option<NodeId>; N], gradients: [FloatTensor<IB>; N]) {
    for (parent, g) in parents.into_iter().zip(gradients) {
        if let Some(id) = parent {
            grads.register::<IB>(id, g);
        }
    }
}
