//! Every model is a tree of modules whose parameters are addressed by dotted paths equal to
//! the PyTorch `state_dict` keys of the same model, so checkpoints and adapter files map 1:1.
use crate::layers::{Conv2d, Embedding, Linear};
use crate::param::{ParamMut, ParamRef};

/// A layer that adapters can attach to, handed to visitors by reference.
pub enum LayerRef<'a> {
    Linear(&'a Linear),
    Conv2d(&'a Conv2d),
    Embedding(&'a Embedding),
}

pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv2d(&'a mut Conv2d),
    Embedding(&'a mut Embedding),
}

/// Which adaptable layer a [`LayerRef`] / [`LayerMut`] is; displays as PyTorch's class name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    Linear,
    Conv2d,
    Embedding,
}

impl std::fmt::Display for LayerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayerKind::Linear => "Linear",
            LayerKind::Conv2d => "Conv2d",
            LayerKind::Embedding => "Embedding",
        })
    }
}

impl LayerRef<'_> {
    pub fn kind(&self) -> LayerKind {
        match self {
            LayerRef::Linear(_) => LayerKind::Linear,
            LayerRef::Conv2d(_) => LayerKind::Conv2d,
            LayerRef::Embedding(_) => LayerKind::Embedding,
        }
    }
    /// Each attached adapter's name and state.
    pub fn adapter_states(&self) -> Vec<(String, crate::adapter::AdapterState)> {
        match self {
            LayerRef::Linear(l) => l.adapters.entries.iter().map(|e| (e.name.clone(), e.state)).collect(),
            LayerRef::Conv2d(l) => l.adapters.entries.iter().map(|e| (e.name.clone(), e.state)).collect(),
            LayerRef::Embedding(l) => l.adapters.entries.iter().map(|e| (e.name.clone(), e.state)).collect(),
        }
    }
    /// Visits the parameters of adapter `name` on this layer (at `path`), if it has one.
    pub fn visit_adapter(&self, path: &str, name: &str, v: &mut dyn Visitor) {
        match self {
            LayerRef::Linear(l) => if let Some(e) = l.adapters.get(name) { e.adapter.visit(path, name, v) },
            LayerRef::Conv2d(l) => if let Some(e) = l.adapters.get(name) { e.adapter.visit(path, name, v) },
            LayerRef::Embedding(l) => if let Some(e) = l.adapters.get(name) { e.adapter.visit(path, name, v) },
        }
    }
}

pub trait Visitor {
    fn param(&mut self, path: &str, param: ParamRef<'_>);
    fn layer(&mut self, _path: &str, _layer: LayerRef<'_>) {}
}

pub trait VisitorMut {
    fn param(&mut self, path: &str, param: ParamMut<'_>);
    fn layer(&mut self, _path: &str, _layer: LayerMut<'_>) {}
}

pub trait Module {
    fn visit(&self, prefix: &str, v: &mut dyn Visitor);
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut);
}

/// `prefix.name`, or `name` at the root.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") }
}

impl<M: Module> Module for Vec<M> {
    fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
        for (i, m) in self.iter().enumerate() {
            m.visit(&join(prefix, &i.to_string()), v);
        }
    }
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
        for (i, m) in self.iter_mut().enumerate() {
            m.visit_mut(&join(prefix, &i.to_string()), v);
        }
    }
}

impl<M: Module> Module for Option<M> {
    fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
        if let Some(m) = self {
            m.visit(prefix, v)
        }
    }
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
        if let Some(m) = self {
            m.visit_mut(prefix, v)
        }
    }
}

/// Lets an adapter manager borrow a model that something else owns (a pipeline's UNet).
impl<M: Module + ?Sized> Module for &mut M {
    fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
        (**self).visit(prefix, v)
    }
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
        (**self).visit_mut(prefix, v)
    }
}

impl<M: Module + ?Sized> Module for Box<M> {
    fn visit(&self, prefix: &str, v: &mut dyn Visitor) {
        (**self).visit(prefix, v)
    }
    fn visit_mut(&mut self, prefix: &str, v: &mut dyn VisitorMut) {
        (**self).visit_mut(prefix, v)
    }
}

