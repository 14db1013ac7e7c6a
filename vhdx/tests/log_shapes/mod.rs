//! Crafted VHDX logs: the shapes of `mk_evil_log.py` (one entry with many zero descriptors, an
//! entry header in every sector) and random chains of entries, built from fuzz input. Shared by
//! the fuzz target `vhdx_log` and the test `vhdx/tests/log.rs`.
//!
//! Oracles: the search of the log does at most [`ScanWork::bound`] work; an in-memory replay
//! holds at most five times the log's length, whatever the zero ranges say; and it reads what
//! a replay into the file writes.
#![allow(dead_code)]

use std::sync::Arc;

use vstor_core::{BlockDevice, MemoryDevice};
use vstor_vhdx::format::*;
use vstor_vhdx::log::{self, LogWrite, Overlay, ScanWork};
use zerocopy::IntoBytes;

/// Where the crafted log lies in the file.
pub const LOG_AT: u64 = MIB;
/// The LogGuid of the crafted entries.
pub const GUID: Guid = Guid([7; 16]);

/// Reads the input a byte at a time; zeros when it runs out.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub fn new(d: &'a [u8]) -> Self {
        Input(d)
    }
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

/// An entry of `length` bytes: header, descriptors, data sectors for the data descriptors,
/// checksum sealed when `seal_it`.
#[allow(clippy::too_many_arguments)]
pub fn entry(
    seq: u64,
    length: u64,
    tail: u64,
    descs: &[Descriptor],
    file_size: u64,
    seal_it: bool,
) -> Vec<u8> {
    let mut e = vec![0u8; length as usize];
    let hdr = LogEntryHeader {
        signature: LOG_ENTRY_SIGNATURE,
        checksum: 0.into(),
        entry_length: (length as u32).into(),
        tail: (tail as u32).into(),
        sequence_number: seq.into(),
        descriptor_count: (descs.len() as u32).into(),
        reserved: 0.into(),
        log_guid: GUID,
        flushed_file_offset: file_size.into(),
        last_file_offset: file_size.into(),
    };
    e[..64].copy_from_slice(hdr.as_bytes());
    let desc_sectors = (64 + 32 * descs.len() as u64).div_ceil(LOG_SECTOR);
    let mut data_at = desc_sectors * LOG_SECTOR;
    for (i, d) in descs.iter().enumerate() {
        let at = 64 + 32 * i;
        if at + 32 > e.len() {
            break;
        }
        e[at..at + 32].copy_from_slice(d.as_bytes());
        if d.signature == DATA_DESC_SIGNATURE && data_at + LOG_SECTOR <= length {
            let ds = DataSector {
                signature: DATA_SECTOR_SIGNATURE,
                sequence_high: ((seq >> 32) as u32).into(),
                data: [(i as u8) | 1; 4084],
                sequence_low: (seq as u32).into(),
            };
            e[data_at as usize..(data_at + LOG_SECTOR) as usize].copy_from_slice(ds.as_bytes());
            data_at += LOG_SECTOR;
        }
    }
    if seal_it {
        seal(&mut e, 4);
    }
    e
}

pub fn zero_desc(offset: u64, len: u64, seq: u64) -> Descriptor {
    Descriptor {
        signature: ZERO_DESC_SIGNATURE,
        trailing_bytes: [0; 4],
        leading_or_length: len.to_le_bytes(),
        file_offset: offset.into(),
        sequence_number: seq.into(),
    }
}

pub fn data_desc(offset: u64, seq: u64) -> Descriptor {
    Descriptor {
        signature: DATA_DESC_SIGNATURE,
        trailing_bytes: [0xD1; 4],
        leading_or_length: [0xD2; 8],
        file_offset: offset.into(),
        sequence_number: seq.into(),
    }
}

/// `mk_evil_log.py zeros N`: one valid entry with `n` zero descriptors of 256 MiB, 1 GiB apart.
pub fn zeros_shape(log_len: u64, n: u64) -> Vec<u8> {
    let descs: Vec<Descriptor> = (0..n)
        .map(|k| zero_desc(4 * MIB + k * (1 << 30), 256 * MIB, 1))
        .collect();
    let length = (64 + 32 * n).div_ceil(LOG_SECTOR) * LOG_SECTOR;
    let mut log = vec![0u8; log_len as usize];
    log[..length as usize].copy_from_slice(&entry(1, length, 0, &descs, 4 * MIB, true));
    log
}

