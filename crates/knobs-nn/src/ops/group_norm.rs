//! Group normalisation as one operation with its own backward pass on the CPU backend. From
//! burn's ops it is ten (mean, centre, square, mean, add, root, divide, reshape, scale, shift)
//! whose autodiff keeps their intermediates and runs a broadcast reduction per op on the way
//! back: the backward took 10x the forward at SD-1.5's 64x64 level. Here two passes forward
//! (mean, then variance about it) and two back, over each group's values while they are in
//! cache; only the input and two numbers per group are kept. The GPU backends take
//! `group_norm_portable` under autodiff, which keeps the same.
use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::fresh::written;
use super::matrix::min_len;
use crate::param::{f32_value, value_as};
use super::record::{lifted, record};

/// Values below which the work stays on one thread.
const PARALLEL_FLOATS: usize = 1 << 15;

/// The shape as the kernels see it: `[batch, channels, positions]` in `groups` groups.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    channels: usize,
    positions: usize,
    groups: usize,
}

impl Dims {
    /// Values of one (sample, group): its channels' planes, one after another.
    fn group_len(&self) -> usize {
        self.channels / self.groups * self.positions
    }
}

/// `x` `[B, C, positions]` normalised over each sample's groups of `C / groups` channels, then
/// scaled by `weight` `[C]` and shifted by `bias` `[C]`, as `torch.nn.GroupNorm`. The
/// statistics are f32 whatever `x`'s dtype (mixed precision, as autocast runs it), the result
/// in `x`'s dtype; `weight` and `bias` are f32.
pub fn group_norm(x: Tensor<3>, weight: Tensor<1>, bias: Tensor<1>, groups: usize, eps: f64) -> Tensor<3> {
    let fusable = fusable(&x, &weight, &bias, groups);
    // The GPU backends: the same op from burn's ops, with a backward that keeps only the input,
    // in its own dtype (half under mixed precision, where a cast first would keep an f32 copy).
    #[cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan"))]
    if fusable
        && (x.is_tracked() || weight.is_tracked() || bias.is_tracked())
        && let Some(y) = super::group_norm_portable::group_norm::<burn::backend::Cube>(x.clone(), weight.clone(), bias.clone(), groups, eps)
    {
        return y;
    }
    let dtype = x.dtype();
    if dtype != DType::F32 {
        return value_as(&group_norm(f32_value(&x), weight, bias, groups, eps), dtype);
    }
    if fusable && let Some(y) = fused(&x, &weight, &bias, groups, eps) {
        return y;
    }
    decomposed(x, weight, bias, groups, eps)
}

/// `silu(group_norm(..))`, as every resnet block and the VAE's and UNet's last layers take
/// it. Where nothing is differentiated (generation) on the CPU in f32 it is one pass: SiLU
/// applied to each block of normalised values while they are in L1, where the two ops wrote
/// the whole tensor and read it back (a 128 MiB one per VAE resnet at 512 px), with the
/// values the two give (the same SiLU kernel).
pub fn group_norm_silu(x: Tensor<3>, weight: Tensor<1>, bias: Tensor<1>, groups: usize, eps: f64) -> Tensor<3> {
    let plain = !(x.is_autodiff() || weight.is_autodiff() || bias.is_autodiff());
    if plain
        && x.dtype() == DType::F32
        && fusable(&x, &weight, &bias, groups)
        && let Some(y) = untracked(&x, &weight, &bias, groups, eps, true)
    {
        return y;
    }
    super::activation::silu(group_norm(x, weight, bias, groups, eps))
}

/// Whether the kernel takes these weights and groups (f32 weight and bias, whole groups).
fn fusable(x: &Tensor<3>, weight: &Tensor<1>, bias: &Tensor<1>, groups: usize) -> bool {
    [weight.dtype(), bias.dtype()].iter().all(|&d| d == DType::F32) && groups > 0 && x.dims()[1].is_multiple_of(groups)
}

/// The kernel on the CPU backend where nothing is differentiated (with `silu`, SiLU of its
/// output); `None` on other backends.
fn untracked(x: &Tensor<3>, weight: &Tensor<1>, bias: &Tensor<1>, groups: usize, eps: f64, silu: bool) -> Option<Tensor<3>> {
    let [batch, channels, positions] = x.dims();
    let flex_of = |t: Tensor<1>| t.try_into_primitive::<Flex>().ok().map(|t| t.to_contiguous());
    let x = x.clone().try_into_primitive::<Flex>().ok()?.to_contiguous();
    let (w, b) = (flex_of(weight.clone())?, flex_of(bias.clone())?);
    let (y, _) = forward(slice(&x), slice(&w), slice(&b), Dims { batch, channels, positions, groups }, eps as f32, silu);
    Some(Tensor::from_primitive::<Flex>(flex(y, [batch, channels, positions])))
}

