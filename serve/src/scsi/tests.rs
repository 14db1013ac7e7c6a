//! Unit tests of the SCSI core on a memory-backed export.

use super::*;
use crate::export::Opened;
use vstor_core::MemoryDevice;

pub(super) fn export_of(dev: MemoryDevice, read_only: bool) -> Arc<Export> {
    export_on(Arc::new(dev), read_only)
}

fn export_of_dev(dev: Arc<dyn BlockDevice>) -> Arc<Export> {
    export_on(dev, false)
}

fn export_on(device: Arc<dyn BlockDevice>, read_only: bool) -> Arc<Export> {
    let opened = Opened {
        device,
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

/// A PERSISTENT RESERVE OUT of `sa` (REGISTER 0, RESERVE 1) with the keys given.
fn prout(l: &Lun, n: &Nexus, sa: u8, ty: u8, rk: u64, sark: u64) -> ScsiResponse {
    let mut c = vec![0u8; 10];
    c[0] = op::PERSISTENT_RESERVE_OUT;
    c[1] = sa;
    c[2] = ty;
    c[5..9].copy_from_slice(&24u32.to_be_bytes());
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&rk.to_be_bytes());
    p[8..16].copy_from_slice(&sark.to_be_bytes());
    l.execute(n, &c, &p)
}

fn cmd<'a>(cdb: &'a [u8], data_out: &'a [u8]) -> Command<'a> {
    Command { cdb, data_out }
}

#[test]
fn a_batch_answers_as_its_commands_one_by_one() {
    let l = lun(1 << 20);
    let a = nexus("a");
    let x = vec![0x5au8; 1024];
    let y = vec![0xa5u8; 512];
    // A new nexus: the first command reports the reset, the others run (the write too).
    let w0 = write16(0, 2, false);
    let r = l.execute_batch(&a, &[cmd(&w0, &x), cmd(&w0, &x)]);
    assert_eq!(code(&r[0]), (key::UNIT_ATTENTION, 0x29, 0));
    assert_eq!(r[1].status, GOOD);
    // READs and WRITEs with other commands between them, and refusals of each kind.
    let (w1, w2, tur) = (write16(1, 2, false), write16(8, 1, true), [0u8; 6]);
    let (r1, r2, r3) = (read10(1, 2), read10(8, 1), read10(2047, 2));
    let (w_short, mut naca) = (write16(4, 2, false), read10(0, 1));
    naca[9] = 0x04;
    let r = l.execute_batch(
        &a,
        &[
            cmd(&w1, &x),
            cmd(&w2, &y),
            cmd(&w_short, &y),
            cmd(&tur, &[]),
            cmd(&r1, &[]),
            cmd(&r2, &[]),
            cmd(&r3, &[]),
            cmd(&naca, &[]),
            cmd(&read10(5, 0), &[]),
        ],
    );
    let status: Vec<u8> = r.iter().map(|r| r.status).collect();
    assert_eq!(
        status,
        [
            GOOD,
            GOOD,
            CHECK_CONDITION,
            GOOD,
            GOOD,
            GOOD,
            CHECK_CONDITION,
            CHECK_CONDITION,
            GOOD
        ]
    );
    assert_eq!(code(&r[2]), (key::ILLEGAL_REQUEST, 0x1a, 0));
    assert_eq!(
        (r[4].data.as_slice(), r[5].data.as_slice()),
        (&x[..], &y[..])
    );
    assert_eq!(code(&r[6]), (key::ILLEGAL_REQUEST, 0x21, 0));
    assert_eq!(code(&r[7]), (key::ILLEGAL_REQUEST, 0x24, 0));
    assert!(r[8].data.is_empty());
    // The same reads one by one give the same data.
    assert_eq!(l.execute(&a, &r1, &[]).data, x);
    // Under Write Exclusive held by another nexus, reads run and writes conflict.
    let b = nexus("b");
    clear_ua(&l, &b);
    assert_eq!(prout(&l, &b, 0, 0, 0, 7).status, GOOD);
    assert_eq!(prout(&l, &b, 1, 1, 7, 0).status, GOOD);
    let r = l.execute_batch(&a, &[cmd(&w1, &x), cmd(&r1, &[]), cmd(&w2, &y)]);
    assert_eq!(r[0].status, sense::RESERVATION_CONFLICT);
    assert_eq!((r[1].status, r[1].data.as_slice()), (GOOD, &x[..]));
    assert_eq!(r[2].status, sense::RESERVATION_CONFLICT);
    // The holder writes.
    let r = l.execute_batch(&b, &[cmd(&w1, &y[..512].repeat(2)), cmd(&w2, &x[..512])]);
    assert!(r.iter().all(|r| r.status == GOOD));
    assert_eq!(l.execute(&a, &r2, &[]).data, x[..512]);
    // A read-only export refuses the writes of a batch.
    let ro = Lun::new(
        export_of(MemoryDevice::new(1 << 20).unwrap(), true),
        config(),
    )
    .unwrap();
    clear_ua(&ro, &a);
    let r = ro.execute_batch(&a, &[cmd(&w1, &x), cmd(&r1, &[]), cmd(&w2, &y)]);
    assert_eq!(code(&r[0]), (key::DATA_PROTECT, 0x27, 0));
    assert_eq!(r[1].status, GOOD);
    assert_eq!(code(&r[2]), (key::DATA_PROTECT, 0x27, 0));
}

#[test]
fn a_batch_reports_the_stacks_errors_per_command() {
    use vstor_core::{FaultDevice, FaultRule};
    let fault = Arc::new(FaultDevice::new(Arc::new(
        MemoryDevice::new(1 << 20).unwrap(),
    )));
    let l = Lun::new(export_of_dev(fault.clone()), config()).unwrap();
    let a = nexus("a");
    clear_ua(&l, &a);
    let d = vec![1u8; 512];
    let (w0, w1, r0) = (write16(0, 1, false), write16(1, 1, true), read10(0, 1));
    // A failing flush fails the FUA write of the batch only.
    let id = fault.add_rule(FaultRule::fail(OpKind::Flush));
    let r = l.execute_batch(&a, &[cmd(&w0, &d), cmd(&w1, &d), cmd(&r0, &[])]);
    assert_eq!(r[0].status, GOOD);
    assert_eq!(code(&r[1]), (key::MEDIUM_ERROR, 0x0c, 0));
    assert_eq!(r[2].status, GOOD);
    fault.remove_rule(id);
    // A failing read is a MEDIUM ERROR of its own command.
    fault.add_rule(FaultRule::fail(OpKind::Read).in_range(512..1024));
    let r1 = read10(1, 1);
    let r = l.execute_batch(&a, &[cmd(&r0, &[]), cmd(&r1, &[])]);
    assert_eq!((r[0].status, r[0].data.as_slice()), (GOOD, &d[..]));
    assert_eq!(code(&r[1]), (key::MEDIUM_ERROR, 0x11, 0));
}
