//! Pools opened through a directory lock their members (flock: exclusive when writable,
//! shared when read-only), so two writers never share a pool. flock locks belong to open file
//! descriptions: two opens in one test conflict as two processes would.

use std::path::Path;
use vstor_core::{BlockDevice, Error, FileOptions};
use vstor_spaces::{CreateOptions, OpenOptions, Pool, Provisioning, Resiliency, SpaceSpec};

fn open(dir: &Path, read_only: bool) -> vstor_core::Result<Pool> {
    Pool::open_dir(
        dir,
        &OpenOptions {
            read_only,
            ..Default::default()
        },
        &FileOptions::default(),
    )
}

fn files(dir: &Path) -> Vec<Vec<u8>> {
    (0..3)
        .map(|i| std::fs::read(dir.join(format!("disk{i}.raw"))).unwrap())
        .collect()
}

fn assert_locked(r: vstor_core::Result<Pool>, dir: &Path) {
    match r {
        Err(Error::Locked { path, .. }) => {
            assert!(path.starts_with(dir.to_str().unwrap()), "{path}");
            assert!(path.ends_with(".raw"), "{path}");
        }
        Err(e) => panic!("expected Error::Locked, got {e}"),
        Ok(_) => panic!("expected Error::Locked, the open succeeded"),
    }
}

#[test]
fn a_writable_open_excludes_other_opens_and_read_only_opens_share() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let pool = Pool::create_in_dir(
        &dir,
        3,
        16 << 20,
        &CreateOptions { slab_size: 1 << 20 },
        &FileOptions::default(),
    )
    .unwrap();
    // The creating handle holds the lock too.
    assert_locked(open(&dir, true), &dir);
    pool.create_space(&SpaceSpec {
        name: "s".into(),
        size: 2 << 20,
        resiliency: Resiliency::Parity { redundancy: 1 },
        columns: Some(3),
        interleave: Some(64 << 10),
        provisioning: Provisioning::Thin,
    })
    .unwrap();
    let data = vec![5u8; 1 << 20];
    pool.open_space("s").unwrap().write_at(0, &data).unwrap();
    drop(pool);

    let w = open(&dir, false).unwrap();
    let space = w.open_space("s").unwrap();
    space.flush().unwrap();
    let before = files(&dir);
    // A second writer and a reader are refused, and write nothing.
    assert_locked(open(&dir, false), &dir);
    assert_locked(open(&dir, true), &dir);
    assert!(files(&dir) == before, "a refused open wrote");
    // The first writer goes on.
    space.write_at(1 << 20, &data).unwrap();
    drop((space, w));

    // Readers share, and keep writers out.
    let r1 = open(&dir, true).unwrap();
    let r2 = open(&dir, true).unwrap();
    let mut back = vec![0u8; 2 << 20];
    r1.open_space("s").unwrap().read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 5));
    r2.open_space("s").unwrap().read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 5));
    let before = files(&dir);
    assert_locked(open(&dir, false), &dir);
    assert!(files(&dir) == before, "a refused open wrote");
    drop((r1, r2));
    // All closed: a writer opens.
    let w = open(&dir, false).unwrap();
    w.open_space("s").unwrap().read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 5));
}
