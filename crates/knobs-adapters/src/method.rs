//! The interface every adapter method implements, and the list of methods that PEFT files
//! may name.
use std::path::Path;

use knobs_nn::{Init, LayerMut};
use serde_json::Value;

use crate::{AdapterError, Result, Targets, ia3, lora};

/// A method's configuration: what to attach where. Mirrors a PEFT config class.
pub trait AdapterConfig: std::fmt::Debug + Send + Sync {
    /// PEFT's `peft_type` (`LORA`, `IA3`).
    fn peft_type(&self) -> &'static str;
    fn targets(&self) -> &Targets;
    /// Base modules trained fully with the adapter (PEFT's `modules_to_save`).
    fn modules_to_save(&self) -> &[String];
    /// Builds the adapter for the layer at `path` and attaches it to the layer's slot as `name`.
    fn attach(&self, path: &str, layer: LayerMut<'_>, name: &str, init: &mut Init) -> Result<()>;
    /// The `adapter_config.json` that PEFT writes for this config.
    fn to_peft_json(&self) -> Value;
    fn clone_box(&self) -> Box<dyn AdapterConfig>;
    /// Whether the method can be folded into the base weights; an error says why not.
    fn check_merge(&self) -> Result<()> {
        Ok(())
    }
}

impl Clone for Box<dyn AdapterConfig> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

type Parser = fn(&Value) -> Result<Box<dyn AdapterConfig>>;

/// Every method that a PEFT `adapter_config.json` may name. A new method adds one line.
const METHODS: &[(&str, Parser)] = &[("LORA", lora::LoraConfig::from_peft_json), ("IA3", ia3::Ia3Config::from_peft_json)];

/// Reads an `adapter_config.json` value; `file` is named in errors.
pub fn config_from_peft_json(file: &Path, json: &Value) -> Result<Box<dyn AdapterConfig>> {
    let peft_type = json.get("peft_type").and_then(Value::as_str).ok_or_else(|| {
        AdapterError::Nn(knobs_nn::Error::key(file, "peft_type", "missing or not a string"))
    })?;
    let (_, parse) = METHODS.iter().find(|(name, _)| *name == peft_type).ok_or_else(|| {
        let known: Vec<&str> = METHODS.iter().map(|(n, _)| *n).collect();
        AdapterError::Nn(knobs_nn::Error::key(file, "peft_type", format!("unknown value `{peft_type}`; supported: {known:?}")))
    })?;
    parse(json).map_err(|e| match e {
        AdapterError::Config(msg) => AdapterError::Nn(knobs_nn::Error::file(file, msg)),
        other => other,
    })
}

/// PEFT keeps adapter parameters in memory as `<layer>.lora_A.<adapter>.weight` and writes
/// them to files without the adapter name: `<layer>.lora_A.weight`.
pub fn strip_adapter_name(path: &str, adapter: &str) -> String {
    let parts: Vec<&str> = path.split('.').collect();
    match parts.iter().rposition(|p| *p == adapter) {
        Some(i) => parts.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, p)| *p).collect::<Vec<_>>().join("."),
        None => path.to_string(),
    }
}

/// Reads an optional field of a PEFT config, naming the field when its type is wrong.
pub(crate) fn field<T: serde::de::DeserializeOwned>(json: &Value, key: &str) -> Result<Option<T>> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| AdapterError::Config(format!("key `{key}`: {e}"))),
    }
}
