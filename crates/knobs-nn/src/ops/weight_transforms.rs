//! What frozen weights are turned into for a kernel, kept between calls: Winograd transforms
//! of convolution weights, and weights packed in bf16 for the bf16 products. A frozen weight
//! turns into the same values at every denoising step and every adapter-training step. At a
//! UNet's small planes the Winograd transform costs about as much as the products it saves;
//! kept, it also lets those planes take the Winograd kernel at all (`winograd::applies`).
//! Packings are kept only where nothing is differentiated (generation): there, packing
//! SD-1.5's UNet weights per call read 3.4 GB a denoising step, and kept AMX taps let its
//! 16x16 and 8x8 planes take AMX's convolution (a `[2, 1280, 8, 8]` one in 3.7 ms against
//! Winograd's 6.8 with its transform made per call).
//!
//! An entry holds a clone of the weight's storage. While it does, the values cannot change
//! (the CPU backend copies shared storage before writing it) and the memory cannot be reused,
//! so the storage's address names the values. An entry whose weight nobody else holds any more
//! is dropped at the next lookup that misses; past the store's budget, nothing more is kept
//! and a weight's transform or packing is made per call (by the kernel a plane takes without
//! a kept one).
use std::sync::{Arc, Mutex, MutexGuard};

use burn::backend::flex::FlexTensor;

use super::bf16_product::Packed;
use super::winograd::{self, WeightTransform};

/// Winograd transforms kept at most, in bytes (the built-in model's UNet and VAE need about
/// 20 MiB).
const TRANSFORM_BUDGET: usize = 64 << 20;
/// bf16 packings kept at most: those of SD-1.5's UNet and VAE (0.7 GB, most of it the linear
/// layers'; its large 3x3 kernels are laid out by tap instead, see `kernel_layout`); SDXL's
/// UNet keeps part of its own.
const PACKED_BUDGET: usize = 2 << 30;

static TRANSFORMS: Kept<WeightTransform> = Kept::new(TRANSFORM_BUDGET);
static PACKED: Kept<Vec<Packed>> = Kept::new(PACKED_BUDGET);

/// `winograd::transform` of the frozen weight `w` `[c_out, c_in, 3, 3]` (contiguous f32):
/// the kept one, or one made now and kept; `None` when the budget is spent.
pub(super) fn of_frozen(w: &FlexTensor, c_out: usize, c_in: usize, flipped: bool) -> Option<Arc<WeightTransform>> {
    let values = w.as_slice::<f32>().expect("a contiguous f32 weight (checked before the kernel)");
    TRANSFORMS.get(w, [c_out, c_in, usize::from(flipped)], winograd::transform_bytes(c_out, c_in), || winograd::transform(values, c_out, c_in, flipped))
}

/// The frozen weight `w` (contiguous, in any precision) packed by `pack` for AMX's products,
/// `what` telling its packings apart: the kept packing, or one made now and kept; `None` when
/// the weight is not contiguous or the budget is spent.
pub(super) fn packed(w: &FlexTensor, what: [usize; 3], bytes: usize, pack: impl FnOnce() -> Vec<Packed>) -> Option<Arc<Vec<Packed>>> {
    w.is_contiguous().then(|| PACKED.get(w, what, bytes, pack)).flatten()
}

/// What a kept value costs in memory.
trait Bytes {
    fn bytes(&self) -> usize;
}

impl Bytes for WeightTransform {
    fn bytes(&self) -> usize {
        WeightTransform::bytes(self)
    }
}

impl Bytes for Vec<Packed> {
    fn bytes(&self) -> usize {
        self.iter().map(Packed::bytes).sum()
    }
}

/// Address and length of the storage, its dtype, and what was made of it.
type Key = (usize, usize, burn::tensor::DType, [usize; 3]);

struct Entry<T> {
    /// The weight's storage, held so that it stays as it is.
    weight: FlexTensor,
    key: Key,
    value: Arc<T>,
}

/// One kind of kept value, within a budget of bytes.
struct Kept<T> {
    entries: Mutex<Vec<Entry<T>>>,
    budget: usize,
}

impl<T: Bytes> Kept<T> {
    const fn new(budget: usize) -> Self {
        Kept { entries: Mutex::new(Vec::new()), budget }
    }

