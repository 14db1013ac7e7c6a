//! `FileOptions::lock`: an advisory flock, exclusive for a writable open and shared for a
//! read-only one, taken without waiting. flock locks belong to open file descriptions, so two
//! opens in one process conflict as two processes would.

use vstor_core::{BlockDevice, Error, FileDevice, FileOptions};

fn opts(read_only: bool, lock: bool) -> FileOptions {
    FileOptions {
        read_only,
        lock,
        ..FileOptions::default()
    }
}

fn locked(r: Result<FileDevice, Error>) -> (String, bool) {
    match r {
        Err(Error::Locked { path, exclusive }) => (path, exclusive),
        Err(e) => panic!("expected Error::Locked, got {e}"),
        Ok(_) => panic!("expected Error::Locked, the open succeeded"),
    }
}

#[test]
fn writers_exclude_everyone_readers_share() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.raw");
    let w = FileDevice::create(&p, 1 << 20, &opts(false, true)).unwrap();
    w.write_at(0, &[7u8; 4096]).unwrap();
    // A second writer and a reader are refused while the writer is open.
    let (path, exclusive) = locked(FileDevice::open(&p, &opts(false, true)));
    assert_eq!((path.as_str(), exclusive), (p.to_str().unwrap(), true));
    let e = FileDevice::open(&p, &opts(true, true)).unwrap_err();
    assert!(matches!(
        e,
        Error::Locked {
            exclusive: false,
            ..
        }
    ));
    let msg = e.to_string();
    assert!(
        msg.contains(p.to_str().unwrap()) && msg.contains("in use"),
        "{msg}"
    );
    // An open that does not ask for the lock ignores it.
    let plain = FileDevice::open(&p, &opts(true, false)).unwrap();
    let mut b = [0u8; 4096];
    plain.read_at(0, &mut b).unwrap();
    assert_eq!(b, [7u8; 4096]);
    drop(plain);
    drop(w);
    // Readers share; a writer is refused while any reader is open.
    let r1 = FileDevice::open(&p, &opts(true, true)).unwrap();
    let r2 = FileDevice::open(&p, &opts(true, true)).unwrap();
    assert!(locked(FileDevice::open(&p, &opts(false, true))).1);
    drop(r1);
    assert!(locked(FileDevice::open(&p, &opts(false, true))).1);
    drop(r2);
    // The last reader gone, a writer gets it.
    let w = FileDevice::open(&p, &opts(false, true)).unwrap();
    w.read_at(0, &mut b).unwrap();
    assert_eq!(b, [7u8; 4096]);
}
