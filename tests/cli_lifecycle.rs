//! `vstor disk resize|compact|convert|merge|checkpoint|clone|set` end to end.

mod common;

use common::{fails, ok, s};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn resize_compact_and_the_minimum() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("d.vhdx");
    ok(&[
        "disk",
        "create",
        s(&p),
        "--size",
        "64M",
        "--block-size",
        "1M",
    ]);
    ok(&[
        "disk",
        "write",
        s(&p),
        "--offset",
        "40M",
        "--length",
        "64k",
        "--pattern",
        "0xab",
    ]);
    let j = json(&ok(&["disk", "resize", s(&p), "--size", "1G", "--json"]));
    assert_eq!(j["new_size"], 1u64 << 30);
    assert!(j["ms"].as_f64().unwrap() >= 0.0);
    // The smallest size is the end of the data (not of its block).
    let min = (40u64 << 20) + (64 << 10);
    let e = fails(&["disk", "resize", s(&p), "--size", "16M"]);
    assert!(
        e.contains("smallest size") && e.contains(&min.to_string()),
        "{e}"
    );
    let t = ok(&["disk", "resize", s(&p), "--to-minimum"]);
    assert!(t.contains("-> 40.06 MiB"), "{t}");
    let info = ok(&["disk", "info", s(&p), "--json"]);
    assert_eq!(json(&info)["virtual_size"], min, "{info}");
    let dump = ok(&["disk", "read", s(&p), "--offset", "40M", "--length", "16"]);
    assert!(dump.contains("abab abab"), "{dump}");
    // Discard by writing zeros and compacting with --full.
    ok(&[
        "disk",
        "write",
        s(&p),
        "--offset",
        "40M",
        "--length",
        "64k",
        "--pattern",
        "0",
    ]);
    let j = json(&ok(&["disk", "compact", s(&p), "--full", "--json"]));
    assert_eq!(j["released_blocks"], 1, "{j}");
    assert!(j["new_file_size"].as_u64() < j["old_file_size"].as_u64());
    ok(&["disk", "check", s(&p)]);
    let e = fails(&["disk", "resize", s(&p)]);
    assert!(e.contains("--size") || e.contains("required"), "{e}");
}

#[test]
fn convert_round_trip_clone_and_checkpoint_merge() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("a.raw");
    ok(&["disk", "create", s(&raw), "--size", "32M"]);
    ok(&[
        "disk",
        "write",
        s(&raw),
        "--offset",
        "3M",
        "--length",
        "1M",
        "--pattern",
        "0x5a",
    ]);
    let v = d.path().join("a.vhdx");
    let j = json(&ok(&[
        "disk",
        "convert",
        s(&raw),
        s(&v),
        "--block-size",
        "1M",
        "--json",
    ]));
    assert_eq!(
        j["written_bytes"],
        1u64 << 20,
        "only the data is written: {j}"
    );
    let info = json(&ok(&["disk", "info", s(&v), "--json"]));
    assert_eq!(info["allocated_blocks"], 1, "{info}");
    let back = d.path().join("b.raw");
    ok(&["disk", "convert", s(&v), s(&back)]);
    assert!(std::fs::read(&raw).unwrap() == std::fs::read(&back).unwrap());
    let e = fails(&["disk", "convert", s(&v), s(&back)]);
    assert!(e.contains("b.raw"), "{e}");
    let e = fails(&[
        "disk",
        "convert",
        s(&v),
        s(&d.path().join("x.raw")),
        "--fixed",
    ]);
    assert!(e.contains("VHDX output"), "{e}");

    // Checkpoint, write into the child, clone the chain, merge it back.
    let j = json(&ok(&["disk", "checkpoint", s(&v), "--json"]));
    let child = j["child"].as_str().unwrap().to_string();
    assert!(child.ends_with(".avhdx"));
    ok(&[
        "disk",
        "write",
        &child,
        "--offset",
        "0",
        "--length",
        "4k",
        "--pattern",
        "0x11",
    ]);
    let c = d.path().join("clone.vhdx");
    ok(&["disk", "clone", &child, s(&c)]);
    let dump = ok(&["disk", "read", s(&c), "--offset", "0", "--length", "16"]);
    assert!(dump.contains("1111 1111"), "{dump}");
    let dump = ok(&["disk", "read", s(&v), "--offset", "0", "--length", "16"]);
    assert!(dump.contains("0000 0000"), "the parent is frozen: {dump}");
    let j = json(&ok(&["disk", "merge", &child, "--json"]));
    assert_eq!(j["copied_bytes"], 4096, "{j}");
    assert!(!std::path::Path::new(&child).exists());
    let dump = ok(&["disk", "read", s(&v), "--offset", "0", "--length", "16"]);
    assert!(dump.contains("1111 1111"), "{dump}");
    ok(&["disk", "check", s(&v)]);
    let e = fails(&["disk", "merge", s(&v)]);
    assert!(e.contains("not a differencing disk"), "{e}");
}