/// The same from burn's ops: other backends, and the tests' reference.
pub fn decomposed(x: Tensor<3>, weight: Tensor<1>, bias: Tensor<1>, groups: usize, eps: f64) -> Tensor<3> {
    normalized(x, weight, bias, groups, eps).0
}

/// [`decomposed`]'s output, with each (sample, group)'s mean and standard deviation
/// (`[B, groups, 1, 1]`), which `group_norm_portable`'s backward pass reads.
pub(super) fn normalized(x: Tensor<3>, weight: Tensor<1>, bias: Tensor<1>, groups: usize, eps: f64) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
    let [n, c, positions] = x.dims();
    let g = grouped(x, groups);
    let mean = group_mean(g.clone());
    let centered = g - mean.clone();
    let std = (group_mean(centered.clone().powi_scalar(2)) + eps).sqrt();
    let normed: Tensor<3> = (centered / std.clone()).reshape([n, c, positions]);
    (normed * weight.reshape([1, c, 1]) + bias.reshape([1, c, 1]), mean, std)
}

/// `[B, C, positions]` as `[B, groups, rows, len / rows]`: each group's values in
/// [`rows_per_group`] rows.
pub(super) fn grouped(t: Tensor<3>, groups: usize) -> Tensor<4> {
    let [n, c, positions] = t.dims();
    let len = c / groups * positions;
    let rows = rows_per_group(len);
    t.reshape([n, groups, rows, len / rows])
}

/// The mean over each (sample, group) of a [`grouped`] tensor: along its rows, then across
/// them (rows of equal length, so the mean of their means is the group's mean).
pub(super) fn group_mean(t: Tensor<4>) -> Tensor<4> {
    t.mean_dim(3).mean_dim(2)
}

/// How many equal rows each group's values are reduced as, first along them, then across:
/// one row a group leaves a GPU 32 rows of up to 40,960 values to reduce at SD's GroupNorm,
/// 32 workgroups busy and the rest idle (a quarter of an SD-1.5 step on an H200, profiled).
/// A power of two, at most 256, that leaves rows of at least 512 values.
fn rows_per_group(len: usize) -> usize {
    let mut rows = 1;
    while rows < 256 && len.is_multiple_of(rows * 2) && len / (rows * 2) >= 512 {
        rows *= 2;
    }
    rows
}

/// The kernel on the CPU backend, with or without autodiff; `None` on other backends.
fn fused(x: &Tensor<3>, weight: &Tensor<1>, bias: &Tensor<1>, groups: usize, eps: f64) -> Option<Tensor<3>> {
    let any_autodiff = x.is_autodiff() || weight.is_autodiff() || bias.is_autodiff();
    if !any_autodiff {
        return untracked(x, weight, bias, groups, eps, false);
    }
    let [batch, channels, positions] = x.dims();
    let dims = Dims { batch, channels, positions, groups };
    let eps = eps as f32;
    // A plain input meets trainable parameters (or the other way round): all on autodiff,
    // the lifted tensors untracked.
    let strategy = [x.gradient_checkpointing_strategy(), weight.gradient_checkpointing_strategy(), bias.gradient_checkpointing_strategy()].into_iter().flatten().next();
    let (x, w, b) = (lifted(x, strategy), lifted(weight, strategy), lifted(bias, strategy));
    record!(GroupNormOp, strategy, [x, w, b], {
        let (x, w, b) = (x.to_contiguous(), w.to_contiguous(), b.to_contiguous());
        let (y, stats) = forward(slice(&x), slice(&w), slice(&b), dims, eps, false);
        (flex(y, [batch, channels, positions]), Saved { x, w, stats, dims })
    })
}

pub(super) fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor (checked before the kernel)")
}

pub(super) fn flex<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// `sum f(a[k], b[k])`, eight running f32 sums at a time (so that it vectorises) added in f64.
pub(super) fn sum_pairs(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    let mut lanes = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ac.remainder().iter().zip(bc.remainder()).map(|(&a, &b)| f(a, b) as f64).sum::<f64>();
    for (a, b) in ac.zip(bc) {
        for ((l, &a), &b) in lanes.iter_mut().zip(a).zip(b) {
            *l += f(a, b);
        }
    }
    lanes.iter().map(|&l| l as f64).sum::<f64>() + tail
}

/// Normalised values a block at a time, with `silu`: 1 KiB on the stack.
const SILU_BLOCK: usize = 256;

