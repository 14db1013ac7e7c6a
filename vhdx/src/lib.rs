//! vstor-vhdx: the VHDX virtual disk format ([MS-VHDX]) on top of the vstor-core
//! block-device contract.
//!
//! **Status: not implemented yet.** This crate is a placeholder in the workspace layout; the
//! format (fixed, dynamic and differencing disks, the metadata log, resize, shared VHDX) lands
//! with the VHDX issue. Nothing here pretends to work: the crate exports no API yet.
#![deny(missing_docs)]
