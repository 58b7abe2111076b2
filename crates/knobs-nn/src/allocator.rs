//! How the process allocator treats freed memory. A training step frees and allocates
//! the same large tensors over and over; glibc's malloc hands blocks above its threshold
//! (128 KiB, adapted as they are freed) back to the kernel, trims each thread's heap as
//! soon as its top is free, and gets fresh pages again next time: every page of every
//! large tensor faulted in and zeroed once per use. A GroupNorm + SiLU forward and backward
//! at SD-1.5's 64x64 level took 30 ms that way against 10 ms with freed memory kept.
//!
//! Kept memory is reused by the next allocations, so the peak stays what was in use at once.
//!
//! All threads share one heap (`M_ARENA_MAX` 1). A worker thread's own heaps are 64 MiB
//! mappings that glibc unmaps as soon as one is wholly free, whatever the trim threshold, so
//! the pool's threads faulted their blocks below 32 MiB in afresh step after step: an SD-1.5
//! bf16 LoRA step at 512 px took 510 thousand page faults with a heap per thread and 106
//! thousand with one, its peak 6.05 GB instead of 6.8-7.0 (Zen 4, 2 threads; `perf stat -e
//! page-faults`, 3 steps less 1). Two threads contend little for it: the large blocks are few.
//!
//! glibc maps blocks above 32 MiB one by one whatever the setting, and a worker thread's heap
//! takes none above 64 MiB: a VAE's activations at 512 px (128 channels, 134 MB in f32) were
//! faulted in and zeroed on every use. [`LargeBlocks`], the binaries' global allocator, keeps
//! such blocks when they are freed and hands them out again: on a Zen 4, SiLU over
//! `[1, 128, 512, 512]` took 48 ms with fresh pages and 8.5 ms with kept ones. It keeps blocks
//! from 32 MiB (SD-1.5's UNet has some: its feed-forward's `[4096, 2560]` f32 activations and
//! their gradient): an SD-1.5 bf16 LoRA step on a Zen 4 took 10.65 / 10.10 / 10.90 s with them
//! kept against 10.69 / 10.78 / 11.17 s with them glibc's (three interleaved rounds, median of
//! 5 steps each; the backward pass 4.0-4.2 against 4.2-4.3 s). A session before, in another
//! window, the same change had measured 0.3-1 s slower once and no different once.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks up to this size come from the heaps, not their own mapping (glibc's most).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at a heap's top kept for reuse, whatever its size (-1: glibc never trims).
/// With 1 GiB, an SDXL bf16 LoRA step at 1024 px freed more than that at the top between its
/// passes and faulted 1.9 million pages in afresh each step (7.7 GB zeroed by the kernel);
/// untrimmed, 0.37 million, and the step took 24.9 / 25.0 s against 28.0 / 29.8 (its forward
/// 10.5 against 13.2-15.0 s), the peak the same 17.33 GiB; no change at 512 px (SDXL, SD-1.5;
/// Xeon, 2 threads, 2026-12-07, interleaved). The heap's extent is the most it held at once,
/// which the peak counts either way.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = -1;

