//! Crash points taken by freezing a running `vstor disk resize` (issue 21, "Evidence"; the shell
//! form is `shared/repro/vhdx/resize_crash_readonly_open.sh`).
//!
//! The resize runs as a child process. Now and then it is stopped with SIGSTOP, and the image
//! file is copied, holes kept, as it is at that instant: the copy is what a crash of the process
//! at that moment leaves behind. After the resize has finished, every distinct copy must:
//! - open read-only (`disk info`), with the old or the new virtual size;
//! - read back the data written before the resize (read-only, the log replayed in memory);
//! - take a write (a writable open, which replays a pending log), then `disk check` clean, and
//!   read back both the old data and the new write, with the same virtual size as before.
//!
//! The test also asserts that it caught the resize at several distinct moments (each copy is
//! taken only when the image's length or first 8 MiB differ from the last copy's), on both sides
//! of the commit of the new size, so that it cannot pass without having looked at crash points.
//!
//! The targets are 2 TiB, not the 64 TiB of the shell script: with 1 MiB blocks a 64 TiB BAT is
//! 512 MiB, and a debug build takes seconds per open of each copy; 2 TiB still grows the BAT
//! (1 to 16 MiB) over data blocks that move, in several log entries, and keeps the whole test
//! within about half a minute on a loaded two-core machine.

mod common;

use common::{ok, s, vstor};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
/// Bytes read or written at each probe.
const PROBE: u64 = 4096;
/// Snapshots taken per resize at most.
const MAX_SNAPSHOTS: usize = 30;
/// Bytes at the start of the image compared to tell one moment from another.
const HEAD: u64 = 8 * MIB;
/// Distinct snapshots verified per resize at most (verification is a handful of process runs
/// each; the cap keeps the test well under a minute on a loaded two-core machine).
const MAX_VERIFIED: usize = 8;
/// The same for the 64 TiB resize, each of whose opens reads a 512 MiB BAT.
const MAX_VERIFIED_64T: usize = 3;
/// Distinct crash moments each resize must yield at least.
const MIN_DISTINCT: usize = 3;

/// One resize under test and what any crash point of it must still show.
struct Case {
    /// The image that is resized (its parent, if any, stays untouched).
    image: PathBuf,
    /// `--size` of the resize.
    new_size: &'static str,
    old_bytes: u64,
    new_bytes: u64,
    /// (offset, expected bytes) read back at every crash point.
    expect: Vec<(u64, Vec<u8>)>,
    /// Where the writable open writes 0x33 (PROBE bytes).
    write_at: u64,
    /// Distinct copies verified at most.
    verify_at_most: usize,
}

/// `PROBE` bytes: `half` bytes of `a`, then of `b`.
fn halves(a: u8, b: u8) -> Vec<u8> {
    let mut v = vec![a; (PROBE / 2) as usize];
    v.resize(PROBE as usize, b);
    v
}

fn cp_sparse(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        st.success(),
        "cp {} {} failed",
        from.display(),
        to.display()
    );
}

