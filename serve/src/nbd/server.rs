//! The NBD server: listeners, the handshake, and transmission.
//!
//! **Threads and depth.** Each connection has a reader thread (the handshake, then it parses
//! requests and reads write payloads) and a few worker threads. A worker takes every request
//! waiting (up to [`BATCH`]) and submits them to the export's stack as one batch, so a client
//! that keeps 32 requests in flight gives the file backend a batch of 32 for io_uring; while
//! one worker waits for its batch, the next takes the requests that arrive meanwhile. Replies
//! go out in completion order (the protocol allows any order), each batch's replies under one
//! lock of the connection's socket and one write. Nothing on this path is shared between
//! connections except the stack itself.
//!
//! **Ordering.** FLUSH is a barrier inside its batch: it starts after every earlier request of
//! the batch completed and it flushes the whole stack, so every write whose reply was sent
//! before the FLUSH arrived is durable when FLUSH is answered. A FUA write is answered after a
//! flush that follows it in its batch. All connections to an export share one stack (one
//! cache), so a FLUSH on one covers writes completed on every other: the server offers
//! `CAN_MULTI_CONN`.
//!
//! **Bounds.** A request longer than [`MAX_PAYLOAD`] is refused (a write that long closes the
//! connection after the error, since its payload is not read); each connection keeps at most
//! [`MAX_IN_FLIGHT_BYTES`] of payload buffered; the handshake must finish within the
//! configured time; connections beyond the configured maximum are closed at once.

use super::proto::{self, cflag, chunk, cmd, err, info, opt, rep, tflag, MAX_OPTION, MAX_PAYLOAD};
use super::tls::{self, TlsCreds};
use crate::export::{Connection, Export};
use crate::registry::Registry;
use std::collections::VecDeque;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vstor_core::{AlignedBuf, BlockDevice, ErrorKind, OpKind, Request};

/// How long a connection being closed (shutdown, export removed) has to take the replies of
/// the requests in flight before its socket is closed both ways: a client that reads no
/// replies cannot hold a worker, and so the shutdown, for longer.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The most requests a worker submits as one batch.
pub const BATCH: usize = 64;
/// The most buffer bytes one batch takes (a single larger request still goes alone).
pub const BATCH_BYTES: u64 = 16 << 20;
/// The most payload bytes a connection keeps buffered (requests beyond wait to be read).
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// In a structured reply to a READ (without DF), every run of at least this many zero bytes
/// (in whole 4 KiB granules) is sent as an `OFFSET_HOLE` chunk instead of data. Unallocated
/// ranges read as zeroes, so they go out as holes; so do zeroes a guest wrote. The zeroes are
/// found in the data read rather than asked of the stack's allocation map first, because for
/// a raw file on some file systems (tmpfs) SEEK_HOLE walks every page after the offset: a
/// 1 MiB read of a mostly written 1 GiB file took 9 ms that way.
pub const HOLE_READ_MIN: u32 = 64 << 10;
/// The granule in which zero runs are looked for.
const HOLE_GRANULE: usize = 4 << 10;

/// How the NBD server behaves.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Worker threads per connection.
    pub workers: usize,
    /// The most connections at once (beyond, new ones are closed at once).
    pub max_connections: usize,
    /// A client that has not finished the handshake in this time is disconnected.
    pub handshake_timeout: Duration,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            workers: 4,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A connected socket of either family.
pub enum Sock {
    /// A Unix socket.
    Unix(UnixStream),
    /// A TCP socket.
    Tcp(TcpStream),
}

impl Sock {
    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }
    /// Ends the reading side: the reader sees the end, the requests in flight finish and
    /// are answered, then the connection closes.
    fn shutdown(&self) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(Shutdown::Read),
            Sock::Tcp(s) => s.shutdown(Shutdown::Read),
        };
    }

    /// [`shutdown`](Sock::shutdown) now, and both ways after [`CLOSE_GRACE`].
    fn close_gracefully(&self) {
        self.shutdown();
        if let Ok(s) = self.try_clone() {
            let _ = std::thread::Builder::new()
                .name("nbd-close".into())
                .stack_size(64 << 10)
                .spawn(move || {
                    std::thread::sleep(CLOSE_GRACE);
                    s.shutdown_both();
                });
        }
    }

    pub(crate) fn shutdown_both(&self) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_read_timeout(t),
            Sock::Tcp(s) => s.set_read_timeout(t),
        }
    }
    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_write_timeout(t),
            Sock::Tcp(s) => s.set_write_timeout(t),
        }
    }
    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_nonblocking(on),
            Sock::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Unix(s) => s.as_fd(),
            Sock::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(buf),
            Sock::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(buf),
            Sock::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The NBD server of a daemon: serves every export of the registry on its listeners.
