//! f32 to and from half precision (f16, bf16) on every thread with the CPU's conversion
//! instructions. Frozen weights kept in f16 are widened each time a layer uses them (twice a
//! training step), and narrowed once when a model loads with `--weights-dtype f16`: burn's
//! cast converts one value at a time on one thread (9% of an SDXL LoRA step at 1024 px), and
//! the `half` crate's slice conversion 8 values per call through the stack (8%).
use std::mem::MaybeUninit;

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;

use super::fresh::written;
use super::record::record;

/// Values per parallel block.
const BLOCK: usize = 1 << 16;

/// [`half_to_f32`] into a new vector (see [`written`]).
fn half_to_f32_vec(bits: &[u16], bf16: bool) -> Vec<f32> {
    // SAFETY: `half_to_f32` writes all `bits.len()` values.
    unsafe { written(bits.len(), |out| half_to_f32(bits, bf16, out)) }
}

/// Half-precision values (their bits) to f32 into `out`, every value written, in parallel
/// fixed-size blocks (the result is exact, so the split is free).
pub(crate) fn half_to_f32(bits: &[u16], bf16: bool, out: &mut [MaybeUninit<f32>]) {
    assert_eq!(bits.len(), out.len());
    out.par_chunks_mut(BLOCK).zip(bits.par_chunks(BLOCK)).for_each(|(dst, src)| widen_block(src, bf16, dst));
}

pub(crate) fn widen_block(src: &[u16], bf16: bool, dst: &mut [MaybeUninit<f32>]) {
    if bf16 {
        // bf16 is the top half of an f32.
        dst.iter_mut().zip(src).for_each(|(d, b)| {
            d.write(f32::from_bits(u32::from(*b) << 16));
        });
    } else {
        f16_block(src, dst);
    }
}

/// Half-precision values (their bits; bf16 when `from_bf16`, else f16) as the other half
/// type `H`, rounded once from their exact f32 values as [`data_as`] rounds them, without an
/// f32 copy of them all: each block goes through a small buffer (an fp16 file loaded into
/// bf16 storage, SDXL's UNet 2.6 B values).
pub(crate) fn half_to_half<H: Send>(bits: &[u16], from_bf16: bool, out: &mut [MaybeUninit<H>]) {
    const { assert!(size_of::<H>() == 2 && align_of::<H>() == 2) };
    const STAGE: usize = 2048;
    assert_eq!(bits.len(), out.len());
    // SAFETY: H (half::f16 or bf16, each a transparent u16) has u16's layout.
    let out = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<MaybeUninit<u16>>(), out.len()) };
    out.par_chunks_mut(BLOCK).zip(bits.par_chunks(BLOCK)).for_each(|(dst, src)| {
        let mut wide = [MaybeUninit::<f32>::uninit(); STAGE];
        for (d, s) in dst.chunks_mut(STAGE).zip(src.chunks(STAGE)) {
            widen_block(s, from_bf16, &mut wide[..s.len()]);
            // SAFETY: `widen_block` wrote the first s.len() values.
            let w = unsafe { std::slice::from_raw_parts(wide.as_ptr().cast::<f32>(), s.len()) };
            if from_bf16 { f32_block(w, d) } else { bf16_block(w, d) }
        }
    });
}

