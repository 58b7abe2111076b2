//! What LoHa and LoKr share, as PEFT's `LycorisConfig` / `LycorisLayer` and LyCORIS itself:
//! the rank/alpha fields with per-layer patterns, the two dropouts, and an adapter that adds a
//! full-shape weight change `dW` (built from the method's factors) to a Linear or Conv2d.
//! A method supplies only [`WeightFactors`]: its parameters and how they make `dW`.
use std::collections::BTreeMap;

use knobs_nn::ops::conv2d;
use knobs_nn::param::{ParamMut, ParamRef};
use knobs_nn::{Adapter, Conv2d, Conv2dAdapter, Init, Linear, LinearAdapter, Tensor, Visitor, VisitorMut};
use serde_json::{Value, json};

use crate::method::field;
use crate::{AdapterError, Pattern, Result, Targets};

/// The fields of PEFT's `LycorisConfig` plus the conv option LoHa and LoKr both have.
#[derive(Debug, Clone, PartialEq)]
pub struct LycorisOptions {
    pub r: usize,
    pub alpha: f64,
    pub targets: Targets,
    /// Per-layer overrides: a key matches a layer whose path ends with it (PEFT's rule).
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    /// While training, drops rows (output channels) of `dW` with this probability.
    pub rank_dropout: f64,
    /// While training, skips the whole adapter on a layer with this probability.
    pub module_dropout: f64,
    /// Start as the identity (one factor zero); false starts every factor random.
    pub init_weights: bool,
    /// Convolutions with a k x k kernel keep it as a Tucker core (`t1`, `t2`) instead of
    /// flattening it into the factors' input side.
    pub use_effective_conv2d: bool,
    pub modules_to_save: Vec<String>,
}

impl LycorisOptions {
    pub fn new(r: usize, alpha: f64, target_modules: Pattern) -> Self {
        LycorisOptions {
            r,
            alpha,
            targets: Targets::new(target_modules),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            rank_dropout: 0.0,
            module_dropout: 0.0,
            init_weights: true,
            use_effective_conv2d: false,
            modules_to_save: Vec::new(),
        }
    }

    /// Rank and alpha at `path`.
    pub fn rank_alpha(&self, path: &str) -> (usize, f64) {
        (crate::target::pattern_value(&self.rank_pattern, path).unwrap_or(self.r), crate::target::pattern_value(&self.alpha_pattern, path).unwrap_or(self.alpha))
    }

    /// PEFT's common fields; `init_weights` is read by the method (LoKr accepts `"lycoris"`).
    pub fn from_peft_json(json: &Value) -> Result<Self> {
        let r: usize = field(json, "r")?.unwrap_or(8);
        if r == 0 {
            return Err(AdapterError::Config("key `r`: the rank must be at least 1".into()));
        }
        let target_modules: Pattern = field(json, "target_modules")?.ok_or_else(|| AdapterError::Config("key `target_modules`: missing".into()))?;
        for key in ["layers_to_transform", "layers_pattern"] {
            if !matches!(json.get(key), None | Some(Value::Null)) {
                return Err(AdapterError::Config(format!("key `{key}`: selecting layers by index is for transformer stacks; knobs selects by module name only")));
            }
        }
        Ok(LycorisOptions {
            r,
            alpha: field(json, "alpha")?.unwrap_or(8.0),
            targets: Targets { target_modules, exclude_modules: field(json, "exclude_modules")? },
            rank_pattern: field(json, "rank_pattern")?.unwrap_or_default(),
            alpha_pattern: field(json, "alpha_pattern")?.unwrap_or_default(),
            rank_dropout: field(json, "rank_dropout")?.unwrap_or(0.0),
            module_dropout: field(json, "module_dropout")?.unwrap_or(0.0),
            init_weights: true,
            use_effective_conv2d: field(json, "use_effective_conv2d")?.unwrap_or(false),
            modules_to_save: field(json, "modules_to_save")?.unwrap_or_default(),
        })
    }

    /// The common part of the method's `adapter_config.json`.
    pub fn to_peft_json(&self, peft_type: &str) -> Value {
        json!({
            "peft_type": peft_type,
            "r": self.r,
            "alpha": self.alpha,
            "target_modules": self.targets.target_modules,
            "exclude_modules": self.targets.exclude_modules,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "init_weights": self.init_weights,
            "use_effective_conv2d": self.use_effective_conv2d,
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
            "layers_to_transform": null,
            "layers_pattern": null,
            "task_type": null,
            "inference_mode": true,
        })
    }
}

