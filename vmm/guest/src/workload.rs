//! The workloads the VMM's command line picks (`--test-guest [WORKLOAD]`).
//!
//! Each workload may be followed by a seed (`pattern 90`, `verify 90`; decimal, 0 to 255, 0 when
//! left out) that is XORed into every pattern byte, so that two runs can leave different data
//! (a differencing child over its parent, say).
//!
//! - `pattern` (the default): writes a pattern to three regions (the first 64 KiB in a request of
//!   three data segments, 16 KiB in the middle, the last 8 KiB), flushes, reads them back and
//!   compares; checks GET_ID, a read past the end (I/O error) and an unknown request type
//!   (unsupported).
//! - `verify`: reads the three regions and compares them with the pattern (a later run on the
//!   same disk proves the writes persisted).
//! - `readonly`: the disk must say read-only, refuse a write with an I/O error and serve reads.
//! - `malformed`: hand-built bad descriptor chains (address outside RAM, short header, a buffer
//!   of the wrong direction, a loop, an absurd length) must each fail cleanly, and the device must
//!   serve a good request afterwards.
//!
//! - `zeroes`: writes the pattern over 256 KiB at 4 MiB, zeroes ranges of it with WRITE_ZEROES
//!   (two ranges in one request, and one with the UNMAP flag), discards another, checks that
//!   unsupported flags and ranges past the end are refused, and reads back: zeroes where the
//!   zeroes went, the pattern elsewhere. `zeroes-over` does the same without writing the pattern
//!   first (it must already be there: from a parent disk, say).
//! - `wce`: reads the cache mode (`writeback`, CONFIG_WCE), switches to write-through, writes
//!   and reads back, and switches back.
//! - `event-idx`: with EVENT_IDX the device must interrupt when the driver's `used_event` asks
//!   for it and not before, and keep `avail_event` current so that the driver notifies only when
//!   the device waits for it.
//! - `capacity`: reports `waiting for a capacity change`, then polls the interrupt status for
//!   the configuration-change bit and the configuration generation until the capacity grows
//!   (the host resizes the disk through the VMM's API); then writes the pattern over the first
//!   64 KiB of the new area and the last 8 KiB of the disk, reads them back, and checks that a
//!   read past the new end is an I/O error; flushes.
//!
//! - `mq`: needs a device with several queues (VIRTIO_BLK_F_MQ): on every queue at once, 16
//!   writes of 4 KiB in flight (queue `q` writes the pattern over 64 KiB at `8 MiB + q * 256 KiB`),
//!   a flush, then 16 reads per queue at once, compared with the pattern; each queue must return
//!   exactly its own requests.
//! - `inflight`: submits the `mq` writes (on every queue), waits 300 ms and reports PASS without
//!   waiting for the rest of them: the VMM must still end promptly and cleanly.
//! - `bench read|write DEPTH SIZE COUNT`: COUNT requests of SIZE bytes at uniformly random
//!   SIZE-aligned offsets, DEPTH of them in flight, spread over all the device's queues; the
//!   driver takes completions as they come and, when all DEPTH are in flight, asks for an
//!   interrupt at the next completion (EVENT_IDX `used_event`) and halts until it comes (`waits`
//!   counts these); EVENT_IDX also keeps notifications to the ones the device waits for.
//!   Writes put a tag at the start of each request ("VSTORBNC" and the disk offset; the rest of
//!   the request is zero) and end with a flush, inside the timing; reads check that each request
//!   starts with zeroes or its own tag. The offsets depend only on DEPTH and SIZE, so a read run
//!   after a write run with the same ones reads what it wrote. It reports a `bench-result:`
//!   line with the time (the VMM's clock, port 0xf5) and IOPS. Each request costs the driver a
//!   few stores (the chains are built once per slot), which matters where the guest's
//!   instructions are slow (`cpu` measures it).
//! - `cpu`: times 10,000,000 iterations of a register-only loop and 1,000,000 of a multiply-add
//!   through the stack (`cpu-result:` line).
//!
//! The pattern byte at disk offset `o` is `((o >> 9) as u8 * 37) ^ (o as u8) ^ 0xa5 ^ seed`; the
//! VMM's CI test recomputes it on the host.

use crate::println;
use crate::virtio::{
    self, flags, Blk, Buf, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES, WRITE_ZEROES_UNMAP,
};

const WRITE_BUF: u64 = virtio::BUFFERS;
const READ_BUF: u64 = virtio::BUFFERS + 0x10_0000;
const REGION_MAX: usize = 64 * 1024;

/// The pattern byte at disk offset `off` for `seed`.
pub fn pattern_byte(off: u64, seed: u8) -> u8 {
    ((off >> 9) as u8).wrapping_mul(37) ^ (off as u8) ^ 0xa5 ^ seed
}

/// Splits `name [seed]` into the name and the seed.
fn parse(workload: &str) -> Result<(&str, u8), &'static str> {
    let mut words = workload.split_whitespace();
    let name = words.next().unwrap_or("");
    let seed = match words.next() {
        None => 0,
        Some(w) => w
            .parse::<u8>()
            .map_err(|_| "the seed after the workload is not a number from 0 to 255")?,
    };
    if words.next().is_some() {
        return Err("too many words after the workload");
    }
    Ok((name, seed))
}

