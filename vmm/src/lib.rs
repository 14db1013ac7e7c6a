//! vstor-vmm: the reference KVM VMM that serves vstor stacks to a guest over virtio-blk.
//!
//! **Status: not implemented yet.** This crate is a placeholder in the workspace layout; the VMM
//! binary and its test guest land with the reference-VMM issue. The crate exports no API and
//! builds no binary yet.
#![deny(missing_docs)]
