//! `vstor serve`'s NBD server and control API against a hostile client (issue 16).
//!
//! Each test starts a daemon in-process (its own sockets, its own exports over memory devices
//! or raw temp files) and speaks raw NBD over a Unix socket: the fixed-newstyle handshake,
//! structured replies, GO, then requests that a well-behaved client never sends. Every case
//! asserts the error the protocol names (or a closed connection), and that other clients and
//! the data are unharmed.
//!
//! The test that opens a thousand idle connections measures this process's threads and memory,
//! so it runs alone: it takes [`SERIAL`] for writing, every other test for reading.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, ErrorKind as IoKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};
use vstor_core::{BlockDevice, ErrorKind, FileDevice, FileOptions, MemoryDevice};
use vstor_serve::daemon::{Daemon, DaemonConfig, ExportArg, NbdAddr};
use vstor_serve::export::ServeError;
use vstor_serve::nbd::proto::{
    self, cflag, chunk, cmd, err, info, opt, rep, tflag, MAX_OPTION, MAX_PAYLOAD,
};
use vstor_serve::nbd::NbdConfig;
use vstor_serve::{Opened, Opener};

/// How long a client waits for an answer that must come.
const WAIT: Duration = Duration::from_secs(10);
/// Size of the memory exports.
const MEM: u64 = 4 << 20;

static SERIAL: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    SERIAL.read().unwrap_or_else(|p| p.into_inner())
}

fn alone() -> RwLockWriteGuard<'static, ()> {
    SERIAL.write().unwrap_or_else(|p| p.into_inner())
}

/// Opens `mem:SIZE` (a fresh zeroed memory device) and `file:PATH` (a raw file).
struct TestOpener;

impl Opener for TestOpener {
    fn open(&self, _name: &str, target: &str, read_only: bool) -> Result<Opened, ServeError> {
        let device: Arc<dyn BlockDevice> = if let Some(size) = target.strip_prefix("mem:") {
            let size = size
                .parse()
                .map_err(|_| ServeError::invalid(format!("bad size in {target}")))?;
            let d = MemoryDevice::new(size)?;
            Arc::new(if read_only { d.into_read_only() } else { d })
        } else if let Some(path) = target.strip_prefix("file:") {
            let opts = FileOptions {
                read_only,
                ..Default::default()
            };
            Arc::new(FileDevice::open(path, &opts)?)
        } else {
            return Err(ServeError::new(
                ErrorKind::NotFound,
                format!("unknown target {target}"),
            ));
        };
        Ok(Opened {
            device,
            live: None,
            qos: None,
            notes: Vec::new(),
            format: "raw".into(),
        })
    }
}

/// A daemon with an NBD socket and a control socket in a temp dir; shut down on drop.
struct Fixture {
    daemon: Option<Daemon>,
    nbd: PathBuf,
    control: PathBuf,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Exports `d` (a 4 MiB memory device) and `e` (another) with `config`.
    fn start(config: NbdConfig) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let nbd = dir.path().join("nbd.sock");
        let control = dir.path().join("api.sock");
        let exports = ["d", "e"]
            .iter()
            .map(|n| format!("{n}=mem:{MEM}").parse::<ExportArg>().unwrap())
            .collect();
        let cfg = DaemonConfig {
            control: Some(control.clone()),
            nbd: vec![NbdAddr::Unix(nbd.clone())],
            exports,
            nbd_config: config,
            ..Default::default()
        };
        let daemon = Daemon::start(cfg, Arc::new(TestOpener)).unwrap();
        Fixture {
            daemon: Some(daemon),
            nbd,
            control,
            dir,
        }
    }

    fn default() -> Fixture {
        Fixture::start(NbdConfig::default())
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    /// Adds an export of `target`.
    fn add(&self, name: &str, target: &str, read_only: bool) {
        self.daemon()
            .registry()
            .add(name, target, read_only)
            .unwrap();
    }

    /// A client in transmission on `name`, with structured replies and `meta` contexts.
    fn client(&self, name: &str, meta: &[&str]) -> Client {
        let mut c = Client::connect(&self.nbd);
        c.greet(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES);
        c.structured();
        if !meta.is_empty() {
            let got = c.set_meta(name, meta);
            assert_eq!(got.len(), meta.len(), "contexts {meta:?} not all selected");
        }
        c.go(name).unwrap();
        c
    }

    /// The number of connections the export `name` reports.
    fn connections(&self, name: &str) -> u64 {
        self.daemon()
            .registry()
            .get(name)
            .unwrap()
            .info()
            .connections
    }

    /// Checks that the daemon still serves: a fresh client writes and reads back on `e`.
    fn still_serves(&self) {
        let mut c = self.client("e", &[]);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        c.write_ok(8192, &data);
        assert_eq!(c.read(8192, 4096), data);
        c.disconnect();
        let mut api = Api::connect(&self.control);
        let list = api.call(json!({"jsonrpc": "2.0", "id": 99, "method": "export.list"}));
        assert!(list["result"].as_array().is_some_and(|a| a.len() >= 2));
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let failed = d.shutdown();
            if !std::thread::panicking() {
                assert!(failed.is_empty(), "shutdown failed: {failed:?}");
            }
        }
    }
}

/// One structured reply, reassembled from its chunks.
#[derive(Debug, Default)]
struct Reply {
    /// The error of an ERROR chunk.
    error: Option<u32>,
    /// OFFSET_DATA chunks: (offset, data).
    data: Vec<(u64, Vec<u8>)>,
    /// OFFSET_HOLE chunks: (offset, length).
    holes: Vec<(u64, u32)>,
    /// BLOCK_STATUS chunks: (context id, (length, flags) descriptors).
    status: Vec<(u32, Vec<(u32, u32)>)>,
    /// Chunks in all.
    chunks: usize,
}

