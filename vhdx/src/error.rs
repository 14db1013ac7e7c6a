//! Errors of the VHDX layer.
//!
//! Malformed structures become [`vstor_core::Error::Corrupt`] (the file, the offset and the
//! structure); the conditions only a VHDX has (a missing parent, a linkage mismatch, a log that
//! needs replay) are [`VhdxError`]s carried in [`vstor_core::Error::Layer`].

use std::path::PathBuf;
use std::sync::Arc;
use vstor_core::ErrorKind;

/// What can go wrong that is particular to VHDX.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum VhdxError {
    /// The parent of a differencing disk was not found at any path its locator names.
    #[error("parent of {child} not found; tried {}", tried.join(", "))]
    ParentNotFound {
        /// The differencing disk.
        child: String,
        /// Every path tried, in order.
        tried: Vec<String>,
    },
    /// The parent's DataWriteGuid is not the one the child was made against.
    #[error("parent {parent} of {child} has changed since the child was created (DataWriteGuid {found}, the child expects {expected})")]
    LinkageMismatch {
        /// The differencing disk.
        child: String,
        /// The parent found.
        parent: String,
        /// The linkage the child records.
        expected: String,
        /// The parent's DataWriteGuid.
        found: String,
    },
    /// The parent is in the middle of a merge of another disk into it (an interrupted
    /// `vstor disk merge`): it holds part of that disk's data, so this child would not read as
    /// it did. Only the merge's own disk may be opened over it until the merge finishes.
    #[error("{child}: its parent {target} is in the middle of a merge of {top} into it and does not read as it did; {finish}")]
    MergePending {
        /// The child refused.
        child: String,
        /// The parent that receives the merge.
        target: String,
        /// The disk being merged (the merge's top).
        top: String,
        /// What to run to finish the merge.
        finish: String,
    },
    /// The chain leads back to a disk already in it.
    #[error("differencing chain has a cycle: {0} appears twice")]
    ChainCycle(PathBuf),
    /// The chain is deeper than the limit.
    #[error("differencing chain is deeper than {0} levels")]
    ChainTooDeep(usize),
    /// The image's log must be replayed, and this open may not write.
    #[error("{0} has a log that must be replayed; open it writable to replay it, or read-only with replay in memory allowed")]
    ReplayNeeded(String),
    /// The image uses something this implementation does not understand.
    #[error("{file}: {what} is not supported")]
    Unsupported {
        /// The file.
        file: String,
        /// What.
        what: String,
    },
    /// A shrink would cut blocks that hold data.
    #[error("{file}: cannot shrink to {requested} bytes: data is stored up to {minimum} bytes (the smallest size it can shrink to; use --to-minimum)")]
    BelowMinimum {
        /// The image.
        file: String,
        /// The size asked for.
        requested: u64,
        /// The smallest size that keeps every block holding data.
        minimum: u64,
    },
    /// A parameter given to create or open makes no sense.
    #[error("{0}")]
    InvalidParameter(String),
}

impl vstor_core::LayerError for VhdxError {
    fn kind(&self) -> ErrorKind {
        match self {
            VhdxError::ParentNotFound { .. } | VhdxError::MergePending { .. } => {
                ErrorKind::Unavailable
            }
            VhdxError::LinkageMismatch { .. } | VhdxError::ChainCycle(_) => ErrorKind::Corrupt,
            VhdxError::ChainTooDeep(_) | VhdxError::Unsupported { .. } => ErrorKind::Unsupported,
            VhdxError::ReplayNeeded(_) => ErrorKind::ReadOnly,
            VhdxError::BelowMinimum { .. } | VhdxError::InvalidParameter(_) => {
                ErrorKind::InvalidInput
            }
        }
    }
}

impl From<VhdxError> for vstor_core::Error {
    fn from(e: VhdxError) -> Self {
        vstor_core::Error::Layer(Arc::new(e))
    }
}

pub(crate) use vstor_core::corrupt;

/// An invalid-parameter error.
pub(crate) fn invalid(msg: impl Into<String>) -> vstor_core::Error {
    VhdxError::InvalidParameter(msg.into()).into()
}
