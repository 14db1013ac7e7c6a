//! Block checksums: bytes corrupted in a member behind the pool's back (in any copy, data
//! column or parity, or in the checksum area itself) are caught on read, served from another
//! copy or rebuilt from parity, and rewritten (self-heal); a scrub finds, repairs and counts
//! them; a simple space fails the read rather than return wrong bytes.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::{BlockDevice, FaultDevice, MemoryDevice};
use vstor_spaces::{csum, IntegrityStats, Pool, Resiliency, SpacesError};

const SPACE: u64 = 4 << 20;
const DISK: u64 = 24 << 20;

/// The (member, member offset) of the first copy's data and, where there is one, of the
/// first parity, of the byte at `at` of the space.
fn places(space: &vstor_spaces::Space, at: u64) -> Vec<(usize, u64)> {
    let loc = space.locate(at).unwrap();
    let mut v = vec![loc.copies[0]];
    v.extend(loc.copies.get(1));
    v.extend(loc.parity.first());
    v
}

/// Fault devices over memory disks (their `corrupt_stored` damages media behind the pool).
fn fault_disks(n: usize) -> (Vec<Arc<FaultDevice>>, Vec<Arc<dyn BlockDevice>>) {
    let f: Vec<Arc<FaultDevice>> = (0..n)
        .map(|_| Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(DISK).unwrap()))))
        .collect();
    let d = f
        .iter()
        .map(|x| x.clone() as Arc<dyn BlockDevice>)
        .collect();
    (f, d)
}

#[test]
fn reads_heal_corrupt_blocks_in_every_copy_and_parity() {
    for (label, res, cols, n) in layouts() {
        if res.tolerates() == 0 {
            continue;
        }
        let (faults, devs) = fault_disks(n);
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let model = pattern(1, SPACE as usize);
        space.write_at(0, &model).unwrap();
        space.flush().unwrap();
        // Damage the first copy of the data (the one a read and the old scrub trust), a second
        // copy or the parity, at spots a block apart, each 100 bytes inside one block.
        let spots = [8192u64, 1_000_000, 3_000_000];
        let mut damaged = Vec::new();
        for (i, &at) in spots.iter().enumerate() {
            for (j, (m, off)) in places(&space, at).into_iter().enumerate() {
                let off = off - off % 512 + 7;
                faults[m]
                    .corrupt_stored(off, 100, 1000 + (i * 4 + j) as u64)
                    .unwrap();
                damaged.push((m, off - 7, at - at % 512));
                if j == 0 && res.tolerates() == 1 {
                    break; // one bad shard per block is all single redundancy rebuilds
                }
            }
        }
        assert!(read_all(&space) == model, "{label}: wrong data read");
        let stats = pool.info().integrity;
        // A mirror read goes to one copy (rotating by row): it finds the bad ones it reads.
        assert!(stats.checksum_errors >= 1, "{label}: {stats:?}");
        assert_eq!(stats.healed, stats.checksum_errors, "{label}: {stats:?}");
        assert_eq!(stats.unrecoverable, 0, "{label}");
        // What the reads found was rewritten: after a flush the media hold the right bytes
        // again there.
        space.flush().unwrap();
        let mut fixed_on_media = 0;
        for &(m, off, at) in &damaged {
            let mut b = [0u8; 512];
            faults[m].inner().read_at(off, &mut b).unwrap();
            let loc = space.locate(at).unwrap();
            let want = if loc.parity.iter().any(|p| p.0 == m) {
                continue;
            } else {
                &model[at as usize..at as usize + 512]
            };
            fixed_on_media += u64::from(b[..] == *want);
        }
        assert!(fixed_on_media >= 1, "{label}: {damaged:?} {stats:?}");
        // Reading again finds nothing new; a scrub finds the rest (the copies no read
        // touched) and afterwards nothing is left.
        assert!(read_all(&space) == model);
        assert_eq!(pool.info().integrity.checksum_errors, stats.checksum_errors);
        let rest = pool.scrub(None, &mut |_, _| {}).unwrap();
        assert_eq!(
            stats.checksum_errors + rest.checksum_errors,
            damaged.len() as u64,
            "{label}: {stats:?} {rest:?}"
        );
        assert_eq!(rest.healed, rest.checksum_errors, "{label}");
        let again = pool.scrub(None, &mut |_, _| {}).unwrap();
        assert_eq!(again.checksum_errors, 0, "{label}: {again:?}");
        drop((space, pool));
        for lost in 0..n {
            let p = open(&devs, &[lost], true);
            assert!(
                read_all(&p.open_space("s").unwrap()) == model,
                "{label}: without member {lost}"
            );
        }
    }
}

