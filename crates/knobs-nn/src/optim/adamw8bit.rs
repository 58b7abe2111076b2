//! 8-bit AdamW as bitsandbytes' `AdamW8bit` keeps it: each moment is stored as one 8-bit code
//! per value into a fixed non-linear map, with one f32 scale (the absolute maximum) per block of
//! 256 values, so the state takes about 2 bytes per parameter instead of AdamW's 8. A step
//! decodes a block, does AdamW's f32 arithmetic on it and encodes it again with the block's new
//! maximum. Tensors of fewer than 4096 values keep f32 moments, as bitsandbytes does: their
//! saving is nil and small tensors (biases, norms) are the most sensitive to rounding.
use std::collections::{BTreeMap, HashMap};

use burn::tensor::Device;
use rayon::prelude::*;

use super::{AdamWConfig, Grads, Optimizer, flat_tensor, load_f32, load_steps, with_values};
use crate::ops::fresh::written;
use crate::io::{StateDict, TensorRef};
use crate::module::{Module, ModuleExt};
use crate::{Error, Result};

/// Values per quantisation block (one absmax each).
pub const BLOCK: usize = 256;
/// Tensors smaller than this keep f32 moments.
pub const MIN_8BIT_SIZE: usize = 4096;

/// bitsandbytes' dynamic quantisation map: 256 sorted values in [-1, 1] (signed) or [0, 1]
/// (unsigned), dense near zero (a decimal exponent from 1e-6 to 1 and a linear fraction whose
/// resolution grows with the exponent), so that moments spanning orders of magnitude inside one
/// block keep their relative precision.
#[derive(Debug, Clone)]
pub struct QuantMap {
    pub values: [f32; 256],
    /// Midpoints between neighbours: a value's code is the number of midpoints below it.
    bounds: [f32; 255],
    /// By a value's upper 16 bits (sign, exponent, 7 bits of fraction): the lowest code any
    /// value with those bits has, where [`QuantMap::encode`]'s count starts. The map's
    /// neighbours are further apart than such a bucket is wide, so the count moves a step or
    /// two at most, instead of a binary search's eight unpredictable branches per value.
    start: Vec<u8>,
}

/// `n` values from `start` to `end` as `torch.linspace` makes them in f32 (the first half
/// counted up from `start`, the second down from `end`, each with one fused multiply-add), so
/// the map is bitsandbytes' to the bit.
fn linspace(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    (0..n).map(|i| if i < n / 2 { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) }).collect()
}

impl QuantMap {
    /// The map of `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`.
    pub fn dynamic(signed: bool) -> Self {
        const EXPONENT_BITS: i32 = 7;
        let mut data: Vec<f32> = Vec::with_capacity(256);
        for i in 0..EXPONENT_BITS {
            // The sign bit is spent on the sign when signed, on one more fraction bit when not.
            let items = if signed { (1usize << i) + 1 } else { (1usize << (i + 1)) + 1 };
            let b = linspace(0.1, 1.0, items);
            let scale = 10f64.powi(i - (EXPONENT_BITS - 1)) as f32;
            for w in b.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                data.push(scale * mean);
                if signed {
                    data.push(-scale * mean);
                }
            }
        }
        data.extend([0.0, 1.0]);
        assert_eq!(data.len(), 256, "7 exponent bits fill 8-bit codes exactly");
        data.sort_by(f32::total_cmp);
        let values: [f32; 256] = data.try_into().expect("256 values");
        let mut bounds = [0f32; 255];
        for (b, w) in bounds.iter_mut().zip(values.windows(2)) {
            *b = (w[0] + w[1]) / 2.0;
        }
        let count = |x: f32| bounds.partition_point(|&b| b < x) as u8;
        // Within a bucket values are ordered by their bits (one sign), so its lowest code is
        // at one of its ends; a NaN (code 0) at an end counts as the lowest.
        let start = (0..1u32 << 16).map(|b| count(f32::from_bits(b << 16)).min(count(f32::from_bits(b << 16 | 0xFFFF)))).collect();
        QuantMap { values, bounds, start }
    }

    /// The nearest code to `x` (ties to the lower code, as `torch.bucketize`).
    #[inline]
    pub fn encode(&self, x: f32) -> u8 {
        let mut code = self.start[(x.to_bits() >> 16) as usize] as usize;
        while code < self.bounds.len() && self.bounds[code] < x {
            code += 1;
        }
        code as u8
    }

    /// [`QuantMap::encode`] by binary search over every midpoint, for tests.
    pub fn encode_by_search(&self, x: f32) -> u8 {
        self.bounds.partition_point(|&b| b < x) as u8
    }
}

/// One tensor's moment as 8-bit codes and a scale per block of [`BLOCK`] values.
#[derive(Debug, Clone, PartialEq)]
pub struct Blockwise {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
}

