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

/// Exports added at run time (`vstor export add`, the API's `export.add`) take the iSCSI
/// options of `--export`: their own target name, the initiator ACL and sharing.
#[test]
fn exports_added_through_the_api_take_the_iscsi_options() {
    let dir = tempfile::tempdir().unwrap();
    let (f1, f2) = (dir.path().join("a,1.img"), dir.path().join("a2.img"));
    for f in [&f1, &f2] {
        std::fs::File::create(f).unwrap().set_len(1 << 20).unwrap();
    }
    let d = Daemon::start(dir.path(), &[]);
    let iqn = "iqn.2026-12.io.vstor.test:added";
    let other = "iqn.2026-12.io.vstor.test:other";
    let server = ["--server", d.control.as_str()];
    let t1 = format!(
        "raw:{},shared=on,iqn={iqn},initiators={IQN1}+{IQN2}",
        s(&f1).replace(',', ",,")
    );
    ok(&[&["export", "add", "a1", &t1], &server[..]].concat());
    ok(&[
        &["export", "add", "a2", &format!("raw:{}", s(&f2))],
        &server[..],
    ]
    .concat());
    // The API refuses a bad option as the command line does, and a name in use keeps its
    // export and its options.
    let e = common::fails(
        &[
            &[
                "export",
                "add",
                "a3",
                &format!("raw:{},shared=maybe", s(&f2)),
            ],
            &server[..],
        ]
        .concat(),
    );
    assert!(e.contains("shared=maybe"), "{e}");
    common::fails(
        &[
            &["export", "add", "a1", &format!("raw:{}", s(&f2))],
            &server[..],
        ]
        .concat(),
    );
    let addr = d.portal();
    let login = |who: &str, target: &str, isid: u8| {
        let mut o = LoginOpts::new(who, Some(target));
        o.isid = [0x80, 0, 0, 0, 0, isid];
        Initiator::login(addr, &o).unwrap()
    };
    // a1: its own name, both initiators of its ACL at once (shared), no other initiator.
    let a = login(IQN1, iqn, 1).expect("IQN1 logs in to a1");
    let b = login(IQN2, iqn, 2).expect("IQN2 logs in to a1 beside IQN1");
    assert_eq!(
        login(other, iqn, 3).err(),
        Some(iscsi_common::Refused(0x0202))
    );
    assert_eq!(
        login(IQN1, "iqn.2026-12.io.vstor:a1", 4).err(),
        Some(iscsi_common::Refused(0x0203))
    );
    // Discovery lists a1 to its initiators only.
    let mut disc = Initiator::login(addr, &LoginOpts::new(other, None))
        .unwrap()
        .expect("discovery");
    let names: Vec<String> = disc
        .send_targets("All")
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k == "TargetName")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(names, ["iqn.2026-12.io.vstor:a2"]);
    // a2: the default name, unshared: one initiator at a time, any initiator.
    let c = login(other, "iqn.2026-12.io.vstor:a2", 5).expect("a2 admits any initiator");
    assert_eq!(
        login(IQN1, "iqn.2026-12.io.vstor:a2", 6).err(),
        Some(iscsi_common::Refused(0x0301))
    );
    for i in [a, b, c, disc] {
        i.logout().unwrap();
    }
    // Removed and added again without options, a1 is an unshared export of the default name.
    ok(&[&["export", "remove", "a1"], &server[..]].concat());
    let t1 = format!("raw:{}", s(&f1).replace(',', ",,"));
    ok(&[&["export", "add", "a1", &t1], &server[..]].concat());
    assert_eq!(
        login(IQN1, iqn, 7).err(),
        Some(iscsi_common::Refused(0x0203))
    );
    let a = login(other, "iqn.2026-12.io.vstor:a1", 8).expect("a1 by its default name");
    a.logout().unwrap();
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

/// The tag of a 64 KiB slot written by the load test: its first 4 bytes, which every 4 bytes
/// of the slot repeat (None: a slot that is not one whole write).
fn slot_tag(b: &[u8]) -> Option<u32> {
    let t = u32::from_le_bytes(b[..4].try_into().unwrap());
    b.chunks(4).all(|c| c == t.to_le_bytes()).then_some(t)
}

