//! `vstor serve --iscsi` against initiators nobody here wrote, and the fencing scenario of
//! issue 19 across a `kill -9` of the daemon:
//!
//! 1. libiscsi's conformance suite, `iscsi-test-cu --dataloss -i IQN1 -I IQN2 -t SCSI.*` (and
//!    the transport's own `iSCSI.*`, and `SCSI.MultipathIO.*` again with the URL twice, which
//!    it skips with one), on a raw file and on a VHDX: every test must pass (the counts are
//!    printed);
//! 2. real clients: `iscsi-ls`, `iscsi-inq`, `iscsi-readcapacity16`, `qemu-img
//!    info|convert|compare` and `qemu-io` over `iscsi://127.0.0.1:PORT/IQN/0`, with the data
//!    checked on the file itself;
//! 3. fence_scsi's scenario with the small initiator of serve/tests/iscsi_common: A registers
//!    and reserves Write Exclusive – Registrants Only and writes, B registers and preempts and
//!    aborts A, A's next write gets RESERVATION CONFLICT, B writes; the daemon is killed with
//!    SIGKILL and started again: the reservation is still B's.
//!
//! The clients are installed by ./scripts/test (packages libiscsi-bin and qemu-utils); a
//! missing one fails the test, it never passes silently.

#[path = "../serve/tests/iscsi_common/mod.rs"]
mod iscsi_common;

use iscsi_common::{pr, Initiator, LoginOpts, GOOD, RESERVATION_CONFLICT};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{ok, s};

const IQN1: &str = "iqn.2026-12.io.vstor.test:init1";
const IQN2: &str = "iqn.2026-12.io.vstor.test:init2";

fn package(tool: &str) -> &'static str {
    if tool.starts_with("iscsi-") {
        "libiscsi-bin"
    } else {
        "qemu-utils"
    }
}

/// qemu-img and qemu-io with the iscsi driver, from scripts/make-qemu-iscsi (the installed
/// qemu-utils backport has no matching driver module); built once, cached in the target dir.
fn qemu(name: &str) -> String {
    static DIR: std::sync::OnceLock<Result<std::path::PathBuf, String>> =
        std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("the target dir")
            .join("qemu-iscsi");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-qemu-iscsi");
        let o = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if o.status.success() {
            Ok(dir)
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    });
    match dir {
        Ok(d) => d.join(name).display().to_string(),
        Err(e) => panic!(
            "scripts/make-qemu-iscsi failed (it fetches qemu-utils and qemu-block-extra with \
             apt-get download): {e}"
        ),
    }
}

