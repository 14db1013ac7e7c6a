//! The VHDX log: finding the active sequence, replaying it (to the file, or in memory for a
//! read-only open), and writing new entries.

use std::collections::BTreeMap;
use std::sync::Arc;

use vstor_core::{BlockDevice, DeviceInfo, Error, Op, Request, Result};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::corrupt;
use crate::format::*;

/// The largest log this implementation reads into memory to search (Hyper-V and QEMU write 1 MiB).
pub const MAX_LOG_LENGTH: u64 = 64 * MIB;
/// Files larger than this are refused as log targets (64 TiB of data plus metadata).
pub const MAX_FILE_OFFSET: u64 = 1 << 47;

/// One write a log entry makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogWrite {
    /// A 4 KiB sector.
    Data {
        /// Target file offset.
        offset: u64,
        /// The sector.
        sector: Box<[u8; 4096]>,
    },
    /// Zeros.
    Zero {
        /// Target file offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A valid log entry as found in the log.
#[derive(Clone, Debug)]
pub struct LogEntry {
    /// Its position in the log.
    pub position: u64,
    /// Its length in bytes.
    pub length: u64,
    /// Its sequence number.
    pub sequence: u64,
    /// Its tail.
    pub tail: u64,
    /// FlushedFileOffset.
    pub flushed_file_offset: u64,
    /// LastFileOffset.
    pub last_file_offset: u64,
    /// What it writes, in order.
    pub writes: Vec<LogWrite>,
}

/// The active sequence of a log: the entries to replay, oldest first.
#[derive(Clone, Debug)]
pub struct ActiveLog {
    /// The entries from tail to head.
    pub entries: Vec<LogEntry>,
}

impl ActiveLog {
    /// The head (newest) entry.
    pub fn head(&self) -> &LogEntry {
        self.entries.last().expect("an active log has entries")
    }
}

fn read_log(
    file: &dyn BlockDevice,
    name: &str,
    log_offset: u64,
    log_length: u64,
) -> Result<Vec<u8>> {
    if log_length == 0 || log_length % MIB != 0 || log_offset % MIB != 0 {
        return Err(corrupt(
            name,
            HEADER_OFFSETS[0],
            "header log location",
            format!("log at {log_offset} of {log_length} bytes is not 1 MiB aligned"),
        ));
    }
    if log_length > MAX_LOG_LENGTH {
        return Err(crate::error::VhdxError::Unsupported {
            file: name.to_string(),
            what: format!("a log of {log_length} bytes (the most read is {MAX_LOG_LENGTH})"),
        }
        .into());
    }
    let end = log_offset.saturating_add(log_length);
    if end > file.capacity() {
        return Err(corrupt(
            name,
            log_offset,
            "log",
            format!(
                "log region ends at {end}, past the end of the file ({} bytes)",
                file.capacity()
            ),
        ));
    }
    let mut buf = vec![0u8; log_length as usize];
    file.read_at(log_offset, &mut buf)?;
    Ok(buf)
}

/// The work a search of the log did (for tests and fuzzing: it is linear in the log's size
/// whatever the log holds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanWork {
    /// Sectors whose first bytes were looked at for an entry header.
    pub sectors: u64,
    /// Descriptors parsed, and data or padding sectors checked, over every candidate entry.
    pub descriptors: u64,
    /// Bytes checksummed.
    pub checksummed: u64,
    /// Entries parsed in full (with their data) for the active sequence.
    pub parsed: u64,
}

impl ScanWork {
    /// The most work a search of a log of `log_length` bytes does: every sector looked at once,
    /// at most 128 descriptors and one data sector per sector of the log, every byte
    /// checksummed at most once, and each entry of the active sequence parsed once.
    pub fn bound(log_length: u64) -> ScanWork {
        let sectors = log_length / LOG_SECTOR;
        ScanWork {
            sectors,
            descriptors: 2 * (LOG_SECTOR / 32) * sectors + 2 * sectors,
            checksummed: log_length,
            parsed: sectors,
        }
    }

    /// Whether every counter is within `b`.
    pub fn within(&self, b: &ScanWork) -> bool {
        self.sectors <= b.sectors
            && self.descriptors <= b.descriptors
            && self.checksummed <= b.checksummed
            && self.parsed <= b.parsed
    }
}

/// The facts of a valid entry that the search needs (its data stays in the log until the
/// entry turns out to be part of the active sequence).
#[derive(Clone, Copy, Debug)]
struct Candidate {
    position: u64,
    length: u64,
    sequence: u64,
    tail: u64,
}

/// The log's bytes, read circularly.
struct Ring<'a> {
    log: &'a [u8],
}

impl Ring<'_> {
    fn len(&self) -> u64 {
        self.log.len() as u64
    }

    /// The 4 KiB sector at `pos` (a multiple of 4 KiB), wrapping around.
    fn sector(&self, pos: u64) -> &[u8] {
        let p = (pos % self.len()) as usize;
        &self.log[p..p + LOG_SECTOR as usize]
    }

    /// Whether the sector at `pos` starts an entry of `guid`.
    fn starts_entry(&self, pos: u64, guid: Guid) -> bool {
        let s = self.sector(pos);
        s[..4] == LOG_ENTRY_SIGNATURE && s[32..48] == guid.0
    }

    /// The CRC-32C of the entry at `pos` of `length` bytes, its checksum field taken as zero.
    fn checksum(&self, pos: u64, length: u64) -> u32 {
        let mut c = crc32c::crc32c(&self.sector(pos)[..4]);
        c = crc32c::crc32c_append(c, &[0; 4]);
        let mut p = pos % self.len() + 8;
        let mut left = length - 8;
        while left > 0 {
            let take = left.min(self.len() - p);
            c = crc32c::crc32c_append(c, &self.log[p as usize..(p + take) as usize]);
            left -= take;
            p = (p + take) % self.len();
        }
        c
    }

    /// The descriptor `i` of the entry at `pos`.
    fn descriptor(&self, pos: u64, i: u64) -> Descriptor {
        let at = 64 + 32 * i;
        let s = self.sector(pos + at / LOG_SECTOR * LOG_SECTOR);
        let o = (at % LOG_SECTOR) as usize;
        Descriptor::read_from_bytes(&s[o..o + 32]).expect("32 bytes")
    }
}

