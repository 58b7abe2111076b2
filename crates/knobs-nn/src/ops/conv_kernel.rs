//! 2-D convolution (groups 1, NCHW, f32) as matrix products, forward and both gradients.
//!
//! Each sample's patches are laid out as columns `[ci * kh * kw, positions]` (one shifted copy
//! of an input plane per row, so building them is a run of row copies), a block of output rows
//! at a time so the buffer stays small. Then:
//! - output `[co, positions]` = W `[co, K]` x columns;
//! - weight gradient `[co, K]` += grad `[co, positions]` x columns^T, one product with the
//!   positions as its long inner dimension (burn's default runs a convolution with the gradient
//!   as a 64x64 kernel instead, a product with 9 columns, about 3x slower at SD-1.5's 64x64 level);
//! - input gradient: columns = W^T x grad, added back onto the input planes.
//!
//! A 1x1 convolution with stride 1 and no padding uses the input itself as its columns.
//!
//! Blocks are fixed by the shapes and every sum runs in a fixed order (gemm splits its work
//! over output tiles only), so results do not depend on the thread count.
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::fresh::written;
use super::matrix::{Operand, Products, View, min_len, parallelism, product_as};

/// Column buffer per block, in floats (16 MiB; small in tests, so that they cover several blocks).
const BLOCK_FLOATS: usize = if cfg!(test) { 1 << 12 } else { 1 << 22 };
/// Products smaller than this (m * n * k) run on one thread.
const PARALLEL_WORK: usize = 192 * 192 * 192;
/// Copies and sums over fewer floats than this run on one thread: waking another costs more.
const PARALLEL_FLOATS: usize = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
}

impl ConvDims {
    /// A 3x3 convolution with stride 1 and padding 1, undilated (every resnet convolution of
    /// SD's UNet and VAE): the kind that Winograd's kernel and AMX's compute, and whose input
    /// gradient is another of the kind.
    pub(super) fn is_3x3_same(&self) -> bool {
        self.kernel == [3, 3] && self.stride == [1, 1] && self.padding == [1, 1] && self.dilation == [1, 1]
    }
    pub fn out_hw(&self) -> [usize; 2] {
        let size = |i: usize, len: usize| (len + 2 * self.padding[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) / self.stride[i] + 1;
        [size(0, self.h), size(1, self.w)]
    }
    /// Rows of the column matrix: one per (input channel, kernel row, kernel column).
    fn k(&self) -> usize {
        self.c_in * self.kernel[0] * self.kernel[1]
    }
    fn positions(&self) -> usize {
        let [oh, ow] = self.out_hw();
        oh * ow
    }
    /// A 1x1 convolution whose columns are the input itself.
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }
    /// Output rows per block: as many as keep the columns within `BLOCK_FLOATS`.
    fn block_rows(&self) -> usize {
        let [oh, ow] = self.out_hw();
        (BLOCK_FLOATS / (self.k() * ow).max(1)).clamp(1, oh.max(1))
    }
    fn blocks(&self) -> impl Iterator<Item = std::ops::Range<usize>> + use<> {
        let (oh, step) = (self.out_hw()[0], self.block_rows());
        (0..oh.div_ceil(step)).map(move |b| b * step..((b + 1) * step).min(oh))
    }
}

/// The input position a kernel tap reads for output index `o`, or `None` in the padding.
#[inline(always)]
fn source(o: usize, tap: usize, stride: usize, dilation: usize, padding: usize, len: usize) -> Option<usize> {
    (o * stride + tap * dilation).checked_sub(padding).filter(|&i| i < len)
}

/// Columns for output rows `rows` of one sample `x` `[ci, h, w]`: `[K, rows.len() * ow]`.
fn im2col(x: &[f32], d: &ConvDims, rows: std::ops::Range<usize>, cols: &mut [f32]) {
    let [kh, kw] = d.kernel;
    let ow = d.out_hw()[1];
    let len = rows.len() * ow;
    cols[..d.k() * len].par_chunks_mut(len).with_min_len(min_len(d.k() * len >= PARALLEL_FLOATS)).enumerate().for_each(|(r, dst)| {
        let (c, ky, kx) = (r / (kh * kw), r / kw % kh, r % kw);
        let plane = &x[c * d.h * d.w..][..d.h * d.w];
        for (y, dst) in rows.clone().zip(dst.chunks_exact_mut(ow)) {
            let Some(iy) = source(y, ky, d.stride[0], d.dilation[0], d.padding[0], d.h) else {
                dst.fill(0.0);
                continue;
            };
            let src = &plane[iy * d.w..][..d.w];
            if d.stride[1] == 1 && d.dilation[1] == 1 {
                // Output columns x read src[x + kx - pad]: one copy between two zero edges.
                let shift = kx as isize - d.padding[1] as isize;
                let first = (-shift).clamp(0, ow as isize) as usize;
                let last = ((d.w as isize - shift).clamp(0, ow as isize) as usize).max(first);
                dst[..first].fill(0.0);
                dst[first..last].copy_from_slice(&src[(first as isize + shift) as usize..(last as isize + shift) as usize]);
                dst[last..].fill(0.0);
            } else {
                for (x, v) in dst.iter_mut().enumerate() {
                    *v = source(x, kx, d.stride[1], d.dilation[1], d.padding[1], d.w).map_or(0.0, |ix| src[ix]);
                }
            }
        }
    });
}

