//! Repair: rebuilding onto replacement disks after every tolerated loss, online with writes
//! going on, retiring and removing a disk, and resuming an interrupted repair.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vstor_core::{BlockDevice, FaultDevice, FaultRule, MemoryDevice, OpKind};
use vstor_spaces::{MemberState, PoolDisk, Resiliency, SpaceHealth};

const SPACE: u64 = 6 << 20;
const DISK: u64 = 24 << 20;

fn fill(space: &dyn BlockDevice, seed: u64) -> Vec<u8> {
    let data = pattern(seed, space.capacity() as usize);
    for (i, c) in data.chunks(96 << 10).enumerate() {
        space.write_at(i as u64 * (96 << 10), c).unwrap();
    }
    space.flush().unwrap();
    data
}

fn fresh() -> Arc<dyn BlockDevice> {
    Arc::new(MemoryDevice::new(DISK).unwrap())
}

#[test]
fn rebuild_onto_replacements_after_every_tolerated_loss() {
    for (label, res, cols, n) in layouts() {
        let t = res.tolerates();
        let mut sets: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
        if t >= 2 {
            for a in 0..n {
                for b in a + 1..n {
                    sets.push(vec![a, b]);
                }
            }
        }
        if t == 0 {
            continue;
        }
        for lost in sets {
            let devs = mem_disks(n, DISK);
            let pool = create(&devs);
            pool.create_space(&spec("s", SPACE, res, Some(cols)))
                .unwrap();
            let model = fill(&pool.open_space("s").unwrap(), 1);
            drop(pool);
            let pool = open(&devs, &lost, false);
            let spares: Vec<Arc<dyn BlockDevice>> = lost.iter().map(|_| fresh()).collect();
            for (i, d) in spares.iter().enumerate() {
                pool.add_disk(PoolDisk::new(format!("spare{i}"), d.clone()))
                    .unwrap();
            }
            let mut calls = 0;
            let report = pool.repair(None, &mut |_, _| calls += 1).unwrap();
            assert!(report.unrecoverable.is_empty(), "{label} {lost:?}");
            assert!(
                report.slabs > 0 && calls > 1,
                "{label} {lost:?}: {report:?}"
            );
            let space = pool.open_space("s").unwrap();
            assert_eq!(space.health(), SpaceHealth::Healthy, "{label} {lost:?}");
            assert!(read_all(&space) == model, "{label} {lost:?} after repair");
            drop((space, pool));
            // Reopen with the lost disks still gone: healthy, same data.
            let mut disks = without(&devs, &lost);
            for (i, d) in spares.iter().enumerate() {
                disks.push(PoolDisk::new(format!("spare{i}"), d.clone()));
            }
            let p = vstor_spaces::Pool::open(disks, &Default::default()).unwrap();
            let space = p.open_space("s").unwrap();
            assert_eq!(space.health(), SpaceHealth::Healthy, "{label} {lost:?}");
            assert!(read_all(&space) == model, "{label} {lost:?} after reopen");
            for &m in &lost {
                assert_eq!(p.info().members[m].slabs_used, 0);
                p.remove_member(m).unwrap();
            }
        }
    }
}

#[test]
fn repair_runs_online_with_writes_going_on() {
    for (label, res, cols, n) in layouts() {
        if res.tolerates() == 0 {
            continue;
        }
        let devs = mem_disks(n + 1, DISK);
        let pool = create(&devs[..n]);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let model = Arc::new(Mutex::new(fill(&space, 2)));
        pool.fail_member(1).unwrap();
        pool.add_disk(PoolDisk::new("spare", devs[n].clone()))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (space, model, stop) = (space.clone(), model.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(7);
                let mut writes = 0;
                while !stop.load(Ordering::Acquire) || writes < 20 {
                    let len = rng.usize(1..40) * 4096;
                    let at = rng.usize(0..(SPACE as usize - len) / 512) * 512;
                    let data = pattern(rng.u64(..), len);
                    let mut m = model.lock().unwrap();
                    space.write_at(at as u64, &data).unwrap();
                    m[at..at + len].copy_from_slice(&data);
                    writes += 1;
                }
                writes
            })
        };
        let report = pool.repair(Some("s"), &mut |_, _| {}).unwrap();
        stop.store(true, Ordering::Release);
        let writes = writer.join().unwrap();
        assert!(writes >= 20);
        assert!(report.slabs > 0, "{label}");
        assert_eq!(space.health(), SpaceHealth::Healthy, "{label}");
        space.flush().unwrap();
        let model = model.lock().unwrap().clone();
        assert!(
            read_all(&space) == model,
            "{label}: online repair lost a write"
        );
        drop((space, pool));
        // Without the failed member: everything is on the others.
        let mut disks = without(&devs, &[1]);
        disks.last_mut().unwrap().name = "spare".into();
        let p = vstor_spaces::Pool::open(disks, &Default::default()).unwrap();
        assert!(
            read_all(&p.open_space("s").unwrap()) == model,
            "{label} reopened"
        );
    }
}

