//! Pool metadata from untrusted disks: raw bytes as a member's metadata area, or patches
//! (optionally re-sealed with a valid CRC-32C) over the slots and bitmaps of a valid 3-member
//! pool with a mirror and a parity space. Opening (read-only and writable), reading, writing
//! and scrubbing must never panic. The logic is in `spaces/tests/fuzz_logic/mod.rs`, shared
//! with the regression replay test `spaces/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../spaces/tests/fuzz_logic/mod.rs"]
mod fuzz_logic;

fuzz_target!(|data: &[u8]| fuzz_logic::run_open(data));
