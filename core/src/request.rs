//! Requests: what a batch is made of.
//!
//! A [`Request`] borrows the caller's buffers for the duration of one
//! [`BlockDevice::submit`](crate::BlockDevice::submit) call and carries its own result. Buffers
//! are `std::io::IoSlice`/`IoSliceMut`, which have the ABI of `struct iovec` on Unix, so a
//! backend hands a request's vector to the kernel without copying it.

use crate::error::{Error, OpKind, Result};
use smallvec::SmallVec;
use std::io::{IoSlice, IoSliceMut};

/// The buffers of a read: filled in order, each completely.
pub type ReadBufs<'a> = SmallVec<[IoSliceMut<'a>; 2]>;
/// The buffers of a write: written in order.
pub type WriteBufs<'a> = SmallVec<[IoSlice<'a>; 2]>;

/// The operation of a request. Offsets and lengths are in bytes and must be multiples of the
/// device's logical sector size.
#[derive(Debug)]
pub enum Op<'a> {
    /// Read `sum(bufs.len())` bytes at `offset`.
    Read {
        /// Byte offset on the device.
        offset: u64,
        /// Destination buffers.
        bufs: ReadBufs<'a>,
    },
    /// Write `sum(bufs.len())` bytes at `offset`.
    Write {
        /// Byte offset on the device.
        offset: u64,
        /// Source buffers.
        bufs: WriteBufs<'a>,
    },
    /// Make every write that completed before this request durable. Inside a batch a flush is a
    /// barrier: it starts after every earlier request of the batch has completed, and later
    /// requests start after it.
    Flush,
    /// Tell the device that a range is no longer needed. Afterwards the range reads as zeroes if
    /// the device's [`DeviceInfo::discard_zeroes`](crate::DeviceInfo) is true; otherwise its
    /// contents are unspecified (old data or zeroes).
    Discard {
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make a range read as zeroes, unmapping it where the device can.
    WriteZeroes {
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// One request of a batch and, once the device has completed it, its result.
#[derive(Debug)]
pub struct Request<'a> {
    /// What to do.
    pub op: Op<'a>,
    result: Option<Result<()>>,
}

impl<'a> Request<'a> {
    /// A request for `op`, not yet completed.
    pub fn new(op: Op<'a>) -> Self {
        Request { op, result: None }
    }

    /// Read into one buffer.
    pub fn read(offset: u64, buf: &'a mut [u8]) -> Self {
        let mut bufs = ReadBufs::new();
        bufs.push(IoSliceMut::new(buf));
        Self::new(Op::Read { offset, bufs })
    }

    /// Read into several buffers, in order.
    pub fn readv(offset: u64, bufs: impl IntoIterator<Item = &'a mut [u8]>) -> Self {
        let bufs = bufs.into_iter().map(IoSliceMut::new).collect();
        Self::new(Op::Read { offset, bufs })
    }

    /// Write one buffer.
    pub fn write(offset: u64, buf: &'a [u8]) -> Self {
        let mut bufs = WriteBufs::new();
        bufs.push(IoSlice::new(buf));
        Self::new(Op::Write { offset, bufs })
    }

    /// Write several buffers, in order.
    pub fn writev(offset: u64, bufs: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let bufs = bufs.into_iter().map(IoSlice::new).collect();
        Self::new(Op::Write { offset, bufs })
    }

    /// A flush (a barrier inside its batch).
    pub fn flush() -> Self {
        Self::new(Op::Flush)
    }

    /// A discard of `len` bytes at `offset`.
    pub fn discard(offset: u64, len: u64) -> Self {
        Self::new(Op::Discard { offset, len })
    }

    /// A write of `len` zero bytes at `offset`.
    pub fn write_zeroes(offset: u64, len: u64) -> Self {
        Self::new(Op::WriteZeroes { offset, len })
    }

    /// The request's kind.
    pub fn kind(&self) -> OpKind {
        match self.op {
            Op::Read { .. } => OpKind::Read,
            Op::Write { .. } => OpKind::Write,
            Op::Flush => OpKind::Flush,
            Op::Discard { .. } => OpKind::Discard,
            Op::WriteZeroes { .. } => OpKind::WriteZeroes,
        }
    }

    /// The byte offset the request starts at (0 for a flush).
    pub fn offset(&self) -> u64 {
        match self.op {
            Op::Read { offset, .. }
            | Op::Write { offset, .. }
            | Op::Discard { offset, .. }
            | Op::WriteZeroes { offset, .. } => offset,
            Op::Flush => 0,
        }
    }

    /// The number of bytes the request covers (0 for a flush).
    pub fn len(&self) -> u64 {
        match &self.op {
            Op::Read { bufs, .. } => bufs.iter().map(|b| b.len() as u64).sum(),
            Op::Write { bufs, .. } => bufs.iter().map(|b| b.len() as u64).sum(),
            Op::Discard { len, .. } | Op::WriteZeroes { len, .. } => *len,
            Op::Flush => 0,
        }
    }

    /// Whether the request covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records the request's result. Devices call this exactly once per request.
    pub fn complete(&mut self, result: Result<()>) {
        self.result = Some(result);
    }

    /// Whether a device has completed the request.
    pub fn is_complete(&self) -> bool {
        self.result.is_some()
    }

    /// The request's result: [`Error::NotCompleted`] if no device completed it.
    pub fn result(&self) -> Result<()> {
        self.result.clone().unwrap_or(Err(Error::NotCompleted))
    }

    /// Takes the result out, leaving the request not completed (to resubmit it).
    pub fn take_result(&mut self) -> Result<()> {
        self.result.take().unwrap_or(Err(Error::NotCompleted))
    }
}

/// Completes every request of `batch` that is not yet complete with a clone of `err`.
pub fn fail_remaining(batch: &mut [Request<'_>], err: &Error) {
    for r in batch.iter_mut().filter(|r| !r.is_complete()) {
        r.complete(Err(err.clone()));
    }
}

/// The first error of a completed batch, if any.
pub fn first_error(batch: &[Request<'_>]) -> Result<()> {
    batch.iter().try_for_each(Request::result)
}

/// Copies `src` into the read buffers `bufs`, starting `skip` bytes into the request.
/// Returns the number of bytes copied.
pub fn copy_into_bufs(bufs: &mut [IoSliceMut<'_>], mut skip: usize, mut src: &[u8]) -> usize {
    let mut copied = 0;
    for b in bufs.iter_mut() {
        if src.is_empty() {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(src.len());
        b[skip..skip + n].copy_from_slice(&src[..n]);
        src = &src[n..];
        copied += n;
        skip = 0;
    }
    copied
}

/// Gathers the write buffers `bufs`, from `skip` bytes into the request, into `dst`.
/// Returns the number of bytes copied.
pub fn copy_from_bufs(bufs: &[IoSlice<'_>], mut skip: usize, mut dst: &mut [u8]) -> usize {
    let mut copied = 0;
    for b in bufs {
        if dst.is_empty() {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(dst.len());
        dst[..n].copy_from_slice(&b[skip..skip + n]);
        dst = &mut dst[n..];
        copied += n;
        skip = 0;
    }
    copied
}

/// Fills the read buffers with zeroes.
pub fn zero_bufs(bufs: &mut [IoSliceMut<'_>]) {
    for b in bufs.iter_mut() {
        b.fill(0);
    }
}

/// Splits read buffers into consecutive pieces of the given lengths, in order, so that a layer
/// can hand each piece of a request to a different place below it without copying. Lengths
/// past the end of the buffers get what is left (possibly nothing).
pub fn carve_read_bufs<'b>(
    bufs: &'b mut [IoSliceMut<'_>],
    lens: impl IntoIterator<Item = usize>,
) -> SmallVec<[ReadBufs<'b>; 2]> {
    let mut rest = bufs.iter_mut().map(|b| &mut **b);
    let mut cur: &'b mut [u8] = &mut [];
    let mut out = SmallVec::new();
    for len in lens {
        let mut need = len;
        let mut piece = ReadBufs::new();
        while need > 0 {
            if cur.is_empty() {
                match rest.next() {
                    Some(b) => cur = b,
                    None => break,
                }
                continue;
            }
            let n = need.min(cur.len());
            let (a, b) = std::mem::take(&mut cur).split_at_mut(n);
            piece.push(IoSliceMut::new(a));
            cur = b;
            need -= n;
        }
        out.push(piece);
    }
    out
}

/// Splits write buffers into consecutive pieces of the given lengths (see [`carve_read_bufs`]).
pub fn carve_write_bufs<'b>(
    bufs: &'b [IoSlice<'_>],
    lens: impl IntoIterator<Item = usize>,
) -> SmallVec<[WriteBufs<'b>; 2]> {
    let mut rest = bufs.iter().map(|b| &**b);
    let mut cur: &'b [u8] = &[];
    let mut out = SmallVec::new();
    for len in lens {
        let mut need = len;
        let mut piece = WriteBufs::new();
        while need > 0 {
            if cur.is_empty() {
                match rest.next() {
                    Some(b) => cur = b,
                    None => break,
                }
                continue;
            }
            let n = need.min(cur.len());
            let (a, b) = cur.split_at(n);
            piece.push(IoSlice::new(a));
            cur = b;
            need -= n;
        }
        out.push(piece);
    }
    out
}
