//! Attention with its own backward pass on any backend (the GPU ones in practice; the CPU
//! backend has its fused kernel). burn 0.22's autodiff records `module::attention` as the
//! decomposed ops, which keep every head's N x M probabilities from the forward pass to the
//! backward: 512 MiB a layer for SD-1.5 at 512 px, batch 1, more than the layer's weights
//! and activations together. Here the forward is the backend's own fused attention and keeps
//! only q, k, v and the output; the backward recomputes the probabilities for one block of
//! query rows at a time (the softmax of a row needs only that row's scores), so what it holds
//! at once is bounded by [`BLOCK_SCORES`], whatever the sequence length.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DispatchKindConversion, DispatchTensor};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, GradientCheckpointingStrategy, Tensor};

use super::portable;
use crate::param::value_as;

/// The most scores (batch x heads x rows x keys) one block of the backward pass computes:
/// 128 MiB in f32. It holds four such buffers at once (scores, probabilities, their gradient
/// and the scores' gradient); fewer rows a block would only launch more, smaller products.
pub(crate) const BLOCK_SCORES: usize = 1 << 25;

/// `attention`'s contract (`q` `[B, N, heads * d]`, `k` and `v` `[B, M, heads * d]`) on
/// backend `IB` under autodiff; `None` when the tensors are not on `IB` with autodiff.
pub(crate) fn attention<IB: Backend>(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, scale: f64, block_scores: usize) -> Option<Tensor<3>>
where
    DispatchTensor: DispatchKindConversion<IB> + DispatchKindConversion<Autodiff<IB, NoCheckpointing>> + DispatchKindConversion<Autodiff<IB, BalancedCheckpointing>>,
{
    let op = BlockedAttention { heads, scale, block_scores };
    match q.gradient_checkpointing_strategy() {
        Some(GradientCheckpointingStrategy::Balanced) => recorded::<IB, BalancedCheckpointing>(op, [q, k, v]),
        _ => recorded::<IB, NoCheckpointing>(op, [q, k, v]),
    }
}

fn recorded<IB: Backend, C: CheckpointStrategy>(op: BlockedAttention, qkv: [Tensor<3>; 3]) -> Option<Tensor<3>>
where
    DispatchTensor: DispatchKindConversion<IB> + DispatchKindConversion<Autodiff<IB, C>>,
{
    let [q, k, v] = qkv;
    let inputs = [q.try_into_primitive::<Autodiff<IB, C>>().ok()?, k.try_into_primitive::<Autodiff<IB, C>>().ok()?, v.try_into_primitive::<Autodiff<IB, C>>().ok()?];
    let out = portable::recorded::<IB, C, _, 3>(op, inputs, |[q, k, v]| {
        let on = |p: &FloatTensor<IB>| Tensor::<3>::from_primitive::<IB>(p.clone());
        let out = op.forward(on(&q), on(&k), on(&v)).try_into_primitive::<IB>().ok()?;
        Some((out.clone(), Saved::<IB> { q, k, v, out }))
    })?;
    Some(Tensor::from_primitive::<Autodiff<IB, C>>(out))
}

#[derive(Debug, Clone, Copy)]
struct BlockedAttention {
    heads: usize,
    scale: f64,
    block_scores: usize,
}

/// The plain values the backward pass starts from.
#[derive(Debug, Clone)]
struct Saved<IB: Backend> {
    q: FloatTensor<IB>,
    k: FloatTensor<IB>,
    v: FloatTensor<IB>,
    out: FloatTensor<IB>,
}

impl BlockedAttention {
    /// `[B, rows, heads * d]` as `[B, heads, rows, d]`.
    fn heads_apart(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, rows, width] = x.dims();
        x.reshape([b, rows, self.heads, width / self.heads]).swap_dims(1, 2)
    }

    /// The inverse of [`Self::heads_apart`].
    fn heads_together(x: Tensor<4>) -> Tensor<3> {
        let [b, heads, rows, d] = x.dims();
        x.swap_dims(1, 2).reshape([b, rows, heads * d])
    }

    fn forward(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        super::attention::backends_own(q, k, v, self.heads, self.scale)
    }

    /// The gradients of q, k and v, from the output's `grad`. Per block of query rows:
    /// `P = softmax(q k^T s)`, `dv += P^T g`, `dS = P * (g v^T - rowsum(g * out))`,
    /// `dq = dS k s`, `dk += dS^T q s`. The softmax and `dS` are in f32 whatever the inputs'
    /// dtype, as autocast runs a softmax.
    fn gradients(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, out: Tensor<3>, grad: Tensor<3>) -> [Tensor<3>; 3] {
        let dtype = q.dtype();
        let (q, k, v, grad) = (self.heads_apart(q), self.heads_apart(k), self.heads_apart(v), self.heads_apart(grad));
        let [b, heads, n, _] = q.dims();
        let m = k.dims()[2];
        let row_dot = (value_as(&grad, DType::F32) * value_as(&self.heads_apart(out), DType::F32)).sum_dim(3);
        let (kt, vt) = (k.clone().swap_dims(2, 3), v.clone().swap_dims(2, 3));
        let rows = (self.block_scores / (b * heads * m).max(1)).clamp(1, n.max(1));
        let (mut dq, mut dk, mut dv) = (Vec::new(), None::<Tensor<4>>, None::<Tensor<4>>);
        for start in (0..n).step_by(rows) {
            let block = start..(start + rows).min(n);
            let rows_of = |x: &Tensor<4>| x.clone().slice([0..b, 0..heads, block.clone()]);
            let (qb, gb) = (rows_of(&q), rows_of(&grad));
            let scores = qb.clone().mul_scalar(self.scale).matmul(kt.clone());
            let probs = softmax(value_as(&scores, DType::F32), 3);
            let dprobs = value_as(&gb.clone().matmul(vt.clone()), DType::F32);
            let dscores = value_as(&(probs.clone() * (dprobs - rows_of(&row_dot))), dtype);
            let add = |sum: Option<Tensor<4>>, x: Tensor<4>| Some(match sum {
                Some(sum) => sum + x,
                None => x,
            });
            dv = add(dv, value_as(&probs, dtype).swap_dims(2, 3).matmul(gb));
            dk = add(dk, dscores.clone().swap_dims(2, 3).matmul(qb).mul_scalar(self.scale));
            dq.push(dscores.matmul(k.clone()).mul_scalar(self.scale));
        }
        let (dk, dv) = match (dk, dv) {
            (Some(dk), Some(dv)) => (dk, dv),
            // No query rows: nothing reached the keys and values.
            _ => (k.zeros_like(), v.zeros_like()),
        };
        let dq = if dq.is_empty() { q.zeros_like() } else { Tensor::cat(dq, 2) };
        [dq, dk, dv].map(Self::heads_together)
    }
}

