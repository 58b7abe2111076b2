//! diffusers' LoRA file keys (`pytorch_lora_weights.safetensors`): `<component>.<module>.<part>`
//! where the part is spelled in one of the styles diffusers has written over the years.
//! Reading accepts them all; writing follows `convert_state_dict_to_diffusers`.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use knobs_nn::Error;
use knobs_nn::io::{StateDict, write_safetensors};
use serde_json::Value;

use super::lora_files::{Collected, ComponentLora, Part, check_savable, peft_scaling};
use crate::{AdapterConfig, Result};

/// The first key segments diffusers pipelines use as component prefixes.
pub const COMPONENTS: &[&str] = &["unet", "text_encoder", "text_encoder_2", "transformer", "prior", "controlnet"];

/// Key endings, longest first: (ending, part, is an embedding LoRA).
const PARTS: &[(&str, Part, bool)] = &[
    (".lora_linear_layer.down.weight", Part::Down, false),
    (".lora_linear_layer.up.weight", Part::Up, false),
    (".lora.down.weight", Part::Down, false),
    (".lora.up.weight", Part::Up, false),
    (".lora_A.weight", Part::Down, false),
    (".lora_B.weight", Part::Up, false),
    (".lora_embedding_A", Part::Down, true),
    (".lora_embedding_B", Part::Up, true),
    (".alpha", Part::Alpha, false),
];

/// What `convert_state_dict_to_diffusers` rewrites in PEFT keys; other keys keep `lora_A` /
/// `lora_B` (diffusers files can mix both styles).
const PEFT_TO_DIFFUSERS: &[(&str, &str)] = &[
    (".q_proj.lora_B", ".q_proj.lora_linear_layer.up"),
    (".q_proj.lora_A", ".q_proj.lora_linear_layer.down"),
    (".k_proj.lora_B", ".k_proj.lora_linear_layer.up"),
    (".k_proj.lora_A", ".k_proj.lora_linear_layer.down"),
    (".v_proj.lora_B", ".v_proj.lora_linear_layer.up"),
    (".v_proj.lora_A", ".v_proj.lora_linear_layer.down"),
    (".out_proj.lora_B", ".out_proj.lora_linear_layer.up"),
    (".out_proj.lora_A", ".out_proj.lora_linear_layer.down"),
    ("to_k.lora_A", "to_k.lora.down"),
    ("to_k.lora_B", "to_k.lora.up"),
    ("to_q.lora_A", "to_q.lora.down"),
    ("to_q.lora_B", "to_q.lora.up"),
    ("to_v.lora_A", "to_v.lora.down"),
    ("to_v.lora_B", "to_v.lora.up"),
    ("to_out.0.lora_A", "to_out.0.lora.down"),
    ("to_out.0.lora_B", "to_out.0.lora.up"),
];

/// The component a key belongs to, if its first segment names one.
pub fn component_of(key: &str) -> Option<&'static str> {
    let first = key.split('.').next()?;
    COMPONENTS.iter().find(|c| **c == first).copied()
}

/// Splits a key without its component prefix into (module path, part, embedding).
/// `component` decides how the oldest attention-processor names map to modules.
pub fn parse(component: &str, key: &str) -> Option<(String, Part, bool)> {
    let key = key.replace(".processor.", ".");
    if let Some(found) = parse_old_processor(component, &key) {
        return Some(found);
    }
    PARTS.iter().find_map(|(end, part, emb)| {
        key.strip_suffix(end).filter(|m| !m.is_empty()).map(|m| (m.to_string(), *part, *emb))
    })
}

/// diffusers <= 0.20 attention processors: `<attn>.to_q_lora.down.weight`. In the UNet the
/// layers are `to_q` ... `to_out.0`; in the text encoder `q_proj` ... `out_proj`.
fn parse_old_processor(component: &str, key: &str) -> Option<(String, Part, bool)> {
    let (rest, part) = if let Some(r) = key.strip_suffix("_lora.down.weight") {
        (r, Part::Down)
    } else {
        (key.strip_suffix("_lora.up.weight")?, Part::Up)
    };
    let (attn, proj) = rest.rsplit_once('.')?;
    let text = component.starts_with("text_encoder");
    let layer = match (proj, text) {
        ("to_q", false) => "to_q",
        ("to_k", false) => "to_k",
        ("to_v", false) => "to_v",
        ("to_out", false) => "to_out.0",
        ("to_q", true) => "q_proj",
        ("to_k", true) => "k_proj",
        ("to_v", true) => "v_proj",
        ("to_out", true) => "out_proj",
        _ => return None,
    };
    Some((format!("{attn}.{layer}"), part, false))
}