const SLOT: usize = 64 << 10;
const SLOTS: u32 = 48;

/// What a load writer ends with: the last tag of each slot, and the unit attentions it saw
/// (sense key, ASC, ASCQ).
type WriterEnd = (Vec<u32>, Vec<(u8, u8, u8)>);

/// A writer of its own region (`base` LBA, 512-byte blocks) of a shared LUN: 64 KiB writes
/// of increasing tags to random slots until `stop`, retried past unit attentions (counted).
/// Returns the last tag of each slot and the unit attentions seen.
fn load_writer(
    addr: SocketAddr,
    initiator: &'static str,
    isid: u8,
    base: u32,
    seed: u32,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<WriterEnd> {
    std::thread::spawn(move || {
        let mut o = LoginOpts::new(initiator, Some("iqn.2026-12.io.vstor:sh"));
        o.isid = [0x80, 0, 0, 0, 0, isid];
        let mut i = Initiator::login(addr, &o).unwrap().expect("login");
        let mut last = vec![0u32; SLOTS as usize];
        let mut uas = Vec::new();
        let mut x = seed;
        let mut tag = seed << 20;
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 20 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let s = x % SLOTS;
            tag += 1;
            let data: Vec<u8> = tag.to_le_bytes().repeat(SLOT / 4);
            loop {
                let cdb =
                    iscsi_common::write10_cdb(base + s * (SLOT as u32 / 512), (SLOT / 512) as u16);
                let r = i.cmd(&cdb, &data, 0).unwrap();
                if r.status == GOOD {
                    break;
                }
                let code = r.sense_code();
                assert!(
                    r.status == iscsi_common::CHECK_CONDITION && code.is_some_and(|c| c.0 == 6),
                    "{initiator}: write refused: {r:?}"
                );
                uas.push(code.unwrap());
            }
            last[s as usize] = tag;
            n += 1;
        }
        i.logout().unwrap();
        (last, uas)
    })
}

