//! `BlockDevice::allocation` on VHDX images and chains: a dynamic disk's written blocks are
//! data at depth 1 and the rest holes (depth 0, zero); in a differencing chain the child's data
//! is depth 1, its parent's depth 2, a grandparent's 3, and what no image holds a hole; a
//! partially present block is split by its sector bitmap; a block the child marks zero hides
//! its parent's data (depth 1, zero). Every answer covers the asked range exactly, aligned or
//! not, with neighbours merged, and agrees with what reads return.

use std::path::Path;
use std::sync::Arc;
use vstor_core::{BlockDevice, ErrorKind, Extent, Job};
use vstor_vhdx::live::LiveDisk;
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// What each 512-byte sector of a disk should map to: (depth, reads as zero).
struct Model(Vec<(u32, bool)>);

impl Model {
    /// A disk of `size` bytes that no image holds.
    fn holes(size: u64) -> Self {
        Model(vec![(0, true); (size / SECTOR) as usize])
    }

    fn set(&mut self, off: u64, len: u64, depth: u32, zero: bool) {
        self.0[(off / SECTOR) as usize..((off + len) / SECTOR) as usize].fill((depth, zero));
    }

    /// This model seen from a child one level up: every image is one deeper.
    fn below(&self) -> Self {
        Model(
            self.0
                .iter()
                .map(|&(d, z)| (if d == 0 { 0 } else { d + 1 }, z))
                .collect(),
        )
    }

    /// The extents of `[off, off + len)`, merged.
    fn extents(&self, off: u64, len: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        let (mut pos, end) = (off, off + len);
        while pos < end {
            let n = (SECTOR - pos % SECTOR).min(end - pos);
            let (depth, zero) = self.0[(pos / SECTOR) as usize];
            vstor_core::push_extent(
                &mut out,
                Extent {
                    len: n,
                    depth,
                    zero,
                },
            );
            pos += n;
        }
        out
    }
}

/// Checks the whole map of `dev` against `model`, then every range between a set of points
/// around the model's edges (aligned and not), and that extents marked zero read as zeroes.
fn assert_maps(dev: &dyn BlockDevice, model: &Model, what: &str) {
    let cap = dev.capacity();
    let whole = dev.allocation(0, cap).unwrap();
    assert_eq!(whole, model.extents(0, cap), "{what}: the whole disk");
    let mut pos = 0;
    let mut points = vec![0, 1, 511, cap - 1, cap];
    for e in &whole {
        if e.zero {
            let mut b = vec![0xffu8; e.len as usize];
            dev.read_at(pos, &mut b).unwrap();
            assert!(
                b.iter().all(|&x| x == 0),
                "{what}: [{pos}, +{}) is mapped zero but does not read so",
                e.len
            );
        }
        pos += e.len;
        for p in [
            pos.saturating_sub(SECTOR + 3),
            pos.saturating_sub(1),
            pos,
            pos + 100,
        ] {
            if p <= cap {
                points.push(p);
            }
        }
    }
    points.sort_unstable();
    points.dedup();
    for &a in &points {
        for &b in points.iter().filter(|&&b| b >= a) {
            let got = dev.allocation(a, b - a).unwrap();
            assert_eq!(got, model.extents(a, b - a), "{what}: [{a}, {b})");
            assert_eq!(got.iter().map(|e| e.len).sum::<u64>(), b - a);
            for w in got.windows(2) {
                assert!(
                    (w[0].depth, w[0].zero) != (w[1].depth, w[1].zero),
                    "{what}: [{a}, {b}) not merged: {got:?}"
                );
            }
        }
    }
}

fn bytes(seed: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8) | 1).collect()
}

