//! Fused multi-head attention on f32 slices, flash-attention style: each query row's scores,
//! softmax and weighted sum are computed in one pass over the keys, so no N x M matrix is ever
//! stored; the backward pass recomputes the probabilities from the saved log-sum-exp.
//!
//! Layouts are the projections' own, `[B, N, H * d]` for queries and outputs and
//! `[B, M, H * d]` for keys and values, so heads need no transposed copies. Work is split in
//! pieces fixed by the shapes alone (per batch, head and row or key block) and every sum runs
//! in a fixed order, so results are bit-identical for any thread count (each CPU takes the
//! widest lanes it has, so two kinds of CPU may differ in the last bits).
//!
//! The loops here make a few passes over each row's scores per head channel; heads of up to 8
//! channels take `attention_small`'s one-pass loops instead.
use rayon::prelude::*;

use super::{attention_products, attention_small};
use super::lanes::{self, Isa, on_lanes};
use super::matrix::Products;
use super::lanes::Lanes;
use super::simd::{axpy, dot, exp_shifted, max, scale_into};

/// Query rows per forward task.
const ROW_BLOCK: usize = 64;
/// Keys per backward task: each task owns its keys' gradients and adds a partial query
/// gradient, summed in block order afterwards.
const KEY_BLOCK: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    /// Query rows.
    pub n: usize,
    /// Key / value rows.
    pub m: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl Dims {
    pub(super) fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// `x[b, row, h * d + c]` rearranged to `[b, h, c, row]`: one contiguous row of length
/// `rows` per (head, channel), what the score and output loops stream over.
fn per_head_transposed(x: &[f32], batch: usize, rows: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; batch * heads * d * rows];
    out.par_chunks_mut(d * rows).enumerate().for_each(|(bh, dst)| {
        let (b, h) = (bh / heads, bh % heads);
        let width = heads * d;
        for j in 0..rows {
            let src = &x[(b * rows + j) * width + h * d..][..d];
            for c in 0..d {
                dst[c * rows + j] = src[c];
            }
        }
    });
    out
}

/// Which loops run, on which lanes: the one-pass kernels of `attention_small`, the
/// multi-pass ones here, or `attention_products`' matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    Small(Isa),
    MultiPass(Isa),
    /// With the products' arithmetic (the other paths compute in f32).
    Products(Isa, Products),
}

impl Path {
    /// The fastest path the running CPU has for this head size: products for wide heads,
    /// where they run at matrix-multiply speed; for small ones (a product with 4 inner
    /// channels is mostly overhead), the one-pass kernels, or the multi-pass loops on CPUs
    /// without vector lanes for them.
    pub(super) fn best(head_dim: usize, products: Products) -> Path {
        match lanes::isa() {
            isa if head_dim > attention_small::MAX_HEAD_DIM => Path::Products(isa, products),
            isa @ (Isa::Avx512 | Isa::Avx2) => Path::Small(isa),
            isa => Path::MultiPass(isa),
        }
    }

    /// Whether the path works on blocks of rows at a time (and so keeps any number of keys
    /// in cache), rather than streaming every key once per query row.
    pub(super) fn blocked(self) -> bool {
        matches!(self, Path::Products(..))
    }
}

/// Softmax attention; returns the output `[B, N, H * d]` and the log-sum-exp of each row's
/// scaled scores `[B, H, N]`, which the backward pass needs.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32, products: Products) -> (Vec<f32>, Vec<f32>) {
    forward_on(q, k, v, dims, scale, Path::best(dims.head_dim, products))
}

pub(super) fn forward_on(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32, path: Path) -> (Vec<f32>, Vec<f32>) {
    if let Path::Products(isa, products) = path {
        return attention_products::forward(q, k, v, dims, scale, isa, products);
    }
    let Dims { batch, n, m, heads, head_dim: d } = dims;
    let kt = per_head_transposed(k, batch, m, heads, d);
    let vt = per_head_transposed(v, batch, m, heads, d);
    let blocks = n.div_ceil(ROW_BLOCK);
    let pieces: Vec<(Vec<f32>, Vec<f32>)> = (0..batch * heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let rows = blk * ROW_BLOCK..((blk + 1) * ROW_BLOCK).min(n);
            let kt = &kt[bh * d * m..][..d * m];
            let vt = &vt[bh * d * m..][..d * m];
            let args = RowArgs { q, kt, vt, dims, scale, b: bh / heads, h: bh % heads, rows };
            match path {
                Path::Small(isa) => attention_small::forward_rows(args, isa),
                Path::MultiPass(isa) => forward_rows(args, isa),
                Path::Products(..) => unreachable!("taken above"),
            }
        })
        .collect();
    assemble(pieces, dims, ROW_BLOCK)
}

