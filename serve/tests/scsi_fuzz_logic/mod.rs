//! The logic of the `scsi_cdb` fuzz target: an arbitrary sequence of commands from three I_T
//! nexuses on a memory-backed LUN whose reservation state lives on a memory device.
//!
//! Oracles: nothing panics; every response is well formed (a known status; fixed-format
//! sense data exactly with CHECK CONDITION, and with GOOD only from REQUEST SENSE; no Data-In
//! for a command that moves none, nor beyond its allocation length where the CDB has one);
//! PRgeneration never goes back; and a LUN opened afterwards on the same state device reports
//! the same reservation state.
#![allow(dead_code)]

use std::sync::Arc;
use vstor_core::{BlockDevice, MemoryDevice};
use vstor_serve::scsi::{DataDir, Lun, LunConfig, Nexus, PR_STORE_BYTES};
use vstor_serve::{Export, Opened};

/// Operation codes the generator favours.
const OPCODES: [u8; 34] = [
    0x00, 0x03, 0x08, 0x0a, 0x12, 0x1a, 0x25, 0x28, 0x2a, 0x2e, 0x2f, 0x34, 0x35, 0x41, 0x42, 0x5a,
    0x5e, 0x5f, 0x88, 0x89, 0x8a, 0x8e, 0x8f, 0x90, 0x91, 0x93, 0x9e, 0xa0, 0xa3, 0xa8, 0xaa, 0xae,
    0xaf, 0x5f,
];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

fn lun_on(data: Arc<dyn BlockDevice>, pr: Arc<dyn BlockDevice>) -> Arc<Lun> {
    let opened = Opened {
        device: data,
        live: None,
        qos: None,
        notes: Vec::new(),
        format: "raw".into(),
    };
    let export = Arc::new(Export::new("fuzz", "mem", false, opened));
    let config = LunConfig {
        serial: "fuzz".into(),
        naa: 0x5000_0000_0000_0001,
        pr_state: None,
        vendor: "VSTOR".into(),
        product: "fuzz".into(),
    };
    Lun::with_pr_device(export, config, pr).expect("open the LUN")
}

fn nexus(i: u8) -> Nexus {
    Nexus {
        initiator: format!("iqn.2026-12.fuzz:i{},i,0x00000000000{}", i % 3, i % 3),
        target: format!("iqn.2026-12.io.vstor:fuzz,t,0x000{}", i % 2),
    }
}

/// The allocation length a CDB names, where it names one.
fn allocation_length(cdb: &[u8]) -> Option<usize> {
    let be16 = |i: usize| usize::from(u16::from_be_bytes([cdb[i], cdb[i + 1]]));
    let be32 = |i: usize| u32::from_be_bytes(cdb[i..i + 4].try_into().unwrap()) as usize;
    match cdb[0] {
        0x03 | 0x1a => Some(usize::from(cdb[4])),
        0x12 => Some(be16(3)),
        0x5a | 0x5e => Some(be16(7)),
        0x9e => Some(be32(10)),
        0xa3 => Some(be32(6)),
        0xa0 => Some(be32(6)),
        _ => None,
    }
}

/// READ FULL STATUS and the PRgeneration, from a nexus of its own.
fn pr_snapshot(l: &Lun) -> (u32, Vec<u8>) {
    let obs = Nexus {
        initiator: "iqn.2026-12.fuzz:observer,i,0x000000000009".into(),
        target: "iqn.2026-12.io.vstor:fuzz,t,0x0000".into(),
    };
    let cdb = [0x5e, 3, 0, 0, 0, 0, 0, 0xff, 0xff, 0];
    for _ in 0..16 {
        let r = l.execute(&obs, &cdb, &[]);
        if r.status == 0 {
            let gen = u32::from_be_bytes(r.data[0..4].try_into().unwrap());
            return (gen, r.data);
        }
        assert_eq!(r.status, 2, "{r:?}");
    }
    panic!("the observer never gets READ FULL STATUS");
}

/// Runs one input; returns the status of every command.
pub fn run(data: &[u8]) -> Vec<u8> {
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
    let pr: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(PR_STORE_BYTES).unwrap());
    let l = lun_on(mem.clone(), pr.clone());
    let mut input = Input(data);
    let mut generation = 0u32;
    let mut steps = 0;
    let mut statuses = Vec::new();
    while let Some(sel) = input.byte() {
        steps += 1;
        if steps > 64 {
            break;
        }
        let n = nexus(sel & 0x07);
        if sel & 0x80 != 0 {
            l.nexus_lost(&n);
            continue;
        }
        let len = usize::from(input.byte().unwrap_or(0) % 17);
        let mut cdb = input.bytes(len);
        if sel & 0x40 != 0 && !cdb.is_empty() {
            cdb[0] = OPCODES[usize::from(cdb[0]) % OPCODES.len()];
        }
        let dlen = usize::from(input.byte().unwrap_or(0)) * 8;
        let mut out = input.bytes(dlen);
        if sel & 0x20 != 0 {
            // Data-Out of the length the CDB asks for.
            if let Ok(DataDir::Out(want)) = l.data_dir_of(&cdb) {
                out.resize((want as usize).min(1 << 20), 0);
            }
        }
        let dir = l.data_dir_of(&cdb);
        if let Err(r) = &dir {
            assert_eq!(r.status, 2);
        }
        let r = l.execute(&n, &cdb, &out);
        statuses.push(r.status);
        match r.status {
            0x00 => {
                if cdb.first() == Some(&0x03) {
                    assert!(r.sense.is_empty());
                } else {
                    assert!(r.sense.is_empty(), "{cdb:?}: {r:?}");
                }
            }
            0x02 => {
                assert_eq!(r.sense.len(), 18, "{r:?}");
                assert_eq!(r.sense[0] & 0x7f, 0x70);
                assert!(r.data.is_empty());
            }
            0x18 | 0x40 => assert!(r.sense.is_empty() && r.data.is_empty()),
            s => panic!("status {s:#x} for {cdb:?}"),
        }
        if r.status == 0 {
            match dir {
                Ok(DataDir::In) => {
                    if let Some(alloc) = allocation_length(&cdb) {
                        assert!(r.data.len() <= alloc, "{cdb:?}: {} bytes", r.data.len());
                    }
                }
                _ => assert!(r.data.is_empty(), "{cdb:?}: Data-In for a command without"),
            }
        }
        if cdb.first() == Some(&0x5f) {
            let (g, _) = pr_snapshot(&l);
            assert!(g >= generation, "PRgeneration went back");
            generation = g;
        }
    }
    let before = pr_snapshot(&l);
    drop(l);
    let again = lun_on(mem, pr);
    assert_eq!(pr_snapshot(&again), before, "the stored state differs");
    statuses
}
