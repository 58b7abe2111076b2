//! A low-rank product `scale (x A^T) B^T` (a LoRA branch) as one operation with its own
//! backward pass on the CPU backend. From burn's ops it is five (two transposes, two products,
//! a scale), each recorded and stepped back through; a LoRA step has one per adapted layer,
//! and on small models the per-op cost is what the branch costs. Other backends and dtypes
//! take burn's ops.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::lanes::on_lanes;
use super::matrix::min_len;

use burn::backend::autodiff::NodeId;

use super::precision::{converted, widened};
use super::record::{kept, lifted, record};

/// `scale (x A^T) B^T` for `x` `[rows, in]`, `a` `[r, in]`, `b` `[out, r]`. `x` may be f16 or
/// bf16 with f32 factors (a LoRA under mixed precision): the op widens it for its products,
/// keeps it as it came, and gives its gradient in its dtype; the output is f32.
pub fn low_rank(x: Tensor<2>, a: Tensor<2>, b: Tensor<2>, scale: f64) -> Tensor<2> {
    if [&a, &b].iter().all(|t| t.dtype() == DType::F32)
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && let Some(y) = fused(&x, &a, &b, scale as f32)
    {
        return y;
    }
    decomposed(crate::param::f32_value(&x), a, b, scale)
}

/// The same from burn's ops: other backends, and the tests' reference. The rank-r values are
/// scaled, not the full-width output.
pub fn decomposed(x: Tensor<2>, a: Tensor<2>, b: Tensor<2>, scale: f64) -> Tensor<2> {
    (x.matmul(a.transpose()) * scale).matmul(b.transpose())
}

type Plain = Tensor<2>;

/// `(scale x A^T, its product with B^T)` on plain CPU tensors.
fn forward(x: &Plain, a: &Plain, b: &Plain, scale: f32) -> (Plain, Plain) {
    let h = x.clone().matmul(a.clone().transpose()) * scale;
    let y = h.clone().matmul(b.clone().transpose());
    (h, y)
}

fn fused(x: &Tensor<2>, a: &Tensor<2>, b: &Tensor<2>, scale: f32) -> Option<Tensor<2>> {
    if ![x, a, b].iter().any(|t| t.is_autodiff()) {
        let plain = |t: &Tensor<2>| t.clone().try_into_primitive::<Flex>().ok().map(|t| Tensor::<2>::from_primitive::<Flex>(widened(&t)));
        let (_, y) = forward(&plain(x)?, &plain(a)?, &plain(b)?, scale);
        return Some(Tensor::from_primitive::<Flex>(y.try_into_primitive::<Flex>().ok()?));
    }
    // All on autodiff (a plain input, such as a cached text encoding, lifted untracked).
    let strategy = [x, a, b].iter().find_map(|t| t.gradient_checkpointing_strategy());
    let (x, a, b) = (lifted(x, strategy), lifted(a, strategy), lifted(b, strategy));
    // The input goes to the checkpointer: it is a norm's output in a transformer block, which
    // balanced checkpointing recomputes rather than holds.
    record!(LowRank, strategy, [x, a, b], keep [0], {
        let plain = |t| Tensor::<2>::from_primitive::<Flex>(t);
        let x_dtype = x.dtype();
        let (x, a, b) = (plain(widened(&x)), plain(a), plain(b));
        let (h, y) = forward(&x, &a, &b, scale);
        (y.try_into_primitive::<Flex>().ok()?, Saved { a, b, h, scale, x_dtype })
    })
}

#[derive(Debug)]
struct LowRank;

/// The factors, and the scaled rank-r values `h = scale x A^T` (the up projection's input);
/// the input `x` is with the checkpointer.
#[derive(Clone, Debug)]
struct Saved {
    a: Plain,
    b: Plain,
    h: Plain,
    scale: f32,
    /// The input's dtype, its gradient's.
    x_dtype: DType,
}

