//! `vstor serve`'s NBD server against real clients that nobody here wrote (issue 16, "Real
//! clients" 1 and 2): qemu-img, qemu-io, nbdinfo and nbdcopy over `nbd+unix://` and
//! `nbd://127.0.0.1:PORT`.
//!
//! Every test runs its own daemon on its own temp dir (`vstor serve --control C.sock --nbd
//! unix:N.sock [--nbd tcp:127.0.0.1:0] --export ...`), waits for "ready" on its stderr, and
//! stops it with `vstor server shutdown` (or SIGTERM), which must end it cleanly ("every export
//! flushed and closed"). What the clients did is then checked on the image itself, opened
//! directly by `vstor disk read/info/check` and by qemu-img's own VHDX driver.
//!
//! The clients are installed by ./scripts/test (packages qemu-utils and libnbd-bin); a missing
//! one fails the test, it never passes silently.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::{fails, ok, s};

const MIB: u64 = 1 << 20;

/// The package that provides each external client (for the message when it is missing).
fn package(tool: &str) -> &'static str {
    match tool {
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        _ => "qemu-utils",
    }
}

/// Runs an external client and returns its output, whatever its exit status.
fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{name} cannot run ({e}): it is installed by ./scripts/test (package {})",
                package(name)
            )
        })
}

