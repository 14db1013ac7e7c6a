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

/// Runs a command that must fail: non-zero exit and exactly one error line on stderr, which is
/// returned. Notes before it (`vstor: note: ...`, what opening a pool or an image found and
/// did) are not the error and are left out.
pub fn fails(args: &[&str]) -> String {
    let o = vstor(args);
    assert!(!o.status.success(), "vstor {args:?} succeeded");
    let all = String::from_utf8(o.stderr).expect("utf-8 stderr");
    let err: String = all
        .lines()
        .filter(|l| !l.starts_with("vstor: note: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(err.lines().count(), 1, "not one line: {all:?}");
    assert!(err.starts_with("vstor: error: "), "{all:?}");
    err
}

/// A path as a string argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