/// One instruction converts 16 values (AVX-512) or 8 (F16C).
fn f16_block(src: &[u16], dst: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::lanes::isa() == super::lanes::Isa::Avx512 {
            // SAFETY: the CPU has AVX-512F (`isa` checked it).
            return unsafe { f16_block_avx512(src, dst) };
        }
        if is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has F16C (checked just above; it implies AVX).
            return unsafe { f16_block_f16c(src, dst) };
        }
    }
    dst.iter_mut().zip(src).for_each(|(d, b)| {
        d.write(half::f16::from_bits(*b).to_f32());
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f16_block_avx512(src: &[u16], dst: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm512_cvtph_ps, _mm512_storeu_ps};
    let n = src.len().min(dst.len());
    let body = n - n % 16;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr().cast::<f32>());
    for i in (0..body).step_by(16) {
        // SAFETY: i + 16 <= n within both slices.
        unsafe { _mm512_storeu_ps(dp.add(i), _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(i).cast::<__m256i>()))) };
    }
    for j in body..n {
        dst[j].write(half::f16::from_bits(src[j]).to_f32());
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_block_f16c(src: &[u16], dst: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    let n = src.len().min(dst.len());
    let body = n - n % 8;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr().cast::<f32>());
    for i in (0..body).step_by(8) {
        // SAFETY: i + 8 <= n within both slices.
        unsafe { _mm256_storeu_ps(dp.add(i), _mm256_cvtph_ps(_mm_loadu_si128(sp.add(i).cast::<__m128i>()))) };
    }
    for j in body..n {
        dst[j].write(half::f16::from_bits(src[j]).to_f32());
    }
}

/// `t` in f32, contiguous: itself when it is; f16 and bf16 through [`half_to_f32`]; any
/// other dtype through burn's cast.
pub(crate) fn widened(t: &FlexTensor) -> FlexTensor {
    use half::slice::HalfFloatSliceExt;
    let t = t.to_contiguous();
    let shape = t.layout().shape().clone();
    let out = match t.dtype() {
        DType::F32 => return t,
        DType::F16 => half_to_f32_vec(t.as_slice::<half::f16>().expect("contiguous").reinterpret_cast(), false),
        DType::BF16 => half_to_f32_vec(t.as_slice::<half::bf16>().expect("contiguous").reinterpret_cast(), true),
        _ => return FlexTensor::from_data(t.into_data().convert::<f32>()),
    };
    FlexTensor::from_data(TensorData::new(out, shape))
}

/// `t` in `dtype`, as burn's cast, but between f32, f16 and bf16 on the CPU backend through
/// this module's kernels on every thread, and under autodiff with the gradient converted back
/// the same way. burn's cast converts one value at a time on one thread: a `[1, 128, 512,
/// 512]` activation (SD's VAE at 512 px) took 40 ms to bf16 and 57 ms back on a Zen 4, and
/// mixed precision casts every layer's input and output. Other dtypes and backends take
/// burn's cast.
pub fn cast<const D: usize>(t: &Tensor<D>, dtype: DType) -> Tensor<D> {
    let float = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16);
    let from = t.dtype();
    if from == dtype || !float(from) || !float(dtype) {
        return if from == dtype { t.clone() } else { t.clone().cast(dtype) };
    }
    converting(t, Conversion::Cast { to: dtype, back: from }).unwrap_or_else(|| t.clone().cast(dtype))
}

/// f32 `t` rounded to the precision of `half` (f16 or bf16) and kept in f32: the values of
/// `cast(&cast(t, half), F32)`, and its gradient rounded the same way, as that pair's backward
/// rounds it; in one pass and one f32 buffer where the pair wrote a half-precision copy and
/// widened it again. A layer with adapters under mixed precision hands its base layer the
/// adapters' f32 input this way (`Linear::forward`). Other dtypes and backends take the pair.
pub fn rounded_as<const D: usize>(t: &Tensor<D>, half: DType) -> Tensor<D> {
    let pair = || cast(&cast(t, half), t.dtype());
    if t.dtype() != DType::F32 || !matches!(half, DType::F16 | DType::BF16) {
        return pair();
    }
    converting(t, Conversion::Round(half)).unwrap_or_else(pair)
}