/// The output `[B, N, H * d]` and log-sum-exp `[B * H * N]` from forward tasks' pieces, one
/// per (batch, head, block of `rows` query rows) in that order: the block's output rows
/// `[len, d]` and their log-sum-exp.
pub(super) fn assemble(pieces: Vec<(Vec<f32>, Vec<f32>)>, dims: Dims, rows: usize) -> (Vec<f32>, Vec<f32>) {
    let Dims { batch, n, heads, head_dim: d, .. } = dims;
    let (blocks, width) = (n.div_ceil(rows), dims.width());
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

pub(super) struct RowArgs<'a> {
    pub q: &'a [f32],
    /// This head's keys and values, `[d, M]`.
    pub kt: &'a [f32],
    pub vt: &'a [f32],
    pub dims: Dims,
    pub scale: f32,
    pub b: usize,
    pub h: usize,
    pub rows: std::ops::Range<usize>,
}

on_lanes! {
    /// The multi-pass loops on `isa`'s lanes, which the caller has checked the CPU has.
    fn forward_rows(args: RowArgs) -> (Vec<f32>, Vec<f32>) { L => forward_rows_with::<L>(args) }
}

/// One head's output rows `[rows, d]` and their log-sum-exp.
#[inline(always)]
unsafe fn forward_rows_with<L: Lanes>(a: RowArgs) -> (Vec<f32>, Vec<f32>) {
    let Dims { n, m, head_dim: d, .. } = a.dims;
    let width = a.dims.width();
    let mut out = vec![0.0f32; a.rows.len() * d];
    let mut lse = vec![0.0f32; a.rows.len()];
    let mut s = vec![0.0f32; m];
    for (r, i) in a.rows.clone().enumerate() {
        let q = &a.q[(a.b * n + i) * width + a.h * d..][..d];
        scale_into(&mut s, q[0] * a.scale, &a.kt[..m]);
        // SAFETY: the caller vouches for L's features.
        unsafe {
            for (c, &qc) in q.iter().enumerate().skip(1) {
                axpy::<L>(&mut s, qc * a.scale, &a.kt[c * m..][..m]);
            }
            let top = max::<L>(&s);
            let total = exp_shifted::<L>(&mut s, top);
            let inv = 1.0 / total;
            for c in 0..d {
                out[r * d + c] = dot::<L>(&s, &a.vt[c * m..][..m]) * inv;
            }
            lse[r] = top + total.ln();
        }
    }
    (out, lse)
}

/// Gradients of `forward` with respect to q, k and v, from the output gradient `grad`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    grad: &[f32],
    dims: Dims,
    scale: f32,
    products: Products,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    backward_on(q, k, v, out, lse, grad, dims, scale, Path::best(dims.head_dim, products))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward_on(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    grad: &[f32],
    dims: Dims,
    scale: f32,
    path: Path,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { batch, n, m, heads, head_dim: d } = dims;
    let width = dims.width();
    // D_i = dO_i . O_i, the softmax backward's per-row term, laid out [B, H, N].
    let mut delta = vec![0.0f32; batch * heads * n];
    delta.par_chunks_mut(n).enumerate().for_each(|(bh, dst)| {
        let (b, h) = (bh / heads, bh % heads);
        for (i, dst) in dst.iter_mut().enumerate() {
            let at = (b * n + i) * width + h * d;
            *dst = (0..d).map(|c| grad[at + c] * out[at + c]).sum();
        }
    });
    if let Path::Products(isa, products) = path {
        return attention_products::backward(q, k, v, lse, &delta, grad, dims, scale, isa, products);
    }
    let kt = per_head_transposed(k, batch, m, heads, d);
    let vt = per_head_transposed(v, batch, m, heads, d);
    let blocks = m.div_ceil(KEY_BLOCK);
    let pieces: Vec<KeyBlockGrads> = (0..batch * heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let keys = blk * KEY_BLOCK..((blk + 1) * KEY_BLOCK).min(m);
            let args = KeyArgs {
                q,
                grad,
                kt: &kt[bh * d * m..][..d * m],
                vt: &vt[bh * d * m..][..d * m],
                lse: &lse[bh * n..][..n],
                delta: &delta[bh * n..][..n],
                dims,
                scale,
                b: bh / heads,
                h: bh % heads,
                keys,
            };
            match path {
                Path::Small(isa) => attention_small::backward_keys(args, isa),
                Path::MultiPass(isa) => backward_keys(args, isa),
                Path::Products(..) => unreachable!("taken above"),
            }
        })
        .collect();
    let mut dq = vec![0.0f32; batch * n * width];
    let mut dk = vec![0.0f32; batch * m * width];
    let mut dv = vec![0.0f32; batch * m * width];
    for (task, piece) in pieces.into_iter().enumerate() {
        let (bh, blk) = (task / blocks, task % blocks);
        let (b, h) = (bh / heads, bh % heads);
        let first = blk * KEY_BLOCK;
        let len = piece.dkt.len() / d;
        for j in 0..len {
            let at = (b * m + first + j) * width + h * d;
            for c in 0..d {
                dk[at + c] = piece.dkt[c * len + j];
                dv[at + c] = piece.dvt[c * len + j];
            }
        }
        // Blocks arrive in order, so each dq element sums its partials in block order.
        for i in 0..n {
            let dst = &mut dq[(b * n + i) * width + h * d..][..d];
            for (dst, src) in dst.iter_mut().zip(&piece.dq[i * d..][..d]) {
                *dst += src;
            }
        }
    }
    (dq, dk, dv)
}

