//! The built-in base model's architecture: SD-1.x's components (CLIP text encoder, UNet,
//! AutoencoderKL) sized for a laptop CPU. 32x32 RGB images become 16x16x4 latents; the UNet's
//! first level is convolution only and attention runs at 8x8 and 4x4, where it is cheap.
//!
//! Why 16x16x4 rather than 8x8 (RECIPE.md): an 8x8 latent VAE caps the judge's shape accuracy
//! after an encode/decode round trip at 0.88, below the 0.9 bar, however long the UNet trains;
//! the two-level VAE's round trip reaches 0.97.
use serde_json::{Value, json};

pub const IMAGE_SIZE: usize = 32;
/// One VAE downsampling (two levels in `block_out_channels`): 32 -> 16.
pub const LATENT_SIZE: usize = 16;
pub const LATENT_CHANNELS: usize = 4;
/// Longest caption of the world is 13 words; room for placeholder tokens on top.
pub const MAX_TOKENS: usize = 24;

pub fn vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": LATENT_CHANNELS,
        "layers_per_block": 1,
        "mid_block_add_attention": false,
        "norm_num_groups": 4,
        "sample_size": IMAGE_SIZE,
        "scaling_factor": 1.0,
        "force_upcast": false,
        "use_quant_conv": true,
        "use_post_quant_conv": true
    })
}

pub fn text_encoder_config(vocab_size: usize, bos: u32, eos: u32) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "hidden_act": "quick_gelu",
        "hidden_size": 64,
        "intermediate_size": 256,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": MAX_TOKENS,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "projection_dim": 64,
        "vocab_size": vocab_size,
        "dtype": "float32"
    })
}

pub fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": [32, 64, 96],
        "center_input_sample": false,
        "cross_attention_dim": 64,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "layers_per_block": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 16,
        "sample_size": LATENT_SIZE,
        "transformer_layers_per_block": 1,
        "use_linear_projection": false
    })
}

/// DDPM training schedule as SD-1.x ships it.
pub fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.42.1",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped models/knobs-base is what this recipe makes: every key the recipe sets has
    /// the shipped config's value (the VAE's scaling factor is measured after training, the text
    /// encoder's token ids depend on the tokenizer).
    #[test]
    fn the_shipped_base_model_has_the_recipes_architecture() {
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/knobs-base");
        let te = text_encoder_config(0, 0, 0);
        for (file, recipe, skip) in [
            ("unet/config.json", unet_config(), &[][..]),
            ("vae/config.json", vae_config(), &["scaling_factor"][..]),
            ("scheduler/scheduler_config.json", scheduler_config(), &[][..]),
            ("text_encoder/config.json", te, &["vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"][..]),
        ] {
            let text = std::fs::read_to_string(format!("{shipped}/{file}")).unwrap();
            let shipped: Value = serde_json::from_str(&text).unwrap();
            for (key, value) in recipe.as_object().unwrap() {
                if !skip.contains(&key.as_str()) {
                    assert_eq!(&shipped[key], value, "{file}: {key}");
                }
            }
        }
    }
}
