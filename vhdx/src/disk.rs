//! An open VHDX image as a [`BlockDevice`].
//!
//! # Concurrency
//! The BAT lives in memory as atomics. Reads and writes to blocks that are already mapped look
//! up their entry with one atomic load and go straight to the file: no lock. Only metadata
//! changes take the `meta` mutex: reserving space for a new block, publishing a block's new
//! state, and committing. A block being allocated is *reserved* (an offset set aside, the file
//! extended); every writer that reaches it before it is published writes into the reservation,
//! so concurrent first writes to one block are safe and nobody waits for anybody.
//!
//! # Durability
//! A write completes when its data is in the file and its block's new state is in memory. The
//! metadata that changed (BAT and sector bitmap pages) is committed at flush: flush the file
//! (data before the metadata that points at it; this also retires the previous log entries),
//! write the pages as one log sequence, flush (the commit point), then write the pages in place
//! (flushed by the next commit). A crash at any write leaves either the old metadata or a log
//! whose replay gives the new one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use smallvec::SmallVec;
use vstor_core::{
    carve_read_bufs, carve_write_bufs, zero_bufs, BlockDevice, CapacitySignal, DeviceInfo, Error,
    FileDevice, FileOptions, Op, Request, Result, Supports,
};
use zerocopy::FromBytes;

use crate::create::{self, CreateOptions, DiskKind, ParentFacts};
use crate::error::{corrupt, VhdxError};
use crate::format::*;
use crate::log::{self, LogWriter, Overlay};
use crate::meta::{self, Headers, Metadata, Regions};

mod maintain;
mod resize;
pub use maintain::CompactReport;
pub use resize::ResizeReport;

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open read-only (the parents of a differencing disk are always read-only).
    pub read_only: bool,
    /// A read-only open of an image whose log needs replay replays it in memory (true), or
    /// fails with [`VhdxError::ReplayNeeded`] (false).
    pub replay_in_memory: bool,
    /// How the files are opened (direct I/O, engine).
    pub file: FileOptions,
    /// The deepest differencing chain accepted.
    pub max_chain_depth: usize,
    /// Accept a parent whose DataWriteGuid is not the linkage the child records (for the
    /// operator who knows the parent is right; the image's own parent only, not further up).
    pub ignore_linkage: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            replay_in_memory: true,
            file: FileOptions::default(),
            max_chain_depth: 64,
            ignore_linkage: false,
        }
    }
}

impl OpenOptions {
    /// Read-only options.
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            ..Default::default()
        }
    }
}

/// The kind of an open image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// LeaveBlockAllocated.
    Fixed,
    /// Blocks allocated on demand.
    Dynamic,
    /// HasParent.
    Differencing,
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageKind::Fixed => "fixed",
            ImageKind::Dynamic => "dynamic",
            ImageKind::Differencing => "differencing",
        })
    }
}

/// Where a piece of the virtual disk lives (see [`Vhdx::locate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    /// In this file, at this byte offset.
    File(u64),
    /// Nowhere: it reads as zeros.
    Zero,
    /// In the parent, at this virtual offset.
    Parent(u64),
}

/// What a completed piece of a write must make visible.
#[derive(Clone, Copy, Debug)]
enum Post {
    None,
    /// Publish the block with this state and offset.
    Publish {
        block: u64,
        state: u64,
        offset: u64,
    },
    /// Set the sector bits of `sectors` in the block's chunk, then publish PARTIALLY_PRESENT.
    Bits {
        block: u64,
        offset: u64,
        first: u64,
        count: u64,
    },
}

/// How a read maps: (length, source) pieces.
type ReadPlan = SmallVec<[(u64, Src); 4]>;
/// How a write maps: (length, file offset, what to publish) pieces.
type WritePlan = SmallVec<[(u64, u64, Post); 4]>;

/// A block set aside for allocation but not yet published.
#[derive(Clone, Copy, Debug)]
struct Reservation {
    offset: u64,
    /// Differencing disk, block was NOT_PRESENT: partial writes publish PARTIALLY_PRESENT.
    partial_ok: bool,
}

#[derive(Clone, Copy, Debug)]
enum PageSrc {
    Bat(u64),
    Bitmap { chunk: u64, page: u64 },
}

struct Meta {
    header: Header,
    header_slot: usize,
    started: bool,
    /// The DataWriteGuid was renewed in this session.
    data_renewed: bool,
    log: LogWriter,
    alloc_ptr: u64,
    file_len: u64,
    /// Dirty metadata pages by file offset.
    dirty: BTreeMap<u64, PageSrc>,
    reserved: HashMap<u64, Reservation>,
    closed: bool,
}

/// Everything a resize replaces: the geometry and the tables that depend on the size. I/O
/// holds it shared for a whole batch; a resize holds it exclusively, so no request sees a size
/// change halfway.
struct Table {
    geo: Geometry,
    bat_offset: u64,
    bat_len: u64,
    bat: Box<[AtomicU64]>,
    bitmaps: Box<[OnceLock<Box<[AtomicU64]>>]>,
    info: DeviceInfo,
    regions: Regions,
    metadata: Metadata,
}

/// An open VHDX image.
pub struct Vhdx {
    name: String,
    path: Option<PathBuf>,
    file: Arc<dyn BlockDevice>,
    parent: Option<Arc<Vhdx>>,
    table: RwLock<Table>,
    bitmap_load: Mutex<()>,
    meta: Mutex<Meta>,
    started: AtomicBool,
    read_only: bool,
    leave_allocated: bool,
    signal: Arc<CapacitySignal>,
    creator: String,
    headers: Headers,
    replayed: Option<String>,
    file_notes: Vec<String>,
}

impl std::fmt::Debug for Vhdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhdx")
            .field("name", &self.name)
            .field("geometry", &self.table().geo)
            .finish_non_exhaustive()
    }
}

/// Everything parsed from a file, before the parent is attached.
struct Loaded {
    name: String,
    file: Arc<dyn BlockDevice>,
    headers: Headers,
    regions: Regions,
    metadata: Metadata,
    creator: String,
    bat: Vec<u64>,
    read_only: bool,
    replayed: Option<String>,
}

