//! The block-device contract.

use crate::error::{Error, OpKind, Result};
use crate::request::{first_error, Op, Request};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Which optional operations a device supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Supports {
    /// Flush does something (a device without a volatile cache may still accept flushes).
    pub flush: bool,
    /// Discard (unmap/trim).
    pub discard: bool,
    /// Write-zeroes.
    pub write_zeroes: bool,
    /// The capacity can change while the device is open ([`BlockDevice::resize`]).
    pub resize: bool,
}

/// One piece of an allocation map ([`BlockDevice::allocation`]): `len` bytes with the same
/// status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// Where the data comes from: 0 when no layer of the stack holds it (a hole, a thin extent
    /// not allocated, a block no image of a chain has), 1 when the top image (or the only file)
    /// holds it, 2 its parent, and so on.
    pub depth: u32,
    /// The range is known to read as zeroes.
    pub zero: bool,
}

impl Extent {
    /// `len` bytes of data held at `depth`.
    pub fn data(len: u64, depth: u32) -> Self {
        Extent {
            len,
            depth,
            zero: false,
        }
    }

    /// `len` bytes that no layer holds: they read as zeroes.
    pub fn hole(len: u64) -> Self {
        Extent {
            len,
            depth: 0,
            zero: true,
        }
    }
}

/// Appends `e` to `out`, merging it into the last extent when their status is the same.
pub fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.depth == e.depth && last.zero == e.zero {
            last.len += e.len;
            return;
        }
    }
    out.push(e);
}

/// A description of a device, as of the moment it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes.
    pub capacity: u64,
    /// The unit of addressing: offsets and lengths are multiples of it (512 or 4096).
    pub logical_sector_size: u32,
    /// The unit the device writes atomically and efficiently (>= logical).
    pub physical_sector_size: u32,
    /// Buffer address alignment that avoids a bounce copy (1: any address is fine).
    pub mem_alignment: u32,
    /// Whether write-type requests are refused.
    pub read_only: bool,
    /// Whether a discarded range reads back as zeroes.
    pub discard_zeroes: bool,
    /// Optional operations.
    pub supports: Supports,
}

impl DeviceInfo {
    /// Checks a request against this description: kind supported, not read-only, aligned to the
    /// logical sector size and inside the capacity. Every device calls this before doing I/O.
    pub fn check(&self, req: &Request<'_>) -> Result<()> {
        let op = req.kind();
        if op.is_write() && self.read_only {
            return Err(Error::ReadOnly { op });
        }
        match op {
            OpKind::Discard if !self.supports.discard => return Err(Error::Unsupported { op }),
            OpKind::WriteZeroes if !self.supports.write_zeroes => {
                return Err(Error::Unsupported { op })
            }
            OpKind::Flush => return Ok(()),
            _ => {}
        }
        let (offset, len) = (req.offset(), req.len());
        let align = u64::from(self.logical_sector_size.max(1));
        if offset % align != 0 || len % align != 0 {
            return Err(Error::Unaligned {
                op,
                offset,
                len,
                alignment: self.logical_sector_size,
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.capacity)
        {
            return Err(Error::OutOfRange {
                op,
                offset,
                len,
                capacity: self.capacity,
            });
        }
        if let Op::Read { bufs, .. } = &req.op {
            if bufs.is_empty() {
                return Err(Error::InvalidArgument("read with no buffers".into()));
            }
        }
        if let Op::Write { bufs, .. } = &req.op {
            if bufs.is_empty() {
                return Err(Error::InvalidArgument("write with no buffers".into()));
            }
        }
        Ok(())
    }
}

/// A block device: the one interface every layer of vstor implements and consumes.
///
/// Devices are shared (`&self`, `Send + Sync`) and object-safe, so a stack is an
/// `Arc<dyn BlockDevice>` serving many threads. The primary entry point is [`submit`]: a batch
/// of requests, each completed with its own result; a backend keeps the whole batch in flight at
/// once (queue depth comes from batches). The single-request methods are conveniences on top.
///
/// Ordering: requests of one batch may run concurrently and complete in any order, except that a
/// flush is a barrier inside its batch. Overlapping writes in one batch, or a read overlapping a
/// write of the same batch, give unspecified data (as on a real disk with several requests in
/// flight). Durability: when a flush completes successfully, every write that completed before
/// the flush was submitted survives a power loss.
///
/// [`submit`]: BlockDevice::submit
pub trait BlockDevice: Send + Sync {
    /// The device's description, including its current capacity.
    fn info(&self) -> DeviceInfo;

    /// Runs every request of `batch` and completes each with its own result (see
    /// [`Request::result`]). Returns when all have completed.
    fn submit(&self, batch: &mut [Request<'_>]);

    /// The current capacity in bytes.
    fn capacity(&self) -> u64 {
        self.info().capacity
    }

    /// Changes the capacity, if the device supports it ([`Supports::resize`]). Holders observe
    /// the change through [`capacity_signal`](BlockDevice::capacity_signal).
    fn resize(&self, new_capacity: u64) -> Result<()> {
        let _ = new_capacity;
        Err(Error::InvalidArgument(
            "this device cannot change its capacity".into(),
        ))
    }

    /// The signal that tells holders of this device about capacity changes, for devices whose
    /// capacity can change (`None` for fixed-size devices).
    fn capacity_signal(&self) -> Option<Arc<CapacitySignal>> {
        None
    }

    /// A one-line description for humans (backend, path, engine).
    fn describe(&self) -> String {
        "block device".to_string()
    }

    /// The allocation status of `[offset, offset + len)`: consecutive extents that cover the
    /// range exactly, in order (what NBD's `base:allocation` and `qemu:allocation-depth` and
    /// `qemu-img map` report). A layer that knows nothing about allocation keeps the default,
    /// which calls the whole range data at depth 1; a layer that only forwards I/O forwards
    /// this too. The range must lie inside the capacity.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.capacity(), offset, len)?;
        Ok(if len == 0 {
            Vec::new()
        } else {
            vec![Extent::data(len, 1)]
        })
    }

    /// This device as a [`FileDevice`](crate::FileDevice), when it is one with nothing in
    /// between: lets [`submit_group`](crate::submit_group) keep several files' batches on one
    /// io_uring. A wrapper that only forwards (`Arc`, `Box`, `&`) forwards this too; a wrapper
    /// that changes I/O (faults, translation) keeps the default, `None`.
    fn as_file(&self) -> Option<&crate::FileDevice> {
        None
    }

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        run_one(self, Request::read(offset, buf))
    }

    /// Writes `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        run_one(self, Request::write(offset, buf))
    }

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()> {
        run_one(self, Request::flush())
    }

    /// Discards `len` bytes at `offset`.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        run_one(self, Request::discard(offset, len))
    }

