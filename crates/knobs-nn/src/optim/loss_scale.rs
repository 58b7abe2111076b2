//! Dynamic loss scaling for fp16 mixed precision, with the constants and rules of PyTorch's
//! `GradScaler`: small gradients would flush to zero in fp16, so the loss is multiplied by a
//! large scale before the backward pass and the gradients divided by it after. A step whose
//! gradients overflowed is skipped and the scale halved; after 2000 good steps in a row it
//! doubles.
use super::{Grads, grad_norm};

const INITIAL_SCALE: f64 = 65536.0;
const GROWTH_FACTOR: f64 = 2.0;
const BACKOFF_FACTOR: f64 = 0.5;
const GROWTH_INTERVAL: u32 = 2000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaler {
    scale: f64,
    good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler { scale: INITIAL_SCALE, good_steps: 0 }
    }
}

impl LossScaler {
    /// What to multiply the loss by before the backward pass.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Divides `grads` by the scale and updates it; false when some gradient is not finite
    /// (the optimizer step must then be skipped).
    pub fn unscale_and_update(&mut self, grads: &mut Grads) -> bool {
        let inverse = 1.0 / self.scale;
        for g in grads.values_mut() {
            *g = g.clone() * inverse;
        }
        if !grad_norm(grads).is_finite() {
            self.scale *= BACKOFF_FACTOR;
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == GROWTH_INTERVAL {
            self.scale *= GROWTH_FACTOR;
            self.good_steps = 0;
        }
        true
    }

    /// The state as text, for checkpoints (`scale good_steps`).
    pub fn encode(&self) -> String {
        format!("{} {}", self.scale, self.good_steps)
    }

    pub fn decode(text: &str) -> Option<LossScaler> {
        let (scale, good) = text.split_once(' ')?;
        let scaler = LossScaler { scale: scale.parse().ok()?, good_steps: good.parse().ok()? };
        (scaler.scale.is_finite() && scaler.scale > 0.0 && scaler.good_steps < GROWTH_INTERVAL).then_some(scaler)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu;
    use burn::tensor::Tensor;

    fn grads(v: f32) -> Grads {
        Grads::from([("w".to_string(), Tensor::<1>::from_floats([v, 2.0 * v], &cpu()))])
    }

    #[test]
    fn overflow_skips_and_halves_good_steps_grow_it() {
        let mut s = LossScaler::default();
        let mut g = grads(65536.0);
        assert!(s.unscale_and_update(&mut g));
        let v: Vec<f32> = g["w"].clone().into_data().try_into_vec().unwrap();
        assert_eq!(v, [1.0, 2.0], "gradients divided by the scale");
        assert!(!s.unscale_and_update(&mut grads(f32::INFINITY)));
        assert_eq!(s.scale(), 32768.0);
        for _ in 0..GROWTH_INTERVAL {
            assert!(s.unscale_and_update(&mut grads(1.0)));
        }
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(LossScaler::decode(&s.encode()), Some(s));
        assert_eq!(LossScaler::decode("0 3"), None);
    }
}
