//! Multi-head softmax attention as one operation with its own backward pass. Autodiff would
//! otherwise record the decomposed ops and keep every head's N x M probabilities alive until
//! the backward pass (at 1024 tokens and 8 heads, 32 MB a sample and layer).
//!
//! On the CPU backend the fused kernel (`attention_kernel`) runs forward and backward. The GPU
//! backends take burn's fused attention, under autodiff with the backward of
//! `attention_blocked`. Half-precision inputs on the CPU take the fused kernel in f32. What is
//! left (small heads over many keys) takes burn's ops: its flash attention when no gradient
//! is needed, else the decomposed path, which is also the tests' reference.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::activation::softmax;
use burn::tensor::module;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Tensor, TensorData};

use super::attention_kernel::{self, Dims};
use super::matrix::Products;
use super::precision::{converted, widened};
use super::record::{lifted, record};
use crate::param::{f32_value, half_dtype, value_as};

/// Above this many key floats per head (head width x keys), one head's keys no longer stay
/// in cache across query rows of the row-at-a-time loops (small heads on CPUs without vector
/// lanes for them) and the decomposed matmuls are faster.
const MAX_FUSED_KEY_FLOATS: usize = 1 << 18;

/// softmax(q k^T * scale) v over `heads` heads: `q` `[B, N, heads * d]`, `k` and `v`
/// `[B, M, heads * d]` -> `[B, N, heads * d]`.
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    let [batch, n, width] = q.dims();
    let m = k.dims()[1];
    let dims = Dims { batch, n, m, heads, head_dim: width / heads };
    if let Some(out) = fused_if_fusable(&q, &k, &v, dims, scale, super::autocast::products_for_f32()) {
        return out;
    }
    let tracked = q.is_tracked() || k.is_tracked() || v.is_tracked();
    #[cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan"))]
    if tracked
        && width % heads == 0
        && let Some(out) = super::attention_blocked::attention::<burn::backend::Cube>(q.clone(), k.clone(), v.clone(), heads, scale, super::attention_blocked::BLOCK_SCORES)
    {
        return out;
    }
    // Half precision on the CPU (mixed precision): the fused kernel in f32, rounded once. Under
    // autodiff burn's ops would keep every head's probabilities for the backward pass, in f32
    // from the softmax and in the half dtype for the product with v (768 MiB a layer for
    // SD-1.5 at 512 px in bf16), where the kernel keeps q, k, v as they came and its output;
    // without it flex's own attention gives the same values in twice the time (bf16 [2, 4096,
    // 320], 8 heads: 0.72 against 1.55 s). The GPUs' flash attention takes half precision as
    // it is, with f32 accumulators.
    // Where the CPU has bf16 products, bf16 takes them, as autocast's bf16 attention does.
    if let Some(dtype) = half_dtype(&q).filter(|&d| k.dtype() == d && v.dtype() == d)
        && (tracked || super::on_cpu(&q))
    {
        // Under autodiff the op takes them as they are and keeps them so (`fused_half`).
        if tracked && let Some(out) = fused_half(&q, &k, &v, dims, scale as f32, Products::for_dtype(dtype)) {
            return out;
        }
        let (q32, k32, v32) = (f32_value(&q), f32_value(&k), f32_value(&v));
        let out = fused_if_fusable(&q32, &k32, &v32, dims, scale, Products::for_dtype(dtype)).unwrap_or_else(|| attention(q32, k32, v32, heads, scale));
        return value_as(&out, dtype);
    }
    if tracked {
        return decomposed(q, k, v, heads, scale);
    }
    // No gradient needed: the backend's own flash attention, blocked for wide heads.
    let strategy = q.gradient_checkpointing_strategy();
    crate::param::autodiff_with(backends_own(q.inner(), k.inner(), v.inner(), heads, scale), strategy)
}

