//! LyCORIS single files, as kohya's trainers and LyCORIS write them and A1111 / ComfyUI load
//! them: LoHa (`hada_w1_a` ...), LoKr (`lokr_w1`, `lokr_w2_a` ...), DoRA (LoCon's
//! `lora_down` / `lora_up` with `dora_scale`) and diag-OFT (`oft_blocks`), each module under a kohya name
//! (`lora_unet_<path with _>`) with a scalar `.alpha`. The tensors are PEFT's own factors under
//! other names, so a file becomes a PEFT-style adapter with one rank and alpha per module.
//! Scales as LyCORIS loaders apply them: `alpha / r` with `r` the rank of the low-rank factors,
//! and 1 for a LoKr module without any (both Kronecker factors full).
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, write_safetensors};
use knobs_nn::{Error, LayerRef, Module, ModuleExt, ParamFn};
use serde_json::json;

use super::kohya::{self, name_of, prefix_for};
use super::lora_files::mode;
use crate::loha::{Hada, LohaConfig};
use crate::lokr::{Kron, KronPlan, LokrConfig};
use crate::lora::{DoraConv2d, DoraLinear, LoraConfig};
use crate::lycoris::{DeltaAdapter, LycorisOptions};
use crate::oft::diag::{DiagOft, DiagOftConfig};
use crate::{AdaptedModel, AdapterConfig, AdapterError, Pattern, PeftType, Result, strip_adapter_name};

/// The method of a LyCORIS file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    Loha,
    Lokr,
    Dora,
    /// LyCORIS's output-side block rotation (`oft_blocks`).
    DiagOft,
}

impl Algo {
    /// LyCORIS's `algo` name.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Loha => "loha",
            Algo::Lokr => "lokr",
            Algo::Dora => "locon",
            Algo::DiagOft => "diag-oft",
        }
    }
}

/// Every tensor name a module may hold, and the method it belongs to.
const PARAMS: &[(&str, Option<Algo>)] = &[
    ("hada_w1_a", Some(Algo::Loha)),
    ("hada_w1_b", Some(Algo::Loha)),
    ("hada_w2_a", Some(Algo::Loha)),
    ("hada_w2_b", Some(Algo::Loha)),
    ("hada_t1", Some(Algo::Loha)),
    ("hada_t2", Some(Algo::Loha)),
    ("lokr_w1", Some(Algo::Lokr)),
    ("lokr_w1_a", Some(Algo::Lokr)),
    ("lokr_w1_b", Some(Algo::Lokr)),
    ("lokr_w2", Some(Algo::Lokr)),
    ("lokr_w2_a", Some(Algo::Lokr)),
    ("lokr_w2_b", Some(Algo::Lokr)),
    ("lokr_t2", Some(Algo::Lokr)),
    ("dora_scale", Some(Algo::Dora)),
    ("oft_blocks", Some(Algo::DiagOft)),
    ("lora_down.weight", None),
    ("lora_up.weight", None),
    ("alpha", None),
];

/// Whether a file holds LyCORIS tensors this module reads (or diag-OFT, which it names).
pub fn is_lycoris(sd: &StateDict) -> bool {
    sd.tensors.keys().any(|k| kohya::is_kohya(k) && [".hada_", ".lokr_", ".dora_scale", ".oft_blocks"].iter().any(|m| k.contains(m)))
}

/// One module's tensors, by LyCORIS name, with the file key each came from.
#[derive(Debug, Clone, Default)]
pub struct LycorisModule {
    pub tensors: BTreeMap<String, (String, TensorData)>,
    pub alpha: Option<f64>,
}

impl LycorisModule {
    fn get(&self, name: &str) -> Option<&TensorData> {
        self.tensors.get(name).map(|(_, d)| d)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).map(|d| d.shape().as_slice().to_vec())
    }
    fn any_key(&self) -> String {
        self.tensors.values().next().map(|(k, _)| k.clone()).unwrap_or_default()
    }
}

