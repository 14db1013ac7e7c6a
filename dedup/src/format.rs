//! On-disk formats: container files (a header, then chunk records) and stubs (what an
//! optimized file holds: a header, its chunk list, then a log of writes made since).
//!
//! Every structure is little-endian, versioned and checksummed with CRC-32C; every parser
//! takes untrusted bytes and returns a typed error, never panics, and allocates no more than
//! the bytes it was given justify.

use crate::chunk::ChunkId;
use crate::error::{DedupError, Result};

/// A store's identity (random, made at `enable`).
pub type StoreId = [u8; 16];

/// The id in hex.
pub fn store_hex(id: &StoreId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

// ---------------------------------------------------------------------------------------------
// Containers.

/// A container file's magic.
pub const CONTAINER_MAGIC: &[u8; 8] = b"VSTDCTR1";
/// The size of a container header.
pub const CONTAINER_HEADER: usize = 64;
/// A chunk record's magic.
pub const RECORD_MAGIC: u32 = 0x4b4e_4843; // "CHNK"
/// The size of a chunk record's header.
pub const RECORD_HEADER: usize = 56;
/// Record flag: the data is LZ4-compressed.
pub const FLAG_LZ4: u32 = 1;

/// A container header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerHeader {
    /// The store it belongs to.
    pub store: StoreId,
    /// Its number.
    pub id: u32,
}

impl ContainerHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; CONTAINER_HEADER] {
        let mut b = [0u8; CONTAINER_HEADER];
        b[..8].copy_from_slice(CONTAINER_MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..32].copy_from_slice(&self.store);
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a header; `file` names the container in errors.
    pub fn decode(b: &[u8], file: &str) -> Result<ContainerHeader> {
        if b.len() < CONTAINER_HEADER {
            return Err(DedupError::corrupt(file, "shorter than a container header"));
        }
        if &b[..8] != CONTAINER_MAGIC {
            return Err(DedupError::corrupt(file, "not a container (bad magic)"));
        }
        if crc32c::crc32c(&b[..60]) != u32_at(b, 60) {
            return Err(DedupError::corrupt(
                file,
                "container header checksum mismatch",
            ));
        }
        let version = u32_at(b, 8);
        if version != 1 {
            return Err(DedupError::corrupt(
                file,
                format!("container version {version} (this vstor knows 1)"),
            ));
        }
        Ok(ContainerHeader {
            store: b[16..32].try_into().expect("16 bytes"),
            id: u32_at(b, 12),
        })
    }
}

/// The header of one chunk record in a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// The chunk's id.
    pub id: ChunkId,
    /// Its length uncompressed.
    pub raw_len: u32,
    /// The length of the data stored after the header.
    pub stored_len: u32,
    /// [`FLAG_LZ4`] or 0.
    pub flags: u32,
}

/// The largest chunk a store accepts (FastCDC 2020's maximum).
pub const MAX_CHUNK: u32 = 16 << 20;

