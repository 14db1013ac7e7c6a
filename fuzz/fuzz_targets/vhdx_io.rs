//! Reads, writes, discards, write-zeroes, flushes and reopens on a VHDX image (a valid one, or
//! one patched as in `vhdx_open`). Nothing may panic; an image closed cleanly reopens; an
//! unpatched image reads back exactly what was written (a model of every sector). The input
//! format and the oracles are in `vhdx/tests/fuzz_logic/mod.rs`, shared with the regression
//! replay test `vhdx/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../vhdx/tests/fuzz_logic/mod.rs"]
mod fuzz_logic;

fuzz_target!(|data: &[u8]| fuzz_logic::run_io(data));
