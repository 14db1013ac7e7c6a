//! Bad input: each gives a typed error naming what is wrong, and writes nothing.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::{BlockDevice, Error, MemoryDevice};
use vstor_spaces::{
    CreateOptions, OpenOptions, Pool, PoolDisk, Provisioning, Resiliency, SpaceSpec, SpacesError,
};

fn spaces_error(e: &Error) -> &SpacesError {
    match e {
        Error::Layer(l) => l
            .downcast_ref::<SpacesError>()
            .unwrap_or_else(|| panic!("not a pool error: {e}")),
        _ => panic!("not a pool error: {e}"),
    }
}

/// Flips the bytes of the 512-byte sector at `offset`.
fn scribble(dev: &dyn BlockDevice, offset: u64) {
    let mut b = [0u8; 512];
    dev.read_at(offset, &mut b).unwrap();
    b.iter_mut().for_each(|x| *x ^= 0x5a);
    dev.write_at(offset, &b).unwrap();
}

fn snapshot(devs: &[Arc<dyn BlockDevice>]) -> Vec<Vec<u8>> {
    devs.iter().map(|d| contents(&**d)).collect()
}

#[test]
fn too_few_disks_for_the_layout() {
    let devs = mem_disks(2, 8 << 20);
    let pool = create(&devs);
    let before = snapshot(&devs);
    for (res, cols) in [
        (Resiliency::Mirror { copies: 3 }, Some(1)),
        (Resiliency::Parity { redundancy: 1 }, Some(3)),
        (Resiliency::Parity { redundancy: 2 }, Some(4)),
        (Resiliency::Simple, Some(3)),
        (Resiliency::Parity { redundancy: 1 }, None),
    ] {
        let e = pool
            .create_space(&spec("s", 1 << 20, res, cols))
            .unwrap_err();
        let msg = e.to_string();
        match spaces_error(&e) {
            SpacesError::TooFewDisks {
                needed, available, ..
            } => {
                assert_eq!(*available, 2);
                assert!(*needed > 2, "{msg}");
            }
            SpacesError::InvalidParameter(_) => assert!(msg.contains("columns"), "{msg}"),
            other => panic!("{other}"),
        }
    }
    assert!(before == snapshot(&devs), "a refused space changed a disk");
    assert!(pool.spaces().is_empty());
}

#[test]
fn a_disk_too_small() {
    let devs: Vec<Arc<dyn BlockDevice>> = vec![
        Arc::new(MemoryDevice::new(8 << 20).unwrap()),
        Arc::new(MemoryDevice::new(2 << 20).unwrap()),
    ];
    let e = Pool::create(named(&devs), &CreateOptions { slab_size: SLAB }).unwrap_err();
    assert!(
        matches!(spaces_error(&e), SpacesError::DiskTooSmall { disk, .. } if disk == "m1"),
        "{e}"
    );
    assert!(e.to_string().contains("m1 is too small"), "{e}");
    for d in &devs {
        assert!(
            contents(&**d).iter().all(|&b| b == 0),
            "a refused create wrote"
        );
    }
}

#[test]
fn members_of_another_pool() {
    let a = mem_disks(3, 8 << 20);
    let b = mem_disks(3, 8 << 20);
    let pa = create(&a);
    pa.create_space(&spec(
        "x",
        1 << 20,
        Resiliency::Mirror { copies: 2 },
        Some(1),
    ))
    .unwrap();
    drop(pa);
    create(&b);
    let before = (snapshot(&a), snapshot(&b));
    // Opening A with a member of B among its disks.
    let mut disks = named(&a);
    disks.push(PoolDisk::new("intruder", b[0].clone()));
    let e = Pool::open(disks, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(spaces_error(&e), SpacesError::ForeignMember { disk, .. } if disk == "intruder" || disk.starts_with('m')),
        "{e}"
    );
    assert!(e.to_string().contains("belongs to pool"), "{e}");
    // Creating a pool on a disk that already belongs to one.
    let fresh: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(8 << 20).unwrap());
    let e = Pool::create(
        vec![
            PoolDisk::new("fresh", fresh.clone()),
            PoolDisk::new("used", a[1].clone()),
        ],
        &CreateOptions { slab_size: SLAB },
    )
    .unwrap_err();
    assert!(
        e.to_string().starts_with("used: already a member of pool"),
        "{e}"
    );
    assert!(contents(&*fresh).iter().all(|&x| x == 0));
    // The same member twice (a copy of a disk).
    let copy: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(8 << 20).unwrap());
    copy.write_at(0, &contents(&*a[0])).unwrap();
    let mut disks = named(&a);
    disks.push(PoolDisk::new("copy", copy));
    let e = Pool::open(disks, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("is the same member"), "{e}");
    assert!(
        before == (snapshot(&a), snapshot(&b)),
        "a refused open wrote"
    );
}

