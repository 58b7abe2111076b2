use std::collections::BTreeMap;

use knobs_nn::{Init, LayerMut};
use serde_json::{Value, json};

use super::layer::{Kron, KronInit, KronPlan};
use crate::lycoris::{DeltaAdapter, LycorisOptions, insert, layer_shape};
use crate::method::{AdapterConfig, field};
use crate::{AdapterError, PeftType, Result, Targets};

/// PEFT's `LoKrConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct LokrConfig {
    pub options: LycorisOptions,
    /// Also split `w1` into a low-rank product when the rank is small enough.
    pub decompose_both: bool,
    /// The preferred size of one Kronecker side; -1 picks divisors near the square root.
    pub decompose_factor: i64,
    /// Divide by the kept fraction after rank dropout.
    pub rank_dropout_scale: bool,
    pub init: KronInit,
    /// Layouts fixed per layer path, for files whose factor shapes were chosen by other rules
    /// (LyCORIS splits an explicit factor the other way round); not part of PEFT's config.
    pub layouts: BTreeMap<String, KronPlan>,
}

impl LokrConfig {
    pub fn new(options: LycorisOptions) -> Self {
        LokrConfig { options, decompose_both: false, decompose_factor: -1, rank_dropout_scale: false, init: KronInit::Peft, layouts: BTreeMap::new() }
    }

    pub fn from_peft_json(json: &Value) -> Result<Box<dyn AdapterConfig>> {
        let options = LycorisOptions::from_peft_json(json)?;
        let init = match json.get("init_weights") {
            None | Some(Value::Null) | Some(Value::Bool(true)) => KronInit::Peft,
            Some(Value::Bool(false)) => KronInit::Random,
            Some(Value::String(s)) if s == "lycoris" => KronInit::Lycoris,
            Some(other) => return Err(AdapterError::Config(format!("key `init_weights`: unsupported value {other}; supported: true, false, \"lycoris\""))),
        };
        let decompose_factor: i64 = field(json, "decompose_factor")?.unwrap_or(-1);
        if decompose_factor == 0 || decompose_factor < -1 {
            return Err(AdapterError::Config(format!("key `decompose_factor`: {decompose_factor}; use -1 or a positive size")));
        }
        Ok(Box::new(LokrConfig {
            options: LycorisOptions { init_weights: init != KronInit::Random, ..options },
            decompose_both: field(json, "decompose_both")?.unwrap_or(false),
            decompose_factor,
            rank_dropout_scale: field(json, "rank_dropout_scale")?.unwrap_or(false),
            init,
            layouts: BTreeMap::new(),
        }))
    }
}

impl AdapterConfig for LokrConfig {
    fn peft_type(&self) -> PeftType {
        PeftType::Lokr
    }
    fn targets(&self) -> &Targets {
        &self.options.targets
    }
    fn modules_to_save(&self) -> &[String] {
        &self.options.modules_to_save
    }

    fn attach(&self, path: &str, layer: LayerMut<'_>, name: &str, init: &mut Init) -> Result<()> {
        let (shape, device) = layer_shape(&layer, path, "LoKr")?;
        let (r, alpha) = self.options.rank_alpha(path);
        let conv = matches!(layer, LayerMut::Conv2d(_));
        let plan = match self.layouts.get(path) {
            Some(plan) => plan.clone(),
            None => KronPlan::new(shape, r, self.decompose_factor, self.decompose_both, self.options.use_effective_conv2d, conv),
        };
        let kron = Kron::new(&plan, r, self.init, init, &device);
        let adapter = DeltaAdapter { rank_dropout_scale: self.rank_dropout_scale, ..DeltaAdapter::new(kron, alpha / r as f64, &self.options) };
        insert(layer, name, adapter);
        Ok(())
    }

    fn to_peft_json(&self) -> Value {
        let mut json = self.options.to_peft_json(PeftType::Lokr.as_str());
        json["decompose_both"] = json!(self.decompose_both);
        json["decompose_factor"] = json!(self.decompose_factor);
        json["rank_dropout_scale"] = json!(self.rank_dropout_scale);
        json["init_weights"] = match self.init {
            KronInit::Peft => json!(true),
            KronInit::Lycoris => json!("lycoris"),
            KronInit::Random => json!(false),
        };
        json
    }

    fn clone_box(&self) -> Box<dyn AdapterConfig> {
        Box::new(self.clone())
    }
}
