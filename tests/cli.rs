//! End-to-end tests of the `vstor` command line, run as a user would run it.

use std::path::{Path, PathBuf};
mod common;

use common::{fails, ok, s};
use std::process::Command;

fn disk(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    ok(&["disk", "create", p.to_str().unwrap(), "--size", size]);
    p
}

#[test]
fn create_write_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "d.raw", "1M");
    assert_eq!(std::fs::metadata(&d).unwrap().len(), 1 << 20);

    ok(&[
        "disk",
        "write",
        s(&d),
        "--offset",
        "4k",
        "--length",
        "8k",
        "--pattern",
        "0xab",
    ]);
    // An unaligned write in the middle keeps its neighbours.
    ok(&[
        "disk",
        "write",
        s(&d),
        "--offset",
        "5000",
        "--length",
        "3",
        "--pattern",
        "67",
    ]);
    let bytes = std::fs::read(&d).unwrap();
    assert!(bytes[..4096].iter().all(|&b| b == 0));
    assert!(bytes[4096..5000].iter().all(|&b| b == 0xab));
    assert_eq!(&bytes[5000..5003], &[67, 67, 67]);
    assert!(bytes[5003..12288].iter().all(|&b| b == 0xab));
    assert!(bytes[12288..].iter().all(|&b| b == 0));

    // Hex dump, as xxd prints it, numbered from the device offset.
    let dump = ok(&["disk", "read", s(&d), "--offset", "4096", "--length", "20"]);
    assert_eq!(
        dump,
        "00001000: abab abab abab abab abab abab abab abab  ................\n\
         00001010: abab abab                                ....\n"
    );

    // Raw bytes to a file.
    let out = dir.path().join("out.bin");
    ok(&[
        "disk",
        "read",
        s(&d),
        "--offset",
        "4999",
        "--length",
        "5",
        "--output",
        s(&out),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), vec![0xab, 67, 67, 67, 0xab]);
}

#[test]
fn write_from_file_and_direct_io() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "d.raw", "1M");
    let input = dir.path().join("in.bin");
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    ok(&[
        "disk",
        "write",
        s(&d),
        "--offset",
        "64k",
        "--input",
        s(&input),
        "--direct",
    ]);
    ok(&[
        "disk",
        "write",
        s(&d),
        "--offset",
        "0",
        "--input",
        s(&input),
        "--length",
        "512",
        "--engine",
        "sync",
    ]);
    let out = dir.path().join("out.bin");
    ok(&[
        "disk",
        "read",
        s(&d),
        "--offset",
        "64k",
        "--length",
        "64k",
        "--output",
        s(&out),
        "--direct",
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let bytes = std::fs::read(&d).unwrap();
    assert_eq!(&bytes[..512], &data[..512]);
    assert!(bytes[512..65536].iter().all(|&b| b == 0));
}

#[test]
fn bench_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "d.raw", "4M");
    let out = ok(&[
        "disk",
        "bench",
        s(&d),
        "-c",
        "2000",
        "-d",
        "16",
        "-s",
        "4k",
        "-w",
        "--pattern",
        "0x5a",
        "-t",
        "none",
    ]);
    assert!(out.starts_with(
        "Sending 2000 write requests, 4096 bytes each, 16 in parallel (starting at offset 0, step size 4096)\n"
    ), "{out}");
    assert!(out.contains("\nRun completed in "), "{out}");
    assert!(out.contains("IOPS: "), "{out}");
    // 2000 sequential 4 KiB writes from 0 wrap modulo (4 MiB - 4 KiB): the first 1023 blocks
    // are written, the last block of the file never is.
    let bytes = std::fs::read(&d).unwrap();
    assert!(bytes[..(4 << 20) - 4096].iter().all(|&b| b == 0x5a));
    assert!(bytes[(4 << 20) - 4096..].iter().all(|&b| b == 0));

    for engine in ["io_uring", "sync"] {
        let json = ok(&[
            "disk",
            "bench",
            s(&d),
            "-c",
            "500",
            "-d",
            "8",
            "--random",
            "--engine",
            engine,
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["count"], 500);
        assert_eq!(v["rw"], "read");
        assert_eq!(v["random"], true);
        assert!(v["iops"].as_f64().unwrap() > 0.0);
        assert!(v["device"].as_str().unwrap().contains(engine), "{v}");
    }
}

#[test]
fn info_reports_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "d.raw", "3M");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["disk", "info", s(&d), "--json"])).unwrap();
    assert_eq!(v["virtual_size"], 3 << 20);
    assert_eq!(v["format"], "raw");
    assert_eq!(v["logical_sector_size"], 512);
    assert_eq!(v["allocated_bytes"], 0);
    assert_eq!(v["resizable"], true);
    let text = ok(&["disk", "info", s(&d)]);
    assert!(
        text.contains("virtual size:         3 MiB (3145728 bytes)"),
        "{text}"
    );
}

