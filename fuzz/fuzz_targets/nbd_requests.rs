//! The NBD server's request header parser (parse_request) over
//! arbitrary bytes: nothing may panic, and what parses must encode back to the same bytes.
//! Logic in `serve/tests/fuzz_logic/mod.rs`, replayed with `regressions/nbd_requests/` by
//! `cargo test -p vstor-serve --test fuzz_regressions`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../serve/tests/fuzz_logic/mod.rs"]
mod fuzz_logic;

fuzz_target!(|data: &[u8]| {
    fuzz_logic::requests(data);
});