/// A layer's own computation `base` (given f32 input and the products to take) on the f32
/// input its adapters hand it, for a layer whose input came in `dtype`: the values of its
/// `forward_base` on that input narrowed to `dtype`, widened again (the base computes on the
/// widened values and rounds its output). Under mixed precision on the CPU the input and the
/// output are rounded in f32 storage ([`rounded_as`]), one pass each where narrowing and
/// widening took two; `None` elsewhere (the caller narrows and widens).
pub(crate) fn on_rounded<const D: usize>(x: &Tensor<D>, dtype: DType, base: impl FnOnce(Tensor<D>, super::Products) -> Tensor<D>) -> Option<Tensor<D>> {
    if !matches!(dtype, DType::F16 | DType::BF16) || !super::on_cpu(x) {
        return None;
    }
    Some(rounded_as(&base(rounded_as(x, dtype), super::Products::for_dtype(dtype)), dtype))
}

/// What [`cast`] and [`rounded_as`] do to a tensor on the CPU backend, and to its gradient.
#[derive(Clone, Copy, Debug)]
enum Conversion {
    /// To `to`; the gradient back to `back`, the input's dtype.
    Cast { to: DType, back: DType },
    /// Rounded to a half precision in f32, the gradient likewise.
    Round(DType),
}

impl Conversion {
    fn forward(self, t: &FlexTensor) -> FlexTensor {
        match self {
            Conversion::Cast { to, .. } => converted(t, to),
            Conversion::Round(half) => rounded(t, half),
        }
    }
    fn backward(self, g: &FlexTensor) -> FlexTensor {
        match self {
            Conversion::Cast { back, .. } => converted(g, back),
            Conversion::Round(half) => rounded(g, half),
        }
    }
}

/// `conversion` of `t`, with or without autodiff; `None` off the CPU backend.
fn converting<const D: usize>(t: &Tensor<D>, conversion: Conversion) -> Option<Tensor<D>> {
    if !t.is_autodiff() {
        let p = t.clone().try_into_primitive::<Flex>().ok()?;
        return Some(Tensor::from_primitive::<Flex>(conversion.forward(&p)));
    }
    let strategy = t.gradient_checkpointing_strategy();
    if !t.is_tracked() {
        return Some(crate::param::autodiff_with(converting(&t.clone().inner(), conversion)?, strategy));
    }
    // Memory bound, as burn's element-wise ops: under balanced checkpointing a later op that
    // keeps the output (an activation's widened input) has it recomputed from the input
    // instead of held from the forward pass to the backward.
    let recompute = |ids: &[NodeId]| Reconvert { x: ids[0], conversion };
    let x = t.clone();
    record!(Convert, strategy, [x], keep [], recompute recompute, (conversion.forward(&x), conversion))
}

/// f32 `t`'s values rounded to `half`'s precision, in f32.
fn rounded(t: &FlexTensor, half: DType) -> FlexTensor {
    const STAGE: usize = 2048;
    let t = t.to_contiguous();
    let values = t.as_slice::<f32>().expect("a contiguous f32 tensor (checked before)");
    let bf16 = half != DType::F16;
    let narrow = if bf16 { bf16_block } else { f32_block };
    // SAFETY: the blocks cover every value, and each stage writes all of its own.
    let out = unsafe {
        written(values.len(), |out: &mut [MaybeUninit<f32>]| {
            out.par_chunks_mut(BLOCK).zip(values.par_chunks(BLOCK)).for_each(|(dst, src)| {
                let mut bits = [MaybeUninit::<u16>::uninit(); STAGE];
                for (d, s) in dst.chunks_mut(STAGE).zip(src.chunks(STAGE)) {
                    narrow(s, &mut bits[..s.len()]);
                    // SAFETY: `narrow` wrote the first s.len() values.
                    widen_block(std::slice::from_raw_parts(bits.as_ptr().cast::<u16>(), s.len()), bf16, d);
                }
            })
        })
    };
    FlexTensor::from_data(TensorData::new(out, t.layout().shape().clone()))
}

/// `t` in `dtype` (f32, f16 or bf16), contiguous.
pub(crate) fn converted(t: &FlexTensor, dtype: DType) -> FlexTensor {
    let wide = widened(t);
    if dtype == DType::F32 {
        return wide;
    }
    let shape = wide.layout().shape().clone();
    FlexTensor::from_data(narrow_data(wide.as_slice::<f32>().expect("contiguous f32"), dtype, shape))
}

