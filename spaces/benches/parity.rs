//! Parity encode and decode speed at the widths pools use (bytes of data per second), and the
//! same work done by two erasure-coding crates (`reed-solomon-erasure`, GF(2^8) Vandermonde, and
//! `reed-solomon-simd`, Leopard-style GF(2^16) with SIMD), so the choice of our own code stays a
//! measured one.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vstor_spaces::{parity_encode, parity_reconstruct};

const SHARD: usize = 64 << 10;

fn shards(k: usize) -> Vec<Vec<u8>> {
    (0..k)
        .map(|i| (0..SHARD).map(|b| (b * 31 + i * 7) as u8).collect())
        .collect()
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("parity_encode");
    // The baseline: copying the same data once.
    for k in [4, 8] {
        let data = shards(k);
        let mut out = vec![0u8; k * SHARD];
        g.throughput(Throughput::Bytes((k * SHARD) as u64));
        g.bench_function(BenchmarkId::new(format!("memcpy {k}"), SHARD), |b| {
            b.iter(|| {
                for (o, d) in out.chunks_mut(SHARD).zip(&data) {
                    o.copy_from_slice(d);
                }
            })
        });
    }
    for (k, m) in [(2, 1), (4, 1), (8, 1), (4, 2), (8, 2)] {
        let data = shards(k);
        let refs: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
        let mut parity = vec![vec![0u8; SHARD]; m];
        g.throughput(Throughput::Bytes((k * SHARD) as u64));
        g.bench_function(BenchmarkId::new(format!("{k}+{m}"), SHARD), |b| {
            b.iter(|| {
                let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
                parity_encode(&refs, &mut p);
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("parity_decode");
    for (k, m) in [(4, 1), (4, 2), (8, 2)] {
        let data = shards(k);
        let refs: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
        let mut parity = vec![vec![0u8; SHARD]; m];
        {
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
            parity_encode(&refs, &mut p);
        }
        let all: Vec<Option<Vec<u8>>> = data.iter().chain(&parity).cloned().map(Some).collect();
        g.throughput(Throughput::Bytes((k * SHARD) as u64));
        g.bench_function(
            BenchmarkId::new(format!("{k}+{m} lose {m} data"), SHARD),
            |b| {
                b.iter(|| {
                    let mut s = all.clone();
                    for x in s.iter_mut().take(m) {
                        *x = None;
                    }
                    assert!(parity_reconstruct(&mut s, k, SHARD));
                    s
                })
            },
        );
    }
    g.finish();
}

/// The same encode and two-shard decode through the crates, at the widths the pool uses.
fn crates(c: &mut Criterion) {
    let mut g = c.benchmark_group("parity_crates");
    for (k, m) in [(4, 1), (8, 1), (4, 2), (8, 2)] {
        let data = shards(k);
        g.throughput(Throughput::Bytes((k * SHARD) as u64));
        let rse = reed_solomon_erasure::galois_8::ReedSolomon::new(k, m).unwrap();
        let mut parity = vec![vec![0u8; SHARD]; m];
        g.bench_function(
            BenchmarkId::new(format!("rs-erasure encode {k}+{m}"), SHARD),
            |b| b.iter(|| rse.encode_sep(&data, &mut parity).unwrap()),
        );
        g.bench_function(
            BenchmarkId::new(format!("rs-simd encode {k}+{m}"), SHARD),
            |b| b.iter(|| reed_solomon_simd::encode(k, m, &data).unwrap()),
        );
        if m < 2 {
            continue;
        }
        // Lose the first two data shards.
        let mut all: Vec<Vec<u8>> = data.clone();
        all.extend(parity.iter().cloned());
        rse.encode(&mut all).unwrap();
        let some: Vec<Option<Vec<u8>>> = all.iter().cloned().map(Some).collect();
        g.bench_function(
            BenchmarkId::new(format!("rs-erasure {k}+{m} lose 2 data"), SHARD),
            |b| {
                b.iter(|| {
                    let mut s = some.clone();
                    s[0] = None;
                    s[1] = None;
                    rse.reconstruct_data(&mut s).unwrap();
                    s
                })
            },
        );
        let recovery = reed_solomon_simd::encode(k, m, &data).unwrap();
        g.bench_function(
            BenchmarkId::new(format!("rs-simd {k}+{m} lose 2 data"), SHARD),
            |b| {
                b.iter(|| {
                    let restored = reed_solomon_simd::decode(
                        k,
                        m,
                        data.iter().enumerate().skip(2),
                        recovery.iter().enumerate(),
                    )
                    .unwrap();
                    assert_eq!(restored[&0], data[0]);
                    restored
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, encode, decode, crates);
criterion_main!(benches);