impl RecordHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; RECORD_HEADER] {
        let mut b = [0u8; RECORD_HEADER];
        b[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.raw_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        b[16..48].copy_from_slice(&self.id);
        let crc = crc32c::crc32c(&b[..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a record header.
    pub fn decode(b: &[u8]) -> std::result::Result<RecordHeader, String> {
        if b.len() < RECORD_HEADER {
            return Err("shorter than a record header".into());
        }
        if u32_at(b, 0) != RECORD_MAGIC {
            return Err("no chunk record here (bad magic)".into());
        }
        if crc32c::crc32c(&b[..52]) != u32_at(b, 52) {
            return Err("record header checksum mismatch".into());
        }
        let h = RecordHeader {
            flags: u32_at(b, 4),
            raw_len: u32_at(b, 8),
            stored_len: u32_at(b, 12),
            id: b[16..48].try_into().expect("32 bytes"),
        };
        if h.raw_len > MAX_CHUNK || h.stored_len > MAX_CHUNK + MAX_CHUNK / 64 + 64 {
            return Err(format!(
                "record of {} bytes ({} stored) is larger than any chunk",
                h.raw_len, h.stored_len
            ));
        }
        if h.flags & !FLAG_LZ4 != 0 {
            return Err(format!("unknown record flags {:#x}", h.flags));
        }
        Ok(h)
    }
}

// ---------------------------------------------------------------------------------------------
// Stubs.

/// A stub's magic: the first 8 bytes of an optimized file.
pub const STUB_MAGIC: &[u8; 8] = b"VSTDSTUB";
/// The size of a stub header.
pub const STUB_HEADER: usize = 128;
/// The size of one chunk entry of a stub.
pub const STUB_ENTRY: usize = 56;
/// The stub format version.
pub const STUB_VERSION: u32 = 1;

/// Where one chunk of a stream lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Its id.
    pub id: ChunkId,
    /// The container.
    pub container: u32,
    /// The offset of its record in the container.
    pub offset: u64,
    /// Its length uncompressed.
    pub raw_len: u32,
    /// The length stored after the record header.
    pub stored_len: u32,
    /// Record flags.
    pub flags: u32,
}

/// A stub header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StubHeader {
    /// The store the chunks live in.
    pub store: StoreId,
    /// The stream's number in the store's index.
    pub stream: u64,
    /// The size of the file's content when it was optimized (the chunks' total).
    pub chunked_size: u64,
    /// Number of chunk entries.
    pub chunks: u32,
    /// The byte offset of the write log (after the entries, 4 KiB aligned).
    pub log_start: u64,
}

/// Encodes a stub's header and chunk list (the log follows at `log_start`).
pub fn encode_stub(store: &StoreId, stream: u64, refs: &[ChunkRef]) -> Vec<u8> {
    let entries = refs.len() * STUB_ENTRY;
    let log_start = (STUB_HEADER + entries).div_ceil(4096) * 4096;
    let mut b = vec![0u8; log_start];
    let size: u64 = refs.iter().map(|r| u64::from(r.raw_len)).sum();
    for (i, r) in refs.iter().enumerate() {
        let e = &mut b[STUB_HEADER + i * STUB_ENTRY..STUB_HEADER + (i + 1) * STUB_ENTRY];
        e[..32].copy_from_slice(&r.id);
        e[32..36].copy_from_slice(&r.container.to_le_bytes());
        e[36..44].copy_from_slice(&r.offset.to_le_bytes());
        e[44..48].copy_from_slice(&r.raw_len.to_le_bytes());
        e[48..52].copy_from_slice(&r.stored_len.to_le_bytes());
        e[52..56].copy_from_slice(&r.flags.to_le_bytes());
    }
    let ecrc = crc32c::crc32c(&b[STUB_HEADER..STUB_HEADER + entries]);
    let h = &mut b[..STUB_HEADER];
    h[..8].copy_from_slice(STUB_MAGIC);
    h[8..12].copy_from_slice(&STUB_VERSION.to_le_bytes());
    h[16..32].copy_from_slice(store);
    h[32..40].copy_from_slice(&stream.to_le_bytes());
    h[40..48].copy_from_slice(&size.to_le_bytes());
    h[48..52].copy_from_slice(&(refs.len() as u32).to_le_bytes());
    h[52..60].copy_from_slice(&(log_start as u64).to_le_bytes());
    h[60..64].copy_from_slice(&ecrc.to_le_bytes());
    let crc = crc32c::crc32c(&h[..124]);
    h[124..128].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Whether `head` (the first bytes of a file) is a stub.
pub fn is_stub(head: &[u8]) -> bool {
    head.len() >= 8 && &head[..8] == STUB_MAGIC
}

/// Parses a stub header; `file` names the stub in errors. `file_len` bounds what it may claim.
pub fn decode_stub_header(b: &[u8], file: &str, file_len: u64) -> Result<StubHeader> {
    if b.len() < STUB_HEADER || !is_stub(b) {
        return Err(DedupError::corrupt(file, "not a dedup stub (bad magic)"));
    }
    if crc32c::crc32c(&b[..124]) != u32_at(b, 124) {
        return Err(DedupError::corrupt(file, "stub header checksum mismatch"));
    }
    let version = u32_at(b, 8);
    if version != STUB_VERSION {
        return Err(DedupError::corrupt(
            file,
            format!("stub version {version} (this vstor knows {STUB_VERSION})"),
        ));
    }
    let h = StubHeader {
        store: b[16..32].try_into().expect("16 bytes"),
        stream: u64_at(b, 32),
        chunked_size: u64_at(b, 40),
        chunks: u32_at(b, 48),
        log_start: u64_at(b, 52),
    };
    let need = STUB_HEADER as u64 + u64::from(h.chunks) * STUB_ENTRY as u64;
    if h.log_start < need || h.log_start % 4096 != 0 || h.log_start > file_len {
        return Err(DedupError::corrupt(
            file,
            format!(
                "stub claims {} chunks and a log at {} in a file of {} bytes",
                h.chunks, h.log_start, file_len
            ),
        ));
    }
    Ok(h)
}

/// Parses a stub's chunk entries (`b` holds the header and the entries).
pub fn decode_stub_entries(b: &[u8], h: &StubHeader, file: &str) -> Result<Vec<ChunkRef>> {
    let n = h.chunks as usize;
    let end = STUB_HEADER + n * STUB_ENTRY;
    if b.len() < end {
        return Err(DedupError::corrupt(file, "stub chunk list is cut short"));
    }
    if crc32c::crc32c(&b[STUB_HEADER..end]) != u32_at(b, 60) {
        return Err(DedupError::corrupt(
            file,
            "stub chunk list checksum mismatch",
        ));
    }
    let mut out = Vec::with_capacity(n);
    let mut total = 0u64;
    for i in 0..n {
        let e = &b[STUB_HEADER + i * STUB_ENTRY..STUB_HEADER + (i + 1) * STUB_ENTRY];
        let r = ChunkRef {
            id: e[..32].try_into().expect("32 bytes"),
            container: u32_at(e, 32),
            offset: u64_at(e, 36),
            raw_len: u32_at(e, 44),
            stored_len: u32_at(e, 48),
            flags: u32_at(e, 52),
        };
        if r.raw_len == 0 || r.raw_len > MAX_CHUNK || r.stored_len > MAX_CHUNK * 2 {
            return Err(DedupError::corrupt(
                file,
                format!("chunk entry {i} has an impossible length {}", r.raw_len),
            ));
        }
        total += u64::from(r.raw_len);
        out.push(r);
    }
    if total != h.chunked_size {
        return Err(DedupError::corrupt(
            file,
            format!(
                "chunk lengths add up to {total}, the header says {}",
                h.chunked_size
            ),
        ));
    }
    Ok(out)
}

/// The size of a write-log record header.
pub const LOG_HEADER: usize = 32;
const LOG_MAGIC: u32 = 0x474f_4c57; // "WLOG"
/// A log record: data written at an offset.
pub const LOG_DATA: u32 = 1;
/// A log record: the size changed.
pub const LOG_RESIZE: u32 = 2;

/// A record of a stub's write log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRecord {
    /// [`LOG_DATA`] or [`LOG_RESIZE`].
    pub kind: u32,
    /// The offset written at, or the new size.
    pub offset: u64,
    /// The length of the data that follows (0 for a resize).
    pub len: u32,
    /// Sequence number (the record's position in the log, from 0).
    pub seq: u32,
}

/// Encodes a log record's header for `data`.
pub fn encode_log(rec: &LogRecord, data: &[u8]) -> [u8; LOG_HEADER] {
    let mut b = [0u8; LOG_HEADER];
    b[..4].copy_from_slice(&LOG_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&rec.kind.to_le_bytes());
    b[8..16].copy_from_slice(&rec.offset.to_le_bytes());
    b[16..20].copy_from_slice(&rec.len.to_le_bytes());
    b[20..24].copy_from_slice(&rec.seq.to_le_bytes());
    let mut crc = crc32c::crc32c(&b[..28]);
    crc = crc32c::crc32c_append(crc, data);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Parses a log record header (without checking the data's part of the checksum, which
/// [`log_data_ok`] does). `None` ends the log.
pub fn decode_log(b: &[u8], seq: u32) -> Option<LogRecord> {
    if b.len() < LOG_HEADER || u32_at(b, 0) != LOG_MAGIC {
        return None;
    }
    let rec = LogRecord {
        kind: u32_at(b, 4),
        offset: u64_at(b, 8),
        len: u32_at(b, 16),
        seq: u32_at(b, 20),
    };
    let ok_kind = rec.kind == LOG_DATA || (rec.kind == LOG_RESIZE && rec.len == 0);
    (ok_kind && rec.seq == seq && rec.len <= 64 << 20).then_some(rec)
}

/// Whether a record's checksum covers its header and `data`.
pub fn log_data_ok(header: &[u8], data: &[u8]) -> bool {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..28]), data);
    crc == u32_at(header, 28)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_round_trip_and_damage() {
        let refs: Vec<ChunkRef> = (0..5)
            .map(|i| ChunkRef {
                id: [i as u8; 32],
                container: i,
                offset: 64 + u64::from(i) * 1000,
                raw_len: 1000 + i,
                stored_len: 900,
                flags: FLAG_LZ4,
            })
            .collect();
        let b = encode_stub(&[7; 16], 42, &refs);
        assert_eq!(b.len() % 4096, 0);
        let h = decode_stub_header(&b, "s", b.len() as u64).unwrap();
        assert_eq!((h.stream, h.chunks, h.store), (42, 5, [7; 16]));
        assert_eq!(decode_stub_entries(&b, &h, "s").unwrap(), refs);
        for at in [0, 9, 40, 130, 200] {
            let mut bad = b.clone();
            bad[at] ^= 1;
            let r = decode_stub_header(&bad, "s", b.len() as u64)
                .and_then(|h| decode_stub_entries(&bad, &h, "s"));
            assert!(r.is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn container_and_record_headers() {
        let h = ContainerHeader {
            store: [3; 16],
            id: 9,
        };
        assert_eq!(ContainerHeader::decode(&h.encode(), "c").unwrap(), h);
        let r = RecordHeader {
            id: [1; 32],
            raw_len: 100,
            stored_len: 50,
            flags: FLAG_LZ4,
        };
        assert_eq!(RecordHeader::decode(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[10] ^= 4;
        assert!(RecordHeader::decode(&bad).is_err());
    }
}
