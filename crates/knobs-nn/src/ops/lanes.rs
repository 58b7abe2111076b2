//! One vector register of f32 lanes behind one interface, so that a kernel is written once and
//! compiled for AVX-512 (16 lanes), AVX2 + FMA (8 lanes) and plain `f32` (one lane, for loop
//! tails and other CPUs). Kernels are `#[inline(always)]` generics called from a
//! `#[target_feature]` entry point; the methods inline into it and compile to single
//! instructions.
//!
//! Every method is `unsafe`: the caller promises the CPU has the lane type's features and that
//! pointers are valid for `W` values.

pub trait Lanes: Copy {
    const W: usize;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a * b + c`.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    /// e^x as [`super::simd::exp`]: the same polynomial, so every lane width gives the same
    /// values to the last bit or two.
    unsafe fn exp(self) -> Self;
    unsafe fn sum(self) -> f32;
    unsafe fn hmax(self) -> f32;
}

impl Lanes for f32 {
    const W: usize = 1;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { *p = self }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        a.mul_add(b, c)
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        self / o
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        if o > self { o } else { self }
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        if o < self { o } else { self }
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        super::simd::exp(self)
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        self
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;

    /// `1.5 * 2^23`: added to a float below 2^22 it leaves the rounded integer in the low
    /// mantissa bits (see `simd::exp`).
    const ROUND: f32 = 12_582_912.0;
    const POLY: [f32; 6] = [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

    #[derive(Clone, Copy)]
    pub struct Avx2(__m256);

    impl Lanes for Avx2 {
        const W: usize = 8;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Avx2(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Avx2(_mm256_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { Avx2(_mm256_fmadd_ps(a.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_max_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn min(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_min_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn exp(self) -> Self {
            unsafe {
                // The input second: max / min return their second operand when either is NaN, so
                // a NaN stays NaN (the other order turned it into e^-87).
                let x = _mm256_min_ps(_mm256_set1_ps(88.0), _mm256_max_ps(_mm256_set1_ps(-87.0), self.0));
                let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(ROUND));
                let n = _mm256_sub_ps(t, _mm256_set1_ps(ROUND));
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
                let mut p = _mm256_set1_ps(1.0 / 720.0);
                for c in POLY {
                    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
                }
                let bits = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(ROUND.to_bits() as i32 - 127));
                Avx2(_mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(bits, 23))))
            }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps(self.0, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            let mut a = [0f32; 8];
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), self.0) };
            a.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl Lanes for Avx512 {
        const W: usize = 16;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Avx512(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Avx512(_mm512_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { Avx512(_mm512_fmadd_ps(a.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_max_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn min(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_min_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn exp(self) -> Self {
            unsafe {
                // The input second: max / min return their second operand when either is NaN, so
                // a NaN stays NaN (the other order turned it into e^-87).
                let x = _mm512_min_ps(_mm512_set1_ps(88.0), _mm512_max_ps(_mm512_set1_ps(-87.0), self.0));
                let t = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), _mm512_set1_ps(ROUND));
                let n = _mm512_sub_ps(t, _mm512_set1_ps(ROUND));
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
                let mut p = _mm512_set1_ps(1.0 / 720.0);
                for c in POLY {
                    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
                }
                let bits = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(ROUND.to_bits() as i32 - 127));
                Avx512(_mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(bits, 23))))
            }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            unsafe { _mm512_reduce_add_ps(self.0) }
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            unsafe { _mm512_reduce_max_ps(self.0) }
        }
    }
}

/// Defines `fn $name($arg, isa: Isa) -> $Ret` that runs `$body` with `$L` standing for
/// `isa`'s lane type. The body is compiled once per instruction set inside a
/// `#[target_feature]` entry point, so the `#[inline(always)]` kernels it calls become that
/// set's instructions; the caller promises the CPU has `isa` (see [`isa`]).
macro_rules! on_lanes {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($arg:ident: $Arg:ty) -> $Ret:ty { $L:ident => $body:expr }) => {
        $(#[$doc])*
        // Kernels that are safe functions need no unsafe block of their own; on one-lane f32
        // a kernel's `n % L::W` is a modulo by one.
        #[allow(unused_unsafe, clippy::modulo_one)]
        $vis fn $name($arg: $Arg, isa: $crate::ops::lanes::Isa) -> $Ret {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512($arg: $Arg) -> $Ret {
                #[allow(dead_code)] // kernels that vectorise by themselves ignore it
                type $L = $crate::ops::lanes::Avx512;
                unsafe { $body }
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($arg: $Arg) -> $Ret {
                #[allow(dead_code)] // kernels that vectorise by themselves ignore it
                type $L = $crate::ops::lanes::Avx2;
                unsafe { $body }
            }
            // SAFETY: the caller checked that the CPU has `isa`; one-lane f32 needs nothing.
            match isa {
                #[cfg(target_arch = "x86_64")]
                $crate::ops::lanes::Isa::Avx512 => unsafe { avx512($arg) },
                #[cfg(target_arch = "x86_64")]
                $crate::ops::lanes::Isa::Avx2 => unsafe { avx2($arg) },
                _ => {
                    #[allow(dead_code)] // kernels that vectorise by themselves ignore it
                    type $L = f32;
                    unsafe { $body }
                }
            }
        }
    };
}
pub(super) use on_lanes;

/// The widest lane type the running CPU has, checked once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var_os("KNOBS_NO_AVX512").is_none() && is_x86_feature_detected!("avx512f") {
                Isa::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Isa::Avx2
            } else {
                Isa::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Portable
    }
}
