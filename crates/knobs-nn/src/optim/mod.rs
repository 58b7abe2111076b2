//! Optimisation over a model's trainable parameters, addressed by path. Gradients are
//! collected once into [`Grads`] so that scaling and clipping happen before the step.
mod adamw;
mod ema;

pub use adamw::{AdamW, AdamWConfig};
pub use ema::Ema;

use std::collections::BTreeMap;

use burn::tensor::{Gradients, Tensor};

use crate::module::{Module, ModuleExt};

/// Flattened gradients of the trainable parameters, by path.
pub type Grads = BTreeMap<String, Tensor<1>>;

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
