//! The tiny SD-1.x goldens as checks that take a device: the CPU tests (unet.rs,
//! lora_golden.rs, pipeline.rs) and the other-backend parity test (device_parity.rs) run the
//! same code. Each returns `(what, relative error)` for every compared tensor.
use std::path::{Path, PathBuf};

use knobs_adapters::formats::peft;
use knobs_adapters::{AdaptedModel, strip_adapter_name};
use knobs_diffusion::pipeline::{GenerateRequest, SchedulerKind, StableDiffusion};
use knobs_diffusion::schedulers::{DdimScheduler, DdpmScheduler, Scheduler};
use knobs_diffusion::unet::UNet2DConditionModel;
use knobs_nn::burn::tensor::{DType, TensorData};
use knobs_nn::io::{StateDict, read_safetensors};
use knobs_nn::optim::{AdamW, AdamWConfig, collect_grads};
use knobs_nn::{Device, ModuleExt, Tensor};
use serde_json::Value;

pub const SD_GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

pub fn golden_tensors(sub: &str) -> PathBuf {
    Path::new(SD_GOLDEN).join("tensors").join(sub)
}

pub type Report = Vec<(String, f32)>;

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// max |a - b| / max |b|.
pub fn rel_err_values(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    diff / want.iter().map(|b| b.abs()).fold(0f32, f32::max)
}

