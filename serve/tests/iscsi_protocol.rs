//! `vstor serve`'s iSCSI target (issue 19) against a small initiator written here
//! (`iscsi_common`): login (None, CHAP one-way and mutual), discovery with the ACL, the three
//! ways write data arrives (immediate, unsolicited, R2T), digests, task management, sharing
//! rules, PREEMPT AND ABORT dropping the victim's queued writes, an online resize seen as a
//! unit attention, and bad input: each gets the reject, check condition or closed connection
//! RFC 7143 names, while another session keeps working and the disk keeps its data.
//!
//! Each test starts its own daemon in-process on a loopback port the system picks.

mod iscsi_common;

use iscsi_common::{pr, Initiator, LoginOpts, Refused, Resp, CHECK_CONDITION, GOOD};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use vstor_core::{BlockDevice, ErrorKind, MemoryDevice};
use vstor_serve::daemon::{Daemon, DaemonConfig, ExportArg};
use vstor_serve::export::ServeError;
use vstor_serve::iscsi::chap::ChapConfig;
use vstor_serve::iscsi::pdu::{self, op, Bhs, NO_TAG};
use vstor_serve::iscsi::{IscsiConfig, TargetOpts};
use vstor_serve::{Opened, Opener};

const MEM: u64 = 16 << 20;
const IA: &str = "iqn.2026-12.test:node-a";
const IB: &str = "iqn.2026-12.test:node-b";

/// Opens `mem:SIZE`: a fresh zeroed memory device.
struct MemOpener;

impl Opener for MemOpener {
    fn open(&self, _name: &str, target: &str, read_only: bool) -> Result<Opened, ServeError> {
        let size = target
            .strip_prefix("mem:")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ServeError::new(ErrorKind::NotFound, format!("unknown {target}")))?;
        let d = MemoryDevice::new(size)?;
        let device: Arc<dyn BlockDevice> = Arc::new(if read_only { d.into_read_only() } else { d });
        Ok(Opened {
            device,
            live: None,
            qos: None,
            notes: Vec::new(),
            format: "raw".into(),
        })
    }
}

struct Fixture {
    daemon: Option<Daemon>,
    addr: SocketAddr,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let failed = d.shutdown();
            assert!(failed.is_empty(), "{failed:?}");
        }
    }
}

fn export(name: &str, opts: TargetOpts) -> ExportArg {
    ExportArg {
        name: name.into(),
        target: format!("mem:{MEM}"),
        iscsi: opts,
    }
}

fn start(exports: Vec<ExportArg>, chap: Option<ChapConfig>) -> Fixture {
    let config = DaemonConfig {
        exports,
        iscsi: vec!["127.0.0.1:0".into()],
        iscsi_config: IscsiConfig {
            chap,
            login_timeout: Duration::from_secs(3),
            ..Default::default()
        },
        ..Default::default()
    };
    let daemon = Daemon::start(config, Arc::new(MemOpener)).expect("daemon starts");
    let addr = daemon.iscsi().expect("iscsi server").portals()[0];
    Fixture {
        daemon: Some(daemon),
        addr,
    }
}

fn shared() -> TargetOpts {
    TargetOpts {
        shared: true,
        ..Default::default()
    }
}

const T0: &str = "iqn.2026-12.io.vstor:d0";

fn login(f: &Fixture, o: &LoginOpts) -> Initiator {
    let mut i = Initiator::login(f.addr, o)
        .unwrap()
        .expect("login accepted");
    if o.target.is_some() {
        i.clear_ua().unwrap();
    }
    i
}

fn refused(f: &Fixture, o: &LoginOpts) -> u16 {
    match Initiator::login(f.addr, o).unwrap() {
        Ok(_) => panic!("login of {} accepted", o.initiator),
        Err(Refused(code)) => code,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8) ^ (i as u8))
        .collect()
}

fn good(r: &Resp) {
    assert_eq!(r.status, GOOD, "{r:?}");
}

