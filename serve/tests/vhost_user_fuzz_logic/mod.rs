//! The logic of the `vhost_user` fuzz target (fuzz/fuzz_targets/vhost_user.rs), replayed by
//! serve/tests/vhost_user_fuzz.rs: one vhost-user frontend per input against vstor's
//! vhost-user-blk backend serving a 1 MiB memory export in-process.
//!
//! The input is a list of operations, each picked by its first byte:
//! - a correct setup of queue 0 or 1 (features, protocol features with REPLY_ACK, owner, a
//!   memory table over a 256 KiB memfd, the ring's size, base, addresses, call, kick, enable),
//!   so that the input can reach the data path;
//! - a raw message: any request code, flags and payload, with no descriptor, the memfd, an
//!   eventfd or both attached;
//! - bytes written anywhere in guest memory, a descriptor of the table written with an address
//!   inside or far outside guest memory, an available-ring entry published and kicked, or a
//!   well-formed request of any type laid out and kicked.
//!
//! Replies are read and thrown away by a thread of their own. Oracles: nothing in the backend
//! may panic (the target aborts on a panic; the replay test records panics of every thread),
//! and once the frontend is gone the backend must serve the next one: a fresh connection gets
//! its GET_FEATURES answered within five seconds, so a hung worker or session is found too.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vstor_core::{BlockDevice, MemoryDevice};
use vstor_serve::export::ServeError;
use vstor_serve::vhost_user::wire::{protocol, req};
use vstor_serve::{Opened, Opener, Registry};

const MEM: u64 = 256 << 10;
const USER: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x10000;

struct MemOpener;

impl Opener for MemOpener {
    fn open(&self, _name: &str, _target: &str, read_only: bool) -> Result<Opened, ServeError> {
        let d = MemoryDevice::new(1 << 20)?;
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

/// The backend of this process, kept in a static (reachable, so no leak for the sanitizer).
struct Backend {
    socket: PathBuf,
    _registry: Registry,
    _thread: std::thread::JoinHandle<()>,
}

/// The socket of this process's backend (started on first use; it lives as long as the
/// process).
fn socket() -> &'static PathBuf {
    static BACKEND: OnceLock<Backend> = OnceLock::new();
    &BACKEND
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("vstor-vu-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let socket = dir.join("vu.sock");
            let registry = Registry::new(Arc::new(MemOpener));
            let export = registry.add("fuzz", "mem:", false).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let thread = vstor_serve::vhost_user::serve(export, &socket, 2, stop).unwrap();
            Backend {
                socket,
                _registry: registry,
                _thread: thread,
            }
        })
        .socket
}

fn send(sock: &UnixStream, request: u32, flags: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&(1 | flags).to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(fds));
    }
    // The backend may have closed the connection already.
    let _ = sendmsg(
        sock,
        &[std::io::IoSlice::new(&msg)],
        &mut control,
        SendFlags::NOSIGNAL,
    );
}

/// Bytes of the input, zeros once it is used up.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |v, i| v | (u64::from(self.u8()) << (8 * i)))
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

struct Frontend {
    sock: UnixStream,
    memfd: File,
    mem: GuestMemoryMmap,
    kick: File,
    call: File,
    avail: u16,
}

impl Frontend {
    fn state(index: u32, num: u32) -> Vec<u8> {
        [index.to_le_bytes(), num.to_le_bytes()].concat()
    }

    fn setup(&self, queue: u32, event_idx: bool, inflight: bool) {
        let s = &self.sock;
        let mut features: u64 = (1 << 32) | (1 << 30) | (1 << 9);
        if event_idx {
            features |= 1 << 29;
        }
        send(s, req::SET_FEATURES, 0, &features.to_le_bytes(), &[]);
        let mut p = protocol::REPLY_ACK | protocol::CONFIG | protocol::MQ;
        if inflight {
            p |= protocol::INFLIGHT_SHMFD;
        }
        send(s, req::SET_PROTOCOL_FEATURES, 0, &p.to_le_bytes(), &[]);
        send(s, req::SET_OWNER, 0, &[], &[]);
        let mut t = vec![1, 0, 0, 0, 0, 0, 0, 0];
        for v in [0, MEM, USER, 0] {
            t.extend_from_slice(&u64::to_le_bytes(v));
        }
        send(s, req::SET_MEM_TABLE, 0, &t, &[self.memfd.as_fd()]);
        send(
            s,
            req::SET_VRING_NUM,
            0,
            &Self::state(queue, u32::from(QSIZE)),
            &[],
        );
        send(s, req::SET_VRING_BASE, 0, &Self::state(queue, 0), &[]);
        let mut a = Vec::new();
        a.extend_from_slice(&queue.to_le_bytes());
        a.extend_from_slice(&0u32.to_le_bytes());
        for v in [DESC, USED, AVAIL, 0] {
            a.extend_from_slice(&(USER + v).to_le_bytes());
        }
        send(s, req::SET_VRING_ADDR, 0, &a, &[]);
        let word = u64::from(queue).to_le_bytes();
        send(s, req::SET_VRING_CALL, 0, &word, &[self.call.as_fd()]);
        send(s, req::SET_VRING_KICK, 0, &word, &[self.kick.as_fd()]);
        send(s, req::SET_VRING_ENABLE, 0, &Self::state(queue, 1), &[]);
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * u64::from(i % QSIZE);
        let _ = self.mem.write_obj(addr, GuestAddress(at));
        let _ = self.mem.write_obj(len, GuestAddress(at + 8));
        let _ = self.mem.write_obj(flags, GuestAddress(at + 12));
        let _ = self.mem.write_obj(next, GuestAddress(at + 14));
    }