/// A recorded [`Conversion`]; no input is kept (the gradient needs none).
#[derive(Debug)]
struct Convert;

impl Backward<Flex, 1> for Convert {
    type State = (Conversion, Vec<NodeId>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Flex>(&ops.node);
        if let Some(node) = ops.parents[0].clone() {
            grads.register::<Flex>(node.id, ops.state.0.backward(&g));
        }
    }
}

/// The conversion again from its input, in the backward pass.
#[derive(Debug)]
struct Reconvert {
    x: NodeId,
    conversion: Conversion,
}

impl RetroForward for Reconvert {
    fn forward(&self, states: &mut BackwardStates, out: NodeId) {
        let x = states.get_state::<FlexTensor>(&self.x);
        states.save(out, self.conversion.forward(&x));
    }
}

/// `data` in `dtype`: between f32, f16 and bf16 through this module's kernels; any other
/// pair through burn's `convert_dtype`, which converts one value at a time on one thread (a
/// third of an SDXL load into f16 was that conversion).
pub fn data_as(data: TensorData, dtype: DType) -> TensorData {
    use half::slice::HalfFloatSliceExt;
    let from = data.dtype();
    if from == dtype {
        return data;
    }
    let shape = data.shape().clone();
    match (from, dtype) {
        (DType::F16 | DType::BF16, DType::F32) => {
            let widened = match from {
                DType::F16 => half_to_f32_vec(data.as_slice::<half::f16>().expect("f16 data").reinterpret_cast(), false),
                _ => half_to_f32_vec(data.as_slice::<half::bf16>().expect("bf16 data").reinterpret_cast(), true),
            };
            TensorData::new(widened, shape)
        }
        (DType::F32, DType::F16 | DType::BF16) => narrow_data(data.as_slice::<f32>().expect("f32 data"), dtype, shape),
        (DType::F16 | DType::BF16, DType::F16 | DType::BF16) => data_as(data_as(data, DType::F32), dtype),
        _ => data.convert_dtype(dtype),
    }
}

/// f32 `values` narrowed to `dtype` (f16 or bf16), as burn's cast rounds them.
fn narrow_data(values: &[f32], dtype: DType, shape: burn::tensor::Shape) -> TensorData {
    match dtype {
        DType::F16 => TensorData::new(narrow_values::<half::f16>(values, f32_block), shape),
        _ => TensorData::new(narrow_values::<half::bf16>(values, bf16_block), shape),
    }
}

/// `values` through `block` (f32 to the bits of `H`, a half-precision type) into a new vector,
/// in parallel blocks.
fn narrow_values<H: Send>(values: &[f32], block: impl Fn(&[f32], &mut [MaybeUninit<u16>]) + Sync) -> Vec<H> {
    const { assert!(size_of::<H>() == 2 && align_of::<H>() == 2) };
    // SAFETY: the blocks cover every value, and each writes all of its own.
    unsafe {
        written(values.len(), |out: &mut [MaybeUninit<H>]| {
            // SAFETY: H (half::f16 or bf16, each a transparent u16) has u16's layout.
            let out = std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<MaybeUninit<u16>>(), out.len());
            out.par_chunks_mut(BLOCK).zip(values.par_chunks(BLOCK)).for_each(|(dst, src)| block(src, dst));
        })
    }
}

/// f32 to the bits of bf16 (`bf16`) or f16, to nearest even, as burn's cast rounds them.
pub(crate) fn narrow_block(src: &[f32], bf16: bool, dst: &mut [MaybeUninit<u16>]) {
    if bf16 { bf16_block(src, dst) } else { f32_block(src, dst) }
}

