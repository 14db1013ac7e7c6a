//! Helpers of the SCSI target tests: a LUN on a memory-backed export, nexuses and CDBs.
#![allow(dead_code)]

use std::sync::Arc;
use vstor_core::{BlockDevice, MemoryDevice};
use vstor_serve::scsi::{Lun, LunConfig, Nexus, ScsiResponse};
use vstor_serve::{Export, Opened};

pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;
pub const RESERVATION_CONFLICT: u8 = 0x18;

pub const WE: u8 = 1;
pub const EA: u8 = 3;
pub const WE_RO: u8 = 5;
pub const EA_RO: u8 = 6;
pub const WE_AR: u8 = 7;
pub const EA_AR: u8 = 8;
pub const ALL_TYPES: [u8; 6] = [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR];

pub fn export_on(dev: Arc<dyn BlockDevice>, read_only: bool) -> Arc<Export> {
    let opened = Opened {
        device: dev,
        live: None,
        qos: None,
        notes: Vec::new(),
        format: "raw".into(),
    };
    Arc::new(Export::new("disk", "mem", read_only, opened))
}

pub fn config() -> LunConfig {
    LunConfig {
        serial: "vstor-test-0001".into(),
        naa: 0x5001_4050_0000_0001,
        pr_state: None,
        vendor: "VSTOR".into(),
        product: "vstor test disk".into(),
    }
}

pub fn mem_lun(capacity: u64) -> Arc<Lun> {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(capacity).unwrap());
    Lun::new(export_on(dev, false), config()).unwrap()
}

/// The nexus of initiator `name` (ISID 1) on the test target's port.
pub fn nexus(name: &str) -> Nexus {
    Nexus {
        initiator: format!("iqn.2026-12.test:{name},i,0x000000000001"),
        target: "iqn.2026-12.io.vstor:disk,t,0x0001".into(),
    }
}

pub fn tur() -> Vec<u8> {
    vec![0; 6]
}

/// TEST UNIT READY until GOOD (libiscsi's testunitready_clear_ua); returns the unit
/// attentions seen, as (ASC, ASCQ).
pub fn clear_ua(l: &Lun, n: &Nexus) -> Vec<(u8, u8)> {
    let mut seen = Vec::new();
    for _ in 0..10 {
        let r = l.execute(n, &tur(), &[]);
        if r.status == GOOD {
            return seen;
        }
        let (k, a, q) = r.sense_code().expect("sense");
        assert_eq!(k, 6, "not a unit attention: {r:?}");
        seen.push((a, q));
    }
    panic!("unit attentions do not clear");
}

pub fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

/// A PERSISTENT RESERVE OUT CDB and its 24-byte parameter list.
pub fn prout(sa: u8, ty: u8, rk: u64, sark: u64, flags: u8) -> (Vec<u8>, Vec<u8>) {
    let mut c = vec![0u8; 10];
    c[0] = 0x5f;
    c[1] = sa;
    c[2] = ty;
    c[5..9].copy_from_slice(&24u32.to_be_bytes());
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&rk.to_be_bytes());
    p[8..16].copy_from_slice(&sark.to_be_bytes());
    p[20] = flags;
    (c, p)
}

pub fn run_prout(l: &Lun, n: &Nexus, sa: u8, ty: u8, rk: u64, sark: u64) -> ScsiResponse {
    let (c, p) = prout(sa, ty, rk, sark, 0);
    l.execute(n, &c, &p)
}

pub fn register_and_ignore(l: &Lun, n: &Nexus, key: u64) -> ScsiResponse {
    run_prout(l, n, 6, 0, 0, key)
}
pub fn register(l: &Lun, n: &Nexus, sark: u64, rk: u64) -> ScsiResponse {
    run_prout(l, n, 0, 0, rk, sark)
}
pub fn reserve(l: &Lun, n: &Nexus, key: u64, ty: u8) -> ScsiResponse {
    run_prout(l, n, 1, ty, key, 0)
}
pub fn release(l: &Lun, n: &Nexus, key: u64, ty: u8) -> ScsiResponse {
    run_prout(l, n, 2, ty, key, 0)
}
pub fn clear(l: &Lun, n: &Nexus, key: u64) -> ScsiResponse {
    run_prout(l, n, 3, 0, key, 0)
}
pub fn preempt(l: &Lun, n: &Nexus, sark: u64, key: u64, ty: u8, abort: bool) -> ScsiResponse {
    run_prout(l, n, if abort { 5 } else { 4 }, ty, key, sark)
}

pub fn prin(sa: u8, alloc: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = 0x5e;
    c[1] = sa;
    c[7..9].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// READ KEYS: (PRgeneration, keys).
pub fn read_keys(l: &Lun, n: &Nexus) -> (u32, Vec<u64>) {
    let r = l.execute(n, &prin(0, 16384), &[]);
    assert_eq!(r.status, GOOD, "{r:?}");
    let d = r.data;
    let gen = u32::from_be_bytes(d[0..4].try_into().unwrap());
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    let keys = d[8..8 + len]
        .chunks_exact(8)
        .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
        .collect();
    (gen, keys)
}

/// READ RESERVATION: (key, type) when reserved.
pub fn read_reservation(l: &Lun, n: &Nexus) -> Option<(u64, u8)> {
    let r = l.execute(n, &prin(1, 16384), &[]);
    assert_eq!(r.status, GOOD, "{r:?}");
    let d = r.data;
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap());
    if len == 0 {
        return None;
    }
    assert_eq!(len, 16);
    Some((
        u64::from_be_bytes(d[8..16].try_into().unwrap()),
        d[21] & 0x0f,
    ))
}

pub fn is_all_registrants(ty: u8) -> bool {
    ty == WE_AR || ty == EA_AR
}
