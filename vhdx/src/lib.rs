//! vstor-vhdx: VHDX virtual disks ([MS-VHDX]) on the vstor-core block-device contract.
//!
//! - Fixed, dynamic and differencing disks, created ([`Vhdx::create`]) or opened
//!   ([`Vhdx::open`], which resolves the whole parent chain and checks each linkage).
//! - Every metadata change (BAT, sector bitmaps) goes through the log, so a crash at any write
//!   leaves an image that opens consistent; a dirty image is replayed on a writable open, and in
//!   memory on a read-only one.
//! - I/O follows the core contract: batches, vectored reads and writes, flush, discard,
//!   write-zeroes; data paths to mapped blocks take no lock.
//! - [`check`] verifies an image structure by structure; [`Vhdx::repair`] fixes what it can.
//! - The lifecycle: [`Vhdx::resize_with`] (online), [`Vhdx::compact_with`],
//!   [`convert::convert`], [`lifecycle::merge`], [`lifecycle::set_parent`],
//!   [`lifecycle::checkpoint`], and for a disk in use [`live::LiveDisk`] (online checkpoint,
//!   merge and clone). Long operations take a [`vstor_core::Job`] for progress and
//!   cancellation. [`vpc`] reads legacy VHD images for conversion.
//!
//! ```no_run
//! use vstor_core::BlockDevice;
//! use vstor_vhdx::{CreateOptions, Vhdx};
//! let disk = Vhdx::create("disk.vhdx", &CreateOptions::dynamic(1 << 30))?;
//! disk.write_at(0, &[0xA5; 4096])?;
//! disk.flush()?;
//! # Ok::<(), vstor_core::Error>(())
//! ```
//!
//! [MS-VHDX]: https://learn.microsoft.com/en-us/openspecs/windows_protocols/ms-vhdx/
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod check;
pub mod convert;
mod create;
mod disk;
mod error;
pub mod format;
pub mod lifecycle;
pub mod live;
pub mod log;
pub mod meta;
pub mod vpc;

pub use create::{CreateOptions, DiskKind, DEFAULT_BLOCK_SIZE};
pub use disk::{CompactReport, ImageKind, OpenOptions, ResizeReport, Src, Vhdx};
pub use error::VhdxError;