/// Adds columns `[K, rows.len() * ow]` back onto the input planes `dx` `[ci, h, w]` (the
/// adjoint of [`im2col`]); each channel's taps in a fixed order.
fn col2im_add(cols: &[f32], d: &ConvDims, rows: std::ops::Range<usize>, dx: &mut [f32]) {
    let [kh, kw] = d.kernel;
    let ow = d.out_hw()[1];
    let len = rows.len() * ow;
    dx.par_chunks_mut(d.h * d.w).with_min_len(min_len(cols.len() >= PARALLEL_FLOATS)).enumerate().for_each(|(c, plane)| {
        for tap in 0..kh * kw {
            let (ky, kx) = (tap / kw, tap % kw);
            let src = &cols[(c * kh * kw + tap) * len..][..len];
            for (y, src) in rows.clone().zip(src.chunks_exact(ow)) {
                let Some(iy) = source(y, ky, d.stride[0], d.dilation[0], d.padding[0], d.h) else { continue };
                let dst = &mut plane[iy * d.w..][..d.w];
                for (x, v) in src.iter().enumerate() {
                    if let Some(ix) = source(x, kx, d.stride[1], d.dilation[1], d.padding[1], d.w) {
                        dst[ix] += v;
                    }
                }
            }
        }
    });
}

/// `dst` `[m, n]` (row stride `dst_rs`) = `dst` (when `accumulate`) + lhs `[m, k]` x rhs `[k, n]`,
/// on every thread when the product is large enough.
///
/// SAFETY: as [`product_as`]; `dst` covers m rows of n at `dst_rs`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(products: Products, m: usize, n: usize, k: usize, dst: &mut [f32], dst_rs: usize, accumulate: bool, lhs: View, rhs: View) {
    debug_assert!(m == 0 || dst.len() >= (m - 1) * dst_rs + n);
    unsafe { product_as(products, m, n, k, dst.as_mut_ptr(), dst_rs, 1, accumulate, lhs, rhs, 1.0, par(m, n, k)) }
}

/// Threads for a product of `m * n * k` multiply-adds.
fn par(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    parallelism(m * n * k >= PARALLEL_WORK)
}

/// Output `[B, co, oh, ow]` of `x` `[B, ci, h, w]` with weight `w` `[co, ci, kh, kw]`.
pub fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, d: &ConvDims, products: Products) -> Vec<f32> {
    let (k, p, co) = (d.k(), d.positions(), d.c_out);
    let ow = d.out_hw()[1];
    let mut cols = if d.pointwise() { Vec::new() } else { vec![0.0f32; k * d.block_rows() * ow] };
    // The weight, read by every block of every sample (packed once for bf16 products).
    let weight = Operand::left(products, co, k, View::rows(w, 0, k), co * p * k >= PARALLEL_WORK);
    let convolve = |out: &mut [MaybeUninit<f32>]| {
        // The bias first, the products summed onto it; without one they write every output.
        if let Some(bias) = bias {
            let pieces = min_len(out.len() >= PARALLEL_FLOATS);
            out.par_chunks_mut(p).with_min_len(pieces).enumerate().for_each(|(i, plane)| plane.fill(MaybeUninit::new(bias[i % co])));
        }
        let out = out.as_mut_ptr().cast::<f32>();
        for b in 0..d.batch {
            let xb = &x[b * d.c_in * d.h * d.w..][..d.c_in * d.h * d.w];
            // SAFETY: sample b's outputs, [co, p], are within out.
            let ob = unsafe { out.add(b * co * p) };
            if d.pointwise() {
                // SAFETY: ob is [co, p], w [co, k], xb [k, p].
                unsafe { weight.times(p, View::rows(xb, 0, p), ob, p, 1, bias.is_some(), 1.0, par(co, p, k)) };
                continue;
            }
            for rows in d.blocks() {
                let len = rows.len() * ow;
                im2col(xb, d, rows.clone(), &mut cols);
                // SAFETY: the block's outputs are columns rows.start * ow.. of ob's co rows of p.
                unsafe { weight.times(len, View::rows(&cols, 0, len), ob.add(rows.start * ow), p, 1, bias.is_some(), 1.0, par(co, len, k)) };
            }
        }
    };
    // SAFETY: the blocks of rows cover every sample's outputs, each written (or summed onto
    // its bias).
    unsafe { written(d.batch * co * p, convolve) }
}

