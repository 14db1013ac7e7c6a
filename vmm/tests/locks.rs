//! The VMM honours the same image locks as the CLI: a disk that `vstor-vmm` serves cannot be
//! written (or read) from `vstor` meanwhile, and nothing of the image changes; once the VMM is
//! gone the CLI gets it at once.

mod common;

use common::{vstor, vstor_bin};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn hash(p: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p).unwrap().hash(&mut h);
    h.finish()
}

#[test]
fn the_cli_cannot_open_a_disk_the_vmm_serves() {
    if let Err(e) = vstor_vmm::kvm_usable() {
        println!("SKIPPED: /dev/kvm cannot run a VM here ({e})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("served.vhdx");
    let disk_s = disk.to_str().unwrap();
    let sock = dir.path().join("api.sock");
    vstor(&["disk", "create", disk_s, "--size", "64M"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vstor-vmm"))
        .args(["--disk", disk_s, "--memory", "64M", "--api-socket"])
        .arg(&sock)
        .args(["--test-guest", "capacity 3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the guest never waited for a capacity change");
        if l.contains("waiting for a capacity change") {
            break;
        }
    }
    // The guest is up and waits: the VMM holds the image.
    let before = hash(&disk);
    for args in [
        &[
            "disk",
            "write",
            disk_s,
            "--offset",
            "0",
            "--length",
            "4k",
            "--pattern",
            "0x66",
        ][..],
        &["disk", "read", disk_s, "--length", "512"][..],
        &["disk", "resize", disk_s, "--size", "128M"][..],
    ] {
        let o = Command::new(vstor_bin()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(75), "{args:?}: {err}");
        assert!(
            err.contains("served.vhdx is in use by vstor-vmm")
                && err.contains(&format!("(pid {})", child.id())),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert_eq!(hash(&disk), before, "a refused open changed the image");
    // Let the guest finish: a resize through the API.
    let mut api = UnixStream::connect(&sock).unwrap();
    writeln!(
        api,
        r#"{{"jsonrpc":"2.0","id":1,"method":"disk.resize","params":{{"disk":0,"size":{}}}}}"#,
        96 << 20
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    // The VMM is gone: the CLI writes at once.
    vstor(&[
        "disk",
        "write",
        disk_s,
        "--offset",
        "0",
        "--length",
        "4k",
        "--pattern",
        "0x66",
    ]);
}
