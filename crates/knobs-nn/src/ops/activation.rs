//! SiLU (`x sigmoid(x)`) and GELU (`x Phi(x)`, the exact erf form) as single operations with
//! their own backward on the CPU backend. burn builds SiLU from a sigmoid (a scalar `exp` per
//! value) and a product, whose autodiff keeps both and runs four passes back, and runs GELU
//! with a scalar `erf`; here one vectorised pass each way, and only `x` is kept. The GPU
//! backends take `activation_portable` under autodiff. f16 and bf16 on the CPU are computed
//! in f32 a piece at a time and rounded once (`half_pieces`), the input kept in its dtype;
//! elsewhere widened first. f32 without a gradient off the CPU takes burn's ops.
use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, Tensor, activation};

use super::half_pieces::{Values, filled};
use super::lanes::{self, Isa, Lanes, on_lanes};
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;

use super::record::{kept, record};
use crate::param::{f32_value, half_dtype, value_as};

/// Values per parallel piece; smaller tensors stay on one thread.
pub(super) const PIECE: usize = 1 << 15;

/// Which function.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Silu,
    Gelu,
}

/// `y = f(x)`, or with an output gradient `g`, `y = g f'(x)`.
type Kernel = fn((&[f32], Option<&[f32]>, &mut [MaybeUninit<f32>]), Isa);

impl Kind {
    fn kernel(self) -> Kernel {
        match self {
            Kind::Silu => silu_kernel,
            Kind::Gelu => gelu_kernel,
        }
    }
}

pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    // f16 and bf16 on the CPU: the f32 kernel a piece at a time (`half_pieces`).
    if matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && let Some(y) = fused(&x, Kind::Silu)
    {
        return y;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan"))]
    if x.is_tracked()
        && let Some(y) = super::activation_portable::silu::<burn::backend::Cube, D>(x.clone())
    {
        return y;
    }
    if let Some(dtype) = half_dtype(&x) {
        return value_as(&silu(f32_value(&x)), dtype);
    }
    activation::silu(x)
}

pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    // f16 and bf16 on the CPU: the f32 kernel a piece at a time (`half_pieces`).
    if matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && let Some(y) = fused(&x, Kind::Gelu)
    {
        return y;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan"))]
    if x.is_tracked()
        && let Some(y) = super::activation_portable::gelu::<burn::backend::Cube, D>(x.clone())
    {
        return y;
    }
    if let Some(dtype) = half_dtype(&x) {
        return value_as(&gelu(f32_value(&x)), dtype);
    }
    activation::gelu(x)
}

fn fused<const D: usize>(x: &Tensor<D>, kind: Kind) -> Option<Tensor<D>> {
    if !x.is_autodiff() {
        let x = x.clone().try_into_primitive::<Flex>().ok()?;
        return Some(Tensor::from_primitive::<Flex>(forward(&x, kind)));
    }
    let x = x.clone();
    // Cheap to redo: under balanced checkpointing the output is recomputed where a later op
    // needs it and the input comes back from the checkpointer, as for burn's element-wise
    // ops, instead of both being held from the forward pass to the backward.
    let recompute = |ids: &[NodeId]| Recompute { x: ids[0], kind };
    record!(Elementwise, x.gradient_checkpointing_strategy(), [x], keep [0], recompute recompute, {
        (forward(&x, kind), kind)
    })
}

/// SiLU of `x` into `y` (of its length), one piece: what `group_norm_silu` applies to each
/// block of normalised values, so that its values are `silu`'s.
pub(super) fn silu_into(x: &[f32], y: &mut [MaybeUninit<f32>], isa: Isa) {
    silu_kernel((x, None, y), isa)
}

/// `f` over pieces of `x` (and `g`) into a tensor of `x`'s shape and dtype (f32, f16 or
/// bf16), in parallel for large tensors.
fn map_pieces(x: &FlexTensor, g: Option<&FlexTensor>, f: Kernel) -> FlexTensor {
    let isa = lanes::isa();
    fn of(t: &FlexTensor) -> Values<'_> {
        Values::of(t).expect("a contiguous f32, f16 or bf16 tensor")
    }
    let (xs, gs) = (of(x), g.map(of));
    // The kernel writes every value of each piece.
    filled(x.layout().shape().clone(), x.dtype(), PIECE, |at, dst, (sx, sg)| {
        let range = at..at + dst.len();
        f((xs.f32s(range.clone(), sx), gs.as_ref().map(|g| g.f32s(range, sg)), dst), isa)
    })
}

fn forward(x: &FlexTensor, kind: Kind) -> FlexTensor {
    map_pieces(&x.to_contiguous(), None, kind.kernel())
}

/// A function and its derivative, written once for every lane width.
pub(super) trait Pointwise {
    unsafe fn value<L: Lanes>(x: L) -> L;
    unsafe fn slope<L: Lanes>(x: L) -> L;
}