/// One component's LyCORIS modules, by kohya name (or layer path, once resolved).
#[derive(Debug, Clone)]
pub struct LycorisPart {
    pub algo: Algo,
    pub modules: BTreeMap<String, LycorisModule>,
}

/// Reads a LyCORIS file into one part per component prefix (`unet`, `text_encoder`).
pub fn read(sd: &StateDict) -> Result<BTreeMap<String, LycorisPart>> {
    let file = &sd.file;
    let mut found: BTreeMap<String, BTreeMap<String, LycorisModule>> = BTreeMap::new();
    for (key, data) in &sd.tensors {
        let (component, rest) = kohya::split_prefix(key).ok_or_else(|| Error::key(file, key, "not a LyCORIS key: expected lora_unet_<name> / lora_te_<name> then .hada_*, .lokr_*, .lora_down/up.weight, .dora_scale or .alpha"))?;
        let Some((module, param)) = PARAMS.iter().find_map(|(p, _)| rest.strip_suffix(p).and_then(|m| m.strip_suffix('.')).filter(|m| !m.is_empty() && !m.contains('.')).map(|m| (m, *p))) else {
            return Err(Error::key(file, key, "not a LyCORIS tensor of LoHa, LoKr, DoRA or diag-OFT").into());
        };
        let m = found.entry(component.to_string()).or_default().entry(module.to_string()).or_default();
        if param == "alpha" {
            let v: Vec<f32> = data.clone().convert::<f32>().try_into_vec::<f32>().map_err(|e| Error::key(file, key, format!("{e:?}")))?;
            let [a] = v[..] else { return Err(Error::key(file, key, "an alpha must be one number").into()) };
            m.alpha = Some(a as f64);
        } else {
            m.tensors.insert(param.to_string(), (key.clone(), data.clone()));
        }
    }
    let mut out = BTreeMap::new();
    for (component, modules) in found {
        let mut algo: Option<(Algo, String)> = None;
        for (name, m) in &modules {
            let here: Vec<Algo> = m.tensors.keys().filter_map(|p| PARAMS.iter().find(|(q, _)| q == p).and_then(|(_, a)| *a)).collect();
            let Some(&a) = here.first() else {
                return Err(Error::key(file, m.any_key(), format!("module `{name}` holds neither LoHa, LoKr nor DoRA tensors (a plain LoRA module; files mixing it with LyCORIS modules are not supported)")).into());
            };
            if here.iter().any(|b| *b != a) {
                return Err(Error::key(file, m.any_key(), format!("module `{name}` mixes tensors of two methods")).into());
            }
            match &algo {
                Some((b, other)) if *b != a => {
                    return Err(Error::key(file, m.any_key(), format!("module `{name}` is {} but `{other}` is {}: one file, one method", a.name(), b.name())).into());
                }
                _ => algo = Some((a, name.clone())),
            }
        }
        let Some((algo, _)) = algo else { continue };
        out.insert(component, LycorisPart { algo, modules });
    }
    if out.is_empty() {
        return Err(Error::file(file, "holds no LyCORIS modules").into());
    }
    Ok(out)
}

/// A config's default rank and alpha, then its rank and alpha patterns keyed by full path.
type Patterns = (usize, f64, BTreeMap<String, usize>, BTreeMap<String, f64>);

/// `(r, alpha)` as the config's defaults, the rest as patterns keyed by full path.
fn patterns(file: &Path, modules: &[(String, usize, f64)]) -> Result<Patterns> {
    let pairs: Vec<(usize, f64)> = modules.iter().map(|(_, r, a)| (*r, *a)).collect();
    let (r, alpha) = mode(&pairs).ok_or_else(|| Error::file(file, "holds no modules"))?;
    let mut rank_pattern = BTreeMap::new();
    let mut alpha_pattern = BTreeMap::new();
    for (path, rk, a) in modules {
        if *rk != r {
            rank_pattern.insert(path.clone(), *rk);
        }
        if *a != alpha {
            alpha_pattern.insert(path.clone(), *a);
        }
    }
    for (path, rk, a) in modules {
        let got = (crate::target::pattern_value(&rank_pattern, path).unwrap_or(r), crate::target::pattern_value(&alpha_pattern, path).unwrap_or(alpha));
        if got != (*rk, *a) {
            return Err(Error::file(file, format!("module `{path}`: its rank/alpha cannot be told apart from another module whose path ends with it")).into());
        }
    }
    Ok((r, alpha, rank_pattern, alpha_pattern))
}