/// Runs an external client that must succeed; returns its stdout.
fn tool_ok(name: &str, args: &[&str]) -> String {
    let o = tool(name, args);
    assert!(
        o.status.success(),
        "{name} {args:?} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

/// Runs an external client that must fail; returns its stdout and stderr together.
fn tool_fails(name: &str, args: &[&str]) -> String {
    let o = tool(name, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "{name} {args:?} succeeded: {text}");
    text
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A running `vstor serve`. Dropping it kills it (a test that failed half-way leaves nothing).
struct Daemon {
    child: Child,
    control: PathBuf,
    nbd: PathBuf,
    /// What the daemon printed on stderr so far (a thread keeps reading it).
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Starts `vstor serve` in `dir` with a Unix listener (and a TCP one on a free loopback
    /// port when `tcp`), the control socket and these `--export` arguments; returns once it
    /// says it is ready.
    fn start(dir: &Path, tcp: bool, exports: &[&str]) -> Daemon {
        let control = dir.join("c.sock");
        let nbd = dir.join("n.sock");
        let mut args = vec![
            "serve".to_string(),
            "--control".into(),
            s(&control).into(),
            "--nbd".into(),
            format!("unix:{}", s(&nbd)),
        ];
        if tcp {
            args.extend(["--nbd".into(), "tcp:127.0.0.1:0".into()]);
        }
        for e in exports {
            args.extend(["--export".into(), e.to_string()]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vstor serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        let reader = std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let is_ready = line.starts_with("vstor serve: ready in ");
                {
                    let mut l = log2.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                if is_ready {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let mut d = Daemon {
            child,
            control,
            nbd,
            log,
            reader: Some(reader),
        };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = d.child.kill();
            let _ = d.child.wait();
            if let Some(r) = d.reader.take() {
                let _ = r.join();
            }
            panic!("vstor {args:?} did not get ready: {}", d.log());
        }
        d
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn ctl(&self) -> &str {
        s(&self.control)
    }

    /// The export's URI on the Unix listener.
    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", s(&self.nbd))
    }

    /// `vstor server info`'s JSON.
    fn info(&self) -> Value {
        json(&ok(&["server", "info", "--server", self.ctl()]))
    }

    /// The export's URI on the TCP listener: the port the daemon bound for `tcp:127.0.0.1:0`,
    /// as `vstor server info` reports it.
    fn tcp_uri(&self, export: &str) -> String {
        let info = self.info();
        let listeners = info["nbd"]
            .as_array()
            .expect("server info lists its NBD listeners");
        let tcp: Vec<&str> = listeners
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|l| l.strip_prefix("tcp:"))
            .collect();
        assert_eq!(tcp.len(), 1, "one TCP listener: {info}");
        let port: u16 = tcp[0]
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {}", tcp[0]));
        assert_ne!(port, 0, "server info reports the bound port, not 0: {info}");
        assert!(tcp[0].starts_with("127.0.0.1:"), "{info}");
        format!("nbd://127.0.0.1:{port}/{export}")
    }

    /// `vstor export stats NAME --json`.
    fn stats(&self, export: &str) -> Value {
        json(&ok(&[
            "export",
            "stats",
            export,
            "--server",
            self.ctl(),
            "--json",
        ]))
    }

    /// `vstor export list --json`.
    fn list(&self) -> Vec<Value> {
        json(&ok(&["export", "list", "--server", self.ctl(), "--json"]))
            .as_array()
            .expect("export list is an array")
            .clone()
    }

    /// Waits (at most 20 s) for the daemon to exit; asserts it exited 0 and said that every
    /// export was flushed and closed. Returns its whole stderr.
    fn wait_clean(mut self) -> String {
        let t = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "vstor serve did not stop: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        let log = self.log();
        assert!(status.success(), "vstor serve exited {status}: {log}");
        assert!(
            log.contains("vstor serve: stopped; every export flushed and closed"),
            "{log}"
        );
        log
    }

    /// `vstor server shutdown`, then [`Daemon::wait_clean`].
    fn shutdown(self) -> String {
        let out = ok(&["server", "shutdown", "--server", self.ctl()]);
        assert_eq!(out.trim(), "shutting down");
        self.wait_clean()
    }

    /// SIGTERM, then [`Daemon::wait_clean`].
    fn terminate(self) -> String {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(st.success());
        let log = self.wait_clean();
        assert!(log.contains("SIGTERM"), "{log}");
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Creates a dynamic VHDX of `size` bytes with 1 MiB blocks.
fn vhdx(path: &Path, size: u64) {
    ok(&[
        "disk",
        "create",
        s(path),
        "--size",
        &size.to_string(),
        "--block-size",
        "1M",
    ]);
}

/// `vstor disk write TARGET --offset OFF --length LEN -P BYTE`.
fn write_pattern(target: &str, off: u64, len: u64, byte: u8) {
    ok(&[
        "disk",
        "write",
        target,
        "--offset",
        &off.to_string(),
        "--length",
        &len.to_string(),
        "-P",
        &byte.to_string(),
    ]);
}

/// `len` bytes of a target at `off`, read by `vstor disk read --output`.
fn read_target(dir: &Path, target: &str, off: u64, len: u64) -> Vec<u8> {
    let out = dir.join("read.out");
    ok(&[
        "disk",
        "read",
        target,
        "--offset",
        &off.to_string(),
        "--length",
        &len.to_string(),
        "--output",
        s(&out),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(bytes.len() as u64, len);
    bytes
}

/// Panics unless every byte of `bytes` is `byte` (naming the first that is not). Compared
/// as slices (memcmp): a byte loop is slow in the unoptimized test build.
fn assert_all(bytes: &[u8], byte: u8, what: &str) {
    assert_same(bytes, &vec![byte; bytes.len()], what);
}

/// Panics unless `got == want`, naming the first byte that differs.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!("{what}: byte {i} is {:#04x}, not {:#04x}", got[i], want[i]);
    }
}

/// `vstor disk info --json`.
fn disk_info(target: &str) -> Value {
    json(&ok(&["disk", "info", target, "--json"]))
}

/// `vstor disk check` must be clean.
fn check_clean(path: &Path) {
    let out = ok(&["disk", "check", s(path)]);
    assert!(out.contains("0 errors, 0 warnings"), "{out}");
}

/// Deterministic, incompressible bytes (xorshift, 8 bytes a step).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One extent of a map: start, length, and a label (qemu-img: "data"/"zero"/"absent";
/// nbdinfo: its description).
type Extent = (u64, u64, String);

/// Merges adjacent extents with the same label (clients may split where the server did not).
fn merged(v: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in v {
        if let Some(last) = out.last_mut() {
            if last.2 == e.2 && last.0 + last.1 == e.0 {
                last.1 += e.1;
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// `qemu-img map --output=json` of an image given as `args` (a URI, or --image-opts and
/// its options), each extent labelled by its (present, data, zero) flags.
fn qemu_map(args: &[&str]) -> Vec<Extent> {
    let mut a = vec!["map", "--output=json"];
    a.extend_from_slice(args);
    let v = json(&tool_ok("qemu-img", &a));
    merged(
        v.as_array()
            .expect("qemu-img map gives an array")
            .iter()
            .map(|e| {
                let f = |k: &str| e[k].as_bool().unwrap_or_else(|| panic!("{k} in {e}"));
                let label = match (f("present"), f("data"), f("zero")) {
                    (false, false, false) => "absent",
                    (true, true, false) => "data",
                    (_, false, true) => "zero",
                    (true, true, true) => "data+zero",
                    other => panic!("unexpected flags {other:?} in {e}"),
                };
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    label.to_string(),
                )
            })
            .collect(),
    )
}

/// `nbdinfo --map[=CONTEXT] URI`: its lines "offset length type description".
fn nbdinfo_map(context: Option<&str>, uri: &str) -> Vec<Extent> {
    let flag = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = tool_ok("nbdinfo", &[&flag, uri]);
    merged(
        out.lines()
            .map(|l| {
                let mut w = l.split_whitespace();
                let off = w.next().and_then(|x| x.parse().ok());
                let len = w.next().and_then(|x| x.parse().ok());
                let _type: Option<u32> = w.next().and_then(|x| x.parse().ok());
                let desc = w.collect::<Vec<_>>().join(" ");
                match (off, len, _type) {
                    (Some(o), Some(n), Some(_)) => (o, n, desc),
                    _ => panic!("not a map line: {l:?} in {out}"),
                }
            })
            .collect(),
    )
}

fn ext(start: u64, len: u64, label: &str) -> Extent {
    (start, len, label.to_string())
}

/// The size in bytes of the extents with this label.
fn bytes_labelled(map: &[Extent], label: &str) -> u64 {
    map.iter().filter(|e| e.2 == label).map(|e| e.1).sum()
}

// ---------------------------------------------------------------------------------------------

/// `qemu-img info` over the Unix socket and over TCP (the port the daemon bound for port 0,
/// read from `vstor server info`): the export's size, as a raw image.
#[test]
fn qemu_img_info_over_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    vhdx(&disk, 48 * MIB);
    let d = Daemon::start(dir.path(), true, &[&format!("d0={}", s(&disk))]);
    let info = d.info();
    assert_eq!(info["api_version"], "1.0.0", "{info}");
    for uri in [d.uri("d0"), d.tcp_uri("d0")] {
        let v = json(&tool_ok("qemu-img", &["info", "--output=json", &uri]));
        assert_eq!(v["virtual-size"], 48 * MIB, "{uri}: {v}");
        assert_eq!(v["format"], "raw", "{uri}: {v}");
        assert_eq!(v["filename"], uri.as_str(), "{v}");
    }
    // Both listeners serve the same export: a write over TCP reads back over the socket.
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 1M 4k", &d.tcp_uri("d0")],
    );
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x3c 1M 4k", &d.uri("d0")],
    );
    d.shutdown();
    check_clean(&disk);
}

/// `qemu-img map` over NBD (base:allocation) is the dynamic VHDX's real allocation: the
/// blocks `vstor disk write` allocated are data, everything else a hole that reads as zeroes;
/// and the data it maps is what `vstor disk info` counts as allocated.
#[test]
fn qemu_img_map_matches_dynamic_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    let t = s(&disk);
    vhdx(&disk, 64 * MIB);
    // 64 KiB into block 1, blocks 5 and 6 whole, 512 bytes in block 40.
    write_pattern(t, MIB, 64 * 1024, 0xab);
    write_pattern(t, 5 * MIB, 2 * MIB, 0x11);
    write_pattern(t, 40 * MIB + 4096, 512, 0x22);
    let info = disk_info(t);
    assert_eq!(info["allocated_blocks"], 4, "{info}");
    let d = Daemon::start(dir.path(), false, &[&format!("d0={t}")]);
    let uri = d.uri("d0");
    let map = qemu_map(&[&uri]);
    assert_eq!(
        map,
        vec![
            ext(0, MIB, "zero"),
            ext(MIB, MIB, "data"),
            ext(2 * MIB, 3 * MIB, "zero"),
            ext(5 * MIB, 2 * MIB, "data"),
            ext(7 * MIB, 33 * MIB, "zero"),
            ext(40 * MIB, MIB, "data"),
            ext(41 * MIB, 23 * MIB, "zero"),
        ]
    );
    assert_eq!(
        bytes_labelled(&map, "data"),
        info["allocated_blocks"].as_u64().unwrap() * info["block_size"].as_u64().unwrap()
    );
    // A map of part of the disk (qemu-img asks block status for that range only).
    let part = json(&tool_ok(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "--start-offset=4M",
            "--max-length=2M",
            &uri,
        ],
    ));
    let part: Vec<(u64, u64, bool)> = part
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(part, vec![(4 * MIB, MIB, false), (5 * MIB, MIB, true)]);
    d.shutdown();
}

/// A differencing child over a parent: base:allocation shows what the chain holds, and
/// qemu:allocation-depth tells where (1: the child, 2: its parent, 0: nowhere), read by
/// nbdinfo and by qemu-img the way QEMU's iotests read it (`x-dirty-bitmap=qemu:allocation-depth`
/// hands the context's values to qemu-img as if they were base:allocation's flags: bit 0 the
/// "hole" flag, bit 1 the "zero" flag; so depth 0 maps as data, 1 as absent, 2 as data+zero).
#[test]
fn qemu_img_map_of_differencing_chain_with_allocation_depth() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhdx");
    let child = dir.path().join("c.avhdx");
    vhdx(&parent, 16 * MIB);
    write_pattern(s(&parent), 0, 3 * MIB, 0x22);
    ok(&["disk", "create", s(&child), "--parent", s(&parent)]);
    write_pattern(s(&child), 2 * MIB, 2 * MIB, 0x33);
    // Single sectors: one over the parent's data (a partially present block, told by the
    // child's sector bitmap), one where neither holds anything.
    write_pattern(s(&child), 4096, 512, 0x34);
    write_pattern(s(&child), 8 * MIB + 1024, 512, 0x35);
    let d = Daemon::start(dir.path(), false, &[&format!("ch={}", s(&child))]);
    let uri = d.uri("ch");
    let (s1, s2) = (8 * MIB + 1024, 8 * MIB + 1536);
    assert_eq!(
        qemu_map(&[&uri]),
        vec![
            ext(0, 4 * MIB, "data"),
            ext(4 * MIB, s1 - 4 * MIB, "zero"),
            ext(s1, 512, "data"),
            ext(s2, 16 * MIB - s2, "zero"),
        ]
    );
    assert_eq!(
        nbdinfo_map(Some("qemu:allocation-depth"), &uri),
        vec![
            ext(0, 4096, "backing depth 2"),
            ext(4096, 512, "local"),
            ext(4608, 2 * MIB - 4608, "backing depth 2"),
            ext(2 * MIB, 2 * MIB, "local"),
            ext(4 * MIB, s1 - 4 * MIB, "absent"),
            ext(s1, 512, "local"),
            ext(s2, 16 * MIB - s2, "absent"),
        ]
    );
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=ch,x-dirty-bitmap=qemu:allocation-depth",
        s(&d.nbd)
    );
    assert_eq!(
        qemu_map(&["--image-opts", &opts]),
        vec![
            ext(0, 4096, "data+zero"),
            ext(4096, 512, "absent"),
            ext(4608, 2 * MIB - 4608, "data+zero"),
            ext(2 * MIB, 2 * MIB, "absent"),
            ext(4 * MIB, s1 - 4 * MIB, "data"),
            ext(s1, 512, "absent"),
            ext(s2, 16 * MIB - s2, "data"),
        ]
    );
    // The chain's bytes: the parent's under the child's.
    tool_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x22 0 4k",
            "-c",
            "read -P 0x34 4k 512",
            "-c",
            "read -P 0x22 4608 2092544",
            "-c",
            "read -P 0x33 2M 2M",
            "-c",
            "read -P 0 4M 4195328",
            "-c",
            "read -P 0x35 8389632 512",
            "-c",
            "read -P 0 8390144 8387072",
            &uri,
        ],
    );
    d.shutdown();
}

/// `qemu-img convert` out of an export (to qcow2 and raw) and into one (`-n`), and `qemu-img
/// compare` of the export against the copies and, once the daemon has stopped, of the VHDX
/// opened directly by qemu-img's own VHDX driver against what went in.
#[test]
fn qemu_img_convert_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let disk = p("d.vhdx");
    vhdx(&disk, 32 * MIB);
    write_pattern(s(&disk), 3 * MIB + 512, 700 * 1024, 0x5e);
    write_pattern(s(&disk), 20 * MIB, 2 * MIB, 0xe5);
    let d = Daemon::start(dir.path(), false, &[&format!("d0={}", s(&disk))]);
    let uri = d.uri("d0");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            &uri,
            "-O",
            "qcow2",
            s(&p("out.qcow2")),
        ],
    );
    tool_ok(
        "qemu-img",
        &["convert", "-f", "raw", &uri, "-O", "raw", s(&p("out.raw"))],
    );
    tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            &uri,
            "-F",
            "qcow2",
            s(&p("out.qcow2")),
        ],
    );
    tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", &uri, "-F", "raw", s(&p("out.raw"))],
    );
    // The holes stayed holes in the qcow2 copy: only the two written ranges are data.
    let m = qemu_map(&["-f", "qcow2", s(&p("out.qcow2"))]);
    let data = bytes_labelled(&m, "data");
    assert!(
        (2 * MIB + 700 * 1024..=4 * MIB).contains(&data),
        "{data} bytes of data in the qcow2 copy: {m:?}"
    );

    // In: a raw file with noise and holes, converted onto the export (-n: it exists).
    let input = p("in.raw");
    {
        let f = std::fs::File::create(&input).unwrap();
        f.set_len(32 * MIB).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&noise(3 * MIB as usize, 7), MIB / 2)
            .unwrap();
        f.write_all_at(&noise(4096, 8), 30 * MIB).unwrap();
    }
    tool_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", s(&input), "-O", "raw", &uri],
    );
    tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", s(&input), "-F", "raw", &uri],
    );
    // And the copy taken before no longer matches (so compare looks at the bytes).
    let o = tool(
        "qemu-img",
        &["compare", "-f", "raw", &uri, "-F", "raw", s(&p("out.raw"))],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Content mismatch"),
        "{o:?}"
    );
    d.shutdown();
    check_clean(&disk);
    // The VHDX itself, read by QEMU's VHDX driver, holds exactly the input.
    tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", s(&input), "-F", "vhdx", s(&disk)],
    );
    tool_ok(
        "qemu-img",
        &["compare", "-f", "vhdx", s(&disk), "-F", "raw", s(&input)],
    );
}

