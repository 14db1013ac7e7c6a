//! Many threads on one device: the io_uring pool gives each concurrently submitting thread its
//! own ring, and no request is lost or misdirected.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vstor_core::{AlignedBuf, BlockDevice, Engine, FileDevice, FileOptions, MemoryDevice, Request};

fn hammer(dev: Arc<dyn BlockDevice>, threads: u64, rounds: u64) {
    let region = dev.capacity() / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let base = t * region;
                let blocks = region / 4096;
                for round in 0..rounds {
                    let tag = |i: u64| (t * 31 + round * 7 + i) as u8;
                    let bufs: Vec<AlignedBuf> = (0..blocks)
                        .map(|i| {
                            let mut b = AlignedBuf::new(4096);
                            b.fill(tag(i));
                            b
                        })
                        .collect();
                    let mut batch: Vec<Request<'_>> = bufs
                        .iter()
                        .enumerate()
                        .map(|(i, b)| Request::write(base + i as u64 * 4096, b))
                        .collect();
                    dev.submit_all(&mut batch).unwrap();
                    let mut back: Vec<AlignedBuf> =
                        (0..blocks).map(|_| AlignedBuf::new(4096)).collect();
                    let mut batch: Vec<Request<'_>> = back
                        .iter_mut()
                        .enumerate()
                        .map(|(i, b)| Request::read(base + i as u64 * 4096, b))
                        .collect();
                    dev.submit_all(&mut batch).unwrap();
                    drop(batch);
                    for (i, b) in back.iter().enumerate() {
                        assert!(
                            b.iter().all(|&x| x == tag(i as u64)),
                            "thread {t} round {round} block {i}"
                        );
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn threads_share_an_io_uring_file_device() {
    let dir = tempfile::tempdir().unwrap();
    for direct in [false, true] {
        let dev = FileDevice::create(
            dir.path().join(format!("c{direct}.raw")),
            4 << 20,
            &FileOptions {
                engine: Engine::IoUring,
                direct,
                ..Default::default()
            },
        )
        .unwrap();
        hammer(Arc::new(dev), 4, 20);
    }
}

#[test]
fn threads_share_a_memory_device() {
    hammer(Arc::new(MemoryDevice::new(4 << 20).unwrap()), 4, 20);
}

#[test]
fn file_resize_listener_may_do_io() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(
        FileDevice::create(dir.path().join("r.raw"), 1 << 20, &FileOptions::default()).unwrap(),
    );
    let d2 = dev.clone();
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    dev.capacity_signal().unwrap().subscribe(move |cap| {
        // The device must not hold its resize lock while listeners run.
        d2.write_at(cap - 512, &[1u8; 512]).unwrap();
        s2.store(cap, Ordering::SeqCst);
    });
    dev.resize(2 << 20).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 2 << 20);
    let mut b = [0u8; 512];
    dev.read_at((2 << 20) - 512, &mut b).unwrap();
    assert_eq!(b, [1u8; 512]);
}
