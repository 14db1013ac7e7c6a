//! A member that was missing or failed while the pool was written, and comes back holding the
//! metadata it last got, is caught up from the write-intent bitmaps (the bits are kept while a
//! member is behind), as Linux md re-adds a member with a bitmap: only the chunks written
//! since are copied or rebuilt onto it, its own contents never a source. A member holding any
//! other metadata (an old copy put back) is not caught up: it stays failed and is rebuilt
//! whole. A power cut at any write of a catch-up leaves the pool readable with the right
//! data, and the next open finishes the job.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::BlockDevice;
use vstor_spaces::{MemberState, OpenOptions, Pool, Provisioning, Resiliency, SpaceSpec};

const DISK: u64 = 24 << 20;
const SPACE: u64 = 6 << 20;

fn space_spec(res: Resiliency, cols: usize, provisioning: Provisioning) -> SpaceSpec {
    SpaceSpec {
        provisioning,
        ..spec("s", SPACE, res, Some(cols))
    }
}

/// Writes of the degraded session: a run at the start and scattered 4 KiB blocks, into the
/// model too.
fn degraded_writes(space: &dyn BlockDevice, model: &mut [u8], seed: u64) {
    let run = pattern(seed, 192 << 10);
    space.write_at(0, &run).unwrap();
    model[..run.len()].copy_from_slice(&run);
    for k in 0..8u64 {
        let off = ((k * 733 + seed) % (SPACE / 4096)) * 4096;
        let b = pattern(seed * 100 + k, 4096);
        space.write_at(off, &b).unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&b);
    }
    space.flush().unwrap();
}

/// Every member holds good data: with any one member the layout tolerates losing left out,
/// a read-only open reads the model.
fn every_member_holds(devs: &[Arc<dyn BlockDevice>], model: &[u8], what: &str) {
    for lost in 0..devs.len() {
        let pool = open(devs, &[lost], true);
        assert!(
            read_all(&pool.open_space("s").unwrap()) == model,
            "{what}: wrong data without member {lost}"
        );
    }
}

/// A member missing from the start of a session that wrote, then put back: a writable open
/// catches it up from the bitmaps (only the chunks written), it is healthy again, and it
/// holds every write (the pool reads right without each other member).
#[test]
fn a_member_missing_while_the_pool_was_written_is_caught_up_from_the_bitmaps() {
    for (label, res, cols, n) in redundant() {
        for prov in [Provisioning::Thin, Provisioning::Fixed] {
            let what = format!("{label} {prov:?}");
            let devs = mem_disks(n, DISK);
            let pool = create(&devs);
            pool.create_space(&space_spec(res, cols, prov)).unwrap();
            let mut model = pattern(1, SPACE as usize);
            pool.open_space("s").unwrap().write_at(0, &model).unwrap();
            drop(pool);

            let pool = open(&devs, &[0], false);
            degraded_writes(&pool.open_space("s").unwrap(), &mut model, 7);
            drop(pool);

            // Read-only: not read, not caught up, nothing written.
            let before: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
            let pool = open(&devs, &[], true);
            let info = pool.info();
            assert!(!info.members[0].usable, "{what}");
            assert!(
                info.notes.iter().any(|n| n.contains("catches it up")),
                "{what}: {:?}",
                info.notes
            );
            assert!(read_all(&pool.open_space("s").unwrap()) == model, "{what}");
            drop(pool);
            let after: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
            assert!(before == after, "{what}: a read-only open wrote");

            let pool = open(&devs, &[], false);
            let info = pool.info();
            assert!(
                info.members[0].usable && info.members[0].state == MemberState::Healthy,
                "{what}: {:?}",
                info.notes
            );
            let note = info
                .notes
                .iter()
                .find(|n| n.contains("caught up"))
                .unwrap_or_else(|| panic!("{what}: {:?}", info.notes));
            // Only what was written: the space has 6 slabs of 16 chunks per column, far more
            // than the few chunks the degraded writes touched.
            assert!(
                info.resynced_chunks > 0 && info.resynced_chunks <= 24,
                "{what}: {note} ({} chunks)",
                info.resynced_chunks
            );
            let space = pool.open_space("s").unwrap();
            assert!(read_all(&space) == model, "{what}");
            let report = pool.scrub(None, &mut |_, _| {}).unwrap();
            assert_eq!(
                (report.lost, report.undecided, report.checksum_errors),
                (0, 0, 0),
                "{what}: {report:?}"
            );
            drop((space, pool));
            // The kept bits are gone with the member back: the next open has nothing to do.
            let pool = open(&devs, &[], false);
            assert!(
                !pool.info().notes.iter().any(|n| n.contains("resynced")),
                "{what}: {:?}",
                pool.info().notes
            );
            drop(pool);
            every_member_holds(&devs, &model, &what);
        }
    }
}