#[test]
fn scrub_finds_repairs_and_counts_corrupt_blocks() {
    for (label, res, cols, n) in layouts() {
        if res.tolerates() == 0 {
            continue;
        }
        let devs = mem_disks(n, DISK);
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let model = pattern(2, SPACE as usize);
        space.write_at(0, &model).unwrap();
        space.flush().unwrap();
        // One whole 4 KiB page of garbage in the first copy (8 blocks) at each spot, and for a
        // second copy or a parity another 4 KiB elsewhere.
        let spots = [0u64, 600_000, 2_500_000];
        let mut blocks = 0;
        for (i, &at) in spots.iter().enumerate() {
            let p = places(&space, at);
            let (m, off) = p[0];
            devs[m]
                .write_at(off - off % 4096, &pattern(50 + i as u64, 4096))
                .unwrap();
            let (m2, off2) = places(&space, at + 64 * 1024)[1];
            devs[m2]
                .write_at(off2 - off2 % 4096, &pattern(60 + i as u64, 4096))
                .unwrap();
            blocks += 16;
        }
        let report = pool.scrub(Some("s"), &mut |_, _| {}).unwrap();
        assert_eq!(report.checksum_errors, blocks, "{label}: {report:?}");
        assert_eq!(report.healed, blocks, "{label}: {report:?}");
        assert_eq!(report.lost, 0, "{label}");
        assert!(report.repaired >= 1, "{label}: {report:?}");
        assert_eq!(
            pool.info().integrity,
            IntegrityStats {
                checksum_errors: blocks,
                healed: blocks,
                unrecoverable: 0
            }
        );
        let clean = pool.scrub(None, &mut |_, _| {}).unwrap();
        assert_eq!((clean.checksum_errors, clean.repaired), (0, 0), "{label}");
        // Every copy and parity is whole again: reads find nothing; any single loss reads back.
        assert!(read_all(&space) == model, "{label}");
        assert_eq!(pool.info().integrity.checksum_errors, blocks, "{label}");
        drop((space, pool));
        for lost in 0..n {
            let p = open(&devs, &[lost], true);
            assert!(
                read_all(&p.open_space("s").unwrap()) == model,
                "{label}: without member {lost} after scrub"
            );
        }
    }
}

#[test]
fn a_damaged_checksum_entry_is_rewritten_not_the_data() {
    for (label, res, cols, n) in [
        ("mirror2", Resiliency::Mirror { copies: 2 }, 1, 3),
        ("parity1", Resiliency::Parity { redundancy: 1 }, 3, 3),
    ] {
        let devs = mem_disks(n, DISK);
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let model = pattern(3, SPACE as usize);
        space.write_at(0, &model).unwrap();
        space.flush().unwrap();
        let info = pool.info();
        let (m, off) = places(&space, 12_288)[0];
        let slab = (off - info.data_start) / SLAB;
        let slabs = info.members[m].slabs;
        let entry = csum::area_start(info.data_start, SLAB, slabs as u32)
            + (slab * (SLAB / 512) + (off - info.data_start) % SLAB / 512) * 4;
        drop((space, pool));
        let mut b = [0u8; 512];
        let page = entry - entry % 512;
        devs[m].read_at(page, &mut b).unwrap();
        b[(entry - page) as usize] ^= 0x5a;
        devs[m].write_at(page, &b).unwrap();
        let pool = open(&devs, &[], false);
        let space = pool.open_space("s").unwrap();
        assert!(read_all(&space) == model, "{label}");
        let s = pool.info().integrity;
        assert_eq!((s.checksum_errors, s.healed), (1, 1), "{label}: {s:?}");
        let again = pool.scrub(None, &mut |_, _| {}).unwrap();
        assert_eq!(
            again.checksum_errors, 0,
            "{label}: the entry was not rewritten"
        );
    }
}

