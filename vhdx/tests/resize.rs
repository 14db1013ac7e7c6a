//! Online resize: grow, shrink, growth past the BAT region (blocks move), differencing disks,
//! resize while other threads write, a power cut at every write of a resize, bad input.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vstor_core::{BlockDevice, CutPolicy, Error, FaultDevice, FaultRule, Job, OpKind};
use vstor_vhdx::check::{check, check_device};
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx, VhdxError};

mod common;
mod tagmodel;

use tagmodel::{fill, tag_of};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn pattern(len: u64, tag: u32) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    fill(&mut b, tag);
    b
}

fn expect(v: &Vhdx, off: u64, len: u64, tag: u32) {
    let mut b = vec![0u8; len as usize];
    v.read_at(off, &mut b).unwrap();
    for (i, s) in b.chunks_exact(512).enumerate() {
        assert_eq!(
            tag_of(s),
            Some(tag),
            "sector at {} should hold tag {tag:#x}",
            off + i as u64 * 512
        );
    }
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn qemu_check(p: &Path) {
    let out = common::run(
        Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(p),
    );
    assert!(out.contains("No errors"), "qemu-img check: {out}");
}

/// QEMU reads the same bytes as vstor.
fn qemu_same(p: &Path) {
    let raw = p.with_extension("raw");
    common::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(p)
            .arg(&raw),
    );
    let v = Vhdx::open(p, &OpenOptions::read_only()).unwrap();
    let mut mine = vec![0u8; v.capacity() as usize];
    v.read_at(0, &mut mine).unwrap();
    assert!(
        std::fs::read(&raw).unwrap() == mine,
        "qemu-img reads other bytes"
    );
}

#[test]
fn grow_and_shrink_keep_data_and_tell_holders() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let v = Vhdx::create(
        &path,
        &CreateOptions::dynamic(64 * MIB).block_size(MIB as u32),
    )
    .unwrap();
    let sig = v.capacity_signal().unwrap();
    let (_, gen0) = sig.current();
    v.write_at(0, &pattern(MIB, 1)).unwrap();
    v.write_at(5 * MIB + 4096, &pattern(8192, 2)).unwrap();
    v.flush().unwrap();

    let r = v.resize_with(200 * MIB, &Job::new()).unwrap();
    assert_eq!(
        (r.old_size, r.new_size, r.moved_blocks),
        (64 * MIB, 200 * MIB, 0)
    );
    assert_eq!(v.capacity(), 200 * MIB);
    assert_eq!(sig.current(), (200 * MIB, gen0 + 1));
    expect(&v, 0, MIB, 1);
    expect(&v, 5 * MIB + 4096, 8192, 2);
    expect(&v, 150 * MIB, MIB, 0);
    v.write_at(150 * MIB, &pattern(4096, 3)).unwrap();
    v.flush().unwrap();

    // Below the data: refused, naming the smallest size (the end of the data, not of its
    // block), nothing changed.
    let min = 150 * MIB + 4096;
    assert_eq!(v.minimum_size(), min);
    let before = file_bytes(&path);
    let e = v.resize_with(100 * MIB, &Job::new()).unwrap_err();
    let Error::Layer(inner) = &e else {
        panic!("{e}")
    };
    match inner.downcast_ref::<VhdxError>() {
        Some(VhdxError::BelowMinimum { minimum, .. }) => assert_eq!(*minimum, min),
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains(&min.to_string()), "{e}");
    assert_eq!(v.capacity(), 200 * MIB);
    assert_eq!(file_bytes(&path), before);

    // Shrink to the minimum, then past the old data after a discard.
    v.resize_with(min, &Job::new()).unwrap();
    expect(&v, 150 * MIB, 4096, 3);
    v.discard(150 * MIB, 4096).unwrap();
    assert_eq!(v.minimum_size(), 5 * MIB + 4096 + 8192);
    v.resize_with(v.minimum_size(), &Job::new()).unwrap();
    assert_eq!(v.capacity(), 5 * MIB + 12288);
    assert!(v.read_at(5 * MIB + 12288, &mut [0u8; 512]).is_err());
    v.close().unwrap();
    drop(v);

    let v = Vhdx::open(&path, &OpenOptions::read_only()).unwrap();
    assert_eq!(v.capacity(), 5 * MIB + 12288);
    expect(&v, 0, MIB, 1);
    expect(&v, 5 * MIB + 4096, 8192, 2);
    drop(v);
    let c = check(&path).unwrap();
    assert!(c.is_clean(), "{c:?}");
    qemu_check(&path);
    qemu_same(&path);
}

