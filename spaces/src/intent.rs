//! The write-intent log: a bitmap on every member naming the chunks that may hold a write
//! that reached some slots of its extent and not others.
//!
//! Before a write reaches an extent, the bit of every (member, slab, chunk) it touches is set
//! in that member's bitmap on disk and flushed (only the first write to a clean chunk pays for
//! this). Bits are cleared when the pool is quiet (no write in flight: writes hold the log's
//! gate shared) at a flush at least [`CLEAR_DELAY`] after the last bit was set, and when the
//! last handle of the pool is dropped, unless a member is behind and the bits are kept for its
//! catch-up. What reads the bits after a crash and settles the chunks they name (the resync,
//! the catch-up) is [`resync`](crate::resync); this module owns the bits, their lock and the
//! gate, and takes the members it writes to as an argument.

use crate::format::{BITMAP_SIZE, CHUNKS_PER_SLAB};
use crate::members::{Devs, Members};
use crate::store::lock;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};
use vstor_core::{BlockDevice, Error, Result};

/// How long after the last bit was set a quiet flush clears the bitmap.
pub const CLEAR_DELAY: Duration = Duration::from_secs(2);

/// A chunk of a member: (member, slab, chunk in the slab).
pub(crate) type Chunk = (usize, u32, u64);

/// The in-memory copy of every member's bitmap, as it is on disk.
#[derive(Debug, Default)]
struct Bits {
    bits: Vec<Vec<u8>>,
    any: bool,
    last_mark: Option<Instant>,
}

/// The write-intent log of an open pool: the bits (one lock), the gate writes hold while in
/// flight (another), and the count of chunks resynced.
#[derive(Debug)]
pub(crate) struct WriteIntentLog {
    /// Where the bitmap lies on every member.
    offset: u64,
    bits: Mutex<Bits>,
    /// Writes hold it shared while in flight; clearing the bitmaps holds it exclusively.
    gate: RwLock<()>,
    /// Chunks resynced or caught up since the pool was opened.
    resynced: AtomicU64,
}

/// Bytes of a member's bitmap that hold its slabs' bits, rounded up to 4 KiB.
pub(crate) fn bitmap_bytes(slab_count: u32) -> usize {
    ((u64::from(slab_count) * CHUNKS_PER_SLAB)
        .div_ceil(8)
        .div_ceil(4096)
        * 4096) as usize
}

/// Sets the bit of chunk `c` of slab `slab` in bitmap `v`.
pub(crate) fn set_bit(v: &mut [u8], slab: u32, c: u64) {
    let bit = u64::from(slab) * CHUNKS_PER_SLAB + c;
    v[(bit / 8) as usize] |= 1 << (bit % 8);
}

/// Adds the (member, slab, chunk) of every bit set in member `m`'s bitmap `v` (of a member
/// with `slab_count` slabs) to `dirty`.
pub(crate) fn add_bits(dirty: &mut BTreeSet<Chunk>, m: usize, v: &[u8], slab_count: u32) {
    for (i, &b) in v.iter().enumerate().filter(|(_, &b)| b != 0) {
        for k in (0..8).filter(|k| b & (1 << k) != 0) {
            let bit = i as u64 * 8 + k;
            let slab = bit / CHUNKS_PER_SLAB;
            if slab < u64::from(slab_count) {
                dirty.insert((m, slab as u32, bit % CHUNKS_PER_SLAB));
            }
        }
    }
}

impl WriteIntentLog {
    /// The log of a pool whose data starts at `data_start` (the bitmap lies just before).
    pub fn new(data_start: u64) -> Self {
        WriteIntentLog {
            offset: data_start - BITMAP_SIZE,
            bits: Mutex::new(Bits::default()),
            gate: RwLock::new(()),
            resynced: AtomicU64::new(0),
        }
    }

    /// Held shared by a batch with writes while they are in flight.
    pub fn writing(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Held exclusively: no write is in flight. `None` if one is.
    pub fn quiet(&self) -> Option<RwLockWriteGuard<'_, ()>> {
        self.gate.try_write().ok()
    }

    /// Sets on disk the bits of `chunks` not set yet, before the writes they cover. Returns
    /// the members that failed the bitmap write.
    pub fn mark(&self, members: &Members, chunks: &BTreeSet<Chunk>) -> Vec<(usize, Error)> {
        let base = self.offset;
        let mut bm = lock(&self.bits);
        let mut sectors: BTreeSet<(usize, usize)> = BTreeSet::new();
        for &(m, slab, c) in chunks {
            let bit = u64::from(slab) * CHUNKS_PER_SLAB + c;
            let (byte, mask) = ((bit / 8) as usize, 1u8 << (bit % 8));
            if bm.bits.len() <= m {
                bm.bits.resize(m + 1, Vec::new());
            }
            let v = &mut bm.bits[m];
            if v.len() <= byte {
                v.resize((byte + 1).div_ceil(4096) * 4096, 0);
            }
            if v[byte] & mask == 0 {
                v[byte] |= mask;
                sectors.insert((m, byte / 4096));
            }
        }
        if sectors.is_empty() {
            return Vec::new();
        }
        bm.any = true;
        bm.last_mark = Some(Instant::now());
        let devs = members.snapshot();
        let mut failed = Vec::new();
        let mut by_member: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (m, s) in sectors {
            by_member.entry(m).or_default().push(s);
        }
        for (m, secs) in by_member {
            let Some(dev) = devs.get(m).and_then(Option::as_ref) else {
                continue;
            };
            let r = secs
                .iter()
                .try_for_each(|&s| {
                    dev.write_at(
                        base + s as u64 * 4096,
                        &bm.bits[m][s * 4096..(s + 1) * 4096],
                    )
                })
                .and_then(|()| dev.flush());
            if let Err(e) = r {
                failed.push((m, e));
            }
        }
        failed
    }

