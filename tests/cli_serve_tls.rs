//! `vstor serve --tls-creds`: NBD over TLS with QEMU's tls-creds-x509 as the client.
//!
//! A CA, a server certificate (for 127.0.0.1 and localhost) and client certificates are made
//! with the openssl command at test time. qemu-img and qemu-io (qemu-utils) and openssl are
//! installed by scripts/test.

mod common;

use common::s;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
";

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed by scripts/test (package openssl)");
    assert!(o.status.success(), "openssl {args:?}: {o:?}");
}

/// The credentials of one test: `srv/` (the daemon's --tls-creds), and client directories
/// for qemu's `tls-creds-x509,endpoint=client`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA named `vstor-test-ca` under `dir/NAME-ca-*.pem`.
    fn ca(&self, name: &str) {
        openssl(
            &self.dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}-ca-key.pem"),
                "-out",
                &format!("{name}-ca-cert.pem"),
                "-days",
                "2",
                "-subj",
                "/CN=vstor-test-ca",
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca",
            ],
        );
    }

    /// A certificate of `kind` (server, client) signed by CA `ca`, as `out_cert`/`out_key`.
    fn cert(&self, ca: &str, kind: &str, cn: &str, out_cert: &str, out_key: &str) {
        let csr = format!("{out_cert}.csr");
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                out_key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
                "-config",
                "openssl.cnf",
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &format!("{ca}-ca-cert.pem"),
                "-CAkey",
                &format!("{ca}-ca-key.pem"),
                "-CAcreateserial",
                "-out",
                out_cert,
                "-days",
                "2",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                kind,
            ],
        );
    }

    /// Makes the CA `main` with `srv/` (server credentials) and `cli/` (a client of it with a
    /// certificate), `nocert/` (a client without one) and `other/` (a client whose certificate
    /// comes from another CA of the same name, which its own ca-cert.pem also trusts so that
    /// qemu presents it).
    fn new(dir: &Path) -> Pki {
        std::fs::write(dir.join("openssl.cnf"), OPENSSL_CNF).unwrap();
        let p = Pki {
            dir: dir.to_path_buf(),
        };
        for d in ["srv", "cli", "nocert", "other"] {
            std::fs::create_dir(dir.join(d)).unwrap();
        }
        p.ca("main");
        p.ca("rogue");
        p.cert(
            "main",
            "server",
            "localhost",
            "srv/server-cert.pem",
            "srv/server-key.pem",
        );
        p.cert(
            "main",
            "client",
            "client",
            "cli/client-cert.pem",
            "cli/client-key.pem",
        );
        p.cert(
            "rogue",
            "client",
            "intruder",
            "other/client-cert.pem",
            "other/client-key.pem",
        );
        let main_ca = std::fs::read(dir.join("main-ca-cert.pem")).unwrap();
        let rogue_ca = std::fs::read(dir.join("rogue-ca-cert.pem")).unwrap();
        for d in ["srv", "cli", "nocert"] {
            std::fs::write(dir.join(d).join("ca-cert.pem"), &main_ca).unwrap();
        }
        std::fs::write(
            dir.join("other/ca-cert.pem"),
            [main_ca.as_slice(), rogue_ca.as_slice()].concat(),
        )
        .unwrap();
        p
    }

    fn path(&self, d: &str) -> PathBuf {
        self.dir.join(d)
    }
}

/// A running `vstor serve`, its stderr in a file; stopped with SIGTERM on drop.
struct Serve {
    child: Option<Child>,
    log: PathBuf,
    control: PathBuf,
}

