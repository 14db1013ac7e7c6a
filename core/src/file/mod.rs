//! The file and block-device backend, on io_uring or on portable pread/pwrite.
//!
//! [`FileDevice::open`] picks the engine: io_uring when the kernel allows it (one ring per
//! concurrently submitting thread, taken from a pool, with the file registered in it, and a
//! whole batch in flight at once), otherwise the portable engine, which runs a batch's requests
//! one after another with `pread`/`pwrite`. O_DIRECT is optional; when the file system refuses it
//! the device falls back to buffered I/O and says so in [`FileDevice::direct_fallback`]. Buffers
//! whose addresses or lengths do not meet the direct-I/O alignment are bounced through an
//! [`AlignedBuf`](crate::AlignedBuf), never refused.

mod lock;
mod sync;
mod uring;

use crate::buf::{is_aligned, AlignedBuf};
use crate::device::{BlockDevice, CapacitySignal, DeviceInfo, Supports};
use crate::error::{Error, OpKind, Result};
use crate::request::{Op, Request};
pub use lock::{ImageLock, LockMode};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Which I/O engine a [`FileDevice`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// io_uring when available, otherwise the portable engine.
    #[default]
    Auto,
    /// io_uring; opening fails if the kernel refuses it.
    IoUring,
    /// Portable `pread`/`pwrite`, one request at a time.
    Sync,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Engine::Auto => "auto",
            Engine::IoUring => "io_uring",
            Engine::Sync => "sync",
        })
    }
}

impl std::str::FromStr for Engine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Engine::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(Engine::IoUring),
            "sync" | "threads" | "pread" => Ok(Engine::Sync),
            _ => Err(Error::InvalidArgument(format!(
                "unknown engine '{s}' (expected auto, io_uring or sync)"
            ))),
        }
    }
}

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Use O_DIRECT (bypass the host page cache) if the file system allows it.
    pub direct: bool,
    /// The I/O engine.
    pub engine: Engine,
    /// Entries per io_uring ring (0: 128). Bounds the requests one thread keeps in flight.
    pub ring_entries: u32,
    /// Take the image lock ([`ImageLock`]) on the file for as long as the device is open:
    /// exclusive when writable, shared when read-only, without waiting for a live holder. An
    /// open that finds a conflicting lock (another process, or another open of the file in this
    /// one) fails with [`Error::Locked`]. Only opens that ask for it take or respect the lock.
    /// The lock sits on a descriptor of its own, so it dies with the process.
    pub lock: bool,
    /// With [`lock`](Self::lock) on a writable open: let read-only opens in beside this writer
    /// (QEMU's `share-rw=on`); a second writer is still refused.
    pub share_rw: bool,
    /// With [`lock`](Self::lock) on a read-only open that needs the file unchanged for as long
    /// as it is open (the parents of a differencing chain): refused beside any writer, even
    /// one that shares, and keeps every writer out ([`LockMode::SharedStrict`]).
    pub keep_writers_out: bool,
}

impl FileOptions {
    /// The lock this open takes, if any.
    fn lock_mode(&self) -> Option<LockMode> {
        match (self.lock, self.read_only, self.share_rw) {
            (false, ..) => None,
            (true, true, _) if self.keep_writers_out => Some(LockMode::SharedStrict),
            (true, true, _) => Some(LockMode::Shared),
            (true, false, true) => Some(LockMode::WriteSharing),
            (true, false, false) => Some(LockMode::Exclusive),
        }
    }
}

/// What the file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A block device.
    Block,
}

/// State shared by both engines.
#[derive(Debug)]
pub(crate) struct FileCore {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) direct: bool,
    pub(crate) logical: u32,
    pub(crate) mem_align: u32,
}

impl FileCore {
    pub(crate) fn context(&self, op: OpKind, offset: u64, len: u64) -> String {
        format!(
            "{op} of {len} bytes at offset {offset} of {}",
            self.path.display()
        )
    }

    /// Whether a read or write must go through an aligned bounce buffer to satisfy O_DIRECT.
    pub(crate) fn needs_bounce(&self, req: &Request<'_>) -> bool {
        if !self.direct {
            return false;
        }
        let (ma, la) = (self.mem_align as usize, self.logical as usize);
        let ok = |p: usize, n: usize| is_aligned(p, ma) && n % la == 0;
        match &req.op {
            Op::Read { bufs, .. } => !bufs.iter().all(|b| ok(b.as_ptr() as usize, b.len())),
            Op::Write { bufs, .. } => !bufs.iter().all(|b| ok(b.as_ptr() as usize, b.len())),
            _ => false,
        }
    }