#[test]
fn growing_past_the_bat_region_moves_the_blocks_in_its_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    // 1 MiB blocks: a 1 MiB BAT region describes about 128 GiB.
    let v = Vhdx::create(
        &path,
        &CreateOptions::dynamic(64 * MIB).block_size(MIB as u32),
    )
    .unwrap();
    for b in 0..8u64 {
        v.write_at(b * MIB, &pattern(MIB, 0x10 + b as u32)).unwrap();
    }
    v.flush().unwrap();
    let (bat_off, bat_len) = v.bat_region();
    assert_eq!(bat_len, MIB);
    let r = v.resize_with(300 * GIB, &Job::new()).unwrap();
    let (off2, len2) = v.bat_region();
    assert_eq!(off2, bat_off, "the BAT grows in place");
    assert_eq!(len2, 3 * MIB);
    assert_eq!(r.moved_blocks, 2, "{r:?}");
    assert!(!r.bat_relocated);
    for b in 0..8u64 {
        expect(&v, b * MIB, MIB, 0x10 + b as u32);
    }
    v.write_at(299 * GIB, &pattern(MIB, 0x99)).unwrap();
    v.close().unwrap();
    drop(v);
    let v = Vhdx::open(&path, &OpenOptions::read_only()).unwrap();
    assert_eq!(v.capacity(), 300 * GIB);
    for b in 0..8u64 {
        expect(&v, b * MIB, MIB, 0x10 + b as u32);
    }
    expect(&v, 299 * GIB, MIB, 0x99);
    drop(v);
    let c = check(&path).unwrap();
    assert!(c.is_clean(), "{c:?}");
    qemu_check(&path);
}

