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
        Err(Error::Locked {
            path, exclusive, ..
        }) => (path, exclusive),
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

#[test]
fn a_writer_that_shares_lets_readers_in_but_no_second_writer() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.raw");
    let sharing = FileOptions {
        share_rw: true,
        ..opts(false, true)
    };
    let w = FileDevice::create(&p, 1 << 20, &sharing).unwrap();
    w.write_at(0, &[3u8; 4096]).unwrap();
    // Readers come in beside it and see its writes.
    let r = FileDevice::open(&p, &opts(true, true)).unwrap();
    let mut b = [0u8; 4096];
    r.read_at(0, &mut b).unwrap();
    assert_eq!(b, [3u8; 4096]);
    // A second writer is refused, whether it shares or not.
    assert!(locked(FileDevice::open(&p, &opts(false, true))).1);
    assert!(locked(FileDevice::open(&p, &sharing)).1);
    drop(w);
    // With a reader in (it opened expecting the file to stay as it is), no writer comes in,
    // sharing or not.
    assert!(locked(FileDevice::open(&p, &opts(false, true))).1);
    assert!(locked(FileDevice::open(&p, &sharing)).1);
    drop(r);
    let w2 = FileDevice::open(&p, &sharing).unwrap();
    // A parent's open (keep_writers_out) is refused beside a writer that shares, and keeps
    // every writer out.
    let strict = FileOptions {
        keep_writers_out: true,
        ..opts(true, true)
    };
    assert!(!locked(FileDevice::open(&p, &strict)).1);
    drop(w2);
    let parent = FileDevice::open(&p, &strict).unwrap();
    assert!(locked(FileDevice::open(&p, &sharing)).1);
    assert!(locked(FileDevice::open(&p, &opts(false, true))).1);
    // Readers of every kind share with it.
    drop((FileDevice::open(&p, &opts(true, true)).unwrap(), parent));
}

#[test]
fn create_over_a_file_in_use_is_refused_before_anything_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.raw");
    let w = FileDevice::create(&p, 1 << 20, &opts(false, true)).unwrap();
    w.write_at(8192, &[9u8; 4096]).unwrap();
    w.flush().unwrap();
    let e = FileDevice::create(&p, 4096, &opts(false, true)).unwrap_err();
    assert_eq!(e.kind(), vstor_core::ErrorKind::InUse, "{e}");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    let mut b = [0u8; 4096];
    w.read_at(8192, &mut b).unwrap();
    assert_eq!(b, [9u8; 4096]);
}

/// Not a test of its own: the holder process of `a_killed_holder_frees_the_lock_at_once`. It
/// runs only when that test starts this binary with VSTOR_LOCK_HOLDER set.
#[test]
fn lock_holder_process() {
    let Ok(path) = std::env::var("VSTOR_LOCK_HOLDER") else {
        return;
    };
    let dev = FileDevice::open(
        &path,
        &FileOptions {
            engine: vstor_core::Engine::IoUring,
            ..opts(false, true)
        },
    )
    .unwrap();
    std::fs::write(format!("{path}.ready"), b"1").unwrap();
    // Keep requests in flight on io_uring until killed.
    let buf = vec![0x5au8; 1 << 20];
    let mut i = 0u64;
    loop {
        let mut reqs: Vec<_> = (0..16u64)
            .map(|k| ((i + k) % 60) << 20)
            .map(|off| vstor_core::Request::write(off, &buf))
            .collect();
        dev.submit(&mut reqs);
        i += 16;
    }
}

#[test]
fn a_killed_holder_frees_the_lock_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("held.raw");
    FileDevice::create(&p, 64 << 20, &opts(false, false)).unwrap();
    let ready = dir.path().join("held.raw.ready");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["lock_holder_process", "--exact", "--nocapture"])
        .env("VSTOR_LOCK_HOLDER", &p)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !ready.exists() {
        assert!(t.elapsed().as_secs() < 60, "the holder never got ready");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Busy: refused, naming the holder's pid.
    let e = FileDevice::open(&p, &opts(false, true)).unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.kind(), vstor_core::ErrorKind::InUse);
    assert!(msg.contains(&format!("pid {}", child.id())), "{msg}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap();
    let killed = std::time::Instant::now();
    child.wait().unwrap();
    // The next open succeeds within a second of the kill, requests in flight or not.
    loop {
        match FileDevice::open(&p, &opts(false, true)) {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.kind(), vstor_core::ErrorKind::InUse, "{e}");
                assert!(
                    killed.elapsed().as_millis() < 1000,
                    "still locked {} ms after the kill: {e}",
                    killed.elapsed().as_millis()
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

/// vstor's locks are QEMU's bytes: a vstor writer keeps qemu-io out (as a writer and as a
/// reader), and qemu-io gets in once the writer is gone.
#[test]
fn qemu_and_vstor_see_each_others_locks() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.raw");
    FileDevice::create(&p, 1 << 20, &opts(false, false)).unwrap();
    // A vstor writer: qemu-io cannot open the file, even read-only.
    let w = FileDevice::open(&p, &opts(false, true)).unwrap();
    for args in [
        &["-f", "raw", "-c", "write 0 512"][..],
        &["-r", "-f", "raw", "-c", "read 0 512"][..],
    ] {
        let o = Command::new("qemu-io")
            .args(args)
            .arg(&p)
            .output()
            .expect("qemu-io is installed by scripts/test (package qemu-utils)");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("lock"),
            "qemu-io {args:?} beside a vstor writer: {o:?}"
        );
    }
    drop(w);
    // Once the vstor writer is gone, qemu-io writes.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(&p)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}
