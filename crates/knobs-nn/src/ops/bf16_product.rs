//! Matrix products with bf16 operands and f32 sums, on CPUs with AVX512-BF16 (AMD Zen 4 and
//! later, Intel Cooper Lake / Sapphire Rapids and later): what autocast's bf16 products
//! compute, at twice f32's multiply-adds per instruction. gemm has no bf16 kernel, and
//! products were most of a mixed-precision step, which ran in f32 until this (1.7x PyTorch's
//! bf16 step on a Zen 4).
//!
//! The operands are read as f32 (bf16 activations widened, exactly) and rounded to bf16 (to
//! nearest, ties to even; NaN stays NaN) while they are packed: the left one into panels of
//! [`MR`] rows, the right one into panels of [`NR`] columns, both as pairs of neighbours along
//! the summed dimension, which is the operand layout of `vdpbf16ps`. The sums run in f32 in a
//! fixed order per output, so the result does not depend on the thread count. Like oneDNN's
//! bf16 kernels on these instructions, subnormal operands and sums count as zero (below
//! 1.2e-38).
use rayon::prelude::*;

use super::matrix::View;
use super::words::Words;

#[path = "bf16_amx.rs"]
mod amx;

/// Rows of the left operand per micro-panel.
const MR: usize = 12;
/// Columns of the right operand per micro-panel (two registers of 16 lanes).
const NR: usize = 32;
/// Pairs along the summed dimension per pass: a right micro-panel of them (32 KiB) stays in
/// L1 while the rows go by.
const KC: usize = 256;
/// Rows per task: its packed left block stays in L2.
const MC: usize = 8 * MR;
/// Packed entries from which a parallel packing spreads over the threads.
const PARALLEL_ENTRIES: usize = 1 << 14;

/// `fill` on each chunk of `size` entries of a packing's `data` (with the chunk's index), on
/// every thread where `parallel` and `data` holds [`PARALLEL_ENTRIES`] or more.
fn fill_chunks<T: Send>(data: &mut [T], size: usize, parallel: bool, fill: impl Fn((usize, &mut [T])) + Sync + Send) {
    if parallel && data.len() >= PARALLEL_ENTRIES {
        data.par_chunks_mut(size.max(1)).enumerate().for_each(fill);
    } else {
        data.chunks_mut(size.max(1)).enumerate().for_each(fill);
    }
}

/// Whether this CPU runs the kernel (checked once; `KNOBS_NO_BF16_PRODUCTS` turns it off, for
/// comparing both paths in one build).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("KNOBS_NO_BF16_PRODUCTS").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether mixed precision takes this kernel: where AMX runs it, or on a CPU that is not
/// Intel's. On an Intel Xeon (Emerald Rapids) with AMX turned off, `vdpbf16ps` ran slower
/// than f32: an SD-1.5 bf16 LoRA step 16.2 s against 10.7 s in f32, its linear layers at 192
/// GFLOP/s against gemm's 225-391; on a Zen 4 the step took 9.9-10.0 s against 14.2 s in f32.
/// So an Intel CPU without AMX (Cooper Lake, or a kernel that refuses the tile state) takes
/// f32 products.
pub(crate) fn pays() -> bool {
    available() && (amx::available() || !intel())
}

fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // The vendor string of leaf 0 starts "Genu" in EBX.
        std::arch::x86_64::__cpuid(0).ebx == u32::from_le_bytes(*b"Genu")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `lo` and `hi` in bf16 as one pair, rounded by the `half` crate as `vcvtne2ps2bf16` rounds
/// (to nearest, ties to even; a NaN quiet).
fn pair(lo: f32, hi: f32) -> u32 {
    let bits = |x: f32| u32::from(half::bf16::from_f32(x).to_bits());
    bits(lo) | bits(hi) << 16
}

/// The mask of the lanes of a 16-lane vector from value `from` that lie among the first
/// `count` values: what masked loads and stores of a partial chunk take.
pub(super) fn lanes(count: usize, from: usize) -> u16 {
    ((1u32 << count.saturating_sub(from).min(16)) - 1) as u16
}

/// `dst` (element (i, j) at `dst + i * rs + j * cs`) = `dst` (when `accumulate`) + `beta`
/// lhs `[m, k]` rhs `[k, n]`, both operands rounded to bf16. Call only where [`available`].
///
/// SAFETY: the views cover their matrices and `dst` is valid for writes at every (i, j), which
/// no other thread touches.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product_strided(m: usize, n: usize, k: usize, dst: *mut f32, rs: usize, cs: usize, accumulate: bool, lhs: View, rhs: View, beta: f32, par: gemm::Parallelism) {
    let parallel = !matches!(par, gemm::Parallelism::None);
    let (lhs, rhs) = (Packed::left(m, k, lhs, parallel), Packed::right(k, n, rhs, parallel));
    unsafe { product_packed(&lhs, &rhs, dst, rs, cs, accumulate, beta, parallel) }
}

/// Whether 3x3 convolutions (stride 1, padding 1) of `c_in` to `c_out` channels over
/// `positions` outputs (over the batch) take AMX's kernel ([`conv3x3`]) under bf16 products,
/// forward or (`flipped`) for an input gradient: where AMX runs and the weight's taps, packed
/// per call, cost little beside the products.
pub(super) fn conv3x3_applies(c_in: usize, c_out: usize, positions: usize, flipped: bool) -> bool {
    let min = if flipped { CONV_MIN_POSITIONS_FLIPPED } else { CONV_MIN_POSITIONS };
    conv3x3_runs(c_in, c_out) && positions >= min
}

/// Whether AMX's tiles run the bf16 products on this CPU.
pub(super) fn amx_runs() -> bool {
    amx::available()
}

/// Whether AMX's kernel ([`conv3x3`]) runs 3x3 convolutions of `c_in` to `c_out` channels
/// with taps packed beforehand (kept for a frozen weight): at every plane size.
pub(super) fn conv3x3_runs(c_in: usize, c_out: usize) -> bool {
    amx_runs() && c_in.min(c_out) >= CONV_MIN_CHANNELS
}

/// Channels below which a convolution keeps the other kernels (a tile holds 32 of them).
const CONV_MIN_CHANNELS: usize = 32;
/// Outputs per call below which the forward taps' packing costs more than AMX saves. Since the
/// taps are right operands packed in one pass (`conv::gathered_taps`), `[2, 1280, 16, 16] ->
/// 1280` takes 9.5 ms with its packing (3 ms of it) against Winograd's 19-26, and an SD-1.5
/// bf16 LoRA step at 512 px took 3.91-3.94 s with AMX's kernel from 64 outputs (8x8 planes)
/// against 3.98-4.01 s from 1024 (the UNet's forward pass 1.27-1.28 against 1.32-1.33 s,
/// 70-130 MB more at the peak; four interleaved rounds, Xeon, 2026-12-07).
const CONV_MIN_POSITIONS: usize = if cfg!(test) { 1 } else { 64 };
/// The same for the input gradient's flipped taps, packed from planes split first (`conv::taps`:
/// about 20 ms for a `[1280, 1280, 3, 3]` weight), which pay from 1024 outputs.
const CONV_MIN_POSITIONS_FLIPPED: usize = if cfg!(test) { 1 } else { 1024 };

