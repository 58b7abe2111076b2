//! Frozen text encoders serve a run only to encode its prompts, and every prompt is known
//! before the first step: the instance and class prompts (and "" under caption dropout) for
//! the loss, the validation prompts for the samples. A run encodes them all then and frees
//! the encoders' weights, as diffusers' DreamBooth scripts delete theirs, unless
//! `--keep-text-encoders`: the same losses and samples, less memory (SDXL's two encoders are
//! 0.8 billion values).
use anyhow::Result;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::ModuleExt;

use super::config::TrainConfig;
use super::data::Example;
use super::outputs::{SampleEncodings, Sampling};
use crate::objective::Objective;

/// Whether nothing in the text encoders trains and no adapter sits on them (their outputs
/// then never change).
fn unchanging(sd: &StableDiffusion) -> bool {
    let mut plain = true;
    for te in [Some(&sd.text_encoder), sd.text_encoder_2.as_ref()].into_iter().flatten() {
        plain &= te.num_trainable_params() == 0;
        te.for_each_layer(|_, layer| plain &= layer.adapter_states().is_empty());
    }
    plain
}

/// What sampling reads in place of released encoders: the validation grids' encodings as the
/// encoders give them during training, the end-of-run samples' as they give them after it
/// (out of autodiff, where linear layers round as `knobs generate`'s do).
#[derive(Default)]
pub(crate) struct Released {
    pub validation: SampleEncodings,
    pub samples: SampleEncodings,
}

/// Encodes every prompt the run can use, into `objective` (the loss's prompts) and the
/// returned encodings (`sample_prompts` under `validation` and under `sampling`), then
/// releases the text encoders. Does nothing, returning no encodings, under
/// `--keep-text-encoders` or when the encoders change during the run.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_and_release(cfg: &TrainConfig, sd: &mut StableDiffusion, objective: &Objective, examples: &[&[Example]], sample_prompts: &[String], validation: Sampling, sampling: Sampling) -> Result<Released> {
    if cfg.memory.keep_text_encoders || !unchanging(sd) {
        return Ok(Released::default());
    }
    let mut prompts: Vec<String> = examples.iter().flat_map(|e| e.iter().map(|x| x.prompt.clone())).collect();
    if cfg.data.caption_dropout > 0.0 {
        prompts.push(String::new());
    }
    prompts.sort();
    prompts.dedup();
    objective.encode_ahead(sd, &prompts)?;
    let validation = SampleEncodings::encode(sd, sample_prompts, validation)?;
    // The end-of-run samples are drawn with every weight out of autodiff, on the plain device.
    for (_, te) in sd.text_pairs_mut() {
        te.for_inference();
    }
    let plain = sd.device.clone().inner();
    let training_device = std::mem::replace(&mut sd.device, plain);
    let samples = SampleEncodings::encode(sd, sample_prompts, sampling);
    sd.device = training_device;
    let samples = samples?;
    for (_, te) in sd.text_pairs_mut() {
        te.release();
    }
    Ok(Released { validation, samples })
}
