//! An in-memory block device.

use crate::device::{BlockDevice, CapacitySignal, DeviceInfo, Supports};
use crate::error::{Error, OpKind, Result};
use crate::request::{Op, Request};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Bytes per segment: the unit of lazy allocation.
const SEGMENT: u64 = 64 * 1024;
/// Independent locks; a segment lives in shard `index % SHARDS`.
const SHARDS: usize = 64;

type Shard = RwLock<HashMap<u64, Box<[u8]>>>;

/// A sparse in-memory block device of any capacity up to 2^63 bytes. Memory is allocated in
/// 64 KiB segments on first write and freed when a whole segment is discarded or zeroed, so a
/// 64 TiB device costs only what was written. Segments are spread over 64 independently locked
/// shards, so requests to different segments run in parallel; only a resize takes every shard.
pub struct MemoryDevice {
    shards: Vec<Shard>,
    // Held shared by requests and exclusively by resize, so a request checked against the old
    // capacity cannot land past the new end.
    resize_lock: RwLock<()>,
    capacity: AtomicU64,
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

fn shard_of(seg: u64) -> usize {
    (seg % SHARDS as u64) as usize
}

impl MemoryDevice {
    /// A zero-filled device of `capacity` bytes with 512-byte sectors.
    pub fn new(capacity: u64) -> Result<Self> {
        Self::with_sector_size(capacity, 512)
    }

    /// A zero-filled device of `capacity` bytes with `sector`-byte logical sectors (512 to 4096).
    pub fn with_sector_size(capacity: u64, sector: u32) -> Result<Self> {
        if !sector.is_power_of_two() || !(512..=4096).contains(&sector) {
            return Err(Error::InvalidArgument(format!(
                "sector size {sector} is not 512, 1024, 2048 or 4096"
            )));
        }
        Self::check_capacity(capacity, sector)?;
        Ok(MemoryDevice {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            resize_lock: RwLock::new(()),
            capacity: capacity.into(),
            sector,
            read_only: false,
            signal: Arc::new(CapacitySignal::new(capacity)),
        })
    }

    fn check_capacity(capacity: u64, sector: u32) -> Result<()> {
        if capacity % u64::from(sector) != 0 || capacity > i64::MAX as u64 {
            return Err(Error::InvalidArgument(format!(
                "capacity {capacity} is not a multiple of the {sector}-byte sector at most 2^63"
            )));
        }
        Ok(())
    }

    /// Makes the device refuse write-type requests.
    pub fn into_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Bytes of memory the device holds for data.
    pub fn allocated_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
            .sum::<u64>()
            * SEGMENT
    }

    fn shard(&self, seg: u64) -> &Shard {
        &self.shards[shard_of(seg)]
    }

    /// Calls `f(segment, offset in segment, offset in request, len)` for each piece of
    /// `[offset, offset + len)`.
    fn for_each_piece(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (SEGMENT - pos % SEGMENT).min(end - pos) as usize;
            f(
                pos / SEGMENT,
                (pos % SEGMENT) as usize,
                (pos - offset) as usize,
                n,
            );
            pos += n as u64;
        }
    }

    fn read_piece(&self, offset: u64, out: &mut [u8]) {
        Self::for_each_piece(offset, out.len() as u64, |seg, at_seg, at, n| {
            let shard = self.shard(seg).read().unwrap_or_else(|p| p.into_inner());
            match shard.get(&seg) {
                Some(data) => out[at..at + n].copy_from_slice(&data[at_seg..at_seg + n]),
                None => out[at..at + n].fill(0),
            }
        });
    }

    /// Writes `data`, or zeroes (freeing whole segments) when `data` is `None`.
    fn write_piece(&self, offset: u64, data: Option<&[u8]>, len: u64) {
        Self::for_each_piece(offset, len, |seg, at_seg, at, n| {
            let mut shard = self.shard(seg).write().unwrap_or_else(|p| p.into_inner());
            match data {
                Some(src) => {
                    let buf = shard
                        .entry(seg)
                        .or_insert_with(|| vec![0u8; SEGMENT as usize].into_boxed_slice());
                    buf[at_seg..at_seg + n].copy_from_slice(&src[at..at + n]);
                }
                None if n as u64 == SEGMENT => {
                    shard.remove(&seg);
                }
                None => {
                    if let Some(buf) = shard.get_mut(&seg) {
                        buf[at_seg..at_seg + n].fill(0);
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
        self.capacity.load(Ordering::Acquire)
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let _resizing = self.resize_lock.read().unwrap_or_else(|p| p.into_inner());
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
                        self.read_piece(pos, b);
                        pos += b.len() as u64;
                    }
                }
                Op::Write { bufs, .. } => {
                    let mut pos = offset;
                    for b in bufs.iter() {
                        self.write_piece(pos, Some(b), b.len() as u64);
                        pos += b.len() as u64;
                    }
                }
                Op::Discard { len, .. } | Op::WriteZeroes { len, .. } => {
                    let len = *len;
                    self.write_piece(offset, None, len)
                }
                Op::Flush => {}
            }
            req.complete(Ok(()));
        }
    }

    fn resize(&self, new_capacity: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly { op: OpKind::Write });
        }
        Self::check_capacity(new_capacity, self.sector)?;
        let resizing = self.resize_lock.write().unwrap_or_else(|p| p.into_inner());
        let mut guards: Vec<_> = self
            .shards
            .iter()
            .map(|s| s.write().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let old = self.capacity();
        if new_capacity < old {
            // What lies past the new end must read as zero if the device grows again.
            let first_gone = new_capacity.div_ceil(SEGMENT);
            for g in guards.iter_mut() {
                g.retain(|&seg, _| seg < first_gone);
            }
            if new_capacity % SEGMENT != 0 {
                let seg = new_capacity / SEGMENT;
                if let Some(buf) = guards[shard_of(seg)].get_mut(&seg) {
                    buf[(new_capacity % SEGMENT) as usize..].fill(0);
                }
            }
        }
        self.capacity.store(new_capacity, Ordering::Release);
        drop(guards);
        drop(resizing);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_sparse_device_costs_what_is_written() {
        let dev = MemoryDevice::new(64 << 40).unwrap();
        dev.write_at((64 << 40) - 4096, &[9u8; 4096]).unwrap();
        dev.write_at(1 << 40, &[8u8; 512]).unwrap();
        assert_eq!(dev.allocated_bytes(), 2 * SEGMENT);
        let mut b = [0u8; 4096];
        dev.read_at((64 << 40) - 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 9));
        dev.discard(1 << 40, SEGMENT).unwrap();
        assert_eq!(dev.allocated_bytes(), SEGMENT);
    }

    #[test]
    fn listener_may_call_back_into_the_device() {
        let dev = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let d2 = dev.clone();
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        let sig = dev.capacity_signal().unwrap();
        let sig2 = sig.clone();
        sig.subscribe(move |cap| {
            // Neither the signal nor the device may be locked while listeners run.
            assert_eq!(sig2.current().0, cap);
            let mut b = [0u8; 512];
            d2.read_at(cap - 512, &mut b).unwrap();
            s2.store(cap, Ordering::SeqCst);
        });
        dev.resize(2 << 20).unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 2 << 20);
    }
}