/// The weight `[co, ci, 3, 3]` packed for [`conv3x3`], as its 9 taps, or (`flipped`) those of
/// the input gradient's convolution. Call only where [`conv3x3_applies`].
pub(super) fn conv3x3_taps(w: &[f32], co: usize, ci: usize, flipped: bool) -> Vec<Packed> {
    assert!(amx::available(), "the AMX convolution needs AMX");
    amx::conv::taps(w, co, ci, flipped)
}

/// Bytes of [`conv3x3_taps`]' packing.
pub(super) fn conv3x3_taps_bytes(co: usize, ci: usize) -> usize {
    amx::conv::taps_bytes(co, ci)
}

/// `x` `[B, ci, h, w]` convolved (3x3, stride 1, padding 1) with the weight packed as `taps`
/// ([`conv3x3_taps`]: `ci` channels in, `co` out), plus `bias`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv3x3(x: &[f32], taps: &[Packed], bias: Option<&[f32]>, batch: usize, ci: usize, co: usize, h: usize, w: usize) -> Vec<f32> {
    assert!(amx::available(), "the AMX convolution needs AMX");
    // SAFETY: AMX runs (asserted).
    unsafe { amx::conv::conv3x3(x, amx::conv::Taps::Packed(taps), bias, batch, ci, co, h, w) }
}

/// [`conv3x3`] with the weight laid out by tap (`[co][3][3][ci]` in bf16, `ci` a multiple of
/// 32), as words: its taps packed as the kernel reaches them, none kept.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv3x3_by_tap(x: &[f32], rows: &[u32], bias: Option<&[f32]>, batch: usize, ci: usize, co: usize, h: usize, w: usize) -> Vec<f32> {
    assert!(amx::available(), "the AMX convolution needs AMX");
    // SAFETY: AMX runs (asserted).
    unsafe { amx::conv::conv3x3(x, amx::conv::Taps::ByTap(rows), bias, batch, ci, co, h, w) }
}

/// An operand packed for the kernel: `lines` lines of `k` values (the rows of a left operand,
/// the columns of a right one) in panels of `width` lines (zeros past the last), each panel
/// `[k / 2, width]` pairs of neighbours along `k` in bf16 (a zero after an odd `k`).
#[derive(Debug)]
pub(super) struct Packed {
    data: Words,
    lines: usize,
    k: usize,
    width: usize,
    layout: Layout,
}

/// How a [`Packed`] operand lies in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Panels of `width` lines, each `[k / 2, width]` pairs: the operands of `vdpbf16ps`, and
    /// AMX's right tile.
    Pairs,
    /// A left operand for AMX ([`amx::pack_rows`]): its rows of pairs, in blocks of
    /// `amx::ROWS`.
    Rows,
}

impl Packed {
    /// The left operand `[m, k]`: as rows for AMX where the CPU has it, else its rows in
    /// panels of [`MR`].
    pub(super) fn left(m: usize, k: usize, lhs: View, parallel: bool) -> Packed {
        let (ptr, line, elem) = lhs.parts();
        if amx::available() {
            // SAFETY: the caller's view covers m rows of k values.
            return unsafe { amx::pack_rows(ptr, line, elem, m, k, parallel) };
        }
        Packed::new(ptr, line, elem, m, k, MR, parallel)
    }

    /// The left operand `[m, k]` stored row-major in bf16 (`k` even), as its words, packed as
    /// [`Packed::left`] packs it, where AMX runs (`None` elsewhere).
    pub(super) fn left_of_bf16(m: usize, k: usize, words: &[u32], parallel: bool) -> Option<Packed> {
        amx::available().then(|| amx::pack_bf16_rows(words, m, k, parallel))
    }

    /// The right operand `[k, n]`, its columns in panels of [`NR`].
    pub(super) fn right(k: usize, n: usize, rhs: View, parallel: bool) -> Packed {
        let (ptr, elem, line) = rhs.parts();
        Packed::new(ptr, line, elem, n, k, NR, parallel)
    }

    /// The right operand `W^T` of a `[n, k]` weight stored in bf16 (`rows`: its rows as words,
    /// pairs of neighbours along `k`; `k` a multiple of 32), packed as [`Packed::right`] packs
    /// it, with no widening: each 16 columns by 16 pairs one transpose of words. From the
    /// widened f32 copy, packing SD-1.5's linear weights took half of generation's first
    /// step's packing, and every call's in training.
    pub(super) fn right_of_rows(rows: &[u32], n: usize, k: usize, parallel: bool) -> Packed {
        assert!(available() && k.is_multiple_of(32) && rows.len() == n * k / 2, "a bf16 [{n}, {k}] weight as words, k a multiple of 32");
        let (kp, panels) = (k / 2, n.div_ceil(NR));
        let fill = |(p, out): (usize, &mut [std::mem::MaybeUninit<u32>])| {
            // SAFETY: AVX-512 runs (AVX512-BF16 does, asserted); `rows` is the weight; `out`
            // is panel p, written in full.
            unsafe { amx::pack_panel(rows, n, (kp, kp), 1, p, out.as_mut_ptr().cast(), (0, 1)) }
        };
        // SAFETY: every panel is written in full.
        let data = unsafe { Words::written(panels * kp * NR, |out| fill_chunks(out, kp * NR, parallel, fill)) };
        Packed { data, lines: n, k, width: NR, layout: Layout::Pairs }
    }

