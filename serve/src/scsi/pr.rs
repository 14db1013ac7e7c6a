//! SPC-4 persistent reservations: the state of one logical unit and the service actions of
//! PERSISTENT RESERVE OUT and IN.
//!
//! A registration belongs to an initiator port and a target port (an I_T nexus), or to an
//! initiator port on every target port (ALL_TG_PT). The reservation has a type and a holder:
//! the registration that made it, or, for the all-registrants types, every registration.
//! PRgeneration counts every REGISTER, REGISTER AND IGNORE EXISTING KEY, CLEAR, PREEMPT,
//! PREEMPT AND ABORT and REGISTER AND MOVE that succeeds and changes something (not RESERVE,
//! not RELEASE, not a command that ends in an error or a conflict).

use super::sense::{asc, key};
use super::{be16, be32, be64, invalid_cdb, invalid_param, Nexus, ScsiResponse, Ua};

/// Write Exclusive.
pub const WE: u8 = 1;
/// Exclusive Access.
pub const EA: u8 = 3;
/// Write Exclusive – Registrants Only.
pub const WE_RO: u8 = 5;
/// Exclusive Access – Registrants Only.
pub const EA_RO: u8 = 6;
/// Write Exclusive – All Registrants.
pub const WE_AR: u8 = 7;
/// Exclusive Access – All Registrants.
pub const EA_AR: u8 = 8;

/// PERSISTENT RESERVE OUT service actions.
pub mod sa {
    /// REGISTER.
    pub const REGISTER: u8 = 0;
    /// RESERVE.
    pub const RESERVE: u8 = 1;
    /// RELEASE.
    pub const RELEASE: u8 = 2;
    /// CLEAR.
    pub const CLEAR: u8 = 3;
    /// PREEMPT.
    pub const PREEMPT: u8 = 4;
    /// PREEMPT AND ABORT.
    pub const PREEMPT_AND_ABORT: u8 = 5;
    /// REGISTER AND IGNORE EXISTING KEY.
    pub const REGISTER_AND_IGNORE: u8 = 6;
    /// REGISTER AND MOVE.
    pub const REGISTER_AND_MOVE: u8 = 7;
}

/// The most registrations a logical unit keeps.
pub const MAX_REGISTRATIONS: usize = 128;
/// The longest port name a registration keeps.
pub const MAX_NAME: usize = 512;

fn valid_type(t: u8) -> bool {
    matches!(t, WE | EA | WE_RO | EA_RO | WE_AR | EA_AR)
}

fn all_registrants(t: u8) -> bool {
    matches!(t, WE_AR | EA_AR)
}

/// The ports a registration or a unit attention is for: an initiator port, and a target port
/// (None: every target port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// The initiator port's name.
    pub initiator: String,
    /// The target port's name, or None for all.
    pub target: Option<String>,
}

impl Port {
    /// Whether `n` is one of these I_T nexuses.
    pub fn matches(&self, n: &Nexus) -> bool {
        self.initiator.eq_ignore_ascii_case(&n.initiator)
            && self.target.as_ref().is_none_or(|t| *t == n.target)
    }

    fn of(n: &Nexus) -> Port {
        Port {
            initiator: n.initiator.clone(),
            target: Some(n.target.clone()),
        }
    }
}

/// One registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Whose.
    pub port: Port,
    /// The reservation key.
    pub key: u64,
}

/// The persistent reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The registration that holds it (every registration for the all-registrants types).
    pub holder: Port,
    /// Its type.
    pub ty: u8,
}

/// What a logical unit keeps about reservations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrState {
    /// PRgeneration.
    pub generation: u32,
    /// Activate Persist Through Power Loss, as last set.
    pub aptpl: bool,
    /// The registrations, oldest first.
    pub regs: Vec<Registration>,
    /// The reservation.
    pub res: Option<Reservation>,
}

