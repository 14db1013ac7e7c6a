//! The block commands of the SCSI target through `Lun::execute`, with the expectations of
//! libiscsi's iscsi-test-cu suites (Unmap, WriteSame16, CompareAndWrite, GetLBAStatus,
//! ModeSense6, ReadCapacity16, Inquiry) and the sense data for every error.

mod scsi_common;

use scsi_common::*;
use std::sync::Arc;
use vstor_core::{
    BlockDevice, DeviceInfo, FaultDevice, FaultRule, FileDevice, FileOptions, MemoryDevice, OpKind,
    Request,
};
use vstor_serve::scsi::{Lun, Nexus, ScsiResponse};

const BLOCKS: u64 = 2048; // 1 MiB of 512-byte blocks

fn setup() -> (Arc<Lun>, Nexus) {
    let l = mem_lun(BLOCKS * 512);
    let a = nexus("one");
    clear_ua(&l, &a);
    (l, a)
}

/// A LUN on a sparse file (the file backend reports allocation; the memory device does not).
fn file_setup() -> (Arc<Lun>, Nexus, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let f = FileDevice::create(
        dir.path().join("disk.raw"),
        BLOCKS * 512,
        &FileOptions::default(),
    )
    .unwrap();
    assert!(f.info().supports.discard);
    let l = Lun::new(export_on(Arc::new(f), false), config()).unwrap();
    let a = nexus("one");
    clear_ua(&l, &a);
    (l, a, dir)
}

fn code(r: &ScsiResponse) -> (u8, u8, u8) {
    r.sense_code().unwrap_or_else(|| panic!("no sense: {r:?}"))
}

const LBA_OOB: (u8, u8, u8) = (5, 0x21, 0);
const INVALID_FIELD_CDB: (u8, u8, u8) = (5, 0x24, 0);

fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = read16(lba, blocks);
    c[0] = 0x8a;
    c
}

fn write_same16(lba: u64, blocks: u32, unmap: bool) -> Vec<u8> {
    let mut c = read16(lba, blocks);
    c[0] = 0x93;
    if unmap {
        c[1] |= 0x08;
    }
    c
}

