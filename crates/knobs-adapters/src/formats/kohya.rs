//! kohya-ss (sd-scripts) LoRA / LoCon keys: `lora_unet_<module path with _ for .>.lora_down.weight`,
//! `.lora_up.weight` and a scalar `.alpha` per module. Dots become underscores, so a name
//! is turned back into a module path only against the layers of the model it is loaded into.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, write_safetensors};
use knobs_nn::{Error, LayerRef, Module, ModuleExt};
use serde_json::json;

use super::lora_files::{Collected, ComponentLora, Part, check_savable, mode};
use crate::Result;

/// kohya's name prefixes and the diffusers components they stand for. SDXL files call the
/// first text encoder `te1`.
const PREFIXES: &[(&str, &str)] =
    &[("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder")];

/// LyCORIS algorithms whose tensors are not a plain down/up pair.
/// (LoHa, LoKr, DoRA and diag-OFT files are read by `formats::lycoris`.)
const UNSUPPORTED: &[(&str, &str)] = &[
    (".lora_mid.weight", "LoCon with a Tucker mid tensor"),
    (".hada_", "LoHa"),
    (".lokr_", "LoKr"),
    (".oft_", "OFT"),
    (".dora_scale", "DoRA"),
    (".diff", "full weight differences"),
];

/// The component a kohya key belongs to and the rest of the key after its prefix.
pub fn split_prefix(key: &str) -> Option<(&'static str, &str)> {
    PREFIXES.iter().find(|(p, _)| key.starts_with(p)).map(|(p, c)| (*c, &key[p.len()..]))
}

/// Whether a key looks like kohya's.
pub fn is_kohya(key: &str) -> bool {
    PREFIXES.iter().any(|(p, _)| key.starts_with(p))
}

/// Splits a kohya key into (component, underscore name, part). `Err` explains a key that
/// is kohya's but not a plain LoRA tensor; `Ok(None)` is a key kohya does not write.
pub fn parse(key: &str) -> Result<Option<(&'static str, String, Part)>, String> {
    let Some((prefix, component)) = PREFIXES.iter().find(|(p, _)| key.starts_with(p)) else {
        return Ok(None);
    };
    if let Some((_, what)) = UNSUPPORTED.iter().find(|(s, _)| key.contains(s)) {
        return Err(format!("{what} (LyCORIS) tensors are not supported; only LoRA / LoCon down-up pairs are"));
    }
    let rest = &key[prefix.len()..];
    let parsed = [(".lora_down.weight", Part::Down), (".lora_up.weight", Part::Up), (".alpha", Part::Alpha)]
        .into_iter()
        .find_map(|(end, part)| rest.strip_suffix(end).filter(|n| !n.is_empty() && !n.contains('.')).map(|n| (n.to_string(), part)));
    Ok(parsed.map(|(name, part)| (*component, name, part)))
}

/// The kohya prefix for a component, without the trailing `_`; SDXL files (with two text
/// encoders) call the first one `te1`.
pub fn prefix_for(component: &str, sdxl: bool) -> Option<&'static str> {
    match component {
        "unet" => Some("lora_unet"),
        "text_encoder" if sdxl => Some("lora_te1"),
        "text_encoder" => Some("lora_te"),
        "text_encoder_2" => Some("lora_te2"),
        _ => None,
    }
}

/// `modelspec.architecture` of SDXL base LoRAs (sd-scripts' value).
pub const SDXL_ARCHITECTURE: &str = "stable-diffusion-xl-v1-base/lora";

/// kohya's name of a module path.
pub fn name_of(path: &str) -> String {
    path.replace('.', "_")
}

/// kohya names -> module paths for every adaptable layer of a model: each layer's own path
/// with `_` for `.`, plus aliases a loader adds for another naming of the same layers (SDXL
/// files name UNet blocks as the original SGM code does). Two layers that collapse to one
/// name are ambiguous, kept as both paths.
#[derive(Debug, Clone, Default)]
pub struct KohyaNames(HashMap<String, Result<String, (String, String)>>);

