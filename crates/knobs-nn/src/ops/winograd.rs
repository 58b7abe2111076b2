//! 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3): each 2x2
//! block of outputs from a 4x4 block of inputs with 16 products per channel pair instead of 36,
//! so the matrix products, which are nearly all of a UNet's or VAE's convolution time, do 2.25x
//! fewer multiplications. Lavin and Gray's formulation:
//! `Y = A^T [(G g G^T) . (B^T d B)] A`, the elementwise product summed over input channels as
//! 16 matrix products (one per position of the 4x4 transformed tile).
//!
//! Tiles are worked in blocks fixed by the shapes; each block's products and sums run in a fixed
//! order, so the results do not depend on the thread count. The transforms add and halve only,
//! so the rounding stays that of a direct convolution (about 1e-7 relative).
use rayon::prelude::*;

use super::conv_kernel::ConvDims;
use super::lanes::{self, on_lanes};
use super::matrix::{View, min_len, product_strided};

/// Transformed inputs and products per block, in floats (8 MiB, measured best of 4, 8 and 16
/// at SD-1.5's sizes; small in tests, so that they cover several blocks and the tail).
const BLOCK_FLOATS: usize = if cfg!(test) { 1 << 11 } else { 1 << 21 };
/// Tiles per block are a multiple of this (the products' row tile: 16 with AVX2, 32 with AVX-512).
const ROW_TILE: usize = if cfg!(test) { 1 } else { 32 };
/// At most this many tiles per block: with 32 channels a block of 1024 tiles took 1.6x as long
/// as blocks of 128-256 ([8, 32, 32, 32], tiny-sd's top level), its transformed values (16 per
/// tile and channel) no longer in the core's cache between the transforms and the products.
const MAX_BLOCK_TILES: usize = 256;
/// Fewer tiles than this (over the batch) take the direct convolution: the weight transform,
/// 16 values per channel pair, costs more than the products save.
const MIN_TILES: usize = if cfg!(test) { 1 } else { 64 };
/// Fewer channels than this on either side take the direct convolution.
const MIN_CHANNELS: usize = if cfg!(test) { 1 } else { 16 };

/// Whether `d` is a convolution this kernel computes, and one where it pays.
pub fn applies(d: &ConvDims) -> bool {
    d.kernel == [3, 3]
        && d.stride == [1, 1]
        && d.padding == [1, 1]
        && d.dilation == [1, 1]
        && d.c_in >= MIN_CHANNELS
        && d.c_out >= MIN_CHANNELS
        && tiles(d).2 >= MIN_TILES
}

/// Tile rows and columns per sample, and tiles over the batch.
fn tiles(d: &ConvDims) -> (usize, usize, usize) {
    let (th, tw) = (d.h.div_ceil(2), d.w.div_ceil(2));
    (th, tw, d.batch * th * tw)
}

/// Output `[B, co, h, w]` of `x` `[B, ci, h, w]` with weight `w` `[co, ci, 3, 3]`.
pub fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, d: &ConvDims) -> Vec<f32> {
    let u = transform_weight(w, d.c_out, d.c_in, false);
    run(x, &u, bias, d.batch, d.c_in, d.c_out, d.h, d.w)
}

/// The input gradient `[B, ci, h, w]` from the output gradient `g` `[B, co, h, w]`: the same
/// convolution of `g` with the weight's channels swapped and its taps turned 180 degrees.
pub fn input_grad(w: &[f32], g: &[f32], d: &ConvDims) -> Vec<f32> {
    let u = transform_weight(w, d.c_out, d.c_in, true);
    run(g, &u, None, d.batch, d.c_out, d.c_in, d.h, d.w)
}