    pub(crate) fn bounce(&self, len: usize) -> AlignedBuf {
        AlignedBuf::with_alignment(len, (self.mem_align as usize).max(512))
    }
}

/// A regular file or a block device as a [`BlockDevice`].
pub struct FileDevice {
    core: Arc<FileCore>,
    kind: FileKind,
    physical: u32,
    read_only: bool,
    capacity: AtomicU64,
    engine: Engine,
    rings: Option<uring::RingPool>,
    direct_fallback: Option<String>,
    engine_fallback: Option<String>,
    // Held shared by I/O, exclusively by resize, so that no request races a size change.
    resize_lock: RwLock<()>,
    signal: Arc<CapacitySignal>,
    /// The image lock this open holds ([`FileOptions::lock`]), on a descriptor of its own.
    _lock: Option<ImageLock>,
}

impl std::fmt::Debug for FileDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDevice")
            .field("path", &self.core.path)
            .field("engine", &self.engine)
            .field("direct", &self.core.direct)
            .finish()
    }
}

struct DioAlign {
    mem: u32,
    offset: u32,
}

/// Asks the kernel (statx STATX_DIOALIGN, Linux 6.1+) what O_DIRECT needs for this file.
fn dio_alignment(file: &File) -> Option<DioAlign> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx writes at most one `struct statx` into the buffer we own; the fd is valid for
    // the lifetime of `file` and the path is an empty NUL-terminated string used with
    // AT_EMPTY_PATH, so the call looks only at the fd.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx returned 0, so it initialised the structure (and it was zeroed before).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some(DioAlign {
        mem: stx.stx_dio_mem_align,
        offset: stx.stx_dio_offset_align,
    })
}

fn blk_ioctl_u32(file: &File, req: libc::c_ulong) -> Option<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET and BLKPBSZGET write one int through the pointer, which points at a
    // local int that outlives the call; the fd is a valid open block device.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req as _, &mut v as *mut libc::c_int) };
    (rc == 0 && v > 0).then_some(v as u32)
}

const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;

impl FileDevice {
    /// Opens a regular file or block device. See [`FileOptions`].
    pub fn open(path: impl AsRef<Path>, opts: &FileOptions) -> Result<Self> {
        Self::open_held(path.as_ref(), opts, None)
    }

