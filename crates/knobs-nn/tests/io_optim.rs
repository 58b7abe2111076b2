//! safetensors io, strict loading, atomic writes, and AdamW against PyTorch's numbers.
use std::collections::{BTreeMap, HashMap};

use knobs_nn::burn::tensor::{DType, TensorData};
use knobs_nn::io::{LoadOptions, load_state_dict, read_safetensors, state_dict, write_safetensors};
use knobs_nn::optim::{AdamW, AdamWConfig, Grads, Optimizer, clip_grad_norm, grad_norm};
use knobs_nn::{Init, Linear, ModuleExt, Tensor, cpu, impl_module};

struct Two {
    a: Linear,
    b: Linear,
}
impl_module!(Two { "a" => a, "to_out.0" => b });

fn two(seed: u64) -> Two {
    let mut init = Init::new(seed);
    Two { a: Linear::new(3, 4, true, &mut init, &cpu()), b: Linear::new(4, 2, false, &mut init, &cpu()) }
}

#[test]
fn state_dict_round_trip_and_strict_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    let m = two(1);
    assert_eq!(m.param_paths(), ["a.weight", "a.bias", "to_out.0.weight"]);
    write_safetensors(&file, &state_dict(&m), &HashMap::from([("k".to_string(), "v".to_string())])).unwrap();
    let sd = read_safetensors(&file).unwrap();
    assert_eq!(sd.metadata["k"], "v");
    let mut other = two(2);
    load_state_dict(&mut other, &sd, LoadOptions::default()).unwrap();
    assert_eq!(state_dict(&other), state_dict(&m));

    let mut bad = sd.clone();
    bad.tensors.insert("a.weight".into(), TensorData::new(vec![0f32; 6], [2, 3]));
    let err = load_state_dict(&mut two(3), &bad, LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("m.safetensors") && err.contains("a.weight") && err.contains("shape"), "{err}");

    let mut extra = sd.clone();
    extra.tensors.insert("c.weight".into(), TensorData::new(vec![0f32; 1], [1]));
    let err = load_state_dict(&mut two(3), &extra, LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("c.weight"), "{err}");
    load_state_dict(&mut two(3), &extra, LoadOptions { allow_unexpected: true, ..Default::default() }).unwrap();

    let mut missing = sd.clone();
    missing.tensors.remove("a.bias");
    let err = load_state_dict(&mut two(3), &missing, LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("a.bias"), "{err}");
}

#[test]
fn corrupt_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.safetensors");
    write_safetensors(&file, &state_dict(&two(1)), &HashMap::new()).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 7]).unwrap();
    assert!(read_safetensors(&file).unwrap_err().to_string().contains("w.safetensors"));
    std::fs::write(&file, b"xx").unwrap();
    assert!(read_safetensors(&file).unwrap_err().to_string().contains("w.safetensors"));
    assert!(read_safetensors(dir.path().join("absent.safetensors")).unwrap_err().to_string().contains("absent.safetensors"));
    // Atomic writes leave no temporary files behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// The golden LoRA training step holds each parameter before and after one
/// `torch.optim.AdamW` step (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2) and its
/// gradient; our AdamW must land on the same values.
#[test]
fn adamw_matches_torch_step() {
    let sd = read_safetensors("../../../shared/golden/tensors/lora_train_step.safetensors").unwrap();
    let keys: Vec<String> = sd.tensors.keys().filter_map(|k| k.strip_prefix("grad.").map(String::from)).collect();
    assert!(keys.len() >= 10);
    struct Flat(Vec<(String, Tensor<1>)>);
    impl knobs_nn::Module for Flat {
        fn visit(&self, _: &str, v: &mut dyn knobs_nn::Visitor) {
            for (k, t) in &self.0 {
                v.param(k, knobs_nn::ParamRef::D1(t));
            }
        }
        fn visit_mut(&mut self, _: &str, v: &mut dyn knobs_nn::VisitorMut) {
            for (k, t) in &mut self.0 {
                v.param(k, knobs_nn::ParamMut::D1(t));
            }
        }
    }
    let flat = |key: &str| {
        let (v, _) = sd.f32(key).unwrap();
        let n = v.len();
        Tensor::<1>::from_data(TensorData::new(v, [n]), &cpu())
    };
    let mut model = Flat(keys.iter().map(|k| (k.clone(), flat(&format!("param_before.{k}")))).collect());
    let grads: Grads = keys.iter().map(|k| (k.clone(), flat(&format!("grad.{k}")))).collect();
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 });
    opt.step(&mut model, &grads, |_| 1e-3);
    for (k, t) in &model.0 {
        let got: Vec<f32> = t.to_data().try_into_vec().unwrap();
        let (want, _) = sd.f32(&format!("param_after.{k}")).unwrap();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-6, "{k}: max abs diff {worst}");
    }
}