/// A dynamic 8 MiB disk of 1 MiB blocks with data in blocks 0, 1 (4 KiB written, the block
/// allocated whole), 2 and 3 (one write across them) and 7 (the last).
fn parent(path: &Path) -> Model {
    let v = Vhdx::create(
        path,
        &CreateOptions::dynamic(8 * MIB).block_size(MIB as u32),
    )
    .unwrap();
    v.write_at(0, &bytes(1, MIB)).unwrap();
    v.write_at(MIB + 8192, &bytes(2, 4096)).unwrap();
    v.write_at(2 * MIB + 4096, &bytes(3, MIB)).unwrap();
    v.write_at(8 * MIB - 512, &bytes(4, 512)).unwrap();
    v.close().unwrap();
    let mut m = Model::holes(8 * MIB);
    m.set(0, 4 * MIB, 1, false);
    m.set(7 * MIB, MIB, 1, false);
    m
}

#[test]
fn a_dynamic_disk_maps_its_written_blocks_at_depth_1_and_the_rest_as_holes() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.vhdx");
    let mut model = parent(&p);
    let v = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert_maps(&v, &model, "dynamic");
    assert_eq!(
        v.allocation(0, 8 * MIB).unwrap(),
        vec![
            Extent::data(4 * MIB, 1),
            Extent::hole(3 * MIB),
            Extent::data(MIB, 1)
        ]
    );
    drop(v);
    // Zeroes written over a hole leave it one; a discarded block becomes one.
    let v = Vhdx::open(&p, &OpenOptions::default()).unwrap();
    v.write_zeroes(5 * MIB, MIB).unwrap();
    v.discard(2 * MIB, MIB).unwrap();
    model.set(2 * MIB, MIB, 0, true);
    assert_maps(&v, &model, "after zeroes and a discard");
    // A fixed disk holds every block.
    let f = Vhdx::create(d.path().join("f.vhdx"), &CreateOptions::fixed(4 * MIB)).unwrap();
    assert_eq!(
        f.allocation(0, 4 * MIB).unwrap(),
        vec![Extent::data(4 * MIB, 1)]
    );
}

/// A child over `parent(p)`: block 0 zeroed whole (hiding the parent's data), block 1
/// rewritten whole, 4 KiB at 2 MiB + 8 KiB (a partially present block), block 5 its own, block
/// 6 nobody's.
fn child(p: &Path, c: &Path, below: &Model) -> Model {
    let v = Vhdx::create(c, &CreateOptions::differencing(p)).unwrap();
    v.write_zeroes(0, MIB).unwrap();
    v.write_at(MIB, &bytes(5, MIB)).unwrap();
    v.write_at(2 * MIB + 8192, &bytes(6, 4096)).unwrap();
    v.write_at(5 * MIB, &bytes(7, MIB)).unwrap();
    v.close().unwrap();
    let mut m = below.below();
    m.set(0, MIB, 1, true);
    m.set(MIB, MIB, 1, false);
    m.set(2 * MIB + 8192, 4096, 1, false);
    m.set(5 * MIB, MIB, 1, false);
    m
}

