//! What an A1111-style hypernetwork is made of (layer structure, activation, layer norm,
//! dropout) and where it attaches (the key and value projections, selected by input width).
//!
//! The facts below follow AUTOMATIC1111's `modules/hypernetworks/hypernetwork.py`, read for
//! reference; where knobs departs it says so.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use knobs_nn::burn::tensor::activation as act;
use knobs_nn::{Init, LayerMut, Tensor};
use serde_json::{Value, json};

use super::layer::{HyperLinear, Mlp};
use crate::method::AdapterConfig;
use crate::{AdapterError, Pattern, PeftType, Result, Targets};

/// What `peft_type` / `to_peft_json` call this method. PEFT has no such method: the JSON is
/// knobs' own description of the config, never a PEFT file.
pub const METHOD: &str = PeftType::Hypernetwork.as_str();

/// The non-linearity between layers, by A1111's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// No activation (A1111's default, also what a missing or `None` activation means).
    Linear,
    Relu,
    /// Negative slope 0.01 (torch's default).
    LeakyRelu,
    /// alpha 1 (torch's default).
    Elu,
    /// A1111 maps `swish` to torch's `Hardswish`, not to SiLU; knobs follows it so that
    /// files trained there mean the same here. The smooth swish is `silu`.
    Swish,
    Hardswish,
    Tanh,
    Sigmoid,
    Silu,
    /// The exact (erf) GELU, torch's default.
    Gelu,
    Mish,
    /// beta 1, threshold 20 (torch's defaults).
    Softplus,
    Relu6,
    Selu,
    /// alpha 1.
    Celu,
    Softsign,
    Tanhshrink,
    Logsigmoid,
    Hardsigmoid,
    /// Clamp to [-1, 1].
    Hardtanh,
}

/// A1111 accepts its seven named activations plus every class of `torch.nn.modules.activation`
/// by its lower-case name. knobs implements the parameter-free element-wise ones; the rest
/// (PReLU has weights, RReLU is random, GLU halves the width, Softmax-like ones mix features,
/// Threshold needs arguments) are refused by name.
const ACTIVATIONS: &[(&str, Activation)] = &[
    ("linear", Activation::Linear),
    ("relu", Activation::Relu),
    ("leakyrelu", Activation::LeakyRelu),
    ("elu", Activation::Elu),
    ("swish", Activation::Swish),
    ("hardswish", Activation::Hardswish),
    ("tanh", Activation::Tanh),
    ("sigmoid", Activation::Sigmoid),
    ("silu", Activation::Silu),
    ("gelu", Activation::Gelu),
    ("mish", Activation::Mish),
    ("softplus", Activation::Softplus),
    ("relu6", Activation::Relu6),
    ("selu", Activation::Selu),
    ("celu", Activation::Celu),
    ("softsign", Activation::Softsign),
    ("tanhshrink", Activation::Tanhshrink),
    ("logsigmoid", Activation::Logsigmoid),
    ("hardsigmoid", Activation::Hardsigmoid),
    ("hardtanh", Activation::Hardtanh),
];

impl Activation {
    /// The names [`Activation::parse`] accepts.
    pub fn names() -> Vec<&'static str> {
        ACTIVATIONS.iter().map(|(n, _)| *n).collect()
    }

    /// A1111's name, case-insensitively; `none` (Python's `None`) is `linear`.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        let lower = name.trim().to_ascii_lowercase();
        if lower == "none" || lower == "null" {
            return Ok(Activation::Linear);
        }
        ACTIVATIONS
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, a)| *a)
            .ok_or_else(|| format!("unknown activation `{name}`; supported: {}", Self::names().join(", ")))
    }

    pub fn name(self) -> &'static str {
        ACTIVATIONS.iter().find(|(_, a)| *a == self).map(|(n, _)| *n).expect("every activation has a name")
    }

    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Linear => x,
            Activation::Relu => act::relu(x),
            Activation::LeakyRelu => act::leaky_relu(x, 0.01),
            Activation::Elu => act::elu(x, 1.0),
            Activation::Swish | Activation::Hardswish => act::hard_swish(x),
            Activation::Tanh => act::tanh(x),
            Activation::Sigmoid => act::sigmoid(x),
            // knobs' own: exact gradients on every backend (burn's GPU backends differentiate
            // GELU as its tanh approximation).
            Activation::Silu => knobs_nn::ops::silu(x),
            Activation::Gelu => knobs_nn::ops::gelu(x),
            Activation::Mish => act::mish(x),
            Activation::Softplus => act::softplus(x, 1.0),
            Activation::Relu6 => act::relu6(x),
            Activation::Selu => act::selu(x),
            Activation::Celu => act::celu(x, 1.0),
            Activation::Softsign => act::softsign(x),
            Activation::Tanhshrink => act::tanhshrink(x),
            Activation::Logsigmoid => act::log_sigmoid(x),
            Activation::Hardsigmoid => act::hard_sigmoid(x, 1.0 / 6.0, 0.5),
            Activation::Hardtanh => act::hardtanh(x, -1.0, 1.0),
        }
    }
}

