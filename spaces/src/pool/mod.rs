//! Pools: creating, opening and describing them, allocating slabs, recording member failures.

use crate::error::{invalid, SpacesError};
use crate::format::{
    valid_name, MemberMeta, MemberState, Meta, Provisioning, Slot, SpaceMeta, BITMAP_SIZE,
    MAX_MEMBERS, MAX_SLABS, MAX_SLOT, MAX_SPACES, MIN_SLOT,
};
use crate::integrity::{Integrity, IntegrityStats};
use crate::intent::WriteIntentLog;
use crate::layout::{Layout, Resiliency};
pub(crate) use crate::members::MemberRt;
use crate::members::Members;
use crate::space::{Space, SpaceShared};
use crate::store::{behind, zero_range, MetaStore};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use uuid::Uuid;
use vstor_core::{BlockDevice, Error, FileDevice, FileOptions, Result};

/// The default slab size: 256 MiB, as Storage Spaces.
pub const DEFAULT_SLAB_SIZE: u64 = 256 << 20;
/// The file in a pool directory that lists member devices kept elsewhere (one path a line).
pub const DEVICES_FILE: &str = "pool.devices";

/// The default interleave: 256 KiB, as Storage Spaces.
pub const DEFAULT_INTERLEAVE: u64 = 256 << 10;

/// A disk offered to a pool: a name for messages and reports, and the device.
#[derive(Clone)]
pub struct PoolDisk {
    /// What the disk is called in messages (its path, for files).
    pub name: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for PoolDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolDisk")
            .field("name", &self.name)
            .field("device", &self.device.describe())
            .finish()
    }
}

impl PoolDisk {
    /// A disk named `name`.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        PoolDisk {
            name: name.into(),
            device,
        }
    }
}

/// How to create a pool.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Bytes per slab: a power of two from 64 KiB to 64 GiB (default 256 MiB).
    pub slab_size: u64,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            slab_size: DEFAULT_SLAB_SIZE,
        }
    }
}

/// How to open a pool.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Write nothing: no metadata refresh, no failure records, spaces refuse writes.
    pub read_only: bool,
    /// After a split brain ([`SpacesError::SplitBrain`]): the disk (its name as given, or the
    /// last component of its path) whose metadata, and so whose side's data, is kept. Members
    /// that diverged from it are taken as failed (their own metadata is overwritten with the
    /// kept one unless read-only, so the next open agrees); [`Pool::reuse_member`] and
    /// [`Pool::repair`] bring them back. `None`: refuse to open a diverged pool.
    pub force_member: Option<String>,
}

/// What a new space is.
#[derive(Debug, Clone)]
pub struct SpaceSpec {
    /// Its name: 1 to 64 bytes of letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Its size in bytes (a multiple of 4096).
    pub size: u64,
    /// Its resiliency.
    pub resiliency: Resiliency,
    /// Columns (simple, parity: disks per extent; mirror: data columns, each on `copies`
    /// disks). `None`: as many as the pool's healthy disks allow, at most 8 (mirror 4).
    pub columns: Option<usize>,
    /// Interleave (stripe unit) in bytes (default 256 KiB, at most the slab size).
    pub interleave: Option<u64>,
    /// Thin (slabs on first write) or fixed (every slab now).
    pub provisioning: Provisioning,
}

/// A space's health, from the members that are usable now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpaceHealth {
    /// Every slab is on a usable member.
    Healthy,
    /// Some slabs are on lost members, within what the resiliency tolerates.
    Degraded {
        /// Slabs of the space on members that are missing or failed.
        lost_slabs: usize,
    },
    /// More is lost than the resiliency tolerates: I/O is refused.
    Failed {
        /// What is lost.
        reason: String,
    },
}

impl SpaceHealth {
    /// `healthy`, `degraded` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            SpaceHealth::Healthy => "healthy",
            SpaceHealth::Degraded { .. } => "degraded",
            SpaceHealth::Failed { .. } => "failed",
        }
    }
}

/// A description of a space.
#[derive(Debug, Clone)]
pub struct SpaceInfo {
    /// Its identity.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its resiliency.
    pub resiliency: Resiliency,
    /// Columns as given at creation (see [`SpaceSpec::columns`]).
    pub columns: usize,
    /// Data columns per row.
    pub data_columns: usize,
    /// Disks one extent spans.
    pub width: usize,
    /// Interleave in bytes.
    pub interleave: u64,
    /// Provisioning.
    pub provisioning: Provisioning,
    /// Extents the space has.
    pub extents: u64,
    /// Extents allocated (all of them unless thin).
    pub allocated_extents: u64,
    /// Slabs used on members (allocated extents times width).
    pub slabs: u64,
    /// Health.
    pub health: SpaceHealth,
}

