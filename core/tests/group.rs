//! `submit_group`: several devices' batches at once, io_uring files on one shared ring, other
//! devices on threads beside it; every request reported once, complete, with its own result.

use std::collections::BTreeMap;
use vstor_core::{
    submit_group, AlignedBuf, BlockDevice, Engine, Error, FaultDevice, FaultRule, FileDevice,
    FileOptions, MemoryDevice, OpKind, Request,
};

const MIB: u64 = 1 << 20;

/// A cheap digest of a buffer, to check what the callback saw.
fn crc(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100000001b3)
    })
}

fn file(dir: &tempfile::TempDir, name: &str, engine: Engine, direct: bool) -> FileDevice {
    let opts = FileOptions {
        engine,
        direct,
        ..FileOptions::default()
    };
    FileDevice::create(dir.path().join(name), 4 * MIB, &opts).unwrap()
}

fn pattern(seed: u8, len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed
            .wrapping_mul(31)
            .wrapping_add((i / 512) as u8 ^ (i as u8));
    }
    b
}

/// Writes a different pattern at several offsets of each device in one group, flushes each,
/// then reads everything back in a second group and compares.
fn round_trip(devs: &[&dyn BlockDevice]) {
    let data: Vec<Vec<AlignedBuf>> = (0..devs.len())
        .map(|d| {
            (0..6)
                .map(|k| pattern((d * 8 + k) as u8, 64 << 10))
                .collect()
        })
        .collect();
    let offset = |k: usize| k as u64 * 192 * 1024;
    let mut writes: Vec<Vec<Request<'_>>> = data
        .iter()
        .map(|bufs| {
            let mut reqs: Vec<Request<'_>> = bufs
                .iter()
                .enumerate()
                .map(|(k, b)| Request::write(offset(k), &b[..]))
                .collect();
            reqs.push(Request::flush());
            reqs
        })
        .collect();
    let mut seen: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    {
        let mut jobs: Vec<(&dyn BlockDevice, &mut [Request<'_>])> = devs
            .iter()
            .zip(writes.iter_mut())
            .map(|(d, r)| (*d, &mut r[..]))
            .collect();
        submit_group(&mut jobs, |j, i, r| {
            assert!(r.is_complete(), "reported before completing");
            r.result().unwrap();
            *seen.entry((j, i)).or_default() += 1;
        });
    }
    assert_eq!(seen.len(), devs.len() * 7, "every request reported");
    assert!(seen.values().all(|&n| n == 1), "each reported once");

    let mut back: Vec<Vec<AlignedBuf>> = (0..devs.len())
        .map(|_| (0..6).map(|_| AlignedBuf::new(64 << 10)).collect())
        .collect();
    let mut reads: Vec<Vec<Request<'_>>> = back
        .iter_mut()
        .map(|bufs| {
            bufs.iter_mut()
                .enumerate()
                .map(|(k, b)| Request::read(offset(k), &mut b[..]))
                .collect()
        })
        .collect();
    let mut sums = BTreeMap::new();
    {
        let mut jobs: Vec<(&dyn BlockDevice, &mut [Request<'_>])> = devs
            .iter()
            .zip(reads.iter_mut())
            .map(|(d, r)| (*d, &mut r[..]))
            .collect();
        // The callback sees the data of a completed read (what the pool checksums there).
        submit_group(&mut jobs, |j, i, r| {
            let vstor_core::Op::Read { bufs, .. } = &r.op else {
                panic!("not a read")
            };
            sums.insert((j, i), crc(&bufs[0]));
        });
    }
    drop(reads);
    for (d, bufs) in back.iter().enumerate() {
        for (k, b) in bufs.iter().enumerate() {
            assert!(b[..] == data[d][k][..], "device {d} piece {k} differs");
            assert_eq!(sums[&(d, k)], crc(&data[d][k]));
        }
    }
}

#[test]
fn files_on_one_ring_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<FileDevice> = (0..4)
        .map(|i| file(&dir, &format!("m{i}"), Engine::Auto, true))
        .collect();
    let devs: Vec<&dyn BlockDevice> = files.iter().map(|f| f as &dyn BlockDevice).collect();
    round_trip(&devs);
}

#[test]
fn mixed_kinds_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let uring = file(&dir, "uring", Engine::Auto, true);
    let portable = file(&dir, "sync", Engine::Sync, false);
    let mem = MemoryDevice::new(4 * MIB).unwrap();
    let faulty = FaultDevice::new(std::sync::Arc::new(MemoryDevice::new(4 * MIB).unwrap()));
    round_trip(&[&uring, &mem, &portable, &faulty]);
}

#[test]
fn only_other_kinds_round_trip() {
    let a = MemoryDevice::new(4 * MIB).unwrap();
    let b = MemoryDevice::new(4 * MIB).unwrap();
    round_trip(&[&a, &b]);
}

#[test]
fn each_request_keeps_its_own_result() {
    let dir = tempfile::tempdir().unwrap();
    let f = file(&dir, "f", Engine::Auto, true);
    let faulty = FaultDevice::new(std::sync::Arc::new(MemoryDevice::new(4 * MIB).unwrap()));
    faulty.add_rule(FaultRule::fail(OpKind::Write));
    let data = AlignedBuf::new(4096);
    let mut fr = [
        Request::write(0, &data[..]),
        Request::write(4 * MIB, &data[..]), // past the end: refused by the check
        Request::write(100, &data[..]),     // unaligned: refused by the check
    ];
    let mut xr = [Request::write(0, &data[..])];
    let mut results = BTreeMap::new();
    submit_group(
        &mut [
            (&f as &dyn BlockDevice, &mut fr[..]),
            (&faulty, &mut xr[..]),
        ],
        |j, i, r| {
            results.insert((j, i), r.result());
        },
    );
    assert_eq!(results.len(), 4);
    assert!(results[&(0, 0)].is_ok());
    assert!(matches!(results[&(0, 1)], Err(Error::OutOfRange { .. })));
    assert!(matches!(results[&(0, 2)], Err(Error::Unaligned { .. })));
    assert!(results[&(1, 0)].is_err());
}

#[test]
fn empty_jobs_and_empty_group() {
    let dir = tempfile::tempdir().unwrap();
    let f = file(&dir, "f", Engine::Auto, true);
    let mut none: [Request<'_>; 0] = [];
    let mut calls = 0;
    submit_group(&mut [(&f as &dyn BlockDevice, &mut none[..])], |_, _, _| {
        calls += 1
    });
    submit_group(&mut [], |_, _, _| calls += 1);
    assert_eq!(calls, 0);
}

#[test]
fn unaligned_buffers_bounce_on_the_shared_ring() {
    let dir = tempfile::tempdir().unwrap();
    let a = file(&dir, "a", Engine::Auto, true);
    let b = file(&dir, "b", Engine::Auto, true);
    // One byte into an aligned buffer: O_DIRECT needs a bounce.
    let mut raw = vec![0u8; 8192 + 1];
    raw[1..]
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = i as u8);
    let src = raw[1..].to_vec();
    let mut wa = [Request::write(0, &raw[1..])];
    let mut wb = [Request::write(8192, &raw[1..])];
    submit_group(
        &mut [(&a as &dyn BlockDevice, &mut wa[..]), (&b, &mut wb[..])],
        |_, _, r| r.result().unwrap(),
    );
    let mut back = vec![0u8; 8192 + 3];
    {
        let mut ra = [Request::read(0, &mut back[3..])];
        submit_group(&mut [(&a as &dyn BlockDevice, &mut ra[..])], |_, _, r| {
            r.result().unwrap()
        });
    }
    assert_eq!(&back[3..], &src[..]);
    b.read_at(8192, &mut back[3..]).unwrap();
    assert_eq!(&back[3..], &src[..]);
}

/// One device in two jobs of a group (its resize lock taken once), with a resize waiting on
/// another thread the whole time: both batches run, and the resize goes through after.
#[test]
fn one_device_twice_in_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let f = std::sync::Arc::new(file(&dir, "f", Engine::Auto, true));
    let a = pattern(1, 64 << 10);
    let b = pattern(2, 64 << 10);
    for _ in 0..20 {
        let resizer = {
            let f = f.clone();
            std::thread::spawn(move || f.resize(4 * MIB).unwrap())
        };
        let mut ja = [Request::write(0, &a[..])];
        let mut jb = [Request::write(1 << 20, &b[..])];
        submit_group(
            &mut [(&*f as &dyn BlockDevice, &mut ja[..]), (&*f, &mut jb[..])],
            |_, _, r| r.result().unwrap(),
        );
        resizer.join().unwrap();
    }
    let mut back = AlignedBuf::new(64 << 10);
    f.read_at(1 << 20, &mut back).unwrap();
    assert!(back[..] == b[..]);
    f.read_at(0, &mut back).unwrap();
    assert!(back[..] == a[..]);
}

/// A panic in `on_done` while other requests are in flight on the ring comes out of
/// `submit_group` only after they have completed (their buffers stay valid), and the device
/// and the shared rings work afterwards.
#[test]
fn a_panic_in_on_done_waits_for_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let a = file(&dir, "a", Engine::Auto, true);
    let b = file(&dir, "b", Engine::Auto, true);
    let data = pattern(3, 1 << 20);
    a.write_at(0, &data[..]).unwrap();
    b.write_at(0, &data[..]).unwrap();
    let mut calls = 0;
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut ba: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::new(64 << 10)).collect();
        let mut bb: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::new(64 << 10)).collect();
        let mut ra: Vec<Request<'_>> = ba
            .iter_mut()
            .enumerate()
            .map(|(i, x)| Request::read(i as u64 * (64 << 10), &mut x[..]))
            .collect();
        let mut rb: Vec<Request<'_>> = bb
            .iter_mut()
            .enumerate()
            .map(|(i, x)| Request::read(i as u64 * (64 << 10), &mut x[..]))
            .collect();
        submit_group(
            &mut [(&a as &dyn BlockDevice, &mut ra[..]), (&b, &mut rb[..])],
            |_, _, r| {
                calls += 1;
                assert!(r.is_complete());
                panic!("on_done fails");
            },
        );
    }));
    assert!(caught.is_err(), "the panic comes out");
    assert_eq!(calls, 1, "no call after the panic");
    // The files and the shared rings still work.
    round_trip(&[&a, &b]);
}
