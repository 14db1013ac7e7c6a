//! One frontend connection: the vhost-user requests, the rings and their workers.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::inflight::{InflightRegion, QueueInflight};
use super::memory::{MemoryTable, MAX_REGIONS};
use super::wire::{self, exact, le16, le32, le64, protocol, req, Message};
use crate::export::Export;
use crate::virtio_blk::{feature, Block, NoTracking, QueueTracker, F_EVENT_IDX, F_VERSION_1};

/// The largest ring a frontend may set up.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// The protocol features offered.
pub const PROTOCOL_FEATURES: u64 = protocol::MQ
    | protocol::REPLY_ACK
    | protocol::BACKEND_REQ
    | protocol::CONFIG
    | protocol::INFLIGHT_SHMFD
    | protocol::RESET_DEVICE
    | protocol::CONFIGURE_MEM_SLOTS;
/// The largest configuration-space access (the spec's `VHOST_USER_CONFIG_SIZE` is larger; the
/// virtio-blk configuration space is 60 bytes and reads past it return zeroes).
const MAX_CONFIG: usize = 256;
/// How long the frontend gets to acknowledge a configuration-change message.
const BACKEND_ACK_TIMEOUT: Duration = Duration::from_secs(5);

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.into())
}

fn new_eventfd() -> io::Result<File> {
    let fd = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )?;
    Ok(File::from(fd))
}

/// Signals an eventfd (a call or wake descriptor). Errors are ignored: a full counter still
/// wakes the reader, and a descriptor the frontend closed has nobody to wake.
fn signal(f: &File) {
    let _ = (&*f).write(&1u64.to_ne_bytes());
}

/// Empties an eventfd whose counter is not needed.
fn drain(f: &File) {
    let mut b = [0u8; 8];
    let _ = (&*f).read(&mut b);
}

/// What the workers of a connection share with it.
struct Shared {
    block: Arc<Block>,
    /// The guest memory now (replaced whole when the table changes; workers take a snapshot
    /// per round, so a mapping lives as long as a round that uses it).
    memory: Mutex<Option<Arc<GuestMemoryMmap>>>,
    /// A clone of the connection's socket: a worker that finds its ring unusable shuts it down.
    sock: UnixStream,
    /// Why the connection was ended by a worker.
    broken: Mutex<Option<String>>,
}

