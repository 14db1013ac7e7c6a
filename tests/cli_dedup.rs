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

/// Bytes that are not one repeated byte, from `seed`.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// `len` bytes of a target at `off`, read out through `vstor disk read --output`.
fn read_target(dir: &Path, target: &str, off: u64, len: u64) -> Vec<u8> {
    let out = dir.join("read.out");
    ok(&[
        "disk",
        "read",
        target,
        "--offset",
        &off.to_string(),
        "--length",
        &len.to_string(),
        "--output",
        s(&out),
    ]);
    std::fs::read(out).unwrap()
}

/// A store with a 16 MiB `gold` volume written from a file (noise, a pattern, zeroes), and
/// that file.
fn volume_store(t: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let store = t.join("vols");
    let o = ok(&["dedup", "create", s(&store)]);
    assert!(o.contains("is a dedup store of volumes"), "{o}");
    ok(&[
        "dedup",
        "volume",
        "create",
        s(&store),
        "gold",
        "--size",
        "16M",
    ]);
    let mut g = vec![0u8; 16 << 20];
    g[..4 << 20].copy_from_slice(&noise(4 << 20, 1));
    g[6 << 20..8 << 20].fill(0x5a);
    g[10 << 20..13 << 20].copy_from_slice(&noise(3 << 20, 2));
    let f = t.join("gold.raw");
    std::fs::write(&f, &g).unwrap();
    let gold = format!("dedup:{}/gold", s(&store));
    ok(&["disk", "write", &gold, "--input", s(&f)]);
    (store, g)
}

/// `vstor dedup create`, `volume create/clone/list/delete`, and the `dedup:` target in `disk
/// read/write/info`: clones share gold's blocks until written, identical blocks are stored once.
#[test]
fn volumes_through_the_dedup_target() {
    let t = tempfile::tempdir().unwrap();
    let (store, g) = volume_store(t.path());
    let gold = format!("dedup:{}/gold", s(&store));
    assert!(read_target(t.path(), &gold, 0, 16 << 20) == g);
    let info = json(&ok(&["disk", "info", &gold, "--json"]));
    assert_eq!(info["virtual_size"], 16 << 20, "{info}");
    let o = ok(&["dedup", "volume", "clone", s(&store), "gold", "vm1"]);
    assert!(o.contains("vm1 is a clone of gold"), "{o}");
    ok(&["dedup", "volume", "clone", s(&store), "gold", "vm2"]);
    let vm1 = format!("dedup:{}/vm1", s(&store));
    // vm1 changes 64 KiB at 1 MiB (a sector-aligned write: parts of blocks) and zeroes 1 MiB.
    ok(&[
        "disk",
        "write",
        &vm1,
        "--offset",
        "1049088",
        "--length",
        "64k",
        "--pattern",
        "0x11",
    ]);
    ok(&[
        "disk",
        "write",
        &vm1,
        "--offset",
        "6M",
        "--length",
        "1M",
        "--pattern",
        "0",
    ]);
    let mut want = g.clone();
    want[1049088..1049088 + (64 << 10)].fill(0x11);
    want[6 << 20..7 << 20].fill(0);
    assert!(read_target(t.path(), &vm1, 0, 16 << 20) == want, "vm1");
    let vm2 = format!("dedup:{}/vm2", s(&store));
    assert!(
        read_target(t.path(), &vm2, 0, 16 << 20) == g,
        "vm2 is gold still"
    );
    assert!(
        read_target(t.path(), &gold, 0, 16 << 20) == g,
        "gold is unchanged"
    );
    let l = json(&ok(&["dedup", "volume", "list", s(&store), "--json"]));
    let vols = l["volumes"].as_array().unwrap();
    let names: Vec<&str> = vols.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["gold", "vm1", "vm2"], "{l}");
    // gold holds 9 MiB of data; vm1 wrote 17 blocks of its own (parts of them) and dropped
    // the 256 of its zeroed MiB.
    assert_eq!(vols[0]["mapped_bytes"], 9 << 20, "{l}");
    assert_eq!(vols[1]["written_bytes"], 17 * 4096, "{l}");
    assert_eq!(vols[1]["mapped_bytes"], 8 << 20, "{l}");
    assert_eq!(vols[1]["origin"], "gold", "{l}");
    assert_eq!(vols[2]["written_bytes"], 0, "{l}");
    // Each distinct block that is not zero is stored once, whichever volumes hold it.
    let distinct = |vols: &[&Vec<u8>]| {
        let mut set = std::collections::HashSet::new();
        for v in vols {
            set.extend(v.chunks(4096).filter(|b| b.iter().any(|&x| x != 0)));
        }
        set.len()
    };
    assert_eq!(l["chunks"], distinct(&[&g, &want]), "{l}");
    assert!(l["stored_bytes"].as_u64().unwrap() < 9 << 20, "{l}");
    let text = ok(&["dedup", "volume", "list", s(&store)]);
    assert!(text.contains("vm1") && text.contains("gold"), "{text}");
    ok(&["dedup", "volume", "delete", s(&store), "vm1"]);
    ok(&["dedup", "volume", "delete", s(&store), "gold"]);
    assert!(
        read_target(t.path(), &vm2, 0, 16 << 20) == g,
        "vm2 outlives gold"
    );
    let l = json(&ok(&["dedup", "volume", "list", s(&store), "--json"]));
    assert_eq!(l["volumes"].as_array().unwrap().len(), 1, "{l}");
    assert_eq!(
        l["chunks"],
        distinct(&[&g]),
        "vm1's own blocks are gone: {l}"
    );
}

