//! Timing for the bench binaries.
use std::time::Instant;

/// The median of `iters` timed calls of `f`, in milliseconds, after one untimed warm-up call.
pub fn median_ms(mut f: impl FnMut(), iters: usize) -> f64 {
    f();
    let mut t: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}
