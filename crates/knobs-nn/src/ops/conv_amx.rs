//! 3x3 convolutions (stride 1, padding 1) on AMX tiles without unrolling the input into
//! columns: the input is laid out once as pairs of channels (`[ci / 2][B][h + 2][w + 2]`, a
//! zero border round each plane), and a right tile of 16 pairs by 16 positions is then any 16
//! neighbouring positions of it, read straight from there with the planes' stride. Each of the
//! 9 taps is a product of the weight's `[co, ci]` slice for that tap with the input shifted by
//! the tap's offset, summed in the same tiles.
//!
//! On an Emerald Rapids Xeon the Winograd kernel and the unrolled one both reached about 1
//! TFLOP/s of direct-convolution work at SD-1.5's 64x64 level on 2 threads, against 2.6 for
//! PyTorch's oneDNN (`[2, 320, 64, 64]` in 5.7 ms): their transforms and column copies, in
//! f32, cost more than the products. Here the input is read once, in bf16.
//!
//! Outputs are computed for every position of the padded grid (the border's are dropped), so
//! that a run of 16 positions may cross rows and samples: the cost is the border, 2 columns in
//! `w + 2` (3% at 64, 12% at 16). Each output's sums run in one fixed order (pairs of
//! channels, the 9 taps within each), whatever the thread count.
use rayon::prelude::*;

use crate::ops::fresh::written;
use crate::ops::words::{OnLines, Words};
use super::x86;
use super::{Packed, ROWS, in_tasks, row_stride};

/// Positions per block: two right tiles.
const POSITIONS: usize = 32;
/// Blocks of positions per task: the input rows they read stay in L2 while every block of
/// output channels goes by.
const BLOCKS_PER_TASK: usize = 8;

/// The weight `[co, ci, 3, 3]` as the 9 left operands of its taps, each `[co, ci]` (the
/// forward pass), or (`flipped`) `[ci, co]` with the taps turned 180 degrees: the input
/// gradient's, itself the same convolution of the output gradient.
pub(in super::super) fn taps(w: &[f32], co: usize, ci: usize, flipped: bool) -> Vec<Packed> {
    assert_eq!(w.len(), co * ci * 9, "a [{co}, {ci}, 3, 3] weight");
    if !flipped {
        return gathered_taps(w, co, ci);
    }
    // Flipped: the taps' slices `[9][co][ci]`, each row-major, which packing then reads 16 x
    // 16 pairs at a time through its register transpose.
    let plane = co * ci;
    let split = |out: &mut [std::mem::MaybeUninit<f32>]| {
        let out = out.as_mut_ptr() as usize;
        w.par_chunks(9 * ci).enumerate().for_each(|(o, row)| {
            for (i, tap) in row.chunks_exact(9).enumerate() {
                for (t, &v) in tap.iter().enumerate() {
                    // SAFETY: (t, o, i) is within the 9 planes, and row o's alone.
                    unsafe { *(out as *mut f32).add(t * plane + o * ci + i) = v };
                }
            }
        });
    };
    // SAFETY: every (tap, o, i) is written.
    let split = unsafe { written(9 * plane, split) };
    (0..9)
        .map(|t| {
            // SAFETY: the tap's plane holds co rows of ci values; AMX runs (the caller's check).
            unsafe {
                if flipped {
                    // Element (i, o) of the tap turned 180 degrees, at i + o ci.
                    super::pack_rows(split[(8 - t) * plane..].as_ptr(), 1, ci as isize, ci, co, true)
                } else {
                    super::pack_rows(split[t * plane..].as_ptr(), ci as isize, 1, co, ci, true)
                }
            }
        })
        .collect()
}

/// The forward taps in one pass over the weight: each row's 32 channels of a tap gathered 9
/// values apart, rounded and stored in place, the 9 taps of a row's chunk in turn while its
/// values are in L1. Splitting the taps into planes first, then packing each plane, wrote and
/// read the weight once more: the convolution `[2, 1280, 32, 32] -> 1280` took 60-67 ms that
/// way and 55-62 ms this way, `[2, 640, 32, 32] -> 640` 13.4-16.5 and 10.7-14.9 ms (ops
/// bench, bf16, 2 threads of a Xeon, three interleaved rounds).
fn gathered_taps(w: &[f32], co: usize, ci: usize) -> Vec<Packed> {
    let (stride, rows) = (row_stride(ci), co.next_multiple_of(ROWS));
    // SAFETY: every pair of every row (to a whole block of rows) is written below.
    let mut taps: Vec<Words> = (0..9).map(|_| unsafe { Words::uninit(rows * stride) }).collect();
    let outs: Vec<usize> = taps.iter_mut().map(|t| t.uninit_mut().as_mut_ptr() as usize).collect();
    // A group of 16 rows fills its own tiles of every tap.
    (0..rows / 16).into_par_iter().for_each(|g| {
        for r in g * 16..g * 16 + 16 {
            for c in 0..stride / 16 {
                for (t, &out) in outs.iter().enumerate() {
                    let at = (out as *mut u32).wrapping_add(super::at(r, 16 * c, stride));
                    let count = if r < co { ci.saturating_sub(32 * c).min(32) } else { 0 };
                    // SAFETY: AMX (so AVX512-BF16) runs; row r's tap t holds its `count`
                    // channels from there, 9 values apart; each tap's buffer holds rows x
                    // stride pairs, this group's 16 rows its own.
                    unsafe { super::super::x86::gather_pairs(w.as_ptr().wrapping_add((r * ci + 32 * c) * 9 + t), 9, count, at) };
                }
            }
        }
    });
    taps.into_iter()
        .map(|data| Packed { data, lines: co, k: ci, width: ROWS, layout: super::super::Layout::Rows })
        .collect()
}

