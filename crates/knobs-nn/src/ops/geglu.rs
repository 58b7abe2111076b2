//! GEGLU, the gated feed-forward of diffusers' transformer blocks: the projection's last
//! dimension split in halves `[h, g]`, then `h * gelu(g)`, as one op with its own backward on
//! the CPU backend. From burn's ops it takes two narrowed views, a copy of the gate for GELU,
//! a product with a strided view that the next layer copies again to reshape it, and a
//! backward that pads each half's gradient back to full width with zeros and adds the two;
//! at SD-1.5's 64x64 level each of those is a 42 MB tensor. Here one pass each way, reading
//! the projection where it lies, which is all the op keeps. The GPU backends take
//! `activation_portable`'s GEGLU under autodiff, which keeps the same. f16 and bf16 are
//! computed in f32 a piece at a time and rounded once (`half_pieces`); the op keeps the
//! projection in its own dtype.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, Tensor};

use super::activation::{GeluFn, PIECE, Pointwise};
use std::mem::MaybeUninit;

use super::half_pieces::{Values, filled};
use super::lanes::{self, Lanes, on_lanes};
use super::record::{kept, record};
use crate::param::{f32_value, half_dtype, value_as};

/// `h * gelu(g)` for `y = [h, g]` along the last dimension (of even width).
pub fn geglu<const D: usize>(y: Tensor<D>) -> Tensor<D> {
    // An odd width has a gate one wider than its values (burn's ops drop the last column).
    // Half precision on the CPU: the f32 kernel a piece at a time (`half_pieces`).
    if matches!(y.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && y.dims()[D - 1].is_multiple_of(2)
        && let Some(out) = fused(&y)
    {
        return out;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu", feature = "vulkan"))]
    if y.is_tracked()
        && let Some(out) = super::activation_portable::geglu::<burn::backend::Cube, D>(y.clone())
    {
        return out;
    }
    if let Some(dtype) = half_dtype(&y) {
        return value_as(&geglu(f32_value(&y)), dtype);
    }
    decomposed(y)
}

/// The same from burn's ops (other backends and dtypes; the tests' reference).
pub fn decomposed<const D: usize>(y: Tensor<D>) -> Tensor<D> {
    let inner = y.dims()[D - 1] / 2;
    let gate = y.clone().narrow(D - 1, inner, inner);
    y.narrow(D - 1, 0, inner) * super::gelu(gate)
}

fn fused<const D: usize>(y: &Tensor<D>) -> Option<Tensor<D>> {
    if !y.is_autodiff() {
        let y = y.clone().try_into_primitive::<Flex>().ok()?;
        return Some(Tensor::from_primitive::<Flex>(forward(&y)));
    }
    let y = y.clone();
    // As for the activations: under balanced checkpointing the output is recomputed where a
    // later op needs it, not held from the forward pass to the backward.
    let recompute = |ids: &[NodeId]| Recompute { y: ids[0] };
    record!(Geglu, y.gradient_checkpointing_strategy(), [y], keep [0], recompute recompute, {
        (forward(&y), ())
    })
}

/// Rows of `width` values per parallel piece, about [`PIECE`] values each.
fn rows_per_piece(width: usize) -> usize {
    (PIECE / width.max(1)).max(1)
}

/// The output, in the projection's dtype.
fn forward(y: &FlexTensor) -> FlexTensor {
    let y = y.to_contiguous();
    let mut shape = y.layout().shape().clone();
    let width = shape[shape.num_dims() - 1];
    let inner = width / 2;
    let ys = Values::of(&y).expect("an f32, f16 or bf16 tensor");
    let isa = lanes::isa();
    let last = shape.num_dims() - 1;
    shape[last] = inner;
    // The width is even, so the rows' halves cover every output value.
    filled(shape, y.dtype(), rows_per_piece(width) * inner, |start, out, (scratch, _)| {
        let row = start / inner;
        let y = ys.f32s(row * width..(row + out.len() / inner) * width, scratch);
        for (out, y) in out.chunks_exact_mut(inner).zip(y.chunks_exact(width)) {
            let (h, g) = y.split_at(inner);
            gated((h, g, out), isa);
        }
    })
}

on_lanes! {
    /// `out = h * gelu(g)`.
    fn gated(a: (&[f32], &[f32], &mut [MaybeUninit<f32>])) -> () {
        L => {
            let (h, g, out) = a;
            let body = out.len() - out.len() % L::W;
            let mut j = 0;
            while j < body {
                let v = L::load(h.as_ptr().add(j)).mul(GeluFn::value(L::load(g.as_ptr().add(j))));
                v.store(out.as_mut_ptr().cast::<f32>().add(j));
                j += L::W;
            }
            for j in body..out.len() {
                out[j].write(h[j] * GeluFn::value(g[j]));
            }
        }
    }
}

/// One row for [`gated_grad`]: the halves `h` and `g`, the output's gradient `d`, and the
/// halves' gradients `dh` and `dg` to write.
type GradRow<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a mut [MaybeUninit<f32>], &'a mut [MaybeUninit<f32>]);

on_lanes! {
    /// The gradient of one row `[dh, dg]` from the output's `d`: `dh = d gelu(g)`,
    /// `dg = d h gelu'(g)`.
    fn gated_grad(a: GradRow<'_>) -> () {
        L => {
            let (h, g, d, dh, dg) = a;
            let body = d.len() - d.len() % L::W;
            let mut j = 0;
            while j < body {
                let (hv, gv, dv) = (L::load(h.as_ptr().add(j)), L::load(g.as_ptr().add(j)), L::load(d.as_ptr().add(j)));
                dv.mul(GeluFn::value(gv)).store(dh.as_mut_ptr().cast::<f32>().add(j));
                dv.mul(hv).mul(GeluFn::slope(gv)).store(dg.as_mut_ptr().cast::<f32>().add(j));
                j += L::W;
            }
            for j in body..d.len() {
                dh[j].write(d[j] * GeluFn::value(g[j]));
                dg[j].write(d[j] * h[j] * GeluFn::slope(g[j]));
            }
        }
    }
}

#[derive(Debug)]
struct Geglu;

/// The output again from the projection, in the backward pass.
#[derive(Debug)]
struct Recompute {
    y: NodeId,
}

impl RetroForward for Recompute {
    fn forward(&self, states: &mut BackwardStates, out: NodeId) {
        let y = states.get_state::<FlexTensor>(&self.y);
        states.save(out, forward(&y));
    }
}

impl Backward<Flex, 1> for Geglu {
    /// The projection's checkpoint.
    type State = ((), Vec<NodeId>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let d = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let y = kept(checkpointer, ops.state.1[0]).to_contiguous();
        let shape = y.layout().shape().clone();
        let width = shape[shape.num_dims() - 1];
        let inner = width / 2;
        let (ys, ds) = (Values::of(&y).expect("an f32, f16 or bf16 tensor"), Values::of(&d).expect("an f32, f16 or bf16 tensor"));
        let isa = lanes::isa();
        // The projection's gradient in its dtype. The width is even (`geglu` takes no other),
        // so each row's two halves are written in full.
        let dy = filled(shape, y.dtype(), rows_per_piece(width) * width, |start, dy, (sy, sd)| {
            let (row, rows) = (start / width, dy.len() / width);
            let (y, d) = (ys.f32s(row * width..(row + rows) * width, sy), ds.f32s(row * inner..(row + rows) * inner, sd));
            for ((dy, y), d) in dy.chunks_exact_mut(width).zip(y.chunks_exact(width)).zip(d.chunks_exact(inner)) {
                let (h, g) = y.split_at(inner);
                let (dh, dg) = dy.split_at_mut(inner);
                gated_grad((h, g, d, dh, dg), isa);
            }
        });
        grads.register::<Flex>(node.id, dy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_rel, values};
    use crate::{Init, cpu, cpu_autodiff, cpu_autodiff_checkpointed};
    use burn::tensor::Device;

    /// Values and gradients against burn's ops, plain, with autodiff and under balanced
    /// checkpointing, at a width off the lanes and enough rows for several pieces.
    #[test]
    fn matches_burns_ops_and_their_gradients() {
        let mut init = Init::new(5);
        let (rows, inner) = (PIECE / 40 + 3, 37);
        let y = init.normal::<3>([1, rows, 2 * inner], 2.0, &cpu());
        let probe = init.normal::<3>([1, rows, inner], 1.0, &cpu());
        let err = max_rel(values(geglu(y.clone())), values(decomposed(y.clone())));
        assert!(err < 1e-6, "forward: {err}");
        let grad = |device: &Device, fused: bool| {
            let ya = Tensor::<3>::from_data(y.to_data(), device).require_grad();
            let out = if fused { geglu(ya.clone()) } else { decomposed(ya.clone()) };
            // A later op reads the output, so checkpointing has something to recompute.
            let out = out.clone() * out;
            values(ya.grad(&(out * Tensor::<3>::from_data(probe.to_data(), device)).sum().backward()).unwrap())
        };
        let want = grad(&cpu_autodiff(), false);
        for (device, name) in [(cpu_autodiff(), "plain"), (cpu_autodiff_checkpointed(), "checkpointed")] {
            let err = max_rel(grad(&device, true), &want);
            assert!(err < 1e-5, "{name}: {err}");
        }
    }

    /// An odd width goes to burn's ops (the fused kernels write every value of an even one
    /// only): the same values and gradients, the last column's gradient zero.
    #[test]
    fn an_odd_width_takes_burns_ops() {
        let y = Init::new(6).normal::<2>([3, 9], 1.0, &cpu_autodiff()).require_grad();
        assert_eq!(values(geglu(y.clone())), values(decomposed(y.clone())));
        let grad = |out: Tensor<2>| values(y.grad(&out.sum().backward()).unwrap());
        let g = grad(geglu(y.clone()));
        assert_eq!(g, grad(decomposed(y.clone())));
        assert!(g.chunks(9).all(|row| row[8] == 0.0 && row[..8].iter().all(|v| *v != 0.0)), "{g:?}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let device = cpu_autodiff();
        for (h0, g0) in [(0.8f32, -1.7f32), (-1.2, 0.3), (2.0, 2.5)] {
            let y = Tensor::<2>::from_floats([[h0, g0]], &device).require_grad();
            let analytic = values(y.grad(&geglu(y.clone()).sum().backward()).unwrap());
            let at = |h: f32, g: f32| geglu(Tensor::<2>::from_floats([[h, g]], &cpu())).into_scalar::<f32>() as f64;
            let eps = 1e-2;
            let numeric = [(at(h0 + eps, g0) - at(h0 - eps, g0)) / (2.0 * eps as f64), (at(h0, g0 + eps) - at(h0, g0 - eps)) / (2.0 * eps as f64)];
            for (a, n) in analytic.iter().zip(numeric) {
                assert!((*a as f64 - n).abs() < 1e-3, "at ({h0}, {g0}): {analytic:?} vs {numeric:?}");
            }
        }
    }
}