/// qemu-io's patterns written through NBD (over TCP, one with FUA) are in the image as
/// `vstor disk read` sees it after shutdown; and patterns `vstor disk write` put in the image
/// read back through NBD with qemu-io's `read -P`.
#[test]
fn qemu_io_patterns_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    let t = s(&disk).to_string();
    vhdx(&disk, 16 * MIB);
    write_pattern(&t, 0, 64 * 1024, 0x61);
    write_pattern(&t, 7 * MIB + 512, 3 * 1024, 0x62);
    let d = Daemon::start(dir.path(), true, &[&format!("d0={t}")]);
    tool_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x61 0 64k",
            "-c",
            "read -P 0 64k 7275008",
            "-c",
            "read -P 0x62 7340544 3k",
            "-c",
            "read -P 0 7343616 512",
            &d.uri("d0"),
        ],
    );
    // A read that expects the wrong pattern fails (so the reads above checked something).
    let bad = tool_fails(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x62 0 4k", &d.uri("d0")],
    );
    assert!(bad.contains("Pattern verification failed"), "{bad}");
    // Writes: across a block boundary, unaligned to 4 KiB, and one with FUA (-f).
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x71 1048064 8k",
            "-c",
            "write -f -P 0x72 12M 1M",
            "-c",
            "write -P 0x73 512 512",
            &d.tcp_uri("d0"),
        ],
    );
    d.shutdown();
    check_clean(&disk);
    let got = read_target(dir.path(), &t, 0, 16 * MIB);
    let want = {
        let mut w = vec![0u8; 16 * MIB as usize];
        w[..64 * 1024].fill(0x61);
        w[7 * MIB as usize + 512..][..3 * 1024].fill(0x62);
        w[1048064..][..8192].fill(0x71);
        w[12 * MIB as usize..][..MIB as usize].fill(0x72);
        w[512..1024].fill(0x73);
        w
    };
    assert_same(
        &got,
        &want,
        "the image against what qemu-io and vstor wrote",
    );
}