#[test]
fn set_parent_after_a_move_and_physical_sector_size() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.vhdx");
    let c = d.path().join("c.avhdx");
    ok(&["disk", "create", s(&p), "--size", "16M"]);
    ok(&["disk", "create", s(&c), "--parent", s(&p)]);
    let moved = d.path().join("moved.vhdx");
    std::fs::rename(&p, &moved).unwrap();
    let e = fails(&["disk", "info", s(&c)]);
    assert!(e.contains("not found"), "{e}");
    ok(&["disk", "set", s(&c), "--parent", s(&moved)]);
    let info = ok(&["disk", "info", s(&c)]);
    assert!(info.contains("moved.vhdx"), "{info}");
    let other = d.path().join("o.vhdx");
    ok(&["disk", "create", s(&other), "--size", "16M"]);
    let e = fails(&["disk", "set", s(&c), "--parent", s(&other)]);
    assert!(e.contains("changed since the child was created"), "{e}");
    let e = fails(&[
        "disk",
        "set",
        s(&moved),
        "--parent",
        s(&c),
        "--ignore-linkage",
    ]);
    assert!(
        e.contains("cycle") || e.contains("not a differencing"),
        "{e}"
    );
    ok(&["disk", "set", s(&moved), "--physical-sector-size", "4096"]);
    let j = json(&ok(&["disk", "info", s(&moved), "--json"]));
    assert_eq!(j["physical_sector_size"], 4096, "{j}");
    let e = fails(&["disk", "set", s(&moved)]);
    assert!(e.contains("nothing to set"), "{e}");
    ok(&["disk", "check", s(&c)]);
}

#[test]
fn help_shows_examples() {
    for cmd in [
        "resize",
        "compact",
        "convert",
        "merge",
        "checkpoint",
        "clone",
        "set",
    ] {
        let h = ok(&["disk", cmd, "--help"]);
        assert!(h.contains("Example"), "{cmd}: {h}");
    }
}

#[test]
fn check_repair_fixes_a_damaged_header_slot() {
    use std::io::{Seek, SeekFrom, Write};
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("d.vhdx");
    ok(&["disk", "create", s(&p), "--size", "16M"]);
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(64 * 1024 + 200)).unwrap();
    f.write_all(&[0xEE; 8]).unwrap();
    drop(f);
    let e = fails(&["disk", "check", s(&p)]);
    assert!(e.contains("not clean") || e.contains("error"), "{e}");
    let o = common::vstor(&["disk", "check", s(&p), "--repair"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("repaired: header slot"), "{err}");
    ok(&["disk", "check", s(&p)]);
}

