use knobs_nn::{Init, LayerMut};
use serde_json::Value;

use super::layer::Hada;
use crate::lycoris::{DeltaAdapter, LycorisOptions, insert, layer_shape};
use crate::method::{AdapterConfig, field};
use crate::{PeftType, Result, Targets};

/// PEFT's `LoHaConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct LohaConfig {
    pub options: LycorisOptions,
}

impl LohaConfig {
    pub fn new(options: LycorisOptions) -> Self {
        LohaConfig { options }
    }

    pub fn from_peft_json(json: &Value) -> Result<Box<dyn AdapterConfig>> {
        let mut options = LycorisOptions::from_peft_json(json)?;
        options.init_weights = field(json, "init_weights")?.unwrap_or(true);
        Ok(Box::new(LohaConfig { options }))
    }
}

impl AdapterConfig for LohaConfig {
    fn peft_type(&self) -> PeftType {
        PeftType::Loha
    }
    fn targets(&self) -> &Targets {
        &self.options.targets
    }
    fn modules_to_save(&self) -> &[String] {
        &self.options.modules_to_save
    }

    fn attach(&self, path: &str, layer: LayerMut<'_>, name: &str, init: &mut Init) -> Result<()> {
        let (shape, device) = layer_shape(&layer, path, "LoHa")?;
        let (r, alpha) = self.options.rank_alpha(path);
        // PEFT keeps 1x1 convolutions flat even with use_effective_conv2d.
        let cp = self.options.use_effective_conv2d && matches!(layer, LayerMut::Conv2d(_)) && shape[2] * shape[3] > 1;
        let hada = Hada::new(shape, r, cp, !self.options.init_weights, init, &device);
        insert(layer, name, DeltaAdapter::new(hada, alpha / r as f64, &self.options));
        Ok(())
    }

    fn to_peft_json(&self) -> Value {
        self.options.to_peft_json(PeftType::Loha.as_str())
    }

    fn clone_box(&self) -> Box<dyn AdapterConfig> {
        Box::new(self.clone())
    }
}
