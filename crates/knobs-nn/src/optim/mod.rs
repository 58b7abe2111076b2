//! Optimisation over a model's trainable parameters, addressed by path. Gradients are
//! collected once into [`Grads`] so that scaling and clipping happen before the step.
mod adafactor;
mod adamw;
mod adamw8bit;
mod ema;
mod loss_scale;
mod second_moment;

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::{AdamW, AdamWConfig};
pub use adamw8bit::{AdamW8bit, BLOCK, Blockwise, MIN_8BIT_SIZE, QuantMap};
pub use ema::Ema;
pub use loss_scale::LossScaler;

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Device, Gradients, Tensor, TensorData};

use crate::io::{StateDict, TensorRef};
use crate::module::{Module, ModuleExt};
use crate::Result;

/// Flattened gradients of the trainable parameters, by path.
pub type Grads = BTreeMap<String, Tensor<1>>;

/// What a training loop needs of an optimizer, whichever it is: the loop and its checkpoints
/// hold a `dyn Optimizer` and never ask which.
pub trait Optimizer {
    /// Updates every parameter that has a gradient in `grads`. `lr_of(path)` gives the
    /// learning rate for that parameter (the base rate times any per-block factor).
    fn step(&mut self, model: &mut dyn Module, grads: &Grads, lr_of: &dyn Fn(&str) -> f64);
    /// The state as named tensors and string metadata, for checkpoints; [`Optimizer::load_state`]
    /// restores it exactly. The tensors are the optimizer's own, shared or borrowed, so a
    /// checkpoint writes them one at a time without a copy of the whole state.
    fn state_refs(&self) -> (BTreeMap<String, TensorRef<'_>>, HashMap<String, String>);
    /// [`Optimizer::state_refs`] copied out.
    fn state(&self) -> (BTreeMap<String, TensorData>, HashMap<String, String>) {
        let (tensors, meta) = self.state_refs();
        (tensors.into_iter().map(|(k, t)| (k, t.to_data())).collect(), meta)
    }
    fn load_state(&mut self, sd: &StateDict, device: &Device) -> Result<()>;
    /// Bytes the per-parameter state takes in memory.
    fn state_bytes(&self) -> usize;
}

/// A flat f32 tensor's values (the optimizers that work element by element use plain slices).
pub(crate) fn values(t: &Tensor<1>) -> Vec<f32> {
    t.to_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor")
}

/// A flat f32 tensor's storage on the CPU backend, contiguous (its values then are
/// `as_slice::<f32>()`, and `storage_mut` when unshared); `None` on other backends and dtypes.
pub(crate) fn flex_f32(t: Tensor<1>) -> Option<burn::backend::flex::FlexTensor> {
    if t.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    let stored = t.inner().try_into_primitive::<burn::backend::Flex>().ok()?.to_contiguous();
    stored.as_slice::<f32>().is_some().then_some(stored)
}

/// `f` on a flat tensor's f32 values: borrowed from the CPU backend's storage where they are
/// (no copy of a parameter or gradient per step), else copied out.
pub(crate) fn with_values<R>(t: &Tensor<1>, f: impl FnOnce(&[f32]) -> R) -> R {
    match flex_f32(t.clone()) {
        Some(stored) => f(stored.as_slice::<f32>().expect("checked by flex_f32")),
        None => f(&values(t)),
    }
}

pub(crate) fn flat_tensor(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// Per-parameter step counts from the checkpoint metadata key `key`.
pub(crate) fn load_steps(sd: &StateDict, key: &str) -> Result<BTreeMap<String, u64>> {
    let text = sd.metadata.get(key).ok_or_else(|| crate::Error::key(&sd.file, key, "missing from the metadata"))?;
    serde_json::from_str(text).map_err(|e| crate::Error::key(&sd.file, key, e))
}

/// `key`'s f32 values, which must number `n` when given.
pub(crate) fn load_f32(sd: &StateDict, key: &str, n: Option<usize>) -> Result<Vec<f32>> {
    let (v, _) = sd.f32(key)?;
    match n {
        Some(n) if v.len() != n => Err(crate::Error::key(&sd.file, key, format!("has {} values, expected {n}", v.len()))),
        _ => Ok(v),
    }
}

/// Values per piece of [`sum_squares`].
pub(crate) const SUM_PIECE: usize = 1 << 14;

/// Sum of squares in fixed-size pieces added in order: the same bits on any thread count.
pub(crate) fn sum_squares(v: &[f32]) -> f64 {
    use rayon::prelude::*;
    let parts: Vec<f64> = v.par_chunks(SUM_PIECE).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum()).collect();
    parts.iter().sum()
}

/// Takes the gradient of every trainable parameter out of `grads`. A trainable parameter the
/// loss did not reach gets a zero gradient, as in PyTorch after `zero_grad(set_to_none=False)`.
pub fn collect_grads<M: Module + ?Sized>(model: &M, grads: &Gradients) -> Grads {
    let mut out = Grads::new();
    model.for_each_param(|path, p| {
        if p.is_trainable() {
            let g = p.grad(grads).unwrap_or_else(|| Tensor::zeros([p.numel()], &p.flat().device()));
            out.insert(path.to_string(), g);
        }
    });
    out
}

/// Global L2 norm over all gradients.
pub fn grad_norm(grads: &Grads) -> f64 {
    grads.values().map(|g| squared_sum(g.clone())).sum::<f64>().sqrt()
}

/// Sum of squares of a flat tensor, bit-identical for any thread count: flex sums a long
/// tensor (4M elements or more) in adaptively split parallel pieces, so rows of a fixed
/// width are summed first.
fn squared_sum(g: Tensor<1>) -> f64 {
    const ROW: usize = 4096;
    let n = g.dims()[0];
    let squares = g.powi_scalar(2);
    let rows = n / ROW;
    let mut total = 0.0f64;
    if rows > 0 {
        let body = squares.clone().slice(0..rows * ROW).reshape([rows, ROW]);
        total += body.sum_dim(1).sum().into_scalar::<f32>() as f64;
    }
    if rows * ROW < n {
        total += squares.slice(rows * ROW..n).sum().into_scalar::<f32>() as f64;
    }
    total
}

/// Scales every gradient so that the global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        for g in grads.values_mut() {
            *g = g.clone() * factor;
        }
    }
    norm
}

/// Multiplies the gradients whose path satisfies `pred` by `factor` (controlled gradient update).
pub fn scale_grads(grads: &mut Grads, factor: f64, pred: impl Fn(&str) -> bool) {
    for (path, g) in grads.iter_mut() {
        if pred(path) {
            *g = g.clone() * factor;
        }
    }
}
