//! The virtio-blk device model over any vstor stack (`Arc<dyn BlockDevice>`), shared by every
//! transport that carries virtio-blk requests: the reference VMM's virtio-mmio device
//! (`vstor-vmm`) and the daemon's vhost-user-blk backend ([`crate::vhost_user`]). It knows
//! guest memory and split virtqueues only (no KVM, no transport): a transport hands it a queue
//! and the memory the queue lives in, and it validates, batches and completes the requests.
//!
//! Every descriptor chain is validated before anything touches the disk or guest memory: the
//! chain must end (no loop, no `next` outside the table), device-readable descriptors must come
//! before device-writable ones, every buffer must lie inside guest RAM, and the data of one
//! request is bounded ([`MAX_REQUEST_BYTES`]). A chain with no place for a status byte is returned
//! with nothing written; any other malformed request completes with `VIRTIO_BLK_S_IOERR`.
//!
//! The available chains of a queue go down to the stack as one batch (the core contract), so the
//! guest's queue depth reaches the backend. Data moves through host buffers owned by the request
//! (a copy per request; mapping guest memory directly is a later optimization).
//!
//! Besides reads, writes, flushes and GET_ID the device serves DISCARD and WRITE_ZEROES (offered
//! when the stack supports them; a write-zeroes range with the UNMAP flag becomes a discard where
//! the stack's discards read back as zeroes), lets the driver switch between write-back and
//! write-through caching (CONFIG_WCE), and honours EVENT_IDX notification suppression. Its state
//! is atomic, so one device serves its queues from several threads.

use crate::export::{Export, InFlight};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vstor_core::{BlockDevice, OpKind, Request};

/// Virtio 1.x (feature bit 32), which every device offers and requires.
pub const F_VERSION_1: u64 = 1 << 32;
/// `used_event`/`avail_event` notification suppression (feature bit 29).
pub const F_EVENT_IDX: u64 = 1 << 29;

/// The virtio device ID of a block device.
pub const DEVICE_ID: u32 = 2;

/// Feature bits (virtio spec 5.2.3).
pub mod feature {
    /// `size_max` is valid.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << 9;
    /// The cache mode can be read and set through the `writeback` configuration field.
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// DISCARD requests.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES requests.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// More than one request queue (`num_queues` is valid).
    pub const MQ: u64 = 1 << 12;
}

/// Request types (virtio spec 5.2.6).
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device ID string.
    pub const GET_ID: u32 = 8;
    /// Discard ranges.
    pub const DISCARD: u32 = 11;
    /// Write zeroes over ranges.
    pub const WRITE_ZEROES: u32 = 13;
}

/// The UNMAP flag of a write-zeroes range: the device may deallocate the range.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Status byte: success.
pub const S_OK: u8 = 0;
/// Status byte: I/O error (also any malformed request).
pub const S_IOERR: u8 = 1;
/// Status byte: unsupported request.
pub const S_UNSUPP: u8 = 2;

/// The largest data transfer of one request; larger ones fail with an I/O error.
pub const MAX_REQUEST_BYTES: u64 = 8 << 20;
/// The size of one queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most request queues of one device (`queues=N` on `--disk`).
pub const MAX_QUEUES: usize = 16;
/// `size_max`: the largest segment.
const SIZE_MAX: u32 = 64 * 1024;
/// `seg_max`: the most data segments per request (`SIZE_MAX * SEG_MAX <= MAX_REQUEST_BYTES`).
const SEG_MAX: u32 = 126;
/// Chains served per batch at most (a queue's worth).
const BATCH_MAX: usize = QUEUE_SIZE as usize;
/// Data bytes buffered per batch at most: a batch ends once it holds this much, so a guest that
/// fills its queue with the largest requests costs the VMM 32 MiB, not 256 times 8 MiB.
const BATCH_BYTES: u64 = 32 << 20;
/// Most sectors of one discard or write-zeroes range (`max_discard_sectors`,
/// `max_write_zeroes_sectors`): 1 GiB.
pub const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Most ranges of one discard or write-zeroes request (`max_discard_seg`, `max_write_zeroes_seg`).
pub const MAX_RANGES: u32 = 16;
/// The size of one discard/write-zeroes range descriptor.
const RANGE_LEN: u64 = 16;
/// Offset of `writeback` in the configuration space.
const CONFIG_WRITEBACK: u64 = 32;
/// Length of the configuration space we serve (up to `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;
/// Length of a GET_ID string.
const ID_LEN: usize = 20;
const SECTOR: u64 = 512;

/// A guest-memory segment of a chain.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// Sums segment lengths (each already checked against the request bound).
fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// What a chain asks for, after validation.
#[derive(Debug)]
enum Action {
    Read {
        offset: u64,
        segs: Vec<Segment>,
    },
    Write {
        offset: u64,
        segs: Vec<Segment>,
    },
    Flush,
    GetId {
        segs: Vec<Segment>,
    },
    /// Discard these (offset, length) byte ranges.
    Discard {
        ranges: Vec<(u64, u64)>,
    },
    /// Write zeroes over these (offset, length) byte ranges; `unmap`: the driver allows them to
    /// be deallocated.
    WriteZeroes {
        ranges: Vec<(u64, u64)>,
        unmap: bool,
    },
    /// Complete at once with this status (a malformed or refused request).
    Status(u8),
}

/// One request on its way through a batch.
struct Pending {
    head: u16,
    /// Where the status byte goes; `None` for a chain too broken to have one.
    status_at: Option<GuestAddress>,
    action: Action,
    buf: Vec<u8>,
}

/// Reads `dst.len()` bytes of a segment list, skipping `skip` bytes.
fn read_segs(mem: &GuestMemoryMmap, segs: &[Segment], mut skip: u64, dst: &mut [u8]) -> bool {
    let mut at = 0usize;
    for s in segs {
        if at == dst.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(dst.len() - at);
        let Some(addr) = s.addr.0.checked_add(skip) else {
            return false;
        };
        if mem
            .read_slice(&mut dst[at..at + n], GuestAddress(addr))
            .is_err()
        {
            return false;
        }
        at += n;
        skip = 0;
    }
    at == dst.len()
}

