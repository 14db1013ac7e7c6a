//! The iSCSI server: listeners, login, sessions and the full feature phase.
//!
//! **Threads.** Each connection has a reader thread (login, then it parses PDUs, collects the
//! Data-Out of writes and sends R2Ts) and, for a normal session, [`IscsiConfig::workers`]
//! worker threads that run commands on the LUN and send their responses.
//!
//! **Batches** (as the NBD server's): the reader collects every command whose data is all here,
//! and hands them to the workers together, with one wake-up, when its read buffer holds no
//! further whole PDU (the next read would wait for the initiator) or [`BATCH`] commands or
//! [`BATCH_BYTES`] are collected.
//! A worker takes every command queued (up to [`BATCH`]) and runs them with
//! [`Lun::execute_batch`], which submits their READs and WRITEs to the stack as one batch (the
//! initiator's queue depth reaches the backend), then sends all their responses with one
//! `writev`, the Data-In taken from where it lies. Responses go out in completion order under
//! one lock of the connection's socket, which also numbers them (StatSN). The socket has
//! TCP_NODELAY: a batch's responses leave at once, in as few segments as they fill.

use super::chap::{self, ChapConfig};
use super::pdu::{self, op, reject, Bhs, Digests, Pdu, ReadError, NO_TAG};
use super::text::{self, Answer, Params};
use super::{IscsiConfig, TargetOpts, TPGT};
use crate::export::{Export, ServeError};
use crate::registry::Registry;
use crate::scsi::sense::{self, asc, key};
use crate::scsi::{Command, DataDir, Lun, LunConfig, Nexus, ScsiResponse};
use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, BufWriter, IoSlice, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Commands the initiator may have outstanding (MaxCmdSN - ExpCmdSN + 1).
const CMD_WINDOW: u32 = 128;
/// The longest transfer one command may ask for.
pub const MAX_TRANSFER: u32 = 32 << 20;
/// Bytes of complete write data a session keeps queued for its workers (the reader waits
/// beyond), and bytes of solicited write data it asks for at once (further R2Ts wait).
const BUDGET: u64 = 64 << 20;
/// The most data a login PDU may carry.
const LOGIN_MAX_DATA: u32 = 65_536;
/// How long a closing connection's replies may take before its socket is shut both ways.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Aborted task tags remembered, so their late Data-Out is dropped quietly.
const ABORTED_MEMORY: usize = 512;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A LUN and the export it serves.
struct LunEntry {
    export: Arc<Export>,
    lun: Arc<Lun>,
}

/// The iSCSI server of a daemon (see the [module documentation](super)).
pub struct IscsiServer {
    registry: Arc<Registry>,
    config: IscsiConfig,
    opts: Mutex<HashMap<String, TargetOpts>>,
    luns: Mutex<HashMap<String, LunEntry>>,
    sessions: Mutex<Vec<Arc<Session>>>,
    next_tsih: AtomicU16,
    next_ttt: AtomicU32,
    connections: AtomicUsize,
    stopping: AtomicBool,
    /// Live connections' sockets, and the time by which their login must be done.
    socks: Mutex<Vec<(u64, TcpStream, Option<Instant>)>>,
    next_id: AtomicU64,
    portals: Mutex<Vec<SocketAddr>>,
}

impl std::fmt::Debug for IscsiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiServer")
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

/// One session (one connection: MaxConnections=1).
struct Session {
    tsih: u16,
    isid: [u8; 6],
    initiator: String,
    target: String,
    export: Arc<Export>,
    lun: Arc<Lun>,
    nexus: Nexus,
    sock: TcpStream,
    tasks: Mutex<Tasks>,
    /// Waiters for a change of `tasks` (task management, logout, the reader's budget).
    cv: Condvar,
    /// Workers wait here for commands.
    ready: Condvar,
}

/// A command ready to run.
struct Task {
    itt: u32,
    lun: u64,
    cdb: Vec<u8>,
    data: Vec<u8>,
    /// Data-Out bytes the command uses (the rest of `data` is an underflow).
    use_len: usize,
    /// Whether Data-Out moves, and how much the CDB asked for (for the residual).
    write: bool,
    want: usize,
    edtl: u32,
}

/// A write waiting for its Data-Out.
struct Pending {
    task: Task,
    /// Where the unsolicited data ends.
    unsol_end: u32,
    unsol_datasn: u32,
    /// The R2T outstanding: (TTT, end offset, next DataSN).
    r2t: Option<(u32, u32, u32)>,
    r2tsn: u32,
    /// Whether it holds solicited budget.
    holds: bool,
}

#[derive(Default)]
struct Tasks {
    queue: VecDeque<Task>,
    /// Running commands by tag, and whether they were aborted (their response is dropped).
    running: HashMap<u32, bool>,
    pending: HashMap<u32, Pending>,
    /// Writes whose first R2T waits for solicited budget.
    r2t_wait: VecDeque<u32>,
    aborted: VecDeque<u32>,
    queued_bytes: u64,
    solicited_bytes: u64,
    closed: bool,
    /// Threads waiting on the session's `cv`, and workers waiting on its `ready`: a change
    /// wakes them only when there are (a futex wake costs a system call even for nobody).
    waiting: usize,
    idle_workers: usize,
}

impl Tasks {
    fn remember_aborted(&mut self, itt: u32) {
        if self.aborted.len() >= ABORTED_MEMORY {
            self.aborted.pop_front();
        }
        self.aborted.push_back(itt);
    }

    /// Drops every queued and waiting task, marks the running ones aborted.
    fn abort_all(&mut self) {
        let q: Vec<u32> = self.queue.iter().map(|t| t.itt).collect();
        let p: Vec<u32> = self.pending.keys().copied().collect();
        for itt in q.into_iter().chain(p) {
            self.remember_aborted(itt);
        }
        self.queue.clear();
        self.queued_bytes = 0;
        self.pending.clear();
        self.r2t_wait.clear();
        self.solicited_bytes = 0;
        for a in self.running.values_mut() {
            *a = true;
        }
    }
}

impl Session {
    fn abort_all(&self) {
        lock(&self.tasks).abort_all();
        self.cv.notify_all();
    }

    /// Waits on `cv` for a change of the tasks.
    fn wait_change<'a>(
        &self,
        mut t: std::sync::MutexGuard<'a, Tasks>,
    ) -> std::sync::MutexGuard<'a, Tasks> {
        t.waiting += 1;
        let mut t = self.cv.wait(t).unwrap_or_else(|p| p.into_inner());
        t.waiting -= 1;
        t
    }

    /// Waits until no command of the session runs.
    fn wait_idle(&self) {
        let mut t = lock(&self.tasks);
        while !t.running.is_empty() {
            t = self.wait_change(t);
        }
    }
}

/// What a connection's writers share.
struct Out {
    /// The socket (PDUs go out with `writev`, from where their data lies).
    sock: TcpStream,
    stat_sn: u32,
    digests: Digests,
    failed: bool,
}

/// A connection in the full feature phase.
struct Conn {
    out: Mutex<Out>,
    exp_cmd_sn: AtomicU32,
    params: Params,
}

/// A PDU to send: its header, its data segment in up to two pieces, and whether it carries
/// status (StatSN advances).
#[derive(Clone, Copy)]
struct OutPdu<'a> {
    bhs: Bhs,
    data: [&'a [u8]; 2],
    status: bool,
}

impl<'a> OutPdu<'a> {
    fn new(bhs: Bhs, data: &'a [u8], status: bool) -> Self {
        OutPdu {
            bhs,
            data: [data, &[]],
            status,
        }
    }
}

