//! Criterion benchmark of the dedup pipeline's CPU part, per core: FastCDC 2020 chunking
//! (32/64/128 KiB) and BLAKE3 chunk ids, end to end, and each alone; and LZ4 compression of the
//! chunks (what optimize adds for new chunks).
//!
//! Content: the file named by DEDUP_BENCH_FILE (up to 512 MiB of it), by default the library
//! of scripts/make-library (target/dedup-library/lib/gold.vhdx); without it, the host's
//! /usr/lib/x86_64-linux-gnu and /usr/bin files concatenated (real binaries and text, not
//! random bytes).
//!
//! Each figure is measured twice: in wall time (criterion's default), and in the time the
//! benchmark's thread ran on a CPU (`*_cpu`, from /proc/thread-self/schedstat), which is the
//! figure per core on a machine that other work keeps busy.
//!
//! Run: `cargo bench -p vstor-dedup --bench chunk`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::PathBuf;
use std::time::Duration;
use vstor_dedup::chunk::{chunk_id, chunk_stream, ChunkParams};

const LIMIT: usize = 512 << 20;

fn content() -> (String, Vec<u8>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let file = std::env::var_os("DEDUP_BENCH_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/dedup-library/lib/gold.vhdx"));
    if let Ok(mut d) = std::fs::read(&file) {
        d.truncate(LIMIT);
        return (file.display().to_string(), d);
    }
    let mut d = Vec::new();
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/bin"] {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for p in names {
            if d.len() >= 256 << 20 {
                break;
            }
            if p.is_file() {
                if let Ok(b) = std::fs::read(&p) {
                    d.extend_from_slice(&b);
                }
            }
        }
    }
    ("host /usr/lib and /usr/bin files".into(), d)
}

/// The time this thread has run on a CPU (Linux's scheduler statistics, in nanoseconds).
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("/proc/thread-self/schedstat (Linux with scheduler statistics)");
    let ns = s.split_whitespace().next().and_then(|v| v.parse().ok());
    Duration::from_nanos(ns.expect("a run time in /proc/thread-self/schedstat"))
}

/// Runs `f` `iters` times and returns the CPU time it took.
fn cpu_time<T>(iters: u64, mut f: impl FnMut() -> T) -> Duration {
    let t0 = thread_cpu();
    for _ in 0..iters {
        std::hint::black_box(f());
    }
    thread_cpu() - t0
}

fn chunk_and_hash(data: &[u8], p: ChunkParams) -> u64 {
    let mut n = 0u64;
    chunk_stream::<_, std::io::Error>(data, p, |_, c| {
        n ^= u64::from(chunk_id(c)[0]);
        Ok(())
    })
    .unwrap();
    n
}

fn lz4(data: &[u8]) -> usize {
    data.chunks(64 << 10)
        .map(|c| lz4_flex::block::compress(c).len())
        .sum::<usize>()
}

fn pipeline(c: &mut Criterion) {
    let (what, data) = content();
    eprintln!("content: {what}, {} MiB", data.len() >> 20);
    let p = ChunkParams::default();
    let mut g = c.benchmark_group("dedup");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("chunk_and_hash", |b| b.iter(|| chunk_and_hash(&data, p)));
    g.bench_function("chunk_and_hash_cpu", |b| {
        b.iter_custom(|iters| cpu_time(iters, || chunk_and_hash(&data, p)))
    });
    g.bench_function("chunk_only", |b| {
        b.iter(|| {
            let mut n = 0usize;
            chunk_stream::<_, std::io::Error>(&data[..], p, |_, c| {
                n += c.len();
                Ok(())
            })
            .unwrap();
            n
        })
    });
    g.bench_function("hash_only_64k", |b| {
        b.iter(|| {
            data.chunks(64 << 10)
                .map(|c| u64::from(chunk_id(c)[0]))
                .sum::<u64>()
        })
    });
    g.bench_function("lz4_64k", |b| b.iter(|| lz4(&data)));
    g.bench_function("lz4_64k_cpu", |b| {
        b.iter_custom(|iters| cpu_time(iters, || lz4(&data)))
    });
    let packed: Vec<Vec<u8>> = data
        .chunks(64 << 10)
        .map(lz4_flex::block::compress)
        .collect();
    let stored: usize = packed.iter().map(Vec::len).sum();
    eprintln!(
        "lz4 of 64 KiB blocks: {} -> {stored} bytes ({:.3} of the input)",
        data.len(),
        stored as f64 / data.len() as f64
    );
    g.bench_function("lz4_decompress_64k_cpu", |b| {
        b.iter_custom(|iters| {
            cpu_time(iters, || {
                packed
                    .iter()
                    .map(|c| lz4_flex::block::decompress(c, 64 << 10).unwrap().len())
                    .sum::<usize>()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