/// Gradients from the output gradient `g` `[B, co, oh, ow]`: the input's (when `want_x`) and
/// the weight's (when `want_w`).
pub fn backward(x: &[f32], w: &[f32], g: &[f32], d: &ConvDims, want_x: bool, want_w: bool, products: Products) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (k, p, co) = (d.k(), d.positions(), d.c_out);
    let ow = d.out_hw()[1];
    let plane = d.c_in * d.h * d.w;
    let mut dx = want_x.then(|| vec![0.0f32; d.batch * plane]);
    let mut dw = want_w.then(|| vec![0.0f32; co * k]);
    let buffer = if d.pointwise() { 0 } else { k * d.block_rows() * ow };
    let mut cols = vec![0.0f32; if want_w { buffer } else { 0 }];
    let mut dcols = vec![0.0f32; if want_x { buffer } else { 0 }];
    // W^T, read by every block's input gradient.
    let weight_t = want_x.then(|| Operand::left(products, k, co, View::rows(w, 0, k).t(), co * p * k >= PARALLEL_WORK));
    let mut first = true;
    for b in 0..d.batch {
        // Read by the weight gradient only (`x` may be empty without it).
        let xb = if want_w { &x[b * plane..][..plane] } else { &[][..] };
        let gb = &g[b * co * p..][..co * p];
        if d.pointwise() {
            // SAFETY (both products): shapes as in `forward`, read the other way round.
            unsafe {
                if let Some(dw) = &mut dw {
                    matmul(products, co, k, p, dw, k, !first, View::rows(gb, 0, p), View::rows(xb, 0, p).t());
                }
                if let (Some(dx), Some(wt)) = (&mut dx, &weight_t) {
                    wt.times(p, View::rows(gb, 0, p), dx[b * plane..].as_mut_ptr(), p, 1, false, 1.0, par(k, p, co));
                }
            }
            first = false;
            continue;
        }
        for rows in d.blocks() {
            let len = rows.len() * ow;
            // SAFETY: grad's co rows of p start at this block's first position; cols and
            // dcols hold [k, len]; dw is [co, k].
            unsafe {
                let grad = View::rows(gb, rows.start * ow, p);
                if let Some(dw) = &mut dw {
                    im2col(xb, d, rows.clone(), &mut cols);
                    matmul(products, co, k, len, dw, k, !first, grad, View::rows(&cols, 0, len).t());
                }
                if let (Some(dx), Some(wt)) = (&mut dx, &weight_t) {
                    wt.times(len, grad, dcols.as_mut_ptr(), len, 1, false, 1.0, par(k, len, co));
                    col2im_add(&dcols[..k * len], d, rows.clone(), &mut dx[b * plane..][..plane]);
                }
            }
            first = false;
        }
    }
    (dx, dw)
}

/// The bias gradient: `g` `[B, co, positions]` summed over samples and positions.
pub fn bias_grad(g: &[f32], d: &ConvDims) -> Vec<f32> {
    let (p, co) = (d.positions(), d.c_out);
    (0..co)
        .into_par_iter()
        .with_min_len(min_len(g.len() >= PARALLEL_FLOATS))
        .map(|c| (0..d.batch).map(|b| g[(b * co + c) * p..][..p].iter().sum::<f32>()).sum())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::max_rel;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
    }

    /// bf16 products are the f32 kernel on the bf16-rounded operands, forward and input
    /// gradient, over several blocks and samples (the weight packed once for all of them):
    /// 3x3, strided and 1x1.
    #[test]
    fn bf16_products_are_the_f32_kernel_on_rounded_operands() {
        if !super::super::bf16_product::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let conv = |c_in, c_out, kernel, stride, padding| ConvDims { batch: 2, c_in, h: 11, w: 9, c_out, kernel, stride, padding, dilation: [1, 1] };
        for d in [conv(16, 13, [3, 3], [1, 1], [1, 1]), conv(16, 7, [3, 3], [2, 2], [1, 1]), conv(20, 6, [1, 1], [1, 1], [0, 0])] {
            assert!(d.pointwise() || d.blocks().count() > 1, "{d:?} should span several blocks");
            let [oh, ow] = d.out_hw();
            let (x, w, b) = (data(d.batch * d.c_in * d.h * d.w, 1), data(d.c_out * d.k(), 2), data(d.c_out, 3));
            let g = data(d.batch * d.c_out * oh * ow, 4);
            let want = forward(&rounded(&x), &rounded(&w), Some(&b), &d, Products::F32);
            let got = forward(&x, &w, Some(&b), &d, Products::Bf16);
            assert!(max_rel(&got, &want) < 1e-5, "{d:?} forward: {}", max_rel(&got, &want));
            assert!(max_rel(&got, forward(&x, &w, Some(&b), &d, Products::F32)) > 1e-4, "{d:?}: the operands were not rounded");
            let (want, _) = backward(&[], &rounded(&w), &rounded(&g), &d, true, false, Products::F32);
            let (got, _) = backward(&[], &w, &g, &d, true, false, Products::Bf16);
            let (got, want) = (got.unwrap(), want.unwrap());
            assert!(max_rel(&got, &want) < 1e-5, "{d:?} input gradient: {}", max_rel(&got, &want));
        }
    }
}
