//! bf16 products on AMX, the tile units of Intel Xeons from Sapphire Rapids on: one
//! `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 f32 sums, 8,192
//! multiply-adds against `vdpbf16ps`'s 32. PyTorch's bf16 (oneDNN) runs on them; with only
//! `vdpbf16ps` an SD-1.5 bf16 LoRA step took 3x PyTorch's on such a Xeon.
//!
//! The right operand is packed as for `vdpbf16ps` (panels of [`NR`] columns, pairs of
//! neighbours along `k` side by side): that is already the layout of AMX's right tile. The
//! left one is packed as rows of pairs ([`Layout::Rows`]), the layout of its left tile. The
//! sums of an output run in one fixed order whatever the thread count, as the other
//! kernel's.
use std::mem::MaybeUninit;

use super::{Layout, NR, Packed, fill_chunks, in_tasks, pair};
use super::super::words::{OnLines, Words};

#[path = "conv_amx.rs"]
pub(super) mod conv;

/// Rows of the left operand per block: two tiles.
pub(super) const ROWS: usize = 32;
/// Pairs along `k` per tile.
const PAIRS: usize = 16;
/// Blocks of rows per task.
const BLOCKS_PER_TASK: usize = 4;

/// Whether this CPU and OS run AMX's bf16 products (checked once; `KNOBS_NO_AMX` turns it
/// off, for comparing both kernels in one build).
pub(super) fn available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::env::var_os("KNOBS_NO_AMX").is_none() && super::available() && cpu_has_amx_bf16() && tile_permission())
}

fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 7 exists on every CPU with AVX-512 (checked before this).
        let r = std::arch::x86_64::__cpuid_count(7, 0);
        // EDX bit 22: AMX-BF16, bit 24: AMX-TILE.
        (r.edx >> 22) & 1 == 1 && (r.edx >> 24) & 1 == 1
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Linux gives a process the 8 KiB of tile state only when asked (`ARCH_REQ_XCOMP_PERM` for
/// `XFEATURE_XTILEDATA`), once, for all its threads; without it the first tile instruction
/// kills the process.
fn tile_permission() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes the process's permissions.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// Pairs per packed row for `k` values: whole tiles, zeros past the last pair.
pub(super) fn row_stride(k: usize) -> usize {
    k.div_ceil(2).next_multiple_of(PAIRS)
}

/// Where row `i`'s pair `q` lies in a left operand packed by [`pack_rows`] with rows of
/// `stride` pairs.
pub(super) fn at(i: usize, q: usize, stride: usize) -> usize {
    i / 16 * 16 * stride + q / PAIRS * 16 * PAIRS + i % 16 * PAIRS + q % PAIRS
}

/// The left operand `[m, k]` (element (i, e) at `ptr + i * line + e * elem`) as rows of
/// pairs, in tiles: 16 rows by 16 pairs, each tile's rows side by side (row `i`'s pair `q` at
/// `at(i, q, row_stride(k))`), so that a tile load reads one contiguous KiB instead of 16
/// lines a row apart; rows up to a multiple of [`ROWS`] and pairs up to the stride zeros.
/// Contiguous rows are rounded 32 values at a time (a last, partial chunk masked); rows that
/// are neighbours (a transposed operand: attention's probabilities in its backward pass, a
/// Winograd weight) 16 rows by 16 pairs at a time, transposed in registers; other strides one
/// pair at a time.
///
/// SAFETY: the CPU has AVX512-BF16 and AVX512BW; `ptr` covers the `m` rows of `k` values.
pub(super) unsafe fn pack_rows(ptr: *const f32, line: isize, elem: isize, m: usize, k: usize, parallel: bool) -> Packed {
    const GROUP: usize = 16;
    let stride = row_stride(k);
    let len = m.next_multiple_of(ROWS) * stride;
    let ptr = ptr as usize;
    let value = |i: usize, e: usize| if e < k { unsafe { *(ptr as *const f32).offset(i as isize * line + e as isize * elem) } } else { 0.0 };
    // Rows `i0 .. i0 + 16` (those past m zeros) into `out`.
    let group = |(g, out): (usize, &mut [MaybeUninit<u32>])| {
        let (i0, out) = (g * GROUP, out.as_mut_ptr().cast::<u32>());
        let count = GROUP.min(m.saturating_sub(i0));
        #[cfg(target_arch = "x86_64")]
        if line == 1 && elem != 1 && count > 0 {
            for q0 in (0..stride).step_by(PAIRS) {
                // SAFETY: rows i0 .. i0 + count hold k values; out holds the 16 x 16 tile.
                unsafe { super::x86::rows_of_columns((ptr as *const f32).add(i0), elem, count, k, q0, out.add(q0 * 16), PAIRS) };
            }
            return;
        }
        for t in 0..GROUP {
            // Row t's pairs q0 .. q0 + 16 lie at this, in the tile of pairs q0 ...
            // SAFETY: out holds GROUP rows of `stride` pairs.
            let chunk = |q0: usize| unsafe { std::slice::from_raw_parts_mut(out.add(q0 * 16 + t * PAIRS), PAIRS) };
            let i = i0 + t;
            // Whole chunks of 32 contiguous values by vector, the rest one pair at a time.
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if elem == 1 && i < m {
                while 2 * done + 32 <= k {
                    // SAFETY: row i holds k contiguous values from its start; 16 pairs out.
                    unsafe { super::x86::round_into((ptr as *const f32).offset(i as isize * line).add(2 * done), chunk(done).as_mut_ptr()) };
                    done += PAIRS;
                }
                if 2 * done < k {
                    // SAFETY: as above, the row's last k - 2 done values.
                    unsafe { super::x86::round_part_into((ptr as *const f32).offset(i as isize * line).add(2 * done), k - 2 * done, chunk(done).as_mut_ptr()) };
                    done += PAIRS;
                }
            }
            for q0 in (done..stride).step_by(PAIRS) {
                for (q, o) in (q0..).zip(chunk(q0)) {
                    *o = if i < m && 2 * q < k { pair(value(i, 2 * q), value(i, 2 * q + 1)) } else { 0 };
                }
            }
        }
    };
    // SAFETY: every group of rows is written in full.
    let data = unsafe {
        Words::written(len, |out| fill_chunks(out, GROUP * stride, parallel, group))
    };
    Packed { data, lines: m, k, width: ROWS, layout: Layout::Rows }
}

/// [`pack_rows`] for `m` contiguous rows of `k` bf16 values (`k` even) given as their words:
/// each row's words copied into the tiles as they are. bf16 activations under mixed
/// precision, which a layer widened to f32 for [`pack_rows`] to round back.
pub(super) fn pack_bf16_rows(words: &[u32], m: usize, k: usize, parallel: bool) -> Packed {
    const GROUP: usize = 16;
    assert!(k.is_multiple_of(2) && words.len() == m * k / 2, "{m} rows of {k} bf16 values as words");
    let (kp, stride) = (k / 2, row_stride(k));
    let group = |(g, out): (usize, &mut [MaybeUninit<u32>])| {
        for t in 0..GROUP {
            let i = g * GROUP + t;
            for q0 in (0..stride).step_by(PAIRS) {
                // Row t's pairs q0 .. q0 + 16, in the tile of pairs q0 (see `at`).
                let dst = &mut out[q0 * 16 + t * PAIRS..][..PAIRS];
                let have = if i < m { PAIRS.min(kp.saturating_sub(q0)) } else { 0 };
                if have > 0 {
                    dst[..have].iter_mut().zip(&words[i * kp + q0..][..have]).for_each(|(d, w)| {
                        d.write(*w);
                    });
                }
                dst[have..].iter_mut().for_each(|d| {
                    d.write(0);
                });
            }
        }
    };
    // SAFETY: every group of rows is written in full.
    let data = unsafe { Words::written(m.next_multiple_of(ROWS) * stride, |out| fill_chunks(out, GROUP * stride, parallel, group)) };
    Packed { data, lines: m, k, width: ROWS, layout: Layout::Rows }
}

/// The pieces of part `part` of `parts` of panel `p` of a right operand whose lines lie as
/// rows of words (pairs along `k`): line `l`'s group `t` of `groups` is row `l * groups + t`,
/// rows `pitch` words apart, of which the first `len` (a multiple of 16) are packed, each
/// group to `[len, NR]` pairs of its own, one after the other (a convolution's 9 taps; a
/// linear layer's weight is one group). Each piece is 16 lines by one group by a run of 16
/// words, as (its first row's first word, the lines present, where it goes). The parts make
/// the whole panel.
fn panel_pieces(lines: usize, (pitch, len): (usize, usize), groups: usize, p: usize, (part, parts): (usize, usize)) -> impl Iterator<Item = (usize, usize, usize)> {
    let runs = len / PAIRS;
    let pieces = NR / 16 * groups * runs;
    (part * pieces / parts..(part + 1) * pieces / parts).map(move |piece| {
        let (half, t, q0) = (piece / (groups * runs), piece / runs % groups, piece % runs * PAIRS);
        let l0 = p * NR + half * 16;
        ((l0 * groups + t) * pitch + q0, lines.saturating_sub(l0).min(16), t * len * NR + q0 * NR + half * 16)
    })
}

/// Part `part` of `parts` of panel `p` ([`panel_pieces`]) from `rows` into `out`, each piece a
/// 16 x 16 transpose of words, zeros past the last line.
///
/// SAFETY: AVX-512 runs; `rows` holds `lines * groups` rows `pitch` words apart, each `len`
/// words (a multiple of 16) from its start; `out` holds `groups * len * NR` words.
pub(super) unsafe fn pack_panel(rows: &[u32], lines: usize, run: (usize, usize), groups: usize, p: usize, out: *mut u32, part: (usize, usize)) {
    debug_assert!(run.1.is_multiple_of(PAIRS) && rows.len() >= (lines * groups - 1) * run.0 + run.1);
    for (at, count, to) in panel_pieces(lines, run, groups, p, part) {
        // SAFETY: rows at + j * groups * pitch, j < count, hold 16 words; `out` 16 rows of NR
        // from `to`.
        unsafe { super::x86::transposed_words(rows.as_ptr().wrapping_add(at), groups * run.0, count, out.add(to), NR) };
    }
}

/// Asks for the words that [`pack_panel`] reads for this part to be brought into L2.
pub(super) fn fetch_panel(rows: &[u32], lines: usize, run: (usize, usize), groups: usize, p: usize, part: (usize, usize)) {
    for (at, count, _) in panel_pieces(lines, run, groups, p, part) {
        for j in 0..count {
            let row = at + j * groups * run.0;
            super::x86::prefetch(&rows[row..row + PAIRS]);
        }
    }
}

/// Bytes of the left operand's part that [`product_of_rows`] sums over at a time, all its rows:
/// it stays in L2 while the task's panels go by.
const LEFT_PART_BYTES: usize = 1 << 20;

/// [`product`] with the right operand `W^T` of a `[n, k]` bf16 weight given as its rows of
/// words (`rows`; `k` a multiple of 32), packed as it goes and never whole: along `k` a part
/// at a time (all the left operand's rows of it in L2), each panel's part packed once, the
/// sums of each block accumulated in the destination across parts. Row-major destination
/// (`rs` values a row).
///
/// SAFETY: as [`super::product_packed`], on a CPU where [`available`] holds.
pub(super) unsafe fn product_of_rows(lhs: &Packed, rows: &[u32], n: usize, dst: *mut f32, rs: usize, accumulate: bool, parallel: bool) {
    assert!(lhs.layout == Layout::Rows && lhs.k.is_multiple_of(32) && rows.len() == n * lhs.k / 2, "a left operand as rows and a [{n}, {}] weight's rows", lhs.k);
    let (m, kp) = (lhs.lines, lhs.k / 2);
    if m == 0 || n == 0 {
        return;
    }
    let part = (LEFT_PART_BYTES / (size_of::<u32>() * m.next_multiple_of(ROWS)) / PAIRS * PAIRS).clamp(4 * PAIRS, kp);
    let (blocks, dst) = (m.div_ceil(ROWS), dst as usize);
    in_tasks(1, n.div_ceil(NR), parallel, |_, panels| {
        let mut sums = OnLines([0f32; ROWS * NR]);
        // SAFETY: written in full by `pack_panel` before the tiles read it.
        let mut panel = unsafe { Words::uninit(part * NR) };
        let b = panel.uninit_mut().as_mut_ptr().cast::<u32>();
        // SAFETY: AMX is available; the tiles are configured before use and released after.
        unsafe { x86::configure() };
        for q0 in (0..kp).step_by(part) {
            let len = part.min(kp - q0);
            for p in panels.clone() {
                // SAFETY: AVX-512 runs; `rows` from word q0 holds each line's next `len` words.
                unsafe { pack_panel(&rows[q0..], n, (kp, len), 1, p, b, (0, 1)) };
                for block in 0..blocks {
                    let (i0, j0) = (block * ROWS, p * NR);
                    let at = (dst as *mut f32).wrapping_add(i0 * rs + j0);
                    let valid = (ROWS.min(m - i0), NR.min(n - j0));
                    // The first part writes (or adds to) the destination, the others add.
                    let adds = accumulate || q0 > 0;
                    let in_place = valid == (ROWS, NR);
                    let sums_at = if in_place { Sums::InPlace { at, rs, accumulate: adds } } else { Sums::Apart(sums.0.as_mut_ptr()) };
                    // SAFETY: the block's left tiles from pair q0 (rows of kp pairs in tiles), the
                    // panel's `len` rows of NR pairs; a whole block in place is this task's.
                    unsafe { x86::block(lhs.data[block * ROWS * kp + q0 * 16..].as_ptr(), kp, b, len, None, sums_at) };
                    if !in_place {
                        // SAFETY: the valid part is within the caller's destination, and this task's.
                        unsafe { store(&sums.0, at, rs, 1, valid, adds, 1.0) };
                    }
                }
            }
        }
        // SAFETY: AMX is available.
        unsafe { x86::release() };
    });
}

/// [`super::product_packed`] for a left operand packed as rows ([`pack_rows`]).
///
/// SAFETY: as [`super::product_packed`], on a CPU where [`available`] holds.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(lhs: &Packed, rhs: &Packed, dst: *mut f32, rs: usize, cs: usize, accumulate: bool, beta: f32, parallel: bool) {
    assert!(lhs.layout == Layout::Rows && rhs.layout == Layout::Pairs && rhs.width == NR && lhs.k == rhs.k, "a left operand as rows and a right one as pairs, of the same length");
    let (m, n, kp, stride) = (lhs.lines, rhs.lines, lhs.k.div_ceil(2), row_stride(lhs.k));
    if m == 0 || n == 0 {
        return;
    }
    let (full, dst) = (kp / PAIRS * PAIRS, dst as usize);
    in_tasks(m.div_ceil(ROWS * BLOCKS_PER_TASK), rhs.panels(), parallel, |rows, panels| {
        let blocks = rows * BLOCKS_PER_TASK..((rows + 1) * BLOCKS_PER_TASK).min(m.div_ceil(ROWS));
        // The last pairs of a panel, short of a tile, with zeros after them: the tile reads 16.
        let mut tail = OnLines([0u32; PAIRS * NR]);
        let mut sums = OnLines([0f32; ROWS * NR]);
        // SAFETY: AMX is available; the tiles are configured before use and released after.
        unsafe { x86::configure() };
        for p in panels {
            let b = rhs.panel(p, 0, kp);
            tail.0[..(kp - full) * NR].copy_from_slice(&b[full * NR..]);
            for block in blocks.clone() {
                let a = &lhs.data[block * ROWS * stride..][..ROWS * stride];
                let (i0, j0) = (block * ROWS, p * NR);
                let at = (dst as *mut f32).wrapping_add(i0 * rs + j0 * cs);
                let valid = (ROWS.min(m - i0), NR.min(n - j0));
                // A whole block of a row-major destination, unscaled, is summed in place: its
                // tiles start from the destination (or zeros) and are stored back, no copy.
                let in_place = valid == (ROWS, NR) && cs == 1 && beta == 1.0;
                let sums_at = if in_place { Sums::InPlace { at, rs, accumulate } } else { Sums::Apart(sums.0.as_mut_ptr()) };
                // SAFETY: `a` holds ROWS rows of `stride` pairs in tiles, `b` kp rows of NR
                // pairs, the tail PAIRS rows; a whole block in place is the caller's and this
                // task's alone.
                unsafe { x86::block(a.as_ptr(), stride, b.as_ptr(), full, (full < kp).then_some(tail.0.as_ptr()), sums_at) };
                if !in_place {
                    // SAFETY: the valid part is within the caller's destination, and this task's.
                    unsafe { store(&sums.0, at, rs, cs, valid, accumulate, beta) };
                }
            }
        }
        // SAFETY: AMX is available.
        unsafe { x86::release() };
    });
}