/// Checks the entry at `pos` without copying its data: `None` when it is not a valid entry of
/// `guid`. The checks stop at the first sector inside the entry that starts another entry of
/// this log (no valid entry holds one: its other sectors start with a descriptor, a data
/// sector's signature, or padding that is not an entry), so over all positions the
/// descriptors looked at and the bytes checksummed stay linear in the log's size.
fn check_entry(ring: &Ring<'_>, pos: u64, guid: Guid, work: &mut ScanWork) -> Option<Candidate> {
    let n = ring.len();
    let hdr = LogEntryHeader::read_from_prefix(ring.sector(pos)).ok()?.0;
    if hdr.signature != LOG_ENTRY_SIGNATURE || hdr.log_guid != guid {
        return None;
    }
    let length = hdr.entry_length.get() as u64;
    let tail = hdr.tail.get() as u64;
    let count = hdr.descriptor_count.get() as u64;
    if length == 0 || length % LOG_SECTOR != 0 || length > n || tail % LOG_SECTOR != 0 || tail >= n
    {
        return None;
    }
    let desc_sectors = (64 + 32 * count).div_ceil(LOG_SECTOR);
    if desc_sectors * LOG_SECTOR > length {
        return None;
    }
    let seq = hdr.sequence_number.get();
    let mut data_at = desc_sectors * LOG_SECTOR;
    for i in 0..count {
        work.descriptors += 1;
        let d = ring.descriptor(pos, i);
        let offset = d.file_offset.get();
        if d.sequence_number.get() != seq || offset % LOG_SECTOR != 0 || offset >= MAX_FILE_OFFSET {
            return None;
        }
        match d.signature {
            ZERO_DESC_SIGNATURE => {
                let len = u64::from_le_bytes(d.leading_or_length);
                if len % LOG_SECTOR != 0 || len > MAX_FILE_OFFSET - offset {
                    return None;
                }
            }
            DATA_DESC_SIGNATURE => {
                if data_at + LOG_SECTOR > length {
                    return None;
                }
                work.descriptors += 1;
                let ds = DataSector::read_from_bytes(ring.sector(pos + data_at)).ok()?;
                if ds.signature != DATA_SECTOR_SIGNATURE
                    || ds.sequence_high.get() as u64 != seq >> 32
                    || ds.sequence_low.get() as u64 != seq & 0xffff_ffff
                {
                    return None;
                }
                data_at += LOG_SECTOR;
            }
            _ => return None,
        }
    }
    // Sectors past the data (no writer known pads, but the format allows it) may hold
    // anything but an entry of this log.
    while data_at < length {
        work.descriptors += 1;
        if ring.starts_entry(pos + data_at, guid) {
            return None;
        }
        data_at += LOG_SECTOR;
    }
    work.checksummed += length;
    if ring.checksum(pos, length) != hdr.checksum.get() {
        return None;
    }
    Some(Candidate {
        position: pos,
        length,
        sequence: seq,
        tail,
    })
}

/// Parses the writes of a checked entry.
fn parse_writes(ring: &Ring<'_>, c: &Candidate, work: &mut ScanWork) -> Option<LogEntry> {
    work.parsed += 1;
    let hdr = LogEntryHeader::read_from_prefix(ring.sector(c.position))
        .ok()?
        .0;
    let count = hdr.descriptor_count.get() as u64;
    let mut writes = Vec::with_capacity(count.min(c.length / 32) as usize);
    let mut data_at = (64 + 32 * count).div_ceil(LOG_SECTOR) * LOG_SECTOR;
    for i in 0..count {
        let d = ring.descriptor(c.position, i);
        let offset = d.file_offset.get();
        match d.signature {
            ZERO_DESC_SIGNATURE => {
                let len = u64::from_le_bytes(d.leading_or_length);
                writes.push(LogWrite::Zero { offset, len });
            }
            _ => {
                let ds = DataSector::read_from_bytes(ring.sector(c.position + data_at)).ok()?;
                let mut sector = Box::new([0u8; 4096]);
                sector[..8].copy_from_slice(&d.leading_or_length);
                sector[8..4092].copy_from_slice(&ds.data);
                sector[4092..].copy_from_slice(&d.trailing_bytes);
                writes.push(LogWrite::Data { offset, sector });
                data_at += LOG_SECTOR;
            }
        }
    }
    Some(LogEntry {
        position: c.position,
        length: c.length,
        sequence: c.sequence,
        tail: c.tail,
        flushed_file_offset: hdr.flushed_file_offset.get(),
        last_file_offset: hdr.last_file_offset.get(),
        writes,
    })
}

/// Finds the active sequence of the log: the valid sequence whose head has the highest
/// sequence number, where a sequence runs from its head's tail to its head through entries
/// that are each valid, adjacent and numbered consecutively, and fits in the log. Entries of
/// other LogGuids are stale and ignored. `None` when no entry qualifies (nothing to replay).
pub fn find_active(
    file: &dyn BlockDevice,
    name: &str,
    log_offset: u64,
    log_length: u64,
    guid: Guid,
) -> Result<Option<ActiveLog>> {
    find_active_counted(file, name, log_offset, log_length, guid).map(|(a, _)| a)
}

