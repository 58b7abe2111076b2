//! Exponential moving average of a model's trainable parameters. Small diffusion models
//! sample far better from the averaged weights than from the last step's.
use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Tensor, TensorData};

use crate::io::{StateDict, TensorRef};
use crate::module::{Module, ModuleExt};
use crate::{Error, Result};

#[derive(Debug)]
pub struct Ema {
    pub max_decay: f64,
    updates: u64,
    shadow: BTreeMap<String, Tensor<1>>,
}

impl Ema {
    /// Starts from the model's current trainable parameters.
    pub fn new<M: Module + ?Sized>(model: &M, max_decay: f64) -> Self {
        let mut shadow = BTreeMap::new();
        model.for_each_param(|path, p| {
            if p.is_trainable() {
                shadow.insert(path.to_string(), p.flat());
            }
        });
        Ema { max_decay, updates: 0, shadow }
    }

    /// The decay of the next update: diffusers' `EMAModel` warm-up `(1 + n) / (10 + n)`,
    /// capped, so that early averages are not dominated by the random initialisation.
    pub fn decay(&self) -> f64 {
        let n = self.updates as f64;
        ((1.0 + n) / (10.0 + n)).min(self.max_decay)
    }

    pub fn update<M: Module + ?Sized>(&mut self, model: &M) {
        let d = self.decay();
        let shadow = &mut self.shadow;
        model.for_each_param(|path, p| {
            if let Some(s) = shadow.get_mut(path) {
                *s = s.clone() * d + p.flat() * (1.0 - d);
            }
        });
        self.updates += 1;
    }

    /// Writes the averaged values into `model` (each parameter keeps its trainability).
    pub fn copy_to<M: Module + ?Sized>(&self, model: &mut M) {
        model.for_each_param_mut(|path, mut p| {
            if let Some(s) = self.shadow.get(path) {
                p.replace_flat(s.clone());
            }
        });
    }

    /// The averages (`ema.<path>`, shared) and the update count, for checkpoints.
    pub fn state(&self) -> (BTreeMap<String, TensorRef<'static>>, HashMap<String, String>) {
        let tensors = self.shadow.iter().map(|(k, v)| (format!("ema.{k}"), TensorRef::flat(v))).collect();
        let meta = HashMap::from([("ema_updates".to_string(), self.updates.to_string())]);
        (tensors, meta)
    }

    pub fn load_state(&mut self, sd: &StateDict, device: &burn::tensor::Device) -> Result<()> {
        let n = sd.metadata.get("ema_updates").ok_or_else(|| Error::key(&sd.file, "ema_updates", "missing from the metadata"))?;
        self.updates = n.parse().map_err(|e| Error::key(&sd.file, "ema_updates", e))?;
        for (path, s) in self.shadow.iter_mut() {
            let (v, _) = sd.f32(&format!("ema.{path}"))?;
            let n = v.len();
            *s = Tensor::from_data(TensorData::new(v, [n]), device);
        }
        Ok(())
    }
}
