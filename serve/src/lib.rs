//! vstor serve: the storage daemon.
//!
//! A [`Registry`] holds the exports: a name, the stack it serves (opened through the stack
//! builder, which the embedding program hands in as an [`Opener`]), its image locks (held by the
//! stack for as long as the export lives), its statistics and its live operations (resize,
//! checkpoint, merge, clone). Transports never open files: they look an export up by name and
//! turn their wire protocol into batches of requests on its device.
//!
//! - [`nbd`]: the NBD server (fixed newstyle, structured replies, block status);
//! - [`control`]: the JSON-RPC 2.0 control API on a Unix socket, and its schema;
//! - [`metrics`]: the Prometheus text endpoint;
//! - [`daemon`]: the process: listeners, signals, graceful shutdown.
//!
//! **Listeners and TLS.** NBD listens on Unix sockets (`unix:PATH`) and on TCP
//! (`tcp:HOST:PORT`). With TLS credentials ([`daemon::TlsConfig`]: a directory laid out as
//! QEMU's `tls-creds-x509` for `endpoint=server`), every TCP listener is FORCEDTLS: a client
//! must send `NBD_OPT_STARTTLS` before any other option and is told `NBD_REP_ERR_TLS_REQD`
//! otherwise; optionally clients must present a certificate of the same CA (verify-peer).
//! Unix listeners stay plain unless [`daemon::TlsConfig::on_unix`] is set: a local socket is
//! guarded by the file permissions of the socket and its directory, and local VMMs then need
//! no credentials. Without TLS, a TCP address that is not loopback is refused unless
//! [`daemon::DaemonConfig::insecure_tcp`] allows it: plain NBD carries the disk in clear
//! text. See [`nbd::tls`] for how a TLS session is carried.
//!
//! Why the stack builder is handed in rather than linked: the `vstor` command line (which
//! holds the stack builder) links this crate to offer `vstor serve`, so this crate depends only
//! on the crates below the builder (core, qos, vhdx) and takes an [`Opener`].

#![forbid(unsafe_code)]

pub mod control;
pub mod daemon;
pub mod export;
pub mod iscsi;
pub mod jsonrpc;
pub mod metrics;
pub mod nbd;
pub mod registry;
pub mod scsi;
pub mod sockpath;
pub mod vhost_user;
pub mod virtio_blk;

pub use export::{Export, ExportInfo, Opened, Opener, QosControl};
pub use registry::Registry;