/// Bad input: a one-line error, a non-zero exit, and no file changed.
#[test]
fn bad_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "d.raw", "64k");
    ok(&[
        "disk",
        "write",
        s(&d),
        "--length",
        "64k",
        "--pattern",
        "0x11",
    ]);
    let before = std::fs::read(&d).unwrap();
    let missing = dir.path().join("missing.raw");

    let e = fails(&["disk", "read", s(&missing), "--length", "512"]);
    assert!(
        e.contains("missing.raw") && e.contains("No such file"),
        "{e}"
    );
    let e = fails(&[
        "disk",
        "write",
        s(&missing),
        "--length",
        "512",
        "--pattern",
        "1",
    ]);
    assert!(e.contains("missing.raw"), "{e}");
    assert!(
        !missing.exists(),
        "a failed write must not create the target"
    );

    let e = fails(&["disk", "read", s(&d), "--offset", "60k", "--length", "8k"]);
    assert!(e.contains("past the end"), "{e}");
    let e = fails(&[
        "disk",
        "write",
        s(&d),
        "--offset",
        "60k",
        "--length",
        "8k",
        "--pattern",
        "2",
    ]);
    assert!(e.contains("past the end"), "{e}");

    let e = fails(&[
        "disk",
        "write",
        s(&d),
        "--offset",
        "1",
        "--length",
        "512",
        "--pattern",
        "3",
        "--direct",
    ]);
    assert!(e.contains("unaligned direct I/O"), "{e}");
    let e = fails(&[
        "disk",
        "read",
        s(&d),
        "--offset",
        "0",
        "--length",
        "100",
        "--direct",
    ]);
    assert!(e.contains("unaligned direct I/O"), "{e}");

    let e = fails(&["disk", "write", s(&d), "--length", "12Q", "--pattern", "4"]);
    assert!(
        e.contains("invalid size '12Q'") && e.contains("unknown suffix 'Q'"),
        "{e}"
    );
    let e = fails(&[
        "disk",
        "create",
        s(&dir.path().join("n.raw")),
        "--size",
        "12Q",
    ]);
    assert!(e.contains("invalid size '12Q'"), "{e}");
    assert!(!dir.path().join("n.raw").exists());

    let e = fails(&[
        "disk",
        "write",
        &format!("{},bogus=1", s(&d)),
        "--length",
        "512",
        "--pattern",
        "5",
    ]);
    assert!(e.contains("unknown option 'bogus'"), "{e}");
    let e = fails(&["disk", "bench", s(&d), "-w", "-s", "100", "-c", "1"]);
    assert!(e.contains("request size 100"), "{e}");
    let e = fails(&["disk", "create", s(&d), "--size", "1M"]);
    assert!(e.contains("exists"), "{e}");
    let e = fails(&[
        "disk",
        "write",
        s(&dir.path().join("x.vhdx")),
        "--length",
        "512",
        "--pattern",
        "6",
    ]);
    assert!(e.contains("cannot open") && e.contains("x.vhdx"), "{e}");
    assert!(
        !dir.path().join("x.vhdx").exists(),
        "writing to a missing VHDX created it"
    );

    assert_eq!(
        std::fs::read(&d).unwrap(),
        before,
        "a failed command changed the file"
    );
}

/// qemu-io is the reference peer for raw files: what one writes, the other reads.
#[test]
fn interop_with_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "d.raw", "1M");
    ok(&[
        "disk",
        "write",
        s(&d),
        "--offset",
        "128k",
        "--length",
        "64k",
        "--pattern",
        "0xcd",
    ]);
    let q = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0xcd 128k 64k",
            "-c",
            "read -P 0 0 128k",
            s(&d),
        ])
        .output()
        .expect("qemu-io is installed by scripts/test (package qemu-utils)");
    let qout = String::from_utf8_lossy(&q.stdout);
    assert!(
        q.status.success() && !qout.contains("Pattern verification failed"),
        "{qout}"
    );

    let q = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x3c 512k 4k", s(&d)])
        .output()
        .unwrap();
    assert!(q.status.success());
    let dump = ok(&["disk", "read", s(&d), "--offset", "512k", "--length", "16"]);
    assert_eq!(
        dump,
        "00080000: 3c3c 3c3c 3c3c 3c3c 3c3c 3c3c 3c3c 3c3c  <<<<<<<<<<<<<<<<\n"
    );
}

#[test]
fn help_has_examples() {
    for cmd in [
        &["disk", "bench", "--help"][..],
        &["disk", "read", "--help"],
        &["--help"],
    ] {
        let out = ok(cmd);
        assert!(out.contains("vstor disk"), "{cmd:?}: {out}");
    }
}

#[test]
fn large_write_streams_in_pieces() {
    // 20 MiB from a file (three 8 MiB pieces, the last partial) at an unaligned offset.
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "d.raw", "32M");
    let input = dir.path().join("in.bin");
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    ok(&[
        "disk",
        "write",
        s(&d),
        "--offset",
        "1000",
        "--input",
        s(&input),
    ]);
    let bytes = std::fs::read(&d).unwrap();
    assert!(bytes[..1000].iter().all(|&b| b == 0));
    assert!(bytes[1000..1000 + data.len()] == data[..]);
    assert!(bytes[1000 + data.len()..].iter().all(|&b| b == 0));
    let e = fails(&[
        "disk",
        "write",
        s(&d),
        "--offset",
        "16M",
        "--input",
        s(&input),
    ]);
    assert!(e.contains("past the end"), "{e}");
    assert_eq!(
        std::fs::read(&d).unwrap(),
        bytes,
        "a refused write changed the disk"
    );
}

