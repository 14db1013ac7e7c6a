//! A small iSCSI initiator for the tests (RFC 7143 as a plain initiator speaks it): login with
//! or without CHAP, SCSI commands with immediate data and R2T-solicited Data-Out, Data-In,
//! persistent reservation helpers, and raw PDUs for the hostile tests. It reuses the target's
//! PDU codec (`vstor_serve::iscsi::pdu`), which its own unit tests check against RFC 3720's
//! digest example; every exchange is checked here against what the RFC says a target sends.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use vstor_serve::iscsi::chap;
use vstor_serve::iscsi::pdu::{self, op, Bhs, Digests, Pdu, ReadError, NO_TAG};
use vstor_serve::iscsi::text;

/// How long the initiator waits for any PDU.
pub const WAIT: Duration = Duration::from_secs(15);

/// GOOD, CHECK CONDITION, RESERVATION CONFLICT.
pub const GOOD: u8 = 0;
pub const CHECK_CONDITION: u8 = 2;
pub const RESERVATION_CONFLICT: u8 = 0x18;

/// What a login asks for.
#[derive(Clone, Debug)]
pub struct LoginOpts {
    pub initiator: String,
    /// None: a discovery session.
    pub target: Option<String>,
    pub isid: [u8; 6],
    /// CHAP name and secret (one-way).
    pub chap: Option<(String, Vec<u8>)>,
    /// Mutual CHAP: the target name and secret expected back.
    pub mutual: Option<(String, Vec<u8>)>,
    pub digests: bool,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub first_burst: u32,
    pub max_burst: u32,
    pub recv_max: u32,
}

impl LoginOpts {
    pub fn new(initiator: &str, target: Option<&str>) -> Self {
        LoginOpts {
            initiator: initiator.into(),
            target: target.map(Into::into),
            isid: [0x80, 0, 0, 0, 0, 1],
            chap: None,
            mutual: None,
            digests: false,
            immediate_data: true,
            initial_r2t: true,
            first_burst: 65536,
            max_burst: 262144,
            recv_max: 262144,
        }
    }
}

/// A login the target refused: its status class and detail.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub u16);

/// A SCSI command's outcome.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u8,
    pub sense: Vec<u8>,
    pub data: Vec<u8>,
    /// The residual flags byte (O 0x04, U 0x02) and count.
    pub flags: u8,
    pub residual: u32,
}

impl Resp {
    /// Sense key, ASC, ASCQ.
    pub fn sense_code(&self) -> Option<(u8, u8, u8)> {
        (self.sense.len() >= 14).then(|| (self.sense[2] & 0x0f, self.sense[12], self.sense[13]))
    }
}

/// One logged-in connection.
pub struct Initiator {
    pub sock: TcpStream,
    pub digests: Digests,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub itt: u32,
    pub tsih: u16,
    /// The target's MaxRecvDataSegmentLength (the most this side may send in one PDU).
    pub send_max: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    /// Keys the target answered at login.
    pub answers: Vec<(String, String)>,
}

fn read_pdu(s: &mut TcpStream, d: Digests) -> io::Result<Pdu> {
    match pdu::read_pdu(s, d, 16 << 20) {
        Ok(p) => Ok(p),
        Err(ReadError::Io(e)) => Err(e),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}"))),
    }
}

