//! An in-memory block device.

use crate::device::{BlockDevice, CapacitySignal, DeviceInfo, Supports};
use crate::error::{Error, Result};
use crate::request::{Op, Request};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Bytes per segment: the unit of locking and of lazy allocation.
const SEGMENT: u64 = 64 * 1024;

type Segment = RwLock<Option<Box<[u8]>>>;

/// A sparse in-memory block device. Memory is allocated in 64 KiB segments on first write;
/// discarded or zeroed whole segments are freed. Each segment has its own lock, so requests to
/// different segments run in parallel; resizing takes the one outer lock.
pub struct MemoryDevice {
    segments: RwLock<Vec<Segment>>,
    capacity: std::sync::atomic::AtomicU64,
    sector: u32,
    read_only: bool,
    signal: Arc<CapacitySignal>,
}

impl std::fmt::Debug for MemoryDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDevice")
            .field("capacity", &self.capacity())
            .field("sector", &self.sector)
            .finish()
    }
}

fn segments_for(capacity: u64) -> Result<Vec<Segment>> {
    let n = capacity.div_ceil(SEGMENT);
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n <= (1 << 32))
        .ok_or_else(|| {
            Error::InvalidArgument(format!("memory device of {capacity} bytes is too large"))
        })?;
    Ok((0..n).map(|_| RwLock::new(None)).collect())
}

impl MemoryDevice {
    /// A zero-filled device of `capacity` bytes with 512-byte sectors.
    pub fn new(capacity: u64) -> Result<Self> {
        Self::with_sector_size(capacity, 512)
    }

    /// A zero-filled device of `capacity` bytes with `sector`-byte logical sectors (512 or 4096).
    pub fn with_sector_size(capacity: u64, sector: u32) -> Result<Self> {
        if !sector.is_power_of_two() || !(512..=4096).contains(&sector) {
            return Err(Error::InvalidArgument(format!(
                "sector size {sector} is not 512, 1024, 2048 or 4096"
            )));
        }
        if capacity % u64::from(sector) != 0 {
            return Err(Error::InvalidArgument(format!(
                "capacity {capacity} is not a multiple of the {sector}-byte sector"
            )));
        }
        Ok(MemoryDevice {
            segments: RwLock::new(segments_for(capacity)?),
            capacity: capacity.into(),
            sector,
            read_only: false,
            signal: Arc::new(CapacitySignal::new(capacity)),
        })
    }

    /// Makes the device refuse write-type requests.
    pub fn into_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Bytes of memory the device holds for data.
    pub fn allocated_bytes(&self) -> u64 {
        let segs = self.segs();
        segs.iter()
            .filter(|s| s.read().unwrap_or_else(|p| p.into_inner()).is_some())
            .count() as u64
            * SEGMENT
    }

    fn segs(&self) -> RwLockReadGuard<'_, Vec<Segment>> {
        self.segments.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `f(segment, offset in segment, range start in request, len)` for each piece of
    /// `[offset, offset + len)`.
    fn for_each_piece(offset: u64, len: u64, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let seg = (pos / SEGMENT) as usize;
            let in_seg = (pos % SEGMENT) as usize;
            let n = (SEGMENT - pos % SEGMENT).min(end - pos) as usize;
            f(seg, in_seg, (pos - offset) as usize, n);
            pos += n as u64;
        }
    }

    fn do_read(&self, segs: &[Segment], offset: u64, out: &mut [u8]) {
        let len = out.len() as u64;
        Self::for_each_piece(offset, len, |seg, in_seg, at, n| {
            let g = segs[seg].read().unwrap_or_else(|p| p.into_inner());
            match g.as_ref() {
                Some(data) => out[at..at + n].copy_from_slice(&data[in_seg..in_seg + n]),
                None => out[at..at + n].fill(0),
            }
        });
    }

    fn do_write(&self, segs: &[Segment], offset: u64, data: Option<&[u8]>, len: u64) {
        Self::for_each_piece(offset, len, |seg, in_seg, at, n| {
            let mut g = segs[seg].write().unwrap_or_else(|p| p.into_inner());
            match data {
                Some(src) => {
                    let buf =
                        g.get_or_insert_with(|| vec![0u8; SEGMENT as usize].into_boxed_slice());
                    buf[in_seg..in_seg + n].copy_from_slice(&src[at..at + n]);
                }
                None if n as u64 == SEGMENT => *g = None,
                None => {
                    if let Some(buf) = g.as_mut() {
                        buf[in_seg..in_seg + n].fill(0);
                    }
                }
            }
        });
    }
}

impl BlockDevice for MemoryDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            capacity: self.capacity(),
            logical_sector_size: self.sector,
            physical_sector_size: self.sector,
            mem_alignment: 1,
            read_only: self.read_only,
            discard_zeroes: true,
            supports: Supports {
                flush: true,
                discard: true,
                write_zeroes: true,
                resize: !self.read_only,
            },
        }
    }

    fn capacity(&self) -> u64 {
        self.capacity.load(std::sync::atomic::Ordering::Acquire)
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let segs = self.segs();
        let info = self.info();
        for req in batch.iter_mut() {
            if let Err(e) = info.check(req) {
                req.complete(Err(e));
                continue;
            }
            let offset = req.offset();
            match &mut req.op {
                Op::Read { bufs, .. } => {
                    let mut pos = offset;
                    for b in bufs.iter_mut() {
                        self.do_read(&segs, pos, b);
                        pos += b.len() as u64;
                    }
                }
                Op::Write { bufs, .. } => {
                    let mut pos = offset;
                    for b in bufs.iter() {
                        self.do_write(&segs, pos, Some(b), b.len() as u64);
                        pos += b.len() as u64;
                    }
                }
                Op::Discard { len, .. } | Op::WriteZeroes { len, .. } => {
                    let len = *len;
                    self.do_write(&segs, offset, None, len)
                }
                Op::Flush => {}
            }
            req.complete(Ok(()));
        }
    }

    fn resize(&self, new_capacity: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                op: crate::OpKind::Write,
            });
        }
        if new_capacity % u64::from(self.sector) != 0 {
            return Err(Error::InvalidArgument(format!(
                "new capacity {new_capacity} is not a multiple of the {}-byte sector",
                self.sector
            )));
        }
        let mut segs = self.segments.write().unwrap_or_else(|p| p.into_inner());
        let old = self.capacity();
        let want = segments_for(new_capacity)?.len();
        segs.resize_with(want, || RwLock::new(None));
        if new_capacity < old && new_capacity % SEGMENT != 0 {
            // Shrinking: what lies past the new end must read as zero if the device grows again.
            if let Some(last) = segs.last() {
                if let Some(buf) = last.write().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    buf[(new_capacity % SEGMENT) as usize..].fill(0);
                }
            }
        }
        self.capacity
            .store(new_capacity, std::sync::atomic::Ordering::Release);
        drop(segs);
        self.signal.publish(new_capacity);
        Ok(())
    }

    fn capacity_signal(&self) -> Option<Arc<CapacitySignal>> {
        Some(self.signal.clone())
    }

    fn describe(&self) -> String {
        format!("memory device ({} bytes)", self.capacity())
    }
}
