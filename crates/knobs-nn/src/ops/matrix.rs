//! What the product-based kernels (convolution, wide-head attention) share: strided matrix
//! views, the one call into the gemm crate, and the rule that keeps small work on one thread.

/// A strided matrix: element (i, j) at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(super) struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

// SAFETY: a view only reads, and the products that take one vouch that its matrix outlives
// them and is not written meanwhile.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// Row-major rows at stride `rs`, from `s[at..]`.
    pub(super) fn rows(s: &[f32], at: usize, rs: usize) -> View {
        View { ptr: s[at..].as_ptr(), rs: rs as isize, cs: 1 }
    }
    /// Element (i, j) at `s[at + i * rs + j * cs]`.
    pub(super) fn strided(s: &[f32], at: usize, rs: usize, cs: usize) -> View {
        View { ptr: s[at..].as_ptr(), rs: rs as isize, cs: cs as isize }
    }
    /// The start, row stride and column stride.
    pub(super) fn parts(self) -> (*const f32, isize, isize) {
        (self.ptr, self.rs, self.cs)
    }
    /// The rows from `first` on (no copy).
    pub(super) fn from_row(self, first: usize) -> View {
        // Forming the pointer is safe; the products that read through it vouch for the rows.
        View { ptr: self.ptr.wrapping_offset(first as isize * self.rs), ..self }
    }
    /// The same matrix transposed (no copy).
    pub(super) fn t(self) -> View {
        View { ptr: self.ptr, rs: self.cs, cs: self.rs }
    }
}

/// `dst` `[m, n]` (row stride `dst_rs`) = `dst` (when `accumulate`) + `beta` lhs `[m, k]` rhs `[k, n]`.
/// gemm splits its work over output tiles only, so the sums do not depend on `par`.
///
/// SAFETY: the views cover their matrices and `dst` is valid for `m` rows of `n` at `dst_rs`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(m: usize, n: usize, k: usize, dst: &mut [f32], dst_rs: usize, accumulate: bool, lhs: View, rhs: View, beta: f32, par: gemm::Parallelism) {
    debug_assert!(m == 0 || dst.len() >= (m - 1) * dst_rs + n);
    unsafe { product_strided(m, n, k, dst.as_mut_ptr(), dst_rs, 1, accumulate, lhs, rhs, beta, par) }
}

/// [`product`] into a destination of any strides: element (i, j) of `dst` at `dst + i * rs + j * cs`.
///
/// SAFETY: the views cover their matrices and `dst` is valid for writes at every (i, j).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product_strided(m: usize, n: usize, k: usize, dst: *mut f32, rs: usize, cs: usize, accumulate: bool, lhs: View, rhs: View, beta: f32, par: gemm::Parallelism) {
    unsafe { gemm::gemm(m, n, k, dst, cs as isize, rs as isize, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, 1.0, beta, false, false, false, par) }
}

/// How a product computes: in f32, or with its operands rounded to bf16 and f32 sums, as
/// autocast's bf16 products do (twice the multiply-adds per instruction where the CPU has
/// AVX512-BF16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Products {
    #[default]
    F32,
    Bf16,
}

impl Products {
    /// For activations in `dtype` under mixed precision on the CPU: bf16 where the CPU has the
    /// kernel, else f32 (f16 has no CPU kernel that would gain from it).
    pub fn for_dtype(dtype: burn::tensor::DType) -> Products {
        if dtype == burn::tensor::DType::BF16 && super::bf16_product::available() { Products::Bf16 } else { Products::F32 }
    }
}

/// [`product_strided`] in `products`' arithmetic.
///
/// SAFETY: as [`product_strided`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product_as(products: Products, m: usize, n: usize, k: usize, dst: *mut f32, rs: usize, cs: usize, accumulate: bool, lhs: View, rhs: View, beta: f32, par: gemm::Parallelism) {
    match products {
        Products::F32 => unsafe { product_strided(m, n, k, dst, rs, cs, accumulate, lhs, rhs, beta, par) },
        Products::Bf16 => unsafe { super::bf16_product::product_strided(m, n, k, dst, rs, cs, accumulate, lhs, rhs, beta, par) },
    }
}

/// A left operand `[m, k]` that several products read (a weight over blocks of columns): as
/// it is for f32 products, packed once for bf16 ones.
pub(super) enum Left {
    F32 { view: View, m: usize, k: usize },
    Bf16(super::bf16_product::Packed),
}

impl Left {
    pub(super) fn new(products: Products, m: usize, k: usize, view: View, parallel: bool) -> Left {
        match products {
            Products::F32 => Left::F32 { view, m, k },
            Products::Bf16 => Left::Bf16(super::bf16_product::Packed::left(m, k, view, parallel)),
        }
    }

    /// [`product_strided`] with this left operand and `rhs` `[k, n]`, in its arithmetic.
    ///
    /// SAFETY: as [`product_strided`]; the view this was made from is still valid.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn times(&self, n: usize, rhs: View, dst: *mut f32, rs: usize, cs: usize, accumulate: bool, beta: f32, par: gemm::Parallelism) {
        match self {
            Left::F32 { view, m, k } => unsafe { product_strided(*m, n, *k, dst, rs, cs, accumulate, *view, rhs, beta, par) },
            Left::Bf16(packed) => {
                let parallel = !matches!(par, gemm::Parallelism::None);
                let rhs = super::bf16_product::Packed::right(packed.k(), n, rhs, parallel);
                unsafe { super::bf16_product::product_packed(packed, &rhs, dst, rs, cs, accumulate, beta, parallel) }
            }
        }
    }
}

/// gemm's threads for a product worth splitting, else the calling thread alone.
pub(super) fn parallelism(worth_splitting: bool) -> gemm::Parallelism {
    if worth_splitting { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None }
}

/// The smallest piece rayon may hand to another thread (`with_min_len`): all of the work
/// when it is too small to be worth waking another thread for.
pub(super) fn min_len(worth_splitting: bool) -> usize {
    if worth_splitting { 1 } else { usize::MAX }
}
