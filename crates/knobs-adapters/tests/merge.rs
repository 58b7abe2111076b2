//! Merging, unmerging, multiple adapters with weights, disabling, deleting and combining.
mod common;

use std::collections::BTreeMap;

use common::*;
use knobs_adapters::ia3::Ia3Config;
use knobs_adapters::lora::{Combination, LoraConfig, combine};
use knobs_adapters::{AdaptedModel, Pattern};
use knobs_nn::burn::tensor::{DType, TensorData};
use knobs_nn::ops::kernel_layout;
use knobs_nn::io::state_dict;
use knobs_nn::{Tensor, cpu};

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec().unwrap()
}

/// max |a - b| / max |b|
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64)) / scale.max(1e-12)
}

fn rel_data(a: &TensorData, b: &TensorData) -> f64 {
    rel(&a.clone().convert::<f32>().try_into_vec::<f32>().unwrap(), &b.clone().convert::<f32>().try_into_vec::<f32>().unwrap())
}

fn base_weights(m: &TinyNet) -> BTreeMap<String, TensorData> {
    let adapter = [".lora_", ".ia3_l", ".hada_", ".lokr_", ".oft_R"];
    state_dict(m).into_iter().filter(|(k, _)| !adapter.iter().any(|a| k.contains(a))).collect()
}

fn setup() -> (AdaptedModel<TinyNet>, Batch) {
    setup_stored(DType::F32)
}

/// [`setup`] with the frozen matrices and kernels stored in `dtype` once the adapters are
/// attached: the base's narrow, the adapters' kept in f32.
fn setup_stored(dtype: DType) -> (AdaptedModel<TinyNet>, Batch) {
    let device = cpu();
    let mut m = AdaptedModel::new(TinyNet::new(11, &device), 12);
    m.add_adapter("lora", Box::new(LoraConfig::new(3, 6.0, Pattern::names(&["embed", "conv", "fc1", "fc2", "head"])))).unwrap();
    m.add_adapter("ia3", Box::new(Ia3Config::new(Pattern::names(&["conv", "fc1", "fc2"]), Pattern::names(&["fc2"])))).unwrap();
    randomize_adapters(&mut m.model, 0.3, 13);
    knobs_nn::ModuleExt::store_frozen_as(&mut m.model, dtype);
    (m, batch(7, 14, &device))
}

fn out(m: &TinyNet, b: &Batch) -> Vec<f32> {
    values(m.forward(b.ids.clone(), b.img.clone()))
}

#[test]
fn merged_output_equals_unmerged_and_unmerge_restores_base() {
    let (mut m, b) = setup();
    let base_before = base_weights(&m.model);
    let base_out = m.with_disabled(|net| out(net, &b));
    let adapted = out(&m.model, &b);
    assert!(rel(&adapted, &base_out) > 1e-2, "adapters must change the output for this test to mean anything");

    m.merge(&[]).unwrap();
    let merged = out(&m.model, &b);
    assert!(rel(&merged, &adapted) < 1e-5, "merged {}", rel(&merged, &adapted));
    assert!(base_weights(&m.model).iter().any(|(k, v)| rel_data(v, &base_before[k]) > 1e-4), "merge changed no weight");

    m.unmerge();
    for (k, v) in base_weights(&m.model) {
        assert!(rel_data(&v, &base_before[&k]) < 1e-5, "{k} not restored: {}", rel_data(&v, &base_before[&k]));
    }
    assert!(rel(&out(&m.model, &b), &adapted) < 1e-5);
}

#[test]
fn merge_and_unload_gives_plain_model_with_same_output() {
    let (m, b) = setup();
    let adapted = out(&m.model, &b);
    let plain = m.merge_and_unload().unwrap();
    assert!(knobs_nn::ModuleExt::param_paths(&plain).iter().all(|p| !p.contains("lora") && !p.contains("ia3")));
    assert!(rel(&out(&plain, &b), &adapted) < 1e-5);
}

