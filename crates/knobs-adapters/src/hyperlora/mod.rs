//! HyperLoRA: a hypernetwork that predicts a whole LoRA from a concept representation, in the
//! weight space of HyperDreamBooth's "Lightweight DreamBooth" (Ruiz et al. 2023).
//!
//! For each target Linear (`in -> out`) the update is an ordinary LoRA `scale * B A` with
//! `A = A_train A_aux` (`[r, a] x [a, in]`) and `B = B_aux B_train` (`[out, b] x [b, r]`).
//! `A_aux` and `B_aux` are fixed random matrices drawn from the config's seed and never
//! trained; the hypernetwork only predicts the small `A_train` and `B_train` of every layer.
//! Because the result is a plain LoRA (`lora_A = A`, `lora_B = B`, `alpha / r`), it is saved
//! with the PEFT / diffusers writers and loads wherever a LoRA does.
//!
//! The concept representation is a code of `code_dim` numbers: a row of a learned table (one
//! row per training concept), a free vector optimised for a new concept, or the projection of
//! an image embedding (a frozen image encoder's output, averaged over reference images) for
//! zero-shot prediction. With `variational` the table and the projection give a mean and a
//! log-variance; training samples the code by the reparameterisation trick, inference takes the
//! mean. The network is `head(silu(fc1(code)))`; the head's weight starts at zero, its bias at
//! random `A_train` and zero `B_train`, so every concept starts with `B = 0` (no change).
//!
//! Nothing here knows about diffusion: the layers are found by path on any `knobs-nn` model.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use knobs_nn::ops::silu;
use knobs_nn::io::{LoadOptions, StateDict, load_state_dict, read_safetensors, state_dict, write_safetensors};
use knobs_nn::{Device, Init, LayerRef, Linear, Module, ModuleExt, ParamMut, ParamRef, Tensor, Visitor, VisitorMut, join};
use serde::{Deserialize, Serialize};

use crate::lora::LoraConfig;
use crate::{AdaptedModel, AdapterError, Pattern, Result};

/// The file names under a hypernetwork folder.
pub const WEIGHTS_FILE: &str = "hyperlora.safetensors";
pub const CONFIG_FILE: &str = "hyperlora_config.json";

/// One target layer: its path and shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerShape {
    pub path: String,
    pub d_in: usize,
    pub d_out: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HyperLoraConfig {
    /// LoRA rank `r` of the predicted update.
    pub rank: usize,
    pub alpha: f64,
    /// Inner widths of `A_train` (`[r, a]`) and `B_train` (`[b, r]`), capped per layer at
    /// `in` and `out`.
    pub aux_a: usize,
    pub aux_b: usize,
    pub code_dim: usize,
    pub hidden: usize,
    /// Rows of the learned code table (training concepts); 0 for none.
    pub num_codes: usize,
    /// Width of the image embeddings the zero-shot path takes; 0 for none.
    pub image_dim: usize,
    pub variational: bool,
    /// Seed of the fixed `A_aux` / `B_aux` and of the initial weights.
    pub seed: u64,
    /// The LoRA target modules (PEFT's list rule), kept for the LoRA files written.
    pub target_modules: Vec<String>,
    /// Every adapted layer, in order.
    pub layers: Vec<LayerShape>,
}

