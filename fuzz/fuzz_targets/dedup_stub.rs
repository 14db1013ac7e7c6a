//! Fuzzes dedup stubs (header, chunk list, write log) and container/record headers: parsed,
//! opened against a small real store, read, written and resized. Oracles: no panic, no
//! unbounded allocation (see vstor_dedup::fuzz).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use vstor_dedup::vfs::SimFs;

static FIXTURE: OnceLock<(SimFs, Vec<u8>)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (sim, _) = FIXTURE.get_or_init(vstor_dedup::fuzz::fixture);
    vstor_dedup::fuzz::run(sim, data);
});
