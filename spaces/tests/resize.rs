//! Growing a space, online (Resize-VirtualDisk): open handles see the new size and its
//! capacity signal at once, the data stays, the new bytes read as zeroes and take writes
//! (thin: slabs on first write; fixed: slabs now), and the size survives a reopen. A smaller
//! size, a size that is not a multiple of 4 KiB, a fixed space the pool has no room for and a
//! read-only pool are refused with nothing changed.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::BlockDevice;
use vstor_spaces::{Provisioning, Resiliency, SpacesError};

fn data_columns(res: Resiliency, cols: usize) -> u64 {
    match res {
        Resiliency::Parity { redundancy } => (cols - usize::from(redundancy)) as u64,
        _ => cols as u64,
    }
}

fn used(pool: &vstor_spaces::Pool) -> u64 {
    pool.info().members.iter().map(|m| m.slabs_used).sum()
}

#[test]
fn a_space_grows_online_with_its_data_kept_and_zeroes_after_it() {
    for fixed in [false, true] {
        for (label, res, cols, disks) in layouts() {
            let eb = SLAB * data_columns(res, cols);
            // Not a whole number of extents: the last one is partly past the end.
            let old = eb + 3 * 4096;
            let new = 3 * eb + 8192;
            let devs = mem_disks(disks, 16 << 20);
            let pool = create(&devs);
            // Every slab held another space's data before: what grows onto them reads zeroes.
            pool.create_space(&spec("junk", 64 * eb, res, Some(cols)))
                .unwrap();
            let junk = pool.open_space("junk").unwrap();
            let mut filled = 0;
            while junk.write_at(filled * eb, &vec![0x5a; eb as usize]).is_ok() {
                filled += 1;
            }
            assert!(filled >= 4, "{label}: the pool took {filled} extents");
            drop(junk);
            pool.delete_space("junk").unwrap();
            let mut s = spec("s", old, res, Some(cols));
            if fixed {
                s.provisioning = Provisioning::Fixed;
            }
            pool.create_space(&s).unwrap();
            let space = pool.open_space("s").unwrap();
            let other = pool.open_space("s").unwrap();
            let signal = other.capacity_signal().expect("a space announces its size");
            let data = pattern(1, old as usize);
            space.write_at(0, &data).unwrap();
            let before = used(&pool);
            // Through the BlockDevice interface, as the VMM's resize does.
            assert!(space.info().supports.resize, "{label}");
            space.resize(new).unwrap();
            assert_eq!(space.capacity(), new, "{label}");
            assert_eq!(other.capacity(), new, "{label}: another handle");
            assert_eq!(signal.current().0, new, "{label}: the signal");
            assert_eq!(pool.space_info("s").unwrap().size, new, "{label}");
            let w = used(&pool) - before;
            if fixed {
                assert!(w > 0, "{label}: a fixed space takes its new slabs now");
            } else {
                assert_eq!(w, 0, "{label}: a thin space takes none until written");
            }
            let mut model = data.clone();
            model.resize(new as usize, 0);
            assert!(contents(&space) == model, "{label}: after growing");
            // A write across the old end and one at the new end.
            let a = pattern(2, 16384);
            space.write_at(old - 8192, &a).unwrap();
            model[(old - 8192) as usize..(old + 8192) as usize].copy_from_slice(&a);
            let b = pattern(3, 8192);
            space.write_at(new - 8192, &b).unwrap();
            model[(new - 8192) as usize..].copy_from_slice(&b);
            assert!(contents(&other) == model, "{label}: after writes");
            // Past the new end is still refused.
            assert!(space.write_at(new, &[0u8; 512]).is_err(), "{label}");
            drop((space, other));
            drop(pool);
            let pool = open(&devs, &[], false);
            let space = pool.open_space("s").unwrap();
            assert_eq!(space.capacity(), new, "{label}: after a reopen");
            assert!(contents(&space) == model, "{label}: after a reopen");
            let r = pool.scrub(None, &mut |_, _| {}).unwrap();
            assert_eq!((r.checksum_errors, r.repaired), (0, 0), "{label}: {r:?}");
            // With a member lost, within the resiliency, the grown part reads right too.
            if res.tolerates() > 0 {
                drop(space);
                drop(pool);
                let pool = open(&devs, &[0], true);
                let space = pool.open_space("s").unwrap();
                assert!(contents(&space) == model, "{label}: member 0 lost");
            }
        }
    }
}