fn unmap(descs: &[(u64, u32)]) -> (Vec<u8>, Vec<u8>) {
    let mut p = vec![0u8; 8];
    for (lba, n) in descs {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    let bdl = (descs.len() * 16) as u16;
    p[0..2].copy_from_slice(&(bdl + 6).to_be_bytes());
    p[2..4].copy_from_slice(&bdl.to_be_bytes());
    let mut c = vec![0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[7..9].copy_from_slice(&(p.len() as u16).to_be_bytes());
    (c, p)
}

fn caw(lba: u64, blocks: u8) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

fn get_lba_status(lba: u64, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// The first descriptor of GET LBA STATUS: (lba, blocks, provisioning status).
fn first_status(l: &Lun, n: &Nexus, lba: u64) -> (u64, u32, u8) {
    let r = l.execute(n, &get_lba_status(lba, 24), &[]);
    assert_eq!(r.status, GOOD, "{r:?}");
    assert_eq!(r.data.len(), 24);
    let d = &r.data[8..];
    (
        u64::from_be_bytes(d[0..8].try_into().unwrap()),
        u32::from_be_bytes(d[8..12].try_into().unwrap()),
        d[12] & 0x0f,
    )
}

#[test]
fn unmap_reads_back_zeroes_and_reports_deallocated() {
    let (l, a, _dir) = file_setup();
    let data = vec![b'a'; 256 * 512];
    assert_eq!(l.execute(&a, &write16(0, 256), &data).status, GOOD);
    assert_eq!(first_status(&l, &a, 0), (0, 256, 0));
    for i in [1u32, 7, 128, 256] {
        assert_eq!(l.execute(&a, &write16(0, 256), &data).status, GOOD);
        let (c, p) = unmap(&[(0, i)]);
        assert_eq!(l.execute(&a, &c, &p).status, GOOD);
        let r = l.execute(&a, &read16(0, 256), &[]);
        assert!(r.data[..i as usize * 512].iter().all(|&b| b == 0));
        assert!(r.data[i as usize * 512..].iter().all(|&b| b == b'a'));
    }
    // Whole pages of the file are deallocated: 128 blocks at 0.
    assert_eq!(l.execute(&a, &write16(0, 256), &data).status, GOOD);
    let (c, p) = unmap(&[(0, 128)]);
    assert_eq!(l.execute(&a, &c, &p).status, GOOD);
    assert_eq!(first_status(&l, &a, 0), (0, 128, 1));
    assert_eq!(first_status(&l, &a, 128), (128, 128, 0));
    // Zero-block descriptors anywhere up to the end, and no descriptors at all, are fine.
    let (c, p) = unmap(&[(BLOCKS, 0), (5, 0)]);
    assert_eq!(l.execute(&a, &c, &p).status, GOOD);
    let (c, p) = unmap(&[]);
    assert_eq!(l.execute(&a, &c, &p).status, GOOD);
    // Past the end.
    let (c, p) = unmap(&[(BLOCKS - 1, 2)]);
    assert_eq!(code(&l.execute(&a, &c, &p)), LBA_OOB);
    // A parameter list shorter than its header.
    let (mut c, p) = unmap(&[(0, 1)]);
    c[7..9].copy_from_slice(&4u16.to_be_bytes());
    assert_eq!(code(&l.execute(&a, &c, &p)), (5, 0x1a, 0));
    // ANCHOR is not supported.
    let (mut c, p) = unmap(&[(0, 1)]);
    c[1] = 1;
    assert_eq!(code(&l.execute(&a, &c, &p)), INVALID_FIELD_CDB);
}

#[test]
fn write_same() {
    let (l, a) = setup();
    for i in [1u32, 2, 17, 256] {
        let block = vec![i as u8; 512];
        assert_eq!(
            l.execute(&a, &write_same16(0, i, false), &block).status,
            GOOD
        );
        let r = l.execute(&a, &read16(0, i), &[]);
        assert_eq!(r.data, vec![i as u8; i as usize * 512]);
        let lba = BLOCKS - u64::from(i);
        assert_eq!(
            l.execute(&a, &write_same16(lba, i, false), &block).status,
            GOOD
        );
        assert_eq!(l.execute(&a, &read16(lba, i), &[]).data, r.data);
    }
    // UNMAP with a zero block: reads back zeroes.
    let zero = vec![0u8; 512];
    assert_eq!(
        l.execute(&a, &write_same16(0, 256, true), &zero).status,
        GOOD
    );
    assert!(l
        .execute(&a, &read16(0, 256), &[])
        .data
        .iter()
        .all(|&b| b == 0));
    // WSNZ: zero blocks are refused; so is ANCHOR; past the end is out of range.
    assert_eq!(
        code(&l.execute(&a, &write_same16(0, 0, false), &zero)),
        INVALID_FIELD_CDB
    );
    let mut c = write_same16(0, 1, true);
    c[1] |= 0x10;
    assert_eq!(code(&l.execute(&a, &c, &zero)), INVALID_FIELD_CDB);
    for lba in [BLOCKS + 1, 1 << 63, u64::MAX] {
        assert_eq!(
            code(&l.execute(&a, &write_same16(lba, 1, false), &zero)),
            LBA_OOB
        );
    }
    // A Data-Out that is not one block.
    for len in [256, 1024] {
        let r = l.execute(&a, &write_same16(0, 1, true), &vec![0xa6; len]);
        assert_eq!(r.status, CHECK_CONDITION);
    }
    // WRITE SAME 10, and NDOB (no Data-Out: zeroes).
    let mut c = vec![0x41, 0, 0, 0, 0, 0, 0, 0, 4, 0];
    assert_eq!(l.execute(&a, &c, &[7; 512]).status, GOOD);
    assert_eq!(l.execute(&a, &read16(0, 4), &[]).data, vec![7; 2048]);
    c[1] = 0x08;
    assert_eq!(l.execute(&a, &c, &zero).status, GOOD);
    let mut c = write_same16(0, 4, true);
    c[1] |= 0x01;
    assert_eq!(Lun::data_dir(&c), Ok(vstor_serve::scsi::DataDir::None));
    assert_eq!(l.execute(&a, &write16(0, 1), &[9; 512]).status, GOOD);
    assert_eq!(l.execute(&a, &c, &[]).status, GOOD);
    assert_eq!(l.execute(&a, &read16(0, 1), &[]).data, zero);
}

#[test]
fn compare_and_write() {
    let (l, a) = setup();
    let old = vec![0x11u8; 1024];
    let new = vec![0x22u8; 1024];
    assert_eq!(l.execute(&a, &write16(10, 2), &old).status, GOOD);
    let r = l.execute(&a, &caw(10, 2), &[old.clone(), new.clone()].concat());
    assert_eq!(r.status, GOOD);
    assert_eq!(l.execute(&a, &read16(10, 2), &[]).data, new);
    // A miscompare: MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION, and the offset of the
    // first byte that differs in INFORMATION; nothing is written.
    let mut verify = new.clone();
    verify[700] ^= 1;
    let r = l.execute(&a, &caw(10, 2), &[verify, old.clone()].concat());
    assert_eq!(code(&r), (0x0e, 0x1d, 0));
    assert_eq!(r.sense[0] & 0x80, 0x80);
    assert_eq!(u32::from_be_bytes(r.sense[3..7].try_into().unwrap()), 700);
    assert_eq!(l.execute(&a, &read16(10, 2), &[]).data, new);
    // Unwritten blocks miscompare against a pattern.
    let r = l.execute(
        &a,
        &caw(100, 1),
        &[vec![b'%'; 512], vec![b'B'; 512]].concat(),
    );
    assert_eq!(code(&r).0, 0x0e);
    // Data-Out of the wrong size, past the end, zero blocks.
    assert_eq!(
        l.execute(&a, &caw(0, 1), &[0; 2048]).status,
        CHECK_CONDITION
    );
    assert_eq!(
        code(&l.execute(&a, &caw(BLOCKS - 1, 2), &[0; 2048])),
        LBA_OOB
    );
    assert_eq!(l.execute(&a, &caw(0, 0), &[]).status, GOOD);
    // 256 blocks do not fit the one-byte field: 0 with Data-Out is refused.
    assert_eq!(
        code(&l.execute(&a, &caw(0, 0), &vec![0; 256 * 1024])),
        INVALID_FIELD_CDB
    );
}

/// COMPARE AND WRITE is atomic: threads that increment a counter block with it (read, then
/// COMPARE AND WRITE old → old + 1, again on a miscompare) lose no increment.
#[test]
fn compare_and_write_is_atomic() {
    let (l, _) = setup();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                let n = nexus(&format!("t{t}"));
                clear_ua(&l, &n);
                let mut done = 0;
                while done < 200 {
                    let cur = l.execute(&n, &read16(3, 1), &[]).data;
                    let v = u64::from_le_bytes(cur[0..8].try_into().unwrap());
                    let mut next = cur.clone();
                    next[0..8].copy_from_slice(&(v + 1).to_le_bytes());
                    let r = l.execute(&n, &caw(3, 1), &[cur, next].concat());
                    if r.status == GOOD {
                        done += 1;
                    } else {
                        assert_eq!(code(&r).0, 0x0e);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let a = nexus("check");
    clear_ua(&l, &a);
    let d = l.execute(&a, &read16(3, 1), &[]).data;
    assert_eq!(u64::from_le_bytes(d[0..8].try_into().unwrap()), 800);
}

#[test]
fn get_lba_status_limits() {
    let (l, a, _dir) = file_setup();
    for lba in [BLOCKS, BLOCKS + 1, 1 << 63, u64::MAX] {
        assert_eq!(code(&l.execute(&a, &get_lba_status(lba, 24), &[])), LBA_OOB);
    }
    for i in 1..=256u64 {
        assert_eq!(l.execute(&a, &get_lba_status(i, 24), &[]).status, GOOD);
        assert_eq!(first_status(&l, &a, BLOCKS - i).0, BLOCKS - i);
    }
    // A fresh device is all deallocated.
    assert_eq!(first_status(&l, &a, 5), (5, (BLOCKS - 5) as u32, 1));
}

#[test]
fn mode_sense_pages() {
    let (l, a) = setup();
    let all = l.execute(&a, &[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    assert_eq!(all.status, GOOD);
    assert_eq!(usize::from(all.data[0]) + 1, all.data.len());
    assert_eq!(all.data[2] & 0x10, 0x10, "DPOFUA");
    assert_eq!(all.data[3], 8, "one block descriptor");
    // The pages after the header and descriptor: caching (WCE), control, IE.
    let pages = &all.data[12..];
    assert_eq!(&pages[0..3], &[0x08, 0x12, 0x04]);
    let control = &pages[20..32];
    assert_eq!(&control[0..2], &[0x0a, 0x0a]);
    let c = l.execute(&a, &[0x1a, 0, 0x0a, 0, 255, 0], &[]);
    assert_eq!(&c.data[12..], control);
    // Sense data is fixed format: D_SENSE is 0.
    assert_eq!(control[2] & 0x04, 0);
    assert_eq!(
        l.execute(&a, &read16(u64::MAX, 1), &[]).sense[0] & 0x7f,
        0x70
    );
    // The allocation length cuts; changeable values are all zero; saved values are refused.
    assert_eq!(l.execute(&a, &[0x1a, 0, 0x3f, 0, 4, 0], &[]).data.len(), 4);
    let ch = l.execute(&a, &[0x1a, 0x08, 0x4a, 0, 255, 0], &[]);
    assert!(ch.data[6..].iter().all(|&b| b == 0), "{:?}", ch.data);
    assert_eq!(
        code(&l.execute(&a, &[0x1a, 0, 0xca, 0, 255, 0], &[])),
        (5, 0x39, 0)
    );
    assert_eq!(
        code(&l.execute(&a, &[0x1a, 0, 0x19, 0, 255, 0], &[])),
        INVALID_FIELD_CDB
    );
    // MODE SENSE 10 with long LBA descriptors.
    let r = l.execute(&a, &[0x5a, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(r.status, GOOD);
    assert_eq!(r.data[4] & 1, 1);
    assert_eq!(u16::from_be_bytes([r.data[6], r.data[7]]), 16);
    assert_eq!(
        u64::from_be_bytes(r.data[8..16].try_into().unwrap()),
        BLOCKS
    );
    assert_eq!(
        u16::from_be_bytes([r.data[0], r.data[1]]) as usize + 2,
        r.data.len()
    );
}

#[test]
fn read_capacity_16_any_allocation_length() {
    let (l, a) = setup();
    for alloc in 0..=32u8 {
        let mut c = vec![0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x10;
        c[13] = alloc;
        let r = l.execute(&a, &c, &[]);
        assert_eq!(r.status, GOOD);
        assert_eq!(r.data.len(), usize::from(alloc));
    }
}

#[test]
fn capacity_change_is_a_unit_attention() {
    let mem = Arc::new(MemoryDevice::new(1 << 20).unwrap());
    let l = Lun::new(export_on(mem.clone(), false), config()).unwrap();
    let (a, b) = (nexus("one"), nexus("two"));
    clear_ua(&l, &a);
    clear_ua(&l, &b);
    mem.resize(2 << 20).unwrap();
    for n in [&a, &b] {
        assert_eq!(clear_ua(&l, n), vec![(0x2a, 0x09)]);
        let r = l.execute(n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(u32::from_be_bytes(r.data[0..4].try_into().unwrap()), 4095);
    }
    // The transport's own call after the signal queues nothing twice.
    l.capacity_changed();
    l.capacity_changed();
    assert_eq!(clear_ua(&l, &a), vec![(0x2a, 0x09)]);
}

#[test]
fn read_only_export_refuses_every_medium_write() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
    let l = Lun::new(export_on(dev, true), config()).unwrap();
    let a = nexus("one");
    clear_ua(&l, &a);
    let protect = (7, 0x27, 0);
    assert_eq!(code(&l.execute(&a, &write10(0, 1), &[0; 512])), protect);
    assert_eq!(
        code(&l.execute(&a, &write_same16(0, 1, false), &[0; 512])),
        protect
    );
    let (c, p) = unmap(&[(0, 1)]);
    assert_eq!(code(&l.execute(&a, &c, &p)), protect);
    assert_eq!(code(&l.execute(&a, &caw(0, 1), &[0; 1024])), protect);
    assert_eq!(l.execute(&a, &read10(0, 1), &[]).status, GOOD);
    // The transport learns it before collecting any Data-Out.
    let r = l.data_dir_of(&write_same16(0, 1, true)).unwrap_err();
    assert_eq!(code(&r), protect);
    assert_eq!(
        l.data_dir_of(&read10(0, 1)),
        Ok(vstor_serve::scsi::DataDir::In)
    );
}

#[test]
fn stack_errors_become_medium_errors() {
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
    let fault = Arc::new(FaultDevice::new(mem));
    let l = Lun::new(export_on(fault.clone(), false), config()).unwrap();
    let a = nexus("one");
    clear_ua(&l, &a);
    fault.add_rule(FaultRule::fail(OpKind::Read).in_range(512..1024).times(1));
    assert_eq!(code(&l.execute(&a, &read10(1, 1), &[])), (3, 0x11, 0));
    assert_eq!(l.execute(&a, &read10(1, 1), &[]).status, GOOD);
    fault.add_rule(FaultRule::fail(OpKind::Write).times(1));
    assert_eq!(
        code(&l.execute(&a, &write10(0, 1), &[1; 512])),
        (3, 0x0c, 0)
    );
    fault.add_rule(FaultRule::fail(OpKind::Flush).times(1));
    let sync = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(code(&l.execute(&a, &sync, &[])), (3, 0x0c, 0));
    assert_eq!(l.execute(&a, &sync, &[]).status, GOOD);
    fault.power_cut(vstor_core::CutPolicy::DropAll).unwrap();
    assert_eq!(l.execute(&a, &read10(0, 1), &[]).status, CHECK_CONDITION);
}

/// A stack that cannot discard: not thin.
struct Thick(MemoryDevice);

impl BlockDevice for Thick {
    fn info(&self) -> DeviceInfo {
        let mut i = self.0.info();
        i.supports.discard = false;
        i
    }
    fn submit(&self, batch: &mut [Request<'_>]) {
        self.0.submit(batch)
    }
}

#[test]
fn a_thick_stack_has_no_unmap() {
    let dev: Arc<dyn BlockDevice> = Arc::new(Thick(MemoryDevice::new(1 << 20).unwrap()));
    let l = Lun::new(export_on(dev, false), config()).unwrap();
    let a = nexus("one");
    clear_ua(&l, &a);
    let mut c = vec![0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    assert_eq!(l.execute(&a, &c, &[]).data[14] & 0xc0, 0, "LBPME, LBPRZ");
    let b2 = l.execute(&a, &[0x12, 1, 0xb2, 0, 255, 0], &[]).data;
    assert_eq!(b2[5] & 0xe0, 0, "LBPU, LBPWS, LBPWS10");
    let b0 = l.execute(&a, &[0x12, 1, 0xb0, 0, 255, 0], &[]).data;
    assert_eq!(
        &b0[20..28],
        &[0; 8],
        "MAXIMUM UNMAP LBA and descriptor counts"
    );
    let (c, p) = unmap(&[(0, 0)]);
    assert_eq!(code(&l.execute(&a, &c, &p)), (5, 0x20, 0));
    assert_eq!(
        code(&l.execute(&a, &write_same16(0, 1, true), &[0; 512])),
        INVALID_FIELD_CDB
    );
    // WRITE SAME without UNMAP still zeroes.
    assert_eq!(
        l.execute(&a, &write_same16(0, 8, false), &[0; 512]).status,
        GOOD
    );
}

#[test]
fn block_limits_page() {
    let (l, a) = setup();
    let b0 = l.execute(&a, &[0x12, 1, 0xb0, 0, 255, 0], &[]).data;
    assert_eq!(b0.len(), usize::from(b0[3]) + 4);
    assert_eq!(b0[3], 0x3c);
    let be32 = |i: usize| u32::from_be_bytes(b0[i..i + 4].try_into().unwrap());
    let max_unmap = be32(20);
    let max_bdc = be32(24);
    assert!(max_unmap > 0 && max_unmap <= 1 << 20);
    assert!(max_bdc > 0 && max_bdc <= 1 << 20);
    assert_eq!(b0[4] & 1, 1, "WSNZ");
    assert!(be32(8) >= 65536, "MAXIMUM TRANSFER LENGTH");
}

#[test]
fn verify_and_write_and_verify() {
    let (l, a) = setup();
    let data: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
    // WRITE AND VERIFY (10) writes.
    let mut c = write10(4, 4);
    c[0] = 0x2e;
    assert_eq!(l.execute(&a, &c, &data).status, GOOD);
    assert_eq!(l.execute(&a, &read10(4, 4), &[]).data, data);
    // VERIFY (10) with BYTCHK=1: equal data is GOOD, one flipped byte a MISCOMPARE at its
    // offset; BYTCHK=0 reads only.
    let mut v = read10(4, 4);
    v[0] = 0x2f;
    v[1] = 0x02;
    assert_eq!(Lun::data_dir(&v), Ok(vstor_serve::scsi::DataDir::Out(2048)));
    assert_eq!(l.execute(&a, &v, &data).status, GOOD);
    let mut bad = data.clone();
    bad[1500] ^= b'X';
    let r = l.execute(&a, &v, &bad);
    assert_eq!(code(&r), (0x0e, 0x1d, 0));
    assert_eq!(u32::from_be_bytes(r.sense[3..7].try_into().unwrap()), 1500);
    v[1] = 0;
    assert_eq!(l.execute(&a, &v, &[]).status, GOOD);
    // VERIFY (16) BYTCHK=3: every block against one.
    assert_eq!(l.execute(&a, &write16(20, 3), &[5; 1536]).status, GOOD);
    let mut v16 = read16(20, 3);
    v16[0] = 0x8f;
    v16[1] = 0x06;
    assert_eq!(l.execute(&a, &v16, &[5; 512]).status, GOOD);
    assert_eq!(code(&l.execute(&a, &v16, &[6; 512])).0, 0x0e);
    // Bounds and protection fields.
    let mut c = read10(0, 0);
    c[0] = 0x2f;
    c[2..6].copy_from_slice(&(BLOCKS as u32 + 1).to_be_bytes());
    assert_eq!(code(&l.execute(&a, &c, &[])), LBA_OOB);
    let mut c = read10(0, 1);
    c[0] = 0x2f;
    c[1] = 0x20;
    assert_eq!(code(&l.execute(&a, &c, &[])), INVALID_FIELD_CDB);
}

fn rsoc(rctd: bool, option: u8, opcode: u8, sa: u16) -> Vec<u8> {
    let mut c = vec![
        0xa3,
        0x0c,
        option | if rctd { 0x80 } else { 0 },
        opcode,
        0,
        0,
        0,
        0,
        0xff,
        0xff,
        0,
        0,
    ];
    c[4..6].copy_from_slice(&sa.to_be_bytes());
    c
}

/// REPORT SUPPORTED OPERATION CODES as libiscsi's ReportSupportedOpcodes suite checks it.
#[test]
fn report_supported_operation_codes() {
    let (l, a) = setup();
    for rctd in [false, true] {
        let r = l.execute(&a, &rsoc(rctd, 0, 0, 0), &[]);
        assert_eq!(r.status, GOOD);
        let d = r.data;
        let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
        assert_eq!(d.len(), 4 + len);
        let step = if rctd { 20 } else { 8 };
        let mut seen = 0;
        for desc in d[4..].chunks_exact(step) {
            seen += 1;
            let (opcode, sa, servactv) = (
                desc[0],
                u16::from_be_bytes([desc[2], desc[3]]),
                desc[5] & 1 != 0,
            );
            assert_eq!(desc[5] & 2 != 0, rctd, "CTDP");
            if rctd {
                assert_eq!(u16::from_be_bytes([desc[8], desc[9]]), 0x0a);
            }
            assert!(servactv || sa == 0);
            // One command: with the wrong option, INVALID FIELD IN CDB; with the right one its
            // usage data, which starts with the operation code.
            let (right, wrong) = if servactv { (2, 1) } else { (1, 2) };
            assert_eq!(
                code(&l.execute(&a, &rsoc(false, wrong, opcode, sa), &[])),
                INVALID_FIELD_CDB
            );
            let one = l.execute(&a, &rsoc(false, right, opcode, sa), &[]).data;
            assert_eq!(one[1] & 7, 3, "supported");
            let n = usize::from(u16::from_be_bytes([one[2], one[3]]));
            assert_eq!(n, usize::from(u16::from_be_bytes([desc[6], desc[7]])));
            assert_eq!(one[4], opcode);
            // Every command it lists runs (does not answer INVALID COMMAND OPERATION CODE).
            let mut cdb = vec![0u8; n];
            cdb[0] = opcode;
            if servactv && opcode != 0x5f && opcode != 0x5e {
                cdb[1] = sa as u8;
            }
            let r = l.execute(&a, &cdb, &[]);
            assert_ne!(r.sense_code(), Some((5, 0x20, 0)), "{opcode:#x}");
        }
        assert!(seen > 30);
    }
    // READ (10) and WRITE (10) say DPO and FUA, as MODE SENSE's DPOFUA does.
    let one = l.execute(&a, &rsoc(false, 1, 0x28, 0), &[]).data;
    assert_eq!(one[5] & 0x18, 0x18);
    // An operation code it does not support.
    let one = l.execute(&a, &rsoc(false, 1, 0xc5, 0), &[]).data;
    assert_eq!(one[1] & 7, 1);
}

#[test]
fn pre_fetch() {
    let (l, a) = setup();
    let mut c = read10(0, 8);
    c[0] = 0x34;
    c[1] = 0x02; // IMMED
    c[6] = 3; // group
    assert_eq!(l.execute(&a, &c, &[]).status, GOOD);
    let mut c = read10(BLOCKS as u32 + 1, 0);
    c[0] = 0x34;
    assert_eq!(code(&l.execute(&a, &c, &[])), LBA_OOB);
    let mut c = read16(BLOCKS - 4, 4);
    c[0] = 0x90;
    assert_eq!(l.execute(&a, &c, &[]).status, GOOD);
    c[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(code(&l.execute(&a, &c, &[])), LBA_OOB);
}
