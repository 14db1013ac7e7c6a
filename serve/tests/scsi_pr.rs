//! SPC-4 persistent reservations through `Lun::execute` with two (or three) I_T nexuses, as
//! libiscsi's iscsi-test-cu runs them (ProutRegister, ProutReserve with its access and
//! ownership variants, ProutClear, ProutPreempt, PrinReadKeys, PrinServiceactionRange,
//! PrinReportCapabilities), and what those suites do not check: READ FULL STATUS, REGISTER
//! AND MOVE, PREEMPT AND ABORT fencing under load, and persistence.

mod scsi_common;

use scsi_common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vstor_core::{BlockDevice, MemoryDevice};
use vstor_serve::scsi::{Lun, Nexus};

const K1: u64 = 0x1111_2222_3333_4444;
const K2: u64 = 0x5555_6666_7777_8888;

fn two() -> (Arc<Lun>, Nexus, Nexus) {
    let l = mem_lun(1 << 20);
    let a = nexus("one");
    let b = nexus("two");
    clear_ua(&l, &a);
    clear_ua(&l, &b);
    (l, a, b)
}

#[test]
fn register_simple() {
    let (l, a, _) = two();
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    assert_eq!(read_keys(&l, &a).1, vec![K1]);
    // REGISTER with a reservation key that is not ours: conflict.
    assert_eq!(register(&l, &a, K1 + 1, 0).status, RESERVATION_CONFLICT);
    assert_eq!(register(&l, &a, 0, K1).status, GOOD);
    assert!(read_keys(&l, &a).1.is_empty());
    // An unregistered nexus registering with a non-zero reservation key: conflict.
    assert_eq!(register(&l, &a, K1, 7).status, RESERVATION_CONFLICT);
}

#[test]
fn reserve_simple_every_type() {
    let (l, a, _) = two();
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    let (gen, _) = read_keys(&l, &a);
    for ty in ALL_TYPES {
        assert_eq!(reserve(&l, &a, K1, ty).status, GOOD);
        let want = if is_all_registrants(ty) { 0 } else { K1 };
        assert_eq!(read_reservation(&l, &a), Some((want, ty)));
        // The same reservation again is fine; another type is a conflict.
        assert_eq!(reserve(&l, &a, K1, ty).status, GOOD);
        let other = if ty == WE { EA } else { WE };
        assert_eq!(reserve(&l, &a, K1, other).status, RESERVATION_CONFLICT);
        // RELEASE of another type: ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION.
        let r = release(&l, &a, K1, other);
        assert_eq!(r.sense_code(), Some((5, 0x26, 0x04)));
        assert_eq!(release(&l, &a, K1, ty).status, GOOD);
        assert_eq!(read_reservation(&l, &a), None);
    }
    // RESERVE and RELEASE do not count in PRgeneration.
    assert_eq!(read_keys(&l, &a).0, gen);
    assert_eq!(register(&l, &a, 0, K1).status, GOOD);
    assert_eq!(read_keys(&l, &a).0, gen + 1);
}