impl HyperLoraConfig {
    /// A config whose layers are the Linear layers of `model` that `target_modules` selects.
    pub fn for_model<M: Module + ?Sized>(model: &M, target_modules: &[String]) -> Result<Self> {
        let targets = crate::Targets::new(Pattern::Names(target_modules.to_vec()));
        let paths = targets.select(model)?;
        let mut layers = Vec::new();
        model.for_each_layer(|path, layer| {
            if let LayerRef::Linear(l) = layer
                && paths.iter().any(|p| p == path) {
                    layers.push(LayerShape { path: path.to_string(), d_in: l.d_in(), d_out: l.d_out() });
                }
        });
        if layers.is_empty() {
            return Err(AdapterError::Config(format!("hyperlora: target modules {target_modules:?} select no Linear layer")));
        }
        Ok(HyperLoraConfig {
            rank: 1,
            alpha: 1.0,
            aux_a: 16,
            aux_b: 16,
            code_dim: 32,
            hidden: 64,
            num_codes: 0,
            image_dim: 0,
            variational: false,
            seed: 0,
            target_modules: target_modules.to_vec(),
            layers,
        })
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(AdapterError::Config(format!("hyperlora config key `{key}`: {why}")));
        if self.rank == 0 {
            return bad("rank", "must be at least 1");
        }
        if self.aux_a == 0 || self.aux_b == 0 {
            return bad("aux_a", "aux_a and aux_b must be at least 1");
        }
        if self.code_dim == 0 || self.hidden == 0 {
            return bad("code_dim", "code_dim and hidden must be at least 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("alpha", "must be a positive number");
        }
        if self.layers.is_empty() {
            return bad("layers", "no target layer");
        }
        Ok(())
    }

    /// `(a, b)` of layer `l`.
    pub fn inner(&self, l: &LayerShape) -> (usize, usize) {
        (self.aux_a.min(l.d_in), self.aux_b.min(l.d_out))
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Width of the head's output: every layer's `A_train` then `B_train`.
    pub fn head_width(&self) -> usize {
        self.layers.iter().map(|l| {
            let (a, b) = self.inner(l);
            self.rank * (a + b)
        }).sum()
    }

    /// The plain LoRA config of what this network predicts.
    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig::new(self.rank, self.alpha, Pattern::Names(self.layers.iter().map(|l| l.path.clone()).collect()))
    }
}

/// A code's mean and (variational) log-variance, `[1, code_dim]` each.
#[derive(Debug, Clone)]
pub struct Code {
    pub mean: Tensor<2>,
    pub logvar: Option<Tensor<2>>,
}

impl Code {
    /// The code used for a forward pass: the mean, or with `eps` (standard normal,
    /// `[1, code_dim]`) the reparameterised sample `mean + exp(logvar / 2) * eps`.
    pub fn sample(&self, eps: Option<Tensor<2>>) -> Tensor<2> {
        match (&self.logvar, eps) {
            (Some(lv), Some(eps)) => self.mean.clone() + lv.clone().mul_scalar(0.5).exp() * eps,
            _ => self.mean.clone(),
        }
    }

    /// `KL(N(mean, exp(logvar)) || N(0, 1))`, summed over the code; zero when not variational.
    pub fn kl(&self) -> Tensor<1> {
        match &self.logvar {
            Some(lv) => {
                let m2 = self.mean.clone().powi_scalar(2);
                ((m2 + lv.clone().exp() - lv.clone()).sub_scalar(1.0)).sum().mul_scalar(0.5)
            }
            None => Tensor::zeros([1], &self.mean.device()),
        }
    }
}

/// The predicted LoRA of every layer: `(path, A [r, in], B [out, r])`.
pub type Predicted = Vec<(String, Tensor<2>, Tensor<2>)>;

pub struct HyperLora {
    pub config: HyperLoraConfig,
    /// `[num_codes, code_dim]` (`codes.weight`), with `codes_logvar.weight` when variational.
    pub codes: Option<Tensor<2>>,
    pub codes_logvar: Option<Tensor<2>>,
    /// Image embedding -> code (mean, then log-variance when variational).
    pub image_proj: Option<Linear>,
    pub fc1: Linear,
    pub head: Linear,
    /// Fixed `(A_aux [a, in], B_aux [out, b])` per layer; not parameters.
    pub aux: Vec<(Tensor<2>, Tensor<2>)>,
}

impl Module for HyperLora {
    fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
        if let Some(t) = &self.codes {
            v.param(&join(prefix, "codes.weight"), ParamRef::D2(t));
        }
        if let Some(t) = &self.codes_logvar {
            v.param(&join(prefix, "codes_logvar.weight"), ParamRef::D2(t));
        }
        self.image_proj.visit(&join(prefix, "image_proj"), v);
        self.fc1.visit(&join(prefix, "fc1"), v);
        self.head.visit(&join(prefix, "head"), v);
    }
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
        if let Some(t) = &mut self.codes {
            v.param(&join(prefix, "codes.weight"), ParamMut::D2(t));
        }
        if let Some(t) = &mut self.codes_logvar {
            v.param(&join(prefix, "codes_logvar.weight"), ParamMut::D2(t));
        }
        self.image_proj.visit_mut(&join(prefix, "image_proj"), v);
        self.fc1.visit_mut(&join(prefix, "fc1"), v);
        self.head.visit_mut(&join(prefix, "head"), v);
    }
}

