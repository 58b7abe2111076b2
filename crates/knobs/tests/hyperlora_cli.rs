//! HyperLoRA end to end on the tiny model: `knobs hyper pretrain` pauses and resumes to the
//! same bytes, `knobs train --method hyper-lora` writes a LoRA that `knobs generate --lora`
//! reproduces the samples with and that equals the hypernetwork's prediction from the code
//! file, and bad flags are named.
mod common;

use std::path::{Path, PathBuf};

use common::{fail, ok, s, tiny_model};
use knobs_nn::io::read_safetensors;

fn pretrain_args(out: &Path, steps: &str) -> Vec<String> {
    ["hyper", "pretrain", "--model", s(tiny_model()), "--out", s(out), "--steps", steps, "--num-concepts", "3", "--images-per-concept", "2", "--batch", "1", "--rank", "1", "--aux", "16", "--variational", "--image-prob", "0.5"]
        .map(String::from)
        .to_vec()
}

fn run(args: &[String]) -> String {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs)
}

/// A hypernetwork pretrained for 3 steps, once per test binary.
fn hyper() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| common::cached_dir("hyper-3-steps", |dir| {
        run(&pretrain_args(&dir.join("hyper"), "3"));
    })
    .join("hyper"))
}

#[test]
fn hyper_pretrain_paused_and_resumed_equals_uninterrupted() {
    let whole = hyper();
    let tmp = tempfile::tempdir().unwrap();
    // More steps later: a finished 2-step run continues to 3.
    let grown = tmp.path().join("grown");
    run(&pretrain_args(&grown, "2"));
    assert!(grown.join("hyperlora/hyperlora.safetensors").exists());
    run(&pretrain_args(&grown, "3"));
    // Paused by the clock after every step, then run again until done.
    let paused = tmp.path().join("paused");
    let mut args = pretrain_args(&paused, "3");
    args.extend(["--max-minutes".to_string(), "0.000001".to_string()]);
    let mut runs = 0;
    while !run(&args).contains("hypernetwork written") {
        runs += 1;
        assert!(runs < 5, "the paused run never finished");
    }
    assert_eq!(runs, 2, "each run should stop after one step");
    for dir in [&grown, &paused] {
        for file in ["hyperlora/hyperlora.safetensors", "hyperlora/hyperlora_config.json", "loss.csv"] {
            assert!(std::fs::read(whole.join(file)).unwrap() == std::fs::read(dir.join(file)).unwrap(), "{file} of {} differs", dir.display());
        }
    }
    assert_eq!(std::fs::read_to_string(whole.join("loss.csv")).unwrap().lines().count(), 4);
    // The network moved away from its start (the head starts at zero).
    let sd = read_safetensors(whole.join("hyperlora/hyperlora.safetensors")).unwrap();
    let (head, _) = sd.f32("head.weight").unwrap();
    assert!(head.iter().any(|v| *v != 0.0), "pretraining did not change the head");
    // Other settings in the same folder are refused.
    let mut other = pretrain_args(&grown, "4");
    other.extend(["--hidden".to_string(), "32".to_string()]);
    let refs: Vec<&str> = other.iter().map(String::as_str).collect();
    let err = fail(&refs);
    assert!(err.contains("checkpoint was made with config"), "{err}");
}