pub struct NbdServer {
    registry: Arc<Registry>,
    config: NbdConfig,
    connections: AtomicUsize,
    stopping: AtomicBool,
    /// Every live connection's socket, to close them at shutdown, and the time by which its
    /// handshake must be done (None once it is): the reaper closes a connection past it, however
    /// slowly the client trickles bytes.
    socks: Mutex<Vec<(u64, Sock, Option<Instant>)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("connections", &self.connections.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A listening socket of either family.
pub enum Listener {
    /// A Unix socket.
    Unix(UnixListener),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl NbdServer {
    /// A server of `registry`'s exports.
    pub fn new(registry: Arc<Registry>, config: NbdConfig) -> Arc<Self> {
        let me = Arc::new(NbdServer {
            registry,
            config,
            connections: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            socks: Mutex::new(Vec::new()),
            next_id: Default::default(),
        });
        let weak = Arc::downgrade(&me);
        let tick = (me.config.handshake_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        let _ = std::thread::Builder::new()
            .name("nbd-reaper".into())
            .spawn(move || loop {
                std::thread::sleep(tick);
                let Some(me) = weak.upgrade() else { return };
                if me.stopping.load(Ordering::Acquire) {
                    return;
                }
                me.reap(Instant::now());
            });
        me
    }

    /// Closes the connections whose handshake is past its deadline.
    fn reap(&self, now: Instant) {
        for (_, s, deadline) in self
            .socks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            if deadline.is_some_and(|d| d <= now) {
                s.shutdown_both();
                *deadline = None;
            }
        }
    }

    /// The handshake of connection `id` is done: no deadline any more.
    fn handshake_done(&self, id: u64) {
        for (i, _, deadline) in self
            .socks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            if *i == id {
                *deadline = None;
            }
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Accepts connections on `listener` until [`stop`](NbdServer::stop), each on its own
    /// threads. With `tls`, the listener is FORCEDTLS: clients must start TLS (STARTTLS)
    /// before any other option (see [`tls`](super::tls)).
    pub fn listen(
        self: &Arc<Self>,
        listener: Listener,
        tls: Option<Arc<TlsCreds>>,
    ) -> io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || loop {
                let sock = match &listener {
                    Listener::Unix(l) => l.accept().map(|(s, _)| Sock::Unix(s)),
                    Listener::Tcp(l) => l.accept().map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        Sock::Tcp(s)
                    }),
                };
                if me.stopping.load(Ordering::Acquire) {
                    return;
                }
                match sock {
                    Ok(s) => me.spawn_connection(s, tls.clone()),
                    Err(e) => {
                        // EMFILE and the like: wait a little rather than spin.
                        eprintln!("vstor serve: nbd: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
    }

    /// Stops accepting (the accept threads end at their next connection) and closes every
    /// connection; requests in flight finish first.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for (_, s, _) in self.socks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            s.close_gracefully();
        }
    }

    fn spawn_connection(self: &Arc<Self>, sock: Sock, tls: Option<Arc<TlsCreds>>) {
        if self.connections.fetch_add(1, Ordering::AcqRel) >= self.config.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            sock.shutdown_both();
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = sock.try_clone() {
            self.socks.lock().unwrap_or_else(|p| p.into_inner()).push((
                id,
                c,
                Some(Instant::now() + self.config.handshake_timeout),
            ));
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .stack_size(256 << 10)
            .spawn(move || {
                if let Err(e) = me.handle(sock, tls.as_deref(), id) {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                    ) {
                        eprintln!("vstor serve: nbd: connection closed: {e}");
                    }
                }
                me.socks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|(i, _, _)| *i != id);
                me.connections.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            self.connections.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn handle(self: &Arc<Self>, sock: Sock, tls: Option<&TlsCreds>, id: u64) -> io::Result<()> {
        sock.set_read_timeout(Some(self.config.handshake_timeout))?;
        let mut c = Conn::new(sock)?;
        let Some(session) = self.handshake(&mut c, tls)? else {
            return Ok(());
        };
        self.handshake_done(id);
        let Conn { sock, r, w } = c;
        // What the client sent after GO is already in the handshake's buffer: read it first.
        let pending = io::Cursor::new(r.buffer().to_vec());
        let r = BufReader::with_capacity(
            256 << 10,
            Rd {
                pending,
                sock: r.into_inner(),
            },
        );
        sock.set_read_timeout(None)?;
        let closer = sock.try_clone()?;
        let Some(conn) = session.export.connect(move || closer.close_gracefully()) else {
            return Ok(());
        };
        transmission(r, w, conn, session, self.config.workers.max(1))
    }

    /// The option haggling. Returns the session to serve, or None when the client ended it.
    /// With `tls`, every option but STARTTLS and ABORT is refused until TLS is on; after
    /// STARTTLS, `c` is the connection inside TLS.
    fn handshake(&self, c: &mut Conn, tls: Option<&TlsCreds>) -> io::Result<Option<Session>> {
        let mut tls_pending = tls.is_some();
        let w = &mut c.w;
        let r = &mut c.r;
        w.write_all(&proto::NBDMAGIC.to_be_bytes())?;
        w.write_all(&proto::IHAVEOPT.to_be_bytes())?;
        w.write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())?;
        w.flush()?;
        let mut cf = [0u8; 4];
        r.read_exact(&mut cf)?;
        let client_flags = u32::from_be_bytes(cf);
        if client_flags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unknown client flags",
            ));
        }
        let no_zeroes = client_flags & proto::CLIENT_NO_ZEROES != 0;
        let mut structured = false;
        // Meta contexts selected, and the export they were selected for.
        let mut meta: (String, Vec<u32>) = (String::new(), Vec::new());
        loop {
            let (r, w) = (&mut c.r, &mut c.w);
            let mut h = [0u8; 16];
            r.read_exact(&mut h)?;
            let (option, len) = proto::parse_option_header(&h)
                .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m.0))?;
            if len > MAX_OPTION {
                // Answer without reading it, then end: the stream cannot be trusted.
                reply(w, option, rep::ERR_TOO_BIG, b"option too long")?;
                return Ok(None);
            }
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data)?;
            if tls_pending && !matches!(option, opt::STARTTLS | opt::ABORT) {
                if option == opt::EXPORT_NAME {
                    // No error reply to this option: the connection ends.
                    return Ok(None);
                }
                reply(
                    w,
                    option,
                    rep::ERR_TLS_REQD,
                    b"TLS is required: start it first",
                )?;
                continue;
            }
            match option {
                opt::EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    // No error path in this option: an unknown name closes the connection.
                    let Some(export) = self.lookup(&name) else {
                        return Ok(None);
                    };
                    w.write_all(&export.device().capacity().to_be_bytes())?;
                    w.write_all(&transmission_flags(&export).to_be_bytes())?;
                    if !no_zeroes {
                        w.write_all(&[0u8; 124])?;
                    }
                    w.flush()?;
                    return Ok(Some(Session {
                        export,
                        structured,
                        contexts: Vec::new(),
                    }));
                }
                opt::ABORT => {
                    let _ = reply(w, option, rep::ACK, &[]);
                    return Ok(None);
                }
                opt::LIST => {
                    if !data.is_empty() {
                        reply(w, option, rep::ERR_INVALID, b"LIST takes no data")?;
                        continue;
                    }
                    for name in self.registry.names() {
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        send_reply(w, option, rep::SERVER, &d)?;
                    }
                    reply(w, option, rep::ACK, &[])?;
                }
                opt::STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        reply(
                            w,
                            option,
                            rep::ERR_INVALID,
                            b"STRUCTURED_REPLY takes no data",
                        )?;
                    } else {
                        structured = true;
                        reply(w, option, rep::ACK, &[])?;
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    let set = option == opt::SET_META_CONTEXT;
                    let m = match proto::parse_meta(&data) {
                        Ok(m) => m,
                        Err(e) => {
                            reply(w, option, rep::ERR_INVALID, e.0.as_bytes())?;
                            continue;
                        }
                    };
                    if !structured {
                        reply(
                            w,
                            option,
                            rep::ERR_INVALID,
                            b"meta contexts need structured replies first",
                        )?;
                        continue;
                    }
                    if self.lookup(&m.name).is_none() {
                        reply(w, option, rep::ERR_UNKNOWN, b"no such export")?;
                        continue;
                    }
                    let mut found: Vec<(&str, u32)> = Vec::new();
                    if m.queries.is_empty() && !set {
                        found.extend(proto::CONTEXTS);
                    }
                    for q in &m.queries {
                        for c in proto::match_contexts(q, !set) {
                            if !found.contains(&c) {
                                found.push(c);
                            }
                        }
                    }
                    for (name, id) in &found {
                        let mut d = id.to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        send_reply(w, option, rep::META_CONTEXT, &d)?;
                    }
                    if set {
                        meta = (m.name.clone(), found.iter().map(|c| c.1).collect());
                    }
                    reply(w, option, rep::ACK, &[])?;
                }
                opt::INFO | opt::GO => {
                    let req = match proto::parse_info(&data) {
                        Ok(i) => i,
                        Err(e) => {
                            reply(w, option, rep::ERR_INVALID, e.0.as_bytes())?;
                            continue;
                        }
                    };
                    let Some(export) = self.lookup(&req.name) else {
                        let msg = format!("no export named '{}'", req.name.escape_debug());
                        reply(w, option, rep::ERR_UNKNOWN, msg.as_bytes())?;
                        continue;
                    };
                    send_info(w, option, &export, &req.requests)?;
                    reply(w, option, rep::ACK, &[])?;
                    if option == opt::GO {
                        let contexts = if meta.0 == req.name {
                            meta.1.clone()
                        } else {
                            Vec::new()
                        };
                        return Ok(Some(Session {
                            export,
                            structured,
                            contexts,
                        }));
                    }
                }
                opt::STARTTLS => match tls {
                    None => reply(
                        w,
                        option,
                        rep::ERR_POLICY,
                        b"this listener does not offer TLS",
                    )?,
                    Some(_) if !data.is_empty() => {
                        reply(w, option, rep::ERR_INVALID, b"STARTTLS takes no data")?
                    }
                    Some(_) if !tls_pending => {
                        reply(w, option, rep::ERR_INVALID, b"TLS is already on")?
                    }
                    Some(creds) => {
                        reply(w, option, rep::ACK, &[])?;
                        let pre = r.buffer().to_vec();
                        let sock = c.sock.try_clone()?;
                        let inner = tls::start(creds, sock, &pre, self.config.handshake_timeout)?;
                        inner.set_read_timeout(Some(self.config.handshake_timeout))?;
                        *c = Conn::new(inner)?;
                        tls_pending = false;
                    }
                },
                _ => {
                    reply(w, option, rep::ERR_UNSUP, b"option not supported")?;
                }
            }
        }
    }

    /// An export by name; the empty name is the only export, when there is exactly one.
    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() {
            let all = self.registry.exports();
            return if all.len() == 1 {
                all.into_iter().next()
            } else {
                None
            };
        }
        self.registry.get(name).ok()
    }
}