/// Writes `src` over a segment list from its start.
fn write_segs(mem: &GuestMemoryMmap, segs: &[Segment], src: &[u8]) -> bool {
    let mut at = 0usize;
    for s in segs {
        if at == src.len() {
            break;
        }
        let n = (s.len as usize).min(src.len() - at);
        if mem.write_slice(&src[at..at + n], s.addr).is_err() {
            return false;
        }
        at += n;
    }
    at == src.len()
}

/// What the device can do, as `parse_chain` needs it.
#[derive(Debug, Clone, Copy)]
struct Caps {
    read_only: bool,
    discard: bool,
    write_zeroes: bool,
}

/// Parses the ranges of a DISCARD or WRITE_ZEROES request (virtio spec 5.2.6): `out_len` bytes of
/// 16-byte `{ le64 sector; le32 num_sectors; le32 flags }` after the header, nothing for the
/// device to write but the status. Unknown flags, and UNMAP on a discard, are unsupported; a range
/// that is empty, longer than [`MAX_RANGE_SECTORS`] or past the end is an I/O error.
fn parse_ranges(
    mem: &GuestMemoryMmap,
    readable: &[Segment],
    out_len: u64,
    in_len: u64,
    capacity: u64,
    write_zeroes: bool,
) -> Action {
    let count = out_len / RANGE_LEN;
    if in_len != 0 || out_len % RANGE_LEN != 0 || count == 0 || count > u64::from(MAX_RANGES) {
        return Action::Status(S_IOERR);
    }
    let mut raw = vec![0u8; out_len as usize];
    if !read_segs(mem, readable, 16, &mut raw) {
        return Action::Status(S_IOERR);
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut unmap = true;
    for r in raw.chunks_exact(RANGE_LEN as usize) {
        let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
        let allowed = if write_zeroes {
            WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Action::Status(S_UNSUPP);
        }
        unmap &= flags & WRITE_ZEROES_FLAG_UNMAP != 0;
        let len = u64::from(sectors) * SECTOR;
        let Some(offset) = sector
            .checked_mul(SECTOR)
            .filter(|off| off.checked_add(len).is_some_and(|end| end <= capacity))
        else {
            return Action::Status(S_IOERR);
        };
        if sectors == 0 || sectors > MAX_RANGE_SECTORS {
            return Action::Status(S_IOERR);
        }
        ranges.push((offset, len));
    }
    if write_zeroes {
        Action::WriteZeroes { ranges, unmap }
    } else {
        Action::Discard { ranges }
    }
}

/// Validates a chain and turns it into a [`Pending`] request. Never touches the disk.
fn parse_chain(
    mem: &GuestMemoryMmap,
    head: u16,
    descs: &[Descriptor],
    capacity: u64,
    caps: Caps,
) -> Pending {
    let broken = |head| Pending {
        head,
        status_at: None,
        action: Action::Status(S_IOERR),
        buf: Vec::new(),
    };
    // A chain that stops at a descriptor still pointing on was cut short: a loop, a `next`
    // outside the table, or a table outside memory.
    match descs.last() {
        None => return broken(head),
        Some(d) if d.has_next() => return broken(head),
        Some(_) => {}
    }
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut bytes = 0u64;
    let mut valid = true;
    for d in descs {
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(seg);
        } else if !writable.is_empty() {
            // Device-readable after device-writable.
            valid = false;
        } else {
            readable.push(seg);
        }
        bytes = bytes.saturating_add(u64::from(d.len()));
        if !GuestMemoryBackend::check_range(mem, seg.addr, seg.len as usize) {
            valid = false;
        }
    }
    // The status byte is the last byte of the writable part.
    let Some(last) = writable.last_mut() else {
        return broken(head);
    };
    if last.len == 0 {
        return broken(head);
    }
    last.len -= 1;
    let status_at = GuestAddress(last.addr.0.wrapping_add(u64::from(last.len)));
    if !GuestMemoryBackend::check_range(mem, status_at, 1) {
        return broken(head);
    }
    let fail = |status| Pending {
        head,
        status_at: Some(status_at),
        action: Action::Status(status),
        buf: Vec::new(),
    };
    // 16 bytes of header plus the data; the bound keeps allocations small whatever the guest says.
    if !valid || bytes > MAX_REQUEST_BYTES + 17 {
        return fail(S_IOERR);
    }
    let mut header = [0u8; 16];
    if total(&readable) < 16 || !read_segs(mem, &readable, 0, &mut header) {
        return fail(S_IOERR);
    }
    let typ = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let out_len = total(&readable) - 16;
    // The data segments of a write: the readable part after the header.
    let out_segs = || {
        let mut segs = Vec::new();
        let mut skip = 16u64;
        for s in &readable {
            let len = u64::from(s.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            segs.push(Segment {
                addr: GuestAddress(s.addr.0 + skip),
                len: (len - skip) as u32,
            });
            skip = 0;
        }
        segs
    };
    let in_segs: Vec<Segment> = writable.iter().copied().filter(|s| s.len > 0).collect();
    let in_len = total(&in_segs);
    let range = |len: u64| {
        sector.checked_mul(SECTOR).filter(|off| {
            len > 0 && len % SECTOR == 0 && off.checked_add(len).is_some_and(|end| end <= capacity)
        })
    };
    let action = match typ {
        req::IN => match range(in_len) {
            Some(offset) if out_len == 0 => Action::Read {
                offset,
                segs: in_segs,
            },
            _ => Action::Status(S_IOERR),
        },
        req::OUT => match range(out_len) {
            Some(_) if caps.read_only => Action::Status(S_IOERR),
            Some(offset) if in_len == 0 => Action::Write {
                offset,
                segs: out_segs(),
            },
            _ => Action::Status(S_IOERR),
        },
        req::FLUSH if out_len == 0 && in_len == 0 => Action::Flush,
        req::FLUSH => Action::Status(S_IOERR),
        req::GET_ID if out_len == 0 && in_len > 0 => Action::GetId { segs: in_segs },
        req::GET_ID => Action::Status(S_IOERR),
        req::DISCARD if caps.discard => {
            parse_ranges(mem, &readable, out_len, in_len, capacity, false)
        }
        req::WRITE_ZEROES if caps.write_zeroes => {
            parse_ranges(mem, &readable, out_len, in_len, capacity, true)
        }
        _ => Action::Status(S_UNSUPP),
    };
    if let Action::Status(s) = action {
        return fail(s);
    }
    Pending {
        head,
        status_at: Some(status_at),
        action,
        buf: Vec::new(),
    }
}

/// Where a transport records the chains a queue takes and returns, and which chains it must
/// serve again (vhost-user's inflight tracking across a backend restart). The reference VMM
/// keeps no such record ([`NoTracking`]).
pub trait QueueTracker {
    /// The next chain to serve before the available ring: one taken by an earlier backend and
    /// never returned. `None` once there are none left.
    fn resubmit(&mut self) -> Option<u16> {
        None
    }
    /// A chain with this head was taken from the available ring.
    fn fetched(&mut self, head: u16) {
        let _ = head;
    }
    /// The chain is about to be returned through the used ring.
    fn returning(&mut self, head: u16) {
        let _ = head;
    }
    /// The chain was returned; the device's used index is now `used_idx`.
    fn returned(&mut self, head: u16, used_idx: u16) {
        let _ = (head, used_idx);
    }
}

/// No tracking.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTracking;

impl QueueTracker for NoTracking {}

/// The descriptors of the chain at `head` in the queue's table (following an indirect table), as
/// the queue's own iterator yields them for a popped chain: it stops after as many descriptors as
/// the table holds, at a `next` outside the table and at a descriptor outside guest memory, and
/// the last descriptor returned then still has its `next` flag set, which
/// [`parse_chain`] treats as a cut chain.
fn chain_at(queue: &Queue, mem: &GuestMemoryMmap, head: u16) -> Vec<Descriptor> {
    const F_NEXT: u16 = 1;
    const F_INDIRECT: u16 = 4;
    let cut = |mut descs: Vec<Descriptor>| {
        descs.push(Descriptor::new(0, 0, F_NEXT, 0));
        descs
    };
    let mut descs = Vec::new();
    let mut table = GuestAddress(queue.desc_table());
    let mut size = queue.size();
    let mut index = head;
    let mut indirect = false;
    loop {
        if index >= size || descs.len() >= usize::from(size) {
            return cut(descs);
        }
        let Some(at) = table.0.checked_add(u64::from(index) * 16) else {
            return cut(descs);
        };
        let Ok(d) = mem.read_obj::<Descriptor>(GuestAddress(at)) else {
            return cut(descs);
        };
        if d.flags() & F_INDIRECT != 0 {
            // One indirect table per chain, as its only descriptor of the top level.
            if indirect
                || !descs.is_empty()
                || d.has_next()
                || d.len() % 16 != 0
                || d.len() == 0
                || d.len() / 16 > u32::from(u16::MAX)
            {
                return cut(descs);
            }
            indirect = true;
            table = d.addr();
            size = (d.len() / 16) as u16;
            index = 0;
            continue;
        }
        let next = d.has_next();
        index = d.next();
        descs.push(d);
        if !next {
            return descs;
        }
    }
}

/// Whether the driver's available index is more than a queue ahead of the device's (or cannot be
/// read): a broken ring, from which nothing can be popped.
fn avail_index_broken(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => idx.0.wrapping_sub(queue.next_avail()) > queue.size(),
        Err(_) => true,
    }
}

