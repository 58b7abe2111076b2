//! Attention for small heads (head_dim <= 8, as tiny-sd's 4): with so few channels the
//! multi-pass kernel of `attention_kernel` spends its time streaming each row's scores through
//! memory, once per channel. Here every step of a row is one pass over the keys, a vector of
//! keys at a time: a head's channels fit in registers, so scores, softmax and the weighted sums
//! (forward), or probabilities and all three gradients (backward), come out of one load of
//! each key and value.
//!
//! Same layouts, tasks and fixed summation order as `attention_kernel`, so results are
//! bit-identical for any thread count.
use super::attention_kernel::{KeyArgs, KeyBlockGrads, RowArgs};
use super::lanes::{Lanes, on_lanes};

/// The largest head_dim these kernels take.
pub const MAX_HEAD_DIM: usize = 8;

macro_rules! for_head_dim {
    ($d:expr, $f:ident :: <$l:ty>, $args:expr) => {
        match $d {
            1 => $f::<$l, 1>($args),
            2 => $f::<$l, 2>($args),
            3 => $f::<$l, 3>($args),
            4 => $f::<$l, 4>($args),
            5 => $f::<$l, 5>($args),
            6 => $f::<$l, 6>($args),
            7 => $f::<$l, 7>($args),
            _ => $f::<$l, 8>($args),
        }
    };
}

on_lanes! {
    /// One (batch, head, row block)'s output rows `[rows, d]` and log-sum-exp, on `isa`'s
    /// lanes, which the caller has checked the CPU has (see [`super::lanes::isa`]).
    pub fn forward_rows(args: RowArgs) -> (Vec<f32>, Vec<f32>) {
        L => {
            assert!(args.dims.head_dim <= MAX_HEAD_DIM);
            for_head_dim!(args.dims.head_dim, forward_rows_with::<L>, args)
        }
    }
}

on_lanes! {
    /// One (batch, head, key block)'s share of the gradients, as [`forward_rows`].
    pub fn backward_keys(args: KeyArgs) -> KeyBlockGrads {
        L => {
            assert!(args.dims.head_dim <= MAX_HEAD_DIM);
            for_head_dim!(args.dims.head_dim, backward_keys_with::<L>, args)
        }
    }
}

/// `L::W` keys (or values) from `j` of a head's `[d, M]` rows, one vector per channel.
#[inline(always)]
unsafe fn load_channels<L: Lanes, const D: usize>(kt: *const f32, m: usize, j: usize) -> [L; D] {
    let mut k = [unsafe { L::splat(0.0) }; D];
    for (c, k) in k.iter_mut().enumerate() {
        *k = unsafe { L::load(kt.add(c * m + j)) };
    }
    k
}

#[inline(always)]
unsafe fn dot_lanes<L: Lanes, const D: usize>(a: &[L; D], b: &[L; D]) -> L {
    unsafe {
        let mut s = L::mul(a[0], b[0]);
        for c in 1..D {
            s = L::fma(a[c], b[c], s);
        }
        s
    }
}

#[inline(always)]
unsafe fn forward_rows_with<L: Lanes, const D: usize>(a: RowArgs) -> (Vec<f32>, Vec<f32>) {
    let m = a.dims.m;
    let width = a.dims.width();
    let body = m - m % L::W;
    let (kt, vt) = (a.kt.as_ptr(), a.vt.as_ptr());
    let mut out = vec![0.0f32; a.rows.len() * D];
    let mut lse = vec![0.0f32; a.rows.len()];
    let mut s = vec![0.0f32; m];
    let sp = s.as_mut_ptr();
    for (r, i) in a.rows.clone().enumerate() {
        let q = &a.q[(a.b * a.dims.n + i) * width + a.h * D..][..D];
        // SAFETY (all pointer reads and writes): j + W <= m within each [d, M] row of kt / vt
        // and within s; the tail loops use one lane.
        unsafe {
            let qv: [L; D] = std::array::from_fn(|c| L::splat(q[c] * a.scale));
            let q1: [f32; D] = std::array::from_fn(|c| q[c] * a.scale);
            // Pass 1: scores and their maximum.
            let mut top = L::splat(f32::NEG_INFINITY);
            let mut j = 0;
            while j < body {
                let sc = dot_lanes(&qv, &load_channels::<L, D>(kt, m, j));
                sc.store(sp.add(j));
                top = top.max(sc);
                j += L::W;
            }
            let mut top = top.hmax();
            for j in body..m {
                let sc = dot_lanes(&q1, &load_channels::<f32, D>(kt, m, j));
                *sp.add(j) = sc;
                top = if sc > top { sc } else { top };
            }
            // Pass 2: probabilities, their sum and the weighted values.
            let (tv, mut total) = (L::splat(top), L::splat(0.0));
            let mut acc = [L::splat(0.0); D];
            let mut j = 0;
            while j < body {
                let p = L::load(sp.add(j)).sub(tv).exp();
                total = total.add(p);
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = L::fma(p, L::load(vt.add(c * m + j)), *acc);
                }
                j += L::W;
            }
            let mut total = total.sum();
            let mut acc1: [f32; D] = std::array::from_fn(|c| acc[c].sum());
            for j in body..m {
                let p = Lanes::exp(*sp.add(j) - top);
                total += p;
                for (c, acc) in acc1.iter_mut().enumerate() {
                    *acc = p.mul_add(*vt.add(c * m + j), *acc);
                }
            }
            let inv = 1.0 / total;
            for c in 0..D {
                out[r * D + c] = acc1[c] * inv;
            }
            lse[r] = top + total.ln();
        }
    }
    (out, lse)
}