impl Backward<Flex, 3> for LowRank {
    type State = (Saved, Vec<NodeId>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let (Saved { a, b, h, scale, x_dtype }, kept_x) = ops.state;
        let g = grads.consume::<Flex>(&ops.node);
        let [px, pa, pb] = ops.parents;
        // The input, kept where A trains (in its dtype: widened here).
        let x = pa.as_ref().map(|_| widened(&kept(checkpointer, kept_x[0])));
        if let Some(kernels) = Kernels::new(&g, &a, &b, &h) {
            // The kept input is f32 and contiguous (`widened`).
            let xs = x.as_ref().map(|x| x.as_slice::<f32>().expect("the op's f32 input"));
            let (db, dx, da) = kernels.run(scale, pb.is_some(), px.is_some(), xs);
            let dx = dx.map(|dx| converted(&dx, x_dtype));
            for (parent, grad) in [(pb, db), (px, dx), (pa, da)] {
                if let (Some(node), Some(grad)) = (parent, grad) {
                    grads.register::<Flex>(node.id, grad);
                }
            }
            return;
        }
        let g = Tensor::<2>::from_primitive::<Flex>(g);
        let flex = |t: Plain| t.try_into_primitive::<Flex>().expect("a flex tensor");
        // y = h B^T: dB = g^T h; dh = g B, and through the scale, d(x A^T) = scale dh.
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, flex(g.clone().transpose().matmul(h)));
        }
        if px.is_some() || pa.is_some() {
            let dxa = g.matmul(b) * scale;
            if let (Some(node), Some(x)) = (pa, x) {
                let x = Tensor::<2>::from_primitive::<Flex>(x);
                grads.register::<Flex>(node.id, flex(dxa.clone().transpose().matmul(x)));
            }
            if let Some(node) = px {
                grads.register::<Flex>(node.id, converted(&flex(dxa.matmul(a)), x_dtype));
            }
        }
    }
}

/// Rows per chunk of the backward's passes, at least: each chunk sums its own part of dA and
/// dB, and the parts are added in chunk order, so the results do not depend on the threads.
const CHUNK: usize = 64;
/// Chunks at most (larger chunks beyond): the parts' memory stays bounded.
const CHUNKS: usize = 64;
/// Below this many multiply-adds the passes stay on one thread.
const PARALLEL_WORK: usize = 1 << 18;

/// The backward pass in two passes over the rows, one through the output's gradient `g` and
/// one through the input `x`, where burn's ops took four products (two of them through `g`,
/// one through `x`, each a thin product that gemm runs far below its speed) and a transposed
/// copy of `g`. Rank 4, forward + backward (Xeon, 2 threads): `[4096, 320] -> 320` 3.6 ->
/// 2.7-2.9 ms, `[8192, 320] -> 320` 6.4-7.7 -> 4.9-5.6, `[1024, 640] -> 640` 1.75 -> 1.55;
/// at SDXL's 16x16 level (256 rows, 1280 and 2048 wide) no different.
struct Kernels {
    /// `[rows, out]`, `[r, in]`, `[rows, r]`: contiguous f32.
    g: FlexTensor,
    a: FlexTensor,
    h: FlexTensor,
    /// B transposed, `[r, out]`: each rank's column contiguous.
    bt: Vec<f32>,
    rows: usize,
    out: usize,
    rank: usize,
    d_in: usize,
}

/// A chunk's rows: the first, and how many.
type Span = (usize, usize);

impl Kernels {
    /// Over f32 tensors on the CPU; `None` otherwise (burn's ops then).
    fn new(g: &FlexTensor, a: &Plain, b: &Plain, h: &Plain) -> Option<Kernels> {
        let flex = |t: &Plain| t.clone().try_into_primitive::<Flex>().ok().map(|t| t.to_contiguous());
        let (g, a, b, h) = (g.to_contiguous(), flex(a)?, flex(b)?, flex(h)?);
        let [out, rank] = b.layout().shape().dims::<2>();
        let ([rows, _], [_, d_in]) = (h.layout().shape().dims::<2>(), a.layout().shape().dims::<2>());
        let sizes = [(&g, rows * out), (&a, rank * d_in), (&h, rows * rank), (&b, out * rank)];
        if rank == 0 || !sizes.iter().all(|(t, len)| t.as_slice::<f32>().is_some_and(|s| s.len() == *len)) {
            return None;
        }
        let b = b.as_slice::<f32>()?;
        let bt = (0..rank * out).map(|i| b[(i % out) * rank + i / out]).collect();
        Some(Kernels { g, a, h, bt, rows, out, rank, d_in })
    }

