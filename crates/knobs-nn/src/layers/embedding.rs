use burn::tensor::module::embedding;
use burn::tensor::{Device, Int, Tensor};

use crate::adapter::{EmbeddingAdapter, Slot};
use crate::init::Init;
use crate::module::{LayerMut, LayerRef, Module, Visitor, VisitorMut, join};
use crate::Result;
use crate::param::{ParamMut, ParamRef, f32_value, like_stored};

/// A lookup table `[num_embeddings, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Tensor<2>,
    pub adapters: Slot<dyn EmbeddingAdapter>,
}

impl Embedding {
    /// PyTorch's default initialisation, N(0, 1).
    pub fn new(num: usize, dim: usize, init: &mut Init, device: &Device) -> Self {
        Embedding { weight: init.normal([num, dim], 1.0, device), adapters: Slot::default() }
    }

    pub fn num_embeddings(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let mut y = embedding(f32_value(&self.weight), ids.clone());
        for e in self.adapters.live() {
            y = e.adapter.output(&ids, y, e.weight());
        }
        y
    }

    /// Folds adapter `name` into the table; false when there is nothing to do, an error (and
    /// the table unchanged) when the adapter cannot be merged.
    pub fn merge_adapter(&mut self, name: &str) -> Result<bool> {
        let table = f32_value(&self.weight).inner();
        let Some(w) = self.adapters.merge(name, |a, weight| a.merge(table, weight))? else { return Ok(false) };
        self.weight = like_stored(&self.weight, w);
        Ok(true)
    }

    /// Takes merged adapter `name` back out of the table; false when it is not merged.
    pub fn unmerge_adapter(&mut self, name: &str) -> bool {
        let table = f32_value(&self.weight).inner();
        let Some(w) = self.adapters.unmerge(name, |a, weight| a.unmerge(table, weight)) else { return false };
        self.weight = like_stored(&self.weight, w);
        true
    }
}

impl Module for Embedding {
    fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
        v.layer(prefix, LayerRef::Embedding(self));
        v.param(&join(prefix, "weight"), ParamRef::D2(&self.weight));
        self.adapters.visit(prefix, v);
    }
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
        v.layer(prefix, LayerMut::Embedding(self));
        v.param(&join(prefix, "weight"), ParamMut::D2(&mut self.weight));
        self.adapters.visit_mut(prefix, v);
    }
}
