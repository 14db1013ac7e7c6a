//! The RAID write hole, closed by the parity journal: a power cut at every write of a sequence
//! of partial-row parity updates (single and dual parity), then the pool opened with a member
//! (each in turn; each pair for dual parity) missing before any resync could run. Every block
//! written before the last completed flush reads back as written, a block of the update in
//! flight reads as it was before or after it, and every other block (the neighbours in the
//! same rows that were never written) reads as it always was.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::{BlockDevice, Request};
use vstor_spaces::{OpenOptions, Pool, Resiliency};

const DISK: u64 = 6 << 20;
const SPACE: u64 = 2 << 20;
/// The interleave of the wrap test: three data columns of 256 KiB, rows of 768 KiB.
const FILL_INTERLEAVE: u64 = 256 << 10;

/// A pool with one space of `res` (with `interleave`), written whole and flushed.
fn golden(res: Resiliency, cols: usize, n: usize, interleave: u64) -> (Vec<Vec<u8>>, Vec<u8>) {
    let devs = mem_disks(n, DISK);
    let pool = create(&devs);
    let mut sp = spec("s", SPACE, res, Some(cols));
    sp.interleave = Some(interleave);
    pool.create_space(&sp).unwrap();
    let space = pool.open_space("s").unwrap();
    let data = pattern(11, SPACE as usize);
    space.write_at(0, &data).unwrap();
    space.flush().unwrap();
    drop((space, pool));
    (devs.iter().map(|d| contents(&**d)).collect(), data)
}

/// Steps of partial-row writes (each one batch, then a flush): every write covers part of
/// one or two data columns of its rows, so the rest of each row is never written.
fn steps() -> Vec<Vec<(u64, Vec<u8>)>> {
    vec![
        vec![(4096, pattern(21, 4096)), (200 << 10, pattern(22, 8192))],
        vec![
            (4096 + 512, pattern(23, 1024)),
            ((600 << 10) + 1536, pattern(24, 20 << 10)),
        ],
        vec![
            ((1200 << 10) + 512, pattern(25, 3072)),
            (8192, pattern(26, 4096)),
        ],
    ]
}

/// Steps that fill the journals so they wrap (a new generation) in the middle of the
/// sequence: first a small partial write to every row (run before the cut points: it puts
/// every row in the journal's current generation), then writes over nearly the whole space
/// (rows that are full but journaled all the same, since their rows have records), then a
/// small partial write.
fn filling_steps() -> Vec<Vec<(u64, Vec<u8>)>> {
    let row = 3 * FILL_INTERLEAVE;
    let mut out = vec![(0..SPACE / row)
        .map(|r| (r * row + 1024, pattern(40 + r, 512)))
        .collect()];
    for i in 0..3u64 {
        out.push(vec![(512, pattern(141 + i, SPACE as usize - 1024))]);
    }
    out.push(vec![(8192 + 512, pattern(149, 2048))]);
    out
}

/// The space after the first `n` of `steps`.
fn after(old: &[u8], steps: &[Vec<(u64, Vec<u8>)>], n: usize) -> Vec<u8> {
    let mut v = old.to_vec();
    for step in &steps[..n] {
        for (at, d) in step {
            v[*at as usize..*at as usize + d.len()].copy_from_slice(d);
        }
    }
    v
}

/// Every set of `k` members of `n`.
fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    if k == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for first in 0..n {
        for mut rest in subsets(n, k - 1) {
            if rest.iter().all(|&r| r > first) {
                rest.insert(0, first);
                out.push(rest);
            }
        }
    }
    out
}