/// How a command is treated under a reservation it does not hold (SPC-4 and SBC-3 tables of
/// commands allowed in the presence of reservations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed under every reservation (INQUIRY, PR IN/OUT, READ CAPACITY, ...).
    Always,
    /// Reads the medium or the unit's state: allowed under the write-exclusive types.
    Read,
    /// Changes the medium (or flushes it).
    Write,
}

/// What a PERSISTENT RESERVE OUT did besides changing the state.
#[derive(Debug, Default)]
pub struct Effects {
    /// Unit attentions to queue.
    pub ua: Vec<(Port, Ua)>,
    /// Registrations removed by PREEMPT AND ABORT: their tasks are aborted.
    pub aborted: Vec<Port>,
    /// Whether the state changed (and must be written).
    pub changed: bool,
}

fn conflict<T>() -> Result<T, ScsiResponse> {
    Err(ScsiResponse::conflict())
}

fn param_length_error<T>() -> Result<T, ScsiResponse> {
    Err(ScsiResponse::sense(
        key::ILLEGAL_REQUEST,
        asc::PARAMETER_LIST_LENGTH,
    ))
}

/// ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION.
fn invalid_release<T>() -> Result<T, ScsiResponse> {
    Err(ScsiResponse::sense(key::ILLEGAL_REQUEST, (0x26, 0x04)))
}

/// The name of the initiator port an iSCSI TransportID names, and whether it named a port
/// (format 01b, with the ISID) rather than only the initiator (format 00b).
pub fn parse_transport_id(t: &[u8]) -> Option<(String, bool)> {
    if t.len() < 4 || t[0] & 0x0f != 5 {
        return None;
    }
    let format = t[0] >> 6;
    let len = usize::from(be16(t, 2));
    let body = t.get(4..4 + len)?;
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let name = std::str::from_utf8(&body[..end]).ok()?.trim().to_string();
    if name.is_empty() {
        return None;
    }
    match format {
        0 => Some((name, false)),
        1 => {
            let lower = name.to_ascii_lowercase();
            lower.find(",i,0x")?;
            Some((name, true))
        }
        _ => None,
    }
}

/// The iSCSI TransportID of an initiator port name (format 01b when it carries an ISID).
pub fn transport_id(initiator: &str) -> Vec<u8> {
    let format: u8 = if initiator.to_ascii_lowercase().contains(",i,0x") {
        0x40
    } else {
        0x00
    };
    let mut name: Vec<u8> = initiator.bytes().collect();
    name.push(0);
    while name.len() % 4 != 0 || name.len() < 20 {
        name.push(0);
    }
    let mut t = vec![format | 0x05, 0];
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend_from_slice(&name);
    t
}

impl PrState {
    /// The index of the registration of `n`.
    pub fn reg_of(&self, n: &Nexus) -> Option<usize> {
        self.regs.iter().position(|r| r.port.matches(n))
    }

    /// Whether `n` holds the reservation.
    pub fn is_holder(&self, n: &Nexus) -> bool {
        match &self.res {
            None => false,
            Some(r) if all_registrants(r.ty) => self.reg_of(n).is_some(),
            Some(r) => self
                .reg_of(n)
                .is_some_and(|i| self.regs[i].port == r.holder),
        }
    }

    /// Whether `n` may run a command of class `access`.
    pub fn allows(&self, n: &Nexus, access: Access) -> bool {
        let Some(res) = &self.res else {
            return true;
        };
        if access == Access::Always || self.is_holder(n) {
            return true;
        }
        let registered = || self.reg_of(n).is_some();
        match (access, res.ty) {
            (Access::Read, WE | WE_RO | WE_AR) => true,
            (Access::Read, EA) => false,
            (Access::Read, _) => registered(),
            (Access::Write, WE | EA) => false,
            (Access::Write, _) => registered(),
            (Access::Always, _) => true,
        }
    }

    /// The holder's reservation key as READ RESERVATION reports it (0 for all registrants).
    fn holder_key(&self) -> Option<u64> {
        let res = self.res.as_ref()?;
        if all_registrants(res.ty) {
            return Some(0);
        }
        self.regs
            .iter()
            .find(|r| r.port == res.holder)
            .map(|r| r.key)
    }

