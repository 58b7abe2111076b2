//! LoRA files of the wider ecosystem, read into one PEFT-style [`ComponentLora`] per
//! component prefix (`unet`, `text_encoder`, ...) and attached to any model by module path:
//! PEFT folders, diffusers `pytorch_lora_weights.safetensors` (every key style diffusers has
//! written) and kohya-ss files (LoRA and LoCon). A component is only a key prefix here;
//! nothing in this file knows what a UNet is.
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, read_checked};
use knobs_nn::{Error, LayerKind, LayerRef, Module, ModuleExt};
use serde_json::Value;

use super::{diffusers, kohya, peft};
use crate::lora::{LoraConfig, LoraConv2d, LoraEmbedding, LoraLinear};
use crate::{AdaptedModel, AdapterError, Pattern, PeftType, Result};

pub use super::diffusers::{DiffusersKeys, save as save_diffusers};
pub use super::kohya::save as save_kohya;

/// The file diffusers' `save_lora_weights` writes into its folder.
pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";

/// Which tensor of a module's LoRA a file key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Down,
    Up,
    Alpha,
}

/// One component's LoRA: a config whose `target_modules` lists every adapted module path
/// exactly (ranks and alphas that differ from the most common ones in `rank_pattern` /
/// `alpha_pattern`), and the tensors under PEFT's file keys without prefix
/// (`<module>.lora_A.weight`, `.lora_B.weight`, `.lora_embedding_A`, `.lora_embedding_B`).
#[derive(Debug, Clone)]
pub struct ComponentLora {
    pub config: LoraConfig,
    pub state: StateDict,
    /// The file key each state key was read from, so errors name what the user's file holds.
    pub origin: BTreeMap<String, String>,
    /// Module names are still kohya's underscore-joined names; [`attach`] resolves them
    /// against the model's layer paths (or call [`ComponentLora::resolve_kohya`]).
    pub kohya_names: bool,
}

/// One adapted module of a [`ComponentLora`].
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleLora {
    pub path: String,
    pub rank: usize,
    /// `lora_alpha` as the config gives it; `scale` is what multiplies `B A`.
    pub alpha: f64,
    pub scale: f64,
    pub embedding: bool,
    /// A 4-D (convolution) LoRA.
    pub conv: bool,
}

impl ComponentLora {
    /// The adapted modules, in path order.
    pub fn modules(&self) -> Vec<ModuleLora> {
        let mut out = Vec::new();
        for (key, data) in &self.state.tensors {
            let (path, embedding) = match (key.strip_suffix(".lora_A.weight"), key.strip_suffix(".lora_embedding_A")) {
                (Some(p), _) => (p, false),
                (_, Some(p)) => (p, true),
                _ => continue,
            };
            let rank = data.shape()[0];
            let (_, alpha) = self.config.rank_alpha(path);
            let scale = self.config.scaling(rank, alpha);
            out.push(ModuleLora { path: path.to_string(), rank, alpha, scale, embedding, conv: data.shape().num_dims() == 4 });
        }
        out
    }

