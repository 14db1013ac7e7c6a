//! Hostile tries at the issue-15 features (image locks, formats told by content, exit statuses),
//! as a careless operator, a crashing machine or a hostile guest would make them. Every test
//! here reproduces a defect that was found by trying: each fails until its defect is fixed (the
//! report that came with this file says where and how).
//!
//! Long-lived holders are real second processes: a `vstor disk bench` slowed by a QoS cap holds
//! its target (its banner is printed once the target is open); a `vstor disk convert` is stopped
//! with SIGSTOP once its output exists, so that what it holds can be looked at.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{fails, ok, s};
use vstor::core::BlockDevice;

fn hash(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A `vstor disk bench` on `target` at 50 IOPS (a minute of work): a writer (`-w`, flushed) or a
/// reader. Killed when dropped.
struct Holder {
    child: Child,
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Holder {
    fn start(target: &str, write: bool) -> Holder {
        let target = format!("{target},max-iops=50");
        let mut args = vec![
            "disk", "bench", &target, "-c", "3000", "-d", "1", "-S", "0", "-o", "1M",
        ];
        if write {
            args.extend(["-w", "--pattern", "0x77", "--flush-interval", "1"]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vstor disk bench");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        stdout.read_line(&mut banner).unwrap();
        assert!(
            banner.starts_with("Sending 3000"),
            "the holder did not start: {banner:?}"
        );
        Holder {
            child,
            _stdout: stdout,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn still_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the holder ended early"
        );
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that `o` was refused as in use (exit 75, one line naming `file` and `pid`).
fn assert_in_use(o: &std::process::Output, file: &Path, pid: u32) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(75),
        "not refused as in use (stdout {:?}): {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(
        err.contains(s(file)),
        "does not name {}: {err}",
        file.display()
    );
    assert!(
        err.contains(&format!("pid {pid}")),
        "does not name pid {pid}: {err}"
    );
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill {sig} {pid}");
}

// ---------------------------------------------------------------------------------------------
// share-rw=on: a writer that shares is let in beside readers that never agreed to a writer.
// ---------------------------------------------------------------------------------------------

/// A child's writer holds its parent shared (a reader that needs the parent to stay as it is).
/// A second process that opens the parent writable with `share-rw=on` must be refused: it gets
/// in today (byte 0 is read-locked by both, byte 1 is free), rewrites the parent under the
/// running child and breaks every other child of it (their DataWriteGuid linkage fails).
#[test]
fn a_share_rw_writer_is_refused_on_a_parent_that_a_child_writer_holds() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhdx");
    let child = dir.path().join("c.avhdx");
    let sibling = dir.path().join("s.avhdx");
    ok(&["disk", "create", s(&parent), "--size", "64M"]);
    ok(&["disk", "create", s(&child), "--parent", s(&parent)]);
    ok(&["disk", "create", s(&sibling), "--parent", s(&parent)]);
    let before = hash(&parent);
    let mut h = Holder::start(s(&child), true);
    let target = format!("{},share-rw=on", s(&parent));
    let o = common::vstor(&[
        "disk", "write", &target, "--offset", "4M", "--length", "64k", "-P", "0xab",
    ]);
    h.still_running();
    assert_in_use(&o, &parent, h.pid());
    drop(h);
    assert_eq!(hash(&parent), before, "the parent changed under its child");
    // The sibling still opens over its parent.
    ok(&[
        "disk",
        "read",
        s(&sibling),
        "--length",
        "512",
        "--output",
        "/dev/null",
    ]);
}

/// The same without a chain: a plain reader holds a raw file (shared, without share-rw), and a
/// writer with `share-rw=on` comes after it. share-rw lets readers in beside a writer that
/// allows it; it must not let a writer in beside readers that did not.
#[test]
fn a_share_rw_writer_is_refused_beside_an_earlier_reader() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    ok(&["disk", "create", s(&f), "--size", "16M"]);
    let before = hash(&f);
    let mut h = Holder::start(s(&f), false);
    let target = format!("{},share-rw=on", s(&f));
    let o = common::vstor(&[
        "disk", "write", &target, "--offset", "4M", "--length", "64k", "-P", "0xab",
    ]);
    h.still_running();
    assert_in_use(&o, &f, h.pid());
    drop(h);
    assert_eq!(
        hash(&f),
        before,
        "written beside a reader that shares no writes"
    );
}

// ---------------------------------------------------------------------------------------------
// The output of convert is written without an image lock, and a killed convert leaves a
// half-made image under the final name.
// ---------------------------------------------------------------------------------------------

/// A 256 MiB raw file full of data (so that a convert of it takes a while).
fn big_source(dir: &Path) -> PathBuf {
    use std::io::Write;
    let src = dir.join("src.raw");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    for i in 0..256u32 {
        block[..4].copy_from_slice(&i.to_le_bytes());
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
    src
}

/// Starts `vstor disk convert src dst` and SIGSTOPs it once the copy is under way (more than
/// 16 MiB of `dst` allocated: past what creating the output writes). Returns the stopped
/// process.
fn convert_stopped_midway(src: &Path, dst: &Path) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(["disk", "convert", s(src), s(dst)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vstor disk convert");
    let t = Instant::now();
    use std::os::unix::fs::MetadataExt;
    while std::fs::metadata(dst).map_or(true, |m| m.blocks() * 512 <= 16 << 20) {
        assert!(c.try_wait().unwrap().is_none(), "convert ended early");
        assert!(t.elapsed() < Duration::from_secs(30), "no output appeared");
        std::thread::yield_now();
    }
    signal(c.id(), "-STOP");
    assert!(
        c.try_wait().unwrap().is_none(),
        "convert finished before it could be stopped: the test is inconclusive"
    );
    c
}

/// While convert writes its output, the output is the convert's alone: another process that
/// opens it (to write, or to read a half-made image) must be refused as in use, naming the
/// convert. Today both get in: the destination (raw or VHDX) is opened with no image lock
/// (vstor_vhdx::convert opens it with FileOptions::default(), and Vhdx::create too), so a
/// second writer's data is silently overwritten, or lands in a VHDX that two processes update.
#[test]
fn the_output_of_a_running_convert_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let src = big_source(dir.path());
    for name in ["out.raw", "out.vhdx"] {
        let dst = dir.path().join(name);
        let mut c = convert_stopped_midway(&src, &dst);
        let w = common::vstor(&[
            "disk",
            "write",
            s(&dst),
            "--offset",
            "0",
            "--length",
            "4k",
            "-P",
            "5",
        ]);
        let r = common::vstor(&[
            "disk",
            "read",
            s(&dst),
            "--length",
            "512",
            "--output",
            "/dev/null",
        ]);
        signal(c.id(), "-CONT");
        let st = c.wait().unwrap();
        assert!(st.success(), "convert to {name} failed");
        assert_in_use(&w, &dst, c.id());
        assert_in_use(&r, &dst, c.id());
    }
}

/// A convert killed with SIGKILL (the OOM killer, a supervisor, a power cut) must not leave a
/// half-made image under the destination's name: today it leaves one that opens, checks clean
/// after its log is replayed, and reads zeroes where the rest of the source should be, while a
/// new convert to that name is refused ("File exists"). Checkpoint already builds its child
/// under a temporary name and renames it when complete; convert and clone do not.
#[test]
#[ignore = "not done: convert writes its output under the final name (as qemu-img convert does); \
            building it under a temporary name conflicts with the_output_of_a_running_convert_is_locked \
            as that test is written (issue 21 note)"]
fn a_killed_convert_leaves_no_half_made_output_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let src = big_source(dir.path());
    for name in ["out.raw", "out.vhdx"] {
        let dst = dir.path().join(name);
        let mut c = convert_stopped_midway(&src, &dst);
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(
            !dst.exists(),
            "a convert killed midway left {} ({} bytes) under its final name",
            dst.display(),
            std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0)
        );
        // And the same convert runs again to its end.
        ok(&["disk", "convert", s(&src), s(&dst)]);
    }
}

// ---------------------------------------------------------------------------------------------
// The probe guard's footer window goes stale when the file's length changes after the open.
// ---------------------------------------------------------------------------------------------

fn sector_with(sig: &[u8], at: usize) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[at..at + sig.len()].copy_from_slice(sig);
    b
}