/// NBD TRIM and WRITE_ZEROES from qemu-io reach the VHDX: a discarded whole block is unmapped
/// (a hole in the map, counted by `vstor disk info`), zeroes written with NO_HOLE (qemu-io's
/// plain `write -z`) keep the block allocated, and every range reads back as zeroes, the
/// bytes around them untouched.
#[test]
fn discard_and_write_zeroes_reach_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    let t = s(&disk).to_string();
    vhdx(&disk, 8 * MIB);
    write_pattern(&t, 0, 4 * MIB, 0x11);
    assert_eq!(disk_info(&t)["allocated_blocks"], 4);
    let d = Daemon::start(dir.path(), false, &[&format!("d0={t}")]);
    let uri = d.uri("d0");
    assert_eq!(
        qemu_map(&[&uri]),
        vec![ext(0, 4 * MIB, "data"), ext(4 * MIB, 4 * MIB, "zero")]
    );
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-d",
            "unmap",
            "-c",
            "discard 1M 1M",
            "-c",
            "write -z 2M 1M",
            "-c",
            "write -z -u 3M 64k",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "read -P 0 3M 64k",
            "-c",
            "read -P 0x11 3211264 960k",
            "-c",
            "read -P 0x11 0 1M",
            &uri,
        ],
    );
    let st = d.stats("d0");
    assert_eq!(st["discards"], 1, "{st}");
    assert_eq!(st["write_zeroes"], 2, "{st}");
    assert_eq!(st["writes"], 0, "{st}");
    assert_eq!(st["errors"], 0, "{st}");
    // The discarded block is a hole now; the zeroed ones stay allocated.
    let after = vec![
        ext(0, MIB, "data"),
        ext(MIB, MIB, "zero"),
        ext(2 * MIB, 2 * MIB, "data"),
        ext(4 * MIB, 4 * MIB, "zero"),
    ];
    assert_eq!(qemu_map(&[&uri]), after);
    d.shutdown();
    check_clean(&disk);
    let info = disk_info(&t);
    assert_eq!(info["allocated_blocks"], 3, "{info}");
    assert_eq!(info["unmapped_blocks"], 1, "{info}");
    let got = read_target(dir.path(), &t, 0, 8 * MIB);
    assert_all(&got[..MIB as usize], 0x11, "block 0");
    assert_all(
        &got[MIB as usize..(3 * MIB + 65536) as usize],
        0,
        "discarded and zeroed",
    );
    assert_all(
        &got[(3 * MIB + 65536) as usize..4 * MIB as usize],
        0x11,
        "after the zeroes",
    );
    assert_all(&got[4 * MIB as usize..], 0, "never written");
    // QEMU's VHDX driver reads the same bytes.
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &got).unwrap();
    tool_ok(
        "qemu-img",
        &["compare", "-f", "vhdx", s(&disk), "-F", "raw", s(&raw)],
    );
}

/// Two connections at once on a multi-conn export: nbdinfo reports can_multi_conn, the
/// daemon counts both clients, a write completed on one is read on the other, and nbdcopy
/// with two connections copies both ways.
#[test]
fn two_connections_with_multi_conn() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    vhdx(&disk, 16 * MIB);
    let d = Daemon::start(dir.path(), false, &[&format!("d0={}", s(&disk))]);
    let uri = d.uri("d0");
    let v = json(&tool_ok("nbdinfo", &["--json", &uri]));
    assert_eq!(v["exports"][0]["can_multi_conn"], true, "{v}");

    // Connection A: an interactive qemu-io that stays connected, fed commands one by one.
    let mut a = Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io is installed by ./scripts/test (package qemu-utils)");
    let mut a_in = a.stdin.take().unwrap();
    let a_out = spawn_reader(a.stdout.take().unwrap());
    writeln!(a_in, "write -P 0x4d 2M 64k").unwrap();
    wait_for(&a_out, "wrote 65536/65536 bytes at offset 2097152");
    // Connection B, while A is still connected.
    let t = Instant::now();
    loop {
        let l = d.list();
        if l[0]["connections"] == 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{l:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut b = Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut b_in = b.stdin.take().unwrap();
    let b_out = spawn_reader(b.stdout.take().unwrap());
    writeln!(b_in, "read -P 0x4d 2M 64k").unwrap();
    wait_for(&b_out, "read 65536/65536 bytes at offset 2097152");
    let l = d.list();
    assert_eq!(l[0]["connections"], 2, "{l:?}");
    // B writes and flushes; A reads it.
    writeln!(b_in, "write -P 0x4e 3M 4k").unwrap();
    writeln!(b_in, "flush").unwrap();
    wait_for(&b_out, "wrote 4096/4096 bytes at offset 3145728");
    writeln!(a_in, "read -P 0x4e 3M 4k").unwrap();
    wait_for(&a_out, "read 4096/4096 bytes at offset 3145728");
    drop(a_in);
    drop(b_in);
    for (name, c) in [("A", a), ("B", b)] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "qemu-io {name}: {o:?}");
    }
    let a_text = a_out.lock().unwrap().clone();
    assert!(!a_text.contains("Pattern verification failed"), "{a_text}");
    let b_text = b_out.lock().unwrap().clone();
    assert!(!b_text.contains("Pattern verification failed"), "{b_text}");

    // nbdcopy with two connections, in then out.
    let input = dir.path().join("in.raw");
    std::fs::write(&input, noise(16 * MIB as usize, 99)).unwrap();
    tool_ok("nbdcopy", &["--connections=2", s(&input), &uri]);
    let out = dir.path().join("out.raw");
    tool_ok("nbdcopy", &["--connections=2", &uri, s(&out)]);
    assert!(
        std::fs::read(&input).unwrap() == std::fs::read(&out).unwrap(),
        "nbdcopy's round trip through the export changed the bytes"
    );
    let st = d.stats("d0");
    assert_eq!(
        st["bytes_written"].as_u64().unwrap(),
        16 * MIB + 65536 + 4096,
        "{st}"
    );
    d.shutdown();
    check_clean(&disk);
}

/// Collects a child's output in the background.
fn spawn_reader(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let t2 = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => t2
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
    text
}