/// The fused kernel where it applies (f32 tensors on the CPU backend, a head shape it runs
/// well), else `None`.
fn fused_if_fusable(q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, dims: Dims, scale: f64, products: Products) -> Option<Tensor<3>> {
    if ![q, k, v].iter().all(|t| t.dtype() == DType::F32) || !fusable(q, dims, products) {
        return None;
    }
    fused(q.clone(), k.clone(), v.clone(), dims, scale as f32, products)
}

/// Whether the fused kernel runs this head shape well.
fn fusable(q: &Tensor<3>, dims: Dims, products: Products) -> bool {
    (attention_kernel::Path::best(dims.head_dim, products).blocked() || dims.head_dim * dims.m <= MAX_FUSED_KEY_FLOATS) && dims.width() == q.dims()[2]
}

/// The fused kernel under autodiff on f16 / bf16 `q`, `k`, `v` on the CPU backend: widened
/// for the kernel and kept as they came (the output's f32 values too: the backward pass
/// reads them), the output and the gradients narrowed once. The same bits as widening first,
/// where the op kept f32 copies of all three (SDXL's bf16 LoRA step at 1024 px: peak
/// 16.33 -> 15.83 GiB).
/// `None` off the CPU backend or for a shape the kernel does not take.
fn fused_half(q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, dims: Dims, scale: f32, products: Products) -> Option<Tensor<3>> {
    if !fusable(q, dims, products) {
        return None;
    }
    let strategy = [q, k, v].iter().find_map(|t| t.gradient_checkpointing_strategy());
    let (q, k, v) = (lifted(q, strategy), lifted(k, strategy), lifted(v, strategy));
    record!(FusedAttention, strategy, [q, k, v], {
        let (q, k, v) = (q.to_contiguous(), k.to_contiguous(), v.to_contiguous());
        let (out, lse) = kept_if_dear(dims, products, || forward(&widened(&q), &widened(&k), &widened(&v), dims, scale, products));
        (converted(&out, q.dtype()), Saved { q, k, v, out, lse, dims, scale, products })
    })
}

/// The backend's own fused attention (`module::attention`) on `[B, N, heads * d]` tensors.
pub(super) fn backends_own(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    let [batch, n, width] = q.dims();
    let split = |x: Tensor<3>| {
        let rows = x.dims()[1];
        x.reshape([batch, rows, heads, width / heads]).swap_dims(1, 2)
    };
    let options = AttentionModuleOptions { scale: Some(scale), ..Default::default() };
    module::attention(split(q), split(k), split(v), None, None, options).swap_dims(1, 2).reshape([batch, n, width])
}

/// The same attention from burn's ops (matmul, softmax, matmul).
pub fn decomposed(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    let [b, n, width] = q.dims();
    let m = k.dims()[1];
    let d = width / heads;
    let split = |x: Tensor<3>, rows: usize| x.reshape([b, rows, heads, d]).swap_dims(1, 2).reshape([b * heads, rows, d]);
    // Scaling q (N x d) is cheaper than scaling the scores (N x M).
    let scores = split(q * scale, n).matmul(split(k, m).swap_dims(1, 2));
    // Under mixed precision the softmax still runs in f32, as autocast runs it.
    let dtype = scores.dtype();
    let probs = value_as(&softmax(f32_value(&scores), 2), dtype);
    probs.matmul(split(v, m)).reshape([b, heads, n, d]).swap_dims(1, 2).reshape([b, n, width])
}

/// The fused kernel on the CPU backend, with or without autodiff; `None` on other backends.
fn fused(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, dims: Dims, scale: f32, products: Products) -> Option<Tensor<3>> {
    if !q.is_autodiff() {
        let q = q.try_into_primitive::<Flex>().ok()?;
        let k = k.try_into_primitive::<Flex>().ok()?;
        let v = v.try_into_primitive::<Flex>().ok()?;
        let (out, _) = forward(&q, &k, &v, dims, scale, products);
        return Some(Tensor::from_primitive::<Flex>(out));
    }
    record!(FusedAttention, q.gradient_checkpointing_strategy(), [q, k, v], {
        let (q, k, v) = (q.to_contiguous(), k.to_contiguous(), v.to_contiguous());
        let (out, lse) = kept_if_dear(dims, products, || forward(&q, &k, &v, dims, scale, products));
        (out.clone(), Saved { q, k, v, out, lse, dims, scale, products })
    })
}

