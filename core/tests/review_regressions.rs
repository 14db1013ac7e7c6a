//! Regressions for defects found in review: each test failed (or hung) before its fix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vstor_core::{BlockDevice, Error, FaultDevice, FileDevice, FileOptions, MemoryDevice, Request};

/// A listener of a FaultDevice's medium may do I/O on the FaultDevice while it resizes.
#[test]
fn fault_resize_listener_may_do_io() {
    let medium: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
    let fault = Arc::new(FaultDevice::new(medium.clone()));
    let f2 = fault.clone();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    medium.capacity_signal().unwrap().subscribe(move |_| {
        let _ = f2.stats();
        let mut b = [0u8; 512];
        f2.read_at(0, &mut b).unwrap();
        d2.store(true, Ordering::SeqCst);
    });
    let t = std::thread::spawn(move || fault.resize(2 << 20).unwrap());
    for _ in 0..200 {
        if done.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        done.load(Ordering::SeqCst),
        "resize deadlocked with a listener doing I/O"
    );
    t.join().unwrap();
}

/// A write racing a shrink never lands past the new end: after growing back, the region past
/// the old end reads zeroes. (A long batch checked against the old capacity must not keep
/// writing after the shrink.)
#[test]
fn memory_shrink_races_writes_safely() {
    for _ in 0..20 {
        let dev = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let d2 = dev.clone();
        let started = Arc::new(AtomicBool::new(false));
        let s2 = started.clone();
        let writer = std::thread::spawn(move || {
            let data = vec![0xee; 4096];
            let mut batch: Vec<Request<'_>> = (0..20000)
                .map(|i| Request::write((1 << 20) - 4096 * (1 + i % 64), &data))
                .collect();
            s2.store(true, Ordering::SeqCst);
            d2.submit(&mut batch);
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        dev.resize(512 << 10).unwrap();
        writer.join().unwrap();
        dev.resize(1 << 20).unwrap();
        let mut b = vec![1u8; 512 << 10];
        dev.read_at(512 << 10, &mut b).unwrap();
        assert!(
            b.iter().all(|&x| x == 0),
            "data past the shrunk end came back"
        );
    }
}

/// A request resubmitted without taking its result runs again on a file device.
#[test]
fn file_device_reruns_a_resubmitted_request() {
    let dir = tempfile::tempdir().unwrap();
    let dev =
        FileDevice::create(dir.path().join("r.raw"), 1 << 20, &FileOptions::default()).unwrap();
    let mut buf = vec![0u8; 512];
    {
        let mut batch = [Request::read(0, &mut buf)];
        dev.submit_all(&mut batch).unwrap();
        dev.write_at(0, &[9u8; 512]).unwrap();
        dev.submit_all(&mut batch).unwrap();
    }
    assert_eq!(buf, vec![9u8; 512]);
}

/// A FIFO is refused at once instead of blocking the open.
#[test]
fn fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(ok.success());
    let (tx, rx) = std::sync::mpsc::channel();
    let f2 = fifo.clone();
    std::thread::spawn(move || {
        let r = FileDevice::open(
            &f2,
            &FileOptions {
                read_only: true,
                ..Default::default()
            },
        );
        tx.send(r.map(|_| ())).unwrap();
    });
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("opening a FIFO blocked");
    assert!(matches!(r, Err(Error::InvalidArgument(m)) if m.contains("neither a regular file")));
}
