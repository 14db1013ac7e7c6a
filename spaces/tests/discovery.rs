//! Finding a pool's members among the disks offered: files that are not members, disks of
//! another pool, files left behind by failed commands.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::{BlockDevice, FaultDevice, FaultRule, FileOptions, MemoryDevice, OpKind};
use vstor_spaces::{CreateOptions, OpenOptions, Pool, PoolDisk, Resiliency, SpacesError};

fn spaces_error(e: &vstor_core::Error) -> &SpacesError {
    match e {
        vstor_core::Error::Layer(l) => l.downcast_ref::<SpacesError>().expect("a SpacesError"),
        other => panic!("not a layer error: {other}"),
    }
}

/// The names of the files in `dir`, sorted.
fn files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn dir_pool(dir: &std::path::Path, disks: usize) -> Pool {
    Pool::create_in_dir(
        dir,
        disks,
        16 << 20,
        &CreateOptions { slab_size: SLAB },
        &FileOptions::default(),
    )
    .unwrap()
}

#[test]
fn empty_and_short_files_in_the_directory_are_not_members() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("p");
    let pool = dir_pool(&dir, 3);
    pool.create_space(&spec(
        "m",
        2 << 20,
        Resiliency::Mirror { copies: 2 },
        Some(1),
    ))
    .unwrap();
    pool.open_space("m")
        .unwrap()
        .write_at(0, &pattern(1, 1 << 20))
        .unwrap();
    drop(pool);
    // A README (shorter than a metadata header), an empty file, a file of a few KiB.
    std::fs::write(dir.join("README"), b"hello\n").unwrap();
    std::fs::write(dir.join("disk3.raw"), b"").unwrap();
    std::fs::write(dir.join("notes.txt"), vec![b'x'; 5000]).unwrap();
    for read_only in [true, false] {
        let pool = Pool::open_dir(
            &dir,
            &OpenOptions {
                read_only,
                ..Default::default()
            },
            &FileOptions {
                read_only,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("read_only {read_only}: {e}"));
        let notes = pool.info().notes;
        for f in ["README", "disk3.raw", "notes.txt"] {
            let want = format!("{}: no pool metadata; not a member", dir.join(f).display());
            assert!(notes.contains(&want), "{want} not in {notes:?}");
        }
        assert_eq!(pool.info().members.len(), 3);
        let mut got = vec![0u8; 1 << 20];
        pool.open_space("m").unwrap().read_at(0, &mut got).unwrap();
        assert!(got == pattern(1, 1 << 20));
    }
    // Nothing was written to the files that are not members.
    assert_eq!(std::fs::read(dir.join("README")).unwrap(), b"hello\n");
    assert_eq!(std::fs::read(dir.join("disk3.raw")).unwrap().len(), 0);
}

#[test]
fn a_failed_create_or_add_leaves_no_file_behind() {
    let t = tempfile::tempdir().unwrap();
    // A size no file can have: the first file's sizing fails.
    let dir = t.path().join("p");
    let huge: u64 = !4095;
    let e = Pool::create_in_dir(
        &dir,
        3,
        huge,
        &CreateOptions { slab_size: SLAB },
        &FileOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("disk0.raw"), "{e}");
    assert!(!dir.exists(), "left {:?}", files(&dir));
    // In an existing directory: nothing of the create is left, the rest is untouched.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("README"), b"x").unwrap();
    Pool::create_in_dir(
        &dir,
        2,
        huge,
        &CreateOptions { slab_size: SLAB },
        &FileOptions::default(),
    )
    .unwrap_err();
    assert_eq!(files(&dir), ["README"]);
    std::fs::remove_file(dir.join("README")).unwrap();
    // Adding a disk that cannot be sized, or that is too small for a slab.
    let pool = dir_pool(&dir, 2);
    for size in [huge, 64 << 10] {
        let e = pool
            .add_disk_in_dir(&dir, size, &FileOptions::default())
            .unwrap_err();
        assert!(e.to_string().contains("disk2.raw"), "{e}");
        assert_eq!(files(&dir), ["disk0.raw", "disk1.raw"], "after {e}");
    }
    let (i, path) = pool
        .add_disk_in_dir(&dir, 16 << 20, &FileOptions::default())
        .unwrap();
    assert_eq!((i, path), (2, dir.join("disk2.raw")));
    drop(pool);
    let pool = Pool::open_dir(&dir, &OpenOptions::default(), &FileOptions::default()).unwrap();
    assert_eq!(pool.info().members.len(), 3);
    assert!(pool.info().notes.is_empty(), "{:?}", pool.info().notes);
}