/// A probed raw file of 1 MiB + 100 bytes (its last 100 bytes are past the device's end). The
/// device is resized to the capacity it already has (the VMM API's `disk.resize` does this on a
/// guest's request): the file is cut to 1 MiB, whole sectors. The guard still computes the
/// footer window from the length the file had at the open, 100 bytes too far, so a guest's
/// "conectix" at the start of the last sector passes and the file then probes as a VHD.
#[test]
fn the_probe_guard_follows_a_resize_that_cuts_the_files_tail() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("guest.img");
    let cap = 1u64 << 20;
    std::fs::File::create(&f)
        .unwrap()
        .set_len(cap + 100)
        .unwrap();
    let opened = vstor::open_target(s(&f), &vstor::TargetOptions::default()).unwrap();
    let dev: Arc<dyn BlockDevice> = opened.device;
    assert_eq!(dev.info().capacity, cap);
    dev.resize(cap).unwrap();
    assert_eq!(std::fs::metadata(&f).unwrap().len(), cap);
    let r = dev.write_at(cap - 512, &sector_with(b"conectix", 0));
    drop(dev);
    assert_eq!(
        vstor::probe::probe(&f).unwrap(),
        vstor::probe::Detected::Raw,
        "the guest turned its raw disk into a VHD (the write returned {r:?})"
    );
    assert!(r.is_err(), "the write should have been refused");
}

