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

/// Stripe locks per space: parity row updates hash onto them.
const STRIPES: usize = 64;

type Devs = Vec<Option<Arc<dyn BlockDevice>>>;

mod direct;
mod heal;
mod parity;
mod sums;

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
