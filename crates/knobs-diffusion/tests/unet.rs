//! UNet2DConditionModel against diffusers' golden tensors, gradients (reach and
//! finite-difference correctness) and config handling.
use std::path::{Path, PathBuf};
use std::time::Instant;

mod common;

use knobs_diffusion::unet::{UNet2DConditionModel, UNetConfig};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::read_safetensors;
use knobs_nn::{Device, Init, ModuleExt, Tensor, cpu, cpu_autodiff, gradcheck};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

fn unet_dir() -> PathBuf {
    Path::new(GOLDEN).join("tiny-sd/unet")
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// max |a - b| / max |b|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = want.iter().map(|b| b.abs()).fold(0f32, f32::max);
    diff / scale
}

fn random<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(Init::new(seed).normal_vec(n), shape), device)
}

/// Inference (fused attention kernel) on the plain device.
#[test]
fn matches_diffusers_golden_output_and_intermediates() {
    check_golden(&cpu(), false);
}

/// Training: every parameter tracked, so attention takes the differentiable matmul path.
#[test]
fn matches_diffusers_golden_when_tracked_for_training() {
    check_golden(&cpu_autodiff(), true);
}

fn check_golden(device: &Device, trainable: bool) {
    common::sd_goldens::assert_within(&common::sd_goldens::unet(device, trainable), 1e-4);
}

/// Mixed precision: bf16 / fp16 compute over f32 weights stays near diffusers' f32 golden
/// (bf16 keeps 8 mantissa bits, fp16 11), and training through it hands every parameter an
/// f32 gradient that is finite and, somewhere in each tensor, non-zero.
#[test]
fn half_precision_compute_stays_near_the_golden_and_trains_f32_weights() {
    use knobs_nn::burn::tensor::DType;
    // The inference path, and the training path (autodiff, every weight trained), whose
    // attention runs the fused kernel in f32 on the half-precision inputs.
    for (dtype, tol) in [(DType::BF16, 3e-2), (DType::F16, 4e-3)] {
        for (device, trained) in [(cpu(), false), (cpu_autodiff(), true)] {
            let report = common::sd_goldens::unet_in(&device, trained, dtype);
            println!("{dtype:?}, {}", if trained { "training path" } else { "inference path" });
            let (out, _) = &report[0];
            assert_eq!(out, "out");
            common::sd_goldens::assert_within(&report, tol);
        }
    }
    let device = cpu_autodiff();
    let mut unet = UNet2DConditionModel::from_dir(unet_dir(), &device).unwrap();
    unet.compute_dtype = DType::BF16;
    unet.train_only(|_| true);
    let out = unet.forward(random([1, 4, 32, 32], 1, &device), Tensor::from_floats([10.0], &device), random([1, 77, 32], 2, &device));
    assert_eq!(out.dtype(), DType::F32, "the prediction comes back in f32 for the loss");
    let grads = out.powi_scalar(2).mean().backward();
    let mut checked = 0;
    unet.for_each_param(|path, p| {
        assert_eq!(p.to_data().dtype(), DType::F32, "{path}: master weights stay f32");
        let g: Vec<f32> = p.grad(&grads).unwrap_or_else(|| panic!("{path}: no gradient")).into_data().try_into_vec().unwrap();
        assert!(g.iter().all(|v| v.is_finite()) && g.iter().any(|v| *v != 0.0), "{path}: gradient not finite or all zero");
        checked += 1;
    });
    assert!(checked > 200, "{checked} parameter tensors");
}

/// Generation under bf16 on a CPU with bf16 products keeps f32 activations and rounds only the
/// products (`autocast::plan`): the bf16 UNet without autodiff gives the bits of the f32 UNet
/// run inside `with_products(Bf16)`, which are not the f32 products' bits.
#[test]
fn bf16_inference_on_the_cpu_is_f32_activations_with_bf16_products() {
    use knobs_nn::burn::tensor::DType;
    use knobs_nn::ops::{Products, autocast};
    if Products::for_dtype(DType::BF16) != Products::Bf16 {
        println!("skipped: this CPU takes no bf16 products (no AVX512-BF16, or Intel without AMX)");
        return;
    }
    let device = cpu();
    let mut unet = UNet2DConditionModel::from_dir(unet_dir(), &device).unwrap();
    let run = |unet: &UNet2DConditionModel| values(unet.forward(random([2, 4, 16, 16], 1, &device), Tensor::from_floats([10.0, 10.0], &device), random([2, 77, 32], 2, &device)));
    let f32_products = run(&unet);
    let bf16_products = autocast::with_products(Products::Bf16, || run(&unet));
    unet.compute_dtype = DType::BF16;
    let bf16 = run(&unet);
    assert!(bf16 == bf16_products, "bf16 inference is f32 activations under bf16 products");
    assert!(bf16 != f32_products, "the products were rounded to bf16");
    assert!(rel_err(&bf16, &f32_products) < 3e-2);
}

