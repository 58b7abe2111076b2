//! Frozen base parameters get no gradient; every trainable one gets a non-zero gradient; and
//! each adapter layer's backward agrees with finite differences.
mod common;

use common::*;
use knobs_adapters::ia3::Ia3Config;
use knobs_adapters::lora::LoraConfig;
use knobs_adapters::{AdaptedModel, AdapterConfig, Pattern};
use knobs_nn::{ModuleExt, cpu_autodiff, gradcheck};

fn all_layers() -> Pattern {
    Pattern::names(&["embed", "conv", "fc1", "fc2", "head"])
}

fn check_flow(config: Box<dyn AdapterConfig>, expect_trainable: &[&str]) {
    let device = cpu_autodiff();
    let mut m = AdaptedModel::new(TinyNet::new(1, &device), 2);
    m.add_adapter("a", config).unwrap();
    randomize_adapters(&mut m.model, 0.5, 3);
    let b = batch(6, 4, &device);
    let loss = cross_entropy(m.model.forward(b.ids.clone(), b.img.clone()), &b.labels);
    let grads = loss.backward();
    let mut trainable = 0;
    m.model.for_each_param(|path, p| {
        let g = p.grad(&grads);
        if p.is_trainable() {
            trainable += 1;
            let g = g.unwrap_or_else(|| panic!("trainable `{path}` got no gradient"));
            let norm: f32 = g.abs().sum().into_scalar();
            assert!(norm > 0.0, "trainable `{path}` got a zero gradient");
            assert!(expect_trainable.iter().any(|t| path.contains(t)), "`{path}` should be frozen");
        } else {
            assert!(g.is_none(), "frozen `{path}` received a gradient");
        }
    });
    assert!(trainable > 0);
}

#[test]
fn lora_trains_only_adapter_parameters() {
    let mut cfg = LoraConfig::new(2, 4.0, all_layers());
    cfg.modules_to_save = vec!["norm".into()];
    check_flow(Box::new(cfg), &[".lora_", "norm."]);
}

#[test]
fn ia3_trains_only_scaling_vectors() {
    let cfg = Ia3Config::new(Pattern::names(&["conv", "fc1", "fc2", "head"]), Pattern::names(&["fc2"]));
    check_flow(Box::new(cfg), &[".ia3_l."]);
}

#[test]
fn train_only_freezes_everything_else() {
    let device = cpu_autodiff();
    let mut m = TinyNet::new(1, &device);
    m.train_only(|p| p.starts_with("head."));
    let b = batch(4, 4, &device);
    let grads = cross_entropy(m.forward(b.ids.clone(), b.img.clone()), &b.labels).backward();
    m.for_each_param(|path, p| assert_eq!(p.grad(&grads).is_some(), path.starts_with("head."), "{path}"));
}

fn finite_differences(config: Box<dyn AdapterConfig>, layers: &[&str]) {
    let device = cpu_autodiff();
    let mut m = AdaptedModel::new(TinyNet::new(5, &device), 6);
    m.add_adapter("a", config).unwrap();
    randomize_adapters(&mut m.model, 0.5, 7);
    let b = batch(5, 8, &device);
    let samples = gradcheck::check(&mut m.model, |net| cross_entropy(net.forward(b.ids.clone(), b.img.clone()), &b.labels), 1e-2, 6);
    assert!(samples.len() > 10);
    for layer in layers {
        assert!(samples.iter().any(|s| s.path.contains(layer)), "no gradient sample for `{layer}`");
    }
    for s in &samples {
        assert!(s.rel_error() < 2e-2, "{}[{}]: autodiff {} vs numeric {}", s.path, s.index, s.analytic, s.numeric);
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    finite_differences(Box::new(LoraConfig::new(2, 3.0, all_layers())), &["embed.lora_embedding_A", "conv.lora_A", "fc1.lora_B", "fc2.lora_A", "head.lora_B"]);
}

#[test]
fn ia3_gradients_match_finite_differences() {
    finite_differences(Box::new(Ia3Config::new(Pattern::names(&["conv", "fc1", "fc2", "head"]), Pattern::names(&["fc2", "conv"]))), &["conv.ia3_l", "fc1.ia3_l", "fc2.ia3_l", "head.ia3_l"]);
}
