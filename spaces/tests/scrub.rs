//! Scrub: copies and parity that disagree with the data (corrupted behind the pool's back) are
//! found, counted and rewritten; afterwards the loss of any member gives back the data. (These
//! corrupt a second copy or a parity; tests/checksums.rs corrupts first copies and data
//! columns too, which only the block checksums can tell apart.)

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::BlockDevice;

const SPACE: u64 = 4 << 20;

#[test]
fn scrub_finds_and_repairs_corrupt_copies_and_parity() {
    for (label, res, cols, n) in layouts() {
        if res.tolerates() == 0 {
            continue;
        }
        let devs: Vec<Arc<dyn BlockDevice>> = mem_disks(n, 24 << 20);
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let model = pattern(1, SPACE as usize);
        space.write_at(0, &model).unwrap();
        space.flush().unwrap();
        let clean = pool.scrub(None, &mut |_, _| {}).unwrap();
        assert_eq!(clean.repaired, 0, "{label}: a clean space needed repair");
        assert!(clean.chunks > 0);
        // Corrupt the second copy (mirror) or the first parity (parity) at three places.
        let spots = [8192u64, 1_000_000, 3_000_000];
        for (i, &at) in spots.iter().enumerate() {
            let loc = space.locate(at).unwrap();
            let (m, off) = if loc.parity.is_empty() {
                loc.copies[1]
            } else {
                loc.parity[0]
            };
            let off = off - off % 4096;
            devs[m]
                .write_at(off, &pattern(100 + i as u64, 4096))
                .unwrap();
        }
        let mut calls = 0;
        let report = pool.scrub(Some("s"), &mut |_, _| calls += 1).unwrap();
        assert!(calls > 1);
        assert!((1..=3).contains(&report.repaired), "{label}: {report:?}");
        assert_eq!(report.unverifiable, 0);
        assert_eq!(
            pool.scrub(None, &mut |_, _| {}).unwrap().repaired,
            0,
            "{label}"
        );
        drop((space, pool));
        for lost in 0..n {
            let p = open(&devs, &[lost], true);
            let mut back = vec![0u8; SPACE as usize];
            p.open_space("s").unwrap().read_at(0, &mut back).unwrap();
            assert!(back == model, "{label}: without member {lost} after scrub");
        }
    }
}

#[test]
fn locate_names_distinct_members() {
    for (label, res, cols, n) in layouts() {
        let devs = mem_disks(n, 24 << 20);
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        assert!(
            space.locate(0).is_none(),
            "{label}: a thin hole has no place"
        );
        space.write_at(0, &[1u8; 4096]).unwrap();
        let loc = space.locate(100).unwrap();
        let mut members: Vec<usize> = loc.copies.iter().chain(&loc.parity).map(|x| x.0).collect();
        let k = members.len();
        members.sort_unstable();
        members.dedup();
        assert_eq!(members.len(), k, "{label}: {loc:?}");
        let copies = match res {
            vstor_spaces::Resiliency::Mirror { copies } => usize::from(copies),
            _ => 1,
        };
        assert_eq!(loc.copies.len(), copies, "{label}");
        assert_eq!(
            loc.parity.len(),
            if copies == 1 { res.tolerates() } else { 0 }
        );
        assert!(space.locate(SPACE).is_none());
    }
}