/// The same after the file grew by less than a sector while it was open (`truncate -s +100`
/// by someone on the host): the file's last 512 bytes now begin 412 bytes before the device's
/// end, where a guest can write, but the guard still watches the last 512 bytes of the device.
#[test]
fn the_probe_guard_follows_a_file_that_grew_after_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("guest.img");
    let cap = 1u64 << 20;
    std::fs::File::create(&f).unwrap().set_len(cap).unwrap();
    let opened = vstor::open_target(s(&f), &vstor::TargetOptions::default()).unwrap();
    let dev: Arc<dyn BlockDevice> = opened.device;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(cap + 100)
        .unwrap();
    let r = dev.write_at(cap - 512, &sector_with(b"conectix", 100));
    drop(dev);
    assert_eq!(
        vstor::probe::probe(&f).unwrap(),
        vstor::probe::Detected::Raw,
        "the guest turned its raw disk into a VHD (the write returned {r:?})"
    );
    assert!(r.is_err(), "the write should have been refused");
}

// ---------------------------------------------------------------------------------------------
// Commands that take a PATH parse it as a target string.
// ---------------------------------------------------------------------------------------------

/// A file name with a comma is an ordinary file name for the commands that take a PATH
/// (create, check, resize, compact, convert, clone, checkpoint): today each parses its PATH as a
/// target string and fails with "invalid target 'a,b.vhdx': option 'b.vhdx' is not key=value"
/// (exit 2), although `disk read 'a,,b.vhdx'` shows the file is fine.
#[test]
fn commands_that_take_a_path_accept_a_comma_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("my,disk.vhdx");
    let r = dir.path().join("backup,1.img");
    let out = dir.path().join("out.raw");
    ok(&["disk", "create", s(&v), "--size", "8M"]);
    assert!(v.exists());
    ok(&["disk", "create", s(&r), "--size", "1M"]);
    ok(&["disk", "check", s(&v)]);
    ok(&["disk", "resize", s(&v), "--size", "16M"]);
    ok(&["disk", "compact", s(&v)]);
    ok(&["disk", "convert", s(&r), s(&out)]);
    ok(&["disk", "clone", s(&v), s(&dir.path().join("copy.vhdx"))]);
    ok(&[
        "disk",
        "checkpoint",
        s(&v),
        "--child",
        s(&dir.path().join("c,1.avhdx")),
    ]);
}

