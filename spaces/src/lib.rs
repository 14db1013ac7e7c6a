//! vstor-spaces: Storage Spaces-style pools of disks cut into slabs, with simple, mirror
//! and parity spaces, repair, scrub and tiering.
//!
//! **Status: not implemented yet.** This crate is a placeholder in the workspace layout; pools
//! land with the storage-pools issue. The crate exports no API yet.
#![deny(missing_docs)]