pub(super) struct KeyArgs<'a> {
    pub q: &'a [f32],
    pub grad: &'a [f32],
    pub kt: &'a [f32],
    pub vt: &'a [f32],
    pub lse: &'a [f32],
    pub delta: &'a [f32],
    pub dims: Dims,
    pub scale: f32,
    pub b: usize,
    pub h: usize,
    pub keys: std::ops::Range<usize>,
}

/// One (batch, head, key block)'s share of the gradients: its keys' and values' gradients
/// `[d, keys]` and its partial query gradient `[N, d]`.
pub(super) struct KeyBlockGrads {
    pub dkt: Vec<f32>,
    pub dvt: Vec<f32>,
    pub dq: Vec<f32>,
}

on_lanes! {
    /// The multi-pass loops on `isa`'s lanes, as [`forward_rows`].
    fn backward_keys(args: KeyArgs) -> KeyBlockGrads { L => backward_keys_with::<L>(args) }
}

#[inline(always)]
unsafe fn backward_keys_with<L: Lanes>(a: KeyArgs) -> KeyBlockGrads {
    let Dims { n, m, head_dim: d, .. } = a.dims;
    let width = a.dims.width();
    let (start, len) = (a.keys.start, a.keys.len());
    let kt = |c: usize| &a.kt[c * m + start..][..len];
    let vt = |c: usize| &a.vt[c * m + start..][..len];
    let mut dkt = vec![0.0f32; d * len];
    let mut dvt = vec![0.0f32; d * len];
    let mut dq = vec![0.0f32; n * d];
    let mut p = vec![0.0f32; len];
    let mut ds = vec![0.0f32; len];
    let mut qs = vec![0.0f32; d];
    for i in 0..n {
        let at = (a.b * n + i) * width + a.h * d;
        let (q, go) = (&a.q[at..][..d], &a.grad[at..][..d]);
        scale_into(&mut qs, a.scale, q);
        // SAFETY: the caller vouches for L's features.
        unsafe {
            // p_j = exp(s_j - lse_i), the forward's probabilities.
            scale_into(&mut p, qs[0], kt(0));
            for (c, &qc) in qs.iter().enumerate().skip(1) {
                axpy::<L>(&mut p, qc, kt(c));
            }
            exp_shifted::<L>(&mut p, a.lse[i]);
            // dS_j = p_j (dO_i . v_j - D_i)
            scale_into(&mut ds, go[0], vt(0));
            for (c, &gc) in go.iter().enumerate().skip(1) {
                axpy::<L>(&mut ds, gc, vt(c));
            }
            let di = a.delta[i];
            for (s, p) in ds.iter_mut().zip(&p) {
                *s = p * (*s - di);
            }
            for c in 0..d {
                dq[i * d + c] = dot::<L>(&ds, kt(c)) * a.scale;
                axpy::<L>(&mut dkt[c * len..][..len], qs[c], &ds);
                axpy::<L>(&mut dvt[c * len..][..len], go[c], &p);
            }
        }
    }
    KeyBlockGrads { dkt, dvt, dq }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.731 + seed).sin() * 1.7).clamp(-1.5, 1.5)).collect()
    }

    /// Every loop the running CPU can take (the one-pass small-head kernels on each lane
    /// width, the multi-pass ones, each on every lane width) gives the portable loop's values.
    #[test]
    fn every_path_matches_the_portable_one() {
        let mut paths = vec![Path::MultiPass(Isa::Portable), Path::Small(Isa::Portable), Path::Products(Isa::Portable, Products::F32)];
        if lanes::isa() != Isa::Portable {
            paths.extend([Path::MultiPass(Isa::Avx2), Path::Small(Isa::Avx2), Path::Products(Isa::Avx2, Products::F32)]);
        }
        if lanes::isa() == Isa::Avx512 {
            paths.extend([Path::MultiPass(Isa::Avx512), Path::Small(Isa::Avx512), Path::Products(Isa::Avx512, Products::F32)]);
        }
        // Keys and rows off the lane widths and block sizes; head sizes each side of the
        // small kernels' limit.
        // (150, 4100, 1, 12) and (600, 1300, 2, 12): several key blocks of the products
        // path, and several row blocks, each with a shorter last one.
        for (n, m, heads, d) in [(70, 77, 2, 4), (9, 530, 1, 8), (33, 19, 3, 1), (5, 40, 2, 40), (150, 4100, 1, 12), (600, 1300, 2, 12)] {
            let dims = Dims { batch: 2, n, m, heads, head_dim: d };
            let (q, k, v) = (values(2 * n * heads * d, 0.1), values(2 * m * heads * d, 0.7), values(2 * m * heads * d, 1.3));
            let go = values(2 * n * heads * d, 2.9);
            let reference = Path::MultiPass(Isa::Portable);
            let (out0, lse0) = forward_on(&q, &k, &v, dims, 0.4, reference);
            let grads0 = backward_on(&q, &k, &v, &out0, &lse0, &go, dims, 0.4, reference);
            for &path in paths.iter().filter(|p| !matches!(p, Path::Small(_)) || d <= attention_small::MAX_HEAD_DIM) {
                let close = |a: &[f32], b: &[f32], what: &str| {
                    let scale = b.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
                    let err = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                    assert!(err < 1e-5, "{what} on {path:?}, n {n} m {m} d {d}: relative error {err}");
                };
                let (out, lse) = forward_on(&q, &k, &v, dims, 0.4, path);
                close(&out, &out0, "output");
                close(&lse, &lse0, "log-sum-exp");
                let grads = backward_on(&q, &k, &v, &out0, &lse0, &go, dims, 0.4, path);
                close(&grads.0, &grads0.0, "dq");
                close(&grads.1, &grads0.1, "dk");
                close(&grads.2, &grads0.2, "dv");
            }
        }
    }

    /// bf16 products round every product's operands (the probabilities and their gradient
    /// too): the output and the three gradients stay within bf16's error of the f32 products'
    /// but are not theirs, and do not depend on the thread count. SD-1.5's head sizes, with
    /// several row and key blocks and short last ones.
    #[test]
    fn bf16_products_stay_near_f32_and_ignore_the_thread_count() {
        if !super::super::bf16_product::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let isa = lanes::isa();
        for (n, m, heads, d) in [(300, 600, 2, 40), (70, 77, 3, 80), (20, 530, 1, 160), (40, 1100, 1, 40)] {
            let dims = Dims { batch: 2, n, m, heads, head_dim: d };
            let (q, k, v) = (values(2 * n * heads * d, 0.1), values(2 * m * heads * d, 0.7), values(2 * m * heads * d, 1.3));
            let go = values(2 * n * heads * d, 2.9);
            let scale = 1.0 / (d as f32).sqrt();
            let run = |products| {
                let (out, lse) = forward_on(&q, &k, &v, dims, scale, Path::Products(isa, products));
                let (dq, dk, dv) = backward_on(&q, &k, &v, &out, &lse, &go, dims, scale, Path::Products(isa, products));
                [out, dq, dk, dv]
            };
            let (exact, rounded) = (run(Products::F32), run(Products::Bf16));
            for (name, (got, want)) in ["output", "dq", "dk", "dv"].iter().zip(rounded.iter().zip(&exact)) {
                let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let err = got.iter().zip(want).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                assert!(err > 1e-5 && err < 2e-2, "{name}, n {n} m {m} d {d}: relative error {err} against f32 products");
            }
            let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| run(Products::Bf16));
            assert!(one_thread == rounded, "n {n} m {m} d {d}: the thread count changed the sums");
        }
    }
}
