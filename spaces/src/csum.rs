//! Per-block CRC-32C: every 512-byte block of every slab has a 4-byte checksum in its member's
//! checksum area (after the member's last slab; see [`format`](crate::format)).
//!
//! - 512 bytes because that is the smallest I/O a space takes: a write never has to read
//!   anything to compute its checksums (dm-integrity makes the same choice: 4 bytes per
//!   512-byte sector, 0.78% of the disk).
//! - A stored value is `crc32c(block) ^ crc32c(512 zero bytes)`, so a zeroed block has the
//!   stored value 0 and zeroing a slab's checksum entries matches zeroing its data.
//! - A member's checksums describe that member's own slabs: every copy and every parity shard
//!   carries its own, so each slot can be verified alone.
//! - A write's data goes to the members first; while it is in flight the submitting thread
//!   computes its checksums, sets them in the cache and writes the checksum pages they change
//!   (the updates of a batch joined per member and slab first, so pieces smaller than a page's
//!   data still cover whole pages and need no read), with the pages' locks held until the page
//!   writes complete (so pages written for two writes that share one cannot land out of
//!   order). The request completes when both have. The write-intent bitmap covers both: after a crash a
//!   dirty chunk may hold data whose checksum did not land (or the reverse), and the resync
//!   decides it (the resync at [`Pool::open`](crate::Pool::open)); outside dirty chunks a
//!   mismatch is damage.
//! - Checksum pages (4 KiB, 1024 entries: 512 KiB of a member's data) are cached in memory
//!   once read; the cache is never trimmed (8 MiB of memory per GiB of data touched).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, RwLock};
use vstor_core::{AlignedBuf, BlockDevice, Result};

/// Bytes of data per checksum.
pub const BLOCK: u64 = 512;
/// Bytes of checksum per block.
pub const ENTRY: u64 = 4;
/// Bytes of a checksum page (the unit the cache and the writes use).
pub const PAGE: u64 = 4096;
const PER_PAGE: u64 = PAGE / ENTRY;
const PAGE_LOCKS: usize = 64;

static ZERO: LazyLock<u32> = LazyLock::new(|| crc32c::crc32c(&[0u8; BLOCK as usize]));

/// The stored checksum of one block of `BLOCK` bytes.
pub fn block_crc(block: &[u8]) -> u32 {
    crc32c::crc32c(block) ^ *ZERO
}

/// Stored checksums of consecutive blocks of `data` (a multiple of `BLOCK` bytes).
pub fn crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK as usize).map(block_crc).collect()
}

/// Stored checksums of `len` bytes (a multiple of `BLOCK`) starting `skip` bytes into a list
/// of buffers.
pub fn crcs_iov<B: std::ops::Deref<Target = [u8]>>(
    bufs: &[B],
    skip: usize,
    len: usize,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(len / BLOCK as usize);
    let mut crc = 0u32;
    let mut fill = 0usize;
    let mut skip = skip;
    let mut need = len;
    for b in bufs {
        if need == 0 {
            break;
        }
        let b: &[u8] = b;
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let mut s = &b[skip..b.len().min(skip + need)];
        skip = 0;
        need -= s.len();
        while !s.is_empty() {
            let n = (BLOCK as usize - fill).min(s.len());
            if fill == 0 && n == BLOCK as usize {
                out.push(block_crc(&s[..n]));
            } else {
                crc = crc32c::crc32c_append(crc, &s[..n]);
                fill += n;
                if fill == BLOCK as usize {
                    out.push(crc ^ *ZERO);
                    crc = 0;
                    fill = 0;
                }
            }
            s = &s[n..];
        }
    }
    out
}

/// Bytes of checksums of one slab.
pub fn slab_bytes(slab_size: u64) -> u64 {
    slab_size / BLOCK * ENTRY
}

/// Bytes of the checksum area of a member with `slabs` slabs (whole 4 KiB pages).
pub fn area_bytes(slabs: u64, slab_size: u64) -> u64 {
    (slabs * slab_bytes(slab_size)).div_ceil(PAGE) * PAGE
}

/// The most slabs (with their checksum area) that fit in `capacity` bytes after `data_start`.
pub fn slabs_fitting(capacity: u64, data_start: u64, slab_size: u64) -> u64 {
    let avail = capacity.saturating_sub(data_start);
    let mut n = avail / (slab_size + slab_bytes(slab_size));
    while n > 0 && n * slab_size + area_bytes(n, slab_size) > avail {
        n -= 1;
    }
    n
}