/// Issue 19, beyond 2012 R2: with two initiators logged in to a shared VHDX and writing known
/// patterns, the daemon's API resizes it (they get a capacity-changed unit attention and see
/// the new size), takes a host-level consistent backup (a live clone, and a checkpoint read
/// while they write, merged back), and moves it to another file; every pattern is verified
/// afterwards, the backup is a clean image of whole writes, and the reservation state moves
/// with the disk (a restart on the new path still has the registration).
#[test]
fn resize_backup_and_move_while_two_initiators_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sh.vhdx");
    ok(&["disk", "create", s(&img), "--size", "64M"]);
    let d = Daemon::start(dir.path(), &[format!("sh={},shared=on", s(&img))]);
    let addr = d.portal();
    // A registration that must follow the disk.
    let mut o = LoginOpts::new(IQN1, Some("iqn.2026-12.io.vstor:sh"));
    o.isid = [0x80, 0, 0, 0, 0, 9];
    let mut reg = Initiator::login(addr, &o).unwrap().expect("login");
    reg.clear_ua().unwrap();
    let key = 0x5eed_u64;
    let r = reg.prout(pr::REGISTER_AND_IGNORE, 0, 0, key, true).unwrap();
    assert_eq!(r.status, GOOD, "{r:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let a = load_writer(addr, IQN1, 1, 0, 1, stop.clone());
    let b = load_writer(addr, IQN2, 2, 16 << 11, 2, stop.clone());
    let api = |args: &[&str]| {
        let mut v = vec!["export"];
        v.extend_from_slice(args);
        v.extend(["--server", &d.control]);
        ok(&v)
    };
    let pause = || std::thread::sleep(Duration::from_millis(300));
    pause();
    api(&["resize", "sh", "96M"]);
    pause();
    let backup = dir.path().join("backup.vhdx");
    api(&["clone", "sh", s(&backup)]);
    pause();
    let cp = dir.path().join("sh-cp.avhdx");
    api(&["checkpoint", "sh", "--child", s(&cp)]);
    pause();
    // The frozen parent, read while they write: a consistent image of whole writes.
    let frozen = dir.path().join("frozen.raw");
    ok(&[
        "disk",
        "read",
        s(&img),
        "--length",
        "24M",
        "--output",
        s(&frozen),
    ]);
    api(&["merge", "sh"]);
    pause();
    let moved = dir.path().join("moved.vhdx");
    let out = api(&["move", "sh", s(&moved)]);
    assert!(out.contains("moved to"), "{out}");
    pause();
    stop.store(true, Ordering::Relaxed);
    let (la, ua_a) = a.join().unwrap();
    let (lb, ua_b) = b.join().unwrap();
    // Both saw the new capacity announced.
    for (who, uas) in [("A", &ua_a), ("B", &ua_b)] {
        assert!(
            uas.contains(&(6, 0x2a, 0x09)),
            "{who} saw no CAPACITY DATA HAS CHANGED: {uas:?}"
        );
    }
    // Every pattern, read back through iSCSI after all of it.
    let mut o = LoginOpts::new(IQN2, Some("iqn.2026-12.io.vstor:sh"));
    o.isid = [0x80, 0, 0, 0, 0, 7];
    let mut rd = Initiator::login(addr, &o).unwrap().expect("login");
    rd.clear_ua().unwrap();
    let r = rd
        .cmd(
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            &[],
            32,
        )
        .unwrap();
    let last_lba = u64::from_be_bytes(r.data[..8].try_into().unwrap());
    assert_eq!(
        (last_lba + 1) * 512,
        96 << 20,
        "the initiators see the new size"
    );
    for (base, last) in [(0u32, &la), (16 << 11, &lb)] {
        for (sl, &t) in last.iter().enumerate() {
            let r = rd
                .read10(base + sl as u32 * (SLOT as u32 / 512), (SLOT / 512) as u16)
                .unwrap();
            assert_eq!(r.status, GOOD);
            assert_eq!(slot_tag(&r.data), Some(t), "slot {sl} at LBA {base}");
        }
    }
    // The backups hold whole writes, none newer than the end.
    let frozen = std::fs::read(&frozen).unwrap();
    for (base, last) in [(0usize, &la), (8 << 20, &lb)] {
        for (sl, &t) in last.iter().enumerate() {
            let at = base + sl * SLOT;
            let got = slot_tag(&frozen[at..at + SLOT]).expect("a whole write in the checkpoint");
            assert!(got <= t, "the checkpoint holds a tag from after the end");
        }
    }
    let o = common::vstor(&["disk", "check", s(&backup)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bk = dir.path().join("backup.raw");
    ok(&[
        "disk",
        "read",
        s(&backup),
        "--length",
        "24M",
        "--output",
        s(&bk),
    ]);
    let bk = std::fs::read(&bk).unwrap();
    for (base, last) in [(0usize, &la), (8 << 20, &lb)] {
        for (sl, &t) in last.iter().enumerate() {
            let at = base + sl * SLOT;
            let got = slot_tag(&bk[at..at + SLOT]).expect("a whole write in the clone");
            assert!(got <= t);
        }
    }
    assert!(
        !img.exists() && !cp.exists(),
        "the old image and the merged child are gone"
    );
    assert!(
        Path::new(&format!("{}.vstor-pr", s(&moved))).exists()
            && !Path::new(&format!("{}.vstor-pr", s(&img))).exists(),
        "the reservation state did not follow the disk"
    );
    drop((rd, reg));
    d.shutdown();
    // Served again from the new file: the registration is there.
    let d = Daemon::start(dir.path(), &[format!("sh={},shared=on", s(&moved))]);
    let mut o = LoginOpts::new(IQN2, Some("iqn.2026-12.io.vstor:sh"));
    o.isid = [0x80, 0, 0, 0, 0, 3];
    let mut i = Initiator::login(d.portal(), &o).unwrap().expect("login");
    i.clear_ua().unwrap();
    assert_eq!(i.read_keys().unwrap().1, vec![key]);
    d.shutdown();
}
