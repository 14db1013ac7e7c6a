//! The QoS layer as a block device: [`Qos`] is the scheduler of one backing device behind a
//! lock, [`QosDevice`] is one flow's view of it.

use crate::clock::{Clock, SystemClock};
use crate::cost::Normalization;
use crate::sched::{
    Dispatch, FlowId, Limits, PolicyId, PolicyKind, QosConfig, QosEvent, Scheduler,
};
use crate::stats::FlowStats;
use crate::Error;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use vstor_core::{BlockDevice, CapacitySignal, DeviceInfo, Op, Request};

type Listener = Arc<dyn Fn(&QosEvent) + Send + Sync>;

struct Waiter {
    granted: usize,
}

struct Inner {
    sched: Scheduler,
    waiters: Vec<Waiter>,
    free: Vec<usize>,
    /// One per flow: the threads of a flow wait on it for their requests to be let go.
    cvs: Vec<Arc<Condvar>>,
    /// Threads waiting on each flow's condition variable (a notification costs a system call,
    /// so it is sent only when someone waits).
    sleepers: Vec<usize>,
}

impl Inner {
    /// Lets go every request the scheduler lets go at `now` and wakes their flows' threads.
    fn grant(&mut self, now: u64) {
        while let Dispatch::Io(d) = self.sched.dispatch(now) {
            self.waiters[d.token as usize].granted += 1;
            if self.sleepers[d.flow.0] > 0 {
                self.cvs[d.flow.0].notify_all();
            }
        }
    }

    fn new_waiter(&mut self) -> usize {
        let w = Waiter { granted: 0 };
        match self.free.pop() {
            Some(i) => {
                self.waiters[i] = w;
                i
            }
            None => {
                self.waiters.push(w);
                self.waiters.len() - 1
            }
        }
    }
}

/// The QoS scheduler of one backing device, shared by the flows (virtual disks) on it.
///
/// Create it with [`Qos::new`], add policies and flows, and wrap each virtual disk's device in a
/// [`QosDevice`] for its flow. Limits and weights can change while I/O runs; statistics and
/// events are available at any time.
///
/// ```
/// use std::sync::Arc;
/// use vstor_core::{BlockDevice, MemoryDevice};
/// use vstor_qos::{Limits, PolicyKind, Qos, QosConfig, QosDevice};
///
/// let qos = Qos::new(QosConfig::default());
/// let gold = qos.add_policy("gold", PolicyKind::Dedicated, Limits { min_iops: 500, max_iops: 5000, ..Default::default() })?;
/// let vm1 = qos.add_flow("vm1", Some(gold), 0)?;
/// let disk = QosDevice::new(qos.clone(), vm1, MemoryDevice::new(1 << 20)?)?;
/// disk.write_at(0, &[1u8; 8192])?;
/// let stats = qos.flow_stats(vm1)?;
/// assert_eq!((stats.requests, stats.units), (1, 1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Qos {
    inner: Mutex<Inner>,
    clock: Arc<dyn Clock>,
    normalization: Normalization,
    listeners: Mutex<Vec<Listener>>,
}

impl fmt::Debug for Qos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qos")
            .field("scheduler", &self.lock().sched)
            .field("clock", &self.clock)
            .finish()
    }
}

impl Qos {
    /// A scheduler on the system clock.
    pub fn new(config: QosConfig) -> Arc<Self> {
        Self::with_clock(config, Arc::new(SystemClock::new()))
    }