/// The regions the pattern workloads use, as (byte offset, length, data segments).
fn regions(capacity_bytes: u64) -> [(u64, usize, &'static [u32]); 3] {
    let middle = (capacity_bytes / 2) & !0xfff;
    [
        (0, 64 * 1024, &[4096, 28 * 1024, 32 * 1024]),
        (middle, 16 * 1024, &[16 * 1024]),
        (capacity_bytes - 8192, 8192, &[8192]),
    ]
}

/// Runs the named workload on the disk at `mmio_base`.
pub fn run(mmio_base: u64, mmio_irq: u32, workload: &str) -> Result<(), &'static str> {
    let first = workload.split_whitespace().next().unwrap_or("");
    // mq and bench use every queue the device offers, with room for many requests in flight.
    let mut blk = if matches!(first, "mq" | "bench" | "inflight") {
        Blk::init_queues(mmio_base, virtio::MAX_QUEUES, virtio::MAX_QUEUE_SIZE)?
    } else {
        Blk::init(mmio_base)?
    };
    println!(
        "virtio-blk: {} sectors, block size {}, seg_max {}, {} queue(s), features {:#x}{}",
        blk.capacity,
        blk.blk_size,
        blk.seg_max,
        blk.queue_count,
        blk.features,
        if blk.has(virtio::feature::RO) {
            ", read-only"
        } else {
            ""
        }
    );
    if blk.capacity < 2048 {
        return Err("the disk is smaller than 1 MiB");
    }
    if first == "cpu" {
        return cpu();
    }
    if first == "bench" {
        crate::irq::init(mmio_irq);
        return bench(&mut blk, workload);
    }
    let (name, seed) = parse(workload)?;
    match name {
        "" | "pattern" => pattern(&mut blk, seed),
        "verify" => verify(&mut blk, seed),
        "readonly" => readonly(&mut blk),
        "malformed" => malformed(&mut blk),
        "zeroes" => zeroes(&mut blk, seed, true),
        "zeroes-over" => zeroes(&mut blk, seed, false),
        "wce" => wce(&mut blk, seed),
        "event-idx" => event_idx(&mut blk),
        "capacity" => capacity(&mut blk, seed),
        "mq" => mq(&mut blk, seed),
        "inflight" => inflight(&mut blk, seed),
        _ => Err(
            "unknown workload (known: pattern, verify, readonly, malformed, zeroes, zeroes-over, \
             wce, event-idx, capacity, mq, inflight, bench, cpu)",
        ),
    }
}

/// Splits `len` bytes at `addr` into the given segments.
fn segments(addr: u64, sizes: &[u32], device_writes: bool) -> ([Buf; 4], usize) {
    let mut bufs = [Buf {
        addr: 0,
        len: 0,
        device_writes,
    }; 4];
    let mut at = addr;
    for (b, &len) in bufs.iter_mut().zip(sizes) {
        *b = Buf {
            addr: at,
            len,
            device_writes,
        };
        at += u64::from(len);
    }
    (bufs, sizes.len())
}

fn expect(
    blk: &mut Blk,
    what: &str,
    typ: u32,
    sector: u64,
    bufs: &[Buf],
    want: u8,
) -> Result<(), &'static str> {
    let got = blk.request(typ, sector, bufs)?;
    if got != want {
        println!("{}: status {} where {} was expected", what, got, want);
        return Err("a request ended with the wrong status");
    }
    Ok(())
}

fn read_and_compare(
    blk: &mut Blk,
    off: u64,
    len: usize,
    sizes: &[u32],
    seed: u8,
) -> Result<(), &'static str> {
    let back = virtio::dma_slice(READ_BUF, len);
    back.fill(0xee);
    let (bufs, n) = segments(READ_BUF, sizes, true);
    expect(blk, "read", T_IN, off / 512, &bufs[..n], S_OK)?;
    let back = virtio::dma_slice(READ_BUF, len);
    for (i, &b) in back.iter().enumerate() {
        let want = pattern_byte(off + i as u64, seed);
        if b != want {
            println!(
                "mismatch at disk offset {:#x}: {:#04x}, expected {:#04x}",
                off + i as u64,
                b,
                want
            );
            return Err("read-back differs from what was written");
        }
    }
    println!("  read back {} KiB at {:#x}: ok", len / 1024, off);
    Ok(())
}