/// Adds `part` (read from `file`) to `model` as adapter `name` and loads its tensors; frozen
/// afterwards. kohya names resolve against the model's layers. On any error the model is left
/// as it was. Returns the adapted layer paths.
pub fn attach<M: Module>(model: &mut AdaptedModel<M>, name: &str, part: &LycorisPart, file: &Path) -> Result<Vec<String>> {
    let names = kohya::KohyaNames::of(&model.model);
    attach_named(model, name, part, file, &names)
}

/// [`attach`] with kohya names resolved through `names` (the model's own plus aliases).
pub fn attach_named<M: Module>(model: &mut AdaptedModel<M>, name: &str, part: &LycorisPart, file: &Path, names: &kohya::KohyaNames) -> Result<Vec<String>> {
    // Each layer's weight shape `[out, in, k, k]` (k = 1 for Linear) and whether it is a conv.
    let mut shapes: HashMap<String, ([usize; 4], bool)> = HashMap::new();
    model.model.for_each_layer(|path, l| {
        let s = match l {
            LayerRef::Linear(l) => ([l.d_out(), l.d_in(), 1, 1], false),
            LayerRef::Conv2d(c) => (c.weight.dims(), true),
            LayerRef::Embedding(_) => ([0; 4], false),
        };
        shapes.insert(path.to_string(), s);
    });
    let mut state = BTreeMap::new();
    let mut ranks = Vec::new();
    let mut layouts = BTreeMap::new();
    let mut cp = false;
    let mut diag = BTreeMap::new();
    for (kname, m) in &part.modules {
        let key = m.any_key();
        let path = names.resolve(kname).map_err(|msg| Error::key(file, &key, msg))?;
        let ([out, c_in, kh, kw], conv) = shapes[&path];
        let need = |t: &str| m.shape(t).ok_or_else(|| AdapterError::from(Error::key(file, &key, format!("module `{kname}` lacks `{t}`"))));
        match part.algo {
            Algo::Loha => {
                let r = need("hada_w1_b")?[0];
                cp |= m.get("hada_t1").is_some();
                ranks.push((path.clone(), r, m.alpha.unwrap_or(r as f64)));
                for (p, (_, d)) in &m.tensors {
                    state.insert(format!("{path}.{p}"), d.clone());
                }
            }
            Algo::Lokr => {
                let full_w1 = m.get("lokr_w1").is_some();
                let full_w2 = m.get("lokr_w2").is_some();
                let is_cp = m.get("lokr_t2").is_some();
                let (a, c) = if full_w1 { let s = need("lokr_w1")?; (s[0], s[1]) } else { (need("lokr_w1_a")?[0], need("lokr_w1_b")?[1]) };
                let (b, d) = if full_w2 {
                    let s = need("lokr_w2")?;
                    (s[0], s[1])
                } else if is_cp {
                    (need("lokr_w2_a")?[1], need("lokr_w2_b")?[1])
                } else {
                    (need("lokr_w2_a")?[0], need("lokr_w2_b")?[1] / (kh * kw))
                };
                if a * b != out || c * d != c_in {
                    return Err(Error::key(file, key, format!("Kronecker factors {a}x{b} by {c}x{d} do not make the layer `{path}` ({out} x {c_in})")).into());
                }
                let dim = if !full_w1 { need("lokr_w1_b")?[0] } else if !full_w2 { need("lokr_w2_b")?[0] } else { 0 };
                // LyCORIS: alpha / dim, or 1 when both factors are full.
                let (r, alpha) = if dim == 0 { (1, 1.0) } else { (dim, m.alpha.unwrap_or(dim as f64)) };
                ranks.push((path.clone(), r, alpha));
                layouts.insert(path.clone(), KronPlan { out: (a, b), c_in: (c, d), kernel: (kh, kw), full_w1, full_w2, cp: is_cp, conv });
                for (p, (_, t)) in &m.tensors {
                    state.insert(format!("{path}.{p}"), t.clone());
                }
            }
            Algo::Dora => {
                let down = need("lora_down.weight")?;
                let scale = need("dora_scale")?;
                let r = down[0];
                ranks.push((path.clone(), r, m.alpha.unwrap_or(r as f64)));
                let (_, d) = &m.tensors["dora_scale"];
                let magnitude_shape = if conv { vec![1, out, 1, 1] } else { vec![out] };
                if scale.first() != Some(&out) || scale[1..].iter().any(|&s| s != 1) {
                    let (k, _) = &m.tensors["dora_scale"];
                    return Err(Error::key(file, k, format!("shape {scale:?}: a magnitude per input channel (LyCORIS wd_on_out=False) is not supported; per output channel ([{out}, 1...]) is")).into());
                }
                let v: Vec<f32> = d.clone().convert::<f32>().try_into_vec::<f32>().expect("float tensor");
                state.insert(format!("{path}.lora_magnitude_vector"), TensorData::new(v, magnitude_shape));
                state.insert(format!("{path}.lora_A.weight"), m.tensors["lora_down.weight"].1.clone());
                let up = m.tensors.get("lora_up.weight").ok_or_else(|| AdapterError::from(Error::key(file, &key, format!("module `{kname}` lacks `lora_up.weight`"))))?;
                state.insert(format!("{path}.lora_B.weight"), up.1.clone());
            }
            Algo::DiagOft => {
                let s = need("oft_blocks")?;
                let [n, bs, bs2] = s[..] else { return Err(Error::key(file, key, format!("oft_blocks of shape {s:?}; expected [blocks, size, size]")).into()) };
                if bs != bs2 || n * bs != out {
                    return Err(Error::key(file, key, format!("oft_blocks {s:?} do not cover the {out} outputs of `{path}`")).into());
                }
                diag.insert(path.clone(), (n, bs, m.alpha.unwrap_or(0.0)));
                ranks.push((path.clone(), 1, 1.0));
                let d = m.tensors["oft_blocks"].1.clone().convert::<f32>();
                state.insert(format!("{path}.oft_blocks"), TensorData::new(d.try_into_vec::<f32>().expect("float"), [n * bs, bs]));
            }
        }
    }
    let (r, alpha, rank_pattern, alpha_pattern) = patterns(file, &ranks)?;
    let targets = Pattern::Names(ranks.iter().map(|(p, _, _)| p.clone()).collect());
    let config: Box<dyn AdapterConfig> = match part.algo {
        Algo::Loha | Algo::Lokr => {
            let mut o = LycorisOptions::new(r, alpha, targets);
            o.rank_pattern = rank_pattern;
            o.alpha_pattern = alpha_pattern;
            o.use_effective_conv2d = cp;
            if part.algo == Algo::Loha { Box::new(LohaConfig::new(o)) } else { Box::new(LokrConfig { layouts, ..LokrConfig::new(o) }) }
        }
        Algo::Dora => Box::new(LoraConfig { use_dora: true, rank_pattern, alpha_pattern, ..LoraConfig::new(r, alpha, targets) }),
        Algo::DiagOft => Box::new(DiagOftConfig { targets: crate::Targets::new(targets), layers: diag }),
    };
    let paths = model.add_adapter(name, config)?;
    let sd = StateDict { file: file.to_path_buf(), tensors: state, metadata: HashMap::new() };
    if let Err(e) = model.load_adapter_state_dict(name, &sd, "") {
        model.delete_adapter(name)?;
        return Err(e);
    }
    model.freeze();
    Ok(paths)
}

