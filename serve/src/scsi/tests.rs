//! Unit tests of the SCSI core on a memory-backed export.

use super::*;
use crate::export::Opened;
use vstor_core::MemoryDevice;

pub(super) fn export_of(dev: MemoryDevice, read_only: bool) -> Arc<Export> {
    let opened = Opened {
        device: Arc::new(dev),
        live: None,
        qos: None,
        notes: Vec::new(),
        format: "raw".into(),
    };
    Arc::new(Export::new("disk", "mem", read_only, opened))
}

pub(super) fn config() -> LunConfig {
    LunConfig {
        serial: "vstor-0001".into(),
        naa: 0x6001_4050_1234_5678,
        pr_state: None,
        vendor: "VSTOR".into(),
        product: "vstor disk".into(),
    }
}

pub(super) fn lun(capacity: u64) -> Arc<Lun> {
    Lun::new(
        export_of(MemoryDevice::new(capacity).unwrap(), false),
        config(),
    )
    .unwrap()
}

pub(super) fn nexus(i: &str) -> Nexus {
    Nexus {
        initiator: format!("iqn.2026-12.test:{i},i,0x000000000001"),
        target: "iqn.2026-12.io.vstor:disk,t,0x0001".into(),
    }
}

/// Runs TEST UNIT READY until the nexus has no unit attention left.
pub(super) fn clear_ua(l: &Lun, n: &Nexus) {
    for _ in 0..10 {
        if l.execute(n, &[0; 6], &[]).status == GOOD {
            return;
        }
    }
    panic!("unit attentions do not clear");
}

