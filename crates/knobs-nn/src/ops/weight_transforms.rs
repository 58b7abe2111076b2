//! Winograd transforms of frozen convolution weights, kept between calls. A frozen weight
//! transforms to the same values at every denoising step and every adapter-training step, and
//! at a UNet's small planes the transform costs about as much as the products it saves; kept,
//! it also lets those planes take the Winograd kernel at all (`winograd::applies`).
//!
//! An entry holds a clone of the weight's storage. While it does, the values cannot change
//! (the CPU backend copies shared storage before writing it) and the memory cannot be reused,
//! so the storage's address names the values. An entry whose weight nobody else holds any more
//! is dropped at the next lookup that misses; past the budget, nothing more is kept and a weight's
//! transform is made per call (the kernel stays the one `winograd::applies` chose).
use std::sync::{Arc, Mutex};

use burn::backend::flex::FlexTensor;

use super::winograd::{self, WeightTransform};

/// Transforms kept at most, in bytes (the built-in model's UNet and VAE need about 20 MiB).
const BUDGET_BYTES: usize = 64 << 20;

struct Entry {
    /// The weight's storage, held so that it stays as it is.
    weight: FlexTensor,
    key: Key,
    transform: Arc<WeightTransform>,
}

/// Address and length of the storage, the weight's `[c_out, c_in]`, and which transform.
type Key = (usize, usize, [usize; 2], bool);

static KEPT: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// `winograd::transform` of the frozen weight `w` `[c_out, c_in, 3, 3]` (contiguous f32):
/// the kept one, or one made now and kept; `None` when the budget is spent.
pub(super) fn of_frozen(w: &FlexTensor, c_out: usize, c_in: usize, flipped: bool) -> Option<Arc<WeightTransform>> {
    let values = w.as_slice::<f32>().expect("a contiguous f32 weight (checked before the kernel)");
    let key = (values.as_ptr() as usize, values.len(), [c_out, c_in], flipped);
    let bytes = winograd::transform_bytes(c_out, c_in);
    // The kept one, or whether one more fits once the entries of weights gone are dropped.
    let room = |kept: &mut Vec<Entry>| match kept.iter().find(|e| e.key == key) {
        Some(e) => Err(Some(e.transform.clone())),
        None => {
            kept.retain(|e| !e.weight.is_unique());
            let used: usize = kept.iter().map(|e| e.transform.bytes()).sum();
            if used + bytes <= BUDGET_BYTES { Ok(()) } else { Err(None) }
        }
    };
    if let Err(found) = room(&mut kept()) {
        return found;
    }
    // Made outside the lock: the transform runs on rayon's threads, which may meanwhile take
    // another convolution that looks here.
    let transform = Arc::new(winograd::transform(values, c_out, c_in, flipped));
    let mut kept = kept();
    if let Err(found) = room(&mut kept) {
        return found;
    }
    kept.push(Entry { weight: w.clone(), key, transform: transform.clone() });
    Some(transform)
}

/// Whether a transform of `w`'s storage is kept.
#[cfg(test)]
pub(super) fn holds(w: &FlexTensor) -> bool {
    let values = w.as_slice::<f32>().expect("a contiguous f32 weight");
    kept().iter().any(|e| e.key.0 == values.as_ptr() as usize)
}

fn kept() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    // A panic elsewhere while the lock was held leaves whole entries only.
    KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// Entries of weights that are gone never block new ones: with the budget filled by them
    /// several times over, a new weight's transform is still kept.
    #[test]
    fn weights_gone_make_room() {
        let weight = |seed: usize| {
            let values: Vec<f32> = (0..256 * 256 * 9).map(|i| ((i * 7 + seed) % 13) as f32).collect();
            FlexTensor::from_data(TensorData::new(values, [256, 256, 3, 3]))
        };
        assert!(winograd::transform_bytes(256, 256) * 40 > 2 * BUDGET_BYTES);
        for seed in 0..40 {
            let w = weight(seed);
            assert!(of_frozen(&w, 256, 256, false).is_some(), "weight {seed}");
        }
        let w = weight(99);
        assert!(of_frozen(&w, 256, 256, false).is_some() && holds(&w));
    }
}