#[test]
fn a_differencing_disk_grows_past_its_parent_and_reads_zeros_there() {
    let dir = tempfile::tempdir().unwrap();
    let pp = dir.path().join("p.vhdx");
    let cp = dir.path().join("c.vhdx");
    let p = Vhdx::create(&pp, &CreateOptions::dynamic(8 * MIB).block_size(MIB as u32)).unwrap();
    p.write_at(0, &pattern(8 * MIB, 7)).unwrap();
    p.close().unwrap();
    drop(p);
    let c = Vhdx::create(&cp, &CreateOptions::differencing(&pp)).unwrap();
    c.write_at(MIB, &pattern(4096, 8)).unwrap();
    c.resize_with(40 * MIB, &Job::new()).unwrap();
    expect(&c, 0, MIB, 7);
    expect(&c, MIB, 4096, 8);
    expect(&c, 8 * MIB, 32 * MIB, 0);
    c.write_at(30 * MIB, &pattern(4096, 9)).unwrap();
    c.close().unwrap();
    drop(c);
    let c = Vhdx::open(&cp, &OpenOptions::read_only()).unwrap();
    assert_eq!(c.capacity(), 40 * MIB);
    expect(&c, 2 * MIB, MIB, 7);
    expect(&c, 30 * MIB, 4096, 9);
    expect(&c, 31 * MIB, MIB, 0);
    drop(c);
    let r = check(&cp).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn resize_online_while_threads_write_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let v = Arc::new(
        Vhdx::create(
            &path,
            &CreateOptions::dynamic(64 * MIB).block_size(MIB as u32),
        )
        .unwrap(),
    );
    let changes = Arc::new(AtomicU64::new(0));
    let c2 = changes.clone();
    v.capacity_signal().unwrap().subscribe(move |_| {
        c2.fetch_add(1, Ordering::Relaxed);
    });
    let stop = Arc::new(AtomicBool::new(false));
    // Each writer owns 8 MiB of the first 32 MiB and records the last tag of each 64 KiB.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (v, stop) = (v.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(w);
                let mut last = vec![0u32; 128];
                let mut tag = (w as u32 + 1) << 24;
                while !stop.load(Ordering::Relaxed) || tag & 0xFFFF < 64 {
                    let slot = rng.usize(0..128);
                    tag += 1;
                    v.write_at(w * 8 * MIB + slot as u64 * 65536, &pattern(65536, tag))
                        .unwrap();
                    last[slot] = tag;
                    if tag % 16 == 0 {
                        v.flush().unwrap();
                    }
                }
                last
            })
        })
        .collect();
    // A reader that wanders past the end: it gets data or a clean out-of-range error.
    let reader = {
        let (v, stop) = (v.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(99);
            let mut b = vec![0u8; 4096];
            let mut oob = 0;
            while !stop.load(Ordering::Relaxed) {
                let off = rng.u64(0..256 * MIB / 4096) * 4096;
                match v.read_at(off, &mut b) {
                    Ok(()) => {}
                    Err(Error::OutOfRange { .. }) => oob += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            oob
        })
    };
    let sizes = [
        256 * MIB,
        48 * MIB,
        128 * MIB,
        33 * MIB,
        200 * MIB,
        64 * MIB,
    ];
    for round in 0..5 {
        for &s in &sizes {
            v.resize_with(s, &Job::new()).unwrap();
            assert_eq!(v.capacity(), s, "round {round}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let lasts: Vec<Vec<u32>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let oob = reader.join().unwrap();
    assert!(oob > 0, "the reader never saw a smaller disk");
    assert_eq!(changes.load(Ordering::Relaxed), 5 * sizes.len() as u64);
    for (w, last) in lasts.iter().enumerate() {
        for (slot, &tag) in last.iter().enumerate() {
            expect(&v, w as u64 * 8 * MIB + slot as u64 * 65536, 65536, tag);
        }
    }
    v.close().unwrap();
    drop(v);
    let r = check(&path).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn bad_sizes_and_read_only_opens_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let v = Vhdx::create(&path, &CreateOptions::dynamic(64 * MIB)).unwrap();
    v.write_at(0, &[1u8; 4096]).unwrap();
    v.close().unwrap();
    let before = file_bytes(&path);
    for s in [0, 1000, (64 << 40) + 512] {
        let e = v.resize_with(s, &Job::new()).unwrap_err();
        assert!(e.to_string().contains("not a valid size"), "{s}: {e}");
    }
    let job = Job::new();
    job.cancel();
    assert!(matches!(
        v.resize_with(128 * MIB, &job),
        Err(Error::Cancelled(_))
    ));
    assert_eq!(v.capacity(), 64 * MIB);
    drop(v);
    assert_eq!(file_bytes(&path), before);
    let ro = Vhdx::open(&path, &OpenOptions::read_only()).unwrap();
    assert!(matches!(
        ro.resize_with(128 * MIB, &Job::new()),
        Err(Error::ReadOnly { .. })
    ));
    drop(ro);
    assert_eq!(file_bytes(&path), before);
}

/// A resize on a fault device, then the data written before it.
fn crash_setup(bs: u64) -> (Arc<FaultDevice>, Vhdx) {
    let fault = common::fault_device();
    let v = Vhdx::create_on(
        fault.clone(),
        &CreateOptions::dynamic(16 * bs).block_size(bs as u32),
        None,
    )
    .unwrap();
    for b in 0..6u64 {
        v.write_at(b * bs + 4096, &pattern(8192, 0x100 + b as u32))
            .unwrap();
    }
    v.flush().unwrap();
    (fault, v)
}

fn crash_everywhere(bs: u64, new_size: u64) {
    let (fault, v) = crash_setup(bs);
    let w0 = fault.stats().writes;
    let r = v.resize_with(new_size, &Job::new()).unwrap();
    let total = fault.stats().writes - w0;
    drop(v);
    assert!(total >= 3, "{total} writes");
    for n in 1..=total {
        for policy in common::cut_policies(n) {
            let (fault, v) = crash_setup(bs);
            let old = v.capacity();
            fault.arm_power_cut(n, policy);
            let res = v.resize_with(new_size, &Job::new());
            drop(v);
            fault.power_on();
            let what = format!("cut at write {n} of {total} ({policy:?}), resize {res:?}");
            let dev: Arc<dyn BlockDevice> = fault.clone();
            // A read-only open replays the log in memory (info, read, check, convert do this)
            // and sees the same disk as the writable open that replays it into the file.
            let ro = Vhdx::open_on(dev.clone(), "crashed", &OpenOptions::read_only(), None)
                .unwrap_or_else(|e| panic!("{what}: read-only: {e}"));
            let ro_cap = ro.capacity();
            for b in 0..6u64 {
                expect(&ro, b * bs + 4096, 8192, 0x100 + b as u32);
            }
            drop(ro);
            let v = Vhdx::open_on(dev.clone(), "crashed", &OpenOptions::default(), None)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let cap = v.capacity();
            assert_eq!(cap, ro_cap, "{what}");
            assert!(cap == old || cap == new_size, "{what}: size {cap}");
            if res.is_ok() {
                assert_eq!(cap, new_size, "{what}: a completed resize was lost");
            }
            for b in 0..6u64 {
                expect(&v, b * bs + 4096, 8192, 0x100 + b as u32);
            }
            v.close().unwrap();
            drop(v);
            let c = check_device(dev.clone(), "crashed");
            assert!(c.is_clean(), "{what}: {c:?}");
        }
    }
    let _ = r;
}

#[test]
fn a_power_cut_at_any_write_of_a_grow_leaves_the_old_or_the_new_disk() {
    crash_everywhere(MIB, 40 * MIB);
}

#[test]
fn a_power_cut_at_any_write_of_a_grow_that_moves_blocks_leaves_the_old_or_the_new_disk() {
    // 300 GiB of 1 MiB blocks needs a 3 MiB BAT: the blocks after it move.
    crash_everywhere(MIB, 300 * GIB);
}

#[test]
fn a_power_cut_at_any_write_of_a_shrink_leaves_the_old_or_the_new_disk() {
    crash_everywhere(MIB, 6 * MIB);
}

#[test]
fn a_short_last_block_gets_a_whole_block_when_the_disk_grows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    // 40 MiB of 32 MiB blocks: block 1 is 8 MiB long and is allocated first, block 0 after it.
    let v = Vhdx::create(&path, &CreateOptions::dynamic(40 * MIB)).unwrap();
    v.write_at(39 * MIB, &pattern(MIB, 0x51)).unwrap();
    v.write_at(0, &pattern(MIB, 0x50)).unwrap();
    v.flush().unwrap();
    let r = v.resize_with(100 * MIB, &Job::new()).unwrap();
    // vstor gave the short block its whole block at allocation: nothing moves.
    assert_eq!(r.moved_blocks, 0, "{r:?}");
    v.write_at(63 * MIB, &pattern(MIB, 0x52)).unwrap();
    expect(&v, 0, MIB, 0x50);
    expect(&v, 39 * MIB, MIB, 0x51);
    expect(&v, 40 * MIB, MIB, 0);
    v.close().unwrap();
    drop(v);
    let c = check(&path).unwrap();
    assert!(c.is_clean(), "{c:?}");
    qemu_check(&path);
    qemu_same(&path);
}

// ---- Differencing disks grown far past 1 TiB, failures and power cuts during such a resize.

const TIB: u64 = 1 << 40;

/// A parent in memory (64 MiB of 1 MiB blocks, tag 0x7000 + block in its first 16 blocks) and
/// a differencing child on a fault device with 8 KiB of tag 0x100 + block in blocks 0..8.
fn diff_setup() -> (Arc<FaultDevice>, Arc<Vhdx>, Vhdx) {
    diff_child(diff_parent())
}

fn diff_parent() -> Arc<Vhdx> {
    let pm: Arc<dyn BlockDevice> = Arc::new(vstor_core::MemoryDevice::new(4 * MIB).unwrap());
    let p = Vhdx::create_on(
        pm,
        &CreateOptions::dynamic(64 * MIB).block_size(MIB as u32),
        None,
    )
    .unwrap();
    for b in 0..16u64 {
        p.write_at(b * MIB, &pattern(MIB, 0x7000 + b as u32))
            .unwrap();
    }
    p.close().unwrap();
    Arc::new(p)
}

fn diff_child(p: Arc<Vhdx>) -> (Arc<FaultDevice>, Arc<Vhdx>, Vhdx) {
    let fault = common::fault_device();
    let c = Vhdx::create_on(
        fault.clone(),
        &CreateOptions::differencing("parent.vhdx").block_size(MIB as u32),
        Some((p.clone(), Path::new("parent.vhdx"))),
    )
    .unwrap();
    for b in 0..8u64 {
        c.write_at(b * MIB + 4096, &pattern(8192, 0x100 + b as u32))
            .unwrap();
    }
    c.flush().unwrap();
    (fault, p, c)
}

fn reopen_diff(
    fault: &Arc<FaultDevice>,
    p: &Arc<Vhdx>,
    read_only: bool,
) -> vstor_core::Result<Vhdx> {
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let opts = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::default()
    };
    Vhdx::open_on(dev, "child", &opts, Some(p.clone()))
}

/// What the child of [`diff_setup`] reads: its own tags in blocks 0..8, the parent elsewhere.
fn expect_diff(v: &Vhdx, what: &str) {
    for b in 0..8u64 {
        let mut buf = vec![0u8; 3 * 4096];
        v.read_at(b * MIB, &mut buf).unwrap();
        let tags: Vec<Option<u32>> = buf.chunks_exact(4096).map(tag_of).collect();
        assert_eq!(
            tags,
            [
                Some(0x7000 + b as u32),
                Some(0x100 + b as u32),
                Some(0x100 + b as u32)
            ],
            "{what}: block {b}"
        );
    }
    expect(v, 12 * MIB, MIB, 0x7000 + 12);
}

#[test]
fn a_differencing_disk_with_1_mib_blocks_grows_to_8_tib_online_while_threads_write() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    let b = Vhdx::create(
        &base,
        &CreateOptions::dynamic(512 * MIB).block_size(MIB as u32),
    )
    .unwrap();
    b.write_at(100 * MIB, &pattern(MIB, 0x55)).unwrap();
    b.close().unwrap();
    drop(b);
    let c = Arc::new(Vhdx::create(&child, &CreateOptions::differencing(&base)).unwrap());
    for blk in 0..64u64 {
        c.write_at(blk * MIB, &pattern(MIB, 0x22)).unwrap();
    }
    c.flush().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Each writer owns 16 MiB of the first 64 MiB and records the last tag of each 4 KiB it
    // wrote; every write is flushed before it counts, as a guest's acknowledged writes.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(w + 40);
                let mut last = std::collections::HashMap::new();
                let mut tag = (w as u32 + 1) << 24;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) || n < 200 {
                    let slot = rng.u64(0..4096);
                    tag += 1;
                    let off = w * 16 * MIB + slot * 4096;
                    c.write_at(off, &pattern(4096, tag)).unwrap();
                    c.flush().unwrap();
                    last.insert(off, tag);
                    n += 1;
                }
                last
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let r = c.resize_with(8 * TIB, &Job::new()).unwrap();
    assert_eq!(c.capacity(), 8 * TIB);
    assert!(r.moved_blocks > 0, "{r:?}");
    stop.store(true, Ordering::Relaxed);
    let lasts: Vec<_> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    c.write_at(8 * TIB - MIB, &pattern(MIB, 0x66)).unwrap();
    c.close().unwrap();
    drop(c);
    let c = Vhdx::open(&child, &OpenOptions::read_only()).unwrap();
    assert_eq!(c.capacity(), 8 * TIB);
    for last in &lasts {
        for (&off, &tag) in last {
            expect(&c, off, 4096, tag);
        }
    }
    expect(&c, 100 * MIB, MIB, 0x55);
    expect(&c, 8 * TIB - MIB, MIB, 0x66);
    expect(&c, 4 * TIB, MIB, 0);
    drop(c);
    let rep = check(&child).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}

