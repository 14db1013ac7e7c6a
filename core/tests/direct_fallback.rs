//! O_DIRECT where the file system refuses it: ramfs has no direct I/O, so opening with
//! `direct: true` falls back to buffered I/O and says why. Needs root to mount a ramfs (CI has
//! it); without it the test says so on stderr and returns.

use std::path::{Path, PathBuf};
use std::process::Command;
use vstor_core::{BlockDevice, Engine, FileDevice, FileOptions};

struct Ramfs(PathBuf);

impl Ramfs {
    fn mount(at: &Path) -> Option<Ramfs> {
        let out = Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(at)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a ramfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Ramfs(at.to_path_buf()))
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        // io_uring releases its file references asynchronously: retry briefly, then detach lazily.
        for _ in 0..20 {
            if Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn direct_falls_back_to_buffered_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Ramfs::mount(dir.path()) else {
        return;
    };
    let path = fs.0.join("d.raw");
    for engine in [Engine::IoUring, Engine::Sync] {
        let dev = FileDevice::create(
            &path,
            1 << 20,
            &FileOptions {
                direct: true,
                engine,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!dev.is_direct());
        let why = dev.direct_fallback().expect("a reason for the fallback");
        assert!(why.contains("O_DIRECT") && why.contains("d.raw"), "{why}");
        assert!(dev.describe().contains("buffered"));
        // And it works, with buffered rules (512-byte sectors, any memory address).
        let info = dev.info();
        assert_eq!((info.logical_sector_size, info.mem_alignment), (512, 1));
        let data = vec![0x77u8; 4096 + 1];
        dev.write_at(512, &data[1..]).unwrap();
        let mut back = vec![0u8; 4096];
        dev.read_at(512, &mut back).unwrap();
        assert_eq!(back, &data[1..]);
        drop(dev);
    }
    drop(fs);
}
