//! SiLU, GELU and GEGLU with their own backward pass on any backend (the GPU ones in
//! practice; the CPU backend has its fused kernels). Under autodiff burn records SiLU as a
//! sigmoid and a product, which keep the input and the sigmoid; GEGLU as two narrowed views,
//! GELU and a product, which keep the gate's GELU too and pad each half's gradient to full
//! width with zeros before adding them; and GELU's backward on the GPU backends is the
//! derivative of GELU's tanh approximation, not of the exact GELU its forward computes.
//! Here each op keeps only its input, its backward is one element-wise expression (which
//! burn's fusion runs as one kernel) with the exact derivative, as PyTorch's, and under
//! balanced checkpointing its output is recomputed where a later op needs it. A half-precision
//! input (mixed precision) is computed in f32 and rounded once, forward and back, as
//! PyTorch's kernels do; burn's ops rounded after every step.
use std::marker::PhantomData;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DispatchKindConversion, DispatchTensor};
use burn::tensor::{GradientCheckpointingStrategy, Tensor, activation};

use super::portable;
use crate::param::{f32_value, value_as};

/// Which function.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Silu,
    Gelu,
    /// `h * gelu(g)` for `[h, g]`, the halves of the last dimension (of even width).
    Geglu,
}

/// SiLU on backend `IB` under autodiff; `None` when `x` is not on `IB` with autodiff.
pub(crate) fn silu<IB: Backend, const D: usize>(x: Tensor<D>) -> Option<Tensor<D>>
where
    DispatchTensor: DispatchKindConversion<IB> + DispatchKindConversion<Autodiff<IB, NoCheckpointing>> + DispatchKindConversion<Autodiff<IB, BalancedCheckpointing>>,
{
    on_strategy::<IB, D>(Kind::Silu, x)
}

/// GELU (the exact, erf form) on backend `IB` under autodiff.
pub(crate) fn gelu<IB: Backend, const D: usize>(x: Tensor<D>) -> Option<Tensor<D>>
where
    DispatchTensor: DispatchKindConversion<IB> + DispatchKindConversion<Autodiff<IB, NoCheckpointing>> + DispatchKindConversion<Autodiff<IB, BalancedCheckpointing>>,
{
    on_strategy::<IB, D>(Kind::Gelu, x)
}

/// GEGLU (`geglu`'s contract) on backend `IB` under autodiff; `None` also for an odd width.
pub(crate) fn geglu<IB: Backend, const D: usize>(y: Tensor<D>) -> Option<Tensor<D>>
where
    DispatchTensor: DispatchKindConversion<IB> + DispatchKindConversion<Autodiff<IB, NoCheckpointing>> + DispatchKindConversion<Autodiff<IB, BalancedCheckpointing>>,
{
    if !y.dims()[D - 1].is_multiple_of(2) {
        return None;
    }
    on_strategy::<IB, D>(Kind::Geglu, y)
}

fn on_strategy<IB: Backend, const D: usize>(kind: Kind, x: Tensor<D>) -> Option<Tensor<D>>
where
    DispatchTensor: DispatchKindConversion<IB> + DispatchKindConversion<Autodiff<IB, NoCheckpointing>> + DispatchKindConversion<Autodiff<IB, BalancedCheckpointing>>,
{
    match x.gradient_checkpointing_strategy() {
        Some(GradientCheckpointingStrategy::Balanced) => recorded::<IB, BalancedCheckpointing, D>(kind, x),
        _ => recorded::<IB, NoCheckpointing, D>(kind, x),
    }
}

fn recorded<IB: Backend, C: CheckpointStrategy, const D: usize>(kind: Kind, x: Tensor<D>) -> Option<Tensor<D>>
where
    DispatchTensor: DispatchKindConversion<IB> + DispatchKindConversion<Autodiff<IB, C>>,
{
    let input = x.try_into_primitive::<Autodiff<IB, C>>().ok()?;
    let retro = |x: NodeId| Recompute::<IB, D> { x, kind, backend: PhantomData };
    let out = portable::recorded_elementwise::<IB, C, _, _>(Elementwise::<D> { kind }, input, retro, |x| forward::<IB, D>(kind, x));
    Some(Tensor::from_primitive::<Autodiff<IB, C>>(out))
}

