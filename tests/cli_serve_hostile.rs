//! `vstor serve` attacked the way a crashing machine, a careless operator and a hostile client
//! would: SIGKILL in the middle of writes (a dynamic VHDX, a differencing child, a mirrored pool
//! space), flushes on one connection covering writes of another, connections churned by the
//! thousand, an export removed under a streaming client, control API abuse, crafted images, and
//! clients that leave with work queued.
//!
//! The NBD client here is a small one of its own (fixed newstyle, `OPT_GO`, simple replies), so
//! that requests can be pipelined, abandoned and timed exactly; no external tool is needed.
//! Tests marked `#[ignore]` show defects of the daemon that are reported and not fixed yet; each
//! says what it expects.

mod common;

use common::{ok, s};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A daemon started by a test; killed when dropped.
struct Daemon {
    child: Child,
    nbd: PathBuf,
    control: PathBuf,
}

impl Daemon {
    /// `vstor serve --nbd unix:DIR/nbd.sock --control DIR/control.sock EXTRA...`, run in `dir`.
    fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let nbd = dir.join("nbd.sock");
        let control = dir.join("control.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .current_dir(dir)
            .args(["serve", "--nbd", &format!("unix:{}", s(&nbd))])
            .args(["--control", s(&control)])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vstor serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        // A socket left by a killed daemon refuses connections until the new one binds.
        while UnixStream::connect(&control).is_err() || UnixStream::connect(&nbd).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("vstor serve exited with {st}: {err}");
            }
            assert!(Instant::now() < deadline, "vstor serve did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Its log is not needed once it runs; a full pipe must never block it.
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut std::io::sink());
        });
        Daemon {
            child,
            nbd,
            control,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rpc(&self, method: &str, params: Value) -> Value {
        let mut c = UnixStream::connect(&self.control).unwrap();
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        writeln!(c, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{method}: {e}: {line:?}"))
    }

    /// A successful call's result.
    fn call(&self, method: &str, params: Value) -> Value {
        let v = self.rpc(method, params);
        assert!(v["error"].is_null(), "{method}: {v}");
        v["result"].clone()
    }

    /// A failed call's `data.kind`.
    fn kind_of_failure(&self, method: &str, params: Value) -> String {
        let v = self.rpc(method, params);
        assert!(v["error"].is_object(), "{method} succeeded: {v}");
        v["error"]["data"]["kind"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn connect(&self, export: &str) -> Nbd {
        Nbd::connect(&self.nbd, export)
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and the exit status with how long the graceful end took (None if it took
    /// longer than `limit`; the daemon is then killed).
    fn term(mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let t = Instant::now();
        signal(self.pid(), "TERM");
        while t.elapsed() < limit {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some((st, t.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// (open descriptors, threads) of the daemon.
    fn fds_threads(&self) -> (usize, usize) {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count();
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        (fds, threads)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const FUA: u16 = 1;
const ENOSPC: u32 = 28;

/// A minimal NBD client: fixed newstyle, `OPT_GO`, simple replies only.
struct Nbd {
    s: UnixStream,
    size: u64,
    flags: u16,
    cookie: u64,
}

impl Nbd {
    fn connect(path: &Path, export: &str) -> Nbd {
        Self::try_connect(path, export).expect("NBD handshake")
    }

    fn try_connect(path: &Path, export: &str) -> std::io::Result<Nbd> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting)?;
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&3u32.to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes()); // OPT_GO
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let (mut size, mut flags) = (0, 0);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d)?;
            match kind {
                1 => break, // ACK
                3 if d[..2] == [0, 0] => {
                    size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
                }
                k if k & 0x8000_0000 != 0 => {
                    return Err(std::io::Error::other(format!(
                        "OPT_GO refused ({k:#x}): {}",
                        String::from_utf8_lossy(&d)
                    )))
                }
                _ => {}
            }
        }
        Ok(Nbd {
            s,
            size,
            flags,
            cookie: 0,
        })
    }

    /// Sends a request without waiting for its reply.
    fn send(&mut self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> u64 {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.s.write_all(&r).expect("send an NBD request");
        self.cookie
    }

    /// One simple reply: (error, cookie); a read's data lands in `data` when it succeeded.
    fn reply(&mut self, data: &mut [u8]) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("an NBD reply");
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if err == 0 && !data.is_empty() {
            self.s.read_exact(data).expect("read data");
        }
        (err, u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }

    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.send(WRITE, flags, offset, data.len() as u32, data);
        self.reply(&mut []).0
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
        self.send(READ, 0, offset, len as u32, &[]);
        let mut d = vec![0u8; len];
        match self.reply(&mut d).0 {
            0 => Ok(d),
            e => Err(e),
        }
    }

    fn flush(&mut self) -> u32 {
        self.send(FLUSH, 0, 0, 0, &[]);
        self.reply(&mut []).0
    }

    fn disconnect(mut self) {
        self.send(DISC, 0, 0, 0, &[]);
    }
}

/// A 4 KiB block that names itself: (offset, generation) repeated.
fn block(offset: u64, generation: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(4096);
    while b.len() < 4096 {
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&generation.to_be_bytes());
    }
    b
}

/// A small deterministic generator (xorshift), so failures repeat.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Rounds of: start, flushed writes, unflushed writes, writes still in flight, SIGKILL,
/// restart; every block acknowledged before an acknowledged FLUSH must read back whole (with
/// its own or a later generation), and `check` (a vstor command) must pass at the end.
fn killed_in_the_middle_of_writes(dir: &Path, target: &str, rounds: u64, check: &[&str]) {
    let export = format!("d0={target}");
    // Offset -> (generation made durable by a flush, written again since).
    let mut durable: std::collections::BTreeMap<u64, (u64, bool)> = Default::default();
    let mut generation = 0;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..rounds {
        let d = Daemon::start(dir, &["--export", &export]);
        let mut c = d.connect("d0");
        let blocks = (c.size / 4096).min(2048);
        // Flushed: these must survive.
        let mut acked = Vec::new();
        for _ in 0..64 {
            let off = rng.below(blocks) * 4096;
            generation += 1;
            assert_eq!(c.write(off, &block(off, generation), 0), 0);
            acked.push((off, (generation, false)));
        }
        assert_eq!(c.flush(), 0);
        durable.extend(acked);
        // Acknowledged but never flushed, then pipelined and unanswered: either may be lost,
        // and a block written again may be torn by the kill.
        for i in 0..96 {
            let off = rng.below(blocks) * 4096;
            generation += 1;
            if i < 32 {
                assert_eq!(c.write(off, &block(off, generation), 0), 0);
            } else {
                c.send(WRITE, 0, off, 4096, &block(off, generation));
            }
            if let Some(d) = durable.get_mut(&off) {
                d.1 = true;
            }
        }
        d.kill9();

        let d = Daemon::start(dir, &["--export", &export]);
        let mut c = d.connect("d0");
        for (&off, &(g0, again)) in &durable {
            let got = c.read(off, 4096).expect("read after the restart");
            let o = u64::from_be_bytes(got[..8].try_into().unwrap());
            let g = u64::from_be_bytes(got[8..16].try_into().unwrap());
            let whole = o == off && got == block(o, g);
            assert!(
                (whole && g >= g0) || (!whole && again),
                "round {round}: {target}: the flushed block at {off} (generation {g0}, written \
                 again since: {again}) reads as offset {o} generation {g} (whole: {whole})"
            );
        }
        c.disconnect();
        let (st, _) = d.term(Duration::from_secs(20)).expect("graceful stop");
        assert!(
            st.success(),
            "round {round}: the graceful stop ended with {st}"
        );
    }
    ok(check);
}

#[test]
fn sigkill_during_writes_keeps_every_flushed_block_of_a_dynamic_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(&[
        "disk",
        "create",
        s(&img),
        "--size",
        "64M",
        "--block-size",
        "1M",
    ]);
    killed_in_the_middle_of_writes(dir.path(), s(&img), 6, &["disk", "check", s(&img)]);
}

#[test]
fn sigkill_during_writes_keeps_every_flushed_block_of_a_differencing_child() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    ok(&["disk", "create", s(&base), "--size", "64M"]);
    ok(&[
        "disk",
        "write",
        s(&base),
        "--offset",
        "0",
        "--length",
        "8M",
        "-P",
        "0x11",
    ]);
    ok(&["disk", "create", s(&child), "--parent", s(&base)]);
    killed_in_the_middle_of_writes(dir.path(), s(&child), 5, &["disk", "check", s(&child)]);
    // The base was never written: its data is as it was.
    let o = ok(&["disk", "read", s(&base), "--offset", "7M", "--length", "16"]);
    assert!(o.contains("1111 1111"), "{o}");
    ok(&["disk", "check", s(&base)]);
}

#[test]
fn sigkill_during_writes_keeps_every_flushed_block_of_a_mirrored_space() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
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
    killed_in_the_middle_of_writes(dir.path(), &target, 5, &["space", "scrub", s(&pool), "s"]);
}

#[test]
fn a_flush_on_one_connection_makes_writes_of_another_durable() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(&["disk", "create", s(&img), "--size", "256M"]);
    let export = format!("d0={}", s(&img));
    for round in 0..4u64 {
        let d = Daemon::start(dir.path(), &["--export", &export]);
        let mut a = d.connect("d0");
        let mut b = d.connect("d0");
        assert_ne!(a.flags & (1 << 8), 0, "CAN_MULTI_CONN is offered");
        let offs: Vec<u64> = (0..8).map(|i| (round * 8 + i) * (1 << 20)).collect();
        for &o in &offs {
            assert_eq!(a.write(o, &block(o, round + 1), 0), 0);
        }
        assert_eq!(b.flush(), 0);
        d.kill9();
        let d = Daemon::start(dir.path(), &["--export", &export]);
        let mut c = d.connect("d0");
        for &o in &offs {
            assert_eq!(
                c.read(o, 4096).unwrap(),
                block(o, round + 1),
                "round {round}: the write at {o} on connection A, flushed on connection B, \
                 was lost by the SIGKILL"
            );
        }
    }
    ok(&["disk", "check", s(&img)]);
}

#[test]
fn a_fua_write_survives_sigkill_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(&["disk", "create", s(&img), "--size", "64M"]);
    let export = format!("d0={}", s(&img));
    for round in 0..3u64 {
        let d = Daemon::start(dir.path(), &["--export", &export]);
        let mut a = d.connect("d0");
        let o = round * (9 << 20);
        assert_eq!(a.write(o, &block(o, 7 + round), FUA), 0);
        d.kill9();
        let d = Daemon::start(dir.path(), &["--export", &export]);
        assert_eq!(d.connect("d0").read(o, 4096).unwrap(), block(o, 7 + round));
    }
}

