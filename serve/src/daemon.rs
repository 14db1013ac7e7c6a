//! The daemon process: its listeners, its exports at start, signals and graceful shutdown.
//!
//! A graceful shutdown (SIGTERM, SIGINT, or `server.shutdown` on the API) stops accepting,
//! lets every request in flight finish and be answered, flushes every export, closes its files
//! (releasing their image locks) and removes the sockets the daemon made.

use crate::control::{Control, Host, API_VERSION};
use crate::export::{Opener, ServeError};
use crate::iscsi::{IscsiConfig, IscsiServer};
use crate::nbd::{Listener, NbdConfig, NbdServer, TlsCreds};
use crate::registry::Registry;
use serde_json::{json, Value};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vstor_core::ErrorKind;

/// Where an NBD listener listens: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A Unix socket made at this path.
    Unix(PathBuf),
    /// A TCP address (`HOST:PORT`; `[::1]:PORT` for IPv6).
    Tcp(String),
}

impl FromStr for NbdAddr {
    type Err = ServeError;
    fn from_str(s: &str) -> Result<Self, ServeError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(ServeError::invalid("--nbd unix: needs a path"));
            }
            return Ok(NbdAddr::Unix(p.into()));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if !a.contains(':') {
                return Err(ServeError::invalid(format!(
                    "--nbd tcp:{a}: give HOST:PORT (for example tcp:127.0.0.1:10809)"
                )));
            }
            return Ok(NbdAddr::Tcp(a.to_string()));
        }
        Err(ServeError::invalid(format!(
            "--nbd {s}: expected unix:PATH or tcp:HOST:PORT"
        )))
    }
}

/// An export given at start: `NAME=TARGET` (the target may carry `,readonly=on`, and the
/// iSCSI options `,shared=on`, `,iqn=NAME`, `,initiators=NAME+NAME`: see [`crate::iscsi`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportArg {
    /// The name.
    pub name: String,
    /// The target string (without the iSCSI options).
    pub target: String,
    /// Its iSCSI options.
    pub iscsi: crate::iscsi::TargetOpts,
}

impl FromStr for ExportArg {
    type Err = ServeError;
    fn from_str(s: &str) -> Result<Self, ServeError> {
        let (name, target) = s
            .split_once('=')
            .ok_or_else(|| ServeError::invalid(format!("--export {s}: expected NAME=TARGET")))?;
        crate::registry::check_name(name)?;
        if target.is_empty() {
            return Err(ServeError::invalid(format!(
                "--export {s}: the target is empty"
            )));
        }
        let (iscsi, target) = crate::iscsi::TargetOpts::split_from(target)
            .map_err(|e| ServeError::invalid(format!("--export {s}: {e}")))?;
        Ok(ExportArg {
            name: name.to_string(),
            target,
            iscsi,
        })
    }
}

/// A vhost-user-blk socket for an export: `NAME=SOCKET[,queues=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostArg {
    /// The export it serves.
    pub name: String,
    /// The Unix socket the VMM connects to.
    pub socket: PathBuf,
    /// Virtqueues offered (one worker each).
    pub queues: usize,
}

impl FromStr for VhostArg {
    type Err = ServeError;
    fn from_str(s: &str) -> Result<Self, ServeError> {
        let bad = |why: &str| {
            ServeError::invalid(format!(
                "--vhost-user-blk {s}: {why} (expected NAME=SOCKET[,queues=N])"
            ))
        };
        let (name, rest) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
        crate::registry::check_name(name)?;
        let mut parts = rest.split(',');
        let socket = parts.next().unwrap_or_default();
        if socket.is_empty() {
            return Err(bad("the socket path is empty"));
        }
        let mut queues = 1;
        for p in parts {
            match p.split_once('=') {
                Some(("queues", n)) => {
                    queues = n
                        .parse()
                        .ok()
                        .filter(|q| (1..=crate::virtio_blk::MAX_QUEUES).contains(q))
                        .ok_or_else(|| {
                            bad(&format!(
                                "queues must be 1 to {}",
                                crate::virtio_blk::MAX_QUEUES
                            ))
                        })?;
                }
                _ => return Err(bad(&format!("unknown option '{p}'"))),
            }
        }
        Ok(VhostArg {
            name: name.to_string(),
            socket: socket.into(),
            queues,
        })
    }
}

