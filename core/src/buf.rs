//! Aligned buffers for direct I/O.

use std::fmt;
use std::ops::{Deref, DerefMut};

/// The alignment [`AlignedBuf::new`] uses: a page, which satisfies every O_DIRECT rule.
pub const DEFAULT_ALIGNMENT: usize = 4096;

/// A zero-initialised byte buffer whose start address is a multiple of a power-of-two alignment,
/// as O_DIRECT needs. Written without `unsafe`: it over-allocates by the alignment and exposes the
/// aligned window.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
    align: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to a page.
    pub fn new(len: usize) -> Self {
        Self::with_alignment(len, DEFAULT_ALIGNMENT)
    }

    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two; 0 or 1 mean none).
    ///
    /// # Panics
    /// If `align` is not a power of two.
    pub fn with_alignment(len: usize, align: usize) -> Self {
        let align = align.max(1);
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        let storage = vec![0u8; len + align - 1];
        let start = storage.as_ptr().align_offset(align);
        debug_assert!(start < align);
        AlignedBuf {
            storage,
            start,
            len,
            align,
        }
    }

    /// The alignment of the buffer's start address.
    pub fn alignment(&self) -> usize {
        self.align
    }

    /// The buffer as a slice.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The buffer as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        // A cloned Vec may land at a different offset from the alignment: re-align.
        let mut b = AlignedBuf::with_alignment(self.len, self.align);
        b.copy_from_slice(self);
        b
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

/// Whether `addr` is a multiple of `align` (a power of two).
pub fn is_aligned(addr: usize, align: usize) -> bool {
    align <= 1 || addr & (align - 1) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for align in [1, 512, 4096, 65536] {
            for len in [0, 1, 511, 4096, 10000] {
                let mut b = AlignedBuf::with_alignment(len, align);
                assert_eq!(b.len(), len);
                assert!(is_aligned(b.as_ptr() as usize, align));
                assert!(b.iter().all(|&x| x == 0));
                b.fill(0xab);
                assert!(b.iter().all(|&x| x == 0xab));
            }
        }
    }

    #[test]
    fn clone_keeps_contents() {
        let mut a = AlignedBuf::new(100);
        a[5] = 7;
        let b = a.clone();
        assert_eq!(b[5], 7);
        assert_eq!(b.len(), 100);
    }
}
