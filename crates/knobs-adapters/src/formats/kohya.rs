//! kohya-ss (sd-scripts) LoRA / LoCon keys: `lora_unet_<module path with _ for .>.lora_down.weight`,
//! `.lora_up.weight` and a scalar `.alpha` per module. Dots become underscores, so a name
//! is turned back into a module path only against the layers of the model it is loaded into.
use std::collections::HashMap;

use knobs_nn::{LayerRef, Module, ModuleExt};

use super::lora_files::Part;

/// kohya's name prefixes and the diffusers components they stand for. SDXL files call the
/// first text encoder `te1`.
const PREFIXES: &[(&str, &str)] =
    &[("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder")];

/// LyCORIS algorithms whose tensors are not a plain down/up pair.
const UNSUPPORTED: &[(&str, &str)] = &[
    (".lora_mid.weight", "LoCon with a Tucker mid tensor"),
    (".hada_", "LoHa"),
    (".lokr_", "LoKr"),
    (".oft_", "OFT"),
    (".dora_scale", "DoRA"),
    (".diff", "full weight differences"),
];

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

/// The kohya prefix for a component, without the trailing `_`.
pub fn prefix_for(component: &str) -> Option<&'static str> {
    match component {
        "unet" => Some("lora_unet"),
        "text_encoder" => Some("lora_te"),
        "text_encoder_2" => Some("lora_te2"),
        _ => None,
    }
}

/// kohya's name of a module path.
pub fn name_of(path: &str) -> String {
    path.replace('.', "_")
}

/// Underscore name -> module path for every adaptable layer of `model`. Two paths that
/// collapse to one name are ambiguous and map to `Err` with both paths.
pub fn layer_names<M: Module + ?Sized>(model: &M) -> HashMap<String, Result<String, (String, String)>> {
    let mut out: HashMap<String, Result<String, (String, String)>> = HashMap::new();
    model.for_each_layer(|path, _: LayerRef<'_>| {
        let name = name_of(path);
        let entry = match out.remove(&name) {
            None => Ok(path.to_string()),
            Some(Ok(other)) | Some(Err((other, _))) => Err((other, path.to_string())),
        };
        out.insert(name, entry);
    });
    out
}
