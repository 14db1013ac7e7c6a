//! Verifying what a read brought in against the stored per-block checksums: a CRC-32C per
//! 512-byte block compared one by one, against one CRC over the range compared with the
//! blocks' checksums joined (`csum::joined`), as the pool's reads, rebuilds and scrubs now do.
//! Cold: the data is a fresh buffer each time (as data just read by DMA is not in the CPU's
//! caches); warm: the same buffer again.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vstor_spaces::csum;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 9) as u8)
        .collect()
}

fn verify(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify");
    for &len in &[256usize << 10, 1 << 20] {
        let d = data(len, 7);
        let want = csum::crcs(&d);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("per-block/warm", len), &d, |b, d| {
            b.iter(|| assert!(csum::crcs(d) == want))
        });
        g.bench_with_input(BenchmarkId::new("joined/warm", len), &d, |b, d| {
            b.iter(|| assert_eq!(csum::crc_iov(&[&d[..]], 0, d.len()), csum::joined(&want)))
        });
        // Cold: a buffer set larger than the CPU's caches, visited in turn.
        let many: Vec<Vec<u8>> = (0..(256 << 20) / len).map(|_| d.clone()).collect();
        let mut i = 0;
        g.bench_function(BenchmarkId::new("per-block/cold", len), |b| {
            b.iter(|| {
                i = (i + 1) % many.len();
                assert!(csum::crcs(&many[i]) == want)
            })
        });
        g.bench_function(BenchmarkId::new("joined/cold", len), |b| {
            b.iter(|| {
                i = (i + 1) % many.len();
                let m = &many[i];
                assert_eq!(csum::crc_iov(&[&m[..]], 0, m.len()), csum::joined(&want))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