/// Waits (at most 10 s) until `text` contains `what`.
fn wait_for(text: &Arc<Mutex<String>>, what: &str) {
    let t = Instant::now();
    loop {
        if text.lock().unwrap().contains(what) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no {what:?} in {:?}",
            text.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// nbdinfo's `--list` names every export with the size and read-only flag `vstor disk info`
/// and the daemon give it; `--map` is the VHDX's allocation as `vstor disk info` counts it;
/// `--json` reports the export size.
#[test]
fn nbdinfo_list_map_and_json_agree_with_disk_info() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    let raw = dir.path().join("r.raw");
    vhdx(&disk, 40 * MIB);
    write_pattern(s(&disk), 2 * MIB, 3 * MIB, 0x44);
    write_pattern(s(&disk), 30 * MIB + 100, 100, 0x45);
    std::fs::write(&raw, noise(3 * MIB as usize, 5)).unwrap();
    // What vstor says of the images (asked before the daemon holds them).
    let d_info = disk_info(s(&disk));
    let r_info = disk_info(s(&raw));
    let d = Daemon::start(
        dir.path(),
        false,
        &[
            &format!("d0={}", s(&disk)),
            &format!("r0={},readonly=on", s(&raw)),
        ],
    );
    let list = json(&tool_ok(
        "nbdinfo",
        &[
            "--list",
            "--json",
            &format!("nbd+unix:///?socket={}", s(&d.nbd)),
        ],
    ));
    let exports = list["exports"].as_array().expect("exports");
    let mut names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d0", "r0"], "{list}");
    for e in exports {
        let name = e["export-name"].as_str().unwrap();
        let (info, ro) = if name == "d0" {
            (&d_info, false)
        } else {
            (&r_info, true)
        };
        assert_eq!(e["export-size"], info["virtual_size"], "{name}: {e}");
        assert_eq!(e["is_read_only"], ro, "{name}: {e}");
        let ctx: Vec<&str> = e["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(ctx.contains(&"base:allocation"), "{name}: {e}");
    }
    // The text form lists both too.
    let text = tool_ok(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={}", s(&d.nbd))],
    );
    assert!(text.contains("export=\"d0\""), "{text}");
    assert!(text.contains("export=\"r0\""), "{text}");
    // One export's JSON.
    let one = json(&tool_ok("nbdinfo", &["--json", &d.uri("d0")]));
    assert_eq!(one["exports"][0]["export-size"], 40 * MIB, "{one}");
    assert_eq!(one["exports"][0]["export-name"], "d0", "{one}");

    let map = nbdinfo_map(None, &d.uri("d0"));
    let info = &d_info;
    let bs = info["block_size"].as_u64().unwrap();
    assert_eq!(
        bytes_labelled(&map, "data"),
        info["allocated_blocks"].as_u64().unwrap() * bs,
        "{map:?} against {info}"
    );
    assert_eq!(
        map,
        vec![
            ext(0, 2 * MIB, "hole,zero"),
            ext(2 * MIB, 3 * MIB, "data"),
            ext(5 * MIB, 25 * MIB, "hole,zero"),
            ext(30 * MIB, MIB, "data"),
            ext(31 * MIB, 9 * MIB, "hole,zero"),
        ]
    );
    let total: u64 = map.iter().map(|e| e.1).sum();
    assert_eq!(total, info["virtual_size"].as_u64().unwrap());
    // The raw file is all data (no holes in it).
    assert_eq!(
        nbdinfo_map(None, &d.uri("r0")),
        vec![ext(0, 3 * MIB, "data")]
    );
    d.shutdown();
}

/// nbdcopy both ways: the export copied to a file equals the VHDX as `vstor disk read` reads
/// it; a file copied onto the export is what the VHDX holds after shutdown.
#[test]
fn nbdcopy_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let disk = p("d.vhdx");
    let t = s(&disk).to_string();
    vhdx(&disk, 24 * MIB);
    let first = p("first.raw");
    std::fs::write(&first, noise(5 * MIB as usize, 11)).unwrap();
    ok(&["disk", "write", &t, "--offset", "3M", "--input", s(&first)]);
    let before = read_target(dir.path(), &t, 0, 24 * MIB);
    let d = Daemon::start(dir.path(), false, &[&format!("d0={t}")]);
    let uri = d.uri("d0");
    let out = p("out.raw");
    tool_ok("nbdcopy", &[&uri, s(&out)]);
    assert!(
        std::fs::read(&out).unwrap() == before,
        "nbdcopy out differs"
    );
    let input = p("in.raw");
    let mut bytes = noise(24 * MIB as usize, 12);
    bytes[8 * MIB as usize..16 * MIB as usize].fill(0);
    std::fs::write(&input, &bytes).unwrap();
    tool_ok("nbdcopy", &[s(&input), &uri]);
    d.shutdown();
    check_clean(&disk);
    assert!(
        read_target(dir.path(), &t, 0, 24 * MIB) == bytes,
        "the VHDX does not hold what nbdcopy copied in"
    );
}

/// A read-only export: qemu-io and nbdcopy refuse to write to it (the export says it is
/// read-only), reads work, and neither the file nor the daemon's write counters change.
#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("ro.raw");
    let bytes = noise(4 * MIB as usize, 3);
    std::fs::write(&raw, &bytes).unwrap();
    let disk = dir.path().join("ro.vhdx");
    vhdx(&disk, 4 * MIB);
    write_pattern(s(&disk), 0, MIB, 0x19);
    let vhdx_before = std::fs::read(&disk).unwrap();
    let d = Daemon::start(
        dir.path(),
        false,
        &[
            &format!("ro={},readonly=on", s(&raw)),
            &format!("rv={},readonly=on", s(&disk)),
        ],
    );
    for name in ["ro", "rv"] {
        let uri = d.uri(name);
        let e = tool_fails("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &uri]);
        assert!(
            e.contains("Permission denied") || e.contains("read-only"),
            "{name}: {e}"
        );
        let e = tool_fails(
            "qemu-io",
            &["-r", "-f", "raw", "-c", "write -P 1 0 4k", &uri],
        );
        assert!(e.contains("read-only"), "{name}: {e}");
        let e = tool_fails("nbdcopy", &["/dev/zero", &uri]);
        assert!(e.contains("read-only"), "{name}: {e}");
        let e = tool_fails(
            "qemu-img",
            &["convert", "-n", "-f", "raw", s(&raw), "-O", "raw", &uri],
        );
        assert!(!e.is_empty());
        let v = json(&tool_ok("nbdinfo", &["--json", &uri]));
        assert_eq!(v["exports"][0]["is_read_only"], true, "{v}");
        assert_eq!(v["exports"][0]["can_trim"], false, "{v}");
        assert_eq!(v["exports"][0]["can_zero"], false, "{v}");
        let st = d.stats(name);
        assert_eq!(st["writes"], 0, "{st}");
        assert_eq!(st["bytes_written"], 0, "{st}");
    }
    tool_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x19 0 1M", &d.uri("rv")],
    );
    let out = dir.path().join("out.raw");
    tool_ok("nbdcopy", &[&d.uri("ro"), s(&out)]);
    assert!(std::fs::read(&out).unwrap() == bytes);
    d.shutdown();
    assert!(
        std::fs::read(&raw).unwrap() == bytes,
        "the read-only raw file changed"
    );
    assert!(
        std::fs::read(&disk).unwrap() == vhdx_before,
        "the read-only VHDX changed"
    );
}

