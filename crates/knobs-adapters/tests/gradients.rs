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

fn lycoris(r: usize, alpha: f64, cp: bool) -> knobs_adapters::lycoris::LycorisOptions {
    let mut o = knobs_adapters::lycoris::LycorisOptions::new(r, alpha, Pattern::names(&["conv", "fc1", "fc2", "head"]));
    o.use_effective_conv2d = cp;
    o
}

fn lokr(decompose_both: bool, factor: i64, cp: bool) -> knobs_adapters::lokr::LokrConfig {
    let mut c = knobs_adapters::lokr::LokrConfig::new(lycoris(1, 2.0, cp));
    c.decompose_both = decompose_both;
    c.decompose_factor = factor;
    c
}

fn dora() -> LoraConfig {
    LoraConfig { use_dora: true, ..LoraConfig::new(2, 3.0, Pattern::names(&["conv", "fc1", "fc2", "head"])) }
}

fn oft(coft: bool, share: bool) -> knobs_adapters::oft::OftConfig {
    let mut c = knobs_adapters::oft::OftConfig::new(4, Pattern::names(&["conv", "fc1", "fc2", "head"]));
    c.coft = coft;
    c.eps = 100.0; // inside the ball: the projection is the identity, so the gradient is exact
    c.block_share = share;
    c
}

#[test]
fn new_methods_train_only_their_parameters() {
    use knobs_adapters::loha::LohaConfig;
    check_flow(Box::new(LohaConfig::new(lycoris(2, 4.0, false))), &[".hada_"]);
    check_flow(Box::new(LohaConfig::new(lycoris(2, 4.0, true))), &[".hada_"]);
    check_flow(Box::new(lokr(false, -1, false)), &[".lokr_"]);
    check_flow(Box::new(lokr(true, 2, true)), &[".lokr_"]);
    check_flow(Box::new(dora()), &[".lora_A.", ".lora_B.", ".lora_magnitude_vector."]);
    check_flow(Box::new(oft(false, false)), &[".oft_R."]);
    check_flow(Box::new(oft(true, true)), &[".oft_R."]);
}

#[test]
fn loha_gradients_match_finite_differences() {
    use knobs_adapters::loha::LohaConfig;
    finite_differences(Box::new(LohaConfig::new(lycoris(2, 4.0, false))), &["conv.hada_w1_a", "fc1.hada_w2_b", "head.hada_w1_b"]);
    finite_differences(Box::new(LohaConfig::new(lycoris(2, 4.0, true))), &["conv.hada_t1", "conv.hada_t2", "conv.hada_w2_a"]);
}

#[test]
fn lokr_gradients_match_finite_differences() {
    finite_differences(Box::new(lokr(false, -1, false)), &["conv.lokr_w1", "fc1.lokr_w2", "head.lokr_w1"]);
    finite_differences(Box::new(lokr(true, 4, true)), &["conv.lokr_t2", "fc1.lokr_w1_a", "fc2.lokr_w2_b"]);
}

#[test]
fn dora_gradients_match_finite_differences_with_the_norm_held_constant() {
    // PEFT treats ||W + s B A|| as a constant in the backward pass; a finite difference moves
    // it, so B is checked where the norm's share is small: with the magnitude and A.
    let device = cpu_autodiff();
    let mut m = AdaptedModel::new(TinyNet::new(5, &device), 6);
    m.add_adapter("a", Box::new(dora())).unwrap();
    randomize_adapters(&mut m.model, 0.5, 7);
    let b = batch(5, 8, &device);
    let samples = gradcheck::check(&mut m.model, |net| cross_entropy(net.forward(b.ids.clone(), b.img.clone()), &b.labels), 1e-2, 6);
    for s in samples.iter().filter(|s| s.path.contains("lora_magnitude_vector")) {
        assert!(s.rel_error() < 2e-2, "{}[{}]: autodiff {} vs numeric {}", s.path, s.index, s.analytic, s.numeric);
    }
    assert!(samples.iter().any(|s| s.path.contains("conv.lora_magnitude_vector")));
    assert!(samples.iter().any(|s| s.path.contains("fc1.lora_magnitude_vector")));
}

