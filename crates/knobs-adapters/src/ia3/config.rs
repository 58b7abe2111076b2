use knobs_nn::{Init, LayerMut, Tensor};
use serde_json::{Value, json};

use super::layer::{Ia3Conv2d, Ia3Linear};
use crate::method::{AdapterConfig, field};
use crate::{AdapterError, Pattern, PeftType, Result, Targets};

/// PEFT's `IA3Config`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Config {
    pub targets: Targets,
    /// Targets whose input, not output, is scaled. Must be among the targets.
    pub feedforward_modules: Pattern,
    pub modules_to_save: Vec<String>,
    /// Start at 1 (the identity); false draws N(0, 1) like an uninitialised torch tensor.
    pub init_ia3_weights: bool,
}

impl Ia3Config {
    pub fn new(target_modules: Pattern, feedforward_modules: Pattern) -> Self {
        Ia3Config { targets: Targets::new(target_modules), feedforward_modules, modules_to_save: Vec::new(), init_ia3_weights: true }
    }

    pub fn from_peft_json(json: &Value) -> Result<Box<dyn AdapterConfig>> {
        let target_modules: Pattern = field(json, "target_modules")?
            .ok_or_else(|| AdapterError::Config("key `target_modules`: missing".into()))?;
        if field::<bool>(json, "fan_in_fan_out")?.unwrap_or(false) {
            return Err(AdapterError::Config("key `fan_in_fan_out`: true is for transposed Conv1D weights (GPT-2), which no knobs layer has".into()));
        }
        Ok(Box::new(Ia3Config {
            targets: Targets { target_modules, exclude_modules: field(json, "exclude_modules")? },
            feedforward_modules: field(json, "feedforward_modules")?.unwrap_or_default(),
            modules_to_save: field(json, "modules_to_save")?.unwrap_or_default(),
            init_ia3_weights: field(json, "init_ia3_weights")?.unwrap_or(true),
        }))
    }

    fn start<const D: usize>(&self, shape: [usize; D], init: &mut Init, device: &knobs_nn::Device) -> Tensor<D> {
        if self.init_ia3_weights { Tensor::ones(shape, device) } else { init.normal(shape, 1.0, device) }
    }
}

impl AdapterConfig for Ia3Config {
    fn peft_type(&self) -> PeftType {
        PeftType::Ia3
    }
    fn targets(&self) -> &Targets {
        &self.targets
    }
    fn modules_to_save(&self) -> &[String] {
        &self.modules_to_save
    }

    fn attach(&self, path: &str, layer: LayerMut<'_>, name: &str, init: &mut Init) -> Result<()> {
        let feedforward = self.feedforward_modules.matches(path)?;
        match layer {
            LayerMut::Linear(l) => {
                let shape = if feedforward { [1, l.d_in()] } else { [l.d_out(), 1] };
                let ia3 = Ia3Linear { l: self.start(shape, init, &l.weight.device()), feedforward };
                l.adapters.insert(name, Box::new(ia3));
            }
            LayerMut::Conv2d(l) => {
                let c = if feedforward { l.c_in() } else { l.c_out() };
                let ia3 = Ia3Conv2d { l: self.start([1, c, 1, 1], init, &l.weight.device()), feedforward };
                l.adapters.insert(name, Box::new(ia3));
            }
            LayerMut::Embedding(_) => {
                return Err(AdapterError::Config(format!("IA3 cannot attach to embedding `{path}`: PEFT's IA3 supports Linear and Conv layers")));
            }
        }
        Ok(())
    }

    fn to_peft_json(&self) -> Value {
        json!({
            "peft_type": PeftType::Ia3.as_str(),
            "target_modules": self.targets.target_modules,
            "exclude_modules": self.targets.exclude_modules,
            "feedforward_modules": self.feedforward_modules,
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
            "init_ia3_weights": self.init_ia3_weights,
            "fan_in_fan_out": false,
            "task_type": null,
            "inference_mode": true,
        })
    }

    fn clone_box(&self) -> Box<dyn AdapterConfig> {
        Box::new(self.clone())
    }
}
