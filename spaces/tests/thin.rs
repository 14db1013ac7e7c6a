//! Thin provisioning gives space back: a discard that covers extents of a thin space whole
//! returns their slabs to the pool (recorded in the metadata; they read as zeroes; a later
//! write allocates afresh), while the parts of extents it covers are zeroed. A fixed space
//! keeps its slabs. A parity journal replay never brings a discarded row back, and a rebuild
//! running beside discards leaves every copy right.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::{BlockDevice, Request};
use vstor_spaces::{Pool, PoolDisk, Provisioning, Resiliency, SpacesError};

fn used(pool: &Pool) -> u64 {
    pool.info().members.iter().map(|m| m.slabs_used).sum()
}

fn read_all(space: &dyn BlockDevice) -> Vec<u8> {
    contents(space)
}

/// Bytes of one extent of a space of `cols` columns with resiliency `res` (test slabs).
fn extent_bytes(res: Resiliency, cols: usize) -> u64 {
    let data_cols = match res {
        Resiliency::Parity { redundancy } => cols - usize::from(redundancy),
        _ => cols,
    };
    SLAB * data_cols as u64
}

fn width(res: Resiliency, cols: usize) -> u64 {
    match res {
        Resiliency::Mirror { copies } => (cols * usize::from(copies)) as u64,
        _ => cols as u64,
    }
}

#[test]
fn a_discard_gives_whole_thin_extents_back_and_zeroes_the_rest() {
    for (label, res, cols, disks) in layouts() {
        let eb = extent_bytes(res, cols);
        let w = width(res, cols);
        let devs = mem_disks(disks, 24 << 20);
        let pool = create(&devs);
        pool.create_space(&spec("t", 4 * eb, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("t").unwrap();
        let mut model = pattern(7, (4 * eb) as usize);
        space.write_at(0, &model).unwrap();
        space.flush().unwrap();
        assert_eq!(used(&pool), 4 * w, "{label}");
        // Extent 1 whole and the first half of extent 2.
        space.discard(eb, eb + eb / 2).unwrap();
        model[eb as usize..(2 * eb + eb / 2) as usize].fill(0);
        assert_eq!(used(&pool), 3 * w, "{label}: extent 1's slabs are free");
        assert_eq!(
            pool.space_info("t").unwrap().allocated_extents,
            3,
            "{label}"
        );
        assert!(
            read_all(&space) == model,
            "{label}: reads after the discard"
        );
        // The release is in the metadata: a reopen sees it.
        drop(space);
        drop(pool);
        let pool = open(&devs, &[], false);
        assert_eq!(used(&pool), 3 * w, "{label}: after a reopen");
        let space = pool.open_space("t").unwrap();
        assert!(read_all(&space) == model, "{label}: reads after a reopen");
        // A write allocates the extent again: zeroes around what it wrote.
        let d = pattern(8, 8192);
        space.write_at(eb + 4096, &d).unwrap();
        model[(eb + 4096) as usize..(eb + 4096) as usize + d.len()].copy_from_slice(&d);
        assert_eq!(used(&pool), 4 * w, "{label}: allocated again");
        assert!(
            read_all(&space) == model,
            "{label}: reads after the new write"
        );
        // Every copy and parity agrees with the checksums.
        let r = pool.scrub(None, &mut |_, _| {}).unwrap();
        assert_eq!(
            (r.checksum_errors, r.repaired, r.lost),
            (0, 0, 0),
            "{label}: {r:?}"
        );
    }
}

#[test]
fn a_discard_of_a_fixed_space_keeps_its_slabs() {
    let devs = mem_disks(3, 16 << 20);
    let pool = create(&devs);
    let mut s = spec("f", 4 * SLAB, Resiliency::Mirror { copies: 2 }, Some(1));
    s.provisioning = Provisioning::Fixed;
    pool.create_space(&s).unwrap();
    let space = pool.open_space("f").unwrap();
    space.write_at(0, &pattern(1, (4 * SLAB) as usize)).unwrap();
    let before = used(&pool);
    space.discard(0, 4 * SLAB).unwrap();
    assert_eq!(used(&pool), before);
    assert!(read_all(&space).iter().all(|&b| b == 0));
}

#[test]
fn slabs_a_discard_gave_back_serve_another_space_and_read_as_zeroes() {
    // Two disks of 4 slabs each (after the metadata): a 2-way mirror of 4 slabs fills them.
    let devs = mem_disks(2, 10 << 20);
    let pool = create(&devs);
    let m = Resiliency::Mirror { copies: 2 };
    pool.create_space(&spec("a", 64 * SLAB, m, Some(1)))
        .unwrap();
    pool.create_space(&spec("b", 64 * SLAB, m, Some(1)))
        .unwrap();
    let a = pool.open_space("a").unwrap();
    let b = pool.open_space("b").unwrap();
    // Fill the pool through a.
    let mut n = 0u64;
    loop {
        match a.write_at(n * SLAB, &pattern(n, SLAB as usize)) {
            Ok(()) => n += 1,
            Err(e) => {
                assert!(
                    matches!(e, vstor_core::Error::Layer(ref l)
                        if matches!(l.downcast_ref::<SpacesError>(), Some(SpacesError::PoolFull(_)))),
                    "{e}"
                );
                break;
            }
        }
    }
    assert!(n >= 2, "the pool holds {n} extents");
    // b has no room until a gives its extents back.
    assert!(b.write_at(0, &[1u8; 4096]).is_err());
    a.discard(0, n * SLAB).unwrap();
    assert_eq!(used(&pool), 0);
    // b gets the same slabs: zeroes where it did not write, never a's old bytes.
    b.write_at(4096, &[1u8; 4096]).unwrap();
    let mut back = vec![0u8; SLAB as usize];
    b.read_at(0, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&x| x == 0));
    assert!(back[4096..8192].iter().all(|&x| x == 1));
    assert!(back[8192..].iter().all(|&x| x == 0));
    let mut back = vec![0u8; (n * SLAB) as usize];
    a.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0));
}