    /// Removes registration `i`, releasing the reservation as SPC-4 says when it was the
    /// holder's (with RESERVATIONS RELEASED for the other registrants of a registrants-only
    /// reservation).
    fn unregister(&mut self, i: usize, fx: &mut Effects) {
        let r = self.regs.remove(i);
        let Some(res) = self.res.clone() else {
            return;
        };
        if all_registrants(res.ty) {
            if self.regs.is_empty() {
                self.res = None;
            }
        } else if res.holder == r.port {
            self.res = None;
            if matches!(res.ty, WE_RO | EA_RO) {
                for o in &self.regs {
                    fx.ua.push((o.port.clone(), Ua::ReservationsReleased));
                }
            }
        }
    }

    /// Runs a PERSISTENT RESERVE OUT from `n` with its parameter list `p`. `ports` are the
    /// I_T nexuses the unit knows (for a TransportID that names only an initiator).
    pub fn pr_out(
        &mut self,
        n: &Nexus,
        cdb: &[u8],
        p: &[u8],
        ports: &[Nexus],
    ) -> Result<Effects, ScsiResponse> {
        let action = cdb[1] & 0x1f;
        let scope = cdb[2] >> 4;
        let ty = cdb[2] & 0x0f;
        let plen = be32(cdb, 5) as usize;
        if p.len() < plen {
            return param_length_error();
        }
        let p = &p[..plen];
        if action == sa::REGISTER_AND_MOVE {
            return self.register_and_move(n, scope, ty, p, ports);
        }
        if action > sa::REGISTER_AND_MOVE {
            return Err(invalid_cdb(1));
        }
        if plen < 24 {
            return param_length_error();
        }
        let rk = be64(p, 0);
        let sark = be64(p, 8);
        let flags = p[20];
        if flags & 0x08 != 0 {
            // SPEC_I_PT: REPORT CAPABILITIES says SIP_C=0.
            return Err(invalid_param(20));
        }
        if plen != 24 {
            return param_length_error();
        }
        let all_tg_pt = flags & 0x04 != 0;
        let aptpl = flags & 0x01 != 0;
        if matches!(
            action,
            sa::RESERVE | sa::RELEASE | sa::PREEMPT | sa::PREEMPT_AND_ABORT
        ) && (scope != 0 || !valid_type(ty))
        {
            return Err(invalid_cdb(2));
        }
        let me = self.reg_of(n);
        let mut fx = Effects::default();
        match action {
            sa::REGISTER | sa::REGISTER_AND_IGNORE => {
                let ignore = action == sa::REGISTER_AND_IGNORE;
                match me {
                    None => {
                        if !ignore && rk != 0 {
                            return conflict();
                        }
                        if sark == 0 {
                            return Ok(fx);
                        }
                        if self.regs.len() >= MAX_REGISTRATIONS
                            || n.initiator.len() > MAX_NAME
                            || n.target.len() > MAX_NAME
                        {
                            return Err(ScsiResponse::sense(
                                key::ILLEGAL_REQUEST,
                                asc::INSUFFICIENT_REGISTRATION_RESOURCES,
                            ));
                        }
                        let mut port = Port::of(n);
                        if all_tg_pt {
                            port.target = None;
                        }
                        self.regs.push(Registration { port, key: sark });
                    }
                    Some(i) => {
                        if !ignore && rk != self.regs[i].key {
                            return conflict();
                        }
                        if sark == 0 {
                            self.unregister(i, &mut fx);
                        } else {
                            self.regs[i].key = sark;
                        }
                    }
                }
                self.aptpl = aptpl;
                self.generation = self.generation.wrapping_add(1);
                fx.changed = true;
            }
            _ => {
                let Some(me) = me else {
                    return conflict();
                };
                if rk != self.regs[me].key {
                    return conflict();
                }
                match action {
                    sa::RESERVE => {
                        if let Some(res) = &self.res {
                            if self.is_holder(n) && res.ty == ty {
                                return Ok(fx);
                            }
                            return conflict();
                        }
                        self.res = Some(Reservation {
                            holder: self.regs[me].port.clone(),
                            ty,
                        });
                        fx.changed = true;
                    }
                    sa::RELEASE => {
                        let Some(res) = self.res.clone() else {
                            return Ok(fx);
                        };
                        if !self.is_holder(n) {
                            return Ok(fx);
                        }
                        if res.ty != ty {
                            return invalid_release();
                        }
                        self.res = None;
                        if !matches!(res.ty, WE | EA) {
                            for (i, o) in self.regs.iter().enumerate() {
                                if i != me {
                                    fx.ua.push((o.port.clone(), Ua::ReservationsReleased));
                                }
                            }
                        }
                        fx.changed = true;
                    }
                    sa::CLEAR => {
                        for (i, o) in self.regs.iter().enumerate() {
                            if i != me {
                                fx.ua.push((o.port.clone(), Ua::ReservationsPreempted));
                            }
                        }
                        self.regs.clear();
                        self.res = None;
                        self.generation = self.generation.wrapping_add(1);
                        fx.changed = true;
                    }
                    _ => {
                        self.preempt(me, sark, ty, &mut fx)?;
                        if action == sa::PREEMPT_AND_ABORT {
                            fx.aborted = fx
                                .ua
                                .iter()
                                .filter(|(_, u)| *u == Ua::RegistrationsPreempted)
                                .map(|(p, _)| p.clone())
                                .collect();
                        }
                        self.generation = self.generation.wrapping_add(1);
                        fx.changed = true;
                    }
                }
            }
        }
        Ok(fx)
    }

