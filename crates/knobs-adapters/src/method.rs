//! The interface every adapter method implements, and the list of methods that PEFT files
//! may name.
use std::path::Path;

use knobs_nn::{Init, LayerMut};
use serde_json::Value;

use crate::{AdapterError, Result, Targets, ia3, loha, lokr, lora, oft};

/// Which adapter method a config or layer belongs to, as `adapter_config.json` names it in
/// `peft_type`. `Lora` (with DoRA), `Loha`, `Lokr`, `Oft` and `Ia3` are PEFT's; `Hypernetwork` and `Tokens` (textual inversion)
/// are knobs' own names for methods PEFT lacks, never found in a PEFT folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeftType {
    Lora,
    Loha,
    Lokr,
    Oft,
    Ia3,
    Hypernetwork,
    Tokens,
}

impl PeftType {
    pub const ALL: [PeftType; 7] = [PeftType::Lora, PeftType::Loha, PeftType::Lokr, PeftType::Oft, PeftType::Ia3, PeftType::Hypernetwork, PeftType::Tokens];

    /// The name as written in files (`LORA`); `const` so that layers' `Adapter::method` and
    /// constants can use it.
    pub const fn as_str(self) -> &'static str {
        match self {
            PeftType::Lora => "LORA",
            PeftType::Loha => "LOHA",
            PeftType::Lokr => "LOKR",
            PeftType::Oft => "OFT",
            PeftType::Ia3 => "IA3",
            PeftType::Hypernetwork => "HYPERNETWORK",
            PeftType::Tokens => "TOKENS",
        }
    }

    /// The method named `name` exactly as files write it; `None` for any other string.
    pub fn parse(name: &str) -> Option<PeftType> {
        PeftType::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl std::fmt::Display for PeftType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PeftType {
    type Err = AdapterError;
    fn from_str(name: &str) -> Result<Self> {
        PeftType::parse(name).ok_or_else(|| AdapterError::Config(format!("unknown peft_type `{name}`; known: {:?}", PeftType::ALL.map(PeftType::as_str))))
    }
}

/// A method's configuration: what to attach where. Mirrors a PEFT config class.
/// `Any` lets a caller that knows the method get its typed config back (`downcast_ref`).
pub trait AdapterConfig: std::any::Any + std::fmt::Debug + Send + Sync {
    /// The method, PEFT's `peft_type`.
    fn peft_type(&self) -> PeftType;
    fn targets(&self) -> &Targets;
    /// Base modules trained fully with the adapter (PEFT's `modules_to_save`).
    fn modules_to_save(&self) -> &[String];
    /// Builds the adapter for the layer at `path` and attaches it to the layer's slot as `name`.
    fn attach(&self, path: &str, layer: LayerMut<'_>, name: &str, init: &mut Init) -> Result<()>;
    /// The `adapter_config.json` that PEFT writes for this config.
    fn to_peft_json(&self) -> Value;
    fn clone_box(&self) -> Box<dyn AdapterConfig>;
    /// Whether the config has a PEFT folder form; an error says why not.
    fn check_peft(&self) -> Result<()> {
        Ok(())
    }
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
const METHODS: &[(PeftType, Parser)] = &[
    (PeftType::Lora, lora::LoraConfig::from_peft_json),
    (PeftType::Loha, loha::LohaConfig::from_peft_json),
    (PeftType::Lokr, lokr::LokrConfig::from_peft_json),
    (PeftType::Oft, oft::OftConfig::from_peft_json),
    (PeftType::Ia3, ia3::Ia3Config::from_peft_json),
];

/// Reads an `adapter_config.json` value; `file` is named in errors.
pub fn config_from_peft_json(file: &Path, json: &Value) -> Result<Box<dyn AdapterConfig>> {
    let peft_type = json.get("peft_type").and_then(Value::as_str).ok_or_else(|| {
        AdapterError::Nn(knobs_nn::Error::key(file, "peft_type", "missing or not a string"))
    })?;
    let (_, parse) = METHODS.iter().find(|(t, _)| t.as_str() == peft_type).ok_or_else(|| {
        let known: Vec<&str> = METHODS.iter().map(|(t, _)| t.as_str()).collect();
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
