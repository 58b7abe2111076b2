//! The residual MLP of an A1111 hypernetwork and the slot adapter that puts it in front of a
//! key or value projection: `y = W (x + s * mlp(x)) + b`.
use std::sync::{Arc, Mutex, MutexGuard};

use knobs_nn::burn::tensor::module::linear;
use knobs_nn::hash::{fnv1a, fnv1a_seeded};
use knobs_nn::param::{ParamMut, ParamRef};
use knobs_nn::{Adapter, Device, Init, LinearAdapter, Tensor, Visitor, VisitorMut};

use super::config::{Activation, Kind, Structure};

/// torch.nn.LayerNorm's default.
const LAYER_NORM_EPS: f64 = 1e-5;
/// A1111's "Normal" initialisation: N(0, 0.01) weights.
const INIT_STD: f64 = 0.01;

#[derive(Debug, Clone)]
struct Norm {
    seq: usize,
    weight: Tensor<1>,
    bias: Tensor<1>,
}

#[derive(Debug, Clone)]
struct Layer {
    seq: usize,
    /// `[out, in]`, as torch stores it.
    weight: Tensor<2>,
    bias: Tensor<1>,
    activate: bool,
    norm: Option<Norm>,
    dropout: f64,
}

/// One of A1111's `HypernetworkModule`s for one context width: `mlp(x)`, without the
/// residual (the adapter adds it, with the strength).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub structure: Structure,
    pub width: usize,
    layers: Vec<Layer>,
}

impl Mlp {
    /// A1111's "Normal" initialisation: every Linear weight ~ N(0, 0.01) and bias 0, and
    /// (as A1111 does, for any initialisation) every LayerNorm weight ~ N(0, 0.01) and bias
    /// 0. The output layer is not zero, so a fresh hypernetwork already perturbs the context
    /// slightly, as in A1111. knobs implements only this initialisation (A1111's Xavier and
    /// Kaiming options are not offered).
    pub fn new(width: usize, structure: &Structure, init: &mut Init, device: &Device) -> Result<Self, String> {
        let layers = structure
            .stages(width)?
            .into_iter()
            .map(|s| Layer {
                seq: s.linear,
                weight: init.normal([s.d_out, s.d_in], INIT_STD, device),
                bias: Tensor::zeros([s.d_out], device),
                activate: s.activate,
                norm: s.norm.map(|seq| Norm { seq, weight: init.normal([s.d_out], INIT_STD, device), bias: Tensor::zeros([s.d_out], device) }),
                dropout: s.dropout,
            })
            .collect();
        Ok(Mlp { structure: structure.clone(), width, layers })
    }

    fn activation(&self) -> Activation {
        self.structure.activation
    }

    /// The parameters under `prefix` with A1111's module keys (`{prefix}.linear.{i}.weight`).
    pub fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
        for l in &self.layers {
            v.param(&format!("{prefix}.linear.{}.weight", l.seq), ParamRef::D2(&l.weight));
            v.param(&format!("{prefix}.linear.{}.bias", l.seq), ParamRef::D1(&l.bias));
            if let Some(n) = &l.norm {
                v.param(&format!("{prefix}.linear.{}.weight", n.seq), ParamRef::D1(&n.weight));
                v.param(&format!("{prefix}.linear.{}.bias", n.seq), ParamRef::D1(&n.bias));
            }
        }
    }

    pub fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
        for l in &mut self.layers {
            v.param(&format!("{prefix}.linear.{}.weight", l.seq), ParamMut::D2(&mut l.weight));
            v.param(&format!("{prefix}.linear.{}.bias", l.seq), ParamMut::D1(&mut l.bias));
            if let Some(n) = &mut l.norm {
                v.param(&format!("{prefix}.linear.{}.weight", n.seq), ParamMut::D1(&mut n.weight));
                v.param(&format!("{prefix}.linear.{}.bias", n.seq), ParamMut::D1(&mut n.bias));
            }
        }
    }

    /// Whether the weights are being trained (autodiff leaves that keep their gradient).
    pub fn is_trainable(&self) -> bool {
        self.layers.first().is_some_and(|l| l.weight.is_require_grad())
    }

    /// `mlp(x)` for `x` `[rows, width]`. `dropout_seed` turns dropout on (training).
    pub fn branch(&self, x: Tensor<2>, dropout_seed: Option<u64>) -> Tensor<2> {
        let key = dropout_seed.filter(|_| self.layers.iter().any(|l| l.dropout > 0.0)).map(|seed| seed ^ content_hash(&x));
        let mut h = x;
        for (i, l) in self.layers.iter().enumerate() {
            h = linear(h, knobs_nn::param::f32_value(&l.weight).transpose(), Some(l.bias.clone()));
            if l.activate {
                h = self.activation().apply(h);
            }
            if let Some(n) = &l.norm {
                h = knobs_nn::ops::layer_norm(h, n.weight.clone(), n.bias.clone(), LAYER_NORM_EPS);
            }
            if let (Some(key), true) = (key, l.dropout > 0.0) {
                h = dropout(h, l.dropout, key.wrapping_add(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            }
        }
        h
    }
}

/// FNV-1a over the tensor's bytes.
fn content_hash(x: &Tensor<2>) -> u64 {
    fnv1a(x.to_data().as_bytes())
}

/// The basis of the layer-path seeds: the standard one with its halves swapped, so a path's
/// seed differs from the plain hash of the same bytes. Changing it changes every dropout mask.
const PATH_SEED_BASIS: u64 = 0x8422_2325_cbf2_9ce4;

/// Inverted dropout with a mask drawn from `seed`. The seed mixes the layer's path with the
/// content of the module's input, so a training step draws the same masks however often it
/// is recomputed or resumed, and different steps (different inputs) draw different ones.
/// Departure: A1111 draws from torch's global generator.
fn dropout(h: Tensor<2>, p: f64, seed: u64) -> Tensor<2> {
    let u = Init::new(seed).uniform(h.dims(), 0.5, &h.device());
    let keep = u.greater_equal_scalar(p - 0.5).float();
    h * keep / (1.0 - p)
}

/// A hypernetwork module in a Linear layer's slot: it transforms the layer's input.
/// Every layer of one (width, kind) holds the same [`Mlp`]; the first one attached owns it
/// and alone visits its parameters, so optimizers, savers and freezers see each parameter
/// once, and autodiff sums the gradients of all its uses.
#[derive(Debug)]
pub struct HyperLinear {
    pub mlp: Arc<Mutex<Mlp>>,
    pub width: usize,
    pub kind: Kind,
    pub owner: bool,
    /// Set by `set_training`; unset, dropout follows whether the weights are trainable.
    training: Option<bool>,
    seed: u64,
}

impl HyperLinear {
    pub fn new(mlp: Arc<Mutex<Mlp>>, width: usize, kind: Kind, owner: bool, path: &str) -> Self {
        HyperLinear { mlp, width, kind, owner, training: None, seed: fnv1a_seeded(path.as_bytes(), PATH_SEED_BASIS) }
    }

    pub fn lock(&self) -> MutexGuard<'_, Mlp> {
        self.mlp.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// In-memory parameter prefix: `{layer}.hypernetwork.{adapter}.{width}.{0|1}`, whose tail
    /// after the adapter name is A1111's key for the module (`768.0` is width 768, keys).
    pub fn prefix(&self, layer: &str, adapter: &str) -> String {
        format!("{layer}.{}.{adapter}.{}.{}", super::PARAM_SEGMENT, self.width, self.kind.index())
    }
}

/// A copy owns a copy of the shared module (and visits it): a copied layer's parameters are
/// replaced without touching the original's, and every copy of one module sends its gradient
/// to the original's parameters, where they add up as for the shared uses (gradient
/// checkpointing's recomputed blocks). Whether dropout runs is settled now, as the original
/// would settle it.
impl Clone for HyperLinear {
    fn clone(&self) -> Self {
        let mlp = self.lock();
        let training = Some(self.training.unwrap_or_else(|| mlp.is_trainable()));
        HyperLinear { mlp: Arc::new(Mutex::new(mlp.clone())), width: self.width, kind: self.kind, owner: true, training, seed: self.seed }
    }
}

impl Adapter for HyperLinear {
    fn method(&self) -> &'static str {
        super::config::METHOD
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        if self.owner {
            self.lock().visit(&self.prefix(layer, adapter), v);
        }
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        if self.owner {
            let prefix = self.prefix(layer, adapter);
            self.lock().visit_mut(&prefix, v);
        }
    }
    /// Dropout runs only in training (A1111's `train()` / `eval()`).
    fn set_training(&mut self, training: bool) {
        self.training = Some(training);
    }
}