/// A description of a member.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    /// Its index in the pool.
    pub index: usize,
    /// Its identity.
    pub id: Uuid,
    /// The disk it was found on, if it was found.
    pub disk: Option<String>,
    /// Its recorded state.
    pub state: MemberState,
    /// Whether I/O goes to it (present and not failed).
    pub usable: bool,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Slabs it holds.
    pub slabs: u64,
    /// Slabs in use.
    pub slabs_used: u64,
    /// The sequence number of the newest metadata found on it at open (`None`: missing).
    pub metadata_sequence: Option<u64>,
}

/// A description of a pool.
#[derive(Debug, Clone)]
pub struct PoolInfo {
    /// The pool's identity.
    pub id: Uuid,
    /// The metadata's sequence number.
    pub sequence: u64,
    /// Bytes per slab.
    pub slab_size: u64,
    /// Bytes of each member before slab 0 (the two metadata slots).
    pub data_start: u64,
    /// Members.
    pub members: Vec<MemberInfo>,
    /// Spaces.
    pub spaces: Vec<SpaceInfo>,
    /// What happened at open (stale metadata refreshed, missing members, unrecognized disks,
    /// chunks resynced after an unclean shutdown) and since (members failed).
    pub notes: Vec<String>,
    /// Chunks resynced (copies or parity made to agree) since the pool was opened.
    pub resynced_chunks: u64,
    /// Block checksum statistics since the pool was opened.
    pub integrity: IntegrityStats,
    /// What the parity journal did since the pool was opened (all zero without one).
    pub journal: crate::journal::JournalStats,
    /// The pool's on-disk format version (2: no parity journal; 3: with one).
    pub format_version: u32,
}

/// The shared state of an open pool.
pub(crate) struct Inner {
    /// The pool metadata and the slabs moves have reserved.
    pub store: MetaStore,
    /// The members at run time (and the epoch of their usability and the allocation).
    pub members: Members,
    pub open_spaces: Mutex<HashMap<Uuid, Weak<SpaceShared>>>,
    pub read_only: bool,
    /// A member is missing but still recorded healthy: record it before the first write.
    pub missing_unrecorded: AtomicBool,
    /// This open moved the write epoch on (see `Inner::arm`): a clean close moves it again.
    pub armed: AtomicBool,
    pub notes: Mutex<Vec<String>>,
    /// The write-intent log (the bitmaps on every member and the gate writes hold).
    pub intent: WriteIntentLog,
    /// Every member's block checksums.
    pub csums: crate::csum::Csums,
    /// What the block checksums caught, and a read-only pool's healed windows.
    pub integrity: Integrity,
    /// The parity journal.
    pub journal: crate::journal::Journal,
    /// The metadata sequence the pool was opened with.
    pub opened_at: u64,
}

impl Drop for Inner {
    /// A clean close: flush every member and clear the write-intent bitmaps.
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        let devs = self.members.snapshot();
        if devs.iter().flatten().all(|d| d.flush().is_ok()) {
            self.clear_bitmaps(true);
            self.journal.close(&devs);
            if self.armed.load(Ordering::Acquire) {
                // A member copied while the pool was open is older than this epoch.
                let _ = self.arm(true);
            }
        }
    }
}

pub(crate) use crate::store::lock;

mod extents;
mod open;

pub(crate) use open::read_best;

/// A pool of disks. Cloning gives another handle to the same open pool.
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.inner.store.lock();
        f.debug_struct("Pool")
            .field("id", &m.pool_id)
            .field("sequence", &m.sequence)
            .finish()
    }
}

/// Health of a space whose extents are `extents`, with member usability `usable`.
pub(crate) fn health(
    name: &str,
    layout: &Layout,
    extents: &[Option<Vec<Slot>>],
    usable: &[bool],
) -> SpaceHealth {
    let mut lost = 0;
    for (e, slots) in extents.iter().enumerate() {
        let Some(slots) = slots else { continue };
        let ok = |s: usize| usable.get(slots[s].member).copied().unwrap_or(false);
        let n = (0..slots.len()).filter(|&s| !ok(s)).count();
        if n > 0 && !layout.extent_readable(ok) {
            let gone: Vec<String> = slots
                .iter()
                .filter(|s| !usable.get(s.member).copied().unwrap_or(false))
                .map(|s| s.member.to_string())
                .collect();
            return SpaceHealth::Failed {
                reason: format!(
                    "extent {e} of '{name}' has slabs on lost members {}; {} tolerates the loss of {}",
                    gone.join(", "),
                    layout.resiliency,
                    layout.resiliency.tolerates()
                ),
            };
        }
        lost += n;
    }
    if lost == 0 {
        SpaceHealth::Healthy
    } else {
        SpaceHealth::Degraded { lost_slabs: lost }
    }
}

