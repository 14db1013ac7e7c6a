//! vstor's vhost-user-blk backend driven by a frontend written here, byte by byte: guest memory
//! in a memfd, split rings laid out by hand, requests kicked through eventfds (issue 16).
//!
//! - the protocol a well-behaved frontend speaks: features, memory table, rings, requests,
//!   configuration space, GET_VRING_BASE, and reconnecting;
//! - hostile frontends: malformed messages, memory tables that do not fit their files or
//!   overlap, rings outside guest memory, descriptors outside guest memory. Each gets a negative
//!   acknowledgement and a closed connection (or, for a descriptor, an I/O error status), and the
//!   backend goes on serving the next frontend with the image unharmed;
//! - inflight tracking: a frontend hands the backend an inflight buffer in which an earlier
//!   backend left chains taken and never returned; they are served again, in the order they were
//!   taken, before anything new.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vstor_core::{BlockDevice, MemoryDevice};
use vstor_serve::export::ServeError;
use vstor_serve::vhost_user::wire::{protocol, req};
use vstor_serve::{Export, Opened, Opener, Registry};

const MEM_SIZE: u64 = 1 << 20;
/// Where the frontend "has" guest memory in its own address space.
const USER_BASE: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const DISK: u64 = 4 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const NEED_REPLY: u32 = 1 << 3;
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const WAIT: Duration = Duration::from_secs(10);

/// Opens `mem:` targets as a fresh memory device of [`DISK`] bytes.
struct MemOpener;

impl Opener for MemOpener {
    fn open(&self, _name: &str, _target: &str, read_only: bool) -> Result<Opened, ServeError> {
        let d = MemoryDevice::new(DISK)?;
        let device: Arc<dyn BlockDevice> = Arc::new(if read_only { d.into_read_only() } else { d });
        Ok(Opened {
            device,
            live: None,
            qos: None,
            notes: Vec::new(),
            format: "memory".into(),
        })
    }
}