/// Where a block's sums go.
#[derive(Clone, Copy)]
enum Sums {
    /// A row-major `[ROWS, NR]` buffer.
    Apart(*mut f32),
    /// Onto (or, without `accumulate`, into) the destination's whole block at `at`, rows
    /// `rs` apart.
    InPlace { at: *mut f32, rs: usize, accumulate: bool },
}

/// A block's `[ROWS, NR]` sums, scaled by `beta`, into (or onto) the destination's valid part.
///
/// SAFETY: `at` is valid for `valid` rows and columns at strides `rs` and `cs`; the CPU has
/// AVX-512 (the loops are compiled for it: 4x SSE's width).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn store(sums: &[f32; ROWS * NR], at: *mut f32, rs: usize, cs: usize, (rows, cols): (usize, usize), accumulate: bool, beta: f32) {
    for (r, row) in sums.chunks_exact(NR).enumerate().take(rows) {
        if cs == 1 {
            // SAFETY: row r of the destination holds `cols` values from `at + r * rs`.
            let out = unsafe { std::slice::from_raw_parts_mut(at.add(r * rs), cols) };
            if accumulate {
                out.iter_mut().zip(row).for_each(|(o, s)| *o += beta * s);
            } else {
                out.iter_mut().zip(row).for_each(|(o, s)| *o = beta * s);
            }
            continue;
        }
        for (j, s) in row.iter().enumerate().take(cols) {
            // SAFETY: (r, j) is within the valid part.
            unsafe {
                let p = at.add(r * rs + j * cs);
                *p = if accumulate { *p + beta * s } else { beta * s };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    use super::{NR, PAIRS, Sums};

    /// Every tile 16 rows of 64 bytes: two left tiles (16 rows x 32 bf16), two right ones (16
    /// pairs of rows x 16 columns), four of sums (16 x 16 f32).
    ///
    /// SAFETY: AMX is available (the permission granted).
    pub(super) unsafe fn configure() {
        let mut config = [0u8; 64];
        // Palette 1; bytes 16.. the bytes per row of each tile, 48.. its rows.
        config[0] = 1;
        for t in 0..8 {
            config[16 + 2 * t] = 64;
            config[48 + t] = 16;
        }
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.as_ptr(), options(nostack, readonly)) };
    }

    /// Gives the tile state back, so that switching threads does not save and restore it.
    ///
    /// SAFETY: AMX is available.
    pub(super) unsafe fn release() {
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// The `[32, NR]` sums of 32 packed rows (`a`, in tiles of 16 x 16 pairs) and a right panel
    /// (`b`, `NR` pairs a row): its first `full` pairs from `b`, then, with `tail`, 16 more
    /// from there, to `sums`.
    ///
    /// SAFETY: tiles configured by [`configure`]; `a` holds 32 rows of at least `full + 16`
    /// pairs (with a tail) or `full`; `b` `full` rows of NR pairs; `tail` 16; `sums` 32 x NR
    /// values at its strides.
    pub(super) unsafe fn block(a: *const u32, stride: usize, b: *const u32, full: usize, tail: Option<*const u32>, sums: Sums) {
        let (c, sc) = match sums {
            Sums::Apart(c) => (c, NR),
            Sums::InPlace { at, rs, .. } => (at, rs),
        };
        unsafe {
            if let Sums::InPlace { accumulate: true, .. } = sums {
                load_sums(c, sc);
            } else {
                zero_sums();
            }
            // The block's two left tiles lie 16 rows of `stride` pairs apart, each row 16 pairs.
            for q in (0..full).step_by(PAIRS) {
                step(a.add(q * 16), a.add(q * 16 + 16 * stride), PAIRS, b.add(q * NR), NR);
            }
            if let Some(tail) = tail {
                step(a.add(full * 16), a.add(full * 16 + 16 * stride), PAIRS, tail, NR);
            }
            store_sums(c, sc);
        }
    }

    /// One step of 16 pairs: the sums' four tiles (rows 0..16 and 16..32 by columns 0..16 and
    /// 16..32) += the left tiles at `a0` and `a1` (rows 0..16 and 16..32, their rows `sa`
    /// pairs apart) times the right tiles at `b` and `b + 16`, their rows `sb` pairs apart.
    ///
    /// Each load comes just before the first product that reads it: tiles are not renamed,
    /// so a load waits for the products reading the tile before, and four loads first held
    /// up every product behind the last of them (1-5% slower, kernel and convolution alike).
    ///
    /// SAFETY: tiles configured by [`configure`]; `a0` and `a1` hold 16 rows of 16 pairs `sa`
    /// apart each, `b` 16 rows of 32 pairs `sb` apart.
    #[inline(always)]
    unsafe fn step(a0: *const u32, a1: *const u32, sa: usize, b: *const u32, sb: usize) {
        unsafe {
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b,
                b1 = in(reg) b.add(16),
                sa = in(reg) sa * 4,
                sb = in(reg) sb * 4,
                options(nostack, readonly),
            )
        }
    }

    /// The four tiles of sums from `c`, its rows `sc` values apart.
    ///
    /// SAFETY: `c` holds 32 rows of 32 values `sc` apart.
    #[inline(always)]
    unsafe fn load_sums(c: *const f32, sc: usize) {
        unsafe {
            asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) c,
                c1 = in(reg) c.add(16),
                c2 = in(reg) c.add(16 * sc),
                c3 = in(reg) c.add(16 * sc + 16),
                s = in(reg) sc * 4,
                options(nostack, readonly),
            )
        }
    }

    #[inline(always)]
    unsafe fn zero_sums() {
        unsafe { asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem)) };
    }

    /// The four tiles of sums to `c`, its rows `sc` values apart.
    ///
    /// SAFETY: `c` holds 32 rows of 32 values `sc` apart.
    #[inline(always)]
    unsafe fn store_sums(c: *mut f32, sc: usize) {
        unsafe {
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) c,
                c1 = in(reg) c.add(16),
                c2 = in(reg) c.add(16 * sc),
                c3 = in(reg) c.add(16 * sc + 16),
                s = in(reg) sc * 4,
                options(nostack),
            )
        }
    }

    /// The `[32, NR]` sums (row-major) of 32 positions and NR output channels of a convolution
    /// (`super::conv`): for each tap `t`, the input's 32 positions from `a + offsets[t]` (rows
    /// of `stride` pairs, one a position) times the tap's right panel at `b[t]` (NR pairs a row).
    ///
    /// SAFETY: tiles configured by [`configure`]; the input holds 32 rows of `stride` pairs
    /// from `a + offsets[t]` for every tap; each `b[t]` `stride` rows of NR pairs.
    pub(super) unsafe fn conv_block(a: *const u32, stride: usize, offsets: &[isize; 9], b: &[*const u32; 9], sums: *mut f32) {
        unsafe {
            zero_sums();
            // Pairs outer, taps inner: the 9 taps read the same 16 pairs of neighbouring
            // positions, which stay in L1 across them.
            for q in (0..stride).step_by(PAIRS) {
                for (b, &offset) in b.iter().zip(offsets) {
                    let a = a.offset(offset).add(q);
                    step(a, a.add(16 * stride), stride, b.add(q * NR), NR);
                }
            }
            store_sums(sums, NR);
        }
    }
}