/// [`find_active`], with the work it did (at most [`ScanWork::bound`] of the log's length).
pub fn find_active_counted(
    file: &dyn BlockDevice,
    name: &str,
    log_offset: u64,
    log_length: u64,
    guid: Guid,
) -> Result<(Option<ActiveLog>, ScanWork)> {
    let log = read_log(file, name, log_offset, log_length)?;
    let ring = Ring { log: &log };
    let mut work = ScanWork::default();
    let sectors = (log_length / LOG_SECTOR) as usize;
    // Every valid entry, and which one starts at each sector.
    let mut found: Vec<Candidate> = Vec::new();
    let mut at: Vec<u32> = vec![u32::MAX; sectors];
    for (k, slot) in at.iter_mut().enumerate() {
        work.sectors += 1;
        let pos = k as u64 * LOG_SECTOR;
        if ring.starts_entry(pos, guid) {
            if let Some(c) = check_entry(&ring, pos, guid, &mut work) {
                *slot = found.len() as u32;
                found.push(c);
            }
        }
    }
    // Each entry's successor in a sequence: the entry right after it, numbered one higher.
    // Following successors, the sequence numbers grow by one at each step, so there is no
    // cycle: the entries form trees whose edges point to the successor.
    let nf = found.len();
    let succ: Vec<Option<usize>> = found
        .iter()
        .map(|c| {
            let next = ((c.position + c.length) % log_length / LOG_SECTOR) as usize;
            let j = at[next];
            (j != u32::MAX && found[j as usize].sequence == c.sequence.wrapping_add(1))
                .then_some(j as usize)
        })
        .collect();
    // Visit the trees from their roots (entries with no successor): `tin`/`tout` tell whether
    // an entry reaches another by successors; `bytes` is the length from an entry to its root
    // (the root excluded), so the bytes from one entry to another it reaches are a difference.
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); nf];
    for (i, s) in succ.iter().enumerate() {
        if let Some(j) = s {
            children[*j].push(i);
        }
    }
    let (mut tin, mut tout, mut bytes) = (vec![0u64; nf], vec![0u64; nf], vec![0u64; nf]);
    let mut clock = 0u64;
    let mut stack: Vec<(usize, bool)> = Vec::new();
    for root in (0..nf).filter(|&i| succ[i].is_none()) {
        stack.push((root, false));
        while let Some((i, done)) = stack.pop() {
            if done {
                tout[i] = clock;
                clock += 1;
                continue;
            }
            tin[i] = clock;
            clock += 1;
            if let Some(j) = succ[i] {
                bytes[i] = bytes[j] + found[i].length;
            }
            stack.push((i, true));
            for &c in &children[i] {
                stack.push((c, false));
            }
        }
    }
    let mut heads: Vec<usize> = (0..nf).collect();
    heads.sort_by_key(|&i| std::cmp::Reverse(found[i].sequence));
    for h in heads {
        let head = &found[h];
        let a = at[(head.tail / LOG_SECTOR) as usize];
        if a == u32::MAX {
            continue;
        }
        let a = a as usize;
        let reaches = tin[h] <= tin[a] && tout[a] <= tout[h];
        if !reaches || bytes[a] - bytes[h] + head.length > log_length {
            continue;
        }
        let mut chain = Vec::new();
        let mut i = a;
        loop {
            let Some(e) = parse_writes(&ring, &found[i], &mut work) else {
                return Err(corrupt(
                    name,
                    log_offset + found[i].position,
                    "log entry",
                    "changed while it was read",
                ));
            };
            chain.push(e);
            if i == h {
                break;
            }
            i = succ[i].expect("a reaches h");
        }
        return Ok((Some(ActiveLog { entries: chain }), work));
    }
    Ok((None, work))
}

/// Checks that an active log only writes where a log may write: not over the file identifier,
/// the headers or the log itself, and not absurdly far into the file.
pub fn validate_targets(
    active: &ActiveLog,
    name: &str,
    log_offset: u64,
    log_length: u64,
) -> Result<()> {
    for e in &active.entries {
        if e.last_file_offset > MAX_FILE_OFFSET || e.flushed_file_offset > MAX_FILE_OFFSET {
            return Err(corrupt(
                name,
                log_offset + e.position,
                "log entry",
                format!(
                    "file offsets {} / {} are absurd",
                    e.flushed_file_offset, e.last_file_offset
                ),
            ));
        }
        for w in &e.writes {
            let (off, len) = match w {
                LogWrite::Data { offset, .. } => (*offset, LOG_SECTOR),
                LogWrite::Zero { offset, len } => (*offset, *len),
            };
            let end = off + len;
            let hits_log = off < log_offset + log_length && end > log_offset;
            if off < REGION_TABLE_OFFSETS[0] || hits_log {
                return Err(corrupt(
                    name,
                    log_offset + e.position,
                    "log entry descriptor",
                    format!("writes [{off}, {end}), over the headers or the log itself"),
                ));
            }
        }
    }
    Ok(())
}

/// Replays an active log into the file: every write in order, a flush, the file extended to
/// LastFileOffset. (The caller then clears the header's LogGuid.)
pub fn replay(file: &dyn BlockDevice, name: &str, active: &ActiveLog) -> Result<()> {
    let head = active.head();
    let size = file.capacity();
    if size < head.flushed_file_offset {
        return Err(corrupt(name, 0, "file size", format!("the file is {size} bytes, but the log says {} bytes were flushed: it was truncated", head.flushed_file_offset)));
    }
    let mut need = head.last_file_offset.max(size);
    for e in &active.entries {
        for w in &e.writes {
            need = need.max(match w {
                LogWrite::Data { offset, .. } => offset + LOG_SECTOR,
                // An empty zero range writes nothing.
                LogWrite::Zero { len: 0, .. } => 0,
                LogWrite::Zero { offset, len } => offset + len,
            });
        }
    }
    if need > size {
        file.resize(need)?;
    }
    for e in &active.entries {
        for w in &e.writes {
            match w {
                LogWrite::Data { offset, sector } => file.write_at(*offset, &sector[..])?,
                LogWrite::Zero { offset, len } => write_zeros(file, *offset, *len)?,
            }
        }
    }
    file.flush()
}

