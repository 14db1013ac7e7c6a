//! Image locks: who may open a file beside whom, across processes (as QEMU does since 2.10).
//!
//! An [`ImageLock`] is a pair of open-file-description (OFD) byte-range locks taken on a
//! descriptor of its own, opened only for the lock and never given to io_uring or used for I/O.
//! So the lock dies the moment its process does: a `kill -9` closes every descriptor at once,
//! and no ring teardown in the background can keep the lock's file description alive (a lock on
//! the I/O descriptor lived on for minutes after a kill on a busy machine). OFD locks belong to
//! the open file description, so two opens in one process conflict as two processes would.
//!
//! Two bytes of the file carry the locks (byte-range locks do not touch the data):
//!
//! | open                          | byte 0 ("readers") | byte 1 ("writer") |
//! | ----------------------------- | ------------------ | ----------------- |
//! | read-only                     | shared             | -                 |
//! | writable                      | exclusive          | exclusive         |
//! | writable, sharing (`share_rw`) | shared             | exclusive         |
//!
//! A writer shuts out everyone; a writer that shares lets readers in beside it but never a second
//! writer; readers share with each other.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// How an open wants to share its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// A read-only open: readers share.
    Shared,
    /// A writable open that lets readers in beside it (QEMU's `share-rw=on`), never a second
    /// writer.
    WriteSharing,
    /// A writable open that wants the file alone.
    Exclusive,
}

/// How long an open waits for a lock whose holder cannot be found among the live processes (a
/// process that is exiting, whose descriptors the kernel is still closing).
const GRACE: Duration = Duration::from_secs(3);

/// A held image lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
}

impl ImageLock {
    /// Takes the lock on `path` without waiting for a live holder. A conflicting lock held by
    /// a live process fails at once with [`Error::Locked`], naming the holder where the OS
    /// tells; one whose holder is not found (a process being torn down) is waited for up to a
    /// few seconds.
    pub fn acquire(path: &Path, mode: LockMode) -> Result<ImageLock> {
        // A descriptor of its own. A write lock needs a descriptor open for writing; O_RDONLY
        // is enough for read locks (and works on files this process may only read).
        let writable = mode != LockMode::Shared;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| Error::io(format!("cannot open {} to lock it", path.display()), e))?;
        let start = Instant::now();
        loop {
            match try_lock(&file, mode) {
                Ok(()) => return Ok(ImageLock { _file: file }),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                    let holders = holders(&file);
                    if !holders.is_empty() || start.elapsed() >= GRACE {
                        return Err(Error::Locked {
                            path: path.display().to_string(),
                            exclusive: writable,
                            holder: describe(&holders),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(Error::io(format!("cannot lock {}", path.display()), e));
                }
            }
        }
    }
}

impl Drop for ImageLock {
    /// Unlocks before the descriptor closes: the lock belongs to the open file description,
    /// which a process forked meanwhile (and not yet exec'd) still shares through its copy of
    /// the descriptor; closing ours alone would leave the lock held until that copy goes.
    fn drop(&mut self) {
        let _ = set(&self._file, 0, libc::F_UNLCK, 2);
    }
}

/// Sets the locks of `mode`, or undoes what it set and returns the error.
fn try_lock(file: &File, mode: LockMode) -> std::io::Result<()> {
    let (readers, writer) = match mode {
        LockMode::Shared => (libc::F_RDLCK, None),
        LockMode::WriteSharing => (libc::F_RDLCK, Some(libc::F_WRLCK)),
        LockMode::Exclusive => (libc::F_WRLCK, Some(libc::F_WRLCK)),
    };
    // The writer byte first: two writers meet there whatever else they share.
    if let Some(w) = writer {
        set(file, 1, w, 1)?;
    }
    if let Err(e) = set(file, 0, readers, 1) {
        if writer.is_some() {
            // Best effort: the descriptor is closed on error anyway, which drops the lock.
            let _ = set(file, 1, libc::F_UNLCK, 1);
        }
        return Err(e);
    }
    Ok(())
}

/// One OFD lock (or unlock) on `len` bytes from `at`.
fn set(file: &File, at: i64, kind: libc::c_int, len: i64) -> std::io::Result<()> {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = at;
    fl.l_len = len;
    fl.l_pid = 0; // OFD locks require 0.
                  // SAFETY: fcntl(F_OFD_SETLK) reads the flock struct we own for the duration of the call;
                  // the descriptor is valid as long as `file` lives.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The processes (pid, name) that hold a lock on the file `file` is open on, as far as /proc
/// tells (OFD locks show no pid in /proc/locks, so each process's descriptors are looked at:
/// /proc/PID/fdinfo lists the locks held through a descriptor). Only processes this user may
/// inspect are found; at most a bounded number of descriptors is looked at.
fn holders(file: &File) -> Vec<(u32, String)> {
    let Ok(meta) = file.metadata() else {
        return Vec::new();
    };
    let me = std::process::id();
    let key = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let mut found = Vec::new();
    let mut budget = 200_000usize;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            budget = budget.saturating_sub(1);
            if budget == 0 {
                return found;
            }
            // Only descriptors of this file: compare the inode before reading fdinfo.
            let Ok(m) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if m.ino() != meta.ino() || m.dev() != meta.dev() {
                continue;
            }
            let info = p.path().join("fdinfo").join(fd.file_name());
            let Ok(text) = std::fs::read_to_string(info) else {
                continue;
            };
            let holds = text
                .lines()
                .any(|l| l.starts_with("lock:") && l.contains("OFDLCK") && l.contains(&key));
            if holds && !(pid == me && is_own(file, &fd.path())) && alive(pid) {
                let name = std::fs::read_to_string(p.path().join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                if !found.iter().any(|(p, _)| *p == pid) {
                    found.push((pid, name));
                }
            }
        }
    }
    found
}

/// Whether `/proc/self/fd/N` is `file` itself (our own lock attempt's descriptor).
fn is_own(file: &File, fd_path: &Path) -> bool {
    fd_path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<i32>().ok())
        == Some(file.as_raw_fd())
}

/// Whether the process runs (not a zombie, not exiting).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the last ')' (the command name may hold spaces or parentheses).
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X' | 'x') | None)
}

/// "held by vstor (pid 123)", or None when no holder was found.
fn describe(holders: &[(u32, String)]) -> Option<String> {
    if holders.is_empty() {
        return None;
    }
    Some(
        holders
            .iter()
            .map(|(pid, name)| {
                if name.is_empty() {
                    format!("pid {pid}")
                } else {
                    format!("{name} (pid {pid})")
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
    )
}
