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
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv_kernel::ConvDims;
use super::fresh::written;
use super::lanes::{self, Lanes, on_lanes};
use super::bf16_product::{self, Packed, RightByPairs};
use super::matrix::{Products, View, min_len, product_strided};

/// Transformed inputs and products per block, in floats (8 MiB, measured best of 4, 8 and 16
/// at SD-1.5's sizes; small in tests, so that they cover several blocks and the tail).
const BLOCK_FLOATS: usize = if cfg!(test) { 1 << 11 } else { 1 << 21 };
/// Tiles per block are a multiple of this (the products' row tile: 16 with AVX2, 32 with AVX-512).
const ROW_TILE: usize = if cfg!(test) { 1 } else { 32 };
/// Room after each position's tiles in the transformed inputs, for the input transform's
/// writes of whole vectors (the widest lane type's).
const PAD: usize = 16;
/// At most this many tiles per block: with 32 channels a block of 1024 tiles took 1.6x as long
/// as blocks of 128-256 ([8, 32, 32, 32], tiny-sd's top level), its transformed values (16 per
/// tile and channel) no longer in the core's cache between the transforms and the products.
const MAX_BLOCK_TILES: usize = 256;
/// Fewer tiles than this (over the batch) take the direct convolution: the weight transform,
/// 16 values per channel pair, costs more than the products save.
const MIN_TILES: usize = if cfg!(test) { 1 } else { 64 };
/// The same, for a frozen weight whose transform is kept between calls (`keeps`): a 4x4
/// plane's 4 tiles a sample still pay.
const MIN_TILES_FROZEN: usize = if cfg!(test) { 1 } else { 8 };
/// The same, for a weight whose transform is made per call and is larger than
/// `KEEP_AT_MOST_BYTES`: writing it (16 values per channel pair, 105 MB for 1280 x 1280) and
/// packing it for the products is memory traffic that the saved multiplications repay only
/// over many tiles. Measured on a 2-core Xeon (2026-12-05), forward, Winograd against direct:
/// [1, 1280, 16, 16] (64 tiles) 134 against 36 ms, [1, 2560 -> 1280, 16, 16] 341 against 76,
/// [1, 1920 -> 640, 32, 32] (256 tiles) 185 against 113-136, [2, 640, 32, 32] (512) 69-78
/// against 78-83, [1, 320, 64, 64] (1024) 34-37 against 38 (its input gradient 72-76 against
/// 87-110).
const MIN_TILES_LARGE: usize = if cfg!(test) { 1 } else { 512 };
/// Convolutions with at most this many channels on either side are narrow (see `run`).
const NARROW_CHANNELS: usize = 128;
/// Fewer channels than this on either side take the direct convolution.
const MIN_CHANNELS: usize = if cfg!(test) { 1 } else { 16 };

/// Convolutions over fewer tiles than this keep a frozen weight's transform. The transform's
/// cost is fixed and the products grow with the tiles: at the built-in model's planes (16 to
/// 256 tiles) making the transforms took 3% of a LoRA step, at SD-1.5's 64x64 plane (2048
/// tiles with guidance) it is noise, and keeping those would spend the budget
/// (`weight_transforms`) before the smaller planes' convolutions.
const KEEP_BELOW_TILES: usize = 1024;
/// Larger transforms are not kept (a 256 x 256-channel weight's is 4 MiB): the budget then
/// goes to many small weights, and a weight past the budget is transformed per call, which
/// costs little only when it is small.
const KEEP_AT_MOST_BYTES: usize = 4 << 20;

/// Whether a frozen weight of `d` keeps its transform between calls.
pub fn keeps(d: &ConvDims) -> bool {
    tiles(d).2 < KEEP_BELOW_TILES && transform_bytes(d.c_out, d.c_in) <= KEEP_AT_MOST_BYTES
}

/// Bytes of the transform of a `[c_out, c_in, 3, 3]` weight: 16 values per channel pair.
pub fn transform_bytes(c_out: usize, c_in: usize) -> usize {
    c_out * c_in * 16 * size_of::<f32>()
}

