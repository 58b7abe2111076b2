//! diffusers and kohya LoRA files: write then read + attach reproduces outputs exactly, alphas
//! give the right scale, golden diffusers files keep their keys, bad files name file and key.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use common::*;
use knobs_adapters::formats::lora_files::{self, ComponentLora, DiffusersKeys};
use knobs_adapters::lora::LoraConfig;
use knobs_adapters::{AdaptedModel, Pattern};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{read_safetensors, write_safetensors};
use knobs_nn::{Init, Tensor, cpu};

const GOLDEN: &str = "../../../shared/golden/tensors";

fn out(m: &TinyNet, b: &Batch) -> Vec<f32> {
    m.forward(b.ids.clone(), b.img.clone()).into_data().try_into_vec().unwrap()
}

/// A trained-looking LoRA with mixed ranks and alphas (and rsLoRA), on every layer kind.
fn trained(targets: &[&str], seed: u64) -> AdaptedModel<TinyNet> {
    let mut m = AdaptedModel::new(TinyNet::new(7, &cpu()), seed);
    let mut cfg = LoraConfig::new(3, 5.0, Pattern::names(targets));
    cfg.rank_pattern.insert("fc2".into(), 2);
    cfg.alpha_pattern.insert("conv".into(), 1.5);
    cfg.use_rslora = true;
    m.add_adapter("style", Box::new(cfg)).unwrap();
    randomize_adapters(&mut m.model, 0.4, seed + 1);
    // Compare inference with inference: frozen parameters leave the autodiff graph, which
    // may change the last bit of a result.
    m.freeze();
    m
}

fn fresh_outputs(file: &Path, b: &Batch) -> (Vec<f32>, BTreeMap<String, ComponentLora>, Vec<String>) {
    let comps = lora_files::read(file).unwrap();
    let mut fresh = AdaptedModel::new(TinyNet::new(7, &cpu()), 1234);
    let paths = lora_files::attach(&mut fresh, "loaded", &comps["unet"]).unwrap();
    assert_eq!(knobs_nn::ModuleExt::num_trainable_params(&fresh.model), 0, "attached adapters are frozen");
    (out(&fresh.model, b), comps, paths)
}

#[test]
fn diffusers_files_round_trip_exactly_in_both_key_styles() {
    let saved = trained(&["embed", "conv", "fc1", "fc2", "head"], 11);
    let b = batch(5, 3, &cpu());
    let expected = out(&saved.model, &b);
    let comp = ComponentLora::from_adapter(&saved, "style").unwrap();
    let dir = tempfile::tempdir().unwrap();
    for keys in [DiffusersKeys::Diffusers, DiffusersKeys::Peft] {
        let file = dir.path().join(format!("{keys:?}.safetensors"));
        lora_files::save_diffusers(&file, &[("unet", &comp)], keys).unwrap();
        let sd = read_safetensors(&file).unwrap();
        assert!(sd.tensors.contains_key("unet.blocks.0.fc1.lora_A.weight"), "{:?}", sd.tensors.keys());
        assert!(sd.tensors.contains_key("unet.embed.lora_embedding_B"));
        // Scales are not 1, so the PEFT config travels in the metadata.
        let meta: serde_json::Value = serde_json::from_str(&sd.metadata["lora_adapter_metadata"]).unwrap();
        assert_eq!(meta["unet.r"], 3);
        let (got, comps, paths) = fresh_outputs(&file, &b);
        assert_eq!(paths, vec!["blocks.0.fc1", "blocks.0.fc2", "conv", "embed", "head"]);
        assert_eq!(comps["unet"].config.rank_pattern.get("blocks.0.fc2"), Some(&2));
        assert_eq!(got, expected, "{keys:?}");
    }
}

