//! LoHa, LoKr, DoRA and OFT on the real UNet against PEFT 0.21.2 (fixtures made by
//! `scripts/make_adapter_method_goldens.py`, described in `fixtures/adapter_methods/README.md`):
//! each PEFT folder reproduces PEFT's adapted output, unmerged and merged, the base output
//! comes back with the adapter disabled, and a folder knobs writes reads back identically.
use std::path::{Path, PathBuf};

use knobs_adapters::AdaptedModel;
use knobs_adapters::formats::peft;
use knobs_diffusion::unet::UNet2DConditionModel;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, read_safetensors};
use knobs_nn::{Device, Tensor, cpu};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adapter_methods")
}

fn unet(device: &Device) -> AdaptedModel<UNet2DConditionModel> {
    AdaptedModel::new(UNet2DConditionModel::from_dir(Path::new(GOLDEN).join("tiny-sd/unet"), device).unwrap(), 0)
}

fn tensor<const D: usize>(sd: &StateDict, key: &str, device: &Device) -> Tensor<D> {
    let (values, shape) = sd.f32(key).unwrap();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// max |a - b| / max |b|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    diff / want.iter().map(|b| b.abs()).fold(0f32, f32::max)
}

fn run(m: &UNet2DConditionModel, g: &StateDict) -> Vec<f32> {
    let device = cpu();
    let t: Tensor<1> = tensor(g, "timestep", &device);
    let out = m.forward(tensor(g, "sample", &device), t, tensor(g, "encoder_hidden_states", &device));
    out.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// Unmerged output against `want`, merged against `want_merged`, base with the adapter
/// disabled, and the merge undone exactly.
fn check(m: &mut AdaptedModel<UNet2DConditionModel>, g: &StateDict, want: &str, want_merged: &str, label: &str) {
    let unmerged = run(&m.model, g);
    let err = rel_err(&unmerged, &g.f32(want).unwrap().0);
    let base = m.with_disabled(|b| run(b, g));
    let base_err = rel_err(&base, &g.f32("out_base").unwrap().0);
    m.merge(&[]).unwrap();
    let merged = run(&m.model, g);
    let merged_err = rel_err(&merged, &g.f32(want_merged).unwrap().0);
    m.unmerge();
    let again = rel_err(&run(&m.model, g), &unmerged);
    println!("{label}: rel {err:.2e}; merged {merged_err:.2e}; base {base_err:.2e}; after unmerge {again:.2e}");
    assert!(err <= 1e-4, "{label}: unmerged {err}");
    assert!(merged_err <= 1e-4, "{label}: merged {merged_err}");
    assert!(base_err <= 1e-4, "{label}: base {base_err}");
    assert!(again <= 1e-5, "{label}: unmerge {again}");
    assert!(rel_err(&base, &unmerged) > 0.03, "{label}: the adapter changes the output");
}

fn peft_case(case: &str, want: &str, want_merged: &str) {
    let g = read_safetensors(fixtures().join("unet_methods.safetensors")).unwrap();
    let mut m = unet(&cpu());
    peft::load(&mut m, fixtures().join(format!("{case}_peft")), case).unwrap();
    check(&mut m, &g, want, want_merged, case);

    // Written by knobs, read back: the same adapter.
    let dir = tempfile::tempdir().unwrap();
    peft::save(&m, case, dir.path()).unwrap();
    let mut back = unet(&cpu());
    peft::load(&mut back, dir.path(), case).unwrap();
    let e = rel_err(&run(&back.model, &g), &g.f32(want).unwrap().0);
    assert!(e <= 1e-4, "{case}: saved and reloaded {e}");
}

#[test]
fn loha_matches_peft() {
    peft_case("loha", "out_loha", "out_loha_merged");
    peft_case("loha_cp", "out_loha_cp", "out_loha_cp_merged");
}

#[test]
fn lokr_matches_peft() {
    peft_case("lokr", "out_lokr", "out_lokr_merged");
    peft_case("lokr_cp", "out_lokr_cp", "out_lokr_cp_merged");
    peft_case("lokr_both", "out_lokr_both", "out_lokr_both_merged");
}

#[test]
fn dora_matches_peft() {
    peft_case("dora", "out_dora", "out_dora_merged");
}

#[test]
fn oft_matches_peft() {
    peft_case("oft", "out_oft", "out_oft_merged");
    peft_case("oft_coft", "out_oft_coft", "out_oft_coft_merged");
    peft_case("oft_cayley", "out_oft_cayley", "out_oft_cayley_merged");
    // PEFT 0.21's unmerged path on 3x3 convolutions folds overlapping patches (it changes the
    // output even at the identity); knobs runs what PEFT merges, unmerged and merged.
    peft_case("oft_conv3x3", "out_oft_conv3x3_merged", "out_oft_conv3x3_merged");
}

/// A LyCORIS file (made by LyCORIS 4.1.3 through its kohya wrapper, F16 tensors) gives
/// LyCORIS's output unmerged and merged; knobs writes it back as a file that loads to the same.
fn lycoris_case(case: &str) {
    use knobs_adapters::formats::lycoris;
    let g = read_safetensors(fixtures().join("unet_methods.safetensors")).unwrap();
    let file = read_safetensors(fixtures().join(format!("{case}.safetensors"))).unwrap();
    assert!(lycoris::is_lycoris(&file));
    let parts = lycoris::read(&file).unwrap();
    assert_eq!(parts.keys().collect::<Vec<_>>(), ["unet"]);
    let mut m = unet(&cpu());
    let paths = lycoris::attach(&mut m, case, &parts["unet"], &file.file).unwrap();
    assert_eq!(paths.len(), 66, "{case}: 48 attention projections, 12 resnet conv1, 6 proj_in");
    let want = format!("out_{case}");
    check(&mut m, &g, &want, &want, case);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("written.safetensors");
    lycoris::save(&out, &[("unet", &lycoris::from_adapter(&m, case).unwrap())], None).unwrap();
    let written = read_safetensors(&out).unwrap();
    assert_eq!(written.tensors.keys().collect::<Vec<_>>(), file.tensors.keys().collect::<Vec<_>>(), "{case}: the same keys as LyCORIS writes");
    let mut back = unet(&cpu());
    lycoris::attach(&mut back, case, &lycoris::read(&written).unwrap()["unet"], &out).unwrap();
    let e = rel_err(&run(&back.model, &g), &g.f32(&want).unwrap().0);
    assert!(e <= 1e-4, "{case}: written by knobs and read back {e}");
}

#[test]
fn lycoris_files_match_lycoris() {
    for case in ["loha_lycoris", "lokr_lycoris", "lokr_both_lycoris", "dora_lycoris", "oft_lycoris", "oft_constrained_lycoris"] {
        lycoris_case(case);
    }
}

/// Writes adapters made by knobs (fresh, with every parameter moved off its identity start)
/// as PEFT folders and LyCORIS files, with knobs' UNet output for each, into
/// `$KNOBS_EXPORT_DIR`; `scripts/check_knobs_adapters_in_peft.sh` loads them with PEFT and
/// LyCORIS and compares. Ignored in CI (it needs the Python reference stack).
#[test]
#[ignore]
fn export_knobs_adapters_for_peft() {
    use knobs_adapters::formats::lycoris;
    use knobs_adapters::loha::LohaConfig;
    use knobs_adapters::lokr::LokrConfig;
    use knobs_adapters::lora::LoraConfig;
    use knobs_adapters::lycoris::LycorisOptions;
    use knobs_adapters::oft::OftConfig;
    use knobs_adapters::{AdapterConfig, Pattern};
    use knobs_nn::{Init, ModuleExt};

    let Ok(dir) = std::env::var("KNOBS_EXPORT_DIR") else { panic!("set KNOBS_EXPORT_DIR") };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let g = read_safetensors(fixtures().join("unet_methods.safetensors")).unwrap();
    let targets = || Pattern::names(&["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]);
    let lyc = |r, a, cp| LycorisOptions { use_effective_conv2d: cp, ..LycorisOptions::new(r, a, targets()) };
    let cases: Vec<(&str, Box<dyn AdapterConfig>, bool)> = vec![
        ("knobs_loha", Box::new(LohaConfig::new(lyc(4, 8.0, false))), true),
        ("knobs_loha_cp", Box::new(LohaConfig::new(lyc(4, 8.0, true))), false),
        ("knobs_lokr", Box::new(LokrConfig::new(lyc(4, 8.0, false))), true),
        ("knobs_lokr_both", Box::new(LokrConfig { decompose_both: true, decompose_factor: 8, ..LokrConfig::new(lyc(2, 4.0, true)) }), false),
        ("knobs_dora", Box::new(LoraConfig { use_dora: true, ..LoraConfig::new(4, 8.0, targets()) }), true),
        ("knobs_oft", Box::new(OftConfig::new(32, Pattern::names(&["to_q", "to_k", "to_v", "to_out.0", "proj_in"]))), false),
        ("knobs_oft_cayley", Box::new(OftConfig { use_cayley_neumann: false, ..OftConfig::new(8, Pattern::names(&["to_q", "to_k", "to_v", "proj_in"])) }), false),
    ];
    let mut outputs = std::collections::BTreeMap::new();
    for (k, v) in &g.tensors {
        if ["sample", "timestep", "encoder_hidden_states"].contains(&k.as_str()) {
            outputs.insert(k.clone(), v.clone());
        }
    }
    for (i, (case, config, lyc_file)) in cases.into_iter().enumerate() {
        let mut m = unet(&cpu());
        m.add_adapter(case, config).unwrap();
        let mut init = Init::new(100 + i as u64);
        let markers = [".hada_", ".lokr_", ".lora_", ".oft_R."];
        m.model.for_each_param_mut(|path, mut p| {
            if markers.iter().any(|s| path.contains(s)) {
                let n = p.as_ref().numel();
                let base: Vec<f32> = p.as_ref().flat().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
                let std = if path.contains(".oft_R.") { 0.02 } else if path.contains("magnitude") { 0.0 } else { 0.15 };
                let v: Vec<f32> = base.iter().zip(init.normal_vec(n)).map(|(b, z)| b + z * std).collect();
                p.replace_flat(Tensor::from_data(TensorData::new(v, [n]), &p.device()));
            }
        });
        m.freeze();
        let out = run(&m.model, &g);
        let change = rel_err(&out, &g.f32("out_base").unwrap().0);
        println!("{case}: changes the output by {change:.3}");
        assert!(change > 0.01, "{case}");
        let shape = g.get("out_base").unwrap().shape().as_slice().to_vec();
        outputs.insert(format!("out_{case}"), TensorData::new(out.clone(), shape.clone()));
        peft::save(&m, case, dir.join(format!("{case}_peft"))).unwrap();
        if lyc_file {
            lycoris::save(dir.join(format!("{case}_lycoris.safetensors")), &[("unet", &lycoris::from_adapter(&m, case).unwrap())], None).unwrap();
            outputs.insert(format!("out_{case}_lycoris"), TensorData::new(out, shape));
        }
    }
    // diag-OFT has no config of its own to start from: LyCORIS's file, its blocks moved.
    let file = read_safetensors(fixtures().join("oft_constrained_lycoris.safetensors")).unwrap();
    let mut m = unet(&cpu());
    lycoris::attach(&mut m, "d", &lycoris::read(&file).unwrap()["unet"], &file.file).unwrap();
    let mut init = Init::new(99);
    m.model.for_each_param_mut(|path, mut p| {
        if path.contains(".oft_blocks.") {
            let n = p.as_ref().numel();
            let base: Vec<f32> = p.as_ref().flat().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
            let v: Vec<f32> = base.iter().zip(init.normal_vec(n)).map(|(b, z)| b + z * 0.05).collect();
            p.replace_flat(Tensor::from_data(TensorData::new(v, [n]), &p.device()));
        }
    });
    let out = run(&m.model, &g);
    outputs.insert("out_knobs_diag_oft_lycoris".into(), TensorData::new(out, g.get("out_base").unwrap().shape().as_slice().to_vec()));
    lycoris::save(dir.join("knobs_diag_oft_lycoris.safetensors"), &[("unet", &lycoris::from_adapter(&m, "d").unwrap())], None).unwrap();
    knobs_nn::io::write_safetensors(dir.join("expect.safetensors"), &outputs, &Default::default()).unwrap();
}

/// Bad LyCORIS files are refused naming the file key at fault.
#[test]
fn bad_lycoris_files_name_the_key() {
    use knobs_adapters::formats::lycoris;
    let file = read_safetensors(fixtures().join("dora_lycoris.safetensors")).unwrap();
    let module = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k";
    let err = |sd: &StateDict| -> String {
        match lycoris::read(sd) {
            Err(e) => e.to_string(),
            Ok(parts) => lycoris::attach(&mut unet(&cpu()), "x", &parts["unet"], &sd.file).unwrap_err().to_string(),
        }
    };
    // A magnitude per input channel (LyCORIS wd_on_out=False).
    let mut sd = file.clone();
    sd.tensors.insert(format!("{module}.dora_scale"), TensorData::new(vec![1f32; 32], [1, 32]));
    let e = err(&sd);
    assert!(e.contains(&format!("{module}.dora_scale")) && e.contains("wd_on_out"), "{e}");
    // A tensor name LyCORIS does not write.
    let mut sd = file.clone();
    sd.tensors.insert(format!("{module}.lora_mid.weight"), TensorData::new(vec![0f32; 4], [2, 2]));
    let e = err(&sd);
    assert!(e.contains(&format!("{module}.lora_mid.weight")), "{e}");
    // A module whose kohya name no layer has.
    let mut sd = file.clone();
    let (key, t) = sd.tensors.iter().find(|(k, _)| k.starts_with(module) && k.ends_with(".dora_scale")).map(|(k, t)| (k.clone(), t.clone())).unwrap();
    sd.tensors.remove(&key);
    sd.tensors.insert("lora_unet_no_such_layer.dora_scale".into(), t);
    for suffix in ["lora_down.weight", "lora_up.weight", "alpha"] {
        let t = sd.tensors.remove(&format!("{module}.{suffix}")).unwrap();
        sd.tensors.insert(format!("lora_unet_no_such_layer.{suffix}"), t);
    }
    let e = err(&sd);
    assert!(e.contains("lora_unet_no_such_layer") && e.contains("no layer"), "{e}");
    // Two methods in one file.
    let mut sd = file;
    sd.tensors.insert("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a".into(), TensorData::new(vec![0f32; 4], [2, 2]));
    let e = err(&sd);
    assert!(e.contains("proj_in") && e.contains("two methods"), "{e}");
}
