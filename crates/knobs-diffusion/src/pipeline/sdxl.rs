//! SDXL's prompt conditioning, as diffusers' `StableDiffusionXLPipeline.encode_prompt`: the
//! penultimate hidden states (no final LayerNorm) of both text encoders side by side, and the
//! second encoder's projected pooled token as the pooled embedding. Negative prompts follow
//! `force_zeros_for_empty_prompt`.
use knobs_nn::{Device, Error, Result, Tensor};

use crate::clip::{ClipTextModel, ClipTokenizer};

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

impl SdxlText<'_> {
    /// `prompt` through the first encoder, `prompt_2` (default: `prompt`) through the second;
    /// `clip_skip` k takes the hidden states k layers further down (diffusers applies it to
    /// the positive prompt only).
    pub fn encode(&self, prompt: &str, prompt_2: Option<&str>, clip_skip: usize, device: &Device) -> Result<SdxlPrompt> {
        let penultimate = |te: &ClipTextModel, hidden: &[Tensor<3>]| -> Result<Tensor<3>> {
            let n = hidden.len();
            n.checked_sub(2 + clip_skip).map(|i| hidden[i].clone()).ok_or_else(|| {
                Error::param("clip_skip", format!("{clip_skip} leaves no layer of a {}-layer text encoder", te.num_layers()))
            })
        };
        let out1 = self.te1.try_forward(self.tok1.encode_tensor(&[prompt], device)?)?;
        let out2 = self.te2.try_forward(self.tok2.encode_tensor(&[prompt_2.unwrap_or(prompt)], device)?)?;
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