fn pattern(blk: &mut Blk, seed: u8) -> Result<(), &'static str> {
    if blk.has(virtio::feature::RO) {
        return Err("the disk is read-only (use the readonly workload)");
    }
    let capacity = blk.capacity * 512;
    for (off, len, sizes) in regions(capacity) {
        debug_assert!(len <= REGION_MAX);
        let data = virtio::dma_slice(WRITE_BUF, len);
        for (i, b) in data.iter_mut().enumerate() {
            *b = pattern_byte(off + i as u64, seed);
        }
        let (bufs, n) = segments(WRITE_BUF, sizes, false);
        expect(blk, "write", T_OUT, off / 512, &bufs[..n], S_OK)?;
        println!(
            "  wrote {} KiB at {:#x} in {} segment(s)",
            len / 1024,
            off,
            n
        );
    }
    if blk.has(virtio::feature::FLUSH) {
        expect(blk, "flush", T_FLUSH, 0, &[], S_OK)?;
        println!("  flush: ok");
    }
    for (off, len, sizes) in regions(capacity) {
        read_and_compare(blk, off, len, sizes, seed)?;
    }
    // GET_ID: a 20-byte identification string.
    let id = virtio::dma_slice(READ_BUF, 20);
    id.fill(0);
    let idbuf = Buf {
        addr: READ_BUF,
        len: 20,
        device_writes: true,
    };
    expect(blk, "get-id", T_GET_ID, 0, &[idbuf], S_OK)?;
    let id = virtio::dma_slice(READ_BUF, 20);
    let end = id.iter().position(|&b| b == 0).unwrap_or(20);
    let id = core::str::from_utf8(&id[..end]).map_err(|_| "the device ID is not UTF-8")?;
    if id.is_empty() {
        return Err("the device ID is empty");
    }
    println!("  device id '{}'", id);
    // A read past the end is an I/O error; an unknown request type is unsupported.
    let one = Buf {
        addr: READ_BUF,
        len: 512,
        device_writes: true,
    };
    expect(
        blk,
        "read past the end",
        T_IN,
        blk.capacity,
        &[one],
        S_IOERR,
    )?;
    expect(blk, "unknown type", 0x77, 0, &[one], S_UNSUPP)?;
    println!("  read past the end: I/O error; unknown request type: unsupported");
    Ok(())
}

fn verify(blk: &mut Blk, seed: u8) -> Result<(), &'static str> {
    for (off, len, sizes) in regions(blk.capacity * 512) {
        read_and_compare(blk, off, len, sizes, seed)?;
    }
    Ok(())
}

fn readonly(blk: &mut Blk) -> Result<(), &'static str> {
    if !blk.has(virtio::feature::RO) {
        return Err("the device does not offer VIRTIO_BLK_F_RO");
    }
    let out = Buf {
        addr: WRITE_BUF,
        len: 4096,
        device_writes: false,
    };
    expect(blk, "write to a read-only disk", T_OUT, 0, &[out], S_IOERR)?;
    let inb = Buf {
        addr: READ_BUF,
        len: 4096,
        device_writes: true,
    };
    expect(blk, "read of a read-only disk", T_IN, 0, &[inb], S_OK)?;
    println!("  write refused with an I/O error, read served");
    Ok(())
}

/// Submits the hand-built chain at descriptor 0 and checks the outcome: `Some(status)` when the
/// device must answer with a status byte, `None` when the chain is too broken for the device to
/// find one (it must still return the chain, having written nothing).
fn hand_built(blk: &mut Blk, what: &str, want: Option<u8>) -> Result<(), &'static str> {
    let written = blk.submit_head(0)?;
    let status = blk.status();
    let ok = match want {
        Some(s) => status == s,
        None => status == 0xff && written == 0,
    };
    if !ok {
        println!("{}: status {:#x}, {} bytes written", what, status, written);
        return Err("a malformed chain was not refused as expected");
    }
    println!("  {}: refused", what);
    Ok(())
}

fn malformed(blk: &mut Blk) -> Result<(), &'static str> {
    let (header, status) = blk.header_and_status();
    let (n, w) = (flags::NEXT, flags::WRITE);

    // A data buffer outside guest RAM.
    blk.set_header(T_IN, 0);
    blk.raw_descriptor(0, header, 16, n, 1);
    blk.raw_descriptor(1, 0xffff_0000_0000, 4096, w | n, 2);
    blk.raw_descriptor(2, status, 1, w, 0);
    hand_built(blk, "buffer outside guest RAM", Some(S_IOERR))?;

    // A header shorter than 16 bytes.
    blk.set_header(T_IN, 0);
    blk.raw_descriptor(0, header, 8, n, 1);
    blk.raw_descriptor(1, READ_BUF, 4096, w | n, 2);
    blk.raw_descriptor(2, status, 1, w, 0);
    hand_built(blk, "short header", Some(S_IOERR))?;

    // A read whose data buffer the device may not write.
    blk.set_header(T_IN, 0);
    blk.raw_descriptor(0, header, 16, n, 1);
    blk.raw_descriptor(1, READ_BUF, 4096, n, 2);
    blk.raw_descriptor(2, status, 1, w, 0);
    hand_built(blk, "read into a device-readable buffer", Some(S_IOERR))?;

    // A readable descriptor after a writable one.
    blk.set_header(T_OUT, 0);
    blk.raw_descriptor(0, header, 16, n, 1);
    blk.raw_descriptor(1, READ_BUF, 512, w | n, 2);
    blk.raw_descriptor(2, WRITE_BUF, 512, n, 3);
    blk.raw_descriptor(3, status, 1, w, 0);
    hand_built(blk, "readable after writable", Some(S_IOERR))?;

    // An absurd length (4 GiB - 4 KiB).
    blk.set_header(T_IN, 0);
    blk.raw_descriptor(0, header, 16, n, 1);
    blk.raw_descriptor(1, READ_BUF, 0xffff_f000, w | n, 2);
    blk.raw_descriptor(2, status, 1, w, 0);
    hand_built(blk, "4 GiB buffer", Some(S_IOERR))?;

    // A loop: the status descriptor points back at the data.
    blk.set_header(T_IN, 0);
    blk.raw_descriptor(0, header, 16, n, 1);
    blk.raw_descriptor(1, READ_BUF, 512, w | n, 2);
    blk.raw_descriptor(2, status, 1, w | n, 1);
    hand_built(blk, "descriptor loop", None)?;

    // A next index past the end of the table.
    blk.set_header(T_IN, 0);
    blk.raw_descriptor(0, header, 16, n, 1);
    blk.raw_descriptor(1, READ_BUF, 512, w | n, 200);
    hand_built(blk, "next index out of the table", None)?;

    // The device still serves a good request.
    let inb = Buf {
        addr: READ_BUF,
        len: 4096,
        device_writes: true,
    };
    expect(blk, "read after malformed chains", T_IN, 0, &[inb], S_OK)?;
    println!("  a good request after them: ok");
    Ok(())
}