/// Whether `d` is a convolution this kernel computes, and one where it pays, counting the
/// weight's transform: a `frozen` weight that `keeps` it pays from fewer tiles. The choice
/// depends on the shapes and on `frozen` only, never on what is kept at the moment, so a
/// weight gives the same bits whether its transform is kept, made per call (past the budget)
/// or its weight widened per call from half precision.
pub fn applies(d: &ConvDims, frozen: bool) -> bool {
    d.is_3x3_same()
        && d.c_in >= MIN_CHANNELS
        && d.c_out >= MIN_CHANNELS
        && tiles(d).2 >= min_tiles(d, frozen)
}

/// The fewest tiles (over the batch) at which Winograd pays for `d`.
fn min_tiles(d: &ConvDims, frozen: bool) -> usize {
    if frozen && keeps(d) {
        MIN_TILES_FROZEN
    } else if transform_bytes(d.c_out, d.c_in) > KEEP_AT_MOST_BYTES {
        MIN_TILES_LARGE
    } else {
        MIN_TILES
    }
}

/// Tile rows and columns per sample, and tiles over the batch.
fn tiles(d: &ConvDims) -> (usize, usize, usize) {
    let (th, tw) = (d.h.div_ceil(2), d.w.div_ceil(2));
    (th, tw, d.batch * th * tw)
}

/// A weight `[co, ci, 3, 3]` transformed, `G g G^T` for every channel pair, laid out for the
/// products of the forward pass or (`flipped`) of the input gradient.
#[derive(Debug)]
pub struct WeightTransform {
    u: Vec<f32>,
    c_in: usize,
    c_out: usize,
    flipped: bool,
    /// For bf16 products: each position's `[co, ci]` packed, made on first use (and kept with
    /// a kept transform).
    packed: std::sync::OnceLock<Vec<Packed>>,
}

impl WeightTransform {
    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        transform_bytes(self.c_out, self.c_in) + self.packed.get().map_or(0, |p| p.iter().map(Packed::bytes).sum())
    }

    /// The 16 positions' `[co, ci]` matrices as the bf16 kernel's left operands.
    fn packed(&self) -> &[Packed] {
        // The convolution's own channels: the flipped transform's swap the weight's.
        let (ci, co) = if self.flipped { (self.c_out, self.c_in) } else { (self.c_in, self.c_out) };
        self.packed.get_or_init(|| {
            // SAFETY (the views): u is [ci][16][co].
            (0..16).map(|xi| Packed::left(co, ci, View::strided(&self.u, xi * co, 1, 16 * co), true)).collect()
        })
    }
}

/// The transform of `w` `[w_out, w_in, 3, 3]`, laid out `[ci][16][co]` where `ci` and `co` are
/// the convolution's own (`flipped`: the input gradient's, `ci` being the weight's output
/// channels and each 3x3 kernel turned 180 degrees).
pub fn transform(w: &[f32], w_out: usize, w_in: usize, flipped: bool) -> WeightTransform {
    let (ci, co) = if flipped { (w_out, w_in) } else { (w_in, w_out) };
    let pieces = min_len(ci * 16 * co >= 1 << 16);
    let fill = |u: &mut [MaybeUninit<f32>]| u.par_chunks_mut(16 * co).with_min_len(pieces).enumerate().for_each(|(i, dst)| {
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
                    dst[(y * 4 + x) * co + o].write(v);
                }
            }
        }
    });
    // SAFETY: every (input channel, position, output channel) is written.
    let u = unsafe { written(ci * 16 * co, fill) };
    WeightTransform { u, c_in: w_in, c_out: w_out, flipped, packed: Default::default() }
}

/// Output `[B, co, h, w]` of `x` `[B, ci, h, w]` with the weight's forward transform `u`.
pub fn forward(x: &[f32], u: &WeightTransform, bias: Option<&[f32]>, d: &ConvDims, products: Products) -> Vec<f32> {
    assert_eq!((u.c_in, u.c_out, u.flipped), (d.c_in, d.c_out, false), "the forward transform of this convolution's weight");
    run(x, u, bias, d.batch, d.c_in, d.c_out, d.h, d.w, products)
}

/// The input gradient `[B, ci, h, w]` from the output gradient `g` `[B, co, h, w]`: the same
/// convolution of `g` with the weight's channels swapped and its taps turned 180 degrees
/// (`u` the weight's flipped transform).
pub fn input_grad(u: &WeightTransform, g: &[f32], d: &ConvDims, products: Products) -> Vec<f32> {
    assert_eq!((u.c_in, u.c_out, u.flipped), (d.c_in, d.c_out, true), "the flipped transform of this convolution's weight");
    run(g, u, None, d.batch, d.c_out, d.c_in, d.h, d.w, products)
}