fn transmission_flags(e: &Export) -> u16 {
    let mut f = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_DF
        | tflag::CAN_MULTI_CONN
        | tflag::SEND_CACHE;
    if e.read_only() {
        f |= tflag::READ_ONLY;
    } else {
        f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
    }
    f
}

fn send_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&proto::option_reply(option, kind, data.len() as u32))?;
    w.write_all(data)
}

/// Sends one option reply and flushes.
fn reply(w: &mut BufWriter<Sock>, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    send_reply(w, option, kind, data)?;
    w.flush()
}

fn send_info(w: &mut impl Write, option: u32, e: &Export, asked: &[u16]) -> io::Result<()> {
    let i = e.device().info();
    let mut d = info::EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&i.capacity.to_be_bytes());
    d.extend_from_slice(&transmission_flags(e).to_be_bytes());
    send_reply(w, option, rep::INFO, &d)?;
    // Block sizes are always sent: the stack takes whole logical sectors only.
    let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&i.logical_sector_size.to_be_bytes());
    d.extend_from_slice(&i.physical_sector_size.max(4096).to_be_bytes());
    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    send_reply(w, option, rep::INFO, &d)?;
    if asked.contains(&info::NAME) {
        let mut d = info::NAME.to_be_bytes().to_vec();
        d.extend_from_slice(e.name().as_bytes());
        send_reply(w, option, rep::INFO, &d)?;
    }
    if asked.contains(&info::DESCRIPTION) {
        let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
        let desc = e.device().describe();
        d.extend_from_slice(&desc.as_bytes()[..desc.len().min(4096)]);
        send_reply(w, option, rep::INFO, &d)?;
    }
    Ok(())
}

