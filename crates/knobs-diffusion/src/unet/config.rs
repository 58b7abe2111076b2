//! `unet/config.json` of a diffusers `UNet2DConditionModel`, resolved into per-block plans.
//! Fields this port does not implement must keep their diffusers default; anything else is
//! refused with the key and the supported values, so an unusual checkpoint never runs wrong.
use std::path::Path;

use knobs_nn::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

/// A value diffusers accepts either once for all blocks or per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// One value per block; a list must have exactly `n` entries.
    fn expand(&self, key: &str, n: usize) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(Error::param(key, format!("has {} entries, the model has {n} blocks", v.len()))),
        }
    }
}

pub const DOWN_BLOCK_TYPES: [&str; 2] = ["CrossAttnDownBlock2D", "DownBlock2D"];
pub const UP_BLOCK_TYPES: [&str; 2] = ["CrossAttnUpBlock2D", "UpBlock2D"];
pub const MID_BLOCK_TYPES: [&str; 1] = ["UNetMidBlock2DCrossAttn"];

/// A `null` flag is off, as diffusers reads it (SDXL's config has `upcast_attention: null`).
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

fn d_in() -> usize { 4 }
fn d_flip() -> bool { true }
fn d_down() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn d_mid() -> Option<String> { Some("UNetMidBlock2DCrossAttn".into()) }
fn d_up() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}
fn d_channels() -> Vec<usize> { vec![320, 640, 1280, 1280] }
fn d_layers() -> PerBlock<usize> { PerBlock::One(2) }
fn d_one() -> usize { 1 }
fn d_one_f() -> f64 { 1.0 }
fn d_three() -> usize { 3 }
fn d_act() -> String { "silu".into() }
fn d_groups() -> Option<usize> { Some(32) }
fn d_eps() -> f64 { 1e-5 }
fn d_cross() -> PerBlock<usize> { PerBlock::One(1280) }
fn d_tlayers() -> Value { Value::from(1) }
fn d_heads() -> PerBlock<usize> { PerBlock::One(8) }
fn d_default() -> String { "default".into() }
fn d_positional() -> String { "positional".into() }
fn d_false_value() -> Value { Value::Bool(false) }

/// The `config.json` fields of `UNet2DConditionModel`, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_in")]
    pub in_channels: usize,
    #[serde(default = "d_in")]
    pub out_channels: usize,
    #[serde(default, deserialize_with = "null_is_false")]
    pub center_input_sample: bool,
    #[serde(default = "d_flip")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_value")]
    pub only_cross_attention: Value,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    /// An int or a per-block list of ints (per-layer nested lists are not supported).
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: Value,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    /// For this class, the number of heads when `num_attention_heads` is null (a naming
    /// mistake diffusers keeps for compatibility).
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock<usize>,
    /// The true head count; diffusers' `UNet2DConditionModel` refuses it, we take it as given.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub dual_cross_attention: bool,
    #[serde(default, deserialize_with = "null_is_false")]
    pub use_linear_projection: bool,
    /// Attention always runs in f32 here, so upcasting changes nothing.
    #[serde(default, deserialize_with = "null_is_false")]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default, deserialize_with = "null_is_false")]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
    #[serde(default = "d_default")]
    pub attention_type: String,
    // Conditioning extras of SDXL / Kandinsky / class-conditional models: must be null.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// `"text_time"` (SDXL): the pooled text embedding and the size / crop time ids add to
    /// the time embedding; null otherwise.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Sinusoidal features per time id (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Width of `add_embedding`'s input: pooled text width + time ids x `addition_time_embed_dim`.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
}

/// The settings of one down block (index `i` from the top) after resolving the config.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockPlan {
    pub cross_attn: bool,
    pub channels: usize,
    pub layers: usize,
    pub heads: usize,
    pub cross_attention_dim: usize,
    pub transformer_layers: usize,
}

fn must<T: PartialEq + std::fmt::Debug>(key: &str, got: &T, want: T) -> Result<()> {
    if *got == want { Ok(()) } else { Err(Error::param(key, format!("{got:?} is not supported (only {want:?})"))) }
}

