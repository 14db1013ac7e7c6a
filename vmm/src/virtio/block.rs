//! The virtio-blk device model over any vstor stack (`Arc<dyn BlockDevice>`).
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

use super::VirtioDevice;
use std::sync::Arc;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vstor_core::{BlockDevice, Request};

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
}

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
/// `size_max`: the largest segment.
const SIZE_MAX: u32 = 64 * 1024;
/// `seg_max`: the most data segments per request (`SIZE_MAX * SEG_MAX <= MAX_REQUEST_BYTES`).
const SEG_MAX: u32 = 126;
/// Chains served per batch at most (a queue's worth).
const BATCH_MAX: usize = QUEUE_SIZE as usize;
/// Data bytes buffered per batch at most: a batch ends once it holds this much, so a guest that
/// fills its queue with the largest requests costs the VMM 32 MiB, not 256 times 8 MiB.
const BATCH_BYTES: u64 = 32 << 20;
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

/// Validates a chain and turns it into a [`Pending`] request. Never touches the disk.
fn parse_chain(
    mem: &GuestMemoryMmap,
    head: u16,
    descs: &[Descriptor],
    capacity: u64,
    read_only: bool,
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
            Some(_) if read_only => Action::Status(S_IOERR),
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

/// A virtio-blk device serving a vstor stack.
pub struct Block {
    disk: Arc<dyn BlockDevice>,
    read_only: bool,
    capacity: u64,
    block_size: u32,
    id: [u8; ID_LEN],
    /// The driver negotiated FLUSH; without it the device is write-through (flushes every write).
    flush_negotiated: bool,
    queue_sizes: [u16; 1],
}

impl Block {
    /// A block device over `disk`; `id` is the GET_ID string (cut to 20 bytes). The device is
    /// read-only when the stack is or when `read_only` is set.
    pub fn new(disk: Arc<dyn BlockDevice>, read_only: bool, id: &str) -> Self {
        let info = disk.info();
        let mut ident = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        ident[..n].copy_from_slice(&id.as_bytes()[..n]);
        Block {
            read_only: read_only || info.read_only,
            capacity: info.capacity,
            block_size: info.logical_sector_size.max(512),
            disk,
            id: ident,
            flush_negotiated: false,
            queue_sizes: [QUEUE_SIZE],
        }
    }

    /// The configuration space (virtio spec 5.2.4), up to and including `blk_size`.
    fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&(self.capacity / SECTOR).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&self.block_size.to_le_bytes());
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
                Action::GetId { .. } | Action::Flush | Action::Status(_) => {}
            }
        }
        let writes = pending
            .iter()
            .any(|p| matches!(p.action, Action::Write { .. }));
        // One batch down the stack; a trailing flush when the guest did not negotiate FLUSH
        // (write-through).
        let mut slots = Vec::with_capacity(pending.len());
        let mut batch: Vec<Request<'_>> = Vec::with_capacity(pending.len() + 1);
        for (i, p) in pending.iter_mut().enumerate() {
            let r = match &p.action {
                Action::Read { offset, .. } => Request::read(*offset, &mut p.buf),
                Action::Write { offset, .. } => Request::write(*offset, &p.buf),
                Action::Flush => Request::flush(),
                _ => continue,
            };
            slots.push(i);
            batch.push(r);
        }
        let write_through = writes && !self.flush_negotiated;
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
            let ok = ok && (through_ok || !matches!(p.action, Action::Write { .. }));
            if !ok {
                p.action = Action::Status(S_IOERR);
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
            Action::Write { .. } | Action::Flush => (S_OK, 0),
            Action::Status(s) => (*s, 0),
        };
        if mem.write_obj(status, status_at).is_err() {
            return 0;
        }
        data_len as u32 + 1
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        let mut f = feature::SIZE_MAX | feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH;
        if self.read_only {
            f |= feature::RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
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

    fn activate(&mut self, features: u64) {
        self.flush_negotiated = features & feature::FLUSH != 0;
    }

    fn reset(&mut self) {
        self.flush_negotiated = false;
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut any = false;
        loop {
            let mut pending = Vec::new();
            let mut buffered = 0u64;
            while pending.len() < BATCH_MAX && buffered < BATCH_BYTES {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                // The iterator stops after as many descriptors as the table has (a loop) and
                // at a `next` outside the table; `parse_chain` sees the cut.
                let descs: Vec<Descriptor> = chain.collect();
                let p = parse_chain(mem, head, &descs, self.capacity, self.read_only);
                buffered += match &p.action {
                    Action::Read { segs, .. } | Action::Write { segs, .. } => total(segs),
                    _ => 0,
                };
                pending.push(p);
            }
            if pending.is_empty() {
                return any;
            }
            self.run_batch(mem, &mut pending);
            for p in &pending {
                let len = self.complete(mem, p);
                if queue.add_used(mem, p.head, len).is_err() {
                    // The used ring is not in guest memory any more: nothing more can be done
                    // for this queue until the driver sets it up again.
                    return any;
                }
                any = true;
            }
        }
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
        let mut block = Block::new(disk.clone(), read_only, "vstor-test");
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
}
