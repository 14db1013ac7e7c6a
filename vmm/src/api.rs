//! Run-time control of a VM: disk resize, pause and resume, per-disk statistics, over a Unix
//! socket (`--api-socket PATH`) in the spirit of Firecracker's API.
//!
//! The protocol is JSON-RPC 2.0, one object per line each way, as the storage daemon's control
//! API ([`vstor_serve::jsonrpc`]); `rpc.discover` returns the OpenRPC schema
//! (vmm/schema/vstor-vmm.openrpc.json). Methods:
//! - `disk.resize` `{"disk":0,"size":N}`: resizes disk 0 to N bytes (the stack must support
//!   online resize, as VHDX does); the guest gets a configuration-change interrupt and reads the
//!   new capacity.
//! - `disk.set-qos` `{"disk":0,"max_iops":N,"min_iops":M}`: changes the QoS limits of a disk
//!   started with `max-iops=`/`min-iops=` (either may be left out; 0 removes a limit); requests
//!   already waiting follow the new limits at once.
//! - `vm.stats`: per-disk capacity, request counters (also `serves`: queue services, one
//!   per notification acted on; `interrupts`: used-buffer interrupts raised; `queue_requests`:
//!   requests per queue) and QoS flow counters; `vcpu_exits`: exits of the vCPUs to the VMM;
//!   how many vCPU threads run the guest (`vcpus`) and how many of them wait out a pause
//!   (`paused_vcpus`).
//! - `vm.pause` / `vm.resume`: stops every vCPU at its next exit (each is kicked
//!   out of `KVM_RUN` with a signal) and the disks' I/O threads before their next batch, and
//!   lets them go on; pause answers once all vCPUs have stopped.
//!
//! Errors are JSON-RPC errors with `data.kind` (`not-found` for a disk that does not exist,
//! `unsupported` for QoS on a disk without it, the stack's own kind for a failed resize). A
//! request line longer than [`MAX_REQUEST_LINE`] bytes is answered with an error and the
//! connection is closed.
//!
//! [`Control`] is the part shared between the API threads and the vCPU threads: work that must
//! touch the virtio transport (a configuration-change interrupt) is left for a vCPU thread,
//! which does it before it re-enters the guest.

use crate::virtio::block::Block;
use crate::virtio::io_thread::PauseGate;
use serde_json::{json, Value};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;
use vstor::qos::{FlowId, PolicyId, Qos};
use vstor_core::ErrorKind;
use vstor_serve::jsonrpc::{self, opt_u64, u64_param, Failure};

/// The OpenRPC schema of the VMM's API.
pub const SCHEMA: &str = include_str!("../schema/vstor-vmm.openrpc.json");
/// The longest request line the API reads (a request is a small JSON object).
pub use jsonrpc::MAX_REQUEST_LINE;

/// The storage QoS of a disk started with `max-iops=` or `min-iops=`.
pub struct DiskQos {
    /// The VM's scheduler.
    pub qos: Arc<Qos>,
    /// The disk's dedicated policy.
    pub policy: PolicyId,
    /// The disk's flow.
    pub flow: FlowId,
}

/// A disk as the control plane sees it.
pub struct DiskControl {
    /// The device model (capacity, statistics, the stack under it).
    pub block: Arc<Block>,
    /// Its QoS, if it has any.
    pub qos: Option<DiskQos>,
    /// The disk's capacity changed and the driver has not been told yet.
    config_pending: AtomicBool,
}

#[derive(Default)]
struct RunState {
    /// The vCPU threads while they run the guest (the targets of kicks).
    vcpus: Vec<libc::pthread_t>,
    pause_requested: bool,
    /// How many vCPU threads wait out a pause.
    paused: usize,
    /// The VM is ending: every vCPU thread stops at its next exit.
    stopping: bool,
}

impl RunState {
    fn all_paused(&self) -> bool {
        self.pause_requested && !self.vcpus.is_empty() && self.paused == self.vcpus.len()
    }
}

/// What the API and the vCPU threads share.
pub struct Control {
    disks: Vec<DiskControl>,
    state: Mutex<RunState>,
    changed: Condvar,
    /// Holds the I/O threads while the VM is paused.
    gate: Arc<PauseGate>,
    /// Exits of the vCPU to the VMM (KVM_RUN returns), for the statistics.
    exits: AtomicU64,
}