/// libiscsi's verify_persistent_reserve_access: (registered i2 reads, writes; unregistered i2
/// reads, writes).
#[test]
fn access_per_type() {
    let table = [
        (EA, false, false, false, false),
        (WE, true, false, true, false),
        (EA_RO, true, true, false, false),
        (WE_RO, true, true, true, false),
        (EA_AR, true, true, false, false),
        (WE_AR, true, true, true, false),
    ];
    for (ty, rr, rw, ur, uw) in table {
        let (l, a, b) = two();
        let block = vec![0x5a; 512];
        assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
        assert_eq!(register_and_ignore(&l, &b, K2).status, GOOD);
        assert_eq!(reserve(&l, &a, K1, ty).status, GOOD);
        let want = if is_all_registrants(ty) { 0 } else { K1 };
        assert_eq!(read_reservation(&l, &a), Some((want, ty)));
        assert_eq!(l.execute(&a, &read10(1, 1), &[]).status, GOOD);
        assert_eq!(l.execute(&a, &write10(1, 1), &block).status, GOOD);
        let check = |can: bool, status: u8, what: &str| {
            if can {
                assert_eq!(status, GOOD, "type {ty}: {what} should work");
            } else {
                assert_eq!(
                    status, RESERVATION_CONFLICT,
                    "type {ty}: {what} should conflict"
                );
            }
        };
        check(
            rr,
            l.execute(&b, &read10(1, 1), &[]).status,
            "registered read",
        );
        check(
            rw,
            l.execute(&b, &write10(1, 1), &block).status,
            "registered write",
        );
        assert_eq!(register(&l, &b, 0, K2).status, GOOD);
        check(
            ur,
            l.execute(&b, &read10(1, 1), &[]).status,
            "unregistered read",
        );
        check(
            uw,
            l.execute(&b, &write10(1, 1), &block).status,
            "unregistered write",
        );
        // What every nexus may always do.
        for cdb in [
            tur(),
            vec![0x12, 0, 0, 0, 96, 0],
            vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            prin(0, 1024),
        ] {
            assert_eq!(
                l.execute(&b, &cdb, &[]).status,
                GOOD,
                "type {ty} cdb {cdb:?}"
            );
        }
        // SYNCHRONIZE CACHE, UNMAP and WRITE SAME count as writes.
        let sync = vec![0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        check(uw, l.execute(&b, &sync, &[]).status, "unregistered sync");
        assert_eq!(release(&l, &a, K1, ty).status, GOOD);
        assert_eq!(register(&l, &a, 0, K1).status, GOOD);
        // No unit attention was left for either nexus.
        assert_eq!(l.execute(&a, &tur(), &[]).status, GOOD);
        assert_eq!(l.execute(&b, &tur(), &[]).status, GOOD);
    }
}

/// libiscsi's verify_persistent_reserve_ownership: the holder unregisters. For the
/// all-registrants types the reservation stays and the other initiator releases it at once,
/// with no unit attention in the way (tgt fails these on an unexpected one).
#[test]
fn ownership_per_type() {
    for ty in ALL_TYPES {
        let (l, a, b) = two();
        assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
        assert_eq!(register_and_ignore(&l, &b, K2).status, GOOD);
        assert_eq!(reserve(&l, &a, K1, ty).status, GOOD);
        assert_eq!(register(&l, &a, 0, K1).status, GOOD);
        if is_all_registrants(ty) {
            assert_eq!(read_reservation(&l, &a), Some((0, ty)));
            assert_eq!(release(&l, &b, K2, ty).status, GOOD, "type {ty}");
            assert_eq!(read_reservation(&l, &a), None);
        } else {
            assert_eq!(read_reservation(&l, &a), None, "type {ty}");
            let ua = clear_ua(&l, &b);
            if ty == WE_RO || ty == EA_RO {
                assert_eq!(ua, vec![(0x2a, 0x04)], "type {ty}: RESERVATIONS RELEASED");
            } else {
                assert!(ua.is_empty(), "type {ty}: {ua:?}");
            }
        }
        assert_eq!(register(&l, &b, 0, K2).status, GOOD);
        assert!(read_keys(&l, &a).1.is_empty());
    }
}

#[test]
fn clear_simple() {
    let (l, a, b) = two();
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    assert_eq!(register_and_ignore(&l, &b, K2).status, GOOD);
    let (gen, keys) = read_keys(&l, &a);
    assert_eq!(keys, vec![K1, K2]);
    assert_eq!(reserve(&l, &a, K1, EA).status, GOOD);
    assert_eq!(clear(&l, &a, K1).status, GOOD);
    assert_eq!(read_reservation(&l, &a), None);
    let (g2, keys) = read_keys(&l, &a);
    assert!(keys.is_empty());
    assert_eq!(g2, gen + 1);
    // The other registrant hears RESERVATIONS PREEMPTED; the issuer nothing.
    assert_eq!(clear_ua(&l, &b), vec![(0x2a, 0x03)]);
    assert!(clear_ua(&l, &a).is_empty());
    // CLEAR from an unregistered nexus: conflict.
    assert_eq!(clear(&l, &a, 0).status, RESERVATION_CONFLICT);
}

#[test]
fn preempt_removes_registration() {
    let (l, a, b) = two();
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    assert_eq!(clear(&l, &a, K1).status, GOOD);
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    assert_eq!(register_and_ignore(&l, &b, K2).status, GOOD);
    let (gen, keys) = read_keys(&l, &a);
    assert_eq!(keys.len(), 2);
    assert_eq!(preempt(&l, &b, K1, K2, EA, false).status, GOOD);
    assert_eq!(clear_ua(&l, &a), vec![(0x2a, 0x05)]);
    assert!(clear_ua(&l, &b).is_empty());
    let (g2, keys) = read_keys(&l, &a);
    assert_eq!((g2, keys), (gen + 1, vec![K2]));
    // No reservation was made by preempting registrations only.
    assert_eq!(read_reservation(&l, &a), None);
    // A key nobody holds: conflict; a zero key with no reservation: invalid field.
    assert_eq!(
        preempt(&l, &b, 99, K2, EA, false).status,
        RESERVATION_CONFLICT
    );
    let r = preempt(&l, &b, 0, K2, EA, false);
    assert_eq!(r.sense_code(), Some((5, 0x26, 0)));
    assert_eq!(register(&l, &b, 0, K2).status, GOOD);
}

#[test]
fn preempt_takes_the_reservation() {
    let (l, a, b) = two();
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    assert_eq!(register_and_ignore(&l, &b, K2).status, GOOD);
    assert_eq!(reserve(&l, &a, K1, WE_RO).status, GOOD);
    assert_eq!(preempt(&l, &b, K1, K2, EA_RO, false).status, GOOD);
    assert_eq!(read_reservation(&l, &b), Some((K2, EA_RO)));
    assert_eq!(clear_ua(&l, &a), vec![(0x2a, 0x05)]);
    // An all-registrants reservation preempted with key 0 drops every other registration.
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    assert_eq!(release(&l, &b, K2, EA_RO).status, GOOD);
    // Releasing a registrants-only reservation tells the other registrants.
    assert_eq!(clear_ua(&l, &a), vec![(0x2a, 0x04)]);
    assert_eq!(reserve(&l, &a, K1, WE_AR).status, GOOD);
    assert_eq!(preempt(&l, &b, 0, K2, WE_AR, false).status, GOOD);
    assert_eq!(clear_ua(&l, &a), vec![(0x2a, 0x05)]);
    assert_eq!(read_keys(&l, &a).1, vec![K2]);
    assert_eq!(read_reservation(&l, &a), Some((0, WE_AR)));
}

#[test]
fn prin_read_keys_truncate_and_service_actions() {
    let (l, a, _) = two();
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    let r = l.execute(&a, &prin(0, 8), &[]);
    assert_eq!(r.status, GOOD);
    assert_eq!(r.data.len(), 8);
    // ADDITIONAL LENGTH is not cut by the allocation length.
    assert_eq!(u32::from_be_bytes(r.data[4..8].try_into().unwrap()), 8);
    for sa in 0..4u8 {
        assert_eq!(l.execute(&a, &prin(sa, 16384), &[]).status, GOOD, "sa {sa}");
    }
    for sa in 4..0x20u8 {
        let r = l.execute(&a, &prin(sa, 16384), &[]);
        assert_eq!(r.sense_code(), Some((5, 0x24, 0)), "sa {sa}");
    }
}

#[test]
fn report_capabilities() {
    let (l, a, _) = two();
    let r = l.execute(&a, &prin(2, 16384), &[]);
    assert_eq!(r.status, GOOD);
    let d = r.data;
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), 8);
    assert_eq!(d[2] & 0x08, 0, "SIP_C: SPEC_I_PT is refused");
    assert_eq!(d[2] & 0x05, 0x05, "ATP_C and PTPL_C");
    assert!((d[3] >> 4) & 7 <= 5);
    assert_eq!(d[3] & 0x80, 0x80, "TMV");
    assert_eq!(u16::from_be_bytes([d[4], d[5]]), 0xea01);
    // SPEC_I_PT is refused as advertised.
    let (c, p) = prout(0, 0, 0, K1, 0x08);
    assert_eq!(l.execute(&a, &c, &p).sense_code(), Some((5, 0x26, 0)));
    // APTPL shows in PTPL_A.
    let (c, p) = prout(6, 0, 0, K1, 0x01);
    assert_eq!(l.execute(&a, &c, &p).status, GOOD);
    assert_eq!(l.execute(&a, &prin(2, 16384), &[]).data[3] & 1, 1);
    // A wrong parameter list length.
    let (mut c, p) = prout(6, 0, 0, K1, 0);
    c[5..9].copy_from_slice(&20u32.to_be_bytes());
    assert_eq!(l.execute(&a, &c, &p).sense_code(), Some((5, 0x1a, 0)));
}