/// Where the `zeroes` workload works: 256 KiB at 4 MiB.
const ZERO_AREA: (u64, usize) = (4 << 20, 256 * 1024);
/// Ranges (offset in the area, length) that the `zeroes` workload writes zeroes over; the first
/// two go in one request, the third carries the UNMAP flag.
const ZEROED: [(u64, u32); 3] = [
    (16 << 10, 8 << 10),
    (64 << 10, 32 << 10),
    (128 << 10, 64 << 10),
];
/// The range it discards (its content afterwards is unspecified).
const DISCARDED: (u64, u32) = (224 << 10, 32 << 10);
/// Where the ranges of a request are built (past the 256 KiB the workload writes).
const RANGES_BUF: u64 = WRITE_BUF + 0x8_0000;

/// Builds discard/write-zeroes ranges `(byte offset, bytes, flags)` and runs the request.
fn ranges(blk: &mut Blk, typ: u32, list: &[(u64, u32, u32)]) -> Result<u8, &'static str> {
    let raw = virtio::dma_slice(RANGES_BUF, 16 * list.len());
    for (r, &(off, len, flags)) in raw.chunks_exact_mut(16).zip(list) {
        r[0..8].copy_from_slice(&(off / 512).to_le_bytes());
        r[8..12].copy_from_slice(&(len / 512).to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
    }
    let buf = Buf {
        addr: RANGES_BUF,
        len: 16 * list.len() as u32,
        device_writes: false,
    };
    blk.request(typ, 0, &[buf])
}

fn want(what: &str, got: u8, want: u8) -> Result<(), &'static str> {
    if got != want {
        println!("{}: status {} where {} was expected", what, got, want);
        return Err("a request ended with the wrong status");
    }
    Ok(())
}

fn zeroes(blk: &mut Blk, seed: u8, write_first: bool) -> Result<(), &'static str> {
    if !blk.has(virtio::feature::WRITE_ZEROES) || !blk.has(virtio::feature::DISCARD) {
        return Err("the device does not offer DISCARD and WRITE_ZEROES");
    }
    let (base, len) = ZERO_AREA;
    if blk.capacity * 512 < base + len as u64 {
        return Err("the disk is too small for the zeroes workload (5 MiB)");
    }
    if write_first {
        let data = virtio::dma_slice(WRITE_BUF, len);
        for (i, b) in data.iter_mut().enumerate() {
            *b = pattern_byte(base + i as u64, seed);
        }
        let (bufs, n) = segments(WRITE_BUF, &[65536; 4], false);
        expect(blk, "write", T_OUT, base / 512, &bufs[..n], S_OK)?;
        println!("  wrote {} KiB at {:#x}", len / 1024, base);
    }
    let z = |i: usize, flags: u32| (base + ZEROED[i].0, ZEROED[i].1, flags);
    let got = ranges(blk, T_WRITE_ZEROES, &[z(0, 0), z(1, 0)])?;
    want("write-zeroes of two ranges", got, S_OK)?;
    let got = ranges(blk, T_WRITE_ZEROES, &[z(2, WRITE_ZEROES_UNMAP)])?;
    want("write-zeroes with UNMAP", got, S_OK)?;
    let d = (base + DISCARDED.0, DISCARDED.1, 0);
    let got = ranges(blk, T_DISCARD, &[d])?;
    want("discard", got, S_OK)?;
    println!("  write-zeroes (2 ranges; 1 with UNMAP) and discard: ok");
    let got = ranges(blk, T_DISCARD, &[(d.0, d.1, WRITE_ZEROES_UNMAP)])?;
    want("discard with UNMAP", got, S_UNSUPP)?;
    let got = ranges(blk, T_WRITE_ZEROES, &[(base, 512, 2)])?;
    want("write-zeroes with an unknown flag", got, S_UNSUPP)?;
    let end = blk.capacity * 512;
    let got = ranges(blk, T_WRITE_ZEROES, &[(end - 512, 1024, 0)])?;
    want("write-zeroes past the end", got, S_IOERR)?;
    println!("  unknown flags: unsupported; past the end: I/O error");
    if blk.has(virtio::feature::FLUSH) {
        expect(blk, "flush", T_FLUSH, 0, &[], S_OK)?;
    }
    // Read back everything but the discarded range.
    let check = DISCARDED.0 as usize;
    let back = virtio::dma_slice(READ_BUF, check);
    back.fill(0xee);
    let (bufs, n) = segments(READ_BUF, &[65536, 65536, 65536, 32768], true);
    expect(blk, "read", T_IN, base / 512, &bufs[..n], S_OK)?;
    let back = virtio::dma_slice(READ_BUF, check);
    for (i, &b) in back.iter().enumerate() {
        let at = i as u64;
        let zeroed = ZEROED
            .iter()
            .any(|&(o, l)| (o..o + u64::from(l)).contains(&at));
        let expected = if zeroed {
            0
        } else {
            pattern_byte(base + at, seed)
        };
        if b != expected {
            println!(
                "mismatch at disk offset {:#x}: {:#04x}, expected {:#04x}",
                base + at,
                b,
                expected
            );
            return Err("read-back after write-zeroes differs");
        }
    }
    println!(
        "  read back {} KiB: zeroes where zeroed, the pattern elsewhere",
        check / 1024
    );
    Ok(())
}