#[test]
fn a_legacy_vhd_converts_to_vhdx_and_raw_like_qemu_img() {
    use std::process::Command;
    let d = tempfile::tempdir().unwrap();
    for sub in ["dynamic", "fixed"] {
        let vhd = d.path().join(format!("{sub}.vhd"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", "-o"])
            .arg(format!("subformat={sub},force_size=on"))
            .arg(&vhd)
            .arg("48M")
            .status()
            .expect("qemu-img runs");
        assert!(st.success());
        let st = Command::new("qemu-io")
            .args([
                "-f",
                "vpc",
                "-c",
                "write -P 0x3c 5M 1M",
                "-c",
                "write -P 0x4d 40M 4k",
            ])
            .arg(&vhd)
            .output()
            .expect("qemu-io runs");
        assert!(st.status.success());
        let ours = d.path().join(format!("{sub}.raw"));
        let theirs = d.path().join(format!("{sub}-qemu.raw"));
        ok(&["disk", "convert", s(&vhd), s(&ours)]);
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw"])
            .arg(&vhd)
            .arg(&theirs)
            .status()
            .unwrap();
        assert!(st.success());
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{sub}: vstor and qemu-img read the VHD differently"
        );
        let vhdx = d.path().join(format!("{sub}.vhdx"));
        ok(&["disk", "convert", s(&vhd), s(&vhdx)]);
        ok(&["disk", "check", s(&vhdx)]);
        let back = d.path().join(format!("{sub}-back.raw"));
        ok(&["disk", "convert", s(&vhdx), s(&back)]);
        assert!(std::fs::read(&back).unwrap() == std::fs::read(&theirs).unwrap());
        let info = json(&ok(&["disk", "info", s(&vhdx), "--json"]));
        assert_eq!(
            info["allocated_blocks"], 2,
            "{sub}: only the written blocks: {info}"
        );
    }
}

#[test]
fn the_demo_runs_every_step_and_everything_checks_clean() {
    let out = ok(&["demo"]);
    for step in 1..=10 {
        assert!(
            out.contains(&format!("\n{step}. ")) || out.starts_with(&format!("{step}. ")),
            "step {step} missing:\n{out}"
        );
    }
    assert!(!out.contains("NOT clean"), "{out}");
    assert!(out.contains("vstor disk check: clean"), "{out}");
    let last = out.lines().find(|l| l.starts_with("7. ")).unwrap();
    let (got, want) = last
        .rsplit_once("the last record reads ")
        .unwrap()
        .1
        .split_once(" (expected ")
        .unwrap();
    assert_eq!(got, want.trim_end_matches(')'), "{last}");
    assert!(
        out.ends_with("Done; the temporary files are removed.\n"),
        "{out}"
    );
    // The pool: a member lost, the data still there, then repaired.
    assert!(
        out.contains("the mirror reads all its data, the parity space reads all its data"),
        "{out}"
    );
    assert!(
        out.contains("mirror healthy, parity healthy; data intact"),
        "{out}"
    );
    // QoS: the capped run stays near its cap (burst allowance aside).
    let line = out.lines().find(|l| l.starts_with("9. QoS")).unwrap();
    let iops: Vec<f64> = line
        .split_whitespace()
        .zip(line.split_whitespace().skip(1))
        .filter(|(_, unit)| *unit == "IOPS")
        .map(|(n, _)| n.parse().unwrap())
        .collect();
    assert_eq!(iops.len(), 2, "{line}");
    assert!(iops[1] <= 480.0, "the cap of 400 did not hold: {line}");
    // The VMM: run where it can, or one line saying why not.
    let vmm = out.lines().find(|l| l.starts_with("10. VMM")).unwrap();
    assert!(
        vmm.ends_with("PASS") || vmm.contains("skipped:") || vmm.contains("could not run here:"),
        "{vmm}"
    );
}

/// Waits for `child` to exit, at most `secs` seconds; kills it and fails the test if it has not.
fn wait_within(child: &mut std::process::Child, secs: u64, what: &str) -> std::process::Output {
    let t = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {secs} s (hung)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut out = std::process::Output {
        status: child.wait().unwrap(),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read;
    if let Some(mut e) = child.stderr.take() {
        e.read_to_end(&mut out.stderr).unwrap();
    }
    out
}

/// A raw file of `mib` MiB full of non-zero data.
fn data_file(p: &std::path::Path, mib: usize) {
    use std::io::Write;
    let mut f = std::fs::File::create(p).unwrap();
    let chunk: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
}

#[test]
fn convert_and_clone_end_with_an_error_and_no_output_when_the_destination_cannot_grow() {
    use std::os::unix::process::CommandExt;
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    data_file(&src, 160);
    let vhdx = d.path().join("src.vhdx");
    ok(&["disk", "convert", s(&src), s(&vhdx)]);
    for (verb, from, dst) in [
        ("convert", &src, "dst.vhdx"),
        ("convert", &src, "dst.raw"),
        ("clone", &vhdx, "clone.vhdx"),
    ] {
        let dst = d.path().join(dst);
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vstor"));
        cmd.args(["disk", verb, s(from), s(&dst)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // SAFETY: between fork and exec the closure calls only setrlimit and signal, which are
        // async-signal-safe, on values it owns.
        unsafe {
            cmd.pre_exec(|| {
                // A 64 MiB file-size limit (as `ulimit -f 65536`): writes past it fail with
                // EFBIG, SIGXFSZ ignored as a shell that traps it does.
                let lim = libc::rlimit {
                    rlim_cur: 64 << 20,
                    rlim_max: 64 << 20,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let out = wait_within(&mut child, 60, &format!("{verb} past the file-size limit"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("error"), "{err}");
        assert!(
            !dst.exists(),
            "the partial output {} is left",
            dst.display()
        );
    }
}

#[test]
fn ctrl_c_stops_a_convert_promptly_and_removes_its_output() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    data_file(&src, 1024);
    let dst = d.path().join("dst.vhdx");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(["disk", "convert", s(&src), s(&dst)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the copy is under way (the output has grown).
    let t = std::time::Instant::now();
    while std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0) < 64 << 20 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the convert ended before it could be interrupted"
        );
        assert!(t.elapsed().as_secs() < 60, "the convert does not start");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill() on the id of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(rc, 0);
    let out = wait_within(&mut child, 20, "convert after SIGINT");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(!dst.exists(), "the partial output is left");
}

#[test]
fn convert_keeps_the_tail_of_a_file_that_is_not_whole_sectors() {
    let d = tempfile::tempdir().unwrap();
    let odd = d.path().join("odd.raw");
    let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8 + 1).collect();
    std::fs::write(&odd, &bytes).unwrap();
    let mut want = bytes.clone();
    want.resize(1024, 0);
    // raw -> raw: rounded up to the next sector, every byte kept (as qemu-img convert does).
    let raw = d.path().join("out.raw");
    let j = json(&ok(&["disk", "convert", s(&odd), s(&raw), "--json"]));
    assert_eq!(j["size"], 1024, "{j}");
    assert_eq!(std::fs::read(&raw).unwrap(), want);
    let theirs = d.path().join("qemu.raw");
    let q = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", s(&odd), s(&theirs)])
        .status()
        .unwrap();
    assert!(q.success());
    assert_eq!(
        std::fs::read(&theirs).unwrap(),
        want,
        "qemu-img does the same"
    );
    // raw -> VHDX -> raw.
    let vhdx = d.path().join("out.vhdx");
    let t = ok(&["disk", "convert", s(&odd), s(&vhdx)]);
    assert!(t.contains("1 KiB virtual"), "{t}");
    let info = json(&ok(&["disk", "info", s(&vhdx), "--json"]));
    assert_eq!(info["virtual_size"], 1024, "{info}");
    let back = d.path().join("back.raw");
    ok(&["disk", "convert", s(&vhdx), s(&back)]);
    assert_eq!(std::fs::read(&back).unwrap(), want);
    // info says what is past the device's end instead of a silently smaller size.
    let info = json(&ok(&["disk", "info", s(&odd), "--json"]));
    assert_eq!(info["file_size"], 1000, "{info}");
    let note = info["note"].as_str().unwrap_or_else(|| panic!("{info}"));
    assert!(
        note.contains("1000 bytes") && note.contains("488"),
        "{note}"
    );
    let text = ok(&["disk", "info", s(&odd)]);
    assert!(
        text.contains("note:") && text.contains("not served"),
        "{text}"
    );
    // A file of whole sectors has no note.
    let info = json(&ok(&["disk", "info", s(&raw), "--json"]));
    assert!(info.get("note").is_none(), "{info}");
}

#[test]
fn a_parent_named_with_a_backslash_works_from_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p\\q.vhdx");
    let c = d.path().join("c.avhdx");
    ok(&["disk", "create", s(&p), "--size", "16M"]);
    ok(&[
        "disk",
        "write",
        s(&p),
        "--offset",
        "1M",
        "--length",
        "4k",
        "--pattern",
        "0x71",
    ]);
    ok(&["disk", "create", s(&c), "--parent", s(&p)]);
    ok(&[
        "disk",
        "write",
        s(&c),
        "--offset",
        "0",
        "--length",
        "4k",
        "--pattern",
        "0x5c",
    ]);
    let dump = ok(&["disk", "read", s(&c), "--offset", "0", "--length", "16"]);
    assert!(dump.contains("5c5c 5c5c"), "{dump}");
    let dump = ok(&["disk", "read", s(&c), "--offset", "1M", "--length", "16"]);
    assert!(dump.contains("7171 7171"), "{dump}");
    ok(&["disk", "check", s(&c)]);
}

#[test]
fn ctrl_c_stops_a_merge_whose_siblings_are_refused_until_it_is_run_again() {
    let d = tempfile::tempdir().unwrap();
    let (base, a, b) = (
        d.path().join("base.vhdx"),
        d.path().join("a.avhdx"),
        d.path().join("b.avhdx"),
    );
    ok(&[
        "disk",
        "create",
        s(&base),
        "--size",
        "1G",
        "--block-size",
        "1M",
    ]);
    ok(&["disk", "create", s(&a), "--parent", s(&base)]);
    ok(&["disk", "create", s(&b), "--parent", s(&base)]);
    ok(&[
        "disk",
        "write",
        s(&a),
        "--offset",
        "0",
        "--length",
        "256M",
        "--pattern",
        "0xaa",
    ]);
    let before = std::fs::metadata(&base).unwrap().len();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(["disk", "merge", s(&a)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the base has received some of a's data.
    let t = std::time::Instant::now();
    while std::fs::metadata(&base).unwrap().len() < before + (16 << 20) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the merge ended before it could be interrupted"
        );
        assert!(t.elapsed().as_secs() < 60, "the merge does not start");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill() on the id of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(rc, 0);
    let out = wait_within(&mut child, 20, "merge after SIGINT");
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The sibling is refused (it would read a's data through the base), and says what to run.
    let e = fails(&["disk", "read", s(&b), "--offset", "0", "--length", "16"]);
    assert!(
        e.contains("middle of a merge") && e.contains(&format!("vstor disk merge {}", s(&a))),
        "{e}"
    );
    let o = common::vstor(&["disk", "check", s(&b)]);
    assert!(!o.status.success(), "check of the sibling says clean");
    // The merged disk reads as it did; the merge runs again to its end.
    let dump = ok(&["disk", "read", s(&a), "--offset", "0", "--length", "16"]);
    assert!(dump.contains("aaaa aaaa"), "{dump}");
    ok(&["disk", "merge", s(&a)]);
    assert!(!a.exists());
    let dump = ok(&[
        "disk",
        "read",
        s(&base),
        "--offset",
        "255M",
        "--length",
        "16",
    ]);
    assert!(dump.contains("aaaa aaaa"), "{dump}");
    // The sibling no longer matches its parent.
    let e = fails(&["disk", "read", s(&b), "--offset", "0", "--length", "16"]);
    assert!(e.contains("has changed"), "{e}");
}
