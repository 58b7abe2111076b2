use std::collections::BTreeMap;

use knobs_nn::{Init, LayerMut};
use serde_json::{Value, json};

use super::layer::{LoraConv2d, LoraEmbedding, LoraLinear};
use crate::method::{AdapterConfig, field};
use crate::{AdapterError, Pattern, PeftType, Result, Targets};

/// How the down projection A starts (B starts at zero, so a new adapter changes nothing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraInit {
    /// PEFT's default: Kaiming-uniform A.
    Kaiming,
    /// A ~ N(0, 1/r), as diffusers' training scripts request.
    Gaussian,
}

/// PEFT's `LoraConfig`, for the fields knobs implements.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub targets: Targets,
    pub lora_dropout: f64,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    pub init: LoraInit,
    pub modules_to_save: Vec<String>,
    /// Per-layer rank and alpha overrides: a key matches a layer whose path ends with it.
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    /// DoRA: a learned magnitude per output beside the low-rank direction change.
    pub use_dora: bool,
}

impl LoraConfig {
    /// Whether `config` is DoRA: a LoRA config with `use_dora` (DoRA shares LoRA's
    /// `peft_type`, so the type alone cannot tell).
    pub fn is_dora(config: &dyn AdapterConfig) -> bool {
        (config as &dyn std::any::Any).downcast_ref::<LoraConfig>().is_some_and(|c| c.use_dora)
    }

    pub fn new(r: usize, lora_alpha: f64, target_modules: Pattern) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            targets: Targets::new(target_modules),
            lora_dropout: 0.0,
            use_rslora: false,
            init: LoraInit::Kaiming,
            modules_to_save: Vec::new(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_dora: false,
        }
    }

    /// Rank and alpha for the layer at `path`, with PEFT's pattern rule `(.*\.)?key$`.
    pub fn rank_alpha(&self, path: &str) -> (usize, f64) {
        use crate::target::pattern_value;
        (pattern_value(&self.rank_pattern, path).unwrap_or(self.r), pattern_value(&self.alpha_pattern, path).unwrap_or(self.lora_alpha))
    }

    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 }
    }

    pub fn from_peft_json(json: &Value) -> Result<Box<dyn AdapterConfig>> {
        let r: usize = field(json, "r")?.unwrap_or(8);
        if r == 0 {
            return Err(AdapterError::Config("key `r`: the rank must be at least 1".into()));
        }
        let target_modules: Pattern = field(json, "target_modules")?
            .ok_or_else(|| AdapterError::Config("key `target_modules`: missing".into()))?;
        if field::<bool>(json, "fan_in_fan_out")?.unwrap_or(false) {
            return Err(AdapterError::Config("key `fan_in_fan_out`: true is for transposed Conv1D weights (GPT-2), which no knobs layer has".into()));
        }
        let init = match json.get("init_lora_weights") {
            None | Some(Value::Null) | Some(Value::Bool(true)) => LoraInit::Kaiming,
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            Some(other) => return Err(AdapterError::Config(format!("key `init_lora_weights`: unsupported value {other}; supported: true, \"gaussian\""))),
        };
        let lora_alpha: f64 = field(json, "lora_alpha")?.unwrap_or(8.0);
        let rank_pattern: std::collections::BTreeMap<String, usize> = field(json, "rank_pattern")?.unwrap_or_default();
        let alpha_pattern: std::collections::BTreeMap<String, f64> = field(json, "alpha_pattern")?.unwrap_or_default();
        // A zero or negative alpha silences or flips the adapter: a broken file, not a choice.
        if !(lora_alpha > 0.0 && lora_alpha.is_finite()) {
            return Err(AdapterError::Config(format!("key `lora_alpha`: {lora_alpha} must be a positive number")));
        }
        if let Some((k, _)) = rank_pattern.iter().find(|(_, r)| **r == 0) {
            return Err(AdapterError::Config(format!("key `rank_pattern`: `{k}` has rank 0; ranks must be at least 1")));
        }
        if let Some((k, a)) = alpha_pattern.iter().find(|(_, a)| !(**a > 0.0 && a.is_finite())) {
            return Err(AdapterError::Config(format!("key `alpha_pattern`: `{k}` has alpha {a}; alphas must be positive")));
        }
        Ok(Box::new(LoraConfig {
            r,
            lora_alpha,
            targets: Targets { target_modules, exclude_modules: field(json, "exclude_modules")? },
            lora_dropout: field(json, "lora_dropout")?.unwrap_or(0.0),
            use_rslora: field(json, "use_rslora")?.unwrap_or(false),
            init,
            modules_to_save: field(json, "modules_to_save")?.unwrap_or_default(),
            rank_pattern,
            alpha_pattern,
            use_dora: field(json, "use_dora")?.unwrap_or(false),
        }))
    }
}

impl AdapterConfig for LoraConfig {
    fn peft_type(&self) -> PeftType {
        PeftType::Lora
    }
    fn targets(&self) -> &Targets {
        &self.targets
    }
    fn modules_to_save(&self) -> &[String] {
        &self.modules_to_save
    }

    fn attach(&self, path: &str, layer: LayerMut<'_>, name: &str, init: &mut Init) -> Result<()> {
        let (r, alpha) = self.rank_alpha(path);
        let scale = self.scaling(r, alpha);
        let gaussian = self.init == LoraInit::Gaussian;
        if self.use_dora {
            return super::dora::attach(layer, name, r, scale, self.lora_dropout, gaussian, init);
        }
        match layer {
            LayerMut::Linear(l) => {
                let a = LoraLinear::new(l, r, scale, self.lora_dropout, gaussian, init);
                l.adapters.insert(name, Box::new(a));
            }
            LayerMut::Conv2d(l) => {
                let a = LoraConv2d::new(l, r, scale, self.lora_dropout, gaussian, init);
                l.adapters.insert(name, Box::new(a));
            }
            LayerMut::Embedding(l) => {
                let a = LoraEmbedding::new(l, r, scale, init);
                l.adapters.insert(name, Box::new(a));
            }
        }
        Ok(())
    }

    fn to_peft_json(&self) -> Value {
        json!({
            "peft_type": PeftType::Lora.as_str(),
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.targets.target_modules,
            "exclude_modules": self.targets.exclude_modules,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "init_lora_weights": match self.init { LoraInit::Kaiming => json!(true), LoraInit::Gaussian => json!("gaussian") },
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "fan_in_fan_out": false,
            "bias": "none",
            "use_dora": self.use_dora,
            "task_type": null,
            "inference_mode": true,
        })
    }

    fn clone_box(&self) -> Box<dyn AdapterConfig> {
        Box::new(self.clone())
    }
}
