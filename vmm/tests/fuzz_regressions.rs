//! Replays the inputs kept in fuzz/regressions/virtio_blk/ (inputs that once found a bug in the
//! device model) through the `virtio_blk` fuzz target's logic, and checks that the logic serves a
//! well-formed guest.

mod fuzz_logic;

use std::path::Path;
use std::time::Duration;

#[test]
fn a_well_formed_guest_is_served() {
    let out = fuzz_logic::run(&fuzz_logic::well_formed_write_and_read());
    assert_eq!(out.used_idx, 2, "{out:?}");
    assert_eq!((out.stats.writes, out.stats.reads), (1, 1), "{out:?}");
    assert_eq!(out.stats.errors, 0, "{out:?}");
}

#[test]
fn a_read_only_disk_refuses_the_write() {
    let mut input = fuzz_logic::well_formed_write_and_read();
    input[0] |= 1;
    let out = fuzz_logic::run(&input);
    assert_eq!(out.used_idx, 2, "{out:?}");
    assert_eq!(
        (out.stats.writes, out.stats.reads, out.stats.errors),
        (0, 1, 1)
    );
}

#[test]
fn regressions_replay() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/virtio_blk");
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            println!("replaying {}", path.display());
            // One found a hang: each must finish, and quickly.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                fuzz_logic::run(&data);
                let _ = tx.send(());
            });
            assert!(
                rx.recv_timeout(Duration::from_secs(20)).is_ok(),
                "{} did not finish (hung or panicked)",
                path.display()
            );
            n += 1;
        }
    }
    println!("{n} regression inputs replayed from {}", dir.display());
    assert!(n > 0, "no regression inputs in {}", dir.display());
}
