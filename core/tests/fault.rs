//! Tests of the fault-injecting device: power cuts (with torn writes), armed cuts, failure and
//! corruption rules, stored corruption, latency and the volatile write cache.

use proptest::prelude::*;
use proptest::test_runner::Config;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vstor_core::fault::{CutWrite, Fate, PowerCutReport};
use vstor_core::{
    BlockDevice, CutPolicy, Error, FaultDevice, FaultRule, MemoryDevice, OpKind, Request,
};

/// Deterministic data for writes.
fn fill(seed: u64, out: &mut [u8]) {
    fastrand::Rng::with_seed(seed).fill(out);
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(seed, &mut v);
    v
}

/// A fault device over a memory device of `sectors` sectors of `sector` bytes.
fn fault_device(sector: u32, sectors: u64) -> FaultDevice {
    let mem = MemoryDevice::with_sector_size(sectors * u64::from(sector), sector).unwrap();
    FaultDevice::new(Arc::new(mem))
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0xa5; dev.capacity() as usize];
    dev.read_at(0, &mut v).unwrap();
    v
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

// ---- Power cut with a random policy: a property test ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WKind {
    Write,
    Zeroes,
    Discard,
}

impl WKind {
    fn op(self) -> OpKind {
        match self {
            WKind::Write => OpKind::Write,
            WKind::Zeroes => OpKind::WriteZeroes,
            WKind::Discard => OpKind::Discard,
        }
    }
}

#[derive(Debug, Clone)]
enum Phase1 {
    W {
        kind: WKind,
        off: u16,
        len: u16,
        seed: u64,
    },
    Flush,
}

#[derive(Debug, Clone)]
struct Unflushed {
    kind: WKind,
    off_in_slot: u8,
    len: u8,
    seed: u64,
}

const SLOTS: u64 = 16;
const SLOT_SECTORS: u64 = 16;
const SECTORS: u64 = SLOTS * SLOT_SECTORS;

fn wkind() -> impl Strategy<Value = WKind> {
    prop_oneof![4 => Just(WKind::Write), 1 => Just(WKind::Zeroes), 1 => Just(WKind::Discard)]
}

fn phase1() -> impl Strategy<Value = Vec<Phase1>> {
    let op = prop_oneof![
        5 => (wkind(), any::<u16>(), 1u16..=40, any::<u64>())
            .prop_map(|(kind, off, len, seed)| Phase1::W { kind, off, len, seed }),
        1 => Just(Phase1::Flush),
    ];
    prop::collection::vec(op, 0..20)
}

fn phase2() -> impl Strategy<Value = (Vec<u64>, Vec<Unflushed>)> {
    let slots = Just((0..SLOTS).collect::<Vec<u64>>()).prop_shuffle();
    let w = (wkind(), any::<u8>(), any::<u8>(), any::<u64>()).prop_map(
        |(kind, off_in_slot, len, seed)| Unflushed {
            kind,
            off_in_slot,
            len,
            seed,
        },
    );
    (slots, prop::collection::vec(w, 0..=SLOTS as usize))
}

/// Applies a write-type request to the model; returns the new bytes.
fn apply(model: &mut [u8], kind: WKind, range: Range<usize>, seed: u64) -> Vec<u8> {
    let new = match kind {
        WKind::Write => pattern(seed, range.len()),
        WKind::Zeroes | WKind::Discard => vec![0; range.len()],
    };
    model[range].copy_from_slice(&new);
    new
}

fn submit_write(dev: &dyn BlockDevice, kind: WKind, offset: u64, data: &[u8]) {
    let len = data.len() as u64;
    let r = match kind {
        WKind::Write => dev.write_at(offset, data),
        WKind::Zeroes => dev.write_zeroes(offset, len),
        WKind::Discard => dev.discard(offset, len),
    };
    r.unwrap();
}