#[test]
fn read_full_status() {
    let (l, a, b) = two();
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    // b registers on all target ports.
    let (c, p) = prout(6, 0, 0, K2, 0x04);
    assert_eq!(l.execute(&b, &c, &p).status, GOOD);
    assert_eq!(reserve(&l, &a, K1, WE_RO).status, GOOD);
    let r = l.execute(&a, &prin(3, 16384), &[]);
    assert_eq!(r.status, GOOD);
    let d = r.data;
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    assert_eq!(d.len(), 8 + len);
    let mut at = 8;
    let mut seen = Vec::new();
    while at < d.len() {
        let key = u64::from_be_bytes(d[at..at + 8].try_into().unwrap());
        let flags = d[at + 12];
        let scope_type = d[at + 13];
        let rtpi = u16::from_be_bytes([d[at + 18], d[at + 19]]);
        let tlen = u32::from_be_bytes(d[at + 20..at + 24].try_into().unwrap()) as usize;
        let tid = &d[at + 24..at + 24 + tlen];
        assert_eq!(tid[0], 0x45, "iSCSI TransportID, format 01b");
        assert_eq!(tlen % 4, 0);
        let name_len = u16::from_be_bytes([tid[2], tid[3]]) as usize;
        let name = std::str::from_utf8(&tid[4..4 + name_len])
            .unwrap()
            .trim_end_matches('\0')
            .to_string();
        seen.push((key, flags, scope_type, rtpi, name));
        at += 24 + tlen;
    }
    assert_eq!(
        seen,
        vec![
            (K1, 0x01, WE_RO, 1, a.initiator.clone()),
            (K2, 0x02, 0, 1, b.initiator.clone()),
        ]
    );
}

