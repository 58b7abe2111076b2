//! The CLIP tokenizer and text encoder against transformers' golden outputs for the tiny
//! pipeline, plus gradients, error messages and added tokens.
use std::path::{Path, PathBuf};

use knobs_diffusion::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use knobs_nn::burn::tensor::{Int, TensorData};
use knobs_nn::io::read_safetensors;
use knobs_nn::{Device, Init, ModuleExt, Tensor, cpu, cpu_autodiff, gradcheck};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

fn tiny(part: &str) -> PathBuf {
    Path::new(GOLDEN).join("tiny-sd").join(part)
}

fn golden_ids(device: &Device) -> (Tensor<2, Int>, Vec<Vec<u32>>) {
    let sd = read_safetensors(Path::new(GOLDEN).join("tensors/text_encoder.safetensors")).unwrap();
    let d = sd.get("input_ids").unwrap().clone();
    let [b, s] = [d.shape()[0], d.shape()[1]];
    let v: Vec<i64> = d.convert::<i64>().try_into_vec().unwrap();
    let rows = v.chunks(s).map(|r| r.iter().map(|&x| x as u32).collect()).collect();
    (Tensor::from_data(TensorData::new(v, [b, s]), device), rows)
}

/// max |a - b| / max |b|.
fn rel_err<const D: usize>(got: Tensor<D>, key: &str) -> f32 {
    let sd = read_safetensors(Path::new(GOLDEN).join("tensors/text_encoder.safetensors")).unwrap();
    let (want, shape) = sd.f32(key).unwrap();
    assert_eq!(got.dims().to_vec(), shape, "{key}: shape");
    let got: Vec<f32> = got.into_data().convert::<f32>().try_into_vec().unwrap();
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = want.iter().map(|b| b.abs()).fold(0.0f32, f32::max);
    diff / scale
}

#[test]
fn matches_transformers_golden_outputs() {
    let device = cpu();
    let model = ClipTextModel::from_dir(tiny("text_encoder"), &device).unwrap();
    assert_eq!(model.num_params(), 51_616);
    let (ids, _) = golden_ids(&device);
    let out = model.try_forward(ids.clone()).unwrap();
    assert_eq!(out.hidden_states.len(), 3);
    let mut errs = vec![
        ("last_hidden_state", rel_err(out.last_hidden_state.clone(), "last_hidden_state")),
        ("pooler_output", rel_err(out.pooled.clone(), "pooler_output")),
    ];
    for (i, h) in out.hidden_states.iter().enumerate() {
        let key = format!("hidden_states.{i}");
        errs.push((Box::leak(key.clone().into_boxed_str()), rel_err(h.clone(), &key)));
    }
    for (key, e) in &errs {
        println!("{key}: relative error {e:.2e}");
        assert!(*e <= 1e-4, "{key}: relative error {e}");
    }
    // clip_skip 0 is the last hidden state; clip_skip 1 is the final LN of layer 1's output.
    let skip0 = model.forward_clip_skip(ids.clone(), 0).unwrap();
    assert!(rel_err(skip0, "last_hidden_state") <= 1e-4);
    let skip1 = model.forward_clip_skip(ids.clone(), 1).unwrap();
    let want1 = model.text_model.final_layer_norm.forward(out.hidden_states[1].clone());
    let d: f32 = (skip1 - want1).abs().max().into_scalar();
    assert!(d < 1e-6);
    assert!(model.forward_clip_skip(ids, 3).is_err());
}

#[test]
fn pooling_uses_first_eos_or_legacy_argmax() {
    let device = cpu();
    let mut model = ClipTextModel::from_dir(tiny("text_encoder"), &device).unwrap();
    // An added token (id 1000 > eos) before the eos: pooling at the largest id would pick it.
    model.resize_token_embeddings(1001);
    // eos 999 at positions 3 and 5 pools at 3; a row of eos after bos pools at 1.
    let ids = ClipTextModel::ids_tensor(&[vec![998, 320, 1000, 999, 5, 999], vec![998, 999, 999, 999, 999, 999]], &device).unwrap();
    let out = model.forward(ids.clone());
    let at = |row: usize, pos: usize| out.last_hidden_state.clone().slice([row..row + 1, pos..pos + 1]).reshape([1, 32]);
    let pooled = |row: usize| out.pooled.clone().slice([row..row + 1, 0..32]);
    let d0: f32 = (pooled(0) - at(0, 3)).abs().max().into_scalar();
    let d1: f32 = (pooled(1) - at(1, 1)).abs().max().into_scalar();
    assert!(d0 == 0.0 && d1 == 0.0);
    // Legacy configs (eos id 2) pool at the first occurrence of the largest id.
    model.config.eos_token_id = 2;
    let ids = ClipTextModel::ids_tensor(&[vec![5, 998, 7, 998]], &device).unwrap();
    let out = model.forward(ids);
    let want = out.last_hidden_state.clone().slice([0..1, 1..2]).reshape([1, 32]);
    let d: f32 = (out.pooled - want).abs().max().into_scalar();
    assert!(d == 0.0);
}