    /// Clears every bit on disk (the caller holds the gate, so no write is in flight, has
    /// flushed the members, and knows no bit is to be kept). With `force` false, only if the
    /// last bit was set at least [`CLEAR_DELAY`] ago.
    pub fn clear(&self, members: &Members, force: bool) {
        let base = self.offset;
        let mut bm = lock(&self.bits);
        if !bm.any || (!force && bm.last_mark.is_some_and(|t| t.elapsed() < CLEAR_DELAY)) {
            return;
        }
        let devs = members.snapshot();
        let mut all = true;
        for (m, v) in bm.bits.iter_mut().enumerate() {
            let dirty: Vec<usize> = (0..v.len() / 4096)
                .filter(|&s| v[s * 4096..(s + 1) * 4096].iter().any(|&b| b != 0))
                .collect();
            if dirty.is_empty() {
                continue;
            }
            let Some(dev) = devs.get(m).and_then(Option::as_ref) else {
                all = false;
                continue;
            };
            let zero = [0u8; 4096];
            let r = dirty
                .iter()
                .try_for_each(|&s| dev.write_at(base + s as u64 * 4096, &zero))
                .and_then(|()| dev.flush());
            match r {
                Ok(()) => v.iter_mut().for_each(|b| *b = 0),
                Err(_) => all = false,
            }
        }
        bm.any = !all;
    }

    /// At open: reads the bitmap of every present member (`devs`; member `m` has
    /// `slab_counts[m]` slabs) into memory, and returns the chunks its bits name.
    pub fn load(&self, slab_counts: &[u32], devs: &Devs) -> Result<BTreeSet<Chunk>> {
        let mut dirty: BTreeSet<Chunk> = BTreeSet::new();
        let mut bm = lock(&self.bits);
        bm.bits = vec![Vec::new(); slab_counts.len()];
        for (m, &slabs) in slab_counts.iter().enumerate() {
            let Some(dev) = &devs[m] else { continue };
            let mut v = vec![0u8; bitmap_bytes(slabs)];
            dev.read_at(self.offset, &mut v)?;
            add_bits(&mut dirty, m, &v, slabs);
            if v.iter().any(|&b| b != 0) {
                bm.any = true;
            }
            bm.bits[m] = v;
        }
        Ok(dirty)
    }

    /// The chunks the bits in memory name on every member but `x` (member `m` has
    /// `slab_counts[m]` slabs), added to `dirty`.
    pub fn kept_except(&self, x: usize, slab_counts: &[u32], dirty: &mut BTreeSet<Chunk>) {
        let bm = lock(&self.bits);
        for (m, v) in bm.bits.iter().enumerate() {
            if m != x {
                add_bits(dirty, m, v, slab_counts[m]);
            }
        }
    }

    /// Reads member `dev`'s own bitmap (of `slab_count` slabs) from disk.
    pub fn read_member(&self, dev: &dyn BlockDevice, slab_count: u32) -> Result<Vec<u8>> {
        let mut own = vec![0u8; bitmap_bytes(slab_count)];
        dev.read_at(self.offset, &mut own)?;
        Ok(own)
    }

    /// Sets member `x`'s bitmap, on its disk `dev` and in memory, to exactly `bits` (a member
    /// caught up while another is still behind keeps naming what it holds that the other
    /// missed; see [`resync`](crate::resync)).
    pub fn set_member(&self, x: usize, dev: &dyn BlockDevice, bits: Vec<u8>) -> Result<()> {
        let mut bm = lock(&self.bits);
        crate::store::zero_range(dev, self.offset, BITMAP_SIZE)?;
        if bits.iter().any(|&b| b != 0) {
            dev.write_at(self.offset, &bits)?;
            bm.any = true;
            bm.last_mark = Some(Instant::now());
        }
        dev.flush()?;
        if bm.bits.len() <= x {
            bm.bits.resize(x + 1, Vec::new());
        }
        bm.bits[x] = bits;
        Ok(())
    }

    /// Counts chunks resynced or caught up.
    pub fn count_resynced(&self, chunks: u64) {
        self.resynced.fetch_add(chunks, Ordering::AcqRel);
    }

    /// Chunks resynced or caught up since the pool was opened.
    pub fn resynced(&self) -> u64 {
        self.resynced.load(Ordering::Acquire)
    }
}
