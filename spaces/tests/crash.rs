//! Power cuts (through core's FaultDevice, with torn writes) at every write of an operation:
//! partial-row parity updates and mirror writes, thin allocation, repair onto a spare, the
//! move off a retired member, scrub and self-heal. The reopened pool is consistent: the
//! write-intent bitmap names the chunks being written, only those are resynced, and afterwards
//! the loss of any member gives back the same data; an interrupted rebuild or move resumes
//! with the extents not yet switched. (A cut followed by a member loss before any resync is
//! in write_hole.rs.)

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vstor_core::{BlockDevice, MemoryDevice, Request};
use vstor_spaces::{
    IntegrityStats, MemberState, OpenOptions, Pool, PoolDisk, Resiliency, SpaceHealth,
};

const DISK: u64 = 10 << 20;
const SPACE: u64 = 2 << 20;

/// A pool with one space of `res`, written whole and flushed; returns the media and the data.
fn golden(res: Resiliency, cols: usize, n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
    let devs = mem_disks(n, DISK);
    let pool = create(&devs);
    pool.create_space(&spec("s", SPACE, res, Some(cols)))
        .unwrap();
    let space = pool.open_space("s").unwrap();
    let data = pattern(1, SPACE as usize);
    space.write_at(0, &data).unwrap();
    space.flush().unwrap();
    drop((space, pool));
    (devs.iter().map(|d| contents(&**d)).collect(), data)
}

/// Partial-row writes in several rows, in one batch, then a flush.
fn writes() -> Vec<(u64, Vec<u8>)> {
    vec![
        (4096, pattern(2, 8192)),
        (100 * 1024, pattern(3, 20 * 1024)),
        (700 * 1024 + 512, pattern(4, 3584)),
        (1500 * 1024, pattern(5, 40 * 1024)),
    ]
}

#[test]
fn power_cuts_during_writes_leave_copies_and_parity_consistent() {
    for (label, res, cols, n) in layouts() {
        let (media, old) = golden(res, cols, n);
        let mut new = old.clone();
        for (at, d) in writes() {
            new[at as usize..at as usize + d.len()].copy_from_slice(&d);
        }
        let mut cuts = 0;
        let mut resynced = 0;
        for k in 1.. {
            let g = Group::new(&media, DISK, k);
            let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
            let space = pool.open_space("s").unwrap();
            g.cut_after(k);
            let w = writes();
            let mut batch: Vec<Request> = w.iter().map(|(at, d)| Request::write(*at, d)).collect();
            batch.push(Request::flush());
            space.submit(&mut batch);
            let flushed = batch.iter().all(|r| r.result().is_ok());
            drop(batch);
            drop((space, pool));
            if !g.cut_happened() {
                assert!(flushed, "{label}");
                break;
            }
            cuts += 1;
            g.power_on();
            // Reopen: the bitmap names what was being written; only that is resynced.
            let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
            let info = pool.info();
            resynced += info.resynced_chunks;
            assert!(
                info.resynced_chunks <= 4 * n as u64,
                "{label} cut at {k}: resynced {} chunks",
                info.resynced_chunks
            );
            let space = pool.open_space("s").unwrap();
            assert_eq!(space.health(), SpaceHealth::Healthy, "{label} cut at {k}");
            let got = read_all(&space);
            for (i, (g_, (o, nw))) in got
                .chunks(512)
                .zip(old.chunks(512).zip(new.chunks(512)))
                .enumerate()
            {
                assert!(
                    g_ == o || g_ == nw,
                    "{label} cut at {k}: sector {i} is neither old nor new"
                );
            }
            // The resync left every block's checksum matching its data: no read found a
            // checksum error, and neither does a scrub.
            assert_eq!(
                pool.info().integrity,
                IntegrityStats::default(),
                "{label} cut at {k}"
            );
            let scrub = pool.scrub(None, &mut |_, _| {}).unwrap();
            assert_eq!(
                (scrub.checksum_errors, scrub.repaired),
                (0, 0),
                "{label} cut at {k}: {scrub:?}"
            );
            drop((space, pool));
            // Every single loss gives back exactly the same data: copies and parity agree.
            let after = g.media();
            if res.tolerates() > 0 {
                for lost in 0..n {
                    let devs: Vec<Arc<dyn BlockDevice>> = after
                        .iter()
                        .map(|m| {
                            let d = Arc::new(MemoryDevice::new(DISK).unwrap());
                            d.write_at(0, m).unwrap();
                            d as Arc<dyn BlockDevice>
                        })
                        .collect();
                    let p = open(&devs, &[lost], true);
                    assert!(
                        read_all(&p.open_space("s").unwrap()) == got,
                        "{label} cut at {k}: without member {lost} the data differs"
                    );
                }
            }
        }
        assert!(cuts >= 4, "{label}: only {cuts} cut points");
        assert!(resynced > 0, "{label}: no cut left a dirty chunk");
    }
}

