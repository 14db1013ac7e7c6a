//! Per-block CRC-32C: every 512-byte block of every slab has a 4-byte checksum in its member's
//! checksum area (after the member's last slab; see [`format`](crate::format)).
//!
//! - 512 bytes because that is the smallest I/O a space takes: a write never has to read
//!   anything to compute its checksums (dm-integrity makes the same choice: 4 bytes per
//!   512-byte sector, 0.78% of the disk).
//! - A stored value is `crc32c(block) ^ crc32c(512 zero bytes) ^ key`. In a pool of format
//!   version 4 the key ([`entry_key`]) is a hash of the pool's and the member's identities
//!   ([`member_seed`]; a member taken back with [`Pool::reuse_member`](crate::Pool::reuse_member)
//!   gets a new identity, so its old entries are a generation behind) and of the entry's
//!   position on the member (slab and block). So a member that lost its contents (data and
//!   checksum area read as zeroes), or a block moved together with its entry to another
//!   position or onto another member, fails verification instead of being served. "Never
//!   written" is not a checksum value: a thin extent not allocated is recorded in the
//!   metadata and reads as zeroes without a look at any member, and an extent's slabs get the
//!   keyed entries of zero blocks when it is allocated. Before version 4 the key is 0 (a
//!   zeroed block had the stored value 0: the old rule, with which those pools are still
//!   read). The checksum cache applies the key: its callers see `crc32c(block) ^ crc32c(zeroes)`.
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
//!   once read, up to a limit ([`DEFAULT_CACHE_BYTES`], or
//!   [`Pool::set_checksum_cache_limit`](crate::Pool::set_checksum_cache_limit)): past it the
//!   least recently used half is dropped, except pages whose lock is held (a page set in the
//!   cache whose write has not completed is never dropped, so the member's copy of a dropped
//!   page is always current). A load that read pages from a member before a drop does not
//!   cache them, as they may predate a page write that completed since.

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

/// The key seed of a member's checksum entries in a pool of format version 4: a hash of the
/// pool's and the member's identities (never 0; 0 is the old rule's "no key").
pub fn member_seed(pool: &uuid::Uuid, member: &uuid::Uuid) -> u64 {
    let a = pool.as_u128();
    let b = member.as_u128();
    let mut h = mix64(a as u64 ^ 0x5653_5450_4f4f_4c34);
    for w in [(a >> 64) as u64, b as u64, (b >> 64) as u64] {
        h = mix64(h ^ w);
    }
    h | 1
}

/// The key of entry `index` (slab * blocks per slab + block: the entry's position on its
/// member) of a member whose seed is `seed` (0: unkeyed, the key is 0).
#[inline]
pub fn entry_key(seed: u64, index: u64) -> u32 {
    if seed == 0 {
        return 0;
    }
    mix64(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)) as u32
}

/// splitmix64's finalizer: every input bit moves every output bit.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Per byte of the CRC register, the register shifted past one `BLOCK` of zero bytes (the
/// operator `crc(A ++ B) = shift(crc(A)) ^ crc(B)` uses for a B of one block; it is linear).
static SHIFT_BLOCK: LazyLock<[[u32; 256]; 4]> = LazyLock::new(|| {
    let mut t = [[0u32; 256]; 4];
    for (k, row) in t.iter_mut().enumerate() {
        for (v, e) in row.iter_mut().enumerate() {
            *e = crc32c::crc32c_combine((v as u32) << (8 * k), 0, BLOCK as usize);
        }
    }
    t
});

fn shift_block(c: u32) -> u32 {
    let t = &*SHIFT_BLOCK;
    t[0][(c & 0xff) as usize]
        ^ t[1][((c >> 8) & 0xff) as usize]
        ^ t[2][((c >> 16) & 0xff) as usize]
        ^ t[3][(c >> 24) as usize]
}

/// The CRC-32C of consecutive blocks whose stored checksums are `stored`: what [`crc_iov`]
/// gives over them when every block matches its checksum.
pub fn joined(stored: &[u32]) -> u32 {
    let mut it = stored.iter();
    let Some(first) = it.next() else {
        return 0;
    };
    it.fold(first ^ *ZERO, |acc, s| shift_block(acc) ^ s ^ *ZERO)
}

