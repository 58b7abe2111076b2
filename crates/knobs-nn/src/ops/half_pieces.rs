//! f32 kernels on half-precision tensors a piece at a time. Under mixed precision an op that
//! computes in f32 widened its whole f16 / bf16 input into a new tensor, kept that f32 copy
//! for its backward pass, and narrowed its whole f32 output into another: two passes over
//! memory and a kept tensor twice the size. Here each parallel piece is widened into a
//! scratch buffer that stays in cache, computed, and narrowed as it is written; the op keeps
//! its input as it came. The values are those of the whole-tensor casts (widening is exact,
//! and each output value is rounded once, to nearest even, either way).
use std::mem::MaybeUninit;
use std::ops::Range;

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Shape, TensorData};
use rayon::prelude::*;

use super::fresh::written;
use super::precision::{narrow_block, widen_block};

/// A contiguous tensor's values, read as f32 a range at a time.
#[derive(Clone, Copy)]
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    /// f16 or bf16 (`bf16`) values' bits.
    Half(&'a [u16], bool),
}

impl<'a> Values<'a> {
    /// `t`'s values, for a contiguous f32, f16 or bf16 tensor; `None` otherwise.
    pub(crate) fn of(t: &'a FlexTensor) -> Option<Values<'a>> {
        use half::slice::HalfFloatSliceExt;
        match t.dtype() {
            DType::F32 => t.as_slice::<f32>().map(Values::F32),
            DType::BF16 => t.as_slice::<half::bf16>().map(|s| Values::Half(s.reinterpret_cast(), true)),
            DType::F16 => t.as_slice::<half::f16>().map(|s| Values::Half(s.reinterpret_cast(), false)),
            _ => None,
        }
    }

    /// Values `range` in f32: borrowed, or widened into `scratch`.
    pub(crate) fn f32s<'b>(&'b self, range: Range<usize>, scratch: &'b mut Vec<f32>) -> &'b [f32] {
        match *self {
            Values::F32(v) => &v[range],
            Values::Half(bits, bf16) => {
                let n = range.len();
                scratch.clear();
                scratch.reserve(n);
                widen_block(&bits[range], bf16, &mut scratch.spare_capacity_mut()[..n]);
                // SAFETY: `widen_block` wrote the first n values.
                unsafe { scratch.set_len(n) };
                scratch
            }
        }
    }
}

/// Scratch rows for [`filled`]'s pieces: one for each input widened by [`Values::f32s`].
pub(crate) type Scratch = (Vec<f32>, Vec<f32>);

/// A new tensor of `shape` in `dtype` (f32, f16 or bf16) whose values `fill(start, out,
/// scratch)` writes in f32, in parallel pieces of `piece` values (`start` is the piece's
/// first value; the last piece may be shorter). A half-precision output is written to an f32
/// buffer a piece long and narrowed from there. Pieces are fixed by `piece`, so results do
/// not depend on the thread count.
pub(crate) fn filled(shape: Shape, dtype: DType, piece: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>], &mut Scratch) + Sync) -> FlexTensor {
    let pieces = shape.num_elements().div_ceil(piece.max(1));
    filled_beside(shape, dtype, piece, (&mut vec![(); pieces], 1), |start, out, _, scratch| fill(start, out, scratch))
}

