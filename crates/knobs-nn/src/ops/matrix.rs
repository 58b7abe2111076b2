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
    pub(super) fn rows_from(self, first: usize) -> View {
        // Forming the pointer is safe; the products that read through it vouch for the rows.
        View { ptr: self.ptr.wrapping_offset(first as isize * self.rs), ..self }
    }
    /// The same matrix transposed (no copy).
    pub(super) fn t(self) -> View {
        View { ptr: self.ptr, rs: self.cs, cs: self.rs }
    }
}

/// `dst` (element (i, j) at `dst + i * rs + j * cs`) = `dst` (when `accumulate`) + `beta`
/// lhs `[m, k]` rhs `[k, n]`. gemm splits its work over output tiles only, so the sums do not
/// depend on `par`.
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
    /// For activations in `dtype` under mixed precision on the CPU: bf16 where the CPU runs
    /// the kernel faster than f32 ([`super::bf16_product::pays`]), else f32 (f16 has no CPU
    /// kernel that would gain from it).
    pub fn for_dtype(dtype: burn::tensor::DType) -> Products {
        if dtype == burn::tensor::DType::BF16 && super::bf16_product::pays() { Products::Bf16 } else { Products::F32 }
    }

    /// Whether this CPU runs bf16 products at all, whether or not mixed precision takes them
    /// (for benchmarks that compare the kernels).
    pub fn bf16_available() -> bool {
        super::bf16_product::available()
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

/// An operand of products in one arithmetic, prepared once for every product that reads it
/// (a weight over blocks of columns, an attention head's keys over blocks of queries): the
/// view itself for f32 products, packed for bf16 ones.
pub(super) enum Operand {
    F32 { view: View, lines: usize, k: usize },
    Bf16(super::bf16_product::Packed),
}

impl Operand {
    /// A left operand `[m, k]`; `parallel`: pack on every thread.
    pub(super) fn left(products: Products, m: usize, k: usize, view: View, parallel: bool) -> Operand {
        match products {
            Products::F32 => Operand::F32 { view, lines: m, k },
            Products::Bf16 => Operand::Bf16(super::bf16_product::Packed::left(m, k, view, parallel)),
        }
    }

    /// This left operand times `rhs` `[k, n]`, prepared for this one product: as
    /// [`product_of`].
    ///
    /// SAFETY: as [`product_of`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn times(&self, n: usize, rhs: View, dst: *mut f32, rs: usize, cs: usize, accumulate: bool, beta: f32, par: gemm::Parallelism) {
        let (products, k) = match self {
            Operand::F32 { k, .. } => (Products::F32, *k),
            Operand::Bf16(packed) => (Products::Bf16, packed.k()),
        };
        let rhs = Operand::right(products, k, n, rhs, !matches!(par, gemm::Parallelism::None));
        unsafe { product_of(self, &rhs, dst, rs, cs, accumulate, beta, par) }
    }

    /// A right operand `[k, n]`.
    pub(super) fn right(products: Products, k: usize, n: usize, view: View, parallel: bool) -> Operand {
        match products {
            Products::F32 => Operand::F32 { view, lines: n, k },
            Products::Bf16 => Operand::Bf16(super::bf16_product::Packed::right(k, n, view, parallel)),
        }
    }
}

/// [`product_strided`] of prepared operands (both of one arithmetic, [`Operand`]).
///
/// SAFETY: as [`product_strided`]; the matrices the operands' views were made from are still
/// valid and unchanged.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product_of(lhs: &Operand, rhs: &Operand, dst: *mut f32, rs: usize, cs: usize, accumulate: bool, beta: f32, par: gemm::Parallelism) {
    match (lhs, rhs) {
        (Operand::F32 { view: l, lines: m, k }, Operand::F32 { view: r, lines: n, .. }) => unsafe { product_strided(*m, *n, *k, dst, rs, cs, accumulate, *l, *r, beta, par) },
        (Operand::Bf16(l), Operand::Bf16(r)) => unsafe { super::bf16_product::product_packed(l, r, dst, rs, cs, accumulate, beta, !matches!(par, gemm::Parallelism::None)) },
        _ => unreachable!("operands of one arithmetic"),
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
