//! SDXL's prompt conditioning, as diffusers' `StableDiffusionXLPipeline.encode_prompt`: the
//! penultimate hidden states (no final LayerNorm) of both text encoders side by side, and the
//! second encoder's projected pooled token as the pooled embedding. Negative prompts follow
//! `force_zeros_for_empty_prompt`.
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Device, Error, Result, Tensor};

use super::guide;
use crate::clip::{ClipTextModel, ClipTokenizer};
use crate::schedulers::Scheduler;
use crate::unet::{AddedCond, UNet2DConditionModel};

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

/// SDXL's micro-conditioning: `[original height, original width, crop top, crop left, target
/// height, target width]` (diffusers' `add_time_ids`). Defaults: original = target = the
/// image size, crop (0, 0).
pub fn time_ids(original: (u32, u32), crop_top_left: (u32, u32), target: (u32, u32)) -> [f32; 6] {
    [original.0, original.1, crop_top_left.0, crop_top_left.1, target.0, target.1].map(|v| v as f32)
}

/// What one SDXL sampling run is conditioned on; `negative` (with its own time ids, diffusers'
/// default being the positive ones) turns classifier-free guidance on.
pub struct SdxlCondition<'a> {
    pub positive: &'a SdxlPrompt,
    pub time_ids: [f32; 6],
    pub negative: Option<(&'a SdxlPrompt, [f32; 6])>,
    pub guidance_scale: f64,
}

/// Denoises `latents` (unit noise, `[1, C, h, w]`) along `sched`'s chain (already set to its
/// steps) with a deterministic scheduler, as `StableDiffusionXLPipeline.__call__`; returns the
/// final latents (divide by the VAE's scaling factor before decoding).
pub fn denoise(unet: &UNet2DConditionModel, sched: &mut dyn Scheduler, cond: &SdxlCondition<'_>, latents: Tensor<4>) -> Result<Tensor<4>> {
    let device = latents.device();
    let ids = |v: [f32; 6]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [1, 6]), &device);
    let (context, added) = match cond.negative {
        Some((neg, neg_ids)) => (
            Tensor::cat(vec![neg.embeds.clone(), cond.positive.embeds.clone()], 0),
            AddedCond { text_embeds: Tensor::cat(vec![neg.pooled.clone(), cond.positive.pooled.clone()], 0), time_ids: Tensor::cat(vec![ids(neg_ids), ids(cond.time_ids)], 0) },
        ),
        None => (cond.positive.embeds.clone(), AddedCond { text_embeds: cond.positive.pooled.clone(), time_ids: ids(cond.time_ids) }),
    };
    let guided = cond.negative.is_some();
    let mut x = latents.mul_scalar(sched.init_noise_sigma());
    let timesteps = sched.timesteps().to_vec();
    let model_t = sched.model_timesteps();
    for (i, &t) in timesteps.iter().enumerate() {
        let input = if guided { Tensor::cat(vec![x.clone(), x.clone()], 0) } else { x.clone() };
        let input = sched.scale_model_input(input, t)?;
        let tt = Tensor::<1>::from_data(TensorData::new(vec![model_t[i]], [1]), &device);
        let pred = unet.forward_with_cond(input, tt, context.clone(), &added);
        let pred = if guided { guide(pred, cond.guidance_scale) } else { pred };
        x = sched.step(pred, t, x, None)?.prev_sample;
    }
    Ok(x)
}