/// The normalised, scaled and shifted values (with `silu`, SiLU of them), and each (sample,
/// group)'s mean and reciprocal standard deviation, interleaved.
fn forward(x: &[f32], w: &[f32], b: &[f32], d: Dims, eps: f32, silu: bool) -> (Vec<f32>, Vec<f32>) {
    let (len, per_group) = (d.group_len(), d.channels / d.groups);
    let isa = super::lanes::isa();
    let mut stats = vec![0.0f32; 2 * d.batch * d.groups];
    let pieces = min_len(x.len() >= PARALLEL_FLOATS);
    let normalise = |y: &mut [MaybeUninit<f32>]| y.par_chunks_mut(len).zip(stats.par_chunks_mut(2)).with_min_len(pieces).enumerate().for_each(|(i, (y, stats))| {
        let x = &x[i * len..][..len];
        let mean = (sum_pairs(x, x, |v, _| v) / len as f64) as f32;
        // About the mean, as torch: no cancellation between two large sums.
        let var = sum_pairs(x, x, |v, _| (v - mean) * (v - mean)) / len as f64;
        let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
        stats.copy_from_slice(&[mean, rstd]);
        let first = i % d.groups * per_group;
        for (c, (y, x)) in (first..first + per_group).zip(y.chunks_exact_mut(d.positions).zip(x.chunks_exact(d.positions))) {
            let (scale, shift) = (rstd * w[c], b[c]);
            if !silu {
                for (y, &x) in y.iter_mut().zip(x) {
                    y.write((x - mean) * scale + shift);
                }
                continue;
            }
            let mut block = [0.0f32; SILU_BLOCK];
            for (y, x) in y.chunks_mut(SILU_BLOCK).zip(x.chunks(SILU_BLOCK)) {
                let normed = &mut block[..x.len()];
                for (n, &x) in normed.iter_mut().zip(x) {
                    *n = (x - mean) * scale + shift;
                }
                super::activation::silu_into(normed, y, isa);
            }
        }
    });
    // SAFETY: the groups cover every value (x is batch x groups of `len`), each written.
    let y = unsafe { written(x.len(), normalise) };
    (y, stats)
}

/// What the backward pass needs: the input, the weight, and the statistics.
#[derive(Clone, Debug)]
struct Saved {
    x: FlexTensor,
    w: FlexTensor,
    stats: Vec<f32>,
    dims: Dims,
}

/// Gradients from the output gradient `g`: the input's (when `want_x`), and per channel the
/// weight's and the bias's, `sum g x^` and `sum g` over samples and positions.
fn backward(x: &[f32], w: &[f32], stats: &[f32], g: &[f32], d: Dims, want_x: bool) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let (len, per_group) = (d.group_len(), d.channels / d.groups);
    let mut dx = vec![0.0f32; if want_x { x.len() } else { 0 }];
    // Per (sample, channel): sum g x^ and sum g.
    let mut sums = vec![0.0f64; 2 * d.batch * d.channels];
    let pieces = min_len(x.len() >= PARALLEL_FLOATS);
    sums.par_chunks_mut(2 * per_group).with_min_len(pieces).enumerate().for_each(|(i, sums)| {
        let (mean, rstd) = (stats[2 * i], stats[2 * i + 1]);
        let (x, g) = (&x[i * len..][..len], &g[i * len..][..len]);
        for (s, (x, g)) in sums.chunks_exact_mut(2).zip(x.chunks_exact(d.positions).zip(g.chunks_exact(d.positions))) {
            s[0] = sum_pairs(x, g, |x, g| g * (x - mean)) * rstd as f64;
            s[1] = sum_pairs(g, g, |g, _| g);
        }
    });
    if want_x {
        dx.par_chunks_mut(len).with_min_len(pieces).enumerate().for_each(|(i, dx)| {
            let (mean, rstd) = (stats[2 * i], stats[2 * i + 1]);
            let first = i % d.groups * per_group;
            // With dx^ = g w: dx = rstd (dx^ - mean(dx^) - x^ mean(dx^ x^)) over the group.
            let own = &sums[2 * per_group * i..][..2 * per_group];
            let (mut m1, mut m2) = (0.0f64, 0.0f64);
            for (c, s) in (first..first + per_group).zip(own.chunks_exact(2)) {
                m2 += w[c] as f64 * s[0];
                m1 += w[c] as f64 * s[1];
            }
            let (m1, m2) = ((m1 / len as f64) as f32, (m2 / len as f64) as f32);
            let (x, g) = (&x[i * len..][..len], &g[i * len..][..len]);
            for (c, (dx, (x, g))) in (first..first + per_group).zip(dx.chunks_exact_mut(d.positions).zip(x.chunks_exact(d.positions).zip(g.chunks_exact(d.positions)))) {
                let a = rstd * w[c];
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    let xhat = (x - mean) * rstd;
                    *dx = a * g - rstd * (m1 + xhat * m2);
                }
            }
        });
    }
    // Over samples in a fixed order.
    let per_channel = |k: usize| (0..d.channels).map(|c| (0..d.batch).map(|n| sums[2 * (n * d.channels + c) + k]).sum::<f64>() as f32).collect();
    (want_x.then_some(dx), per_channel(0), per_channel(1))
}

