//! Members whose data is older than the pool's (an old copy of a member put back, a disk
//! pulled and returned) and members that lost their contents (data and checksum area read as
//! zeroes) are never read as current: reads return what was last written or fail with a
//! clear error, and scrub never copies their contents over good copies or parity.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::BlockDevice;
use vstor_spaces::{csum, OpenOptions, Pool, Provisioning, Resiliency, SpaceSpec, SpacesError};

const DISK: u64 = 24 << 20;
const SPACE: u64 = 6 << 20;

fn space_spec(res: Resiliency, cols: usize, provisioning: Provisioning) -> SpaceSpec {
    SpaceSpec {
        provisioning,
        ..spec("s", SPACE, res, Some(cols))
    }
}

fn set_contents(dev: &Arc<dyn BlockDevice>, media: &[u8]) {
    dev.write_at(0, media).unwrap();
}

/// The reproduction of issue 20 §1, through the library: write 0xaa, copy member 0 aside,
/// write 0xbb (flushed), put the old member 0 back with the pool closed. Every read returns
/// 0xbb, the member is called stale (and recorded failed by a writable open), scrub changes
/// nothing for the worse, and once the old member is rebuilt every copy holds 0xbb. For every
/// redundant layout, thin and fixed (a fixed space's writes change no metadata).
#[test]
fn a_member_put_back_from_an_old_copy_is_never_read() {
    for (label, res, cols, n) in redundant() {
        for prov in [Provisioning::Thin, Provisioning::Fixed] {
            let devs = mem_disks(n, DISK);
            let pool = create(&devs);
            pool.create_space(&space_spec(res, cols, prov)).unwrap();
            let space = pool.open_space("s").unwrap();
            space
                .write_at(0, &vec![0xaa; (SPACE / 4) as usize])
                .unwrap();
            drop((space, pool));
            let old = contents(&*devs[0]);
            let pool = open(&devs, &[], false);
            let space = pool.open_space("s").unwrap();
            space.write_at(0, &vec![0xbb; SPACE as usize]).unwrap();
            space.flush().unwrap();
            drop((space, pool));
            set_contents(&devs[0], &old);
            let want = vec![0xbb; SPACE as usize];

            // Read-only: the stale member is not read, and nothing is written.
            let before: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
            let pool = open(&devs, &[], true);
            let info = pool.info();
            assert!(
                info.notes
                    .iter()
                    .any(|n| n.contains("member 0") && n.contains("stale")),
                "{label} {prov:?}: {:?}",
                info.notes
            );
            assert!(!info.members[0].usable, "{label} {prov:?}");
            assert!(
                read_all(&pool.open_space("s").unwrap()) == want,
                "{label} {prov:?}: a read-only open served the stale member"
            );
            drop(pool);
            let after: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
            assert!(before == after, "{label} {prov:?}: a read-only open wrote");

            // Writable: recorded failed, reads and scrub right.
            let pool = open(&devs, &[], false);
            assert_eq!(
                pool.info().members[0].state,
                vstor_spaces::MemberState::Failed,
                "{label} {prov:?}"
            );
            let space = pool.open_space("s").unwrap();
            assert!(
                read_all(&space) == want,
                "{label} {prov:?}: stale data read"
            );
            let report = pool.scrub(None, &mut |_, _| {}).unwrap();
            assert_eq!(report.lost, 0, "{label} {prov:?}: {report:?}");
            assert!(read_all(&space) == want, "{label} {prov:?}: after scrub");
            drop((space, pool));
            // The next open still does not trust it (it is recorded failed now).
            let pool = open(&devs, &[], false);
            assert!(!pool.info().members[0].usable, "{label} {prov:?}");
            assert!(read_all(&pool.open_space("s").unwrap()) == want);
            // Rebuilt whole: taken back as a fresh member and repaired onto.
            let new = pool.reuse_member(0).unwrap();
            pool.repair(None, &mut |_, _| {}).unwrap();
            pool.remove_member(0).unwrap();
            assert!(pool.info().members[new].usable);
            drop(pool);
            // Every remaining member holds good data: any one the layout tolerates losing
            // can go, and the data reads right.
            for lost in 1..n {
                let pool = open(&devs, &[lost], true);
                assert!(
                    read_all(&pool.open_space("s").unwrap()) == want,
                    "{label} {prov:?}: without member {lost} after the rebuild"
                );
            }
        }
    }
}

