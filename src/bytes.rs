//! Byte-granular access on top of sector-granular devices, for tools (`vstor disk read/write`)
//! and tests: unaligned ranges are widened to whole sectors and written read-modify-write.

use vstor_core::{AlignedBuf, BlockDevice, Error, OpKind, Result};

/// The sector-aligned range `[start, end)` that covers `[offset, offset + len)`, checked against
/// the device's capacity.
fn covering(
    dev: &dyn BlockDevice,
    op: OpKind,
    offset: u64,
    len: u64,
) -> Result<(u64, u64, AlignedBuf)> {
    let info = dev.info();
    let sector = u64::from(info.logical_sector_size);
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= info.capacity)
        .ok_or(Error::OutOfRange {
            op,
            offset,
            len,
            capacity: info.capacity,
        })?;
    let start = offset - offset % sector;
    let end = end.div_ceil(sector) * sector;
    let n = usize::try_from(end - start)
        .map_err(|_| Error::InvalidArgument(format!("{len} bytes do not fit in memory")))?;
    let align = (info.mem_alignment as usize).max(1);
    Ok((start, end, AlignedBuf::with_alignment(n, align)))
}

/// Reads `len` bytes at any byte `offset`.
pub fn read_bytes(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let (start, _end, mut buf) = covering(dev, OpKind::Read, offset, len)?;
    dev.read_at(start, &mut buf)?;
    let from = (offset - start) as usize;
    Ok(buf[from..from + len as usize].to_vec())
}

/// Writes `data` at any byte `offset`; partial sectors at either end are read, patched and
/// written back whole. Does not flush.
pub fn write_bytes(dev: &dyn BlockDevice, offset: u64, data: &[u8]) -> Result<()> {
    let len = data.len() as u64;
    if len == 0 {
        return Ok(());
    }
    let (start, end, mut buf) = covering(dev, OpKind::Write, offset, len)?;
    let sector = u64::from(dev.info().logical_sector_size);
    if offset != start {
        dev.read_at(start, &mut buf[..sector as usize])?;
    }
    let tail = end - sector;
    if (offset + len) != end && (tail != start || offset == start) {
        let at = (tail - start) as usize;
        dev.read_at(tail, &mut buf[at..])?;
    }
    let from = (offset - start) as usize;
    buf[from..from + data.len()].copy_from_slice(data);
    dev.write_at(start, &buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_core::MemoryDevice;

    #[test]
    fn unaligned_round_trip_keeps_neighbours() {
        let dev = MemoryDevice::new(8192).unwrap();
        dev.write_at(0, &[0x11; 8192]).unwrap();
        for (off, len) in [
            (1u64, 10usize),
            (500, 30),
            (511, 2),
            (0, 512),
            (100, 1500),
            (4000, 4192),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ 0x80).collect();
            write_bytes(&dev, off, &data).unwrap();
            assert_eq!(read_bytes(&dev, off, len as u64).unwrap(), data);
            let all = read_bytes(&dev, 0, 8192).unwrap();
            assert!(
                all[..off as usize].iter().all(|&b| b == 0x11),
                "before {off}"
            );
            assert!(
                all[off as usize + len..].iter().all(|&b| b == 0x11),
                "after {off}+{len}"
            );
            dev.write_at(0, &[0x11; 8192]).unwrap();
        }
    }

    #[test]
    fn empty_ranges_are_no_ops() {
        let dev = MemoryDevice::new(4096).unwrap();
        write_bytes(&dev, 7, &[]).unwrap();
        assert!(read_bytes(&dev, 7, 0).unwrap().is_empty());
    }

    #[test]
    fn past_the_end_is_refused() {
        let dev = MemoryDevice::new(4096).unwrap();
        assert!(matches!(
            read_bytes(&dev, 4000, 200),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            write_bytes(&dev, u64::MAX - 1, &[1, 2, 3]),
            Err(Error::OutOfRange { .. })
        ));
    }
}
