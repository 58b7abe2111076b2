//! The built-in base model's architecture: SD-1.x's components (CLIP text encoder, UNet,
//! AutoencoderKL) sized for a laptop CPU. 32x32 RGB images become 8x8x4 latents, so every
//! UNet step works on 64 positions; attention runs only there and at 4x4.
use serde_json::{Value, json};

pub const IMAGE_SIZE: usize = 32;
pub const LATENT_SIZE: usize = 8;
/// Eight rather than SD's four: each latent pixel covers a 4x4 patch that must carry the
/// background, the object's colour and its edge; with four channels the VAE learnt object
/// colours markedly slower (RECIPE.md).
pub const LATENT_CHANNELS: usize = 8;

/// Experimental architecture variants, picked with `KNOBS_PRETRAIN_VARIANT` while a new recipe
/// is being measured: `wide8` (UNet [64, 128] on the same 8x8x8 latents) and `latent16`
/// (16x16x4 latents from a stride-2 VAE, UNet [32, 64, 96] with attention below 16x16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Default,
    Wide8,
    Latent16,
}

pub fn variant() -> Variant {
    match std::env::var("KNOBS_PRETRAIN_VARIANT").as_deref() {
        Ok("wide8") => Variant::Wide8,
        Ok("latent16") => Variant::Latent16,
        _ => Variant::Default,
    }
}
/// Longest caption of the world is 13 words; room for placeholder tokens on top.
pub const MAX_TOKENS: usize = 24;

pub fn vae_config() -> Value {
    let mut v = vae_config_default();
    if variant() == Variant::Latent16 {
        v["block_out_channels"] = json!([16, 32]);
        v["down_block_types"] = json!(["DownEncoderBlock2D", "DownEncoderBlock2D"]);
        v["up_block_types"] = json!(["UpDecoderBlock2D", "UpDecoderBlock2D"]);
        v["latent_channels"] = json!(4);
    }
    v
}

fn vae_config_default() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "block_out_channels": [16, 32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
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
    let mut u = unet_config_default();
    match variant() {
        Variant::Default => {}
        Variant::Wide8 => u["block_out_channels"] = json!([64, 128]),
        Variant::Latent16 => {
            u["block_out_channels"] = json!([32, 64, 96]);
            u["down_block_types"] = json!(["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]);
            u["up_block_types"] = json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]);
            u["in_channels"] = json!(4);
            u["out_channels"] = json!(4);
            u["sample_size"] = json!(16);
        }
    }
    u
}

fn unet_config_default() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": [48, 96],
        "center_input_sample": false,
        "cross_attention_dim": 64,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
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