#[test]
fn data_arrives_every_way_and_reads_back() {
    let f = start(vec![export("d0", shared())], None);
    // Immediate data and R2Ts (the defaults), with digests.
    let mut o = LoginOpts::new(IA, Some(T0));
    o.digests = true;
    let mut a = login(&f, &o);
    assert!(a.digests.header && a.digests.data);
    assert_eq!(a.send_max, 262144, "the target declares 256 KiB");
    for (lba, len, seed) in [
        (0u32, 512usize, 1u8),
        (8, 65536, 2),
        (200, 1 << 20, 3),
        (3000, 4096, 4),
    ] {
        let d = pattern(seed, len);
        good(&a.write10(lba, &d).unwrap());
        let r = a.read10(lba, (len / 512) as u16).unwrap();
        good(&r);
        assert_eq!(r.data, d, "read back at {lba}");
    }
    assert_eq!(a.ping(b"hello").unwrap(), b"hello");
    // Unsolicited data (InitialR2T=No), no immediate data.
    let mut o = LoginOpts::new(IB, Some(T0));
    o.initial_r2t = false;
    o.immediate_data = false;
    o.first_burst = 16384;
    let mut b = login(&f, &o);
    assert!(!b.initial_r2t && !b.immediate_data);
    let d = pattern(9, 300 * 512);
    good(&b.write10(5000, &d).unwrap());
    assert_eq!(a.read10(5000, 300).unwrap().data, d, "A sees B's write");
    // A read shorter than the initiator expects: underflow, residual.
    let r = a.cmd(&iscsi_common::read10_cdb(0, 1), &[], 4096).unwrap();
    good(&r);
    assert_eq!((r.flags, r.residual, r.data.len()), (0x02, 3584, 512));
    a.logout().unwrap();
    b.logout().unwrap();
}

#[test]
fn discovery_lists_what_the_acl_allows() {
    let f = start(
        vec![
            export("d0", shared()),
            export(
                "Priv_1",
                TargetOpts {
                    initiators: vec![IA.into()],
                    ..Default::default()
                },
            ),
            export(
                "named",
                TargetOpts {
                    iqn: Some("iqn.2000-01.example:custom".into()),
                    ..Default::default()
                },
            ),
        ],
        None,
    );
    let mut a = Initiator::login(f.addr, &LoginOpts::new(IA, None))
        .unwrap()
        .unwrap();
    let mut names: Vec<String> = a
        .send_targets("All")
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k == "TargetName")
        .map(|(_, v)| v)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "iqn.2000-01.example:custom",
            T0,
            "iqn.2026-12.io.vstor:priv-1",
        ]
    );
    let all = a.send_targets("All").unwrap();
    assert_eq!(all[1], ("TargetAddress".into(), format!("{},1", f.addr)));
    // A SCSI command in a discovery session is rejected.
    let h = a.command_header(&[0; 6], 0, 0);
    a.send(&h, &[]).unwrap();
    let r = a.recv().unwrap();
    assert_eq!(
        (r.bhs.opcode(), r.bhs.0[2]),
        (op::REJECT, pdu::reject::PROTOCOL)
    );
    a.logout().unwrap();
    let mut b = Initiator::login(f.addr, &LoginOpts::new(IB, None))
        .unwrap()
        .unwrap();
    let names: Vec<String> = b
        .send_targets("All")
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k == "TargetName")
        .map(|(_, v)| v)
        .collect();
    assert!(!names.iter().any(|n| n.contains("priv")), "{names:?}");
    // Not in the ACL: authorization failure; an unknown target: not found.
    assert_eq!(
        refused(&f, &LoginOpts::new(IB, Some("iqn.2026-12.io.vstor:priv-1"))),
        0x0202
    );
    assert_eq!(
        refused(&f, &LoginOpts::new(IB, Some("iqn.2026-12.io.vstor:nope"))),
        0x0203
    );
    // The target name compares without case.
    login(&f, &LoginOpts::new(IA, Some("IQN.2026-12.io.vstor:Priv-1")));
}

#[test]
fn an_unshared_export_admits_one_initiator_at_a_time() {
    let f = start(vec![export("d0", TargetOpts::default())], None);
    let mut a = login(&f, &LoginOpts::new(IA, Some(T0)));
    // The same initiator may open another session (another ISID)...
    let mut o = LoginOpts::new(IA, Some(T0));
    o.isid = [0x80, 0, 0, 0, 0, 2];
    let a2 = login(&f, &o);
    // ...another initiator may not.
    assert_eq!(refused(&f, &LoginOpts::new(IB, Some(T0))), 0x0301);
    good(&a.write10(0, &pattern(1, 4096)).unwrap());
    a.logout().unwrap();
    a2.logout().unwrap();
    let mut b = login(&f, &LoginOpts::new(IB, Some(T0)));
    assert_eq!(b.read10(0, 8).unwrap().data, pattern(1, 4096));
    // Session reinstatement: a login with the ISID of a live session replaces it.
    let mut b2 = login(&f, &LoginOpts::new(IB, Some(T0)));
    assert!(b.closed(), "the old session's connection is closed");
    good(&b2.read10(0, 1).unwrap());
}

