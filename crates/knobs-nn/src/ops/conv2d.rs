//! 2-D convolution with its own backward pass on the CPU backend (`conv_kernel`): the same
//! values as burn's op, with a weight gradient about three times as fast. A frozen layer's
//! weight keeps its Winograd transform between calls (`weight_transforms`). Half precision on
//! other backends is one matrix product (`conv2d_by_matmul`: it sums in f32); the rest, other
//! dtypes and grouped convolutions take burn's op.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor, TensorData, module};

use std::sync::Arc;

use super::bf16_product;
use super::conv2d_by_matmul;
use super::kernel_layout;
use super::matrix::Products;
use crate::param::value_as;
use super::conv_kernel::{self, ConvDims};
use super::record::{lifted, record};
use super::weight_transforms;
use super::precision::widened;
use super::winograd::{self, WeightTransform};

/// `x` `[B, ci, h, w]` convolved with `weight` `[co, ci / groups, kh, kw]`, plus `bias` `[co]`,
/// as [`burn::tensor::module::conv2d`].
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, options: ConvOptions<2>) -> Tensor<4> {
    conv2d_as(x, weight, bias, options, Products::F32)
}

/// [`conv2d`] with its products (forward and backward) in `products`' arithmetic.
pub fn conv2d_as(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, options: ConvOptions<2>, products: Products) -> Tensor<4> {
    convolve(x, weight, bias, options, Weight::Trained, products)
}

/// [`conv2d`] with a weight that stays as it is from call to call (a frozen layer's own, not
/// one computed per call): its Winograd transform is kept for the next call.
pub fn conv2d_frozen(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, options: ConvOptions<2>, products: Products) -> Tensor<4> {
    let kind = Weight::of(&weight, true);
    convolve(x, weight, bias, options, kind, products)
}

/// [`conv2d`] with a frozen weight stored in another precision than `x`'s: a half-precision
/// kernel with f32 activations is widened inside the op, which keeps the stored tensor (not
/// an f32 copy) for the backward pass. The kernel is the one [`conv2d_frozen`] takes for an
/// f32 weight holding the same values, so both give the same bits; its Winograd transform is
/// made per call.
pub fn conv2d_frozen_copy(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, options: ConvOptions<2>, products: Products) -> Tensor<4> {
    let kind = Weight::of(&weight, false);
    convolve(x, weight, bias, options, kind, products)
}

/// The weight as the kernel choice (`winograd::applies`) and `weight_transforms` see it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Weight {
    /// Trained, or of unknown origin.
    Trained,
    /// Frozen; `kept`: the same storage from call to call, so its transform may be kept.
    Frozen { kept: bool },
}

impl Weight {
    /// Frozen unless `weight` takes a gradient.
    fn of(weight: &Tensor<4>, kept: bool) -> Self {
        if weight.is_require_grad() { Weight::Trained } else { Weight::Frozen { kept } }
    }
}

fn convolve(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, options: ConvOptions<2>, kind: Weight, products: Products) -> Tensor<4> {
    if conv2d_by_matmul::wanted(&x, &options) {
        let weight = value_as(&weight, x.dtype());
        return conv2d_by_matmul::conv2d(x, weight, bias, &options);
    }
    // A frozen half-precision kernel meets f32 activations: widened by the kernels below.
    let half_kernel = kind == (Weight::Frozen { kept: false }) && weight.dtype() != DType::F32;
    let f32s = x.dtype() == DType::F32 && (weight.dtype() == DType::F32 || half_kernel) && bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
    if f32s && options.groups == 1 && !options.is_asymmetric() {
        let [batch, c_in, h, w] = x.dims();
        let [c_out, _, kh, kw] = weight.dims();
        let dims = ConvDims {
            batch,
            c_in,
            h,
            w,
            c_out,
            kernel: [kh, kw],
            stride: options.stride,
            padding: options.padding_begin(),
            dilation: options.dilation,
        };
        // One backend for all three: a first layer's plain input meets trainable weights,
        // and weights kept outside autodiff (frozen, stored in half precision) meet tracked
        // activations. The lifted tensors are untracked.
        let strategy = x.gradient_checkpointing_strategy().or(weight.gradient_checkpointing_strategy());
        let (x, weight) = (lifted(&x, strategy), lifted(&weight, strategy));
        let bias = bias.map(|b| lifted(&b, strategy));
        if let Some(out) = fused(&x, &weight, bias.as_ref(), dims, kind, products) {
            return out;
        }
        return module::conv2d(x, value_as(&weight, DType::F32), bias, options);
    }
    let weight = value_as(&weight, x.dtype());
    module::conv2d(x, weight, bias, options)
}