/// Keeps freed memory in the process for reuse (glibc; elsewhere the allocator's own policy
/// stays), unless the environment sets `KNOBS_RETURN_FREED_MEMORY` (a long-lived process that
/// should shrink between jobs, or an A/B measurement). Call once at start, before the thread
/// pool runs tensor work.
pub fn keep_freed_memory() {
    if std::env::var_os("KNOBS_RETURN_FREED_MEMORY").is_some() {
        return;
    }
    KEEP_LARGE.store(true, Ordering::Relaxed);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc's parameters; it is called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Blocks from this size up are large: glibc maps each one anew, even with the threshold at
/// its highest (32 MiB).
const LARGE: usize = 32 << 20;
/// Freed large blocks kept at most: bytes, and blocks.
const KEPT_BYTES: usize = 1 << 30;
const SLOTS: usize = 32;

/// Whether [`LargeBlocks`] keeps freed blocks (set by [`keep_freed_memory`]).
static KEEP_LARGE: AtomicBool = AtomicBool::new(false);

/// Freed large blocks: (address, size), oldest first.
struct Kept {
    blocks: [(usize, usize); SLOTS],
    len: usize,
    bytes: usize,
}

static KEPT: Mutex<Kept> = Mutex::new(Kept { blocks: [(0, 0); SLOTS], len: 0, bytes: 0 });

fn kept() -> std::sync::MutexGuard<'static, Kept> {
    KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The system allocator, with freed large blocks kept for the next large allocations (after
/// [`keep_freed_memory`]): a block serves a request of its size up to a quarter smaller, and
/// large requests are rounded up to a sixteenth of their power of two so that sizes that
/// differ a little share blocks. At most 1 GiB (32 blocks) is kept, the oldest given back
/// first, and [`release_kept`] gives all back. Declare it as the `#[global_allocator]` of a
/// binary that runs models.
pub struct LargeBlocks;

/// Gives the kept large blocks back to the system. A model whose large activations are not
/// needed by what runs next (a VAE's, before the UNet's step) calls it when it is done, so
/// that they do not add to the step's peak.
pub fn release_kept() {
    let mut kept = kept();
    let len = kept.len;
    for &(ptr, size) in &kept.blocks[..len] {
        // SAFETY: a kept block came from System with this size; the alignment does not matter
        // to glibc's free.
        unsafe { System.dealloc(ptr as *mut u8, Layout::from_size_align_unchecked(size, 64)) };
    }
    kept.len = 0;
    kept.bytes = 0;
}

/// `size` rounded up to its size class.
fn class(size: usize) -> usize {
    let step = (size.next_power_of_two() >> 4).max(4096);
    size.div_ceil(step) * step
}

impl LargeBlocks {
    /// A kept block for `layout` (its class), or none.
    fn take(&self, size: usize, align: usize) -> Option<*mut u8> {
        let mut kept = kept();
        let len = kept.len;
        let fits = |&(ptr, have): &(usize, usize)| have >= size && have - size <= have / 4 && ptr % align == 0;
        // The closest fit.
        let i = (0..len).filter(|&i| fits(&kept.blocks[i])).min_by_key(|&i| kept.blocks[i].1)?;
        let (ptr, have) = kept.blocks[i];
        kept.blocks.copy_within(i + 1..len, i);
        kept.len -= 1;
        kept.bytes -= have;
        Some(ptr as *mut u8)
    }

    /// Keeps `ptr` (a block of `size`), giving back the oldest blocks to make room.
    fn keep(&self, ptr: *mut u8, size: usize, align: usize) {
        let mut kept = kept();
        while kept.len > 0 && (kept.len == SLOTS || kept.bytes + size > KEPT_BYTES) {
            let (old, have) = kept.blocks[0];
            let len = kept.len;
            kept.blocks.copy_within(1..len, 0);
            kept.len -= 1;
            kept.bytes -= have;
            // SAFETY: a kept block came from System with this size; the alignment does not
            // matter to glibc's free.
            unsafe { System.dealloc(old as *mut u8, Layout::from_size_align_unchecked(have, align)) };
        }
        if size > KEPT_BYTES {
            // SAFETY: the block came from System with this size and alignment.
            return unsafe { System.dealloc(ptr, Layout::from_size_align_unchecked(size, align)) };
        }
        let len = kept.len;
        kept.blocks[len] = (ptr as usize, size);
        kept.len += 1;
        kept.bytes += size;
    }
}

// SAFETY: large blocks are System's own, handed out whole to one owner at a time (taken from
// the list under its lock); everything else is System's.
unsafe impl GlobalAlloc for LargeBlocks {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE || !KEEP_LARGE.load(Ordering::Relaxed) {
            return unsafe { System.alloc(layout) };
        }
        let size = class(layout.size());
        match self.take(size, layout.align()) {
            Some(ptr) => ptr,
            // SAFETY: a non-zero size, the alignment as asked.
            None => unsafe { System.alloc(Layout::from_size_align_unchecked(size, layout.align())) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE || !KEEP_LARGE.load(Ordering::Relaxed) {
            return unsafe { System.alloc_zeroed(layout) };
        }
        let size = class(layout.size());
        match self.take(size, layout.align()) {
            Some(ptr) => {
                // SAFETY: the block holds at least `layout.size()` bytes.
                unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
                ptr
            }
            // SAFETY: as in `alloc`; fresh pages come zeroed.
            None => unsafe { System.alloc_zeroed(Layout::from_size_align_unchecked(size, layout.align())) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // A large block was allocated at its class's size (and kept ones are at least that).
        if layout.size() < LARGE {
            return unsafe { System.dealloc(ptr, layout) };
        }
        let size = class(layout.size());
        if KEEP_LARGE.load(Ordering::Relaxed) {
            self.keep(ptr, size, layout.align());
        } else {
            // SAFETY: System's block, of at least this size.
            unsafe { System.dealloc(ptr, Layout::from_size_align_unchecked(size, layout.align())) };
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < LARGE && new_size < LARGE {
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller vouches for a valid layout of `new_size`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks hold at least the smaller size, and do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A freed large block serves the next request of its class (zeroed when asked), a request
    /// a quarter smaller or more gets a new one, and nothing is kept before
    /// `keep_freed_memory` or past the byte budget. One test: the list is the process's.
    #[test]
    fn freed_large_blocks_are_handed_out_again() {
        let a = LargeBlocks;
        let layout = |size: usize| Layout::from_size_align(size, 64).unwrap();
        unsafe {
            // Before keep_freed_memory: the block goes back to the system.
            let p = a.alloc(layout(LARGE));
            a.dealloc(p, layout(LARGE));
            assert_eq!(kept().len, 0);
            KEEP_LARGE.store(true, Ordering::Relaxed);
            let size = LARGE * 3 / 2;
            let p = a.alloc(layout(size));
            p.write_bytes(7, size);
            a.dealloc(p, layout(size));
            let state = || {
                let k = kept();
                (k.len, k.bytes)
            };
            assert_eq!(state(), (1, class(size)));
            // A slightly smaller request of the same class: the same block, zeroed if asked.
            let q = a.alloc_zeroed(layout(size - 100));
            assert_eq!(q, p);
            assert!(std::slice::from_raw_parts(q, size - 100).iter().all(|b| *b == 0));
            assert_eq!(kept().len, 0);
            a.dealloc(q, layout(size - 100));
            // Much smaller (still large): a block of its own.
            let r = a.alloc(layout(LARGE));
            assert_ne!(r, p);
            assert_eq!(kept().len, 1);
            a.dealloc(r, layout(LARGE));
            assert_eq!(kept().len, 2);
            // Growing a large block keeps its contents.
            let s = a.alloc(layout(LARGE));
            s.write_bytes(3, LARGE);
            let t = a.realloc(s, layout(LARGE), 2 * LARGE);
            assert!(std::slice::from_raw_parts(t, LARGE).iter().all(|b| *b == 3));
            a.dealloc(t, layout(2 * LARGE));
            // The budget: blocks beyond it push the oldest out.
            let big: Vec<*mut u8> = (0..5).map(|_| a.alloc(layout(300 << 20))).collect();
            for p in big {
                a.dealloc(p, layout(300 << 20));
            }
            let k = kept();
            assert!(k.bytes <= KEPT_BYTES && k.len <= SLOTS);
            assert_eq!(k.blocks[..k.len].iter().filter(|b| b.1 == class(300 << 20)).count(), 3);
            drop(k);
            release_kept();
            assert_eq!(state(), (0, 0));
            KEEP_LARGE.store(false, Ordering::Relaxed);
        }
    }
}