#[test]
fn a_resize_that_fails_at_any_write_loses_no_write_made_after_it() {
    // 512 GiB: blocks move out of the BAT's way, new sector bitmap blocks, a new BAT tail.
    const SIZE: u64 = 512 << 30;
    // Count the writes and flushes of the resize when nothing fails.
    let (fault, parent, c) = diff_setup();
    let s0 = fault.stats();
    let r = c.resize_with(SIZE, &Job::new()).unwrap();
    assert!(r.moved_blocks > 0, "{r:?}");
    let s1 = fault.stats();
    let total = (s1.writes + s1.flushes) - (s0.writes + s0.flushes);
    drop(c);
    for k in 1..=total {
        let (fault, p, c) = diff_child(parent.clone());
        fault.add_rule(
            FaultRule::fail(OpKind::Write)
                .and(OpKind::WriteZeroes)
                .and(OpKind::Flush)
                .after(k - 1)
                .times(1),
        );
        let res = c.resize_with(SIZE, &Job::new());
        fault.clear_rules();
        let what = format!("failure at request {k} of {total}, resize {res:?}");
        let size = c.capacity();
        // Later writes, each flushed: over the blocks a resize moves, and a new block.
        let mut acked = Vec::new();
        for b in (0..8u64).chain([20]) {
            let tag = 0x900 + b as u32;
            if c.write_at(b * MIB + 4096, &pattern(4096, tag)).is_ok() && c.flush().is_ok() {
                acked.push((b, tag));
            }
        }
        drop(c);
        fault.power_cut(CutPolicy::DropAll).unwrap();
        fault.power_on();
        let v = reopen_diff(&fault, &p, false).unwrap_or_else(|e| panic!("{what}: {e}"));
        let cap = v.capacity();
        assert!(cap == 64 * MIB || cap == SIZE, "{what}: size {cap}");
        assert!(
            cap == size || res.is_err(),
            "{what}: size {cap}, was {size}"
        );
        for b in 0..8u64 {
            let mut buf = vec![0u8; 4096];
            v.read_at(b * MIB + 8192, &mut buf).unwrap();
            assert_eq!(tag_of(&buf), Some(0x100 + b as u32), "{what}: block {b}");
        }
        for &(b, tag) in &acked {
            expect(&v, b * MIB + 4096, 4096, tag);
        }
        v.close().unwrap();
        drop(v);
        let rep = check_device(fault.clone(), "child");
        assert!(rep.errors.is_empty(), "{what}: {rep:?}");
    }
}