fn forward<IB: Backend, const D: usize>(kind: Kind, x: FloatTensor<IB>) -> FloatTensor<IB>
where
    DispatchTensor: DispatchKindConversion<IB>,
{
    let x = Tensor::<D>::from_primitive::<IB>(x);
    let dtype = x.dtype();
    let x = f32_value(&x);
    let y = match kind {
        Kind::Silu => activation::silu(x),
        Kind::Gelu => activation::gelu(x),
        Kind::Geglu => {
            let [h, g] = halves(x);
            h * activation::gelu(g)
        }
    };
    value_as(&y, dtype).try_into_primitive::<IB>().expect("a result on the input's backend")
}

/// `[h, g]`, the halves of the last dimension.
fn halves<const D: usize>(y: Tensor<D>) -> [Tensor<D>; 2] {
    let inner = y.dims()[D - 1] / 2;
    [y.clone().narrow(D - 1, 0, inner), y.narrow(D - 1, inner, inner)]
}

/// GELU's slope, `Phi(x) + x phi(x)`, with `Phi` the standard normal's distribution and
/// `phi` its density.
fn gelu_slope<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let cdf = ((x.clone() * std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0) * 0.5;
    let pdf = (x.clone().powi_scalar(2) * -0.5).exp() * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    cdf + x * pdf
}

/// The input's gradient from the input `x` and the output's gradient `g`.
fn input_gradient<const D: usize>(kind: Kind, x: Tensor<D>, g: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let (x, g) = (f32_value(&x), f32_value(&g));
    let dx = match kind {
        // s (1 + x (1 - s)) with s = sigmoid(x).
        Kind::Silu => {
            let s = activation::sigmoid(x.clone());
            g * s.clone() * (x * (-s + 1.0) + 1.0)
        }
        Kind::Gelu => g * gelu_slope(x),
        Kind::Geglu => {
            let [h, gate] = halves(x);
            let dh = g.clone() * activation::gelu(gate.clone());
            let dgate = g * h * gelu_slope(gate);
            Tensor::cat(vec![dh, dgate], D - 1)
        }
    };
    value_as(&dx, dtype)
}

/// The op on tensors of rank `D`.
#[derive(Debug)]
struct Elementwise<const D: usize> {
    kind: Kind,
}

impl<IB: Backend, const D: usize> Backward<IB, 1> for Elementwise<D>
where
    DispatchTensor: DispatchKindConversion<IB>,
{
    /// The input's checkpoint.
    type State = NodeId;

    fn backward(self, ops: Ops<NodeId, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let g = Tensor::<D>::from_primitive::<IB>(grads.consume::<IB>(&ops.node));
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let x = Tensor::<D>::from_primitive::<IB>(checkpointer.retrieve_node_output::<FloatTensor<IB>>(ops.state));
            let dx = input_gradient(self.kind, x, g).try_into_primitive::<IB>().expect("a gradient on the input's backend");
            portable::register::<IB, 1>(grads, [Some(node.id)], [dx]);
        }
    }
}

/// The output again from the input, in the backward pass.
#[derive(Debug)]
struct Recompute<IB, const D: usize> {
    x: NodeId,
    kind: Kind,
    backend: PhantomData<IB>,
}

