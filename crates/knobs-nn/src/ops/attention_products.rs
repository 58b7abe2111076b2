//! Attention for heads wider than `attention_small` takes (SD-1.5's 40 to 160 channels, the
//! VAE's 512) as matrix products over tiles of query rows x keys, flash-attention style: the
//! forward pass keeps each row's largest score and sum so far and rescales its output when a
//! later key block raises the largest (online softmax); the backward pass recomputes each
//! tile's probabilities from the saved log-sum-exp and gets all three gradients from four more
//! products. Only one tile's scores exist at a time, so memory stays linear in the sequence
//! length, and a tile stays in cache while the products read it.
//!
//! Tasks are fixed by the shapes: forward, one per (batch, head, row block), its key blocks in
//! order; backward, one per (batch, head), a key's gradient summing the row blocks in order
//! and a row's the key blocks. The products split their work over output tiles only, so
//! results do not depend on the thread count.
//!
//! With bf16 products (mixed precision), every product's operands are rounded to bf16, the
//! probabilities and their gradient included, and summed in f32, as autocast's bf16 attention
//! computes; the softmax and its running sums stay f32. Each operand read by several products
//! (a head's key and value blocks, its query and output-gradient blocks) is packed once.
use rayon::prelude::*;

use super::attention_kernel::{Dims, assemble};
use super::lanes::{Isa, on_lanes};
use super::bf16_product::Packed;
use super::matrix::{Operand, Products, View, min_len, parallelism, product_of};
use super::simd::{exp_shifted, max};

/// Query rows and keys per forward tile (512 KiB of scores). Whole rows of keys, as before
/// (128 rows x 4096 keys, 2 MiB), left the tile to L2's edge: gemm ran the score product at
/// 111 GFLOP/s where a 256 x 512 tile runs it at 142 (one thread of a 2-core Xeon, 2 MiB of
/// L2 a core). Forward of SDXL's 4096-token self-attention (10 heads of 64) 218-234 -> 187-195
/// ms, SD-1.5's (8 of 40) 135-142 -> 112-114 (ops bench, 2 threads, three interleaved
/// rounds); 128 x 512 was slower, 512 x 512 no faster and half as many tasks.
const FORWARD_ROWS: usize = 256;
const FORWARD_KEYS: usize = 512;

/// Query rows and keys per backward tile (256 KiB each of probabilities and their gradient).
/// With the log-sum-exp saved the backward needs no row-wide softmax, so it tiles the keys
/// too: before, 128 rows x all keys (2 x 2 MiB) spilled L2 between its five products. SDXL's
/// forward + backward 689-725 -> 607-622 ms, SD-1.5's 433-457 -> 360-389 (as above, with the
/// forward change); of the tiles tried, 256 x 256 was 2-4% ahead of 128 x 512 and 128 x 256,
/// 64 x 512 and 128 x 1024 behind both.
const BACKWARD_ROWS: usize = 256;
const BACKWARD_KEYS: usize = 256;

/// Attention with fewer multiply-adds than this (scores x head width) runs on one thread:
/// waking another costs more (the built-in model's 64-token levels).
const PARALLEL_WORK: usize = 1 << 20;

/// gemm's own threads when the tasks alone do not fill the pool and the work is worth it.
fn inner_parallelism(tasks: usize, dims: Dims) -> gemm::Parallelism {
    parallelism(tasks < rayon::current_num_threads() && work(dims) >= PARALLEL_WORK)
}

fn work(dims: Dims) -> usize {
    dims.batch * dims.heads * dims.n * dims.m * dims.head_dim
}

/// One (batch, head)'s rows inside the `[B, rows, H * d]` tensors.
struct Head {
    dims: Dims,
    b: usize,
    h: usize,
}

impl Head {
    /// Rows `first..` of this head's queries (or any `[B, N, H * d]` tensor).
    fn query_rows(&self, x: &[f32], first: usize) -> View {
        let Dims { n, head_dim: d, .. } = self.dims;
        View::rows(x, (self.b * n + first) * self.dims.width() + self.h * d, self.dims.width())
    }
    /// This head's keys (or values) `[M, d]`.
    fn key_rows(&self, x: &[f32]) -> View {
        let Dims { m, head_dim: d, .. } = self.dims;
        View::rows(x, self.b * m * self.dims.width() + self.h * d, self.dims.width())
    }
}

