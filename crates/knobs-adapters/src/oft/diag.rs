//! LyCORIS's diag-OFT, as its files hold it (`oft_blocks` `[blocks, bs, bs]`, `alpha` = the
//! constraint): the weight's output side rotated block by block, `W'_k = R_k^T W_k` for the
//! rows of block k, with `Q = B - B^T`, `R = (I + Q)(I - Q)^-1` (exact Cayley) and, for a
//! constraint c > 0, `Q` scaled onto `||Q|| <= c * out` (the norm over all blocks). The layer
//! adds `x (W' - W)^T`, so the bias is not rotated. Read from and written to LyCORIS files for
//! generation; the inverse is taken on the host, so it does not train (PEFT's OFT does).
use std::collections::BTreeMap;

use knobs_nn::ops::conv2d;
use knobs_nn::param::{ParamMut, ParamRef, f32_value};
use knobs_nn::{Adapter, Conv2d, Conv2dAdapter, Init, LayerMut, Linear, LinearAdapter, Tensor, Visitor, VisitorMut};
use serde_json::{Value, json};

use super::rotation::invert_blocks;
use crate::method::AdapterConfig;
use crate::{AdapterError, PeftType, Result, Targets};

/// Which layers carry diag-OFT, each with its block count and size and its constraint.
#[derive(Debug, Clone, PartialEq)]
pub struct DiagOftConfig {
    pub targets: Targets,
    /// Layer path -> (blocks, block size, constraint).
    pub layers: BTreeMap<String, (usize, usize, f64)>,
}

impl AdapterConfig for DiagOftConfig {
    fn peft_type(&self) -> PeftType {
        PeftType::Oft
    }
    fn targets(&self) -> &Targets {
        &self.targets
    }
    fn modules_to_save(&self) -> &[String] {
        &[]
    }
    fn attach(&self, path: &str, layer: LayerMut<'_>, name: &str, _: &mut Init) -> Result<()> {
        let &(blocks, bs, constraint) = self.layers.get(path).ok_or_else(|| AdapterError::Config(format!("diag-OFT has no block layout for `{path}`")))?;
        let (out, device) = match &layer {
            LayerMut::Linear(l) => (l.d_out(), l.weight.device()),
            LayerMut::Conv2d(l) => (l.c_out(), l.weight.device()),
            LayerMut::Embedding(_) => return Err(AdapterError::Config(format!("diag-OFT cannot attach to embedding `{path}`"))),
        };
        if blocks * bs != out {
            return Err(AdapterError::Config(format!("diag-OFT on `{path}`: {blocks} blocks of {bs} do not cover its {out} outputs")));
        }
        let adapter = DiagOft { blocks: Tensor::zeros([blocks * bs, bs], &device), block_size: bs, constraint, merged_delta: Default::default() };
        match layer {
            LayerMut::Linear(l) => l.adapters.insert(name, Box::new(adapter)),
            LayerMut::Conv2d(l) => l.adapters.insert(name, Box::new(adapter)),
            LayerMut::Embedding(_) => unreachable!("refused above"),
        }
        Ok(())
    }
    /// Not a PEFT method: its config has no `adapter_config.json` form.
    fn to_peft_json(&self) -> Value {
        json!({ "peft_type": "LYCORIS_DIAG_OFT", "target_modules": self.targets.target_modules })
    }
    fn check_peft(&self) -> Result<()> {
        Err(AdapterError::Config("LyCORIS diag-OFT has no PEFT form; save it as a LyCORIS file".into()))
    }
    fn clone_box(&self) -> Box<dyn AdapterConfig> {
        Box::new(self.clone())
    }
}

#[derive(Debug, Clone)]
pub struct DiagOft {
    /// `oft_blocks` stacked: `[blocks * bs, bs]`.
    pub blocks: Tensor<2>,
    pub block_size: usize,
    /// LyCORIS's `alpha`; 0 leaves `Q` free.
    pub constraint: f64,
    merged_delta: crate::merged::Merged<Tensor<2>>,
}

