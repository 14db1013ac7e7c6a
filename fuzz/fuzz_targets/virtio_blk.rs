//! The virtio-blk device model and its virtio-mmio transport driven by an arbitrary guest, without
//! KVM: register accesses, descriptor tables, available rings and request headers from the
//! input, optionally after a correct driver setup. Nothing may panic or hang. The input format is
//! in `vmm/tests/fuzz_logic/mod.rs`, shared with the regression replay test
//! `vmm/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../vmm/tests/fuzz_logic/mod.rs"]
mod fuzz_logic;

fuzz_target!(|data: &[u8]| {
    fuzz_logic::run(data);
});
