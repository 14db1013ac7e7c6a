//! `vstor serve`'s control API and metrics from the outside: the schema it publishes, errors
//! with kinds, statistics that count what a real client (qemu-io) did, a QoS cap set at run
//! time that the client then measures, and the Prometheus endpoint.

mod common;

use common::{ok, s};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Daemon {
    child: Child,
    nbd: PathBuf,
    control: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let nbd = dir.join("nbd.sock");
        let control = dir.join("control.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(["serve", "--nbd", &format!("unix:{}", s(&nbd))])
            .args(["--control", s(&control)])
            .args(extra)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vstor serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&control).is_err() {
            assert!(Instant::now() < deadline, "vstor serve did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            child,
            nbd,
            control,
        }
    }

    /// A graceful stop through the API; waits for the process to end.
    fn stop(mut self) {
        let v = self.rpc("server.shutdown", json!({}));
        assert!(v["result"].is_object(), "{v}");
        let st = self.child.wait().unwrap();
        assert!(st.success(), "vstor serve ended with {st}");
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", s(&self.nbd))
    }

    fn rpc(&self, method: &str, params: Value) -> Value {
        let mut c = UnixStream::connect(&self.control).unwrap();
        let req = json!({"jsonrpc": "2.0", "id": 9, "method": method, "params": params});
        writeln!(c, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (v["jsonrpc"].as_str(), v["id"].as_u64()),
            (Some("2.0"), Some(9))
        );
        v
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c
        .arg(uri)
        .output()
        .expect("qemu-io (Debian qemu-utils; ./scripts/test installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_api_publishes_its_schema_and_answers_errors_with_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhdx");
    ok(&["disk", "create", s(&img), "--size", "16M"]);
    let d = Daemon::start(dir.path(), &[]);
    let mode = std::fs::metadata(&d.control).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    // The schema names every method the daemon answers.
    let schema = &d.rpc("rpc.discover", json!({}))["result"];
    assert_eq!(schema["openrpc"], "1.2.6");
    let methods: Vec<&str> = schema["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(methods.contains(&"server.shutdown"), "{methods:?}");
    for m in methods.iter().filter(|m| **m != "server.shutdown") {
        let v = d.rpc(m, json!({}));
        assert_ne!(
            v.pointer("/error/code").and_then(Value::as_i64),
            Some(-32601),
            "{m} is in the schema but not served: {v}"
        );
    }
    for (method, params, kind) in [
        ("export.remove", json!({"name": "nope"}), "not-found"),
        ("export.add", json!({"name": "x"}), "invalid-input"),
        (
            "export.add",
            json!({"name": "bad name!", "target": s(&img)}),
            "invalid-input",
        ),
        (
            "export.add",
            json!({"name": "m", "target": "/does/not/exist.vhdx"}),
            "unavailable",
        ),
        ("no.such.method", json!({}), "not-found"),
    ] {
        let v = d.rpc(method, params.clone());
        assert_eq!(v["error"]["data"]["kind"], kind, "{method} {params}: {v}");
    }
    // Added at run time; a second writer on the same image is refused as in use.
    let v = d.rpc("export.add", json!({"name": "a", "target": s(&img)}));
    assert_eq!(v["result"]["name"], "a", "{v}");
    let v = d.rpc("export.add", json!({"name": "a2", "target": s(&img)}));
    assert_eq!(v["error"]["data"]["kind"], "in-use", "{v}");
    // The CLI maps the kinds onto its exit status: 75 for in use.
    let o = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(["export", "add", "a3", s(&img), "--server", s(&d.control)])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(["export", "remove", "nope", "--server", s(&d.control)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no export named 'nope'"),
        "{err}"
    );
    // Removing closes and unlocks: the CLI may write the image afterwards.
    let v = d.rpc("export.remove", json!({"name": "a"}));
    assert!(v["result"].is_object(), "{v}");
    ok(&[
        "disk",
        "write",
        s(&img),
        "--offset",
        "0",
        "--length",
        "4k",
        "--pattern",
        "0x11",
    ]);
}

#[test]
fn stats_count_a_real_clients_requests_and_a_cap_set_at_run_time_holds() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.raw");
    std::fs::write(&raw, vec![0u8; 8 << 20]).unwrap();
    let d = Daemon::start(dir.path(), &["--export", &format!("d0={}", s(&raw))]);
    qemu_io(
        &d.uri("d0"),
        &["write -P 0x22 0 64k", "read -P 0x22 0 64k", "flush"],
    );
    let st = &d.rpc("export.stats", json!({"name": "d0"}))["result"];
    assert!(st["writes"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["reads"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["bytes_written"].as_u64().unwrap() >= 65536, "{st}");
    assert!(st["flushes"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["errors"], 0, "{st}");
    // A cap of 50 normalized IOPS: 40 reads of 4 KiB (one unit each) after the first burst
    // take most of a second; without a cap they take milliseconds.
    let v = d.rpc("export.set-qos", json!({"name": "d0", "max_iops": 50}));
    assert_eq!(v["result"]["max_iops"], 50, "{v}");
    let t = Instant::now();
    let cmds: Vec<String> = (0..120).map(|i| format!("read {} 4k", i * 4096)).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&d.uri("d0"), &cmds);
    let capped = t.elapsed();
    assert!(
        capped >= Duration::from_millis(1200),
        "120 requests under a 50 IOPS cap took {capped:?}"
    );
    d.rpc("export.set-qos", json!({"name": "d0", "max_iops": 0}));
    let t = Instant::now();
    qemu_io(&d.uri("d0"), &cmds);
    assert!(t.elapsed() < capped, "lifting the cap did not speed it up");
}

#[test]
fn metrics_are_served_in_the_prometheus_text_format() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(
        dir.path(),
        &["--export", &format!("m0={}", s(&raw)), "--metrics", &addr],
    );
    qemu_io(&d.uri("m0"), &["write -P 1 0 4k"]);
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(
        body.contains("# TYPE vstor_export_writes_total counter"),
        "{body}"
    );
    let line = body
        .lines()
        .find(|l| l.starts_with("vstor_export_writes_total{export=\"m0\"}"))
        .unwrap_or_else(|| panic!("{body}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0, "{line}");
    assert!(
        body.contains("vstor_export_size_bytes{export=\"m0\"} 1048576"),
        "{body}"
    );
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.write_all(b"GET /other HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 404"), "{body}");
}

#[test]
fn vhost_user_blk_sockets_are_served_for_exports_and_bad_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let vsock = dir.path().join("vu.sock");
    let d = Daemon::start(
        dir.path(),
        &[
            "--export",
            &format!("v0={}", s(&raw)),
            "--vhost-user-blk",
            &format!("v0={},queues=2", s(&vsock)),
        ],
    );
    let info = &d.rpc("server.info", json!({}))["result"];
    assert_eq!(
        info["vhost_user_blk"][0],
        format!("v0={}", s(&vsock)),
        "{info}"
    );
    // A frontend can connect; the vhost-user protocol itself is tested in serve/tests.
    UnixStream::connect(&vsock).expect("the vhost-user-blk socket accepts a frontend");
    drop(d);
    for (arg, want) in [
        ("nope=/tmp/x.sock", "no --export named 'nope'"),
        ("v0=", "the socket path is empty"),
        ("v0=/tmp/x.sock,queues=0", "queues must be"),
        ("v0=/tmp/x.sock,speed=9", "unknown option"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(["serve", "--export", &format!("v0={}", s(&raw))])
            .args(["--vhost-user-blk", arg])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{arg}: {err}");
        assert!(err.contains(want), "{arg}: {err}");
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian qemu-utils; ./scripts/test installs it)")
}

#[test]
fn a_served_vhdx_is_checkpointed_merged_and_cloned_while_a_client_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("live.vhdx");
    ok(&["disk", "create", s(&img), "--size", "32M"]);
    let d = Daemon::start(dir.path(), &["--export", &format!("l0={}", s(&img))]);
    qemu_io(&d.uri("l0"), &["write -P 0x0a 0 1M", "flush"]);
    // Checkpoint: the image freezes, a child takes the writes.
    let child = dir.path().join("live-cp.avhdx");
    let v = d.rpc(
        "export.checkpoint",
        json!({"name": "l0", "child": s(&child)}),
    );
    assert_eq!(v["result"]["child"], s(&child), "{v}");
    qemu_io(
        &d.uri("l0"),
        &["write -P 0x0b 0 64k", "write -P 0x0c 4M 1M", "flush"],
    );
    // The frozen parent still holds what was there at the checkpoint (a reader may open it:
    // the daemon holds it read-only, shared).
    let parent = ok(&["disk", "read", s(&img), "--offset", "0", "--length", "16"]);
    assert!(parent.contains("0a0a 0a0a"), "{parent}");
    let cur = ok(&[
        "disk",
        "read",
        &format!("vhdx:{}", s(&img)),
        "--offset",
        "4M",
        "--length",
        "16",
    ]);
    assert!(
        cur.contains("0000 0000"),
        "the parent changed after the checkpoint: {cur}"
    );
    // Nobody else writes the frozen parent or the child that takes the writes.
    for f in [&img, &child] {
        let o = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args([
                "disk",
                "write",
                s(f),
                "--offset",
                "0",
                "--length",
                "4k",
                "-P",
                "1",
            ])
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(75),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // A second checkpoint stacks another child; merging twice brings both back.
    let v = d.rpc("export.checkpoint", json!({"name": "l0"}));
    let second = v["result"]["child"].as_str().unwrap().to_string();
    qemu_io(&d.uri("l0"), &["write -P 0x0d 8M 64k", "flush"]);
    let v = d.rpc("export.merge", json!({"name": "l0"}));
    assert_eq!(v["result"]["into"], s(&child), "{v}");
    assert!(
        !Path::new(&second).exists(),
        "the merged child was not removed"
    );
    let v = d.rpc("export.merge", json!({"name": "l0"}));
    assert_eq!(v["result"]["into"], s(&img), "{v}");
    assert!(!child.exists());
    let v = d.rpc("export.merge", json!({"name": "l0"}));
    assert_eq!(v["error"]["data"]["kind"], "invalid-input", "{v}");
    // A live clone while a client writes elsewhere: the clone equals the export at a moment
    // before the clone returned; with the writer stopped, equal to the export.
    let clone = dir.path().join("clone.vhdx");
    let v = d.rpc("export.clone", json!({"name": "l0", "dest": s(&clone)}));
    assert!(v["result"]["bytes"].as_u64().is_some(), "{v}");
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "raw",
        s(&clone),
        &d.uri("l0"),
    ]);
    assert!(
        cmp.status.success(),
        "{}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    // A clone onto an existing file is refused and the file left alone.
    let v = d.rpc("export.clone", json!({"name": "l0", "dest": s(&clone)}));
    assert!(v["error"].is_object(), "{v}");
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "raw",
        s(&clone),
        &d.uri("l0"),
    ]);
    assert!(
        cmp.status.success(),
        "the refused clone changed {}",
        s(&clone)
    );
    // After a graceful stop every write is in the one image left.
    d.stop();
    let all = ok(&["disk", "read", s(&img), "--offset", "4M", "--length", "16"]);
    assert!(all.contains("0c0c 0c0c"), "{all}");
    let all = ok(&["disk", "read", s(&img), "--offset", "8M", "--length", "16"]);
    assert!(all.contains("0d0d 0d0d"), "{all}");
    let report = ok(&["disk", "check", s(&img)]);
    assert!(report.contains("No errors were found"), "{report}");
}

/// Storage live migration through the daemon: `vstor export move` while a real client
/// (qemu-io over NBD, one connection throughout) writes: the client never notices, every
/// write is in the new file, the export's target is the new file, the old file is gone, and
/// a bad destination changes nothing.
#[test]
fn a_served_vhdx_moves_to_a_new_file_while_a_client_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.vhdx");
    let raw = dir.path().join("r.raw");
    ok(&["disk", "create", s(&img), "--size", "64M"]);
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let d = Daemon::start(
        dir.path(),
        &[
            "--export",
            &format!("m0={}", s(&img)),
            "--export",
            &format!("r0={}", s(&raw)),
        ],
    );
    qemu_io(&d.uri("m0"), &["write -P 0x01 0 16M", "flush"]);
    let mut want = vec![0u8; 64 << 20];
    want[..16 << 20].fill(1);
    // One client connection writing 1 MiB pieces while the move runs.
    let cmds: Vec<String> = (0..40u64)
        .map(|i| format!("write -P {} {}M 1M", 0x40 + i, 16 + i))
        .chain(["flush".to_string()])
        .collect();
    for i in 0..40usize {
        let at = (16 + i) << 20;
        want[at..at + (1 << 20)].fill(0x40 + i as u8);
    }
    let uri = d.uri("m0");
    let writer = std::thread::spawn(move || {
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&uri, &cmds)
    });
    let moved = dir.path().join("sub").join("m2.vhdx");
    // Bad destinations first: a missing directory, an existing file, a raw export.
    let e = common::vstor(&["export", "move", "m0", s(&moved), "--server", s(&d.control)]);
    assert!(!e.status.success());
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(&moved, b"mine").unwrap();
    let v = d.rpc("export.move", json!({"name": "m0", "dest": s(&moved)}));
    assert_eq!(v["error"]["data"]["kind"], "invalid-input", "{v}");
    assert_eq!(std::fs::read(&moved).unwrap(), b"mine");
    std::fs::remove_file(&moved).unwrap();
    let v = d.rpc(
        "export.move",
        json!({"name": "r0", "dest": s(&dir.path().join("r2.vhdx"))}),
    );
    assert_eq!(v["error"]["data"]["kind"], "unsupported", "{v}");
    let out = ok(&["export", "move", "m0", s(&moved), "--server", s(&d.control)]);
    assert!(out.contains("moved to") && out.contains("deleted"), "{out}");
    writer.join().unwrap();
    assert!(!img.exists(), "the old image was not deleted");
    let list = d.rpc("export.list", json!({}));
    let m0 = list["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "m0")
        .unwrap()
        .clone();
    assert_eq!(m0["target"], s(&moved), "{list}");
    let expect = dir.path().join("want.raw");
    std::fs::write(&expect, &want).unwrap();
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        s(&expect),
        &d.uri("m0"),
    ]);
    assert!(
        cmp.status.success(),
        "served after the move: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    d.stop();
    let cmp = qemu_img(&["compare", "-f", "raw", "-F", "vhdx", s(&expect), s(&moved)]);
    assert!(
        cmp.status.success(),
        "the moved file: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let report = ok(&["disk", "check", s(&moved)]);
    assert!(report.contains("No errors were found"), "{report}");
}

/// `kill -9` of the daemon at moments spread over an `export move`: afterwards exactly one
/// image is there under its name, the old one or the new one, never both (a stale old image
/// under the name the disk was served by would be served again by a restart), and it holds
/// every write flushed before the move.
#[test]
fn a_killed_move_leaves_the_old_image_or_the_new_one_never_both() {
    let mut seen = (0, 0);
    // The first run is not killed: it measures how long a move takes, and the kills are
    // spread over that time (and a little past it).
    let mut took = 0u64;
    for i in 0..8usize {
        let delay_ms = [0, 2, 10, 25, 45, 65, 85, 100][i] * took / 90;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("k.vhdx");
        ok(&["disk", "create", s(&img), "--size", "256M"]);
        ok(&[
            "disk",
            "write",
            s(&img),
            "--offset",
            "0",
            "--length",
            "96M",
            "-P",
            "0x5a",
        ]);
        let mut d = Daemon::start(dir.path(), &["--export", &format!("k={}", s(&img))]);
        qemu_io(&d.uri("k"), &["write -P 0x6b 200M 1M", "flush"]);
        let moved = dir.path().join("k2.vhdx");
        let mut mover = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(["export", "move", "k", s(&moved), "--server", s(&d.control)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if i == 0 {
            let t = Instant::now();
            assert!(mover.wait().unwrap().success());
            took = t.elapsed().as_millis() as u64;
        } else {
            std::thread::sleep(Duration::from_millis(delay_ms));
        }
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        let _ = mover.wait();
        let (old, new) = (img.exists(), moved.exists());
        assert!(old != new, "run {i} ({delay_ms} ms): old {old}, new {new}");
        let left = if old { &img } else { &moved };
        seen.0 += usize::from(old);
        seen.1 += usize::from(new);
        for (off, b) in [("0", "5a5a"), ("95M", "5a5a"), ("200M", "6b6b")] {
            let got = ok(&["disk", "read", s(left), "--offset", off, "--length", "16"]);
            assert!(
                got.contains(b),
                "run {i}: {} at {off}: {got}",
                left.display()
            );
        }
        // A killed writer leaves warnings (the log to replay), never errors.
        let o = common::vstor(&["disk", "check", s(left)]);
        let report =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(report.contains(" 0 errors"), "run {i}: {report}");
    }
    eprintln!(
        "a move took {took} ms; kills left the old image {} times, the new one {} times",
        seen.0, seen.1
    );
}