/// Keys per channel from which a checkpointed block keeps the attention's output and
/// log-sum-exp for its recomputed pass instead of computing them again. The attention costs
/// 2 m multiply-adds per output value, a linear layer as wide as the block one per channel:
/// over 4 keys per channel the attention costs more than the block's four projections
/// together, and keeping it (f32 output and log-sum-exp) costs as much memory as the block's
/// input. Self-attention at SD-1.5's and SDXL's 4096-token levels takes it; 1024 tokens of
/// 1280 channels, and cross-attention over 77 tokens, do not.
pub const KEEP_FROM_KEYS_PER_CHANNEL: usize = 4;

/// `forward()`, kept across a checkpointed block's passes where it is dear (see above); the
/// shape and the products it ran with check that the recomputed pass asks for the same.
fn kept_if_dear(dims: Dims, products: Products, forward: impl FnOnce() -> (FlexTensor, FlexTensor)) -> (FlexTensor, FlexTensor) {
    if dims.m >= KEEP_FROM_KEYS_PER_CHANNEL * dims.width() { crate::checkpoint::kept((dims, products), forward) } else { forward() }
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 (checked before fusing)")
}

fn flex(data: Vec<f32>, shape: [usize; 3]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// Output `[B, N, H * d]` and the log-sum-exp `[B * H * N]`.
fn forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, dims: Dims, scale: f32, products: Products) -> (FlexTensor, FlexTensor) {
    let (q, k, v) = (q.to_contiguous(), k.to_contiguous(), v.to_contiguous());
    let (out, lse) = attention_kernel::forward(slice(&q), slice(&k), slice(&v), dims, scale, products);
    let lse_len = lse.len();
    (flex(out, [dims.batch, dims.n, dims.heads * dims.head_dim]), flex(lse, [1, 1, lse_len]))
}

#[derive(Debug)]
struct FusedAttention;

/// What the backward pass recomputes the probabilities from.
#[derive(Clone, Debug)]
struct Saved {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    out: FlexTensor,
    lse: FlexTensor,
    dims: Dims,
    scale: f32,
    products: Products,
}

