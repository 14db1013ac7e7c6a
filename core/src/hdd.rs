//! A rotating disk you can measure against: [`HddDevice`] wraps a device (the medium: a file,
//! memory) and serves its requests with the timing of one spindle and one head, so that pools
//! of emulated HDDs and SSD files can be built and measured on machines that have one virtual
//! disk. It is a timing model, not a data model: the bytes are the medium's.
//!
//! The model ([`HddModel`], defaults those of a 7,200 rpm 3.5" disk):
//! - **Seek:** from the head's position to the request's, `seek_min + (seek_max - seek_min) *
//!   sqrt(distance / capacity)` (the square-root curve of a voice-coil actuator: short seeks are
//!   dominated by acceleration). Uniformly random positions average `seek_min + 0.533 *
//!   (seek_max - seek_min)`: 4.5 ms by default. A request that starts where the last one ended
//!   (sequential) does not seek.
//! - **Rotation:** after a seek the sector is, on average, half a revolution away: a latency
//!   drawn uniformly from one revolution (8.33 ms at 7,200 rpm; 4.17 ms on average), from a
//!   seeded generator so runs repeat. Sequential requests have none.
//! - **Transfer:** `len / bandwidth` (180 MB/s by default).
//! - **One head:** a batch is served in the elevator's order (ascending from the head, then the
//!   rest: what a disk's command queue does), one request after another; a second batch waits
//!   for the head. Flushes cost nothing (no write cache is modelled).
//!
//! So 4 KiB random I/O costs about 8.7 ms (about 115 IOPS) and sequential I/O runs at the
//! bandwidth, as a real 7,200 rpm disk does. [`HddModel::service_time`] is the model itself
//! (pure, for tests and for callers that want the figures without waiting).

use crate::device::{BlockDevice, CapacitySignal, DeviceInfo};
use crate::error::{OpKind, Result};
use crate::request::Request;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The parameters of the rotating-disk model (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HddModel {
    /// Spindle speed.
    pub rpm: u32,
    /// Seek time for the shortest move (track to track).
    pub seek_min: Duration,
    /// Seek time across the whole capacity (full stroke).
    pub seek_max: Duration,
    /// Media transfer rate in bytes per second.
    pub bandwidth: u64,
    /// Seed of the rotational positions.
    pub seed: u64,
}

impl Default for HddModel {
    fn default() -> Self {
        HddModel {
            rpm: 7200,
            seek_min: Duration::from_micros(600),
            seek_max: Duration::from_micros(8000),
            bandwidth: 180_000_000,
            seed: 0x4844_4453_4545_4b31,
        }
    }
}

/// Where the head is and what its generator holds.
#[derive(Debug, Clone)]
pub struct Head {
    /// Byte position the last request ended at.
    pub pos: u64,
    rng: u64,
}

impl HddModel {
    /// One revolution.
    pub fn revolution(&self) -> Duration {
        Duration::from_secs_f64(60.0 / f64::from(self.rpm.max(1)))
    }

    /// The seek time over `distance` bytes of a disk of `capacity` bytes (0 for no move).
    pub fn seek(&self, distance: u64, capacity: u64) -> Duration {
        if distance == 0 {
            return Duration::ZERO;
        }
        let frac = (distance as f64 / capacity.max(1) as f64).min(1.0);
        self.seek_min + (self.seek_max.saturating_sub(self.seek_min)).mul_f64(frac.sqrt())
    }

    /// The transfer time of `len` bytes.
    pub fn transfer(&self, len: u64) -> Duration {
        Duration::from_secs_f64(len as f64 / self.bandwidth.max(1) as f64)
    }

    /// A head at position 0.
    pub fn head(&self) -> Head {
        Head {
            pos: 0,
            rng: self.seed | 1,
        }
    }

    /// The time to serve `len` bytes at `offset` with the head at `head` (moved to the end of
    /// the request): seek, rotation and transfer.
    pub fn service_time(&self, head: &mut Head, offset: u64, len: u64, capacity: u64) -> Duration {
        let mut t = self.transfer(len);
        if offset != head.pos {
            // xorshift64*: a uniform fraction of a revolution.
            head.rng ^= head.rng >> 12;
            head.rng ^= head.rng << 25;
            head.rng ^= head.rng >> 27;
            let r = head.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
            let frac = r as f64 / (1u64 << 53) as f64;
            t += self.seek(offset.abs_diff(head.pos), capacity) + self.revolution().mul_f64(frac);
        }
        head.pos = offset + len;
        t
    }
}

/// A device served with the timing of a rotating disk (see the module documentation).
pub struct HddDevice {
    inner: Arc<dyn BlockDevice>,
    model: HddModel,
    head: Mutex<Head>,
}

impl std::fmt::Debug for HddDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HddDevice")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl HddDevice {
    /// Serves `inner` with the timing of `model`.
    pub fn new(inner: Arc<dyn BlockDevice>, model: HddModel) -> Self {
        HddDevice {
            head: Mutex::new(model.head()),
            inner,
            model,
        }
    }

    /// The model.
    pub fn model(&self) -> &HddModel {
        &self.model
    }
}

