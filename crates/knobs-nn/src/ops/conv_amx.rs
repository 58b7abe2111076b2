//! 3x3 convolutions (stride 1, padding 1) on AMX tiles without unrolling the input into
//! columns: the input is laid out once as the positions of a grid with a zero border
//! (`[B][h + 2][w + 2]`), each a row of pairs of channels on cache lines, and a left tile of
//! 16 positions by 16 pairs is then any 16 neighbouring positions of it, read straight from
//! there. Each of the 9 taps is a product of the input shifted by the tap's offset with the
//! weight's `[ci, co]` slice for that tap, summed in the same tiles; the sums, 32 positions by
//! 32 channels, are transposed to the output's rows.
//!
//! On an Emerald Rapids Xeon the Winograd kernel and the unrolled one both reached about 1
//! TFLOP/s of direct-convolution work at SD-1.5's 64x64 level on 2 threads, against 2.6 for
//! PyTorch's oneDNN (`[2, 320, 64, 64]` in 5.7 ms): their transforms and column copies, in
//! f32, cost more than the products. Here the input is read once, in bf16. The positions were
//! the right operand before, read as planes of channel pairs: a tap's offset then put a tile's
//! rows across cache lines, where a position's pairs now start on one.
//!
//! Outputs are computed for every position of the padded grid (the border's are dropped), so
//! that a run of 16 positions may cross rows and samples: the cost is the border, 2 columns in
//! `w + 2` (3% at 64, 12% at 16). Each output's sums run in one fixed order (pairs of
//! channels, the 9 taps within each), whatever the thread count.
use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::ops::fresh::written;
use crate::ops::matrix::View;
use crate::ops::words::{OnLines, Words};
use super::x86;
use super::{NR, Packed, in_tasks, row_stride};

/// Positions per block: two left tiles.
const POSITIONS: usize = 32;
/// Blocks of positions per task: the input rows they read stay in L2 while every panel of
/// output channels goes by.
const BLOCKS_PER_TASK: usize = 8;

/// The weight `[co, ci, 3, 3]` as the 9 right operands of its taps, each `[ci, co]` (the
/// forward pass), or (`flipped`) `[co, ci]` with the taps turned 180 degrees: the input
/// gradient's, itself the same convolution of the output gradient. The summed dimension is
/// padded with zeros to whole tiles, as the input's pairs are.
pub(in super::super) fn taps(w: &[f32], co: usize, ci: usize, flipped: bool) -> Vec<Packed> {
    assert_eq!(w.len(), co * ci * 9, "a [{co}, {ci}, 3, 3] weight");
    if !flipped {
        return gathered_taps(w, co, ci);
    }
    // Each tap's slice `[co, ci]` in a plane of its own, with zero rows up to whole tiles of
    // pairs along `co`, the summed dimension here; packing reads its rows as they lie.
    let rows = 2 * row_stride(co);
    let plane = rows * ci;
    let split = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(plane).for_each(|p| p[co * ci..].fill(MaybeUninit::new(0.0)));
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
    // SAFETY: every plane's rows below co are written, the rest cleared.
    let split = unsafe { written(9 * plane, split) };
    // The tap turned 180 degrees: element (o, i) of the input gradient's tap t is the
    // weight's tap 8 - t.
    (0..9).map(|t| Packed::right(rows, ci, View::rows(&split, (8 - t) * plane, ci), true)).collect()
}

