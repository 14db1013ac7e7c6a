//! `BlockDevice::allocation` on files and through the layers that only forward it: the holes of
//! a sparse file (SEEK_HOLE) are depth 0 and read as zeroes, its data is depth 1; the extents
//! cover the asked range exactly, in order, with neighbours of the same status merged; a range
//! past the end is refused. Needs a file system that reports holes (ext4, xfs, btrfs, tmpfs):
//! on one that does not, the sparse-file tests fail rather than pass.

use std::sync::Arc;
use vstor_core::{BlockDevice, ErrorKind, Extent, FileDevice, FileOptions, MemoryDevice};

const BLOCK: u64 = 4096;

/// The extents `model` (one flag per 4 KiB block: holds data) gives for `[off, off + len)`.
fn expected(model: &[bool], off: u64, len: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    let (mut pos, end) = (off, off + len);
    while pos < end {
        let n = (BLOCK - pos % BLOCK).min(end - pos);
        let e = if model[(pos / BLOCK) as usize] {
            Extent::data(n, 1)
        } else {
            Extent::hole(n)
        };
        vstor_core::push_extent(&mut out, e);
        pos += n;
    }
    out
}

/// The invariants of every answer: extents that cover `len` exactly, none empty, no two
/// neighbours alike, depth 0 exactly where the range reads as zeroes for want of data.
fn assert_well_formed(got: &[Extent], len: u64) {
    assert_eq!(got.iter().map(|e| e.len).sum::<u64>(), len, "{got:?}");
    assert!(got.iter().all(|e| e.len > 0), "an empty extent: {got:?}");
    for w in got.windows(2) {
        assert!(
            (w[0].depth, w[0].zero) != (w[1].depth, w[1].zero),
            "neighbours not merged: {got:?}"
        );
    }
}

/// A sparse file of 64 blocks with data in blocks 1, 2 and 3 (written apart, one extent
/// after merging), 10, 40 to 47 and 63 (the last).
fn sparse(dir: &std::path::Path, opts: &FileOptions) -> (FileDevice, Vec<bool>) {
    let dev = FileDevice::create(dir.join("sparse.raw"), 64 * BLOCK, opts).unwrap();
    let mut model = vec![false; 64];
    for b in [1u64, 3, 2, 10, 63] {
        dev.write_at(b * BLOCK, &[0xa5; BLOCK as usize]).unwrap();
        model[b as usize] = true;
    }
    dev.write_at(40 * BLOCK, &[0x5a; 8 * BLOCK as usize])
        .unwrap();
    model[40..48].fill(true);
    dev.flush().unwrap();
    (dev, model)
}

#[test]
fn a_sparse_file_maps_its_holes_at_depth_0_and_its_data_at_depth_1() {
    for direct in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let opts = FileOptions {
            direct,
            ..Default::default()
        };
        let (dev, model) = sparse(d.path(), &opts);
        let cap = dev.capacity();
        let whole = dev.allocation(0, cap).unwrap();
        assert_eq!(
            whole,
            vec![
                Extent::hole(BLOCK),
                Extent::data(3 * BLOCK, 1),
                Extent::hole(6 * BLOCK),
                Extent::data(BLOCK, 1),
                Extent::hole(29 * BLOCK),
                Extent::data(8 * BLOCK, 1),
                Extent::hole(15 * BLOCK),
                Extent::data(BLOCK, 1),
            ],
            "direct={direct}: the file system reports no holes?"
        );
        assert!(whole.iter().all(|e| e.zero == (e.depth == 0)), "{whole:?}");
        // Every piece of the map, aligned or not, starting and ending inside extents or on
        // their edges.
        let points = [
            0,
            1,
            BLOCK - 1,
            BLOCK,
            BLOCK + 7,
            3 * BLOCK,
            4 * BLOCK,
            10 * BLOCK + 100,
            11 * BLOCK,
            40 * BLOCK - 1,
            44 * BLOCK + 511,
            63 * BLOCK,
            cap - 1,
            cap,
        ];
        for &a in &points {
            for &b in points.iter().filter(|&&b| b >= a) {
                let got = dev.allocation(a, b - a).unwrap();
                assert_well_formed(&got, b - a);
                assert_eq!(
                    got,
                    expected(&model, a, b - a),
                    "direct={direct} [{a}, {b})"
                );
            }
        }
    }
}