    /// The right operand `[k, n]` stored row-major in bf16 (`rows`: `k` rows of `n` values),
    /// packed as [`Packed::right`] packs it, with no widening: neighbouring rows' values side
    /// by side as words. A frozen bf16 weight `[out, in]` as the input gradient's right
    /// operand: widened to f32 first, it was copied and read again at twice the width, every
    /// training step (SDXL's transformer weights, 2.2 B values).
    pub(super) fn right_of_bf16(k: usize, n: usize, rows: &[half::bf16], parallel: bool) -> Packed {
        assert!(available() && rows.len() == k * n, "a bf16 [{k}, {n}] operand");
        let (kp, panels) = (k.div_ceil(2), n.div_ceil(NR));
        let (panel, values) = (kp * NR, rows.as_ptr() as usize);
        // A block of PAIRS pairs into every panel in turn: each panel's part written whole
        // (2 KiB), 32 rows read front to back, instead of a pair at a time across every
        // panel with the writes a panel apart.
        const PAIRS: usize = 16;
        let fill = |out: &mut [std::mem::MaybeUninit<u32>]| {
            let out = out.as_mut_ptr() as usize;
            let block = |b: usize| {
                let values = values as *const u16;
                for p in 0..panels {
                    let (j0, count) = (p * NR, NR.min(n - p * NR));
                    for q in b * PAIRS..((b + 1) * PAIRS).min(kp) {
                        // SAFETY: AVX512BW and VL run (`available`, asserted); rows 2q and
                        // (before k) 2q + 1 hold `count` values from column j0; panel p's row
                        // q is in `out` (every panel), and only this block writes it.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            let hi = (2 * q + 1 < k).then(|| values.add((2 * q + 1) * n + j0));
                            x86::pair_bf16_row(values.add(2 * q * n + j0), hi, count, (out as *mut u32).add(p * panel + q * NR));
                        }
                    }
                }
            };
            if parallel && panels * panel >= PARALLEL_ENTRIES {
                (0..kp.div_ceil(PAIRS)).into_par_iter().for_each(block);
            } else {
                (0..kp.div_ceil(PAIRS)).for_each(block);
            }
        };
        // SAFETY: every panel's every row is written (zeros past `n` and after an odd `k`).
        let data = unsafe { Words::written(panels * panel, fill) };
        Packed { data, lines: n, k, width: NR, layout: Layout::Pairs }
    }

    /// Bytes of [`Packed::right`]'s packing of a `[k, n]` operand.
    pub(super) fn right_bytes(k: usize, n: usize) -> usize {
        n.div_ceil(NR) * k.div_ceil(2) * NR * size_of::<u32>()
    }

    /// Line `l`, element `e` at `ptr + l * line + e * elem`.
    fn new(ptr: *const f32, line: isize, elem: isize, lines: usize, k: usize, width: usize, parallel: bool) -> Packed {
        assert!(available(), "the bf16 product needs AVX512-BF16");
        let panel = k.div_ceil(2) * width;
        let len = lines.div_ceil(width) * panel;
        #[cfg(target_arch = "x86_64")]
        if line == 1 {
            // SAFETY: the caller's view covers `lines` lines of `k` elements; pack_by_pairs
            // writes every entry.
            let data = unsafe { Words::written(len, |out| pack_by_pairs(ptr, elem, lines, k, width, out, parallel)) };
            return Packed { data, lines, k, width, layout: Layout::Pairs };
        }
        let mut data = Words::zeroed(len);
        let ptr = ptr as usize;
        // SAFETY: the caller's view covers `lines` lines of `k` elements.
        let fill = |(p, out): (usize, &mut [u32])| unsafe { pack(ptr as *const f32, line, elem, p * width, lines, k, width, out) };
        fill_chunks(&mut data, panel, parallel, fill);
        Packed { data, lines, k, width, layout: Layout::Pairs }
    }

    /// A left operand `[m, k]` of zeros in AMX's layout ([`Layout::Rows`]), for a producer
    /// that writes its rows itself, 32 values at a time ([`Packed::row_chunks`]); `None` where
    /// AMX does not run. Rows past `m` stay zeros.
    pub(super) fn zero_rows(m: usize, k: usize) -> Option<Packed> {
        let len = m.next_multiple_of(amx::ROWS) * amx::row_stride(k);
        amx::available().then(|| Packed { data: Words::zeroed(len), lines: m, k, width: amx::ROWS, layout: Layout::Rows })
    }

    /// Row `i` of a left operand made by [`Packed::zero_rows`] as chunks of 16 pairs, in
    /// order: its `k` values, then zeros up to a whole chunk.
    pub(super) fn row_chunks(&mut self, i: usize) -> impl Iterator<Item = &mut [u32; 16]> {
        assert!(self.layout == Layout::Rows && i < self.lines, "a row of a left operand in AMX's layout");
        let stride = amx::row_stride(self.k);
        let chunks = stride / 16;
        // A row's chunks lie a tile (16 rows of 16 pairs) apart.
        self.data[amx::at(i, 0, stride)..].chunks_exact_mut(16).step_by(16).take(chunks).map(|c| c.try_into().expect("16 pairs"))
    }

    /// Its packed words, in the layout's order.
    #[cfg(test)]
    pub(super) fn words(&self) -> &[u32] {
        &self.data[..]
    }

    /// Values along the summed dimension.
    pub(super) fn k(&self) -> usize {
        self.k
    }

    /// Bytes it holds.
    pub(super) fn bytes(&self) -> usize {
        self.data.len() * size_of::<u32>()
    }

    fn panels(&self) -> usize {
        self.lines.div_ceil(self.width)
    }

    /// Panel `p`'s pairs `k0..k0 + len`.
    fn panel(&self, p: usize, k0: usize, len: usize) -> &[u32] {
        let kp = self.k.div_ceil(2);
        &self.data[(p * kp + k0) * self.width..][..len * self.width]
    }
}

/// A right operand `[k, n]` packed as [`Packed::right`] packs it, filled a pair of its rows at a
/// time ([`RightByPairs::set_pair`]), for a producer that makes its rows a few at a time
/// (Winograd's input transform, channel by channel), so that they are packed while in cache
/// instead of all made first and read back. Nothing is cleared beforehand: each pair writes its
/// row of every panel in full, and [`RightByPairs::packed`] checks that every pair was set.
pub(super) struct RightByPairs {
    data: Words,
    k: usize,
    n: usize,
    set: Vec<bool>,
}

impl RightByPairs {
    pub(super) fn new(k: usize, n: usize) -> RightByPairs {
        assert!(available(), "the bf16 product needs AVX512-BF16");
        let kp = k.div_ceil(2);
        // SAFETY: `packed` hands the words out only once every pair has written its rows.
        let data = unsafe { Words::uninit(n.div_ceil(NR) * kp * NR) };
        RightByPairs { data, k, n, set: vec![false; kp] }
    }

    /// Rows `2q` and `2q + 1`: `lo` and `hi` (zeros without it, for the last of an odd `k`),
    /// `n` values each; zeros past the `n`th column of the last panel.
    pub(super) fn set_pair(&mut self, q: usize, lo: &[f32], hi: Option<&[f32]>) {
        let (n, kp) = (self.n, self.k.div_ceil(2));
        assert!(q < kp && lo.len() >= n && hi.is_none_or(|h| h.len() >= n), "a pair of rows of this right operand");
        let panels = n.div_ceil(NR);
        let data = self.data.uninit_mut();
        assert!(data.len() >= panels * kp * NR);
        let row = data[q * NR..].as_mut_ptr().cast::<u32>();
        // SAFETY: lo and hi hold n values; row q of every panel is within data (asserted).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::pair_lines(lo.as_ptr(), hi.map(<[f32]>::as_ptr), n, row, NR, kp * NR)
        };
        if !n.is_multiple_of(NR) {
            let last = (panels - 1) * kp * NR + q * NR;
            data[last + n % NR..last + NR].fill(std::mem::MaybeUninit::new(0));
        }
        self.set[q] = true;
    }

    /// The operand, once every pair is set.
    pub(super) fn packed(self) -> Packed {
        assert!(self.set.iter().all(|&s| s), "every pair of rows of a right operand set before its product");
        // Every entry was written (each pair's row of every panel, padding included).
        Packed { data: self.data, lines: self.n, k: self.k, width: NR, layout: Layout::Pairs }
    }
}