impl Conn {
    /// Sends PDUs under one lock and with as few `writev` calls as the kernel allows, the data
    /// taken from where it lies (no copy). Sequence numbers are filled in here.
    fn send(&self, pdus: &[OutPdu<'_>]) -> io::Result<()> {
        let mut o = lock(&self.out);
        if o.failed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let exp = self.exp_cmd_sn.load(Ordering::Acquire);
        let d = o.digests;
        let frames: Vec<pdu::Frame> = pdus
            .iter()
            .map(|p| {
                let mut h = p.bhs;
                let sn = o.stat_sn;
                if p.status || h.opcode() != op::DATA_IN {
                    h.set_u32(24, sn);
                }
                if p.status {
                    o.stat_sn = sn.wrapping_add(1);
                }
                h.set_u32(28, exp);
                h.set_u32(32, exp.wrapping_add(CMD_WINDOW - 1));
                pdu::frame(&h, &p.data, d)
            })
            .collect();
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(pdus.len() * 4);
        for (p, f) in pdus.iter().zip(&frames) {
            iov.push(IoSlice::new(f.head()));
            iov.extend(
                p.data
                    .iter()
                    .filter(|x| !x.is_empty())
                    .map(|x| IoSlice::new(x)),
            );
            if !f.tail().is_empty() {
                iov.push(IoSlice::new(f.tail()));
            }
        }
        let r = pdu::write_all_vectored(&mut &o.sock, &mut iov);
        if r.is_err() {
            o.failed = true;
            let _ = o.sock.shutdown(Shutdown::Both);
        }
        r
    }

    fn reject(&self, reason: u8, bad: &Bhs) -> io::Result<()> {
        let mut h = Bhs::new(op::REJECT);
        h.0[1] = 0x80;
        h.0[2] = reason;
        h.set_u32(16, NO_TAG);
        self.send(&[OutPdu::new(h, &bad.0, true)])
    }
}

fn sense_response(k: u8, code: (u8, u8)) -> ScsiResponse {
    ScsiResponse::check(sense::fixed(k, code))
}

/// The ASC of ABORTED COMMAND that ends a write whose Data-Out went wrong.
const DATA_OFFSET_ERROR: (u8, u8) = (0x4b, 0x05);
const TOO_MUCH_WRITE_DATA: (u8, u8) = (0x4b, 0x02);
const CRC_ERROR: (u8, u8) = (0x47, 0x05);
/// ILLEGAL REQUEST's INVALID FIELD IN INFORMATION UNIT.
const INVALID_FIELD_IN_IU: (u8, u8) = (0x0e, 0x03);

/// Where a write command's TRANSFER LENGTH field is (whole bytes of its CDB).
fn transfer_length_field(opcode: u8) -> Option<std::ops::Range<usize>> {
    match opcode {
        // WRITE (10), WRITE AND VERIFY (10)
        0x2a | 0x2e => Some(7..9),
        // WRITE (12), WRITE AND VERIFY (12)
        0xaa | 0xae => Some(6..10),
        // WRITE (16), WRITE AND VERIFY (16)
        0x8a | 0x8e => Some(10..14),
        _ => None,
    }
}

impl IscsiServer {
    /// A server of `registry`'s exports.
    pub fn new(registry: Arc<Registry>, config: IscsiConfig) -> Arc<Self> {
        let me = Arc::new(IscsiServer {
            registry,
            config,
            opts: Mutex::new(HashMap::new()),
            luns: Mutex::new(HashMap::new()),
            sessions: Mutex::new(Vec::new()),
            next_tsih: AtomicU16::new(1),
            next_ttt: AtomicU32::new(1),
            connections: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            socks: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            portals: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&me);
        let _ = std::thread::Builder::new()
            .name("iscsi-reaper".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(50));
                // It runs until the server is dropped: during a shutdown it lets go of the LUNs
                // of the exports being removed, which the daemon waits for.
                let Some(me) = weak.upgrade() else { return };
                me.reap(Instant::now());
            });
        me
    }

    /// Sets the iSCSI options of export `name` (its target name, sharing, ACL).
    pub fn set_target_opts(&self, name: &str, opts: TargetOpts) {
        lock(&self.opts).insert(name.to_string(), opts);
    }

    fn opts_of(&self, name: &str) -> TargetOpts {
        lock(&self.opts).get(name).cloned().unwrap_or_default()
    }

    /// The target name of export `name`.
    pub fn target_name(&self, name: &str) -> String {
        self.opts_of(name)
            .iqn
            .unwrap_or_else(|| super::default_iqn(name))
    }