/// Writes zeros over [offset, offset+len): the file's write-zeroes where it has one, else a
/// zero buffer, 1 MiB at a time.
pub(crate) fn write_zeros(file: &dyn BlockDevice, offset: u64, len: u64) -> Result<()> {
    if file.info().supports.write_zeroes && file.write_zeroes(offset, len).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; MIB as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB);
        file.write_at(offset + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// What the in-memory replay holds for a piece of the file.
#[derive(Debug)]
enum Piece {
    /// Zeros up to this end offset.
    Zero(u64),
    /// One 4 KiB sector.
    Data(Box<[u8; 4096]>),
}

impl Piece {
    fn end(&self, start: u64) -> u64 {
        match self {
            Piece::Zero(end) => *end,
            Piece::Data(_) => start + LOG_SECTOR,
        }
    }
}

/// Bytes of memory an [`Overlay`] counts for each piece it holds (a map node and its key),
/// besides a data sector's 4 KiB.
const PIECE_COST: u64 = 64;

/// A read-only view of a file with a log replayed in memory: reads see the log's writes.
///
/// Zeroed ranges are held as ranges, whatever their length, and data sectors one by one: the
/// memory it takes is bounded by the active sequence's size, which fits in the log (see
/// [`Overlay::memory_bytes`]).
pub struct Overlay {
    inner: Arc<dyn BlockDevice>,
    /// Non-overlapping pieces by start offset (all 4 KiB aligned).
    pieces: BTreeMap<u64, Piece>,
    capacity: u64,
}

impl Overlay {
    /// Applies `active` over `inner` in memory.
    pub fn new(inner: Arc<dyn BlockDevice>, name: &str, active: &ActiveLog) -> Result<Self> {
        let head = active.head();
        let size = inner.capacity();
        if size < head.flushed_file_offset {
            return Err(corrupt(name, 0, "file size", format!("the file is {size} bytes, but the log says {} bytes were flushed: it was truncated", head.flushed_file_offset)));
        }
        let mut o = Overlay {
            inner,
            pieces: BTreeMap::new(),
            capacity: size.max(head.last_file_offset),
        };
        for e in &active.entries {
            for w in &e.writes {
                match w {
                    LogWrite::Data { offset, sector } => {
                        o.put(*offset, *offset + LOG_SECTOR, Piece::Data(sector.clone()))
                    }
                    LogWrite::Zero { offset, len } if *len > 0 => {
                        o.put(*offset, offset + len, Piece::Zero(offset + len))
                    }
                    LogWrite::Zero { .. } => {}
                }
            }
        }
        Ok(o)
    }

    /// Puts `piece` over [start, end), replacing what was there.
    fn put(&mut self, start: u64, end: u64, piece: Piece) {
        self.capacity = self.capacity.max(end);
        // A zero range that begins before and reaches into [start, end) keeps its head (data
        // pieces are single sectors: they lie inside or outside).
        if let Some((_, Piece::Zero(e))) = self.pieces.range_mut(..start).next_back() {
            let e0 = *e;
            if e0 > start {
                *e = start;
                if e0 > end {
                    self.pieces.insert(end, Piece::Zero(e0));
                }
            }
        }
        // Pieces that begin inside go; the tail of the last one past `end` stays.
        let inside: Vec<u64> = self.pieces.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some(p) = self.pieces.remove(&s) {
                let e = p.end(s);
                if e > end {
                    if let Piece::Zero(_) = p {
                        self.pieces.insert(end, Piece::Zero(e));
                    }
                }
            }
        }
        self.pieces.insert(start, piece);
    }

    /// The memory the replay holds: 4 KiB per data sector and a small constant per piece. An
    /// active sequence fits in the log, its descriptors take 32 bytes of it each and its data
    /// sectors 4 KiB, and each descriptor adds at most two pieces: so this is at most five times
    /// the log's length, whatever the log says.
    pub fn memory_bytes(&self) -> u64 {
        self.pieces
            .values()
            .map(|p| match p {
                Piece::Zero(_) => PIECE_COST,
                Piece::Data(_) => PIECE_COST + LOG_SECTOR,
            })
            .sum()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.inner.capacity();
        // The part inside the real file, then zeros past its end.
        let real = (size.saturating_sub(offset) as usize).min(buf.len());
        if real > 0 {
            self.inner.read_at(offset, &mut buf[..real])?;
        }
        buf[real..].fill(0);
        let end = offset + buf.len() as u64;
        let before = self
            .pieces
            .range(..offset)
            .next_back()
            .filter(|(&s, p)| p.end(s) > offset);
        for (&s, p) in before.into_iter().chain(self.pieces.range(offset..end)) {
            let lo = s.max(offset);
            let hi = p.end(s).min(end);
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match p {
                Piece::Zero(_) => dst.fill(0),
                Piece::Data(d) => dst.copy_from_slice(&d[(lo - s) as usize..(hi - s) as usize]),
            }
        }
        Ok(())
    }
}

impl BlockDevice for Overlay {
    fn info(&self) -> DeviceInfo {
        let mut i = self.inner.info();
        i.capacity = self.capacity;
        i.read_only = true;
        i.supports.resize = false;
        i
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let info = self.info();
        for req in batch.iter_mut() {
            let r = info.check(req).and_then(|_| match &mut req.op {
                Op::Read { offset, bufs } => {
                    let mut off = *offset;
                    for b in bufs.iter_mut() {
                        self.read(off, b)?;
                        off += b.len() as u64;
                    }
                    Ok(())
                }
                Op::Flush => Ok(()),
                _ => Err(vstor_core::Error::ReadOnly { op: req.kind() }),
            });
            req.complete(r);
        }
    }