/// Implements [`Module`] for a struct by naming its children as they appear in the
/// checkpoint: `impl_module!(Attention { "to_q" => to_q, "to_out.0" => to_out });`
#[macro_export]
macro_rules! impl_module {
    ($ty:ty { $($name:literal => $field:ident),* $(,)? }) => {
        impl $crate::Module for $ty {
            fn visit(&self, prefix: &str, v: &mut dyn $crate::Visitor) {
                $( $crate::Module::visit(&self.$field, &$crate::join(prefix, $name), v); )*
            }
            fn visit_mut(&mut self, prefix: &str, v: &mut dyn $crate::VisitorMut) {
                $( $crate::Module::visit_mut(&mut self.$field, &$crate::join(prefix, $name), v); )*
            }
        }
    };
}

/// Wraps a closure as a parameter visitor.
pub struct ParamFn<F>(pub F);
impl<F: FnMut(&str, ParamRef<'_>)> Visitor for ParamFn<F> {
    fn param(&mut self, path: &str, param: ParamRef<'_>) {
        (self.0)(path, param)
    }
}
/// Wraps a closure as a mutable parameter visitor.
pub struct ParamMutFn<F>(pub F);
impl<F: FnMut(&str, ParamMut<'_>)> VisitorMut for ParamMutFn<F> {
    fn param(&mut self, path: &str, param: ParamMut<'_>) {
        (self.0)(path, param)
    }
}
struct LayerMutFn<F>(F);
impl<F: FnMut(&str, LayerMut<'_>)> VisitorMut for LayerMutFn<F> {
    fn param(&mut self, _: &str, _: ParamMut<'_>) {}
    fn layer(&mut self, path: &str, layer: LayerMut<'_>) {
        (self.0)(path, layer)
    }
}
struct LayerFn<F>(F);
impl<F: FnMut(&str, LayerRef<'_>)> Visitor for LayerFn<F> {
    fn param(&mut self, _: &str, _: ParamRef<'_>) {}
    fn layer(&mut self, path: &str, layer: LayerRef<'_>) {
        (self.0)(path, layer)
    }
}

/// Conveniences over the visitor so that callers write closures, not visitor structs.
pub trait ModuleExt: Module {
    fn for_each_param(&self, f: impl FnMut(&str, ParamRef<'_>)) {
        self.visit("", &mut ParamFn(f))
    }
    fn for_each_param_mut(&mut self, f: impl FnMut(&str, ParamMut<'_>)) {
        self.visit_mut("", &mut ParamMutFn(f))
    }
    fn for_each_layer(&self, f: impl FnMut(&str, LayerRef<'_>)) {
        self.visit("", &mut LayerFn(f))
    }
    fn for_each_layer_mut(&mut self, f: impl FnMut(&str, LayerMut<'_>)) {
        self.visit_mut("", &mut LayerMutFn(f))
    }
    fn param_paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.for_each_param(|p, _| out.push(p.to_string()));
        out
    }
    fn num_params(&self) -> usize {
        let mut n = 0;
        self.for_each_param(|_, p| n += p.numel());
        n
    }
    fn num_trainable_params(&self) -> usize {
        let mut n = 0;
        self.for_each_param(|_, p| if p.is_trainable() { n += p.numel() });
        n
    }
    /// Freezes every parameter (no gradient, no weight-gradient compute).
    fn freeze_all(&mut self) {
        self.for_each_param_mut(|_, mut p| p.set_trainable(false));
    }
    /// Takes every parameter out of autodiff: frozen, and as cheap as a model that never
    /// trained.
    fn for_inference(&mut self) {
        self.for_each_param_mut(|_, mut p| p.set_inference());
    }
    /// Stores every layer's frozen weight matrix and kernel in `dtype`, for inference and
    /// training (see [`ParamMut::store_frozen_as`]). Attached adapters keep theirs: their
    /// branches and merges compute with them in f32.
    fn store_frozen_as(&mut self, dtype: burn::tensor::DType) {
        self.for_each_layer_mut(|_, layer| match layer {
            LayerMut::Linear(l) => ParamMut::D2(&mut l.weight).store_frozen_as(dtype),
            LayerMut::Conv2d(c) => ParamMut::D4(&mut c.weight).store_frozen_as(dtype),
            LayerMut::Embedding(e) => ParamMut::D2(&mut e.weight).store_frozen_as(dtype),
        });
    }
    /// Makes every parameter whose path satisfies `pred` trainable and freezes the rest.
    fn train_only(&mut self, mut pred: impl FnMut(&str) -> bool) {
        self.for_each_param_mut(|path, mut p| p.set_trainable(pred(path)));
    }
    /// Runs `f` with every layer's adapters taken off, and puts them back: what `f` visits is
    /// the model's own parameters only (its weights file, loaded after adapters attached).
    fn without_adapters<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let mut taken = std::collections::HashMap::new();
        self.for_each_layer_mut(|path, layer| {
            let slots = match layer {
                LayerMut::Linear(l) => TakenSlot::Linear(std::mem::take(&mut l.adapters)),
                LayerMut::Conv2d(c) => TakenSlot::Conv2d(std::mem::take(&mut c.adapters)),
                LayerMut::Embedding(e) => TakenSlot::Embedding(std::mem::take(&mut e.adapters)),
            };
            taken.insert(path.to_string(), slots);
        });
        let out = f(self);
        // By path: layers inside the adapters put back are visited too, and were not taken.
        self.for_each_layer_mut(|path, layer| match (layer, taken.remove(path)) {
            (LayerMut::Linear(l), Some(TakenSlot::Linear(s))) => l.adapters = s,
            (LayerMut::Conv2d(c), Some(TakenSlot::Conv2d(s))) => c.adapters = s,
            (LayerMut::Embedding(e), Some(TakenSlot::Embedding(s))) => e.adapters = s,
            (_, None) => {}
            _ => unreachable!("a layer at {path} changed its kind"),
        });
        out
    }
}
impl<M: Module + ?Sized> ModuleExt for M {}

/// A layer's adapters while [`ModuleExt::without_adapters`] runs.
enum TakenSlot {
    Linear(crate::adapter::Slot<dyn crate::adapter::LinearAdapter>),
    Conv2d(crate::adapter::Slot<dyn crate::adapter::Conv2dAdapter>),
    Embedding(crate::adapter::Slot<dyn crate::adapter::EmbeddingAdapter>),
}

macro_rules! on_layer {
    ($self:expr, $l:ident => $e:expr) => {
        match $self {
            LayerMut::Linear($l) => $e,
            LayerMut::Conv2d($l) => $e,
            LayerMut::Embedding($l) => $e,
        }
    };
}

/// Slot operations that do not depend on the layer kind, for adapter managers.
impl LayerMut<'_> {
    pub fn kind(&self) -> LayerKind {
        match self {
            LayerMut::Linear(_) => LayerKind::Linear,
            LayerMut::Conv2d(_) => LayerKind::Conv2d,
            LayerMut::Embedding(_) => LayerKind::Embedding,
        }
    }
    pub fn adapter_names(&self) -> Vec<String> {
        on_layer!(self, l => l.adapters.entries.iter().map(|e| e.name.clone()).collect())
    }
    pub fn has_adapter(&self, name: &str) -> bool {
        on_layer!(self, l => l.adapters.get(name).is_some())
    }
    /// The adapter named `name`, for downcasting by its method.
    pub fn adapter(&self, name: &str) -> Option<&dyn crate::Adapter> {
        on_layer!(self, l => l.adapters.get(name).map(|e| &*e.adapter as &dyn crate::Adapter))
    }
    pub fn for_each_state(&mut self, mut f: impl FnMut(&str, &mut crate::adapter::AdapterState)) {
        on_layer!(self, l => for e in &mut l.adapters.entries { f(&e.name, &mut e.state) })
    }
    pub fn set_enabled(&mut self, enabled: bool) {
        on_layer!(self, l => l.adapters.enabled = enabled)
    }
    pub fn set_training(&mut self, training: bool) {
        on_layer!(self, l => for e in &mut l.adapters.entries { e.adapter.set_training(training) })
    }
    pub fn remove_adapter(&mut self, name: &str) -> bool {
        on_layer!(self, l => l.adapters.remove(name).is_some())
    }
    /// Visits the parameters of adapter `name` on this layer (at `path`), if it has one.
    pub fn visit_adapter_mut(&mut self, path: &str, name: &str, v: &mut dyn VisitorMut) {
        on_layer!(self, l => if let Some(e) = l.adapters.get_mut(name) { e.adapter.visit_mut(path, name, v) })
    }
    /// Folds adapter `name` into the layer; false when there is nothing to do, an error naming
    /// the adapter (and the layer unchanged) when it cannot be merged.
    pub fn merge_adapter(&mut self, name: &str) -> crate::Result<bool> {
        on_layer!(self, l => l.merge_adapter(name))
    }
    pub fn unmerge_adapter(&mut self, name: &str) -> bool {
        on_layer!(self, l => l.unmerge_adapter(name))
    }
}