    /// Writes `len` zero bytes at `offset`.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        run_one(self, Request::write_zeroes(offset, len))
    }

    /// Submits `batch` and returns the first error among its results.
    fn submit_all(&self, batch: &mut [Request<'_>]) -> Result<()> {
        self.submit(batch);
        first_error(batch)
    }
}

/// Refuses a range that does not lie inside `capacity` (for [`BlockDevice::allocation`]).
pub fn check_range(capacity: u64, offset: u64, len: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > capacity) {
        return Err(Error::OutOfRange {
            op: OpKind::Read,
            offset,
            len,
            capacity,
        });
    }
    Ok(())
}

fn run_one<D: BlockDevice + ?Sized>(dev: &D, req: Request<'_>) -> Result<()> {
    let mut batch = [req];
    dev.submit(&mut batch);
    batch[0].result()
}

macro_rules! forward_block_device {
    ($($ty:ty),*) => {$(
        impl<T: BlockDevice + ?Sized> BlockDevice for $ty {
            fn info(&self) -> DeviceInfo {
                (**self).info()
            }
            fn submit(&self, batch: &mut [Request<'_>]) {
                (**self).submit(batch)
            }
            fn capacity(&self) -> u64 {
                (**self).capacity()
            }
            fn resize(&self, new_capacity: u64) -> Result<()> {
                (**self).resize(new_capacity)
            }
            fn capacity_signal(&self) -> Option<Arc<CapacitySignal>> {
                (**self).capacity_signal()
            }
            fn describe(&self) -> String {
                (**self).describe()
            }
            fn as_file(&self) -> Option<&crate::FileDevice> {
                (**self).as_file()
            }
            fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
                (**self).allocation(offset, len)
            }
        }
    )*};
}
forward_block_device!(Arc<T>, Box<T>, &T);

type Listener = Arc<dyn Fn(u64) + Send + Sync>;

/// Tells holders of a device that its capacity changed: a listener is called with the new
/// capacity (the VMM turns that into a virtio config-change interrupt), and threads can wait
/// for a change with [`wait_for_change`](CapacitySignal::wait_for_change).
pub struct CapacitySignal {
    state: Mutex<SignalState>,
    changed: Condvar,
}

struct SignalState {
    capacity: u64,
    generation: u64,
    next_id: u64,
    listeners: Vec<(u64, Listener)>,
}

/// Identifies a listener registered with [`CapacitySignal::subscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerId(u64);

impl std::fmt::Debug for CapacitySignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (capacity, generation) = self.current();
        f.debug_struct("CapacitySignal")
            .field("capacity", &capacity)
            .field("generation", &generation)
            .finish()
    }
}

impl CapacitySignal {
    /// A signal whose current capacity is `capacity`.
    pub fn new(capacity: u64) -> Self {
        CapacitySignal {
            state: Mutex::new(SignalState {
                capacity,
                generation: 0,
                next_id: 0,
                listeners: Vec::new(),
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SignalState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current capacity and the number of changes so far.
    pub fn current(&self) -> (u64, u64) {
        let s = self.lock();
        (s.capacity, s.generation)
    }

    /// Calls `listener` with the new capacity after every change, until unsubscribed.
    pub fn subscribe(&self, listener: impl Fn(u64) + Send + Sync + 'static) -> ListenerId {
        let mut s = self.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.listeners.push((id, Arc::new(listener)));
        ListenerId(id)
    }

    /// Removes a listener.
    pub fn unsubscribe(&self, id: ListenerId) {
        self.lock().listeners.retain(|(i, _)| *i != id.0);
    }

    /// Records a new capacity (devices call this) and tells every listener and waiter.
    /// Listeners run after the signal's lock is released, so they may call back into the signal
    /// (or the device); devices call this after releasing their own locks for the same reason.
    pub fn publish(&self, capacity: u64) {
        let mut s = self.lock();
        s.capacity = capacity;
        s.generation += 1;
        let listeners: Vec<Listener> = s.listeners.iter().map(|(_, l)| l.clone()).collect();
        drop(s);
        self.changed.notify_all();
        for l in listeners {
            l(capacity);
        }
    }

    /// Waits until the generation is past `seen_generation` or `timeout` passes; returns the
    /// current `(capacity, generation)` either way.
    pub fn wait_for_change(&self, seen_generation: u64, timeout: Duration) -> (u64, u64) {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.generation <= seen_generation {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        (s.capacity, s.generation)
    }
}