impl LinearAdapter for HyperLinear {
    /// `inner(x + weight * mlp(x))`. The weight is A1111's strength multiplier. Departure:
    /// A1111 ignores the multiplier while training; knobs applies it always (training uses 1).
    fn forward(&self, x: Tensor<2>, _: &knobs_nn::Linear, inner: &dyn Fn(Tensor<2>) -> Tensor<2>, weight: f32) -> Tensor<2> {
        if weight == 0.0 {
            return inner(x);
        }
        let branch = {
            let mlp = self.lock();
            let training = self.training.unwrap_or_else(|| mlp.is_trainable());
            mlp.branch(x.clone(), training.then_some(self.seed))
        };
        let context = if weight == 1.0 { x + branch } else { x + branch * weight as f64 };
        inner(context)
    }

    /// A non-linear transform of the input has no weight form. `AdaptedModel::merge` refuses
    /// up front (`HypernetworkConfig::check_merge`); this refuses a merge asked of the layer.
    fn merge(&self, _w: Tensor<2>, _b: Option<Tensor<1>>, _unmerged: &Tensor<2>, _weight: f32) -> knobs_nn::Result<(Tensor<2>, Option<Tensor<1>>)> {
        Err(knobs_nn::Error::Invalid("a hypernetwork cannot be merged into the weights: it transforms the layer's input non-linearly; apply it at inference instead".into()))
    }
    /// Merging always fails, so the slot never records a merge and never asks for this; the
    /// weights stay as they are.
    fn unmerge(&self, w: Tensor<2>, b: Option<Tensor<1>>, _weight: f32) -> (Tensor<2>, Option<Tensor<1>>) {
        (w, b)
    }
}

#[cfg(test)]
mod tests {
    use knobs_nn::burn::tensor::TensorData;

    use super::*;
    use crate::hypernetwork::Activation;

    /// Dropout seeds come from these hashes: a changed value changes every trained result.
    #[test]
    fn seeds_and_content_hashes_keep_their_values() {
        let dev = knobs_nn::cpu();
        let s = Structure { layer_structure: vec![1.0, 1.0], activation: Activation::Linear, add_layer_norm: false, activate_output: false, dropout_structure: vec![0.0, 0.0] };
        let mlp = Mlp::new(2, &s, &mut Init::new(0), &dev).unwrap();
        let h = HyperLinear::new(Arc::new(Mutex::new(mlp)), 2, Kind::Key, true, "blocks.0.attn2.to_k");
        assert_eq!(h.seed, 0xf132_2dcf_9c42_e6f6);
        let x = Tensor::<2>::from_data(TensorData::new(vec![1f32, -2.0], [1, 2]), &dev);
        assert_eq!(content_hash(&x), 0x0979_e9ee_2da2_2858);
    }
}