/// `G g G^T` for every channel pair, laid out `[ci][16][co]` for the products, where `ci` and
/// `co` are the convolution's own (`flipped`: the input gradient's, `ci` being the weight's
/// output channels and each 3x3 kernel turned 180 degrees).
fn transform_weight(w: &[f32], w_out: usize, w_in: usize, flipped: bool) -> Vec<f32> {
    let (ci, co) = if flipped { (w_out, w_in) } else { (w_in, w_out) };
    let mut u = vec![0.0f32; ci * 16 * co];
    let pieces = min_len(u.len() >= 1 << 16);
    u.par_chunks_mut(16 * co).with_min_len(pieces).enumerate().for_each(|(i, dst)| {
        for o in 0..co {
            let (wo, wi) = if flipped { (i, o) } else { (o, i) };
            let k = &w[(wo * w_in + wi) * 9..][..9];
            let tap = |y: usize, x: usize| {
                if flipped { k[(2 - y) * 3 + 2 - x] } else { k[y * 3 + x] }
            };
            // G g: rows g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2 (column by column); then
            // the same along each resulting row.
            let g = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
            let cols = [0, 1, 2].map(|x| g(tap(0, x), tap(1, x), tap(2, x)));
            for y in 0..4 {
                let t = g(cols[0][y], cols[1][y], cols[2][y]);
                for (x, v) in t.into_iter().enumerate() {
                    dst[(y * 4 + x) * co + o] = v;
                }
            }
        }
    });
    u
}

/// A raw pointer to the output, shared by the blocks: each writes only its own tiles.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: blocks write disjoint tiles of the output (see `run`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// The convolution of `x` `[B, ci, h, w]` with the transformed weight `u` `[ci][16][co]`.
#[allow(clippy::too_many_arguments)]
fn run(x: &[f32], u: &[f32], bias: Option<&[f32]>, batch: usize, ci: usize, co: usize, h: usize, w: usize) -> Vec<f32> {
    let d = ConvDims { batch, c_in: ci, h, w, c_out: co, kernel: [3, 3], stride: [1, 1], padding: [1, 1], dilation: [1, 1] };
    let (_, _, total) = tiles(&d);
    // At least four blocks where there are tiles enough, in multiples of the products' row tile.
    let cap = (BLOCK_FLOATS / (16 * (ci + co))).max(ROW_TILE);
    let per_block = cap.min(total.div_ceil(4)).next_multiple_of(ROW_TILE).min(MAX_BLOCK_TILES).min(total);
    let blocks = total.div_ceil(per_block);
    let mut out = vec![0.0f32; batch * co * h * w];
    let dst = Out(out.as_mut_ptr());
    // Several blocks: one thread each, products on that thread. One block: its products on
    // gemm's threads (gemm splits over output tiles only, so the sums are the same).
    let spread = blocks >= 2 * rayon::current_num_threads();
    let par = if spread { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(0) };
    let pieces = min_len(spread);
    (0..blocks).into_par_iter().with_min_len(pieces).for_each_init(
        || (vec![0.0f32; ci * 16 * per_block], vec![0.0f32; co * 16 * per_block], Vec::new()),
        |(v, m, scratch), b| {
            let first = b * per_block;
            let n = per_block.min(total - first);
            let isa = lanes::isa();
            for c in 0..ci {
                let tiles = Tiles { d: &d, first, n, stride: per_block, scratch: &mut *scratch };
                transform_input((x, c, &mut v[c * 16 * per_block..][..16 * per_block], tiles), isa);
            }
            for xi in 0..16 {
                // SAFETY: v holds [ci][16][per_block], u [ci][16][co], m [co][16][per_block];
                // this position's slice of each is a strided n x ci, ci x co and n x co matrix.
                unsafe {
                    let lhs = View::strided(v, xi * per_block, 1, 16 * per_block);
                    let rhs = View::strided(u, xi * co, 16 * co, 1);
                    product_strided(n, co, ci, m[xi * per_block..].as_mut_ptr(), 1, 16 * per_block, false, lhs, rhs, 1.0, par);
                }
            }
            for o in 0..co {
                let b0 = bias.map_or(0.0, |b| b[o]);
                // Tiles first..first + n are this block's alone, so these writes are too.
                let tiles = Tiles { d: &d, first, n, stride: per_block, scratch: &mut *scratch };
                transform_output((&m[o * 16 * per_block..][..16 * per_block], o, b0, dst, tiles), isa);
            }
        },
    );
    out
}

/// The tiles `first..first + n` as runs along one tile row: (sample, tile row, first tile
/// column, tiles, offset of the run within the block).
fn runs(d: &ConvDims, first: usize, n: usize) -> impl Iterator<Item = (usize, usize, usize, usize, usize)> {
    let (th, tw, _) = tiles(d);
    let mut t = first;
    std::iter::from_fn(move || {
        (t < first + n).then(|| {
            let (s, ty, tx) = (t / (th * tw), t / tw % th, t % tw);
            let len = (tw - tx).min(first + n - t);
            let run = (s, ty, tx, len, t - first);
            t += len;
            run
        })
    })
}