/// The shape of one residual MLP, as A1111 describes it. For a context width `W` the
/// layers are `Linear(W * s[i] -> W * s[i+1])` (widths truncated to integers as Python's
/// `int()` does), each followed by the activation (not after the last unless
/// `activate_output`), a LayerNorm when `add_layer_norm` (after every layer, the last
/// included), and dropout `dropout_structure[i+1]` when it is non-zero. The module returns
/// `x + strength * mlp(x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Structure {
    /// Width multipliers, starting and ending with 1 (`[1, 2, 1]`).
    pub layer_structure: Vec<f64>,
    pub activation: Activation,
    pub add_layer_norm: bool,
    /// Also apply the activation after the last layer (A1111's `activate_output`).
    pub activate_output: bool,
    /// One dropout probability per entry of `layer_structure`: entry `i + 1` follows layer
    /// `i`. The first and the last are 0 (A1111's rule: no dropout before the first layer or
    /// after the output).
    pub dropout_structure: Vec<f64>,
}

impl Default for Structure {
    /// A1111's defaults when creating a hypernetwork: `[1, 2, 1]`, linear, no layer norm, no
    /// dropout, no output activation.
    fn default() -> Self {
        Structure { layer_structure: vec![1.0, 2.0, 1.0], activation: Activation::Linear, add_layer_norm: false, activate_output: false, dropout_structure: vec![0.0; 3] }
    }
}

/// One planned layer of the MLP with the `torch.nn.Sequential` indices A1111's state dict
/// uses, so that file keys map 1:1 (`linear.{linear}.weight`, `linear.{norm}.weight`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub d_in: usize,
    pub d_out: usize,
    pub linear: usize,
    pub activate: bool,
    pub norm: Option<usize>,
    pub dropout: f64,
}

impl Structure {
    /// `[0, p, ..., p, 0]`: dropout `p` after every hidden layer, none after the output.
    /// This is A1111's `use_dropout` with `last_layer_dropout` (its default when creating)
    /// and `p` in place of its fixed 0.3.
    pub fn dropout_after_hidden(layers: usize, p: f64) -> Vec<f64> {
        (0..layers).map(|i| if i == 0 || i + 1 == layers { 0.0 } else { p }).collect()
    }

    /// A1111's `parse_dropout_structure`, for files that give `use_dropout` and
    /// `last_layer_dropout` but no `dropout_structure`: 0.3 after every hidden layer but the
    /// last, and after the last hidden layer only with `last_layer_dropout`.
    pub fn a1111_dropout(layers: usize, use_dropout: bool, last_layer_dropout: bool) -> Vec<f64> {
        if !use_dropout || layers < 3 {
            return vec![0.0; layers];
        }
        let mut d = vec![0.0];
        d.extend(std::iter::repeat_n(0.3, layers.saturating_sub(3)));
        d.push(if last_layer_dropout { 0.3 } else { 0.0 });
        d.push(0.0);
        d.truncate(layers);
        d
    }

    /// Checks the structure; the message names the setting at fault.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let s = &self.layer_structure;
        if s.len() < 2 {
            return Err(format!("layer_structure {s:?}: needs at least two entries (input and output), e.g. [1, 2, 1]"));
        }
        if s.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            return Err(format!("layer_structure {s:?}: every multiplier must be a positive number"));
        }
        if s[0] != 1.0 || s[s.len() - 1] != 1.0 {
            return Err(format!("layer_structure {s:?}: must start and end with 1 (the module maps the context to its own width)"));
        }
        let d = &self.dropout_structure;
        if d.len() != s.len() {
            return Err(format!("dropout_structure {d:?}: needs one entry per layer_structure entry ({})", s.len()));
        }
        if d.iter().any(|p| !(0.0..1.0).contains(p)) {
            return Err(format!("dropout_structure {d:?}: every probability must be in [0, 1)"));
        }
        if d[0] != 0.0 || d[d.len() - 1] != 0.0 {
            return Err(format!("dropout_structure {d:?}: the first and last entries must be 0 (no dropout before the first layer or after the output)"));
        }
        Ok(())
    }

    /// The layers for context width `dim`, with their Sequential indices.
    pub fn stages(&self, dim: usize) -> std::result::Result<Vec<Stage>, String> {
        self.validate()?;
        let width = |f: f64| (dim as f64 * f) as usize;
        let n = self.layer_structure.len() - 1;
        let mut seq = 0;
        let mut out = Vec::new();
        for i in 0..n {
            let (d_in, d_out) = (width(self.layer_structure[i]), width(self.layer_structure[i + 1]));
            if d_out == 0 {
                return Err(format!("layer_structure {:?}: layer {i} would be {d_in} -> {d_out} wide for context width {dim}", self.layer_structure));
            }
            let linear = seq;
            seq += 1;
            let activate = self.activation != Activation::Linear && (i + 1 < n || self.activate_output);
            seq += usize::from(activate);
            let norm = self.add_layer_norm.then(|| {
                seq += 1;
                seq - 1
            });
            let dropout = self.dropout_structure[i + 1];
            seq += usize::from(dropout > 0.0);
            out.push(Stage { d_in, d_out, linear, activate, norm, dropout });
        }
        Ok(out)
    }
}

