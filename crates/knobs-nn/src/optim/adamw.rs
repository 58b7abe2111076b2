use std::collections::{BTreeMap, HashMap};

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Grads, flex_f32};
use crate::ops::fresh::written;
use crate::io::TensorRef;
use crate::module::{Module, ModuleExt};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults.
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// AdamW with decoupled weight decay, step for step the same arithmetic as `torch.optim.AdamW`.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken per parameter (PyTorch keeps one count per parameter).
    steps: BTreeMap<String, u64>,
    moments: BTreeMap<String, (Tensor<1>, Tensor<1>)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, steps: BTreeMap::new(), moments: BTreeMap::new() }
    }

    /// The tail of a plain training step: backpropagates `loss`, clips the trainable
    /// parameters' gradients to a global L2 norm of `max_norm` and steps every one at `lr`.
    /// Returns the norm before clipping. Loops that scale gradients per block or accumulate
    /// them over micro-batches call [`AdamW::step`] themselves.
    pub fn minimise<M: Module + ?Sized>(&mut self, model: &mut M, loss: Tensor<1>, max_norm: f64, lr: f64) -> f64 {
        let mut grads = super::collect_grads(&*model, &loss.backward());
        let norm = super::clip_grad_norm(&mut grads, max_norm);
        self.step(model, &grads, |_| lr);
        norm
    }

    /// Updates every parameter that has a gradient in `grads`. `lr_of(path)` gives the
    /// learning rate for that parameter (the base rate times any per-block factor).
    pub fn step<M: Module + ?Sized>(&mut self, model: &mut M, grads: &Grads, lr_of: impl Fn(&str) -> f64) {
        let c = self.config;
        model.for_each_param_mut(|path, mut p| {
            let Some(g) = grads.get(path) else { return };
            let lr = lr_of(path);
            let param = p.as_ref().flat();
            let (m, v) = self
                .moments
                .remove(path)
                .unwrap_or_else(|| (param.zeros_like(), param.zeros_like()));
            let t = self.steps.entry(path.to_string()).or_insert(0);
            *t += 1;
            let bias1 = 1.0 - c.beta1.powi(*t as i32);
            let bias2 = 1.0 - c.beta2.powi(*t as i32);
            let (param, m, v) = match (flex_f32(param.clone()), flex_f32(g.clone())) {
                // The moments are f32 where their parameter is (made from it or loaded beside it),
                // and move into the step unshared, so they are updated in place.
                (Some(pf), Some(gf)) => {
                    let moment = |t| flex_f32(t).expect("an f32 CPU parameter's moments are f32 on the CPU");
                    fused_step(&pf, &gf, moment(m), moment(v), c, lr, bias1, bias2, &param.device())
                }
                _ => tensor_step(&param, g, m, v, c, lr, bias1, bias2),
            };
            p.replace_flat(param);
            self.moments.insert(path.to_string(), (m, v));
        });
    }

    /// The optimizer state as named tensors (`exp_avg.<path>`, `exp_avg_sq.<path>`, shared)
    /// and metadata (`steps` as JSON), for checkpoints.
    pub fn state_refs(&self) -> (BTreeMap<String, TensorRef<'_>>, HashMap<String, String>) {
        let mut tensors = BTreeMap::new();
        for (path, (m, v)) in &self.moments {
            tensors.insert(format!("exp_avg.{path}"), TensorRef::flat(m));
            tensors.insert(format!("exp_avg_sq.{path}"), TensorRef::flat(v));
        }
        let mut meta = HashMap::new();
        meta.insert("adamw_steps".into(), serde_json::to_string(&self.steps).unwrap());
        meta.insert("adamw_config".into(), serde_json::to_string(&self.config).unwrap());
        (tensors, meta)
    }

    pub fn load_state(&mut self, sd: &crate::io::StateDict, device: &burn::tensor::Device) -> Result<()> {
        let meta = |k: &str| sd.metadata.get(k).ok_or_else(|| Error::key(&sd.file, k, "missing from the metadata"));
        self.steps = serde_json::from_str(meta("adamw_steps")?).map_err(|e| Error::key(&sd.file, "adamw_steps", e))?;
        self.moments.clear();
        for path in self.steps.keys() {
            let load = |k: String| -> Result<Tensor<1>> {
                let (v, _) = sd.f32(&k)?;
                let n = v.len();
                Ok(Tensor::from_data(TensorData::new(v, [n]), device))
            };
            let m = load(format!("exp_avg.{path}"))?;
            let v = load(format!("exp_avg_sq.{path}"))?;
            self.moments.insert(path.clone(), (m, v));
        }
        Ok(())
    }
}