impl Serve {
    fn start(dir: &Path, args: &[&str]) -> Serve {
        let log = dir.join("serve.log");
        let control = dir.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .arg("serve")
            .args(["--control", s(&control)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("run vstor serve");
        let mut me = Serve {
            child: Some(child),
            log,
            control,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&me.log)
            .unwrap_or_default()
            .contains("ready in")
        {
            if let Some(st) = me.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("vstor serve exited ({st}): {}", me.log());
            }
            assert!(Instant::now() < deadline, "not ready: {}", me.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The port of its TCP listener (it listens on port 0).
    fn port(&self) -> u16 {
        let o = common::vstor(&["server", "info", "--server", s(&self.control), "--json"]);
        assert!(o.status.success(), "server info: {o:?}");
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let nbd = j["nbd"].as_array().expect("nbd listeners");
        let tcp = nbd
            .iter()
            .filter_map(|v| v.as_str()?.strip_prefix("tcp:"))
            .next()
            .expect("a tcp listener");
        tcp.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// SIGTERM, then waits (at most `within`) for its exit; returns its stderr.
    fn stop_within(&mut self, within: Duration) -> String {
        let mut child = self.child.take().expect("running");
        let t = Instant::now();
        // SIGTERM: a graceful shutdown.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "vstor serve exited with {st}: {}", self.log());
                break;
            }
            if t.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vstor serve did not stop within {within:?}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.log()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// qemu's TLS client object on a credentials directory.
fn tls_object(dir: &Path) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(dir))
}

fn tcp_opts(port: u16, tls: bool) -> String {
    let mut o = format!("driver=nbd,host=127.0.0.1,port={port},export=d0");
    if tls {
        o.push_str(",tls-creds=tls0");
    }
    o
}

/// Runs qemu-img or qemu-io with `args`.
fn qemu(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is installed by scripts/test (qemu-utils): {e}"))
}

fn success(tool: &str, args: &[&str]) -> String {
    let o = qemu(tool, args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{tool} {args:?}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // qemu-io reports a failed command on stdout with exit 0.
    assert!(!out.contains("failed"), "{tool} {args:?}: {out}");
    out
}

fn failure(tool: &str, args: &[&str]) -> String {
    let o = qemu(tool, args);
    assert!(!o.status.success(), "{tool} {args:?} succeeded: {o:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A 64 MiB raw disk (sparse).
fn disk(dir: &Path) -> PathBuf {
    let p = dir.join("d0.raw");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    p
}

#[test]
fn qemu_reads_and_writes_through_tls_and_a_plain_client_is_told_tls_is_required() {
    let d = tempfile::tempdir().unwrap();
    let pki = Pki::new(d.path());
    let img = disk(d.path());
    let unix = d.path().join("nbd.sock");
    let mut srv = Serve::start(
        d.path(),
        &[
            "--nbd",
            "tcp:127.0.0.1:0",
            "--nbd",
            &format!("unix:{}", s(&unix)),
            "--export",
            &format!("d0={}", s(&img)),
            "--tls-creds",
            s(&pki.path("srv")),
        ],
    );
    let port = srv.port();
    let obj = tls_object(&pki.path("cli"));
    let tls = tcp_opts(port, true);

    let info = success(
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &tls],
    );
    assert!(info.contains("virtual size: 64 MiB"), "{info}");

    // Writes and reads through TLS, small and large (a 4 MiB request crosses the pump in
    // many records), zeroes, FUA and flush.
    success(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &tls,
            "-c",
            "write -P 0xab 1M 4M",
            "-c",
            "write -P 0xcd -f 6M 4k",
            "-c",
            "write -z 8M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 1M 4M",
            "-c",
            "read -P 0xcd 6M 4k",
            "-c",
            "read -P 0 8M 1M",
        ],
    );

    // 24 MiB of varied data copied in through TLS, compared back through TLS and through the
    // plain Unix listener: the bytes arrived intact and in place.
    let src = d.path().join("src.raw");
    let data: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let src_opts = format!("driver=raw,file.driver=file,file.filename={}", s(&src));
    let tls_24m = format!(
        "driver=raw,size={},{}",
        24u64 << 20,
        tls.split(',')
            .map(|kv| format!("file.{kv}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    success(
        "qemu-img",
        &[
            "convert",
            "-n",
            "--object",
            &obj,
            "--image-opts",
            &src_opts,
            "--target-image-opts",
            &tls_24m,
        ],
    );
    let same = success(
        "qemu-img",
        &[
            "compare",
            "--object",
            &obj,
            "--image-opts",
            &src_opts,
            &tls_24m,
        ],
    );
    assert!(same.contains("Images are identical"), "{same}");
    // The Unix listener stays plain (no --tls-unix) and sees the same disk.
    let plain_unix = format!(
        "driver=raw,size={},file.driver=nbd,file.server.type=unix,file.server.path={},file.export=d0",
        24u64 << 20,
        s(&unix)
    );
    let same = success(
        "qemu-img",
        &["compare", "--image-opts", &src_opts, &plain_unix],
    );
    assert!(same.contains("Images are identical"), "{same}");

    // A client without TLS on the TCP listener: refused, told why.
    let e = failure(
        "qemu-img",
        &["info", "--image-opts", &tcp_opts(port, false)],
    );
    assert!(e.contains("TLS negotiation required"), "{e}");
    assert!(e.contains("TLS is required"), "{e}");
    // The protocol's rules before STARTTLS, seen from a raw client.
    raw_client_before_tls(port);
    // A TLS client against the plain Unix listener is refused by policy.
    let e = failure(
        "qemu-img",
        &[
            "info",
            "--object",
            &obj,
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={},export=d0,tls-creds=tls0,tls-hostname=localhost",
                s(&unix)
            ),
        ],
    );
    assert!(e.contains("does not offer TLS"), "{e}");
    // After all the refusals, a TLS client is served as before.
    let info = success(
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &tls],
    );
    assert!(info.contains("virtual size: 64 MiB"), "{info}");

    let log = srv.stop_within(Duration::from_secs(10));
    assert!(log.contains("every export flushed and closed"), "{log}");
    let mut back = vec![0u8; data.len()];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert!(back == data, "the disk does not hold what was copied in");
}

#[test]
fn verify_peer_takes_a_client_of_the_ca_and_refuses_one_without_or_from_another_ca() {
    let d = tempfile::tempdir().unwrap();
    let pki = Pki::new(d.path());
    let img = disk(d.path());
    let mut srv = Serve::start(
        d.path(),
        &[
            "--nbd",
            "tcp:127.0.0.1:0",
            "--export",
            &format!("d0={}", s(&img)),
            "--tls-creds",
            s(&pki.path("srv")),
            "--tls-verify-peer",
        ],
    );
    let port = srv.port();
    let tls = tcp_opts(port, true);
    success(
        "qemu-io",
        &[
            "--object",
            &tls_object(&pki.path("cli")),
            "--image-opts",
            &tls,
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
        ],
    );
    // No certificate: the handshake fails.
    failure(
        "qemu-img",
        &[
            "info",
            "--object",
            &tls_object(&pki.path("nocert")),
            "--image-opts",
            &tls,
        ],
    );
    // A certificate from another CA (of the same name, so qemu offers it): refused.
    failure(
        "qemu-img",
        &[
            "info",
            "--object",
            &tls_object(&pki.path("other")),
            "--image-opts",
            &tls,
        ],
    );
    // The good client still gets in after the refusals.
    success(
        "qemu-io",
        &[
            "--object",
            &tls_object(&pki.path("cli")),
            "--image-opts",
            &tls,
            "-c",
            "read -P 0x5a 0 64k",
        ],
    );
    let log = srv.stop_within(Duration::from_secs(10));
    assert!(log.contains("peer sent no certificates"), "{log}");
    assert!(log.contains("invalid peer certificate"), "{log}");
}

#[test]
fn tls_unix_requires_tls_on_the_unix_listener_too() {
    let d = tempfile::tempdir().unwrap();
    let pki = Pki::new(d.path());
    let img = disk(d.path());
    let unix = d.path().join("nbd.sock");
    let mut srv = Serve::start(
        d.path(),
        &[
            "--nbd",
            &format!("unix:{}", s(&unix)),
            "--export",
            &format!("d0={}", s(&img)),
            "--tls-creds",
            s(&pki.path("srv")),
            "--tls-unix",
        ],
    );
    let over_unix = format!(
        "driver=nbd,server.type=unix,server.path={},export=d0",
        s(&unix)
    );
    success(
        "qemu-io",
        &[
            "--object",
            &tls_object(&pki.path("cli")),
            "--image-opts",
            &format!("{over_unix},tls-creds=tls0,tls-hostname=localhost"),
            "-c",
            "write -P 0x11 1M 1M",
            "-c",
            "read -P 0x11 1M 1M",
        ],
    );
    let e = failure("qemu-img", &["info", "--image-opts", &over_unix]);
    assert!(e.contains("TLS negotiation required"), "{e}");
    srv.stop_within(Duration::from_secs(10));
}

/// A client connected through TLS and idle does not hold up a graceful shutdown: the pump
/// passes the end on to the NBD side, which closes.
#[test]
fn shutdown_with_an_idle_tls_client_connected() {
    let d = tempfile::tempdir().unwrap();
    let pki = Pki::new(d.path());
    let img = disk(d.path());
    let mut srv = Serve::start(
        d.path(),
        &[
            "--nbd",
            "tcp:127.0.0.1:0",
            "--export",
            &format!("d0={}", s(&img)),
            "--tls-creds",
            s(&pki.path("srv")),
        ],
    );
    let port = srv.port();
    // qemu-io without -c reads commands from its standard input: it stays connected.
    let mut io = Command::new("qemu-io")
        .args([
            "--object",
            &tls_object(&pki.path("cli")),
            "--image-opts",
            &tcp_opts(port, true),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io is installed by scripts/test (qemu-utils)");
    io.stdin
        .as_mut()
        .unwrap()
        .write_all(b"write -P 0x77 0 64k\n")
        .unwrap();
    // Wait until the write is answered: the client is through the handshake, connected.
    let mut out = std::io::BufReader::new(io.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "qemu-io ended: {:?}", io.wait());
        if line.contains("wrote 65536/65536") {
            break;
        }
    }
    let t = Instant::now();
    let log = srv.stop_within(Duration::from_secs(10));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "{:?}: {log}",
        t.elapsed()
    );
    assert!(log.contains("every export flushed and closed"), "{log}");
    drop(io.stdin.take());
    let _ = io.wait();
}

/// Option haggling by hand on a FORCEDTLS listener: options other than STARTTLS are refused
/// with ERR_TLS_REQD, STARTTLS with data is invalid, EXPORT_NAME (which has no error reply)
/// closes the connection.
fn raw_client_before_tls(port: u16) {
    use std::io::Read;
    const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    const OPT_EXPORT_NAME: u32 = 1;
    const OPT_LIST: u32 = 3;
    const OPT_STARTTLS: u32 = 5;
    const REP_ERR_INVALID: u32 = (1 << 31) + 3;
    const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // Fixed newstyle, no zeroes.
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let opt = |c: &mut std::net::TcpStream, option: u32, data: &[u8]| {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        c.write_all(&m).unwrap();
    };
    let answer = |c: &mut std::net::TcpStream| -> (u32, u32) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        c.read_exact(&mut d).unwrap();
        (option, kind)
    };
    opt(&mut c, OPT_LIST, &[]);
    assert_eq!(answer(&mut c), (OPT_LIST, REP_ERR_TLS_REQD));
    opt(&mut c, OPT_STARTTLS, b"x");
    assert_eq!(answer(&mut c), (OPT_STARTTLS, REP_ERR_INVALID));
    opt(&mut c, OPT_EXPORT_NAME, b"d0");
    let mut rest = Vec::new();
    let n = c.read_to_end(&mut rest).unwrap();
    assert_eq!(n, 0, "EXPORT_NAME before TLS got an answer: {rest:?}");

    // STARTTLS accepted, then no TLS but garbage: the connection is closed.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.read_exact(&mut greeting).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    opt(&mut c, OPT_STARTTLS, &[]);
    assert_eq!(answer(&mut c), (OPT_STARTTLS, 1));
    c.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    c.write_all(b"not a TLS record at all").unwrap();
    let mut rest = Vec::new();
    // The server may answer with an alert before it closes; it must close.
    if let Err(e) = c.read_to_end(&mut rest) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "not closed: {e}"
        );
    }
    assert!(rest.len() < 64, "{rest:?}");
}

#[test]
fn usage_errors() {
    let d = tempfile::tempdir().unwrap();
    // Plain NBD on a TCP address that is not loopback needs --insecure-tcp, and the refusal
    // names the TLS way.
    let e = common::fails(&["serve", "--nbd", "tcp:0.0.0.0:0"]);
    assert!(e.contains("--tls-creds"), "{e}");
    // --tls-verify-peer and --tls-unix need --tls-creds: a usage error (exit 2).
    for flag in ["--tls-verify-peer", "--tls-unix"] {
        let o = common::vstor(&["serve", "--nbd", "tcp:127.0.0.1:0", flag]);
        assert_eq!(o.status.code(), Some(2), "{flag}: {o:?}");
    }
    // Missing files are named.
    let e = common::fails(&[
        "serve",
        "--nbd",
        "tcp:127.0.0.1:0",
        "--tls-creds",
        s(d.path()),
    ]);
    assert!(e.contains("ca-cert.pem"), "{e}");
    std::fs::write(d.path().join("ca-cert.pem"), "not a certificate\n").unwrap();
    let e = common::fails(&[
        "serve",
        "--nbd",
        "tcp:127.0.0.1:0",
        "--tls-creds",
        s(d.path()),
    ]);
    assert!(e.contains("ca-cert.pem"), "{e}");
}
