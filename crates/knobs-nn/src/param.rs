//! A borrowed view of one parameter, whatever its rank, so that visitors (optimizers,
//! loaders, savers, freezers) handle every tensor of a model through one interface.
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DispatchKindConversion, DispatchTensor};
use burn::tensor::{DType, GradientCheckpointingStrategy, Gradients, Tensor, TensorData};

use crate::ops::precision::data_as;
use crate::{Error, Result};

pub enum ParamRef<'a> {
    D1(&'a Tensor<1>),
    D2(&'a Tensor<2>),
    D4(&'a Tensor<4>),
}

pub enum ParamMut<'a> {
    D1(&'a mut Tensor<1>),
    D2(&'a mut Tensor<2>),
    D4(&'a mut Tensor<4>),
}

impl<'a> From<&'a mut Tensor<1>> for ParamMut<'a> {
    fn from(t: &'a mut Tensor<1>) -> Self {
        Self::D1(t)
    }
}
impl<'a> From<&'a mut Tensor<2>> for ParamMut<'a> {
    fn from(t: &'a mut Tensor<2>) -> Self {
        Self::D2(t)
    }
}
impl<'a> From<&'a mut Tensor<4>> for ParamMut<'a> {
    fn from(t: &'a mut Tensor<4>) -> Self {
        Self::D4(t)
    }
}

macro_rules! each {
    ($self:expr, $t:ident => $body:expr) => {
        match $self {
            Self::D1($t) => $body,
            Self::D2($t) => $body,
            Self::D4($t) => $body,
        }
    };
}

impl ParamRef<'_> {
    pub fn dims(&self) -> Vec<usize> {
        each!(self, t => t.dims().to_vec())
    }
    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }
    /// Bytes its values take as stored (half-precision frozen weights take half).
    pub fn bytes(&self) -> usize {
        self.numel() * each!(self, t => t.dtype().size())
    }
    pub fn to_data(&self) -> TensorData {
        each!(self, t => t.to_data())
    }
    pub fn is_trainable(&self) -> bool {
        each!(self, t => t.is_require_grad())
    }
    /// The gradient flattened to one dimension; `None` for a frozen parameter or one the
    /// loss did not reach.
    pub fn grad(&self, grads: &Gradients) -> Option<Tensor<1>> {
        let n = self.numel();
        each!(self, t => t.grad(grads).map(|g| g.reshape([n])))
    }
    /// The value flattened to one dimension, outside the autodiff graph.
    pub fn flat(&self) -> Tensor<1> {
        let n = self.numel();
        each!(self, t => (*t).clone().inner().reshape([n]))
    }
    /// Whether the autodiff graph tracks it: a trainable leaf, or a value computed from one
    /// (a generated adapter weight).
    pub fn is_tracked(&self) -> bool {
        each!(self, t => t.is_tracked())
    }
    pub fn gradient_checkpointing_strategy(&self) -> Option<GradientCheckpointingStrategy> {
        each!(self, t => t.gradient_checkpointing_strategy())
    }
    /// The value as backend `B`'s primitive, for an op recorded by hand; `None` when it is
    /// not on `B`.
    pub fn primitive<B: Backend>(&self) -> Option<FloatTensor<B>>
    where
        DispatchTensor: DispatchKindConversion<B>,
    {
        each!(self, t => (*t).clone().try_into_primitive::<B>().ok())
    }
    /// The gradient in its own shape as backend `B`'s primitive; `None` where [`Self::grad`]
    /// has none or it is not on `B`.
    pub fn grad_primitive<B: Backend>(&self, grads: &Gradients) -> Option<FloatTensor<B>>
    where
        DispatchTensor: DispatchKindConversion<B>,
    {
        each!(self, t => t.grad(grads).and_then(|g| g.try_into_primitive::<B>().ok()))
    }
}