#[test]
fn a_clean_close_leaves_nothing_to_resync() {
    let (media, _) = golden(Resiliency::Parity { redundancy: 1 }, 3, 4);
    let g = Group::new(&media, DISK, 0);
    let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
    assert_eq!(pool.info().resynced_chunks, 0);
    pool.open_space("s")
        .unwrap()
        .write_at(0, &[9u8; 4096])
        .unwrap();
    drop(pool);
    let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
    assert_eq!(pool.info().resynced_chunks, 0);
    assert!(pool.info().notes.is_empty(), "{:?}", pool.info().notes);
}

#[test]
fn power_cuts_during_thin_allocation_and_space_creation() {
    let devs = mem_disks(4, DISK);
    drop(create(&devs));
    let media: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
    for k in 1.. {
        let g = Group::new(&media, DISK, k);
        let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
        g.cut_after(k);
        let made = pool.create_space(&spec("m", SPACE, Resiliency::Mirror { copies: 2 }, Some(1)));
        let wrote = made.is_ok()
            && pool
                .open_space("m")
                .and_then(|s| s.write_at(1 << 20, &[7u8; 8192]).and_then(|()| s.flush()))
                .is_ok();
        drop(pool);
        if !g.cut_happened() {
            assert!(wrote);
            break;
        }
        g.power_on();
        let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
        match pool.open_space("m") {
            // The space was recorded: it reads zeroes or the write, never stale slab contents.
            Ok(space) => {
                let got = read_all(&space);
                assert!(got[..1 << 20].iter().all(|&b| b == 0), "cut at {k}");
                assert!(
                    got[(1 << 20) + 8192..].iter().all(|&b| b == 0),
                    "cut at {k}"
                );
                assert!(
                    got[1 << 20..(1 << 20) + 8192]
                        .chunks(512)
                        .all(|c| c.iter().all(|&b| b == 0) || c.iter().all(|&b| b == 7)),
                    "cut at {k}"
                );
            }
            Err(e) => assert!(e.to_string().contains("no space named"), "cut at {k}: {e}"),
        }
    }
}

#[test]
fn power_cut_during_repair_then_repair_again() {
    let (media, data) = golden(Resiliency::Parity { redundancy: 1 }, 3, 4);
    // Member 0 is gone; a fresh disk takes its place.
    let mut media = media;
    media[0] = vec![0u8; DISK as usize];
    let mut k = 1;
    loop {
        let g = Group::new(&media, DISK, k);
        let disks: Vec<PoolDisk> = g.disks().into_iter().skip(1).collect();
        let pool = Pool::open(disks, &OpenOptions::default()).unwrap();
        let spare = g.disks().remove(0);
        pool.add_disk(spare).unwrap();
        g.cut_at
            .store(g.writes.load(Ordering::SeqCst) + k, Ordering::SeqCst);
        let r = pool.repair(None, &mut |_, _| {});
        drop(pool);
        if !g.cut_happened() {
            r.unwrap();
            break;
        }
        g.power_on();
        let disks: Vec<PoolDisk> = g.disks().into_iter().collect();
        // The spare may or may not have been recorded as a member before the cut.
        let pool = Pool::open(disks, &OpenOptions::default()).unwrap();
        let space = pool.open_space("s").unwrap();
        assert!(read_all(&space) == data, "repair cut at {k}: data differs");
        pool.repair(None, &mut |_, _| {}).unwrap();
        assert_eq!(space.health(), SpaceHealth::Healthy, "cut at {k}");
        assert!(
            read_all(&space) == data,
            "repair cut at {k}: data differs after repair"
        );
        k += 1;
    }
}