/// `mk_evil_log.py scan`: an entry header in every sector, each claiming the whole log.
pub fn scan_shape(log_len: u64) -> Vec<u8> {
    let mut log = vec![0u8; log_len as usize];
    for (k, sec) in log.chunks_exact_mut(LOG_SECTOR as usize).enumerate() {
        let e = entry(1000 + k as u64, LOG_SECTOR, 0, &[], log_len + LOG_AT, false);
        sec.copy_from_slice(&e);
        sec[8..12].copy_from_slice(&(log_len as u32).to_le_bytes());
    }
    log
}

/// A log built from fuzz input.
pub fn from_input(inp: &mut Input<'_>) -> Vec<u8> {
    let log_len = MIB * (1 + inp.u8() as u64 % 2);
    let sectors = log_len / LOG_SECTOR;
    let mut log = match inp.u8() % 4 {
        0 => {
            // Zero descriptors (and some data ones) of lengths up to the largest valid.
            let n = inp.u16() as u64 % ((log_len - 64) / 32 - 128);
            let seq = 1 + inp.u8() as u64;
            let mut descs = Vec::with_capacity(n as usize);
            let mut data = 0u64;
            for _ in 0..n {
                let off = (inp.u32() as u64 % (1 << 26)) * LOG_SECTOR + 8 * MIB;
                if inp.u8() % 8 == 0 && data < 64 {
                    descs.push(data_desc(off, seq));
                    data += 1;
                } else {
                    let len = match inp.u8() % 4 {
                        0 => 0,
                        1 => (inp.u16() as u64) * LOG_SECTOR,
                        2 => 256 * MIB,
                        _ => (inp.u32() as u64 % (1 << 30)) * LOG_SECTOR,
                    };
                    descs.push(zero_desc(off, len, seq));
                }
            }
            let length = ((64 + 32 * n).div_ceil(LOG_SECTOR) + data) * LOG_SECTOR;
            let mut log = vec![0u8; log_len as usize];
            if length <= log_len {
                log[..length as usize].copy_from_slice(&entry(seq, length, 0, &descs, 0, true));
            }
            log
        }
        1 => {
            // Headers every `step` sectors with lengths and counts from the input.
            let mut log = vec![0u8; log_len as usize];
            let step = 1 + inp.u8() as u64 % 8;
            let mut k = 0;
            while k < sectors {
                let length = (1 + inp.u16() as u64 % sectors) * LOG_SECTOR;
                let count = inp.u8() as u64 % 200;
                let descs: Vec<Descriptor> = (0..count)
                    .map(|i| data_desc(8 * MIB + i * LOG_SECTOR, 1000 + k))
                    .collect();
                let tail = (inp.u16() as u64 % sectors) * LOG_SECTOR;
                let e = entry(1000 + k, length, tail, &descs, 0, inp.u8() % 2 == 0);
                let take = (LOG_SECTOR * step)
                    .min(length)
                    .min((sectors - k) * LOG_SECTOR);
                let at = (k * LOG_SECTOR) as usize;
                log[at..at + take as usize].copy_from_slice(&e[..take as usize]);
                k += step;
            }
            log
        }
        _ => {
            // Chains of valid entries with breaks, wrapping around.
            let mut log = vec![0u8; log_len as usize];
            let mut pos = (inp.u16() as u64 % sectors) * LOG_SECTOR;
            let mut seq = 1 + inp.u8() as u64;
            let mut tail = pos;
            for _ in 0..(1 + inp.u8() % 40) {
                let nd = inp.u8() as u64 % 8;
                let descs: Vec<Descriptor> = (0..nd)
                    .map(|i| {
                        if inp.u8() % 2 == 0 {
                            data_desc(8 * MIB + i * LOG_SECTOR, seq)
                        } else {
                            zero_desc(8 * MIB + i * LOG_SECTOR, inp.u8() as u64 * LOG_SECTOR, seq)
                        }
                    })
                    .collect();
                let data = descs
                    .iter()
                    .filter(|d| d.signature == DATA_DESC_SIGNATURE)
                    .count() as u64;
                let length = ((64 + 32 * nd).div_ceil(LOG_SECTOR) + data) * LOG_SECTOR;
                if inp.u8() % 6 == 0 {
                    tail = pos;
                }
                let e = entry(seq, length, tail, &descs, 0, inp.u8() % 16 != 0);
                for (i, s) in e.chunks_exact(LOG_SECTOR as usize).enumerate() {
                    let at = ((pos + i as u64 * LOG_SECTOR) % log_len) as usize;
                    log[at..at + LOG_SECTOR as usize].copy_from_slice(s);
                }
                pos = (pos + length) % log_len;
                seq = match inp.u8() % 8 {
                    0 => inp.u8() as u64,
                    _ => seq + 1,
                };
            }
            log
        }
    };
    // A few byte patches over anything.
    for _ in 0..inp.u8() % 4 {
        let at = inp.u32() as usize % log.len();
        let b = inp.u8();
        log[at] = b;
    }
    log
}