/// `disk create raw:q.vhdx` makes a raw file named `raw:q.vhdx`: the prefix picks the format
/// but stays in the file name, whose extension says VHDX, so the new disk cannot be opened by
/// its own name ("named as VHDX (by its extension) but its content is raw"). Whatever create
/// makes must open by the name it was given.
#[test]
fn a_created_disk_opens_by_the_name_it_was_created_with() {
    let dir = tempfile::tempdir().unwrap();
    let name = "raw:q.vhdx";
    let o = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .current_dir(dir.path())
        .args(["disk", "create", name, "--size", "8M"])
        .output()
        .unwrap();
    if o.status.success() {
        for p in std::fs::read_dir(dir.path()).unwrap() {
            let p = p.unwrap().path();
            let o = common::vstor(&["disk", "info", s(&p)]);
            assert!(
                o.status.success(),
                "`disk create {name}` made {}, which does not open: {}",
                p.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    } else {
        assert_eq!(o.status.code(), Some(2), "{o:?}");
    }
}

/// `disk convert raw:x.img out.raw`: an explicit prefix is always honoured (issue 15), and it is
/// the only way to convert a raw disk whose guest wrote a VHDX signature into its first sector
/// (through raw:, as allowed). Today convert resolves the target but then opens the literal
/// path "raw:x.img": "cannot open raw:x.img: No such file or directory".
#[test]
fn convert_honours_an_explicit_raw_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.img");
    let out = dir.path().join("out.raw");
    ok(&["disk", "create", s(&x), "--size", "1M"]);
    let sig = dir.path().join("sig.bin");
    std::fs::write(&sig, sector_with(b"vhdxfile", 0)).unwrap();
    let raw_x = format!("raw:{}", s(&x));
    ok(&["disk", "write", &raw_x, "--offset", "0", "--input", s(&sig)]);
    ok(&["disk", "convert", &raw_x, s(&out)]);
    assert_eq!(hash(&out), hash(&x));
}

// ---------------------------------------------------------------------------------------------
// A command that conflicts with itself is told "in use by vstor (pid <its own pid>)", exit 75.
// ---------------------------------------------------------------------------------------------

/// `disk set c.avhdx --parent c.avhdx` holds c.avhdx exclusively and then asks for a shared
/// lock on the same file: it is refused "c.avhdx is in use by vstor (pid <its own pid>)" with
/// exit status 75 ("try again later"), which a supervisor retries for ever. Nobody else holds
/// the file: this is bad input (a disk cannot be its own parent), exit 2, and never names the
/// command itself as the holder.
#[test]
fn a_disk_made_its_own_parent_is_bad_input_not_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.vhdx");
    let c = dir.path().join("c.avhdx");
    let link = dir.path().join("link.avhdx");
    ok(&["disk", "create", s(&p), "--size", "8M"]);
    ok(&["disk", "create", s(&c), "--parent", s(&p)]);
    std::fs::hard_link(&c, &link).unwrap();
    let before = hash(&c);
    for parent in [&c, &link] {
        let child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args([
                "disk",
                "set",
                s(&c),
                "--parent",
                s(parent),
                "--ignore-linkage",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a disk was made its own parent");
        assert!(
            !err.contains(&format!("pid {pid}")),
            "the command names itself as the holder: {err}"
        );
        assert_eq!(o.status.code(), Some(2), "{err}");
    }
    assert_eq!(hash(&c), before);
}

/// `qos run` with two writing flows on one file, spelled `d.raw` and `./d.raw`: the run means
/// to let its first open hold the lock for both (it does for two identical spellings), but it
/// compares the spelled paths, so the second open is refused as in use by the run itself
/// (exit 75 naming its own pid).
#[test]
fn qos_run_with_one_file_under_two_spellings_is_not_in_use_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    ok(&[
        "disk",
        "create",
        s(&dir.path().join("d.raw")),
        "--size",
        "16M",
    ]);
    let o = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .current_dir(dir.path())
        .args([
            "qos",
            "run",
            "--flow",
            "d.raw",
            "--flow",
            "./d.raw",
            "--rw",
            "randwrite",
            "--seconds",
            "0.3",
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Messages.
// ---------------------------------------------------------------------------------------------

/// A file of 108 bytes that starts with "vhdxfile" is refused as too small for a VHDX, but the
/// message gives the device's size rounded down to whole sectors: "0 bytes is too small".
#[test]
fn a_tiny_vhdx_lookalike_is_refused_with_its_real_size() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("v.bin");
    let mut bytes = b"vhdxfile".to_vec();
    bytes.resize(108, 0);
    std::fs::write(&f, &bytes).unwrap();
    let err = fails(&["disk", "info", s(&f)]);
    assert!(err.contains(s(&f)), "{err}");
    assert!(err.contains("108 bytes"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// More from the operator's side.
// ---------------------------------------------------------------------------------------------

/// `disk info` of a differencing disk reads its whole chain, but locks only the image itself:
/// while its parent is held for writing (here through `raw:`, as a careless operator would), it
/// reports a parent that is changing under it, where `disk read` of the same child is refused.
/// The chain's files are read, so they are held shared as every other open holds them.
#[test]
fn disk_info_of_a_child_holds_its_parent_shared() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhdx");
    let child = dir.path().join("c.avhdx");
    ok(&[
        "disk",
        "create",
        s(&parent),
        "--size",
        "64M",
        "--fixed",
        "--block-size",
        "1M",
    ]);
    ok(&["disk", "create", s(&child), "--parent", s(&parent)]);
    // A writer of the parent's bytes well inside its payload (so that the image stays sound).
    let target = format!("raw:{}", s(&parent));
    let mut h = {
        let target = format!("{target},max-iops=50");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args([
                "disk", "bench", &target, "-c", "3000", "-d", "1", "-S", "0", "-o", "40M", "-w",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        stdout.read_line(&mut banner).unwrap();
        assert!(banner.starts_with("Sending 3000"), "{banner:?}");
        Holder {
            child,
            _stdout: stdout,
        }
    };
    let read = common::vstor(&["disk", "read", s(&child), "--length", "512"]);
    assert_in_use(&read, &parent, h.pid());
    let info = common::vstor(&["disk", "info", s(&child)]);
    h.still_running();
    assert_in_use(&info, &parent, h.pid());
}

/// The refusal says "close that first, or open with locking=off if you know it is safe". That
/// advice must be one the user can follow: `disk resize` (like compact, merge, checkpoint, set,
/// check, clone, convert) takes a PATH, and `disk resize 'd.vhdx,locking=off'` fails with
/// "cannot open d.vhdx,locking=off" (the pool case is the next test).
#[test]
fn an_in_use_refusal_advises_locking_off_only_where_it_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d.vhdx");
    ok(&["disk", "create", s(&d), "--size", "64M"]);
    let h = Holder::start(s(&d), true);
    let o = common::vstor(&["disk", "resize", s(&d), "--size", "128M"]);
    assert_in_use(&o, &d, h.pid());
    drop(h);
    if String::from_utf8_lossy(&o.stderr).contains("locking=off") {
        let with = format!("{},locking=off", s(&d));
        ok(&["disk", "resize", &with, "--size", "128M"]);
    }
}

/// The pool half of [`an_in_use_refusal_advises_locking_off_only_where_it_works`]: a pool
/// target takes `locking=off` and ignores it (members are always locked); its refusal must not
/// advise locking=off to the user who just gave it.
#[test]
fn a_pool_refusal_does_not_advise_the_locking_off_it_ignores() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    ok(&[
        "pool",
        "create",
        s(&pool),
        "--disks",
        "3",
        "--disk-size",
        "512M",
    ]);
    ok(&[
        "space",
        "create",
        s(&pool),
        "data",
        "--size",
        "64M",
        "--resiliency",
        "mirror",
    ]);
    let space = format!("pool:{}/data", s(&pool));
    let h = Holder::start(&space, true);
    let with = format!("{space},locking=off");
    let o = common::vstor(&[
        "disk", "write", &with, "--offset", "8M", "--length", "4k", "-P", "1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "written beside the pool's writer");
    drop(h);
    assert!(
        !err.contains("open with locking=off"),
        "the refusal of a target that says locking=off advises locking=off: {err}"
    );
}

/// `pool create --device FILE` formats FILE as a pool member. It refuses a member of another
/// pool (exit 2), but a file that holds a VHDX (which vstor itself tells by its content) is
/// overwritten without a word: one careless command destroys a disk image.
#[test]
fn pool_create_refuses_a_device_that_holds_a_disk_image() {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("vm.vhdx");
    ok(&["disk", "create", s(&v), "--size", "1G"]);
    ok(&[
        "disk",
        "write",
        s(&v),
        "--offset",
        "0",
        "--length",
        "1M",
        "-P",
        "7",
    ]);
    // Large enough for a member.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&v)
        .unwrap()
        .set_len(600 << 20)
        .unwrap();
    let before = hash(&v);
    let mut args = vec!["pool", "create"];
    let pool = dir.path().join("pool");
    args.push(s(&pool));
    let others: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("m{i}.raw")))
        .collect();
    for m in &others {
        std::fs::File::create(m)
            .unwrap()
            .set_len(600 << 20)
            .unwrap();
    }
    for m in std::iter::once(&v).chain(&others) {
        args.extend(["--device", s(m)]);
    }
    let o = common::vstor(&args);
    assert!(
        !o.status.success(),
        "a VHDX was made a pool member: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(hash(&v), before, "the VHDX was changed");
}

/// The reverse of [`a_share_rw_writer_is_refused_on_a_parent_that_a_child_writer_holds`]: a
/// writer holds a VHDX with `share-rw=on` (readers welcome), and `disk create c.avhdx --parent`
/// of it gets in, as a reader would. But a parent is not read like a file a reader looks at: a
/// child is a delta over the parent as it is now. The new child records the DataWriteGuid of
/// the moment, the writer goes on writing (the guid moves once per session, so the linkage still
/// matches) and the child's view of its disk changes under it. A parent being written, sharing
/// or not, must not get a child.
#[test]
fn a_child_is_not_made_of_a_parent_that_a_share_rw_writer_holds() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhdx");
    let child = dir.path().join("c.avhdx");
    ok(&["disk", "create", s(&parent), "--size", "64M"]);
    let shared = format!("{},share-rw=on", s(&parent));
    let mut h = Holder::start(&shared, true);
    let o = common::vstor(&["disk", "create", s(&child), "--parent", s(&parent)]);
    h.still_running();
    assert_in_use(&o, &parent, h.pid());
    assert!(
        !child.exists(),
        "a child was made of a parent being written"
    );
}

/// The case with the tool it names: QEMU (since 2.10) and vstor both lock images, but on
/// different bytes (QEMU's OFD locks sit at 100 + permission and 200 + permission; vstor's at 0
/// and 1), so neither sees the other. `qemu-img resize` (which QEMU keeps out of an image that
/// a QEMU writer holds) resizes a raw file under a running vstor writer. vstor should take (or
/// at least test) QEMU's lock bytes too.
#[test]
fn qemu_img_sees_a_vstor_writers_lock() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    ok(&["disk", "create", s(&f), "--size", "16M"]);
    let mut h = Holder::start(s(&f), true);
    let q = Command::new("qemu-img")
        .args(["resize", "-f", "raw", s(&f), "32M"])
        .output()
        .expect("qemu-img is installed by scripts/test (package qemu-utils)");
    h.still_running();
    let len = std::fs::metadata(&f).unwrap().len();
    drop(h);
    assert!(
        !q.status.success(),
        "qemu-img resized an image that a vstor writer holds: {}",
        String::from_utf8_lossy(&q.stdout)
    );
    assert_eq!(len, 16 << 20);
}

/// The guard now finds the file's end by the path it was opened with (a stat of the path on
/// every write). A file renamed while open (an operator moving a running guest's disk) no longer
/// has that path: the guard then watches only the device's last 512 bytes, and on a file with a
/// tail past the device (1 MiB + 100 bytes here) a guest's "conectix" 100 bytes into the last
/// sector lands where probe() reads the footer. The guard should look at the open file itself
/// (fstat of a descriptor it holds), not at whatever the path names now.
#[test]
fn the_probe_guard_follows_the_open_file_not_its_old_path() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("guest.img");
    let moved = dir.path().join("moved.img");
    let cap = 1u64 << 20;
    std::fs::File::create(&f)
        .unwrap()
        .set_len(cap + 100)
        .unwrap();
    let opened = vstor::open_target(s(&f), &vstor::TargetOptions::default()).unwrap();
    let dev: Arc<dyn BlockDevice> = opened.device;
    std::fs::rename(&f, &moved).unwrap();
    let r = dev.write_at(cap - 512, &sector_with(b"conectix", 100));
    drop(dev);
    assert_eq!(
        vstor::probe::probe(&moved).unwrap(),
        vstor::probe::Detected::Raw,
        "the guest turned its raw disk into a VHD (the write returned {r:?})"
    );
    assert!(r.is_err(), "the write should have been refused");
}

/// A copy needs its source unchanged from its first read to its last, as `qemu-img convert`
/// does (it is refused beside any writer of its source). `disk convert`, `disk clone` and
/// `disk check` hold the image as a plain reader, which a writer with `share-rw=on` lets in:
/// convert and clone then exit 0 with a copy of a disk that changed while it was read, and
/// check calls the healthy image "not clean" (the writer's pending log, its growing file). They
/// should hold the image as the parents of a chain are held (refused beside any writer).
#[test]
fn a_copy_or_check_is_refused_beside_a_writer_that_shares() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d.vhdx");
    ok(&["disk", "create", s(&d), "--size", "64M"]);
    let shared = format!("{},share-rw=on", s(&d));
    let mut h = Holder::start(&shared, true);
    let out = dir.path().join("out.raw");
    let copy = dir.path().join("copy.vhdx");
    let convert = common::vstor(&["disk", "convert", s(&d), s(&out)]);
    let clone = common::vstor(&["disk", "clone", s(&d), s(&copy)]);
    let check = common::vstor(&["disk", "check", s(&d)]);
    h.still_running();
    let pid = h.pid();
    drop(h);
    assert_in_use(&convert, &d, pid);
    assert!(!out.exists());
    assert_in_use(&clone, &d, pid);
    assert!(!copy.exists());
    assert_in_use(&check, &d, pid);
}
