//! Arbitrary VHDX images opened every way: raw bytes, or a valid dynamic, fixed or differencing
//! image (clean, or with a log to replay) with patches over its headers, region tables,
//! metadata, BAT, log or parent. Nothing may panic, and the read-only (log replayed in memory)
//! and writable (log replayed in place) opens must agree. The input format and the oracles are
//! in `vhdx/tests/fuzz_logic/mod.rs`, shared with the regression replay test
//! `vhdx/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../vhdx/tests/fuzz_logic/mod.rs"]
mod fuzz_logic;

fuzz_target!(|data: &[u8]| fuzz_logic::run_open(data));