    /// The chunks of the rows: each at least [`CHUNK`] rows, at most [`CHUNKS`] of them.
    fn spans(&self) -> Vec<Span> {
        let chunk = CHUNK.max(self.rows.div_ceil(CHUNKS));
        (0..self.rows).step_by(chunk).map(|first| (first, chunk.min(self.rows - first))).collect()
    }

    /// (dB, dx, dA), each where asked for (dA where `x` is given).
    fn run(&self, scale: f32, want_b: bool, want_x: bool, x: Option<&[f32]>) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
        let (rows, out, rank, d_in) = (self.rows, self.out, self.rank, self.d_in);
        let [g, a, h] = [&self.g, &self.a, &self.h].map(|t| t.as_slice::<f32>().expect("contiguous f32 (checked)"));
        let (spans, isa) = (self.spans(), super::lanes::isa());
        // Rows per chunk (the last may have fewer).
        let chunk = spans.first().map_or(1, |s| s.1);
        // Pass 1, through g: t = scale g B for every row, and each chunk's part of dB^T.
        let mut t = vec![0.0f32; rows * rank];
        let mut parts_b = vec![0.0f32; if want_b { spans.len() * rank * out } else { 0 }];
        let jobs: Vec<_> = spans.iter().zip(t.chunks_mut(chunk * rank)).zip(parts_chunks(&mut parts_b, rank * out, spans.len())).map(|((s, t), p)| (*s, t, p)).collect();
        jobs.into_par_iter().with_min_len(min_len(2 * rows * out * rank >= PARALLEL_WORK)).for_each(|(span, t, part)| through_g(ThroughG { g, bt: &self.bt, h, out, rank, span, t, part, scale }, isa));
        let db = want_b.then(|| {
            let bt = sum_parts(&parts_b, rank * out);
            let db: Vec<f32> = (0..out * rank).map(|i| bt[(i % rank) * out + i / rank]).collect();
            FlexTensor::from_data(TensorData::new(db, [out, rank]))
        });
        // Pass 2, through x: dx = t A for every row, and each chunk's part of dA = t^T x.
        let mut dx = vec![0.0f32; if want_x { rows * d_in } else { 0 }];
        let mut parts_a = vec![0.0f32; if x.is_some() { spans.len() * rank * d_in } else { 0 }];
        if want_x || x.is_some() {
            let t = &t;
            let dxs = parts_chunks(&mut dx, chunk * d_in, spans.len());
            let jobs: Vec<_> = spans.iter().zip(dxs).zip(parts_chunks(&mut parts_a, rank * d_in, spans.len())).map(|((s, d), p)| (*s, d, p)).collect();
            jobs.into_par_iter().with_min_len(min_len(2 * rows * d_in * rank >= PARALLEL_WORK)).for_each(|(span, dx, part)| through_x(ThroughX { a, t, x, d_in, rank, span, dx, part }, isa));
        }
        let dx = want_x.then(|| FlexTensor::from_data(TensorData::new(dx, [rows, d_in])));
        let da = x.map(|_| FlexTensor::from_data(TensorData::new(sum_parts(&parts_a, rank * d_in), [rank, d_in])));
        (db, dx, da)
    }
}

/// `count` consecutive pieces of `len` values of `v` (the last may be shorter), or `count`
/// empty ones where `v` is empty (what is not asked for).
fn parts_chunks(v: &mut [f32], len: usize, count: usize) -> Vec<&mut [f32]> {
    if v.is_empty() {
        return (0..count).map(|_| <&mut [f32]>::default()).collect();
    }
    v.chunks_mut(len.max(1)).collect()
}

