//! Tampering with a member behind the pool's back, on mirror, 3-way mirror, parity and dual
//! parity: an old copy of the member put back, a range of it wiped (data and checksums), or
//! blocks moved within it together with their checksum entries. Then every read is right or
//! fails with a clear error, scrub never makes anything worse, and the data the model holds
//! survives (with one member tampered and redundancy left, all of it, and the other members
//! hold it without the tampered one after the scrub).

mod common;

use common::*;
use proptest::prelude::*;
use vstor_core::BlockDevice;
use vstor_spaces::{csum, Pool, Resiliency, SpacesError};

const DISK: u64 = 8 << 20;
const SPACE: u64 = 1 << 20;
const READ: usize = 16 << 10;

#[derive(Debug, Clone)]
enum Tamper {
    /// Put back the copy of the member taken before the second round of writes.
    Restore,
    /// Zero `len` bytes at `at` (fractions of the member's used data) and their entries.
    Wipe { at: u16, len: u16 },
    /// Copy `n` blocks from one place of a slab to another, entries with them.
    Move { from: u16, to: u16, n: u8 },
}

fn layout(i: usize) -> (&'static str, Resiliency, usize, usize) {
    [
        ("mirror2", Resiliency::Mirror { copies: 2 }, 1, 3),
        ("mirror3", Resiliency::Mirror { copies: 3 }, 1, 4),
        ("parity1", Resiliency::Parity { redundancy: 1 }, 3, 4),
        ("parity2", Resiliency::Parity { redundancy: 2 }, 4, 5),
    ][i]
}

