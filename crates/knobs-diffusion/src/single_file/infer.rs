//! The diffusers configs of a single-file checkpoint, read from its tensor shapes alone (the
//! header, no data). Shapes fix the architecture except the attention head counts, which
//! follow each family's convention: SD-1.x has 8 heads per UNet attention and 64-channel CLIP
//! heads; SD-2.x has 64-channel heads everywhere, an OpenCLIP text encoder with GELU, and by
//! default v-prediction at 768 px, as diffusers assumes for a file without its training step;
//! SDXL has 64-channel heads, CLIP ViT-L beside an OpenCLIP bigG with projection, and the
//! UNet's `text_time` conditioning.
use std::collections::BTreeSet;

use knobs_nn::io::SafetensorsReader;
use knobs_nn::{Error, Result};
use serde_json::{Value, json};

use super::keys::{CLIP, OPEN_CLIP, SDXL_CLIP, SDXL_OPEN_CLIP, UNET, VAE};

/// The model family a file belongs to, by its text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD-1.x: transformers' CLIP ViT-L text encoder.
    Sd1,
    /// SD-2.x: OpenCLIP ViT-H text encoder.
    Sd2,
    /// SDXL base: CLIP ViT-L and OpenCLIP ViT-bigG (`conditioner.embedders.{0,1}`).
    Sdxl,
}

impl Family {
    pub fn of(file: &SafetensorsReader) -> Result<Self> {
        let has = |prefix: &str| file.keys().any(|k| k.starts_with(prefix));
        if has("conditioner.embedders.") {
            if !has(SDXL_CLIP) || !has(SDXL_OPEN_CLIP) {
                return Err(Error::file(file.path(), format!("an SDXL checkpoint without `{SDXL_CLIP}*` and `{SDXL_OPEN_CLIP}*` (an SDXL refiner?): only SDXL base layouts are supported")));
            }
            return Ok(Family::Sdxl);
        }
        if !has(UNET) || !has(VAE) {
            return Err(Error::file(
                file.path(),
                format!("not a Stable Diffusion single-file checkpoint: it needs `{UNET}*` (UNet) and `{VAE}*` (VAE) keys"),
            ));
        }
        if has(OPEN_CLIP) {
            Ok(Family::Sd2)
        } else if has(CLIP) {
            Ok(Family::Sd1)
        } else {
            Err(Error::file(file.path(), format!("no text encoder: needs `{CLIP}*` (SD-1.x) or `{OPEN_CLIP}*` (SD-2.x) keys")))
        }
    }

    /// The image size the family was trained at (SD-2.x: the 768 px v-model).
    pub fn image_size(self) -> usize {
        match self {
            Family::Sd1 => 512,
            Family::Sd2 => 768,
            Family::Sdxl => 1024,
        }
    }

    pub fn prediction_type(self) -> &'static str {
        match self {
            Family::Sd1 | Family::Sdxl => "epsilon",
            Family::Sd2 => "v_prediction",
        }
    }
}

/// Shapes by key, with errors that name the file and the key.
struct Shapes<'a>(&'a SafetensorsReader);

impl Shapes<'_> {
    fn get(&self, key: &str) -> Result<&[usize]> {
        self.0.shape(key).ok_or_else(|| Error::key(self.0.path(), key, "missing from the file"))
    }
    fn dim(&self, key: &str, i: usize) -> Result<usize> {
        let s = self.get(key)?;
        s.get(i).copied().ok_or_else(|| Error::key(self.0.path(), key, format!("has shape {s:?}, expected at least {} dims", i + 1)))
    }
    fn has(&self, key: &str) -> bool {
        self.0.shape(key).is_some()
    }
    /// The distinct integers `n` of keys `prefix<n>.…` followed by `then`.
    fn indices(&self, prefix: &str, then: &str) -> BTreeSet<usize> {
        self.0
            .keys()
            .filter_map(|k| k.strip_prefix(prefix)?.split_once('.').filter(|(_, rest)| rest.starts_with(then))?.0.parse().ok())
            .collect()
    }
    fn bad(&self, msg: String) -> Error {
        Error::file(self.0.path(), msg)
    }
}

/// `count` distinct indices must be exactly 0..count.
fn contiguous(set: &BTreeSet<usize>) -> bool {
    set.iter().copied().eq(0..set.len())
}

