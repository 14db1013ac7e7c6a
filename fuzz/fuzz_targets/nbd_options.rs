//! The NBD server's option parsers (parse_option_header, parse_info, parse_meta and
//! match_contexts) over arbitrary bytes: nothing may panic, and what parses must encode back to
//! the same bytes.
//! Logic in `serve/tests/fuzz_logic/mod.rs`, replayed with `regressions/nbd_options/` by
//! `cargo test -p vstor-serve --test fuzz_regressions`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../serve/tests/fuzz_logic/mod.rs"]
mod fuzz_logic;

fuzz_target!(|data: &[u8]| {
    fuzz_logic::options(data);
});
