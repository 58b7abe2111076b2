//! The one place where adapters meet layers. Each adaptable layer carries a [`Slot`]: the
//! adapters attached to it, with their run-time state. Layers call the slot in `forward`;
//! adapter methods (LoRA, IA3, ...) live in `knobs-adapters` and implement these traits, so
//! adding a method never edits a layer or a model.
use std::any::Any;
use std::fmt::Debug;

use burn::tensor::{Int, Tensor};

use crate::module::{Visitor, VisitorMut};
use crate::{Error, Result};

/// What every adapter, on any layer kind, provides.
pub trait Adapter: Any + Send + Sync + Debug {
    /// The method's name as PEFT writes it in `peft_type` (`LORA`, `IA3`, ...).
    fn method(&self) -> &'static str;
    /// Visits the adapter's parameters under the host layer's path, named as PEFT names them
    /// in memory (`<layer>.lora_A.<adapter>.weight`), so trainability and optimizers see them
    /// like any other parameter.
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor);
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut);
    /// Switches train-only behaviour such as dropout.
    fn set_training(&mut self, _training: bool) {}
}

/// An adapter on a [`crate::Linear`]. Inputs and outputs are flattened to `[rows, features]`.
///
/// Adapters wrap the layer in the order they were attached, as PEFT's wrapper modules nest:
/// `inner` is the layer with every earlier adapter applied. LoRA returns
/// `inner(x) + delta(x)`, IA3 `inner(x) * l` or `inner(x * l)`. Merging in attachment order
/// therefore gives exactly the same function. `base` is the host layer, for methods that read
/// its weights (DoRA's column norms); its own forward is `inner` with no adapters left.
pub trait LinearAdapter: Adapter + CopyLinear {
    fn forward(&self, x: Tensor<2>, base: &crate::Linear, inner: &dyn Fn(Tensor<2>) -> Tensor<2>, weight: f32) -> Tensor<2>;
    /// Folds the adapter into the layer's weight `[out, in]` and bias; an error when the
    /// adapter has no weight form (a hypernetwork transforms the input non-linearly).
    /// `unmerged` is the layer's own weight without any merged adapter, for methods whose
    /// change depends on it (DoRA's norms, OFT's rotated kernel), as PEFT's
    /// `_unmerged_base_weight`.
    fn merge(&self, w: Tensor<2>, b: Option<Tensor<1>>, unmerged: &Tensor<2>, weight: f32) -> Result<(Tensor<2>, Option<Tensor<1>>)>;
    /// Undoes [`LinearAdapter::merge`]; only called after a merge succeeded, so it cannot fail.
    fn unmerge(&self, w: Tensor<2>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<2>, Option<Tensor<1>>);
    /// Whether the output is `inner(x)` plus a term of `x` alone (LoRA, LoHa, LoKr): a residual
    /// that the layer's output joins may then join `inner`'s instead, added by the base layer's
    /// product as it writes its output ([`crate::Linear::forward_added`]), so that the layer at
    /// weight 0 gives the base's bits.
    fn adds_to_output(&self) -> bool {
        false
    }
    /// Whether `forward` takes a half-precision `x` as it is (mixed precision on the CPU): its
    /// `inner` then gets that `x` too and returns f32, the adapter's own output is f32, and the
    /// input's gradient comes back in its dtype. Otherwise the layer hands it `x` widened to
    /// f32, a copy that an adapter keeping its input for the backward pass keeps at twice the
    /// size, once per layer where q, k and v share one input.
    fn takes_half_input(&self) -> bool {
        false
    }
}

/// An adapter on a [`crate::Conv2d`]; tensors are NCHW. Wraps `inner` as [`LinearAdapter`].
pub trait Conv2dAdapter: Adapter + CopyConv2d {
    fn forward(&self, x: Tensor<4>, base: &crate::Conv2d, inner: &dyn Fn(Tensor<4>) -> Tensor<4>, weight: f32) -> Tensor<4>;
    fn merge(&self, w: Tensor<4>, b: Option<Tensor<1>>, unmerged: &Tensor<4>, weight: f32) -> Result<(Tensor<4>, Option<Tensor<1>>)>;
    fn unmerge(&self, w: Tensor<4>, b: Option<Tensor<1>>, weight: f32) -> (Tensor<4>, Option<Tensor<1>>);
}

/// An adapter on an [`crate::Embedding`]: `y` is `[batch, seq, dim]` for token ids `ids`.
pub trait EmbeddingAdapter: Adapter + CopyEmbedding {
    fn output(&self, _ids: &Tensor<2, Int>, y: Tensor<3>, _weight: f32) -> Tensor<3> {
        y
    }
    fn merge(&self, table: Tensor<2>, weight: f32) -> Result<Tensor<2>>;
    fn unmerge(&self, table: Tensor<2>, weight: f32) -> Tensor<2>;
}

/// Copies an adapter behind its trait object. A layer copied with its slot (a block that
/// gradient checkpointing recomputes, [`crate::checkpoint`]) must not share parameters with
/// the original, whose values its copy replaces. Every adapter that is `Clone` has it; a
/// `Clone` must then copy whatever the adapter shares with others (an A1111 hypernetwork's
/// module).
pub trait Copied {
    fn copied(&self) -> Box<Self>;
}