/// A raw NBD client.
struct Client {
    s: UnixStream,
    cookie: u64,
    structured: bool,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// The data of INFO and GO for `name`, asking for no particular information.
fn info_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// The data of SET_META_CONTEXT / LIST_META_CONTEXT.
fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

impl Client {
    fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        Client {
            s,
            cookie: 0,
            structured: false,
        }
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// Reads the server's greeting and sends `flags`.
    fn greet(&mut self, flags: u32) {
        let g = self.read_n(18);
        assert_eq!(be64(&g), proto::NBDMAGIC);
        assert_eq!(be64(&g[8..]), proto::IHAVEOPT);
        assert_ne!(be16(&g[16..]) & proto::FLAG_FIXED_NEWSTYLE, 0);
        self.s.write_all(&flags.to_be_bytes()).unwrap();
    }

    fn opt(&mut self, option: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// One option reply: (option, reply type, data).
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(be64(&h), proto::REPLY_MAGIC, "bad option reply magic");
        let len = be32(&h[16..]) as usize;
        assert!(len <= 64 << 10, "option reply of {len} bytes");
        (be32(&h[8..]), be32(&h[12..]), self.read_n(len))
    }

    /// Sends `option` and expects one reply of type `kind`.
    fn opt_expect(&mut self, option: u32, data: &[u8], kind: u32) {
        self.opt(option, data);
        let (o, k, d) = self.opt_reply();
        assert_eq!(o, option);
        assert_eq!(
            k,
            kind,
            "option {option}: reply {k:#x} ({})",
            String::from_utf8_lossy(&d)
        );
    }

    fn structured(&mut self) {
        self.opt_expect(opt::STRUCTURED_REPLY, &[], rep::ACK);
        self.structured = true;
    }

    /// SET_META_CONTEXT: the contexts selected.
    fn set_meta(&mut self, name: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.opt(opt::SET_META_CONTEXT, &meta_data(name, queries));
        let mut out = Vec::new();
        loop {
            let (o, k, d) = self.opt_reply();
            assert_eq!(o, opt::SET_META_CONTEXT);
            match k {
                rep::META_CONTEXT => {
                    out.push((be32(&d), String::from_utf8(d[4..].to_vec()).unwrap()))
                }
                rep::ACK => return out,
                _ => panic!("SET_META_CONTEXT: reply {k:#x}"),
            }
        }
    }

    /// GO: (size, transmission flags), or the error reply's type.
    fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        self.opt(opt::GO, &info_data(name));
        let mut export = None;
        loop {
            let (o, k, d) = self.opt_reply();
            assert_eq!(o, opt::GO);
            match k {
                rep::INFO if be16(&d) == info::EXPORT => {
                    export = Some((be64(&d[2..]), be16(&d[10..])));
                }
                rep::INFO => {}
                rep::ACK => return Ok(export.expect("GO acknowledged without INFO_EXPORT")),
                k if k & (1 << 31) != 0 => return Err(k),
                k => panic!("GO: reply {k:#x}"),
            }
        }
    }

    /// Sends a request; returns its cookie.
    fn send(&mut self, flags: u16, kind: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        self.cookie += 1;
        let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
        self.cookie
    }

    /// Reads one structured reply to `cookie`.
    fn reply(&mut self, cookie: u64) -> Reply {
        assert!(self.structured);
        let mut r = Reply::default();
        loop {
            let h = self.read_n(20);
            assert_eq!(be32(&h), proto::STRUCTURED_REPLY_MAGIC, "bad reply magic");
            let (flags, kind, len) = (be16(&h[4..]), be16(&h[6..]), be32(&h[16..]));
            assert_eq!(be64(&h[8..]), cookie, "reply to another request");
            assert!(len <= MAX_PAYLOAD + 8, "chunk of {len} bytes");
            let d = self.read_n(len as usize);
            r.chunks += 1;
            match kind {
                chunk::NONE => assert_eq!(len, 0),
                chunk::OFFSET_DATA => r.data.push((be64(&d), d[8..].to_vec())),
                chunk::OFFSET_HOLE => r.holes.push((be64(&d), be32(&d[8..]))),
                chunk::BLOCK_STATUS => {
                    let ds = d[4..].chunks(8).map(|c| (be32(c), be32(&c[4..])));
                    r.status.push((be32(&d), ds.collect()));
                }
                chunk::ERROR => {
                    let n = be16(&d[4..]) as usize;
                    assert_eq!(n + 6, d.len(), "error chunk's message length");
                    r.error = Some(be32(&d));
                }
                k => panic!("unknown chunk type {k}"),
            }
            if flags & chunk::FLAG_DONE != 0 {
                return r;
            }
        }
    }

    /// A simple reply: (error, data of `len` bytes when it succeeded).
    fn simple_reply(&mut self, cookie: u64, len: usize) -> (u32, Vec<u8>) {
        let h = self.read_n(16);
        assert_eq!(be32(&h), proto::SIMPLE_REPLY_MAGIC);
        assert_eq!(be64(&h[8..]), cookie);
        let e = be32(&h[4..]);
        (e, if e == 0 { self.read_n(len) } else { Vec::new() })
    }

    /// Sends a request and returns the error it gets (0: none).
    fn errno(&mut self, flags: u16, kind: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
        let c = self.send(flags, kind, offset, len, payload);
        self.reply(c).error.unwrap_or(0)
    }