#[test]
fn a_power_cut_at_any_write_of_a_differencing_disk_grown_past_1_tib_leaves_the_old_or_the_new_disk()
{
    // 1.25 TiB of 1 MiB blocks: a 10 MiB BAT with 320 sector bitmap entries (the old code put
    // them all in one log entry, and refused), blocks that move out of its way.
    const SIZE: u64 = TIB + TIB / 4;
    let (fault, parent, c) = diff_setup();
    let w0 = fault.stats().writes;
    c.resize_with(SIZE, &Job::new()).unwrap();
    let total = fault.stats().writes - w0;
    drop(c);
    for n in 1..=total {
        // One policy at each write, in turn (each cut costs a 10 MiB BAT in a debug build).
        {
            let policy = common::cut_policies(n)[(n % 3) as usize];
            let (fault, p, c) = diff_child(parent.clone());
            fault.arm_power_cut(n, policy);
            let res = c.resize_with(SIZE, &Job::new());
            drop(c);
            fault.power_on();
            let what = format!("cut at write {n} of {total} ({policy:?}), resize {res:?}");
            // A read-only open replays the log in memory and sees the same disk.
            let ro =
                reopen_diff(&fault, &p, true).unwrap_or_else(|e| panic!("{what}: read-only: {e}"));
            let ro_cap = ro.capacity();
            expect_diff(&ro, &what);
            drop(ro);
            let v = reopen_diff(&fault, &p, false).unwrap_or_else(|e| panic!("{what}: {e}"));
            let cap = v.capacity();
            assert_eq!(cap, ro_cap, "{what}");
            assert!(cap == 64 * MIB || cap == SIZE, "{what}: size {cap}");
            if res.is_ok() {
                assert_eq!(cap, SIZE, "{what}: a completed resize was lost");
            }
            expect_diff(&v, &what);
            if cap == SIZE {
                expect(&v, SIZE - MIB, MIB, 0);
                expect(&v, 40 * MIB, MIB, 0);
            }
            v.close().unwrap();
            drop(v);
            let rep = check_device(fault.clone(), "child");
            assert!(rep.is_clean(), "{what}: {rep:?}");
        }
    }
}