/// A virtio-blk device serving a vstor stack.
pub struct Block {
    disk: Arc<dyn BlockDevice>,
    caps: Caps,
    /// The stack's discards read back as zeroes (so a write-zeroes with UNMAP may discard).
    discard_zeroes: bool,
    /// In bytes; it changes when the disk is resized ([`Block::set_capacity`]).
    capacity: AtomicU64,
    block_size: u32,
    id: [u8; ID_LEN],
    /// The driver negotiated FLUSH; without it the device is write-through (flushes every write).
    flush_negotiated: AtomicBool,
    /// The `writeback` configuration field: with FLUSH negotiated, 1 keeps writes in the cache
    /// until a flush, 0 makes the device write-through (CONFIG_WCE lets the driver change it).
    writeback: AtomicBool,
    /// The driver negotiated EVENT_IDX.
    event_idx: AtomicBool,
    queue_sizes: Vec<u16>,
    counters: Counters,
    /// The daemon's export whose statistics count every request (none in the reference VMM).
    export: Option<Arc<Export>>,
}

/// Request counters of a device (all requests since it was created).
#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    /// Times a queue was served (one per notification the device acted on).
    serves: AtomicU64,
    /// Times serving a queue ended with a used-buffer interrupt for the driver.
    interrupts: AtomicU64,
    /// Chains returned through the used ring, per queue.
    per_queue: Vec<AtomicU64>,
}

/// A snapshot of a device's request counters ([`Block::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Reads completed successfully.
    pub reads: u64,
    /// Writes completed successfully.
    pub writes: u64,
    /// Flushes completed successfully.
    pub flushes: u64,
    /// Discard requests completed successfully.
    pub discards: u64,
    /// Write-zeroes requests completed successfully.
    pub write_zeroes: u64,
    /// Bytes read by successful reads.
    pub bytes_read: u64,
    /// Bytes written by successful writes.
    pub bytes_written: u64,
    /// Requests that completed with an error or were refused (any status but OK).
    pub errors: u64,
    /// Times a queue was served: one per notification the device acted on (with EVENT_IDX a
    /// notification can cover many requests).
    pub serves: u64,
    /// Used-buffer interrupts the device asked for (with EVENT_IDX only those the driver wanted).
    pub interrupts: u64,
}

impl Block {
    /// A block device over `disk` with one request queue; `id` is the GET_ID string (cut to 20
    /// bytes). The device is read-only when the stack is or when `read_only` is set.
    pub fn new(disk: Arc<dyn BlockDevice>, read_only: bool, id: &str) -> Self {
        Self::with_queues(disk, read_only, id, 1)
    }

