//! A model file or checkpoint is written tensor by tensor from the tensors the model and the
//! optimizer hold (shared, not copied): the allocations a save makes stay a few tensors' worth,
//! not the size of the file. Alone in its binary, as it counts every allocation.
mod common;

use std::collections::{BTreeMap, HashMap};

use common::counting::extra_peak;
use knobs_nn::io::{FloatDtype, TensorRef, param_refs, read_safetensors, state_dict, write_safetensors, write_tensor_refs};
use knobs_nn::optim::{AdamW, AdamWConfig, Grads, Optimizer};
use knobs_nn::{Init, Linear, ModuleExt, cpu};

#[test]
fn a_model_and_its_optimizer_state_are_written_tensor_by_tensor() {
    const MB: usize = 1 << 20;
    let (mut init, dev) = (Init::new(0), cpu());
    // 16 weights of 4 MiB: 64 MiB of parameters, 128 MiB of AdamW moments.
    let mut model: Vec<Linear> = (0..16).map(|_| Linear::new(1024, 1024, false, &mut init, &dev)).collect();
    let mut opt = AdamW::new(AdamWConfig::default());
    let mut grads = Grads::new();
    model.for_each_param(|path, p| {
        grads.insert(path.to_string(), init.normal([p.numel()], 1e-3, &dev));
    });
    Optimizer::step(&mut opt, &mut model, &grads, &|_| 1e-3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("checkpoint.safetensors");
    let peak = extra_peak(|| {
        let mut tensors: BTreeMap<String, TensorRef> = param_refs(&model).into_iter().map(|(k, t)| (format!("model.{k}"), t)).collect();
        let (state, meta) = opt.state_refs();
        tensors.extend(state.into_iter().map(|(k, t)| (format!("optim.{k}"), t)));
        write_tensor_refs(&file, &tensors, &meta, FloatDtype::F32).unwrap();
    });
    assert!(peak < 24 * MB, "writing 192 MiB allocated {} MiB at once", peak / MB);

    // The file holds what a copy of everything, written the old way, holds, byte for byte.
    let mut copied: BTreeMap<String, _> = state_dict(&model).into_iter().map(|(k, d)| (format!("model.{k}"), d)).collect();
    let (state, meta): (BTreeMap<_, _>, HashMap<_, _>) = opt.state();
    copied.extend(state.into_iter().map(|(k, d)| (format!("optim.{k}"), d)));
    let reference = dir.path().join("copied.safetensors");
    write_safetensors(&reference, &copied, &meta).unwrap();
    assert!(std::fs::read(&file).unwrap() == std::fs::read(&reference).unwrap(), "the streamed file differs from the copied one");
    assert_eq!(read_safetensors(&file).unwrap().tensors.len(), 48);
}