fn transport_id(name: &str) -> Vec<u8> {
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    while n.len() % 4 != 0 {
        n.push(0);
    }
    let mut t = vec![0x45, 0];
    t.extend_from_slice(&(n.len() as u16).to_be_bytes());
    t.extend_from_slice(&n);
    t
}

#[test]
fn register_and_move() {
    let (l, a, b) = two();
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    assert_eq!(reserve(&l, &a, K1, WE).status, GOOD);
    let (gen, _) = read_keys(&l, &a);
    let tid = transport_id(&b.initiator);
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&K1.to_be_bytes());
    p[8..16].copy_from_slice(&K2.to_be_bytes());
    p[17] = 0x02; // UNREG
    p[18..20].copy_from_slice(&1u16.to_be_bytes());
    p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
    p.extend_from_slice(&tid);
    let mut c = vec![0x5f, 7, EA, 0, 0, 0, 0, 0, 0, 0];
    c[5..9].copy_from_slice(&(p.len() as u32).to_be_bytes());
    assert_eq!(l.execute(&a, &c, &p).status, GOOD);
    assert_eq!(read_reservation(&l, &a), Some((K2, EA)));
    let (g2, keys) = read_keys(&l, &a);
    assert_eq!((g2, keys), (gen + 1, vec![K2]));
    // b holds an exclusive-access reservation now: a cannot read, b can.
    assert_eq!(
        l.execute(&a, &read10(0, 1), &[]).status,
        RESERVATION_CONFLICT
    );
    assert_eq!(l.execute(&b, &read10(0, 1), &[]).status, GOOD);
    // Moving from a nexus that does not hold the reservation: conflict.
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    let mut p2 = p.clone();
    p2[17] = 0;
    assert_eq!(l.execute(&a, &c, &p2).status, RESERVATION_CONFLICT);
}

