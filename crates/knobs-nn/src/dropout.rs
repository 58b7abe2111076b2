//! Dropout draws from a stream per thread, on the host. A training step seeds it on each thread
//! that runs a forward pass (`seed_thread`), so a run, a resumed run and the same run on
//! another backend draw the same masks. The backends' own generators cannot give that: burn's
//! CPU backend keeps one generator for the whole process, which the threads of `--devices`
//! would draw from in whatever order they ran, and a GPU backend's masks differ from the CPU's.
use std::cell::RefCell;

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};

thread_local! {
    static STREAM: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Every draw on this thread from now on follows from `seed`.
pub fn seed_thread(seed: u64) {
    STREAM.with(|s| *s.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// Draws from this thread's stream; a thread never seeded draws from fresh entropy.
fn draw<T>(f: impl FnOnce(&mut StdRng) -> T) -> T {
    STREAM.with(|s| f(s.borrow_mut().get_or_insert_with(|| StdRng::from_rng(&mut rand::rng()))))
}

/// This thread's stream as it stands (seeded from entropy first if it never was), so that a
/// recomputed forward pass draws the masks of the first one ([`crate::checkpoint`]).
pub fn stream() -> StdRng {
    draw(|rng| rng.clone())
}

/// Puts `stream` in place of this thread's stream, returning the one it replaces.
pub fn swap_stream(stream: StdRng) -> StdRng {
    STREAM.with(|s| s.borrow_mut().replace(stream)).unwrap_or_else(|| StdRng::from_rng(&mut rand::rng()))
}

/// A tensor of `dims` holding 1 with probability `keep`, else 0.
pub fn keep_mask<const D: usize>(dims: [usize; D], keep: f64, device: &Device) -> Tensor<D> {
    let n = dims.iter().product();
    let values: Vec<f32> = draw(|rng| (0..n).map(|_| if rng.random_bool(keep) { 1.0 } else { 0.0 }).collect());
    Tensor::from_data(TensorData::new(values, dims), device)
}

/// A value uniform in [0, 1).
pub fn uniform() -> f64 {
    draw(|rng| rng.random())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(seed: Option<u64>) -> Vec<f32> {
        if let Some(s) = seed {
            seed_thread(s);
        }
        keep_mask([4, 1000], 0.75, &crate::cpu()).into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn a_seeded_thread_repeats_its_masks_and_keeps_the_asked_share() {
        let a = mask(Some(7));
        assert_eq!(a, mask(Some(7)));
        assert_ne!(a, mask(Some(8)));
        // The stream moves on: the next mask of one seeding differs from its first.
        seed_thread(7);
        let _ = mask(None);
        assert_ne!(a, mask(None));
        assert!(a.iter().all(|&v| v == 0.0 || v == 1.0));
        let kept = a.iter().sum::<f32>() / a.len() as f32;
        assert!((kept - 0.75).abs() < 0.03, "kept {kept}");
        // Another thread's seeding leaves this thread's stream alone.
        seed_thread(7);
        std::thread::spawn(|| seed_thread(99)).join().unwrap();
        assert_eq!(a, mask(None));
    }
}