impl HyperLora {
    /// A fresh network: every parameter trainable, the fixed matrices drawn from `config.seed`.
    pub fn new(config: HyperLoraConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut init = Init::new(config.seed);
        let c = &config;
        let aux = c
            .layers
            .iter()
            .map(|l| {
                let (a, b) = c.inner(l);
                (init.normal([a, l.d_in], 1.0 / (l.d_in as f64).sqrt(), device), init.normal([l.d_out, b], 1.0 / (b as f64).sqrt(), device))
            })
            .collect();
        let var = if c.variational { 2 } else { 1 };
        let codes = (c.num_codes > 0).then(|| init.normal([c.num_codes, c.code_dim], 1.0, device));
        // Log-variance starts low so that early samples stay near the mean.
        let codes_logvar = (c.num_codes > 0 && c.variational).then(|| Tensor::<2>::full([c.num_codes, c.code_dim], -4.0, device));
        let image_proj = (c.image_dim > 0).then(|| Linear::new(c.image_dim, c.code_dim * var, true, &mut init, device));
        let fc1 = Linear::new(c.code_dim, c.hidden, true, &mut init, device);
        let mut head = Linear::new(c.hidden, c.head_width(), true, &mut init, device);
        head.weight = Tensor::zeros([c.head_width(), c.hidden], device);
        let mut bias = Vec::with_capacity(2 * c.layers.len());
        for l in &c.layers {
            let (a, b) = c.inner(l);
            bias.push(init.uniform([c.rank * a], 1.0 / (a as f64).sqrt(), device));
            bias.push(Tensor::zeros([b * c.rank], device));
        }
        head.bias = Some(Tensor::cat(bias, 0));
        let mut net = HyperLora { config, codes, codes_logvar, image_proj, fc1, head, aux };
        net.train_only(|_| true);
        Ok(net)
    }

    /// The code of training concept `index` (a row of the table).
    pub fn code_of(&self, index: usize) -> Result<Code> {
        let table = self.codes.as_ref().ok_or_else(|| AdapterError::Config("hyperlora: this network has no code table (num_codes = 0)".into()))?;
        if index >= self.config.num_codes {
            return Err(AdapterError::Config(format!("hyperlora: concept index {index} out of range (num_codes = {})", self.config.num_codes)));
        }
        let d = self.config.code_dim;
        let row = |t: &Tensor<2>| t.clone().slice([index..index + 1, 0..d]);
        Ok(Code { mean: row(table), logvar: self.codes_logvar.as_ref().map(row) })
    }

    /// The code predicted from image embeddings `[n, image_dim]` (their mean is used).
    pub fn code_from_images(&self, embeddings: Tensor<2>) -> Result<Code> {
        let proj = self.image_proj.as_ref().ok_or_else(|| AdapterError::Config("hyperlora: this network has no image path (image_dim = 0)".into()))?;
        let [n, dim] = embeddings.dims();
        if n == 0 || dim != self.config.image_dim {
            return Err(AdapterError::Config(format!("hyperlora: image embeddings have shape [{n}, {dim}], the network takes [n >= 1, {}]", self.config.image_dim)));
        }
        let out = proj.forward(embeddings.mean_dim(0));
        let d = self.config.code_dim;
        Ok(if self.config.variational {
            Code { mean: out.clone().slice([0..1, 0..d]), logvar: Some(out.slice([0..1, d..2 * d])) }
        } else {
            Code { mean: out, logvar: None }
        })
    }

    /// The LoRA of every layer for code `z` (`[1, code_dim]`), computed in the graph of `z`
    /// and the network's parameters.
    pub fn predict(&self, z: Tensor<2>) -> Predicted {
        let c = &self.config;
        let out = self.head.forward(silu(self.fc1.forward(z)));
        let mut off = 0;
        let mut res = Vec::with_capacity(c.layers.len());
        for (l, (a_aux, b_aux)) in c.layers.iter().zip(&self.aux) {
            let (a, b) = c.inner(l);
            let a_train = out.clone().slice([0..1, off..off + c.rank * a]).reshape([c.rank, a]);
            off += c.rank * a;
            let b_train = out.clone().slice([0..1, off..off + b * c.rank]).reshape([b, c.rank]);
            off += b * c.rank;
            res.push((l.path.clone(), a_train.matmul(a_aux.clone()), b_aux.clone().matmul(b_train)));
        }
        res
    }