#[test]
fn dual_parity_heals_two_bad_shards_and_one_with_a_member_missing() {
    let devs = mem_disks(6, DISK);
    let pool = create(&devs);
    pool.create_space(&spec(
        "s",
        SPACE,
        Resiliency::Parity { redundancy: 2 },
        Some(5),
    ))
    .unwrap();
    let space = pool.open_space("s").unwrap();
    let model = pattern(4, SPACE as usize);
    space.write_at(0, &model).unwrap();
    space.flush().unwrap();
    // Two data columns of one row damaged at the same offset.
    let a = space.locate(40_960).unwrap();
    let b = space.locate(40_960 - INTERLEAVE).unwrap();
    assert_eq!(a.row, b.row);
    for (m, off) in [a.copies[0], b.copies[0]] {
        devs[m].write_at(off, &[0xee; 512]).unwrap();
    }
    let mut got = vec![0u8; 512];
    space.read_at(40_960, &mut got).unwrap();
    assert!(got[..] == model[40_960..41_472]);
    assert_eq!(pool.info().integrity.healed, 2);
    // With a member missing, a bad block elsewhere is still rebuilt (one erasure + one bad).
    let c = space.locate(1_500_000).unwrap();
    let gone = (0..6)
        .find(|m| *m != c.copies[0].0 && c.parity.iter().all(|p| p.0 != *m))
        .unwrap();
    pool.fail_member(gone).unwrap();
    let (m, off) = c.copies[0];
    devs[m].write_at(off - off % 512, &[0x11; 512]).unwrap();
    assert!(read_all(&space) == model);
    assert_eq!(pool.info().integrity.unrecoverable, 0);
}

#[test]
fn simple_space_fails_a_read_of_a_corrupt_block() {
    let devs = mem_disks(2, DISK);
    let pool = create(&devs);
    pool.create_space(&spec("s", SPACE, Resiliency::Simple, Some(2)))
        .unwrap();
    let space = pool.open_space("s").unwrap();
    let model = pattern(5, SPACE as usize);
    space.write_at(0, &model).unwrap();
    let (m, off) = space.locate(70_000).unwrap().copies[0];
    devs[m].write_at(off - off % 512, &[0u8; 512]).unwrap();
    let mut b = vec![0u8; 4096];
    let e = space.read_at(69_632, &mut b).unwrap_err();
    match &e {
        vstor_core::Error::Layer(l) => assert!(
            matches!(
                l.downcast_ref::<SpacesError>(),
                Some(SpacesError::ChecksumMismatch { .. })
            ),
            "{e}"
        ),
        other => panic!("unexpected error {other}"),
    }
    assert_eq!(pool.info().integrity.unrecoverable, 1);
    // Other blocks read fine; the scrub reports the lost block.
    space.read_at(0, &mut b).unwrap();
    assert!(b[..] == model[..4096]);
    let r = pool.scrub(None, &mut |_, _| {}).unwrap();
    assert_eq!((r.checksum_errors, r.lost), (1, 1), "{r:?}");
}

#[test]
fn a_pool_of_format_version_1_is_refused_with_a_clear_error() {
    let devs = mem_disks(2, DISK);
    drop(create(&devs));
    for d in &devs {
        for slot in [0u64, 1 << 20] {
            let mut b = vec![0u8; 4096];
            d.read_at(slot, &mut b).unwrap();
            b[8..12].copy_from_slice(&1u32.to_le_bytes());
            vstor_spaces::format::reseal(&mut b);
            d.write_at(slot, &b).unwrap();
        }
    }
    let e = Pool::open(named(&devs), &Default::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("format version 1") && msg.contains("m0"),
        "{msg}"
    );
    // Nothing was written: the old metadata is still there.
    let mut b = vec![0u8; 512];
    devs[0].read_at(0, &mut b).unwrap();
    assert_eq!(&b[8..12], &1u32.to_le_bytes());
}