pub fn unet(file: &SafetensorsReader, family: Family, image_size: usize, vae_scale: usize) -> Result<Value> {
    let s = Shapes(file);
    let k = |rest: &str| format!("{UNET}{rest}");
    let conv_in = s.get(&k("input_blocks.0.0.weight"))?.to_vec();
    if conv_in.len() != 4 {
        return Err(Error::key(file.path(), k("input_blocks.0.0.weight"), format!("has shape {conv_in:?}, expected a conv weight")));
    }
    if s.has(&k("label_emb.0.0.weight")) != (family == Family::Sdxl) {
        return Err(s.bad("a class-conditioned UNet (`label_emb`) outside SDXL: not supported".into()));
    }
    let inputs = s.indices(&k("input_blocks."), "");
    let downsamplers = s.indices(&k("input_blocks."), "0.op.");
    let levels = downsamplers.len() + 1;
    let resnets = inputs.len().checked_sub(1 + downsamplers.len()).filter(|n| *n > 0 && n % levels == 0);
    let Some(resnets) = resnets.filter(|_| contiguous(&inputs)) else {
        return Err(s.bad(format!("UNet input blocks 0..{} with {} downsamplers fit no layout of equal blocks", inputs.len(), downsamplers.len())));
    };
    let layers = resnets / levels;
    let stride = layers + 1;
    let mut channels = Vec::new();
    let (mut down, mut up) = (Vec::new(), Vec::new());
    let mut first_attention = None;
    // Transformer blocks per level (1 where a level has no attention, as SDXL's config).
    let mut depth = Vec::new();
    for b in 0..levels {
        let first = b * stride + 1;
        channels.push(s.dim(&k(&format!("input_blocks.{first}.0.out_layers.3.weight")), 0)?);
        let attn = format!("input_blocks.{first}.1.");
        let has = s.has(&k(&format!("{attn}proj_in.weight")));
        depth.push(if has { s.indices(&k(&format!("{attn}transformer_blocks.")), "").len() } else { 1 });
        down.push(if has { "CrossAttnDownBlock2D" } else { "DownBlock2D" });
        if has && first_attention.is_none() {
            first_attention = Some(attn);
        }
        let up_has = s.has(&k(&format!("output_blocks.{}.1.proj_in.weight", b * stride)));
        up.push(if up_has { "CrossAttnUpBlock2D" } else { "UpBlock2D" });
    }
    if !s.has(&k("middle_block.1.proj_in.weight")) {
        return Err(s.bad("the UNet's middle block has no attention (`middle_block.1.proj_in.weight`): not supported".into()));
    }
    let attn = first_attention.unwrap_or_else(|| "middle_block.1.".into());
    let linear = s.get(&k(&format!("{attn}proj_in.weight")))?.len() == 2;
    let cross = s.dim(&k(&format!("{attn}transformer_blocks.0.attn2.to_k.weight")), 1)?;
    let transformer_layers = s.indices(&k(&format!("{attn}transformer_blocks.")), "").len();
    let heads: Value = match family {
        Family::Sd1 => json!(8),
        Family::Sd2 | Family::Sdxl => {
            if let Some(c) = channels.iter().find(|c| *c % 64 != 0) {
                return Err(s.bad(format!("UNet block width {c} is no multiple of SD-2.x's 64-channel heads; give the configs with --config DIR")));
            }
            json!(channels.iter().map(|c| c / 64).collect::<Vec<_>>())
        }
    };
    let mut config = json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": image_size / vae_scale,
        "in_channels": conv_in[1],
        "out_channels": s.dim(&k("out.2.weight"), 0)?,
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": s.dim(&k("out.2.weight"), 2)?,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": cross,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "upcast_attention": family == Family::Sd2,
        "transformer_layers_per_block": transformer_layers,
    });
    if family == Family::Sdxl {
        // label_emb.0.0 takes the pooled text embedding and 6 sinusoidal time ids.
        let input = s.dim(&k("label_emb.0.0.weight"), 1)?;
        let pooled = s.dim(&format!("{SDXL_OPEN_CLIP}text_projection"), 1)?;
        let per_id = input.checked_sub(pooled).filter(|n| n % 6 == 0 && *n > 0).ok_or_else(|| {
            s.bad(format!("label_emb takes {input} values, which is not the pooled {pooled} + 6 time ids of SDXL base (a refiner has 5)"))
        })? / 6;
        config["transformer_layers_per_block"] = json!(depth);
        config["addition_embed_type"] = json!("text_time");
        config["addition_time_embed_dim"] = json!(per_id);
        config["projection_class_embeddings_input_dim"] = json!(input);
    }
    Ok(config)
}

