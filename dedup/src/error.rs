//! The errors of the dedup layer.

use std::sync::Arc;
use vstor_core::ErrorKind;

/// What can go wrong in a chunk store, a stub or a library job.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    /// An I/O error of the host file system, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Bytes read from a stub, a container or the index are malformed or fail their checksum.
    #[error("{file}: {what}")]
    Corrupt {
        /// The file (or chunk) concerned.
        file: String,
        /// What is wrong, and where.
        what: String,
    },
    /// A chunk's data does not hash to its id (or cannot be decompressed).
    #[error("chunk {chunk} in {container} at offset {offset}: {what}")]
    BadChunk {
        /// The chunk id (hex).
        chunk: String,
        /// The container file.
        container: String,
        /// The record's offset in the container.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A stub or an index belongs to another store.
    #[error("{what} belongs to store {found}, not to this store ({expected})")]
    ForeignStore {
        /// What was opened.
        what: String,
        /// This store's id.
        expected: String,
        /// The id it carries.
        found: String,
    },
    /// A stub refers to something the store does not have.
    #[error("{0}")]
    Missing(String),
    /// A directory is not a dedup library, or already is one, or an argument is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The index database failed.
    #[error("index {file}: {what}")]
    Index {
        /// The index file.
        file: String,
        /// redb's message.
        what: String,
    },
    /// The store or a file is in use by another process.
    #[error("{0}")]
    InUse(String),
    /// No space left on the file system that holds the store.
    #[error("{context}: no space left on the file system of the store")]
    NoSpace {
        /// What was being done.
        context: String,
    },
}

impl DedupError {
    /// An I/O error with context; a full file system becomes [`DedupError::NoSpace`].
    pub fn io(context: impl Into<String>, e: std::io::Error) -> Self {
        let context = context.into();
        match e.raw_os_error() {
            Some(28) | Some(122) => DedupError::NoSpace { context },
            _ => DedupError::Io {
                context,
                source: Arc::new(e),
            },
        }
    }

    /// A corrupt-data error.
    pub fn corrupt(file: impl Into<String>, what: impl Into<String>) -> Self {
        DedupError::Corrupt {
            file: file.into(),
            what: what.into(),
        }
    }
}

impl From<std::io::Error> for DedupError {
    fn from(e: std::io::Error) -> Self {
        DedupError::io("reading a file to optimize", e)
    }
}

impl vstor_core::LayerError for DedupError {
    fn kind(&self) -> ErrorKind {
        match self {
            DedupError::Io { source, .. } => vstor_core::io_kind(source),
            DedupError::Corrupt { .. } | DedupError::BadChunk { .. } => ErrorKind::Corrupt,
            DedupError::ForeignStore { .. } | DedupError::Invalid(_) => ErrorKind::InvalidInput,
            DedupError::Missing(_) => ErrorKind::NotFound,
            DedupError::Index { .. } => ErrorKind::Io,
            DedupError::InUse(_) => ErrorKind::InUse,
            DedupError::NoSpace { .. } => ErrorKind::NoSpace,
        }
    }
}

impl From<DedupError> for vstor_core::Error {
    fn from(e: DedupError) -> Self {
        vstor_core::Error::layer(e)
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, DedupError>;