#[test]
fn kohya_files_round_trip_exactly_with_locon() {
    let saved = trained(&["conv", "fc1", "fc2", "head"], 21);
    let b = batch(4, 5, &cpu());
    let expected = out(&saved.model, &b);
    let comp = ComponentLora::from_adapter(&saved, "style").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("style.safetensors");
    lora_files::save_kohya(&file, &[("unet", &comp)], Some("stable-diffusion-v1/lora")).unwrap();

    let sd = read_safetensors(&file).unwrap();
    assert_eq!(sd.tensors["lora_unet_conv.lora_down.weight"].shape().as_slice(), &[3, 3, 3, 3], "LoCon down is k x k");
    assert_eq!(sd.tensors["lora_unet_conv.lora_up.weight"].shape().as_slice(), &[DIM, 3, 1, 1]);
    assert_eq!(sd.tensors["lora_unet_blocks_0_fc2.lora_down.weight"].shape().as_slice(), &[2, HIDDEN]);
    assert_eq!(sd.tensors["lora_unet_blocks_0_fc1.alpha"].shape().num_dims(), 0, "kohya alphas are scalars");
    // rsLoRA scale 5/sqrt(3) becomes alpha = scale * rank.
    let alpha = sd.f32("lora_unet_blocks_0_fc1.alpha").unwrap().0[0];
    assert!((alpha - 5.0 / 3f32.sqrt() * 3.0).abs() < 1e-5, "{alpha}");
    assert_eq!(sd.metadata["ss_network_module"], "networks.lora");
    assert_eq!(sd.metadata["ss_network_dim"], "3");
    assert_eq!(sd.metadata["modelspec.architecture"], "stable-diffusion-v1/lora");
    assert!(sd.metadata["ss_network_args"].contains("conv_dim"));

    let comps = lora_files::read(&file).unwrap();
    assert!(comps["unet"].kohya_names);
    assert!(comps["unet"].state.tensors.contains_key("blocks_0_fc1.lora_A.weight"));
    let (got, _, paths) = fresh_outputs(&file, &b);
    assert_eq!(paths, vec!["blocks.0.fc1", "blocks.0.fc2", "conv", "head"]);
    assert_eq!(got, expected);
}

fn data(values: Vec<f32>, shape: &[usize]) -> TensorData {
    TensorData::new(values, shape.to_vec())
}

fn randn(shape: &[usize], seed: u64) -> Vec<f32> {
    Init::new(seed).normal_vec(shape.iter().product())
}

#[test]
fn kohya_alpha_sets_the_scale() {
    let (r, alpha) = (2usize, 0.5f32); // scale 0.25
    let fc1 = (randn(&[r, DIM], 1), randn(&[HIDDEN, r], 2));
    let conv = (randn(&[r, 3, 3, 3], 3), randn(&[DIM, r, 1, 1], 4));
    let mut t = BTreeMap::new();
    t.insert("lora_unet_blocks_0_fc1.lora_down.weight".to_string(), data(fc1.0.clone(), &[r, DIM]));
    t.insert("lora_unet_blocks_0_fc1.lora_up.weight".to_string(), data(fc1.1.clone(), &[HIDDEN, r]));
    t.insert("lora_unet_blocks_0_fc1.alpha".to_string(), data(vec![alpha], &[]));
    t.insert("lora_unet_conv.lora_down.weight".to_string(), data(conv.0.clone(), &[r, 3, 3, 3]));
    t.insert("lora_unet_conv.lora_up.weight".to_string(), data(conv.1.clone(), &[DIM, r, 1, 1]));
    // no alpha for conv: alpha = rank, scale 1
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.safetensors");
    write_safetensors(&file, &t, &HashMap::new()).unwrap();

    let b = batch(4, 9, &cpu());
    let (got, comps, _) = fresh_outputs(&file, &b);
    let mods = comps["unet"].modules();
    assert_eq!(mods.iter().map(|m| (m.rank, m.scale)).collect::<Vec<_>>(), vec![(2, 0.25), (2, 1.0)]);

    // The same function by hand: W' = W + scale * B A on a plain model.
    let dev = cpu();
    let mut plain = TinyNet::new(7, &dev);
    let a = Tensor::<2>::from_data(data(fc1.0, &[r, DIM]), &dev);
    let bb = Tensor::<2>::from_data(data(fc1.1, &[HIDDEN, r]), &dev);
    plain.blocks[0].fc1.weight = plain.blocks[0].fc1.weight.clone() + bb.matmul(a) * 0.25;
    let ca = Tensor::<2>::from_data(data(conv.0, &[r, 27]), &dev);
    let cb = Tensor::<2>::from_data(data(conv.1, &[DIM, r]), &dev);
    plain.conv.weight = plain.conv.weight.clone() + cb.matmul(ca).reshape([DIM, 3, 3, 3]);
    let want = out(&plain, &b);
    let diff = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-5, "max diff {diff}");
    assert_ne!(got, out(&TinyNet::new(7, &dev), &b));
}

fn write(dir: &Path, name: &str, t: &[(&str, Vec<usize>)]) -> PathBuf {
    let file = dir.join(name);
    let tensors = t.iter().map(|(k, s)| (k.to_string(), data(randn(s, 5), s))).collect();
    write_safetensors(&file, &tensors, &HashMap::new()).unwrap();
    file
}

fn attach_err(file: &Path) -> String {
    let comps = match lora_files::read(file) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let mut m = AdaptedModel::new(TinyNet::new(7, &cpu()), 0);
    let e = lora_files::attach(&mut m, "x", &comps["unet"]).unwrap_err().to_string();
    assert!(m.adapter_names().is_empty(), "a failed attach leaves the model as it was");
    e
}