    /// Adapter `name` of `model` (a LoRA without `modules_to_save`) as a component, for
    /// saving in diffusers or kohya files. Each module's alpha becomes `scale * rank`, so
    /// rsLoRA adapters keep their exact scale in formats that only know `alpha / r`.
    pub fn from_adapter<M: Module>(model: &AdaptedModel<M>, name: &str) -> Result<Self> {
        let config = model.config(name)?;
        if config.peft_type() != PeftType::Lora {
            return Err(AdapterError::Config(format!("adapter `{name}` is {}: diffusers and kohya files hold LoRA only; save it as a PEFT folder", config.peft_type())));
        }
        if LoraConfig::is_dora(config) {
            return Err(AdapterError::Config(format!("adapter `{name}` is DoRA: diffusers and kohya LoRA files cannot hold its magnitudes; save it as a PEFT folder or a LyCORIS file")));
        }
        if !config.modules_to_save().is_empty() {
            return Err(AdapterError::Config(format!("adapter `{name}` has modules_to_save {:?}, which diffusers and kohya LoRA files cannot hold; save it as a PEFT folder", config.modules_to_save())));
        }
        let mut modules = Vec::new();
        model.model.for_each_layer(|path, layer| {
            let lora: Option<(usize, f64)> = match layer {
                LayerRef::Linear(l) => l.adapters.get(name).and_then(|e| (&*e.adapter as &dyn Any).downcast_ref::<LoraLinear>()).map(|a| (a.rank(), a.scale)),
                LayerRef::Conv2d(l) => l.adapters.get(name).and_then(|e| (&*e.adapter as &dyn Any).downcast_ref::<LoraConv2d>()).map(|a| (a.rank(), a.scale)),
                LayerRef::Embedding(l) => l.adapters.get(name).and_then(|e| (&*e.adapter as &dyn Any).downcast_ref::<LoraEmbedding>()).map(|a| (a.rank(), a.scale)),
            };
            if let Some((rank, scale)) = lora {
                modules.push((path.to_string(), rank, scale * rank as f64));
            }
        });
        let state = StateDict { file: PathBuf::from(format!("<adapter `{name}`>")), tensors: model.adapter_state_dict(name)?, metadata: HashMap::new() };
        let config = config_for(&state.file, &modules, false)?;
        Ok(ComponentLora { config, state, origin: BTreeMap::new(), kohya_names: false })
    }

    /// Turns kohya's underscore-joined names into the module paths of `model`'s layers.
    pub fn resolve_kohya<M: Module + ?Sized>(&mut self, model: &M) -> Result<()> {
        self.resolve_kohya_in(&kohya::KohyaNames::of(model))
    }

    /// Turns kohya's names into module paths through `names` (a model's names with aliases).
    pub fn resolve_kohya_in(&mut self, names: &kohya::KohyaNames) -> Result<()> {
        if !self.kohya_names {
            return Ok(());
        }
        let file = self.state.file.clone();
        self.rename(|m, file_key| names.resolve(&m.path).map_err(|msg| Error::key(&file, file_key, msg).into()))?;
        self.kohya_names = false;
        Ok(())
    }

    /// Renames every module path with `f` (e.g. to another naming of the same layers before
    /// saving); the tensors stay as they are.
    pub fn rename_modules(&mut self, f: impl Fn(&str) -> String) -> Result<()> {
        self.rename(|m, _| Ok(f(&m.path)))
    }

    /// Renames modules; `f` gets the module and the file key of its `lora_A`, for errors.
    fn rename(&mut self, f: impl Fn(&ModuleLora, &str) -> Result<String>) -> Result<()> {
        let mut renamed = HashMap::new();
        for m in self.modules() {
            let file_key = self.file_key(&format!("{}.lora_A.weight", m.path));
            let path = f(&m, &file_key)?;
            renamed.insert(m.path.clone(), (path, m));
        }
        let rename = |key: &str| -> String {
            let (module, suffix) = split_state_key(key);
            format!("{}{suffix}", renamed.get(module).map_or(module, |(p, _)| p.as_str()))
        };
        self.state.tensors = std::mem::take(&mut self.state.tensors).into_iter().map(|(k, v)| (rename(&k), v)).collect();
        self.origin = std::mem::take(&mut self.origin).into_iter().map(|(k, v)| (rename(&k), v)).collect();
        let modules: Vec<(String, usize, f64)> = renamed.into_values().map(|(p, m)| (p, m.rank, m.alpha)).collect();
        self.config = config_for(&self.state.file, &modules, self.config.use_rslora)?;
        Ok(())
    }

    fn file_key(&self, state_key: &str) -> String {
        self.origin.get(state_key).cloned().unwrap_or_else(|| state_key.to_string())
    }