    /// Removes every registration with key `sark` but `me`'s, with REGISTRATIONS PREEMPTED
    /// for each.
    fn remove_key(&mut self, me: usize, sark: u64, fx: &mut Effects) {
        let mine = self.regs[me].port.clone();
        self.regs.retain(|r| {
            if r.key == sark && r.port != mine {
                fx.ua.push((r.port.clone(), Ua::RegistrationsPreempted));
                false
            } else {
                true
            }
        });
    }

    /// PREEMPT (and the preempting part of PREEMPT AND ABORT) by registration `me`.
    fn preempt(
        &mut self,
        me: usize,
        sark: u64,
        ty: u8,
        fx: &mut Effects,
    ) -> Result<(), ScsiResponse> {
        let mine = self.regs[me].port.clone();
        let known = self.regs.iter().any(|r| r.key == sark);
        match self.res.clone() {
            None => {
                if sark == 0 {
                    return Err(invalid_param(8));
                }
                if !known {
                    return conflict();
                }
                self.remove_key(me, sark, fx);
            }
            Some(res) if all_registrants(res.ty) => {
                if sark == 0 {
                    self.regs.retain(|r| {
                        if r.port != mine {
                            fx.ua.push((r.port.clone(), Ua::RegistrationsPreempted));
                            false
                        } else {
                            true
                        }
                    });
                    self.res = Some(Reservation { holder: mine, ty });
                } else {
                    if !known {
                        return conflict();
                    }
                    self.remove_key(me, sark, fx);
                }
            }
            Some(res) => {
                if sark == 0 {
                    return Err(invalid_param(8));
                }
                let holder_key = self.holder_key();
                if holder_key == Some(sark) {
                    self.remove_key(me, sark, fx);
                    self.res = Some(Reservation {
                        holder: mine.clone(),
                        ty,
                    });
                    if res.ty != ty {
                        for r in &self.regs {
                            if r.port != mine {
                                fx.ua.push((r.port.clone(), Ua::ReservationsReleased));
                            }
                        }
                    }
                } else {
                    if !known {
                        return conflict();
                    }
                    self.remove_key(me, sark, fx);
                }
            }
        }
        Ok(())
    }

