//! Criterion benchmarks of vstor-core.
//!
//! - `batch_path/memory`: per-request overhead of the batch path (validation, dispatch,
//!   completion) on the in-memory device, for batches of 1 and 32 small reads.
//! - `file_backend`: 4 KiB random O_DIRECT reads at depth 32 on a 64 MiB file, io_uring vs the
//!   portable engine, and 64 KiB sequential writes.
//!
//! Run: `cargo bench --bench core` (add `-- --quick` for a short run).

#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use vstor::core::{
    AlignedBuf, BlockDevice, Engine, FileDevice, FileOptions, MemoryDevice, Request,
};

fn batch_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_path");
    g.measurement_time(Duration::from_secs(3));
    let dev = MemoryDevice::new(64 << 20).unwrap();
    dev.write_at(0, &vec![1u8; 64 << 20]).unwrap();
    for depth in [1usize, 32] {
        let mut bufs: Vec<Vec<u8>> = (0..depth).map(|_| vec![0u8; 512]).collect();
        g.throughput(Throughput::Elements(depth as u64));
        g.bench_function(BenchmarkId::new("memory_read_512", depth), |b| {
            let mut off = 0u64;
            b.iter(|| {
                let mut batch: Vec<Request<'_>> = bufs
                    .iter_mut()
                    .map(|buf| {
                        off = (off + 4096) % (64 << 20);
                        Request::read(off, buf)
                    })
                    .collect();
                dev.submit_all(&mut batch).unwrap();
            })
        });
    }
    g.finish();
}

fn file_backend(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.raw");
    let size: u64 = 64 << 20;
    {
        let dev = FileDevice::create(&path, size, &FileOptions::default()).unwrap();
        let fill = vec![0x5au8; 1 << 20];
        for o in (0..size).step_by(1 << 20) {
            dev.write_at(o, &fill).unwrap();
        }
        dev.flush().unwrap();
    }
    let mut g = c.benchmark_group("file_backend");
    g.measurement_time(Duration::from_secs(3)).sample_size(20);
    for engine in [Engine::IoUring, Engine::Sync] {
        let opts = FileOptions {
            direct: true,
            engine,
            ..Default::default()
        };
        let dev = FileDevice::open(&path, &opts).unwrap();
        let depth = 32;
        let mut bufs: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::new(4096)).collect();
        let mut rng = fastrand::Rng::with_seed(1);
        g.throughput(Throughput::Elements(depth as u64));
        g.bench_function(BenchmarkId::new("randread_4k_qd32", engine), |b| {
            b.iter(|| {
                let mut batch: Vec<Request<'_>> = bufs
                    .iter_mut()
                    .map(|buf| Request::read(rng.u64(0..size / 4096) * 4096, buf))
                    .collect();
                dev.submit_all(&mut batch).unwrap();
            })
        });
        let wbufs: Vec<AlignedBuf> = (0..8).map(|_| AlignedBuf::new(64 << 10)).collect();
        let mut pos = 0u64;
        g.throughput(Throughput::Bytes(8 * (64 << 10)));
        g.bench_function(BenchmarkId::new("seqwrite_64k_qd8", engine), |b| {
            b.iter(|| {
                let mut batch: Vec<Request<'_>> = wbufs
                    .iter()
                    .map(|buf| {
                        pos = (pos + (64 << 10)) % size;
                        Request::write(pos, buf)
                    })
                    .collect();
                dev.submit_all(&mut batch).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, batch_path, file_backend);
criterion_main!(benches);
