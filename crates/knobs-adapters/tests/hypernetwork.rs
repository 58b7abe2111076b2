//! A1111-style hypernetworks on a small attention model that is not a UNet: gradients through
//! the shared key/value MLPs agree with finite differences, only the hypernetwork trains,
//! strength 0 is the base, files round-trip exactly with A1111's keys, and pickles and bad
//! files are refused by name.
use knobs_adapters::hypernetwork::{self, Activation, HypernetworkConfig, Structure};
use knobs_adapters::lora::LoraConfig;
use knobs_adapters::{AdaptedModel, Pattern, PeftType};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::burn::tensor::activation::softmax;
use knobs_nn::io::{read_safetensors, write_safetensors};
use knobs_nn::{Device, Init, Linear, ModuleExt, Tensor, cpu, cpu_autodiff, gradcheck, impl_module};

/// Single-head softmax attention with diffusers' layer names.
struct Attn {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}
impl_module!(Attn { "to_q" => to_q, "to_k" => to_k, "to_v" => to_v, "to_out.0" => to_out });

impl Attn {
    fn new(query: usize, context: usize, init: &mut Init, dev: &Device) -> Self {
        Attn {
            to_q: Linear::new(query, 4, false, init, dev),
            to_k: Linear::new(context, 4, false, init, dev),
            to_v: Linear::new(context, 4, false, init, dev),
            to_out: Linear::new(4, query, true, init, dev),
        }
    }
    fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let context = context.unwrap_or_else(|| x.clone());
        let (q, k, v) = (self.to_q.forward(x), self.to_k.forward(context.clone()), self.to_v.forward(context));
        let probs = softmax(q.matmul(k.swap_dims(1, 2)) / 2.0, 2);
        self.to_out.forward(probs.matmul(v))
    }
}

/// Self-attention on 8-wide features, then two cross-attentions on a 6-wide context: widths
/// 8 and 6, the 6-wide module pair shared by two layers.
struct Net {
    a1: Attn,
    a2: Attn,
    a3: Attn,
}
impl_module!(Net { "blocks.0.attn1" => a1, "blocks.0.attn2" => a2, "blocks.1.attn2" => a3 });

impl Net {
    fn new(dev: &Device) -> Self {
        let mut init = Init::new(11);
        Net { a1: Attn::new(8, 8, &mut init, dev), a2: Attn::new(8, 6, &mut init, dev), a3: Attn::new(8, 6, &mut init, dev) }
    }
    fn forward(&self, x: Tensor<3>, ctx: Tensor<3>) -> Tensor<3> {
        let h = x.clone() + self.a1.forward(x, None);
        let h = h.clone() + self.a2.forward(h, Some(ctx.clone()));
        h.clone() + self.a3.forward(h, Some(ctx))
    }
}

fn inputs(dev: &Device) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
    let mut init = Init::new(5);
    (init.normal([2, 3, 8], 1.0, dev), init.normal([2, 5, 6], 1.0, dev), init.normal([2, 3, 8], 1.0, dev))
}

fn structure(layers: &[f64], activation: Activation, norm: bool, dropout: f64) -> Structure {
    Structure {
        layer_structure: layers.to_vec(),
        activation,
        add_layer_norm: norm,
        activate_output: false,
        dropout_structure: Structure::dropout_after_hidden(layers.len(), dropout),
    }
}

fn config(s: Structure) -> HypernetworkConfig {
    HypernetworkConfig::new(&["to_k"], &["to_v"], s).unwrap()
}