/// The parts (each `len` values) added in order.
fn sum_parts(parts: &[f32], len: usize) -> Vec<f32> {
    let mut sum = vec![0.0f32; len];
    for part in parts.chunks_exact(len.max(1)) {
        sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
    }
    sum
}

/// Pass 1 over a chunk's rows (`span`): `t` (their `[r]` values, `scale g_i B`) and, where
/// asked (`part` not empty), `part` (`[r, out]`: the sum of `h_i g_i` over them, dB
/// transposed).
struct ThroughG<'a> {
    g: &'a [f32],
    bt: &'a [f32],
    h: &'a [f32],
    out: usize,
    rank: usize,
    span: Span,
    t: &'a mut [f32],
    part: &'a mut [f32],
    scale: f32,
}

/// Pass 2 over a chunk's rows (`span`; `t` all rows'): where asked (not empty), `dx` (their
/// rows, `t_i A`) and `part` (`[r, in]`: the sum of `t_i x_i` over them, dA).
struct ThroughX<'a> {
    a: &'a [f32],
    t: &'a [f32],
    x: Option<&'a [f32]>,
    d_in: usize,
    rank: usize,
    span: Span,
    dx: &'a mut [f32],
    part: &'a mut [f32],
}

on_lanes! {
    fn through_g(a: ThroughG<'_>) -> () {
        L => {
            let ThroughG { g, bt, h, out, rank, span: (first, count), t, part, scale } = a;
            for i in first..first + count {
                let gi = &g[i * out..][..out];
                for r in 0..rank {
                    t[(i - first) * rank + r] = scale * super::simd::dot::<L>(gi, &bt[r * out..][..out]);
                    if !part.is_empty() {
                        super::simd::axpy::<L>(&mut part[r * out..][..out], h[i * rank + r], gi);
                    }
                }
            }
        }
    }
}

