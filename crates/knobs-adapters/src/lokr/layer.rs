use knobs_nn::{Device, Init, Tensor};

use crate::PeftType;
use crate::lycoris::{DeltaShape, Factor, WeightFactors, kaiming, tucker};

/// Splits `dimension` into `(m, n)`, `m <= n`, `m * n = dimension`: `m = factor` when it
/// divides; otherwise the divisor pair nearest the square root with `m <= factor` (LyCORIS's
/// and PEFT's `factorization`, whose exact search this follows).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        return (factor as usize, dimension / factor as usize);
    }
    let factor = if factor == -1 { dimension } else { factor.max(0) as usize };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n { (n, m) } else { (m, n) }
}

/// LoKr's factors: `lokr_w1` `[a, c]` or `lokr_w1_a` `[a, r]` x `lokr_w1_b` `[r, c]`;
/// `lokr_w2` `[b, d(, k, k)]`, or `lokr_w2_a` `[b, r]` x `lokr_w2_b` `[r, d*k*k]`, or a Tucker
/// core `lokr_t2` `[r, r, k, k]` with `lokr_w2_a` `[r, b]`, `lokr_w2_b` `[r, d]`; where
/// out = a*b and in = c*d.
#[derive(Debug, Clone)]
pub struct Kron {
    pub params: Vec<(&'static str, Factor)>,
}

/// How [`Kron::new`] lays out one layer's factors.
#[derive(Debug, Clone, PartialEq)]
pub struct KronPlan {
    /// `(a, b)` with out = a*b, and `(c, d)` with in = c*d.
    pub out: (usize, usize),
    pub c_in: (usize, usize),
    pub kernel: (usize, usize),
    pub full_w1: bool,
    pub full_w2: bool,
    pub cp: bool,
    /// A convolution keeps a full `w2` 4-D, even 1x1 (PEFT's shapes).
    pub conv: bool,
}

impl KronPlan {
    /// PEFT's `update_layer` choices for weight `[out, in, kh, kw]` (k = 1 for Linear).
    pub fn new(shape: [usize; 4], r: usize, factor: i64, decompose_both: bool, use_effective_conv2d: bool, conv: bool) -> Self {
        let [out, c_in, kh, kw] = shape;
        let (a, b) = factorization(out, factor);
        let (c, d) = factorization(c_in, factor);
        let half = |x: usize, y: usize| (r as f64) < x.max(y) as f64 / 2.0;
        KronPlan {
            out: (a, b),
            c_in: (c, d),
            kernel: (kh, kw),
            full_w1: !(decompose_both && half(a, c)),
            full_w2: !half(b, d),
            cp: conv && use_effective_conv2d && kh * kw > 1,
            conv,
        }
    }
}

impl Kron {
    /// PEFT's default init (`init_weights=True`): `w1` (or `w1_a`) zero, the rest
    /// Kaiming-uniform; `lycoris`: `w2` (or `w2_b`) zero instead; `random`: nothing zero.
    pub fn new(plan: &KronPlan, r: usize, init_kind: KronInit, init: &mut Init, device: &Device) -> Self {
        let ((a, b), (c, d), (kh, kw)) = (plan.out, plan.c_in, plan.kernel);
        let draw2 = |shape: [usize; 2], zero: bool, init: &mut Init| Factor::D2(if zero { Tensor::zeros(shape, device) } else { kaiming(shape, init, device) });
        let zero_w1 = init_kind == KronInit::Peft;
        let zero_w2 = init_kind == KronInit::Lycoris;
        let mut params = Vec::new();
        if plan.full_w1 {
            params.push(("lokr_w1", draw2([a, c], zero_w1, init)));
        } else {
            params.push(("lokr_w1_a", draw2([a, r], zero_w1, init)));
            params.push(("lokr_w1_b", draw2([r, c], false, init)));
        }
        if plan.full_w2 {
            let w2 = if plan.conv {
                Factor::D4(if zero_w2 { Tensor::zeros([b, d, kh, kw], device) } else { kaiming([b, d, kh, kw], init, device) })
            } else {
                draw2([b, d], zero_w2, init)
            };
            params.push(("lokr_w2", w2));
        } else if plan.cp {
            params.push(("lokr_t2", Factor::D4(kaiming([r, r, kh, kw], init, device))));
            params.push(("lokr_w2_a", draw2([r, b], false, init)));
            params.push(("lokr_w2_b", draw2([r, d], zero_w2, init)));
        } else {
            params.push(("lokr_w2_a", draw2([b, r], false, init)));
            params.push(("lokr_w2_b", draw2([r, d * kh * kw], zero_w2, init)));
        }
        Kron { params }
    }

    fn find(&self, name: &str) -> Option<&Factor> {
        self.params.iter().find(|(n, _)| *n == name).map(|(_, f)| f)
    }
    fn get(&self, name: &str) -> &Factor {
        self.find(name).expect("factor created by Kron::new")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KronInit {
    Peft,
    Lycoris,
    Random,
}

/// `kron(w1, w2)` for `w1` `[a, c]` and `w2` `[b, d]` -> `[a*b, c*d]`.
fn kron2(w1: Tensor<2>, w2: Tensor<2>) -> Tensor<2> {
    let ([a, c], [b, d]) = (w1.dims(), w2.dims());
    let k = w1.reshape([a, 1, c, 1]) * w2.reshape([1, b, 1, d]);
    k.reshape([a * b, c * d])
}

impl WeightFactors for Kron {
    const METHOD: &'static str = PeftType::Lokr.as_str();
    fn factors(&self) -> &[(&'static str, Factor)] {
        &self.params
    }
    fn factors_mut(&mut self) -> &mut [(&'static str, Factor)] {
        &mut self.params
    }
    fn delta(&self) -> DeltaShape {
        let w1 = match self.find("lokr_w1") {
            Some(w) => w.d2(),
            None => self.get("lokr_w1_a").d2().matmul(self.get("lokr_w1_b").d2()),
        };
        // A 4-D w2 [b, d, k, k]: kron with w1 [a, c, 1, 1] is the 2-D kron of w1 with w2
        // flattened to [b, d*k*k], read back as [a*b, c*d, k, k].
        let w2: Tensor<2> = match (self.find("lokr_w2"), self.find("lokr_t2")) {
            (Some(Factor::D2(w)), _) => w.clone(),
            (Some(Factor::D4(w)), _) => {
                let [b, d, kh, kw] = w.dims();
                return DeltaShape::D4(kron4(w1, w.clone(), [b, d, kh, kw]));
            }
            (None, Some(t)) => {
                let w = tucker(t.d4(), self.get("lokr_w2_a").d2(), self.get("lokr_w2_b").d2());
                let dims = w.dims();
                return DeltaShape::D4(kron4(w1, w, dims));
            }
            (None, None) => self.get("lokr_w2_a").d2().matmul(self.get("lokr_w2_b").d2()),
        };
        DeltaShape::D2(kron2(w1, w2))
    }
}

fn kron4(w1: Tensor<2>, w2: Tensor<4>, [b, d, kh, kw]: [usize; 4]) -> Tensor<4> {
    let [a, c] = w1.dims();
    kron2(w1, w2.reshape([b, d * kh * kw])).reshape([a * b, c * d, kh, kw])
}