fn power_cut_case(
    sector: u32,
    p1: &[Phase1],
    slots: &[u64],
    p2: &[Unflushed],
    one_batch: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let s = sector as usize;
    let fault = fault_device(sector, SECTORS);
    let cap = fault.capacity() as usize;
    // The device as the writes left it, and as of the last flush.
    let mut model = vec![0u8; cap];
    for op in p1 {
        match *op {
            Phase1::W {
                kind,
                off,
                len,
                seed,
            } => {
                let first = u64::from(off) % SECTORS;
                let n = u64::from(len).min(SECTORS - first);
                let range = (first as usize * s)..((first + n) as usize * s);
                let new = apply(&mut model, kind, range.clone(), seed);
                submit_write(&fault, kind, range.start as u64, &new);
            }
            Phase1::Flush => fault.flush().unwrap(),
        }
    }
    fault.flush().unwrap();
    let flushed = model.clone();
    prop_assert_eq!(fault.stats().unflushed, 0);

    // Unflushed writes, one per slot, so no two overlap.
    let mut writes: Vec<(WKind, Range<usize>, Vec<u8>)> = Vec::new();
    for (w, &slot) in p2.iter().zip(slots) {
        let off = u64::from(w.off_in_slot) % SLOT_SECTORS;
        let n = 1 + u64::from(w.len) % (SLOT_SECTORS - off);
        let first = slot * SLOT_SECTORS + off;
        let range = (first as usize * s)..((first + n) as usize * s);
        let new = apply(&mut model, w.kind, range.clone(), w.seed);
        writes.push((w.kind, range, new));
    }
    if one_batch {
        let mut batch: Vec<Request<'_>> = writes
            .iter()
            .map(|(kind, r, data)| match kind {
                WKind::Write => Request::write(r.start as u64, data),
                WKind::Zeroes => Request::write_zeroes(r.start as u64, r.len() as u64),
                WKind::Discard => Request::discard(r.start as u64, r.len() as u64),
            })
            .collect();
        fault.submit_all(&mut batch).unwrap();
    } else {
        for (kind, r, data) in &writes {
            submit_write(&fault, *kind, r.start as u64, data);
        }
    }
    prop_assert_eq!(fault.stats().unflushed, writes.len() as u64);
    // Before the cut: reads see every write, the medium only the flushed ones.
    prop_assert!(read_all(&fault) == model, "reads miss unflushed writes");
    // Also into a vector of odd-sized buffers, so cached writes land across buffer edges.
    let mut pieces = vec![0xa5u8; cap];
    let mut batch = [Request::readv(0, pieces.chunks_mut(3001))];
    fault.submit_all(&mut batch).unwrap();
    drop(batch);
    prop_assert!(pieces == model, "vectored reads miss unflushed writes");
    prop_assert!(
        read_all(fault.inner().as_ref()) == flushed,
        "unflushed writes reached the medium before a flush"
    );

    let report = fault
        .power_cut(CutPolicy::Random { seed, torn: true })
        .unwrap();
    prop_assert_eq!(fault.last_power_cut(), Some(report.clone()));
    prop_assert!(!fault.is_powered());
    let medium = read_all(fault.inner().as_ref());

    // From the data alone: outside the unflushed writes nothing changed since the flush ...
    let mut covered = vec![false; cap];
    for (_, r, _) in &writes {
        covered[r.clone()].fill(true);
    }
    for i in 0..cap {
        if !covered[i] && medium[i] != flushed[i] {
            return Err(TestCaseError::fail(format!(
                "byte {i}, outside every unflushed write, changed at the power cut"
            )));
        }
    }
    // ... and each unflushed write is whole, absent, or a prefix of its sectors.
    let mut prefixes = Vec::new();
    for (kind, r, new) in &writes {
        let n = r.len() / s;
        let got = &medium[r.clone()];
        let old = &flushed[r.clone()];
        let possible: Vec<usize> = (0..=n)
            .filter(|&k| got[..k * s] == new[..k * s] && got[k * s..] == old[k * s..])
            .collect();
        if possible.is_empty() {
            return Err(TestCaseError::fail(format!(
                "{kind:?} of {} sectors at {} is neither whole, absent, nor torn at a sector \
                 boundary",
                n, r.start
            )));
        }
        prefixes.push(possible);
    }

    // The report agrees: it lists the unflushed writes in order, and each fate is one the data
    // allows.
    prop_assert_eq!(report.writes.len(), writes.len());
    let mut expect = flushed.clone();
    for ((cw, (kind, r, new)), possible) in report.writes.iter().zip(&writes).zip(&prefixes) {
        prop_assert_eq!(
            (cw.op, cw.offset, cw.len),
            (kind.op(), r.start as u64, r.len() as u64)
        );
        let n = r.len() / s;
        let k = match cw.fate {
            Fate::Kept => n,
            Fate::Dropped => 0,
            Fate::Torn { sectors } => {
                prop_assert!(
                    sectors >= 1 && (sectors as usize) < n,
                    "torn write of {} sectors keeps {}",
                    n,
                    sectors
                );
                sectors as usize
            }
        };
        prop_assert!(
            possible.contains(&k),
            "report says {:?} for the write at {}, the data says {:?} sectors",
            cw.fate,
            r.start,
            possible
        );
        expect[r.start..r.start + k * s].copy_from_slice(&new[..k * s]);
    }
    if let Some(i) = first_diff(&medium, &expect) {
        return Err(TestCaseError::fail(format!(
            "medium differs at byte {i} from the report's account"
        )));
    }

    // Powered off until powered on; then the device shows the medium, with an empty cache.
    let mut b = vec![0u8; s];
    prop_assert!(matches!(fault.read_at(0, &mut b), Err(Error::PoweredOff)));
    prop_assert!(matches!(fault.write_at(0, &b), Err(Error::PoweredOff)));
    prop_assert!(matches!(fault.flush(), Err(Error::PoweredOff)));
    fault.power_on();
    prop_assert!(fault.is_powered());
    prop_assert_eq!(fault.stats().unflushed, 0);
    prop_assert!(
        read_all(&fault) == medium,
        "after power_on the device differs from the medium"
    );
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: 128, failure_persistence: None, ..Config::default() })]

    #[test]
    fn random_power_cut_keeps_flushed_and_tears_at_sectors(
        sector in prop::sample::select(vec![512u32, 4096]),
        p1 in phase1(),
        (slots, p2) in phase2(),
        one_batch in any::<bool>(),
        seed in any::<u64>(),
    ) {
        power_cut_case(sector, &p1, &slots, &p2, one_batch, seed)?;
    }
}

