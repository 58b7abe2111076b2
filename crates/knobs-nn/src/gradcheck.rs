//! Finite-difference gradient checks: the proof that each layer's backward is right and that
//! gradients reach exactly the parameters they should.
use burn::tensor::{Gradients, Tensor};

use crate::module::{Module, ModuleExt};

/// One compared element.
#[derive(Debug, Clone)]
pub struct GradSample {
    pub path: String,
    pub index: usize,
    pub analytic: f64,
    pub numeric: f64,
}

impl GradSample {
    /// Relative error, with a floor of 1e-2 on the scale: f32 central differences carry
    /// about 1e-5 of rounding noise, which would swamp a smaller gradient.
    pub fn rel_error(&self) -> f64 {
        (self.analytic - self.numeric).abs() / self.analytic.abs().max(self.numeric.abs()).max(1e-2)
    }
}

/// Compares the autodiff gradient of `loss` with central differences at `per_param`
/// evenly spread elements of every trainable parameter.
pub fn check<M: Module>(model: &mut M, loss: impl Fn(&M) -> Tensor<1>, eps: f64, per_param: usize) -> Vec<GradSample> {
    let grads: Gradients = loss(model).backward();
    let mut targets = Vec::new();
    model.for_each_param(|path, p| {
        if p.is_trainable() {
            let g: Vec<f32> = p.grad(&grads).map(|g| g.into_data().try_into_vec().unwrap()).unwrap_or_else(|| vec![0.0; p.numel()]);
            targets.push((path.to_string(), g));
        }
    });
    let value = |m: &M| loss(m).into_scalar::<f32>() as f64;
    let mut out = Vec::new();
    for (path, g) in targets {
        let n = g.len();
        let step = (n / per_param.max(1)).max(1);
        for index in (0..n).step_by(step).take(per_param) {
            let plus = perturbed(model, &path, index, eps, &value);
            let minus = perturbed(model, &path, index, -eps, &value);
            out.push(GradSample { path: path.clone(), index, analytic: g[index] as f64, numeric: (plus - minus) / (2.0 * eps) });
        }
    }
    out
}

fn perturbed<M: Module>(model: &mut M, path: &str, index: usize, delta: f64, value: &impl Fn(&M) -> f64) -> f64 {
    shift(model, path, index, delta);
    let v = value(model);
    shift(model, path, index, -delta);
    v
}

fn shift<M: Module>(model: &mut M, target: &str, index: usize, delta: f64) {
    model.for_each_param_mut(|path, mut p| {
        if path == target {
            let flat = p.as_ref().flat();
            let mut v: Vec<f32> = flat.to_data().try_into_vec().unwrap();
            v[index] += delta as f32;
            let n = v.len();
            p.replace_flat(Tensor::from_data(burn::tensor::TensorData::new(v, [n]), &flat.device()));
        }
    });
}