#[test]
fn a_journal_replay_never_brings_a_discarded_row_back() {
    // A partial-row write to a parity space is journaled; a discard then gives its extent
    // back, and a write elsewhere in the extent allocates it again. A power cut now (the
    // journal's generation never closed) and a writable open replays the journal: the row the
    // discard zeroed must still read as zeroes.
    let res = Resiliency::Parity { redundancy: 1 };
    let cols = 4;
    let eb = extent_bytes(res, cols);
    let devs = mem_disks(5, 16 << 20);
    let pool = create(&devs);
    pool.create_space(&spec("p", 2 * eb, res, Some(cols)))
        .unwrap();
    let space = pool.open_space("p").unwrap();
    space.write_at(0, &pattern(1, (2 * eb) as usize)).unwrap();
    // One block in the middle of a row of extent 1: journaled.
    let at = eb + INTERLEAVE + 4096;
    space.write_at(at, &pattern(2, 4096)).unwrap();
    assert!(pool.info().journal.batches >= 1);
    space.discard(eb, eb).unwrap();
    space.write_at(2 * eb - 4096, &pattern(3, 4096)).unwrap();
    space.flush().unwrap();
    // The power cut: the members as they are, the pool never closed.
    let media: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
    let again = from_media(&media, 16 << 20);
    drop(space);
    drop(pool);
    let pool = open(&again, &[], false);
    let space = pool.open_space("p").unwrap();
    let mut back = vec![0u8; 4096];
    space.read_at(at, &mut back).unwrap();
    assert!(
        back.iter().all(|&x| x == 0),
        "the replay put the discarded row back"
    );
    let mut tail = vec![0u8; 4096];
    space.read_at(2 * eb - 4096, &mut tail).unwrap();
    assert!(tail == pattern(3, 4096));
    // With a member missing too, every byte is what it should be.
    drop(space);
    drop(pool);
    for lost in 0..5 {
        let pool = open(&again, &[lost], true);
        let space = pool.open_space("p").unwrap();
        let mut all = read_all(&space);
        let mut want = pattern(1, (2 * eb) as usize);
        want[eb as usize..].fill(0);
        want[(2 * eb - 4096) as usize..].copy_from_slice(&pattern(3, 4096));
        assert!(all == want, "member {lost} missing");
        all.clear();
    }
}