impl KohyaNames {
    pub fn of<M: Module + ?Sized>(model: &M) -> Self {
        let mut names = KohyaNames::default();
        model.for_each_layer(|path, _: LayerRef<'_>| names.insert(path, path));
        names
    }

    /// Also resolves `alias` (a dotted path in another naming) to layer `path`.
    pub fn alias(&mut self, path: &str, alias: &str) {
        self.insert(alias, path);
    }

    fn insert(&mut self, spelled: &str, path: &str) {
        let name = name_of(spelled);
        let entry = match self.0.remove(&name) {
            None => Ok(path.to_string()),
            Some(Ok(other)) if other == path => Ok(other),
            Some(Ok(other)) | Some(Err((other, _))) => Err((other, path.to_string())),
        };
        self.0.insert(name, entry);
    }

    /// The layer path of kohya name `name`, or why there is none.
    pub fn resolve(&self, name: &str) -> Result<String, String> {
        match self.0.get(name) {
            Some(Ok(p)) => Ok(p.clone()),
            Some(Err((a, b))) => Err(format!("ambiguous: layers `{a}` and `{b}` both have the kohya name `{name}`")),
            None => Err(format!("no layer of the model has the kohya name `{name}`")),
        }
    }
}

/// Reads the tensors of a kohya file. Module names stay underscore-joined (see
/// [`ComponentLora::kohya_names`]); a module without `.alpha` has alpha = rank, as sd-scripts.
pub fn read(sd: &StateDict) -> Result<BTreeMap<String, ComponentLora>> {
    let mut found = Collected::default();
    for (key, data) in &sd.tensors {
        let (component, name, part) = parse(key).map_err(|msg| Error::key(&sd.file, key, msg))?.ok_or_else(|| {
            Error::key(&sd.file, key, "not a kohya LoRA key: expected lora_unet_<name> / lora_te_<name> then .lora_down.weight, .lora_up.weight or .alpha")
        })?;
        found.add(&sd.file, component, name, part, false, key, data)?;
    }
    found.build(&sd.file, &HashMap::new(), true)
}

/// Writes a kohya-ss LoRA / LoCon file: `lora_unet_<name>.lora_down.weight`, `.lora_up.weight`,
/// `.alpha` (= scale x rank, so the scale is exact) and sd-scripts' `ss_*` / `modelspec.*`
/// metadata. `architecture` fills `modelspec.architecture` (e.g. `stable-diffusion-v1/lora`);
/// with [`SDXL_ARCHITECTURE`] the text encoders are `te1` / `te2`, as sd-scripts writes SDXL.
pub fn save(path: impl AsRef<Path>, components: &[(&str, &ComponentLora)], architecture: Option<&str>) -> Result<()> {
    let path = path.as_ref();
    let sdxl = architecture == Some(SDXL_ARCHITECTURE);
    let mut tensors = BTreeMap::new();
    let (mut linear, mut conv) = (Vec::new(), Vec::new());
    for (prefix, lora) in components {
        check_savable(path, prefix, lora)?;
        let kp = prefix_for(prefix, sdxl)
            .ok_or_else(|| Error::file(path, format!("kohya files have no prefix for component `{prefix}`; known: unet, text_encoder, text_encoder_2")))?;
        for m in lora.modules() {
            if m.embedding {
                return Err(Error::key(path, format!("{prefix}.{}", m.path), "kohya files cannot hold an embedding LoRA").into());
            }
            let name = format!("{kp}_{}", name_of(&m.path));
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
    if let Some((r, a)) = mode(main) {
        meta.insert("ss_network_dim".into(), r.to_string());
        meta.insert("ss_network_alpha".into(), format!("{a:?}"));
    }
    if let (false, Some((r, a))) = (linear.is_empty(), mode(&conv)) {
        meta.insert("ss_network_args".into(), json!({"conv_dim": r.to_string(), "conv_alpha": format!("{a:?}")}).to_string());
    }
    if sdxl {
        meta.insert("ss_base_model_version".into(), "sdxl_base_v1-0".into());
    }
    meta.insert("modelspec.sai_model_spec".into(), "1.0.0".into());
    if let Some(arch) = architecture {
        meta.insert("modelspec.architecture".into(), arch.to_string());
    }
    Ok(write_safetensors(path, &tensors, &meta)?)
}
