//! Memory savers change no result. The objective's caches give the loss the uncached objective gives: cached latents (each
//! image and its flip encoded once) and prompt embeddings (only while the text encoder is
//! frozen; a trainable one still gets its gradient).
use std::path::PathBuf;

use image::{Rgb, RgbImage};
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::optim::collect_grads;
use knobs_nn::{ModuleExt, cpu_autodiff};
use knobs_train::latent_cache::LatentCache;
use knobs_train::objective::{LossOptions, Objective};
use knobs_train::rng::step_rng;

fn tiny_sd() -> StableDiffusion {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/tiny-sd"));
    let mut sd = StableDiffusion::from_dir(dir, &cpu_autodiff()).unwrap();
    sd.vae.for_inference();
    sd
}

fn images() -> Vec<RgbImage> {
    let a = RgbImage::from_fn(32, 32, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 90]));
    let flipped = image::imageops::flip_horizontal(&a);
    let b = RgbImage::from_fn(32, 32, |x, y| Rgb([200, ((x + y) * 4) as u8, (x * y) as u8]));
    vec![a, flipped, b.clone(), b]
}

fn losses(sd: &StableDiffusion, objective: &Objective, step: u64) -> Vec<f32> {
    let prompts: Vec<String> = ["a red star", "a red star", "a blue cube", "a red star"].map(String::from).to_vec();
    let mut rng = step_rng(5, "cache-test", step);
    let per = objective.per_sample(sd, &images(), &prompts, &mut rng, LossOptions::default()).unwrap();
    per.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn assert_close(a: &[f32], b: &[f32]) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "{a:?} vs {b:?}");
    }
}

#[test]
fn cached_latents_and_prompts_give_the_uncached_loss() {
    let sd = tiny_sd();
    let dev = cpu_autodiff();
    let plain = Objective::new(&sd, &dev);
    let cached = Objective::new(&sd, &dev).cache_latents();
    for step in 0..2 {
        let want = losses(&sd, &plain, step);
        assert_close(&losses(&sd, &cached, step), &want);
        // Fresh noise each step: the loss moves although the latents are cached.
        if step == 1 {
            assert_ne!(want, losses(&sd, &plain, 0));
        }
    }
    // Three distinct images (an image, its flip, another), two distinct prompts.
    assert_eq!(cached.cached_counts(), (3, 2));
}

/// One latent folder shared by two VAEs that differ in one encoder weight: each writes and
/// reads its own files (named by image and encoder), so each gets its own uncached loss.
#[test]
fn a_latent_folder_keeps_each_vaes_latents_apart() {
    let dir = tempfile::tempdir().unwrap();
    let sd = tiny_sd();
    let mut other = tiny_sd();
    other.vae.for_each_param_mut(|path, mut p| {
        if path == "encoder.conv_in.bias" {
            let data = p.as_ref().to_data();
            let moved: Vec<f32> = data.try_to_vec::<f32>().unwrap().iter().map(|v| v + 0.5).collect();
            p.assign(path, knobs_nn::burn::tensor::TensorData::new(moved, data.shape().to_vec())).unwrap();
        }
    });
    let dev = cpu_autodiff();
    let disk = |sd: &StableDiffusion| Objective::new(sd, &dev).with_latent_cache(LatentCache::on_disk(dir.path(), &sd.vae).unwrap());
    let files = || std::fs::read_dir(dir.path()).unwrap().count();
    assert_close(&losses(&sd, &disk(&sd), 0), &losses(&sd, &Objective::new(&sd, &dev), 0));
    assert_eq!(files(), 3, "an image, its flip and another");
    let want = losses(&other, &Objective::new(&other, &dev), 0);
    assert_ne!(want, losses(&sd, &Objective::new(&sd, &dev), 0), "the changed weight changed nothing");
    assert_close(&losses(&other, &disk(&other), 0), &want);
    assert_eq!(files(), 6, "the second VAE's latents are files of their own");
    // Read back from the folder (a fresh objective holds nothing in memory): the same loss.
    assert_close(&losses(&other, &disk(&other), 0), &want);
    assert_eq!(files(), 6);
}