/// A pool with one space of `res` and `size` bytes, written whole and flushed.
fn golden_sized(res: Resiliency, cols: usize, n: usize, size: u64) -> (Vec<Vec<u8>>, Vec<u8>) {
    let devs = mem_disks(n, DISK);
    let pool = create(&devs);
    pool.create_space(&spec("s", size, res, Some(cols)))
        .unwrap();
    let space = pool.open_space("s").unwrap();
    let data = pattern(31, size as usize);
    space.write_at(0, &data).unwrap();
    space.flush().unwrap();
    drop((space, pool));
    (devs.iter().map(|d| contents(&**d)).collect(), data)
}

/// Retiring a member moves its slabs off an extent at a time: a power cut at every write of
/// that, then a reopen. The data reads back; the extents already moved stay moved and the
/// repair resumes with the rest (it moves exactly the slabs still on the member); then the
/// member holds nothing and is removed.
#[test]
fn power_cuts_during_retire_then_the_move_resumes() {
    for (label, res, cols, n) in [
        ("parity1", Resiliency::Parity { redundancy: 1 }, 3, 5),
        ("mirror2", Resiliency::Mirror { copies: 2 }, 1, 4),
    ] {
        let (media, data) = golden_sized(res, cols, n, 4 << 20);
        let victim = {
            let p = open(&from_media(&media, DISK), &[], true);
            let info = p.info();
            info.members
                .iter()
                .max_by_key(|m| m.slabs_used)
                .expect("members")
                .index
        };
        let (mut cuts, mut resumed) = (0, 0);
        for k in 1.. {
            let g = Group::new(&media, DISK, k);
            let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
            pool.retire_member(victim).unwrap();
            let before = pool.info().members[victim].slabs_used;
            assert!(before >= 2, "{label}");
            g.cut_after(k);
            let r = pool.repair(None, &mut |_, _| {});
            drop(pool);
            if !g.cut_happened() {
                assert_eq!(r.unwrap().slabs, before, "{label}");
                break;
            }
            cuts += 1;
            g.power_on();
            let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
            let space = pool.open_space("s").unwrap();
            assert!(read_all(&space) == data, "{label} cut at {k}: data differs");
            let info = pool.info();
            assert_eq!(info.members[victim].state, MemberState::Retired, "{label}");
            let left = info.members[victim].slabs_used;
            if left < before {
                resumed += 1;
            }
            let report = pool.repair(None, &mut |_, _| {}).unwrap();
            assert_eq!(report.slabs, left, "{label} cut at {k}: {report:?}");
            pool.remove_member(victim).unwrap();
            assert_eq!(space.health(), SpaceHealth::Healthy, "{label} cut at {k}");
            assert!(
                read_all(&space) == data,
                "{label} cut at {k}: data differs after"
            );
            let s = pool.scrub(None, &mut |_, _| {}).unwrap();
            assert_eq!(
                (s.repaired, s.checksum_errors),
                (0, 0),
                "{label} cut at {k}"
            );
        }
        assert!(cuts >= 4, "{label}: only {cuts} cut points");
        assert!(
            resumed > 0,
            "{label}: no cut came after an extent was moved"
        );
    }
}