fn spaces_error(e: &vstor_core::Error) -> Option<&SpacesError> {
    match e {
        vstor_core::Error::Layer(l) => l.downcast_ref::<SpacesError>(),
        _ => None,
    }
}

#[test]
fn a_resize_that_cannot_be_done_changes_nothing() {
    let devs = mem_disks(3, 16 << 20);
    let pool = create(&devs);
    let mut s = spec("f", 4 << 20, Resiliency::Mirror { copies: 2 }, Some(1));
    s.provisioning = Provisioning::Fixed;
    pool.create_space(&s).unwrap();
    let space = pool.open_space("f").unwrap();
    let data = pattern(9, 4 << 20);
    space.write_at(0, &data).unwrap();
    let seq = pool.info().sequence;
    let slabs = used(&pool);
    // Smaller: refused, saying why.
    let e = space.resize(2 << 20).unwrap_err();
    assert!(e.to_string().contains("never shrinks"), "{e}");
    // Not a multiple of 4 KiB.
    let e = pool.resize_space("f", (8 << 20) + 512).unwrap_err();
    assert!(e.to_string().contains("multiple of 4096"), "{e}");
    // More than the pool holds (a fixed space takes its slabs now).
    let e = pool.resize_space("f", 64 << 20).unwrap_err();
    assert!(
        matches!(spaces_error(&e), Some(SpacesError::PoolFull(_))),
        "{e}"
    );
    // Far more than the metadata can describe: refused before anything that size exists.
    let e = pool.resize_space("f", !4095u64).unwrap_err();
    assert!(
        matches!(spaces_error(&e), Some(SpacesError::PoolFull(_))),
        "{e}"
    );
    let e = pool
        .create_space(&spec("huge", !4095u64, Resiliency::Simple, Some(1)))
        .unwrap_err();
    assert!(
        matches!(spaces_error(&e), Some(SpacesError::PoolFull(_))),
        "{e}"
    );
    // No such space.
    let e = pool.resize_space("nope", 8 << 20).unwrap_err();
    assert!(
        matches!(spaces_error(&e), Some(SpacesError::NoSuchSpace(_))),
        "{e}"
    );
    assert_eq!(pool.info().sequence, seq, "no metadata update");
    assert_eq!(used(&pool), slabs);
    assert_eq!(space.capacity(), 4 << 20);
    assert!(contents(&space) == data);
    // The same size is no change.
    pool.resize_space("f", 4 << 20).unwrap();
    assert_eq!(pool.info().sequence, seq);
    drop(space);
    drop(pool);
    // A read-only pool refuses, and its spaces say they cannot be resized.
    let pool = open(&devs, &[], true);
    let space = pool.open_space("f").unwrap();
    assert!(!space.info().supports.resize);
    let e = space.resize(8 << 20).unwrap_err();
    assert!(
        matches!(spaces_error(&e), Some(SpacesError::ReadOnly)),
        "{e}"
    );
}

#[test]
fn a_space_grows_while_it_is_written() {
    // A writer keeps writing the first extent while the space grows step by step; every
    // write lands, and the grown space reads back the writer's last data and zeroes after.
    let devs = mem_disks(5, 32 << 20);
    let pool = Arc::new(create(&devs));
    let res = Resiliency::Parity { redundancy: 1 };
    pool.create_space(&spec("p", 1 << 20, res, Some(4)))
        .unwrap();
    let space = pool.open_space("p").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let space = space.clone();
        let (stop, count) = (stop.clone(), count.clone());
        std::thread::spawn(move || {
            let mut last = 0u64;
            while last < 4 || !stop.load(std::sync::atomic::Ordering::Acquire) {
                last += 1;
                space.write_at(0, &pattern(last, 64 << 10)).unwrap();
                count.store(last, std::sync::atomic::Ordering::Release);
            }
            last
        })
    };
    for step in 1..=8u64 {
        // Each step waits for a write of the writer's to complete since the last one.
        let seen = count.load(std::sync::atomic::Ordering::Acquire);
        while count.load(std::sync::atomic::Ordering::Acquire) == seen && !writer.is_finished() {
            std::thread::yield_now();
        }
        pool.resize_space("p", (1 << 20) + step * (3 << 20))
            .unwrap();
        assert_eq!(space.capacity(), (1 << 20) + step * (3 << 20));
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let last = writer.join().unwrap();
    assert!(last >= 8, "the writer wrote {last} times");
    let all = contents(&space);
    assert!(all[..64 << 10] == pattern(last, 64 << 10)[..]);
    assert!(all[64 << 10..].iter().all(|&b| b == 0));
}