#[inline(always)]
unsafe fn backward_keys_with<L: Lanes, const D: usize>(a: KeyArgs) -> KeyBlockGrads {
    let (n, m) = (a.dims.n, a.dims.m);
    let width = a.dims.width();
    let (start, len) = (a.keys.start, a.keys.len());
    let body = len - len % L::W;
    // This block's keys and values: row c of each starts at c * m.
    let (kt, vt) = unsafe { (a.kt.as_ptr().add(start), a.vt.as_ptr().add(start)) };
    let mut dkt = vec![0.0f32; D * len];
    let mut dvt = vec![0.0f32; D * len];
    let mut dq = vec![0.0f32; n * D];
    let (dk, dv) = (dkt.as_mut_ptr(), dvt.as_mut_ptr());
    for i in 0..n {
        let at = (a.b * n + i) * width + a.h * D;
        let (q, go) = (&a.q[at..][..D], &a.grad[at..][..D]);
        // SAFETY (all pointer reads and writes): j + W <= len within this block's part of each
        // [d, M] row of kt / vt and within each [d, len] row of dkt / dvt.
        unsafe {
            let qs1: [f32; D] = std::array::from_fn(|c| q[c] * a.scale);
            let go1: [f32; D] = std::array::from_fn(|c| go[c]);
            let qs: [L; D] = std::array::from_fn(|c| L::splat(qs1[c]));
            let gv: [L; D] = std::array::from_fn(|c| L::splat(go1[c]));
            let (lse, di) = (L::splat(a.lse[i]), L::splat(a.delta[i]));
            let mut dq_acc = [L::splat(0.0); D];
            let mut j = 0;
            while j < body {
                let k = load_channels::<L, D>(kt, m, j);
                let p = dot_lanes(&qs, &k).sub(lse).exp();
                let v = load_channels::<L, D>(vt, m, j);
                // dS_j = p_j (dO_i . v_j - D_i)
                let ds = p.mul(dot_lanes(&gv, &v).sub(di));
                for c in 0..D {
                    dq_acc[c] = L::fma(ds, k[c], dq_acc[c]);
                    let pk = dk.add(c * len + j);
                    L::fma(qs[c], ds, L::load(pk)).store(pk);
                    let pv = dv.add(c * len + j);
                    L::fma(gv[c], p, L::load(pv)).store(pv);
                }
                j += L::W;
            }
            let mut dq1: [f32; D] = std::array::from_fn(|c| dq_acc[c].sum());
            let (lse1, di1) = (a.lse[i], a.delta[i]);
            for j in body..len {
                let k = load_channels::<f32, D>(kt, m, j);
                let p = Lanes::exp(dot_lanes(&qs1, &k) - lse1);
                let v = load_channels::<f32, D>(vt, m, j);
                let ds = p * (dot_lanes(&go1, &v) - di1);
                for c in 0..D {
                    dq1[c] = ds.mul_add(k[c], dq1[c]);
                    *dk.add(c * len + j) = qs1[c].mul_add(ds, *dk.add(c * len + j));
                    *dv.add(c * len + j) = go1[c].mul_add(p, *dv.add(c * len + j));
                }
            }
            for c in 0..D {
                dq[i * D + c] = dq1[c] * a.scale;
            }
        }
    }
    KeyBlockGrads { dkt, dvt, dq }
}