#[test]
fn a_disk_that_cannot_be_read_is_named() {
    let devs = mem_disks(3, 8 << 20);
    drop(create(&devs));
    let bad = Arc::new(FaultDevice::new(devs[1].clone()));
    bad.add_rule(FaultRule::fail(OpKind::Read));
    let mut disks = named(&devs);
    disks[1] = PoolDisk::new("m1", bad as Arc<dyn BlockDevice>);
    let e = Pool::open(disks, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(spaces_error(&e), SpacesError::Disk { disk, .. } if disk == "m1"),
        "{e}"
    );
    assert!(e.to_string().starts_with("m1: "), "{e}");
}

#[test]
fn a_disk_of_another_pool_is_named_not_a_good_member() {
    let a = mem_disks(3, 8 << 20);
    let pa = create(&a);
    pa.create_space(&spec(
        "x",
        1 << 20,
        Resiliency::Mirror { copies: 2 },
        Some(1),
    ))
    .unwrap();
    drop(pa);
    // Pool B's single disk went through many more metadata updates than pool A's.
    let b = mem_disks(1, 8 << 20);
    let pb = create(&b);
    for i in 0..10 {
        let n = format!("s{i}");
        pb.create_space(&spec(&n, 1 << 20, Resiliency::Simple, Some(1)))
            .unwrap();
        pb.delete_space(&n).unwrap();
    }
    assert!(pb.info().sequence > open(&a, &[], true).info().sequence);
    let b_id = pb.id();
    drop(pb);
    let before = (snapshot(&a), snapshot(&b));
    for read_only in [false, true] {
        // The stray disk comes first and last among the disks offered.
        for at in [0, 3] {
            let mut disks = named(&a);
            disks.insert(at, PoolDisk::new("stray", b[0].clone()));
            let e = Pool::open(
                disks,
                &OpenOptions {
                    read_only,
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert!(
                matches!(spaces_error(&e), SpacesError::ForeignMember { disk, .. } if disk == "stray"),
                "{e}"
            );
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("stray: belongs to pool {b_id}, not to pool")),
                "{msg}"
            );
            assert!(msg.contains("the other 3 disks (m0, m1, m2)"), "{msg}");
        }
    }
    // Without a majority the error names both sides.
    let e = Pool::open(
        vec![
            PoolDisk::new("m0", a[0].clone()),
            PoolDisk::new("stray", b[0].clone()),
        ],
        &OpenOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(spaces_error(&e), SpacesError::NoPool(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&format!("pool {b_id}: stray")), "{msg}");
    assert!(msg.contains(": m0"), "{msg}");
    assert!(
        before == (snapshot(&a), snapshot(&b)),
        "a refused open wrote"
    );
}

fn snapshot(devs: &[Arc<dyn BlockDevice>]) -> Vec<Vec<u8>> {
    devs.iter().map(|d| contents(&**d)).collect()
}

#[test]
fn memory_disks_smaller_than_a_header_are_not_members() {
    let devs = mem_disks(2, 8 << 20);
    drop(create(&devs));
    let tiny: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(512).unwrap());
    let mut disks = named(&devs);
    disks.push(PoolDisk::new("tiny", tiny));
    let pool = Pool::open(disks, &OpenOptions::default()).unwrap();
    assert!(
        pool.info()
            .notes
            .contains(&"tiny: no pool metadata; not a member".to_string()),
        "{:?}",
        pool.info().notes
    );
}
