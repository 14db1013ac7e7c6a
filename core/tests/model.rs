//! Model tests: random sequences of batches run against every device of vstor-core and against
//! a plain `Vec<u8>`, which must agree byte for byte.
//!
//! A batch holds reads, writes (both vectored, split at random points, some buffers at unaligned
//! addresses), flushes, discards, write-zeroes and invalid requests. The contract leaves the data
//! unspecified when write-type requests of one batch overlap each other or a read of the batch,
//! except across a flush, which is a barrier inside its batch. So the generator keeps the
//! requests between two flushes free of such overlaps, and when a request would overlap it either
//! drops it or puts a flush in front of it, which makes the batch depend on the barrier (write A,
//! flush, read A must read A's data).

use proptest::prelude::*;
use proptest::test_runner::Config;
use std::ops::Range;
use std::path::{Path, PathBuf};
use vstor_core::{
    AlignedBuf, BlockDevice, Engine, Error, FileDevice, FileOptions, MemoryDevice, OpKind, Request,
};

/// Capacity of every device under test.
const CAP: u64 = 2 << 20;

/// How a read or write request lays out its memory.
#[derive(Debug, Clone)]
enum Split {
    /// One buffer.
    One,
    /// Several buffers, split at sector multiples.
    Sectors(Vec<u16>),
    /// Several buffers, split at any byte.
    Bytes(Vec<u32>),
}

#[derive(Debug, Clone)]
struct Mem {
    split: Split,
    /// Bytes from a 4096-aligned address to the first buffer.
    shift: usize,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// A new range: `off` picks the first sector, `len` is in sectors (0..=64).
    Fresh { off: u32, len: u16 },
    /// The range of an earlier request of the same batch (modulo their number).
    Same(u8),
}

#[derive(Debug, Clone, Copy)]
enum BadKind {
    /// Starts at or before the end, ends past it.
    PastEnd { back: u8, extra: u8 },
    /// offset + len overflows u64.
    Overflow,
    /// Offset not a multiple of the sector size.
    UnalignedOffset { delta: u16 },
    /// Length not a multiple of the sector size.
    UnalignedLen { delta: u16 },
}

#[derive(Debug, Clone)]
enum RawOp {
    Read { at: Target, mem: Mem },
    Write { at: Target, mem: Mem, seed: u64 },
    Discard { at: Target },
    Zeroes { at: Target },
    Flush,
    Bad { kind: BadKind, op: u8 },
}

#[derive(Debug, Clone)]
struct Step {
    op: RawOp,
    /// On an overlap with an earlier request of the batch: put a flush before this request (true)
    /// or drop it (false).
    barrier: bool,
}

fn mem() -> impl Strategy<Value = Mem> {
    let split = prop_oneof![
        2 => Just(Split::One),
        1 => prop::collection::vec(any::<u16>(), 1..4).prop_map(Split::Sectors),
        1 => prop::collection::vec(any::<u32>(), 1..5).prop_map(Split::Bytes),
    ];
    let shift = prop::sample::select(vec![0usize, 0, 0, 1, 3, 8, 100, 511, 512, 4095]);
    (split, shift).prop_map(|(split, shift)| Mem { split, shift })
}

fn target() -> impl Strategy<Value = Target> {
    let len = prop_oneof![1 => Just(0u16), 6 => 1u16..=8, 3 => 1u16..=64];
    prop_oneof![
        4 => (any::<u32>(), len).prop_map(|(off, len)| Target::Fresh { off, len }),
        2 => any::<u8>().prop_map(Target::Same),
    ]
}

fn bad_kind() -> impl Strategy<Value = BadKind> {
    prop_oneof![
        (0u8..3, 1u8..4).prop_map(|(back, extra)| BadKind::PastEnd { back, extra }),
        Just(BadKind::Overflow),
        any::<u16>().prop_map(|delta| BadKind::UnalignedOffset { delta }),
        any::<u16>().prop_map(|delta| BadKind::UnalignedLen { delta }),
    ]
}

fn raw_op() -> impl Strategy<Value = RawOp> {
    prop_oneof![
        4 => (target(), mem()).prop_map(|(at, mem)| RawOp::Read { at, mem }),
        5 => (target(), mem(), any::<u64>()).prop_map(|(at, mem, seed)| RawOp::Write { at, mem, seed }),
        1 => target().prop_map(|at| RawOp::Discard { at }),
        1 => target().prop_map(|at| RawOp::Zeroes { at }),
        1 => Just(RawOp::Flush),
        1 => (bad_kind(), 0u8..4).prop_map(|(kind, op)| RawOp::Bad { kind, op }),
    ]
}

