//! Whether a UNet's weights are in memory. A pipeline that generates once can build the UNet
//! with placeholders, attach its adapters, encode the prompt, release the text encoders and
//! only then read the UNet's weights: the text encoders and the UNet are never resident
//! together (SDXL: 3.3 GB of f32 text encoders beside a 5.1 GB bf16 UNet).
use std::fmt;

use knobs_nn::{Error, Result};

use super::model::UNet2DConditionModel;

/// How a UNet built with placeholders gets its weights: the file it was to load, opened
/// (its header checked) when the load was deferred.
pub type DeferredLoad = Box<dyn FnOnce(&mut UNet2DConditionModel) -> Result<()> + Send + Sync>;

pub enum WeightsState {
    Loaded,
    /// Placeholders that read as zeros and take no memory; the load to run before a forward.
    Deferred(DeferredLoad),
    /// Every weight freed (an empty tensor each) once the latents were denoised.
    Released,
    /// The deferred read failed partway (its error kept): some weights read, some placeholders.
    ReadFailed(String),
}

impl fmt::Debug for WeightsState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightsState::Loaded => "Loaded",
            WeightsState::Deferred(_) => "Deferred",
            WeightsState::Released => "Released",
            WeightsState::ReadFailed(_) => "ReadFailed",
        })
    }
}

impl WeightsState {
    /// An error naming `unet` unless the weights are in memory: what runs, merges into or
    /// saves the UNet checks this first.
    pub fn check_in_memory(&self) -> Result<()> {
        match self {
            WeightsState::Loaded => Ok(()),
            WeightsState::Deferred(_) => Err(Error::param(
                "unet",
                "its weights are not loaded yet: this pipeline was loaded for one generation (`StableDiffusion::load_for_one_generation`), which reads them once the prompt is encoded (`generate_once`); load it with `StableDiffusion::load` to run, merge into or save the UNet",
            )),
            WeightsState::Released => Err(Error::param("unet", "its weights were released once the latents were denoised; load the model again to generate")),
            WeightsState::ReadFailed(why) => Err(Error::param("unet", format!("reading its deferred weights failed ({why}); load the model again"))),
        }
    }
}