    /// A block device with `queues` request queues (1 to [`MAX_QUEUES`]; out-of-range values are
    /// clamped). With more than one it offers VIRTIO_BLK_F_MQ and `num_queues`.
    pub fn with_queues(
        disk: Arc<dyn BlockDevice>,
        read_only: bool,
        id: &str,
        queues: usize,
    ) -> Self {
        let queues = queues.clamp(1, MAX_QUEUES);
        let info = disk.info();
        let mut ident = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        ident[..n].copy_from_slice(&id.as_bytes()[..n]);
        let read_only = read_only || info.read_only;
        Block {
            caps: Caps {
                read_only,
                discard: info.supports.discard && !read_only,
                write_zeroes: info.supports.write_zeroes && !read_only,
            },
            discard_zeroes: info.discard_zeroes && info.supports.discard,
            capacity: AtomicU64::new(info.capacity),
            block_size: info.logical_sector_size.max(512),
            disk,
            id: ident,
            flush_negotiated: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            queue_sizes: vec![QUEUE_SIZE; queues],
            counters: Counters {
                per_queue: (0..queues).map(|_| AtomicU64::new(0)).collect(),
                ..Counters::default()
            },
            export: None,
        }
    }

    /// Counts every request in `export`'s statistics as well (requests, bytes, errors, in
    /// flight), as the daemon's transports do.
    pub fn with_export(mut self, export: Arc<Export>) -> Self {
        self.export = Some(export);
        self
    }

    /// The request counters.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            reads: get(&c.reads),
            writes: get(&c.writes),
            flushes: get(&c.flushes),
            discards: get(&c.discards),
            write_zeroes: get(&c.write_zeroes),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            errors: get(&c.errors),
            serves: get(&c.serves),
            interrupts: get(&c.interrupts),
        }
    }

    /// Chains returned through the used ring so far, per queue.
    pub fn queue_requests(&self) -> Vec<u64> {
        self.counters
            .per_queue
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// The number of request queues.
    pub fn queues(&self) -> usize {
        self.queue_sizes.len()
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.caps.read_only
    }

    fn count(&self, action: &Action, status: u8) {
        let c = &self.counters;
        let add = |a: &AtomicU64, n: u64| {
            a.fetch_add(n, Ordering::Relaxed);
        };
        if status != S_OK {
            add(&c.errors, 1);
            return;
        }
        match action {
            Action::Read { segs, .. } => {
                add(&c.reads, 1);
                add(&c.bytes_read, total(segs));
            }
            Action::Write { segs, .. } => {
                add(&c.writes, 1);
                add(&c.bytes_written, total(segs));
            }
            Action::Flush => add(&c.flushes, 1),
            Action::Discard { .. } => add(&c.discards, 1),
            Action::WriteZeroes { .. } => add(&c.write_zeroes, 1),
            Action::GetId { .. } | Action::Status(_) => {}
        }
    }

    /// The disk under the device.
    pub fn disk(&self) -> &Arc<dyn BlockDevice> {
        &self.disk
    }

    /// The capacity in bytes the device reports.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Sets the capacity the device reports (after the disk was resized); the transport then
    /// tells the driver with a configuration-change interrupt.
    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes, Ordering::Release);
    }

    /// Whether writes are made durable before they complete (no write-back cache in effect).
    pub fn write_through(&self) -> bool {
        !(self.flush_negotiated.load(Ordering::Acquire) && self.writeback.load(Ordering::Acquire))
    }

    /// The configuration space (virtio spec 5.2.4), up to `write_zeroes_may_unmap`.
    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(self.capacity() / SECTOR).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&self.block_size.to_le_bytes());
        c[32] = u8::from(self.writeback.load(Ordering::Acquire));
        c[34..36].copy_from_slice(&(self.queue_sizes.len() as u16).to_le_bytes());
        let align = self.block_size / SECTOR as u32;
        if self.caps.discard {
            c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&MAX_RANGES.to_le_bytes());
            c[44..48].copy_from_slice(&align.to_le_bytes());
        }
        if self.caps.write_zeroes {
            c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&MAX_RANGES.to_le_bytes());
            c[56] = u8::from(self.discard_zeroes);
        }
        c
    }

    /// Runs a batch of validated requests on the disk and completes each in guest memory.
    fn run_batch(&self, mem: &GuestMemoryMmap, pending: &mut [Pending]) {
        // Gather: fill write buffers from guest memory, size read buffers.
        for p in pending.iter_mut() {
            match &p.action {
                Action::Read { segs, .. } => p.buf = vec![0u8; total(segs) as usize],
                Action::Write { segs, .. } => {
                    p.buf = vec![0u8; total(segs) as usize];
                    if !read_segs(mem, segs, 0, &mut p.buf) {
                        p.action = Action::Status(S_IOERR);
                    }
                }
                _ => {}
            }
        }
        let writes = pending.iter().any(|p| {
            matches!(
                p.action,
                Action::Write { .. } | Action::Discard { .. } | Action::WriteZeroes { .. }
            )
        });
        // The export's statistics see each request from here to its result.
        let in_flight: Vec<Option<InFlight<'_>>> = match &self.export {
            Some(export) => pending
                .iter()
                .map(|p| match &p.action {
                    Action::Read { segs, .. } => Some(export.begin(OpKind::Read, total(segs))),
                    Action::Write { segs, .. } => Some(export.begin(OpKind::Write, total(segs))),
                    Action::Flush => Some(export.begin(OpKind::Flush, 0)),
                    Action::Discard { .. } => Some(export.begin(OpKind::Discard, 0)),
                    Action::WriteZeroes { .. } => Some(export.begin(OpKind::WriteZeroes, 0)),
                    _ => None,
                })
                .collect(),
            None => Vec::new(),
        };
        // One batch down the stack; a trailing flush when the device is write-through.
        let mut slots = Vec::with_capacity(pending.len());
        let mut batch: Vec<Request<'_>> = Vec::with_capacity(pending.len() + 1);
        for (i, p) in pending.iter_mut().enumerate() {
            match &p.action {
                Action::Read { offset, .. } => batch.push(Request::read(*offset, &mut p.buf)),
                Action::Write { offset, .. } => batch.push(Request::write(*offset, &p.buf)),
                Action::Flush => batch.push(Request::flush()),
                Action::Discard { ranges } => {
                    for &(off, len) in ranges {
                        slots.push(i);
                        batch.push(Request::discard(off, len));
                    }
                    continue;
                }
                Action::WriteZeroes { ranges, unmap } => {
                    let discard = *unmap && self.discard_zeroes;
                    for &(off, len) in ranges {
                        slots.push(i);
                        batch.push(if discard {
                            Request::discard(off, len)
                        } else {
                            Request::write_zeroes(off, len)
                        });
                    }
                    continue;
                }
                _ => continue,
            };
            slots.push(i);
        }
        let write_through = writes && self.write_through();
        if write_through {
            batch.push(Request::flush());
        }
        if !batch.is_empty() {
            self.disk.submit(&mut batch);
        }
        let through_ok = !write_through || batch.last().is_some_and(|r| r.result().is_ok());
        let results: Vec<bool> = batch.iter().map(|r| r.result().is_ok()).collect();
        drop(batch);
        for (&i, ok) in slots.iter().zip(results) {
            let p = &mut pending[i];
            let is_write = matches!(
                p.action,
                Action::Write { .. } | Action::Discard { .. } | Action::WriteZeroes { .. }
            );
            if !ok || (is_write && !through_ok) {
                p.action = Action::Status(S_IOERR);
            }
        }
        for (p, f) in pending.iter().zip(in_flight) {
            if let Some(f) = f {
                f.done(!matches!(p.action, Action::Status(_)));
            }
        }
    }

    /// Writes back read data and status bytes, returning the bytes written into each chain.
    fn complete(&self, mem: &GuestMemoryMmap, p: &Pending) -> u32 {
        let Some(status_at) = p.status_at else {
            return 0;
        };
        let (status, data_len) = match &p.action {
            Action::Read { segs, .. } => {
                if write_segs(mem, segs, &p.buf) {
                    (S_OK, p.buf.len())
                } else {
                    (S_IOERR, 0)
                }
            }
            Action::GetId { segs } => {
                let n = (total(segs) as usize).min(ID_LEN);
                if write_segs(mem, segs, &self.id[..n]) {
                    (S_OK, n)
                } else {
                    (S_IOERR, 0)
                }
            }
            Action::Write { .. }
            | Action::Flush
            | Action::Discard { .. }
            | Action::WriteZeroes { .. } => (S_OK, 0),
            Action::Status(s) => (*s, 0),
        };
        self.count(&p.action, status);
        if mem.write_obj(status, status_at).is_err() {
            return 0;
        }
        data_len as u32 + 1
    }

    /// Pops up to a batch of chains and serves them; returns how many were returned through the
    /// used ring, or `None` when the used ring cannot be written.
    fn serve_batch(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        tracker: &mut dyn QueueTracker,
    ) -> Option<usize> {
        let capacity = self.capacity();
        let mut pending = Vec::new();
        let mut buffered = 0u64;
        while pending.len() < BATCH_MAX && buffered < BATCH_BYTES {
            // Chains taken before a reconnect and never returned go first, in the order they
            // were taken; then the available ring.
            let (head, descs) = if let Some(head) = tracker.resubmit() {
                (head, chain_at(queue, mem, head))
            } else {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                tracker.fetched(head);
                // The iterator stops after as many descriptors as the table has (a loop) and at
                // a `next` outside the table; `parse_chain` sees the cut.
                (head, chain.collect::<Vec<Descriptor>>())
            };
            let p = parse_chain(mem, head, &descs, capacity, self.caps);
            buffered += match &p.action {
                Action::Read { segs, .. } | Action::Write { segs, .. } => total(segs),
                _ => 0,
            };
            pending.push(p);
        }
        self.run_batch(mem, &mut pending);
        for p in &pending {
            let len = self.complete(mem, p);
            tracker.returning(p.head);
            queue.add_used(mem, p.head, len).ok()?;
            tracker.returned(p.head, queue.next_used());
        }
        Some(pending.len())
    }
}

