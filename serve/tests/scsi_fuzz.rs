//! Replays the `scsi_cdb` fuzz target's logic (serve/tests/scsi_fuzz_logic) on fixed inputs,
//! on the regressions in fuzz/regressions/scsi_cdb/ where there are any, and on 3000 seeded
//! random ones.

mod scsi_fuzz_logic;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn fixed_inputs() {
    assert!(scsi_fuzz_logic::run(&[]).is_empty());
    let mut a = Vec::new();
    // TEST UNIT READY from nexuses 0 and 1 (each finds its reset, then GOOD).
    for n in [0u8, 1, 0, 1] {
        a.extend_from_slice(&[n, 6, 0, 0, 0, 0, 0, 0, 0]);
    }
    // REGISTER AND IGNORE EXISTING KEY 7 from nexus 0, RESERVE Write Exclusive-RO.
    a.extend_from_slice(&[0x20, 10, 0x5f, 6, 0, 0, 0, 0, 0, 0, 24, 0, 3]);
    a.extend_from_slice(&[0; 8]);
    a.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 7]);
    a.extend_from_slice(&[0; 8]);
    a.extend_from_slice(&[0x20, 10, 0x5f, 1, 5, 0, 0, 0, 0, 0, 24, 0, 3]);
    a.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 7]);
    a.extend_from_slice(&[0; 16]);
    // WRITE 10 of one block from nexus 1 (not registered: conflict), then from nexus 0.
    for n in [0x21u8, 0x20] {
        a.extend_from_slice(&[n, 10, 0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0, 64]);
        a.extend_from_slice(&[0xaa; 512]);
    }
    assert_eq!(scsi_fuzz_logic::run(&a), vec![2, 2, 0, 0, 0, 0, 0x18, 0]);
}

#[test]
fn regressions() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/scsi_cdb");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        scsi_fuzz_logic::run(&std::fs::read(&p).unwrap());
    }
}

#[test]
fn seeded_random_inputs() {
    let mut state = 0x5c51_cdb0_u64;
    for _ in 0..3000 {
        let len = (splitmix(&mut state) % 4096) as usize;
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            data.extend_from_slice(&splitmix(&mut state).to_le_bytes());
        }
        data.truncate(len);
        // Favour known operation codes and matching Data-Out.
        for (i, b) in data.iter_mut().enumerate() {
            if i % 23 == 0 {
                *b |= 0x60;
                *b &= 0x7f;
            }
        }
        scsi_fuzz_logic::run(&data);
    }
}