on_lanes! {
    /// Each row `i` of `s` `[rows, m]` replaced by `e^(s - lse[i])`.
    fn exp_rows(a: (&mut [f32], usize, &[f32])) -> () {
        L => {
            let (s, m, lse) = a;
            for (row, &l) in s.chunks_exact_mut(m).zip(lse) {
                exp_shifted::<L>(row, l);
            }
        }
    }
}

/// One forward task's running state over its rows: each row's largest score so far, the sum
/// of its exponentials relative to that, and its output so far scaled the same way.
struct Running {
    top: Vec<f32>,
    total: Vec<f32>,
    out: Vec<f32>,
}

on_lanes! {
    /// Folds one key block's scores `s` `[rows, keys]` into `run` (online softmax): each row's
    /// scores become their exponentials relative to the row's new largest score, and what the
    /// row summed before is scaled down to match. `first` marks the first key block.
    fn fold_block(a: (&mut [f32], usize, &mut Running, usize, bool)) -> () {
        L => {
            // Plain loops: a closure would not inherit the entry point's target features.
            let (s, keys, run, d, first) = a;
            let rows = run.top.iter_mut().zip(&mut run.total).zip(run.out.chunks_exact_mut(d));
            for (row, ((top, total), out)) in s.chunks_exact_mut(keys).zip(rows) {
                let new_top = if first { max::<L>(row) } else { max::<L>(row).max(*top) };
                let sum = exp_shifted::<L>(row, new_top);
                if first {
                    *total = sum;
                } else if new_top > *top {
                    let shrink = super::simd::exp(*top - new_top);
                    *total = *total * shrink + sum;
                    for o in out.iter_mut() {
                        *o *= shrink;
                    }
                } else {
                    *total += sum;
                }
                *top = new_top;
            }
        }
    }
}

/// [`fold_block`] for AMX's bf16 products, on scores not yet multiplied by `scale` (the
/// product then needs no pass of its own to scale them): each row's exponentials are rounded
/// to bf16 as they are made and written straight into `p`, the probabilities as the left
/// operand of the product with the values, where they were stored in f32 and packed by a pass
/// of their own (that pass and the exponential were most of SD-1.5's 4096-token attention
/// beside the products). Row sums add the f32 values. The exponential is a shorter one than
/// [`super::simd::exp`] (relative error 2.4e-6 against 1e-7): each result is rounded to bf16
/// next, an error of up to 2e-3.
///
/// SAFETY: the CPU has AVX512-BF16; `s` holds `run`'s rows of `keys` scores; `p` has as many
/// rows, of `keys` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn fold_rounded(s: &[f32], scale: f32, run: &mut Running, d: usize, first: bool, p: &mut Packed) {
    use std::arch::x86_64::*;
    let keys = p.k();
    assert!(s.len() == run.top.len() * keys && scale > 0.0, "probabilities shaped as the scores");
    // Whole chunks of 32 values unmasked; the lanes of the 16 values from `at` that lie in
    // the row for the last.
    let whole = keys / 32;
    let lanes = |at: usize| super::bf16_product::lanes(keys, at);
    let rows = run.top.iter_mut().zip(&mut run.total).zip(run.out.chunks_exact_mut(d));
    for (i, (row, ((top, total), out))) in s.chunks_exact(keys).zip(rows).enumerate() {
        let x = row.as_ptr();
        // SAFETY: unmasked loads read whole chunks of the row, the others only its lanes.
        unsafe {
            let tail = |at: usize| if at < keys { _mm512_maskz_loadu_ps(lanes(at), x.add(at)) } else { _mm512_setzero_ps() };
            // Two running maxima: one waited on each `vmaxps` before.
            let (mut a, mut b) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(f32::NEG_INFINITY));
            for c in 0..whole {
                a = _mm512_max_ps(a, _mm512_loadu_ps(x.add(32 * c)));
                b = _mm512_max_ps(b, _mm512_loadu_ps(x.add(32 * c + 16)));
            }
            for at in [32 * whole, 32 * whole + 16] {
                a = _mm512_mask_max_ps(a, lanes(at), a, tail(at));
            }
            // A positive scale keeps the largest score the largest.
            let row_top = scale * _mm512_reduce_max_ps(_mm512_max_ps(a, b));
            let new_top = if first { row_top } else { row_top.max(*top) };
            // e^(scale x - top) as 2^t, t = x scale log2(e) - top log2(e) in one rounding.
            let (log2e, shift) = (_mm512_set1_ps(scale * std::f32::consts::LOG2_E), _mm512_set1_ps(-new_top * std::f32::consts::LOG2_E));
            let (mut sum_lo, mut sum_hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for (c, chunk) in p.row_chunks(i).enumerate() {
                let (lo, hi) = if c < whole {
                    let at = x.add(32 * c);
                    (pow2(_mm512_fmadd_ps(_mm512_loadu_ps(at), log2e, shift)), pow2(_mm512_fmadd_ps(_mm512_loadu_ps(at.add(16)), log2e, shift)))
                } else {
                    let exp = |at: usize| _mm512_maskz_mov_ps(lanes(at), pow2(_mm512_fmadd_ps(tail(at), log2e, shift)));
                    (exp(32 * c), exp(32 * c + 16))
                };
                sum_lo = _mm512_add_ps(sum_lo, lo);
                sum_hi = _mm512_add_ps(sum_hi, hi);
                // The first argument fills the upper half: the chunk's second 16 values.
                let pairs = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(chunk.as_mut_ptr().cast(), pairs);
            }
            let sum = _mm512_reduce_add_ps(_mm512_add_ps(sum_lo, sum_hi));
            if first {
                *total = sum;
            } else if new_top > *top {
                let shrink = super::simd::exp(*top - new_top);
                *total = *total * shrink + sum;
                out.iter_mut().for_each(|o| *o *= shrink);
            } else {
                *total += sum;
            }
            *top = new_top;
        }
    }
}

