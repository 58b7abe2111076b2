use knobs_nn::{Init, LayerMut, Tensor};
use serde_json::{Value, json};

use super::layer::{OftConv2d, OftLinear};
use super::rotation::Rotation;
use crate::lycoris::layer_shape;
use crate::method::{AdapterConfig, field};
use crate::{AdapterError, Pattern, PeftType, Result, Targets};

/// PEFT's `OFTConfig`: exactly one of `r` (blocks per layer) and `oft_block_size` is non-zero.
#[derive(Debug, Clone, PartialEq)]
pub struct OftConfig {
    pub r: usize,
    pub oft_block_size: usize,
    pub targets: Targets,
    pub module_dropout: f64,
    pub coft: bool,
    pub eps: f64,
    pub block_share: bool,
    pub use_cayley_neumann: bool,
    pub num_cayley_neumann_terms: usize,
    /// Start at the identity (Q = 0); false draws Q ~ N(0, 0.1^2).
    pub init_weights: bool,
    pub modules_to_save: Vec<String>,
}

impl OftConfig {
    /// PEFT's defaults with blocks of `oft_block_size` input features.
    pub fn new(oft_block_size: usize, target_modules: Pattern) -> Self {
        OftConfig {
            r: 0,
            oft_block_size,
            targets: Targets::new(target_modules),
            module_dropout: 0.0,
            coft: false,
            eps: 6e-5,
            block_share: false,
            use_cayley_neumann: true,
            num_cayley_neumann_terms: 5,
            init_weights: true,
            modules_to_save: Vec::new(),
        }
    }

    pub fn from_peft_json(json: &Value) -> Result<Box<dyn AdapterConfig>> {
        let target_modules: Pattern = field(json, "target_modules")?.ok_or_else(|| AdapterError::Config("key `target_modules`: missing".into()))?;
        let Some(oft_block_size) = field::<usize>(json, "oft_block_size")? else {
            return Err(AdapterError::Config("key `oft_block_size`: missing; OFT files from PEFT before 0.14 use an older parametrisation that PEFT itself no longer loads".into()));
        };
        let r: usize = field(json, "r")?.unwrap_or(0);
        if (r == 0) == (oft_block_size == 0) {
            return Err(AdapterError::Config(format!("keys `r` ({r}) and `oft_block_size` ({oft_block_size}): exactly one must be non-zero")));
        }
        let c = OftConfig {
            r,
            oft_block_size,
            targets: Targets { target_modules, exclude_modules: field(json, "exclude_modules")? },
            module_dropout: field(json, "module_dropout")?.unwrap_or(0.0),
            coft: field(json, "coft")?.unwrap_or(false),
            eps: field(json, "eps")?.unwrap_or(6e-5),
            block_share: field(json, "block_share")?.unwrap_or(false),
            use_cayley_neumann: field(json, "use_cayley_neumann")?.unwrap_or(true),
            num_cayley_neumann_terms: field(json, "num_cayley_neumann_terms")?.unwrap_or(5),
            init_weights: field(json, "init_weights")?.unwrap_or(true),
            modules_to_save: field(json, "modules_to_save")?.unwrap_or_default(),
        };
        if c.use_cayley_neumann && c.num_cayley_neumann_terms == 0 {
            return Err(AdapterError::Config("key `num_cayley_neumann_terms`: must be at least 1".into()));
        }
        Ok(Box::new(c))
    }

    /// Block size and count over `n` input features, with PEFT's adjustment of a size that
    /// does not divide `n` to the nearest one that does.
    pub fn blocks_for(&self, n: usize) -> (usize, usize) {
        if self.r == 0 {
            let bs = if !n.is_multiple_of(self.oft_block_size) || self.oft_block_size > n { adjust(n, self.oft_block_size) } else { self.oft_block_size };
            (bs, n / bs)
        } else {
            let r = if !n.is_multiple_of(self.r) || self.r > n { adjust(n, self.r) } else { self.r };
            (n / r, r)
        }
    }
}

/// PEFT's `adjust_oft_parameters`: the divisor of `n` nearest `p`, the lower on a tie.
fn adjust(n: usize, p: usize) -> usize {
    if p >= n {
        return n;
    }
    let mut higher = p;
    while higher <= n && !n.is_multiple_of(higher) {
        higher += 1;
    }
    let mut lower = p;
    while lower > 1 && !n.is_multiple_of(lower) {
        lower -= 1;
    }
    if p - lower <= higher - p { lower } else { higher }
}

impl AdapterConfig for OftConfig {
    fn peft_type(&self) -> PeftType {
        PeftType::Oft
    }
    fn targets(&self) -> &Targets {
        &self.targets
    }
    fn modules_to_save(&self) -> &[String] {
        &self.modules_to_save
    }

    fn attach(&self, path: &str, layer: LayerMut<'_>, name: &str, init: &mut Init) -> Result<()> {
        let ([_, c_in, kh, kw], device) = layer_shape(&layer, path, "OFT")?;
        if kh != kw {
            return Err(AdapterError::Config(format!("OFT cannot attach to `{path}`: its kernel is not square ({kh}x{kw})")));
        }
        let (block_size, blocks) = self.blocks_for(c_in * kh * kw);
        if block_size < 2 {
            return Err(AdapterError::Config(format!("OFT on `{path}`: a block size of {block_size} leaves nothing to rotate; use a larger oft_block_size")));
        }
        let neumann = self.use_cayley_neumann.then_some(self.num_cayley_neumann_terms);
        let rotation = Rotation::new(block_size, blocks, self.block_share, self.coft, self.eps, neumann);
        let shape = [rotation.param_rows(), rotation.n_elements()];
        let q = if self.init_weights { Tensor::zeros(shape, &device) } else { init.normal(shape, 0.1, &device) };
        match layer {
            LayerMut::Linear(l) => l.adapters.insert(name, Box::new(OftLinear { q, rotation })),
            LayerMut::Conv2d(l) => l.adapters.insert(name, Box::new(OftConv2d::new(q, rotation))),
            LayerMut::Embedding(_) => unreachable!("layer_shape refuses embeddings"),
        }
        Ok(())
    }

    fn to_peft_json(&self) -> Value {
        json!({
            "peft_type": PeftType::Oft.as_str(),
            "r": self.r,
            "oft_block_size": self.oft_block_size,
            "target_modules": self.targets.target_modules,
            "exclude_modules": self.targets.exclude_modules,
            "module_dropout": self.module_dropout,
            "coft": self.coft,
            "eps": self.eps,
            "block_share": self.block_share,
            "use_cayley_neumann": self.use_cayley_neumann,
            "num_cayley_neumann_terms": self.num_cayley_neumann_terms,
            "init_weights": self.init_weights,
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
            "fan_in_fan_out": false,
            "bias": "none",
            "peft_version": "0.21.2",
            "task_type": null,
            "inference_mode": true,
        })
    }

    fn clone_box(&self) -> Box<dyn AdapterConfig> {
        Box::new(self.clone())
    }
}