#[test]
fn weights_active_set_disable_and_delete() {
    let (mut m, b) = setup();
    let base_out = m.with_disabled(|net| out(net, &b));
    m.set_adapters(&[("lora", 0.0)]).unwrap();
    assert!(rel(&out(&m.model, &b), &base_out) < 1e-6, "weight 0 must equal the base");
    m.set_adapters(&[("lora", 1.0)]).unwrap();
    let full = out(&m.model, &b);
    m.set_adapters(&[("lora", 0.5)]).unwrap();
    let half = out(&m.model, &b);
    assert!(rel(&half, &full) > 1e-3 && rel(&half, &base_out) > 1e-3);
    assert_eq!(m.active_adapters(), vec!["lora".to_string()]);

    // Merging with a weight and unmerging after the weight changed must still restore the base.
    let before = base_weights(&m.model);
    m.merge(&["lora"]).unwrap();
    assert!(rel(&out(&m.model, &b), &half) < 1e-5);
    m.set_adapters(&[("lora", 2.0)]).unwrap();
    m.unmerge();
    for (k, v) in base_weights(&m.model) {
        assert!(rel_data(&v, &before[&k]) < 1e-5, "{k}");
    }

    assert!(m.set_active(&["nope"]).is_err());
    m.delete_adapter("lora").unwrap();
    m.delete_adapter("ia3").unwrap();
    assert!(m.adapter_names().is_empty());
    assert!(rel(&out(&m.model, &b), &base_out) < 1e-6);
    assert!(knobs_nn::ModuleExt::param_paths(&m.model).iter().all(|p| !p.contains("lora")));
}

fn two_loras(r1: usize, r2: usize) -> (AdaptedModel<TinyNet>, Batch) {
    let device = cpu();
    let mut m = AdaptedModel::new(TinyNet::new(21, &device), 22);
    let targets = Pattern::names(&["embed", "conv", "fc1", "fc2", "head"]);
    m.add_adapter("x", Box::new(LoraConfig::new(r1, 4.0, targets.clone()))).unwrap();
    m.add_adapter("y", Box::new(LoraConfig::new(r2, 2.0, targets))).unwrap();
    randomize_adapters(&mut m.model, 0.3, 23);
    (m, batch(5, 24, &device))
}

#[test]
fn combine_cat_equals_weighted_adapters_together() {
    let (mut m, b) = two_loras(2, 3);
    m.set_adapters(&[("x", 0.7), ("y", 1.3)]).unwrap();
    let together = out(&m.model, &b);
    combine(&mut m, &[("x", 0.7), ("y", 1.3)], "xy", Combination::Cat).unwrap();
    m.set_active(&["xy"]).unwrap();
    assert!(rel(&out(&m.model, &b), &together) < 1e-5);
}

#[test]
fn combine_svd_at_full_rank_is_exact_and_lower_rank_is_close() {
    let (mut m, b) = two_loras(2, 3);
    m.set_adapters(&[("x", 1.0), ("y", 0.5)]).unwrap();
    let together = out(&m.model, &b);
    m.set_active(&[]).unwrap();
    let base = out(&m.model, &b);
    combine(&mut m, &[("x", 1.0), ("y", 0.5)], "full", Combination::Svd { rank: 5 }).unwrap();
    m.set_active(&["full"]).unwrap();
    assert!(rel(&out(&m.model, &b), &together) < 1e-4);
    combine(&mut m, &[("x", 1.0), ("y", 0.5)], "low", Combination::Svd { rank: 2 }).unwrap();
    m.set_active(&["low"]).unwrap();
    let low = out(&m.model, &b);
    let diff = |a: &[f32], c: &[f32]| a.iter().zip(c).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>();
    assert!(diff(&low, &together) < diff(&base, &together), "rank-2 approximation should be nearer than no adapter");
}