/// What the daemon serves.
#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    /// The control API socket.
    pub control: Option<PathBuf>,
    /// NBD listeners.
    pub nbd: Vec<NbdAddr>,
    /// Exports to add at start.
    pub exports: Vec<ExportArg>,
    /// vhost-user-blk sockets for exports.
    pub vhost_user_blk: Vec<VhostArg>,
    /// The Prometheus endpoint (`HOST:PORT`).
    pub metrics: Option<String>,
    /// Allow NBD over TCP without TLS on an address that is not loopback.
    pub insecure_tcp: bool,
    /// TLS for NBD: with it, every TCP listener is FORCEDTLS (and Unix ones with
    /// [`TlsConfig::on_unix`]).
    pub tls: Option<TlsConfig>,
    /// The NBD server's settings.
    pub nbd_config: NbdConfig,
    /// iSCSI portals (`HOST:PORT`; `[::1]:PORT` for IPv6).
    pub iscsi: Vec<String>,
    /// The iSCSI target's settings.
    pub iscsi_config: IscsiConfig,
}

/// TLS for the NBD listeners.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// The credentials directory: `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (QEMU's
    /// `tls-creds-x509` layout for `endpoint=server`).
    pub creds_dir: PathBuf,
    /// Clients must present a certificate signed by `ca-cert.pem` (QEMU's `verify-peer`).
    pub verify_peer: bool,
    /// Unix listeners require TLS too (by default they stay plain: the file permissions of
    /// the socket and its directory guard them).
    pub on_unix: bool,
}

/// Tells the daemon to shut down, from a signal, the API or the embedding program.
#[derive(Default)]
pub struct ShutdownSignal {
    requested: Mutex<bool>,
    cv: Condvar,
}

impl ShutdownSignal {
    /// Asks for a shutdown.
    pub fn request(&self) {
        *self.requested.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Waits until a shutdown is asked for.
    pub fn wait(&self) {
        let mut r = self.requested.lock().unwrap_or_else(|p| p.into_inner());
        while !*r {
            r = self.cv.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }
}

struct HostImpl {
    shutdown: Arc<ShutdownSignal>,
    started: Instant,
    nbd: Vec<String>,
    vhost: Vec<String>,
    iscsi: Vec<String>,
    metrics: Option<String>,
}

impl Host for HostImpl {
    /// The shutdown begins a moment after the call, so that its answer reaches the caller
    /// before the process ends.
    fn shutdown(&self) {
        let sd = self.shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                sd.request();
            });
        if spawned.is_err() {
            self.shutdown.request();
        }
    }
    fn server_info(&self) -> Value {
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "api_version": API_VERSION,
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "nbd": self.nbd,
            "vhost_user_blk": self.vhost,
            "iscsi": self.iscsi,
            "metrics": self.metrics,
        })
    }
}

