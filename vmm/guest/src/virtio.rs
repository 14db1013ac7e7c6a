//! A minimal virtio-blk driver over the virtio-mmio transport (virtio 1.x, split virtqueue),
//! written to be read: every step of device initialization is a named step of the virtio spec
//! (section 3.1.1), and every request is one descriptor chain: header, data, status.
//!
//! All memory the device sees (rings, headers, buffers) lives in a DMA window of guest RAM that
//! nothing else uses; guest-physical and virtual addresses are equal (identity mapping).

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

// virtio-mmio registers (virtio spec 4.2.2).
const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const INTERRUPT_STATUS: usize = 0x060;
const INTERRUPT_ACK: usize = 0x064;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG_GENERATION: usize = 0x0fc;
const CONFIG: usize = 0x100;

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const FAILED: u32 = 128;

/// Feature bits this driver understands.
pub mod feature {
    /// The device limits the size of one segment (`size_max`).
    pub const SIZE_MAX: u32 = 1;
    /// The device limits the number of segments per request (`seg_max`).
    pub const SEG_MAX: u32 = 2;
    /// The disk is read-only.
    pub const RO: u32 = 5;
    /// The device tells its logical block size (`blk_size`).
    pub const BLK_SIZE: u32 = 6;
    /// The device has a cache that `FLUSH` writes back.
    pub const FLUSH: u32 = 9;
    /// The driver can read and set the cache mode (`writeback` in the configuration space).
    pub const CONFIG_WCE: u32 = 11;
    /// DISCARD requests.
    pub const DISCARD: u32 = 13;
    /// WRITE_ZEROES requests.
    pub const WRITE_ZEROES: u32 = 14;
    /// More than one request queue (`num_queues` in the configuration space).
    pub const MQ: u32 = 12;
    /// `used_event`/`avail_event`: each side says when it wants to hear from the other.
    pub const EVENT_IDX: u32 = 29;
    /// Virtio 1.x (mandatory for virtio-mmio version 2).
    pub const VERSION_1: u32 = 32;
}

// Request types and status values (virtio spec 5.2.6).
/// Read.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get the device ID string (20 bytes).
pub const T_GET_ID: u32 = 8;
/// Discard ranges.
pub const T_DISCARD: u32 = 11;
/// Write zeroes over ranges.
pub const T_WRITE_ZEROES: u32 = 13;
/// The UNMAP flag of a write-zeroes range.
pub const WRITE_ZEROES_UNMAP: u32 = 1;
/// Offset of `writeback` in the configuration space.
pub const CONFIG_WRITEBACK: usize = 32;
/// Success.
pub const S_OK: u8 = 0;
/// I/O error.
pub const S_IOERR: u8 = 1;
/// Unsupported request.
pub const S_UNSUPP: u8 = 2;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// Descriptors in queue 0 for the one-request-at-a-time workloads (the device may offer more).
const QUEUE_SIZE: u16 = 16;
/// The most queues this driver sets up.
pub const MAX_QUEUES: usize = 16;
/// The most descriptors of one queue.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// The DMA window: guest-physical memory reserved for the driver (16 MiB to 32 MiB).
pub const DMA_BASE: u64 = 0x100_0000;
/// Each queue's rings, request headers and status bytes: 16 KiB per queue from `DMA_BASE`.
const QUEUE_AREA: u64 = 0x4000;
/// Where data buffers may be placed by the caller.
pub const BUFFERS: u64 = DMA_BASE + 0x10_0000;
/// The end of the DMA window.
pub const DMA_END: u64 = DMA_BASE + 0x100_0000;

/// How long to wait for a completion before calling the device hung (polling iterations).
const POLL_LIMIT: u64 = 2_000_000_000;

