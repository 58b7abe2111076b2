//! Phase 1: the VAE. It sees the base world and, so that it can also draw what users will
//! fine-tune on later, patterned objects of the procedural concept family (never the held-out
//! concepts). Loss: pixel MSE + L1 and a tiny KL term, as a plain (GAN-free) SD VAE.
use std::ops::ControlFlow;

use anyhow::Result;
use image::RgbImage;
use knobs_diffusion::vae::{AutoencoderKL, VaeConfig};
use knobs_nn::optim::{AdamW, AdamWConfig};
use knobs_nn::{Init, ModuleExt, Tensor};
use knobs_world::concept::random_concept;
use knobs_world::{Placement, Scene, render};
use rand::Rng;
use rand::rngs::StdRng;

use super::{Deadline, PretrainConfig, Progress, Tick, folder, recipe};
use crate::checkpoint::{Checkpoints, State, check_same, restore};
use knobs_world::images::to_tensor;
use crate::lr::LrSchedule;
use crate::rng::{normal, step_rng};

const KL_WEIGHT: f64 = 1e-6;
/// The posterior's initial log-variance. At PyTorch's default init the latents start with unit
/// noise, which drowns a small object's colour: the decoder first learns to paint every object
/// in an average hue and unlearns it only slowly (measured: 19% colour accuracy through the VAE
/// after 300 steps from 0; see RECIPE.md). Starting near-deterministic avoids that; the KL term
/// can still raise the variance.
const INITIAL_LOGVAR: f32 = -8.0;
const OBJECT_WEIGHT: f64 = 6.0;

/// Per-pixel loss weight: 1 on the background, `1 + OBJECT_WEIGHT` where the pixel differs
/// from the image's corner (the background colour). The object covers a tenth of the image or
/// less, so a plain mean lets the background dominate and object colours are learnt last.
fn object_weight(x: &Tensor<4>) -> Tensor<4> {
    let [b, c, ..] = x.dims();
    let corner = x.clone().slice([0..b, 0..c, 0..1, 0..1]);
    let off = (x.clone() - corner).abs().max_dim(1).greater_elem(0.1).float();
    (off * OBJECT_WEIGHT).add_scalar(1.0).detach()
}

/// Sets the log-variance half of `quant_conv`'s bias to [`INITIAL_LOGVAR`].
fn start_nearly_deterministic(vae: &mut AutoencoderKL) {
    let latent = vae.config.latent_channels;
    vae.for_each_param_mut(|path, mut p| {
        if path == "quant_conv.bias" {
            let mut v: Vec<f32> = p.as_ref().to_data().convert::<f32>().try_to_vec::<f32>().expect("an f32 bias");
            v[latent..].iter_mut().for_each(|x| *x = INITIAL_LOGVAR);
            let device = p.device();
            p.replace_flat(knobs_nn::Tensor::<1>::from_floats(v.as_slice(), &device));
        }
    });
}

/// Half base-world scenes, half patterned concepts, all at the recipe's image size.
pub fn images(rng: &mut StdRng, n: usize) -> Vec<RgbImage> {
    let size = recipe::IMAGE_SIZE as u32;
    (0..n)
        .map(|_| {
            let scene = Scene::sample(rng);
            if rng.random_bool(0.5) {
                render(&scene, size)
            } else {
                random_concept(rng).render(&Placement::from(&scene), size)
            }
        })
        .collect()
}

/// Trains (or resumes, or loads the finished) VAE. `Break(step)` means the deadline passed.
pub fn train(config: &PretrainConfig, deadline: &Deadline, progress: Progress) -> Result<ControlFlow<u64, AutoencoderKL>> {
    let dir = config.model_dir().join("vae");
    if folder::is_complete(&dir) {
        return Ok(ControlFlow::Continue(AutoencoderKL::from_dir(&dir, &knobs_nn::device::inference())?));
    }
    let phase = config.vae;
    let dev = knobs_nn::device::training();
    let vae_config = VaeConfig::from_json_str(&recipe::vae_config().to_string())?;
    let mut vae = AutoencoderKL::new(vae_config, &mut Init::new(config.seed), &dev)?;
    start_nearly_deterministic(&mut vae);
    vae.train_only(|_| true);
    let mut opt = AdamW::new(AdamWConfig { lr: phase.lr, weight_decay: 0.0, ..Default::default() });
    let ckpts = Checkpoints::new(config.checkpoint_dir(), "vae");
    let fingerprint = serde_json::to_string(&(config.seed, phase))?;
    let mut start = 0;
    if let Some((step, sd)) = ckpts.latest()? {
        check_same(&sd, "phase", &fingerprint)?;
        restore(&sd, &mut vae, &mut opt, None, &dev)?;
        start = step;
    }
    for step in start..phase.steps {
        let mut rng = step_rng(config.seed, "vae", step);
        let x = to_tensor(&images(&mut rng, phase.batch), &dev)?;
        let posterior = vae.encode(x.clone());
        let z = posterior.sample(normal(&mut rng, posterior.mean.dims(), &dev));
        let weight = object_weight(&x);
        let diff = vae.decode(z) - x;
        let pixel = (diff.clone().powi_scalar(2) + diff.abs()) * weight;
        let loss = pixel.mean() + posterior.kl().mean() * KL_WEIGHT;
        let value = loss.clone().into_scalar::<f32>() as f64;
        ckpts.check_loss("VAE", value, step)?;
        let lr = phase.lr * LrSchedule::Cosine.factor(step, phase.warmup, phase.steps);
        opt.minimise(&mut vae, loss, 1.0, lr);
        progress(&Tick { phase: "vae", step: step + 1, total: phase.steps, loss: value, seconds_per_step: None });
        let pausing = deadline.pauses_at(step + 1, phase.steps);
        ckpts.save_if_due(step + 1, phase.steps, config.checkpoint_every, pausing, || State::of(&vae, &opt, "phase", &fingerprint))?;
        if pausing {
            return Ok(ControlFlow::Break(step + 1));
        }
    }
    vae.for_inference();
    let scale = scaling_factor(&vae, config.seed)?;
    folder::write_vae(&dir, &vae, scale)?;
    Ok(ControlFlow::Continue(AutoencoderKL::from_dir(&dir, &knobs_nn::device::inference())?))
}

/// SD's `scaling_factor`: one over the standard deviation of the latents, so that the UNet
/// sees unit-variance inputs.
fn scaling_factor(vae: &AutoencoderKL, seed: u64) -> Result<f64> {
    let dev = knobs_nn::device::inference();
    let mut rng = step_rng(seed, "vae-scale", 0);
    let mut sum = 0.0;
    let mut sum_sq = 0.0;
    let mut n = 0usize;
    for _ in 0..8 {
        let x = to_tensor(&images(&mut rng, 64), &dev)?;
        let z: Vec<f32> = vae.encode(x).mode().into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        n += z.len();
        sum += z.iter().map(|&v| v as f64).sum::<f64>();
        sum_sq += z.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
    }
    let mean = sum / n as f64;
    Ok(1.0 / (sum_sq / n as f64 - mean * mean).sqrt())
}
