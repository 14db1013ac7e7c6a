//! Convert, compact, merge, reparent, checkpoint and clone against the expected contents, with
//! QEMU as the second opinion where it reads the format.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use vstor_core::{BlockDevice, Error, FileDevice, FileOptions, Job, MemoryDevice};
use vstor_vhdx::check::{check, check_device};
use vstor_vhdx::convert::{convert, ConvertOptions, Fill, Format};
use vstor_vhdx::lifecycle::{checkpoint, clone, merge, set_parent};
use vstor_vhdx::{CreateOptions, ImageKind, OpenOptions, Vhdx, VhdxError};

mod common;

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str], paths: &[&Path]) -> String {
    let mut c = Command::new("qemu-img");
    c.args(args);
    for p in paths {
        c.arg(p);
    }
    common::run(&mut c)
}

fn all_of(v: &dyn BlockDevice) -> Vec<u8> {
    let mut b = vec![0u8; v.capacity() as usize];
    v.read_at(0, &mut b).unwrap();
    b
}

fn clean(p: &Path) {
    let r = check(p).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

/// A dynamic disk with data in some blocks, zeros written in one, holes elsewhere.
fn sample(path: &Path, size: u64, block: u32) -> Vec<u8> {
    let v = Vhdx::create(path, &CreateOptions::dynamic(size).block_size(block)).unwrap();
    let mut rng = fastrand::Rng::with_seed(5);
    let mut want = vec![0u8; size as usize];
    for &(off, len) in &[(0, 3 * MIB + 512), (9 * MIB, 4096), (size - MIB, MIB)] {
        let b: Vec<u8> = (0..len).map(|_| rng.u8(1..)).collect();
        v.write_at(off, &b).unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&b);
    }
    v.write_at(5 * MIB, &vec![0u8; 2 * MIB as usize]).unwrap();
    v.close().unwrap();
    want
}

#[test]
fn convert_vhdx_to_raw_matches_qemu_and_raw_to_vhdx_keeps_holes() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("s.vhdx");
    let want = sample(&src, 16 * MIB, MIB as u32);
    let v = Vhdx::open(&src, &OpenOptions::read_only()).unwrap();
    let ours = d.path().join("ours.raw");
    let map = |o: u64, l: u64| v.fills(o, l, None);
    let rep = convert(
        &v,
        Some(&map),
        &ours,
        &ConvertOptions {
            format: Format::Raw,
            ..Default::default()
        },
        &Job::new(),
    )
    .unwrap();
    assert!(rep.read_bytes < 16 * MIB, "holes are not read: {rep:?}");
    let theirs = d.path().join("theirs.raw");
    qemu_img(&["convert", "-f", "vhdx", "-O", "raw"], &[&src, &theirs]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    assert!(std::fs::read(&ours).unwrap() == want);

    // Raw back to VHDX: zero regions (holes and the written zeros) take no block.
    let back = d.path().join("back.vhdx");
    let raw = FileDevice::open(
        &ours,
        &FileOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    convert(
        &raw,
        None,
        &back,
        &ConvertOptions {
            block_size: Some(MIB as u32),
            ..Default::default()
        },
        &Job::new(),
    )
    .unwrap();
    clean(&back);
    qemu_img(&["check", "-f", "vhdx"], &[&back]);
    qemu_img(&["compare", "-f", "vhdx", "-F", "raw"], &[&back, &ours]);
    let r = check(&back).unwrap();
    assert_eq!(
        r.allocated_blocks,
        4 + 1 + 1,
        "blocks 0-3, 9 and 15 only: {r:?}"
    );

    // Fixed and back to dynamic.
    let fixed = d.path().join("f.vhdx");
    clone(
        &back,
        &fixed,
        &ConvertOptions {
            fixed: true,
            ..Default::default()
        },
        &Job::new(),
    )
    .unwrap();
    let f = Vhdx::open(&fixed, &OpenOptions::read_only()).unwrap();
    assert_eq!(f.kind(), ImageKind::Fixed);
    assert!(all_of(&f) == want);
    let dynamic = d.path().join("d.vhdx");
    clone(&fixed, &dynamic, &ConvertOptions::default(), &Job::new()).unwrap();
    let g = Vhdx::open(&dynamic, &OpenOptions::read_only()).unwrap();
    assert_eq!(g.kind(), ImageKind::Dynamic);
    assert!(all_of(&g) == want);
    clean(&fixed);
    clean(&dynamic);
    // A cancelled conversion leaves no output.
    let job = Job::new();
    job.cancel();
    let gone = d.path().join("gone.vhdx");
    assert!(matches!(
        clone(&back, &gone, &ConvertOptions::default(), &job),
        Err(Error::Cancelled(_))
    ));
    assert!(!gone.exists());
}

#[test]
fn a_chain_flattens_into_one_image() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.vhdx");
    let mut want = sample(&p, 16 * MIB, MIB as u32);
    let c = d.path().join("c.avhdx");
    let cv = Vhdx::create(&c, &CreateOptions::differencing(&p)).unwrap();
    cv.write_at(MIB + 512, &[0xC1; 1024]).unwrap();
    cv.write_zeroes(9 * MIB, MIB).unwrap();
    cv.close().unwrap();
    want[(MIB + 512) as usize..(MIB + 1536) as usize].fill(0xC1);
    want[(9 * MIB) as usize..(10 * MIB) as usize].fill(0);
    drop(cv);
    let flat = d.path().join("flat.vhdx");
    clone(&c, &flat, &ConvertOptions::default(), &Job::new()).unwrap();
    let f = Vhdx::open(&flat, &OpenOptions::read_only()).unwrap();
    assert!(f.parent().is_none());
    assert!(all_of(&f) == want);
    clean(&flat);
}