    /// Attaches an (empty) LoRA adapter `name` of this network's shape to `model`; the
    /// predicted weights are then put in place with [`HyperLora::apply`].
    pub fn attach<M: Module>(&self, model: &mut AdaptedModel<M>, name: &str) -> Result<()> {
        let paths = model.add_adapter(name, Box::new(self.config.lora_config()))?;
        for l in &self.config.layers {
            if !paths.contains(&l.path) {
                return Err(AdapterError::Config(format!("hyperlora layer `{}` is not a layer of the model", l.path)));
            }
        }
        let mut shapes = Vec::new();
        model.model.for_each_layer(|path, layer| {
            if let LayerRef::Linear(lin) = layer {
                shapes.push((path.to_string(), lin.d_in(), lin.d_out()));
            }
        });
        for l in &self.config.layers {
            if !shapes.iter().any(|(p, i, o)| *p == l.path && *i == l.d_in && *o == l.d_out) {
                return Err(AdapterError::Config(format!("hyperlora layer `{}`: the network was made for [{} -> {}], the model's layer differs", l.path, l.d_in, l.d_out)));
            }
        }
        Ok(())
    }

    /// Puts `predicted` in place as the weights of LoRA adapter `name` (see
    /// [`crate::generated::set_tensors`]): gradients of the model's loss reach the network.
    pub fn apply<M: Module + ?Sized>(model: &mut M, name: &str, predicted: &Predicted) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (path, a, b) in predicted {
            tensors.insert(format!("{path}.lora_A.{name}.weight"), a.clone());
            tensors.insert(format!("{path}.lora_B.{name}.weight"), b.clone());
        }
        crate::generated::set_tensors(model, &tensors)
    }

    /// Saves the network into `dir` (`hyperlora.safetensors` + `hyperlora_config.json`).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let mut tensors = state_dict(self);
        for (i, (a, b)) in self.aux.iter().enumerate() {
            tensors.insert(format!("aux.{i}.A"), a.to_data());
            tensors.insert(format!("aux.{i}.B"), b.to_data());
        }
        let meta = HashMap::from([("format".to_string(), "knobs-hyperlora".to_string())]);
        write_safetensors(dir.join(WEIGHTS_FILE), &tensors, &meta)?;
        let json = serde_json::to_vec_pretty(&self.config).map_err(|e| AdapterError::Config(format!("hyperlora config: {e}")))?;
        knobs_nn::io::atomic_write(dir.join(CONFIG_FILE), &json)?;
        Ok(())
    }

    /// Reads a network saved by [`HyperLora::save`]; errors name the file and key.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| knobs_nn::Error::file(&cfg_path, format!("cannot read: {e}")))?;
        let config: HyperLoraConfig = serde_json::from_str(&text).map_err(|e| knobs_nn::Error::file(&cfg_path, format!("not a hyperlora config: {e}")))?;
        config.validate().map_err(|e| knobs_nn::Error::file(&cfg_path, e.to_string()))?;
        let sd = read_safetensors(dir.join(WEIGHTS_FILE))?;
        Self::from_state(config, &sd, device)
    }

    pub fn from_state(config: HyperLoraConfig, sd: &StateDict, device: &Device) -> Result<Self> {
        let mut net = HyperLora::new(config, device)?;
        let mut params = sd.clone();
        params.tensors.retain(|k, _| !k.starts_with("aux."));
        load_state_dict(&mut net, &params, LoadOptions::default())?;
        for (i, (a, b)) in net.aux.iter_mut().enumerate() {
            for (key, t) in [(format!("aux.{i}.A"), a), (format!("aux.{i}.B"), b)] {
                let data = sd.get(&key)?;
                if data.shape().as_slice() != t.dims().as_slice() {
                    return Err(knobs_nn::Error::key(&sd.file, &key, format!("shape {:?}, the config needs {:?}", data.shape().as_slice(), t.dims())).into());
                }
                *t = Tensor::from_data(data.clone().convert::<f32>(), device);
            }
        }
        Ok(net)
    }

    /// Parameters: the code table plus the network (for reports).
    pub fn num_network_params(&self) -> usize {
        let mut n = 0;
        self.for_each_param(|p, t| if !p.starts_with("codes") { n += t.numel() });
        n
    }
}