/// What both transforms work on: a block's tiles (`first..first + n`), the stride between the
/// 16 positions of the transformed values, and scratch space.
struct Tiles<'a> {
    d: &'a ConvDims,
    first: usize,
    n: usize,
    stride: usize,
    scratch: &'a mut Vec<f32>,
}

on_lanes! {
    /// `B^T d B` of channel `c`'s 4x4 input patches, into `v` `[16][stride]`.
    fn transform_input(a: (&[f32], usize, &mut [f32], Tiles)) -> () { L => input_kernel(a.0, a.1, a.2, a.3) }
}

on_lanes! {
    /// `A^T m A` plus the bias for output channel `o`, from `m` `[16][stride]`, written where the
    /// outputs fall inside `out` (unsafe: no other thread may write these tiles of `out`).
    fn transform_output(a: (&[f32], usize, f32, Out, Tiles)) -> () { L => unsafe { output_kernel(a.0, a.1, a.2, a.3, a.4) } }
}

/// `dst[k] = f(a[k], b[k])`.
#[inline(always)]
fn zip2(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(x, y);
    }
}

/// Inlined into each lane width's copy of `transform_input` (`on_lanes!`), so that its loops
/// over tiles vectorise for that width.
#[inline(always)]
fn input_kernel(x: &[f32], c: usize, v: &mut [f32], t: Tiles) {
    let Tiles { d, first, n, stride, scratch } = t;
    for (s, ty, tx, len, at) in runs(d, first, n) {
        let plane = &x[(s * d.c_in + c) * d.h * d.w..][..d.h * d.w];
        // The four input rows under this run, from column 2 tx - 1, zero outside the plane.
        let (width, half) = (2 * len + 2, len + 1);
        scratch.clear();
        scratch.resize(4 * width + 2 * half, 0.0);
        let (p, eo) = scratch.split_at_mut(4 * width);
        for r in 0..4 {
            let Some(y) = (2 * ty + r).checked_sub(1).filter(|&y| y < d.h) else {
                continue;
            };
            let x0 = 2 * tx as isize - 1;
            let (from, to) = (x0.max(0) as usize, ((x0 + width as isize) as usize).min(d.w));
            let dst = (from as isize - x0) as usize;
            p[r * width + dst..][..to - from].copy_from_slice(&plane[y * d.w + from..y * d.w + to]);
        }
        let (e, o) = eo.split_at_mut(half);
        // B^T down the rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3 (adding -1 times is subtracting).
        for (r, (i, j, sign)) in [(0, 2, -1.0f32), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0)].into_iter().enumerate() {
            let (pi, pj) = (&p[i * width..][..width], &p[j * width..][..width]);
            // The combined row's even and odd columns: patch k's columns are 2k .. 2k + 3.
            for (((a, b), ek), ok) in pi.chunks_exact(2).zip(pj.chunks_exact(2)).zip(e.iter_mut()).zip(o.iter_mut()) {
                *ek = a[0] + sign * b[0];
                *ok = a[1] + sign * b[1];
            }
            // B along it: c0 - c2, c1 + c2, c2 - c1, c1 - c3.
            let at = |i: usize| (r * 4 + i) * stride + at;
            zip2(&mut v[at(0)..][..len], e, &e[1..], |a, b| a - b);
            zip2(&mut v[at(1)..][..len], o, &e[1..], |a, b| a + b);
            zip2(&mut v[at(2)..][..len], &e[1..], o, |a, b| a - b);
            zip2(&mut v[at(3)..][..len], o, &o[1..], |a, b| a - b);
        }
    }
}