fn train(out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["train", "--model", s(tiny_model()), "--method", "hyper-lora", "--hypernetwork-dir", s(hyper()), "--concept", "striped-star", "--out", s(out), "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(ok(&args).lines().last().unwrap()).unwrap()
}

fn assert_generate_reproduces_samples(out: &Path, tmp: &Path) {
    let generated = tmp.join("gen.png");
    ok(&["generate", "--model", s(tiny_model()), "--lora", s(&out.join("pytorch_lora_weights.safetensors")), "--prompt", "a sks star",
        "--steps", "25", "--guidance", "5", "--seed", "0", "--num-images", "4", "--out", s(&generated)]);
    for i in 0..4 {
        let a = std::fs::read(tmp.join(format!("gen-{i}.png"))).unwrap();
        let b = std::fs::read(out.join(format!("samples/{i}.png"))).unwrap();
        assert!(a == b, "generate with the saved LoRA must reproduce sample {i} of {}", out.display());
    }
}

#[test]
fn zero_shot_lora_is_the_prediction_and_reloads_in_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("zero");
    let summary = train(&out, &[]);
    assert_eq!(summary["method"], "hyper-lora");
    assert_eq!(summary["steps"], 0);
    assert_eq!(summary["lora_rank"], 1);
    assert!(summary["code_bytes"].as_u64().unwrap() * 4 < summary["lora_bytes"].as_u64().unwrap(), "{summary}");
    assert_generate_reproduces_samples(&out, tmp.path());
    // The file holds exactly what the hypernetwork predicts from the stored code.
    let predicted = knobs_train::hyperlora::lora_from_code(&out.join("hyperlora_code.safetensors"), hyper()).unwrap();
    let file = read_safetensors(out.join("pytorch_lora_weights.safetensors")).unwrap();
    let peft = read_safetensors(out.join("unet_lora/adapter_model.safetensors")).unwrap();
    assert!(predicted.len() > 4);
    let mut b_nonzero = false;
    for (path, a, b) in &predicted {
        let a: Vec<f32> = a.clone().into_data().try_into_vec().unwrap();
        let b: Vec<f32> = b.clone().into_data().try_into_vec().unwrap();
        b_nonzero |= b.iter().any(|v| *v != 0.0);
        assert_eq!(file.f32(&format!("unet.{path}.lora.down.weight")).unwrap().0, a, "{path}");
        assert_eq!(file.f32(&format!("unet.{path}.lora.up.weight")).unwrap().0, b, "{path}");
        assert_eq!(peft.f32(&format!("base_model.model.{path}.lora_B.weight")).unwrap().0, b, "{path}");
    }
    assert!(b_nonzero, "after pretraining the predicted LoRA should not be zero");
}

#[test]
fn rank_relaxed_fine_tuning_adds_rank_and_reloads_in_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("relaxed");
    let summary = train(&out, &["--hyper-code-steps", "2", "--max-train-steps", "2", "--rank", "2"]);
    assert_eq!(summary["steps"], 2);
    assert_eq!(summary["code_steps"], 2);
    assert!(summary["code_loss"].as_f64().unwrap().is_finite());
    // The first rank of the combined LoRA is the prediction from the stored (optimised) code.
    let predicted = knobs_train::hyperlora::lora_from_code(&out.join("hyperlora_code.safetensors"), hyper()).unwrap();
    let file = read_safetensors(out.join("pytorch_lora_weights.safetensors")).unwrap();
    for (path, a, _) in &predicted {
        let a: Vec<f32> = a.clone().into_data().try_into_vec().unwrap();
        let (down, shape) = file.f32(&format!("unet.{path}.lora.down.weight")).unwrap();
        assert_eq!(shape[0], 3);
        assert_eq!(&down[..a.len()], &a[..], "{path}");
    }
    assert_eq!(summary["lora_rank"], 3);
    assert!(summary["final_loss"].as_f64().unwrap().is_finite());
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("unet_lora/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 3);
    assert_generate_reproduces_samples(&out, tmp.path());
}

#[test]
fn bad_flags_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let base = ["train", "--model", s(tiny_model()), "--concept", "striped-star", "--out", s(&out)];
    let with = |extra: &[&str]| -> String {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        fail(&a)
    };
    assert!(with(&["--method", "hyper-lora"]).contains("--hypernetwork-dir"));
    assert!(with(&["--method", "lora", "--hypernetwork-dir", "/x"]).contains("--hypernetwork-dir is not used by --method lora"));
    let err = with(&["--method", "hyper-lora", "--hypernetwork-dir", "/no/such/hyper"]);
    assert!(err.contains("--hypernetwork-dir /no/such/hyper") && err.contains("hyperlora_config.json"), "{err}");
    let err = with(&["--method", "hyper-lora", "--hypernetwork-dir", s(hyper()), "--class-prompt", "a star"]);
    assert!(err.contains("--class-prompt"), "{err}");
    let err = with(&["--method", "hyper-lora", "--hypernetwork-dir", s(hyper()), "--judge", "/no/judge"]);
    assert!(err.contains("--judge /no/judge"), "{err}");
    let p = s(&out);
    for (flag, value, want) in [("--steps", "0", "--steps"), ("--image-prob", "2", "--image-prob"), ("--rank", "0", "--rank"), ("--max-minutes", "0", "--max-minutes")] {
        let err = fail(&["hyper", "pretrain", "--model", s(tiny_model()), "--out", p, flag, value]);
        assert!(err.contains(want), "{flag} {value}: {err}");
    }
    let err = fail(&["hyper", "pretrain", "--model", "/no/model", "--out", p, "--steps", "1"]);
    assert!(err.contains("--model /no/model"), "{err}");
    let err = fail(&["hyper", "pretrain", "--model", s(tiny_model()), "--out", p, "--steps", "1", "--target-modules", "nope"]);
    assert!(err.contains("--target-modules") && err.contains("nope"), "{err}");
}