impl DiagOft {
    /// `W' - W` for weight `w` flattened to `[out, rest]`, the generator scaled by `weight`.
    fn delta(&self, w: Tensor<2>, weight: f32) -> Tensor<2> {
        let [out, rest] = w.dims();
        let bs = self.block_size;
        let n = out / bs;
        let b = self.blocks.clone().inner().reshape([n, bs, bs]);
        let mut q = b.clone() - b.swap_dims(1, 2);
        if self.constraint > 0.0 {
            let c = self.constraint * out as f64;
            let norm = q.clone().powi_scalar(2).sum().sqrt().into_scalar::<f32>() as f64 + 1e-8;
            if norm > c {
                q = q * (c / norm);
            }
        }
        let q = q * weight as f64;
        let eye = Tensor::<2>::eye(bs, &q.device()).reshape([1, bs, bs]).expand([n, bs, bs]);
        let r = (eye.clone() + q.clone()).matmul(invert_blocks(eye - q));
        let rotated = r.swap_dims(1, 2).matmul(w.clone().reshape([n, bs, rest])).reshape([out, rest]);
        rotated - w
    }
}

impl Adapter for DiagOft {
    fn method(&self) -> &'static str {
        PeftType::Oft.as_str()
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        v.param(&format!("{layer}.oft_blocks.{adapter}"), ParamRef::D2(&self.blocks));
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        v.param(&format!("{layer}.oft_blocks.{adapter}"), ParamMut::D2(&mut self.blocks));
    }
}

impl LinearAdapter for DiagOft {
    fn forward(&self, x: Tensor<2>, base: &Linear, inner: &dyn Fn(Tensor<2>) -> Tensor<2>, weight: f32) -> Tensor<2> {
        let delta = self.delta(f32_value(&base.weight).inner(), weight);
        inner(x.clone()) + x.matmul(delta.transpose())
    }
    fn merge(&self, w: Tensor<2>, b: Option<Tensor<1>>, unmerged: &Tensor<2>, weight: f32) -> knobs_nn::Result<(Tensor<2>, Option<Tensor<1>>)> {
        let delta = self.delta(unmerged.clone(), weight);
        self.merged_delta.set(delta.clone());
        Ok((w + delta, b))
    }
    fn unmerge(&self, w: Tensor<2>, b: Option<Tensor<1>>, _weight: f32) -> (Tensor<2>, Option<Tensor<1>>) {
        (w - self.merged_delta.get(), b)
    }
}

impl Conv2dAdapter for DiagOft {
    fn forward(&self, x: Tensor<4>, base: &Conv2d, inner: &dyn Fn(Tensor<4>) -> Tensor<4>, weight: f32) -> Tensor<4> {
        let w = f32_value(&base.weight).inner();
        let dims = w.dims();
        let delta = self.delta(w.reshape([dims[0], dims[1] * dims[2] * dims[3]]), weight).reshape(dims);
        inner(x.clone()) + conv2d(x, delta, None, base.options())
    }
    fn merge(&self, w: Tensor<4>, b: Option<Tensor<1>>, unmerged: &Tensor<4>, weight: f32) -> knobs_nn::Result<(Tensor<4>, Option<Tensor<1>>)> {
        let dims = w.dims();
        let delta = self.delta(unmerged.clone().reshape([dims[0], dims[1] * dims[2] * dims[3]]), weight);
        self.merged_delta.set(delta.clone());
        Ok((w + delta.reshape(dims), b))
    }
    fn unmerge(&self, w: Tensor<4>, b: Option<Tensor<1>>, _weight: f32) -> (Tensor<4>, Option<Tensor<1>>) {
        let dims = w.dims();
        let delta = self.merged_delta.get();
        (w - delta.reshape(dims), b)
    }
}
