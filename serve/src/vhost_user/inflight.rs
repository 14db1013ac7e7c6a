//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, QEMU
//! `docs/interop/vhost-user.rst`, "Inflight I/O tracking"), split virtqueues.
//!
//! The backend allocates a shared-memory buffer (GET_INFLIGHT_FD); the frontend keeps it across
//! backend restarts and hands it to every backend that connects (SET_INFLIGHT_FD). In it the
//! backend marks each chain it takes from a queue, with a counter that orders them, and clears
//! the mark once the chain is in the used ring. A backend that connects after one that died finds
//! the chains that were taken and never returned, and serves them again, in the order they were
//! taken, before anything new from the available ring: no request is lost and none that completed
//! is done twice.
//!
//! Layout of one queue's region (`QueueRegionSplit`, little-endian), regions one after another,
//! each padded to 64 bytes:
//! `u64 features; u16 version (1); u16 desc_num; u16 last_batch_head; u16 used_idx;`
//! then `desc_num` entries of `{ u8 inflight; u8 padding[5]; u16 next; u64 counter; }`.
//!
//! Returning a chain is three steps, as libvhost-user does them: `last_batch_head = head`; the
//! used ring entry and index; then `inflight = 0` and `used_idx = used->idx`. If the backend dies
//! between the used ring and the last step, the next one sees `used_idx != used->idx` and clears
//! the mark of `last_batch_head` itself.
//!
//! The buffer is accessed through `vm-memory` like guest memory (bounds-checked, volatile), and
//! the frontend's values in it are not trusted: heads outside the queue are ignored.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::virtio_blk::QueueTracker;

const HEADER: u64 = 16;
const DESC: u64 = 16;
const ALIGN: u64 = 64;
const VERSION: u16 = 1;
const OFF_VERSION: u64 = 8;
const OFF_DESC_NUM: u64 = 10;
const OFF_LAST_BATCH_HEAD: u64 = 12;
const OFF_USED_IDX: u64 = 14;
const DESC_INFLIGHT: u64 = 0;
const DESC_NEXT: u64 = 6;
const DESC_COUNTER: u64 = 8;

/// The bytes one queue of `queue_size` descriptors takes.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER + DESC * u64::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.into())
}

