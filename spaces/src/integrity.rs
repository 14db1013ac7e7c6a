//! Integrity counters: what the block checksums caught since the pool was opened (reads,
//! scrubs, rebuilds), and the windows a read-only pool healed in memory.

use crate::csum;
use crate::format::Slot;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// What the block checksums caught since the pool was opened (reads, scrubs and rebuilds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntegrityStats {
    /// 512-byte blocks of a member whose data did not match their checksum.
    pub checksum_errors: u64,
    /// Of those, blocks rewritten from a good copy or rebuilt from parity (self-heal).
    pub healed: u64,
    /// Of those, blocks with no good source left (a read of them fails).
    pub unrecoverable: u64,
}

/// A 4 KiB window of a slab: (member, slab, offset of the window in the slab).
pub(crate) type Window = (usize, u32, u64);

/// The pool's integrity counters and a read-only pool's healed windows, each behind its own
/// atomic or lock.
#[derive(Debug, Default)]
pub(crate) struct Integrity {
    /// Blocks whose checksum failed on a read, a scrub or a rebuild.
    checksum_errors: AtomicU64,
    /// Of those, blocks rewritten from a good copy or rebuilt from parity.
    healed: AtomicU64,
    /// Of those, blocks no good source was left for.
    unrecoverable: AtomicU64,
    /// A read-only pool does not rewrite bad blocks: the good contents of the 4 KiB windows
    /// it healed, which reads use in their place.
    healed_windows: Mutex<HashMap<Window, Vec<u8>>>,
}

impl Integrity {
    /// Adds blocks found bad, and of those healed and lost.
    pub fn count(&self, found: u64, healed: u64, lost: u64) {
        self.checksum_errors.fetch_add(found, Ordering::AcqRel);
        self.healed.fetch_add(healed, Ordering::AcqRel);
        self.unrecoverable.fetch_add(lost, Ordering::AcqRel);
    }

    /// The counters as they are now.
    pub fn stats(&self) -> IntegrityStats {
        IntegrityStats {
            checksum_errors: self.checksum_errors.load(Ordering::Acquire),
            healed: self.healed.load(Ordering::Acquire),
            unrecoverable: self.unrecoverable.load(Ordering::Acquire),
        }
    }

    fn windows(&self) -> MutexGuard<'_, HashMap<Window, Vec<u8>>> {
        self.healed_windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the good contents of a window a read-only pool healed (4 KiB).
    pub fn keep_healed(&self, window: Window, contents: Vec<u8>) {
        self.windows().insert(window, contents);
    }

    /// The good contents of the block at `off` of slot `s`, where a healed window holds it.
    pub fn healed_block(&self, s: Slot, off: u64) -> Option<Vec<u8>> {
        let w = off - off % csum::PAGE;
        let at = (off - w) as usize;
        self.windows()
            .get(&(s.member, s.slab, w))
            .map(|v| v[at..at + csum::BLOCK as usize].to_vec())
    }
}