/// The process state letter in /proc/PID/stat, None when it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// Waits until the stopped signal has taken effect; false when the process has exited.
fn wait_stopped(pid: u32) -> bool {
    let start = Instant::now();
    loop {
        match proc_state(pid) {
            Some('T') | Some('t') => return true,
            None | Some('Z') | Some('X') => return false,
            _ => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "process {pid} did not stop"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with the pid of a child process that this test spawned and has not yet
    // reaped (the caller reaps it only after its last signal), so the pid cannot name another
    // process; no memory is passed.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Kills the resize if the test fails while it runs (it may be stopped); disarmed once the
/// resize has been waited for.
struct KillOnDrop {
    pid: u32,
    armed: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.armed {
            signal(self.pid, libc::SIGKILL);
        }
    }
}

/// The length and the first 8 MiB (headers, region tables, log, the start of the metadata and
/// of the BAT) of a file: a copy is taken only when this differs from the last copy's.
fn state_key(p: &Path) -> (u64, Vec<u8>) {
    let len = fs::metadata(p).unwrap().len();
    let mut head = Vec::new();
    fs::File::open(p)
        .unwrap()
        .take(HEAD)
        .read_to_end(&mut head)
        .unwrap();
    (len, head)
}

/// Runs the resize of `case` as a child process, freezing it now and then; at each freeze where
/// the image differs from the last copy it is copied. Returns the copies in the order taken.
///
/// The freezes are spread over the first third of the resize's (calibrated) run, and come every
/// millisecond after that: the last step, which commits the new size, takes only a few
/// milliseconds at the very end.
fn freeze_snapshots(dir: &Path, case: &Case, tag: &str) -> Vec<PathBuf> {
    // How long this resize takes here, on a copy.
    let calib = dir.join(format!("calib-{tag}.{}", ext(&case.image)));
    cp_sparse(&case.image, &calib);
    let t0 = Instant::now();
    ok(&["disk", "resize", s(&calib), "--size", case.new_size]);
    let run = t0.elapsed();
    fs::remove_file(&calib).unwrap();
    let coarse = (run / 20).clamp(Duration::from_millis(1), Duration::from_millis(250));
    let dense_after = run / 3;
    let fine = Duration::from_millis(1);
    eprintln!("{tag}: an unfrozen resize takes {run:?}; freezing every {coarse:?}, then {fine:?}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(["disk", "resize", s(&case.image), "--size", case.new_size])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vstor disk resize");
    let pid = child.id();
    let mut guard = KillOnDrop { pid, armed: true };
    let mut snaps = Vec::new();
    let mut last = state_key(&case.image);
    let mut freezes = 0;
    // The time the child was let run (it is stopped the rest of the time).
    let mut ran = Duration::ZERO;
    while snaps.len() < MAX_SNAPSHOTS {
        let pause = if ran < dense_after { coarse } else { fine };
        // The time actually slept: on a loaded machine a sleep overshoots, and counting the
        // asked-for pause instead left the dense phase unreached before the resize ended.
        let slept = Instant::now();
        std::thread::sleep(pause);
        ran += slept.elapsed();
        if child.try_wait().unwrap().is_some() {
            break;
        }
        signal(pid, libc::SIGSTOP);
        if !wait_stopped(pid) {
            break;
        }
        freezes += 1;
        let now = state_key(&case.image);
        if now != last {
            let snap = dir.join(format!(
                "snap-{tag}-{:02}.{}",
                snaps.len(),
                ext(&case.image)
            ));
            cp_sparse(&case.image, &snap);
            snaps.push(snap);
            last = now;
        }
        signal(pid, libc::SIGCONT);
    }
    let out = child.wait_with_output().unwrap();
    guard.armed = false;
    assert!(
        out.status.success(),
        "resize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{tag}: {freezes} freezes, {} distinct copies; {}",
        snaps.len(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    snaps
}

fn ext(p: &Path) -> String {
    p.extension().unwrap().to_str().unwrap().to_string()
}

/// The virtual size in bytes that `disk info` reports.
fn virtual_size(snap: &Path) -> u64 {
    let info = ok(&["disk", "info", s(snap)]);
    let line = info
        .lines()
        .find(|l| l.starts_with("virtual size:"))
        .unwrap_or_else(|| panic!("no virtual size in {info}"));
    let inner = &line[line.find('(').unwrap() + 1..line.find(" bytes)").unwrap()];
    inner.parse().unwrap()
}

fn read_probe(snap: &Path, offset: u64, out: &Path) -> Vec<u8> {
    ok(&[
        "disk",
        "read",
        s(snap),
        "--offset",
        &offset.to_string(),
        "--length",
        &PROBE.to_string(),
        "--output",
        s(out),
    ]);
    fs::read(out).unwrap()
}

/// Everything one crash point must still show; panics naming the snapshot otherwise.
fn verify(snap: &Path, case: &Case) -> u64 {
    let name = snap.file_name().unwrap().to_str().unwrap();
    let probe_out = snap.with_extension("probe");

    // Read-only: the open must succeed and replay any log in memory.
    let size = virtual_size(snap);
    assert!(
        size == case.old_bytes || size == case.new_bytes,
        "{name}: read-only open shows virtual size {size}, neither {} nor {}",
        case.old_bytes,
        case.new_bytes
    );
    for (off, want) in &case.expect {
        let got = read_probe(snap, *off, &probe_out);
        assert!(
            &got == want,
            "{name}: read-only read at {off} returned other bytes (first {:#04x}, middle {:#04x})",
            got[0],
            got[got.len() / 2]
        );
    }

    // Writable: a write opens it for writing (replaying a pending log for good).
    ok(&[
        "disk",
        "write",
        s(snap),
        "--offset",
        &case.write_at.to_string(),
        "--length",
        &PROBE.to_string(),
        "--pattern",
        "0x33",
    ]);
    let check = vstor(&["disk", "check", s(snap)]);
    assert!(
        check.status.success(),
        "{name}: disk check after a writable open is not clean:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(
        virtual_size(snap),
        size,
        "{name}: the writable open changed the virtual size that the read-only open showed"
    );
    for (off, want) in &case.expect {
        let got = read_probe(snap, *off, &probe_out);
        assert!(
            &got == want,
            "{name}: after the write, read at {off} returned other bytes (first {:#04x}, middle {:#04x})",
            got[0],
            got[got.len() / 2]
        );
    }
    assert_eq!(
        read_probe(snap, case.write_at, &probe_out),
        vec![0x33; PROBE as usize],
        "{name}: the write of 0x33 at {} does not read back",
        case.write_at
    );
    fs::remove_file(&probe_out).unwrap();
    size
}

/// Attempts at most per case: one freezing run can miss the short commit at the end of the
/// resize on a loaded machine, so the resize is run again from the original image until crash
/// points on both sides of the commit have been verified.
const MAX_ATTEMPTS: usize = 4;

/// Freezes the resize of `case`, then verifies the distinct crash points it left; runs it again
/// from a copy of the original image until both sides of the commit of the new size were seen.
fn run_case(dir: &Path, case: &Case, tag: &str) {
    let start = Instant::now();
    let pristine = dir.join(format!("pristine-{tag}.{}", ext(&case.image)));
    cp_sparse(&case.image, &pristine);
    let mut sizes = Vec::new();
    // Distinct crash moments verified over all attempts.
    let mut verified = 0;
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            fs::remove_file(&case.image).unwrap();
            cp_sparse(&pristine, &case.image);
        }
        let (n, seen) = attempt_case(dir, case, &format!("{tag}-{attempt}"));
        verified += n;
        for size in seen {
            if !sizes.contains(&size) {
                sizes.push(size);
            }
        }
        if verified >= MIN_DISTINCT
            && sizes.contains(&case.old_bytes)
            && sizes.contains(&case.new_bytes)
        {
            break;
        }
    }
    fs::remove_file(&pristine).unwrap();
    assert!(
        verified >= MIN_DISTINCT,
        "{tag}: only {verified} distinct crash moments caught; the freezes did not catch the resize"
    );
    // Crash points on both sides of the commit of the new size were looked at.
    assert!(
        sizes.contains(&case.old_bytes) && sizes.contains(&case.new_bytes),
        "{tag}: in {MAX_ATTEMPTS} attempts the crash points verified show only the virtual sizes \
         {sizes:?}; none before or none after the commit of the new size was caught"
    );
    eprintln!(
        "{tag}: verified {verified} crash points (virtual sizes seen: {sizes:?}) in {:?}",
        start.elapsed()
    );
}

/// One freezing run of the resize: verifies the distinct crash points it left and returns how
/// many were verified and the virtual sizes they showed.
fn attempt_case(dir: &Path, case: &Case, tag: &str) -> (usize, Vec<u64>) {
    let snaps = freeze_snapshots(dir, case, tag);

    // Each copy differs from the one before it (taken only then); count the file lengths too.
    let mut lengths = Vec::new();
    for snap in &snaps {
        let len = fs::metadata(snap).unwrap().len();
        if !lengths.contains(&len) {
            lengths.push(len);
        }
    }
    let distinct = snaps;
    eprintln!(
        "{tag}: {} distinct crash moments ({} distinct file lengths)",
        distinct.len(),
        lengths.len()
    );
    // At most `verify_at_most` of them, evenly spread, the first and the last included.
    let n = distinct.len();
    let most = case.verify_at_most;
    let picks: Vec<usize> = if n <= most {
        (0..n).collect()
    } else {
        let mut p: Vec<usize> = (0..most).map(|i| i * (n - 1) / (most - 1)).collect();
        p.dedup();
        p
    };
    let mut sizes = Vec::new();
    for &i in &picks {
        let size = verify(&distinct[i], case);
        if !sizes.contains(&size) {
            sizes.push(size);
        }
    }
    for snap in &distinct {
        fs::remove_file(snap).unwrap();
    }
    (picks.len(), sizes)
}

/// A dynamic 1 GiB VHDX with 1 MiB blocks, 20 MiB of 0x11 at its start.
fn make_base(dir: &Path) -> PathBuf {
    let base = dir.join("d.vhdx");
    ok(&[
        "disk",
        "create",
        s(&base),
        "--size",
        "1G",
        "--block-size",
        "1M",
    ]);
    ok(&[
        "disk",
        "write",
        s(&base),
        "--offset",
        "0",
        "--length",
        "20M",
        "--pattern",
        "0x11",
    ]);
    base
}

/// A dynamic disk grown to 2 TiB: the BAT grows from 1 to 16 MiB and the data blocks in its way
/// move.
#[test]
fn frozen_resize_of_a_dynamic_disk_leaves_openable_images() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path());
    let case = Case {
        image: base,
        new_size: "2T",
        old_bytes: GIB,
        new_bytes: 2 * TIB,
        expect: vec![
            (0, vec![0x11; PROBE as usize]),
            (20 * MIB - PROBE / 2, halves(0x11, 0)),
        ],
        write_at: 30 * MIB,
        verify_at_most: MAX_VERIFIED,
    };
    run_case(dir.path(), &case, "dynamic");
}

