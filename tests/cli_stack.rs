//! End-to-end evidence for the stack builder (issue 15): image locks between processes, formats
//! told by content, the guard on probed raw disks, a legacy VHD converted as qemu-img sees it,
//! and a library without the CLI's crates.
//!
//! The lock tests run a real second process: a `vstor disk bench -w` slowed by a QoS cap
//! (`max-iops=`) holds its target for a minute, the test waits until it has opened the target
//! (its banner is printed after the open), runs the competing command, and kills the holder.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fails, ok, s};

/// The length and a hash of a file's bytes.
fn hash(p: &Path) -> (u64, u64) {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    (bytes.len() as u64, h.finish())
}

/// `len` bytes of the file at `off`, read straight from the file (not through vstor).
fn file_bytes(p: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

/// `len` bytes of a target at `off`, read through `vstor disk read --output`.
fn vstor_bytes(target: &str, off: u64, len: u64) -> Vec<u8> {
    try_vstor_bytes(target, off, len).unwrap_or_else(|e| panic!("disk read {target}: {e}"))
}

/// The same, or the error: a reader with locking=off beside a writer may meet the image in the
/// middle of an update and is asked again.
fn try_vstor_bytes(target: &str, off: u64, len: u64) -> Result<Vec<u8>, String> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let o = common::vstor(&[
        "disk",
        "read",
        target,
        "--offset",
        &off.to_string(),
        "--length",
        &len.to_string(),
        "--output",
        s(out.path()),
    ]);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    Ok(std::fs::read(out.path()).unwrap())
}

