//! vstor's vhost-user-blk backend under an arbitrary frontend, in-process: each input one
//! frontend connection (correct ring setups, raw messages of any code and payload with or
//! without descriptors, guest memory and descriptor tables from the input, requests kicked).
//! Nothing may panic, and after each frontend the backend must serve the next within five
//! seconds. Logic in `serve/tests/vhost_user_fuzz_logic/mod.rs`, replayed with
//! `regressions/vhost_user/` by `cargo test -p vstor-serve --test vhost_user_fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../serve/tests/vhost_user_fuzz_logic/mod.rs"]
mod vhost_user_fuzz_logic;

fuzz_target!(|data: &[u8]| {
    vhost_user_fuzz_logic::session(data);
});