    /// [`open`](Self::open), with the image lock already taken (by `create`) or not.
    fn open_held(path: &Path, opts: &FileOptions, held: Option<ImageLock>) -> Result<Self> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!opts.read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let ctx = || format!("cannot open {}", path.display());
        // Look before opening: opening a FIFO would block until a writer appears.
        let ft = std::fs::metadata(path)
            .map_err(|e| Error::io(ctx(), e))?
            .file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(Error::InvalidArgument(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
        let mut direct_fallback = None;
        let mut direct = opts.direct;
        let file = match open(direct) {
            Ok(f) => f,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                direct = false;
                direct_fallback = Some(format!(
                    "the file system of {} refuses O_DIRECT; using buffered I/O",
                    path.display()
                ));
                open(false).map_err(|e| Error::io(ctx(), e))?
            }
            Err(e) => return Err(Error::io(ctx(), e)),
        };
        let meta = file.metadata().map_err(|e| Error::io(ctx(), e))?;
        let ft = meta.file_type();
        let kind = if ft.is_block_device() {
            FileKind::Block
        } else if ft.is_file() {
            FileKind::Regular
        } else {
            return Err(Error::InvalidArgument(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        };

        let (mut logical, physical, mut mem_align) = match kind {
            FileKind::Block => {
                let l = blk_ioctl_u32(&file, BLKSSZGET).unwrap_or(512);
                let p = blk_ioctl_u32(&file, BLKPBSZGET).unwrap_or(l);
                (l, p.max(l), if direct { l } else { 1 })
            }
            FileKind::Regular => {
                use std::os::unix::fs::MetadataExt;
                let p = (meta.blksize() as u32).clamp(512, 4096);
                (512, p, 1)
            }
        };
        if direct {
            match dio_alignment(&file) {
                Some(a) if a.offset > 0 => {
                    logical = logical.max(a.offset);
                    mem_align = a.mem.max(1);
                }
                Some(_) if kind == FileKind::Regular => {
                    // The kernel says this file cannot do direct I/O at all.
                    let file = open(false).map_err(|e| Error::io(ctx(), e))?;
                    direct_fallback = Some(format!(
                        "{} does not support O_DIRECT; using buffered I/O",
                        path.display()
                    ));
                    return Self::finish(
                        held,
                        file,
                        path,
                        kind,
                        opts,
                        false,
                        512,
                        physical,
                        1,
                        direct_fallback,
                    );
                }
                _ => {
                    // Unknown (old kernel): the page size satisfies every file system.
                    logical = logical.max(4096);
                    mem_align = 4096;
                }
            }
        }
        Self::finish(
            held,
            file,
            path,
            kind,
            opts,
            direct,
            logical,
            physical.max(logical),
            mem_align,
            direct_fallback,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        held: Option<ImageLock>,
        file: File,
        path: &Path,
        kind: FileKind,
        opts: &FileOptions,
        direct: bool,
        logical: u32,
        physical: u32,
        mem_align: u32,
        direct_fallback: Option<String>,
    ) -> Result<Self> {
        let mut file = file;
        let lock = match held {
            Some(l) => Some(l),
            None => opts
                .lock_mode()
                .map(|mode| ImageLock::acquire(path, mode))
                .transpose()?,
        };

        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("cannot size {}", path.display()), e))?;
        let capacity = size - size % u64::from(logical);
        let core = Arc::new(FileCore {
            file,
            path: path.to_path_buf(),
            direct,
            logical,
            mem_align,
        });
        let entries = if opts.ring_entries == 0 {
            128
        } else {
            opts.ring_entries
        };
        let (engine, rings, engine_fallback) = match opts.engine {
            Engine::Sync => (Engine::Sync, None, None),
            Engine::IoUring => {
                let pool = uring::RingPool::new(core.file.as_raw_fd(), entries)
                    .map_err(|e| Error::io("io_uring is not available", e))?;
                (Engine::IoUring, Some(pool), None)
            }
            Engine::Auto => match uring::RingPool::new(core.file.as_raw_fd(), entries) {
                Ok(pool) => (Engine::IoUring, Some(pool), None),
                Err(e) => (
                    Engine::Sync,
                    None,
                    Some(format!(
                        "io_uring unavailable ({e}); using the portable engine"
                    )),
                ),
            },
        };
        Ok(FileDevice {
            core,
            kind,
            physical,
            read_only: opts.read_only,
            capacity: AtomicU64::new(capacity),
            engine,
            rings,
            direct_fallback,
            engine_fallback,
            resize_lock: RwLock::new(()),
            signal: Arc::new(CapacitySignal::new(capacity)),
            _lock: lock,
        })
    }

    /// Creates (or truncates) a sparse regular file of `size` bytes and opens it.
    pub fn create(path: impl AsRef<Path>, size: u64, opts: &FileOptions) -> Result<Self> {
        let path = path.as_ref();
        // Created without truncating, so that a file another open holds is refused by its lock
        // before anything of it is cut away.
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        let held = opts
            .lock_mode()
            .map(|mode| ImageLock::acquire(path, mode))
            .transpose()?;
        let sized = |len: u64| {
            f.set_len(len)
                .map_err(|e| Error::io(format!("cannot size {} to {len} bytes", path.display()), e))
        };
        sized(0)?;
        sized(size)?;
        drop(f);
        Self::open_held(path, opts, held)
    }

    /// The engine in use (never [`Engine::Auto`]).
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Whether O_DIRECT is in effect.
    pub fn is_direct(&self) -> bool {
        self.core.direct
    }

    /// Which parts of [offset, offset+len) hold data and which are holes, as consecutive
    /// (length, holds data) pieces, from the file system (SEEK_DATA/SEEK_HOLE). Where the file
    /// system cannot tell (or for block devices), everything holds data.
    pub fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let end = offset.saturating_add(len).min(self.capacity());
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        let fd = self.core.file.as_raw_fd();
        while pos < end {
            // SAFETY: lseek on a descriptor this device owns; it only moves the file offset,
            // which no I/O path here uses (they all use positioned reads and writes).
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    out.push((end - pos, false));
                } else {
                    // The file system cannot say: all data.
                    out.push((end - pos, true));
                }
                break;
            }
            let data = (data as u64).min(end);
            if data > pos {
                out.push((data - pos, false));
                pos = data;
                continue;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            let hole = hole.max(pos + 1);
            out.push((hole - pos, true));
            pos = hole;
        }
        Ok(out)
    }

    /// Why O_DIRECT was asked for but is not in effect, if so.
    pub fn direct_fallback(&self) -> Option<&str> {
        self.direct_fallback.as_deref()
    }

    /// Why [`Engine::Auto`] chose the portable engine, if it did.
    pub fn engine_fallback(&self) -> Option<&str> {
        self.engine_fallback.as_deref()
    }

    /// A regular file or a block device.
    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// The path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.core.path
    }
}

