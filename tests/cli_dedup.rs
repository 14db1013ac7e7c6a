//! End-to-end tests of `vstor dedup ...` and of optimized files opened through the stack
//! builder (`vstor disk read/write/info` on an optimized VHDX), checked against the
//! originals with `qemu-img compare` (package qemu-utils, installed by scripts/test).

mod common;

use common::{fails, ok, s};
use std::path::Path;
use std::process::Command;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("json")
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed by scripts/test (package qemu-utils)")
}

/// Three 64 MiB dynamic VHDXs that share most of their data, and a copy of each outside the
/// library to compare with.
fn library(dir: &Path, orig: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::create_dir_all(orig).unwrap();
    let gold = dir.join("gold.vhdx");
    ok(&["disk", "create", s(&gold), "--size", "64M"]);
    for (i, off) in [0u64, 3, 9, 17, 30].iter().enumerate() {
        let pat = format!("{:#x}", 0x21 + i * 17);
        let off = format!("{}M", off);
        ok(&[
            "disk",
            "write",
            s(&gold),
            "--offset",
            &off,
            "--length",
            "2M",
            "--pattern",
            &pat,
        ]);
    }
    // Content that is not one repeated byte: a file's bytes written through the stack.
    let noise: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let nf = orig.join("noise.bin");
    std::fs::write(&nf, &noise).unwrap();
    ok(&[
        "disk",
        "write",
        s(&gold),
        "--offset",
        "40M",
        "--input",
        s(&nf),
    ]);
    for (name, off, pat) in [
        ("clone1.vhdx", "5M", "0x99"),
        ("clone2.vhdx", "50M", "0x5a"),
    ] {
        let p = dir.join(name);
        std::fs::copy(&gold, &p).unwrap();
        ok(&[
            "disk",
            "write",
            s(&p),
            "--offset",
            off,
            "--length",
            "1M",
            "--pattern",
            pat,
        ]);
    }
    for name in ["gold.vhdx", "clone1.vhdx", "clone2.vhdx"] {
        std::fs::copy(dir.join(name), orig.join(name)).unwrap();
    }
}

/// The 64 MiB a disk holds, read through the stack into a raw file.
fn read_out(img: &Path, raw: &Path) {
    ok(&[
        "disk",
        "read",
        s(img),
        "--offset",
        "0",
        "--length",
        "64M",
        "--output",
        s(raw),
    ]);
}