    /// The tensors fitted to `model`'s layers: every module must be an adaptable layer of the
    /// right kind. A 2-D LoRA on a 1x1 Conv2d (or a [r, in, 1, 1] one on a Linear) is
    /// reshaped, as SD-2 checkpoints with linear `proj_in` and kohya files meet both.
    fn fit_to<M: Module + ?Sized>(&self, model: &M) -> Result<StateDict> {
        let mut layers: HashMap<String, (LayerKind, usize)> = HashMap::new();
        model.for_each_layer(|path, l| {
            let k = if let LayerRef::Conv2d(c) = &l { c.kernel() } else { 0 };
            layers.insert(path.to_string(), (l.kind(), k));
        });
        let mut state = self.state.clone();
        for m in self.modules() {
            let (a, b) = if m.embedding { ("lora_embedding_A", "lora_embedding_B") } else { ("lora_A.weight", "lora_B.weight") };
            let (ka, kb) = (format!("{}.{a}", m.path), format!("{}.{b}", m.path));
            let err = |msg: String| -> AdapterError { Error::key(&self.state.file, self.file_key(&ka), msg).into() };
            let Some(&(kind, kernel)) = layers.get(&m.path) else {
                let last = m.path.rsplit('.').next().unwrap_or_default();
                let parent = |p: &str| p.rsplit_once('.').map(|(a, _)| a.to_string());
                let mut near: Vec<&String> = layers.keys().filter(|p| p.ends_with(last) || parent(p) == parent(&m.path)).collect();
                near.sort();
                near.truncate(3);
                return Err(err(format!("the model has no adaptable layer `{}` (nearby layers: {near:?})", m.path)));
            };
            let reshape = |key: &str, shape: Vec<usize>, st: &mut StateDict| {
                let d = st.tensors.remove(key).expect("module tensor");
                let v: Vec<f32> = d.convert::<f32>().try_into_vec::<f32>().expect("f32 tensor");
                st.tensors.insert(key.to_string(), TensorData::new(v, shape));
            };
            let (sa, sb) = (state.tensors[&ka].shape().as_slice().to_vec(), state.tensors[&kb].shape().as_slice().to_vec());
            match (kind, m.embedding, sa.len()) {
                (LayerKind::Embedding, true, 2) | (LayerKind::Linear, false, 2) => {}
                (LayerKind::Conv2d, false, 4) => {}
                (LayerKind::Conv2d, false, 2) if kernel == 1 => {
                    reshape(&ka, vec![sa[0], sa[1], 1, 1], &mut state);
                    reshape(&kb, vec![sb[0], sb[1], 1, 1], &mut state);
                }
                (LayerKind::Linear, false, 4) if sa[2..] == [1, 1] && sb[2..] == [1, 1] => {
                    reshape(&ka, sa[..2].to_vec(), &mut state);
                    reshape(&kb, sb[..2].to_vec(), &mut state);
                }
                _ => return Err(err(format!("a {}-D {}LoRA tensor {sa:?} cannot adapt the {kind} layer `{}`", sa.len(), if m.embedding { "embedding " } else { "" }, m.path))),
            }
        }
        Ok(state)
    }

    /// Names the user's file key in an error about a state key.
    fn in_file_terms(&self, e: AdapterError) -> AdapterError {
        match e {
            AdapterError::Nn(Error::Key { file, key, msg }) => AdapterError::Nn(Error::Key { file, key: self.file_key(&key), msg }),
            other => other,
        }
    }
}

/// Splits a state key into its module path and its PEFT suffix (`.lora_A.weight`, ...).
pub(crate) fn split_state_key(key: &str) -> (&str, &str) {
    for suffix in [".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"] {
        if let Some(m) = key.strip_suffix(suffix) {
            return (m, &key[m.len()..]);
        }
    }
    (key, "")
}

pub(crate) fn check_savable(path: &Path, prefix: &str, lora: &ComponentLora) -> Result<()> {
    if prefix.is_empty() || prefix.contains('.') {
        return Err(Error::file(path, format!("component prefix `{prefix}` must be one non-empty key segment such as `unet`")).into());
    }
    if lora.kohya_names {
        return Err(Error::file(path, format!("component `{prefix}` still has kohya names; resolve them against the model first (ComponentLora::resolve_kohya)")).into());
    }
    Ok(())
}