/// A copy of a member taken while the pool was open (after some writes) and put back after a
/// clean close is stale too: the close moves the write epoch on.
#[test]
fn a_copy_taken_while_the_pool_was_open_is_stale_after_a_clean_close() {
    for (label, res, cols, n) in redundant() {
        let devs = mem_disks(n, DISK);
        let pool = create(&devs);
        pool.create_space(&space_spec(res, cols, Provisioning::Fixed))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        space.write_at(0, &vec![0xaa; SPACE as usize]).unwrap();
        space.flush().unwrap();
        let old = contents(&*devs[1]);
        space.write_at(0, &vec![0xbb; SPACE as usize]).unwrap();
        space.flush().unwrap();
        drop((space, pool));
        set_contents(&devs[1], &old);
        let pool = open(&devs, &[], false);
        assert!(!pool.info().members[1].usable, "{label}");
        let space = pool.open_space("s").unwrap();
        assert!(read_all(&space) == vec![0xbb; SPACE as usize], "{label}");
        pool.scrub(None, &mut |_, _| {}).unwrap();
        assert!(read_all(&space) == vec![0xbb; SPACE as usize], "{label}");
    }
}

/// A pool that is opened and closed without a member missing makes no member stale: a member
/// holds the epoch, or is behind it only if it missed writes. A member missing at an open
/// that writes nothing comes back current.
#[test]
fn members_that_missed_nothing_are_not_stale() {
    let devs = mem_disks(4, DISK);
    let pool = create(&devs);
    pool.create_space(&space_spec(
        Resiliency::Mirror { copies: 2 },
        2,
        Provisioning::Thin,
    ))
    .unwrap();
    let space = pool.open_space("s").unwrap();
    let model = pattern(3, SPACE as usize);
    space.write_at(0, &model).unwrap();
    drop((space, pool));
    for _ in 0..3 {
        let pool = open(&devs, &[], false);
        assert!(pool.info().members.iter().all(|m| m.usable));
        drop(pool);
    }
    // Opened writable with member 2 missing, nothing written: member 2 comes back current.
    drop(open(&devs, &[2], false));
    let pool = open(&devs, &[], false);
    assert!(
        pool.info().members.iter().all(|m| m.usable),
        "{:?}",
        pool.info().notes
    );
    assert!(read_all(&pool.open_space("s").unwrap()) == model);
    drop(pool);
    // With member 2 missing and a write: it is recorded failed before the write, not read
    // when it is back, and caught up by a writable open (tests/catch_up.rs).
    let pool = open(&devs, &[2], false);
    pool.open_space("s")
        .unwrap()
        .write_at(0, &[1u8; 4096])
        .unwrap();
    drop(pool);
    let pool = open(&devs, &[], true);
    assert!(!pool.info().members[2].usable);
    drop(pool);
    let pool = open(&devs, &[], false);
    assert!(
        pool.info().members[2].usable && pool.info().notes.iter().any(|n| n.contains("caught up")),
        "{:?}",
        pool.info().notes
    );
}

