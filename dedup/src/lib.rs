//! vstor-dedup: data deduplication (chunking, a chunk store, offline and online dedup).
//!
//! **Status: not implemented yet.** This crate is a placeholder in the workspace layout; the
//! crate exports no API yet.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