/// A member that fails while the pool is open (an I/O error) and is present again at the
/// next open holds the metadata it last got: it is caught up.
#[test]
fn a_member_failed_mid_session_is_caught_up_when_it_is_back() {
    for (label, res, cols, n) in redundant() {
        let devs = mem_disks(n, DISK);
        let pool = create(&devs);
        pool.create_space(&space_spec(res, cols, Provisioning::Thin))
            .unwrap();
        let mut model = pattern(2, SPACE as usize);
        let space = pool.open_space("s").unwrap();
        space.write_at(0, &model).unwrap();
        space.flush().unwrap();
        pool.fail_member(1).unwrap();
        degraded_writes(&space, &mut model, 11);
        drop((space, pool));
        let pool = open(&devs, &[], false);
        let info = pool.info();
        assert!(
            info.members[1].usable && info.notes.iter().any(|n| n.contains("caught up")),
            "{label}: {:?}",
            info.notes
        );
        assert!(read_all(&pool.open_space("s").unwrap()) == model, "{label}");
        drop(pool);
        every_member_holds(&devs, &model, label);
    }
}

/// An old copy of the member put back (it holds older metadata than the one it was failed
/// at) is not caught up: the bits do not cover what it missed before. It stays failed and
/// unread; a rebuild brings the disk back.
#[test]
fn an_old_copy_of_a_missing_member_is_not_caught_up() {
    for (label, res, cols, n) in redundant() {
        let devs = mem_disks(n, DISK);
        let pool = create(&devs);
        pool.create_space(&space_spec(res, cols, Provisioning::Thin))
            .unwrap();
        let mut model = pattern(3, SPACE as usize);
        pool.open_space("s").unwrap().write_at(0, &model).unwrap();
        drop(pool);
        let old = contents(&*devs[0]);
        // Written with every member present (bits cleared), then with member 0 missing.
        let pool = open(&devs, &[], false);
        degraded_writes(&pool.open_space("s").unwrap(), &mut model, 5);
        drop(pool);
        let pool = open(&devs, &[0], false);
        degraded_writes(&pool.open_space("s").unwrap(), &mut model, 9);
        drop(pool);
        devs[0].write_at(0, &old).unwrap();

        let pool = open(&devs, &[], false);
        let info = pool.info();
        assert!(
            !info.members[0].usable && !info.notes.iter().any(|n| n.contains("caught up")),
            "{label}: {:?}",
            info.notes
        );
        assert!(read_all(&pool.open_space("s").unwrap()) == model, "{label}");
        let new = pool.reuse_member(0).unwrap();
        pool.repair(None, &mut |_, _| {}).unwrap();
        pool.remove_member(0).unwrap();
        assert!(pool.info().members[new].usable);
        drop(pool);
        every_member_holds(&devs, &model, label);
    }
}

/// A power cut at every write of a catch-up (its chunk copies, the member's bitmap and
/// journal, the metadata that takes it back; torn or not): the reopened pool reads the model,
/// and once an open completes, the member is back and holds every write.
#[test]
fn power_cuts_during_a_catch_up_lose_nothing() {
    let (_, res, cols, n) = redundant()
        .into_iter()
        .find(|l| l.0 == "parity1")
        .expect("single parity is a layout");
    let devs = mem_disks(n, DISK);
    let pool = create(&devs);
    pool.create_space(&space_spec(res, cols, Provisioning::Fixed))
        .unwrap();
    let mut model = pattern(4, SPACE as usize);
    pool.open_space("s").unwrap().write_at(0, &model).unwrap();
    drop(pool);
    let pool = open(&devs, &[2], false);
    degraded_writes(&pool.open_space("s").unwrap(), &mut model, 13);
    drop(pool);
    let media: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
    let mut cuts = 0;
    for k in 1.. {
        let g = Group::new(&media, DISK, k);
        g.cut_after(k);
        let _ = Pool::open(g.disks(), &OpenOptions::default());
        if !g.cut_happened() {
            break;
        }
        cuts += 1;
        g.power_on();
        let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
        let info = pool.info();
        assert!(
            read_all(&pool.open_space("s").unwrap()) == model,
            "cut at {k}: {:?}",
            info.notes
        );
        drop(pool);
        let disks = from_media(&g.media(), DISK);
        let pool = open(&disks, &[], false);
        let usable = pool.info().members.iter().all(|m| m.usable);
        drop(pool);
        if usable {
            every_member_holds(&disks, &model, &format!("cut at {k}"));
        } else {
            // A cut that tore the member's own metadata leaves it older than it was failed
            // at: it is rebuilt whole, never read.
            let pool = open(&disks, &[], false);
            assert!(
                read_all(&pool.open_space("s").unwrap()) == model,
                "cut at {k}"
            );
        }
    }
    assert!(cuts >= 6, "only {cuts} cut points");
}