fn chap_config(mutual: bool) -> ChapConfig {
    let mut text = format!(
        "initiator {IA} secret-of-node-a\ninitiator chapuser 0x000102030405060708090a0b0c\n"
    );
    if mutual {
        text.push_str("target vstor-target target-secret-99\n");
    }
    ChapConfig::parse(&text).unwrap()
}

#[test]
fn chap_one_way_mutual_and_wrong() {
    let f = start(vec![export("d0", shared())], Some(chap_config(true)));
    // CHAP is required: AuthMethod=None alone is refused.
    assert_eq!(refused(&f, &LoginOpts::new(IA, Some(T0))), 0x0201);
    let mut o = LoginOpts::new(IA, Some(T0));
    o.chap = Some((IA.into(), b"secret-of-node-a".to_vec()));
    let mut a = login(&f, &o);
    good(&a.write10(0, &pattern(3, 512)).unwrap());
    // A CHAP name that is not the initiator name, with a hex secret; mutual CHAP.
    let mut o = LoginOpts::new(IB, Some(T0));
    o.chap = Some(("chapuser".into(), (0u8..13).collect::<Vec<u8>>()));
    o.mutual = Some(("vstor-target".into(), b"target-secret-99".to_vec()));
    let mut b = login(&f, &o);
    assert_eq!(b.read10(0, 1).unwrap().data, pattern(3, 512));
    // Wrong secret, unknown name: authentication failure.
    let mut o = LoginOpts::new(IA, Some(T0));
    o.chap = Some((IA.into(), b"not-the-secret!".to_vec()));
    assert_eq!(refused(&f, &o), 0x0201);
    o.chap = Some(("nobody".into(), b"secret-of-node-a".to_vec()));
    assert_eq!(refused(&f, &o), 0x0201);
    // Discovery needs CHAP too.
    assert_eq!(refused(&f, &LoginOpts::new(IA, None)), 0x0201);
    // The sessions that passed are unharmed.
    good(&a.read10(0, 1).unwrap());
    drop(f);
    // Without a target secret, mutual CHAP is refused.
    let f = start(vec![export("d0", shared())], Some(chap_config(false)));
    let mut o = LoginOpts::new(IA, Some(T0));
    o.chap = Some((IA.into(), b"secret-of-node-a".to_vec()));
    o.mutual = Some(("vstor-target".into(), b"target-secret-99".to_vec()));
    assert_eq!(refused(&f, &o), 0x0201);
}

/// A write whose data the test sends by hand: the command with no immediate data, then the
/// R2T it gets.
fn start_write(i: &mut Initiator, lba: u32, len: usize) -> (u32, Bhs) {
    let h = i.command_header(
        &iscsi_common::write10_cdb(lba, (len / 512) as u16),
        len as u32,
        0,
    );
    let itt = h.itt();
    i.send(&h, &[]).unwrap();
    let r2t = i.recv().unwrap();
    assert_eq!(r2t.bhs.opcode(), op::R2T);
    assert_eq!((r2t.bhs.itt(), r2t.bhs.u32_at(40)), (itt, 0));
    (itt, r2t.bhs)
}

fn data_out(i: &mut Initiator, itt: u32, ttt: u32, datasn: u32, off: u32, data: &[u8]) {
    let mut h = Bhs::new(op::DATA_OUT);
    h.0[1] = 0x80;
    h.set_u32(16, itt);
    h.set_u32(20, ttt);
    h.set_u32(36, datasn);
    h.set_u32(40, off);
    i.send(&h, data).unwrap();
}

fn expect_reject(i: &mut Initiator, reason: u8) -> Bhs {
    let r = i.recv().unwrap();
    assert_eq!(r.bhs.opcode(), op::REJECT, "{:?}", r.bhs);
    assert_eq!(r.bhs.0[2], reason, "reject reason");
    assert_eq!(r.data.len(), 48, "a reject carries the header it rejects");
    Bhs(r.data.try_into().unwrap())
}