/// Page writes in one request per run of adjacent pages of a member (sequential writes
/// change runs of adjacent pages); of two writes of one page the later one is kept (all were
/// taken from the cache under the page's lock, the later one is the newer).
pub(crate) fn merge_pages(pages: Vec<PageWrite>) -> Vec<PageWrite> {
    let mut by: std::collections::BTreeMap<(usize, u64), Vec<u8>> = Default::default();
    for (m, off, buf) in pages {
        by.insert((m, off), buf);
    }
    let mut out: Vec<PageWrite> = Vec::new();
    for ((m, off), buf) in by {
        match out.last_mut() {
            Some((lm, loff, lbuf)) if *lm == m && *loff + lbuf.len() as u64 == off => {
                lbuf.extend_from_slice(&buf)
            }
            _ => out.push((m, off, buf)),
        }
    }
    out
}

/// Checksum updates of one batch, `(member, slab, first block, values)`, with the updates that
/// continue one another on a member's slab joined into one. A write split into pieces smaller
/// than a checksum page's data (256 KiB interleave: half a page per piece) then covers its
/// pages whole, so [`Csums::set`] need not read them first. Updates of the same blocks keep
/// their order (the requests of a batch are unordered anyway; the later one wins as before).
pub(crate) fn join_runs(mut sums: Vec<SumRun>) -> Vec<SumRun> {
    sums.sort_by_key(|x| (x.0, x.1, x.2));
    let mut out: Vec<SumRun> = Vec::with_capacity(sums.len());
    for s in sums {
        match out.last_mut() {
            Some(l) if l.0 == s.0 && l.1 == s.1 && l.2 + l.3.len() as u64 == s.2 => {
                l.3.extend_from_slice(&s.3)
            }
            _ => out.push(s),
        }
    }
    out
}

/// A run of checksum updates: member, slab, first block, values.
pub(crate) type SumRun = (usize, u32, u64, Vec<u32>);

/// Where a member's checksum area starts.
pub fn area_start(data_start: u64, slab_size: u64, slabs: u32) -> u64 {
    data_start + u64::from(slabs) * slab_size
}

/// The checksum pages of every member, cached, and the locks that order their writes.
pub(crate) struct Csums {
    slab_size: u64,
    /// Checksum area offset per member.
    starts: RwLock<Vec<u64>>,
    pages: Mutex<PageCache>,
    locks: Vec<Mutex<()>>,
}

/// Cached checksum pages by (member, page index).
type PageCache = HashMap<(usize, u64), Box<[u8]>>;