#[test]
fn compact_gives_back_unmapped_and_zero_blocks_and_shrinks_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.vhdx");
    let want = sample(&p, 16 * MIB, MIB as u32);
    let v = Vhdx::open(&p, &OpenOptions::default()).unwrap();
    v.discard(MIB, 2 * MIB).unwrap();
    let mut want = want;
    want[MIB as usize..(3 * MIB) as usize].fill(0);
    let before = v.file_size();
    let rep = v.compact_with(false, &Job::new()).unwrap();
    assert_eq!(rep.released_blocks, 2, "{rep:?}");
    let mid = v.file_size();
    assert!(mid < before, "{before} -> {mid}");
    // --full also finds the block written with zeros (block 5 and 6).
    let rep = v.compact_with(true, &Job::new()).unwrap();
    assert_eq!(rep.released_blocks, 2, "{rep:?}");
    assert!(v.file_size() < mid);
    assert!(all_of(&v) == want);
    v.close().unwrap();
    drop(v);
    clean(&p);
    qemu_img(&["check", "-f", "vhdx"], &[&p]);
    let v = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(all_of(&v) == want);
}

#[test]
fn a_power_cut_at_any_write_of_compact_leaves_the_data() {
    let setup = || {
        let fault = common::fault_device();
        let v = Vhdx::create_on(
            fault.clone(),
            &CreateOptions::dynamic(12 * MIB).block_size(MIB as u32),
            None,
        )
        .unwrap();
        for b in 0..12u64 {
            v.write_at(b * MIB, &vec![b as u8 + 1; MIB as usize])
                .unwrap();
        }
        v.flush().unwrap();
        for b in [1u64, 2, 4, 7] {
            v.discard(b * MIB, MIB).unwrap();
        }
        v.write_zeroes(9 * MIB, MIB).unwrap();
        v.flush().unwrap();
        (fault, v)
    };
    let expected = |b: u64| {
        if [1, 2, 4, 7, 9].contains(&b) {
            0
        } else {
            b as u8 + 1
        }
    };
    let (fault, v) = setup();
    let w0 = fault.stats().writes;
    let rep = v.compact_with(true, &Job::new()).unwrap();
    assert!(rep.moved_blocks > 0, "{rep:?}");
    let total = fault.stats().writes - w0;
    drop(v);
    for n in 1..=total {
        for policy in common::cut_policies(n) {
            let (fault, v) = setup();
            fault.arm_power_cut(n, policy);
            let _ = v.compact_with(true, &Job::new());
            drop(v);
            fault.power_on();
            let dev: Arc<dyn BlockDevice> = fault.clone();
            let what = format!("cut at write {n} of {total} ({policy:?})");
            let v = Vhdx::open_on(dev.clone(), "crashed", &OpenOptions::default(), None)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut b = vec![0u8; MIB as usize];
            for blk in 0..12u64 {
                v.read_at(blk * MIB, &mut b).unwrap();
                assert!(b.iter().all(|&x| x == expected(blk)), "{what}: block {blk}");
            }
            v.close().unwrap();
            drop(v);
            let c = check_device(dev, "crashed");
            assert!(c.errors.is_empty(), "{what}: {c:?}");
        }
    }
}

/// parent <- child <- grandchild, each writing its own pattern; returns the expected view of
/// each level.
fn three_levels(d: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let p = d.join("p.vhdx");
    let pv = sample(&p, 16 * MIB, MIB as u32);
    let mut cv = pv.clone();
    let c = Vhdx::create(d.join("c.avhdx"), &CreateOptions::differencing(&p)).unwrap();
    c.write_at(2 * MIB, &vec![0xC2; (MIB + 4096) as usize])
        .unwrap();
    cv[(2 * MIB) as usize..(3 * MIB + 4096) as usize].fill(0xC2);
    c.write_zeroes(15 * MIB, MIB).unwrap();
    cv[(15 * MIB) as usize..].fill(0);
    c.close().unwrap();
    drop(c);
    let mut gv = cv.clone();
    let g = Vhdx::create(
        d.join("g.avhdx"),
        &CreateOptions::differencing(d.join("c.avhdx")),
    )
    .unwrap();
    g.write_at(512, &[0x6A; 512]).unwrap();
    gv[512..1024].fill(0x6A);
    g.close().unwrap();
    (pv, cv, gv)
}

