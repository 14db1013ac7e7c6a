//! Criterion benchmarks of vstor-vhdx.
//!
//! - `bat_lookup`: the lookup every read does (`Vhdx::locate`): a 4 KiB piece of a fully present
//!   block, of a partially present block of a differencing disk (sector bitmap runs), and a
//!   1 MiB span over contiguous blocks (merged into one piece).
//! - `block_allocation`: first writes that allocate a new block (reserve, write, publish) on an
//!   in-memory file, 4 KiB into 1 MiB blocks, batches of 1 and 32; and the commit (flush) of 32
//!   new blocks' metadata through the log.
//!
//! Run: `cargo bench --bench vhdx` (add `-- --quick` for a short run).

#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use vstor::core::{BlockDevice, MemoryDevice, Request};
use vstor::vhdx::{CreateOptions, Vhdx};

const MIB: u64 = 1 << 20;

fn mem(size: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemoryDevice::new(size).unwrap())
}

fn bat_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("bat_lookup");
    g.measurement_time(Duration::from_secs(3));
    let opts = CreateOptions::dynamic(1 << 30).block_size(MIB as u32);
    let base = Arc::new(Vhdx::create_on(mem(8 * MIB), &opts, None).unwrap());
    let data = vec![7u8; 64 * MIB as usize];
    base.write_at(0, &data).unwrap();
    base.flush().unwrap();
    let child = Vhdx::create_on(
        mem(8 * MIB),
        &CreateOptions::differencing("b.vhdx"),
        Some((base.clone(), Path::new("b.vhdx"))),
    )
    .unwrap();
    // Every other 4 KiB of the first 64 MiB written in the child: partially present blocks.
    for k in (0..64 * MIB).step_by(8192) {
        child.write_at(k, &[1u8; 4096]).unwrap();
    }
    g.throughput(Throughput::Elements(1));
    let mut off = 0u64;
    g.bench_function("fully_present_4k", |b| {
        b.iter(|| {
            off = (off + 4096 * 97) % (64 * MIB);
            black_box(base.locate(off, 4096).unwrap())
        })
    });
    g.bench_function("partially_present_4k", |b| {
        b.iter(|| {
            off = (off + 4096 * 97) % (64 * MIB);
            black_box(child.locate(off, 4096).unwrap())
        })
    });
    g.bench_function("fully_present_1m_span", |b| {
        b.iter(|| {
            off = (off + MIB + 4096) % (62 * MIB);
            black_box(base.locate(off, MIB).unwrap())
        })
    });
    g.finish();
}

fn block_allocation(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_allocation");
    g.measurement_time(Duration::from_secs(3));
    let buf = vec![0x5au8; 4096];
    for depth in [1usize, 32] {
        // Each iteration makes 8 batches of `depth` first writes.
        g.throughput(Throughput::Elements(8 * depth as u64));
        g.bench_function(BenchmarkId::new("first_write_4k", depth), |b| {
            b.iter_batched(
                || {
                    Vhdx::create_on(
                        mem(8 * MIB),
                        &CreateOptions::dynamic(64 << 30).block_size(MIB as u32),
                        None,
                    )
                    .unwrap()
                },
                |disk| {
                    for round in 0..8u64 {
                        let mut batch: Vec<Request<'_>> = (0..depth as u64)
                            .map(|i| Request::write((round * depth as u64 + i) * 3 * MIB, &buf))
                            .collect();
                        disk.submit_all(&mut batch).unwrap();
                    }
                    disk
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.throughput(Throughput::Elements(32));
    g.bench_function("commit_32_new_blocks", |b| {
        b.iter_batched(
            || {
                let disk = Vhdx::create_on(
                    mem(8 * MIB),
                    &CreateOptions::dynamic(64 << 30).block_size(MIB as u32),
                    None,
                )
                .unwrap();
                for i in 0..32u64 {
                    disk.write_at(i * 5 * MIB, &buf).unwrap();
                }
                disk
            },
            |disk| {
                disk.flush().unwrap();
                disk
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bat_lookup, block_allocation);
criterion_main!(benches);