#[test]
fn retire_then_remove_a_disk() {
    let devs = mem_disks(5, DISK);
    let pool = create(&devs[..4]);
    pool.create_space(&spec(
        "p",
        SPACE,
        Resiliency::Parity { redundancy: 1 },
        Some(3),
    ))
    .unwrap();
    pool.create_space(&spec("s", 2 << 20, Resiliency::Simple, Some(2)))
        .unwrap();
    let mp = fill(&pool.open_space("p").unwrap(), 3);
    let ms = fill(&pool.open_space("s").unwrap(), 4);
    let victim = (0..4)
        .find(|&m| pool.info().members[m].slabs_used > 0)
        .unwrap();
    pool.retire_member(victim).unwrap();
    assert_eq!(pool.info().members[victim].state, MemberState::Retired);
    let e = pool.remove_member(victim).unwrap_err();
    assert!(e.to_string().contains("retire it and repair first"), "{e}");
    pool.add_disk(PoolDisk::new("m4", devs[4].clone())).unwrap();
    let report = pool.repair(None, &mut |_, _| {}).unwrap();
    assert!(report.slabs > 0);
    assert_eq!(pool.info().members[victim].slabs_used, 0);
    // A simple space, too, moves off a retired (still readable) disk.
    assert!(read_all(&pool.open_space("s").unwrap()) == ms);
    assert!(read_all(&pool.open_space("p").unwrap()) == mp);
    pool.remove_member(victim).unwrap();
    drop(pool);
    let p = open(&devs, &[victim], false);
    assert!(p.info().notes.is_empty(), "{:?}", p.info().notes);
    assert!(read_all(&p.open_space("s").unwrap()) == ms);
    assert!(read_all(&p.open_space("p").unwrap()) == mp);
    drop(p);
    // The removed disk, offered again, is skipped with a note naming it (it holds nothing of
    // the pool), instead of blocking the open; nothing is written to it.
    let before = contents(&*devs[victim]);
    let p = vstor_spaces::Pool::open(named(&devs), &Default::default()).unwrap();
    let notes = p.info().notes;
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with(&format!("m{victim}: member {victim} was removed"))),
        "{notes:?}"
    );
    assert_eq!(p.info().members[victim].disk, None);
    assert!(read_all(&p.open_space("s").unwrap()) == ms);
    assert!(read_all(&p.open_space("p").unwrap()) == mp);
    p.open_space("p")
        .unwrap()
        .write_at(0, &[7u8; 4096])
        .unwrap();
    p.open_space("p").unwrap().flush().unwrap();
    drop(p);
    assert!(
        contents(&*devs[victim]) == before,
        "the removed disk was written"
    );
}

