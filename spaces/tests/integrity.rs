//! The integrity matrix: every resiliency keeps its data through the loss of every single
//! member (and every pair for 3-way mirror and dual parity), refuses I/O beyond that, keeps
//! working degraded, and never trusts a member that missed writes.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::{BlockDevice, FaultDevice, FaultRule, OpKind, Request};
use vstor_spaces::{MemberState, Resiliency, SpaceHealth, SpacesError};

const SPACE: u64 = 6 << 20;
const DISK: u64 = 24 << 20;

/// Writes the whole space in irregular batches (pieces across units, rows and extents).
fn fill(space: &dyn BlockDevice, seed: u64) -> Vec<u8> {
    let data = pattern(seed, space.capacity() as usize);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut pos = 0usize;
    while pos < data.len() {
        let mut batch = Vec::new();
        for _ in 0..8 {
            if pos >= data.len() {
                break;
            }
            let n = (rng.usize(1..48) * 4096).min(data.len() - pos);
            batch.push(Request::write(pos as u64, &data[pos..pos + n]));
            pos += n;
        }
        batch.push(Request::flush());
        space.submit_all(&mut batch).unwrap();
    }
    data
}

fn read_all(space: &dyn BlockDevice) -> vstor_core::Result<Vec<u8>> {
    let mut back = vec![0u8; space.capacity() as usize];
    // Several reads in one batch, of uneven sizes.
    let mut chunks: Vec<&mut [u8]> = Vec::new();
    let mut rest = &mut back[..];
    let mut i = 1;
    while !rest.is_empty() {
        let n = (i * 12288).min(rest.len());
        let (a, b) = rest.split_at_mut(n);
        chunks.push(a);
        rest = b;
        i = i % 7 + 1;
    }
    let mut off = 0u64;
    let mut batch: Vec<Request> = chunks
        .into_iter()
        .map(|c| {
            let r = Request::read(off, c);
            off += r.len();
            r
        })
        .collect();
    space.submit_all(&mut batch)?;
    drop(batch);
    Ok(back)
}

/// Every set of up to `max` members.
fn loss_sets(n: usize, max: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![vec![]];
    let mut all = Vec::new();
    while let Some(set) = out.pop() {
        if !set.is_empty() {
            all.push(set.clone());
        }
        if set.len() < max {
            for m in set.last().map_or(0, |l| l + 1)..n {
                let mut s = set.clone();
                s.push(m);
                out.push(s);
            }
        }
    }
    all
}

#[test]
fn every_tolerated_loss_keeps_the_data_and_more_is_refused() {
    for (label, res, cols, n) in layouts() {
        let devs = mem_disks(n, DISK);
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let model = fill(&pool.open_space("s").unwrap(), 1);
        drop(pool);
        let t = res.tolerates();
        let mut refused = 0;
        for lost in loss_sets(n, t + 1) {
            let p = open(&devs, &lost, true);
            let space = p.open_space("s").unwrap();
            let health = space.health();
            if lost.len() <= t {
                assert!(
                    matches!(health, SpaceHealth::Degraded { .. }),
                    "{label} lost {lost:?}: {health:?}"
                );
                assert!(read_all(&space).unwrap() == model, "{label} lost {lost:?}");
            } else if let SpaceHealth::Failed { reason } = health {
                refused += 1;
                let e = read_all(&space).unwrap_err().to_string();
                assert!(e.contains("is unavailable") && e.contains(&reason), "{e}");
            } else {
                // The lost members held no slab of an extent beyond the tolerance.
                assert!(read_all(&space).unwrap() == model, "{label} lost {lost:?}");
            }
        }
        assert!(
            refused > 0,
            "{label}: no loss beyond the tolerance was refused"
        );
    }
}

