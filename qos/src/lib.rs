//! vstor-qos: per-disk IOPS limits and reservations normalized to 8 KiB, mClock-family
//! scheduling and flow statistics, as a layer over any vstor block device.
//!
//! **Status: not implemented yet.** This crate is a placeholder in the workspace layout; QoS
//! lands with the storage-QoS issue. The crate exports no API yet.
#![deny(missing_docs)]