#[test]
fn merge_folds_a_child_into_its_parent_or_an_ancestor_copying_only_its_own_data() {
    let d = tempfile::tempdir().unwrap();
    let (_, cv, gv) = three_levels(d.path());
    // The grandchild into the child: only its one sector moves.
    let r = merge(&d.path().join("g.avhdx"), None, &Job::new()).unwrap();
    assert_eq!(r.copied_bytes, 512, "{r:?}");
    assert!(!d.path().join("g.avhdx").exists());
    let c = Vhdx::open(d.path().join("c.avhdx"), &OpenOptions::read_only()).unwrap();
    let mut want = cv.clone();
    want[512..1024].copy_from_slice(&gv[512..1024]);
    assert!(all_of(&c) == want);
    drop(c);
    clean(&d.path().join("c.avhdx"));
    // The child into the parent (named explicitly).
    let r = merge(
        &d.path().join("c.avhdx"),
        Some(&d.path().join("p.vhdx")),
        &Job::new(),
    )
    .unwrap();
    assert_eq!(r.copied_bytes, MIB + 4096 + 512 + MIB, "{r:?}");
    let p = Vhdx::open(d.path().join("p.vhdx"), &OpenOptions::read_only()).unwrap();
    assert!(all_of(&p) == want);
    drop(p);
    clean(&d.path().join("p.vhdx"));
    qemu_img(&["check", "-f", "vhdx"], &[&d.path().join("p.vhdx")]);
}

#[test]
fn merge_into_the_grandparent_and_bad_merges() {
    let d = tempfile::tempdir().unwrap();
    let (_, _, gv) = three_levels(d.path());
    let other = d.path().join("other.vhdx");
    sample(&other, 16 * MIB, MIB as u32);
    let before = std::fs::read(&other).unwrap();
    let e = merge(&d.path().join("g.avhdx"), Some(&other), &Job::new()).unwrap_err();
    assert!(e.to_string().contains("is not an ancestor"), "{e}");
    assert_eq!(std::fs::read(&other).unwrap(), before);
    let e = merge(&d.path().join("p.vhdx"), None, &Job::new()).unwrap_err();
    assert!(e.to_string().contains("not a differencing disk"), "{e}");
    let r = merge(
        &d.path().join("g.avhdx"),
        Some(&d.path().join("p.vhdx")),
        &Job::new(),
    )
    .unwrap();
    assert_eq!(r.removed.len(), 2);
    let p = Vhdx::open(d.path().join("p.vhdx"), &OpenOptions::read_only()).unwrap();
    assert!(all_of(&p) == gv);
}

#[test]
fn reparent_after_a_move_refuses_strangers_and_cycles() {
    let d = tempfile::tempdir().unwrap();
    let (_, cv, _) = three_levels(d.path());
    let c = d.path().join("c.avhdx");
    std::fs::rename(d.path().join("p.vhdx"), d.path().join("moved.vhdx")).unwrap();
    assert!(Vhdx::open(&c, &OpenOptions::read_only()).is_err());
    set_parent(&c, &d.path().join("moved.vhdx"), false).unwrap();
    let v = Vhdx::open(&c, &OpenOptions::read_only()).unwrap();
    assert!(all_of(&v) == cv);
    drop(v);
    clean(&c);
    // A stranger: refused unless the operator insists.
    let other = d.path().join("other.vhdx");
    sample(&other, 16 * MIB, MIB as u32);
    let before = std::fs::read(&c).unwrap();
    let e = set_parent(&c, &other, false).unwrap_err();
    let Error::Layer(inner) = &e else {
        panic!("{e}")
    };
    assert!(
        matches!(
            inner.downcast_ref::<VhdxError>(),
            Some(VhdxError::LinkageMismatch { .. })
        ),
        "{e}"
    );
    assert_eq!(std::fs::read(&c).unwrap(), before);
    // A cycle: the parent made a child of its own grandchild.
    let e = set_parent(&d.path().join("g.avhdx"), &d.path().join("g.avhdx"), true).unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    let e = set_parent(&c, &d.path().join("g.avhdx"), true).unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    assert_eq!(std::fs::read(&c).unwrap(), before);
    set_parent(&c, &other, true).unwrap();
    let v = Vhdx::open(&c, &OpenOptions::read_only()).unwrap();
    assert_eq!(v.parent().unwrap().name(), other.display().to_string());
}

