//! One export: a name, the stack it serves, its statistics and its live operations.

use serde::Serialize;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vstor_core::{BlockDevice, ErrorKind, Job, OpKind};
use vstor_qos::{FlowId, FlowReport, FlowStats, Limits, PolicyId, Qos};
use vstor_vhdx::live::LiveDisk;

/// An error of the daemon: what went wrong in words, and its kind (the control API sends both,
/// the CLI picks its exit status from the kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeError {
    /// The kind.
    pub kind: ErrorKind,
    /// The message, one line.
    pub message: String,
}

impl ServeError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ServeError {
            kind,
            message: message.into(),
        }
    }

    /// Invalid input.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
}

/// The control API's spellings of the error kinds.
const KIND_NAMES: [(ErrorKind, &str); 11] = [
    (ErrorKind::Io, "io"),
    (ErrorKind::InvalidInput, "invalid-input"),
    (ErrorKind::OutOfRange, "out-of-range"),
    (ErrorKind::ReadOnly, "read-only"),
    (ErrorKind::Unsupported, "unsupported"),
    (ErrorKind::Corrupt, "corrupt"),
    (ErrorKind::NoSpace, "no-space"),
    (ErrorKind::InUse, "in-use"),
    (ErrorKind::Unavailable, "unavailable"),
    (ErrorKind::Cancelled, "cancelled"),
    (ErrorKind::NotFound, "not-found"),
];

/// The control API's spelling of an error kind (`io` for a kind it does not know).
pub fn kind_name(kind: ErrorKind) -> &'static str {
    KIND_NAMES
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("io", |(_, n)| n)
}

/// The error kind the control API spells `name` (`Io` for a name it does not know).
pub fn kind_of_name(name: &str) -> ErrorKind {
    KIND_NAMES
        .iter()
        .find(|(_, n)| *n == name)
        .map_or(ErrorKind::Io, |(k, _)| *k)
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServeError {}

impl From<vstor_core::Error> for ServeError {
    fn from(e: vstor_core::Error) -> Self {
        ServeError::new(e.kind(), e.to_string())
    }
}

/// The QoS flow of an export: every export has one (with no limits unless some are set), so
/// its limits can change at run time and its statistics come from the scheduler.
#[derive(Clone)]
pub struct QosControl {
    /// The daemon's scheduler.
    pub qos: Arc<Qos>,
    /// The export's policy.
    pub policy: PolicyId,
    /// The export's flow.
    pub flow: FlowId,
}

/// What an [`Opener`] returns: the opened stack and the handles of its live operations.
pub struct Opened {
    /// The stack.
    pub device: Arc<dyn BlockDevice>,
    /// The VHDX under it as a live disk (checkpoint, merge, clone), when it is a writable VHDX.
    pub live: Option<Arc<LiveDisk>>,
    /// Its QoS flow.
    pub qos: Option<QosControl>,
    /// Notes for the operator ("O_DIRECT refused, using buffered I/O", ...).
    pub notes: Vec<String>,
    /// The base's format, in words ("vhdx", "raw", "pool space").
    pub format: String,
}

/// Opens target strings into stacks: the stack builder, handed in by the program that embeds
/// the daemon (the `vstor` command line hands in `vstor::target`).
pub trait Opener: Send + Sync {
    /// Opens `target` for the export `name` (the name of its QoS flow), read-only or writable.
    fn open(&self, name: &str, target: &str, read_only: bool) -> Result<Opened, ServeError>;
}

/// The suffix of the file beside the disk where an export's SCSI reservations persist (its
/// iSCSI logical unit's state: see [`crate::scsi`]).
pub const PR_STATE_SUFFIX: &str = ".vstor-pr";

/// The files an export keeps beside its disk, by suffix: a live move takes them along.
pub const SIDECARS: &[&str] = &[PR_STATE_SUFFIX];

/// Where the first field of a target string ends: at its first `,` that is not `,,` (a comma
/// doubled is one comma of the path, as QEMU's option syntax has it).
pub fn first_field_end(target: &str) -> usize {
    let b = target.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b',' {
            if b.get(i + 1) == Some(&b',') {
                i += 2;
                continue;
            }
            return i;
        }
        i += 1;
    }
    target.len()
}

/// The file of state `suffix` that an export opened from `target` keeps beside its disk: the
/// target's first file (a pool space: `DIR/NAME`) with `suffix` appended. None when the target
/// names no file here (a target of another kind, or a file that does not exist).
pub fn sidecar_path(target: &str, suffix: &str) -> Option<PathBuf> {
    let end = first_field_end(target);
    let base = &target[..end];
    let (pool, path) = match base.split_once(':') {
        Some(("pool", path)) => (true, path),
        Some((p, path)) if ["raw", "vhdx", "vhd"].contains(&p) => (false, path),
        Some(_) if !base.starts_with('/') => return None,
        _ => (false, base),
    };
    let path = path.replace(",,", ",");
    let path = path.trim_end_matches('/');
    let p = std::path::Path::new(path);
    // A pool space is DIR/NAME: the pool's directory exists, the space is no file.
    let exists = if pool {
        p.parent().is_some_and(|d| d.is_dir())
    } else {
        p.is_file()
    };
    exists.then(|| PathBuf::from(format!("{path}{suffix}")))
}

