//! End to end: the VMM runs its test guest on a raw file and on a dynamic VHDX; afterwards the
//! host reads what the guest wrote with `vstor disk read` and compares it with the pattern.
//!
//! These tests need a usable /dev/kvm. Where there is none they skip, printing why (nextest shows
//! their output: see .config/nextest.toml).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The pattern byte at disk offset `off` (the same formula as vmm/guest/src/workload.rs).
fn pattern_byte(off: u64) -> u8 {
    ((off >> 9) as u8).wrapping_mul(37) ^ (off as u8) ^ 0xa5
}

/// The regions the guest's pattern workload writes (vmm/guest/src/workload.rs `regions`).
fn regions(capacity: u64) -> [(u64, u64); 3] {
    [
        (0, 64 * 1024),
        ((capacity / 2) & !0xfff, 16 * 1024),
        (capacity - 8192, 8192),
    ]
}

const DISK_SIZE: u64 = 64 << 20;

/// Whether the tests can run here; prints why not.
fn kvm_or_skip(test: &str) -> bool {
    match vstor_vmm::kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            println!("SKIPPED {test}: /dev/kvm cannot run a VM here ({e})");
            false
        }
    }
}

fn vstor_bin() -> PathBuf {
    // Cargo builds the vstor binary beside vstor-vmm (the workspace's tests need it too).
    let vmm = Path::new(env!("CARGO_BIN_EXE_vstor-vmm"));
    let vstor = vmm.with_file_name("vstor");
    assert!(
        vstor.exists(),
        "{} is missing: build it first (cargo build -p vstor --bin vstor)",
        vstor.display()
    );
    vstor
}

/// Runs `vstor` and returns its stdout; panics with its stderr if it fails.
fn vstor(args: &[&str]) -> String {
    let o = Command::new(vstor_bin())
        .args(args)
        .output()
        .expect("run vstor");
    assert!(
        o.status.success(),
        "vstor {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs the VMM's test guest with a time limit; returns (exit code, stdout, stderr).
fn vmm(disk: &str, workload: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vstor-vmm"))
        .args(["--disk", disk, "--memory", "64M", "--test-guest", workload])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vstor-vmm");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait for vstor-vmm").is_none() {
        if Instant::now() > deadline {
            child.kill().expect("kill vstor-vmm");
            let o = child.wait_with_output().expect("collect output");
            panic!(
                "vstor-vmm --disk {disk} --test-guest {workload} hung; it printed:\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().expect("collect output");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    print!("--- {disk} {workload}:\n{out}{err}");
    (o.status.code().unwrap_or(-1), out, err)
}

fn assert_passes(disk: &str, workload: &str) {
    let (code, out, err) = vmm(disk, workload);
    assert_eq!(code, 0, "{workload} on {disk} failed:\n{out}{err}");
    assert!(out.contains("vstor-test-guest: PASS"), "{out}");
}

/// Reads `len` bytes at `off` of `target` with `vstor disk read`.
fn host_read(dir: &Path, target: &str, off: u64, len: u64) -> Vec<u8> {
    let out = dir.join("read.bin");
    let _ = std::fs::remove_file(&out);
    vstor(&[
        "disk",
        "read",
        target,
        "--offset",
        &off.to_string(),
        "--length",
        &len.to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    std::fs::read(&out).expect("read the output of vstor disk read")
}

/// Checks with `vstor disk read` that the guest's regions hold the pattern and that a region it
/// did not write is still zero.
fn check_from_host(dir: &Path, target: &str) {
    for (off, len) in regions(DISK_SIZE) {
        let got = host_read(dir, target, off, len);
        assert_eq!(got.len() as u64, len);
        for (i, &b) in got.iter().enumerate() {
            let at = off + i as u64;
            assert_eq!(b, pattern_byte(at), "{target}: byte at {at:#x}");
        }
    }
    let untouched = host_read(dir, target, 1 << 20, 4096);
    assert!(
        untouched.iter().all(|&b| b == 0),
        "{target}: the guest wrote outside its regions"
    );
}

/// The full round on one disk: pattern (write, flush, read back), the host's check, verify in a
/// second VM (the data persisted), malformed chains, and read-only.
fn round(dir: &Path, path: &Path) {
    let target = path.to_str().unwrap();
    assert_passes(target, "pattern");
    check_from_host(dir, target);
    assert_passes(target, "verify");
    assert_passes(target, "malformed");
    let ro = format!("{target},readonly=on");
    assert_passes(&ro, "readonly");
    // The guest's failure is the VMM's exit status: writing patterns to a read-only disk fails.
    let (code, out, _) = vmm(&ro, "pattern");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL"), "{out}");
    // The read-only runs changed nothing.
    check_from_host(dir, target);
}

#[test]
fn test_guest_on_a_raw_file() {
    if !kvm_or_skip("test_guest_on_a_raw_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    vstor(&[
        "disk",
        "create",
        path.to_str().unwrap(),
        "--size",
        &DISK_SIZE.to_string(),
    ]);
    round(dir.path(), &path);
}

#[test]
fn test_guest_on_a_dynamic_vhdx() {
    if !kvm_or_skip("test_guest_on_a_dynamic_vhdx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.vhdx");
    let created = vstor(&[
        "disk",
        "create",
        path.to_str().unwrap(),
        "--size",
        &DISK_SIZE.to_string(),
    ]);
    assert!(created.contains("dynamic"), "{created}");
    round(dir.path(), &path);
    let check = vstor(&["disk", "check", path.to_str().unwrap()]);
    println!("{check}");
}

#[test]
fn a_missing_disk_is_a_vmm_error() {
    // No KVM needed: disks are opened before the VM is created.
    let (code, _, err) = vmm("/nonexistent/disk.raw", "pattern");
    assert_eq!(code, 125);
    assert!(
        err.contains("vstor-vmm: error: disk /nonexistent/disk.raw"),
        "{err}"
    );
}
