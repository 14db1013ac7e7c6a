//! The VMM's API socket, end to end: a host thread resizes a dynamic VHDX, or a pool's space,
//! through `--api-socket` while the test guest waits for the capacity change; the guest sees the
//! configuration-change interrupt and the new capacity and writes the new area, which the host
//! then reads with `vstor disk read`. Statistics, pause and resume go through the same socket.
//!
//! These tests need a usable /dev/kvm. Where there is none they skip, printing why.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::vstor;

/// The pattern byte at disk offset `off` for `seed` (vmm/guest/src/workload.rs).
fn pattern_byte(off: u64, seed: u8) -> u8 {
    ((off >> 9) as u8).wrapping_mul(37) ^ (off as u8) ^ 0xa5 ^ seed
}

fn kvm_or_skip(test: &str) -> bool {
    match vstor_vmm::kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            println!("SKIPPED {test}: /dev/kvm cannot run a VM here ({e})");
            false
        }
    }
}

/// A running VMM whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: String,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor-vmm"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vstor-vmm");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running {
            child,
            lines,
            seen: String::new(),
        }
    }

    /// Waits for a stdout line containing `what`.
    fn wait_for(&mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push_str(&line);
                self.seen.push('\n');
                if line.contains(what) {
                    return;
                }
            }
        }
        let _ = self.child.kill();
        panic!("the VMM never printed {what:?}; it printed:\n{}", self.seen);
    }

    /// Waits for the VMM to exit; returns its exit code and all of its stdout.
    fn finish(mut self) -> (i32, String) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for vstor-vmm") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                }
                print!("{}", self.seen);
                return (status.code().unwrap_or(-1), self.seen);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the VMM hung; it printed:\n{}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An API connection.
struct Api {
    out: UnixStream,
    answers: BufReader<UnixStream>,
}

impl Api {
    fn connect(path: &Path) -> Api {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    return Api {
                        out: s.try_clone().unwrap(),
                        answers: BufReader::new(s),
                    }
                }
                Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Calls a JSON-RPC method; returns its result with `"ok": true` added, or
    /// `{"ok": false, "error": MESSAGE, "kind": KIND}`.
    fn call(&mut self, method: &str, params: &str) -> Value {
        let request =
            format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{params}}}"#);
        writeln!(self.out, "{request}").unwrap();
        let mut line = String::new();
        self.answers.read_line(&mut line).unwrap();
        println!("api: {request} -> {}", line.trim_end());
        let a: Value = serde_json::from_str(&line).expect("the answer is JSON");
        assert_eq!(a["jsonrpc"], "2.0", "{a}");
        match a.get("result") {
            Some(Value::Object(m)) => {
                let mut m = m.clone();
                m.insert("ok".into(), Value::Bool(true));
                Value::Object(m)
            }
            _ => serde_json::json!({
                "ok": false,
                "error": a["error"]["message"],
                "kind": a["error"]["data"]["kind"],
            }),
        }
    }
}

const OLD_SIZE: u64 = 64 << 20;
const NEW_SIZE: u64 = 96 << 20;

/// The test guest's pattern workload on a raw disk in `dir` capped at 1 IOPS, with the API
/// socket connected once the guest has found its disk.
fn capped_pattern_guest(dir: &Path) -> (Running, Api) {
    let disk = raw_disk(dir);
    let sock = dir.join("api.sock");
    let mut vm = Running::start(&[
        "--disk",
        &format!("{disk},max-iops=1"),
        "--memory",
        "64M",
        "--api-socket",
        sock.to_str().unwrap(),
        "--test-guest",
        "pattern",
    ]);
    vm.wait_for("virtio-blk:");
    let api = Api::connect(&sock);
    (vm, api)
}

#[test]
fn a_resize_through_the_api_is_seen_by_the_guest() {
    if !kvm_or_skip("a_resize_through_the_api_is_seen_by_the_guest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.vhdx");
    let disk_s = disk.to_str().unwrap();
    vstor(&["disk", "create", disk_s, "--size", &OLD_SIZE.to_string()]);
    resize_while_the_guest_waits(dir.path(), disk_s);
}

#[test]
fn a_pool_space_grows_through_the_api_and_the_guest_sees_it() {
    if !kvm_or_skip("a_pool_space_grows_through_the_api_and_the_guest_sees_it") {
        return;
    }
    // A thin 2-way mirror: the new bytes take slabs as the guest writes them.
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let pool_s = pool.to_str().unwrap();
    vstor(&[
        "pool",
        "create",
        pool_s,
        "--disks",
        "2",
        "--disk-size",
        "128M",
        "--slab-size",
        "4M",
    ]);
    vstor(&[
        "space",
        "create",
        pool_s,
        "data",
        "--size",
        &OLD_SIZE.to_string(),
        "--resiliency",
        "mirror",
    ]);
    let target = format!("pool:{pool_s}/data");
    resize_while_the_guest_waits(dir.path(), &target);
    let info = vstor(&["space", "info", pool_s, "data", "--json"]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["size"], NEW_SIZE, "{info}");
}