#[test]
fn degraded_writes_are_kept_and_the_stale_member_is_not_trusted() {
    for (label, res, cols, n) in layouts() {
        if res.tolerates() == 0 {
            continue;
        }
        for gone in 0..n {
            let devs = mem_disks(n, DISK);
            let pool = create(&devs);
            pool.create_space(&spec("s", SPACE, res, Some(cols)))
                .unwrap();
            let mut model = fill(&pool.open_space("s").unwrap(), 2);
            drop(pool);
            // Write with member `gone` missing.
            let p = open(&devs, &[gone], false);
            let space = p.open_space("s").unwrap();
            let new = pattern(3 + gone as u64, 1 << 20);
            let at = 1_540_096; // not aligned to the interleave or a row
            space.write_at(at as u64, &new).unwrap();
            space.flush().unwrap();
            model[at..at + new.len()].copy_from_slice(&new);
            assert!(read_all(&space).unwrap() == model, "{label} without {gone}");
            drop((space, p));
            // It comes back: its metadata says it failed, so its stale data is not used (a
            // writable open would catch it up: tests/catch_up.rs).
            let p = open(&devs, &[], true);
            let info = p.info();
            assert_eq!(info.members[gone].state, MemberState::Failed, "{label}");
            assert!(!info.members[gone].usable);
            assert!(
                info.notes.iter().any(|n| n.contains("missed the writes")),
                "{label}: {:?}",
                info.notes
            );
            let space = p.open_space("s").unwrap();
            assert!(read_all(&space).unwrap() == model, "{label} back {gone}");
        }
    }
}

#[test]
fn io_errors_fail_the_member_and_the_data_stays_readable() {
    for (label, res, cols, n) in layouts() {
        if res.tolerates() == 0 {
            continue;
        }
        let faults: Vec<Arc<FaultDevice>> = mem_disks(n, DISK)
            .into_iter()
            .map(|d| {
                let f = Arc::new(FaultDevice::new(d));
                f.set_volatile_cache(false).unwrap();
                f
            })
            .collect();
        let devs: Vec<Arc<dyn BlockDevice>> = faults
            .iter()
            .map(|f| f.clone() as Arc<dyn BlockDevice>)
            .collect();
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let mut model = fill(&space, 4);
        faults[1].add_rule(
            FaultRule::fail(OpKind::Read)
                .and(OpKind::Write)
                .and(OpKind::Flush),
        );
        assert!(read_all(&space).unwrap() == model, "{label}");
        assert_eq!(pool.info().members[1].state, MemberState::Failed);
        let new = pattern(5, 300 << 10);
        space.write_at(64 << 10, &new).unwrap();
        space.flush().unwrap();
        model[64 << 10..(64 << 10) + new.len()].copy_from_slice(&new);
        assert!(read_all(&space).unwrap() == model, "{label}");
        drop((space, pool));
        // The errors stop (a path that flapped): the next writable open catches the member
        // up from the write-intent bitmaps, and it holds the writes it missed.
        faults[1].clear_rules();
        let p = open(&devs, &[], false);
        assert_eq!(p.info().members[1].state, MemberState::Healthy, "{label}");
        assert!(
            read_all(&p.open_space("s").unwrap()).unwrap() == model,
            "{label}"
        );
        drop(p);
        for other in (0..n).filter(|&m| m != 1) {
            let p = open(&devs, &[other], true);
            assert!(
                read_all(&p.open_space("s").unwrap()).unwrap() == model,
                "{label}: without member {other}"
            );
        }
        // Errors that go on: the catch-up fails and the member stays failed, unread.
        let p = open(&devs, &[], false);
        let s = p.open_space("s").unwrap();
        faults[1].add_rule(FaultRule::fail(OpKind::Write).and(OpKind::Flush));
        let newer = pattern(6, 64 << 10);
        s.write_at(0, &newer).unwrap();
        s.flush().unwrap();
        model[..newer.len()].copy_from_slice(&newer);
        drop((s, p));
        let p = open(&devs, &[], false);
        let info = p.info();
        assert_eq!(info.members[1].state, MemberState::Failed, "{label}");
        assert!(
            info.notes
                .iter()
                .any(|n| n.contains("cannot be caught up") || n.contains("catching it up failed")),
            "{label}: {:?}",
            info.notes
        );
        assert!(
            read_all(&p.open_space("s").unwrap()).unwrap() == model,
            "{label}"
        );
        faults[1].clear_rules();
    }
}