/// What a transport asks of the device (the reference VMM's `VirtioDevice` trait forwards here).
impl Block {
    /// The virtio device ID (2).
    pub fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    /// The device-specific feature bits offered (without VERSION_1, which the transport adds).
    pub fn features(&self) -> u64 {
        let mut f = feature::SIZE_MAX
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::FLUSH
            | feature::CONFIG_WCE
            | F_EVENT_IDX;
        if self.caps.read_only {
            f |= feature::RO;
        }
        if self.caps.discard {
            f |= feature::DISCARD;
        }
        if self.caps.write_zeroes {
            f |= feature::WRITE_ZEROES;
        }
        if self.queue_sizes.len() > 1 {
            f |= feature::MQ;
        }
        f
    }

    /// The most descriptors each request queue may have.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// Reads from the configuration space (bytes past its end read as zero).
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes to the configuration space; `driver_features`: what the driver acknowledged so
    /// far. Fields that are not writable ignore the write.
    pub fn write_config(&self, driver_features: u64, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only once CONFIG_WCE is negotiated; a value other
        // than 0 or 1 is ignored.
        if driver_features & feature::CONFIG_WCE != 0 && offset == CONFIG_WRITEBACK {
            if let [v @ (0 | 1)] = data {
                self.writeback.store(*v == 1, Ordering::Release);
            }
        }
    }

    /// The driver finished feature negotiation with these features.
    pub fn activate(&self, features: u64) {
        self.flush_negotiated
            .store(features & feature::FLUSH != 0, Ordering::Release);
        self.event_idx
            .store(features & F_EVENT_IDX != 0, Ordering::Release);
    }

    /// The driver reset the device.
    pub fn reset(&self) {
        self.flush_negotiated.store(false, Ordering::Release);
        self.writeback.store(true, Ordering::Release);
        self.event_idx.store(false, Ordering::Release);
    }