/// Port of the VMM's timing marks and clock.
const TIMING_PORT: u16 = 0xf5;
/// Whether the first I/O completed (the VMM is told once).
static FIRST_IO: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Tells the VMM, once, that the first I/O completed (it timestamps it).
fn first_io_done() {
    // A plain load first: the locked exchange only once.
    if !FIRST_IO.load(Ordering::Relaxed) && !FIRST_IO.swap(true, Ordering::Relaxed) {
        crate::outl(TIMING_PORT, 2);
    }
}

/// One data buffer of a request: guest-physical address, length, and whether the device writes
/// it (reads from the disk) or reads it (writes to the disk).
#[derive(Clone, Copy)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes into it.
    pub device_writes: bool,
}

/// One split virtqueue: its rings and, per request slot, a header and a status byte. Its size
/// is a power of two (ring positions are masked, not divided: divisions are dear where the
/// guest's instructions are).
#[derive(Clone, Copy)]
struct Vq {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    headers: u64,
    statuses: u64,
    /// Our copy of `avail.idx`.
    avail_idx: u16,
    /// `avail.idx` at the last notification decision.
    kicked_idx: u16,
    /// The used index seen last.
    used_seen: u16,
}

impl Vq {
    const fn at(q: usize, size: u16) -> Vq {
        let base = DMA_BASE + q as u64 * QUEUE_AREA;
        Vq {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            headers: base + 0x3000,
            statuses: base + 0x3800,
            avail_idx: 0,
            kicked_idx: 0,
            used_seen: 0,
        }
    }

    /// `used_event`, after the avail ring's entries (EVENT_IDX).
    fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    /// `avail_event`, after the used ring's entries (EVENT_IDX).
    fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(i & (self.size - 1));
        poke::<u64>(d, addr);
        poke::<u32>(d + 8, len);
        poke::<u16>(d + 12, flags);
        poke::<u16>(d + 14, next);
    }
}

/// A virtio-blk device, initialized and ready for requests.
pub struct Blk {
    base: usize,
    /// Negotiated features.
    pub features: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size (512 if the device does not say).
    pub blk_size: u32,
    /// Most segments per request (0 if the device does not say).
    pub seg_max: u32,
    /// The queues set up.
    queues: [Vq; MAX_QUEUES],
    /// How many of them.
    pub queue_count: usize,
    /// With EVENT_IDX: how many completions past the next one the device may go before it
    /// interrupts (0: interrupt at the next one).
    pub used_event_gap: u16,
    /// Notifications sent, and skipped because the device's `avail_event` said it was not
    /// waiting for one (EVENT_IDX).
    pub notifies: (u64, u64),
}

fn rd(addr: u64) -> u32 {
    // SAFETY: `addr` is a register of the virtio-mmio window, mapped by the identity page tables.
    unsafe { read_volatile(addr as *const u32) }
}

fn wr(addr: u64, v: u32) {
    // SAFETY: as in `rd`.
    unsafe { write_volatile(addr as *mut u32, v) }
}

/// Writes `v` to guest-physical `addr` of the DMA window.
fn poke<T>(addr: u64, v: T) {
    debug_assert!((DMA_BASE..DMA_END).contains(&addr));
    // SAFETY: the DMA window is identity-mapped guest RAM reserved for this driver; the device
    // reads it only after the avail index is published (with a fence in between).
    unsafe { write_volatile(addr as *mut T, v) }
}

/// Reads a `T` at guest-physical `addr` of the DMA window.
fn peek<T>(addr: u64) -> T {
    debug_assert!((DMA_BASE..DMA_END).contains(&addr));
    // SAFETY: as in `poke`; volatile because the device writes it behind the compiler's back.
    unsafe { read_volatile(addr as *const T) }
}

impl Blk {
    fn reg(&self, off: usize) -> u32 {
        rd((self.base + off) as u64)
    }

    fn set_reg(&self, off: usize, v: u32) {
        wr((self.base + off) as u64, v)
    }

    fn config<T>(&self, off: usize) -> T {
        // SAFETY: the device-specific configuration space of the mmio window.
        unsafe { read_volatile((self.base + CONFIG + off) as *const T) }
    }