/// [`vstor_bytes`] for a reader beside a writer (locking=off or share-rw=on): tried up to 20
/// times.
fn bytes_beside_writer(target: &str, off: u64, len: u64) -> Vec<u8> {
    let mut last = String::new();
    for _ in 0..20 {
        match try_vstor_bytes(target, off, len) {
            Ok(b) => return b,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("disk read {target} beside a writer keeps failing: {last}")
}

/// Runs a reader beside a writer: asked again (up to 20 times) while it fails for any reason
/// but the lock, as [`bytes_beside_writer`]. Returns the last output.
fn beside_writer(args: &[&str]) -> std::process::Output {
    let mut o = common::vstor(args);
    for _ in 0..20 {
        if o.status.success() || String::from_utf8_lossy(&o.stderr).contains("in use") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        o = common::vstor(args);
    }
    o
}

fn create(p: &Path, size: &str) {
    ok(&["disk", "create", s(p), "--size", size]);
}

/// A region the competing writer aims at, away from the bench's block and from the first and
/// last sectors (which the probe guard watches).
const B_OFF: u64 = 4 << 20;
const B_LEN: u64 = 64 << 10;
/// Where the holder writes (4 KiB, over and over).
const A_OFF: u64 = 1 << 20;

/// The second writer's command: 64 KiB of 0xab at [`B_OFF`].
fn write_b(target: &str) -> std::process::Output {
    common::vstor(&[
        "disk",
        "write",
        target,
        "--offset",
        &B_OFF.to_string(),
        "--length",
        &B_LEN.to_string(),
        "--pattern",
        "0xab",
    ])
}

/// A long-running writer: `vstor disk bench TARGET,max-iops=50 -w` of 3000 flushed 4 KiB writes
/// of 0x77 at [`A_OFF`] (a minute at 50 IOPS). Killed when dropped.
struct Holder {
    child: Child,
    /// The holder's stdout, kept open so that its last line does not meet a closed pipe.
    _stdout: BufReader<std::process::ChildStdout>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Holder {
    /// Starts the writer and returns once it has opened its target (and so holds its locks):
    /// the bench prints its banner after the open.
    fn start(target: &str) -> Holder {
        Holder::spawn(target, true)
    }

    /// A long-running reader instead: 3000 reads of 4 KiB at [`A_OFF`] at 50 IOPS.
    fn start_reader(target: &str) -> Holder {
        Holder::spawn(target, false)
    }

    fn spawn(target: &str, write: bool) -> Holder {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr");
        let target = format!("{target},max-iops=50");
        let offset = A_OFF.to_string();
        let mut args = vec![
            "disk", "bench", &target, "-c", "3000", "-d", "1", "-S", "0", "-o", &offset,
        ];
        if write {
            args.extend(["-w", "--pattern", "0x77", "--flush-interval", "1"]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start vstor disk bench");
        let mut banner = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut banner).unwrap();
        let h = Holder {
            child,
            _stdout: stdout,
            stderr,
            _dir: dir,
        };
        assert!(
            banner.starts_with(if write {
                "Sending 3000 write requests"
            } else {
                "Sending 3000 read requests"
            }),
            "the holder did not start: {banner:?} {}",
            std::fs::read_to_string(&h.stderr).unwrap_or_default()
        );
        h
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics unless the holder still runs (so what was just refused was refused by its lock).
    fn still_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the holder ended early: {}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
    }

    /// Waits until a read-only open of `target` through the CLI is refused as in use (the
    /// holder's exclusive lock is visible to other processes), at most 30 s.
    fn wait_exclusive(&mut self, target: &str) {
        let t = Instant::now();
        loop {
            let o = common::vstor(&["disk", "read", target, "--length", "512"]);
            if !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("in use") {
                return;
            }
            self.still_running();
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{target} never became busy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the 0x77 the holder writes (and flushes) at [`A_OFF`] is visible through
    /// `read` (a lock-free reader), at most 30 s.
    fn wait_written(&mut self, read: impl Fn() -> Result<Vec<u8>, String>) {
        let t = Instant::now();
        while read().ok() != Some(vec![0x77; 4096]) {
            self.still_running();
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the holder's writes never showed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`s the holder and reaps it.
    fn kill(mut self) {
        self.still_running();
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that `o` is a refusal: one line, naming `file`, "in use", and the holder's pid.
fn assert_in_use(o: &std::process::Output, file: &Path, pid: u32) -> String {
    // 75 (EX_TEMPFAIL) is the CLI's exit status for ErrorKind::InUse.
    assert_eq!(o.status.code(), Some(75), "not refused as in use: {o:?}");
    let err = String::from_utf8(o.stderr.clone()).unwrap();
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("vstor: error: "), "{err}");
    assert!(
        err.contains(s(file)),
        "does not name {}: {err}",
        file.display()
    );
    assert!(err.contains("in use"), "{err}");
    assert!(
        err.contains(&format!("pid {pid}")),
        "does not name the holder (pid {pid}): {err}"
    );
    err
}

fn ab() -> Vec<u8> {
    vec![0xab; B_LEN as usize]
}

// ---------------------------------------------------------------------------------------------
// 1. Two writers, two processes.

#[test]
fn two_writers_on_a_dynamic_vhdx_the_second_is_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d.vhdx");
    create(&d, "16M");
    let t = s(&d);

    let mut h = Holder::start(t);
    h.wait_exclusive(t);
    // The holder's flushed writes are there (seen by a reader that takes no lock).
    let lockless = format!("{t},locking=off");
    h.wait_written(|| try_vstor_bytes(&lockless, A_OFF, 4096));

    let e = assert_in_use(&write_b(t), &d, h.pid());
    assert!(e.contains("writing needs it alone"), "{e}");
    // Refused before anything was written: the region reads as it was, even to a reader that
    // takes no lock.
    assert_eq!(
        bytes_beside_writer(&lockless, B_OFF, B_LEN),
        vec![0; B_LEN as usize]
    );
    h.kill();

    // Right after the kill -9 a writer gets in; the holder's flushed data survived.
    assert_eq!(vstor_bytes(t, B_OFF, B_LEN), vec![0; B_LEN as usize]);
    assert_eq!(vstor_bytes(t, A_OFF, 4096), vec![0x77; 4096]);
    let o = write_b(t);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(vstor_bytes(t, B_OFF, B_LEN), ab());
    assert_eq!(vstor_bytes(t, A_OFF, 4096), vec![0x77; 4096]);
    ok(&["disk", "check", t]);
}

#[test]
fn two_writers_on_a_raw_file_the_second_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["d.raw", "d.img"] {
        let d = dir.path().join(name);
        create(&d, "16M");
        let t = s(&d);
        let mut h = Holder::start(t);
        h.wait_exclusive(t);
        h.wait_written(|| Ok(file_bytes(&d, A_OFF, 4096)));

        assert_in_use(&write_b(t), &d, h.pid());
        // raw: names the same file and the same lock, and so do other names of the file.
        assert_in_use(&write_b(&format!("raw:{t}")), &d, h.pid());
        let hard = dir.path().join(format!("hard-{name}"));
        let soft = dir.path().join(format!("soft-{name}"));
        std::fs::hard_link(&d, &hard).unwrap();
        std::os::unix::fs::symlink(&d, &soft).unwrap();
        assert_in_use(&write_b(s(&hard)), &hard, h.pid());
        assert_in_use(&write_b(s(&soft)), &soft, h.pid());
        assert_eq!(
            file_bytes(&d, B_OFF, B_LEN as usize),
            vec![0; B_LEN as usize]
        );
        h.kill();

        assert_eq!(
            file_bytes(&d, B_OFF, B_LEN as usize),
            vec![0; B_LEN as usize]
        );
        let o = write_b(t);
        assert!(o.status.success(), "{o:?}");
        assert_eq!(file_bytes(&d, B_OFF, B_LEN as usize), ab());
        assert_eq!(file_bytes(&d, A_OFF, 4096), vec![0x77; 4096]);
    }
}

#[test]
fn a_writer_on_a_child_holds_its_parent_shared() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let c1 = dir.path().join("c1.avhdx");
    let c2 = dir.path().join("c2.avhdx");
    create(&base, "16M");
    ok(&[
        "disk",
        "write",
        s(&base),
        "--offset",
        "8M",
        "--length",
        "4k",
        "--pattern",
        "0x11",
    ]);
    ok(&["disk", "create", s(&c1), "--parent", s(&base)]);
    ok(&["disk", "create", s(&c2), "--parent", s(&base)]);
    let base_before = hash(&base);
    let c1_before = hash(&c1);

    let mut h = Holder::start(s(&c1));
    h.wait_exclusive(s(&c1));
    let lockless = format!("{},locking=off", s(&c1));
    h.wait_written(|| try_vstor_bytes(&lockless, A_OFF, 4096));

    // A writer on the parent is refused: the child's writer holds it shared.
    let e = assert_in_use(&write_b(s(&base)), &base, h.pid());
    assert!(e.contains("writing needs it alone"), "{e}");
    // A second writer on the same child is refused.
    assert_in_use(&write_b(s(&c1)), &c1, h.pid());
    // Readers of the parent share it with the child's writer.
    assert_eq!(vstor_bytes(s(&base), 8 << 20, 4096), vec![0x11; 4096]);
    ok(&["disk", "info", s(&base)]);
    // A second child of the same parent opens for writing beside the first.
    let o = write_b(s(&c2));
    assert!(o.status.success(), "{o:?}");
    assert_eq!(vstor_bytes(s(&c2), B_OFF, B_LEN), ab());
    assert_eq!(vstor_bytes(s(&c2), 8 << 20, 4096), vec![0x11; 4096]);
    h.still_running();
    // Nothing of the refused writes reached the parent.
    assert_eq!(hash(&base), base_before, "the parent changed");
    h.kill();

    // The refused writes are not in the first child either, and its writer gets in now.
    assert_eq!(vstor_bytes(s(&c1), B_OFF, B_LEN), vec![0; B_LEN as usize]);
    assert_ne!(
        hash(&c1),
        c1_before,
        "the holder wrote to the child, not the parent"
    );
    let o = write_b(s(&c1));
    assert!(o.status.success(), "{o:?}");
    assert_eq!(vstor_bytes(s(&c1), B_OFF, B_LEN), ab());
    assert_eq!(vstor_bytes(s(&c1), A_OFF, 4096), vec![0x77; 4096]);
    assert_eq!(hash(&base), base_before, "the parent changed");
    // With no child open, the parent may be written again.
    let o = write_b(s(&base));
    assert!(o.status.success(), "{o:?}");
    assert_eq!(vstor_bytes(s(&base), B_OFF, B_LEN), ab());
}

/// The lifecycle commands take the same locks: with a writer on one child (its parent held
/// shared), nothing that writes the parent or reads the busy child gets in, and nothing changes;
/// a reader of the other child and a new child of the parent do.
#[test]
fn lifecycle_commands_honour_the_locks() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (base, c1, c2) = (p("base.vhdx"), p("c1.avhdx"), p("c2.avhdx"));
    create(&base, "16M");
    ok(&[
        "disk",
        "write",
        s(&base),
        "--length",
        "4k",
        "--offset",
        "8M",
        "-P",
        "0x11",
    ]);
    ok(&["disk", "create", s(&c1), "--parent", s(&base)]);
    ok(&[
        "disk",
        "write",
        s(&c1),
        "--length",
        "4k",
        "--offset",
        "9M",
        "-P",
        "0x22",
    ]);
    ok(&["disk", "create", s(&c2), "--parent", s(&base)]);
    let before = (hash(&base), hash(&c1));

    let mut h = Holder::start(s(&c2));
    h.wait_exclusive(s(&c2));
    let o1 = p("o1.vhdx");
    let o2 = p("o2.vhdx");
    for (args, busy) in [
        (vec!["merge", s(&c1)], &base),
        (vec!["resize", s(&base), "--size", "32M"], &base),
        (vec!["compact", s(&base)], &base),
        (vec!["checkpoint", s(&base)], &base),
        (vec!["resize", s(&c2), "--size", "32M"], &c2),
        (vec!["convert", s(&c2), s(&o1)], &c2),
        (vec!["clone", s(&c2), s(&o2)], &c2),
        (vec!["check", s(&c2)], &c2),
    ] {
        let mut full = vec!["disk"];
        full.extend(&args);
        let o = common::vstor(&full);
        let e = assert_in_use(&o, busy, h.pid());
        assert_eq!(
            (hash(&base), hash(&c1)),
            before,
            "{args:?} changed a file: {e}"
        );
    }
    assert!(c1.exists(), "the refused merge deleted the child");
    assert!(
        !o1.exists() && !o2.exists(),
        "a refused copy left its output"
    );
    // Readers of the idle child (and so of the shared parent) and a new child get in.
    let o3 = p("o3.vhdx");
    ok(&["disk", "convert", s(&c1), s(&o3)]);
    assert_eq!(vstor_bytes(s(&o3), 8 << 20, 4096), vec![0x11; 4096]);
    assert_eq!(vstor_bytes(s(&o3), 9 << 20, 4096), vec![0x22; 4096]);
    ok(&["disk", "check", s(&c1)]);
    ok(&["disk", "create", s(&p("c3.avhdx")), "--parent", s(&base)]);
    assert_eq!((hash(&base), hash(&c1)), before);
    h.still_running();
    h.kill();
    // With the writer gone the merge goes through.
    ok(&["disk", "merge", s(&c1)]);
    assert!(!c1.exists());
    assert_eq!(vstor_bytes(s(&base), 9 << 20, 4096), vec![0x22; 4096]);
}

/// Making a differencing child reads its parent: like every read-only open it takes a shared
/// lock, so a parent that a writer has open (and is changing under the new child) is refused,
/// as `qemu-img create -b` refuses a backing file in use.
#[test]
fn a_child_of_a_parent_being_written_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    create(&base, "16M");
    let mut h = Holder::start(s(&base));
    h.wait_exclusive(s(&base));
    let lockless = format!("{},locking=off", s(&base));
    h.wait_written(|| try_vstor_bytes(&lockless, A_OFF, 4096));
    let o = common::vstor(&["disk", "create", s(&child), "--parent", s(&base)]);
    let made = child.exists();
    let pid = h.pid();
    h.still_running();
    h.kill();
    assert_in_use(&o, &base, pid);
    assert!(!made, "a refused create left {}", child.display());
    ok(&["disk", "create", s(&child), "--parent", s(&base)]);
    assert_eq!(vstor_bytes(s(&child), A_OFF, 4096), vec![0x77; 4096]);
}

/// A legacy VHD is read under a shared lock: a raw: writer of the same file is refused while a
/// reader has it, other readers are not.
#[test]
fn a_reader_of_a_legacy_vhd_holds_it_shared() {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("v.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&v), "8M"]);
    let before = hash(&v);
    let mut h = Holder::start_reader(s(&v));
    let raw = format!("raw:{}", s(&v));
    let o = common::vstor(&["disk", "write", &raw, "--length", "512", "-P", "1"]);
    let e = assert_in_use(&o, &v, h.pid());
    assert!(e.contains("writing needs it alone"), "{e}");
    assert_eq!(hash(&v), before, "the refused write changed the VHD");
    ok(&["disk", "info", s(&v)]);
    ok(&["disk", "read", s(&v), "--length", "512"]);
    ok(&["disk", "read", &raw, "--length", "512"]);
    ok(&["disk", "convert", s(&v), s(&dir.path().join("out.vhdx"))]);
    h.still_running();
    h.kill();
    assert_eq!(hash(&v), before);
}

// ---------------------------------------------------------------------------------------------
// 2. Readers beside a writer.

#[test]
fn a_reader_beside_a_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["d.raw", "d.vhdx"] {
        let d = dir.path().join(name);
        create(&d, "16M");
        let t = s(&d);
        let before = hash(&d);
        let mut h = Holder::start(t);
        h.wait_exclusive(t);
        let lockless = format!("{t},locking=off");
        h.wait_written(|| try_vstor_bytes(&lockless, A_OFF, 4096));
        let o = common::vstor(&["disk", "read", t, "--length", "512"]);
        let e = assert_in_use(&o, &d, h.pid());
        assert!(e.contains("it is open for writing"), "{e}");
        assert!(o.stdout.is_empty(), "a refused read printed data");
        assert_in_use(&common::vstor(&["disk", "info", t]), &d, h.pid());
        assert_in_use(
            &common::vstor(&["disk", "bench", t, "-c", "10"]),
            &d,
            h.pid(),
        );
        if name.ends_with(".vhdx") {
            assert_in_use(&common::vstor(&["disk", "check", t]), &d, h.pid());
        }
        h.still_running();
        h.kill();
        // The readers are let in once the writer is gone.
        assert_eq!(vstor_bytes(t, A_OFF, 4096), vec![0x77; 4096]);
        assert_ne!(hash(&d), before);
    }
}

#[test]
fn share_rw_lets_readers_in_beside_a_writer_but_never_a_second_writer() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["d.raw", "d.vhdx"] {
        let d = dir.path().join(name);
        create(&d, "16M");
        let t = s(&d);
        let mut h = Holder::start(&format!("{t},share-rw=on"));
        // Readers get in: wait until one sees the holder's flushed 0x77.
        h.wait_written(|| try_vstor_bytes(t, A_OFF, 4096));
        for args in [
            vec!["disk", "info", t],
            vec!["disk", "read", t, "--length", "512"],
        ] {
            let o = beside_writer(&args);
            assert!(
                o.status.success(),
                "{args:?} beside a share-rw writer: {o:?}"
            );
        }
        // A second writer is refused, with or without share-rw of its own.
        assert_in_use(&write_b(t), &d, h.pid());
        assert_in_use(&write_b(&format!("{t},share-rw=on")), &d, h.pid());
        assert_eq!(
            bytes_beside_writer(t, B_OFF, B_LEN),
            vec![0; B_LEN as usize]
        );
        h.still_running();
        h.kill();
        let o = write_b(t);
        assert!(o.status.success(), "{o:?}");
        assert_eq!(vstor_bytes(t, B_OFF, B_LEN), ab());
    }
}

// ---------------------------------------------------------------------------------------------
// 3. locking=off.

#[test]
fn locking_off_lets_a_second_open_through() {
    let dir = tempfile::tempdir().unwrap();
    // Raw: a second writer with locking=off writes beside the holder.
    let d = dir.path().join("d.raw");
    create(&d, "16M");
    let t = s(&d);
    let mut h = Holder::start(t);
    h.wait_exclusive(t);
    let off = format!("{t},locking=off");
    let o = write_b(&off);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(file_bytes(&d, B_OFF, B_LEN as usize), ab());
    assert_eq!(bytes_beside_writer(&off, B_OFF, B_LEN), ab());
    ok(&["disk", "info", &off]);
    h.still_running();
    h.kill();

    // VHDX: readers (read, info) with locking=off beside a writer. (Two writers of one VHDX
    // would corrupt it, which is the point of the lock; locking=off is not tried for that.)
    let v = dir.path().join("d.vhdx");
    create(&v, "16M");
    let t = s(&v);
    let mut h = Holder::start(t);
    h.wait_exclusive(t);
    let off = format!("{t},locking=off");
    h.wait_written(|| try_vstor_bytes(&off, A_OFF, 4096));
    // `disk info` of a VHDX must honour locking=off too (its refusal even tells the user to
    // use it).
    let o = beside_writer(&["disk", "info", &off]);
    assert!(
        o.status.success(),
        "disk info {off} is refused beside a writer: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let info = String::from_utf8(o.stdout).unwrap();
    assert!(info.contains("format:               vhdx"), "{info}");
    h.still_running();
    h.kill();
}

// ---------------------------------------------------------------------------------------------
// The same rules through the library, matched by error kind.

#[test]
fn library_opens_report_their_error_kinds() {
    use vstor::core::BlockDevice;
    use vstor::{open_target, ErrorKind, TargetOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d.raw");
    create(&d, "1M");
    let t = s(&d);
    let rw = TargetOptions::default();
    let ro = TargetOptions {
        read_only: Some(true),
        ..Default::default()
    };

    // OFD locks: two opens in one process conflict as two processes would.
    let w = open_target(t, &rw).unwrap();
    assert_eq!(open_target(t, &rw).unwrap_err().kind(), ErrorKind::InUse);
    assert_eq!(open_target(t, &ro).unwrap_err().kind(), ErrorKind::InUse);
    let lockless = open_target(&format!("{t},locking=off"), &ro).unwrap();
    drop(lockless);
    drop(w);
    let r1 = open_target(t, &ro).unwrap();
    let r2 = open_target(t, &ro).unwrap();
    assert_eq!(open_target(t, &rw).unwrap_err().kind(), ErrorKind::InUse);
    drop((r1, r2));
    let w = open_target(&format!("{t},share-rw=on"), &rw).unwrap();
    let r = open_target(t, &ro).unwrap();
    assert_eq!(
        open_target(&format!("{t},share-rw=on"), &rw)
            .unwrap_err()
            .kind(),
        ErrorKind::InUse
    );
    drop((w, r));

    // The probe guard refuses with an I/O error; raw: lets the same write through.
    let mut hdr = vec![0u8; 512];
    hdr[..8].copy_from_slice(b"vhdxfile");
    let w = open_target(t, &rw).unwrap();
    assert_eq!(
        w.device.write_at(0, &hdr).unwrap_err().kind(),
        ErrorKind::Io
    );
    drop(w);
    assert_eq!(file_bytes(&d, 0, 512), vec![0; 512]);
    let w = open_target(&format!("raw:{t}"), &rw).unwrap();
    w.device.write_at(0, &hdr).unwrap();
    drop(w);
    // Now a .raw that holds a VHDX signature: refused as unsupported, naming both.
    let e = open_target(t, &ro).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");

    // A foreign format is refused by name, as unsupported.
    let q = dir.path().join("q.img");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "8M"]);
    let e = open_target(s(&q), &ro).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

/// A process that forks (a VMM or daemon starting a helper, or any `Command::spawn` on another
/// thread) lends its child a copy of every descriptor until the child execs, the image lock's
/// (close-on-exec) descriptor included, and so the lock's open file description outlives a
/// drop for that moment. A reopen right after the drop must still get in, not fail naming the
/// child (it did, at once; also seen as rare failures of reopen-after-drop in this binary,
/// whose other tests spawn processes). Here the child waits 300 ms before it exits.
#[test]
fn a_reopen_is_not_refused_while_a_forked_child_has_not_exec_d() {
    use vstor::{open_target, TargetOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d.raw");
    create(&d, "1M");
    let w = open_target(s(&d), &TargetOptions::default()).unwrap();
    // SAFETY: fork() in a test process with other threads: the child calls only
    // async-signal-safe functions (nanosleep via usleep, _exit) before it exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: as above; the child never returns into the test harness.
        unsafe {
            libc::usleep(300_000);
            libc::_exit(0);
        }
    }
    drop(w);
    let t = Instant::now();
    let again = open_target(s(&d), &TargetOptions::default());
    let waited = t.elapsed();
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let again = again.unwrap_or_else(|e| {
        panic!("reopened after {waited:?} while a forked child (pid {pid}) had not exec'd: {e}")
    });
    drop(again);
}

// ---------------------------------------------------------------------------------------------
// 4. The probing matrix.

fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed by scripts/test (package qemu-utils)");
    assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
}

/// The contents of the matrix, in the order of the table's columns.
const CONTENTS: [&str; 6] = ["raw", "VHDX", "VHD", "qcow2", "VMDK", "VDI"];

/// What each case must do. A cell is either `open FORMAT HOW`: `disk info --json` reports
/// `format` FORMAT, and its `format_decided` names HOW (prefix, extension or content); or
/// `refuse WORD...`: both `disk info` and `disk read` fail with one line that names the file
/// and every WORD (format names, matched as whole words). Columns: the file's content, as
/// [`CONTENTS`].
#[rustfmt::skip]
const MATRIX: &[(&str, &str, [&str; 6])] = &[
    // prefix  name      raw                          VHDX                       VHD                         qcow2             VMDK             VDI
    ("",      "vhdx",  ["refuse VHDX raw",          "open vhdx extension",     "refuse VHDX VHD",          "refuse qcow2",   "refuse VMDK",   "refuse VDI"]),
    ("",      "avhdx", ["refuse VHDX raw",          "open vhdx extension",     "refuse VHDX VHD",          "refuse qcow2",   "refuse VMDK",   "refuse VDI"]),
    ("",      "vhd",   ["refuse VHD raw",           "refuse VHD VHDX",         "open vhd extension",       "refuse qcow2",   "refuse VMDK",   "refuse VDI"]),
    ("",      "raw",   ["open raw extension",       "refuse raw VHDX",         "refuse raw VHD",           "refuse qcow2",   "refuse VMDK",   "refuse VDI"]),
    ("",      "img",   ["open raw content",         "open vhdx content",       "open vhd content",         "refuse qcow2",   "refuse VMDK",   "refuse VDI"]),
    ("",      "bin",   ["open raw content",         "open vhdx content",       "open vhd content",         "refuse qcow2",   "refuse VMDK",   "refuse VDI"]),
    ("",      "vpc",   ["open raw content",         "open vhdx content",       "open vhd content",         "refuse qcow2",   "refuse VMDK",   "refuse VDI"]),
    ("",      "",      ["open raw content",         "open vhdx content",       "open vhd content",         "refuse qcow2",   "refuse VMDK",   "refuse VDI"]),
    // An explicit prefix is honoured whatever the name says; raw: opens any bytes as raw.
    ("raw:",  "vhdx",  ["open raw prefix",          "open raw prefix",         "open raw prefix",          "open raw prefix", "open raw prefix", "open raw prefix"]),
    ("raw:",  "avhdx", ["open raw prefix",          "open raw prefix",         "open raw prefix",          "open raw prefix", "open raw prefix", "open raw prefix"]),
    ("raw:",  "vhd",   ["open raw prefix",          "open raw prefix",         "open raw prefix",          "open raw prefix", "open raw prefix", "open raw prefix"]),
    ("raw:",  "raw",   ["open raw prefix",          "open raw prefix",         "open raw prefix",          "open raw prefix", "open raw prefix", "open raw prefix"]),
    ("raw:",  "img",   ["open raw prefix",          "open raw prefix",         "open raw prefix",          "open raw prefix", "open raw prefix", "open raw prefix"]),
    ("raw:",  "bin",   ["open raw prefix",          "open raw prefix",         "open raw prefix",          "open raw prefix", "open raw prefix", "open raw prefix"]),
    ("raw:",  "vpc",   ["open raw prefix",          "open raw prefix",         "open raw prefix",          "open raw prefix", "open raw prefix", "open raw prefix"]),
    ("raw:",  "",      ["open raw prefix",          "open raw prefix",         "open raw prefix",          "open raw prefix", "open raw prefix", "open raw prefix"]),
    ("vhdx:", "vhdx",  ["refuse VHDX raw",          "open vhdx prefix",        "refuse VHDX VHD",          "refuse VHDX qcow2", "refuse VHDX VMDK", "refuse VHDX VDI"]),
    ("vhdx:", "avhdx", ["refuse VHDX raw",          "open vhdx prefix",        "refuse VHDX VHD",          "refuse VHDX qcow2", "refuse VHDX VMDK", "refuse VHDX VDI"]),
    ("vhdx:", "vhd",   ["refuse VHDX raw",          "open vhdx prefix",        "refuse VHDX VHD",          "refuse VHDX qcow2", "refuse VHDX VMDK", "refuse VHDX VDI"]),
    ("vhdx:", "raw",   ["refuse VHDX raw",          "open vhdx prefix",        "refuse VHDX VHD",          "refuse VHDX qcow2", "refuse VHDX VMDK", "refuse VHDX VDI"]),
    ("vhdx:", "img",   ["refuse VHDX raw",          "open vhdx prefix",        "refuse VHDX VHD",          "refuse VHDX qcow2", "refuse VHDX VMDK", "refuse VHDX VDI"]),
    ("vhdx:", "bin",   ["refuse VHDX raw",          "open vhdx prefix",        "refuse VHDX VHD",          "refuse VHDX qcow2", "refuse VHDX VMDK", "refuse VHDX VDI"]),
    ("vhdx:", "vpc",   ["refuse VHDX raw",          "open vhdx prefix",        "refuse VHDX VHD",          "refuse VHDX qcow2", "refuse VHDX VMDK", "refuse VHDX VDI"]),
    ("vhdx:", "",      ["refuse VHDX raw",          "open vhdx prefix",        "refuse VHDX VHD",          "refuse VHDX qcow2", "refuse VHDX VMDK", "refuse VHDX VDI"]),
    ("vhd:",  "vhdx",  ["refuse VHD raw",           "refuse VHD VHDX",         "open vhd prefix",          "refuse VHD qcow2", "refuse VHD VMDK", "refuse VHD VDI"]),
    ("vhd:",  "avhdx", ["refuse VHD raw",           "refuse VHD VHDX",         "open vhd prefix",          "refuse VHD qcow2", "refuse VHD VMDK", "refuse VHD VDI"]),
    ("vhd:",  "vhd",   ["refuse VHD raw",           "refuse VHD VHDX",         "open vhd prefix",          "refuse VHD qcow2", "refuse VHD VMDK", "refuse VHD VDI"]),
    ("vhd:",  "raw",   ["refuse VHD raw",           "refuse VHD VHDX",         "open vhd prefix",          "refuse VHD qcow2", "refuse VHD VMDK", "refuse VHD VDI"]),
    ("vhd:",  "img",   ["refuse VHD raw",           "refuse VHD VHDX",         "open vhd prefix",          "refuse VHD qcow2", "refuse VHD VMDK", "refuse VHD VDI"]),
    ("vhd:",  "bin",   ["refuse VHD raw",           "refuse VHD VHDX",         "open vhd prefix",          "refuse VHD qcow2", "refuse VHD VMDK", "refuse VHD VDI"]),
    ("vhd:",  "vpc",   ["refuse VHD raw",           "refuse VHD VHDX",         "open vhd prefix",          "refuse VHD qcow2", "refuse VHD VMDK", "refuse VHD VDI"]),
    ("vhd:",  "",      ["refuse VHD raw",           "refuse VHD VHDX",         "open vhd prefix",          "refuse VHD qcow2", "refuse VHD VMDK", "refuse VHD VDI"]),
];

/// Makes one file of each content in `dir`/CONTENT/master and returns their paths.
fn matrix_masters(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for c in CONTENTS {
        let d = dir.join(format!("made-{c}"));
        std::fs::create_dir(&d).unwrap();
        let p = match c {
            "raw" => {
                // Random bytes (a fixed seed): no signature, but not zeros either.
                let p = d.join("m.raw");
                let mut rng = xorshift(0x5eed);
                let bytes: Vec<u8> = (0..(1 << 20)).map(|_| rng()).collect();
                std::fs::write(&p, bytes).unwrap();
                p
            }
            "VHDX" => {
                let p = d.join("m.vhdx");
                create(&p, "8M");
                p
            }
            _ => {
                let fmt = match c {
                    "VHD" => "vpc",
                    "qcow2" => "qcow2",
                    "VMDK" => "vmdk",
                    _ => "vdi",
                };
                let p = d.join(format!("m.{fmt}"));
                qemu_img(&["create", "-q", "-f", fmt, s(&p), "8M"]);
                p
            }
        };
        out.push(p);
    }
    out
}

/// A small deterministic byte generator (xorshift), so the raw content is the same every run.
fn xorshift(seed: u64) -> impl FnMut() -> u8 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 24) as u8
    }
}

