//! Slice kernels for the fused ops. `FMA = true` is set only by the kernels' `#[target_feature
//! (enable = "avx2,fma")]` entry points, and then these use AVX2 + FMA intrinsics (`x86`
//! below; LLVM's own vectorisation of the dot product came out two lanes wide); otherwise
//! portable loops with fixed-width lane arrays.

pub const LANES: usize = 16;

#[inline(always)]
pub fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `y += a * x`.
#[inline(always)]
pub fn axpy<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is set only inside functions compiled for (and run on) AVX2 + FMA.
        return unsafe { x86::axpy(y, a, x) };
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y = fmadd::<FMA>(a, *x, *y);
    }
}

/// `y = a * x`.
#[inline(always)]
pub fn scale_into(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = a * x;
    }
}

#[inline(always)]
fn reduce_lanes(acc: [f32; LANES]) -> f32 {
    let mut w = acc;
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            w[l] += w[l + half];
        }
        half /= 2;
    }
    w[0]
}

/// Dot product with `LANES` independent accumulators (a single one would serialise on the
/// add latency), summed pairwise at the end.
#[inline(always)]
pub fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `axpy`.
        return unsafe { x86::dot(a, b) };
    }
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (at, bt) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] = fmadd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in at.iter().zip(bt) {
        tail = fmadd::<FMA>(*x, *y, tail);
    }
    reduce_lanes(acc) + tail
}

#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder() {
        m = if v > m { v } else { m };
    }
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().fold(m, |m, &v| if v > m { v } else { m })
}

#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    reduce_lanes(acc) + tail
}

/// e^x to about 2 ulp on [-87, 88] (inputs outside are clamped: e^-87 stands in for 0),
/// branch-free so that a loop over it vectorises: x = n ln2 + r with |r| <= ln2 / 2,
/// e^r by its degree-6 Taylor polynomial, 2^n built in the exponent bits.
#[inline(always)]
pub fn exp<const FMA: bool>(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer that then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0).min(88.0);
    let t = fmadd::<FMA>(x, std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let r = fmadd::<FMA>(n, -LN2_LO, fmadd::<FMA>(n, -LN2_HI, x));
    let mut p = 1.0 / 720.0;
    p = fmadd::<FMA>(p, r, 1.0 / 120.0);
    p = fmadd::<FMA>(p, r, 1.0 / 24.0);
    p = fmadd::<FMA>(p, r, 1.0 / 6.0);
    p = fmadd::<FMA>(p, r, 0.5);
    p = fmadd::<FMA>(p, r, 1.0);
    p = fmadd::<FMA>(p, r, 1.0);
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    p * two_n
}

/// `x[j] = e^(x[j] - shift)`; returns the sum of the results.
#[inline(always)]
pub fn exp_shifted<const FMA: bool>(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `axpy`.
        return unsafe { x86::exp_shifted(x, shift) };
    }
    for v in x.iter_mut() {
        *v = exp::<FMA>(*v - shift);
    }
    sum(x)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::exp;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let body = n - n % 8;
        let av = _mm256_set1_ps(a);
        let mut j = 0;
        while j < body {
            // SAFETY: j + 8 <= n, within both slices.
            unsafe {
                let yp = y.as_mut_ptr().add(j);
                _mm256_storeu_ps(yp, _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(j)), _mm256_loadu_ps(yp)));
            }
            j += 8;
        }
        for j in body..n {
            y[j] = a.mul_add(x[j], y[j]);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Four 8-wide accumulators, so the FMA latency is hidden.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut j = 0;
        // SAFETY (all loads): j + width <= n, within both slices.
        while j + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(j + 8 * k)), _mm256_loadu_ps(pb.add(j + 8 * k)), *acc) };
            }
            j += 32;
        }
        while j + 8 <= n {
            acc[0] = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j)), acc[0]) };
            j += 8;
        }
        let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut tail = 0.0f32;
        for k in j..n {
            tail = a[k].mul_add(b[k], tail);
        }
        hsum(total) + tail
    }

    /// [`super::exp`] on eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        const ROUND: f32 = 12_582_912.0;
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(ROUND));
        let n = _mm256_sub_ps(t, _mm256_set1_ps(ROUND));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let bits = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(ROUND.to_bits() as i32 - 127));
        _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(bits, 23)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let body = n - n % 8;
        let sv = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut j = 0;
        while j < body {
            // SAFETY: j + 8 <= n.
            unsafe {
                let p = x.as_mut_ptr().add(j);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), sv));
                _mm256_storeu_ps(p, e);
                acc = _mm256_add_ps(acc, e);
            }
            j += 8;
        }
        let mut tail = 0.0f32;
        for v in &mut x[body..] {
            *v = exp::<true>(*v - shift);
            tail += *v;
        }
        hsum(acc) + tail
    }
}

/// Whether the running CPU has AVX2 and FMA (checked once).
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_std() {
        let mut worst = 0.0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            for fma in [false, true] {
                let got = if fma { exp::<true>(x) } else { exp::<false>(x) };
                let want = x.exp();
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert!(exp::<false>(-1000.0) < 1e-37 && exp::<false>(-1000.0) >= 0.0);
    }

    #[test]
    fn dot_max_sum_match_plain_loops() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot::<false>(&a, &b) as f64 - want).abs() < 1e-5);
        assert_eq!(max(&a), a.iter().cloned().fold(f32::MIN, f32::max));
        assert!((sum(&a) as f64 - a.iter().map(|x| *x as f64).sum::<f64>()).abs() < 1e-5);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod x86_tests {
    use super::*;

    #[target_feature(enable = "avx2,fma")]
    fn with_fma(a: &[f32], b: &[f32]) -> (f32, Vec<f32>, Vec<f32>, f32) {
        let mut y = b.to_vec();
        axpy::<true>(&mut y, 0.7, a);
        let mut e = a.to_vec();
        let total = exp_shifted::<true>(&mut e, 1.5);
        (dot::<true>(a, b), y, e, total)
    }

    #[test]
    fn the_avx2_paths_match_the_portable_ones() {
        if !has_avx2_fma() {
            return;
        }
        for n in [0, 5, 8, 37, 64, 77] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            let (d, y, e, total) = unsafe { with_fma(&a, &b) };
            assert!((d - dot::<false>(&a, &b)).abs() < 1e-4, "dot, n {n}");
            let mut y0 = b.clone();
            axpy::<false>(&mut y0, 0.7, &a);
            let mut e0 = a.clone();
            let total0 = exp_shifted::<false>(&mut e0, 1.5);
            for j in 0..n {
                assert!((y[j] - y0[j]).abs() < 1e-5, "axpy, n {n}");
                assert!((e[j] - e0[j]).abs() <= 1e-6 * e0[j].abs(), "exp, n {n}: {} vs {}", e[j], e0[j]);
            }
            assert!((total - total0).abs() <= 1e-5 * total0.abs().max(1.0), "exp sum, n {n}");
        }
    }
}