    fn register_and_move(
        &mut self,
        n: &Nexus,
        scope: u8,
        ty: u8,
        p: &[u8],
        ports: &[Nexus],
    ) -> Result<Effects, ScsiResponse> {
        if p.len() < 24 {
            return param_length_error();
        }
        let rk = be64(p, 0);
        let sark = be64(p, 8);
        let unreg = p[17] & 0x02 != 0;
        let aptpl = p[17] & 0x01 != 0;
        let rtpi = be16(p, 18);
        let tlen = be32(p, 20) as usize;
        if 24 + tlen > p.len() {
            return param_length_error();
        }
        if scope != 0 || !valid_type(ty) {
            return Err(invalid_cdb(2));
        }
        let Some(me) = self.reg_of(n) else {
            return conflict();
        };
        if rk != self.regs[me].key {
            return conflict();
        }
        let Some(res) = self.res.clone() else {
            return conflict();
        };
        if all_registrants(res.ty) || res.holder != self.regs[me].port {
            return conflict();
        }
        if sark == 0 {
            return Err(invalid_param(8));
        }
        if rtpi != 1 {
            return Err(invalid_param(18));
        }
        let Some((name, is_port)) = parse_transport_id(&p[24..24 + tlen]) else {
            return Err(invalid_param(24));
        };
        let initiator = if is_port {
            name
        } else {
            match ports.iter().find(|q| {
                q.target == n.target
                    && q.initiator.len() > name.len()
                    && q.initiator[..name.len()].eq_ignore_ascii_case(&name)
                    && q.initiator[name.len()..].starts_with(",")
            }) {
                Some(q) => q.initiator.clone(),
                None => return Err(invalid_param(24)),
            }
        };
        let dest = Nexus {
            initiator,
            target: n.target.clone(),
        };
        if self.regs[me].port.matches(&dest) {
            return Err(invalid_param(24));
        }
        if dest.initiator.len() > MAX_NAME {
            return Err(invalid_param(24));
        }
        let holder = match self.reg_of(&dest) {
            Some(i) => {
                self.regs[i].key = sark;
                self.regs[i].port.clone()
            }
            None => {
                if self.regs.len() >= MAX_REGISTRATIONS {
                    return Err(ScsiResponse::sense(
                        key::ILLEGAL_REQUEST,
                        asc::INSUFFICIENT_REGISTRATION_RESOURCES,
                    ));
                }
                let port = Port::of(&dest);
                self.regs.push(Registration {
                    port: port.clone(),
                    key: sark,
                });
                port
            }
        };
        self.res = Some(Reservation { holder, ty });
        let mut fx = Effects::default();
        if unreg {
            if let Some(i) = self.reg_of(n) {
                self.regs.remove(i);
            }
        }
        self.aptpl = aptpl;
        self.generation = self.generation.wrapping_add(1);
        fx.changed = true;
        Ok(fx)
    }

