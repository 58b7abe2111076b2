//! Output vectors that a kernel writes in full, handed to it without being zeroed first: the
//! allocator keeps freed memory (`crate::allocator`), so `vec![0.0; n]` would clear recycled
//! memory in full just before the kernel overwrote it.
use std::mem::MaybeUninit;

/// A vector of `n` values, each written by `fill`.
///
/// SAFETY: `fill` writes every one of the `n` values it is given.
pub(crate) unsafe fn written<T>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    fill(&mut out.spare_capacity_mut()[..n]);
    // SAFETY: the caller vouches that `fill` wrote all n values.
    unsafe { out.set_len(n) };
    out
}