fn fused(x: &Tensor<4>, weight: &Tensor<4>, bias: Option<&Tensor<1>>, dims: ConvDims, kind: Weight, products: Products) -> Option<Tensor<4>> {
    if !x.is_autodiff() {
        let x = x.clone().try_into_primitive::<Flex>().ok()?;
        let w = weight.clone().try_into_primitive::<Flex>().ok()?;
        let b = match bias {
            Some(b) => Some(b.clone().try_into_primitive::<Flex>().ok()?),
            None => None,
        };
        return Some(Tensor::from_primitive::<Flex>(forward(&x, &w, b.as_ref(), dims, kind, products, true)));
    }
    // With a bias the op has three parents.
    let strategy = x.gradient_checkpointing_strategy();
    // Only the weight gradient reads the input: a frozen weight's op (every convolution of a
    // LoRA run) keeps none, so the input (often a SiLU's output, nothing else holds it) is
    // freed after the forward pass.
    let keep_input = weight.is_tracked();
    let (x, w) = (x.clone(), weight.clone());
    let kernel = |x: FlexTensor, w: FlexTensor, b: Option<FlexTensor>| {
        // A kernel laid out by tap stays so: the AMX kernel reads it as it lies.
        let w = if kernel_layout::rows(&w).is_some() { w } else { w.to_contiguous() };
        let x = x.to_contiguous();
        let out = forward(&x, &w, b.as_ref(), dims, kind, products, false);
        (out, Saved { x: keep_input.then_some(x), w, kind, dims, products })
    };
    match bias {
        Some(b) => {
            let b = b.clone();
            record!(Conv2dOp::<3>, strategy, [x, w, b], kernel(x, w, Some(b)))
        }
        None => record!(Conv2dOp::<2>, strategy, [x, w], kernel(x, w, None)),
    }
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor (checked before the kernel)")
}

/// The convolution of `x` with `w` as stored; `untracked`: nothing will be differentiated
/// (generation), so a frozen weight's AMX taps are kept between calls.
#[allow(clippy::too_many_arguments)]
fn forward(x: &FlexTensor, stored: &FlexTensor, bias: Option<&FlexTensor>, dims: ConvDims, kind: Weight, products: Products, untracked: bool) -> FlexTensor {
    let x = x.to_contiguous();
    let bias = bias.map(|b| b.to_contiguous());
    let (xs, bs) = (slice(&x), bias.as_ref().map(slice));
    if products == Products::Bf16
        && dims.is_3x3_same()
        && let Some(rows) = kernel_layout::rows(stored)
    {
        // Laid out by tap only where AMX's convolution runs it.
        let out = bf16_product::conv3x3_by_tap(xs, rows, bs, dims.batch, dims.c_in, dims.c_out, dims.h, dims.w);
        return FlexTensor::from_data(TensorData::new(out, [dims.batch, dims.c_out, dims.h, dims.w]));
    }
    // AMX's taps: kept for a frozen weight where nothing is differentiated, which also lets
    // the small planes take AMX's kernel; made per call only where the plane is large enough.
    let taps = (products == Products::Bf16 && dims.is_3x3_same() && bf16_product::conv3x3_runs(dims.c_in, dims.c_out)).then(|| {
        // A half-precision weight widened only when packed.
        let pack = || bf16_product::conv3x3_taps(slice(&widened(stored)), dims.c_out, dims.c_in, false);
        let kept = (untracked && kind != Weight::Trained).then(|| weight_transforms::packed(stored, [dims.c_out, dims.c_in, 9], bf16_product::conv3x3_taps_bytes(dims.c_out, dims.c_in), pack)).flatten();
        kept.or_else(|| amx_applies(&dims, products, false).then(|| Arc::new(pack())))
    }).flatten();
    let out = if let Some(taps) = taps {
        bf16_product::conv3x3(xs, &taps, bs, dims.batch, dims.c_in, dims.c_out, dims.h, dims.w)
    } else {
        let w = widened(stored);
        let ws = slice(&w);
        match winograd_weight(&w, &dims, kind, false) {
            Some(u) => winograd::forward(xs, &u, bs, &dims, products),
            None => conv_kernel::forward(xs, ws, bs, &dims, products),
        }
    };
    let [oh, ow] = dims.out_hw();
    FlexTensor::from_data(TensorData::new(out, [dims.batch, dims.c_out, oh, ow]))
}