fn expect_aborted_command(i: &mut Initiator, itt: u32, asc: (u8, u8)) {
    let r = i.finish(itt, &[]).unwrap();
    assert_eq!(r.status, CHECK_CONDITION);
    assert_eq!(r.sense_code(), Some((0x0b, asc.0, asc.1)), "{r:?}");
}

#[test]
fn bad_input_is_rejected_and_others_are_unharmed() {
    let f = start(vec![export("d0", shared())], None);
    let mut healthy = login(&f, &LoginOpts::new(IA, Some(T0)));
    let keep = pattern(77, 8192);
    good(&healthy.write10(100, &keep).unwrap());
    let mut o = LoginOpts::new(IB, Some(T0));
    o.immediate_data = false;
    let mut x = login(&f, &o);

    // An unknown opcode: rejected (command not supported); the connection goes on.
    let mut h = Bhs::new(0x1f);
    h.0[0] |= 0x40;
    h.set_u32(16, 0x1234);
    x.send(&h, &[]).unwrap();
    assert_eq!(
        expect_reject(&mut x, pdu::reject::NOT_SUPPORTED).opcode(),
        0x1f
    );
    assert_eq!(x.ping(b"still here").unwrap(), b"still here");

    // Data-Out past its R2T: rejected, and the write ends with TOO MUCH WRITE DATA; nothing
    // of it is written.
    let (itt, r2t) = start_write(&mut x, 100, 4096);
    let ttt = r2t.u32_at(20);
    data_out(&mut x, itt, ttt, 0, 0, &vec![0xee; 8192]);
    expect_reject(&mut x, pdu::reject::INVALID_FIELD);
    expect_aborted_command(&mut x, itt, (0x4b, 0x02));
    // Data-Out at the wrong offset, with the wrong TTT, with the wrong DataSN.
    for (off, bad_ttt, sn) in [(512u32, false, 0u32), (0, true, 0), (0, false, 3)] {
        let (itt, r2t) = start_write(&mut x, 100, 4096);
        let ttt = if bad_ttt {
            r2t.u32_at(20) ^ 0x55
        } else {
            r2t.u32_at(20)
        };
        data_out(&mut x, itt, ttt, sn, off, &[0xee; 512]);
        expect_reject(&mut x, pdu::reject::INVALID_FIELD);
        expect_aborted_command(&mut x, itt, (0x4b, 0x05));
    }
    // Data-Out for no task at all: rejected.
    data_out(&mut x, 0x7777, 0x42, 0, 0, &[0; 512]);
    expect_reject(&mut x, pdu::reject::INVALID_FIELD);
    // Unsolicited data where InitialR2T=Yes: the write ends, nothing written.
    let h = x.command_header(&iscsi_common::write10_cdb(100, 1), 512, 0);
    let itt = h.itt();
    let mut h2 = h;
    h2.0[1] &= !0x80;
    x.send(&h2, &[]).unwrap();
    let r2t = x.recv().unwrap();
    assert_eq!(r2t.bhs.opcode(), op::R2T);
    data_out(&mut x, itt, NO_TAG, 0, 0, &[0xee; 512]);
    expect_reject(&mut x, pdu::reject::INVALID_FIELD);
    expect_aborted_command(&mut x, itt, (0x4b, 0x02));
    // Immediate data where ImmediateData=No: the command is rejected (and so ends).
    let h = x.command_header(&iscsi_common::write10_cdb(100, 1), 512, 0);
    x.send(&h, &[0xee; 512]).unwrap();
    expect_reject(&mut x, pdu::reject::PROTOCOL);
    // A malformed AHS: rejected.
    let mut h = x.command_header(&[0; 6], 0, 0);
    h.0[4] = 1;
    let mut raw = h.0.to_vec();
    raw.extend_from_slice(&[0, 1, 9, 0]);
    x.send_raw(&raw).unwrap();
    expect_reject(&mut x, pdu::reject::INVALID_FIELD);
    // A login request in the full feature phase: rejected.
    let mut h = Bhs::new(op::LOGIN_REQ);
    h.0[0] |= 0x40;
    x.send(&h, &[]).unwrap();
    expect_reject(&mut x, pdu::reject::PROTOCOL);
    // A bad CDB: CHECK CONDITION, the session goes on.
    let r = x.cmd(&[0xff, 0, 0, 0, 0, 0], &[], 0).unwrap();
    assert_eq!(r.status, CHECK_CONDITION);
    assert_eq!(r.sense_code().map(|c| (c.0, c.1)), Some((5, 0x20)));
    // A write past the end: LBA OUT OF RANGE.
    let r = x
        .cmd(
            &iscsi_common::write10_cdb((MEM / 512) as u32, 1),
            &[0; 512],
            0,
        )
        .unwrap();
    assert_eq!(r.sense_code().map(|c| (c.0, c.1)), Some((5, 0x21)), "{r:?}");
    assert_eq!(x.ping(b"x").unwrap(), b"x");

    // A data segment longer than the target's MaxRecvDataSegmentLength: rejected, closed.
    let mut h = Bhs::new(op::NOP_OUT);
    h.0[0] |= 0x40;
    h.0[1] = 0x80;
    h.set_u32(16, 9);
    x.send(&h, &vec![0u8; 262144 + 512]).unwrap();
    expect_reject(&mut x, pdu::reject::PROTOCOL);
    assert!(x.closed());

    // A header digest error: the connection ends (nothing in that header can be trusted).
    let mut o = LoginOpts::new(IB, Some(T0));
    o.digests = true;
    let mut y = login(&f, &o);
    let h = y.command_header(&[0; 6], 0, 0);
    let mut raw = Vec::new();
    pdu::write_pdu(&mut raw, &h, &[], y.digests).unwrap();
    raw[48] ^= 0xff;
    y.send_raw(&raw).unwrap();
    assert!(y.closed());
    // A data digest error on a write's data: rejected (data digest), and the write ends.
    let mut y = login(&f, &o);
    let (itt, r2t) = start_write(&mut y, 100, 512);
    let mut h = Bhs::new(op::DATA_OUT);
    h.0[1] = 0x80;
    h.set_u32(16, itt);
    h.set_u32(20, r2t.u32_at(20));
    let mut raw = Vec::new();
    pdu::write_pdu(&mut raw, &h, &[&[0xee; 512]], y.digests).unwrap();
    let n = raw.len();
    raw[n - 1] ^= 0xff;
    y.send_raw(&raw).unwrap();
    expect_reject(&mut y, pdu::reject::DATA_DIGEST);
    expect_aborted_command(&mut y, itt, (0x47, 0x05));
    assert_eq!(y.ping(b"ok").unwrap(), b"ok");

    // Garbage instead of a login, and a login whose text is malformed: closed / refused.
    let mut s = std::net::TcpStream::connect(f.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Write::write_all(&mut s, &[0x41u8; 48]).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut s, &mut b).unwrap_or(0), 0);
    let mut s = std::net::TcpStream::connect(f.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut h = Bhs::new(op::LOGIN_REQ);
    h.0[0] |= 0x40;
    h.0[1] = 0x81;
    pdu::write_pdu(&mut s, &h, &[b"InitiatorName\0"], Default::default()).unwrap();
    let r = pdu::read_pdu(&mut s, Default::default(), 65536).unwrap();
    assert_eq!((r.bhs.opcode(), r.bhs.u16_at(36)), (op::LOGIN_RESP, 0x0200));
    // A connection that never logs in is closed after the login timeout (3 s here).
    let mut s = std::net::TcpStream::connect(f.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = std::time::Instant::now();
    assert_eq!(std::io::Read::read(&mut s, &mut b).unwrap_or(0), 0);
    assert!(t.elapsed() < Duration::from_secs(8));

    // Random PDU headers (seeded): none may hurt the daemon.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..40 {
        let Ok(Ok(mut z)) = Initiator::login(f.addr, &LoginOpts::new(IB, Some(T0))) else {
            panic!("login after random input");
        };
        for _ in 0..20 {
            let mut h = Bhs([0u8; 48]);
            for c in h.0.chunks_mut(8) {
                c.copy_from_slice(&next().to_le_bytes()[..c.len()]);
            }
            h.0[4] = (next() % 3) as u8;
            let len = (next() % 1024) as u32;
            h.set_data_len(len);
            let mut raw = h.0.to_vec();
            raw.resize(48 + h.ahs_len() + len.next_multiple_of(4) as usize, 0x5a);
            if z.send_raw(&raw).is_err() {
                break;
            }
        }
    }
    // The healthy session, and the disk, are unharmed.
    assert_eq!(healthy.ping(b"alive").unwrap(), b"alive");
    assert_eq!(healthy.read10(100, 16).unwrap().data, keep);
}

