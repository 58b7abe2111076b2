//! A1111-style hypernetworks: small residual MLPs, one pair (keys, values) per context
//! width, that transform the context before the key and value projections of attention
//! layers. They attach through the Linear slot like any adapter (the adapter transforms its
//! layer's input), so this module knows nothing of diffusion.
//!
//! Files are safetensors. Tensor keys are A1111's state dict flattened: the module pair of
//! width `W` is `W.0` (keys) and `W.1` (values), and inside it torch's Sequential keys, so
//! `768.0.linear.0.weight` is the first Linear of the key module for 768-wide contexts. The
//! metadata holds A1111's settings under its names (`layer_structure`, `activation_func`,
//! `is_layer_norm`, `dropout_structure`, `activate_output`, ...) plus `enable_sizes` and
//! knobs' `knobs.key_modules` / `knobs.value_modules`. A1111's own `.pt` files are Python
//! pickles; knobs never executes them and asks for a conversion.
mod config;
mod layer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, read_checked, write_safetensors};
use knobs_nn::{Adapter, Error, LayerRef, Module, ModuleExt, ParamFn, ParamMutFn};

pub use config::{Activation, HypernetworkConfig, Kind, METHOD, Stage, Structure};
pub use layer::{HyperLinear, Mlp};

use crate::{AdaptedModel, AdapterError, Result};

/// The path segment under which hypernetwork parameters live in memory:
/// `<layer>.hypernetwork.<adapter>.<width>.<0|1>.linear.<i>.weight`.
pub const PARAM_SEGMENT: &str = "hypernetwork";
/// The key projection A1111 (and diffusers) name `to_k`; files that do not say otherwise
/// attach there.
pub const A1111_KEY_MODULE: &str = "to_k";
pub const A1111_VALUE_MODULE: &str = "to_v";

const KEY_MODULES_META: &str = "knobs.key_modules";
const VALUE_MODULES_META: &str = "knobs.value_modules";

/// The file key of an in-memory parameter path of adapter `name`, if it is one.
fn file_key<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let marker = format!(".{PARAM_SEGMENT}.{name}.");
    path.find(&marker).map(|i| &path[i + marker.len()..])
}

/// A layer's hypernetwork adapter `name`, if it carries one.
fn hyper_of<'a>(layer: &LayerRef<'a>, name: &str) -> Option<&'a HyperLinear> {
    let LayerRef::Linear(l) = layer else { return None };
    let l: &'a knobs_nn::Linear = l;
    let entry = l.adapters.get(name)?;
    let any: &dyn std::any::Any = &*entry.adapter;
    any.downcast_ref::<HyperLinear>()
}

/// The layers carrying hypernetwork `name`, with the width and kind of their module.
pub fn adapted_layers<M: Module + ?Sized>(model: &M, name: &str) -> Vec<(String, usize, Kind)> {
    let mut out = Vec::new();
    model.for_each_layer(|path, layer| {
        if let Some(h) = hyper_of(&layer, name) {
            out.push((path.to_string(), h.width, h.kind));
        }
    });
    out
}

/// Adds hypernetwork `name` to `model` (see [`AdaptedModel::add_adapter`]) and checks that
/// every width in `config.sizes` found a key and a value layer. Returns the adapted layers.
pub fn attach<M: Module>(model: &mut AdaptedModel<M>, name: &str, config: HypernetworkConfig) -> Result<Vec<String>> {
    let sizes = config.sizes.clone();
    let (keys, values) = (config.key_modules().join(", "), config.value_modules().join(", "));
    model.add_adapter(name, Box::new(config))?;
    let layers = adapted_layers(&model.model, name);
    let missing = sizes.into_iter().flatten().flat_map(|w| [(w, Kind::Key), (w, Kind::Value)]).find(|(w, k)| !layers.iter().any(|(_, lw, lk)| lw == w && lk == k));
    if let Some((w, kind)) = missing {
        let mut found = BTreeSet::new();
        model.model.for_each_layer(|path, layer| {
            if let LayerRef::Linear(l) = layer {
                let names = if kind == Kind::Key { &keys } else { &values };
                if names.split(", ").any(|n| crate::target::name_matches(n, path)) {
                    found.insert(l.d_in());
                }
            }
        });
        model.delete_adapter(name)?;
        let which = if kind == Kind::Key { keys } else { values };
        let found: Vec<usize> = found.into_iter().collect();
        return Err(AdapterError::Config(format!("context width {w}: no `{which}` layer of the model takes {w}-wide input; its widths are {found:?}")));
    }
    Ok(layers.into_iter().map(|(p, _, _)| p).collect())
}

/// Sets the strength of hypernetwork `name` (A1111's multiplier; the adapter weight) on
/// every layer, leaving other adapters as they are. Strength 0 also deactivates it, so that
/// its layers run exactly as they do without it; any other strength activates it.
pub fn set_strength<M: Module + ?Sized>(model: &mut M, name: &str, strength: f32) {
    model.for_each_layer_mut(|_, mut layer| {
        layer.for_each_state(|n, s| {
            if n == name {
                s.weight = strength;
                s.active = strength != 0.0;
            }
        })
    });
}