#[test]
fn a_failed_space_refuses_io_and_nothing_is_written() {
    let devs = mem_disks(4, DISK);
    let pool = create(&devs);
    pool.create_space(&spec(
        "m",
        2 << 20,
        Resiliency::Mirror { copies: 2 },
        Some(1),
    ))
    .unwrap();
    let model = fill(&pool.open_space("m").unwrap(), 6);
    drop(pool);
    // Find two members that hold the two copies of one extent.
    let holders: Vec<usize> = {
        let p = open(&devs, &[], true);
        p.info()
            .members
            .iter()
            .filter(|m| m.slabs_used > 0)
            .map(|m| m.index)
            .collect()
    };
    let lost = [holders[0], holders[1]];
    let before: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
    let p = open(&devs, &lost, false);
    let space = p.open_space("m").unwrap();
    if let SpaceHealth::Failed { .. } = space.health() {
        let e = space.write_at(0, &[1u8; 4096]).unwrap_err();
        match &e {
            vstor_core::Error::Layer(l) => assert!(
                matches!(
                    l.downcast_ref::<SpacesError>(),
                    Some(SpacesError::SpaceFailed { .. })
                ),
                "{e}"
            ),
            _ => panic!("{e}"),
        }
        assert!(space.flush().is_err());
        let after: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
        assert!(before == after, "a refused write changed a disk");
    } else {
        // The two holders hold different extents: every copy is still somewhere.
        assert!(read_all(&space).unwrap() == model);
    }
    drop((space, p));
    let p = open(&devs, &[], true);
    assert!(read_all(&p.open_space("m").unwrap()).unwrap() == model);
}

#[test]
fn spaces_of_one_pool_do_not_share_slabs_and_survive_reopen() {
    let devs = mem_disks(5, DISK);
    let pool = create(&devs);
    let mut models = Vec::new();
    for (i, (label, res, cols, _)) in layouts().into_iter().enumerate() {
        if cols * res.tolerates().max(1) > 5 && matches!(res, Resiliency::Mirror { .. }) {
            continue;
        }
        let cols = cols.min(5);
        pool.create_space(&spec(label, 1 << 20, res, Some(cols)))
            .unwrap();
        models.push((label, fill(&pool.open_space(label).unwrap(), 10 + i as u64)));
    }
    drop(pool);
    let p = open(&devs, &[], true);
    for (label, model) in &models {
        assert!(
            read_all(&p.open_space(label).unwrap()).unwrap() == *model,
            "{label}"
        );
    }
    let used: u64 = p.info().members.iter().map(|m| m.slabs_used).sum();
    let slabs: u64 = p.spaces().iter().map(|s| s.slabs).sum();
    assert_eq!(used, slabs);
}

#[test]
fn write_zeroes_and_discard_read_back_zero_and_leave_holes_unallocated() {
    for (label, res, cols, n) in layouts() {
        let devs = mem_disks(n, DISK);
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        assert!(space.info().supports.write_zeroes && space.info().discard_zeroes);
        space.write_at(8192, &pattern(1, 64 << 10)).unwrap();
        let allocated = pool.space_info("s").unwrap().allocated_extents;
        space.write_zeroes(0, SPACE).unwrap();
        space.discard(4096, 8192).unwrap();
        assert_eq!(
            pool.space_info("s").unwrap().allocated_extents,
            allocated,
            "{label}: zeroing a hole allocated it"
        );
        assert!(read_all(&space).unwrap().iter().all(|&b| b == 0), "{label}");
    }
}
