//! LoRA and IA3 on the real UNet against the diffusers/PEFT goldens: every file format the
//! goldens were saved in reproduces the adapted output, merging keeps it, and one LoRA
//! training step (noising, prediction, loss, gradients, AdamW) lands on PyTorch's numbers.
use std::path::{Path, PathBuf};

use knobs_adapters::formats::{lora_files, peft};
use knobs_adapters::{AdaptedModel, strip_adapter_name};
use knobs_diffusion::schedulers::DdpmScheduler;
use knobs_diffusion::unet::UNet2DConditionModel;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, read_safetensors};
use knobs_nn::optim::{AdamW, AdamWConfig, collect_grads};
use knobs_nn::{Device, ModuleExt, Tensor, cpu, cpu_autodiff};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

fn tensors(sub: &str) -> PathBuf {
    Path::new(GOLDEN).join("tensors").join(sub)
}

fn unet(device: &Device) -> AdaptedModel<UNet2DConditionModel> {
    AdaptedModel::new(UNet2DConditionModel::from_dir(Path::new(GOLDEN).join("tiny-sd/unet"), device).unwrap(), 0)
}

fn tensor<const D: usize>(sd: &StateDict, key: &str, device: &Device) -> Tensor<D> {
    let (values, shape) = sd.f32(key).unwrap();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// max |a - b| / max |b|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    diff / want.iter().map(|b| b.abs()).fold(0f32, f32::max)
}

/// The UNet output on a golden file's inputs.
fn run(m: &UNet2DConditionModel, g: &StateDict) -> Vec<f32> {
    let device = cpu();
    let t: Tensor<1> = tensor(g, "timestep", &device);
    values(m.forward(tensor(g, "sample", &device), t, tensor(g, "encoder_hidden_states", &device)))
}

/// Checks the adapted output, the base output with the adapter disabled, and the merged output.
fn check(m: &mut AdaptedModel<UNet2DConditionModel>, g: &StateDict, key: &str, label: &str) {
    let want = g.f32(key).unwrap().0;
    let unmerged = run(&m.model, g);
    let err = rel_err(&unmerged, &want);
    let base = m.with_disabled(|b| run(b, g));
    let base_err = rel_err(&base, &g.f32("out_base").unwrap().0);
    m.merge(&[]).unwrap();
    let merged = run(&m.model, g);
    m.unmerge();
    let merged_err = rel_err(&merged, &want);
    let vs_unmerged = rel_err(&merged, &unmerged);
    println!("{label}: {key} rel {err:.2e}; base rel {base_err:.2e}; merged rel {merged_err:.2e} (vs unmerged {vs_unmerged:.2e})");
    assert!(err <= 1e-4, "{label}: {err}");
    assert!(base_err <= 1e-4, "{label}: base {base_err}");
    assert!(merged_err <= 1e-4 && vs_unmerged <= 1e-4, "{label}: merged {merged_err}, vs unmerged {vs_unmerged}");
    assert!(rel_err(&base, &want) > 0.03, "the adapter changes the output (LoRA by 31%, IA3 by 6.7%)");
}

#[test]
fn lora_from_peft_diffusers_and_peftkeys_files_matches_golden() {
    let g = read_safetensors(tensors("unet_lora.safetensors")).unwrap();
    let mut m = unet(&cpu());
    peft::load(&mut m, tensors("lora_peft"), "lora").unwrap();
    check(&mut m, &g, "out_lora", "lora_peft");

    for sub in ["lora_diffusers", "lora_diffusers_peftkeys"] {
        let mut m = unet(&cpu());
        let comps = lora_files::read(tensors(sub).join(lora_files::DIFFUSERS_FILE)).unwrap();
        let paths = lora_files::attach(&mut m, "lora", &comps["unet"]).unwrap();
        assert_eq!(paths.len(), 48, "6 transformer blocks x 2 attentions x 4 projections");
        check(&mut m, &g, "out_lora", sub);
    }

    // The same LoRA through a kohya file: names like `lora_unet_down_blocks_0_..._to_out_0`
    // resolve against the UNet's layer paths.
    let dir = tempfile::tempdir().unwrap();
    let kohya = dir.path().join("kohya.safetensors");
    let comp = lora_files::ComponentLora::from_adapter(&m, "lora").unwrap();
    lora_files::save_kohya(&kohya, &[("unet", &comp)], Some("stable-diffusion-v1/lora")).unwrap();
    assert!(read_safetensors(&kohya).unwrap().tensors.contains_key("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha"));
    let mut m = unet(&cpu());
    lora_files::attach(&mut m, "lora", &lora_files::read(&kohya).unwrap()["unet"]).unwrap();
    check(&mut m, &g, "out_lora", "kohya (written by knobs)");
}

