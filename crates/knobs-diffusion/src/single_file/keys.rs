//! The one name map between our parameter paths (diffusers' and transformers' `state_dict`
//! keys) and the original CompVis / A1111 single-file layout of SD-1.x and SD-2.x. Reading and
//! writing both go through it, so a file written here reads back through the same map.
use knobs_nn::Result;

use crate::unet::UNetConfig;

pub const UNET: &str = "model.diffusion_model.";
pub const VAE: &str = "first_stage_model.";
/// The text encoder of SD-1.x: transformers' CLIPTextModel, keys as transformers names them.
pub const CLIP: &str = "cond_stage_model.transformer.";
/// The text encoder of SD-2.x: OpenCLIP's text tower.
pub const OPEN_CLIP: &str = "cond_stage_model.model.";
/// SDXL's first text encoder (transformers' CLIP ViT-L names).
pub const SDXL_CLIP: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder (OpenCLIP ViT-bigG, with its projection).
pub const SDXL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";

/// Where one parameter lives in a single file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub key: String,
    /// OpenCLIP fuses q, k and v into one `in_proj` tensor: this parameter is that third.
    pub third: Option<usize>,
    /// The VAE's attention projections are 1x1 convolutions there, linear layers here.
    pub conv1x1: bool,
    /// OpenCLIP's `text_projection` multiplies from the right (`x @ P`): the transpose of
    /// the Linear weight here.
    pub transposed: bool,
}

impl Source {
    fn plain(key: String) -> Self {
        Source { key, third: None, conv1x1: false, transposed: false }
    }
}

/// The UNet's layout facts the map needs: resnets per down block and which up blocks have
/// attention (their upsampler sits one slot further along).
#[derive(Debug, Clone)]
pub struct UnetLayout {
    layers: usize,
    up_attention: Vec<bool>,
}

impl UnetLayout {
    pub fn of(config: &UNetConfig) -> Result<Self> {
        let down = config.down_plans()?;
        let layers = down[0].layers;
        if down.iter().any(|p| p.layers != layers) {
            return Err(knobs_nn::Error::param("layers_per_block", "differs between blocks; the single-file layout needs one value"));
        }
        Ok(UnetLayout { layers, up_attention: config.up_plans()?.iter().map(|p| p.cross_attn).collect() })
    }
}

fn resnet(rest: &str) -> Option<String> {
    const MAP: [(&str, &str); 6] = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("time_emb_proj.", "emb_layers.1."),
        ("conv_shortcut.", "skip_connection."),
    ];
    MAP.iter().find_map(|(ours, theirs)| rest.strip_prefix(ours).map(|leaf| format!("{theirs}{leaf}")))
}

/// `a.<int>.rest` -> (int, rest).
fn index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// A UNet parameter path -> its single-file key.
pub fn unet(path: &str, layout: &UnetLayout) -> Option<Source> {
    let stride = layout.layers + 1;
    let key = |k: String| Some(Source::plain(format!("{UNET}{k}")));
    for (ours, theirs) in [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ] {
        if let Some(leaf) = path.strip_prefix(ours) {
            return key(format!("{theirs}{leaf}"));
        }
    }
    if let Some(rest) = path.strip_prefix("down_blocks.") {
        let (b, rest) = index(rest)?;
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (j, rest) = index(rest)?;
            return key(format!("input_blocks.{}.0.{}", b * stride + j + 1, resnet(rest)?));
        }
        if let Some(rest) = rest.strip_prefix("attentions.") {
            let (j, rest) = index(rest)?;
            return key(format!("input_blocks.{}.1.{rest}", b * stride + j + 1));
        }
        let leaf = rest.strip_prefix("downsamplers.0.conv.")?;
        return key(format!("input_blocks.{}.0.op.{leaf}", (b + 1) * stride));
    }
    if let Some(rest) = path.strip_prefix("mid_block.") {
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (k, rest) = index(rest)?;
            return key(format!("middle_block.{}.{}", 2 * k, resnet(rest)?));
        }
        let rest = rest.strip_prefix("attentions.0.")?;
        return key(format!("middle_block.1.{rest}"));
    }
    let rest = path.strip_prefix("up_blocks.")?;
    let (b, rest) = index(rest)?;
    if let Some(rest) = rest.strip_prefix("resnets.") {
        let (j, rest) = index(rest)?;
        return key(format!("output_blocks.{}.0.{}", b * stride + j, resnet(rest)?));
    }
    if let Some(rest) = rest.strip_prefix("attentions.") {
        let (j, rest) = index(rest)?;
        return key(format!("output_blocks.{}.1.{rest}", b * stride + j));
    }
    let leaf = rest.strip_prefix("upsamplers.0.conv.")?;
    let slot = if *layout.up_attention.get(b)? { 2 } else { 1 };
    key(format!("output_blocks.{}.{slot}.conv.{leaf}", b * stride + layout.layers))
}