/// Many unflushed writes: a random cut keeps some, drops some and tears some, and the same seed
/// replays the same cut; without `torn`, no write is torn.
#[test]
fn random_cut_has_every_fate_and_replays() {
    let run = |seed: u64, torn: bool| {
        let f = fault_device(512, 1024);
        for i in 0..64u64 {
            f.write_at(i * 4096, &pattern(i, 4096)).unwrap();
        }
        let report = f.power_cut(CutPolicy::Random { seed, torn }).unwrap();
        (report, read_all(f.inner().as_ref()))
    };
    let (report, medium) = run(7, true);
    assert_eq!(report.writes.len(), 64);
    let count = |p: &dyn Fn(&Fate) -> bool| report.writes.iter().filter(|w| p(&w.fate)).count();
    assert!(count(&|f| *f == Fate::Kept) > 0, "{report:?}");
    assert!(count(&|f| *f == Fate::Dropped) > 0, "{report:?}");
    assert!(count(&|f| matches!(f, Fate::Torn { .. })) > 0, "{report:?}");
    for (i, w) in report.writes.iter().enumerate() {
        let at = i * 4096;
        let new = pattern(i as u64, 4096);
        let keep = match w.fate {
            Fate::Kept => 4096,
            Fate::Dropped => 0,
            Fate::Torn { sectors } => {
                assert!((1..8).contains(&sectors));
                sectors as usize * 512
            }
        };
        assert_eq!(medium[at..at + keep], new[..keep]);
        assert!(medium[at + keep..at + 4096].iter().all(|&b| b == 0));
    }
    let (again, medium_again) = run(7, true);
    assert_eq!(again, report, "the same seed replays the same cut");
    assert_eq!(medium_again, medium);

    let (untorn, _) = run(7, false);
    assert!(untorn
        .writes
        .iter()
        .all(|w| matches!(w.fate, Fate::Kept | Fate::Dropped)));
    assert!(untorn.writes.iter().any(|w| w.fate == Fate::Kept));
    assert!(untorn.writes.iter().any(|w| w.fate == Fate::Dropped));
}

// ---- DropAll and KeepAll ----