/// The CRC-32C of `len` bytes starting `skip` bytes into a list of buffers, in one pass (the
/// crc32c crate's three-stream path for long data: faster than a CRC per block, notably on
/// data just read by DMA, which is not in the CPU's caches).
///
/// Reads are verified with it: the range's CRC is compared with [`joined`] of the stored
/// checksums of its blocks, and only a range that differs is checked block by block. Damage
/// inside one block is caught exactly as the block's own check would catch it (the joined
/// value is a bijection of each block's CRC); damage spread over several blocks of one range
/// goes unseen only if the error terms cancel modulo the CRC polynomial.
pub fn crc_iov<B: std::ops::Deref<Target = [u8]>>(bufs: &[B], skip: usize, len: usize) -> u32 {
    iov_slices(bufs, skip, len).fold(0, crc32c::crc32c_append)
}

/// The pieces of the `len` bytes starting `skip` bytes into a list of buffers, in order.
fn iov_slices<B: std::ops::Deref<Target = [u8]>>(
    bufs: &[B],
    skip: usize,
    len: usize,
) -> impl Iterator<Item = &[u8]> {
    let (mut skip, mut need) = (skip, len);
    bufs.iter().filter_map(move |b| {
        let b: &[u8] = b;
        if need == 0 || skip >= b.len() {
            skip = skip.saturating_sub(b.len());
            return None;
        }
        let s = &b[skip..b.len().min(skip + need)];
        skip = 0;
        need -= s.len();
        Some(s)
    })
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
    for mut s in iov_slices(bufs, skip, len) {
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
    /// Checksum area offset and key seed ([`member_seed`]; 0: unkeyed) per member.
    starts: RwLock<Vec<(u64, u64)>>,
    pages: Mutex<PageCache>,
    locks: Vec<Mutex<()>>,
}

/// The default limit of the checksum-page cache: 64 MiB, the checksums of 8 GiB of data.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// Cached checksum pages by (member, page index), with when each was last used.
struct PageCache {
    map: HashMap<(usize, u64), Cached>,
    /// Counts uses, for the least-recently-used order.
    tick: u64,
    /// Counts drops: a load that began before one does not cache what it read.
    drops: u64,
    /// Pages kept at most (at least 1).
    limit: usize,
}

struct Cached {
    page: Box<[u8]>,
    used: u64,
}

impl PageCache {
    fn new(limit_bytes: u64) -> Self {
        PageCache {
            map: HashMap::new(),
            tick: 0,
            drops: 0,
            limit: Self::pages(limit_bytes),
        }
    }

    fn pages(limit_bytes: u64) -> usize {
        usize::try_from(limit_bytes / PAGE)
            .unwrap_or(usize::MAX)
            .max(1)
    }

    fn contains(&self, k: &(usize, u64)) -> bool {
        self.map.contains_key(k)
    }

    /// A cached page, marked used.
    fn touch(&mut self, k: &(usize, u64)) -> Option<&mut Box<[u8]>> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(k).map(|c| {
            c.used = t;
            &mut c.page
        })
    }

    /// Caches a page unless one is cached already (which is newer).
    fn insert(&mut self, k: (usize, u64), page: Box<[u8]>) {
        self.tick += 1;
        let used = self.tick;
        self.map.entry(k).or_insert(Cached { page, used });
    }
}