#[test]
fn the_space_a_differencing_disk_gains_by_growing_reads_as_zeros_not_as_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    let b = Vhdx::create(&base, &CreateOptions::dynamic(GIB).block_size(MIB as u32)).unwrap();
    b.write_at(900 * MIB, &pattern(MIB, 0x77)).unwrap();
    b.write_at(600 * MIB, &pattern(MIB, 0x78)).unwrap();
    b.write_at(300 * MIB, &pattern(2 * MIB, 0x79)).unwrap();
    b.write_at(800 * MIB, &pattern(MIB, 0x7A)).unwrap();
    b.close().unwrap();
    drop(b);
    let c = Vhdx::create(&child, &CreateOptions::differencing(&base)).unwrap();
    let zeros_at = |c: &Vhdx, off: u64, len: u64| {
        let mut buf = vec![0xEEu8; len as usize];
        c.read_at(off, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&x| x == 0),
            "{off}: the new space shows old data"
        );
    };
    // The repro: cut to 512 MiB, grown back to 1 GiB.
    c.resize_with(512 * MIB, &Job::new()).unwrap();
    c.resize_with(GIB, &Job::new()).unwrap();
    zeros_at(&c, 900 * MIB, MIB);
    zeros_at(&c, 600 * MIB, MIB);
    // The child's own blocks past the cut: one discarded, one that holds zeros over part of
    // the parent's data (neither is data that stops a shrink).
    c.write_at(700 * MIB, &pattern(MIB, 0x80)).unwrap();
    c.write_at(800 * MIB + 4096, &[0u8; 4096]).unwrap();
    c.write_at(100 * MIB, &pattern(4096, 0x82)).unwrap();
    c.flush().unwrap();
    c.discard(700 * MIB, MIB).unwrap();
    assert_eq!(c.minimum_size(), 100 * MIB + 4096);
    c.resize_with(512 * MIB, &Job::new()).unwrap();
    c.resize_with(GIB, &Job::new()).unwrap();
    zeros_at(&c, 900 * MIB, MIB);
    zeros_at(&c, 600 * MIB, MIB);
    zeros_at(&c, 700 * MIB, 2 * MIB);
    zeros_at(&c, 800 * MIB, MIB);
    expect(&c, 300 * MIB, 2 * MIB, 0x79);
    expect(&c, 100 * MIB, 4096, 0x82);
    // A cut inside the block at 300 MiB, where the parent has data.
    c.resize_with(300 * MIB + 4096, &Job::new()).unwrap();
    c.resize_with(GIB, &Job::new()).unwrap();
    expect(&c, 300 * MIB, 4096, 0x79);
    zeros_at(&c, 300 * MIB + 4096, 2 * MIB - 4096);
    zeros_at(&c, 900 * MIB, MIB);
    c.close().unwrap();
    drop(c);
    let c = Vhdx::open(&child, &OpenOptions::read_only()).unwrap();
    expect(&c, 300 * MIB, 4096, 0x79);
    zeros_at(&c, 300 * MIB + 4096, 2 * MIB - 4096);
    zeros_at(&c, 900 * MIB, MIB);
    zeros_at(&c, 600 * MIB, MIB);
    drop(c);
    let r = check(&child).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn the_space_a_disk_gains_by_growing_inside_its_last_block_reads_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let v = Vhdx::create(
        &path,
        &CreateOptions::dynamic(64 * MIB).block_size(MIB as u32),
    )
    .unwrap();
    v.write_at(10 * MIB, &pattern(MIB, 0x31)).unwrap();
    let md = v.metadata();
    let item = md
        .items
        .iter()
        .find(|i| i.id == vstor_vhdx::format::VIRTUAL_DISK_SIZE)
        .unwrap();
    let at = v.regions().metadata.offset + item.offset as u64;
    v.close().unwrap();
    drop(v);
    // Another writer cut the disk inside block 10 and left the rest of the block as it was.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &(10 * MIB + 8192).to_le_bytes(), at).unwrap();
    drop(f);
    let v = Vhdx::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(v.capacity(), 10 * MIB + 8192);
    v.resize_with(64 * MIB, &Job::new()).unwrap();
    expect(&v, 10 * MIB, 8192, 0x31);
    expect(&v, 10 * MIB + 8192, MIB - 8192, 0);
    v.close().unwrap();
    drop(v);
    let v = Vhdx::open(&path, &OpenOptions::read_only()).unwrap();
    expect(&v, 10 * MIB + 8192, MIB - 8192, 0);
    drop(v);
    let c = check(&path).unwrap();
    assert!(c.is_clean(), "{c:?}");
    qemu_check(&path);
    qemu_same(&path);
}