    /// Reads `[offset, offset + len)`, holes included.
    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let c = self.send(0, cmd::READ, offset, len, &[]);
        let r = self.reply(c);
        assert_eq!(r.error, None, "read of {len} at {offset} failed");
        let mut out = vec![0u8; len as usize];
        let mut covered = 0u64;
        for (at, d) in &r.data {
            let i = (at - offset) as usize;
            out[i..i + d.len()].copy_from_slice(d);
            covered += d.len() as u64;
        }
        covered += r.holes.iter().map(|h| u64::from(h.1)).sum::<u64>();
        assert_eq!(covered, u64::from(len), "the chunks do not cover the read");
        out
    }

    fn write_ok(&mut self, offset: u64, data: &[u8]) {
        let e = self.errno(0, cmd::WRITE, offset, data.len() as u32, data);
        assert_eq!(e, 0, "write of {} at {offset}", data.len());
    }

    fn disconnect(mut self) {
        self.send(0, cmd::DISC, 0, 0, &[]);
    }

    /// Whether the server closed the connection: the end within `within`, and no data before.
    fn closed_within(&mut self, within: Duration) -> bool {
        self.s.set_read_timeout(Some(within)).unwrap();
        let mut b = [0u8; 64];
        let r = match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(n) => panic!("expected the end, got {n} bytes"),
            Err(e) if e.kind() == IoKind::ConnectionReset => true,
            Err(e) if matches!(e.kind(), IoKind::WouldBlock | IoKind::TimedOut) => false,
            Err(e) => panic!("read: {e}"),
        };
        self.s.set_read_timeout(Some(WAIT)).unwrap();
        r
    }
}

/// A raw control API client.
struct Api {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Api {
    fn connect(path: &Path) -> Api {
        let w = UnixStream::connect(path).unwrap();
        w.set_read_timeout(Some(WAIT)).unwrap();
        Api {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        }
    }

    fn line(&mut self, line: &[u8]) -> Value {
        self.w.write_all(line).unwrap();
        self.w.write_all(b"\n").unwrap();
        self.answer()
    }

    fn answer(&mut self) -> Value {
        let mut s = String::new();
        assert!(
            self.r.read_line(&mut s).unwrap() > 0,
            "API connection closed"
        );
        serde_json::from_str(&s).unwrap()
    }

    fn call(&mut self, v: Value) -> Value {
        self.line(v.to_string().as_bytes())
    }

    /// Asserts a JSON-RPC error of `code` and `kind`.
    fn expect_error(&mut self, req: &[u8], code: i64, kind: &str) {
        let v = self.line(req);
        let e = &v["error"];
        assert_eq!(
            e["code"].as_i64(),
            Some(code),
            "{}: {v}",
            String::from_utf8_lossy(&req[..req.len().min(200)])
        );
        assert_eq!(e["data"]["kind"].as_str(), Some(kind), "{v}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(v["jsonrpc"], "2.0");
    }
}

/// This process's threads and resident memory (bytes), from /proc/self/status.
fn threads_and_rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let l = s.lines().find(|l| l.starts_with(name)).unwrap();
        l.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Threads:"), field("VmRSS:") * 1024)
}

/// Waits until `f` holds, up to `within`.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn lengths_ranges_and_alignment_are_refused_and_the_connection_goes_on() {
    let _s = shared();
    let f = Fixture::default();
    let mut c = f.client("d", &[]);
    let data = pattern(64 << 10, 1);
    c.write_ok(0, &data);

    // Longer than 32 MiB: EOVERFLOW (and nothing that size is allocated).
    assert_eq!(
        c.errno(0, cmd::READ, 0, MAX_PAYLOAD + 512, &[]),
        err::EOVERFLOW
    );
    assert_eq!(c.errno(0, cmd::READ, 0, u32::MAX, &[]), err::EOVERFLOW);
    // offset + length overflows u64.
    let top = u64::MAX - 511;
    assert_eq!(c.errno(0, cmd::READ, top, 1024, &[]), err::EINVAL);
    assert_eq!(c.errno(0, cmd::TRIM, top, 1024, &[]), err::ENOSPC);
    assert_eq!(c.errno(0, cmd::CACHE, top, 1024, &[]), err::EINVAL);
    let e = c.errno(0, cmd::WRITE, top, 1024, &[0xEE; 1024]);
    assert!(
        e == err::ENOSPC || e == err::EINVAL,
        "overflowing write: {e}"
    );
    // Past the end: EINVAL for reads, ENOSPC for writes.
    assert_eq!(c.errno(0, cmd::READ, MEM, 512, &[]), err::EINVAL);
    assert_eq!(c.errno(0, cmd::READ, MEM - 512, 1024, &[]), err::EINVAL);
    assert_eq!(
        c.errno(0, cmd::WRITE, MEM - 512, 1024, &[0xEE; 1024]),
        err::ENOSPC
    );
    assert_eq!(c.errno(0, cmd::WRITE_ZEROES, MEM, 512, &[]), err::ENOSPC);
    assert_eq!(c.errno(0, cmd::TRIM, MEM - 512, 4096, &[]), err::ENOSPC);
    // Unaligned offset or length, and zero lengths.
    assert_eq!(c.errno(0, cmd::READ, 1, 512, &[]), err::EINVAL);
    assert_eq!(c.errno(0, cmd::READ, 0, 100, &[]), err::EINVAL);
    assert_eq!(c.errno(0, cmd::WRITE, 256, 512, &[0xEE; 512]), err::EINVAL);
    assert_eq!(c.errno(0, cmd::WRITE, 0, 700, &[0xEE; 700]), err::EINVAL);
    assert_eq!(c.errno(0, cmd::WRITE_ZEROES, 512, 100, &[]), err::EINVAL);
    assert_eq!(c.errno(0, cmd::TRIM, 3, 512, &[]), err::EINVAL);
    assert_eq!(c.errno(0, cmd::READ, 0, 0, &[]), err::EINVAL);
    assert_eq!(c.errno(0, cmd::WRITE, 0, 0, &[]), err::EINVAL);
    // The same connection still works and nothing was written.
    assert_eq!(c.read(0, 64 << 10), data);
    assert_eq!(c.read(MEM - 4096, 4096), vec![0u8; 4096]);