#[test]
fn physical_sector_size_changes_and_stays() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("s.vhdx");
    let want = sample(&p, 16 * MIB, MIB as u32);
    let v = Vhdx::open(&p, &OpenOptions::default()).unwrap();
    v.set_physical_sector_size(4096).unwrap();
    assert_eq!(v.info().physical_sector_size, 4096);
    assert!(v.set_physical_sector_size(1024).is_err());
    v.close().unwrap();
    drop(v);
    let v = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert_eq!(v.geometry().physical_sector, 4096);
    assert!(all_of(&v) == want);
    drop(v);
    clean(&p);
    let info = qemu_img(&["info", "-f", "vhdx"], &[&p]);
    assert!(info.contains("virtual size"), "{info}");
}

#[test]
fn a_checkpoint_freezes_the_parent() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("vm.vhdx");
    let want = sample(&p, 16 * MIB, MIB as u32);
    let child = checkpoint(&p, None).unwrap();
    assert!(child
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("vm_"));
    assert_eq!(child.extension().unwrap(), "avhdx");
    // Made under a temporary name and renamed: nothing half-made is left, and an existing
    // child is not overwritten.
    assert!(std::fs::read_dir(d.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".partial")));
    let before = std::fs::read(&child).unwrap();
    let e = checkpoint(&p, Some(&child)).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&child).unwrap(), before);
    let c = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    c.write_at(0, &[0xEE; 4096]).unwrap();
    c.close().unwrap();
    let frozen = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(all_of(&frozen) == want);
    let mut now = want.clone();
    now[..4096].fill(0xEE);
    assert!(all_of(&c) == now);
    let _ = Fill::Skip;
}

#[test]
fn repair_fixes_a_damaged_header_a_region_table_copy_and_a_stale_log() {
    use std::io::{Seek, SeekFrom, Write};
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r.vhdx");
    let want = sample(&p, 16 * MIB, MIB as u32);
    // A stale log: written and flushed, never closed.
    let v = Vhdx::open(&p, &OpenOptions::default()).unwrap();
    v.write_at(MIB, &[0x77; 4096]).unwrap();
    v.flush().unwrap();
    std::mem::forget(v);
    let mut want = want;
    want[MIB as usize..(MIB + 4096) as usize].fill(0x77);
    // Damage header slot 1 and the second region table copy; add tail space nobody owns.
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(128 * 1024 + 100)).unwrap();
    f.write_all(&[0xFF; 16]).unwrap();
    f.seek(SeekFrom::Start(256 * 1024 + 40)).unwrap();
    f.write_all(&[0xFF; 16]).unwrap();
    drop(f);
    let r = check(&p).unwrap();
    assert!(!r.is_clean());
    assert!(r.log_entries_pending > 0, "{r:?}");
    let v = Vhdx::open(&p, &OpenOptions::default()).unwrap();
    let done = v.repair(&Job::new()).unwrap();
    drop(v);
    let all = done.join("\n");
    assert!(all.contains("log"), "{all}");
    assert!(all.contains("header slot"), "{all}");
    assert!(all.contains("region table"), "{all}");
    clean(&p);
    qemu_img(&["check", "-f", "vhdx"], &[&p]);
    let v = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(all_of(&v) == want);
}

