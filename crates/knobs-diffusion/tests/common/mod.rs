//! What the SDXL tests share: the tiny SDXL fixture, golden tensors, the relative error they
//! are judged by, and the golden pipeline call.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

pub mod sd_goldens;

use knobs_diffusion::pipeline::GenerateRequest;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::StateDict;
use knobs_nn::{Device, Tensor, cpu};

/// `tests/fixtures/tiny-sdxl` (made by `scripts/make_tiny_sdxl.py`).
pub fn tiny_sdxl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl")
}

pub fn tensor<const D: usize>(sd: &StateDict, key: &str, device: &Device) -> Tensor<D> {
    let (values, shape) = sd.f32(key).unwrap();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// max |got - golden| / max |golden|.
pub fn rel_err<const D: usize>(got: Tensor<D>, g: &StateDict, key: &str) -> f32 {
    let got: Vec<f32> = got.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    let want = g.f32(key).unwrap().0;
    assert_eq!(got.len(), want.len(), "{key}");
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    diff / want.iter().map(|b| b.abs()).fold(0f32, f32::max)
}

/// The golden SDXL call (`goldens/pipeline.safetensors`' arguments: 3 Euler steps, guidance 5,
/// a negative prompt, original size (96, 128), crop (8, 16), target (64, 80)) from the
/// golden latents under `latents_key` of `g`.
pub fn golden_request(g: &StateDict, latents_key: &str) -> GenerateRequest {
    GenerateRequest {
        negative_prompt: "blurry, dark".into(),
        steps: 3,
        guidance_scale: 5.0,
        original_size: Some((96, 128)),
        crop_top_left: Some((8, 16)),
        target_size: Some((64, 80)),
        latents: Some(tensor(g, latents_key, &cpu())),
        ..GenerateRequest::new("a photo of a sks dog, high quality!")
    }
}