#[test]
fn thousands_of_connections_leave_no_descriptor_or_thread_behind() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(&["disk", "create", s(&img), "--size", "64M"]);
    let d = Daemon::start(dir.path(), &["--export", &format!("d0={}", s(&img))]);
    let churn = |n: u64| {
        for i in 0..n {
            match i % 4 {
                // Connect and go.
                0 => drop(UnixStream::connect(&d.nbd).unwrap()),
                // Leave in the middle of the handshake.
                1 => {
                    let mut s = UnixStream::connect(&d.nbd).unwrap();
                    let mut g = [0u8; 18];
                    s.read_exact(&mut g).unwrap();
                    s.write_all(&3u32.to_be_bytes()).unwrap();
                }
                // A write answered, then gone without DISC.
                2 => {
                    let mut c = d.connect("d0");
                    assert_eq!(c.write(4096, &block(4096, i), 0), 0);
                }
                // A read in flight when the client goes.
                _ => {
                    let mut c = d.connect("d0");
                    c.send(READ, 0, 0, 65536, &[]);
                }
            }
        }
    };
    // A first round makes what the daemon makes once and keeps (its I/O rings, one more of
    // which may still appear later when workers happen to run at once: a slack of 2).
    churn(200);
    std::thread::sleep(Duration::from_millis(500));
    let before = d.fds_threads();
    for round in 0..2 {
        churn(2000);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut now = d.fds_threads();
        while (now.1 != before.1 || now.0 > before.0 + 2) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = d.fds_threads();
        }
        assert!(
            now.1 == before.1 && now.0 <= before.0 + 2,
            "round {round}: (descriptors, threads) {now:?} after 2000 connections, \
             {before:?} before"
        );
    }
    assert_eq!(d.call("export.list", json!({}))[0]["connections"], 0);
}