#[test]
fn random_init_has_the_checkpoint_layout() {
    let cfg = UNetConfig::from_file(unet_dir().join("config.json")).unwrap();
    let unet = UNet2DConditionModel::new(cfg, &mut Init::new(1), &cpu()).unwrap();
    let file = read_safetensors(unet_dir().join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut ours = Vec::new();
    unet.for_each_param(|path, p| ours.push((path.to_string(), p.dims())));
    ours.sort();
    let theirs: Vec<_> = file.tensors.iter().map(|(k, d)| (k.clone(), d.shape().as_slice().to_vec())).collect();
    assert_eq!(ours, theirs);
    assert_eq!(unet.num_params(), 1_106_212);
    // The head-count quirk: attention_head_dim=8 means 8 heads (of 4 channels at 32 ch).
    let attn = &unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1;
    assert_eq!(attn.heads, 8);
    assert!((attn.scale - 0.5).abs() < 1e-12);
    assert_eq!(unet.mid_block.as_ref().unwrap().attentions[0].transformer_blocks[0].attn2.heads, 8);
}

#[test]
fn per_block_head_counts_follow_diffusers() {
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(unet_dir().join("config.json")).unwrap()).unwrap();
    json["attention_head_dim"] = serde_json::json!([4, 2]);
    json["down_block_types"] = serde_json::json!(["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]);
    json["up_block_types"] = serde_json::json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]);
    let cfg = UNetConfig::from_json(&json.to_string()).unwrap();
    let unet = UNet2DConditionModel::new(cfg, &mut Init::new(2), &cpu()).unwrap();
    let heads = |a: &knobs_diffusion::unet::Transformer2DModel| a.transformer_blocks[0].attn1.heads;
    assert_eq!(heads(&unet.down_blocks[0].attentions[0]), 4);
    assert_eq!(heads(&unet.down_blocks[1].attentions[0]), 2);
    assert_eq!(heads(&unet.mid_block.as_ref().unwrap().attentions[0]), 2);
    // The up path runs the list in reverse.
    assert_eq!(heads(&unet.up_blocks[0].attentions[0]), 2);
    assert_eq!(heads(&unet.up_blocks[1].attentions[2]), 4);
    let q = &unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1;
    assert!((q.scale - 1.0 / 32f64.sqrt()).abs() < 1e-12, "64 channels / 2 heads = 32 per head");
}

#[test]
fn unsupported_block_type_is_an_error_naming_the_key() {
    let text = std::fs::read_to_string(unet_dir().join("config.json")).unwrap();
    let bad = text.replace("\"DownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\"");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), bad).unwrap();
    let err = UNet2DConditionModel::from_dir(dir.path(), &cpu()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("down_block_types[1]"), "{err}");
    assert!(err.contains("SimpleCrossAttnDownBlock2D") && err.contains("CrossAttnDownBlock2D"), "{err}");

    let bad = text.replace("\"positional\"", "\"fourier\"");
    let err = UNetConfig::from_json(&bad).unwrap_err().to_string();
    assert!(err.contains("time_embedding_type") && err.contains("fourier"), "{err}");
    let bad = text.replace("\"UNetMidBlock2DCrossAttn\"", "\"UNetMidBlock2DSimpleCrossAttn\"");
    let err = UNetConfig::from_json(&bad).unwrap_err().to_string();
    assert!(err.contains("mid_block_type"), "{err}");
}

#[test]
fn attention_fused_and_differentiable_paths_agree() {
    use knobs_diffusion::unet::Attention;
    let device = cpu_autodiff();
    // Context as wide as the query, so the same layer also runs self-attention.
    let mut attn = Attention::new(16, Some(16), 4, 4, false, &mut Init::new(5), &device);
    let x = random([2, 9, 16], 20, &device);
    let ctx = random([2, 7, 16], 21, &device);
    let fused_self = values(attn.forward(x.clone(), None));
    let fused_cross = values(attn.forward(x.clone(), Some(ctx.clone())));
    attn.train_only(|_| true);
    let out = attn.forward(x.clone(), Some(ctx.clone()));
    assert!(out.is_tracked());
    assert!(rel_err(&values(out), &fused_cross) < 1e-5);
    assert!(rel_err(&values(attn.forward(x, None)), &fused_self) < 1e-5);
    assert!(rel_err(&fused_self, &fused_cross) > 1e-2, "self and cross attention must differ");
}

/// A small forward: batch 1, 8x8 latent, 5 context tokens.
fn small_inputs(device: &Device) -> (Tensor<4>, Tensor<1>, Tensor<3>, Tensor<4>) {
    let sample = random([1, 4, 8, 8], 10, device);
    let t = Tensor::from_data(TensorData::new(vec![321.0f32], [1]), device);
    let ehs = random([1, 5, 32], 11, device);
    let target = random([1, 4, 8, 8], 12, device);
    (sample, t, ehs, target)
}