    fn describe(&self) -> String {
        format!("{} with its log replayed in memory", self.inner.describe())
    }
}

/// Writes log entries for a session.
#[derive(Debug)]
pub struct LogWriter {
    /// Log region offset in the file.
    pub log_offset: u64,
    /// Log region length.
    pub log_length: u64,
    /// This session's LogGuid.
    pub guid: Guid,
    /// Next sequence number.
    pub sequence: u64,
    /// Where the next entry goes.
    pub head: u64,
}

/// Most data descriptors in one entry of a log of `log_length` bytes.
pub fn max_pages_per_entry(log_length: u64) -> usize {
    let sectors = log_length / LOG_SECTOR;
    // (desc sectors) + n <= sectors, desc sectors = ceil((64 + 32 n) / 4096)
    let mut n = sectors.saturating_sub(1);
    while n > 0 && (64 + 32 * n).div_ceil(LOG_SECTOR) + n > sectors {
        n -= 1;
    }
    n as usize
}

impl LogWriter {
    /// A writer for a fresh session (a new LogGuid, writing from the start of the log).
    pub fn new(log_offset: u64, log_length: u64) -> Self {
        LogWriter {
            log_offset,
            log_length,
            guid: Guid::random(),
            sequence: 1,
            head: 0,
        }
    }

    /// Builds one entry for `pages` (4 KiB sectors with their file offsets) with `tail`.
    fn build(
        &mut self,
        zeros: &[(u64, u64)],
        pages: &[(u64, &[u8])],
        tail: u64,
        flushed: u64,
        last: u64,
    ) -> Vec<u8> {
        let n = pages.len() as u64;
        let nd = n + zeros.len() as u64;
        let desc_sectors = (64 + 32 * nd).div_ceil(LOG_SECTOR);
        let length = (desc_sectors + n) * LOG_SECTOR;
        let seq = self.sequence;
        self.sequence += 1;
        let mut buf = vec![0u8; length as usize];
        let hdr = LogEntryHeader {
            signature: LOG_ENTRY_SIGNATURE,
            checksum: 0.into(),
            entry_length: (length as u32).into(),
            tail: (tail as u32).into(),
            sequence_number: seq.into(),
            descriptor_count: (nd as u32).into(),
            reserved: 0.into(),
            log_guid: self.guid,
            flushed_file_offset: flushed.into(),
            last_file_offset: last.into(),
        };
        buf[..64].copy_from_slice(hdr.as_bytes());
        // Zero descriptors first: replay applies descriptors in order, so pages may refine a
        // zeroed range.
        for (i, &(off, len)) in zeros.iter().enumerate() {
            let d = Descriptor {
                signature: ZERO_DESC_SIGNATURE,
                trailing_bytes: [0; 4],
                leading_or_length: len.to_le_bytes(),
                file_offset: off.into(),
                sequence_number: seq.into(),
            };
            let at = 64 + 32 * i;
            buf[at..at + 32].copy_from_slice(d.as_bytes());
        }
        for (i, (off, data)) in pages.iter().enumerate() {
            let i_desc = zeros.len() + i;
            let d = Descriptor {
                signature: DATA_DESC_SIGNATURE,
                trailing_bytes: data[4092..4096].try_into().expect("4"),
                leading_or_length: data[..8].try_into().expect("8"),
                file_offset: (*off).into(),
                sequence_number: seq.into(),
            };
            let at = 64 + 32 * i_desc;
            buf[at..at + 32].copy_from_slice(d.as_bytes());
            let mut ds = DataSector {
                signature: DATA_SECTOR_SIGNATURE,
                sequence_high: ((seq >> 32) as u32).into(),
                data: [0; 4084],
                sequence_low: (seq as u32).into(),
            };
            ds.data.copy_from_slice(&data[8..4092]);
            let at = ((desc_sectors + i as u64) * LOG_SECTOR) as usize;
            buf[at..at + 4096].copy_from_slice(ds.as_bytes());
        }
        seal(&mut buf, 4);
        buf
    }

    /// Writes one sequence of entries holding `pages` (which must fit in the log: see
    /// [`LogWriter::capacity_pages`]). Every earlier entry must already be retired (its
    /// in-place writes flushed), so the sequence starts fresh with its own tail. Does not flush.
    pub fn write_sequence(
        &mut self,
        file: &dyn BlockDevice,
        pages: &[(u64, &[u8])],
        flushed: u64,
        last: u64,
    ) -> Result<()> {
        let per = max_pages_per_entry(self.log_length).max(1);
        let total: u64 = pages
            .chunks(per)
            .map(|c| {
                ((64 + 32 * c.len() as u64).div_ceil(LOG_SECTOR) + c.len() as u64) * LOG_SECTOR
            })
            .sum::<u64>()
            .max(LOG_SECTOR);
        debug_assert!(total <= self.log_length);
        if self.head + total > self.log_length {
            self.head = 0;
        }
        let tail = self.head;
        let mut entries: Vec<Vec<u8>> = Vec::new();
        if pages.is_empty() {
            entries.push(self.build(&[], &[], tail, flushed, last));
        }
        for c in pages.chunks(per) {
            entries.push(self.build(&[], c, tail, flushed, last));
        }
        let mut reqs: Vec<Request<'_>> = Vec::with_capacity(entries.len());
        let mut pos = self.head;
        for e in &entries {
            reqs.push(Request::write(self.log_offset + pos, e));
            pos += e.len() as u64;
        }
        file.submit_all(&mut reqs)?;
        self.head = pos % self.log_length;
        Ok(())
    }

