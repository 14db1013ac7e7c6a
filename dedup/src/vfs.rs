//! The file system the store and the library live on: the host's ([`RealFs`]), or a simulated
//! one ([`SimFs`]) that holds writes in a volatile cache until a sync and can lose power at any
//! write, so that crash tests can cut power at every write of a job.
//!
//! The contract the store relies on: a file's writes are durable after [`VFile::sync`];
//! [`Vfs::rename`] and [`Vfs::remove`] are atomic and durable when they return (the real file
//! system syncs the directory).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// An open file.
pub trait VFile: Send + Sync + Debug {
    /// Reads exactly `buf.len()` bytes at `offset` (an error past the end).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `data` at `offset`, extending the file as needed.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeroes) the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every earlier write durable.
    fn sync(&self) -> io::Result<()>;
}

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, read-only.
    Read,
    /// An existing file, read and write.
    Write,
    /// Created if missing, kept if there.
    Create,
    /// Created, or emptied if there.
    Truncate,
}

/// A held lock on a file; dropping it releases it.
pub type LockGuard = Box<dyn Send + Sync>;

/// A file system.
pub trait Vfs: Send + Sync + Debug {
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VFile>>;
    /// Renames a file atomically and durably, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file durably.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Whether a file or directory exists.
    fn exists(&self, path: &Path) -> bool;
    /// Whether `path` is a regular file.
    fn is_file(&self, path: &Path) -> bool;
    /// The names of the entries of a directory, sorted; `(name, is_dir)`.
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Takes the image lock on a file without waiting: `Ok(None)` when another holder has it
    /// (the file is open elsewhere).
    fn try_lock(&self, path: &Path, exclusive: bool) -> io::Result<Option<LockGuard>>;
}

// ---------------------------------------------------------------------------------------------
// The host's file system.

/// The host file system (std::fs, image locks of vstor-core).
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

#[derive(Debug)]
struct RealFile(std::fs::File);