/// Names that do not exist: an export (qemu-img and nbdinfo say so, with the daemon's
/// message), and through the control API an export or a method (JSON-RPC errors that carry
/// the kind; the CLI exits non-zero with one clear line).
#[test]
fn unknown_names_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    vhdx(&disk, 4 * MIB);
    let d = Daemon::start(dir.path(), true, &[&format!("d0={}", s(&disk))]);
    for uri in [d.uri("nope"), d.tcp_uri("nope")] {
        let e = tool_fails("qemu-img", &["info", &uri]);
        assert!(e.contains("Requested export not available"), "{e}");
        assert!(e.contains("no export named 'nope'"), "{e}");
        let e = tool_fails("nbdinfo", &[&uri]);
        assert!(e.contains("nope"), "{e}");
    }
    let e = fails(&["export", "remove", "nope", "--server", d.ctl()]);
    assert_eq!(e.trim_end(), "vstor: error: no export named 'nope'");
    let e = fails(&["export", "stats", "nope", "--server", d.ctl()]);
    assert_eq!(e.trim_end(), "vstor: error: no export named 'nope'");
    let e = fails(&[
        "export",
        "set-qos",
        "nope",
        "--max-iops",
        "5",
        "--server",
        d.ctl(),
    ]);
    assert!(e.contains("no export named 'nope'"), "{e}");
    let e = fails(&["export", "resize", "nope", "8M", "--server", d.ctl()]);
    assert!(e.contains("no export named 'nope'"), "{e}");
    // A name taken, a target that does not exist.
    let e = fails(&["export", "add", "d0", s(&disk), "--server", d.ctl()]);
    assert!(e.contains("d0"), "{e}");
    let missing = dir.path().join("missing.vhdx");
    let e = fails(&["export", "add", "d1", s(&missing), "--server", d.ctl()]);
    assert!(e.contains("missing.vhdx"), "{e}");
    // A daemon that is not there.
    let e = fails(&["export", "list", "--server", s(&dir.path().join("no.sock"))]);
    assert!(e.contains("cannot reach the daemon"), "{e}");

    // The JSON-RPC answers themselves, on one connection.
    let mut c = UnixStream::connect(&d.control).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut rpc = |req: &str| -> Value {
        writeln!(c, "{req}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        json(&line)
    };
    let v = rpc(r#"{"jsonrpc":"2.0","id":1,"method":"export.remove","params":{"name":"nope"}}"#);
    assert_eq!(v["id"], 1, "{v}");
    assert_eq!(v["error"]["code"], -32000, "{v}");
    assert_eq!(v["error"]["message"], "no export named 'nope'", "{v}");
    assert_eq!(v["error"]["data"]["kind"], "not-found", "{v}");
    let v = rpc(r#"{"jsonrpc":"2.0","id":2,"method":"export.nope"}"#);
    assert_eq!(v["error"]["code"], -32601, "{v}");
    assert_eq!(v["error"]["data"]["kind"], "not-found", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("export.nope"),
        "{v}"
    );
    let v = rpc(r#"{"jsonrpc":"2.0","id":3,"method":"export.remove","params":{}}"#);
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let v = rpc("{not json");
    assert_eq!(v["error"]["code"], -32700, "{v}");
    // The schema names the methods the CLI uses.
    let v = rpc(r#"{"jsonrpc":"2.0","id":4,"method":"rpc.discover"}"#);
    let methods: Vec<&str> = v["result"]["methods"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    for m in [
        "export.add",
        "export.remove",
        "export.list",
        "export.stats",
        "server.shutdown",
    ] {
        assert!(methods.contains(&m), "{m} not in {methods:?}");
    }
    drop(c);
    // The export that exists still works after all that.
    tool_ok("qemu-img", &["info", &d.uri("d0")]);
    d.shutdown();
}

/// Exports added, listed, measured and removed while the daemon runs: the statistics count
/// exactly what qemu-io did, and a removed export is closed (its image lock released, the
/// image clean) and gone from the NBD listeners.
#[test]
fn export_add_list_stats_remove_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.vhdx");
    let b = dir.path().join("b.raw");
    vhdx(&a, 8 * MIB);
    ok(&["disk", "create", s(&b), "--size", "2M"]);
    let d = Daemon::start(dir.path(), false, &[]);
    assert!(d.list().is_empty());
    assert_eq!(
        ok(&["export", "list", "--server", d.ctl()]).trim(),
        "no exports"
    );
    let added = ok(&["export", "add", "a", s(&a), "--server", d.ctl()]);
    assert!(added.starts_with("added export 'a'"), "{added}");
    let added = json(&ok(&[
        "export",
        "add",
        "b",
        s(&b),
        "--readonly",
        "--server",
        d.ctl(),
        "--json",
    ]));
    assert_eq!(added["name"], "b", "{added}");
    assert_eq!(added["read_only"], true, "{added}");
    assert_eq!(added["size"], 2 * MIB, "{added}");
    let l = d.list();
    assert_eq!(l.len(), 2, "{l:?}");
    let la = l.iter().find(|e| e["name"] == "a").expect("a listed");
    assert_eq!(la["size"], 8 * MIB, "{la}");
    assert_eq!(la["read_only"], false, "{la}");
    assert_eq!(la["format"], "VHDX", "{la}");
    // The new exports are served.
    let names = tool_ok(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={}", s(&d.nbd))],
    );
    assert!(
        names.contains("export=\"a\"") && names.contains("export=\"b\""),
        "{names}"
    );

    let base = d.stats("a");
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-d",
            "unmap",
            "-c",
            "write -P 0x21 0 64k",
            "-c",
            "write -P 0x22 1M 4k",
            "-c",
            "write -P 0x23 3M 512",
            "-c",
            "read -P 0x21 0 64k",
            "-c",
            "read -P 0x22 1M 4k",
            "-c",
            "discard 4M 1M",
            "-c",
            "write -z 5M 8k",
            "-c",
            "flush",
            &d.uri("a"),
        ],
    );
    let st = d.stats("a");
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    let delta = |k: &str| n(&st, k) - n(&base, k);
    assert_eq!(delta("writes"), 3, "{st}");
    assert_eq!(delta("bytes_written"), 65536 + 4096 + 512, "{st}");
    assert_eq!(delta("discards"), 1, "{st}");
    assert_eq!(delta("write_zeroes"), 1, "{st}");
    assert!(delta("flushes") >= 1, "{st}");
    // qemu-io's own reads plus whatever it reads on open.
    assert!(delta("reads") >= 2, "{st}");
    assert!(delta("bytes_read") >= 65536 + 4096, "{st}");
    assert_eq!(n(&st, "errors"), 0, "{st}");
    assert_eq!(n(&st, "in_flight"), 0, "{st}");
    assert!(
        st["latency_total"]["p50_us"].as_f64().unwrap() > 0.0,
        "{st}"
    );
    // All exports' statistics at once, and the text form.
    let all = json(&ok(&["export", "stats", "--server", d.ctl(), "--json"]));
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    let text = ok(&["export", "stats", "a", "--server", d.ctl()]);
    assert!(text.contains("3 writes"), "{text}");

    // Removed: gone from the listeners and the list; its file closed and unlocked.
    let out = ok(&["export", "remove", "a", "--server", d.ctl()]);
    assert_eq!(out.trim(), "removed export 'a' (flushed and closed)");
    let e = tool_fails("qemu-img", &["info", &d.uri("a")]);
    assert!(e.contains("no export named 'a'"), "{e}");
    let l = d.list();
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0]["name"], "b");
    check_clean(&a);
    write_pattern(s(&a), 6 * MIB, 512, 0x24);
    let got = read_target(dir.path(), s(&a), 0, 64 * 1024);
    assert_all(&got, 0x21, "written through the removed export");
    // Added again under the same name: served again, with what was written meanwhile.
    ok(&["export", "add", "a", s(&a), "--server", d.ctl()]);
    tool_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x24 6M 512",
            "-c",
            "read -P 0x23 3M 512",
            &d.uri("a"),
        ],
    );
    let st = d.stats("a");
    assert_eq!(
        st["writes"], 0,
        "a new export starts its counters afresh: {st}"
    );
    // Resized online: a client that connects now sees the new size.
    let out = ok(&["export", "resize", "a", "12M", "--server", d.ctl()]);
    assert_eq!(out.trim(), "export 'a' is now 12582912 bytes");
    let v = json(&tool_ok(
        "qemu-img",
        &["info", "--output=json", &d.uri("a")],
    ));
    assert_eq!(v["virtual-size"], 12 * MIB, "{v}");
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x25 11M 1M", &d.uri("a")],
    );
    d.shutdown();
    check_clean(&a);
    assert_eq!(disk_info(s(&a))["virtual_size"], 12 * MIB);
    assert_all(
        &read_target(dir.path(), s(&a), 11 * MIB, MIB),
        0x25,
        "the grown end",
    );
}

