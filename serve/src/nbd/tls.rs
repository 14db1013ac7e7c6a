//! TLS for the NBD server: credentials, the handshake after `NBD_OPT_STARTTLS`, and the pump
//! that carries the session.
//!
//! **Credentials** come from a directory laid out as QEMU's `tls-creds-x509` object with
//! `endpoint=server`: `ca-cert.pem` (the CA, or CAs, that clients are checked against),
//! `server-cert.pem` (the server's certificate, optionally followed by its chain) and
//! `server-key.pem` (its private key: PKCS#8, PKCS#1 or SEC1 PEM). With verify-peer (QEMU's
//! `verify-peer=on`), a client must present a certificate that chains to `ca-cert.pem` and is
//! meant for client authentication, or the handshake fails; without it, no client certificate
//! is asked for. A client of the same layout (`endpoint=client`) needs `ca-cert.pem`, and
//! `client-cert.pem` with `client-key.pem` for verify-peer.
//!
//! **Mode.** A listener with TLS is FORCEDTLS (the protocol's name): every option before
//! STARTTLS other than ABORT is refused with `NBD_REP_ERR_TLS_REQD` (EXPORT_NAME, which has no
//! error reply, closes the connection), and after the STARTTLS reply the TLS handshake runs on
//! the socket and the option haggling starts over inside TLS.
//!
//! **The pump.** The NBD code reads requests on one thread and writes replies from its
//! workers, while one TLS session is one state machine that cannot be driven from two threads
//! at once. So after the handshake the session moves into a thread of its own that shuttles
//! bytes between the socket and one end of a Unix socket pair (decrypting one way, encrypting
//! the other), and the NBD code goes on with the other end as its socket, unchanged. The pump
//! keeps at most a few MiB buffered each way, so a client that stops reading holds back the
//! workers as it would on a plain socket. Its ends of the shutdown:
//! - the client ends (close_notify or the socket's end, or the server's [`stop`] shutting the
//!   socket's reading side): the NBD side sees the end of its input once everything before it
//!   was delivered, answers what is in flight and closes;
//! - the NBD side closes: the pump sends what is left and close_notify, and closes the socket;
//! - a TLS error (a bad record, a failed peer) closes both at once.
//!
//! [`stop`]: super::NbdServer::stop

use super::server::Sock;
use crate::export::ServeError;
use rustix::event::{PollFd, PollFlags};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vstor_core::ErrorKind;

/// The file names in a credentials directory (QEMU's `tls-creds-x509`, `endpoint=server`).
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate (and chain).
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";

/// How much plaintext the pump reads from either side at once.
const CHUNK: usize = 256 << 10;
/// The most bytes the pump keeps buffered in either direction.
const BUFFERED: usize = 4 << 20;

