//! The logic of the NBD fuzz targets (`fuzz/fuzz_targets/nbd_*.rs`), shared with the replay of
//! their regressions in `serve/tests/fuzz_regressions.rs`.
//!
//! - [`options`]: the option parsers over arbitrary bytes; what parses must encode back to the
//!   same bytes, and meta context matching keeps its rules.
//! - [`requests`]: the request header parser, the same way.
//! - [`connection`]: a whole server connection in-process. A daemon over memory exports listens
//!   on a Unix socket (started once per process); each input is one client. Its first byte
//!   chooses a correct handshake to put in front (or none) and whether the rest is raw client
//!   bytes or compact request records turned into well-framed requests. Nothing in the server
//!   may panic or hang; with records, every request before the connection ends must get exactly
//!   one complete, well-formed reply.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use vstor_core::{BlockDevice, MemoryDevice};
use vstor_serve::daemon::{Daemon, DaemonConfig, ExportArg, NbdAddr};
use vstor_serve::export::ServeError;
use vstor_serve::nbd::proto::{self, chunk, cmd, opt, rep};
use vstor_serve::nbd::NbdConfig;
use vstor_serve::{Opened, Opener};

/// Size of the exports the connection target serves.
pub const EXPORT_SIZE: u64 = 1 << 20;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// The option parsers: `parse_option_header`, `parse_info`, `parse_meta`, `match_contexts`.
pub fn options(data: &[u8]) {
    if let Some(h) = data.get(..16) {
        let h: &[u8; 16] = h.try_into().unwrap();
        match proto::parse_option_header(h) {
            Ok((o, len)) => {
                let mut enc = proto::IHAVEOPT.to_be_bytes().to_vec();
                enc.extend_from_slice(&o.to_be_bytes());
                enc.extend_from_slice(&len.to_be_bytes());
                assert_eq!(enc, h);
            }
            Err(_) => assert_ne!(be64(h), proto::IHAVEOPT),
        }
    }
    if let Ok(i) = proto::parse_info(data) {
        assert!(i.name.len() <= 4096);
        let mut enc = (i.name.len() as u32).to_be_bytes().to_vec();
        enc.extend_from_slice(i.name.as_bytes());
        enc.extend_from_slice(&(i.requests.len() as u16).to_be_bytes());
        for r in &i.requests {
            enc.extend_from_slice(&r.to_be_bytes());
        }
        assert_eq!(
            enc, data,
            "parse_info accepted bytes it does not account for"
        );
    }
    if let Ok(m) = proto::parse_meta(data) {
        assert!(m.name.len() <= 4096 && m.queries.len() <= 256);
        let mut enc = (m.name.len() as u32).to_be_bytes().to_vec();
        enc.extend_from_slice(m.name.as_bytes());
        enc.extend_from_slice(&(m.queries.len() as u32).to_be_bytes());
        for q in &m.queries {
            assert!(q.len() <= 4096);
            enc.extend_from_slice(&(q.len() as u32).to_be_bytes());
            enc.extend_from_slice(q.as_bytes());
        }
        assert_eq!(
            enc, data,
            "parse_meta accepted bytes it does not account for"
        );
        for q in &m.queries {
            contexts(q);
        }
    }
    contexts(&String::from_utf8_lossy(data));
}

/// `match_contexts`' rules: SET matches one exact name; LIST also matches namespaces.
fn contexts(q: &str) {
    let set = proto::match_contexts(q, false);
    let list = proto::match_contexts(q, true);
    assert!(set.len() <= 1);
    for c in &set {
        assert_eq!(c.0, q);
        assert!(list.contains(c));
    }
    for c in &list {
        assert!(proto::CONTEXTS.contains(c));
        assert!(c.0 == q || (q.ends_with(':') && c.0.starts_with(q)));
    }
}

/// The request header parser over every 28-byte window of `data`.
pub fn requests(data: &[u8]) {
    for w in data.windows(proto::REQUEST_HEADER).step_by(7) {
        let b: &[u8; proto::REQUEST_HEADER] = w.try_into().unwrap();
        match proto::parse_request(b) {
            Ok(h) => {
                let mut enc = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
                enc.extend_from_slice(&h.flags.to_be_bytes());
                enc.extend_from_slice(&h.kind.to_be_bytes());
                enc.extend_from_slice(&h.cookie.to_be_bytes());
                enc.extend_from_slice(&h.offset.to_be_bytes());
                enc.extend_from_slice(&h.len.to_be_bytes());
                assert_eq!(enc, w);
            }
            Err(_) => assert_ne!(be32(w), proto::REQUEST_MAGIC),
        }
    }
}

