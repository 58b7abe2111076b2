//! Learning-rate schedules with diffusers' names and shapes (`get_scheduler`).
use serde::{Deserialize, Serialize};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    #[value(alias = "constant-with-warmup")]
    ConstantWithWarmup,
    Cosine,
}

impl LrSchedule {
    pub const NAMES: &'static str = "constant, constant_with_warmup, cosine";

    pub fn parse(name: &str) -> Option<Self> {
        match name.replace('-', "_").as_str() {
            "constant" => Some(Self::Constant),
            "constant_with_warmup" => Some(Self::ConstantWithWarmup),
            "cosine" => Some(Self::Cosine),
            _ => None,
        }
    }

    /// The multiplier of the base rate at optimizer step `step` (0-based) of `total`.
    /// Warm-up is linear from 0; cosine decays to 0 over the remaining steps (half a cycle).
    pub fn factor(self, step: u64, warmup: u64, total: u64) -> f64 {
        if self == Self::Constant {
            return 1.0;
        }
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        match self {
            Self::Cosine => {
                let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
            }
            _ => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LrSchedule::*;

    #[test]
    fn shapes_match_diffusers() {
        assert_eq!(Constant.factor(0, 10, 100), 1.0);
        assert_eq!(ConstantWithWarmup.factor(5, 10, 100), 0.5);
        assert_eq!(ConstantWithWarmup.factor(50, 10, 100), 1.0);
        assert_eq!(Cosine.factor(0, 10, 100), 0.0);
        assert!((Cosine.factor(10, 10, 100) - 1.0).abs() < 1e-12);
        assert!((Cosine.factor(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(Cosine.factor(100, 10, 100).abs() < 1e-12);
    }
}
