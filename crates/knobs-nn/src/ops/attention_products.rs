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
            let (kb, vb) = (head.key_rows(k).from_row(start), head.key_rows(v).from_row(start));
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
            for (kb, (kt, vb)) in head_keys[bh * key_blocks..][..key_blocks].iter().enumerate() {
                let span = keys.min(m - kb * keys);
                let s = &mut s[..len * span];
                // SAFETY: the operands address this head's rows inside q, k and v; s is
                // [len, span] and the output [len, d].
                unsafe {
                    product_of(&qb, kt, s.as_mut_ptr(), span, 1, false, scale, par);
                    fold_block((&mut *s, span, &mut run, d, kb == 0), isa);
                    let p = Operand::left(products, len, span, View::rows(s, 0, span), false);
                    product_of(&p, vb, run.out.as_mut_ptr(), d, 1, kb > 0, 1.0, par);
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
                let (kc, vc) = (head.key_rows(k).from_row(start), head.key_rows(v).from_row(start));
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