fn code(r: &ScsiResponse) -> (u8, u8, u8) {
    r.sense_code().expect("sense data")
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![op::READ_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write16(lba: u64, blocks: u32, fua: bool) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op::WRITE_16;
    c[1] = if fua { 0x08 } else { 0 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[test]
fn first_command_of_a_nexus_finds_a_reset() {
    let l = lun(1 << 20);
    let a = nexus("a");
    // INQUIRY does not report it.
    let r = l.execute(&a, &[op::INQUIRY, 0, 0, 0, 96, 0], &[]);
    assert_eq!(r.status, GOOD);
    let r = l.execute(&a, &[0; 6], &[]);
    assert_eq!(r.status, CHECK_CONDITION);
    assert_eq!(code(&r), (key::UNIT_ATTENTION, 0x29, 0x00));
    assert_eq!(l.execute(&a, &[0; 6], &[]).status, GOOD);
    // REQUEST SENSE returns and clears it.
    let b = nexus("b");
    let r = l.execute(&b, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], &[]);
    assert_eq!(r.status, GOOD);
    assert_eq!((r.data[2], r.data[12]), (key::UNIT_ATTENTION, 0x29));
    let r = l.execute(&b, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], &[]);
    assert_eq!((r.data[2], r.data[12]), (0, 0));
    // A lost nexus starts over.
    l.nexus_lost(&a);
    assert_eq!(l.execute(&a, &[0; 6], &[]).status, CHECK_CONDITION);
}

#[test]
fn standard_inquiry_and_vpd() {
    let l = lun(1 << 20);
    let a = nexus("a");
    let r = l.execute(&a, &[op::INQUIRY, 0, 0, 0, 255, 0], &[]);
    assert_eq!(r.status, GOOD);
    assert_eq!(r.data.len(), 66);
    assert_eq!((r.data[0], r.data[2], r.data[3] & 0x0f), (0, 6, 2));
    assert_eq!(usize::from(r.data[4]) + 5, r.data.len());
    assert_eq!(&r.data[8..16], b"VSTOR   ");
    assert_eq!(&r.data[16..32], b"vstor disk      ");
    // Allocation length cuts.
    let r = l.execute(&a, &[op::INQUIRY, 0, 0, 0, 5, 0], &[]);
    assert_eq!(r.data.len(), 5);
    // A page code without EVPD, and an unknown page, are invalid fields.
    let r = l.execute(&a, &[op::INQUIRY, 0, 0x80, 0, 255, 0], &[]);
    assert_eq!(code(&r), (key::ILLEGAL_REQUEST, 0x24, 0));
    let r = l.execute(&a, &[op::INQUIRY, 1, 0x42, 0, 255, 0], &[]);
    assert_eq!(code(&r), (key::ILLEGAL_REQUEST, 0x24, 0));
    let r = l.execute(&a, &[op::INQUIRY, 1, 0, 0, 255, 0], &[]);
    assert_eq!(&r.data[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    let r = l.execute(&a, &[op::INQUIRY, 1, 0x80, 0, 255, 0], &[]);
    assert_eq!(&r.data[4..], b"vstor-0001");
    let r = l.execute(&a, &[op::INQUIRY, 1, 0x83, 0, 255, 0], &[]);
    // The NAA designator first: 6001... is not an 8-byte NAA type, so it becomes NAA 5.
    assert_eq!(&r.data[4..8], &[0x01, 0x03, 0x00, 0x08]);
    assert_eq!(r.data[8] >> 4, 5);
    for page in [0xb0u8, 0xb1] {
        let r = l.execute(&a, &[op::INQUIRY, 1, page, 0, 255, 0], &[]);
        assert_eq!((r.data[1], be16(&r.data, 2)), (page, 0x3c));
    }
    let r = l.execute(&a, &[op::INQUIRY, 1, 0xb2, 0, 255, 0], &[]);
    // A memory device discards, and discarded blocks read as zeroes.
    assert_eq!(r.data[5] & 0xe4, 0xe4);
    assert_eq!(r.data[6] & 7, 2);
}

#[test]
fn report_luns_and_capacity() {
    let l = lun(1 << 20);
    let a = nexus("a");
    clear_ua(&l, &a);
    let mut c = [0u8; 12];
    c[0] = op::REPORT_LUNS;
    c[6..10].copy_from_slice(&64u32.to_be_bytes());
    let r = l.execute(&a, &c, &[]);
    assert_eq!(r.data, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    c[6..10].copy_from_slice(&15u32.to_be_bytes());
    assert_eq!(
        code(&l.execute(&a, &c, &[])),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    let r = l.execute(&a, &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data, [0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let mut c = [0u8; 16];
    c[0] = op::SERVICE_ACTION_IN_16;
    c[1] = SA_READ_CAPACITY_16;
    c[13] = 32;
    let r = l.execute(&a, &c, &[]);
    assert_eq!(r.data.len(), 32);
    assert_eq!(be64(&r.data, 0), 2047);
    assert_eq!(be32(&r.data, 8), 512);
    assert_eq!(r.data[14] & 0xc0, 0xc0);
}

#[test]
fn read_write_and_ranges() {
    let l = lun(1 << 20);
    let a = nexus("a");
    clear_ua(&l, &a);
    let data: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
    let r = l.execute(&a, &write16(10, 2, true), &data);
    assert_eq!(r.status, GOOD);
    let r = l.execute(&a, &read10(10, 2), &[]);
    assert_eq!(r.data, data);
    // Zero blocks move nothing.
    assert_eq!(
        l.execute(&a, &read10(0, 0), &[]),
        ScsiResponse::good(Vec::new())
    );
    // Past the end.
    let r = l.execute(&a, &read10(2047, 2), &[]);
    assert_eq!(code(&r), (key::ILLEGAL_REQUEST, 0x21, 0));
    let r = l.execute(&a, &write16(u64::MAX, 1, false), &data[..512]);
    assert_eq!(code(&r), (key::ILLEGAL_REQUEST, 0x21, 0));
    // RDPROTECT without protection information.
    let mut c = read10(0, 1);
    c[1] = 0x20;
    assert_eq!(
        code(&l.execute(&a, &c, &[])),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    // READ 6 of 0 blocks reads 256.
    let r = l.execute(&a, &[op::READ_6, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data.len(), 256 * 512);
    // SYNCHRONIZE CACHE.
    let r = l.execute(
        &a,
        &[op::SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
    );
    assert_eq!(r.status, GOOD);
    // An unknown operation code.
    let r = l.execute(&a, &[0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(code(&r), (key::ILLEGAL_REQUEST, 0x20, 0));
    let r = l.execute(&a, &[0x02, 0, 0, 0, 0, 0], &[]);
    assert_eq!(code(&r), (key::ILLEGAL_REQUEST, 0x20, 0));
}

#[test]
fn read_only_exports_refuse_writes() {
    let dev = MemoryDevice::new(1 << 20).unwrap();
    let l = Lun::new(export_of(dev, true), config()).unwrap();
    let a = nexus("a");
    clear_ua(&l, &a);
    let r = l.execute(&a, &write16(0, 1, false), &[0; 512]);
    assert_eq!(code(&r), (key::DATA_PROTECT, 0x27, 0));
    let r = l.execute(&a, &[op::MODE_SENSE_6, 0, 0x3f, 0, 255, 0], &[]);
    assert_eq!(r.data[2] & 0x80, 0x80);
}

#[test]
fn data_directions() {
    assert_eq!(Lun::data_dir(&[0; 6]), Ok(DataDir::None));
    assert_eq!(Lun::data_dir(&read10(0, 8)), Ok(DataDir::In));
    assert_eq!(Lun::data_dir(&write16(0, 8, false)), Ok(DataDir::Out(4096)));
    let l = Lun::new(
        export_of(
            MemoryDevice::with_sector_size(1 << 20, 4096).unwrap(),
            false,
        ),
        config(),
    )
    .unwrap();
    assert_eq!(
        l.data_dir_of(&write16(0, 8, false)),
        Ok(DataDir::Out(32768))
    );
    assert!(Lun::data_dir(&[]).is_err());
    assert!(Lun::data_dir(&[op::WRITE_10, 0]).is_err());
    assert!(Lun::data_dir(&[0xc1; 16]).is_err());
}