/// As [`input_kernel`], for the output transform.
///
/// SAFETY: no other thread writes these tiles of `out`.
#[inline(always)]
unsafe fn output_kernel(m: &[f32], o: usize, bias: f32, out: Out, t: Tiles) {
    let Tiles { d, first, n, stride, scratch } = t;
    for (s, ty, tx, len, at) in runs(d, first, n) {
        scratch.clear();
        scratch.resize(10 * len, 0.0);
        let (sums, row) = scratch.split_at_mut(8 * len);
        let m = |r: usize, i: usize| &m[(r * 4 + i) * stride + at..][..len];
        // A^T down the rows: m0 + m1 + m2 and m1 - m2 - m3, for each of the 4 columns.
        for i in 0..4 {
            let (top, bottom) = sums.split_at_mut(4 * len);
            for ((((t, b), m0), m1), (m2, m3)) in
                top[i * len..][..len].iter_mut().zip(&mut bottom[i * len..][..len]).zip(m(0, i)).zip(m(1, i)).zip(m(2, i).iter().zip(m(3, i)))
            {
                *t = m0 + m1 + m2;
                *b = m1 - m2 - m3;
            }
        }
        let cols = (2 * len).min(d.w - 2 * tx);
        let plane = (s * d.c_out + o) * d.h * d.w;
        for r in 0..2 {
            let y = 2 * ty + r;
            if y >= d.h {
                break;
            }
            let q = |i: usize| &sums[(r * 4 + i) * len..][..len];
            // A along each: c0 + c1 + c2 and c1 - c2 - c3, interleaved into the output row.
            for (pair, ((q0, q1), (q2, q3))) in row.chunks_exact_mut(2).zip(q(0).iter().zip(q(1)).zip(q(2).iter().zip(q(3)))) {
                pair[0] = q0 + q1 + q2 + bias;
                pair[1] = q1 - q2 - q3 + bias;
            }
            // SAFETY: columns 2 tx .. 2 tx + cols of row y are in bounds and this run's alone
            // (the caller of transform_output vouches that no other thread writes them).
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.0.add(plane + y * d.w + 2 * tx), cols) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::max_rel;
    use crate::ops::conv_kernel;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn dims(batch: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> ConvDims {
        ConvDims { batch, c_in, h, w, c_out, kernel: [3, 3], stride: [1, 1], padding: [1, 1], dilation: [1, 1] }
    }

    /// Odd and even sizes, one row or column, several blocks with a short tail, bias or not:
    /// the same values as the direct convolution, forward and input gradient.
    #[test]
    fn matches_the_direct_convolution() {
        for (batch, ci, co, h, w) in [(2, 5, 6, 9, 7), (1, 3, 4, 8, 8), (3, 7, 2, 5, 1), (1, 2, 3, 1, 6), (2, 16, 24, 12, 10)] {
            let d = dims(batch, ci, co, h, w);
            assert!(applies(&d));
            let x = data(batch * ci * h * w, 1);
            let wt = data(co * ci * 9, 2);
            let bias = data(co, 3);
            for b in [None, Some(bias.as_slice())] {
                let got = forward(&x, &wt, b, &d);
                let want = conv_kernel::forward(&x, &wt, b, &d);
                let err = max_rel(&got, &want);
                assert!(err < 1e-6, "forward {batch}x{ci}x{h}x{w} -> {co}: {err}");
            }
            let g = data(batch * co * h * w, 4);
            let got = input_grad(&wt, &g, &d);
            let (want, _) = conv_kernel::backward(&x, &wt, &g, &d, true, false);
            let err = max_rel(&got, &want.unwrap());
            assert!(err < 1e-6, "input gradient {batch}x{ci}x{h}x{w} -> {co}: {err}");
        }
    }

    #[test]
    fn only_stride_one_padding_one_3x3() {
        let mut d = dims(2, 32, 32, 16, 16);
        d.stride = [2, 2];
        assert!(!applies(&d));
        let mut d = dims(2, 32, 32, 16, 16);
        d.kernel = [1, 1];
        d.padding = [0, 0];
        assert!(!applies(&d));
    }

    /// Blocks are fixed by the shapes: one thread and two give the same bits, both with
    /// several blocks (one per thread) and with one (the products split).
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        for (batch, ci, co, h, w) in [(2, 8, 8, 20, 20), (1, 4, 4, 4, 4)] {
            let d = dims(batch, ci, co, h, w);
            let x = data(batch * ci * h * w, 5);
            let wt = data(co * ci * 9, 6);
            let run = || (forward(&x, &wt, None, &d), input_grad(&wt, &x, &dims(batch, co, ci, h, w)));
            let one = pool(1).install(run);
            // Two threads spread the blocks; eight leave them to the products' own split.
            assert!(one == pool(2).install(run) && one == pool(8).install(run), "{batch}x{ci}x{h}x{w}");
        }
    }
}
