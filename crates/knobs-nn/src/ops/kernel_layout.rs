//! Frozen 3x3 kernels stored by tap: the values of a `[co, ci, 3, 3]` weight laid out as
//! `[co][3][3][ci]`, so that a tap's input channels lie side by side. The tensor keeps its
//! shape; only the strides say where each value lies, so every other op reads it as before
//! (burn's ops copy a strided tensor where they need a contiguous one).
//!
//! Why: AMX's convolution reads each tap as pairs of input channels by 16 output channels.
//! From the standard layout those pairs lie 9 values apart and take gathers; packed once and
//! kept, they cost a second copy of every large kernel (1.1 GB for SD-1.5's UNet in bf16,
//! which generation held beside the weights). Laid out by tap, a tap's 16 output channels are
//! 16 runs of 16 words (pairs of channels) that one transpose in registers packs, cheaply
//! enough for the kernel to pack each panel of output channels as it reaches it
//! (`conv_amx::Taps::ByTap`) and keep nothing.
use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::bf16_product;
use super::words::pairs;
use crate::param::like;

/// Kernels with fewer input times output channels keep the standard layout and their kept
/// packing: small, and run on large planes where a packing made per range of positions would
/// be made many times over (SD-1.5's 320-channel ones: 1.8 MB each).
const MIN_CHANNELS_PRODUCT: usize = 640 * 640;

/// `w` (a frozen bf16 `[co, ci, 3, 3]` weight on the CPU backend) laid out by tap, where AMX's
/// convolution runs it and reads that layout (`ci` a multiple of 32, large enough); `None`
/// where not, or where it already is. Autodiff association and checkpointing are kept.
pub fn by_tap(w: &Tensor<4>) -> Option<Tensor<4>> {
    if !applies(w.dims(), w.dtype()) || w.is_require_grad() {
        return None;
    }
    let stored = super::cpu_storage(w)?;
    if rows(&stored).is_some() {
        return None;
    }
    from_data(stored.into_data(), &w.device()).ok().map(|laid| like(w, laid))
}

/// Whether `w` is laid out by tap ([`by_tap`]).
pub fn is_by_tap(w: &Tensor<4>) -> bool {
    super::cpu_storage(w).is_some_and(|stored| rows(&stored).is_some())
}

/// The weight `data` (`[co, ci, 3, 3]`) as a plain tensor on `device` laid out by tap, its
/// values moved in place (a model loading allocates each kernel once); `data` back where the
/// layout does not apply ([`by_tap`]'s conditions, the device the CPU backend).
pub(crate) fn from_data(mut data: TensorData, device: &burn::tensor::Device) -> Result<Tensor<4>, TensorData> {
    let Ok(dims) = <[usize; 4]>::try_from(data.shape().as_slice()) else { return Err(data) };
    if !applies(dims, data.dtype()) || !super::on_cpu(&Tensor::<1>::empty([0], device)) {
        return Err(data);
    }
    let [co, ci, kh, kw] = dims;
    let Ok(values) = data.as_mut_slice::<half::bf16>() else { return Err(data) };
    // One output channel a task: its 9 x ci values copied aside, then its 9 runs of ci written
    // front to back from values 9 apart.
    values.par_chunks_mut(9 * ci).for_each_init(
        || vec![half::bf16::ZERO; 9 * ci],
        |aside, block| {
            aside.copy_from_slice(block);
            for (t, run) in block.chunks_exact_mut(ci).enumerate() {
                for (o, &v) in run.iter_mut().zip(aside[t..].iter().step_by(9)) {
                    *o = v;
                }
            }
        },
    );
    let by_tap = FlexTensor::from_data(TensorData::from_bytes(data.into_bytes(), [co, kh, kw, ci], DType::BF16)).permute(&[0, 3, 1, 2]);
    debug_assert!(rows(&by_tap).is_some());
    Ok(Tensor::from_primitive::<Flex>(by_tap))
}