    // A WRITE longer than 32 MiB: its payload is not read, so EOVERFLOW ends the connection.
    assert_eq!(
        c.errno(0, cmd::WRITE, 0, MAX_PAYLOAD + 512, &[]),
        err::EOVERFLOW
    );
    assert!(c.closed_within(WAIT), "still open after an oversized WRITE");

    // Simple replies say the same, with no data after an error.
    let mut s = Client::connect(&f.nbd);
    s.greet(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES);
    s.go("d").unwrap();
    let k = s.send(0, cmd::READ, 0, MAX_PAYLOAD + 512, &[]);
    assert_eq!(s.simple_reply(k, 0).0, err::EOVERFLOW);
    let k = s.send(0, cmd::READ, MEM, 512, &[]);
    assert_eq!(s.simple_reply(k, 0).0, err::EINVAL);
    let k = s.send(0, cmd::READ, 0, 4096, &[]);
    assert_eq!(s.simple_reply(k, 4096), (0, data[..4096].to_vec()));
    s.disconnect();

    f.still_serves();
    assert_eq!(f.client("d", &[]).read(0, 64 << 10), data);
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let _s = shared();
    let f = Fixture::default();
    let mut c = f.client("d", &[]);
    let data = pattern(4096, 2);
    c.write_ok(0, &data);
    for kind in [8u16, 9, 0x100, 0xFFFF] {
        assert_eq!(c.errno(0, kind, 0, 512, &[]), err::EINVAL, "command {kind}");
    }
    // Known commands with flags they do not take, or flags nobody knows.
    let cases: [(u16, u16); 8] = [
        (cmd::READ, cflag::FUA),
        (cmd::READ, 1 << 15),
        (cmd::FLUSH, cflag::FUA),
        (cmd::CACHE, cflag::DF),
        (cmd::TRIM, cflag::NO_HOLE),
        (cmd::WRITE_ZEROES, cflag::DF),
        (cmd::BLOCK_STATUS, cflag::FUA),
        (cmd::READ, 1 << 5),
    ];
    for (kind, flags) in cases {
        let len = if kind == cmd::FLUSH { 0 } else { 512 };
        assert_eq!(
            c.errno(flags, kind, 0, len, &[]),
            err::EINVAL,
            "command {kind} with flags {flags:#x}"
        );
    }
    // A WRITE with a flag it does not take: its payload is read, the write refused.
    assert_eq!(
        c.errno(cflag::NO_HOLE, cmd::WRITE, 0, 4096, &[0xEE; 4096]),
        err::EINVAL
    );
    assert_eq!(
        c.errno(1 << 9, cmd::WRITE, 0, 4096, &[0xEE; 4096]),
        err::EINVAL
    );
    assert_eq!(c.read(0, 4096), data);
    // A FLUSH with a length and an offset is still a FLUSH.
    assert_eq!(c.errno(0, cmd::FLUSH, 0, 0, &[]), 0);
    c.disconnect();
    f.still_serves();
}

#[test]
fn a_bad_request_magic_closes_only_that_connection() {
    let _s = shared();
    let f = Fixture::default();
    let mut other = f.client("d", &[]);
    other.write_ok(0, &pattern(4096, 9));
    let mut c = f.client("d", &[]);
    c.s.write_all(&[0x55; proto::REQUEST_HEADER]).unwrap();
    assert!(c.closed_within(WAIT));
    assert_eq!(other.read(0, 4096), pattern(4096, 9));
    f.still_serves();
}

#[test]
fn a_read_only_export_refuses_every_write_and_the_file_is_unchanged() {
    let _s = shared();
    let f = Fixture::default();
    let path = f.dir.path().join("ro.raw");
    let content = pattern(1 << 20, 3);
    std::fs::write(&path, &content).unwrap();
    f.add("ro", &format!("file:{}", path.display()), true);

    let mut c = Client::connect(&f.nbd);
    c.greet(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES);
    c.structured();
    let (size, flags) = c.go("ro").unwrap();
    assert_eq!(size, 1 << 20);
    assert_ne!(flags & tflag::READ_ONLY, 0, "flags {flags:#x}");
    assert_eq!(flags & (tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES), 0);
    let page = [0xEEu8; 4096];
    assert_eq!(c.errno(0, cmd::WRITE, 0, 4096, &page), err::EPERM);
    assert_eq!(
        c.errno(cflag::FUA, cmd::WRITE, 8192, 4096, &page),
        err::EPERM
    );
    assert_eq!(c.errno(0, cmd::TRIM, 0, 1 << 20, &[]), err::EPERM);
    assert_eq!(c.errno(cflag::FUA, cmd::TRIM, 0, 4096, &[]), err::EPERM);
    assert_eq!(c.errno(0, cmd::WRITE_ZEROES, 0, 1 << 20, &[]), err::EPERM);
    for fl in [
        cflag::NO_HOLE,
        cflag::FAST_ZERO,
        cflag::NO_HOLE | cflag::FUA,
    ] {
        assert_eq!(c.errno(fl, cmd::WRITE_ZEROES, 0, 4096, &[]), err::EPERM);
    }
    assert_eq!(c.errno(0, cmd::FLUSH, 0, 0, &[]), 0);
    assert_eq!(c.read(0, 64 << 10), content[..64 << 10]);
    c.disconnect();
    f.still_serves();
    let mut f = f;
    let failed = f.daemon.take().unwrap().shutdown();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(std::fs::read(&path).unwrap() == content, "the file changed");
}