#[test]
fn oft_gradients_match_finite_differences() {
    finite_differences(Box::new(oft(false, false)), &["conv.oft_R", "fc1.oft_R", "head.oft_R"]);
    finite_differences(Box::new(oft(true, true)), &["conv.oft_R", "fc2.oft_R"]);
}

/// Under mixed precision a LoRA'd linear takes its bf16 input as it is (`takes_half_input`),
/// where it widened it to f32 first (rebuilt here from the same ops): the same output and the
/// same gradients of A and B, bit for bit; the input's gradient, now its two parts each
/// rounded to bf16 before they are added, within bf16's rounding of the widened path's.
#[test]
fn a_lora_takes_a_bf16_input_as_it_is() {
    use knobs_nn::burn::tensor::{DType, Distribution};
    use knobs_nn::param::{f32_value, value_as};
    use knobs_nn::Tensor;
    let device = cpu_autodiff();
    let mut m = AdaptedModel::new(vec![knobs_nn::Linear::new(96, 80, true, &mut knobs_nn::Init::new(1), &device)], 2);
    // alpha = r: the branch's scale is 1.
    m.add_adapter("a", Box::new(LoraConfig::new(4, 4.0, Pattern::names(&["0"])))).unwrap();
    randomize_adapters(&mut m.model, 0.5, 3);
    m.model.store_frozen_as(DType::BF16);
    let weights = knobs_nn::io::state_dict(&m.model);
    let factor = |name: &str| Tensor::<2>::from_data(weights[&format!("0.{name}.a.weight")].clone(), &device).require_grad();
    let x = Tensor::<2>::random([300, 96], Distribution::Normal(0.0, 1.0), &device).cast(DType::BF16);
    let probe = Tensor::<2>::random([300, 80], Distribution::Normal(0.0, 1.0), &device);
    let values = |t: Tensor<2>| -> Vec<f32> { t.cast(DType::F32).into_data().try_into_vec().unwrap() };
    let backward = |y: Tensor<2>| (f32_value(&y) * probe.clone()).sum().backward();

    let x_ours = x.clone().require_grad();
    let y = m.model[0].forward(x_ours.clone());
    assert_eq!(y.dtype(), DType::BF16);
    let grads = backward(y.clone());
    let mut ours = Vec::new();
    m.model.for_each_param(|path, p| match p.grad(&grads) {
        Some(g) => ours.push((path.to_string(), values(g.reshape([-1, 1])))),
        None => assert!(!p.is_trainable(), "`{path}` got no gradient"),
    });
    ours.sort_by(|p, q| p.0.cmp(&q.0));
    let dx = x_ours.grad(&grads).unwrap();
    assert_eq!(dx.dtype(), DType::BF16);

    // The widened path: the layer's product on the input rounded back, the branch in f32.
    let (x_wide, a, b) = (x.clone().require_grad(), factor("lora_A"), factor("lora_B"));
    let x32 = f32_value(&x_wide);
    let base = f32_value(&m.model[0].forward_base(value_as(&x32, DType::BF16)));
    let y_wide = value_as(&(base + knobs_nn::ops::low_rank(x32, a.clone(), b.clone(), 1.0)), DType::BF16);
    let grads = backward(y_wide.clone());
    let widened = vec![("0.lora_A.a.weight".to_string(), values(a.grad(&grads).unwrap().reshape([-1, 1]))), ("0.lora_B.a.weight".to_string(), values(b.grad(&grads).unwrap().reshape([-1, 1])))];

    assert!(values(y) == values(y_wide), "output");
    assert!(ours == widened, "the factors' gradients");
    let (dx, dx_wide) = (values(dx), values(x_wide.grad(&grads).unwrap()));
    let scale = dx_wide.iter().fold(0f32, |m, v| m.max(v.abs()));
    let off = dx.iter().zip(&dx_wide).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(off > 0.0 && off < 2f32.powi(-7), "input gradient off by {off}");
}