/// Encodes one block in place: its new absmax, then each value scaled into [-1, 1].
fn encode_block(values: &[f32], map: &QuantMap, codes: &mut [u8]) -> f32 {
    let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inv = 1.0 / absmax.max(1e-38);
    for (c, &v) in codes.iter_mut().zip(values) {
        *c = map.encode((v * inv).clamp(-1.0, 1.0));
    }
    absmax
}

impl Blockwise {
    pub fn quantise(values: &[f32], map: &QuantMap) -> Self {
        let mut codes = vec![0u8; values.len()];
        let absmax = codes.par_chunks_mut(BLOCK).zip(values.par_chunks(BLOCK)).map(|(c, v)| encode_block(v, map, c)).collect();
        Blockwise { codes, absmax }
    }

    pub fn dequantise(&self, map: &QuantMap) -> Vec<f32> {
        self.codes.chunks(BLOCK).zip(&self.absmax).flat_map(|(c, &a)| c.iter().map(move |&c| map.values[c as usize] * a)).collect()
    }

    fn zeros(n: usize) -> Self {
        Blockwise { codes: vec![0; n], absmax: vec![0.0; n.div_ceil(BLOCK)] }
    }

    fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }
}

#[derive(Debug, Clone)]
enum Moments {
    Full { m: Vec<f32>, v: Vec<f32> },
    Quantised { m: Blockwise, v: Blockwise },
}

impl Moments {
    fn len(&self) -> usize {
        match self {
            Moments::Full { m, .. } => m.len(),
            Moments::Quantised { m, .. } => m.codes.len(),
        }
    }
}

/// AdamW with block-wise 8-bit moments (bitsandbytes' `AdamW8bit`, `block_wise=True`), with the
/// decoupled weight decay and bias correction of [`super::AdamW`].
#[derive(Debug)]
pub struct AdamW8bit {
    pub config: AdamWConfig,
    steps: BTreeMap<String, u64>,
    moments: BTreeMap<String, Moments>,
    /// exp_avg's map (signed) and exp_avg_sq's (unsigned: it is never negative).
    maps: (QuantMap, QuantMap),
}

/// One AdamW step on one value, in f32 as bitsandbytes' CPU update does it.
#[derive(Clone, Copy)]
struct Coefs {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    decay: f32,
    bias2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

impl Coefs {
    fn new(c: &AdamWConfig, lr: f64, t: u64) -> Self {
        let bias1 = 1.0 - c.beta1.powi(t as i32);
        let bias2 = 1.0 - c.beta2.powi(t as i32);
        Coefs {
            beta1: c.beta1 as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            decay: (1.0 - lr * c.weight_decay) as f32,
            bias2_sqrt: bias2.sqrt() as f32,
            eps: c.eps as f32,
            step_size: (lr / bias1) as f32,
        }
    }

    /// The parameter's new value; the moments are updated in place.
    #[inline]
    fn apply(&self, p: f32, g: f32, m: &mut f32, v: &mut f32) -> f32 {
        *m = *m * self.beta1 + g * self.one_minus_beta1;
        *v = *v * self.beta2 + g * g * self.one_minus_beta2;
        let denom = v.sqrt() / self.bias2_sqrt + self.eps;
        p * self.decay - *m / denom * self.step_size
    }
}

impl AdamW8bit {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW8bit { config, steps: BTreeMap::new(), moments: BTreeMap::new(), maps: (QuantMap::dynamic(true), QuantMap::dynamic(false)) }
    }

    /// The moments of `path` decoded to f32 (for tests and inspection).
    pub fn moments(&self, path: &str) -> Option<(Vec<f32>, Vec<f32>)> {
        Some(match self.moments.get(path)? {
            Moments::Full { m, v } => (m.clone(), v.clone()),
            Moments::Quantised { m, v } => (m.dequantise(&self.maps.0), v.dequantise(&self.maps.1)),
        })
    }

    /// The parameter's new values from `param` and its gradient `grad`.
    fn step_one(&self, state: &mut Moments, param: &[f32], grad: &[f32], k: Coefs) -> Vec<f32> {
        // SAFETY: every value of `out` is written, block by block.
        unsafe {
            written(param.len(), |out| match state {
                Moments::Full { m, v } => {
                    out.par_iter_mut().zip(param.par_iter().zip(grad.par_iter())).zip(m.par_iter_mut().zip(v.par_iter_mut())).for_each(|((o, (&p, &g)), (m, v))| {
                        o.write(k.apply(p, g, m, v));
                    });
                }
                Moments::Quantised { m, v } => {
                    let (map1, map2) = &self.maps;
                    let blocks = out.par_chunks_mut(BLOCK).zip(param.par_chunks(BLOCK).zip(grad.par_chunks(BLOCK)));
                    let states = m.codes.par_chunks_mut(BLOCK).zip(m.absmax.par_iter_mut()).zip(v.codes.par_chunks_mut(BLOCK).zip(v.absmax.par_iter_mut()));
                    blocks.zip(states).for_each(|((o, (p, g)), ((mc, ma), (vc, va)))| {
                        let mut mf = [0f32; BLOCK];
                        let mut vf = [0f32; BLOCK];
                        let n = p.len();
                        for i in 0..n {
                            mf[i] = map1.values[mc[i] as usize] * *ma;
                            vf[i] = map2.values[vc[i] as usize] * *va;
                            o[i].write(k.apply(p[i], g[i], &mut mf[i], &mut vf[i]));
                        }
                        *ma = encode_block(&mf[..n], map1, mc);
                        *va = encode_block(&vf[..n], map2, vc);
                    });
                }
            })
        }
    }
}

