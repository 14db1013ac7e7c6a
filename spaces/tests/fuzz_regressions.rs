//! Replays the `pool_open` fuzz target's logic on fixed inputs and on every file kept in
//! `fuzz/regressions/pool_open/`: nothing may panic.

#[path = "fuzz_logic/mod.rs"]
mod fuzz_logic;

#[test]
fn fixed_inputs_and_kept_regressions_do_not_panic() {
    // Raw bytes as member 0's, 1's and 2's metadata areas.
    for mode in [1u8, 3, 5] {
        fuzz_logic::run_open(&[mode]);
        fuzz_logic::run_open(&[mode, 0x56, 0x53, 0x54, 0x50, 0x4f, 0x4f, 0x4c, 0x31]);
    }
    // Patches, re-sealed, over each header field of slot A and B of every member.
    for member in 0..3u8 {
        for at in (0..264u32).step_by(16) {
            for reseal in [0u8, 1] {
                for value in [0u8, 0xff] {
                    let b = at.to_le_bytes();
                    let input = [
                        0,
                        member,
                        (b[0] & 0xfe) | reseal,
                        b[1],
                        b[2],
                        4,
                        value,
                        value,
                        value,
                        value,
                    ];
                    fuzz_logic::run_open(&input);
                }
            }
        }
    }
    // Inputs a fuzzer found, if any were kept.
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/pool_open");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            fuzz_logic::run_open(&std::fs::read(e.path()).unwrap());
        }
    }
}
