//! HyperLoRA: gradients reach the hypernetwork through the generated LoRA weights (checked by
//! finite differences), the predicted LoRA is an ordinary PEFT LoRA, and the network's own
//! files round-trip with clear errors.
mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;

use common::*;
use knobs_adapters::hyperlora::{HyperLora, HyperLoraConfig};
use knobs_adapters::{AdaptedModel, formats::peft, generated};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Init, ModuleExt, Tensor, cpu, cpu_autodiff, gradcheck};

const TARGETS: [&str; 3] = ["fc1", "fc2", "head"];

fn config(model: &TinyNet, variational: bool) -> HyperLoraConfig {
    let targets: Vec<String> = TARGETS.iter().map(|s| s.to_string()).collect();
    let mut c = HyperLoraConfig::for_model(model, &targets).unwrap();
    c.rank = 2;
    c.alpha = 3.0;
    c.aux_a = 4;
    c.aux_b = 5;
    c.code_dim = 6;
    c.hidden = 7;
    c.num_codes = 3;
    c.image_dim = 5;
    c.variational = variational;
    c.seed = 11;
    c
}

/// Gives every parameter of the network noise, so that no gradient is zero by construction
/// (the head starts at zero).
fn randomize(net: &mut HyperLora, std: f32, seed: u64) {
    let mut init = Init::new(seed);
    net.for_each_param_mut(|_, mut p| {
        let n = p.as_ref().numel();
        let base: Vec<f32> = p.as_ref().flat().into_data().try_into_vec().unwrap();
        let v: Vec<f32> = base.iter().zip(init.normal_vec(n)).map(|(b, z)| b + z * std).collect();
        p.replace_flat(Tensor::from_data(TensorData::new(v, [n]), &p.device()));
    });
}

fn flat(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec().unwrap()
}

#[test]
fn fresh_network_predicts_no_change_and_matches_the_config() {
    let dev = cpu();
    let model = TinyNet::new(1, &dev);
    let c = config(&model, false);
    assert_eq!(c.layers.iter().map(|l| l.path.as_str()).collect::<Vec<_>>(), ["blocks.0.fc1", "blocks.0.fc2", "head"]);
    let net = HyperLora::new(c.clone(), &dev).unwrap();
    for i in 0..3 {
        let pred = net.predict(net.code_of(i).unwrap().sample(None));
        for ((path, a, b), l) in pred.iter().zip(&c.layers) {
            assert_eq!(a.dims(), [2, l.d_in], "{path}");
            assert_eq!(b.dims(), [l.d_out, 2], "{path}");
            assert!(flat(b.clone()).iter().all(|v| *v == 0.0), "{path}: B must start at zero");
            assert!(flat(a.clone()).iter().any(|v| *v != 0.0), "{path}: A must not start at zero");
        }
    }
    assert!(net.code_of(3).is_err());
}

/// d loss / d hypernetwork parameter, through the generated LoRA weights of a model that is
/// not a UNet, for the code path and the image path, variational with a fixed draw and KL.
#[test]
fn gradients_reach_the_hypernetwork_through_generated_weights() {
    let dev = cpu_autodiff();
    let batch = batch(6, 3, &dev);
    let mut model = AdaptedModel::new(TinyNet::new(2, &dev), 0);
    let mut net = HyperLora::new(config(&model.model, true), &dev).unwrap();
    net.attach(&mut model, "hyper").unwrap();
    model.model.freeze_all();
    randomize(&mut net, 0.3, 5);
    let model = RefCell::new(model);
    let eps = Init::new(9).normal([1, 6], 1.0, &dev);
    let images = Init::new(10).normal([2, 5], 1.0, &dev);
    for use_image in [false, true] {
        let loss = |net: &HyperLora| {
            let code = if use_image { net.code_from_images(images.clone()).unwrap() } else { net.code_of(1).unwrap() };
            let pred = net.predict(code.sample(Some(eps.clone())));
            let mut m = model.borrow_mut();
            HyperLora::apply(&mut m.model, "hyper", &pred).unwrap();
            cross_entropy(m.model.forward(batch.ids.clone(), batch.img.clone()), &batch.labels) + code.kl() * 0.01
        };
        let samples = gradcheck::check(&mut net, loss, 1e-2, 3);
        let paths: std::collections::BTreeSet<&str> = samples.iter().map(|s| s.path.as_str()).collect();
        let expect: &[&str] = if use_image {
            &["image_proj.weight", "image_proj.bias", "fc1.weight", "fc1.bias", "head.weight", "head.bias"]
        } else {
            &["codes.weight", "codes_logvar.weight", "fc1.weight", "fc1.bias", "head.weight", "head.bias"]
        };
        for p in expect {
            assert!(paths.contains(p), "no sample of {p}: {paths:?}");
            assert!(samples.iter().any(|s| s.path == *p && s.analytic.abs() > 1e-5), "{p}: every sampled gradient is zero");
        }
        for s in &samples {
            assert!(s.rel_error() < 2e-2, "image={use_image} {}[{}]: autodiff {} vs numeric {}", s.path, s.index, s.analytic, s.numeric);
        }
    }
}