#[test]
fn a_punched_range_becomes_a_hole_and_a_rewritten_one_data_again() {
    let d = tempfile::tempdir().unwrap();
    let (dev, mut model) = sparse(d.path(), &FileOptions::default());
    assert!(dev.info().supports.discard, "{}", dev.describe());
    dev.discard(42 * BLOCK, 2 * BLOCK).unwrap();
    model[42..44].fill(false);
    dev.write_at(20 * BLOCK, &[1; BLOCK as usize]).unwrap();
    model[20] = true;
    dev.flush().unwrap();
    let got = dev.allocation(0, dev.capacity()).unwrap();
    assert_eq!(got, expected(&model, 0, dev.capacity()));
    assert!(got.contains(&Extent::hole(2 * BLOCK)), "{got:?}");
    // What the map calls a hole reads as zeroes.
    let mut pos = 0;
    for e in &got {
        if e.zero {
            let mut b = vec![0xff; e.len as usize];
            dev.read_at(pos, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == 0), "[{pos}, +{}) is not zero", e.len);
        }
        pos += e.len;
    }
}

#[test]
fn a_file_with_no_holes_is_one_data_extent_and_an_empty_range_none() {
    let d = tempfile::tempdir().unwrap();
    let dev =
        FileDevice::create(d.path().join("full.raw"), 16 * BLOCK, &Default::default()).unwrap();
    dev.write_at(0, &[7; 16 * BLOCK as usize]).unwrap();
    dev.flush().unwrap();
    assert_eq!(
        dev.allocation(0, 16 * BLOCK).unwrap(),
        vec![Extent::data(16 * BLOCK, 1)]
    );
    assert_eq!(dev.allocation(5, 100).unwrap(), vec![Extent::data(100, 1)]);
    assert_eq!(dev.allocation(0, 0).unwrap(), vec![]);
    assert_eq!(dev.allocation(16 * BLOCK, 0).unwrap(), vec![]);
    // A file of holes only.
    let empty =
        FileDevice::create(d.path().join("empty.raw"), 16 * BLOCK, &Default::default()).unwrap();
    assert_eq!(
        empty.allocation(0, 16 * BLOCK).unwrap(),
        vec![Extent::hole(16 * BLOCK)]
    );
    assert_eq!(
        empty.allocation(BLOCK + 3, 5).unwrap(),
        vec![Extent::hole(5)]
    );
}

#[test]
fn a_range_past_the_end_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (file, _) = sparse(d.path(), &FileOptions::default());
    let mem = MemoryDevice::new(64 * BLOCK).unwrap();
    let devs: [&dyn BlockDevice; 2] = [&file, &mem];
    for dev in devs {
        let cap = dev.capacity();
        for (off, len) in [
            (cap, 1),
            (cap - 1, 2),
            (0, cap + 1),
            (cap + BLOCK, 0),
            (u64::MAX, 2),
            (1, u64::MAX),
        ] {
            let e = dev.allocation(off, len).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::OutOfRange, "[{off}, +{len}): {e}");
        }
        assert!(dev.allocation(cap, 0).unwrap().is_empty());
    }
}

#[test]
fn wrappers_forward_the_map_and_a_device_that_knows_nothing_calls_it_all_data() {
    let d = tempfile::tempdir().unwrap();
    let (file, model) = sparse(d.path(), &FileOptions::default());
    let cap = file.capacity();
    let want = expected(&model, 0, cap);
    let arc: Arc<dyn BlockDevice> = Arc::new(file);
    assert_eq!(arc.allocation(0, cap).unwrap(), want);
    let boxed: Box<dyn BlockDevice> = Box::new(arc.clone());
    assert_eq!(boxed.allocation(0, cap).unwrap(), want);
    // Memory holds every byte: data at depth 1, whatever was written.
    let mem = MemoryDevice::new(cap).unwrap();
    assert_eq!(mem.allocation(0, cap).unwrap(), vec![Extent::data(cap, 1)]);
    assert_eq!(mem.allocation(3, 10).unwrap(), vec![Extent::data(10, 1)]);
}
