//! Crafted VHDX logs: one entry with many (huge) zero descriptors, entry headers in every few
//! sectors with lengths, counts and tails from the input, chains of valid entries with breaks,
//! and byte patches over them. Oracles: the search of the log stays within its linear work
//! bound, the in-memory replay holds at most five times the log's length, and it reads what a
//! replay into the file writes. The input format and the oracles are in
//! `vhdx/tests/log_shapes/mod.rs`, shared with `vhdx/tests/log.rs` (which also replays the
//! inputs saved under `fuzz/regressions/vhdx_log/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../vhdx/tests/log_shapes/mod.rs"]
mod log_shapes;

fuzz_target!(|data: &[u8]| log_shapes::run(data));