/// f32 to bf16 bits, to nearest even (NaN stays NaN), 16 values an instruction with
/// AVX512-BF16.
fn bf16_block(src: &[f32], dst: &mut [MaybeUninit<u16>]) {
    #[cfg(target_arch = "x86_64")]
    if super::bf16_product::available() {
        // SAFETY: the CPU has AVX512-BF16 (checked by `available`).
        return unsafe { bf16_block_avx512(src, dst) };
    }
    dst.iter_mut().zip(src).for_each(|(d, v)| {
        d.write(half::bf16::from_f32(*v).to_bits());
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_block_avx512(src: &[f32], dst: &mut [MaybeUninit<u16>]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let body = n - n % 16;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr().cast::<__m256i>());
    for i in (0..body).step_by(16) {
        // SAFETY: i + 16 <= n within both slices (16 u16 are one __m256i).
        unsafe {
            let v = _mm512_loadu_ps(sp.add(i));
            _mm256_storeu_si256(dp.byte_add(2 * i), std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)));
            // The instruction flushes subnormal inputs to zero; bf16 has them, so those few
            // lanes are converted again one by one.
            let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(v), _mm512_set1_ps(f32::MIN_POSITIVE));
            if tiny & _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(v, _mm512_setzero_ps()) != 0 {
                for j in i..i + 16 {
                    dst[j].write(half::bf16::from_f32(src[j]).to_bits());
                }
            }
        }
    }
    for j in body..n {
        dst[j].write(half::bf16::from_f32(src[j]).to_bits());
    }
}