#[test]
fn ia3_from_peft_folder_and_raw_file_matches_golden() {
    let g = read_safetensors(tensors("unet_ia3.safetensors")).unwrap();
    let mut m = unet(&cpu());
    peft::load(&mut m, tensors("ia3_peft"), "ia3").unwrap();
    check(&mut m, &g, "out_ia3", "ia3_peft");

    // The raw `unet.<path>.ia3_l` file carries no config: use the PEFT folder's.
    let mut m = unet(&cpu());
    m.add_adapter("ia3", peft::read_config(tensors("ia3_peft")).unwrap()).unwrap();
    let raw = read_safetensors(tensors("ia3_raw/ia3_weights.safetensors")).unwrap();
    m.load_adapter_state_dict("ia3", &raw, "unet.").unwrap();
    m.freeze();
    check(&mut m, &g, "out_ia3", "ia3_raw");
}

#[test]
fn lora_training_step_matches_torch() {
    let g = read_safetensors(tensors("lora_train_step.safetensors")).unwrap();
    let device = cpu_autodiff();
    let mut m = unet(&device);
    peft::load(&mut m, tensors("lora_peft"), "default").unwrap();
    m.train_adapter("default").unwrap();
    let name = |p: &str| strip_adapter_name(p, "default");

    let mut before = 0f32;
    m.model.for_each_param(|p, t| {
        if t.is_trainable() {
            before = before.max(rel_err(&values(t.flat()), &g.f32(&format!("param_before.{}", name(p))).unwrap().0));
        }
    });
    assert_eq!(before, 0.0, "the PEFT folder holds the golden's starting LoRA");

    let ddpm = DdpmScheduler::from_dir(Path::new(GOLDEN).join("tiny-sd/scheduler")).unwrap();
    let ts: Vec<i64> = g.get("timesteps").unwrap().clone().convert::<i64>().try_into_vec().unwrap();
    let (latents, noise): (Tensor<4>, Tensor<4>) = (tensor(&g, "latents", &device), tensor(&g, "noise", &device));
    let noisy = ddpm.add_noise(latents, noise.clone(), &ts).unwrap();
    let noisy_err = rel_err(&values(noisy.clone()), &g.f32("noisy_latents").unwrap().0);
    let t = Tensor::<1>::from_data(TensorData::new(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), [ts.len()]), &device);
    let pred = m.model.forward(noisy, t, tensor(&g, "encoder_hidden_states", &device));
    let pred_err = rel_err(&values(pred.clone()), &g.f32("model_pred").unwrap().0);
    let loss = (pred - noise).powi_scalar(2).mean();
    let loss_err = rel_err(&values(loss.clone()), &g.f32("loss").unwrap().0);

    let grads = collect_grads(&m.model, &loss.backward());
    assert_eq!(grads.len(), 96);
    let (mut grad_err, mut worst) = (0f32, String::new());
    for (p, grad) in &grads {
        let e = rel_err(&values(grad.clone()), &g.f32(&format!("grad.{}", name(p))).unwrap().0);
        if e > grad_err {
            (grad_err, worst) = (e, name(p));
        }
    }
    let config = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 };
    AdamW::new(config).step(&mut m.model, &grads, |_| config.lr);
    let mut after_err = 0f32;
    m.model.for_each_param(|p, t| {
        if t.is_trainable() {
            after_err = after_err.max(rel_err(&values(t.flat()), &g.f32(&format!("param_after.{}", name(p))).unwrap().0));
        }
    });
    println!("train step rel errors: noisy {noisy_err:.2e}, model_pred {pred_err:.2e}, loss {loss_err:.2e}, worst grad {grad_err:.2e} ({worst}), param_after {after_err:.2e}");
    assert!(noisy_err <= 1e-6 && pred_err <= 1e-4 && loss_err <= 1e-4, "{noisy_err} {pred_err} {loss_err}");
    assert!(grad_err <= 1e-4, "{worst}: {grad_err}");
    assert!(after_err <= 1e-4, "{after_err}");
}
