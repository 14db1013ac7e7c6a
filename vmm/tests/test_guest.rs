//! End to end: the VMM runs its test guest on a raw file, a dynamic VHDX, a differencing VHDX and
//! a mirrored pool space; afterwards the host reads what the guest wrote with `vstor disk read`
//! and compares it with the pattern.
//!
//! These tests need a usable /dev/kvm. Where there is none they skip, printing why (nextest shows
//! their output: see .config/nextest.toml).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::vstor;

/// The pattern byte at disk offset `off` for `seed` (the same formula as
/// vmm/guest/src/workload.rs).
fn pattern_byte(off: u64, seed: u8) -> u8 {
    ((off >> 9) as u8).wrapping_mul(37) ^ (off as u8) ^ 0xa5 ^ seed
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

/// The area of the guest's `zeroes` workload, the ranges it zeroes in it and the range it
/// discards (vmm/guest/src/workload.rs `ZERO_AREA`, `ZEROED`, `DISCARDED`).
const ZERO_AREA: (u64, u64) = (4 << 20, 256 << 10);
const ZEROED: [(u64, u64); 3] = [
    (16 << 10, 8 << 10),
    (64 << 10, 32 << 10),
    (128 << 10, 64 << 10),
];
const DISCARDED: (u64, u64) = (224 << 10, 32 << 10);

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

/// Checks with `vstor disk read` that the guest's regions hold the pattern of `seed` and that a
/// region it did not write is still zero.
fn check_from_host(dir: &Path, target: &str, seed: u8) {
    for (off, len) in regions(DISK_SIZE) {
        let got = host_read(dir, target, off, len);
        assert_eq!(got.len() as u64, len);
        for (i, &b) in got.iter().enumerate() {
            let at = off + i as u64;
            assert_eq!(b, pattern_byte(at, seed), "{target}: byte at {at:#x}");
        }
    }
    let untouched = host_read(dir, target, 1 << 20, 4096);
    assert!(
        untouched.iter().all(|&b| b == 0),
        "{target}: the guest wrote outside its regions"
    );
}

/// Checks with `vstor disk read` what the `zeroes` workload left: zeroes in the zeroed ranges,
/// the pattern of `seed` in the rest of its area (but the discarded range).
fn check_zero_area(dir: &Path, target: &str, seed: u8) {
    let (base, _) = ZERO_AREA;
    let got = host_read(dir, target, base, DISCARDED.0);
    for (i, &b) in got.iter().enumerate() {
        let at = i as u64;
        let zeroed = ZEROED.iter().any(|&(o, l)| (o..o + l).contains(&at));
        let want = if zeroed {
            0
        } else {
            pattern_byte(base + at, seed)
        };
        assert_eq!(b, want, "{target}: byte at {:#x}", base + at);
    }
}

/// Writes the pattern of `seed` over the `zeroes` workload's area from the host.
fn host_write_pattern(dir: &Path, target: &str, seed: u8) {
    let (base, len) = ZERO_AREA;
    let data: Vec<u8> = (0..len).map(|i| pattern_byte(base + i, seed)).collect();
    let file = dir.join("pattern.bin");
    std::fs::write(&file, data).unwrap();
    vstor(&[
        "disk",
        "write",
        target,
        "--offset",
        &base.to_string(),
        "--input",
        file.to_str().unwrap(),
    ]);
}

/// The full round on one disk: pattern (write, flush, read back), the host's check, verify in a
/// second VM (the data persisted), malformed chains, and read-only.
fn round(dir: &Path, target: &str, seed: u8) {
    assert_passes(target, &format!("pattern {seed}"));
    check_from_host(dir, target, seed);
    assert_passes(target, &format!("verify {seed}"));
    // DISCARD and WRITE_ZEROES, the cache mode switch (CONFIG_WCE), EVENT_IDX.
    assert_passes(target, &format!("zeroes {seed}"));
    check_zero_area(dir, target, seed);
    assert_passes(target, &format!("wce {seed}"));
    assert_passes(target, "event-idx");
    assert_passes(target, "malformed");
    let ro = format!("{target},readonly=on");
    assert_passes(&ro, "readonly");
    // The guest's failure is the VMM's exit status: writing patterns to a read-only disk fails.
    let (code, out, _) = vmm(&ro, "pattern");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL"), "{out}");
    // The read-only runs changed nothing.
    check_from_host(dir, target, seed);
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
    round(dir.path(), path.to_str().unwrap(), 0);
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
    round(dir.path(), path.to_str().unwrap(), 0);
    let check = vstor(&["disk", "check", path.to_str().unwrap()]);
    println!("{check}");
}

#[test]
fn test_guest_on_a_differencing_vhdx() {
    if !kvm_or_skip("test_guest_on_a_differencing_vhdx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let base = base.to_str().unwrap();
    vstor(&["disk", "create", base, "--size", &DISK_SIZE.to_string()]);
    // The parent: the guest's pattern (seed 0), and 4 KiB of 0x3c written by the host at 3 MiB,
    // in a block the child will also write (a partial block of the child shows its parent).
    assert_passes(base, "pattern");
    check_from_host(dir.path(), base, 0);
    let host_off = 3u64 << 20;
    vstor(&[
        "disk",
        "write",
        base,
        "--offset",
        &host_off.to_string(),
        "--length",
        "4096",
        "--pattern",
        "0x3c",
    ]);
    // The area of the zeroes workload holds the pattern of seed 7 in the parent.
    host_write_pattern(dir.path(), base, 7);
    let child = dir.path().join("child.avhdx");
    let child = child.to_str().unwrap();
    vstor(&["disk", "create", child, "--parent", base]);
    let info = vstor(&["disk", "info", child]);
    assert!(info.contains("differencing"), "{info}");
    // Through the child the guest first sees its parent's data; write-zeroes in the child hides
    // the parent's data under it, and nothing else.
    assert_passes(child, "verify");
    assert_passes(child, "zeroes-over 7");
    check_zero_area(dir.path(), child, 7);
    let (zbase, zlen) = ZERO_AREA;
    let parent_area = host_read(dir.path(), base, zbase, zlen);
    assert!(parent_area
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern_byte(zbase + i as u64, 7)));
    // Then the guest writes its own data (seed 90).
    round(dir.path(), child, 90);
    // The parent is untouched; what the child did not write still comes from the parent.
    check_from_host(dir.path(), base, 0);
    assert!(host_read(dir.path(), child, host_off, 4096)
        .iter()
        .all(|&b| b == 0x3c));
    // A region the child never wrote but its parent did, at the edge of one the child did.
    let beside = host_read(dir.path(), child, 64 * 1024, 512);
    assert_eq!(beside, host_read(dir.path(), base, 64 * 1024, 512));
    let check = vstor(&["disk", "check", child]);
    println!("{check}");
}

/// Moves member `disk` of the pool in `pool` out of it (into `aside`), or back.
fn move_member(from: &Path, to: &Path, disk: &str) {
    std::fs::rename(from.join(disk), to.join(disk)).expect("move a member disk");
}

#[test]
fn test_guest_on_a_mirrored_pool_space() {
    if !kvm_or_skip("test_guest_on_a_mirrored_pool_space") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let aside = dir.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    let pool_dir = pool.to_str().unwrap();
    vstor(&[
        "pool",
        "create",
        pool_dir,
        "--disks",
        "2",
        "--disk-size",
        "128M",
        "--slab-size",
        "16M",
    ]);
    let space = vstor(&[
        "space",
        "create",
        pool_dir,
        "data",
        "--size",
        &DISK_SIZE.to_string(),
        "--resiliency",
        "mirror",
    ]);
    assert!(space.contains("2-way mirror"), "{space}");
    let target = format!("pool:{pool_dir}/data");
    round(dir.path(), &target, 0);
    // Both copies hold what the guest wrote: the host reads it with either member missing.
    for disk in ["disk0.raw", "disk1.raw"] {
        move_member(&pool, &aside, disk);
        check_from_host(dir.path(), &target, 0);
        move_member(&aside, &pool, disk);
    }
    // The guest is served by a degraded space too.
    move_member(&pool, &aside, "disk0.raw");
    assert_passes(&target, "verify");
}

/// The area queue `q` of the `mq` workload writes (vmm/guest/src/workload.rs `MQ_AREA`,
/// `MQ_STRIDE`): 64 KiB.
fn mq_region(q: u64) -> (u64, u64) {
    ((8 << 20) + q * (256 << 10), 64 << 10)
}

#[test]
fn multi_queue_guest_spreads_requests_over_every_queue() {
    if !kvm_or_skip("multi_queue_guest_spreads_requests_over_every_queue") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let path = path.to_str().unwrap();
    vstor(&["disk", "create", path, "--size", &DISK_SIZE.to_string()]);
    let (code, out, err) = vmm(&format!("{path},queues=4"), "mq 5");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("4 queue(s)"), "{out}");
    assert!(
        out.contains(
            "4 queues: 16 writes of 4 KiB in flight on each, all completed on their own queue"
        ),
        "{out}"
    );
    // What every queue wrote is on the disk.
    for q in 0..4 {
        let (off, len) = mq_region(q);
        let got = host_read(dir.path(), path, off, len);
        for (i, &b) in got.iter().enumerate() {
            let at = off + i as u64;
            assert_eq!(b, pattern_byte(at, 5), "queue {q}: byte at {at:#x}");
        }
    }
    // With one queue the device offers no MQ and the workload says so.
    let (code, out, _) = vmm(path, "mq");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("offers one queue"), "{out}");
}