/// A connection's socket with its buffered reader and writer (each on a clone of it).
struct Conn {
    sock: Sock,
    r: BufReader<Sock>,
    w: BufWriter<Sock>,
}

impl Conn {
    fn new(sock: Sock) -> io::Result<Conn> {
        Ok(Conn {
            w: BufWriter::with_capacity(64 << 10, sock.try_clone()?),
            // Small while haggling: a connection that never gets past the handshake pins
            // little memory. Transmission reads through a larger buffer ([`Rd`]).
            r: BufReader::with_capacity(4 << 10, sock.try_clone()?),
            sock,
        })
    }
}

/// The reading side in transmission: bytes read ahead during the handshake, then the socket.
struct Rd {
    pending: io::Cursor<Vec<u8>>,
    sock: Sock,
}

impl Read for Rd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if (self.pending.position() as usize) < self.pending.get_ref().len() {
            return self.pending.read(buf);
        }
        self.sock.read(buf)
    }
}

/// What the handshake settled.
struct Session {
    export: Arc<Export>,
    structured: bool,
    contexts: Vec<u32>,
}

/// One request waiting for a worker.
struct Job {
    h: proto::RequestHeader,
    /// The payload of a WRITE.
    data: Vec<u8>,
}

/// The requests of a connection between its reader and its workers.
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    room: Condvar,
}

struct QueueState {
    jobs: VecDeque<Job>,
    bytes: u64,
    closed: bool,
    /// The client is gone: what is queued is dropped, nothing more is queued.
    abandoned: bool,
}