#[test]
fn combine_linear_needs_equal_ranks_and_sums_factors() {
    let (mut m, _) = two_loras(2, 3);
    assert!(combine(&mut m, &[("x", 1.0), ("y", 1.0)], "bad", Combination::Linear).is_err());
    let (mut m, b) = two_loras(2, 2);
    // One source with weight w: linear is exact (sqrt(w s) A, sqrt(w s) B).
    m.set_adapters(&[("x", 0.6)]).unwrap();
    let single = out(&m.model, &b);
    combine(&mut m, &[("x", 0.6)], "lx", Combination::Linear).unwrap();
    m.set_active(&["lx"]).unwrap();
    assert!(rel(&out(&m.model, &b), &single) < 1e-5);
}

/// Sets every value of parameter `path` to `v`.
fn poison(m: &mut TinyNet, path: &str, v: f32) {
    let mut found = false;
    knobs_nn::ModuleExt::for_each_param_mut(m, |p, mut t| {
        if p == path {
            let n = t.as_ref().numel();
            t.replace_flat(Tensor::from_data(TensorData::new(vec![v; n], [n]), &t.device()));
            found = true;
        }
    });
    assert!(found, "no parameter {path}");
}

/// The layers that carry an adapter named `name`.
fn layers_with(m: &TinyNet, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    knobs_nn::ModuleExt::for_each_layer(m, |path, l| {
        if l.adapter_states().iter().any(|(n, _)| n == name) {
            out.push(path.to_string());
        }
    });
    out
}

#[test]
fn combine_failing_on_a_later_layer_leaves_no_adapter_behind() {
    let device = cpu();
    let mut m = AdaptedModel::new(TinyNet::new(21, &device), 22);
    let targets = Pattern::names(&["embed", "conv", "fc1", "fc2", "head"]);
    // Equal ranks everywhere but on `head`, the last layer visited: linear fails only there.
    let mut x = LoraConfig::new(2, 4.0, targets.clone());
    x.rank_pattern.insert("head".into(), 3);
    m.add_adapter("x", Box::new(x)).unwrap();
    m.add_adapter("y", Box::new(LoraConfig::new(2, 2.0, targets))).unwrap();
    let e = combine(&mut m, &[("x", 1.0), ("y", 1.0)], "xy", Combination::Linear).unwrap_err().to_string();
    assert!(e.contains("head"), "{e}");
    assert_eq!(layers_with(&m.model, "xy"), Vec::<String>::new());
    assert_eq!(m.adapter_names(), vec!["x", "y"]);
    // A name already in use is refused and the adapter holding it is left as it was.
    let before = state_dict(&m.model);
    let e = combine(&mut m, &[("y", 1.0)], "x", Combination::Cat).unwrap_err().to_string();
    assert!(e.contains("`x`"), "{e}");
    assert_eq!(state_dict(&m.model).keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>());
    assert_eq!(layers_with(&m.model, "x").len(), 5);
}

#[test]
fn combine_refuses_non_finite_sources_naming_adapter_and_layer() {
    let cases = [(Combination::Linear, f32::NAN), (Combination::Cat, f32::INFINITY), (Combination::Svd { rank: 2 }, f32::NAN), (Combination::Svd { rank: 2 }, f32::NEG_INFINITY)];
    for (how, bad) in cases {
        let (mut m, _) = two_loras(2, 2);
        poison(&mut m.model, "blocks.0.fc2.lora_B.y.weight", bad);
        let e = combine(&mut m, &[("x", 1.0), ("y", 1.0)], "xy", how).unwrap_err().to_string();
        assert!(e.contains("`y`") && e.contains("blocks.0.fc2") && e.contains("finite"), "{how:?} {bad}: {e}");
        assert!(layers_with(&m.model, "xy").is_empty(), "{how:?}: a refused combine attached adapters");
        assert!(m.config("xy").is_err());
    }
}

