//! A space as a block device: a batch in maps to one batch per member, run side by side.
//!
//! - Simple and mirror I/O, and parity reads whose data members are usable, go straight to the
//!   members with the caller's buffers carved into pieces (no copy); pieces that land next to
//!   each other on one member are merged into one request. A mirror read goes to one copy
//!   (rotating by row), a mirror write to every usable copy.
//! - Parity writes and degraded parity reads work a row at a time under a stripe lock: read
//!   what the row needs, rebuild lost shards, apply the writes, recompute the parity from the
//!   whole data of the row (so a stale parity is never carried forward), write.
//! - An I/O error marks the member failed (recorded in the pool metadata before anything is
//!   acknowledged) and the requests it touched run again without it, as long as the space
//!   keeps its data; otherwise they fail with [`SpacesError::SpaceFailed`].
//! - Every write also writes the block checksums of what it writes: the data batches start
//!   first and the checksums are computed and their pages written while they are in flight
//!   ([`csum`]); every read (and every shard a parity row reads) is verified against them, each
//!   member's reads checksummed by that member's thread as its batch completes. Parity
//!   full-stripe writes from contiguous caller buffers are encoded and written from those
//!   buffers (no copy, no read). A bad block stops the
//!   requests that read it; they run again after [`heal_window`] has rewritten the bad blocks
//!   of that 4 KiB window in every slot (with the space's I/O held off), or fail with
//!   [`SpacesError::ChecksumMismatch`] if no good source is left.

use crate::code;
use crate::csum::{self, PageWrite};
use crate::error::SpacesError;
use crate::format::JOURNAL_SIZE;
use crate::format::{Slot, MAX_MEMBERS};
use crate::journal;
use crate::layout::{Layout, Piece};
use crate::pool::{health, Inner, MemberRt, Pool, SpaceHealth};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use uuid::Uuid;
use vstor_core::{
    carve_read_bufs, carve_write_bufs, copy_from_bufs, copy_into_bufs, fail_remaining,
    submit_group, zero_bufs, AlignedBuf, BlockDevice, DeviceInfo, Error, Op, ReadBufs, Request,
    Result, Supports,
};

/// Bytes of writes in one batch from which the checksums are computed while the data is in
/// flight (below it they are computed first and the pages go in the data's submissions).
const OVERLAP_MIN: u64 = 1 << 20;

/// Stripe locks per space: parity row updates hash onto them.
const STRIPES: usize = 64;

type Devs = Vec<Option<Arc<dyn BlockDevice>>>;

/// What the open handles of one space share.
pub(crate) struct SpaceShared {
    pub id: Uuid,
    pub name: String,
    /// Bytes; it only grows ([`Inner::resize_space`]), after the map has the extents.
    size: AtomicU64,
    /// Tells holders of the space (a VMM's disk) that its size changed.
    pub signal: Arc<vstor_core::CapacitySignal>,
    pub layout: Layout,
    pub extents: RwLock<Vec<Option<Vec<Slot>>>>,
    /// Counts changes of the slabs of allocated extents in `extents` (a release, a rebuild's
    /// switch), made with the map held for writing: a write runs only on the map its
    /// write-intent bits were set from. (An allocation only fills extents that were not
    /// allocated, which a write allocates itself before it sets its bits, and a grow only adds
    /// extents past what writes in flight reach: neither counts.)
    pub map_version: AtomicU64,
    pub deleted: AtomicBool,
    stripes: Vec<Mutex<()>>,
    logical: u32,
    physical: u32,
    align: u32,
    health_cache: Mutex<Option<(u64, SpaceHealth)>>,
    /// The extent being rebuilt and the new slabs of its lost slots: writes go there too.
    pub rebuilding: RwLock<Option<Rebuild>>,
    /// Counts batches with writes run while an extent is being rebuilt: a rebuild that read a
    /// chunk ahead, before letting the space's I/O through, writes it only if this did not
    /// move meanwhile.
    pub writes_while_rebuilding: AtomicU64,
    /// Batches on their way to the extent map (held off by a rebuild or scrub, they take
    /// its lock a few times before their I/O), and batches that took it for their I/O so
    /// far: see [`SpaceShared::let_waiting_io_in`].
    io_waiting: AtomicUsize,
    io_entered: AtomicU64,
    /// Row buffers of the parity path, recycled.
    bufs: Mutex<Vec<AlignedBuf>>,
}

/// A read to verify: parent request, offset in it, length, slot, offset in the slab, extent,
/// and (index of the member request that read it, offset in that request).
type ReadCheck = (usize, u64, u64, Slot, u64, u64, (usize, u64));

/// Written data whose checksums go to (member, slab)s: the targets, the first block in the
/// slabs, the data.
type CrcSource<B> = (Vec<(usize, u32)>, u64, B);

/// An extent under rebuild: its index and, per lost slot, the slab taking its place.
pub(crate) type Rebuild = (u64, Vec<(usize, Slot)>);

/// Takes one off a count of batches waiting for the extent map when dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SpaceShared {
    /// The extent being rebuilt, if one is.
    pub(crate) fn rebuilding_extent(&self) -> Option<u64> {
        self.rebuilding
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| r.0)
    }

    /// Sets (or clears) the extent being rebuilt and the new slabs its writes also go to.
    pub(crate) fn set_rebuilding(&self, r: Option<Rebuild>) {
        *self.rebuilding.write().unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Sets the size: the caller holds the extent map for writing and has grown it first.
    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// How many batches have taken the extent map so far (read it while holding the map
    /// exclusively, to hand to [`SpaceShared::let_waiting_io_in`]).
    pub fn io_entered(&self) -> u64 {
        self.io_entered.load(Ordering::Acquire)
    }

    /// Called by a long job (rebuild, scrub) right after it lets go of the extent map between
    /// two steps, with [`SpaceShared::io_entered`] as it was while it held it: if batches are
    /// on their way to the map, waits (20 ms at most) until one has taken it for its I/O.
    /// Without this the job takes the map back at once (the lock does not queue its waiters
    /// fairly, and a write takes it three times), and the space's I/O waits for the whole job.
    pub fn let_waiting_io_in(&self, entered: u64) {
        if self.io_waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let until = std::time::Instant::now() + std::time::Duration::from_millis(20);
        while self.io_entered.load(Ordering::Acquire) == entered
            && self.io_waiting.load(Ordering::Acquire) > 0
            && std::time::Instant::now() < until
        {
            // Sleeps rather than spins: a batch held elsewhere (a heal, a member failing)
            // counts as on its way too.
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    pub fn new(s: &crate::format::SpaceMeta, members: &[MemberRt]) -> Self {
        let infos: Vec<DeviceInfo> = members
            .iter()
            .filter_map(|m| m.device.as_ref().map(|d| d.info()))
            .collect();
        let logical = infos
            .iter()
            .map(|i| i.logical_sector_size)
            .max()
            .unwrap_or(512)
            .max(512);
        SpaceShared {
            id: s.id,
            name: s.name.clone(),
            size: AtomicU64::new(s.size),
            signal: Arc::new(vstor_core::CapacitySignal::new(s.size)),
            layout: s.layout,
            extents: RwLock::new(s.extents.clone()),
            map_version: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            logical,
            physical: infos
                .iter()
                .map(|i| i.physical_sector_size)
                .max()
                .unwrap_or(512)
                .max(logical),
            align: infos.iter().map(|i| i.mem_alignment).max().unwrap_or(1),
            health_cache: Mutex::new(None),
            rebuilding: RwLock::new(None),
            writes_while_rebuilding: AtomicU64::new(0),
            io_waiting: AtomicUsize::new(0),
            io_entered: AtomicU64::new(0),
            bufs: Mutex::new(Vec::new()),
        }
    }
}

/// A space of a pool, as a [`BlockDevice`]. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Space {
    pub(crate) pool: Arc<Inner>,
    pub(crate) shared: Arc<SpaceShared>,
    data_start: u64,
    slab_size: u64,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("name", &self.shared.name)
            .field("size", &self.shared.size())
            .field("layout", &self.shared.layout)
            .finish()
    }
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs each member's batch, the members side by side (on one ring where they are files).
fn run_members(devs: &Devs, per: &mut [Vec<Request<'_>>]) {
    run_members_with(devs, per, |_, _, _| {});
}

/// Runs each member's batch as [`run_members`], calling `on_done(member, index, request)` on
/// this thread as each request completes (see [`submit_group`]); a missing member's requests
/// fail without it being called.
fn run_members_with(
    devs: &Devs,
    per: &mut [Vec<Request<'_>>],
    on_done: impl FnMut(usize, usize, &Request<'_>),
) {
    let mut jobs: Vec<(&dyn BlockDevice, &mut [Request<'_>])> = Vec::new();
    let mut member = Vec::new();
    for (m, (d, reqs)) in devs.iter().zip(per.iter_mut()).enumerate() {
        if reqs.is_empty() {
            continue;
        }
        match d {
            Some(d) => {
                jobs.push((&**d, &mut reqs[..]));
                member.push(m);
            }
            None => fail_remaining(reqs, &Error::InvalidArgument("member not usable".into())),
        }
    }
    let mut on_done = on_done;
    submit_group(&mut jobs, |j, i, r| on_done(member[j], i, r));
}

/// Appends a read, merged into the member's previous request when it continues it. Returns
/// the request's index in `per` and the offset of the read inside it.
fn push_read<'a>(
    per: &mut Vec<Request<'a>>,
    own: &mut Vec<usize>,
    parent: usize,
    offset: u64,
    bufs: ReadBufs<'a>,
) -> (usize, u64) {
    if let (Some(last), Some(&o)) = (per.last_mut(), own.last()) {
        if o == parent && last.offset() + last.len() == offset {
            let at = last.len();
            if let Op::Read { bufs: b, .. } = &mut last.op {
                b.extend(bufs);
                return (per.len() - 1, at);
            }
        }
    }
    per.push(Request::new(Op::Read { offset, bufs }));
    own.push(parent);
    (per.len() - 1, 0)
}

/// Appends a write, merged into the member's previous request when it continues it.
fn push_write<'a>(
    per: &mut Vec<Request<'a>>,
    own: &mut Vec<usize>,
    parent: usize,
    offset: u64,
    bufs: vstor_core::WriteBufs<'a>,
) {
    if let (Some(last), Some(&o)) = (per.last_mut(), own.last()) {
        if o == parent && last.offset() + last.len() == offset {
            if let Op::Write { bufs: b, .. } = &mut last.op {
                b.extend(bufs);
                return;
            }
        }
    }
    per.push(Request::new(Op::Write { offset, bufs }));
    own.push(parent);
}

/// The largest request [`append_write`] makes by merging: a member keeps several requests in
/// flight rather than one long one.
const MERGE_MAX: u64 = 1 << 20;

/// Appends a write to a member's batch, merged into the last request when it continues it (the
/// shards of consecutive parity rows lie next to each other on a member), up to [`MERGE_MAX`].
fn append_write<'a>(per: &mut Vec<Request<'a>>, offset: u64, buf: &'a [u8]) {
    if let Some(last) = per.last_mut() {
        if last.offset() + last.len() == offset && last.len() + buf.len() as u64 <= MERGE_MAX {
            if let Op::Write { bufs, .. } = &mut last.op {
                if bufs.len() < 64 {
                    bufs.push(std::io::IoSlice::new(buf));
                    return;
                }
            }
        }
    }
    per.push(Request::write(offset, buf));
}

/// Where a byte of a space lives (see [`Space::locate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The extent.
    pub extent: u64,
    /// The row inside the extent.
    pub row: u64,
    /// The data column inside the row.
    pub column: usize,
    /// (member, byte offset on the member) of the byte: one entry, or one per mirror copy.
    pub copies: Vec<(usize, u64)>,
    /// (member, byte offset on the member) of the same byte position in each parity column
    /// of the row.
    pub parity: Vec<(usize, u64)>,
}

/// A 4 KiB window of an extent's slabs (the same offset in every slot) that a read found a
/// bad block in, and the request that read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heal {
    pub extent: u64,
    /// Offset inside the slabs, a multiple of 4 KiB.
    pub window: u64,
    pub parent: usize,
}

/// One row of a parity extent touched by the slow path.
/// The parity of a row written from the callers' buffers, encoded on the checksum thread
/// while the data is in flight ([`Space::row_io`]), then written with its checksums.
pub(crate) struct LateParity<'a> {
    /// The row's data shards (the callers' buffers).
    data: &'a [&'a [u8]],
    /// The parity shards, to encode.
    parity: Vec<AlignedBuf>,
    /// Per parity shard: where it goes (member, offset, slab).
    dests: Vec<Vec<(usize, u64, u32)>>,
    /// The first checksum block of the row's shards in their slabs.
    block: u64,
}