#[test]
fn tokenizer_reproduces_golden_ids() {
    let tok = ClipTokenizer::from_dir(tiny("tokenizer")).unwrap();
    assert_eq!(tok.model_max_length(), 77);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (998, 999, 999));
    let cat = tok.encode("a photo of a cat").unwrap();
    assert_eq!(&cat[..7], &[998, 320, 530, 516, 320, 584, 999]);
    assert!(cat[7..].iter().all(|&i| i == 999) && cat.len() == 77);
    let (_, want) = golden_ids(&cpu());
    assert_eq!(tok.encode_batch(&["a photo of a sks dog", ""]).unwrap(), want);
    // Truncation keeps 75 content tokens between bos and eos.
    let long = "dog ".repeat(100);
    let ids = tok.encode(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!((ids[0], ids[76]), (998, 999));
    assert!(ids[1..76].iter().all(|&i| i != 999));
}

#[test]
fn vocab_and_merges_build_the_same_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(tiny("tokenizer").join(f), dir.path().join(f)).unwrap();
    }
    let slow = ClipTokenizer::from_dir(dir.path()).unwrap();
    let fast = ClipTokenizer::from_dir(tiny("tokenizer")).unwrap();
    for text in ["a photo of a sks dog", "", "A  Photo,\tof the CAT's 42 hats!!", "héllo wörld <|endoftext|> ok", "don't stop-believing..."] {
        assert_eq!(slow.encode(text).unwrap(), fast.encode(text).unwrap(), "{text:?}");
    }
    assert_eq!(slow.vocab_size(), fast.vocab_size());
}

#[test]
fn added_token_gets_a_new_id_and_stays_whole() {
    let mut tok = ClipTokenizer::from_dir(tiny("tokenizer")).unwrap();
    assert_eq!(tok.vocab_size(), 1000);
    let before = tok.tokenize("<sks-dog>").unwrap();
    assert!(before.len() > 1);
    let ids = tok.add_tokens(&["<sks-dog>", "<sks-cat>"]).unwrap();
    assert_eq!(ids, vec![1000, 1001]);
    assert_eq!(tok.vocab_size(), 1002);
    let enc = tok.encode("a photo of <sks-dog>").unwrap();
    assert_eq!(&enc[..6], &[998, 320, 530, 516, 1000, 999]);
    // Adding it again changes nothing.
    assert_eq!(tok.add_tokens(&["<sks-dog>"]).unwrap(), vec![1000]);
    assert_eq!(tok.vocab_size(), 1002);
    assert!(tok.add_tokens(&[" "]).is_err());

    // The encoder grows to match and runs the new id; old rows are untouched.
    let device = cpu();
    let mut model = ClipTextModel::from_dir(tiny("text_encoder"), &device).unwrap();
    let old = model.text_model.embeddings.token_embedding.weight.clone();
    model.resize_token_embeddings(tok.vocab_size());
    let w = model.text_model.embeddings.token_embedding.weight.clone();
    assert_eq!(w.dims(), [1002, 32]);
    let d: f32 = (w.slice([0..1000, 0..32]) - old).abs().max().into_scalar();
    assert_eq!(d, 0.0);
    let out = model.try_forward(tok.encode_tensor(&["a photo of <sks-dog>"], &device).unwrap()).unwrap();
    assert_eq!(out.last_hidden_state.dims(), [1, 77, 32]);
}

