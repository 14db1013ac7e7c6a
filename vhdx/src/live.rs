//! A disk in use that can be checkpointed and merged online, as Hyper-V does for a running VM.
//!
//! [`LiveDisk`] is the [`BlockDevice`] a VMM serves: it forwards every batch to the current
//! image under a shared lock. A checkpoint takes that lock exclusively, so the batches in
//! flight finish first; the image is closed and becomes the read-only parent of a new
//! differencing child that takes every later write. A backup reads the frozen parent while the
//! disk keeps changing. Merging the checkpoint back copies the child's data into the parent
//! while writes continue (the ranges they touch are recorded), then, with I/O paused, copies
//! what changed meanwhile and switches to the parent: the writes made during the merge are in
//! the result.
//!
//! **Image locks.** When the options ask for locks, the live disk holds them itself, one per
//! file of its chain, and changes them in place as the chain changes: the image that takes
//! writes is held as a writer, its parents as parents (no writer anywhere else). A checkpoint
//! turns the frozen image's lock into a parent's lock without ever letting it go; a merge turns
//! the parent's into a writer's while it copies, and drops the merged child's. (The images
//! themselves are opened without locks of their own: in one process, a writer's lock and a
//! parent's lock on the same file would refuse each other.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vstor_core::{
    BlockDevice, CapacitySignal, DeviceInfo, ImageLock, Job, LockMode, Op, Request, Result,
};

use crate::convert::{copy_range, ConvertOptions, ConvertReport};
use crate::disk::{OpenOptions, Vhdx};
use crate::error::invalid;
use crate::lifecycle::{self, MergeReport};

/// The key of a file's lock: its canonical path, so that `disk.vhdx`, `./disk.vhdx` and the
/// absolute path a child's parent locator gives are one file.
fn lock_key(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The granule of the changes recorded during an online merge.
const GRANULE: u64 = 1 << 20;

/// What [`LiveDisk::move_to`] did.
#[derive(Debug, Clone)]
pub struct MoveReport {
    /// The image that took writes before the move.
    pub from: PathBuf,
    /// The image that takes them now.
    pub to: PathBuf,
    /// Bytes written to the new image.
    pub copied_bytes: u64,
    /// How long I/O was held for the last pass and the switch.
    pub paused: std::time::Duration,
    /// The source image deleted after the switch (`None`: kept, as asked).
    pub deleted: Option<PathBuf>,
}

/// Copies the `GRANULE`s numbered `dirty` (below `size`) of `src`, as `map` says, into `dst`;
/// returns the bytes written.
fn copy_granules(
    src: &dyn BlockDevice,
    map: crate::convert::AllocationMap<'_>,
    dst: &dyn BlockDevice,
    size: u64,
    dirty: BTreeSet<u64>,
) -> Result<u64> {
    let mut n = 0;
    for gr in dirty {
        let from = gr * GRANULE;
        let len = GRANULE.min(size.saturating_sub(from));
        if len > 0 {
            n += copy_range(src, Some(map), dst, false, from..from + len, &Job::new())?
                .written_bytes;
        }
    }
    Ok(n)
}

/// Makes a new or removed name in the directory of `path` durable (best effort).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// A VHDX in use that can be checkpointed and merged online (see the module documentation).
pub struct LiveDisk {
    cur: RwLock<Arc<Vhdx>>,
    signal: Arc<CapacitySignal>,
    tracking: AtomicBool,
    dirty: Mutex<BTreeSet<u64>>,
    /// Serializes checkpoint and merge.
    ops: Mutex<()>,
    /// How images are opened (the current one, a checkpoint's child, a merge's parent),
    /// without locks of their own.
    opts: OpenOptions,
    /// The image locks of the chain, by path, when locking was asked for (None: no locks).
    locks: Option<Mutex<BTreeMap<PathBuf, ImageLock>>>,
    /// The mode of the lock of the image that takes writes.
    writer_mode: LockMode,
}

impl std::fmt::Debug for LiveDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveDisk")
            .field("current", &self.current().name().to_string())
            .finish_non_exhaustive()
    }
}

