//! vstor-core: the block-device layer every part of vstor stands on.
//!
//! - [`BlockDevice`]: the contract. Shared (`&self`, `Send + Sync`), object-safe, batched:
//!   [`BlockDevice::submit`] takes a batch of [`Request`]s (read, write, both vectored; flush;
//!   discard; write-zeroes) and completes each with its own result. A [`DeviceInfo`] describes
//!   the device; a [`CapacitySignal`] tells holders when its capacity changes.
//! - [`FileDevice`]: files and block devices on io_uring (a batch in flight at once, one ring
//!   per submitting thread, the file registered) or on portable `pread`/`pwrite`; optional
//!   O_DIRECT with a fallback when the file system refuses it and bounce buffers for unaligned
//!   memory.
//! - [`submit_group`]: batches for several devices at once, the io_uring files among them on
//!   one ring driven by the calling thread, each request reported as it completes.
//! - [`MemoryDevice`]: a sparse in-memory device.
//! - [`FaultDevice`]: injects failures, power cuts (with torn writes), corruption and latency.
//! - [`AlignedBuf`]: buffers for direct I/O.
//!
//! ```
//! use vstor_core::{BlockDevice, MemoryDevice, Request};
//!
//! let dev = MemoryDevice::new(1 << 20)?;
//! let data = vec![0xab; 4096];
//! let mut back = vec![0; 4096];
//! let mut batch = [Request::write(0, &data), Request::flush()];
//! dev.submit_all(&mut batch)?;
//! dev.read_at(0, &mut back)?;
//! assert_eq!(back, data);
//! # Ok::<(), vstor_core::Error>(())
//! ```
#![deny(missing_docs)]

mod buf;
mod device;
mod error;
pub mod fault;
mod file;
mod group;
pub mod hdd;
mod job;
mod mem;
mod request;

pub use buf::{is_aligned, AlignedBuf, DEFAULT_ALIGNMENT};
pub use device::{
    check_range, push_extent, BlockDevice, CapacitySignal, DeviceInfo, Extent, ListenerId, Supports,
};
pub use error::{corrupt, io_kind, Error, ErrorKind, LayerError, OpKind, Result};
pub use fault::{CutPolicy, FaultDevice, FaultRule};
pub use file::{Engine, FileDevice, FileKind, FileOptions, ImageLock, LockMode};
pub use group::submit_group;
pub use hdd::{HddDevice, HddModel};
pub use job::Job;
pub use mem::MemoryDevice;
pub use request::{
    carve_read_bufs, carve_write_bufs, copy_from_bufs, copy_into_bufs, fail_remaining, first_error,
    zero_bufs, Op, ReadBufs, Request, WriteBufs,
};