impl VFile for RealFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.write_all_at(data, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

impl Vfs for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VFile>> {
        let mut o = std::fs::OpenOptions::new();
        o.read(true);
        match mode {
            OpenMode::Read => {}
            OpenMode::Write => {
                o.write(true);
            }
            OpenMode::Create => {
                o.write(true).create(true);
            }
            OpenMode::Truncate => {
                o.write(true).create(true).truncate(true);
            }
        }
        let f = o.open(path)?;
        if matches!(mode, OpenMode::Create | OpenMode::Truncate) {
            sync_dir(path)?;
        }
        Ok(Arc::new(RealFile(f)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)?;
        sync_dir(to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)?;
        sync_dir(path)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn is_file(&self, path: &Path) -> bool {
        path.is_file()
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let ft = e.file_type()?;
            out.push((e.file_name().to_string_lossy().into_owned(), ft.is_dir()));
        }
        out.sort();
        Ok(out)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn try_lock(&self, path: &Path, exclusive: bool) -> io::Result<Option<LockGuard>> {
        let mode = if exclusive {
            vstor_core::LockMode::Exclusive
        } else {
            vstor_core::LockMode::Shared
        };
        match vstor_core::ImageLock::acquire(path, mode) {
            Ok(l) => Ok(Some(Box::new(l))),
            Err(e) if e.kind() == vstor_core::ErrorKind::InUse => Ok(None),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated file system.

#[derive(Debug, Default)]
struct SimNode {
    /// What reads see.
    cur: Vec<u8>,
    /// What survives a power cut for certain.
    durable: Vec<u8>,
    /// Writes since the last sync, in order: `(offset, data)`, or a length change as
    /// `(len, None)`.
    pending: Vec<(u64, Option<Vec<u8>>)>,
}

#[derive(Debug, Default)]
struct SimState {
    files: BTreeMap<PathBuf, Arc<Mutex<SimNode>>>,
    dirs: std::collections::BTreeSet<PathBuf>,
    /// Write-type operations so far.
    writes: u64,
    /// Cut power when `writes` reaches this.
    cut_at: Option<u64>,
    seed: u64,
    powered_off: bool,
    /// Bumped at every power cut: handles of an earlier epoch fail.
    epoch: u64,
    /// Files that tests say another process holds open.
    held: std::collections::BTreeSet<PathBuf>,
    locks: BTreeMap<PathBuf, (u32, bool)>,
    /// A limit on the bytes all files may hold (a full disk).
    capacity: Option<u64>,
}

/// An in-memory file system with a volatile write cache and power cuts.
///
/// Every write, length change, rename and remove counts as one write. [`SimFs::arm_cut`] cuts
/// power at the N-th write from then on: that write and every unsynced write before it each
/// reach the medium whole, torn at a 512-byte boundary, or not at all (chosen by a seeded
/// generator); renames and removes happen or do not. Until [`SimFs::power_on`], every
/// operation fails.
#[derive(Debug, Clone, Default)]
pub struct SimFs {
    st: Arc<Mutex<SimState>>,
}

#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    node: Arc<Mutex<SimNode>>,
    epoch: u64,
    writable: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn off() -> io::Error {
    io::Error::other("simulated power cut: the file system is off")
}

fn apply(buf: &mut Vec<u8>, op: &(u64, Option<Vec<u8>>)) {
    match op {
        (len, None) => buf.resize(*len as usize, 0),
        (off, Some(d)) => {
            let end = *off as usize + d.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*off as usize..end].copy_from_slice(d);
        }
    }
}

impl SimFs {
    /// An empty file system.
    pub fn new() -> SimFs {
        SimFs::default()
    }

    /// Write-type operations so far.
    pub fn writes(&self) -> u64 {
        lock(&self.st).writes
    }

    /// Cuts power at the `n`-th write from now (1: the next one), deciding the fate of
    /// unsynced writes with `seed`.
    pub fn arm_cut(&self, n: u64, seed: u64) {
        let mut st = lock(&self.st);
        st.cut_at = Some(st.writes + n.max(1));
        st.seed = seed;
    }

    /// Whether a power cut has happened (and power is still off).
    pub fn is_off(&self) -> bool {
        lock(&self.st).powered_off
    }

    /// Cuts power now.
    pub fn cut_now(&self, seed: u64) {
        let mut st = lock(&self.st);
        st.seed = seed;
        Self::cut(&mut st);
    }

    /// Powers on after a cut: the files hold what reached the medium; open handles are dead.
    pub fn power_on(&self) {
        let mut st = lock(&self.st);
        st.powered_off = false;
        st.cut_at = None;
        st.locks.clear();
    }

    /// Says that another process holds `path` open (its lock), or no longer does.
    pub fn set_held(&self, path: &Path, held: bool) {
        let mut st = lock(&self.st);
        if held {
            st.held.insert(path.to_path_buf());
        } else {
            st.held.remove(path);
        }
    }

    /// Limits the bytes all files together may hold (`None`: no limit).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        lock(&self.st).capacity = bytes;
    }

    /// Bytes all files hold now.
    pub fn used(&self) -> u64 {
        Self::used_in(&lock(&self.st))
    }

    /// The current content of a file (for tests).
    pub fn read_all(&self, path: &Path) -> Option<Vec<u8>> {
        let st = lock(&self.st);
        st.files.get(path).map(|n| lock(n).cur.clone())
    }

    /// Replaces the content of a file, durably (for tests that damage files).
    pub fn write_all(&self, path: &Path, data: &[u8]) {
        let mut st = lock(&self.st);
        let node = st.files.entry(path.to_path_buf()).or_default().clone();
        let mut n = lock(&node);
        n.cur = data.to_vec();
        n.durable = data.to_vec();
        n.pending.clear();
    }

    fn cut(st: &mut SimState) {
        let mut rng = fastrand::Rng::with_seed(st.seed);
        for node in st.files.values() {
            let mut n = lock(node);
            let mut buf = std::mem::take(&mut n.durable);
            for op in std::mem::take(&mut n.pending) {
                match rng.u8(0..3) {
                    0 => {}
                    1 => apply(&mut buf, &op),
                    _ => {
                        // Torn: a prefix of its 512-byte sectors.
                        if let (o, Some(d)) = &op {
                            let sectors = d.len().div_ceil(512);
                            let keep = rng.usize(0..=sectors) * 512;
                            let d = d[..keep.min(d.len())].to_vec();
                            apply(&mut buf, &(*o, Some(d)));
                        } else {
                            apply(&mut buf, &op);
                        }
                    }
                }
            }
            n.cur = buf.clone();
            n.durable = buf;
        }
        st.powered_off = true;
        st.cut_at = None;
        st.epoch += 1;
    }

    /// Counts one write; `Err` if power is off or goes off now. `Ok(true)` when this write is
    /// the one the cut happens at (the caller records it as pending first, then cuts).
    fn count_write(st: &mut SimState) -> io::Result<bool> {
        if st.powered_off {
            return Err(off());
        }
        st.writes += 1;
        Ok(st.cut_at == Some(st.writes))
    }

    fn used_in(st: &SimState) -> u64 {
        st.files.values().map(|n| lock(n).cur.len() as u64).sum()
    }
}

impl SimFile {
    fn check(&self, st: &SimState) -> io::Result<()> {
        if st.powered_off || st.epoch != self.epoch {
            return Err(off());
        }
        Ok(())
    }

    fn write_op(&self, op: (u64, Option<Vec<u8>>)) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(9));
        }
        let mut st = lock(&self.fs.st);
        self.check(&st)?;
        if let Some(cap) = st.capacity {
            let cur = lock(&self.node).cur.len() as u64;
            let end = match &op {
                (len, None) => *len,
                (o, Some(d)) => (o + d.len() as u64).max(cur),
            };
            if SimFs::used_in(&st) + end.saturating_sub(cur) > cap {
                return Err(io::Error::from_raw_os_error(28));
            }
        }
        let cut = SimFs::count_write(&mut st)?;
        {
            let mut n = lock(&self.node);
            apply(&mut n.cur, &op);
            n.pending.push(op);
        }
        if cut {
            SimFs::cut(&mut st);
            return Err(off());
        }
        Ok(())
    }
}