pub(crate) struct RowOp {
    pub extent: u64,
    pub row: u64,
    pub lo: u64,
    pub hi: u64,
    pub pieces: Vec<(usize, Piece, bool)>,
    pub shards: Vec<Option<AlignedBuf>>,
    pub rebuild: bool,
    /// Every data column of `[lo, hi)` is written: the parity depends on the new data only
    /// (the journal may skip the row).
    pub full: bool,
    /// A full-stripe write of single requests' contiguous buffers: the data shards are written
    /// and encoded from the callers' buffers, with no copy and no read. Never a row the journal
    /// must log (its record would need the data shards).
    pub direct: bool,
}

impl Space {
    pub(crate) fn new(
        pool: Arc<Inner>,
        shared: Arc<SpaceShared>,
        data_start: u64,
        slab_size: u64,
    ) -> Self {
        Space {
            pool,
            shared,
            data_start,
            slab_size,
        }
    }

    /// The space's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The pool the space belongs to.
    pub fn pool(&self) -> Pool {
        Pool {
            inner: self.pool.clone(),
        }
    }

    /// Where the byte at `offset` of the space lives: `None` past the end or in a thin extent
    /// not allocated yet.
    pub fn locate(&self, offset: u64) -> Option<Location> {
        if offset >= self.shared.size() {
            return None;
        }
        let layout = self.shared.layout;
        let p = layout.pieces(offset, 1).next()?;
        let ext = self
            .shared
            .extents
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let slots = ext.get(p.extent as usize)?.as_ref()?;
        let at = |si: usize| {
            let s = slots[si];
            (s.member, self.phys(s, layout.slab_offset(p.row, p.in_unit)))
        };
        Some(Location {
            extent: p.extent,
            row: p.row,
            column: p.col,
            copies: (0..layout.copies())
                .map(|c| at(layout.data_slot(p.row, p.col, c)))
                .collect(),
            parity: (0..layout.parities())
                .map(|j| at(layout.parity_slot(p.row, j)))
                .collect(),
        })
    }

    /// The space's health with the members usable now.
    pub fn health(&self) -> SpaceHealth {
        self.health_of(&self.pool.members.snapshot())
    }

    fn health_of(&self, devs: &Devs) -> SpaceHealth {
        let epoch = self.pool.members.epoch();
        if let Some((e, h)) = &*guard(&self.shared.health_cache) {
            if *e == epoch {
                return h.clone();
            }
        }
        let usable: Vec<bool> = devs.iter().map(Option::is_some).collect();
        let ext = self
            .shared
            .extents
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let h = health(&self.shared.name, &self.shared.layout, &ext, &usable);
        *guard(&self.shared.health_cache) = Some((epoch, h.clone()));
        h
    }

    fn phys(&self, slot: Slot, in_slab: u64) -> u64 {
        self.data_start + u64::from(slot.slab) * self.slab_size + in_slab
    }

    fn failed(&self, reason: String) -> Error {
        SpacesError::SpaceFailed {
            space: self.shared.name.clone(),
            reason,
        }
        .into()
    }

    fn flush_members(&self) -> Result<()> {
        // With no write in flight, a flush makes every written chunk durable everywhere: the
        // write-intent bitmap can then be cleared.
        let quiet = self.pool.intent.quiet();
        let devs = self.pool.members.snapshot();
        let mut per: Vec<Vec<Request<'_>>> = devs
            .iter()
            .map(|d| {
                if d.is_some() {
                    vec![Request::flush()]
                } else {
                    Vec::new()
                }
            })
            .collect();
        run_members(&devs, &mut per);
        let mut clean = true;
        for (m, r) in per.iter().enumerate() {
            if let Some(Err(e)) = r.first().map(Request::result) {
                clean = false;
                self.pool.fail_member(m, &e.to_string());
            }
        }
        if quiet.is_some() && clean {
            self.pool.clear_bitmaps(false);
        }
        drop(quiet);
        match self.health() {
            SpaceHealth::Failed { reason } => Err(self.failed(reason)),
            _ => Ok(()),
        }
    }

    fn run_segment(&self, seg: &mut [Request<'_>], info: &DeviceInfo) {
        // Counted as waiting for the extent map until it returns (it takes the map's lock a
        // few times before its I/O): see `SpaceShared::let_waiting_io_in`.
        self.shared.io_waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.shared.io_waiting);
        for r in seg.iter_mut() {
            if let Err(e) = info.check(r) {
                r.complete(Err(e));
            }
        }
        if self.shared.deleted.load(Ordering::Acquire) {
            let e: Error =
                SpacesError::NoSuchSpace(format!("{} (deleted)", self.shared.name)).into();
            fail_remaining(seg, &e);
            return;
        }
        // A discard gives back the thin extents it covers whole (`Inner::release`). The rest of
        // it, and write-zeroes (which keeps the space allocated), become writes of zeroes,
        // except over thin extents not allocated, which read as zeroes already.
        for r in seg.iter_mut().filter(|r| {
            !r.is_complete() && matches!(r.op, Op::WriteZeroes { .. } | Op::Discard { .. })
        }) {
            let res = match r.op {
                Op::Discard { .. } => self.release_covered(r.offset(), r.len()),
                _ => Ok(()),
            }
            .and_then(|()| self.zero_range(r.offset(), r.len(), info));
            r.complete(res);
        }
        // A space beyond its tolerance refuses I/O before anything is written.
        if let SpaceHealth::Failed { reason } = self.health() {
            fail_remaining(seg, &self.failed(reason));
            return;
        }
        let writes = seg.iter().any(|r| !r.is_complete() && r.kind().is_write());
        if writes {
            if let Err(e) = self.pool.record_missing() {
                for r in seg
                    .iter_mut()
                    .filter(|r| !r.is_complete() && r.kind().is_write())
                {
                    r.complete(Err(e.clone()));
                }
            }
        }
        // Writes in flight hold the gate shared: the bitmap is cleared only when none is.
        let _gate = writes.then(|| self.pool.intent.writing());
        let mut tries = 0;
        let mut stale = 0;
        while tries <= MAX_MEMBERS {
            if seg.iter().all(Request::is_complete) {
                return;
            }
            // Thin extents allocated, then the write-intent bits of what the writes touch set,
            // on the map as it is now (its version, which the I/O checks).
            let version = seg
                .iter()
                .any(|r| !r.is_complete() && r.kind().is_write())
                .then(|| {
                    // Read first: a release or a rebuild's switch after it sends the writes
                    // round again.
                    let v = self.shared.map_version.load(Ordering::Acquire);
                    self.allocate_for(seg);
                    let chunks = self.dirty_chunks(seg);
                    for (m, e) in self.pool.intent.mark(&self.pool.members, &chunks) {
                        self.pool
                            .fail_member(m, &format!("write-intent bitmap: {e}"));
                    }
                    v
                });
            let devs = self.pool.members.snapshot();
            if let SpaceHealth::Failed { reason } = self.health_of(&devs) {
                fail_remaining(seg, &self.failed(reason));
                return;
            }
            let mut heal = Vec::new();
            let Some(failures) = self.run_once(seg, &devs, &mut heal, version) else {
                // The map changed since (a discard gave an extent back, a rebuild switched
                // one in): again, on the new map.
                stale += 1;
                if stale > 1000 {
                    fail_remaining(
                        seg,
                        &self.failed("the extent map kept changing under the writes".into()),
                    );
                    return;
                }
                continue;
            };
            tries += 1;
            let mut seen = BTreeSet::new();
            for (m, e) in failures {
                if seen.insert(m) {
                    self.pool.fail_member(m, &e.to_string());
                }
            }
            if !heal.is_empty() {
                self.heal(seg, &heal);
            }
        }
        fail_remaining(seg, &self.failed("members kept failing".into()));
    }