/// Which projection a module feeds: A1111 keeps the pair as a tuple `(key, value)`, so the
/// key module is index 0 and the value module index 1 in its file keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Key,
    Value,
}

impl Kind {
    pub fn index(self) -> usize {
        match self {
            Kind::Key => 0,
            Kind::Value => 1,
        }
    }
    pub fn from_index(i: usize) -> Option<Self> {
        match i {
            0 => Some(Kind::Key),
            1 => Some(Kind::Value),
            _ => None,
        }
    }
}

type Registry = Mutex<BTreeMap<(String, usize, Kind), Arc<Mutex<Mlp>>>>;

/// An A1111-style hypernetwork: for each context width, one residual MLP transforms the
/// input of every key projection of that width and another that of every value projection,
/// `k = to_k(ctx + s * mlp_k(ctx))`, `v = to_v(ctx + s * mlp_v(ctx))`. The pair is shared by
/// all layers of that width, as A1111's dict keyed by width is.
///
/// It attaches to Linear layers through their adapter slot: the adapter transforms the
/// layer's input, so no model code knows about it. Which layers are keys and values is
/// given by PEFT-style names (A1111's attention calls them `to_k` and `to_v`, as diffusers
/// does).
#[derive(Debug)]
pub struct HypernetworkConfig {
    key_modules: Vec<String>,
    value_modules: Vec<String>,
    targets: Targets,
    pub structure: Structure,
    /// Context widths that get a module pair (A1111's `enable_sizes`); layers of other
    /// widths are left alone. `None`: every width the targets find.
    pub sizes: Option<Vec<usize>>,
    /// The modules made so far by `attach`, by (adapter, width, kind): the first layer of a
    /// width creates its module and owns its parameters, later ones share it. A clone starts
    /// empty, so two models never share modules by accident.
    registry: Registry,
}

impl Clone for HypernetworkConfig {
    fn clone(&self) -> Self {
        HypernetworkConfig {
            key_modules: self.key_modules.clone(),
            value_modules: self.value_modules.clone(),
            targets: self.targets.clone(),
            structure: self.structure.clone(),
            sizes: self.sizes.clone(),
            registry: Registry::default(),
        }
    }
}

impl PartialEq for HypernetworkConfig {
    fn eq(&self, other: &Self) -> bool {
        self.key_modules == other.key_modules && self.value_modules == other.value_modules && self.structure == other.structure && self.sizes == other.sizes
    }
}

impl HypernetworkConfig {
    /// `key_modules` and `value_modules` are layer names with PEFT's list rule (a path equal
    /// to a name or ending in `.name`).
    pub fn new(key_modules: &[&str], value_modules: &[&str], structure: Structure) -> Result<Self> {
        Self::from_parts(key_modules.iter().map(|s| s.to_string()).collect(), value_modules.iter().map(|s| s.to_string()).collect(), structure, None)
    }

    fn from_parts(key_modules: Vec<String>, value_modules: Vec<String>, structure: Structure, sizes: Option<Vec<usize>>) -> Result<Self> {
        structure.validate().map_err(AdapterError::Config)?;
        if key_modules.is_empty() || value_modules.is_empty() {
            return Err(AdapterError::Config("a hypernetwork needs key and value module names (e.g. to_k and to_v)".into()));
        }
        if let Some(both) = key_modules.iter().find(|k| value_modules.contains(k)) {
            return Err(AdapterError::Config(format!("`{both}` is named both a key and a value module")));
        }
        if sizes.as_ref().is_some_and(|s| s.is_empty() || s.contains(&0)) {
            return Err(AdapterError::Config(format!("sizes {sizes:?}: give at least one positive context width")));
        }
        let names = key_modules.iter().chain(&value_modules).cloned().collect();
        Ok(HypernetworkConfig { key_modules, value_modules, targets: Targets::new(Pattern::Names(names)), structure, sizes, registry: Registry::default() })
    }