#[test]
fn an_export_removed_under_a_streaming_client_fails_it_cleanly_and_unlocks() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(&["disk", "create", s(&img), "--size", "256M"]);
    let d = Daemon::start(dir.path(), &["--export", &format!("d0={}", s(&img))]);
    let mut c = d.connect("d0");
    let writer = std::thread::spawn(move || {
        let data = vec![0x5au8; 1 << 20];
        for i in 0..256u64 {
            let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&0u16.to_be_bytes());
            r.extend_from_slice(&WRITE.to_be_bytes());
            r.extend_from_slice(&i.to_be_bytes());
            r.extend_from_slice(&(i << 20).to_be_bytes());
            r.extend_from_slice(&(data.len() as u32).to_be_bytes());
            r.extend_from_slice(&data);
            if c.s.write_all(&r).is_err() {
                return i;
            }
            let mut h = [0u8; 16];
            if c.s.read_exact(&mut h).is_err() {
                return i;
            }
            if u32::from_be_bytes(h[4..8].try_into().unwrap()) != 0 {
                return i;
            }
        }
        256
    });
    std::thread::sleep(Duration::from_millis(100));
    d.call("export.remove", json!({"name": "d0"}));
    let written = writer.join().unwrap();
    assert!(written < 256, "the client was not stopped by the removal");
    // Unlocked: the CLI opens it, and it is clean; the daemon serves it again.
    ok(&["disk", "check", s(&img)]);
    d.call("export.add", json!({"name": "d0", "target": s(&img)}));
    let mut c = d.connect("d0");
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x5au8; 4096]);
}