/// Whether a weight of these dims and dtype is laid out by tap where frozen.
fn applies([co, ci, kh, kw]: [usize; 4], dtype: DType) -> bool {
    dtype == DType::BF16 && (kh, kw) == (3, 3) && ci.is_multiple_of(32) && co * ci >= MIN_CHANNELS_PRODUCT && bf16_product::conv3x3_runs(ci, co)
}

/// The words (pairs of input channels) of a weight laid out by tap ([`by_tap`]): row `o * 9 +
/// t` holds tap `t` of output channel `o`, `ci / 2` words; `None` for any other tensor.
pub(super) fn rows(w: &FlexTensor) -> Option<&[u32]> {
    let layout = w.layout();
    let &[co, ci, 3, 3] = layout.shape().as_slice() else { return None };
    let strides = [9 * ci, 1, 3 * ci, ci].map(|s| s as isize);
    if w.dtype() != DType::BF16 || layout.strides() != strides || layout.start_offset() != 0 || !ci.is_multiple_of(2) {
        return None;
    }
    pairs(w.storage::<half::bf16>().get(..co * ci * 9)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu;
    use burn::tensor::Distribution;

    /// Laid out by tap, a weight holds the same values (as data, and through burn's ops), and
    /// its rows are the taps' runs of input channels.
    #[test]
    fn a_weight_laid_out_by_tap_keeps_its_values() {
        if !bf16_product::conv3x3_runs(64, 64) {
            eprintln!("skipped: this CPU runs no AMX convolution");
            return;
        }
        let (co, ci) = (640, 672);
        let w = Tensor::<4>::random([co, ci, 3, 3], Distribution::Normal(0.0, 1.0), &cpu()).cast(DType::BF16);
        let laid = by_tap(&w).expect("a frozen bf16 640 x 672 kernel is laid out by tap");
        assert_eq!(laid.dims(), w.dims());
        assert_eq!(laid.to_data(), w.to_data(), "the same values");
        assert!((laid.clone() * 2.0).to_data() == (w.clone() * 2.0).to_data(), "burn's ops read them");
        assert!(by_tap(&laid).is_none(), "laid out once");
        let flex = laid.clone().try_into_primitive::<Flex>().unwrap();
        let words = rows(&flex).expect("its rows");
        let values = w.to_data().try_into_vec::<half::bf16>().unwrap();
        for (o, t, i) in [(0, 0, 0), (3, 4, 10), (co - 1, 8, ci - 2)] {
            let word = words[(o * 9 + t) * ci / 2 + i / 2];
            let pair = [values[(o * ci + i) * 9 + t], values[(o * ci + i + 1) * 9 + t]].map(|v| v.to_bits() as u32);
            assert_eq!(word, pair[0] | pair[1] << 16, "({o}, {t}, {i})");
        }
        // Loaded straight into a frozen parameter in bf16: laid out as it loads, same values.
        let mut param = Tensor::<4>::zeros([co, ci, 3, 3], &cpu());
        crate::param::ParamMut::D4(&mut param).assign_as("conv.weight", w.cast(DType::F32).to_data(), DType::BF16).unwrap();
        assert!(rows(&param.clone().try_into_primitive::<Flex>().unwrap()).is_some(), "laid out by tap as it loads");
        assert_eq!(param.to_data(), laid.to_data());
        // Small, trained, f32 or not 3x3: left as they are.
        for other in [
            Tensor::<4>::zeros([320, 320, 3, 3], &cpu()).cast(DType::BF16),
            Tensor::<4>::zeros([640, 640, 3, 3], &cpu()),
            Tensor::<4>::zeros([640, 640, 1, 1], &cpu()).cast(DType::BF16),
            Tensor::<4>::zeros([640, 648, 3, 3], &cpu()).cast(DType::BF16),
        ] {
            assert!(by_tap(&other).is_none(), "{:?} {:?}", other.dims(), other.dtype());
        }
    }
}