#[test]
fn an_interrupted_merge_leaves_the_child_readable_and_runs_again() {
    let d = tempfile::tempdir().unwrap();
    let (_, cv, _) = three_levels(d.path());
    let c = d.path().join("c.avhdx");
    std::fs::remove_file(d.path().join("g.avhdx")).unwrap();
    // Interrupt after every possible number of progress steps.
    let mut stopped_at = 0;
    for k in 1.. {
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let s2 = seen.clone();
        let job = Job::new();
        let j2 = job.clone();
        let job = job.on_progress(move |_, _| {
            if s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= k {
                j2.cancel();
            }
        });
        match merge(&c, None, &job) {
            Err(Error::Cancelled(_)) => {
                // The child still reads exactly as before.
                let v = Vhdx::open(&c, &OpenOptions::read_only()).unwrap();
                assert!(all_of(&v) == cv, "after {k} steps");
                drop(v);
                clean(&d.path().join("p.vhdx"));
                stopped_at = k;
            }
            Ok(r) => {
                assert!(!c.exists());
                let p = Vhdx::open(&r.into, &OpenOptions::read_only()).unwrap();
                assert!(all_of(&p) == cv);
                assert!(p.merge_marker().is_none());
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(stopped_at >= 1);
    clean(&d.path().join("p.vhdx"));
    qemu_img(&["check", "-f", "vhdx"], &[&d.path().join("p.vhdx")]);
}

#[test]
fn a_power_cut_at_any_write_of_merge_leaves_the_old_or_the_new_disk() {
    use vstor_vhdx::lifecycle::merge_into;
    let bs = MIB;
    let parent_bytes = |b: u64| vec![0x40 + b as u8; bs as usize];
    // The child holds blocks 1, 4 (half) and zeros over 6.
    let expected = |b: u64, half: usize| -> u8 {
        match (b, half) {
            (1, _) => 0xC1,
            (4, 0) => 0xC4,
            (6, _) => 0,
            _ => 0x40 + b as u8,
        }
    };
    let setup = || {
        let fault = common::fault_device();
        let p = Vhdx::create_on(
            fault.clone(),
            &CreateOptions::dynamic(8 * bs).block_size(bs as u32),
            None,
        )
        .unwrap();
        for b in 0..8 {
            p.write_at(b * bs, &parent_bytes(b)).unwrap();
        }
        p.close().unwrap();
        drop(p);
        let ro =
            Arc::new(Vhdx::open_on(fault.clone(), "p", &OpenOptions::read_only(), None).unwrap());
        let cm: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 * MIB).unwrap());
        let c = Vhdx::create_on(
            cm.clone(),
            &CreateOptions::differencing("p.vhdx"),
            Some((ro.clone(), Path::new("p.vhdx"))),
        )
        .unwrap();
        c.write_at(bs, &vec![0xC1; bs as usize]).unwrap();
        c.write_at(4 * bs, &vec![0xC4; (bs / 2) as usize]).unwrap();
        c.write_zeroes(6 * bs, bs).unwrap();
        c.close().unwrap();
        drop(c);
        let child = Vhdx::open_on(cm.clone(), "c", &OpenOptions::read_only(), Some(ro)).unwrap();
        let target = Vhdx::open_on(fault.clone(), "p", &OpenOptions::default(), None).unwrap();
        (fault, cm, child, target)
    };
    let steps = |child: &Vhdx, target: &Vhdx| -> vstor_core::Result<()> {
        merge_into(child, 1, target, &Job::new())?;
        target.set_merge_marker(None)?;
        target.close()
    };
    let verify = |v: &Vhdx, what: &str| {
        let mut b = vec![0u8; bs as usize];
        for blk in 0..8u64 {
            v.read_at(blk * bs, &mut b).unwrap();
            for (h, part) in b.chunks(bs as usize / 2).enumerate() {
                assert!(
                    part.iter().all(|&x| x == expected(blk, h)),
                    "{what}: block {blk} half {h}"
                );
            }
        }
    };
    let (fault, _cm, child, target) = setup();
    let w0 = fault.stats().writes;
    steps(&child, &target).unwrap();
    let total = fault.stats().writes - w0;
    verify(&target, "no cut");
    drop((child, target));
    let (mut old, mut new) = (0, 0);
    for n in 1..=total {
        for policy in common::cut_policies(n) {
            let (fault, cm, child, target) = setup();
            fault.arm_power_cut(n, policy);
            let _ = steps(&child, &target);
            drop((child, target));
            fault.power_on();
            let what = format!("cut at write {n} of {total} ({policy:?})");
            let dev: Arc<dyn BlockDevice> = fault.clone();
            // A writable open replays the log, then a read-only look.
            Vhdx::open_on(dev.clone(), "p", &OpenOptions::default(), None)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
                .close()
                .unwrap();
            let c = check_device(dev.clone(), "p");
            assert!(c.is_clean(), "{what}: {c:?}");
            let p = Arc::new(Vhdx::open_on(dev, "p", &OpenOptions::read_only(), None).unwrap());
            match Vhdx::open_on(cm, "c", &OpenOptions::read_only(), Some(p.clone())) {
                Ok(c) => {
                    // Not merged yet, or merged but not yet unmarked: the child reads as before.
                    verify(&c, &what);
                    old += 1;
                }
                Err(e) => {
                    assert!(e.to_string().contains("has changed"), "{what}: {e}");
                    assert!(p.merge_marker().is_none(), "{what}");
                    verify(&p, &what);
                    new += 1;
                }
            }
        }
    }
    assert!(old > 0 && new > 0, "old {old} new {new}");
}

#[test]
fn a_power_cut_at_any_write_of_a_checkpoint_leaves_the_parent_whole() {
    // A checkpoint of a disk in use flushes and closes it (its writes), then makes the child
    // elsewhere (a new file, renamed into place when complete). Cut power at every write of the
    // disk's side; the child's side never touches the disk.
    let setup = || {
        let fault = common::fault_device();
        let v = Vhdx::create_on(
            fault.clone(),
            &CreateOptions::dynamic(8 * MIB).block_size(MIB as u32),
            None,
        )
        .unwrap();
        for b in 0..4u64 {
            v.write_at(b * 2 * MIB, &vec![0x20 + b as u8; MIB as usize])
                .unwrap();
        }
        v.flush().unwrap();
        // Written after the last flush: the checkpoint's own flush makes it durable.
        v.write_at(MIB, &vec![0x99; 4096]).unwrap();
        (fault, v)
    };
    let steps = |v: &Vhdx| -> vstor_core::Result<()> {
        v.flush()?;
        v.close()?;
        let cm: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 * MIB).unwrap());
        let parent = Arc::new(Vhdx::open_on(
            v.file().clone(),
            "p",
            &OpenOptions::read_only(),
            None,
        )?);
        let c = Vhdx::create_on(
            cm,
            &CreateOptions::differencing("p.vhdx"),
            Some((parent, Path::new("p.vhdx"))),
        )?;
        c.write_at(0, &[0xCC; 4096])?;
        c.close()
    };
    let (fault, v) = setup();
    let w0 = fault.stats().writes;
    steps(&v).unwrap();
    let total = fault.stats().writes - w0;
    drop(v);
    assert!(total >= 2, "{total}");
    for n in 1..=total {
        for policy in common::cut_policies(n) {
            let (fault, v) = setup();
            fault.arm_power_cut(n, policy);
            let flushed = steps(&v).is_ok();
            drop(v);
            fault.power_on();
            let what = format!("cut at write {n} of {total} ({policy:?})");
            let dev: Arc<dyn BlockDevice> = fault.clone();
            let p = Vhdx::open_on(dev.clone(), "p", &OpenOptions::default(), None)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut b = vec![0u8; MIB as usize];
            for blk in 0..4u64 {
                p.read_at(blk * 2 * MIB, &mut b).unwrap();
                assert!(
                    b.iter().all(|&x| x == 0x20 + blk as u8),
                    "{what}: block {blk}"
                );
            }
            let mut s = vec![0u8; 4096];
            p.read_at(MIB, &mut s).unwrap();
            assert!(
                s.iter().all(|&x| x == 0x99) || (!flushed && s.iter().all(|&x| x == 0)),
                "{what}"
            );
            p.close().unwrap();
            drop(p);
            let c = check_device(dev, "p");
            assert!(c.is_clean(), "{what}: {c:?}");
        }
    }
}

