//! Builds the test guest (vmm/guest, a no_std program for x86_64-unknown-none) with a nested
//! cargo and hands its ELF image to the VMM, which embeds it with `include_bytes!`.
//!
//! The guest is its own cargo workspace, built into a target directory under OUT_DIR so that the
//! nested cargo never waits on the outer one's lock. It needs the `x86_64-unknown-none` target
//! (`rustup target add x86_64-unknown-none`; scripts/test installs it).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest_dir.join("guest");
    for f in ["Cargo.toml", "build.rs", "link.ld", "src"] {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("guest-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--manifest-path",
        ])
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings are for the host crates, not for the guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo to build the test guest");
    if !status.success() {
        panic!(
            "building the test guest (vmm/guest) failed; it needs the x86_64-unknown-none target: \
             rustup target add x86_64-unknown-none"
        );
    }
    let elf = target_dir.join("x86_64-unknown-none/release/vstor-test-guest");
    let dest = out_dir.join("vstor-test-guest.elf");
    std::fs::copy(&elf, &dest).expect("copy the test guest image");
}