fn cut_then_lose(
    label: &str,
    res: Resiliency,
    cols: usize,
    n: usize,
    steps: &[Vec<(u64, Vec<u8>)>],
    pre: usize,
    pairs: bool,
) {
    let interleave = if pre > 0 { FILL_INTERLEAVE } else { INTERLEAVE };
    let (media, old) = golden(res, cols, n, interleave);
    let states: Vec<Vec<u8>> = (0..=steps.len()).map(|i| after(&old, steps, i)).collect();
    let mut losses: Vec<Vec<usize>> = subsets(n, 1);
    if res.tolerates() == 2 && pairs {
        losses.extend(subsets(n, 2));
    }
    let mut cuts = 0;
    let mut replayed = 0;
    for k in 1.. {
        let g = Group::new(&media, DISK, k);
        let pool = Pool::open(g.disks(), &OpenOptions::default()).unwrap();
        let space = pool.open_space("s").unwrap();
        let mut flushed = 0;
        for (i, step) in steps.iter().enumerate() {
            if i == pre {
                g.cut_after(k);
            }
            let mut batch: Vec<Request> =
                step.iter().map(|(at, d)| Request::write(*at, d)).collect();
            batch.push(Request::flush());
            space.submit(&mut batch);
            if batch.iter().any(|r| r.result().is_err()) {
                break;
            }
            flushed += 1;
        }
        let wraps = pool.info().journal.wraps;
        drop((space, pool));
        if !g.cut_happened() {
            assert_eq!(flushed, steps.len(), "{label}");
            // The sequence had the journals wrap where every cut point was tried.
            assert_eq!(wraps > 0, pre > 0, "{label}: {wraps} wraps");
            break;
        }
        cuts += 1;
        g.power_on();
        let media_after = g.media();
        for lost in &losses {
            let devs = from_media(&media_after, DISK);
            // Writable: the journal is replayed before anything else; the lost members are
            // recorded failed.
            let pool = open(&devs, lost, false);
            replayed += pool.info().journal.replayed_batches;
            let got = read_all(&pool.open_space("s").unwrap());
            for (b, block) in got.chunks(512).enumerate() {
                let r = b * 512..(b + 1) * 512;
                let before = &states[flushed][r.clone()];
                let inflight = states.get(flushed + 1).map(|s| &s[r]);
                assert!(
                    block == before || inflight == Some(block),
                    "{label}: cut at write {k} (after {flushed} flushed steps), members {lost:?} lost: block {b} (byte {}) is wrong{}",
                    b * 512,
                    if old[b * 512..(b + 1) * 512] == *before && inflight.is_none_or(|i| i == before) {
                        " and was never written"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    assert!(cuts >= 10, "{label}: only {cuts} cut points");
    assert!(
        replayed > 0,
        "{label}: no cut left a journaled update to replay"
    );
}

#[test]
fn single_parity_power_cut_then_member_loss() {
    cut_then_lose(
        "parity1",
        Resiliency::Parity { redundancy: 1 },
        4,
        5,
        &steps(),
        0,
        true,
    );
}

#[test]
fn power_cut_then_member_loss_while_the_journals_wrap() {
    let steps = filling_steps();
    cut_then_lose(
        "parity1",
        Resiliency::Parity { redundancy: 1 },
        4,
        5,
        &steps,
        1,
        true,
    );
    cut_then_lose(
        "parity2",
        Resiliency::Parity { redundancy: 2 },
        5,
        6,
        &steps,
        1,
        false,
    );
}

#[test]
fn dual_parity_power_cut_then_loss_of_one_or_two_members() {
    cut_then_lose(
        "parity2",
        Resiliency::Parity { redundancy: 2 },
        5,
        6,
        &steps(),
        0,
        true,
    );
}

#[test]
fn subsets_are_all_pairs() {
    assert_eq!(subsets(4, 2).len(), 6);
    assert_eq!(subsets(3, 1), vec![vec![0], vec![1], vec![2]]);
}

/// One batch of many partial-row writes costs one journal block per member it touches and
/// one flush each; full-row writes skip the journal.
#[test]
fn a_batch_costs_one_journal_write_per_member() {
    let devs = mem_disks(5, 16 << 20);
    let pool = create(&devs);
    pool.create_space(&spec(
        "s",
        4 << 20,
        Resiliency::Parity { redundancy: 1 },
        Some(5),
    ))
    .unwrap();
    let space = pool.open_space("s").unwrap();
    // A full-row write (4 data columns of 16 KiB): no journal.
    space.write_at(0, &pattern(1, 4 << 20)).unwrap();
    assert_eq!(pool.info().journal.batches, 0);
    let bufs: Vec<Vec<u8>> = (0..16).map(|i| pattern(100 + i, 4096)).collect();
    let mut batch: Vec<Request> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| Request::write(i as u64 * (64 << 10) + 8192, b))
        .collect();
    space.submit(&mut batch);
    batch.iter().for_each(|r| r.result().unwrap());
    drop(batch);
    let j = pool.info().journal;
    assert_eq!(j.batches, 1, "{j:?}");
    assert!(j.blocks <= 5, "{j:?}");
    // A full-row write to a row with a record in this generation is journaled too.
    space.write_at(0, &pattern(2, 64 << 10)).unwrap();
    assert_eq!(pool.info().journal.batches, 2);
    let mut model = pattern(1, 4 << 20);
    for (i, b) in bufs.iter().enumerate() {
        let at = i * (64 << 10) + 8192;
        model[at..at + 4096].copy_from_slice(b);
    }
    model[..64 << 10].copy_from_slice(&pattern(2, 64 << 10));
    drop((space, pool));
    let pool = open(&devs, &[], false);
    let space = pool.open_space("s").unwrap();
    assert!(read_all(&space) == model);
    // A clean close left nothing to replay.
    assert_eq!(pool.info().journal.replayed_batches, 0);
}

/// Batches bigger than a journal are cut into parts, and a full journal starts a new
/// generation: the data is right, through a crash-free reopen and with a member lost.
#[test]
fn big_batches_and_journal_wraps() {
    let devs = mem_disks(4, 24 << 20);
    let pool = create(&devs);
    let mut s = spec("s", 8 << 20, Resiliency::Parity { redundancy: 1 }, Some(4));
    s.interleave = Some(512 << 10);
    pool.create_space(&s).unwrap();
    let space = pool.open_space("s").unwrap();
    let mut model = vec![0u8; 8 << 20];
    // Rows of 3 x 512 KiB; writes of 2 MiB + 4 KiB starting inside column 0: two partial rows
    // each, whose records are bigger than a journal.
    for (i, at) in [4096u64, (3 << 20) + 8192, (5 << 20) + 12288]
        .into_iter()
        .enumerate()
    {
        let d = pattern(300 + i as u64, (2 << 20) + 4096);
        space.write_at(at, &d).unwrap();
        model[at as usize..at as usize + d.len()].copy_from_slice(&d);
    }
    // Many small partial writes: the journal fills and wraps.
    for i in 0..600u64 {
        let at = (i * 13_000) % ((8 << 20) - 4096) / 512 * 512;
        let d = pattern(1000 + i, 2048);
        space.write_at(at, &d).unwrap();
        model[at as usize..at as usize + 2048].copy_from_slice(&d);
    }
    let j = pool.info().journal;
    assert!(j.wraps > 0, "{j:?}");
    assert!(read_all(&space) == model);
    drop((space, pool));
    for lost in 0..4 {
        let copies: Vec<Arc<dyn BlockDevice>> = from_media(
            &devs.iter().map(|d| contents(&**d)).collect::<Vec<_>>(),
            24 << 20,
        );
        let pool = open(&copies, &[lost], true);
        assert!(
            read_all(&pool.open_space("s").unwrap()) == model,
            "lost {lost}"
        );
    }
}

/// A pool of format version 2 (made before the journal: no journal area, slabs 1 MiB
/// earlier) still opens and works without a journal, says so, and stays version 2.
#[test]
fn a_format_version_2_pool_opens_without_a_journal_and_stays_version_2() {
    let devs = mem_disks(4, 16 << 20);
    drop(create(&devs));
    // Make the members what a version 2 vstor wrote: version 2, the bitmap and the slabs
    // where they were (1 MiB earlier), nothing in the bitmap.
    for d in &devs {
        d.write_at(2 << 20, &vec![0u8; 2 << 20]).unwrap();
        for slot in [0u64, 1 << 20] {
            let mut b = vec![0u8; 4096];
            d.read_at(slot, &mut b).unwrap();
            assert_eq!(&b[8..12], &vstor_spaces::format::VERSION.to_le_bytes());
            b[8..12].copy_from_slice(&2u32.to_le_bytes());
            // No write epoch and no flags before version 4.
            b[20..24].fill(0);
            b[120..128].fill(0);
            let ds = u64::from_le_bytes(b[104..112].try_into().unwrap());
            b[104..112].copy_from_slice(&(ds - (1 << 20)).to_le_bytes());
            vstor_spaces::format::reseal(&mut b);
            d.write_at(slot, &b).unwrap();
        }
    }
    let pool = open(&devs, &[], false);
    let info = pool.info();
    assert_eq!((info.format_version, info.data_start), (2, 3 << 20));
    assert!(
        info.notes.iter().any(|n| n.contains("no parity journal")),
        "{:?}",
        info.notes
    );
    pool.create_space(&spec(
        "s",
        2 << 20,
        Resiliency::Parity { redundancy: 1 },
        Some(4),
    ))
    .unwrap();
    let space = pool.open_space("s").unwrap();
    let mut model = pattern(7, 2 << 20);
    space.write_at(0, &model).unwrap();
    let d = pattern(8, 4096);
    space.write_at(12288, &d).unwrap();
    model[12288..12288 + 4096].copy_from_slice(&d);
    assert_eq!(pool.info().journal.batches, 0);
    drop((space, pool));
    let pool = open(&devs, &[1], false);
    assert_eq!(pool.info().format_version, 2);
    assert!(read_all(&pool.open_space("s").unwrap()) == model);
    drop(pool);
    // Read-only: no journal, nothing pending, the space opens.
    let pool = open(&devs, &[1], true);
    assert_eq!(pool.info().journal.pending_batches, 0);
    assert!(read_all(&pool.open_space("s").unwrap()) == model);
    drop(pool);
    let mut b = vec![0u8; 4096];
    devs[0].read_at(0, &mut b).unwrap();
    assert_eq!(&b[8..12], &2u32.to_le_bytes());
}