/// fence_scsi: A registers and reserves WE-RO and writes; B registers, PREEMPT AND ABORTs A.
/// A's writes in flight finish before the preempt completes or are refused; none lands after.
#[test]
fn preempt_and_abort_fences_a_writer() {
    use vstor_core::FaultDevice;
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
    let fault = Arc::new(FaultDevice::new(mem.clone()));
    fault.set_volatile_cache(false).unwrap();
    // Every write takes a while, so A keeps writes in flight.
    fault.set_latency(Some(std::time::Duration::from_micros(300)));
    let l = Lun::new(export_on(fault.clone(), false), config()).unwrap();
    let hooked: Arc<Mutex<Vec<Vec<Nexus>>>> = Arc::default();
    let h = hooked.clone();
    l.set_abort_hook(Box::new(move |v| h.lock().unwrap().push(v.to_vec())));
    let a = nexus("node-a");
    let b = nexus("node-b");
    clear_ua(&l, &a);
    clear_ua(&l, &b);
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    assert_eq!(reserve(&l, &a, K1, WE_RO).status, GOOD);
    assert_eq!(register_and_ignore(&l, &b, K2).status, GOOD);

    // A's writers: each writes a counter into its own block until refused.
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(1));
    let mut threads = Vec::new();
    for t in 0..4u32 {
        let (l, a, stop, counter) = (l.clone(), a.clone(), stop.clone(), counter.clone());
        threads.push(std::thread::spawn(move || {
            let mut refused = 0;
            while !stop.load(Ordering::Relaxed) {
                let v = counter.fetch_add(1, Ordering::Relaxed);
                let block = v.to_le_bytes().repeat(64);
                let r = l.execute(&a, &write10(t, 1), &block);
                if r.status != GOOD {
                    assert!(
                        r.status == RESERVATION_CONFLICT
                            || r.status == 0x40
                            || (r.status == CHECK_CONDITION
                                && r.sense_code() == Some((6, 0x2a, 0x05))),
                        "{r:?}"
                    );
                    refused += 1;
                }
            }
            refused
        }));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(preempt(&l, &b, K1, K2, WE_RO, true).status, GOOD);
    // What the medium holds the moment the preempt completed.
    let mut after = vec![0u8; 4 * 512];
    mem.read_at(0, &mut after).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let refused: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(refused > 0);
    let mut now = vec![0u8; 4 * 512];
    mem.read_at(0, &mut now).unwrap();
    assert_eq!(
        after, now,
        "a write of the fenced node landed after the preempt"
    );
    assert_eq!(*hooked.lock().unwrap(), vec![vec![a.clone()]]);
    // A is told why (once), then refused; B writes.
    assert_eq!(read_reservation(&l, &b), Some((K2, WE_RO)));
    assert_eq!(read_keys(&l, &b).1, vec![K2]);
    let block = vec![0xbb; 512];
    assert_eq!(
        l.execute(&a, &write10(0, 1), &block).status,
        RESERVATION_CONFLICT
    );
    assert_eq!(l.execute(&b, &write10(0, 1), &block).status, GOOD);
}