fn batches() -> impl Strategy<Value = Vec<Vec<Step>>> {
    let step = (raw_op(), prop::bool::weighted(0.7)).prop_map(|(op, barrier)| Step { op, barrier });
    prop::collection::vec(prop::collection::vec(step, 1..12), 15..25)
}

/// Deterministic data for writes.
fn fill(seed: u64, out: &mut [u8]) {
    fastrand::Rng::with_seed(seed).fill(out);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Discard,
    Zeroes,
    Flush,
}

/// What a request must complete with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Ok,
    OutOfRange,
    Unaligned,
}

/// A concrete request of a batch and what it must produce.
#[derive(Debug)]
struct Planned {
    kind: Kind,
    offset: u64,
    /// Bytes of data (reads and writes) or of the range (discard, write-zeroes).
    len: u64,
    /// Split points inside the data, ascending, each <= len.
    splits: Vec<usize>,
    shift: usize,
    /// Data of a write.
    data: Vec<u8>,
    /// What a successful read must return.
    expect_data: Vec<u8>,
    expect: Expect,
}

impl Planned {
    fn flush() -> Self {
        Planned {
            kind: Kind::Flush,
            offset: 0,
            len: 0,
            splits: Vec::new(),
            shift: 0,
            data: Vec::new(),
            expect_data: Vec::new(),
            expect: Expect::Ok,
        }
    }

    fn op_kind(&self) -> OpKind {
        match self.kind {
            Kind::Read => OpKind::Read,
            Kind::Write => OpKind::Write,
            Kind::Discard => OpKind::Discard,
            Kind::Zeroes => OpKind::WriteZeroes,
            Kind::Flush => OpKind::Flush,
        }
    }

