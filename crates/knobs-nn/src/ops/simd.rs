//! Slice kernels over any [`Lanes`] type: whole vectors first, then the tail one value at a
//! time. They are `#[inline(always)]` so that they compile inside a kernel's
//! `#[target_feature]` entry point with that entry point's instructions.
use super::lanes::Lanes;

/// e^x to about 2 ulp on [-87, 88] (inputs outside are clamped: e^-87 stands in for 0; NaN
/// stays NaN, so a NaN logit shows in a softmax's output instead of weighing nothing),
/// branch-free: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial,
/// 2^n built in the exponent bits. The lane types compute the same polynomial.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer that then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // clamp keeps NaN (f32::max / min would return the other operand).
    let x = x.clamp(-87.0, 88.0);
    let t = x.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = f32::mul_add(p, r, c);
    }
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    p * two_n
}

/// `y += a * x`.
#[inline(always)]
pub unsafe fn axpy<L: Lanes>(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let body = n - n % L::W;
    let (yp, xp) = (y.as_mut_ptr(), x.as_ptr());
    // SAFETY: j + W <= n within both slices; the caller vouches for L's features.
    unsafe {
        let av = L::splat(a);
        let mut j = 0;
        while j < body {
            L::fma(av, L::load(xp.add(j)), L::load(yp.add(j))).store(yp.add(j));
            j += L::W;
        }
    }
    for j in body..n {
        y[j] = a.mul_add(x[j], y[j]);
    }
}

/// `y = a * x`.
#[inline(always)]
pub fn scale_into(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = a * x;
    }
}

/// Dot product with four vector accumulators (one would serialise on the FMA latency).
#[inline(always)]
pub unsafe fn dot<L: Lanes>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let w = L::W;
    let mut j = 0;
    // SAFETY: j + width <= n within both slices.
    let total = unsafe {
        let mut acc = [L::splat(0.0); 4];
        while j + 4 * w <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = L::fma(L::load(pa.add(j + k * w)), L::load(pb.add(j + k * w)), *acc);
            }
            j += 4 * w;
        }
        while j + w <= n {
            acc[0] = L::fma(L::load(pa.add(j)), L::load(pb.add(j)), acc[0]);
            j += w;
        }
        acc[0].add(acc[1]).add(acc[2].add(acc[3])).sum()
    };
    let mut tail = 0.0f32;
    for k in j..n {
        tail = a[k].mul_add(b[k], tail);
    }
    total + tail
}

#[inline(always)]
pub unsafe fn max<L: Lanes>(x: &[f32]) -> f32 {
    let body = x.len() - x.len() % L::W;
    // SAFETY: j + W <= len.
    let mut m = unsafe {
        let mut acc = L::splat(f32::NEG_INFINITY);
        let mut j = 0;
        while j < body {
            acc = acc.max(L::load(x.as_ptr().add(j)));
            j += L::W;
        }
        acc.hmax()
    };
    for &v in &x[body..] {
        m = if v > m { v } else { m };
    }
    m
}

/// `x[j] = e^(x[j] - shift)`; returns the sum of the results.
#[inline(always)]
pub unsafe fn exp_shifted<L: Lanes>(x: &mut [f32], shift: f32) -> f32 {
    let n = x.len();
    let body = n - n % L::W;
    let p = x.as_mut_ptr();
    // SAFETY: j + W <= n.
    let total = unsafe {
        let (sv, mut acc) = (L::splat(shift), L::splat(0.0));
        let mut j = 0;
        while j < body {
            let e = L::load(p.add(j)).sub(sv).exp();
            e.store(p.add(j));
            acc = acc.add(e);
            j += L::W;
        }
        acc.sum()
    };
    let mut tail = 0.0f32;
    for v in &mut x[body..] {
        *v = exp(*v - shift);
        tail += *v;
    }
    total + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::lanes::{Isa, isa};

    #[test]
    fn exp_is_within_a_few_ulp_of_std() {
        let mut worst = 0.0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            worst = worst.max(((exp(x) - x.exp()) / x.exp()).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
    }

    /// A NaN among a row's values makes its exponentials' sum NaN on every lane width, as
    /// PyTorch's softmax does; finite values around it stay exact.
    #[test]
    fn exp_keeps_nan() {
        assert!(exp(f32::NAN).is_nan());
        for n in [3, 8, 16, 21] {
            for at in [0, n / 2, n - 1] {
                let mut a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 2.0).collect();
                a[at] = f32::NAN;
                let b = vec![0.0; n];
                for (name, (_, _, _, e, total)) in on_every_lane_type(&a, &b) {
                    assert!(e[at].is_nan() && total.is_nan(), "{name}, n {n}, NaN at {at}: {} / {total}", e[at]);
                    assert!((0..n).filter(|&j| j != at).all(|j| (e[j] - (a[j] - 1.5).exp()).abs() <= 1e-6 * (a[j] - 1.5).exp()), "{name}, n {n}");
                }
            }
        }
    }

    /// dot, max, axpy, exp_shifted's values and their sum.
    type Results = (f32, f32, Vec<f32>, Vec<f32>, f32);

    fn kernels<L: Lanes>(a: &[f32], b: &[f32]) -> Results {
        let mut y = b.to_vec();
        let mut e = a.to_vec();
        // SAFETY: the callers pass only lane types the CPU has.
        unsafe {
            axpy::<L>(&mut y, 0.7, a);
            let total = exp_shifted::<L>(&mut e, 1.5);
            (dot::<L>(a, b), max::<L>(a), y, e, total)
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn on_avx2(a: &[f32], b: &[f32]) -> Results {
        kernels::<crate::ops::lanes::Avx2>(a, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn on_avx512(a: &[f32], b: &[f32]) -> Results {
        kernels::<crate::ops::lanes::Avx512>(a, b)
    }

    /// [`kernels`] on each lane type this CPU has, by name.
    fn on_every_lane_type(a: &[f32], b: &[f32]) -> Vec<(&'static str, Results)> {
        let mut got = vec![("f32", kernels::<f32>(a, b))];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: each entry point runs only where the CPU has its features.
        unsafe {
            if isa() != Isa::Portable {
                got.push(("avx2", on_avx2(a, b)));
            }
            if isa() == Isa::Avx512 {
                got.push(("avx512", on_avx512(a, b)));
            }
        }
        got
    }

    /// Each lane width against plain loops, with lengths on and off the widths.
    #[test]
    fn every_lane_type_matches_plain_loops() {
        for n in [0, 5, 8, 16, 37, 64, 77] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let got = on_every_lane_type(&a, &b);
            let want_dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let want_max = a.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            for (name, (d, m, y, e, total)) in got {
                assert!((d as f64 - want_dot).abs() < 1e-4, "{name} dot, n {n}");
                assert_eq!(m, want_max, "{name} max, n {n}");
                for j in 0..n {
                    assert!((y[j] - (0.7 * a[j] + b[j])).abs() < 1e-5, "{name} axpy, n {n}");
                    let want = (a[j] - 1.5).exp();
                    assert!((e[j] - want).abs() <= 1e-6 * want, "{name} exp, n {n}: {} vs {want}", e[j]);
                }
                let want_total: f32 = (0..n).map(|j| (a[j] - 1.5).exp()).sum();
                assert!((total - want_total).abs() <= 1e-5 * want_total.max(1.0), "{name} exp sum, n {n}");
            }
        }
    }
}