impl Initiator {
    /// Logs in: security stage (None or CHAP), operational stage, full feature phase.
    pub fn login(addr: SocketAddr, o: &LoginOpts) -> io::Result<Result<Initiator, Refused>> {
        let sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(WAIT))?;
        sock.set_nodelay(true)?;
        let mut me = Initiator {
            sock,
            digests: Digests::default(),
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            tsih: 0,
            send_max: 8192,
            first_burst: o.first_burst,
            immediate_data: o.immediate_data,
            initial_r2t: o.initial_r2t,
            answers: Vec::new(),
        };
        let mut first = vec![
            ("InitiatorName".to_string(), o.initiator.clone()),
            (
                "SessionType".to_string(),
                if o.target.is_some() {
                    "Normal"
                } else {
                    "Discovery"
                }
                .to_string(),
            ),
        ];
        if let Some(t) = &o.target {
            first.push(("TargetName".into(), t.clone()));
        }
        let method = if o.chap.is_some() {
            "CHAP,None"
        } else {
            "None"
        };
        first.push(("AuthMethod".into(), method.into()));
        let (keys, st) = me.login_pdu(o, 0, 1, o.chap.is_none(), &first)?;
        if st != 0 {
            return Ok(Err(Refused(st)));
        }
        if let Some((name, secret)) = &o.chap {
            assert!(
                keys.iter().any(|(k, v)| k == "AuthMethod" && v == "CHAP"),
                "{keys:?}"
            );
            let (keys, st) = me.login_pdu(o, 0, 1, false, &[("CHAP_A".into(), "5".into())])?;
            if st != 0 {
                return Ok(Err(Refused(st)));
            }
            let get = |k: &str| {
                keys.iter()
                    .find(|(x, _)| x == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let id: u8 = get("CHAP_I").parse().expect("CHAP_I");
            let c = chap::decode_binary(&get("CHAP_C")).expect("CHAP_C");
            let mut reply = vec![
                ("CHAP_N".to_string(), name.clone()),
                (
                    "CHAP_R".to_string(),
                    chap::encode_hex(&chap::response(id, secret, &c)),
                ),
            ];
            let my_challenge = [7u8, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16];
            if o.mutual.is_some() {
                reply.push(("CHAP_I".into(), "77".into()));
                reply.push(("CHAP_C".into(), chap::encode_hex(&my_challenge)));
            }
            let (keys, st) = me.login_pdu(o, 0, 1, true, &reply)?;
            if st != 0 {
                return Ok(Err(Refused(st)));
            }
            if let Some((tname, tsecret)) = &o.mutual {
                let get = |k: &str| keys.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
                assert_eq!(get("CHAP_N").as_deref(), Some(tname.as_str()), "{keys:?}");
                let r = chap::decode_binary(&get("CHAP_R").expect("CHAP_R")).unwrap();
                assert_eq!(
                    r,
                    chap::response(77, tsecret, &my_challenge),
                    "the target's mutual CHAP response"
                );
            }
        }
        let dg = if o.digests { "CRC32C,None" } else { "None" };
        let yn = |b: bool| if b { "Yes" } else { "No" }.to_string();
        let op_keys = vec![
            ("HeaderDigest".to_string(), dg.to_string()),
            ("DataDigest".to_string(), dg.to_string()),
            ("MaxRecvDataSegmentLength".into(), o.recv_max.to_string()),
            ("MaxBurstLength".into(), o.max_burst.to_string()),
            ("FirstBurstLength".into(), o.first_burst.to_string()),
            ("ImmediateData".into(), yn(o.immediate_data)),
            ("InitialR2T".into(), yn(o.initial_r2t)),
            ("MaxConnections".into(), "1".into()),
            ("ErrorRecoveryLevel".into(), "0".into()),
            ("MaxOutstandingR2T".into(), "1".into()),
        ];
        let (keys, st) = me.login_pdu(o, 1, 3, true, &op_keys)?;
        if st != 0 {
            return Ok(Err(Refused(st)));
        }
        let get = |k: &str| keys.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
        if let Some(v) = get("MaxRecvDataSegmentLength") {
            me.send_max = v.parse().expect("number");
        }
        // ("Irrelevant" in a discovery session.)
        if let Some(v) = get("FirstBurstLength").and_then(|v| v.parse().ok()) {
            me.first_burst = v;
        }
        if let Some(v) = get("ImmediateData") {
            me.immediate_data = v == "Yes";
        }
        if let Some(v) = get("InitialR2T") {
            me.initial_r2t = v == "Yes";
        }
        let on = get("HeaderDigest").as_deref() == Some("CRC32C");
        me.digests = Digests {
            header: on,
            data: get("DataDigest").as_deref() == Some("CRC32C"),
        };
        me.answers.extend(keys);
        Ok(Ok(me))
    }

    /// One login request and its response: the keys and the status (0 on success). Asserts
    /// the target moved to `nsg` when `transit` and the status is 0.
    fn login_pdu(
        &mut self,
        o: &LoginOpts,
        csg: u8,
        nsg: u8,
        transit: bool,
        keys: &[(String, String)],
    ) -> io::Result<(Vec<(String, String)>, u16)> {
        let mut h = Bhs::new(op::LOGIN_REQ);
        h.0[0] |= 0x40;
        h.0[1] = (csg << 2) | if transit { 0x80 | nsg } else { 0 };
        h.0[8..14].copy_from_slice(&o.isid);
        h.set_u16(14, self.tsih);
        h.set_u32(16, self.itt);
        h.set_u32(24, self.cmd_sn);
        h.set_u32(28, self.exp_stat_sn);
        let data = text::encode(keys);
        pdu::write_pdu(&mut self.sock, &h, &[&data], Digests::default())?;
        let r = read_pdu(&mut self.sock, Digests::default())?;
        assert_eq!(r.bhs.opcode(), op::LOGIN_RESP);
        assert_eq!(r.bhs.itt(), self.itt);
        self.exp_stat_sn = r.bhs.u32_at(24).wrapping_add(1);
        let st = r.bhs.u16_at(36);
        let keys = text::parse(&r.data).expect("login response keys");
        if st == 0 && transit {
            assert_eq!(
                r.bhs.flags() & 0x83,
                0x80 | nsg,
                "transit to {nsg}: {keys:?}"
            );
            if nsg == 3 {
                self.tsih = r.bhs.u16_at(14);
                assert_ne!(self.tsih, 0);
            }
        }
        Ok((keys, st))
    }

    /// Sends a PDU with the session's digests.
    pub fn send(&mut self, h: &Bhs, data: &[u8]) -> io::Result<()> {
        pdu::write_pdu(&mut self.sock, h, &[data], self.digests)
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.sock.write_all(b)
    }

    /// Receives a PDU.
    pub fn recv(&mut self) -> io::Result<Pdu> {
        let p = read_pdu(&mut self.sock, self.digests)?;
        if matches!(
            p.bhs.opcode(),
            op::SCSI_RESP
                | op::NOP_IN
                | op::TMF_RESP
                | op::LOGOUT_RESP
                | op::TEXT_RESP
                | op::REJECT
        ) || (p.bhs.opcode() == op::DATA_IN && p.bhs.flags() & 1 != 0)
        {
            self.exp_stat_sn = p.bhs.u32_at(24).wrapping_add(1);
        }
        Ok(p)
    }

    /// Whether the target closed the connection (reads its end within `WAIT`).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.sock.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    fn next_itt(&mut self) -> u32 {
        self.itt = self.itt.wrapping_add(1);
        if self.itt == NO_TAG {
            self.itt = 1;
        }
        self.itt
    }

