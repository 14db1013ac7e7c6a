//! The portable engine: `pread`/`pwrite`, one request at a time. The io_uring engine also uses
//! these to finish short transfers and for fallbacks.

use super::FileCore;
use crate::error::{Error, OpKind, Result};
use crate::request::{copy_from_bufs, copy_into_bufs, Op, Request};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Runs one validated request.
pub(crate) fn run(core: &FileCore, req: &mut Request<'_>) -> Result<()> {
    let (offset, len, kind) = (req.offset(), req.len(), req.kind());
    let bounce = core.needs_bounce(req);
    match &mut req.op {
        Op::Read { bufs, .. } if bounce => {
            let mut b = core.bounce(len as usize);
            read_exact(core, offset, &mut b, kind)?;
            copy_into_bufs(bufs, 0, &b);
            Ok(())
        }
        Op::Read { bufs, .. } => read_rest(core, offset, bufs, 0),
        Op::Write { bufs, .. } if bounce => {
            let mut b = core.bounce(len as usize);
            copy_from_bufs(bufs, 0, &mut b);
            write_all(core, offset, &b, kind)
        }
        Op::Write { bufs, .. } => write_rest(core, offset, bufs, 0),
        Op::Flush => core
            .file
            .sync_data()
            .map_err(|e| Error::io(core.context(kind, 0, 0), e)),
        Op::Discard { len, .. } => fallocate(core, offset, *len, DISCARD_MODE, kind),
        Op::WriteZeroes { len, .. } => zero_range(core, offset, *len),
    }
}

fn read_exact(core: &FileCore, offset: u64, buf: &mut [u8], kind: OpKind) -> Result<()> {
    core.file
        .read_exact_at(buf, offset)
        .map_err(|e| Error::io(core.context(kind, offset, buf.len() as u64), e))
}

fn write_all(core: &FileCore, offset: u64, buf: &[u8], kind: OpKind) -> Result<()> {
    core.file
        .write_all_at(buf, offset)
        .map_err(|e| Error::io(core.context(kind, offset, buf.len() as u64), e))
}

/// Reads the part of a request that starts `done` bytes into it. `offset` is the request's.
pub(crate) fn read_rest(
    core: &FileCore,
    offset: u64,
    bufs: &mut [IoSliceMut<'_>],
    mut done: usize,
) -> Result<()> {
    let mut pos = offset;
    for b in bufs.iter_mut() {
        let n = b.len();
        if done >= n {
            done -= n;
            pos += n as u64;
            continue;
        }
        read_exact(core, pos + done as u64, &mut b[done..], OpKind::Read)?;
        done = 0;
        pos += n as u64;
    }
    Ok(())
}

/// Writes the part of a request that starts `done` bytes into it. `offset` is the request's.
pub(crate) fn write_rest(
    core: &FileCore,
    offset: u64,
    bufs: &[IoSlice<'_>],
    mut done: usize,
) -> Result<()> {
    let mut pos = offset;
    for b in bufs {
        let n = b.len();
        if done >= n {
            done -= n;
            pos += n as u64;
            continue;
        }
        write_all(core, pos + done as u64, &b[done..], OpKind::Write)?;
        done = 0;
        pos += n as u64;
    }
    Ok(())
}

/// fallocate mode of a discard: punch a hole, keep the size (reads return zeroes).
pub(crate) const DISCARD_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// fallocate mode of write-zeroes.
pub(crate) const ZERO_MODE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

fn fallocate(core: &FileCore, offset: u64, len: u64, mode: i32, kind: OpKind) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate takes only integers and a file descriptor that `core.file` keeps open.
    let rc = unsafe { libc::fallocate(core.file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::io(
            core.context(kind, offset, len),
            std::io::Error::last_os_error(),
        ))
    }
}

/// Zeroes a range: FALLOC_FL_ZERO_RANGE where the file system has it, else writes zeroes.
pub(crate) fn zero_range(core: &FileCore, offset: u64, len: u64) -> Result<()> {
    match fallocate(core, offset, len, ZERO_MODE, OpKind::WriteZeroes) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
            write_zero_buffers(core, offset, len)
        }
        r => r,
    }
}

/// Writes zeroes with ordinary writes of at most 1 MiB.
pub(crate) fn write_zero_buffers(core: &FileCore, offset: u64, len: u64) -> Result<()> {
    let chunk = len.min(1 << 20) as usize;
    let zeroes = core.bounce(chunk);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(chunk as u64) as usize;
        write_all(core, pos, &zeroes[..n], OpKind::WriteZeroes)?;
        pos += n as u64;
    }
    Ok(())
}
