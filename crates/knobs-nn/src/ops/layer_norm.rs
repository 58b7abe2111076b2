//! Layer normalisation over the last dimension as one operation with its own backward pass on
//! the CPU backend. burn's autodiff records it as its eight ops (mean, centre, square, mean,
//! add, root, divide, scale, shift), keeps the centred values and runs a broadcast reduction
//! per op on the way back: forward and backward of SD-1.5's `[4096, 320]` took 4.4 ms where
//! PyTorch takes 0.9. Here one pass for the statistics and one for the output forward, one
//! per row back, and only the input and two numbers a row are kept. On the GPU backends it
//! is GroupNorm's portable op with one group of one position per row, which keeps the same.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::module;
use burn::tensor::{DType, Shape, Tensor};
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::half_pieces::{Scratch, Values, filled_beside};
use super::group_norm::{flex, slice, sum_pairs};
use super::record::{lifted, record};
use crate::param::{f32_value, value_as};

/// Values a parallel piece of rows holds at least; fewer stay on one thread.
const PIECE: usize = 1 << 14;

/// `x` `[..., C]` normalised over its last dimension, scaled by `weight` `[C]` and shifted by
/// `bias` `[C]`, as `torch.nn.LayerNorm`. The statistics are f32 whatever `x`'s dtype (mixed
/// precision, as autocast runs it), the result in `x`'s dtype; `weight` and `bias` are f32.
pub fn layer_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, bias: Tensor<1>, eps: f64) -> Tensor<D> {
    let dims = x.dims();
    let c = dims[D - 1];
    let rows = dims.iter().product::<usize>() / c.max(1);
    let f32_params = weight.dtype() == DType::F32 && bias.dtype() == DType::F32;
    #[cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan"))]
    if f32_params
        && c > 0
        && (x.is_tracked() || weight.is_tracked() || bias.is_tracked())
        && let Some(y) = super::group_norm_portable::group_norm::<burn::backend::Cube>(x.clone().reshape([rows, c, 1]), weight.clone(), bias.clone(), 1, eps)
    {
        return y.reshape(dims);
    }
    let dtype = x.dtype();
    // f16 and bf16 under autodiff too: widened a piece at a time (`half_pieces`), the input
    // kept as it came.
    if f32_params
        && c > 0
        && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        && let Some(y) = fused(x.clone().reshape([rows, c]), &weight, &bias, eps)
    {
        return y.reshape(dims);
    }
    if dtype != DType::F32 {
        return value_as(&layer_norm(f32_value(&x), weight, bias, eps), dtype);
    }
    module::layer_norm(x, weight, Some(bias), eps)
}

/// The kernel on the CPU backend under autodiff; `None` without autodiff and on other backends.
fn fused(x: Tensor<2>, weight: &Tensor<1>, bias: &Tensor<1>, eps: f64) -> Option<Tensor<2>> {
    let c = x.dims()[1];
    let eps = eps as f32;
    // Without autodiff burn-flex's own layer_norm is faster (0.235 against 0.311 ms at
    // [4096, 320]): nothing is kept, so this kernel has nothing to add there.
    if !(x.is_autodiff() || weight.is_autodiff() || bias.is_autodiff()) {
        return None;
    }
    // A plain input meets trainable parameters (or the other way round): all on autodiff,
    // the lifted tensors untracked.
    let strategy = [x.gradient_checkpointing_strategy(), weight.gradient_checkpointing_strategy(), bias.gradient_checkpointing_strategy()].into_iter().flatten().next();
    let (x, w, b) = (lifted(&x, strategy), lifted(weight, strategy), lifted(bias, strategy));
    record!(LayerNormOp, strategy, [x, w, b], {
        let (x, w, b) = (x.to_contiguous(), w.to_contiguous(), b.to_contiguous());
        let (y, stats) = forward(&x, slice(&w), slice(&b), c, eps);
        (y, Saved { x, w, stats, c })
    })
}

/// Rows per parallel piece: fixed by the width, so results do not depend on the threads.
fn rows_per_piece(c: usize) -> usize {
    PIECE.div_ceil(c).max(1)
}

/// Each row's mean and reciprocal standard deviation (about the mean, as torch).
fn stats(x: &[f32], eps: f32) -> [f32; 2] {
    let n = x.len() as f64;
    let mean = (sum_pairs(x, x, |v, _| v) / n) as f32;
    let var = sum_pairs(x, x, |v, _| (v - mean) * (v - mean)) / n;
    [mean, (1.0 / (var + eps as f64).sqrt()) as f32]
}

