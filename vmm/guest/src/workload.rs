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
//! The pattern byte at disk offset `o` is `((o >> 9) as u8 * 37) ^ (o as u8) ^ 0xa5 ^ seed`; the
//! VMM's CI test recomputes it on the host.

use crate::println;
use crate::virtio::{
    self, flags, Blk, Buf, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT,
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
pub fn run(mmio_base: u64, workload: &str) -> Result<(), &'static str> {
    let mut blk = Blk::init(mmio_base)?;
    println!(
        "virtio-blk: {} sectors, block size {}, seg_max {}, features {:#x}{}",
        blk.capacity,
        blk.blk_size,
        blk.seg_max,
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
    let (name, seed) = parse(workload)?;
    match name {
        "" | "pattern" => pattern(&mut blk, seed),
        "verify" => verify(&mut blk, seed),
        "readonly" => readonly(&mut blk),
        "malformed" => malformed(&mut blk),
        _ => Err("unknown workload (known: pattern, verify, readonly, malformed)"),
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
