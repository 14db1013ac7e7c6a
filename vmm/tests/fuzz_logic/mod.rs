//! The logic of the `virtio_blk` fuzz target (fuzz/fuzz_targets/virtio_blk.rs), shared with the
//! regression replay test (vmm/tests/fuzz_regressions.rs): a guest that drives the virtio-mmio
//! transport and the virtio-blk device model with arbitrary register accesses, descriptor tables,
//! available rings and request headers, without KVM. Nothing may panic or hang, whatever the
//! guest does (the fuzz target's oracle); the regression test also checks that a well-formed
//! guest is served ([`well_formed_write_and_read`]).
//!
//! Input: a flags byte (bit 0: read-only disk; bit 1: do the driver's setup first; bit 2: offer
//! EVENT_IDX in that setup; bit 3: a queue of 8 descriptors instead of 16), then operations, each
//! an opcode byte and its operands (missing bytes read as zero):
//! - 0 `poke ADDR:u16 LEN:u8 BYTES`: guest memory (ADDR mapped into RAM, LEN up to 64);
//! - 1 `desc I:u8 ADDR:u32 LEN:u32 FLAGS:u16 NEXT:u16`: descriptor I of the table;
//! - 2 `avail HEAD:u16`: publishes a chain head in the available ring;
//! - 3 `notify Q:u8`: a queue notification;
//! - 4 `mmio-write OFF:u16 VALUE:u32 WIDTH:u8`, 5 `mmio-read OFF:u16 WIDTH:u8`;
//! - 6 `resize SECTORS:u16`: the disk's capacity changes (the device's and the transport's side);
//! - 7 `header AT:u16 TYPE:u32 SECTOR:u64`: a request header in guest memory.

use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vstor_core::MemoryDevice;
use vstor_vmm::virtio::block::Block;
use vstor_vmm::virtio::mmio::{IrqLine, MmioTransport};
use vstor_vmm::virtio::VirtioDevice;

/// Guest RAM: two regions with a hole between them, so chains can point into the hole.
pub const RAM: [(u64, usize); 2] = [(0, 0x8000), (0x10000, 0x8000)];
/// Where the driver's setup puts the rings.
pub const DESC: u64 = 0x0;
/// The available ring.
pub const AVAIL: u64 = 0x1000;
/// The used ring.
pub const USED: u64 = 0x2000;
/// The disk's size.
pub const DISK: u64 = 64 * 1024;
/// Operations per input at most (bounds the time of one run).
const MAX_OPS: usize = 512;

struct NoIrq;
impl IrqLine for NoIrq {
    fn set_level(&self, _high: bool) {}
}

struct Input<'a>(&'a [u8]);
impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = self.0.len().min(N);
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// Maps a 16-bit address into guest RAM.
fn ram_addr(a: u16) -> u64 {
    let a = u64::from(a);
    if a < 0x8000 {
        a
    } else {
        0x10000 + (a - 0x8000)
    }
}

/// What a run did (read by the regression test; the fuzz target only needs the run to end).
#[allow(dead_code)]
#[derive(Debug, Default)]
pub struct Outcome {
    /// The device's request counters at the end.
    pub stats: vstor_vmm::virtio::block::Stats,
    /// The used ring's index at the end (as the driver's setup placed it).
    pub used_idx: u16,
}