/// A merge cancelled after its first window of progress (so part of the data is in the target).
fn interrupted_merge(child: &Path, into: Option<&Path>) {
    let job = Job::new();
    let j2 = job.clone();
    let job = job.on_progress(move |_, _| j2.cancel());
    match merge(child, into, &job) {
        Err(Error::Cancelled(_)) => {}
        other => panic!("expected a cancelled merge, got {other:?}"),
    }
}

fn merge_pending(e: &Error) -> bool {
    matches!(e, Error::Layer(inner) if matches!(inner.downcast_ref::<VhdxError>(), Some(VhdxError::MergePending { .. })))
}

#[test]
fn an_interrupted_merge_refuses_the_siblings_until_it_finishes() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("base.vhdx");
    let pv = sample(&p, 16 * MIB, MIB as u32);
    let (a, b) = (d.path().join("a.avhdx"), d.path().join("b.avhdx"));
    let va = Vhdx::create(&a, &CreateOptions::differencing(&p)).unwrap();
    va.write_at(0, &vec![0xAA; 12 * MIB as usize]).unwrap();
    va.close().unwrap();
    drop(va);
    let mut av = pv.clone();
    av[..12 * MIB as usize].fill(0xAA);
    let vb = Vhdx::create(&b, &CreateOptions::differencing(&p)).unwrap();
    vb.write_at(13 * MIB, &[0xBB; 4096]).unwrap();
    vb.close().unwrap();
    drop(vb);
    let mut bv = pv.clone();
    bv[13 * MIB as usize..(13 * MIB + 4096) as usize].fill(0xBB);

    interrupted_merge(&a, None);
    // The base holds part of a's data now.
    let e = Vhdx::open(&b, &OpenOptions::read_only()).unwrap_err();
    assert!(merge_pending(&e), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("merge"), "{msg}");
    assert!(
        msg.contains(&format!("vstor disk merge {}", a.display())),
        "{msg}"
    );
    // Its check says so too (its own structures are sound).
    let r = check(&b).unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.message.contains("middle of a merge")),
        "{r:?}"
    );
    // A new child of the half-merged base is refused too, and nothing is left of it.
    let n = d.path().join("new.avhdx");
    let e = Vhdx::create(&n, &CreateOptions::differencing(&p)).unwrap_err();
    assert!(merge_pending(&e), "{e:?}");
    assert!(!n.exists());
    // The merged disk itself still reads as it did, and the merge runs again to its end.
    let v = Vhdx::open(&a, &OpenOptions::read_only()).unwrap();
    assert!(all_of(&v) == av);
    drop(v);
    let b_before = std::fs::read(&b).unwrap();
    merge(&a, None, &Job::new()).unwrap();
    assert!(!a.exists());
    let v = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(all_of(&v) == av);
    assert!(v.merge_marker().is_none());
    drop(v);
    // The sibling no longer matches its changed parent: refused, and untouched.
    let e = Vhdx::open(&b, &OpenOptions::read_only()).unwrap_err();
    assert!(e.to_string().contains("has changed"), "{e}");
    assert_eq!(std::fs::read(&b).unwrap(), b_before);
    // Relinked by an operator who insists, it reads its own data over the merged base.
    set_parent(&b, &p, true).unwrap();
    let v = Vhdx::open(&b, &OpenOptions::read_only()).unwrap();
    let mut want = av.clone();
    want[13 * MIB as usize..(13 * MIB + 4096) as usize].fill(0xBB);
    assert!(all_of(&v) == want);
    let _ = bv;
}