/// Starts the test guest on `disk` (OLD_SIZE bytes), resizes the disk to NEW_SIZE through
/// the API while the guest waits for the change, and checks what the guest saw and wrote.
fn resize_while_the_guest_waits(dir: &Path, disk_s: &str) {
    let sock = dir.join("api.sock");
    let mut vm = Running::start(&[
        "--disk",
        disk_s,
        "--memory",
        "64M",
        "--api-socket",
        sock.to_str().unwrap(),
        "--test-guest",
        "capacity 7",
    ]);
    vm.wait_for("waiting for a capacity change");
    let mut api = Api::connect(&sock);
    // Errors are answers, not a dead VMM.
    let bad = api.call("disk.resize", r#"{"disk":4,"size":1}"#);
    assert_eq!(bad["ok"], false, "{bad}");
    assert_eq!(bad["kind"], "not-found", "{bad}");
    let stats = api.call("vm.stats", "{}");
    assert_eq!(stats["ok"], true, "{stats}");
    assert_eq!(stats["disks"][0]["capacity"], OLD_SIZE, "{stats}");
    // Pause: the vCPU stops while the guest polls; resume lets it go on.
    let paused = api.call("vm.pause", "{}");
    assert_eq!(paused["ok"], true, "{paused}");
    assert_eq!(api.call("vm.stats", "{}")["paused"], true);
    assert_eq!(api.call("vm.resume", "{}")["ok"], true);
    let resized = api.call("disk.resize", &format!(r#"{{"disk":0,"size":{NEW_SIZE}}}"#));
    assert_eq!(resized["ok"], true, "{resized}");
    let (code, out) = vm.finish();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "capacity changed: {} -> {} sectors (configuration interrupt: yes",
            OLD_SIZE / 512,
            NEW_SIZE / 512
        )),
        "{out}"
    );
    assert!(out.contains("vstor-test-guest: PASS"), "{out}");
    // The host sees the new size and what the guest wrote past the old end.
    let info = vstor(&["disk", "info", disk_s]);
    println!("{info}");
    for (off, len) in [(OLD_SIZE, 64 << 10), (NEW_SIZE - 8192, 8192)] {
        let o = dir.join("read.bin");
        let _ = std::fs::remove_file(&o);
        vstor(&[
            "disk",
            "read",
            disk_s,
            "--offset",
            &off.to_string(),
            "--length",
            &len.to_string(),
            "--output",
            o.to_str().unwrap(),
        ]);
        let got = std::fs::read(&o).unwrap();
        assert_eq!(got.len() as u64, len);
        for (i, &b) in got.iter().enumerate() {
            let at = off + i as u64;
            assert_eq!(b, pattern_byte(at, 7), "byte at {at:#x}");
        }
    }
}

/// Storage units the `pattern` workload costs (8 KiB units: writes and reads of 64 KiB, 16 KiB
/// and 8 KiB; flushes and GET_ID cost nothing, the read past the end never reaches the disk).
const PATTERN_UNITS: u64 = 2 * (8 + 2 + 1);

fn raw_disk(dir: &Path) -> String {
    let disk = dir.join("disk.raw");
    let s = disk.to_str().unwrap().to_string();
    vstor(&["disk", "create", &s, "--size", &(64u64 << 20).to_string()]);
    s
}

#[test]
fn a_capped_disk_takes_the_time_its_cap_implies() {
    if !kvm_or_skip("a_capped_disk_takes_the_time_its_cap_implies") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    let max_iops = 10;
    let started = Instant::now();
    let vm = Running::start(&[
        "--disk",
        &format!("{disk},max-iops={max_iops}"),
        "--memory",
        "64M",
        "--test-guest",
        "pattern",
    ]);
    let (code, out) = vm.finish();
    let took = started.elapsed();
    assert_eq!(code, 0, "{out}");
    // The first unit may go at once (the burst allowance); the rest at the cap.
    let floor = Duration::from_secs_f64((PATTERN_UNITS - 1) as f64 / max_iops as f64);
    println!("pattern at max-iops={max_iops}: {took:?} (the cap implies at least {floor:?})");
    assert!(took >= floor, "{took:?} < {floor:?}");
}

