use knobs_nn::{Device, Init, Tensor};

use crate::PeftType;
use crate::lycoris::{DeltaShape, Factor, WeightFactors, kaiming, tucker};

/// LoHa's factors. Flat: `hada_w1_a` / `hada_w2_a` `[out, r]`, `hada_w1_b` / `hada_w2_b`
/// `[r, in*k*k]`. With Tucker cores: `hada_t1` / `hada_t2` `[r, r, k, k]`, `*_a` `[r, out]`,
/// `*_b` `[r, in]`. PEFT's and LyCORIS's names and shapes.
#[derive(Debug, Clone)]
pub struct Hada {
    pub params: Vec<(&'static str, Factor)>,
}

impl Hada {
    /// PEFT's init: every factor Kaiming-uniform except `hada_w2_b`, zero, so that the new
    /// adapter changes nothing; `random` draws that one too.
    pub fn new(shape: [usize; 4], r: usize, cp: bool, random: bool, init: &mut Init, device: &Device) -> Self {
        let [out, c_in, kh, kw] = shape;
        let mut params = Vec::new();
        for i in ["1", "2"] {
            let (a, b) = (if i == "1" { "hada_w1_a" } else { "hada_w2_a" }, if i == "1" { "hada_w1_b" } else { "hada_w2_b" });
            let zero_b = i == "2" && !random;
            if cp {
                let t = if i == "1" { "hada_t1" } else { "hada_t2" };
                params.push((t, Factor::D4(kaiming([r, r, kh, kw], init, device))));
                params.push((a, Factor::D2(kaiming([r, out], init, device))));
                params.push((b, Factor::D2(if zero_b { Tensor::zeros([r, c_in], device) } else { kaiming([r, c_in], init, device) })));
            } else {
                params.push((a, Factor::D2(kaiming([out, r], init, device))));
                params.push((b, Factor::D2(if zero_b { Tensor::zeros([r, c_in * kh * kw], device) } else { kaiming([r, c_in * kh * kw], init, device) })));
            }
        }
        Hada { params }
    }

    fn get(&self, name: &str) -> &Factor {
        &self.params.iter().find(|(n, _)| *n == name).expect("factor created by Hada::new").1
    }
    fn is_cp(&self) -> bool {
        self.params.iter().any(|(n, _)| *n == "hada_t1")
    }
}

impl WeightFactors for Hada {
    const METHOD: &'static str = PeftType::Loha.as_str();
    fn factors(&self) -> &[(&'static str, Factor)] {
        &self.params
    }
    fn factors_mut(&mut self) -> &mut [(&'static str, Factor)] {
        &mut self.params
    }
    fn delta(&self) -> DeltaShape {
        if self.is_cp() {
            let one = tucker(self.get("hada_t1").d4(), self.get("hada_w1_a").d2(), self.get("hada_w1_b").d2());
            let two = tucker(self.get("hada_t2").d4(), self.get("hada_w2_a").d2(), self.get("hada_w2_b").d2());
            DeltaShape::D4(one * two)
        } else {
            let one = self.get("hada_w1_a").d2().matmul(self.get("hada_w1_b").d2());
            let two = self.get("hada_w2_a").d2().matmul(self.get("hada_w2_b").d2());
            DeltaShape::D2(one * two)
        }
    }
}