/// Adapter `name` of `model` (LoHa, LoKr or DoRA) as a LyCORIS part under layer paths.
pub fn from_adapter<M: Module>(model: &AdaptedModel<M>, name: &str) -> Result<LycorisPart> {
    let config = model.config(name)?;
    let dora = LoraConfig::is_dora(config);
    let diag_oft = (config as &dyn Any).downcast_ref::<DiagOftConfig>().is_some();
    let algo = match config.peft_type() {
        _ if diag_oft => Algo::DiagOft,
        PeftType::Loha => Algo::Loha,
        PeftType::Lokr => Algo::Lokr,
        _ if dora => Algo::Dora,
        other => return Err(AdapterError::Config(format!("adapter `{name}` is {other}: LyCORIS files here hold LoHa, LoKr, DoRA or diag-OFT"))),
    };
    if !config.modules_to_save().is_empty() {
        return Err(AdapterError::Config(format!("adapter `{name}` has modules_to_save, which LyCORIS files cannot hold; save it as a PEFT folder")));
    }
    let mut modules = BTreeMap::new();
    model.model.for_each_layer(|path, layer| {
        let any: Option<&dyn Any> = match &layer {
            LayerRef::Linear(l) => l.adapters.get(name).map(|e| &*e.adapter as &dyn Any),
            LayerRef::Conv2d(l) => l.adapters.get(name).map(|e| &*e.adapter as &dyn Any),
            LayerRef::Embedding(_) => None,
        };
        let Some(any) = any else { return };
        let mut tensors = BTreeMap::new();
        layer.visit_adapter(path, name, &mut ParamFn(|p: &str, t: knobs_nn::ParamRef<'_>| {
            let key = strip_adapter_name(p, name);
            let param = key[path.len() + 1..].to_string();
            tensors.insert(param, (key, t.to_data()));
        }));
        let scale = if let Some(a) = any.downcast_ref::<DeltaAdapter<Hada>>() {
            a.scale
        } else if let Some(a) = any.downcast_ref::<DeltaAdapter<Kron>>() {
            a.scale
        } else if let Some(a) = any.downcast_ref::<DoraLinear>() {
            a.lora.scale
        } else if let Some(a) = any.downcast_ref::<DoraConv2d>() {
            a.lora.scale
        } else if let Some(a) = any.downcast_ref::<DiagOft>() {
            a.constraint
        } else {
            return;
        };
        modules.insert(path.to_string(), with_lycoris_names(algo, tensors, scale));
    });
    Ok(LycorisPart { algo, modules })
}