/// Adds N(0, std) to every hypernetwork parameter, so that checks do not sit at the tiny
/// A1111 initialisation.
fn randomize(m: &mut Net, std: f32, seed: u64) {
    let mut init = Init::new(seed);
    m.for_each_param_mut(|path, mut p| {
        if path.contains(".hypernetwork.") {
            let n = p.as_ref().numel();
            let base: Vec<f32> = p.as_ref().flat().into_data().try_into_vec().unwrap();
            let v: Vec<f32> = base.iter().zip(init.normal_vec(n)).map(|(b, z)| b + z * std).collect();
            p.replace_flat(Tensor::from_data(TensorData::new(v, [n]), &p.device()));
        }
    });
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

/// A hypernetwork saved to `dir/good.safetensors`, its tensors, and the model it was taken
/// off again.
fn saved_then_removed(dir: &std::path::Path) -> (AdaptedModel<Net>, std::path::PathBuf, knobs_nn::io::StateDict) {
    let mut m = adapted(structure(&[1.0, 2.0, 1.0], Activation::Relu, false, 0.0), &cpu());
    let good = dir.join("good.safetensors");
    hypernetwork::save(&m, "hn", &good).unwrap();
    m.delete_adapter("hn").unwrap();
    let sd = read_safetensors(&good).unwrap();
    (m, good, sd)
}

fn adapted(s: Structure, dev: &Device) -> AdaptedModel<Net> {
    let mut m = AdaptedModel::new(Net::new(dev), 3);
    hypernetwork::attach(&mut m, "hn", config(s)).unwrap();
    randomize(&mut m.model, 0.4, 9);
    m
}

#[test]
fn sequential_indices_are_a1111s() {
    // [1, 2, 2, 1], relu, layer norm, dropout after both hidden layers: A1111's Sequential is
    // Linear ReLU LayerNorm Dropout | Linear ReLU LayerNorm Dropout | Linear LayerNorm.
    let s = Structure { activation: Activation::Relu, add_layer_norm: true, ..structure(&[1.0, 2.0, 2.0, 1.0], Activation::Relu, true, 0.3) };
    let stages = s.stages(10).unwrap();
    assert_eq!(stages.iter().map(|s| s.linear).collect::<Vec<_>>(), vec![0, 4, 8]);
    assert_eq!(stages.iter().map(|s| s.norm).collect::<Vec<_>>(), vec![Some(2), Some(6), Some(9)]);
    assert_eq!(stages.iter().map(|s| (s.d_in, s.d_out)).collect::<Vec<_>>(), vec![(10, 20), (20, 20), (20, 10)]);
    assert_eq!(stages.iter().map(|s| s.activate).collect::<Vec<_>>(), vec![true, true, false]);
    // Python's int(): 1.5 * 5 = 7.5 -> 7; linear activation adds no module.
    let t = structure(&[1.0, 1.5, 1.0], Activation::Linear, false, 0.0);
    let stages = t.stages(5).unwrap();
    assert_eq!(stages.iter().map(|s| (s.linear, s.d_out)).collect::<Vec<_>>(), vec![(0, 7), (1, 5)]);
    // A1111's parse_dropout_structure.
    assert_eq!(Structure::a1111_dropout(3, true, false), vec![0.0, 0.0, 0.0]);
    assert_eq!(Structure::a1111_dropout(3, true, true), vec![0.0, 0.3, 0.0]);
    assert_eq!(Structure::a1111_dropout(4, true, false), vec![0.0, 0.3, 0.0, 0.0]);
    assert_eq!(Activation::parse("Swish").unwrap(), Activation::Swish);
    assert_eq!(Activation::parse("None").unwrap(), Activation::Linear);
    let e = Activation::parse("prelu").unwrap_err();
    assert!(e.contains("prelu") && e.contains("tanh"), "{e}");
    for (bad, word) in [(vec![2.0, 2.0, 1.0], "start and end with 1"), (vec![1.0], "at least two"), (vec![1.0, -2.0, 1.0], "positive")] {
        let s = Structure { layer_structure: bad.clone(), dropout_structure: vec![0.0; bad.len()], ..Structure::default() };
        let e = HypernetworkConfig::new(&["to_k"], &["to_v"], s).unwrap_err().to_string();
        assert!(e.contains("layer_structure") && e.contains(word), "{e}");
    }
    let s = Structure { dropout_structure: vec![0.0, 0.3, 0.2], ..Structure::default() };
    let e = HypernetworkConfig::new(&["to_k"], &["to_v"], s).unwrap_err().to_string();
    assert!(e.contains("dropout_structure") && e.contains("last"), "{e}");
}

#[test]
fn gradients_match_finite_differences_through_attention() {
    let dev = cpu_autodiff();
    let (x, ctx, target) = inputs(&dev);
    for s in [
        structure(&[1.0, 2.0, 1.0], Activation::Tanh, true, 0.0),
        Structure { activate_output: true, ..structure(&[1.0, 1.5, 2.0, 1.0], Activation::Silu, false, 0.3) },
    ] {
        let mut m = adapted(s.clone(), &dev);
        let samples = gradcheck::check(&mut m.model, |net| (net.forward(x.clone(), ctx.clone()) * target.clone()).sum(), 1e-2, 4);
        // 2 widths x 2 kinds, each with every Linear (and LayerNorm) weight and bias.
        let per_module = 2 * s.stages(1).unwrap().len() * if s.add_layer_norm { 2 } else { 1 };
        let paths: std::collections::BTreeSet<&str> = samples.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(paths.len(), 4 * per_module, "{paths:?}");
        for needle in ["attn1.to_k.hypernetwork.hn.8.0.", "attn1.to_v.hypernetwork.hn.8.1.", "blocks.0.attn2.to_k.hypernetwork.hn.6.0.", "blocks.0.attn2.to_v.hypernetwork.hn.6.1."] {
            assert!(paths.iter().any(|p| p.contains(needle)), "no sample under {needle}: {paths:?}");
        }
        for s in &samples {
            assert!(s.rel_error() < 2e-2, "{}[{}]: autodiff {} vs numeric {}", s.path, s.index, s.analytic, s.numeric);
        }
    }
}

#[test]
fn only_the_shared_modules_train() {
    let dev = cpu_autodiff();
    let (x, ctx, target) = inputs(&dev);
    let m = adapted(structure(&[1.0, 2.0, 1.0], Activation::Relu, true, 0.0), &dev);
    let grads = (m.model.forward(x, ctx) * target).sum().backward();
    let mut trainable = Vec::new();
    m.model.for_each_param(|path, p| {
        let g = p.grad(&grads);
        if p.is_trainable() {
            let g = g.unwrap_or_else(|| panic!("trainable `{path}` got no gradient"));
            assert!(g.abs().sum().into_scalar::<f32>() > 0.0, "trainable `{path}` got a zero gradient");
            trainable.push(path.to_string());
        } else {
            assert!(g.is_none(), "frozen `{path}` received a gradient");
        }
    });
    // One module per (width, kind), owned by the first layer of that width: the second
    // cross-attention shares the first one's modules and lists no parameters of its own.
    assert!(trainable.iter().all(|p| p.contains(".hypernetwork.hn.")), "{trainable:?}");
    assert_eq!(trainable.len(), 4 * 2 * 4, "{trainable:?}");
    assert!(!trainable.iter().any(|p| p.starts_with("blocks.1.")), "{trainable:?}");
    assert_eq!(hypernetwork::adapted_layers(&m.model, "hn").len(), 6);
}

#[test]
fn strength_scales_the_residual_and_zero_is_the_base() {
    let dev = cpu();
    let (x, ctx, _) = inputs(&dev);
    let mut m = adapted(structure(&[1.0, 2.0, 1.0], Activation::Linear, false, 0.0), &dev);
    m.freeze();
    let base = values(m.with_disabled(|n| n.forward(x.clone(), ctx.clone())));
    let keys = |m: &AdaptedModel<Net>| values(m.model.a2.to_k.forward(ctx.clone()));
    let base_k = m.with_disabled(|n| values(n.a2.to_k.forward(ctx.clone())));
    let one = keys(&m);
    hypernetwork::set_strength(&mut m.model, "hn", 2.5);
    let more = keys(&m);
    // to_k is linear, so its output moves 2.5 times as far.
    for ((b, o), t) in base_k.iter().zip(&one).zip(&more) {
        assert!(((t - b) - 2.5 * (o - b)).abs() < 1e-5, "{b} {o} {t}");
    }
    assert!(one.iter().zip(&base_k).any(|(a, b)| (a - b).abs() > 1e-3), "the hypernetwork changes nothing");
    hypernetwork::set_strength(&mut m.model, "hn", 0.0);
    assert_eq!(values(m.model.forward(x, ctx)), base, "strength 0 must be the base model exactly");
}

#[test]
fn merging_is_refused() {
    let dev = cpu();
    let (x, ctx, _) = inputs(&dev);
    let mut m = adapted(structure(&[1.0, 2.0, 1.0], Activation::Tanh, false, 0.0), &dev);
    m.freeze();
    let before = values(m.model.forward(x.clone(), ctx.clone()));
    let e = m.merge(&[]).unwrap_err().to_string();
    assert!(e.contains("hn") && e.contains("cannot be merged"), "{e}");
    assert!(m.merge(&["hn"]).is_err());
    assert_eq!(values(m.model.forward(x, ctx)), before);
}

#[test]
fn dropout_runs_only_in_training_and_is_reproducible() {
    let dev = cpu_autodiff();
    let (x, ctx, _) = inputs(&dev);
    let s = structure(&[1.0, 2.0, 1.0], Activation::Linear, false, 0.5);
    let mut m = adapted(s.clone(), &dev);
    let run = |m: &AdaptedModel<Net>| values(m.model.forward(x.clone(), ctx.clone()));
    let a = run(&m);
    assert_eq!(a, run(&m), "the masks of one input must not change between evaluations");
    m.set_training(false);
    let eval = run(&m);
    assert_ne!(a, eval, "dropout had no effect while training");
    m.set_training(true);
    assert_eq!(run(&m), a);
    // Loaded for inference and never told to train: no dropout.
    let mut frozen = adapted(s, &dev);
    frozen.freeze();
    let max = run(&frozen).iter().zip(&eval).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    assert!(max < 1e-6, "{max}");
}

#[test]
fn widths_select_the_layers() {
    let dev = cpu();
    let mut m = AdaptedModel::new(Net::new(&dev), 3);
    let layers = hypernetwork::attach(&mut m, "hn", config(Structure::default()).with_sizes(vec![6]).unwrap()).unwrap();
    assert_eq!(layers, ["blocks.0.attn2.to_k", "blocks.0.attn2.to_v", "blocks.1.attn2.to_k", "blocks.1.attn2.to_v"]);
    let e = hypernetwork::attach(&mut m, "other", config(Structure::default()).with_sizes(vec![6, 7]).unwrap()).unwrap_err().to_string();
    assert!(e.contains("width 7") && e.contains("[6, 8]"), "{e}");
    assert_eq!(m.adapter_names(), ["hn"], "a failed attach leaves nothing behind");
    let e = hypernetwork::attach(&mut m, "x", HypernetworkConfig::new(&["to_kk"], &["to_v"], Structure::default()).unwrap()).unwrap_err().to_string();
    assert!(e.contains("to_kk") && e.contains("to_k"), "{e}");
}

#[test]
fn files_round_trip_exactly_with_a1111_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("style.safetensors");
    let dev = cpu();
    let (x, ctx, _) = inputs(&dev);
    let s = Structure { activate_output: true, ..structure(&[1.0, 2.0, 1.0], Activation::Swish, true, 0.2) };
    let mut m = adapted(s.clone(), &dev);
    m.freeze();
    hypernetwork::set_strength(&mut m.model, "hn", 0.7);
    let want = values(m.model.forward(x.clone(), ctx.clone()));
    hypernetwork::save(&m, "hn", &file).unwrap();

    let sd = read_safetensors(&file).unwrap();
    let keys: Vec<&str> = sd.tensors.keys().map(String::as_str).collect();
    // Linear, Hardswish, LayerNorm, Dropout | Linear, Hardswish (activate_output), LayerNorm.
    for k in ["6.0.linear.0.weight", "6.0.linear.0.bias", "6.1.linear.2.weight", "8.0.linear.4.weight", "8.1.linear.6.bias"] {
        assert!(keys.contains(&k), "missing {k}: {keys:?}");
    }
    assert_eq!(keys.len(), 2 * 2 * 8);
    assert_eq!(sd.tensors["6.0.linear.0.weight"].shape().as_slice(), [12, 6]);
    assert_eq!(sd.metadata["layer_structure"], "[1.0,2.0,1.0]");
    assert_eq!(sd.metadata["activation_func"], "swish");
    assert_eq!(sd.metadata["is_layer_norm"], "true");
    assert_eq!(sd.metadata["dropout_structure"], "[0.0,0.2,0.0]");
    assert_eq!(sd.metadata["enable_sizes"], "[6,8]");

    let mut other = AdaptedModel::new(Net::new(&dev), 99);
    other.model.for_inference();
    let layers = hypernetwork::load(&mut other, &file, "loaded", 0.7).unwrap();
    assert_eq!(layers.len(), 6);
    assert_eq!(values(other.model.forward(x.clone(), ctx.clone())), want, "a loaded file must reproduce the outputs exactly");
    let cfg = hypernetwork::config_of(&other, "loaded").unwrap();
    assert_eq!(cfg.structure, s);
    assert_eq!(other.config("loaded").unwrap().peft_type(), PeftType::Hypernetwork);
    // Saving the loaded one gives the same tensors.
    let again = dir.path().join("again.safetensors");
    hypernetwork::save(&other, "loaded", &again).unwrap();
    assert_eq!(read_safetensors(&again).unwrap().tensors, sd.tensors);
}

