//! Buffers of 32-bit words that start on a 64-byte cache line, for packed bf16 operands. An
//! AMX tile load reads 16 rows of 64 bytes; a row that straddles two lines is read as two.
//! The allocator aligns a `Vec<u32>` to 16 bytes, so every row of a packed operand did:
//! on an Emerald Rapids Xeon, one core's product kernel with both operands in L1 ran at 1.07
//! TFLOP/s with them 16-byte aligned, 1.6-1.8 with one of them on the line and 2.1-2.4 with
//! both (4.1 is the tile unit's own rate, products without loads).
use std::fmt;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};

/// Words per cache line.
const LINE_WORDS: usize = 16;

/// bf16 `values` as words, each a pair of neighbours (the first in the low half), where their
/// start suits a word and their count is even: the operand kernels read weights so.
pub(super) fn pairs(values: &[half::bf16]) -> Option<&[u32]> {
    let aligned = (values.as_ptr() as usize).is_multiple_of(align_of::<u32>());
    // SAFETY: plain values, read as words from a start that suits one, no further than they go.
    (aligned && values.len().is_multiple_of(2)).then(|| unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u32>(), values.len() / 2) })
}

/// A value (an array of sums or words) from the start of a cache line.
#[repr(C, align(64))]
pub(super) struct OnLines<T>(pub T);

/// `len` words from the start of a cache line: a vector of `u32` a line longer, read from its
/// first word on a line. Asking the allocator for 64-byte alignment instead took glibc's
/// `posix_memalign`, whose blocks came back as fresh pages on every call: packing a left
/// operand of `[8192, 320]` took 4x as long.
pub(super) struct Words {
    buf: Vec<MaybeUninit<u32>>,
    start: usize,
    len: usize,
}

impl Words {
    /// `len` words, none of them written yet.
    ///
    /// SAFETY: every word is written (through [`Words::uninit_mut`]) before the buffer is read
    /// as words.
    pub(super) unsafe fn uninit(len: usize) -> Words {
        let mut buf = Vec::with_capacity(len + LINE_WORDS - 1);
        // SAFETY: MaybeUninit words need no initialisation.
        unsafe { buf.set_len(buf.capacity()) };
        let start = (buf.as_ptr() as usize).next_multiple_of(64) - buf.as_ptr() as usize;
        debug_assert!(start.is_multiple_of(size_of::<u32>()) && start / size_of::<u32>() < LINE_WORDS);
        Words { buf, start: start / size_of::<u32>(), len }
    }

    /// `len` zeros.
    pub(super) fn zeroed(len: usize) -> Words {
        // SAFETY: every word is written just after.
        let mut words = unsafe { Words::uninit(len) };
        words.uninit_mut().fill(MaybeUninit::new(0));
        words
    }

    /// `len` words, each written by `fill`.
    ///
    /// SAFETY: `fill` writes every one of the `len` words it is given.
    pub(super) unsafe fn written(len: usize, fill: impl FnOnce(&mut [MaybeUninit<u32>])) -> Words {
        // SAFETY: the caller vouches that `fill` writes every word.
        let mut words = unsafe { Words::uninit(len) };
        fill(words.uninit_mut());
        words
    }

    /// The words, written or not.
    pub(super) fn uninit_mut(&mut self) -> &mut [MaybeUninit<u32>] {
        &mut self.buf[self.start..][..self.len]
    }
}

impl Deref for Words {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        let words = &self.buf[self.start..][..self.len];
        // SAFETY: every word was written (the constructors' contracts); u32 has
        // MaybeUninit<u32>'s layout.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len()) }
    }
}

impl DerefMut for Words {
    fn deref_mut(&mut self) -> &mut [u32] {
        let words = self.uninit_mut();
        // SAFETY: as `deref`.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len()) }
    }
}

impl fmt::Debug for Words {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Words({} on cache lines)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_start_on_a_line_and_hold_what_was_written() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let zeros = Words::zeroed(len);
            assert_eq!((zeros.as_ptr() as usize % 64, zeros.len()), (0, len));
            assert!(zeros.iter().all(|&w| w == 0));
            // SAFETY: every word is written.
            let counted = unsafe {
                Words::written(len, |out| {
                    for (i, w) in out.iter_mut().enumerate() {
                        w.write(i as u32);
                    }
                })
            };
            assert_eq!(counted.as_ptr() as usize % 64, 0);
            assert!(counted.iter().enumerate().all(|(i, &w)| w == i as u32));
        }
    }
}