fn tool(name: &str, args: &[&str]) -> Output {
    let prog = if name.starts_with("qemu-") {
        qemu(name)
    } else {
        name.to_string()
    };
    Command::new(prog)
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

/// A running `vstor serve --iscsi 127.0.0.1:0`; killed on drop.
struct Daemon {
    child: Child,
    control: String,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(dir: &Path, exports: &[String]) -> Daemon {
        let control = dir.join("c.sock");
        let _ = std::fs::remove_file(&control);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--control".into(),
            s(&control).into(),
            "--iscsi".into(),
            "127.0.0.1:0".into(),
        ];
        for e in exports {
            args.extend(["--export".into(), e.clone()]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vstor serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let ready = line.starts_with("vstor serve: ready in ");
                log2.lock().unwrap().push_str(&format!("{line}\n"));
                if ready {
                    if let Some(t) = tx.take() {
                        let _ = t.send(());
                    }
                }
            }
        });
        let mut d = Daemon {
            child,
            control: s(&control).into(),
            log,
        };
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = d.child.kill();
            panic!("vstor {args:?} did not get ready: {}", d.log());
        }
        d
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The portal's address, as `vstor server info` reports it.
    fn portal(&self) -> SocketAddr {
        let info: Value =
            serde_json::from_str(&ok(&["server", "info", "--server", &self.control])).unwrap();
        let a = info["iscsi"][0]
            .as_str()
            .unwrap_or_else(|| panic!("no iscsi portal in {info}"));
        a.parse().unwrap()
    }

    fn url(&self, iqn: &str) -> String {
        format!("iscsi://{}/{iqn}/0", self.portal())
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn shutdown(mut self) {
        ok(&["server", "shutdown", "--server", &self.control]);
        let st = self.child.wait().unwrap();
        assert!(st.success(), "{}", self.log());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `iscsi-test-cu` for `suites` (with the URL given twice, for the multipath suite: two
/// sessions to one LUN); returns (tests, passed, failed, skipped, output).
fn conformance(url: &str, suites: &str, twice: bool) -> (u32, u32, u32, u32, String) {
    let mut args = vec!["--dataloss", "-i", IQN1, "-I", IQN2, "-t", suites, url];
    if twice {
        args.push(url);
    }
    let o = tool("iscsi-test-cu", &args);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("tests "))
        .unwrap_or_else(|| panic!("no CUnit summary: {out}"));
    let n: Vec<u32> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let skipped = out
        .lines()
        .filter(|l| l.trim_start().starts_with("Test: ") && l.contains("[SKIPPED]"))
        .count() as u32;
    (n[0], n[2], n[3], skipped, out)
}

fn failures(out: &str) -> Vec<String> {
    let mut suite = String::new();
    let mut failed = Vec::new();
    for l in out.lines() {
        if let Some(s) = l.strip_prefix("Suite: ") {
            suite = s.trim().to_string();
        }
        let t = l.trim_start();
        if t.starts_with("Test: ") && (t.ends_with("FAILED") || t.contains("[FAILED]")) {
            let name = t[6..].split(" ...").next().unwrap_or("").to_string();
            failed.push(format!("{suite}.{name}"));
        }
    }
    failed.sort();
    failed.dedup();
    failed
}

#[test]
fn libiscsi_conformance_on_raw_and_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let vhdx = dir.path().join("d.vhdx");
    ok(&["disk", "create", s(&vhdx), "--size", "64M"]);
    let mut report = Vec::new();
    for (what, target) in [
        ("raw", format!("raw:{}", s(&raw))),
        ("vhdx", s(&vhdx).to_string()),
    ] {
        let d = Daemon::start(dir.path(), &[format!("d0={target},shared=on")]);
        let url = d.url("iqn.2026-12.io.vstor:d0");
        for (suites, twice) in [
            ("SCSI.*", false),
            ("iSCSI.*", false),
            ("SCSI.MultipathIO.*", true),
        ] {
            let (tests, passed, failed, skipped, out) = conformance(&url, suites, twice);
            eprintln!(
                "{what} {suites}: {tests} tests, {passed} passed ({skipped} of them skipped \
                 by the suite), {failed} failed"
            );
            report.push((what, suites, tests, passed, failed, failures(&out)));
        }
        d.shutdown();
    }
    let bad: Vec<String> = report
        .iter()
        .filter(|r| r.2 == 0 || r.4 > 0 || r.3 != r.2)
        .map(|(what, suites, tests, passed, failed, names)| {
            format!("{what} {suites}: {passed} of {tests} passed, {failed} failed: {names:?}")
        })
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn real_clients_read_and_write_over_iscsi() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let iqn = "iqn.2026-12.io.vstor:d0";
    let d = Daemon::start(dir.path(), &[format!("d0=raw:{}", s(&raw))]);
    let portal = d.portal();
    let url = d.url(iqn);
    let ls = tool_ok("iscsi-ls", &["-s", &format!("iscsi://{portal}")]);
    assert!(
        ls.contains(&format!("Target:{iqn} Portal:{portal},1")),
        "{ls}"
    );
    assert!(ls.contains("Lun:0") && ls.contains("DIRECT_ACCESS"), "{ls}");
    let inq = tool_ok("iscsi-inq", &[&url]);
    assert!(
        inq.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{inq}"
    );
    let cap = tool_ok("iscsi-readcapacity16", &[&url]);
    assert!(cap.contains("Total size:33554432"), "{cap}");
    let info = tool_ok("qemu-img", &["info", "--output=json", &url]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 33554432u64);
    // qemu-io writes patterns; they are read back through iSCSI and found in the file.
    let io = tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0xa5 5M 64k",
            "-c",
            "aio_write -P 0x33 8M 4k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "read -P 0xa5 5M 64k",
            "-c",
            "read -P 0 4M 4k",
            &url,
        ],
    );
    assert!(!io.contains("Pattern verification failed"), "{io}");
    let file = std::fs::read(&raw).unwrap();
    assert!(file[..1 << 20].iter().all(|b| *b == 0x5a));
    assert!(file[5 << 20..(5 << 20) + 65536].iter().all(|b| *b == 0xa5));
    assert!(file[8 << 20..(8 << 20) + 4096].iter().all(|b| *b == 0x33));
    // qemu-img convert a local image in, and out again; compare each way.
    let src = dir.path().join("src.img");
    let mut pat = vec![0u8; 32 << 20];
    for (i, c) in pat.chunks_mut(4096).enumerate() {
        c.fill((i % 251) as u8 + 1);
    }
    std::fs::write(&src, &pat).unwrap();
    tool_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", s(&src), &url],
    );
    tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&src), &url],
    );
    let out = dir.path().join("out.img");
    tool_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &url, s(&out)],
    );
    assert_eq!(std::fs::read(&out).unwrap(), pat);
    assert_eq!(std::fs::read(&raw).unwrap(), pat, "the file itself");
    d.shutdown();
}