#[test]
fn a_client_that_dies_in_a_write_payload_writes_nothing() {
    let _s = shared();
    let f = Fixture::default();
    let mut b = f.client("d", &[]);
    let before = pattern(1 << 20, 4);
    b.write_ok(0, &before);

    // Half a payload, then gone.
    let mut a = f.client("d", &[]);
    a.send(cflag::FUA, cmd::WRITE, 0, 1 << 20, &[0xAB; 300 << 10]);
    drop(a);
    // A header cut in the middle.
    let mut h = f.client("d", &[]);
    h.s.write_all(&proto::REQUEST_MAGIC.to_be_bytes()).unwrap();
    h.s.write_all(&[0, 0, 0, 1, 0, 0]).unwrap();
    drop(h);
    // A payload that stops arriving while the connection stays: the others go on meanwhile.
    let mut stall = f.client("d", &[]);
    stall.send(0, cmd::WRITE, 0, 64 << 10, &[0xCD; 4096]);

    assert!(
        eventually(WAIT, || f.connections("d") == 2),
        "connections: {}",
        f.connections("d")
    );
    assert_eq!(b.read(0, 1 << 20), before);
    b.write_ok(1 << 20, &pattern(4096, 5));
    assert_eq!(b.read(1 << 20, 4096), pattern(4096, 5));
    drop(stall);
    assert!(eventually(WAIT, || f.connections("d") == 1));
    assert_eq!(b.read(0, 1 << 20), before);
    b.disconnect();
    f.still_serves();
}

#[test]
fn a_thousand_idle_connections_do_not_starve_a_client_and_time_out() {
    let _s = alone();
    let timeout = Duration::from_secs(3);
    let f = Fixture::start(NbdConfig {
        handshake_timeout: timeout,
        ..NbdConfig::default()
    });
    // Settle: a first client starts whatever the daemon starts lazily.
    f.still_serves();
    std::thread::sleep(Duration::from_millis(200));
    let (threads0, rss0) = threads_and_rss();

    let opened = Instant::now();
    let mut idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&f.nbd).unwrap())
        .collect();
    // Every one accepted and greeted (so its server side exists), then nothing.
    for s in &mut idle {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(be64(&g), proto::NBDMAGIC);
    }
    let (threads1, rss1) = threads_and_rss();
    let greeted = opened.elapsed();

    // A real client is served meanwhile.
    let mut c = f.client("d", &[]);
    c.write_ok(4096, &pattern(8192, 6));
    assert_eq!(c.read(4096, 8192), pattern(8192, 6));
    c.disconnect();
    let served = opened.elapsed();
    assert!(
        served < timeout,
        "the real client was served only after {served:?}: the test proves nothing"
    );

    let extra_threads = threads1.saturating_sub(threads0);
    let extra_rss = rss1.saturating_sub(rss0);
    eprintln!(
        "1000 idle connections (greeted in {greeted:?}): +{extra_threads} threads, \
         +{} KiB resident ({threads0} -> {threads1} threads, {} -> {} KiB)",
        extra_rss >> 10,
        rss0 >> 10,
        rss1 >> 10
    );
    // One thread per connection in the handshake (bounded by `max_connections`), and little
    // memory each: about 26 KiB measured (the handshake reads through a 4 KiB buffer; it was
    // 270 KiB while a 256 KiB reader buffer, zero-filled by the first read, served it).
    assert!(extra_threads <= 1000 + 16, "+{extra_threads} threads");
    assert!(extra_rss < 64 << 20, "+{} MiB resident", extra_rss >> 20);

    // Then every idle one is cut when its handshake time is up.
    let deadline = opened + timeout + Duration::from_secs(5);
    for (i, s) in idle.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == IoKind::ConnectionReset => {}
            other => panic!("idle connection {i} not closed by the deadline: {other:?}"),
        }
    }
    let cut = opened.elapsed();
    assert!(
        cut >= timeout,
        "cut after {cut:?}, before the handshake time"
    );
    drop(idle);
    assert!(
        eventually(WAIT, || threads_and_rss().0 <= threads0 + 4),
        "threads {} after the idle connections ended (were {threads0})",
        threads_and_rss().0
    );
    eprintln!("idle connections cut {cut:?} after they were opened");
    f.still_serves();
}

#[test]
fn a_client_that_drips_its_handshake_is_cut_at_the_handshake_time() {
    let _s = shared();
    let timeout = Duration::from_secs(1);
    let f = Fixture::start(NbdConfig {
        handshake_timeout: timeout,
        ..NbdConfig::default()
    });
    let mut c = Client::connect(&f.nbd);
    c.greet(proto::CLIENT_FIXED_NEWSTYLE);
    let start = Instant::now();
    // A GO for "d", one byte every 300 ms: 4.5 s of bytes, each well within the timeout.
    let mut msg = proto::IHAVEOPT.to_be_bytes().to_vec();
    msg.extend_from_slice(&opt::GO.to_be_bytes());
    let d = info_data("d");
    msg.extend_from_slice(&(d.len() as u32).to_be_bytes());
    msg.extend_from_slice(&d);
    let mut cut = false;
    for b in &msg[..15] {
        if c.s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let cut = cut || c.closed_within(Duration::from_millis(100));
    assert!(
        cut,
        "still in the handshake {:?} after it began (timeout {timeout:?})",
        start.elapsed()
    );
    f.still_serves();
}

#[test]
fn a_client_that_reads_no_option_replies_is_cut_at_the_handshake_time() {
    let _s = shared();
    let f = Fixture::start(NbdConfig {
        handshake_timeout: Duration::from_secs(1),
        max_connections: 1,
        ..NbdConfig::default()
    });
    let mut c = Client::connect(&f.nbd);
    c.greet(proto::CLIENT_FIXED_NEWSTYLE);
    // 40000 LISTs (two replies each) and never a read: the server's replies fill the socket.
    c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut one = proto::IHAVEOPT.to_be_bytes().to_vec();
    one.extend_from_slice(&opt::LIST.to_be_bytes());
    one.extend_from_slice(&0u32.to_be_bytes());
    let flood: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * 40000)
        .collect();
    let _ = c.s.write_all(&flood);
    std::thread::sleep(Duration::from_secs(3));
    // The slot must be free again: a new client gets a greeting rather than a closed socket.
    let mut g = [0u8; 18];
    let mut n = UnixStream::connect(&f.nbd).unwrap();
    n.set_read_timeout(Some(WAIT)).unwrap();
    assert!(
        n.read_exact(&mut g).is_ok(),
        "the flooding client still holds the only connection slot"
    );
    drop(c);
}