    /// Writes one entry that zeroes `zeros` (offsets and lengths in whole 4 KiB sectors) and
    /// then writes `pages`: changes that must apply together or not at all. Fails, writing
    /// nothing, when they do not fit in one entry. Every earlier entry must already be
    /// retired. Does not flush.
    pub fn write_entry(
        &mut self,
        file: &dyn BlockDevice,
        zeros: &[(u64, u64)],
        pages: &[(u64, &[u8])],
        flushed: u64,
        last: u64,
    ) -> Result<()> {
        let nd = (zeros.len() + pages.len()) as u64;
        let length = ((64 + 32 * nd).div_ceil(LOG_SECTOR) + pages.len() as u64) * LOG_SECTOR;
        if length > self.log_length
            || zeros
                .iter()
                .any(|&(o, l)| o % LOG_SECTOR != 0 || l % LOG_SECTOR != 0 || l == 0)
        {
            return Err(Error::InvalidArgument(format!(
                "a log entry of {} zero ranges and {} pages does not fit a {}-byte log",
                zeros.len(),
                pages.len(),
                self.log_length
            )));
        }
        if self.head + length > self.log_length {
            self.head = 0;
        }
        let tail = self.head;
        let e = self.build(zeros, pages, tail, flushed, last);
        file.write_at(self.log_offset + self.head, &e)?;
        self.head = (self.head + length) % self.log_length;
        Ok(())
    }

    /// How many pages one sequence may carry.
    pub fn capacity_pages(&self) -> usize {
        let per = max_pages_per_entry(self.log_length).max(1);
        let entry_sectors = |n: u64| (64 + 32 * n).div_ceil(LOG_SECTOR) + n;
        let sectors = self.log_length / LOG_SECTOR;
        let full = sectors / entry_sectors(per as u64);
        let mut n = full as usize * per;
        let left = sectors - full * entry_sectors(per as u64);
        let mut extra = 0u64;
        while extra < per as u64 && entry_sectors(extra + 1) <= left {
            extra += 1;
        }
        n += extra as usize;
        n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_core::MemoryDevice;

    fn dev() -> MemoryDevice {
        MemoryDevice::new(8 * MIB).unwrap()
    }

    #[test]
    fn written_sequences_are_found_and_replayed() {
        let f = dev();
        let mut w = LogWriter::new(MIB, MIB);
        let a = vec![0xAAu8; 4096];
        let b = vec![0xBBu8; 4096];
        w.write_sequence(&f, &[(4 * MIB, &a), (5 * MIB, &b)], 8 * MIB, 8 * MIB)
            .unwrap();
        let act = find_active(&f, "t", MIB, MIB, w.guid).unwrap().unwrap();
        assert_eq!(act.entries.len(), 1);
        replay(&f, "t", &act).unwrap();
        let mut r = vec![0u8; 4096];
        f.read_at(5 * MIB, &mut r).unwrap();
        assert_eq!(r, b);
        // A newer sequence wins; an older guid is ignored.
        let c = vec![0xCCu8; 4096];
        w.write_sequence(&f, &[(4 * MIB, &c)], 8 * MIB, 8 * MIB)
            .unwrap();
        let act = find_active(&f, "t", MIB, MIB, w.guid).unwrap().unwrap();
        assert_eq!(act.head().sequence, 2);
        assert!(find_active(&f, "t", MIB, MIB, Guid::random())
            .unwrap()
            .is_none());
    }

    #[test]
    fn big_sequences_span_several_entries_and_wrap() {
        let f = dev();
        let mut w = LogWriter::new(MIB, MIB);
        let cap = w.capacity_pages();
        assert!(cap > 200 && cap < 256, "{cap}");
        let pages: Vec<Vec<u8>> = (0..cap).map(|i| vec![i as u8; 4096]).collect();
        let refs: Vec<(u64, &[u8])> = pages
            .iter()
            .enumerate()
            .map(|(i, p)| (2 * MIB + i as u64 * 4096, &p[..]))
            .collect();
        w.write_sequence(&f, &refs[..10], 0, 0).unwrap();
        w.write_sequence(&f, &refs, 0, 0).unwrap();
        let act = find_active(&f, "t", MIB, MIB, w.guid).unwrap().unwrap();
        let n: usize = act.entries.iter().map(|e| e.writes.len()).sum();
        assert_eq!(n, cap);
        assert_eq!(act.entries[0].position, 0);
    }

    #[test]
    fn a_torn_entry_falls_back_to_the_previous_sequence() {
        let f = dev();
        let mut w = LogWriter::new(MIB, MIB);
        let a = vec![1u8; 4096];
        w.write_sequence(&f, &[(4 * MIB, &a)], 0, 0).unwrap();
        let head = w.head;
        w.write_sequence(&f, &[(4 * MIB, &a), (5 * MIB, &a)], 0, 0)
            .unwrap();
        // Tear the second entry's last sector.
        f.write_at(MIB + head + 8192, &[0u8; 4096]).unwrap();
        let act = find_active(&f, "t", MIB, MIB, w.guid).unwrap().unwrap();
        assert_eq!(act.head().sequence, 1);
    }

    #[test]
    fn overlay_shows_the_log_without_writing() {
        let f: Arc<dyn BlockDevice> = Arc::new(dev());
        let mut w = LogWriter::new(MIB, MIB);
        let a = vec![0x5Au8; 4096];
        w.write_sequence(&*f, &[(4 * MIB, &a)], 0, 10 * MIB)
            .unwrap();
        let act = find_active(&*f, "t", MIB, MIB, w.guid).unwrap().unwrap();
        let o = Overlay::new(f.clone(), "t", &act).unwrap();
        assert_eq!(o.capacity(), 10 * MIB);
        let mut r = vec![0u8; 8192];
        o.read_at(4 * MIB - 4096, &mut r).unwrap();
        assert!(r[..4096].iter().all(|&x| x == 0) && r[4096..] == a[..]);
        f.read_at(4 * MIB, &mut r[..4096]).unwrap();
        assert!(r[..4096].iter().all(|&x| x == 0));
    }

    /// An entry header of `length` bytes with `descs` descriptors after it (no data sectors),
    /// sealed, as a crafted log would hold it.
    fn crafted(
        guid: Guid,
        seq: u64,
        length: u64,
        tail: u64,
        descs: &[Descriptor],
        file_size: u64,
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
            log_guid: guid,
            flushed_file_offset: file_size.into(),
            last_file_offset: file_size.into(),
        };
        e[..64].copy_from_slice(hdr.as_bytes());
        for (i, d) in descs.iter().enumerate() {
            e[64 + 32 * i..96 + 32 * i].copy_from_slice(d.as_bytes());
        }
        seal(&mut e, 4);
        e
    }