fn load(file: Arc<dyn BlockDevice>, name: &str, opts: &OpenOptions) -> Result<Loaded> {
    let read_only = opts.read_only || file.info().read_only;
    let creator = meta::read_identifier(&*file, name)?;
    let mut headers = meta::read_headers(&*file, name)?;
    let mut file = file;
    let mut replayed = None;
    let h = headers.current.header.clone();
    if !h.log_guid.is_nil() {
        let (lo, ll) = (h.log_offset.get(), h.log_length.get() as u64);
        match log::find_active(&*file, name, lo, ll, h.log_guid)? {
            Some(active) => {
                log::validate_targets(&active, name, lo, ll)?;
                let n = active.entries.len();
                if read_only {
                    if !opts.replay_in_memory {
                        return Err(VhdxError::ReplayNeeded(name.to_string()).into());
                    }
                    file = Arc::new(Overlay::new(file, name, &active)?);
                    replayed = Some(format!(
                        "{n} log entries replayed in memory (the file is unchanged)"
                    ));
                } else {
                    log::replay(&*file, name, &active)?;
                    replayed = Some(format!("{n} log entries replayed"));
                }
            }
            None => {
                replayed = Some(
                    "the log was marked in use but held no valid entry; nothing replayed".into(),
                )
            }
        }
        if !read_only {
            // The log is applied: clear the LogGuid.
            let mut nh = h.clone();
            nh.log_guid = Guid::NIL;
            nh.file_write_guid = Guid::random();
            let slot = write_header(&*file, &mut nh, headers.current.slot)?;
            headers.current = meta::HeaderSlot { slot, header: nh };
        }
    }
    let regions = meta::read_regions(&*file, name)?;
    let metadata = meta::read_metadata(&*file, name, &regions.metadata)?;
    let g = &metadata.geometry;
    let log_region = (h.log_offset.get(), h.log_length.get() as u64);
    let overlaps = |a: (u64, u64), b: (u64, u64)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
    for r in &regions.all {
        if overlaps((r.offset, r.length), log_region) {
            return Err(corrupt(
                name,
                REGION_TABLE_OFFSETS[regions.copy],
                "region table",
                format!("region {} overlaps the log", r.guid),
            ));
        }
    }
    if g.bat_entries * 8 > regions.bat.length {
        return Err(corrupt(
            name,
            regions.bat.offset,
            "BAT region",
            format!(
                "{} bytes cannot hold the {} entries the geometry needs",
                regions.bat.length, g.bat_entries
            ),
        ));
    }
    let mut raw = vec![0u8; (g.bat_entries * 8).next_multiple_of(4096) as usize];
    file.read_at(regions.bat.offset, &mut raw)?;
    raw.truncate((g.bat_entries * 8) as usize);
    let bat: Vec<u64> = <[zerocopy::little_endian::U64]>::ref_from_bytes(&raw)
        .expect("aligned size")
        .iter()
        .map(|e| e.get())
        .collect();
    validate_bat(
        &bat,
        g,
        name,
        regions.bat.offset,
        file.capacity(),
        &regions,
        log_region,
    )?;
    Ok(Loaded {
        name: name.to_string(),
        file,
        headers,
        regions,
        metadata,
        creator,
        bat,
        read_only,
        replayed,
    })
}

/// Checks every BAT entry's state and that mapped blocks lie inside the file and outside the
/// fixed structures (so that no write through a hostile BAT lands on metadata).
fn validate_bat(
    bat: &[u64],
    g: &Geometry,
    name: &str,
    bat_off: u64,
    file_size: u64,
    regions: &Regions,
    log: (u64, u64),
) -> Result<()> {
    let forbidden: Vec<(u64, u64)> = regions
        .all
        .iter()
        .map(|r| (r.offset, r.length))
        .chain([(0, HEADER_SECTION_END), log])
        .collect();
    for (i, &e) in bat.iter().enumerate() {
        let i = i as u64;
        let is_bitmap = (i + 1) % (g.chunk_ratio + 1) == 0;
        let st = bat_state(e);
        let at = bat_off + i * 8;
        let (mapped, len) = if is_bitmap {
            match st {
                bitmap::NOT_PRESENT => (false, MIB),
                bitmap::PRESENT => (true, MIB),
                _ => {
                    return Err(corrupt(
                        name,
                        at,
                        "BAT sector bitmap entry",
                        format!("state {st} is not defined"),
                    ))
                }
            }
        } else {
            match st {
                payload::FULLY_PRESENT => (true, g.block_size as u64),
                payload::PARTIALLY_PRESENT if g.has_parent => (true, g.block_size as u64),
                payload::PARTIALLY_PRESENT => {
                    return Err(corrupt(
                        name,
                        at,
                        "BAT payload entry",
                        "PARTIALLY_PRESENT in a disk without a parent",
                    ))
                }
                payload::NOT_PRESENT
                | payload::UNDEFINED
                | payload::ZERO
                | payload::UNMAPPED
                | payload::UNMAPPED_LEGACY => (false, g.block_size as u64),
                _ => {
                    return Err(corrupt(
                        name,
                        at,
                        "BAT payload entry",
                        format!("state {st} is not defined"),
                    ))
                }
            }
        };
        // The last block may be short in the file (QEMU sizes files to the virtual disk).
        let len = len.min(g.mapped_len(i));
        let off = bat_offset(e);
        if mapped || off != 0 {
            let end = off.saturating_add(len);
            if mapped && off == 0 {
                return Err(corrupt(
                    name,
                    at,
                    "BAT entry",
                    "a mapped block at file offset 0",
                ));
            }
            if end > file_size {
                if mapped {
                    return Err(corrupt(name, at, "BAT entry", format!("block at {off} of {len} bytes reaches past the end of the file ({file_size} bytes)")));
                }
                continue;
            }
            if let Some(r) = forbidden.iter().find(|r| off < r.0 + r.1 && r.0 < end) {
                if mapped {
                    return Err(corrupt(name, at, "BAT entry", format!("block at {off} of {len} bytes overlaps the structure at {} of {} bytes", r.0, r.1)));
                }
            }
        }
    }
    Ok(())
}

/// Writes `h` (with its sequence number bumped) into the slot after `current_slot` and flushes.
/// The end of everything the file holds (rounded up to 1 MiB): headers, log, regions and every
/// block a BAT entry points at (inside the file).
fn used_end(
    regions: &Regions,
    log: (u64, u64),
    g: &Geometry,
    bat: impl Iterator<Item = u64>,
    file_len: u64,
) -> u64 {
    let mut end = HEADER_SECTION_END.max(log.0 + log.1);
    for r in &regions.all {
        end = end.max(r.offset + r.length);
    }
    for (i, e) in bat.enumerate() {
        let off = bat_offset(e);
        if off != 0 {
            let len = g.mapped_len(i as u64);
            if off.saturating_add(len) <= file_len {
                end = end.max(off + len);
            }
        }
    }
    end.next_multiple_of(MIB)
}

fn write_header(file: &dyn BlockDevice, h: &mut Header, current_slot: usize) -> Result<usize> {
    h.sequence_number = (h.sequence_number.get() + 1).into();
    let slot = 1 - current_slot;
    file.write_at(HEADER_OFFSETS[slot], &meta::header_bytes(h))?;
    file.flush()?;
    Ok(slot)
}

/// What an open of a chain carries from the child down to its parents.
#[derive(Default)]
struct Walk {
    /// The canonical paths of the disks opened so far (to find cycles).
    seen: Vec<PathBuf>,
    /// The page-83 identifiers of the disks from the top of the open down to the one being
    /// attached to its parent (to tell a merge's own top from other children).
    ids: Vec<Guid>,
    /// The open is a merge's: a merge marker of an older vstor is passed.
    merging: bool,
}

/// Interprets a locator path: Windows separators, an optional `\\?\` prefix.
fn locator_path(s: &str) -> PathBuf {
    let s = s.strip_prefix("\\\\?\\").unwrap_or(s);
    PathBuf::from(s.replace('\\', "/"))
}