impl Backward<Flex, 3> for FusedAttention {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        // Half-precision inputs (`fused_half`) widened for the kernel, their gradients narrowed.
        let grad = widened(&grads.consume::<Flex>(&ops.node));
        let (q, k, v) = (widened(&s.q), widened(&s.k), widened(&s.v));
        let (dq, dk, dv) = attention_kernel::backward(
            slice(&q),
            slice(&k),
            slice(&v),
            slice(&s.out),
            slice(&s.lse),
            slice(&grad),
            s.dims,
            s.scale,
            s.products,
        );
        let Dims { batch, n, m, heads, head_dim } = s.dims;
        let width = heads * head_dim;
        let [pq, pk, pv] = ops.parents;
        for (parent, g, rows, dtype) in [(pq, dq, n, s.q.dtype()), (pk, dk, m, s.k.dtype()), (pv, dv, m, s.v.dtype())] {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, converted(&flex(g, [batch, rows, width]), dtype));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_rel, values};
    use crate::{cpu, cpu_autodiff};
    use burn::tensor::Distribution;

    fn rand(shape: [usize; 3], device: &burn::tensor::Device) -> Tensor<3> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    #[test]
    fn forward_matches_the_decomposed_ops() {
        let device = cpu();
        // Uneven sizes: rows and keys not multiples of the kernel's blocks or SIMD lanes.
        for (n, m, heads, d) in [(70, 77, 2, 5), (130, 600, 3, 4), (9, 9, 1, 40)] {
            let q = rand([2, n, heads * d], &device);
            let k = rand([2, m, heads * d], &device);
            let v = rand([2, m, heads * d], &device);
            let scale = 1.0 / (d as f64).sqrt();
            let want = decomposed(q.clone(), k.clone(), v.clone(), heads, scale);
            let got = attention(q, k, v, heads, scale);
            assert!(max_rel(values(got), values(want)) < 1e-5, "n {n} m {m} heads {heads} d {d}");
        }
    }

    /// A NaN in one key spoils its head's every output row in that sample, as the decomposed
    /// ops' softmax does, and nothing else: the fused kernels do not weigh it as zero.
    #[test]
    fn a_nan_key_spoils_its_heads_rows() {
        let device = cpu();
        for (n, m, heads, d) in [(70, 77, 2, 5), (130, 600, 3, 4), (9, 9, 1, 40)] {
            let mut k = values(rand([2, m, heads * d], &device));
            let head = heads - 1;
            k[(m / 2) * heads * d + head * d + 1] = f32::NAN;
            let k = Tensor::from_data(burn::tensor::TensorData::new(k, [2, m, heads * d]), &device);
            let (q, v) = (rand([2, n, heads * d], &device), rand([2, m, heads * d], &device));
            for (name, out) in [("fused", attention(q.clone(), k.clone(), v.clone(), heads, 0.5)), ("decomposed", decomposed(q.clone(), k.clone(), v.clone(), heads, 0.5))] {
                let out = values(out);
                for (i, x) in out.iter().enumerate() {
                    let spoiled = i < n * heads * d && (i % (heads * d)) / d == head;
                    assert_eq!(x.is_nan(), spoiled, "{name}: n {n} m {m} heads {heads} d {d}, value {i}");
                }
            }
        }
    }

    #[test]
    fn gradients_match_the_decomposed_ops() {
        let device = cpu_autodiff();
        for (n, m, heads, d) in [(70, 77, 2, 5), (40, 600, 2, 8)] {
            let q = rand([2, n, heads * d], &device).require_grad();
            let k = rand([2, m, heads * d], &device).require_grad();
            let v = rand([2, m, heads * d], &device).require_grad();
            let w = rand([2, n, heads * d], &device);
            let grads_of = |f: fn(Tensor<3>, Tensor<3>, Tensor<3>, usize, f64) -> Tensor<3>| {
                let out = f(q.clone(), k.clone(), v.clone(), heads, 0.3);
                let g = (out * w.clone()).sum().backward();
                [&q, &k, &v].map(|t| t.grad(&g).expect("a gradient"))
            };
            let fused = grads_of(attention);
            let reference = grads_of(decomposed);
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(fused.into_iter().zip(reference)) {
                let err = max_rel(values(a), values(b));
                assert!(err < 1e-5, "d{name}: relative error {err} (n {n} m {m})");
            }
        }
    }

    /// Half precision on the CPU is the f32 kernel on the widened inputs, rounded once: without
    /// autodiff, and under it (plain and checkpointed) output and input gradients alike (burn's ops would round the
    /// scores first, and keep every head's probabilities).
    #[test]
    fn half_precision_is_the_f32_kernel_rounded() {
        let device = cpu();
        for dtype in [DType::BF16, DType::F16] {
            let [q, k, v] = [9, 600, 600].map(|rows| rand([2, rows, 3 * 4], &device).cast(dtype));
            let got = attention(q.clone(), k.clone(), v.clone(), 3, 0.4);
            assert_eq!(got.dtype(), dtype);
            let want = attention(q.cast(DType::F32), k.cast(DType::F32), v.cast(DType::F32), 3, 0.4).cast(dtype);
            assert_eq!(values(got), values(want), "{dtype:?}, no autodiff");
        }
        let (n, m, heads, d) = (70, 77, 2, 8);
        for (device, dtype) in [(cpu_autodiff(), DType::BF16), (cpu_autodiff(), DType::F16), (crate::cpu_autodiff_checkpointed(), DType::BF16)] {
            let inputs = [n, m, m].map(|rows| rand([2, rows, heads * d], &device).cast(dtype));
            let w = rand([2, n, heads * d], &device);
            let run = |widen: bool| {
                let [q, k, v] = inputs.clone().map(|t| if widen { t.cast(DType::F32) } else { t }.require_grad());
                // Rounded to the half dtype either way, so its gradient arrives rounded too.
                let out = attention(q.clone(), k.clone(), v.clone(), heads, 0.4).cast(dtype);
                let g = (out.clone().cast(DType::F32) * w.clone()).sum().backward();
                let grads = [&q, &k, &v].map(|t| {
                    let grad = t.grad(&g).expect("a gradient");
                    assert_eq!(grad.dtype(), t.dtype(), "the gradient in its input's dtype");
                    values(grad.cast(dtype))
                });
                (values(out), grads)
            };
            let (out, grads) = run(false);
            let (want_out, want_grads) = run(true);
            assert_eq!(out, want_out, "{dtype:?} output");
            assert_eq!(grads, want_grads, "{dtype:?} gradients");
            // And it is attention: within half-precision rounding of burn's ops in f32.
            let [q, k, v] = inputs.clone().map(|t| t.cast(DType::F32));
            let err = max_rel(&out, values(decomposed(q, k, v, heads, 0.4)));
            assert!(err < 1e-2, "{dtype:?}: {err}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let device = cpu_autodiff();
        let (heads, d) = (2, 3);
        let q = rand([1, 5, heads * d], &device);
        let k = rand([1, 7, heads * d], &device);
        let v = rand([1, 7, heads * d], &device);
        let w = rand([1, 5, heads * d], &device);
        let loss = |q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>| {
            (attention(q.clone(), k.clone(), v.clone(), heads, 0.5) * w.clone()).sum()
        };
        let (qg, kg, vg) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());
        let g = loss(&qg, &kg, &vg).backward();
        let analytic = [&qg, &kg, &vg].map(|t| t.grad(&g).unwrap().into_data().try_into_vec::<f32>().unwrap());
        let inputs = [&q, &k, &v];
        for (which, grad) in analytic.iter().enumerate() {
            for idx in [0, 4, grad.len() - 1] {
                let bump = |delta: f32| {
                    let mut x: Vec<f32> = inputs[which].clone().into_data().try_into_vec().unwrap();
                    x[idx] += delta;
                    let t = Tensor::<1>::from_floats(x.as_slice(), &device).reshape(inputs[which].dims());
                    let mut args = inputs.map(|t| t.clone());
                    args[which] = t;
                    loss(&args[0], &args[1], &args[2]).into_scalar::<f32>() as f64
                };
                let eps = 1e-2;
                let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
                let err = (numeric - grad[idx] as f64).abs();
                assert!(err < 2e-3 * (1.0 + numeric.abs()), "input {which} [{idx}]: {} vs {numeric}", grad[idx]);
            }
        }
    }

    #[test]
    fn only_tracked_inputs_get_gradients_and_untracked_calls_work() {
        let device = cpu_autodiff();
        let q0 = rand([1, 6, 4], &device);
        let q = q0.clone().require_grad();
        let k = rand([1, 5, 4], &device);
        let v = rand([1, 5, 4], &device);
        let g = attention(q.clone(), k.clone(), v.clone(), 2, 0.5).sum().backward();
        assert!(q.grad(&g).is_some());
        assert!(k.grad(&g).is_none() && v.grad(&g).is_none());
        let untracked = attention(q0.clone(), k.clone(), v.clone(), 2, 0.5);
        assert!(!untracked.is_tracked());
        assert!(max_rel(values(untracked), values(decomposed(q0, k, v, 2, 0.5))) < 1e-5);
    }
}