#[test]
fn a_trainable_text_encoder_is_never_served_from_the_cache() {
    let frozen = tiny_sd();
    let from_cache = losses(&frozen, &Objective::new(&frozen, &cpu_autodiff()), 0);
    let mut sd = tiny_sd();
    sd.train_only(|path| path.starts_with("text_encoder.text_model.final_layer_norm"));
    let objective = Objective::new(&sd, &cpu_autodiff());
    let first = losses(&sd, &objective, 0);
    let mut rng = step_rng(5, "cache-test", 0);
    let prompts: Vec<String> = ["a red star", "a red star", "a blue cube", "a red star"].map(String::from).to_vec();
    let loss = objective.per_sample(&sd, &images(), &prompts, &mut rng, LossOptions::default()).unwrap().mean();
    let grads = collect_grads(&sd, &loss.backward());
    assert!(!grads.is_empty() && grads.values().all(|g| g.clone().abs().sum().into_scalar::<f32>() > 0.0));
    assert_eq!(objective.cached_counts().1, 0);
    // The batch encoding of a trainable encoder and the per-prompt cache agree.
    assert_close(&first, &from_cache);
}

/// Gradients of a full UNet fine-tune, with and without burn's balanced checkpointing: the
/// same bits.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let grads = |dev: knobs_nn::Device| {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/tiny-sd"));
        let mut sd = StableDiffusion::from_dir(dir, &dev).unwrap();
        sd.vae.for_inference();
        sd.train_only(|path| path.starts_with("unet."));
        let objective = Objective::new(&sd, &dev);
        let prompts: Vec<String> = ["a red star", "a blue cube", "a red star", "a star"].map(String::from).to_vec();
        let mut rng = step_rng(5, "checkpointing", 0);
        let loss = objective.per_sample(&sd, &images(), &prompts, &mut rng, LossOptions::default()).unwrap().mean();
        collect_grads(&sd, &loss.backward())
    };
    let plain = grads(cpu_autodiff());
    let checkpointed = grads(knobs_nn::cpu_autodiff_checkpointed());
    assert_eq!(plain.len(), checkpointed.len());
    assert!(plain.len() > 100);
    for (path, g) in &plain {
        assert_eq!(g.to_data(), checkpointed[path].to_data(), "{path}");
    }
}

/// Frozen weights kept in f16 give the gradients of f32 weights holding the same f16 values,
/// bit for bit, with and without checkpointing (the widening to f32 is exact).
#[test]
fn half_precision_frozen_weights_change_nothing_but_their_rounding() {
    use knobs_nn::burn::tensor::DType;
    let grads = |dev: knobs_nn::Device, store_half: bool| {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/tiny-sd"));
        let mut sd = StableDiffusion::from_dir(dir, &dev).unwrap();
        sd.vae.for_inference();
        // Every matrix and kernel rounded to f16 first, so both runs hold the same values.
        sd.store_frozen_as(DType::F16);
        if !store_half {
            // Training widens back to f32 (the same values).
            sd.for_each_param_mut(|_, mut p| p.set_trainable(true));
        }
        sd.train_only(|path| path.contains("attn2.to_k") || path.contains("conv_out"));
        let mut half = 0;
        sd.for_each_param(|_, p| half += (p.to_data().dtype() == DType::F16) as usize);
        assert_eq!(half > 0, store_half);
        let objective = Objective::new(&sd, &dev);
        let prompts: Vec<String> = ["a red star", "a blue cube", "a red star", "a star"].map(String::from).to_vec();
        let mut rng = step_rng(5, "half", 0);
        let loss = objective.per_sample(&sd, &images(), &prompts, &mut rng, LossOptions::default()).unwrap().mean();
        collect_grads(&sd, &loss.backward())
    };
    let widened = grads(cpu_autodiff(), false);
    assert!(!widened.is_empty());
    for dev in [cpu_autodiff(), knobs_nn::cpu_autodiff_checkpointed()] {
        let half = grads(dev, true);
        for (path, g) in &widened {
            assert_eq!(g.to_data(), half[path].to_data(), "{path}");
        }
    }
}