#[test]
fn preempt_and_abort_drops_the_victims_queued_writes() {
    let f = start(vec![export("d0", shared())], None);
    let mut a = login(&f, &LoginOpts::new(IA, Some(T0)));
    let mut b = login(&f, &LoginOpts::new(IB, Some(T0)));
    good(&a.prout(pr::REGISTER_AND_IGNORE, 0, 0, 0xa, false).unwrap());
    good(&a.prout(pr::RESERVE, pr::WE_RO, 0xa, 0, false).unwrap());
    good(&b.prout(pr::REGISTER_AND_IGNORE, 0, 0, 0xb, false).unwrap());
    assert_eq!(a.read_reservation().unwrap(), Some((0xa, pr::WE_RO)));
    let region = pattern(0xa, 64 << 10);
    good(&a.write10(0, &region).unwrap());
    // A queues many writes over the region and does not wait for them.
    let a_data = vec![0xaa; 64 << 10];
    let mut tags = Vec::new();
    for _ in 0..48 {
        tags.push(
            a.start(&iscsi_common::write10_cdb(0, 128), &a_data, 0)
                .unwrap(),
        );
    }
    // B fences A.
    good(
        &b.prout(pr::PREEMPT_AND_ABORT, pr::WE_RO, 0xb, 0xa, false)
            .unwrap(),
    );
    // B writes its own pattern once the preempt has completed.
    let b_data = pattern(0xb, 64 << 10);
    good(&b.write10(0, &b_data).unwrap());
    // A collects what answers come (aborted tasks get none); R2Ts of its writes, if any come,
    // are answered (the target must refuse or drop those writes).
    a.sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut answered = 0;
    while let Ok(p) = a.recv() {
        match p.bhs.opcode() {
            op::R2T => {
                let (off, len) = (p.bhs.u32_at(40) as usize, p.bhs.u32_at(44) as usize);
                a.send_data(p.bhs.itt(), p.bhs.u32_at(20), &a_data, off, off + len)
                    .unwrap();
            }
            op::SCSI_RESP => answered += 1,
            other => panic!("unexpected PDU {other:#x}"),
        }
    }
    assert!(answered <= tags.len());
    a.sock.set_read_timeout(Some(iscsi_common::WAIT)).unwrap();
    // None of A's writes landed after the preempt completed: B's pattern is whole.
    assert_eq!(b.read10(0, 128).unwrap().data, b_data);
    // A's next write gets RESERVATION CONFLICT (after its unit attention).
    let r = a.write10(0, &a_data[..512]).unwrap();
    assert_eq!(r.status, iscsi_common::RESERVATION_CONFLICT, "{r:?}");
    assert_eq!(b.read_reservation().unwrap(), Some((0xb, pr::WE_RO)));
    assert_eq!(b.read_keys().unwrap().1, vec![0xb]);
    good(&b.write10(8, &b_data[..4096]).unwrap());
}