/// The input `x` `[B, c, h, w]` as pairs of channels with a zero border: plane `p` holds
/// channels `2p`, `2p + 1` (zeros past `c`) at `[B][h + 2][w + 2]`, then `slack` zeros; the
/// planes up to a whole number of tiles of pairs are zeros.
fn paired(x: &[f32], batch: usize, c: usize, h: usize, w: usize, slack: usize) -> (Vec<u32>, usize) {
    let (grid, planes) = ((h + 2) * (w + 2), row_stride(c));
    let len = batch * grid + slack;
    let fill = |(p, out): (usize, &mut [std::mem::MaybeUninit<u32>])| {
        out.fill(std::mem::MaybeUninit::new(0));
        if 2 * p >= c {
            return;
        }
        for b in 0..batch {
            let lo = &x[(b * c + 2 * p) * h * w..][..h * w];
            let hi = (2 * p + 1 < c).then(|| &x[(b * c + 2 * p + 1) * h * w..][..h * w]);
            for y in 0..h {
                let at = b * grid + (y + 1) * (w + 2) + 1;
                for x0 in (0..w).step_by(16) {
                    let count = 16.min(w - x0);
                    // SAFETY: both rows hold w values from y * w; the grid row holds w from `at`.
                    unsafe {
                        super::super::x86::interleave(lo[y * w + x0..].as_ptr(), hi.map(|h| h[y * w + x0..].as_ptr()), count, out[at + x0..].as_mut_ptr().cast())
                    };
                }
            }
        }
    };
    // SAFETY: every plane is written in full (zeros, then its channels over them).
    let data = unsafe { written(planes * len, |out| out.par_chunks_mut(len).enumerate().for_each(fill)) };
    (data, len)
}

/// A raw pointer to the output, shared by the tasks: each writes only its own positions of its
/// own output channels.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint outputs (see `conv3x3`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `x` `[B, ci, h, w]` convolved with the weight whose taps are `taps` (see [`taps`]: `co`
/// rows of `ci`), plus `bias`: `[B, co, h, w]`.
///
/// SAFETY: AMX is available (`super::available`).
#[allow(clippy::too_many_arguments)]
pub(in super::super) unsafe fn conv3x3(x: &[f32], taps: &[Packed], bias: Option<&[f32]>, batch: usize, ci: usize, co: usize, h: usize, w: usize) -> Vec<f32> {
    assert!(taps.len() == 9 && taps.iter().all(|t| t.lines == co && t.k == ci), "the 9 taps of a [{co}, {ci}, 3, 3] weight");
    assert_eq!(x.len(), batch * ci * h * w);
    let (gw, grid) = (w + 2, (h + 2) * (w + 2));
    // Outputs are the grid's positions from the first inside the border to the last.
    let (first, count) = (gw + 1, batch * grid - 2 * (gw + 1));
    let blocks = count.div_ceil(POSITIONS);
    // The last block reads up to a block and a row past the last output.
    let (input, plane) = paired(x, batch, ci, h, w, POSITIONS + gw + 1);
    let stride = row_stride(ci);
    let offsets: [isize; 9] = std::array::from_fn(|t| (t / 3) as isize * gw as isize + (t % 3) as isize - (gw + 1) as isize);
    let convolve = |out: &mut [std::mem::MaybeUninit<f32>]| {
        let dst = Out(out.as_mut_ptr().cast());
        // Tasks of BLOCKS_PER_TASK blocks of positions by groups of blocks of output channels,
        // split as the product kernel splits its rows and panels.
        in_tasks(blocks.div_ceil(BLOCKS_PER_TASK), co.div_ceil(ROWS), true, |range, channel_blocks| {
            let position_blocks = range * BLOCKS_PER_TASK..((range + 1) * BLOCKS_PER_TASK).min(blocks);
            let mut sums = OnLines([0f32; ROWS * POSITIONS]);
            // SAFETY: AMX is available; the tiles are configured before use and released after.
            unsafe { x86::configure() };
            for cb in channel_blocks {
                let a: [*const u32; 9] = std::array::from_fn(|t| taps[t].data[cb * ROWS * stride..].as_ptr());
                for pb in position_blocks.clone() {
                    let g0 = first + pb * POSITIONS;
                    // SAFETY: the taps' blocks hold ROWS rows of `stride` pairs; every plane
                    // holds the positions g0 + offset .. + POSITIONS (the border and the slack).
                    unsafe { x86::conv_block(&a, stride, input[g0..].as_ptr(), plane, &offsets, sums.0.as_mut_ptr()) };
                    // SAFETY: the outputs of these positions and channels are this task's alone.
                    unsafe { store(&sums.0, dst, cb * ROWS, co, g0, first + count, (h, w), bias) };
                }
            }
            // SAFETY: AMX is available.
            unsafe { x86::release() };
        });
    };
    // SAFETY: the blocks cover every position inside the border of every sample, and the
    // tasks every block of output channels: each output written once.
    unsafe { written(batch * co * h * w, convolve) }
}