fn f32_block(src: &[f32], dst: &mut [MaybeUninit<u16>]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::lanes::isa() == super::lanes::Isa::Avx512 {
            // SAFETY: the CPU has AVX-512F (`isa` checked it).
            return unsafe { f32_block_avx512(src, dst) };
        }
        if is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has F16C (checked just above; it implies AVX).
            return unsafe { f32_block_f16c(src, dst) };
        }
    }
    dst.iter_mut().zip(src).for_each(|(d, v)| {
        d.write(half::f16::from_f32(*v).to_bits());
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f32_block_avx512(src: &[f32], dst: &mut [MaybeUninit<u16>]) {
    use std::arch::x86_64::{__m256i, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT, _mm256_storeu_si256, _mm512_cvtps_ph, _mm512_loadu_ps};
    let n = src.len().min(dst.len());
    let body = n - n % 16;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr().cast::<__m256i>());
    for i in (0..body).step_by(16) {
        // SAFETY: i + 16 <= n within both slices (16 u16 are one __m256i).
        unsafe { _mm256_storeu_si256(dp.byte_add(2 * i), _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_loadu_ps(sp.add(i)))) };
    }
    for j in body..n {
        dst[j].write(half::f16::from_f32(src[j]).to_bits());
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f32_block_f16c(src: &[f32], dst: &mut [MaybeUninit<u16>]) {
    use std::arch::x86_64::{__m128i, _MM_FROUND_TO_NEAREST_INT, _mm_storeu_si128, _mm256_cvtps_ph, _mm256_loadu_ps};
    let n = src.len().min(dst.len());
    let body = n - n % 8;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr().cast::<__m128i>());
    for i in (0..body).step_by(8) {
        // SAFETY: i + 8 <= n within both slices (8 u16 are one __m128i).
        unsafe { _mm_storeu_si128(dp.byte_add(2 * i), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(sp.add(i)))) };
    }
    for j in body..n {
        dst[j].write(half::f16::from_f32(src[j]).to_bits());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;
    use crate::{Init, cpu};

    /// Every f16 and bf16 bit pattern (NaNs compared as NaN), at an offset off the vector
    /// width, against the `half` crate's conversion of each value: the dispatched path, and
    /// the F16C one where the CPU has it.
    #[test]
    fn every_half_value_converts_as_the_half_crate_does() {
        let bits: Vec<u16> = (0..=u16::MAX).chain(0..7).collect();
        let bits = &bits[3..];
        let check = |got: &[f32], bf16: bool, path: &str| {
            for (b, g) in bits.iter().zip(got) {
                let want = if bf16 { half::bf16::from_bits(*b).to_f32() } else { half::f16::from_bits(*b).to_f32() };
                assert!(want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()), "{path}: bits {b:#06x} bf16 {bf16}: {g} vs {want}");
            }
        };
        for bf16 in [false, true] {
            check(&half_to_f32_vec(bits, bf16), bf16, "dispatched");
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("f16c") {
            let mut out = vec![MaybeUninit::new(0f32); bits.len()];
            // SAFETY: the CPU has F16C.
            unsafe { f16_block_f16c(bits, &mut out) };
            // SAFETY: initialised above.
            check(&out.iter().map(|v| unsafe { v.assume_init() }).collect::<Vec<_>>(), false, "f16c");
        }
    }

    /// f32 values around every rounding case (ties, subnormals, overflow, infinities, NaN) and
    /// random ones, narrowed by `cast` as burn's cast narrows them, bit for bit (NaNs as NaN),
    /// on plain and autodiff tensors; the F16C path too where the CPU has it.
    #[test]
    fn narrowing_equals_burns_cast() {
        let mut values: Vec<f32> = (0..=u16::MAX).flat_map(|h| {
            let v = half::f16::from_bits(h).to_f32().to_bits();
            [v, v.wrapping_add(1), v.wrapping_add(0x1000), v.wrapping_add(0x0fff), v.wrapping_sub(1)].map(f32::from_bits)
        }).collect();
        values.extend([1e-10, 65519.0, 65520.0, 1e6, f32::INFINITY, f32::NAN, -0.0, f32::MIN_POSITIVE]);
        // bf16 ties: to the even neighbour, down and up.
        values.extend([0x3f80_8000, 0x3f81_8000, 0xbf81_8000, 0x7f7f_ffff, 0x7f80_0001].map(f32::from_bits));
        values.extend(values_of(Init::new(9).normal::<1>([1000], 100.0, &cpu())));
        let n = values.len();
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
        for device in [cpu(), crate::cpu_autodiff_checkpointed()] {
            let t = Tensor::<1>::from_data(TensorData::new(values.clone(), [n]), &device);
            for dtype in [DType::F16, DType::BF16] {
                let got = cast(&t, dtype);
                assert_eq!(got.dtype(), dtype);
                assert_eq!(got.is_autodiff(), t.is_autodiff());
                assert!(same(&values_of(got), &values_of(t.clone().cast(dtype))), "{dtype:?}");
            }
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("f16c") {
            let mut out = vec![MaybeUninit::new(0u16); n];
            // SAFETY: the CPU has F16C.
            unsafe { f32_block_f16c(&values, &mut out) };
            // SAFETY: initialised above.
            let got: Vec<f32> = out.iter().map(|b| half::f16::from_bits(unsafe { b.assume_init() }).to_f32()).collect();
            let want: Vec<f32> = values.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
            assert!(same(&got, &want));
        }
    }

    /// `cast` between every pair of f32, f16 and bf16 gives burn's cast's values, plain and
    /// under autodiff, and there the gradient burn's gives, in the input's dtype.
    #[test]
    fn cast_equals_burns_cast_and_its_gradient() {
        let values = values_of(Init::new(4).normal::<1>([5000], 3.0, &cpu()));
        let probe = values_of(Init::new(5).normal::<1>([5000], 1.0, &cpu()));
        let bits = |t: Tensor<1>| (t.dtype(), values_of(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        for device in [cpu(), crate::cpu_autodiff(), crate::cpu_autodiff_checkpointed()] {
            let on = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
            for from in [DType::F32, DType::F16, DType::BF16] {
                for to in [DType::F32, DType::F16, DType::BF16] {
                    let t = on(&values).cast(from);
                    assert_eq!(bits(cast(&t, to)), bits(t.clone().cast(to)), "{from:?} -> {to:?} on {device:?}");
                    if !t.is_autodiff() {
                        continue;
                    }
                    let grad = |ours: bool| {
                        let x = t.clone().require_grad();
                        let y = if ours { cast(&x, to) } else { x.clone().cast(to) };
                        let g = (y.cast(DType::F32) * on(&probe)).sum().backward();
                        bits(x.grad(&g).expect("a gradient"))
                    };
                    assert_eq!(grad(true), grad(false), "gradient {from:?} -> {to:?} on {device:?}");
                }
            }
        }
    }

    /// `rounded_as` gives the bits of a cast to half precision and back, forward and backward,
    /// with and without autodiff and checkpointing, over values that overflow f16 and fall
    /// below bf16's and f16's normal ranges, in more values than one parallel block.
    #[test]
    fn rounding_in_f32_equals_a_cast_there_and_back() {
        let n = BLOCK + 4099;
        let mut values = values_of(Init::new(6).normal::<1>([n], 3.0, &cpu()));
        values[..6].copy_from_slice(&[7.0e4, -1.0e5, 1.0e-40, -3.0e-6, 1.0e-39, 65519.0]);
        let probe = values_of(Init::new(7).normal::<1>([n], 1.0, &cpu()));
        let bits = |t: Tensor<1>| values_of(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for device in [cpu(), crate::cpu_autodiff(), crate::cpu_autodiff_checkpointed()] {
            let on = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
            for half in [DType::F16, DType::BF16] {
                let t = on(&values);
                assert_eq!(bits(rounded_as(&t, half)), bits(cast(&cast(&t, half), DType::F32)), "{half:?} on {device:?}");
                if !t.is_autodiff() {
                    continue;
                }
                let grad = |ours: bool| {
                    let x = t.clone().require_grad();
                    // Through an op after it, so that checkpointing has something to recompute.
                    let y = if ours { rounded_as(&x, half) } else { cast(&cast(&x, half), DType::F32) };
                    let g = (crate::ops::silu(y) * on(&probe)).sum().backward();
                    bits(x.grad(&g).expect("a gradient"))
                };
                assert_eq!(grad(true), grad(false), "gradient {half:?} on {device:?}");
            }
        }
    }

    /// Every pair of f32, f16 and bf16, bit for bit as burn's `convert_dtype` (NaNs as NaN).
    #[test]
    fn data_as_equals_burns_conversion() {
        let mut values: Vec<f32> = (0..=u16::MAX).map(|h| half::f16::from_bits(h).to_f32()).collect();
        values.extend((0..=u16::MAX).map(|h| half::bf16::from_bits(h).to_f32()));
        values.extend([1e-10, 65519.0, 65520.0, 1e6, 3.0e38, f32::NAN]);
        let f32s = TensorData::new(values.clone(), [values.len()]);
        let floats = |d: &TensorData| d.clone().convert::<f32>().try_to_vec::<f32>().unwrap();
        for from in [DType::F32, DType::F16, DType::BF16] {
            let source = f32s.clone().convert_dtype(from);
            for to in [DType::F32, DType::F16, DType::BF16] {
                let (got, want) = (data_as(source.clone(), to), source.clone().convert_dtype(to));
                assert_eq!((got.dtype(), got.shape()), (to, want.shape()), "{from:?} -> {to:?}");
                let same = floats(&got).iter().zip(floats(&want)).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                assert!(same, "{from:?} -> {to:?}");
            }
        }
    }

    fn values_of<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        values(t.inner().cast(DType::F32))
    }

    #[test]
    fn widening_equals_burns_cast_for_each_half_dtype() {
        let x: Tensor<2> = Init::new(3).normal([300, 700], 2.0, &cpu());
        // A transposed view: widened copies it out in order.
        for dtype in [DType::F16, DType::BF16] {
            let half = x.clone().cast(dtype).transpose();
            let want = values(half.clone().cast(DType::F32));
            let got = widened(&half.try_into_primitive::<Flex>().unwrap());
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(got.layout().shape().dims::<2>(), [700, 300]);
            let got = values(Tensor::<2>::from_primitive::<Flex>(got));
            assert_eq!(got, want, "{dtype:?}");
        }
    }
}
