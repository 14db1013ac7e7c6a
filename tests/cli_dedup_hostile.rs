//! Hostile tests of inline dedup volumes (`vstor dedup create`, `vstor dedup volume ...`, the
//! `dedup:STORE/NAME` target): crashes, careless operators, damaged files and concurrent
//! writers. Tests marked `#[ignore = "defect: ..."]` show a defect and fail until it is fixed.

mod common;

use common::{fails, ok, s, vstor};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use vstor_dedup::VolumeStore;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("json")
}

/// Bytes that do not repeat within a block (so no two blocks dedup), from a seed.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| {
            (i.wrapping_add(seed.wrapping_mul(0x9e37_79b9))
                .wrapping_mul(2654435761)
                >> 13) as u8
        })
        .collect()
}

/// A store `vols` in `t` with a volume `name` of `size` bytes written from `data` at 0.
fn store_with(t: &Path, name: &str, size: &str, data: &[u8]) -> PathBuf {
    let store = t.join("vols");
    ok(&["dedup", "create", s(&store)]);
    ok(&["dedup", "volume", "create", s(&store), name, "--size", size]);
    write_file(t, &store, name, 0, data);
    store
}

fn target(store: &Path, name: &str) -> String {
    format!("dedup:{}/{}", s(store), name)
}

fn write_file(t: &Path, store: &Path, name: &str, off: u64, data: &[u8]) {
    let f = t.join("in.raw");
    std::fs::write(&f, data).unwrap();
    ok(&[
        "disk",
        "write",
        &target(store, name),
        "--offset",
        &off.to_string(),
        "--input",
        s(&f),
    ]);
}

