//! Attention for heads wider than `attention_small` takes (SD-1.5's 40 to 160 channels, the
//! VAE's 512) as matrix products over blocks of query rows: scores = Q K^T, softmax in place,
//! output = P V. Only one block's scores exist at a time (rows x keys), so memory stays linear
//! in the sequence length; the backward pass recomputes each block's probabilities from the
//! saved log-sum-exp and gets all three gradients from four more products.
//!
//! Tasks are fixed by the shapes: forward, one per (batch, head, row block); backward, one per
//! (batch, head), whose key and value gradients sum the row blocks in order. gemm splits its
//! work over output tiles only, so results do not depend on the thread count.
use rayon::prelude::*;

use super::attention_kernel::Dims;
use super::lanes::{Isa, on_lanes};
use super::matrix::{View, min_len, parallelism, product};
use super::simd::{exp_shifted, max};

/// Scores per block (rows x keys) aimed at: 2 MiB. Each block's products pack the head's
/// keys and values again, and the key and value gradients take one block's rows as their
/// inner dimension, so short blocks spend their time packing and re-reading those. On a
/// 2-core Xeon (interleaved in one process), the forward and backward of SD-1.5's
/// 4096-token self-attention (8 heads of 40) took 900 ms with 32-row blocks (512 KiB) and
/// 700 with 128 (this size); the VAE's one 512-wide head 1530 against 790.
const BLOCK_SCORES: usize = 1 << 19;

/// Query rows per block for `m` keys. Blocks past 256 rows were slower again at 1024 keys
/// (76 ms against 69 for SD-1.5's 32x32 level).
fn block_rows(m: usize) -> usize {
    (BLOCK_SCORES / m.max(1)).clamp(32, 256)
}

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
    /// Each row of `s` `[rows, m]` replaced by its softmax; returns the rows' log-sum-exp.
    fn softmax_rows(a: (&mut [f32], usize)) -> Vec<f32> {
        L => {
            // Plain loops: a closure would not inherit the entry point's target features.
            let (s, m) = a;
            let mut lse = Vec::with_capacity(s.len() / m.max(1));
            for row in s.chunks_exact_mut(m) {
                let top = max::<L>(row);
                let total = exp_shifted::<L>(row, top);
                let inv = 1.0 / total;
                for p in row.iter_mut() {
                    *p *= inv;
                }
                lse.push(top + total.ln());
            }
            lse
        }
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

/// Output `[B, N, H * d]` and log-sum-exp `[B * H * N]`.
pub(super) fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32, isa: Isa) -> (Vec<f32>, Vec<f32>) {
    let Dims { batch, n, m, heads, head_dim: d } = dims;
    let rows = block_rows(m);
    let blocks = n.div_ceil(rows);
    let tasks = batch * heads * blocks;
    let par = inner_parallelism(tasks, dims);
    let pieces: Vec<(Vec<f32>, Vec<f32>)> = (0..tasks)
        .into_par_iter()
        .with_min_len(min_len(work(dims) >= PARALLEL_WORK))
        .map(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let head = Head { dims, b: bh / heads, h: bh % heads };
            let (first, len) = (blk * rows, rows.min(n - blk * rows));
            let mut s = vec![0.0f32; len * m];
            let mut out = vec![0.0f32; len * d];
            // SAFETY: the views address this head's rows inside q, k and v; s is [len, m]
            // and out [len, d].
            unsafe {
                product(len, m, d, &mut s, m, false, head.query_rows(q, first), head.key_rows(k).t(), scale, par);
                let lse = softmax_rows((&mut s, m), isa);
                product(len, d, m, &mut out, d, false, View::rows(&s, 0, m), head.key_rows(v), 1.0, par);
                (out, lse)
            }
        })
        .collect();
    let width = dims.width();
    let mut out = vec![0.0f32; batch * n * width];
    let mut lse = vec![0.0f32; batch * heads * n];
    for (task, (o, l)) in pieces.into_iter().enumerate() {
        let (bh, blk) = (task / blocks, task % blocks);
        let (b, h, first) = (bh / heads, bh % heads, blk * rows);
        for (r, o) in o.chunks_exact(d).enumerate() {
            out[(b * n + first + r) * width + h * d..][..d].copy_from_slice(o);
        }
        lse[bh * n + first..][..l.len()].copy_from_slice(&l);
    }
    (out, lse)
}

/// Gradients with respect to q, k and v (`delta` is each row's dO . O, `[B * H * N]`).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(q: &[f32], k: &[f32], v: &[f32], lse: &[f32], delta: &[f32], grad: &[f32], dims: Dims, scale: f32, isa: Isa) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { batch, n, m, heads, head_dim: d } = dims;
    let rows = block_rows(m);
    let par = inner_parallelism(batch * heads, dims);
    let pieces: Vec<[Vec<f32>; 3]> = (0..batch * heads)
        .into_par_iter()
        .with_min_len(min_len(work(dims) >= PARALLEL_WORK))
        .map(|bh| {
            let head = Head { dims, b: bh / heads, h: bh % heads };
            let (lse, delta) = (&lse[bh * n..][..n], &delta[bh * n..][..n]);
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; n * d], vec![0.0f32; m * d], vec![0.0f32; m * d]);
            let mut p = vec![0.0f32; rows * m];
            let mut ds = vec![0.0f32; rows * m];
            for (blk, first) in (0..n).step_by(rows).enumerate() {
                let len = rows.min(n - first);
                let (p, ds) = (&mut p[..len * m], &mut ds[..len * m]);
                let (qb, gb) = (head.query_rows(q, first), head.query_rows(grad, first));
                // SAFETY: views as in `forward`; p and ds are [len, m], dq's rows [len, d]
                // from `first`, dk and dv [m, d].
                unsafe {
                    // P, the forward's probabilities, from the saved log-sum-exp.
                    product(len, m, d, p, m, false, qb, head.key_rows(k).t(), scale, par);
                    exp_rows((p, m, &lse[first..][..len]), isa);
                    // dP = dO V^T, then dS = P (dP - D).
                    product(len, m, d, ds, m, false, gb, head.key_rows(v).t(), 1.0, par);
                    for ((ds, p), di) in ds.chunks_exact_mut(m).zip(p.chunks_exact(m)).zip(&delta[first..][..len]) {
                        for (s, p) in ds.iter_mut().zip(p) {
                            *s = p * (*s - di);
                        }
                    }
                    let (pv, dsv) = (View::rows(p, 0, m), View::rows(ds, 0, m));
                    product(m, d, len, &mut dv, d, blk > 0, pv.t(), gb, 1.0, par);
                    product(len, d, m, &mut dq[first * d..], d, false, dsv, head.key_rows(k), scale, par);
                    product(m, d, len, &mut dk, d, blk > 0, dsv.t(), qb, scale, par);
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