#[test]
fn a_rebuild_beside_discards_and_writes_leaves_every_copy_right() {
    // A 2-way mirror (one column) over 3 disks loses one; a repair onto a new disk runs while
    // another thread discards whole extents and writes them again. Afterwards the other old
    // disk is lost too: every byte must come from the copies the rebuild made or wrote since.
    const EXTENTS: u64 = 64;
    for seed in 0..3u64 {
        let devs = mem_disks(4, (EXTENTS + 4) * SLAB);
        let pool = Arc::new(create(&devs[..3]));
        let m = Resiliency::Mirror { copies: 2 };
        pool.create_space(&spec("m", EXTENTS * SLAB, m, Some(1)))
            .unwrap();
        let space = pool.open_space("m").unwrap();
        let mut model = pattern(seed, (EXTENTS * SLAB) as usize);
        space.write_at(0, &model).unwrap();
        pool.fail_member(0).unwrap();
        pool.add_disk(PoolDisk::new("new", devs[3].clone()))
            .unwrap();
        let worker = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.repair(None, &mut |_, _| {}).unwrap())
        };
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut discards = 0;
        while !worker.is_finished() {
            let e = rng.u64(0..EXTENTS);
            if rng.bool() {
                discards += 1;
                space.discard(e * SLAB, SLAB).unwrap();
                model[(e * SLAB) as usize..((e + 1) * SLAB) as usize].fill(0);
            } else {
                let d = pattern(rng.u64(..), 64 << 10);
                let at = e * SLAB + rng.u64(0..SLAB / 4096 - 16) * 4096;
                let mut batch = [Request::write(at, &d)];
                space.submit_all(&mut batch).unwrap();
                model[at as usize..at as usize + d.len()].copy_from_slice(&d);
            }
        }
        worker.join().unwrap();
        assert!(
            discards > 0,
            "seed {seed}: the repair ended before any discard"
        );
        // Nothing is left on the lost disk (new extents never go there).
        let again = pool.repair(None, &mut |_, _| {}).unwrap();
        assert_eq!(again.extents, 0, "seed {seed}: {again:?}");
        assert!(
            read_all(&space) == model,
            "seed {seed}: with both old disks"
        );
        drop(space);
        assert_eq!(Arc::strong_count(&pool), 1, "the repair thread is done");
        drop(pool);
        // Disk 0 holds nothing now; with disk 1 or disk 2 lost as well, each extent has
        // one copy left, on the other old disk or on the disk the rebuild wrote.
        for lost in [1usize, 2] {
            let pool = open(&devs, &[0, lost], true);
            let space = pool.open_space("m").unwrap();
            assert!(
                read_all(&space) == model,
                "seed {seed}: disk {lost} lost after the repair"
            );
        }
    }
}

/// A member whose first flush after `arm` waits for the test: the rebuild flushes its new
/// slabs just before it switches them in.
struct HeldFlush {
    inner: Arc<dyn BlockDevice>,
    armed: std::sync::atomic::AtomicBool,
    meet: std::sync::Barrier,
}

impl BlockDevice for HeldFlush {
    fn info(&self) -> vstor_core::DeviceInfo {
        self.inner.info()
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let flush = batch.iter().any(|r| matches!(r.op, vstor_core::Op::Flush));
        if flush && self.armed.swap(false, std::sync::atomic::Ordering::AcqRel) {
            self.meet.wait(); // the test knows the rebuild is here
            self.meet.wait(); // and lets it go on
        }
        self.inner.submit(batch)
    }
}

#[test]
fn a_discard_and_a_write_before_a_rebuilt_extent_is_switched_in_win() {
    // The rebuild of extent 0 has copied it and flushes its new slab; meanwhile the extent is
    // discarded and written again. Whatever the rebuild copied must not replace what the
    // write allocated.
    let devs = mem_disks(3, 16 << 20);
    let held = Arc::new(HeldFlush {
        inner: Arc::new(vstor_core::MemoryDevice::new(16 << 20).unwrap()),
        armed: false.into(),
        meet: std::sync::Barrier::new(2),
    });
    let pool = Arc::new(create(&devs));
    let m = Resiliency::Mirror { copies: 2 };
    pool.create_space(&spec("m", 2 * SLAB, m, Some(1))).unwrap();
    let space = pool.open_space("m").unwrap();
    space.write_at(0, &pattern(1, (2 * SLAB) as usize)).unwrap();
    pool.fail_member(0).unwrap();
    pool.add_disk(PoolDisk::new("new", held.clone())).unwrap();
    held.armed.store(true, std::sync::atomic::Ordering::Release);
    let worker = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.repair(None, &mut |_, _| {}).unwrap())
    };
    held.meet.wait();
    // The extent reads as zeroes but for what the write put at 4 KiB.
    let mut new = vec![0u8; SLAB as usize];
    new[4096..4096 + (64 << 10)].copy_from_slice(&pattern(2, 64 << 10));
    space.discard(0, SLAB).unwrap();
    space.write_at(4096, &new[4096..4096 + (64 << 10)]).unwrap();
    held.meet.wait();
    worker.join().unwrap();
    let mut back = vec![0u8; SLAB as usize];
    space.read_at(0, &mut back).unwrap();
    assert!(back == new, "extent 0 lost the write");
    // Each copy alone.
    drop(space);
    assert_eq!(Arc::strong_count(&pool), 1, "the repair thread is done");
    drop(pool);
    let mut all = devs.clone();
    all.push(held.inner.clone());
    for lost in [1usize, 2, 3] {
        let pool = open(&all, &[0, lost], true);
        let space = pool.open_space("m").unwrap();
        let mut back = vec![0u8; SLAB as usize];
        space.read_at(0, &mut back).unwrap();
        assert!(back == new, "extent 0 with disk {lost} lost too");
    }
}