    /// Heals the windows reads found bad blocks in, with the space's I/O held off; the
    /// requests that read them run again, or fail if a block has no good source left.
    fn heal(&self, seg: &mut [Request<'_>], heal: &[Heal]) {
        let ext = self
            .shared
            .extents
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut windows: BTreeMap<(u64, u64), Vec<usize>> = BTreeMap::new();
        for h in heal {
            windows
                .entry((h.extent, h.window))
                .or_default()
                .push(h.parent);
        }
        let devs = self.pool.members.snapshot();
        for ((extent, window), parents) in windows {
            let Some(Some(slots)) = ext.get(extent as usize) else {
                continue;
            };
            let r = heal_window(
                &self.pool,
                &self.shared.layout,
                slots,
                &devs,
                (self.data_start, self.slab_size),
                window,
            );
            let err = match r {
                Ok(0) => continue,
                Ok(lost) => SpacesError::ChecksumMismatch {
                    space: self.shared.name.clone(),
                    detail: format!(
                        "extent {extent}: {lost} blocks of 512 bytes at slab offset {window} fail their checksum and no good copy or parity is left"
                    ),
                }
                .into(),
                Err(e) => e,
            };
            for pi in parents {
                if !seg[pi].is_complete() {
                    seg[pi].complete(Err(err.clone()));
                }
            }
        }
    }

    /// Gives back the allocated extents that `[offset, offset + len)` covers whole (the last
    /// extent counts as covered when the range reaches the end of the space).
    fn release_covered(&self, offset: u64, len: u64) -> Result<()> {
        let eb = self.shared.layout.extent_bytes();
        let end = offset + len;
        let first = offset.div_ceil(eb);
        let whole: Vec<u64> = {
            let map = self
                .shared
                .extents
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let last = if end >= self.shared.size() {
                map.len() as u64
            } else {
                end / eb
            };
            (first..last)
                .filter(|&e| map.get(e as usize).is_some_and(Option::is_some))
                .collect()
        };
        self.pool.release(&self.shared, &whole, end).map(drop)
    }

    /// Writes zeroes over `[offset, offset + len)`, 1 MiB at a time, skipping extents that are
    /// not allocated.
    fn zero_range(&self, offset: u64, len: u64, info: &DeviceInfo) -> Result<()> {
        static ZERO: [u8; 1 << 20] = [0; 1 << 20];
        let eb = self.shared.layout.extent_bytes();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let e = pos / eb;
            let ext_end = ((e + 1) * eb).min(end);
            let allocated = self
                .shared
                .extents
                .read()
                .unwrap_or_else(|p| p.into_inner())[e as usize]
                .is_some();
            if !allocated {
                pos = ext_end;
                continue;
            }
            let n = (ext_end - pos).min(ZERO.len() as u64);
            let mut one = [Request::write(pos, &ZERO[..n as usize])];
            self.run_segment(&mut one, info);
            one[0].result()?;
            pos += n;
        }
        Ok(())
    }