/// Flushed A, then unflushed B (over part of A), a write-zeroes over another part of A, and C.
fn cut_setup() -> (FaultDevice, Vec<u8>, Vec<u8>, Vec<u8>) {
    let f = fault_device(512, 256);
    let a = pattern(1, 16 * 512);
    let b = pattern(2, 4 * 512);
    let c = pattern(3, 8 * 512);
    f.write_at(0, &a).unwrap();
    f.flush().unwrap();
    f.write_at(2 * 512, &b).unwrap();
    f.write_zeroes(10 * 512, 2 * 512).unwrap();
    f.write_at(64 * 512, &c).unwrap();
    assert_eq!(f.stats().unflushed, 3);
    (f, a, b, c)
}

fn cut_writes(fate: Fate) -> Vec<CutWrite> {
    vec![
        CutWrite {
            op: OpKind::Write,
            offset: 1024,
            len: 2048,
            fate,
        },
        CutWrite {
            op: OpKind::WriteZeroes,
            offset: 5120,
            len: 1024,
            fate,
        },
        CutWrite {
            op: OpKind::Write,
            offset: 64 * 512,
            len: 4096,
            fate,
        },
    ]
}

#[test]
fn drop_all_loses_every_unflushed_write() {
    let (f, a, _b, _c) = cut_setup();
    let report = f.power_cut(CutPolicy::DropAll).unwrap();
    assert_eq!(
        report,
        PowerCutReport {
            writes: cut_writes(Fate::Dropped)
        }
    );
    let mut expect = vec![0u8; 256 * 512];
    expect[..a.len()].copy_from_slice(&a);
    assert!(read_all(f.inner().as_ref()) == expect);
    f.power_on();
    assert!(read_all(&f) == expect);
}

#[test]
fn keep_all_keeps_every_unflushed_write() {
    let (f, a, b, c) = cut_setup();
    let report = f.power_cut(CutPolicy::KeepAll).unwrap();
    assert_eq!(
        report,
        PowerCutReport {
            writes: cut_writes(Fate::Kept)
        }
    );
    let mut expect = vec![0u8; 256 * 512];
    expect[..a.len()].copy_from_slice(&a);
    expect[1024..1024 + b.len()].copy_from_slice(&b);
    expect[5120..6144].fill(0);
    expect[64 * 512..64 * 512 + c.len()].copy_from_slice(&c);
    assert!(read_all(f.inner().as_ref()) == expect);
    f.power_on();
    assert!(read_all(&f) == expect);
}

// ---- Armed power cut ----

#[test]
fn armed_cut_fails_the_nth_write_and_everything_after() {
    let f = fault_device(512, 256);
    let base = pattern(9, 256 * 512);
    f.write_at(0, &base).unwrap();
    f.flush().unwrap();

    f.arm_power_cut(3, CutPolicy::DropAll);
    let (w1, w2, w3, w4) = (
        pattern(11, 1024),
        pattern(12, 1024),
        pattern(13, 1024),
        pattern(14, 1024),
    );
    let mut r1 = vec![0u8; 1024];
    let mut r2 = vec![0u8; 1024];
    let mut batch = [
        Request::write(0, &w1),
        Request::read(0, &mut r1), // reads do not count
        Request::write(4096, &w2),
        Request::write(8192, &w3), // the third write: the cut
        Request::write(12288, &w4),
        Request::read(0, &mut r2),
        Request::flush(),
        Request::discard(0, 512),
    ];
    f.submit(&mut batch);
    let results: Vec<_> = batch.iter().map(|r| r.result()).collect();
    drop(batch);
    assert!(results[0].is_ok() && results[1].is_ok() && results[2].is_ok());
    for (i, r) in results.iter().enumerate().skip(3) {
        assert!(
            matches!(r, Err(Error::PoweredOff)),
            "request {i} after the cut: {r:?}"
        );
    }
    assert_eq!(r1, w1, "before the cut, reads see the cached write");
    assert!(!f.is_powered());
    let report = f.last_power_cut().expect("a cut happened");
    let offsets: Vec<u64> = report.writes.iter().map(|w| w.offset).collect();
    assert_eq!(
        offsets,
        [0, 4096, 8192],
        "the cut write is in flight, the 4th never started"
    );
    assert!(report.writes.iter().all(|w| w.fate == Fate::Dropped));
    // Until power_on, everything fails.
    assert!(matches!(f.write_at(0, &w4), Err(Error::PoweredOff)));
    assert!(matches!(f.read_at(0, &mut r2), Err(Error::PoweredOff)));
    assert!(matches!(f.flush(), Err(Error::PoweredOff)));
    f.power_on();
    assert!(
        read_all(&f) == base,
        "every unflushed write was dropped, the flushed data is intact"
    );
    // The cut is spent: writes work again.
    f.write_at(0, &w4).unwrap();
    f.flush().unwrap();

    // Across calls, with KeepAll and a flush before the cut.
    let f = fault_device(512, 256);
    f.arm_power_cut(2, CutPolicy::KeepAll);
    f.write_at(0, &w1).unwrap();
    f.flush().unwrap();
    assert!(matches!(f.write_at(4096, &w2), Err(Error::PoweredOff)));
    assert!(matches!(f.write_at(8192, &w3), Err(Error::PoweredOff)));
    let medium = read_all(f.inner().as_ref());
    assert_eq!(medium[..1024], w1[..]);
    assert_eq!(
        medium[4096..5120],
        w2[..],
        "KeepAll: the write in flight at the cut reached the medium"
    );
    assert!(medium[8192..9216].iter().all(|&b| b == 0));

    // Disarmed: no cut.
    let f = fault_device(512, 256);
    f.arm_power_cut(1, CutPolicy::DropAll);
    f.disarm_power_cut();
    f.write_at(0, &w1).unwrap();
    assert!(f.is_powered());
}