    /// The byte length of the memory the request uses (reads and writes only).
    fn mem_len(&self) -> usize {
        match self.kind {
            Kind::Read | Kind::Write => self.len as usize,
            _ => 0,
        }
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Turns one generated batch into concrete requests for a device with sector `s` and capacity
/// `cap`, applying it to `model` and recording what each request must produce.
fn plan_batch(steps: &[Step], s: u64, cap: u64, model: &mut [u8]) -> Vec<Planned> {
    let nsect = cap / s;
    let mut out = Vec::new();
    // Ranges of the requests since the last flush of this batch.
    let mut seg_writes: Vec<Range<u64>> = Vec::new();
    let mut seg_reads: Vec<Range<u64>> = Vec::new();
    // Ranges of every request of the batch, for `Target::Same`.
    let mut ranges: Vec<Range<u64>> = Vec::new();

    let resolve = |at: Target, ranges: &[Range<u64>]| -> Range<u64> {
        let fresh = |off: u32, len: u16| {
            let first = u64::from(off) % nsect;
            let n = u64::from(len).min(nsect - first);
            first * s..(first + n) * s
        };
        match at {
            Target::Fresh { off, len } => fresh(off, len),
            Target::Same(k) if !ranges.is_empty() => ranges[usize::from(k) % ranges.len()].clone(),
            Target::Same(k) => fresh(u32::from(k) * 97, u16::from(k % 16) + 1),
        }
    };
    let layout = |mem: &Mem, len: u64| -> (Vec<usize>, usize) {
        let mut splits: Vec<usize> = match &mem.split {
            Split::One => Vec::new(),
            Split::Sectors(v) => v
                .iter()
                .map(|&x| ((u64::from(x) % (len / s + 1)) * s) as usize)
                .collect(),
            Split::Bytes(v) => v
                .iter()
                .map(|&x| (u64::from(x) % (len + 1)) as usize)
                .collect(),
        };
        splits.sort_unstable();
        (splits, mem.shift)
    };

    for step in steps {
        let (kind, range, mem, seed) = match &step.op {
            RawOp::Flush => {
                out.push(Planned::flush());
                seg_writes.clear();
                seg_reads.clear();
                continue;
            }
            RawOp::Bad { kind, op } => {
                out.push(plan_bad(*kind, *op, s, cap));
                continue;
            }
            RawOp::Read { at, mem } => (Kind::Read, resolve(*at, &ranges), Some(mem), 0),
            RawOp::Write { at, mem, seed } => {
                (Kind::Write, resolve(*at, &ranges), Some(mem), *seed)
            }
            RawOp::Discard { at } => (Kind::Discard, resolve(*at, &ranges), None, 0),
            RawOp::Zeroes { at } => (Kind::Zeroes, resolve(*at, &ranges), None, 0),
        };
        let is_write = kind != Kind::Read;
        let conflict = seg_writes.iter().any(|w| overlaps(w, &range))
            || (is_write && seg_reads.iter().any(|r| overlaps(r, &range)));
        if conflict {
            if !step.barrier {
                continue;
            }
            out.push(Planned::flush());
            seg_writes.clear();
            seg_reads.clear();
        }
        let len = range.end - range.start;
        let (splits, shift) = mem.map(|m| layout(m, len)).unwrap_or_default();
        let span = range.start as usize..range.end as usize;
        let mut p = Planned {
            kind,
            offset: range.start,
            len,
            splits,
            shift,
            data: Vec::new(),
            expect_data: Vec::new(),
            expect: Expect::Ok,
        };
        match kind {
            Kind::Read => p.expect_data = model[span].to_vec(),
            Kind::Write => {
                p.data = vec![0; len as usize];
                fill(seed, &mut p.data);
                model[span].copy_from_slice(&p.data);
            }
            Kind::Discard | Kind::Zeroes => model[span].fill(0),
            Kind::Flush => unreachable!(),
        }
        if is_write {
            seg_writes.push(range.clone());
        } else {
            seg_reads.push(range.clone());
        }
        ranges.push(range);
        out.push(p);
    }
    out
}

/// An invalid request: it must fail with the named error and change nothing.
fn plan_bad(kind: BadKind, op: u8, s: u64, cap: u64) -> Planned {
    let kind_of = [Kind::Read, Kind::Write, Kind::Discard, Kind::Zeroes][usize::from(op % 4)];
    let (offset, len, expect) = match kind {
        BadKind::PastEnd { back, extra } => {
            let back = u64::from(back);
            (
                cap - back * s,
                (back + u64::from(extra)) * s,
                Expect::OutOfRange,
            )
        }
        BadKind::Overflow => (u64::MAX / s * s, 2 * s, Expect::OutOfRange),
        BadKind::UnalignedOffset { delta } => (
            s * 3 + u64::from(delta) % (s - 1) + 1,
            2 * s,
            Expect::Unaligned,
        ),
        BadKind::UnalignedLen { delta } => {
            (s * 5, s + u64::from(delta) % (s - 1) + 1, Expect::Unaligned)
        }
    };
    let mut data = Vec::new();
    if kind_of == Kind::Write {
        data = vec![0; len as usize];
        fill(offset ^ len, &mut data);
    }
    Planned {
        kind: kind_of,
        offset,
        len,
        splits: if len > s {
            vec![s as usize]
        } else {
            Vec::new()
        },
        shift: 1,
        data,
        expect_data: Vec::new(),
        expect,
    }
}

/// Splits `buf` at ascending `points`.
fn split_mut<'a>(mut buf: &'a mut [u8], points: &[usize]) -> Vec<&'a mut [u8]> {
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut prev = 0;
    for &p in points {
        let (a, b) = std::mem::take(&mut buf).split_at_mut(p - prev);
        out.push(a);
        buf = b;
        prev = p;
    }
    out.push(buf);
    out
}

fn split<'a>(mut buf: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut prev = 0;
    for &p in points {
        let (a, b) = buf.split_at(p - prev);
        out.push(a);
        buf = b;
        prev = p;
    }
    out.push(buf);
    out
}

const POISON: u8 = 0xa5;