/// The normalised, scaled and shifted rows `[rows, c]` in `x`'s dtype, and each row's mean
/// and reciprocal standard deviation, interleaved.
fn forward(x: &FlexTensor, w: &[f32], b: &[f32], c: usize, eps: f32) -> (FlexTensor, Vec<f32>) {
    let xs = Values::of(x).expect("an f32, f16 or bf16 input");
    let rows = x.layout().num_elements() / c;
    let mut stats_out = vec![0.0f32; 2 * rows];
    let per = rows_per_piece(c);
    // Every value of each row is written.
    let y = filled_beside(Shape::new([rows, c]), x.dtype(), per * c, (&mut stats_out, 2 * per), |start, y, s, (scratch, _)| {
        let x = xs.f32s(start..start + y.len(), scratch);
        for ((y, x), s) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(s.chunks_exact_mut(2)) {
            let [mean, rstd] = stats(x, eps);
            s.copy_from_slice(&[mean, rstd]);
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                y.write((x - mean) * rstd * w + b);
            }
        }
    });
    (y, stats_out)
}

/// What the backward pass needs: the input, the weight, and the statistics.
#[derive(Clone, Debug)]
struct Saved {
    x: FlexTensor,
    w: FlexTensor,
    stats: Vec<f32>,
    c: usize,
}

/// Gradients from the output gradient `g`: the input's in `x`'s dtype (when `want_x`), and
/// when `want_params` the weight's and the bias's, `sum g x^` and `sum g` over rows (per
/// piece of rows, then over pieces in order).
fn backward(x: &FlexTensor, w: &[f32], stats: &[f32], g: &FlexTensor, c: usize, want_x: bool, want_params: bool) -> (Option<FlexTensor>, [Vec<f32>; 2]) {
    let (xs, gs) = (Values::of(x).expect("an f32, f16 or bf16 input"), Values::of(g).expect("an f32, f16 or bf16 gradient"));
    let rows = x.layout().num_elements() / c;
    let per = rows_per_piece(c);
    let pieces = rows.div_ceil(per);
    // Per piece: sum g x^ over its rows, then sum g.
    let mut partial = vec![0.0f32; 2 * c * pieces];
    // Piece `i`'s rows: the input's gradient into `dx` (when it is wanted, else empty), the
    // parameters' into `partial` (when wanted).
    let work = |i: usize, dx: &mut [MaybeUninit<f32>], partial: &mut [f32], (sx, sg): &mut Scratch| {
        let range = i * per * c..((i + 1) * per).min(rows) * c;
        let (x, g) = (xs.f32s(range.clone(), sx), gs.f32s(range, sg));
        let mut dxhat = Vec::with_capacity(if dx.is_empty() { 0 } else { c });
        for (r, (x, g)) in x.chunks_exact(c).zip(g.chunks_exact(c)).enumerate() {
            let (mean, rstd) = (stats[2 * (i * per + r)], stats[2 * (i * per + r) + 1]);
            if !dx.is_empty() {
                // With dx^ = g w: dx = rstd (dx^ - mean(dx^) - x^ mean(dx^ x^)).
                dxhat.clear();
                dxhat.extend(g.iter().zip(w).map(|(&g, &w)| g * w));
                let m1 = (sum_pairs(&dxhat, &dxhat, |d, _| d) / c as f64) as f32;
                let m2 = (sum_pairs(&dxhat, x, |d, x| d * (x - mean)) * rstd as f64 / c as f64) as f32;
                for ((dx, &d), &x) in dx[r * c..][..c].iter_mut().zip(dxhat.iter()).zip(x) {
                    dx.write(rstd * (d - m1 - (x - mean) * rstd * m2));
                }
            }
            if want_params {
                let (gx, gs) = partial.split_at_mut(c);
                for (((gx, gs), &x), &g) in gx.iter_mut().zip(gs).zip(x).zip(g) {
                    *gx += g * (x - mean) * rstd;
                    *gs += g;
                }
            }
        }
    };
    let dx = if want_x {
        Some(filled_beside(Shape::new([rows, c]), x.dtype(), per * c, (&mut partial, 2 * c), |start, dx, p, s| work(start / (per * c), dx, p, s)))
    } else {
        partial.par_chunks_mut(2 * c).enumerate().for_each_init(Scratch::default, |s, (i, p)| work(i, &mut [], p, s));
        None
    };
    let summed = |k: usize| (0..c).map(|j| (0..pieces).map(|p| partial[2 * c * p + k * c + j] as f64).sum::<f64>() as f32).collect();
    let params = if want_params { [summed(0), summed(1)] } else { [Vec::new(), Vec::new()] };
    (dx, params)
}