/// `lhs` (packed as [`Packed::left`] on a CPU running AMX) times the right operand `W^T` of the
/// bf16 weight `[n, k]` given as its rows of words (`k` a multiple of 32), into (or, with
/// `accumulate`, onto) the row-major destination (`rs` values a row), the weight packed as
/// the product goes and never kept (see `amx::product_of_rows`).
///
/// SAFETY: `dst` holds `lhs.lines` rows of `n` values, `rs` apart.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product_of_rows(lhs: &Packed, rows: &[u32], n: usize, dst: *mut f32, rs: usize, accumulate: bool, parallel: bool) {
    assert!(amx::available(), "the product of a weight's rows needs AMX");
    // SAFETY: AMX runs; as the caller vouches.
    unsafe { amx::product_of_rows(lhs, rows, n, dst, rs, accumulate, parallel) }
}

/// `dst` (element (i, j) at `dst + i * rs + j * cs`) = `dst` (when `accumulate`) + `beta`
/// lhs rhs, from packed operands ([`Packed::left`], [`Packed::right`]).
///
/// SAFETY: `dst` is valid for writes at every (i, j), which no other thread touches.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product_packed(lhs: &Packed, rhs: &Packed, dst: *mut f32, rs: usize, cs: usize, accumulate: bool, beta: f32, parallel: bool) {
    if lhs.layout == Layout::Rows {
        // SAFETY: as this function's; a left operand is packed as rows only where AMX runs.
        return unsafe { amx::product(lhs, rhs, dst, rs, cs, accumulate, beta, parallel) };
    }
    assert!(lhs.layout == Layout::Pairs && rhs.layout == Layout::Pairs && lhs.width == MR && rhs.width == NR && lhs.k == rhs.k, "a left and a right operand of the same length");
    let (m, n, kp) = (lhs.lines, rhs.lines, lhs.k.div_ceil(2));
    if m == 0 || n == 0 {
        return;
    }
    let dst = dst as usize;
    in_tasks(m.div_ceil(MC), rhs.panels(), parallel, |block, panels| {
        let row_panels = block * MC / MR..((block + 1) * MC).min(m).div_ceil(MR);
        let dst = dst as *mut f32;
        for k0 in (0..kp).step_by(KC) {
            let len = KC.min(kp - k0);
            for p in panels.clone() {
                let b = rhs.panel(p, k0, len);
                for i in row_panels.clone() {
                    let (i0, j0) = (i * MR, p * NR);
                    let tile = Tile { rs, cs, rows: MR.min(m - i0), cols: NR.min(n - j0), accumulate: accumulate || k0 > 0, beta };
                    // SAFETY: the tile is within the caller's destination, and this task's alone.
                    unsafe { micro(lhs.panel(i, k0, len), b, dst.add(i0 * rs + j0 * cs), tile) };
                }
            }
        }
    });
}

/// Runs `task(block, panels)` for every block of rows (`row_blocks` of them) and group of the
/// right operand's `panels`: enough tasks for every thread twice, by rows, and by columns too
/// when rows are few; on the calling thread alone unless `parallel`. Each output is one task's.
fn in_tasks(row_blocks: usize, panels: usize, parallel: bool, task: impl Fn(usize, std::ops::Range<usize>) + Sync) {
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let column_groups = (2 * threads).div_ceil(row_blocks).clamp(1, panels);
    let per_group = panels.div_ceil(column_groups);
    let run = |t: usize| {
        let group = t % column_groups;
        task(t / column_groups, group * per_group..((group + 1) * per_group).min(panels));
    };
    let tasks = row_blocks * column_groups;
    if threads > 1 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// An operand whose neighbouring lines are contiguous (line `l`, element `e` at `ptr + l + e *
/// elem`; a row-major right operand, a transposed left one) into `data`, its panels of `width`
/// lines: a pair of elements at a time across all panels, so that each element's values are
/// read front to back (a panel at a time, the reads went down every element of the operand
/// a page apart, and packing a `[2880, 1024]` right operand took 3x a copy of it).
///
/// Every entry of `data` is written: the last panel's lines past `lines` with zeros (only
/// they: clearing the whole buffer first was a pass of its own).
///
/// SAFETY: `ptr` covers `lines` lines of `k` elements.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_by_pairs(ptr: *const f32, elem: isize, lines: usize, k: usize, width: usize, data: &mut [std::mem::MaybeUninit<u32>], parallel: bool) {
    let (kp, ptr, out) = (k.div_ceil(2), ptr as usize, data.as_mut_ptr() as usize);
    let panel = kp * width;
    assert_eq!(data.len(), lines.div_ceil(width) * panel);
    if !lines.is_multiple_of(width) {
        // Zeros first, then the present lines over them.
        let len = data.len();
        data[len - panel..].fill(std::mem::MaybeUninit::new(0));
    }
    let pair = |q: usize| {
        let ptr = ptr as *const f32;
        // SAFETY: elements 2q and (before k) 2q + 1 of every line; each q writes its own row
        // of every panel.
        unsafe {
            let hi = (2 * q + 1 < k).then(|| ptr.offset((2 * q + 1) as isize * elem));
            x86::pair_lines(ptr.offset((2 * q) as isize * elem), hi, lines, (out as *mut u32).add(q * width), width, panel)
        }
    };
    if parallel && data.len() >= PARALLEL_ENTRIES {
        (0..kp).into_par_iter().with_min_len(4).for_each(pair);
    } else {
        (0..kp).for_each(pair);
    }
}

/// Lines `first..first + width` (line `l`, element `e` at `ptr + l * line + e * elem`; lines
/// from `lines` on are zeros) into `out` `[k / 2, width]`, each entry the pair of elements
/// `2q, 2q + 1` in bf16 (a zero after an odd `k`).
///
/// SAFETY: `ptr` covers `lines` lines of `k` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn pack(ptr: *const f32, line: isize, elem: isize, first: usize, lines: usize, k: usize, width: usize, out: &mut [u32]) {
    let at = |l: usize, e: usize| unsafe { *ptr.offset(l as isize * line + e as isize * elem) };
    let (full, present) = (k / 2, width.min(lines.saturating_sub(first)));
    // Pairs below this are packed already.
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if elem == 1 {
        // Contiguous lines: 16 pairs of 16 lines at a time, transposed in registers (stored
        // one by one, a row-major weight's packing took longer than its product).
        done = full - full % 16;
        for w in (0..present).step_by(16) {
            let count = 16.min(present - w);
            for q in (0..done).step_by(16) {
                // SAFETY: lines first + w .. + count hold elements 2q .. 2q + 32 (q + 16 <= k / 2);
                // out's rows q .. q + 16 hold `width` >= w + count entries.
                unsafe { x86::transpose_pairs(ptr.offset((first + w) as isize * line).add(2 * q), line, count, out[q * width + w..].as_mut_ptr(), width) };
            }
        }
    }
    for w in 0..present {
        let l = first + w;
        for q in done..full {
            out[q * width + w] = pair(at(l, 2 * q), at(l, 2 * q + 1));
        }
        if k % 2 == 1 {
            out[full * width + w] = pair(at(l, k - 1), 0.0);
        }
    }
}