/// A device with `log` at [`LOG_AT`].
pub fn device(log: &[u8]) -> Arc<dyn BlockDevice> {
    let d = MemoryDevice::new(LOG_AT + log.len() as u64 + MIB).unwrap();
    d.write_at(LOG_AT, log).unwrap();
    Arc::new(d)
}

/// Runs the oracles on `log`; returns the work of the search and the replay's memory.
pub fn check_log(log: &[u8]) -> (ScanWork, Option<u64>) {
    let len = log.len() as u64;
    let dev = device(log);
    let (active, work) = match log::find_active_counted(&*dev, "fuzz", LOG_AT, len, GUID) {
        Ok(x) => x,
        Err(_) => return (ScanWork::default(), None),
    };
    assert!(
        work.within(&ScanWork::bound(len)),
        "the search did {work:?}, more than {:?}",
        ScanWork::bound(len)
    );
    let Some(active) = active else {
        return (work, None);
    };
    if log::validate_targets(&active, "fuzz", LOG_AT, len).is_err() {
        return (work, None);
    }
    let o = match Overlay::new(dev.clone(), "fuzz", &active) {
        Ok(o) => o,
        Err(_) => return (work, None),
    };
    let mem = o.memory_bytes();
    assert!(
        mem <= 5 * len,
        "the replay holds {mem} bytes for a {len}-byte log"
    );
    // The in-memory replay reads what a replay into a copy of the file writes (where the
    // zero ranges are small enough to write).
    let zeroed: u64 = active
        .entries
        .iter()
        .flat_map(|e| &e.writes)
        .map(|w| match w {
            LogWrite::Zero { len, .. } => *len,
            LogWrite::Data { .. } => LOG_SECTOR,
        })
        .sum();
    if zeroed <= 64 * MIB {
        let copy = device(log);
        log::replay(&*copy, "fuzz", &active).unwrap();
        assert_eq!(o.capacity(), copy.capacity());
        let mut probes: Vec<u64> = vec![0, LOG_AT, 2 * MIB];
        for w in active.entries.iter().flat_map(|e| &e.writes) {
            let (off, l) = match w {
                LogWrite::Zero { offset, len } => (*offset, *len),
                LogWrite::Data { offset, .. } => (*offset, LOG_SECTOR),
            };
            probes.extend([
                off.saturating_sub(LOG_SECTOR),
                off,
                off + l.saturating_sub(LOG_SECTOR),
                off + l,
            ]);
        }
        for p in probes {
            if p + 2 * LOG_SECTOR > o.capacity() {
                continue;
            }
            let mut a = vec![0u8; 2 * LOG_SECTOR as usize];
            let mut b = vec![0u8; 2 * LOG_SECTOR as usize];
            o.read_at(p, &mut a).unwrap();
            copy.read_at(p, &mut b).unwrap();
            assert!(a == b, "the in-memory replay reads other bytes at {p}");
        }
    }
    (work, Some(mem))
}

/// The fuzz target's body.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let log = from_input(&mut inp);
    check_log(&log);
}