/// SIGTERM while qemu-io is writing: the daemon answers what is in flight, flushes, closes and
/// exits 0; qemu-io's later writes fail; the image is clean, every write qemu-io saw complete
/// is in it, and each 1 MiB write is there whole or not at all, in the order they were issued.
#[test]
fn sigterm_while_qemu_io_writes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    let t = s(&disk).to_string();
    const N: u64 = 48;
    vhdx(&disk, N * MIB);
    let d = Daemon::start(dir.path(), false, &[&format!("d0={t}")]);
    let mut q = Command::new("qemu-io")
        .args(["-f", "raw", &d.uri("d0")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io is installed by ./scripts/test (package qemu-utils)");
    let out = spawn_reader(q.stdout.take().unwrap());
    let err = spawn_reader(q.stderr.take().unwrap());
    let mut stdin: ChildStdin = q.stdin.take().unwrap();
    // Feed 1 MiB writes one after another from a thread, never waiting for their answers.
    let feeder = std::thread::spawn(move || {
        for i in 0..N {
            if writeln!(stdin, "write -P 0x5a {}M 1M", i).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(15));
        }
    });
    // Signal once a few writes completed.
    wait_for(&out, "at offset 8388608");
    let log = d.terminate();
    feeder.join().unwrap();
    q.wait().unwrap();
    let text = out.lock().unwrap().clone() + &err.lock().unwrap();
    let completed: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split("wrote 1048576/1048576 bytes at offset ").nth(1))
        .map(|x| x.trim().parse::<u64>().unwrap() / MIB)
        .collect();
    assert!(
        completed.len() >= 9 && (completed.len() as u64) < N,
        "the signal came mid-way: {} of {N} writes completed\n{text}\n{log}",
        completed.len()
    );
    assert!(text.contains("write failed"), "later writes fail: {text}");
    check_clean(&disk);
    let img = read_target(dir.path(), &t, 0, N * MIB);
    let (full, empty) = (vec![0x5au8; MIB as usize], vec![0u8; MIB as usize]);
    let whole: Vec<bool> = img
        .chunks(MIB as usize)
        .enumerate()
        .map(|(i, c)| {
            if c == &full[..] {
                true
            } else if c == &empty[..] {
                false
            } else {
                panic!("MiB {i} is torn: partly written");
            }
        })
        .collect();
    for &i in &completed {
        assert!(
            whole[i as usize],
            "MiB {i}: qemu-io saw it complete, the image lacks it"
        );
    }
    // In order: the writes present are a prefix (the last maybe done but not answered).
    let present = whole.iter().filter(|&&w| w).count();
    assert!(
        whole[..present].iter().all(|&w| w),
        "not a prefix: {whole:?}"
    );
    assert!(
        present >= completed.len() && present <= completed.len() + 1,
        "{whole:?}"
    );
}

/// Removing an export that a client is connected to disconnects the client (its next request
/// fails) at once; a second daemon on the same sockets or the same image is refused (exit 75,
/// "try again later") and the first keeps serving.
#[test]
fn remove_with_a_client_and_a_second_daemon_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    let raw = dir.path().join("r.raw");
    vhdx(&disk, 8 * MIB);
    ok(&["disk", "create", s(&raw), "--size", "4M"]);
    let d = Daemon::start(
        dir.path(),
        false,
        &[&format!("d0={}", s(&disk)), &format!("r0={}", s(&raw))],
    );
    let meta = std::fs::metadata(&d.control).unwrap();
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "the control socket's mode"
    );

    let mut q = Command::new("qemu-io")
        .args(["-f", "raw", &d.uri("r0")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io is installed by ./scripts/test (package qemu-utils)");
    let mut q_in = q.stdin.take().unwrap();
    let q_out = spawn_reader(q.stdout.take().unwrap());
    writeln!(q_in, "write -P 0x31 0 4k").unwrap();
    wait_for(&q_out, "wrote 4096/4096 bytes at offset 0");
    let r0 = d.list().into_iter().find(|e| e["name"] == "r0").unwrap();
    assert_eq!(r0["connections"], 1, "{r0}");
    let t = Instant::now();
    ok(&["export", "remove", "r0", "--server", d.ctl()]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "remove waited {:?} for a connected client",
        t.elapsed()
    );
    writeln!(q_in, "read -P 0x31 0 4k").unwrap();
    wait_for(&q_out, "read failed");
    drop(q_in);
    q.wait().unwrap();
    // The write the client saw complete is in the file, which nobody holds now.
    assert_all(
        &read_target(dir.path(), s(&raw), 0, 4096),
        0x31,
        "r0's write",
    );

    // A second daemon: on the same NBD socket, on the same control socket, on the same image.
    let second = |args: &[&str]| {
        let o = common::vstor(args);
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(75), "{args:?}: {e}");
        e
    };
    let other_c = dir.path().join("c2.sock");
    let other_n = dir.path().join("n2.sock");
    let e = second(&[
        "serve",
        "--control",
        s(&other_c),
        "--nbd",
        &format!("unix:{}", s(&d.nbd)),
        "--export",
        &format!("r0={}", s(&raw)),
    ]);
    assert!(e.contains("is in use: something listens on it"), "{e}");
    let e = second(&[
        "serve",
        "--control",
        d.ctl(),
        "--nbd",
        &format!("unix:{}", s(&other_n)),
        "--export",
        &format!("r0={}", s(&raw)),
    ]);
    assert!(e.contains("is in use: something listens on it"), "{e}");
    let e = second(&[
        "serve",
        "--control",
        s(&other_c),
        "--nbd",
        &format!("unix:{}", s(&other_n)),
        "--export",
        &format!("x={}", s(&disk)),
    ]);
    assert!(e.contains("in use"), "{e}");
    // The first daemon still serves on both sockets.
    tool_ok("qemu-img", &["info", &d.uri("d0")]);
    assert_eq!(d.list().len(), 1);
    d.shutdown();
}