#[derive(Debug)]
struct GroupNormOp;

impl Backward<Flex, 3> for GroupNormOp {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved { x, w, stats, dims } = ops.state;
        let g = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [px, pw, pb] = ops.parents;
        let (dx, dw, db) = backward(slice(&x), slice(&w), &stats, slice(&g), dims, px.is_some());
        if let (Some(node), Some(dx)) = (px, dx) {
            grads.register::<Flex>(node.id, flex(dx, [dims.batch, dims.channels, dims.positions]));
        }
        if let Some(node) = pw {
            grads.register::<Flex>(node.id, flex(dw, [dims.channels]));
        }
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, flex(db, [dims.channels]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{values, max_rel};
    use crate::{Init, cpu, cpu_autodiff};

    /// (batch, channels, positions, groups): one channel a group, all in one, odd sizes, a
    /// large one that runs on several threads, an offset mean (cancellation in one-pass sums).
    const CASES: [(usize, usize, usize, usize); 5] = [(2, 6, 10, 3), (1, 4, 7, 4), (3, 5, 9, 1), (2, 64, 1024, 32), (1, 8, 33, 2)];

    fn inputs(init: &mut Init, (b, c, p, _): (usize, usize, usize, usize), device: &burn::tensor::Device) -> (Tensor<3>, Tensor<1>, Tensor<1>) {
        // Values far from zero: the variance about the mean must still be exact.
        let x = init.normal::<3>([b, c, p], 2.0, device) + 30.0;
        (x, init.normal([c], 1.0, device), init.normal([c], 1.0, device))
    }

    /// CASES[3] is reduced as 4 rows a group: the split is what the comparisons below check.
    #[test]
    fn long_groups_are_split_into_rows() {
        assert_eq!([rows_per_group(2048), rows_per_group(40960), rows_per_group(35), rows_per_group(1 << 20)], [4, 64, 1, 256]);
    }

    #[test]
    fn forward_matches_burns_ops() {
        let (mut init, device) = (Init::new(1), cpu());
        for case in CASES {
            let (x, w, b) = inputs(&mut init, case, &device);
            // The kernel itself: the fallback would match burn's ops trivially.
            let got = fused(&x, &w, &b, case.3, 1e-5).expect("the CPU kernel applies");
            let want = decomposed(x, w, b, case.3, 1e-5);
            let err = max_rel(values(got), values(want));
            assert!(err < 1e-5, "{case:?}: {err}");
        }
    }

    /// The one-pass `silu(group_norm)` gives the two ops' values: bit for bit where each
    /// channel's plane is whole vectors (SD's), within rounding of SiLU's lanes elsewhere. With
    /// a gradient it is the two ops, and differentiates as they do.
    #[test]
    fn group_norm_then_silu_in_one_pass_gives_the_two_ops_values() {
        let (mut init, device) = (Init::new(3), cpu());
        for case in CASES.into_iter().chain([(1, 64, 4096, 32), (2, 32, 256 + 48, 8)]) {
            let (x, w, b) = inputs(&mut init, case, &device);
            let x = (x - 30.0) * 1.5;
            let want = values(crate::ops::silu(group_norm(x.clone(), w.clone(), b.clone(), case.3, 1e-5)));
            let got = values(group_norm_silu(x, w, b, case.3, 1e-5));
            if case.2 % 16 == 0 {
                assert_eq!(got, want, "{case:?}");
            } else {
                assert!(max_rel(got, want) < 1e-6, "{case:?}");
            }
        }
        let device = cpu_autodiff();
        let (x, w, b) = inputs(&mut init, CASES[3], &device);
        let grads = |f: &dyn Fn(Tensor<3>, Tensor<1>, Tensor<1>) -> Tensor<3>| {
            let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
            let g = f(x.clone(), w.clone(), b.clone()).powi_scalar(2).sum().backward();
            [x.grad(&g).unwrap(), w.grad(&g).unwrap().reshape([1, 1, -1])].map(values)
        };
        let fused = grads(&|x, w, b| group_norm_silu(x, w, b, 32, 1e-5));
        let two = grads(&|x, w, b| crate::ops::silu(group_norm(x, w, b, 32, 1e-5)));
        assert_eq!(fused, two);
    }

    /// Input, weight and bias gradients against burn's ops under a random output gradient;
    /// frozen weight and bias get none, the input still does.
    #[test]
    fn gradients_match_burns_ops() {
        let (mut init, device) = (Init::new(2), cpu_autodiff());
        for case in CASES {
            let (x, w, b) = inputs(&mut init, case, &device);
            let probe = init.normal::<3>(x.dims(), 1.0, &device);
            let grads = |f: fn(Tensor<3>, Tensor<1>, Tensor<1>, usize, f64) -> Tensor<3>| {
                let (x, w, b) = (x.clone().require_grad(), w.clone().require_grad(), b.clone().require_grad());
                let g = (f(x.clone(), w.clone(), b.clone(), case.3, 1e-5) * probe.clone()).sum().backward();
                [x.grad(&g).unwrap(), w.grad(&g).unwrap().reshape([1, 1, -1]), b.grad(&g).unwrap().reshape([1, 1, -1])].map(values)
            };
            let kernel = |x: Tensor<3>, w: Tensor<1>, b: Tensor<1>, g: usize, eps: f64| fused(&x, &w, &b, g, eps).expect("the CPU kernel applies");
            let (ours, burns) = (grads(kernel), grads(decomposed));
            for (name, (a, b)) in ["x", "weight", "bias"].iter().zip(ours.into_iter().zip(burns)) {
                let err = max_rel(a, b);
                assert!(err < 1e-4, "d{name} {case:?}: {err}");
            }
        }
        let (x, w, b) = inputs(&mut init, CASES[0], &device);
        let x = x.require_grad();
        let g = group_norm(x.clone(), w.clone(), b.clone(), 3, 1e-5).powi_scalar(2).sum().backward();
        assert!(x.grad(&g).is_some() && w.grad(&g).is_none() && b.grad(&g).is_none());
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (mut init, device) = (Init::new(3), cpu_autodiff());
        let (x, w, b) = inputs(&mut init, (1, 4, 5, 2), &device);
        let x = x - 30.0;
        let probe = init.normal::<3>([1, 4, 5], 1.0, &device);
        let loss = |x: &Tensor<3>, w: &Tensor<1>| (group_norm(x.clone(), w.clone(), b.clone(), 2, 1e-5) * probe.clone()).sum();
        let (xg, wg) = (x.clone().require_grad(), w.clone().require_grad());
        let g = loss(&xg, &wg).backward();
        let (dx, dw) = (values(xg.grad(&g).unwrap()), values(wg.grad(&g).unwrap()));
        let bumped = |which: usize, idx: usize, delta: f32| {
            let mut v = values(if which == 0 { x.clone() } else { w.clone().reshape([1, 1, -1]) });
            v[idx] += delta;
            let t = |shape: [usize; 3]| Tensor::<1>::from_floats(v.as_slice(), &device).reshape(shape);
            let l = if which == 0 { loss(&t([1, 4, 5]), &w) } else { loss(&x, &t([1, 1, 4]).reshape([4])) };
            l.into_scalar::<f32>() as f64
        };
        for (which, grad) in [(0, &dx), (1, &dw)] {
            for idx in [0, 3, grad.len() - 1] {
                let eps = 1e-2;
                let numeric = (bumped(which, idx, eps) - bumped(which, idx, -eps)) / (2.0 * eps as f64);
                assert!((numeric - grad[idx] as f64).abs() < 2e-3 * (1.0 + numeric.abs()), "input {which} [{idx}]: {} vs {numeric}", grad[idx]);
            }
        }
    }

    /// Each (sample, group) is one thread's, and per-channel sums run over samples in order.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let run = || {
            let (mut init, device) = (Init::new(4), cpu_autodiff());
            let (x, w, b) = inputs(&mut init, (4, 64, 1024, 32), &device);
            let (x, w) = (x.require_grad(), w.require_grad());
            let y = group_norm(x.clone(), w.clone(), b, 32, 1e-5);
            let g = y.clone().powi_scalar(2).sum().backward();
            (values(y), values(x.grad(&g).unwrap()), values(w.grad(&g).unwrap()))
        };
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        let one = pool(1).install(run);
        assert!(one == pool(2).install(run) && one == pool(8).install(run));
    }
}
