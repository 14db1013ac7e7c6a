//! `BlockDevice::allocation` on pool spaces: a thin space's extents that hold no slabs yet are
//! holes (depth 0, zero), its allocated ones data at depth 1; a discard that frees an extent
//! makes it a hole again, a growth adds holes, a fixed space is data throughout. Every answer
//! covers the asked range exactly with neighbours merged, agrees with the pool's count of
//! allocated extents and survives a reopen; a range past the end is refused. In every layout.

mod common;

use common::*;
use vstor_core::{BlockDevice, ErrorKind, Extent};
use vstor_spaces::{Provisioning, Resiliency};

/// Bytes of one extent of a space of `cols` columns with resiliency `res` (test slabs).
fn extent_bytes(res: Resiliency, cols: usize) -> u64 {
    let data_cols = match res {
        Resiliency::Parity { redundancy } => cols - usize::from(redundancy),
        _ => cols,
    };
    SLAB * data_cols as u64
}

/// The map of a space of `size` bytes whose extents in `held` are allocated, for
/// `[off, off + len)`.
fn expected(eb: u64, held: &[bool], off: u64, len: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    let (mut pos, end) = (off, off + len);
    while pos < end {
        let n = (eb - pos % eb).min(end - pos);
        let e = if held[(pos / eb) as usize] {
            Extent::data(n, 1)
        } else {
            Extent::hole(n)
        };
        vstor_core::push_extent(&mut out, e);
        pos += n;
    }
    out
}

/// The whole map and every range between points around the extents' edges, against `held`.
fn assert_maps(space: &dyn BlockDevice, eb: u64, held: &[bool], what: &str) {
    let cap = space.capacity();
    assert_eq!(
        space.allocation(0, cap).unwrap(),
        expected(eb, held, 0, cap),
        "{what}: the whole space"
    );
    let mut points = vec![0, 1, cap - 1, cap];
    for k in 1..=cap / eb {
        for p in [k * eb - 4097, k * eb - 1, k * eb, k * eb + 1, k * eb + 4096] {
            if p <= cap {
                points.push(p);
            }
        }
    }
    points.sort_unstable();
    points.dedup();
    for &a in &points {
        for &b in points.iter().filter(|&&b| b >= a) {
            let got = space.allocation(a, b - a).unwrap();
            assert_eq!(got, expected(eb, held, a, b - a), "{what}: [{a}, {b})");
            assert_eq!(got.iter().map(|e| e.len).sum::<u64>(), b - a);
            for w in got.windows(2) {
                assert_ne!(
                    (w[0].depth, w[0].zero),
                    (w[1].depth, w[1].zero),
                    "{what}: not merged: {got:?}"
                );
            }
        }
    }
    // What the map calls holes reads as zeroes.
    let all = contents(space);
    let mut pos = 0;
    for e in space.allocation(0, cap).unwrap() {
        if e.zero {
            assert!(
                all[pos as usize..(pos + e.len) as usize]
                    .iter()
                    .all(|&x| x == 0),
                "{what}: hole at {pos} does not read as zeroes"
            );
        }
        pos += e.len;
    }
}

#[test]
fn a_thin_space_maps_its_unallocated_extents_as_holes() {
    for (label, res, cols, disks) in layouts() {
        let eb = extent_bytes(res, cols);
        let devs = mem_disks(disks, 24 << 20);
        let pool = create(&devs);
        // Four and a half extents: the last one is short.
        let size = 4 * eb + eb / 2;
        pool.create_space(&spec("t", size, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("t").unwrap();
        let mut held = vec![false; 5];
        assert_eq!(
            space.allocation(0, size).unwrap(),
            vec![Extent::hole(size)],
            "{label}: nothing written"
        );
        // 4 KiB in extent 1, 8 KiB across the edge of extents 2 and 3, 512 bytes in the last.
        space.write_at(eb + 4096, &pattern(1, 4096)).unwrap();
        space.write_at(3 * eb - 4096, &pattern(2, 8192)).unwrap();
        space.write_at(size - 4096, &pattern(3, 4096)).unwrap();
        held[1] = true;
        held[2] = true;
        held[3] = true;
        held[4] = true;
        space.flush().unwrap();
        assert_maps(&space, eb, &held, label);
        assert_eq!(
            space.allocation(0, size).unwrap(),
            vec![Extent::hole(eb), Extent::data(size - eb, 1)],
            "{label}"
        );
        let count = |pool: &vstor_spaces::Pool| pool.space_info("t").unwrap().allocated_extents;
        assert_eq!(count(&pool), 4, "{label}");

        // A discard that covers extent 2 whole gives it back: a hole again. One that covers a
        // part of extent 3 leaves it data (zeroed, but still held).
        space.discard(2 * eb, eb + 4096).unwrap();
        held[2] = false;
        assert_eq!(count(&pool), 3, "{label}");
        assert_maps(&space, eb, &held, &format!("{label}: after a discard"));

        // Grown online: the new extents are holes until written.
        pool.resize_space("t", 7 * eb).unwrap();
        assert_eq!(space.capacity(), 7 * eb, "{label}");
        held.extend([false, false]);
        assert_maps(&space, eb, &held, &format!("{label}: grown"));
        space.write_at(6 * eb, &pattern(4, 4096)).unwrap();
        held[6] = true;
        space.flush().unwrap();
        assert_maps(&space, eb, &held, &format!("{label}: grown and written"));

        // Out of range.
        let cap = space.capacity();
        for (off, len) in [(cap, 1), (cap - 1, 2), (0, cap + 1), (u64::MAX, 2)] {
            let e = space.allocation(off, len).unwrap_err();
            assert_eq!(
                e.kind(),
                ErrorKind::OutOfRange,
                "{label}: [{off}, +{len}): {e}"
            );
        }
        assert!(space.allocation(cap, 0).unwrap().is_empty());

        // The allocation is in the metadata: a reopen maps the same.
        drop(space);
        drop(pool);
        let pool = open(&devs, &[], true);
        let space = pool.open_space("t").unwrap();
        assert_maps(&space, eb, &held, &format!("{label}: reopened"));
    }
}

#[test]
fn a_fixed_space_is_data_throughout() {
    for (label, res, cols, disks) in layouts() {
        let eb = extent_bytes(res, cols);
        let devs = mem_disks(disks, 24 << 20);
        let pool = create(&devs);
        let mut s = spec("f", 3 * eb, res, Some(cols));
        s.provisioning = Provisioning::Fixed;
        pool.create_space(&s).unwrap();
        let space = pool.open_space("f").unwrap();
        assert_maps(&space, eb, &[true; 3], label);
        assert_eq!(
            space.allocation(0, 3 * eb).unwrap(),
            vec![Extent::data(3 * eb, 1)],
            "{label}"
        );
    }
}