fn golden<const D: usize>(g: &StateDict, key: &str, device: &Device) -> Tensor<D> {
    let (values, shape) = g.f32(key).unwrap();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn compare<const D: usize>(report: &mut Report, name: &str, got: Tensor<D>, g: &StateDict, key: &str) {
    let (want, shape) = g.f32(key).unwrap();
    // A scalar golden (shape []) is a one-element tensor here.
    if !shape.is_empty() {
        assert_eq!(got.dims().to_vec(), shape, "{name} shape");
    }
    report.push((name.to_string(), rel_err_values(&values(got), &want)));
}

/// Prints the report and fails on the first entry above `tol`.
pub fn assert_within(report: &Report, tol: f32) {
    for (name, err) in report {
        println!("{name:>24}: rel err {err:.2e}");
    }
    for (name, err) in report {
        assert!(*err <= tol, "{name}: relative error {err:.3e} > {tol:.0e}");
    }
}

/// The UNet's output and intermediates on diffusers' inputs; `trainable` tracks every
/// parameter (the training path of each layer).
pub fn unet(device: &Device, trainable: bool) -> Report {
    unet_in(device, trainable, DType::F32)
}

/// [`unet`] computing in `dtype` (mixed precision: weights stay f32).
pub fn unet_in(device: &Device, trainable: bool, dtype: DType) -> Report {
    let mut unet = UNet2DConditionModel::from_dir(Path::new(SD_GOLDEN).join("tiny-sd/unet"), device).unwrap();
    unet.compute_dtype = dtype;
    if trainable {
        unet.train_only(|_| true);
    }
    let g = read_safetensors(golden_tensors("unet.safetensors")).unwrap();
    let sample: Tensor<4> = golden(&g, "sample", device);
    let timesteps: Tensor<1> = golden(&g, "timestep", device); // i64 in the file, f32 here
    let ehs: Tensor<3> = golden(&g, "encoder_hidden_states", device);
    unet.check_inputs(&sample, &timesteps, &ehs, None).unwrap();

    let (out, inter) = unet.forward_with_intermediates(sample, timesteps, ehs);
    let mut report = Report::new();
    compare(&mut report, "out", out, &g, "out");
    let named = inter.named();
    assert_eq!(named.iter().filter(|(_, t)| t.is_tracked()).count(), if trainable { 8 } else { 0 }, "all but time_proj");
    assert_eq!(named.len(), 9, "time_proj, time_embedding, conv_in, 2 down, mid, 2 up, conv_norm_out");
    for (name, t) in named {
        let (want, shape) = g.f32(&format!("intermediate.{name}")).unwrap();
        assert_eq!(t.dims()[0], shape[0], "{name}");
        assert_eq!(t.dims()[1], shape[1..].iter().product::<usize>(), "{name}: {shape:?}");
        report.push((name.clone(), rel_err_values(&values(t), &want)));
    }
    report
}

/// diffusers' `StableDiffusionPipeline` call (4 DDIM steps, CFG 7.5, given latents): the
/// final latents, the decoded image and `generate`'s image. Loads on `device`.
pub fn pipeline(device: &Device) -> Report {
    let sd = StableDiffusion::from_dir(Path::new(SD_GOLDEN).join("tiny-sd"), device).unwrap();
    assert_eq!(sd.default_scheduler(), SchedulerKind::Ddim);
    assert!(!sd.default_scheduler_is_substitute());
    assert_eq!(sd.vae_scale_factor(), 2);

    let g = read_safetensors(golden_tensors("pipeline.safetensors")).unwrap();
    let meta: Value = serde_json::from_str(&g.metadata["golden"]).unwrap();
    let req = GenerateRequest {
        negative_prompt: meta["negative_prompt"].as_str().unwrap().into(),
        steps: meta["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
        latents: Some(golden(&g, "latents", &sd.device)),
        ..GenerateRequest::new(meta["prompt"].as_str().unwrap())
    };
    assert_eq!(sd.latent_shape(&req).unwrap(), [1, 4, 32, 32]);

    let mut ddim = DdimScheduler::new(sd.scheduler_config.clone());
    ddim.set_timesteps(req.steps).unwrap();
    let want: Vec<i64> = g.get("ddim_timesteps").unwrap().clone().convert::<i64>().try_into_vec().unwrap();
    assert_eq!(ddim.timesteps(), want.as_slice());

    let mut calls = 0;
    let final_latents = sd
        .generate_latents_with(&req, &mut |done, total| {
            calls += 1;
            assert_eq!((done, total), (calls, 4));
        })
        .unwrap();
    assert_eq!(calls, 4);
    let mut report = Report::new();
    compare(&mut report, "final_latents", final_latents.clone(), &g, "final_latents");
    compare(&mut report, "image (decode)", sd.decode_latents(final_latents), &g, "image");
    compare(&mut report, "image (generate)", sd.generate(&req).unwrap(), &g, "image");
    report
}

/// One LoRA training step as PEFT + torch took it: noising, prediction, loss, every LoRA
/// gradient (the worst is reported) and the AdamW update. `device` must have autodiff. With
/// `checkpointed`, the UNet's blocks are checkpointed (torch's step was not: the gradients
/// must not change), and the step must have run blocks again.
pub fn lora_train_step(device: &Device, checkpointed: bool) -> Report {
    let g = read_safetensors(golden_tensors("lora_train_step.safetensors")).unwrap();
    let mut unet = UNet2DConditionModel::from_dir(Path::new(SD_GOLDEN).join("tiny-sd/unet"), device).unwrap();
    unet.set_gradient_checkpointing(checkpointed);
    let mut m = AdaptedModel::new(unet, 0);
    peft::load(&mut m, golden_tensors("lora_peft"), "default").unwrap();
    m.train_adapter("default").unwrap();
    let name = |p: &str| strip_adapter_name(p, "default");
    let trainable_error = |m: &AdaptedModel<UNet2DConditionModel>, prefix: &str| {
        let mut worst = 0f32;
        m.model.for_each_param(|p, t| {
            if t.is_trainable() {
                worst = worst.max(rel_err_values(&values(t.flat()), &g.f32(&format!("{prefix}.{}", name(p))).unwrap().0));
            }
        });
        worst
    };
    assert_eq!(trainable_error(&m, "param_before"), 0.0, "the PEFT folder holds the golden's starting LoRA");

    let ddpm = DdpmScheduler::from_dir(Path::new(SD_GOLDEN).join("tiny-sd/scheduler")).unwrap();
    let ts: Vec<i64> = g.get("timesteps").unwrap().clone().convert::<i64>().try_into_vec().unwrap();
    let (latents, noise): (Tensor<4>, Tensor<4>) = (golden(&g, "latents", device), golden(&g, "noise", device));
    let noisy = ddpm.add_noise(latents, noise.clone(), &ts).unwrap();
    let mut report = Report::new();
    compare(&mut report, "noisy_latents", noisy.clone(), &g, "noisy_latents");
    let t = Tensor::<1>::from_data(TensorData::new(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), [ts.len()]), device);
    let pred = m.model.forward(noisy, t, golden(&g, "encoder_hidden_states", device));
    compare(&mut report, "model_pred", pred.clone(), &g, "model_pred");
    let loss = (pred - noise).powi_scalar(2).mean();
    compare(&mut report, "loss", loss.clone(), &g, "loss");

    let recomputed = knobs_nn::checkpoint::blocks_recomputed();
    let grads = collect_grads(&m.model, &loss.backward());
    // At least, since tests run side by side and the count is the process's.
    let recomputed = knobs_nn::checkpoint::blocks_recomputed() - recomputed;
    assert!(!checkpointed || recomputed > 0, "no block was checkpointed");
    assert_eq!(grads.len(), 96);
    let (mut grad_err, mut worst) = (0f32, String::new());
    for (p, grad) in &grads {
        let e = rel_err_values(&values(grad.clone()), &g.f32(&format!("grad.{}", name(p))).unwrap().0);
        if e > grad_err {
            (grad_err, worst) = (e, name(p));
        }
    }
    report.push((format!("worst grad ({worst})"), grad_err));
    let config = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 };
    AdamW::new(config).step(&mut m.model, &grads, |_| config.lr);
    report.push(("param_after".into(), trainable_error(&m, "param_after")));
    report
}