#[test]
fn pickles_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let pt = dir.path().join("anime_style.pt");
    std::fs::write(&pt, b"\x80\x02}q\x00.").unwrap();
    let e = hypernetwork::read(&pt).unwrap_err().to_string();
    assert!(e.contains("anime_style.pt") && e.contains("pickle") && e.contains(".safetensors"), "{e}");
    // A zip-format torch file under a safetensors name is recognised by its bytes.
    let disguised = dir.path().join("disguised.safetensors");
    std::fs::write(&disguised, b"PK\x03\x04archive/data.pkl").unwrap();
    let e = hypernetwork::read(&disguised).unwrap_err().to_string();
    assert!(e.contains("disguised.safetensors") && e.contains("pickle"), "{e}");
}

#[test]
fn bad_files_name_the_file_and_key_and_leave_the_model_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, good, sd) = saved_then_removed(dir.path());

    let write = |name: &str, edit: &dyn Fn(&mut knobs_nn::io::StateDict)| {
        let mut s = sd.clone();
        edit(&mut s);
        let path = dir.path().join(name);
        write_safetensors(&path, &s.tensors, &s.metadata).unwrap();
        path
    };
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (write("no_structure.safetensors", &|s| drop(s.metadata.remove("layer_structure"))), "layer_structure"),
        (write("bad_act.safetensors", &|s| drop(s.metadata.insert("activation_func".into(), "prelu".into()))), "activation_func"),
        (write("bad_width.safetensors", &|s| {
            let t = s.tensors.remove("6.0.linear.0.weight").unwrap();
            s.tensors.insert("7.0.linear.0.weight".into(), t);
        }), "width 7"),
        (write("missing.safetensors", &|s| drop(s.tensors.remove("8.1.linear.2.bias"))), "8.1.linear.2.bias"),
        (write("shape.safetensors", &|s| drop(s.tensors.insert("8.0.linear.0.weight".into(), TensorData::new(vec![0f32; 8], [1, 8])))), "8.0.linear.0.weight"),
        (write("extra.safetensors", &|s| drop(s.tensors.insert("8.0.linear.5.weight".into(), TensorData::new(vec![0f32; 8], [8])))), "8.0.linear.5.weight"),
        (write("odd_key.safetensors", &|s| drop(s.tensors.insert("emb_params".into(), TensorData::new(vec![0f32; 8], [8])))), "emb_params"),
        (write("norm_flag.safetensors", &|s| drop(s.metadata.insert("is_layer_norm".into(), "true".into()))), "8.0.linear.2.weight"),
    ];
    for (path, word) in cases {
        let e = hypernetwork::load(&mut m, &path, "x", 1.0).unwrap_err().to_string();
        let file = path.file_name().unwrap().to_str().unwrap();
        assert!(e.contains(file) && e.contains(word), "{file}: {e}");
        assert!(m.adapter_names().is_empty(), "{file}: the failed load left an adapter");
        assert!(hypernetwork::adapted_layers(&m.model, "x").is_empty());
    }
    hypernetwork::load(&mut m, &good, "x", 1.0).unwrap();
}