    /// The header of a SCSI command: `data_out` bytes to write or `read_len` bytes to read.
    pub fn command_header(&mut self, cdb: &[u8], write_len: u32, read_len: u32) -> Bhs {
        let itt = self.next_itt();
        let mut h = Bhs::new(op::SCSI_CMD);
        let mut f = 0x80u8 | 1; // F, SIMPLE
        if write_len > 0 {
            f |= 0x20;
        }
        if read_len > 0 {
            f |= 0x40;
        }
        h.0[1] = f;
        h.set_u32(16, itt);
        h.set_u32(20, write_len.max(read_len));
        h.set_u32(24, self.cmd_sn);
        h.set_u32(28, self.exp_stat_sn);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        h.0[32..32 + cdb.len().min(16)].copy_from_slice(&cdb[..cdb.len().min(16)]);
        h
    }

    /// Sends a command with what immediate data it may carry, without waiting for anything.
    /// Returns its task tag.
    pub fn start(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> io::Result<u32> {
        let mut h = self.command_header(cdb, data_out.len() as u32, read_len);
        let imm = if self.immediate_data {
            data_out
                .len()
                .min(self.first_burst as usize)
                .min(self.send_max as usize)
        } else {
            0
        };
        if !self.initial_r2t && imm < data_out.len() {
            // Unsolicited Data-Out follows: F stays clear.
            h.0[1] &= !0x80;
        }
        let itt = h.itt();
        self.send(&h, &data_out[..imm])?;
        if !self.initial_r2t && imm < data_out.len() {
            let end = data_out.len().min(self.first_burst as usize);
            self.send_data(itt, NO_TAG, data_out, imm, end)?;
        }
        Ok(itt)
    }

    /// Sends Data-Out for `data[from..to]` under `ttt`, DataSN from 0.
    pub fn send_data(
        &mut self,
        itt: u32,
        ttt: u32,
        data: &[u8],
        from: usize,
        to: usize,
    ) -> io::Result<()> {
        let mut off = from;
        let mut sn = 0u32;
        while off < to {
            let n = (to - off).min(self.send_max as usize);
            let mut h = Bhs::new(op::DATA_OUT);
            if off + n == to {
                h.0[1] = 0x80;
            }
            h.set_u32(16, itt);
            h.set_u32(20, ttt);
            h.set_u32(28, self.exp_stat_sn);
            h.set_u32(36, sn);
            h.set_u32(40, off as u32);
            self.send(&h, &data[off..off + n])?;
            off += n;
            sn += 1;
        }
        Ok(())
    }

    /// Waits for the end of task `itt`: answers its R2Ts from `data_out`, collects Data-In.
    /// PDUs of other tasks are kept in `others` (NOP-In and the like are answered there too).
    pub fn finish(&mut self, itt: u32, data_out: &[u8]) -> io::Result<Resp> {
        let mut data = Vec::new();
        loop {
            let p = self.recv()?;
            let h = p.bhs;
            assert!(
                h.itt() == itt || h.opcode() == op::REJECT,
                "a PDU of another task: {h:?}"
            );
            match h.opcode() {
                op::R2T => {
                    let off = h.u32_at(40) as usize;
                    let len = h.u32_at(44) as usize;
                    self.send_data(itt, h.u32_at(20), data_out, off, off + len)?;
                }
                op::DATA_IN => {
                    assert_eq!(h.u32_at(40) as usize, data.len(), "Data-In in order");
                    data.extend_from_slice(&p.data);
                    if h.flags() & 1 != 0 {
                        return Ok(Resp {
                            status: h.0[3],
                            sense: Vec::new(),
                            data,
                            flags: h.flags() & 0x06,
                            residual: h.u32_at(44),
                        });
                    }
                }
                op::SCSI_RESP => {
                    let sense = if p.data.len() >= 2 {
                        let n = u16::from_be_bytes([p.data[0], p.data[1]]) as usize;
                        p.data[2..2 + n.min(p.data.len() - 2)].to_vec()
                    } else {
                        Vec::new()
                    };
                    return Ok(Resp {
                        status: h.0[3],
                        sense,
                        data,
                        flags: h.flags() & 0x06,
                        residual: h.u32_at(44),
                    });
                }
                op::REJECT => {
                    return Err(io::Error::other(format!("rejected, reason {:#x}", h.0[2])))
                }
                other => panic!("unexpected PDU {other:#x} for task {itt}"),
            }
        }
    }

    /// Runs one command to its end.
    pub fn cmd(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> io::Result<Resp> {
        let itt = self.start(cdb, data_out, read_len)?;
        self.finish(itt, data_out)
    }

    /// TEST UNIT READY until it is GOOD (the unit attentions of a new nexus are taken).
    pub fn clear_ua(&mut self) -> io::Result<()> {
        for _ in 0..8 {
            if self.cmd(&[0; 6], &[], 0)?.status == GOOD {
                return Ok(());
            }
        }
        panic!("TEST UNIT READY never became GOOD");
    }

    /// Runs a command, retrying it while it reports a unit attention.
    pub fn cmd_past_ua(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> io::Result<Resp> {
        for _ in 0..8 {
            let r = self.cmd(cdb, data_out, read_len)?;
            if r.status == CHECK_CONDITION && r.sense_code().map(|c| c.0) == Some(6) {
                continue;
            }
            return Ok(r);
        }
        panic!("a unit attention every time");
    }

    pub fn write10(&mut self, lba: u32, data: &[u8]) -> io::Result<Resp> {
        self.cmd_past_ua(&write10_cdb(lba, (data.len() / 512) as u16), data, 0)
    }

    pub fn read10(&mut self, lba: u32, blocks: u16) -> io::Result<Resp> {
        self.cmd_past_ua(&read10_cdb(lba, blocks), &[], u32::from(blocks) * 512)
    }

    /// PERSISTENT RESERVE OUT.
    pub fn prout(&mut self, sa: u8, ty: u8, key: u64, sark: u64, aptpl: bool) -> io::Result<Resp> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sark.to_be_bytes());
        p[20] = u8::from(aptpl);
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[1] = sa;
        cdb[2] = ty;
        cdb[8] = 24;
        self.cmd_past_ua(&cdb, &p, 0)
    }

    /// PERSISTENT RESERVE IN, READ KEYS: (generation, keys).
    pub fn read_keys(&mut self) -> io::Result<(u32, Vec<u64>)> {
        let r = self.cmd_past_ua(&prin_cdb(0), &[], 1024)?;
        assert_eq!(r.status, GOOD, "{r:?}");
        let d = &r.data;
        let n = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
        let keys = d[8..8 + n]
            .chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        Ok((u32::from_be_bytes(d[0..4].try_into().unwrap()), keys))
    }

    /// PERSISTENT RESERVE IN, READ RESERVATION: the holder's key and the type, if reserved.
    pub fn read_reservation(&mut self) -> io::Result<Option<(u64, u8)>> {
        let r = self.cmd_past_ua(&prin_cdb(1), &[], 1024)?;
        assert_eq!(r.status, GOOD, "{r:?}");
        let d = &r.data;
        let n = u32::from_be_bytes(d[4..8].try_into().unwrap());
        Ok((n >= 16).then(|| {
            (
                u64::from_be_bytes(d[8..16].try_into().unwrap()),
                d[21] & 0x0f,
            )
        }))
    }

    /// Logs out (closing the session); asserts the response.
    pub fn logout(mut self) -> io::Result<()> {
        let itt = self.next_itt();
        let mut h = Bhs::new(op::LOGOUT_REQ);
        h.0[0] |= 0x40;
        h.0[1] = 0x80;
        h.set_u32(16, itt);
        h.set_u32(24, self.cmd_sn);
        h.set_u32(28, self.exp_stat_sn);
        self.send(&h, &[])?;
        let r = self.recv()?;
        assert_eq!(r.bhs.opcode(), op::LOGOUT_RESP);
        assert_eq!(r.bhs.0[2], 0, "logout response");
        Ok(())
    }

    /// A Text request: SendTargets=`which`; the answer's pairs.
    pub fn send_targets(&mut self, which: &str) -> io::Result<Vec<(String, String)>> {
        let itt = self.next_itt();
        let mut h = Bhs::new(op::TEXT_REQ);
        h.0[0] |= 0x40;
        h.0[1] = 0x80;
        h.set_u32(16, itt);
        h.set_u32(20, NO_TAG);
        h.set_u32(24, self.cmd_sn);
        h.set_u32(28, self.exp_stat_sn);
        let d = text::encode(&[("SendTargets".into(), which.into())]);
        self.send(&h, &d)?;
        let r = self.recv()?;
        assert_eq!(r.bhs.opcode(), op::TEXT_RESP);
        assert_eq!(r.bhs.flags() & 0x80, 0x80, "one response PDU");
        // Repeated keys: parse by hand.
        Ok(r.data
            .split(|b| *b == 0)
            .filter(|x| !x.is_empty())
            .map(|x| {
                let s = String::from_utf8_lossy(x);
                let (k, v) = s.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect())
    }

    /// NOP-Out ping; returns the echoed data.
    pub fn ping(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        let itt = self.next_itt();
        let mut h = Bhs::new(op::NOP_OUT);
        h.0[0] |= 0x40;
        h.0[1] = 0x80;
        h.set_u32(16, itt);
        h.set_u32(20, NO_TAG);
        h.set_u32(24, self.cmd_sn);
        h.set_u32(28, self.exp_stat_sn);
        self.send(&h, data)?;
        let r = self.recv()?;
        assert_eq!(r.bhs.opcode(), op::NOP_IN);
        assert_eq!(r.bhs.itt(), itt);
        Ok(r.data)
    }
}

pub fn write10_cdb(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x2a;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn read10_cdb(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn prin_cdb(sa: u8) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x5e;
    c[1] = sa;
    c[7..9].copy_from_slice(&1024u16.to_be_bytes());
    c
}

/// PR service actions and types (SPC-4).
pub mod pr {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
    /// Write Exclusive – Registrants Only.
    pub const WE_RO: u8 = 5;
}