/// PyTorch's `kaiming_uniform_(a=sqrt(5))`, the init PEFT uses for these factors: uniform in
/// +-1/sqrt(fan_in), fan_in being every dimension after the first.
pub fn kaiming<const D: usize>(shape: [usize; D], init: &mut Init, device: &knobs_nn::Device) -> Tensor<D> {
    let fan_in: usize = shape[1..].iter().product();
    init.uniform(shape, 1.0 / (fan_in as f64).sqrt(), device)
}

/// One factor tensor of a method, 2-D or a 4-D Tucker core.
#[derive(Debug, Clone)]
pub enum Factor {
    D2(Tensor<2>),
    D4(Tensor<4>),
}

impl Factor {
    pub fn d2(&self) -> Tensor<2> {
        match self {
            Factor::D2(t) => t.clone(),
            Factor::D4(_) => unreachable!("a 2-D factor by construction"),
        }
    }
    pub fn d4(&self) -> Tensor<4> {
        match self {
            Factor::D4(t) => t.clone(),
            Factor::D2(_) => unreachable!("a 4-D core by construction"),
        }
    }
}

/// A method's parameters: named as PEFT names them (`hada_w1_a`, `lokr_w2`, ...), and the
/// weight change they make, flattened to `[out, in * k * k]` (k = 1 for Linear) or, with a
/// Tucker core, `[out, in, k, k]`; scaling is applied by the adapter.
pub trait WeightFactors: std::fmt::Debug + Clone + Send + Sync + 'static {
    const METHOD: &'static str;
    fn factors(&self) -> &[(&'static str, Factor)];
    fn factors_mut(&mut self) -> &mut [(&'static str, Factor)];
    /// `dW` with the layer's number of elements, in any shape that reshapes to the weight's.
    fn delta(&self) -> DeltaShape;
}

pub enum DeltaShape {
    D2(Tensor<2>),
    D4(Tensor<4>),
}

/// `sum_ij t[i, j, k, l] * wb[j, q] * wa[i, p] -> [p, q, k, l]`: a Tucker core `t` `[r, r, kh, kw]`
/// with its output factor `wa` `[r, out]` and input factor `wb` `[r, in]` (PEFT's
/// `make_weight_cp` einsum).
pub fn tucker(t: Tensor<4>, wa: Tensor<2>, wb: Tensor<2>) -> Tensor<4> {
    let [ri, rj, kh, kw] = t.dims();
    let c_in = wb.dims()[1];
    let c_out = wa.dims()[1];
    let tmp = t.permute([0, 2, 3, 1]).reshape([ri * kh * kw, rj]).matmul(wb); // [i k l, q]
    let out = wa.transpose().matmul(tmp.reshape([ri, kh * kw * c_in])); // [p, k l q]
    out.reshape([c_out, kh, kw, c_in]).permute([0, 3, 1, 2])
}

/// A weight-change adapter on any Linear or Conv2d: `y = inner(x) + x * (scale * weight * dW)`.
#[derive(Debug, Clone)]
pub struct DeltaAdapter<F: WeightFactors> {
    pub factors: F,
    /// `alpha / r`.
    pub scale: f64,
    pub rank_dropout: f64,
    /// LoKr's `rank_dropout_scale`; LoHa always rescales.
    pub rank_dropout_scale: bool,
    pub module_dropout: f64,
    pub training: bool,
}

impl<F: WeightFactors> DeltaAdapter<F> {
    pub fn new(factors: F, scale: f64, options: &LycorisOptions) -> Self {
        DeltaAdapter { factors, scale, rank_dropout: options.rank_dropout, rank_dropout_scale: true, module_dropout: options.module_dropout, training: false }
    }

    /// `scale * dW` in the weight's shape `dims`, with rank dropout while training.
    fn delta<const D: usize>(&self, dims: [usize; D], weight: f32, training: bool) -> Tensor<D> {
        let d = match self.factors.delta() {
            DeltaShape::D2(t) => t.reshape(dims),
            DeltaShape::D4(t) => t.reshape(dims),
        };
        let d = d * (self.scale * weight as f64);
        if !(training && self.rank_dropout > 0.0) {
            return d;
        }
        let mut mask_dims = [1; D];
        mask_dims[0] = dims[0];
        let keep = knobs_nn::dropout::keep_mask(mask_dims, 1.0 - self.rank_dropout, &d.device());
        let keep = if self.rank_dropout_scale { keep.clone() / keep.mean().into_scalar::<f32>().max(f32::MIN_POSITIVE) as f64 } else { keep };
        d * keep
    }

    /// PEFT skips the adapter on this call with probability `module_dropout` while training.
    fn skipped(&self) -> bool {
        self.training && self.module_dropout > 0.0 && knobs_nn::dropout::uniform() < self.module_dropout
    }

    fn merged<const D: usize>(&self, w: Tensor<D>, weight: f32) -> Tensor<D> {
        let dims = w.dims();
        w + self.delta(dims, weight, false).inner()
    }
}

impl<F: WeightFactors> Adapter for DeltaAdapter<F> {
    fn method(&self) -> &'static str {
        F::METHOD
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        for (name, f) in self.factors.factors() {
            let path = format!("{layer}.{name}.{adapter}");
            match f {
                Factor::D2(t) => v.param(&path, ParamRef::D2(t)),
                Factor::D4(t) => v.param(&path, ParamRef::D4(t)),
            }
        }
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        for (name, f) in self.factors.factors_mut() {
            let path = format!("{layer}.{name}.{adapter}");
            match f {
                Factor::D2(t) => v.param(&path, ParamMut::D2(t)),
                Factor::D4(t) => v.param(&path, ParamMut::D4(t)),
            }
        }
    }
    fn set_training(&mut self, training: bool) {
        self.training = training;
    }
}

impl<F: WeightFactors> LinearAdapter for DeltaAdapter<F> {
    fn forward(&self, x: Tensor<2>, base: &Linear, inner: &dyn Fn(Tensor<2>) -> Tensor<2>, weight: f32) -> Tensor<2> {
        if self.skipped() {
            return inner(x);
        }
        let d = self.delta([base.d_out(), base.d_in()], weight, self.training);
        inner(x.clone()) + x.matmul(d.transpose())
    }
    fn merge(&self, w: Tensor<2>, b: Option<Tensor<1>>, _unmerged: &Tensor<2>, weight: f32) -> knobs_nn::Result<(Tensor<2>, Option<Tensor<1>>)> {
        Ok((self.merged(w, weight), b))
    }
    fn unmerge(&self, w: Tensor<2>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<2>, Option<Tensor<1>>) {
        (self.merged(w, -weight), b)
    }
    fn adds_to_output(&self) -> bool {
        true
    }
}

impl<F: WeightFactors> Conv2dAdapter for DeltaAdapter<F> {
    fn forward(&self, x: Tensor<4>, base: &Conv2d, inner: &dyn Fn(Tensor<4>) -> Tensor<4>, weight: f32) -> Tensor<4> {
        if self.skipped() {
            return inner(x);
        }
        let d = self.delta(base.weight.dims(), weight, self.training);
        inner(x.clone()) + conv2d(x, d, None, base.options())
    }
    fn merge(&self, w: Tensor<4>, b: Option<Tensor<1>>, _unmerged: &Tensor<4>, weight: f32) -> knobs_nn::Result<(Tensor<4>, Option<Tensor<1>>)> {
        Ok((self.merged(w, weight), b))
    }
    fn unmerge(&self, w: Tensor<4>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<4>, Option<Tensor<1>>) {
        (self.merged(w, -weight), b)
    }
}

/// The weight shape a method sees, `[out, in, k, k]` (k = 1 for Linear), and its device.
pub fn layer_shape(layer: &knobs_nn::LayerMut<'_>, path: &str, method: &str) -> Result<([usize; 4], knobs_nn::Device)> {
    match layer {
        knobs_nn::LayerMut::Linear(l) => Ok(([l.d_out(), l.d_in(), 1, 1], l.weight.device())),
        knobs_nn::LayerMut::Conv2d(l) if l.groups == 1 => Ok((l.weight.dims(), l.weight.device())),
        knobs_nn::LayerMut::Conv2d(_) => Err(AdapterError::Config(format!("{method} cannot attach to grouped convolution `{path}`"))),
        knobs_nn::LayerMut::Embedding(_) => Err(AdapterError::Config(format!("{method} cannot attach to embedding `{path}`: PEFT's {method} supports Linear and Conv layers"))),
    }
}

/// Inserts `adapter` into the layer's slot as `name`.
pub fn insert<F: WeightFactors>(layer: knobs_nn::LayerMut<'_>, name: &str, adapter: DeltaAdapter<F>) {
    match layer {
        knobs_nn::LayerMut::Linear(l) => l.adapters.insert(name, Box::new(adapter)),
        knobs_nn::LayerMut::Conv2d(l) => l.adapters.insert(name, Box::new(adapter)),
        knobs_nn::LayerMut::Embedding(_) => unreachable!("layer_shape refuses embeddings first"),
    }
}