/// Whether `msg` names `word` as a whole word (not inside a longer name such as VHD in VHDX,
/// and not as a prefix such as `raw:`).
fn names(msg: &str, word: &str) -> bool {
    let b = msg.as_bytes();
    msg.match_indices(word).any(|(i, _)| {
        let before = i.checked_sub(1).map(|j| b[j]);
        let after = b.get(i + word.len()).copied();
        !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == b':')
    })
}

/// Runs every case of the table whose prefix satisfies `which`; returns the cases that did not
/// do what the table says.
fn run_matrix(which: impl Fn(&str) -> bool) -> (usize, usize, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let masters = matrix_masters(dir.path());
    let outdir = tempfile::tempdir().unwrap();
    let mut wrong = Vec::new();
    let mut cases = 0;
    let mut bad = 0;
    // Every content under every name, each in a directory of its own.
    let mut files = Vec::new();
    for (ci, m) in masters.iter().enumerate() {
        let d = dir.path().join(format!("as-{}", CONTENTS[ci]));
        std::fs::create_dir(&d).unwrap();
        for (_, ext, _) in MATRIX.iter().take(8) {
            let p = if ext.is_empty() {
                d.join("disk")
            } else {
                d.join(format!("disk.{ext}"))
            };
            std::fs::copy(m, &p).unwrap();
            files.push(p);
        }
    }
    let all_before: Vec<_> = files.iter().map(|p| hash(p)).collect();

    for (prefix, ext, cells) in MATRIX.iter().filter(|(p, _, _)| which(p)) {
        for (ci, cell) in cells.iter().enumerate() {
            cases += 1;
            let d = dir.path().join(format!("as-{}", CONTENTS[ci]));
            let file = if ext.is_empty() {
                d.join("disk")
            } else {
                d.join(format!("disk.{ext}"))
            };
            let target = format!("{prefix}{}", s(&file));
            let case = format!("{} content as {target}", CONTENTS[ci]);
            let problems = wrong.len();
            let before = hash(&file);
            let mut words = cell.split(' ');
            let what = words.next().unwrap();
            let words: Vec<&str> = words.collect();
            let info = common::vstor(&["disk", "info", &target, "--json"]);
            let out = outdir.path().join("read.bin");
            let _ = std::fs::remove_file(&out);
            let read = common::vstor(&[
                "disk",
                "read",
                &target,
                "--length",
                "512",
                "--output",
                s(&out),
            ]);
            match what {
                "open" => {
                    let (format, how) = (words[0], words[1]);
                    if !info.status.success() || !read.status.success() {
                        wrong.push(format!(
                            "{case}: should open as {format} by {how}; info: {} read: {}",
                            String::from_utf8_lossy(&info.stderr).trim(),
                            String::from_utf8_lossy(&read.stderr).trim()
                        ));
                    } else {
                        let j: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
                        let decided = j["format_decided"].as_str().unwrap_or("");
                        if j["format"] != format || !decided.contains(how) {
                            wrong.push(format!(
                                "{case}: should open as {format} by {how}; info says {} {decided}",
                                j["format"]
                            ));
                        }
                        // The first sector as that format shows it: the file's own bytes for
                        // raw, zeros for the freshly made VHDX and VHD.
                        let want = if format == "raw" {
                            file_bytes(&file, 0, 512)
                        } else {
                            vec![0; 512]
                        };
                        if std::fs::read(&out).unwrap() != want {
                            wrong.push(format!("{case}: read the wrong first sector"));
                        }
                    }
                }
                "refuse" => {
                    for (cmd, o) in [("info", &info), ("read", &read)] {
                        let err = String::from_utf8_lossy(&o.stderr).to_string();
                        // The path itself may hold a format's name: take it out first.
                        let msg = err.replace(s(&file), "FILE");
                        let ok_line = !o.status.success()
                            && err.lines().count() == 1
                            && err.starts_with("vstor: error: ")
                            && msg.contains("FILE");
                        let missing: Vec<&&str> =
                            words.iter().filter(|w| !names(&msg, w)).collect();
                        if !ok_line || !missing.is_empty() {
                            wrong.push(format!(
                                "{case}: {cmd} should fail with one line naming the file and {}; \
                                 got (exit {:?}): {}",
                                words.join(" and "),
                                o.status.code(),
                                err.trim()
                            ));
                        }
                    }
                    if out.exists() {
                        wrong.push(format!("{case}: a refused read wrote its output"));
                    }
                }
                _ => unreachable!("bad cell {cell}"),
            }
            if hash(&file) != before {
                wrong.push(format!("{case}: the file changed"));
            }
            if wrong.len() > problems {
                bad += 1;
            }
        }
    }
    let all_after: Vec<_> = files.iter().map(|p| hash(p)).collect();
    assert_eq!(all_before, all_after, "a file of the matrix changed");
    (cases, bad, wrong)
}