/// A raw pointer to the output, shared by the blocks: each writes only its own tiles.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: blocks write disjoint tiles of the output (see `run`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// The convolution of `x` `[B, ci, h, w]` with the transformed weight `u` `[ci][16][co]`.
#[allow(clippy::too_many_arguments)]
fn run(x: &[f32], transform: &WeightTransform, bias: Option<&[f32]>, batch: usize, ci: usize, co: usize, h: usize, w: usize, products: Products) -> Vec<f32> {
    let u = &transform.u[..];
    // bf16 products: the transformed weight rounded and packed once for all blocks.
    let packed = (products == Products::Bf16).then(|| transform.packed());
    let d = ConvDims { batch, c_in: ci, h, w, c_out: co, kernel: [3, 3], stride: [1, 1], padding: [1, 1], dilation: [1, 1] };
    let (_, _, total) = tiles(&d);
    // At least four blocks where there are tiles enough, in multiples of the products' row tile;
    // a narrow convolution's in quarters of it, so that a few tiles (a small model's 8x8 and
    // 4x4 planes) still make blocks for every thread: there the transforms, which only the
    // blocks spread, weigh as much as the products.
    let cap = (BLOCK_FLOATS / (16 * (ci + co))).max(ROW_TILE);
    let unit = if ci.max(co) <= NARROW_CHANNELS { ROW_TILE.div_ceil(4) } else { ROW_TILE };
    let per_block = cap.min(total.div_ceil(4)).next_multiple_of(unit).min(MAX_BLOCK_TILES).min(total);
    let blocks = total.div_ceil(per_block);
    // A block for every thread: one thread each, products on that thread. Fewer: the products
    // on gemm's threads (gemm splits over output tiles only, so the sums are the same).
    let spread = blocks >= rayon::current_num_threads();
    let par = if spread { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(0) };
    let pieces = min_len(spread);
    // The transformed inputs: every channel's for f32 products, a pair of channels at a time
    // for bf16 ones (packed straight away).
    let v_channels = if packed.is_some() { ci.min(2) } else { ci };
    let convolve = |out: &mut [MaybeUninit<f32>]| {
        let dst = Out(out.as_mut_ptr().cast());
        (0..blocks).into_par_iter().with_min_len(pieces).for_each_init(
            || (vec![0.0f32; v_channels * 16 * (per_block + PAD)], vec![0.0f32; co * 16 * (per_block + PAD)], Vec::new()),
            |(v, m, scratch), b| {
                let first = b * per_block;
                let n = per_block.min(total - first);
                let isa = lanes::isa();
                let vs = per_block + PAD;
                if let Some(packed) = packed {
                    // Transposed, m^T [co, n] = u^T [co, ci] v^T [ci, n] for each position: rows
                    // of m^T are contiguous, and the weight is the operand packed beforehand. Each
                    // pair of input channels is transformed into v's first two channels and packed
                    // while in cache.
                    let mut inputs: Vec<RightByPairs> = (0..16).map(|_| RightByPairs::new(ci, n)).collect();
                    for c in (0..ci).step_by(2) {
                        for (j, c) in (c..(c + 2).min(ci)).enumerate() {
                            let tiles = Tiles { d: &d, first, n, stride: vs, scratch: &mut *scratch };
                            transform_input((x, c, &mut v[j * 16 * vs..][..16 * vs], tiles), isa);
                        }
                        for (xi, input) in inputs.iter_mut().enumerate() {
                            input.set_pair(c / 2, &v[xi * vs..][..n], (c + 1 < ci).then(|| &v[(16 + xi) * vs..][..n]));
                        }
                    }
                    for (xi, input) in inputs.into_iter().map(RightByPairs::packed).enumerate() {
                        // SAFETY: m holds [co][16][vs]; this position's m^T is co rows of n at 16 vs.
                        unsafe { bf16_product::product_packed(&packed[xi], &input, m[xi * vs..].as_mut_ptr(), 16 * vs, 1, false, 1.0, !spread) };
                    }
                } else {
                    for c in 0..ci {
                        let tiles = Tiles { d: &d, first, n, stride: vs, scratch: &mut *scratch };
                        transform_input((x, c, &mut v[c * 16 * vs..][..16 * vs], tiles), isa);
                    }
                    for xi in 0..16 {
                        // SAFETY: v holds [ci][16][vs], u [ci][16][co], m [co][16][vs]; this
                        // position's slice of each is a strided n x ci, ci x co and n x co matrix.
                        unsafe {
                            let lhs = View::strided(v, xi * vs, 1, 16 * vs);
                            let rhs = View::strided(u, xi * co, 16 * co, 1);
                            product_strided(n, co, ci, m[xi * vs..].as_mut_ptr(), 1, 16 * vs, false, lhs, rhs, 1.0, par);
                        }
                    }
                }
                for o in 0..co {
                    let b0 = bias.map_or(0.0, |b| b[o]);
                    // Tiles first..first + n are this block's alone, so these writes are too.
                    let tiles = Tiles { d: &d, first, n, stride: vs, scratch: &mut *scratch };
                    transform_output((&m[o * 16 * vs..][..16 * vs], o, b0, dst, tiles), isa);
                }
            },
        );
    };
    // SAFETY: the blocks' tiles cover every output plane, each value written once (by
    // `transform_output`, for every output channel).
    unsafe { written(batch * co * h * w, convolve) }
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
    fn transform_input(a: (&[f32], usize, &mut [f32], Tiles)) -> () { L => input_kernel::<L>(a.0, a.1, a.2, a.3) }
}