/// A crash in the middle of moving the write epoch on (the first of its two updates reached
/// some members only) makes no member stale: nothing was written after it.
#[test]
fn a_torn_epoch_update_makes_no_member_stale() {
    let devs = mem_disks(4, DISK);
    let pool = create(&devs);
    pool.create_space(&space_spec(
        Resiliency::Mirror { copies: 2 },
        2,
        Provisioning::Fixed,
    ))
    .unwrap();
    let space = pool.open_space("s").unwrap();
    let model = pattern(4, SPACE as usize);
    space.write_at(0, &model).unwrap();
    drop((space, pool));
    let before: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
    drop(open(&devs, &[], false));
    // The next open's first update reached members 0 and 1 only: members 2 and 3 as before
    // it. (The open's updates come in pairs; the older of a member's two slots was the
    // target of the first.)
    let after: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
    let seq = |m: &[u8], slot: usize| {
        let at = slot * (1 << 20);
        u64::from_le_bytes(m[at + 24..at + 32].try_into().unwrap())
    };
    let newest = |m: &[u8]| seq(m, 0).max(seq(m, 1));
    let base = newest(&before[0]);
    for (i, d) in devs.iter().enumerate() {
        let mut m = if i < 2 {
            after[i].clone()
        } else {
            before[i].clone()
        };
        if i < 2 {
            // Keep only the first update of the open (sequence base + 1) on members 0, 1.
            let slot = ((base + 1) % 2) as usize;
            let other = 1 - slot;
            assert_eq!(seq(&after[i], slot), base + 3);
            m[other << 20..(other + 1) << 20]
                .copy_from_slice(&before[i][other << 20..(other + 1) << 20]);
            // Slot `slot` held base+3 (the close's first update); put base+1 there as the
            // open's first update wrote it: the metadata of `before` with the sequence moved.
            let mut b = before[i][other << 20..(other << 20) + (1 << 20)].to_vec();
            assert_eq!(seq(&b, 0), base);
            b[24..32].copy_from_slice(&(base + 1).to_le_bytes());
            b[20..24].copy_from_slice(&0u32.to_le_bytes()); // not clean
            vstor_spaces::format::reseal(&mut b);
            m[slot << 20..(slot + 1) << 20].copy_from_slice(&b);
        }
        set_contents(d, &m);
    }
    let pool = open(&devs, &[], false);
    let info = pool.info();
    assert!(info.members.iter().all(|m| m.usable), "{:?}", info.notes);
    assert!(read_all(&pool.open_space("s").unwrap()) == model);
}

/// The reproduction of issue 20 §2, through the library: member 0 reads zeroes past 8 MiB
/// (its data and its checksum area). Reads return the written data (from the other copies or
/// parity) and count the bad blocks; scrub heals them from good sources and loses nothing;
/// with member 0 zeroed, a simple space fails the read instead of returning zeroes.
#[test]
fn a_member_that_reads_zeroes_is_caught_not_served() {
    for (label, res, cols, n) in layouts() {
        let devs = mem_disks(n, DISK);
        let pool = create(&devs);
        pool.create_space(&space_spec(res, cols, Provisioning::Thin))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let model = pattern(9, SPACE as usize);
        space.write_at(0, &model).unwrap();
        drop((space, pool));
        let cut = 8 << 20;
        devs[0]
            .write_at(cut, &vec![0u8; (DISK - cut) as usize])
            .unwrap();
        let pool = open(&devs, &[], false);
        let space = pool.open_space("s").unwrap();
        let mut got = vec![0u8; SPACE as usize];
        let r = space.read_at(0, &mut got);
        if res.tolerates() == 0 {
            let e = r.expect_err(label);
            assert!(
                matches!(&e, vstor_core::Error::Layer(l) if matches!(
                    l.downcast_ref::<SpacesError>(),
                    Some(SpacesError::ChecksumMismatch { .. })
                )),
                "{label}: {e}"
            );
            continue;
        }
        if let Err(e) = r {
            panic!("{label}: {e} {:?}", pool.info().notes);
        }
        assert!(got == model, "{label}: zeroes served");
        assert!(pool.info().integrity.checksum_errors > 0, "{label}");
        let report = pool.scrub(None, &mut |_, _| {}).unwrap();
        assert_eq!(report.lost, 0, "{label}: {report:?}");
        drop((space, pool));
        // Scrub healed member 0 from good sources: any member may go now.
        for lost in 0..n {
            let pool = open(&devs, &[lost], true);
            assert!(
                read_all(&pool.open_space("s").unwrap()) == model,
                "{label}: without member {lost} after the scrub"
            );
        }
    }
}

