//! Helpers shared by the VHDX integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's test data folder (testdata/vhdx at the repository root; see its README for
/// where each image comes from and what it holds).
pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/vhdx")
        .join(name)
}

/// Decompresses a `.bz2` test image into `dir` and returns the path of the image.
pub fn unpack(name: &str, dir: &Path) -> PathBuf {
    let src = testdata(name);
    assert!(src.exists(), "test data {} is missing", src.display());
    let out = dir.join(name.trim_end_matches(".bz2"));
    let data = Command::new("bzip2")
        .arg("-dc")
        .arg(&src)
        .output()
        .expect("bzip2 runs");
    assert!(data.status.success(), "bzip2 failed on {}", src.display());
    std::fs::write(&out, data.stdout).unwrap();
    out
}

/// MD5 of bytes fed in pieces (through md5sum, which every test machine has).
pub struct Md5(std::process::Child);

impl Md5 {
    pub fn new() -> Self {
        Md5(Command::new("md5sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("md5sum runs"))
    }

    pub fn update(&mut self, b: &[u8]) {
        use std::io::Write;
        self.0.stdin.as_mut().unwrap().write_all(b).unwrap();
    }

    pub fn hex(mut self) -> String {
        drop(self.0.stdin.take());
        let out = self.0.wait_with_output().unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }
}

/// Runs a command and returns its stdout, failing the test with its stderr if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fault device over a fresh memory device with a volatile write cache, as the crash tests
/// use it.
pub fn fault_device() -> std::sync::Arc<vstor_core::FaultDevice> {
    let mem: std::sync::Arc<dyn vstor_core::BlockDevice> =
        std::sync::Arc::new(vstor_core::MemoryDevice::new(4 << 20).unwrap());
    let fault = std::sync::Arc::new(vstor_core::FaultDevice::new(mem));
    fault.set_volatile_cache(true).unwrap();
    fault
}

/// The power-cut policies every crash test tries at write `n`: all unflushed writes lost, all
/// kept, and a seeded random mix with torn writes.
pub fn cut_policies(n: u64) -> [vstor_core::CutPolicy; 3] {
    use vstor_core::CutPolicy;
    [
        CutPolicy::DropAll,
        CutPolicy::KeepAll,
        CutPolicy::Random {
            seed: n,
            torn: true,
        },
    ]
}