/// The backend serving a memory export.
struct Backend {
    _registry: Registry,
    export: Arc<Export>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Backend {
    fn new(read_only: bool) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new(Arc::new(MemOpener));
        let export = registry.add("mem0", "mem:", read_only).unwrap();
        let socket = dir.path().join("vu.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let thread =
            vstor_serve::vhost_user::serve(export.clone(), &socket, 2, stop.clone()).unwrap();
        Backend {
            _registry: registry,
            export,
            stop,
            thread: Some(thread),
            socket,
            _dir: dir,
        }
    }

    fn disk(&self) -> &Arc<dyn BlockDevice> {
        self.export.device()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn memfd(name: &str, len: u64) -> File {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let f = File::from(fd);
    f.set_len(len).unwrap();
    f
}

fn eventfd() -> File {
    File::from(rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap())
}

/// A frontend: its socket, guest memory and the eventfds of queue 0.
struct Frontend {
    sock: UnixStream,
    file: File,
    mem: GuestMemoryMmap,
    kick: File,
    call: File,
    /// The next available index the frontend publishes.
    avail: u16,
}

impl Frontend {
    fn connect(b: &Backend) -> Frontend {
        let sock = UnixStream::connect(&b.socket).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let file = memfd("guest-ram", MEM_SIZE);
        let region = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().unwrap(), 0),
            MEM_SIZE as usize,
        )
        .unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        Frontend {
            sock,
            file,
            mem,
            kick: eventfd(),
            call: eventfd(),
            avail: 0,
        }
    }

    fn send(&self, request: u32, flags: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut msg = Vec::new();
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&(1 | flags).to_le_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        let n = sendmsg(
            &self.sock,
            &[IoSlice::new(&msg)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .unwrap();
        assert_eq!(n, msg.len());
    }

    /// Reads a reply: its request code, payload and descriptors. `None` when the backend closed
    /// the connection.
    fn recv(&self) -> Option<(u32, Vec<u8>, Vec<OwnedFd>)> {
        let mut hdr = [0u8; 12];
        let mut fds = Vec::new();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = recvmsg(
            &self.sock,
            &mut [IoSliceMut::new(&mut hdr)],
            &mut control,
            RecvFlags::WAITALL,
        )
        .ok()?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(f) = m {
                fds.extend(f);
            }
        }
        if r.bytes == 0 {
            return None;
        }
        assert_eq!(r.bytes, 12, "a whole reply header");
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        assert_eq!(flags & 0x7, 1 | 4, "a version-1 reply");
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; size];
        (&self.sock).read_exact(&mut payload).unwrap();
        Some((
            u32::from_le_bytes(hdr[0..4].try_into().unwrap()),
            payload,
            fds,
        ))
    }

    /// Sends a request that gets a reply, returns the reply payload.
    fn call(&self, request: u32, payload: &[u8]) -> Vec<u8> {
        self.send(request, 0, payload, &[]);
        let (code, p, _) = self.recv().expect("a reply");
        assert_eq!(code, request);
        p
    }

    fn get_u64(&self, request: u32) -> u64 {
        u64::from_le_bytes(self.call(request, &[]).try_into().unwrap())
    }

    /// Sends a request with NEED_REPLY and returns the acknowledgement (0: success).
    fn acked(&self, request: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Option<u64> {
        self.send(request, NEED_REPLY, payload, fds);
        let (code, p, _) = self.recv()?;
        assert_eq!(code, request);
        Some(u64::from_le_bytes(p.try_into().unwrap()))
    }

    fn ok(&self, request: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
        assert_eq!(
            self.acked(request, payload, fds),
            Some(0),
            "request {request}"
        );
    }

    /// Whether the backend closed the connection.
    fn closed(&self) -> bool {
        let mut b = [0u8; 1];
        self.sock
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let r = (&self.sock).read(&mut b);
        self.sock.set_read_timeout(Some(WAIT)).unwrap();
        match r {
            Ok(0) => true,
            Ok(_) => panic!("a message where none was due"),
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    /// Features, protocol features with REPLY_ACK, owner.
    fn negotiate(&self, extra_protocol: u64) -> u64 {
        let features = self.get_u64(req::GET_FEATURES);
        assert_ne!(features & VERSION_1, 0);
        assert_ne!(features & PROTOCOL_FEATURES, 0);
        self.send(
            req::SET_FEATURES,
            0,
            &(VERSION_1 | PROTOCOL_FEATURES | (1 << 9)).to_le_bytes(),
            &[],
        );
        let proto = self.get_u64(req::GET_PROTOCOL_FEATURES);
        let want = protocol::REPLY_ACK | protocol::CONFIG | protocol::MQ | extra_protocol;
        assert_eq!(proto & want, want, "offered {proto:#x}");
        self.send(req::SET_PROTOCOL_FEATURES, 0, &want.to_le_bytes(), &[]);
        self.ok(req::SET_OWNER, &[], &[]);
        features
    }

    fn region(guest: u64, size: u64, user: u64, offset: u64) -> Vec<u8> {
        [guest, size, user, offset]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    fn mem_table(&self) {
        let mut p = vec![1, 0, 0, 0, 0, 0, 0, 0];
        p.extend(Self::region(0, MEM_SIZE, USER_BASE, 0));
        self.ok(req::SET_MEM_TABLE, &p, &[self.file.as_fd()]);
    }

    fn state(index: u32, num: u32) -> Vec<u8> {
        [index.to_le_bytes(), num.to_le_bytes()].concat()
    }

    /// Sets up queue 0 (size, base, addresses, call, kick) and enables it.
    fn ring(&self, base: u16) {
        self.ok(req::SET_VRING_NUM, &Self::state(0, u32::from(QSIZE)), &[]);
        self.ok(req::SET_VRING_BASE, &Self::state(0, u32::from(base)), &[]);
        let mut addr = Vec::new();
        addr.extend_from_slice(&0u32.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes());
        for a in [DESC, USED, AVAIL, 0] {
            addr.extend_from_slice(&(USER_BASE + a).to_le_bytes());
        }
        self.ok(req::SET_VRING_ADDR, &addr, &[]);
        self.ok(
            req::SET_VRING_CALL,
            &0u64.to_le_bytes(),
            &[self.call.as_fd()],
        );
        self.ok(
            req::SET_VRING_KICK,
            &0u64.to_le_bytes(),
            &[self.kick.as_fd()],
        );
        self.ok(req::SET_VRING_ENABLE, &Self::state(0, 1), &[]);
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Lays out request `slot` (descriptors 3*slot..3*slot+2, its own header, data and status
    /// areas) of `typ` at `sector` with `len` data bytes; returns its head.
    fn request(&self, slot: u16, typ: u32, sector: u64, data_addr: u64, len: u32) -> u16 {
        let head = 3 * slot;
        let hdr = HDR + 16 * u64::from(slot);
        self.mem.write_obj(typ, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + u64::from(slot)))
            .unwrap();
        let data_flags = if typ == 0 || typ == 8 { F_WRITE } else { 0 };
        self.desc(head, hdr, 16, F_NEXT, head + 1);
        self.desc(head + 1, data_addr, len, data_flags | F_NEXT, head + 2);
        self.desc(head + 2, STATUS + u64::from(slot), 1, F_WRITE, 0);
        head
    }

    fn status(&self, slot: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS + u64::from(slot)))
            .unwrap()
    }

    /// Makes heads available and kicks.
    fn submit(&mut self, heads: &[u16]) {
        for &h in heads {
            let at = AVAIL + 4 + 2 * u64::from(self.avail % QSIZE);
            self.mem.write_obj(h, GuestAddress(at)).unwrap();
            self.avail = self.avail.wrapping_add(1);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .unwrap();
        (&self.kick).write_all(&1u64.to_ne_bytes()).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// The used ring entry `i`: (head, length).
    fn used(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(i % QSIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Waits until the used index reaches `idx`.
    fn wait_used(&self, idx: u16) {
        let t = Instant::now();
        while self.used_idx() != idx {
            assert!(
                t.elapsed() < WAIT,
                "used index {} of {idx}",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Everything up to GET_VRING_BASE's drain: returns the base the backend reports.
    fn vring_base(&self) -> u32 {
        let p = self.call(req::GET_VRING_BASE, &Self::state(0, 0));
        u32::from_le_bytes(p[4..8].try_into().unwrap())
    }
}

fn fill(mem: &GuestMemoryMmap, at: u64, byte: u8, len: usize) {
    mem.write_slice(&vec![byte; len], GuestAddress(at)).unwrap();
}

#[test]
fn a_frontend_written_here_reads_writes_and_reads_the_configuration() {
    let b = Backend::new(false);
    let mut f = Frontend::connect(&b);
    let features = f.negotiate(0);
    for bit in [9u32, 11, 12, 13, 14, 29, 6, 2, 1] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit} offered");
    }
    assert_eq!(f.get_u64(req::GET_QUEUE_NUM), 2);
    // The configuration space: capacity in sectors, num_queues.
    let mut cfg = vec![0u8; 12 + 60];
    cfg[4..8].copy_from_slice(&60u32.to_le_bytes());
    let c = f.call(req::GET_CONFIG, &cfg);
    assert_eq!(
        u64::from_le_bytes(c[12..20].try_into().unwrap()),
        DISK / 512
    );
    assert_eq!(
        u16::from_le_bytes(c[12 + 34..12 + 36].try_into().unwrap()),
        2
    );
    f.mem_table();
    f.ring(0);
    // A write of 4 KiB at sector 8, a read back, a flush and a GET_ID.
    fill(&f.mem, DATA, 0x5a, 4096);
    let w = f.request(0, 1, 8, DATA, 4096);
    f.submit(&[w]);
    f.wait_used(1);
    assert_eq!(f.status(0), 0);
    let mut disk = vec![0u8; 4096];
    b.disk().read_at(8 * 512, &mut disk).unwrap();
    assert_eq!(disk, vec![0x5a; 4096]);
    let r = f.request(1, 0, 8, DATA + 0x4000, 4096);
    let id = f.request(2, 8, 0, DATA + 0x8000, 20);
    f.submit(&[r, id]);
    f.wait_used(3);
    assert_eq!((f.status(1), f.status(2)), (0, 0));
    assert_eq!(f.used(1), (u32::from(r), 4097));
    let mut back = vec![0u8; 4096];
    f.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x4000))
        .unwrap();
    assert_eq!(back, vec![0x5a; 4096]);
    let mut ident = [0u8; 4];
    f.mem
        .read_slice(&mut ident, GuestAddress(DATA + 0x8000))
        .unwrap();
    assert_eq!(&ident, b"mem0");
    // The ring stops with nothing in flight and reports where it is.
    assert_eq!(f.vring_base(), 3);
    let stats = b.export.stats();
    assert_eq!((stats.reads, stats.writes, stats.errors), (1, 1, 0));
    // A second frontend after this one leaves.
    drop(f);
    let mut f = Frontend::connect(&b);
    f.negotiate(0);
    f.mem_table();
    f.ring(0);
    let r = f.request(0, 0, 8, DATA, 512);
    f.submit(&[r]);
    f.wait_used(1);
    assert_eq!(f.status(0), 0);
    let mut back = vec![0u8; 512];
    f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![0x5a; 512]);
}

#[test]
fn read_only_exports_refuse_writes() {
    let b = Backend::new(true);
    let mut f = Frontend::connect(&b);
    let features = f.negotiate(0);
    assert_ne!(features & (1 << 5), 0, "RO offered");
    assert_eq!(features & (1 << 13), 0, "no DISCARD");
    f.mem_table();
    f.ring(0);
    let w = f.request(0, 1, 0, DATA, 512);
    f.submit(&[w]);
    f.wait_used(1);
    assert_eq!(f.status(0), 1, "VIRTIO_BLK_S_IOERR");
}

#[test]
fn descriptors_outside_guest_memory_get_an_io_error_and_touch_nothing() {
    let b = Backend::new(false);
    let mut f = Frontend::connect(&b);
    f.negotiate(0);
    f.mem_table();
    f.ring(0);
    b.disk().write_at(0, &[0x77; 4096]).unwrap();
    // Data outside memory, data straddling its end, a write from outside memory.
    let a = f.request(0, 0, 0, MEM_SIZE + 0x1000, 4096);
    let c = f.request(1, 0, 0, MEM_SIZE - 512, 4096);
    let w = f.request(2, 1, 0, u64::MAX - 4095, 4096);
    f.submit(&[a, c, w]);
    f.wait_used(3);
    assert_eq!((f.status(0), f.status(1), f.status(2)), (1, 1, 1));
    let mut disk = vec![0u8; 4096];
    b.disk().read_at(0, &mut disk).unwrap();
    assert_eq!(disk, vec![0x77; 4096], "the image is unharmed");
    // A chain whose next points outside the table: returned with nothing written.
    f.desc(9, HDR, 16, F_NEXT, 200);
    f.submit(&[9]);
    f.wait_used(4);
    assert_eq!(f.used(3), (9, 0));
    // The connection goes on.
    let r = f.request(3, 0, 0, DATA, 512);
    f.submit(&[r]);
    f.wait_used(5);
    assert_eq!(f.status(3), 0);
}

/// Each hostile step on a fresh connection: the backend answers with a negative
/// acknowledgement (where the frontend asked for one) and closes the connection; a
/// well-behaved frontend is then served.
#[test]
fn hostile_frontends_get_an_error_and_a_closed_connection() {
    let b = Backend::new(false);
    b.disk().write_at(0, &[0x33; 4096]).unwrap();
    type Step = Box<dyn Fn(&Frontend) -> Option<u64>>;
    let small = memfd("small", 4096);
    let small = Arc::new(small);
    let s1 = small.clone();
    let s2 = small.clone();
    let steps: Vec<(&str, Step)> = vec![
        (
            "a region larger than its file",
            Box::new(move |f| {
                let p = table(vec![Frontend::region(0, MEM_SIZE, USER_BASE, 0)]);
                f.acked(req::SET_MEM_TABLE, &p, &[s1.as_fd()])
            }),
        ),
        (
            "a region at an offset past its file's end",
            Box::new(move |f| {
                let p = table(vec![Frontend::region(0, 4096, USER_BASE, 8192)]);
                f.acked(req::SET_MEM_TABLE, &p, &[s2.as_fd()])
            }),
        ),
        (
            "overlapping regions",
            Box::new(|f| {
                let p = table(vec![
                    Frontend::region(0, MEM_SIZE, USER_BASE, 0),
                    Frontend::region(4096, 4096, 0x1000_0000, 0),
                ]);
                f.acked(req::SET_MEM_TABLE, &p, &[f.file.as_fd(), f.file.as_fd()])
            }),
        ),
        (
            "a region that wraps around",
            Box::new(|f| {
                let p = table(vec![Frontend::region(u64::MAX - 4095, 8192, USER_BASE, 0)]);
                f.acked(req::SET_MEM_TABLE, &p, &[f.file.as_fd()])
            }),
        ),
        (
            "fewer descriptors than regions",
            Box::new(|f| {
                let p = table(vec![
                    Frontend::region(0, 4096, USER_BASE, 0),
                    Frontend::region(1 << 30, 4096, 0x1000_0000, 0),
                ]);
                f.acked(req::SET_MEM_TABLE, &p, &[f.file.as_fd()])
            }),
        ),
        (
            "a queue that does not exist",
            Box::new(|f| f.acked(req::SET_VRING_NUM, &Frontend::state(7, 16), &[])),
        ),
        (
            "a ring size that is not a power of two",
            Box::new(|f| f.acked(req::SET_VRING_NUM, &Frontend::state(0, 24), &[])),
        ),
        (
            "ring addresses outside the memory table",
            Box::new(|f| {
                f.mem_table();
                let mut addr = vec![0u8; 8];
                for a in [0x1234_0000u64, USER_BASE + USED, USER_BASE + AVAIL, 0] {
                    addr.extend_from_slice(&a.to_le_bytes());
                }
                f.acked(req::SET_VRING_ADDR, &addr, &[])
            }),
        ),
        (
            "a ring that runs past guest memory",
            Box::new(|f| {
                f.mem_table();
                f.ok(req::SET_VRING_NUM, &Frontend::state(0, 256), &[]);
                let mut addr = vec![0u8; 8];
                let desc = USER_BASE + MEM_SIZE - 1024;
                for a in [desc, USER_BASE + USED, USER_BASE + AVAIL, 0] {
                    addr.extend_from_slice(&a.to_le_bytes());
                }
                f.ok(req::SET_VRING_ADDR, &addr, &[]);
                f.acked(req::SET_VRING_KICK, &0u64.to_le_bytes(), &[f.kick.as_fd()])
            }),
        ),
        (
            "a kick before the ring's addresses",
            Box::new(|f| f.acked(req::SET_VRING_KICK, &0u64.to_le_bytes(), &[f.kick.as_fd()])),
        ),
        (
            "a message with a payload of the wrong size",
            Box::new(|f| f.acked(req::SET_VRING_NUM, &[0, 0, 0, 0], &[])),
        ),
        (
            "a request the backend does not serve",
            Box::new(|f| f.acked(6, &[0; 16], &[])),
        ),
        (
            "features that were not offered",
            Box::new(|f| f.acked(req::SET_FEATURES, &(1u64 << 63).to_le_bytes(), &[])),
        ),
        (
            "a configuration read past any configuration space",
            Box::new(|f| {
                let mut cfg = vec![0u8; 12 + 300];
                cfg[4..8].copy_from_slice(&300u32.to_le_bytes());
                f.acked(req::GET_CONFIG, &cfg, &[])
            }),
        ),
        (
            "an inflight buffer too small for its queues",
            Box::new(|f| {
                let buf = memfd("inflight", 64);
                let mut p = Vec::new();
                p.extend_from_slice(&64u64.to_le_bytes());
                p.extend_from_slice(&0u64.to_le_bytes());
                p.extend_from_slice(&2u16.to_le_bytes());
                p.extend_from_slice(&128u16.to_le_bytes());
                p.extend_from_slice(&[0; 4]);
                f.acked(req::SET_INFLIGHT_FD, &p, &[buf.as_fd()])
            }),
        ),
    ];
    for (what, step) in &steps {
        let f = Frontend::connect(&b);
        f.negotiate(protocol::INFLIGHT_SHMFD);
        let ack = step(&f);
        assert!(ack.is_none_or(|a| a != 0), "{what}: acknowledged");
        assert!(f.closed(), "{what}: the connection stays open");
    }
    // Raw garbage: a header of another version, an oversized payload, half a header.
    for bytes in [
        &[1u8, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0][..],
        &[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1],
        &[1, 0, 0],
    ] {
        let f = Frontend::connect(&b);
        (&f.sock).write_all(bytes).unwrap();
        if bytes.len() < 12 {
            f.sock.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert!(f.closed(), "{bytes:?}");
    }
    // A well-behaved frontend afterwards (its connection stays open), and the image unharmed.
    let mut f = Frontend::connect(&b);
    f.negotiate(0);
    assert!(!f.closed());
    f.mem_table();
    f.ring(0);
    let r = f.request(0, 0, 0, DATA, 4096);
    f.submit(&[r]);
    f.wait_used(1);
    assert_eq!(f.status(0), 0);
    let mut back = vec![0u8; 4096];
    f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![0x33; 4096]);
}

/// A SET_MEM_TABLE payload of `regions`.
fn table(regions: Vec<Vec<u8>>) -> Vec<u8> {
    let mut p = vec![regions.len() as u8, 0, 0, 0, 0, 0, 0, 0];
    for r in regions {
        p.extend(r);
    }
    p
}

/// The inflight buffer's layout, as the backend documents it (one queue region per queue).
fn queue_region_size(queue_size: u16) -> u64 {
    (16 + 16 * u64::from(queue_size)).div_ceil(64) * 64
}

/// A frontend gets an inflight buffer from one backend connection, in which "that backend"
/// (the frontend plays it, writing the marks a backend killed mid-batch leaves) took four
/// chains and returned one; on the next connection the backend serves the three others again,
/// in the order they were taken, then the new ones.
#[test]
fn chains_left_in_flight_by_a_dead_backend_are_served_again_in_order() {
    let b = Backend::new(false);
    let f = Frontend::connect(&b);
    f.negotiate(protocol::INFLIGHT_SHMFD);
    let mut p = vec![0u8; 24];
    p[16..18].copy_from_slice(&2u16.to_le_bytes());
    p[18..20].copy_from_slice(&QSIZE.to_le_bytes());
    f.send(req::GET_INFLIGHT_FD, 0, &p, &[]);
    let (_, reply, mut fds) = f.recv().unwrap();
    assert_eq!(fds.len(), 1);
    let size = u64::from_le_bytes(reply[0..8].try_into().unwrap());
    assert_eq!(size, 2 * queue_region_size(QSIZE));
    let inflight = File::from(fds.remove(0));
    drop(f);

    // Guest memory with four writes of one sector each, A B C D, all to sector 0 but with
    // different bytes; "the dead backend" took them in the order C, A, D, B and returned A
    // (used index 1), then died.
    let mut f = Frontend::connect(&b);
    f.negotiate(protocol::INFLIGHT_SHMFD);
    let heads: Vec<u16> = (0..4u16)
        .map(|slot| {
            fill(
                &f.mem,
                DATA + 0x1000 * u64::from(slot),
                b'A' + slot as u8,
                512,
            );
            f.request(slot, 1, 0, DATA + 0x1000 * u64::from(slot), 512)
        })
        .collect();
    f.submit(&heads);
    f.mem
        .write_obj(u32::from(heads[0]), GuestAddress(USED + 4))
        .unwrap();
    f.mem.write_obj(1u32, GuestAddress(USED + 8)).unwrap();
    f.mem.write_obj(1u16, GuestAddress(USED + 2)).unwrap();
    let region = MmapRegion::<()>::from_file(
        FileOffset::new(inflight.try_clone().unwrap(), 0),
        size as usize,
    )
    .unwrap();
    let buf =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();
    for (counter, slot) in [(1u64, 2usize), (2, 0), (3, 3), (4, 1)] {
        let d = 16 + 16 * u64::from(heads[slot]);
        buf.write_obj(u8::from(slot != 0), GuestAddress(d)).unwrap();
        buf.write_obj(counter, GuestAddress(d + 8)).unwrap();
    }
    buf.write_obj(1u16, GuestAddress(14)).unwrap(); // used_idx
    buf.write_obj(heads[0], GuestAddress(12)).unwrap(); // last_batch_head
    let mut p = Vec::new();
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&QSIZE.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    f.ok(req::SET_INFLIGHT_FD, &p, &[inflight.as_fd()]);
    f.mem_table();
    // The frontend restarts the ring from the used index, as QEMU does after a backend died.
    f.ring(1);
    f.wait_used(4);
    let order: Vec<u32> = (1..4).map(|i| f.used(i).0).collect();
    assert_eq!(
        order,
        vec![
            u32::from(heads[2]),
            u32::from(heads[3]),
            u32::from(heads[1])
        ],
        "C, D, B: the order they were taken in"
    );
    let mut disk = [0u8; 512];
    b.disk().read_at(0, &mut disk).unwrap();
    assert_eq!(
        disk, [b'B'; 512],
        "B was taken last, so it is what the sector holds"
    );
    // A resubmitted chain is not taken again from the available ring: a new request goes on
    // from there.
    fill(&f.mem, DATA + 0x8000, b'E', 512);
    let e = f.request(4, 1, 0, DATA + 0x8000, 512);
    f.submit(&[e]);
    f.wait_used(5);
    assert_eq!(f.used(4).0, u32::from(e));
    b.disk().read_at(0, &mut disk).unwrap();
    assert_eq!(disk, [b'E'; 512]);
    // And the marks are clear: nothing would be served a third time.
    for h in heads.iter().chain([&e]) {
        let mark: u8 = buf.read_obj(GuestAddress(16 + 16 * u64::from(*h))).unwrap();
        assert_eq!(mark, 0, "head {h}");
    }
    let used_idx: u16 = buf.read_obj(GuestAddress(14)).unwrap();
    assert_eq!(used_idx, 5);
}