// ---- Rules ----

#[test]
fn fail_rule_hits_exactly_the_matching_window() {
    let f = fault_device(512, 256);
    let base = pattern(20, 256 * 512);
    f.write_at(0, &base).unwrap();
    f.flush().unwrap();
    let window = 16 * 512..32 * 512;
    // Skip 2 matches, then fail 3.
    f.add_rule(
        FaultRule::fail(OpKind::Write)
            .in_range(window.clone())
            .after(2)
            .times(3),
    );
    // (offset in sectors, length in sectors); whether it overlaps the window.
    let writes: [(u64, u64); 10] = [
        (0, 4),   // outside
        (16, 2),  // match 1: skipped
        (40, 4),  // outside
        (14, 4),  // match 2 (straddles the start): skipped
        (20, 1),  // match 3: fails
        (32, 4),  // outside (starts at the window's end)
        (30, 4),  // match 4 (straddles the end): fails
        (8, 8),   // outside (ends at the window's start)
        (24, 8),  // match 5: fails
        (16, 16), // match 6: the rule is spent
    ];
    let mut model = base.clone();
    let mut failed = Vec::new();
    let mut reads_ok = 0;
    for (i, &(off, n)) in writes.iter().enumerate() {
        let data = pattern(100 + i as u64, n as usize * 512);
        let at = off * 512;
        // A read and a discard in the window do not match a write rule.
        let mut back = vec![0u8; 512];
        f.read_at(window.start, &mut back).unwrap();
        reads_ok += 1;
        match f.write_at(at, &data) {
            Ok(()) => model[at as usize..at as usize + data.len()].copy_from_slice(&data),
            Err(Error::Injected { op, offset }) => {
                assert_eq!((op, offset), (OpKind::Write, at));
                failed.push(i);
            }
            Err(e) => panic!("write {i}: {e}"),
        }
    }
    assert_eq!(failed, [4, 6, 8]);
    assert_eq!(reads_ok, writes.len());
    assert_eq!(f.stats().injected, 3);
    f.discard(window.start, 512).unwrap();
    model[window.start as usize..window.start as usize + 512].fill(0);
    assert!(read_all(&f) == model, "failed writes changed nothing");
    f.flush().unwrap();
    assert!(
        read_all(f.inner().as_ref()) == model,
        "failed writes did not reach the medium"
    );
}

