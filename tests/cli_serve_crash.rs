//! `vstor serve` killed with SIGKILL while a client writes through NBD: everything flushed
//! before the kill is intact, the image checks clean after its log is replayed, and a
//! supervisor's immediate restart gets the image (its locks died with the process).
//!
//! The client is qemu-io, which nobody here wrote.

mod common;

use common::{ok, s};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tool(name: &str) -> &str {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{name} is missing: ./scripts/test installs it (Debian package qemu-utils)"
    );
    name
}

struct Daemon {
    child: Child,
    sock: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, target: &str) -> Daemon {
        let sock = dir.join("nbd.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(["serve", "--nbd", &format!("unix:{}", s(&sock))])
            .args(["--export", &format!("d0={target}")])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vstor serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        // A socket file left by a killed daemon refuses connections until the new one binds.
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("vstor serve exited with {st}: {err}");
            }
            assert!(Instant::now() < deadline, "vstor serve did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, sock }
    }

    /// SIGTERM, and wait for the graceful end.
    fn stop(mut self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let st = self.child.wait().unwrap();
        assert!(st.success(), "vstor serve ended with {st}");
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///d0?socket={}", s(&self.sock))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri).output().expect("run qemu-io")
}

#[test]
fn a_killed_daemon_keeps_what_was_flushed_and_restarts_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(&["disk", "create", s(&img), "--size", "64M"]);
    let d = Daemon::start(dir.path(), s(&img));
    // Flushed data: 4 MiB of 0xa1 at 0, and 1 MiB of 0xb2 at 40 MiB (another block).
    let o = qemu_io(
        &d.uri(),
        &["write -P 0xa1 0 4M", "write -P 0xb2 40M 1M", "flush"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A writer that keeps going (new blocks being allocated) when the daemon is killed.
    let uri = d.uri();
    let mut writer = Command::new(tool("qemu-io"))
        .args(["-f", "raw"])
        .args((0..24).flat_map(|i| ["-c".to_string(), format!("write -P 0xc3 {}M 1M", 8 + i)]))
        .arg(&uri)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let mut d = d;
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let _ = writer.wait();
    drop(d);

    // A supervisor restarts it at once: the image opens (the dead process's locks are gone,
    // or the open waits for them), its log is replayed, and the flushed data is there.
    let started = Instant::now();
    let d = Daemon::start(dir.path(), s(&img));
    assert!(started.elapsed() < Duration::from_secs(15));
    let o = qemu_io(&d.uri(), &["read -P 0xa1 0 4M", "read -P 0xb2 40M 1M"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !out.contains("Pattern verification failed"),
        "flushed data lost: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The partly written range holds, per 1 MiB, either the new pattern or zeroes, never
    // anything else.
    for i in 0..24 {
        let at = format!("{}M", 8 + i);
        let new = qemu_io(&d.uri(), &[&format!("read -P 0xc3 {at} 1M")]);
        let zero = qemu_io(&d.uri(), &[&format!("read -P 0 {at} 1M")]);
        let good = |o: &std::process::Output| {
            o.status.success()
                && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
        };
        assert!(
            good(&new) || good(&zero),
            "MiB {at} holds neither the write nor zeroes"
        );
    }
    d.stop();
    let report = ok(&["disk", "check", s(&img)]);
    assert!(report.contains("No errors were found"), "{report}");
}
