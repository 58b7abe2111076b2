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
//!
//! The taps come packed whole (`Taps::Packed`: a frozen kernel's packing kept between
//! denoising steps, or one made per call), or from a kernel laid out by tap
//! (`Taps::ByTap`, see `kernel_layout`), which each task packs a panel of 32 output channels
//! at a time into one of two buffers: the next panel's after each block of positions, a part
//! at a time, its words asked into L2 before the block computes. Packed between panels, the
//! weight's reads from memory held both threads up (a 20-step generation 3-10% slower than
//! with kept packings); interleaved and fetched ahead, the same time, with no packing kept.
use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::ops::fresh::written;
use crate::ops::matrix::View;
use crate::ops::words::{OnLines, Words};
use super::x86;
use super::{NR, Packed, fetch_panel, in_tasks, pack_panel, row_stride};

/// Positions per block: two left tiles.
const POSITIONS: usize = 32;
/// Blocks of positions per task: the input rows they read stay in L2 while every panel of
/// output channels goes by.
const BLOCKS_PER_TASK: usize = 8;
/// The most blocks of positions per task where each task packs its taps (`Taps::ByTap`): at
/// SD-1.5's 16x16 and 32x32 levels (CFG batch 2) one range, each panel packed once; on
/// `[2, 640, 32, 32]` (73 blocks) 5.1 ms in one range against 6.0 in five.
const BLOCKS_PER_TASK_BY_TAP: usize = 128;

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