/// Adds `lora` to `model` as adapter `name` and loads its tensors; the model is frozen
/// afterwards (call `train_adapter` to keep training). kohya names are resolved against the
/// model first. On any error the model is left as it was. Returns the adapted layer paths.
pub fn attach<M: Module>(model: &mut AdaptedModel<M>, name: &str, lora: &ComponentLora) -> Result<Vec<String>> {
    let mut lora = lora.clone();
    lora.resolve_kohya(&model.model)?;
    let state = lora.fit_to(&model.model)?;
    let paths = model.add_adapter(name, Box::new(lora.config.clone()))?;
    if let Err(e) = model.load_adapter_state_dict(name, &state, "") {
        model.delete_adapter(name)?;
        return Err(lora.in_file_terms(e));
    }
    model.freeze();
    Ok(paths)
}


/// Reads a PEFT LoRA folder, a diffusers LoRA folder or file, or a kohya file. Returns one
/// entry per component prefix (`unet`, `text_encoder`, ...); a PEFT folder has no prefix and
/// gives one entry keyed `""`. kohya entries keep kohya names until [`attach`] resolves them.
pub fn read(path: impl AsRef<Path>) -> Result<BTreeMap<String, ComponentLora>> {
    let path = path.as_ref();
    if path.is_dir() {
        if path.join(peft::CONFIG_FILE).exists() {
            return read_peft_folder(path);
        }
        if path.join(DIFFUSERS_FILE).exists() {
            return read(path.join(DIFFUSERS_FILE));
        }
        return Err(Error::file(path, format!("neither a PEFT folder ({}) nor a diffusers LoRA folder ({DIFFUSERS_FILE})", peft::CONFIG_FILE)).into());
    }
    let sd = read_checked(path, "")?;
    let Some(first) = sd.tensors.keys().next() else {
        return Err(Error::file(path, "holds no tensors").into());
    };
    if first.starts_with(peft::KEY_PREFIX) {
        return Err(Error::key(path, first, format!("PEFT adapter weights: pass the folder with its {}", peft::CONFIG_FILE)).into());
    }
    if sd.tensors.keys().any(|k| kohya::is_kohya(k)) { kohya::read(&sd) } else { diffusers::read(&sd) }
}

fn read_peft_folder(dir: &Path) -> Result<BTreeMap<String, ComponentLora>> {
    let cfg_path = dir.join(peft::CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, format!("cannot read: {e}")))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?;
    if let Some(t) = json.get("peft_type").and_then(Value::as_str).filter(|t| PeftType::parse(t) != Some(PeftType::Lora)) {
        return Err(Error::key(&cfg_path, "peft_type", format!("`{t}` is not LoRA; load it with formats::peft::load")).into());
    }
    if json.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(Error::key(&cfg_path, "use_dora", "a DoRA folder: load it with formats::peft::load").into());
    }
    if json.get("modules_to_save").is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(Error::key(&cfg_path, "modules_to_save", "set: load this folder with formats::peft::load").into());
    }
    let scaling = peft_scaling(&cfg_path, &json)?;
    let sd = read_checked(dir.join(peft::WEIGHTS_FILE), "")?;
    let mut found = Collected::default();
    for (key, data) in &sd.tensors {
        let parsed = key.strip_prefix(peft::KEY_PREFIX).and_then(|k| diffusers::parse("", k)).filter(|(_, p, _)| *p != Part::Alpha);
        let Some((module, part, emb)) = parsed else {
            return Err(Error::key(&sd.file, key, format!("not a PEFT LoRA key ({}<module>.lora_A.weight / .lora_B.weight)", peft::KEY_PREFIX)).into());
        };
        found.add(&sd.file, "", module, part, emb, key, data)?;
    }
    found.build(&sd.file, &HashMap::from([(String::new(), scaling)]), false)
}