fn reg(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Runs one input.
pub fn run(data: &[u8]) -> Outcome {
    let mut input = Input(data);
    let flags = input.u8();
    let mem = GuestMemoryMmap::<()>::from_ranges(
        &RAM.iter()
            .map(|&(a, l)| (GuestAddress(a), l))
            .collect::<Vec<_>>(),
    )
    .expect("guest memory");
    let disk = Arc::new(MemoryDevice::new(DISK).expect("memory device"));
    let block = Arc::new(Block::new(disk, flags & 1 != 0, "fuzz"));
    let mut t = MmioTransport::new(Box::new(block.clone()), mem.clone(), Box::new(NoIrq));
    let qsize: u16 = if flags & 8 != 0 { 8 } else { 16 };
    if flags & 2 != 0 {
        // The driver's side of virtio spec 3.1.1, as the test guest does it.
        reg(&mut t, 0x70, 1);
        reg(&mut t, 0x70, 3);
        let mut features = block.features() & !(1 << 29);
        if flags & 4 != 0 {
            features |= block.features() & (1 << 29);
        }
        features |= 1 << 32;
        reg(&mut t, 0x24, 0);
        reg(&mut t, 0x20, features as u32);
        reg(&mut t, 0x24, 1);
        reg(&mut t, 0x20, (features >> 32) as u32);
        reg(&mut t, 0x70, 11);
        reg(&mut t, 0x30, 0);
        reg(&mut t, 0x38, u32::from(qsize));
        reg(&mut t, 0x80, DESC as u32);
        reg(&mut t, 0x84, 0);
        reg(&mut t, 0x90, AVAIL as u32);
        reg(&mut t, 0x94, 0);
        reg(&mut t, 0xa0, USED as u32);
        reg(&mut t, 0xa4, 0);
        reg(&mut t, 0x44, 1);
        reg(&mut t, 0x70, 15);
    }
    let mut avail_idx: u16 = 0;
    for _ in 0..MAX_OPS {
        if input.0.is_empty() {
            break;
        }
        match input.u8() % 8 {
            0 => {
                let at = ram_addr(input.u16());
                let len = usize::from(input.u8() % 65);
                let bytes: Vec<u8> = (0..len).map(|_| input.u8()).collect();
                // A poke that runs off a region is cut short by vm-memory: fine.
                let _ = mem.write_slice(&bytes, GuestAddress(at));
            }
            1 => {
                let i = u64::from(input.u8() % qsize as u8);
                let addr = u64::from(input.u32());
                let len = input.u32();
                let fl = input.u16();
                let next = input.u16();
                let d = DESC + 16 * i;
                let _ = mem.write_obj(addr, GuestAddress(d));
                let _ = mem.write_obj(len, GuestAddress(d + 8));
                let _ = mem.write_obj(fl, GuestAddress(d + 12));
                let _ = mem.write_obj(next, GuestAddress(d + 14));
            }
            2 => {
                let head = input.u16();
                let slot = AVAIL + 4 + 2 * u64::from(avail_idx % qsize);
                let _ = mem.write_obj(head, GuestAddress(slot));
                avail_idx = avail_idx.wrapping_add(1);
                let _ = mem.write_obj(avail_idx, GuestAddress(AVAIL + 2));
            }
            3 => {
                let q = u32::from(input.u8() % 3);
                reg(&mut t, 0x50, q);
            }
            4 => {
                let off = u64::from(input.u16() % 0x140);
                let v = input.u32().to_le_bytes();
                let width = [1usize, 2, 4, 8][usize::from(input.u8() % 4)];
                let mut buf = [0u8; 8];
                buf[..width.min(4)].copy_from_slice(&v[..width.min(4)]);
                t.write(off, &buf[..width]);
            }
            5 => {
                let off = u64::from(input.u16() % 0x140);
                let width = [1usize, 2, 4, 8][usize::from(input.u8() % 4)];
                let mut buf = [0u8; 8];
                t.read(off, &mut buf[..width]);
            }
            6 => {
                let sectors = u64::from(input.u16());
                block.set_capacity(sectors * 512);
                t.config_changed();
            }
            _ => {
                let at = ram_addr(input.u16());
                let typ = input.u32();
                let sector = input.u64();
                let _ = mem.write_obj(typ, GuestAddress(at));
                let _ = mem.write_obj(0u32, GuestAddress(at + 4));
                let _ = mem.write_obj(sector, GuestAddress(at + 8));
            }
        }
    }
    Outcome {
        stats: block.stats(),
        used_idx: mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0),
    }
}

/// An input that sets the device up and sends one well-formed write and one read of a sector
/// (the seed of the fuzz corpus; used by the regression test).
#[allow(dead_code)]
pub fn well_formed_write_and_read() -> Vec<u8> {
    let mut v = vec![2u8];
    let desc = |v: &mut Vec<u8>, i: u8, addr: u32, len: u32, fl: u16, next: u16| {
        v.push(1);
        v.push(i);
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&fl.to_le_bytes());
        v.extend_from_slice(&next.to_le_bytes());
    };
    // Write: header at 0x3000, data at 0x4000, status at 0x3100.
    v.extend_from_slice(&[7, 0x00, 0x30, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
    desc(&mut v, 0, 0x3000, 16, 1, 1);
    desc(&mut v, 1, 0x4000, 512, 1, 2);
    desc(&mut v, 2, 0x3100, 1, 2, 0);
    v.extend_from_slice(&[2, 0, 0, 3, 0]);
    // Read it back into 0x5000.
    v.extend_from_slice(&[7, 0x00, 0x32, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
    desc(&mut v, 3, 0x3200, 16, 1, 4);
    desc(&mut v, 4, 0x5000, 512, 3, 5);
    desc(&mut v, 5, 0x3101, 1, 2, 0);
    v.extend_from_slice(&[2, 3, 0, 3, 0]);
    v
}