on_lanes! {
    fn through_x(a: ThroughX<'_>) -> () {
        L => {
            let ThroughX { a, t, x, d_in, rank, span: (first, count), dx, part } = a;
            for i in first..first + count {
                let ti = &t[i * rank..][..rank];
                if !dx.is_empty() {
                    let dx = &mut dx[(i - first) * d_in..][..d_in];
                    for (r, &v) in ti.iter().enumerate() {
                        super::simd::axpy::<L>(dx, v, &a[r * d_in..][..d_in]);
                    }
                }
                if let Some(x) = x.filter(|_| !part.is_empty()) {
                    let xi = &x[i * d_in..][..d_in];
                    for (r, &v) in ti.iter().enumerate() {
                        super::simd::axpy::<L>(&mut part[r * d_in..][..d_in], v, xi);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{values, max_rel};
    use crate::{Init, cpu, cpu_autodiff};

    #[test]
    fn forward_and_gradients_match_burns_ops() {
        // Small, and with several chunks of rows over the threads.
        for (seed, [rows, d_in, rank, out]) in [(5, [7, 12, 3, 9]), (6, [300, 70, 4, 1030])] {
            matches_burns_ops(seed, rows, d_in, rank, out);
        }
    }

    fn matches_burns_ops(seed: u64, rows: usize, d_in: usize, rank: usize, out: usize) {
        let mut init = Init::new(seed);
        let (x, a, b) = (init.normal::<2>([rows, d_in], 1.0, &cpu()), init.normal::<2>([rank, d_in], 1.0, &cpu()), init.normal::<2>([out, rank], 1.0, &cpu()));
        // The kernel itself: the fallback would match burn's ops trivially.
        let kernel = |x: Tensor<2>, a: Tensor<2>, b: Tensor<2>, scale: f64| fused(&x, &a, &b, scale as f32).expect("the CPU kernel applies");
        let err = max_rel(values(kernel(x.clone(), a.clone(), b.clone(), 0.5)), values(decomposed(x.clone(), a.clone(), b.clone(), 0.5)));
        assert!(err < 1e-6, "forward {err}");
        let device = cpu_autodiff();
        let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &device).require_grad();
        let probe = init.normal::<2>([rows, out], 1.0, &device);
        let grads = |f: fn(Tensor<2>, Tensor<2>, Tensor<2>, f64) -> Tensor<2>| {
            let (x, a, b) = (on(&x), on(&a), on(&b));
            let g = (f(x.clone(), a.clone(), b.clone(), 0.5) * probe.clone()).sum().backward();
            [x.grad(&g).unwrap(), a.grad(&g).unwrap(), b.grad(&g).unwrap()].map(values)
        };
        for (name, (ours, burns)) in ["x", "A", "B"].iter().zip(grads(kernel).into_iter().zip(grads(decomposed))) {
            let err = max_rel(ours, burns);
            assert!(err < 1e-5, "d{name}: {err}");
        }
        // An untracked input (a cached text encoding) gets nothing; A and B still do.
        let (xu, a2, b2) = (Tensor::<2>::from_data(x.to_data(), &device), on(&a), on(&b));
        let g = low_rank(xu.clone(), a2.clone(), b2.clone(), 0.5).sum().backward();
        assert!(xu.grad(&g).is_none() && a2.grad(&g).is_some() && b2.grad(&g).is_some());
    }

    /// A half-precision input with f32 factors, plain and checkpointed: the output, dA and dB
    /// are the widened input's bit for bit, the input's gradient is theirs narrowed once, in
    /// the input's dtype; the output is f32.
    #[test]
    fn a_half_input_is_its_widened_values() {
        let mut init = Init::new(8);
        let (rows, d_in, rank, out) = (300, 70, 4, 130);
        let (x, a, b) = (init.normal::<2>([rows, d_in], 1.0, &cpu()), init.normal::<2>([rank, d_in], 1.0, &cpu()), init.normal::<2>([out, rank], 1.0, &cpu()));
        let probe = init.normal::<2>([rows, out], 1.0, &cpu());
        for device in [cpu_autodiff(), crate::cpu_autodiff_checkpointed()] {
            for dtype in [DType::BF16, DType::F16] {
                let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &device);
                let half = on(&x).cast(dtype);
                let run = |x: Tensor<2>| {
                    let (x, a, b) = (x.require_grad(), on(&a).require_grad(), on(&b).require_grad());
                    let y = low_rank(x.clone(), a.clone(), b.clone(), 0.5);
                    assert_eq!(y.dtype(), DType::F32);
                    let g = (y.clone() * on(&probe)).sum().backward();
                    let dx = x.grad(&g).unwrap();
                    assert_eq!(dx.dtype(), x.dtype());
                    [values(y), values(crate::param::value_as(&dx, dtype)), values(a.grad(&g).unwrap()), values(b.grad(&g).unwrap())]
                };
                assert!(run(half.clone()) == run(half.clone().cast(DType::F32)), "{dtype:?} on {device:?}");
            }
        }
    }

    /// The gradients' sums run in chunks of rows added in order: the same bits on one thread
    /// as on several.
    #[test]
    fn gradients_do_not_depend_on_the_threads() {
        let mut init = Init::new(7);
        let (x, a, b) = (init.normal::<2>([700, 96], 1.0, &cpu()), init.normal::<2>([8, 96], 1.0, &cpu()), init.normal::<2>([640, 8], 1.0, &cpu()));
        let probe = init.normal::<2>([700, 640], 1.0, &cpu());
        let grads = || {
            let device = cpu_autodiff();
            let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &device).require_grad();
            let (x, a, b) = (on(&x), on(&a), on(&b));
            let g = (low_rank(x.clone(), a.clone(), b.clone(), 0.25) * Tensor::from_data(probe.to_data(), &device)).sum().backward();
            [x.grad(&g).unwrap(), a.grad(&g).unwrap(), b.grad(&g).unwrap()].map(values)
        };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(grads);
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(grads);
        for (name, (one, three)) in ["x", "A", "B"].iter().zip(one.iter().zip(&three)) {
            assert!(one.iter().zip(three).all(|(p, q)| p.to_bits() == q.to_bits()), "d{name} differs across thread counts");
        }
    }
}