/// Transport-level counters of an export (what its clients asked for).
#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    connections: AtomicU64,
}

/// A sample of the scheduler's counters and when it was taken.
type Sample = Option<(Instant, FlowStats)>;

/// A connection's way to be closed when its export goes away.
type Closer = Box<dyn Fn() + Send + Sync>;

/// One export (see the module documentation).
pub struct Export {
    name: String,
    /// The target string (a live move changes it to the new file).
    target: Mutex<String>,
    read_only: bool,
    device: Arc<dyn BlockDevice>,
    live: Option<Arc<LiveDisk>>,
    qos: Option<QosControl>,
    format: String,
    notes: Vec<String>,
    counters: Counters,
    /// The scheduler's view of the flow at the last two samples (rates are taken between them).
    samples: Mutex<(Sample, Sample)>,
    closers: Mutex<Vec<(u64, Closer)>>,
    next_conn: AtomicU64,
    removed: AtomicBool,
    /// Serializes the live operations (checkpoint, merge, clone, resize).
    ops: Mutex<()>,
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("target", &self.target())
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// What `export.list` reports about an export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportInfo {
    /// The name clients use.
    pub name: String,
    /// The target string it was opened from.
    pub target: String,
    /// The base's format.
    pub format: String,
    /// The stack, in words.
    pub describe: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size.
    pub block_size: u32,
    /// Read-only.
    pub read_only: bool,
    /// Connected clients now.
    pub connections: u64,
    /// Whether checkpoint, merge and clone work on it (a writable VHDX).
    pub live: bool,
    /// Notes from opening it.
    pub notes: Vec<String>,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
}

/// What `export.stats` reports about an export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportStats {
    /// The export.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Requests by kind, since the export was added.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Discards (trim).
    pub discards: u64,
    /// Write-zeroes.
    pub write_zeroes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Connected clients now.
    pub connections: u64,
    /// Over the last sampling interval (about a second): requests per second.
    pub iops: f64,
    /// Over the last interval: 8 KiB-normalized requests per second (what QoS limits count).
    pub normalized_iops: f64,
    /// Over the last interval: bytes per second.
    pub bandwidth: f64,
    /// The interval the rates and latency are taken over, in seconds.
    pub interval_s: f64,
    /// Latency over the last interval (queueing in QoS included).
    pub latency: Latency,
    /// Latency since the export was added.
    pub latency_total: Latency,
    /// QoS limits: cap and reservation in normalized IOPS (0: none).
    pub max_iops: u64,
    /// Reservation.
    pub min_iops: u64,
}

/// Counts one request from start to completion (see [`Export::begin`]).
pub struct InFlight<'a> {
    export: &'a Export,
}

impl InFlight<'_> {
    /// The request completed; `ok` says whether it succeeded.
    pub fn done(self, ok: bool) {
        if !ok {
            self.export.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.export
            .counters
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection registered with an export (see [`Export::connect`]); unregisters on drop.
pub struct Connection {
    export: Arc<Export>,
    id: u64,
}

impl Connection {
    /// The export.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let e = &self.export;
        e.counters.connections.fetch_sub(1, Ordering::Relaxed);
        e.closers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(id, _)| *id != self.id);
    }
}

fn to_us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

impl Export {
    /// An export of an opened stack.
    pub fn new(name: &str, target: &str, read_only: bool, opened: Opened) -> Self {
        Export {
            name: name.to_string(),
            target: Mutex::new(target.to_string()),
            read_only: read_only || opened.device.info().read_only,
            device: opened.device,
            live: opened.live,
            qos: opened.qos,
            format: opened.format,
            notes: opened.notes,
            counters: Counters::default(),
            samples: Mutex::new((None, None)),
            closers: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            ops: Mutex::new(()),
        }
    }

    /// The name clients use.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stack.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the export was removed (its connections are closing).
    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Registers a connection; `close` is called if the export is removed while it lives.
    /// Returns `None` if the export is already removed.
    pub fn connect(
        self: &Arc<Self>,
        close: impl Fn() + Send + Sync + 'static,
    ) -> Option<Connection> {
        let mut c = self.closers.lock().unwrap_or_else(|p| p.into_inner());
        if self.removed() {
            return None;
        }
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        c.push((id, Box::new(close)));
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        Some(Connection {
            export: self.clone(),
            id,
        })
    }