/// Whether `dims` is a 3x3 "same" convolution that AMX's kernel runs under `products`:
/// there it reads the input in place of Winograd's transforms or the unrolled columns, both
/// of which cost more than its products.
fn amx_applies(dims: &ConvDims, products: Products, flipped: bool) -> bool {
    products == Products::Bf16 && dims.is_3x3_same() && bf16_product::conv3x3_applies(dims.c_in, dims.c_out, dims.batch * dims.h * dims.w, flipped)
}

/// The input gradient from `g` where it is another 3x3 "same" convolution that a kernel of
/// its own computes: AMX's with the taps turned, or Winograd's with the flipped transform;
/// `None` where neither applies (then the unrolled columns' backward computes it).
fn same_input_grad(w: &FlexTensor, g: &[f32], dims: &ConvDims, kind: Weight, products: Products) -> Option<Vec<f32>> {
    if amx_applies(dims, products, true) {
        let taps = bf16_product::conv3x3_taps(slice(w), dims.c_out, dims.c_in, true);
        return Some(bf16_product::conv3x3(g, &taps, None, dims.batch, dims.c_out, dims.c_in, dims.h, dims.w));
    }
    winograd_weight(w, dims, kind, true).map(|u| winograd::input_grad(&u, g, dims, products))
}

/// The weight's Winograd transform for the forward pass or (`flipped`) the input gradient,
/// when that kernel applies: a frozen weight's kept between calls while the budget lasts.
fn winograd_weight(w: &FlexTensor, dims: &ConvDims, kind: Weight, flipped: bool) -> Option<Arc<WeightTransform>> {
    if !winograd::applies(dims, kind != Weight::Trained) {
        return None;
    }
    if kind == (Weight::Frozen { kept: true })
        && winograd::keeps(dims)
        && let Some(kept) = weight_transforms::of_frozen(w, dims.c_out, dims.c_in, flipped)
    {
        return Some(kept);
    }
    Some(Arc::new(winograd::transform(slice(w), dims.c_out, dims.c_in, flipped)))
}

/// The convolution; `N` is 3 with a bias, 2 without.
#[derive(Debug)]
struct Conv2dOp<const N: usize>;

#[derive(Clone, Debug)]
struct Saved {
    /// The input, kept only when the weight takes a gradient.
    x: Option<FlexTensor>,
    /// The weight as stored: a frozen half-precision kernel is widened again when needed.
    w: FlexTensor,
    kind: Weight,
    dims: ConvDims,
    products: Products,
}