#[test]
fn a_merge_into_the_grandparent_refuses_the_middle_disk_on_its_own() {
    use vstor_vhdx::lifecycle::merge_into;
    let d = tempfile::tempdir().unwrap();
    let (_, cv, gv) = three_levels(d.path());
    let (p, c, g) = (
        d.path().join("p.vhdx"),
        d.path().join("c.avhdx"),
        d.path().join("g.avhdx"),
    );
    // Interrupted while copying: the top reads as it did, the middle disk alone is refused.
    interrupted_merge(&g, Some(&p));
    let e = Vhdx::open(&c, &OpenOptions::read_only()).unwrap_err();
    assert!(merge_pending(&e), "{e:?}");
    assert!(
        e.to_string().contains(&format!(
            "vstor disk merge {} --into {}",
            g.display(),
            p.display()
        )),
        "{e}"
    );
    let v = Vhdx::open(&g, &OpenOptions::read_only()).unwrap();
    assert!(all_of(&v) == gv);
    drop(v);

    // Everything copied, the marker still there, the top removed and the middle disk not (what
    // a failed removal of the middle disk used to leave): the middle disk is refused, not read
    // over its child's data.
    let top = Vhdx::open(&g, &OpenOptions::read_only()).unwrap();
    let target = Vhdx::open(&p, &OpenOptions::default()).unwrap();
    merge_into(&top, 2, &target, &Job::new()).unwrap();
    target.close().unwrap();
    drop((top, target));
    let g_bytes = std::fs::read(&g).unwrap();
    std::fs::remove_file(&g).unwrap();
    let e = Vhdx::open(&c, &OpenOptions::read_only()).unwrap_err();
    assert!(merge_pending(&e), "{e:?}");
    let _ = cv;

    // The merge finishes from its top; a middle disk whose removal had failed would no longer
    // match the merged ancestor.
    std::fs::write(&g, &g_bytes).unwrap();
    let c_bytes = std::fs::read(&c).unwrap();
    let r = merge(&g, Some(&p), &Job::new()).unwrap();
    assert_eq!(r.removed.len(), 2);
    let v = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(all_of(&v) == gv);
    assert!(v.merge_marker().is_none());
    drop(v);
    std::fs::write(&c, &c_bytes).unwrap();
    let e = Vhdx::open(&c, &OpenOptions::read_only()).unwrap_err();
    assert!(e.to_string().contains("has changed"), "{e}");
}

#[test]
fn a_merge_marker_of_an_older_vstor_admits_only_the_merge() {
    use vstor_vhdx::lifecycle::MergeMarker;
    let d = tempfile::tempdir().unwrap();
    let (pv, cv, gv) = three_levels(d.path());
    let (c, g) = (d.path().join("c.avhdx"), d.path().join("g.avhdx"));
    // An older vstor recorded only the old DataWriteGuid (16 bytes), then wrote part of g.
    let target = Vhdx::open(&c, &OpenOptions::default()).unwrap();
    let old = MergeMarker {
        linkage: target.data_write_guid(),
        merged: vec![],
    };
    target.set_merge_marker(Some(&old)).unwrap();
    target.write_at(512, &[0x6A; 512]).unwrap();
    target.close().unwrap();
    drop(target);
    // Which child it merged is not known: a plain open of any child is refused.
    let e = Vhdx::open(&g, &OpenOptions::read_only()).unwrap_err();
    assert!(merge_pending(&e), "{e:?}");
    assert!(e.to_string().contains("vstor disk merge"), "{e}");
    // The merge of it runs again and finishes.
    merge(&g, None, &Job::new()).unwrap();
    let v = Vhdx::open(&c, &OpenOptions::read_only()).unwrap();
    assert!(all_of(&v) == gv);
    assert!(v.merge_marker().is_none());
    let _ = (pv, cv);
}

/// Runs `f` on a thread of its own; the test fails if it has not returned within `secs`.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: still running after {secs} s (hung)"))
}

/// A source full of data, and a destination slower than it (so the reader runs ahead and
/// fills the channel between them).
fn fast_source_slow_destination() -> (Arc<dyn BlockDevice>, Arc<vstor_core::FaultDevice>) {
    let src: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(96 * MIB).unwrap());
    src.write_at(0, &vec![0x5A; 96 * MIB as usize]).unwrap();
    let dst = Arc::new(vstor_core::FaultDevice::new(Arc::new(
        MemoryDevice::new(96 * MIB).unwrap(),
    )));
    dst.set_latency(Some(std::time::Duration::from_millis(30)));
    (src, dst)
}