#[test]
fn probe_matrix_by_name_and_content() {
    let (cases, bad, wrong) = run_matrix(|p| p.is_empty());
    assert_eq!(cases, 8 * 6);
    assert!(
        wrong.is_empty(),
        "{bad} of {cases} cases wrong:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn probe_matrix_with_explicit_prefixes() {
    let (cases, bad, wrong) = run_matrix(|p| !p.is_empty());
    assert_eq!(cases, 3 * 8 * 6);
    assert!(
        wrong.is_empty(),
        "{bad} of {cases} cases wrong:\n{}",
        wrong.join("\n")
    );
}

/// Runs vstor with `args` and returns its output, or None if it was still running after
/// `limit` (then it is killed).
fn vstor_within(args: &[&str], limit: Duration) -> Option<std::process::Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child.wait_with_output().unwrap())
}

/// Probing a FIFO (or anything that is neither a regular file nor a block device) must not
/// block: it fails at once with one line, as `raw:FIFO` does.
#[test]
fn probing_a_fifo_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    let named = dir.path().join("pipe.vhdx");
    std::os::unix::fs::symlink(&fifo, &named).unwrap();
    let out = dir.path().join("out.vhdx");
    let raw = format!("raw:{}", s(&fifo));
    for args in [
        vec!["disk", "info", &raw],
        vec!["disk", "info", s(&fifo)],
        vec!["disk", "read", s(&fifo), "--length", "512"],
        vec!["disk", "info", s(&named)],
        vec!["disk", "convert", s(&fifo), s(&out)],
    ] {
        let o = vstor_within(&args, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("vstor {args:?} hangs on a FIFO"));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}: {o:?}");
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
    }
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// 5. The probe guard.

