//! End-to-end tests of `vstor pool ...`, `vstor space ...` and the `pool:DIR/NAME` target.

mod common;

use common::{fails, ok, s};

/// A pool of `disks` 16 MiB members (1 MiB slabs) in `d` with one 2 MiB space `name` of
/// `resiliency` over `columns` columns.
fn small_pool(d: &str, disks: usize, name: &str, resiliency: &str, columns: usize) {
    let (disks, columns) = (disks.to_string(), columns.to_string());
    ok(&[
        "pool",
        "create",
        d,
        "--disks",
        &disks,
        "--disk-size",
        "16M",
        "--slab-size",
        "1M",
    ]);
    ok(&[
        "space",
        "create",
        d,
        name,
        "--size",
        "2M",
        "--resiliency",
        resiliency,
        "--columns",
        &columns,
    ]);
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("json")
}

#[test]
fn create_a_pool_and_spaces_and_use_them_as_targets() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    let out = ok(&[
        "pool",
        "create",
        d,
        "--disks",
        "4",
        "--disk-size",
        "32M",
        "--slab-size",
        "1M",
    ]);
    assert!(
        out.contains("slab size:   1 MiB") || out.contains("slab size:"),
        "{out}"
    );
    for i in 0..4 {
        assert!(dir.join(format!("disk{i}.raw")).exists());
    }
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert_eq!(info["members"].as_array().unwrap().len(), 4);
    assert_eq!(info["slab_size"], 1 << 20);
    assert_eq!(
        (&info["format_version"], &info["parity_journal"]),
        (&4.into(), &true.into())
    );
    assert!(info["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["state"] == "healthy"));

    for (name, args) in [
        ("m2", vec!["--resiliency", "mirror"]),
        (
            "m3",
            vec!["--resiliency", "mirror", "--copies", "3", "--columns", "1"],
        ),
        ("p1", vec!["--resiliency", "parity", "--interleave", "64k"]),
        (
            "p2",
            vec![
                "--resiliency",
                "parity",
                "--redundancy",
                "2",
                "--columns",
                "4",
            ],
        ),
        (
            "st",
            vec!["--resiliency", "simple", "--provisioning", "fixed"],
        ),
    ] {
        let mut a = vec!["space", "create", d, name, "--size", "4M", "--json"];
        a.extend(args);
        let sp = json(&ok(&a));
        assert_eq!(sp["name"], name);
        assert_eq!(sp["size"], 4 << 20);
        assert_eq!(sp["health"], "healthy");
    }
    let list = json(&ok(&["space", "list", d, "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 5);
    let st = json(&ok(&["space", "info", d, "st", "--json"]));
    assert_eq!(st["provisioning"], "fixed");
    assert_eq!(st["allocated_extents"], st["extents"]);
    let m3 = json(&ok(&["space", "info", d, "m3", "--json"]));
    assert_eq!(m3["copies"], 3);
    assert_eq!(m3["disks_per_extent"], 3);
    let text = ok(&["space", "list", d]);
    assert!(
        text.contains("2-way mirror") && text.contains("dual parity"),
        "{text}"
    );

    // Each space is a target: write a pattern, read it back.
    for name in ["m2", "m3", "p1", "p2", "st"] {
        let target = format!("pool:{d}/{name}");
        ok(&[
            "disk",
            "write",
            &target,
            "--offset",
            "12k",
            "--length",
            "100k",
            "--pattern",
            "0x5a",
        ]);
        let dump = ok(&["disk", "read", &target, "--offset", "12k", "--length", "16"]);
        assert!(
            dump.contains("5a5a 5a5a") || dump.contains("5a 5a"),
            "{name}: {dump}"
        );
        let zero = ok(&["disk", "read", &target, "--offset", "0", "--length", "16"]);
        assert!(!zero.contains("5a"), "{name}: {zero}");
        let info = json(&ok(&["disk", "info", &target, "--json"]));
        assert_eq!(
            info["capacity"].as_u64().or(info["virtual_size"].as_u64()),
            Some(4 << 20),
            "{info}"
        );
    }
    let bench = ok(&[
        "disk",
        "bench",
        &format!("pool:{d}/p1"),
        "-c",
        "200",
        "-d",
        "8",
        "-s",
        "4k",
        "-w",
    ]);
    assert!(!bench.is_empty());

    ok(&["space", "delete", d, "m3"]);
    let list = json(&ok(&["space", "list", d, "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 4);
    let e = fails(&["space", "info", d, "m3"]);
    assert!(e.contains("no space named 'm3'"), "{e}");
    let e = fails(&[
        "disk",
        "read",
        &format!("pool:{d}/m3"),
        "--offset",
        "0",
        "--length",
        "16",
    ]);
    assert!(e.contains("no space named 'm3'"), "{e}");
}

#[test]
fn a_missing_member_is_reported_and_mirror_data_survives() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    small_pool(d, 3, "m", "mirror", 1);
    let target = format!("pool:{d}/m");
    ok(&[
        "disk",
        "write",
        &target,
        "--offset",
        "0",
        "--length",
        "64k",
        "--pattern",
        "0xc3",
    ]);
    let info = json(&ok(&["space", "info", d, "m", "--json"]));
    assert_eq!(info["allocated_extents"], 1);
    // Take away a member that holds a copy.
    let pool = json(&ok(&["pool", "info", d, "--json"]));
    let holder = pool["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["slabs_used"].as_u64().unwrap() > 0)
        .unwrap()["disk"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::rename(&holder, t.path().join("away.raw")).unwrap();
    let pool = json(&ok(&["pool", "info", d, "--json"]));
    assert!(pool["members"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["state"] == "missing"));
    assert!(pool["notes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n.as_str().unwrap().contains("missing")));
    let sp = json(&ok(&["space", "info", d, "m", "--json"]));
    assert_eq!(sp["health"], "degraded");
    let dump = ok(&["disk", "read", &target, "--offset", "0", "--length", "16"]);
    assert!(dump.contains("c3c3") || dump.contains("c3 c3"), "{dump}");
    // A degraded write records the member as failed; when it comes back it is stale.
    ok(&[
        "disk",
        "write",
        &target,
        "--offset",
        "0",
        "--length",
        "4k",
        "--pattern",
        "0x11",
    ]);
    std::fs::rename(t.path().join("away.raw"), &holder).unwrap();
    let pool = json(&ok(&["pool", "info", d, "--json"]));
    assert!(
        pool["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["state"] == "failed"),
        "{pool}"
    );
    let dump = ok(&["disk", "read", &target, "--offset", "0", "--length", "16"]);
    assert!(dump.contains("1111") || dump.contains("11 11"), "{dump}");
}

#[test]
fn bad_input_fails_with_one_line() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    let e = fails(&["pool", "create", d, "--disks", "2", "--disk-size", "1M"]);
    assert!(e.contains("too small"), "{e}");
    assert!(
        !dir.join("disk0.raw").exists(),
        "a refused create left files"
    );
    let e = fails(&[
        "pool",
        "create",
        d,
        "--disks",
        "2",
        "--disk-size",
        "8M",
        "--slab-size",
        "3M",
    ]);
    assert!(e.contains("slab size"), "{e}");
    ok(&[
        "pool",
        "create",
        d,
        "--disks",
        "2",
        "--disk-size",
        "8M",
        "--slab-size",
        "1M",
    ]);
    let e = fails(&[
        "pool",
        "create",
        d,
        "--disks",
        "2",
        "--disk-size",
        "8M",
        "--slab-size",
        "1M",
    ]);
    assert!(e.contains("exists already"), "{e}");
    let e = fails(&[
        "space",
        "create",
        d,
        "p",
        "--size",
        "1M",
        "--resiliency",
        "parity",
    ]);
    assert!(e.contains("columns") || e.contains("needs"), "{e}");
    let e = fails(&[
        "space",
        "create",
        d,
        "m",
        "--size",
        "1M",
        "--resiliency",
        "mirror",
        "--copies",
        "3",
    ]);
    assert!(e.contains("needs 3 disks"), "{e}");
    let e = fails(&[
        "space",
        "create",
        d,
        "m",
        "--size",
        "1M",
        "--resiliency",
        "mirror",
        "--redundancy",
        "2",
    ]);
    assert!(e.contains("--copies"), "{e}");
    let e = fails(&[
        "space",
        "create",
        d,
        "bad/name",
        "--size",
        "1M",
        "--resiliency",
        "simple",
    ]);
    assert!(e.contains("not a valid space name"), "{e}");
    assert_eq!(
        json(&ok(&["space", "list", d, "--json"]))
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let e = fails(&["pool", "info", s(&t.path().join("nothing"))]);
    assert!(e.contains("nothing"), "{e}");
    // A member of another pool in the directory.
    let other = t.path().join("other");
    ok(&[
        "pool",
        "create",
        s(&other),
        "--disks",
        "1",
        "--disk-size",
        "8M",
        "--slab-size",
        "1M",
    ]);
    std::fs::copy(other.join("disk0.raw"), dir.join("stray.raw")).unwrap();
    let e = fails(&["pool", "info", d]);
    assert!(e.contains("belongs to pool"), "{e}");
}

#[test]
fn repair_after_a_failure_and_retire_remove_a_disk() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    ok(&[
        "pool",
        "create",
        d,
        "--disks",
        "3",
        "--disk-size",
        "16M",
        "--slab-size",
        "1M",
    ]);
    ok(&[
        "space",
        "create",
        d,
        "p",
        "--size",
        "4M",
        "--resiliency",
        "parity",
        "--interleave",
        "16k",
    ]);
    let target = format!("pool:{d}/p");
    ok(&[
        "disk",
        "write",
        &target,
        "--offset",
        "0",
        "--length",
        "4M",
        "--pattern",
        "0x77",
    ]);
    // Lose disk1, write degraded, add a disk, repair.
    let away = t.path().join("away.raw");
    std::fs::rename(dir.join("disk1.raw"), &away).unwrap();
    ok(&[
        "disk",
        "write",
        &target,
        "--offset",
        "8k",
        "--length",
        "8k",
        "--pattern",
        "0x12",
    ]);
    let pool = json(&ok(&[
        "pool",
        "add-disk",
        d,
        "--disk-size",
        "16M",
        "--json",
    ]));
    assert_eq!(pool["members"].as_array().unwrap().len(), 4);
    assert!(
        dir.join("disk1.raw").exists(),
        "the new disk takes the first free name"
    );
    let r = json(&ok(&["space", "repair", d, "--json"]));
    assert!(r["slabs"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["health"][0]["health"], "healthy");
    let sp = json(&ok(&["space", "info", d, "p", "--json"]));
    assert_eq!(sp["health"], "healthy");
    let dump = ok(&["disk", "read", &target, "--offset", "8k", "--length", "16"]);
    assert!(dump.contains("1212") || dump.contains("12 12"), "{dump}");
    let dump = ok(&["disk", "read", &target, "--offset", "1M", "--length", "16"]);
    assert!(dump.contains("7777") || dump.contains("77 77"), "{dump}");
    // The lost member holds nothing now: remove it.
    let pool = json(&ok(&["pool", "info", d, "--json"]));
    let lost = pool["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["state"] == "missing")
        .unwrap()["index"]
        .as_u64()
        .unwrap()
        .to_string();
    ok(&["pool", "remove-disk", d, &lost]);
    // Retire disk0, repair moves its slabs off, then remove it.
    ok(&["pool", "add-disk", d, "--disk-size", "16M"]);
    ok(&["pool", "retire-disk", d, "disk0.raw"]);
    let e = fails(&["pool", "remove-disk", d, "disk0.raw"]);
    assert!(e.contains("repair first"), "{e}");
    ok(&["space", "repair", d, "p"]);
    let out = ok(&["pool", "remove-disk", d, "disk0.raw"]);
    assert!(out.contains("deleted"), "{out}");
    assert!(
        !dir.join("disk0.raw").exists(),
        "remove-disk deletes the file"
    );
    let pool = json(&ok(&["pool", "info", d, "--json"]));
    assert!(pool["notes"].as_array().unwrap().is_empty(), "{pool}");
    let dump = ok(&["disk", "read", &target, "--offset", "3M", "--length", "16"]);
    assert!(dump.contains("7777") || dump.contains("77 77"), "{dump}");
    let r = json(&ok(&["space", "scrub", d, "--json"]));
    assert!(r["chunks"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["repaired"], 0, "{r}");
    let e = fails(&["pool", "retire-disk", d, "nosuch.raw"]);
    assert!(e.contains("no member 'nosuch.raw'"), "{e}");
}

#[test]
fn a_disk_that_came_back_is_reset_and_rebuilt() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    ok(&[
        "pool",
        "create",
        d,
        "--disks",
        "3",
        "--disk-size",
        "12M",
        "--slab-size",
        "1M",
    ]);
    ok(&[
        "space",
        "create",
        d,
        "p",
        "--size",
        "2M",
        "--resiliency",
        "parity",
        "--interleave",
        "16k",
    ]);
    let target = format!("pool:{d}/p");
    ok(&[
        "disk",
        "write",
        &target,
        "--offset",
        "0",
        "--length",
        "2M",
        "--pattern",
        "0x44",
    ]);
    // An old copy of disk2 is kept; the pool is written while disk2 is away; the old copy
    // comes back (older than the metadata disk2 was failed at: it cannot be caught up).
    std::fs::copy(dir.join("disk2.raw"), t.path().join("old.raw")).unwrap();
    ok(&[
        "disk",
        "write",
        &target,
        "--offset",
        "1M",
        "--length",
        "4k",
        "--pattern",
        "0x44",
    ]);
    std::fs::rename(dir.join("disk2.raw"), t.path().join("away.raw")).unwrap();
    ok(&[
        "disk",
        "write",
        &target,
        "--offset",
        "0",
        "--length",
        "64k",
        "--pattern",
        "0x55",
    ]);
    std::fs::rename(t.path().join("old.raw"), dir.join("disk2.raw")).unwrap();
    // Without taking the disk back, there is nowhere to rebuild to.
    let e = fails(&["space", "repair", d, "--keep-failed"]);
    assert!(e.contains("does not use yet"), "{e}");
    // By hand, as before `space repair` took disks back by itself.
    let out = ok(&["pool", "reset-disk", d, "disk2.raw"]);
    assert!(out.contains("member 2 is back as member 3"), "{out}");
    ok(&["space", "repair", d]);
    ok(&["pool", "remove-disk", d, "2"]);
    let sp = json(&ok(&["space", "info", d, "p", "--json"]));
    assert_eq!(sp["health"], "healthy");
    let dump = ok(&["disk", "read", &target, "--offset", "0", "--length", "16"]);
    assert!(dump.contains("5555") || dump.contains("55 55"), "{dump}");
    let dump = ok(&["disk", "read", &target, "--offset", "1M", "--length", "16"]);
    assert!(dump.contains("4444") || dump.contains("44 44"), "{dump}");
}

/// Issue 20 §1: an old copy of a member put back while the pool is closed is never read as
/// current (for mirror, 3-way mirror, parity and dual parity): the read returns what was last
/// written, the open calls the member stale, and scrub does not copy its data over the good
/// copies (with the stale member gone afterwards, the data still reads right).
#[test]
fn an_old_copy_of_a_member_put_back_is_not_read_and_not_spread() {
    for (res, extra) in [
        ("mirror", vec![]),
        ("mirror", vec!["--copies", "3"]),
        ("parity", vec![]),
        ("parity", vec!["--redundancy", "2"]),
    ] {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("pool");
        let d = s(&dir);
        ok(&[
            "pool",
            "create",
            d,
            "--disks",
            "4",
            "--disk-size",
            "40M",
            "--slab-size",
            "4M",
        ]);
        let mut args = vec![
            "space",
            "create",
            d,
            "m",
            "--size",
            "16M",
            "--resiliency",
            res,
        ];
        args.extend(extra.iter().copied());
        ok(&args);
        let target = format!("pool:{d}/m");
        let write = |len: &str, pattern: &str| {
            ok(&[
                "disk",
                "write",
                &target,
                "--length",
                len,
                "--pattern",
                pattern,
            ])
        };
        write("4M", "0xaa");
        let old = t.path().join("d0.old");
        std::fs::copy(dir.join("disk0.raw"), &old).unwrap();
        write("12M", "0xbb");
        std::fs::copy(&old, dir.join("disk0.raw")).unwrap();
        let out_file = t.path().join("a.bin");
        ok(&[
            "disk",
            "read",
            &target,
            "--length",
            "12M",
            "--output",
            s(&out_file),
        ]);
        let got = std::fs::read(&out_file).unwrap();
        assert!(
            got.iter().all(|&b| b == 0xbb),
            "{res} {extra:?}: stale data read"
        );
        let info = ok(&["pool", "info", d]);
        assert!(info.contains("stale"), "{res} {extra:?}: {info}");
        // Scrub loses nothing (a parity space with a member out cannot check its parity:
        // that, and only that, makes it exit 1).
        let o = common::vstor(&["space", "scrub", d]);
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(out.contains(" 0 lost"), "{res} {extra:?}: {out} {err}");
        assert!(
            o.status.success() || (res == "parity" && err.contains("could not be checked")),
            "{res} {extra:?}: {out} {err}"
        );
        // The stale member away: the others hold 0xbb.
        std::fs::remove_file(dir.join("disk0.raw")).unwrap();
        ok(&[
            "disk",
            "read",
            &target,
            "--length",
            "12M",
            "--output",
            s(&out_file),
        ]);
        let got = std::fs::read(&out_file).unwrap();
        assert!(
            got.iter().all(|&b| b == 0xbb),
            "{res} {extra:?}: scrub spread stale data"
        );
    }
}

/// Issue 20 §2: a member truncated to 8 MiB and extended again (its data and its checksum
/// area past 8 MiB read as zeroes) is caught, not served: the read returns the written bytes
/// (from the other copies or parity) and scrub heals the member from them, losing nothing.
#[test]
fn a_member_that_reads_zeroes_past_8m_is_caught_not_served() {
    for (res, extra) in [
        ("mirror", vec![]),
        ("parity", vec![]),
        ("parity", vec!["--redundancy", "2"]),
    ] {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("pool");
        let d = s(&dir);
        ok(&[
            "pool",
            "create",
            d,
            "--disks",
            "4",
            "--disk-size",
            "40M",
            "--slab-size",
            "4M",
        ]);
        let mut args = vec![
            "space",
            "create",
            d,
            "m",
            "--size",
            "12M",
            "--resiliency",
            res,
        ];
        args.extend(extra.iter().copied());
        ok(&args);
        let target = format!("pool:{d}/m");
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..12 << 20)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        let input = t.path().join("b.ref");
        std::fs::write(&input, &data).unwrap();
        ok(&["disk", "write", &target, "--input", s(&input)]);
        let member = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("disk0.raw"))
            .unwrap();
        member.set_len(8 << 20).unwrap();
        member.set_len(40 << 20).unwrap();
        drop(member);
        let out_file = t.path().join("b.out");
        ok(&[
            "disk",
            "read",
            &target,
            "--length",
            "12M",
            "--output",
            s(&out_file),
        ]);
        assert!(
            std::fs::read(&out_file).unwrap() == data,
            "{res} {extra:?}: zeroes served"
        );
        let out = ok(&["space", "scrub", d]);
        assert!(out.contains(" 0 lost"), "{res} {extra:?}: {out}");
        // Healed: with another member gone, the data still reads right.
        std::fs::remove_file(dir.join("disk1.raw")).unwrap();
        ok(&[
            "disk",
            "read",
            &target,
            "--length",
            "12M",
            "--output",
            s(&out_file),
        ]);
        assert!(
            std::fs::read(&out_file).unwrap() == data,
            "{res} {extra:?}: after scrub, without disk1"
        );
    }
}

#[test]
fn a_pool_of_existing_devices_named_by_a_directory() {
    let t = tempfile::tempdir().unwrap();
    let devs: Vec<String> = (0..3)
        .map(|i| {
            let p = t.path().join(format!("dev{i}.img"));
            std::fs::File::create(&p)
                .unwrap()
                .set_len(12 << 20)
                .unwrap();
            s(&p).to_string()
        })
        .collect();
    let dir = t.path().join("pool");
    let d = s(&dir);
    let mut a = vec!["pool", "create", d, "--slab-size", "1M", "--json"];
    for dv in &devs {
        a.extend(["--device", dv.as_str()]);
    }
    let info = json(&ok(&a));
    assert_eq!(info["members"].as_array().unwrap().len(), 3);
    assert!(dir.join("pool.devices").exists());
    ok(&[
        "space",
        "create",
        d,
        "m",
        "--size",
        "2M",
        "--resiliency",
        "mirror",
        "--columns",
        "1",
    ]);
    let target = format!("pool:{d}/m");
    ok(&[
        "disk",
        "write",
        &target,
        "--offset",
        "0",
        "--length",
        "8k",
        "--pattern",
        "0x6b",
    ]);
    let dump = ok(&["disk", "read", &target, "--offset", "4k", "--length", "16"]);
    assert!(dump.contains("6b6b") || dump.contains("6b 6b"), "{dump}");
    // A listed device that is gone is a missing member, not an error.
    std::fs::remove_file(&devs[0]).unwrap();
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert!(
        info["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("pool.devices")),
        "{info}"
    );
    // Devices already in a pool are refused, and --disks does not mix with --device.
    let other = t.path().join("other");
    let e = fails(&["pool", "create", s(&other), "--device", &devs[1]]);
    assert!(e.contains("already a member of pool"), "{e}");
    assert!(!other.join("pool.devices").exists());
    let e = fails(&[
        "pool",
        "create",
        s(&other),
        "--device",
        &devs[1],
        "--disks",
        "2",
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
}

#[test]
fn a_split_brain_is_refused_until_a_side_is_chosen() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    small_pool(d, 2, "m", "mirror", 1);
    let target = format!("pool:{d}/m");
    let write = |pattern: &str| {
        ok(&[
            "disk",
            "write",
            &target,
            "--offset",
            "0",
            "--length",
            "8k",
            "--pattern",
            pattern,
        ]);
    };
    write("0x77");
    // Each disk takes writes while the other is away.
    for (away, pattern) in [("disk1.raw", "0x12"), ("disk0.raw", "0x34")] {
        let aside = t.path().join(away);
        std::fs::rename(dir.join(away), &aside).unwrap();
        write(pattern);
        std::fs::rename(&aside, dir.join(away)).unwrap();
    }
    let e = fails(&["pool", "info", d]);
    assert!(
        e.contains("split brain") && e.contains("disk0.raw") && e.contains("disk1.raw"),
        "{e}"
    );
    // With --keep-failed the choice is recorded even though the repair has no other disk
    // to rebuild onto.
    let e = fails(&[
        "space",
        "repair",
        d,
        "--force-member",
        "disk0.raw",
        "--keep-failed",
    ]);
    assert!(e.contains("needs 3 disks"), "{e}");
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert_eq!(info["members"][1]["state"], "failed", "{info}");
    assert_eq!(info["members"][0]["state"], "healthy", "{info}");
    // A plain repair takes the other side's disk back as a fresh member and rebuilds it
    // from the kept side.
    let o = common::vstor(&["space", "repair", d]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("taken back as member 2"),
        "{err}"
    );
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert_eq!(info["spaces"][0]["health"], "healthy", "{info}");
    assert_eq!(info["members"][1]["state"], "removed", "{info}");
    // The kept side's data (0x12, written while disk1 was away), on both disks.
    for away in ["disk0.raw", "disk1.raw"] {
        std::fs::rename(dir.join(away), t.path().join("x.raw")).unwrap();
        let dump = ok(&["disk", "read", &target, "--offset", "0", "--length", "16"]);
        std::fs::rename(t.path().join("x.raw"), dir.join(away)).unwrap();
        assert!(
            dump.contains("1212") || dump.contains("12 12"),
            "{away}: {dump}"
        );
    }
}

/// The member files of `dir`, disk0.raw to disk{n-1}.raw.
fn member_files(dir: &std::path::Path, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| std::fs::read(dir.join(format!("disk{i}.raw"))).unwrap())
        .collect()
}

#[test]
fn a_read_only_open_replays_journal_updates_in_memory_and_writes_nothing() {
    use vstor::core::{BlockDevice, FileOptions};
    use vstor::spaces::{OpenOptions, Pool};
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    ok(&[
        "pool",
        "create",
        d,
        "--disks",
        "5",
        "--disk-size",
        "16M",
        "--slab-size",
        "1M",
    ]);
    ok(&[
        "space",
        "create",
        d,
        "p",
        "--size",
        "2M",
        "--resiliency",
        "parity",
        "--columns",
        "4",
        "--interleave",
        "64k",
    ]);
    let target = format!("pool:{d}/p");
    // Full rows: no journal.
    ok(&[
        "disk",
        "write",
        &target,
        "--offset",
        "0",
        "--length",
        "2M",
        "--pattern",
        "0x11",
    ]);
    let before = member_files(&dir, 5);
    // A partial-row write, journaled; the files are copied while the pool is still open
    // (the journal then holds the committed batch).
    let (journaled, data_start) = {
        let pool = Pool::open_dir(&dir, &OpenOptions::default(), &FileOptions::default()).unwrap();
        let space = pool.open_space("p").unwrap();
        space.write_at(4096, &[0x22u8; 4096]).unwrap();
        space.flush().unwrap();
        assert_eq!(pool.info().journal.batches, 1);
        (member_files(&dir, 5), pool.info().data_start)
    };
    // The crash: the journal reached the disks, the in-place writes did not.
    let journal = (data_start - (2 << 20)) as usize..(data_start - (1 << 20)) as usize;
    for (i, (old, j)) in before.iter().zip(&journaled).enumerate() {
        let mut m = old.clone();
        m[journal.clone()].copy_from_slice(&j[journal.clone()]);
        std::fs::write(dir.join(format!("disk{i}.raw")), m).unwrap();
    }
    let crashed = member_files(&dir, 5);
    // Read-only opens (`disk read`, `pool info`) replay the batch in memory: the write reads
    // back, with every member and with each one missing (its rows rebuilt from the others,
    // which the replay made agree), and nothing is written.
    let read = |at: &str| ok(&["disk", "read", &target, "--offset", at, "--length", "16"]);
    let has = |dump: &str, b: &str| dump.contains(&format!("{b}{b} {b}{b}"));
    assert!(has(&read("4k"), "22"), "{}", read("4k"));
    assert!(has(&read("8k"), "11"), "{}", read("8k"));
    for i in 0..5 {
        let (m, aside) = (dir.join(format!("disk{i}.raw")), t.path().join("aside.raw"));
        std::fs::rename(&m, &aside).unwrap();
        let dump = read("4k");
        std::fs::rename(&aside, &m).unwrap();
        assert!(has(&dump, "22"), "disk{i} missing: {dump}");
    }
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert!(
        info["notes"]
            .to_string()
            .contains("1 journaled parity updates")
            && info["notes"]
                .to_string()
                .contains("replayed in memory only"),
        "{info}"
    );
    assert!(member_files(&dir, 5) == crashed, "a read-only open wrote");
    // A writable open applies it; then reads see the same.
    ok(&["space", "scrub", d]);
    assert!(member_files(&dir, 5) != crashed);
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert!(!info["notes"].to_string().contains("replayed"), "{info}");
    assert!(has(&read("4k"), "22"));
    assert!(has(&read("8k"), "11"));
}

#[test]
fn a_pool_held_by_another_open_is_refused_with_the_member_named() {
    use vstor::core::FileOptions;
    use vstor::spaces::{OpenOptions, Pool};
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    small_pool(d, 2, "m", "mirror", 1);
    let target = format!("pool:{d}/m");
    let open = |read_only| {
        Pool::open_dir(
            &dir,
            &OpenOptions {
                read_only,
                ..Default::default()
            },
            &FileOptions::default(),
        )
        .unwrap()
    };
    let write = [
        "disk",
        "write",
        &target,
        "--offset",
        "0",
        "--length",
        "8k",
        "--pattern",
        "0x33",
    ];
    // Held for writing here: every open from the CLI is refused, and writes nothing.
    let held = open(false);
    let before = member_files(&dir, 2);
    for args in [
        &["pool", "info", d][..],
        &write[..],
        &["disk", "read", &target, "--offset", "0", "--length", "16"][..],
        &["space", "scrub", d][..],
    ] {
        let e = fails(args);
        assert!(
            e.contains("disk0.raw is in use by")
                && e.contains(&format!("(pid {})", std::process::id())),
            "{args:?}: {e}"
        );
    }
    assert!(member_files(&dir, 2) == before, "a refused open wrote");
    drop(held);
    // Held read-only here: other read-only opens share it, writers are refused.
    let held = open(true);
    ok(&["pool", "info", d]);
    ok(&["disk", "read", &target, "--offset", "0", "--length", "16"]);
    let e = fails(&write);
    assert!(
        e.contains("disk0.raw is in use") && e.contains("writing needs it alone"),
        "{e}"
    );
    drop(held);
    ok(&write);
    let dump = ok(&["disk", "read", &target, "--offset", "0", "--length", "16"]);
    assert!(dump.contains("3333") || dump.contains("33 33"), "{dump}");
}

#[test]
fn a_space_grows_and_never_shrinks() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    small_pool(d, 3, "m", "mirror", 1);
    let target = format!("pool:{d}/m");
    ok(&[
        "disk",
        "write",
        &target,
        "--pattern",
        "0x5a",
        "--offset",
        "0",
        "--length",
        "2M",
    ]);
    let info = json(&ok(&["space", "resize", d, "m", "--size", "5M", "--json"]));
    assert_eq!(info["size"], 5 << 20, "{info}");
    let info = json(&ok(&["disk", "info", &target, "--json"]));
    assert_eq!(
        info["capacity"].as_u64().or(info["virtual_size"].as_u64()),
        Some(5 << 20),
        "{info}"
    );
    // The old bytes stay, the new ones read as zeroes.
    let old = ok(&[
        "disk", "read", &target, "--offset", "2097136", "--length", "32",
    ]);
    assert!(
        old.contains("5a5a 5a5a 5a5a 5a5a 5a5a 5a5a 5a5a 5a5a"),
        "{old}"
    );
    assert!(
        old.contains("0000 0000 0000 0000 0000 0000 0000 0000"),
        "{old}"
    );
    // Smaller, or not a multiple of 4 KiB: refused in one line, nothing changed.
    let e = fails(&["space", "resize", d, "m", "--size", "1M"]);
    assert!(e.contains("never shrinks"), "{e}");
    let e = fails(&["space", "resize", d, "m", "--size", "6000001"]);
    assert!(e.contains("multiple of 4096"), "{e}");
    let e = fails(&["space", "resize", d, "nope", "--size", "8M"]);
    assert!(e.contains("no space named 'nope'"), "{e}");
    let info = json(&ok(&["space", "info", d, "m", "--json"]));
    assert_eq!(info["size"], 5 << 20, "{info}");
}

/// The names of the files in `dir`, sorted.
fn dir_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn failed_commands_leave_no_file_and_stray_files_are_not_members() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    // A size no file can have: nothing is left, not even the directory.
    let e = fails(&["pool", "create", d, "--disks", "3", "--disk-size", "8E"]);
    assert!(e.contains("disk0.raw"), "{e}");
    assert!(!dir.exists(), "left {:?}", dir_files(&dir));
    small_pool(d, 3, "m", "mirror", 1);
    let target = format!("pool:{d}/m");
    ok(&[
        "disk",
        "write",
        &target,
        "--length",
        "1M",
        "--pattern",
        "0x5a",
    ]);
    let e = fails(&["pool", "add-disk", d, "--disk-size", "8E"]);
    assert!(e.contains("disk3.raw"), "{e}");
    assert_eq!(dir_files(&dir), ["disk0.raw", "disk1.raw", "disk2.raw"]);
    // Stray files: a README, an empty file (as a failed add-disk left before), a few KiB.
    std::fs::write(dir.join("README"), "this pool holds the test VMs\n").unwrap();
    std::fs::write(dir.join("disk3.raw"), b"").unwrap();
    std::fs::write(dir.join("notes.txt"), vec![b'n'; 5000]).unwrap();
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert_eq!(info["members"].as_array().unwrap().len(), 3, "{info}");
    let notes: Vec<&str> = info["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for f in ["README", "disk3.raw", "notes.txt"] {
        let want = format!("{}: no pool metadata; not a member", dir.join(f).display());
        assert!(notes.contains(&want.as_str()), "{want} not in {notes:?}");
    }
    // Every command works around them, the writable ones too (scrub, repair: O_DIRECT).
    let dump = ok(&["disk", "read", &target, "--offset", "4k", "--length", "16"]);
    assert!(dump.contains("5a5a") || dump.contains("5a 5a"), "{dump}");
    ok(&[
        "disk",
        "write",
        &target,
        "--length",
        "4k",
        "--pattern",
        "0x11",
    ]);
    ok(&["space", "scrub", d]);
    ok(&["space", "repair", d]);
    ok(&[
        "space",
        "create",
        d,
        "n",
        "--size",
        "1M",
        "--resiliency",
        "simple",
    ]);
    let out = ok(&["pool", "add-disk", d, "--disk-size", "16M", "--json"]);
    assert_eq!(json(&out)["members"].as_array().unwrap().len(), 4);
    assert!(
        dir.join("disk4.raw").exists(),
        "disk3.raw is taken by the stray file"
    );
    assert_eq!(
        std::fs::read(dir.join("README")).unwrap(),
        b"this pool holds the test VMs\n"
    );
    assert_eq!(std::fs::metadata(dir.join("disk3.raw")).unwrap().len(), 0);
}

#[test]
fn a_removed_disk_is_deleted_and_a_copy_of_it_is_skipped() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    small_pool(d, 3, "m", "mirror", 1);
    let target = format!("pool:{d}/m");
    ok(&[
        "disk",
        "write",
        &target,
        "--length",
        "2M",
        "--pattern",
        "0x42",
    ]);
    let help = ok(&["pool", "remove-disk", "--help"]);
    assert!(help.contains("deleted"), "{help}");
    ok(&["pool", "add-disk", d, "--disk-size", "16M"]);
    ok(&["pool", "retire-disk", d, "disk0.raw"]);
    ok(&["space", "repair", d]);
    let kept = t.path().join("disk0.copy");
    std::fs::copy(dir.join("disk0.raw"), &kept).unwrap();
    let out = ok(&["pool", "remove-disk", d, "disk0.raw"]);
    assert!(
        out.contains(&format!("deleted {}", dir.join("disk0.raw").display())),
        "{out}"
    );
    assert_eq!(dir_files(&dir), ["disk1.raw", "disk2.raw", "disk3.raw"]);
    // pool info: the removed member is "removed", not "missing", and its slabs are not in
    // the capacity (3 members of 16 MiB: 12 slabs of 1 MiB each after the metadata).
    let info = json(&ok(&["pool", "info", d, "--json"]));
    let members = info["members"].as_array().unwrap();
    assert_eq!(members[0]["state"], "removed", "{info}");
    assert!(members.iter().all(|m| m["state"] != "missing"), "{info}");
    let live: u64 = members[1..]
        .iter()
        .map(|m| m["slabs"].as_u64().unwrap())
        .sum();
    assert_eq!(info["capacity"], live << 20, "{info}");
    assert!(info["notes"].as_array().unwrap().is_empty(), "{info}");
    let text = ok(&["pool", "info", d]);
    assert!(
        text.contains(&format!("capacity:    {} MiB in {live} slabs", live)),
        "{text}"
    );
    assert!(!text.contains("missing"), "{text}");
    // The removed member's file comes back into the directory: skipped, with a note.
    let back = dir.join("disk0.raw");
    std::fs::copy(&kept, &back).unwrap();
    let before = std::fs::read(&back).unwrap();
    let info = json(&ok(&["pool", "info", d, "--json"]));
    let note = format!(
        "{}: member 0 was removed from the pool (pool remove-disk); not a member",
        back.display()
    );
    assert!(
        info["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().starts_with(&note)),
        "{info}"
    );
    ok(&[
        "disk",
        "write",
        &target,
        "--length",
        "64k",
        "--pattern",
        "0x43",
    ]);
    ok(&["space", "scrub", d]);
    let dump = ok(&["disk", "read", &target, "--offset", "1M", "--length", "16"]);
    assert!(dump.contains("4242") || dump.contains("42 42"), "{dump}");
    assert!(
        std::fs::read(&back).unwrap() == before,
        "the removed file was written"
    );
}

#[test]
fn a_stray_disk_of_another_pool_is_named_not_a_member() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    small_pool(d, 3, "m", "mirror", 1);
    // Another pool whose one disk has gone through more metadata updates.
    let other = t.path().join("other");
    let o = s(&other);
    ok(&[
        "pool",
        "create",
        o,
        "--disks",
        "1",
        "--disk-size",
        "16M",
        "--slab-size",
        "1M",
    ]);
    for i in 0..6 {
        let n = format!("s{i}");
        ok(&[
            "space",
            "create",
            o,
            &n,
            "--size",
            "1M",
            "--resiliency",
            "simple",
        ]);
        ok(&["space", "delete", o, &n]);
    }
    let seq = |dir: &str| json(&ok(&["pool", "info", dir, "--json"]))["sequence"].clone();
    assert!(seq(o).as_u64() > seq(d).as_u64());
    let other_id = json(&ok(&["pool", "info", o, "--json"]))["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Named to sort before the members, and after them.
    for name in ["a-copy.raw", "zz.raw"] {
        let stray = dir.join(name);
        std::fs::copy(other.join("disk0.raw"), &stray).unwrap();
        for args in [&["pool", "info", d][..], &["space", "scrub", d][..]] {
            let e = fails(args);
            let want = format!(
                "vstor: error: {}: belongs to pool {other_id}, not to pool",
                stray.display()
            );
            assert!(e.starts_with(&want), "{e}");
            assert!(e.contains("of the other 3 disks"), "{e}");
        }
        std::fs::remove_file(&stray).unwrap();
    }
    ok(&["pool", "info", d]);
}

#[test]
fn scrub_fails_when_it_could_not_check_everything() {
    let t = tempfile::tempdir().unwrap();
    let help = ok(&["space", "scrub", "--help"]);
    assert!(help.contains("Exit status"), "{help}");
    // A mirror of one column, one extent on 2 of 3 disks: both copies go.
    let dir = t.path().join("mirror");
    let d = s(&dir);
    small_pool(d, 3, "x", "simple", 1);
    ok(&["space", "delete", d, "x"]);
    ok(&[
        "space",
        "create",
        d,
        "m",
        "--size",
        "1M",
        "--resiliency",
        "mirror",
        "--provisioning",
        "fixed",
    ]);
    ok(&[
        "disk",
        "write",
        &format!("pool:{d}/m"),
        "--length",
        "1M",
        "--pattern",
        "0x61",
    ]);
    ok(&["space", "scrub", d]);
    let info = json(&ok(&["pool", "info", d, "--json"]));
    let holders: Vec<String> = info["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["slabs_used"].as_u64().unwrap() > 0)
        .map(|m| m["disk"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(holders.len(), 2, "{info}");
    for h in &holders {
        std::fs::rename(h, format!("{h}.away")).unwrap();
    }
    std::fs::create_dir(t.path().join("away")).unwrap();
    for h in &holders {
        let p = std::path::Path::new(h);
        std::fs::rename(
            format!("{h}.away"),
            t.path().join("away").join(p.file_name().unwrap()),
        )
        .unwrap();
    }
    let o = common::vstor(&["space", "scrub", d, "--json"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a scrub that checked nothing succeeded"
    );
    let r = json(&String::from_utf8(o.stdout).unwrap());
    assert!(r["unverifiable"].as_u64().unwrap() > 0, "{r}");
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("could not be checked"), "{err}");
    // A parity space that lost a disk: its parity cannot be checked.
    let dir = t.path().join("parity");
    let d = s(&dir);
    small_pool(d, 3, "p", "parity", 3);
    ok(&[
        "disk",
        "write",
        &format!("pool:{d}/p"),
        "--length",
        "2M",
        "--pattern",
        "0x62",
    ]);
    ok(&["space", "scrub", d]);
    std::fs::remove_file(dir.join("disk1.raw")).unwrap();
    let e = fails(&["space", "scrub", d]);
    assert!(e.contains("could not be checked"), "{e}");
    let o = common::vstor(&["space", "scrub", d]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("could not be checked"), "{out}");
}

#[test]
fn a_member_file_is_not_written_behind_the_pools_back() {
    use vstor::core::FileOptions;
    use vstor::spaces::{OpenOptions, Pool};
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    small_pool(d, 2, "m", "mirror", 1);
    let member = dir.join("disk0.raw");
    let held = Pool::open_dir(&dir, &OpenOptions::default(), &FileOptions::default()).unwrap();
    let before = std::fs::read(&member).unwrap();
    for target in [s(&member).to_string(), format!("raw:{}", member.display())] {
        let e = fails(&[
            "disk",
            "write",
            &target,
            "--offset",
            "0",
            "--length",
            "4k",
            "--pattern",
            "0x99",
        ]);
        assert!(e.contains("disk0.raw") && e.contains("in use"), "{e}");
    }
    assert!(
        std::fs::read(&member).unwrap() == before,
        "the member was written"
    );
    drop(held);
}

#[test]
fn a_removed_listed_device_is_taken_off_the_list_and_left_as_it_is() {
    let t = tempfile::tempdir().unwrap();
    let devs: Vec<std::path::PathBuf> = (0..3)
        .map(|i| {
            let p = t.path().join(format!("d{i}.img"));
            std::fs::File::create(&p)
                .unwrap()
                .set_len(16 << 20)
                .unwrap();
            p
        })
        .collect();
    let dir = t.path().join("pool");
    let d = s(&dir);
    ok(&[
        "pool",
        "create",
        d,
        "--device",
        s(&devs[0]),
        "--device",
        s(&devs[1]),
        "--device",
        s(&devs[2]),
        "--slab-size",
        "1M",
    ]);
    ok(&[
        "space",
        "create",
        d,
        "m",
        "--size",
        "2M",
        "--resiliency",
        "mirror",
    ]);
    let target = format!("pool:{d}/m");
    ok(&[
        "disk",
        "write",
        &target,
        "--length",
        "2M",
        "--pattern",
        "0x44",
    ]);
    ok(&["pool", "add-disk", d, "--disk-size", "16M"]);
    ok(&["pool", "retire-disk", d, "d1.img"]);
    ok(&["space", "repair", d]);
    let out = ok(&["pool", "remove-disk", d, "d1.img"]);
    assert!(out.contains("taken off"), "{out}");
    let list = std::fs::read_to_string(dir.join("pool.devices")).unwrap();
    let gone = std::fs::canonicalize(&devs[1]).unwrap();
    assert!(!list.lines().any(|l| l == s(&gone)), "still listed: {list}");
    assert_eq!(list.lines().count(), 2, "{list}");
    assert_eq!(std::fs::metadata(&devs[1]).unwrap().len(), 16 << 20);
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert!(info["notes"].as_array().unwrap().is_empty(), "{info}");
    assert_eq!(info["members"][1]["state"], "removed", "{info}");
    let dump = ok(&["disk", "read", &target, "--offset", "1M", "--length", "16"]);
    assert!(dump.contains("4444") || dump.contains("44 44"), "{dump}");
}

/// Reads `len` bytes of `target` at `offset` into memory (through a file).
fn read_bytes(target: &str, offset: &str, len: &str, tmp: &std::path::Path) -> Vec<u8> {
    let out = tmp.join("read.bin");
    ok(&[
        "disk",
        "read",
        target,
        "--offset",
        offset,
        "--length",
        len,
        "--output",
        s(&out),
    ]);
    std::fs::read(&out).unwrap()
}

/// With each member file taken away in turn, the space reads `want` (so every member holds
/// its copies of it).
fn every_member_holds(dir: &std::path::Path, n: usize, target: &str, want: &[u8]) {
    let tmp = dir.parent().unwrap();
    for i in 0..n {
        let f = dir.join(format!("disk{i}.raw"));
        let away = tmp.join("away.raw");
        std::fs::rename(&f, &away).unwrap();
        let got = read_bytes(target, "0", &want.len().to_string(), tmp);
        std::fs::rename(&away, &f).unwrap();
        assert!(got == want, "wrong data without disk{i}.raw");
    }
}

/// Issue 20 §1, what to build: a disk that was missing while the pool was written and comes
/// back is caught up by the next writable open, from the write-intent bitmaps (only what was
/// written since), with no command; an old copy of a disk put back is taken back and rebuilt
/// whole by `space repair` alone (no `pool reset-disk`), its stale contents never read.
#[test]
fn a_disk_back_from_missing_writes_is_caught_up_and_an_old_copy_is_rebuilt_by_repair() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let d = s(&dir);
    ok(&[
        "pool",
        "create",
        d,
        "--disks",
        "4",
        "--disk-size",
        "40M",
        "--slab-size",
        "4M",
    ]);
    ok(&[
        "space",
        "create",
        d,
        "m",
        "--size",
        "16M",
        "--resiliency",
        "mirror",
    ]);
    let target = format!("pool:{d}/m");
    let write = |off: &str, len: &str, pattern: &str| {
        ok(&[
            "disk",
            "write",
            &target,
            "--offset",
            off,
            "--length",
            len,
            "--pattern",
            pattern,
        ])
    };
    write("0", "16M", "0xaa");
    let mut want = vec![0xaau8; 16 << 20];

    // Missing while written, then back: caught up by the next writable open.
    let disk0 = dir.join("disk0.raw");
    std::fs::rename(&disk0, t.path().join("gone.raw")).unwrap();
    write("0", "1M", "0xbb");
    want[..1 << 20].fill(0xbb);
    std::fs::rename(t.path().join("gone.raw"), &disk0).unwrap();
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert!(
        info["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("catches it up")),
        "{info}"
    );
    let o = common::vstor(&["space", "repair", d, "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let r = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(r["slabs"], 0, "caught up, nothing to rebuild: {r} {err}");
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert!(
        info["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["state"] == "healthy"),
        "{info}"
    );
    every_member_holds(&dir, 4, &target, &want);

    // An old copy put back: `space repair` takes it back and rebuilds it.
    let old = t.path().join("d0.old");
    std::fs::copy(&disk0, &old).unwrap();
    write("4M", "2M", "0xcc");
    want[4 << 20..6 << 20].fill(0xcc);
    std::fs::copy(&old, &disk0).unwrap();
    let o = common::vstor(&["space", "repair", d, "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let r = json(&String::from_utf8_lossy(&o.stdout));
    assert!(err.contains("taken back as member"), "{err}");
    assert!(r["slabs"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["taken_back"][0]["member"], 0, "{r}");
    assert_eq!(r["taken_back"][0]["record_removed"], true, "{r}");
    let info = json(&ok(&["pool", "info", d, "--json"]));
    assert!(
        info["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["state"] == "healthy" || m["state"] == "removed"),
        "{info}"
    );
    every_member_holds(&dir, 4, &target, &want);
    let scrub = ok(&["space", "scrub", d]);
    assert!(scrub.contains(" 0 lost"), "{scrub}");
}