/// A block moved, together with its checksum entry, to another block of the same member (or
/// to the same place on another member) fails verification.
#[test]
fn a_block_moved_with_its_checksum_entry_is_caught() {
    let devs = mem_disks(4, DISK);
    let pool = create(&devs);
    pool.create_space(&space_spec(
        Resiliency::Mirror { copies: 2 },
        2,
        Provisioning::Thin,
    ))
    .unwrap();
    let space = pool.open_space("s").unwrap();
    let model = pattern(11, SPACE as usize);
    space.write_at(0, &model).unwrap();
    let info = pool.info();
    let (ds, slab) = (info.data_start, info.slab_size);
    let (m, from) = space.locate(0).unwrap().copies[0];
    let (m2, to) = space.locate(4096).unwrap().copies[0];
    assert_eq!(m, m2);
    let entry = |off: u64| {
        let slabs = info.members[m].slabs as u32;
        let rel = off - ds;
        csum::area_start(ds, slab, slabs) + (rel / slab) * (slab / 512) * 4 + (rel % slab) / 512 * 4
    };
    drop((space, pool));
    // Block at `from` (and its entry) copied over the block at `to` (and its entry).
    let mut b = vec![0u8; 512];
    devs[m].read_at(from, &mut b).unwrap();
    devs[m].write_at(to, &b).unwrap();
    let mut page = vec![0u8; 4096];
    let (ef, et) = (entry(from), entry(to));
    devs[m].read_at(ef & !4095, &mut page).unwrap();
    let v = page[(ef % 4096) as usize..(ef % 4096) as usize + 4].to_vec();
    devs[m].read_at(et & !4095, &mut page).unwrap();
    page[(et % 4096) as usize..(et % 4096) as usize + 4].copy_from_slice(&v);
    devs[m].write_at(et & !4095, &page).unwrap();
    let pool = open(&devs, &[], true);
    let space = pool.open_space("s").unwrap();
    assert!(read_all(&space) == model, "the moved block was served");
    // Both copies of offset 4096 read from their own member: the one on m fails its check.
    let report = {
        drop((space, pool));
        let pool = open(&devs, &[], false);
        let r = pool.scrub(None, &mut |_, _| {}).unwrap();
        assert!(read_all(&pool.open_space("s").unwrap()) == model);
        r
    };
    assert!(report.checksum_errors >= 1, "{report:?}");
    assert_eq!(report.lost, 0, "{report:?}");
}

/// Keys differ by member and position, and a wiped entry (0) does not match a zero block.
#[test]
fn checksum_keys_bind_member_and_position() {
    let p = uuid::Uuid::from_u128(1);
    let a = csum::member_seed(&p, &uuid::Uuid::from_u128(2));
    let b = csum::member_seed(&p, &uuid::Uuid::from_u128(3));
    assert_ne!(a, b);
    assert_ne!(a, 0);
    assert_eq!(csum::entry_key(0, 5), 0, "unkeyed: the old rule");
    let keys: std::collections::HashSet<u32> = (0..10_000).map(|i| csum::entry_key(a, i)).collect();
    assert!(keys.len() > 9_990);
    assert!(!keys.contains(&0) || keys.len() > 9_990);
    assert_ne!(csum::entry_key(a, 7), csum::entry_key(b, 7));
}

/// Opening with `Pool::open` keeps working on devices handed over directly (a sanity check
/// that the write epoch moves on at a writable open and on a clean close).
#[test]
fn a_writable_open_and_a_clean_close_move_the_epoch() {
    let devs = mem_disks(3, DISK);
    let pool = create(&devs);
    let s0 = pool.info().sequence;
    drop(pool);
    let pool = Pool::open(named(&devs), &OpenOptions::default()).unwrap();
    let s1 = pool.info().sequence;
    assert!(s1 >= s0 + 4, "{s0} {s1}");
    drop(pool);
    let pool = open(&devs, &[], true);
    assert!(pool.info().sequence >= s1 + 2);
}