/// Regressions from review: commands that used to damage files or misdirect writes.
#[test]
fn read_output_never_damages_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "d.raw", "64k");
    ok(&[
        "disk",
        "write",
        s(&d),
        "--length",
        "64k",
        "--pattern",
        "0x42",
    ]);
    let image = std::fs::read(&d).unwrap();

    // The output is the target itself: refused, the image intact.
    let e = fails(&["disk", "read", s(&d), "--length", "4k", "--output", s(&d)]);
    assert!(e.contains("is the target itself"), "{e}");
    assert_eq!(std::fs::read(&d).unwrap(), image);

    // A read that cannot succeed leaves an existing output file as it was.
    let keep = dir.path().join("keep.bin");
    std::fs::write(&keep, b"precious").unwrap();
    let e = fails(&[
        "disk",
        "read",
        s(&d),
        "--offset",
        "1M",
        "--length",
        "1",
        "--output",
        s(&keep),
    ]);
    assert!(e.contains("past the end"), "{e}");
    assert_eq!(std::fs::read(&keep).unwrap(), b"precious");

    // A good read replaces it.
    ok(&["disk", "read", s(&d), "--length", "3", "--output", s(&keep)]);
    assert_eq!(std::fs::read(&keep).unwrap(), b"BBB");
}

#[test]
fn overflowing_sizes_are_refused_not_wrapped() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "d.raw", "64k");
    let before = std::fs::read(&d).unwrap();
    let e = fails(&[
        "disk",
        "write",
        s(&d),
        "--offset",
        "295147905179352825856E",
        "--length",
        "512",
        "-P",
        "0xee",
    ]);
    assert!(e.contains("too large"), "{e}");
    assert_eq!(std::fs::read(&d).unwrap(), before);
    let e = fails(&["disk", "bench", s(&d), "-d", "4096", "-s", "64M", "-c", "1"]);
    assert!(e.contains("1 GiB limit"), "{e}");
}

#[test]
fn piped_input_is_written_whole_or_not_at_all() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "d.raw", "64k");
    let pipe_write = |extra: &[&str]| {
        let mut args = vec![
            "disk",
            "write",
            s(&d),
            "--offset",
            "100",
            "--input",
            "/dev/stdin",
        ];
        args.extend_from_slice(extra);
        let mut c = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(b"hello").unwrap();
        c.wait_with_output().unwrap()
    };
    let o = pipe_write(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(&std::fs::read(&d).unwrap()[100..105], b"hello");

    std::fs::write(&d, vec![0u8; 64 << 10]).unwrap();
    let o = pipe_write(&["--length", "10"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("ended after 5 bytes"));
    assert!(
        std::fs::read(&d).unwrap().iter().all(|&b| b == 0),
        "a short pipe wrote something"
    );
}

/// `model=hdd` serves a raw file with a rotating disk's timing (issue 17's HDD to measure
/// against) and `--distribution zipf:THETA` skews random offsets as fio's does; bad values
/// are refused with one line.
#[test]
fn bench_an_emulated_hdd_with_zipf_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path(), "h.raw", "64M");
    let target = format!("raw:{},model=hdd", s(&d));
    let json = ok(&[
        "disk",
        "bench",
        &target,
        "--random",
        "--distribution",
        "zipf:1.2",
        "-c",
        "40",
        "-d",
        "4",
        "-s",
        "4k",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["device"]
            .as_str()
            .unwrap()
            .contains("hdd model (7200 rpm"),
        "{v}"
    );
    // One head: each request seeks (or not), rotates and transfers while the head is held,
    // so the model bounds the rate from above whatever the machine (sequential 4 KiB at
    // 180 MB/s would be 44,000 IOPS; these are random, most of them several ms each).
    let iops = v["iops"].as_f64().unwrap();
    assert!(
        iops > 0.0 && iops < 1000.0,
        "{iops} IOPS from an emulated HDD"
    );
    for (args, want) in [
        (vec!["--distribution", "zipf:1", "--random"], "not 1"),
        (vec!["--distribution", "zipf:x", "--random"], "THETA"),
        (vec!["--distribution", "pareto:1", "--random"], "zipf:THETA"),
        (vec!["--distribution", "zipf:1.2"], "--random"),
    ] {
        let mut a = vec!["disk", "bench", s(&d), "-c", "1"];
        a.extend(args);
        let e = fails(&a);
        assert!(e.contains(want), "{e}");
    }
    let e = fails(&[
        "disk",
        "read",
        &format!("raw:{},model=ssd", s(&d)),
        "--length",
        "4k",
    ]);
    assert!(e.contains("model=ssd"), "{e}");
    let e = fails(&[
        "disk",
        "read",
        &format!("pool:{}/x,model=hdd", s(dir.path())),
        "--length",
        "4k",
    ]);
    assert!(e.contains("raw base"), "{e}");
}