/// Each new method, stacked on a LoRA added first: merged output equals unmerged, unmerging
/// restores the base bit for bit up to rounding, and merging with a weight then unmerging
/// after the weight changed still restores it.
fn merge_roundtrip(name: &str, config: Box<dyn knobs_adapters::AdapterConfig>, weight_zero_is_base: bool) {
    let device = cpu();
    let mut m = AdaptedModel::new(TinyNet::new(31, &device), 32);
    let targets = Pattern::names(&["conv", "fc1", "fc2", "head"]);
    m.add_adapter("lora", Box::new(LoraConfig::new(2, 4.0, targets))).unwrap();
    m.add_adapter(name, config).unwrap();
    randomize_adapters(&mut m.model, 0.3, 33);
    let b = batch(6, 34, &device);
    let base_before = base_weights(&m.model);
    let base_out = m.with_disabled(|net| out(net, &b));
    let adapted = out(&m.model, &b);
    assert!(rel(&adapted, &base_out) > 1e-2, "{name}: the adapters must change the output");

    m.merge(&[]).unwrap();
    assert!(rel(&out(&m.model, &b), &adapted) < 1e-5, "{name}: merged {}", rel(&out(&m.model, &b), &adapted));
    m.unmerge();
    for (k, v) in base_weights(&m.model) {
        assert!(rel_data(&v, &base_before[&k]) < 1e-5, "{name}: {k} not restored: {}", rel_data(&v, &base_before[&k]));
    }
    assert!(rel(&out(&m.model, &b), &adapted) < 1e-5);

    m.set_adapters(&[(name, 0.5)]).unwrap();
    let half = out(&m.model, &b);
    m.merge(&[name]).unwrap();
    assert!(rel(&out(&m.model, &b), &half) < 1e-5, "{name}: merged at weight 0.5");
    m.set_adapters(&[(name, 2.0)]).unwrap();
    m.unmerge();
    for (k, v) in base_weights(&m.model) {
        assert!(rel_data(&v, &base_before[&k]) < 1e-5, "{name}: {k} after a weighted merge");
    }
    if weight_zero_is_base {
        m.set_adapters(&[(name, 0.0)]).unwrap();
        assert!(rel(&out(&m.model, &b), &base_out) < 1e-6, "{name}: weight 0 must equal the base");
    }
    let plain = { m.set_adapters(&[("lora", 1.0), (name, 1.0)]).unwrap(); m.merge_and_unload().unwrap() };
    assert!(rel(&out(&plain, &b), &adapted) < 1e-5, "{name}: merge_and_unload");
}

fn lycoris(cp: bool) -> knobs_adapters::lycoris::LycorisOptions {
    let mut o = knobs_adapters::lycoris::LycorisOptions::new(2, 3.0, Pattern::names(&["conv", "fc1", "fc2", "head"]));
    o.use_effective_conv2d = cp;
    o
}

#[test]
fn loha_and_lokr_merge_and_unmerge_exactly() {
    use knobs_adapters::{loha::LohaConfig, lokr::LokrConfig};
    merge_roundtrip("loha", Box::new(LohaConfig::new(lycoris(false))), true);
    merge_roundtrip("loha_cp", Box::new(LohaConfig::new(lycoris(true))), true);
    merge_roundtrip("lokr", Box::new(LokrConfig::new(lycoris(false))), true);
    merge_roundtrip("lokr_both", Box::new(LokrConfig { decompose_both: true, decompose_factor: 2, ..LokrConfig::new(lycoris(true)) }), true);
}

#[test]
fn dora_merges_and_unmerges_exactly() {
    let cfg = LoraConfig { use_dora: true, ..LoraConfig::new(2, 3.0, Pattern::names(&["conv", "fc1", "fc2", "head"])) };
    merge_roundtrip("dora", Box::new(cfg), false);
}