/// The signal that kicks the vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Control {
    /// The control of a VM with these disks (in `--disk` order) and their QoS.
    pub fn new(disks: Vec<(Arc<Block>, Option<DiskQos>)>) -> Arc<Control> {
        let control = Arc::new(Control {
            disks: disks
                .into_iter()
                .map(|(block, qos)| DiskControl {
                    block,
                    qos,
                    config_pending: AtomicBool::new(false),
                })
                .collect(),
            state: Mutex::new(RunState::default()),
            changed: Condvar::new(),
            gate: PauseGate::new(),
            exits: AtomicU64::new(0),
        });
        // Follow capacity changes of stacks that announce them (a resize through the API, or by
        // anything else holding the stack).
        for (i, d) in control.disks.iter().enumerate() {
            if let Some(signal) = d.block.disk().capacity_signal() {
                let weak = Arc::downgrade(&control);
                signal.subscribe(move |capacity| {
                    if let Some(control) = weak.upgrade() {
                        control.capacity_changed(i, capacity);
                    }
                });
            }
        }
        control
    }

    /// The disks.
    pub fn disks(&self) -> &[DiskControl] {
        &self.disks
    }

    /// The gate that holds the VM's I/O threads while it is paused.
    pub fn gate(&self) -> Arc<PauseGate> {
        self.gate.clone()
    }

    /// Counts an exit of the vCPU to the VMM.
    pub fn count_exit(&self) {
        self.exits.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes every disk's QoS limits: at shutdown, so that requests still held back by a cap
    /// finish at once and the I/O threads can be joined.
    pub fn lift_limits(&self) {
        for q in self.disks.iter().filter_map(|d| d.qos.as_ref()) {
            let _ = q.qos.set_limits(q.policy, vstor::qos::Limits::default());
        }
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new capacity of disk `i`; the vCPU thread tells the driver.
    pub fn capacity_changed(&self, i: usize, capacity: u64) {
        let Some(d) = self.disks.get(i) else { return };
        d.block.set_capacity(capacity);
        d.config_pending.store(true, Ordering::Release);
        self.kick(&self.lock());
    }

    /// Sends the kick signal to every vCPU thread that runs the guest.
    fn kick(&self, state: &RunState) {
        for &thread in &state.vcpus {
            // SAFETY: `thread` is a vCPU thread, which removes itself from `vcpus` under the same
            // lock before it stops running the guest, so it is alive; its handler for the signal
            // (installed by `enter`) does nothing, which is what makes KVM_RUN return EINTR.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Called by a vCPU thread before it first runs the guest: installs the kick handler and
    /// records the thread.
    pub fn enter(&self) -> Result<(), crate::Error> {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| crate::Error::kvm(format!("installing the vCPU kick handler: {e}")))?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().vcpus.push(me);
        self.changed.notify_all();
        Ok(())
    }

    /// Called by a vCPU thread when it stops running the guest.
    pub fn leave(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut s = self.lock();
        s.vcpus.retain(|&t| t != me);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread between exits: returns the disks whose configuration changed
    /// (the caller raises their configuration interrupts), after waiting out a pause.
    pub fn service(&self) -> Vec<usize> {
        let mut s = self.lock();
        if s.pause_requested && !s.stopping {
            s.paused += 1;
            self.changed.notify_all();
            while s.pause_requested && !s.stopping {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.paused -= 1;
            self.changed.notify_all();
        }
        drop(s);
        self.disks
            .iter()
            .enumerate()
            .filter(|(_, d)| d.config_pending.swap(false, Ordering::AcqRel))
            .map(|(i, _)| i)
            .collect()
    }

    /// Pauses the vCPUs and the I/O threads; returns once all vCPUs have stopped (or none is
    /// running). I/O threads finish the batch they are in and start no other.
    pub fn pause(&self) {
        self.gate.close();
        let mut s = self.lock();
        s.pause_requested = true;
        // Kick until every vCPU notices: a kick that lands just before KVM_RUN is lost.
        while !s.all_paused() && !s.vcpus.is_empty() {
            self.kick(&s);
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets the paused vCPUs go on.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.pause_requested = false;
        self.changed.notify_all();
        self.gate.open();
    }

    /// Whether the vCPUs are paused (all of them wait out a pause).
    pub fn paused(&self) -> bool {
        self.lock().all_paused()
    }

    /// Ends the run: every vCPU thread stops at its next exit (each is kicked until it has
    /// left). Returns once none runs the guest. The caller, if it is a vCPU thread, must have
    /// left first. A control that stopped stays stopped.
    pub fn stop(&self) {
        let mut s = self.lock();
        s.stopping = true;
        self.changed.notify_all();
        while !s.vcpus.is_empty() {
            self.kick(&s);
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether the run is ending ([`Control::stop`]).
    pub fn stopping(&self) -> bool {
        self.lock().stopping
    }

    /// Resizes disk `i` to `size` bytes and tells the guest.
    pub fn resize(&self, i: usize, size: u64) -> Result<(), Failure> {
        let d = self.disk(i)?;
        d.block
            .disk()
            .resize(size)
            .map_err(|e| Failure::failed(e.kind(), e.to_string()))?;
        if d.block.disk().capacity_signal().is_none() {
            // A stack that does not announce changes: tell the guest ourselves.
            self.capacity_changed(i, d.block.disk().info().capacity);
        }
        Ok(())
    }

    /// Changes disk `i`'s QoS limits (a limit left out keeps its value; 0 removes it).
    pub fn set_qos(
        &self,
        i: usize,
        max_iops: Option<u64>,
        min_iops: Option<u64>,
    ) -> Result<(), Failure> {
        let d = self.disk(i)?;
        let q = d.qos.as_ref().ok_or_else(|| {
            Failure::failed(
                ErrorKind::Unsupported,
                format!("disk {i} has no QoS (give it max-iops= or min-iops= on --disk)"),
            )
        })?;
        let qos_err =
            |e: vstor::qos::Error| Failure::failed(ErrorKind::InvalidInput, e.to_string());
        let mut limits = q.qos.limits(q.policy).map_err(qos_err)?;
        limits.max_iops = max_iops.unwrap_or(limits.max_iops);
        limits.min_iops = min_iops.unwrap_or(limits.min_iops);
        if limits.max_iops != 0 && limits.min_iops > limits.max_iops {
            return Err(Failure::failed(
                ErrorKind::InvalidInput,
                format!(
                    "min_iops {} is above max_iops {}",
                    limits.min_iops, limits.max_iops
                ),
            ));
        }
        q.qos.set_limits(q.policy, limits).map_err(qos_err)
    }

    fn disk(&self, i: usize) -> Result<&DiskControl, Failure> {
        self.disks.get(i).ok_or_else(|| {
            Failure::failed(
                ErrorKind::NotFound,
                format!("there is no disk {i} ({} disks)", self.disks.len()),
            )
        })
    }

    /// Per-disk statistics.
    pub fn stats(&self) -> Value {
        let disks: Vec<Value> = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let s = d.block.stats();
                let qos = d
                    .qos
                    .as_ref()
                    .and_then(|q| q.qos.flow_stats(q.flow).ok())
                    .map(|f| {
                        json!({
                            "max_iops": f.limits.max_iops,
                            "min_iops": f.limits.min_iops,
                            "requests": f.requests,
                            "units": f.units,
                            "queued": f.queued,
                            "in_flight": f.in_flight,
                            "status": format!("{:?}", f.status),
                        })
                    });
                json!({
                    "qos": qos,
                    "disk": i,
                    "describe": d.block.disk().describe(),
                    "capacity": d.block.capacity(),
                    "read_only": d.block.read_only(),
                    "reads": s.reads,
                    "writes": s.writes,
                    "flushes": s.flushes,
                    "discards": s.discards,
                    "write_zeroes": s.write_zeroes,
                    "bytes_read": s.bytes_read,
                    "bytes_written": s.bytes_written,
                    "errors": s.errors,
                    "serves": s.serves,
                    "interrupts": s.interrupts,
                    "queue_requests": d.block.queue_requests(),
                })
            })
            .collect();
        let s = self.lock();
        json!({
            "paused": s.all_paused(),
            "vcpus": s.vcpus.len(),
            "paused_vcpus": s.paused,
            "vcpu_exits": self.exits.load(Ordering::Relaxed),
            "disks": disks,
        })
    }

    /// Answers one request line (None for a notification).
    pub fn handle(&self, line: &[u8]) -> Option<Value> {
        jsonrpc::answer(line, |method, p| self.call(method, p))
    }

    fn call(&self, method: &str, p: &Value) -> Result<Value, Failure> {
        let disk = |p: &Value| {
            usize::try_from(u64_param(p, "disk")?)
                .map_err(|_| Failure::bad_params("parameter 'disk' is too large"))
        };
        match method {
            "rpc.discover" => serde_json::from_str(SCHEMA)
                .map_err(|e| Failure::failed(ErrorKind::Io, e.to_string())),
            "disk.resize" => {
                self.resize(disk(p)?, u64_param(p, "size")?)?;
                Ok(json!({}))
            }
            "disk.set-qos" => {
                let (max, min) = (opt_u64(p, "max_iops")?, opt_u64(p, "min_iops")?);
                if max.is_none() && min.is_none() {
                    return Err(Failure::bad_params("give max_iops, min_iops or both"));
                }
                self.set_qos(disk(p)?, max, min)?;
                Ok(json!({}))
            }
            "vm.stats" => Ok(self.stats()),
            "vm.pause" => {
                self.pause();
                Ok(json!({}))
            }
            "vm.resume" => {
                self.resume();
                Ok(json!({}))
            }
            other => Err(Failure::no_method(other)),
        }
    }
}

/// Serves the API on a Unix socket at `path` (replacing a stale socket file) from a background
/// thread, one thread per connection. The API threads hold the VM's control weakly, so the disks
/// close when the VM ends even while a client stays connected.
pub fn serve(control: Arc<Control>, path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    let control = Arc::downgrade(&control);
    std::thread::Builder::new()
        .name("vmm-api".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let control = control.clone();
                let _ = std::thread::Builder::new()
                    .name("vmm-api-conn".into())
                    .spawn(move || connection(&control, stream));
            }
        })?;
    Ok(())
}

fn connection(control: &Weak<Control>, stream: std::os::unix::net::UnixStream) {
    jsonrpc::serve_connection(stream, MAX_REQUEST_LINE, |line| match control.upgrade() {
        Some(control) => control.handle(line),
        None => jsonrpc::answer(line, |_, _| {
            Err(Failure::failed(ErrorKind::Unavailable, "the VM has ended"))
        }),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_core::MemoryDevice;

    fn control() -> Arc<Control> {
        let disk = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        Control::new(vec![(Arc::new(Block::new(disk, false, "t")), None)])
    }

    fn rpc(c: &Control, method: &str, params: &str) -> Value {
        let line = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{params}}}"#);
        c.handle(line.as_bytes())
            .expect("a request with an id is answered")
    }

    #[test]
    fn a_request_line_longer_than_the_limit_is_refused_and_the_connection_closed() {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::os::unix::net::UnixStream;
        let c = control();
        let (client, server) = UnixStream::pair().unwrap();
        let weak = Arc::downgrade(&c);
        let served = std::thread::spawn(move || connection(&weak, server));
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        // A request just under the limit is answered.
        let mut w = client.try_clone().unwrap();
        let mut big = r#"{"jsonrpc":"2.0","id":1,"method":"vm.stats"}"#.to_string();
        big.push_str(&" ".repeat(MAX_REQUEST_LINE - big.len()));
        writeln!(w, "{big}").unwrap();
        let mut r = BufReader::new(client.try_clone().unwrap());
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        assert!(answer.contains("\"result\""), "{answer}");
        // Then 4 MiB without a newline, and the client waits: an error, and the end.
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..64 {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let mut answer = String::new();
        r.read_line(&mut answer)
            .expect("an answer before the read timeout");
        let a: Value = serde_json::from_str(&answer).unwrap();
        assert!(
            a["error"]["message"]
                .as_str()
                .unwrap()
                .contains("longer than 1048576"),
            "{a}"
        );
        // Closed: the end of the stream, or a reset (the server left the rest unread).
        let mut rest = Vec::new();
        match r.read_to_end(&mut rest) {
            Ok(n) => assert_eq!(n, 0, "the connection is closed"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        writer.join().unwrap();
        served.join().unwrap();
    }

    #[test]
    fn bad_requests_get_errors_with_kinds() {
        let c = control();
        for (method, params, want, kind) in [
            ("fly", "{}", "no method named 'fly'", "not-found"),
            ("disk.resize", r#"{"disk":0}"#, "'size'", "invalid-input"),
            (
                "disk.resize",
                r#"{"disk":3,"size":4096}"#,
                "no disk 3",
                "not-found",
            ),
            ("disk.set-qos", r#"{"disk":0}"#, "max_iops", "invalid-input"),
            (
                "disk.set-qos",
                r#"{"disk":0,"max_iops":5}"#,
                "has no QoS",
                "unsupported",
            ),
            (
                "disk.set-qos",
                r#"{"disk":0,"max_iops":"x"}"#,
                "whole number",
                "invalid-input",
            ),
        ] {
            let a = rpc(&c, method, params);
            let e = &a["error"];
            assert!(
                e["message"].as_str().unwrap().contains(want),
                "{method}: {a}"
            );
            assert_eq!(e["data"]["kind"], kind, "{method}: {a}");
        }
        let a = c.handle(b"nonsense").unwrap();
        assert_eq!(a["error"]["code"], jsonrpc::code::PARSE_ERROR);
        let a = c.handle(br#"{"op":"stats"}"#).unwrap();
        assert_eq!(a["error"]["code"], jsonrpc::code::INVALID_REQUEST, "{a}");
    }

    #[test]
    fn stats_and_pause_without_a_vcpu() {
        let c = control();
        let a = rpc(&c, "vm.stats", "{}");
        assert_eq!(a["result"]["disks"][0]["capacity"], 1 << 20);
        assert_eq!(a["result"]["disks"][0]["reads"], 0);
        // No vCPU runs: pause returns at once and resume clears it.
        assert!(rpc(&c, "vm.pause", "{}")["result"].is_object());
        assert!(rpc(&c, "vm.resume", "{}")["result"].is_object());
        assert!(!c.paused());
        let schema = rpc(&c, "rpc.discover", "{}");
        assert_eq!(schema["result"]["openrpc"], "1.2.6");
    }

    #[test]
    fn set_qos_changes_the_limits() {
        let disk = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let qos = Qos::new(vstor::qos::QosConfig::default());
        let policy = qos
            .add_policy(
                "d",
                vstor::qos::PolicyKind::Dedicated,
                vstor::qos::Limits::max(10),
            )
            .unwrap();
        let flow = qos.add_flow("d", Some(policy), 0).unwrap();
        let dev = Arc::new(vstor::qos::QosDevice::new(qos.clone(), flow, disk).unwrap());
        let c = Control::new(vec![(
            Arc::new(Block::new(dev, false, "q")),
            Some(DiskQos { qos, policy, flow }),
        )]);
        assert_eq!(c.stats()["disks"][0]["qos"]["max_iops"], 10);
        let a = rpc(
            &c,
            "disk.set-qos",
            r#"{"disk":0,"max_iops":500,"min_iops":20}"#,
        );
        assert!(a["result"].is_object(), "{a}");
        let q = &c.stats()["disks"][0]["qos"];
        assert_eq!(
            (q["max_iops"].as_u64(), q["min_iops"].as_u64()),
            (Some(500), Some(20))
        );
        let a = rpc(&c, "disk.set-qos", r#"{"disk":0,"min_iops":900}"#);
        assert!(
            a["error"]["message"]
                .as_str()
                .unwrap()
                .contains("above max_iops"),
            "{a}"
        );
    }

    #[test]
    fn a_capacity_change_is_pending_until_served() {
        let c = control();
        c.capacity_changed(0, 2 << 20);
        assert_eq!(c.disks()[0].block.capacity(), 2 << 20);
        assert_eq!(c.service(), vec![0]);
        assert!(c.service().is_empty());
    }
}