/// The config of adapter `name` of `model`, which must be a hypernetwork.
pub fn config_of<M: Module>(model: &AdaptedModel<M>, name: &str) -> Result<HypernetworkConfig> {
    let config = model.config(name)?;
    if config.peft_type() != crate::PeftType::Hypernetwork {
        return Err(AdapterError::Config(format!("adapter `{name}` is {}, not a hypernetwork", config.peft_type())));
    }
    let any: &dyn std::any::Any = config;
    any.downcast_ref::<HypernetworkConfig>().cloned().ok_or_else(|| AdapterError::Config(format!("adapter `{name}`: its config is not a HypernetworkConfig")))
}

/// The tensors of hypernetwork `name` under A1111's keys (`768.0.linear.0.weight`).
pub fn state_dict<M: Module + ?Sized>(model: &M, name: &str) -> BTreeMap<String, TensorData> {
    let mut out = BTreeMap::new();
    model.for_each_layer(|path, layer| {
        if let Some(h) = hyper_of(&layer, name) {
            h.visit(path, name, &mut ParamFn(|p: &str, t: knobs_nn::ParamRef<'_>| {
                if let Some(k) = file_key(p, name) {
                    out.insert(k.to_string(), t.to_data());
                }
            }));
        }
    });
    out
}

fn list_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain values serialise")
}

/// Writes hypernetwork `name` of `model` to a safetensors file (atomically).
pub fn save<M: Module>(model: &AdaptedModel<M>, name: &str, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let config = config_of(model, name)?;
    let tensors = state_dict(&model.model, name);
    let widths: BTreeSet<usize> = adapted_layers(&model.model, name).into_iter().map(|(_, w, _)| w).collect();
    if widths.is_empty() {
        return Err(AdapterError::Config(format!("hypernetwork `{name}` is attached to no layer")));
    }
    let s = &config.structure;
    let mut meta = HashMap::new();
    let mut put = |k: &str, v: String| meta.insert(k.to_string(), v);
    put("format", "pt".into());
    put("layer_structure", list_json(&s.layer_structure));
    put("activation_func", s.activation.name().into());
    put("is_layer_norm", s.add_layer_norm.to_string());
    put("activate_output", s.activate_output.to_string());
    put("dropout_structure", list_json(&s.dropout_structure));
    put("use_dropout", s.dropout_structure.iter().any(|p| *p > 0.0).to_string());
    put("last_layer_dropout", (s.dropout_structure[s.dropout_structure.len() - 2] > 0.0).to_string());
    put("weight_initialization", "Normal".into());
    put("enable_sizes", list_json(&widths));
    if let Some(stem) = path.file_stem() {
        put("name", stem.to_string_lossy().into_owned());
    }
    put(KEY_MODULES_META, list_json(&config.key_modules()));
    put(VALUE_MODULES_META, list_json(&config.value_modules()));
    write_safetensors(path, &tensors, &meta)?;
    Ok(())
}

/// A hypernetwork file: its config (with `sizes` = the widths it holds) and its tensors.
#[derive(Debug)]
pub struct HypernetworkFile {
    pub config: HypernetworkConfig,
    pub tensors: StateDict,
}

fn meta_bool(sd: &StateDict, key: &str, default: bool) -> Result<bool> {
    match sd.metadata.get(key).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if v == "true" || v == "1" => Ok(true),
        Some(v) if v == "false" || v == "0" => Ok(false),
        Some(v) => Err(Error::key(&sd.file, key, format!("metadata `{v}` is not true or false")).into()),
    }
}

fn meta_json<T: serde::de::DeserializeOwned>(sd: &StateDict, key: &str) -> Result<Option<T>> {
    let Some(text) = sd.metadata.get(key) else { return Ok(None) };
    // Python writes lists of floats and booleans its own way; accept both spellings.
    let text = text.replace("True", "true").replace("False", "false").replace("None", "null");
    serde_json::from_str(&text).map(Some).map_err(|e| Error::key(&sd.file, key, format!("metadata `{text}` is not valid: {e}")).into())
}

/// The settings in a file's metadata, with A1111's defaults for what it leaves out (as its
/// loader does: no activation, no layer norm, `activate_output` true for files that predate
/// the setting, dropout from `use_dropout` / `last_layer_dropout`). `layer_structure` is
/// required: without it the tensors cannot be placed.
fn structure_from_meta(sd: &StateDict) -> Result<Structure> {
    let layer_structure: Vec<f64> = meta_json(sd, "layer_structure")?.ok_or_else(|| {
        Error::key(&sd.file, "layer_structure", "missing from the metadata: not a hypernetwork file knobs can place (it needs A1111's layer_structure, e.g. [1, 2, 1])")
    })?;
    let activation = match sd.metadata.get("activation_func") {
        None => Activation::Linear,
        Some(a) => Activation::parse(a).map_err(|e| Error::key(&sd.file, "activation_func", e))?,
    };
    let dropout_structure = match meta_json::<Vec<f64>>(sd, "dropout_structure")? {
        Some(d) => d,
        None => Structure::a1111_dropout(layer_structure.len(), meta_bool(sd, "use_dropout", false)?, meta_bool(sd, "last_layer_dropout", false)?),
    };
    let s = Structure { layer_structure, activation, add_layer_norm: meta_bool(sd, "is_layer_norm", false)?, activate_output: meta_bool(sd, "activate_output", true)?, dropout_structure };
    s.validate().map_err(|e| Error::file(&sd.file, e))?;
    Ok(s)
}