impl Queue {
    /// Queues `jobs` for the workers, waiting while the connection holds too many payload
    /// bytes already.
    fn push_all(&self, jobs: Vec<Job>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut queued = 0usize;
        for job in jobs {
            let n = job_bytes(&job.h);
            // One request at a time within the budget (a request alone always fits), waking
            // the workers for what is queued before waiting for room.
            while !s.abandoned && s.bytes > 0 && s.bytes + n > MAX_IN_FLIGHT_BYTES {
                if queued > 0 {
                    queued = 0;
                    self.ready.notify_all();
                }
                s = self.room.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.abandoned {
                return;
            }
            s.bytes += n;
            s.jobs.push_back(job);
            queued += 1;
        }
        drop(s);
        match queued {
            0 => {}
            n if n > BATCH => self.ready.notify_all(),
            _ => self.ready.notify_one(),
        }
    }

    /// Every job waiting, up to `BATCH`; empty once closed and drained.
    fn take(&self) -> Vec<Job> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.jobs.is_empty() && !s.closed {
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        // Up to BATCH requests and BATCH_BYTES of buffers (at least one request).
        let mut n = 0;
        let mut bytes = 0;
        for j in s.jobs.iter().take(BATCH) {
            let b = job_bytes(&j.h);
            if n > 0 && bytes + b > BATCH_BYTES {
                break;
            }
            n += 1;
            bytes += b;
        }
        s.jobs.drain(..n).collect()
    }

    fn release(&self, jobs: &[Job]) {
        let n: u64 = jobs.iter().map(|j| job_bytes(&j.h)).sum();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.bytes -= n;
        drop(s);
        self.room.notify_all();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.ready.notify_all();
    }

    /// The client is gone (it closed without NBD_CMD_DISC, or its replies cannot be sent): the
    /// requests still queued are dropped rather than run for nobody, and the reader stops
    /// waiting for room. Batches already running finish.
    fn abandon(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let dropped: u64 = s.jobs.iter().map(|j| job_bytes(&j.h)).sum();
        s.jobs.clear();
        s.bytes -= dropped;
        s.abandoned = true;
        s.closed = true;
        drop(s);
        self.ready.notify_all();
        self.room.notify_all();
    }
}

/// The buffer bytes a request holds while it waits and runs.
fn job_bytes(h: &proto::RequestHeader) -> u64 {
    match h.kind {
        cmd::READ | cmd::WRITE => u64::from(h.len),
        _ => 0,
    }
}

/// Serves requests until the client disconnects or the export goes away.
fn transmission(
    mut r: BufReader<Rd>,
    w: BufWriter<Sock>,
    conn: Connection,
    session: Session,
    workers: usize,
) -> io::Result<()> {
    let export = conn.export().clone();
    let queue = Arc::new(Queue {
        state: Mutex::new(QueueState {
            jobs: VecDeque::new(),
            bytes: 0,
            closed: false,
            abandoned: false,
        }),
        ready: Condvar::new(),
        room: Condvar::new(),
    });
    let shared = Arc::new(Worker {
        export,
        out: Mutex::new(w),
        structured: session.structured,
        contexts: session.contexts,
    });
    let mut threads = Vec::new();
    for _ in 0..workers {
        let (q, s) = (queue.clone(), shared.clone());
        threads.push(
            std::thread::Builder::new()
                .name("nbd-worker".into())
                .stack_size(1 << 20)
                .spawn(move || {
                    let mut pool = Vec::new();
                    loop {
                        let jobs = q.take();
                        if jobs.is_empty() {
                            return;
                        }
                        let ok = s.run(&jobs, &mut pool);
                        q.release(&jobs);
                        if ok.is_err() {
                            // The client is gone: drop what it queued, and let the reader
                            // see it too.
                            q.abandon();
                            s.out
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_ref()
                                .shutdown_both();
                        }
                    }
                })?,
        );
    }
    let result = read_requests(&mut r, &queue, &shared);
    queue.close();
    for t in threads {
        let _ = t.join();
    }
    drop(conn);
    result
}

/// Whether `buf` starts with a whole request (its header and, for a write, its payload).
fn whole_request_in(buf: &[u8]) -> bool {
    let Some(hb) = buf.get(..proto::REQUEST_HEADER) else {
        return false;
    };
    let hb: &[u8; proto::REQUEST_HEADER] = hb.try_into().expect("header length");
    match proto::parse_request(hb) {
        Ok(h) if h.kind == cmd::WRITE => {
            h.len > MAX_PAYLOAD || buf.len() >= proto::REQUEST_HEADER + h.len as usize
        }
        _ => true,
    }
}

/// The reader: parses requests and hands them to the workers, until DISC or the end. Every
/// request already received (whole in the read buffer) goes to the workers together, so one
/// worker submits them as one batch: the client's queue depth reaches the stack.
fn read_requests(r: &mut BufReader<Rd>, queue: &Queue, s: &Worker) -> io::Result<()> {
    let mut group: Vec<Job> = Vec::new();
    let result = loop {
        let group_bytes: u64 = group.iter().map(|j| job_bytes(&j.h)).sum();
        if !group.is_empty()
            && (group.len() >= BATCH || group_bytes >= BATCH_BYTES || !whole_request_in(r.buffer()))
        {
            queue.push_all(std::mem::take(&mut group));
        }
        let mut hb = [0u8; proto::REQUEST_HEADER];
        match r.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let h = match proto::parse_request(&hb) {
            Ok(h) => h,
            Err(m) => break Err(io::Error::new(io::ErrorKind::InvalidData, m.0)),
        };
        match h.kind {
            cmd::DISC => break Ok(()),
            cmd::WRITE => {
                if h.len > MAX_PAYLOAD {
                    // Its payload is not read: answer, then end the connection.
                    queue.push_all(std::mem::take(&mut group));
                    s.send_error(h.cookie, err::EOVERFLOW, "write longer than 32 MiB")?;
                    break Ok(());
                }
                // Read without zero-filling first: the payload overwrites it all.
                let mut data = Vec::with_capacity(h.len as usize);
                (&mut *r).take(u64::from(h.len)).read_to_end(&mut data)?;
                if data.len() != h.len as usize {
                    // The client left in the middle of the payload: nothing of it is written.
                    break Ok(());
                }
                group.push(Job { h, data });
            }
            _ => group.push(Job {
                h,
                data: Vec::new(),
            }),
        }
    };
    // What was received before the end is still served: after DISC, or the daemon closing the
    // connection (shutdown, export removed), or a client that only half-closed and still reads.
    // A client that is gone altogether makes the first reply fail, and the workers then drop
    // the rest (Queue::abandon).
    queue.push_all(group);
    result
}

/// What the workers of a connection share.
struct Worker {
    export: Arc<Export>,
    out: Mutex<BufWriter<Sock>>,
    structured: bool,
    contexts: Vec<u32>,
}

/// A read's buffer: page-aligned (O_DIRECT reads land in it without a bounce copy), taken from
/// and given back to its worker's pool, so a stream of reads does not map and fault fresh
/// pages each time.
struct ReadBuf {
    buf: AlignedBuf,
    len: usize,
}

impl ReadBuf {
    /// The most buffers a worker keeps.
    const POOL: usize = 16;

    fn take(pool: &mut Vec<AlignedBuf>, len: usize) -> ReadBuf {
        let buf = match pool.iter().position(|b| b.len() >= len) {
            Some(i) => pool.swap_remove(i),
            None => AlignedBuf::new(len.next_multiple_of(4096).max(4096)),
        };
        ReadBuf { buf, len }
    }