/// Opens `mem:SIZE` as a fresh memory device.
struct MemOpener;

impl Opener for MemOpener {
    fn open(&self, _name: &str, target: &str, read_only: bool) -> Result<Opened, ServeError> {
        let size = target
            .strip_prefix("mem:")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ServeError::invalid(format!("unknown target {target}")))?;
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

/// The daemon every input talks to: exports `d` (writable) and `ro` (read-only), 1 MiB each.
fn socket() -> &'static PathBuf {
    static SERVER: OnceLock<(Daemon, PathBuf)> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("vstor-nbd-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("nbd.sock");
            let cfg = DaemonConfig {
                nbd: vec![NbdAddr::Unix(path.clone())],
                exports: vec![format!("d=mem:{EXPORT_SIZE}").parse::<ExportArg>().unwrap()],
                nbd_config: NbdConfig {
                    workers: 2,
                    max_connections: 64,
                    handshake_timeout: Duration::from_secs(5),
                },
                ..Default::default()
            };
            let d = Daemon::start(cfg, Arc::new(MemOpener)).unwrap();
            d.registry()
                .add("ro", &format!("mem:{EXPORT_SIZE}"), true)
                .unwrap();
            (d, path)
        })
        .1
}

/// What the first byte of a connection input asks for.
struct Mode {
    handshake: bool,
    structured: bool,
    meta: bool,
    read_only: bool,
    records: bool,
}

impl Mode {
    fn of(b: u8) -> Mode {
        Mode {
            handshake: b & 1 != 0,
            structured: b & 2 != 0,
            meta: b & 4 != 0,
            read_only: b & 8 != 0,
            records: b & 16 != 0,
        }
    }
}

fn option(out: &mut Vec<u8>, o: u32, data: &[u8]) {
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&o.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A request made from a compact record: what was sent and whether the server goes on after it.
struct Sent {
    kind: u16,
    len: u32,
    /// A WRITE whose payload is cut by the end of the input: it gets no answer.
    cut: bool,
}

/// Turns 12-byte records into framed requests: kind, flags, offset (in sectors, or huge),
/// length (sectors or raw bytes), and whether a WRITE's payload is sent whole.
fn records(rest: &[u8], out: &mut Vec<u8>, sent: &mut HashMap<u64, Sent>) {
    for (i, r) in rest.chunks_exact(12).enumerate() {
        let kind = u16::from(r[0] % 10);
        let flags = u16::from(r[1]) | if r[1] & 0x80 != 0 { 0xff00 } else { 0 };
        let off = u32::from_be_bytes(r[2..6].try_into().unwrap());
        let offset = match off >> 30 {
            0 => u64::from(off % 4096) * 512,
            1 => u64::from(off),
            2 => EXPORT_SIZE - u64::from(off & 0xffff),
            _ => u64::MAX - u64::from(off & 0xffff),
        };
        let l = u32::from_be_bytes(r[6..10].try_into().unwrap());
        let len = match l >> 30 {
            0 => (l % 256) * 512,
            1 => l % (1 << 20),
            2 => proto::MAX_PAYLOAD + (l & 0xffff),
            _ => l,
        };
        let whole = r[10] & 1 == 0;
        let cookie = i as u64 + 1;
        out.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        if kind == cmd::DISC {
            return;
        }
        // An oversized WRITE is answered (EOVERFLOW), then the server ends the connection.
        let ends = kind == cmd::WRITE && len > proto::MAX_PAYLOAD;
        let cut = kind == cmd::WRITE && !ends && !whole && len > 0;
        sent.insert(cookie, Sent { kind, len, cut });
        if ends {
            return;
        }
        if kind == cmd::WRITE {
            if cut {
                // Half the payload, then the end of the input.
                out.extend(std::iter::repeat_n(r[11], len as usize / 2));
                return;
            }
            out.extend(std::iter::repeat_n(r[11], len as usize));
        }
    }
}

/// Reads exactly `n` bytes or reports the end.
fn take(s: &mut impl Read, n: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).ok().map(|_| b)
}