/// A page write to issue: member, byte offset on the member, contents.
pub(crate) type PageWrite = (usize, u64, Vec<u8>);

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Csums {
    pub fn new(slab_size: u64, starts: Vec<u64>) -> Self {
        Csums {
            slab_size,
            starts: RwLock::new(starts),
            pages: Mutex::new(HashMap::new()),
            locks: (0..PAGE_LOCKS).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Records the checksum area of member `member` (a new one, or one taken back fresh):
    /// its cached pages are dropped.
    pub fn set_member(&self, member: usize, start: u64) {
        let mut s = self.starts.write().unwrap_or_else(|p| p.into_inner());
        if s.len() <= member {
            s.resize(member + 1, 0);
        }
        s[member] = start;
        guard(&self.pages).retain(|k, _| k.0 != member);
    }

    /// Entry index on the member of block `block` of slab `slab`.
    fn index(&self, slab: u32, block: u64) -> u64 {
        u64::from(slab) * (self.slab_size / BLOCK) + block
    }

    fn page_offset(&self, member: usize, page: u64) -> u64 {
        let s = self.starts.read().unwrap_or_else(|p| p.into_inner());
        s.get(member).copied().unwrap_or(0) + page * PAGE
    }

    /// The pages holding entries `[first, first + n)` of `member`.
    fn pages_of(first: u64, n: u64) -> std::ops::RangeInclusive<u64> {
        first / PER_PAGE..=(first + n.max(1) - 1) / PER_PAGE
    }

    /// Loads the pages `pages` of `member` that are not cached.
    fn load(
        &self,
        dev: &dyn BlockDevice,
        member: usize,
        pages: std::ops::RangeInclusive<u64>,
    ) -> Result<()> {
        // Runs of adjacent missing pages are read in one request each.
        let missing: Vec<u64> = {
            let cache = guard(&self.pages);
            pages
                .filter(|p| !cache.contains_key(&(member, *p)))
                .collect()
        };
        let mut i = 0;
        while i < missing.len() {
            let mut j = i + 1;
            while j < missing.len() && missing[j] == missing[j - 1] + 1 {
                j += 1;
            }
            let mut buf = AlignedBuf::new((j - i) * PAGE as usize);
            dev.read_at(self.page_offset(member, missing[i]), &mut buf)?;
            let mut cache = guard(&self.pages);
            for (k, page) in buf.chunks_exact(PAGE as usize).enumerate() {
                cache
                    .entry((member, missing[i + k]))
                    .or_insert_with(|| page.into());
            }
            i = j;
        }
        Ok(())
    }

    /// Reads into the cache the checksum pages of blocks `[first, first + n)` of slab `slab`
    /// of `member` that are not cached, adjacent ones in one request (a rebuild or scrub
    /// loads a whole slab's pages at once instead of a few pages per chunk).
    pub fn preload(
        &self,
        dev: &dyn BlockDevice,
        member: usize,
        slab: u32,
        first: u64,
        n: u64,
    ) -> Result<()> {
        self.load(dev, member, Self::pages_of(self.index(slab, first), n))
    }

    /// The pages holding the checksums of blocks `[first, first + n)` of slab `slab` of
    /// `member` that are not cached: (page index, byte offset on the member), for a caller
    /// that reads them in its own batch and hands them to [`Csums::insert`].
    pub fn missing(&self, member: usize, slab: u32, first: u64, n: u64) -> Vec<(u64, u64)> {
        let cache = guard(&self.pages);
        Self::pages_of(self.index(slab, first), n)
            .filter(|p| !cache.contains_key(&(member, *p)))
            .map(|p| (p, self.page_offset(member, p)))
            .collect()
    }

    /// Caches a page read from the member, unless a newer copy is cached already.
    pub fn insert(&self, member: usize, page: u64, buf: Vec<u8>) {
        guard(&self.pages)
            .entry((member, page))
            .or_insert(buf.into_boxed_slice());
    }

    /// The stored checksums of blocks `[first, first + n)` of slab `slab` of `member`.
    pub fn get(
        &self,
        dev: &dyn BlockDevice,
        member: usize,
        slab: u32,
        first: u64,
        n: u64,
    ) -> Result<Vec<u32>> {
        let i0 = self.index(slab, first);
        self.load(dev, member, Self::pages_of(i0, n))?;
        let pages = guard(&self.pages);
        let mut out = Vec::with_capacity(n as usize);
        for p in Self::pages_of(i0, n) {
            let page = &pages[&(member, p)];
            let lo = i0.max(p * PER_PAGE);
            let hi = (i0 + n).min((p + 1) * PER_PAGE);
            let src =
                &page[((lo % PER_PAGE) * ENTRY) as usize..((hi - p * PER_PAGE) * ENTRY) as usize];
            out.extend(
                src.chunks_exact(ENTRY as usize)
                    .map(|e| u32::from_le_bytes(e.try_into().expect("4 bytes"))),
            );
        }
        Ok(out)
    }

    /// The lock shard of a page.
    fn shard(member: usize, page: u64) -> usize {
        (page.wrapping_mul(0x9e37_79b9_7f4a_7c15) as usize ^ member.wrapping_mul(31)) % PAGE_LOCKS
    }

    /// Locks the pages that entries of `(member, slab, first block, count)` touch, in a fixed
    /// order; hold the guards until the page writes complete.
    pub fn lock_pages(
        &self,
        spans: impl IntoIterator<Item = (usize, u32, u64, u64)>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut ids: Vec<usize> = spans
            .into_iter()
            .flat_map(|(m, slab, first, n)| {
                Self::pages_of(self.index(slab, first), n).map(move |p| Self::shard(m, p))
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter().map(|i| guard(&self.locks[i])).collect()
    }

    /// Sets the checksums of blocks `first..` of slab `slab` of `member` in the cache and
    /// returns the page writes that make it durable. The caller holds the pages' locks.
    pub fn set(
        &self,
        dev: &dyn BlockDevice,
        member: usize,
        slab: u32,
        first: u64,
        vals: &[u32],
    ) -> Result<Vec<PageWrite>> {
        let i0 = self.index(slab, first);
        let end = i0 + vals.len() as u64;
        let pages = Self::pages_of(i0, vals.len() as u64);
        // Pages the update covers whole need not be read first.
        {
            let mut cache = guard(&self.pages);
            for p in pages.clone() {
                if p * PER_PAGE >= i0 && (p + 1) * PER_PAGE <= end {
                    cache
                        .entry((member, p))
                        .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
                }
            }
        }
        self.load(dev, member, pages.clone())?;
        let mut cache = guard(&self.pages);
        for p in pages.clone() {
            let page = cache.get_mut(&(member, p)).expect("loaded");
            let lo = i0.max(p * PER_PAGE);
            let hi = end.min((p + 1) * PER_PAGE);
            let dst = &mut page[((lo % PER_PAGE) * ENTRY) as usize..];
            for (d, v) in dst
                .chunks_exact_mut(ENTRY as usize)
                .zip(&vals[(lo - i0) as usize..(hi - i0) as usize])
            {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        Ok(pages
            .map(|p| {
                (
                    member,
                    self.page_offset(member, p),
                    cache[&(member, p)].to_vec(),
                )
            })
            .collect())
    }

    /// Sets and writes checksums at once (for paths that hold the I/O of the blocks off:
    /// allocation, rebuild, resync, scrub, healing).
    pub fn store(
        &self,
        dev: &Arc<dyn BlockDevice>,
        member: usize,
        slab: u32,
        first: u64,
        vals: &[u32],
    ) -> Result<()> {
        let _g = self.lock_pages([(member, slab, first, vals.len() as u64)]);
        for (_, off, buf) in self.set(&**dev, member, slab, first, vals)? {
            dev.write_at(off, &buf)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_core::MemoryDevice;

    #[test]
    fn zero_block_is_zero_and_iov_matches_flat() {
        assert_eq!(block_crc(&[0u8; 512]), 0);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let flat = crcs(&data[512..3584]);
        let parts: Vec<&[u8]> = vec![&data[..100], &data[100..1500], &data[1500..]];
        assert_eq!(crcs_iov(&parts, 512, 3072), flat);
    }

    #[test]
    fn adjacent_page_writes_merge_and_the_later_copy_wins() {
        let p = |m, off, v| (m, off, vec![v; 4096]);
        let out = merge_pages(vec![
            p(0, 8192, 1),
            p(0, 4096, 2),
            p(1, 8192, 3),
            p(0, 8192, 4),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].0, out[0].1, out[0].2.len()), (0, 4096, 8192));
        assert_eq!((out[0].2[0], out[0].2[4096]), (2, 4));
        assert_eq!((out[1].0, out[1].1), (1, 8192));
    }

    #[test]
    fn runs_that_continue_one_another_join_and_a_half_page_pair_covers_its_page() {
        let out = join_runs(vec![
            (0, 2, 512, vec![2; 512]),
            (1, 2, 0, vec![3; 512]),
            (0, 2, 0, vec![1; 512]),
            (0, 3, 1024, vec![4; 8]),
        ]);
        assert_eq!(out.len(), 3);
        assert_eq!(
            (out[0].0, out[0].1, out[0].2, out[0].3.len()),
            (0, 2, 0, 1024)
        );
        assert_eq!((out[0].3[511], out[0].3[512]), (1, 2));
        // Two half-page updates joined cover the page whole: nothing is read from the device.
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let counting = vstor_core::FaultDevice::new(dev.clone());
        let c = Csums::new(1 << 20, vec![0]);
        let w = c.set(&counting, 0, 2, out[0].2, &out[0].3).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(counting.stats().reads, 0);
    }

    #[test]
    fn fitting_leaves_room_for_the_area() {
        let slab = 1 << 20;
        let n = slabs_fitting(16 << 20, 3 << 20, slab);
        assert!(3 * (1 << 20) + n * slab + area_bytes(n, slab) <= 16 << 20);
        assert!(3 * (1 << 20) + (n + 1) * slab + area_bytes(n + 1, slab) > 16 << 20);
    }

    #[test]
    fn set_then_get_round_trips_through_the_device() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let c = Csums::new(64 << 10, vec![8192]);
        c.store(&dev, 0, 3, 10, &[1, 2, 3]).unwrap();
        assert_eq!(c.get(&*dev, 0, 3, 9, 5).unwrap(), vec![0, 1, 2, 3, 0]);
        let fresh = Csums::new(64 << 10, vec![8192]);
        assert_eq!(fresh.get(&*dev, 0, 3, 10, 3).unwrap(), vec![1, 2, 3]);
    }
}
