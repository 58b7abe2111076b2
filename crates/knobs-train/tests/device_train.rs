//! `knobs train` on a backend other than the CPU one: a LoRA run on tiny-sd on the device
//! named by `KNOBS_TEST_DEVICE` (as `--device` spells it; default `wgpu:cpu`, lavapipe) follows
//! the CPU run's loss curve and lands on the same LoRA weights, through everything the trainer
//! does there (VAE encode, text encoder, UNet, backward, clipping, AdamW, checkpoints, samples,
//! files). Built only with a GPU feature:
//! `cargo test -p knobs-train --features wgpu --test device_train` (scripts/gpu-check.sh runs
//! it with `cuda`; `--profile parity --features wgpu-untuned` runs it on lavapipe in minutes).
#![cfg(any(feature = "wgpu", feature = "wgpu-untuned", feature = "vulkan", feature = "cuda"))]
use std::path::{Path, PathBuf};

use knobs_nn::device::Target;
use knobs_nn::io::read_safetensors;
use knobs_train::finetune::config::TrainConfig;
use knobs_train::finetune::{Method, trainer};

fn config(out: &Path) -> TrainConfig {
    let mut cfg = TrainConfig { method: Method::parse("lora").unwrap(), model: Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/tiny-sd"))), out: out.to_path_buf(), ..Default::default() };
    cfg.data.concept = Some("striped-star".into());
    cfg.optim.max_train_steps = Some(4);
    cfg.optim.train_batch_size = 2;
    cfg.run.checkpointing_steps = 2;
    cfg.run.num_samples = 1;
    cfg.run.sample_steps = 2;
    cfg
}

fn run_on(target: Target, out: &Path) -> Vec<f64> {
    knobs_nn::device::select(target).unwrap_or_else(|e| panic!("{e}"));
    let summary = trainer::run(&config(out), &mut |_| {}).unwrap();
    assert_eq!(summary.steps, 4);
    std::fs::read_to_string(out.join("loss.csv")).unwrap().lines().skip(1).map(|l| l.split_once(',').unwrap().1.parse().unwrap()).collect()
}

#[test]
fn a_lora_run_on_the_device_follows_the_cpu_run() {
    let target: Target = std::env::var("KNOBS_TEST_DEVICE").unwrap_or_else(|_| "wgpu:cpu".into()).parse().expect("KNOBS_TEST_DEVICE");
    let tmp = tempfile::tempdir().unwrap();
    let cpu = run_on(Target::Cpu, &tmp.path().join("cpu"));
    let dev = run_on(target, &tmp.path().join("device"));
    knobs_nn::device::select(Target::Cpu).unwrap();
    let loss_err = cpu.iter().zip(&dev).map(|(c, d)| ((c - d) / c).abs()).fold(0.0, f64::max);
    let read = |dir: &str| read_safetensors(tmp.path().join(dir).join("pytorch_lora_weights.safetensors")).unwrap();
    let (a, b) = (read("cpu"), read("device"));
    // Against the file's largest value: AdamW moves a value by about the learning rate
    // whatever its gradient's size, so rounding-level gradient differences show per value.
    let weight_err = a.relative_distance(&b).unwrap();
    println!("{target}: losses {dev:?} against the CPU's {cpu:?}; worst loss difference {loss_err:.2e}, worst LoRA weight difference {weight_err:.2e}");
    assert!(loss_err < 1e-3, "loss curves differ by {loss_err}");
    assert!(weight_err < 1e-3, "LoRA weights differ by {weight_err}");
    assert!(tmp.path().join("device/samples/0.png").exists());
}