/// Bad input to the volume commands and the `dedup:` target: one line, naming what is wrong.
#[test]
fn bad_volume_input_is_refused_in_one_line() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("vols");
    let missing = t.path().join("nothing");
    let e = fails(&[
        "dedup",
        "volume",
        "create",
        s(&missing),
        "v",
        "--size",
        "1G",
    ]);
    assert!(e.contains("does not exist"), "{e}");
    let e = fails(&[
        "disk",
        "read",
        &format!("dedup:{}/v", s(&missing)),
        "--length",
        "512",
    ]);
    assert!(e.contains("does not exist"), "{e}");
    let e = fails(&["disk", "info", "dedup:novolume"]);
    assert!(e.contains("dedup:STORE/NAME"), "{e}");
    ok(&["dedup", "create", s(&store)]);
    let e = fails(&["dedup", "create", s(&store)]);
    assert!(e.contains("already holds a dedup store"), "{e}");
    let e = fails(&["dedup", "create", t.path().to_str().unwrap()]);
    assert!(e.contains("is not empty"), "{e}");
    let e = fails(&["disk", "info", &format!("dedup:{}/nope", s(&store))]);
    assert!(e.contains("no volume nope"), "{e}");
    for size in ["0", "1000", "128T"] {
        let e = fails(&["dedup", "volume", "create", s(&store), "v", "--size", size]);
        assert!(e.contains("multiple of 4 KiB"), "{size}: {e}");
    }
    let e = fails(&[
        "dedup",
        "volume",
        "create",
        s(&store),
        "a/b",
        "--size",
        "1M",
    ]);
    assert!(e.contains("is not a volume name"), "{e}");
    ok(&["dedup", "volume", "create", s(&store), "v", "--size", "1M"]);
    let e = fails(&["dedup", "volume", "create", s(&store), "v", "--size", "1M"]);
    assert!(e.contains("volume v already exists"), "{e}");
    let e = fails(&["dedup", "volume", "clone", s(&store), "nope", "w"]);
    assert!(e.contains("no volume nope"), "{e}");
    let e = fails(&["dedup", "volume", "clone", s(&store), "v", "v"]);
    assert!(e.contains("already exists"), "{e}");
    let e = fails(&["dedup", "volume", "delete", s(&store), "nope"]);
    assert!(e.contains("no volume nope"), "{e}");
    // A library's directory (or its chunk store) is not a store of volumes.
    let lib = t.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    ok(&["dedup", "enable", s(&lib)]);
    let e = fails(&["dedup", "volume", "list", s(&lib)]);
    assert!(e.contains("is not a dedup store of volumes"), "{e}");
    let e = fails(&["dedup", "volume", "list", s(&lib.join(".vstor-dedup"))]);
    assert!(e.contains("not a store of volumes"), "{e}");
    // An index copied from another store is refused by the store's id.
    let other = t.path().join("other");
    ok(&["dedup", "create", s(&other)]);
    std::fs::copy(other.join("index.redb"), store.join("index.redb")).unwrap();
    let e = fails(&["disk", "info", &format!("dedup:{}/v", s(&store))]);
    assert!(e.contains("belongs to store"), "{e}");
}