impl Optimizer for AdamW8bit {
    fn step(&mut self, model: &mut dyn Module, grads: &Grads, lr_of: &dyn Fn(&str) -> f64) {
        model.for_each_param_mut(|path, mut p| {
            let Some(g) = grads.get(path) else { return };
            let n = p.as_ref().numel();
            let mut state = self.moments.remove(path).unwrap_or_else(|| {
                if n < MIN_8BIT_SIZE {
                    Moments::Full { m: vec![0.0; n], v: vec![0.0; n] }
                } else {
                    Moments::Quantised { m: Blockwise::zeros(n), v: Blockwise::zeros(n) }
                }
            });
            assert_eq!(state.len(), n, "8-bit AdamW: the state of `{path}` does not fit the parameter");
            let t = self.steps.entry(path.to_string()).or_insert(0);
            *t += 1;
            let k = Coefs::new(&self.config, lr_of(path), *t);
            let param = with_values(&p.as_ref().flat(), |param| with_values(g, |grad| self.step_one(&mut state, param, grad, k)));
            p.replace_flat(flat_tensor(param, &p.device()));
            self.moments.insert(path.to_string(), state);
        });
    }

    /// `exp_avg.<path>` / `exp_avg_sq.<path>`: u8 codes with their per-block scales in
    /// `exp_avg_absmax.<path>` / `exp_avg_sq_absmax.<path>`, or f32 moments for small tensors.
    fn state_refs(&self) -> (BTreeMap<String, TensorRef<'_>>, HashMap<String, String>) {
        let mut tensors = BTreeMap::new();
        for (path, state) in &self.moments {
            match state {
                Moments::Full { m, v } => {
                    tensors.insert(format!("exp_avg.{path}"), TensorRef::F32(m));
                    tensors.insert(format!("exp_avg_sq.{path}"), TensorRef::F32(v));
                }
                Moments::Quantised { m, v } => {
                    for (name, q) in [("exp_avg", m), ("exp_avg_sq", v)] {
                        tensors.insert(format!("{name}.{path}"), TensorRef::U8(&q.codes));
                        tensors.insert(format!("{name}_absmax.{path}"), TensorRef::F32(&q.absmax));
                    }
                }
            }
        }
        let meta = HashMap::from([
            ("adamw8bit_steps".to_string(), serde_json::to_string(&self.steps).unwrap()),
            ("adamw8bit_config".to_string(), serde_json::to_string(&self.config).unwrap()),
        ]);
        (tensors, meta)
    }

    fn load_state(&mut self, sd: &StateDict, _device: &Device) -> Result<()> {
        self.steps = load_steps(sd, "adamw8bit_steps")?;
        self.moments.clear();
        for path in self.steps.keys() {
            let (mk, vk) = (format!("exp_avg.{path}"), format!("exp_avg_sq.{path}"));
            let state = if sd.get(&mk)?.as_slice::<u8>().is_ok() {
                let load = |key: &str| -> Result<Blockwise> {
                    let codes = sd.get(key)?.as_slice::<u8>().map_err(|_| Error::key(&sd.file, key, "expected u8 codes"))?.to_vec();
                    let absmax = load_f32(sd, &key.replacen('.', "_absmax.", 1), Some(codes.len().div_ceil(BLOCK)))?;
                    Ok(Blockwise { codes, absmax })
                };
                let (m, v) = (load(&mk)?, load(&vk)?);
                if v.codes.len() != m.codes.len() {
                    return Err(Error::key(&sd.file, vk, format!("has {} values, {mk} has {}", v.codes.len(), m.codes.len())));
                }
                Moments::Quantised { m, v }
            } else {
                let m = load_f32(sd, &mk, None)?;
                Moments::Full { v: load_f32(sd, &vk, Some(m.len()))?, m }
            };
            self.moments.insert(path.clone(), state);
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.moments
            .values()
            .map(|s| match s {
                Moments::Full { m, v } => 4 * (m.len() + v.len()),
                Moments::Quantised { m, v } => m.bytes() + v.bytes(),
            })
            .sum()
    }
}