#[test]
fn blocks_in_the_way_of_a_bat_growing_by_hundreds_of_mib_move_in_several_log_entries() {
    // 240 blocks, each on its own BAT page, right after the BAT: growing to 32 TiB (a 256 MiB
    // BAT) moves them all, more BAT pages than one entry of the 1 MiB log holds.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let v = Vhdx::create(
        &path,
        &CreateOptions::dynamic(120 * GIB).block_size(MIB as u32),
    )
    .unwrap();
    for k in 0..240u64 {
        v.write_at(k * 512 * MIB + 4096, &pattern(4096, 0x4000 + k as u32))
            .unwrap();
    }
    v.flush().unwrap();
    // One entry holds the region tables (32 pages) and fewer than 240 BAT pages.
    assert!(vstor_vhdx::log::max_pages_per_entry(MIB) < 32 + 240);
    let r = v.resize_with(32 * TIB, &Job::new()).unwrap();
    assert_eq!(r.moved_blocks, 240, "{r:?}");
    assert!(!r.bat_relocated);
    for k in 0..240u64 {
        expect(&v, k * 512 * MIB + 4096, 4096, 0x4000 + k as u32);
    }
    v.write_at(32 * TIB - MIB, &pattern(MIB, 0x99)).unwrap();
    v.close().unwrap();
    drop(v);
    let v = Vhdx::open(&path, &OpenOptions::read_only()).unwrap();
    assert_eq!(v.capacity(), 32 * TIB);
    assert_eq!(v.bat_region().1, 257 * MIB);
    for k in 0..240u64 {
        expect(&v, k * 512 * MIB + 4096, 4096, 0x4000 + k as u32);
    }
    expect(&v, 32 * TIB - MIB, MIB, 0x99);
    drop(v);
    let c = check(&path).unwrap();
    assert!(c.is_clean(), "{c:?}");
}
