//! Offline dedup of a library of images (Windows' Start-DedupJob / Get-DedupStatus):
//! a directory whose files are replaced, one at a time and atomically, by stubs that name
//! their chunks in the library's store (`DIR/.vstor-dedup`).
//!
//! **Optimize** of one file: take its image lock exclusively (a file open elsewhere is
//! skipped), chunk its content, put the chunks, commit the stream (one index transaction),
//! write the stub beside the file, sync it, and rename it over the file. A cut anywhere leaves
//! the file as it was (plain, or its earlier stub) or the new stub; a stream whose stub never
//! landed is an orphan, which the next job drops. Jobs are resumable: a file already
//! optimized (a stub with an empty log) is passed over.

use crate::chunk::{chunk_id, chunk_stream, ChunkId};
use crate::error::{DedupError, Result};
use crate::format::{encode_stub, ChunkRef};
use crate::store::{GcReport, ScrubReport, Store, StoreConfig, StoreStats, Throttle};
use crate::stub::{file_is_stub, FileReader, StubImage, StubReader, STORE_DIR};
use crate::vfs::{LockGuard, OpenMode, Vfs};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const TMP_SUFFIX: &str = ".vstor-tmp";

/// Chunks in flight between an optimize's chunker and its writer.
const PIPELINE_CHUNKS: usize = 64;

/// Files smaller than this are left alone (a stub takes at least 4 KiB).
pub const MIN_FILE_SIZE: u64 = 64 << 10;

/// The state of one file of a library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    /// A plain file (not optimized).
    Plain,
    /// A stub; `log_bytes` written since the optimize (0: exactly as optimized).
    Optimized {
        /// Its stream in the index.
        stream: u64,
        /// Bytes of its write log.
        log_bytes: u64,
    },
    /// A stub that cannot be read: the reason.
    Broken(String),
}

/// One file of a library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryFile {
    /// Path relative to the library.
    pub name: String,
    /// Size of its content.
    pub size: u64,
    /// Bytes it takes on the host file system.
    pub on_disk: u64,
    /// Its state.
    pub state: FileState,
}

/// Progress of a job: `(file, bytes done in it, its size)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

/// What an optimize did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptimizeReport {
    /// Files optimized now.
    pub optimized: Vec<String>,
    /// Files skipped because another process has them open.
    pub in_use: Vec<String>,
    /// Files that were optimized already.
    pub already: u64,
    /// Files too small to optimize.
    pub small: u64,
    /// Bytes read and chunked.
    pub bytes: u64,
    /// Chunks (references) made.
    pub chunks: u64,
    /// Of those, chunks new to the store.
    pub new_chunks: u64,
}

/// A library opened for a job. Holds the store's job lock: one job at a time.
pub struct Library {
    fs: Arc<dyn Vfs>,
    root: PathBuf,
    store: Store,
    _lock: LockGuard,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library").field("root", &self.root).finish()
    }
}

impl Library {
    /// Marks `root` as a dedup library: makes its store.
    pub fn enable(fs: Arc<dyn Vfs>, root: &Path, cfg: StoreConfig) -> Result<()> {
        if !fs.exists(root) || fs.is_file(root) {
            return Err(DedupError::Invalid(format!(
                "{} is not a directory",
                root.display()
            )));
        }
        if crate::store::is_store_dir(&*fs, root) {
            return Err(DedupError::Invalid(format!(
                "{} is a dedup store of volumes, not a library of files (its volumes are read through dedup:{}/NAME)",
                root.display(),
                root.display()
            )));
        }
        Store::create(fs, &root.join(STORE_DIR), cfg)?;
        Ok(())
    }