fn mse(unet: &UNet2DConditionModel, inputs: &(Tensor<4>, Tensor<1>, Tensor<3>, Tensor<4>)) -> Tensor<1> {
    let (s, t, e, target) = inputs.clone();
    (unet.forward(s, t, e) - target).powi_scalar(2).mean()
}

#[test]
fn every_parameter_receives_a_gradient() {
    let device = cpu_autodiff();
    let mut unet = UNet2DConditionModel::from_dir(unet_dir(), &device).unwrap();
    unet.train_only(|_| true);
    assert_eq!(unet.num_trainable_params(), unet.num_params());
    let inputs = small_inputs(&device);
    let grads = mse(&unet, &inputs).backward();
    let mut missing = Vec::new();
    let mut count = 0;
    unet.for_each_param(|path, p| {
        count += 1;
        let ok = p.grad(&grads).map(|g| g.abs().max().into_scalar::<f32>() > 0.0).unwrap_or(false);
        if !ok {
            missing.push(path.to_string());
        }
    });
    assert!(count > 300, "{count}");
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

#[test]
fn gradients_match_finite_differences() {
    let device = cpu_autodiff();
    let mut unet = UNet2DConditionModel::from_dir(unet_dir(), &device).unwrap();
    let targets = [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "down_blocks.0.resnets.0.norm1.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
    ];
    unet.train_only(|p| targets.contains(&p));
    let (s, t, e, _) = small_inputs(&device);
    let w: Tensor<4> = random([1, 4, 8, 8], 13, &device);
    // A loss linear in the output keeps its value small, so its f32 rounding (which bounds
    // what central differences resolve) is far below the gradients being checked.
    let loss = |m: &UNet2DConditionModel| (m.forward(s.clone(), t.clone(), e.clone()) * w.clone()).mean();
    let samples = gradcheck::check(&mut unet, loss, 1e-2, 3);
    assert_eq!(samples.len(), targets.len() * 3);
    let mut worst = 0f64;
    for s in &samples {
        // A 1e-4 floor instead of GradSample::rel_error's 1e-2: these gradients are ~1e-5..1e-2
        // and f32 central differences resolve about 1e-6 here.
        let err = (s.analytic - s.numeric).abs() / s.analytic.abs().max(s.numeric.abs()).max(1e-4);
        println!("{:<70} [{:>5}] analytic {:+.5e} numeric {:+.5e} rel {:.2e}", s.path, s.index, s.analytic, s.numeric, err);
        worst = worst.max(err);
    }
    for path in targets {
        assert!(samples.iter().any(|s| s.path == path && s.analytic.abs() > 1e-5), "{path}: gradients too small to test anything");
    }
    assert!(worst < 5e-2, "worst relative error {worst:.3e}");
}

/// `cargo test --release -p knobs-diffusion --test unet -- --ignored --nocapture timing`
#[test]
#[ignore]
fn timing_tiny_unet_batch2_32x32() {
    let device = cpu_autodiff();
    let mut unet = UNet2DConditionModel::from_dir(unet_dir(), &device).unwrap();
    let sample = random([2, 4, 32, 32], 1, &device);
    let t = Tensor::from_data(TensorData::new(vec![999.0f32, 37.0], [2]), &device);
    let ehs = random([2, 77, 32], 2, &device);
    let target = random([2, 4, 32, 32], 3, &device);
    let inference = UNet2DConditionModel::from_dir(unet_dir(), &cpu()).unwrap();
    let (si, ti, ei) = (sample.clone().inner(), t.clone().inner(), ehs.clone().inner());
    let runs = 5;
    let _ = values(inference.forward(si.clone(), ti.clone(), ei.clone()));
    let start = Instant::now();
    for _ in 0..runs {
        let _ = values(inference.forward(si.clone(), ti.clone(), ei.clone()));
    }
    let fwd = start.elapsed().as_secs_f64() / runs as f64;
    unet.train_only(|_| true);
    let step = |unet: &UNet2DConditionModel| {
        let loss = (unet.forward(sample.clone(), t.clone(), ehs.clone()) - target.clone()).powi_scalar(2).mean();
        let grads = loss.backward();
        let g = unet.conv_in.weight.grad(&grads).unwrap();
        let _ = values(g);
    };
    step(&unet);
    let start = Instant::now();
    for _ in 0..runs {
        step(&unet);
    }
    let fb = start.elapsed().as_secs_f64() / runs as f64;
    println!("tiny UNet, batch 2, 32x32: forward {:.1} ms, forward+backward (all params) {:.1} ms", fwd * 1e3, fb * 1e3);
}

