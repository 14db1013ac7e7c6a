//! The persistent-reservation state under power cuts: a sequence of PERSISTENT RESERVE OUT
//! commands runs on a LUN whose state lives on a fault device; the power is cut at every
//! write of the state in turn (the write lost, kept, or torn at a sector boundary). The
//! command in flight fails; after power-on a LUN opened on the same medium holds exactly the
//! state before that command or after it, never anything else.

mod scsi_common;

use scsi_common::*;
use std::sync::Arc;
use vstor_core::{BlockDevice, CutPolicy, FaultDevice, MemoryDevice};
use vstor_serve::scsi::{Lun, Nexus, PR_STORE_BYTES};

/// (issuing nexus, service action, type, reservation key, service action key, flags)
type Op = (usize, u8, u8, u64, u64, u8);

fn key(i: usize) -> u64 {
    0x0123_4567_0000_0000 | i as u64
}

fn nexuses() -> Vec<Nexus> {
    // Long names make the state several sectors long, so a write can tear.
    (0..24)
        .map(|i| Nexus {
            initiator: format!(
                "iqn.2026-12.test.power-cut:initiator-number-{i:02},i,0x0000000000{i:02x}"
            ),
            target: "iqn.2026-12.io.vstor:disk,t,0x0001".into(),
        })
        .collect()
}

fn ops() -> Vec<Op> {
    let mut v: Vec<Op> = (0..24).map(|i| (i, 6, 0, 0, key(i), 0)).collect();
    v.extend([
        (0, 1, WE_RO, key(0), 0, 0),        // RESERVE
        (1, 4, WE_RO, key(1), key(0), 0),   // PREEMPT n0
        (2, 0, 0, key(2), key(2) + 100, 0), // REGISTER: a new key
        (1, 2, WE_RO, key(1), 0, 0),        // RELEASE
        (3, 1, EA_AR, key(3), 0, 0),        // RESERVE all registrants
        (4, 5, WE_AR, key(4), 0, 0),        // PREEMPT AND ABORT everyone else
        (4, 3, 0, key(4), 0, 0),            // CLEAR
        (5, 6, 0, 0, key(5), 0x01),         // REGISTER AND IGNORE, APTPL
        (6, 6, 0, 0, key(6), 0x04),         // ... on all target ports
        (5, 1, EA, key(5), 0, 0),           // RESERVE
    ]);
    v
}

fn run(l: &Lun, ns: &[Nexus], op: &Op) -> u8 {
    let (i, sa, ty, rk, sark, flags) = *op;
    clear_ua(l, &ns[i]);
    let (c, p) = prout(sa, ty, rk, sark, flags);
    l.execute(&ns[i], &c, &p).status
}

/// Everything READ FULL STATUS and REPORT CAPABILITIES say.
fn snapshot(l: &Lun) -> Vec<u8> {
    let obs = nexus("observer");
    clear_ua(l, &obs);
    let r = l.execute(&obs, &prin(3, 65535), &[]);
    assert_eq!(r.status, GOOD);
    let mut s = r.data;
    s.extend(l.execute(&obs, &prin(2, 100), &[]).data);
    s
}

fn lun_on(dev: Arc<dyn BlockDevice>) -> Arc<Lun> {
    let data: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
    Lun::with_pr_device(export_on(data, false), config(), dev).unwrap()
}

#[test]
fn power_cut_at_every_write_leaves_the_old_or_the_new_state() {
    let ns = nexuses();
    let ops = ops();
    // The reference: the state after each command, without cuts.
    let reference = {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(PR_STORE_BYTES).unwrap());
        let l = lun_on(dev);
        let mut states = vec![snapshot(&l)];
        for op in &ops {
            assert_eq!(run(&l, &ns, op), GOOD, "{op:?}");
            states.push(snapshot(&l));
        }
        states
    };
    // Every command above writes the state once.
    let writes = ops.len() as u64;
    let policies = [
        CutPolicy::DropAll,
        CutPolicy::KeepAll,
        CutPolicy::Random {
            seed: 1,
            torn: true,
        },
        CutPolicy::Random {
            seed: 2,
            torn: true,
        },
        CutPolicy::Random {
            seed: 3,
            torn: true,
        },
    ];
    let (mut old, mut new, mut torn) = (0, 0, 0);
    for n in 1..=writes {
        for policy in policies {
            let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(PR_STORE_BYTES).unwrap());
            let fault = Arc::new(FaultDevice::new(mem));
            let l = lun_on(fault.clone());
            fault.arm_power_cut(n, policy);
            let failed = ops
                .iter()
                .position(|op| run(&l, &ns, op) != GOOD)
                .unwrap_or_else(|| panic!("no command failed with a cut at write {n}"));
            assert_eq!(failed as u64 + 1, n, "the cut hit command {failed}");
            // The LUN that saw the failure kept its state as it was.
            assert_eq!(snapshot(&l), reference[failed], "in memory, cut at {n}");
            drop(l);
            if let Some(rep) = fault.last_power_cut() {
                torn += rep
                    .writes
                    .iter()
                    .filter(|w| matches!(w.fate, vstor_core::fault::Fate::Torn { .. }))
                    .count();
            }
            fault.power_on();
            let l = lun_on(fault.clone());
            let s = snapshot(&l);
            if s == reference[failed] {
                old += 1;
                // The reopened unit goes on from there: the command again succeeds.
                assert_eq!(run(&l, &ns, &ops[failed]), GOOD);
                assert_eq!(snapshot(&l), reference[failed + 1]);
            } else if s == reference[failed + 1] {
                new += 1;
            } else {
                panic!("cut at write {n} ({policy:?}): the state is neither the old nor the new");
            }
        }
    }
    eprintln!(
        "{writes} cut points x {} policies: old {old}, new {new}, torn writes {torn}",
        policies.len()
    );
    assert!(old > 0 && new > 0 && torn > 0);
}
