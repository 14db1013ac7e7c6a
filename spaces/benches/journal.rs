//! What the parity journal costs: batches of small partial-row writes (each batch then a
//! flush) to a single-parity space of file-backed members, on a pool with the journal (format
//! version 3) and on the same pool made format version 2 (no journal: its headers rewritten
//! as a version 2 vstor wrote them, as the version 2 test does). Full-row writes, which skip
//! the journal, as a control. Files in a temporary directory (under /tmp by default).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::path::Path;
use vstor_core::{BlockDevice, FileDevice, FileOptions, Request};
use vstor_spaces::{CreateOptions, OpenOptions, Pool, Provisioning, Resiliency, SpaceSpec};

const DISKS: usize = 5;
const DISK_SIZE: u64 = 48 << 20;
const SPACE: u64 = 32 << 20;
const INTERLEAVE: u64 = 64 << 10;

/// Rewrites every member's metadata as format version 2 (no journal; slabs 1 MiB earlier).
fn make_version_2(dir: &Path) {
    for i in 0..DISKS {
        let dev = FileDevice::open(dir.join(format!("disk{i}.raw")), &FileOptions::default())
            .expect("open member");
        dev.write_at(2 << 20, &vec![0u8; 2 << 20]).unwrap();
        for slot in [0u64, 1 << 20] {
            let mut b = vec![0u8; 4096];
            dev.read_at(slot, &mut b).unwrap();
            b[8..12].copy_from_slice(&2u32.to_le_bytes());
            let ds = u64::from_le_bytes(b[104..112].try_into().unwrap());
            b[104..112].copy_from_slice(&(ds - (1 << 20)).to_le_bytes());
            vstor_spaces::format::reseal(&mut b);
            dev.write_at(slot, &b).unwrap();
        }
        dev.flush().unwrap();
    }
}

fn pool(dir: &Path, journal: bool) -> Pool {
    let opts = CreateOptions { slab_size: 4 << 20 };
    drop(Pool::create_in_dir(dir, DISKS, DISK_SIZE, &opts, &FileOptions::default()).unwrap());
    if !journal {
        make_version_2(dir);
    }
    let pool = Pool::open_dir(dir, &OpenOptions::default(), &FileOptions::default()).unwrap();
    assert_eq!(pool.info().format_version, if journal { 3 } else { 2 });
    pool.create_space(&SpaceSpec {
        name: "p".into(),
        size: SPACE,
        resiliency: Resiliency::Parity { redundancy: 1 },
        columns: Some(DISKS),
        interleave: Some(INTERLEAVE),
        provisioning: Provisioning::Fixed,
    })
    .unwrap();
    pool
}

fn writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("parity_journal");
    g.sample_size(20);
    let small = vec![0x5au8; 4096];
    let row = (DISKS as u64 - 1) * INTERLEAVE;
    let full = vec![0xa5u8; row as usize];
    // Both pools first; each kind of batch then runs on one and the other in turn (the order
    // flipped by JOURNAL_BENCH_V2_FIRST=1, as the machine's writeback favours what runs first).
    let mut order = [true, false];
    if std::env::var_os("JOURNAL_BENCH_V2_FIRST").is_some() {
        order.reverse();
    }
    let tmps: Vec<_> = order.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let pools: Vec<(bool, Pool)> = order
        .iter()
        .zip(&tmps)
        .map(|(&j, t)| (j, pool(t.path(), j)))
        .collect();
    let name = |journal: bool| {
        if journal {
            "journal (v3)"
        } else {
            "no journal (v2)"
        }
    };
    // 4 full rows (no journal either way: run first, before any row has a record), then a
    // flush.
    g.throughput(Throughput::Elements(4));
    for (journal, pool) in &pools {
        let space = pool.open_space("p").unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        g.bench_function(
            BenchmarkId::new("4 full rows + flush", name(*journal)),
            |b| {
                b.iter(|| {
                    let first = rng.u64(..SPACE / row - 4);
                    let mut batch: Vec<Request> = (0..4)
                        .map(|i| Request::write((first + i) * row, &full[..]))
                        .collect();
                    batch.push(Request::flush());
                    space.submit(&mut batch);
                    batch.iter().for_each(|r| r.result().unwrap());
                })
            },
        );
    }
    // 16 writes of 4 KiB in random rows (partial rows), then a flush.
    g.throughput(Throughput::Elements(16));
    for (journal, pool) in &pools {
        let space = pool.open_space("p").unwrap();
        let mut rng = fastrand::Rng::with_seed(8);
        g.bench_function(
            BenchmarkId::new("16 x 4 KiB partial-row + flush", name(*journal)),
            |b| {
                b.iter(|| {
                    let mut batch: Vec<Request> = (0..16)
                        .map(|_| {
                            let r = rng.u64(..SPACE / row);
                            Request::write(r * row + rng.u64(..row / 4096) * 4096, &small[..])
                        })
                        .collect();
                    batch.push(Request::flush());
                    space.submit(&mut batch);
                    batch.iter().for_each(|r| r.result().unwrap());
                })
            },
        );
        eprintln!("{}: journal {:?}", name(*journal), pool.info().journal);
    }
    g.finish();
}

criterion_group!(benches, writes);
criterion_main!(benches);