/// SiLU: `x s` with `s = 1 / (1 + e^-x)`; slope `s (1 + x (1 - s))`.
struct SiluFn;

impl Pointwise for SiluFn {
    #[inline(always)]
    unsafe fn value<L: Lanes>(x: L) -> L {
        unsafe { x.div(L::splat(1.0).add(L::splat(0.0).sub(x).exp())) }
    }
    #[inline(always)]
    unsafe fn slope<L: Lanes>(x: L) -> L {
        unsafe {
            let one = L::splat(1.0);
            let s = one.div(one.add(L::splat(0.0).sub(x).exp()));
            s.mul(L::fma(x, one.sub(s), one))
        }
    }
}

/// GELU: `x Phi(x)`; slope `Phi(x) + x phi(x)`.
pub(super) struct GeluFn;

impl Pointwise for GeluFn {
    #[inline(always)]
    unsafe fn value<L: Lanes>(x: L) -> L {
        unsafe { x.mul(normal_cdf_pdf(x).0) }
    }
    #[inline(always)]
    unsafe fn slope<L: Lanes>(x: L) -> L {
        unsafe {
            let (cdf, pdf) = normal_cdf_pdf(x);
            L::fma(x, pdf, cdf)
        }
    }
}

/// `Phi(x)` and `phi(x)`, the standard normal's distribution and density, on lanes: erf by
/// Abramowitz and Stegun's 7.1.26 (absolute error below 1.5e-7). The tail beyond `|x|` is
/// computed directly, so the negative side never subtracts nearly equal numbers.
#[inline(always)]
unsafe fn normal_cdf_pdf<L: Lanes>(x: L) -> (L, L) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [1.061_405_4, -1.453_152, 1.421_413_7, -0.284_496_74, 0.254_829_6];
    unsafe {
        let z = x.max(L::splat(0.0).sub(x)).mul(L::splat(std::f32::consts::FRAC_1_SQRT_2));
        let t = L::splat(1.0).div(L::fma(L::splat(P), z, L::splat(1.0)));
        let mut poly = L::splat(A[0]);
        for a in &A[1..] {
            poly = L::fma(poly, t, L::splat(*a));
        }
        let e = L::splat(0.0).sub(z.mul(z)).exp();
        // 1 - erf(z), halved: the mass beyond |x|.
        let q = L::splat(0.5).mul(poly.mul(t).mul(e));
        // x >= 0 takes 1 - q, x < 0 takes q: a 0/1 step from the sign (tiny |x| have q = 1/2).
        let step = x.mul(L::splat(1e30)).max(L::splat(0.0)).min(L::splat(1.0));
        let cdf = L::fma(step, L::splat(1.0).sub(q.add(q)), q);
        (cdf, e.mul(L::splat(0.398_942_3)))
    }
}

/// `y = f(x)`, or `y = g f'(x)` given `g`: whole vectors, then the tail one value at a time
/// with the same arithmetic.
#[inline(always)]
unsafe fn apply<L: Lanes, P: Pointwise>(x: &[f32], g: Option<&[f32]>, y: &mut [MaybeUninit<f32>]) {
    let body = x.len() - x.len() % L::W;
    // SAFETY: j + W <= body <= len of x, g and y; the caller vouches for L's features.
    unsafe {
        let mut j = 0;
        while j < body {
            let v = L::load(x.as_ptr().add(j));
            let r = match g {
                None => P::value(v),
                Some(g) => L::load(g.as_ptr().add(j)).mul(P::slope(v)),
            };
            r.store(y.as_mut_ptr().cast::<f32>().add(j));
            j += L::W;
        }
        for j in body..x.len() {
            y[j].write(match g {
                None => P::value(x[j]),
                Some(g) => g[j] * P::slope(x[j]),
            });
        }
    }
}

on_lanes! {
    fn silu_kernel(a: (&[f32], Option<&[f32]>, &mut [MaybeUninit<f32>])) -> () { L => apply::<L, SiluFn>(a.0, a.1, a.2) }
}

on_lanes! {
    fn gelu_kernel(a: (&[f32], Option<&[f32]>, &mut [MaybeUninit<f32>])) -> () { L => apply::<L, GeluFn>(a.0, a.1, a.2) }
}

#[derive(Debug)]
struct Elementwise;

/// The output again from the input, in the backward pass.
#[derive(Debug)]
struct Recompute {
    x: NodeId,
    kind: Kind,
}

impl RetroForward for Recompute {
    fn forward(&self, states: &mut BackwardStates, out: NodeId) {
        let x = states.get_state::<FlexTensor>(&self.x);
        states.save(out, forward(&x, self.kind));
    }
}