    /// Serves the available chains of queue `index`; returns whether the driver should be
    /// interrupted (chains were used and, with EVENT_IDX, the driver asked for it here).
    pub fn process_queue(&self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        self.process_queue_tracked(index, queue, mem, &mut NoTracking)
    }

    /// [`process_queue`](Self::process_queue) telling `tracker` about every chain taken and
    /// returned, and serving the chains it hands back for resubmission first.
    pub fn process_queue_tracked(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        tracker: &mut dyn QueueTracker,
    ) -> bool {
        let interrupt = self.serve_queue(queue, mem, tracker);
        let c = &self.counters;
        c.serves.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = c.per_queue.get(index) {
            n.fetch_add(interrupt.0 as u64, Ordering::Relaxed);
        }
        if interrupt.1 {
            c.interrupts.fetch_add(1, Ordering::Relaxed);
        }
        interrupt.1
    }
}

impl Block {
    /// Drains a queue; returns the chains used and whether the driver wants an interrupt.
    fn serve_queue(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        tracker: &mut dyn QueueTracker,
    ) -> (usize, bool) {
        let mut used = 0usize;
        loop {
            // No notifications while we drain the ring; re-enabling them tells us whether more
            // chains arrived meanwhile (with EVENT_IDX it also publishes `avail_event`).
            if queue.disable_notification(mem).is_err() {
                break;
            }
            loop {
                match self.serve_batch(queue, mem, tracker) {
                    Some(0) => break,
                    Some(n) => used += n,
                    // The used ring is not in guest memory any more: nothing more can be done
                    // for this queue until the driver sets it up again.
                    None => return (used, used > 0),
                }
            }
            match queue.enable_notification(mem) {
                // More chains arrived while we drained the ring: serve them, unless the driver's
                // available index is more than a queue ahead of ours: then no chain can be popped
                // and going round again would spin forever (found by the virtio_blk fuzz target).
                Ok(true) if !avail_index_broken(queue, mem) => continue,
                _ => break,
            }
        }
        // With EVENT_IDX the driver says from which used index on it wants an interrupt.
        (
            used,
            used > 0 && queue.needs_notification(mem).unwrap_or(true),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vstor_core::MemoryDevice;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    /// A descriptor: address, length, flags, next.
    type Desc = (u64, u32, u16, u16);

    struct Harness {
        mem: GuestMemoryMmap,
        disk: Arc<MemoryDevice>,
        block: Block,
    }

    fn harness(read_only: bool) -> Harness {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let disk = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let block = Block::new(disk.clone(), read_only, "vstor-test");
        block.activate(feature::FLUSH);
        Harness { mem, disk, block }
    }

    /// Runs one chain (descriptors as (addr, len, flags, next)) and returns (used len, status).
    fn run(h: &mut Harness, typ: u32, sector: u64, descs: &[Desc]) -> (u32, u8) {
        let vq = MockSplitQueue::new(&h.mem, 16);
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&typ.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        h.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            vq.desc_table().store(i as u16, d).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(h.block.process_queue(0, &mut q, &h.mem));
        let used = vq.used().ring().ref_at(0).unwrap().load();
        let status: u8 = h.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (used.len(), status)
    }

    fn chain(data_len: u32, data_flags: u16) -> Vec<Desc> {
        vec![
            (HDR, 16, F_NEXT, 1),
            (DATA, data_len, data_flags | F_NEXT, 2),
            (STATUS, 1, F_WRITE, 0),
        ]
    }

    #[test]
    fn write_then_read_back() {
        let mut h = harness(false);
        h.mem
            .write_slice(&[0x5a; 4096], GuestAddress(DATA))
            .unwrap();
        assert_eq!(run(&mut h, req::OUT, 8, &chain(4096, 0)), (1, S_OK));
        let mut disk = [0u8; 4096];
        h.disk.read_at(8 * 512, &mut disk).unwrap();
        assert_eq!(disk, [0x5a; 4096]);
        h.mem.write_slice(&[0; 4096], GuestAddress(DATA)).unwrap();
        assert_eq!(run(&mut h, req::IN, 8, &chain(4096, F_WRITE)), (4097, S_OK));
        let mut back = [0u8; 4096];
        h.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0x5a; 4096]);
        let flush = [(HDR, 16, F_NEXT, 1), (STATUS, 1, F_WRITE, 0)];
        assert_eq!(run(&mut h, req::FLUSH, 0, &flush), (1, S_OK));
    }

