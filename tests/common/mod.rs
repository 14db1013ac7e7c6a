//! Helpers shared by the end-to-end CLI tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the vstor binary.
pub fn vstor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(args)
        .output()
        .expect("run vstor")
}

pub fn ok(args: &[&str]) -> String {
    let o = vstor(args);
    assert!(
        o.status.success(),
        "vstor {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

/// Runs a command that must fail: non-zero exit and exactly one line on stderr, which is
/// returned.
pub fn fails(args: &[&str]) -> String {
    let o = vstor(args);
    assert!(!o.status.success(), "vstor {args:?} succeeded");
    let err = String::from_utf8(o.stderr).expect("utf-8 stderr");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("vstor: error: "), "{err:?}");
    err
}

/// A path as a string argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
