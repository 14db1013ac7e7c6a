//! Replays the `vhost_user` fuzz target's kept inputs (`fuzz/regressions/vhost_user/`), fixed
//! inputs for each of its operations, and a few hundred pseudo-random ones through its logic
//! (`vhost_user_fuzz_logic/`): no thread of the backend may panic, and after each frontend the
//! backend must serve the next.

mod vhost_user_fuzz_logic;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

static PANICKED: AtomicBool = AtomicBool::new(false);

/// The files of `fuzz/regressions/vhost_user/` (none if it does not exist yet).
fn kept() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/vhost_user");
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

#[test]
fn vhost_user_inputs_replay_without_a_panic_or_a_hang() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, Ordering::SeqCst);
        default(info);
    }));
    let mut inputs: Vec<(String, Vec<u8>)> = kept();
    // Fixed ones: nothing, each operation alone, a setup then requests of every type, a setup
    // then wild descriptors and a raw memory table without its descriptor.
    inputs.push(("empty".into(), vec![]));
    for op in 0..6u8 {
        inputs.push((format!("op {op}"), vec![op; 40]));
    }
    let mut requests = vec![0u8, 0];
    for typ in 0..16u8 {
        requests.extend_from_slice(&[5, typ % 5, typ, 7, 0, 3]);
    }
    inputs.push(("setup, then requests of every type".into(), requests));
    let mut wild = vec![0u8, 7];
    for i in 0..16u8 {
        wild.extend_from_slice(&[
            3,
            i,
            1,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x7f,
            0xff,
            0xff,
            1,
            i + 1,
        ]);
    }
    wild.extend_from_slice(&[4, 0, 4, 3, 4, 19]);
    inputs.push(("setup, then descriptors outside memory".into(), wild));
    inputs.push((
        "a memory table without its descriptor".into(),
        vec![1, 5, 1, 40, 1, 0, 0, 0],
    ));
    // Pseudo-random ones (xorshift, fixed seed), half of them behind a correct setup.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..300 {
        let len = (next() % 300) as usize;
        let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 {
            v.splice(0..0, [0u8, (next() % 8) as u8]);
        }
        inputs.push((format!("random {i}"), v));
    }
    for (name, data) in &inputs {
        vhost_user_fuzz_logic::session(data);
        assert!(
            !PANICKED.load(Ordering::SeqCst),
            "a backend thread panicked on {name}"
        );
    }
}