/// `kill -9` of the daemon: every write flushed before the kill is in the image; a new daemon
/// starts on the same (stale) socket paths, replays the VHDX log and serves the data; after a
/// clean shutdown `vstor disk check` is clean.
#[test]
fn kill_9_keeps_flushed_writes_and_a_restart_serves_them() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    vhdx(&disk, 16 * MIB);
    let export = format!("d0={}", s(&disk));
    let mut d = Daemon::start(dir.path(), false, &[&export]);
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x41 0 3M",
            "-c",
            "write -P 0x42 5M 4k",
            "-c",
            "flush",
            &d.uri("d0"),
        ],
    );
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    drop(d);
    assert!(
        dir.path().join("n.sock").exists(),
        "the stale socket is left behind"
    );
    let d = Daemon::start(dir.path(), false, &[&export]);
    tool_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x41 0 3M",
            "-c",
            "read -P 0 3M 2M",
            "-c",
            "read -P 0x42 5M 4k",
            &d.uri("d0"),
        ],
    );
    d.shutdown();
    check_clean(&disk);
    let got = read_target(dir.path(), s(&disk), 0, 6 * MIB);
    assert_all(&got[..3 * MIB as usize], 0x41, "the first write");
    assert_all(&got[5 * MIB as usize..][..4096], 0x42, "the second write");
}

/// Many requests in flight on one connection: `qemu-img bench` at depth 32 (4000 writes of 4
/// KiB every 8 KiB, then as many reads); the daemon counts every one, and after shutdown every
/// write is in the image and the gaps between them are still zero.
#[test]
fn qemu_img_bench_at_depth_32() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    let t = s(&disk).to_string();
    vhdx(&disk, 32 * MIB);
    let d = Daemon::start(dir.path(), false, &[&format!("d0={t}")]);
    let uri = d.uri("d0");
    let bench = |extra: &[&str]| {
        let mut a = vec![
            "bench", "-f", "raw", "-c", "4000", "-d", "32", "-s", "4k", "-S", "8k",
        ];
        a.extend_from_slice(extra);
        a.push(&uri);
        let out = tool_ok("qemu-img", &a);
        assert!(out.contains("32 in parallel"), "{out}");
    };
    bench(&["-w", "--pattern=0x3f"]);
    bench(&[]);
    let st = d.stats("d0");
    assert_eq!(st["writes"], 4000, "{st}");
    assert_eq!(st["bytes_written"], 4000 * 4096, "{st}");
    assert!(st["reads"].as_u64().unwrap() >= 4000, "{st}");
    assert_eq!(st["errors"], 0, "{st}");
    d.shutdown();
    check_clean(&disk);
    let img = read_target(dir.path(), &t, 0, 32 * MIB);
    let mut want = vec![0u8; 32 * MIB as usize];
    for stride in want.chunks_mut(8192).take(4000) {
        stride[..4096].fill(0x3f);
    }
    assert_same(
        &img,
        &want,
        "qemu-img bench's writes (0x3f at every 8 KiB for 4000)",
    );
}

/// SIGTERM with 32 requests in flight (`qemu-img bench -w -d 32`): the daemon answers or
/// refuses what it has, flushes and exits 0; the image is clean and every 4 KiB write is in it
/// whole or not at all.
#[test]
fn sigterm_with_32_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.vhdx");
    let t = s(&disk).to_string();
    const SIZE: u64 = 64 * MIB;
    vhdx(&disk, SIZE);
    let d = Daemon::start(dir.path(), false, &[&format!("d0={t}")]);
    let bench = Command::new("qemu-img")
        .args([
            "bench",
            "-f",
            "raw",
            "-w",
            "-c",
            &(SIZE / 4096).to_string(),
            "-d",
            "32",
            "-s",
            "4k",
            "-S",
            "4k",
            "--pattern=0x6b",
            &d.uri("d0"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-img is installed by ./scripts/test (package qemu-utils)");
    // Signal once the writes are under way (the daemon has counted some).
    let t0 = Instant::now();
    while d.stats("d0")["writes"].as_u64().unwrap() < 500 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the bench does not write"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d.terminate();
    let o = bench.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && text.contains("Failed request"),
        "the bench was cut short: {text}"
    );
    check_clean(&disk);
    let img = read_target(dir.path(), &t, 0, SIZE);
    let (full, empty) = (vec![0x6bu8; 4096], vec![0u8; 4096]);
    let mut written = 0;
    for (i, c) in img.chunks(4096).enumerate() {
        if c == &full[..] {
            written += 1;
        } else {
            assert!(c == &empty[..], "4 KiB write {i} is torn");
        }
    }
    assert!(
        (500..SIZE / 4096).contains(&written),
        "{written} writes in the image"
    );
}

/// A mirrored pool space served over NBD: its thin allocation shows in the map, qemu-io's
/// writes are in the space afterwards, and qemu-img's copy of it compares equal.
#[test]
fn pool_space_export() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    // 16 MiB slabs: the default 256 MiB slab does not fit a 256 MiB member with its metadata.
    ok(&[
        "pool",
        "create",
        s(&pool),
        "--disks",
        "3",
        "--disk-size",
        "256M",
        "--slab-size",
        "16M",
    ]);
    ok(&[
        "space",
        "create",
        s(&pool),
        "s",
        "--size",
        "64M",
        "--resiliency",
        "mirror",
    ]);
    let target = format!("pool:{}/s", s(&pool));
    let d = Daemon::start(dir.path(), false, &[&format!("sp={target}")]);
    let uri = d.uri("sp");
    let v = json(&tool_ok("qemu-img", &["info", "--output=json", &uri]));
    assert_eq!(v["virtual-size"], 64 * MIB, "{v}");
    assert_eq!(qemu_map(&[&uri]), vec![ext(0, 64 * MIB, "zero")]);
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 1M 256k",
            "-c",
            "write -P 0x78 40M 4k",
            "-c",
            "read -P 0x77 1M 256k",
            &uri,
        ],
    );
    // Thin: only the extents written to hold slabs (16 MiB each).
    assert_eq!(
        nbdinfo_map(None, &uri),
        vec![
            ext(0, 16 * MIB, "data"),
            ext(16 * MIB, 16 * MIB, "hole,zero"),
            ext(32 * MIB, 16 * MIB, "data"),
            ext(48 * MIB, 16 * MIB, "hole,zero"),
        ]
    );
    let copy = dir.path().join("copy.raw");
    tool_ok(
        "qemu-img",
        &["convert", "-f", "raw", &uri, "-O", "raw", s(&copy)],
    );
    tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", &uri, "-F", "raw", s(&copy)],
    );
    tool_ok("nbdcopy", &["--connections=2", s(&copy), &uri]);
    d.shutdown();
    let img = read_target(dir.path(), &target, 0, 64 * MIB);
    assert!(
        img == std::fs::read(&copy).unwrap(),
        "the space differs from qemu-img's copy"
    );
    assert_all(
        &img[MIB as usize..][..256 * 1024],
        0x77,
        "qemu-io's first write",
    );
    assert_all(
        &img[40 * MIB as usize..][..4096],
        0x78,
        "qemu-io's second write",
    );
    // Two of the four 16 MiB extents allocated, each a slab on two disks; both copies agree.
    let info = json(&ok(&["space", "info", s(&pool), "s", "--json"]));
    assert_eq!(info["allocated_extents"], 2, "{info}");
    assert_eq!(info["slabs"], 4, "{info}");
    assert_eq!(info["health"], "healthy", "{info}");
    let scrub = ok(&["space", "scrub", s(&pool)]);
    assert!(
        scrub.contains(" 0 repaired, 0 could not be checked"),
        "{scrub}"
    );
    assert!(scrub.contains("0 bad blocks"), "{scrub}");
}