fn wce(blk: &mut Blk, seed: u8) -> Result<(), &'static str> {
    use virtio::CONFIG_WRITEBACK;
    if !blk.has(virtio::feature::CONFIG_WCE) || !blk.has(virtio::feature::FLUSH) {
        return Err("the device does not offer CONFIG_WCE and FLUSH");
    }
    if blk.config_u8(CONFIG_WRITEBACK) != 1 {
        return Err("the device does not start in write-back mode");
    }
    blk.set_config_u8(CONFIG_WRITEBACK, 0);
    if blk.config_u8(CONFIG_WRITEBACK) != 0 {
        return Err("the device did not switch to write-through");
    }
    println!("  writeback 1 -> 0 (write-through)");
    let (off, len, sizes) = regions(blk.capacity * 512)[1];
    let data = virtio::dma_slice(WRITE_BUF, len);
    for (i, b) in data.iter_mut().enumerate() {
        *b = pattern_byte(off + i as u64, seed);
    }
    let (bufs, n) = segments(WRITE_BUF, sizes, false);
    expect(
        blk,
        "write-through write",
        T_OUT,
        off / 512,
        &bufs[..n],
        S_OK,
    )?;
    read_and_compare(blk, off, len, sizes, seed)?;
    blk.set_config_u8(CONFIG_WRITEBACK, 1);
    if blk.config_u8(CONFIG_WRITEBACK) != 1 {
        return Err("the device did not switch back to write-back");
    }
    println!("  writeback 0 -> 1 (write-back)");
    Ok(())
}