#[test]
fn adamw_state_round_trips_and_clipping_bounds_the_norm() {
    let mut m = two(5);
    let grads = |m: &Two| -> Grads {
        let mut g = BTreeMap::new();
        m.for_each_param(|p, t| {
            g.insert(p.to_string(), t.flat() * 3.0 + 1.0);
        });
        g
    };
    let mut opt = AdamW::new(AdamWConfig::default());
    let g = grads(&m);
    opt.step(&mut m, &g, |_| 1e-2);
    let (tensors, meta) = opt.state();
    let file = tempfile::tempdir().unwrap();
    let path = file.path().join("opt.safetensors");
    write_safetensors(&path, &tensors, &meta).unwrap();
    let mut resumed = AdamW::new(AdamWConfig::default());
    resumed.load_state(&read_safetensors(&path).unwrap(), &cpu()).unwrap();
    let mut m2 = two(5);
    m2.for_each_param_mut(|p, mut t| t.assign(p, state_dict(&m)[p].clone()).unwrap());
    let g = grads(&m);
    opt.step(&mut m, &g, |_| 1e-2);
    resumed.step(&mut m2, &g, |_| 1e-2);
    assert_eq!(state_dict(&m), state_dict(&m2), "a resumed optimizer continues exactly");

    let mut g = grads(&m);
    let before = clip_grad_norm(&mut g, 0.5);
    assert!(before > 0.5);
    assert!((grad_norm(&g) - 0.5).abs() < 1e-4);
}

#[test]
fn identical_inputs_give_identical_safetensors_bytes() {
    // The metadata is a HashMap: without sorting, its key order (and the file's bytes) would
    // follow each map's random iteration order.
    let dir = tempfile::tempdir().unwrap();
    let tensors = std::collections::BTreeMap::from([
        ("b.weight".to_string(), TensorData::new(vec![1.0f32, 2.0], [2])),
        ("a.weight".to_string(), TensorData::new(vec![3.0f32], [1])),
    ]);
    let meta = || (0..12).map(|i| (format!("key{i}"), format!("value {i}"))).collect::<std::collections::HashMap<_, _>>();
    let first = dir.path().join("first.safetensors");
    write_safetensors(&first, &tensors, &meta()).unwrap();
    let bytes = std::fs::read(&first).unwrap();
    for k in 0..8 {
        let path = dir.path().join(format!("{k}.safetensors"));
        write_safetensors(&path, &tensors, &meta()).unwrap();
        assert!(std::fs::read(&path).unwrap() == bytes, "write {k} differs from the first");
    }
    let back = read_safetensors(&first).unwrap();
    assert_eq!(back.metadata.len(), 12);
    assert_eq!(back.f32("b.weight").unwrap().0, vec![1.0, 2.0]);
}

/// Written files get the mode any new file gets here (0666 less the umask), as diffusers' and
/// kohya's do, not the owner-only mode of a temporary file: another user's tool reads them.
#[cfg(unix)]
#[test]
fn written_files_are_readable_as_any_new_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, b"x").unwrap();
    let file = dir.path().join("lora.safetensors");
    write_safetensors(&file, &BTreeMap::from([("w".to_string(), TensorData::new(vec![1.0f32], [1]))]), &HashMap::new()).unwrap();
    let log = dir.path().join("sub/loss.csv");
    knobs_nn::io::atomic_write(&log, b"step,loss\n").unwrap();
    assert_eq!(mode(&file), mode(&plain));
    assert_eq!(mode(&log), mode(&plain));
}

#[test]
fn read_checked_refuses_pickles_and_non_finite_tensors_by_name() {
    use knobs_nn::io::{PICKLE_EXTENSIONS, read_checked, refuse_pickle};
    let dir = tempfile::tempdir().unwrap();
    for ext in PICKLE_EXTENSIONS.iter().copied().chain(["PTH"]) {
        let path = dir.path().join(format!("w.{ext}"));
        let e = read_checked(&path, "its `emb_params` tensor").unwrap_err().to_string();
        assert!(e.contains(&format!("w.{ext}")) && e.contains("pickle") && e.contains("emb_params"), "{e}");
    }
    refuse_pickle(dir.path().join("w.safetensors"), "").unwrap();
    // A pickle under a safetensors name is recognised by its first bytes.
    let disguised = dir.path().join("w.safetensors");
    std::fs::write(&disguised, b"PK\x03\x04archive/data.pkl").unwrap();
    let e = read_safetensors(&disguised).unwrap_err().to_string();
    assert!(e.contains("w.safetensors") && e.contains("pickle"), "{e}");

    let file = dir.path().join("poisoned.safetensors");
    let t = BTreeMap::from([
        ("a.ok".to_string(), TensorData::new(vec![1f32, 2.0], [2])),
        ("b.ids".to_string(), TensorData::new(vec![3i64, 4], [2])),
        ("c.bad".to_string(), TensorData::new(vec![0f32, f32::NAN, f32::INFINITY], [3])),
    ]);
    write_safetensors(&file, &t, &HashMap::new()).unwrap();
    let e = read_checked(&file, "").unwrap_err().to_string();
    assert!(e.contains("poisoned.safetensors") && e.contains("c.bad") && e.contains("2 of 3") && e.contains("NaN"), "{e}");
    // The plain reader (base checkpoints) still reads it: only user-supplied weights are checked.
    assert_eq!(read_safetensors(&file).unwrap().tensors.len(), 3);
}