fn login(addr: SocketAddr, initiator: &str, isid: u8) -> Initiator {
    let mut o = LoginOpts::new(initiator, Some("iqn.2026-12.io.vstor:quorum"));
    o.isid = [0x80, 0, 0, 0, 0, isid];
    let mut i = Initiator::login(addr, &o).unwrap().expect("login");
    i.clear_ua().unwrap();
    i
}

#[test]
fn fence_scenario_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("q.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let export = format!("quorum=raw:{},shared=on", s(&raw));
    let d = Daemon::start(dir.path(), std::slice::from_ref(&export));
    let addr = d.portal();
    let (ka, kb) = (0x0a0a_0a0au64, 0x0b0b_0b0bu64);
    let mut a = login(addr, IQN1, 1);
    let mut b = login(addr, IQN2, 2);
    // A: register (APTPL, as fence_scsi --aptpl), reserve WE-RO, write.
    assert_eq!(
        a.prout(pr::REGISTER_AND_IGNORE, 0, 0, ka, true)
            .unwrap()
            .status,
        GOOD
    );
    assert_eq!(
        a.prout(pr::RESERVE, pr::WE_RO, ka, 0, false)
            .unwrap()
            .status,
        GOOD
    );
    assert_eq!(a.write10(0, &[0xaa; 4096]).unwrap().status, GOOD);
    // B: register, preempt and abort A.
    assert_eq!(
        b.prout(pr::REGISTER_AND_IGNORE, 0, 0, kb, true)
            .unwrap()
            .status,
        GOOD
    );
    let r = b
        .prout(pr::PREEMPT_AND_ABORT, pr::WE_RO, kb, ka, false)
        .unwrap();
    assert_eq!(r.status, GOOD, "{r:?}");
    // A's next write: RESERVATION CONFLICT; B writes.
    let r = a.write10(0, &[0xac; 4096]).unwrap();
    assert_eq!(r.status, RESERVATION_CONFLICT, "{r:?}");
    assert_eq!(b.write10(0, &[0xbb; 4096]).unwrap().status, GOOD);
    assert_eq!(b.read_reservation().unwrap(), Some((kb, pr::WE_RO)));
    // SIGKILL, and start again.
    d.kill9();
    let pr_file = format!("{}.vstor-pr", s(&raw));
    assert!(
        Path::new(&pr_file).exists(),
        "reservations persist in {pr_file}"
    );
    let d = Daemon::start(dir.path(), &[export]);
    let addr = d.portal();
    let mut b = login(addr, IQN2, 2);
    assert_eq!(b.read_reservation().unwrap(), Some((kb, pr::WE_RO)));
    assert_eq!(b.read_keys().unwrap().1, vec![kb]);
    let mut a = login(addr, IQN1, 1);
    let r = a.write10(0, &[0xad; 4096]).unwrap();
    assert_eq!(r.status, RESERVATION_CONFLICT, "{r:?}");
    assert_eq!(b.write10(8, &[0xbc; 4096]).unwrap().status, GOOD);
    let file = std::fs::read(&raw).unwrap();
    assert!(
        file[..4096].iter().all(|x| *x == 0xbb),
        "A wrote nothing after the fence"
    );
    assert!(file[4096..8192].iter().all(|x| *x == 0xbc));
    d.shutdown();
}
