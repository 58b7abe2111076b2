//! Down-ranking a LoRA, as kohya's `resize_lora`: each layer's update `scale B A` is replaced by
//! its best rank-k approximation (truncated SVD), k fixed or the smallest that keeps a given
//! fraction of the update's energy (the sum of its squared singular values).
use knobs_nn::ModuleExt;

use super::combine::{factors, install_all, svd_truncated};
use super::LoraConfig;
use crate::{AdaptedModel, AdapterError, PeftType, Result};

/// How many ranks each layer keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankTarget {
    /// At most this rank (a layer of lower rank keeps its own).
    Rank(usize),
    /// The smallest rank whose singular values hold this fraction of the energy, in (0, 1].
    Energy(f64),
}

/// One layer's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Resized {
    pub path: String,
    pub from: usize,
    pub to: usize,
    /// The fraction of the update's energy the kept ranks hold.
    pub energy: f64,
}

/// Replaces LoRA adapter `name` of `model` by its rank-reduced approximation, in place (scale
/// folded into the factors). The adapter must not be merged. On an error the model is as it was.
pub fn resize<M: knobs_nn::Module>(model: &mut AdaptedModel<M>, name: &str, target: RankTarget) -> Result<Vec<Resized>> {
    let config = model.config(name)?;
    let dora = LoraConfig::is_dora(config);
    if config.peft_type() != PeftType::Lora || dora {
        return Err(AdapterError::Config(format!("resize: adapter `{name}` is {}, only plain LoRA resizes", if dora { "DoRA".to_string() } else { config.peft_type().to_string() })));
    }
    match target {
        RankTarget::Rank(0) => return Err(AdapterError::Config("resize: the rank must be at least 1".into())),
        RankTarget::Energy(e) if !(e > 0.0 && e <= 1.0) => return Err(AdapterError::Config(format!("resize: the energy fraction must be in (0, 1], got {e}"))),
        _ => {}
    }
    // Computed first, installed after: a failure part-way leaves every layer as it was.
    let mut planned = Vec::new();
    let mut error = None;
    model.model.for_each_layer_mut(|path, layer| {
        let Some(f) = factors(&layer, name).filter(|_| error.is_none()) else { return };
        let from = f.a.dims()[0];
        let delta = f.b.matmul(f.a) * f.scale;
        let keep = |sigma: &[f64]| match target {
            RankTarget::Rank(r) => r.min(from),
            RankTarget::Energy(e) => {
                let total: f64 = sigma.iter().map(|s| s * s).sum();
                let mut kept = 0.0;
                sigma.iter().position(|s| {
                    kept += s * s;
                    kept >= e * total
                }).map_or(sigma.len(), |i| i + 1).min(from)
            }
        };
        match svd_truncated(delta, keep) {
            Some((a, b, sigma)) => {
                let to = a.dims()[0];
                let total: f64 = sigma.iter().map(|s| s * s).sum();
                let energy = if total > 0.0 { sigma[..to].iter().map(|s| s * s).sum::<f64>() / total } else { 1.0 };
                planned.push((path.to_string(), a, b, Resized { path: path.to_string(), from, to, energy }));
            }
            None => error = Some(AdapterError::Config(format!("resize: adapter `{name}` on `{path}` is not finite (NaN or infinity)"))),
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    if planned.is_empty() {
        return Err(AdapterError::Config(format!("resize: no layer carries adapter `{name}`")));
    }
    // The scale is folded into the factors: alpha = rank, scale 1.
    let (factors, results): (Vec<_>, Vec<_>) = planned.into_iter().map(|(p, a, b, r)| ((p, a, b), r)).unzip();
    install_all(model, name, factors)?;
    Ok(results)
}
