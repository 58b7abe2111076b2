//! `text_encoder/config.json`, as transformers' `CLIPTextConfig` writes it. Defaults are
//! transformers' own, so a config that omits a field means what it means there.
use std::path::Path;

use knobs_nn::{Error, Result};
use serde::Deserialize;

/// The MLP nonlinearity. CLIP ViT-L/14 (SD-1.x) uses `quick_gelu`, OpenCLIP ViT-H (SD-2.x) `gelu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// The exact (erf) GELU, as transformers' `"gelu"`.
    Gelu,
}

impl Activation {
    pub const SUPPORTED: &'static str = "`quick_gelu`, `gelu`";

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "d::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "d::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "d::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "d::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "d::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d::pad_token_id")]
    pub pad_token_id: i64,
    #[serde(default = "d::bos_token_id")]
    pub bos_token_id: i64,
    #[serde(default = "d::eos_token_id")]
    pub eos_token_id: i64,
    /// `["CLIPTextModelWithProjection"]` (SDXL's second encoder) adds `text_projection`.
    #[serde(default)]
    pub architectures: Vec<String>,
}

mod d {
    pub fn vocab_size() -> usize { 49408 }
    pub fn hidden_size() -> usize { 512 }
    pub fn intermediate_size() -> usize { 2048 }
    pub fn num_hidden_layers() -> usize { 12 }
    pub fn num_attention_heads() -> usize { 8 }
    pub fn max_position_embeddings() -> usize { 77 }
    pub fn hidden_act() -> String { "quick_gelu".into() }
    pub fn layer_norm_eps() -> f64 { 1e-5 }
    pub fn pad_token_id() -> i64 { 1 }
    pub fn bos_token_id() -> i64 { 49406 }
    pub fn eos_token_id() -> i64 { 49407 }
}

impl ClipTextConfig {
    /// The width of `text_projection` when the config is a `CLIPTextModelWithProjection`.
    pub fn with_projection(&self) -> Option<usize> {
        self.architectures.iter().any(|a| a == "CLIPTextModelWithProjection").then_some(self.projection_dim.unwrap_or(512))
    }

    /// Reads and checks a `config.json`; every error names the file (and the key when one is at fault).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and checks config JSON; errors name the key but no file.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| Error::Invalid(format!("not a valid CLIPTextConfig: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(Error::param(key, "must be positive"));
            }
        }
        use crate::limits::{CHANNELS, HEADS, LAYERS, POSITIONS, VOCAB, at_most};
        for (key, v, max) in [
            ("vocab_size", self.vocab_size, VOCAB),
            ("hidden_size", self.hidden_size, CHANNELS),
            ("intermediate_size", self.intermediate_size, 4 * CHANNELS),
            ("num_attention_heads", self.num_attention_heads, HEADS),
            ("max_position_embeddings", self.max_position_embeddings, POSITIONS),
            ("num_hidden_layers", self.num_hidden_layers, LAYERS),
            ("projection_dim", self.projection_dim.unwrap_or(0), CHANNELS),
        ] {
            at_most(key, v, max)?;
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::param(
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(Error::param("layer_norm_eps", "must be positive"));
        }
        self.activation().map(|_| ())
    }

    pub fn activation(&self) -> Result<Activation> {
        Activation::parse(&self.hidden_act).ok_or_else(|| {
            Error::param("hidden_act", format!("`{}` is not supported (supported: {})", self.hidden_act, Activation::SUPPORTED))
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// transformers' pooling rule: checkpoints from before the eos id was fixed in the
    /// config carry `eos_token_id == 2` and pool at the highest id (the real eos, 49407).
    pub fn legacy_pooling(&self) -> bool {
        self.eos_token_id == 2
    }
}