/// Reads `len` bytes at `off` of a volume, or the command's stderr when it fails.
fn try_read(t: &Path, store: &Path, name: &str, off: u64, len: u64) -> Result<Vec<u8>, String> {
    let out = t.join("read.out");
    let _ = std::fs::remove_file(&out);
    let o = vstor(&[
        "disk",
        "read",
        &target(store, name),
        "--offset",
        &off.to_string(),
        "--length",
        &len.to_string(),
        "--output",
        s(&out),
    ]);
    if o.status.success() {
        Ok(std::fs::read(out).unwrap())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn read(t: &Path, store: &Path, name: &str, off: u64, len: u64) -> Vec<u8> {
    try_read(t, store, name, off, len).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

fn list(store: &Path) -> serde_json::Value {
    json(&ok(&["dedup", "volume", "list", s(store), "--json"]))
}

/// Deletes every volume, then the store must hold no chunk and no mapped byte (every
/// reference was counted once and dropped once).
fn delete_all_leaves_nothing(store: &Path) {
    let l = list(store);
    for v in l["volumes"].as_array().unwrap() {
        ok(&[
            "dedup",
            "volume",
            "delete",
            s(store),
            v["name"].as_str().unwrap(),
        ]);
    }
    let l = list(store);
    assert_eq!(l["volumes"].as_array().unwrap().len(), 0, "{l}");
    assert_eq!(l["mapped_bytes"], 0, "{l}");
    assert_eq!(l["chunks"], 0, "{l}");
}

/// Clones stand on their own: writes to gold after the clone, deleting gold while clones
/// exist, a clone of a clone, deleting a clone, cloning into a name that exists.
#[test]
fn clones_outlive_writes_and_deletes_of_their_origin() {
    let t = tempfile::tempdir().unwrap();
    let g = noise(1 << 20, 1);
    let store = store_with(t.path(), "gold", "4M", &g);
    ok(&["dedup", "volume", "clone", s(&store), "gold", "c1"]);
    // gold writes after the clone do not show in the clone.
    ok(&[
        "disk",
        "write",
        &target(&store, "gold"),
        "--length",
        "8k",
        "--pattern",
        "0x11",
    ]);
    assert_eq!(read(t.path(), &store, "c1", 0, 1 << 20), g);
    ok(&["dedup", "volume", "clone", s(&store), "c1", "c2"]);
    let e = fails(&["dedup", "volume", "clone", s(&store), "gold", "c1"]);
    assert!(e.contains("c1 already exists"), "{e}");
    // A clone's write is its own.
    ok(&[
        "disk",
        "write",
        &target(&store, "c2"),
        "--offset",
        "12k",
        "--length",
        "4k",
        "--pattern",
        "0x22",
    ]);
    ok(&["dedup", "volume", "delete", s(&store), "gold"]);
    assert_eq!(read(t.path(), &store, "c1", 0, 1 << 20), g);
    ok(&["dedup", "volume", "delete", s(&store), "c1"]);
    let mut want = g.clone();
    want[12 << 10..16 << 10].fill(0x22);
    assert_eq!(read(t.path(), &store, "c2", 0, 1 << 20), want);
    delete_all_leaves_nothing(&store);
}

/// Damaged containers are refused on read, in one line naming the chunk: a flipped byte, a
/// record copied over another, a truncated or missing container. Never wrong bytes.
#[test]
fn damaged_containers_are_refused_never_misread() {
    let t = tempfile::tempdir().unwrap();
    let g = noise(256 << 10, 2);
    let store = store_with(t.path(), "v", "1M", &g);
    let c = store.join("c/00000001");
    let orig = std::fs::read(&c).unwrap();
    let check = |what: &str, d: Vec<u8>| {
        std::fs::write(&c, d).unwrap();
        let e = try_read(t.path(), &store, "v", 0, 256 << 10).expect_err(&format!(
            "{what}: read the damaged container without an error"
        ));
        assert_eq!(e.lines().count(), 1, "{what}: {e}");
        assert!(
            e.contains("chunk") || e.contains("container"),
            "{what}: {e}"
        );
    };
    for at in [100, orig.len() / 2, orig.len() - 10] {
        let mut d = orig.clone();
        d[at] ^= 0xff;
        check(&format!("a byte flipped at {at}"), d);
    }
    // The first record copied over the second (records start with "CHNK").
    let starts: Vec<usize> = orig
        .windows(4)
        .enumerate()
        .filter(|(_, w)| w == b"CHNK")
        .map(|(i, _)| i)
        .take(2)
        .collect();
    let len = starts[1] - starts[0];
    let mut d = orig.clone();
    d.copy_within(starts[0]..starts[1], starts[1]);
    assert_eq!(d.len(), orig.len(), "{len}");
    check("a record copied over another", d);
    check("a truncated container", orig[..orig.len() / 2].to_vec());
    std::fs::remove_file(&c).unwrap();
    let e = try_read(t.path(), &store, "v", 0, 4096).unwrap_err();
    assert!(e.contains("container"), "{e}");
}

/// Names that could leave the store or hide in it, and absurd sizes, are refused in one line;
/// the largest size works at its last block; a STORE that is a file is refused.
#[test]
fn bad_names_sizes_and_paths_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("vols");
    ok(&["dedup", "create", s(&store)]);
    let long = "a".repeat(129);
    for n in ["a/b", "..", ".", ".x", "x y", "a\\b", long.as_str()] {
        let e = fails(&["dedup", "volume", "create", s(&store), n, "--size", "1M"]);
        assert!(e.contains("is not a volume name"), "{n}: {e}");
    }
    for sz in ["0", "4095", "4097", "65T", "18446744073709551615"] {
        let e = fails(&["dedup", "volume", "create", s(&store), "v", "--size", sz]);
        assert!(e.contains("volume size") || e.contains("size"), "{sz}: {e}");
    }
    ok(&[
        "dedup",
        "volume",
        "create",
        s(&store),
        "big",
        "--size",
        "64T",
    ]);
    let last = ((64u64 << 40) - 4096).to_string();
    let big = target(&store, "big");
    ok(&[
        "disk",
        "write",
        &big,
        "--offset",
        &last,
        "--length",
        "4k",
        "--pattern",
        "0x77",
    ]);
    let e = fails(&[
        "disk",
        "write",
        &big,
        "--offset",
        &last,
        "--length",
        "8k",
        "--pattern",
        "1",
    ]);
    assert!(e.contains("past the end"), "{e}");
    assert_eq!(
        read(t.path(), &store, "big", (64 << 40) - 16, 16),
        vec![0x77; 16]
    );
    // Nothing escaped the store's directory.
    let mut names: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["c", "index.redb", "store"]);
    let f = t.path().join("file");
    std::fs::write(&f, b"x").unwrap();
    let e = fails(&["dedup", "create", s(&f)]);
    assert!(e.contains("is a file"), "{e}");
    let e = fails(&["disk", "read", &target(&f, "v"), "--length", "4"]);
    assert!(e.contains("not a dedup store of volumes"), "{e}");
    assert_eq!(std::fs::read(&f).unwrap(), b"x");
}

/// One process per store: while this test process holds the store, every other command on
/// it (a writer of another volume, a reader, list, delete, `locking=off`) is refused with
/// status 75, and the store is unchanged.
#[test]
fn a_second_process_is_refused_at_once() {
    let t = tempfile::tempdir().unwrap();
    let g = noise(64 << 10, 3);
    let store = store_with(t.path(), "v", "1M", &g);
    ok(&["dedup", "volume", "create", s(&store), "w", "--size", "1M"]);
    let held = VolumeStore::shared(&store).unwrap();
    let v = held.open_volume("v", false).unwrap();
    for args in [
        vec![
            "disk",
            "write",
            &target(&store, "w"),
            "--length",
            "4k",
            "--pattern",
            "1",
        ],
        vec![
            "disk",
            "write",
            &format!("{},locking=off", target(&store, "v")),
            "--length",
            "4k",
            "--pattern",
            "1",
        ],
        vec![
            "disk",
            "read",
            &format!("{},readonly=on", target(&store, "v")),
            "--length",
            "4",
        ],
        vec!["dedup", "volume", "list", s(&store)],
        vec!["dedup", "volume", "delete", s(&store), "w"],
    ] {
        let o = vstor(&args.iter().map(|a| a.as_ref()).collect::<Vec<&str>>());
        assert_eq!(o.status.code(), Some(75), "{args:?}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("in use by another process"),
            "{o:?}"
        );
    }
    drop(v);
    drop(held);
    assert_eq!(read(t.path(), &store, "v", 0, 64 << 10), g);
    assert_eq!(list(&store)["volumes"].as_array().unwrap().len(), 2);
}

/// `kill -9` of a writer at several moments: what was flushed before reads back, the store
/// opens, and references stay counted (delete everything, nothing stays referenced).
#[test]
fn kill_9_during_writes_keeps_what_was_flushed() {
    let t = tempfile::tempdir().unwrap();
    let g = noise(1 << 20, 4);
    let store = store_with(t.path(), "v", "64M", &g);
    ok(&["dedup", "volume", "clone", s(&store), "v", "c"]);
    let big = t.path().join("big.raw");
    std::fs::write(&big, noise(24 << 20, 5)).unwrap();
    for (i, ms) in [5u64, 40, 120, 300].into_iter().enumerate() {
        let vol = if i % 2 == 0 { "v" } else { "c" };
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args([
                "disk",
                "write",
                &target(&store, vol),
                "--offset",
                "1M",
                "--input",
                s(&big),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let _ = child.kill();
        child.wait().unwrap();
        assert_eq!(
            read(t.path(), &store, "v", 0, 1 << 20),
            g,
            "after a kill at {ms} ms"
        );
        assert_eq!(
            read(t.path(), &store, "c", 0, 1 << 20),
            g,
            "after a kill at {ms} ms"
        );
        // What the killed writer left is either all of it or none of each block.
        let after = read(t.path(), &store, vol, 1 << 20, 24 << 20);
        let want = noise(24 << 20, 5);
        for (b, (got, w)) in after.chunks(4096).zip(want.chunks(4096)).enumerate() {
            assert!(
                got == w || got.iter().all(|&x| x == 0),
                "block {b} is neither"
            );
        }
    }
    delete_all_leaves_nothing(&store);
}

/// `vstor dedup enable` and `optimize` on a directory that is (or holds) a store of volumes
/// turn the store's own index and containers into stubs: every volume is then unreadable
/// ("Not a redb database: magic number mismatch") until `unoptimize`.
#[test]
fn optimize_leaves_a_store_of_volumes_alone() {
    let t = tempfile::tempdir().unwrap();
    let g = noise(256 << 10, 6);
    // The store itself made a library.
    let store = store_with(t.path(), "v", "1M", &g);
    if vstor(&["dedup", "enable", s(&store)]).status.success() {
        let _ = vstor(&["dedup", "optimize", s(&store)]);
    }
    let got = try_read(t.path(), &store, "v", 0, 256 << 10);
    assert!(
        got.as_ref() == Ok(&g),
        "the store made a library: {:?}",
        got.err()
    );
    // A store of volumes inside a library.
    let lib = t.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    ok(&["dedup", "enable", s(&lib)]);
    let inner = lib.join("vols");
    ok(&["dedup", "create", s(&inner)]);
    ok(&["dedup", "volume", "create", s(&inner), "v", "--size", "1M"]);
    write_file(t.path(), &inner, "v", 0, &g);
    let _ = vstor(&["dedup", "optimize", s(&lib)]);
    let got = try_read(t.path(), &inner, "v", 0, 256 << 10);
    assert!(
        got.as_ref() == Ok(&g),
        "a store in a library: {:?}",
        got.err()
    );
}

/// One damaged byte in the index (a redb B-tree page of the block maps) makes blocks read as
/// zeroes, silently (exit 0), where data was: the block maps carry no check of their own.
#[test]
#[ignore = "defect: a flipped byte in index.redb silently turns written blocks into zeroes (exit 0)"]
fn damaged_index_never_reads_zeroes_silently() {
    let t = tempfile::tempdir().unwrap();
    let g = noise(1 << 20, 7);
    let store = store_with(t.path(), "v", "4M", &g);
    let idx = store.join("index.redb");
    let orig = std::fs::read(&idx).unwrap();
    let mut silent = Vec::new();
    // One byte in each 4 KiB page, in its body.
    for at in (0..orig.len()).step_by(4096).map(|p| p + 700) {
        let mut d = orig.clone();
        d[at] ^= 0xff;
        std::fs::write(&idx, &d).unwrap();
        if let Ok(got) = try_read(t.path(), &store, "v", 0, 1 << 20) {
            if got != g {
                let lost = got
                    .chunks(4096)
                    .zip(g.chunks(4096))
                    .filter(|(a, b)| a != b)
                    .count();
                silent.push((at, lost));
            }
        }
    }
    std::fs::write(&idx, &orig).unwrap();
    assert!(
        silent.is_empty(),
        "(byte flipped, blocks read wrong without an error): {silent:?}"
    );
}

/// A `vstor serve` of `dedup:STORE/v` on `sock`, ready.
fn serve(store: &Path, sock: &Path) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(["serve", "--nbd"])
        .arg(format!("unix:{}", s(sock)))
        .arg("--export")
        .arg(format!("v={}", target(store, "v")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vstor serve");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("vstor serve exited before it was ready");
        }
        if line.starts_with("vstor serve: ready in ") {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    child
}

fn qemu(tool: &str, args: &[String]) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is installed by scripts/test (qemu-utils): {e}"))
}

/// Six NBD clients (qemu-io, 400 queued 4 KiB writes each) write the 16 blocks of a volume
/// at once through `vstor serve`; all of them finish, a flush returns, and the daemon then
/// serves one content (read twice, the same), but after a `kill -9` (or with a second flush
/// first, so nothing acknowledged can be left out) the volume reads other content in some
/// blocks, each an older write. The block map in memory and the batch committed at flush
/// are updated under different locks (`put_block` then `own.insert` in `write_block`), so
/// two writes of one block can land in them in different orders. Seen in about one run of
/// three on 2 loaded cores; up to 12 runs here.
#[test]
fn racing_writes_of_a_block_read_the_same_after_a_crash() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("vols");
    ok(&["dedup", "create", s(&store)]);
    ok(&["dedup", "volume", "create", s(&store), "v", "--size", "64k"]);
    let sock = t.path().join("n.sock");
    let uri = format!("nbd+unix:///v?socket={}", s(&sock));
    let live = t.path().join("live.raw");
    let mut diverged = Vec::new();
    for round in 0..12 {
        let mut child = serve(&store, &sock);
        let clients: Vec<_> = (1..=6u32)
            .map(|k| {
                let mut args = vec!["-f".to_string(), "raw".to_string(), uri.clone()];
                for j in 0..400u32 {
                    let pat = (k * 40 + j % 40) % 255 + 1;
                    args.push("-c".into());
                    args.push(format!("aio_write -P {pat} {} 4k", (j % 16) * 4096));
                }
                args.push("-c".into());
                args.push("aio_flush".into());
                std::thread::spawn(move || qemu("qemu-io", &args))
            })
            .collect();
        for c in clients {
            let o = c.join().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let flush = || {
            let o = qemu(
                "qemu-io",
                &[
                    "-f".into(),
                    "raw".into(),
                    uri.clone(),
                    "-c".into(),
                    "flush".into(),
                ],
            );
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        flush();
        let _ = std::fs::remove_file(&live);
        let o = qemu(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &uri, s(&live)].map(String::from),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        flush();
        child.kill().unwrap();
        child.wait().unwrap();
        let served = std::fs::read(&live).unwrap();
        let after = read(t.path(), &store, "v", 0, 64 << 10);
        let blocks: Vec<(usize, u8, u8)> = served
            .chunks(4096)
            .zip(after.chunks(4096))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i, a[0], b[0]))
            .collect();
        if !blocks.is_empty() {
            diverged.push((round, blocks));
            break;
        }
    }
    assert!(
        diverged.is_empty(),
        "(run, [(block, byte served after flush, byte read after kill -9)]): {diverged:?}"
    );
}

/// A full disk under a running store: a write fails with "no space", and so does the flush.
/// Once space is free again (the operator deletes a file), the same process must flush and
/// write again, as qemu does after ENOSPC and dm-vdo once space is discarded. Seen with
/// `vstor serve` on an 8 MiB tmpfs: after one ENOSPC, every later flush and write of every
/// volume of the store fails (EIO) with 3 MiB free, until the daemon restarts; what the
/// volumes served meanwhile is lost at a crash.
#[test]
#[ignore = "defect: after one ENOSPC a store never flushes or writes again in that process, even once space is free"]
fn a_full_disk_is_recovered_from_once_space_is_free() {
    use vstor_dedup::vfs::{SimFs, Vfs};
    let sim = SimFs::new();
    let fs: Arc<dyn Vfs> = Arc::new(sim.clone());
    let dir = Path::new("/store");
    VolumeStore::create(fs.clone(), dir).unwrap();
    let vs = VolumeStore::open(fs.clone(), dir, true).unwrap();
    vs.create_volume("v", 64 << 20).unwrap();
    let v = vs.open_volume("v", false).unwrap();
    let a = noise(2 << 20, 8);
    v.write(0, &a).unwrap();
    v.flush().unwrap();
    // 1 MiB left: 3 MiB of new blocks do not fit.
    sim.set_capacity(Some(sim.used() + (1 << 20)));
    let b = noise(3 << 20, 9);
    let e = v.write(4 << 20, &b).and_then(|_| v.flush());
    assert!(e.is_err(), "3 MiB went into 1 MiB");
    // Space again.
    sim.set_capacity(None);
    let c = noise(64 << 10, 10);
    let after: Vec<String> = [v.flush().err(), v.write(8 << 20, &c).err(), v.flush().err()]
        .into_iter()
        .flatten()
        .map(|e| e.to_string())
        .collect();
    assert!(after.is_empty(), "with space free again: {after:?}");
    drop(v);
    drop(vs);
    let vs = VolumeStore::open(fs.clone(), dir, true).unwrap();
    let v = vs.open_volume("v", true).unwrap();
    let mut got = vec![0u8; 64 << 10];
    v.read(8 << 20, &mut got).unwrap();
    assert!(got == c, "the write after the full disk is not durable");
    let mut got = vec![0u8; 2 << 20];
    v.read(0, &mut got).unwrap();
    assert!(got == a, "the data flushed before the full disk changed");
}
