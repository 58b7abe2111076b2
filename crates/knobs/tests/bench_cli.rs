//! `knobs bench` on the golden tiny SD pipeline: every mode measured in its own process, with
//! the trainable sizes each method implies, and bad input named.
mod common;

use common::{fail, ok};

const TINY_SD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/tiny-sd");

#[test]
fn every_mode_is_timed_with_its_memory_and_trainable_size() {
    let out = ok(&["--threads", "1", "bench", "--model", TINY_SD, "--resolution", "32", "--batch", "1", "--steps", "2", "--warmup", "0", "--json"]);
    let results: Vec<serde_json::Value> = serde_json::from_str(&out).expect("--json prints a JSON array");
    let modes: Vec<&str> = results.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["full", "lora", "ia3", "ti", "generate"]);
    let weights: u64 = ["unet", "vae", "text_encoder"]
        .iter()
        .map(|c| std::fs::metadata(format!("{TINY_SD}/{c}/diffusion_pytorch_model.safetensors")).or_else(|_| std::fs::metadata(format!("{TINY_SD}/{c}/model.safetensors"))).unwrap().len())
        .sum();
    let trainable = |mode: &str| results.iter().find(|m| m["mode"] == mode).unwrap()["trainable_params"].as_u64().unwrap();
    for m in &results {
        let median = m["median_s"].as_f64().unwrap();
        assert!(median > 0.0 && median.is_finite(), "{m}");
        assert!(m["min_s"].as_f64().unwrap() <= median && m["steps"] == 2, "{m}");
        let times: Vec<f64> = m["times_s"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
        assert_eq!(times.len(), 2, "each step's seconds: {m}");
        assert_eq!(times.iter().cloned().fold(f64::INFINITY, f64::min), m["min_s"].as_f64().unwrap(), "{m}");
        assert_eq!(m["threads"], 1, "--threads reaches each mode's process");
        assert_eq!(m["device"], "cpu", "--device reaches each mode's process");
        assert!(m["peak_rss_bytes"].as_u64().unwrap() > 10 << 20, "{m}");
        assert_eq!(m["model_bytes"].as_u64().unwrap(), weights);
        assert_eq!(m["resolution"], 32);
        // A training step is split into its parts (they add up to it); generation is not.
        let phases = m["phases"].as_array().unwrap();
        if m["mode"] == "generate" {
            assert!(phases.is_empty(), "{m}");
        } else {
            let names: Vec<&str> = phases.iter().map(|p| p[0].as_str().unwrap()).collect();
            assert_eq!(names, ["vae_encode", "encode", "unet_forward", "forward", "backward", "optimizer"], "{m}");
            let secs: Vec<f64> = phases.iter().map(|p| p[1].as_f64().unwrap()).collect();
            assert!(secs.iter().all(|s| *s > 0.0 && s.is_finite()), "{m}");
            // Medians of parts need not add up exactly, hence the slack.
            assert!((secs[1] + secs[2] - secs[3]).abs() < 0.5 * secs[3], "the forward is its two halves: {m}");
            let step: f64 = secs[3..].iter().sum();
            assert!((step - m["mean_s"].as_f64().unwrap()).abs() < 0.5 * step, "the step's parts add up to it: {m}");
        }
    }
    // Full fine-tune: the whole UNet (tiny-sd's 1,106,212 values); adapters a small part of it.
    assert_eq!(trainable("full"), 1_106_212);
    assert!(trainable("lora") > 0 && trainable("lora") < trainable("full") / 10);
    assert!(trainable("ia3") > 0 && trainable("ia3") < trainable("lora"));
    // Textual inversion: one new row of the 32-wide token embedding.
    assert_eq!(trainable("ti"), 32);
    assert_eq!(trainable("generate"), 0);
}

/// `--gradient-checkpointing` and `--weights-dtype` reach the mode's process and its report,
/// and a precision it does not know is named.
#[test]
fn checkpointing_and_weight_precision_are_timed_as_asked() {
    let out = ok(&["--threads", "1", "bench", "--model", TINY_SD, "--resolution", "32", "--batch", "1", "--steps", "1", "--warmup", "0", "--modes", "lora,generate", "--gradient-checkpointing", "--weights-dtype", "f16", "--json"]);
    let results: Vec<serde_json::Value> = serde_json::from_str(&out).expect("--json prints a JSON array");
    assert_eq!(results.len(), 2);
    for m in &results {
        assert_eq!(m["weights_dtype"], "f16", "{m}");
        assert!(m["median_s"].as_f64().unwrap() > 0.0, "{m}");
    }
    assert_eq!(results[0]["gradient_checkpointing"], true, "training steps are checkpointed");
    // Resident memory after each part of the last training step, within the peak.
    let resident = results[0]["resident_after"].as_array().unwrap();
    let names: Vec<&str> = resident.iter().map(|p| p[0].as_str().unwrap()).collect();
    assert_eq!(names, ["encode", "forward", "backward", "optimizer"]);
    let peak = results[0]["peak_rss_bytes"].as_u64().unwrap();
    assert!(resident.iter().all(|p| (1..=peak).contains(&p[1].as_u64().unwrap())), "{resident:?} against the peak {peak}");
    assert!(results[1]["resident_after"].as_array().unwrap().is_empty(), "generation has no training parts");
    assert_eq!(results[1]["gradient_checkpointing"], false, "generation has no backward pass");
    let err = fail(&["bench", "--model", TINY_SD, "--weights-dtype", "f8"]);
    assert!(err.contains("--weights-dtype") && err.contains("f8"), "{err}");
}

#[test]
fn bad_modes_and_thread_counts_are_named() {
    let err = fail(&["bench", "--model", TINY_SD, "--modes", "lora,warp"]);
    assert!(err.contains("--modes") && err.contains("warp"), "{err}");
    let err = fail(&["--threads", "0", "bench", "--model", TINY_SD]);
    assert!(err.contains("--threads"), "{err}");
    let err = fail(&["bench", "--model", TINY_SD, "--modes", "generate", "--steps", "0"]);
    assert!(err.contains("--steps"), "{err}");
}

/// `--device` is parsed and checked before any work: a backend this build lacks is named with
/// the cargo feature that brings it, a misspelt device with the accepted forms.
#[test]
fn devices_not_built_in_or_misspelt_are_named() {
    if !cfg!(feature = "cuda") {
        let err = fail(&["--device", "cuda:1", "generate", "--prompt", "a red star", "--out", "never-written.png"]);
        assert!(err.contains("--device cuda:1") && err.contains("`cuda` feature") && err.contains("compiled in: cpu"), "{err}");
    }
    let err = fail(&["--device", "tpu", "bench", "--model", TINY_SD]);
    assert!(err.contains("--device") && err.contains("cuda[:N]"), "{err}");
}

/// `KNOBS_GPU_CONV` (which convolutions off the CPU run as one matrix product) is checked with
/// the device, on every device: a value it does not know is named before any work.
#[test]
fn an_unknown_gpu_convolution_mode_is_named() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knobs"))
        .env("KNOBS_GPU_CONV", "fastest")
        .args(["generate", "--prompt", "a red star", "--out", "never-written.png"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("KNOBS_GPU_CONV=\"fastest\"") && err.contains("auto, matmul or burn"), "{err}");
    assert!(!std::path::Path::new("never-written.png").exists());
}
