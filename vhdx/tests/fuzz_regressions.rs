//! Replays the inputs the fuzz targets `vhdx_open` and `vhdx_io` found (saved, minimized, under
//! `fuzz/regressions/<target>/`) through the same code the targets run
//! (`tests/fuzz_logic/mod.rs`), and runs every unpatched base image through both.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

mod fuzz_logic;

/// Saved inputs whose bug is not fixed yet: `(target/file, the bug)`. They are run and reported
/// (and `known_failures_are_fixed` fails until they pass); remove an entry once its fix lands.
const KNOWN_FAILURES: &[(&str, &str)] = &[];

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn name_of(target: &str, path: &Path) -> String {
    format!("{target}/{}", path.file_name().unwrap().to_string_lossy())
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// Runs every saved input of `target`; fails listing those that panic and are not known.
fn replay(target: &str, run: fn(&[u8])) {
    let mut failures = Vec::new();
    for path in inputs(target) {
        let name = name_of(target, &path);
        let data = std::fs::read(&path).unwrap();
        let known = KNOWN_FAILURES.iter().find(|(n, _)| *n == name);
        match (catch_unwind(AssertUnwindSafe(|| run(&data))), known) {
            (Ok(()), None) => {}
            (Ok(()), Some(_)) => eprintln!(
                "{name} passes now: remove it from KNOWN_FAILURES in {}",
                file!()
            ),
            (Err(_), Some((_, why))) => eprintln!("{name}: KNOWN FAILURE, not fixed yet: {why}"),
            (Err(p), None) => failures.push(format!("{name}: {}", panic_text(p))),
        }
    }
    assert!(
        failures.is_empty(),
        "{} saved fuzz input(s) fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn vhdx_open_regressions() {
    replay("vhdx_open", fuzz_logic::run_open);
}

#[test]
fn vhdx_io_regressions() {
    replay("vhdx_io", fuzz_logic::run_io);
}

/// Runs the known failures and fails while any of them still does (ignored so that the suite
/// passes meanwhile; the reason names what is pending).
#[test]
#[ignore = "known fuzz failures whose fix is pending: see KNOWN_FAILURES"]
fn known_failures_are_fixed() {
    let mut still = Vec::new();
    for &(name, why) in KNOWN_FAILURES {
        let (target, file) = name.split_once('/').unwrap();
        let run: fn(&[u8]) = match target {
            "vhdx_open" => fuzz_logic::run_open,
            _ => fuzz_logic::run_io,
        };
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions")
            .join(target)
            .join(file);
        let data = std::fs::read(&path).unwrap();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            still.push(format!("{name}: {why}"));
        }
    }
    assert!(still.is_empty(), "still failing:\n{}", still.join("\n"));
}

/// Every base image (dynamic, fixed, differencing; clean or with a log to replay; 512 or 4096
/// byte sectors; 1 or 64 MiB blocks), unpatched: it opens every way and shows exactly its data,
/// and a few sequences of operations keep it so.
#[test]
fn unpatched_base_images() {
    for kind in 1u8..=3 {
        for flags in 0u8..8 {
            let m0 = kind | (flags << 2);
            fuzz_logic::run_open(&[m0, 0]);
            let mut rng = fastrand::Rng::with_seed(m0 as u64);
            for _ in 0..2 {
                let mut input = vec![m0, 0, 0];
                for _ in 0..24 {
                    // Mostly aligned operations (no 0x80), some whole-block discards and zeroes.
                    input.push(rng.u8(..) & 0x7f);
                    input.extend_from_slice(&rng.u32(..).to_le_bytes());
                    input.push(rng.u8(..));
                }
                fuzz_logic::run_io(&input);
            }
        }
    }
}

/// Base images carry no random GUID: a saved input means the same in every process.
#[test]
fn base_images_are_deterministic() {
    fuzz_logic::check_bases_are_deterministic();
}