/// A power cut at every write of a writable open (its two epoch updates, torn or not) and
/// then of its first data write: the reopened pool calls no member stale that missed nothing
/// (every member usable), and the data is the old or the new.
#[test]
fn power_cuts_while_the_epoch_moves_make_no_member_stale() {
    let devs = mem_disks(4, DISK);
    let pool = create(&devs);
    pool.create_space(&space_spec(
        Resiliency::Mirror { copies: 2 },
        2,
        Provisioning::Fixed,
    ))
    .unwrap();
    let old = pattern(21, SPACE as usize);
    pool.open_space("s").unwrap().write_at(0, &old).unwrap();
    drop(pool);
    let media: Vec<Vec<u8>> = devs.iter().map(|d| contents(&**d)).collect();
    let new = pattern(22, 64 << 10);
    let mut cuts = 0;
    for k in 1.. {
        let g = Group::new(&media, DISK, k);
        g.cut_after(k);
        let opened = Pool::open(g.disks(), &OpenOptions::default());
        if let Ok(pool) = opened {
            if let Ok(s) = pool.open_space("s") {
                let _ = s.write_at(0, &new).and_then(|()| s.flush());
            }
        }
        if !g.cut_happened() {
            break;
        }
        cuts += 1;
        g.power_on();
        let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
        let info = pool.info();
        assert!(
            info.members.iter().all(|m| m.usable),
            "cut at {k}: {:?}",
            info.notes
        );
        let got = read_all(&pool.open_space("s").unwrap());
        assert!(
            got[new.len()..] == old[new.len()..]
                && (got[..new.len()] == new[..]
                    || got[..new.len()]
                        .chunks(512)
                        .zip(old.chunks(512).zip(new.chunks(512)))
                        .all(|(g, (o, n))| g == o || g == n)),
            "cut at {k}"
        );
    }
    assert!(cuts >= 8, "only {cuts} cut points");
}

/// A pool of format version 3 (block checksums by the old rule, no write epoch) still opens,
/// is read and written with the old rule (a stored value of a zero block is 0), says what it
/// lacks, and stays version 3.
#[test]
fn a_format_version_3_pool_opens_with_the_old_checksum_rule_and_stays_version_3() {
    let devs = mem_disks(4, DISK);
    drop(create(&devs));
    for d in &devs {
        for slot in [0u64, 1 << 20] {
            let mut b = vec![0u8; 4096];
            d.read_at(slot, &mut b).unwrap();
            assert_eq!(&b[8..12], &4u32.to_le_bytes());
            b[8..12].copy_from_slice(&3u32.to_le_bytes());
            b[20..24].fill(0);
            b[120..128].fill(0);
            vstor_spaces::format::reseal(&mut b);
            d.write_at(slot, &b).unwrap();
        }
    }
    let pool = open(&devs, &[], false);
    let info = pool.info();
    assert_eq!(info.format_version, 3);
    assert!(
        info.notes.iter().any(|n| n.contains("format version 3")),
        "{:?}",
        info.notes
    );
    pool.create_space(&space_spec(
        Resiliency::Mirror { copies: 2 },
        2,
        Provisioning::Thin,
    ))
    .unwrap();
    let space = pool.open_space("s").unwrap();
    let model = pattern(31, SPACE as usize);
    space.write_at(0, &model).unwrap();
    // The old rule on the media: the entry of the first block of a copy is its plain CRC.
    let (m, off) = space.locate(0).unwrap().copies[0];
    let (ds, slab) = (info.data_start, info.slab_size);
    let rel = off - ds;
    let entry = csum::area_start(ds, slab, info.members[m].slabs as u32)
        + (rel / slab) * (slab / 512) * 4
        + (rel % slab) / 512 * 4;
    drop((space, pool));
    let mut page = vec![0u8; 4096];
    devs[m].read_at(entry & !4095, &mut page).unwrap();
    let at = (entry % 4096) as usize;
    assert_eq!(
        u32::from_le_bytes(page[at..at + 4].try_into().unwrap()),
        csum::block_crc(&model[..512])
    );
    let pool = open(&devs, &[], false);
    assert_eq!(pool.info().format_version, 3);
    assert!(read_all(&pool.open_space("s").unwrap()) == model);
    drop(pool);
    let pool = open(&devs, &[1], true);
    assert!(read_all(&pool.open_space("s").unwrap()) == model);
}

/// The byte offset on member `m` of the checksum entry of its block at member offset `off`.
fn entry_of(info: &vstor_spaces::PoolInfo, m: usize, off: u64) -> u64 {
    let (ds, slab) = (info.data_start, info.slab_size);
    let rel = off - ds;
    csum::area_start(ds, slab, info.members[m].slabs as u32)
        + (rel / slab) * (slab / 512) * 4
        + (rel % slab) / 512 * 4
}

