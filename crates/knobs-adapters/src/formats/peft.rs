//! PEFT's folder format: `adapter_config.json` plus `adapter_model.safetensors` with keys
//! `base_model.model.<path>.lora_A.weight`, `.lora_B.weight`, `.ia3_l`, ...
use std::collections::{HashMap, HashSet};
use std::path::Path;

use knobs_nn::io::{atomic_write, read_checked, write_safetensors};
use knobs_nn::{Error, Module};
use serde_json::Value;

use crate::{AdaptedModel, Result, config_from_peft_json};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What `PeftModel.save_pretrained` puts in front of every key.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Writes adapter `name` of `model` as a PEFT folder `dir`.
pub fn save<M: Module>(model: &AdaptedModel<M>, name: &str, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    model.config(name)?.check_peft()?;
    let config = model.config(name)?.to_peft_json();
    let tensors = model.adapter_state_dict(name)?.into_iter().map(|(k, v)| (format!("{KEY_PREFIX}{k}"), v)).collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(dir.join(WEIGHTS_FILE), &tensors, &meta)?;
    let json = serde_json::to_vec_pretty(&config).expect("config serialises");
    atomic_write(dir.join(CONFIG_FILE), &json)?;
    Ok(())
}

/// Whether the PEFT folder `dir` holds plain LoRA (`peft_type` LORA without `use_dora`), the
/// one method whose weights the LoRA file formats also carry.
pub fn is_plain_lora(dir: impl AsRef<Path>) -> Result<bool> {
    let config = read_config(dir)?;
    let dora = crate::lora::LoraConfig::is_dora(config.as_ref());
    Ok(config.peft_type() == crate::PeftType::Lora && !dora)
}

/// Reads a PEFT `adapter_config.json`.
pub fn read_config(dir: impl AsRef<Path>) -> Result<Box<dyn crate::AdapterConfig>> {
    let path = dir.as_ref().join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
    config_from_peft_json(&path, &json)
}

/// Loads the PEFT folder `dir` into `model` as adapter `name`, frozen (for inference; call
/// `train_adapter` to keep training it). On any error the model is left as it was.
pub fn load<M: Module>(model: &mut AdaptedModel<M>, dir: impl AsRef<Path>, name: &str) -> Result<()> {
    let dir = dir.as_ref();
    let config = read_config(dir)?;
    let mut sd = read_checked(dir.join(WEIGHTS_FILE), "")?;
    model.add_adapter(name, config).map_err(|e| match e {
        crate::AdapterError::NoMatch { .. } => crate::AdapterError::Nn(Error::key(dir.join(CONFIG_FILE), "target_modules", e)),
        other => other,
    })?;
    let expected: Vec<String> = model.adapter_state_dict(name)?.into_keys().collect();
    rewrap(&mut sd, &expected);
    if let Err(e) = model.load_adapter_state_dict(name, &sd, KEY_PREFIX) {
        model.delete_adapter(name)?;
        return Err(e);
    }
    model.freeze();
    Ok(())
}

/// A folder saved from the model without its outer wrapper module gets the wrapper's name
/// back: transformers 5 saves a CLIPTextModel's adapter without `text_model.`, which every
/// other writer (and the checkpoints) have. `expected`: the adapter's keys in the model.
fn rewrap(sd: &mut knobs_nn::io::StateDict, expected: &[String]) {
    let firsts: HashSet<&str> = expected.iter().filter_map(|k| k.split_once('.').map(|(a, _)| a)).collect();
    let [wrapper] = firsts.into_iter().collect::<Vec<_>>()[..] else { return };
    let inner = |k: &String| k.strip_prefix(KEY_PREFIX).map(str::to_string);
    let wrapped = |k: &str| format!("{KEY_PREFIX}{wrapper}.{k}");
    let all_inner = sd.tensors.keys().all(|k| inner(k).is_some_and(|r| !r.starts_with(&format!("{wrapper}.")) && expected.iter().any(|e| *e == format!("{wrapper}.{r}"))));
    if all_inner && !sd.tensors.is_empty() {
        sd.tensors = std::mem::take(&mut sd.tensors).into_iter().map(|(k, v)| (wrapped(&inner(&k).expect("checked")), v)).collect();
    }
}