    fn zero_desc(offset: u64, len: u64, seq: u64) -> Descriptor {
        Descriptor {
            signature: ZERO_DESC_SIGNATURE,
            trailing_bytes: [0; 4],
            leading_or_length: len.to_le_bytes(),
            file_offset: offset.into(),
            sequence_number: seq.into(),
        }
    }

    #[test]
    fn a_zero_descriptor_of_any_length_replays_in_memory_as_a_range() {
        // As an older vstor's resize wrote it: the grown BAT zeroed by one 512 MiB descriptor,
        // with pages after it that refine the range.
        let f: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(8 * MIB).unwrap());
        f.write_at(4 * MIB, &[0x11u8; 8192]).unwrap();
        let mut w = LogWriter::new(MIB, MIB);
        let page = vec![0x5Au8; 4096];
        w.write_entry(
            &*f,
            &[(4 * MIB, 512 * MIB)],
            &[(6 * MIB, &page)],
            8 * MIB,
            516 * MIB,
        )
        .unwrap();
        let act = find_active(&*f, "t", MIB, MIB, w.guid).unwrap().unwrap();
        let o = Overlay::new(f.clone(), "t", &act).unwrap();
        assert_eq!(o.capacity(), 516 * MIB);
        assert!(o.memory_bytes() < 16 * 1024, "{}", o.memory_bytes());
        let mut r = vec![0xFFu8; 3 * 4096];
        o.read_at(6 * MIB - 4096, &mut r).unwrap();
        assert!(r[..4096].iter().all(|&b| b == 0));
        assert_eq!(&r[4096..8192], &page[..]);
        assert!(r[8192..].iter().all(|&b| b == 0));
        o.read_at(4 * MIB, &mut r[..8192]).unwrap();
        assert!(
            r[..8192].iter().all(|&b| b == 0),
            "the zeroed range hides the file"
        );
        o.read_at(515 * MIB, &mut r).unwrap();
        assert!(r.iter().all(|&b| b == 0));
        // Writes in order: a later zero range over part of the data, the data over a zero
        // range, ranges that split each other.
        // (three entries of one sequence).
        let mut w = LogWriter::new(MIB, MIB);
        let a = vec![0xA1u8; 4096];
        let b = vec![0xB2u8; 4096];
        let (fl, la) = (8 * MIB, 8 * MIB);
        let e1 = w.build(&[], &[(5 * MIB, &a), (5 * MIB + 8192, &a)], 0, fl, la);
        let e2 = w.build(&[(5 * MIB + 4096, 8192)], &[], 0, fl, la);
        let e3 = w.build(&[(4 * MIB, MIB)], &[(4 * MIB + 4096, &b)], 0, fl, la);
        f.write_at(MIB, &[e1, e2, e3].concat()).unwrap();
        let act = find_active(&*f, "t", MIB, MIB, w.guid).unwrap().unwrap();
        assert_eq!(act.entries.len(), 3);
        let o = Overlay::new(f.clone(), "t", &act).unwrap();
        let mut r = vec![0u8; 4 * 4096];
        o.read_at(4 * MIB, &mut r).unwrap();
        assert!(r[..4096].iter().all(|&x| x == 0));
        assert_eq!(&r[4096..8192], &b[..]);
        assert!(r[8192..].iter().all(|&x| x == 0));
        o.read_at(5 * MIB, &mut r).unwrap();
        assert_eq!(&r[..4096], &a[..]);
        assert!(r[4096..12288].iter().all(|&x| x == 0));
        assert!(r[12288..].iter().all(|&x| x == 0));
    }

    #[test]
    fn zero_descriptors_are_held_as_ranges_and_the_replay_memory_is_bounded() {
        // mk_evil_log.py zeros N: one valid entry with N zero descriptors of 256 MiB each, N
        // up to as many as a 1 MiB log holds.
        for n in [8u64, 16, 1024, (MIB - 64) / 32 - 200] {
            let f: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 * MIB).unwrap());
            let guid = Guid::random();
            let descs: Vec<Descriptor> = (0..n)
                .map(|k| zero_desc(4 * MIB + k * GIB_T, 256 * MIB, 1))
                .collect();
            let length = (64 + 32 * n).div_ceil(4096) * 4096;
            let e = crafted(guid, 1, length, 0, &descs, 4 * MIB);
            f.write_at(MIB, &e).unwrap();
            let act = find_active(&*f, "t", MIB, MIB, guid).unwrap().unwrap();
            let o = Overlay::new(f.clone(), "t", &act).unwrap();
            assert!(o.memory_bytes() <= 5 * MIB, "{n}: {}", o.memory_bytes());
            assert!(o.memory_bytes() <= (n + 1) * 2 * PIECE_COST, "{n}");
            let mut r = vec![0xFFu8; 4096];
            o.read_at(4 * MIB + (n - 1) * GIB_T + 100 * MIB, &mut r)
                .unwrap();
            assert!(r.iter().all(|&b| b == 0));
        }
    }

    const GIB_T: u64 = 1 << 30;

    /// mk_evil_log.py scan: an entry header in every sector of the log, each claiming the whole
    /// log (their checksums do not match).
    fn scan_shape(log_len: u64, guid: Guid) -> Vec<u8> {
        let mut log = vec![0u8; log_len as usize];
        for (k, sec) in log.chunks_exact_mut(4096).enumerate() {
            let hdr = LogEntryHeader {
                signature: LOG_ENTRY_SIGNATURE,
                checksum: 0.into(),
                entry_length: (log_len as u32).into(),
                tail: 0.into(),
                sequence_number: (1000 + k as u64).into(),
                descriptor_count: 0.into(),
                reserved: 0.into(),
                log_guid: guid,
                flushed_file_offset: 0.into(),
                last_file_offset: 0.into(),
            };
            sec[..64].copy_from_slice(hdr.as_bytes());
        }
        log
    }

    #[test]
    fn finding_the_active_sequence_is_linear_in_the_log_whatever_it_holds() {
        let guid = Guid::random();
        for mib in [1u64, 32, 64] {
            let len = mib * MIB;
            let f = MemoryDevice::new(len + MIB).unwrap();
            // Headers everywhere, claiming the whole log.
            f.write_at(MIB, &scan_shape(len, guid)).unwrap();
            let (act, work) = find_active_counted(&f, "t", MIB, len, guid).unwrap();
            assert!(act.is_none());
            assert!(work.within(&ScanWork::bound(len)), "{mib} MiB: {work:?}");
            // Headers everywhere whose descriptors claim the following sectors.
            let mut log = scan_shape(len, guid);
            for sec in log.chunks_exact_mut(4096) {
                sec[24..28].copy_from_slice(&126u32.to_le_bytes());
                sec[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            }
            f.write_at(MIB, &log).unwrap();
            let (_, work) = find_active_counted(&f, "t", MIB, len, guid).unwrap();
            assert!(work.within(&ScanWork::bound(len)), "{mib} MiB: {work:?}");
        }
        // Valid one-sector entries in every sector, all with their tail at 0 and consecutive
        // numbers but one: every head above the break walks back to it (the naive walk is
        // quadratic). The answer is the sequence before the break.
        let len = 16 * MIB;
        let f = MemoryDevice::new(len + MIB).unwrap();
        let sectors = len / 4096;
        let brk = sectors / 2;
        let mut log = vec![0u8; len as usize];
        for k in 0..sectors {
            let seq = if k == brk { 7 } else { 1000 + k };
            let e = crafted(guid, seq, 4096, 0, &[], 0);
            log[(k * 4096) as usize..((k + 1) * 4096) as usize].copy_from_slice(&e);
        }
        f.write_at(MIB, &log).unwrap();
        let (act, work) = find_active_counted(&f, "t", MIB, len, guid).unwrap();
        let act = act.unwrap();
        assert_eq!(act.entries.len() as u64, brk);
        assert_eq!(act.head().sequence, 1000 + brk - 1);
        assert!(work.within(&ScanWork::bound(len)), "{work:?}");
    }

    /// The search as it was written first (quadratic): every valid entry a head candidate,
    /// walked from its tail. The reference the linear search must agree with.
    fn naive_head(f: &dyn BlockDevice, len: u64, guid: Guid) -> Option<(u64, u64, usize)> {
        let log = read_log(f, "t", MIB, len).unwrap();
        let ring = Ring { log: &log };
        let mut found = BTreeMap::new();
        for pos in (0..len).step_by(4096) {
            if let Some(c) = check_entry(&ring, pos, guid, &mut ScanWork::default()) {
                found.insert(pos, c);
            }
        }
        let mut heads: Vec<&Candidate> = found.values().collect();
        heads.sort_by_key(|e| std::cmp::Reverse(e.sequence));
        'heads: for head in heads {
            let mut pos = head.tail;
            let mut expected: Option<u64> = None;
            let mut walked = 0u64;
            let mut n = 0;
            loop {
                let Some(e) = found.get(&pos) else {
                    continue 'heads;
                };
                if expected.is_some_and(|x| e.sequence != x) {
                    continue 'heads;
                }
                n += 1;
                if e.position == head.position {
                    if walked + e.length > len {
                        continue 'heads;
                    }
                    return Some((head.position, head.sequence, n));
                }
                walked += e.length;
                if walked >= len {
                    continue 'heads;
                }
                expected = Some(e.sequence.wrapping_add(1));
                pos = (pos + e.length) % len;
            }
        }
        None
    }

    #[test]
    fn the_linear_search_agrees_with_the_naive_one_on_random_logs() {
        let mut rng = fastrand::Rng::with_seed(21);
        for round in 0..300 {
            let f = MemoryDevice::new(3 * MIB).unwrap();
            let mut w = LogWriter::new(MIB, MIB);
            let guid = w.guid;
            for _ in 0..rng.usize(1..12) {
                let n = rng.usize(0..60);
                let pages: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 4096]).collect();
                let refs: Vec<(u64, &[u8])> = pages
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (2 * MIB + i as u64 * 4096, &p[..]))
                    .collect();
                if rng.bool() {
                    w.head = rng.u64(0..256) * 4096;
                }
                if rng.u8(0..4) == 0 {
                    w.sequence = rng.u64(1..40);
                }
                w.write_sequence(&f, &refs, 0, 0).unwrap();
            }
            // Tear or stale some sectors.
            for _ in 0..rng.usize(0..4) {
                let s = rng.u64(0..256);
                let mut b = vec![0u8; 4096];
                let k = rng.usize(0..4096);
                rng.fill(&mut b[..k]);
                f.write_at(MIB + s * 4096, &b).unwrap();
            }
            let (act, work) = find_active_counted(&f, "t", MIB, MIB, guid).unwrap();
            let fast = act.map(|a| (a.head().position, a.head().sequence, a.entries.len()));
            assert_eq!(fast, naive_head(&f, MIB, guid), "round {round}");
            assert!(
                work.within(&ScanWork::bound(MIB)),
                "round {round}: {work:?}"
            );
        }
    }
}