    /// Opens the library at `root` for a job.
    pub fn open(fs: Arc<dyn Vfs>, root: &Path) -> Result<Library> {
        let sdir = root.join(STORE_DIR);
        if !fs.exists(&sdir.join("store")) {
            return Err(DedupError::Invalid(format!(
                "{} is not a dedup library (run vstor dedup enable {} first)",
                root.display(),
                root.display()
            )));
        }
        let lock = fs
            .try_lock(&sdir.join("store"), true)
            .map_err(|e| DedupError::io(format!("cannot lock {}", sdir.display()), e))?
            .ok_or_else(|| {
                DedupError::InUse(format!(
                    "another dedup job is running on {}",
                    root.display()
                ))
            })?;
        let store = Store::open(fs.clone(), &sdir)?;
        Ok(Library {
            fs,
            root: root.to_path_buf(),
            store,
            _lock: lock,
        })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The library's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every file of the library (relative names), the store's directory left out.
    pub fn file_names(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = self.root.join(&rel);
            let list = self
                .fs
                .list(&dir)
                .map_err(|e| DedupError::io(format!("cannot list {}", dir.display()), e))?;
            for (name, is_dir) in list {
                let r = rel.join(&name);
                if is_dir {
                    // The library's own store, and any store of volumes kept in the library:
                    // their files are the stores, not files to optimize.
                    if (rel.as_os_str().is_empty() && name == STORE_DIR)
                        || crate::store::is_store_dir(&*self.fs, &self.root.join(&r))
                    {
                        continue;
                    }
                    stack.push(r);
                } else if !name.ends_with(TMP_SUFFIX) {
                    out.push(r.to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn tmp_path(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        let f = p.file_name().map(|f| f.to_string_lossy().into_owned());
        p.with_file_name(format!(".{}{TMP_SUFFIX}", f.unwrap_or_default()))
    }

    /// Opens a library file's stub.
    pub fn open_stub(&self, name: &str, writable: bool) -> Result<StubImage> {
        StubImage::open_in(
            self.fs.clone(),
            &self.path(name),
            self.store.dir(),
            writable,
        )
    }

    /// Every file with its state.
    pub fn files(&self) -> Result<Vec<LibraryFile>> {
        let mut out = Vec::new();
        for name in self.file_names()? {
            let p = self.path(&name);
            let on_disk = self
                .fs
                .open(&p, OpenMode::Read)
                .and_then(|f| f.len())
                .unwrap_or(0);
            let (size, state) = if file_is_stub(&*self.fs, &p) {
                match self.open_stub(&name, false) {
                    Ok(s) => (
                        s.size(),
                        FileState::Optimized {
                            stream: s.header().stream,
                            log_bytes: s.log_bytes(),
                        },
                    ),
                    Err(e) => (0, FileState::Broken(e.to_string())),
                }
            } else {
                (on_disk, FileState::Plain)
            };
            out.push(LibraryFile {
                name,
                size,
                on_disk,
                state,
            });
        }
        Ok(out)
    }

    /// The streams that stubs in the library name.
    fn live_streams(&self) -> Result<HashSet<u64>> {
        Ok(self
            .files()?
            .into_iter()
            .filter_map(|f| match f.state {
                FileState::Optimized { stream, .. } => Some(stream),
                _ => None,
            })
            .collect())
    }

    /// Removes what a job cut short left: stub files never renamed, streams whose stub never
    /// landed (or was replaced).
    pub fn recover(&self) -> Result<u64> {
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let list = self
                .fs
                .list(&dir)
                .map_err(|e| DedupError::io(format!("cannot list {}", dir.display()), e))?;
            for (name, is_dir) in list {
                if is_dir
                    && name != STORE_DIR
                    && !crate::store::is_store_dir(&*self.fs, &dir.join(&name))
                {
                    stack.push(dir.join(&name));
                } else if !is_dir && name.ends_with(TMP_SUFFIX) {
                    let p = dir.join(&name);
                    self.fs
                        .remove(&p)
                        .map_err(|e| DedupError::io(format!("cannot remove {}", p.display()), e))?;
                }
            }
        }
        let live = self.live_streams()?;
        let mut dropped = 0;
        for id in self.store.streams()?.keys() {
            if !live.contains(id) {
                self.store.delete_stream(*id)?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Optimizes every file that is not open (or only `only`).
    pub fn optimize(
        &self,
        only: Option<&str>,
        throttle: Option<u64>,
        progress: Progress<'_>,
    ) -> Result<OptimizeReport> {
        self.recover()?;
        let mut rep = OptimizeReport::default();
        let names = match only {
            Some(n) => vec![n.to_string()],
            None => self.file_names()?,
        };
        let mut w = self.store.writer()?;
        let mut throttle = throttle.map(Throttle::new);
        for name in names {
            let p = self.path(&name);
            let Some(lock) = self
                .fs
                .try_lock(&p, true)
                .map_err(|e| DedupError::io(format!("cannot lock {}", p.display()), e))?
            else {
                rep.in_use.push(name);
                continue;
            };
            let stub = if file_is_stub(&*self.fs, &p) {
                let s = self.open_stub(&name, false)?;
                if s.log_records() == 0 {
                    rep.already += 1;
                    continue;
                }
                Some(s)
            } else {
                None
            };
            let file = self
                .fs
                .open(&p, OpenMode::Read)
                .map_err(|e| DedupError::io(format!("cannot open {}", p.display()), e))?;
            let size = match &stub {
                Some(s) => s.size(),
                None => file
                    .len()
                    .map_err(|e| DedupError::io(format!("cannot size {}", p.display()), e))?,
            };
            if stub.is_none() && size < MIN_FILE_SIZE {
                rep.small += 1;
                continue;
            }
            // Two stages on two threads: this file's reader chunks and hashes; this thread
            // looks the chunks up, compresses the new ones and appends them (every write of
            // the job stays on this thread, in the order it had).
            let params = self.store.config().params;
            let (tx, rx) = std::sync::mpsc::sync_channel::<(ChunkId, Vec<u8>)>(PIPELINE_CHUNKS);
            let thr = throttle.as_mut();
            let (n, refs) = std::thread::scope(|sc| -> Result<(u64, Vec<ChunkRef>)> {
                let stub = &stub;
                let p = &p;
                let chunker = sc.spawn(move || -> Result<u64> {
                    let mut thr = thr;
                    let send = |_: u64, d: &[u8]| -> Result<()> {
                        if let Some(t) = thr.as_mut() {
                            t.take(d.len() as u64);
                        }
                        tx.send((chunk_id(d), d.to_vec())).map_err(|_| {
                            DedupError::Invalid("the optimize of this file stopped".into())
                        })
                    };
                    let io = |e: std::io::Error| {
                        DedupError::io(format!("cannot read {}", p.display()), e)
                    };
                    match stub {
                        Some(s) => chunk_stream(StubReader::new(s), params, send),
                        None => chunk_stream(FileReader::new(file).map_err(io)?, params, send),
                    }
                });
                let mut refs: Vec<ChunkRef> = Vec::new();
                let mut done = 0u64;
                let mut failed = None;
                while let Ok((id, data)) = rx.recv() {
                    match w.put_hashed(id, &data) {
                        Ok(r) => refs.push(r),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                    done += data.len() as u64;
                    progress(&name, done, size);
                }
                // The chunker stops at its next chunk once nothing takes them.
                drop(rx);
                let n = chunker.join().expect("the chunker does not panic");
                match failed {
                    Some(e) => Err(e),
                    None => Ok((n?, refs)),
                }
            })?;
            let new_chunks = w.new_count();
            let stream = self.store.commit_stream(&mut w, &name, &refs)?;
            let bytes = encode_stub(&self.store.id(), stream, &refs);
            self.replace(&name, &bytes)?;
            if let Some(old) = &stub {
                self.store.delete_stream(old.header().stream)?;
            }
            drop(lock);
            rep.optimized.push(name);
            rep.bytes += n;
            rep.chunks += refs.len() as u64;
            rep.new_chunks += new_chunks;
        }
        self.store.make_hotspots()?;
        Ok(rep)
    }

    /// Writes `bytes` beside the file and renames it over the file.
    fn replace(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.tmp_path(name);
        let p = self.path(name);
        let f = self
            .fs
            .open(&tmp, OpenMode::Truncate)
            .map_err(|e| DedupError::io(format!("cannot create {}", tmp.display()), e))?;
        f.write_at(0, bytes)
            .and_then(|_| f.sync())
            .map_err(|e| DedupError::io(format!("cannot write {}", tmp.display()), e))?;
        self.fs
            .rename(&tmp, &p)
            .map_err(|e| DedupError::io(format!("cannot replace {}", p.display()), e))
    }

    /// Puts optimized files back as plain files (all, or `only`). Returns the names.
    pub fn unoptimize(&self, only: Option<&str>, progress: Progress<'_>) -> Result<Vec<String>> {
        self.recover()?;
        let names = match only {
            Some(n) => {
                if !file_is_stub(&*self.fs, &self.path(n)) {
                    return Err(DedupError::Invalid(format!(
                        "{} is not optimized",
                        self.path(n).display()
                    )));
                }
                vec![n.to_string()]
            }
            None => self.file_names()?,
        };
        let mut done = Vec::new();
        for name in names {
            let p = self.path(&name);
            if !file_is_stub(&*self.fs, &p) {
                continue;
            }
            let _lock = self
                .fs
                .try_lock(&p, true)
                .map_err(|e| DedupError::io(format!("cannot lock {}", p.display()), e))?
                .ok_or_else(|| {
                    DedupError::InUse(format!("{} is in use by another process", p.display()))
                })?;
            let s = self.open_stub(&name, false)?;
            let tmp = self.tmp_path(&name);
            let f = self
                .fs
                .open(&tmp, OpenMode::Truncate)
                .map_err(|e| DedupError::io(format!("cannot create {}", tmp.display()), e))?;
            let size = s.size();
            let mut buf = vec![0u8; 4 << 20];
            let mut at = 0u64;
            while at < size {
                let n = (size - at).min(buf.len() as u64) as usize;
                s.read(at, &mut buf[..n])?;
                f.write_at(at, &buf[..n])
                    .map_err(|e| DedupError::io(format!("cannot write {}", tmp.display()), e))?;
                at += n as u64;
                progress(&name, at, size);
            }
            f.set_len(size)
                .and_then(|_| f.sync())
                .map_err(|e| DedupError::io(format!("cannot write {}", tmp.display()), e))?;
            self.fs
                .rename(&tmp, &p)
                .map_err(|e| DedupError::io(format!("cannot replace {}", p.display()), e))?;
            self.store.delete_stream(s.header().stream)?;
            done.push(name);
        }
        Ok(done)
    }

    /// Garbage collection: drops unreferenced chunks, deletes empty containers, compacts
    /// sparse ones and rewrites the stubs that pointed into them (a stub open elsewhere keeps
    /// its container until a later GC).
    pub fn gc(&self) -> Result<(GcReport, Vec<String>)> {
        self.recover()?;
        let live = self.live_streams()?;
        let mut rep = self.store.gc(&live)?;
        let retired: HashSet<u32> = self.store.retired()?.into_iter().collect();
        let mut pinned: HashSet<u32> = HashSet::new();
        let mut waiting = Vec::new();
        if !retired.is_empty() {
            for name in self.file_names()? {
                let p = self.path(&name);
                if !file_is_stub(&*self.fs, &p) {
                    continue;
                }
                let s = self.open_stub(&name, false)?;
                let hits: HashSet<u32> = s
                    .refs()
                    .iter()
                    .map(|r| r.container)
                    .filter(|c| retired.contains(c))
                    .collect();
                if hits.is_empty() {
                    continue;
                }
                let Some(_lock) = self
                    .fs
                    .try_lock(&p, true)
                    .map_err(|e| DedupError::io(format!("cannot lock {}", p.display()), e))?
                else {
                    pinned.extend(hits);
                    waiting.push(name);
                    continue;
                };
                let ids: Vec<_> = s.refs().iter().map(|r| r.id).collect();
                let refs = self.store.locate(&ids)?;
                let mut bytes = encode_stub(&self.store.id(), s.header().stream, &refs);
                bytes.extend_from_slice(&s.log_raw()?);
                self.replace(&name, &bytes)?;
            }
            for id in retired {
                if !pinned.contains(&id) {
                    rep.bytes_freed += self.store.drop_retired(id)?;
                    rep.containers_deleted += 1;
                }
            }
        }
        Ok((rep, waiting))
    }

    /// Scrub: every chunk's hash, repairs from hotspot copies; and every stub's chunks must
    /// be in the index. Returns the store's report and the stubs whose chunks are missing.
    pub fn scrub(&self) -> Result<(ScrubReport, Vec<String>)> {
        let rep = self.store.scrub()?;
        let mut missing = Vec::new();
        for name in self.file_names()? {
            let p = self.path(&name);
            if !file_is_stub(&*self.fs, &p) {
                continue;
            }
            match self.open_stub(&name, false) {
                Ok(s) => {
                    for r in s.refs() {
                        if self.store.chunk(&r.id)?.is_none() {
                            missing.push(format!(
                                "{name}: chunk {} is not in the store",
                                crate::chunk::hex(&r.id)
                            ));
                            break;
                        }
                    }
                }
                Err(e) => missing.push(format!("{name}: {e}")),
            }
        }
        Ok((rep, missing))
    }

    /// Figures of the store.
    pub fn stats(&self) -> Result<StoreStats> {
        self.store.stats()
    }
}
