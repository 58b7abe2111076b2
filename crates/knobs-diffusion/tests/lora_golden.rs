//! LoRA and IA3 on the real UNet against the diffusers/PEFT goldens: every file format the
//! goldens were saved in reproduces the adapted output, merging keeps it, and one LoRA
//! training step (noising, prediction, loss, gradients, AdamW) lands on PyTorch's numbers.
use std::path::{Path, PathBuf};

mod common;

use knobs_adapters::formats::{lora_files, peft};
use knobs_adapters::AdaptedModel;
use knobs_diffusion::unet::UNet2DConditionModel;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, read_safetensors};
use knobs_nn::{Device, Tensor, cpu, cpu_autodiff};

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
    let report = common::sd_goldens::lora_train_step(&cpu_autodiff(), false);
    common::sd_goldens::assert_within(&report, 1e-4);
    assert!(report[0].1 <= 1e-6, "noising: {:?}", report[0]);
}

#[test]
fn lora_training_step_with_checkpointed_blocks_matches_torch() {
    common::sd_goldens::assert_within(&common::sd_goldens::lora_train_step(&cpu_autodiff(), true), 1e-4);
}