    fn publish(&mut self, head: u16) {
        let at = AVAIL + 4 + 2 * u64::from(self.avail % QSIZE);
        let _ = self.mem.write_obj(head, GuestAddress(at));
        self.avail = self.avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let _ = self.mem.write_obj(self.avail, GuestAddress(AVAIL + 2));
        let _ = (&self.kick).write_all(&1u64.to_ne_bytes());
    }
}

fn memfd(len: u64) -> File {
    let f =
        File::from(rustix::fs::memfd_create("vu-fuzz", rustix::fs::MemfdFlags::CLOEXEC).unwrap());
    f.set_len(len).unwrap();
    f
}

fn eventfd() -> File {
    File::from(
        rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .unwrap(),
    )
}

/// One frontend from arbitrary bytes (see the module documentation).
pub fn session(data: &[u8]) {
    let sock = UnixStream::connect(socket()).expect("the backend is gone");
    let memfd = memfd(MEM);
    let region =
        MmapRegion::<()>::from_file(FileOffset::new(memfd.try_clone().unwrap(), 0), MEM as usize)
            .unwrap();
    let mem =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();
    let mut f = Frontend {
        sock,
        memfd,
        mem,
        kick: eventfd(),
        call: eventfd(),
        avail: 0,
    };
    // Replies are drained so that the backend never blocks on them.
    let mut r = f.sock.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
    });
    let mut input = Input(data);
    let mut ops = 0;
    while !input.0.is_empty() && ops < 64 {
        ops += 1;
        match input.u8() % 6 {
            0 => {
                let b = input.u8();
                f.setup(u32::from(b & 1), b & 2 != 0, b & 4 != 0);
            }
            1 => {
                let request = u32::from(input.u8() % 40);
                let flags = if input.u8() & 1 != 0 { 1 << 3 } else { 0 };
                let len = usize::from(input.u8() % 80);
                let payload = input.bytes(len);
                let fds = input.u8() % 4;
                let mut v: Vec<BorrowedFd<'_>> = Vec::new();
                if fds & 1 != 0 {
                    v.push(f.memfd.as_fd());
                }
                if fds & 2 != 0 {
                    v.push(f.kick.as_fd());
                }
                send(&f.sock, request, flags, &payload, &v);
            }
            2 => {
                let at = u64::from(input.u16()) * 4 % MEM;
                let len = usize::from(input.u8() % 64);
                let bytes = input.bytes(len);
                let _ = f.mem.write_slice(&bytes, GuestAddress(at));
            }
            3 => {
                let i = u16::from(input.u8());
                let wild = input.u8();
                let addr = if wild & 1 != 0 {
                    input.u64()
                } else {
                    u64::from(input.u16()) * 16 % MEM
                };
                let len = u32::from(input.u16()) << (wild >> 5);
                let flags = u16::from(input.u8() & 7);
                let next = u16::from(input.u8() % 20);
                f.desc(i, addr, len, flags, next);
            }
            4 => {
                let head = u16::from(input.u8() % 20);
                f.publish(head);
            }
            _ => {
                // A well-formed chain of header, data and status at a slot of the table.
                let slot = u16::from(input.u8() % 5);
                let typ = u32::from(input.u8() % 16);
                let sector = u64::from(input.u16()) % 2100;
                let len = (u32::from(input.u8() % 16) + 1) * 512;
                let head = 3 * slot;
                let hdr = HDR + 16 * u64::from(slot);
                let _ = f.mem.write_obj(typ, GuestAddress(hdr));
                let _ = f.mem.write_obj(sector, GuestAddress(hdr + 8));
                let write_data = if typ == 1 || typ == 11 || typ == 13 {
                    0
                } else {
                    2
                };
                f.desc(head, hdr, 16, 1, head + 1);
                f.desc(
                    head + 1,
                    DATA + 0x2000 * u64::from(slot),
                    len,
                    write_data | 1,
                    head + 2,
                );
                f.desc(head + 2, HDR + 0x100 + u64::from(slot), 1, 2, 0);
                f.publish(head);
            }
        }
    }
    // Give the backend a moment with what it was handed, then leave.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(20) {
        let used: u16 = f.mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0);
        if used == f.avail {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = f.sock.shutdown(std::net::Shutdown::Both);
    reader.join().unwrap();
    drop(f);
    // The backend serves the next frontend.
    let s = UnixStream::connect(socket()).expect("the backend is gone");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    send(&s, req::GET_FEATURES, 0, &[], &[]);
    let mut reply = [0u8; 20];
    (&s).read_exact(&mut reply)
        .expect("the backend did not serve the next frontend within 5 s");
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()),
        req::GET_FEATURES
    );
}