impl Pool {
    /// Limits the memory the cache of checksum pages takes (default
    /// [`csum::DEFAULT_CACHE_BYTES`](crate::csum::DEFAULT_CACHE_BYTES), 64 MiB: the checksums
    /// of 8 GiB of data; at least one 4 KiB page). Past the limit the least recently used
    /// half is dropped and read again from the members when next needed.
    pub fn set_checksum_cache_limit(&self, bytes: u64) {
        self.inner.csums.set_limit(bytes);
    }

    /// Bytes the cache of checksum pages holds now.
    pub fn checksum_cache_bytes(&self) -> u64 {
        self.inner.csums.cached_pages() as u64 * crate::csum::PAGE
    }

    /// The pool's identity.
    pub fn id(&self) -> Uuid {
        self.inner.store.lock().pool_id
    }

    /// A description of the pool, its members and its spaces.
    pub fn info(&self) -> PoolInfo {
        let meta = self.inner.store.lock();
        let rt = self.inner.members.read();
        let mut used = vec![0u64; meta.members.len()];
        for s in &meta.spaces {
            for slots in s.extents.iter().flatten() {
                for sl in slots {
                    used[sl.member] += 1;
                }
            }
        }
        let usable: Vec<bool> = rt.iter().map(|r| r.usable).collect();
        PoolInfo {
            id: meta.pool_id,
            sequence: meta.sequence,
            slab_size: meta.slab_size,
            data_start: meta.data_start,
            members: meta
                .members
                .iter()
                .zip(rt.iter())
                .enumerate()
                .map(|(i, (m, r))| MemberInfo {
                    index: i,
                    id: m.id,
                    disk: r.name.clone(),
                    state: m.state,
                    usable: r.usable,
                    capacity: m.capacity,
                    slabs: u64::from(m.slab_count),
                    slabs_used: used[i],
                    metadata_sequence: r.seen_sequence,
                })
                .collect(),
            spaces: meta.spaces.iter().map(|s| space_info(s, &usable)).collect(),
            notes: lock(&self.inner.notes).clone(),
            resynced_chunks: self.inner.intent.resynced(),
            integrity: self.inner.integrity.stats(),
            journal: self.inner.journal.stats(),
            format_version: meta.version,
        }
    }

    /// Descriptions of every space.
    pub fn spaces(&self) -> Vec<SpaceInfo> {
        self.info().spaces
    }

