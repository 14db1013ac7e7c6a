//! Crash-safe storage of the persistent-reservation state on a block device.
//!
//! Two slots of [`SLOT_BYTES`] each. A record is a header (magic, sequence number, payload
//! length, CRC-32C of header and payload) and its payload, written into the slot its sequence
//! number picks (`seq % 2`) and flushed before the PERSISTENT RESERVE OUT that changed the
//! state completes. The slot written is never the one that holds the newest valid record, so
//! a power cut at any write (a lost, kept or torn write) leaves either the old state or the
//! new one: the reader takes the valid record with the highest sequence number.

use std::sync::Arc;
use vstor_core::{BlockDevice, Error, Result};

/// Bytes of one slot.
pub const SLOT_BYTES: u64 = 256 << 10;
/// Bytes of the device the store uses.
pub const STORE_BYTES: u64 = 2 * SLOT_BYTES;
const MAGIC: &[u8; 8] = b"VSTORPR1";
const HEADER: usize = 24;

/// CRC-32C (Castagnoli), bitwise over a table built once.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The store: a device and the sequence number of the newest record on it.
pub struct Store {
    dev: Arc<dyn BlockDevice>,
    seq: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("seq", &self.seq).finish()
    }
}

fn slot_record(buf: &[u8]) -> Option<(u64, &[u8])> {
    if buf.len() < HEADER || &buf[0..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(buf[16..20].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf[20..24].try_into().ok()?);
    if HEADER + len > buf.len() {
        return None;
    }
    let mut h = buf[..HEADER].to_vec();
    h[20..24].fill(0);
    h.extend_from_slice(&buf[HEADER..HEADER + len]);
    (crc32c(&h) == crc).then(|| (seq, &buf[HEADER..HEADER + len]))
}

impl Store {
    /// Opens the store on `dev` (at least [`STORE_BYTES`]) and returns the newest valid
    /// payload, if any.
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<(Store, Option<Vec<u8>>)> {
        if dev.capacity() < STORE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the reservation store needs {STORE_BYTES} bytes, the device has {}",
                dev.capacity()
            )));
        }
        let mut best: Option<(u64, Vec<u8>)> = None;
        let mut buf = vec![0u8; SLOT_BYTES as usize];
        for slot in 0..2u64 {
            dev.read_at(slot * SLOT_BYTES, &mut buf)?;
            if let Some((seq, p)) = slot_record(&buf) {
                if seq % 2 == slot && best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, p.to_vec()));
                }
            }
        }
        let seq = best.as_ref().map_or(0, |(s, _)| *s);
        Ok((Store { dev, seq }, best.map(|(_, p)| p)))
    }

    /// The largest payload a record holds.
    pub const MAX_PAYLOAD: usize = SLOT_BYTES as usize - HEADER;

    /// Writes `payload` as the newest record and flushes it.
    pub fn save(&mut self, payload: &[u8]) -> Result<()> {
        if payload.len() > Self::MAX_PAYLOAD {
            return Err(Error::InvalidArgument(
                "reservation state larger than its slot".into(),
            ));
        }
        let seq = self.seq + 1;
        let sector = u64::from(self.dev.info().logical_sector_size.max(1));
        let len = ((HEADER + payload.len()) as u64).div_ceil(sector) * sector;
        let mut rec = vec![0u8; len as usize];
        rec[0..8].copy_from_slice(MAGIC);
        rec[8..16].copy_from_slice(&seq.to_le_bytes());
        rec[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        rec[HEADER..HEADER + payload.len()].copy_from_slice(payload);
        let crc = crc32c(&rec[..HEADER + payload.len()]);
        rec[20..24].copy_from_slice(&crc.to_le_bytes());
        self.dev.write_at((seq % 2) * SLOT_BYTES, &rec)?;
        self.dev.flush()?;
        self.seq = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_core::MemoryDevice;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn newest_valid_record_wins() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(STORE_BYTES).unwrap());
        let (mut s, p) = Store::open(dev.clone()).unwrap();
        assert_eq!(p, None);
        s.save(b"one").unwrap();
        s.save(b"two").unwrap();
        let (mut s, p) = Store::open(dev.clone()).unwrap();
        assert_eq!(p.as_deref(), Some(&b"two"[..]));
        s.save(b"three").unwrap();
        // A torn newest record: the one before it is read.
        let mut sector = vec![0u8; 512];
        dev.read_at(SLOT_BYTES, &mut sector).unwrap();
        sector[25] ^= 0xff;
        dev.write_at(SLOT_BYTES, &sector).unwrap();
        let (_, p) = Store::open(dev).unwrap();
        assert_eq!(p.as_deref(), Some(&b"two"[..]));
    }
}