/// Submits `plan` as one batch and checks every result and every byte read.
fn run_batch(
    dev: &dyn BlockDevice,
    plan: &[Planned],
    cap: u64,
    s: u64,
) -> Result<(), TestCaseError> {
    let mut mems: Vec<AlignedBuf> = plan
        .iter()
        .map(|p| {
            let mut b = AlignedBuf::with_alignment(p.shift + p.mem_len(), 4096);
            b.fill(POISON);
            if p.kind == Kind::Write {
                b[p.shift..].copy_from_slice(&p.data);
            }
            b
        })
        .collect();
    let mut batch: Vec<Request<'_>> = plan
        .iter()
        .zip(mems.iter_mut())
        .map(|(p, m)| {
            let win = &mut m[p.shift..];
            match p.kind {
                Kind::Read if p.splits.is_empty() => Request::read(p.offset, win),
                Kind::Read => Request::readv(p.offset, split_mut(win, &p.splits)),
                Kind::Write if p.splits.is_empty() => Request::write(p.offset, win),
                Kind::Write => {
                    let win: &[u8] = win;
                    Request::writev(p.offset, split(win, &p.splits))
                }
                Kind::Discard => Request::discard(p.offset, p.len),
                Kind::Zeroes => Request::write_zeroes(p.offset, p.len),
                Kind::Flush => Request::flush(),
            }
        })
        .collect();
    dev.submit(&mut batch);
    let results: Vec<_> = batch.iter().map(|r| r.result()).collect();
    drop(batch);
    for (i, ((p, m), r)) in plan.iter().zip(&mems).zip(results).enumerate() {
        let op = p.op_kind();
        match (&p.expect, r) {
            (Expect::Ok, Ok(())) => {}
            (
                Expect::OutOfRange,
                Err(Error::OutOfRange {
                    op: o,
                    offset,
                    len,
                    capacity,
                }),
            ) => {
                prop_assert_eq!((o, offset, len, capacity), (op, p.offset, p.len, cap));
            }
            (
                Expect::Unaligned,
                Err(Error::Unaligned {
                    op: o,
                    offset,
                    len,
                    alignment,
                }),
            ) => {
                prop_assert_eq!(
                    (o, offset, len, u64::from(alignment)),
                    (op, p.offset, p.len, s)
                );
            }
            (want, got) => {
                let (len, offset) = (p.len, p.offset);
                return Err(TestCaseError::fail(format!(
                    "request {i} of the batch ({op} of {len} bytes at {offset}): \
                     expected {want:?}, got {got:?}"
                )));
            }
        }
        if p.kind == Kind::Read && p.expect == Expect::Ok {
            let got = &m[p.shift..];
            if got != &p.expect_data[..] {
                let first = got
                    .iter()
                    .zip(&p.expect_data)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(TestCaseError::fail(format!(
                    "request {i} of the batch: read of {} bytes at {} differs from the model at \
                     byte {first} (device offset {})",
                    p.len,
                    p.offset,
                    p.offset + first as u64
                )));
            }
        }
    }
    Ok(())
}

/// Reads the whole device and compares it with the model.
fn check_whole(dev: &dyn BlockDevice, model: &[u8]) -> Result<(), TestCaseError> {
    let mut all = vec![POISON; model.len()];
    dev.read_at(0, &mut all)
        .map_err(|e| TestCaseError::fail(format!("reading the whole device: {e}")))?;
    if all != model {
        let first = all.iter().zip(model).position(|(a, b)| a != b).unwrap();
        return Err(TestCaseError::fail(format!(
            "device differs from the model at offset {first}"
        )));
    }
    Ok(())
}

/// Runs the generated batches on `dev` and checks it against the model all along.
fn run_model(
    dev: &dyn BlockDevice,
    file: Option<&Path>,
    batches: &[Vec<Step>],
) -> Result<(), TestCaseError> {
    let info = dev.info();
    let s = u64::from(info.logical_sector_size);
    let cap = info.capacity;
    prop_assert!(s == 512 || s == 4096, "sector size {}", s);
    prop_assert_eq!(cap, CAP);
    prop_assert!(info.discard_zeroes);
    prop_assert!(info.supports.discard && info.supports.write_zeroes);
    let mut model = vec![0u8; cap as usize];
    for steps in batches {
        let plan = plan_batch(steps, s, cap, &mut model);
        run_batch(dev, &plan, cap, s)?;
    }
    check_whole(dev, &model)?;
    dev.flush()
        .map_err(|e| TestCaseError::fail(format!("flush: {e}")))?;
    if let Some(path) = file {
        // What the file holds, read around the device.
        let on_disk = std::fs::read(path).unwrap();
        prop_assert_eq!(on_disk.len(), model.len());
        if on_disk != model {
            let first = on_disk
                .iter()
                .zip(&model)
                .position(|(a, b)| a != b)
                .unwrap();
            return Err(TestCaseError::fail(format!(
                "the file differs from the model at offset {first}"
            )));
        }
    }
    Ok(())
}