#[test]
fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.pr");
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
    let cfg = || {
        let mut c = config();
        c.pr_state = Some(path.clone());
        c
    };
    let (a, b) = (nexus("one"), nexus("two"));
    {
        let l = Lun::new(export_on(mem.clone(), false), cfg()).unwrap();
        clear_ua(&l, &a);
        clear_ua(&l, &b);
        assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
        assert_eq!(register_and_ignore(&l, &b, K2).status, GOOD);
        assert_eq!(reserve(&l, &a, K1, WE_RO).status, GOOD);
        assert_eq!(preempt(&l, &b, K1, K2, WE_RO, true).status, GOOD);
        // The file is locked while the LUN lives.
        assert!(Lun::new(export_on(mem.clone(), false), cfg()).is_err());
    }
    let l = Lun::new(export_on(mem, false), cfg()).unwrap();
    // A restarted unit greets every nexus with a reset, and keeps the reservation.
    assert_eq!(clear_ua(&l, &a), vec![(0x29, 0)]);
    assert_eq!(read_reservation(&l, &a), Some((K2, WE_RO)));
    let (gen, keys) = read_keys(&l, &a);
    assert_eq!((gen, keys), (3, vec![K2]));
    assert_eq!(
        l.execute(&a, &write10(0, 1), &[0; 512]).status,
        RESERVATION_CONFLICT
    );
}

/// A command of the victim that arrives while the PREEMPT AND ABORT holds the reservation
/// state (here: while its state write is slow) is aborted: TASK ABORTED, which the transport
/// does not answer (TAS=0), and its data never lands. Another nexus's command waits and runs.
#[test]
fn a_victim_command_waiting_on_the_preempt_is_aborted() {
    use std::time::Duration;
    use vstor_core::FaultDevice;
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
    let pr_dev = Arc::new(FaultDevice::new(Arc::new(
        MemoryDevice::new(vstor_serve::scsi::PR_STORE_BYTES).unwrap(),
    )));
    let l = Lun::with_pr_device(export_on(mem.clone(), false), config(), pr_dev.clone()).unwrap();
    let (a, b, c) = (nexus("a"), nexus("b"), nexus("c"));
    for n in [&a, &b, &c] {
        clear_ua(&l, n);
    }
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    assert_eq!(register_and_ignore(&l, &b, K2).status, GOOD);
    assert_eq!(reserve(&l, &a, K1, WE_RO).status, GOOD);
    // Every request to the state device now takes 150 ms: the preempt holds the state for
    // about 300 ms (a write and a flush).
    pr_dev.set_latency(Some(Duration::from_millis(150)));
    let spawn = |n: vstor_serve::scsi::Nexus, cdb: Vec<u8>| {
        let l = l.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(60));
            let data = if cdb[0] == 0x2a {
                vec![0xaa; 512]
            } else {
                Vec::new()
            };
            l.execute(&n, &cdb, &data).status
        })
    };
    let victim = spawn(a.clone(), write10(7, 1));
    let bystander = spawn(c.clone(), read10(7, 1));
    assert_eq!(preempt(&l, &b, K1, K2, WE, true).status, GOOD);
    assert_eq!(victim.join().unwrap(), 0x40, "TASK ABORTED");
    // c reads under B's Write Exclusive, after the preempt.
    assert_eq!(bystander.join().unwrap(), GOOD);
    assert_eq!(read_reservation(&l, &b), Some((K2, WE)));
    let mut block = vec![0u8; 512];
    mem.read_at(7 * 512, &mut block).unwrap();
    assert_eq!(block, vec![0; 512]);
    pr_dev.set_latency(None);
    // The victim's next command hears why.
    assert_eq!(clear_ua(&l, &a), vec![(0x2a, 0x05)]);
}

/// A LOGICAL UNIT RESET: every nexus hears it once; reservations and registrations stay.
#[test]
fn lun_reset_keeps_reservations() {
    let (l, a, b) = two();
    assert_eq!(register_and_ignore(&l, &a, K1).status, GOOD);
    assert_eq!(reserve(&l, &a, K1, EA).status, GOOD);
    l.reset();
    l.reset();
    assert_eq!(clear_ua(&l, &a), vec![(0x29, 0x03)]);
    assert_eq!(clear_ua(&l, &b), vec![(0x29, 0x03)]);
    assert_eq!(read_reservation(&l, &b), Some((K1, EA)));
    assert_eq!(
        l.execute(&b, &read10(0, 1), &[]).status,
        RESERVATION_CONFLICT
    );
}
