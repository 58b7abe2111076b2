//! Adafactor (Shazeer & Stern, 2018) with the semantics of `transformers.optimization.Adafactor`:
//! for a parameter of two or more dimensions the second moment is kept factored, as one mean
//! per row and one per column of its last two dimensions (O(rows + cols) instead of
//! O(rows * cols)); the update is clipped to an RMS of `clip_threshold`; the decay of the
//! second moment grows with the step (`1 - t^decay_rate`); without `beta1` there is no first
//! moment at all. That is what makes a full fine-tune fit: the state of a 320x320 weight is
//! 640 values.
use std::collections::{BTreeMap, HashMap};

use burn::tensor::Device;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::second_moment::{Decay, SecondMoment};
use super::{Grads, Optimizer, SUM_PIECE, flat_tensor, load_f32, load_steps, sum_squares, with_values};
use crate::ops::fresh::written;
use crate::io::{StateDict, TensorRef};
use crate::module::{Module, ModuleExt};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct AdafactorConfig {
    /// Added to the squared gradient, and the floor of the parameter scale.
    pub eps: (f64, f64),
    pub clip_threshold: f64,
    pub decay_rate: f64,
    /// The first moment's decay; `None` keeps no first moment.
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    /// Scale the step by the parameter's RMS (a relative step size).
    pub scale_parameter: bool,
    /// Ignore the loop's learning rate and use `min(1e-2, 1/sqrt(t))` (`1e-6 t` with
    /// `warmup_init`) instead.
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorConfig {
    /// transformers' defaults.
    fn default() -> Self {
        AdafactorConfig {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

impl AdafactorConfig {
    /// What transformers' `Trainer` uses with an explicit learning rate (`optim="adafactor"`):
    /// the loop's rate as given, not scaled by the parameter.
    pub fn with_lr(weight_decay: f64) -> Self {
        AdafactorConfig { scale_parameter: false, relative_step: false, weight_decay, ..Default::default() }
    }
}

#[derive(Debug, Clone)]
struct State {
    second: SecondMoment,
    first: Option<Vec<f32>>,
}

impl State {
    /// Whether this state belongs to a parameter of shape `dims` (a checkpoint of another model
    /// would otherwise be zipped short silently).
    fn fits(&self, dims: &[usize]) -> bool {
        let n: usize = dims.iter().product();
        let second = match (&self.second, dims) {
            (SecondMoment::Factored { rows, cols, row, col }, [.., r, c]) => {
                (rows, cols) == (r, c) && row.len() * c == n && col.len() * r == n
            }
            (SecondMoment::Full(v), [_]) | (SecondMoment::Full(v), []) => v.len() == n,
            _ => false,
        };
        second && self.first.as_ref().is_none_or(|m| m.len() == n)
    }
}

#[derive(Debug)]
pub struct Adafactor {
    pub config: AdafactorConfig,
    steps: BTreeMap<String, u64>,
    states: BTreeMap<String, State>,
}

fn rms(v: &[f32]) -> f64 {
    (sum_squares(v) / v.len() as f64).sqrt()
}

impl Adafactor {
    pub fn new(config: AdafactorConfig) -> Result<Self> {
        if config.warmup_init && !config.relative_step {
            return Err(Error::Invalid("Adafactor: warmup_init needs relative_step".into()));
        }
        Ok(Adafactor { config, steps: BTreeMap::new(), states: BTreeMap::new() })
    }

    fn fresh_state(&self, dims: &[usize]) -> State {
        let n: usize = dims.iter().product();
        let second = match dims {
            [.., rows, cols] => {
                let lead = n / (rows * cols);
                SecondMoment::Factored { rows: *rows, cols: *cols, row: vec![0.0; lead * rows], col: vec![0.0; lead * cols] }
            }
            _ => SecondMoment::Full(vec![0.0; n]),
        };
        State { second, first: self.config.beta1.map(|_| vec![0.0; n]) }
    }

    /// The parameter's new values from `param` and this step's gradient `grad`, in two passes
    /// over them once the second moment has taken the gradient in: the update's RMS (for
    /// clipping), then the new values, the update formed again where it is used.
    fn step_one(&self, state: &mut State, param: &[f32], grad: &[f32], lr: f64, t: u64) -> Vec<f32> {
        let c = &self.config;
        let rel = if c.relative_step {
            let min_step = if c.warmup_init { 1e-6 * t as f64 } else { 1e-2 };
            min_step.min(1.0 / (t as f64).sqrt())
        } else {
            lr
        };
        let lr = if c.scale_parameter { rel * c.eps.1.max(rms(param)) } else { rel };
        let beta2t = 1.0 - (t as f64).powf(c.decay_rate);
        let decay = Decay { keep: beta2t as f32, add: (1.0 - beta2t) as f32, eps1: c.eps.0 as f32 };
        let pre = state.second.fold_in(grad, decay);
        let n = grad.len();
        let pieces = |i: usize| i * SUM_PIECE..((i + 1) * SUM_PIECE).min(n);
        // Summed as `sum_squares` sums a stored vector: the same pieces, in order.
        let squares: Vec<f64> = (0..n.div_ceil(SUM_PIECE))
            .into_par_iter()
            .map(|i| {
                let mut sum = 0f64;
                pre.each(grad, pieces(i), |_, u| sum += (u as f64) * (u as f64));
                sum
            })
            .collect();
        let update_rms = (squares.iter().sum::<f64>() / n as f64).sqrt();
        let scale = (lr / (update_rms / c.clip_threshold).max(1.0)) as f32;
        let weight = (1.0 - c.weight_decay * lr) as f32;
        // SAFETY: each piece writes every one of its values.
        unsafe {
            written(n, |out| match (state.first.as_mut(), c.beta1) {
                (Some(m), Some(beta1)) => {
                    let (b, a) = (beta1 as f32, (1.0 - beta1) as f32);
                    out.par_chunks_mut(SUM_PIECE).zip(m.par_chunks_mut(SUM_PIECE)).enumerate().for_each(|(i, (out, m))| {
                        let first = i * SUM_PIECE;
                        pre.each(grad, pieces(i), |k, u| {
                            let m = &mut m[k - first];
                            *m = *m * b + u * scale * a;
                            out[k - first].write(param[k] * weight - *m);
                        });
                    });
                }
                _ => out.par_chunks_mut(SUM_PIECE).enumerate().for_each(|(i, out)| {
                    let first = i * SUM_PIECE;
                    pre.each(grad, pieces(i), |k, u| {
                        out[k - first].write(param[k] * weight - u * scale);
                    });
                }),
            })
        }
    }
}

impl Optimizer for Adafactor {
    fn step(&mut self, model: &mut dyn Module, grads: &Grads, lr_of: &dyn Fn(&str) -> f64) {
        model.for_each_param_mut(|path, mut p| {
            let Some(g) = grads.get(path) else { return };
            let dims = p.as_ref().dims();

            let mut state = self.states.remove(path).unwrap_or_else(|| self.fresh_state(&dims));
            assert!(state.fits(&dims), "Adafactor: the state of `{path}` does not fit its shape {dims:?}");
            let t = self.steps.entry(path.to_string()).or_insert(0);
            *t += 1;
            let t = *t;
            let param = with_values(&p.as_ref().flat(), |param| with_values(g, |grad| self.step_one(&mut state, param, grad, lr_of(path), t)));
            p.replace_flat(flat_tensor(param, &p.device()));
            self.states.insert(path.to_string(), state);
        });
    }

    /// `exp_avg_sq_row.<path>` + `exp_avg_sq_col.<path>` (factored, with `[rows, cols]` in
    /// the metadata) or `exp_avg_sq.<path>`, and `exp_avg.<path>` when there is a first moment.
    fn state_refs(&self) -> (BTreeMap<String, TensorRef<'_>>, HashMap<String, String>) {
        let mut tensors = BTreeMap::new();
        let mut factors = BTreeMap::new();
        for (path, s) in &self.states {
            match &s.second {
                SecondMoment::Factored { rows, cols, row, col } => {
                    tensors.insert(format!("exp_avg_sq_row.{path}"), TensorRef::F32(row));
                    tensors.insert(format!("exp_avg_sq_col.{path}"), TensorRef::F32(col));
                    factors.insert(path.clone(), [*rows, *cols]);
                }
                SecondMoment::Full(v) => {
                    tensors.insert(format!("exp_avg_sq.{path}"), TensorRef::F32(v));
                }
            }
            if let Some(m) = &s.first {
                tensors.insert(format!("exp_avg.{path}"), TensorRef::F32(m));
            }
        }
        let meta = HashMap::from([
            ("adafactor_steps".to_string(), serde_json::to_string(&self.steps).unwrap()),
            ("adafactor_factored".to_string(), serde_json::to_string(&factors).unwrap()),
            ("adafactor_config".to_string(), serde_json::to_string(&self.config).unwrap()),
        ]);
        (tensors, meta)
    }

    fn load_state(&mut self, sd: &StateDict, _device: &Device) -> Result<()> {
        self.steps = load_steps(sd, "adafactor_steps")?;
        let key = "adafactor_factored";
        let text = sd.metadata.get(key).ok_or_else(|| Error::key(&sd.file, key, "missing from the metadata"))?;
        let factors: BTreeMap<String, [usize; 2]> = serde_json::from_str(text).map_err(|e| Error::key(&sd.file, key, e))?;
        self.states.clear();
        for path in self.steps.keys() {
            let second = match factors.get(path) {
                Some(&[rows, cols]) => {
                    let row = load_f32(sd, &format!("exp_avg_sq_row.{path}"), None)?;
                    let lead = row.len() / rows.max(1);
                    if lead * rows != row.len() {
                        return Err(Error::key(&sd.file, format!("exp_avg_sq_row.{path}"), format!("has {} values, not a multiple of {rows} rows", row.len())));
                    }
                    let col = load_f32(sd, &format!("exp_avg_sq_col.{path}"), Some(lead * cols))?;
                    SecondMoment::Factored { rows, cols, row, col }
                }
                None => SecondMoment::Full(load_f32(sd, &format!("exp_avg_sq.{path}"), None)?),
            };
            let first = match self.config.beta1 {
                Some(_) => Some(load_f32(sd, &format!("exp_avg.{path}"), None)?),
                None => None,
            };
            self.states.insert(path.clone(), State { second, first });
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        let len = |s: &State| {
            let second = match &s.second {
                SecondMoment::Factored { row, col, .. } => row.len() + col.len(),
                SecondMoment::Full(v) => v.len(),
            };
            second + s.first.as_ref().map_or(0, Vec::len)
        };
        4 * self.states.values().map(len).sum::<usize>()
    }
}
