//! The QoS layer as a block device: batches, barriers, results, threads, run-time changes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vstor_core::{BlockDevice, DeviceInfo, Error, MemoryDevice, OpKind, Request};
use vstor_qos::{
    Clock, FlowReport, FlowStatus, Limits, PolicyKind, Qos, QosConfig, QosDevice, QosEventKind,
    VirtualClock,
};

/// Records the batches that reach it: (kind, offset) of each request, batch by batch.
struct Recorder {
    inner: MemoryDevice,
    batches: Mutex<Vec<Vec<(OpKind, u64)>>>,
}

impl Recorder {
    fn new(size: u64) -> Self {
        Recorder {
            inner: MemoryDevice::new(size).unwrap(),
            batches: Mutex::new(Vec::new()),
        }
    }
}

impl BlockDevice for Recorder {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn submit(&self, batch: &mut [Request<'_>]) {
        self.batches
            .lock()
            .unwrap()
            .push(batch.iter().map(|r| (r.kind(), r.offset())).collect());
        self.inner.submit(batch)
    }
}

fn capped(max: u64, burst: u64) -> (Arc<VirtualClock>, Arc<Qos>, vstor_qos::FlowId) {
    let clock = Arc::new(VirtualClock::auto_advance());
    let qos = Qos::with_clock(QosConfig::default(), clock.clone());
    let p = qos
        .add_policy(
            "capped",
            PolicyKind::Dedicated,
            Limits {
                max_iops: max,
                burst,
                ..Default::default()
            },
        )
        .unwrap();
    let f = qos.add_flow("vm", Some(p), 0).unwrap();
    (clock, qos, f)
}

#[test]
fn a_capped_disk_takes_the_time_its_maximum_says_and_keeps_its_data() {
    let (clock, qos, f) = capped(200, 10);
    let dev = QosDevice::new(qos.clone(), f, MemoryDevice::new(8 << 20).unwrap()).unwrap();
    let before = qos.flow_stats(f).unwrap();
    let bufs: Vec<Vec<u8>> = (0..1000).map(|i| vec![(i % 251) as u8; 4096]).collect();
    for chunk in bufs.chunks(32).enumerate() {
        let (c, bufs) = chunk;
        let mut batch: Vec<Request<'_>> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| Request::write(((c * 32 + i) as u64 * 4096) % (8 << 20), b))
            .collect();
        dev.submit_all(&mut batch).unwrap();
    }
    // 10 at once, then one every 5 ms: the 1000th at 990 * 5 ms.
    assert_eq!(clock.now(), 990 * 5_000_000);
    let r = FlowReport::between(&before, &qos.flow_stats(f).unwrap());
    assert_eq!((r.requests, r.units), (1000, 1000));
    assert!((r.normalized_iops - 1000.0 / 4.95).abs() < 0.01, "{r:?}");
    let mut back = vec![0u8; 4096];
    for i in [0u64, 1, 500, 999] {
        dev.read_at(i * 4096, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == (i % 251) as u8));
    }
}

#[test]
fn a_held_back_request_does_not_hold_up_those_let_go_and_a_flush_stays_a_barrier() {
    let (clock, qos, f) = capped(100, 3);
    let dev = QosDevice::new(qos, f, Recorder::new(1 << 20)).unwrap();
    let data = vec![7u8; 4096];
    let mut big = vec![0u8; 16384];
    let mut batch = vec![
        Request::write(0, &data),
        Request::write(4096, &data),
        Request::read(1 << 30, &mut big), // past the end: fails alone
        Request::write(8192, &data),
        Request::flush(),
        Request::write(12288, &data),
    ];
    dev.submit(&mut batch);
    let results: Vec<bool> = batch.iter().map(|r| r.result().is_ok()).collect();
    assert_eq!(results, vec![true, true, false, true, true, true]);
    assert!(matches!(batch[2].result(), Err(Error::OutOfRange { .. })));
    let seen = dev.inner().batches.lock().unwrap().clone();
    use OpKind::*;
    assert_eq!(
        seen,
        vec![
            // Two of the burst of 3 go down as one batch at once; the 16 KiB read costs 2 and
            // waits for its second token.
            vec![(Write, 0), (Write, 4096)],
            vec![(Read, 1 << 30)],
            // Then one every 10 ms; the flush goes with the last request before it.
            vec![(Write, 8192), (Flush, 0)],
            vec![(Write, 12288)],
        ]
    );
    // 1 + 1 + 2 + 1 + 1 = 6 units, 3 of them past the burst: 30 ms.
    assert_eq!(clock.now(), 30_000_000);
}

#[test]
fn flushes_cost_nothing_and_pass_at_once() {
    let (clock, qos, f) = capped(1, 1);
    let dev = QosDevice::new(qos.clone(), f, Recorder::new(1 << 20)).unwrap();
    for _ in 0..10 {
        dev.flush().unwrap();
    }
    let mut batch = [Request::flush(), Request::flush()];
    dev.submit_all(&mut batch).unwrap();
    assert_eq!(clock.now(), 0);
    assert_eq!(qos.flow_stats(f).unwrap().requests, 0);
    assert_eq!(dev.inner().batches.lock().unwrap().len(), 11);
}

#[test]
fn describe_and_info_come_from_below() {
    let (_, qos, f) = capped(100, 0);
    let mem = MemoryDevice::new(1 << 20).unwrap();
    let info = mem.info();
    let dev = QosDevice::new(qos, f, mem).unwrap();
    assert_eq!(dev.info(), info);
    assert!(
        dev.describe().starts_with("qos flow 'vm' over "),
        "{}",
        dev.describe()
    );
    let other = Qos::new(QosConfig::default());
    assert!(QosDevice::new(other, f, MemoryDevice::new(512).unwrap()).is_err());
}

