//! diffusers' LoRA file keys (`pytorch_lora_weights.safetensors`): `<component>.<module>.<part>`
//! where the part is spelled in one of the styles diffusers has written over the years.
//! Reading accepts them all; writing follows `convert_state_dict_to_diffusers`.
use super::lora_files::Part;

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
