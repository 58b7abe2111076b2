//! PEFT folders: save then load reproduces outputs exactly; real PEFT configs parse; bad files
//! give errors that name the file and key.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use common::*;
use knobs_adapters::formats::peft;
use knobs_adapters::ia3::Ia3Config;
use knobs_adapters::lora::{LoraConfig, LoraInit};
use knobs_adapters::{AdaptedModel, Pattern};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{read_safetensors, write_safetensors};
use knobs_nn::cpu;

const GOLDEN: &str = "../../../shared/golden/tensors";

fn out(m: &TinyNet, b: &Batch) -> Vec<f32> {
    m.forward(b.ids.clone(), b.img.clone()).into_data().try_into_vec().unwrap()
}

fn trained_lora() -> AdaptedModel<TinyNet> {
    let mut m = AdaptedModel::new(TinyNet::new(41, &cpu()), 42);
    let mut cfg = LoraConfig::new(3, 5.0, Pattern::names(&["embed", "conv", "fc1", "fc2"]));
    cfg.modules_to_save = vec!["head".into()];
    cfg.use_rslora = true;
    m.add_adapter("style", Box::new(cfg)).unwrap();
    randomize_adapters(&mut m.model, 0.4, 43);
    // A trained head lives in the adapter file too (modules_to_save).
    let w = m.model.head.weight.clone() * 1.5;
    m.model.head.weight = w;
    // Compare inference with inference (a loaded adapter is frozen): frozen parameters leave
    // the autodiff graph, which may change the last bit of a result.
    m.freeze();
    m
}

#[test]
fn lora_folder_round_trip_reproduces_outputs_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let saved = trained_lora();
    let b = batch(5, 44, &cpu());
    let expected = out(&saved.model, &b);
    peft::save(&saved, "style", dir.path()).unwrap();

    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 3);
    assert_eq!(json["use_rslora"], true);
    let sd = read_safetensors(dir.path().join("adapter_model.safetensors")).unwrap();
    assert!(sd.tensors.contains_key("base_model.model.blocks.0.fc1.lora_A.weight"));
    assert!(sd.tensors.contains_key("base_model.model.embed.lora_embedding_B"));
    assert!(sd.tensors.contains_key("base_model.model.head.weight"));

    // A fresh model (same base seed, untrained head) gets everything from the folder.
    let mut fresh = AdaptedModel::new(TinyNet::new(41, &cpu()), 99);
    assert_ne!(out(&fresh.model, &b), expected);
    peft::load(&mut fresh, dir.path(), "style").unwrap();
    assert_eq!(out(&fresh.model, &b), expected);
    assert_eq!(knobs_nn::ModuleExt::num_trainable_params(&fresh.model), 0, "a loaded adapter is for inference");
}

#[test]
fn ia3_folder_round_trip_reproduces_outputs_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = AdaptedModel::new(TinyNet::new(51, &cpu()), 52);
    m.add_adapter("ia", Box::new(Ia3Config::new(Pattern::names(&["conv", "fc1", "fc2"]), Pattern::names(&["fc2"])))).unwrap();
    randomize_adapters(&mut m.model, 0.3, 53);
    m.freeze();
    let b = batch(4, 54, &cpu());
    let expected = out(&m.model, &b);
    peft::save(&m, "ia", dir.path()).unwrap();
    let sd = read_safetensors(dir.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(sd.tensors["base_model.model.blocks.0.fc2.ia3_l"].shape().as_slice(), &[1, HIDDEN]);
    assert_eq!(sd.tensors["base_model.model.blocks.0.fc1.ia3_l"].shape().as_slice(), &[HIDDEN, 1]);
    let mut fresh = AdaptedModel::new(TinyNet::new(51, &cpu()), 0);
    peft::load(&mut fresh, dir.path(), "ia").unwrap();
    assert_eq!(out(&fresh.model, &b), expected);
}

#[test]
fn configs_written_by_peft_parse() {
    let lora = peft::read_config(Path::new(GOLDEN).join("lora_peft")).unwrap();
    assert_eq!(lora.peft_type(), knobs_adapters::PeftType::Lora);
    let json = lora.to_peft_json();
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 4.0);
    assert_eq!(json["init_lora_weights"], "gaussian");
    let mut targets: Vec<String> = serde_json::from_value(json["target_modules"].clone()).unwrap();
    targets.sort();
    assert_eq!(targets, ["to_k", "to_out.0", "to_q", "to_v"]);

    let ia3 = peft::read_config(Path::new(GOLDEN).join("ia3_peft")).unwrap();
    assert_eq!(ia3.peft_type(), knobs_adapters::PeftType::Ia3);
    assert_eq!(ia3.to_peft_json()["feedforward_modules"], serde_json::json!(["ff.net.2"]));
}

fn saved_folder() -> (tempfile::TempDir, BTreeMap<String, TensorData>) {
    let dir = tempfile::tempdir().unwrap();
    peft::save(&trained_lora(), "style", dir.path()).unwrap();
    let sd = read_safetensors(dir.path().join("adapter_model.safetensors")).unwrap();
    (dir, sd.tensors)
}

fn load_err(dir: &Path) -> String {
    let mut m = AdaptedModel::new(TinyNet::new(41, &cpu()), 0);
    let err = peft::load(&mut m, dir, "x").expect_err("loading must fail").to_string();
    assert!(m.adapter_names().is_empty(), "a failed load must leave no adapter behind");
    err
}