#[test]
fn rules_can_be_removed_and_combined() {
    let f = fault_device(512, 64);
    let id = f.add_rule(FaultRule::fail(OpKind::Write).and(OpKind::Flush));
    assert!(matches!(
        f.write_at(512, &[1; 512]),
        Err(Error::Injected {
            op: OpKind::Write,
            offset: 512
        })
    ));
    assert!(matches!(
        f.flush(),
        Err(Error::Injected {
            op: OpKind::Flush,
            ..
        })
    ));
    f.discard(0, 512).unwrap();
    f.remove_rule(id);
    f.write_at(512, &[1; 512]).unwrap();
    f.add_rule(FaultRule::fail(OpKind::Read).in_range(0..512));
    let mut b = [0u8; 512];
    assert!(matches!(
        f.read_at(0, &mut b),
        Err(Error::Injected {
            op: OpKind::Read,
            offset: 0
        })
    ));
    f.read_at(512, &mut b).unwrap();
    assert_eq!(b, [1; 512]);
    f.clear_rules();
    f.read_at(0, &mut b).unwrap();
}

#[test]
fn corrupt_reads_change_returned_data_not_the_medium() {
    let f = fault_device(512, 64);
    let data = pattern(30, 64 * 512);
    f.write_at(0, &data).unwrap();
    f.flush().unwrap();
    let id = f.add_rule(FaultRule::corrupt_reads().in_range(8 * 512..12 * 512));
    let mut back = vec![0u8; 16 * 512];
    f.read_at(0, &mut back).unwrap();
    let window = 8 * 512..12 * 512;
    assert!(
        back[window.clone()]
            .iter()
            .zip(&data[window.clone()])
            .all(|(a, b)| a != b),
        "every byte the read returned from the window is corrupted"
    );
    assert!(f.stats().injected >= 1);
    let mut outside = vec![0u8; 8 * 512];
    f.read_at(32 * 512, &mut outside).unwrap();
    assert_eq!(
        outside,
        data[32 * 512..40 * 512],
        "reads outside the window are exact"
    );
    assert!(
        read_all(f.inner().as_ref()) == data,
        "the medium is unchanged"
    );
    f.remove_rule(id);
    assert!(
        read_all(&f) == data,
        "without the rule, reads are exact again"
    );
}

#[test]
fn corrupt_stored_changes_every_byte_in_range_and_nothing_else() {
    for sector in [512u32, 4096] {
        let f = fault_device(sector, 64);
        let data = pattern(40, f.capacity() as usize);
        f.write_at(0, &data).unwrap();
        f.flush().unwrap();
        // Unaligned on both ends, across several sectors.
        let range = 1000usize..1000 + 3 * sector as usize + 77;
        f.corrupt_stored(range.start as u64, range.len() as u64, 5)
            .unwrap();
        for medium in [read_all(f.inner().as_ref()), read_all(&f)] {
            for (i, (a, b)) in medium.iter().zip(&data).enumerate() {
                if range.contains(&i) {
                    assert_ne!(a, b, "byte {i} in the corrupted range did not change");
                } else {
                    assert_eq!(a, b, "byte {i} outside the corrupted range changed");
                }
            }
        }
    }
}

#[test]
fn latency_delays_a_batch() {
    let f = fault_device(512, 64);
    f.set_latency(Some(Duration::from_millis(30)));
    let mut a = [0u8; 512];
    let mut b = [0u8; 512];
    let t = Instant::now();
    f.submit_all(&mut [Request::read(0, &mut a), Request::read(512, &mut b)])
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(30),
        "{:?}",
        t.elapsed()
    );
    f.set_latency(None);
}

#[test]
fn without_volatile_cache_writes_go_through() {
    let f = fault_device(512, 64);
    let a = pattern(50, 4096);
    let b = pattern(51, 4096);
    f.write_at(0, &a).unwrap();
    assert!(
        read_all(f.inner().as_ref())[..4096].iter().all(|&x| x == 0),
        "with the cache on, an unflushed write is not on the medium"
    );
    f.set_volatile_cache(false).unwrap();
    assert_eq!(
        read_all(f.inner().as_ref())[..4096],
        a[..],
        "turning the cache off writes back what it held"
    );
    f.write_at(8192, &b).unwrap();
    assert_eq!(f.stats().unflushed, 0);
    assert_eq!(
        read_all(f.inner().as_ref())[8192..12288],
        b[..],
        "without the cache, a write reaches the medium without a flush"
    );
    let report = f.power_cut(CutPolicy::DropAll).unwrap();
    assert!(report.writes.is_empty());
    f.power_on();
    let all = read_all(&f);
    assert_eq!(all[..4096], a[..]);
    assert_eq!(all[8192..12288], b[..]);
}
