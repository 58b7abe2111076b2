//! A weight `[rows, cols]` as f32 `[cols, rows]`, widened from half precision and transposed
//! in one pass. gemm multiplies `x W^T` with a row-major `[out, in]` weight by repacking the
//! weight into panels on each call, and that repacking is slow when `in` is the wider side:
//! SDXL's feed-forward output `[1280, 5120]` at 256 rows took 25 ms a product on a Zen 4,
//! 16 ms with the weight transposed first, which costs 1.3 ms here (16 x 16 tiles in AVX-512
//! registers, on every thread).
use std::cell::RefCell;
use std::mem::MaybeUninit;

use burn::backend::flex::FlexTensor;
use burn::tensor::DType;
use rayon::prelude::*;

use super::matrix::min_len;

/// A tile's side.
const TILE: usize = 16;

/// The stored values of a weight.
#[derive(Clone, Copy)]
enum Source<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
}

impl Source<'_> {
    fn at(self, i: usize) -> f32 {
        match self {
            Source::F32(s) => s[i],
            Source::F16(s) => half::f16::from_bits(s[i]).to_f32(),
            Source::Bf16(s) => f32::from_bits(u32::from(s[i]) << 16),
        }
    }
}

thread_local! {
    /// The calling thread's buffer for transposed weights, kept between calls. With a fresh
    /// one each call (26 MiB for SDXL's feed-forward output) the same product took 18.5 ms
    /// from an f16 weight and 30 ms from an f32 one in one bench process; kept, 18-21 ms both.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` of `t` `[rows, cols]` (f32, f16 or bf16, any layout) as f32 `[cols, rows]`, contiguous
/// and starting a cache line (gemm reads it in place); `None`, without calling `f`, for other
/// dtypes. The values live in the thread's buffer until `f` returns (a fresh one when `f`
/// itself reaches here again on this thread).
pub(crate) fn with_widened_transposed<R>(t: &FlexTensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    use half::slice::HalfFloatSliceExt;
    let t = t.to_contiguous();
    let [rows, cols] = t.layout().shape().dims::<2>();
    let source = match t.dtype() {
        DType::F32 => Source::F32(t.as_slice::<f32>().expect("contiguous")),
        DType::F16 => Source::F16(t.as_slice::<half::f16>().expect("contiguous").reinterpret_cast()),
        DType::BF16 => Source::Bf16(t.as_slice::<half::bf16>().expect("contiguous").reinterpret_cast()),
        _ => return None,
    };
    let run = |buf: &mut Vec<f32>| {
        const LINE: usize = 64 / size_of::<f32>();
        let n = rows * cols;
        buf.clear();
        buf.reserve(n + LINE - 1);
        let at = buf.as_ptr().align_offset(64).min(LINE - 1);
        let values = &mut buf.spare_capacity_mut()[at..at + n];
        transpose(source, rows, cols, values);
        // SAFETY: `transpose` wrote all n values.
        f(unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<f32>(), n) })
    };
    Some(SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buf) => run(&mut buf),
        Err(_) => run(&mut Vec::new()),
    }))
}

/// `out` `[cols, rows]` from `src` `[rows, cols]`, in bands of 16 output rows, one band a task.
fn transpose(src: Source, rows: usize, cols: usize, out: &mut [MaybeUninit<f32>]) {
    if rows == 0 || cols == 0 {
        return;
    }
    out.par_chunks_mut(TILE * rows).with_min_len(min_len(rows * cols >= 1 << 16)).enumerate().for_each(|(band, dst)| {
        let c0 = band * TILE;
        let width = (cols - c0).min(TILE);
        let mut r0 = 0;
        #[cfg(target_arch = "x86_64")]
        if width == TILE && super::lanes::isa() == super::lanes::Isa::Avx512 {
            while r0 + TILE <= rows {
                // SAFETY: the CPU has AVX-512F; the tile's 16 source rows from (r0, c0) and 16
                // destination rows from column r0 of this band lie within the slices.
                unsafe { tile_avx512(src, r0 * cols + c0, cols, dst[r0..].as_mut_ptr().cast(), rows) };
                r0 += TILE;
            }
        }
        for j in 0..width {
            for r in r0..rows {
                dst[j * rows + r].write(src.at(r * cols + c0 + j));
            }
        }
    });
}

/// Transposes the 16 x 16 tile of `src` at `at` (row stride `src_rs`) into `dst` (row stride
/// `dst_rs`): unpacks of 32-bit, then 64-bit pairs, then two rounds of 128-bit lane shuffles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(src: Source, at: usize, src_rs: usize, dst: *mut f32, dst_rs: usize) {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_ps(); TILE];
    for (i, row) in r.iter_mut().enumerate() {
        let p = at + i * src_rs;
        // SAFETY (all three): the caller vouches that 16 values from `p` lie in the slice.
        *row = unsafe {
            match src {
                Source::F32(s) => _mm512_loadu_ps(s[p..p + TILE].as_ptr()),
                Source::F16(s) => _mm512_cvtph_ps(_mm256_loadu_si256(s[p..p + TILE].as_ptr().cast())),
                Source::Bf16(s) => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(s[p..p + TILE].as_ptr().cast())))),
            }
        };
    }
    let mut t = [_mm512_setzero_ps(); TILE];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let pd = _mm512_castps_pd;
    for i in 0..4 {
        for j in 0..2 {
            let (a, b) = (t[4 * i + j], t[4 * i + j + 2]);
            r[4 * i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(b)));
            r[4 * i + j + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(b)));
        }
    }
    for i in 0..2 {
        for j in 0..4 {
            let (a, b) = (r[8 * i + j], r[8 * i + j + 4]);
            t[8 * i + j] = _mm512_shuffle_f32x4::<0x88>(a, b);
            t[8 * i + j + 4] = _mm512_shuffle_f32x4::<0xdd>(a, b);
        }
    }
    for j in 0..8 {
        let (a, b) = (t[j], t[j + 8]);
        r[j] = _mm512_shuffle_f32x4::<0x88>(a, b);
        r[j + 8] = _mm512_shuffle_f32x4::<0xdd>(a, b);
    }
    // The unpacks leave source columns 1 and 2 of each group of four swapped.
    for (i, v) in r.iter().enumerate() {
        let column = match i % 4 {
            1 => i + 1,
            2 => i - 1,
            _ => i,
        };
        // SAFETY: the caller vouches for 16 rows of 16 values at `dst_rs`.
        unsafe { _mm512_storeu_ps(dst.add(column * dst_rs), *v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;
    use crate::{Init, Tensor, cpu};
    use burn::backend::Flex;

    /// Shapes on and off the tile (whole tiles, edges in both directions, a single row and
    /// column, empty), f32, f16 and bf16, from contiguous and transposed views: bit for bit
    /// burn's transpose and cast.
    #[test]
    fn equals_burns_transpose_and_cast() {
        let mut init = Init::new(4);
        for [rows, cols] in [[32, 48], [19, 50], [1, 37], [37, 1], [5, 3], [0, 4], [130, 257]] {
            let x: Tensor<2> = init.normal([rows, cols], 3.0, &cpu());
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for view in [x.clone().cast(dtype), x.clone().transpose().cast(dtype).transpose()] {
                    let want = values(view.clone().cast(DType::F32).transpose());
                    let same = with_widened_transposed(&view.try_into_primitive::<Flex>().unwrap(), |got| {
                        assert_eq!(got.as_ptr() as usize % 64, 0);
                        got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits())
                    });
                    assert_eq!(same, Some(true), "[{rows}, {cols}] {dtype:?}");
                }
            }
        }
    }
}