/// The diffusers spelling of a PEFT key (`<module>.lora_A.weight` ...), as
/// `convert_state_dict_to_diffusers` writes it.
pub fn from_peft_key(key: &str) -> String {
    let mut out = key.to_string();
    for (from, to) in PEFT_TO_DIFFUSERS {
        if out.contains(from) {
            out = out.replace(from, to);
        }
    }
    out
}

/// Reads the tensors of a diffusers LoRA file. Keys without a component prefix (attention
/// processor files of diffusers <= 0.20) belong to the UNet, as diffusers loads them.
pub fn read(sd: &StateDict) -> Result<BTreeMap<String, ComponentLora>> {
    let prefixed = sd.tensors.keys().any(|k| component_of(k).is_some());
    let mut found = Collected::default();
    for (key, data) in &sd.tensors {
        let (component, rest) = match (prefixed, component_of(key)) {
            (true, Some(c)) => (c, &key[c.len() + 1..]),
            (true, None) => return Err(Error::key(&sd.file, key, format!("has no component prefix (one of {COMPONENTS:?}) while other keys have one")).into()),
            (false, _) => ("unet", key.as_str()),
        };
        let Some((module, part, emb)) = parse(component, rest) else {
            return Err(Error::key(&sd.file, key, "not a LoRA tensor key: expected <component>.<module> then .lora.down.weight / .lora.up.weight, .lora_A.weight / .lora_B.weight, .lora_linear_layer.down.weight / .up.weight or .alpha").into());
        };
        found.add(&sd.file, component, module, part, emb, key, data)?;
    }
    let mut scaling = HashMap::new();
    if let Some(text) = sd.metadata.get("lora_adapter_metadata") {
        let bad = |msg: String| Error::key(&sd.file, "lora_adapter_metadata", msg);
        let json: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Value::Object(all) = json else { return Err(bad("not a JSON object".into()).into()) };
        for c in COMPONENTS {
            let own: serde_json::Map<String, Value> =
                all.iter().filter_map(|(k, v)| k.strip_prefix(&format!("{c}.")).map(|f| (f.to_string(), v.clone()))).collect();
            if !own.is_empty() {
                scaling.insert(c.to_string(), peft_scaling(&sd.file, &Value::Object(own))?);
            }
        }
    }
    found.build(&sd.file, &scaling, false)
}

/// How [`save_diffusers`] spells the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffusersKeys {
    /// `convert_state_dict_to_diffusers`: `to_q.lora.down.weight`, `q_proj.lora_linear_layer.down.weight`,
    /// other modules keep `lora_A` / `lora_B` (what diffusers' SD-1.x training scripts save).
    Diffusers,
    /// PEFT's `lora_A` / `lora_B` everywhere, with `lora_adapter_metadata` (newer scripts).
    Peft,
}

/// Writes `pytorch_lora_weights.safetensors`-style file `path` from `(prefix, lora)` pairs,
/// as `save_lora_weights` does. diffusers files carry no alpha: when some module's scale is
/// not 1 (or with [`DiffusersKeys::Peft`]) each component's PEFT config goes into the
/// `lora_adapter_metadata` metadata, which diffusers >= 0.33 reads; older readers would
/// load such a file with scale 1.
pub fn save(path: impl AsRef<Path>, components: &[(&str, &ComponentLora)], keys: DiffusersKeys) -> Result<()> {
    let path = path.as_ref();
    let mut tensors = BTreeMap::new();
    let mut adapter_meta = serde_json::Map::new();
    let mut needs_meta = keys == DiffusersKeys::Peft;
    for (prefix, lora) in components {
        check_savable(path, prefix, lora)?;
        needs_meta |= lora.modules().iter().any(|m| m.scale != 1.0);
        for (k, v) in &lora.state.tensors {
            let key = if keys == DiffusersKeys::Diffusers { from_peft_key(k) } else { k.clone() };
            tensors.insert(format!("{prefix}.{key}"), v.clone());
        }
        if let Value::Object(fields) = lora.config.to_peft_json() {
            adapter_meta.extend(fields.into_iter().map(|(k, v)| (format!("{prefix}.{k}"), v)));
        }
    }
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    if needs_meta {
        meta.insert("lora_adapter_metadata".into(), serde_json::to_string_pretty(&Value::Object(adapter_meta)).expect("JSON"));
    }
    Ok(write_safetensors(path, &tensors, &meta)?)
}