impl<const N: usize> Backward<Flex, N> for Conv2dOp<N> {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved { x, w, kind, dims, products } = ops.state;
        let w = widened(&w);
        let g = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (px, pw) = (ops.parents[0].clone(), ops.parents[1].clone());
        let same = px.as_ref().and_then(|_| same_input_grad(&w, slice(&g), &dims, kind, products));
        let x = x.as_ref().map_or(&[][..], slice);
        let (dx, dw) = conv_kernel::backward(x, slice(&w), slice(&g), &dims, px.is_some() && same.is_none(), pw.is_some(), products);
        let dx = same.or(dx);
        if let (Some(node), Some(dx)) = (px, dx) {
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, [dims.batch, dims.c_in, dims.h, dims.w])));
        }
        if let (Some(node), Some(dw)) = (pw, dw) {
            let [kh, kw] = dims.kernel;
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dw, [dims.c_out, dims.c_in, kh, kw])));
        }
        if N == 3
            && let Some(node) = ops.parents[N - 1].clone()
        {
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(conv_kernel::bias_grad(slice(&g), &dims), [dims.c_out])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{values, max_rel};
    use crate::{cpu, cpu_autodiff};
    use burn::tensor::Distribution;

    fn rand<const D: usize>(shape: [usize; D], device: &burn::tensor::Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    /// (input shape, co, kernel, stride, padding, dilation): 3x3 as in every resnet, the
    /// strided downsampler, 1x1 shortcuts, odd sizes, dilation and a rectangular kernel.
    #[allow(clippy::type_complexity)]
    const CASES: [([usize; 4], usize, [usize; 2], usize, usize, usize); 6] = [
        ([2, 5, 9, 7], 6, [3, 3], 1, 1, 1),
        ([2, 4, 9, 8], 3, [3, 3], 2, 1, 1),
        ([3, 6, 5, 5], 4, [1, 1], 1, 0, 1),
        ([1, 3, 11, 6], 2, [3, 3], 1, 2, 2),
        ([2, 3, 7, 9], 5, [1, 3], 1, 1, 1),
        ([1, 2, 6, 6], 3, [2, 2], 2, 0, 1),
    ];

    fn options(stride: usize, padding: usize, dilation: usize) -> ConvOptions<2> {
        ConvOptions::new([stride; 2], [padding; 2], [dilation; 2], 1)
    }

    #[test]
    fn forward_matches_burns_convolution() {
        let device = cpu();
        for (shape, co, [kh, kw], s, p, dl) in CASES {
            let x = rand(shape, &device);
            let w = rand([co, shape[1], kh, kw], &device);
            let b = rand([co], &device);
            for bias in [None, Some(b.clone())] {
                let got = conv2d(x.clone(), w.clone(), bias.clone(), options(s, p, dl));
                let want = module::conv2d(x.clone(), w.clone(), bias, options(s, p, dl));
                assert_eq!(got.dims(), want.dims());
                let err = max_rel(values(got), values(want));
                assert!(err < 1e-5, "{shape:?} k{kh}x{kw} s{s} p{p} d{dl}: {err}");
            }
        }
    }

    /// Every gradient (input, weight, bias) against burn's op, and only tracked inputs get one.
    #[test]
    fn gradients_match_burns_convolution() {
        let device = cpu_autodiff();
        for (shape, co, [kh, kw], s, p, dl) in CASES {
            let x = rand(shape, &device).require_grad();
            let w = rand([co, shape[1], kh, kw], &device).require_grad();
            let b = rand([co], &device).require_grad();
            let probe = rand(module::conv2d(x.clone(), w.clone(), None, options(s, p, dl)).dims(), &device);
            let grads_of = |f: fn(Tensor<4>, Tensor<4>, Option<Tensor<1>>, ConvOptions<2>) -> Tensor<4>| {
                let g = (f(x.clone(), w.clone(), Some(b.clone()), options(s, p, dl)) * probe.clone()).sum().backward();
                (values(x.grad(&g).unwrap()), values(w.grad(&g).unwrap()), values(b.grad(&g).unwrap()))
            };
            let (ours, burns) = (grads_of(conv2d), grads_of(module::conv2d));
            for (name, a, b) in [("x", ours.0, burns.0), ("weight", ours.1, burns.1), ("bias", ours.2, burns.2)] {
                let err = max_rel(a, b);
                assert!(err < 1e-5, "d{name} {shape:?} k{kh}x{kw} s{s} p{p} d{dl}: {err}");
            }
        }
        // A frozen weight and an untracked bias get nothing; the input still does, the same
        // as burn's, though the op keeps no input then (Winograd's 3x3 and the general kernel).
        for (shape, k, s) in [([1, 2, 5, 5], 3, 1), ([2, 3, 9, 8], 3, 2), ([1, 4, 6, 6], 1, 1)] {
            let x = rand(shape, &device).require_grad();
            let (w, b) = (rand([3, shape[1], k, k], &device), rand([3], &device));
            let probe = rand(module::conv2d(x.clone(), w.clone(), None, options(s, k / 2, 1)).dims(), &device);
            let dx = |f: fn(Tensor<4>, Tensor<4>, Option<Tensor<1>>, ConvOptions<2>) -> Tensor<4>| {
                let g = (f(x.clone(), w.clone(), Some(b.clone()), options(s, k / 2, 1)) * probe.clone()).sum().backward();
                assert!(w.grad(&g).is_none() && b.grad(&g).is_none());
                values(x.grad(&g).unwrap())
            };
            let err = max_rel(dx(conv2d), dx(module::conv2d));
            assert!(err < 1e-5, "frozen weight, dx {shape:?} k{k} s{s}: {err}");
        }
    }

    /// A frozen f16 kernel passed as stored gives the output and input gradient of the same
    /// values widened to f32 beforehand, bit for bit, with and without checkpointing (3x3 by
    /// Winograd, strided by the general kernel, 1x1).
    #[test]
    fn a_half_precision_kernel_widened_inside_matches_its_f32_copy() {
        for device in [cpu_autodiff(), crate::cpu_autodiff_checkpointed()] {
            for (shape, k, s) in [([2, 3, 8, 8], 3, 1), ([1, 4, 9, 8], 3, 2), ([1, 5, 6, 6], 1, 1)] {
                let half = rand([4, shape[1], k, k], &device).cast(DType::F16);
                let (b, probe, x) = (rand([4], &device), rand([shape[0], 4, 8, 8], &device), rand(shape, &device).to_data());
                let run = |w: Tensor<4>| {
                    let x = Tensor::<4>::from_data(x.clone(), &device).require_grad();
                    let y = conv2d_frozen_copy(x.clone(), w, Some(b.clone()), options(s, k / 2, 1), Products::F32);
                    let [_, _, oh, ow] = y.dims();
                    let g = (y.clone() * probe.clone().slice([0..shape[0], 0..4, 0..oh, 0..ow])).sum().backward();
                    (values(y), values(x.grad(&g).unwrap()))
                };
                assert_eq!(run(half.clone()), run(half.clone().cast(DType::F32)), "{shape:?} k{k} s{s}");
            }
        }
    }

    /// A plain input with trainable weights (a first layer) and frozen weights kept outside
    /// autodiff with tracked input: the same values and gradients as all-autodiff tensors.
    #[test]
    fn mixed_plain_and_autodiff_tensors_take_the_same_path() {
        let (plain, device) = (cpu(), cpu_autodiff());
        let x = rand([2, 3, 6, 6], &plain);
        let w = rand([4, 3, 3, 3], &plain);
        let lifted = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &device);
        let reference = |xg: bool, wg: bool| {
            let (xa, wa) = (lifted(&x), lifted(&w));
            let (xa, wa) = (if xg { xa.require_grad() } else { xa }, if wg { wa.require_grad() } else { wa });
            let g = conv2d(xa.clone(), wa.clone(), None, options(1, 1, 1)).powi_scalar(2).sum().backward();
            values(if xg { xa.grad(&g).unwrap() } else { wa.grad(&g).unwrap() })
        };
        let wa = lifted(&w).require_grad();
        let g = conv2d(x.clone(), wa.clone(), None, options(1, 1, 1)).powi_scalar(2).sum().backward();
        assert!(values(wa.grad(&g).unwrap()) == reference(false, true), "plain input, trainable weight");
        let xa = lifted(&x).require_grad();
        let g = conv2d(xa.clone(), w.clone(), None, options(1, 1, 1)).powi_scalar(2).sum().backward();
        assert!(values(xa.grad(&g).unwrap()) == reference(true, false), "tracked input, plain weight");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let device = cpu_autodiff();
        let x = rand([1, 2, 5, 4], &device);
        let w = rand([3, 2, 3, 3], &device);
        let probe = rand([1, 3, 3, 2], &device);
        let loss = |x: &Tensor<4>, w: &Tensor<4>| (conv2d(x.clone(), w.clone(), None, options(2, 1, 1)) * probe.clone()).sum();
        let (xg, wg) = (x.clone().require_grad(), w.clone().require_grad());
        let g = loss(&xg, &wg).backward();
        let analytic = [values(xg.grad(&g).unwrap()), values(wg.grad(&g).unwrap())];
        let inputs = [&x, &w];
        for (which, grad) in analytic.iter().enumerate() {
            for idx in [0, 7, grad.len() - 1] {
                let bump = |delta: f32| {
                    let mut v = values(inputs[which].clone());
                    v[idx] += delta;
                    let t = Tensor::<1>::from_floats(v.as_slice(), &device).reshape(inputs[which].dims());
                    let (x, w) = if which == 0 { (t, w.clone()) } else { (x.clone(), t) };
                    loss(&x, &w).into_scalar::<f32>() as f64
                };
                let eps = 1e-2;
                let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
                let err = (numeric - grad[idx] as f64).abs();
                assert!(err < 2e-3 * (1.0 + numeric.abs()), "input {which} [{idx}]: {} vs {numeric}", grad[idx]);
            }
        }
    }

    /// A frozen weight's transform is kept and gives the bits the per-call one gives; a weight
    /// changed in place or replaced is never served the old one.
    #[test]
    fn a_frozen_weight_keeps_its_transform_and_never_a_stale_one() {
        let device = cpu();
        let x = rand([2, 16, 6, 6], &device);
        let same = |w: &Tensor<4>| {
            let kept = values(conv2d_frozen(x.clone(), w.clone(), None, options(1, 1, 1), Products::F32));
            let per_call = values(conv2d_frozen_copy(x.clone(), w.clone(), None, options(1, 1, 1), Products::F32));
            kept == values(conv2d(x.clone(), w.clone(), None, options(1, 1, 1))) && kept == per_call
        };
        let storage = |w: &Tensor<4>| w.clone().try_into_primitive::<Flex>().unwrap().to_contiguous();
        let w = rand([24, 16, 3, 3], &device);
        assert!(same(&w) && same(&w), "kept transform, first and second call");
        assert!(weight_transforms::holds(&storage(&w)), "the transform is kept");
        let before = values(conv2d_frozen(x.clone(), w.clone(), None, options(1, 1, 1), Products::F32));
        // Written in place where the storage is not shared, so the kept copy must be.
        let w = w.add_scalar(0.5);
        assert!(same(&w), "changed weight");
        assert!(values(conv2d_frozen(x.clone(), w.clone(), None, options(1, 1, 1), Products::F32)) != before);
        for _ in 0..3 {
            assert!(same(&rand([24, 16, 3, 3], &device)), "a new weight in a dropped one's place");
        }
        // In training: the input gradient through a frozen weight's kept transform.
        let ad = cpu_autodiff();
        let (xa, wa) = (Tensor::<4>::from_data(x.to_data(), &ad).require_grad(), Tensor::<4>::from_data(w.to_data(), &ad));
        let grad = |f: fn(Tensor<4>, Tensor<4>, Option<Tensor<1>>, ConvOptions<2>) -> Tensor<4>| {
            let g = f(xa.clone(), wa.clone(), None, options(1, 1, 1)).powi_scalar(2).sum().backward();
            values(xa.grad(&g).unwrap())
        };
        // Twice: the first call makes and keeps the flipped transform, the second reuses it.
        let frozen: fn(Tensor<4>, Tensor<4>, Option<Tensor<1>>, ConvOptions<2>) -> Tensor<4> = |x, w, b, o| conv2d_frozen(x, w, b, o, Products::F32);
        assert!(grad(frozen) == grad(conv2d) && grad(frozen) == grad(conv2d), "input gradient");
    }

    /// Under bf16 products on a CPU with AMX, a 3x3 "same" convolution takes AMX's kernel both
    /// ways: its output and input gradient are that kernel's bits (the taps as packed for it,
    /// turned for the gradient), within bf16's rounding of the f32 convolution, the same on one
    /// thread and two; the weight and bias gradients stay those of the f32 products' path.
    #[test]
    fn bf16_products_take_amx_kernel_where_it_runs() {
        if !bf16_product::conv3x3_applies(64, 64, 1, false) {
            eprintln!("skipped: this CPU runs no AMX");
            return;
        }
        let device = cpu_autodiff();
        let (b, ci, co, h, w) = (2, 64, 40, 9, 11);
        let run = || {
            let mut init = crate::Init::new(5);
            let x = init.normal::<4>([b, ci, h, w], 1.0, &device).require_grad();
            let wt = init.normal::<4>([co, ci, 3, 3], 0.1, &device).require_grad();
            let bias = init.normal::<1>([co], 0.1, &device).require_grad();
            let out = conv2d_as(x.clone(), wt.clone(), Some(bias.clone()), options(1, 1, 1), Products::Bf16);
            let g = out.clone().powi_scalar(2).sum().backward();
            let f32s = conv2d(x.clone(), wt.clone(), Some(bias.clone()), options(1, 1, 1));
            let g32 = f32s.clone().powi_scalar(2).sum().backward();
            let grads = [values(x.grad(&g).unwrap()), values(wt.grad(&g).unwrap()), values(bias.grad(&g).unwrap())];
            let grads32 = [values(x.grad(&g32).unwrap()), values(wt.grad(&g32).unwrap()), values(bias.grad(&g32).unwrap())];
            (values(out), grads, values(f32s), grads32, values(x.inner()), values(wt.inner()), values(bias.inner()))
        };
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        let (out, grads, out32, grads32, x, wt, bias) = pool(2).install(run);
        assert!(pool(1).install(run).0 == out, "the output differs between 1 and 2 threads");
        let taps = bf16_product::conv3x3_taps(&wt, co, ci, false);
        assert!(out == bf16_product::conv3x3(&x, &taps, Some(&bias), b, ci, co, h, w), "the output is not AMX's kernel's");
        // The output gradient of sum(out^2) is 2 out.
        let g: Vec<f32> = out.iter().map(|v| 2.0 * v).collect();
        let turned = bf16_product::conv3x3_taps(&wt, co, ci, true);
        assert!(grads[0] == bf16_product::conv3x3(&g, &turned, None, b, co, ci, h, w), "the input gradient is not AMX's kernel's");
        assert!(max_rel(out, out32) < 2e-2);
        for (name, a, b) in [("x", &grads[0], &grads32[0]), ("weight", &grads[1], &grads32[1]), ("bias", &grads[2], &grads32[2])] {
            let err = max_rel(a.clone(), b.clone());
            assert!(err < 3e-2, "d{name}: {err} from the f32 products'");
        }
    }

    /// Where nothing is differentiated, a frozen weight's AMX taps (an f32 weight's and a
    /// bf16-stored one's) are kept and give the per-call taps' bits; a weight changed in place
    /// is served new ones.
    #[test]
    fn a_frozen_weight_keeps_its_amx_taps_where_nothing_is_differentiated() {
        if !bf16_product::conv3x3_applies(64, 64, 1, false) {
            eprintln!("skipped: this CPU runs no AMX");
            return;
        }
        let device = cpu();
        let (b, ci, co, h, w) = (2, 64, 40, 7, 5);
        let x = rand([b, ci, h, w], &device);
        let storage = |w: &Tensor<4>| w.clone().try_into_primitive::<Flex>().unwrap();
        for weight in [rand([co, ci, 3, 3], &device), rand([co, ci, 3, 3], &device).cast(DType::BF16)] {
            let kept = || values(conv2d_frozen_copy(x.clone(), weight.clone(), None, options(1, 1, 1), Products::Bf16));
            let first = kept();
            assert!(weight_transforms::holds_packed(&storage(&weight)), "{:?}: the taps are kept", weight.dtype());
            let wide = values(weight.clone().cast(DType::F32));
            let taps = bf16_product::conv3x3_taps(&wide, co, ci, false);
            let per_call = bf16_product::conv3x3(&values(x.clone()), &taps, None, b, ci, co, h, w);
            assert!(first == per_call && kept() == per_call, "{:?}: the kept taps' bits are the per-call ones'", weight.dtype());
        }
        let weight = rand([co, ci, 3, 3], &device);
        let before = values(conv2d_frozen(x.clone(), weight.clone(), None, options(1, 1, 1), Products::Bf16));
        // Written in place where the storage is not shared, so the kept copy must be.
        let weight = weight.add_scalar(0.5);
        let after = values(conv2d_frozen(x.clone(), weight.clone(), None, options(1, 1, 1), Products::Bf16));
        let taps = bf16_product::conv3x3_taps(&values(weight), co, ci, false);
        assert!(after != before && after == bf16_product::conv3x3(&values(x), &taps, None, b, ci, co, h, w), "a changed weight's own taps");
    }

    /// A frozen bf16 kernel laid out by tap (`kernel_layout`) gives the bits of the same kernel
    /// in the standard layout, where nothing is differentiated and under autodiff (output and
    /// input gradient), and no packing of it is kept.
    #[test]
    fn a_kernel_laid_out_by_tap_gives_the_standard_layouts_bits() {
        if !bf16_product::conv3x3_applies(640, 640, 1, false) {
            eprintln!("skipped: this CPU runs no AMX");
            return;
        }
        let (b, ci, co, h, w) = (2, 640, 672, 6, 7);
        let standard = rand([co, ci, 3, 3], &cpu()).cast(DType::BF16);
        let laid = kernel_layout::by_tap(&standard).expect("laid out by tap");
        let storage = |w: &Tensor<4>| w.clone().try_into_primitive::<Flex>().unwrap();
        assert!(kernel_layout::rows(&storage(&laid)).is_some());
        let x = rand([b, ci, h, w], &cpu());
        let untracked = |wt: &Tensor<4>| values(conv2d_frozen_copy(x.clone(), wt.clone(), None, options(1, 1, 1), Products::Bf16));
        assert!(untracked(&laid) == untracked(&standard), "the output where nothing is differentiated");
        assert!(!weight_transforms::holds_packed(&storage(&laid)), "nothing kept for the kernel laid out by tap");
        let tracked = |wt: &Tensor<4>| {
            let device = cpu_autodiff();
            let x = Tensor::<4>::from_data(x.to_data(), &device).require_grad();
            let wt = crate::param::autodiff_with(wt.clone(), None);
            let out = conv2d_frozen_copy(x.clone(), wt, None, options(1, 1, 1), Products::Bf16);
            let g = out.clone().powi_scalar(2).sum().backward();
            (values(out), values(x.grad(&g).unwrap()))
        };
        let (out, dx) = tracked(&laid);
        assert!((out.clone(), dx.clone()) == tracked(&standard), "the output and input gradient under autodiff");
        assert!(out == untracked(&standard) && dx.iter().all(|v| v.is_finite()));
    }

    /// The blocks and products are fixed by the shapes: one thread and two give the same bits.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let device = cpu_autodiff();
        // Large enough for gemm to split its work, and for several column blocks.
        let run = || {
            let mut init = crate::Init::new(3);
            let x = init.normal::<4>([2, 64, 40, 40], 1.0, &device).require_grad();
            let w = init.normal::<4>([96, 64, 3, 3], 0.1, &device).require_grad();
            let out = conv2d(x.clone(), w.clone(), None, options(1, 1, 1));
            let g = out.clone().powi_scalar(2).sum().backward();
            (values(out), values(x.grad(&g).unwrap()), values(w.grad(&g).unwrap()))
        };
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        let one = pool(1).install(run);
        let two = pool(2).install(run);
        assert!(one == two, "results differ between 1 and 2 threads");
    }
}