#[test]
fn an_event_reaches_subscribers_when_a_minimum_is_not_met() {
    // A minimum of 1,000 units/s that a 1 MiB/s bandwidth cap (128 8-KiB units/s) cannot meet.
    let clock = Arc::new(VirtualClock::auto_advance());
    let qos = Qos::with_clock(QosConfig::default(), clock.clone());
    let p = qos
        .add_policy(
            "starved",
            PolicyKind::Dedicated,
            Limits {
                min_iops: 1000,
                max_bandwidth: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
    let f = qos.add_flow("vm-starved", Some(p), 0).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    qos.subscribe(move |e| s2.lock().unwrap().push(e.clone()));
    let dev = QosDevice::new(qos.clone(), f, MemoryDevice::new(1 << 20).unwrap()).unwrap();
    let buf = vec![0u8; 8192];
    let mut n = 0;
    while clock.now() < 3_000_000_000 {
        let mut batch: Vec<_> = (0..8).map(|i| Request::write(i * 8192, &buf)).collect();
        dev.submit_all(&mut batch).unwrap();
        n += 8;
    }
    let events = seen.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, QosEventKind::InsufficientThroughput);
    assert_eq!(events[0].name, "vm-starved");
    assert!(
        (events[0].achieved_iops - 128.0).abs() < 10.0,
        "{:?}",
        events[0]
    );
    assert_eq!(
        qos.flow_stats(f).unwrap().status,
        FlowStatus::InsufficientThroughput
    );
    // Lifting the cap: the flow gets its minimum and recovers.
    qos.set_limits(p, Limits::min(1000)).unwrap();
    let start = clock.now();
    for _ in 0..12_000 {
        dev.write_at(0, &buf).unwrap();
        clock.advance(Duration::from_micros(100));
    }
    assert!(clock.now() - start >= 1_200_000_000);
    qos.poll();
    let events = seen.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1].kind, QosEventKind::Recovered, "{events:?}");
    assert_eq!(qos.flow_stats(f).unwrap().status, FlowStatus::Ok);
    assert!(n > 0);
}

#[test]
fn many_threads_share_a_bounded_device_and_every_request_completes() {
    let qos = Qos::new(QosConfig {
        max_in_flight: 2,
        ..Default::default()
    });
    let mem = Arc::new(MemoryDevice::new(16 << 20).unwrap());
    let flows: Vec<_> = (0..4)
        .map(|i| {
            let p = qos
                .add_policy(
                    &format!("p{i}"),
                    PolicyKind::Dedicated,
                    Limits::min(100 * i),
                )
                .unwrap();
            qos.add_flow(&format!("f{i}"), Some(p), i + 1).unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        for &f in &flows {
            let dev = QosDevice::new(qos.clone(), f, mem.clone()).unwrap();
            s.spawn(move || {
                let mut bufs: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; 4096]).collect();
                for round in 0..125u64 {
                    let mut batch: Vec<Request<'_>> = bufs
                        .iter_mut()
                        .enumerate()
                        .map(|(i, b)| {
                            let off = ((round * 16 + i as u64) * 4096) % (16 << 20);
                            if i % 2 == 0 {
                                Request::read(off, b)
                            } else {
                                Request::write(off, b)
                            }
                        })
                        .collect();
                    if round % 10 == 0 {
                        batch.push(Request::flush());
                    }
                    dev.submit_all(&mut batch).unwrap();
                }
            });
        }
    });
    for s in qos.all_stats() {
        assert_eq!(
            (s.requests, s.units, s.queued, s.in_flight),
            (2000, 2000, 0, 0),
            "{}",
            s.name
        );
    }
}

#[test]
fn a_real_time_cap_holds_and_a_raised_limit_frees_waiting_requests() {
    let qos = Qos::new(QosConfig::default());
    let p = qos
        .add_policy(
            "p",
            PolicyKind::Dedicated,
            Limits {
                max_iops: 2000,
                burst: 10,
                ..Default::default()
            },
        )
        .unwrap();
    let f = qos.add_flow("f", Some(p), 0).unwrap();
    let dev = QosDevice::new(qos.clone(), f, MemoryDevice::new(1 << 20).unwrap()).unwrap();
    let buf = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..7 {
        let mut batch: Vec<_> = (0..30).map(|i| Request::write(i * 4096, &buf)).collect();
        dev.submit_all(&mut batch).unwrap();
    }
    // 210 requests, 10 at once, 200 at 2,000 a second: at least 100 ms (a lower bound only:
    // a busy machine may take longer).
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );

    // A one-IOPS cap holds a batch of 5 for 4 s; raising the limit lets it go at once.
    qos.set_limits(
        p,
        Limits {
            max_iops: 1,
            burst: 1,
            ..Default::default()
        },
    )
    .unwrap();
    dev.write_at(0, &buf).unwrap(); // drains the bucket
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut batch: Vec<_> = (0..5).map(|i| Request::write(i * 4096, &buf)).collect();
            dev.submit_all(&mut batch).unwrap();
        });
        std::thread::sleep(Duration::from_millis(50));
        qos.set_limits(p, Limits::default()).unwrap();
    });
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(qos.flow_stats(f).unwrap().requests, 216);
}