/// Where a convolution's taps come from.
#[derive(Clone, Copy)]
pub(in super::super) enum Taps<'a> {
    /// Packed beforehand, whole ([`taps`]).
    Packed(&'a [Packed]),
    /// The weight laid out by tap (`[co][3][3][ci]` in bf16, `ci` a multiple of 32; see
    /// `kernel_layout`), as words (pairs of channels): each task packs the taps of the 32
    /// output channels it computes next, 16 x 16 transposes of words that lie side by side.
    /// No packing of the whole weight is made or kept: generation kept one of every large
    /// kernel, 1.0 GB for SD-1.5's UNet beside the weights themselves.
    ByTap(&'a [u32]),
}

/// `x` `[B, ci, h, w]` convolved with the weight whose taps are `taps` (`ci` channels in, `co`
/// out), plus `bias`: `[B, co, h, w]`.
///
/// SAFETY: AMX is available (`super::available`).
#[allow(clippy::too_many_arguments)]
pub(in super::super) unsafe fn conv3x3(x: &[f32], taps: Taps<'_>, bias: Option<&[f32]>, batch: usize, ci: usize, co: usize, h: usize, w: usize) -> Vec<f32> {
    let stride = row_stride(ci);
    match taps {
        Taps::Packed(taps) => assert!(taps.len() == 9 && taps.iter().all(|t| t.lines == co && t.k == 2 * stride), "the 9 taps of a [{co}, {ci}, 3, 3] weight"),
        Taps::ByTap(rows) => assert!(ci.is_multiple_of(32) && rows.len() == co * 9 * ci / 2, "a [{co}, {ci}, 3, 3] weight laid out by tap"),
    }
    assert_eq!(x.len(), batch * ci * h * w);
    let (gw, grid) = (w + 2, (h + 2) * (w + 2));
    // Outputs are the grid's positions from the first inside the border to the last.
    let (first, count) = (gw + 1, batch * grid - 2 * (gw + 1));
    let blocks = count.div_ceil(POSITIONS);
    // Taps packed per task are packed once for each range of positions: fewer, longer ranges,
    // of even lengths (a short last one left a thread idle: `[2, 640, 32, 32]` took 6.7 ms in
    // ranges of 32, 32 and 9 blocks, 5.2 in one).
    let per_task = match taps {
        Taps::Packed(_) => BLOCKS_PER_TASK,
        Taps::ByTap(_) => blocks.div_ceil(blocks.div_ceil(BLOCKS_PER_TASK_BY_TAP)),
    };
    // The last block reads up to a block and a row past the last output.
    let input = by_position(x, batch, ci, h, w, POSITIONS + gw + 1);
    // Each tap's offset from the output's position, in words.
    let offsets: [isize; 9] = std::array::from_fn(|t| ((t / 3 * gw + t % 3) as isize - (gw + 1) as isize) * stride as isize);
    let convolve = |out: &mut [MaybeUninit<f32>]| {
        let dst = Out(out.as_mut_ptr().cast());
        // Tasks of `per_task` blocks of positions by groups of panels of output channels,
        // split as the product kernel splits its rows and panels.
        in_tasks(blocks.div_ceil(per_task), co.div_ceil(NR), true, |range, panels| {
            let position_blocks = range * per_task..((range + 1) * per_task).min(blocks);
            let (mut sums, mut by_channel) = (OnLines([0f32; POSITIONS * NR]), OnLines([0f32; NR * POSITIONS]));
            // Taps laid out by tap: two panels' buffers, the one the tiles read and the next
            // panel's, packed a part after each block of positions (see the module's doc).
            // SAFETY: each buffer is written in full by `pack_panel` before the tiles read it.
            let mut buffers = matches!(taps, Taps::ByTap(_)).then(|| unsafe { [Words::uninit(9 * stride * NR), Words::uninit(9 * stride * NR)] });
            // Both buffers through raw pointers alone: one is written while the tiles read the other.
            let buffers: Option<[*mut u32; 2]> = buffers.as_mut().map(|[a, b]| [a, b].map(|w| w.uninit_mut().as_mut_ptr().cast()));
            let parts = position_blocks.len();
            if let (Taps::ByTap(rows), Some(buffers)) = (taps, buffers)
                && !panels.is_empty()
            {
                // SAFETY: AVX-512 runs; `rows` is the laid-out weight (asserted).
                unsafe { pack_panel(rows, co, (stride, stride), 9, panels.start, buffers[0], (0, 1)) };
            }
            // SAFETY: AMX is available; the tiles are configured before use and released after.
            unsafe { x86::configure() };
            for (k, p) in panels.clone().enumerate() {
                // The taps' panels the tiles read, and (laid out by tap) the weight and the other
                // buffer, which the next panel's taps are packed into meanwhile.
                let (b, next): ([*const u32; 9], _) = match (taps, buffers) {
                    (Taps::ByTap(rows), Some(buffers)) => (
                        std::array::from_fn(|t| buffers[k % 2].wrapping_add(t * stride * NR).cast_const()),
                        (p + 1 < panels.end).then_some((rows, buffers[(k + 1) % 2])),
                    ),
                    (Taps::Packed(taps), _) => (std::array::from_fn(|t| taps[t].panel(p, 0, stride).as_ptr()), None),
                    (Taps::ByTap(_), None) => unreachable!("panel buffers are made for taps laid out by tap"),
                };
                for (i, pb) in position_blocks.clone().enumerate() {
                    // The words this block's part of the next panel packs, fetched while the
                    // tiles compute the block.
                    if let Some((rows, _)) = next {
                        fetch_panel(rows, co, (stride, stride), 9, p + 1, (i, parts));
                    }
                    let g0 = first + pb * POSITIONS;
                    // SAFETY: every tap's panel holds `stride` rows of NR pairs; the input holds
                    // the positions g0 + offset .. + POSITIONS (the border and the slack).
                    unsafe { x86::conv_block(input[g0 * stride..].as_ptr(), stride, &offsets, &b, sums.0.as_mut_ptr()) };
                    // SAFETY: AMX (so AVX-512) runs.
                    unsafe { super::super::x86::transpose32(&sums.0, &mut by_channel.0) };
                    // SAFETY: the outputs of these positions and channels are this task's alone.
                    unsafe { store(&by_channel.0, dst, p * NR, co, g0, first + count, (h, w), bias) };
                    if let Some((rows, out)) = next {
                        // SAFETY: AVX-512 runs; the other buffer, which no tile reads now.
                        unsafe { pack_panel(rows, co, (stride, stride), 9, p + 1, out, (i, parts)) };
                    }
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

    /// A weight laid out by tap, its taps packed panel by panel in the kernel, gives the bits of
    /// the same weight packed whole beforehand: output channels that fill no whole panel,
    /// several samples, planes from 8 x 8 to 33 wide, and ranges of positions that split.
    #[test]
    fn taps_packed_per_panel_from_the_layout_by_tap_equal_the_packed_ones() {
        if !super::super::available() {
            eprintln!("skipped: this CPU runs no AMX");
            return;
        }
        let values = |n: usize, seed: usize| (0..n).map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0).collect::<Vec<f32>>();
        for (batch, ci, co, h, w) in [(2, 64, 48, 8, 8), (1, 96, 80, 16, 16), (2, 32, 33, 5, 33), (1, 64, 64, 40, 40)] {
            let x = values(batch * ci * h * w, 1);
            // bf16 values, so that packing the f32 weight rounds nothing.
            let wt: Vec<half::bf16> = values(co * ci * 9, 2).into_iter().map(half::bf16::from_f32).collect();
            let wide: Vec<f32> = wt.iter().map(|v| v.to_f32()).collect();
            let bias = values(co, 3);
            let mut rows = vec![0u32; co * 9 * ci / 2];
            for (o, t, i) in (0..co).flat_map(|o| (0..9).flat_map(move |t| (0..ci / 2).map(move |i| (o, t, i)))) {
                let (lo, hi) = (wt[(o * ci + 2 * i) * 9 + t], wt[(o * ci + 2 * i + 1) * 9 + t]);
                rows[(o * 9 + t) * ci / 2 + i] = lo.to_bits() as u32 | (hi.to_bits() as u32) << 16;
            }
            let packed = taps(&wide, co, ci, false);
            // SAFETY: AMX is available (checked above).
            let want = unsafe { conv3x3(&x, Taps::Packed(&packed), Some(&bias), batch, ci, co, h, w) };
            // SAFETY: as above; `rows` is the weight laid out by tap.
            let got = unsafe { conv3x3(&x, Taps::ByTap(&rows), Some(&bias), batch, ci, co, h, w) };
            assert!(got == want, "{batch}x{ci}->{co} {h}x{w}: the taps packed per panel give other sums");
        }
    }

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
                let got = unsafe { conv3x3(&x, Taps::Packed(&taps), bias, batch, cin, cout, h, w) };
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