#[derive(Debug)]
struct LayerNormOp;

impl Backward<Flex, 3> for LayerNormOp {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved { x, w, stats, c } = ops.state;
        let g = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [px, pw, pb] = ops.parents;
        let (dx, [dw, db]) = backward(&x, slice(&w), &stats, &g, c, px.is_some(), pw.is_some() || pb.is_some());
        if let (Some(node), Some(dx)) = (px, dx) {
            grads.register::<Flex>(node.id, dx);
        }
        for (parent, grad) in [(pw, dw), (pb, db)] {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, flex(grad, [c]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_rel, values};
    use crate::{Init, cpu, cpu_autodiff, cpu_autodiff_checkpointed};

    /// (rows, width): one row, odd widths, several pieces with a shorter last one.
    const CASES: [(usize, usize); 4] = [(1, 7), (5, 33), (3000, 40), (700, 320)];

    /// Values and every gradient against burn's ops, plain and checkpointed, on inputs far
    /// from zero (the variance about the mean must still be exact); frozen parameters get no
    /// gradient, the input still does.
    #[test]
    fn values_and_gradients_match_burns_ops() {
        for device in [cpu_autodiff(), cpu_autodiff_checkpointed()] {
            for (rows, c) in CASES {
                let mut init = Init::new(3);
                let x = init.normal::<3>([1, rows, c], 2.0, &device) + 30.0;
                let (w, b) = (init.normal::<1>([c], 1.0, &device), init.normal::<1>([c], 1.0, &device));
                let probe = init.normal::<3>([1, rows, c], 1.0, &device);
                for params_train in [true, false] {
                    let x = x.clone().require_grad();
                    let (w, b) = if params_train { (w.clone().require_grad(), b.clone().require_grad()) } else { (w.clone(), b.clone()) };
                    let run = |ours: bool| {
                        let y = if ours { layer_norm(x.clone(), w.clone(), b.clone(), 1e-5) } else { module::layer_norm(x.clone(), w.clone(), Some(b.clone()), 1e-5) };
                        let g = (y.clone() * probe.clone()).sum().backward();
                        assert_eq!(w.grad(&g).is_some(), params_train);
                        let mut out = vec![values(y), values(x.grad(&g).unwrap())];
                        if params_train {
                            out.extend([values(w.grad(&g).unwrap()), values(b.grad(&g).unwrap())]);
                        }
                        out
                    };
                    for (i, (got, want)) in run(true).iter().zip(run(false)).enumerate() {
                        let err = max_rel(got, &want);
                        assert!(err < 1e-4, "[{rows}, {c}], params train {params_train}, {device:?}: output {i} off by {err}");
                    }
                }
            }
        }
    }

    /// f16 and bf16 under autodiff, plain and checkpointed: the f32 kernel on the widened
    /// input rounded once, bit for bit, value and every gradient (the input's in its dtype),
    /// in one piece and in several.
    #[test]
    fn half_precision_is_the_f32_kernel_rounded() {
        for device in [cpu_autodiff(), cpu_autodiff_checkpointed()] {
            for dtype in [DType::BF16, DType::F16] {
                for (rows, c) in [(5, 33), (700, 320)] {
                    let mut init = Init::new(7);
                    let x = (init.normal::<2>([rows, c], 2.0, &device) + 3.0).cast(dtype);
                    let (w, b) = (init.normal::<1>([c], 1.0, &device).require_grad(), init.normal::<1>([c], 1.0, &device).require_grad());
                    let probe = init.normal::<2>([rows, c], 1.0, &device);
                    let run = |widen: bool| {
                        let x = if widen { x.clone().cast(DType::F32).require_grad() } else { x.clone().require_grad() };
                        let y = layer_norm(x.clone(), w.clone(), b.clone(), 1e-5);
                        let y = if widen { crate::param::value_as(&y, dtype) } else { y };
                        assert_eq!(y.dtype(), dtype);
                        let g = (crate::param::f32_value(&y) * probe.clone()).sum().backward();
                        let dx = x.grad(&g).unwrap();
                        let dx = if widen { crate::param::value_as(&dx, dtype) } else { dx };
                        assert_eq!(dx.dtype(), dtype);
                        [values(y), values(dx), values(w.grad(&g).unwrap()), values(b.grad(&g).unwrap())]
                    };
                    assert!(run(false) == run(true), "{dtype:?} [{rows}, {c}] on {device:?}");
                }
            }
        }
    }

    /// Without autodiff it is burn-flex's layer_norm, the same bits; the kernel under autodiff
    /// gives the same values within 1e-5.
    #[test]
    fn without_autodiff_it_is_burns_and_agrees_with_the_kernel() {
        let mut init = Init::new(4);
        let (x, w, b) = (init.normal::<2>([50, 96], 3.0, &cpu()), init.normal::<1>([96], 1.0, &cpu()), init.normal::<1>([96], 1.0, &cpu()));
        let plain = values(layer_norm(x.clone(), w.clone(), b.clone(), 1e-5));
        assert!(fused(x.clone(), &w, &b, 1e-5).is_none());
        assert!(plain == values(module::layer_norm(x.clone(), w.clone(), Some(b.clone()), 1e-5)));
        let on = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &cpu_autodiff());
        let tracked = layer_norm(on(&x).require_grad(), on(&w.clone().reshape([1, 96])).reshape([96]), on(&b.clone().reshape([1, 96])).reshape([96]), 1e-5);
        let err = max_rel(values(tracked), plain);
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (mut init, device) = (Init::new(5), cpu_autodiff());
        let (x, w, b) = (init.normal::<2>([2, 5], 1.0, &device), init.normal::<1>([5], 1.0, &device), init.normal::<1>([5], 1.0, &device));
        let probe = init.normal::<2>([2, 5], 1.0, &device);
        let loss = |x: &Tensor<2>, w: &Tensor<1>| (layer_norm(x.clone(), w.clone(), b.clone(), 1e-5) * probe.clone()).sum().into_scalar::<f32>() as f64;
        let (xg, wg) = (x.clone().require_grad(), w.clone().require_grad());
        let g = (layer_norm(xg.clone(), wg.clone(), b.clone(), 1e-5) * probe.clone()).sum().backward();
        let (dx, dw) = (values(xg.grad(&g).unwrap()), values(wg.grad(&g).unwrap()));
        let eps = 1e-2;
        for idx in [0, 4, 7] {
            let bumped = |d: f32| {
                let mut v = values(x.clone());
                v[idx] += d;
                loss(&Tensor::<1>::from_floats(v.as_slice(), &device).reshape([2, 5]), &w)
            };
            let numeric = (bumped(eps) - bumped(-eps)) / (2.0 * eps as f64);
            assert!((numeric - dx[idx] as f64).abs() < 2e-3 * (1.0 + numeric.abs()), "dx[{idx}]: {} vs {numeric}", dx[idx]);
        }
        for idx in [0, 3] {
            let bumped = |d: f32| {
                let mut v = values(w.clone());
                v[idx] += d;
                loss(&x, &Tensor::<1>::from_floats(v.as_slice(), &device))
            };
            let numeric = (bumped(eps) - bumped(-eps)) / (2.0 * eps as f64);
            assert!((numeric - dw[idx] as f64).abs() < 2e-3 * (1.0 + numeric.abs()), "dw[{idx}]: {} vs {numeric}", dw[idx]);
        }
    }

    /// Rows are worked in pieces fixed by the width, and the parameters' sums run over pieces
    /// in order.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let run = || {
            let (mut init, device) = (Init::new(6), cpu_autodiff());
            let x = init.normal::<2>([3000, 40], 1.0, &device).require_grad();
            let (w, b) = (init.normal::<1>([40], 1.0, &device).require_grad(), init.normal::<1>([40], 1.0, &device));
            let y = layer_norm(x.clone(), w.clone(), b, 1e-5);
            let g = y.clone().powi_scalar(2).sum().backward();
            (values(y), values(x.grad(&g).unwrap()), values(w.grad(&g).unwrap()))
        };
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        let one = pool(1).install(run);
        assert!(one == pool(2).install(run) && one == pool(8).install(run));
    }
}