/// A block's sums (`[ROWS, POSITIONS]`, channels from `o0`, positions of the grid from `g0`)
/// plus the bias, to the outputs among them: channels below `co`, positions below `end` and
/// inside the border.
///
/// SAFETY: `dst` holds `[B, co, h, w]`; no other thread writes these outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn store(sums: &[f32; ROWS * POSITIONS], dst: Out, o0: usize, co: usize, g0: usize, end: usize, (h, w): (usize, usize), bias: Option<&[f32]>) {
    let (gw, grid) = (w + 2, (h + 2) * (w + 2));
    // The positions inside the border as runs along grid rows: (first position of the block,
    // count, sample, index within the sample's plane).
    let mut runs = [(0, 0, 0, 0); POSITIONS];
    let mut len = 0;
    let mut j = 0;
    while j < POSITIONS && g0 + j < end {
        let g = g0 + j;
        let (b, y, x) = (g / grid, g % grid / gw, g % gw);
        // To the end of this grid row, the block or the outputs.
        let n = (gw - x).min(POSITIONS - j).min(end - g);
        if (1..=h).contains(&y) {
            let (from, to) = (x.max(1), (x + n).min(w + 1));
            if from < to {
                runs[len] = (j + from - x, to - from, b, (y - 1) * w + from - 1);
                len += 1;
            }
        }
        j += n;
    }
    for r in 0..ROWS.min(co - o0) {
        let o = o0 + r;
        let b0 = bias.map_or(0.0, |b| b[o]);
        for &(j, n, b, i) in &runs[..len] {
            // SAFETY: (b, o, i .. i + n) is within dst, and this task's.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.0.add((b * co + o) * h * w + i), n) };
            for (o, s) in out.iter_mut().zip(&sums[r * POSITIONS + j..][..n]) {
                *o = s + b0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every output equals the sum of its taps over the rounded input and weight (f64), for
    /// odd and even sizes, several samples, channels that fill no whole tile, and the flipped
    /// taps (the input gradient's) against the weight turned by hand.
    #[test]
    fn equals_the_convolution_of_the_rounded_values() {
        if !super::super::available() {
            eprintln!("skipped: this CPU runs no AMX");
            return;
        }
        let round = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
        let values = |n: usize, seed: usize| (0..n).map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0).collect::<Vec<f32>>();
        for (batch, ci, co, h, w) in [(2, 64, 48, 7, 9), (1, 40, 33, 16, 16), (1, 96, 64, 5, 33)] {
            let (x, wt) = (values(batch * ci * h * w, 1), values(co * ci * 9, 2));
            let bias = values(co, 3);
            for flipped in [false, true] {
                // Flipped: the taps of a [ci, co] weight turned, so that it convolves [.., co, ..]
                // inputs; here its own input has `co` channels, read as ci below.
                let (cin, cout) = if flipped { (co, ci) } else { (ci, co) };
                let x = if flipped { values(batch * cin * h * w, 4) } else { x.clone() };
                let taps = taps(&wt, co, ci, flipped);
                let bias = if flipped { None } else { Some(&bias[..]) };
                // SAFETY: AMX is available (checked above).
                let got = unsafe { conv3x3(&x, &taps, bias, batch, cin, cout, h, w) };
                for (b, o, y, x0) in (0..batch).flat_map(|b| (0..cout).flat_map(move |o| (0..h).flat_map(move |y| (0..w).map(move |x0| (b, o, y, x0))))) {
                    let mut want = bias.map_or(0.0, |bias| bias[o] as f64);
                    for (i, ky, kx) in (0..cin).flat_map(|i| (0..3).flat_map(move |ky| (0..3).map(move |kx| (i, ky, kx)))) {
                        let (yy, xx) = ((y + ky).wrapping_sub(1), (x0 + kx).wrapping_sub(1));
                        if yy >= h || xx >= w {
                            continue;
                        }
                        let tap = if flipped { wt[(i * ci + o) * 9 + (2 - ky) * 3 + 2 - kx] } else { wt[(o * ci + i) * 9 + ky * 3 + kx] };
                        want += round(x[((b * cin + i) * h + yy) * w + xx]) * round(tap);
                    }
                    let v = got[((b * cout + o) * h + y) * w + x0] as f64;
                    assert!((v - want).abs() <= 1e-4 * (1.0 + want.abs()), "{batch}x{ci}->{co} {h}x{w} flipped {flipped}: ({b}, {o}, {y}, {x0}) {v} against {want}");
                }
            }
        }
    }
}
