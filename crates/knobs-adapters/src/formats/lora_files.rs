//! LoRA files of the wider ecosystem, read into one PEFT-style [`ComponentLora`] per
//! component prefix (`unet`, `text_encoder`, ...) and attached to any model by module path:
//! PEFT folders, diffusers `pytorch_lora_weights.safetensors` (every key style diffusers has
//! written) and kohya-ss files (LoRA and LoCon). A component is only a key prefix here;
//! nothing in this file knows what a UNet is.
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, read_safetensors, write_safetensors};
use knobs_nn::{Error, LayerRef, Module, ModuleExt};
use serde_json::{Value, json};

use super::lora_read::{self, config_for};
use super::{diffusers, kohya};
use crate::lora::{LoraConfig, LoraConv2d, LoraEmbedding, LoraLinear};
use crate::{AdaptedModel, AdapterError, Result};

pub use super::lora_read::read;

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
        if config.peft_type() != "LORA" {
            return Err(AdapterError::Config(format!("adapter `{name}` is {}: diffusers and kohya files hold LoRA only; save it as a PEFT folder", config.peft_type())));
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
        if !self.kohya_names {
            return Ok(());
        }
        let names = kohya::layer_names(model);
        let mut renamed = HashMap::new();
        for m in self.modules() {
            let file_key = self.file_key(&format!("{}.lora_A.weight", m.path));
            let path = match names.get(&m.path) {
                Some(Ok(p)) => p.clone(),
                Some(Err((a, b))) => return Err(Error::key(&self.state.file, file_key, format!("ambiguous: layers `{a}` and `{b}` both have the kohya name `{}`", m.path)).into()),
                None => return Err(Error::key(&self.state.file, file_key, format!("no layer of the model has the kohya name `{}`", m.path)).into()),
            };
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
        self.kohya_names = false;
        Ok(())
    }

    fn file_key(&self, state_key: &str) -> String {
        self.origin.get(state_key).cloned().unwrap_or_else(|| state_key.to_string())
    }

    /// The tensors fitted to `model`'s layers: every module must be an adaptable layer of the
    /// right kind. A 2-D LoRA on a 1x1 Conv2d (or a [r, in, 1, 1] one on a Linear) is
    /// reshaped, as SD-2 checkpoints with linear `proj_in` and kohya files meet both.
    fn fit_to<M: Module + ?Sized>(&self, model: &M) -> Result<StateDict> {
        let mut layers: HashMap<String, (&'static str, usize)> = HashMap::new();
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
                let mut near: Vec<&String> = layers.keys().filter(|p| p.ends_with(last)).collect();
                near.sort();
                near.truncate(3);
                return Err(err(format!("the model has no adaptable layer `{}` (layers ending alike: {near:?})", m.path)));
            };
            let reshape = |key: &str, shape: Vec<usize>, st: &mut StateDict| {
                let d = st.tensors.remove(key).expect("module tensor");
                let v: Vec<f32> = d.convert::<f32>().to_vec().expect("f32 tensor");
                st.tensors.insert(key.to_string(), TensorData::new(v, shape));
            };
            let (sa, sb) = (state.tensors[&ka].shape().as_slice().to_vec(), state.tensors[&kb].shape().as_slice().to_vec());
            match (kind, m.embedding, sa.len()) {
                ("Embedding", true, 2) | ("Linear", false, 2) => {}
                ("Conv2d", false, 4) => {}
                ("Conv2d", false, 2) if kernel == 1 => {
                    reshape(&ka, vec![sa[0], sa[1], 1, 1], &mut state);
                    reshape(&kb, vec![sb[0], sb[1], 1, 1], &mut state);
                }
                ("Linear", false, 4) if sa[2..] == [1, 1] && sb[2..] == [1, 1] => {
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
pub fn save_diffusers(path: impl AsRef<Path>, components: &[(&str, &ComponentLora)], keys: DiffusersKeys) -> Result<()> {
    let path = path.as_ref();
    let mut tensors = BTreeMap::new();
    let mut adapter_meta = serde_json::Map::new();
    let mut needs_meta = keys == DiffusersKeys::Peft;
    for (prefix, lora) in components {
        check_savable(path, prefix, lora)?;
        needs_meta |= lora.modules().iter().any(|m| m.scale != 1.0);
        for (k, v) in &lora.state.tensors {
            let key = if keys == DiffusersKeys::Diffusers { diffusers::from_peft_key(k) } else { k.clone() };
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

fn check_savable(path: &Path, prefix: &str, lora: &ComponentLora) -> Result<()> {
    if prefix.is_empty() || prefix.contains('.') {
        return Err(Error::file(path, format!("component prefix `{prefix}` must be one non-empty key segment such as `unet`")).into());
    }
    if lora.kohya_names {
        return Err(Error::file(path, format!("component `{prefix}` still has kohya names; resolve them against the model first (ComponentLora::resolve_kohya)")).into());
    }
    Ok(())
}

/// Writes a kohya-ss LoRA / LoCon file: `lora_unet_<name>.lora_down.weight`, `.lora_up.weight`,
/// `.alpha` (= scale x rank, so the scale is exact) and sd-scripts' `ss_*` / `modelspec.*`
/// metadata. `architecture` fills `modelspec.architecture` (e.g. `stable-diffusion-v1/lora`).
pub fn save_kohya(path: impl AsRef<Path>, components: &[(&str, &ComponentLora)], architecture: Option<&str>) -> Result<()> {
    let path = path.as_ref();
    let mut tensors = BTreeMap::new();
    let (mut linear, mut conv) = (Vec::new(), Vec::new());
    for (prefix, lora) in components {
        check_savable(path, prefix, lora)?;
        let kp = kohya::prefix_for(prefix)
            .ok_or_else(|| Error::file(path, format!("kohya files have no prefix for component `{prefix}`; known: unet, text_encoder, text_encoder_2")))?;
        for m in lora.modules() {
            if m.embedding {
                return Err(Error::key(path, format!("{prefix}.{}", m.path), "kohya files cannot hold an embedding LoRA").into());
            }
            let name = format!("{kp}_{}", kohya::name_of(&m.path));
            let alpha = m.scale * m.rank as f64;
            tensors.insert(format!("{name}.lora_down.weight"), lora.state.tensors[&format!("{}.lora_A.weight", m.path)].clone());
            tensors.insert(format!("{name}.lora_up.weight"), lora.state.tensors[&format!("{}.lora_B.weight", m.path)].clone());
            tensors.insert(format!("{name}.alpha"), TensorData::new(vec![alpha as f32], [0usize; 0]));
            if m.conv { conv.push((m.rank, alpha)) } else { linear.push((m.rank, alpha)) }
        }
    }
    let mut meta = HashMap::new();
    meta.insert("ss_network_module".to_string(), "networks.lora".to_string());
    let main = if linear.is_empty() { &conv } else { &linear };
    if let Some((r, a)) = lora_read::mode(main) {
        meta.insert("ss_network_dim".into(), r.to_string());
        meta.insert("ss_network_alpha".into(), format!("{a:?}"));
    }
    if let (false, Some((r, a))) = (linear.is_empty(), lora_read::mode(&conv)) {
        meta.insert("ss_network_args".into(), json!({"conv_dim": r.to_string(), "conv_alpha": format!("{a:?}")}).to_string());
    }
    meta.insert("modelspec.sai_model_spec".into(), "1.0.0".into());
    if let Some(arch) = architecture {
        meta.insert("modelspec.architecture".into(), arch.to_string());
    }
    Ok(write_safetensors(path, &tensors, &meta)?)
}