#[test]
fn bad_files_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        // a kohya module the model lacks
        (write(d, "a.safetensors", &[("lora_unet_blocks_0_fc3.lora_down.weight", vec![2, 8]), ("lora_unet_blocks_0_fc3.lora_up.weight", vec![16, 2])]),
         "lora_unet_blocks_0_fc3.lora_down.weight", "no layer of the model has the kohya name"),
        // a down tensor whose input width does not fit fc1 (in = 8)
        (write(d, "b.safetensors", &[("lora_unet_blocks_0_fc1.lora_down.weight", vec![2, 7]), ("lora_unet_blocks_0_fc1.lora_up.weight", vec![16, 2])]),
         "lora_unet_blocks_0_fc1.lora_down.weight", "does not match"),
        // a diffusers key for a module the model lacks
        (write(d, "c.safetensors", &[("unet.blocks.0.fc9.lora.down.weight", vec![2, 8]), ("unet.blocks.0.fc9.lora.up.weight", vec![16, 2])]),
         "unet.blocks.0.fc9.lora.down.weight", "no adaptable layer `blocks.0.fc9`"),
        // up and down ranks that disagree
        (write(d, "d.safetensors", &[("unet.head.lora_A.weight", vec![2, 8]), ("unet.head.lora_B.weight", vec![3, 4])]),
         "unet.head.lora_B.weight", "does not pair"),
        // a down without its up
        (write(d, "e.safetensors", &[("unet.head.lora.down.weight", vec![2, 8])]), "unet.head.lora.down.weight", "needs both"),
        // not a LoRA file at all
        (write(d, "f.safetensors", &[("model.weight", vec![2, 2])]), "model.weight", "not a LoRA tensor key"),
        // LyCORIS LoHa
        (write(d, "g.safetensors", &[("lora_unet_head.hada_w1_a", vec![2, 2])]), "lora_unet_head.hada_w1_a", "LoHa"),
        // a conv LoRA for a Linear layer
        (write(d, "h.safetensors", &[("unet.head.lora_A.weight", vec![2, 8, 3, 3]), ("unet.head.lora_B.weight", vec![3, 2, 1, 1])]),
         "unet.head.lora_A.weight", "cannot adapt the Linear layer"),
    ];
    for (file, key, what) in cases {
        let e = attach_err(&file);
        println!("{e}");
        assert!(e.contains(&file.display().to_string()), "{e}");
        assert!(e.contains(key), "{e}");
        assert!(e.contains(what), "{e}");
    }
    let e = lora_files::read(d.join("embeds.pt")).unwrap_err().to_string();
    assert!(e.contains("embeds.pt") && e.contains("pickle"), "{e}");
}

#[test]
fn linear_lora_fits_a_1x1_conv_and_back() {
    // kohya and SD-2 files store [r, in] for 1x1 convs and [r, in, 1, 1] for linears.
    let dir = tempfile::tempdir().unwrap();
    let mut m = AdaptedModel::new(TinyNet::new(7, &cpu()), 0);
    let file = write(dir.path(), "x.safetensors", &[("unet.head.lora_A.weight", vec![2, DIM, 1, 1]), ("unet.head.lora_B.weight", vec![CLASSES, 2, 1, 1])]);
    let comps = lora_files::read(&file).unwrap();
    lora_files::attach(&mut m, "x", &comps["unet"]).unwrap();
}

#[test]
fn golden_diffusers_files_keep_their_keys() {
    let g = Path::new(GOLDEN);
    let dir = tempfile::tempdir().unwrap();
    for (sub, keys) in [("lora_diffusers", DiffusersKeys::Diffusers), ("lora_diffusers_peftkeys", DiffusersKeys::Peft)] {
        let src = g.join(sub).join("pytorch_lora_weights.safetensors");
        let comps = lora_files::read(&src).unwrap();
        assert_eq!(comps.keys().collect::<Vec<_>>(), vec!["unet"]);
        let unet = &comps["unet"];
        assert_eq!((unet.config.r, unet.config.lora_alpha), (4, 4.0));
        assert_eq!(unet.modules().len(), 48);
        assert!(unet.modules().iter().all(|m| m.scale == 1.0));
        let out = dir.path().join(format!("{sub}.safetensors"));
        lora_files::save_diffusers(&out, &[("unet", unet)], keys).unwrap();
        let (want, got) = (read_safetensors(&src).unwrap(), read_safetensors(&out).unwrap());
        assert_eq!(got.tensors.keys().collect::<Vec<_>>(), want.tensors.keys().collect::<Vec<_>>(), "{sub}");
        for (k, v) in &want.tensors {
            assert_eq!(got.tensors[k], *v, "{k}");
        }
        assert_eq!(got.metadata.contains_key("lora_adapter_metadata"), want.metadata.contains_key("lora_adapter_metadata"), "{sub}");
        assert_eq!(got.metadata["format"], "pt");
    }
    let peft = lora_files::read(g.join("lora_peft")).unwrap();
    assert_eq!(peft[""].modules().len(), 48);
    let a = &peft[""].state.tensors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"];
    let b = &lora_files::read(g.join("lora_diffusers")).unwrap()["unet"].state.tensors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"];
    assert_eq!(a, b, "all three golden files hold the same LoRA");
}

