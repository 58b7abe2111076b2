//! SDXL's prompt conditioning, as diffusers' `StableDiffusionXLPipeline.encode_prompt`: the
//! penultimate hidden states (no final LayerNorm) of both text encoders side by side, and the
//! second encoder's projected pooled token as the pooled embedding. Negative prompts follow
//! `force_zeros_for_empty_prompt`.
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Device, Error, Result, Tensor};

use super::{Conditioning, GenerateRequest, StableDiffusion};
use crate::clip::embeddings::expand_prompt;
use crate::clip::{ClipTextModel, ClipTokenizer};
use crate::unet::AddedCond;

/// The two encoders with their tokenizers (`text_encoder` + `tokenizer`, then
/// `text_encoder_2` + `tokenizer_2`).
pub struct SdxlText<'a> {
    pub te1: &'a ClipTextModel,
    pub tok1: &'a ClipTokenizer,
    pub te2: &'a ClipTextModel,
    pub tok2: &'a ClipTokenizer,
}

/// What the UNet is conditioned on: `embeds` `[B, 77, d1 + d2]` (`encoder_hidden_states`) and
/// `pooled` `[B, projection]` (`text_embeds`).
#[derive(Debug, Clone)]
pub struct SdxlPrompt {
    pub embeds: Tensor<3>,
    pub pooled: Tensor<2>,
}

impl<'a> SdxlText<'a> {
    /// The text side of `sd`; `None` unless it is an SDXL pipeline.
    pub fn of(sd: &'a StableDiffusion) -> Option<Self> {
        Some(SdxlText { te1: &sd.text_encoder, tok1: &sd.tokenizer, te2: sd.text_encoder_2.as_ref()?, tok2: sd.tokenizer_2.as_ref()? })
    }

    /// `prompt` through the first encoder, `prompt_2` (default: `prompt`) through the second,
    /// each with its tokenizer's multi-vector embeddings expanded; `clip_skip` k takes the
    /// hidden states k layers further down (diffusers applies it to the positive prompt only).
    pub fn encode(&self, prompt: &str, prompt_2: Option<&str>, clip_skip: usize, device: &Device) -> Result<SdxlPrompt> {
        let penultimate = |te: &ClipTextModel, hidden: &[Tensor<3>]| -> Result<Tensor<3>> {
            let n = hidden.len();
            n.checked_sub(2 + clip_skip).map(|i| hidden[i].clone()).ok_or_else(|| {
                Error::param("clip_skip", format!("{clip_skip} leaves no layer of a {}-layer text encoder", te.num_layers()))
            })
        };
        let p1 = expand_prompt(prompt, self.tok1)?;
        let p2 = expand_prompt(prompt_2.unwrap_or(prompt), self.tok2)?;
        let out1 = self.te1.try_forward(self.tok1.encode_tensor(&[p1.as_str()], device)?)?;
        let out2 = self.te2.try_forward(self.tok2.encode_tensor(&[p2.as_str()], device)?)?;
        let pooled = self.te2.text_embeds(&out2).ok_or_else(|| Error::param("text_encoder_2", "is not a CLIPTextModelWithProjection (no text_projection)"))?;
        let embeds = Tensor::cat(vec![penultimate(self.te1, &out1.hidden_states)?, penultimate(self.te2, &out2.hidden_states)?], 2);
        Ok(SdxlPrompt { embeds, pooled })
    }

    /// The negative branch for classifier-free guidance: zeros shaped like `positive` when no
    /// negative prompt is given and `force_zeros_for_empty_prompt` holds, else the negative
    /// prompt (`""` when none) encoded without `clip_skip`; `negative_2` defaults to `negative`.
    pub fn negative(&self, negative: Option<&str>, negative_2: Option<&str>, force_zeros_for_empty_prompt: bool, positive: &SdxlPrompt, device: &Device) -> Result<SdxlPrompt> {
        match negative {
            None if force_zeros_for_empty_prompt => Ok(SdxlPrompt { embeds: positive.embeds.zeros_like(), pooled: positive.pooled.zeros_like() }),
            None => self.encode("", negative_2.or(Some("")), 0, device),
            Some(n) => self.encode(n, negative_2.or(Some(n)), 0, device),
        }
    }
}

/// Path prefixes of the parameters an SDXL pipeline never reads: it takes the first text
/// encoder's penultimate hidden state and not its pooled output, so that encoder's last layer
/// and final layer norm never reach an image (or a loss). Empty for SD-1.x/2.x.
pub fn unused_param_prefixes(sd: &StableDiffusion) -> Vec<String> {
    if !sd.is_sdxl() {
        return Vec::new();
    }
    let last = sd.text_encoder.num_layers() - 1;
    vec![format!("text_encoder.text_model.encoder.layers.{last}."), "text_encoder.text_model.final_layer_norm.".to_string()]
}

/// SDXL's micro-conditioning: `[original height, original width, crop top, crop left, target
/// height, target width]` (diffusers' `add_time_ids`). Defaults: original = target = the
/// image size, crop (0, 0).
pub fn time_ids(original: (u32, u32), crop_top_left: (u32, u32), target: (u32, u32)) -> [f32; 6] {
    [original.0, original.1, crop_top_left.0, crop_top_left.1, target.0, target.1].map(|v| v as f32)
}

/// [`super::StableDiffusion::condition`] for an SDXL pipeline: both encoders' prompt
/// embeddings, the pooled embedding and the time ids, each repeated for `num_images` and, with
/// guidance, preceded by the negative branch (whose time ids are the positive ones, diffusers'
/// default). An empty `negative_prompt` stands for diffusers' `None`: zeros when the model
/// forces them, else `""` encoded.
pub(crate) fn condition(sd: &StableDiffusion, req: &GenerateRequest, height: usize, width: usize) -> Result<Conditioning> {
    let text = SdxlText::of(sd).expect("an SDXL pipeline");
    let px = |key: &str, (h, w): (usize, usize)| -> Result<(u32, u32)> {
        let fit = |v: usize| u32::try_from(v).map_err(|_| Error::param(key, format!("{v} is too large")));
        Ok((fit(h)?, fit(w)?))
    };
    let ids = time_ids(
        px("original_size", req.original_size.unwrap_or((height, width)))?,
        px("crop_top_left", req.crop_top_left.unwrap_or((0, 0)))?,
        px("target_size", req.target_size.unwrap_or((height, width)))?,
    );
    let positive = text.encode(&req.prompt, req.prompt_2.as_deref(), 0, &sd.device)?;
    let n = req.num_images;
    let ids = Tensor::<2>::from_data(TensorData::new(ids.to_vec(), [1, 6]), &sd.device);
    let mut branches = vec![positive.clone()];
    if req.uses_guidance() {
        let negative = (!req.negative_prompt.is_empty()).then_some(req.negative_prompt.as_str());
        branches.insert(0, text.negative(negative, req.negative_prompt_2.as_deref(), sd.force_zeros_for_empty_prompt, &positive, &sd.device)?);
    }
    let rows = branches.len() * n;
    Ok(Conditioning {
        context: Tensor::cat(branches.iter().map(|b| b.embeds.clone().repeat_dim(0, n)).collect(), 0),
        added: Some(AddedCond {
            text_embeds: Tensor::cat(branches.iter().map(|b| b.pooled.clone().repeat_dim(0, n)).collect(), 0),
            time_ids: ids.repeat_dim(0, rows),
        }),
    })
}
