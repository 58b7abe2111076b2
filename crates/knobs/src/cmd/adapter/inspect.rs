//! `knobs adapter inspect`: the format, method, adapted modules (grouped by block, with their
//! ranks and alphas), size, dtype and metadata of an adapter or embedding, and the model it
//! was made for when the file says.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use knobs_adapters::formats::{kohya, lycoris, peft};
use knobs_nn::io::read_safetensors;
use serde_json::{Value, json};

use super::is_embedding;

/// Tensor-name endings that end a module's name, with the method they belong to; the first
/// such tensor of a module gives its rank (its first dimension).
const PARTS: &[(&str, &str)] = &[
    (".lora_down.weight", "LoRA"),
    (".lora_A.weight", "LoRA"),
    (".lora.down.weight", "LoRA"),
    (".lora_linear_layer.down.weight", "LoRA"),
    (".hada_w1_b", "LoHa"),
    (".lokr_w1_b", "LoKr"),
    (".lokr_w2_b", "LoKr"),
    (".lokr_w1", "LoKr"),
    (".oft_blocks", "OFT"),
    (".ia3_l", "IA3"),
];

/// Metadata and config keys that name the base model.
const BASE_KEYS: [&str; 4] = ["ss_base_model_version", "modelspec.architecture", "ss_sd_model_name", "base_model_name_or_path"];

/// The block a module belongs to: its name up to the first block or layer index
/// (`unet.down_blocks.1`, `lora_unet_input_blocks_4`, `lora_te1_text_model_encoder_layers_3`).
fn block_of(module: &str) -> String {
    let sep = if module.contains('.') { "." } else { "_" };
    let parts: Vec<&str> = module.split(sep).collect();
    match parts.iter().position(|p| p.parse::<usize>().is_ok()) {
        Some(i) => parts[..=i].join(sep),
        None => parts[..parts.len().min(3)].join(sep),
    }
}

/// What `inspect --json` prints: format, method, modules with rank and alpha, sizes, dtypes,
/// the base model when recorded, the PEFT config and the file's metadata.
pub fn describe(path: &Path) -> Result<Value> {
    let (weights, config) = if path.is_dir() {
        let config = peft::read_config(path).with_context(|| format!("{}: a PEFT folder has {}", path.display(), peft::CONFIG_FILE))?;
        (path.join(peft::WEIGHTS_FILE), Some(config.to_peft_json()))
    } else {
        (path.to_path_buf(), None)
    };
    let sd = read_safetensors(&weights)?;
    let format = match &config {
        _ if is_embedding(path) => "textual-inversion embedding",
        Some(_) => "PEFT folder",
        None if lycoris::is_lycoris(&sd) => "LyCORIS (kohya names)",
        None if sd.tensors.keys().any(|k| kohya::is_kohya(k)) => "kohya",
        None => "diffusers",
    };
    // module -> (method, rank, alpha)
    let mut modules: BTreeMap<String, (&str, usize, Option<f32>)> = BTreeMap::new();
    for (key, t) in &sd.tensors {
        if let Some((module, method)) = PARTS.iter().find_map(|(end, m)| key.strip_suffix(end).map(|n| (n, *m))) {
            let rank = t.shape().as_slice().first().copied().unwrap_or(0);
            modules.entry(module.trim_start_matches(peft::KEY_PREFIX).to_string()).or_insert((method, rank, None));
        }
    }
    for (key, t) in &sd.tensors {
        if let Some(m) = key.strip_suffix(".alpha").and_then(|n| modules.get_mut(n.trim_start_matches(peft::KEY_PREFIX))) {
            m.2 = t.clone().convert::<f32>().try_into_vec::<f32>().ok().and_then(|v| v.first().copied());
        }
    }
    let from_config = |k: &str| config.as_ref().and_then(|c| c.get(k)).cloned();
    let dora = from_config("use_dora").and_then(|v| v.as_bool()) == Some(true) || sd.tensors.keys().any(|k| k.ends_with(".dora_scale"));
    let method = match from_config("peft_type").and_then(|v| v.as_str().map(str::to_string)) {
        Some(m) => m,
        None if format.starts_with("textual") => {
            let tables: Vec<String> = sd.tensors.iter().map(|(k, t)| format!("{k} {:?}", t.shape().as_slice())).collect();
            format!("tables {}", tables.join(", "))
        }
        None => modules.values().next().map_or("-".to_string(), |m| m.0.to_string()),
    };
    let method = if dora { format!("{method} (DoRA)") } else { method };
    let values: usize = sd.tensors.values().map(|t| t.shape().num_elements()).sum();
    let dtypes: BTreeSet<String> = sd.tensors.values().map(|t| format!("{:?}", t.dtype())).collect();
    let base = BASE_KEYS.iter().find_map(|k| sd.metadata.get(*k).cloned().or_else(|| from_config(k).and_then(|v| v.as_str().map(str::to_string))));
    let bytes = std::fs::metadata(&weights)?.len();
    let rows: Vec<Value> = modules.iter().map(|(m, (meth, r, a))| json!({"module": m, "block": block_of(m), "method": meth, "rank": r, "alpha": a})).collect();
    Ok(json!({
        "path": path, "format": format, "method": method, "modules": rows, "tensors": sd.tensors.len(), "values": values,
        "bytes": bytes, "dtypes": dtypes, "base_model": base, "config": config, "metadata": sd.metadata,
    }))
}

pub fn inspect(path: &Path, json: bool) -> Result<()> {
    let d = describe(path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let modules = d["modules"].as_array().cloned().unwrap_or_default();
    let dtypes: Vec<String> = d["dtypes"].as_array().into_iter().flatten().map(text).collect();
    println!("{}: {}, {}", path.display(), text(&d["format"]), text(&d["method"]));
    println!("{} modules, {} tensors, {} values, {} bytes, {}", modules.len(), d["tensors"], d["values"], d["bytes"], dtypes.join("/"));
    println!("made for: {}", d["base_model"].as_str().unwrap_or("not recorded"));
    let mut blocks: BTreeMap<String, (usize, BTreeSet<u64>)> = BTreeMap::new();
    for m in &modules {
        let b = blocks.entry(text(&m["block"])).or_default();
        b.0 += 1;
        b.1.insert(m["rank"].as_u64().unwrap_or(0));
    }
    for (block, (n, ranks)) in &blocks {
        println!("  {block}: {n} modules, rank {}", ranks.iter().map(u64::to_string).collect::<Vec<_>>().join("/"));
    }
    let alphas: BTreeSet<String> = modules.iter().filter_map(|m| m["alpha"].as_f64().map(|a| (a as f32).to_string())).collect();
    if !alphas.is_empty() {
        println!("alpha: {}", alphas.into_iter().collect::<Vec<_>>().join(", "));
    }
    if !d["config"].is_null() {
        println!("config: {}", serde_json::to_string(&d["config"])?);
    }
    for (k, v) in d["metadata"].as_object().into_iter().flatten() {
        let shown: String = text(v).chars().take(200).collect();
        println!("metadata {k} = {shown}");
    }
    Ok(())
}