    /// The description of the space `name`.
    pub fn space_info(&self, name: &str) -> Result<SpaceInfo> {
        self.spaces()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| SpacesError::NoSuchSpace(name.into()).into())
    }

    /// Creates a space. A fixed space gets every slab now (zeroed); a thin one gets slabs on
    /// first write. Nothing is written if the layout does not fit the pool.
    pub fn create_space(&self, spec: &SpaceSpec) -> Result<SpaceInfo> {
        if self.inner.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        if !valid_name(&spec.name) {
            return Err(invalid(format!(
                "'{}' is not a valid space name (1 to 64 letters, digits, '-', '_', '.')",
                spec.name
            )));
        }
        if spec.size == 0 || spec.size % 4096 != 0 {
            return Err(invalid(format!(
                "space size {} is not a positive multiple of 4096",
                spec.size
            )));
        }
        let mut meta = self.inner.store.lock();
        if meta.spaces.iter().any(|s| s.name == spec.name) {
            return Err(SpacesError::SpaceExists(spec.name.clone()).into());
        }
        if meta.spaces.len() >= MAX_SPACES {
            return Err(
                SpacesError::PoolFull(format!("a pool holds at most {MAX_SPACES} spaces")).into(),
            );
        }
        let eligible = self.inner.members.eligible(&meta);
        let n = eligible.iter().filter(|&&e| e).count();
        let columns = spec.columns.unwrap_or(match spec.resiliency {
            Resiliency::Simple => n.clamp(1, 8),
            Resiliency::Mirror { copies } => (n / usize::from(copies)).clamp(1, 4),
            Resiliency::Parity { .. } => n.min(8),
        });
        let layout = Layout::new(
            spec.resiliency,
            columns,
            spec.interleave
                .unwrap_or(DEFAULT_INTERLEAVE.min(meta.slab_size)),
            meta.slab_size,
        )?;
        let allocator = self.inner.store.allocator(&meta, &eligible);
        let room = allocator.members_with_room();
        if layout.width > room {
            return Err(SpacesError::TooFewDisks {
                what: format!("a {} space with {columns} columns", spec.resiliency),
                needed: layout.width,
                available: room,
            }
            .into());
        }
        let count = layout.extents_for(spec.size);
        if !meta.room_for_refs(count.saturating_mul(layout.width as u64)) {
            return Err(SpacesError::PoolFull(format!(
                "the pool metadata area ({} bytes) cannot describe {} more extents",
                meta.slot_size, count
            ))
            .into());
        }
        let mut space = SpaceMeta {
            id: Uuid::new_v4(),
            name: spec.name.clone(),
            size: spec.size,
            layout,
            provisioning: spec.provisioning,
            extents: vec![None; count as usize],
        };
        let mut next = meta.clone();
        if spec.provisioning == Provisioning::Fixed {
            let mut allocator = allocator;
            for e in space.extents.iter_mut() {
                *e = Some(allocator.extent(layout.width, &[]).ok_or_else(|| {
                    SpacesError::PoolFull(format!(
                        "a fixed space of {} bytes needs {} slabs on {} disks",
                        spec.size,
                        count * layout.width as u64,
                        layout.width
                    ))
                })?);
            }
        }
        next.spaces.push(space.clone());
        if next.blob_len() > next.slot_size {
            return Err(SpacesError::PoolFull(format!(
                "the pool metadata area ({} bytes) cannot describe {} more extents",
                next.slot_size, count
            ))
            .into());
        }
        self.inner.zero_new(&next, space.extents.iter().flatten())?;
        self.inner.persist(&mut next)?;
        *meta = next;
        self.inner.members.changed();
        let usable = self.inner.members.usable();
        Ok(space_info(meta.spaces.last().expect("pushed"), &usable))
    }

    /// Grows space `name` to `new_size` bytes (a multiple of 4096), online (Resize-VirtualDisk):
    /// a thin space's new extents are allocated by their first writes, a fixed space's now;
    /// the new bytes read as zeroes. Open handles see the new size at once and their
    /// [`capacity_signal`](vstor_core::BlockDevice::capacity_signal) announces it (a VMM tells
    /// its guest). A smaller size is refused: a space never cuts data. Nothing changes when
    /// it fails (the pool full, the metadata area full).
    pub fn resize_space(&self, name: &str, new_size: u64) -> Result<SpaceInfo> {
        let id = {
            let meta = self.inner.store.lock();
            meta.spaces
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| SpacesError::NoSuchSpace(name.into()))?
                .id
        };
        self.inner.resize_space(id, new_size)
    }

    /// Deletes a space; its slabs become free. Open handles of it fail their I/O from now on.
    pub fn delete_space(&self, name: &str) -> Result<()> {
        if self.inner.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        let mut meta = self.inner.store.lock();
        let i = meta
            .spaces
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| SpacesError::NoSuchSpace(name.into()))?;
        let mut next = meta.clone();
        let gone = next.spaces.remove(i);
        self.inner.persist(&mut next)?;
        *meta = next;
        if let Some(s) = lock(&self.inner.open_spaces)
            .remove(&gone.id)
            .and_then(|w| w.upgrade())
        {
            s.deleted.store(true, Ordering::Release);
        }
        self.inner.members.changed();
        Ok(())
    }

    /// Opens the space `name` as a block device. Handles of one space share their state.
    pub fn open_space(&self, name: &str) -> Result<Space> {
        let meta = self.inner.store.lock();
        let s = meta
            .spaces
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| SpacesError::NoSuchSpace(name.into()))?;
        let mut open = lock(&self.inner.open_spaces);
        let shared = match open.get(&s.id).and_then(Weak::upgrade) {
            Some(sh) => sh,
            None => {
                let sh = Arc::new(SpaceShared::new(s, &self.inner.members.read()));
                open.insert(s.id, Arc::downgrade(&sh));
                sh
            }
        };
        Ok(Space::new(
            self.inner.clone(),
            shared,
            meta.data_start,
            meta.slab_size,
        ))
    }

    /// Marks member `index` failed (as an I/O error would), records it unless read-only, and
    /// stops I/O to it. For operators taking a disk out and for tests.
    pub fn fail_member(&self, index: usize) -> Result<()> {
        if index >= self.inner.store.lock().members.len() {
            return Err(invalid(format!("the pool has no member {index}")));
        }
        self.inner.fail_member(index, "failed by request");
        Ok(())
    }
}