/// `file` written as a diffusers or kohya LoRA with one value of `key` replaced by `bad`.
fn poisoned(dir: &Path, name: &str, keys: [&str; 2], bad: f32) -> PathBuf {
    let file = dir.join(name);
    let mut down = randn(&[2, DIM], 1);
    down[3] = bad;
    let t = BTreeMap::from([(keys[0].to_string(), data(down, &[2, DIM])), (keys[1].to_string(), data(randn(&[HIDDEN, 2], 2), &[HIDDEN, 2]))]);
    write_safetensors(&file, &t, &HashMap::new()).unwrap();
    file
}

#[test]
fn non_finite_tensors_are_refused_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let kohya = ["lora_unet_blocks_0_fc1.lora_down.weight", "lora_unet_blocks_0_fc1.lora_up.weight"];
    let diffusers = ["unet.blocks.0.fc1.lora.down.weight", "unet.blocks.0.fc1.lora.up.weight"];
    for (name, keys, bad, word) in [("k.safetensors", kohya, f32::NAN, "NaN"), ("d.safetensors", diffusers, f32::INFINITY, "inf")] {
        let file = poisoned(dir.path(), name, keys, bad);
        let e = lora_files::read(&file).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(keys[0]) && e.contains(word), "{e}");
    }
}

#[test]
fn every_pickle_extension_is_refused_and_a_disguised_pickle_too() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["pt", "pth", "bin", "ckpt", "pkl", "Ckpt"] {
        let path = dir.path().join(format!("style.{ext}"));
        let e = lora_files::read(&path).unwrap_err().to_string();
        assert!(e.contains(&format!("style.{ext}")) && e.contains("pickle"), "{e}");
    }
    let disguised = dir.path().join("disguised.safetensors");
    std::fs::write(&disguised, b"\x80\x02}q\x00.").unwrap();
    let e = lora_files::read(&disguised).unwrap_err().to_string();
    assert!(e.contains("disguised.safetensors") && e.contains("pickle"), "{e}");
}

/// A zero or negative alpha (a file's `.alpha` tensor, or `lora_alpha` / `alpha_pattern` in a
/// PEFT config) and a zero rank in `rank_pattern` are refused by key, not applied silently.
#[test]
fn zero_or_negative_alphas_and_ranks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for alpha in [0.0f32, -2.0] {
        let mut t = BTreeMap::new();
        t.insert("lora_unet_blocks_0_fc1.lora_down.weight".to_string(), data(randn(&[2, DIM], 1), &[2, DIM]));
        t.insert("lora_unet_blocks_0_fc1.lora_up.weight".to_string(), data(randn(&[HIDDEN, 2], 2), &[HIDDEN, 2]));
        t.insert("lora_unet_blocks_0_fc1.alpha".to_string(), data(vec![alpha], &[]));
        let file = dir.path().join(format!("a{alpha}.safetensors"));
        write_safetensors(&file, &t, &HashMap::new()).unwrap();
        let err = lora_files::read(&file).unwrap_err().to_string();
        assert!(err.contains("lora_unet_blocks_0_fc1.alpha") && err.contains("must be positive"), "{err}");
    }
    for (json, key) in [
        (serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 0, "target_modules": ["fc1"]}), "lora_alpha"),
        (serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": -4, "target_modules": ["fc1"]}), "lora_alpha"),
        (serde_json::json!({"peft_type": "LORA", "r": 4, "rank_pattern": {"fc1": 0}, "target_modules": ["fc1"]}), "rank_pattern"),
        (serde_json::json!({"peft_type": "LORA", "r": 4, "alpha_pattern": {"fc1": -1.0}, "target_modules": ["fc1"]}), "alpha_pattern"),
    ] {
        let err = LoraConfig::from_peft_json(&json).err().unwrap_or_else(|| panic!("{json} was accepted")).to_string();
        assert!(err.contains(key), "{err}");
    }
}
