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

/// Reads `len` bytes at `offset` (a multiple of 4096 bytes is read and trimmed).
fn read_exact(dev: &dyn BlockDevice, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len.div_ceil(4096) * 4096];
    dev.read_at(offset, &mut buf)?;
    buf.truncate(len);
    Ok(buf)
}

/// Reads one metadata slot whose header is at `offset`; `expect_slot` requires the copy to
/// name that slot size (slot B must sit at offset `slot_size`).
fn read_slot(
    disk: &PoolDisk,
    offset: u64,
    expect_slot: Option<u64>,
) -> Result<Option<(Meta, usize)>> {
    let cap = disk.device.capacity();
    if offset + 4096 > cap {
        return Ok(None);
    }
    let head = read_exact(&*disk.device, offset, 4096)?;
    let Some((slot, len)) = Meta::peek(&head) else {
        return Ok(None);
    };
    if expect_slot.is_some_and(|s| s != slot) || offset + slot > cap {
        return Ok(None);
    }
    let blob = if len <= 4096 {
        head
    } else {
        read_exact(&*disk.device, offset, len as usize)?
    };
    Ok(Meta::parse(&blob, &disk.name, offset).ok())
}

/// The newest valid metadata copy on a disk, if it has one. A read that fails is an error
/// naming the disk.
pub(crate) fn read_best(disk: &PoolDisk) -> Result<Option<(Meta, usize)>> {
    read_best_unnamed(disk).map_err(|e| on_disk(&disk.name, e))
}

/// `e`, which happened on the disk `name`, as an error naming it.
pub(crate) fn on_disk(name: &str, e: Error) -> Error {
    SpacesError::Disk {
        disk: name.to_string(),
        source: e,
    }
    .into()
}

fn read_best_unnamed(disk: &PoolDisk) -> Result<Option<(Meta, usize)>> {
    let a = read_slot(disk, 0, None)?;
    let b = match &a {
        Some((m, _)) => read_slot(disk, m.slot_size, Some(m.slot_size))?,
        None => {
            // Slot A is unreadable: slot B sits at the slot size, a power of two.
            let mut found = None;
            let mut s = MIN_SLOT;
            while s <= MAX_SLOT && found.is_none() {
                found = read_slot(disk, s, Some(s))?;
                s *= 2;
            }
            found
        }
    };
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(if b.0.sequence > a.0.sequence { b } else { a }),
        (a, b) => a.or(b),
    })
}

/// Creates the file `path` of `size` bytes (never over an existing file) and opens it with
/// `file`; when either fails the file is removed again, so no empty or short file is left for
/// a later open to trip over.
fn create_member_file(path: &Path, size: u64, file: &FileOptions) -> Result<FileDevice> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    let sized = f
        .set_len(size)
        .map_err(|e| Error::io(format!("cannot size {} to {size} bytes", path.display()), e));
    drop(f);
    let dev = sized.and_then(|()| FileDevice::open(path, file));
    if dev.is_err() {
        let _ = std::fs::remove_file(path);
    }
    dev
}

/// Why an open found no pool: no metadata at all, or metadata of another format version.
fn no_pool_reason(old: &[(String, u32)]) -> String {
    match old.first() {
        None => "no disk holds valid pool metadata".into(),
        Some((disk, v)) => format!(
            "{disk} (and {} more disks) holds pool metadata of format version {v}; this vstor reads versions {} to {} (version 2 added block checksums, version 3 the parity journal): open the pool with the vstor that made it and copy its spaces out",
            old.len() - 1,
            crate::format::MIN_VERSION,
            crate::format::VERSION
        ),
    }
}

/// The pool the disks `found` (each with its newest metadata) belong to: the one most of them
/// belong to. Disks of another pool are an error that names them (the stray ones, not the
/// members); without a majority the error names every side.
fn pool_of(found: &[(PoolDisk, Meta, usize)]) -> Result<Uuid> {
    let mut groups: Vec<(Uuid, Vec<&str>)> = Vec::new();
    for (d, m, _) in found {
        match groups.iter_mut().find(|(id, _)| *id == m.pool_id) {
            Some((_, names)) => names.push(&d.name),
            None => groups.push((m.pool_id, vec![&d.name])),
        }
    }
    groups.sort_by_key(|(_, names)| std::cmp::Reverse(names.len()));
    let (id, members) = &groups[0];
    let Some((_, second)) = groups.get(1) else {
        return Ok(*id);
    };
    if second.len() == members.len() {
        let sides: Vec<String> = groups
            .iter()
            .map(|(id, names)| format!("pool {id}: {}", names.join(", ")))
            .collect();
        return Err(SpacesError::NoPool(format!(
            "the disks belong to different pools and no pool has most of them ({}); take the disks that are not this pool's out",
            sides.join("; ")
        ))
        .into());
    }
    let stray: Vec<&str> = groups[1..]
        .iter()
        .flat_map(|(_, names)| names.iter().copied())
        .collect();
    let pools: Vec<String> = groups[1..].iter().map(|(id, _)| id.to_string()).collect();
    let one = stray.len() == 1;
    Err(SpacesError::ForeignMember {
        disk: stray.join(", "),
        reason: format!(
            "{} to pool {}, not to pool {id} of the other {} disks ({}); take {} out",
            if one { "belongs" } else { "belong" },
            pools.join(" and "),
            members.len(),
            members.join(", "),
            if one { "it" } else { "them" },
        ),
    }
    .into())
}

