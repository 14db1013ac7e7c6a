//! The logic of the `pool_open` fuzz target, shared with `tests/fuzz_regressions.rs`.
//!
//! Input: a byte selecting how the pool image is built, then patches `(member, offset, bytes)`
//! over the metadata slots and bitmaps of a valid 3-member pool holding a mirror and a parity
//! space (or, with the first byte's low bit set, the raw input as one member's metadata area),
//! each patched slot optionally re-sealed (its CRC-32C recomputed) so that the parser's checks
//! beyond the checksum are reached. Opening must never panic: it fails with an error, or the
//! pool opens and every space reads (or refuses with an error) without panicking.
#![allow(dead_code)]

use std::sync::Arc;
use vstor_core::{BlockDevice, MemoryDevice};
use vstor_spaces::{
    format, CreateOptions, OpenOptions, Pool, PoolDisk, Provisioning, Resiliency, SpaceSpec,
};

const DISK: u64 = 8 << 20;
const SLOT: u64 = 1 << 20;
/// Bytes of each member the patches may touch: the two slots and the bitmap.
const META: u64 = 2 * SLOT + format::BITMAP_SIZE;

/// A valid pool image: the bytes of the metadata area of each of three members (built once).
fn image() -> Vec<Vec<u8>> {
    static IMAGE: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(build_image).clone()
}

fn build_image() -> Vec<Vec<u8>> {
    let devs: Vec<Arc<dyn BlockDevice>> = (0..3)
        .map(|_| Arc::new(MemoryDevice::new(DISK).unwrap()) as Arc<dyn BlockDevice>)
        .collect();
    let disks = devs
        .iter()
        .enumerate()
        .map(|(i, d)| PoolDisk::new(format!("m{i}"), d.clone()))
        .collect();
    let pool = Pool::create(disks, &CreateOptions { slab_size: 1 << 20 }).unwrap();
    for (name, resiliency, columns) in [
        ("m", Resiliency::Mirror { copies: 2 }, 1),
        ("p", Resiliency::Parity { redundancy: 1 }, 3),
    ] {
        pool.create_space(&SpaceSpec {
            name: name.into(),
            size: 1 << 20,
            resiliency,
            columns: Some(columns),
            interleave: Some(64 << 10),
            provisioning: Provisioning::Thin,
        })
        .unwrap();
        pool.open_space(name)
            .unwrap()
            .write_at(0, &[0x5a; 8192])
            .unwrap();
    }
    drop(pool);
    devs.iter()
        .map(|d| {
            let mut b = vec![0u8; META as usize];
            d.read_at(0, &mut b).unwrap();
            b
        })
        .collect()
}

/// Runs one input.
pub fn run_open(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut areas = image();
    if mode & 1 == 1 {
        let n = rest.len().min(META as usize);
        areas[usize::from(mode >> 1) % 3][..n].copy_from_slice(&rest[..n]);
    } else {
        while rest.len() >= 5 {
            let member = usize::from(rest[0]) % 3;
            let reseal = rest[1] & 1 == 1;
            let at = u32::from_le_bytes([rest[1] & 0xfe, rest[2], rest[3], 0]) as usize
                % (2 * SLOT as usize + 8192);
            let len = usize::from(rest[4] % 32).min(rest.len() - 5);
            let bytes = &rest[5..5 + len];
            let end = (at + len).min(META as usize);
            areas[member][at..end].copy_from_slice(&bytes[..end - at]);
            if reseal {
                let slot = if at < SLOT as usize { 0 } else { SLOT as usize };
                format::reseal(&mut areas[member][slot..slot + SLOT as usize]);
            }
            rest = &rest[5 + len..];
        }
    }
    let devs: Vec<Arc<dyn BlockDevice>> = areas
        .iter()
        .map(|a| {
            let d = MemoryDevice::new(DISK).unwrap();
            d.write_at(0, a).unwrap();
            Arc::new(d) as Arc<dyn BlockDevice>
        })
        .collect();
    let disks: Vec<PoolDisk> = devs
        .iter()
        .enumerate()
        .map(|(i, d)| PoolDisk::new(format!("m{i}"), d.clone()))
        .collect();
    for read_only in [true, false] {
        let Ok(pool) = Pool::open(
            disks.clone(),
            &OpenOptions {
                read_only,
                ..Default::default()
            },
        ) else {
            continue;
        };
        let _ = pool.info();
        for s in pool.spaces() {
            if let Ok(space) = pool.open_space(&s.name) {
                let mut b = vec![0u8; 16 << 10];
                let _ = space.read_at(0, &mut b);
                let _ = space.read_at(space.capacity() - 4096, &mut b[..4096]);
                if !read_only {
                    let _ = space.write_at(4096, &b[..4096]);
                    let _ = space.flush();
                }
            }
        }
        if !read_only {
            let _ = pool.scrub(None, &mut |_, _| {});
        }
    }
}