/// A 512-byte sector that starts with `sig` at `at`.
fn sector_with(sig: &[u8], at: usize) -> Vec<u8> {
    let mut v = vec![0u8; 512];
    v[at..at + sig.len()].copy_from_slice(sig);
    v
}

#[test]
fn a_guest_cannot_give_a_raw_disk_another_formats_signature() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1u64 << 20;
    let last = (size - 512).to_string();
    let inputs = dir.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let put = |name: &str, bytes: &[u8]| {
        let p = inputs.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let vhdx = put("hdr.bin", &sector_with(b"vhdxfile", 0));
    let cookie = put("ftr.bin", &sector_with(b"conectix", 0));
    let qcow = put("qcow.bin", &sector_with(b"QFI\xfb", 0));
    let vdi = put(
        "vdi.bin",
        &sector_with(&0xbeda_107f_u32.to_le_bytes(), 0x40),
    );
    let half1 = put("half1.bin", b"vhdx");
    let half2 = put("half2.bin", b"file");

    for name in ["d.raw", "d.img"] {
        let d = dir.path().join(name);
        create(&d, "1M");
        let t = s(&d);
        let before = hash(&d);
        for (input, offset, format) in [
            (&vhdx, "0", "VHDX"),
            (&cookie, last.as_str(), "VHD"),
            (&cookie, "0", "VHD"),
            (&qcow, "0", "qcow2"),
            (&vdi, "0", "VDI"),
        ] {
            let e = fails(&["disk", "write", t, "--offset", offset, "--input", s(input)]);
            assert!(e.contains(t) && e.contains("refused"), "{e}");
            assert!(names(&e, format), "does not name {format}: {e}");
            assert!(e.contains("os error"), "not an I/O error: {e}");
            assert_eq!(hash(&d), before, "{name} changed");
        }
        // A signature assembled from two writes is refused too: the second one completes it.
        ok(&["disk", "write", t, "--offset", "0", "--input", s(&half1)]);
        let e = fails(&["disk", "write", t, "--offset", "4", "--input", s(&half2)]);
        assert!(names(&e, "VHDX"), "{e}");
        assert_eq!(file_bytes(&d, 0, 8), b"vhdx\0\0\0\0");
        // Writes elsewhere in the first sector, and anywhere else, pass.
        ok(&["disk", "write", t, "--offset", "100", "--input", s(&half2)]);
        ok(&[
            "disk",
            "write",
            t,
            "--offset",
            "0",
            "--length",
            "8",
            "--pattern",
            "0",
        ]);
        let info = ok(&["disk", "info", t]);
        assert!(info.contains("format:               raw"), "{info}");

        // raw:PATH may write the signature, and raw:PATH still opens the disk as raw.
        let raw = format!("raw:{t}");
        ok(&["disk", "write", &raw, "--offset", "0", "--input", s(&vhdx)]);
        assert_eq!(file_bytes(&d, 0, 8), b"vhdxfile");
        let info = ok(&["disk", "info", &raw]);
        assert!(
            info.contains("format:               raw, by the explicit prefix"),
            "{info}"
        );
        assert_eq!(vstor_bytes(&raw, 0, 512), sector_with(b"vhdxfile", 0));
        ok(&[
            "disk",
            "write",
            &raw,
            "--offset",
            "4k",
            "--length",
            "4k",
            "--pattern",
            "7",
        ]);
        assert_eq!(vstor_bytes(&raw, 4096, 4096), vec![7; 4096]);

        // Named plainly, the file now is what its content says, and nothing is written to it:
        // a .raw whose content is VHDX is refused naming both; a .img is probed as a VHDX,
        // which this one (a signature and nothing else) is not.
        let now = hash(&d);
        let e = fails(&["disk", "info", t]);
        assert!(e.contains(t), "{e}");
        let m = e.replace(t, "FILE");
        if name == "d.raw" {
            assert!(names(&m, "raw") && names(&m, "VHDX"), "{e}");
        } else {
            assert!(e.contains("corrupt"), "{e}");
        }
        fails(&[
            "disk",
            "write",
            t,
            "--offset",
            "8k",
            "--length",
            "1",
            "--pattern",
            "1",
        ]);
        assert_eq!(hash(&d), now, "{name} changed");
    }
}