    /// Runs a PERSISTENT RESERVE IN; the data before the allocation length cuts it.
    pub fn pr_in(&self, cdb: &[u8]) -> Result<Vec<u8>, ScsiResponse> {
        let mut d = self.generation.to_be_bytes().to_vec();
        match cdb[1] & 0x1f {
            0 => {
                // READ KEYS
                d.extend_from_slice(&((self.regs.len() * 8) as u32).to_be_bytes());
                for r in &self.regs {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            1 => {
                // READ RESERVATION
                match (&self.res, self.holder_key()) {
                    (Some(res), Some(k)) => {
                        d.extend_from_slice(&16u32.to_be_bytes());
                        d.extend_from_slice(&k.to_be_bytes());
                        d.extend_from_slice(&[0, 0, 0, 0, 0, res.ty & 0x0f, 0, 0]);
                    }
                    _ => d.extend_from_slice(&0u32.to_be_bytes()),
                }
            }
            2 => {
                // REPORT CAPABILITIES
                d = vec![0u8; 8];
                d[1] = 8;
                d[2] = 0x04 | 0x01; // ATP_C, PTPL_C
                d[3] = 0x80 | u8::from(self.aptpl); // TMV, PTPL_A
                d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02; // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
                d[5] = 0x01; // EX_AC_AR
            }
            3 => {
                // READ FULL STATUS
                let mut body = Vec::new();
                for r in &self.regs {
                    let holder = self
                        .res
                        .as_ref()
                        .is_some_and(|res| all_registrants(res.ty) || res.holder == r.port);
                    let tid = transport_id(&r.port.initiator);
                    body.extend_from_slice(&r.key.to_be_bytes());
                    body.extend_from_slice(&[0, 0, 0, 0]);
                    let mut flags = 0u8;
                    if r.port.target.is_none() {
                        flags |= 0x02;
                    }
                    if holder {
                        flags |= 0x01;
                    }
                    body.push(flags);
                    body.push(match (&self.res, holder) {
                        (Some(res), true) => res.ty & 0x0f,
                        _ => 0,
                    });
                    body.extend_from_slice(&[0, 0, 0, 0]);
                    body.extend_from_slice(&1u16.to_be_bytes());
                    body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    body.extend_from_slice(&tid);
                }
                d.extend_from_slice(&(body.len() as u32).to_be_bytes());
                d.extend_from_slice(&body);
            }
            _ => return Err(invalid_cdb(1)),
        }
        Ok(d)
    }

    /// The state as the store keeps it.
    pub fn encode(&self) -> Vec<u8> {
        fn put_str(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        fn put_port(out: &mut Vec<u8>, p: &Port) {
            put_str(out, &p.initiator);
            match &p.target {
                Some(t) => {
                    out.push(1);
                    put_str(out, t);
                }
                None => out.push(0),
            }
        }
        let mut out = vec![1u8];
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.push(u8::from(self.aptpl));
        out.extend_from_slice(&(self.regs.len() as u32).to_le_bytes());
        for r in &self.regs {
            out.extend_from_slice(&r.key.to_le_bytes());
            put_port(&mut out, &r.port);
        }
        match &self.res {
            Some(res) => {
                out.push(res.ty);
                put_port(&mut out, &res.holder);
            }
            None => out.push(0),
        }
        out
    }

    /// The state the store kept (None when it is malformed).
    pub fn decode(b: &[u8]) -> Option<PrState> {
        struct R<'a>(&'a [u8]);
        impl R<'_> {
            fn take(&mut self, n: usize) -> Option<&[u8]> {
                let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
                self.0 = b;
                Some(a)
            }
            fn u8(&mut self) -> Option<u8> {
                Some(self.take(1)?[0])
            }
            fn u16(&mut self) -> Option<u16> {
                Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
            }
            fn u32(&mut self) -> Option<u32> {
                Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
            }
            fn u64(&mut self) -> Option<u64> {
                Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
            }
            fn string(&mut self) -> Option<String> {
                let n = usize::from(self.u16()?);
                String::from_utf8(self.take(n)?.to_vec()).ok()
            }
            fn port(&mut self) -> Option<Port> {
                let initiator = self.string()?;
                let target = match self.u8()? {
                    0 => None,
                    1 => Some(self.string()?),
                    _ => return None,
                };
                Some(Port { initiator, target })
            }
        }
        let mut r = R(b);
        if r.u8()? != 1 {
            return None;
        }
        let generation = r.u32()?;
        let aptpl = r.u8()? != 0;
        let n = r.u32()? as usize;
        if n > MAX_REGISTRATIONS {
            return None;
        }
        let mut regs = Vec::with_capacity(n);
        for _ in 0..n {
            let key = r.u64()?;
            let port = r.port()?;
            regs.push(Registration { port, key });
        }
        let res = match r.u8()? {
            0 => None,
            ty if valid_type(ty) => Some(Reservation {
                ty,
                holder: r.port()?,
            }),
            _ => return None,
        };
        if !r.0.is_empty() {
            return None;
        }
        Some(PrState {
            generation,
            aptpl,
            regs,
            res,
        })
    }
}