    /// Only layers whose input width is one of `sizes` get a module (A1111's `enable_sizes`).
    pub fn with_sizes(mut self, sizes: Vec<usize>) -> Result<Self> {
        self.sizes = Some(sizes);
        Self::from_parts(self.key_modules, self.value_modules, self.structure, self.sizes)
    }

    pub fn key_modules(&self) -> &[String] {
        &self.key_modules
    }
    pub fn value_modules(&self) -> &[String] {
        &self.value_modules
    }

    fn kind_of(&self, path: &str) -> Result<Kind> {
        let key = Pattern::Names(self.key_modules.clone()).matches(path)?;
        let value = Pattern::Names(self.value_modules.clone()).matches(path)?;
        match (key, value) {
            (true, false) => Ok(Kind::Key),
            (false, true) => Ok(Kind::Value),
            _ => Err(AdapterError::Config(format!("`{path}` matches both a key and a value module name"))),
        }
    }

    /// Reads the JSON of [`AdapterConfig::to_peft_json`].
    pub fn from_json(json: &Value) -> Result<Self> {
        let bad = |k: &str, m: String| AdapterError::Config(format!("key `{k}`: {m}"));
        match json.get("peft_type").and_then(Value::as_str) {
            Some(METHOD) => {}
            other => return Err(bad("peft_type", format!("{other:?} is not {METHOD}"))),
        }
        let list = |k: &str| -> Result<Vec<String>> { serde_json::from_value(json.get(k).cloned().unwrap_or(Value::Null)).map_err(|e| bad(k, e.to_string())) };
        let structure = Structure {
            layer_structure: serde_json::from_value(json["layer_structure"].clone()).map_err(|e| bad("layer_structure", e.to_string()))?,
            activation: Activation::parse(json["activation_func"].as_str().unwrap_or("linear")).map_err(|e| bad("activation_func", e))?,
            add_layer_norm: json["is_layer_norm"].as_bool().unwrap_or(false),
            activate_output: json["activate_output"].as_bool().unwrap_or(false),
            dropout_structure: serde_json::from_value(json["dropout_structure"].clone()).map_err(|e| bad("dropout_structure", e.to_string()))?,
        };
        let sizes = serde_json::from_value(json.get("enable_sizes").cloned().unwrap_or(Value::Null)).map_err(|e| bad("enable_sizes", e.to_string()))?;
        Self::from_parts(list("key_modules")?, list("value_modules")?, structure, sizes)
    }
}

impl AdapterConfig for HypernetworkConfig {
    fn peft_type(&self) -> PeftType {
        PeftType::Hypernetwork
    }
    fn targets(&self) -> &Targets {
        &self.targets
    }
    fn modules_to_save(&self) -> &[String] {
        &[]
    }

    fn attach(&self, path: &str, layer: LayerMut<'_>, name: &str, init: &mut Init) -> Result<()> {
        let LayerMut::Linear(l) = layer else {
            return Err(AdapterError::Config(format!("a hypernetwork transforms the input of Linear key/value projections; `{path}` is a {}", layer.kind())));
        };
        let kind = self.kind_of(path)?;
        let width = l.d_in();
        if self.sizes.as_ref().is_some_and(|s| !s.contains(&width)) {
            // Selected by width, as A1111: a layer whose context width has no module is left alone.
            return Ok(());
        }
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let key = (name.to_string(), width, kind);
        let (mlp, owner) = match registry.get(&key) {
            Some(m) => (m.clone(), false),
            None => {
                let mlp = Mlp::new(width, &self.structure, init, &l.weight.device()).map_err(|e| AdapterError::Config(format!("`{path}`: {e}")))?;
                let m = Arc::new(Mutex::new(mlp));
                registry.insert(key, m.clone());
                (m, true)
            }
        };
        l.adapters.insert(name, Box::new(HyperLinear::new(mlp, width, kind, owner, path)));
        Ok(())
    }

    /// knobs' description of the hypernetwork under A1111's setting names. PEFT cannot load
    /// it (it has no such method).
    fn to_peft_json(&self) -> Value {
        json!({
            "peft_type": METHOD,
            "key_modules": self.key_modules,
            "value_modules": self.value_modules,
            "layer_structure": self.structure.layer_structure,
            "activation_func": self.structure.activation.name(),
            "is_layer_norm": self.structure.add_layer_norm,
            "activate_output": self.structure.activate_output,
            "dropout_structure": self.structure.dropout_structure,
            "weight_initialization": "Normal",
            "enable_sizes": self.sizes,
        })
    }

    fn clone_box(&self) -> Box<dyn AdapterConfig> {
        Box::new(self.clone())
    }

    fn check_merge(&self) -> Result<()> {
        Err(AdapterError::Config(
            "a hypernetwork cannot be merged into the base weights: it transforms the context through a non-linear MLP before the key/value projections; keep it attached (its strength is the adapter weight)".into(),
        ))
    }
}