/// The mapped buffer of a connection.
pub struct InflightRegion {
    mem: GuestMemoryMmap,
    num_queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightRegion {
    /// A new zeroed buffer for `num_queues` queues of `queue_size` (GET_INFLIGHT_FD): the file
    /// to hand to the frontend and its size. The file is a sealed memfd that cannot shrink.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(File, u64)> {
        check_geometry(num_queues, queue_size)?;
        let size = queue_region_size(queue_size) * u64::from(num_queues);
        let fd = rustix::fs::memfd_create(
            "vstor-inflight",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        file.set_len(size)?;
        rustix::fs::fcntl_add_seals(
            &file,
            rustix::fs::SealFlags::SHRINK
                | rustix::fs::SealFlags::GROW
                | rustix::fs::SealFlags::SEAL,
        )?;
        let region = Self::map(file.try_clone()?, 0, size, num_queues, queue_size)?;
        for q in 0..num_queues {
            let base = region.queue_base(q);
            region.put(base + OFF_VERSION, VERSION)?;
            region.put(base + OFF_DESC_NUM, queue_size)?;
        }
        Ok((file, size))
    }

    /// Maps the buffer the frontend hands over (SET_INFLIGHT_FD), after checking that it is as
    /// large as its geometry needs and that the file holds it.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        check_geometry(num_queues, queue_size)?;
        let need = queue_region_size(queue_size) * u64::from(num_queues);
        if size < need {
            return Err(invalid(format!(
                "inflight buffer of {size} bytes for {num_queues} queues of {queue_size} \
                 ({need} needed)"
            )));
        }
        let meta = file.metadata()?;
        if !meta.file_type().is_file() || offset.checked_add(size).is_none_or(|e| e > meta.len()) {
            return Err(invalid(format!(
                "inflight buffer of {size} bytes at offset {offset} of a file of {} bytes",
                meta.len()
            )));
        }
        let mmap = MmapRegion::from_file(FileOffset::new(file, offset), need as usize)
            .map_err(|e| io::Error::other(format!("cannot map the inflight buffer: {e}")))?;
        let region = GuestRegionMmap::new(mmap, GuestAddress(0))
            .ok_or_else(|| invalid("inflight buffer wraps around"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(io::Error::other)?;
        Ok(InflightRegion {
            mem,
            num_queues,
            queue_size,
        })
    }

    /// The number of queues it tracks.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn queue_base(&self, q: u16) -> u64 {
        queue_region_size(self.queue_size) * u64::from(q)
    }

    fn put<T: vm_memory::ByteValued>(&self, at: u64, v: T) -> io::Result<()> {
        self.mem
            .write_obj(v, GuestAddress(at))
            .map_err(io::Error::other)
    }

    fn get<T: vm_memory::ByteValued>(&self, at: u64) -> io::Result<T> {
        self.mem
            .read_obj(GuestAddress(at))
            .map_err(io::Error::other)
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> io::Result<()> {
    if num_queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
        return Err(invalid(format!(
            "inflight buffer for {num_queues} queues of {queue_size} descriptors"
        )));
    }
    Ok(())
}

/// The tracking of one queue (a [`QueueTracker`] for the device model).
#[derive(Debug)]
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    base: u64,
    /// Descriptors of the queue as the ring has it (no more than the buffer's `desc_num`).
    size: u16,
    counter: u64,
    resubmit: VecDeque<u16>,
    /// The first write to the buffer that failed (the frontend's mapping went away): tracking
    /// stops there.
    failed: bool,
}

impl QueueInflight {
    /// Starts tracking queue `q` of `size` descriptors whose used index in guest memory is
    /// `used_idx`: repairs an interrupted return, collects the chains to resubmit (in the order
    /// they were taken) and says where the available ring goes on (`used_idx` plus the chains
    /// still in flight).
    pub fn start(
        region: Arc<InflightRegion>,
        q: u16,
        size: u16,
        used_idx: u16,
    ) -> io::Result<(Self, u16)> {
        if q >= region.num_queues {
            return Err(invalid(format!(
                "queue {q} is not in the inflight buffer ({} queues)",
                region.num_queues
            )));
        }
        if size > region.queue_size {
            return Err(invalid(format!(
                "queue of {size} descriptors, inflight buffer for {}",
                region.queue_size
            )));
        }
        let base = region.queue_base(q);
        let desc = |head: u16| base + HEADER + DESC * u64::from(head);
        let saved_used: u16 = region.get(base + OFF_USED_IDX)?;
        if saved_used != used_idx {
            let last: u16 = region.get(base + OFF_LAST_BATCH_HEAD)?;
            if last < size {
                region.put(desc(last) + DESC_INFLIGHT, 0u8)?;
            }
            fence(Ordering::SeqCst);
            region.put(base + OFF_USED_IDX, used_idx)?;
        }
        let mut inflight = Vec::new();
        for head in 0..size {
            let mark: u8 = region.get(desc(head) + DESC_INFLIGHT)?;
            if mark == 1 {
                let counter: u64 = region.get(desc(head) + DESC_COUNTER)?;
                inflight.push((counter, head));
            }
        }
        inflight.sort_unstable();
        let counter = inflight.last().map_or(0, |&(c, _)| c);
        let next_avail = used_idx.wrapping_add(inflight.len() as u16);
        Ok((
            QueueInflight {
                region,
                base,
                size,
                counter,
                resubmit: inflight.into_iter().map(|(_, h)| h).collect(),
                failed: false,
            },
            next_avail,
        ))
    }

    /// How many chains wait to be served again.
    pub fn pending_resubmits(&self) -> usize {
        self.resubmit.len()
    }

    fn desc(&self, head: u16) -> u64 {
        self.base + HEADER + DESC * u64::from(head)
    }