    /// Marks the export removed and closes its connections.
    pub fn close_connections(&self) {
        let c = self.closers.lock().unwrap_or_else(|p| p.into_inner());
        self.removed.store(true, Ordering::Release);
        for (_, close) in c.iter() {
            close();
        }
    }

    /// Counts a request of `op` over `bytes` bytes; the returned guard counts its completion.
    pub fn begin(&self, op: OpKind, bytes: u64) -> InFlight<'_> {
        let c = &self.counters;
        let (n, b) = match op {
            OpKind::Read => (&c.reads, Some(&c.bytes_read)),
            OpKind::Write => (&c.writes, Some(&c.bytes_written)),
            OpKind::Flush => (&c.flushes, None),
            OpKind::Discard => (&c.discards, None),
            _ => (&c.write_zeroes, None),
        };
        n.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = b {
            b.fetch_add(bytes, Ordering::Relaxed);
        }
        c.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { export: self }
    }

    /// Counts a request refused before it ran (malformed, out of range, read-only): an error,
    /// and not traffic.
    pub fn refused(&self) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// What `export.list` shows.
    pub fn info(&self) -> ExportInfo {
        let i = self.device.info();
        ExportInfo {
            name: self.name.clone(),
            target: self.target(),
            format: self.format.clone(),
            describe: self.device.describe(),
            size: i.capacity,
            block_size: i.logical_sector_size,
            read_only: self.read_only,
            connections: self.counters.connections.load(Ordering::Relaxed),
            live: self.live.is_some(),
            notes: self.notes.clone(),
        }
    }

    /// Takes a sample of the scheduler's counters (the daemon does this every second); rates
    /// are reported between the last two samples.
    pub fn sample(&self) {
        let Some(q) = &self.qos else { return };
        let Ok(now) = q.qos.flow_stats(q.flow) else {
            return;
        };
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = s.1.take();
        s.1 = Some((Instant::now(), now));
    }

    /// The statistics.
    pub fn stats(&self) -> ExportStats {
        let c = &self.counters;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut st = ExportStats {
            name: self.name.clone(),
            size: self.device.capacity(),
            reads: ld(&c.reads),
            writes: ld(&c.writes),
            flushes: ld(&c.flushes),
            discards: ld(&c.discards),
            write_zeroes: ld(&c.write_zeroes),
            bytes_read: ld(&c.bytes_read),
            bytes_written: ld(&c.bytes_written),
            errors: ld(&c.errors),
            in_flight: ld(&c.in_flight),
            connections: ld(&c.connections),
            iops: 0.0,
            normalized_iops: 0.0,
            bandwidth: 0.0,
            interval_s: 0.0,
            latency: Latency::default(),
            latency_total: Latency::default(),
            max_iops: 0,
            min_iops: 0,
        };
        let Some(q) = &self.qos else { return st };
        let Ok(now) = q.qos.flow_stats(q.flow) else {
            return st;
        };
        st.max_iops = now.limits.max_iops;
        st.min_iops = now.limits.min_iops;
        st.latency_total = Latency {
            p50_us: to_us(now.latency.percentile_ns(50.0)),
            p99_us: to_us(now.latency.percentile_ns(99.0)),
        };
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let (before, after) = match (&s.0, &s.1) {
            (Some(a), Some(b)) => (a.clone(), b.clone()),
            (None, Some(a)) => (a.clone(), (Instant::now(), now)),
            _ => return st,
        };
        drop(s);
        let r = FlowReport::between(&before.1, &after.1);
        st.iops = r.iops;
        st.normalized_iops = r.normalized_iops;
        st.bandwidth = r.bandwidth;
        st.interval_s = after.0.duration_since(before.0).as_secs_f64();
        let win = after.1.latency.since(&before.1.latency);
        if win.count() > 0 {
            st.latency = Latency {
                p50_us: to_us(win.percentile_ns(50.0)),
                p99_us: to_us(win.percentile_ns(99.0)),
            };
        }
        st
    }

    /// Changes the QoS limits (0 removes a limit); requests already waiting follow at once.
    pub fn set_qos(&self, max_iops: Option<u64>, min_iops: Option<u64>) -> Result<(), ServeError> {
        let q = self.qos.as_ref().ok_or_else(|| {
            ServeError::new(
                ErrorKind::Unsupported,
                format!("export '{}' has no QoS flow", self.name),
            )
        })?;
        let cur = q.qos.flow_stats(q.flow).map_err(qos_err)?.limits;
        let limits = Limits {
            max_iops: max_iops.unwrap_or(cur.max_iops),
            min_iops: min_iops.unwrap_or(cur.min_iops),
            ..cur
        };
        q.qos.set_limits(q.policy, limits).map_err(qos_err)
    }

    /// Resizes the stack online; connected clients see the new size (vhost-user guests through
    /// a configuration change, NBD clients when they reconnect or ask again).
    pub fn resize(&self, size: u64) -> Result<u64, ServeError> {
        let _g = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if self.read_only {
            return Err(ServeError::new(
                ErrorKind::ReadOnly,
                format!("export '{}' is read-only", self.name),
            ));
        }
        self.device.resize(size)?;
        Ok(self.device.capacity())
    }

    fn live(&self, what: &str) -> Result<&Arc<LiveDisk>, ServeError> {
        self.live.as_ref().ok_or_else(|| {
            ServeError::new(
                ErrorKind::Unsupported,
                format!(
                    "export '{}' is not a writable VHDX: {what} needs one",
                    self.name
                ),
            )
        })
    }

    /// Takes a checkpoint: the image is frozen and a new differencing child takes the writes.
    /// Returns the child's path.
    pub fn checkpoint(&self, child: Option<&std::path::Path>) -> Result<String, ServeError> {
        let _g = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let (path, _frozen) = self.live("a checkpoint")?.checkpoint(child)?;
        Ok(path.display().to_string())
    }

    /// Merges the current checkpoint back into its parent online. Returns the parent's path.
    pub fn merge(&self) -> Result<String, ServeError> {
        let _g = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.live("a merge")?.merge_checkpoint(&Job::new())?;
        Ok(r.into.display().to_string())
    }

    /// Moves the disk to a new VHDX at `dst` while it is served (storage live migration:
    /// see [`LiveDisk::move_to`]); clients go on without a reconnect. The export's target
    /// becomes `dst`. The source's top image is deleted after the switch unless `keep_source`.
    pub fn move_to(
        &self,
        dst: &std::path::Path,
        keep_source: bool,
    ) -> Result<vstor_vhdx::live::MoveReport, ServeError> {
        let _g = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let live = self.live("a move")?;
        // The state files beside the disk go with it. A logical unit holds its file open, so
        // each gets the new name as a second link before the move (whichever name the disk
        // has after a crash, its state is beside it, and the unit goes on writing the one
        // file) and loses the old one after it: a destination on another file system is
        // refused before anything is copied.
        let sidecars: Vec<(PathBuf, PathBuf)> = SIDECARS
            .iter()
            .filter_map(|suffix| {
                sidecar_path(&self.target(), suffix)
                    .filter(|p| p.is_file())
                    .map(|p| (p, PathBuf::from(format!("{}{suffix}", dst.display()))))
            })
            .collect();
        if let Some((old, _)) = sidecars.first() {
            use std::os::unix::fs::MetadataExt;
            let dev = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.dev()).ok();
            let dst_dir = dst
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            if dev(old) != dev(dst_dir) {
                return Err(ServeError::invalid(format!(
                    "{} is on another file system than {}, which holds the export's \
                     reservations and is held open: move it within the file system",
                    dst.display(),
                    old.display()
                )));
            }
        }
        let mut linked = Vec::new();
        for (old, new) in &sidecars {
            if let Err(e) = std::fs::hard_link(old, new) {
                linked.iter().for_each(|n| {
                    let _ = std::fs::remove_file(n);
                });
                return Err(ServeError::new(
                    ErrorKind::Io,
                    format!(
                        "cannot give {} the name {}: {e}; nothing was moved",
                        old.display(),
                        new.display()
                    ),
                ));
            }
            linked.push(new.clone());
        }
        let opts = vstor_vhdx::convert::ConvertOptions::default();
        let r = match live.move_to(dst, &opts, keep_source, &Job::new()) {
            Ok(r) => r,
            Err(e) => {
                linked.iter().for_each(|n| {
                    let _ = std::fs::remove_file(n);
                });
                return Err(e.into());
            }
        };
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = dst.display().to_string();
        for (old, _) in &sidecars {
            let _ = std::fs::remove_file(old);
        }
        Ok(r)
    }

    /// The target string the export serves (the file it moved to, after a move).
    pub fn target(&self) -> String {
        self.target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Copies a consistent point-in-time image of the disk to `dst` while it stays in use.
    pub fn clone_to(&self, dst: &std::path::Path) -> Result<u64, ServeError> {
        let _g = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let opts = vstor_vhdx::convert::ConvertOptions::default();
        let r = self
            .live("a live clone")?
            .clone_to(dst, &opts, &Job::new())?;
        Ok(r.written_bytes)
    }
}

fn qos_err(e: vstor_qos::Error) -> ServeError {
    ServeError::invalid(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for (k, n) in KIND_NAMES {
            assert_eq!(kind_name(k), n);
            assert_eq!(kind_of_name(n), k);
        }
        assert_eq!(kind_of_name("no-such-kind"), ErrorKind::Io);
    }
}