/// Users' checkpoints are mostly fp16 or bf16: `load_file` reads them tensor by tensor into
/// f32 parameters, exactly the values `half` gives, with the same strict key checks.
#[test]
fn half_precision_files_load_tensor_by_tensor() {
    use knobs_nn::io::{SafetensorsReader, load_file};
    use safetensors::{Dtype, tensor::TensorView};
    let dir = tempfile::tempdir().unwrap();
    let want = state_dict(&two(5));
    for (dtype, name) in [(Dtype::F16, "f16"), (Dtype::BF16, "bf16")] {
        let round = |v: f32| if dtype == Dtype::F16 { half::f16::from_f32(v).to_f32() } else { half::bf16::from_f32(v).to_f32() };
        let encoded: Vec<(String, Vec<u8>, Vec<usize>)> = want
            .iter()
            .map(|(k, d)| {
                let v: Vec<f32> = d.try_to_vec::<f32>().unwrap();
                let bytes = v.iter().flat_map(|&x| if dtype == Dtype::F16 { half::f16::from_f32(x).to_le_bytes() } else { half::bf16::from_f32(x).to_le_bytes() }).collect();
                (k.clone(), bytes, d.shape().as_slice().to_vec())
            })
            .collect();
        let views: Vec<(&str, TensorView)> = encoded.iter().map(|(k, b, s)| (k.as_str(), TensorView::new(dtype, s.clone(), b).unwrap())).collect();
        let file = dir.path().join(format!("m-{name}.safetensors"));
        std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();

        let mut m = two(6);
        let report = load_file(&mut m, &file, LoadOptions::default()).unwrap();
        assert_eq!(report.loaded.len(), 3);
        for (k, d) in state_dict(&m) {
            let got: Vec<f32> = d.try_to_vec::<f32>().unwrap();
            let expect: Vec<f32> = want[&k].try_to_vec::<f32>().unwrap().into_iter().map(round).collect();
            assert_eq!(got, expect, "{name} {k}");
            assert_ne!(got, want[&k].try_to_vec::<f32>().unwrap(), "{name} {k}: the values went through half precision");
        }
        assert_eq!(SafetensorsReader::open(&file).unwrap().keys().count(), 3);

        // Into half-precision storage (`--weights-dtype`): the file's own bits where the dtypes
        // agree, else converted; either way the model an f32 load narrowed afterwards gives,
        // with vectors kept f32.
        for keep in [DType::F16, DType::BF16] {
            let mut narrow = two(6);
            load_file(&mut narrow, &file, LoadOptions::frozen_as(keep)).unwrap();
            let mut after = two(7);
            load_file(&mut after, &file, LoadOptions::default()).unwrap();
            after.store_frozen_as(keep);
            let (got, want) = (state_dict(&narrow), state_dict(&after));
            assert_eq!(got["a.weight"].dtype(), keep, "{name} into {keep:?}");
            assert_eq!(got["a.bias"].dtype(), DType::F32, "{name} into {keep:?}");
            for (k, d) in &got {
                assert_eq!(d.as_bytes(), want[k].as_bytes(), "{name} into {keep:?}: {k}");
            }
            if format!("{keep:?}").to_lowercase() == name {
                let bits = SafetensorsReader::open(&file).unwrap().read_as("a.weight", Some(keep)).unwrap();
                assert_eq!(bits.dtype(), keep, "read as stored");
                assert_eq!(bits.as_bytes(), &encoded.iter().find(|e| e.0 == "a.weight").unwrap().1[..]);
            }
        }

        // A truncated file is refused when opened, naming it.
        let bytes = std::fs::read(&file).unwrap();
        let cut = dir.path().join(format!("cut-{name}.safetensors"));
        std::fs::write(&cut, &bytes[..bytes.len() - 2]).unwrap();
        let e = load_file(&mut two(6), &cut, LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains(&format!("cut-{name}.safetensors")), "{e}");
    }
    // Strictness as load_state_dict: a model with a parameter the file lacks names it.
    struct Three {
        a: Linear,
        b: Linear,
        c: Linear,
    }
    impl_module!(Three { "a" => a, "to_out.0" => b, "c" => c });
    let mut init = Init::new(0);
    let mut three = Three { a: Linear::new(3, 4, true, &mut init, &cpu()), b: Linear::new(4, 2, false, &mut init, &cpu()), c: Linear::new(2, 2, false, &mut init, &cpu()) };
    let e = load_file(&mut three, dir.path().join("m-f16.safetensors"), LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("c.weight") && e.contains("m-f16.safetensors"), "{e}");
}