/// The scaling fields of a PEFT LoRA config (an `adapter_config.json`, or one component of
/// diffusers' `lora_adapter_metadata`), as a config used only for [`LoraConfig::rank_alpha`].
pub(crate) fn peft_scaling(file: &Path, json: &Value) -> Result<LoraConfig> {
    let get = |k: &str| json.get(k).filter(|v| !v.is_null());
    let bad = |k: &str, e: serde_json::Error| AdapterError::from(Error::key(file, k, e));
    if get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(Error::key(file, "use_dora", "DoRA in a diffusers LoRA file is not supported; load its PEFT folder or a LyCORIS file").into());
    }
    let mut cfg = LoraConfig::new(8, 8.0, Pattern::Names(vec![]));
    if let Some(v) = get("r") { cfg.r = serde_json::from_value(v.clone()).map_err(|e| bad("r", e))?; }
    if let Some(v) = get("lora_alpha") { cfg.lora_alpha = serde_json::from_value(v.clone()).map_err(|e| bad("lora_alpha", e))?; }
    if let Some(v) = get("use_rslora") { cfg.use_rslora = serde_json::from_value(v.clone()).map_err(|e| bad("use_rslora", e))?; }
    if let Some(v) = get("rank_pattern") { cfg.rank_pattern = serde_json::from_value(v.clone()).map_err(|e| bad("rank_pattern", e))?; }
    if let Some(v) = get("alpha_pattern") { cfg.alpha_pattern = serde_json::from_value(v.clone()).map_err(|e| bad("alpha_pattern", e))?; }
    Ok(cfg)
}

/// The tensors of one module as a file's keys are gathered.
#[derive(Default)]
struct Found {
    down: Option<(String, TensorData)>,
    up: Option<(String, TensorData)>,
    alpha: Option<(String, f64)>,
    embedding: bool,
}

/// Tensors gathered per component and module while a file is read.
#[derive(Default)]
pub(crate) struct Collected(BTreeMap<String, BTreeMap<String, Found>>);

impl Collected {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add(&mut self, file: &Path, component: &str, module: String, part: Part, embedding: bool, key: &str, data: &TensorData) -> Result<()> {
        let f = self.0.entry(component.to_string()).or_default().entry(module.clone()).or_default();
        let dup = |other: &str| -> AdapterError { Error::key(file, key, format!("module `{module}` already has this tensor from `{other}`")).into() };
        match part {
            Part::Down | Part::Up => {
                let slot = if part == Part::Down { &mut f.down } else { &mut f.up };
                if let Some((other, _)) = slot {
                    return Err(dup(other));
                }
                *slot = Some((key.to_string(), data.clone()));
                f.embedding |= embedding;
            }
            Part::Alpha => {
                let v: Vec<f32> = data.clone().convert::<f32>().try_into_vec::<f32>().map_err(|e| Error::key(file, key, format!("{e:?}")))?;
                if v.len() != 1 {
                    return Err(Error::key(file, key, format!("an alpha must be one number; this has shape {:?}", data.shape().as_slice())).into());
                }
                if let Some((other, _)) = &f.alpha {
                    return Err(dup(other));
                }
                f.alpha = Some((key.to_string(), v[0] as f64));
            }
        }
        Ok(())
    }

