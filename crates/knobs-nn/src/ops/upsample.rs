//! Nearest-neighbour upsampling by 2 (each pixel repeated into a 2x2 block), as diffusers'
//! `Upsample2D` runs it before its convolution, as one op with its own backward on the CPU
//! backend. From burn's ops it is a broadcast of a `[b, c, h, 1, w, 1]` view reshaped, which
//! burn-flex copies through its generic strided iterator: the SD-1.5 VAE decoder's three
//! upsamplings at 512 px (up to a 512 MB output) took 0.4 s of its 3 s. Here each input row
//! is written twice as wide into the first output row of its pair, which is then copied to
//! the second; the backward sums each 2x2 block of the gradient.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::fresh::written;
use super::group_norm::{flex, slice};
use super::record::record;

/// Output values per parallel piece, about; smaller tensors stay on one thread.
const PIECE: usize = 1 << 16;

/// `x` `[b, c, h, w]` upsampled to `[b, c, 2h, 2w]`, each value repeated into a 2x2 block:
/// torch's `interpolate(x, scale_factor=2, mode="nearest")`.
pub fn nearest2x(x: Tensor<4>) -> Tensor<4> {
    if x.dtype() == DType::F32
        && let Some(y) = fused(&x)
    {
        return y;
    }
    decomposed(x)
}

/// The same from burn's ops (other backends and dtypes; the tests' reference).
pub fn decomposed(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let blocks: Tensor<6> = x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]);
    blocks.reshape([b, c, 2 * h, 2 * w])
}

fn fused(x: &Tensor<4>) -> Option<Tensor<4>> {
    let dims = x.dims();
    if !x.is_autodiff() {
        let x = x.clone().try_into_primitive::<Flex>().ok()?;
        return Some(Tensor::from_primitive::<Flex>(forward(&x, dims)));
    }
    let x = x.clone();
    // Nothing is kept: the backward pass needs only the shape.
    record!(Nearest2x, x.gradient_checkpointing_strategy(), [x], { (forward(&x, dims), dims) })
}

/// Input rows (of `w` values) per parallel piece: fixed by the shape, not the threads.
fn rows_per_piece(w: usize) -> usize {
    (PIECE / (4 * w).max(1)).max(1)
}

fn forward(x: &FlexTensor, [b, c, h, w]: [usize; 4]) -> FlexTensor {
    let x = x.to_contiguous();
    let xs = slice(&x);
    let rows = rows_per_piece(w);
    // SAFETY: each input row's pair of output rows (4w values) is written in full.
    let out = unsafe {
        written(4 * xs.len(), |out| {
            out.par_chunks_mut(4 * w * rows).zip(xs.par_chunks(w * rows)).for_each(|(out, x)| {
                for (pair, x) in out.chunks_exact_mut(4 * w).zip(x.chunks_exact(w)) {
                    let (first, second) = pair.split_at_mut(2 * w);
                    for (o, &v) in first.chunks_exact_mut(2).zip(x) {
                        o[0].write(v);
                        o[1].write(v);
                    }
                    second.copy_from_slice(first);
                }
            })
        })
    };
    flex(out, [b, c, 2 * h, 2 * w])
}

/// Each 2x2 block of `g` `[b, c, 2h, 2w]` summed into `[b, c, h, w]`.
fn block_sums(g: &[f32], [b, c, h, w]: [usize; 4]) -> FlexTensor {
    let rows = rows_per_piece(w);
    // SAFETY: every input row is written in full from its pair of gradient rows.
    let dx = unsafe {
        written(g.len() / 4, |dx| {
            dx.par_chunks_mut(w * rows).zip(g.par_chunks(4 * w * rows)).for_each(|(dx, g)| {
                for (dx, pair) in dx.chunks_exact_mut(w).zip(g.chunks_exact(4 * w)) {
                    let (top, bottom) = pair.split_at(2 * w);
                    for ((d, t), u) in dx.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
                        d.write((t[0] + t[1]) + (u[0] + u[1]));
                    }
                }
            })
        })
    };
    flex(dx, [b, c, h, w])
}

#[derive(Debug)]
struct Nearest2x;

impl Backward<Flex, 1> for Nearest2x {
    /// The input's shape.
    type State = [usize; 4];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        grads.register::<Flex>(node.id, block_sums(slice(&g), ops.state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;
    use crate::{Init, cpu, cpu_autodiff, cpu_autodiff_checkpointed};
    use burn::tensor::Device;

    /// Values against burn's ops (and torch's nearest, which they equal), at a shape spread
    /// over several parallel pieces with a width off any lane count.
    #[test]
    fn matches_burns_ops() {
        let x = Init::new(3).normal::<4>([2, 3, 2 * rows_per_piece(37) + 1, 37], 1.0, &cpu());
        let y = nearest2x(x.clone());
        assert_eq!(y.dims(), [2, 3, 2 * x.dims()[2], 74]);
        let want = values(decomposed(x.clone()));
        assert_eq!(values(y), want);
        // The kernel itself, not only the op that may dispatch to it.
        let kernel = forward(&x.clone().try_into_primitive::<Flex>().unwrap(), x.dims());
        assert_eq!(values(Tensor::<4>::from_primitive::<Flex>(kernel)), want);
    }

    /// Gradients against burn's (the broadcast's sums), plain and under balanced checkpointing,
    /// and each input's gradient the sum of its block's four.
    #[test]
    fn gradients_are_the_blocks_sums() {
        let mut init = Init::new(4);
        let x = init.normal::<4>([1, 2, 5, 3], 1.0, &cpu());
        let probe = init.normal::<4>([1, 2, 10, 6], 1.0, &cpu());
        let grad = |device: &Device, fused: bool| {
            let xa = Tensor::<4>::from_data(x.to_data(), device).require_grad();
            let y = if fused { nearest2x(xa.clone()) } else { decomposed(xa.clone()) };
            // A later op reads the output, so checkpointing has something to recompute.
            let y = super::super::silu(y);
            values(xa.grad(&(y * Tensor::<4>::from_data(probe.to_data(), device)).sum().backward()).unwrap())
        };
        let want = grad(&cpu_autodiff(), false);
        for device in [cpu_autodiff(), cpu_autodiff_checkpointed()] {
            let got = grad(&device, true);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{got:?} vs {want:?}");
            }
        }
        // Without the activation, d(sum(probe * up(x)))/dx is each block's probe sum.
        let xa = Tensor::<4>::from_data(x.to_data(), &cpu_autodiff()).require_grad();
        let g = values(xa.grad(&(nearest2x(xa.clone()) * Tensor::<4>::from_data(probe.to_data(), &cpu_autodiff())).sum().backward()).unwrap());
        let p = values(probe);
        // The backward kernel itself gives the same sums.
        let kernel = values(Tensor::<4>::from_primitive::<Flex>(block_sums(&p, [1, 2, 5, 3])));
        assert_eq!(kernel, g);
        for (i, got) in g.iter().enumerate() {
            let (plane, r, c) = (i / 15, i % 15 / 3, i % 3);
            let at = |dr: usize, dc: usize| p[plane * 60 + (2 * r + dr) * 6 + 2 * c + dc];
            let want = at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1);
            assert!((got - want).abs() < 1e-6, "at {i}: {got} vs {want}");
        }
    }
}