/// Waits a while for the device to raise the used-buffer interrupt status; returns whether it
/// did (and acknowledges it).
fn vring_interrupt(blk: &mut Blk) -> bool {
    for _ in 0..200_000 {
        if blk.take_isr() & 1 != 0 {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

fn event_idx(blk: &mut Blk) -> Result<(), &'static str> {
    if !blk.has(virtio::feature::EVENT_IDX) {
        return Err("the device does not offer EVENT_IDX");
    }
    let one = Buf {
        addr: READ_BUF,
        len: 512,
        device_writes: true,
    };
    // used_event far ahead: the device must not interrupt for these.
    blk.take_isr();
    blk.used_event_gap = 100;
    for _ in 0..3 {
        expect(blk, "read", T_IN, 0, &[one], S_OK)?;
        if vring_interrupt(blk) {
            return Err("the device interrupted before used_event");
        }
    }
    // used_event at the next completion: it must.
    blk.used_event_gap = 0;
    expect(blk, "read", T_IN, 0, &[one], S_OK)?;
    if !vring_interrupt(blk) {
        return Err("the device did not interrupt at used_event");
    }
    let (sent, skipped) = blk.notifies;
    println!(
        "  no interrupt before used_event, one at it; {} notifications sent, {} skipped",
        sent, skipped
    );
    if sent == 0 {
        return Err("no notification was sent");
    }
    Ok(())
}

/// The time stamp counter.
fn rdtsc() -> u64 {
    // SAFETY: reading the TSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// How long `capacity` waits for the change, in TSC ticks (a minute or more at a few GHz).
const CAPACITY_WAIT_TICKS: u64 = 200_000_000_000;

/// Writes the pattern to `len` bytes at `off` and reads it back.
fn write_and_check(blk: &mut Blk, off: u64, len: usize, seed: u8) -> Result<(), &'static str> {
    let data = virtio::dma_slice(WRITE_BUF, len);
    for (i, b) in data.iter_mut().enumerate() {
        *b = pattern_byte(off + i as u64, seed);
    }
    let sizes = [len as u32];
    let (bufs, n) = segments(WRITE_BUF, &sizes, false);
    expect(blk, "write", T_OUT, off / 512, &bufs[..n], S_OK)?;
    println!("  wrote {} KiB at {:#x}", len / 1024, off);
    read_and_compare(blk, off, len, &sizes, seed)
}

fn capacity(blk: &mut Blk, seed: u8) -> Result<(), &'static str> {
    if blk.has(virtio::feature::RO) {
        return Err("the disk is read-only");
    }
    let old = blk.capacity;
    let generation = blk.config_generation();
    blk.take_isr();
    println!(
        "  capacity {} sectors, generation {}: waiting for a capacity change",
        old, generation
    );
    let start = rdtsc();
    let mut interrupted = false;
    let new = loop {
        interrupted |= blk.take_isr() & 2 != 0;
        if interrupted || blk.config_generation() != generation {
            let now = blk.read_capacity();
            if now != old {
                // The change may have landed between the status read and the generation read.
                interrupted |= blk.take_isr() & 2 != 0;
                break now;
            }
        }
        if rdtsc().wrapping_sub(start) > CAPACITY_WAIT_TICKS {
            return Err("the capacity did not change");
        }
        core::hint::spin_loop();
    };
    println!(
        "  capacity changed: {} -> {} sectors (configuration interrupt: {}, generation {})",
        old,
        new,
        if interrupted { "yes" } else { "no" },
        blk.config_generation()
    );
    if !interrupted {
        return Err("the device changed its configuration without a configuration interrupt");
    }
    if new < old + 256 {
        return Err("the disk did not grow by at least 128 KiB");
    }
    blk.capacity = new;
    write_and_check(blk, old * 512, 64 * 1024, seed)?;
    write_and_check(blk, new * 512 - 8192, 8192, seed)?;
    if blk.has(virtio::feature::FLUSH) {
        expect(blk, "flush", T_FLUSH, 0, &[], S_OK)?;
        println!("  flush: ok");
    }
    let one = Buf {
        addr: READ_BUF,
        len: 512,
        device_writes: true,
    };
    expect(blk, "read past the new end", T_IN, new, &[one], S_IOERR)?;
    println!("  read past the new end: I/O error");
    Ok(())
}

/// Where `mq` and `bench` put their data buffers (to the end of the DMA window: 12 MiB).
const BENCH_BUF: u64 = virtio::DMA_BASE + 0x40_0000;
/// Where `mq` writes: queue `q` at `MQ_AREA + q * MQ_STRIDE`, 64 KiB.
const MQ_AREA: u64 = 8 << 20;
const MQ_STRIDE: u64 = 256 << 10;
/// Requests per queue in flight in `mq`, 4 KiB each.
const MQ_REQUESTS: u16 = 16;

/// Polls every queue for completions until `want[q]` came back on each; checks that each is
/// one of the queue's own requests with status OK.
fn collect_mq(blk: &mut Blk, want: u16) -> Result<(), &'static str> {
    let mut got = [0u16; virtio::MAX_QUEUES];
    let mut spins = 0u64;
    while got[..blk.queue_count].iter().any(|&n| n < want) {
        let mut progress = false;
        for (q, n) in got.iter_mut().enumerate().take(blk.queue_count) {
            while let Some((head, _)) = blk.pop_used(q) {
                let slot = (head / 3) as u16;
                if head % 3 != 0 || slot >= want {
                    return Err("a queue returned a chain it was not given");
                }
                if blk.slot_status(q, slot) != S_OK {
                    println!(
                        "queue {} request {}: status {}",
                        q,
                        slot,
                        blk.slot_status(q, slot)
                    );
                    return Err("a request on one of the queues failed");
                }
                *n += 1;
                progress = true;
            }
        }
        if !progress {
            spins += 1;
            if spins > 2_000_000_000 {
                return Err("the device did not complete the requests of every queue");
            }
            core::hint::spin_loop();
        }
    }
    Ok(())
}

fn mq(blk: &mut Blk, seed: u8) -> Result<(), &'static str> {
    if blk.queue_count < 2 {
        return Err("the device offers one queue (start the VMM with --disk TARGET,queues=N)");
    }
    mq_writes(blk, seed)?;
    collect_mq(blk, MQ_REQUESTS)?;
    println!(
        "  {} queues: {} writes of 4 KiB in flight on each, all completed on their own queue",
        blk.queue_count, MQ_REQUESTS
    );
    mq_reads(blk, seed)
}

fn inflight(blk: &mut Blk, seed: u8) -> Result<(), &'static str> {
    mq_writes(blk, seed)?;
    // Give the device's threads time to take the requests (the VMM's clock, in microseconds).
    let start = crate::inl(crate::TIMING_PORT);
    while crate::inl(crate::TIMING_PORT).wrapping_sub(start) < 300_000 {
        core::hint::spin_loop();
    }
    let done = (0..blk.queue_count)
        .map(|q| {
            let mut n = 0;
            while blk.pop_used(q).is_some() {
                n += 1;
            }
            n
        })
        .sum::<u32>();
    println!(
        "  {} queue(s): {} writes submitted on each, {} completed after 300 ms; leaving without \
         waiting for the others",
        blk.queue_count, MQ_REQUESTS, done
    );
    Ok(())
}

fn mq_buf(q: usize, s: u16) -> u64 {
    BENCH_BUF + (q as u64 * u64::from(MQ_REQUESTS) + u64::from(s)) * 4096
}

fn mq_off(q: usize, s: u16) -> u64 {
    MQ_AREA + q as u64 * MQ_STRIDE + u64::from(s) * 4096
}