fn config() -> Config {
    Config {
        cases: 64,
        max_shrink_iters: 512,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A temporary file of CAP bytes opened with `engine`, checking that the device is what was
/// asked for.
fn open_file(engine: Engine, direct: bool) -> (tempfile::TempDir, PathBuf, FileDevice) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let opts = FileOptions {
        engine,
        direct,
        ..FileOptions::default()
    };
    let dev = FileDevice::create(&path, CAP, &opts).unwrap();
    assert_eq!(dev.engine(), engine);
    assert_eq!(dev.is_direct(), direct, "{:?}", dev.direct_fallback());
    if direct {
        assert_eq!(dev.direct_fallback(), None);
    }
    (dir, path, dev)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn memory_device_matches_model(batches in batches()) {
        let dev = MemoryDevice::new(CAP).unwrap();
        run_model(&dev, None, &batches)?;
    }

    #[test]
    fn memory_device_4k_sectors_matches_model(batches in batches()) {
        let dev = MemoryDevice::with_sector_size(CAP, 4096).unwrap();
        prop_assert_eq!(dev.info().logical_sector_size, 4096);
        run_model(&dev, None, &batches)?;
    }

    #[test]
    fn uring_buffered_matches_model(batches in batches()) {
        let (_dir, path, dev) = open_file(Engine::IoUring, false);
        run_model(&dev, Some(&path), &batches)?;
    }

    #[test]
    fn uring_direct_matches_model(batches in batches()) {
        let (_dir, path, dev) = open_file(Engine::IoUring, true);
        run_model(&dev, Some(&path), &batches)?;
    }

    #[test]
    fn sync_buffered_matches_model(batches in batches()) {
        let (_dir, path, dev) = open_file(Engine::Sync, false);
        run_model(&dev, Some(&path), &batches)?;
    }

    #[test]
    fn sync_direct_matches_model(batches in batches()) {
        let (_dir, path, dev) = open_file(Engine::Sync, true);
        run_model(&dev, Some(&path), &batches)?;
    }
}

// ---- Per-request results inside one batch ----

/// A batch mixing valid requests with out-of-range and unaligned ones: the valid ones complete
/// correctly, each bad one gets its own typed error, and the bad writes change nothing.
fn mixed_batch_results(dev: &dyn BlockDevice) {
    let info = dev.info();
    let s = u64::from(info.logical_sector_size);
    let su = s as usize;
    let cap = info.capacity;
    let mut before = vec![0u8; 8 * su];
    fill(1, &mut before);
    dev.write_at(0, &before).unwrap();
    let mut tail = vec![0u8; su];
    fill(2, &mut tail);
    dev.write_at(cap - s, &tail).unwrap();
    dev.flush().unwrap();

    let mut a = vec![0u8; 2 * su];
    fill(3, &mut a);
    let mut past_end = vec![0u8; 2 * su];
    fill(4, &mut past_end);
    let mut unaligned = vec![0u8; su];
    fill(5, &mut unaligned);
    let mut read_ok = vec![0u8; 2 * su];
    let mut read_bad = vec![0u8; su];
    let mut batch = [
        Request::write(0, &a),
        Request::write(cap - s, &past_end),
        Request::write(2 * s + s / 2, &unaligned),
        Request::read(4 * s, &mut read_ok),
        Request::read(cap, &mut read_bad),
        Request::discard(6 * s, s),
        Request::write_zeroes(cap - s, 2 * s),
        Request::discard(7 * s, s / 2),
    ];
    dev.submit(&mut batch);
    let r: Vec<_> = batch.iter().map(|r| r.result()).collect();
    drop(batch);
    assert!(r[0].is_ok(), "{:?}", r[0]);
    assert!(
        matches!(r[1], Err(Error::OutOfRange { op: OpKind::Write, offset, len, capacity })
            if offset == cap - s && len == 2 * s && capacity == cap),
        "{:?}",
        r[1]
    );
    assert!(
        matches!(r[2], Err(Error::Unaligned { op: OpKind::Write, offset, len, alignment })
            if offset == 2 * s + s / 2 && len == s && u64::from(alignment) == s),
        "{:?}",
        r[2]
    );
    assert!(r[3].is_ok(), "{:?}", r[3]);
    assert!(
        matches!(r[4], Err(Error::OutOfRange { op: OpKind::Read, offset, .. }) if offset == cap),
        "{:?}",
        r[4]
    );
    assert!(r[5].is_ok(), "{:?}", r[5]);
    assert!(
        matches!(
            r[6],
            Err(Error::OutOfRange {
                op: OpKind::WriteZeroes,
                ..
            })
        ),
        "{:?}",
        r[6]
    );
    assert!(
        matches!(
            r[7],
            Err(Error::Unaligned {
                op: OpKind::Discard,
                ..
            })
        ),
        "{:?}",
        r[7]
    );
    assert_eq!(read_ok, before[4 * su..6 * su]);

    let mut now = vec![0u8; 8 * su];
    dev.read_at(0, &mut now).unwrap();
    assert_eq!(now[..2 * su], a[..], "the valid write landed");
    assert_eq!(
        now[2 * su..6 * su],
        before[2 * su..6 * su],
        "the unaligned write changed nothing"
    );
    assert!(
        now[6 * su..7 * su].iter().all(|&b| b == 0),
        "the discard zeroed"
    );
    assert_eq!(
        now[7 * su..],
        before[7 * su..],
        "the unaligned discard changed nothing"
    );
    let mut end = vec![0u8; su];
    dev.read_at(cap - s, &mut end).unwrap();
    assert_eq!(
        end, tail,
        "the out-of-range write and write-zeroes changed nothing"
    );
}

#[test]
fn mixed_batch_memory() {
    mixed_batch_results(&MemoryDevice::new(CAP).unwrap());
    mixed_batch_results(&MemoryDevice::with_sector_size(CAP, 4096).unwrap());
}

#[test]
fn mixed_batch_files() {
    for engine in [Engine::IoUring, Engine::Sync] {
        for direct in [false, true] {
            let (_dir, path, dev) = open_file(engine, direct);
            mixed_batch_results(&dev);
            drop(dev);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), CAP);
        }
    }
}