#[test]
fn set_qos_through_the_api_lifts_a_cap_at_run_time() {
    if !kvm_or_skip("set_qos_through_the_api_lifts_a_cap_at_run_time") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // At 1 IOPS the pattern would take PATTERN_UNITS seconds.
    let started = Instant::now();
    let (vm, mut api) = capped_pattern_guest(dir.path());
    std::thread::sleep(Duration::from_millis(1500));
    let before = api.call("vm.stats", "{}");
    let qos = &before["disks"][0]["qos"];
    assert_eq!(qos["max_iops"], 1, "{before}");
    assert!(
        qos["units"].as_u64().unwrap() < PATTERN_UNITS,
        "the cap held the guest back: {before}"
    );
    let set = api.call("disk.set-qos", r#"{"disk":0,"max_iops":100000}"#);
    assert_eq!(set["ok"], true, "{set}");
    assert_eq!(
        api.call("vm.stats", "{}")["disks"][0]["qos"]["max_iops"],
        100000
    );
    let (code, out) = vm.finish();
    let took = started.elapsed();
    assert_eq!(code, 0, "{out}");
    println!("pattern, cap lifted after 1.5 s: {took:?}");
    // Capped all along it takes PATTERN_UNITS (22) seconds. The request queued before the lift
    // keeps the slot it was given (up to 8 s at 1 IOPS), and the guest takes a few seconds under
    // a software hypervisor: about 10.5 s in all here, so the bound sits between the two.
    assert!(
        took < Duration::from_secs(PATTERN_UNITS * 3 / 4),
        "the lifted cap still held: {took:?}"
    );
}

#[test]
fn pause_stops_every_vcpu_and_resume_lets_them_go_on() {
    if !kvm_or_skip("pause_stops_every_vcpu_and_resume_lets_them_go_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.vhdx");
    let sock = dir.path().join("api.sock");
    let disk_s = disk.to_str().unwrap();
    vstor(&["disk", "create", disk_s, "--size", &OLD_SIZE.to_string()]);
    let vcpus = 3;
    let mut vm = Running::start(&[
        "--disk",
        disk_s,
        "--memory",
        "64M",
        "--vcpus",
        &vcpus.to_string(),
        "--api-socket",
        sock.to_str().unwrap(),
        "--test-guest",
        "capacity 3",
    ]);
    vm.wait_for("waiting for a capacity change");
    let mut api = Api::connect(&sock);
    // Every vCPU has a thread in KVM_RUN: the test guest polls on the first, the others wait to
    // be started. (The other threads register right after they start: give them a moment.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stats = api.call("vm.stats", "{}");
    while stats["vcpus"] != vcpus && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        stats = api.call("vm.stats", "{}");
    }
    assert_eq!(stats["vcpus"], vcpus, "{stats}");
    assert_eq!(stats["paused"], false, "{stats}");
    for _ in 0..3 {
        assert_eq!(api.call("vm.pause", "{}")["ok"], true);
        let paused = api.call("vm.stats", "{}");
        assert_eq!(paused["paused"], true, "{paused}");
        assert_eq!(paused["paused_vcpus"], vcpus, "{paused}");
        assert_eq!(api.call("vm.resume", "{}")["ok"], true);
    }
    let resized = api.call("disk.resize", &format!(r#"{{"disk":0,"size":{NEW_SIZE}}}"#));
    assert_eq!(resized["ok"], true, "{resized}");
    let (code, out) = vm.finish();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("vstor-test-guest: PASS"), "{out}");
}

#[test]
fn a_disk_held_by_its_cap_does_not_hold_the_vcpu() {
    if !kvm_or_skip("a_disk_held_by_its_cap_does_not_hold_the_vcpu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // At 1 IOPS the first 64 KiB write (8 units) holds its queue for about 7 seconds.
    let (vm, mut api) = capped_pattern_guest(dir.path());
    // Until the queue has served its first request (the guest under a software hypervisor can
    // take a second or more to issue it), then a moment for the cap to hold it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.call("vm.stats", "{}")["disks"][0]["serves"] == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    // The vCPU is not inside the request (the queue's I/O thread is), so it stops at once.
    let asked = Instant::now();
    assert_eq!(api.call("vm.pause", "{}")["ok"], true);
    let took = asked.elapsed();
    println!("pause while the disk is held by its cap: {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let stats = api.call("vm.stats", "{}");
    assert_eq!(stats["paused"], true, "{stats}");
    assert!(stats["vcpu_exits"].as_u64().unwrap() > 0, "{stats}");
    let d = &stats["disks"][0];
    assert!(d["serves"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(d["queue_requests"].as_array().unwrap().len(), 1, "{stats}");
    assert_eq!(api.call("vm.resume", "{}")["ok"], true);
    let set = api.call("disk.set-qos", r#"{"disk":0,"max_iops":100000}"#);
    assert_eq!(set["ok"], true, "{set}");
    let (code, out) = vm.finish();
    assert_eq!(code, 0, "{out}");
}

#[test]
fn the_vmm_ends_cleanly_with_requests_in_flight() {
    if !kvm_or_skip("the_vmm_ends_cleanly_with_requests_in_flight") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path());
    // 32 writes of 4 KiB on two queues at 1 IOPS: the cap alone would take half a minute; the
    // guest leaves 300 ms after it submitted them.
    let started = Instant::now();
    let vm = Running::start(&[
        "--disk",
        &format!("{disk},max-iops=1,queues=2"),
        "--memory",
        "64M",
        "--test-guest",
        "inflight",
    ]);
    let (code, out) = vm.finish();
    let took = started.elapsed();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("completed after 300 ms; leaving"), "{out}");
    println!("guest left with requests in flight; the VMM ended after {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
}
