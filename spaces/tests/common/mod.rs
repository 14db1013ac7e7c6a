//! Helpers shared by the pool tests.
#![allow(dead_code)]

use std::sync::Arc;
use vstor_core::{BlockDevice, MemoryDevice};
use vstor_spaces::{
    CreateOptions, OpenOptions, Pool, PoolDisk, Provisioning, Resiliency, SpaceSpec,
};

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
    Pool::open(without(devs, skip), &OpenOptions { read_only }).unwrap()
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