impl ParamMut<'_> {
    pub fn as_ref(&self) -> ParamRef<'_> {
        match self {
            Self::D1(t) => ParamRef::D1(t),
            Self::D2(t) => ParamRef::D2(t),
            Self::D4(t) => ParamRef::D4(t),
        }
    }

    /// Marks the parameter trainable (an autodiff leaf that keeps its gradient) or frozen. A
    /// frozen parameter keeps its autodiff association but records no gradient: burn then
    /// skips its weight-gradient compute. (Dropping the association instead was measured
    /// slower: mixing autodiff activations with plain weights converts on every op.)
    pub fn set_trainable(&mut self, trainable: bool) {
        each!(self, t => {
            let value = (*t).clone().detach();
            **t = if trainable {
                // Trained values are f32 whatever precision they were stored in.
                let strategy = value.gradient_checkpointing_strategy();
                autodiff_with(f32_value(&value).inner(), strategy).autodiff().require_grad()
            } else {
                value.set_require_grad(false)
            };
        })
    }

    /// Keeps a frozen matrix or kernel in `dtype` (f16 / bf16): half the memory; layers compute
    /// with its f32 value, widened where it is used ([`crate::ops::linear`] and
    /// [`crate::ops::conv2d_frozen_copy`] keep the narrow tensor, not an f32 copy, for the
    /// backward pass). Vectors (biases, norms) and trainable parameters stay f32.
    pub fn store_frozen_as(&mut self, dtype: DType) {
        if !self.stores_narrow() {
            return;
        }
        each!(self, t => if t.dtype() != dtype {
            **t = crate::ops::precision::cast(t, dtype)
        });
        self.lay_out_kernel();
    }

    /// A frozen bf16 3x3 kernel laid out by tap where AMX's convolution reads it so
    /// (`ops::kernel_layout`): no packed copy of it is made or kept.
    fn lay_out_kernel(&mut self) {
        if let Self::D4(t) = self
            && let Some(laid) = crate::ops::kernel_layout::by_tap(t)
        {
            **t = laid;
        }
    }

    /// The dtype [`Self::assign_as`] stores this parameter in under `dtype` when narrower
    /// than f32 (a frozen matrix or kernel); `None` when it stays f32.
    pub fn narrow_storage(&self, dtype: Option<DType>) -> Option<DType> {
        dtype.filter(|d| *d != DType::F32 && self.stores_narrow())
    }

    /// Whether a narrower storage dtype applies to this parameter: a frozen matrix or kernel
    /// (the one rule of [`Self::store_frozen_as`] and [`Self::assign_as`]).
    fn stores_narrow(&self) -> bool {
        !self.as_ref().is_trainable() && self.as_ref().dims().len() >= 2
    }

    /// Replaces the value with an empty tensor of the same rank, freeing its storage once
    /// nothing else holds it (a component whose weights are no longer needed).
    pub fn release(&mut self) {
        each!(self, t => **t = Tensor::zeros(t.dims().map(|_| 0), &t.device()))
    }

    /// Takes the parameter out of autodiff altogether, for inference.
    pub fn set_inference(&mut self) {
        each!(self, t => **t = (*t).clone().inner())
    }

    /// Puts the value on autodiff under `strategy`: a fresh leaf that keeps its gradient when
    /// `leaf`, else untracked. The dtype stays (unlike [`Self::set_trainable`]).
    pub fn lift(&mut self, strategy: Option<GradientCheckpointingStrategy>, leaf: bool) {
        each!(self, t => **t = lift((*t).clone(), strategy, leaf))
    }

    /// Replaces the value with `data`, which must have the same shape. Trainability is kept.
    pub fn assign(&mut self, key: &str, data: TensorData) -> Result<()> {
        self.assign_as(key, data, DType::F32)
    }

    /// [`Self::assign`], a frozen matrix or kernel stored in `dtype` as
    /// [`Self::store_frozen_as`] would store it, made straight from `data`: a model loaded in
    /// half precision never holds its f32 copy (the load's memory peak was that copy).
    pub fn assign_as(&mut self, key: &str, data: TensorData, dtype: DType) -> Result<()> {
        let want = self.as_ref().dims();
        if data.shape().as_slice() != want.as_slice() {
            return Err(Error::param(
                key,
                format!("shape {:?} does not match the model's {:?}", data.shape().as_slice(), want),
            ));
        }
        if dtype != DType::F32 && self.stores_narrow() {
            let (data, device) = (data_as(data, dtype), self.device());
            // A kernel laid out by tap is made straight from the data, in place.
            let data = match self {
                Self::D4(t) => match crate::ops::kernel_layout::from_data(data, &device) {
                    Ok(laid) => {
                        **t = like(t, laid);
                        return Ok(());
                    }
                    Err(data) => data,
                },
                _ => data,
            };
            each!(self, t => **t = like(t, Tensor::from_data(data, (&device, dtype))));
            return Ok(());
        }
        let n = self.as_ref().numel();
        let values: Vec<f32> =
            data_as(data, DType::F32).try_into_vec().map_err(|e| Error::param(key, format!("{e:?}")))?;
        self.replace_flat(Tensor::from_data(TensorData::new(values, [n]), &self.device()));
        Ok(())
    }

    /// Replaces the value with a flat tensor of the same number of elements, as an optimizer
    /// does after a step. The new value is a fresh leaf with the old trainability.
    pub fn replace_flat(&mut self, flat: Tensor<1>) {
        each!(self, t => **t = like(t, flat.reshape(t.dims())))
    }

    pub fn device(&self) -> burn::tensor::Device {
        each!(self, t => t.device())
    }
}

