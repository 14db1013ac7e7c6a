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

/// Descriptors in our queue (the device may offer more).
const QUEUE_SIZE: u16 = 16;

/// The DMA window: guest-physical memory reserved for the driver (16 MiB to 19 MiB).
pub const DMA_BASE: u64 = 0x100_0000;
const DESC_TABLE: u64 = DMA_BASE;
const AVAIL_RING: u64 = DMA_BASE + 0x1000;
const USED_RING: u64 = DMA_BASE + 0x2000;
/// `used_event`, after the avail ring's entries (EVENT_IDX).
const USED_EVENT: u64 = AVAIL_RING + 4 + 2 * QUEUE_SIZE as u64;
/// `avail_event`, after the used ring's entries (EVENT_IDX).
const AVAIL_EVENT: u64 = USED_RING + 4 + 8 * QUEUE_SIZE as u64;
const HEADER: u64 = DMA_BASE + 0x3000;
const STATUS_BYTE: u64 = DMA_BASE + 0x3100;
/// Where data buffers may be placed by the caller (up to `DMA_BASE + 3 MiB`).
pub const BUFFERS: u64 = DMA_BASE + 0x10_0000;
/// The end of the DMA window.
pub const DMA_END: u64 = DMA_BASE + 0x30_0000;

/// How long to wait for a completion before calling the device hung (polling iterations).
const POLL_LIMIT: u64 = 2_000_000_000;

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
    /// Our copy of `avail.idx`.
    avail_idx: u16,
    /// The used index seen last.
    used_seen: u16,
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

    /// Finds and initializes the virtio-blk device at `base` (virtio spec 3.1.1).
    pub fn init(base: u64) -> Result<Blk, &'static str> {
        let mut blk = Blk {
            base: base as usize,
            features: 0,
            capacity: 0,
            blk_size: 512,
            seg_max: 0,
            avail_idx: 0,
            used_seen: 0,
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
        let wanted = [
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
        // 7. Device-specific setup: queue 0.
        blk.set_reg(QUEUE_SEL, 0);
        if blk.reg(QUEUE_READY) != 0 {
            return Err("queue 0 is already live after a reset");
        }
        let max = blk.reg(QUEUE_NUM_MAX);
        if max < u32::from(QUEUE_SIZE) {
            return Err("the device's queue is too small");
        }
        blk.set_reg(QUEUE_NUM, u32::from(QUEUE_SIZE));
        blk.set_reg(QUEUE_DESC_LOW, DESC_TABLE as u32);
        blk.set_reg(QUEUE_DESC_HIGH, (DESC_TABLE >> 32) as u32);
        blk.set_reg(QUEUE_DRIVER_LOW, AVAIL_RING as u32);
        blk.set_reg(QUEUE_DRIVER_HIGH, (AVAIL_RING >> 32) as u32);
        blk.set_reg(QUEUE_DEVICE_LOW, USED_RING as u32);
        blk.set_reg(QUEUE_DEVICE_HIGH, (USED_RING >> 32) as u32);
        // The rings start empty: avail.flags = 1 (no interrupts needed, we poll), avail.idx = 0.
        poke::<u16>(AVAIL_RING, 1);
        poke::<u16>(AVAIL_RING + 2, 0);
        poke::<u16>(USED_RING + 2, 0);
        poke::<u16>(USED_EVENT, 0);
        poke::<u16>(AVAIL_EVENT, 0);
        blk.set_reg(QUEUE_READY, 1);
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

    /// Runs one request and returns the device's status byte: a chain of header (device-readable),
    /// `bufs`, and the status byte (device-writable).
    pub fn request(&mut self, typ: u32, sector: u64, bufs: &[Buf]) -> Result<u8, &'static str> {
        let n = bufs.len() + 2;
        if n > usize::from(QUEUE_SIZE) {
            return Err("too many buffers for one request");
        }
        // The header: type, reserved, sector.
        poke::<u32>(HEADER, typ);
        poke::<u32>(HEADER + 4, 0);
        poke::<u64>(HEADER + 8, sector);
        poke::<u8>(STATUS_BYTE, 0xff);
        let mut chain = [(0u64, 0u32, 0u16); QUEUE_SIZE as usize];
        chain[0] = (HEADER, 16, 0);
        for (i, b) in bufs.iter().enumerate() {
            chain[i + 1] = (
                b.addr,
                b.len,
                if b.device_writes { DESC_F_WRITE } else { 0 },
            );
        }
        chain[n - 1] = (STATUS_BYTE, 1, DESC_F_WRITE);
        for (i, &(addr, len, flags)) in chain[..n].iter().enumerate() {
            let next = if i + 1 < n { DESC_F_NEXT } else { 0 };
            let d = DESC_TABLE + 16 * i as u64;
            poke::<u64>(d, addr);
            poke::<u32>(d + 8, len);
            poke::<u16>(d + 12, flags | next);
            poke::<u16>(d + 14, (i + 1) as u16);
        }
        self.submit_head(0)?;
        Ok(peek::<u8>(STATUS_BYTE))
    }

    /// Publishes the chain starting at descriptor `head`, notifies the device and polls the used
    /// ring until the device returns it.
    pub fn submit_head(&mut self, head: u16) -> Result<u32, &'static str> {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        poke::<u16>(AVAIL_RING + 4 + 2 * slot, head);
        // The descriptors and the ring entry must be visible before the index that publishes them.
        let event_idx = self.has(feature::EVENT_IDX);
        if event_idx {
            poke::<u16>(USED_EVENT, self.used_seen.wrapping_add(self.used_event_gap));
        }
        fence(Ordering::SeqCst);
        let old = self.avail_idx;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        poke::<u16>(AVAIL_RING + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        // With EVENT_IDX the device says up to which index it has seen the ring: notify only
        // when this publication crosses it (the spec's vring_need_event).
        let needed = !event_idx || {
            let event = peek::<u16>(AVAIL_EVENT);
            self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
        };
        if needed {
            self.set_reg(QUEUE_NOTIFY, 0);
            self.notifies.0 += 1;
        } else {
            self.notifies.1 += 1;
        }
        let mut spins = 0u64;
        while peek::<u16>(USED_RING + 2) == self.used_seen {
            spins += 1;
            if spins > POLL_LIMIT {
                return Err("the device did not complete a request");
            }
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        let slot = u64::from(self.used_seen % QUEUE_SIZE);
        let id = peek::<u32>(USED_RING + 4 + 8 * slot);
        let written = peek::<u32>(USED_RING + 4 + 8 * slot + 4);
        self.used_seen = self.used_seen.wrapping_add(1);
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

    /// Writes raw descriptor `i` (for the malformed-chain tests of the workloads).
    pub fn raw_descriptor(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = DESC_TABLE + 16 * u64::from(i % QUEUE_SIZE);
        poke::<u64>(d, addr);
        poke::<u32>(d + 8, len);
        poke::<u16>(d + 12, flags);
        poke::<u16>(d + 14, next);
    }

    /// The guest-physical addresses of the header and status byte (for hand-built chains).
    pub fn header_and_status(&self) -> (u64, u64) {
        (HEADER, STATUS_BYTE)
    }

    /// Writes a request header for a hand-built chain.
    pub fn set_header(&mut self, typ: u32, sector: u64) {
        poke::<u32>(HEADER, typ);
        poke::<u32>(HEADER + 4, 0);
        poke::<u64>(HEADER + 8, sector);
        poke::<u8>(STATUS_BYTE, 0xff);
    }

    /// The status byte of the last request.
    pub fn status(&self) -> u8 {
        peek::<u8>(STATUS_BYTE)
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
    // names it is in flight (the driver is synchronous).
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}
