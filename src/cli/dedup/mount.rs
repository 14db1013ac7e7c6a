//! `vstor dedup mount DIR MNT`: a read-only FUSE view of a dedup library, in which every file,
//! optimized or not, reads as its original bytes, so that tools that know nothing of vstor
//! (`qemu-img`, `cmp`, `md5sum`) can read an optimized library.
//!
//! The view lists the library's files (the store's directory left out) as they are at mount
//! time. A file is opened at its first read and stays open (with a shared image lock, as a
//! reader through the stack builder holds, so that optimize and unoptimize leave it alone)
//! until the view is unmounted. An optimized file reads through its stub: its chunks from the
//! store, each checked against its hash, and the writes made since it was optimized.

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
    Request,
};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use vstor::core::{ImageLock, LockMode};
use vstor::Error;
use vstor_dedup::library::{FileState, Library};
use vstor_dedup::stub::{file_is_stub, StubImage};
use vstor_dedup::vfs::RealFs;

/// How long the kernel may cache names and attributes: the view does not change.
const TTL: Duration = Duration::from_secs(60);

/// A file or directory of the view.
struct Node {
    /// The path relative to the library ("" for the root).
    rel: PathBuf,
    dir: bool,
    size: u64,
    mtime: SystemTime,
    parent: u64,
    /// Directories: (name, inode) of each entry, sorted by name.
    entries: Vec<(OsString, u64)>,
}

/// What reads of an open file go to.
enum Source {
    Stub(Box<StubImage>),
    Plain(std::fs::File),
}

/// An open file and the image lock held while it is.
struct Open {
    source: Source,
    _lock: ImageLock,
}

/// The view: a tree of the library's files made at mount time. It holds no job lock: optimize,
/// GC and scrub run while it is mounted (and leave alone the files it has open).
struct LibraryView {
    root: PathBuf,
    /// Inode `i` is `nodes[i - 1]`; inode 1 is the root.
    nodes: Vec<Node>,
    open: Mutex<HashMap<u64, Arc<Open>>>,
    uid: u32,
    gid: u32,
}

impl LibraryView {
    fn new(lib: Library) -> Result<LibraryView, Error> {
        let root = lib.root().to_path_buf();
        let root_mtime = std::fs::metadata(&root)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut nodes = vec![Node {
            rel: PathBuf::new(),
            dir: true,
            size: 0,
            mtime: root_mtime,
            parent: 1,
            entries: Vec::new(),
        }];
        let mut dirs: HashMap<PathBuf, u64> = HashMap::from([(PathBuf::new(), 1)]);
        let files = lib.files().map_err(super::de)?;
        for f in files {
            let rel = PathBuf::from(&f.name);
            let size = match f.state {
                FileState::Plain | FileState::Optimized { .. } => f.size,
                // Listed, so that it is seen; reading it says why it cannot be read.
                FileState::Broken(_) => 0,
            };
            // Its directories, made as needed.
            let mut parent = 1u64;
            let mut at = PathBuf::new();
            let comps: Vec<_> = rel.components().collect();
            for c in &comps[..comps.len().saturating_sub(1)] {
                at.push(c);
                parent = match dirs.get(&at) {
                    Some(&i) => i,
                    None => {
                        let mtime = std::fs::metadata(root.join(&at))
                            .and_then(|m| m.modified())
                            .unwrap_or(root_mtime);
                        nodes.push(Node {
                            rel: at.clone(),
                            dir: true,
                            size: 0,
                            mtime,
                            parent,
                            entries: Vec::new(),
                        });
                        let ino = nodes.len() as u64;
                        let name = c.as_os_str().to_os_string();
                        nodes[parent as usize - 1].entries.push((name, ino));
                        dirs.insert(at.clone(), ino);
                        ino
                    }
                };
            }
            let mtime = std::fs::metadata(root.join(&rel))
                .and_then(|m| m.modified())
                .unwrap_or(root_mtime);
            let name = rel.file_name().unwrap_or_default().to_os_string();
            nodes.push(Node {
                rel,
                dir: false,
                size,
                mtime,
                parent,
                entries: Vec::new(),
            });
            let ino = nodes.len() as u64;
            nodes[parent as usize - 1].entries.push((name, ino));
        }
        for n in &mut nodes {
            n.entries.sort();
        }
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ok(LibraryView {
            root,
            nodes,
            open: Mutex::new(HashMap::new()),
            uid,
            gid,
        })
    }

    fn node(&self, ino: INodeNo) -> Option<&Node> {
        let i = u64::from(ino);
        (i >= 1).then(|| self.nodes.get(i as usize - 1)).flatten()
    }

