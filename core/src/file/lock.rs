//! Image locks: who may open a file beside whom, across processes (as QEMU does since 2.10).
//!
//! An [`ImageLock`] is a pair of open-file-description (OFD) byte-range locks taken on a
//! descriptor of its own, opened only for the lock and never given to io_uring or used for I/O.
//! So the lock dies the moment its process does: a `kill -9` closes every descriptor at once,
//! and no ring teardown in the background can keep the lock's file description alive (a lock on
//! the I/O descriptor lived on for minutes after a kill on a busy machine). OFD locks belong to
//! the open file description, so two opens in one process conflict as two processes would.
//!
//! The bytes are QEMU's (block/file-posix.c, since 2.10), so that vstor and QEMU see each other's
//! locks: byte `100 + P` is held (shared) by an open that uses permission P, byte `200 + P` by
//! one that does not let others use P, where P is 0 consistent read, 1 write, 2 write
//! unchanged, 3 resize. An open sets its bytes, then checks that no other open holds a byte that
//! rules it out: for a permission it uses, `200 + P`; for one it does not share, `100 + P`.
//! Byte 300 is vstor's own: a plain reader holds it, and a writer that shares refuses to start
//! beside one (the reader opened expecting the file to stay as it is). Byte-range locks do not
//! touch the data.
//!
//! | open (mode)                      | uses         | does not share      | also     |
//! | -------------------------------- | ------------ | ------------------- | -------- |
//! | reader ([`LockMode::Shared`])    | read         | -                   | holds 300 |
//! | parent of a chain ([`LockMode::SharedStrict`]) | read | write, resize | -     |
//! | writer ([`LockMode::Exclusive`]) | read, write, write unchanged, resize | read, write, resize | - |
//! | writer that shares ([`LockMode::WriteSharing`]) | the same | write, resize | no reader at 300 |
//!
//! So a writer has its file alone; a writer that shares lets readers in after it, never a
//! second writer, and does not start beside readers; a parent of a differencing chain is never
//! written while a child is open on it; a QEMU that writes an image keeps vstor's writers out
//! and the other way round, and `qemu-img info` is refused beside a vstor writer.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// How an open wants to share its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// A read-only open: readers share, and a writer that shares may be there already.
    Shared,
    /// A read-only open that needs the file unchanged for as long as it is open (the parents
    /// of a differencing chain): refused beside any writer, and keeps every writer out.
    SharedStrict,
    /// A writable open that lets readers in beside it (QEMU's `share-rw=on`), never a second
    /// writer.
    WriteSharing,
    /// A writable open that wants the file alone.
    Exclusive,
}

/// QEMU's permission bits, as lock byte offsets.
const READ: i64 = 0;
const WRITE: i64 = 1;
const WRITE_UNCHANGED: i64 = 2;
const RESIZE: i64 = 3;
/// Byte `USE + P`: an open uses permission P.
const USE: i64 = 100;
/// Byte `UNSHARED + P`: an open does not let others use P.
const UNSHARED: i64 = 200;
/// vstor's own byte: a plain reader is here.
const READER: i64 = 300;

impl LockMode {
    /// The bytes this mode holds, and the bytes no other open may hold.
    fn bytes(self) -> (Vec<i64>, Vec<i64>) {
        let uses: &[i64] = match self {
            LockMode::Shared | LockMode::SharedStrict => &[READ],
            LockMode::WriteSharing | LockMode::Exclusive => &[READ, WRITE, WRITE_UNCHANGED, RESIZE],
        };
        let unshared: &[i64] = match self {
            LockMode::Shared => &[],
            LockMode::SharedStrict | LockMode::WriteSharing => &[WRITE, RESIZE],
            LockMode::Exclusive => &[READ, WRITE, RESIZE],
        };
        let mut hold: Vec<i64> = uses.iter().map(|p| USE + p).collect();
        hold.extend(unshared.iter().map(|p| UNSHARED + p));
        let mut free: Vec<i64> = uses.iter().map(|p| UNSHARED + p).collect();
        free.extend(unshared.iter().map(|p| USE + p));
        match self {
            LockMode::Shared => hold.push(READER),
            LockMode::WriteSharing => free.push(READER),
            _ => {}
        }
        (hold, free)
    }

    fn writes(self) -> bool {
        matches!(self, LockMode::WriteSharing | LockMode::Exclusive)
    }
}

/// How long an open waits for a lock whose holder cannot be found among the live processes (a
/// process that is exiting, whose descriptors the kernel is still closing).
const GRACE: Duration = Duration::from_secs(3);

/// A held image lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
    mode: LockMode,
}