/// The flush barrier on its own: in one batch, write A, flush, read A reads A; write-zeroes A,
/// flush, read A reads zeroes; discard, flush, write, flush, read reads the write.
fn barrier_in_batch(dev: &dyn BlockDevice) {
    let s = u64::from(dev.info().logical_sector_size) as usize;
    for round in 0..20u64 {
        let off = (round % 7) * 8 * s as u64;
        let mut a = vec![0u8; 8 * s];
        fill(round, &mut a);
        let mut b = vec![0u8; 8 * s];
        fill(round + 1000, &mut b);
        let mut r1 = vec![0u8; 8 * s];
        let mut r2 = vec![0xffu8; 8 * s];
        let mut r3 = vec![0u8; 8 * s];
        let mut batch = [
            Request::write(off, &a),
            Request::flush(),
            Request::read(off, &mut r1),
            Request::flush(),
            Request::write_zeroes(off, 8 * s as u64),
            Request::flush(),
            Request::read(off, &mut r2),
            Request::flush(),
            Request::discard(off, 4 * s as u64),
            Request::flush(),
            Request::write(off, &b),
            Request::flush(),
            Request::readv(off, r3.chunks_mut(s * 3)),
        ];
        dev.submit_all(&mut batch).unwrap();
        drop(batch);
        assert_eq!(r1, a, "write, flush, read reads the write");
        assert!(
            r2.iter().all(|&x| x == 0),
            "write-zeroes, flush, read reads zeroes"
        );
        assert_eq!(r3, b, "discard, flush, write, flush, read reads the write");
    }
}

#[test]
fn flush_is_a_barrier_in_a_batch() {
    barrier_in_batch(&MemoryDevice::new(CAP).unwrap());
    for engine in [Engine::IoUring, Engine::Sync] {
        for direct in [false, true] {
            let (_dir, _path, dev) = open_file(engine, direct);
            barrier_in_batch(&dev);
        }
    }
}

