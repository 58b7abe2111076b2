//! `vae/config.json` of an `AutoencoderKL`, checked so that a layout we do not build is refused
//! with the key at fault instead of failing later on a missing weight.
use std::path::Path;

use knobs_nn::{Error, Result};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub norm_num_groups: usize,
    pub act_fn: String,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub mid_block_add_attention: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

/// diffusers' `AutoencoderKL` defaults.
impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![64],
            layers_per_block: 1,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            norm_num_groups: 32,
            act_fn: "silu".into(),
            scaling_factor: 0.18215,
            shift_factor: None,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }
}

impl VaeConfig {
    pub fn from_json_str(text: &str) -> Result<Self> {
        let c: VaeConfig = serde_json::from_str(text).map_err(|e| Error::Invalid(format!("VAE config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let c: VaeConfig = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        c.validate().map_err(|e| e.in_file(path))?;
        Ok(c)
    }

    /// Everything the model builder relies on; errors name the config key.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::param("block_out_channels", "must not be empty"));
        }
        for (key, types, want) in [
            ("down_block_types", &self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(Error::param(key, format!("has {} entries but block_out_channels has {n}", types.len())));
            }
            if let Some(bad) = types.iter().find(|t| *t != want) {
                return Err(Error::param(key, format!("unsupported block type `{bad}`; supported: {want}")));
            }
        }
        if self.layers_per_block == 0 {
            return Err(Error::param("layers_per_block", "must be at least 1"));
        }
        use crate::limits::{BLOCKS, CHANNELS, LAYERS, SAMPLE_SIZE, at_most};
        at_most("block_out_channels", n, BLOCKS)?;
        at_most("layers_per_block", self.layers_per_block, LAYERS)?;
        for &c in &self.block_out_channels {
            at_most("block_out_channels", c, CHANNELS)?;
        }
        for (key, v) in [("in_channels", self.in_channels), ("out_channels", self.out_channels), ("latent_channels", self.latent_channels)] {
            at_most(key, v, SAMPLE_SIZE)?;
        }
        if self.act_fn != "silu" {
            return Err(Error::param("act_fn", format!("unsupported value `{}`; supported: silu", self.act_fn)));
        }
        let g = self.norm_num_groups;
        if g == 0 {
            return Err(Error::param("norm_num_groups", "must be positive"));
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c == 0 || c % g != 0) {
            return Err(Error::param(
                "block_out_channels",
                format!("{c} channels cannot be split into norm_num_groups = {g} groups"),
            ));
        }
        for (key, v) in [("in_channels", self.in_channels), ("out_channels", self.out_channels), ("latent_channels", self.latent_channels)] {
            if v == 0 {
                return Err(Error::param(key, "must be positive"));
            }
        }
        Ok(())
    }

    /// How many times the image side is larger than the latent side.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