#[test]
fn oft_merges_and_unmerges_exactly() {
    use knobs_adapters::oft::OftConfig;
    let targets = Pattern::names(&["conv", "fc1", "fc2", "head"]);
    merge_roundtrip("oft", Box::new(OftConfig::new(4, targets.clone())), true);
    merge_roundtrip("oft_exact", Box::new(OftConfig { use_cayley_neumann: false, ..OftConfig::new(4, targets.clone()) }), true);
    merge_roundtrip("oft_coft", Box::new(OftConfig { coft: true, eps: 1e-2, block_share: true, ..OftConfig::new(4, targets) }), true);
}

/// kohya's resize: at the adapter's own rank the output is unchanged and every layer keeps all
/// its energy; at rank 1 the reported energy is what the kept singular value holds, and the
/// model lies between the base and the full adapter; an energy target picks per-layer ranks.
#[test]
fn resize_is_exact_at_full_rank_and_reports_the_energy_kept() {
    use knobs_adapters::lora::{RankTarget, resize};
    let (mut m, b) = two_loras(3, 2);
    m.set_active(&["x"]).unwrap();
    let full = out(&m.model, &b);
    m.set_active(&[]).unwrap();
    let base = out(&m.model, &b);
    m.set_active(&["x"]).unwrap();
    let rows = resize(&mut m, "x", RankTarget::Rank(3)).unwrap();
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r.to == r.from.min(3) && (r.energy - 1.0).abs() < 1e-9), "{rows:?}");
    assert!(rel(&out(&m.model, &b), &full) < 1e-5);

    let rows = resize(&mut m, "x", RankTarget::Rank(1)).unwrap();
    assert!(rows.iter().all(|r| r.to == 1 && r.energy > 0.0 && r.energy < 1.0), "{rows:?}");
    let low = out(&m.model, &b);
    let diff = |a: &[f32], c: &[f32]| a.iter().zip(c).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>();
    assert!(diff(&low, &full) < diff(&base, &full));
    assert!(diff(&low, &full) > 0.0);
    // Resizing a rank-1 adapter to energy 1 keeps rank 1 everywhere.
    let rows = resize(&mut m, "x", RankTarget::Energy(1.0)).unwrap();
    assert!(rows.iter().all(|r| r.to == 1 && (r.energy - 1.0).abs() < 1e-9));
    assert!(resize(&mut m, "x", RankTarget::Energy(0.0)).is_err());
    assert!(resize(&mut m, "nope", RankTarget::Rank(1)).is_err());
}

fn dtypes(m: &impl knobs_nn::Module) -> BTreeMap<String, DType> {
    let mut out = BTreeMap::new();
    knobs_nn::ModuleExt::for_each_param(m, |path, p| {
        out.insert(path.to_string(), p.to_data().dtype());
    });
    out
}

/// A model whose frozen weights are stored in bf16 (generation under `--mixed-precision bf16`,
/// training with `--weights-dtype`) keeps them so through a merge and an unmerge: merges
/// compute in f32, and keeping their result would double the layers' memory.
#[test]
fn merging_into_bf16_weights_keeps_them_bf16() {
    let (mut m, b) = setup_stored(DType::BF16);
    let stored = dtypes(&m.model);
    let narrow: Vec<&String> = stored.iter().filter(|(_, d)| **d == DType::BF16).map(|(k, _)| k).collect();
    assert!(narrow.len() >= 4, "the base's matrices and kernels are bf16: {narrow:?}");
    let adapter = [".lora_", ".ia3_l"];
    assert!(narrow.iter().all(|k| !adapter.iter().any(|a| k.contains(a))), "adapters stay f32: {narrow:?}");
    let base_before = base_weights(&m.model);
    let adapted = out(&m.model, &b);

    m.merge(&[]).unwrap();
    assert_eq!(dtypes(&m.model), stored, "dtypes after the merge");
    assert!(base_weights(&m.model).iter().any(|(k, v)| rel_data(v, &base_before[k]) > 1e-2), "merge changed no weight");
    // Rounding the merged weights to bf16 moves the output by about bf16's precision.
    let merged = rel(&out(&m.model, &b), &adapted);
    assert!(merged < 2e-2, "merged {merged}");

    let merged_weights = base_weights(&m.model);
    m.unmerge();
    assert_eq!(dtypes(&m.model), stored, "dtypes after the unmerge");
    let largest = |d: &TensorData| d.clone().convert::<f32>().try_into_vec::<f32>().unwrap().iter().fold(1e-12f32, |m, v| m.max(v.abs())) as f64;
    for (k, v) in base_weights(&m.model) {
        // Rounded to bf16 (8 bits of mantissa) at the merged weight's size, then again at the
        // base's: what PEFT's and diffusers' unmerge of a bf16 model gives too.
        let bound = 2f64.powi(-8) * (largest(&merged_weights[&k]) / largest(&base_before[&k]) + 1.0);
        assert!(rel_data(&v, &base_before[&k]) <= bound, "{k} not restored: {} > {bound}", rel_data(&v, &base_before[&k]));
    }
}

