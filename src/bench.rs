//! `vstor disk bench`: qemu-img bench's workload on any vstor device.
//!
//! The parameters mean what they mean to `qemu-img bench`: `count` requests of `size` bytes,
//! `depth` of them in flight, the first at `offset`, each next one `step` bytes further, wrapping
//! as qemu does (modulo `capacity - size`). `random` replaces the sequence with uniformly random
//! offsets aligned to `size`. Requests go down as batches of `depth` through
//! [`BlockDevice::submit`], so the io_uring engine has all of them in flight together.

use crate::Error;
use std::time::Instant;
use vstor_core::{AlignedBuf, BlockDevice, Request};

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchParams {
    /// Number of requests.
    pub count: u64,
    /// Requests in flight (the batch size).
    pub depth: usize,
    /// Bytes per request.
    pub size: usize,
    /// Offset increment between requests (`None`: `size`).
    pub step: Option<u64>,
    /// Offset of the first request.
    pub offset: u64,
    /// Write instead of read.
    pub write: bool,
    /// Byte written by writes.
    pub pattern: u8,
    /// Uniformly random offsets aligned to `size` instead of the sequence.
    pub random: bool,
    /// Seed of the random offsets.
    pub seed: u64,
    /// With `random`: offsets drawn from a zipf distribution of this exponent (fio's
    /// `random_distribution=zipf:THETA`) over the request-size slots, instead of uniformly.
    pub zipf: Option<f64>,
    /// Flush after every this many requests (0: never), as qemu-img bench's `--flush-interval`.
    pub flush_interval: u64,
    /// Writes with content for dedup (fio's `dedupe_percentage`): this percentage of requests
    /// write again what an earlier request of the run wrote, the others write content no
    /// request wrote before (the pattern byte with a serial number in every 4 KiB). `None`:
    /// every write is the pattern byte, as qemu-img bench writes.
    pub dedupe_percentage: Option<u8>,
}

impl Default for BenchParams {
    /// qemu-img bench's defaults: 75000 reads of 4 KiB, 64 in flight, from offset 0.
    fn default() -> Self {
        BenchParams {
            count: 75000,
            depth: 64,
            size: 4096,
            step: None,
            offset: 0,
            write: false,
            pattern: 0,
            random: false,
            seed: 1,
            zipf: None,
            flush_interval: 0,
            dedupe_percentage: None,
        }
    }
}