/// A UNet layer path (`down_blocks.1.attentions.0.proj_in`) -> the original code's
/// (`input_blocks.4.1.proj_in`), the block names kohya's SDXL LoRA files use.
pub fn unet_layer(path: &str, layout: &UnetLayout) -> Option<String> {
    let key = unet(&format!("{path}.weight"), layout)?.key;
    Some(key.strip_prefix(UNET)?.strip_suffix(".weight")?.to_string())
}

/// A VAE parameter path -> its single-file key. `levels`: the number of encoder blocks (the
/// original counts decoder blocks from the bottom, diffusers from the top).
pub fn vae(path: &str, levels: usize) -> Option<Source> {
    let key = |k: String| Some(Source::plain(format!("{VAE}{k}")));
    let res = |rest: &str| rest.replacen("conv_shortcut.", "nin_shortcut.", 1);
    let (part, rest) = path.split_once('.')?;
    if part != "encoder" && part != "decoder" {
        return key(path.to_string()); // quant_conv, post_quant_conv
    }
    if let Some(rest) = rest.strip_prefix("mid_block.resnets.") {
        let (k, rest) = index(rest)?;
        return key(format!("{part}.mid.block_{}.{}", k + 1, res(rest)));
    }
    if let Some(rest) = rest.strip_prefix("mid_block.attentions.0.") {
        let (layer, leaf) = rest.rsplit_once('.')?;
        let theirs = match layer {
            "group_norm" => "norm",
            "to_q" => "q",
            "to_k" => "k",
            "to_v" => "v",
            "to_out.0" => "proj_out",
            _ => return None,
        };
        let conv1x1 = layer != "group_norm" && leaf == "weight";
        return Some(Source { key: format!("{VAE}{part}.mid.attn_1.{theirs}.{leaf}"), third: None, conv1x1, transposed: false });
    }
    if let Some(leaf) = rest.strip_prefix("conv_norm_out.") {
        return key(format!("{part}.norm_out.{leaf}"));
    }
    if let Some(rest) = rest.strip_prefix("down_blocks.") {
        let (i, rest) = index(rest)?;
        if let Some(rest) = rest.strip_prefix("resnets.") {
            return key(format!("encoder.down.{i}.block.{}", res(rest)));
        }
        return key(format!("encoder.down.{i}.downsample.{}", rest.strip_prefix("downsamplers.0.")?));
    }
    if let Some(rest) = rest.strip_prefix("up_blocks.") {
        let (i, rest) = index(rest)?;
        let o = levels.checked_sub(i + 1)?;
        if let Some(rest) = rest.strip_prefix("resnets.") {
            return key(format!("decoder.up.{o}.block.{}", res(rest)));
        }
        return key(format!("decoder.up.{o}.upsample.{}", rest.strip_prefix("upsamplers.0.")?));
    }
    key(path.to_string()) // conv_in, conv_out
}

/// A CLIP text-encoder parameter path (`text_model.…`) -> its key in an SD-1.x file.
pub fn clip(path: &str) -> Option<Source> {
    clip_at(CLIP, path)
}

/// [`clip`] under another prefix (SDXL's [`SDXL_CLIP`]).
pub fn clip_at(prefix: &str, path: &str) -> Option<Source> {
    Some(Source::plain(format!("{prefix}{path}")))
}

/// A CLIP text-encoder parameter path -> its place in an SD-2.x file's OpenCLIP tower.
pub fn open_clip(path: &str) -> Option<Source> {
    open_clip_at(OPEN_CLIP, path)
}