#[test]
fn control_api_abuse_is_refused_with_kinds_and_the_daemon_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    let other = dir.path().join("other.vhdx");
    ok(&["disk", "create", s(&img), "--size", "64M"]);
    let d = Daemon::start(dir.path(), &["--export", &format!("d0={}", s(&img))]);
    let mut c = d.connect("d0");
    assert_eq!(c.write(40 << 20, &vec![0xcd; 1 << 20], 0), 0);
    assert_eq!(c.flush(), 0);
    c.disconnect();
    let resize =
        |size: u64| d.kind_of_failure("export.resize", json!({"name": "d0", "size": size}));
    assert_eq!(resize(0), "invalid-input");
    assert_eq!(resize(511), "invalid-input");
    assert_eq!(resize(1 << 63), "invalid-input");
    assert_eq!(resize(u64::MAX), "invalid-input");
    // Shrinking never cuts data.
    assert_eq!(resize(1 << 20), "invalid-input");
    assert_eq!(d.call("export.list", json!({}))[0]["size"], 64 << 20);
    assert_eq!(
        d.kind_of_failure("export.merge", json!({"name": "d0"})),
        "invalid-input"
    );
    // A clone onto an existing file leaves it alone; into a missing directory it fails.
    std::fs::write(&other, b"precious").unwrap();
    d.kind_of_failure("export.clone", json!({"name": "d0", "dest": s(&other)}));
    assert_eq!(std::fs::read(&other).unwrap(), b"precious");
    let missing = dir.path().join("missing/x.vhdx");
    d.kind_of_failure("export.clone", json!({"name": "d0", "dest": s(&missing)}));
    // The same image again, writable or read-only: in use.
    for ro in [false, true] {
        let k = d.kind_of_failure(
            "export.add",
            json!({"name": "again", "target": s(&img), "readonly": ro}),
        );
        assert_eq!(k, "in-use");
    }
    for name in ["", "a/b", "a b", "x\u{0}y", &"n".repeat(256)] {
        let k = d.kind_of_failure("export.add", json!({"name": name, "target": s(&img)}));
        assert_eq!(k, "invalid-input", "{name:?}");
    }
    assert_eq!(
        d.kind_of_failure("export.add", json!({"name": "x", "target": ",,,"})),
        "invalid-input"
    );
    // QoS at the extremes, then lifted: the export still serves.
    d.call(
        "export.set-qos",
        json!({"name": "d0", "max_iops": u64::MAX, "min_iops": u64::MAX}),
    );
    d.call(
        "export.set-qos",
        json!({"name": "d0", "max_iops": 0, "min_iops": 0}),
    );
    let mut c = d.connect("d0");
    assert_eq!(c.read(40 << 20, 4096).unwrap(), vec![0xcd; 4096]);
    // A request line far past the limit is refused; the daemon answers the next client.
    let mut big = UnixStream::connect(&d.control).unwrap();
    let _ = big.write_all(&vec![b' '; 2 << 20]);
    drop(big);
    assert!(d.call("server.info", json!({}))["version"].is_string());
}

