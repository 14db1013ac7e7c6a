//! The file backend on real block devices: loop devices over temporary files, with 512- and
//! 4096-byte logical sectors. Needs root and the loop driver (CI has both); without them the
//! test says so on stderr and returns.

use std::path::{Path, PathBuf};
use std::process::Command;
use vstor_core::{
    AlignedBuf, BlockDevice, Engine, Error, FileDevice, FileKind, FileOptions, Request,
};

struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path, sector: u32) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--sector-size", &sector.to_string()])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Loop(PathBuf::from(
            String::from_utf8(out.stdout).ok()?.trim(),
        )))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn loop_devices_both_engines_and_sector_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for sector in [512u32, 4096] {
        let img = dir.path().join(format!("loop{sector}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let Some(lo) = Loop::attach(&img, sector) else {
            return;
        };
        for engine in [Engine::IoUring, Engine::Sync] {
            for direct in [false, true] {
                let dev = FileDevice::open(
                    &lo.0,
                    &FileOptions {
                        engine,
                        direct,
                        ..Default::default()
                    },
                )
                .unwrap();
                let info = dev.info();
                assert_eq!(dev.kind(), FileKind::Block);
                assert_eq!(info.capacity, 8 << 20);
                assert_eq!(info.logical_sector_size, sector, "{engine} direct={direct}");
                assert!(!info.supports.resize);
                assert_eq!(dev.is_direct(), direct);

                let data: Vec<u8> = (0..65536u32)
                    .map(|i| (i % 253) as u8 ^ sector as u8)
                    .collect();
                let mut batch = [
                    Request::write(0, &data[..32768]),
                    Request::write(1 << 20, &data),
                    Request::flush(),
                    Request::write_zeroes(1 << 20, 8192),
                    Request::discard(4 << 20, 65536),
                ];
                dev.submit_all(&mut batch).unwrap();
                // Unaligned memory is bounced under O_DIRECT, not refused.
                let mut back = AlignedBuf::new(65536 + 1);
                dev.read_at(1 << 20, &mut back[1..]).unwrap();
                assert!(back[1..8193].iter().all(|&b| b == 0));
                assert_eq!(&back[8193..], &data[8192..]);
                let mut first = vec![0u8; 32768];
                dev.read_at(0, &mut first).unwrap();
                assert_eq!(first, &data[..32768]);
                let mut hole = vec![1u8; 65536];
                dev.read_at(4 << 20, &mut hole).unwrap();
                assert!(
                    hole.iter().all(|&b| b == 0),
                    "discard on a loop device reads zeroes"
                );

                if sector == 4096 {
                    let e = dev.write_at(512, &[0u8; 512]).unwrap_err();
                    assert!(
                        matches!(
                            e,
                            Error::Unaligned {
                                alignment: 4096,
                                ..
                            }
                        ),
                        "{e}"
                    );
                }
                assert!(dev.resize(16 << 20).is_err());
            }
        }
        // What went to the device is in the file behind it.
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(
            bytes[(1 << 20) + 8192..(1 << 20) + 65536],
            (0..65536u32)
                .map(|i| (i % 253) as u8 ^ sector as u8)
                .collect::<Vec<_>>()[8192..]
        );
    }
}
