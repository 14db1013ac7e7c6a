//! Replays the NBD fuzz targets' kept inputs (`fuzz/regressions/nbd_*/`) and a few fixed ones
//! through the targets' logic (`fuzz_logic/`): nothing may panic, hang or go unanswered.

mod fuzz_logic;

use std::path::Path;

/// The files of `fuzz/regressions/<target>/` (none if it does not exist yet).
fn kept(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// A record of the connection target: kind, flags, offset, length, payload choice and byte.
fn record(kind: u8, flags: u8, off: u32, len: u32, whole: bool) -> Vec<u8> {
    let mut r = vec![kind, flags];
    r.extend_from_slice(&off.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r.push(if whole { 0 } else { 1 });
    r.push(0x5a);
    r
}

#[test]
fn option_and_request_parsers() {
    let mut fixed: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 64],
        [0u8, 0, 0, 1, b'd', 0, 1, 0, 3].to_vec(),
        [0u8, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5]
            .iter()
            .chain(b"qemu:")
            .copied()
            .collect(),
    ];
    let mut h = vstor_serve::nbd::proto::IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&[0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]);
    fixed.push(h);
    let mut r = vstor_serve::nbd::proto::REQUEST_MAGIC
        .to_be_bytes()
        .to_vec();
    r.extend_from_slice(&[0xff; 24]);
    fixed.push(r);
    for d in &fixed {
        fuzz_logic::options(d);
        fuzz_logic::requests(d);
    }
    for (name, d) in kept("nbd_options") {
        eprintln!("{name}");
        fuzz_logic::options(&d);
    }
    for (name, d) in kept("nbd_requests") {
        eprintln!("{name}");
        fuzz_logic::requests(&d);
    }
}

#[test]
fn whole_connections() {
    let mut fixed: Vec<Vec<u8>> = vec![vec![], vec![0], vec![1], vec![0xff; 100]];
    // Structured, with contexts, on the writable export: every command, good and bad.
    for mode in [1u8 | 2 | 4 | 16, 1 | 16, 1 | 2 | 8 | 16] {
        let mut d = vec![mode];
        // Every command but DISC (which ends the records) and the WRITE that ends the
        // connection (an input of its own below).
        for kind in (0..10u8).filter(|&k| k != 2) {
            d.extend(record(kind, 0, 0, 8, true));
            if kind != 1 {
                d.extend(record(kind, 0x81, 3 << 30, 3 << 30, true));
            }
            d.extend(record(kind, 1, 1 << 30, (1 << 30) | 100, true));
        }
        d.extend(record(1, 0, 2 << 30, 16, true));
        d.extend(record(1, 0, 0, 200, false));
        fixed.push(d);
        let mut d = vec![mode];
        d.extend(record(0, 0, 0, 2 << 30, true));
        d.extend(record(1, 0, 0, 2 << 30, true));
        fixed.push(d);
    }
    for d in &fixed {
        fuzz_logic::connection(d);
    }
    for (name, d) in kept("nbd_conn") {
        eprintln!("{name}");
        fuzz_logic::connection(&d);
    }
}