#[test]
fn an_interrupted_repair_resumes() {
    let devs = mem_disks(4, DISK);
    let pool = create(&devs);
    pool.create_space(&spec("m", SPACE, Resiliency::Mirror { copies: 2 }, Some(1)))
        .unwrap();
    let model = fill(&pool.open_space("m").unwrap(), 5);
    drop(pool);
    let lost = 0;
    let pool = open(&devs, &[lost], false);
    let spare = Arc::new(FaultDevice::new(fresh()));
    spare.set_volatile_cache(false).unwrap();
    // The spare fails its second data write (past the metadata slots, the journal and the
    // bitmap, before its checksum area).
    let ds = pool.info().data_start;
    let slabs = vstor_spaces::csum::slabs_fitting(spare.capacity(), ds, SLAB);
    let sums = vstor_spaces::csum::area_start(ds, SLAB, slabs as u32);
    spare.add_rule(
        FaultRule::fail(OpKind::Write)
            .in_range(ds..sums)
            .after(1)
            .times(1),
    );
    pool.add_disk(PoolDisk::new("spare", spare.clone()))
        .unwrap();
    let to_rebuild = pool.info().members[lost].slabs_used;
    assert!(to_rebuild >= 2);
    let total_before = pool.spaces()[0].health.clone();
    assert!(matches!(total_before, SpaceHealth::Degraded { .. }));
    let first = pool.repair(None, &mut |_, _| {});
    assert!(first.is_err(), "the injected fault did not stop the repair");
    let second = pool.repair(None, &mut |_, _| {}).unwrap();
    // The extent rebuilt before the fault stays rebuilt: the second run does the rest.
    assert_eq!(second.slabs, to_rebuild - 1);
    let space = pool.open_space("m").unwrap();
    assert_eq!(space.health(), SpaceHealth::Healthy);
    assert!(read_all(&space) == model);
}

#[test]
fn a_disk_that_came_back_is_reused_in_place() {
    for (label, res, cols, n) in [
        ("parity1", Resiliency::Parity { redundancy: 1 }, 3, 3),
        ("mirror2", Resiliency::Mirror { copies: 2 }, 1, 2),
    ] {
        let devs = mem_disks(n, DISK);
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let mut model = fill(&pool.open_space("s").unwrap(), 8);
        drop(pool);
        // An old copy of member 1 is kept, the pool is written, then member 1 goes away and
        // writes go on without it; the old copy comes back (older than the metadata member 1
        // was failed at, so it cannot be caught up from the bitmaps).
        let old = contents(&*devs[1]);
        let pool = open(&devs, &[], false);
        let first = pattern(10, 64 << 10);
        pool.open_space("s").unwrap().write_at(0, &first).unwrap();
        model[..first.len()].copy_from_slice(&first);
        drop(pool);
        let pool = open(&devs, &[1], false);
        let space = pool.open_space("s").unwrap();
        let new = pattern(9, 1 << 20);
        space.write_at(512 << 10, &new).unwrap();
        model[512 << 10..(512 << 10) + new.len()].copy_from_slice(&new);
        drop((space, pool));
        devs[1].write_at(0, &old).unwrap();
        // It comes back, stale. With no other disk, repair has nowhere to go...
        let pool = open(&devs, &[], false);
        assert_eq!(pool.info().members[1].state, MemberState::Failed);
        let e = pool.repair(None, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("does not use yet"), "{label}: {e}");
        // ...until the disk is taken back as a fresh member.
        let fresh = pool.reuse_member(1).unwrap();
        assert_eq!(fresh, n);
        let report = pool.repair(None, &mut |_, _| {}).unwrap();
        assert!(report.slabs > 0, "{label}");
        let space = pool.open_space("s").unwrap();
        assert_eq!(space.health(), SpaceHealth::Healthy, "{label}");
        assert!(read_all(&space) == model, "{label}");
        pool.remove_member(1).unwrap();
        let e = pool.reuse_member(0).unwrap_err();
        assert!(e.to_string().contains("only a failed member"), "{e}");
        drop((space, pool));
        let pool = open(&devs, &[], false);
        assert!(
            pool.info().notes.is_empty(),
            "{label}: {:?}",
            pool.info().notes
        );
        assert!(read_all(&pool.open_space("s").unwrap()) == model, "{label}");
        drop(pool);
        for lost in 0..n {
            let p = open(&devs, &[lost], true);
            assert!(
                read_all(&p.open_space("s").unwrap()) == model,
                "{label} without {lost}"
            );
        }
    }
}