/// The barrier holds when write-zeroes takes the fallback path: tmpfs has no
/// FALLOC_FL_ZERO_RANGE, so the device writes zero buffers itself after the kernel refused the
/// fallocate, and a read behind a flush must still see zeroes.
#[test]
fn flush_is_a_barrier_when_write_zeroes_falls_back() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: no /dev/shm (tmpfs) on this machine");
        return;
    }
    const R: u64 = 1 << 20;
    let dir = tempfile::tempdir_in(shm).unwrap();
    for engine in [Engine::IoUring, Engine::Sync] {
        let opts = FileOptions {
            engine,
            ..FileOptions::default()
        };
        let dev = FileDevice::create(dir.path().join("disk.raw"), 16 * R, &opts).unwrap();
        assert_eq!(dev.engine(), engine);
        for round in 0..10u8 {
            dev.write_at(0, &vec![round + 1; 16 * R as usize]).unwrap();
            let mut backs: Vec<Vec<u8>> = (0..16).map(|_| vec![0xff; 4096]).collect();
            let mut batch = Vec::new();
            for (k, b) in backs.iter_mut().enumerate() {
                let off = k as u64 * R;
                batch.push(Request::write_zeroes(off, R));
                batch.push(Request::flush());
                // The end of the range, which a fallback writes last.
                batch.push(Request::read(off + R - 4096, b));
            }
            dev.submit_all(&mut batch).unwrap();
            drop(batch);
            for (k, b) in backs.iter().enumerate() {
                assert!(
                    b.iter().all(|&x| x == 0),
                    "{engine}: write-zeroes of MiB {k}, flush, read: the read saw old data"
                );
            }
        }
    }
}

/// Vectored requests whose pieces each start at an aligned address but have odd lengths: under
/// O_DIRECT the kernel refuses such a vector, so the device must bounce it, not fail it.
#[test]
fn vectored_aligned_pieces_of_odd_lengths() {
    for engine in [Engine::IoUring, Engine::Sync] {
        for direct in [false, true] {
            let (_dir, _path, dev) = open_file(engine, direct);
            let s = dev.info().logical_sector_size as usize;
            let lens = [100, 2 * s - 100, 1, s - 1, 3 * s];
            let total: usize = lens.iter().sum();
            let mut data = vec![0u8; total];
            fill(42, &mut data);
            let mut pieces: Vec<AlignedBuf> = lens.iter().map(|&n| AlignedBuf::new(n)).collect();
            let mut at = 0;
            for p in &mut pieces {
                let n = p.len();
                p.copy_from_slice(&data[at..at + n]);
                at += n;
            }
            let off = 8 * s as u64;
            dev.submit_all(&mut [Request::writev(off, pieces.iter().map(|p| &p[..]))])
                .unwrap();
            let mut plain = vec![0u8; total];
            dev.read_at(off, &mut plain).unwrap();
            assert_eq!(plain, data, "{engine} direct={direct}: vectored write");
            for p in &mut pieces {
                p.fill(0);
            }
            dev.submit_all(&mut [Request::readv(off, pieces.iter_mut().map(|p| &mut p[..]))])
                .unwrap();
            let back: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(back, data, "{engine} direct={direct}: vectored read");
        }
    }
}

/// A request may have more buffers than one readv/writev takes (UIO_MAXIOV, 1024 on Linux):
/// every device still reads and writes it whole.
#[test]
fn vectored_with_more_buffers_than_iov_max() {
    let check = |dev: &dyn BlockDevice, what: &str| {
        let s = dev.info().logical_sector_size as usize;
        let pieces = 1500;
        let piece = s.max(512);
        let total = pieces * piece;
        let off = s as u64;
        // Aligned pieces (no bounce needed for direct I/O) and pieces at odd addresses.
        for shift in [0usize, 3] {
            let mut src = AlignedBuf::new(total + shift);
            fill(shift as u64 + 77, &mut src[shift..]);
            let data = src[shift..].to_vec();
            dev.submit_all(&mut [Request::writev(off, src[shift..].chunks(piece))])
                .unwrap_or_else(|e| panic!("{what}: write of {pieces} buffers: {e}"));
            let mut plain = vec![0u8; total];
            dev.read_at(off, &mut plain).unwrap();
            assert!(plain == data, "{what}: write of {pieces} buffers");
            let mut dst = AlignedBuf::new(total + shift);
            dev.submit_all(&mut [Request::readv(off, dst[shift..].chunks_mut(piece))])
                .unwrap_or_else(|e| panic!("{what}: read of {pieces} buffers: {e}"));
            assert!(dst[shift..] == data[..], "{what}: read of {pieces} buffers");
        }
    };
    check(&MemoryDevice::new(CAP).unwrap(), "memory");
    for engine in [Engine::IoUring, Engine::Sync] {
        for direct in [false, true] {
            let (_dir, _path, dev) = open_file(engine, direct);
            check(&dev, &format!("{engine} direct={direct}"));
        }
    }
}