#[test]
fn every_parameter_gets_a_gradient() {
    let device = cpu_autodiff();
    let mut model = ClipTextModel::from_dir(tiny("text_encoder"), &device).unwrap();
    model.for_each_param_mut(|_, mut p| p.set_trainable(true));
    let (ids, _) = golden_ids(&device);
    let out = model.forward(ids);
    let r: Tensor<3> = Init::new(7).normal([2, 77, 32], 1.0, &device);
    let q: Tensor<2> = Init::new(8).normal([2, 32], 1.0, &device);
    let loss = (out.last_hidden_state * r).sum() + (out.pooled * q).sum();
    let grads = loss.backward();
    let mut n = 0;
    model.for_each_param(|path, p| {
        let g = p.grad(&grads).unwrap_or_else(|| panic!("`{path}` got no gradient"));
        let norm: f32 = g.abs().sum().into_scalar();
        assert!(norm > 0.0 && norm.is_finite(), "`{path}`: gradient norm {norm}");
        n += 1;
    });
    assert_eq!(n, 36);
}

#[test]
fn finite_differences_agree_with_autodiff() {
    let device = cpu_autodiff();
    let mut model = ClipTextModel::from_dir(tiny("text_encoder"), &device).unwrap();
    let picked = [
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.encoder.layers.0.self_attn.v_proj.bias",
        "text_model.encoder.layers.1.mlp.fc1.weight",
        "text_model.encoder.layers.1.layer_norm2.weight",
        "text_model.final_layer_norm.bias",
    ];
    model.train_only(|p| picked.contains(&p));
    // Ids 0, 333 and 666 make the sampled token-embedding elements (rows n/3 apart) live.
    let ids = ClipTextModel::ids_tensor(&[vec![998, 0, 333, 666, 999, 999, 999, 999]], &device).unwrap();
    let r: Tensor<3> = Init::new(3).normal([1, 8, 32], 1.0, &device);
    let samples = gradcheck::check(&mut model, |m| (m.forward(ids.clone()).last_hidden_state * r.clone()).sum(), 3e-3, 3);
    assert_eq!(samples.len(), picked.len() * 3);
    let live = samples.iter().filter(|s| s.analytic.abs() > 1e-2).count();
    // f32 central differences jitter by about 1e-3 here (LayerNorms over 32 channels),
    // hence an absolute floor besides the 1% relative bound.
    let off = |s: &gradcheck::GradSample| (s.analytic - s.numeric).abs() - 1e-2 * s.analytic.abs();
    let worst = samples.iter().map(off).fold(f64::MIN, f64::max);
    println!("gradcheck: {} samples, {live} non-trivial, worst |analytic - numeric| - 1% = {worst:.1e}", samples.len());
    assert!(live >= picked.len() * 2, "too few non-trivial gradients: {live}");
    for s in &samples {
        assert!(off(s) < 5e-3, "{} [{}]: analytic {} numeric {}", s.path, s.index, s.analytic, s.numeric);
    }
}

#[test]
fn bad_files_give_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let e = ClipTextModel::from_dir(dir.path(), &cpu()).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("config.json"), "{e}");

    let cfg = std::fs::read_to_string(tiny("text_encoder/config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), &cfg).unwrap();
    let e = ClipTextModel::from_dir(dir.path(), &cpu()).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let e = ClipTextModel::from_dir(dir.path(), &cpu()).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(dir.path().join("config.json"), cfg.replace("quick_gelu", "swish")).unwrap();
    let e = ClipTextModel::from_dir(dir.path(), &cpu()).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("config.json") && e.contains("hidden_act") && e.contains("quick_gelu"), "{e}");

    // A config that disagrees with the weights names the file and the tensor.
    std::fs::write(dir.path().join("config.json"), cfg.replace("\"intermediate_size\": 64", "\"intermediate_size\": 48")).unwrap();
    std::fs::copy(tiny("text_encoder/model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let e = ClipTextModel::from_dir(dir.path(), &cpu()).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("model.safetensors") && e.contains("mlp.fc1"), "{e}");

    assert!(ClipTextConfig::from_json(r#"{"hidden_size": 30, "num_attention_heads": 4}"#).is_err());
    let e = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("tokenizer.json") && e.contains(&dir.path().display().to_string()), "{e}");
    let e = ClipTextModel::from_dir(tiny("text_encoder"), &cpu())
        .unwrap()
        .try_forward(ClipTextModel::ids_tensor(&[vec![998, 1000]], &cpu()).unwrap())
        .unwrap_err()
        .to_string();
    println!("{e}");
    assert!(e.contains("1000"), "{e}");
}