/// [`open_clip`] under another prefix (SDXL's [`SDXL_OPEN_CLIP`]); also maps the
/// projection of a `CLIPTextModelWithProjection`.
pub fn open_clip_at(prefix: &str, path: &str) -> Option<Source> {
    let key = |k: String| Some(Source::plain(format!("{prefix}{k}")));
    if path == "text_projection.weight" {
        return Some(Source { transposed: true, ..Source::plain(format!("{prefix}text_projection")) });
    }
    let rest = path.strip_prefix("text_model.")?;
    match rest {
        "embeddings.token_embedding.weight" => return key("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return key("positional_embedding".into()),
        _ => {}
    }
    if let Some(leaf) = rest.strip_prefix("final_layer_norm.") {
        return key(format!("ln_final.{leaf}"));
    }
    let (i, rest) = index(rest.strip_prefix("encoder.layers.")?)?;
    let block = format!("transformer.resblocks.{i}");
    let (layer, leaf) = rest.rsplit_once('.')?;
    let theirs = match layer {
        "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => {
            let third = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].iter().position(|l| *l == layer);
            return Some(Source { third, ..Source::plain(format!("{prefix}{block}.attn.in_proj_{leaf}")) });
        }
        "self_attn.out_proj" => "attn.out_proj",
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        _ => return None,
    };
    key(format!("{block}.{theirs}.{leaf}"))
}

/// The key of an EMA copy of a UNet weight: `model_ema.` and the path without its dots
/// (`model.diffusion_model.out.0.weight` -> `model_ema.diffusion_modelout0weight`).
pub fn ema(key: &str) -> Option<String> {
    let rest = key.strip_prefix("model.")?;
    Some(format!("model_ema.{}", rest.replace('.', "")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> UnetLayout {
        UnetLayout { layers: 2, up_attention: vec![false, true, true, true] }
    }

    #[test]
    fn unet_names_follow_the_original_numbering() {
        let l = layout();
        let k = |p: &str| unet(p, &l).map(|s| s.key.trim_start_matches(UNET).to_string());
        assert_eq!(k("down_blocks.1.resnets.1.norm1.weight").unwrap(), "input_blocks.5.0.in_layers.0.weight");
        assert_eq!(k("down_blocks.1.attentions.0.proj_in.weight").unwrap(), "input_blocks.4.1.proj_in.weight");
        assert_eq!(k("down_blocks.2.downsamplers.0.conv.bias").unwrap(), "input_blocks.9.0.op.bias");
        assert_eq!(k("mid_block.resnets.1.conv_shortcut.weight").unwrap(), "middle_block.2.skip_connection.weight");
        assert_eq!(k("up_blocks.0.upsamplers.0.conv.weight").unwrap(), "output_blocks.2.1.conv.weight");
        assert_eq!(k("up_blocks.1.upsamplers.0.conv.weight").unwrap(), "output_blocks.5.2.conv.weight");
        assert_eq!(k("up_blocks.3.resnets.2.time_emb_proj.weight").unwrap(), "output_blocks.11.0.emb_layers.1.weight");
        assert_eq!(k("add_embedding.linear_2.bias").unwrap(), "label_emb.0.2.bias");
        assert_eq!(k("down_blocks.0.mystery.weight"), None);
    }

    #[test]
    fn vae_decoder_blocks_count_from_the_bottom() {
        let k = |p: &str| vae(p, 4).unwrap();
        assert_eq!(k("decoder.up_blocks.0.resnets.2.conv_shortcut.weight").key, format!("{VAE}decoder.up.3.block.2.nin_shortcut.weight"));
        assert_eq!(k("decoder.up_blocks.3.upsamplers.0.conv.bias").key, format!("{VAE}decoder.up.0.upsample.conv.bias"));
        let attn = k("encoder.mid_block.attentions.0.to_out.0.weight");
        assert_eq!((attn.key.as_str(), attn.conv1x1), ("first_stage_model.encoder.mid.attn_1.proj_out.weight", true));
        assert!(!k("encoder.mid_block.attentions.0.to_q.bias").conv1x1);
    }

    #[test]
    fn open_clip_fuses_q_k_v_and_ema_drops_dots() {
        let v = open_clip("text_model.encoder.layers.3.self_attn.v_proj.weight").unwrap();
        assert_eq!((v.key.as_str(), v.third), ("cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight", Some(2)));
        assert_eq!(open_clip("text_model.encoder.layers.0.mlp.fc2.bias").unwrap().key, "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.bias");
        assert_eq!(ema("model.diffusion_model.out.0.weight").unwrap(), "model_ema.diffusion_modelout0weight");
    }
}