impl UNetConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| Error::Invalid(format!("invalid UNet config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn num_blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// `block_out_channels[0] * 4` unless `time_embedding_dim` says otherwise.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }

    pub fn groups(&self) -> usize {
        self.norm_num_groups.unwrap_or(32)
    }

    fn transformer_layers(&self, n: usize) -> Result<Vec<usize>> {
        let key = "transformer_layers_per_block";
        let per: PerBlock<usize> = serde_json::from_value(self.transformer_layers_per_block.clone())
            .map_err(|_| Error::param(key, "must be an int or a list of ints, one per block (per-layer lists are not supported)"))?;
        per.expand(key, n)
    }

    /// Plans of the down blocks, top (highest resolution) first.
    pub fn down_plans(&self) -> Result<Vec<BlockPlan>> {
        let n = self.num_blocks();
        let layers = self.layers_per_block.expand("layers_per_block", n)?;
        let cross = self.cross_attention_dim.expand("cross_attention_dim", n)?;
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand("num_attention_heads", n)?,
            None => self.attention_head_dim.expand("attention_head_dim", n)?,
        };
        let tl = self.transformer_layers(n)?;
        Ok((0..n)
            .map(|i| BlockPlan {
                cross_attn: self.down_block_types[i] == "CrossAttnDownBlock2D",
                channels: self.block_out_channels[i],
                layers: layers[i],
                heads: heads[i],
                cross_attention_dim: cross[i],
                transformer_layers: tl[i],
            })
            .collect())
    }

    /// Plans of the up blocks, bottom first: the per-block lists reversed, as diffusers does,
    /// with one more resnet than the matching down block (it also takes the downsampler's skip).
    pub fn up_plans(&self) -> Result<Vec<BlockPlan>> {
        let n = self.num_blocks();
        let mut plans = self.down_plans()?;
        plans.reverse();
        let reverse_tl = match &self.reverse_transformer_layers_per_block {
            Some(v) => PerBlock::Many(v.clone()).expand("reverse_transformer_layers_per_block", n)?,
            None => plans.iter().map(|p| p.transformer_layers).collect(),
        };
        for (i, p) in plans.iter_mut().enumerate() {
            p.cross_attn = self.up_block_types[i] == "CrossAttnUpBlock2D";
            p.layers += 1;
            p.transformer_layers = reverse_tl[i];
        }
        Ok(plans)
    }

    /// Refuses configurations this port would silently run wrong.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_blocks();
        if n == 0 {
            return Err(Error::param("block_out_channels", "must not be empty"));
        }
        for (key, len) in [("down_block_types", self.down_block_types.len()), ("up_block_types", self.up_block_types.len())] {
            if len != n {
                return Err(Error::param(key, format!("has {len} entries, block_out_channels has {n}")));
            }
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if !DOWN_BLOCK_TYPES.contains(&t.as_str()) {
                return Err(Error::param(format!("down_block_types[{i}]"), format!("{t:?} is not supported (supported: {DOWN_BLOCK_TYPES:?})")));
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if !UP_BLOCK_TYPES.contains(&t.as_str()) {
                return Err(Error::param(format!("up_block_types[{i}]"), format!("{t:?} is not supported (supported: {UP_BLOCK_TYPES:?})")));
            }
        }
        if let Some(t) = &self.mid_block_type
            && !MID_BLOCK_TYPES.contains(&t.as_str())
        {
            return Err(Error::param("mid_block_type", format!("{t:?} is not supported (supported: {MID_BLOCK_TYPES:?} or null)")));
        }
        must("act_fn", &self.act_fn.as_str(), "silu")?;
        must("time_embedding_type", &self.time_embedding_type.as_str(), "positional")?;
        must("resnet_time_scale_shift", &self.resnet_time_scale_shift.as_str(), "default")?;
        must("attention_type", &self.attention_type.as_str(), "default")?;
        must("dual_cross_attention", &self.dual_cross_attention, false)?;
        must("resnet_skip_time_act", &self.resnet_skip_time_act, false)?;
        must("dropout", &self.dropout, 0.0)?;
        let only_cross_ok = match &self.only_cross_attention {
            Value::Bool(b) => !b,
            Value::Array(v) => v.iter().all(|b| b == &Value::Bool(false)),
            _ => false,
        };
        if !only_cross_ok {
            return Err(Error::param("only_cross_attention", format!("{} is not supported (only false)", self.only_cross_attention)));
        }
        must("mid_block_only_cross_attention", &self.mid_block_only_cross_attention.unwrap_or(false), false)?;
        for (key, v) in [
            ("class_embed_type", &self.class_embed_type),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
            ("time_embedding_act_fn", &self.time_embedding_act_fn),
            ("timestep_post_act", &self.timestep_post_act),
            ("cross_attention_norm", &self.cross_attention_norm),
        ] {
            must(key, v, None)?;
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") if self.addition_time_embed_dim.is_none() || self.projection_class_embeddings_input_dim.is_none() => {
                return Err(Error::param("addition_embed_type", "\"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim"));
            }
            Some("text_time") => {}
            Some(other) => return Err(Error::param("addition_embed_type", format!("{other:?} is not supported (only \"text_time\" or null)"))),
        }
        for (key, v) in [("num_class_embeds", self.num_class_embeds), ("encoder_hid_dim", self.encoder_hid_dim), ("time_cond_proj_dim", self.time_cond_proj_dim)] {
            must(key, &v, None)?;
        }
        if self.norm_num_groups.is_none() {
            return Err(Error::param("norm_num_groups", "null is not supported (group norm is required)"));
        }
        for (key, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            if k % 2 == 0 {
                return Err(Error::param(key, format!("{k} is not supported (odd kernels only)")));
            }
        }
        if self.downsample_padding > 1 {
            return Err(Error::param("downsample_padding", format!("{} is not supported (0 or 1)", self.downsample_padding)));
        }
        let groups = self.groups();
        use crate::limits::{BLOCKS, CHANNELS, HEADS, LAYERS, SAMPLE_SIZE, at_most};
        at_most("block_out_channels", self.num_blocks(), BLOCKS)?;
        for (key, v) in [("in_channels", self.in_channels), ("out_channels", self.out_channels), ("sample_size", self.sample_size.unwrap_or(0))] {
            at_most(key, v, SAMPLE_SIZE)?;
        }
        for (key, v) in [("addition_time_embed_dim", self.addition_time_embed_dim), ("projection_class_embeddings_input_dim", self.projection_class_embeddings_input_dim)] {
            at_most(key, v.unwrap_or(0), CHANNELS)?;
        }
        for (key, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            at_most(key, k, 15)?;
        }
        if let Some(v) = &self.reverse_transformer_layers_per_block {
            v.iter().try_for_each(|&l| at_most("reverse_transformer_layers_per_block", l, LAYERS))?;
        }
        if groups == 0 {
            return Err(Error::param("norm_num_groups", "must be positive"));
        }
        for (i, p) in self.down_plans()?.iter().enumerate() {
            at_most("block_out_channels", p.channels, CHANNELS)?;
            at_most("layers_per_block", p.layers, LAYERS)?;
            at_most("transformer_layers_per_block", p.transformer_layers, LAYERS)?;
            at_most("attention_head_dim", p.heads, HEADS)?;
            at_most("cross_attention_dim", p.cross_attention_dim, CHANNELS)?;
            if p.channels % groups != 0 {
                return Err(Error::param("block_out_channels", format!("block {i}: {} channels do not split into {groups} groups", p.channels)));
            }
            if p.cross_attn && (p.heads == 0 || p.channels < p.heads) {
                return Err(Error::param("attention_head_dim", format!("block {i}: {} heads do not fit {} channels", p.heads, p.channels)));
            }
            if p.layers == 0 {
                return Err(Error::param("layers_per_block", "must be at least 1"));
            }
        }
        self.up_plans()?;
        Ok(())
    }
}