impl VFile for SimFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(&lock(&self.fs.st))?;
        let n = lock(&self.node);
        let end = offset as usize + buf.len();
        if end > n.cur.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        buf.copy_from_slice(&n.cur[offset as usize..end]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_op((offset, Some(data.to_vec())))
    }
    fn len(&self) -> io::Result<u64> {
        self.check(&lock(&self.fs.st))?;
        Ok(lock(&self.node).cur.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.write_op((len, None))
    }
    fn sync(&self) -> io::Result<()> {
        let st = lock(&self.fs.st);
        self.check(&st)?;
        let mut n = lock(&self.node);
        n.durable = n.cur.clone();
        n.pending.clear();
        Ok(())
    }
}

struct SimLock {
    fs: SimFs,
    path: PathBuf,
    epoch: u64,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut st = lock(&self.fs.st);
        if st.epoch != self.epoch {
            return;
        }
        if let Some((n, _)) = st.locks.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                st.locks.remove(&self.path);
            }
        }
    }
}

impl Vfs for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VFile>> {
        let mut st = lock(&self.st);
        if st.powered_off {
            return Err(off());
        }
        let node = match (st.files.get(path).cloned(), mode) {
            (Some(n), OpenMode::Truncate) => {
                drop(st);
                let f = SimFile {
                    fs: self.clone(),
                    node: n.clone(),
                    epoch: lock(&self.st).epoch,
                    writable: true,
                };
                f.set_len(0)?;
                return Ok(Arc::new(f));
            }
            (Some(n), _) => n,
            (None, OpenMode::Create | OpenMode::Truncate) => {
                let parent = path.parent().unwrap_or(Path::new(""));
                if !parent.as_os_str().is_empty() && !st.dirs.contains(parent) {
                    return Err(io::Error::from(io::ErrorKind::NotFound));
                }
                let n = Arc::new(Mutex::new(SimNode::default()));
                st.files.insert(path.to_path_buf(), n.clone());
                n
            }
            (None, _) => return Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            node,
            epoch: st.epoch,
            writable: mode != OpenMode::Read,
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = lock(&self.st);
        let cut = SimFs::count_write(&mut st)?;
        let happens = !cut || fastrand::Rng::with_seed(st.seed).bool();
        if happens {
            let n = st
                .files
                .remove(from)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            st.files.insert(to.to_path_buf(), n);
        }
        if cut {
            SimFs::cut(&mut st);
            return Err(off());
        }
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = lock(&self.st);
        let cut = SimFs::count_write(&mut st)?;
        let happens = !cut || fastrand::Rng::with_seed(st.seed).bool();
        if happens && st.files.remove(path).is_none() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        if cut {
            SimFs::cut(&mut st);
            return Err(off());
        }
        Ok(())
    }
    fn exists(&self, path: &Path) -> bool {
        let st = lock(&self.st);
        st.files.contains_key(path) || st.dirs.contains(path)
    }
    fn is_file(&self, path: &Path) -> bool {
        lock(&self.st).files.contains_key(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let st = lock(&self.st);
        if st.powered_off {
            return Err(off());
        }
        if !st.dirs.contains(dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let child = |p: &Path| -> Option<String> {
            (p.parent() == Some(dir)).then(|| p.file_name().unwrap().to_string_lossy().into())
        };
        let mut out: Vec<(String, bool)> = st
            .files
            .keys()
            .filter_map(|p| child(p).map(|n| (n, false)))
            .chain(st.dirs.iter().filter_map(|p| child(p).map(|n| (n, true))))
            .collect();
        out.sort();
        Ok(out)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = lock(&self.st);
        if st.powered_off {
            return Err(off());
        }
        let mut p = Some(dir);
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            st.dirs.insert(d.to_path_buf());
            p = d.parent();
        }
        Ok(())
    }
    fn try_lock(&self, path: &Path, exclusive: bool) -> io::Result<Option<LockGuard>> {
        let mut st = lock(&self.st);
        if st.powered_off {
            return Err(off());
        }
        if st.held.contains(path) {
            return Ok(None);
        }
        match st.locks.get_mut(path) {
            Some((n, ex)) => {
                if *ex || exclusive {
                    return Ok(None);
                }
                *n += 1;
            }
            None => {
                st.locks.insert(path.to_path_buf(), (1, exclusive));
            }
        }
        Ok(Some(Box::new(SimLock {
            fs: self.clone(),
            path: path.to_path_buf(),
            epoch: st.epoch,
        })))
    }
}