/// The forward taps in one pass over the weight: for each panel of 32 output channels, 16
/// rows of the weight at a time, a tap's 16 pairs of channels gathered 9 values apart and
/// transposed in registers into the panel's rows, the 9 taps in turn while the rows are in L1.
/// Splitting the taps into planes first and packing each plane wrote and read the weight once
/// more: the first denoising step of a 512 px generation took 0.8 s to pack SD-1.5's taps.
fn gathered_taps(w: &[f32], co: usize, ci: usize) -> Vec<Packed> {
    let (kp, panels) = (row_stride(ci), co.div_ceil(NR));
    let panel = kp * NR;
    // SAFETY: every panel of every tap is written in full below.
    let mut taps: Vec<Words> = (0..9).map(|_| unsafe { Words::uninit(panels * panel) }).collect();
    let outs: Vec<usize> = taps.iter_mut().map(|t| t.uninit_mut().as_mut_ptr() as usize).collect();
    (0..panels).into_par_iter().for_each(|p| {
        for half in 0..NR / 16 {
            let o0 = p * NR + half * 16;
            let rows = co.saturating_sub(o0).min(16);
            for q0 in (0..kp).step_by(16) {
                let values = ci.saturating_sub(2 * q0).min(32);
                for (t, &out) in outs.iter().enumerate() {
                    let at = (out as *mut u32).wrapping_add(p * panel + q0 * NR + half * 16);
                    // SAFETY: AMX (so AVX512-BF16) runs; rows o0 .. o0 + rows of the weight hold
                    // their `values` channels from 2 q0, tap t, 9 values apart; each tap's buffer
                    // holds the panel's 16 pair rows from q0, this task's alone.
                    unsafe { super::super::x86::gathered_pairs(w.as_ptr().wrapping_add((o0 * ci + 2 * q0) * 9 + t), 9 * ci, 9, rows, values, at, NR) };
                }
            }
        }
    });
    taps.into_iter().map(|data| Packed { data, lines: co, k: 2 * kp, width: NR, layout: super::super::Layout::Pairs }).collect()
}

/// Bytes of [`taps`]' forward packing.
pub(in super::super) fn taps_bytes(co: usize, ci: usize) -> usize {
    9 * Packed::right_bytes(2 * row_stride(ci), co)
}

/// The input `x` `[B, c, h, w]` as the positions of a grid with a zero border (`[B][h + 2][w +
/// 2]`, then `slack` positions of zeros), each a row of `row_stride(c)` pairs of channels
/// (zeros past `c`) from the start of a cache line: a left tile is then any 16 neighbouring
/// positions, every row of it on its own lines whatever the tap's offset.
fn by_position(x: &[f32], batch: usize, c: usize, h: usize, w: usize, slack: usize) -> Words {
    let (gw, stride) = (w + 2, row_stride(c));
    let rows = batch * (h + 2);
    // SAFETY: every grid row is written below (its border zeros, its positions' pairs), then
    // the slack.
    let mut out = unsafe { Words::uninit((rows * gw + slack) * stride) };
    let (grid_rows, tail) = out.uninit_mut().split_at_mut(rows * gw * stride);
    tail.fill(MaybeUninit::new(0));
    // One task a grid row: a border row all zeros; an image row its two border positions
    // zeros and its positions' pairs, 16 positions by 16 pairs at a time.
    grid_rows.par_chunks_mut(gw * stride).enumerate().for_each(|(row, out)| {
        let (b, gy) = (row / (h + 2), row % (h + 2));
        if gy == 0 || gy == h + 1 {
            out.fill(MaybeUninit::new(0));
            return;
        }
        let y = gy - 1;
        out[..stride].fill(MaybeUninit::new(0));
        out[(w + 1) * stride..].fill(MaybeUninit::new(0));
        let mut tile = OnLines([0u32; 256]);
        for x0 in (0..w).step_by(16) {
            let count = 16.min(w - x0);
            for q0 in (0..stride).step_by(16) {
                // SAFETY: AMX (so AVX512-BF16) runs; channel planes of sample b hold positions
                // y w + x0 .. + count, h w apart; the tile holds 16 rows of 16.
                unsafe { super::super::x86::rows_of_columns(x[(b * c * h + y) * w + x0..].as_ptr(), (h * w) as isize, count, c, q0, tile.0.as_mut_ptr(), 16) };
                for (i, pairs) in tile.0.chunks_exact(16).take(count).enumerate() {
                    let at = (x0 + i + 1) * stride + q0;
                    for (o, &v) in out[at..at + 16].iter_mut().zip(pairs) {
                        o.write(v);
                    }
                }
            }
        }
    });
    out
}

