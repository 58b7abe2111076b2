//! `knobs generate --lora` and `--embedding` on the tiny model with the golden adapter files.
use std::process::{Command, Output};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

fn knobs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knobs")).args(args).output().expect("the knobs binary runs")
}

/// Generates 2 DDIM steps with `extra` flags and returns the PNG's pixels.
fn pixels(dir: &std::path::Path, name: &str, prompt: &str, extra: &[&str]) -> Vec<u8> {
    let out = dir.join(format!("{name}.png"));
    let model = format!("{GOLDEN}/tiny-sd");
    let mut args = vec!["generate", "--model", &model, "--prompt", prompt, "--steps", "2", "--seed", "3", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = knobs(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    image::open(&out).unwrap().to_rgb8().into_raw()
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.len() as f64
}

#[test]
fn lora_files_of_every_format_apply_with_their_scale() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "a photo of a sks dog";
    let base = pixels(dir.path(), "base", prompt, &[]);
    let peft = format!("{GOLDEN}/tensors/lora_peft");
    let diffusers = format!("{GOLDEN}/tensors/lora_diffusers/pytorch_lora_weights.safetensors");
    let with_peft = pixels(dir.path(), "peft", prompt, &["--lora", &peft]);
    let with_diffusers = pixels(dir.path(), "diffusers", prompt, &["--lora", &diffusers]);
    assert!(mean_abs_diff(&with_peft, &base) > 1.0, "the golden LoRA changes the UNet output by 31%");
    assert!(mean_abs_diff(&with_peft, &with_diffusers) < 0.01, "the same LoRA in two formats gives the same image");
    let zero = pixels(dir.path(), "zero", prompt, &["--lora", &format!("{peft}:0")]);
    assert_eq!(zero, base, "scale 0 is the base model");
    let half = pixels(dir.path(), "half", prompt, &["--lora", &format!("{peft}:0.5")]);
    assert!(mean_abs_diff(&half, &base) > 0.1 && mean_abs_diff(&half, &with_peft) > 0.1);
    // Two adapters together: the same LoRA twice at 0.5 each equals it once at 1.
    let twice = pixels(dir.path(), "twice", prompt, &["--lora", &format!("{peft}:0.5"), "--lora", &format!("{diffusers}:0.5")]);
    assert!(mean_abs_diff(&twice, &with_peft) < 0.05, "{}", mean_abs_diff(&twice, &with_peft));
}

#[test]
fn embeddings_add_tokens_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let emb = dir.path().join("learned_embeds.safetensors");
    let tokens = std::collections::BTreeMap::from([(
        "<toy>".to_string(),
        knobs_nn::burn::tensor::TensorData::new((0..64).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<f32>>(), [2, 32]),
    )]);
    knobs_nn::io::write_safetensors(&emb, &tokens, &Default::default()).unwrap();
    let plain = pixels(dir.path(), "plain", "a photo of a dog", &[]);
    let with = pixels(dir.path(), "with", "a photo of a <toy> dog", &["--embedding", emb.to_str().unwrap()]);
    assert!(mean_abs_diff(&plain, &with) > 0.1);

    let wide = dir.path().join("wide.safetensors");
    let tokens = std::collections::BTreeMap::from([("<w>".to_string(), knobs_nn::burn::tensor::TensorData::new(vec![0f32; 768], [1, 768]))]);
    knobs_nn::io::write_safetensors(&wide, &tokens, &Default::default()).unwrap();
    let model = format!("{GOLDEN}/tiny-sd");
    let o = knobs(&["generate", "--model", &model, "--prompt", "x", "--steps", "1", "--embedding", wide.to_str().unwrap(), "--out", "/dev/null"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("wide.safetensors") && err.contains("768"), "{err}");

    let o = knobs(&["generate", "--model", &model, "--prompt", "x", "--steps", "1", "--lora", "/no/such/lora.safetensors", "--out", "/dev/null"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("/no/such/lora.safetensors"), "{err}");
}