/// Marks a write buffer as the content of `serial`: a number in every 4 KiB (and the piece's
/// index), so that every 4 KiB block of each serial is unlike any other's.
fn stamp(b: &mut [u8], serial: u64) {
    for (i, piece) in b.chunks_mut(4096).enumerate() {
        let n = piece.len().min(16);
        let mut tag = [0u8; 16];
        tag[..8].copy_from_slice(&serial.wrapping_add(1).to_le_bytes());
        tag[8..].copy_from_slice(&(i as u64).to_le_bytes());
        piece[..n].copy_from_slice(&tag[..n]);
    }
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct BenchReport {
    /// `"read"` or `"write"`.
    pub rw: &'static str,
    /// Whether offsets were random.
    pub random: bool,
    /// Requests completed.
    pub count: u64,
    /// Requests in flight.
    pub depth: usize,
    /// Bytes per request.
    pub size: usize,
    /// Offset step.
    pub step: u64,
    /// First offset.
    pub offset: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_per_s: f64,
    /// The device, as it describes itself.
    pub device: String,
}

impl BenchParams {
    /// The effective step.
    pub fn step(&self) -> u64 {
        self.step.unwrap_or(self.size as u64)
    }

    /// qemu-img bench's opening line.
    pub fn banner(&self) -> String {
        format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, {})",
            self.count,
            if self.write { "write" } else { "read" },
            self.size,
            self.depth,
            self.offset,
            if let (true, Some(t)) = (self.random, self.zipf) {
                format!("zipf:{t} offsets aligned to {}", self.size)
            } else if self.random {
                format!("random offsets aligned to {}", self.size)
            } else {
                format!("step size {}", self.step())
            }
        )
    }

    fn check(&self, dev: &dyn BlockDevice) -> Result<(), Error> {
        let info = dev.info();
        let bad = |m: String| Err(Error::InvalidArgument(m));
        let sector = info.logical_sector_size as usize;
        if self.count == 0 {
            return bad("count must be at least 1".into());
        }
        if self.depth == 0 || self.depth > 4096 {
            return bad(format!("depth {} is out of range (1 to 4096)", self.depth));
        }
        if self.size == 0 || self.size % sector != 0 {
            return bad(format!(
                "request size {} must be a non-zero multiple of the device's {sector}-byte sector",
                self.size
            ));
        }
        if self.size > 64 << 20 {
            return bad(format!(
                "request size {} is above the 64 MiB limit",
                self.size
            ));
        }
        if (self.size as u64).saturating_mul(self.depth as u64) > 1 << 30 {
            return bad(format!(
                "depth {} times request size {} is above the 1 GiB limit of buffer memory",
                self.depth, self.size
            ));
        }
        if self.offset % sector as u64 != 0 || self.step() % sector as u64 != 0 {
            return bad(format!(
                "offset {} and step {} must be multiples of the device's {sector}-byte sector",
                self.offset,
                self.step()
            ));
        }
        if self
            .offset
            .checked_add(self.size as u64)
            .is_none_or(|e| e > info.capacity)
        {
            return bad(format!(
                "offset {} plus request size {} is past the end of the device ({} bytes)",
                self.offset, self.size, info.capacity
            ));
        }
        if self.dedupe_percentage.is_some_and(|p| p > 100) {
            return bad("the dedupe percentage is 0 to 100".into());
        }
        if self.write && info.read_only {
            return bad("cannot run a write benchmark on a read-only target".into());
        }
        Ok(())
    }
}

