//! Adafactor (Shazeer & Stern, 2018) with the semantics of `transformers.optimization.Adafactor`:
//! for a parameter of two or more dimensions the second moment is kept factored, as one mean
//! per row and one per column of its last two dimensions (O(rows + cols) instead of
//! O(rows * cols)); the update is clipped to an RMS of `clip_threshold`; the decay of the
//! second moment grows with the step (`1 - t^decay_rate`); without `beta1` there is no first
//! moment at all. That is what makes a full fine-tune fit: the state of a 320x320 weight is
//! 640 values.
use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Device, TensorData};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Grads, Optimizer, flat_tensor, load_f32, load_steps, sum_squares, values};
use crate::io::StateDict;
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
enum SecondMoment {
    /// Over `[.., rows, cols]`: one value per (leading index, row) and per (leading index, col).
    Factored { rows: usize, cols: usize, row: Vec<f32>, col: Vec<f32> },
    Full(Vec<f32>),
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

    /// The unscaled update `grad / sqrt(second moment)` after folding this step's gradient in.
    fn precondition(second: &mut SecondMoment, grad: &[f32], beta2t: f64, eps1: f32) -> Vec<f32> {
        let (keep, add) = (beta2t as f32, (1.0 - beta2t) as f32);
        match second {
            SecondMoment::Full(v) => {
                let mut u = vec![0f32; grad.len()];
                u.par_iter_mut().zip(v.par_iter_mut()).zip(grad.par_iter()).for_each(|((u, v), &g)| {
                    *v = *v * keep + (g * g + eps1) * add;
                    *u = (1.0 / v.sqrt()) * g;
                });
                u
            }
            SecondMoment::Factored { rows, cols, row, col } => {
                let (r, c) = (*rows, *cols);
                let mut u = vec![0f32; grad.len()];
                // Each leading index is its own rows x cols matrix.
                u.par_chunks_mut(r * c).zip(grad.par_chunks(r * c)).zip(row.par_chunks_mut(r).zip(col.par_chunks_mut(c))).for_each(
                    |((u, g), (row, col))| {
                        let mut col_sum = vec![0f64; c];
                        for (i, gr) in g.chunks(c).enumerate() {
                            let mut row_sum = 0f64;
                            for (j, &x) in gr.iter().enumerate() {
                                let sq = (x * x + eps1) as f64;
                                row_sum += sq;
                                col_sum[j] += sq;
                            }
                            row[i] = row[i] * keep + (row_sum / c as f64) as f32 * add;
                        }
                        for (v, s) in col.iter_mut().zip(&col_sum) {
                            *v = *v * keep + (s / r as f64) as f32 * add;
                        }
                        let row_mean = (row.iter().map(|&x| x as f64).sum::<f64>() / r as f64) as f32;
                        for ((ur, gr), &rv) in u.chunks_mut(c).zip(g.chunks(c)).zip(row.iter()) {
                            let rf = 1.0 / (rv / row_mean).sqrt();
                            for ((u, &g), &cv) in ur.iter_mut().zip(gr).zip(col.iter()) {
                                *u = rf * (1.0 / cv.sqrt()) * g;
                            }
                        }
                    },
                );
                u
            }
        }
    }

    fn step_one(&self, state: &mut State, param: &mut [f32], grad: &[f32], lr: f64, t: u64) {
        let c = &self.config;
        let rel = if c.relative_step {
            let min_step = if c.warmup_init { 1e-6 * t as f64 } else { 1e-2 };
            min_step.min(1.0 / (t as f64).sqrt())
        } else {
            lr
        };
        let lr = if c.scale_parameter { rel * c.eps.1.max(rms(param)) } else { rel };
        let beta2t = 1.0 - (t as f64).powf(c.decay_rate);
        let mut update = Self::precondition(&mut state.second, grad, beta2t, c.eps.0 as f32);
        let scale = (lr / (rms(&update) / c.clip_threshold).max(1.0)) as f32;
        update.par_iter_mut().for_each(|u| *u *= scale);
        if let (Some(m), Some(beta1)) = (state.first.as_mut(), c.beta1) {
            let (b, a) = (beta1 as f32, (1.0 - beta1) as f32);
            m.par_iter_mut().zip(update.par_iter_mut()).for_each(|(m, u)| {
                *m = *m * b + *u * a;
                *u = *m;
            });
        }
        let decay = (1.0 - c.weight_decay * lr) as f32;
        param.par_iter_mut().zip(update.par_iter()).for_each(|(p, u)| *p = *p * decay - u);
    }
}

impl Optimizer for Adafactor {
    fn step(&mut self, model: &mut dyn Module, grads: &Grads, lr_of: &dyn Fn(&str) -> f64) {
        model.for_each_param_mut(|path, mut p| {
            let Some(g) = grads.get(path) else { return };
            let dims = p.as_ref().dims();
            let mut param = values(&p.as_ref().flat());
            let mut state = self.states.remove(path).unwrap_or_else(|| self.fresh_state(&dims));
            assert!(state.fits(&dims), "Adafactor: the state of `{path}` does not fit its shape {dims:?}");
            let t = self.steps.entry(path.to_string()).or_insert(0);
            *t += 1;
            let t = *t;
            self.step_one(&mut state, &mut param, &values(g), lr_of(path), t);
            p.replace_flat(flat_tensor(param, &p.device()));
            self.states.insert(path.to_string(), state);
        });
    }

    /// `exp_avg_sq_row.<path>` + `exp_avg_sq_col.<path>` (factored, with `[rows, cols]` in
    /// the metadata) or `exp_avg_sq.<path>`, and `exp_avg.<path>` when there is a first moment.
    fn state(&self) -> (BTreeMap<String, TensorData>, HashMap<String, String>) {
        let mut tensors = BTreeMap::new();
        let mut factors = BTreeMap::new();
        let f32s = |v: &Vec<f32>| TensorData::new(v.clone(), [v.len()]);
        for (path, s) in &self.states {
            match &s.second {
                SecondMoment::Factored { rows, cols, row, col } => {
                    tensors.insert(format!("exp_avg_sq_row.{path}"), f32s(row));
                    tensors.insert(format!("exp_avg_sq_col.{path}"), f32s(col));
                    factors.insert(path.clone(), [*rows, *cols]);
                }
                SecondMoment::Full(v) => {
                    tensors.insert(format!("exp_avg_sq.{path}"), f32s(v));
                }
            }
            if let Some(m) = &s.first {
                tensors.insert(format!("exp_avg.{path}"), f32s(m));
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
