//! vstor-dedup: data deduplication for vstor.
//!
//! - [`chunk`]: content-defined chunking (FastCDC 2020, 32/64/128 KiB by default, as Windows
//!   Server's dedup) and chunk ids (BLAKE3).
//! - [`store`]: the chunk store: chunks (LZ4-compressed where that saves space) in append-only
//!   container files sealed at a size, and an index in redb (chunk -> container, offset,
//!   lengths, refcount, hotspot copy; stream -> chunk list; container -> committed length).
//!   Garbage collection, scrub with repair from hotspot copies.
//! - [`library`]: offline dedup of a directory of images: optimize (files replaced atomically
//!   by stubs), unoptimize, status, GC, scrub.
//! - [`stub`] and [`device`]: an optimized file read (and written) like the original, as a
//!   [`vstor_core::BlockDevice`] the stack builder puts under the VHDX layer.
//! - [`volume`]: inline dedup of running VMs' disks: volumes of fixed 4 KiB blocks in a store
//!   of their own (`dedup:STORE/NAME`), instant clones, durable at flush.
//! - [`vfs`]: the file system all of it runs on: the host's, or a simulated one that cuts
//!   power at any write (the crash tests).
//!
//! ```
//! use std::sync::Arc;
//! use vstor_dedup::{library::Library, store::StoreConfig, vfs::{SimFs, Vfs, OpenMode}};
//! let fs = SimFs::new();
//! let root = std::path::Path::new("/lib");
//! fs.create_dir_all(root)?;
//! let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
//! fs.open(&root.join("a.img"), OpenMode::Create)?.write_at(0, &data)?;
//! let fs: Arc<dyn Vfs> = Arc::new(fs);
//! Library::enable(fs.clone(), root, StoreConfig::default())?;
//! let lib = Library::open(fs.clone(), root)?;
//! lib.optimize(None, None, &mut |_, _, _| {})?;
//! let stub = lib.open_stub("a.img", false)?;
//! let mut back = vec![0; data.len()];
//! stub.read(0, &mut back)?;
//! assert_eq!(back, data);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod chunk;
pub mod device;
mod error;
pub mod format;
#[doc(hidden)]
pub mod fuzz;
pub mod library;
pub mod store;
pub mod stub;
pub mod vfs;
pub mod volume;

pub use device::StubDevice;
pub use error::{DedupError, Result};
pub use volume::{Volume, VolumeStore};