/// A differencing disk grown to 2 TiB over an untouched parent: its BAT (with sector bitmap
/// entries) grows over its data blocks, in several log entries.
#[test]
fn frozen_resize_of_a_differencing_disk_leaves_openable_images() {
    let dir = tempfile::tempdir().unwrap();
    make_base(dir.path());
    let child = dir.path().join("c.avhdx");
    ok(&[
        "disk",
        "create",
        s(&child),
        "--parent",
        s(&dir.path().join("d.vhdx")),
    ]);
    ok(&[
        "disk",
        "write",
        s(&child),
        "--offset",
        "100M",
        "--length",
        "4M",
        "--pattern",
        "0x22",
    ]);
    let case = Case {
        image: child,
        new_size: "2T",
        old_bytes: GIB,
        new_bytes: 2 * TIB,
        expect: vec![
            (20 * MIB - PROBE / 2, halves(0x11, 0)),
            (100 * MIB - PROBE / 2, halves(0, 0x22)),
            (104 * MIB - PROBE / 2, halves(0x22, 0)),
        ],
        write_at: 110 * MIB,
        verify_at_most: MAX_VERIFIED,
    };
    run_case(dir.path(), &case, "differencing");
}

/// The shell script's own case: a dynamic disk grown to 64 TiB, whose BAT grows to 512 MiB (the
/// size of the zero descriptor that an older resize logged and read-only opens refused, issue 21
/// item 8). Each open of a copy reads that BAT: minutes in a debug build, so run on demand.
#[test]
#[ignore = "64 TiB: each open reads a 512 MiB BAT (minutes in a debug build); run with --ignored"]
fn frozen_resize_of_a_dynamic_disk_to_64_tib_leaves_openable_images() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path());
    let case = Case {
        image: base,
        new_size: "64T",
        old_bytes: GIB,
        new_bytes: 64 * TIB,
        expect: vec![
            (0, vec![0x11; PROBE as usize]),
            (20 * MIB - PROBE / 2, halves(0x11, 0)),
        ],
        write_at: 30 * MIB,
        verify_at_most: MAX_VERIFIED_64T,
    };
    run_case(dir.path(), &case, "dynamic-64t");
}