pub fn vae(file: &SafetensorsReader, image_size: usize) -> Result<Value> {
    let s = Shapes(file);
    let k = |rest: &str| format!("{VAE}{rest}");
    let levels = s.indices(&k("encoder.down."), "block.0.");
    let layers = s.indices(&k("encoder.down.0.block."), "");
    if levels.is_empty() || !contiguous(&levels) || layers.is_empty() || !contiguous(&layers) {
        return Err(s.bad(format!("the VAE's encoder blocks (`{VAE}encoder.down.N.block.M`) are missing or not numbered 0..n")));
    }
    let last = layers.len() - 1;
    let channels = (0..levels.len())
        .map(|i| s.dim(&k(&format!("encoder.down.{i}.block.{last}.conv2.weight")), 0))
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "sample_size": image_size,
        "in_channels": s.dim(&k("encoder.conv_in.weight"), 1)?,
        "out_channels": s.dim(&k("decoder.conv_out.weight"), 0)?,
        "latent_channels": s.dim(&k("post_quant_conv.weight"), 0)?,
        "block_out_channels": channels,
        "layers_per_block": layers.len(),
        "down_block_types": vec!["DownEncoderBlock2D"; levels.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; levels.len()],
        "scaling_factor": 0.18215,
    }))
}

/// The prefix under which an SD-1.x file keeps `text_model.…` (older files lack `text_model.`).
pub fn clip_prefix(file: &SafetensorsReader) -> &'static str {
    if file.shape(&format!("{CLIP}text_model.embeddings.token_embedding.weight")).is_some() { "" } else { "text_model." }
}

/// How many of an OpenCLIP tower's blocks the diffusers text encoder keeps: SD-2.x reads the
/// penultimate layer, so diffusers' config drops the 24th block of ViT-H (and only that one).
pub fn open_clip_layers(file: &SafetensorsReader) -> usize {
    let n = Shapes(file).indices(&format!("{OPEN_CLIP}transformer.resblocks."), "").len();
    if n == 24 { 23 } else { n }
}

pub fn text_encoder(file: &SafetensorsReader, family: Family) -> Result<Value> {
    let s = Shapes(file);
    let clip = |p: String| {
        let layers = s.indices(&format!("{p}encoder.layers."), "").len();
        (format!("{p}embeddings.token_embedding.weight"), format!("{p}embeddings.position_embedding.weight"), format!("{p}encoder.layers.0.mlp.fc1.weight"), layers, "quick_gelu")
    };
    let (token, position, fc1, layers, act) = match family {
        Family::Sd1 => clip(format!("{CLIP}{}", if clip_prefix(file).is_empty() { "text_model." } else { "" })),
        Family::Sdxl => clip(format!("{SDXL_CLIP}text_model.")),
        Family::Sd2 => {
            let fc1 = format!("{OPEN_CLIP}transformer.resblocks.0.mlp.c_fc.weight");
            (format!("{OPEN_CLIP}token_embedding.weight"), format!("{OPEN_CLIP}positional_embedding"), fc1, open_clip_layers(file), "gelu")
        }
    };
    let mut config = clip_config(&s, &token, &position, &fc1, layers, act)?;
    if family == Family::Sdxl {
        legacy_token_ids(&mut config);
    }
    Ok(config)
}

/// SDXL's second text encoder: every block of the OpenCLIP bigG tower (SDXL reads its
/// penultimate layer itself) and its projection.
pub fn text_encoder_2(file: &SafetensorsReader) -> Result<Value> {
    let s = Shapes(file);
    let p = SDXL_OPEN_CLIP;
    let layers = s.indices(&format!("{p}transformer.resblocks."), "").len();
    let fc1 = format!("{p}transformer.resblocks.0.mlp.c_fc.weight");
    let mut config = clip_config(&s, &format!("{p}token_embedding.weight"), &format!("{p}positional_embedding"), &fc1, layers, "gelu")?;
    config["architectures"] = json!(["CLIPTextModelWithProjection"]);
    config["projection_dim"] = json!(s.dim(&format!("{p}text_projection"), 1)?);
    legacy_token_ids(&mut config);
    Ok(config)
}

/// SDXL's text-encoder configs carry CLIP's legacy token ids (eos 2): pooling then takes the
/// highest id, as transformers does for them.
fn legacy_token_ids(config: &mut Value) {
    config["bos_token_id"] = json!(0);
    config["eos_token_id"] = json!(2);
}

fn clip_config(s: &Shapes<'_>, token: &str, position: &str, fc1: &str, layers: usize, act: &str) -> Result<Value> {
    let (vocab, hidden) = (s.dim(token, 0)?, s.dim(token, 1)?);
    if hidden % 64 != 0 || vocab < 2 {
        return Err(Error::key(s.0.path(), token, format!("width {hidden} is no multiple of CLIP's 64-channel heads; give the configs with --config DIR")));
    }
    Ok(json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": s.dim(fc1, 0)?,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden / 64,
        "max_position_embeddings": s.dim(position, 0)?,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 1,
    }))
}

/// SDXL base's scheduler (its `scheduler_config.json`).
pub fn sdxl_scheduler() -> Value {
    json!({
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "interpolation_type": "linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "use_karras_sigmas": false,
    })
}

/// The scheduler SD-1.x and SD-2.x were trained with, as DDIM settings.
pub fn scheduler(prediction_type: &str) -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": prediction_type,
    })
}
