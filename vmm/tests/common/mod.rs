//! Helpers shared by the VMM's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `vstor` binary, built beside `vstor-vmm` (the workspace's tests need it too).
pub fn vstor_bin() -> PathBuf {
    let vstor = Path::new(env!("CARGO_BIN_EXE_vstor-vmm")).with_file_name("vstor");
    assert!(
        vstor.exists(),
        "{} is missing: build it first (cargo build -p vstor --bin vstor)",
        vstor.display()
    );
    vstor
}

/// Runs `vstor` and returns its stdout; panics with its stderr if it fails.
pub fn vstor(args: &[&str]) -> String {
    let o = Command::new(vstor_bin())
        .args(args)
        .output()
        .expect("run vstor");
    assert!(
        o.status.success(),
        "vstor {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