    /// The value kept for `w`'s storage and `what`, or `make`'s (of `bytes`), kept while the
    /// budget lasts; `None` when it is spent.
    fn get(&self, w: &FlexTensor, what: [usize; 3], bytes: usize, make: impl FnOnce() -> T) -> Option<Arc<T>> {
        let storage = w.bytes();
        let key = (storage.as_ptr() as usize, storage.len(), w.dtype(), what);
        // The kept one, or whether one more fits once the entries of weights gone are dropped.
        let room = |kept: &mut Vec<Entry<T>>| match kept.iter().find(|e| e.key == key) {
            Some(e) => Err(Some(e.value.clone())),
            None => {
                Self::drop_unused(kept);
                let used: usize = kept.iter().map(|e| e.value.bytes()).sum();
                if used + bytes <= self.budget { Ok(()) } else { Err(None) }
            }
        };
        if let Err(found) = room(&mut self.lock()) {
            return found;
        }
        // Made outside the lock: the transform runs on rayon's threads, which may meanwhile take
        // another kernel that looks here.
        let value = Arc::new(make());
        let mut kept = self.lock();
        if let Err(found) = room(&mut kept) {
            return found;
        }
        kept.push(Entry { weight: w.clone(), key, value: value.clone() });
        Some(value)
    }

    /// Whether a value made from `w`'s storage is kept.
    #[cfg(test)]
    fn holds(&self, w: &FlexTensor) -> bool {
        self.lock().iter().any(|e| e.key.0 == w.bytes().as_ptr() as usize)
    }

    /// Drops the entries of weights nobody else holds any more.
    fn release_unused(&self) {
        Self::drop_unused(&mut self.lock());
    }

    fn drop_unused(kept: &mut Vec<Entry<T>>) {
        kept.retain(|e| !e.weight.is_unique());
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry<T>>> {
        // A panic elsewhere while the lock was held leaves whole entries only.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Drops what is kept for weights nobody else holds any more, with those weights: a dropped
/// pipeline's, which a lookup that misses would otherwise drop only once it comes (the next
/// pipeline's first call, after its load). Call before loading a model.
pub fn release_unused() {
    TRANSFORMS.release_unused();
    PACKED.release_unused();
}

/// Whether a Winograd transform of `w`'s storage is kept.
#[cfg(test)]
pub(super) fn holds(w: &FlexTensor) -> bool {
    TRANSFORMS.holds(w)
}

/// Whether a bf16 packing of `w`'s storage is kept.
#[cfg(test)]
pub(super) fn holds_packed(w: &FlexTensor) -> bool {
    PACKED.holds(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// A weight dropped by its owner is dropped from the store by `release_unused`, its
    /// memory with it. A store of its own: the shared ones' lookups that miss, in other
    /// tests, drop such entries too.
    #[test]
    fn release_unused_drops_the_weights_gone() {
        let store: Kept<WeightTransform> = Kept::new(TRANSFORM_BUDGET);
        let w = FlexTensor::from_data(TensorData::new((0..64 * 64 * 9).map(|i| (i % 11) as f32).collect::<Vec<f32>>(), [64, 64, 3, 3]));
        let at = w.bytes().as_ptr() as usize;
        let values = w.as_slice::<f32>().unwrap().to_vec();
        assert!(store.get(&w, [64, 64, 0], winograd::transform_bytes(64, 64), || winograd::transform(&values, 64, 64, false)).is_some() && store.holds(&w));
        store.release_unused();
        assert!(store.holds(&w), "a weight still held keeps its transform");
        drop(w);
        let kept = || store.lock().iter().any(|e| e.key.0 == at);
        assert!(kept(), "kept until released");
        store.release_unused();
        assert!(!kept(), "released");
    }

    /// Entries of weights that are gone never block new ones: with the budget filled by them
    /// several times over, a new weight's transform is still kept.
    #[test]
    fn weights_gone_make_room() {
        let weight = |seed: usize| {
            let values: Vec<f32> = (0..256 * 256 * 9).map(|i| ((i * 7 + seed) % 13) as f32).collect();
            FlexTensor::from_data(TensorData::new(values, [256, 256, 3, 3]))
        };
        assert!(winograd::transform_bytes(256, 256) * 40 > 2 * TRANSFORM_BUDGET);
        for seed in 0..40 {
            let w = weight(seed);
            assert!(of_frozen(&w, 256, 256, false).is_some(), "weight {seed}");
        }
        let w = weight(99);
        assert!(of_frozen(&w, 256, 256, false).is_some() && holds(&w));
    }
}