#[test]
fn writes_racing_discards_of_their_extents_all_land_and_copies_agree() {
    // One thread writes small pieces into extents 0 and 1 of a thin 2-way mirror while
    // another discards those extents whole, over and over: no write may fail (each lands
    // before or after a discard), and afterwards both copies agree everywhere.
    for layout in [
        (Resiliency::Mirror { copies: 2 }, 1, 3),
        (Resiliency::Parity { redundancy: 1 }, 3, 4),
    ] {
        let (res, cols, disks) = layout;
        let eb = extent_bytes(res, cols);
        let devs = mem_disks(disks, 16 << 20);
        let pool = Arc::new(create(&devs));
        pool.create_space(&spec("t", 2 * eb, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("t").unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let discarder = {
            let (space, stop, pool) = (space.clone(), stop.clone(), pool.clone());
            std::thread::spawn(move || {
                // Discards that found their extent allocated and left it free.
                let mut released = 0u64;
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let e = n % 2;
                    let was = pool.space_info("t").unwrap().allocated_extents;
                    space.discard(e * eb, eb).unwrap();
                    if pool.space_info("t").unwrap().allocated_extents < was {
                        released += 1;
                    }
                    n += 1;
                }
                released
            })
        };
        let mut rng = fastrand::Rng::with_seed(5);
        for i in 0..1000u64 {
            let at = rng.u64(0..2 * eb / 4096 - 2) * 4096;
            space.write_at(at, &pattern(i, 8192)).unwrap_or_else(|e| {
                panic!("{res}: write {i} at {at}: {e}");
            });
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        let released = discarder.join().unwrap();
        assert!(released > 10, "{res}: only {released} releases");
        let r = pool.scrub(None, &mut |_, _| {}).unwrap();
        assert_eq!(
            (r.checksum_errors, r.repaired, r.lost),
            (0, 0, 0),
            "{res}: {r:?}"
        );
        // What is there now survives a reopen.
        let now = read_all(&space);
        drop(space);
        assert_eq!(Arc::strong_count(&pool), 1);
        drop(pool);
        let pool = open(&devs, &[], false);
        assert!(read_all(&pool.open_space("t").unwrap()) == now, "{res}");
    }
}

#[test]
fn a_discard_that_needs_a_journal_turn_is_not_starved_by_busy_writers() {
    // Extent 1 has journal records; three threads keep journaling partial-row writes into
    // extent 0. The discard of extent 1 needs a new journal generation, which needs a moment
    // with no journaled batch in flight: it must get one.
    let res = Resiliency::Parity { redundancy: 1 };
    let eb = extent_bytes(res, 4);
    let devs = mem_disks(5, 16 << 20);
    let pool = create(&devs);
    pool.create_space(&spec("p", 2 * eb, res, Some(4))).unwrap();
    let space = pool.open_space("p").unwrap();
    space.write_at(0, &pattern(1, (2 * eb) as usize)).unwrap();
    space.write_at(eb + 4096, &pattern(2, 4096)).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let (space, stop) = (space.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let at = (t * 97 + i * 13) % (eb / 4096 - 1) * 4096;
                    space.write_at(at, &pattern(i, 4096)).unwrap();
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let before = used(&pool);
    let discard = {
        let space = space.clone();
        std::thread::spawn(move || space.discard(eb, eb).unwrap())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !discard.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let finished = discard.is_finished();
    stop.store(true, std::sync::atomic::Ordering::Release);
    for w in writers {
        w.join().unwrap();
    }
    assert!(finished, "the discard waited 30 s for the busy writers");
    discard.join().unwrap();
    assert_eq!(used(&pool), before - 4, "extent 1's slabs are free");
}