#[test]
fn truncated_or_corrupt_weights_name_the_file() {
    let (dir, _) = saved_folder();
    let file = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    std::fs::write(&file, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("adapter_model.safetensors") && err.contains("not a valid safetensors"), "{err}");
}

#[test]
fn key_for_missing_module_and_wrong_shape_are_named() {
    let (dir, mut tensors) = saved_folder();
    let file = dir.path().join("adapter_model.safetensors");
    tensors.insert("base_model.model.blocks.0.fc9.lora_A.weight".into(), TensorData::new(vec![0f32; 6], [3, 2]));
    write_safetensors(&file, &tensors, &HashMap::new()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("blocks.0.fc9.lora_A.weight"), "{err}");

    let (dir, mut tensors) = saved_folder();
    let file = dir.path().join("adapter_model.safetensors");
    tensors.insert("base_model.model.blocks.0.fc1.lora_A.weight".into(), TensorData::new(vec![0f32; 6], [3, 2]));
    write_safetensors(&file, &tensors, &HashMap::new()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("blocks.0.fc1.lora_A.weight") && err.contains("shape"), "{err}");

    let (dir, mut tensors) = saved_folder();
    tensors.remove("base_model.model.blocks.0.fc2.lora_B.weight");
    write_safetensors(dir.path().join("adapter_model.safetensors"), &tensors, &HashMap::new()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("blocks.0.fc2.lora_B.weight"), "{err}");
}

#[test]
fn bad_configs_name_file_and_key() {
    let (dir, _) = saved_folder();
    let cfg = dir.path().join("adapter_config.json");
    let json = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, json.replace("\"LORA\"", "\"VERA\"")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("adapter_config.json") && err.contains("peft_type") && err.contains("VERA"), "{err}");

    std::fs::write(&cfg, json.replace("\"fc1\"", "\"fc_one\"")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("target_modules") && err.contains("fc_one") && err.contains("fc1"), "near matches listed: {err}");

    std::fs::write(&cfg, "{ not json").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("adapter_config.json"), "{err}");
}

#[test]
fn gaussian_init_has_the_requested_spread_and_b_starts_at_zero() {
    let mut m = AdaptedModel::new(TinyNet::new(61, &cpu()), 62);
    let mut cfg = LoraConfig::new(4, 4.0, Pattern::names(&["fc1"]));
    cfg.init = LoraInit::Gaussian;
    m.add_adapter("g", Box::new(cfg)).unwrap();
    let sd = m.adapter_state_dict("g").unwrap();
    let a: Vec<f32> = sd["blocks.0.fc1.lora_A.weight"].clone().try_into_vec().unwrap();
    let b: Vec<f32> = sd["blocks.0.fc1.lora_B.weight"].clone().try_into_vec().unwrap();
    let var = a.iter().map(|v| (v * v) as f64).sum::<f64>() / a.len() as f64;
    assert!((var.sqrt() - 0.25).abs() < 0.08, "std of A {} (want 1/r = 0.25)", var.sqrt());
    assert!(b.iter().all(|&v| v == 0.0));
}

/// Replaces every value of `key` in the folder's weights file with `bad`.
fn poison_folder(dir: &Path, key: &str, bad: f32) {
    let file = dir.join("adapter_model.safetensors");
    let mut tensors = read_safetensors(&file).unwrap().tensors;
    let shape = tensors[key].shape().as_slice().to_vec();
    tensors.insert(key.into(), TensorData::new(vec![bad; shape.iter().product()], shape));
    write_safetensors(&file, &tensors, &HashMap::new()).unwrap();
}

#[test]
fn non_finite_weights_are_refused_naming_file_and_key() {
    let key = "base_model.model.blocks.0.fc1.lora_B.weight";
    let (dir, _) = saved_folder();
    poison_folder(dir.path(), key, f32::NEG_INFINITY);
    let err = load_err(dir.path());
    assert!(err.contains("adapter_model.safetensors") && err.contains(key) && err.contains("inf"), "{err}");
    // A plain LoRA folder read by the reader of every LoRA format is refused the same way.
    let mut m = AdaptedModel::new(TinyNet::new(41, &cpu()), 42);
    m.add_adapter("s", Box::new(LoraConfig::new(2, 2.0, Pattern::names(&["fc1"])))).unwrap();
    let plain = tempfile::tempdir().unwrap();
    peft::save(&m, "s", plain.path()).unwrap();
    poison_folder(plain.path(), key, f32::NAN);
    let err = knobs_adapters::formats::lora_files::read(plain.path()).unwrap_err().to_string();
    assert!(err.contains("adapter_model.safetensors") && err.contains(key) && err.contains("NaN"), "{err}");
}

#[test]
fn peft_type_names_round_trip() {
    use knobs_adapters::PeftType;
    for t in PeftType::ALL {
        assert_eq!(PeftType::parse(t.as_str()), Some(t));
        assert_eq!(t.to_string().parse::<PeftType>().unwrap(), t);
    }
    assert_eq!(PeftType::Lora.to_string(), "LORA");
    assert_eq!(PeftType::Ia3.as_str(), "IA3");
    assert_eq!(PeftType::parse("lora"), None, "files spell it in capitals");
    assert_eq!("LOHA".parse::<PeftType>().unwrap(), PeftType::Loha);
    let e = "BOFT".parse::<PeftType>().unwrap_err().to_string();
    assert!(e.contains("BOFT") && e.contains("LORA") && e.contains("LOKR"), "{e}");
    // What a saved folder's config says is what the type says.
    assert_eq!(trained_lora().config("style").unwrap().to_peft_json()["peft_type"], PeftType::Lora.as_str());
}
