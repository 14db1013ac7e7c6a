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

/// What sort of failure an [`Error`] is, for callers that must act on it (retry, report, map to
/// a protocol status, pick an exit code) without knowing which layer failed. The detail stays in
/// the error itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system or the medium failed an I/O.
    Io,
    /// A request, argument or parameter that makes no sense.
    InvalidInput,
    /// A request past the end of the device.
    OutOfRange,
    /// A change refused because the device or image is read-only.
    ReadOnly,
    /// Something this implementation does not support (an operation, a feature of an image).
    Unsupported,
    /// Data read from a disk is malformed or fails its checksum.
    Corrupt,
    /// No space left (the device, the pool, the host file system).
    NoSpace,
    /// The file, image or pool is in use by another process (it holds the lock).
    InUse,
    /// The device or one it needs is not there or not usable now (powered off, a missing
    /// member, a failed space, a parent not found).
    Unavailable,
    /// The operation was cancelled.
    Cancelled,
    /// A named thing (an export, a space, a method) does not exist.
    NotFound,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::NoSpace => "no space",
            ErrorKind::InUse => "in use",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::NotFound => "not found",
        })
    }
}

/// An error of a layer above the core (VHDX, pools, QoS, ...), carried whole in
/// [`Error::Layer`]: it says which [`ErrorKind`] it is, and callers reach the detail with
/// `downcast_ref` on it.
pub trait LayerError: std::error::Error + Send + Sync + 'static {
    /// The kind of this error.
    fn kind(&self) -> ErrorKind;
}

impl dyn LayerError {
    /// The layer's own error type, if it is `T`.
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        let e: &(dyn std::error::Error + 'static) = self;
        e.downcast_ref()
    }

    /// Whether the layer's error is a `T`.
    pub fn is<T: std::error::Error + 'static>(&self) -> bool {
        self.downcast_ref::<T>().is_some()
    }
}

/// Errors of the block layer. Crates above convert their own errors into [`Error::Layer`] or
/// [`Error::Corrupt`]. [`Error::kind`] tells what sort of failure each is.
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
    #[error("{path} is in use{}: {} (it holds the image lock); close that first", holder.as_ref().map(|h| format!(" by {h}")).unwrap_or_default(), if *exclusive { "writing needs it alone" } else { "it is open for writing" })]
    Locked {
        /// The file or device.
        path: String,
        /// Whether this open asked for an exclusive (writable) lock.
        exclusive: bool,
        /// Who holds it (`name (pid N)`), where the OS tells.
        holder: Option<String>,
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
    Layer(Arc<dyn LayerError>),
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

    /// Carries a layer's own error.
    pub fn layer(e: impl LayerError) -> Self {
        Error::Layer(Arc::new(e))
    }

    /// What sort of failure this is. Every layer maps its own errors onto a kind; the detail
    /// stays reachable through the error itself (its variants, or `downcast_ref` on
    /// [`Error::Layer`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => io_kind(source),
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::Unaligned { .. } | Error::InvalidArgument(_) => ErrorKind::InvalidInput,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Injected { .. } | Error::NotCompleted => ErrorKind::Io,
            Error::PoweredOff => ErrorKind::Unavailable,
            Error::Locked { .. } => ErrorKind::InUse,
            Error::NoSpace => ErrorKind::NoSpace,
            Error::Cancelled(_) => ErrorKind::Cancelled,
            Error::Layer(e) => e.kind(),
        }
    }

    /// The OS error number behind this error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The kind of an OS error: a full device or quota is [`ErrorKind::NoSpace`], a read-only file
/// system [`ErrorKind::ReadOnly`], an interrupted call [`ErrorKind::Cancelled`]; the rest I/O.
pub fn io_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ErrorKind::NoSpace,
        Some(libc::EROFS) => ErrorKind::ReadOnly,
        Some(libc::EBUSY | libc::ETXTBSY) => ErrorKind::InUse,
        Some(libc::EINTR) => ErrorKind::Cancelled,
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => ErrorKind::Unavailable,
        Some(libc::EINVAL) => ErrorKind::InvalidInput,
        Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
        _ => match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::Unavailable,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            io::ErrorKind::InvalidData => ErrorKind::Corrupt,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            io::ErrorKind::StorageFull => ErrorKind::NoSpace,
            io::ErrorKind::Interrupted => ErrorKind::Cancelled,
            _ => ErrorKind::Io,
        },
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
