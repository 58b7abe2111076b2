//! `knobs train` on the tiny random SDXL pipeline (`knobs-diffusion/tests/fixtures/tiny-sdxl`):
//! every method trains with SDXL's conditioning (both encoders, pooled embedding, time ids from
//! each image's size and crop), and what it writes loads back into `knobs generate` to give
//! exactly the samples the trained pipeline drew.
mod common;

use std::path::Path;

use common::{fail, ok, s};
use knobs_nn::io::read_safetensors;

const TINY_SDXL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../knobs-diffusion/tests/fixtures/tiny-sdxl");

fn train(out: &Path, method: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["train", "--model", TINY_SDXL, "--method", method, "--concept", "striped-star", "--out", s(out), "--json",
        "--max-train-steps", "2", "--num-samples", "1", "--random-crop", "--random-flip"];
    args.extend_from_slice(extra);
    let stdout = ok(&args);
    serde_json::from_str(stdout.lines().last().unwrap()).expect("--json prints one JSON object")
}

/// `generate` on `model` with `extra` (the trained files) reproduces `out`'s sample 0.
fn reproduces_sample(model: &str, out: &Path, extra: &[&str], what: &str) {
    let png = out.join(format!("gen-{}.png", what.replace(['/', ' '], "_")));
    let mut args = vec!["generate", "--model", model, "--prompt", "a sks star", "--steps", "25", "--guidance", "5", "--seed", "0", "--out", s(&png)];
    args.extend_from_slice(extra);
    ok(&args);
    let sample = std::fs::read(out.join("samples/0.png")).unwrap();
    assert!(std::fs::read(&png).unwrap() == sample, "{what}: generate with the saved files must reproduce the training sample");
}

#[test]
fn every_adapter_method_trains_sdxl_and_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |m: &str| tmp.path().join(m);
    // LoRA on the UNet and both text encoders: three PEFT folders, one diffusers file.
    let out = dir("lora");
    let summary = train(&out, "lora", &["--train-text-encoder", "--rank", "2"]);
    assert!(summary["trainable_params"].as_u64().unwrap() > 0);
    for c in ["unet_lora", "text_encoder_lora", "text_encoder_2_lora"] {
        assert!(out.join(c).join("adapter_model.safetensors").exists(), "{c}");
    }
    let file = read_safetensors(out.join("pytorch_lora_weights.safetensors")).unwrap();
    assert!(file.tensors.keys().any(|k| k.starts_with("text_encoder_2.")));
    reproduces_sample(TINY_SDXL, &out, &["--lora", s(&out)], "lora folders");
    reproduces_sample(TINY_SDXL, &out, &["--lora", s(&out.join("pytorch_lora_weights.safetensors"))], "lora file");

    // kohya's SDXL layout: SGM block names and te1 / te2.
    let out = dir("kohya");
    train(&out, "lora", &["--train-text-encoder", "--format", "kohya"]);
    let file = read_safetensors(out.join("lora_kohya.safetensors")).unwrap();
    for prefix in ["lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_te1_", "lora_te2_"] {
        assert!(file.tensors.keys().any(|k| k.starts_with(prefix)), "{prefix}");
    }
    reproduces_sample(TINY_SDXL, &out, &["--lora", s(&out.join("lora_kohya.safetensors"))], "kohya");

    for (method, extra) in [
        ("ia3", &[][..]),
        ("dora", &[][..]),
        ("loha", &["--format", "kohya"][..]),
        ("lokr", &[][..]),
        ("oft", &["--oft-block-size", "4"][..]),
    ] {
        let out = dir(method);
        train(&out, method, extra);
        reproduces_sample(TINY_SDXL, &out, &["--lora", s(&out)], method);
    }
    let loha = dir("loha").join("lycoris_kohya.safetensors");
    assert!(read_safetensors(&loha).unwrap().tensors.keys().any(|k| k.starts_with("lora_unet_input_blocks_")));
    reproduces_sample(TINY_SDXL, &dir("loha"), &["--lora", s(&loha)], "loha lycoris file");

    let out = dir("hypernetwork");
    train(&out, "hypernetwork", &[]);
    reproduces_sample(TINY_SDXL, &out, &["--hypernetwork", s(&out.join("hypernetwork.safetensors"))], "hypernetwork");

    // HyperDreamBooth: a hypernetwork pretrained on the SDXL model predicts the LoRA, then
    // fast fine-tuning refines it.
    let hyper = dir("hyper");
    ok(&["hyper", "pretrain", "--model", TINY_SDXL, "--out", s(&hyper), "--steps", "2", "--num-concepts", "2", "--images-per-concept", "2", "--batch", "2"]);
    let out = dir("hyper-lora");
    train(&out, "hyper-lora", &["--hypernetwork-dir", s(&hyper)]);
    reproduces_sample(TINY_SDXL, &out, &["--lora", s(&out.join("pytorch_lora_weights.safetensors"))], "hyper-lora");
}

/// Textual inversion learns one row per encoder (saved as `clip_l` / `clip_g`); pivotal tuning
/// adds a LoRA; DreamBooth with prior preservation and both text encoders writes a model.
#[test]
fn token_methods_and_dreambooth_train_sdxl_and_load_back() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ti");
    let summary = train(&out, "textual-inversion", &["--initializer-token", "star", "--a1111"]);
    assert_eq!(summary["trainable_params"], 16 + 32, "one row of each encoder's width");
    for f in ["learned_embeds.safetensors", "sks.safetensors"] {
        let file = read_safetensors(out.join(f)).unwrap();
        assert_eq!(file.tensors.keys().collect::<Vec<_>>(), ["clip_g", "clip_l"], "{f}");
        reproduces_sample(TINY_SDXL, &out, &["--embedding", s(&out.join(f))], f);
    }

    let out = tmp.path().join("pivotal");
    train(&out, "pivotal", &["--initializer-token", "star", "--train-text-encoder"]);
    reproduces_sample(TINY_SDXL, &out, &["--lora", s(&out), "--embedding", s(&out.join("learned_embeds.safetensors"))], "pivotal");

    let out = tmp.path().join("dreambooth");
    let classes = tmp.path().join("classes");
    train(&out, "dreambooth", &["--train-text-encoder", "--class-prompt", "a star", "--num-class-images", "2", "--class-dir", s(&classes), "--train-batch-size", "1"]);
    assert_eq!(std::fs::read_dir(&classes).unwrap().count(), 2);
    let model = out.join("model");
    for f in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "tokenizer_2/tokenizer.json"] {
        assert!(model.join(f).exists(), "{f}");
    }
    reproduces_sample(s(&model), &out, &[], "dreambooth");

    // An SD-1.x embedding cannot go into SDXL, and an SDXL one not into SD-1.x.
    let e = fail(&["generate", "--model", s(common::tiny_model()), "--prompt", "x", "--steps", "1", "--embedding", s(&out.join("../ti/learned_embeds.safetensors")), "--out", s(&tmp.path().join("x.png"))]);
    assert!(e.contains("SDXL"), "{e}");
}
