//! Criterion benchmarks of vstor-qos.
//!
//! - `decision/flows/N`: one I/O through the scheduler (enqueue, dispatch, complete) with N
//!   busy flows: a quarter capped, a quarter with minimums, the rest by weight.
//! - `layer/memory_read_4k_x32`: a batch of 32 reads of 4 KiB on the in-memory device, bare and
//!   through a `QosDevice` with an unlimited flow (the layer's cost on the batch path).
//!
//! Run: `cargo bench -p vstor-qos --bench scheduler` (add `-- --quick` for a short run).

#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use vstor_core::{BlockDevice, MemoryDevice, Request};
use vstor_qos::{Cost, Dispatch, Limits, PolicyKind, Qos, QosConfig, QosDevice, Scheduler};

fn busy_scheduler(flows: usize) -> Scheduler {
    let mut s = Scheduler::new(QosConfig {
        max_in_flight: 32,
        ..Default::default()
    });
    for i in 0..flows {
        let limits = match i % 4 {
            0 => Limits::max(50_000),
            1 => Limits::min(1_000),
            _ => Limits::default(),
        };
        let p = s
            .add_policy(&format!("p{i}"), PolicyKind::Dedicated, limits)
            .unwrap();
        let f = s
            .add_flow(&format!("f{i}"), Some(p), 1 + (i as u64 % 7) * 50)
            .unwrap();
        for t in 0..4 {
            s.enqueue(
                f,
                Cost {
                    units: 1 + (i as u64 % 3),
                    bytes: 8192,
                },
                t,
                0,
            )
            .unwrap();
        }
    }
    s
}

fn decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    for flows in [1usize, 8, 64] {
        let mut s = busy_scheduler(flows);
        let mut now = 0u64;
        let mut token = 1000u64;
        g.bench_function(BenchmarkId::new("flows", flows), |b| {
            b.iter(|| {
                let d = loop {
                    match s.dispatch(now) {
                        Dispatch::Io(d) => break d,
                        Dispatch::Wait(t) => now = t,
                        other => panic!("{other:?}"),
                    }
                };
                s.complete(d.flow, d.cost, 1000, now).unwrap();
                s.enqueue(d.flow, d.cost, token, now).unwrap();
                token += 1;
                now += 1000;
            })
        });
    }
    g.finish();
}

fn layer(c: &mut Criterion) {
    let mut g = c.benchmark_group("layer");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(32));
    let mem = MemoryDevice::new(64 << 20).unwrap();
    mem.write_at(0, &vec![1u8; 64 << 20]).unwrap();
    let qos = Qos::new(QosConfig::default());
    let f = qos.add_flow("bench", None, 0).unwrap();
    let dev = QosDevice::new(qos, f, &mem).unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 4096]).collect();
    for (name, d) in [("bare", &mem as &dyn BlockDevice), ("qos", &dev)] {
        g.bench_function(BenchmarkId::new("memory_read_4k_x32", name), |b| {
            let mut off = 0u64;
            b.iter(|| {
                let mut batch: Vec<Request<'_>> = bufs
                    .iter_mut()
                    .map(|buf| {
                        off = (off + 4096) % (64 << 20);
                        Request::read(off, buf)
                    })
                    .collect();
                d.submit_all(&mut batch).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decision, layer);
criterion_main!(benches);