/// One block of a member rolled back together with its checksum entry (the member's
/// metadata current, so nothing but the block is older): it passes its checksum but
/// disagrees with the rest. Scrub never settles it by slot order: dual parity names the odd
/// shard out and rebuilds it, a 3-way mirror takes what two copies hold; a 2-way mirror and
/// single parity cannot tell, report it undecided and change nothing (the good copy or the
/// parity keeps the written data).
#[test]
fn a_rolled_back_block_is_settled_only_by_what_can_tell() {
    for (label, res, cols, n) in redundant() {
        let devs = mem_disks(n, DISK);
        let pool = create(&devs);
        pool.create_space(&space_spec(res, cols, Provisioning::Fixed))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let at = 64 << 10;
        space.write_at(at, &[0xaa; 4096]).unwrap();
        space.flush().unwrap();
        let info = pool.info();
        let (m, off) = space.locate(at).unwrap().copies[0];
        let e = entry_of(&info, m, off);
        let mut old_block = vec![0u8; 512];
        devs[m].read_at(off, &mut old_block).unwrap();
        let mut old_page = vec![0u8; 4096];
        devs[m].read_at(e & !4095, &mut old_page).unwrap();
        let new = pattern(41, 4096);
        space.write_at(at, &new).unwrap();
        space.flush().unwrap();
        drop((space, pool));
        // Roll back the block and its entry.
        devs[m].write_at(off, &old_block).unwrap();
        let mut page = vec![0u8; 4096];
        devs[m].read_at(e & !4095, &mut page).unwrap();
        let k = (e % 4096) as usize;
        page[k..k + 4].copy_from_slice(&old_page[k..k + 4]);
        devs[m].write_at(e & !4095, &page).unwrap();

        let pool = open(&devs, &[], false);
        let report = pool.scrub(None, &mut |_, _| {}).unwrap();
        let decidable = matches!(
            res,
            Resiliency::Mirror { copies: 3 } | Resiliency::Parity { redundancy: 2 }
        );
        if decidable {
            assert_eq!(report.undecided, 0, "{label}: {report:?}");
            assert!(report.repaired >= 1, "{label}: {report:?}");
            let mut b = vec![0u8; 4096];
            pool.open_space("s").unwrap().read_at(at, &mut b).unwrap();
            assert!(b == new, "{label}: after scrub");
        } else {
            assert!(report.undecided >= 1, "{label}: {report:?}");
        }
        drop(pool);
        // The other members still hold the written data: scrub spread nothing.
        let pool = open(&devs, &[m], true);
        let mut b = vec![0u8; 4096];
        pool.open_space("s").unwrap().read_at(at, &mut b).unwrap();
        assert!(b == new, "{label}: without the rolled-back member");
        drop(pool);
        if decidable {
            // Settled: every member holds it now.
            for lost in 0..n {
                let pool = open(&devs, &[lost], true);
                let mut b = vec![0u8; 4096];
                pool.open_space("s").unwrap().read_at(at, &mut b).unwrap();
                assert!(b == new, "{label}: without member {lost}");
            }
        }
    }
}

/// The clean flag: a pool whose process went away without closing it says so at the next
/// open; after a clean close it does not.
#[test]
fn an_unclean_close_is_noted_at_the_next_open() {
    let devs = mem_disks(3, DISK);
    let pool = create(&devs);
    pool.create_space(&space_spec(
        Resiliency::Mirror { copies: 2 },
        1,
        Provisioning::Thin,
    ))
    .unwrap();
    pool.open_space("s")
        .unwrap()
        .write_at(0, &[5u8; 4096])
        .unwrap();
    drop(pool);
    let unclean = |p: &Pool| {
        p.info()
            .notes
            .iter()
            .any(|n| n.contains("not closed cleanly"))
    };
    let pool = open(&devs, &[], false);
    assert!(!unclean(&pool), "{:?}", pool.info().notes);
    pool.open_space("s")
        .unwrap()
        .write_at(0, &[6u8; 4096])
        .unwrap();
    // The process goes away without closing the pool.
    std::mem::forget(pool);
    let pool = open(&devs, &[], true);
    assert!(unclean(&pool), "{:?}", pool.info().notes);
    let mut b = [0u8; 4096];
    pool.open_space("s").unwrap().read_at(0, &mut b).unwrap();
    assert_eq!(b, [6u8; 4096]);
}