impl Backward<Flex, 1> for Elementwise {
    /// The function, and the input's checkpoint.
    type State = (Kind, Vec<NodeId>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let g = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let (kind, kept_x) = ops.state;
            let x = kept(checkpointer, kept_x[0]).to_contiguous();
            grads.register::<Flex>(node.id, map_pieces(&x, Some(&g), kind.kernel()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;
    use crate::{cpu, cpu_autodiff};
    use burn::tensor::Distribution;

    type Pair = (&'static str, fn(Tensor<2>) -> Tensor<2>, fn(Tensor<2>) -> Tensor<2>);
    /// Ours and burn's, for each function.
    const PAIRS: [Pair; 2] = [("silu", silu, activation::silu), ("gelu", gelu, activation::gelu)];

    /// Half precision, with and without autodiff and checkpointing, is the f32 op on the
    /// widened input rounded once, value and input gradient, bit for bit, for SiLU, GELU and
    /// GEGLU (burn's ops in the half dtype round after each step), in one piece and in several.
    #[test]
    fn half_precision_is_the_f32_op_rounded() {
        type Op = fn(Tensor<2>) -> Tensor<2>;
        let ops: [(&str, Op); 3] = [("silu", silu), ("gelu", gelu), ("geglu", super::super::geglu)];
        for (name, op) in ops {
            for (dtype, [rows, cols]) in [(DType::BF16, [37, 70]), (DType::F16, [37, 70]), (DType::BF16, [300, 252]), (DType::F16, [300, 252])] {
                for (tracked, device) in [(false, cpu()), (true, cpu_autodiff()), (true, crate::cpu_autodiff_checkpointed())] {
                    let x = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 3.0), &device).cast(dtype);
                    let w = Tensor::<2>::random([rows, if name == "geglu" { cols / 2 } else { cols }], Distribution::Normal(0.0, 1.0), &device);
                    let run = |widen: bool| {
                        let x = if widen { x.clone().cast(DType::F32) } else { x.clone() };
                        let x = if tracked { x.require_grad() } else { x };
                        let y = op(x.clone()).cast(dtype);
                        let grad = tracked.then(|| {
                            let g = (y.clone().cast(DType::F32) * w.clone()).sum().backward();
                            let grad = x.grad(&g).expect("a gradient");
                            assert_eq!(grad.dtype(), x.dtype(), "{name}: the input's gradient in its dtype");
                            values(grad.cast(dtype))
                        });
                        (y.dtype(), values(y), grad)
                    };
                    let (got, want) = (run(false), run(true));
                    assert_eq!(got.0, dtype, "{name} {dtype:?}: the output keeps the input's dtype");
                    assert_eq!(got, want, "{name} {dtype:?} [{rows}, {cols}] on {device:?}");
                }
            }
        }
    }

    /// Values and gradients against burn's ops, over a wide range (the clamped exponent at
    /// both ends, both tails of erf) and a length off the lanes and pieces.
    #[test]
    fn matches_burns_ops_and_their_gradients() {
        let n = PIECE + 37;
        let xs: Vec<f32> = (0..n).map(|i| (i as f32 / n as f32 - 0.5) * 240.0).collect();
        let x = Tensor::<1>::from_floats(xs.as_slice(), &cpu()).reshape([1, n]);
        let device = cpu_autodiff();
        let xg = Tensor::<2>::random([3, 1001], Distribution::Normal(0.0, 4.0), &device).require_grad();
        let probe = Tensor::<2>::random([3, 1001], Distribution::Normal(0.0, 1.0), &device);
        for (name, ours, burns) in PAIRS {
            for (i, (a, b)) in values(ours(x.clone())).iter().zip(&values(burns(x.clone()))).enumerate() {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{name}({}) = {a}, burn {b}", xs[i]);
            }
            let grad_of = |f: fn(Tensor<2>) -> Tensor<2>| values(xg.grad(&(f(xg.clone()) * probe.clone()).sum().backward()).unwrap());
            for (a, b) in grad_of(ours).iter().zip(&grad_of(burns)) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{name}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let device = cpu_autodiff();
        for (name, f, _) in PAIRS {
            for x0 in [-6.0f32, -1.3, -0.2, 0.0, 0.7, 2.5, 9.0] {
                let x = Tensor::<2>::from_floats([[x0]], &device).require_grad();
                let analytic = x.grad(&f(x.clone()).sum().backward()).unwrap().into_scalar::<f32>() as f64;
                let at = |v: f32| f(Tensor::<2>::from_floats([[v]], &cpu())).into_scalar::<f32>() as f64;
                let eps = 1e-2;
                let numeric = (at(x0 + eps) - at(x0 - eps)) / (2.0 * eps as f64);
                assert!((analytic - numeric).abs() < 1e-3, "{name}'({x0}) = {analytic}, numeric {numeric}");
            }
        }
    }
}