impl BlockDevice for HddDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        let cap = self.inner.capacity();
        // The elevator: ascending from the head, then the ones behind it, ascending.
        let mut order: Vec<(u64, u64)> = batch
            .iter()
            .filter(|r| r.kind() != OpKind::Flush)
            .map(|r| (r.offset(), r.len()))
            .collect();
        order.sort_unstable();
        let split = order.partition_point(|&(o, _)| o < head.pos);
        order.rotate_left(split);
        let busy: Duration = order
            .iter()
            .map(|&(o, l)| self.model.service_time(&mut head, o, l, cap))
            .sum();
        self.inner.submit(batch);
        // The head is held for the whole service time (the medium's own time counts in it).
        if let Some(rest) = busy.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
    }

    fn resize(&self, new_capacity: u64) -> Result<()> {
        self.inner.resize(new_capacity)
    }

    fn capacity_signal(&self) -> Option<Arc<CapacitySignal>> {
        self.inner.capacity_signal()
    }

    fn describe(&self) -> String {
        format!(
            "hdd model ({} rpm, {:.1}-{:.1} ms seek, {} MB/s) over {}",
            self.model.rpm,
            self.model.seek_min.as_secs_f64() * 1e3,
            self.model.seek_max.as_secs_f64() * 1e3,
            self.model.bandwidth / 1_000_000,
            self.inner.describe()
        )
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<crate::device::Extent>> {
        self.inner.allocation(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryDevice;

    const GIB: u64 = 1 << 30;

    /// The defaults give what the module documentation says, computed from the model (no
    /// clock): random 4 KiB I/O 7-10 ms (100-150 IOPS), of which seek 4-6 ms on average;
    /// sequential 1 MiB at the bandwidth.
    #[test]
    fn the_default_model_has_a_7200_rpm_disks_figures() {
        let m = HddModel::default();
        let cap = 1000 * GIB;
        let mut head = m.head();
        let mut rng = 0x1234_5678_9abc_def1u64;
        let (mut total, mut seeks, n) = (Duration::ZERO, Duration::ZERO, 20_000u32);
        for _ in 0..n {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let off = (rng % (cap / 4096)) * 4096;
            seeks += m.seek(off.abs_diff(head.pos), cap);
            total += m.service_time(&mut head, off, 4096, cap);
        }
        let (avg, seek) = (total / n, seeks / n);
        assert!(
            avg > Duration::from_millis(7) && avg < Duration::from_millis(10),
            "{avg:?}"
        );
        assert!(
            seek > Duration::from_millis(4) && seek < Duration::from_millis(6),
            "{seek:?}"
        );
        assert_eq!(m.revolution(), Duration::from_secs_f64(60.0 / 7200.0));
        // Sequential: no seek, no rotation, the bandwidth.
        let _ = m.service_time(&mut head, 0, 1 << 20, cap);
        let mut t = Duration::ZERO;
        for i in 1..1000u64 {
            t += m.service_time(&mut head, i << 20, 1 << 20, cap);
        }
        let mbs = 999.0 * (1 << 20) as f64 / t.as_secs_f64() / 1e6;
        assert!((150.0..=200.0).contains(&mbs), "{mbs} MB/s");
        // Seeks grow with distance.
        assert!(m.seek(cap / 100, cap) < m.seek(cap / 2, cap));
        assert!(m.seek(cap, cap) <= m.seek_max && m.seek(1, cap) >= m.seek_min);
    }

    /// Through the device: the data is the medium's, and a batch of random reads takes at
    /// least what the model says (the head is held for it); the elevator's order serves a
    /// batch sooner than its arrival order would.
    #[test]
    fn the_device_serves_the_mediums_bytes_and_holds_the_head_for_the_model_time() {
        let mem = Arc::new(MemoryDevice::new(64 << 20).unwrap());
        mem.write_at(8 << 20, &[7u8; 4096]).unwrap();
        let d = HddDevice::new(mem, HddModel::default());
        let mut b = vec![0u8; 4096];
        d.read_at(8 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        let offs: Vec<u64> = (0..16u64).map(|i| ((i * 37) % 16) << 22).collect();
        let mut want = d.head.lock().unwrap().clone();
        let mut sorted = offs.clone();
        sorted.sort_unstable();
        let split = sorted.partition_point(|&o| o < want.pos);
        sorted.rotate_left(split);
        let model: Duration = sorted
            .iter()
            .map(|&o| d.model().service_time(&mut want, o, 4096, 64 << 20))
            .sum();
        let mut bufs: Vec<Vec<u8>> = offs.iter().map(|_| vec![0u8; 4096]).collect();
        let mut reqs: Vec<Request<'_>> = offs
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&o, b)| Request::read(o, b))
            .collect();
        let t = Instant::now();
        d.submit_all(&mut reqs).unwrap();
        assert!(t.elapsed() >= model, "{:?} < {model:?}", t.elapsed());
        // The elevator: one sweep, so the seeks add up to at most one full stroke's worth
        // of distance, less than the arrival order's back-and-forth.
        let m = d.model();
        let sweep: u64 = sorted.windows(2).map(|w| w[0].abs_diff(w[1])).sum();
        let back_and_forth: u64 = offs.windows(2).map(|w| w[0].abs_diff(w[1])).sum();
        assert!(sweep < back_and_forth);
        assert!(m.seek(sweep / 16, 64 << 20) < m.seek(back_and_forth / 16, 64 << 20));
    }
}