/// Loaded TLS credentials: the server's side of every TLS session of a listener.
#[derive(Clone)]
pub struct TlsCreds {
    config: Arc<ServerConfig>,
    dir: PathBuf,
    verify_peer: bool,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("dir", &self.dir)
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

fn creds_err(path: &Path, what: impl std::fmt::Display) -> ServeError {
    ServeError::invalid(format!("TLS credentials {}: {what}", path.display()))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServeError> {
    if !path.is_file() {
        return Err(ServeError::new(
            ErrorKind::NotFound,
            format!("TLS credentials: {} is missing", path.display()),
        ));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| creds_err(path, e))?;
    if certs.is_empty() {
        return Err(creds_err(path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

impl TlsCreds {
    /// Loads `dir`'s `ca-cert.pem`, `server-cert.pem` and `server-key.pem`; with
    /// `verify_peer`, clients must present a certificate signed by `ca-cert.pem`.
    pub fn load(dir: &Path, verify_peer: bool) -> Result<TlsCreds, ServeError> {
        if !dir.is_dir() {
            return Err(ServeError::new(
                ErrorKind::NotFound,
                format!("TLS credentials: {} is not a directory", dir.display()),
            ));
        }
        // ring builds with a C compiler alone (aws-lc-rs, rustls' default, builds a large C
        // library); its cost is no post-quantum key exchange, which rustls now marks as
        // deprecated. The usual X25519/P-256/P-384 exchanges and TLS 1.2/1.3 suites remain.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_path = dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for c in certs(&ca_path)? {
            roots.add(c).map_err(|e| creds_err(&ca_path, e))?;
        }
        let chain = certs(&dir.join(SERVER_CERT))?;
        let key_path = dir.join(SERVER_KEY);
        if !key_path.is_file() {
            return Err(ServeError::new(
                ErrorKind::NotFound,
                format!("TLS credentials: {} is missing", key_path.display()),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| creds_err(&key_path, e))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| creds_err(dir, e))?;
        let builder = if verify_peer {
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| creds_err(&ca_path, e))?;
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| creds_err(dir, format!("server-cert.pem with server-key.pem: {e}")))?;
        Ok(TlsCreds {
            config: Arc::new(config),
            dir: dir.to_path_buf(),
            verify_peer,
        })
    }

    /// The directory the credentials came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether clients must present a certificate.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }
}

/// Reads `pre` (bytes the client sent after STARTTLS that were already read) before the
/// socket.
struct Prefixed<'a> {
    pre: &'a [u8],
    sock: &'a mut Sock,
}

impl Read for Prefixed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.pre.is_empty() {
            return self.pre.read(buf);
        }
        self.sock.read(buf)
    }
}

impl Write for Prefixed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs the TLS handshake on `sock` (the client's socket, right after the STARTTLS reply;
/// `pre` is what the client sent after STARTTLS that was already read) within `timeout`, then
/// starts the pump. Returns the socket the NBD code goes on with.
pub(crate) fn start(
    creds: &TlsCreds,
    mut sock: Sock,
    pre: &[u8],
    timeout: Duration,
) -> io::Result<Sock> {
    let mut conn = ServerConnection::new(creds.config.clone()).map_err(io::Error::other)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut io = Prefixed {
        pre,
        sock: &mut sock,
    };
    while conn.is_handshaking() {
        conn.complete_io(&mut io).map_err(|e| {
            let kind = if e.kind() == io::ErrorKind::WouldBlock {
                io::ErrorKind::TimedOut
            } else {
                e.kind()
            };
            io::Error::new(kind, format!("TLS handshake failed: {e}"))
        })?;
    }
    // A client may send its first records right behind its handshake.
    let mut rest = io.pre;
    while !rest.is_empty() {
        if conn.read_tls(&mut rest)? == 0 {
            break;
        }
        conn.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    sock.set_nonblocking(true)?;
    let (ours, theirs) = UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("nbd-tls".into())
        .stack_size(256 << 10)
        .spawn(move || {
            if let Err(e) = pump(&mut conn, &mut sock, ours) {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) {
                    eprintln!("vstor serve: nbd: TLS connection closed: {e}");
                }
            }
            sock.shutdown_both();
        })?;
    Ok(Sock::Unix(theirs))
}

/// Whether an error only says "not now".
fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Shuttles between the client's socket (TLS) and the NBD side (plain) until both are done.
fn pump(conn: &mut ServerConnection, sock: &mut Sock, mut plain: UnixStream) -> io::Result<()> {
    conn.set_buffer_limit(Some(BUFFERED));
    let mut buf = vec![0u8; CHUNK];
    // Decrypted, for the NBD side.
    let mut to_plain: Vec<u8> = Vec::new();
    let mut to_plain_at = 0;
    // From the NBD side, not yet taken by the session (its buffer was full).
    let mut from_plain: Vec<u8> = Vec::new();
    let mut from_plain_at = 0;
    // The socket gave its end; the client's input ended (close_notify or that end).
    let mut sock_eof = false;
    let mut client_done = false;
    // The NBD side was told its input ended; it stopped reading (an export removed).
    let mut plain_shut = false;
    let mut plain_gone = false;
    // The NBD side closed its end; close_notify is queued.
    let mut server_done = false;
    let mut close_sent = false;
    loop {
        // Plaintext the session decrypted goes to the NBD side.
        while !client_done {
            match conn.reader().read(&mut buf) {
                Ok(0) => client_done = true,
                Ok(_) if plain_gone => {}
                Ok(n) => to_plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The socket ended without close_notify: the end of the input all the same.
                Err(_) => client_done = true,
            }
        }
        // Plaintext from the NBD side goes into the session.
        while from_plain_at < from_plain.len() {
            let n = conn.writer().write(&from_plain[from_plain_at..])?;
            if n == 0 {
                break;
            }
            from_plain_at += n;
        }
        if from_plain_at == from_plain.len() {
            from_plain.clear();
            from_plain_at = 0;
        }
        if (client_done || plain_gone) && to_plain_at == to_plain.len() && !plain_shut {
            let _ = plain.shutdown(std::net::Shutdown::Write);
            plain_shut = true;
        }
        if server_done && from_plain.is_empty() && !close_sent {
            conn.send_close_notify();
            close_sent = true;
        }
        if close_sent && !conn.wants_write() {
            return Ok(());
        }
        let want_sock_in = !sock_eof && !client_done && to_plain.len() - to_plain_at < BUFFERED;
        let want_sock_out = conn.wants_write();
        let want_plain_in = !server_done && from_plain.is_empty();
        let want_plain_out = !plain_gone && to_plain_at < to_plain.len();
        if !(want_sock_in || want_sock_out || want_plain_in || want_plain_out) {
            return Ok(());
        }
        let flags = |i: bool, o: bool| {
            let mut f = PollFlags::empty();
            if i {
                f |= PollFlags::IN;
            }
            if o {
                f |= PollFlags::OUT;
            }
            f
        };
        // Only the sides with something wanted are polled: a side's hang-up is reported
        // whatever is asked, and must not wake the loop while that side is not served.
        let (sock_ev, plain_ev) = {
            let sf = flags(want_sock_in, want_sock_out);
            let pf = flags(want_plain_in, want_plain_out);
            let mut fds = Vec::with_capacity(2);
            if !sf.is_empty() {
                fds.push(PollFd::new(&*sock, sf));
            }
            if !pf.is_empty() {
                fds.push(PollFd::new(&plain, pf));
            }
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let mut ev = fds.iter().map(|f| f.revents());
            let none = PollFlags::empty();
            let s = if sf.is_empty() {
                none
            } else {
                ev.next().unwrap_or(none)
            };
            let p = if pf.is_empty() {
                none
            } else {
                ev.next().unwrap_or(none)
            };
            (s, p)
        };
        let failed = PollFlags::HUP | PollFlags::ERR;
        if want_sock_in && sock_ev.intersects(PollFlags::IN | failed) {
            match conn.read_tls(sock) {
                Ok(0) => sock_eof = true,
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        // Its alert, if it has one, then the end.
                        let _ = conn.write_tls(sock);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if want_sock_out && sock_ev.intersects(PollFlags::OUT | failed) {
            match conn.write_tls(sock) {
                Ok(_) => {}
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if want_plain_in && plain_ev.intersects(PollFlags::IN | failed) {
            match plain.read(&mut buf) {
                Ok(0) => server_done = true,
                Ok(n) => from_plain.extend_from_slice(&buf[..n]),
                Err(e) if would_block(&e) => {}
                Err(_) => server_done = true,
            }
        }
        if want_plain_out && plain_ev.intersects(PollFlags::OUT | failed) {
            match plain.write(&to_plain[to_plain_at..]) {
                Ok(n) => to_plain_at += n,
                Err(e) if would_block(&e) => {}
                // The NBD side stopped reading (an export removed): drop what comes.
                Err(_) => plain_gone = true,
            }
            if plain_gone || to_plain_at == to_plain.len() {
                to_plain.clear();
                to_plain_at = 0;
            } else if to_plain_at >= CHUNK {
                // A steady stream may never drain it: drop what was delivered.
                to_plain.drain(..to_plain_at);
                to_plain_at = 0;
            }
        }
    }
}