#[test]
fn sigterm_and_sigint_during_writes_end_gracefully_with_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(&["disk", "create", s(&img), "--size", "256M"]);
    for sig in ["TERM", "INT"] {
        let d = Daemon::start(dir.path(), &["--export", &format!("d0={}", s(&img))]);
        let mut c = d.connect("d0");
        let data = vec![0x42u8; 1 << 20];
        for i in 0..32u64 {
            c.send(WRITE, 0, i << 20, data.len() as u32, &data);
        }
        signal(d.pid(), sig);
        let t = Instant::now();
        let mut d = d;
        let st = loop {
            if let Some(st) = d.child.try_wait().unwrap() {
                break st;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "SIG{sig}: no exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(st.success(), "SIG{sig}: {st}");
        ok(&["disk", "check", s(&img)]);
    }
}

#[test]
fn a_socket_path_that_names_an_existing_file_is_refused_and_the_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    let notes = dir.path().join("notes.txt");
    ok(&["disk", "create", s(&img), "--size", "64M"]);
    std::fs::write(&notes, b"precious").unwrap();
    let image_bytes = std::fs::read(&img).unwrap();
    for args in [
        vec![
            "--control".to_string(),
            s(&notes).to_string(),
            "--nbd".into(),
            format!("unix:{}", s(&dir.path().join("n.sock"))),
        ],
        vec!["--nbd".into(), format!("unix:{}", s(&img))],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .arg("serve")
            .args(&args)
            .args(["--export", &format!("d0={}", s(&img))])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if t.elapsed() > Duration::from_secs(3) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            st.is_some_and(|st| !st.success()),
            "{args:?}: the daemon started on a path that is a regular file"
        );
        assert_eq!(std::fs::read(&notes).unwrap(), b"precious", "{args:?}");
        assert_eq!(std::fs::read(&img).unwrap(), image_bytes, "{args:?}");
    }
}

#[test]
fn a_relative_target_path_is_checkpointed_merged_and_cloned() {
    let dir = tempfile::tempdir().unwrap();
    ok(&[
        "disk",
        "create",
        s(&dir.path().join("d.vhdx")),
        "--size",
        "64M",
    ]);
    // Run in `dir`, naming the image relative to it, as an operator in that directory would.
    let d = Daemon::start(dir.path(), &["--export", "d0=d.vhdx"]);
    d.call("export.checkpoint", json!({"name": "d0"}));
    d.call("export.merge", json!({"name": "d0"}));
    let clone = dir.path().join("clone.vhdx");
    d.call("export.clone", json!({"name": "d0", "dest": s(&clone)}));
    let list = d.call("export.list", json!({}));
    assert!(
        !list[0]["describe"]
            .as_str()
            .unwrap()
            .contains("differencing"),
        "the export stayed checkpointed: {list}"
    );
    let avhdx = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "avhdx")
        })
        .count();
    assert_eq!(avhdx, 0, "differencing children left behind");
}