#[test]
fn a_differencing_chain_tells_each_image_by_its_depth() {
    let d = tempfile::tempdir().unwrap();
    let (p, c, g) = (
        d.path().join("p.vhdx"),
        d.path().join("c.avhdx"),
        d.path().join("g.avhdx"),
    );
    let pm = parent(&p);
    let cm = child(&p, &c, &pm);
    let v = Vhdx::open(&c, &OpenOptions::read_only()).unwrap();
    assert_maps(&v, &cm, "child");
    assert_eq!(
        v.allocation(0, 8 * MIB).unwrap(),
        vec![
            Extent {
                len: MIB,
                depth: 1,
                zero: true
            },
            Extent::data(MIB, 1),
            Extent::data(8192, 2),
            Extent::data(4096, 1),
            Extent::data(2 * MIB - 8192 - 4096, 2),
            Extent::hole(MIB),
            Extent::data(MIB, 1),
            Extent::hole(MIB),
            Extent::data(MIB, 2),
        ]
    );
    // Inside the partially present block, at sector and byte edges.
    assert_eq!(
        v.allocation(2 * MIB + 8192 - 100, 300).unwrap(),
        vec![Extent::data(100, 2), Extent::data(200, 1)]
    );
    assert_eq!(
        v.allocation(2 * MIB + 8192 + 4096 - 1, 2).unwrap(),
        vec![Extent::data(1, 1), Extent::data(1, 2)]
    );
    assert_eq!(
        v.allocation(2 * MIB + 8192 + 7, 10).unwrap(),
        vec![Extent::data(10, 1)]
    );
    // The parent alone still maps as it did.
    assert_maps(&**v.parent().unwrap(), &pm, "the child's parent");
    drop(v);

    // A grandchild: its own writes at depth 1, everything below one deeper; the child's zeroed
    // block is depth 2 and still zero.
    {
        let v = Vhdx::create(&g, &CreateOptions::differencing(&c)).unwrap();
        v.write_at(6 * MIB + 512, &bytes(8, 1024)).unwrap();
        v.close().unwrap();
    }
    let mut gm = cm.below();
    gm.set(6 * MIB + 512, 1024, 1, false);
    let v = Vhdx::open(&g, &OpenOptions::read_only()).unwrap();
    assert_maps(&v, &gm, "grandchild");
    assert_eq!(
        &v.allocation(0, 4 * MIB).unwrap()[..2],
        &[
            Extent {
                len: MIB,
                depth: 2,
                zero: true
            },
            Extent::data(MIB, 2)
        ]
    );
    assert_eq!(
        v.allocation(3 * MIB, MIB).unwrap(),
        vec![Extent::data(MIB, 3)]
    );
}

#[test]
fn a_child_grown_past_its_parent_maps_the_new_end_as_a_hole() {
    let d = tempfile::tempdir().unwrap();
    let (p, c) = (d.path().join("p.vhdx"), d.path().join("c.avhdx"));
    let pm = parent(&p);
    let cm = child(&p, &c, &pm);
    let v = Vhdx::open(&c, &OpenOptions::default()).unwrap();
    v.resize(16 * MIB).unwrap();
    v.write_at(12 * MIB, &bytes(9, 4096)).unwrap();
    let mut m = Model::holes(16 * MIB);
    m.0[..cm.0.len()].copy_from_slice(&cm.0);
    m.set(12 * MIB, 4096, 1, false);
    assert_maps(&v, &m, "grown child");
    assert_eq!(
        v.allocation(8 * MIB, 8 * MIB).unwrap(),
        vec![
            Extent::hole(4 * MIB),
            Extent::data(4096, 1),
            Extent::hole(4 * MIB - 4096)
        ]
    );
}

#[test]
fn the_map_survives_a_reopen_and_a_range_past_the_end_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (p, c) = (d.path().join("p.vhdx"), d.path().join("c.avhdx"));
    let pm = parent(&p);
    let cm = child(&p, &c, &pm);
    for round in 0..2 {
        let v = Vhdx::open(&c, &OpenOptions::default()).unwrap();
        assert_maps(&v, &cm, &format!("reopen {round}"));
        for (off, len) in [
            (8 * MIB, 1),
            (8 * MIB - 1, 2),
            (0, 8 * MIB + 1),
            (u64::MAX, 2),
        ] {
            let e = v.allocation(off, len).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::OutOfRange, "[{off}, +{len}): {e}");
        }
        assert!(v.allocation(8 * MIB, 0).unwrap().is_empty());
        v.close().unwrap();
    }
}

#[test]
fn a_live_disk_maps_through_its_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("live.vhdx");
    let pm = parent(&p);
    let live = Arc::new(LiveDisk::open(&p).unwrap());
    assert_maps(&*live, &pm, "live, no checkpoint");
    live.checkpoint(None).unwrap();
    live.write_at(6 * MIB, &bytes(10, 512)).unwrap();
    let mut m = pm.below();
    m.set(6 * MIB, 512, 1, false);
    assert_maps(&*live, &m, "live, after a checkpoint");
    live.merge_checkpoint(&Job::new()).unwrap();
    // Merged into a dynamic disk, the block is allocated whole.
    let mut merged = pm;
    merged.set(6 * MIB, MIB, 1, false);
    assert_maps(&*live, &merged, "live, merged back");
}