/// A half-precision tensor longer than the reader's piece (2^20 values) comes back whole:
/// every piece read at its own offset and widened into its own place.
#[test]
fn long_half_precision_tensors_read_piece_by_piece() {
    use knobs_nn::io::SafetensorsReader;
    use safetensors::{Dtype, tensor::TensorView};
    let n = (1 << 21) + 37;
    let want: Vec<half::f16> = (0..n).map(|i| half::f16::from_f32(((i % 4099) as f32 - 2049.0) / 64.0)).collect();
    let bytes: Vec<u8> = want.iter().flat_map(|x| x.to_le_bytes()).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.safetensors");
    let views = vec![("w", TensorView::new(Dtype::F16, vec![n], &bytes).unwrap())];
    std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
    let got: Vec<f32> = SafetensorsReader::open(&file).unwrap().read("w").unwrap().try_to_vec::<f32>().unwrap();
    assert_eq!(got.len(), n);
    assert!(got.iter().zip(&want).all(|(g, w)| *g == w.to_f32()), "a piece was read at the wrong offset or widened wrongly");

    // Read into the other half type (an fp16 file into bf16 storage, and back), converted
    // piece by piece: each value rounded once from its f32 value, as narrowing an f32 read
    // rounds it. The bf16 values span f16's subnormals and overflow.
    let into_bf16 = SafetensorsReader::open(&file).unwrap().read_as("w", Some(DType::BF16)).unwrap();
    assert_eq!(into_bf16.dtype(), DType::BF16);
    let into_bf16: Vec<half::bf16> = into_bf16.try_to_vec().unwrap();
    assert!(into_bf16.iter().zip(&want).all(|(g, w)| *g == half::bf16::from_f32(w.to_f32())), "f16 into bf16");
    assert!(into_bf16.iter().zip(&want).any(|(g, w)| g.to_f32() != w.to_f32()), "some values round");
    let wide: Vec<half::bf16> = (0..n).map(|i| half::bf16::from_f32(((i % 4099) as f32 - 2049.0) * 10f32.powi((i % 17) as i32 - 10))).collect();
    let bytes: Vec<u8> = wide.iter().flat_map(|x| x.to_le_bytes()).collect();
    let bf16_file = dir.path().join("long-bf16.safetensors");
    std::fs::write(&bf16_file, safetensors::serialize(vec![("w", TensorView::new(Dtype::BF16, vec![n], &bytes).unwrap())], None).unwrap()).unwrap();
    let into_f16: Vec<half::f16> = SafetensorsReader::open(&bf16_file).unwrap().read_as("w", Some(DType::F16)).unwrap().try_to_vec().unwrap();
    assert!(into_f16.iter().zip(&wide).all(|(g, w)| g.to_bits() == half::f16::from_f32(w.to_f32()).to_bits()), "bf16 into f16");
    assert!(into_f16.iter().any(|g| g.is_infinite()) && into_f16.iter().any(|g| !g.is_normal() && *g != half::f16::ZERO && g.is_finite()), "the range is covered");
}

/// One scale for the whole file: the largest difference over the largest value; a key or a
/// shape that differs is named.
#[test]
fn relative_distance_uses_the_files_largest_value() {
    let dict = |pairs: &[(&str, Vec<f32>)]| knobs_nn::io::StateDict {
        tensors: pairs.iter().map(|(k, v)| (k.to_string(), TensorData::new(v.clone(), [v.len()]))).collect(),
        ..Default::default()
    };
    let a = dict(&[("up", vec![0.0, 0.0]), ("down", vec![4.0, -2.0])]);
    let b = dict(&[("up", vec![0.0, 0.5]), ("down", vec![4.0, -2.0])]);
    assert_eq!(a.relative_distance(&b).unwrap(), 0.125);
    assert_eq!(a.relative_distance(&a).unwrap(), 0.0);
    let short = dict(&[("up", vec![0.0]), ("down", vec![4.0, -2.0])]);
    assert!(a.relative_distance(&short).unwrap_err().to_string().contains("up"));
    let more = dict(&[("up", vec![0.0, 0.0]), ("down", vec![4.0, -2.0]), ("extra", vec![1.0])]);
    assert!(a.relative_distance(&more).unwrap_err().to_string().contains("extra"));
}