/// The VHD footer that the probe looks for sits in the last 512 bytes of the *file*. A raw file
/// whose length is not whole sectors is served as a device of whole sectors, so the file's last
/// 512 bytes start inside the device's last sector: a write there must be checked against what
/// the probe will read.
#[test]
fn a_guest_cannot_put_a_vhd_footer_at_the_end_of_a_file_that_is_not_whole_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let cookie = dir.path().join("cookie.bin");
    std::fs::write(&cookie, b"conectix").unwrap();
    for name in ["u.img", "u.raw"] {
        let d = dir.path().join(name);
        let len = (1u64 << 20) + 100;
        std::fs::write(&d, vec![0u8; len as usize]).unwrap();
        let t = s(&d);
        let info = ok(&["disk", "info", t]);
        assert!(info.contains("format:               raw"), "{info}");
        let before = hash(&d);
        // The file's last 512 bytes start at len - 512, which the device serves (it ends at
        // 1 MiB).
        let at = (len - 512).to_string();
        let o = common::vstor(&["disk", "write", t, "--offset", &at, "--input", s(&cookie)]);
        let still = common::vstor(&["disk", "info", t]);
        assert!(
            !o.status.success() && hash(&d) == before,
            "a write of \"conectix\" at {at} of {name} ({len} bytes) was let through; \
             afterwards disk info says: {}{}",
            String::from_utf8_lossy(&still.stdout),
            String::from_utf8_lossy(&still.stderr)
        );
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(names(&e, "VHD") && e.contains("os error"), "{e}");
        assert!(still.status.success(), "{still:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. A legacy VHD made by qemu-img converts as qemu-img reads it.

#[test]
fn a_qemu_img_vpc_converts_to_vhdx_and_raw_and_qemu_img_compare_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("v.vpc");
    qemu_img(&["create", "-q", "-f", "vpc", s(&v), "8M"]);
    let o = Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 0x5a 1M 1M", s(&v)])
        .output()
        .expect("qemu-io runs");
    assert!(o.status.success(), "{o:?}");
    let before = hash(&v);
    let info = ok(&["disk", "info", s(&v), "--json"]);
    let j: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(j["format"], "vhd", "{info}");
    let virtual_size = j["virtual_size"].as_u64().unwrap();

    for (out, fmt) in [("out.vhdx", "vhdx"), ("out.raw", "raw")] {
        let out = dir.path().join(out);
        ok(&["disk", "convert", s(&v), s(&out)]);
        let o = Command::new("qemu-img")
            .args(["compare", "-f", "vpc", "-F", fmt, s(&v), s(&out)])
            .output()
            .expect("qemu-img runs");
        assert!(
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("identical"),
            "qemu-img compare {fmt}: {o:?}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&ok(&["disk", "info", s(&out), "--json"])).unwrap();
        assert_eq!(j["format"], fmt);
        assert_eq!(j["virtual_size"].as_u64(), Some(virtual_size));
        assert_eq!(vstor_bytes(s(&out), 1 << 20, 1 << 20), vec![0x5a; 1 << 20]);
        assert_eq!(vstor_bytes(s(&out), 0, 1 << 20), vec![0; 1 << 20]);
    }
    assert_eq!(hash(&v), before, "the source changed");
}

// ---------------------------------------------------------------------------------------------
// 7. The library without the CLI's crates.

fn cargo_tree(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "-p", "vstor", "-e", "normal", "--prefix", "none"])
        .args(args)
        .output()
        .expect("run cargo tree");
    assert!(o.status.success(), "cargo tree {args:?}: {o:?}");
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn the_library_alone_pulls_in_no_cli_crates() {
    const CLI: [&str; 4] = ["clap", "indicatif", "console", "serde_json"];
    let has = |tree: &str, krate: &str| {
        tree.lines()
            .any(|l| l.split_whitespace().next() == Some(krate))
    };
    let lib = cargo_tree(&["--no-default-features"]);
    let found: Vec<_> = CLI.iter().filter(|k| has(&lib, k)).collect();
    assert!(
        found.is_empty(),
        "the vstor library without default features depends on {found:?}:\n{lib}"
    );
    // The check can see them: the CLI build (default features) has clap.
    assert!(
        has(&cargo_tree(&[]), "clap"),
        "clap not found in the CLI build"
    );
}