#[test]
fn a_read_only_pool_serves_good_data_without_writing() {
    for (label, res, cols, n) in [
        ("mirror2", Resiliency::Mirror { copies: 2 }, 1, 2),
        ("parity1", Resiliency::Parity { redundancy: 1 }, 3, 3),
    ] {
        let (faults, devs) = fault_disks(n);
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let model = pattern(6, SPACE as usize);
        space.write_at(0, &model).unwrap();
        space.flush().unwrap();
        let (m, off) = places(&space, 100_000)[0];
        drop((space, pool));
        faults[m].corrupt_stored(off - off % 512, 512, 9).unwrap();
        let before: Vec<Vec<u8>> = faults.iter().map(|f| contents(&**f.inner())).collect();
        for f in &faults {
            f.add_rule(vstor_core::FaultRule::fail(vstor_core::OpKind::Write));
        }
        let pool = open(&devs, &[], true);
        let space = pool.open_space("s").unwrap();
        for _ in 0..2 {
            assert!(read_all(&space) == model, "{label}");
        }
        let s = pool.info().integrity;
        assert_eq!((s.checksum_errors, s.healed), (1, 1), "{label}: {s:?}");
        let after: Vec<Vec<u8>> = faults.iter().map(|f| contents(&**f.inner())).collect();
        assert!(before == after, "{label}: a read-only pool wrote");
    }
}

#[test]
fn a_rebuild_heals_bad_source_blocks_and_keeps_a_lost_block_failing() {
    for (label, res, cols, n) in [
        ("mirror3", Resiliency::Mirror { copies: 3 }, 1, 3),
        ("mirror2", Resiliency::Mirror { copies: 2 }, 1, 2),
        ("parity1", Resiliency::Parity { redundancy: 1 }, 3, 3),
    ] {
        let (faults, devs) = fault_disks(n);
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let model = pattern(8, SPACE as usize);
        space.write_at(0, &model).unwrap();
        space.flush().unwrap();
        // The member to lose holds the last copy (mirror) or the parity (parity) of the byte
        // at `at`; the block at `at` is damaged in the first copy (the data column).
        let at = 1_000_000u64;
        let loc = space.locate(at).unwrap();
        let lost = loc
            .parity
            .first()
            .copied()
            .unwrap_or(*loc.copies.last().unwrap())
            .0;
        let (m, off) = loc.copies[0];
        assert_ne!(m, lost, "{label}");
        drop((space, pool));
        faults[m].corrupt_stored(off - off % 512, 512, 77).unwrap();
        let pool = open(&devs, &[lost], false);
        let spare: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(DISK).unwrap());
        pool.add_disk(vstor_spaces::PoolDisk::new("spare", spare.clone()))
            .unwrap();
        let report = pool.repair(None, &mut |_, _| {}).unwrap();
        assert!(report.slabs >= 1, "{label}: {report:?}");
        let space = pool.open_space("s").unwrap();
        let block = at - at % 512;
        let mut b = vec![0u8; 512];
        if label == "mirror3" {
            // A good copy was left: the rebuild healed the source and copied good bytes.
            assert!(read_all(&space) == model, "{label}");
            let s = pool.info().integrity;
            assert!(s.healed >= 1 && s.unrecoverable == 0, "{label}: {s:?}");
            continue;
        }
        // No good source was left for that block: the rebuilt copy or data block must not
        // come with a fresh checksum over the bad bytes. Every read of it fails (whichever
        // copy it goes to); the blocks around it read right.
        for _ in 0..2 {
            let e = space.read_at(block, &mut b).unwrap_err();
            assert!(
                matches!(
                    &e,
                    vstor_core::Error::Layer(l)
                        if matches!(l.downcast_ref::<SpacesError>(), Some(SpacesError::ChecksumMismatch { .. }))
                ),
                "{label}: {e}"
            );
        }
        space.read_at(block + 4096, &mut b).unwrap();
        assert!(b[..] == model[(block + 4096) as usize..(block + 4608) as usize]);
        drop((space, pool));
        if label == "mirror2" {
            // With only the new copy left, it alone still says the block is bad.
            let mut disks = without(&devs, &[lost, m]);
            disks.push(vstor_spaces::PoolDisk::new("spare", spare.clone()));
            let p = Pool::open(disks, &Default::default()).unwrap();
            let space = p.open_space("s").unwrap();
            assert!(space.read_at(block, &mut b).is_err(), "{label}");
            space.read_at(0, &mut b).unwrap();
            assert!(b[..] == model[..512]);
        }
    }
}