/// 2^t for t <= 0 (below -126, 2^-126 times the fraction's power; NaN stays NaN): 2^round(t)
/// by `vscalefps` times a degree-5 polynomial of the fraction in [-1/2, 1/2].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn pow2(t: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // ln(2)^j / j!, the Taylor series of 2^f = e^(f ln 2).
    const C: [f32; 5] = [std::f32::consts::LN_2, 0.240_226_5, 0.055_504_11, 0.009_618_129, 0.001_333_355_8];
    // The input second: max returns its second operand when either is NaN.
    let t = _mm512_max_ps(_mm512_set1_ps(-126.0), t);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(C[4]);
    for c in [C[3], C[2], C[1], C[0], 1.0] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// Output `[B, N, H * d]` and log-sum-exp `[B * H * N]`.
pub(super) fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32, isa: Isa, products: Products) -> (Vec<f32>, Vec<f32>) {
    let Dims { batch, n, m, heads, head_dim: d } = dims;
    let (rows, keys) = (FORWARD_ROWS, FORWARD_KEYS.min(m.max(1)));
    let (blocks, key_blocks) = (n.div_ceil(rows), m.div_ceil(keys));
    let tasks = batch * heads * blocks;
    let par = inner_parallelism(tasks, dims);
    let spread = min_len(work(dims) >= PARALLEL_WORK);
    // Each head's key blocks as right operands, K^T [d, span] and V [span, d], prepared once
    // for all of its row blocks.
    let head_keys: Vec<(Operand, Operand)> = (0..batch * heads * key_blocks)
        .into_par_iter()
        .with_min_len(spread)
        .map(|t| {
            let (bh, start) = (t / key_blocks, t % key_blocks * keys);
            let head = Head { dims, b: bh / heads, h: bh % heads };
            let span = keys.min(m - start);
            let (kb, vb) = (head.key_rows(k).rows_from(start), head.key_rows(v).rows_from(start));
            (Operand::right(products, d, span, kb.t(), false), Operand::right(products, span, d, vb, false))
        })
        .collect();
    let pieces: Vec<(Vec<f32>, Vec<f32>)> = (0..tasks)
        .into_par_iter()
        .with_min_len(spread)
        .map(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let head = Head { dims, b: bh / heads, h: bh % heads };
            let (first, len) = (blk * rows, rows.min(n - blk * rows));
            let qb = Operand::left(products, len, d, head.query_rows(q, first), false);
            let mut s = vec![0.0f32; len * keys];
            let mut run = Running { top: vec![0.0; len], total: vec![0.0; len], out: vec![0.0; len * d] };
            // AMX's probabilities, kept for the next key block of the same span.
            let mut rounded: Option<Packed> = None;
            for (kb, (kt, vb)) in head_keys[bh * key_blocks..][..key_blocks].iter().enumerate() {
                let span = keys.min(m - kb * keys);
                let s = &mut s[..len * span];
                // SAFETY: the operands address this head's rows inside q, k and v; s is
                // [len, span] and the output [len, d].
                unsafe {
                    let amx = (products == Products::Bf16).then(|| rounded.take().filter(|p| p.k() == span).or_else(|| Packed::zero_rows(len, span))).flatten();
                    let (p, fused) = match (products, amx) {
                        #[cfg(target_arch = "x86_64")]
                        (Products::Bf16, Some(mut p)) => {
                            // Unscaled: AMX then sums whole blocks in place.
                            product_of(&qb, kt, s.as_mut_ptr(), span, 1, false, 1.0, par);
                            fold_rounded(s, scale, &mut run, d, kb == 0, &mut p);
                            (Operand::Bf16(p), true)
                        }
                        _ => {
                            product_of(&qb, kt, s.as_mut_ptr(), span, 1, false, scale, par);
                            fold_block((&mut *s, span, &mut run, d, kb == 0), isa);
                            (Operand::left(products, len, span, View::rows(s, 0, span), false), false)
                        }
                    };
                    product_of(&p, vb, run.out.as_mut_ptr(), d, 1, kb > 0, 1.0, par);
                    // Only AMX's own layout is refilled (vdpbf16ps' left operands are panels).
                    if let (true, Operand::Bf16(p)) = (fused, p) {
                        rounded = Some(p);
                    }
                }
            }
            let Running { top, total, mut out } = run;
            for (o, t) in out.chunks_exact_mut(d).zip(&total) {
                let inv = 1.0 / t;
                o.iter_mut().for_each(|o| *o *= inv);
            }
            (out, top.iter().zip(&total).map(|(top, t)| top + t.ln()).collect())
        })
        .collect();
    assemble(pieces, dims, rows)
}