impl<IB: Backend, const D: usize> RetroForward for Recompute<IB, D>
where
    DispatchTensor: DispatchKindConversion<IB>,
{
    fn forward(&self, states: &mut BackwardStates, out: NodeId) {
        let x = states.get_state::<FloatTensor<IB>>(&self.x);
        states.save(out, forward::<IB, D>(self.kind, x));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_rel, values};
    use crate::{Init, cpu, cpu_autodiff, cpu_autodiff_checkpointed};
    use burn::backend::Flex;

    type Pair = (&'static str, fn(Tensor<2>) -> Option<Tensor<2>>, fn(Tensor<2>) -> Tensor<2>);
    /// Ours on the CPU backend (the code is the same on every backend) and burn's ops there,
    /// whose GELU backward is exact.
    const PAIRS: [Pair; 3] = [
        ("silu", silu::<Flex, 2>, activation::silu),
        ("gelu", gelu::<Flex, 2>, activation::gelu),
        ("geglu", geglu::<Flex, 2>, |y| {
            let [h, g] = halves(y);
            h * activation::gelu(g)
        }),
    ];

    /// Values and input gradients against burn's ops, plain and checkpointed, with the op
    /// twice in a row: under balanced checkpointing the first one's output, which the second
    /// one's backward needs, is recomputed.
    #[test]
    fn values_and_gradients_match_burns_ops() {
        for device in [cpu_autodiff(), cpu_autodiff_checkpointed()] {
            let mut init = Init::new(5);
            let x = init.normal::<2>([3, 1004], 3.0, &device).require_grad();
            for (name, ours, burns) in PAIRS {
                let twice = |f: &dyn Fn(Tensor<2>) -> Tensor<2>| {
                    let y = f(f(x.clone()));
                    let probe = Init::new(6).normal::<2>(y.dims(), 1.0, &device);
                    let g = (y.clone() * probe).sum().backward();
                    [values(y), values(x.grad(&g).unwrap())]
                };
                let got = twice(&|t| ours(t).expect("on the CPU backend under autodiff"));
                let want = twice(&burns);
                for (what, (a, b)) in ["output", "gradient"].iter().zip(got.iter().zip(&want)) {
                    let err = max_rel(a, b);
                    assert!(err < 1e-5, "{name} {what}, {device:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let device = cpu_autodiff();
        for (name, ours, _) in PAIRS {
            for x0 in [-6.0f32, -1.3, -0.2, 0.0, 0.7, 2.5, 9.0] {
                // GEGLU's pair (x0, x0 + 0.5): value and gate.
                let point = |v: f32| if name == "geglu" { vec![v, v + 0.5] } else { vec![v] };
                let at = |v: f32, dev: &burn::tensor::Device| Tensor::<1>::from_floats(point(v).as_slice(), dev).reshape([1, -1]);
                let x = at(x0, &device).require_grad();
                let analytic: f32 = values(x.grad(&ours(x.clone()).unwrap().sum().backward()).unwrap()).iter().sum();
                // Moving every input by eps: the gradients' sum.
                let f = |v: f32| values(ours(at(v, &device)).unwrap())[0] as f64;
                let eps = 1e-2;
                let numeric = (f(x0 + eps) - f(x0 - eps)) / (2.0 * eps as f64);
                assert!((analytic as f64 - numeric).abs() < 1e-3 * (1.0 + numeric.abs()), "{name}'({x0}) = {analytic}, numeric {numeric}");
            }
        }
    }

    /// In half precision the output and the input's gradient are the f32 results rounded
    /// once: the same bits as the op on the widened input, narrowed.
    #[test]
    fn half_precision_is_computed_in_f32_and_rounded_once() {
        for dtype in [burn::tensor::DType::BF16, burn::tensor::DType::F16] {
            let device = cpu_autodiff();
            let mut init = Init::new(7);
            let x = init.normal::<2>([3, 1004], 3.0, &device).cast(dtype);
            let probe = init.normal::<2>([3, 1004], 1.0, &device).cast(dtype);
            for (name, ours, _) in PAIRS {
                let run = |x: Tensor<2>, probe: Tensor<2>| {
                    let x = x.require_grad();
                    let y = ours(x.clone()).expect("on the CPU backend under autodiff");
                    let g = (y.clone() * probe.narrow(1, 0, y.dims()[1])).sum().backward();
                    [y, x.grad(&g).unwrap()]
                };
                let half = run(x.clone(), probe.clone()).map(|t| {
                    assert_eq!(t.dtype(), dtype, "{name}");
                    values(t)
                });
                let wide = run(x.clone().cast(burn::tensor::DType::F32), probe.clone().cast(burn::tensor::DType::F32)).map(|t| values(t.cast(dtype)));
                assert!(half == wide, "{name} in {dtype:?}: not the f32 results rounded once");
            }
        }
    }

    /// Plain tensors are the callers' to handle, as is an odd GEGLU width.
    #[test]
    fn refuses_what_is_not_its_to_take() {
        let plain = Init::new(1).normal::<2>([2, 6], 1.0, &cpu());
        assert!(silu::<Flex, 2>(plain.clone()).is_none() && geglu::<Flex, 2>(plain).is_none());
        assert!(geglu::<Flex, 2>(Init::new(1).normal::<2>([2, 5], 1.0, &cpu_autodiff())).is_none());
    }
}