impl<IB: Backend> Backward<IB, 3> for BlockedAttention
where
    DispatchTensor: DispatchKindConversion<IB>,
{
    type State = Saved<IB>;

    fn backward(self, ops: Ops<Saved<IB>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let on = |p: FloatTensor<IB>| Tensor::<3>::from_primitive::<IB>(p);
        let Saved { q, k, v, out } = ops.state;
        let grad = on(grads.consume::<IB>(&ops.node));
        let dqkv = self.gradients(on(q), on(k), on(v), on(out), grad).map(|g| g.try_into_primitive::<IB>().expect("a gradient on the inputs' backend"));
        portable::register::<IB, 3>(grads, ops.parents.map(|p| p.map(|node| node.id)), dqkv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::decomposed;
    use crate::ops::testing::{max_rel, values};
    use crate::{cpu_autodiff, cpu_autodiff_checkpointed};
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    /// Values and every gradient against the decomposed ops, on the CPU backend (the code is
    /// the same on every backend), plain and checkpointed, with blocks of one row, of a few
    /// rows with a shorter last one, and of all rows; and keys longer than rows and shorter.
    #[test]
    fn values_and_gradients_match_the_decomposed_ops() {
        for device in [cpu_autodiff(), cpu_autodiff_checkpointed()] {
            for (b, n, m, heads, d) in [(2, 13, 20, 2, 5), (1, 40, 7, 3, 4)] {
                let rand = |rows: usize| Tensor::<3>::random([b, rows, heads * d], Distribution::Normal(0.0, 1.0), &device);
                let (q, k, v, w) = (rand(n).require_grad(), rand(m).require_grad(), rand(m).require_grad(), rand(n));
                let run = |blocked: Option<usize>| {
                    let out = match blocked {
                        Some(block_rows) => attention::<Flex>(q.clone(), k.clone(), v.clone(), heads, 0.4, block_rows * b * heads * m).expect("on the CPU backend"),
                        None => decomposed(q.clone(), k.clone(), v.clone(), heads, 0.4),
                    };
                    let g = (out.clone() * w.clone()).sum().backward();
                    [values(out), values(q.grad(&g).unwrap()), values(k.grad(&g).unwrap()), values(v.grad(&g).unwrap())]
                };
                let want = run(None);
                for block_rows in [1, 6, n] {
                    for (name, (got, want)) in ["out", "dq", "dk", "dv"].iter().zip(run(Some(block_rows)).iter().zip(&want)) {
                        let err = max_rel(got, want);
                        assert!(err < 1e-5, "{name}: {err} (n {n} m {m}, blocks of {block_rows} rows)");
                    }
                }
            }
        }
    }

    /// Inputs that need no gradient still get one op (untracked), and plain tensors are not
    /// taken (the caller's other paths handle them).
    #[test]
    fn untracked_and_plain_inputs() {
        let device = cpu_autodiff();
        let x = Tensor::<3>::random([1, 4, 6], Distribution::Normal(0.0, 1.0), &device);
        let out = attention::<Flex>(x.clone(), x.clone(), x.clone(), 2, 0.5, BLOCK_SCORES).expect("on the CPU backend");
        assert!(max_rel(values(out), values(decomposed(x.clone(), x.clone(), x, 2, 0.5))) < 1e-5);
        let plain = Tensor::<3>::random([1, 4, 6], Distribution::Normal(0.0, 1.0), &crate::cpu());
        assert!(attention::<Flex>(plain.clone(), plain.clone(), plain, 2, 0.5, BLOCK_SCORES).is_none());
    }
}