on_lanes! {
    /// `A^T m A` plus the bias for output channel `o`, from `m` `[16][stride]`, written where the
    /// outputs fall inside `out` (unsafe: no other thread may write these tiles of `out`).
    fn transform_output(a: (&[f32], usize, f32, Out, Tiles)) -> () { L => unsafe { output_kernel::<L>(a.0, a.1, a.2, a.3, a.4) } }
}

/// `dst[k] = a[k] + b[k]` (`SUB`: `a[k] - b[k]`) for `k < n`, `n` a whole number of vectors.
#[inline(always)]
fn lanes_op<L: Lanes, const SUB: bool>(dst: &mut [f32], a: &[f32], b: &[f32], n: usize) {
    assert!(n.is_multiple_of(L::W) && dst.len() >= n && a.len() >= n && b.len() >= n);
    for k in (0..n).step_by(L::W) {
        // SAFETY: k + W <= n, within all three (asserted); the caller's ISA is L's (on_lanes!).
        unsafe {
            let (x, y) = (L::load(a.as_ptr().add(k)), L::load(b.as_ptr().add(k)));
            (if SUB { x.sub(y) } else { x.add(y) }).store(dst.as_mut_ptr().add(k));
        }
    }
}

/// Each lane width's `transform_input` (`on_lanes!`). Every loop over tiles runs in whole
/// vectors: the scratch rows hold a vector more than the run, and the writes into `v` may run
/// up to a vector past the run's tiles, into the next run's (written after) or the padding
/// past each position's `stride`.
#[inline(always)]
fn input_kernel<L: Lanes>(x: &[f32], c: usize, v: &mut [f32], t: Tiles) {
    let Tiles { d, first, n, stride, scratch } = t;
    for (s, ty, tx, len, at) in runs(d, first, n) {
        let plane = &x[(s * d.c_in + c) * d.h * d.w..][..d.h * d.w];
        let whole = len.next_multiple_of(L::W);
        let m = whole + L::W;
        // Every value below is written before it is read: no zeroing.
        if scratch.len() < 16 * m {
            scratch.resize(16 * m, 0.0);
        }
        let (rows, q) = scratch[..16 * m].split_at_mut(8 * m);
        // The four input rows under this run split into even and odd columns of the patches
        // (patch k's columns are 2 (tx + k) - 1 .. 2 (tx + k) + 2): e_r[k] column
        // 2 (tx + k) - 1 and o_r[k] column 2 (tx + k), zero outside the plane.
        let (e, o) = rows.split_at_mut(4 * m);
        for r in 0..4 {
            let (e, o) = (&mut e[r * m..][..m], &mut o[r * m..][..m]);
            let Some(y) = (2 * ty + r).checked_sub(1).filter(|&y| y < d.h) else {
                e.fill(0.0);
                o.fill(0.0);
                continue;
            };
            let row = &plane[y * d.w..][..d.w];
            for k in 0..m {
                let col = 2 * (tx + k);
                e[k] = if k <= len && (1..=d.w).contains(&col) { row[col - 1] } else { 0.0 };
                o[k] = if k <= len && col < d.w { row[col] } else { 0.0 };
            }
        }
        // B^T down the rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3, for the even and the odd columns.
        for (r, (i, j, sub)) in [(0, 2, true), (1, 2, false), (2, 1, true), (1, 3, true)].into_iter().enumerate() {
            for half in [0, 4] {
                let (a, b, dst) = (&rows[(half + i) * m..][..m], &rows[(half + j) * m..][..m], &mut q[(half + r) * m..][..m]);
                if sub { lanes_op::<L, true>(dst, a, b, m) } else { lanes_op::<L, false>(dst, a, b, m) }
            }
        }
        // B along each: c0 - c2, c1 + c2, c2 - c1, c1 - c3, where c0 c1 c2 c3 are e[k] o[k]
        // e[k + 1] o[k + 1].
        for r in 0..4 {
            let (e, o) = (&q[r * m..][..m], &q[(4 + r) * m..][..m]);
            let at = |i: usize| (r * 4 + i) * stride + at;
            lanes_op::<L, true>(&mut v[at(0)..], e, &e[1..], whole);
            lanes_op::<L, false>(&mut v[at(1)..], o, &e[1..], whole);
            lanes_op::<L, true>(&mut v[at(2)..], &e[1..], o, whole);
            lanes_op::<L, true>(&mut v[at(3)..], o, &o[1..], whole);
        }
    }
}