    /// A scheduler on `clock` (a [`VirtualClock`](crate::VirtualClock) in tests).
    pub fn with_clock(config: QosConfig, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Qos {
            inner: Mutex::new(Inner {
                sched: Scheduler::new(config),
                waiters: Vec::new(),
                free: Vec::new(),
                cvs: Vec::new(),
                sleepers: Vec::new(),
            }),
            clock,
            normalization: config.normalization,
            listeners: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Releases the lock, then tells the listeners about any events raised meanwhile.
    fn unlock(&self, mut g: MutexGuard<'_, Inner>) {
        let events = if g.sched.has_events() {
            g.sched.take_events()
        } else {
            Vec::new()
        };
        drop(g);
        if events.is_empty() {
            return;
        }
        let listeners: Vec<Listener> = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for e in &events {
            for l in &listeners {
                l(e);
            }
        }
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// How requests are counted.
    pub fn normalization(&self) -> Normalization {
        self.normalization
    }

    /// Adds a policy (see [`Scheduler::add_policy`]).
    pub fn add_policy(
        &self,
        name: &str,
        kind: PolicyKind,
        limits: Limits,
    ) -> Result<PolicyId, Error> {
        self.lock().sched.add_policy(name, kind, limits)
    }

    /// Adds a flow (see [`Scheduler::add_flow`]).
    pub fn add_flow(
        &self,
        name: &str,
        policy: Option<PolicyId>,
        weight: u64,
    ) -> Result<FlowId, Error> {
        let mut g = self.lock();
        let f = g.sched.add_flow(name, policy, weight)?;
        g.cvs.push(Arc::new(Condvar::new()));
        g.sleepers.push(0);
        Ok(f)
    }

    /// A policy's limits.
    pub fn limits(&self, policy: PolicyId) -> Result<Limits, Error> {
        self.lock().sched.limits(policy)
    }

    /// Changes a policy's limits while I/O runs: requests already waiting follow the new
    /// limits at once.
    pub fn set_limits(&self, policy: PolicyId, limits: Limits) -> Result<(), Error> {
        let mut g = self.lock();
        g.sched.set_limits(policy, limits)?;
        g.grant(self.clock.now());
        for cv in &g.cvs {
            cv.notify_all();
        }
        self.unlock(g);
        Ok(())
    }

    /// Changes a flow's weight while I/O runs.
    pub fn set_weight(&self, flow: FlowId, weight: u64) -> Result<(), Error> {
        self.lock().sched.set_weight(flow, weight)
    }

    /// A flow's counters now.
    pub fn flow_stats(&self, flow: FlowId) -> Result<FlowStats, Error> {
        let g = self.lock();
        g.sched.flow_stats(flow, self.clock.now())
    }

    /// Every flow's counters now, in the order the flows were added.
    pub fn all_stats(&self) -> Vec<FlowStats> {
        let g = self.lock();
        let now = self.clock.now();
        (0..g.sched.flow_count())
            .filter_map(|i| g.sched.flow_stats(FlowId(i), now).ok())
            .collect()
    }

    /// Calls `listener` with every event from now on (after the scheduler's lock is released,
    /// on the thread whose call closed the window).
    pub fn subscribe(&self, listener: impl Fn(&QosEvent) + Send + Sync + 'static) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(listener));
    }

    /// Closes the alert window if it has run out and delivers its events. Every I/O does this
    /// too; call it when no I/O runs for a while.
    pub fn poll(&self) {
        let mut g = self.lock();
        g.sched.poll(self.clock.now());
        self.unlock(g);
    }

    /// Runs the costed requests `seg[..n]` of one flow through the scheduler and down, in the
    /// order the scheduler lets them go (a flow's requests go in order, so each piece is a
    /// contiguous run); whatever follows `n` (a flush) goes down with the last piece.
    fn run_segment<D: BlockDevice + ?Sized>(
        &self,
        flow: FlowId,
        cv: &Condvar,
        dev: &D,
        seg: &mut [Request<'_>],
        n: usize,
    ) {
        let norm = self.normalization;
        let mut g = self.lock();
        let arrival = self.clock.now();
        let w = g.new_waiter();
        for r in &seg[..n] {
            // The flow exists: QosDevice::new checked it and flows are never removed.
            let _ = g.sched.enqueue(flow, norm.cost(r), w as u64, arrival);
        }
        let mut done = 0;
        loop {
            let now = self.clock.now();
            g.grant(now);
            let granted = g.waiters[w].granted;
            if granted > done {
                self.unlock(g);
                let hi = if granted == n { seg.len() } else { granted };
                dev.submit(&mut seg[done..hi]);
                let end = self.clock.now();
                g = self.lock();
                for r in &seg[done..granted] {
                    let _ = g
                        .sched
                        .complete(flow, norm.cost(r), end.saturating_sub(arrival), end);
                }
                done = granted;
                if done == n {
                    g.grant(end);
                    g.free.push(w);
                    break;
                }
                continue;
            }
            let held = g.sched.held_until(flow, now);
            if let Some(t) = held {
                if self.clock.advance_to(t) {
                    continue;
                }
            }
            g.sleepers[flow.0] += 1;
            g = match held {
                Some(t) => {
                    cv.wait_timeout(g, Duration::from_nanos(t - now))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => cv.wait(g).unwrap_or_else(|p| p.into_inner()),
            };
            g.sleepers[flow.0] -= 1;
        }
        self.unlock(g);
    }
}

/// One flow's view of a [`Qos`] scheduler over the device `D`: a [`BlockDevice`] that lets each
/// request go when the scheduler says.
///
/// A batch stays a batch: the requests the scheduler lets go together go down together, at
/// once, while the ones it holds back wait, so a held-back request never delays the completion
/// of one let go before it. A flush costs nothing and keeps its place as a barrier: it goes down
/// after every earlier request of its batch has completed, with the last of them.
pub struct QosDevice<D> {
    qos: Arc<Qos>,
    flow: FlowId,
    name: String,
    cv: Arc<Condvar>,
    inner: D,
}

impl<D> fmt::Debug for QosDevice<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QosDevice")
            .field("flow", &self.flow)
            .field("name", &self.name)
            .finish()
    }
}

impl<D: BlockDevice> QosDevice<D> {
    /// Wraps `inner` as flow `flow` of `qos`.
    pub fn new(qos: Arc<Qos>, flow: FlowId, inner: D) -> Result<Self, Error> {
        let (cv, name) = {
            let g = qos.lock();
            let cv = g
                .cvs
                .get(flow.0)
                .cloned()
                .ok_or(Error::UnknownFlow(flow.0))?;
            let name = g.sched.flow_stats(flow, 0)?.name;
            (cv, name)
        };
        Ok(QosDevice {
            qos,
            flow,
            name,
            cv,
            inner,
        })
    }

    /// The flow.
    pub fn flow(&self) -> FlowId {
        self.flow
    }

    /// The scheduler.
    pub fn qos(&self) -> &Arc<Qos> {
        &self.qos
    }

    /// The device below.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: BlockDevice> BlockDevice for QosDevice<D> {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let mut start = 0;
        while start < batch.len() {
            let is_flush = |r: &Request<'_>| matches!(r.op, Op::Flush);
            let flush = batch[start..].iter().position(is_flush).map(|p| start + p);
            let (costed, end) = match flush {
                Some(f) => (f, f + 1),
                None => (batch.len(), batch.len()),
            };
            if costed == start {
                // Flushes with nothing to schedule before them go down together at once.
                let run = batch[start..].iter().take_while(|r| is_flush(r)).count();
                self.inner.submit(&mut batch[start..start + run]);
                start += run;
                continue;
            }
            self.qos.run_segment(
                self.flow,
                &self.cv,
                &self.inner,
                &mut batch[start..end],
                costed - start,
            );
            start = end;
        }
    }

    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn resize(&self, new_capacity: u64) -> vstor_core::Result<()> {
        self.inner.resize(new_capacity)
    }

    fn capacity_signal(&self) -> Option<Arc<CapacitySignal>> {
        self.inner.capacity_signal()
    }

    fn describe(&self) -> String {
        format!("qos flow '{}' over {}", self.name, self.inner.describe())
    }

    /// Not I/O: not charged to the flow.
    fn allocation(&self, offset: u64, len: u64) -> vstor_core::Result<Vec<vstor_core::Extent>> {
        self.inner.allocation(offset, len)
    }
}