/// The `key=value` fields of the guest's `bench-result:` line.
fn bench_result(out: &str) -> std::collections::HashMap<String, String> {
    let line = out
        .lines()
        .find(|l| l.starts_with("bench-result:"))
        .unwrap_or_else(|| panic!("no bench-result line in:\n{out}"));
    line["bench-result:".len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The milliseconds of the VMM's timing line for `what` on stderr.
fn timing_ms(err: &str, what: &str) -> f64 {
    let line = err
        .lines()
        .find(|l| l.contains("timing:") && l.contains(what))
        .unwrap_or_else(|| panic!("no timing line for {what:?} in:\n{err}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let ms = words
        .iter()
        .position(|&w| w == "ms")
        .expect("ms in the timing line");
    words[ms - 1].parse().expect("a number before ms")
}

#[test]
fn bench_workload_reports_iops_and_its_writes_land() {
    if !kvm_or_skip("bench_workload_reports_iops_and_its_writes_land") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let path = path.to_str().unwrap();
    let size: u64 = 16 << 20;
    vstor(&["disk", "create", path, "--size", &size.to_string()]);
    let count = 3000u64;
    let (code, out, err) = vmm(
        &format!("{path},queues=2"),
        &format!("bench write 16 4096 {count}"),
    );
    assert_eq!(code, 0, "{out}{err}");
    let r = bench_result(&out);
    let num = |k: &str| -> u64 { r[k].parse().unwrap_or_else(|_| panic!("{k} in {r:?}")) };
    assert_eq!(r["op"], "write");
    assert_eq!(
        (num("depth"), num("size"), num("queues"), num("count")),
        (16, 4096, 2, count)
    );
    assert!(num("us") > 0 && num("iops") > 0, "{r:?}");
    // IOPS is the count over the time.
    let implied = count * 1_000_000 / num("us");
    assert!(implied.abs_diff(num("iops")) <= 1, "{r:?}");
    // With 16 in flight the driver notifies far less than once per request.
    assert!(num("notifies") < count, "{r:?}");
    // The VMM timed the guest's start and its first I/O.
    let (entry, first_io) = (
        timing_ms(&err, "entered its code"),
        timing_ms(&err, "first I/O"),
    );
    assert!(0.0 < entry && entry <= first_io, "{err}");
    // The writes landed: every 4 KiB block holds zeroes, or its own tag and zeroes after it.
    let disk = host_read(dir.path(), path, 0, size);
    let mut tagged_blocks = 0;
    for (b, block) in disk.chunks(4096).enumerate() {
        let off = (b * 4096) as u64;
        if block.iter().all(|&x| x == 0) {
            continue;
        }
        assert_eq!(&block[..8], b"VSTORBNC", "block at {off:#x}");
        assert_eq!(block[8..16], off.to_le_bytes(), "block at {off:#x}");
        assert!(block[16..].iter().all(|&x| x == 0), "block at {off:#x}");
        tagged_blocks += 1;
    }
    // 3000 uniformly random writes over 4096 blocks reach about 2170 of them.
    println!("{tagged_blocks} blocks written");
    assert!((1500..=3000).contains(&tagged_blocks), "{tagged_blocks}");
    // The reads of the same offsets find the tags (the guest checks every sector it reads).
    let (code, out, err) = vmm(path, &format!("bench read 16 4096 {count}"));
    assert_eq!(code, 0, "{out}{err}");
    let r = bench_result(&out);
    assert_eq!((r["op"].as_str(), r["mismatches"].as_str()), ("read", "0"));
    // Nonsense parameters are the guest's failure, not a hang.
    let (code, out, _) = vmm(path, "bench read 0 4096 10");
    assert_eq!(code, 1, "{out}");
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