/// [`filled`], each piece also given its own part of `side` (`side.1` values of `side.0`
/// each, one part a piece): a second output, such as a norm's statistics per row.
pub(crate) fn filled_beside<S: Send>(shape: Shape, dtype: DType, piece: usize, side: (&mut [S], usize), fill: impl Fn(usize, &mut [MaybeUninit<f32>], &mut [S], &mut Scratch) + Sync) -> FlexTensor {
    let n = shape.num_elements();
    let piece = piece.max(1);
    assert_eq!(side.0.len().div_ceil(side.1.max(1)), n.div_ceil(piece), "a part of `side` for every piece");
    let sides = side.0.par_chunks_mut(side.1.max(1));
    let scratch = || (Scratch::default(), Vec::<f32>::new());
    match dtype {
        // SAFETY (both arms): `fill` writes every value of its piece (its contract), and the
        // pieces cover all n.
        DType::F32 => {
            let out = unsafe {
                written(n, |out: &mut [MaybeUninit<f32>]| {
                    out.par_chunks_mut(piece).zip(sides).enumerate().for_each_init(scratch, |(s, _), (i, (out, side))| fill(i * piece, out, side, s))
                })
            };
            FlexTensor::from_data(TensorData::new(out, shape))
        }
        DType::BF16 | DType::F16 => {
            let bf16 = dtype == DType::BF16;
            let bits = unsafe {
                written(n, |out: &mut [MaybeUninit<u16>]| {
                    out.par_chunks_mut(piece).zip(sides).enumerate().for_each_init(scratch, |(s, wide), (i, (out, side))| {
                        let len = out.len();
                        wide.clear();
                        wide.reserve(len);
                        fill(i * piece, &mut wide.spare_capacity_mut()[..len], side, s);
                        // `fill` wrote the piece's len values (under the block's SAFETY).
                        wide.set_len(len);
                        narrow_block(wide, bf16, out);
                    })
                })
            };
            half_tensor(bits, bf16, shape)
        }
        other => panic!("filled: {other:?} is not f32, f16 or bf16"),
    }
}

/// Half-precision bits as a tensor of f16 or bf16 (`bf16`).
fn half_tensor(bits: Vec<u16>, bf16: bool, shape: Shape) -> FlexTensor {
    // A Vec<u16> and a Vec of either half type share layout (each a transparent u16), so the
    // bits change type without a copy.
    let mut bits = std::mem::ManuallyDrop::new(bits);
    let (ptr, len, cap) = (bits.as_mut_ptr(), bits.len(), bits.capacity());
    // SAFETY: same size and alignment as u16; the original vector is not dropped.
    let data = unsafe {
        if bf16 {
            TensorData::new(Vec::from_raw_parts(ptr.cast::<half::bf16>(), len, cap), shape)
        } else {
            TensorData::new(Vec::from_raw_parts(ptr.cast::<half::f16>(), len, cap), shape)
        }
    };
    FlexTensor::from_data(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: &[f32], dtype: DType) -> FlexTensor {
        let data = TensorData::new(values.to_vec(), [values.len()]);
        FlexTensor::from_data(super::super::precision::data_as(data, dtype))
    }

    /// Every piece, the last one short, read and written in each dtype: the values are the
    /// whole-tensor casts' (an identity `fill` gives back the input exactly), independent of
    /// the piece size.
    #[test]
    fn pieces_read_and_write_as_the_whole_tensor_casts() {
        let values: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 1e3 + 1e-40 * (i % 3) as f32).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let input = tensor(&values, dtype);
            let read = Values::of(&input).unwrap();
            for piece in [1, 7, 64, 1000, 4096] {
                let out = filled(Shape::new([values.len()]), dtype, piece, |start, out, (s, _)| {
                    let v = read.f32s(start..start + out.len(), s);
                    out.iter_mut().zip(v).for_each(|(o, v)| {
                        o.write(*v);
                    });
                });
                assert_eq!(out.dtype(), dtype);
                assert!(out.into_data().as_bytes() == input.clone().into_data().as_bytes(), "{dtype:?}, piece {piece}");
            }
            // f32 values narrowed into a half tensor round as the cast does.
            let wide = Values::F32(&values);
            let out = filled(Shape::new([values.len()]), dtype, 64, |start, out, (s, _)| {
                let n = out.len();
                out.iter_mut().zip(wide.f32s(start..start + n, s)).for_each(|(o, v)| {
                    o.write(*v);
                });
            });
            assert!(out.into_data().as_bytes() == input.into_data().as_bytes(), "{dtype:?} narrowed");
        }
    }
}
