//! The adapter core is model-agnostic: LoRA and IA3 on a small classifier (not a UNet) learn a
//! task while every base parameter stays bit-identical.
mod common;

use common::*;
use knobs_adapters::ia3::Ia3Config;
use knobs_adapters::lora::LoraConfig;
use knobs_adapters::{AdaptedModel, AdapterConfig, Pattern};
use knobs_nn::io::state_dict;
use knobs_nn::optim::{AdamW, AdamWConfig, collect_grads};
use knobs_nn::{ModuleExt, cpu_autodiff};

/// Trains `config` on a fixed batch; returns (loss before, loss after, accuracy after).
fn train(config: Box<dyn AdapterConfig>, lr: f64, steps: usize) -> (f64, f64, f64) {
    let device = cpu_autodiff();
    let mut m = AdaptedModel::new(TinyNet::new(31, &device), 32);
    let base_before: Vec<_> = state_dict(&m.model).into_iter().collect();
    m.add_adapter("task", config).unwrap();
    m.set_training(true);
    let b = batch(48, 33, &device);
    let mut opt = AdamW::new(AdamWConfig { lr, weight_decay: 0.0, ..Default::default() });
    let loss_of = |net: &TinyNet| cross_entropy(net.forward(b.ids.clone(), b.img.clone()), &b.labels);
    let first = loss_of(&m.model).into_scalar::<f32>() as f64;
    for _ in 0..steps {
        let grads = loss_of(&m.model).backward();
        let g = collect_grads(&m.model, &grads);
        opt.step(&mut m.model, &g, |_| lr);
    }
    m.set_training(false);
    let last = loss_of(&m.model).into_scalar::<f32>() as f64;
    let acc = accuracy(m.model.forward(b.ids.clone(), b.img.clone()), &b.labels);
    let after = state_dict(&m.model);
    for (k, v) in base_before {
        assert_eq!(after[&k], v, "base parameter `{k}` changed");
    }
    assert!(m.model.num_trainable_params() < m.model.num_params() / 2);
    eprintln!("loss {first:.4} -> {last:.4}, accuracy {acc:.3}");
    (first, last, acc)
}

#[test]
fn lora_learns_task_with_base_frozen() {
    let cfg = LoraConfig::new(4, 8.0, Pattern::names(&["embed", "conv", "fc1", "fc2", "head"]));
    let (first, last, acc) = train(Box::new(cfg), 2e-2, 120);
    assert!(last < 0.3 * first, "loss {first} -> {last}");
    assert!(acc >= 0.9, "accuracy {acc}");
}

#[test]
fn ia3_learns_task_with_base_frozen() {
    let cfg = Ia3Config::new(Pattern::names(&["conv", "fc1", "fc2", "head"]), Pattern::names(&["fc2"]));
    let (first, last, acc) = train(Box::new(cfg), 5e-2, 120);
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    assert!(acc > 0.5, "accuracy {acc}");
}

#[test]
fn loha_lokr_dora_and_oft_learn_the_task_with_base_frozen() {
    use knobs_adapters::loha::LohaConfig;
    use knobs_adapters::lokr::LokrConfig;
    use knobs_adapters::lycoris::LycorisOptions;
    use knobs_adapters::oft::OftConfig;
    let targets = || Pattern::names(&["conv", "fc1", "fc2", "head"]);
    let cases: Vec<(&str, Box<dyn AdapterConfig>, f64)> = vec![
        ("loha", Box::new(LohaConfig::new(LycorisOptions::new(1, 2.0, targets()))), 2e-2),
        ("lokr", Box::new(LokrConfig::new(LycorisOptions::new(1, 2.0, targets()))), 2e-2),
        ("dora", Box::new(LoraConfig { use_dora: true, ..LoraConfig::new(1, 2.0, targets()) }), 2e-2),
        ("oft", Box::new(OftConfig::new(4, targets())), 5e-2),
    ];
    for (name, cfg, lr) in cases {
        let (first, last, _) = train(cfg, lr, 120);
        assert!(last < 0.7 * first, "{name}: loss {first} -> {last}");
    }
}