/// `vstor serve` exports two volumes of one store (one process serves every volume of a
/// store): `qemu-img compare` reads them over NBD as the files written into them, and a
/// `qemu-img convert -n` into a clone lands, survives the daemon's shutdown, and leaves gold
/// as it was.
#[test]
fn serve_exports_volumes_that_qemu_img_compares() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let t = tempfile::tempdir().unwrap();
    let (store, g) = volume_store(t.path());
    ok(&["dedup", "volume", "clone", s(&store), "gold", "vm1"]);
    let (ctl, sock) = (t.path().join("c.sock"), t.path().join("n.sock"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(["serve", "--control", s(&ctl), "--nbd"])
        .arg(format!("unix:{}", s(&sock)))
        .arg("--export")
        .arg(format!("gold=dedup:{}/gold,readonly=on", s(&store)))
        .arg("--export")
        .arg(format!("vm1=dedup:{}/vm1", s(&store)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vstor serve");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("vstor serve exited before it was ready: {log}");
        }
        log.push_str(&line);
        if line.starts_with("vstor serve: ready in ") {
            break;
        }
    }
    let logger = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        rest
    });
    let uri = |e: &str| format!("nbd+unix:///{e}?socket={}", s(&sock));
    let gold_raw = t.path().join("gold.raw");
    let compare = |a: &str, b: &str| qemu_img(&["compare", "-f", "raw", a, "-F", "raw", b]);
    let o = compare(&uri("gold"), s(&gold_raw));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = compare(&uri("vm1"), s(&gold_raw));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // New content for vm1: gold's with a changed middle and a hole.
    let mut new = g.clone();
    new[5 << 20..7 << 20].copy_from_slice(&noise(2 << 20, 3));
    new[12 << 20..14 << 20].fill(0);
    let new_raw = t.path().join("new.raw");
    std::fs::write(&new_raw, &new).unwrap();
    let o = qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        s(&new_raw),
        "-O",
        "raw",
        &uri("vm1"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = compare(&uri("vm1"), s(&new_raw));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = compare(&uri("vm1"), s(&gold_raw));
    assert!(!o.status.success(), "compare looks at the bytes");
    ok(&["server", "shutdown", "--server", s(&ctl)]);
    let st = child.wait().unwrap();
    let rest = logger.join().unwrap();
    assert!(st.success(), "vstor serve exited {st}: {log}{rest}");
    let vm1 = format!("dedup:{}/vm1", s(&store));
    let gold = format!("dedup:{}/gold", s(&store));
    assert!(
        read_target(t.path(), &vm1, 0, 16 << 20) == new,
        "vm1 after the daemon"
    );
    assert!(
        read_target(t.path(), &gold, 0, 16 << 20) == g,
        "gold after the daemon"
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
    // As root the documented `umount MNT`; as another user (who may not umount) SIGTERM, on
    // which the server unmounts through fusermount.
    let st = if Command::new("id").arg("-u").output().unwrap().stdout == b"0\n" {
        Command::new("umount").arg(&mnt).status().unwrap()
    } else {
        let pid = m.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap()
    };
    assert!(st.success(), "unmount");
    let st = m.child.wait().unwrap();
    assert!(st.success(), "vstor dedup mount exited with {st}");
    assert!(!mnt.join("gold.vhdx").exists());
}