#[test]
fn bad_parameters() {
    let devs = mem_disks(3, 8 << 20);
    for slab in [0, 1000, 32 << 10] {
        let e = Pool::create(named(&devs), &CreateOptions { slab_size: slab }).unwrap_err();
        assert!(e.to_string().contains("slab size"), "{e}");
    }
    let pool = create(&devs);
    let before = snapshot(&devs);
    let mut bad = vec![
        spec("", 1 << 20, Resiliency::Simple, None),
        spec("a/b", 1 << 20, Resiliency::Simple, None),
        spec("s", 1000, Resiliency::Simple, None),
        spec("s", 0, Resiliency::Simple, None),
        spec("s", 1 << 20, Resiliency::Mirror { copies: 4 }, None),
        spec("s", 1 << 20, Resiliency::Parity { redundancy: 3 }, None),
    ];
    bad.push(SpaceSpec {
        interleave: Some(3 << 10),
        ..spec("s", 1 << 20, Resiliency::Simple, None)
    });
    bad.push(SpaceSpec {
        interleave: Some(2 << 20),
        ..spec("s", 1 << 20, Resiliency::Simple, None)
    });
    bad.push(SpaceSpec {
        provisioning: Provisioning::Fixed,
        ..spec("big", 64 << 20, Resiliency::Simple, None)
    });
    for s in &bad {
        let e = pool.create_space(s).unwrap_err();
        assert!(matches!(e, Error::Layer(_)), "{s:?}: {e}");
    }
    assert!(before == snapshot(&devs), "refused specs wrote");
    pool.create_space(&spec("s", 1 << 20, Resiliency::Simple, None))
        .unwrap();
    let e = pool
        .create_space(&spec("s", 1 << 20, Resiliency::Simple, None))
        .unwrap_err();
    assert!(matches!(spaces_error(&e), SpacesError::SpaceExists(_)));
    let e = pool.open_space("nope").unwrap_err();
    assert!(matches!(spaces_error(&e), SpacesError::NoSuchSpace(_)));
}

#[test]
fn no_pool_and_corrupt_metadata() {
    let devs = mem_disks(2, 8 << 20);
    let e = Pool::open(named(&devs), &OpenOptions::default()).unwrap_err();
    assert!(matches!(spaces_error(&e), SpacesError::NoPool(_)), "{e}");
    let pool = create(&devs);
    pool.create_space(&spec(
        "m",
        2 << 20,
        Resiliency::Mirror { copies: 2 },
        Some(1),
    ))
    .unwrap();
    let space = pool.open_space("m").unwrap();
    let data = pattern(9, 2 << 20);
    space.write_at(0, &data).unwrap();
    drop((space, pool));
    // Both metadata slots of member 0 destroyed: it is no longer recognized, and the pool
    // opens from member 1, degraded.
    let slot = 1u64 << 20;
    scribble(&*devs[0], 0);
    scribble(&*devs[0], slot);
    let p = Pool::open(
        named(&devs),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let info = p.info();
    assert!(
        info.notes
            .iter()
            .any(|n| n.contains("m0: no pool metadata")),
        "{:?}",
        info.notes
    );
    assert!(info.members[0].disk.is_none());
    let mut back = vec![0u8; 2 << 20];
    p.open_space("m").unwrap().read_at(0, &mut back).unwrap();
    assert!(back == data);
}

#[test]
fn a_torn_metadata_slot_falls_back_to_the_other() {
    let devs = mem_disks(3, 8 << 20);
    let pool = create(&devs);
    pool.create_space(&spec("a", 1 << 20, Resiliency::Simple, Some(1)))
        .unwrap();
    let made = pool.info().sequence;
    drop(pool);
    // A clean close moved the write epoch on (two updates, both after the space was made).
    let seq = open(&devs, &[], true).info().sequence;
    assert_eq!(seq, made + 2);
    // The newest copy is in slot seq % 2 on every member; tear it on all of them.
    for d in &devs {
        scribble(&**d, (seq % 2) * (1 << 20) + 512);
    }
    let p = open(&devs, &[], true);
    assert_eq!(p.info().sequence, seq - 1);
    assert_eq!(
        p.spaces().len(),
        1,
        "the older copy is the close's first update"
    );
}