#[test]
fn task_management_and_resize() {
    let f = start(vec![export("d0", shared())], None);
    let mut a = login(&f, &LoginOpts::new(IA, Some(T0)));
    let tmf = |i: &mut Initiator, func: u8, lun: u64, rtt: u32| -> u8 {
        let mut h = Bhs::new(op::TMF_REQ);
        h.0[0] |= 0x40;
        h.0[1] = 0x80 | func;
        h.set_u64(8, lun);
        h.set_u32(16, 0x5000 + u32::from(func));
        h.set_u32(20, rtt);
        h.set_u32(24, i.cmd_sn);
        h.set_u32(32, i.cmd_sn);
        i.send(&h, &[]).unwrap();
        let r = i.recv().unwrap();
        assert_eq!(r.bhs.opcode(), op::TMF_RESP);
        r.bhs.0[2]
    };
    // ABORT TASK of a task that does not exist (and was not sent before it).
    assert_eq!(tmf(&mut a, 1, 0, 0x9999), 1);
    // A write waiting for its data is aborted: later Data-Out for it is dropped quietly.
    let mut a2 = {
        let mut o = LoginOpts::new(IA, Some(T0));
        o.immediate_data = false;
        o.isid = [0x80, 0, 0, 0, 0, 9];
        login(&f, &o)
    };
    let (itt2, r2t) = start_write(&mut a2, 0, 4096);
    assert_eq!(tmf(&mut a2, 1, 0, itt2), 0);
    data_out(&mut a2, itt2, r2t.u32_at(20), 0, 0, &[0x11; 4096]);
    assert_eq!(
        a2.ping(b"p").unwrap(),
        b"p",
        "no reject, no response for the aborted task"
    );
    assert_eq!(a2.read10(0, 8).unwrap().data, vec![0; 4096]);
    // LOGICAL UNIT RESET; a function not supported; a LUN that does not exist.
    assert_eq!(tmf(&mut a, 5, 0, NO_TAG), 0);
    let r = a.cmd(&[0; 6], &[], 0).unwrap();
    assert_eq!(r.sense_code(), Some((6, 0x29, 0x03)), "reset UA: {r:?}");
    assert_eq!(tmf(&mut a, 6, 0, NO_TAG), 0);
    a.clear_ua().unwrap();
    assert_eq!(tmf(&mut a, 3, 0, NO_TAG), 5);
    assert_eq!(tmf(&mut a, 5, 0x0001_0000_0000_0000, NO_TAG), 2);
    // LUN 1 does not exist: INQUIRY says so, other commands fail.
    let mut h = a.command_header(&[0x12, 0, 0, 0, 36, 0], 0, 36);
    h.set_u64(8, 0x0001_0000_0000_0000);
    let itt = h.itt();
    a.send(&h, &[]).unwrap();
    let r = a.finish(itt, &[]).unwrap();
    assert_eq!(r.data[0], 0x7f);
    // An online resize: the next command gets CAPACITY DATA HAS CHANGED, then the new size.
    let e = f.daemon.as_ref().unwrap().registry().get("d0").unwrap();
    e.resize(MEM * 2).unwrap();
    let r = a.cmd(&[0; 6], &[], 0).unwrap();
    assert_eq!(r.sense_code(), Some((6, 0x2a, 0x09)), "{r:?}");
    let r = a
        .cmd_past_ua(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8)
        .unwrap();
    let last = u32::from_be_bytes(r.data[0..4].try_into().unwrap());
    assert_eq!(u64::from(last) + 1, MEM * 2 / 512);
    // Removing the export closes its sessions.
    f.daemon.as_ref().unwrap().registry().remove("d0").unwrap();
    assert!(a.closed());
}

