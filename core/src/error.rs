//! Typed errors of the block layer.
//!
//! Every error is `Clone` (I/O errors are shared behind an `Arc`) so that one cause can complete
//! several requests of a batch, and every message names what was wrong and where.

use std::fmt;
use std::io;
use std::sync::Arc;

/// Result type of vstor-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kind of a request, for error messages and fault rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A flush (make completed writes durable).
    Flush,
    /// A discard (unmap, trim).
    Discard,
    /// A write of zeroes.
    WriteZeroes,
}

impl OpKind {
    /// Whether this kind changes the device's contents.
    pub fn is_write(self) -> bool {
        matches!(self, OpKind::Write | OpKind::Discard | OpKind::WriteZeroes)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write-zeroes",
        })
    }
}

/// Errors of the block layer. Crates above convert their own errors into [`Error::Layer`] or
/// [`Error::Corrupt`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (for example `read of 4096 bytes at offset 0 of disk.raw`).
        context: String,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
    /// A request reaches past the end of the device.
    #[error(
        "{op} of {len} bytes at offset {offset} is past the end of the device ({capacity} bytes)"
    )]
    OutOfRange {
        /// The request's kind.
        op: OpKind,
        /// Its offset in bytes.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// The device's capacity in bytes.
        capacity: u64,
    },
    /// A request's offset or length is not a multiple of the device's logical sector size.
    #[error("{op} at offset {offset} of {len} bytes is not aligned to the {alignment}-byte logical sector size")]
    Unaligned {
        /// The request's kind.
        op: OpKind,
        /// Its offset in bytes.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// The required alignment in bytes.
        alignment: u32,
    },
    /// A write-type request to a read-only device.
    #[error("{op} refused: the device is read-only")]
    ReadOnly {
        /// The request's kind.
        op: OpKind,
    },
    /// The device does not support this kind of request.
    #[error("{op} is not supported by this device")]
    Unsupported {
        /// The request's kind.
        op: OpKind,
    },
    /// A request or argument that makes no sense (zero-length vectors, absurd sizes, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Data read from a disk is malformed: names the file, the offset and the field.
    #[error("corrupt {what} in {file} at offset {offset}: {reason}")]
    Corrupt {
        /// The file or device.
        file: String,
        /// The byte offset of the structure.
        offset: u64,
        /// The structure or field.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The fault-injecting device failed this request on purpose.
    #[error("injected fault: {op} at offset {offset} failed")]
    Injected {
        /// The request's kind.
        op: OpKind,
        /// Its offset in bytes.
        offset: u64,
    },
    /// The (simulated) power is off: the device accepts no request until it is powered on.
    #[error("device is powered off")]
    PoweredOff,
    /// A file opened with [`FileOptions::lock`](crate::FileOptions) is locked by another open
    /// (another process, or another open of the same file in this one).
    #[error("{path} is in use: another process has it open{} (it holds an advisory lock); close that first", if *exclusive { ", and writing needs it alone" } else { " for writing" })]
    Locked {
        /// The file or device.
        path: String,
        /// Whether this open asked for an exclusive (writable) lock.
        exclusive: bool,
    },
    /// The device ran out of space.
    #[error("no space left on the device")]
    NoSpace,
    /// A long operation was cancelled through its [`Job`](crate::Job); what was done before
    /// the cancellation is consistent and stays.
    #[error("{0} was cancelled")]
    Cancelled(String),
    /// A request was never completed by the device (a bug in a device implementation).
    #[error("request was not completed by the device")]
    NotCompleted,
    /// An error of a layer above the core (VHDX, pools, ...), kept whole.
    #[error(transparent)]
    Layer(Arc<dyn std::error::Error + Send + Sync>),
}

/// A corrupt-structure error: `what` in `file` at `offset` is wrong because of `reason`. Every
/// on-disk format (VHDX, pools, VHD) reports damage through this.
pub fn corrupt(
    file: &str,
    offset: u64,
    what: impl Into<String>,
    reason: impl Into<String>,
) -> Error {
    Error::Corrupt {
        file: file.to_string(),
        offset,
        what: what.into(),
        reason: reason.into(),
    }
}

impl Error {
    /// Wraps an OS error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// Wraps a raw `errno` value with a description of what was being done.
    pub fn errno(context: impl Into<String>, errno: i32) -> Self {
        Self::io(context, io::Error::from_raw_os_error(errno))
    }

    /// The OS error number behind this error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::OutOfRange { .. } | Error::Unaligned { .. } | Error::InvalidArgument(_) => {
                io::ErrorKind::InvalidInput
            }
            Error::ReadOnly { .. } => io::ErrorKind::PermissionDenied,
            Error::Unsupported { .. } => io::ErrorKind::Unsupported,
            Error::Corrupt { .. } => io::ErrorKind::InvalidData,
            Error::NoSpace => io::ErrorKind::StorageFull,
            Error::Cancelled(_) => io::ErrorKind::Interrupted,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
