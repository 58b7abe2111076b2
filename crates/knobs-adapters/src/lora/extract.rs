//! A LoRA from the difference of two models (kohya's `extract_lora_from_models`): each
//! adaptable layer's `W_tuned - W_base`, truncated by SVD to the rank asked for, becomes the
//! LoRA of that layer. The model being adapted is the base; layers that did not change get none.
use std::collections::HashMap;

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Device, LayerRef, Module, ModuleExt, Tensor};

use super::combine::{install_all, svd_truncated};
use crate::{AdaptedModel, AdapterError, Result};

/// One layer's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    pub path: String,
    pub rank: usize,
    /// `|delta - B A| / |delta|` (Frobenius): what the rank cut leaves out.
    pub rel_error: f64,
}

/// A layer's weight as `[out, in * k * k]` f32 values with its device, for Linear and (with
/// `convs`) Conv2d.
fn weight(layer: &LayerRef<'_>, convs: bool) -> Option<(Vec<f32>, [usize; 2], Device)> {
    let (data, shape, device) = match layer {
        LayerRef::Linear(l) => (l.weight.to_data(), l.weight.dims(), l.weight.device()),
        LayerRef::Conv2d(c) if convs => {
            let [o, i, kh, kw] = c.weight.dims();
            (c.weight.to_data(), [o, i * kh * kw], c.weight.device())
        }
        _ => return None,
    };
    Some((data.convert::<f32>().try_into_vec::<f32>().ok()?, shape, device))
}

/// Adds LoRA adapter `name` (active, frozen) to `model` holding, on every Linear (and with
/// `convs` every Conv2d) layer whose weight differs from `tuned`'s, the rank-`rank` SVD of
/// the difference. `tuned` must have the same layers and shapes. Returns one row per
/// adapted layer; none (and no adapter) when no layer differs.
pub fn extract<M: Module, T: Module + ?Sized>(model: &mut AdaptedModel<M>, tuned: &T, name: &str, rank: usize, convs: bool) -> Result<Vec<Extracted>> {
    if rank == 0 {
        return Err(AdapterError::Config("extract: the rank must be at least 1".into()));
    }
    if model.config(name).is_ok() {
        return Err(AdapterError::Config(format!("extract: an adapter named `{name}` is already loaded")));
    }
    let mut theirs: HashMap<String, (Vec<f32>, [usize; 2])> = HashMap::new();
    tuned.for_each_layer(|path, layer| {
        if let Some((values, shape, _)) = weight(&layer, convs) {
            theirs.insert(path.to_string(), (values, shape));
        }
    });
    let mut planned = Vec::new();
    let mut error = None;
    model.model.for_each_layer(|path, layer| {
        let Some((ours, shape, device)) = weight(&layer, convs).filter(|_| error.is_none()) else { return };
        let Some((t, tshape)) = theirs.get(path) else {
            error = Some(AdapterError::Config(format!("extract: the tuned model has no layer `{path}`")));
            return;
        };
        if *tshape != shape {
            error = Some(AdapterError::Config(format!("extract: `{path}` is {shape:?} in the base and {tshape:?} in the tuned model")));
            return;
        }
        let delta: Vec<f32> = t.iter().zip(&ours).map(|(a, b)| a - b).collect();
        if delta.iter().all(|d| *d == 0.0) {
            return;
        }
        let delta = Tensor::<2>::from_data(TensorData::new(delta, shape), &device);
        match svd_truncated(delta, |_| rank) {
            Some((a, b, sigma)) => {
                let k = a.dims()[0];
                let total: f64 = sigma.iter().map(|s| s * s).sum();
                let left: f64 = sigma[k..].iter().map(|s| s * s).sum();
                planned.push((path.to_string(), a, b, Extracted { path: path.to_string(), rank: k, rel_error: (left / total).sqrt() }));
            }
            None => error = Some(AdapterError::Config(format!("extract: the difference on `{path}` is not finite"))),
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    if planned.is_empty() {
        return Ok(Vec::new());
    }
    let (factors, rows): (Vec<_>, Vec<_>) = planned.into_iter().map(|(p, a, b, r)| ((p, a, b), r)).unzip();
    install_all(model, name, factors)?;
    model.freeze();
    Ok(rows)
}
