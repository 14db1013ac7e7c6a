//! The real-world images in testdata/vhdx (at the repository root): their virtual contents match the MD5s and
//! patterns that folder's README gives.

mod common;

use common::{unpack, Md5};
use vstor_core::BlockDevice;
use vstor_vhdx::format::{bat_state, payload};
use vstor_vhdx::{ImageKind, OpenOptions, Vhdx, VhdxError};

const MIB: u64 = 1 << 20;

fn md5_of(d: &Vhdx, len: u64) -> String {
    let mut h = Md5::new();
    let mut buf = vec![0u8; 8 * MIB as usize];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        d.read_at(off, &mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.hex()
}

#[test]
fn hyper_v_dynamic_image() {
    let dir = tempfile::tempdir().unwrap();
    let p = unpack("iotest-dynamic-1G.vhdx.bz2", dir.path());
    let d = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert_eq!(d.kind(), ImageKind::Dynamic);
    let g = d.geometry();
    assert_eq!(
        (
            g.virtual_size,
            g.block_size,
            g.logical_sector,
            g.physical_sector
        ),
        (1 << 30, 32 << 20, 512, 4096)
    );
    assert!(d.regions().bat.required && d.regions().metadata.required);
    assert_eq!(
        (d.regions().metadata.offset, d.regions().bat.offset),
        (2 * MIB, 3 * MIB)
    );
    let bat = d.bat_snapshot();
    assert!(bat[..3]
        .iter()
        .all(|&e| bat_state(e) == payload::FULLY_PRESENT));
    assert!(bat[3..32].iter().all(|&e| bat_state(e) == payload::ZERO));
    let mut b = vec![0u8; 4096];
    d.read_at(33 * MIB - 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0xA5));
    d.read_at(33 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x96));
    d.read_at(66 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert_eq!(md5_of(&d, 1 << 30), "8a5df7512d96578c537279cee90b5e8d");
    assert!(d.creator().contains("Microsoft Windows"));
}

#[test]
fn disk2vhd_image_with_identical_headers() {
    let dir = tempfile::tempdir().unwrap();
    let p = unpack("test-disk2vhd.vhdx.bz2", dir.path());
    let d = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    let h = d.headers_at_open();
    assert_eq!(h.slots[0], Ok(1));
    assert_eq!(h.slots[1], Ok(1));
    assert_eq!(d.geometry().virtual_size, 256 * MIB);
    assert_eq!(d.geometry().block_size as u64, 2 * MIB);
    let bat = d.bat_snapshot();
    assert!((0..128).all(|b| bat_state(bat[b]) == payload::FULLY_PRESENT));
    let mut mbr = vec![0u8; 512];
    d.read_at(0, &mut mbr).unwrap();
    assert_eq!(&mbr[510..], &[0x55, 0xAA]);
    assert_eq!(md5_of(&d, 256 * MIB), "46adcce59438abbcd3bbb2645a003aa8");
}

fn check_dirtylog_contents(d: &Vhdx) {
    let bat = d.bat_snapshot();
    let g = d.geometry().clone();
    let present: Vec<u64> = (0..g.data_blocks)
        .filter(|&b| bat_state(bat[g.payload_index(b) as usize]) == payload::FULLY_PRESENT)
        .collect();
    assert_eq!(present, (0..18).collect::<Vec<_>>());
    let mut b = vec![0u8; MIB as usize];
    d.read_at(17 * MIB, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0xA5),
        "block 17 comes from the replayed log"
    );
    d.read_at(18 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert_eq!(md5_of(d, 64 * MIB), "210f59a27370ceea2dac1e99d0b8d540");
    // Every block past 18 is unmapped, so the rest of the 10 GiB reads as zeros.
    d.read_at(10 * 1024 * MIB - MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn dirty_log_is_replayed_in_memory_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = unpack("iotest-dirtylog-10G-4M.vhdx.bz2", dir.path());
    let before = std::fs::read(&p).unwrap();
    let d = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(
        d.replay_note().unwrap().contains("in memory"),
        "{:?}",
        d.replay_note()
    );
    check_dirtylog_contents(&d);
    drop(d);
    assert!(
        std::fs::read(&p).unwrap() == before,
        "a read-only open wrote to the file"
    );
    // Refusing replay in memory gives an error that says what to do.
    let opts = OpenOptions {
        replay_in_memory: false,
        ..OpenOptions::read_only()
    };
    let e = Vhdx::open(&p, &opts).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("must be replayed") && msg.contains("writable"),
        "{msg}"
    );
    let vstor_core::Error::Layer(inner) = &e else {
        panic!("{e:?}")
    };
    assert!(inner.downcast_ref::<VhdxError>().is_some());
}

#[test]
fn dirty_log_is_replayed_into_the_file_on_a_writable_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = unpack("iotest-dirtylog-10G-4M.vhdx.bz2", dir.path());
    let d = Vhdx::open(&p, &OpenOptions::default()).unwrap();
    assert_eq!(d.replay_note(), Some("1 log entries replayed"));
    assert!(d.header().log_guid.is_nil());
    check_dirtylog_contents(&d);
    drop(d);
    // Now clean: a read-only open needs no replay and sees the same.
    let d = Vhdx::open(
        &p,
        &OpenOptions {
            replay_in_memory: false,
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    assert!(d.replay_note().is_none());
    check_dirtylog_contents(&d);
}