    fn write<T: vm_memory::ByteValued>(&mut self, at: u64, v: T) {
        if !self.failed && self.region.put(at, v).is_err() {
            self.failed = true;
        }
    }
}

impl QueueTracker for QueueInflight {
    fn resubmit(&mut self) -> Option<u16> {
        self.resubmit.pop_front()
    }

    fn fetched(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.counter += 1;
        let d = self.desc(head);
        self.write(d + DESC_COUNTER, self.counter);
        self.write(d + DESC_NEXT, 0u16);
        fence(Ordering::SeqCst);
        self.write(d + DESC_INFLIGHT, 1u8);
    }

    fn returning(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let at = self.base + OFF_LAST_BATCH_HEAD;
        self.write(at, head);
        fence(Ordering::SeqCst);
    }

    fn returned(&mut self, head: u16, used_idx: u16) {
        if head >= self.size {
            return;
        }
        fence(Ordering::SeqCst);
        let d = self.desc(head);
        self.write(d + DESC_INFLIGHT, 0u8);
        fence(Ordering::SeqCst);
        let at = self.base + OFF_USED_IDX;
        self.write(at, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> (File, Arc<InflightRegion>) {
        let (file, size) = InflightRegion::create(2, 8).unwrap();
        assert_eq!(size, 2 * queue_region_size(8));
        let r = InflightRegion::map(file.try_clone().unwrap(), 0, size, 2, 8).unwrap();
        (file, Arc::new(r))
    }

    #[test]
    fn unfinished_chains_come_back_in_the_order_they_were_taken() {
        let (file, r) = region();
        let (mut t, next) = QueueInflight::start(r.clone(), 1, 8, 0).unwrap();
        assert_eq!((next, t.pending_resubmits()), (0, 0));
        // Taken: 5, 2, 7, 0; returned: 2 (used idx 1), then 7 is being returned when the
        // backend dies after writing the used ring (used idx 2 in guest memory).
        for h in [5, 2, 7, 0] {
            t.fetched(h);
        }
        t.returning(2);
        t.returned(2, 1);
        t.returning(7);
        drop(t);
        drop(r);
        // A new backend maps the same buffer.
        let size = file.metadata().unwrap().len();
        let r = Arc::new(InflightRegion::map(file, 0, size, 2, 8).unwrap());
        let (mut t, next) = QueueInflight::start(r.clone(), 1, 8, 2).unwrap();
        assert_eq!(next, 4, "two returned, two in flight");
        assert_eq!(t.resubmit(), Some(5));
        assert_eq!(t.resubmit(), Some(0));
        assert_eq!(t.resubmit(), None);
        // Queue 0 was never used.
        let (t0, next0) = QueueInflight::start(r, 0, 8, 0).unwrap();
        assert_eq!((next0, t0.pending_resubmits()), (0, 0));
    }

    #[test]
    fn hostile_buffers_are_refused() {
        let (file, size) = InflightRegion::create(1, 8).unwrap();
        assert!(InflightRegion::map(file.try_clone().unwrap(), 0, size, 2, 8).is_err());
        assert!(InflightRegion::map(file.try_clone().unwrap(), 64, size, 1, 8).is_err());
        assert!(InflightRegion::map(file.try_clone().unwrap(), 0, size, 1, 6).is_err());
        assert!(InflightRegion::map(file.try_clone().unwrap(), u64::MAX, size, 1, 8).is_err());
        assert!(InflightRegion::create(0, 8).is_err());
        let r = Arc::new(InflightRegion::map(file, 0, size, 1, 8).unwrap());
        assert!(QueueInflight::start(r.clone(), 1, 8, 0).is_err());
        assert!(QueueInflight::start(r.clone(), 0, 16, 0).is_err());
        // Heads outside the queue are ignored.
        let (mut t, _) = QueueInflight::start(r, 0, 8, 0).unwrap();
        t.fetched(100);
        t.returning(100);
        t.returned(100, 1);
    }
}