    #[test]
    fn header_data_and_status_in_odd_framing() {
        // Header and data in one readable descriptor; data and status in one writable one.
        let mut h = harness(false);
        h.mem
            .write_slice(&[7; 512], GuestAddress(HDR + 16))
            .unwrap();
        let descs = [(HDR, 16 + 512, F_NEXT, 1), (STATUS, 1, F_WRITE, 0)];
        assert_eq!(run(&mut h, req::OUT, 1, &descs), (1, S_OK));
        let descs = [(HDR, 16, F_NEXT, 1), (DATA, 513, F_WRITE, 0)];
        let vq_status_at = DATA + 512;
        h.mem.write_obj(0xffu8, GuestAddress(vq_status_at)).unwrap();
        let (len, _) = run(&mut h, req::IN, 1, &descs);
        assert_eq!(len, 513);
        let status: u8 = h.mem.read_obj(GuestAddress(vq_status_at)).unwrap();
        assert_eq!(status, S_OK);
        let mut back = [0u8; 512];
        h.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [7; 512]);
    }

    #[test]
    fn get_id_and_unsupported() {
        let mut h = harness(false);
        assert_eq!(run(&mut h, req::GET_ID, 0, &chain(20, F_WRITE)), (21, S_OK));
        let mut id = [0u8; 10];
        h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"vstor-test");
        assert_eq!(run(&mut h, 0x77, 0, &chain(512, F_WRITE)), (1, S_UNSUPP));
    }

    #[test]
    fn malformed_chains_get_an_io_error() {
        let mut h = harness(false);
        let cases: Vec<(&str, u32, u64, Vec<Desc>)> = vec![
            ("past the end", req::IN, 2048, chain(512, F_WRITE)),
            ("unaligned length", req::IN, 0, chain(100, F_WRITE)),
            (
                "outside RAM",
                req::IN,
                0,
                vec![
                    (HDR, 16, F_NEXT, 1),
                    (0xffff_0000, 512, F_WRITE | F_NEXT, 2),
                    (STATUS, 1, F_WRITE, 0),
                ],
            ),
            ("wrong direction", req::IN, 0, chain(512, 0)),
            (
                "write with a writable buffer",
                req::OUT,
                0,
                chain(512, F_WRITE),
            ),
            (
                "short header",
                req::IN,
                0,
                vec![
                    (HDR, 8, F_NEXT, 1),
                    (DATA, 512, F_WRITE | F_NEXT, 2),
                    (STATUS, 1, F_WRITE, 0),
                ],
            ),
            (
                "readable after writable",
                req::OUT,
                0,
                vec![
                    (HDR, 16, F_NEXT, 1),
                    (DATA, 512, F_WRITE | F_NEXT, 2),
                    (DATA, 512, F_NEXT, 3),
                    (STATUS, 1, F_WRITE, 0),
                ],
            ),
            ("absurd length", req::IN, 0, chain(0xffff_f000, F_WRITE)),
            (
                "over the request bound",
                req::IN,
                0,
                chain((MAX_REQUEST_BYTES + 512) as u32, F_WRITE),
            ),
            ("flush with data", req::FLUSH, 0, chain(512, 0)),
        ];
        for (what, typ, sector, descs) in cases {
            assert_eq!(run(&mut h, typ, sector, &descs), (1, S_IOERR), "{what}");
        }
    }

    #[test]
    fn broken_chains_are_returned_untouched() {
        let mut h = harness(false);
        let looped = vec![
            (HDR, 16, F_NEXT, 1),
            (DATA, 512, F_WRITE | F_NEXT, 2),
            (STATUS, 1, F_WRITE | F_NEXT, 1),
        ];
        assert_eq!(run(&mut h, req::IN, 0, &looped), (0, 0xff));
        let out_of_table = vec![(HDR, 16, F_NEXT, 1), (DATA, 512, F_WRITE | F_NEXT, 200)];
        assert_eq!(run(&mut h, req::IN, 0, &out_of_table), (0, 0xff));
        let no_status = vec![
            (HDR, 16, F_NEXT, 1),
            (DATA, 512, F_NEXT, 2),
            (STATUS, 1, 0, 0),
        ];
        assert_eq!(run(&mut h, req::OUT, 0, &no_status), (0, 0xff));
        // The status byte outside RAM.
        let bad_status = vec![(HDR, 16, F_NEXT, 1), (0xffff_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&mut h, req::FLUSH, 0, &bad_status), (0, 0xff));
    }

    #[test]
    fn read_only_refuses_writes() {
        let mut h = harness(true);
        assert_ne!(h.block.features() & feature::RO, 0);
        assert_eq!(run(&mut h, req::OUT, 0, &chain(512, 0)), (1, S_IOERR));
        assert_eq!(run(&mut h, req::IN, 0, &chain(512, F_WRITE)), (513, S_OK));
    }

    #[test]
    fn config_space_reads() {
        let h = harness(false);
        let mut cap = [0u8; 8];
        h.block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        let mut bs = [0u8; 4];
        h.block.read_config(20, &mut bs);
        assert_eq!(u32::from_le_bytes(bs), 512);
        let mut past = [9u8; 4];
        h.block.read_config(u64::MAX - 1, &mut past);
        assert_eq!(past, [0; 4]);
    }

    /// Writes discard/write-zeroes ranges (sector, sectors, flags) at DATA; returns the chain.
    fn ranges(h: &Harness, list: &[(u64, u32, u32)]) -> Vec<Desc> {
        let mut raw = Vec::new();
        for &(sector, n, flags) in list {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&n.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        h.mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
        chain(raw.len() as u32, 0)
    }

    #[test]
    fn write_zeroes_and_discard() {
        let mut h = harness(false);
        let f = h.block.features();
        assert_ne!(f & feature::DISCARD, 0);
        assert_ne!(f & feature::WRITE_ZEROES, 0);
        h.disk.write_at(0, &[0x5a; 16 * 512]).unwrap();
        // Two ranges in one request: sectors 2..4 and 8.
        let c = ranges(&h, &[(2, 2, 0), (8, 1, 0)]);
        assert_eq!(run(&mut h, req::WRITE_ZEROES, 0, &c), (1, S_OK));
        let mut back = [0u8; 16 * 512];
        h.disk.read_at(0, &mut back).unwrap();
        for (i, chunk) in back.chunks(512).enumerate() {
            let zero = matches!(i, 2 | 3 | 8);
            assert!(
                chunk.iter().all(|&b| b == if zero { 0 } else { 0x5a }),
                "{i}"
            );
        }
        // With UNMAP (the memory device's discards read as zeroes, so it is discarded).
        let c = ranges(&h, &[(10, 2, WRITE_ZEROES_FLAG_UNMAP)]);
        assert_eq!(run(&mut h, req::WRITE_ZEROES, 0, &c), (1, S_OK));
        h.disk.read_at(10 * 512, &mut back[..1024]).unwrap();
        assert!(back[..1024].iter().all(|&b| b == 0));
        let c = ranges(&h, &[(12, 4, 0)]);
        assert_eq!(run(&mut h, req::DISCARD, 0, &c), (1, S_OK));
        // Refusals.
        type Case = (&'static str, u32, Vec<(u64, u32, u32)>, u8);
        let cases: Vec<Case> = vec![
            (
                "discard with UNMAP",
                req::DISCARD,
                vec![(0, 1, 1)],
                S_UNSUPP,
            ),
            ("unknown flag", req::WRITE_ZEROES, vec![(0, 1, 2)], S_UNSUPP),
            (
                "past the end",
                req::WRITE_ZEROES,
                vec![(2047, 2, 0)],
                S_IOERR,
            ),
            (
                "sector overflow",
                req::DISCARD,
                vec![(u64::MAX / 4, 1, 0)],
                S_IOERR,
            ),
            ("empty range", req::DISCARD, vec![(0, 0, 0)], S_IOERR),
            (
                "range over the limit",
                req::WRITE_ZEROES,
                vec![(0, MAX_RANGE_SECTORS + 1, 0)],
                S_IOERR,
            ),
            (
                "too many ranges",
                req::DISCARD,
                vec![(0, 1, 0); MAX_RANGES as usize + 1],
                S_IOERR,
            ),
        ];
        for (what, typ, list, want) in cases {
            let c = ranges(&h, &list);
            assert_eq!(run(&mut h, typ, 0, &c), (1, want), "{what}");
        }
        // A length that is not a whole number of ranges, and no ranges at all.
        assert_eq!(run(&mut h, req::DISCARD, 0, &chain(20, 0)), (1, S_IOERR));
        let bare = [(HDR, 16, F_NEXT, 1), (STATUS, 1, F_WRITE, 0)];
        assert_eq!(run(&mut h, req::WRITE_ZEROES, 0, &bare), (1, S_IOERR));
        // Nothing but sectors 2, 3, 8, 10, 11 (and the discarded 12..16) changed.
        h.disk.read_at(0, &mut back[..1024]).unwrap();
        assert!(back[..1024].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn read_only_offers_neither_discard_nor_write_zeroes() {
        let mut h = harness(true);
        let f = h.block.features();
        assert_eq!(f & (feature::DISCARD | feature::WRITE_ZEROES), 0);
        let c = ranges(&h, &[(0, 1, 0)]);
        assert_eq!(run(&mut h, req::WRITE_ZEROES, 0, &c), (1, S_UNSUPP));
        assert_eq!(run(&mut h, req::DISCARD, 0, &c), (1, S_UNSUPP));
    }

    /// A memory device that counts the flushes it is sent.
    struct CountingFlushes {
        inner: MemoryDevice,
        flushes: std::sync::atomic::AtomicUsize,
    }

    impl BlockDevice for CountingFlushes {
        fn info(&self) -> vstor_core::DeviceInfo {
            self.inner.info()
        }
        fn submit(&self, batch: &mut [Request<'_>]) {
            let n = batch
                .iter()
                .filter(|r| r.kind() == vstor_core::OpKind::Flush)
                .count();
            self.flushes.fetch_add(n, Ordering::SeqCst);
            self.inner.submit(batch)
        }
    }

    #[test]
    fn config_wce_switches_between_write_back_and_write_through() {
        let counting = Arc::new(CountingFlushes {
            inner: MemoryDevice::new(1 << 20).unwrap(),
            flushes: Default::default(),
        });
        let mut h = harness(false);
        h.block = Block::new(counting.clone(), false, "wce");
        assert_ne!(h.block.features() & feature::CONFIG_WCE, 0);
        let acked = feature::FLUSH | feature::CONFIG_WCE;
        h.block.activate(acked);
        let writeback = |b: &Block| {
            let mut v = [9u8];
            b.read_config(CONFIG_WRITEBACK, &mut v);
            v[0]
        };
        assert_eq!(writeback(&h.block), 1);
        assert_eq!(run(&mut h, req::OUT, 0, &chain(512, 0)), (1, S_OK));
        assert_eq!(counting.flushes.load(Ordering::SeqCst), 0, "write-back");
        // Without CONFIG_WCE negotiated, or with a value other than 0/1, nothing changes.
        h.block.write_config(feature::FLUSH, CONFIG_WRITEBACK, &[0]);
        h.block.write_config(acked, CONFIG_WRITEBACK, &[7]);
        h.block.write_config(acked, CONFIG_WRITEBACK - 1, &[0]);
        assert_eq!(writeback(&h.block), 1);
        h.block.write_config(acked, CONFIG_WRITEBACK, &[0]);
        assert_eq!(writeback(&h.block), 0);
        assert!(h.block.write_through());
        assert_eq!(run(&mut h, req::OUT, 0, &chain(512, 0)), (1, S_OK));
        assert_eq!(counting.flushes.load(Ordering::SeqCst), 1, "write-through");
        // A reset brings write-back back (for a driver that negotiates FLUSH again).
        h.block.reset();
        assert_eq!(writeback(&h.block), 1);
        // A driver without FLUSH gets write-through whatever the field says.
        h.block.activate(0);
        assert!(h.block.write_through());
    }

    #[test]
    fn event_idx_suppresses_interrupts_until_used_event() {
        // The rings are laid out by hand (the mock queue's used ring overlaps its avail ring's
        // `used_event`): descriptors at 0x1000, avail ring at 0x2000, used ring at 0x3000.
        let h = harness(false);
        h.block.activate(feature::FLUSH | F_EVENT_IDX);
        let (desc, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&req::FLUSH.to_le_bytes());
        h.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        let flush = [(HDR, 16, F_NEXT, 1), (STATUS, 1, F_WRITE, 0)];
        for (i, &(addr, len, flags, next)) in flush.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            h.mem
                .write_obj(d, GuestAddress(desc + 16 * i as u64))
                .unwrap();
        }
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        q.set_event_idx(true);
        let used_event = GuestAddress(avail + 4 + 2 * 16);
        let avail_event = GuestAddress(used + 4 + 8 * 16);
        let mut interrupts = Vec::new();
        for n in 1..=4u16 {
            let slot = GuestAddress(avail + 4 + 2 * u64::from(n - 1));
            h.mem.write_obj(0u16.to_le(), slot).unwrap();
            h.mem.write_obj(n.to_le(), GuestAddress(avail + 2)).unwrap();
            // The driver wants an interrupt once the third chain is used (used_event = 2).
            h.mem.write_obj(2u16.to_le(), used_event).unwrap();
            interrupts.push(h.block.process_queue(0, &mut q, &h.mem));
            // The device publishes where it stopped, so the driver notifies for the next one.
            let seen: u16 = h.mem.read_obj(avail_event).unwrap();
            assert_eq!(u16::from_le(seen), n);
            let used_idx: u16 = h.mem.read_obj(GuestAddress(used + 2)).unwrap();
            assert_eq!(u16::from_le(used_idx), n);
        }
        assert_eq!(interrupts, [false, false, true, false]);
    }
}