/// A rebuild of slabs bigger than its window (several windows per slab) lets writes in
/// between windows instead of holding the space's I/O for the whole slab, and the chunk it
/// read ahead at the end of a window never lands over a write that got in meanwhile: writes
/// aimed at exactly those chunks, during the repair, all read back, also with the failed disk
/// gone.
#[test]
fn a_rebuild_lets_writes_in_between_windows_and_never_copies_over_them() {
    const BIG_SLAB: u64 = 64 << 20;
    const BIG_SPACE: u64 = 2 * BIG_SLAB;
    let devs: Vec<Arc<dyn BlockDevice>> = (0..3)
        .map(|_| Arc::new(MemoryDevice::new(3 * BIG_SLAB + (8 << 20)).unwrap()) as _)
        .collect();
    let pool = vstor_spaces::Pool::create(
        named(&devs[..2]),
        &vstor_spaces::CreateOptions {
            slab_size: BIG_SLAB,
        },
    )
    .unwrap();
    pool.create_space(&vstor_spaces::SpaceSpec {
        provisioning: vstor_spaces::Provisioning::Fixed,
        ..spec("s", BIG_SPACE, Resiliency::Mirror { copies: 2 }, Some(1))
    })
    .unwrap();
    let space = pool.open_space("s").unwrap();
    let model = Arc::new(Mutex::new(fill(&space, 5)));
    pool.fail_member(0).unwrap();
    pool.add_disk(PoolDisk::new("spare", devs[2].clone()))
        .unwrap();
    let repairing = Arc::new(AtomicBool::new(true));
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Four writers, two per slab, each on its own 4 MiB of the chunk each window after the
    // first starts with (32 MiB into a slab: the rebuild's window is 4 chunks of 8 MiB), the
    // chunk read ahead. Between windows every waiting writer gets in.
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (space, repairing, count) = (space.clone(), repairing.clone(), count.clone());
            let base = (t / 2) * BIG_SLAB + (32 << 20) + (t % 2) * (4 << 20);
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(11 + t);
                let mut done: Vec<(u64, Vec<u8>)> = Vec::new();
                let mut during = 0u32;
                while repairing.load(Ordering::Acquire) || done.len() < 10 {
                    let len = rng.u64(1..16) * 4096;
                    let at = base + rng.u64(..(4 << 20) - len) / 512 * 512;
                    let data = pattern(rng.u64(..), len as usize);
                    space.write_at(at, &data).unwrap();
                    count.fetch_add(1, Ordering::AcqRel);
                    done.push((at, data));
                    during += u32::from(repairing.load(Ordering::Acquire));
                }
                (during, done)
            })
        })
        .collect();
    // Writes completed as of each window's end (progress is reported with the window's
    // I/O still held off).
    let mut seen = Vec::new();
    let report = pool
        .repair(Some("s"), &mut |done, _| {
            seen.push((done, count.load(Ordering::Acquire)))
        })
        .unwrap();
    repairing.store(false, Ordering::Release);
    let mut model = model.lock().unwrap().clone();
    let mut during = 0;
    for w in writers {
        let (d, done) = w.join().unwrap();
        during += d;
        for (at, data) in done {
            model[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
    }
    assert_eq!(report.slabs, 2);
    assert!(during > 0, "no write got in while the repair ran");
    // Two windows a slab: writes got in between the windows of a slab (from the report at
    // the end of its first window, half a slab done, to the one at its end), not only
    // between slabs.
    eprintln!("(bytes done, writes done) at each report: {seen:?}");
    let within = seen
        .windows(2)
        .filter(|w| w[0].0 % BIG_SLAB == BIG_SLAB / 2 && w[1].0 == w[0].0 + BIG_SLAB / 2);
    assert!(
        within.clone().count() == 2 && within.clone().all(|w| w[1].1 > w[0].1),
        "the rebuild held the space's I/O off from one window to the next: {seen:?}"
    );
    assert!(
        read_all(&space) == model,
        "a write was lost under the rebuild"
    );
    drop((space, pool));
    let mut disks = without(&devs, &[0]);
    disks.last_mut().unwrap().name = "spare".into();
    let p = vstor_spaces::Pool::open(disks, &Default::default()).unwrap();
    assert!(
        read_all(&p.open_space("s").unwrap()) == model,
        "a write was lost under the rebuild (the failed disk gone)"
    );
}