    /// The addresses the portals listen on.
    pub fn portals(&self) -> Vec<SocketAddr> {
        lock(&self.portals).clone()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Closes connections past their login deadline, and lets go of the LUNs of removed
    /// exports (so a removed export's files close).
    fn reap(&self, now: Instant) {
        for (_, s, deadline) in lock(&self.socks).iter_mut() {
            if deadline.is_some_and(|d| d <= now) {
                let _ = s.shutdown(Shutdown::Both);
                *deadline = None;
            }
        }
        let gone: Vec<LunEntry> = {
            let mut l = lock(&self.luns);
            let names: Vec<String> = l
                .iter()
                .filter(|(_, e)| e.export.removed())
                .map(|(n, _)| n.clone())
                .collect();
            names.iter().filter_map(|n| l.remove(n)).collect()
        };
        drop(gone);
    }

    /// The export whose target name is `iqn`.
    fn find_target(&self, iqn: &str) -> Option<Arc<Export>> {
        self.registry
            .exports()
            .into_iter()
            .find(|e| self.target_name(e.name()).eq_ignore_ascii_case(iqn))
    }

    fn allowed(&self, export: &str, initiator: &str) -> bool {
        let o = self.opts_of(export);
        o.initiators.is_empty()
            || o.initiators
                .iter()
                .any(|i| i.eq_ignore_ascii_case(initiator))
    }

    /// The LUN of `export`, made on first use.
    fn lun_for(self: &Arc<Self>, export: &Arc<Export>) -> Result<Arc<Lun>, ServeError> {
        let mut l = lock(&self.luns);
        if let Some(e) = l.get(export.name()) {
            if Arc::ptr_eq(&e.export, export) {
                return Ok(e.lun.clone());
            }
        }
        let iqn = self.target_name(export.name());
        let target = export.info().target;
        let id = fnv1a(format!("{iqn}\0{target}").as_bytes());
        let lun = Lun::new(
            export.clone(),
            LunConfig {
                serial: format!("{id:016x}"),
                naa: id,
                pr_state: super::pr_state_path(&target),
                vendor: "VSTOR".into(),
                product: "vstor disk".into(),
            },
        )?;
        self.hook_aborts(&lun);
        l.insert(
            export.name().to_string(),
            LunEntry {
                export: export.clone(),
                lun: lun.clone(),
            },
        );
        Ok(lun)
    }

    /// A PREEMPT AND ABORT drops the victims' commands queued here or waiting for data.
    fn hook_aborts(self: &Arc<Self>, lun: &Arc<Lun>) {
        let weak = Arc::downgrade(self);
        lun.set_abort_hook(Box::new(move |victims: &[Nexus]| {
            if let Some(me) = weak.upgrade() {
                for s in me.sessions_where(|s| victims.contains(&s.nexus)) {
                    s.abort_all();
                }
            }
        }));
    }

    fn sessions_where(&self, f: impl Fn(&Session) -> bool) -> Vec<Arc<Session>> {
        lock(&self.sessions)
            .iter()
            .filter(|s| f(s))
            .cloned()
            .collect()
    }

    /// Accepts connections on `listener` until [`stop`](IscsiServer::stop).
    pub fn listen(self: &Arc<Self>, listener: TcpListener) -> io::Result<JoinHandle<()>> {
        if let Ok(a) = listener.local_addr() {
            lock(&self.portals).push(a);
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("iscsi-accept".into())
            .spawn(move || loop {
                let sock = listener.accept();
                if me.stopping.load(Ordering::Acquire) {
                    return;
                }
                match sock {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        me.spawn_connection(s);
                    }
                    Err(e) => {
                        eprintln!("vstor serve: iscsi: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
    }

    /// Stops accepting and closes every connection; commands running finish and are
    /// answered first (within a grace period).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for (_, s, _) in lock(&self.socks).iter() {
            close_gracefully(s);
        }
    }

    fn spawn_connection(self: &Arc<Self>, sock: TcpStream) {
        if self.connections.fetch_add(1, Ordering::AcqRel) >= self.config.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            let _ = sock.shutdown(Shutdown::Both);
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = sock.try_clone() {
            lock(&self.socks).push((id, c, Some(Instant::now() + self.config.login_timeout)));
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("iscsi-conn".into())
            .stack_size(512 << 10)
            .spawn(move || {
                if let Err(e) = me.handle(sock, id) {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                    ) {
                        eprintln!("vstor serve: iscsi: connection closed: {e}");
                    }
                }
                lock(&me.socks).retain(|(i, _, _)| *i != id);
                me.connections.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            self.connections.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn login_done(&self, id: u64) {
        for (i, _, deadline) in lock(&self.socks).iter_mut() {
            if *i == id {
                *deadline = None;
            }
        }
    }

    fn handle(self: &Arc<Self>, sock: TcpStream, id: u64) -> io::Result<()> {
        let local = sock.local_addr()?;
        let mut r = BufReader::with_capacity(256 << 10, sock.try_clone()?);
        let mut w = BufWriter::with_capacity(256 << 10, sock.try_clone()?);
        let Some(l) = self.login(&mut r, &mut w, &sock)? else {
            return Ok(());
        };
        self.login_done(id);
        // Everything of the login was flushed: the connection writes to the socket itself.
        let sock_w = w.into_inner().map_err(|e| e.into_error())?;
        let conn = Arc::new(Conn {
            out: Mutex::new(Out {
                sock: sock_w,
                stat_sn: l.stat_sn,
                digests: Digests {
                    header: l.params.header_digest,
                    data: l.params.data_digest,
                },
                failed: false,
            }),
            exp_cmd_sn: AtomicU32::new(l.exp_cmd_sn),
            params: l.params.clone(),
        });
        match l.kind {
            LoginKind::Discovery => self.discovery(&mut r, &conn, &l.initiator, local),
            LoginKind::Normal(session) => {
                let closer = sock.try_clone()?;
                let Some(registration) = session.export.connect(move || close_gracefully(&closer))
                else {
                    self.end_session(&session);
                    return Ok(());
                };
                let res = self.full_feature(&mut r, &conn, &session, local);
                self.end_session(&session);
                drop(registration);
                res
            }
        }
    }

    fn end_session(&self, s: &Arc<Session>) {
        lock(&self.sessions).retain(|x| !Arc::ptr_eq(x, s));
        s.lun.nexus_lost(&s.nexus);
    }
}

fn close_gracefully(s: &TcpStream) {
    let _ = s.shutdown(Shutdown::Read);
    if let Ok(s) = s.try_clone() {
        let _ = std::thread::Builder::new()
            .name("iscsi-close".into())
            .stack_size(64 << 10)
            .spawn(move || {
                std::thread::sleep(CLOSE_GRACE);
                let _ = s.shutdown(Shutdown::Both);
            });
    }
}

fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------------------------
// Login

enum LoginKind {
    Discovery,
    Normal(Arc<Session>),
}

struct LoggedIn {
    kind: LoginKind,
    initiator: String,
    params: Params,
    stat_sn: u32,
    exp_cmd_sn: u32,
}

/// Login status classes and details (RFC 7143 §11.13.5).
mod status {
    pub const AUTH_FAILED: u16 = 0x0201;
    pub const FORBIDDEN: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const REMOVED: u16 = 0x0204;
    pub const BAD_VERSION: u16 = 0x0205;
    pub const TOO_MANY_CONNECTIONS: u16 = 0x0206;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const NO_SESSION: u16 = 0x020a;
    pub const INVALID_REQUEST: u16 = 0x020b;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const UNAVAILABLE: u16 = 0x0301;
    pub const TARGET_ERROR: u16 = 0x0300;
}

enum Chap {
    /// Not started.
    Idle,
    /// AuthMethod=CHAP agreed: waiting for CHAP_A.
    Agreed,
    /// Challenge sent: waiting for CHAP_N and CHAP_R.
    Challenged { id: u8, challenge: Vec<u8> },
}

/// The state of a login in progress.
struct Login {
    stage: u8,
    first: bool,
    initiator: Option<String>,
    discovery: bool,
    export: Option<Arc<Export>>,
    target_name: String,
    isid: [u8; 6],
    itt: u32,
    params: Params,
    authenticated: bool,
    chap: Chap,
    declared_recv: bool,
    stat_sn: u32,
    cmd_sn: u32,
    /// Text of a request sent in several PDUs (C bit).
    partial: Vec<u8>,
    /// The connection's socket.
    sock: TcpStream,
}

/// A refused login: its status, and why (for the log).
struct Refusal(u16, String);

impl IscsiServer {
    /// A TSIH for a discovery session (never 0; discovery sessions are not listed).
    fn discovery_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    fn chap(&self) -> Option<&ChapConfig> {
        self.config.chap.as_ref()
    }

    /// The login phase. Returns the session, or None when the login failed (the initiator
    /// was told) or the initiator left.
    fn login(
        self: &Arc<Self>,
        r: &mut BufReader<TcpStream>,
        w: &mut BufWriter<TcpStream>,
        sock: &TcpStream,
    ) -> io::Result<Option<LoggedIn>> {
        let mut st = Login {
            stage: 0,
            first: true,
            initiator: None,
            discovery: false,
            export: None,
            target_name: String::new(),
            isid: [0; 6],
            itt: 0,
            params: Params::default(),
            authenticated: self.chap().is_none(),
            chap: Chap::Idle,
            declared_recv: false,
            stat_sn: u32::from_be_bytes(chap::random(4)?.try_into().unwrap_or([0; 4])),
            cmd_sn: 0,
            partial: Vec::new(),
            sock: sock.try_clone()?,
        };
        loop {
            let p = match pdu::read_pdu(r, Digests::default(), LOGIN_MAX_DATA) {
                Ok(p) => p,
                Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(None)
                }
                Err(ReadError::Io(e)) => return Err(e),
                Err(_) => return Ok(None),
            };
            if p.bhs.opcode() != op::LOGIN_REQ {
                // Only login requests before the full feature phase: the connection ends.
                return Ok(None);
            }
            match self.login_step(&mut st, &p) {
                Ok((keys, transit, done)) => {
                    let mut h = login_header(&st, &p.bhs);
                    if transit {
                        h.0[1] |= 0x80;
                        h.0[1] = (h.0[1] & !0x03) | (p.bhs.flags() & 0x03);
                    }
                    if let Some(s) = &done {
                        let tsih = match &s.kind {
                            LoginKind::Normal(sess) => sess.tsih,
                            // A discovery session has an identifying handle too.
                            LoginKind::Discovery => self.discovery_tsih(),
                        };
                        h.set_u16(14, tsih);
                    }
                    h.set_u32(24, st.stat_sn);
                    h.set_u32(28, st.cmd_sn);
                    h.set_u32(32, st.cmd_sn.wrapping_add(CMD_WINDOW - 1));
                    let data = text::encode(&keys);
                    pdu::write_pdu(w, &h, &[&data], Digests::default())?;
                    w.flush()?;
                    st.stat_sn = st.stat_sn.wrapping_add(1);
                    if let Some(mut s) = done {
                        s.stat_sn = st.stat_sn;
                        return Ok(Some(s));
                    }
                }
                Err(Refusal(code, why)) => {
                    let mut h = login_header(&st, &p.bhs);
                    h.0[1] &= !0x80 & !0x03;
                    h.set_u32(24, st.stat_sn);
                    h.set_u32(28, st.cmd_sn);
                    h.set_u32(32, st.cmd_sn.wrapping_add(CMD_WINDOW - 1));
                    h.0[36] = (code >> 8) as u8;
                    h.0[37] = code as u8;
                    pdu::write_pdu(w, &h, &[], Digests::default())?;
                    w.flush()?;
                    eprintln!(
                        "vstor serve: iscsi: login of {} refused: {why}",
                        st.initiator.as_deref().unwrap_or("an initiator")
                    );
                    return Ok(None);
                }
            }
        }
    }

    /// One login request: the keys to answer, whether the stage changes as asked, and the
    /// session when the full feature phase begins.
    #[allow(clippy::type_complexity)]
    fn login_step(
        self: &Arc<Self>,
        st: &mut Login,
        p: &Pdu,
    ) -> Result<(Vec<(String, String)>, bool, Option<LoggedIn>), Refusal> {
        let h = &p.bhs;
        let flags = h.flags();
        let (transit, cont) = (flags & 0x80 != 0, flags & 0x40 != 0);
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        if st.first {
            let (vmax, vmin) = (h.0[2], h.0[3]);
            if vmin > 0 || vmax < vmin {
                return Err(Refusal(status::BAD_VERSION, "version".into()));
            }
            st.isid.copy_from_slice(&h.0[8..14]);
            st.itt = h.itt();
            st.cmd_sn = h.u32_at(24);
            if h.u16_at(14) != 0 {
                let tsih = h.u16_at(14);
                let exists = !self.sessions_where(|s| s.tsih == tsih).is_empty();
                return Err(if exists {
                    Refusal(status::TOO_MANY_CONNECTIONS, "MaxConnections is 1".into())
                } else {
                    Refusal(status::NO_SESSION, format!("no session with TSIH {tsih}"))
                });
            }
            st.stage = csg;
        }
        if csg != st.stage || csg == 2 || (transit && (nsg <= csg || nsg == 2)) {
            return Err(Refusal(
                status::INVALID_REQUEST,
                format!("stage {csg} to {nsg} in stage {}", st.stage),
            ));
        }
        if transit && cont {
            return Err(Refusal(status::INITIATOR_ERROR, "T and C both set".into()));
        }
        st.partial.extend_from_slice(&p.data);
        if st.partial.len() > LOGIN_MAX_DATA as usize * 4 {
            return Err(Refusal(
                status::INITIATOR_ERROR,
                "login text too long".into(),
            ));
        }
        if cont {
            // More text follows: answer with an empty response and wait for it.
            return Ok((Vec::new(), false, None));
        }
        let data = std::mem::take(&mut st.partial);
        let keys = text::parse(&data).map_err(|e| Refusal(status::INITIATOR_ERROR, e))?;
        let get = |k: &str| keys.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        let mut answer: Vec<(String, String)> = Vec::new();
        if st.first {
            st.first = false;
            let initiator = get("InitiatorName")
                .ok_or_else(|| Refusal(status::MISSING_PARAMETER, "no InitiatorName".into()))?;
            super::check_name(initiator).map_err(|e| Refusal(status::INITIATOR_ERROR, e))?;
            st.initiator = Some(initiator.to_string());
            st.discovery = match get("SessionType").unwrap_or("Normal") {
                "Normal" => false,
                "Discovery" => true,
                other => {
                    return Err(Refusal(
                        status::INITIATOR_ERROR,
                        format!("SessionType {other}"),
                    ))
                }
            };
            if !st.discovery {
                let t = get("TargetName")
                    .ok_or_else(|| Refusal(status::MISSING_PARAMETER, "no TargetName".into()))?;
                let e = self
                    .find_target(t)
                    .ok_or_else(|| Refusal(status::NOT_FOUND, format!("no target {t}")))?;
                if !self.allowed(e.name(), initiator) {
                    return Err(Refusal(
                        status::FORBIDDEN,
                        format!("{initiator} is not in the ACL of {t}"),
                    ));
                }
                st.target_name = self.target_name(e.name());
                st.export = Some(e);
                answer.push(("TargetPortalGroupTag".into(), TPGT.to_string()));
            }
            if csg == 1 && !st.authenticated {
                return Err(Refusal(
                    status::AUTH_FAILED,
                    "CHAP is required but the initiator skipped the security stage".into(),
                ));
            }
        }
        for (k, v) in &keys {
            match k.as_str() {
                "AuthMethod" => {
                    if st.stage != 0 {
                        answer.push((k.clone(), "Irrelevant".into()));
                        continue;
                    }
                    let offered: Vec<&str> = v.split(',').collect();
                    if self.chap().is_some() {
                        if !offered.contains(&"CHAP") {
                            return Err(Refusal(
                                status::AUTH_FAILED,
                                "CHAP is required and was not offered".into(),
                            ));
                        }
                        st.chap = Chap::Agreed;
                        answer.push((k.clone(), "CHAP".into()));
                    } else if offered.contains(&"None") {
                        answer.push((k.clone(), "None".into()));
                    } else {
                        return Err(Refusal(
                            status::AUTH_FAILED,
                            format!("AuthMethod {v}: this target has no CHAP credentials"),
                        ));
                    }
                }
                "CHAP_A" => {
                    if !matches!(st.chap, Chap::Agreed) {
                        return Err(Refusal(status::AUTH_FAILED, "CHAP_A out of turn".into()));
                    }
                    if !v.split(',').any(|a| a == "5") {
                        return Err(Refusal(
                            status::AUTH_FAILED,
                            format!("CHAP_A {v}: only MD5 (5)"),
                        ));
                    }
                    let rnd = chap::random(17)
                        .map_err(|e| Refusal(status::TARGET_ERROR, e.to_string()))?;
                    let id = rnd[0];
                    let challenge = rnd[1..].to_vec();
                    answer.push(("CHAP_A".into(), "5".into()));
                    answer.push(("CHAP_I".into(), id.to_string()));
                    answer.push(("CHAP_C".into(), chap::encode_hex(&challenge)));
                    st.chap = Chap::Challenged { id, challenge };
                }
                "CHAP_N" => {}
                "CHAP_R" => {
                    let Chap::Challenged { id, challenge } = &st.chap else {
                        return Err(Refusal(status::AUTH_FAILED, "CHAP_R out of turn".into()));
                    };
                    let cfg = self.chap().ok_or_else(|| {
                        Refusal(status::AUTH_FAILED, "no CHAP credentials".into())
                    })?;
                    let name = get("CHAP_N").unwrap_or("");
                    let got = chap::decode_binary(v);
                    let ok = match (cfg.secret_of(name), &got) {
                        (Some(secret), Some(got)) => {
                            let want = chap::response(*id, secret, challenge);
                            got.len() == want.len()
                                && got.iter().zip(want).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
                        }
                        _ => false,
                    };
                    if !ok {
                        return Err(Refusal(
                            status::AUTH_FAILED,
                            format!("CHAP response of '{name}' does not match"),
                        ));
                    }
                    // Mutual CHAP: the initiator challenges the target back.
                    if let (Some(ci), Some(cc)) = (get("CHAP_I"), get("CHAP_C")) {
                        let Some((tname, tsecret)) = &cfg.target else {
                            return Err(Refusal(
                                status::AUTH_FAILED,
                                "mutual CHAP asked for, but no target secret is set".into(),
                            ));
                        };
                        let ci: u8 = ci
                            .parse()
                            .map_err(|_| Refusal(status::AUTH_FAILED, format!("CHAP_I {ci}")))?;
                        let cc = chap::decode_binary(cc).ok_or_else(|| {
                            Refusal(status::AUTH_FAILED, "CHAP_C is not binary".into())
                        })?;
                        if cc == *challenge || cc.is_empty() {
                            return Err(Refusal(
                                status::AUTH_FAILED,
                                "the initiator reflected the target's challenge".into(),
                            ));
                        }
                        answer.push(("CHAP_N".into(), tname.clone()));
                        answer.push((
                            "CHAP_R".into(),
                            chap::encode_hex(&chap::response(ci, tsecret, &cc)),
                        ));
                    }
                    st.authenticated = true;
                    st.chap = Chap::Idle;
                }
                "CHAP_I" | "CHAP_C" => {
                    if get("CHAP_R").is_none() {
                        return Err(Refusal(
                            status::AUTH_FAILED,
                            "CHAP_I/CHAP_C without CHAP_R".into(),
                        ));
                    }
                }
                _ => match text::negotiate(&mut st.params, k, v, st.discovery) {
                    Answer::Value(a) => answer.push((k.clone(), a)),
                    Answer::None => {}
                },
            }
        }
        if st.stage == 1 && !st.declared_recv {
            st.declared_recv = true;
            st.params.recv_max = text::OUR_RECV_MAX;
            answer.push((
                "MaxRecvDataSegmentLength".into(),
                text::OUR_RECV_MAX.to_string(),
            ));
        }
        if !transit {
            return Ok((answer, false, None));
        }
        if st.stage == 0 && !st.authenticated {
            // Authentication is not finished: stay in the security stage.
            if matches!(st.chap, Chap::Idle) {
                return Err(Refusal(
                    status::AUTH_FAILED,
                    "CHAP is required and was not offered".into(),
                ));
            }
            return Ok((answer, false, None));
        }
        st.stage = nsg;
        if nsg != 3 {
            return Ok((answer, true, None));
        }
        if !st.declared_recv {
            // Straight from the security stage: every operational key keeps its default.
            st.params.recv_max = 8192;
        }
        let initiator = st.initiator.clone().unwrap_or_default();
        let kind = if st.discovery {
            LoginKind::Discovery
        } else {
            LoginKind::Normal(self.new_session(st, &initiator)?)
        };
        Ok((
            answer,
            true,
            Some(LoggedIn {
                kind,
                initiator,
                params: st.params.clone(),
                stat_sn: 0,
                exp_cmd_sn: st.cmd_sn,
            }),
        ))
    }

    fn new_session(self: &Arc<Self>, st: &Login, initiator: &str) -> Result<Arc<Session>, Refusal> {
        let export = st
            .export
            .clone()
            .ok_or_else(|| Refusal(status::INITIATOR_ERROR, "no target".into()))?;
        if export.removed() {
            return Err(Refusal(status::REMOVED, "the export was removed".into()));
        }
        let lun = self
            .lun_for(&export)
            .map_err(|e| Refusal(status::TARGET_ERROR, e.message))?;
        let opts = self.opts_of(export.name());
        let mut sessions = lock(&self.sessions);
        // Session reinstatement: the same initiator, ISID and target replace the old session.
        for s in sessions.iter() {
            if s.isid == st.isid
                && s.initiator.eq_ignore_ascii_case(initiator)
                && s.target == st.target_name
            {
                s.abort_all();
                let _ = s.sock.shutdown(Shutdown::Both);
            }
        }
        sessions.retain(|s| {
            !(s.isid == st.isid
                && s.initiator.eq_ignore_ascii_case(initiator)
                && s.target == st.target_name)
        });
        if !opts.shared
            && sessions
                .iter()
                .any(|s| s.target == st.target_name && !s.initiator.eq_ignore_ascii_case(initiator))
        {
            return Err(Refusal(
                status::UNAVAILABLE,
                format!(
                    "{} is not shared and another initiator is logged in",
                    st.target_name
                ),
            ));
        }
        let mut tsih = self.next_tsih.fetch_add(1, Ordering::Relaxed);
        while tsih == 0 || sessions.iter().any(|s| s.tsih == tsih) {
            tsih = self.next_tsih.fetch_add(1, Ordering::Relaxed);
        }
        let isid_hex: String = st.isid.iter().map(|b| format!("{b:02x}")).collect();
        let sock = st
            .sock
            .try_clone()
            .map_err(|e| Refusal(status::TARGET_ERROR, e.to_string()))?;
        let s = Arc::new(Session {
            tsih,
            isid: st.isid,
            initiator: initiator.to_string(),
            target: st.target_name.clone(),
            nexus: Nexus {
                initiator: format!("{initiator},i,0x{isid_hex}"),
                target: format!("{},t,0x{TPGT:04x}", st.target_name),
            },
            export,
            lun,
            sock,
            tasks: Mutex::new(Tasks::default()),
            cv: Condvar::new(),
            ready: Condvar::new(),
        });
        sessions.push(s.clone());
        Ok(s)
    }
}

fn login_header(st: &Login, req: &Bhs) -> Bhs {
    let mut h = Bhs::new(op::LOGIN_RESP);
    // CSG as asked, T and NSG filled by the caller.
    h.0[1] = req.flags() & 0x0c;
    h.0[2] = 0;
    h.0[3] = 0;
    h.0[8..14].copy_from_slice(&st.isid);
    h.set_u32(16, req.itt());
    h
}

// ---------------------------------------------------------------------------------------------
// Full feature phase

/// A Text exchange in progress: request text sent in several PDUs, and the rest of a long
/// response the initiator fetches with the response's TTT.
#[derive(Default)]
struct TextState {
    partial: Vec<u8>,
    rest: Vec<u8>,
    ttt: u32,
}

fn min3(a: usize, b: usize, c: usize) -> usize {
    a.min(b).min(c)
}

impl IscsiServer {
    fn next_ttt(&self) -> u32 {
        loop {
            let t = self.next_ttt.fetch_add(1, Ordering::Relaxed);
            if t != NO_TAG {
                return t;
            }
        }
    }

    fn discovery(
        self: &Arc<Self>,
        r: &mut BufReader<TcpStream>,
        conn: &Arc<Conn>,
        initiator: &str,
        local: SocketAddr,
    ) -> io::Result<()> {
        self.read_loop(r, conn, None, initiator, local)
    }

    fn full_feature(
        self: &Arc<Self>,
        r: &mut BufReader<TcpStream>,
        conn: &Arc<Conn>,
        s: &Arc<Session>,
        local: SocketAddr,
    ) -> io::Result<()> {
        let mut threads = Vec::new();
        for _ in 0..self.config.workers.max(1) {
            let (c, s2) = (conn.clone(), s.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("iscsi-worker".into())
                    .stack_size(1 << 20)
                    .spawn(move || worker(&c, &s2))?,
            );
        }
        let initiator = s.initiator.clone();
        let res = self.read_loop(r, conn, Some(s), &initiator, local);
        {
            let mut t = lock(&s.tasks);
            t.closed = true;
            t.pending.clear();
            t.r2t_wait.clear();
        }
        s.cv.notify_all();
        s.ready.notify_all();
        for t in threads {
            let _ = t.join();
        }
        res
    }

    /// Reads PDUs until the connection ends or the initiator logs out.
    fn read_loop(
        self: &Arc<Self>,
        r: &mut BufReader<TcpStream>,
        conn: &Arc<Conn>,
        s: Option<&Arc<Session>>,
        initiator: &str,
        local: SocketAddr,
    ) -> io::Result<()> {
        let mut group = Vec::new();
        let res = self.read_pdus(r, conn, s, initiator, local, &mut group);
        // What was received before the end still runs (its responses go out if they can).
        if let Some(s) = s {
            queue_all(s, &mut group);
        }
        res
    }

    /// [`read_loop`](Self::read_loop)'s body. Commands whose data is all here collect in
    /// `group`, which goes to the workers as one batch when no further whole PDU is in the
    /// read buffer (the next read would wait for the initiator), when it holds [`BATCH`]
    /// commands or [`BATCH_BYTES`] (a large write goes at once, not after the Data-Out of the
    /// others), or before a PDU that must see the queue (task management, logout).
    fn read_pdus(
        self: &Arc<Self>,
        r: &mut BufReader<TcpStream>,
        conn: &Arc<Conn>,
        s: Option<&Arc<Session>>,
        initiator: &str,
        local: SocketAddr,
        group: &mut Vec<Task>,
    ) -> io::Result<()> {
        let digests = lock(&conn.out).digests;
        let recv_max = conn.params.recv_max;
        let mut text_state = TextState::default();
        loop {
            if let Some(s) = s {
                self.issue_waiting_r2ts(conn, s, group)?;
                if !group.is_empty()
                    && (group.len() >= BATCH
                        || group.iter().map(task_bytes).sum::<u64>() >= BATCH_BYTES
                        || !whole_pdu_in(r.buffer(), digests, recv_max))
                {
                    queue_all(s, group);
                }
            }
            let p = match pdu::read_pdu(r, digests, recv_max) {
                Ok(p) => p,
                Err(ReadError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Ok(())
                }
                Err(ReadError::Io(e)) => return Err(e),
                Err(ReadError::HeaderDigest) => {
                    eprintln!("vstor serve: iscsi: header digest error from {initiator}: closing");
                    return Ok(());
                }
                Err(ReadError::TooLong(h)) => {
                    eprintln!(
                        "vstor serve: iscsi: {initiator} sent {} bytes of data in one PDU \
                         (MaxRecvDataSegmentLength {recv_max}): closing",
                        h.data_len()
                    );
                    let _ = conn.reject(reject::PROTOCOL, &h);
                    return Ok(());
                }
                Err(ReadError::DataDigest(h)) => {
                    conn.reject(reject::DATA_DIGEST, &h)?;
                    if let (Some(s), op::DATA_OUT) = (s, h.opcode()) {
                        self.fail_write(conn, s, h.itt(), CRC_ERROR)?;
                    }
                    continue;
                }
            };
            let h = p.bhs;
            if let Some(s) = s {
                if !matches!(h.opcode(), op::SCSI_CMD | op::DATA_OUT | op::NOP_OUT) {
                    // Task management and logout look at the queue: it holds everything
                    // received before them.
                    queue_all(s, group);
                }
            }
            if matches!(
                h.opcode(),
                op::NOP_OUT | op::SCSI_CMD | op::TMF_REQ | op::TEXT_REQ | op::LOGOUT_REQ
            ) && !h.immediate()
            {
                let sn = h.u32_at(24);
                let exp = conn.exp_cmd_sn.load(Ordering::Acquire);
                let max = exp.wrapping_add(CMD_WINDOW - 1);
                if sn == exp || (pdu::sn_lt(exp, sn) && !pdu::sn_lt(max, sn)) {
                    conn.exp_cmd_sn.store(sn.wrapping_add(1), Ordering::Release);
                } else {
                    // Outside the command window: ignored (RFC 7143 §4.2.2.1).
                    continue;
                }
            }
            match h.opcode() {
                op::NOP_OUT => {
                    if h.itt() != NO_TAG {
                        let mut rh = Bhs::new(op::NOP_IN);
                        rh.0[1] = 0x80;
                        rh.set_u64(8, h.lun());
                        rh.set_u32(16, h.itt());
                        rh.set_u32(20, NO_TAG);
                        let n = p.data.len().min(conn.params.send_max as usize);
                        conn.send(&[OutPdu::new(rh, &p.data[..n], true)])?;
                    }
                }
                op::SCSI_CMD => match s {
                    Some(s) => self.scsi_command(conn, s, p, group)?,
                    None => conn.reject(reject::PROTOCOL, &h)?,
                },
                op::DATA_OUT => match s {
                    Some(s) => self.data_out(conn, s, p, group)?,
                    None => conn.reject(reject::PROTOCOL, &h)?,
                },
                op::TMF_REQ => match s {
                    Some(s) => self.tmf(conn, s, &h)?,
                    None => conn.reject(reject::PROTOCOL, &h)?,
                },
                op::TEXT_REQ => {
                    let current = s.map(|s| s.target.as_str());
                    self.text(conn, &mut text_state, &p, initiator, local, current)?;
                }
                op::LOGOUT_REQ => {
                    self.logout(conn, s, &h)?;
                    return Ok(());
                }
                op::SNACK => conn.reject(reject::SNACK, &h)?,
                op::LOGIN_REQ => conn.reject(reject::PROTOCOL, &h)?,
                _ => conn.reject(reject::NOT_SUPPORTED, &h)?,
            }
        }
    }

    fn logout(&self, conn: &Conn, s: Option<&Arc<Session>>, h: &Bhs) -> io::Result<()> {
        let reason = h.flags() & 0x7f;
        let response = match reason {
            0 | 1 => 0,
            // Removing a connection for recovery: not at error recovery level 0.
            _ => 2,
        };
        if let Some(s) = s {
            // The session's commands are answered before the logout is.
            let mut t = lock(&s.tasks);
            t.pending.clear();
            t.r2t_wait.clear();
            while !t.queue.is_empty() || !t.running.is_empty() {
                t = s.wait_change(t);
            }
            drop(t);
            if response == 0 {
                // The session ends before the initiator hears so (one connection per
                // session): a login that follows the logout response finds it gone (an
                // unshared export then admits another initiator at once).
                self.end_session(s);
            }
        }
        let mut rh = Bhs::new(op::LOGOUT_RESP);
        rh.0[1] = 0x80;
        rh.0[2] = response;
        rh.set_u32(16, h.itt());
        conn.send(&[OutPdu::new(rh, &[], true)])
    }

    fn text(
        &self,
        conn: &Conn,
        st: &mut TextState,
        p: &Pdu,
        initiator: &str,
        local: SocketAddr,
        current: Option<&str>,
    ) -> io::Result<()> {
        let h = &p.bhs;
        let ttt = h.u32_at(20);
        if ttt != NO_TAG {
            if !st.rest.is_empty() && ttt == st.ttt {
                return self.text_chunk(conn, st, h);
            }
            return conn.reject(reject::INVALID_FIELD, h);
        }
        st.rest.clear();
        st.partial.extend_from_slice(&p.data);
        if st.partial.len() > 65_536 {
            st.partial.clear();
            return conn.reject(reject::PROTOCOL, h);
        }
        if h.flags() & 0x40 != 0 {
            // More request text follows: an empty response asks for it.
            let mut rh = Bhs::new(op::TEXT_RESP);
            rh.set_u64(8, h.lun());
            rh.set_u32(16, h.itt());
            rh.set_u32(20, self.next_ttt());
            return conn.send(&[OutPdu::new(rh, &[], true)]);
        }
        let data = std::mem::take(&mut st.partial);
        let keys = match text::parse(&data) {
            Ok(k) => k,
            Err(_) => return conn.reject(reject::PROTOCOL, h),
        };
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in keys {
            if k == "SendTargets" {
                out.extend(self.send_targets(initiator, local, &v, current));
            } else {
                out.push((k, "NotUnderstood".into()));
            }
        }
        st.rest = text::encode(&out);
        st.ttt = self.next_ttt();
        self.text_chunk(conn, st, h)
    }

    fn text_chunk(&self, conn: &Conn, st: &mut TextState, h: &Bhs) -> io::Result<()> {
        let n = st.rest.len().min(conn.params.send_max as usize);
        let chunk: Vec<u8> = st.rest.drain(..n).collect();
        let last = st.rest.is_empty();
        let mut rh = Bhs::new(op::TEXT_RESP);
        rh.0[1] = if last { 0x80 } else { 0x40 };
        rh.set_u64(8, h.lun());
        rh.set_u32(16, h.itt());
        rh.set_u32(20, if last { NO_TAG } else { st.ttt });
        conn.send(&[OutPdu::new(rh, &chunk, true)])
    }

    /// The SendTargets answer: every target `initiator` may log in to (`All`), the session's
    /// target (empty value), or the one named.
    fn send_targets(
        &self,
        initiator: &str,
        local: SocketAddr,
        which: &str,
        current: Option<&str>,
    ) -> Vec<(String, String)> {
        let addr = match local {
            SocketAddr::V4(a) => format!("{}:{},{TPGT}", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("[{}]:{},{TPGT}", a.ip(), a.port()),
        };
        let mut out = Vec::new();
        for e in self.registry.exports() {
            let name = self.target_name(e.name());
            let wanted = match which {
                "All" => true,
                "" => current.is_some_and(|c| c.eq_ignore_ascii_case(&name)),
                other => other.eq_ignore_ascii_case(&name),
            };
            if wanted && self.allowed(e.name(), initiator) {
                out.push(("TargetName".into(), name));
                out.push(("TargetAddress".into(), addr.clone()));
            }
        }
        out
    }

    fn tmf(&self, conn: &Conn, s: &Arc<Session>, h: &Bhs) -> io::Result<()> {
        let func = h.flags() & 0x7f;
        let mut cold = false;
        let lun_ok = h.lun() == 0;
        let response: u8 = match func {
            // ABORT TASK
            1 => {
                let rtt = h.u32_at(20);
                let mut t = lock(&s.tasks);
                if let Some(i) = t.queue.iter().position(|x| x.itt == rtt) {
                    t.queue.remove(i);
                    t.remember_aborted(rtt);
                    0
                } else if let Some(pd) = t.pending.remove(&rtt) {
                    if pd.holds {
                        t.solicited_bytes = t.solicited_bytes.saturating_sub(pd.task.edtl.into());
                    }
                    t.remember_aborted(rtt);
                    0
                } else if let Some(aborted) = t.running.get_mut(&rtt) {
                    *aborted = true;
                    while t.running.contains_key(&rtt) {
                        t = s.wait_change(t);
                    }
                    0
                } else if pdu::sn_lt(h.u32_at(32), h.u32_at(24)) {
                    // A command not here, sent before this request: answered already, or
                    // never received (RFC 7143 §11.5.1): either way it will not run.
                    0
                } else {
                    1
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
            2 | 4 | 5 if !lun_ok => 2,
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET WARM/COLD RESET
            2 | 4 | 5 | 6 | 7 => {
                let victims = if func == 2 {
                    vec![s.clone()]
                } else {
                    let lun = s.lun.clone();
                    self.sessions_where(|x| Arc::ptr_eq(&x.lun, &lun))
                };
                for v in &victims {
                    v.abort_all();
                }
                for v in &victims {
                    v.wait_idle();
                }
                if func >= 5 {
                    // One LUN per target: a target reset is a reset of this LUN. Every
                    // nexus is told (BUS DEVICE RESET FUNCTION OCCURRED); reservations stay.
                    s.lun.reset();
                }
                if func == 7 {
                    // A cold reset also ends every connection to the target, this one after
                    // its response (RFC 7143 §11.5.1).
                    for v in victims.iter().filter(|v| !Arc::ptr_eq(v, s)) {
                        close_gracefully(&v.sock);
                    }
                    cold = true;
                }
                0
            }
            // TASK REASSIGN: not at error recovery level 0.
            8 => 4,
            // CLEAR ACA: no ACA here (NACA is refused).
            3 => 5,
            _ => 255,
        };
        let mut rh = Bhs::new(op::TMF_RESP);
        rh.0[1] = 0x80;
        rh.0[2] = response;
        rh.set_u32(16, h.itt());
        conn.send(&[OutPdu::new(rh, &[], true)])?;
        if cold {
            close_gracefully(&s.sock);
        }
        Ok(())
    }

    fn scsi_command(
        &self,
        conn: &Conn,
        s: &Arc<Session>,
        p: Pdu,
        group: &mut Vec<Task>,
    ) -> io::Result<()> {
        let h = p.bhs;
        let itt = h.itt();
        let flags = h.flags();
        let (rbit, wbit, fbit) = (flags & 0x40 != 0, flags & 0x20 != 0, flags & 0x80 != 0);
        let edtl = h.u32_at(20);
        let Ok(cdb) = pdu::cdb_of(&h, &p.ahs) else {
            return conn.reject(reject::INVALID_FIELD, &h);
        };
        let lun = h.lun();
        let imm = p.data.len() as u32;
        let prm = &conn.params;
        if imm > 0 && (!wbit || !prm.immediate_data || imm > edtl || imm > prm.first_burst) {
            // Immediate data the command may not carry: the command is rejected (and so
            // ends, RFC 7143 §11.17).
            return conn.reject(reject::PROTOCOL, &h);
        }
        let task = |cdb: Vec<u8>, data: Vec<u8>, use_len: usize, write: bool, want: usize| Task {
            itt,
            lun,
            cdb,
            data,
            use_len,
            write,
            want,
            edtl,
        };
        let refuse = |resp: ScsiResponse, want: usize| -> io::Result<()> {
            if wbit {
                // Unsolicited data of it may follow: dropped quietly.
                lock(&s.tasks).remember_aborted(itt);
            }
            send_response(
                conn,
                &task(Vec::new(), Vec::new(), 0, want > 0, want),
                resp,
                0,
            )
        };
        if rbit && wbit {
            return refuse(
                sense_response(key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB),
                0,
            );
        }
        let dir = if lun == 0 {
            s.lun.data_dir_of(&cdb)
        } else if wbit {
            Err(sense_response(key::ILLEGAL_REQUEST, asc::LUN_NOT_SUPPORTED))
        } else {
            Ok(DataDir::None)
        };
        let need = match dir {
            Err(resp) => return refuse(resp, 0),
            Ok(DataDir::Out(n)) => n,
            Ok(_) => 0,
        };
        let have = if wbit { edtl } else { 0 };
        let mut cdb = cdb;
        let mut use_len = need;
        // COMPARE AND WRITE is all or nothing: the LUN gets all the Data-Out sent and refuses
        // a length its CDB does not ask for (a 256-block CDB wraps to 0 blocks).
        let compare_and_write = cdb[0] == crate::scsi::op::COMPARE_AND_WRITE;
        if compare_and_write {
            use_len = have;
        } else if have != need && need > 0 {
            // The initiator sends another amount than the CDB asks for (RFC 7143 §11.4.5.2):
            // a write moves what both allow, in whole blocks, and the residual says the rest.
            let bs = s.export.device().info().logical_sector_size.max(1);
            let opcode = cdb[0];
            if have > need {
                // Underflow: the CDB's amount is used, the rest dropped.
            } else if let Some(tl) = transfer_length_field(opcode) {
                if have % bs != 0 {
                    return refuse(
                        sense_response(key::ILLEGAL_REQUEST, INVALID_FIELD_IN_IU),
                        need as usize,
                    );
                }
                let blocks = (have / bs).to_be_bytes();
                cdb[tl.clone()].copy_from_slice(&blocks[4 - tl.len()..]);
                use_len = have;
            } else {
                return refuse(
                    sense_response(key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB),
                    need as usize,
                );
            }
        }
        if !wbit || edtl == 0 {
            group.push(task(cdb, Vec::new(), 0, need > 0, need as usize));
            return Ok(());
        }
        if edtl > MAX_TRANSFER {
            return refuse(
                sense_response(key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB),
                need as usize,
            );
        }
        let mut data = p.data;
        data.reserve_exact((edtl - imm) as usize);
        let unsol_end = if !prm.initial_r2t && !fbit {
            prm.first_burst.min(edtl)
        } else {
            imm
        };
        lock(&s.tasks).pending.insert(
            itt,
            Pending {
                task: task(cdb, data, use_len as usize, true, need as usize),
                unsol_end,
                unsol_datasn: 0,
                r2t: None,
                r2tsn: 0,
                holds: false,
            },
        );
        self.advance(conn, s, itt, group)
    }

    /// Moves a write on: into `group` once its data is all here, an R2T for the next burst
    /// once its unsolicited data is in.
    fn advance(&self, conn: &Conn, s: &Session, itt: u32, group: &mut Vec<Task>) -> io::Result<()> {
        let mut t = lock(&s.tasks);
        let Some(pd) = t.pending.get_mut(&itt) else {
            return Ok(());
        };
        let got = pd.task.data.len() as u32;
        let edtl = pd.task.edtl;
        if got >= edtl {
            let pd = t.pending.remove(&itt).expect("pending");
            if pd.holds {
                t.solicited_bytes = t.solicited_bytes.saturating_sub(edtl.into());
            }
            drop(t);
            group.push(pd.task);
            return Ok(());
        }
        if got < pd.unsol_end || pd.r2t.is_some() {
            return Ok(());
        }
        if !pd.holds {
            let held = t.solicited_bytes;
            if held > 0 && held + u64::from(edtl) > BUDGET {
                if !t.r2t_wait.contains(&itt) {
                    t.r2t_wait.push_back(itt);
                }
                return Ok(());
            }
            t.solicited_bytes += u64::from(edtl);
            let pd = t.pending.get_mut(&itt).expect("pending");
            pd.holds = true;
        }
        let ttt = self.next_ttt();
        let pd = t.pending.get_mut(&itt).expect("pending");
        let len = conn.params.max_burst.min(edtl - got);
        pd.r2t = Some((ttt, got + len, 0));
        let r2tsn = pd.r2tsn;
        pd.r2tsn += 1;
        let lun = pd.task.lun;
        drop(t);
        let mut rh = Bhs::new(op::R2T);
        rh.0[1] = 0x80;
        rh.set_u64(8, lun);
        rh.set_u32(16, itt);
        rh.set_u32(20, ttt);
        rh.set_u32(36, r2tsn);
        rh.set_u32(40, got);
        rh.set_u32(44, len);
        conn.send(&[OutPdu::new(rh, &[], false)])
    }

    fn issue_waiting_r2ts(
        &self,
        conn: &Conn,
        s: &Session,
        group: &mut Vec<Task>,
    ) -> io::Result<()> {
        let waiting: Vec<u32> = {
            let mut t = lock(&s.tasks);
            if t.r2t_wait.is_empty() {
                return Ok(());
            }
            t.r2t_wait.drain(..).collect()
        };
        for itt in waiting {
            self.advance(conn, s, itt, group)?;
        }
        Ok(())
    }

    fn data_out(&self, conn: &Conn, s: &Session, p: Pdu, group: &mut Vec<Task>) -> io::Result<()> {
        let h = p.bhs;
        let itt = h.itt();
        let ttt = h.u32_at(20);
        let datasn = h.u32_at(36);
        let off = h.u32_at(40);
        let len = p.data.len() as u32;
        let mut t = lock(&s.tasks);
        let Some(pd) = t.pending.get_mut(&itt) else {
            let known = t.aborted.contains(&itt);
            drop(t);
            return if known {
                Ok(())
            } else {
                conn.reject(reject::INVALID_FIELD, &h)
            };
        };
        let got = pd.task.data.len() as u32;
        let (end, want_sn) = if ttt == NO_TAG {
            if pd.r2t.is_some() || got >= pd.unsol_end {
                drop(t);
                return self.bad_data_out(conn, s, &h, TOO_MUCH_WRITE_DATA);
            }
            (pd.unsol_end, pd.unsol_datasn)
        } else {
            match pd.r2t {
                Some((t0, end, sn)) if t0 == ttt => (end, sn),
                _ => {
                    drop(t);
                    return self.bad_data_out(conn, s, &h, DATA_OFFSET_ERROR);
                }
            }
        };
        if off != got || datasn != want_sn {
            drop(t);
            return self.bad_data_out(conn, s, &h, DATA_OFFSET_ERROR);
        }
        if u64::from(off) + u64::from(len) > u64::from(end) {
            drop(t);
            return self.bad_data_out(conn, s, &h, TOO_MUCH_WRITE_DATA);
        }
        pd.task.data.extend_from_slice(&p.data);
        let now = got + len;
        if ttt == NO_TAG {
            pd.unsol_datasn += 1;
        } else if let Some(r) = &mut pd.r2t {
            r.2 += 1;
            if now == end {
                pd.r2t = None;
            }
        }
        let moved = now == end;
        drop(t);
        if moved {
            self.advance(conn, s, itt, group)?;
        }
        Ok(())
    }

    /// A Data-Out that does not fit its R2T or burst: rejected, and its command ends.
    fn bad_data_out(&self, conn: &Conn, s: &Session, h: &Bhs, code: (u8, u8)) -> io::Result<()> {
        conn.reject(reject::INVALID_FIELD, h)?;
        self.fail_write(conn, s, h.itt(), code)
    }

    /// Ends a write waiting for data with CHECK CONDITION, ABORTED COMMAND.
    fn fail_write(&self, conn: &Conn, s: &Session, itt: u32, code: (u8, u8)) -> io::Result<()> {
        let mut t = lock(&s.tasks);
        let Some(pd) = t.pending.remove(&itt) else {
            return Ok(());
        };
        if pd.holds {
            t.solicited_bytes = t.solicited_bytes.saturating_sub(pd.task.edtl.into());
        }
        t.remember_aborted(itt);
        drop(t);
        let task = Task {
            data: Vec::new(),
            use_len: 0,
            ..pd.task
        };
        send_response(
            conn,
            &task,
            sense_response(key::ABORTED_COMMAND, code),
            pd.r2tsn,
        )
    }
}

/// The most commands a worker takes at once (and the reader collects before handing them
/// over): they run as one batch and their responses go out with one write.
const BATCH: usize = 64;
/// The most bytes of data (in and out) one worker's batch moves; a single larger command still
/// goes alone. Small: a batch's responses go out when all of it is done, so large transfers
/// are better answered one by one (the initiator sends its next command sooner), while 64
/// commands of 4 KiB still make one batch.
const BATCH_BYTES: u64 = 256 << 10;

/// Queues `group` for the workers (emptying it), waiting while the session holds too much
/// write data (one command at a time within the budget, a command alone always fits), and
/// wakes one worker for it.
fn queue_all(s: &Session, group: &mut Vec<Task>) {
    if group.is_empty() {
        return;
    }
    let mut t = lock(&s.tasks);
    let mut queued = 0usize;
    for task in group.drain(..) {
        let n = task.data.len() as u64;
        while !t.closed && t.queued_bytes > 0 && t.queued_bytes + n > BUDGET {
            if queued > 0 && t.idle_workers > 0 {
                queued = 0;
                s.ready.notify_one();
            }
            t = s.wait_change(t);
        }
        t.queued_bytes += n;
        t.queue.push_back(task);
        queued += 1;
    }
    let wake = queued > 0 && t.idle_workers > 0;
    drop(t);
    if wake {
        s.ready.notify_one();
    }
}

/// Whether `buf` starts with a whole PDU (or with a header this connection refuses, which the
/// next read ends at once).
fn whole_pdu_in(buf: &[u8], digests: Digests, recv_max: u32) -> bool {
    let Some(h) = buf.get(..pdu::BHS_LEN) else {
        return false;
    };
    let data = (u32::from(h[5]) << 16) | (u32::from(h[6]) << 8) | u32::from(h[7]);
    if data > recv_max {
        return true;
    }
    let data = data as usize;
    let mut total = pdu::BHS_LEN + usize::from(h[4]) * 4 + data + pdu::pad(data);
    if digests.header {
        total += 4;
    }
    if digests.data && data > 0 {
        total += 4;
    }
    buf.len() >= total
}

/// The bytes a task moves (its Data-Out, or the Data-In it may get).
fn task_bytes(t: &Task) -> u64 {
    (t.data.len() as u64).max(u64::from(t.edtl))
}

/// A worker: takes every command queued (up to [`BATCH`]), runs them as one batch
/// ([`Lun::execute_batch`]) and sends their responses with one write.
fn worker(conn: &Conn, s: &Session) {
    loop {
        let tasks: Vec<Task> = {
            let mut t = lock(&s.tasks);
            loop {
                if !t.queue.is_empty() {
                    let mut n = 0;
                    let mut bytes = 0;
                    for task in t.queue.iter().take(BATCH) {
                        let b = task_bytes(task);
                        if n > 0 && bytes + b > BATCH_BYTES {
                            break;
                        }
                        n += 1;
                        bytes += b;
                    }
                    let batch: Vec<Task> = t.queue.drain(..n).collect();
                    for task in &batch {
                        t.running.insert(task.itt, false);
                    }
                    if !t.queue.is_empty() && t.idle_workers > 0 {
                        s.ready.notify_one();
                    }
                    break batch;
                }
                if t.closed {
                    return;
                }
                t.idle_workers += 1;
                t = s.ready.wait(t).unwrap_or_else(|p| p.into_inner());
                t.idle_workers -= 1;
            }
        };
        let cmds: Vec<Command<'_>> = tasks
            .iter()
            .filter(|t| t.lun == 0)
            .map(|t| Command {
                cdb: &t.cdb,
                data_out: &t.data[..t.use_len],
            })
            .collect();
        let mut lun0 = s.lun.execute_batch(&s.nexus, &cmds).into_iter();
        drop(cmds);
        let done: Vec<(Task, ScsiResponse)> = tasks
            .into_iter()
            .map(|task| {
                let resp = if task.lun == 0 {
                    lun0.next().expect("a response per command")
                } else {
                    other_lun(s, &task.cdb)
                };
                (task, resp)
            })
            .collect();
        let (keep, wake): (Vec<bool>, bool) = {
            let mut t = lock(&s.tasks);
            let keep = done
                .iter()
                .map(|(task, resp)| {
                    t.queued_bytes = t.queued_bytes.saturating_sub(task.data.len() as u64);
                    let aborted = t.running.remove(&task.itt).unwrap_or(true);
                    !aborted && resp.status != sense::TASK_ABORTED
                })
                .collect();
            (keep, t.waiting > 0)
        };
        if wake {
            s.cv.notify_all();
        }
        let lens: Vec<[u8; 2]> = done
            .iter()
            .map(|(_, r)| (r.sense.len() as u16).to_be_bytes())
            .collect();
        let mut pdus = Vec::new();
        for (i, (task, resp)) in done.iter().enumerate() {
            if keep[i] {
                response_pdus(&conn.params, task, resp, &lens[i], 0, &mut pdus);
            }
        }
        if !pdus.is_empty() && conn.send(&pdus).is_err() {
            // The initiator is gone: what it queued is dropped.
            let mut t = lock(&s.tasks);
            t.queue.clear();
            t.queued_bytes = 0;
            drop(t);
            s.cv.notify_all();
        }
    }
}

/// A command for a LUN other than 0: REPORT LUNS is the target's, INQUIRY says no device is
/// there, the rest fail with LOGICAL UNIT NOT SUPPORTED.
fn other_lun(s: &Session, cdb: &[u8]) -> ScsiResponse {
    match cdb.first() {
        Some(&crate::scsi::op::REPORT_LUNS) => s.lun.execute(&s.nexus, cdb, &[]),
        Some(&crate::scsi::op::INQUIRY) if cdb.len() >= 5 => {
            let alloc = usize::from(u16::from_be_bytes([cdb[3], cdb[4]]));
            let mut d = vec![0x7f, 0, 6, 2, 31, 0, 0, 0];
            d.extend_from_slice(b"VSTOR   vstor disk      0001");
            d.truncate(alloc);
            ScsiResponse::good(d)
        }
        _ => sense_response(key::ILLEGAL_REQUEST, asc::LUN_NOT_SUPPORTED),
    }
}

/// Sends a command's Data-In and status: the status in the last Data-In PDU when it is GOOD,
/// a SCSI Response otherwise (with the sense data). `r2ts` counts the R2Ts sent for it.
fn send_response(conn: &Conn, task: &Task, resp: ScsiResponse, r2ts: u32) -> io::Result<()> {
    let sense_len = (resp.sense.len() as u16).to_be_bytes();
    let mut pdus = Vec::new();
    response_pdus(&conn.params, task, &resp, &sense_len, r2ts, &mut pdus);
    conn.send(&pdus)
}

/// A response's PDUs, ready for [`Conn::send`].
type Pdus<'a> = Vec<OutPdu<'a>>;

/// Appends a command's Data-In and status PDUs to `pdus` (see [`send_response`]);
/// `sense_len` is the sense data's length as the SCSI Response carries it.
fn response_pdus<'a>(
    params: &Params,
    task: &Task,
    resp: &'a ScsiResponse,
    sense_len: &'a [u8; 2],
    r2ts: u32,
    pdus: &mut Pdus<'a>,
) {
    let edtl = task.edtl as usize;
    let write = task.write;
    let moved = if write { task.want } else { resp.data.len() };
    let (resid_flag, residual) = match moved.cmp(&edtl) {
        std::cmp::Ordering::Greater => (0x04u8, moved - edtl),
        std::cmp::Ordering::Less => (0x02u8, edtl - moved),
        std::cmp::Ordering::Equal => (0, 0),
    };
    let data = if write {
        &[][..]
    } else {
        &resp.data[..resp.data.len().min(edtl)]
    };
    let send_max = params.send_max.max(512) as usize;
    let burst = params.max_burst.max(512) as usize;
    let collapse = resp.status == sense::GOOD && !data.is_empty();
    let mut off = 0usize;
    let mut in_burst = 0usize;
    let mut datasn = 0u32;
    while off < data.len() {
        let n = min3(send_max, data.len() - off, burst - in_burst);
        let last = off + n == data.len();
        in_burst += n;
        let mut h = Bhs::new(op::DATA_IN);
        let mut f = 0u8;
        if last || in_burst == burst {
            f |= 0x80;
            in_burst = 0;
        }
        let status = last && collapse;
        if status {
            f |= 0x01 | resid_flag;
            h.0[3] = resp.status;
            h.set_u32(44, residual as u32);
        }
        h.0[1] = f;
        h.set_u32(16, task.itt);
        h.set_u32(20, NO_TAG);
        h.set_u32(36, datasn);
        h.set_u32(40, off as u32);
        pdus.push(OutPdu::new(h, &data[off..off + n], status));
        datasn += 1;
        off += n;
    }
    if !collapse {
        let mut h = Bhs::new(op::SCSI_RESP);
        h.0[1] = 0x80 | resid_flag;
        h.0[2] = 0;
        h.0[3] = resp.status;
        h.set_u32(16, task.itt);
        h.set_u32(36, datasn + r2ts);
        h.set_u32(44, residual as u32);
        let data: [&[u8]; 2] = if resp.status != sense::GOOD && !resp.sense.is_empty() {
            [sense_len, &resp.sense]
        } else {
            [&[], &[]]
        };
        pdus.push(OutPdu {
            bhs: h,
            data,
            status: true,
        });
    }
}