impl FileDevice {
    /// Checks every request of `batch` against the device, completing those refused, and
    /// returns how many are left to run. The caller holds the resize lock shared.
    fn validate(&self, batch: &mut [Request<'_>]) -> usize {
        let info = self.info();
        let mut valid = 0;
        for req in batch.iter_mut() {
            // A request resubmitted with an old result runs again: below, "complete" means
            // "refused by the check".
            let _ = req.take_result();
            match info.check(req) {
                Ok(()) => valid += 1,
                Err(e) => req.complete(Err(e)),
            }
        }
        valid
    }

    /// Prepares `batch` for a shared ring ([`crate::submit_group`]): validates it and returns
    /// the resize lock (held until the batch completes) and the file, or `None` when this
    /// device does not run io_uring (the batch then goes through [`BlockDevice::submit`]).
    /// `lock`: false when the caller already holds the lock for another batch of this device
    /// in the same group (taking a read lock twice on one thread can deadlock behind a
    /// waiting resize).
    pub(crate) fn group_part(
        &self,
        batch: &mut [Request<'_>],
        lock: bool,
    ) -> Option<(Option<RwLockReadGuard<'_, ()>>, &FileCore)> {
        self.rings.as_ref()?;
        let guard = lock.then(|| self.resize_lock.read().unwrap_or_else(|p| p.into_inner()));
        self.validate(batch);
        Some((guard, &self.core))
    }
}

pub(crate) use uring::{run_group, Part};

impl BlockDevice for FileDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            capacity: self.capacity(),
            logical_sector_size: self.core.logical,
            physical_sector_size: self.physical,
            mem_alignment: self.core.mem_align,
            read_only: self.read_only,
            discard_zeroes: true,
            supports: Supports {
                flush: true,
                discard: true,
                write_zeroes: true,
                resize: self.kind == FileKind::Regular && !self.read_only,
            },
        }
    }

    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    fn as_file(&self) -> Option<&FileDevice> {
        Some(self)
    }

    /// Holes of the file (SEEK_HOLE) are depth 0 and read as zeroes; the rest is data.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<crate::Extent>> {
        crate::check_range(self.capacity(), offset, len)?;
        let mut out = Vec::new();
        for (n, data) in self.data_ranges(offset, len)? {
            let e = if data {
                crate::Extent::data(n, 1)
            } else {
                crate::Extent::hole(n)
            };
            crate::push_extent(&mut out, e);
        }
        Ok(out)
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let _guard = self.resize_lock.read().unwrap_or_else(|p| p.into_inner());
        if self.validate(batch) == 0 {
            return;
        }
        match &self.rings {
            Some(pool) => pool.run(&self.core, batch),
            None => {
                for req in batch.iter_mut().filter(|r| !r.is_complete()) {
                    let r = sync::run(&self.core, req);
                    req.complete(r);
                }
            }
        }
    }

    fn resize(&self, new_capacity: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly { op: OpKind::Write });
        }
        if self.kind != FileKind::Regular {
            return Err(Error::InvalidArgument(format!(
                "{} is a block device; its size is set by its owner",
                self.core.path.display()
            )));
        }
        if new_capacity % u64::from(self.core.logical) != 0 {
            return Err(Error::InvalidArgument(format!(
                "new capacity {new_capacity} is not a multiple of the {}-byte sector",
                self.core.logical
            )));
        }
        let _guard = self.resize_lock.write().unwrap_or_else(|p| p.into_inner());
        self.core.file.set_len(new_capacity).map_err(|e| {
            Error::io(
                format!(
                    "cannot resize {} to {new_capacity} bytes",
                    self.core.path.display()
                ),
                e,
            )
        })?;
        self.capacity.store(new_capacity, Ordering::Release);
        drop(_guard);
        // Outside the resize lock: a listener may do I/O on this device.
        self.signal.publish(new_capacity);
        Ok(())
    }

    fn capacity_signal(&self) -> Option<Arc<CapacitySignal>> {
        Some(self.signal.clone())
    }

    fn describe(&self) -> String {
        format!(
            "{} {} ({}, {})",
            match self.kind {
                FileKind::Regular => "file",
                FileKind::Block => "block device",
            },
            self.core.path.display(),
            self.engine,
            if self.core.direct {
                "O_DIRECT"
            } else {
                "buffered"
            }
        )
    }
}
