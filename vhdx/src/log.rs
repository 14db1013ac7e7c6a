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

/// Reads `len` bytes of the circular log starting at `pos`.
fn circular(log: &[u8], pos: u64, len: u64) -> Vec<u8> {
    let n = log.len() as u64;
    let mut out = Vec::with_capacity(len as usize);
    let mut p = pos % n;
    let mut left = len;
    while left > 0 {
        let take = left.min(n - p);
        out.extend_from_slice(&log[p as usize..(p + take) as usize]);
        left -= take;
        p = (p + take) % n;
    }
    out
}

/// Parses the entry at `pos`; `None` when it is not a valid entry of `guid`.
fn parse_entry(log: &[u8], pos: u64, guid: Guid) -> Option<LogEntry> {
    let n = log.len() as u64;
    let hdr = LogEntryHeader::read_from_prefix(&log[pos as usize..])
        .ok()?
        .0;
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
    let bytes = circular(log, pos, length);
    if checksum(&bytes, 4) != hdr.checksum.get() {
        return None;
    }
    let seq = hdr.sequence_number.get();
    let mut writes = Vec::with_capacity(count as usize);
    let mut data_at = desc_sectors * LOG_SECTOR;
    for i in 0..count {
        let at = (64 + 32 * i) as usize;
        let d = Descriptor::read_from_bytes(&bytes[at..at + 32]).ok()?;
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
                writes.push(LogWrite::Zero { offset, len });
            }
            DATA_DESC_SIGNATURE => {
                if data_at + LOG_SECTOR > length {
                    return None;
                }
                let ds = DataSector::read_from_bytes(
                    &bytes[data_at as usize..(data_at + LOG_SECTOR) as usize],
                )
                .ok()?;
                if ds.signature != DATA_SECTOR_SIGNATURE
                    || ds.sequence_high.get() as u64 != seq >> 32
                    || ds.sequence_low.get() as u64 != seq & 0xffff_ffff
                {
                    return None;
                }
                let mut sector = Box::new([0u8; 4096]);
                sector[..8].copy_from_slice(&d.leading_or_length);
                sector[8..4092].copy_from_slice(&ds.data);
                sector[4092..].copy_from_slice(&d.trailing_bytes);
                writes.push(LogWrite::Data { offset, sector });
                data_at += LOG_SECTOR;
            }
            _ => return None,
        }
    }
    Some(LogEntry {
        position: pos,
        length,
        sequence: seq,
        tail,
        flushed_file_offset: hdr.flushed_file_offset.get(),
        last_file_offset: hdr.last_file_offset.get(),
        writes,
    })
}

/// Finds the active sequence of the log: the valid sequence whose head has the highest
/// sequence number, where a sequence runs from its head's tail to its head through entries
/// that are each valid, adjacent and numbered consecutively. Entries of other LogGuids are
/// stale and ignored. `None` when no entry qualifies (nothing to replay).
pub fn find_active(
    file: &dyn BlockDevice,
    name: &str,
    log_offset: u64,
    log_length: u64,
    guid: Guid,
) -> Result<Option<ActiveLog>> {
    let log = read_log(file, name, log_offset, log_length)?;
    let mut found: BTreeMap<u64, LogEntry> = BTreeMap::new();
    for pos in (0..log_length).step_by(LOG_SECTOR as usize) {
        if log[pos as usize..pos as usize + 4] == LOG_ENTRY_SIGNATURE {
            if let Some(e) = parse_entry(&log, pos, guid) {
                found.insert(pos, e);
            }
        }
    }
    let mut heads: Vec<&LogEntry> = found.values().collect();
    heads.sort_by_key(|e| std::cmp::Reverse(e.sequence));
    'heads: for head in heads {
        // Walk from the tail to the head.
        let mut chain = Vec::new();
        let mut pos = head.tail;
        let mut expected: Option<u64> = None;
        let mut walked = 0u64;
        loop {
            let Some(e) = found.get(&pos) else {
                continue 'heads;
            };
            if let Some(x) = expected {
                if e.sequence != x {
                    continue 'heads;
                }
            }
            chain.push(e.clone());
            if e.position == head.position {
                if e.sequence != head.sequence {
                    continue 'heads;
                }
                break;
            }
            walked += e.length;
            if walked >= log_length {
                continue 'heads;
            }
            expected = Some(e.sequence.wrapping_add(1));
            pos = (pos + e.length) % log_length;
        }
        return Ok(Some(ActiveLog { entries: chain }));
    }
    Ok(None)
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

/// A read-only view of a file with a log replayed in memory: reads see the log's writes.
pub struct Overlay {
    inner: Arc<dyn BlockDevice>,
    /// 4 KiB sectors by file offset (zeros stored as zero sectors).
    sectors: BTreeMap<u64, Box<[u8; 4096]>>,
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
        let mut sectors = BTreeMap::new();
        let mut capacity = size.max(head.last_file_offset);
        for e in &active.entries {
            for w in &e.writes {
                match w {
                    LogWrite::Data { offset, sector } => {
                        sectors.insert(*offset, sector.clone());
                        capacity = capacity.max(offset + LOG_SECTOR);
                    }
                    LogWrite::Zero { offset, len } => {
                        // Zero ranges in logs are small (metadata); cap what memory they may cost.
                        if len / LOG_SECTOR > 65536 {
                            return Err(crate::error::VhdxError::Unsupported {
                                file: name.to_string(),
                                what: format!("replaying a {len}-byte zero descriptor in memory"),
                            }
                            .into());
                        }
                        for s in (0..*len).step_by(LOG_SECTOR as usize) {
                            sectors.insert(offset + s, Box::new([0u8; 4096]));
                        }
                        capacity = capacity.max(offset + len);
                    }
                }
            }
        }
        Ok(Overlay {
            inner,
            sectors,
            capacity,
        })
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
        let first = offset - offset % LOG_SECTOR;
        for (&s, data) in self.sectors.range(first..end) {
            let lo = s.max(offset);
            let hi = (s + LOG_SECTOR).min(end);
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&data[(lo - s) as usize..(hi - s) as usize]);
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
}