/// Our tensors (PEFT names) as a LyCORIS module whose loaders give the same change.
fn with_lycoris_names(algo: Algo, mut t: BTreeMap<String, (String, TensorData)>, scale: f64) -> LycorisModule {
    let rows = |t: &BTreeMap<String, (String, TensorData)>, k: &str| t.get(k).map(|(_, d)| d.shape().as_slice()[0]);
    let alpha = match algo {
        Algo::Loha => scale * rows(&t, "hada_w1_b").unwrap_or(1) as f64,
        Algo::Lokr => match rows(&t, "lokr_w1_b").or(rows(&t, "lokr_w2_b")) {
            Some(r) => scale * r as f64,
            None => {
                // Both factors full: LyCORIS applies no scale, so it goes into w1.
                if let Some((k, d)) = t.remove("lokr_w1") {
                    let shape = d.shape().as_slice().to_vec();
                    let v: Vec<f32> = d.convert::<f32>().try_into_vec::<f32>().expect("float").into_iter().map(|x| x * scale as f32).collect();
                    t.insert("lokr_w1".into(), (k, TensorData::new(v, shape)));
                }
                1.0
            }
        },
        Algo::Dora => {
            let r = rows(&t, "lora_A.weight").unwrap_or(1);
            let (ka, a) = t.remove("lora_A.weight").expect("DoRA has A");
            let (kb, b) = t.remove("lora_B.weight").expect("DoRA has B");
            let (km, m) = t.remove("lora_magnitude_vector").expect("DoRA has a magnitude");
            let out = b.shape().as_slice()[0];
            let shape = if m.shape().num_dims() == 4 { vec![out, 1, 1, 1] } else { vec![out, 1] };
            let v: Vec<f32> = m.convert::<f32>().try_into_vec::<f32>().expect("float");
            t.insert("lora_down.weight".into(), (ka, a));
            t.insert("lora_up.weight".into(), (kb, b));
            t.insert("dora_scale".into(), (km, TensorData::new(v, shape)));
            scale * r as f64
        }
        // The "scale" of a diag-OFT module is its constraint, LyCORIS's alpha.
        Algo::DiagOft => {
            let (k, d) = t.remove("oft_blocks").expect("diag-OFT has blocks");
            let [rows, bs] = d.shape().as_slice()[..] else { unreachable!("stored 2-D") };
            let v: Vec<f32> = d.convert::<f32>().try_into_vec::<f32>().expect("float");
            t.insert("oft_blocks".into(), (k, TensorData::new(v, [rows / bs, bs, bs])));
            scale
        }
    };
    LycorisModule { tensors: t, alpha: Some(alpha) }
}