/// As [`input_kernel`], for the output transform: reads up to a vector past the run's tiles
/// (into the next run's or the padding past each position's `stride`).
///
/// SAFETY: no other thread writes these tiles of `out`.
#[inline(always)]
unsafe fn output_kernel<L: Lanes>(m: &[f32], o: usize, bias: f32, out: Out, t: Tiles) {
    let Tiles { d, first, n, stride, scratch } = t;
    for (s, ty, tx, len, at) in runs(d, first, n) {
        let whole = len.next_multiple_of(L::W);
        // Every value below is written before it is read: no zeroing.
        if scratch.len() < 10 * whole {
            scratch.resize(10 * whole, 0.0);
        }
        let (sums, pair) = scratch[..10 * whole].split_at_mut(8 * whole);
        // A^T down the rows: m0 + m1 + m2 (sums row i) and m1 - m2 - m3 (row 4 + i), for each
        // of the 4 columns i.
        for i in 0..4 {
            let m = |r: usize| &m[(r * 4 + i) * stride + at..][..whole];
            let (m0, m1, m2, m3) = (m(0), m(1), m(2), m(3));
            let (top, bottom) = sums.split_at_mut(4 * whole);
            let (top, bottom) = (&mut top[i * whole..][..whole], &mut bottom[i * whole..][..whole]);
            for k in (0..whole).step_by(L::W) {
                // SAFETY: k + W <= whole, the length of every slice here.
                unsafe {
                    let v = |s: &[f32]| L::load(s.as_ptr().add(k));
                    v(m0).add(v(m1)).add(v(m2)).store(top.as_mut_ptr().add(k));
                    v(m1).sub(v(m2)).sub(v(m3)).store(bottom.as_mut_ptr().add(k));
                }
            }
        }
        let cols = (2 * len).min(d.w - 2 * tx);
        let plane = (s * d.c_out + o) * d.h * d.w;
        let (even, odd) = pair.split_at_mut(whole);
        for r in 0..2 {
            let y = 2 * ty + r;
            if y >= d.h {
                break;
            }
            let q = |i: usize| &sums[(r * 4 + i) * whole..][..whole];
            // A along each: c0 + c1 + c2 and c1 - c2 - c3, plus the bias.
            for k in (0..whole).step_by(L::W) {
                // SAFETY: as above.
                unsafe {
                    let v = |i: usize| L::load(q(i).as_ptr().add(k));
                    let b = L::splat(bias);
                    v(0).add(v(1)).add(v(2)).add(b).store(even.as_mut_ptr().add(k));
                    v(1).sub(v(2)).sub(v(3)).add(b).store(odd.as_mut_ptr().add(k));
                }
            }
            // SAFETY: columns 2 tx .. 2 tx + cols of row y are in bounds and this run's alone
            // (the caller of transform_output vouches that no other thread writes them).
            unsafe {
                let row = out.0.add(plane + y * d.w + 2 * tx);
                for c in 0..cols {
                    *row.add(c) = if c % 2 == 0 { even[c / 2] } else { odd[c / 2] };
                }
            }
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
            assert!(applies(&d, false));
            let x = data(batch * ci * h * w, 1);
            let wt = data(co * ci * 9, 2);
            let u = transform(&wt, co, ci, false);
            let bias = data(co, 3);
            for b in [None, Some(bias.as_slice())] {
                let got = forward(&x, &u, b, &d, Products::F32);
                let want = conv_kernel::forward(&x, &wt, b, &d, Products::F32);
                let err = max_rel(&got, &want);
                assert!(err < 1e-6, "forward {batch}x{ci}x{h}x{w} -> {co}: {err}");
            }
            let g = data(batch * co * h * w, 4);
            let got = input_grad(&transform(&wt, co, ci, true), &g, &d, Products::F32);
            let (want, _) = conv_kernel::backward(&x, &wt, &g, &d, true, false, Products::F32);
            let err = max_rel(&got, want.unwrap());
            assert!(err < 1e-6, "input gradient {batch}x{ci}x{h}x{w} -> {co}: {err}");
        }
    }

    /// bf16 products round the transformed input and weight: the error against the f32
    /// direct convolution is bf16's, and at most a small multiple of the direct convolution's
    /// with bf16 products (the operands rounded as they are), forward and input gradient.
    #[test]
    fn bf16_products_stay_near_the_direct_convolution() {
        if !bf16_product::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (batch, ci, co, h, w) in [(2, 5, 6, 9, 7), (2, 16, 24, 12, 10), (1, 64, 40, 16, 16)] {
            let d = dims(batch, ci, co, h, w);
            let (x, wt, g) = (data(batch * ci * h * w, 1), data(co * ci * 9, 2), data(batch * co * h * w, 4));
            let exact = conv_kernel::forward(&x, &wt, None, &d, Products::F32);
            let direct = max_rel(conv_kernel::forward(&x, &wt, None, &d, Products::Bf16), &exact);
            let err = max_rel(forward(&x, &transform(&wt, co, ci, false), None, &d, Products::Bf16), &exact);
            assert!(err > 1e-5 && err < 3.0 * direct.max(2e-3), "forward {batch}x{ci}x{h}x{w} -> {co}: {err} (direct {direct})");
            let (exact, _) = conv_kernel::backward(&x, &wt, &g, &d, true, false, Products::F32);
            let (direct, _) = conv_kernel::backward(&x, &wt, &g, &d, true, false, Products::Bf16);
            let exact = exact.unwrap();
            let direct = max_rel(direct.unwrap(), &exact);
            let err = max_rel(input_grad(&transform(&wt, co, ci, true), &g, &d, Products::Bf16), &exact);
            assert!(err > 1e-5 && err < 3.0 * direct.max(2e-3), "input gradient {batch}x{ci}x{h}x{w} -> {co}: {err} (direct {direct})");
        }
    }

    #[test]
    fn only_stride_one_padding_one_3x3() {
        let mut d = dims(2, 32, 32, 16, 16);
        d.stride = [2, 2];
        assert!(!applies(&d, true));
        let mut d = dims(2, 32, 32, 16, 16);
        d.kernel = [1, 1];
        d.padding = [0, 0];
        assert!(!applies(&d, true));
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
            let (u, flipped) = (transform(&wt, co, ci, false), transform(&wt, co, ci, true));
            for products in [Products::F32, Products::Bf16] {
                if products == Products::Bf16 && !bf16_product::available() {
                    continue;
                }
                let run = || (forward(&x, &u, None, &d, products), input_grad(&flipped, &x, &d, products));
                let one = pool(1).install(run);
                // Two threads spread the blocks; eight leave them to the products' own split.
                assert!(one == pool(2).install(run) && one == pool(8).install(run), "{batch}x{ci}x{h}x{w} {products:?}");
            }
        }
    }
}