/// The prediction written as a PEFT LoRA and loaded into a fresh model gives the same outputs
/// as the model with the generated weights in memory; its tensors are exactly `A` and `B`.
#[test]
fn predicted_lora_is_an_ordinary_lora_file() {
    let dev = cpu();
    let batch = batch(5, 4, &dev);
    let mut model = AdaptedModel::new(TinyNet::new(2, &dev), 0);
    let mut net = HyperLora::new(config(&model.model, false), &dev).unwrap();
    net.attach(&mut model, "hyper").unwrap();
    randomize(&mut net, 0.3, 6);
    let pred = net.predict(net.code_of(2).unwrap().sample(None));
    HyperLora::apply(&mut model.model, "hyper", &pred).unwrap();
    model.freeze();
    let ours = flat(model.model.forward(batch.ids.clone(), batch.img.clone()));
    let base = model.with_disabled(|m| flat(m.forward(batch.ids.clone(), batch.img.clone())));
    let change = ours.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(change > 1e-3, "the predicted LoRA changes nothing ({change})");

    let dir = tempfile::tempdir().unwrap();
    peft::save(&model, "hyper", dir.path()).unwrap();
    let mut fresh = AdaptedModel::new(TinyNet::new(2, &dev), 99);
    peft::load(&mut fresh, dir.path(), "x").unwrap();
    fresh.freeze();
    let theirs = flat(fresh.model.forward(batch.ids.clone(), batch.img.clone()));
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{a} vs {b}");
    }
    let sd = knobs_nn::io::read_safetensors(dir.path().join("adapter_model.safetensors")).unwrap();
    let (a, _) = sd.f32("base_model.model.blocks.0.fc1.lora_A.weight").unwrap();
    assert_eq!(a, flat(pred[0].1.clone()));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 2);
    assert_eq!(cfg["lora_alpha"], 3.0);
}

#[test]
fn network_files_round_trip_and_name_what_is_wrong() {
    let dev = cpu();
    let model = TinyNet::new(2, &dev);
    let mut net = HyperLora::new(config(&model, true), &dev).unwrap();
    randomize(&mut net, 0.3, 7);
    let dir = tempfile::tempdir().unwrap();
    net.save(dir.path()).unwrap();
    let back = HyperLora::load(dir.path(), &dev).unwrap();
    let emb = Init::new(1).normal([3, 5], 1.0, &dev);
    let p1 = net.predict(net.code_from_images(emb.clone()).unwrap().sample(None));
    let p2 = back.predict(back.code_from_images(emb).unwrap().sample(None));
    for ((_, a1, b1), (_, a2, b2)) in p1.into_iter().zip(p2) {
        assert_eq!(flat(a1), flat(a2));
        assert_eq!(flat(b1), flat(b2));
    }
    // A config whose layer shapes disagree with the weights: the file and key are named.
    let cfg_path = dir.path().join("hyperlora_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["aux_a"] = 3.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = HyperLora::load(dir.path(), &dev).err().unwrap().to_string();
    assert!(err.contains("hyperlora.safetensors") && err.contains("head."), "{err}");
    cfg["rank"] = 0.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = HyperLora::load(dir.path(), &dev).err().unwrap().to_string();
    assert!(err.contains("hyperlora_config.json") && err.contains("`rank`"), "{err}");
    std::fs::write(&cfg_path, "{").unwrap();
    let err = HyperLora::load(dir.path(), &dev).err().unwrap().to_string();
    assert!(err.contains("hyperlora_config.json"), "{err}");
    // Wrong image width.
    let err = net.code_from_images(Init::new(1).normal([1, 4], 1.0, &dev)).err().unwrap().to_string();
    assert!(err.contains("[1, 4]"), "{err}");
}

#[test]
fn generated_tensors_must_name_existing_parameters_of_the_right_shape() {
    let dev = cpu();
    let mut model = AdaptedModel::new(TinyNet::new(2, &dev), 0);
    let net = HyperLora::new(config(&model.model, false), &dev).unwrap();
    net.attach(&mut model, "hyper").unwrap();
    let bad = BTreeMap::from([("head.lora_A.nope.weight".to_string(), Tensor::<2>::zeros([2, 8], &dev))]);
    let err = generated::set_tensors(&mut model.model, &bad).err().unwrap().to_string();
    assert!(err.contains("head.lora_A.nope.weight"), "{err}");
    let bad = BTreeMap::from([("head.lora_A.hyper.weight".to_string(), Tensor::<2>::zeros([3, 8], &dev))]);
    let err = generated::set_tensors(&mut model.model, &bad).err().unwrap().to_string();
    assert!(err.contains("[3, 8]") && err.contains("[2, 8]"), "{err}");
}