/// A page write to issue: member, byte offset on the member, contents.
pub(crate) type PageWrite = (usize, u64, Vec<u8>);

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Csums {
    /// `starts`: per member, where its checksum area starts and its key seed (0: unkeyed).
    pub fn new(slab_size: u64, starts: Vec<(u64, u64)>) -> Self {
        Csums {
            slab_size,
            starts: RwLock::new(starts),
            pages: Mutex::new(PageCache::new(DEFAULT_CACHE_BYTES)),
            locks: (0..PAGE_LOCKS).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Sets the cache's limit in bytes (at least one page), dropping pages now if it is over.
    pub fn set_limit(&self, bytes: u64) {
        let mut cache = guard(&self.pages);
        cache.limit = PageCache::pages(bytes);
        self.trim(&mut cache);
    }

    /// Pages cached now.
    pub fn cached_pages(&self) -> usize {
        guard(&self.pages).map.len()
    }

    /// If the cache is over its limit, drops its least recently used pages down to half the
    /// limit, skipping pages whose lock is held: a page set in the cache whose write has not
    /// completed stays, so the member's copy of every dropped page is current.
    fn trim(&self, cache: &mut PageCache) {
        if cache.map.len() <= cache.limit {
            return;
        }
        let mut by_age: Vec<((usize, u64), u64)> =
            cache.map.iter().map(|(k, c)| (*k, c.used)).collect();
        by_age.sort_unstable_by_key(|x| x.1);
        let excess = cache.map.len() - cache.limit / 2;
        let mut dropped = 0;
        for (k, _) in by_age {
            if dropped == excess {
                break;
            }
            // Never blocks (the cache's lock is held here, and page locks are taken before
            // it elsewhere); a held page lock, this thread's own included, keeps the page.
            if self.locks[Self::shard(k.0, k.1)].try_lock().is_ok() {
                cache.map.remove(&k);
                dropped += 1;
            }
        }
        if dropped > 0 {
            cache.drops += 1;
        }
    }

    /// Records the checksum area and key seed of member `member` (a new one, or one taken
    /// back fresh): its cached pages are dropped.
    pub fn set_member(&self, member: usize, start: u64, seed: u64) {
        let mut s = self.starts.write().unwrap_or_else(|p| p.into_inner());
        if s.len() <= member {
            s.resize(member + 1, (0, 0));
        }
        s[member] = (start, seed);
        let mut cache = guard(&self.pages);
        cache.map.retain(|k, _| k.0 != member);
        cache.drops += 1;
    }

    /// Entry index on the member of block `block` of slab `slab`.
    fn index(&self, slab: u32, block: u64) -> u64 {
        u64::from(slab) * (self.slab_size / BLOCK) + block
    }

    fn page_offset(&self, member: usize, page: u64) -> u64 {
        let s = self.starts.read().unwrap_or_else(|p| p.into_inner());
        s.get(member).map_or(0, |x| x.0) + page * PAGE
    }

    fn seed(&self, member: usize) -> u64 {
        let s = self.starts.read().unwrap_or_else(|p| p.into_inner());
        s.get(member).map_or(0, |x| x.1)
    }

    /// The pages holding entries `[first, first + n)` of `member`.
    fn pages_of(first: u64, n: u64) -> std::ops::RangeInclusive<u64> {
        first / PER_PAGE..=(first + n.max(1) - 1) / PER_PAGE
    }

    /// Loads the pages `pages` of `member` that are not cached. `locked`: the caller holds
    /// their page locks, so no page write of theirs is in flight and what is read is current
    /// even if pages were dropped meanwhile.
    fn load(
        &self,
        dev: &dyn BlockDevice,
        member: usize,
        pages: std::ops::RangeInclusive<u64>,
        locked: bool,
    ) -> Result<()> {
        // Runs of adjacent missing pages are read in one request each.
        let (missing, drops): (Vec<u64>, u64) = {
            let cache = guard(&self.pages);
            let missing = pages.filter(|p| !cache.contains(&(member, *p))).collect();
            (missing, cache.drops)
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
            if cache.drops != drops && !locked {
                // Pages were dropped while these were read: what was read may predate a
                // page write that completed meanwhile. The caller's lookup loads again.
                return Ok(());
            }
            for (k, page) in buf.chunks_exact(PAGE as usize).enumerate() {
                cache.insert((member, missing[i + k]), page.into());
            }
            self.trim(&mut cache);
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
        self.load(
            dev,
            member,
            Self::pages_of(self.index(slab, first), n),
            false,
        )
    }

    /// The pages holding the checksums of blocks `[first, first + n)` of slab `slab` of
    /// `member` that are not cached: (page index, byte offset on the member), for a caller
    /// that reads them in its own batch and hands them to [`Csums::insert`].
    /// Also returns the cache's drop count, to hand to [`Csums::insert`] with the pages.
    pub fn missing(&self, member: usize, slab: u32, first: u64, n: u64) -> (Vec<(u64, u64)>, u64) {
        let cache = guard(&self.pages);
        let pages = Self::pages_of(self.index(slab, first), n)
            .filter(|p| !cache.contains(&(member, *p)))
            .map(|p| (p, self.page_offset(member, p)))
            .collect();
        (pages, cache.drops)
    }

    /// Caches pages read from the members (member, page index, contents), each unless a
    /// newer copy is cached already; none if pages were dropped since [`Csums::missing`]
    /// returned `drops` (the reads may predate a page write that completed meanwhile; a later
    /// lookup loads them again). All at once, then trimmed once.
    pub fn insert(&self, pages: Vec<(usize, u64, Vec<u8>)>, drops: u64) {
        let mut cache = guard(&self.pages);
        if cache.drops == drops {
            for (member, page, buf) in pages {
                cache.insert((member, page), buf.into_boxed_slice());
            }
            self.trim(&mut cache);
        }
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
        // Pages dropped between the load and the lookup (by other threads' loads) are loaded
        // again; each round keeps the pages it loaded unless the cache is smaller than them.
        let mut rounds = 0;
        let mut pages = loop {
            self.load(dev, member, Self::pages_of(i0, n), false)?;
            let cache = guard(&self.pages);
            if Self::pages_of(i0, n).all(|p| cache.contains(&(member, p))) {
                break cache;
            }
            drop(cache);
            rounds += 1;
            if rounds > 8 {
                return self.read_uncached(dev, member, i0, n);
            }
        };
        let seed = self.seed(member);
        let mut out = Vec::with_capacity(n as usize);
        for p in Self::pages_of(i0, n) {
            let page = pages.touch(&(member, p)).expect("checked under this lock");
            let lo = i0.max(p * PER_PAGE);
            let hi = (i0 + n).min((p + 1) * PER_PAGE);
            let src =
                &page[((lo % PER_PAGE) * ENTRY) as usize..((hi - p * PER_PAGE) * ENTRY) as usize];
            out.extend(src.chunks_exact(ENTRY as usize).zip(lo..).map(|(e, i)| {
                u32::from_le_bytes(e.try_into().expect("4 bytes")) ^ entry_key(seed, i)
            }));
        }
        Ok(out)
    }

    /// Entries `[i0, i0 + n)` of `member` read from the member, past the cache (for a
    /// lookup whose pages other threads keep dropping: a cache far smaller than the work).
    /// The caller holds no page lock, so a concurrent page write may or may not be seen, as
    /// for any read racing a write of the same blocks.
    fn read_uncached(
        &self,
        dev: &dyn BlockDevice,
        member: usize,
        i0: u64,
        n: u64,
    ) -> Result<Vec<u32>> {
        let pages = Self::pages_of(i0, n);
        let first = *pages.start();
        let mut buf = AlignedBuf::new(pages.count() * PAGE as usize);
        dev.read_at(self.page_offset(member, first), &mut buf)?;
        let at = ((i0 - first * PER_PAGE) * ENTRY) as usize;
        let seed = self.seed(member);
        Ok(buf[at..at + (n * ENTRY) as usize]
            .chunks_exact(ENTRY as usize)
            .zip(i0..)
            .map(|(e, i)| u32::from_le_bytes(e.try_into().expect("4 bytes")) ^ entry_key(seed, i))
            .collect())
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
                    cache.insert((member, p), vec![0u8; PAGE as usize].into_boxed_slice());
                }
            }
        }
        // The caller holds these pages' locks: no trim drops them once loaded.
        self.load(dev, member, pages.clone(), true)?;
        let seed = self.seed(member);
        let mut cache = guard(&self.pages);
        for p in pages.clone() {
            let page = cache.touch(&(member, p)).expect("loaded, and locked");
            let lo = i0.max(p * PER_PAGE);
            let hi = end.min((p + 1) * PER_PAGE);
            let dst = &mut page[((lo % PER_PAGE) * ENTRY) as usize..];
            for ((d, v), i) in dst
                .chunks_exact_mut(ENTRY as usize)
                .zip(&vals[(lo - i0) as usize..(hi - i0) as usize])
                .zip(lo..)
            {
                d.copy_from_slice(&(v ^ entry_key(seed, i)).to_le_bytes());
            }
        }
        let writes = pages
            .map(|p| {
                (
                    member,
                    self.page_offset(member, p),
                    cache.map[&(member, p)].page.to_vec(),
                )
            })
            .collect();
        // The caller's pages stay (it holds their locks); older ones may go.
        self.trim(&mut cache);
        Ok(writes)
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
    fn joined_checksums_match_the_crc_of_the_range_and_catch_one_bad_block() {
        let data: Vec<u8> = (0..64 * 512u32).map(|i| (i * 13 % 253) as u8).collect();
        let stored = crcs(&data);
        assert_eq!(joined(&stored), crc32c::crc32c(&data));
        assert_eq!(joined(&stored[..1]), crc32c::crc32c(&data[..512]));
        assert_eq!(joined(&[]), crc32c::crc32c(&[]));
        let parts: Vec<&[u8]> = vec![&data[..700], &data[700..9000], &data[9000..]];
        assert_eq!(crc_iov(&parts, 1024, 8192), joined(&stored[2..18]));
        // Any change inside one block shows in the range's CRC.
        for at in [0, 511, 512, 20_000, data.len() - 1] {
            let mut bad = data.clone();
            bad[at] ^= 0x40;
            assert_ne!(crc32c::crc32c(&bad), joined(&stored), "flip at {at}");
        }
    }

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
        let c = Csums::new(1 << 20, vec![(0, 0)]);
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

    /// A device whose next read takes its data when issued and then waits to be let go (a
    /// read in flight on a slow disk while other threads go on).
    struct SlowRead {
        inner: MemoryDevice,
        gate: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
    }

    impl BlockDevice for SlowRead {
        fn info(&self) -> vstor_core::DeviceInfo {
            self.inner.info()
        }
        fn submit(&self, batch: &mut [vstor_core::Request<'_>]) {
            let read = batch
                .iter()
                .all(|r| matches!(r.op, vstor_core::Op::Read { .. }));
            self.inner.submit(batch);
            if read {
                let gate = guard(&self.gate).take();
                if let Some((started, go)) = gate {
                    started.send(()).unwrap();
                    go.recv().unwrap();
                }
            }
        }
    }

    /// A page read before a page write completed, and cached only after the cache dropped
    /// that page, would be stale: the load must not cache it, and the lookup must see the
    /// written value.
    #[test]
    fn a_load_that_straddles_a_drop_caches_nothing_stale() {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        let slow = Arc::new(SlowRead {
            inner: MemoryDevice::new(1 << 20).unwrap(),
            gate: Mutex::new(Some((started_tx, go_rx))),
        });
        let dev: Arc<dyn BlockDevice> = slow.clone();
        let c = Csums::new(64 << 10, vec![(8192, 0)]);
        std::thread::scope(|sc| {
            // Reads entry 0 (stored 0 on the device), and is held with the old page.
            let reader = sc.spawn(|| c.get(&*dev, 0, 0, 0, 1).unwrap());
            started_rx.recv().unwrap();
            // Meanwhile a write sets entry 0 and its page reaches the device...
            c.store(&dev, 0, 0, 0, &[7]).unwrap();
            // ...and the cache drops it (another page loaded, the limit cut to one page).
            c.get(&*dev, 0, 15, 0, 1).unwrap();
            c.set_limit(PAGE);
            assert!(c.cached_pages() <= 1);
            go_tx.send(()).unwrap();
            assert_eq!(
                reader.join().unwrap(),
                vec![7],
                "the lookup saw the old page"
            );
        });
        assert_eq!(
            c.get(&*dev, 0, 0, 0, 1).unwrap(),
            vec![7],
            "a stale page was cached"
        );
    }

    #[test]
    fn set_then_get_round_trips_through_the_device() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let c = Csums::new(64 << 10, vec![(8192, 0)]);
        c.store(&dev, 0, 3, 10, &[1, 2, 3]).unwrap();
        assert_eq!(c.get(&*dev, 0, 3, 9, 5).unwrap(), vec![0, 1, 2, 3, 0]);
        let fresh = Csums::new(64 << 10, vec![(8192, 0)]);
        assert_eq!(fresh.get(&*dev, 0, 3, 10, 3).unwrap(), vec![1, 2, 3]);
    }
}
