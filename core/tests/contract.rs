//! The contract around the I/O paths: request checks, capacity changes and their signal, opening
//! files, engine names and read-only devices.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use vstor_core::{
    BlockDevice, CapacitySignal, DeviceInfo, Engine, Error, FileDevice, FileOptions, MemoryDevice,
    OpKind, Request, Supports,
};

fn info(capacity: u64, sector: u32) -> DeviceInfo {
    DeviceInfo {
        capacity,
        logical_sector_size: sector,
        physical_sector_size: sector,
        mem_alignment: 1,
        read_only: false,
        discard_zeroes: true,
        supports: Supports {
            flush: true,
            discard: true,
            write_zeroes: true,
            resize: false,
        },
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

// ---- DeviceInfo::check ----

#[test]
fn check_read_only_refuses_write_types() {
    let i = DeviceInfo {
        read_only: true,
        ..info(1 << 20, 512)
    };
    let data = [0u8; 512];
    let mut buf = [0u8; 512];
    assert!(matches!(
        i.check(&Request::write(0, &data)),
        Err(Error::ReadOnly { op: OpKind::Write })
    ));
    assert!(matches!(
        i.check(&Request::discard(0, 512)),
        Err(Error::ReadOnly {
            op: OpKind::Discard
        })
    ));
    assert!(matches!(
        i.check(&Request::write_zeroes(0, 512)),
        Err(Error::ReadOnly {
            op: OpKind::WriteZeroes
        })
    ));
    i.check(&Request::read(0, &mut buf)).unwrap();
    i.check(&Request::flush()).unwrap();
}

#[test]
fn check_unsupported_ops() {
    let mut i = info(1 << 20, 512);
    i.supports.discard = false;
    assert!(matches!(
        i.check(&Request::discard(0, 512)),
        Err(Error::Unsupported {
            op: OpKind::Discard
        })
    ));
    i.check(&Request::write_zeroes(0, 512)).unwrap();
    i.supports.discard = true;
    i.supports.write_zeroes = false;
    assert!(matches!(
        i.check(&Request::write_zeroes(0, 512)),
        Err(Error::Unsupported {
            op: OpKind::WriteZeroes
        })
    ));
    i.check(&Request::discard(0, 512)).unwrap();
    i.check(&Request::write(0, &[0; 512])).unwrap();
}

#[test]
fn check_unaligned() {
    let i = info(1 << 20, 512);
    let data = vec![0u8; 1024];
    let e = i.check(&Request::write(100, &data[..512])).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Unaligned {
                op: OpKind::Write,
                offset: 100,
                len: 512,
                alignment: 512
            }
        ),
        "{e:?}"
    );
    let mut buf = vec![0u8; 700];
    let e = i.check(&Request::read(512, &mut buf)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Unaligned {
                op: OpKind::Read,
                offset: 512,
                len: 700,
                alignment: 512
            }
        ),
        "{e:?}"
    );
    // The message names the request and the alignment.
    let msg = e.to_string();
    assert!(
        msg.contains("512") && msg.contains("700") && msg.contains("read"),
        "{msg}"
    );
    assert!(matches!(
        i.check(&Request::discard(0, 100)),
        Err(Error::Unaligned {
            op: OpKind::Discard,
            ..
        })
    ));
    // A 4096-byte device refuses 512-byte alignment.
    let i4 = info(1 << 20, 4096);
    assert!(matches!(
        i4.check(&Request::write_zeroes(512, 4096)),
        Err(Error::Unaligned {
            op: OpKind::WriteZeroes,
            offset: 512,
            len: 4096,
            alignment: 4096
        })
    ));
    assert!(matches!(
        i4.check(&Request::write(0, &data)),
        Err(Error::Unaligned { len: 1024, .. })
    ));
    i4.check(&Request::write_zeroes(4096, 8192)).unwrap();
}

