//! Group normalisation with its own backward pass on any backend (the GPU ones in practice;
//! the CPU backend has its fused kernel). Under autodiff burn's ops keep the centred values
//! and the normalised ones, two tensors the input's size; this op runs the same ops
//! untracked, keeps the input and two numbers per (sample, group), and forms the normalised
//! values again in the backward pass. Under mixed precision it keeps the input as it came,
//! in half precision, where casting it to f32 first would keep an f32 copy.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DispatchKindConversion, DispatchTensor};
use burn::tensor::{GradientCheckpointingStrategy, Tensor};

use super::group_norm::{group_mean, grouped, normalized};
use super::portable;
use super::record::lifted;
use crate::param::{f32_value, value_as};

/// `group_norm`'s contract (`x` `[B, C, positions]` in any float dtype, `weight` and `bias`
/// `[C]` in f32, the statistics in f32, the result in `x`'s dtype) on backend `IB` under autodiff; `None` when the tensors are not on `IB` with autodiff.
pub(crate) fn group_norm<IB: Backend>(x: Tensor<3>, weight: Tensor<1>, bias: Tensor<1>, groups: usize, eps: f64) -> Option<Tensor<3>>
where
    DispatchTensor: DispatchKindConversion<IB> + DispatchKindConversion<Autodiff<IB, NoCheckpointing>> + DispatchKindConversion<Autodiff<IB, BalancedCheckpointing>>,
{
    // A plain input meets trainable parameters (or the other way round): all on autodiff,
    // the lifted tensors untracked.
    let strategy = [x.gradient_checkpointing_strategy(), weight.gradient_checkpointing_strategy(), bias.gradient_checkpointing_strategy()].into_iter().flatten().next();
    let inputs = (lifted(&x, strategy), lifted(&weight, strategy), lifted(&bias, strategy));
    let op = PortableGroupNorm { groups, eps };
    match strategy {
        Some(GradientCheckpointingStrategy::Balanced) => recorded::<IB, BalancedCheckpointing>(op, inputs),
        _ => recorded::<IB, NoCheckpointing>(op, inputs),
    }
}

fn recorded<IB: Backend, C: CheckpointStrategy>(op: PortableGroupNorm, (x, w, b): (Tensor<3>, Tensor<1>, Tensor<1>)) -> Option<Tensor<3>>
where
    DispatchTensor: DispatchKindConversion<IB> + DispatchKindConversion<Autodiff<IB, C>>,
{
    let inputs = [x.try_into_primitive::<Autodiff<IB, C>>().ok()?, w.try_into_primitive::<Autodiff<IB, C>>().ok()?, b.try_into_primitive::<Autodiff<IB, C>>().ok()?];
    let out = portable::recorded::<IB, C, _, 3>(op, inputs, |[x, w, b]| {
        let x_value = Tensor::<3>::from_primitive::<IB>(x.clone());
        let dtype = x_value.dtype();
        let (y, mean, std) = normalized(f32_value(&x_value), Tensor::from_primitive::<IB>(w.clone()), Tensor::from_primitive::<IB>(b), op.groups, op.eps);
        let plain = |t: Tensor<4>| t.try_into_primitive::<IB>().ok();
        Some((value_as(&y, dtype).try_into_primitive::<IB>().ok()?, Saved::<IB> { x, w, mean: plain(mean)?, std: plain(std)? }))
    })?;
    Some(Tensor::from_primitive::<Autodiff<IB, C>>(out))
}

#[derive(Debug, Clone, Copy)]
struct PortableGroupNorm {
    groups: usize,
    eps: f64,
}

/// The input, the weight, and each (sample, group)'s mean and standard deviation
/// (`[B, groups, 1, 1]`).
#[derive(Debug, Clone)]
struct Saved<IB: Backend> {
    x: FloatTensor<IB>,
    w: FloatTensor<IB>,
    mean: FloatTensor<IB>,
    std: FloatTensor<IB>,
}

impl PortableGroupNorm {
    /// With `x^` the normalised input and `dx^ = g w`: `dx = (dx^ - mean(dx^) - x^
    /// mean(dx^ x^)) / std` over each group; the weight's gradient is `sum g x^` and the
    /// bias's `sum g`, over samples and positions.
    fn gradients(&self, x: Tensor<3>, w: Tensor<1>, mean: Tensor<4>, std: Tensor<4>, grad: Tensor<3>) -> [Tensor<3>; 3] {
        let [n, c, positions] = x.dims();
        let xhat = (grouped(x, self.groups) - mean) / std.clone();
        let dxhat = grouped(grad.clone() * w.reshape([1, c, 1]), self.groups);
        let dx = (dxhat.clone() - group_mean(dxhat.clone()) - xhat.clone() * group_mean(dxhat * xhat.clone())) / std;
        let per_channel = |t: Tensor<3>| t.sum_dim(2).sum_dim(0);
        let dw = per_channel(grad.clone() * xhat.reshape([n, c, positions]));
        [dx.reshape([n, c, positions]), dw, per_channel(grad)]
    }
}