/// A raw pointer to the output, shared by the tasks: each writes only its own positions of its
/// own output channels.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint outputs (see `conv3x3`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `x` `[B, ci, h, w]` convolved with the weight whose taps are `taps` (see [`taps`]: `ci`
/// channels in, `co` out), plus `bias`: `[B, co, h, w]`.
///
/// SAFETY: AMX is available (`super::available`).
#[allow(clippy::too_many_arguments)]
pub(in super::super) unsafe fn conv3x3(x: &[f32], taps: &[Packed], bias: Option<&[f32]>, batch: usize, ci: usize, co: usize, h: usize, w: usize) -> Vec<f32> {
    let stride = row_stride(ci);
    assert!(taps.len() == 9 && taps.iter().all(|t| t.lines == co && t.k == 2 * stride), "the 9 taps of a [{co}, {ci}, 3, 3] weight");
    assert_eq!(x.len(), batch * ci * h * w);
    let (gw, grid) = (w + 2, (h + 2) * (w + 2));
    // Outputs are the grid's positions from the first inside the border to the last.
    let (first, count) = (gw + 1, batch * grid - 2 * (gw + 1));
    let blocks = count.div_ceil(POSITIONS);
    // The last block reads up to a block and a row past the last output.
    let input = by_position(x, batch, ci, h, w, POSITIONS + gw + 1);
    // Each tap's offset from the output's position, in words.
    let offsets: [isize; 9] = std::array::from_fn(|t| ((t / 3 * gw + t % 3) as isize - (gw + 1) as isize) * stride as isize);
    let convolve = |out: &mut [MaybeUninit<f32>]| {
        let dst = Out(out.as_mut_ptr().cast());
        // Tasks of BLOCKS_PER_TASK blocks of positions by groups of panels of output channels,
        // split as the product kernel splits its rows and panels.
        in_tasks(blocks.div_ceil(BLOCKS_PER_TASK), co.div_ceil(NR), true, |range, panels| {
            let position_blocks = range * BLOCKS_PER_TASK..((range + 1) * BLOCKS_PER_TASK).min(blocks);
            let (mut sums, mut by_channel) = (OnLines([0f32; POSITIONS * NR]), OnLines([0f32; NR * POSITIONS]));
            // SAFETY: AMX is available; the tiles are configured before use and released after.
            unsafe { x86::configure() };
            for p in panels {
                let b: [*const u32; 9] = std::array::from_fn(|t| taps[t].panel(p, 0, stride).as_ptr());
                for pb in position_blocks.clone() {
                    let g0 = first + pb * POSITIONS;
                    // SAFETY: every tap's panel holds `stride` rows of NR pairs; the input holds
                    // the positions g0 + offset .. + POSITIONS (the border and the slack).
                    unsafe { x86::conv_block(input[g0 * stride..].as_ptr(), stride, &offsets, &b, sums.0.as_mut_ptr()) };
                    // SAFETY: AMX (so AVX-512) runs.
                    unsafe { super::super::x86::transpose32(&sums.0, &mut by_channel.0) };
                    // SAFETY: the outputs of these positions and channels are this task's alone.
                    unsafe { store(&by_channel.0, dst, p * NR, co, g0, first + count, (h, w), bias) };
                }
            }
            // SAFETY: AMX is available.
            unsafe { x86::release() };
        });
    };
    // SAFETY: the blocks cover every position inside the border of every sample, and the
    // tasks every panel of output channels: each output written once.
    unsafe { written(batch * co * h * w, convolve) }
}

/// A block's sums (`[NR, POSITIONS]`, channels from `o0`, positions of the grid from `g0`)
/// plus the bias, to the outputs among them: channels below `co`, positions below `end` and
/// inside the border.
///
/// SAFETY: `dst` holds `[B, co, h, w]`; no other thread writes these outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn store(sums: &[f32; NR * POSITIONS], dst: Out, o0: usize, co: usize, g0: usize, end: usize, (h, w): (usize, usize), bias: Option<&[f32]>) {
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
    for r in 0..NR.min(co - o0) {
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