/// Blocks damaged on the media are healed by a scrub, or by the read that finds them: a power
/// cut at every write of either. The reopened pool reads the right data, a scrub finds
/// nothing lost, and afterwards the loss of any member still gives the same data.
#[test]
fn power_cuts_during_scrub_and_self_heal() {
    for mode in ["scrub", "heal"] {
        for (label, res, cols, n) in [
            ("parity1", Resiliency::Parity { redundancy: 1 }, 4, 5),
            ("parity2", Resiliency::Parity { redundancy: 2 }, 5, 6),
            ("mirror2", Resiliency::Mirror { copies: 2 }, 2, 5),
        ] {
            let (media, data) = golden(res, cols, n);
            let spots: Vec<(usize, u64)> = {
                let p = open(&from_media(&media, DISK), &[], true);
                let s = p.open_space("s").unwrap();
                [100_000u64, 700_000, 1_500_000]
                    .iter()
                    .map(|&o| {
                        // The copy a read goes to (mirror reads rotate by row).
                        let l = s.locate(o).unwrap();
                        l.copies[l.row as usize % l.copies.len()]
                    })
                    .collect()
            };
            let mut cuts = 0;
            for k in 1.. {
                let g = Group::new(&media, DISK, k);
                for (i, &(m, off)) in spots.iter().enumerate() {
                    g.faults[m]
                        .corrupt_stored(off - off % 512, 512, i as u64)
                        .unwrap();
                }
                let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
                g.cut_after(k);
                let r = match mode {
                    "scrub" => pool.scrub(None, &mut |_, _| {}).map(|r| {
                        assert_eq!((r.healed, r.lost), (3, 0), "{label}: {r:?}");
                    }),
                    _ => {
                        let s = pool.open_space("s").unwrap();
                        let mut b = vec![0u8; SPACE as usize];
                        s.read_at(0, &mut b).map(|()| assert!(b == data, "{label}"))
                    }
                };
                drop(pool);
                if !g.cut_happened() {
                    r.unwrap();
                    break;
                }
                cuts += 1;
                g.power_on();
                let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
                let space = pool.open_space("s").unwrap();
                assert!(
                    read_all(&space) == data,
                    "{mode} {label} cut at {k}: data differs"
                );
                let s = pool.scrub(None, &mut |_, _| {}).unwrap();
                assert_eq!(s.lost, 0, "{mode} {label} cut at {k}: {s:?}");
                drop((space, pool));
                let after = g.media();
                for lost in 0..n {
                    let p = open(&from_media(&after, DISK), &[lost], true);
                    assert!(
                        read_all(&p.open_space("s").unwrap()) == data,
                        "{mode} {label} cut at {k}: without member {lost} the data differs"
                    );
                }
            }
            assert!(cuts >= 1, "{mode} {label}: no cut point");
        }
    }
}

/// A rebuild of a lost member's slabs onto a spare, cut by a power cut at every write: the
/// reopened pool reads right (degraded), the extents already rebuilt stay switched, and the
/// next repair rebuilds exactly the slabs still on the lost member.
#[test]
fn power_cuts_during_rebuild_then_it_resumes() {
    for (label, res, cols, n) in [
        ("parity1", Resiliency::Parity { redundancy: 1 }, 3, 4),
        ("parity2", Resiliency::Parity { redundancy: 2 }, 4, 5),
        ("mirror2", Resiliency::Mirror { copies: 2 }, 1, 3),
    ] {
        let (mut media, data) = golden_sized(res, cols, n, 4 << 20);
        let victim = {
            let p = open(&from_media(&media, DISK), &[], true);
            let info = p.info();
            info.members
                .iter()
                .max_by_key(|m| m.slabs_used)
                .expect("members")
                .index
        };
        // The victim is gone; a fresh disk takes its place in the group.
        media[victim] = vec![0u8; DISK as usize];
        let (mut cuts, mut resumed) = (0, 0);
        for k in 1.. {
            let g = Group::new(&media, DISK, k);
            let mut disks = g.disks();
            let spare = disks.remove(victim);
            let pool = Pool::open(disks, &OpenOptions::default()).unwrap();
            pool.add_disk(spare).unwrap();
            let before = pool.info().members[victim].slabs_used;
            assert!(before >= 2, "{label}");
            g.cut_after(k);
            let r = pool.repair(None, &mut |_, _| {});
            drop(pool);
            if !g.cut_happened() {
                assert_eq!(r.unwrap().slabs, before, "{label}");
                break;
            }
            cuts += 1;
            g.power_on();
            let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
            let space = pool.open_space("s").unwrap();
            assert!(read_all(&space) == data, "{label} cut at {k}: data differs");
            let left = pool.info().members[victim].slabs_used;
            if left < before {
                resumed += 1;
            }
            let report = pool.repair(None, &mut |_, _| {}).unwrap();
            assert_eq!(report.slabs, left, "{label} cut at {k}: {report:?}");
            assert_eq!(space.health(), SpaceHealth::Healthy, "{label} cut at {k}");
            assert!(
                read_all(&space) == data,
                "{label} cut at {k}: data differs after"
            );
        }
        assert!(cuts >= 4, "{label}: only {cuts} cut points");
        assert!(
            resumed > 0,
            "{label}: no cut came after an extent was rebuilt"
        );
    }
}