    /// The (member, slab, chunk) bits of every slot of every extent chunk the segment's writes
    /// touch.
    fn dirty_chunks(&self, seg: &[Request<'_>]) -> BTreeSet<(usize, u32, u64)> {
        let layout = self.shared.layout;
        let chunk = self.slab_size / crate::format::CHUNKS_PER_SLAB;
        let ext = self
            .shared
            .extents
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut out = BTreeSet::new();
        for r in seg
            .iter()
            .filter(|r| !r.is_complete() && r.kind().is_write())
        {
            for p in layout.pieces(r.offset(), r.len()) {
                let Some(slots) = &ext[p.extent as usize] else {
                    continue;
                };
                let off = layout.slab_offset(p.row, p.in_unit);
                for c in off / chunk..=(off + p.len - 1) / chunk {
                    for s in slots {
                        out.insert((s.member, s.slab, c));
                    }
                }
            }
        }
        out
    }

    /// Allocates the thin extents the segment's writes need.
    fn allocate_for(&self, seg: &mut [Request<'_>]) {
        let eb = self.shared.layout.extent_bytes();
        let need: BTreeSet<u64> = {
            let ext = self
                .shared
                .extents
                .read()
                .unwrap_or_else(|p| p.into_inner());
            seg.iter()
                .filter(|r| !r.is_complete() && r.kind().is_write() && !r.is_empty())
                .flat_map(|r| r.offset() / eb..=(r.offset() + r.len() - 1) / eb)
                .filter(|&e| ext[e as usize].is_none())
                .collect()
        };
        if need.is_empty() {
            return;
        }
        let need: Vec<u64> = need.into_iter().collect();
        match self.pool.allocate(&self.shared, &need) {
            Ok(()) => {}
            Err(e) => {
                let ext = self
                    .shared
                    .extents
                    .read()
                    .unwrap_or_else(|p| p.into_inner());
                for r in seg.iter_mut() {
                    if !r.is_complete()
                        && r.kind().is_write()
                        && (r.offset() / eb..=(r.offset() + r.len() - 1) / eb)
                            .any(|x| ext[x as usize].is_none())
                    {
                        r.complete(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// One pass over the incomplete requests. Completes what succeeded; leaves incomplete what a
    /// member failure touched; returns the failures. `None`, with nothing done, if writes are
    /// left and the extent map is no longer at `version`.
    fn run_once(
        &self,
        seg: &mut [Request<'_>],
        devs: &Devs,
        heal: &mut Vec<Heal>,
        version: Option<u64>,
    ) -> Option<Vec<(usize, Error)>> {
        let layout = self.shared.layout;
        let ext = self
            .shared
            .extents
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if version.is_some_and(|v| v != self.shared.map_version.load(Ordering::Acquire)) {
            return None;
        }
        self.shared.io_entered.fetch_add(1, Ordering::AcqRel);
        let rebuilding = self
            .shared
            .rebuilding
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if rebuilding.is_some() && seg.iter().any(|r| !r.is_complete() && r.kind().is_write()) {
            self.shared
                .writes_while_rebuilding
                .fetch_add(1, Ordering::AcqRel);
        }
        let n = devs.len();
        let parity = layout.parities() > 0;
        let k = layout.copies();
        let mut slow = Vec::new();
        let mut direct = vec![false; seg.len()];
        let mut errors: Vec<Option<Error>> = vec![None; seg.len()];
        let mut retry = vec![false; seg.len()];
        let mut failures = Vec::new();
        // Reads to verify once done: (parent, offset in it, length, slot, offset in the slab,
        // extent, (index of the member request, offset in it)).
        let mut checks: Vec<ReadCheck> = Vec::new();
        // The stored checksums of what each member request read, computed by the member's
        // thread once its batch completed.
        let got_crcs: Vec<Vec<Option<Vec<u32>>>>;
        // Checksum pages the reads need that are not cached: read in the same batches.
        // Checksum pages to read: (member, first page, its offset on the member, pages).
        let mut loads: Vec<(usize, u64, u64, u64)> = Vec::new();
        let mut wanted_at: Vec<(usize, u64, u64)> = Vec::new();
        let mut load_bufs: Vec<AlignedBuf>;
        let mut loads_drops: Option<u64> = None;
        // Per check, the index of its range among its member request's ranges.
        let mut check_at: Vec<usize> = Vec::with_capacity(seg.len());
        {
            // Checksum pages a small batch sends with its data.
            let mut page_store: Vec<PageWrite> = Vec::new();
            let mut per: Vec<Vec<Request<'_>>> = (0..n).map(|_| Vec::new()).collect();
            let mut own: Vec<Vec<usize>> = (0..n).map(|_| Vec::new()).collect();
            // Written pieces whose checksums go to (member, slab)s: targets, first block, data.
            let mut crc_src: Vec<CrcSource<vstor_core::WriteBufs<'_>>> = Vec::new();
            for (pi, req) in seg.iter_mut().enumerate() {
                if req.is_complete() {
                    continue;
                }
                let pieces: Vec<Piece> = layout.pieces(req.offset(), req.len()).collect();
                let is_write = matches!(req.op, Op::Write { .. });
                let data_lost = |p: &Piece| match &ext[p.extent as usize] {
                    Some(s) => devs[s[layout.data_slot(p.row, p.col, 0)].member].is_none(),
                    None => false,
                };
                if parity && (is_write || pieces.iter().any(data_lost)) {
                    slow.push(pi);
                    continue;
                }
                direct[pi] = true;
                let lens = pieces.iter().map(|p| p.len as usize);
                match &mut req.op {
                    Op::Read { bufs, .. } => {
                        for (p, mut b) in pieces.iter().zip(carve_read_bufs(bufs, lens)) {
                            let Some(slots) = &ext[p.extent as usize] else {
                                zero_bufs(&mut b);
                                continue;
                            };
                            let first = p.row as usize % k;
                            let slot = (0..k)
                                .map(|c| slots[layout.data_slot(p.row, p.col, (first + c) % k)])
                                .find(|s| devs[s.member].is_some());
                            match slot {
                                Some(s) => {
                                    let in_slab = layout.slab_offset(p.row, p.in_unit);
                                    let off = self.phys(s, in_slab);
                                    let at = push_read(
                                        &mut per[s.member],
                                        &mut own[s.member],
                                        pi,
                                        off,
                                        b,
                                    );
                                    checks.push((pi, p.at, p.len, s, in_slab, p.extent, at));
                                }
                                None => {
                                    errors[pi] = Some(self.failed(format!(
                                        "no usable copy of extent {} column {}",
                                        p.extent, p.col
                                    )))
                                }
                            }
                        }
                    }
                    Op::Write { bufs, .. } => {
                        for (p, b) in pieces.iter().zip(carve_write_bufs(bufs, lens)) {
                            let Some(slots) = &ext[p.extent as usize] else {
                                errors[pi] = Some(
                                    self.failed(format!("extent {} is not allocated", p.extent)),
                                );
                                continue;
                            };
                            let shadows = match &*rebuilding {
                                Some((e, t)) if *e == p.extent => &t[..],
                                _ => &[],
                            };
                            let block = layout.slab_offset(p.row, p.in_unit) / csum::BLOCK;
                            let mut targets = Vec::new();
                            for c in 0..k {
                                let si = layout.data_slot(p.row, p.col, c);
                                let s = slots[si];
                                if devs[s.member].is_some() {
                                    targets.push((s.member, s.slab));
                                }
                                if let Some(&(_, new)) = shadows.iter().find(|x| x.0 == si) {
                                    targets.push((new.member, new.slab));
                                    // The slab being rebuilt gets the write too.
                                    let off = self.phys(new, layout.slab_offset(p.row, p.in_unit));
                                    push_write(
                                        &mut per[new.member],
                                        &mut own[new.member],
                                        pi,
                                        off,
                                        b.clone(),
                                    );
                                }
                                if devs[s.member].is_some() {
                                    let off = self.phys(s, layout.slab_offset(p.row, p.in_unit));
                                    push_write(
                                        &mut per[s.member],
                                        &mut own[s.member],
                                        pi,
                                        off,
                                        b.clone(),
                                    );
                                }
                            }
                            crc_src.push((targets, block, b));
                        }
                    }
                    _ => {}
                }
            }
            let mut wanted = BTreeSet::new();
            for (_, _, len, s, in_slab, _, _) in &checks {
                let (missing, drops) = self.pool.csums.missing(
                    s.member,
                    s.slab,
                    in_slab / csum::BLOCK,
                    len / csum::BLOCK,
                );
                // The cache's drop count before any of these pages is read.
                loads_drops.get_or_insert(drops);
                for (page, off) in missing {
                    if wanted.insert((s.member, page)) {
                        wanted_at.push((s.member, page, off));
                    }
                }
            }
            // Adjacent pages of a member in one read each.
            wanted_at.sort_unstable();
            for (m, page, off) in wanted_at {
                match loads.last_mut() {
                    Some((lm, first, loff, n))
                        if *lm == m && *first + *n == page && *loff + *n * csum::PAGE == off =>
                    {
                        *n += 1
                    }
                    _ => loads.push((m, page, off, 1)),
                }
            }
            load_bufs = loads
                .iter()
                .map(|l| AlignedBuf::new((l.3 * csum::PAGE) as usize))
                .collect();
            for ((m, _, off, _), buf) in loads.iter().zip(load_bufs.iter_mut()) {
                per[*m].push(Request::read(*off, &mut buf[..]));
                own[*m].push(usize::MAX);
            }
            // The checksums of what is written are computed, and their pages written, while
            // the data is in flight. Each read is checksummed as it completes: one CRC per
            // range a check covers (its position kept in `check_at`).
            let mut verify: Vec<Vec<Vec<(u64, u64)>>> = per
                .iter()
                .map(|reqs| vec![Vec::new(); reqs.len()])
                .collect();
            for (_, _, len, s, _, _, (ri, in_req)) in &checks {
                let r = &mut verify[s.member][*ri];
                check_at.push(r.len());
                r.push((*in_req, *len));
            }
            let (f, crcs) =
                self.run_with_sums(devs, &mut per, &mut page_store, &verify, Vec::new(), || {
                    let mut sums = Vec::new();
                    for (targets, block, b) in &crc_src {
                        let crcs = csum::crcs_iov(b, 0, b.iter().map(|x| x.len()).sum());
                        for &(m, slab) in targets {
                            sums.push((m, slab, *block, crcs.clone()));
                        }
                    }
                    sums
                });
            failures.extend(f);
            got_crcs = crcs;
            for (m, reqs) in per.iter().enumerate() {
                for (r, &pi) in reqs.iter().zip(&own[m]) {
                    if let Err(e) = r.result() {
                        failures.push((m, e));
                        if pi != usize::MAX {
                            retry[pi] = true;
                        }
                    }
                }
            }
        }
        let failed: BTreeSet<usize> = failures.iter().map(|f| f.0).collect();
        let pages: Vec<(usize, u64, Vec<u8>)> = loads
            .into_iter()
            .zip(load_bufs)
            .filter(|((m, ..), _)| !failed.contains(m))
            .flat_map(|((m, first, _, _), buf)| {
                buf.chunks_exact(csum::PAGE as usize)
                    .enumerate()
                    .map(|(k, page)| (m, first + k as u64, page.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
        if let Some(drops) = loads_drops {
            self.pool.csums.insert(pages, drops);
        }
        // Verify what was read; a block whose checksum fails is healed and read again.
        for ((pi, at, len, s, in_slab, extent, (ri, _)), k) in checks.into_iter().zip(check_at) {
            // Every piece of a request is checked, also after one failed: all its bad windows
            // are healed in one round (a member that lost its contents has one in every piece).
            if errors[pi].is_some() {
                continue;
            }
            let Op::Read { bufs, .. } = &seg[pi].op else {
                continue;
            };
            let Some(dev) = devs[s.member].as_ref() else {
                continue;
            };
            let want = match self.pool.csums.get(
                &**dev,
                s.member,
                s.slab,
                in_slab / csum::BLOCK,
                len / csum::BLOCK,
            ) {
                Ok(w) => w,
                Err(e) => {
                    failures.push((s.member, e));
                    retry[pi] = true;
                    continue;
                }
            };
            // One CRC over the range against the joined stored checksums; only a range that
            // differs is checked block by block.
            let whole = got_crcs
                .get(s.member)
                .and_then(|v| v.get(ri))
                .and_then(Option::as_ref)
                .and_then(|v| v.get(k).copied())
                .unwrap_or_else(|| csum::crc_iov(bufs, at as usize, len as usize));
            if whole == csum::joined(&want) {
                continue;
            }
            let got = csum::crcs_iov(bufs, at as usize, len as usize);
            for (b, (g, w)) in got.iter().zip(&want).enumerate() {
                if g != w {
                    let off = in_slab + b as u64 * csum::BLOCK;
                    if let Some(good) = self.pool.healed_block(s, off) {
                        if let Op::Read { bufs, .. } = &mut seg[pi].op {
                            copy_into_bufs(bufs, (at + b as u64 * csum::BLOCK) as usize, &good);
                        }
                        continue;
                    }
                    heal.push(Heal {
                        extent,
                        window: off - off % csum::PAGE,
                        parent: pi,
                    });
                    retry[pi] = true;
                }
            }
        }
        for (pi, req) in seg.iter_mut().enumerate() {
            if direct[pi] && !retry[pi] {
                req.complete(errors[pi].take().map_or(Ok(()), Err));
            }
        }
        if !slow.is_empty() {
            self.slow(
                seg,
                &slow,
                devs,
                &ext,
                rebuilding.as_ref(),
                &mut failures,
                heal,
            );
        }
        Some(failures)
    }

    pub(crate) fn shard_slot(&self, row: u64, shard: usize) -> usize {
        let l = &self.shared.layout;
        if shard < l.data_columns {
            l.data_slot(row, shard, 0)
        } else {
            l.parity_slot(row, shard - l.data_columns)
        }
    }

    /// Parity writes and degraded parity reads, a row at a time under the row's stripe lock.
    #[allow(clippy::too_many_arguments)]
    fn slow(
        &self,
        seg: &mut [Request<'_>],
        parents: &[usize],
        devs: &Devs,
        ext: &[Option<Vec<Slot>>],
        rebuilding: Option<&Rebuild>,
        failures: &mut Vec<(usize, Error)>,
        heal: &mut Vec<Heal>,
    ) {
        let layout = self.shared.layout;
        let (d, w) = (layout.data_columns, layout.width);
        let mut rows: BTreeMap<(u64, u64), RowOp> = BTreeMap::new();
        let mut zero_reads: Vec<(usize, Piece)> = Vec::new();
        for &pi in parents {
            let req = &seg[pi];
            let is_write = matches!(req.op, Op::Write { .. });
            for p in layout.pieces(req.offset(), req.len()) {
                if ext[p.extent as usize].is_none() {
                    // Writes were allocated before; a read of a thin hole is zeroes.
                    zero_reads.push((pi, p));
                    continue;
                }
                let r = rows.entry((p.extent, p.row)).or_insert_with(|| RowOp {
                    extent: p.extent,
                    row: p.row,
                    lo: p.in_unit,
                    hi: p.in_unit + p.len,
                    pieces: Vec::new(),
                    shards: Vec::new(),
                    rebuild: false,
                    full: false,
                    direct: false,
                });
                r.lo = r.lo.min(p.in_unit);
                r.hi = r.hi.max(p.in_unit + p.len);
                r.pieces.push((pi, p, is_write));
            }
        }
        let mut stripe_ids: Vec<usize> = rows
            .keys()
            .map(|&(e, r)| {
                (e.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ r.wrapping_mul(0xc2b2_ae3d_27d4_eb4f))
                    as usize
                    % STRIPES
            })
            .collect();
        stripe_ids.sort_unstable();
        stripe_ids.dedup();
        let _locks: Vec<_> = stripe_ids
            .iter()
            .map(|&i| guard(&self.shared.stripes[i]))
            .collect();

        // Plan and issue the reads each row needs.
        for row in rows.values_mut() {
            let slots = ext[row.extent as usize].as_ref().expect("allocated");
            let usable =
                |shard: usize| devs[slots[self.shard_slot(row.row, shard)].member].is_some();
            let len = (row.hi - row.lo) as usize;
            let writes = row.pieces.iter().any(|x| x.2);
            let mut need = vec![false; d];
            if writes {
                for (c, n) in need.iter_mut().enumerate() {
                    *n = !covered(&row.pieces, c, row.lo, row.hi);
                }
            }
            for (_, p, wr) in &row.pieces {
                if !wr {
                    need[p.col] = true;
                }
            }
            row.shards = (0..w).map(|_| None).collect();
            row.full = writes && !need.iter().any(|&n| n);
            row.rebuild = (0..d).any(|c| need[c] && !usable(c));
            // A row the journal logs needs its data shards in buffers of its own.
            row.direct = writes
                && !self
                    .pool
                    .journal
                    .row_logged(self.shared.id, row.extent, row.row)
                && (0..d).all(|c| {
                    let mut of_col = row.pieces.iter().filter(|x| x.1.col == c);
                    match (of_col.next(), of_col.next()) {
                        (Some((pi, p, true)), None) => {
                            p.in_unit == row.lo
                                && p.in_unit + p.len == row.hi
                                && write_slice(&seg[*pi], p.at, p.len).is_some()
                        }
                        _ => false,
                    }
                });
            let rebuild = row.rebuild;
            for (s, shard) in row.shards.iter_mut().enumerate() {
                if (rebuild && usable(s)) || (!rebuild && s < d && need[s]) {
                    *shard = Some(self.take_buf(len));
                }
            }
        }
        if !self.row_io(
            &mut rows,
            &BTreeMap::new(),
            devs,
            ext,
            None,
            failures,
            false,
        ) {
            self.give_rows(rows);
            return;
        }
        // Verify every shard read: a bad block is healed first (by the caller, with the
        // space's I/O held off) and the rows run again, so a bad block is never carried into
        // a parity or a reconstruction.
        let before = (heal.len(), failures.len());
        for row in rows.values_mut() {
            let slots = ext[row.extent as usize].as_ref().expect("allocated");
            let in_slab = layout.slab_offset(row.row, row.lo);
            let n = (row.hi - row.lo) / csum::BLOCK;
            for (shard, buf) in row.shards.iter_mut().enumerate() {
                let Some(buf) = buf else { continue };
                let s = slots[self.shard_slot(row.row, shard)];
                let Some(dev) = devs[s.member].as_ref() else {
                    continue;
                };
                let want =
                    match self
                        .pool
                        .csums
                        .get(&**dev, s.member, s.slab, in_slab / csum::BLOCK, n)
                    {
                        Ok(w) => w,
                        Err(e) => {
                            failures.push((s.member, e));
                            continue;
                        }
                    };
                if csum::crc_iov(&[&buf[..]], 0, buf.len()) == csum::joined(&want) {
                    continue;
                }
                for (b, (g, w)) in csum::crcs(buf).iter().zip(&want).enumerate() {
                    if g != w {
                        let off = in_slab + b as u64 * csum::BLOCK;
                        if let Some(good) = self.pool.healed_block(s, off) {
                            let at = b * csum::BLOCK as usize;
                            buf[at..at + csum::BLOCK as usize].copy_from_slice(&good);
                            continue;
                        }
                        for (pi, _, _) in &row.pieces {
                            heal.push(Heal {
                                extent: row.extent,
                                window: off - off % csum::PAGE,
                                parent: *pi,
                            });
                        }
                    }
                }
            }
        }
        if (heal.len(), failures.len()) != before {
            self.give_rows(rows);
            return;
        }
        // Rebuild, apply the writes, recompute parity.
        for row in rows.values_mut().filter(|r| !r.direct) {
            let len = (row.hi - row.lo) as usize;
            if row.rebuild && !self.rebuild_row(&mut row.shards, d, len) {
                for (pi, _, _) in &row.pieces {
                    seg[*pi].complete(Err(self.failed(format!(
                        "extent {} row {} cannot be rebuilt",
                        row.extent, row.row
                    ))));
                }
                row.shards.iter_mut().for_each(|s| self.give_buf(s.take()));
                continue;
            }
            let writes = row.pieces.iter().any(|x| x.2);
            for (pi, p, wr) in &row.pieces {
                if *wr {
                    if row.shards[p.col].is_none() {
                        row.shards[p.col] = Some(self.take_buf(len));
                    }
                    let shard = row.shards[p.col].as_mut().expect("just set");
                    let at = (p.in_unit - row.lo) as usize;
                    if let Op::Write { bufs, .. } = &seg[*pi].op {
                        copy_from_bufs(bufs, p.at as usize, &mut shard[at..at + p.len as usize]);
                    }
                }
            }
            for (pi, p, wr) in &row.pieces {
                if !*wr {
                    let at = (p.in_unit - row.lo) as usize;
                    let src = row.shards[p.col].as_deref().expect("read or rebuilt");
                    if let Op::Read { bufs, .. } = &mut seg[*pi].op {
                        copy_into_bufs(bufs, p.at as usize, &src[at..at + p.len as usize]);
                    }
                }
            }
            if writes {
                for s in row.shards[d..].iter_mut().filter(|s| s.is_none()) {
                    *s = Some(self.take_buf(len));
                }
                let (data, par) = row.shards.split_at_mut(d);
                let data: Vec<&[u8]> = data.iter().map(|s| s.as_deref().expect("data")).collect();
                let mut par: Vec<&mut [u8]> = par
                    .iter_mut()
                    .map(|s| &mut s.as_mut().expect("just set")[..])
                    .collect();
                code::encode(&data, &mut par);
                // Keep only what is written: the written data columns and every parity.
                let written: Vec<bool> = (0..w)
                    .map(|s| s >= d || row.pieces.iter().any(|x| x.2 && x.1.col == s))
                    .collect();
                for (s, sh) in row.shards.iter_mut().enumerate() {
                    if !written[s] {
                        self.give_buf(sh.take());
                    }
                }
            } else {
                row.shards.iter_mut().for_each(|s| self.give_buf(s.take()));
            }
        }
        // Full-stripe rows: the parity straight from the callers' buffers.
        let direct: BTreeMap<(u64, u64), Vec<&[u8]>> = rows
            .iter()
            .filter(|(_, r)| r.direct)
            .map(|(k, r)| {
                let data = (0..d)
                    .map(|c| {
                        let (pi, p, _) = r.pieces.iter().find(|x| x.1.col == c).expect("planned");
                        write_slice(&seg[*pi], p.at, p.len).expect("checked")
                    })
                    .collect();
                (*k, data)
            })
            .collect();
        // Their parity buffers; `row_io` encodes them (beside the data's writes when it can).
        for k in direct.keys() {
            let row = rows.get_mut(k).expect("planned");
            let len = (row.hi - row.lo) as usize;
            for s in row.shards[d..].iter_mut() {
                *s = Some(self.take_buf(len));
            }
        }
        // The journal (if the pool has one) goes first; it gives the rows back.
        let wrote = self.write_rows(rows, &direct, devs, ext, rebuilding, failures);
        drop(direct);
        if !wrote {
            // Reads of the batch are done; the writes run again without the failed member.
            for &pi in parents {
                if matches!(seg[pi].op, Op::Read { .. }) && !seg[pi].is_complete() {
                    seg[pi].complete(Ok(()));
                }
            }
            return;
        }
        for (pi, p) in zero_reads {
            if let Op::Read { bufs, .. } = &mut seg[pi].op {
                copy_into_bufs(bufs, p.at as usize, &vec![0u8; p.len as usize]);
            }
        }
        for &pi in parents {
            if !seg[pi].is_complete() {
                seg[pi].complete(Ok(()));
            }
        }
    }

    /// A page-aligned buffer of `len` bytes (so O_DIRECT members need no bounce copy),
    /// recycled when one of that size is at hand: a fresh large allocation faults every page
    /// in, which costs more than the parity arithmetic. Its contents are unspecified: every
    /// caller fills it whole (a read, writes that cover it, or the parity).
    pub(crate) fn take_buf(&self, len: usize) -> AlignedBuf {
        let mut pool = guard(&self.shared.bufs);
        match pool.iter().position(|b| b.len() == len) {
            Some(i) => pool.swap_remove(i),
            None => AlignedBuf::new(len),
        }
    }

    /// Rebuilds the lost shards of a row (the degraded path: copies through `Vec`s).
    fn rebuild_row(&self, shards: &mut [Option<AlignedBuf>], d: usize, len: usize) -> bool {
        let mut v: Vec<Option<Vec<u8>>> = shards
            .iter()
            .map(|s| s.as_deref().map(<[u8]>::to_vec))
            .collect();
        if !code::reconstruct(&mut v, d, len) {
            return false;
        }
        for (s, r) in shards.iter_mut().zip(v) {
            if s.is_none() {
                let mut b = self.take_buf(len);
                b.copy_from_slice(&r.expect("rebuilt"));
                *s = Some(b);
            }
        }
        true
    }

    fn give_buf(&self, buf: Option<AlignedBuf>) {
        if let Some(b) = buf {
            let mut pool = guard(&self.shared.bufs);
            if pool.len() < 256 {
                pool.push(b);
            }
        }
    }

    pub(crate) fn give_rows(&self, rows: BTreeMap<(u64, u64), RowOp>) {
        for row in rows.into_values() {
            for s in row.shards {
                self.give_buf(s);
            }
        }
    }

    /// Reads into (or writes from) every shard buffer of the rows, skipping unusable members.
    /// Returns false (and adds the failures) if a member failed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn row_io(
        &self,
        rows: &mut BTreeMap<(u64, u64), RowOp>,
        direct: &BTreeMap<(u64, u64), Vec<&[u8]>>,
        devs: &Devs,
        ext: &[Option<Vec<Slot>>],
        rebuilding: Option<&Rebuild>,
        failures: &mut Vec<(usize, Error)>,
        write: bool,
    ) -> bool {
        let layout = self.shared.layout;
        let n = devs.len();
        // Written shards whose checksums go to (member, slab)s: targets, first block, data.
        let mut crc_src: Vec<CrcSource<&[u8]>> = Vec::new();
        // Checksum pages a small batch sends with its data.
        let mut page_store: Vec<PageWrite> = Vec::new();
        let mut per: Vec<Vec<Request<'_>>> = (0..n).map(|_| Vec::new()).collect();
        let d = layout.data_columns;
        // Rows written from the callers' buffers have their parity encoded here: beside the
        // data's writes (on the checksum thread) when the batch is large enough to overlap,
        // else now.
        let direct_bytes: u64 = rows
            .iter()
            .filter(|(k, _)| direct.contains_key(k))
            .map(|(_, r)| (r.hi - r.lo) * layout.width as u64)
            .sum();
        let overlap_parity = write && direct_bytes >= OVERLAP_MIN;
        let mut late: Vec<LateParity<'_>> = Vec::new();
        for (key, row) in rows.iter_mut() {
            let slots = ext[row.extent as usize].as_ref().expect("allocated");
            let off = layout.slab_offset(row.row, row.lo);
            if write {
                let shadows = match rebuilding {
                    Some((e, t)) if *e == row.extent => &t[..],
                    _ => &[],
                };
                let given = direct.get(key);
                if let Some(data) = given {
                    let mut parity: Vec<AlignedBuf> = row.shards[d..]
                        .iter_mut()
                        .map(|s| s.take().expect("allocated by the caller"))
                        .collect();
                    if overlap_parity {
                        let dests = (d..layout.width)
                            .map(|shard| {
                                let si = self.shard_slot(row.row, shard);
                                let mut t = Vec::new();
                                if let Some(&(_, new)) = shadows.iter().find(|x| x.0 == si) {
                                    t.push((new.member, self.phys(new, off), new.slab));
                                }
                                let s = slots[si];
                                if devs[s.member].is_some() {
                                    t.push((s.member, self.phys(s, off), s.slab));
                                }
                                t
                            })
                            .collect();
                        late.push(LateParity {
                            data,
                            parity,
                            dests,
                            block: off / csum::BLOCK,
                        });
                    } else {
                        let mut par: Vec<&mut [u8]> =
                            parity.iter_mut().map(|b| &mut b[..]).collect();
                        code::encode(data, &mut par);
                        for (s, b) in row.shards[d..].iter_mut().zip(parity) {
                            *s = Some(b);
                        }
                    }
                }
                for (shard, buf) in row.shards.iter().enumerate() {
                    let buf: &[u8] = match (given.and_then(|g| g.get(shard)), buf) {
                        (Some(g), _) => g,
                        (None, Some(b)) => b,
                        (None, None) => continue,
                    };
                    let si = self.shard_slot(row.row, shard);
                    let mut targets = Vec::new();
                    if let Some(&(_, new)) = shadows.iter().find(|x| x.0 == si) {
                        // The slab being rebuilt gets the write too.
                        append_write(&mut per[new.member], self.phys(new, off), buf);
                        targets.push((new.member, new.slab));
                    }
                    let s = slots[si];
                    if devs[s.member].is_some() {
                        append_write(&mut per[s.member], self.phys(s, off), buf);
                        targets.push((s.member, s.slab));
                    }
                    crc_src.push((targets, off / csum::BLOCK, buf));
                }
                continue;
            }
            for (shard, buf) in row.shards.iter_mut().enumerate() {
                let Some(buf) = buf else { continue };
                let s = slots[self.shard_slot(row.row, shard)];
                if devs[s.member].is_some() {
                    per[s.member].push(Request::read(self.phys(s, off), &mut buf[..]));
                }
            }
        }
        let before = failures.len();
        // The checksums of what is written are computed, and their pages written, while the
        // shards are in flight.
        let (f, _) = self.run_with_sums(devs, &mut per, &mut page_store, &[], late, || {
            let mut sums = Vec::new();
            for (targets, block, buf) in &crc_src {
                let crcs = csum::crcs(buf);
                for &(m, slab) in targets {
                    sums.push((m, slab, *block, crcs.clone()));
                }
            }
            sums
        });
        failures.extend(f);
        for (m, reqs) in per.iter().enumerate() {
            for r in reqs {
                if let Err(e) = r.result() {
                    failures.push((m, e));
                }
            }
        }
        failures.len() == before
    }

    /// Runs each member's batch (as [`run_members`]) with the checksums `sums` computes of what
    /// the batches write: set in the checksum cache and their pages written, under the pages'
    /// locks. A batch writing [`OVERLAP_MIN`] bytes or more computes the checksums and writes
    /// the pages (every member's at once) on a second thread while this one drives the data; a
    /// smaller one computes them first and sends each member's pages in the same submission as
    /// its data (kept in `store`), as a thread would cost it more than the checksums. The
    /// ranges of reads in `verify` (per member, per request: offset and length in the request)
    /// get a CRC-32C each ([`csum::crc_iov`]) as the read completes,
    /// while the rest of the batch is in flight.
    /// Returns failures of the checksum updates, and those checksums (per member, per
    /// request).
    #[allow(clippy::type_complexity)]
    fn run_with_sums<'a>(
        &self,
        devs: &Devs,
        per: &mut [Vec<Request<'a>>],
        store: &'a mut Vec<PageWrite>,
        verify: &[Vec<Vec<(u64, u64)>>],
        late: Vec<LateParity<'_>>,
        sums: impl FnOnce() -> Vec<csum::SumRun> + Send,
    ) -> (Vec<(usize, Error)>, Vec<Vec<Option<Vec<u32>>>>) {
        let write_bytes: u64 = per
            .iter()
            .flatten()
            .filter(|x| matches!(x.op, Op::Write { .. }))
            .map(Request::len)
            .sum();
        let overlap = write_bytes >= OVERLAP_MIN || !late.is_empty();
        let early = write_bytes > 0 && !overlap;
        let mut sums = Some(sums);
        let mut failures = Vec::new();
        let mut own_len: Vec<usize> = Vec::new();
        let _early_locks = if early {
            let sums = csum::join_runs(sums.take().expect("once")());
            let locks = self
                .pool
                .csums
                .lock_pages(sums.iter().map(|x| (x.0, x.1, x.2, x.3.len() as u64)));
            *store = self.set_sums(devs, &sums, &mut failures);
            let store: &'a Vec<PageWrite> = store;
            own_len = per.iter().map(Vec::len).collect();
            for (m, off, buf) in store {
                per[*m].push(Request::write(*off, &buf[..]));
            }
            locks
        } else {
            Vec::new()
        };
        let mut got: Vec<Vec<Option<Vec<u32>>>> =
            per.iter().map(|reqs| vec![None; reqs.len()]).collect();
        // Each read to verify is checksummed as soon as it completes, while the rest of the
        // batch is still in flight.
        let checksum = |m: usize, i: usize, r: &Request<'_>| {
            let ranges = verify
                .get(m)
                .and_then(|v| v.get(i))
                .map_or(&[][..], |v| &v[..]);
            if let (Op::Read { bufs, .. }, Ok(()), false) = (&r.op, r.result(), ranges.is_empty()) {
                got[m][i] = Some(
                    ranges
                        .iter()
                        .map(|&(at, len)| csum::crc_iov(bufs, at as usize, len as usize))
                        .collect(),
                );
            }
        };
        if !overlap {
            run_members_with(devs, per, checksum);
        } else {
            std::thread::scope(|sc| {
                // One thread computes the checksums and writes their pages (every member's
                // at once) while this one drives the data.
                let pages = sc.spawn(|| {
                    let mut failures = Vec::new();
                    let mut late = late;
                    let mut sums = sums.take().expect("once")();
                    for l in &mut late {
                        let mut par: Vec<&mut [u8]> =
                            l.parity.iter_mut().map(|b| &mut b[..]).collect();
                        code::encode(l.data, &mut par);
                        for (buf, dests) in l.parity.iter().zip(&l.dests) {
                            let crcs = csum::crcs(buf);
                            for &(m, _, slab) in dests {
                                sums.push((m, slab, l.block, crcs.clone()));
                            }
                        }
                    }
                    let sums = csum::join_runs(sums);
                    let _page_locks = self
                        .pool
                        .csums
                        .lock_pages(sums.iter().map(|x| (x.0, x.1, x.2, x.3.len() as u64)));
                    let pages = self.set_sums(devs, &sums, &mut failures);
                    let mut by_member: Vec<Vec<Request<'_>>> =
                        (0..devs.len()).map(|_| Vec::new()).collect();
                    for (m, off, buf) in &pages {
                        by_member[*m].push(Request::write(*off, &buf[..]));
                    }
                    for l in &late {
                        for (buf, dests) in l.parity.iter().zip(&l.dests) {
                            for &(m, at, _) in dests {
                                append_write(&mut by_member[m], at, &buf[..]);
                            }
                        }
                    }
                    run_members(devs, &mut by_member);
                    for (m, reqs) in by_member.iter().enumerate() {
                        if let Some(e) = reqs.iter().find_map(|r| r.result().err()) {
                            failures.push((m, e));
                        }
                    }
                    drop(by_member);
                    (failures, late)
                });
                run_members_with(devs, per, checksum);
                let (f, late) = pages.join().expect("the checksum thread does not panic");
                failures.extend(f);
                for l in late {
                    l.parity.into_iter().for_each(|b| self.give_buf(Some(b)));
                }
            });
        }
        // The page writes added to small batches: their failures, then out of the batches.
        for (m, &n) in own_len.iter().enumerate() {
            for r in &per[m][n..] {
                if let Err(e) = r.result() {
                    failures.push((m, e));
                }
            }
            per[m].truncate(n);
        }
        (failures, got)
    }

    /// Sets checksum updates in the cache (the caller holds their pages' locks) and returns
    /// the page writes that make them durable, adjacent pages merged; failures are added.
    fn set_sums(
        &self,
        devs: &Devs,
        sums: &[csum::SumRun],
        failures: &mut Vec<(usize, Error)>,
    ) -> Vec<PageWrite> {
        let mut pages: Vec<PageWrite> = Vec::new();
        for (m, slab, block, crcs) in sums {
            let Some(dev) = devs[*m].as_ref() else {
                continue;
            };
            match self.pool.csums.set(&**dev, *m, *slab, *block, crcs) {
                Ok(w) => pages.extend(w),
                Err(e) => failures.push((*m, e)),
            }
        }
        csum::merge_pages(pages)
    }
}

/// The `len` bytes at `at` of a write request's data, if they lie in one of its buffers.
fn write_slice<'r>(req: &'r Request<'_>, at: u64, len: u64) -> Option<&'r [u8]> {
    let Op::Write { bufs, .. } = &req.op else {
        return None;
    };
    let (mut at, len) = (at as usize, len as usize);
    for b in bufs.iter() {
        if at < b.len() {
            return b.get(at..at + len);
        }
        at -= b.len();
    }
    None
}

/// Whether the write pieces of data column `col` cover `[lo, hi)`.
fn covered(pieces: &[(usize, Piece, bool)], col: usize, lo: u64, hi: u64) -> bool {
    let mut iv: Vec<(u64, u64)> = pieces
        .iter()
        .filter(|(_, p, w)| *w && p.col == col)
        .map(|(_, p, _)| (p.in_unit, p.in_unit + p.len))
        .collect();
    iv.sort_unstable();
    let mut reach = lo;
    for (a, b) in iv {
        if a > reach {
            return false;
        }
        reach = reach.max(b);
    }
    reach >= hi
}

impl BlockDevice for Space {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            capacity: self.shared.size(),
            logical_sector_size: self.shared.logical,
            physical_sector_size: self.shared.physical,
            mem_alignment: self.shared.align,
            read_only: self.pool.read_only,
            discard_zeroes: true,
            supports: Supports {
                flush: true,
                discard: true,
                write_zeroes: true,
                resize: !self.pool.read_only,
            },
        }
    }

    /// Grows the space (see [`Pool::resize_space`]); a smaller size is refused.
    fn resize(&self, new_capacity: u64) -> Result<()> {
        self.pool
            .resize_space(self.shared.id, new_capacity)
            .map(drop)
    }

    fn capacity_signal(&self) -> Option<Arc<vstor_core::CapacitySignal>> {
        Some(self.shared.signal.clone())
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let info = self.info();
        let mut i = 0;
        while i < batch.len() {
            let j = batch[i..]
                .iter()
                .position(|r| matches!(r.op, Op::Flush))
                .map_or(batch.len(), |p| i + p);
            self.run_segment(&mut batch[i..j], &info);
            if j < batch.len() {
                let r = self.flush_members();
                batch[j].complete(r);
            }
            i = j + 1;
        }
    }

    /// Thin extents not allocated yet are holes; allocated ones are data.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<vstor_core::Extent>> {
        use vstor_core::{push_extent, Extent};
        vstor_core::check_range(self.shared.size(), offset, len)?;
        let eb = self.shared.layout.extent_bytes();
        let ext = self
            .shared
            .extents
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let n = (eb - pos % eb).min(end - pos);
            let held = ext
                .get((pos / eb) as usize)
                .is_some_and(|slots| slots.is_some());
            push_extent(
                &mut out,
                if held {
                    Extent::data(n, 1)
                } else {
                    Extent::hole(n)
                },
            );
            pos += n;
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        let l = &self.shared.layout;
        format!(
            "space '{}' ({}, {} columns, {} KiB interleave) of pool {}",
            self.shared.name,
            l.resiliency,
            l.columns,
            l.interleave >> 10,
            self.pool.store.lock().pool_id
        )
    }
}

impl Inner {
    /// The good contents of the block at `off` of a slot, where a read-only pool healed it.
    fn healed_block(&self, s: Slot, off: u64) -> Option<Vec<u8>> {
        if !self.read_only {
            return None;
        }
        self.integrity.healed_block(s, off)
    }
}

/// Checks every slot of a 4 KiB window of an extent (the same slab offset `window` in every
/// slot) against its checksums and rewrites each bad block from a good copy (mirror) or from
/// the rest of its row (parity), if the result matches the block's checksum. The caller holds
/// the space's I/O off. Counts what it found in the pool's statistics and returns the blocks
/// left bad.
pub(crate) fn heal_window(
    pool: &Inner,
    layout: &Layout,
    slots: &[Slot],
    devs: &Devs,
    (data_start, slab_size): (u64, u64),
    window: u64,
) -> Result<u64> {
    let win = csum::PAGE as usize;
    let nb = win / csum::BLOCK as usize;
    let bs = csum::BLOCK as usize;
    let w = layout.width;
    let mut bufs: Vec<Option<Vec<u8>>> = vec![None; w];
    let mut want: Vec<Vec<u32>> = vec![Vec::new(); w];
    let mut ok: Vec<Vec<bool>> = vec![Vec::new(); w];
    for si in 0..w {
        let s = slots[si];
        let Some(dev) = devs[s.member].as_ref() else {
            continue;
        };
        let mut b = vec![0u8; win];
        dev.read_at(data_start + u64::from(s.slab) * slab_size + window, &mut b)?;
        want[si] = pool
            .csums
            .get(&**dev, s.member, s.slab, window / csum::BLOCK, nb as u64)?;
        ok[si] = csum::crcs(&b)
            .iter()
            .zip(&want[si])
            .map(|(g, w)| g == w)
            .collect();
        bufs[si] = Some(b);
    }
    let (mut found, mut fixed, mut lost) = (0u64, 0u64, 0u64);
    let mut dirty = vec![false; w];
    let mut sums_dirty = vec![false; w];
    let present_bad = |si: usize, b: usize, ok: &[Vec<bool>], bufs: &[Option<Vec<u8>>]| {
        bufs[si].is_some() && !ok[si][b]
    };
    match layout.resiliency {
        crate::Resiliency::Parity { redundancy } => {
            let d = layout.data_columns;
            let row = window / layout.interleave;
            let slot_of = |shard: usize| {
                if shard < d {
                    layout.data_slot(row, shard, 0)
                } else {
                    layout.parity_slot(row, shard - d)
                }
            };
            for b in 0..nb {
                let bad: Vec<usize> = (0..w)
                    .filter(|&sh| present_bad(slot_of(sh), b, &ok, &bufs))
                    .collect();
                if bad.is_empty() {
                    continue;
                }
                found += bad.len() as u64;
                let erased = (0..w)
                    .filter(|&sh| {
                        let si = slot_of(sh);
                        bufs[si].is_none() || !ok[si][b]
                    })
                    .count();
                if erased > usize::from(redundancy) {
                    lost += bad.len() as u64;
                    continue;
                }
                let mut shards: Vec<Option<Vec<u8>>> = (0..w)
                    .map(|sh| {
                        let si = slot_of(sh);
                        match &bufs[si] {
                            Some(v) if ok[si][b] => Some(v[b * bs..(b + 1) * bs].to_vec()),
                            _ => None,
                        }
                    })
                    .collect();
                if !code::reconstruct(&mut shards, d, bs) {
                    lost += bad.len() as u64;
                    continue;
                }
                for sh in bad {
                    let si = slot_of(sh);
                    let rec = shards[sh].as_ref().expect("rebuilt");
                    let mine = &mut bufs[si].as_mut().expect("present")[b * bs..(b + 1) * bs];
                    if csum::block_crc(rec) == want[si][b] {
                        mine.copy_from_slice(rec);
                        dirty[si] = true;
                    } else if mine == &rec[..] {
                        // The data is what the row says: the checksum entry was damaged.
                        want[si][b] = csum::block_crc(rec);
                        sums_dirty[si] = true;
                    } else {
                        // Data and entry both gone (a wiped range): what the rest of the row,
                        // which passes its checksums, gives is the block.
                        mine.copy_from_slice(rec);
                        want[si][b] = csum::block_crc(rec);
                        dirty[si] = true;
                        sums_dirty[si] = true;
                    }
                    fixed += 1;
                }
            }
        }
        _ => {
            let k = layout.copies();
            for col in 0..layout.data_columns {
                let copies: Vec<usize> = (0..k).map(|c| layout.data_slot(0, col, c)).collect();
                for b in 0..nb {
                    let bad: Vec<usize> = copies
                        .iter()
                        .copied()
                        .filter(|&si| present_bad(si, b, &ok, &bufs))
                        .collect();
                    if bad.is_empty() {
                        continue;
                    }
                    found += bad.len() as u64;
                    let good = copies
                        .iter()
                        .copied()
                        .find(|&si| bufs[si].is_some() && ok[si][b]);
                    let Some(g) = good else {
                        lost += bad.len() as u64;
                        continue;
                    };
                    let src = bufs[g].as_ref().expect("present")[b * bs..(b + 1) * bs].to_vec();
                    for si in bad {
                        let mine = &mut bufs[si].as_mut().expect("present")[b * bs..(b + 1) * bs];
                        if mine != &src[..] {
                            mine.copy_from_slice(&src);
                            dirty[si] = true;
                        }
                        if want[si][b] != want[g][b] {
                            want[si][b] = want[g][b];
                            sums_dirty[si] = true;
                        }
                        fixed += 1;
                    }
                }
            }
        }
    }
    for si in 0..w {
        let s = slots[si];
        let Some(dev) = devs[s.member].as_ref() else {
            continue;
        };
        if pool.read_only {
            if dirty[si] || sums_dirty[si] {
                pool.integrity.keep_healed(
                    (s.member, s.slab, window),
                    bufs[si].take().expect("present"),
                );
            }
            continue;
        }
        if dirty[si] {
            dev.write_at(
                data_start + u64::from(s.slab) * slab_size + window,
                bufs[si].as_ref().expect("present"),
            )?;
        }
        if sums_dirty[si] {
            pool.csums
                .store(dev, s.member, s.slab, window / csum::BLOCK, &want[si])?;
        }
    }
    pool.integrity.count(found, fixed, lost);
    Ok(lost)
}

impl Space {
    /// The in-place writes of a parity batch's rows, journaled first (see the module
    /// documentation). Returns false (and adds the failures) if a member failed; the rows are
    /// given back either way.
    pub(crate) fn write_rows(
        &self,
        rows: BTreeMap<(u64, u64), RowOp>,
        direct: &BTreeMap<(u64, u64), Vec<&[u8]>>,
        devs: &Devs,
        ext: &[Option<Vec<crate::format::Slot>>],
        rebuilding: Option<&Rebuild>,
        failures: &mut Vec<(usize, Error)>,
    ) -> bool {
        let journal = &self.pool.journal;
        let mut rows = rows;
        if !journal.enabled() {
            let ok = self.row_io(&mut rows, direct, devs, ext, rebuilding, failures, true);
            self.give_rows(rows);
            return ok;
        }
        let id = self.shared.id;
        let width = self.shared.layout.width;
        // Which rows need records, and what each costs the members it touches.
        let logged: Vec<bool> = rows
            .values()
            .map(|r| {
                r.shards.iter().any(Option::is_some)
                    && (!r.full || journal.row_logged(id, r.extent, r.row))
            })
            .collect();
        debug_assert!(
            rows.values().zip(&logged).all(|(r, &l)| !(l && r.direct)),
            "a row written from the callers' buffers has no data shards to log"
        );
        let member_of = |r: &RowOp, shard: usize| {
            let slots = ext[r.extent as usize].as_ref().expect("allocated");
            let m = slots[self.shard_slot(r.row, shard)].member;
            devs[m].is_some().then_some(m)
        };
        let cap = JOURNAL_SIZE - journal::PAGE;
        let mut used: BTreeMap<usize, u64> = BTreeMap::new();
        let mut whole = true;
        for (r, &lg) in rows.values().zip(&logged) {
            if !lg {
                continue;
            }
            for shard in (0..width).filter(|&s| r.shards[s].is_some()) {
                if let Some(m) = member_of(r, shard) {
                    *used.entry(m).or_default() += journal::RECORD_HEADER + (r.hi - r.lo);
                }
            }
        }
        if used.values().any(|&p| journal::block_bytes(p) > cap) {
            whole = false;
        }
        // Parts: each journaled and written before the next. One part in the common case.
        let mut parts: Vec<BTreeMap<(u64, u64), RowOp>> = Vec::new();
        let mut part_logged: Vec<Vec<(u64, u64)>> = Vec::new();
        if whole {
            part_logged.push(
                rows.keys()
                    .zip(&logged)
                    .filter(|(_, &l)| l)
                    .map(|(k, _)| *k)
                    .collect(),
            );
            parts.push(rows);
        } else {
            let mut cur: BTreeMap<(u64, u64), RowOp> = BTreeMap::new();
            let mut cur_logged = Vec::new();
            let mut used: BTreeMap<usize, u64> = BTreeMap::new();
            for ((key, row), lg) in rows.into_iter().zip(logged) {
                let units: Vec<(u64, u64)> = if lg && row.hi - row.lo > journal::MAX_UNIT {
                    (row.lo..row.hi)
                        .step_by(journal::MAX_UNIT as usize)
                        .map(|a| (a, (a + journal::MAX_UNIT).min(row.hi)))
                        .collect()
                } else {
                    vec![(row.lo, row.hi)]
                };
                let single = units.len() == 1;
                let mut row = Some(row);
                for (a, b) in units {
                    let r = row.as_ref().expect("row");
                    let unit = if single {
                        row.take().expect("row")
                    } else {
                        RowOp {
                            extent: r.extent,
                            row: r.row,
                            lo: a,
                            hi: b,
                            pieces: Vec::new(),
                            shards: r
                                .shards
                                .iter()
                                .map(|s| {
                                    s.as_ref().map(|s| {
                                        let mut n = self.take_buf((b - a) as usize);
                                        n.copy_from_slice(
                                            &s[(a - r.lo) as usize..(b - r.lo) as usize],
                                        );
                                        n
                                    })
                                })
                                .collect(),
                            rebuild: r.rebuild,
                            full: r.full,
                            direct: false,
                        }
                    };
                    let mut cost: BTreeMap<usize, u64> = BTreeMap::new();
                    if lg {
                        for shard in (0..width).filter(|&s| unit.shards[s].is_some()) {
                            if let Some(m) = member_of(&unit, shard) {
                                *cost.entry(m).or_default() += journal::RECORD_HEADER + (b - a);
                            }
                        }
                    }
                    let over = cost.iter().any(|(m, c)| {
                        journal::block_bytes(used.get(m).copied().unwrap_or(0) + c) > cap
                    });
                    if !cur.is_empty() && (over || cur.contains_key(&key)) {
                        parts.push(std::mem::take(&mut cur));
                        part_logged.push(std::mem::take(&mut cur_logged));
                        used.clear();
                    }
                    for (m, c) in cost {
                        *used.entry(m).or_default() += c;
                    }
                    if lg {
                        cur_logged.push(key);
                    }
                    cur.insert(key, unit);
                }
                if let Some(r) = row {
                    self.give_rows(BTreeMap::from([(key, r)]));
                }
            }
            if !cur.is_empty() {
                parts.push(cur);
                part_logged.push(cur_logged);
            }
        }
        let mut ok = true;
        for (mut part, keys) in parts.into_iter().zip(part_logged) {
            if !ok {
                self.give_rows(part);
                continue;
            }
            let ticket = if keys.is_empty() {
                None
            } else {
                let mut entries = Vec::new();
                for k in &keys {
                    let r = &part[k];
                    for (shard, buf) in r.shards.iter().enumerate() {
                        let Some(buf) = buf else { continue };
                        if let Some(m) = member_of(r, shard) {
                            entries.push(journal::Entry {
                                member: m,
                                extent: r.extent,
                                row: r.row,
                                shard: shard as u32,
                                lo: r.lo,
                                data: &buf[..],
                            });
                        }
                    }
                }
                match journal.log(devs, id, &entries, &keys) {
                    Ok(t) => Some(t),
                    Err(f) => {
                        failures.push(f);
                        ok = false;
                        drop(entries);
                        self.give_rows(part);
                        continue;
                    }
                }
            };
            ok = self.row_io(&mut part, direct, devs, ext, rebuilding, failures, true);
            drop(ticket);
            self.give_rows(part);
        }
        ok
    }
}