impl Vhdx {
    /// Opens the image at `path` and its whole parent chain.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Vhdx> {
        Self::open_chain(path.as_ref(), opts, &mut Walk::default())
    }

    /// Opens the image at `path` and its chain for a merge of it: as [`Vhdx::open`], and a
    /// merge marker of an older vstor (which does not say which disk it merges) is passed.
    pub(crate) fn open_for_merge(path: &Path, opts: &OpenOptions) -> Result<Vhdx> {
        let mut walk = Walk {
            merging: true,
            ..Default::default()
        };
        Self::open_chain(path, opts, &mut walk)
    }

    fn open_chain(path: &Path, opts: &OpenOptions, walk: &mut Walk) -> Result<Vhdx> {
        let canon = std::fs::canonicalize(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        if walk.seen.contains(&canon) {
            return Err(VhdxError::ChainCycle(canon).into());
        }
        if walk.seen.len() > opts.max_chain_depth {
            return Err(VhdxError::ChainTooDeep(opts.max_chain_depth).into());
        }
        walk.seen.push(canon.clone());
        let mut fo = opts.file.clone();
        fo.read_only = opts.read_only;
        let file = FileDevice::open(path, &fo)?;
        let file_notes: Vec<String> = file
            .direct_fallback()
            .into_iter()
            .chain(file.engine_fallback())
            .map(|n| format!("{}: {n}", path.display()))
            .collect();
        let file = Arc::new(file);
        let name = path.display().to_string();
        let loaded = load(file, &name, opts)?;
        walk.ids.push(loaded.metadata.page83);
        let depth = walk.ids.len();
        let parent = match &loaded.metadata.parent {
            None => None,
            Some(loc) => {
                let dir = canon.parent().unwrap_or(Path::new("/")).to_path_buf();
                let mut tried = Vec::new();
                let mut found = None;
                for key in [
                    create::POSIX_RELATIVE_PATH,
                    "relative_path",
                    "absolute_win32_path",
                ] {
                    if let Some(v) = loc.get(key) {
                        // vstor's own key is a path of this system, taken as it is; the others
                        // are Windows paths.
                        let p = if key == create::POSIX_RELATIVE_PATH {
                            PathBuf::from(v)
                        } else {
                            locator_path(v)
                        };
                        let p = if p.is_absolute() { p } else { dir.join(p) };
                        let p: PathBuf = p
                            .components()
                            .filter(|c| !matches!(c, std::path::Component::CurDir))
                            .collect();
                        tried.push(p.display().to_string());
                        if p.is_file() {
                            found = Some(p);
                            break;
                        }
                    }
                }
                let Some(ppath) = found else {
                    return Err(VhdxError::ParentNotFound { child: name, tried }.into());
                };
                // A parent must stay as it is while a child is open on it: its image lock (if
                // the child's open takes locks) keeps every writer out, even one that shares.
                let mut popts = OpenOptions {
                    read_only: true,
                    ignore_linkage: false,
                    ..opts.clone()
                };
                popts.file.keep_writers_out = true;
                let parent = Self::open_chain(&ppath, &popts, walk)?;
                Some(Arc::new(parent))
            }
        };
        walk.ids.truncate(depth);
        let mut v = Self::assemble(loaded, parent, opts.ignore_linkage, walk)?;
        v.path = Some(path.to_path_buf());
        v.file_notes = file_notes;
        Ok(v)
    }

    /// Opens the differencing image at `path` over `parent` instead of the parent its locator
    /// names (reparenting uses this to look at the child against a new parent).
    pub fn open_with_parent(path: &Path, opts: &OpenOptions, parent: Arc<Vhdx>) -> Result<Vhdx> {
        let mut fo = opts.file.clone();
        fo.read_only = opts.read_only;
        let file = Arc::new(FileDevice::open(path, &fo)?);
        let name = path.display().to_string();
        let loaded = load(file, &name, opts)?;
        let walk = Walk {
            ids: vec![loaded.metadata.page83],
            ..Default::default()
        };
        let mut v = Self::assemble(loaded, Some(parent), opts.ignore_linkage, &walk)?;
        v.path = Some(path.to_path_buf());
        Ok(v)
    }

    /// Opens an image on any block device; a differencing image needs its `parent`.
    pub fn open_on(
        file: Arc<dyn BlockDevice>,
        name: &str,
        opts: &OpenOptions,
        parent: Option<Arc<Vhdx>>,
    ) -> Result<Vhdx> {
        let loaded = load(file, name, opts)?;
        let walk = Walk {
            ids: vec![loaded.metadata.page83],
            ..Default::default()
        };
        Self::assemble(loaded, parent, opts.ignore_linkage, &walk)
    }

    /// Attaches `parent` to the loaded child `l`; `walk.ids` ends with the child's identifier.
    fn assemble(
        l: Loaded,
        parent: Option<Arc<Vhdx>>,
        ignore_linkage: bool,
        walk: &Walk,
    ) -> Result<Vhdx> {
        let g = l.metadata.geometry.clone();
        let parent = match (&l.metadata.parent, parent) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(VhdxError::ParentNotFound {
                    child: l.name.clone(),
                    tried: vec![],
                }
                .into())
            }
            (Some(loc), Some(p)) => {
                let want = loc.get("parent_linkage").unwrap_or("");
                let have = p.data_write_guid();
                let norm = |s: &str| {
                    s.trim_matches(|c| c == '{' || c == '}')
                        .to_ascii_lowercase()
                };
                // A parent in the middle of a merge keeps the DataWriteGuid it had before in a
                // marker item, with the merged disks: the merge's own top still reads as it did
                // (the merge writes only what the merged disks hold), so it stays openable until
                // the merge finishes. Every other child that links to the old DataWriteGuid (a
                // sibling, a merged disk in the middle on its own) would read the merged data
                // through the parent, and is refused.
                let marker = p
                    .merge_marker()
                    .filter(|m| norm(want) == m.linkage.to_uuid().to_string());
                if let Some(m) = &marker {
                    crate::lifecycle::admit(m, &l.name, &p.name, &walk.ids, walk.merging)?;
                }
                if !ignore_linkage && marker.is_none() && norm(want) != have.to_uuid().to_string() {
                    return Err(VhdxError::LinkageMismatch {
                        child: l.name.clone(),
                        parent: p.name.clone(),
                        expected: want.to_string(),
                        found: format!("{{{}}}", have.to_uuid()),
                    }
                    .into());
                }
                let p_logical = p.table().geo.logical_sector;
                if p_logical != g.logical_sector {
                    return Err(VhdxError::Unsupported {
                        file: l.name.clone(),
                        what: format!(
                            "a parent with {}-byte sectors under a child with {}-byte sectors",
                            p_logical, g.logical_sector
                        ),
                    }
                    .into());
                }
                Some(p)
            }
        };
        let h = l.headers.current.header.clone();
        let file_len = l.file.capacity();
        // Where new blocks go: after everything the file holds.
        let used_end = used_end(
            &l.regions,
            (h.log_offset.get(), h.log_length.get() as u64),
            &g,
            l.bat.iter().copied(),
            file_len,
        );
        let fi = l.file.info();
        let read_only = l.read_only;
        let info = DeviceInfo {
            capacity: g.virtual_size,
            logical_sector_size: g.logical_sector,
            physical_sector_size: g.physical_sector,
            mem_alignment: fi.mem_alignment,
            read_only,
            discard_zeroes: false,
            supports: Supports {
                flush: true,
                discard: !read_only,
                write_zeroes: !read_only,
                resize: !read_only,
            },
        };
        let bitmaps = (0..if g.has_parent { g.bitmap_blocks } else { 0 })
            .map(|_| OnceLock::new())
            .collect();
        let leave_allocated = l.metadata.leave_allocated && !g.has_parent;
        let size = g.virtual_size;
        let v = Vhdx {
            name: l.name.clone(),
            path: None,
            file: l.file.clone(),
            parent,
            table: RwLock::new(Table {
                bat_offset: l.regions.bat.offset,
                bat_len: l.regions.bat.length,
                bat: l.bat.iter().map(|&e| AtomicU64::new(e)).collect(),
                bitmaps,
                info,
                regions: l.regions,
                metadata: l.metadata,
                geo: g,
            }),
            bitmap_load: Mutex::new(()),
            meta: Mutex::new(Meta {
                header: h.clone(),
                header_slot: l.headers.current.slot,
                started: false,
                data_renewed: false,
                log: LogWriter::new(h.log_offset.get(), h.log_length.get() as u64),
                alloc_ptr: used_end,
                file_len,
                dirty: BTreeMap::new(),
                reserved: HashMap::new(),
                closed: false,
            }),
            started: AtomicBool::new(false),
            read_only,
            leave_allocated,
            signal: Arc::new(CapacitySignal::new(size)),
            creator: l.creator,
            headers: l.headers,
            replayed: l.replayed,
            file_notes: Vec::new(),
        };
        if !read_only && file_len > used_end {
            // Space past every structure belongs to nothing (a crash between reserving and
            // publishing a block leaves it): give it back so that new blocks start zeroed.
            let mut m = v.lock();
            v.start_session(&mut m)?;
        }
        Ok(v)
    }

    /// Creates a new image at `path` (which must not exist) and opens it.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Vhdx> {
        let path = path.as_ref();
        let (g, locator) = match &opts.kind {
            DiskKind::Differencing { parent } => {
                let p = Vhdx::open(parent, &OpenOptions::read_only())?;
                // A parent in the middle of a merge holds part of the merged disk's data.
                if let Some(m) = p.merge_marker() {
                    crate::lifecycle::admit(&m, &path.display().to_string(), &p.name, &[], false)?;
                }
                let facts = p.parent_facts();
                let g = create::plan(opts, Some(&facts))?;
                let loc = create::locator_for(path, parent, facts.data_write_guid)?;
                (g, Some(loc))
            }
            _ => (create::plan(opts, None)?, None),
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        let result = (|| {
            let file = FileDevice::open(path, &FileOptions::default())?;
            create::write_new(
                &file,
                &g,
                opts.kind == DiskKind::Fixed,
                locator.as_ref(),
                opts.log_size,
            )
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        // A child that cannot be opened (its parent not found through the locator written) is
        // not left behind.
        Vhdx::open(path, &OpenOptions::default()).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    }

    /// Creates a new image on `file` (a disposable, resizable device); a differencing image
    /// needs its `parent` and the path written into its locator.
    pub fn create_on(
        file: Arc<dyn BlockDevice>,
        opts: &CreateOptions,
        parent: Option<(Arc<Vhdx>, &Path)>,
    ) -> Result<Vhdx> {
        let (g, loc) = match &parent {
            Some((p, ppath)) => {
                let facts = p.parent_facts();
                let g = create::plan(opts, Some(&facts))?;
                let loc =
                    create::locator_for(Path::new("child.vhdx"), ppath, facts.data_write_guid)?;
                (g, Some(loc))
            }
            None => (create::plan(opts, None)?, None),
        };
        create::write_new(
            &*file,
            &g,
            opts.kind == DiskKind::Fixed,
            loc.as_ref(),
            opts.log_size,
        )?;
        Vhdx::open_on(file, "image", &OpenOptions::default(), parent.map(|p| p.0))
    }

    fn parent_facts(&self) -> ParentFacts {
        let t = self.table();
        ParentFacts {
            size: t.geo.virtual_size,
            block_size: t.geo.block_size,
            logical: t.geo.logical_sector,
            physical: t.geo.physical_sector,
            data_write_guid: self.data_write_guid(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn table(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn table_mut(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The image's geometry (it changes when the disk is resized).
    pub fn geometry(&self) -> Geometry {
        self.table().geo.clone()
    }

    /// The kind of image.
    pub fn kind(&self) -> ImageKind {
        let t = self.table();
        if t.geo.has_parent {
            ImageKind::Differencing
        } else if t.metadata.leave_allocated {
            ImageKind::Fixed
        } else {
            ImageKind::Dynamic
        }
    }

    /// The name used in messages (the path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path, when opened from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The parent of a differencing disk.
    pub fn parent(&self) -> Option<&Arc<Vhdx>> {
        self.parent.as_ref()
    }

    /// The current header.
    pub fn header(&self) -> Header {
        self.lock().header.clone()
    }

    /// The DataWriteGuid (what a child's parent_linkage must name).
    pub fn data_write_guid(&self) -> Guid {
        self.lock().header.data_write_guid
    }

    /// The creator string of the file identifier.
    pub fn creator(&self) -> &str {
        &self.creator
    }

    /// The region table (as read at open, updated by resizes).
    pub fn regions(&self) -> Regions {
        self.table().regions.clone()
    }

    /// The metadata (as read at open, updated by resizes).
    pub fn metadata(&self) -> Metadata {
        self.table().metadata.clone()
    }

    /// Both header slots as read at open.
    pub fn headers_at_open(&self) -> &Headers {
        &self.headers
    }

    /// Notes for the operator: I/O fallbacks of this file and its parents, and log replay.
    pub fn notes(&self) -> Vec<String> {
        let mut n = self.file_notes.clone();
        if let Some(r) = &self.replayed {
            n.push(format!("{}: {r}", self.name));
        }
        if let Some(p) = &self.parent {
            n.extend(p.notes());
        }
        n
    }

    /// What happened to the log at open, if it needed replay.
    pub fn replay_note(&self) -> Option<&str> {
        self.replayed.as_deref()
    }

    /// A snapshot of the BAT.
    pub fn bat_snapshot(&self) -> Vec<u64> {
        self.table()
            .bat
            .iter()
            .map(|e| e.load(Ordering::Acquire))
            .collect()
    }

    /// The BAT region (offset, length).
    pub fn bat_region(&self) -> (u64, u64) {
        let t = self.table();
        (t.bat_offset, t.bat_len)
    }

    /// The size of the file.
    pub fn file_size(&self) -> u64 {
        self.file.capacity()
    }

    /// The underlying file device.
    pub fn file(&self) -> &Arc<dyn BlockDevice> {
        &self.file
    }

    /// Reads sector bitmap bits of block `block` (differencing disks): one bool per sector.
    pub fn sector_bitmap(&self, block: u64) -> Result<Vec<bool>> {
        let t = &*self.table();
        let spb = t.geo.sectors_per_block();
        let chunk = block / t.geo.chunk_ratio;
        let bm = self.bitmap(t, chunk)?;
        let first = (block % t.geo.chunk_ratio) * spb;
        Ok((first..first + spb)
            .map(|s| bm[(s / 64) as usize].load(Ordering::Acquire) >> (s % 64) & 1 == 1)
            .collect())
    }

    fn bitmap<'t>(&self, t: &'t Table, chunk: u64) -> Result<&'t [AtomicU64]> {
        if let Some(b) = t.bitmaps[chunk as usize].get() {
            return Ok(b);
        }
        let _g = self.bitmap_load.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = t.bitmaps[chunk as usize].get() {
            return Ok(b);
        }
        let e = t.bat[t.geo.bitmap_index(chunk) as usize].load(Ordering::Acquire);
        let words = (SECTORS_PER_BITMAP / 64) as usize;
        let b: Box<[AtomicU64]> = if bat_state(e) == bitmap::PRESENT {
            let mut raw = vec![0u8; MIB as usize];
            self.file.read_at(bat_offset(e), &mut raw)?;
            raw.chunks_exact(8)
                .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().expect("8"))))
                .collect()
        } else {
            (0..words).map(|_| AtomicU64::new(0)).collect()
        };
        let _ = t.bitmaps[chunk as usize].set(b);
        Ok(t.bitmaps[chunk as usize].get().expect("just set"))
    }

    /// Where the bytes [offset, offset+len) of the virtual disk live, as consecutive pieces of
    /// (length, place). This is the BAT (and sector bitmap) lookup every read does.
    pub fn locate(&self, offset: u64, len: u64) -> Result<Vec<(u64, Src)>> {
        let t = &*self.table();
        if offset
            .checked_add(len)
            .is_none_or(|e| e > t.geo.virtual_size)
        {
            return Err(Error::OutOfRange {
                op: vstor_core::OpKind::Read,
                offset,
                len,
                capacity: t.geo.virtual_size,
            });
        }
        let mut out = SmallVec::new();
        self.map_read(t, offset, len, &mut out)?;
        Ok(out.into_vec())
    }

    /// Maps [voff, voff+len) to read sources, merging neighbours.
    fn map_read(
        &self,
        t: &Table,
        voff: u64,
        len: u64,
        out: &mut SmallVec<[(u64, Src); 4]>,
    ) -> Result<()> {
        let bs = t.geo.block_size as u64;
        let ls = t.geo.logical_sector as u64;
        let mut pos = voff;
        let end = voff + len;
        let push = |out: &mut SmallVec<[(u64, Src); 4]>, n: u64, s: Src| {
            if let Some((pl, ps)) = out.last_mut() {
                let merge = match (*ps, s) {
                    (Src::File(a), Src::File(b)) => a + *pl == b,
                    (Src::Parent(a), Src::Parent(b)) => a + *pl == b,
                    (Src::Zero, Src::Zero) => true,
                    _ => false,
                };
                if merge {
                    *pl += n;
                    return;
                }
            }
            out.push((n, s));
        };
        while pos < end {
            let block = pos / bs;
            let inb = pos % bs;
            let n = (bs - inb).min(end - pos);
            let e = t.bat[t.geo.payload_index(block) as usize].load(Ordering::Acquire);
            match bat_state(e) {
                payload::FULLY_PRESENT => push(out, n, Src::File(bat_offset(e) + inb)),
                payload::PARTIALLY_PRESENT => {
                    let chunk = block / t.geo.chunk_ratio;
                    let bm = self.bitmap(t, chunk)?;
                    let base = (block % t.geo.chunk_ratio) * (bs / ls);
                    let mut s = inb / ls;
                    let last = (inb + n) / ls;
                    while s < last {
                        let bit = |s: u64| {
                            bm[((base + s) / 64) as usize].load(Ordering::Acquire)
                                >> ((base + s) % 64)
                                & 1
                        };
                        let v = bit(s);
                        let mut t = s + 1;
                        while t < last && bit(t) == v {
                            t += 1;
                        }
                        let (a, l) = (s * ls, (t - s) * ls);
                        if v == 1 {
                            push(out, l, Src::File(bat_offset(e) + a));
                        } else {
                            push(out, l, Src::Parent(block * bs + a));
                        }
                        s = t;
                    }
                }
                payload::NOT_PRESENT if t.geo.has_parent => push(out, n, Src::Parent(pos)),
                _ => push(out, n, Src::Zero),
            }
            pos += n;
        }
        Ok(())
    }

    /// Starts a writing session: a fresh LogGuid announced by an empty log entry, then a header
    /// with a new FileWriteGuid and that LogGuid (and trims unreferenced tail space). The
    /// DataWriteGuid is renewed once per session, by the first change of what the disk reads
    /// ([`start_data_session`](Vhdx::start_data_session)): changing only metadata (a parent
    /// locator, the physical sector size, compaction) leaves the disk's children linked.
    fn start_session(&self, m: &mut Meta) -> Result<()> {
        self.session(m, false)
    }

    /// A session in which the data changes (see [`start_session`](Vhdx::start_session)).
    fn start_data_session(&self, m: &mut Meta) -> Result<()> {
        self.session(m, true)
    }

    fn session(&self, m: &mut Meta, data: bool) -> Result<()> {
        if m.started && (!data || m.data_renewed) {
            return Ok(());
        }
        if m.closed {
            return Err(Error::InvalidArgument(format!("{} is closed", self.name)));
        }
        let mut h = m.header.clone();
        if !m.started {
            if m.file_len > m.alloc_ptr {
                self.file.resize(m.alloc_ptr)?;
                m.file_len = m.alloc_ptr;
            }
            m.log = LogWriter::new(m.log.log_offset, m.log.log_length);
            let (fl, ap) = (m.file_len, m.alloc_ptr);
            m.log.write_sequence(&*self.file, &[], fl, ap)?;
            self.file.flush()?;
            h.file_write_guid = Guid::random();
            h.log_guid = m.log.guid;
        }
        if data {
            h.data_write_guid = Guid::random();
        }
        m.header_slot = write_header(&*self.file, &mut h, m.header_slot)?;
        m.header = h;
        m.started = true;
        m.data_renewed |= data;
        self.started.store(m.data_renewed, Ordering::Release);
        Ok(())
    }

    fn allocate(&self, m: &mut Meta, bytes: u64) -> Result<u64> {
        let off = m.alloc_ptr;
        let end = off + bytes;
        if end > m.file_len {
            self.file.resize(end)?;
            m.file_len = end;
        }
        m.alloc_ptr = end;
        Ok(off)
    }

    /// Finds or makes the reservation for `block`, which is not mapped.
    fn reserve(&self, t: &Table, m: &mut Meta, block: u64) -> Result<Reservation> {
        if let Some(r) = m.reserved.get(&block) {
            return Ok(*r);
        }
        let e = t.bat[t.geo.payload_index(block) as usize].load(Ordering::Acquire);
        let bs = t.geo.block_size as u64;
        let st = bat_state(e);
        let partial_ok = t.geo.has_parent && st == payload::NOT_PRESENT;
        let old = bat_offset(e);
        // An unmapped block that kept its space (soft-anchored) reuses it, zeroed first. Only
        // its part inside the virtual disk is its own: a short last block (QEMU sizes files to
        // the virtual disk) may be followed by another block right after that part.
        let need = t.geo.mapped_len(t.geo.payload_index(block));
        let offset = if st != payload::NOT_PRESENT
            && old >= HEADER_SECTION_END
            && old.saturating_add(need) <= m.alloc_ptr.min(m.file_len)
            && self.soft_anchor_ok(t, old, need)
        {
            log::write_zeros(&*self.file, old, need)?;
            old
        } else {
            self.allocate(m, bs)?
        };
        let r = Reservation { offset, partial_ok };
        m.reserved.insert(block, r);
        Ok(r)
    }

    fn soft_anchor_ok(&self, t: &Table, off: u64, len: u64) -> bool {
        let forbidden = t.regions.all.iter().map(|r| (r.offset, r.length));
        let log = (
            self.headers.current.header.log_offset.get(),
            self.headers.current.header.log_length.get() as u64,
        );
        let end = off + len;
        !forbidden.chain([log]).any(|r| off < r.0 + r.1 && r.0 < end)
    }

    /// Maps a write of [voff, voff+len) to file offsets and what to publish afterwards.
    fn map_write(
        &self,
        t: &Table,
        voff: u64,
        len: u64,
        out: &mut SmallVec<[(u64, u64, Post); 4]>,
    ) -> Result<()> {
        let bs = t.geo.block_size as u64;
        let ls = t.geo.logical_sector as u64;
        let mut pos = voff;
        let end = voff + len;
        let mut guard: Option<MutexGuard<'_, Meta>> = None;
        while pos < end {
            let block = pos / bs;
            let inb = pos % bs;
            let n = (bs - inb).min(end - pos);
            let e = t.bat[t.geo.payload_index(block) as usize].load(Ordering::Acquire);
            let seg = match bat_state(e) {
                payload::FULLY_PRESENT => (n, bat_offset(e) + inb, Post::None),
                payload::PARTIALLY_PRESENT => {
                    let off = bat_offset(e);
                    let post = if n == bs {
                        Post::Publish {
                            block,
                            state: payload::FULLY_PRESENT,
                            offset: off,
                        }
                    } else {
                        Post::Bits {
                            block,
                            offset: off,
                            first: inb / ls,
                            count: n / ls,
                        }
                    };
                    (n, off + inb, post)
                }
                _ => {
                    let m = match guard.as_mut() {
                        Some(m) => m,
                        None => guard.insert(self.lock()),
                    };
                    self.start_data_session(m)?;
                    // Re-check under the lock: someone may have published it meanwhile.
                    let e2 = t.bat[t.geo.payload_index(block) as usize].load(Ordering::Acquire);
                    if matches!(
                        bat_state(e2),
                        payload::FULLY_PRESENT | payload::PARTIALLY_PRESENT
                    ) {
                        continue;
                    }
                    let r = self.reserve(t, m, block)?;
                    let post = if n == bs || !r.partial_ok {
                        Post::Publish {
                            block,
                            state: payload::FULLY_PRESENT,
                            offset: r.offset,
                        }
                    } else {
                        Post::Bits {
                            block,
                            offset: r.offset,
                            first: inb / ls,
                            count: n / ls,
                        }
                    };
                    (n, r.offset + inb, post)
                }
            };
            match (out.last_mut(), seg.2) {
                (Some((pl, po, Post::None)), Post::None) if *po + *pl == seg.1 => *pl += seg.0,
                _ => out.push(seg),
            }
            pos += n;
        }
        Ok(())
    }

    fn mark_bat_dirty(&self, t: &Table, m: &mut Meta, index: u64) {
        let page = index * 8 / 4096;
        m.dirty
            .insert(t.bat_offset + page * 4096, PageSrc::Bat(page));
    }

    /// Makes completed writes visible: new block states and sector bits.
    fn publish(&self, t: &Table, posts: &[Post]) -> Result<()> {
        let mut guard: Option<MutexGuard<'_, Meta>> = None;
        for p in posts {
            match *p {
                Post::None => {}
                Post::Publish {
                    block,
                    state,
                    offset,
                } => {
                    let m = guard.get_or_insert_with(|| self.lock());
                    let idx = t.geo.payload_index(block);
                    let cur = t.bat[idx as usize].load(Ordering::Acquire);
                    if bat_state(cur) == state && bat_offset(cur) == offset {
                        continue;
                    }
                    if bat_state(cur) == payload::FULLY_PRESENT {
                        continue;
                    }
                    t.bat[idx as usize].store(bat_entry(state, offset), Ordering::Release);
                    self.mark_bat_dirty(t, m, idx);
                    m.reserved.remove(&block);
                }
                Post::Bits {
                    block,
                    offset,
                    first,
                    count,
                } => {
                    let chunk = block / t.geo.chunk_ratio;
                    let bm = self.bitmap(t, chunk)?;
                    let base = (block % t.geo.chunk_ratio) * t.geo.sectors_per_block() + first;
                    let mut changed: SmallVec<[u64; 4]> = SmallVec::new();
                    let mut s = base;
                    let end = base + count;
                    while s < end {
                        let w = s / 64;
                        let lo = s % 64;
                        let hi = (end - w * 64).min(64);
                        let mask = if hi - lo == 64 {
                            u64::MAX
                        } else {
                            ((1u64 << (hi - lo)) - 1) << lo
                        };
                        let old = bm[w as usize].fetch_or(mask, Ordering::AcqRel);
                        if old & mask != mask {
                            let page = w * 8 / 4096;
                            if changed.last() != Some(&page) {
                                changed.push(page);
                            }
                        }
                        s = w * 64 + hi;
                    }
                    let idx = t.geo.payload_index(block);
                    let cur = t.bat[idx as usize].load(Ordering::Acquire);
                    let needs_state = bat_state(cur) != payload::PARTIALLY_PRESENT
                        && bat_state(cur) != payload::FULLY_PRESENT;
                    if changed.is_empty() && !needs_state {
                        continue;
                    }
                    let m = guard.get_or_insert_with(|| self.lock());
                    if !changed.is_empty() {
                        let sb_idx = t.geo.bitmap_index(chunk);
                        let mut sb = t.bat[sb_idx as usize].load(Ordering::Acquire);
                        if bat_state(sb) != bitmap::PRESENT {
                            let off = self.allocate(m, MIB)?;
                            sb = bat_entry(bitmap::PRESENT, off);
                            t.bat[sb_idx as usize].store(sb, Ordering::Release);
                            self.mark_bat_dirty(t, m, sb_idx);
                        }
                        for page in changed {
                            m.dirty.insert(
                                bat_offset(sb) + page * 4096,
                                PageSrc::Bitmap { chunk, page },
                            );
                        }
                    }
                    if needs_state {
                        t.bat[idx as usize].store(
                            bat_entry(payload::PARTIALLY_PRESENT, offset),
                            Ordering::Release,
                        );
                        self.mark_bat_dirty(t, m, idx);
                        m.reserved.remove(&block);
                    }
                }
            }
        }
        Ok(())
    }

    fn page_bytes(&self, t: &Table, src: PageSrc) -> Vec<u8> {
        let mut out = vec![0u8; 4096];
        match src {
            PageSrc::Bat(page) => {
                let first = page * 512;
                for i in 0..512u64 {
                    let idx = first + i;
                    if idx >= t.bat.len() as u64 {
                        break;
                    }
                    let e = t.bat[idx as usize].load(Ordering::Acquire);
                    out[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
                }
            }
            PageSrc::Bitmap { chunk, page } => {
                let bm = t.bitmaps[chunk as usize]
                    .get()
                    .expect("a dirty bitmap is loaded");
                for i in 0..512u64 {
                    let e = bm[(page * 512 + i) as usize].load(Ordering::Acquire);
                    out[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
                }
            }
        }
        out
    }

    /// Makes everything written so far durable (see the module documentation).
    fn commit(&self, t: &Table) -> Result<()> {
        let mut m = self.lock();
        self.commit_locked(t, &mut m)
    }

    fn commit_locked(&self, t: &Table, m: &mut Meta) -> Result<()> {
        if m.dirty.is_empty() {
            return self.file.flush();
        }
        self.file.flush()?;
        let cap = m.log.capacity_pages();
        while !m.dirty.is_empty() {
            let mut taken: Vec<(u64, PageSrc)> = Vec::new();
            while taken.len() < cap {
                match m.dirty.pop_first() {
                    Some(x) => taken.push(x),
                    None => break,
                }
            }
            let pages: Vec<(u64, Vec<u8>)> = taken
                .iter()
                .map(|&(off, src)| (off, self.page_bytes(t, src)))
                .collect();
            let refs: Vec<(u64, &[u8])> = pages.iter().map(|(o, p)| (*o, &p[..])).collect();
            let (fl, ap) = (m.file_len, m.alloc_ptr.max(m.file_len));
            let r = (|| {
                m.log.write_sequence(&*self.file, &refs, fl, ap)?;
                self.file.flush()?;
                let mut reqs: Vec<Request<'_>> =
                    refs.iter().map(|(o, p)| Request::write(*o, p)).collect();
                self.file.submit_all(&mut reqs)
            })();
            if let Err(e) = r {
                for (off, src) in taken {
                    m.dirty.insert(off, src);
                }
                return Err(e);
            }
            if !m.dirty.is_empty() {
                // The log is reused by the next round: its in-place writes must be durable first.
                self.file.flush()?;
            }
        }
        Ok(())
    }

    /// Commits, writes the metadata in place, clears the LogGuid: the image is clean and needs
    /// no replay. Further writes start a new session. Called by `Drop` (ignoring errors).
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.commit(&self.table())?;
        let mut m = self.lock();
        if !m.started {
            return Ok(());
        }
        self.file.flush()?;
        let mut h = m.header.clone();
        h.log_guid = Guid::NIL;
        m.header_slot = write_header(&*self.file, &mut h, m.header_slot)?;
        m.header = h;
        m.started = false;
        m.data_renewed = false;
        self.started.store(false, Ordering::Release);
        Ok(())
    }

    /// Discard: whole blocks become UNMAPPED and keep their space (soft-anchored) for reuse;
    /// the file range is punched where the file supports it. Partial blocks are left alone.
    fn discard(&self, t: &Table, voff: u64, len: u64) -> Result<()> {
        if self.leave_allocated {
            return Ok(());
        }
        let bs = t.geo.block_size as u64;
        let first = voff.div_ceil(bs);
        let last = (voff + len) / bs;
        let end_block = if voff + len == t.geo.virtual_size {
            t.geo.data_blocks
        } else {
            last
        };
        let mut m = self.lock();
        for block in first..end_block {
            let idx = t.geo.payload_index(block);
            let e = t.bat[idx as usize].load(Ordering::Acquire);
            if !matches!(
                bat_state(e),
                payload::FULLY_PRESENT | payload::PARTIALLY_PRESENT
            ) {
                continue;
            }
            self.start_data_session(&mut m)?;
            t.bat[idx as usize].store(
                bat_entry(payload::UNMAPPED, bat_offset(e)),
                Ordering::Release,
            );
            self.mark_bat_dirty(t, &mut m, idx);
            if self.file.info().supports.discard {
                // Only the block's own bytes: a short last block may have a neighbour after it.
                let _ = self.file.discard(bat_offset(e), t.geo.mapped_len(idx));
            }
        }
        Ok(())
    }

    /// Write-zeroes: mapped data is zeroed in the file; unmapped blocks of a root disk already
    /// read as zeros; a differencing disk's whole blocks become ZERO, partial ones are written.
    fn write_zeroes(&self, t: &Table, voff: u64, len: u64) -> Result<()> {
        let bs = t.geo.block_size as u64;
        let mut pos = voff;
        let end = voff + len;
        while pos < end {
            let block = pos / bs;
            let inb = pos % bs;
            let n = (bs - inb).min(end - pos);
            let idx = t.geo.payload_index(block);
            let e = t.bat[idx as usize].load(Ordering::Acquire);
            match bat_state(e) {
                payload::FULLY_PRESENT => {
                    self.ensure_started()?;
                    log::write_zeros(&*self.file, bat_offset(e) + inb, n)?;
                }
                payload::PARTIALLY_PRESENT | payload::NOT_PRESENT if t.geo.has_parent => {
                    if n == bs && bat_state(e) == payload::NOT_PRESENT {
                        let mut m = self.lock();
                        self.start_data_session(&mut m)?;
                        t.bat[idx as usize].store(bat_entry(payload::ZERO, 0), Ordering::Release);
                        self.mark_bat_dirty(t, &mut m, idx);
                    } else {
                        let zeros = vec![0u8; n as usize];
                        let mut r = [Request::write(pos, &zeros)];
                        self.rw_group(t, &mut r);
                        r[0].take_result()?;
                    }
                }
                _ => {}
            }
            pos += n;
        }
        Ok(())
    }

    fn ensure_started(&self) -> Result<()> {
        if self.started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.lock();
        self.start_data_session(&mut m)
    }

    /// Reads and writes of one barrier-free group.
    fn rw_group(&self, t: &Table, batch: &mut [Request<'_>]) {
        let mut results: SmallVec<[Option<Result<()>>; 32]> = SmallVec::new();
        results.resize(batch.len(), None);
        // Plan.
        let mut rplans: Vec<(usize, ReadPlan)> = Vec::new();
        let mut wplans: Vec<(usize, WritePlan)> = Vec::new();
        for (i, req) in batch.iter_mut().enumerate() {
            if let Err(e) = t.info.check(req) {
                results[i] = Some(Err(e));
                continue;
            }
            match &req.op {
                Op::Read { offset, .. } => {
                    let mut segs = SmallVec::new();
                    match self.map_read(t, *offset, req.len(), &mut segs) {
                        Ok(()) => rplans.push((i, segs)),
                        Err(e) => results[i] = Some(Err(e)),
                    }
                }
                Op::Write { offset, .. } => {
                    if !self.started.load(Ordering::Acquire) {
                        if let Err(e) = self.ensure_started() {
                            results[i] = Some(Err(e));
                            continue;
                        }
                    }
                    let mut segs = SmallVec::new();
                    match self.map_write(t, *offset, req.len(), &mut segs) {
                        Ok(()) => wplans.push((i, segs)),
                        Err(e) => results[i] = Some(Err(e)),
                    }
                }
                _ => results[i] = Some(Err(Error::Unsupported { op: req.kind() })),
            }
        }
        // Issue.
        let mut lower: Vec<Request<'_>> = Vec::with_capacity(batch.len());
        let mut lower_owner: SmallVec<[usize; 32]> = SmallVec::new();
        let mut up: Vec<Request<'_>> = Vec::new();
        let mut up_owner: SmallVec<[usize; 8]> = SmallVec::new();
        let mut rp = rplans.iter().peekable();
        let mut wp = wplans.iter().peekable();
        for (i, req) in batch.iter_mut().enumerate() {
            match &mut req.op {
                Op::Read { bufs, .. } => {
                    let Some((_, segs)) = rp.next_if(|(j, _)| *j == i) else {
                        continue;
                    };
                    let pieces = carve_read_bufs(bufs, segs.iter().map(|s| s.0 as usize));
                    for (mut piece, &(_, src)) in pieces.into_iter().zip(segs.iter()) {
                        match src {
                            Src::File(off) => {
                                lower.push(Request::new(Op::Read {
                                    offset: off,
                                    bufs: piece,
                                }));
                                lower_owner.push(i);
                            }
                            Src::Zero => zero_bufs(&mut piece),
                            Src::Parent(off) => {
                                up.push(Request::new(Op::Read {
                                    offset: off,
                                    bufs: piece,
                                }));
                                up_owner.push(i);
                            }
                        }
                    }
                }
                Op::Write { bufs, .. } => {
                    let Some((_, segs)) = wp.next_if(|(j, _)| *j == i) else {
                        continue;
                    };
                    let pieces = carve_write_bufs(bufs, segs.iter().map(|s| s.0 as usize));
                    for (piece, &(_, off, _)) in pieces.into_iter().zip(segs.iter()) {
                        lower.push(Request::new(Op::Write {
                            offset: off,
                            bufs: piece,
                        }));
                        lower_owner.push(i);
                    }
                }
                _ => {}
            }
        }
        if !lower.is_empty() {
            self.file.submit(&mut lower);
        }
        if !up.is_empty() {
            self.read_parent(&mut up);
        }
        let mut failed: SmallVec<[bool; 32]> = SmallVec::new();
        failed.resize(results.len(), false);
        for (r, &o) in lower
            .iter_mut()
            .zip(lower_owner.iter())
            .chain(up.iter_mut().zip(up_owner.iter()))
        {
            if let Err(e) = r.take_result() {
                if !failed[o] {
                    failed[o] = true;
                    results[o] = Some(Err(e));
                }
            }
        }
        drop(lower);
        drop(up);
        // Publish the writes that succeeded.
        let mut posts: SmallVec<[Post; 8]> = SmallVec::new();
        for (i, segs) in &wplans {
            if !failed[*i] {
                posts.extend(
                    segs.iter()
                        .map(|s| s.2)
                        .filter(|p| !matches!(p, Post::None)),
                );
            }
        }
        if !posts.is_empty() {
            if let Err(e) = self.publish(t, &posts) {
                for (i, _) in &wplans {
                    if results[*i].is_none() {
                        results[*i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        for (req, r) in batch.iter_mut().zip(results) {
            req.complete(r.unwrap_or(Ok(())));
        }
    }

    /// Reads from the parent, zero-filling what lies past its end.
    fn read_parent(&self, reqs: &mut [Request<'_>]) {
        let Some(p) = &self.parent else {
            for r in reqs.iter_mut() {
                if let Op::Read { bufs, .. } = &mut r.op {
                    zero_bufs(bufs);
                }
                r.complete(Ok(()));
            }
            return;
        };
        let cap = p.capacity();
        if reqs.iter().all(|r| r.offset() + r.len() <= cap) {
            p.submit(reqs);
            return;
        }
        for r in reqs.iter_mut() {
            let (off, len) = (r.offset(), r.len());
            let res = if let Op::Read { bufs, .. } = &mut r.op {
                let inside = cap.saturating_sub(off).min(len) as usize;
                let mut pieces = carve_read_bufs(bufs, [inside, len as usize - inside]);
                let mut tail = pieces.pop().unwrap_or_default();
                zero_bufs(&mut tail);
                let head = pieces.pop().unwrap_or_default();
                if inside > 0 {
                    let mut one = [Request::new(Op::Read {
                        offset: off,
                        bufs: head,
                    })];
                    p.submit(&mut one);
                    one[0].take_result()
                } else {
                    Ok(())
                }
            } else {
                Ok(())
            };
            r.complete(res);
        }
    }
}

impl BlockDevice for Vhdx {
    fn info(&self) -> DeviceInfo {
        self.table().info.clone()
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let t = &*self.table();
        let mut start = 0;
        while start < batch.len() {
            // A group runs up to the next flush, discard or write-zeroes.
            let mut end = start;
            while end < batch.len() && matches!(batch[end].op, Op::Read { .. } | Op::Write { .. }) {
                end += 1;
            }
            if end > start {
                self.rw_group(t, &mut batch[start..end]);
            }
            if end < batch.len() {
                let req = &mut batch[end];
                let r = t.info.check(req).and_then(|_| match req.op {
                    Op::Flush => {
                        if self.read_only {
                            Ok(())
                        } else {
                            self.commit(t)
                        }
                    }
                    Op::Discard { offset, len } => self.discard(t, offset, len),
                    Op::WriteZeroes { offset, len } => self.write_zeroes(t, offset, len),
                    _ => Ok(()),
                });
                req.complete(r);
                end += 1;
            }
            start = end;
        }
    }

    fn resize(&self, new_capacity: u64) -> Result<()> {
        self.resize_with(new_capacity, &vstor_core::Job::new())
            .map(|_| ())
    }

    fn capacity_signal(&self) -> Option<Arc<CapacitySignal>> {
        Some(self.signal.clone())
    }

    /// Blocks this file holds are depth 1, blocks it reads from its parent one deeper than the
    /// parent says; blocks no image of the chain holds are holes. A block a differencing disk
    /// marks zero (it hides its parent's data) is depth 1 and reads as zeroes.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<vstor_core::Extent>> {
        use vstor_core::{push_extent, Extent};
        vstor_core::check_range(self.capacity(), offset, len)?;
        // `locate` maps whole sectors (a sector bitmap has no finer grain): map the sectors the
        // range touches, then cut the answer to the range.
        let ls = self.table().geo.logical_sector as u64;
        let start = offset / ls * ls;
        let end = ((offset + len).div_ceil(ls) * ls).min(self.capacity());
        let mut out = Vec::new();
        let differencing = self.parent.is_some();
        for (n, src) in self.locate(start, end - start)? {
            match src {
                Src::File(_) => push_extent(&mut out, Extent::data(n, 1)),
                Src::Zero if differencing => push_extent(
                    &mut out,
                    Extent {
                        len: n,
                        depth: 1,
                        zero: true,
                    },
                ),
                Src::Zero => push_extent(&mut out, Extent::hole(n)),
                Src::Parent(at) => {
                    let parent = self.parent.as_ref().ok_or_else(|| {
                        vstor_core::Error::InvalidArgument("parent block without a parent".into())
                    })?;
                    // A child grown past its parent reads zeroes there: nobody holds it.
                    let inside = parent.capacity().saturating_sub(at).min(n);
                    if inside > 0 {
                        for e in parent.allocation(at, inside)? {
                            let depth = if e.depth == 0 { 0 } else { e.depth + 1 };
                            push_extent(&mut out, Extent { depth, ..e });
                        }
                    }
                    push_extent(&mut out, Extent::hole(n - inside));
                }
            }
        }
        let (mut skip, mut left) = (offset - start, len);
        let mut cut = Vec::with_capacity(out.len());
        for e in out {
            let from = skip.min(e.len);
            skip -= from;
            let n = (e.len - from).min(left);
            left -= n;
            push_extent(&mut cut, Extent { len: n, ..e });
        }
        Ok(cut)
    }

    fn describe(&self) -> String {
        let t = self.table();
        format!(
            "VHDX {} ({}, {} bytes, {} MiB blocks)",
            self.name,
            self.kind(),
            t.geo.virtual_size,
            t.geo.block_size as u64 / MIB
        )
    }
}

impl Drop for Vhdx {
    fn drop(&mut self) {
        let _ = self.close();
        self.lock().closed = true;
    }
}