/// Puts the `mq` writes on every queue and notifies them all.
fn mq_writes(blk: &mut Blk, seed: u8) -> Result<(), &'static str> {
    if blk.has(virtio::feature::RO) {
        return Err("the disk is read-only");
    }
    let nq = blk.queue_count as u64;
    if blk.capacity * 512 < MQ_AREA + nq * MQ_STRIDE {
        return Err("the disk is too small for the mq workload");
    }
    // Every queue gets its writes before any is notified: they are all in flight together.
    for q in 0..blk.queue_count {
        blk.quiet(q);
        for s in 0..MQ_REQUESTS {
            let (addr, off) = (mq_buf(q, s), mq_off(q, s));
            for (i, b) in virtio::dma_slice(addr, 4096).iter_mut().enumerate() {
                *b = pattern_byte(off + i as u64, seed);
            }
            let buf = Buf {
                addr,
                len: 4096,
                device_writes: false,
            };
            blk.prepare(q, s, T_OUT, off / 512, buf);
        }
    }
    for q in 0..blk.queue_count {
        blk.kick(q);
    }
    Ok(())
}

/// Flushes, reads the `mq` areas back on every queue at once and compares.
fn mq_reads(blk: &mut Blk, seed: u8) -> Result<(), &'static str> {
    if blk.has(virtio::feature::FLUSH) {
        expect(blk, "flush", T_FLUSH, 0, &[], S_OK)?;
    }
    for q in 0..blk.queue_count {
        for s in 0..MQ_REQUESTS {
            let addr = mq_buf(q, s);
            virtio::dma_slice(addr, 4096).fill(0xee);
            let buf = Buf {
                addr,
                len: 4096,
                device_writes: true,
            };
            blk.prepare(q, s, T_IN, mq_off(q, s) / 512, buf);
        }
    }
    for q in 0..blk.queue_count {
        blk.kick(q);
    }
    collect_mq(blk, MQ_REQUESTS)?;
    for q in 0..blk.queue_count {
        for s in 0..MQ_REQUESTS {
            let off = mq_off(q, s);
            let back = virtio::dma_slice(mq_buf(q, s), 4096);
            let bad = back
                .iter()
                .enumerate()
                .position(|(i, &b)| b != pattern_byte(off + i as u64, seed));
            if let Some(i) = bad {
                println!("queue {}: mismatch at disk offset {:#x}", q, off + i as u64);
                return Err("read-back on a queue differs from what was written");
            }
        }
    }
    let (sent, skipped) = blk.notifies;
    println!(
        "  read back 64 KiB on each queue: ok; {} notifications sent, {} suppressed",
        sent, skipped
    );
    Ok(())
}

/// The tag a bench write leaves at the start of every sector: magic, then the disk offset.
const BENCH_MAGIC: &[u8; 8] = b"VSTORBNC";
/// The most requests `bench` keeps in flight.
const BENCH_MAX_DEPTH: usize = 1024;