#[test]
fn a_copy_ends_with_an_error_after_a_destination_write_error() {
    use vstor_core::{FaultRule, OpKind};
    use vstor_vhdx::convert::copy_all;
    let (src, dst) = fast_source_slow_destination();
    dst.add_rule(FaultRule::fail(OpKind::Write).after(12));
    let d2 = dst.clone();
    let r = within(60, "copy after a write error", move || {
        copy_all(&*src, None, &*d2, true, &Job::new())
    });
    let e = r.unwrap_err();
    assert!(!matches!(e, Error::Cancelled(_)), "{e:?}");
    assert!(dst.stats().writes >= 12);
}

#[test]
fn a_cancelled_copy_ends_with_cancelled() {
    use vstor_vhdx::convert::copy_all;
    let (src, dst) = fast_source_slow_destination();
    let job = Job::new();
    let j2 = job.clone();
    let job = job.on_progress(move |_, _| j2.cancel());
    let r = within(60, "cancelled copy", move || {
        copy_all(&*src, None, &*dst, true, &job)
    });
    assert!(matches!(r, Err(Error::Cancelled(_))), "{r:?}");
}

#[test]
fn a_convert_that_fails_or_is_cancelled_removes_its_output() {
    let d = tempfile::tempdir().unwrap();
    let (src, _) = fast_source_slow_destination();
    // Cancelled after its first window: an error, and no output left.
    for format in [Format::Vhdx, Format::Raw] {
        let out = d.path().join(format!("out-{format:?}"));
        let job = Job::new();
        let j2 = job.clone();
        let job = job.on_progress(move |_, _| j2.cancel());
        let (s2, o2) = (src.clone(), out.clone());
        let r = within(60, "cancelled convert", move || {
            convert(
                &*s2,
                None,
                &o2,
                &ConvertOptions {
                    format,
                    ..Default::default()
                },
                &job,
            )
        });
        assert!(matches!(r, Err(Error::Cancelled(_))), "{r:?}");
        assert!(!out.exists(), "{format:?}: the partial output is left");
    }
}

#[test]
fn a_child_that_cannot_be_opened_is_not_left_behind() {
    // A parent whose chain is as deep as an open accepts: a child of it would be one too deep.
    // The parent opens, the child is written, its open fails, and no file is left. (A chain
    // this deep is opened recursively: a debug build needs more than a test thread's stack.)
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(too_deep_child)
        .unwrap()
        .join()
        .unwrap();
}

fn too_deep_child() {
    let d = tempfile::tempdir().unwrap();
    let mut prev = d.path().join("l0.vhdx");
    Vhdx::create(
        &prev,
        &CreateOptions::dynamic(4 * MIB).block_size(MIB as u32),
    )
    .unwrap()
    .close()
    .unwrap();
    let depth = OpenOptions::default().max_chain_depth;
    for i in 1..=depth {
        let next = d.path().join(format!("l{i}.avhdx"));
        Vhdx::create(&next, &CreateOptions::differencing(&prev))
            .unwrap()
            .close()
            .unwrap();
        prev = next;
    }
    let child = d.path().join("too-deep.avhdx");
    let e = Vhdx::create(&child, &CreateOptions::differencing(&prev)).unwrap_err();
    assert!(e.to_string().contains("deeper than"), "{e}");
    assert!(!child.exists(), "a half-made child is left");
}

#[test]
fn a_parent_with_a_backslash_in_its_name_is_found() {
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("a\\b");
    std::fs::create_dir(&sub).unwrap();
    for (parent, child) in [
        (d.path().join("p\\q.vhdx"), d.path().join("c.avhdx")),
        (sub.join("p.vhdx"), d.path().join("c2.avhdx")),
        (d.path().join("x\\y.vhdx"), sub.join("c3.avhdx")),
    ] {
        let want = sample(&parent, 16 * MIB, MIB as u32);
        let c = Vhdx::create(&child, &CreateOptions::differencing(&parent)).unwrap();
        c.write_at(0, &[0xC1; 4096]).unwrap();
        c.close().unwrap();
        drop(c);
        let v = Vhdx::open(&child, &OpenOptions::read_only()).unwrap();
        let mut want = want;
        want[..4096].fill(0xC1);
        assert!(all_of(&v) == want, "{}", child.display());
        assert_eq!(
            std::fs::canonicalize(v.parent().unwrap().path().unwrap()).unwrap(),
            std::fs::canonicalize(&parent).unwrap()
        );
        // The Windows forms stay Windows paths.
        let loc = v.metadata().parent.unwrap();
        assert!(!loc.get("relative_path").unwrap().contains('/'));
        drop(v);
        clean(&child);
    }
    // A name without a backslash gets the standard keys only.
    let p = d.path().join("plain.vhdx");
    sample(&p, 16 * MIB, MIB as u32);
    let c = Vhdx::create(d.path().join("pc.avhdx"), &CreateOptions::differencing(&p)).unwrap();
    let loc = c.metadata().parent.unwrap();
    assert_eq!(loc.entries.len(), 3, "{:?}", loc.entries);
}