#[test]
fn hostile_options_get_errors_or_a_closed_connection() {
    let _s = shared();
    let f = Fixture::default();
    let hello = |f: &Fixture| {
        let mut c = Client::connect(&f.nbd);
        c.greet(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES);
        c
    };

    // Option data longer than allowed: ERR_TOO_BIG without reading it, then the end.
    let mut c = hello(&f);
    let mut h = proto::IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&opt::GO.to_be_bytes());
    h.extend_from_slice(&(MAX_OPTION + 1).to_be_bytes());
    c.s.write_all(&h).unwrap();
    let (o, k, _) = c.opt_reply();
    assert_eq!((o, k), (opt::GO, rep::ERR_TOO_BIG));
    assert!(c.closed_within(WAIT));
    let mut c = hello(&f);
    h[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&h).unwrap();
    assert_eq!(c.opt_reply().1, rep::ERR_TOO_BIG);
    assert!(c.closed_within(WAIT));

    // A bad option magic: closed.
    let mut c = hello(&f);
    let mut bad = h.clone();
    bad[0] ^= 0x80;
    bad[12..16].copy_from_slice(&0u32.to_be_bytes());
    c.s.write_all(&bad).unwrap();
    assert!(c.closed_within(WAIT));

    // Unknown client flags: closed before any option.
    for flags in [1u32 << 2, 1 << 31, u32::MAX] {
        let mut c = Client::connect(&f.nbd);
        c.greet(flags);
        assert!(c.closed_within(WAIT), "client flags {flags:#x}");
    }

    // EXPORT_NAME of an unknown name: that option has no error reply, so the end.
    let mut c = hello(&f);
    c.opt(opt::EXPORT_NAME, b"nope");
    assert!(c.closed_within(WAIT));
    let mut c = hello(&f);
    c.opt(opt::EXPORT_NAME, &[0xFF; 300]);
    assert!(c.closed_within(WAIT));
    // ... and of a known one: size and flags, no zeroes (NO_ZEROES was agreed).
    let mut c = hello(&f);
    c.opt(opt::EXPORT_NAME, b"d");
    let r = c.read_n(10);
    assert_eq!(be64(&r), MEM);
    assert_ne!(be16(&r[8..]) & tflag::HAS_FLAGS, 0);
    let k = c.send(0, cmd::READ, 0, 512, &[]);
    assert_eq!(c.simple_reply(k, 512), (0, vec![0u8; 512]));
    c.disconnect();

    // One connection, many bad options, each answered; then GO still works.
    let mut c = hello(&f);
    assert_eq!(c.go("nope"), Err(rep::ERR_UNKNOWN));
    assert_eq!(c.go(&"x".repeat(4096)), Err(rep::ERR_UNKNOWN));
    c.opt_expect(opt::INFO, &info_data("nope"), rep::ERR_UNKNOWN);
    // The empty name is the default export only when there is one; here there are two.
    assert_eq!(c.go(""), Err(rep::ERR_UNKNOWN));
    // Names and lengths that lie.
    c.opt_expect(opt::GO, &1000u32.to_be_bytes(), rep::ERR_INVALID);
    c.opt_expect(opt::GO, &[], rep::ERR_INVALID);
    let mut long = 4097u32.to_be_bytes().to_vec();
    long.extend(std::iter::repeat_n(b'x', 4097));
    long.extend_from_slice(&0u16.to_be_bytes());
    c.opt_expect(opt::GO, &long, rep::ERR_INVALID);
    let mut trailing = info_data("d");
    trailing.push(0);
    c.opt_expect(opt::GO, &trailing, rep::ERR_INVALID);
    let mut many = info_data("d");
    many[5..7].copy_from_slice(&u16::MAX.to_be_bytes());
    c.opt_expect(opt::INFO, &many, rep::ERR_INVALID);
    let mut utf = 2u32.to_be_bytes().to_vec();
    utf.extend_from_slice(&[0xC3, 0x28, 0, 0]);
    c.opt_expect(opt::GO, &utf, rep::ERR_INVALID);
    // Garbage as large as an option may be.
    c.opt_expect(opt::GO, &vec![0xA5; MAX_OPTION as usize], rep::ERR_INVALID);
    c.opt_expect(opt::LIST, b"data", rep::ERR_INVALID);
    c.opt_expect(opt::STRUCTURED_REPLY, b"x", rep::ERR_INVALID);
    // Meta contexts before structured replies, for unknown exports, malformed, too many.
    c.opt_expect(
        opt::SET_META_CONTEXT,
        &meta_data("d", &["base:allocation"]),
        rep::ERR_INVALID,
    );
    for o in [0u32, 4, 12, 0x1234, u32::MAX] {
        c.opt_expect(o, &[1, 2, 3], rep::ERR_UNSUP);
    }
    c.structured();
    c.opt_expect(
        opt::SET_META_CONTEXT,
        &meta_data("nope", &["base:allocation"]),
        rep::ERR_UNKNOWN,
    );
    let queries: Vec<&str> = vec!["base:allocation"; 257];
    c.opt_expect(
        opt::SET_META_CONTEXT,
        &meta_data("d", &queries),
        rep::ERR_INVALID,
    );
    c.opt_expect(
        opt::LIST_META_CONTEXT,
        &[0, 0, 0, 1, b'd', 0, 0, 0, 1, 0, 0, 0, 9],
        rep::ERR_INVALID,
    );
    // Unknown contexts select nothing.
    assert!(c.set_meta("d", &["nope:x", "base:", ""]).is_empty());
    let (size, _) = c.go("d").unwrap();
    assert_eq!(size, MEM);
    assert_eq!(c.read(0, 4096), vec![0u8; 4096]);
    c.disconnect();

    // ABORT: acknowledged, then the end.
    let mut c = hello(&f);
    c.opt_expect(opt::ABORT, &[], rep::ACK);
    assert!(c.closed_within(WAIT));
    // The end in the middle of an option.
    let mut c = hello(&f);
    c.s.write_all(&h[..10]).unwrap();
    drop(c);
    f.still_serves();
}

