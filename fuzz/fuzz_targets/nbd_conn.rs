//! A whole NBD server connection in-process: a daemon over two 1 MiB memory exports (one
//! read-only) on a Unix socket, and each input one client. The first byte puts a correct
//! handshake in front (structured replies, meta contexts, which export) or not, and says
//! whether the rest is raw client bytes or 12-byte request records framed into requests.
//! Nothing may panic or hang, the server must end every connection once the input is over,
//! and with records every request must get exactly one well-formed reply. Logic in
//! `serve/tests/fuzz_logic/mod.rs`, replayed with `regressions/nbd_conn/` by
//! `cargo test -p vstor-serve --test fuzz_regressions`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../serve/tests/fuzz_logic/mod.rs"]
mod fuzz_logic;

fuzz_target!(|data: &[u8]| {
    fuzz_logic::connection(data);
});