impl LiveDisk {
    /// Opens the image at `path` (writable, with its chain).
    pub fn open(path: impl AsRef<Path>) -> Result<LiveDisk> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// Opens the image at `path` with its chain, with `opts` (direct I/O, engine, locking) for
    /// it and for the images later checkpoints and merges open. It is always writable.
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<LiveDisk> {
        let path = path.as_ref();
        let writer_mode = if opts.file.share_rw {
            LockMode::WriteSharing
        } else {
            LockMode::Exclusive
        };
        let mut opts = OpenOptions {
            read_only: false,
            ..opts.clone()
        };
        let locking = std::mem::take(&mut opts.file.lock);
        // The writer's lock before the open, which may replay the image's log.
        let mut locks = BTreeMap::new();
        if locking {
            locks.insert(lock_key(path), ImageLock::acquire(path, writer_mode)?);
        }
        let v = Vhdx::open(path, &opts)?;
        if locking {
            let mut p = v.parent().cloned();
            while let Some(parent) = p {
                if let Some(pp) = parent.path() {
                    locks.insert(
                        lock_key(pp),
                        ImageLock::acquire(pp, LockMode::SharedStrict)?,
                    );
                }
                p = parent.parent().cloned();
            }
        }
        let cap = v.capacity();
        Ok(LiveDisk {
            cur: RwLock::new(Arc::new(v)),
            signal: Arc::new(CapacitySignal::new(cap)),
            tracking: AtomicBool::new(false),
            dirty: Mutex::new(BTreeSet::new()),
            ops: Mutex::new(()),
            opts,
            locks: locking.then(|| Mutex::new(locks)),
            writer_mode,
        })
    }

    /// Changes the lock on `path` to `mode` (taking it if the disk holds none there yet).
    fn relock(&self, path: &Path, mode: LockMode) -> Result<()> {
        let Some(locks) = &self.locks else {
            return Ok(());
        };
        let mut l = locks.lock().unwrap_or_else(|p| p.into_inner());
        match l.get_mut(&lock_key(path)) {
            Some(lock) => lock.convert(path, mode),
            None => {
                l.insert(lock_key(path), ImageLock::acquire(path, mode)?);
                Ok(())
            }
        }
    }