/// Checks the server's answer to a correct handshake and well-framed requests.
fn check_replies(r: &mut impl Read, m: &Mode, sent: &mut HashMap<u64, Sent>) {
    let g = take(r, 18).expect("no greeting");
    assert_eq!(be64(&g), proto::NBDMAGIC);
    let mut expect = vec![];
    if m.structured {
        expect.push(opt::STRUCTURED_REPLY);
    }
    if m.structured && m.meta {
        expect.push(opt::SET_META_CONTEXT);
    }
    expect.push(opt::GO);
    for o in expect {
        loop {
            let h = take(r, 20).expect("option reply cut");
            assert_eq!(be64(&h), proto::REPLY_MAGIC);
            assert_eq!(be32(&h[8..]), o);
            let kind = be32(&h[12..]);
            take(r, be32(&h[16..]) as usize).expect("option reply data cut");
            if kind == rep::ACK {
                break;
            }
            assert!(
                kind == rep::INFO || kind == rep::META_CONTEXT,
                "option {o}: reply {kind:#x}"
            );
        }
    }
    while let Some(h) = take(r, 4) {
        let magic = be32(&h);
        if magic == proto::SIMPLE_REPLY_MAGIC {
            assert!(
                !m.structured,
                "a simple reply after structured replies were agreed"
            );
            let h = take(r, 12).expect("simple reply cut");
            let (e, cookie) = (be32(&h), be64(&h[4..]));
            let s = sent.remove(&cookie).expect("a reply to no request");
            assert!(!s.cut, "a WRITE answered before its payload came");
            if e == 0 && s.kind == cmd::READ {
                take(r, s.len as usize).expect("read data cut");
            }
            continue;
        }
        assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC, "bad reply magic");
        assert!(m.structured);
        let h = take(r, 16).expect("chunk header cut");
        let (flags, kind, cookie, len) = (be16(&h), be16(&h[2..]), be64(&h[4..]), be32(&h[12..]));
        let s = sent.get(&cookie).expect("a chunk for no request");
        let d = take(r, len as usize).expect("chunk cut");
        match kind {
            chunk::NONE => assert_eq!(len, 0),
            chunk::OFFSET_DATA | chunk::OFFSET_HOLE => {
                assert_eq!(s.kind, cmd::READ);
                assert!(len >= 8);
            }
            chunk::BLOCK_STATUS => {
                assert_eq!(s.kind, cmd::BLOCK_STATUS);
                assert!(
                    len >= 12 && (len - 4) % 8 == 0,
                    "block status of {len} bytes"
                );
            }
            chunk::ERROR => {
                assert!(len >= 6);
                assert_eq!(be16(&d[4..]) as u32 + 6, len);
                assert_ne!(be32(&d), 0);
            }
            k => panic!("unknown chunk type {k}"),
        }
        assert!(!s.cut, "a WRITE answered before its payload came");
        if flags & chunk::FLAG_DONE != 0 {
            sent.remove(&cookie);
        }
    }
    // Every request was answered, but a WRITE whose payload never came whole (always the last).
    sent.retain(|_, s| !s.cut);
    assert!(sent.is_empty(), "unanswered requests: {:?}", sent.keys());
}

/// One client connection from arbitrary bytes (see the module documentation).
pub fn connection(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let m = Mode::of(first);
    let mut out = Vec::new();
    if m.handshake {
        out.extend_from_slice(
            &(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes(),
        );
        if m.structured {
            option(&mut out, opt::STRUCTURED_REPLY, &[]);
        }
        let name: &[u8] = if m.read_only { b"ro" } else { b"d" };
        if m.structured && m.meta {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name);
            d.extend_from_slice(&2u32.to_be_bytes());
            for q in ["base:allocation", "qemu:allocation-depth"] {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            option(&mut out, opt::SET_META_CONTEXT, &d);
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&0u16.to_be_bytes());
        option(&mut out, opt::GO, &d);
    }
    let mut sent = HashMap::new();
    let checked = m.handshake && m.records;
    if checked {
        records(rest, &mut out, &mut sent);
    } else {
        out.extend_from_slice(rest);
    }
    let s = UnixStream::connect(socket()).expect("the server is gone");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // The server may close before it has read everything.
        let _ = w.write_all(&out);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut r = std::io::BufReader::with_capacity(1 << 16, s);
    if checked {
        check_replies(&mut r, &m, &mut sent);
    }
    // The server must end the connection once the input is over.
    let mut sink = [0u8; 1 << 16];
    loop {
        match r.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server did not end the connection: {e}"),
        }
    }
    writer.join().unwrap();
}