    /// Finds and initializes the virtio-blk device at `base` with one queue of 16 descriptors
    /// (virtio spec 3.1.1).
    pub fn init(base: u64) -> Result<Blk, &'static str> {
        Blk::init_queues(base, 1, QUEUE_SIZE)
    }

    /// Initializes the device with up to `want` queues (as many as it offers with
    /// VIRTIO_BLK_F_MQ, one without) of `size` descriptors each.
    pub fn init_queues(base: u64, want: usize, size: u16) -> Result<Blk, &'static str> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err("the queue size must be a power of two up to 256");
        }
        let mut blk = Blk {
            base: base as usize,
            features: 0,
            capacity: 0,
            blk_size: 512,
            seg_max: 0,
            queues: [Vq::at(0, size); MAX_QUEUES],
            queue_count: 1,
            used_event_gap: 0,
            notifies: (0, 0),
        };
        if blk.reg(MAGIC) != 0x7472_6976 {
            return Err("no virtio-mmio magic value at the disk's address");
        }
        if blk.reg(VERSION) != 2 {
            return Err("not a virtio-mmio version 2 (virtio 1.x) device");
        }
        if blk.reg(DEVICE_ID) != 2 {
            return Err("the device is not a block device");
        }
        // 1. Reset. 2. ACKNOWLEDGE: we saw it. 3. DRIVER: we can drive it.
        blk.set_reg(STATUS, 0);
        blk.set_reg(STATUS, ACKNOWLEDGE);
        blk.set_reg(STATUS, ACKNOWLEDGE | DRIVER);
        // 4. Read the device's features, accept those we understand.
        blk.set_reg(DEVICE_FEATURES_SEL, 0);
        let low = u64::from(blk.reg(DEVICE_FEATURES));
        blk.set_reg(DEVICE_FEATURES_SEL, 1);
        let high = u64::from(blk.reg(DEVICE_FEATURES));
        let offered = low | high << 32;
        let mut wanted = [
            feature::SIZE_MAX,
            feature::SEG_MAX,
            feature::RO,
            feature::BLK_SIZE,
            feature::FLUSH,
            feature::CONFIG_WCE,
            feature::DISCARD,
            feature::WRITE_ZEROES,
            feature::EVENT_IDX,
            feature::VERSION_1,
        ]
        .iter()
        .fold(0u64, |acc, &bit| acc | 1 << bit);
        if want > 1 {
            wanted |= 1 << feature::MQ;
        }
        if offered & (1 << feature::VERSION_1) == 0 {
            blk.set_reg(STATUS, FAILED);
            return Err("the device does not offer VERSION_1");
        }
        blk.features = offered & wanted;
        blk.set_reg(DRIVER_FEATURES_SEL, 0);
        blk.set_reg(DRIVER_FEATURES, blk.features as u32);
        blk.set_reg(DRIVER_FEATURES_SEL, 1);
        blk.set_reg(DRIVER_FEATURES, (blk.features >> 32) as u32);
        // 5. FEATURES_OK, 6. and check that the device kept it.
        blk.set_reg(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if blk.reg(STATUS) & FEATURES_OK == 0 {
            blk.set_reg(STATUS, FAILED);
            return Err("the device refused our features");
        }
        // 7. Device-specific setup: the queues (`num_queues` is valid with MQ).
        if blk.has(feature::MQ) {
            let offered = usize::from(blk.config::<u16>(34));
            blk.queue_count = want.min(offered).clamp(1, MAX_QUEUES);
        }
        for q in 0..blk.queue_count {
            blk.queues[q] = Vq::at(q, size);
            blk.setup_queue(q)?;
        }
        // 8. DRIVER_OK: the device is live.
        blk.set_reg(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        blk.capacity = blk.config::<u64>(0);
        if blk.has(feature::BLK_SIZE) {
            blk.blk_size = blk.config::<u32>(20);
        }
        if blk.has(feature::SEG_MAX) {
            blk.seg_max = blk.config::<u32>(12);
        }
        Ok(blk)
    }

    fn setup_queue(&mut self, q: usize) -> Result<(), &'static str> {
        let vq = self.queues[q];
        self.set_reg(QUEUE_SEL, q as u32);
        if self.reg(QUEUE_READY) != 0 {
            return Err("a queue is already live after a reset");
        }
        let max = self.reg(QUEUE_NUM_MAX);
        if max < u32::from(vq.size) {
            return Err("the device's queue is too small");
        }
        self.set_reg(QUEUE_NUM, u32::from(vq.size));
        self.set_reg(QUEUE_DESC_LOW, vq.desc as u32);
        self.set_reg(QUEUE_DESC_HIGH, (vq.desc >> 32) as u32);
        self.set_reg(QUEUE_DRIVER_LOW, vq.avail as u32);
        self.set_reg(QUEUE_DRIVER_HIGH, (vq.avail >> 32) as u32);
        self.set_reg(QUEUE_DEVICE_LOW, vq.used as u32);
        self.set_reg(QUEUE_DEVICE_HIGH, (vq.used >> 32) as u32);
        // The rings start empty: avail.flags = 1 (no interrupts needed, we poll), avail.idx = 0.
        poke::<u16>(vq.avail, 1);
        poke::<u16>(vq.avail + 2, 0);
        poke::<u16>(vq.used + 2, 0);
        poke::<u16>(vq.used_event(), 0);
        poke::<u16>(vq.avail_event(), 0);
        self.set_reg(QUEUE_READY, 1);
        Ok(())
    }

    /// Reads and acknowledges the interrupt status; returns what it was.
    pub fn take_isr(&mut self) -> u32 {
        let isr = self.reg(INTERRUPT_STATUS);
        if isr != 0 {
            self.set_reg(INTERRUPT_ACK, isr);
        }
        isr
    }

    /// The configuration generation: it changes whenever the device changes its configuration.
    pub fn config_generation(&self) -> u32 {
        self.reg(CONFIG_GENERATION)
    }

    /// Reads the capacity (in sectors) consistently: again while the generation moves under
    /// the read (virtio spec 4.2.2.2).
    pub fn read_capacity(&self) -> u64 {
        loop {
            let before = self.config_generation();
            let capacity = self.config::<u64>(0);
            if self.config_generation() == before {
                return capacity;
            }
        }
    }

    /// Reads a byte of the device-specific configuration space.
    pub fn config_u8(&self, off: usize) -> u8 {
        self.config::<u8>(off)
    }

    /// Writes a byte of the device-specific configuration space.
    pub fn set_config_u8(&self, off: usize, v: u8) {
        // SAFETY: the device-specific configuration space of the mmio window.
        unsafe { write_volatile((self.base + CONFIG + off) as *mut u8, v) }
    }

    /// Whether feature `bit` was negotiated.
    pub fn has(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    /// Runs one request on queue 0 and returns the device's status byte: a chain of header
    /// (device-readable), `bufs`, and the status byte (device-writable).
    pub fn request(&mut self, typ: u32, sector: u64, bufs: &[Buf]) -> Result<u8, &'static str> {
        let vq = self.queues[0];
        let n = bufs.len() + 2;
        if n > usize::from(vq.size) {
            return Err("too many buffers for one request");
        }
        self.set_header(typ, sector);
        let mut chain = [(0u64, 0u32, 0u16); MAX_QUEUE_SIZE as usize];
        chain[0] = (vq.headers, 16, 0);
        for (i, b) in bufs.iter().enumerate() {
            chain[i + 1] = (
                b.addr,
                b.len,
                if b.device_writes { DESC_F_WRITE } else { 0 },
            );
        }
        chain[n - 1] = (vq.statuses, 1, DESC_F_WRITE);
        for (i, &(addr, len, flags)) in chain[..n].iter().enumerate() {
            let next = if i + 1 < n { DESC_F_NEXT } else { 0 };
            vq.set_desc(i as u16, addr, len, flags | next, (i + 1) as u16);
        }
        self.submit_head(0)?;
        Ok(self.status())
    }

    /// Publishes the chain starting at descriptor `head` of queue 0, notifies the device and
    /// polls the used ring until the device returns it.
    pub fn submit_head(&mut self, head: u16) -> Result<u32, &'static str> {
        // The interrupt wanted at the next completion (plus the gap).
        if self.has(feature::EVENT_IDX) {
            let vq = &self.queues[0];
            poke::<u16>(
                vq.used_event(),
                vq.used_seen.wrapping_add(self.used_event_gap),
            );
        }
        self.push(0, head);
        self.kick(0);
        let mut spins = 0u64;
        let (id, written) = loop {
            if let Some(done) = self.pop_used(0) {
                break done;
            }
            spins += 1;
            if spins > POLL_LIMIT {
                return Err("the device did not complete a request");
            }
            core::hint::spin_loop();
        };
        // Acknowledge the interrupt the device raised (if it did), so that its line goes low
        // again; without EVENT_IDX every completion raises one.
        if !self.has(feature::EVENT_IDX) {
            self.take_isr();
        }
        if id != u32::from(head) {
            return Err("the device returned a descriptor we did not submit");
        }
        Ok(written)
    }

    /// Puts the chain at descriptor `head` of queue `q` into the available ring (the device sees
    /// it at the next [`Blk::kick`]).
    pub fn push(&mut self, q: usize, head: u16) {
        let vq = &mut self.queues[q];
        let slot = u64::from(vq.avail_idx & (vq.size - 1));
        poke::<u16>(vq.avail + 4 + 2 * slot, head);
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
    }

    /// Publishes the chains pushed to queue `q` and notifies the device, unless (EVENT_IDX) its
    /// `avail_event` says it has not finished with the ring yet (the spec's vring_need_event).
    pub fn kick(&mut self, q: usize) {
        let event_idx = self.has(feature::EVENT_IDX);
        let vq = self.queues[q];
        if vq.avail_idx == vq.kicked_idx {
            return;
        }
        // The descriptors and ring entries must be visible before the index that publishes them.
        fence(Ordering::SeqCst);
        poke::<u16>(vq.avail + 2, vq.avail_idx);
        fence(Ordering::SeqCst);
        let (new, old) = (vq.avail_idx, vq.kicked_idx);
        self.queues[q].kicked_idx = new;
        let needed = !event_idx || {
            let event = peek::<u16>(vq.avail_event());
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        };
        if needed {
            self.set_reg(QUEUE_NOTIFY, q as u32);
            self.notifies.0 += 1;
        } else {
            self.notifies.1 += 1;
        }
    }

    /// Takes the next completion of queue `q` from its used ring: (chain head, bytes written).
    pub fn pop_used(&mut self, q: usize) -> Option<(u32, u32)> {
        let vq = &mut self.queues[q];
        if peek::<u16>(vq.used + 2) == vq.used_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = u64::from(vq.used_seen & (vq.size - 1));
        let id = peek::<u32>(vq.used + 4 + 8 * slot);
        let written = peek::<u32>(vq.used + 4 + 8 * slot + 4);
        vq.used_seen = vq.used_seen.wrapping_add(1);
        first_io_done();
        Some((id, written))
    }

    /// Asks for no used-buffer interrupts (EVENT_IDX: `used_event` half the index space away,
    /// moved along as completions are taken; without it the ring's NO_INTERRUPT flag is set).
    pub fn quiet(&mut self, q: usize) {
        let vq = &self.queues[q];
        poke::<u16>(vq.used_event(), vq.used_seen.wrapping_add(0x8000));
    }

    /// Asks for an interrupt at the next completion of queue `q` (EVENT_IDX `used_event`).
    pub fn interrupt_at_next(&mut self, q: usize) {
        let vq = &self.queues[q];
        poke::<u16>(vq.used_event(), vq.used_seen);
        fence(Ordering::SeqCst);
    }

    /// Whether queue `q` has completions not taken yet.
    pub fn used_pending(&self, q: usize) -> bool {
        let vq = &self.queues[q];
        peek::<u16>(vq.used + 2) != vq.used_seen
    }

    /// Request slots of queue `q` for [`Blk::prepare`] (three descriptors each).
    pub fn slots(&self, q: usize) -> u16 {
        (self.queues[q].size / 3).min(128)
    }

    /// Builds request `slot` of queue `q` (descriptors `3 * slot ..`, its own header and status
    /// byte) over one data buffer, and pushes it; returns the chain's head.
    pub fn prepare(&mut self, q: usize, slot: u16, typ: u32, sector: u64, buf: Buf) -> u16 {
        let vq = self.queues[q];
        let hdr = vq.headers + 16 * u64::from(slot);
        let status = vq.statuses + u64::from(slot);
        poke::<u32>(hdr, typ);
        poke::<u32>(hdr + 4, 0);
        poke::<u64>(hdr + 8, sector);
        poke::<u8>(status, 0xff);
        let head = 3 * slot;
        let data_flags = if buf.device_writes { DESC_F_WRITE } else { 0 };
        vq.set_desc(head, hdr, 16, DESC_F_NEXT, head + 1);
        vq.set_desc(
            head + 1,
            buf.addr,
            buf.len,
            data_flags | DESC_F_NEXT,
            head + 2,
        );
        vq.set_desc(head + 2, status, 1, DESC_F_WRITE, 0);
        self.push(q, head);
        head
    }

    /// Sends request `slot` of queue `q` again, as [`Blk::prepare`] built it, at `sector`: the
    /// least a request can cost the driver (the header's sector, the status byte, a ring entry).
    pub fn resubmit(&mut self, q: usize, slot: u16, sector: u64) {
        let vq = self.queues[q];
        poke::<u64>(vq.headers + 16 * u64::from(slot) + 8, sector);
        poke::<u8>(vq.statuses + u64::from(slot), 0xff);
        self.push(q, 3 * slot);
    }

    /// The status byte of request `slot` of queue `q`.
    pub fn slot_status(&self, q: usize, slot: u16) -> u8 {
        peek::<u8>(self.queues[q].statuses + u64::from(slot))
    }

    /// Writes raw descriptor `i` of queue 0 (for the malformed-chain tests of the workloads).
    pub fn raw_descriptor(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.queues[0].set_desc(i, addr, len, flags, next);
    }

    /// The guest-physical addresses of queue 0's first header and status byte (for hand-built
    /// chains).
    pub fn header_and_status(&self) -> (u64, u64) {
        (self.queues[0].headers, self.queues[0].statuses)
    }

    /// Writes a request header for a hand-built chain.
    pub fn set_header(&mut self, typ: u32, sector: u64) {
        let (hdr, status) = self.header_and_status();
        poke::<u32>(hdr, typ);
        poke::<u32>(hdr + 4, 0);
        poke::<u64>(hdr + 8, sector);
        poke::<u8>(status, 0xff);
    }

    /// The status byte of the last request.
    pub fn status(&self) -> u8 {
        peek::<u8>(self.header_and_status().1)
    }
}

/// Descriptor flags, for hand-built chains.
pub mod flags {
    /// The chain goes on at `next`.
    pub const NEXT: u16 = super::DESC_F_NEXT;
    /// The device writes the buffer.
    pub const WRITE: u16 = super::DESC_F_WRITE;
}

/// A byte slice of the DMA window.
pub fn dma_slice(addr: u64, len: usize) -> &'static mut [u8] {
    assert!(addr >= BUFFERS && addr + len as u64 <= DMA_END);
    // SAFETY: the range lies in the identity-mapped buffer area of the DMA window, which only the
    // workloads use, one slice per buffer, and the device touches it only while a request that
    // names it is in flight (the workloads touch a buffer only while none is).
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}