/// Runs the benchmark. `progress` is called with the number of completed requests after each
/// batch.
pub fn run(
    dev: &dyn BlockDevice,
    p: &BenchParams,
    progress: &mut dyn FnMut(u64),
) -> Result<BenchReport, Error> {
    p.check(dev)?;
    let info = dev.info();
    let capacity = info.capacity;
    let size = p.size as u64;
    let align = (info.mem_alignment as usize).max(4096);
    let mut bufs: Vec<AlignedBuf> = (0..p.depth)
        .map(|_| {
            let mut b = AlignedBuf::with_alignment(p.size, align);
            b.fill(p.pattern);
            b
        })
        .collect();
    let slots = (capacity - size) / size + 1;
    let mut rng = fastrand::Rng::with_seed(p.seed);
    let zipf = p.zipf.filter(|_| p.random).map(|t| Zipf::new(slots, t));
    let mut next = p.offset;
    let mut offsets = Vec::with_capacity(p.depth);
    // The content of dedup writes: its own generator, so offsets are those of a plain run.
    let mut content_rng = fastrand::Rng::with_seed(p.seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut serials = 0u64;
    let mut done = 0u64;
    let start = Instant::now();
    while done < p.count {
        let n = (p.count - done).min(p.depth as u64) as usize;
        offsets.clear();
        for _ in 0..n {
            if let Some(z) = &zipf {
                offsets.push(z.slot(z.rank(&mut rng)) * size);
            } else if p.random {
                offsets.push(rng.u64(0..slots) * size);
            } else {
                offsets.push(next);
                // qemu-img bench master: offset += step, wrapped modulo (capacity - size).
                next = if capacity <= size {
                    0
                } else {
                    ((u128::from(next) + u128::from(p.step())) % u128::from(capacity - size)) as u64
                };
            }
        }
        // As qemu-img bench (with its default drain): a flush after every `flush_interval`-th
        // request, a barrier inside the batch.
        if let (true, Some(pct)) = (p.write, p.dedupe_percentage) {
            for b in bufs.iter_mut().take(n) {
                let serial = if serials > 0 && content_rng.u8(0..100) < pct {
                    content_rng.u64(0..serials)
                } else {
                    serials += 1;
                    serials - 1
                };
                stamp(b, serial);
            }
        }
        let mut batch: Vec<Request<'_>> = Vec::with_capacity(n + 1);
        for (i, (b, &o)) in bufs.iter_mut().zip(&offsets).enumerate() {
            batch.push(if p.write {
                Request::write(o, b)
            } else {
                Request::read(o, b)
            });
            if p.flush_interval > 0 && (done + i as u64 + 1) % p.flush_interval == 0 {
                batch.push(Request::flush());
            }
        }
        dev.submit(&mut batch);
        for r in &batch {
            r.result()
                .map_err(|e| Error::Failed(format!("failed request: {e}")))?;
        }
        done += n as u64;
        progress(done);
    }
    if p.write {
        // A write run ends with a flush inside the timed run, so a format that defers metadata
        // to the flush (VHDX commits its BAT there) pays for it, as qemu-img pays its flushes.
        dev.flush()
            .map_err(|e| Error::Failed(format!("final flush failed: {e}")))?;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(BenchReport {
        rw: if p.write { "write" } else { "read" },
        random: p.random,
        count: p.count,
        depth: p.depth,
        size: p.size,
        step: p.step(),
        offset: p.offset,
        seconds,
        iops: p.count as f64 / seconds,
        mib_per_s: (p.count * size) as f64 / seconds / (1 << 20) as f64,
        device: dev.describe(),
    })
}

/// A zipf distribution over `n` slots as fio draws it (`random_distribution=zipf:THETA`): rank
/// 0 is the most popular, rank `k` is drawn with a probability proportional to
/// `1 / (k + 1)^theta`, by the closed-form generator of Gray et al. ("Quickly generating
/// billion-record synthetic databases", the one YCSB and fio use; its normalizing sum runs over
/// at most 10 million ranks, as fio's does). Ranks are scattered over the slots by a fixed
/// permutation, so the hot slots are not all at the start of the device.
#[derive(Debug, Clone)]
pub struct Zipf {
    n: u64,
    theta: f64,
    zetan: f64,
    alpha: f64,
    eta: f64,
    /// The permutation `rank -> (rank * mul + add) % n` (`mul` coprime to `n`).
    mul: u64,
    add: u64,
}

impl Zipf {
    /// The distribution over `n` slots (at least 1) with exponent `theta` (> 0, not 1: as
    /// fio, which refuses 1.0).
    pub fn new(n: u64, theta: f64) -> Zipf {
        let n = n.max(1);
        let items = n.min(10_000_000);
        let zeta = |m: u64| (1..=m).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(items);
        let zeta2 = zeta(2.min(items));
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        let mut mul = 0x9e37_79b9_7f4a_7c15 % n;
        while n > 1 && gcd(mul, n) != 1 {
            mul += 1;
        }
        Zipf {
            n,
            theta,
            zetan,
            alpha,
            eta,
            mul: mul.max(1),
            add: 0x2545_f491_4f6c_dd1d % n,
        }
    }

    /// A rank (0: the most popular).
    pub fn rank(&self, rng: &mut fastrand::Rng) -> u64 {
        let u = rng.f64();
        let uz = u * self.zetan;
        let v = if uz < 1.0 {
            1
        } else if uz < 1.0 + 0.5f64.powf(self.theta) {
            2
        } else {
            1 + (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64
        };
        (v.max(1) - 1).min(self.n - 1)
    }

    /// The slot of a rank.
    pub fn slot(&self, rank: u64) -> u64 {
        ((u128::from(rank) * u128::from(self.mul) + u128::from(self.add)) % u128::from(self.n))
            as u64
    }

    /// The share of draws that fall on the `k` most popular ranks (what an ideal cache of `k`
    /// slots would serve): `zeta(k) / zeta(n)`.
    pub fn top_share(&self, k: u64) -> f64 {
        let k = k.min(self.n).min(10_000_000);
        (1..=k)
            .map(|i| 1.0 / (i as f64).powf(self.theta))
            .sum::<f64>()
            / self.zetan
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_core::MemoryDevice;

    /// The generator draws what the distribution says: the share of draws on the most popular
    /// ranks matches `zeta(k) / zeta(n)` (fio's t/fio-genzipf figures), ranks are spread over
    /// the slots by a permutation, and a zipf bench run stays inside the device.
    #[test]
    fn zipf_draws_match_the_distribution_and_scatter_over_the_slots() {
        for (n, theta) in [(1u64 << 18, 1.2), (100_000, 0.8), (1 << 22, 1.2)] {
            let z = Zipf::new(n, theta);
            let mut rng = fastrand::Rng::with_seed(7);
            let draws = 400_000;
            for k in [1, n / 100, n / 10] {
                let hits = (0..draws).filter(|_| z.rank(&mut rng) < k).count();
                let got = hits as f64 / draws as f64;
                let want = z.top_share(k);
                assert!(
                    (got - want).abs() < 0.02,
                    "n {n} theta {theta} top {k}: drew {got:.4}, zipf says {want:.4}"
                );
            }
            let mut seen = vec![false; n.min(1 << 16) as usize];
            let small = Zipf::new(seen.len() as u64, theta);
            for r in 0..seen.len() as u64 {
                let s = small.slot(r) as usize;
                assert!(!seen[s], "slot {s} twice");
                seen[s] = true;
            }
        }
        // theta 1.2 over 2^18 slots: the hottest 1% takes most of the draws.
        assert!(Zipf::new(1 << 18, 1.2).top_share((1 << 18) / 100) > 0.6);
        // A bench run stays inside the device and is skewed: 500 zipf draws over 256 slots
        // touch far fewer blocks than 500 uniform ones.
        let touched = |zipf: Option<f64>| {
            let dev = MemoryDevice::new(1 << 20).unwrap();
            let p = BenchParams {
                count: 500,
                depth: 8,
                random: true,
                zipf,
                write: true,
                pattern: 3,
                ..Default::default()
            };
            if zipf.is_some() {
                assert!(p.banner().contains("zipf:1.2"));
            }
            run(&dev, &p, &mut |_| {}).unwrap();
            let mut all = vec![0u8; 1 << 20];
            dev.read_at(0, &mut all).unwrap();
            all.chunks(4096).filter(|c| c[0] == 3).count()
        };
        let (z, u) = (touched(Some(1.2)), touched(None));
        assert!(
            z > 10 && (z as f64) < 0.7 * u as f64,
            "zipf {z}, uniform {u}"
        );
    }

    #[test]
    fn writes_land_where_qemu_would_put_them() {
        // 10 writes of 4 KiB with step 8 KiB on a 64 KiB device: offsets 0, 8k, ..., wrapping
        // modulo (64k - 4k) = 60k: 0 8 16 24 32 40 48 56 -> 64%60=4 -> 12
        let dev = MemoryDevice::new(64 << 10).unwrap();
        let p = BenchParams {
            count: 10,
            depth: 3,
            size: 4096,
            step: Some(8192),
            write: true,
            pattern: 0xcd,
            ..Default::default()
        };
        let mut seen = vec![];
        let r = run(&dev, &p, &mut |n| seen.push(n)).unwrap();
        assert_eq!(seen, vec![3, 6, 9, 10]);
        assert_eq!(r.count, 10);
        let mut all = vec![0u8; 64 << 10];
        dev.read_at(0, &mut all).unwrap();
        let written: Vec<u64> = (0..16u64)
            .filter(|k| all[(*k * 4096) as usize] == 0xcd)
            .collect();
        // 4k-blocks 0,2,4,...,14 and the two wrapped ones at 4k and 12k -> blocks 1 and 3
        assert_eq!(written, vec![0, 1, 2, 3, 4, 6, 8, 10, 12, 14]);
    }

    #[test]
    fn dedupe_percentage_writes_that_share_of_repeated_blocks() {
        // Sequential 4 KiB writes over 4096 distinct slots (the device is one block larger, as
        // the sequence wraps at capacity - size): every block the run wrote is there to look
        // at, and the share of repeats is what was asked.
        let dev = MemoryDevice::new((16 << 20) + 4096).unwrap();
        let p = BenchParams {
            count: 4096,
            depth: 32,
            write: true,
            dedupe_percentage: Some(50),
            ..Default::default()
        };
        run(&dev, &p, &mut |_| {}).unwrap();
        let mut all = vec![0u8; 16 << 20];
        dev.read_at(0, &mut all).unwrap();
        let distinct: std::collections::HashSet<&[u8]> = all.chunks(4096).collect();
        let repeats = 4096 - distinct.len();
        assert!(
            (1800..2300).contains(&repeats),
            "{repeats} of 4096 writes repeat an earlier one"
        );
        assert!(all.chunks(4096).all(|c| c.iter().any(|&x| x != 0)));
        let p = BenchParams {
            dedupe_percentage: Some(101),
            ..p
        };
        assert!(run(&dev, &p, &mut |_| {}).is_err());
    }

    #[test]
    fn flushes_every_interval_like_qemu() {
        use std::sync::Arc;
        use vstor_core::FaultDevice;
        let medium: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let dev = FaultDevice::new(medium);
        let p = BenchParams {
            count: 64,
            depth: 64,
            write: true,
            flush_interval: 8,
            ..Default::default()
        };
        run(&dev, &p, &mut |_| {}).unwrap();
        // Eight in the run, one at its end.
        assert_eq!(dev.stats().flushes, 9);
        assert_eq!(dev.stats().writes, 64);
    }

    #[test]
    fn huge_step_wraps_without_overflow() {
        let dev = MemoryDevice::new(64 << 10).unwrap();
        let p = BenchParams {
            count: 10,
            depth: 1,
            step: Some(u64::MAX - 511),
            ..Default::default()
        };
        run(&dev, &p, &mut |_| {}).unwrap();
    }

    #[test]
    fn bad_parameters_are_refused() {
        let dev = MemoryDevice::new(64 << 10).unwrap();
        for p in [
            BenchParams {
                count: 0,
                ..Default::default()
            },
            BenchParams {
                depth: 0,
                ..Default::default()
            },
            BenchParams {
                size: 100,
                ..Default::default()
            },
            BenchParams {
                offset: 63 << 10,
                ..Default::default()
            },
            BenchParams {
                offset: 1,
                ..Default::default()
            },
            BenchParams {
                depth: 4096,
                size: 64 << 20,
                ..Default::default()
            },
        ] {
            assert!(
                matches!(run(&dev, &p, &mut |_| {}), Err(Error::InvalidArgument(_))),
                "{p:?}"
            );
        }
    }

    #[test]
    fn random_offsets_stay_aligned_and_inside() {
        let dev = MemoryDevice::new(1 << 20).unwrap();
        let p = BenchParams {
            count: 2000,
            depth: 8,
            random: true,
            write: true,
            pattern: 1,
            ..Default::default()
        };
        run(&dev, &p, &mut |_| {}).unwrap();
        // Random writes must have touched many distinct blocks, including the last one eventually.
        let mut all = vec![0u8; 1 << 20];
        dev.read_at(0, &mut all).unwrap();
        let touched = all.chunks(4096).filter(|c| c[0] == 1).count();
        assert!(touched > 200, "{touched}");
        assert!(
            all.chunks(4096).all(|c| c.iter().all(|&b| b == c[0])),
            "partial block written"
        );
    }
}