    /// Lets the lock on `path` go.
    fn unlock(&self, path: &Path) {
        if let Some(locks) = &self.locks {
            locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&lock_key(path));
        }
    }

    /// The image that takes writes now.
    pub fn current(&self) -> Arc<Vhdx> {
        self.cur.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes a production checkpoint: the current image is flushed and closed and becomes the
    /// read-only parent of a new child (at `child`, or `NAME_<GUID>.avhdx` next to it) that
    /// takes every later write. Returns the child's path and the frozen parent, which a backup
    /// can read while the disk keeps changing.
    pub fn checkpoint(&self, child: Option<&Path>) -> Result<(PathBuf, Arc<Vhdx>)> {
        let _op = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let mut g = self.cur.write().unwrap_or_else(|p| p.into_inner());
        let path = g
            .path()
            .ok_or_else(|| invalid("a checkpoint needs an image opened from a path"))?
            .to_path_buf();
        g.flush()?;
        g.close()?;
        // The frozen image becomes a parent: its lock keeps every writer out from now on.
        self.relock(&path, LockMode::SharedStrict)?;
        let made = lifecycle::checkpoint(&path, child).and_then(|child| {
            self.relock(&child, self.writer_mode)?;
            Vhdx::open(&child, &self.opts).map(|v| (child, v))
        });
        let (child, v) = match made {
            Ok(m) => m,
            Err(e) => {
                // The image goes on taking writes: its writer's lock back (nobody else can have
                // taken one meanwhile; a parent's lock keeps writers out).
                let _ = self.relock(&path, self.writer_mode);
                return Err(e);
            }
        };
        let parent = v
            .parent()
            .cloned()
            .expect("a differencing child has its parent");
        *g = Arc::new(v);
        Ok((child, parent))
    }

    /// Merges the current differencing image into its parent while I/O continues, then
    /// switches to the parent and deletes the child. Writes made during the merge are in the
    /// result.
    pub fn merge_checkpoint(&self, job: &Job) -> Result<MergeReport> {
        let _op = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let child = self.current();
        let Some(parent_path) = child.parent().and_then(|p| p.path().map(Path::to_path_buf)) else {
            return Err(invalid(format!(
                "{} has no parent to merge into",
                child.name()
            )));
        };
        let child_path = child
            .path()
            .ok_or_else(|| invalid("the child has no path"))?
            .to_path_buf();
        let size = child.capacity();
        // The parent takes the merge's writes: a writer's lock for it (the child keeps its own).
        self.relock(&parent_path, self.writer_mode)?;
        let merged = (|| -> Result<u64> {
            let target = Vhdx::open(&parent_path, &self.opts)?;
            if target.capacity() < size {
                target.resize_with(size, &Job::new())?;
            }
            self.start_tracking();
            // The child's own blocks only (its parent is the target).
            let map = |off: u64, l: u64| child.fills(off, l, Some(1));
            let first =
                copy_range(&*child, Some(&map), &target, false, 0..size, job)?.written_bytes;
            // I/O paused: what changed during the copy, then the switch.
            let mut g = self.cur.write().unwrap_or_else(|p| p.into_inner());
            self.tracking.store(false, Ordering::SeqCst);
            let again = copy_granules(&*child, &map, &target, size, self.take_dirty())?;
            target.flush()?;
            *g = Arc::new(target);
            Ok(first + again)
        })();
        let copied = match merged {
            Ok(n) => n,
            Err(e) => {
                // The child goes on taking writes; the parent is a parent again.
                self.tracking.store(false, Ordering::SeqCst);
                let _ = self.relock(&parent_path, LockMode::SharedStrict);
                return Err(e);
            }
        };
        drop(child);
        self.unlock(&child_path);
        std::fs::remove_file(&child_path).map_err(|e| {
            vstor_core::Error::io(
                format!("merged, but cannot remove {}", child_path.display()),
                e,
            )
        })?;
        Ok(MergeReport {
            into: parent_path,
            removed: vec![child_path],
            copied_bytes: copied,
            size,
        })
    }

    /// A live clone: a consistent point-in-time copy of the disk at `dst` while it stays in
    /// use. The disk is copied while writes go on (the ranges they touch are recorded), then,
    /// with I/O paused, what changed meanwhile is copied again: the clone is the disk as it was
    /// at that moment. The disk itself is never changed in shape (no checkpoint), so a crash
    /// during a clone leaves it as it was; the copy is made under a temporary name beside `dst`
    /// and given its name only when complete. An existing `dst` is refused.
    pub fn clone_to(&self, dst: &Path, opts: &ConvertOptions, job: &Job) -> Result<ConvertReport> {
        let _op = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if std::fs::symlink_metadata(dst).is_ok() {
            return Err(invalid(format!("{} already exists", dst.display())));
        }
        let name = dst
            .file_name()
            .ok_or_else(|| invalid(format!("{} names no file", dst.display())))?;
        let tmp = dst.with_file_name(format!(".{}.partial", name.to_string_lossy()));
        let _ = std::fs::remove_file(&tmp);
        let cur = self.current();
        self.start_tracking();
        let map = |off: u64, len: u64| cur.fills(off, len, None);
        let finish = |out: &dyn BlockDevice| -> Result<u64> {
            // I/O paused: what changed during the copy.
            let _g = self.cur.write().unwrap_or_else(|p| p.into_inner());
            self.tracking.store(false, Ordering::SeqCst);
            let size = cur.capacity().min(out.capacity());
            copy_granules(&*cur, &map, out, size, self.take_dirty())
        };
        let r = crate::convert::convert_finishing(&*cur, Some(&map), &tmp, opts, job, &finish);
        self.tracking.store(false, Ordering::SeqCst);
        let r = r.and_then(|rep| {
            // Named only when complete, and never over a file that appeared meanwhile.
            std::fs::hard_link(&tmp, dst).map_err(|e| {
                vstor_core::Error::io(format!("cannot name the clone {}", dst.display()), e)
            })?;
            Ok(rep)
        });
        let _ = std::fs::remove_file(&tmp);
        sync_dir(dst);
        r
    }

    /// A storage live migration (Hyper-V's Move-VMStorage, QEMU's mirror and pivot): copies
    /// the disk (its whole chain, flattened) to a new VHDX at `dst` while it stays in use, then
    /// switches to it and deletes the image that took writes (unless `keep_source`; the
    /// chain's parents are never touched: other disks may share them).
    ///
    /// - The copy runs while writes go on; the ranges they touch are recorded and copied
    ///   again, in passes while writes still go on until what is left is small, and a last
    ///   time with I/O paused. With I/O still paused the copy is completed, named `dst` (made
    ///   under a temporary name beside it, as a clone is), opened and locked, and becomes the
    ///   image that takes writes; then I/O resumes on it. The report says how long I/O was
    ///   paused.
    /// - Until the copy is complete and durable the source is the disk: an error or a crash
    ///   before leaves the disk as it was (and no file at `dst`). Then, with I/O paused, the
    ///   source's top image leaves its name (`.NAME.moved` beside it) before `dst` takes the
    ///   writes, so no crash leaves a stale image under the name the disk was opened by; it
    ///   is deleted after the switch. With `keep_source` it keeps its name: a copy of the disk
    ///   as it was at the switch.
    /// - An existing `dst` is refused; so is a resize during the move (run it again).
    pub fn move_to(
        &self,
        dst: &Path,
        opts: &ConvertOptions,
        keep_source: bool,
        job: &Job,
    ) -> Result<MoveReport> {
        let _op = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if std::fs::symlink_metadata(dst).is_ok() {
            return Err(invalid(format!("{} already exists", dst.display())));
        }
        let name = dst
            .file_name()
            .ok_or_else(|| invalid(format!("{} names no file", dst.display())))?;
        let tmp = dst.with_file_name(format!(".{}.partial", name.to_string_lossy()));
        let _ = std::fs::remove_file(&tmp);
        let cur = self.current();
        let src_path = cur
            .path()
            .ok_or_else(|| invalid("a move needs an image opened from a path"))?
            .to_path_buf();
        if lock_key(&src_path) == lock_key(dst) {
            return Err(invalid(format!("{} is the disk itself", dst.display())));
        }
        let size = cur.capacity();
        let aside = (!keep_source).then(|| {
            src_path.with_file_name(format!(
                ".{}.moved",
                src_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ))
        });
        self.start_tracking();
        let map = |off: u64, len: u64| cur.fills(off, len, None);
        let copy_dirty = |out: &dyn BlockDevice, dirty: BTreeSet<u64>| -> Result<u64> {
            copy_granules(&*cur, &map, out, size, dirty)
        };
        // The guard of the pause, from the last pass to the switch.
        let held = std::cell::RefCell::new(None);
        let paused_at = std::cell::Cell::new(None);
        let finish = |out: &dyn BlockDevice| -> Result<u64> {
            let mut n = 0;
            // Passes while writes go on, until what is left is small (or the writes keep
            // up: the pause then takes the rest).
            for _ in 0..8 {
                let dirty = self.take_dirty();
                if dirty.len() <= 8 {
                    self.dirty
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(dirty);
                    break;
                }
                n += copy_dirty(out, dirty)?;
            }
            let g = self.cur.write().unwrap_or_else(|p| p.into_inner());
            paused_at.set(Some(std::time::Instant::now()));
            self.tracking.store(false, Ordering::SeqCst);
            if g.capacity() != size {
                return Err(invalid(
                    "the disk was resized during the move; nothing was moved (run it again)",
                ));
            }
            n += copy_dirty(out, self.take_dirty())?;
            *held.borrow_mut() = Some(g);
            Ok(n)
        };
        let r = crate::convert::convert_finishing(&*cur, Some(&map), &tmp, opts, job, &finish);
        self.tracking.store(false, Ordering::SeqCst);
        let mut g = held.borrow_mut().take();
        let switched = r.and_then(|rep| {
            let g = g
                .as_mut()
                .ok_or_else(|| invalid("the move's copy ended without its last pass"))?;
            std::fs::hard_link(&tmp, dst).map_err(|e| {
                vstor_core::Error::io(format!("cannot name the copy {}", dst.display()), e)
            })?;
            let _ = std::fs::remove_file(&tmp);
            sync_dir(dst);
            // The source leaves its name before the copy takes the writes, so that no crash
            // from here on leaves a stale image under the name the disk was opened by (it
            // is deleted once the switch is done).
            if let Some(aside) = &aside {
                std::fs::rename(&src_path, aside).map_err(|e| {
                    vstor_core::Error::io(format!("cannot move {} aside", src_path.display()), e)
                })?;
                sync_dir(&src_path);
            }
            let opened = self
                .relock(dst, self.writer_mode)
                .and_then(|()| Vhdx::open(dst, &self.opts));
            match opened {
                Ok(v) => {
                    **g = Arc::new(v);
                    Ok(rep)
                }
                Err(e) => {
                    // The source stays the disk: it gets its name back and the copy goes.
                    if let Some(aside) = &aside {
                        let _ = std::fs::rename(aside, &src_path);
                        sync_dir(&src_path);
                    }
                    self.unlock(dst);
                    let _ = std::fs::remove_file(dst);
                    Err(e)
                }
            }
        });
        let _ = std::fs::remove_file(&tmp);
        let paused = paused_at.get().map(|t| t.elapsed());
        drop(g);
        let rep = switched?;
        // The old chain's locks go (the new image holds its own); then its top image.
        if let Some(locks) = &self.locks {
            let keep = lock_key(dst);
            locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|k, _| *k == keep);
        }
        drop(cur);
        let deleted = match &aside {
            None => None,
            Some(aside) => {
                std::fs::remove_file(aside).map_err(|e| {
                    vstor_core::Error::io(
                        format!(
                            "moved to {}, but cannot remove the old image (now {})",
                            dst.display(),
                            aside.display()
                        ),
                        e,
                    )
                })?;
                sync_dir(aside);
                Some(src_path.clone())
            }
        };
        Ok(MoveReport {
            from: src_path,
            to: dst.to_path_buf(),
            copied_bytes: rep.written_bytes,
            paused: paused.unwrap_or_default(),
            deleted,
        })
    }

    /// Starts recording the ranges writes touch, with I/O held for a moment: a batch that
    /// looked at the flag before it was set (and so records nothing) has completed before the
    /// caller's copy starts, so the copy sees its data. Without this, such a write could land
    /// behind the copy and be lost.
    fn start_tracking(&self) {
        let _held = self.cur.write().unwrap_or_else(|p| p.into_inner());
        self.dirty.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.tracking.store(true, Ordering::SeqCst);
    }

    /// The granules written since the last call (tracking goes on).
    fn take_dirty(&self) -> BTreeSet<u64> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn record(&self, batch: &[Request<'_>]) {
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        for r in batch {
            let (off, len) = match r.op {
                Op::Write { .. } | Op::Discard { .. } | Op::WriteZeroes { .. } => {
                    (r.offset(), r.len())
                }
                _ => continue,
            };
            if len > 0 {
                d.extend(off / GRANULE..=(off + len - 1) / GRANULE);
            }
        }
    }
}

impl BlockDevice for LiveDisk {
    fn info(&self) -> DeviceInfo {
        self.current().info()
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let g = self.cur.read().unwrap_or_else(|p| p.into_inner());
        if self.tracking.load(Ordering::SeqCst) {
            self.record(batch);
        }
        g.submit(batch);
    }

    fn resize(&self, new_capacity: u64) -> Result<()> {
        let g = self.cur.read().unwrap_or_else(|p| p.into_inner());
        g.resize_with(new_capacity, &Job::new())?;
        drop(g);
        self.signal.publish(new_capacity);
        Ok(())
    }

    fn capacity_signal(&self) -> Option<Arc<CapacitySignal>> {
        Some(self.signal.clone())
    }

    fn describe(&self) -> String {
        format!("live {}", self.current().describe())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<vstor_core::Extent>> {
        let g = self.cur.read().unwrap_or_else(|p| p.into_inner());
        g.allocation(offset, len)
    }
}
