//! Adapter weights computed in the autodiff graph: a hypernetwork (or anything else) produces
//! the tensors of an attached adapter each step, and this puts them in place without making
//! them leaves, so that the loss gradient flows through them to whatever produced them.
use std::collections::BTreeMap;

use knobs_nn::{Module, ModuleExt, ParamMut, Tensor};

use crate::{AdapterError, Result};

/// Replaces parameters of `model` by the given tensors, keyed by in-memory parameter path
/// (`<layer>.lora_A.<adapter>.weight`), keeping them exactly as given: a tensor computed in
/// the autodiff graph stays connected to its inputs. Every key must name a 2-d parameter of
/// the same shape; an unknown key or a wrong shape is an error naming the key, and nothing
/// is changed then.
///
/// Optimizers and freezing see these tensors as ordinary parameters; callers that generate
/// weights train the generator instead and set the weights again before every forward.
pub fn set_tensors<M: Module + ?Sized>(model: &mut M, tensors: &BTreeMap<String, Tensor<2>>) -> Result<()> {
    let mut found: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    model.for_each_param(|path, p| {
        if let Some((k, _)) = tensors.get_key_value(path) {
            found.insert(k.as_str(), p.dims());
        }
    });
    for (key, t) in tensors {
        match found.get(key.as_str()) {
            None => return Err(AdapterError::Config(format!("generated tensor `{key}`: the model has no parameter of that path"))),
            Some(dims) if dims.as_slice() != t.dims().as_slice() => {
                return Err(AdapterError::Config(format!("generated tensor `{key}`: shape {:?} does not match the model's {:?}", t.dims(), dims)));
            }
            _ => {}
        }
    }
    model.for_each_param_mut(|path, p| {
        if let (Some(t), ParamMut::D2(slot)) = (tensors.get(path), p) {
            *slot = t.clone();
        }
    });
    Ok(())
}
