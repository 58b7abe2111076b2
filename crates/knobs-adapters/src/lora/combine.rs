//! Combining several LoRA adapters into a new one, as PEFT's `add_weighted_adapter`:
//! `linear` sums the factors (same ranks), `cat` stacks them (exact: the new delta is the
//! weighted sum of the deltas), `svd` takes the best rank-k approximation of that sum, `ties`
//! (Yadav et al. 2023, PEFT's `ties`) that of the deltas trimmed to their largest entries,
//! sign-elected and averaged where they agree.
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{LayerMut, Module, ModuleExt, Tensor};

use super::{LoraConfig, LoraConv2d, LoraEmbedding, LoraLinear};
use crate::{AdaptedModel, AdapterError, Pattern, PeftType, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Combination {
    Linear,
    Cat,
    Svd { rank: usize },
    /// TIES: each delta keeps its `density` fraction of largest entries, each entry takes the
    /// sign of the deltas' sum, agreeing weighted entries are averaged; then rank-k SVD.
    Ties { rank: usize, density: f64 },
}

/// `(A, B)` factors of one source as 2-D matrices `[r, in]`, `[out, r]` with its scale.
pub(super) struct Factors {
    pub(super) a: Tensor<2>,
    pub(super) b: Tensor<2>,
    pub(super) scale: f64,
}

pub(super) fn factors(layer: &LayerMut<'_>, name: &str) -> Option<Factors> {
    let any = layer.adapter(name)? as &dyn std::any::Any;
    if let Some(l) = any.downcast_ref::<LoraLinear>() {
        return Some(Factors { a: l.a.clone().inner(), b: l.b.clone().inner(), scale: l.scale });
    }
    if let Some(l) = any.downcast_ref::<LoraConv2d>() {
        let [r, c, kh, kw] = l.a.dims();
        let out = l.b.dims()[0];
        return Some(Factors { a: l.a.clone().inner().reshape([r, c * kh * kw]), b: l.b.clone().inner().reshape([out, r]), scale: l.scale });
    }
    if let Some(l) = any.downcast_ref::<LoraEmbedding>() {
        return Some(Factors { a: l.a.clone().inner(), b: l.b.clone().inner(), scale: l.scale });
    }
    None
}

/// Whether every value of `t` is finite: NaN or infinity in a source would spread through the
/// combined factors (and stall or break the SVD).
fn finite(t: &Tensor<2>) -> bool {
    t.to_data().convert::<f32>().as_slice::<f32>().is_ok_and(|v| v.iter().all(|x| x.is_finite()))
}

/// Builds the new adapter of `layer` from combined 2-D factors (scale 1: the sources' scales
/// and weights are folded into the factors).
pub(super) fn install(layer: LayerMut<'_>, name: &str, a: Tensor<2>, b: Tensor<2>) {
    match layer {
        LayerMut::Linear(l) => {
            l.adapters.insert(name, Box::new(LoraLinear { a, b, scale: 1.0, dropout: 0.0, training: false }));
        }
        LayerMut::Conv2d(l) => {
            let r = a.dims()[0];
            let k = l.kernel();
            let (stride, padding) = (l.stride, l.padding);
            let a = a.reshape([r, l.c_in(), k, k]);
            let b = b.reshape([l.c_out(), r, 1, 1]);
            l.adapters.insert(name, Box::new(LoraConv2d { a, b, scale: 1.0, dropout: 0.0, training: false, stride, padding }));
        }
        LayerMut::Embedding(l) => {
            l.adapters.insert(name, Box::new(LoraEmbedding { a, b, scale: 1.0 }));
        }
    }
}

/// Installs `planned` `(layer path, A, B)` factors as adapter `name` (scale 1, each layer its
/// own rank), registers its config (alpha = rank per module) and makes it active.
pub(super) fn install_all<M: Module>(model: &mut AdaptedModel<M>, name: &str, planned: Vec<(String, Tensor<2>, Tensor<2>)>) -> Result<()> {
    let modules: Vec<(String, usize, f64)> = planned.iter().map(|(p, a, _)| (p.clone(), a.dims()[0], a.dims()[0] as f64)).collect();
    let config = crate::formats::lora_files::config_for(std::path::Path::new(&format!("<adapter `{name}`>")), &modules, false)?;
    let mut factors: std::collections::HashMap<String, (Tensor<2>, Tensor<2>)> = planned.into_iter().map(|(p, a, b)| (p, (a, b))).collect();
    model.model.for_each_layer_mut(|path, layer| {
        if let Some((a, b)) = factors.remove(path) {
            install(layer, name, a, b);
        }
    });
    model.register(name, Box::new(config));
    model.set_state(name, |s| s.active = true);
    Ok(())
}

fn signed_sqrt(w: f64) -> (f64, f64) {
    let s = w.abs().sqrt();
    (s, if w < 0.0 { -s } else { s })
}

/// Rank-`k` factors `(A [k, in], B [out, k])` of `delta [out, in]` by SVD; `None` when
/// `delta` is not finite (finite sources can still overflow).
fn svd_factors(delta: Tensor<2>, k: usize) -> Option<(Tensor<2>, Tensor<2>)> {
    svd_truncated(delta, |_| k).map(|(a, b, _)| (a, b))
}

/// The best rank-k factors `(A [k, in], B [out, k])` of `delta [out, in]`, k chosen by
/// `rank(singular values, largest first)`, with the singular values; `None` when `delta` is
/// not finite.
pub(super) fn svd_truncated(delta: Tensor<2>, rank: impl FnOnce(&[f64]) -> usize) -> Option<(Tensor<2>, Tensor<2>, Vec<f64>)> {
    let [out, d_in] = delta.dims();
    let device = delta.device();
    let values: Vec<f32> = delta.into_data().convert::<f32>().try_into_vec().ok()?;
    if !values.iter().all(|v| v.is_finite()) {
        return None;
    }
    let m = nalgebra::DMatrix::from_row_slice(out, d_in, &values.iter().map(|&v| v as f64).collect::<Vec<_>>());
    let svd = m.svd(true, true);
    let (u, vt) = (svd.u?, svd.v_t?);
    // nalgebra does not sort singular values; take the k largest.
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let sigma: Vec<f64> = order.iter().map(|&i| svd.singular_values[i]).collect();
    let k = rank(&sigma).clamp(1, order.len());
    let mut a = Vec::with_capacity(k * d_in);
    for &i in &order[..k] {
        a.extend(vt.row(i).iter().map(|&v| v as f32));
    }
    let mut b = vec![0f32; out * k];
    for row in 0..out {
        for (j, &i) in order[..k].iter().enumerate() {
            b[row * k + j] = (u[(row, i)] * svd.singular_values[i]) as f32;
        }
    }
    Some((Tensor::from_data(TensorData::new(a, [k, d_in]), &device), Tensor::from_data(TensorData::new(b, [out, k]), &device), sigma))
}

/// PEFT's `ties` on `(delta, weight)` pairs: magnitude pruning to `density`, the majority
/// sign of the pruned deltas' sum, and the mean of the weighted entries that carry it.
fn ties(deltas: Vec<(Tensor<2>, f64)>, density: f64) -> Tensor<2> {
    let shape = deltas[0].0.dims();
    let device = deltas[0].0.device();
    let pruned: Vec<(Vec<f32>, f64)> = deltas
        .into_iter()
        .map(|(d, w)| {
            let mut v: Vec<f32> = d.into_data().convert::<f32>().try_into_vec().expect("f32");
            let keep = (density * v.len() as f64) as usize;
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_by(|&i, &j| v[j].abs().total_cmp(&v[i].abs()));
            for &i in &order[keep..] {
                v[i] = 0.0;
            }
            (v, w)
        })
        .collect();
    let n = pruned[0].0.len();
    let mut out = vec![0f32; n];
    for (i, o) in out.iter_mut().enumerate() {
        let total: f32 = pruned.iter().map(|(v, _)| v[i]).sum();
        let majority = if total >= 0.0 { 1.0 } else { -1.0 };
        let agreeing: Vec<f64> = pruned.iter().filter(|(v, _)| v[i] != 0.0 && v[i].signum() == majority).map(|(v, w)| v[i] as f64 * w).collect();
        *o = (agreeing.iter().sum::<f64>() / agreeing.len().max(1) as f64) as f32;
    }
    Tensor::from_data(TensorData::new(out, shape), &device)
}

/// Adds adapter `new_name` that combines `sources` (adapter name, weight) on every layer that
/// carries all of them. The new adapter is inactive until activated. On any error (sources
/// that differ in rank for `linear`, NaN or infinite values) the model is left as it was.
pub fn combine<M: Module>(model: &mut AdaptedModel<M>, sources: &[(&str, f64)], new_name: &str, how: Combination) -> Result<()> {
    if sources.is_empty() {
        return Err(AdapterError::Config("combine: no source adapters given".into()));
    }
    if model.config(new_name).is_ok() {
        return Err(AdapterError::Config(format!("combine: an adapter named `{new_name}` is already loaded; delete it first or pick another name")));
    }
    for (name, _) in sources {
        let cfg = model.config(name)?;
        if cfg.peft_type() != PeftType::Lora {
            return Err(AdapterError::Config(format!("combine: adapter `{name}` is {}, only LoRA adapters combine", cfg.peft_type())));
        }
    }
    let mut paths = Vec::new();
    let mut error = None;
    let mut new_rank = 0;
    model.model.for_each_layer_mut(|path, layer| {
        if error.is_some() {
            return;
        }
        let found: Vec<(Factors, f64)> = sources.iter().filter_map(|(n, w)| factors(&layer, n).map(|f| (f, *w))).collect();
        if found.len() != sources.len() {
            return;
        }
        let not_finite = sources.iter().zip(&found).find(|(_, (f, w))| !w.is_finite() || !finite(&f.a) || !finite(&f.b));
        if let Some(((name, _), _)) = not_finite {
            error = Some(AdapterError::Config(format!("combine: adapter `{name}` on `{path}` (or its weight) is not finite (NaN or infinity); fix or drop that adapter")));
            return;
        }
        let (a, b) = match how {
            Combination::Linear | Combination::Cat => {
                let ranks: Vec<usize> = found.iter().map(|(f, _)| f.a.dims()[0]).collect();
                if how == Combination::Linear && ranks.iter().any(|&r| r != ranks[0]) {
                    error = Some(AdapterError::Config(format!("combine linear: `{path}` has ranks {ranks:?}; linear needs equal ranks (use cat or svd)")));
                    return;
                }
                let scaled: Vec<(Tensor<2>, Tensor<2>)> = found
                    .into_iter()
                    .map(|(f, w)| {
                        let (sa, sb) = signed_sqrt(w * f.scale);
                        (f.a * sa, f.b * sb)
                    })
                    .collect();
                if how == Combination::Cat {
                    let (a, b): (Vec<_>, Vec<_>) = scaled.into_iter().unzip();
                    (Tensor::cat(a, 0), Tensor::cat(b, 1))
                } else {
                    scaled.into_iter().reduce(|(a1, b1), (a2, b2)| (a1 + a2, b1 + b2)).unwrap()
                }
            }
            Combination::Svd { rank } | Combination::Ties { rank, .. } => {
                let delta = match how {
                    Combination::Ties { density, .. } => ties(found.into_iter().map(|(f, w)| (f.b.matmul(f.a) * f.scale, w)).collect(), density),
                    _ => found.into_iter().map(|(f, w)| f.b.matmul(f.a) * (w * f.scale)).reduce(|x, y| x + y).unwrap(),
                };
                match svd_factors(delta, rank) {
                    Some(ab) => ab,
                    None => {
                        let names: Vec<&str> = sources.iter().map(|s| s.0).collect();
                        error = Some(AdapterError::Config(format!("combine svd: the weighted sum of {names:?} on `{path}` is not finite (it overflows)")));
                        return;
                    }
                }
            }
        };
        new_rank = a.dims()[0];
        install(layer, new_name, a, b);
        paths.push(path.to_string());
    });
    if let Some(e) = error {
        // Layers visited before the failure already carry the new adapter.
        model.remove_from_layers(new_name);
        return Err(e);
    }
    if paths.is_empty() {
        return Err(AdapterError::Config(format!("combine: no layer carries all of {:?}", sources.iter().map(|s| s.0).collect::<Vec<_>>())));
    }
    let config = LoraConfig::new(new_rank, new_rank as f64, Pattern::Names(paths));
    model.register(new_name, Box::new(config));
    model.set_state(new_name, |s| s.active = false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand, as PEFT's `ties` computes it: prune to the top half by magnitude, elect the
    /// sign of the sum (ties to +), average the weighted entries that agree, zeros never vote.
    #[test]
    fn ties_trims_elects_and_averages() {
        let dev = knobs_nn::cpu();
        let t = |v: [f32; 4]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [1, 4]), &dev);
        let out = ties(vec![(t([3.0, -1.0, 2.0, 0.5]), 1.0), (t([-2.0, -4.0, 1.0, 0.1]), 0.5)], 0.5);
        let v: Vec<f32> = out.into_data().convert::<f32>().try_into_vec().unwrap();
        assert_eq!(v, [3.0, -2.0, 2.0, 0.0]);
    }
}