/// A xorshift64* generator (the offsets of `bench`).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Parses a decimal number.
fn number(word: Option<&str>, what: &'static str) -> Result<u64, &'static str> {
    word.and_then(|w| w.parse::<u64>().ok()).ok_or(what)
}

fn bench(blk: &mut Blk, workload: &str) -> Result<(), &'static str> {
    let mut words = workload.split_whitespace().skip(1);
    let write = match words.next() {
        Some("read") => false,
        Some("write") => true,
        _ => return Err("usage: bench read|write DEPTH SIZE COUNT"),
    };
    let depth = number(words.next(), "bench: DEPTH is not a number")? as usize;
    let size = number(words.next(), "bench: SIZE is not a number")?;
    let count = number(words.next(), "bench: COUNT is not a number")?;
    if words.next().is_some() {
        return Err("usage: bench read|write DEPTH SIZE COUNT");
    }
    let nq = blk.queue_count;
    if size == 0 || size % 512 != 0 || size > 64 * 1024 {
        return Err("bench: SIZE must be a multiple of 512 up to 64 KiB");
    }
    if depth == 0 || depth > BENCH_MAX_DEPTH || depth > nq * usize::from(blk.slots(0)) {
        return Err("bench: DEPTH must be from 1 to 1024 and fit the queues (85 per queue)");
    }
    if depth as u64 * size > virtio::DMA_END - BENCH_BUF {
        return Err("bench: DEPTH * SIZE is more than the 12 MiB of buffers");
    }
    if count == 0 {
        return Err("bench: COUNT must be at least 1");
    }
    if write && blk.has(virtio::feature::RO) {
        return Err("the disk is read-only");
    }
    if !blk.has(virtio::feature::EVENT_IDX) {
        return Err("bench: the device does not offer EVENT_IDX");
    }
    let blocks = blk.capacity * 512 / size;
    if blocks == 0 {
        return Err("bench: the disk is smaller than one request");
    }
    let typ = if write { T_OUT } else { T_IN };
    // Request g lives in slot g / nq of queue g % nq, with its own buffer.
    let buf_of = |g: usize| BENCH_BUF + g as u64 * size;
    let mut offsets = [0u64; BENCH_MAX_DEPTH];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (depth as u64) << 32 ^ size);
    // The first request of a slot builds its chain; the next ones only change the sector.
    let mut issue = |blk: &mut Blk, g: usize, offsets: &mut [u64; BENCH_MAX_DEPTH], first: bool| {
        // A uniform block without a division: the high half of random * blocks.
        let off = ((u128::from(rng.next()) * u128::from(blocks)) >> 64) as u64 * size;
        offsets[g] = off;
        let addr = buf_of(g);
        if write {
            let tag = virtio::dma_slice(addr, 16);
            tag[..8].copy_from_slice(BENCH_MAGIC);
            tag[8..16].copy_from_slice(&off.to_le_bytes());
        }
        let (q, slot) = (g % nq, (g / nq) as u16);
        if first {
            let buf = Buf {
                addr,
                len: size as u32,
                device_writes: !write,
            };
            blk.prepare(q, slot, typ, off / 512, buf);
        } else {
            blk.resubmit(q, slot, off / 512);
        }
    };
    if write {
        // The rest of every sector stays zero.
        for g in 0..depth {
            virtio::dma_slice(buf_of(g), size as usize).fill(0);
        }
    }
    for q in 0..nq {
        blk.quiet(q);
    }
    let (mut issued, mut done, mut mismatches) = (0u64, 0u64, 0u64);
    let start = crate::inl(crate::TIMING_PORT);
    for g in 0..depth.min(count as usize) {
        issue(blk, g, &mut offsets, true);
        issued += 1;
    }
    for q in 0..nq {
        blk.kick(q);
    }
    let (mut idle, mut waits) = (0u64, 0u64);
    while done < count {
        let mut progress = false;
        for q in 0..nq {
            while let Some((head, _)) = blk.pop_used(q) {
                let slot = (head / 3) as u16;
                let g = usize::from(slot) * nq + q;
                if head % 3 != 0 || g >= depth {
                    return Err("the device returned a chain that was not submitted");
                }
                if blk.slot_status(q, slot) != S_OK {
                    println!(
                        "bench: request at {:#x}: status {}",
                        offsets[g],
                        blk.slot_status(q, slot)
                    );
                    return Err("a benchmark request failed");
                }
                if !write {
                    // Two loads: the tag's magic and offset (zero where nothing was written).
                    let head = virtio::dma_slice(buf_of(g), 16);
                    let word = |i: usize| {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&head[8 * i..8 * i + 8]);
                        u64::from_le_bytes(w)
                    };
                    let (magic, tag) = (word(0), word(1));
                    let zero = magic == 0 && tag == 0;
                    if !zero && (magic != u64::from_le_bytes(*BENCH_MAGIC) || tag != offsets[g]) {
                        mismatches += 1;
                    }
                }
                done += 1;
                progress = true;
                if issued < count {
                    issue(blk, g, &mut offsets, false);
                    issued += 1;
                }
            }
            if progress {
                blk.quiet(q);
                blk.kick(q);
            }
        }
        if progress {
            idle = 0;
            continue;
        }
        // Everything is in flight: ask for an interrupt at the next completion of each queue,
        // look again (one may have landed meanwhile), and halt until it comes.
        for q in 0..nq {
            blk.interrupt_at_next(q);
        }
        if (0..nq).any(|q| blk.used_pending(q)) {
            continue;
        }
        crate::irq::wait();
        waits += 1;
        idle += 1;
        if idle > 100_000_000 {
            return Err("the device stopped completing benchmark requests");
        }
    }
    if write && blk.has(virtio::feature::FLUSH) {
        expect(blk, "flush", T_FLUSH, 0, &[], S_OK)?;
    }
    let us = u64::from(crate::inl(crate::TIMING_PORT).wrapping_sub(start)).max(1);
    let (sent, skipped) = blk.notifies;
    println!(
        "bench-result: op={} depth={} size={} queues={} count={} us={} iops={} notifies={} suppressed={} waits={} mismatches={}",
        if write { "write" } else { "read" },
        depth,
        size,
        nq,
        count,
        us,
        count * 1_000_000 / us,
        sent,
        skipped,
        waits,
        mismatches
    );
    if mismatches != 0 {
        return Err("bench: blocks read back hold neither zeroes nor their own tag");
    }
    Ok(())
}

/// Times two loops: 10,000,000 iterations of a register-only `dec`/`jnz` loop, and 1,000,000 of
/// a multiply-add through memory (the stack): the speed of the guest's instructions, which
/// bounds what the benchmark can reach per request.
fn cpu() -> Result<(), &'static str> {
    const REGISTER_LOOPS: u64 = 10_000_000;
    const MEMORY_LOOPS: u64 = 1_000_000;
    let start = crate::inl(crate::TIMING_PORT);
    // SAFETY: a counted loop on one register.
    unsafe {
        core::arch::asm!(
            "2: dec {n}",
            "jnz 2b",
            n = inout(reg) REGISTER_LOOPS => _,
            options(nomem, nostack)
        )
    };
    let registers = crate::inl(crate::TIMING_PORT).wrapping_sub(start);
    let start = crate::inl(crate::TIMING_PORT);
    let mut x = 1u64;
    for i in 0..MEMORY_LOOPS {
        x = core::hint::black_box(x.wrapping_mul(3).wrapping_add(i));
    }
    let memory = crate::inl(crate::TIMING_PORT).wrapping_sub(start);
    println!(
        "cpu-result: register_loops={} us={} memory_loops={} us={} (x={:#x})",
        REGISTER_LOOPS,
        registers,
        MEMORY_LOOPS,
        memory,
        x & 0xff
    );
    Ok(())
}
