//! `knobs train --method hypernetwork` and `knobs generate --hypernetwork` end to end on a
//! tiny model: the file carries A1111's keys and settings, generate reproduces the training
//! samples from it, strength 0 is the base model, and bad input names the flag or file.
mod common;

use std::path::Path;

use common::{fail, ok, s, tiny_model};
use knobs_nn::io::read_safetensors;

/// The images of `knobs generate` for "a sks star", seed 0.
fn generate(out: &Path, images: usize, steps: usize, extra: &[&str]) -> Vec<Vec<u8>> {
    let (n, steps) = (images.to_string(), steps.to_string());
    let mut args = vec!["generate", "--model", s(tiny_model()), "--prompt", "a sks star", "--steps", &steps, "--guidance", "5", "--seed", "0", "--num-images", &n, "--out", s(out)];
    args.extend_from_slice(extra);
    ok(&args);
    if images == 1 {
        return vec![std::fs::read(out).unwrap()];
    }
    (0..images).map(|i| std::fs::read(out.with_file_name(format!("{}-{i}.png", out.file_stem().unwrap().to_str().unwrap()))).unwrap()).collect()
}

#[test]
fn trained_hypernetwork_reloads_in_generate_with_its_strength() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hn");
    let stdout = ok(&[
        "train", "--model", s(tiny_model()), "--method", "hypernetwork", "--concept", "striped-star", "--out", s(&out), "--json",
        "--max-train-steps", "2", "--hypernetwork-layers", "1,2,1", "--hypernetwork-activation", "tanh", "--hypernetwork-dropout", "0.1",
    ]);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["method"], "hypernetwork");
    let file = out.join("hypernetwork.safetensors");
    assert_eq!(summary["outputs"], serde_json::json!([s(&file)]));

    // A1111's keys for the context widths of the built-in UNet (64 and 96 in self-attention,
    // 64 in cross-attention too), and its settings in the metadata.
    let sd = read_safetensors(&file).unwrap();
    assert_eq!(sd.metadata["enable_sizes"], "[64,96]");
    assert_eq!(sd.metadata["activation_func"], "tanh");
    assert_eq!(sd.metadata["layer_structure"], "[1.0,2.0,1.0]");
    assert_eq!(sd.metadata["dropout_structure"], "[0.0,0.1,0.0]");
    assert_eq!(sd.tensors.len(), 2 * 2 * 4);
    assert_eq!(sd.tensors["64.1.linear.0.weight"].shape().as_slice(), [128, 64]);
    // Linear, Tanh, Dropout, Linear: the output layer is Sequential index 3.
    assert_eq!(sd.tensors["96.0.linear.3.weight"].shape().as_slice(), [96, 192]);
    let params: usize = [64, 96].iter().map(|w| 2 * (4 * w * w + 3 * w)).sum();
    assert_eq!(summary["trainable_params"], params);

    // What the trainer sampled (4 images, 25 steps) is what generate makes from the file.
    let on = generate(&tmp.path().join("on.png"), 4, 25, &["--hypernetwork", s(&file)]);
    for (i, img) in on.iter().enumerate() {
        assert!(*img == std::fs::read(out.join(format!("samples/{i}.png"))).unwrap(), "generate with the saved hypernetwork must reproduce sample {i}");
    }
    let quick = |name: &str, extra: &[&str]| generate(&tmp.path().join(name), 1, 6, extra);
    let base = quick("base.png", &[]);
    assert!(quick("off.png", &["--hypernetwork", &format!("{}:0", s(&file))]) == base, "--hypernetwork F:0 must give the base model's image");
    assert!(quick("one.png", &["--hypernetwork", &format!("{}:1", s(&file))]) != base, "the hypernetwork at strength 1 changed nothing");
}

#[test]
fn bad_input_names_the_flag_or_file() {
    let tmp = tempfile::tempdir().unwrap();
    let o = s(tmp.path());
    let m = s(tiny_model());
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--model", m, "--method", "hypernetwork", "--concept", "striped-star", "--out", o, "--max-train-steps", "1"];
        args.extend_from_slice(extra);
        fail(&args)
    };
    let e = train(&["--hypernetwork-layers", "2,2,1"]);
    assert!(e.contains("--hypernetwork-layers") && e.contains("start and end with 1"), "{e}");
    let e = train(&["--hypernetwork-activation", "prelu"]);
    assert!(e.contains("--hypernetwork-activation") && e.contains("prelu") && e.contains("relu"), "{e}");
    let e = train(&["--hypernetwork-dropout", "0,0.2,0.3"]);
    assert!(e.contains("--hypernetwork-dropout"), "{e}");
    let e = train(&["--hypernetwork-widths", "64,70"]);
    assert!(e.contains("--hypernetwork-widths") && e.contains("width 70") && e.contains("[64, 96]"), "{e}");

    let pt = tmp.path().join("style.pt");
    std::fs::write(&pt, b"\x80\x02}q\x00.").unwrap();
    let generate_with = |spec: &str| fail(&["generate", "--model", m, "--prompt", "a star", "--steps", "1", "--hypernetwork", spec, "--out", &format!("{o}/x.png")]);
    let e = generate_with(s(&pt));
    assert!(e.contains("--hypernetwork") && e.contains("style.pt") && e.contains("pickle") && e.contains("safetensors"), "{e}");
    let e = generate_with(&format!("{o}/missing.safetensors:0.5"));
    assert!(e.contains("missing.safetensors") && e.contains("cannot read"), "{e}");
}