#[test]
fn layer_level_merge_is_an_error_not_a_panic() {
    let dev = cpu();
    let (x, ctx, _) = inputs(&dev);
    let mut m = adapted(structure(&[1.0, 2.0, 1.0], Activation::Tanh, false, 0.0), &dev);
    m.freeze();
    let before = values(m.model.forward(x.clone(), ctx.clone()));
    let mut errors = Vec::new();
    m.model.for_each_layer_mut(|_, mut layer| {
        if layer.has_adapter("hn") {
            errors.push(layer.merge_adapter("hn").unwrap_err().to_string());
        }
    });
    assert_eq!(errors.len(), 6);
    assert!(errors.iter().all(|e| e.contains("`hn`") && e.contains("cannot be merged")), "{errors:?}");
    m.model.for_each_layer(|path, l| assert!(l.adapter_states().iter().all(|(_, s)| s.merged.is_none()), "{path} recorded a merge"));
    assert_eq!(values(m.model.forward(x, ctx)), before, "a refused merge changed the model");
}

#[test]
fn non_finite_tensors_are_refused_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, _, mut sd) = saved_then_removed(dir.path());
    let n = sd.tensors["8.1.linear.2.bias"].num_elements();
    let mut v = vec![0.5f32; n];
    v[n - 1] = f32::NAN;
    sd.tensors.insert("8.1.linear.2.bias".into(), TensorData::new(v, [n]));
    let bad = dir.path().join("poisoned.safetensors");
    write_safetensors(&bad, &sd.tensors, &sd.metadata).unwrap();
    let e = hypernetwork::load(&mut m, &bad, "x", 1.0).unwrap_err().to_string();
    assert!(e.contains("poisoned.safetensors") && e.contains("8.1.linear.2.bias") && e.contains("NaN"), "{e}");
    assert!(m.adapter_names().is_empty());
}