    /// One [`ComponentLora`] per component. A module's alpha is its `.alpha` tensor, else
    /// what `scaling[component]` gives, else its rank (scale 1, as diffusers loads plain files).
    pub(crate) fn build(self, file: &Path, scaling: &HashMap<String, LoraConfig>, kohya_names: bool) -> Result<BTreeMap<String, ComponentLora>> {
        let mut out = BTreeMap::new();
        for (component, found) in self.0 {
            let cfg = scaling.get(&component);
            let (mut tensors, mut origin, mut modules) = (BTreeMap::new(), BTreeMap::new(), Vec::new());
            for (module, f) in found {
                let any_key = f.down.as_ref().or(f.up.as_ref()).map(|(k, _)| k.clone()).or(f.alpha.as_ref().map(|(k, _)| k.clone())).unwrap_or_default();
                let (Some((kd, down)), Some((ku, up))) = (f.down, f.up) else {
                    return Err(Error::key(file, any_key, format!("module `{module}` needs both a down (A) and an up (B) tensor")).into());
                };
                let (sd, su) = (down.shape().as_slice().to_vec(), up.shape().as_slice().to_vec());
                let dims_ok = sd.len() == su.len() && (sd.len() == 2 || (sd.len() == 4 && !f.embedding));
                if !dims_ok || su[1] != sd[0] || sd[0] == 0 {
                    return Err(Error::key(file, ku, format!("shape {su:?} does not pair with down tensor `{kd}` of shape {sd:?} (up must be [out, rank, ...] for down [rank, in, ...])")).into());
                }
                let rank = sd[0];
                let alpha = match (f.alpha, cfg) {
                    (Some((k, a)), _) if a.is_nan() || a <= 0.0 => {
                        return Err(Error::key(file, k, format!("alpha {a}: must be positive (a zero alpha silences the module, a negative one flips it)")).into());
                    }
                    (Some((_, a)), _) => a,
                    (None, Some(c)) => c.rank_alpha(&module).1,
                    (None, None) => rank as f64,
                };
                let (a, b) = if f.embedding { ("lora_embedding_A", "lora_embedding_B") } else { ("lora_A.weight", "lora_B.weight") };
                for (suffix, key, data) in [(a, kd, down), (b, ku, up)] {
                    origin.insert(format!("{module}.{suffix}"), key);
                    tensors.insert(format!("{module}.{suffix}"), data);
                }
                modules.push((module, rank, alpha));
            }
            let config = config_for(file, &modules, cfg.is_some_and(|c| c.use_rslora))?;
            let state = StateDict { file: file.to_path_buf(), tensors, metadata: HashMap::new() };
            out.insert(component, ComponentLora { config, state, origin, kohya_names });
        }
        Ok(out)
    }
}

/// The most common (rank, alpha) pair's parts, each the most frequent value (ties: smallest).
pub(crate) fn mode(items: &[(usize, f64)]) -> Option<(usize, f64)> {
    let most = |vals: Vec<u64>| {
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        vals.into_iter().for_each(|v| *counts.entry(v).or_default() += 1);
        counts.into_iter().max_by_key(|(v, c)| (*c, std::cmp::Reverse(*v))).map(|(v, _)| v)
    };
    let r = most(items.iter().map(|(r, _)| *r as u64).collect())?;
    let a = most(items.iter().map(|(_, a)| a.to_bits()).collect())?;
    Some((r as usize, f64::from_bits(a)))
}

/// A config adapting exactly `modules` (path, rank, alpha): the most common rank and alpha as
/// `r` / `lora_alpha`, the others as patterns keyed by full path.
pub(crate) fn config_for(file: &Path, modules: &[(String, usize, f64)], use_rslora: bool) -> Result<LoraConfig> {
    let pairs: Vec<(usize, f64)> = modules.iter().map(|(_, r, a)| (*r, *a)).collect();
    let (r, alpha) = mode(&pairs).ok_or_else(|| Error::file(file, "holds no LoRA modules"))?;
    let mut cfg = LoraConfig::new(r, alpha, Pattern::Names(modules.iter().map(|(p, _, _)| p.clone()).collect()));
    cfg.use_rslora = use_rslora;
    for (path, rank, a) in modules {
        if *rank != r {
            cfg.rank_pattern.insert(path.clone(), *rank);
        }
        if *a != alpha {
            cfg.alpha_pattern.insert(path.clone(), *a);
        }
    }
    // A full path that is also the tail of a longer one would give the longer one its pattern.
    if let Some((p, _, _)) = modules.iter().find(|(p, rk, a)| cfg.rank_alpha(p) != (*rk, *a)) {
        return Err(Error::file(file, format!("module `{p}`: its rank/alpha cannot be told apart from another module whose path ends with it")).into());
    }
    Ok(cfg)
}