impl ImageLock {
    /// Takes the lock on `path` without waiting for a live holder. A conflicting lock held by
    /// a live process fails at once with [`Error::Locked`], naming the holder where the OS
    /// tells; one whose holder is not found (a process being torn down) is waited for up to a
    /// few seconds.
    pub fn acquire(path: &Path, mode: LockMode) -> Result<ImageLock> {
        // A descriptor of its own. A write lock needs a descriptor open for writing; O_RDONLY
        // is enough for read locks (and works on files this process may only read).
        let writable = mode.writes();
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| Error::io(format!("cannot open {} to lock it", path.display()), e))?;
        let start = Instant::now();
        loop {
            match try_lock(&file, mode) {
                Ok(()) => return Ok(ImageLock { _file: file, mode }),
                Err(Refused::Os(e)) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(Refused::By(at)) => {
                    let holders = holders(&file, at);
                    if !holders.is_empty() || start.elapsed() >= GRACE {
                        return Err(Error::Locked {
                            path: path.display().to_string(),
                            exclusive: writable,
                            holder: describe(&holders),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(Refused::Os(e)) => {
                    return Err(Error::io(format!("cannot lock {}", path.display()), e));
                }
            }
        }
    }
}

impl ImageLock {
    /// The mode held.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Changes the mode in place, on the same open file description, so that the file is never
    /// unlocked meanwhile: the new mode's bytes are set first, then checked against the other
    /// opens, then the old mode's other bytes are let go. A downgrade (writer to reader) always
    /// succeeds; an upgrade fails with [`Error::Locked`] like [`acquire`](Self::acquire) would,
    /// and leaves the old mode held. `path` names the file in that error.
    pub fn convert(&mut self, path: &Path, mode: LockMode) -> Result<()> {
        let (old_hold, _) = self.mode.bytes();
        let (new_hold, new_free) = mode.bytes();
        let added: Vec<i64> = new_hold
            .iter()
            .copied()
            .filter(|b| !old_hold.contains(b))
            .collect();
        let undo = |file: &File| {
            for &at in &added {
                let _ = set(file, at, libc::F_UNLCK, 1);
            }
        };
        for &at in &added {
            if let Err(e) = set(&self._file, at, libc::F_RDLCK, 1) {
                undo(&self._file);
                return Err(Error::io(format!("cannot lock {}", path.display()), e));
            }
        }
        for &at in &new_free {
            match held_by_another(&self._file, at) {
                Ok(false) => {}
                Ok(true) => {
                    undo(&self._file);
                    return Err(Error::Locked {
                        path: path.display().to_string(),
                        exclusive: mode.writes(),
                        holder: describe(&holders(&self._file, at)),
                    });
                }
                Err(e) => {
                    undo(&self._file);
                    return Err(Error::io(format!("cannot lock {}", path.display()), e));
                }
            }
        }
        for at in old_hold.into_iter().filter(|b| !new_hold.contains(b)) {
            set(&self._file, at, libc::F_UNLCK, 1)
                .map_err(|e| Error::io(format!("cannot unlock {}", path.display()), e))?;
        }
        self.mode = mode;
        Ok(())
    }
}

impl Drop for ImageLock {
    /// Unlocks before the descriptor closes: the lock belongs to the open file description,
    /// which a process forked meanwhile (and not yet exec'd) still shares through its copy of
    /// the descriptor; closing ours alone would leave the lock held until that copy goes.
    fn drop(&mut self) {
        // Length 0: from byte 0 to the end of the file and beyond, every byte this lock set.
        let _ = set(&self._file, 0, libc::F_UNLCK, 0);
    }
}

/// Sets the bytes of `mode` (shared locks), then checks that no other open holds a byte that
/// rules this one out. EAGAIN when one does (the caller closes the descriptor, which drops what
/// was set). Two opens that race both set before they check, so at least one sees the other.
fn try_lock(file: &File, mode: LockMode) -> Result<(), Refused> {
    let (hold, free) = mode.bytes();
    for at in hold {
        set(file, at, libc::F_RDLCK, 1).map_err(Refused::Os)?;
    }
    for at in free {
        if held_by_another(file, at).map_err(Refused::Os)? {
            let _ = set(file, 0, libc::F_UNLCK, 0);
            return Err(Refused::By(at));
        }
    }
    Ok(())
}

/// Why [`try_lock`] failed.
enum Refused {
    /// Another open holds this byte.
    By(i64),
    /// The OS failed the call.
    Os(std::io::Error),
}

/// Whether an open file description other than `file`'s holds a lock on byte `at`.
fn held_by_another(file: &File, at: i64) -> std::io::Result<bool> {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = at;
    fl.l_len = 1;
    // SAFETY: fcntl(F_OFD_GETLK) reads and writes the flock struct we own for the duration of
    // the call; the descriptor is valid as long as `file` lives.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
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

/// The processes (pid, name) that hold a lock on byte `at` of the file `file` is open on, as far as /proc
/// tells (OFD locks show no pid in /proc/locks, so each process's descriptors are looked at:
/// /proc/PID/fdinfo lists the locks held through a descriptor). Only processes this user may
/// inspect are found; at most a bounded number of descriptors is looked at.
fn holders(file: &File, at: i64) -> Vec<(u32, String)> {
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
            // "lock:\t1: OFDLCK ADVISORY READ -1 fe:00:1234 100 100": the file and the range.
            let holds = text.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                l.starts_with("lock:")
                    && l.contains("OFDLCK")
                    && f.len() >= 3
                    && f[f.len() - 3] == key
                    && f[f.len() - 2].parse::<i64>().is_ok_and(|s| s <= at)
                    && (f[f.len() - 1] == "EOF"
                        || f[f.len() - 1].parse::<i64>().is_ok_and(|e| e >= at))
            });
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
