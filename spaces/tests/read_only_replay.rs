//! A read-only open of a pool whose parity journal holds committed updates a power cut left
//! unapplied: it writes nothing and replays them in memory (each member seen through an
//! overlay), so the spaces they touch read them whole, with a member missing too (their rows
//! would otherwise be rebuilt from stale parity). A writable open applies them, and read-only
//! opens then read the same with nothing pending.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::{BlockDevice, FaultDevice, FaultRule, OpKind, Request};
use vstor_spaces::Resiliency;

const DISK: u64 = 8 << 20;
const SPACE: u64 = 2 << 20;

#[test]
fn a_read_only_open_replays_journal_updates_in_memory() {
    // A parity space written whole and a mirror space, flushed and closed cleanly.
    let devs = mem_disks(5, DISK);
    let pool = create(&devs);
    pool.create_space(&spec(
        "p",
        SPACE,
        Resiliency::Parity { redundancy: 1 },
        Some(4),
    ))
    .unwrap();
    pool.create_space(&spec(
        "m",
        1 << 20,
        Resiliency::Mirror { copies: 2 },
        Some(1),
    ))
    .unwrap();
    let old = pattern(1, SPACE as usize);
    let mirror = pattern(2, 1 << 20);
    pool.open_space("p").unwrap().write_at(0, &old).unwrap();
    pool.open_space("m").unwrap().write_at(0, &mirror).unwrap();
    drop(pool);
    let media: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
    // A clean pool opens read-only, with nothing pending.
    {
        let pool = open(&devs, &[1], true);
        assert_eq!(pool.info().journal.pending_batches, 0);
        assert!(read_all(&pool.open_space("p").unwrap()) == old);
    }
    // One batch of partial-row writes (each part of one data column of its row).
    let writes = [(4096u64, pattern(3, 4096)), (200 << 10, pattern(4, 8192))];
    let mut new = old.clone();
    for (at, d) in &writes {
        new[*at as usize..*at as usize + d.len()].copy_from_slice(d);
    }
    let mut pending_cuts = 0;
    for k in 1.. {
        let g = Group::new(&media, DISK, k);
        let pool = vstor_spaces::Pool::open(g.disks(), &Default::default()).unwrap();
        let space = pool.open_space("p").unwrap();
        g.cut_after(k);
        let mut batch: Vec<Request> = writes
            .iter()
            .map(|(at, d)| Request::write(*at, d))
            .collect();
        batch.push(Request::flush());
        space.submit(&mut batch);
        drop(batch);
        drop((space, pool));
        if !g.cut_happened() {
            break;
        }
        g.power_on();
        let cut = g.media();
        let devs = from_media(&cut, DISK);
        let pending = open(&devs, &[], true).info().journal.pending_batches;
        if pending == 0 {
            continue;
        }
        // The journal holds the committed batch; its in-place writes may or may not have
        // landed. Read-only, with every member and with each one missing: the batch is
        // replayed in memory, so the parity space reads it whole (rows rebuilt from the
        // others agree with it), the mirror space reads as written, and nothing is written.
        pending_cuts += 1;
        assert_eq!(pending, 1, "cut at {k}");
        for lost in [None, Some(0), Some(1), Some(2), Some(3), Some(4)] {
            let skip: Vec<usize> = lost.into_iter().collect();
            let pool = open(&devs, &skip, true);
            let info = pool.info();
            assert_eq!(info.journal.pending_batches, 1);
            assert!(
                info.notes.iter().any(|n| n.contains("replayed in memory")),
                "{:?}",
                info.notes
            );
            assert!(
                read_all(&pool.open_space("p").unwrap()) == new,
                "cut at {k}, lost {lost:?}: a read-only open reads the committed batch"
            );
            assert!(read_all(&pool.open_space("m").unwrap()) == mirror);
            drop(pool);
            let now: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
            assert!(now == cut, "cut at {k}: a read-only open wrote");
        }
        // A member whose checksum area cannot be read (the replay loads the checksum pages
        // its records change): it is failed in memory, the open goes on, and its shards are
        // rebuilt from the others, which the replay made agree.
        for bad in 0..devs.len() {
            let info = open(&devs, &[], true).info();
            let m = &info.members[bad];
            let csum_start = info.data_start + m.slabs * info.slab_size;
            let faulty: Vec<Arc<dyn BlockDevice>> = devs
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    if i != bad {
                        return d.clone();
                    }
                    let f = FaultDevice::new(d.clone());
                    f.add_rule(FaultRule::fail(OpKind::Read).in_range(csum_start..m.capacity));
                    Arc::new(f) as Arc<dyn BlockDevice>
                })
                .collect();
            let pool = open(&faulty, &[], true);
            assert!(
                read_all(&pool.open_space("p").unwrap()) == new,
                "cut at {k}, member {bad} failing: {:?}",
                pool.info().notes
            );
            assert!(read_all(&pool.open_space("m").unwrap()) == mirror);
        }
        // Writable with member 0 missing: the batch is replayed first, the data is right.
        let pool = open(&devs, &[0], false);
        assert_eq!(pool.info().journal.replayed_batches, 1);
        assert!(
            read_all(&pool.open_space("p").unwrap()) == new,
            "cut at {k}: a committed batch replays whole"
        );
        drop(pool);
        // Then read-only opens work and read the same.
        let pool = open(&devs, &[0], true);
        assert_eq!(pool.info().journal.pending_batches, 0);
        assert!(read_all(&pool.open_space("p").unwrap()) == new);
        assert!(read_all(&pool.open_space("m").unwrap()) == mirror);
    }
    assert!(
        pending_cuts > 0,
        "no cut point left a committed batch unapplied"
    );
}
