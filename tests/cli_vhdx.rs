//! End-to-end tests of the VHDX commands: create (dynamic, fixed, differencing), info, check,
//! read and write through a chain, and the errors an operator can run into.

mod common;

use common::{fails, ok, s, vstor};

#[test]
fn chain_create_write_read_info_check() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    let out = ok(&[
        "disk",
        "create",
        s(&base),
        "--size",
        "64M",
        "--block-size",
        "1M",
    ]);
    assert!(out.contains("VHDX dynamic, 64 MiB, 1 MiB blocks"), "{out}");
    ok(&[
        "disk",
        "write",
        s(&base),
        "--offset",
        "1000",
        "--length",
        "5000",
        "--pattern",
        "0xab",
    ]);
    let out = ok(&["disk", "create", s(&child), "--parent", s(&base)]);
    assert!(out.contains("differencing"), "{out}");
    ok(&[
        "disk",
        "write",
        s(&child),
        "--offset",
        "2048",
        "--length",
        "512",
        "--pattern",
        "0x11",
    ]);
    let dump = ok(&[
        "disk",
        "read",
        s(&child),
        "--offset",
        "2032",
        "--length",
        "32",
    ]);
    assert_eq!(
        dump.lines().next().unwrap(),
        "000007f0: abab abab abab abab abab abab abab abab  ................"
    );
    assert!(
        dump.lines()
            .nth(1)
            .unwrap()
            .starts_with("00000800: 1111 1111"),
        "{dump}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["disk", "info", s(&child), "--json"])).unwrap();
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["type"], "differencing");
    assert_eq!(info["virtual_size"], 64 << 20);
    assert_eq!(info["allocated_blocks"], 1);
    assert_eq!(info["chain"].as_array().unwrap().len(), 2);
    assert!(info["parent"].as_str().unwrap().ends_with("base.vhdx"));
    assert!(info["log_guid"].is_null(), "a closed image needs no replay");
    let out = ok(&["disk", "check", s(&child)]);
    assert!(out.contains("No errors were found"), "{out}");
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["disk", "check", s(&base), "--json"])).unwrap();
    assert_eq!(j["clean"], true);
    assert_eq!(j["allocated_blocks"], 1);
}

#[test]
fn fixed_disk_and_sector_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f.vhdx");
    ok(&[
        "disk",
        "create",
        s(&f),
        "--size",
        "8M",
        "--fixed",
        "--block-size",
        "2M",
        "--logical-sector-size",
        "4096",
        "--preallocate",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["disk", "info", s(&f), "--json"])).unwrap();
    assert_eq!(info["type"], "fixed");
    assert_eq!(info["allocated_blocks"], 4);
    assert_eq!(info["logical_sector_size"], 4096);
    assert!(
        info["allocated_bytes"].as_u64().unwrap() >= 8 << 20,
        "preallocated"
    );
    ok(&["disk", "check", s(&f)]);
}

#[test]
fn operator_errors_are_one_line_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.vhdx");
    ok(&["disk", "create", s(&a), "--size", "16M"]);
    let before = std::fs::read(&a).unwrap();
    let e = fails(&["disk", "create", s(&a), "--size", "16M"]);
    assert!(e.contains("exists"), "{e}");
    assert_eq!(std::fs::read(&a).unwrap(), before);
    let e = fails(&[
        "disk",
        "create",
        s(&dir.path().join("b.vhdx")),
        "--size",
        "16M",
        "--block-size",
        "3M",
    ]);
    assert!(e.contains("block size"), "{e}");
    assert!(!dir.path().join("b.vhdx").exists());
    let e = fails(&[
        "disk",
        "create",
        s(&dir.path().join("c.vhdx")),
        "--parent",
        s(&a),
        "--size",
        "1G",
    ]);
    assert!(e.contains("--size"), "{e}");
    let e = fails(&[
        "disk",
        "create",
        s(&dir.path().join("d.raw")),
        "--size",
        "16M",
        "--fixed",
    ]);
    assert!(e.contains("VHDX"), "{e}");
    // A child whose parent is gone names the paths it tried.
    let c = dir.path().join("c.avhdx");
    ok(&["disk", "create", s(&c), "--parent", s(&a)]);
    std::fs::rename(&a, dir.path().join("moved.vhdx")).unwrap();
    let e = fails(&["disk", "read", s(&c), "--length", "512"]);
    assert!(e.contains("parent") && e.contains("a.vhdx"), "{e}");
    // A damaged image: check reports it and exits non-zero.
    let m = dir.path().join("moved.vhdx");
    let mut bytes = std::fs::read(&m).unwrap();
    bytes[192 * 1024 + 20] ^= 0xff; // first region table copy
    bytes[256 * 1024 + 20] ^= 0xff; // and the second
    std::fs::write(&m, &bytes).unwrap();
    let o = vstor(&["disk", "check", s(&m)]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("ERROR") && out.contains("region table"),
        "{out}"
    );
    let e = fails(&["disk", "info", s(&m)]);
    assert!(
        e.contains("region table") && e.contains("offset 196608"),
        "{e}"
    );
}
