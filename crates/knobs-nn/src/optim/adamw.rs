use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::Grads;
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
            let param = param.clone() * (1.0 - lr * c.weight_decay);
            let m = m * c.beta1 + g.clone() * (1.0 - c.beta1);
            let v = v * c.beta2 + g.clone().powi_scalar(2) * (1.0 - c.beta2);
            let bias1 = 1.0 - c.beta1.powi(*t as i32);
            let bias2 = 1.0 - c.beta2.powi(*t as i32);
            let denom = v.clone().sqrt() / bias2.sqrt() + c.eps;
            let param = param - m.clone() / denom * (lr / bias1);
            p.replace_flat(param);
            self.moments.insert(path.to_string(), (m, v));
        });
    }

    /// The optimizer state as named tensors (`exp_avg.<path>`, `exp_avg_sq.<path>`) and
    /// metadata (`steps` as JSON), for checkpoints.
    pub fn state(&self) -> (BTreeMap<String, TensorData>, HashMap<String, String>) {
        let mut tensors = BTreeMap::new();
        for (path, (m, v)) in &self.moments {
            tensors.insert(format!("exp_avg.{path}"), m.to_data());
            tensors.insert(format!("exp_avg_sq.{path}"), v.to_data());
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

impl super::Optimizer for AdamW {
    fn step(&mut self, model: &mut dyn Module, grads: &Grads, lr_of: &dyn Fn(&str) -> f64) {
        AdamW::step(self, model, grads, lr_of)
    }
    fn state(&self) -> (BTreeMap<String, TensorData>, HashMap<String, String>) {
        AdamW::state(self)
    }
    fn load_state(&mut self, sd: &crate::io::StateDict, device: &burn::tensor::Device) -> Result<()> {
        AdamW::load_state(self, sd, device)
    }
    fn state_bytes(&self) -> usize {
        self.moments.values().map(|(m, _)| 2 * 4 * m.dims()[0]).sum()
    }
}