/// A running daemon.
pub struct Daemon {
    registry: Arc<Registry>,
    nbd: Arc<NbdServer>,
    iscsi: Option<Arc<IscsiServer>>,
    stop: Arc<AtomicBool>,
    shutdown: Arc<ShutdownSignal>,
    /// Sockets made here (removed at shutdown).
    made: Vec<PathBuf>,
    /// Addresses to poke so accept loops see the stop.
    pokes: Vec<NbdAddr>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

fn is_loopback(addr: &str) -> bool {
    addr.to_socket_addrs()
        .map(|mut a| a.all(|a| a.ip().is_loopback()))
        .unwrap_or(false)
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> ServeError {
    move |e| {
        let kind = if e.kind() == std::io::ErrorKind::AddrInUse {
            ErrorKind::InUse
        } else {
            ErrorKind::Io
        };
        ServeError::new(kind, format!("{what}: {e}"))
    }
}

impl Daemon {
    /// Opens the exports and starts the listeners. Nothing is served if any of it fails.
    pub fn start(config: DaemonConfig, opener: Arc<dyn Opener>) -> Result<Daemon, ServeError> {
        let started = Instant::now();
        let registry = Arc::new(Registry::new(opener));
        for e in &config.exports {
            registry.add(&e.name, &e.target, false)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let shutdown = Arc::new(ShutdownSignal::default());
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(TlsCreds::load(&t.creds_dir, t.verify_peer)?)),
            None => None,
        };
        let unix_tls = tls
            .clone()
            .filter(|_| config.tls.as_ref().is_some_and(|t| t.on_unix));
        let nbd = NbdServer::new(registry.clone(), config.nbd_config.clone());
        let mut made = Vec::new();
        let mut pokes = Vec::new();
        let mut names = Vec::new();
        let mut listeners = Vec::new();
        for a in &config.nbd {
            match a {
                NbdAddr::Unix(p) => {
                    let l = crate::sockpath::bind_unix(p)
                        .map_err(io_err(format!("cannot listen on {}", p.display())))?;
                    made.push(p.clone());
                    listeners.push((Listener::Unix(l), unix_tls.clone()));
                    names.push(format!("unix:{}", p.display()));
                }
                NbdAddr::Tcp(addr) => {
                    if tls.is_none() && !config.insecure_tcp && !is_loopback(addr) {
                        return Err(ServeError::invalid(format!(
                            "--nbd tcp:{addr} is not a loopback address: NBD over TCP without \
                             TLS would expose the disks to the network; give --tls-creds DIR, \
                             or add --insecure-tcp if that is what you want"
                        )));
                    }
                    let l = TcpListener::bind(addr)
                        .map_err(io_err(format!("cannot listen on {addr}")))?;
                    let local = l
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_else(|_| addr.clone());
                    pokes.push(NbdAddr::Tcp(local.clone()));
                    listeners.push((Listener::Tcp(l), tls.clone()));
                    names.push(format!("tcp:{local}"));
                }
            }
        }
        for a in &config.nbd {
            if let NbdAddr::Unix(p) = a {
                pokes.push(NbdAddr::Unix(p.clone()));
            }
        }
        for (l, tls) in listeners {
            nbd.listen(l, tls)
                .map_err(io_err("cannot start the NBD listener".into()))?;
        }
        let mut iscsi_names = Vec::new();
        let iscsi = if config.iscsi.is_empty() {
            None
        } else {
            let server = IscsiServer::new(registry.clone(), config.iscsi_config.clone());
            for e in &config.exports {
                server.set_target_opts(&e.name, e.iscsi.clone());
            }
            let mut ls = Vec::new();
            for addr in &config.iscsi {
                if !config.insecure_tcp && !is_loopback(addr) {
                    return Err(ServeError::invalid(format!(
                        "--iscsi {addr} is not a loopback address: iSCSI carries the disks in \
                         clear text (CHAP authenticates, it does not encrypt); add \
                         --insecure-tcp if that is what you want"
                    )));
                }
                let l = TcpListener::bind(addr)
                    .map_err(io_err(format!("cannot listen on {addr} for iSCSI")))?;
                let local = l
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| addr.clone());
                pokes.push(NbdAddr::Tcp(local.clone()));
                iscsi_names.push(local);
                ls.push(l);
            }
            for l in ls {
                server
                    .listen(l)
                    .map_err(io_err("cannot start the iSCSI listener".into()))?;
            }
            Some(server)
        };
        let metrics = match &config.metrics {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .map_err(io_err(format!("cannot listen on {addr} for metrics")))?;
                let local = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                crate::metrics::listen(registry.clone(), l, stop.clone())
                    .map_err(io_err("cannot start the metrics endpoint".into()))?;
                pokes.push(NbdAddr::Tcp(local.clone()));
                Some(local)
            }
            None => None,
        };
        let mut vhost = Vec::new();
        for v in &config.vhost_user_blk {
            let export = registry.get(&v.name).map_err(|_| {
                ServeError::invalid(format!(
                    "--vhost-user-blk {}: no --export named '{}'",
                    v.socket.display(),
                    v.name
                ))
            })?;
            crate::vhost_user::serve(export, &v.socket, v.queues, stop.clone()).map_err(io_err(
                format!("cannot serve vhost-user-blk on {}", v.socket.display()),
            ))?;
            vhost.push(format!("{}={}", v.name, v.socket.display()));
        }
        let host = Arc::new(HostImpl {
            shutdown: shutdown.clone(),
            started,
            nbd: names,
            vhost,
            iscsi: iscsi_names,
            metrics,
        });
        if let Some(path) = &config.control {
            Control::with_iscsi(registry.clone(), host, iscsi.clone())
                .listen(path, stop.clone())
                .map_err(io_err(format!(
                    "cannot open the API socket {}",
                    path.display()
                )))?;
            made.push(path.clone());
            pokes.push(NbdAddr::Unix(path.clone()));
        }
        // Rates are taken between samples a second apart.
        let (reg, st) = (registry.clone(), stop.clone());
        let _ = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || {
                while !st.load(Ordering::Acquire) {
                    reg.sample();
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        Ok(Daemon {
            registry,
            nbd,
            iscsi,
            stop,
            shutdown,
            made,
            pokes,
        })
    }

    /// The iSCSI server, when the daemon has portals.
    pub fn iscsi(&self) -> Option<&Arc<IscsiServer>> {
        self.iscsi.as_ref()
    }

    /// The registry (to add exports or start other transports on it).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The signal that ends [`wait`](Daemon::wait).
    pub fn shutdown_signal(&self) -> Arc<ShutdownSignal> {
        self.shutdown.clone()
    }

    /// A flag set when the daemon stops (for transports started beside it).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Makes SIGTERM and SIGINT ask for a graceful shutdown.
    pub fn handle_signals(&self) -> Result<(), ServeError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
            .map_err(io_err("cannot install signal handlers".into()))?;
        let sd = self.shutdown.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                    eprintln!("vstor serve: {name}: shutting down");
                    sd.request();
                }
            })
            .map_err(io_err("cannot start the signal thread".into()))?;
        Ok(())
    }

    /// Waits until a shutdown is asked for.
    pub fn wait(&self) {
        self.shutdown.wait();
    }

    /// Shuts down gracefully (see the module documentation). Returns the exports that could
    /// not be flushed or closed, with why.
    pub fn shutdown(self) -> Vec<(String, ServeError)> {
        self.stop.store(true, Ordering::Release);
        self.nbd.stop();
        if let Some(i) = &self.iscsi {
            i.stop();
        }
        for p in &self.pokes {
            match p {
                NbdAddr::Unix(path) => drop(UnixStream::connect(path)),
                NbdAddr::Tcp(addr) => drop(TcpStream::connect(addr)),
            }
        }
        // Requests held back by a QoS cap are let go: a shutdown does not wait out the cap.
        for e in self.registry.exports() {
            let _ = e.set_qos(Some(0), Some(0));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let iscsi_conns = || self.iscsi.as_ref().map_or(0, |i| i.connections());
        while (self.nbd.connections() > 0 || iscsi_conns() > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut failed = Vec::new();
        for name in self.registry.names() {
            if let Err(e) = self
                .registry
                .remove_and_wait(&name, Duration::from_secs(30))
            {
                failed.push((name, e));
            }
        }
        for p in &self.made {
            let _ = std::fs::remove_file(p);
        }
        failed
    }
}