    fn attr(&self, ino: u64, n: &Node) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind: if n.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if n.dir { 0o555 } else { 0o444 },
            nlink: if n.dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 64 << 10,
        }
    }

    /// The open file of inode `ino`, opened at its first read.
    fn source(&self, ino: u64, n: &Node) -> Result<Arc<Open>, String> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = open.get(&ino) {
            return Ok(o.clone());
        }
        let path = self.root.join(&n.rel);
        let lock = ImageLock::acquire(&path, LockMode::Shared).map_err(|e| e.to_string())?;
        let source = if file_is_stub(&RealFs, &path) {
            Source::Stub(Box::new(
                StubImage::open(Arc::new(RealFs), &path, false).map_err(|e| e.to_string())?,
            ))
        } else {
            Source::Plain(
                std::fs::File::open(&path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
            )
        };
        let o = Arc::new(Open {
            source,
            _lock: lock,
        });
        open.insert(ino, o.clone());
        Ok(o)
    }
}

/// Reads what the file holds at `offset` (fewer bytes at its end).
fn read_source(s: &Source, offset: u64, size: u32) -> Result<Vec<u8>, String> {
    match s {
        Source::Stub(st) => {
            let end = (offset + u64::from(size)).min(st.size());
            let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
            if !buf.is_empty() {
                st.read(offset, &mut buf).map_err(|e| e.to_string())?;
            }
            Ok(buf)
        }
        Source::Plain(f) => {
            let mut buf = vec![0u8; size as usize];
            let mut got = 0usize;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            buf.truncate(got);
            Ok(buf)
        }
    }
}

impl Filesystem for LibraryView {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(p) = self.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match p.entries.binary_search_by(|(n, _)| n.as_os_str().cmp(name)) {
            Ok(i) => {
                let ino = p.entries[i].1;
                let n = &self.nodes[ino as usize - 1];
                reply.entry(&TTL, &self.attr(ino, n), Generation(0));
            }
            Err(_) => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Some(n) => reply.attr(&TTL, &self.attr(u64::from(ino), n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if n.dir {
            return reply.error(Errno::EISDIR);
        }
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.source(u64::from(ino), n) {
            // The kernel may keep what it read: the view does not change.
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => {
                eprintln!("vstor dedup mount: {}: {e}", n.rel.display());
                reply.error(Errno::EIO)
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let r = self
            .source(u64::from(ino), n)
            .and_then(|o| read_source(&o.source, offset, size));
        match r {
            Ok(buf) => reply.data(&buf),
            Err(e) => {
                eprintln!(
                    "vstor dedup mount: read of {} bytes at {offset} of {}: {e}",
                    size,
                    n.rel.display()
                );
                reply.error(Errno::EIO)
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if !n.dir {
            return reply.error(Errno::ENOTDIR);
        }
        let dots = [
            (OsString::from("."), u64::from(ino)),
            (OsString::from(".."), n.parent),
        ];
        for (i, (name, e)) in dots
            .iter()
            .chain(n.entries.iter())
            .enumerate()
            .skip(offset as usize)
        {
            let kind = if self.nodes[*e as usize - 1].dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(*e), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Mounts the view of the library at `dir` on `mnt` and serves it until it is unmounted
/// (`umount MNT`, `fusermount -u MNT`) or the process gets SIGINT or SIGTERM.
pub fn mount(dir: &Path, mnt: &Path) -> Result<(), Error> {
    // The library is opened (as a job) only to list it.
    let view = LibraryView::new(super::open(dir)?)?;
    let files = view.nodes.iter().filter(|n| !n.dir).count();
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::FSName(format!("vstor-dedup:{}", dir.display())),
        MountOption::Subtype("vstor-dedup".into()),
    ];
    cfg.n_threads = Some(2);
    let mut session = fuser::Session::new(view, mnt, &cfg).map_err(|e| {
        Error::InvalidArgument(format!(
            "cannot mount {} on {}: {e} (FUSE needs /dev/fuse, and as a user that is not root, \
             fusermount3 or fusermount)",
            dir.display(),
            mnt.display()
        ))
    })?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let mut unmounter = session.unmount_callable();
    let mnt_shown = mnt.display().to_string();
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            if let Err(e) = unmounter.unmount() {
                eprintln!("vstor dedup mount: cannot unmount {mnt_shown}: {e}");
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    eprintln!(
        "{} mounted read-only on {} ({files} files); unmount with `umount {}` or Ctrl-C",
        dir.display(),
        mnt.display(),
        mnt.display()
    );
    session
        .run()
        .map_err(|e| Error::InvalidArgument(format!("FUSE session on {}: {e}", mnt.display())))?;
    Ok(())
}