#[test]
fn relative_paths_given_to_the_cli_client_are_the_callers() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("daemon");
    let caller = dir.path().join("caller");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::create_dir_all(&caller).unwrap();
    let img = served.join("d.vhdx");
    ok(&["disk", "create", s(&img), "--size", "16M"]);
    ok(&[
        "disk",
        "create",
        s(&caller.join("mine.vhdx")),
        "--size",
        "16M",
    ]);
    let d = Daemon::start(&served, &["--export", &format!("d0={}", s(&img))]);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vstor"))
            .current_dir(&caller)
            .args(args)
            .args(["--server", s(&d.control)])
            .output()
            .unwrap()
    };
    let o = run(&["export", "add", "mine", "mine.vhdx"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["export", "clone", "d0", "copy.vhdx"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        caller.join("copy.vhdx").exists(),
        "the clone went to the daemon's directory: {:?}",
        served.join("copy.vhdx").exists()
    );
}

#[test]
fn server_shutdown_always_answers() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("c.sock");
    for i in 0..20 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(["serve", "--control", s(&control)])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while UnixStream::connect(&control).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let o = common::vstor(&["server", "shutdown", "--server", s(&control)]);
        assert!(
            o.status.success(),
            "try {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn a_client_that_leaves_with_requests_queued_costs_nothing_after() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let d = Daemon::start(dir.path(), &["--export", &format!("d0=raw:{}", s(&raw))]);
    let mut c = d.connect("d0");
    // 2000 reads of 32 MiB (56 KB of requests), and gone.
    let mut all = Vec::new();
    for i in 0..2000u64 {
        all.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        all.extend_from_slice(&0u16.to_be_bytes());
        all.extend_from_slice(&READ.to_be_bytes());
        all.extend_from_slice(&i.to_be_bytes());
        all.extend_from_slice(&0u64.to_be_bytes());
        all.extend_from_slice(&(32u32 << 20).to_be_bytes());
    }
    c.s.write_all(&all).unwrap();
    drop(c);
    let t = Instant::now();
    while d.call("export.stats", json!({"name": "d0"}))["connections"] != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the daemon still works for a client that left 5 s ago: {}",
            d.call("export.stats", json!({"name": "d0"}))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_does_not_wait_for_requests_held_back_by_qos() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let d = Daemon::start(dir.path(), &["--export", &format!("d0=raw:{}", s(&raw))]);
    d.call("export.set-qos", json!({"name": "d0", "max_iops": 1}));
    let mut c = d.connect("d0");
    for i in 0..40u64 {
        c.send(WRITE, 0, i * 4096, 4096, &block(i * 4096, 1));
    }
    std::thread::sleep(Duration::from_millis(500));
    let ended = d.term(Duration::from_secs(10));
    assert!(
        ended.is_some_and(|(st, _)| st.success()),
        "SIGTERM did not end the daemon within 10 s: {ended:?}"
    );
}

/// The region table's BAT entry: the BAT's file offset.
fn bat_offset(img: &[u8]) -> usize {
    let rt = &img[192 << 10..];
    assert_eq!(&rt[..4], b"regi");
    let count = u32::from_le_bytes(rt[8..12].try_into().unwrap()) as usize;
    // 2DC27766-F623-4200-9D64-115E9BFD4A08 as stored (mixed-endian GUID).
    let bat: [u8; 16] = [
        0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a,
        0x08,
    ];
    (0..count)
        .map(|i| &rt[16 + 32 * i..16 + 32 * (i + 1)])
        .find(|e| e[..16] == bat)
        .map(|e| u64::from_le_bytes(e[16..24].try_into().unwrap()) as usize)
        .expect("a BAT region")
}

#[test]
#[ignore = "server bug: a VHDX whose BAT maps two blocks at one file offset is served; a write to one block overwrites the other (disk check reports it, open does not)"]
fn a_bat_that_maps_two_blocks_at_one_offset_is_refused_or_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(&[
        "disk",
        "create",
        s(&img),
        "--size",
        "64M",
        "--block-size",
        "1M",
    ]);
    ok(&[
        "disk",
        "write",
        s(&img),
        "--offset",
        "0",
        "--length",
        "2M",
        "-P",
        "0x77",
    ]);
    let mut bytes = std::fs::read(&img).unwrap();
    let bat = bat_offset(&bytes);
    let entry0: [u8; 8] = bytes[bat..bat + 8].try_into().unwrap();
    bytes[bat + 8..bat + 16].copy_from_slice(&entry0);
    std::fs::write(&img, &bytes).unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let v = d.rpc("export.add", json!({"name": "d0", "target": s(&img)}));
    if v["error"].is_object() {
        assert_eq!(v["error"]["data"]["kind"], "corrupt", "{v}");
        return;
    }
    let mut c = d.connect("d0");
    assert_eq!(c.write(0, &vec![0xaa; 1 << 20], 0), 0);
    let e = c.write(1 << 20, &vec![0xbb; 1 << 20], 0);
    let first = c.read(0, 4096).unwrap();
    assert!(
        e != 0 || first == vec![0xaa; 4096],
        "a write to block 1 changed block 0 (block 0 now reads {:#x})",
        first[0]
    );
}