/// Where a micro-panel's `MR x NR` results go.
#[derive(Clone, Copy)]
struct Tile {
    rs: usize,
    cs: usize,
    /// The valid part (the panels are zero-padded beyond it).
    rows: usize,
    cols: usize,
    accumulate: bool,
    beta: f32,
}

/// SAFETY: `at` is valid for the tile's rows and columns; `a` holds `len x MR` and `b`
/// `len x NR` packed pairs.
unsafe fn micro(a: &[u32], b: &[u32], at: *mut f32, tile: Tile) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::micro(a, b, at, tile)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false off x86_64")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR, Tile};

    /// 32 floats from `p` as 16 bf16 pairs.
    ///
    /// SAFETY: the CPU has AVX512-BF16; `p` covers 32 floats.
    #[cfg(test)]
    pub(super) unsafe fn round_pairs(p: *const f32) -> [u32; 16] {
        let mut out = [0u32; 16];
        unsafe { round_into(p, out.as_mut_ptr()) };
        out
    }

    /// 32 floats from `p` as 16 bf16 pairs into `out`.
    ///
    /// SAFETY: the CPU has AVX512-BF16; `p` covers 32 floats, `out` 16 pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_into(p: *const f32, out: *mut u32) {
        unsafe { _mm512_storeu_si512(out.cast(), rounded(p)) };
    }

    /// The first `count` (below 32) of 32 floats from `p`, the rest zeros, as 16 bf16 pairs
    /// into `out`.
    ///
    /// SAFETY: the CPU has AVX512-BF16; `p` covers `count` floats, `out` 16 pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_part_into(p: *const f32, count: usize, out: *mut u32) {
        unsafe {
            // A lane count of zero leaves the pointer unread.
            let (lo, hi) = (_mm512_maskz_loadu_ps(super::lanes(count, 0), p), _mm512_maskz_loadu_ps(super::lanes(count, 16), p.wrapping_add(16)));
            _mm512_storeu_si512(out.cast(), std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
        }
    }

    /// Lines `0..count` (at most 16) from `p` (line `l` at `p + l * line`), 32 floats each, as
    /// 16 pairs each in bf16, written transposed: pair `q` of line `l` to `out[q * width + l]`.
    ///
    /// SAFETY: the CPU has AVX512-BF16; `p` covers the lines' 32 floats, `out` 16 rows of
    /// `count` at stride `width`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn transpose_pairs(p: *const f32, line: isize, count: usize, out: *mut u32, width: usize) {
        unsafe {
            // Plain loops: array::from_fn's closures were left out of line.
            let mut r = [_mm512_setzero_si512(); 16];
            for (l, r) in r.iter_mut().enumerate().take(count) {
                *r = rounded(p.offset(l as isize * line));
            }
            let mask = super::lanes(count, 0);
            for (t, row) in transposed16(&r).into_iter().enumerate() {
                _mm512_mask_storeu_epi32(out.add(t * width).cast(), mask, row);
            }
        }
    }

    /// The `[32, 32]` row-major `src` transposed into `dst`, 16 x 16 at a time in registers.
    ///
    /// SAFETY: the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose32(src: &[f32; 1024], dst: &mut [f32; 1024]) {
        for (bi, bj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, r) in r.iter_mut().enumerate() {
                // SAFETY: row 16 bi + i holds 16 values from column 16 bj.
                *r = unsafe { _mm512_loadu_si512(src[(16 * bi + i) * 32 + 16 * bj..].as_ptr().cast()) };
            }
            for (j, row) in transposed16(&r).into_iter().enumerate() {
                // SAFETY: row 16 bj + j holds 16 values from column 16 bi.
                unsafe { _mm512_storeu_si512(dst[(16 * bj + j) * 32 + 16 * bi..].as_mut_ptr().cast(), row) };
            }
        }
    }

    /// The 16 x 16 matrix of 32-bit entries whose rows are `r`, transposed.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transposed16(r: &[__m512i; 16]) -> [__m512i; 16] {
        // Pairs of rows interleaved, then quadruples: b[4i + c] holds, for rows 4i .. 4i + 4,
        // entries c, c + 4, c + 8 and c + 12 in its four 128-bit lanes.
        let mut a = [_mm512_setzero_si512(); 16];
        for j in (0..16).step_by(2) {
            a[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
            a[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
        }
        let mut b = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            for h in 0..2 {
                let (x, y) = (a[4 * i + h], a[4 * i + 2 + h]);
                b[4 * i + 2 * h] = _mm512_unpacklo_epi64(x, y);
                b[4 * i + 2 * h + 1] = _mm512_unpackhi_epi64(x, y);
            }
        }
        let mut out = [_mm512_setzero_si512(); 16];
        for c in 0..4 {
            // Lanes 0, 1 (e0) and 2, 3 (e1) of rows 0-3 and 4-7, f0 and f1 of rows 8-15.
            let e0 = _mm512_shuffle_i32x4::<0x44>(b[c], b[4 + c]);
            let e1 = _mm512_shuffle_i32x4::<0xee>(b[c], b[4 + c]);
            let f0 = _mm512_shuffle_i32x4::<0x44>(b[8 + c], b[12 + c]);
            let f1 = _mm512_shuffle_i32x4::<0xee>(b[8 + c], b[12 + c]);
            out[c] = _mm512_shuffle_i32x4::<0x88>(e0, f0);
            out[c + 4] = _mm512_shuffle_i32x4::<0xdd>(e0, f0);
            out[c + 8] = _mm512_shuffle_i32x4::<0x88>(e1, f1);
            out[c + 12] = _mm512_shuffle_i32x4::<0xdd>(e1, f1);
        }
        out
    }

    /// Rows `0..count` (at most 16) of an operand whose rows are neighbours (row `i`, element
    /// `e` at `p + i + e * elem`, `k` elements), their pairs `q0 .. q0 + 16` (zeros past the
    /// last), as rows of pairs: 16 rows at `out`, `stride` apart (zeros past `count`).
    ///
    /// SAFETY: the CPU has AVX512-BF16 and AVX512BW; `p` covers the rows, `out` 16 rows of 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn rows_of_columns(p: *const f32, elem: isize, count: usize, k: usize, q0: usize, out: *mut u32, stride: usize) {
        let mut r = [_mm512_setzero_si512(); 16];
        for (j, r) in r.iter_mut().enumerate() {
            let q = q0 + j;
            if 2 * q >= k {
                break;
            }
            // SAFETY: elements 2q and (before k) 2q + 1 of the count rows.
            unsafe {
                let hi = (2 * q + 1 < k).then(|| p.offset((2 * q + 1) as isize * elem));
                *r = interleaved(p.offset((2 * q) as isize * elem), hi, count);
            }
        }
        for (t, row) in transposed16(&r).into_iter().enumerate() {
            // SAFETY: out holds 16 rows of 16 at `stride`.
            unsafe { _mm512_storeu_si512(out.add(t * stride).cast(), row) };
        }
    }

    /// 32 floats from `p` as 16 bf16 pairs.
    ///
    /// SAFETY: the CPU has AVX512-BF16; `p` covers 32 floats.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rounded(p: *const f32) -> __m512i {
        // The first argument fills the upper half: the second 16 floats.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p))) }
    }

    /// Rows `0..rows` (at most 16; `row` apart from `p`) of an operand whose pairs' values lie
    /// `step` apart, their first `values` values (at most 32, zeros after) as 16 pairs each,
    /// transposed: pair `m` of every row into the 16 entries at `out + m * stride` (zeros past
    /// `rows`). A weight `[co, ci, 3, 3]` read this way (`step` 9) gives a tap's right operand.
    ///
    /// SAFETY: the CPU has AVX512-BF16 and AVX512BW; `p` covers the rows' values, `out` 16
    /// rows of 16 at `stride`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn gathered_pairs(p: *const f32, row: usize, step: usize, rows: usize, values: usize, out: *mut u32, stride: usize) {
        let index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(step as i32));
        let mut r = [_mm512_setzero_si512(); 16];
        for (j, r) in r.iter_mut().enumerate().take(rows) {
            // SAFETY: row j's values 0 .. values (step apart); lanes outside the masks are not read.
            unsafe {
                let at = p.add(j * row);
                let lo = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), super::lanes(values, 0), index, at);
                let hi = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), super::lanes(values, 16), index, at.wrapping_add(16 * step));
                // The first argument fills the upper half: values 16 .. 32.
                *r = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
        for (m, pairs) in transposed16(&r).into_iter().enumerate() {
            // SAFETY: out holds 16 rows of 16 at `stride`.
            unsafe { _mm512_storeu_si512(out.add(m * stride).cast(), pairs) };
        }
    }

    /// Asks for the cache lines of `words` to be brought into L2, without waiting for them.
    #[inline]
    pub(super) fn prefetch(words: &[u32]) {
        for line in words.chunks(16) {
            // SAFETY: a prefetch reads nothing architecturally; the address is within `words`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
        }
    }

    /// Rows `0..rows` (at most 16; `row` words apart from `p`) of 16 words each (pairs of bf16
    /// values), transposed: word `m` of every row into the 16 entries at `out + m * stride`
    /// (zeros past `rows`). A kernel laid out by tap (`kernel_layout`) read this way gives a
    /// tap's right operand with no rounding and no gather.
    ///
    /// SAFETY: the CPU has AVX-512; `p` covers the rows' 16 words, `out` 16 rows of 16 at
    /// `stride`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn transposed_words(p: *const u32, row: usize, rows: usize, out: *mut u32, stride: usize) {
        let mut r = [_mm512_setzero_si512(); 16];
        for (j, r) in r.iter_mut().enumerate().take(rows) {
            // SAFETY: row j holds 16 words.
            *r = unsafe { _mm512_loadu_si512(p.add(j * row).cast()) };
        }
        for (m, words) in transposed16(&r).into_iter().enumerate() {
            // SAFETY: out holds 16 rows of 16 at `stride`.
            unsafe { _mm512_storeu_si512(out.add(m * stride).cast(), words) };
        }
    }

    /// `count` (at most 16) floats from `lo` and from `hi` (zeros without it) into `out` as
    /// `count` pairs (lo, hi) in bf16.
    ///
    /// SAFETY: the CPU has AVX512-BF16; `lo`, `hi` cover `count` floats, `out` `count` pairs.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave(lo: *const f32, hi: Option<*const f32>, count: usize, out: *mut u32) {
        let mask = super::lanes(count, 0);
        unsafe { _mm512_mask_storeu_epi32(out.cast(), mask, interleaved(lo, hi, count)) };
    }

    /// [`interleave`]'s pairs as a vector (zeros past `count`).
    ///
    /// SAFETY: as [`interleave`], without `out`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn interleaved(lo: *const f32, hi: Option<*const f32>, count: usize) -> __m512i {
        let mask = super::lanes(count, 0);
        unsafe {
            let lo = _mm512_maskz_loadu_ps(mask, lo);
            let hi = hi.map_or(_mm512_setzero_ps(), |hi| _mm512_maskz_loadu_ps(mask, hi));
            // [lo 0..16, hi 0..16] in bf16, then each lo beside its hi.
            let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            _mm512_permutexvar_epi16(order, halves)
        }
    }

    /// `lines` floats from `lo` and from `hi` (zeros without it) as pairs into the same row of
    /// successive panels: line `l` to `out[(l / width) * panel + l % width]`.
    ///
    /// SAFETY: the CPU has AVX512-BF16 and AVX512BW; `lo` and `hi` cover `lines` floats, `out`
    /// the panels' rows; `width` is a multiple of 16 or at most 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pair_lines(lo: *const f32, hi: Option<*const f32>, lines: usize, out: *mut u32, width: usize, panel: usize) {
        let step = if width.is_multiple_of(16) { 16 } else { width };
        debug_assert!(step <= 16);
        let mut l = 0;
        while l < lines {
            let count = step.min(lines - l);
            // SAFETY: as the caller vouches; a step never crosses a panel.
            unsafe { interleave(lo.add(l), hi.map(|h| h.add(l)), count, out.add(l / width * panel + l % width)) };
            l += count;
        }
    }

    /// Pair `q` of a panel's rows from bf16 rows `lo` and `hi` (zeros without it): their
    /// first `count` values (at most [`NR`]) side by side as words into `out`, zeros after
    /// them to a whole row of the panel.
    ///
    /// SAFETY: the CPU has AVX512BW and AVX512VL; `lo` and `hi` cover `count` values, `out`
    /// [`NR`] words.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pair_bf16_row(lo: *const u16, hi: Option<*const u16>, count: usize, out: *mut u32) {
        const { assert!(NR == 32) };
        for h in 0..2 {
            // A lane count of zero leaves the pointers unread.
            let mask = super::lanes(count.saturating_sub(16 * h).min(16), 0);
            // SAFETY: as the caller vouches; each value widened to a word, the `hi` one
            // shifted into its top half.
            unsafe {
                let lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, lo.add(16 * h).cast()));
                let hi = hi.map_or(_mm512_setzero_si512(), |p| _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p.add(16 * h).cast()))));
                _mm512_storeu_si512(out.add(16 * h).cast(), _mm512_or_si512(lo, hi));
            }
        }
    }

    /// SAFETY: as [`super::micro`], on a CPU with AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn micro(a: &[u32], b: &[u32], at: *mut f32, tile: Tile) {
        let len = b.len() / NR;
        debug_assert_eq!(a.len(), len * MR);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (a, b) = (a.as_ptr(), b.as_ptr());
        for q in 0..len {
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR).cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR + 16).cast()));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(q * MR + r) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
                }
            }
        }
        let beta = _mm512_set1_ps(tile.beta);
        if tile.rows == MR && tile.cols == NR && tile.cs == 1 {
            for (r, acc) in acc.iter().enumerate() {
                unsafe {
                    let p = at.add(r * tile.rs);
                    for (h, v) in acc.iter().enumerate() {
                        let v = _mm512_mul_ps(*v, beta);
                        let v = if tile.accumulate { _mm512_add_ps(v, _mm512_loadu_ps(p.add(16 * h))) } else { v };
                        _mm512_storeu_ps(p.add(16 * h), v);
                    }
                }
            }
            return;
        }
        // An edge tile or a strided destination: through a buffer, the valid part only.
        let mut buf = [[0f32; NR]; MR];
        for (row, acc) in buf.iter_mut().zip(&acc) {
            unsafe {
                _mm512_storeu_ps(row.as_mut_ptr(), _mm512_mul_ps(acc[0], beta));
                _mm512_storeu_ps(row.as_mut_ptr().add(16), _mm512_mul_ps(acc[1], beta));
            }
        }
        for (r, row) in buf.iter().enumerate().take(tile.rows) {
            for (j, v) in row.iter().enumerate().take(tile.cols) {
                unsafe {
                    let p = at.add(r * tile.rs + j * tile.cs);
                    *p = if tile.accumulate { *p + v } else { *v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn widen(b: u16) -> f64 {
        f64::from(f32::from_bits(u32::from(b) << 16))
    }

    fn to_bf16(x: f32) -> u16 {
        half::bf16::from_f32(x).to_bits()
    }

    /// An operand packed from contiguous lines (written without clearing the buffer first)
    /// holds each value where the layout puts it, zeros past its last line and after an odd
    /// `k`: a row-major right operand and a transposed left one, one thread and several.
    #[test]
    fn packing_by_pairs_fills_every_entry() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // Long enough for the parallel packing; a partial last panel in both widths.
        let (k, n) = (7, 4101);
        let x = values(k * n, 5);
        for parallel in [false, true] {
            let (ptr, line, elem) = View::rows(&x, 0, n).t().parts();
            for (packed, width) in [(Packed::right(k, n, View::rows(&x, 0, n), parallel), NR), (Packed::new(ptr, line, elem, n, k, MR, parallel), MR)] {
                let kp = k.div_ceil(2);
                assert_eq!(packed.data.len(), n.div_ceil(width) * kp * width);
                assert!(packed.data.len() >= PARALLEL_ENTRIES && n % width != 0);
                for (i, &entry) in packed.data.iter().enumerate() {
                    let (p, q, w) = (i / (kp * width), i / width % kp, i % width);
                    let line = p * width + w;
                    let at = |e: usize| if line < n && e < k { to_bf16(x[e * n + line]) } else { 0 };
                    assert_eq!(entry, u32::from(at(2 * q)) | u32::from(at(2 * q + 1)) << 16, "width {width}, entry {i} (line {line}, pair {q})");
                }
            }
        }
    }

    /// `n` bf16 values (from seed `seed`), and the same widened to f32.
    fn bf16_values(n: usize, seed: u64) -> (Vec<half::bf16>, Vec<f32>) {
        let x: Vec<half::bf16> = values(n, seed).iter().map(|&v| half::bf16::from_f32(v)).collect();
        let wide = x.iter().map(|v| v.to_f32()).collect();
        (x, wide)
    }

    /// The packings `of_bf16` and `of_f32` make (one thread, then several) are the same.
    fn packs_alike(of_bf16: impl Fn(bool) -> Packed, of_f32: impl Fn(bool) -> Packed, what: &str) {
        for parallel in [false, true] {
            let (a, b) = (of_bf16(parallel), of_f32(parallel));
            assert_eq!((a.lines, a.k, a.width, a.layout), (b.lines, b.k, b.width, b.layout), "{what}");
            assert!(a.data[..] == b.data[..], "{what}, parallel {parallel}");
        }
    }

    /// A bf16 operand packs to the same words as its values widened to f32 do (odd `k`, a
    /// partial last panel, serial and parallel), NaN and infinities included.
    #[test]
    fn a_bf16_operand_packs_as_its_widened_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (k, n) in [(1, 1), (7, 4101), (64, 33), (2, 16)] {
            let (mut x, _) = bf16_values(k * n, 11);
            x[0] = half::bf16::NAN;
            if x.len() > 2 {
                x[1] = half::bf16::INFINITY;
                x[2] = half::bf16::NEG_ZERO;
            }
            let wide: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            packs_alike(|p| Packed::right_of_bf16(k, n, &x, p), |p| Packed::right(k, n, View::rows(&wide, 0, n), p), &format!("[{k}, {n}]"));
        }
    }

    /// A bf16 left operand packs, on AMX, to the same words as its values widened to f32 do
    /// (partial tiles of rows and of pairs, serial and parallel).
    #[test]
    fn a_bf16_left_operand_packs_as_its_widened_values() {
        if !amx::available() {
            eprintln!("skipped: this CPU has no AMX-BF16");
            return;
        }
        for (m, k) in [(1, 2), (33, 46), (40, 64), (700, 90)] {
            let (x, wide) = bf16_values(m * k, 13);
            let words = crate::ops::words::pairs(&x).expect("an even count, aligned");
            packs_alike(|p| Packed::left_of_bf16(m, k, words, p).expect("AMX runs"), |p| Packed::left(m, k, View::rows(&wide, 0, k), p), &format!("[{m}, {k}]"));
        }
    }

    /// Where the CPU has AMX, a left operand is packed as rows of pairs: each value where the
    /// layout puts it, zeros past the last row (to a whole block) and past the last pair (to a
    /// whole tile), one thread and several; row-major, transposed and otherwise strided.
    #[test]
    fn packing_as_rows_fills_every_entry() {
        if !amx::available() {
            eprintln!("skipped: this CPU has no AMX-BF16");
            return;
        }
        for (m, k) in [(1, 1), (33, 7), (40, 64), (4101, 45), (5, 0)] {
            let x = values(m * k, 11);
            // Element (i, e) of each view: row-major, transposed, and every other value of a
            // row-major matrix twice as wide.
            let wide: Vec<f32> = x.iter().flat_map(|v| [*v, f32::NAN]).collect();
            let views = [(View::rows(&x, 0, k), k, 1), (View::rows(&x, 0, m).t(), 1, m), (View::strided(&wide, 0, 2 * k, 2), k, 1)];
            for (parallel, (view, rs, cs)) in [false, true].into_iter().flat_map(|p| views.map(|v| (p, v))) {
                let packed = Packed::left(m, k, view, parallel);
                assert_eq!(packed.layout, Layout::Rows);
                let stride = amx::row_stride(k);
                assert_eq!((stride % 16, packed.data.len()), (0, m.next_multiple_of(amx::ROWS) * stride));
                for (row, q) in (0..m.next_multiple_of(amx::ROWS)).flat_map(|row| (0..stride).map(move |q| (row, q))) {
                    let (i, at) = (amx::at(row, q, stride), |e: usize| if row < m && e < k { to_bf16(x[row * rs + e * cs]) } else { 0 });
                    assert_eq!(packed.data[i], u32::from(at(2 * q)) | u32::from(at(2 * q + 1)) << 16, "{m}x{k} strides {rs}, {cs}: entry {i} (row {row}, pair {q})");
                }
            }
        }
    }

    /// The scalar rounding (the `half` crate's, for packing's tails) and the vector one agree:
    /// to nearest with ties to even, NaN kept.
    #[test]
    fn rounding_is_to_nearest_even_and_keeps_nan() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even one, 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even one, up.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3f81);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(to_bf16(f32::MAX), 0x7f80, "beyond bf16's largest value: infinity");
        for nan in [f32::NAN, f32::from_bits(0x7f80_0001), f32::from_bits(0xffff_ffff)] {
            assert!(f32::from_bits(u32::from(to_bf16(nan)) << 16).is_nan(), "{:#x}", nan.to_bits());
        }
        if available() {
            // The packing's vector rounding agrees with the scalar one, NaN and ties included.
            let mut x = values(32, 3);
            x[0] = 1.0 + 1.0 / 256.0;
            x[1] = 1.0 + 3.0 / 256.0;
            x[5] = f32::NAN;
            let pairs = unsafe { x86::round_pairs(x.as_ptr()) };
            for (q, p) in pairs.iter().enumerate() {
                let (lo, hi) = ((*p & 0xffff) as u16, (*p >> 16) as u16);
                for (got, want) in [(lo, x[2 * q]), (hi, x[2 * q + 1])] {
                    assert!(got == to_bf16(want) || (want.is_nan() && widen(got).is_nan()), "pair {q}: {got:#x} for {want}");
                }
            }
        }
    }

    /// Every shape class (edges in each dimension, odd k, more than one pass over k, one row),
    /// strided operands and destinations, accumulation and scale, one thread and several:
    /// equal to f64 sums of the bf16-rounded operands within f32 summation error, and
    /// identical between thread counts. Both kernels where the CPU has AMX (k from less than
    /// one tile to several, with and without a partial last one; more rows than one task's).
    #[test]
    fn equals_the_product_of_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        eprintln!("AMX: {}", amx::available());
        for (m, n, k) in [(1, 1, 1), (12, 32, 64), (13, 33, 7), (100, 70, 600), (200, 5, 1025), (3, 300, 40), (140, 40, 96)] {
            for transposed in [false, true] {
                let (a, b) = (values(m * k, 1 + m as u64), values(k * n, 2 + n as u64));
                // Row-major, or stored transposed (the other stride layout of each operand).
                let (lhs, rhs) = if transposed {
                    (View::strided(&a, 0, 1, m), View::strided(&b, 0, 1, k))
                } else {
                    (View::rows(&a, 0, k), View::rows(&b, 0, n))
                };
                let elem = |s: &[f32], i: usize, j: usize, rows: usize, cols: usize| if transposed { s[j * rows + i] } else { s[i * cols + j] };
                let start = values(m * n, 9);
                let sums: Vec<f64> = (0..m * n)
                    .map(|ij| {
                        let (i, j) = (ij / n, ij % n);
                        (0..k).map(|t| widen(to_bf16(elem(&a, i, t, m, k))) * widen(to_bf16(elem(&b, t, j, k, n)))).sum()
                    })
                    .collect();
                let scale = (k as f64).sqrt() * 4.0;
                // Scaled, and unscaled (AMX sums whole blocks of a row-major destination in place).
                for beta in [0.5, 1.0] {
                let want: Vec<f64> = start.iter().zip(&sums).map(|(s, sum)| f64::from(*s) + beta * sum).collect();
                // The left operand as product_strided packs it (rows for AMX where the CPU
                // has it), and in panels for vdpbf16ps.
                for panels in [false, true] {
                    let mut outs = vec![];
                    for par in [gemm::Parallelism::None, gemm::Parallelism::Rayon(0)] {
                        let parallel = !matches!(par, gemm::Parallelism::None);
                        let left = if panels {
                            let (ptr, line, elem) = lhs.parts();
                            Packed::new(ptr, line, elem, m, k, MR, parallel)
                        } else {
                            Packed::left(m, k, lhs, parallel)
                        };
                        // The destination column-major (strided) when the operands are transposed.
                        let mut dst = if transposed { (0..m * n).map(|ji| start[(ji % m) * n + ji / m]).collect() } else { start.clone() };
                        let (rs, cs) = if transposed { (1, m) } else { (n, 1) };
                        unsafe { product_packed(&left, &Packed::right(k, n, rhs, parallel), dst.as_mut_ptr(), rs, cs, true, beta as f32, parallel) };
                        let dst: Vec<f32> = (0..m * n).map(|ij| dst[(ij / n) * rs + (ij % n) * cs]).collect();
                        for (ij, (got, want)) in dst.iter().zip(&want).enumerate() {
                            assert!((f64::from(*got) - want).abs() < 1e-5 * scale, "{m}x{n}x{k} transposed {transposed} {:?}, ({}, {}): {got} vs {want}", left.layout, ij / n, ij % n);
                        }
                        outs.push(dst);
                    }
                    assert_eq!(outs[0], outs[1], "{m}x{n}x{k} in panels {panels}: the thread count changed the sums");
                }
                }
                // Without accumulation the destination's values are not read.
                let mut fresh = vec![f32::NAN; m * n];
                unsafe { product_strided(m, n, k, fresh.as_mut_ptr(), n, 1, false, View::rows(&a, 0, k), View::rows(&b, 0, n), 1.0, gemm::Parallelism::None) };
                if !transposed {
                    for (ij, (got, want)) in fresh.iter().zip(&sums).enumerate() {
                        assert!((f64::from(*got) - want).abs() < 1e-5 * scale, "{m}x{n}x{k} without accumulation, ({}, {}): {got} vs {want}", ij / n, ij % n);
                    }
                }
            }
        }
    }
}