/// Gradients with respect to q, k and v (`delta` is each row's dO . O, `[B * H * N]`).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(q: &[f32], k: &[f32], v: &[f32], lse: &[f32], delta: &[f32], grad: &[f32], dims: Dims, scale: f32, isa: Isa, products: Products) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { batch, n, m, heads, head_dim: d } = dims;
    let (rows, keys) = (BACKWARD_ROWS, BACKWARD_KEYS.min(m.max(1)));
    let par = inner_parallelism(batch * heads, dims);
    let pieces: Vec<[Vec<f32>; 3]> = (0..batch * heads)
        .into_par_iter()
        .with_min_len(min_len(work(dims) >= PARALLEL_WORK))
        .map(|bh| {
            let head = Head { dims, b: bh / heads, h: bh % heads };
            let (lse, delta) = (&lse[bh * n..][..n], &delta[bh * n..][..n]);
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; n * d], vec![0.0f32; m * d], vec![0.0f32; m * d]);
            let mut p = vec![0.0f32; rows * keys];
            let mut ds = vec![0.0f32; rows * keys];
            // Each row block's queries and output gradient, read by every key block: as left
            // operands [len, d] and as right ones (the same matrices, summed over the rows).
            let row_blocks: Vec<[Operand; 4]> = (0..n)
                .step_by(rows)
                .map(|first| {
                    let len = rows.min(n - first);
                    let (qb, gb) = (head.query_rows(q, first), head.query_rows(grad, first));
                    [Operand::left(products, len, d, qb, false), Operand::left(products, len, d, gb, false), Operand::right(products, len, d, qb, false), Operand::right(products, len, d, gb, false)]
                })
                .collect();
            // Key blocks outside, row blocks inside: each sum (a key's gradient over row
            // blocks, a row's over key blocks) runs in a fixed order.
            for (kblk, start) in (0..m).step_by(keys).enumerate() {
                let span = keys.min(m - start);
                let (kc, vc) = (head.key_rows(k).rows_from(start), head.key_rows(v).rows_from(start));
                let (kt, vt, kr) = (Operand::right(products, d, span, kc.t(), false), Operand::right(products, d, span, vc.t(), false), Operand::right(products, span, d, kc, false));
                let (dk, dv) = (&mut dk[start * d..][..span * d], &mut dv[start * d..][..span * d]);
                for (blk, (first, [ql, gl, qr, gr])) in (0..n).step_by(rows).zip(&row_blocks).enumerate() {
                    let len = rows.min(n - first);
                    let (p, ds) = (&mut p[..len * span], &mut ds[..len * span]);
                    // SAFETY: the operands address this head's rows inside q, k, v and grad;
                    // p and ds are [len, span], dq's rows [len, d] from `first`, dk and dv
                    // [span, d].
                    unsafe {
                        // P, the forward's probabilities, from the saved log-sum-exp.
                        product_of(ql, &kt, p.as_mut_ptr(), span, 1, false, scale, par);
                        exp_rows((&mut *p, span, &lse[first..][..len]), isa);
                        // dP = dO V^T, then dS = P (dP - D).
                        product_of(gl, &vt, ds.as_mut_ptr(), span, 1, false, 1.0, par);
                        for ((ds, p), di) in ds.chunks_exact_mut(span).zip(p.chunks_exact(span)).zip(&delta[first..][..len]) {
                            for (s, p) in ds.iter_mut().zip(p) {
                                *s = p * (*s - di);
                            }
                        }
                        let (pv, dsv) = (View::rows(p, 0, span), View::rows(ds, 0, span));
                        product_of(&Operand::left(products, span, len, pv.t(), false), gr, dv.as_mut_ptr(), d, 1, blk > 0, 1.0, par);
                        product_of(&Operand::left(products, len, span, dsv, false), &kr, dq[first * d..].as_mut_ptr(), d, 1, kblk > 0, scale, par);
                        product_of(&Operand::left(products, span, len, dsv.t(), false), qr, dk.as_mut_ptr(), d, 1, blk > 0, scale, par);
                    }
                }
            }
            [dq, dk, dv]
        })
        .collect();
    let width = dims.width();
    let mut dq = vec![0.0f32; batch * n * width];
    let mut dk = vec![0.0f32; batch * m * width];
    let mut dv = vec![0.0f32; batch * m * width];
    for (bh, [pq, pk, pv]) in pieces.into_iter().enumerate() {
        let (b, h) = (bh / heads, bh % heads);
        for (dst, src, len) in [(&mut dq, pq, n), (&mut dk, pk, m), (&mut dv, pv, m)] {
            for (j, src) in src.chunks_exact(d).enumerate().take(len) {
                dst[(b * len + j) * width + h * d..][..d].copy_from_slice(src);
            }
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::lanes;

    /// AMX's fold makes what the f32 fold and the packing after it make: the same running
    /// maxima and rescaled outputs, sums within 1e-5, and each rounded probability the same or
    /// one bf16 step away (its exponential differs by 2.4e-6). Rows and keys short of whole
    /// tiles and chunks, a first key block and a later one that raises some maxima.
    #[test]
    fn rounded_fold_packs_what_the_f32_fold_and_packing_make() {
        if Packed::zero_rows(1, 1).is_none() {
            eprintln!("skipped: this CPU has no AMX-BF16");
            return;
        }
        let (isa, d, scale) = (lanes::isa(), 3, 0.37f32);
        let wave = |n: usize, seed: f32| (0..n).map(|i| 6.0 * ((i as f32 * 0.37 + seed).sin())).collect::<Vec<f32>>();
        for (rows, keys) in [(5, 512), (40, 77), (33, 88), (1, 16), (2, 33)] {
            let start = |seed| Running { top: vec![0.0; rows], total: vec![0.0; rows], out: wave(rows * d, seed) };
            let (mut fused, mut reference) = (start(0.5), start(0.5));
            for (block, seed) in [(0, 1.0), (1, 2.0)] {
                // The later block's scores larger in some rows, smaller in others.
                let s: Vec<f32> = wave(rows * keys, seed).iter().enumerate().map(|(j, v)| v + if block == 1 && j / keys % 2 == 0 { 4.0 } else { 0.0 }).collect();
                let mut p = Packed::zero_rows(rows, keys).unwrap();
                // SAFETY: AMX (so AVX512-BF16) runs; s holds rows x keys scores.
                unsafe { fold_rounded(&s, scale, &mut fused, d, block == 0, &mut p) };
                let mut scaled: Vec<f32> = s.iter().map(|v| v * scale).collect();
                fold_block((&mut scaled, keys, &mut reference, d, block == 0), isa);
                let packed = Packed::left(rows, keys, View::rows(&scaled, 0, keys), false);
                let what = format!("{rows} x {keys}, block {block}");
                assert_eq!(fused.top, reference.top, "{what}: maxima");
                assert!(fused.out == reference.out, "{what}: outputs rescaled alike");
                for (a, b) in fused.total.iter().zip(&reference.total) {
                    assert!((a - b).abs() <= 1e-5 * b, "{what}: sums {a} and {b}");
                }
                assert_eq!(p.words().len(), packed.words().len());
                for (i, (a, b)) in p.words().iter().zip(packed.words()).enumerate() {
                    for shift in [0, 16] {
                        let (a, b) = ((a >> shift) as u16, (b >> shift) as u16);
                        assert!(a.abs_diff(b) <= 1, "{what}: word {i}: {a:#x} against {b:#x}");
                    }
                }
            }
        }
    }
}