#[test]
fn every_pickle_extension_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["pt", "pth", "bin", "ckpt", "pkl", "PT"] {
        let path = dir.path().join(format!("style.{ext}"));
        let e = hypernetwork::read(&path).unwrap_err().to_string();
        assert!(e.contains(&format!("style.{ext}")) && e.contains("pickle"), "{e}");
    }
}

#[test]
fn a_merge_a_layer_refuses_is_an_error_and_undoes_the_whole_call() {
    let dev = cpu();
    let (x, ctx, _) = inputs(&dev);
    let mut m = adapted(structure(&[1.0, 2.0, 1.0], Activation::Tanh, false, 0.0), &dev);
    m.add_adapter("lo", Box::new(LoraConfig::new(2, 2.0, Pattern::names(&["to_q", "to_k"])))).unwrap();
    let mut init = Init::new(4);
    m.model.for_each_param_mut(|path, mut p| {
        if path.contains(".lora_B.") {
            let n = p.as_ref().numel();
            p.replace_flat(Tensor::from_data(TensorData::new(init.normal_vec(n), [n]), &p.device()));
        }
    });
    m.freeze();
    m.set_adapters(&[("hn", 1.0), ("lo", 1.0)]).unwrap();
    let before = values(m.model.forward(x.clone(), ctx.clone()));
    // A config that says it merges (as a careless new method might) passes the up-front check;
    // the layers must still refuse, after `lo` was merged into the same layers.
    m.adopt("hn", Box::new(LoraConfig::new(1, 1.0, Pattern::names(&["to_k"])))).unwrap();
    let e = m.merge(&["lo", "hn"]).unwrap_err().to_string();
    assert!(e.contains("`hn`") && e.contains("to_k") && e.contains("cannot be merged"), "{e}");
    m.model.for_each_layer(|path, l| assert!(l.adapter_states().iter().all(|(_, s)| s.merged.is_none()), "{path} is still merged"));
    let after = values(m.model.forward(x, ctx));
    let diff = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-5, "the failed merge changed the outputs by {diff}");
}