    fn give_back(self, pool: &mut Vec<AlignedBuf>) {
        if pool.len() < Self::POOL {
            pool.push(self.buf);
        }
    }

    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

/// The pieces of a read: (offset in the read, length, is a hole).
type Pieces = Vec<(u64, u64, bool)>;

/// The outcome of one job, ready to be sent.
enum Outcome {
    /// Success with no data.
    Ok,
    /// An error number and a message.
    Err(u32, String),
    /// A read: the data, and where holes are (offset in the buffer, length) when sent as
    /// structured chunks.
    Read(ReadBuf, Pieces),
    /// Block status chunks, one per context: (context id, descriptors).
    Status(Vec<(u32, Vec<(u32, u32)>)>),
}

fn errno_of(e: &vstor_core::Error) -> u32 {
    match e.kind() {
        ErrorKind::ReadOnly => err::EPERM,
        ErrorKind::NoSpace => err::ENOSPC,
        ErrorKind::InvalidInput | ErrorKind::OutOfRange => err::EINVAL,
        ErrorKind::Unsupported => err::ENOTSUP,
        ErrorKind::Cancelled | ErrorKind::Unavailable => err::EIO,
        _ => err::EIO,
    }
}

/// The command flags each command may carry.
fn allowed_flags(kind: u16) -> u16 {
    match kind {
        cmd::READ => cflag::DF,
        cmd::WRITE => cflag::FUA,
        cmd::FLUSH | cmd::CACHE => 0,
        cmd::TRIM => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cflag::REQ_ONE,
        _ => 0,
    }
}

impl Worker {
    fn send_error(&self, cookie: u64, errno: u32, msg: &str) -> io::Result<()> {
        let mut w = self.out.lock().unwrap_or_else(|p| p.into_inner());
        self.write_outcome(&mut w, cookie, 0, &Outcome::Err(errno, msg.to_string()))?;
        w.flush()
    }

