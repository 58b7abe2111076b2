//! knobs-nn: layers whose parameters carry PyTorch `state_dict` paths, the visitor that walks
//! them, the adapter slot every adaptable layer carries, safetensors io and optimisers.
//! Nothing here knows about diffusion or about any particular adapter method.
pub mod adapter;
pub mod allocator;
pub mod checkpoint;
#[cfg(feature = "cuda")]
mod cuda_without_llvm;
pub mod device;
pub mod dropout;
pub mod error;
pub mod gradcheck;
pub mod hash;
pub mod init;
pub mod io;
pub mod layers;
pub mod module;
pub mod ops;
pub mod optim;
pub mod param;
pub mod timing;
pub mod toy;

pub use adapter::{Adapter, AdapterState, Conv2dAdapter, EmbeddingAdapter, LinearAdapter, Slot, SlotEntry};
pub use error::{Error, Result};
pub use init::Init;
pub use layers::{Conv2d, Embedding, GroupNorm, LayerNorm, Linear};
pub use module::{LayerKind, LayerMut, LayerRef, Module, ModuleExt, ParamFn, ParamMutFn, Visitor, VisitorMut, join};
pub use param::{ParamMut, ParamRef};

pub use burn;
pub use burn::tensor::{Device, Tensor};

/// The CPU device used by default (burn's pure-Rust `flex` backend).
pub fn cpu() -> Device {
    Device::flex()
}

/// The CPU device with autodiff, for training.
pub fn cpu_autodiff() -> Device {
    Device::flex().autodiff()
}

/// [`cpu_autodiff`] with burn's balanced gradient checkpointing: element-wise results are
/// recomputed in the backward pass instead of kept, matmul and conv outputs are kept.
pub fn cpu_autodiff_checkpointed() -> Device {
    Device::flex().autodiff().gradient_checkpointing()
}

/// Sets how many threads tensor work uses (rayon's global pool, shared by matmul, conv and
/// the fused kernels); `None` means every core. Call it once, before the first tensor op.
/// Returns the thread count in effect.
pub fn set_threads(threads: Option<usize>) -> Result<usize> {
    if threads == Some(0) {
        return Err(Error::Invalid("--threads must be at least 1".into()));
    }
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    builder.build_global().map_err(|e| Error::Invalid(format!("cannot set the thread count: {e}")))?;
    Ok(rayon::current_num_threads())
}

/// Runs `f` on one of the pool's own threads: tensor work started there runs in that thread
/// and the others steal from it, where a call from outside the pool would hand every op to a
/// worker and sleep until it is done (two thread switches per op).
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Joins a scoped thread whose tensor work runs in the pool. A pool thread that waited with a
/// plain `join` would be lost to that work, and with one thread the two would wait on each
/// other forever; this one runs the pool's pending jobs until the thread has finished.
pub fn join_helping<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> std::thread::Result<T> {
    while !handle.is_finished() {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
    handle.join()
}

/// Threads tensor work runs on.
pub fn threads() -> usize {
    rayon::current_num_threads()
}