/// One parameter's step from tensor ops (any backend): the new value and moments.
#[allow(clippy::too_many_arguments)]
fn tensor_step(param: &Tensor<1>, g: &Tensor<1>, m: Tensor<1>, v: Tensor<1>, c: AdamWConfig, lr: f64, bias1: f64, bias2: f64) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let param = param.clone() * (1.0 - lr * c.weight_decay);
    let m = m * c.beta1 + g.clone() * (1.0 - c.beta1);
    let v = v * c.beta2 + g.clone().powi_scalar(2) * (1.0 - c.beta2);
    let denom = v.clone().sqrt() / bias2.sqrt() + c.eps;
    (param - m.clone() / denom * (lr / bias1), m, v)
}

/// The step of one parameter in one pass over its values (CPU storage from
/// [`super::flex_f32`]), the moments updated in place (the tensor ops allocate a result for
/// each of their twelve steps). The same f32 operations in the same order, scalars rounded to
/// f32 as the ops round them, so the same bits.
#[allow(clippy::too_many_arguments)]
fn fused_step(p: &FlexTensor, g: &FlexTensor, mut m: FlexTensor, mut v: FlexTensor, c: AdamWConfig, lr: f64, bias1: f64, bias2: f64, device: &Device) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    const PIECE: usize = 1 << 14;
    let (p, g) = (p.as_slice::<f32>().expect("checked by flex_f32"), g.as_slice::<f32>().expect("checked by flex_f32"));
    let [decay, b1, nb1, b2, nb2, root2, eps, step] =
        [1.0 - lr * c.weight_decay, c.beta1, 1.0 - c.beta1, c.beta2, 1.0 - c.beta2, bias2.sqrt(), c.eps, lr / bias1].map(|x| x as f32);
    let pieces = if p.len() >= 4 * PIECE { 1 } else { usize::MAX };
    let (m_values, v_values) = (m.storage_mut::<f32>(), v.storage_mut::<f32>());
    // SAFETY: the pieces of `out` cover all of it, and each value of a piece is written.
    let out = unsafe {
        written(p.len(), |out| {
            out.par_chunks_mut(PIECE)
                .zip(m_values.par_chunks_mut(PIECE).zip(v_values.par_chunks_mut(PIECE)))
                .zip(p.par_chunks(PIECE).zip(g.par_chunks(PIECE)))
                .with_min_len(pieces)
                .for_each(|((out, (m, v)), (p, g))| {
                    for ((((o, m), v), &p), &g) in out.iter_mut().zip(m).zip(v).zip(p).zip(g) {
                        *m = *m * b1 + g * nb1;
                        *v = *v * b2 + g * g * nb2;
                        o.write(p * decay - *m / (v.sqrt() / root2 + eps) * step);
                    }
                })
        })
    };
    let n = out.len();
    (Tensor::from_data(TensorData::new(out, [n]), device), Tensor::from_primitive::<Flex>(m), Tensor::from_primitive::<Flex>(v))
}

impl super::Optimizer for AdamW {
    fn step(&mut self, model: &mut dyn Module, grads: &Grads, lr_of: &dyn Fn(&str) -> f64) {
        AdamW::step(self, model, grads, lr_of)
    }
    fn state_refs(&self) -> (BTreeMap<String, TensorRef<'_>>, HashMap<String, String>) {
        AdamW::state_refs(self)
    }
    fn load_state(&mut self, sd: &crate::io::StateDict, device: &burn::tensor::Device) -> Result<()> {
        AdamW::load_state(self, sd, device)
    }
    fn state_bytes(&self) -> usize {
        self.moments.values().map(|(m, _)| 2 * 4 * m.dims()[0]).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Init, cpu};

    /// Three steps of a parameter long enough for several parallel pieces: the same bits as
    /// the tensor ops, moments included.
    #[test]
    fn fused_step_gives_the_tensor_ops_bits() {
        let mut init = Init::new(7);
        let n = 5 * (1 << 14) + 3;
        let c = AdamWConfig::default();
        let mut a = (init.normal::<1>([n], 1.0, &cpu()), Tensor::zeros([n], &cpu()), Tensor::zeros([n], &cpu()));
        let mut b = a.clone();
        for t in 1..=3 {
            let g = init.normal::<1>([n], 0.1, &cpu());
            let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
            let [p, gf, m, v] = [&a.0, &g, &a.1, &a.2].map(|t| flex_f32((*t).clone()).expect("f32 on the CPU backend"));
            a = fused_step(&p, &gf, m, v, c, 1e-3, bias1, bias2, &cpu());
            b = tensor_step(&b.0, &g, b.1, b.2, c, 1e-3, bias1, bias2);
            let bits = |t: &Tensor<1>| t.to_data().try_to_vec::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&a.0) == bits(&b.0) && bits(&a.1) == bits(&b.1) && bits(&a.2) == bits(&b.2), "step {t}");
        }
    }
}