fn space_info(s: &SpaceMeta, usable: &[bool]) -> SpaceInfo {
    let allocated = s.extents.iter().filter(|e| e.is_some()).count() as u64;
    SpaceInfo {
        id: s.id,
        name: s.name.clone(),
        size: s.size,
        resiliency: s.layout.resiliency,
        columns: s.layout.columns,
        data_columns: s.layout.data_columns,
        width: s.layout.width,
        interleave: s.layout.interleave,
        provisioning: s.provisioning,
        extents: s.extents.len() as u64,
        allocated_extents: allocated,
        slabs: allocated * s.layout.width as u64,
        health: health(&s.name, &s.layout, &s.extents, usable),
    }
}

impl Inner {
    /// Writes `meta` with the next sequence number to every usable member
    /// ([`MetaStore::persist`]).
    pub fn persist(&self, meta: &mut Meta) -> Result<()> {
        self.store.persist(meta, &self.members, &self.notes)
    }

    /// Zeroes the slabs of new extents ([`MetaStore::zero_new`]).
    fn zero_new<'a>(
        &self,
        meta: &Meta,
        extents: impl Iterator<Item = &'a Vec<Slot>>,
    ) -> Result<()> {
        MetaStore::zero_new(meta, extents, &self.members, &self.csums)
    }

    /// Marks a member failed after an I/O error, and records it.
    pub fn fail_member(&self, index: usize, cause: &str) {
        let mut meta = self.store.lock();
        {
            let mut rt = self.members.write();
            if !rt[index].usable && meta.members[index].state == MemberState::Failed {
                return;
            }
            if rt[index].usable {
                behind(&mut meta, index, rt[index].seen_sequence);
            }
            rt[index].usable = false;
        }
        meta.members[index].state = MemberState::Failed;
        lock(&self.notes).push(format!("member {index} failed: {cause}"));
        self.members.changed();
        if !self.read_only {
            // If no member can take the record, I/O fails on its own (nothing is usable).
            let _ = self.persist(&mut meta);
        }
    }

    /// Before the first write with a member missing: record it failed, so that when it comes
    /// back its stale data is not trusted.
    pub fn record_missing(&self) -> Result<()> {
        if !self.missing_unrecorded.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut meta = self.store.lock();
        if !self.missing_unrecorded.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut next = meta.clone();
        {
            let rt = self.members.read();
            for (i, r) in rt.iter().enumerate() {
                let state = next.members[i].state;
                if r.device.is_none() && state != MemberState::Removed {
                    // Recorded healthy in the metadata the pool opened with, so it held every
                    // write through that sequence (if it holds that sequence when it comes
                    // back; any other is an older copy, rebuilt whole).
                    behind(&mut next, i, Some(self.opened_at));
                    next.members[i].state = MemberState::Failed;
                }
            }
        }
        self.persist(&mut next)?;
        *meta = next;
        self.missing_unrecorded.store(false, Ordering::Release);
        drop(meta);
        self.arm(false)
    }

    /// Moves the write epoch on (format version 4; nothing before): the metadata is written
    /// to every usable member with the next sequence, then again with that sequence as the
    /// epoch ([`Meta::armed_epoch`]). Every usable member holds the epoch's sequence before
    /// anything is written after it (a member whose write fails is recorded failed), so a
    /// member found older than the epoch later missed writes. Two updates, so a crash in the
    /// first leaves the old epoch and makes no member stale. A writable open arms before
    /// anything is written, and a clean close arms again (`clean`), so a copy of a member
    /// taken while the pool was open is older than the epoch too.
    pub(crate) fn arm(&self, clean: bool) -> Result<()> {
        let mut meta = self.store.lock();
        if self.read_only || meta.version < crate::format::KEYED_VERSION {
            return Ok(());
        }
        let mut next = meta.clone();
        next.clean = false;
        self.persist(&mut next)?;
        next.armed_epoch = next.sequence;
        next.clean = clean;
        self.persist(&mut next)?;
        *meta = next;
        self.armed.store(true, Ordering::Release);
        Ok(())
    }
}