#[test]
fn block_status_needs_a_context_and_reports_holes_of_a_sparse_file() {
    let _s = shared();
    let f = Fixture::default();
    let path = f.dir.path().join("sparse.raw");
    {
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(&pattern(64 << 10, 7), 64 << 10).unwrap();
        file.sync_all().unwrap();
    }
    f.add("sparse", &format!("file:{}", path.display()), false);

    // No meta context selected: EINVAL.
    let mut c = f.client("sparse", &[]);
    assert_eq!(c.errno(0, cmd::BLOCK_STATUS, 0, 4096, &[]), err::EINVAL);
    c.disconnect();
    // Selected for another export than the one gone to: none.
    let mut c = Client::connect(&f.nbd);
    c.greet(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES);
    c.structured();
    assert_eq!(c.set_meta("d", &["base:allocation"]).len(), 1);
    c.go("sparse").unwrap();
    assert_eq!(c.errno(0, cmd::BLOCK_STATUS, 0, 4096, &[]), err::EINVAL);
    c.disconnect();
    // Without structured replies there are no contexts: EINVAL as a simple reply.
    let mut c = Client::connect(&f.nbd);
    c.greet(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES);
    c.go("sparse").unwrap();
    let k = c.send(0, cmd::BLOCK_STATUS, 0, 4096, &[]);
    assert_eq!(c.simple_reply(k, 0).0, err::EINVAL);
    c.disconnect();

    let mut c = f.client("sparse", &["base:allocation", "qemu:allocation-depth"]);
    let k = c.send(0, cmd::BLOCK_STATUS, 0, 1 << 20, &[]);
    let r = c.reply(k);
    assert_eq!(r.error, None);
    let hz = proto::STATE_HOLE | proto::STATE_ZERO;
    let expect_base = vec![(64 << 10, hz), (64 << 10, 0), (896 << 10, hz)];
    let expect_depth = vec![(64 << 10, 0), (64 << 10, 1), (896 << 10, 0)];
    assert_eq!(
        r.status,
        vec![
            (proto::CONTEXT_BASE_ALLOCATION, expect_base),
            (proto::CONTEXT_ALLOCATION_DEPTH, expect_depth)
        ]
    );
    // REQ_ONE: one descriptor per context.
    let k = c.send(cflag::REQ_ONE, cmd::BLOCK_STATUS, 64 << 10, 512 << 10, &[]);
    let r = c.reply(k);
    assert!(r.status.iter().all(|(_, d)| d.len() == 1), "{r:?}");
    assert_eq!(r.status[0].1[0], (64 << 10, 0));
    // Past the end, overflowing, empty: EINVAL.
    assert_eq!(
        c.errno(0, cmd::BLOCK_STATUS, 1 << 20, 512, &[]),
        err::EINVAL
    );
    assert_eq!(
        c.errno(0, cmd::BLOCK_STATUS, u64::MAX - 100, 4096, &[]),
        err::EINVAL
    );
    assert_eq!(c.errno(0, cmd::BLOCK_STATUS, 0, 0, &[]), err::EINVAL);
    // Unaligned is allowed: the descriptors cover what was asked, no more than the export.
    let k = c.send(0, cmd::BLOCK_STATUS, 1, (128 << 10) - 1, &[]);
    let r = c.reply(k);
    assert_eq!(r.error, None);
    for (_, d) in &r.status {
        let sum: u64 = d.iter().map(|x| u64::from(x.0)).sum();
        assert!(sum > 0 && sum < 1 << 20, "descriptors sum to {sum}");
        assert!(d.iter().all(|x| x.0 > 0), "an empty descriptor: {d:?}");
    }
    // A structured read of the whole file: its holes as holes, its data right.
    let k = c.send(0, cmd::READ, 0, 1 << 20, &[]);
    let r = c.reply(k);
    assert!(!r.holes.is_empty(), "no hole chunk: {r:?}");
    let mut want = vec![0u8; 1 << 20];
    want[64 << 10..128 << 10].copy_from_slice(&pattern(64 << 10, 7));
    assert_eq!(c.read(0, 1 << 20), want);
    c.disconnect();
    f.still_serves();
}

#[test]
fn a_read_with_df_is_answered_in_one_chunk() {
    let _s = shared();
    let f = Fixture::default();
    let path = f.dir.path().join("sparse-df.raw");
    {
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(&pattern(64 << 10, 8), 64 << 10).unwrap();
    }
    f.add("sparse", &format!("file:{}", path.display()), false);
    let mut c = f.client("sparse", &[]);
    let k = c.send(cflag::DF, cmd::READ, 0, 1 << 20, &[]);
    let r = c.reply(k);
    assert_eq!(r.error, None);
    assert_eq!(
        r.data.len() + r.holes.len(),
        1,
        "{} data and {} hole chunks",
        r.data.len(),
        r.holes.len()
    );
}