impl<IB: Backend> Backward<IB, 3> for PortableGroupNorm
where
    DispatchTensor: DispatchKindConversion<IB>,
{
    type State = Saved<IB>;

    fn backward(self, ops: Ops<Saved<IB>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved { x, w, mean, std } = ops.state;
        let grad = f32_value(&Tensor::<3>::from_primitive::<IB>(grads.consume::<IB>(&ops.node)));
        let x = Tensor::<3>::from_primitive::<IB>(x);
        let (c, dtype) = (x.dims()[1], x.dtype());
        let [dx, dw, db] = self.gradients(f32_value(&x), Tensor::from_primitive::<IB>(w), Tensor::from_primitive::<IB>(mean), Tensor::from_primitive::<IB>(std), grad);
        // The input's gradient in the input's dtype, the parameters' in f32.
        let dx = value_as(&dx, dtype);
        // The weight's and bias's gradients are [1, C, 1]; their parameters are [C].
        let [dw, db] = [dw, db].map(|t| t.reshape([c]).try_into_primitive::<IB>().expect("a gradient on the inputs' backend"));
        let dx = dx.try_into_primitive::<IB>().expect("a gradient on the inputs' backend");
        portable::register::<IB, 3>(grads, ops.parents.map(|p| p.map(|node| node.id)), [dx, dw, db]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::group_norm::decomposed;
    use burn::tensor::DType;
    use crate::ops::testing::{max_rel, values};
    use crate::{Init, cpu, cpu_autodiff, cpu_autodiff_checkpointed};
    use burn::backend::Flex;

    /// Values and every gradient against burn's ops, on the CPU backend (the code is the same
    /// on every backend), plain and checkpointed: groups of one row and of several, the
    /// weight and bias trained and frozen, and a plain input meeting trained parameters.
    #[test]
    fn values_and_gradients_match_burns_ops() {
        for device in [cpu_autodiff(), cpu_autodiff_checkpointed()] {
            for (n, c, positions, groups) in [(2, 6, 7, 3), (1, 4, 600, 2)] {
                let mut init = Init::new(8);
                let x = init.normal::<3>([n, c, positions], 2.0, &device);
                let (w, b) = (init.normal::<1>([c], 1.0, &device), init.normal::<1>([c], 1.0, &device));
                let probe = init.normal::<3>([n, c, positions], 1.0, &device);
                for (x_trains, params_train) in [(true, true), (true, false), (false, true)] {
                    let x = if x_trains { x.clone().require_grad() } else { x.clone().inner() };
                    let (w, b) = if params_train { (w.clone().require_grad(), b.clone().require_grad()) } else { (w.clone(), b.clone()) };
                    let run = |ours: bool| {
                        let y = if ours { group_norm::<Flex>(x.clone(), w.clone(), b.clone(), groups, 1e-5).expect("on the CPU backend") } else { decomposed(x.clone(), w.clone(), b.clone(), groups, 1e-5) };
                        let g = (y.clone() * probe.clone()).sum().backward();
                        let mut out = vec![values(y)];
                        if x_trains {
                            out.push(values(x.grad(&g).unwrap()));
                        }
                        if params_train {
                            out.extend([values(w.grad(&g).unwrap()), values(b.grad(&g).unwrap())]);
                        }
                        out
                    };
                    for (i, (got, want)) in run(true).iter().zip(run(false)).enumerate() {
                        let err = max_rel(got, &want);
                        assert!(err < 1e-5, "{n}x{c}x{positions} in {groups} groups, x trains {x_trains}, params {params_train}, {device:?}: output {i} off by {err}");
                    }
                }
            }
        }
        assert!(group_norm::<Flex>(Init::new(1).normal([1, 4, 3], 1.0, &cpu()), Init::new(2).normal([4], 1.0, &cpu()), Init::new(3).normal([4], 1.0, &cpu()), 2, 1e-5).is_none(), "plain tensors are the callers' to handle");
    }

    /// A half-precision input (mixed precision): the statistics and gradients in f32 as
    /// burn's ops give them when the input is cast to f32 first and the result back, the
    /// input's gradient in its dtype, the parameters' in f32.
    #[test]
    fn a_half_precision_input_stays_in_its_dtype() {
        for dtype in [DType::F16, DType::BF16] {
            let device = cpu_autodiff();
            let mut init = Init::new(9);
            let x = init.normal::<3>([2, 6, 300], 2.0, &device).cast(dtype).require_grad();
            let (w, b) = (init.normal::<1>([6], 1.0, &device).require_grad(), init.normal::<1>([6], 1.0, &device).require_grad());
            let probe = init.normal::<3>([2, 6, 300], 1.0, &device).cast(dtype);
            let run = |ours: bool| {
                let y = if ours {
                    group_norm::<Flex>(x.clone(), w.clone(), b.clone(), 3, 1e-5).expect("on the CPU backend")
                } else {
                    value_as(&decomposed(x.clone().cast(DType::F32), w.clone(), b.clone(), 3, 1e-5), dtype)
                };
                let g = (y.clone() * probe.clone()).sum().backward();
                let (dx, dw) = (x.grad(&g).unwrap(), w.grad(&g).unwrap());
                assert_eq!((y.dtype(), dx.dtype(), dw.dtype()), (dtype, dtype, DType::F32));
                [values(y), values(dx), values(dw), values(b.grad(&g).unwrap())]
            };
            for (i, (got, want)) in run(true).iter().zip(run(false)).enumerate() {
                let err = max_rel(got, &want);
                // One rounding to the half dtype apart at most.
                assert!(err < 5e-3, "{dtype:?}: output {i} off by {err}");
            }
        }
    }
}
