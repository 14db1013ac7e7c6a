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
    let e = fails(&["disk", "resize", s(&p), "--size", "16M"]);
    assert!(
        e.contains("smallest size") && e.contains(&(41u64 << 20).to_string()),
        "{e}"
    );
    let t = ok(&["disk", "resize", s(&p), "--to-minimum"]);
    assert!(t.contains("-> 41 MiB"), "{t}");
    let info = ok(&["disk", "info", s(&p), "--json"]);
    assert_eq!(json(&info)["virtual_size"], 41u64 << 20, "{info}");
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
    for step in 1..=7 {
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
}