    /// Checks a request before it runs: a refusal names the NBD error.
    fn check(&self, h: &proto::RequestHeader) -> Result<(), (u32, String)> {
        let e = &self.export;
        let info = e.device().info();
        if !matches!(
            h.kind,
            cmd::READ
                | cmd::WRITE
                | cmd::FLUSH
                | cmd::TRIM
                | cmd::CACHE
                | cmd::WRITE_ZEROES
                | cmd::BLOCK_STATUS
        ) {
            return Err((err::EINVAL, format!("unknown command {}", h.kind)));
        }
        if h.flags & !allowed_flags(h.kind) != 0 {
            return Err((
                err::EINVAL,
                format!("flags {:#x} not valid for command {}", h.flags, h.kind),
            ));
        }
        let writes = matches!(h.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && e.read_only() {
            return Err((err::EPERM, "the export is read-only".into()));
        }
        if h.kind == cmd::FLUSH {
            return Ok(());
        }
        if h.kind == cmd::BLOCK_STATUS && self.contexts.is_empty() {
            return Err((err::EINVAL, "no meta context was selected".into()));
        }
        if h.kind == cmd::READ && h.len > MAX_PAYLOAD {
            return Err((err::EOVERFLOW, "read longer than 32 MiB".into()));
        }
        if h.len == 0 {
            return Err((err::EINVAL, "zero-length request".into()));
        }
        let end = h.offset.checked_add(u64::from(h.len));
        if end.is_none_or(|end| end > info.capacity) {
            let errno = if writes { err::ENOSPC } else { err::EINVAL };
            return Err((errno, "request past the end of the export".into()));
        }
        let align = u64::from(info.logical_sector_size.max(1));
        if h.kind != cmd::BLOCK_STATUS
            && h.kind != cmd::CACHE
            && (h.offset % align != 0 || u64::from(h.len) % align != 0)
        {
            return Err((
                err::EINVAL,
                format!("request not aligned to the {align}-byte block size"),
            ));
        }
        Ok(())
    }

    /// Runs a batch of jobs and sends their replies. An error means the client is gone.
    fn run(&self, jobs: &[Job], pool: &mut Vec<AlignedBuf>) -> io::Result<()> {
        let dev = self.export.device();
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(jobs.len());
        // Reads: their buffers, and for long structured reads the holes they skip.
        let mut read_bufs: Vec<(usize, ReadBuf)> = Vec::new();
        let mut guards = Vec::with_capacity(jobs.len());
        for (i, j) in jobs.iter().enumerate() {
            let op = match j.h.kind {
                cmd::READ => Some(OpKind::Read),
                cmd::WRITE => Some(OpKind::Write),
                cmd::FLUSH => Some(OpKind::Flush),
                cmd::TRIM => Some(OpKind::Discard),
                cmd::WRITE_ZEROES => Some(OpKind::WriteZeroes),
                _ => None,
            };
            if let Err((errno, msg)) = self.check(&j.h) {
                // Refused before it ran: an error, not traffic.
                self.export.refused();
                guards.push(None);
                outcomes.push(Some(Outcome::Err(errno, msg)));
                continue;
            }
            guards.push(op.map(|op| self.export.begin(op, u64::from(j.h.len))));
            match j.h.kind {
                cmd::READ => {
                    read_bufs.push((i, ReadBuf::take(pool, j.h.len as usize)));
                    outcomes.push(None);
                }
                cmd::BLOCK_STATUS => outcomes.push(Some(self.block_status(&j.h))),
                cmd::CACHE => outcomes.push(Some(Outcome::Ok)),
                // Allocated zeroes (NO_HOLE), or a stack without write-zeroes: zeroes written
                // as data, which is never fast.
                cmd::WRITE_ZEROES
                    if j.h.flags & cflag::NO_HOLE != 0 || !dev.info().supports.write_zeroes =>
                {
                    outcomes.push(Some(if j.h.flags & cflag::FAST_ZERO != 0 {
                        Outcome::Err(err::ENOTSUP, "these zeroes cannot be written fast".into())
                    } else {
                        write_allocated_zeroes(
                            dev.as_ref(),
                            j.h.offset,
                            u64::from(j.h.len),
                            j.h.flags & cflag::FUA != 0,
                        )
                    }));
                }
                cmd::TRIM if !dev.info().supports.discard => outcomes.push(Some(Outcome::Ok)),
                _ => outcomes.push(None),
            }
        }
        // The batch: every job without an outcome yet, then one flush for FUA writes.
        {
            let mut batch: Vec<Request<'_>> = Vec::with_capacity(jobs.len() + 1);
            let mut owner: Vec<usize> = Vec::with_capacity(jobs.len() + 1);
            let mut rb = read_bufs.iter_mut();
            let mut fua = false;
            for (i, j) in jobs.iter().enumerate() {
                if outcomes[i].is_some() {
                    continue;
                }
                match j.h.kind {
                    cmd::READ => {
                        let (_, buf) = rb.next().expect("one buffer per read");
                        batch.push(Request::read(j.h.offset, buf.as_mut()));
                        owner.push(i);
                    }
                    cmd::WRITE => {
                        batch.push(Request::write(j.h.offset, &j.data));
                        owner.push(i);
                        fua |= j.h.flags & cflag::FUA != 0;
                    }
                    cmd::FLUSH => {
                        batch.push(Request::flush());
                        owner.push(i);
                    }
                    cmd::TRIM => {
                        batch.push(Request::discard(j.h.offset, u64::from(j.h.len)));
                        owner.push(i);
                        fua |= j.h.flags & cflag::FUA != 0;
                    }
                    _ => {
                        batch.push(Request::write_zeroes(j.h.offset, u64::from(j.h.len)));
                        owner.push(i);
                        fua |= j.h.flags & cflag::FUA != 0;
                    }
                }
            }
            if fua {
                batch.push(Request::flush());
                owner.push(usize::MAX);
            }
            if !batch.is_empty() {
                dev.submit(&mut batch);
            }
            let mut failed: Vec<Option<vstor_core::Error>> = vec![None; jobs.len()];
            let mut fua_failed = None;
            for (req, &i) in batch.iter().zip(&owner) {
                if let Err(e) = req.result() {
                    if i == usize::MAX {
                        fua_failed = Some(e);
                    } else if failed[i].is_none() {
                        failed[i] = Some(e);
                    }
                }
            }
            drop(batch);
            for (i, j) in jobs.iter().enumerate() {
                if outcomes[i].is_some() || j.h.kind == cmd::READ {
                    continue;
                }
                let is_fua = j.h.flags & cflag::FUA != 0;
                outcomes[i] = Some(match (&failed[i], &fua_failed) {
                    (Some(e), _) => Outcome::Err(errno_of(e), e.to_string()),
                    (None, Some(e)) if is_fua => Outcome::Err(errno_of(e), e.to_string()),
                    _ => Outcome::Ok,
                });
            }
            for (i, buf) in read_bufs {
                // DF asks for one chunk: no holes split out.
                let split = self.structured
                    && jobs[i].h.flags & cflag::DF == 0
                    && buf.len >= HOLE_READ_MIN as usize;
                outcomes[i] = Some(match &failed[i] {
                    Some(e) => Outcome::Err(errno_of(e), e.to_string()),
                    None if split => {
                        let pieces = zero_runs(buf.as_ref());
                        Outcome::Read(buf, pieces)
                    }
                    None => {
                        let n = buf.len as u64;
                        Outcome::Read(buf, vec![(0, n, false)])
                    }
                });
            }
        }
        let mut w = self.out.lock().unwrap_or_else(|p| p.into_inner());
        for ((j, o), g) in jobs.iter().zip(outcomes).zip(guards) {
            let o = o.expect("every job has an outcome");
            if let Some(g) = g {
                g.done(!matches!(o, Outcome::Err(..)));
            }
            self.write_outcome(&mut w, j.h.cookie, j.h.offset, &o)?;
            if let Outcome::Read(buf, _) = o {
                buf.give_back(pool);
            }
        }
        w.flush()
    }

    fn block_status(&self, h: &proto::RequestHeader) -> Outcome {
        let ext = match self.export.device().allocation(h.offset, u64::from(h.len)) {
            Ok(e) => e,
            Err(e) => return Outcome::Err(errno_of(&e), e.to_string()),
        };
        let one = h.flags & cflag::REQ_ONE != 0;
        let mut chunks = Vec::new();
        for &ctx in &self.contexts {
            let mut d: Vec<(u32, u32)> = Vec::new();
            for e in &ext {
                let flags = if ctx == proto::CONTEXT_BASE_ALLOCATION {
                    (if e.depth == 0 { proto::STATE_HOLE } else { 0 })
                        | (if e.zero { proto::STATE_ZERO } else { 0 })
                } else {
                    e.depth
                };
                // Extents within one request are under 4 GiB; merge equal neighbours.
                match d.last_mut() {
                    Some(last) if last.1 == flags => last.0 += e.len as u32,
                    _ => d.push((e.len as u32, flags)),
                }
            }
            if one {
                d.truncate(1);
            }
            chunks.push((ctx, d));
        }
        Outcome::Status(chunks)
    }

    /// Writes the reply to the request `cookie` (whose offset is `offset`).
    fn write_outcome(
        &self,
        w: &mut BufWriter<Sock>,
        cookie: u64,
        offset: u64,
        o: &Outcome,
    ) -> io::Result<()> {
        if !self.structured {
            return match o {
                Outcome::Ok | Outcome::Status(_) => w.write_all(&proto::simple_reply(0, cookie)),
                Outcome::Err(e, _) => w.write_all(&proto::simple_reply(*e, cookie)),
                Outcome::Read(buf, _) => {
                    w.write_all(&proto::simple_reply(0, cookie))?;
                    w.write_all(buf.as_ref())
                }
            };
        }
        let done = chunk::FLAG_DONE;
        match o {
            Outcome::Ok => w.write_all(&proto::chunk_header(done, chunk::NONE, cookie, 0)),
            Outcome::Err(e, msg) => {
                let msg = &msg.as_bytes()[..msg.len().min(1024)];
                w.write_all(&proto::chunk_header(
                    done,
                    chunk::ERROR,
                    cookie,
                    6 + msg.len() as u32,
                ))?;
                w.write_all(&e.to_be_bytes())?;
                w.write_all(&(msg.len() as u16).to_be_bytes())?;
                w.write_all(msg)
            }
            Outcome::Read(buf, pieces) => {
                let n = pieces.len();
                for (k, &(at, len, hole)) in pieces.iter().enumerate() {
                    let flags = if k + 1 == n { done } else { 0 };
                    if hole {
                        w.write_all(&proto::chunk_header(flags, chunk::OFFSET_HOLE, cookie, 12))?;
                        w.write_all(&(offset + at).to_be_bytes())?;
                        w.write_all(&(len as u32).to_be_bytes())?;
                    } else {
                        w.write_all(&proto::chunk_header(
                            flags,
                            chunk::OFFSET_DATA,
                            cookie,
                            8 + len as u32,
                        ))?;
                        w.write_all(&(offset + at).to_be_bytes())?;
                        w.write_all(&buf.as_ref()[at as usize..(at + len) as usize])?;
                    }
                }
                Ok(())
            }
            Outcome::Status(chunks) => {
                let n = chunks.len();
                for (k, (ctx, d)) in chunks.iter().enumerate() {
                    let flags = if k + 1 == n { done } else { 0 };
                    w.write_all(&proto::chunk_header(
                        flags,
                        chunk::BLOCK_STATUS,
                        cookie,
                        4 + 8 * d.len() as u32,
                    ))?;
                    w.write_all(&ctx.to_be_bytes())?;
                    for (len, f) in d {
                        w.write_all(&len.to_be_bytes())?;
                        w.write_all(&f.to_be_bytes())?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Splits read data into (offset, length, is a hole) pieces: runs of at least
/// [`HOLE_READ_MIN`] zero bytes in whole granules are holes.
fn zero_runs(buf: &[u8]) -> Pieces {
    static ZERO: [u8; HOLE_GRANULE] = [0; HOLE_GRANULE];
    let mut out: Pieces = Vec::new();
    let mut at = 0u64;
    for g in buf.chunks(HOLE_GRANULE) {
        let zero = g.len() == HOLE_GRANULE && g == &ZERO[..];
        let n = g.len() as u64;
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1 += n,
            _ => out.push((at, n, zero)),
        }
        at += n;
    }
    // Zero runs too short to be worth a chunk go back into the data around them.
    let mut merged: Pieces = Vec::with_capacity(out.len());
    for (at, n, hole) in out {
        let hole = hole && n >= u64::from(HOLE_READ_MIN);
        match merged.last_mut() {
            Some(last) if last.2 == hole => last.1 += n,
            _ => merged.push((at, n, hole)),
        }
    }
    merged
}

/// WRITE_ZEROES with NO_HOLE (or on a stack without write-zeroes): zeroes written as data.
fn write_allocated_zeroes(dev: &dyn BlockDevice, offset: u64, len: u64, fua: bool) -> Outcome {
    let chunk = (1u64 << 20).min(len) as usize;
    let zeros = vec![0u8; chunk];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(chunk as u64) as usize;
        if let Err(e) = dev.write_at(offset + pos, &zeros[..n]) {
            return Outcome::Err(errno_of(&e), e.to_string());
        }
        pos += n as u64;
    }
    if fua {
        if let Err(e) = dev.flush() {
            return Outcome::Err(errno_of(&e), e.to_string());
        }
    }
    Outcome::Ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_of_64k_or_more_are_holes() {
        let mut b = vec![0u8; 512 << 10];
        assert_eq!(zero_runs(&b), vec![(0, 512 << 10, true)]);
        b[100] = 1; // the first granule is data
        b[(200 << 10) + 5] = 1; // a granule in the middle is data
        let p = zero_runs(&b);
        assert_eq!(
            p,
            vec![
                (0, 4 << 10, false),
                (4 << 10, 196 << 10, true),
                (200 << 10, 4 << 10, false),
                (204 << 10, 308 << 10, true),
            ]
        );
        // A zero run shorter than 64 KiB stays data.
        let mut c = vec![1u8; 256 << 10];
        c[(8 << 10)..(40 << 10)].fill(0);
        assert_eq!(zero_runs(&c), vec![(0, 256 << 10, false)]);
        // A short tail granule is never a hole.
        let d = vec![0u8; (64 << 10) + 512];
        assert_eq!(
            zero_runs(&d),
            vec![(0, 64 << 10, true), (64 << 10, 512, false)]
        );
    }
}
