//! The SCSI target core (serve/src/scsi): CDB parsing and execution of arbitrary command
//! sequences from three I_T nexuses on a memory-backed export, persistent reservations
//! included. Oracles: no panic, well-formed responses, PRgeneration never goes back, the
//! stored reservation state reads back the same. Logic in
//! `serve/tests/scsi_fuzz_logic/mod.rs`, replayed with `regressions/scsi_cdb/` by
//! `cargo test -p vstor-serve --test scsi_fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../serve/tests/scsi_fuzz_logic/mod.rs"]
mod scsi_fuzz_logic;

fuzz_target!(|data: &[u8]| {
    scsi_fuzz_logic::run(data);
});