/// The cache of checksum pages holds to its limit, and a cache far smaller than the data keeps
/// every check right: threads writing and reading their own regions at once (pages dropped and
/// read again all the time, while page writes are in flight) see their data with no checksum
/// error; damage is still caught and healed; a reopened pool agrees.
#[test]
fn a_small_checksum_cache_stays_small_and_right() {
    let devs = mem_disks(4, DISK);
    let pool = create(&devs);
    let size = 8u64 << 20;
    pool.create_space(&spec("m", size, Resiliency::Mirror { copies: 2 }, Some(2)))
        .unwrap();
    pool.create_space(&spec(
        "p",
        size,
        Resiliency::Parity { redundancy: 1 },
        Some(4),
    ))
    .unwrap();
    // 4 pages: the checksums of 2 MiB of one member's data.
    let limit = 4 * csum::PAGE;
    pool.set_checksum_cache_limit(limit);
    std::thread::scope(|sc| {
        for name in ["m", "p"] {
            for t in 0..2u64 {
                let pool = &pool;
                sc.spawn(move || {
                    let space = pool.open_space(name).unwrap();
                    let region = size / 2;
                    let base = t * region;
                    let mut model = vec![0u8; region as usize];
                    for round in 0..6u64 {
                        // Writes of mixed sizes over the region, then every earlier write read
                        // back, so pages are dropped between a write and its read.
                        let mut at = (round * 12_288) % 65_536;
                        while at + 65_536 <= region {
                            let len = [4096u64, 12_288, 65_536][(at / 4096 % 3) as usize];
                            let data = pattern(round * 1000 + at + t, len as usize);
                            space.write_at(base + at, &data).unwrap();
                            model[at as usize..(at + len) as usize].copy_from_slice(&data);
                            at += len + 131_072;
                        }
                        let mut back = vec![0u8; region as usize];
                        space.read_at(base, &mut back).unwrap();
                        assert!(back == model, "{name} region {t} round {round}");
                    }
                });
            }
        }
    });
    assert!(
        pool.checksum_cache_bytes() <= limit,
        "cache holds {} bytes, limit {limit}",
        pool.checksum_cache_bytes()
    );
    assert_eq!(pool.info().integrity, IntegrityStats::default());
    // Damage is still caught (its page read again) and healed: in both copies, a block
    // apart, so whichever copy a read takes meets one.
    let space = pool.open_space("m").unwrap();
    let all = read_all(&space);
    let loc = space.locate(5 << 20).unwrap();
    for (k, &(m, off)) in loc.copies.iter().enumerate() {
        let at = off - off % 512 + k as u64 * 4096;
        let mut junk = vec![0u8; 512];
        devs[m].read_at(at, &mut junk).unwrap();
        junk.iter_mut().for_each(|b| *b = !*b);
        devs[m].write_at(at, &junk).unwrap();
    }
    pool.set_checksum_cache_limit(csum::PAGE);
    assert!(read_all(&space) == all);
    let report = pool.scrub(None, &mut |_, _| {}).unwrap();
    let seen = pool.info().integrity.checksum_errors + report.checksum_errors;
    assert!(seen >= 2, "both damaged blocks found ({seen})");
    assert_eq!(report.lost, 0);
    assert!(read_all(&space) == all);
    drop(space);
    drop(pool);
    let pool = open(&devs, &[], false);
    pool.set_checksum_cache_limit(csum::PAGE);
    for name in ["m", "p"] {
        let space = pool.open_space(name).unwrap();
        read_all(&space);
    }
    assert_eq!(pool.info().integrity.checksum_errors, 0);
    assert_eq!(pool.scrub(None, &mut |_, _| {}).unwrap().checksum_errors, 0);
}
