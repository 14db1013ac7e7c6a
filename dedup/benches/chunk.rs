//! Criterion benchmark of the dedup pipeline's CPU part, per core: FastCDC 2020 chunking
//! (32/64/128 KiB) and BLAKE3 chunk ids, end to end, and each alone; and LZ4 compression of the
//! chunks (what optimize adds for new chunks).
//!
//! Content: the file named by DEDUP_BENCH_FILE (up to 512 MiB of it), by default the library
//! of scripts/make-library (target/dedup-library/lib/gold.vhdx); without it, the host's
//! /usr/lib/x86_64-linux-gnu and /usr/bin files concatenated (real binaries and text, not
//! random bytes).
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

fn pipeline(c: &mut Criterion) {
    let (what, data) = content();
    eprintln!("content: {what}, {} MiB", data.len() >> 20);
    let p = ChunkParams::default();
    let mut g = c.benchmark_group("dedup");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("chunk_and_hash", |b| {
        b.iter(|| {
            let mut n = 0u64;
            chunk_stream::<_, std::io::Error>(&data[..], p, |_, c| {
                n ^= u64::from(chunk_id(c)[0]);
                Ok(())
            })
            .unwrap();
            n
        })
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
    g.bench_function("lz4_64k", |b| {
        b.iter(|| {
            data.chunks(64 << 10)
                .map(|c| lz4_flex::block::compress(c).len())
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