fn write_some(pool: &Pool, model: &mut [u8], writes: &[(u32, u16, u8)]) {
    let space = pool.open_space("s").unwrap();
    for &(at, len, v) in writes {
        let at = u64::from(at) % SPACE / 512 * 512;
        let len = (u64::from(len) * 512).clamp(512, SPACE - at);
        let data = vec![v; len as usize];
        space.write_at(at, &data).unwrap();
        model[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    space.flush().unwrap();
}

/// Reads the space in pieces: each is right or fails with a clear error. Returns the pieces
/// that failed.
fn check_reads(pool: &Pool, model: &[u8], what: &str) -> Vec<usize> {
    let space = pool.open_space("s").unwrap();
    let mut failed = Vec::new();
    for (i, want) in model.chunks(READ).enumerate() {
        let mut got = vec![0u8; READ];
        match space.read_at((i * READ) as u64, &mut got) {
            Ok(()) => assert!(got == want, "{what}: piece {i} read wrong data"),
            Err(e) => {
                let clear = matches!(&e, vstor_core::Error::Layer(l) if matches!(
                    l.downcast_ref::<SpacesError>(),
                    Some(SpacesError::ChecksumMismatch { .. } | SpacesError::SpaceFailed { .. })
                ));
                assert!(clear, "{what}: piece {i}: unexpected error {e}");
                if std::env::var("TAMPER_DEBUG").is_ok() {
                    eprintln!("{what}: piece {i}: {e}");
                }
                failed.push(i);
            }
        }
    }
    failed
}

/// The byte offset on a member of the checksum entry of the block at `off` on it.
fn entry_of(info: &vstor_spaces::PoolInfo, m: usize, off: u64) -> u64 {
    let (ds, slab) = (info.data_start, info.slab_size);
    let rel = off - ds;
    csum::area_start(ds, slab, info.members[m].slabs as u32)
        + (rel / slab) * (slab / 512) * 4
        + (rel % slab) / 512 * 4
}

/// Copies `n` entries of 4 bytes from `from` to `to` on `dev` (`None`: zeroes them).
fn set_entries(dev: &dyn BlockDevice, from: Option<u64>, to: u64, n: u64) {
    for k in 0..n {
        let v = match from {
            Some(f) => {
                let mut p = vec![0u8; 4096];
                let e = f + 4 * k;
                dev.read_at(e & !4095, &mut p).unwrap();
                p[(e % 4096) as usize..(e % 4096) as usize + 4].to_vec()
            }
            None => vec![0u8; 4],
        };
        let e = to + 4 * k;
        let mut p = vec![0u8; 4096];
        dev.read_at(e & !4095, &mut p).unwrap();
        p[(e % 4096) as usize..(e % 4096) as usize + 4].copy_from_slice(&v);
        dev.write_at(e & !4095, &p).unwrap();
    }
}

fn run(
    lay: usize,
    victim: usize,
    first: Vec<(u32, u16, u8)>,
    second: Vec<(u32, u16, u8)>,
    tamper: Tamper,
) {
    let (label, res, cols, n) = layout(lay);
    let what = format!("{label} member {} {tamper:?}", victim % n);
    let victim = victim % n;
    let devs = mem_disks(n, DISK);
    let pool = create(&devs);
    pool.create_space(&spec("s", SPACE, res, Some(cols)))
        .unwrap();
    let mut model = vec![0u8; SPACE as usize];
    write_some(&pool, &mut model, &first);
    drop(pool);
    let old = contents(&*devs[victim]);
    let pool = open(&devs, &[], false);
    write_some(&pool, &mut model, &second);
    // Where the victim's data is: the member offsets of its blocks that hold the space.
    let space = pool.open_space("s").unwrap();
    let mut mine: Vec<u64> = (0..SPACE)
        .step_by(512)
        .filter_map(|at| {
            let loc = space.locate(at)?;
            loc.copies
                .iter()
                .chain(&loc.parity)
                .find(|c| c.0 == victim)
                .map(|c| c.1 - c.1 % 512)
        })
        .collect();
    mine.sort_unstable();
    mine.dedup();
    let info = pool.info();
    drop((space, pool));
    let dev = &devs[victim];
    match tamper {
        Tamper::Restore => dev.write_at(0, &old).unwrap(),
        Tamper::Wipe { at, len } if !mine.is_empty() => {
            let i = usize::from(at) * mine.len() / 65536;
            let blocks = (1 + usize::from(len) % 256).min(mine.len() - i);
            for &b in &mine[i..i + blocks] {
                dev.write_at(b, &[0u8; 512]).unwrap();
                set_entries(&**dev, None, entry_of(&info, victim, b), 1);
            }
        }
        Tamper::Move { from, to, n: cnt } if mine.len() > 1 => {
            let f = usize::from(from) * mine.len() / 65536;
            let mut t = usize::from(to) * mine.len() / 65536;
            if t == f {
                t = (f + 1) % mine.len();
            }
            let cnt = (1 + usize::from(cnt) % 8).min(mine.len() - f.max(t));
            for k in 0..cnt {
                let (a, b) = (mine[f + k], mine[t + k]);
                if a == b {
                    continue;
                }
                let mut blk = vec![0u8; 512];
                dev.read_at(a, &mut blk).unwrap();
                dev.write_at(b, &blk).unwrap();
                set_entries(
                    &**dev,
                    Some(entry_of(&info, victim, a)),
                    entry_of(&info, victim, b),
                    1,
                );
            }
        }
        _ => {}
    }
    let pool = open(&devs, &[], false);
    let before = check_reads(&pool, &model, &format!("{what}, before scrub"));
    let report = pool.scrub(None, &mut |_, _| {}).unwrap();
    let after = check_reads(&pool, &model, &format!("{what}, after scrub"));
    // Scrub never makes anything worse.
    assert!(
        after.iter().all(|p| before.contains(p)),
        "{what}: scrub lost pieces {after:?} (before {before:?}); {report:?}"
    );
    // One member tampered, redundancy left: everything the model holds survives.
    assert!(before.is_empty(), "{what}: pieces {before:?} failed");
    assert_eq!(report.lost, 0, "{what}: {report:?}");
    drop(pool);
    // The other members hold it all without the tampered one: scrub spread nothing.
    let pool = open(&devs, &[victim], true);
    assert!(
        check_reads(&pool, &model, &format!("{what}, without the member")).is_empty(),
        "{what}: without the tampered member"
    );
}

fn writes() -> impl Strategy<Value = Vec<(u32, u16, u8)>> {
    proptest::collection::vec((any::<u32>(), 1u16..600, 1u8..=255), 1..5)
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        Just(Tamper::Restore),
        (any::<u16>(), any::<u16>()).prop_map(|(at, len)| Tamper::Wipe { at, len }),
        (any::<u16>(), any::<u16>(), any::<u8>()).prop_map(|(from, to, n)| Tamper::Move {
            from,
            to,
            n
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tampering_with_a_member_is_caught_and_scrub_makes_nothing_worse(
        lay in 0usize..4,
        victim in 0usize..8,
        first in writes(),
        second in writes(),
        t in tamper(),
    ) {
        run(lay, victim, first, second, t);
    }
}

/// Every layout with every kind of tampering, once each (the property test draws more).
#[test]
fn every_layout_with_every_tampering() {
    let w1 = vec![(0, 2048, 0x11), (300_000, 100, 0x22)];
    let w2 = vec![(4096, 1500, 0x33), (700_000, 300, 0x44)];
    let only: Option<usize> = std::env::var("TAMPER_LAY").ok().map(|v| v.parse().unwrap());
    for lay in (0..4).filter(|l| only.is_none_or(|o| o == *l)) {
        for t in [
            Tamper::Restore,
            Tamper::Wipe { at: 1000, len: 200 },
            Tamper::Move {
                from: 100,
                to: 40_000,
                n: 5,
            },
        ] {
            run(lay, 1, w1.clone(), w2.clone(), t);
        }
    }
}