macro_rules! copied_by_clone {
    ($($helper:ident => $kind:ident),*) => {$(
        #[doc = concat!("[`Copied`] for a `", stringify!($kind), "` that is `Clone`.")]
        pub trait $helper {
            fn copied_box(&self) -> Box<dyn $kind>;
        }
        impl<T: $kind + Clone> $helper for T {
            fn copied_box(&self) -> Box<dyn $kind> {
                Box::new(self.clone())
            }
        }
        impl Copied for dyn $kind {
            fn copied(&self) -> Box<Self> {
                self.copied_box()
            }
        }
    )*};
}
copied_by_clone!(CopyLinear => LinearAdapter, CopyConv2d => Conv2dAdapter, CopyEmbedding => EmbeddingAdapter);

/// The run-time state of one attached adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdapterState {
    /// Takes part in `forward` (PEFT's active adapters).
    pub active: bool,
    /// Multiplies the adapter's effect (diffusers' `set_adapters` weights).
    pub weight: f32,
    /// Folded into the base weights with this weight: `forward` must not apply it again, and
    /// unmerging subtracts exactly what was added.
    pub merged: Option<f32>,
}

impl Default for AdapterState {
    fn default() -> Self {
        AdapterState { active: true, weight: 1.0, merged: None }
    }
}

/// One attached adapter.
#[derive(Debug)]
pub struct SlotEntry<A: ?Sized> {
    pub name: String,
    pub adapter: Box<A>,
    pub state: AdapterState,
}

impl<A: ?Sized> SlotEntry<A> {
    pub fn weight(&self) -> f32 {
        self.state.weight
    }
}

#[derive(Debug)]
pub struct Slot<A: ?Sized> {
    pub entries: Vec<SlotEntry<A>>,
    /// When false every unmerged adapter is bypassed (PEFT's `disable_adapter`).
    pub enabled: bool,
}

impl<A: ?Sized + Copied> Clone for Slot<A> {
    fn clone(&self) -> Self {
        let entries = self.entries.iter().map(|e| SlotEntry { name: e.name.clone(), adapter: e.adapter.copied(), state: e.state }).collect();
        Slot { entries, enabled: self.enabled }
    }
}

impl<A: ?Sized> Default for Slot<A> {
    fn default() -> Self {
        Slot { entries: Vec::new(), enabled: true }
    }
}

impl<A: ?Sized + Adapter> Slot<A> {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// The adapters that `forward` applies now.
    pub fn live(&self) -> impl Iterator<Item = &SlotEntry<A>> {
        let enabled = self.enabled;
        self.entries.iter().filter(move |e| enabled && e.state.active && e.state.merged.is_none())
    }
    pub fn has_live(&self) -> bool {
        self.live().next().is_some()
    }
    pub fn get(&self, name: &str) -> Option<&SlotEntry<A>> {
        self.entries.iter().find(|e| e.name == name)
    }
    pub fn get_mut(&mut self, name: &str) -> Option<&mut SlotEntry<A>> {
        self.entries.iter_mut().find(|e| e.name == name)
    }
    /// Attaches `adapter` as `name`, replacing an adapter of the same name.
    pub fn insert(&mut self, name: &str, adapter: Box<A>) {
        let entry = SlotEntry { name: name.to_string(), adapter, state: AdapterState::default() };
        match self.entries.iter_mut().position(|e| e.name == name) {
            Some(i) => self.entries[i] = entry,
            None => self.entries.push(entry),
        }
    }
    /// Folds adapter `name` in: `apply(adapter, weight)` computes the new base weights, and
    /// the state records the merge only once that succeeded. `None` when there is nothing to
    /// do (no such adapter, or already merged); an error, naming the adapter, when it refuses.
    pub fn merge<T>(&mut self, name: &str, apply: impl FnOnce(&A, f32) -> Result<T>) -> Result<Option<T>> {
        let Some(e) = self.get_mut(name).filter(|e| e.state.merged.is_none()) else { return Ok(None) };
        let out = apply(&e.adapter, e.state.weight).map_err(|err| Error::Invalid(format!("adapter `{name}`: {err}")))?;
        e.state.merged = Some(e.state.weight);
        Ok(Some(out))
    }
    /// Takes merged adapter `name` back out with the weight it was merged with (the weight may
    /// have changed since); `None` when it is not merged.
    pub fn unmerge<T>(&mut self, name: &str, apply: impl FnOnce(&A, f32) -> T) -> Option<T> {
        let e = self.get_mut(name)?;
        let out = apply(&e.adapter, e.state.merged?);
        e.state.merged = None;
        Some(out)
    }

    /// The merged adapters with their merge weights, last merged first: the order in which
    /// unmerging them gives back the layer's own weights.
    pub fn merged_rev(&self) -> impl Iterator<Item = (&A, f32)> {
        self.entries.iter().rev().filter_map(|e| e.state.merged.map(|w| (&*e.adapter, w)))
    }

    pub fn remove(&mut self, name: &str) -> Option<SlotEntry<A>> {
        let i = self.entries.iter().position(|e| e.name == name)?;
        Some(self.entries.remove(i))
    }
    pub fn visit(&self, layer: &str, v: &mut dyn Visitor) {
        for e in &self.entries {
            e.adapter.visit(layer, &e.name, v);
        }
    }
    pub fn visit_mut(&mut self, layer: &str, v: &mut dyn VisitorMut) {
        for e in &mut self.entries {
            e.adapter.visit_mut(layer, &e.name, v);
        }
    }
}
