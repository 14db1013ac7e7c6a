//! Helpers shared by the pool tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vstor_core::{BlockDevice, CutPolicy, DeviceInfo, FaultDevice, MemoryDevice, Request};
use vstor_spaces::{
    CreateOptions, OpenOptions, Pool, PoolDisk, Provisioning, Resiliency, SpaceSpec,
};

/// Memory disks holding copies of `media`.
pub fn from_media(media: &[Vec<u8>], disk: u64) -> Vec<Arc<dyn BlockDevice>> {
    media
        .iter()
        .map(|m| {
            let d = Arc::new(MemoryDevice::new(disk).unwrap());
            d.write_at(0, m).unwrap();
            d as Arc<dyn BlockDevice>
        })
        .collect()
}

/// Slab size of the test pools.
pub const SLAB: u64 = 1 << 20;
/// Interleave of the test spaces.
pub const INTERLEAVE: u64 = 16 << 10;

/// `n` memory disks of `size` bytes.
pub fn mem_disks(n: usize, size: u64) -> Vec<Arc<dyn BlockDevice>> {
    (0..n)
        .map(|_| Arc::new(MemoryDevice::new(size).unwrap()) as Arc<dyn BlockDevice>)
        .collect()
}

/// The disks as pool disks named `m0`, `m1`, ...
pub fn named(devs: &[Arc<dyn BlockDevice>]) -> Vec<PoolDisk> {
    devs.iter()
        .enumerate()
        .map(|(i, d)| PoolDisk::new(format!("m{i}"), d.clone()))
        .collect()
}

/// The disks except those in `skip`.
pub fn without(devs: &[Arc<dyn BlockDevice>], skip: &[usize]) -> Vec<PoolDisk> {
    named(devs)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !skip.contains(i))
        .map(|(_, d)| d)
        .collect()
}

pub fn create(devs: &[Arc<dyn BlockDevice>]) -> Pool {
    Pool::create(named(devs), &CreateOptions { slab_size: SLAB }).unwrap()
}

pub fn open(devs: &[Arc<dyn BlockDevice>], skip: &[usize], read_only: bool) -> Pool {
    Pool::open(
        without(devs, skip),
        &OpenOptions {
            read_only,
            ..Default::default()
        },
    )
    .unwrap()
}

pub fn spec(name: &str, size: u64, resiliency: Resiliency, columns: Option<usize>) -> SpaceSpec {
    SpaceSpec {
        name: name.into(),
        size,
        resiliency,
        columns,
        interleave: Some(INTERLEAVE),
        provisioning: Provisioning::Thin,
    }
}

/// Deterministic bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Every byte of a device.
pub fn contents(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut b = vec![0u8; dev.capacity() as usize];
    dev.read_at(0, &mut b).unwrap();
    b
}

/// The layouts of the integrity matrix: (label, resiliency, columns, disks).
pub fn layouts() -> Vec<(&'static str, Resiliency, usize, usize)> {
    vec![
        ("simple", Resiliency::Simple, 3, 4),
        ("mirror2", Resiliency::Mirror { copies: 2 }, 2, 5),
        ("mirror3", Resiliency::Mirror { copies: 3 }, 1, 4),
        ("parity1", Resiliency::Parity { redundancy: 1 }, 4, 5),
        ("parity2", Resiliency::Parity { redundancy: 2 }, 5, 6),
    ]
}

/// Members that lose power together: the `cut_at`-th write-type request of the group (1 is
/// the first) finds every member powered off.
pub struct Group {
    pub faults: Vec<Arc<FaultDevice>>,
    pub writes: AtomicU64,
    pub cut_at: AtomicU64,
    pub seed: u64,
}

struct Member {
    group: Arc<Group>,
    index: usize,
}

impl BlockDevice for Member {
    fn info(&self) -> DeviceInfo {
        self.group.faults[self.index].info()
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let g = &self.group;
        let n = batch.iter().filter(|r| r.kind().is_write()).count() as u64;
        let before = g.writes.fetch_add(n, Ordering::SeqCst);
        let at = g.cut_at.load(Ordering::SeqCst);
        if n > 0 && at > before && at <= before + n {
            for f in &g.faults {
                let _ = f.power_cut(CutPolicy::Random {
                    seed: g.seed + at,
                    torn: true,
                });
            }
        }
        g.faults[self.index].submit(batch)
    }
}

impl Group {
    /// A group over copies of `media` (disks of `disk` bytes).
    pub fn new(media: &[Vec<u8>], disk: u64, seed: u64) -> Arc<Group> {
        let faults = media
            .iter()
            .map(|m| {
                let d = Arc::new(MemoryDevice::new(disk).unwrap());
                d.write_at(0, m).unwrap();
                Arc::new(FaultDevice::new(d))
            })
            .collect();
        Arc::new(Group {
            faults,
            writes: AtomicU64::new(0),
            cut_at: AtomicU64::new(0),
            seed,
        })
    }

    pub fn disks(self: &Arc<Self>) -> Vec<PoolDisk> {
        (0..self.faults.len())
            .map(|i| {
                PoolDisk::new(
                    format!("m{i}"),
                    Arc::new(Member {
                        group: self.clone(),
                        index: i,
                    }),
                )
            })
            .collect()
    }

    pub fn cut_happened(&self) -> bool {
        self.faults.iter().any(|f| !f.is_powered())
    }

    pub fn power_on(&self) {
        self.cut_at.store(0, Ordering::SeqCst);
        for f in &self.faults {
            f.power_on();
        }
    }

    pub fn media(&self) -> Vec<Vec<u8>> {
        self.faults.iter().map(|f| contents(&**f.inner())).collect()
    }

    /// Arms the cut at the `k`-th write from now (1: the next one).
    pub fn cut_after(&self, k: u64) {
        self.cut_at
            .store(self.writes.load(Ordering::SeqCst) + k, Ordering::SeqCst);
    }
}

/// Every byte of a space (or any device).
pub fn read_all(space: &dyn BlockDevice) -> Vec<u8> {
    let mut b = vec![0u8; space.capacity() as usize];
    space.read_at(0, &mut b).unwrap();
    b
}

/// The layouts that tolerate a lost member: (label, resiliency, columns, disks).
pub fn redundant() -> Vec<(&'static str, Resiliency, usize, usize)> {
    layouts()
        .into_iter()
        .filter(|l| l.1.tolerates() > 0)
        .collect()
}