#[test]
fn writes_past_the_end_and_a_shrink_under_a_client_get_errors_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(&["disk", "create", s(&img), "--size", "64M"]);
    let d = Daemon::start(dir.path(), &["--export", &format!("d0={}", s(&img))]);
    let mut c = d.connect("d0");
    assert_eq!(c.size, 64 << 20);
    d.call("export.resize", json!({"name": "d0", "size": 32 << 20}));
    // The client still believes in 64 MiB: past the new end, writes get ENOSPC.
    assert_eq!(c.write(40 << 20, &block(40 << 20, 1), 0), ENOSPC);
    assert_eq!(c.write(u64::MAX - 4095, &block(0, 1), 0), ENOSPC);
    assert!(c.read(40 << 20, 4096).is_err());
    assert_eq!(c.write(0, &block(0, 1), 0), 0);
    assert_eq!(c.flush(), 0);
    c.disconnect();
    assert!(d.call("server.info", json!({}))["version"].is_string());
}

#[test]
fn sigkill_during_a_live_clone_loses_no_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    let clone = dir.path().join("clone.vhdx");
    ok(&["disk", "create", s(&img), "--size", "1G"]);
    let export = format!("d0={}", s(&img));
    let d = Daemon::start(dir.path(), &["--export", &export]);
    let mut c = d.connect("d0");
    // Enough data that the clone takes a while.
    let data = vec![0x5au8; 1 << 20];
    for i in 0..512u64 {
        assert_eq!(c.write(i << 20, &data, 0), 0);
    }
    assert_eq!(c.flush(), 0);
    let control = d.control.clone();
    let dest = s(&clone).to_string();
    std::thread::spawn(move || {
        let mut s = UnixStream::connect(&control).unwrap();
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": "export.clone",
                         "params": {"name": "d0", "dest": dest}});
        let _ = writeln!(s, "{req}");
        let _ = BufReader::new(s).read_line(&mut String::new());
    });
    // Wait for the clone's file under its temporary name: the clone is under way. (A clone
    // once took a checkpoint and sent the writes to a child that a restart did not serve; it
    // now copies while writes go on and leaves the disk as it is.)
    let partial = dir.path().join(".clone.vhdx.partial");
    let child = || partial.exists();
    let t = Instant::now();
    while !child() {
        assert!(t.elapsed() < Duration::from_secs(10), "no clone started");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(c.write(900 << 20, &block(900 << 20, 42), 0), 0);
    assert_eq!(c.flush(), 0);
    assert!(
        child(),
        "the clone ended before the kill: nothing was tested"
    );
    d.kill9();
    // A supervisor restarts the daemon as it was configured.
    let d = Daemon::start(dir.path(), &["--export", &export]);
    let got = d.connect("d0").read(900 << 20, 4096).unwrap();
    assert!(
        got == block(900 << 20, 42),
        "a write flushed during the clone is gone after the restart (reads {:?}...)",
        &got[..16]
    );
    assert!(
        !clone.exists(),
        "a half-made clone is under the destination's name"
    );
    assert!(
        !std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "avhdx")),
        "the clone left a checkpoint child behind"
    );
}
