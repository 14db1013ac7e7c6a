//! vstor: an embeddable storage virtualization stack.
//!
//! This facade crate re-exports the layers ([`core`]) and composes them: a target string names a
//! stack ([`target`]), and the `vstor` command line drives it. Each layer is also its own crate
//! (`vstor-core`, `vstor-vhdx`, ...) for embedders who need only that part.
//!
//! ```
//! use vstor::{open_target, TargetOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.raw");
//! std::fs::File::create(&path)?.set_len(1 << 20)?;
//! let target = open_target(path.to_str().unwrap(), &TargetOptions::default())?;
//! target.device.write_at(0, &[7u8; 512])?;
//! let mut back = [0u8; 512];
//! target.device.read_at(0, &mut back)?;
//! assert_eq!(back, [7u8; 512]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod bench;
pub mod bytes;
pub mod probe;
pub mod size;
pub mod target;

pub use size::{format_size, parse_size};
pub use target::{
    open_target, FormatSource, OpenedTarget, QosHandle, QosLayer, StackContext, TargetKind,
    TargetOptions, TargetSpec,
};
/// The core block layer (re-export of `vstor-core`).
pub use vstor_core as core;
pub use vstor_core::ErrorKind;
/// Storage QoS (re-exported `vstor-qos`).
pub use vstor_qos as qos;
/// Storage pools and spaces (re-exported `vstor-spaces`).
pub use vstor_spaces as spaces;
/// The VHDX format (re-exported `vstor-vhdx`).
pub use vstor_vhdx as vhdx;

/// Errors of the facade.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error of the block layer.
    #[error(transparent)]
    Core(#[from] vstor_core::Error),
    /// An error of the QoS layer (limits that do not fit together, an unknown policy).
    #[error(transparent)]
    Qos(#[from] vstor_qos::Error),
    /// A size string that does not parse.
    #[error("invalid size '{input}': {reason}")]
    Size {
        /// The input.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A target string that does not parse.
    #[error("invalid target '{input}': {reason}")]
    Target {
        /// The input.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Arguments that do not fit together.
    #[error("{0}")]
    InvalidArgument(String),
    /// Something not supported (yet).
    #[error("{0}")]
    Unsupported(String),
    /// `disk check` found problems (the report has been printed).
    #[error("{0}")]
    NotClean(String),
    /// A request failed during a run.
    #[error("{0}")]
    Failed(String),
    /// An error of a known kind reported by another component (the daemon's API).
    #[error("{message}")]
    Reported {
        /// Its kind.
        kind: ErrorKind,
        /// The message.
        message: String,
    },
    /// An error of the local file system outside a device (input and output files).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// What sort of failure this is (see [`ErrorKind`]); the detail stays in the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Core(e) => e.kind(),
            Error::Qos(_) | Error::Size { .. } | Error::Target { .. } => ErrorKind::InvalidInput,
            Error::InvalidArgument(_) => ErrorKind::InvalidInput,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::NotClean(_) => ErrorKind::Corrupt,
            Error::Failed(_) => ErrorKind::Io,
            Error::Reported { kind, .. } => *kind,
            Error::Io { source, .. } => vstor_core::io_kind(source),
        }
    }
}