/// Writes LyCORIS parts (`(component, part)`, modules under layer paths) as one file with
/// kohya names and LyCORIS's `ss_network_module` / `ss_network_args` metadata;
/// `architecture` as for [`kohya::save`] (SDXL: text encoders `te1` / `te2`).
pub fn save(path: impl AsRef<Path>, components: &[(&str, &LycorisPart)], architecture: Option<&str>) -> Result<()> {
    let path = path.as_ref();
    let sdxl = architecture == Some(kohya::SDXL_ARCHITECTURE);
    let mut tensors = BTreeMap::new();
    let mut dims = Vec::new();
    let mut algo = None;
    for (prefix, part) in components {
        let kp = prefix_for(prefix, sdxl).ok_or_else(|| Error::file(path, format!("LyCORIS files have no prefix for component `{prefix}`; known: unet, text_encoder, text_encoder_2")))?;
        if algo.is_some_and(|a| a != part.algo) {
            return Err(Error::file(path, "one LyCORIS file holds one method").into());
        }
        algo = Some(part.algo);
        for (module, m) in &part.modules {
            let name = format!("{kp}_{}", name_of(module));
            for (p, (_, d)) in &m.tensors {
                tensors.insert(format!("{name}.{p}"), d.clone());
            }
            let alpha = m.alpha.unwrap_or(1.0);
            tensors.insert(format!("{name}.alpha"), TensorData::new(vec![alpha as f32], [0usize; 0]));
            let r = ["hada_w1_b", "lokr_w1_b", "lokr_w2_b", "lora_down.weight"].iter().find_map(|k| m.shape(k).map(|s| s[0])).unwrap_or(1);
            dims.push((r, alpha));
        }
    }
    let algo = algo.ok_or_else(|| Error::file(path, "nothing to save"))?;
    let mut meta = HashMap::new();
    meta.insert("ss_network_module".to_string(), "lycoris.kohya".to_string());
    let mut args = json!({"algo": algo.name()});
    if algo == Algo::Dora {
        args["dora_wd"] = json!("True");
        args["wd_on_output"] = json!("True");
    }
    meta.insert("ss_network_args".into(), args.to_string());
    if let Some(arch) = architecture {
        meta.insert("modelspec.architecture".into(), arch.to_string());
    }
    if sdxl {
        meta.insert("ss_base_model_version".into(), "sdxl_base_v1-0".into());
    }
    if let Some((r, a)) = mode(&dims) {
        meta.insert("ss_network_dim".into(), r.to_string());
        meta.insert("ss_network_alpha".into(), format!("{a:?}"));
    }
    Ok(write_safetensors(path, &tensors, &meta)?)
}