/// Not a test: scripts/bench-iscsi's helper. With `VSTOR_ISCSI_PR=reserve`, an initiator of
/// its own registers (APTPL) and takes a Write Exclusive – Registrants Only reservation on the
/// LUN of `VSTOR_ISCSI_PORTAL` and `VSTOR_ISCSI_TARGET`, and logs out (the reservation stays);
/// with `clear`, it clears every registration and the reservation.
#[test]
#[ignore = "a helper that scripts/bench-iscsi runs"]
fn bench_pr_helper() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let addr: SocketAddr = var("VSTOR_ISCSI_PORTAL").parse().unwrap();
    let target = var("VSTOR_ISCSI_TARGET");
    let mut o = LoginOpts::new("iqn.2026-12.io.vstor.bench:holder", Some(&target));
    o.isid = [0x80, 0, 0, 0, 0x0b, 0x01];
    let mut i = Initiator::login(addr, &o).unwrap().expect("login");
    i.clear_ua().unwrap();
    let key = 0xbe4c_0001;
    match var("VSTOR_ISCSI_PR").as_str() {
        "reserve" => {
            good(&i.prout(pr::REGISTER_AND_IGNORE, 0, 0, key, true).unwrap());
            good(&i.prout(pr::RESERVE, pr::WE_RO, key, 0, false).unwrap());
            assert_eq!(i.read_reservation().unwrap(), Some((key, pr::WE_RO)));
        }
        "clear" => {
            good(&i.prout(pr::REGISTER_AND_IGNORE, 0, 0, key, false).unwrap());
            good(&i.prout(pr::CLEAR, 0, key, 0, false).unwrap());
            assert_eq!(i.read_reservation().unwrap(), None);
        }
        other => panic!("VSTOR_ISCSI_PR={other}: reserve or clear"),
    }
    i.logout().unwrap();
}