/// Pairs of members (disk name, its newest metadata, its index in it) that were written apart,
/// described for an error: a member that one member's metadata records failed at sequence `f`
/// but whose own metadata (which calls it healthy) reached `f`, or two copies of one sequence
/// that differ.
fn divergence(views: &[(&str, &Meta, usize)]) -> Vec<String> {
    let mut out = Vec::new();
    for (a, (an, am, ai)) in views.iter().enumerate() {
        for (b, (bn, bm, bi)) in views.iter().enumerate() {
            if a == b {
                continue;
            }
            let b_id = bm.members[*bi].id;
            let Some(rec) = am.members.iter().position(|m| m.id == b_id) else {
                continue;
            };
            let r = &am.members[rec];
            let b_self = &bm.members[*bi];
            // Taken back (caught up) after it was failed, from this very metadata or a
            // later one: the update that took it back reached it and not `a`.
            let taken_back =
                b_self.returned_seq >= r.failed_seq && am.sequence >= b_self.returned_seq;
            // `b`'s side recorded `a` failed after `a`'s newest metadata: `a` stopped while
            // `b`'s side went on, so `a`'s view is an older part of `b`'s history (a member
            // that missed updates), not a side of its own.
            let a_id = am.members[*ai].id;
            let a_behind = bm.members.iter().any(|m| {
                m.id == a_id && m.state == MemberState::Failed && m.failed_seq > am.sequence
            });
            if r.state == MemberState::Failed
                && r.failed_seq > 0
                && bm.sequence >= r.failed_seq
                && b_self.state != MemberState::Failed
                && !taken_back
                && !a_behind
            {
                out.push(format!(
                    "{an} (member {ai}, metadata sequence {}) records member {rec} failed at sequence {}, but {bn} (member {bi}) went on to sequence {} as a healthy member",
                    am.sequence, r.failed_seq, bm.sequence
                ));
            }
            if a < b && am.sequence == bm.sequence && am != bm {
                out.push(format!(
                    "{an} (member {ai}) and {bn} (member {bi}) hold different metadata of the same sequence {}",
                    am.sequence
                ));
            }
        }
    }
    out
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
    /// Creates a pool on `disks`, which must not belong to a pool already. Every disk gets the
    /// pool's metadata in both slots; nothing is written if any disk is unfit.
    pub fn create(disks: Vec<PoolDisk>, opts: &CreateOptions) -> Result<Pool> {
        let slab = opts.slab_size;
        if !slab.is_power_of_two() || !(64 << 10..=64 << 30).contains(&slab) {
            return Err(invalid(format!(
                "slab size {slab} is not a power of two from 64 KiB to 64 GiB"
            )));
        }
        if disks.is_empty() || disks.len() > MAX_MEMBERS {
            return Err(invalid(format!(
                "a pool has 1 to {MAX_MEMBERS} disks, not {}",
                disks.len()
            )));
        }
        let mut est_slabs = 0u64;
        for d in &disks {
            let info = d.device.info();
            if info.read_only {
                return Err(invalid(format!("{} is read-only", d.name)));
            }
            if info.logical_sector_size > 4096 {
                return Err(invalid(format!(
                    "{} has {}-byte sectors; at most 4096",
                    d.name, info.logical_sector_size
                )));
            }
            if let Some((m, _)) = read_best(d)? {
                return Err(SpacesError::ForeignMember {
                    disk: d.name.clone(),
                    reason: format!("already a member of pool {}", m.pool_id),
                }
                .into());
            }
            est_slabs += info.capacity / slab;
        }
        for (i, a) in disks.iter().enumerate() {
            if disks[..i].iter().any(|b| Arc::ptr_eq(&a.device, &b.device)) {
                return Err(invalid(format!("{} is given twice", a.name)));
            }
        }
        // Room for every member and space, and for spaces four times the pool's slabs (thin).
        let need =
            256 + MAX_MEMBERS as u64 * 64 + MAX_SPACES as u64 * 128 + 8 * (4 * est_slabs + 4096);
        let slot_size = need.next_power_of_two().max(MIN_SLOT);
        if slot_size > MAX_SLOT {
            return Err(invalid(format!(
                "{est_slabs} slabs of {slab} bytes need more pool metadata than {MAX_SLOT} bytes; use a larger slab size"
            )));
        }
        let data_start = Meta::data_start_for(crate::format::VERSION, slot_size);
        let mut members = Vec::new();
        for d in &disks {
            let cap = d.device.capacity();
            let slabs = crate::csum::slabs_fitting(cap, data_start, slab);
            if slabs == 0 {
                return Err(SpacesError::DiskTooSmall {
                    disk: d.name.clone(),
                    size: cap,
                    needed: data_start + slab + crate::csum::area_bytes(1, slab),
                }
                .into());
            }
            members.push(MemberMeta {
                id: Uuid::new_v4(),
                capacity: cap,
                slab_count: slabs.min(MAX_SLABS) as u32,
                state: MemberState::Healthy,
                failed_seq: 0,
                current_through: 0,
                returned_seq: 0,
            });
        }
        let meta = Meta {
            version: crate::format::VERSION,
            pool_id: Uuid::new_v4(),
            sequence: 1,
            // Every member holds sequence 1 before any data is written.
            armed_epoch: 1,
            clean: false,
            slab_size: slab,
            slot_size,
            data_start,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            members,
            spaces: Vec::new(),
        };
        for (i, d) in disks.iter().enumerate() {
            let mut blob = meta.serialize(i);
            blob.resize(blob.len().div_ceil(4096) * 4096, 0);
            zero_range(&*d.device, data_start - BITMAP_SIZE, BITMAP_SIZE)?;
            if let Some(j) = meta.journal_offset() {
                let id = meta.members[i].id;
                d.device
                    .write_at(j, &crate::journal::Journal::initial_header(id))?;
            }
            d.device.write_at(0, &blob)?;
            d.device.write_at(slot_size, &blob)?;
            d.device.flush()?;
        }
        let rt = disks
            .into_iter()
            .map(|d| MemberRt {
                name: Some(d.name),
                device: Some(d.device),
                usable: true,
                seen_sequence: Some(1),
            })
            .collect();
        let pool = Pool::from_parts(meta, rt, false, Vec::new());
        // Every member holds the epoch (sequence 1): a clean close moves it on.
        pool.inner.armed.store(true, Ordering::Release);
        Ok(pool)
    }

    fn from_parts(meta: Meta, members: Vec<MemberRt>, read_only: bool, notes: Vec<String>) -> Pool {
        let starts = meta
            .members
            .iter()
            .map(|m| {
                (
                    crate::csum::area_start(meta.data_start, meta.slab_size, m.slab_count),
                    meta.csum_seed(m),
                )
            })
            .collect();
        let csums = crate::csum::Csums::new(meta.slab_size, starts);
        let journal = crate::journal::Journal::new(&meta);
        let intent = WriteIntentLog::new(meta.data_start);
        let opened_at = meta.sequence;
        Pool {
            inner: Arc::new(Inner {
                store: MetaStore::new(meta, read_only),
                members: Members::new(members),
                open_spaces: Mutex::new(HashMap::new()),
                read_only,
                missing_unrecorded: AtomicBool::new(false),
                armed: AtomicBool::new(false),
                notes: Mutex::new(notes),
                intent,
                csums,
                integrity: Integrity::default(),
                journal,
                opened_at,
            }),
        }
    }

    /// Opens the pool whose members are among `disks`: picks the newest valid metadata, reports
    /// missing members and members with stale metadata (and, unless read-only, brings the
    /// latter up to date). Disks without pool metadata are skipped and named in the notes; a
    /// disk of another pool, an unknown member or a member given twice is an error.
    ///
    /// Members written apart are refused with [`SpacesError::SplitBrain`] unless
    /// [`OpenOptions::force_member`] names the side to keep (see the crate documentation).
    /// The parity journal is then replayed (see [`crate::journal`]; read-only: in memory) and,
    /// unless read-only, the chunks the write-intent bitmaps name are resynced, before the
    /// pool is handed out.
    pub fn open(disks: Vec<PoolDisk>, opts: &OpenOptions) -> Result<Pool> {
        let mut notes = Vec::new();
        let mut found: Vec<(PoolDisk, Meta, usize)> = Vec::new();
        let mut old_versions = Vec::new();
        for d in disks {
            match read_best(&d)? {
                Some((m, i)) => found.push((d, m, i)),
                None => {
                    // A disk smaller than a metadata header (an empty file, a README) holds
                    // no pool metadata of any version.
                    if d.device.capacity() >= 4096 {
                        let head =
                            read_exact(&*d.device, 0, 4096).map_err(|e| on_disk(&d.name, e))?;
                        if let Some(v) = Meta::other_version(&head) {
                            old_versions.push((d.name.clone(), v));
                        }
                    }
                    notes.push(format!("{}: no pool metadata; not a member", d.name))
                }
            }
        }
        if found.is_empty() {
            return Err(SpacesError::NoPool(no_pool_reason(&old_versions)).into());
        }
        // Which pool this is: the one most disks belong to, never the one with the highest
        // sequence (a disk of another pool may be further along); a disk of another pool is
        // refused by its own name, so that no good member is blamed.
        let pool_id = pool_of(&found)?;
        let newest = found
            .iter()
            .filter(|(_, m, _)| m.pool_id == pool_id)
            .max_by_key(|(_, m, _)| m.sequence)
            .expect("the pool has a disk");
        // The metadata quorum: every present member must agree with the metadata taken (hold
        // it, or an older copy of its history). Members written apart are refused, or, with
        // force_member, the named side is kept and the others are taken as failed.
        let views: Vec<(&str, &Meta, usize)> = found
            .iter()
            .filter(|(_, m, _)| m.pool_id == newest.1.pool_id)
            .map(|(d, m, i)| (d.name.as_str(), m, *i))
            .collect();
        let (chosen, diverged) = match &opts.force_member {
            None => {
                let conflicts = divergence(&views);
                if !conflicts.is_empty() {
                    return Err(SpacesError::SplitBrain {
                        detail: format!(
                            "{}; taking either side's metadata would silently lose what the other side wrote since: open with force_member naming the disk whose side to keep (vstor space repair DIR --force-member DISK); the others are then taken as failed",
                            conflicts.join("; ")
                        ),
                    }
                    .into());
                }
                (newest.1.clone(), Vec::new())
            }
            Some(name) => {
                let pick = views
                    .iter()
                    .find(|(d, _, _)| {
                        *d == name
                            || Path::new(d).file_name().and_then(|f| f.to_str()) == Some(name)
                    })
                    .ok_or_else(|| {
                        invalid(format!(
                            "force_member: no member disk named '{name}' was found"
                        ))
                    })?;
                let diverged: Vec<Uuid> = views
                    .iter()
                    .filter(|v| v.0 != pick.0 && !divergence(&[*pick, **v]).is_empty())
                    .map(|(_, m, i)| m.members[*i].id)
                    .collect();
                let mut meta = pick.1.clone();
                // Past every sequence seen, so the kept side's next update is the newest.
                meta.sequence = views.iter().map(|v| v.1.sequence).max().unwrap_or(0);
                for m in meta.members.iter_mut() {
                    if diverged.contains(&m.id) && m.state != MemberState::Failed {
                        m.state = MemberState::Failed;
                        m.failed_seq = 0;
                    }
                }
                if !diverged.is_empty() {
                    notes.push(format!(
                        "force_member {name}: kept its metadata (sequence {}); {} diverged members taken as failed",
                        pick.1.sequence,
                        diverged.len()
                    ));
                }
                (meta, diverged)
            }
        };
        let mut meta = chosen;
        let mut rt: Vec<MemberRt> = meta
            .members
            .iter()
            .map(|_| MemberRt {
                name: None,
                device: None,
                usable: false,
                seen_sequence: None,
            })
            .collect();
        for (d, m, i) in found {
            if m.pool_id != meta.pool_id {
                return Err(SpacesError::ForeignMember {
                    disk: d.name,
                    reason: format!(
                        "belongs to pool {}, not to pool {} of the other disks",
                        m.pool_id, meta.pool_id
                    ),
                }
                .into());
            }
            let id = m.members[i].id;
            let Some(idx) = meta.members.iter().position(|x| x.id == id) else {
                return Err(SpacesError::ForeignMember {
                    disk: d.name,
                    reason: format!("member {id} is no longer in pool {}", meta.pool_id),
                }
                .into());
            };
            if meta.members[idx].state == MemberState::Removed {
                // Its slabs were moved off before it was removed: nothing of the pool is on
                // it, so it is skipped (and not kept open) rather than blocking the pool.
                notes.push(format!(
                    "{}: member {idx} was removed from the pool (pool remove-disk); not a member, it holds nothing of the pool and can be deleted",
                    d.name
                ));
                continue;
            }
            if let Some(other) = &rt[idx].name {
                return Err(SpacesError::ForeignMember {
                    disk: d.name,
                    reason: format!("is the same member ({id}) as {other}"),
                }
                .into());
            }
            if d.device.capacity() < meta.members[idx].capacity {
                return Err(SpacesError::ForeignMember {
                    disk: d.name,
                    reason: format!(
                        "has {} bytes; member {idx} had {}",
                        d.device.capacity(),
                        meta.members[idx].capacity
                    ),
                }
                .into());
            }
            rt[idx] = MemberRt {
                name: Some(d.name),
                usable: meta.members[idx].state != MemberState::Failed,
                device: Some(d.device),
                seen_sequence: Some(m.sequence),
            };
        }
        // A member whose newest metadata is older than the write epoch did not hold the
        // metadata that every usable member held before data was last written: it missed
        // writes (a disk pulled and put back, an old copy restored). Its data is never read;
        // a writable open records it failed.
        let mut stale = false;
        let mut behind_epoch = Vec::new();
        for (i, r) in rt.iter_mut().enumerate() {
            let m = &mut meta.members[i];
            let (Some(n), Some(seen)) = (&r.name, r.seen_sequence) else {
                continue;
            };
            if meta.version >= crate::format::KEYED_VERSION
                && m.current_through != 0
                && seen == m.current_through
            {
                // Still what it was when it went away (for a member recorded healthy: a
                // take-back that reached the others and not it): not read, and caught up
                // below.
                r.usable = false;
                continue;
            }
            if m.state == MemberState::Failed || seen >= meta.armed_epoch {
                continue;
            }
            r.usable = false;
            stale = true;
            behind_epoch.push(i);
            notes.push(format!(
                "member {i} ({n}) is stale: its metadata is at sequence {seen}, but data was written after sequence {} that it did not get; it is not read{} (vstor space repair takes the disk back and rebuilds it)",
                meta.armed_epoch,
                if opts.read_only {
                    ""
                } else {
                    "; recorded failed"
                }
            ));
            if !opts.read_only {
                m.state = MemberState::Failed;
                m.failed_seq = 0;
            }
        }
        if meta.version >= crate::format::KEYED_VERSION && !meta.clean && meta.sequence > 1 {
            notes.push(format!(
                "the pool was not closed cleanly after the write epoch of sequence {} (a crash, or a process killed while it had the pool open)",
                meta.armed_epoch
            ));
        }
        if meta.version < crate::format::KEYED_VERSION {
            notes.push(format!(
                "format version {}: a member that missed writes is not told apart from a current one, and block checksums are not bound to their position (a new pool has both; copy the spaces into one to upgrade)",
                meta.version
            ));
        }
        let mut missing = false;
        let mut catch_up = Vec::new();
        for (i, (m, r)) in meta.members.iter().zip(&rt).enumerate() {
            match (&r.name, m.state) {
                (None, MemberState::Removed) => {}
                (None, MemberState::Failed) => notes.push(format!("member {i} is missing (failed)")),
                (None, _) => {
                    missing = true;
                    notes.push(format!("member {i} ({}) is missing", m.id));
                }
                (Some(_), _) if behind_epoch.contains(&i) => {}
                (Some(n), _)
                    if meta.version >= crate::format::KEYED_VERSION
                        && m.current_through != 0
                        && r.seen_sequence == Some(m.current_through) =>
                {
                    if opts.read_only {
                        notes.push(format!(
                            "member {i} ({n}) missed the writes after sequence {}: it is not read; a writable open catches it up from the write-intent bitmaps",
                            m.current_through
                        ));
                    } else {
                        catch_up.push(i);
                    }
                }
                (Some(n), MemberState::Failed) => notes.push(format!(
                    "member {i} ({n}) is stale: it failed or missed writes; it is not read (vstor space repair takes the disk back and rebuilds it)"
                )),
                (Some(n), _) if r.seen_sequence < Some(meta.sequence) => {
                    stale = true;
                    notes.push(format!(
                        "member {i} ({n}) had metadata sequence {}, the pool is at {}{}",
                        r.seen_sequence.unwrap_or(0),
                        meta.sequence,
                        if opts.read_only { "" } else { "; refreshed" }
                    ));
                }
                _ => {}
            }
        }
        // After a clean close the bits left are those kept for a member that is behind: no
        // write was in flight, so there is nothing to resync.
        let was_clean = meta.version >= crate::format::KEYED_VERSION && meta.clean;
        let pool = Pool::from_parts(meta, rt, opts.read_only, notes);
        pool.inner
            .missing_unrecorded
            .store(missing, Ordering::Release);
        if (stale || !diverged.is_empty()) && !opts.read_only {
            let mut meta = pool.inner.store.lock();
            pool.inner.persist(&mut meta)?;
            // The diverged members get the kept metadata in both slots (they are failed in
            // it), so their own history is gone and the next open agrees.
            let rt = pool.inner.members.read();
            for (i, m) in meta.members.iter().enumerate() {
                let Some(dev) = rt[i].device.as_ref().filter(|_| diverged.contains(&m.id)) else {
                    continue;
                };
                let mut blob = meta.serialize(i);
                blob.resize(blob.len().div_ceil(4096) * 4096, 0);
                dev.write_at(0, &blob)?;
                dev.write_at(meta.slot_size, &blob)?;
                dev.flush()?;
            }
        }
        // A new write epoch before anything is written (with a member missing, at the first
        // write, once it is recorded failed: see `Inner::record_missing`).
        if !opts.read_only && !missing {
            pool.inner.arm(false)?;
        }
        // The journal first: replayed parity updates make their rows agree before the
        // bitmap resync looks at them.
        let journal_notes = pool.inner.recover_journal()?;
        lock(&pool.inner.notes).extend(journal_notes);
        let (_, resync_notes) = pool.inner.resync_at_open(was_clean)?;
        lock(&pool.inner.notes).extend(resync_notes);
        for i in catch_up {
            let note = pool.inner.catch_up(i);
            lock(&pool.inner.notes).push(note);
        }
        Ok(pool)
    }

    /// Creates a pool of `count` new files of `disk_size` bytes each, `disk0.raw`,
    /// `disk1.raw`, ..., in `dir` (created if needed; existing files are never overwritten).
    /// The files are locked as [`open_dir`](Pool::open_dir) locks them.
    pub fn create_in_dir(
        dir: &Path,
        count: usize,
        disk_size: u64,
        opts: &CreateOptions,
        file: &FileOptions,
    ) -> Result<Pool> {
        if count == 0 || count > MAX_MEMBERS {
            return Err(invalid(format!(
                "a pool has 1 to {MAX_MEMBERS} disks, not {count}"
            )));
        }
        if disk_size % 4096 != 0 {
            return Err(invalid(format!(
                "disk size {disk_size} is not a multiple of 4096"
            )));
        }
        let min = Meta::data_start_for(crate::format::VERSION, MIN_SLOT)
            + opts.slab_size
            + crate::csum::area_bytes(1, opts.slab_size);
        if disk_size < min {
            return Err(SpacesError::DiskTooSmall {
                disk: dir.join("disk0.raw").display().to_string(),
                size: disk_size,
                needed: min,
            }
            .into());
        }
        let paths: Vec<PathBuf> = (0..count)
            .map(|i| dir.join(format!("disk{i}.raw")))
            .collect();
        if let Some(p) = paths.iter().find(|p| p.exists()) {
            return Err(invalid(format!("{} exists already", p.display())));
        }
        let new_dir = !dir.exists();
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut disks = Vec::new();
        let mut made = Vec::new();
        let file = &FileOptions {
            lock: true,
            ..file.clone()
        };
        let result = (|| {
            for p in &paths {
                let dev = create_member_file(p, disk_size, file)?;
                made.push(p.clone());
                disks.push(PoolDisk::new(p.display().to_string(), Arc::new(dev)));
            }
            Pool::create(disks, opts)
        })();
        if result.is_err() {
            // A failed create leaves nothing behind: no member file, no directory it made.
            for p in made {
                let _ = std::fs::remove_file(p);
            }
            if new_dir {
                let _ = std::fs::remove_dir(dir);
            }
        }
        result
    }

    /// Adds a new member file of `disk_size` bytes to the pool, in `dir` under the first free
    /// name `disk0.raw`, `disk1.raw`, ... (the pool's directory, as
    /// [`open_dir`](Pool::open_dir) finds it), locked as `open_dir` locks members. Returns the
    /// new member's index and the file. When it fails, the file is gone again.
    pub fn add_disk_in_dir(
        &self,
        dir: &Path,
        disk_size: u64,
        file: &FileOptions,
    ) -> Result<(usize, PathBuf)> {
        if self.inner.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        if disk_size % 4096 != 0 {
            return Err(invalid(format!(
                "disk size {disk_size} is not a multiple of 4096"
            )));
        }
        let path = (0..MAX_MEMBERS * 4)
            .map(|i| dir.join(format!("disk{i}.raw")))
            .find(|p| !p.exists())
            .ok_or_else(|| invalid(format!("{} has no free disk name", dir.display())))?;
        let file = &FileOptions {
            lock: true,
            ..file.clone()
        };
        let dev = create_member_file(&path, disk_size, file)?;
        match self.add_disk(PoolDisk::new(path.display().to_string(), Arc::new(dev))) {
            Ok(i) => Ok((i, path)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// [`remove_member`](Pool::remove_member) for a pool opened with
    /// [`open_dir`](Pool::open_dir) from `dir`, which then takes the member's disk out of the
    /// pool's directory, so no later open meets it: a member file in `dir` is deleted (it holds
    /// nothing of the pool: a member with slabs is refused), a device listed in
    /// `dir`/[`DEVICES_FILE`] is taken off the list (the device itself is left as it is).
    /// Returns the disk taken out, if the member was present. A disk that cannot be taken out
    /// (the member is removed in the metadata already) is an error naming it; a later open
    /// skips it with a note.
    pub fn remove_member_in_dir(&self, dir: &Path, index: usize) -> Result<Option<PathBuf>> {
        let name = self
            .inner
            .members
            .read()
            .get(index)
            .and_then(|r| r.device.as_ref().and(r.name.clone()));
        self.remove_member(index)?;
        let Some(name) = name else {
            return Ok(None);
        };
        let path = PathBuf::from(&name);
        let list = dir.join(DEVICES_FILE);
        let listed = std::fs::read_to_string(&list)
            .ok()
            .filter(|text| text.lines().any(|l| l.trim() == name.as_str()));
        if let Some(text) = listed {
            let rest: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim().is_empty() && l.trim() != name.as_str())
                .collect();
            let tmp = dir.join(format!(".{DEVICES_FILE}.new"));
            std::fs::write(&tmp, rest.join("\n") + "\n")
                .and_then(|()| std::fs::rename(&tmp, &list))
                .map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    on_disk(
                        &name,
                        Error::io(format!("take it off {}", list.display()), e),
                    )
                })?;
        } else if path.parent() == Some(dir) {
            std::fs::remove_file(&path)
                .map_err(|e| on_disk(&name, Error::io("delete the removed member's file", e)))?;
        } else {
            return Ok(None);
        }
        Ok(Some(path))
    }

    /// Creates a pool on existing devices or files (`paths`), and records their paths in
    /// `dir`/[`DEVICES_FILE`] (one a line) so that [`open_dir`](Pool::open_dir) finds them:
    /// `dir` then only names the pool. The devices must not belong to a pool. They are locked
    /// as [`open_dir`](Pool::open_dir) locks them.
    pub fn create_with_devices(
        dir: &Path,
        paths: &[PathBuf],
        opts: &CreateOptions,
        file: &FileOptions,
    ) -> Result<Pool> {
        let list = dir.join(DEVICES_FILE);
        if list.exists() {
            return Err(invalid(format!("{} exists already", list.display())));
        }
        let mut disks = Vec::new();
        let mut names = Vec::new();
        let file = &FileOptions {
            lock: true,
            ..file.clone()
        };
        for p in paths {
            let abs = std::fs::canonicalize(p)
                .map_err(|e| Error::io(format!("find {}", p.display()), e))?;
            let dev = FileDevice::open(&abs, file)?;
            names.push(abs.display().to_string());
            disks.push(PoolDisk::new(abs.display().to_string(), Arc::new(dev)));
        }
        let pool = Pool::create(disks, opts)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        std::fs::write(&list, names.join("\n") + "\n")
            .map_err(|e| Error::io(format!("write {}", list.display()), e))?;
        Ok(pool)
    }

    /// Opens the pool whose member files are in `dir`: every regular file there is offered,
    /// and every device or file listed in `dir`/[`DEVICES_FILE`].
    ///
    /// Every file and device is locked while the pool is open (an advisory `flock`, see
    /// [`FileOptions::lock`]): exclusively for a writable open, shared for a read-only one, so
    /// several read-only opens may share a pool but a writer excludes every other open. An open
    /// that finds a member locked fails with [`vstor_core::Error::Locked`], which names it,
    /// before anything is written. ([`Pool::open`] on devices the caller opened takes no lock.)
    pub fn open_dir(dir: &Path, opts: &OpenOptions, file: &FileOptions) -> Result<Pool> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("read directory {}", dir.display()), e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()) && e.file_name() != DEVICES_FILE)
            .map(|e| e.path())
            .collect();
        paths.sort();
        let local = paths.len();
        let list = dir.join(DEVICES_FILE);
        if list.exists() {
            let text = std::fs::read_to_string(&list)
                .map_err(|e| Error::io(format!("read {}", list.display()), e))?;
            paths.extend(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(PathBuf::from),
            );
        }
        // Every member locked (flock: exclusive when writable, shared when read-only) while
        // the pool is open, so that two processes never write one pool.
        let fo = FileOptions {
            read_only: opts.read_only || file.read_only,
            lock: true,
            ..file.clone()
        };
        let mut disks = Vec::new();
        let mut unopened = Vec::new();
        for (i, p) in paths.into_iter().enumerate() {
            match FileDevice::open(&p, &fo) {
                Ok(dev) => disks.push(PoolDisk::new(p.display().to_string(), Arc::new(dev))),
                // A listed device that cannot be opened is a missing member, not a failure;
                // one that another process holds is a failure.
                Err(e) if i >= local && !matches!(e, Error::Locked { .. }) => {
                    unopened.push(format!("{} (listed in {DEVICES_FILE}): {e}", p.display()))
                }
                Err(e) => return Err(e),
            }
        }
        if disks.is_empty() {
            return Err(SpacesError::NoPool(format!("{} holds no files", dir.display())).into());
        }
        let pool = Pool::open(disks, opts)?;
        lock(&pool.inner.notes).extend(unopened);
        Ok(pool)
    }

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

    /// [`Pool::resize_space`] of the space `id`.
    pub(crate) fn resize_space(&self, id: Uuid, new_size: u64) -> Result<SpaceInfo> {
        if self.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        if new_size == 0 || new_size % 4096 != 0 {
            return Err(invalid(format!(
                "space size {new_size} is not a positive multiple of 4096"
            )));
        }
        let mut meta = self.store.lock();
        let si = meta
            .spaces
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| SpacesError::NoSuchSpace(format!("{id} (deleted)")))?;
        let old = meta.spaces[si].size;
        if new_size == old {
            return Ok(space_info(&meta.spaces[si], &self.members.usable()));
        }
        if new_size < old {
            return Err(invalid(format!(
                "space '{}' is {old} bytes; a space grows but never shrinks (that would cut its data), so {new_size} is refused",
                meta.spaces[si].name
            )));
        }
        let layout = meta.spaces[si].layout;
        let have = meta.spaces[si].extents.len();
        let count = layout.extents_for(new_size);
        if !meta.room_for_refs((count - have as u64).saturating_mul(layout.width as u64)) {
            return Err(SpacesError::PoolFull(format!(
                "the pool metadata area ({} bytes) cannot describe {} more extents",
                meta.slot_size,
                count - have as u64
            ))
            .into());
        }
        let count = count as usize;
        let mut next = meta.clone();
        next.spaces[si].extents.resize(count, None);
        next.spaces[si].size = new_size;
        let mut fresh = Vec::new();
        if next.spaces[si].provisioning == Provisioning::Fixed {
            let eligible = self.members.eligible(&meta);
            let mut allocator = self.store.allocator(&meta, &eligible);
            for e in have..count {
                let slots = allocator.extent(layout.width, &[]).ok_or_else(|| {
                    SpacesError::PoolFull(format!(
                        "growing fixed space '{}' to {new_size} bytes needs {} more slabs on {} disks",
                        next.spaces[si].name,
                        (count - have) as u64 * layout.width as u64,
                        layout.width
                    ))
                })?;
                fresh.push(slots.clone());
                next.spaces[si].extents[e] = Some(slots);
            }
        }
        self.zero_new(&next, fresh.iter())?;
        // An open space: its map grows (held for writing, so no I/O of it is in flight) before
        // its size does.
        let shared = lock(&self.open_spaces).get(&id).and_then(Weak::upgrade);
        let mut map = shared
            .as_ref()
            .map(|sh| sh.extents.write().unwrap_or_else(|p| p.into_inner()));
        self.persist(&mut next)?;
        *meta = next;
        if let (Some(sh), Some(map)) = (&shared, map.as_mut()) {
            map.resize(count, None);
            for (e, slots) in meta.spaces[si].extents.iter().enumerate().skip(have) {
                map[e].clone_from(slots);
            }
            sh.set_size(new_size);
        }
        drop(map);
        self.members.changed();
        let info = space_info(&meta.spaces[si], &self.members.usable());
        drop(meta);
        if let Some(sh) = shared {
            // The size as it is now: a later grow may have published already.
            sh.signal.publish(sh.size());
        }
        Ok(info)
    }

    /// Gives the slabs of thin extents of a space back to the pool (a discard covers the
    /// extents whole): recorded in the pool metadata, then gone from the space's map, so they
    /// read as zeroes and a later write allocates (and zeroes) new slabs. Returns the extents
    /// released. It leaves to the caller (who zeroes them) the extents of a fixed space, those
    /// not allocated, the one being rebuilt, and those with parity journal records left in the
    /// current generation (see [`Journal::forget_extents`](crate::journal::Journal)).
    pub(crate) fn release(
        &self,
        space: &SpaceShared,
        extents: &[u64],
        end: u64,
    ) -> Result<Vec<u64>> {
        if self.read_only || extents.is_empty() {
            return Ok(Vec::new());
        }
        // What can be released at all (checked again under the locks below), so that a fixed
        // space or the extent being rebuilt costs no journal turn.
        let extents: Vec<u64> = {
            let meta = self.store.lock();
            let Some(s) = meta.spaces.iter().find(|s| s.id == space.id) else {
                return Ok(Vec::new());
            };
            if s.provisioning != Provisioning::Thin {
                return Ok(Vec::new());
            }
            let rebuilding = space.rebuilding_extent();
            extents
                .iter()
                .copied()
                .filter(|&e| {
                    Some(e) != rebuilding && s.extents.get(e as usize).is_some_and(Option::is_some)
                })
                .collect()
        };
        if extents.is_empty() {
            return Ok(Vec::new());
        }
        if space.layout.parities() > 0 {
            // Outside every lock: it may wait for journaled batches in flight.
            if let Err((m, e)) =
                self.journal
                    .forget_extents(&self.members.snapshot(), space.id, &extents)
            {
                self.fail_member(m, &format!("parity journal: {e}"));
                return Ok(Vec::new());
            }
        }
        // The order of the rebuild's switch: the metadata, then the space's map (held for
        // writing, so no I/O of the space is in flight).
        let mut meta = self.store.lock();
        let mut map = space.extents.write().unwrap_or_else(|p| p.into_inner());
        let rebuilding = space.rebuilding_extent();
        let Some(si) = meta.spaces.iter().position(|s| s.id == space.id) else {
            return Ok(Vec::new());
        };
        if meta.spaces[si].provisioning != Provisioning::Thin {
            return Ok(Vec::new());
        }
        let mut next = meta.clone();
        let mut gone = Vec::new();
        for &e in &extents {
            let Some(slot) = next.spaces[si].extents.get_mut(e as usize) else {
                continue;
            };
            // The discard covers `[.., end)`; an extent past it counted as covered because
            // it was the space's last: not if the space grew since (a write may be there).
            let reach = (e + 1) * space.layout.extent_bytes();
            if slot.is_none()
                || (reach > end && end < space.size())
                || rebuilding == Some(e)
                || (space.layout.parities() > 0 && self.journal.extent_logged(space.id, e))
            {
                continue;
            }
            *slot = None;
            gone.push(e);
        }
        if gone.is_empty() {
            return Ok(gone);
        }
        self.persist(&mut next)?;
        *meta = next;
        for &e in &gone {
            map[e as usize] = None;
        }
        space.map_version.fetch_add(1, Ordering::AcqRel);
        // A chunk a rebuild read ahead is stale now, as after a write.
        space.writes_while_rebuilding.fetch_add(1, Ordering::AcqRel);
        drop(map);
        drop(meta);
        self.members.changed();
        Ok(gone)
    }

    /// Allocates the thin extents `extents` of a space that are not allocated yet: zeroes
    /// their slabs, records them, and puts them in the space's map (with the metadata's lock
    /// held, as every change of an extent's slabs: a map taken from the metadata earlier and
    /// installed later could undo a rebuild's switch or a discard's release in between).
    pub fn allocate(&self, shared: &SpaceShared, extents: &[u64]) -> Result<()> {
        let id = shared.id;
        let mut meta = self.store.lock();
        let eligible = self.members.eligible(&meta);
        let mut next = meta.clone();
        let mut allocator = self.store.allocator(&next, &eligible);
        let si = next
            .spaces
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| SpacesError::NoSuchSpace(format!("{id} (deleted)")))?;
        let space = &mut next.spaces[si];
        let width = space.layout.width;
        let mut fresh = Vec::new();
        for &e in extents {
            let e = e as usize;
            if space.extents[e].is_none() {
                let slots = allocator.extent(width, &[]).ok_or_else(|| {
                    SpacesError::PoolFull(format!(
                        "space '{}' needs {width} slabs on distinct disks; only {} disks have room",
                        space.name,
                        allocator.members_with_room()
                    ))
                })?;
                fresh.push(slots.clone());
                space.extents[e] = Some(slots);
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        self.zero_new(&next, fresh.iter())?;
        let mut map = shared.extents.write().unwrap_or_else(|p| p.into_inner());
        self.persist(&mut next)?;
        *meta = next;
        for &e in extents {
            if let (Some(slot), Some(got)) = (
                map.get_mut(e as usize),
                meta.spaces[si].extents.get(e as usize),
            ) {
                if slot.is_none() {
                    slot.clone_from(got);
                }
            }
        }
        drop(map);
        self.members.changed();
        Ok(())
    }
}
