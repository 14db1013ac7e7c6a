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
//! Why the stack builder is handed in rather than linked: the `vstor` command line (which
//! holds the stack builder) links this crate to offer `vstor serve`, so this crate depends only
//! on the crates below the builder (core, qos, vhdx) and takes an [`Opener`].

#![forbid(unsafe_code)]

pub mod control;
pub mod daemon;
pub mod export;
pub mod jsonrpc;
pub mod metrics;
pub mod nbd;
pub mod registry;

pub use export::{Export, ExportInfo, Opened, Opener, QosControl};
pub use registry::Registry;
