//! Errors of the pool layer.
//!
//! Malformed metadata becomes [`vstor_core::Error::Corrupt`] (the member, the offset and the
//! structure); the conditions only a pool has (too few disks, a foreign member, a space that
//! lost more members than its resiliency tolerates) are [`SpacesError`]s carried in
//! [`vstor_core::Error::Layer`].

use std::sync::Arc;

/// What can go wrong that is particular to pools and spaces.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SpacesError {
    /// A parameter given to create, open or a space definition makes no sense.
    #[error("{0}")]
    InvalidParameter(String),
    /// A layout needs more disks than the pool can give it.
    #[error("{what} needs {needed} disks with free slabs; the pool has {available}")]
    TooFewDisks {
        /// The layout.
        what: String,
        /// Disks it needs.
        needed: usize,
        /// Disks that can take a slab.
        available: usize,
    },
    /// A disk is too small to be a member.
    #[error("{disk} is too small: {size} bytes, a member needs at least {needed} (metadata and one slab)")]
    DiskTooSmall {
        /// The disk.
        disk: String,
        /// Its size.
        size: u64,
        /// The smallest member.
        needed: u64,
    },
    /// A disk that belongs to another pool, or to no pool, where a member of this one was
    /// expected; or a disk that already belongs to a pool where a fresh disk was expected.
    #[error("{disk}: {reason}")]
    ForeignMember {
        /// The disk.
        disk: String,
        /// Which pool it belongs to, or what else is wrong.
        reason: String,
    },
    /// Reading a disk offered to a pool failed: the disk is named, the cause kept.
    #[error("{disk}: {source}")]
    Disk {
        /// The disk (its path, for files).
        disk: String,
        /// What failed.
        source: vstor_core::Error,
    },
    /// No disk with valid pool metadata was found.
    #[error("no pool found: {0}")]
    NoPool(String),
    /// A space lost more members than its resiliency tolerates: I/O is refused.
    #[error("space '{space}' is unavailable: {reason}")]
    SpaceFailed {
        /// The space.
        space: String,
        /// Which members are lost and what the resiliency tolerates.
        reason: String,
    },
    /// No space of that name.
    #[error("no space named '{0}' in the pool")]
    NoSuchSpace(String),
    /// A space of that name exists already.
    #[error("a space named '{0}' exists already")]
    SpaceExists(String),
    /// The pool has no room for what was asked.
    #[error("not enough free space in the pool: {0}")]
    PoolFull(String),
    /// Blocks whose checksum fails in every copy (or beyond what parity rebuilds): the data
    /// there is lost, and a read of it fails rather than return wrong bytes.
    #[error("space '{space}': {detail}")]
    ChecksumMismatch {
        /// The space.
        space: String,
        /// Where, and what was tried.
        detail: String,
    },
    /// Members of the pool were written apart (each while the other was missing): taking the
    /// newest metadata would silently drop the other side's writes, so the open is refused.
    /// [`OpenOptions::force_member`](crate::OpenOptions) picks the side to keep.
    #[error("the pool's members diverged (split brain): {detail}")]
    SplitBrain {
        /// The members, their metadata sequence numbers and what each recorded of the others.
        detail: String,
    },
    /// The pool was opened read-only.
    #[error("the pool is open read-only")]
    ReadOnly,
}

impl vstor_core::LayerError for SpacesError {
    fn kind(&self) -> vstor_core::ErrorKind {
        use vstor_core::ErrorKind;
        match self {
            SpacesError::InvalidParameter(_)
            | SpacesError::NoSuchSpace(_)
            | SpacesError::SpaceExists(_)
            | SpacesError::DiskTooSmall { .. }
            | SpacesError::ForeignMember { .. } => ErrorKind::InvalidInput,
            SpacesError::TooFewDisks { .. } | SpacesError::PoolFull(_) => ErrorKind::NoSpace,
            SpacesError::NoPool(_) | SpacesError::SpaceFailed { .. } => ErrorKind::Unavailable,
            SpacesError::ChecksumMismatch { .. } | SpacesError::SplitBrain { .. } => {
                ErrorKind::Corrupt
            }
            SpacesError::ReadOnly => ErrorKind::ReadOnly,
            SpacesError::Disk { source, .. } => source.kind(),
        }
    }
}

impl From<SpacesError> for vstor_core::Error {
    fn from(e: SpacesError) -> Self {
        vstor_core::Error::Layer(Arc::new(e))
    }
}

pub(crate) use vstor_core::corrupt;

/// An invalid-parameter error.
pub(crate) fn invalid(msg: impl Into<String>) -> vstor_core::Error {
    SpacesError::InvalidParameter(msg.into()).into()
}
