//! Replays the `dedup_stub` fuzz target's body on the inputs under
//! fuzz/regressions/dedup_stub/ and on thousands of mutations of a valid stub (bit flips,
//! truncations, splices, fields set to extremes).

use vstor_dedup::fuzz::{fixture, run};

#[test]
fn mutated_stubs_never_panic() {
    let (sim, stub) = fixture();
    run(&sim, &stub);
    run(&sim, &[]);
    let mut rng = fastrand::Rng::with_seed(18);
    for i in 0..3000u32 {
        let mut b = stub.clone();
        match i % 5 {
            0 => {
                for _ in 0..rng.usize(1..8) {
                    let at = rng.usize(..b.len());
                    b[at] ^= 1 << rng.u8(0..8);
                }
            }
            1 => b.truncate(rng.usize(..b.len())),
            2 => {
                // A field set to an extreme, with the header's CRC made right again.
                let at = rng.usize(8..124);
                b[at] = [0u8, 0xff, 0x7f, 0x80][rng.usize(0..4)];
                let crc = crc(&b[..124]);
                b[124..128].copy_from_slice(&crc.to_le_bytes());
            }
            3 => {
                let at = rng.usize(..b.len());
                let extra: Vec<u8> = (0..rng.usize(1..200)).map(|_| rng.u8(..)).collect();
                b.splice(at..at, extra);
            }
            _ => {
                // Garbage after the log.
                b.extend((0..rng.usize(1..5000)).map(|_| rng.u8(..)));
            }
        }
        run(&sim, &b);
    }
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/dedup_stub");
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd {
            let p = e.unwrap().path();
            run(&sim, &std::fs::read(&p).unwrap());
        }
    }
}

fn crc(b: &[u8]) -> u32 {
    // CRC-32C (Castagnoli), bitwise: the test does not depend on the crate's implementation.
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}