/// A large frozen bf16 3x3 kernel, laid out by tap where AMX's convolution runs, is laid out
/// so again after a merge and an unmerge (it keeps no packed copy), and its output follows.
#[test]
fn a_merged_kernel_laid_out_by_tap_stays_so() {
    let device = cpu();
    let mut m = AdaptedModel::new(vec![knobs_nn::Conv2d::new(640, 640, 3, 1, 1, true, &mut knobs_nn::Init::new(41), &device)], 42);
    m.add_adapter("lora", Box::new(LoraConfig::new(4, 4.0, Pattern::names(&["0"])))).unwrap();
    randomize_adapters(&mut m.model, 0.05, 43);
    knobs_nn::ModuleExt::store_frozen_as(&mut m.model, DType::BF16);
    let by_tap = kernel_layout::is_by_tap(&m.model[0].weight);
    if !by_tap {
        eprintln!("this CPU runs no AMX convolution: the dtype alone is checked");
    }
    let x = Tensor::<4>::random([1, 640, 8, 8], knobs_nn::burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    let flat = |t: Tensor<4>| -> Vec<f32> { t.into_data().convert::<f32>().try_into_vec().unwrap() };
    let adapted = flat(m.model[0].forward(x.clone()));

    m.merge(&[]).unwrap();
    assert_eq!(m.model[0].weight.dtype(), DType::BF16);
    assert_eq!(kernel_layout::is_by_tap(&m.model[0].weight), by_tap, "the layout by tap after the merge");
    let merged = rel(&flat(m.model[0].forward(x.clone())), &adapted);
    assert!(merged < 2e-2, "merged {merged}");
    m.unmerge();
    assert_eq!(m.model[0].weight.dtype(), DType::BF16);
    assert_eq!(kernel_layout::is_by_tap(&m.model[0].weight), by_tap, "the layout by tap after the unmerge");
}

/// `without_adapters` takes every layer's adapters off (embedding, convolution and linear
/// alike) for what it runs, which then sees the model's own parameters and output only, and
/// puts them back as they were: what a UNet's weights file, read after adapters attached,
/// is loaded through.
#[test]
fn adapters_are_taken_off_and_put_back() {
    use knobs_nn::ModuleExt;
    let (mut m, b) = setup();
    let (all, adapted) = (m.model.param_paths(), out(&m.model, &b));
    let (mut own, bare) = m.model.without_adapters(|net| (net.param_paths(), out(net, &b)));
    own.sort();
    assert_eq!(own, base_weights(&m.model).into_keys().collect::<Vec<_>>());
    assert!(all.len() > own.len());
    assert_eq!(bare, m.with_disabled(|net| out(net, &b)));
    assert_eq!(m.model.param_paths(), all);
    assert_eq!(out(&m.model, &b), adapted, "every adapter is back");
}