/// `t` as f32: itself when it is, else its f32 conversion (weights stored in half precision
/// are widened where a layer uses them). burn's matmul and convolution keep the widened copy
/// for the backward pass, even with checkpointing; linear layers therefore go through
/// [`crate::ops::linear`].
pub fn f32_value<const D: usize>(t: &Tensor<D>) -> Tensor<D> {
    value_as(t, DType::F32)
}

/// `t`'s dtype when it is a half-precision one (f16, bf16): mixed precision's activations,
/// which the ops compute in f32 on the widened values wherever that is the better choice,
/// rounding the result once (as PyTorch's kernels compute in f32 for half inputs).
pub fn half_dtype<const D: usize>(t: &Tensor<D>) -> Option<DType> {
    matches!(t.dtype(), DType::F16 | DType::BF16).then(|| t.dtype())
}

/// [`half_dtype`], for `t` on the CPU backend only, whose layers then compute in f32.
pub fn half_on_cpu<const D: usize>(t: &Tensor<D>) -> Option<DType> {
    half_dtype(t).filter(|_| crate::ops::on_cpu(t))
}

/// `t` in `dtype`: itself when it is, else its conversion ([`crate::ops::precision::cast`]).
/// Under mixed precision a layer computes in its input's dtype and casts its (f32 master)
/// weights to it; the cast's backward hands f32 gradients to the master weights.
pub fn value_as<const D: usize>(t: &Tensor<D>, dtype: DType) -> Tensor<D> {
    crate::ops::precision::cast(t, dtype)
}

/// [`like`], stored as `old` is: a frozen weight kept in half precision (and a kernel laid out
/// by tap) stays so when a merge rewrites it. Merges compute in f32; keeping the result would
/// double the layer's memory and drop it from the narrow weights' kernels.
pub fn like_stored<const D: usize>(old: &Tensor<D>, value: Tensor<D>) -> Tensor<D>
where
    for<'a> ParamMut<'a>: From<&'a mut Tensor<D>>,
{
    let mut new = like(old, value);
    if old.dtype() != DType::F32 {
        ParamMut::from(&mut new).store_frozen_as(old.dtype());
    }
    new
}

/// `value` as a fresh leaf with `old`'s autodiff association (and its checkpointing
/// strategy: burn refuses to mix strategies in one operation) and trainability, so that a
/// weight rewritten by merging or an optimizer step keeps its role in training.
pub fn like<const D: usize>(old: &Tensor<D>, value: Tensor<D>) -> Tensor<D> {
    let v = autodiff_with(value.inner(), old.gradient_checkpointing_strategy());
    if old.is_require_grad() { v.require_grad() } else { v }
}

/// `t` on autodiff with `strategy` (another tensor's `gradient_checkpointing_strategy()`), or
/// as it is when that is `None`: burn refuses to mix strategies in one operation.
pub fn autodiff_with<const D: usize>(t: Tensor<D>, strategy: Option<GradientCheckpointingStrategy>) -> Tensor<D> {
    match strategy {
        Some(s) => t.autodiff().with_gradient_checkpointing_strategy(s),
        None => t,
    }
}

/// `t` on autodiff under `strategy`, a fresh leaf that keeps its gradient when `leaf`.
pub(crate) fn lift<const D: usize>(t: Tensor<D>, strategy: Option<GradientCheckpointingStrategy>, leaf: bool) -> Tensor<D> {
    let t = autodiff_with(t, strategy);
    if leaf { t.require_grad() } else { t }
}