#[test]
fn refused_requests_are_not_counted_as_traffic() {
    let _s = shared();
    let f = Fixture::default();
    let mut c = f.client("d", &[]);
    assert_eq!(c.errno(0, cmd::READ, 0, u32::MAX, &[]), err::EOVERFLOW);
    assert_eq!(c.errno(0, cmd::READ, MEM, 512, &[]), err::EINVAL);
    c.disconnect();
    let st = f.daemon().registry().get("d").unwrap().stats();
    assert_eq!(st.bytes_read, 0, "{st:?}");
    assert_eq!(st.errors, 2);
}

#[test]
fn the_control_api_answers_garbage_with_errors_and_keeps_serving() {
    let _s = shared();
    let f = Fixture::default();
    let mut api = Api::connect(&f.control);
    use vstor_serve::control::code;

    api.expect_error(b"not json", code::PARSE_ERROR, "invalid-input");
    api.expect_error(&[0xFF, 0xFE, b'{'], code::PARSE_ERROR, "invalid-input");
    api.expect_error(&[b'['; 5000], code::PARSE_ERROR, "invalid-input");
    api.expect_error(
        b"{\"jsonrpc\":\"2.0\",\"id\":1",
        code::PARSE_ERROR,
        "invalid-input",
    );
    api.expect_error(
        br#"{"jsonrpc":"1.0","id":1,"method":"export.list"}"#,
        code::INVALID_REQUEST,
        "invalid-input",
    );
    api.expect_error(br#"[1,2,3]"#, code::INVALID_REQUEST, "invalid-input");
    api.expect_error(
        br#"{"jsonrpc":"2.0","id":1,"method":5}"#,
        code::INVALID_REQUEST,
        "invalid-input",
    );
    api.expect_error(
        br#"{"jsonrpc":"2.0","id":1,"method":"export.explode"}"#,
        code::METHOD_NOT_FOUND,
        "not-found",
    );
    // Parameters of the wrong type.
    let wrong: &[&[u8]] = &[
        br#"{"jsonrpc":"2.0","id":2,"method":"export.list","params":[1]}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.add","params":"x"}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.add","params":{"name":5,"target":"mem:4096"}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.add","params":{"name":"n","target":["x"]}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.add","params":{"name":"n","target":"mem:4096","readonly":"yes"}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.remove","params":{"name":null}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.resize","params":{"name":"d","size":"big"}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.resize","params":{"name":"d","size":-4096}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.resize","params":{"name":"d","size":1.5}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.resize","params":{"name":"d"}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.set-qos","params":{"name":"d","max_iops":-1}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.set-qos","params":{"name":"d"}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.stats","params":{"name":5}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.checkpoint","params":{"name":"d","child":5}}"#,
        br#"{"jsonrpc":"2.0","id":2,"method":"export.clone","params":{"name":"d","dest":false}}"#,
    ];
    for req in wrong {
        api.expect_error(req, code::INVALID_PARAMS, "invalid-input");
    }
    // An operation that fails says how.
    api.expect_error(
        br#"{"jsonrpc":"2.0","id":3,"method":"export.remove","params":{"name":"nope"}}"#,
        code::FAILED,
        "not-found",
    );
    api.expect_error(
        br#"{"jsonrpc":"2.0","id":3,"method":"export.add","params":{"name":"bad/name","target":"mem:4096"}}"#,
        code::FAILED,
        "invalid-input",
    );
    // A notification gets no answer, even when it fails; the next request does.
    api.w
        .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"export.explode\"}\n\n   \n")
        .unwrap();
    let v = api.call(json!({"jsonrpc": "2.0", "id": "x", "method": "export.list"}));
    assert_eq!(v["id"], "x");
    assert_eq!(v["result"].as_array().unwrap().len(), 2);

    // A line over 1 MiB: an error, then the end of that connection.
    let mut big = br#"{"jsonrpc":"2.0","id":4,"method":"export.list","params":{"pad":""#.to_vec();
    big.resize(vstor_serve::control::MAX_REQUEST_LINE + 10, b'a');
    big.extend_from_slice(br#""}}"#);
    let w = api.w.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut w = w;
        let _ = w.write_all(&big).and_then(|_| w.write_all(b"\n"));
    });
    let v = api.answer();
    assert_eq!(
        v["error"]["code"].as_i64(),
        Some(code::INVALID_REQUEST),
        "{v}"
    );
    assert_eq!(v["error"]["data"]["kind"], "invalid-input");
    let mut rest = String::new();
    assert_eq!(api.r.read_line(&mut rest).unwrap_or(0), 0, "{rest}");
    let _ = api.w.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();

    // A client that sends half a line and vanishes.
    let mut half = UnixStream::connect(&f.control).unwrap();
    half.write_all(br#"{"jsonrpc":"2.0","id":1,"meth"#).unwrap();
    drop(half);

    f.still_serves();
    assert_eq!(f.daemon().registry().names(), vec!["d", "e"]);
}

#[test]
fn a_client_that_reads_no_replies_does_not_hold_up_shutdown() {
    let _s = shared();
    let mut f = Fixture::default();
    let mut c = f.client("d", &[]);
    // 64 reads of 1 MiB, and never a reply read: the server's replies fill the socket.
    for i in 0..64 {
        c.send(0, cmd::READ, (i % 4) << 20, 1 << 20, &[]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let failed = f.daemon.take().unwrap().shutdown();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?}: {failed:?}"
    );
    assert!(failed.is_empty(), "{failed:?}");
    drop(c);
}