fn same(a: &Path, b: &Path) {
    let o = qemu_img(&["compare", s(a), s(b)]);
    assert!(
        o.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn optimize_then_every_file_reads_as_before() {
    let t = tempfile::tempdir().unwrap();
    let (dir, orig) = (t.path().join("lib"), t.path().join("orig"));
    library(&dir, &orig);
    ok(&["dedup", "enable", s(&dir)]);
    let out = json(&ok(&["dedup", "optimize", s(&dir), "--json"]));
    assert_eq!(out["optimized"].as_array().unwrap().len(), 3, "{out}");
    let st = json(&ok(&["dedup", "status", s(&dir), "--json"]));
    assert_eq!(st["optimized_files"], 3, "{st}");
    assert!(st["ratio"].as_f64().unwrap() > 3.0, "{st}");
    for f in st["files"].as_array().unwrap() {
        assert_eq!(f["state"], "optimized", "{f}");
        assert!(f["on_disk"].as_u64().unwrap() < 64 << 10, "{f}");
    }
    // The stack opens an optimized VHDX: info, read, and a convert that qemu-img compares.
    let info = ok(&["disk", "info", s(&dir.join("gold.vhdx"))]);
    assert!(
        info.contains("vhdx") && info.contains("optimized (dedup)"),
        "{info}"
    );
    for name in ["gold.vhdx", "clone1.vhdx", "clone2.vhdx"] {
        let raw = t.path().join(format!("{name}.raw"));
        read_out(&dir.join(name), &raw);
        same(&orig.join(name), &raw);
    }
    let r = ok(&[
        "disk",
        "read",
        s(&dir.join("clone1.vhdx")),
        "--offset",
        "5M",
        "--length",
        "16",
    ]);
    assert!(r.contains("9999 9999"), "{r}");
    // Resumable: nothing left to do.
    let again = json(&ok(&["dedup", "optimize", s(&dir), "--json"]));
    assert_eq!(again["already_optimized"], 3, "{again}");
    let scrub = json(&ok(&["dedup", "scrub", s(&dir), "--json"]));
    assert!(scrub["bad"].as_array().unwrap().is_empty(), "{scrub}");
}

#[test]
fn writes_land_in_the_stub_and_the_next_optimize_folds_them_in() {
    let t = tempfile::tempdir().unwrap();
    let (dir, orig) = (t.path().join("lib"), t.path().join("orig"));
    library(&dir, &orig);
    ok(&["dedup", "enable", s(&dir)]);
    ok(&["dedup", "optimize", s(&dir)]);
    let img = dir.join("clone2.vhdx");
    // The same write to the original copy and to the optimized file.
    for p in [&img, &orig.join("clone2.vhdx")] {
        ok(&[
            "disk",
            "write",
            s(p),
            "--offset",
            "33M",
            "--length",
            "3M",
            "--pattern",
            "0x6b",
        ]);
    }
    let st = json(&ok(&["dedup", "status", s(&dir), "--json"]));
    let f = st["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "clone2.vhdx")
        .unwrap()
        .clone();
    assert!(
        f["written_since_optimize"].as_u64().unwrap() >= 3 << 20,
        "{f}"
    );
    let raw = t.path().join("c2.raw");
    read_out(&img, &raw);
    same(&orig.join("clone2.vhdx"), &raw);
    let out = json(&ok(&["dedup", "optimize", s(&dir), "--json"]));
    assert_eq!(
        out["optimized"],
        serde_json::json!(["clone2.vhdx"]),
        "{out}"
    );
    let raw2 = t.path().join("c2b.raw");
    read_out(&img, &raw2);
    same(&orig.join("clone2.vhdx"), &raw2);
    // Unoptimize gives back a plain VHDX, which qemu-img reads itself.
    ok(&["dedup", "unoptimize", s(&dir), "clone2.vhdx"]);
    same(&orig.join("clone2.vhdx"), &img);
    let gc = json(&ok(&["dedup", "gc", s(&dir), "--json"]));
    assert!(gc["streams_dropped"].as_u64().is_some(), "{gc}");
    ok(&["dedup", "unoptimize", s(&dir)]);
    for name in ["gold.vhdx", "clone1.vhdx"] {
        same(&orig.join(name), &dir.join(name));
    }
}

#[test]
fn open_files_are_skipped() {
    let t = tempfile::tempdir().unwrap();
    let (dir, orig) = (t.path().join("lib"), t.path().join("orig"));
    library(&dir, &orig);
    ok(&["dedup", "enable", s(&dir)]);
    let lock =
        vstor::core::ImageLock::acquire(&dir.join("gold.vhdx"), vstor::core::LockMode::Exclusive)
            .unwrap();
    let out = json(&ok(&["dedup", "optimize", s(&dir), "--json"]));
    assert_eq!(out["in_use"], serde_json::json!(["gold.vhdx"]), "{out}");
    assert_eq!(out["optimized"].as_array().unwrap().len(), 2, "{out}");
    drop(lock);
    let out = json(&ok(&["dedup", "optimize", s(&dir), "--json"]));
    assert_eq!(out["optimized"], serde_json::json!(["gold.vhdx"]), "{out}");
    // An optimized file that is open for writing is refused to a second writer.
    let lock =
        vstor::core::ImageLock::acquire(&dir.join("gold.vhdx"), vstor::core::LockMode::Exclusive)
            .unwrap();
    let e = fails(&[
        "disk",
        "write",
        s(&dir.join("gold.vhdx")),
        "--offset",
        "0",
        "--length",
        "4k",
        "--pattern",
        "1",
    ]);
    assert!(e.contains("in use"), "{e}");
    drop(lock);
}

#[test]
fn damage_is_found_and_named() {
    let t = tempfile::tempdir().unwrap();
    let (dir, orig) = (t.path().join("lib"), t.path().join("orig"));
    library(&dir, &orig);
    let e = fails(&["dedup", "optimize", s(&dir)]);
    assert!(e.contains("not a dedup library"), "{e}");
    ok(&["dedup", "enable", s(&dir), "--hotspot-refs", "0"]);
    ok(&["dedup", "optimize", s(&dir)]);
    // Flip a byte in the middle of the (only) container's chunk data.
    let cdir = dir.join(".vstor-dedup/c");
    let mut names: Vec<_> = std::fs::read_dir(&cdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let c = &names[0];
    let mut d = std::fs::read(c).unwrap();
    let at = d.len() / 2;
    d[at] ^= 0xff;
    std::fs::write(c, &d).unwrap();
    let o = common::vstor(&["dedup", "scrub", s(&dir), "--json"]);
    assert!(!o.status.success());
    let rep = json(&String::from_utf8(o.stdout).unwrap());
    let bad = rep["bad"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{rep}");
    assert!(!bad[0]["files"].as_array().unwrap().is_empty(), "{rep}");
    // A missing container: reading the file says which chunk and where.
    std::fs::remove_file(c).unwrap();
    let e = fails(&[
        "disk",
        "read",
        s(&dir.join("gold.vhdx")),
        "--offset",
        "0",
        "--length",
        "64M",
        "--output",
        s(&t.path().join("x.raw")),
    ]);
    assert!(e.contains("container") || e.contains("chunk"), "{e}");
}

/// The disk commands that read an image as a whole (check, convert, clone) read an optimized
/// file through its stub, as every target does; those that rewrite a VHDX in place refuse it
/// and say how to put it back. (They opened the stub's own bytes and failed with "too small
/// for a VHDX", and convert of an optimized raw file copied the stub.)
#[test]
fn disk_commands_on_optimized_files() {
    let t = tempfile::tempdir().unwrap();
    let (dir, orig) = (t.path().join("lib"), t.path().join("orig"));
    library(&dir, &orig);
    let noise: Vec<u8> = (0..5u32 << 20)
        .map(|i| (i.wrapping_mul(2246822519) >> 11) as u8)
        .collect();
    std::fs::write(dir.join("data.raw"), &noise).unwrap();
    std::fs::write(orig.join("data.raw"), &noise).unwrap();
    ok(&["dedup", "enable", s(&dir)]);
    ok(&["dedup", "optimize", s(&dir)]);
    let gold = dir.join("gold.vhdx");
    let raw = dir.join("data.raw");
    assert!(
        std::fs::metadata(&raw).unwrap().len() < 1 << 20,
        "optimized"
    );

    let c = json(&ok(&["disk", "check", s(&gold), "--json"]));
    assert_eq!(c["clean"], true, "{c}");
    assert!(c["allocated_blocks"].as_u64().unwrap() > 0, "{c}");
    let e = fails(&["disk", "check", s(&raw)]);
    assert!(e.contains("check verifies VHDX files"), "{e}");

    let (out_vhdx, out_raw) = (t.path().join("out.vhdx"), t.path().join("out.raw"));
    ok(&["disk", "convert", s(&gold), s(&out_vhdx)]);
    ok(&["disk", "convert", s(&gold), s(&out_raw)]);
    same(&orig.join("gold.vhdx"), &out_vhdx);
    same(&orig.join("gold.vhdx"), &out_raw);
    let data_vhdx = t.path().join("data.vhdx");
    ok(&["disk", "convert", s(&raw), s(&data_vhdx)]);
    same(&orig.join("data.raw"), &data_vhdx);
    let cl = t.path().join("clone.vhdx");
    ok(&["disk", "clone", s(&dir.join("clone1.vhdx")), s(&cl)]);
    same(&orig.join("clone1.vhdx"), &cl);

    let stub_before = std::fs::read(&gold).unwrap();
    for (args, what) in [
        (vec!["disk", "merge", s(&gold)], "merge"),
        (vec!["disk", "resize", s(&gold), "--size", "128M"], "resize"),
        (vec!["disk", "compact", s(&gold)], "compact"),
        (vec!["disk", "checkpoint", s(&gold)], "checkpoint"),
        (
            vec!["disk", "set", s(&gold), "--physical-sector-size", "512"],
            "set",
        ),
        (
            vec!["disk", "check", s(&gold), "--repair"],
            "check --repair",
        ),
    ] {
        let e = fails(&args);
        assert!(
            e.contains("is an optimized (dedup) file")
                && e.contains(&format!("{what} rewrites the VHDX in place"))
                && e.contains(&format!("vstor dedup unoptimize {} gold.vhdx", s(&dir))),
            "{args:?}: {e}"
        );
    }
    assert_eq!(std::fs::read(&gold).unwrap(), stub_before, "left as it was");
    let back = t.path().join("gold.raw");
    read_out(&gold, &back);
    same(&orig.join("gold.vhdx"), &back);
}

/// Unmounts a FUSE view and ends its server, whatever the test did.
struct Mounted {
    mnt: std::path::PathBuf,
    child: std::process::Child,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `vstor dedup mount`: in the read-only FUSE view of an optimized library every file reads
/// as the original, for tools that know nothing of vstor (qemu-img compare, a plain read).
#[test]
fn mount_view_reads_the_original_bytes() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        eprintln!("SKIPPED: /dev/fuse cannot be opened ({e}); the FUSE view is not tested");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (dir, orig) = (t.path().join("lib"), t.path().join("orig"));
    library(&dir, &orig);
    let noise: Vec<u8> = (0..(3u32 << 20) + 777)
        .map(|i| (i.wrapping_mul(2246822519) >> 9) as u8)
        .collect();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/data.raw"), &noise).unwrap();
    std::fs::write(dir.join("notes.txt"), b"not optimized: too small\n").unwrap();
    ok(&["dedup", "enable", s(&dir)]);
    ok(&["dedup", "optimize", s(&dir)]);
    // A write after optimize (in the stub's own area) is part of what the view shows.
    let clone2 = dir.join("clone2.vhdx");
    for img in [&clone2, &orig.join("clone2.vhdx")] {
        ok(&[
            "disk",
            "write",
            s(img),
            "--offset",
            "7M",
            "--length",
            "64k",
            "--pattern",
            "0xc3",
        ]);
    }
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(["dedup", "mount", s(&dir), s(&mnt)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut m = Mounted {
        mnt: mnt.clone(),
        child,
    };
    let t0 = std::time::Instant::now();
    while !mnt.join("gold.vhdx").exists() {
        if let Some(st) = m.child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(m.child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("vstor dedup mount exited ({st}): {err}");
        }
        assert!(t0.elapsed().as_secs() < 20, "the view did not appear");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut names: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "clone1.vhdx",
            "clone2.vhdx",
            "gold.vhdx",
            "notes.txt",
            "sub"
        ]
    );
    for name in ["gold.vhdx", "clone1.vhdx", "clone2.vhdx"] {
        let (a, b) = (mnt.join(name), orig.join(name));
        assert_eq!(
            std::fs::metadata(&a).unwrap().len(),
            std::fs::metadata(&b).unwrap().len(),
            "{name}"
        );
        let o = qemu_img(&["compare", "-f", "vhdx", "-F", "vhdx", s(&a), s(&b)]);
        assert!(
            o.status.success(),
            "qemu-img compare {name}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        // Byte for byte too, where both files are as they were made (a VHDX written through
        // two stacks holds the same disk but not the same log and allocation order).
        if name != "clone2.vhdx" {
            assert_eq!(
                std::fs::read(&a).unwrap(),
                std::fs::read(&b).unwrap(),
                "{name}"
            );
        }
    }
    assert_eq!(std::fs::read(mnt.join("sub/data.raw")).unwrap(), noise);
    assert_eq!(
        std::fs::read(mnt.join("notes.txt")).unwrap(),
        b"not optimized: too small\n"
    );
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("gold.vhdx"));
    assert!(w.is_err(), "the view is read-only");
    // While the view has it open, optimize leaves it alone; unmounting ends the server.
    let o = json(&ok(&["dedup", "optimize", s(&dir), "--json"]));
    assert!(
        o["in_use"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "clone2.vhdx"),
        "{o}"
    );
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success(), "umount");
    let st = m.child.wait().unwrap();
    assert!(st.success(), "vstor dedup mount exited with {st}");
    assert!(!mnt.join("gold.vhdx").exists());
}