#[test]
fn check_out_of_range() {
    let cap = 1 << 20;
    let i = info(cap, 512);
    let data = vec![0u8; 1024];
    // Ending exactly at the capacity is fine.
    i.check(&Request::write(cap - 1024, &data)).unwrap();
    i.check(&Request::discard(0, cap)).unwrap();
    let e = i.check(&Request::write(cap - 512, &data)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::OutOfRange {
                op: OpKind::Write,
                offset,
                len: 1024,
                capacity
            } if offset == cap - 512 && capacity == cap
        ),
        "{e:?}"
    );
    assert!(matches!(
        i.check(&Request::discard(cap, 512)),
        Err(Error::OutOfRange {
            op: OpKind::Discard,
            ..
        })
    ));
    // offset + len overflows u64: refused, not wrapped around, not a panic.
    let top = u64::MAX / 512 * 512; // 2^64 - 512
    let mut buf = vec![0u8; 1024];
    assert!(matches!(
        i.check(&Request::read(top, &mut buf)),
        Err(Error::OutOfRange {
            op: OpKind::Read,
            offset,
            len: 1024,
            ..
        }) if offset == top
    ));
    assert!(matches!(
        i.check(&Request::write_zeroes(top, 512)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        i.check(&Request::discard(512, top)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        i.check(&Request::write_zeroes(top, top)),
        Err(Error::OutOfRange { .. })
    ));
    // And the devices say the same, without panicking.
    let mem = MemoryDevice::new(cap).unwrap();
    assert!(matches!(
        mem.read_at(top, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        mem.discard(512, top),
        Err(Error::OutOfRange { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let file = FileDevice::create(dir.path().join("d.raw"), cap, &FileOptions::default()).unwrap();
    assert!(matches!(
        file.read_at(top, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        file.write_zeroes(top, top),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn check_refuses_empty_vectors() {
    let i = info(1 << 20, 512);
    assert!(matches!(
        i.check(&Request::readv(0, std::iter::empty())),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        i.check(&Request::writev(0, std::iter::empty())),
        Err(Error::InvalidArgument(_))
    ));
}

// ---- Capacity changes ----

#[test]
fn capacity_signal_listeners_and_waiters() {
    let sig = Arc::new(CapacitySignal::new(4096));
    assert_eq!(sig.current(), (4096, 0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let id = sig.subscribe(move |c| s2.lock().unwrap().push(c));
    // A wait with no change times out and reports the unchanged state.
    let t = Instant::now();
    assert_eq!(sig.wait_for_change(0, Duration::from_millis(20)), (4096, 0));
    assert!(t.elapsed() >= Duration::from_millis(20));
    sig.publish(8192);
    assert_eq!(*seen.lock().unwrap(), [8192]);
    assert_eq!(sig.current(), (8192, 1));
    sig.unsubscribe(id);
    sig.publish(512);
    assert_eq!(
        *seen.lock().unwrap(),
        [8192],
        "an unsubscribed listener is not called"
    );
    // A change already past the generation returns at once.
    assert_eq!(sig.wait_for_change(1, Duration::from_secs(10)), (512, 2));
}

/// Resizes `dev` to `new` and checks that a subscribed listener and a thread waiting in
/// `wait_for_change` both learn the new capacity.
fn resize_publishes(dev: &dyn BlockDevice, new: u64) {
    let sig = dev
        .capacity_signal()
        .expect("a resizable device has a signal");
    assert!(dev.info().supports.resize);
    let (cap0, gen0) = sig.current();
    assert_eq!(cap0, dev.capacity());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let id = sig.subscribe(move |c| s2.lock().unwrap().push(c));
    let waiter = {
        let sig = sig.clone();
        thread::spawn(move || sig.wait_for_change(gen0, Duration::from_secs(30)))
    };
    // Give the waiter a moment to block (the test passes either way, but this exercises the wake).
    thread::sleep(Duration::from_millis(20));
    dev.resize(new).unwrap();
    assert_eq!(waiter.join().unwrap(), (new, gen0 + 1), "the waiter woke");
    assert_eq!(*seen.lock().unwrap(), [new], "the listener was told");
    assert_eq!(dev.capacity(), new);
    assert_eq!(dev.info().capacity, new);
    sig.unsubscribe(id);
}

#[test]
fn memory_resize_publishes_capacity() {
    let dev = MemoryDevice::new(1 << 20).unwrap();
    resize_publishes(&dev, 2 << 20);
    resize_publishes(&dev, 512 * 1000);
    assert!(matches!(dev.resize(1000), Err(Error::InvalidArgument(_))));
    assert_eq!(
        dev.capacity(),
        512 * 1000,
        "a refused resize changes nothing"
    );
}

#[test]
fn file_resize_publishes_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    for engine in [Engine::IoUring, Engine::Sync] {
        let opts = FileOptions {
            engine,
            ..FileOptions::default()
        };
        let dev = FileDevice::create(&path, 1 << 20, &opts).unwrap();
        resize_publishes(&dev, 3 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 20);
        resize_publishes(&dev, 1 << 19);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 19);
    }
}

#[test]
fn grown_file_reads_zeroes_in_the_new_region() {
    let dir = tempfile::tempdir().unwrap();
    for (engine, direct) in [
        (Engine::IoUring, false),
        (Engine::IoUring, true),
        (Engine::Sync, false),
        (Engine::Sync, true),
    ] {
        let opts = FileOptions {
            engine,
            direct,
            ..FileOptions::default()
        };
        let path = dir.path().join(format!("{engine}-{direct}.raw"));
        let old: u64 = 1 << 20;
        let dev = FileDevice::create(&path, old, &opts).unwrap();
        assert_eq!(dev.is_direct(), direct);
        let data = pattern(1, old as usize);
        dev.write_at(0, &data).unwrap();
        let mut past = vec![0u8; 4096];
        assert!(matches!(
            dev.read_at(old, &mut past),
            Err(Error::OutOfRange { .. })
        ));
        dev.resize(3 * old).unwrap();
        let mut grown = vec![0xffu8; 2 * old as usize];
        dev.read_at(old, &mut grown).unwrap();
        assert!(
            grown.iter().all(|&b| b == 0),
            "{engine} direct={direct}: the new region reads as zeroes"
        );
        let mut back = vec![0u8; old as usize];
        dev.read_at(0, &mut back).unwrap();
        assert!(back == data, "the old region is intact");
        // And the new region takes writes.
        dev.write_at(2 * old, &data[..4096]).unwrap();
        dev.read_at(2 * old, &mut past).unwrap();
        assert_eq!(past, data[..4096]);
    }
}

#[test]
fn memory_shrink_then_grow_reads_zeroes_past_the_old_end() {
    const SEG: u64 = 64 * 1024;
    // New ends inside a segment, on a segment boundary, and inside the first segment.
    for new_end in [SEG + 3 * 512, 2 * SEG, 512] {
        let cap = 4 * SEG;
        let dev = MemoryDevice::new(cap).unwrap();
        let data = pattern(7, cap as usize);
        dev.write_at(0, &data).unwrap();
        dev.resize(new_end).unwrap();
        let mut b = vec![0u8; 512];
        assert!(matches!(
            dev.read_at(new_end, &mut b),
            Err(Error::OutOfRange { .. })
        ));
        dev.resize(cap).unwrap();
        let mut all = vec![0xffu8; cap as usize];
        dev.read_at(0, &mut all).unwrap();
        assert!(
            all[..new_end as usize] == data[..new_end as usize],
            "data before the shrunk end is intact (end {new_end})"
        );
        assert!(
            all[new_end as usize..].iter().all(|&x| x == 0),
            "past the shrunk end reads zeroes after growing (end {new_end})"
        );
    }
}

// ---- Opening files ----

#[test]
fn open_missing_path_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-disk.raw");
    for engine in [Engine::Auto, Engine::IoUring, Engine::Sync] {
        let opts = FileOptions {
            engine,
            ..FileOptions::default()
        };
        let e = FileDevice::open(&path, &opts).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert_eq!(e.raw_os_error(), Some(libc_enoent()));
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()),
            "the message names the path: {msg}"
        );
    }
}

fn libc_enoent() -> i32 {
    std::io::Error::from(std::io::ErrorKind::NotFound)
        .raw_os_error()
        .unwrap_or(2)
}

#[test]
fn open_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for read_only in [false, true] {
        let opts = FileOptions {
            read_only,
            ..FileOptions::default()
        };
        let e = FileDevice::open(dir.path(), &opts).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string()),
            "read_only={read_only}: the message names the path: {msg}"
        );
    }
}

#[test]
fn capacity_rounds_down_to_whole_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.raw");
    for (size, want) in [(1000 * 512 + 100, 1000 * 512), (511, 0), (4096, 4096)] {
        std::fs::write(&path, vec![0x5au8; size as usize]).unwrap();
        for engine in [Engine::IoUring, Engine::Sync] {
            let opts = FileOptions {
                engine,
                ..FileOptions::default()
            };
            let dev = FileDevice::open(&path, &opts).unwrap();
            assert_eq!(dev.info().logical_sector_size, 512);
            assert_eq!(dev.capacity(), want, "file of {size} bytes");
            assert_eq!(dev.info().capacity, want);
            if want > 0 {
                let mut b = vec![0u8; 512];
                dev.read_at(want - 512, &mut b).unwrap();
                assert!(b.iter().all(|&x| x == 0x5a));
                assert!(matches!(
                    dev.read_at(want, &mut b),
                    Err(Error::OutOfRange { .. })
                ));
            }
        }
    }
}

#[test]
fn engine_names_parse() {
    assert_eq!("io_uring".parse::<Engine>().unwrap(), Engine::IoUring);
    assert_eq!("sync".parse::<Engine>().unwrap(), Engine::Sync);
    assert_eq!("auto".parse::<Engine>().unwrap(), Engine::Auto);
    for e in [Engine::Auto, Engine::IoUring, Engine::Sync] {
        assert_eq!(e.to_string().parse::<Engine>().unwrap(), e, "round trip");
    }
    for junk in [
        "",
        "fast",
        "io_uring2",
        " sync",
        "sync ",
        "aio",
        "auto,direct",
    ] {
        let e = junk.parse::<Engine>().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{junk:?}: {e:?}");
        assert!(e.to_string().contains(junk), "{junk:?}: {e}");
    }
    // Auto picks a real engine.
    let dir = tempfile::tempdir().unwrap();
    let dev = FileDevice::create(dir.path().join("a.raw"), 4096, &FileOptions::default()).unwrap();
    assert_ne!(dev.engine(), Engine::Auto);
}

// ---- Read-only devices ----

fn refuses_writes(dev: &dyn BlockDevice) {
    let info = dev.info();
    assert!(info.read_only);
    assert!(!info.supports.resize);
    let data = vec![0u8; 4096];
    assert!(matches!(
        dev.write_at(0, &data),
        Err(Error::ReadOnly { op: OpKind::Write })
    ));
    assert!(matches!(
        dev.discard(0, 4096),
        Err(Error::ReadOnly {
            op: OpKind::Discard
        })
    ));
    assert!(matches!(
        dev.write_zeroes(0, 4096),
        Err(Error::ReadOnly {
            op: OpKind::WriteZeroes
        })
    ));
    let mut b = vec![0u8; 4096];
    let mut batch = [
        Request::read(0, &mut b),
        Request::write(4096, &data),
        Request::flush(),
    ];
    dev.submit(&mut batch);
    assert!(batch[0].result().is_ok());
    assert!(matches!(
        batch[1].result(),
        Err(Error::ReadOnly { op: OpKind::Write })
    ));
    assert!(dev.resize(1 << 21).is_err());
}

#[test]
fn read_only_file_refuses_writes_and_stays_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.raw");
    let content = pattern(3, 1 << 20);
    std::fs::write(&path, &content).unwrap();
    for engine in [Engine::IoUring, Engine::Sync] {
        let opts = FileOptions {
            read_only: true,
            engine,
            ..FileOptions::default()
        };
        let dev = FileDevice::open(&path, &opts).unwrap();
        refuses_writes(&dev);
        let mut back = vec![0u8; content.len()];
        dev.read_at(0, &mut back).unwrap();
        assert!(back == content, "reads work");
        drop(dev);
        assert!(
            std::fs::read(&path).unwrap() == content,
            "{engine}: the file is unchanged"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    }
}

#[test]
fn read_only_memory_device_refuses_writes() {
    let dev = MemoryDevice::new(1 << 20).unwrap().into_read_only();
    refuses_writes(&dev);
    let mut b = vec![0xffu8; 4096];
    dev.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert_eq!(dev.allocated_bytes(), 0);
}

#[test]
fn files_of_other_kinds_are_refused() {
    // Not a regular file nor a block device: a character device.
    let null = Path::new("/dev/null");
    if null.exists() {
        let e = FileDevice::open(null, &FileOptions::default()).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains("/dev/null"));
    }
}