/// Reads a hypernetwork safetensors file. Pickles (A1111's `.pt`, ...) are refused unread,
/// NaN or infinite tensors by key.
pub fn read(path: impl AsRef<Path>) -> Result<HypernetworkFile> {
    let path = path.as_ref();
    let how = "A1111 saves hypernetworks as .pt; the .safetensors file holds its tensors under keys like `768.0.linear.0.weight`, and layer_structure, activation_func, is_layer_norm, dropout_structure and activate_output as metadata";
    let sd = read_checked(path, how)?;
    if sd.tensors.is_empty() {
        return Err(Error::file(path, "holds no tensors").into());
    }
    let structure = structure_from_meta(&sd)?;
    let mut widths = BTreeSet::new();
    for key in sd.tensors.keys() {
        let mut parts = key.splitn(3, '.');
        let (w, k) = (parts.next().and_then(|w| w.parse::<usize>().ok()), parts.next().and_then(|k| k.parse::<usize>().ok()).and_then(Kind::from_index));
        match (w, k, parts.next()) {
            (Some(w), Some(_), Some(rest)) if w > 0 && rest.starts_with("linear.") => {
                widths.insert(w);
            }
            _ => return Err(Error::key(path, key, "not a hypernetwork key (WIDTH.0|1.linear.N.weight|bias, as A1111's state dict)").into()),
        }
    }
    let names = |key: &str, default: &str| -> Result<Vec<String>> { Ok(meta_json(&sd, key)?.unwrap_or_else(|| vec![default.to_string()])) };
    let (keys, values) = (names(KEY_MODULES_META, A1111_KEY_MODULE)?, names(VALUE_MODULES_META, A1111_VALUE_MODULE)?);
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let config = HypernetworkConfig::new(&keys, &values, structure)
        .and_then(|c| c.with_sizes(widths.into_iter().collect()))
        .map_err(|e| AdapterError::Nn(Error::file(path, e)))?;
    Ok(HypernetworkFile { config, tensors: sd })
}

/// Loads the hypernetwork file `path` into `model` as adapter `name` with `strength`,
/// frozen for inference (call `train_adapter` to keep training it). Every tensor must fit:
/// a width the model lacks, a missing tensor, a wrong shape or a key the structure does not
/// have is an error naming the file and key, and leaves the model as it was.
pub fn load<M: Module>(model: &mut AdaptedModel<M>, path: impl AsRef<Path>, name: &str, strength: f32) -> Result<Vec<String>> {
    let path = path.as_ref();
    let HypernetworkFile { config, tensors: sd } = read(path)?;
    let layers = attach(model, name, config).map_err(|e| match e {
        AdapterError::Config(m) | AdapterError::Nn(Error::Invalid(m)) => AdapterError::Nn(Error::file(path, m)),
        AdapterError::NoMatch { pattern, near } => AdapterError::Nn(Error::key(path, KEY_MODULES_META, format!("no layer named `{pattern}` in the model; closest: {near:?}"))),
        other => other,
    })?;
    if let Err(e) = assign(model, name, &sd) {
        model.delete_adapter(name)?;
        return Err(e);
    }
    model.freeze();
    set_strength(&mut model.model, name, strength);
    Ok(layers)
}

fn assign<M: Module>(model: &mut AdaptedModel<M>, name: &str, sd: &StateDict) -> Result<()> {
    let mut used = BTreeSet::new();
    let mut error: Option<Error> = None;
    model.model.for_each_layer_mut(|path, mut layer| {
        layer.visit_adapter_mut(path, name, &mut ParamMutFn(|p: &str, mut t: knobs_nn::ParamMut<'_>| {
            let Some(key) = file_key(p, name) else { return };
            if error.is_some() {
                return;
            }
            match sd.tensors.get(key) {
                Some(d) => match t.assign(key, d.clone()) {
                    Ok(()) => {
                        used.insert(key.to_string());
                    }
                    Err(e) => error = Some(e.in_file(&sd.file)),
                },
                None => error = Some(Error::key(&sd.file, key, "the hypernetwork's structure needs this tensor and the file lacks it")),
            }
        }));
    });
    if let Some(e) = error {
        return Err(e.into());
    }
    if let Some(extra) = sd.tensors.keys().find(|k| !used.contains(*k)) {
        return Err(Error::key(&sd.file, extra, "fits no parameter of the structure the metadata describes (layer_structure, activation_func, is_layer_norm, dropout_structure, activate_output)").into());
    }
    Ok(())
}