impl Shared {
    fn memory(&self) -> Option<Arc<GuestMemoryMmap>> {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fail(&self, why: String) {
        let mut b = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        if b.is_none() {
            *b = Some(why);
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// A queue and its inflight tracking.
type QueueState = (Queue, Box<dyn QueueTracker + Send>);

/// A running ring.
struct Worker {
    thread: JoinHandle<QueueState>,
    wake: File,
    stop: Arc<AtomicBool>,
}

impl Worker {
    /// Stops the worker once it has finished the batch it serves (all requests it took are
    /// then in the used ring) and returns the queue's state.
    fn stop(self) -> Option<QueueState> {
        self.stop.store(true, Ordering::Release);
        signal(&self.wake);
        self.thread.join().ok()
    }
}

/// One virtqueue as the frontend set it up.
#[derive(Default)]
struct Vring {
    num: u16,
    /// Guest addresses of the descriptor table, available and used rings.
    addr: Option<(u64, u64, u64)>,
    base: u16,
    call: Arc<Mutex<Option<File>>>,
    enabled: Arc<AtomicBool>,
    worker: Option<Worker>,
    /// A queue taken back from a stopped worker (a reset), or to restart with a new kick.
    parked: Option<QueueState>,
}

/// The state of one frontend connection.
pub(super) struct Session {
    sock: UnixStream,
    export: Arc<Export>,
    shared: Arc<Shared>,
    offered: u64,
    acked: u64,
    protocol_acked: Arc<AtomicU64>,
    memory: MemoryTable,
    vrings: Vec<Vring>,
    backend: Arc<Mutex<Option<UnixStream>>>,
    inflight: Option<Arc<InflightRegion>>,
    capacity: Option<(
        Arc<vstor_core::CapacitySignal>,
        vstor_core::ListenerId,
        JoinHandle<()>,
    )>,
}

/// A reply payload with an optional descriptor.
type Reply = Option<(Vec<u8>, Option<OwnedFd>)>;

impl Session {
    /// A session for the frontend on `sock` serving `export` with `queues` request queues.
    pub(super) fn new(sock: UnixStream, export: Arc<Export>, queues: usize) -> io::Result<Self> {
        let block = Block::with_queues(
            export.device().clone(),
            export.read_only(),
            export.name(),
            queues,
        )
        .with_export(export.clone());
        // MQ is offered whatever the count: `num_queues` in the configuration space is then
        // always valid.
        let offered = block.features()
            | feature::MQ
            | F_VERSION_1
            | wire::F_PROTOCOL_FEATURES
            | wire::F_INDIRECT_DESC;
        let shared = Arc::new(Shared {
            block: Arc::new(block),
            memory: Mutex::new(None),
            sock: sock.try_clone()?,
            broken: Mutex::new(None),
        });
        let mut s = Session {
            sock,
            export,
            shared,
            offered,
            acked: 0,
            protocol_acked: Arc::new(AtomicU64::new(0)),
            memory: MemoryTable::default(),
            vrings: (0..queues).map(|_| Vring::default()).collect(),
            backend: Arc::new(Mutex::new(None)),
            inflight: None,
            capacity: None,
        };
        s.watch_capacity();
        Ok(s)
    }

    /// Online resizes of the export's device reach the guest: the device model takes the new
    /// capacity and the frontend gets a configuration-change message on the backend channel.
    fn watch_capacity(&mut self) {
        let Some(signal) = self.export.device().capacity_signal() else {
            return;
        };
        let (tx, rx) = mpsc::channel::<u64>();
        let tx = Mutex::new(tx);
        let id = signal.subscribe(move |capacity| {
            let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(capacity);
        });
        let block = self.shared.block.clone();
        let backend = self.backend.clone();
        let protocol_acked = self.protocol_acked.clone();
        let name = self.export.name().to_string();
        let thread = std::thread::Builder::new()
            .name(format!("vu-config-{name}"))
            .spawn(move || {
                for capacity in rx {
                    block.set_capacity(capacity);
                    let p = protocol_acked.load(Ordering::Acquire);
                    if p & protocol::CONFIG == 0 {
                        continue;
                    }
                    let chan = backend.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(chan) = chan.as_ref() {
                        if let Err(e) = config_changed(chan, p & protocol::REPLY_ACK != 0) {
                            eprintln!(
                                "vstor serve: vhost-user-blk {name}: the frontend was not told \
                                 of the new size: {e}"
                            );
                        }
                    }
                }
            });
        match thread {
            Ok(thread) => self.capacity = Some((signal, id, thread)),
            Err(_) => signal.unsubscribe(id),
        }
    }

    /// Serves requests until the frontend disconnects, a request is refused (the connection
    /// is then closed) or `stop` is set. Returns why it ended, for the log.
    pub(super) fn run(&mut self, stop: &AtomicBool) -> String {
        // A frontend that stops in the middle of a message is cut off.
        let _ = self.sock.set_read_timeout(Some(Duration::from_secs(30)));
        loop {
            if stop.load(Ordering::Acquire) || self.export.removed() {
                return "the backend is stopping".into();
            }
            if let Some(why) = self.broken() {
                return why;
            }
            let mut fds = [PollFd::new(&self.sock, PollFlags::IN)];
            match poll(
                &mut fds,
                Some(&rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000_000,
                }),
            ) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => return format!("poll: {e}"),
            }
            let msg = match wire::recv(&self.sock) {
                Ok(m) => m,
                Err(wire::RecvError::Closed) => {
                    return self
                        .broken()
                        .unwrap_or_else(|| "the frontend disconnected".into())
                }
                Err(wire::RecvError::Broken(e)) => {
                    return self
                        .broken()
                        .unwrap_or_else(|| format!("broken message: {e}"))
                }
            };
            let request = msg.request;
            let need_ack = msg.flags & wire::FLAG_NEED_REPLY != 0;
            let result = self.handle(msg);
            let ack_ok = self.protocol_acked.load(Ordering::Acquire) & protocol::REPLY_ACK != 0;
            match result {
                Ok(Some((payload, fd))) => {
                    let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
                    if let Err(e) = wire::reply(&self.sock, request, &payload, &fds) {
                        return format!("cannot reply: {e}");
                    }
                }
                Ok(None) => {
                    if need_ack && ack_ok {
                        if let Err(e) = wire::reply(&self.sock, request, &0u64.to_le_bytes(), &[]) {
                            return format!("cannot reply: {e}");
                        }
                    }
                }
                Err(e) => {
                    if need_ack && ack_ok {
                        let _ = wire::reply(&self.sock, request, &1u64.to_le_bytes(), &[]);
                    }
                    return format!("request {request} refused: {e}");
                }
            }
        }
    }

    fn broken(&self) -> Option<String> {
        self.shared
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn vring(&mut self, index: u32) -> io::Result<&mut Vring> {
        let n = self.vrings.len();
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| invalid(format!("queue {index} (the device has {n})")))
    }

    fn handle(&mut self, msg: Message) -> io::Result<Reply> {
        let u64_reply = |v: u64| Ok(Some((v.to_le_bytes().to_vec(), None)));
        match msg.request {
            req::GET_FEATURES => {
                exact(&msg, 0)?;
                u64_reply(self.offered)
            }
            req::SET_FEATURES => {
                let v = le64(exact(&msg, 8)?, 0);
                if v & !self.offered != 0 {
                    return Err(invalid(format!(
                        "features {v:#x} not offered ({:#x} offered)",
                        self.offered
                    )));
                }
                self.acked = v;
                self.shared.block.activate(v);
                // Without PROTOCOL_FEATURES rings are enabled as soon as they start.
                if v & wire::F_PROTOCOL_FEATURES == 0 {
                    for r in &self.vrings {
                        r.enabled.store(true, Ordering::Release);
                    }
                }
                Ok(None)
            }
            req::GET_PROTOCOL_FEATURES => {
                exact(&msg, 0)?;
                u64_reply(PROTOCOL_FEATURES)
            }
            req::SET_PROTOCOL_FEATURES => {
                let v = le64(exact(&msg, 8)?, 0);
                if v & !PROTOCOL_FEATURES != 0 {
                    return Err(invalid(format!("protocol features {v:#x} not offered")));
                }
                self.protocol_acked.store(v, Ordering::Release);
                Ok(None)
            }
            req::SET_OWNER => {
                exact(&msg, 0)?;
                Ok(None)
            }
            req::RESET_OWNER | req::RESET_DEVICE => {
                self.stop_rings();
                for r in &mut self.vrings {
                    *r = Vring::default();
                }
                self.acked = 0;
                self.shared.block.reset();
                Ok(None)
            }
            req::GET_QUEUE_NUM => {
                exact(&msg, 0)?;
                u64_reply(self.vrings.len() as u64)
            }
            req::GET_MAX_MEM_SLOTS => {
                exact(&msg, 0)?;
                u64_reply(MAX_REGIONS as u64)
            }
            req::SET_MEM_TABLE => self.set_mem_table(msg),
            req::ADD_MEM_REG | req::REM_MEM_REG => {
                let p = exact(&msg, 40)?;
                let (guest, size, user, offset) =
                    (le64(p, 8), le64(p, 16), le64(p, 24), le64(p, 32));
                if msg.request == req::ADD_MEM_REG {
                    let mut fds = msg.fds;
                    if fds.len() != 1 {
                        return Err(invalid("ADD_MEM_REG without exactly one descriptor"));
                    }
                    let file = File::from(fds.remove(0));
                    self.memory.add(guest, size, user, offset, file)?;
                } else {
                    self.memory.remove(guest, size)?;
                }
                self.publish_memory();
                Ok(None)
            }
            req::SET_VRING_NUM => {
                let p = exact(&msg, 8)?;
                let (index, num) = (le32(p, 0), le32(p, 4));
                if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
                    return Err(invalid(format!("queue size {num}")));
                }
                let r = self.vring(index)?;
                if r.worker.is_some() {
                    return Err(invalid(format!("queue {index} resized while running")));
                }
                r.num = num as u16;
                Ok(None)
            }
            req::SET_VRING_ADDR => {
                let p = exact(&msg, 40)?;
                let index = le32(p, 0);
                let (desc, used, avail) = (le64(p, 8), le64(p, 16), le64(p, 24));
                let tr = |a: u64, what: &str| {
                    self.memory.user_to_guest(a).ok_or_else(|| {
                        invalid(format!(
                            "queue {index}: {what} at {a:#x} is outside the memory table"
                        ))
                    })
                };
                let addr = (
                    tr(desc, "descriptor table")?,
                    tr(avail, "available ring")?,
                    tr(used, "used ring")?,
                );
                let r = self.vring(index)?;
                if r.worker.is_some() {
                    return Err(invalid(format!("queue {index} moved while running")));
                }
                r.addr = Some(addr);
                r.parked = None;
                Ok(None)
            }
            req::SET_VRING_BASE => {
                let p = exact(&msg, 8)?;
                let (index, base) = (le32(p, 0), le32(p, 4));
                let r = self.vring(index)?;
                if r.worker.is_some() {
                    return Err(invalid(format!("queue {index} rebased while running")));
                }
                r.base = base as u16;
                r.parked = None;
                Ok(None)
            }
            req::GET_VRING_BASE => {
                let p = exact(&msg, 8)?;
                let index = le32(p, 0);
                let r = self.vring(index)?;
                let queue = r.worker.take().and_then(Worker::stop).or(r.parked.take());
                if let Some((q, _)) = queue {
                    r.base = q.next_avail();
                }
                // The ring is stopped; it starts again with its next kick descriptor.
                let mut out = Vec::with_capacity(8);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&u32::from(r.base).to_le_bytes());
                Ok(Some((out, None)))
            }
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
                let v = le64(exact(&msg, 8)?, 0);
                let index = (v & 0xff) as u32;
                let polling = v & 0x100 != 0;
                if v & !0x1ff != 0 {
                    return Err(invalid(format!("vring descriptor word {v:#x}")));
                }
                let mut fds = msg.fds;
                if fds.len() != usize::from(!polling) {
                    return Err(invalid(
                        "vring message with the wrong number of descriptors",
                    ));
                }
                let file = fds.pop().map(File::from);
                match msg.request {
                    req::SET_VRING_CALL => {
                        let r = self.vring(index)?;
                        *r.call.lock().unwrap_or_else(|p| p.into_inner()) = file;
                    }
                    req::SET_VRING_ERR => {
                        // Errors are told through the request status, not this descriptor.
                        self.vring(index)?;
                    }
                    _ => {
                        let Some(kick) = file else {
                            return Err(invalid(
                                "polling rings (no kick descriptor) are not served",
                            ));
                        };
                        self.start_ring(index, kick)?;
                    }
                }
                Ok(None)
            }
            req::SET_VRING_ENABLE => {
                let p = exact(&msg, 8)?;
                let (index, enable) = (le32(p, 0), le32(p, 4));
                if self.acked & wire::F_PROTOCOL_FEATURES == 0 || enable > 1 {
                    return Err(invalid("SET_VRING_ENABLE without protocol features"));
                }
                let r = self.vring(index)?;
                r.enabled.store(enable == 1, Ordering::Release);
                if let Some(w) = &r.worker {
                    signal(&w.wake);
                }
                Ok(None)
            }
            req::GET_CONFIG | req::SET_CONFIG => {
                self.need_protocol(protocol::CONFIG, "GET_CONFIG/SET_CONFIG")?;
                let p = &msg.payload;
                if p.len() < 12 {
                    return Err(invalid("configuration message shorter than its header"));
                }
                let (offset, size) = (le32(p, 0), le32(p, 4) as usize);
                if size > MAX_CONFIG || p.len() != 12 + size {
                    return Err(invalid(format!("configuration access of {size} bytes")));
                }
                if msg.request == req::GET_CONFIG {
                    let mut out = p.clone();
                    self.shared
                        .block
                        .read_config(u64::from(offset), &mut out[12..]);
                    Ok(Some((out, None)))
                } else {
                    self.shared
                        .block
                        .write_config(self.acked, u64::from(offset), &p[12..]);
                    Ok(None)
                }
            }
            req::SET_BACKEND_REQ_FD => {
                self.need_protocol(protocol::BACKEND_REQ, "SET_BACKEND_REQ_FD")?;
                let mut fds = msg.fds;
                if fds.len() != 1 {
                    return Err(invalid("SET_BACKEND_REQ_FD without exactly one descriptor"));
                }
                let fd = fds.remove(0);
                if rustix::net::sockopt::socket_type(&fd).ok()
                    != Some(rustix::net::SocketType::STREAM)
                {
                    return Err(invalid("the backend channel is not a stream socket"));
                }
                let chan = UnixStream::from(fd);
                chan.set_read_timeout(Some(BACKEND_ACK_TIMEOUT))?;
                *self.backend.lock().unwrap_or_else(|p| p.into_inner()) = Some(chan);
                Ok(None)
            }
            req::GET_INFLIGHT_FD => {
                self.need_protocol(protocol::INFLIGHT_SHMFD, "GET_INFLIGHT_FD")?;
                let p = exact(&msg, 24)?;
                let (num_queues, queue_size) = (le16(p, 16), le16(p, 18));
                if usize::from(num_queues) > self.vrings.len() || queue_size > MAX_QUEUE_SIZE {
                    return Err(invalid(format!(
                        "inflight buffer for {num_queues} queues of {queue_size}"
                    )));
                }
                let (file, size) = InflightRegion::create(num_queues, queue_size)?;
                let mut out = Vec::with_capacity(24);
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&0u64.to_le_bytes());
                out.extend_from_slice(&num_queues.to_le_bytes());
                out.extend_from_slice(&queue_size.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
                Ok(Some((out, Some(OwnedFd::from(file)))))
            }
            req::SET_INFLIGHT_FD => {
                self.need_protocol(protocol::INFLIGHT_SHMFD, "SET_INFLIGHT_FD")?;
                let p = exact(&msg, 24)?;
                let (size, offset) = (le64(p, 0), le64(p, 8));
                let (num_queues, queue_size) = (le16(p, 16), le16(p, 18));
                let mut fds = msg.fds;
                if fds.len() != 1 {
                    return Err(invalid("SET_INFLIGHT_FD without exactly one descriptor"));
                }
                if queue_size > MAX_QUEUE_SIZE {
                    return Err(invalid(format!("inflight queue size {queue_size}")));
                }
                let file = File::from(fds.remove(0));
                let region = InflightRegion::map(file, offset, size, num_queues, queue_size)?;
                self.inflight = Some(Arc::new(region));
                Ok(None)
            }
            other => Err(invalid(format!("request {other} is not served"))),
        }
    }

    fn need_protocol(&self, bit: u64, what: &str) -> io::Result<()> {
        if self.protocol_acked.load(Ordering::Acquire) & bit == 0 {
            return Err(invalid(format!("{what} without its protocol feature")));
        }
        Ok(())
    }

    fn set_mem_table(&mut self, msg: Message) -> io::Result<Reply> {
        let p = &msg.payload;
        if p.len() < 8 {
            return Err(invalid("SET_MEM_TABLE shorter than its header"));
        }
        let n = le32(p, 0) as usize;
        if n > wire::MAX_FDS || p.len() != 8 + 32 * n || msg.fds.len() != n {
            return Err(invalid(format!(
                "SET_MEM_TABLE of {n} regions in {} bytes with {} descriptors",
                p.len(),
                msg.fds.len()
            )));
        }
        let regions = msg
            .fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                let r = &p[8 + 32 * i..];
                (
                    le64(r, 0),
                    le64(r, 8),
                    le64(r, 16),
                    le64(r, 24),
                    File::from(fd),
                )
            })
            .collect();
        self.memory = MemoryTable::from_regions(regions)?;
        self.publish_memory();
        Ok(None)
    }

    fn publish_memory(&self) {
        let mem = self.memory.guest_memory().map(Arc::new);
        *self.shared.memory.lock().unwrap_or_else(|p| p.into_inner()) = mem;
    }

    /// Starts (or restarts with a new kick descriptor) ring `index`.
    fn start_ring(&mut self, index: u32, kick: File) -> io::Result<()> {
        let shared = self.shared.clone();
        let event_idx = self.acked & F_EVENT_IDX != 0;
        let inflight = self.inflight.clone();
        let name = self.export.name().to_string();
        let r = self.vring(index)?;
        let running = r.worker.take().and_then(Worker::stop).or(r.parked.take());
        let (queue, tracker): QueueState = match running {
            Some(state) => state,
            None => {
                let Some((desc, avail, used)) = r.addr else {
                    return Err(invalid(format!(
                        "queue {index} kicked before its addresses"
                    )));
                };
                let mem = shared.memory().ok_or_else(|| {
                    invalid(format!("queue {index} kicked before the memory table"))
                })?;
                if r.num == 0 {
                    return Err(invalid(format!("queue {index} kicked before its size")));
                }
                let mut q = Queue::new(MAX_QUEUE_SIZE).map_err(|e| invalid(e.to_string()))?;
                q.try_set_size(r.num)
                    .map_err(|e| invalid(format!("queue {index}: {e}")))?;
                q.try_set_desc_table_address(vm_memory::GuestAddress(desc))
                    .and_then(|_| q.try_set_avail_ring_address(vm_memory::GuestAddress(avail)))
                    .and_then(|_| q.try_set_used_ring_address(vm_memory::GuestAddress(used)))
                    .map_err(|e| invalid(format!("queue {index}: {e}")))?;
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if !q.is_valid(&*mem) {
                    return Err(invalid(format!(
                        "queue {index}: its rings are not inside guest memory"
                    )));
                }
                let used_idx = q
                    .used_idx(&*mem, Ordering::Acquire)
                    .map_err(|e| invalid(format!("queue {index}: {e}")))?
                    .0;
                q.set_next_used(used_idx);
                q.set_next_avail(r.base);
                let tracker: Box<dyn QueueTracker + Send> = match inflight {
                    Some(region) if (index as u16) < region.num_queues() => {
                        let (t, next_avail) =
                            QueueInflight::start(region, index as u16, r.num, used_idx)?;
                        if t.pending_resubmits() > 0 {
                            eprintln!(
                                "vstor serve: vhost-user-blk {}: queue {index}: serving again {} \
                                 requests an earlier backend left in flight",
                                name,
                                t.pending_resubmits()
                            );
                        }
                        q.set_next_avail(next_avail);
                        Box::new(t)
                    }
                    _ => Box::new(NoTracking),
                };
                (q, tracker)
            }
        };
        let wake = new_eventfd()?;
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = WorkerCtx {
            index: index as usize,
            shared,
            kick,
            wake: wake.try_clone()?,
            stop: stop.clone(),
            enabled: r.enabled.clone(),
            call: r.call.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vu-queue-{index}"))
            .spawn(move || ctx.run((queue, tracker)))?;
        r.worker = Some(Worker { thread, wake, stop });
        Ok(())
    }

    fn stop_rings(&mut self) {
        for r in &mut self.vrings {
            if let Some(w) = r.worker.take() {
                r.parked = w.stop();
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop_rings();
        if let Some((signal, id, thread)) = self.capacity.take() {
            // Dropping the listener drops its sender: the thread's loop ends.
            signal.unsubscribe(id);
            let _ = thread.join();
        }
    }
}

/// Sends BACKEND_CONFIG_CHANGE_MSG and waits for its acknowledgement when REPLY_ACK is on.
fn config_changed(chan: &UnixStream, reply_ack: bool) -> io::Result<()> {
    let flags = if reply_ack { wire::FLAG_NEED_REPLY } else { 0 };
    wire::send(chan, wire::backend_req::CONFIG_CHANGE_MSG, flags, &[], &[])?;
    if reply_ack {
        let mut b = [0u8; wire::HEADER_LEN + 8];
        (&*chan).read_exact(&mut b)?;
        if le32(&b, 0) != wire::backend_req::CONFIG_CHANGE_MSG || le64(&b, wire::HEADER_LEN) != 0 {
            return Err(io::Error::other(
                "the frontend refused the configuration change",
            ));
        }
    }
    Ok(())
}

/// What a ring's worker thread needs.
struct WorkerCtx {
    index: usize,
    shared: Arc<Shared>,
    kick: File,
    wake: File,
    stop: Arc<AtomicBool>,
    enabled: Arc<AtomicBool>,
    call: Arc<Mutex<Option<File>>>,
}

impl WorkerCtx {
    /// Serves the ring whenever it is kicked (or woken), until stopped; returns the queue.
    ///
    /// The driver is interrupted once when the ring first runs, whatever EVENT_IDX says: a
    /// backend that died between returning chains and interrupting the driver left it waiting
    /// for an interrupt that, by `used_event`, was due already and so would never come again
    /// (found by the restart test: the guest hung). A spurious interrupt costs the driver one
    /// look at the used ring.
    fn run(self, (mut queue, mut tracker): QueueState) -> QueueState {
        let mut first = true;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return (queue, tracker);
            }
            if self.enabled.load(Ordering::Acquire) {
                if let Some(mem) = self.shared.memory() {
                    if !queue.is_valid(&*mem) {
                        self.shared.fail(format!(
                            "queue {}: its rings are not inside guest memory any more",
                            self.index
                        ));
                        return (queue, tracker);
                    }
                    let interrupt = self.shared.block.process_queue_tracked(
                        self.index,
                        &mut queue,
                        &mem,
                        &mut *tracker,
                    );
                    if interrupt || first {
                        if let Some(call) =
                            self.call.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
                        {
                            signal(call);
                            first = false;
                        }
                    }
                }
            }
            let mut fds = [
                PollFd::new(&self.kick, PollFlags::IN),
                PollFd::new(&self.wake, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    self.shared.fail(format!("queue {}: poll: {e}", self.index));
                    return (queue, tracker);
                }
            }
            let kicked = fds[0].revents();
            if kicked.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) {
                self.shared
                    .fail(format!("queue {}: the kick descriptor broke", self.index));
                return (queue, tracker);
            }
            if kicked.contains(PollFlags::IN) {
                drain(&self.kick);
            }
            if fds[1].revents().contains(PollFlags::IN) {
                drain(&self.wake);
            }
        }
    }
}
