//! The scheduler: mClock's three tags (reservation, limit, proportional share) over flows that
//! share one backing device. Pure and single-threaded: every call takes the time, so it runs the
//! same under a virtual clock as under the real one. [`Qos`](crate::Qos) puts it behind a lock
//! for the block layer.

use crate::cost::{Cost, Normalization};
use crate::stats::{FlowStats, FlowStatus, LatencyHistogram};
use crate::Error;
use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

const NS: u64 = 1_000_000_000;
/// Virtual-time units per unit of cost at weight 1 (the proportional-share tags).
const P_SCALE: u64 = 1 << 20;
/// The weight of a flow created with weight 0 (unset).
pub const DEFAULT_WEIGHT: u64 = 100;
/// The largest weight.
pub const MAX_WEIGHT: u64 = 1 << 20;
/// The default burst allowance of a maximum: this fraction of a second's worth of it
/// (1/20: 50 ms).
pub const DEFAULT_BURST_DIVISOR: u64 = 20;

/// Identifies a flow (a virtual disk) of a scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub(crate) usize);

impl FlowId {
    /// The flow's index: flows are numbered from 0 in the order they were added.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Identifies a policy of a scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId(pub(crate) usize);

/// What a policy allows, in normalized units per second. 0 means unset everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Minimum IOPS: a reservation. When the backing device is contended, flows below their
    /// minimum are served first.
    pub min_iops: u64,
    /// Maximum IOPS: a hard cap.
    pub max_iops: u64,
    /// Burst allowance of the maximum: how many units a flow that has been idle may issue at
    /// once. 0: a twentieth of a second's worth of the maximum (at least 1).
    pub burst: u64,
    /// Bandwidth cap in bytes per second (data bytes of reads and writes).
    pub max_bandwidth: u64,
}

impl Limits {
    /// Limits with only a maximum.
    pub fn max(max_iops: u64) -> Self {
        Limits {
            max_iops,
            ..Default::default()
        }
    }

    /// Limits with only a minimum.
    pub fn min(min_iops: u64) -> Self {
        Limits {
            min_iops,
            ..Default::default()
        }
    }

    /// Checks that the limits fit together (a minimum at most the maximum).
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_iops > 0 && self.min_iops > self.max_iops {
            return Err(Error::MinAboveMax {
                min: self.min_iops,
                max: self.max_iops,
            });
        }
        Ok(())
    }

    /// The burst allowance in force: [`burst`](Limits::burst), or the default for the maximum.
    pub fn effective_burst(&self) -> u64 {
        if self.burst > 0 {
            self.burst
        } else {
            (self.max_iops / DEFAULT_BURST_DIVISOR).max(1)
        }
    }
}

/// How a policy's limits apply to the flows that use it (as Windows Server 2016's Storage QoS
/// policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// Every flow gets the whole minimum and maximum for itself.
    #[default]
    Dedicated,
    /// The flows share one minimum and one maximum as a group.
    Aggregated,
}

/// The scheduler's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QosConfig {
    /// The most requests the scheduler keeps in flight on the backing device (0: no bound).
    /// Requests beyond it wait in the scheduler, where reservations and weights order them;
    /// without a bound nothing ever waits for the device, so only maximums take effect.
    pub max_in_flight: usize,
    /// The window over which minimums are checked for alerts.
    pub window: Duration,
    /// How requests are counted.
    pub normalization: Normalization,
}

impl Default for QosConfig {
    /// 32 requests in flight, a one-second alert window, 8 KiB units.
    fn default() -> Self {
        QosConfig {
            max_in_flight: 32,
            window: Duration::from_secs(1),
            normalization: Normalization::default(),
        }
    }
}

/// A time that advances by `cost * scale / rate` at each step, exactly (the remainder of the
/// division is carried).
#[derive(Debug, Clone, Copy, Default)]
struct Pace {
    t: u64,
    rem: u64,
}

impl Pace {
    fn advance(&mut self, cost: u64, rate: u64, scale: u64) {
        let num = u128::from(cost) * u128::from(scale) + u128::from(self.rem);
        let rate128 = u128::from(rate.max(1));
        self.t = self
            .t
            .saturating_add(u64::try_from(num / rate128).unwrap_or(u64::MAX));
        self.rem = (num % rate128) as u64;
    }

    fn raise_to(&mut self, t: u64) {
        if self.t < t {
            self.t = t;
            self.rem = 0;
        }
    }
}

fn span(cost: u64, rate: u64) -> u64 {
    u64::try_from(u128::from(cost) * u128::from(NS) / u128::from(rate.max(1))).unwrap_or(u64::MAX)
}

/// A token bucket in GCRA form: `tat` is when the bucket would be full again.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    rate: u64,
    burst: u64,
    tat: Pace,
}

impl Bucket {
    #[cfg(test)]
    fn new(rate: u64, burst: u64) -> Self {
        Bucket {
            rate,
            burst: burst.max(1),
            tat: Pace::default(),
        }
    }

    /// When a request of `cost` may go: once the bucket holds `min(cost, burst)` (a request
    /// larger than the burst goes into debt rather than wait forever). A bucket `shared` by a
    /// group lets any request go once it holds one token (going into debt for the rest), so
    /// that which member goes next is the weights' decision and a member with large requests
    /// is not starved by members whose small requests fit first.
    fn ready(&self, cost: u64, shared: bool) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        let need = if shared { 1 } else { cost.min(self.burst) };
        self.tat
            .t
            .saturating_sub(span(self.burst - need, self.rate))
    }

    fn take(&mut self, cost: u64, now: u64) {
        if self.rate == 0 {
            return;
        }
        self.tat.raise_to(now);
        self.tat.advance(cost, self.rate, NS);
    }

    fn set(&mut self, rate: u64, burst: u64) {
        self.rate = rate;
        self.burst = burst.max(1);
        self.tat.rem = 0;
    }
}

/// The phase that dispatched a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The constraint-based phase: the flow was below its reservation.
    Reservation,
    /// The weight-based phase: spare capacity shared by weight.
    Weight,
}

/// A request the scheduler lets go to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatched {
    /// Its flow.
    pub flow: FlowId,
    /// The token it was enqueued with.
    pub token: u64,
    /// Its cost.
    pub cost: Cost,
    /// When it was enqueued.
    pub arrival_ns: u64,
    /// Which phase let it go.
    pub phase: Phase,
}

/// The scheduler's answer to "what next?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Send this request to the device now.
    Io(Dispatched),
    /// Requests are queued but every one is held by a maximum until this time (nanoseconds);
    /// ask again then.
    Wait(u64),
    /// The device has as many requests in flight as allowed: ask again after a completion.
    Busy,
    /// Nothing is queued.
    Idle,
}

/// What an event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosEventKind {
    /// A flow (or an aggregated group) asked for at least its minimum over a window and did not
    /// get it.
    InsufficientThroughput,
    /// A flow that was short of its minimum got it again.
    Recovered,
}

/// An event for the embedder (as Hyper-V tells an administrator); its `Display` is the log line.
#[derive(Debug, Clone, PartialEq)]
pub struct QosEvent {
    /// What happened.
    pub kind: QosEventKind,
    /// The flow's name, or the policy's for an aggregated group.
    pub name: String,
    /// The flows concerned (several for an aggregated group).
    pub flows: Vec<FlowId>,
    /// The minimum in normalized IOPS.
    pub minimum_iops: u64,
    /// What the flow got while it had I/O outstanding, in normalized IOPS.
    pub achieved_iops: f64,
    /// The window's length.
    pub window: Duration,
    /// When the window ended (nanoseconds on the scheduler's clock).
    pub at_ns: u64,
}

impl fmt::Display for QosEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            QosEventKind::InsufficientThroughput => write!(
                f,
                "qos: flow '{}' gets {:.0} normalized IOPS, below its minimum of {} \
                 (InsufficientThroughput over {:.1} s)",
                self.name,
                self.achieved_iops,
                self.minimum_iops,
                self.window.as_secs_f64()
            ),
            QosEventKind::Recovered => write!(
                f,
                "qos: flow '{}' gets its minimum of {} normalized IOPS again ({:.0})",
                self.name, self.minimum_iops, self.achieved_iops
            ),
        }
    }
}

struct Pending {
    cost: Cost,
    arrival: u64,
    token: u64,
}

/// The tags of a flow's head request, kept beside each other for the dispatch scan.
#[derive(Debug, Clone, Copy)]
struct Head {
    /// Reservation tag (u64::MAX: no reservation or nothing queued).
    r: u64,
    /// When the maximums let it go (u64::MAX: nothing queued).
    l: u64,
    /// Proportional-share tag.
    p: u64,
    /// Tie-break between equal reservation tags (members of an aggregated group): a
    /// proportional-share tag of reservation-phase service.
    g: u64,
}

const NO_HEAD: Head = Head {
    r: u64::MAX,
    l: u64::MAX,
    p: u64::MAX,
    g: u64::MAX,
};

/// The state of one instance of a policy: a dedicated policy has one per flow, an aggregated
/// one a single one for its group.
struct LimitState {
    policy: Option<usize>,
    min_rate: u64,
    iops: Bucket,
    bw: Bucket,
    reserve: Pace,
    /// The members' reservation-phase virtual time (see `Flow::g`).
    gtime: u64,
    members: Vec<usize>,
    // Alert window.
    outstanding: usize,
    busy_since: u64,
    w_busy: u64,
    w_units: u64,
    status: FlowStatus,
}

impl LimitState {
    fn new(policy: Option<usize>, limits: &Limits) -> Self {
        let mut s = LimitState {
            policy,
            min_rate: 0,
            iops: Bucket::default(),
            bw: Bucket::default(),
            reserve: Pace::default(),
            gtime: 0,
            members: Vec::new(),
            outstanding: 0,
            busy_since: 0,
            w_busy: 0,
            w_units: 0,
            status: FlowStatus::Ok,
        };
        s.apply(limits);
        s
    }

    fn apply(&mut self, l: &Limits) {
        self.iops.set(l.max_iops, l.effective_burst());
        self.bw.set(
            l.max_bandwidth,
            (l.max_bandwidth / DEFAULT_BURST_DIVISOR).max(1),
        );
        if self.min_rate != l.min_iops {
            self.reserve.rem = 0;
        }
        self.min_rate = l.min_iops;
    }
}

struct Policy {
    name: String,
    kind: PolicyKind,
    limits: Limits,
    states: Vec<usize>,
}

struct Flow {
    name: String,
    weight: u64,
    state: usize,
    queue: VecDeque<Pending>,
    p: Pace,
    /// Advanced by cost / weight on reservation-phase service: shares a group's reservation
    /// among its members by weight.
    g: Pace,
    in_flight: usize,
    requests: u64,
    units: u64,
    bytes: u64,
    latency: LatencyHistogram,
}

/// The mClock-family scheduler of one backing device.
///
/// Each queued request gets three tags as it reaches the head of its flow's queue:
///
/// - a reservation tag, spaced `cost / min` seconds apart, in real time;
/// - a limit time, when the flow's maximum (a token bucket with a burst allowance, in IOPS and
///   optionally in bytes) lets it go;
/// - a proportional-share tag, spaced `cost / weight` apart in a virtual time that a flow
///   joins at the current virtual time when it becomes busy (so an idle flow banks no credit
///   and its share goes to the others while it is idle).
///
/// While the device has room ([`QosConfig::max_in_flight`]), [`dispatch`](Scheduler::dispatch)
/// first serves the earliest reservation tag that is due (the constraint-based phase), then the
/// smallest share tag (the weight-based phase), always among requests their maximum lets go. A
/// request served in the reservation phase does not advance its flow's share tag and one served
/// by weight does not advance its reservation tag, so under contention every flow gets its
/// minimum and the rest is shared by weight, each flow capped by its maximum. Requests of one
/// flow are served in the order they arrived.
pub struct Scheduler {
    config: QosConfig,
    flows: Vec<Flow>,
    heads: Vec<Head>,
    states: Vec<LimitState>,
    policies: Vec<Policy>,
    queued: usize,
    in_flight: usize,
    vtime: u64,
    window_start: u64,
    events: Vec<QosEvent>,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("flows", &self.flows.len())
            .field("policies", &self.policies.len())
            .field("queued", &self.queued)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Scheduler {
    /// A scheduler with no flows.
    pub fn new(config: QosConfig) -> Self {
        Scheduler {
            config,
            flows: Vec::new(),
            heads: Vec::new(),
            states: Vec::new(),
            policies: Vec::new(),
            queued: 0,
            in_flight: 0,
            vtime: 0,
            window_start: 0,
            events: Vec::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &QosConfig {
        &self.config
    }

    /// Adds a policy.
    pub fn add_policy(
        &mut self,
        name: &str,
        kind: PolicyKind,
        limits: Limits,
    ) -> Result<PolicyId, Error> {
        limits.validate()?;
        let id = self.policies.len();
        let mut states = Vec::new();
        if kind == PolicyKind::Aggregated {
            states.push(self.states.len());
            self.states.push(LimitState::new(Some(id), &limits));
        }
        self.policies.push(Policy {
            name: name.to_string(),
            kind,
            limits,
            states,
        });
        Ok(PolicyId(id))
    }

    /// Adds a flow under `policy` (`None`: no minimum and no maximum) with `weight` (0: the
    /// default weight, [`DEFAULT_WEIGHT`]).
    pub fn add_flow(
        &mut self,
        name: &str,
        policy: Option<PolicyId>,
        weight: u64,
    ) -> Result<FlowId, Error> {
        let weight = check_weight(weight)?;
        let idx = self.flows.len();
        let state = match policy {
            None => {
                self.states.push(LimitState::new(None, &Limits::default()));
                self.states.len() - 1
            }
            Some(PolicyId(p)) => {
                let pol = self.policies.get(p).ok_or(Error::UnknownPolicy(p))?;
                match pol.kind {
                    PolicyKind::Aggregated => pol.states[0],
                    PolicyKind::Dedicated => {
                        let s = LimitState::new(Some(p), &pol.limits);
                        self.states.push(s);
                        let s = self.states.len() - 1;
                        self.policies[p].states.push(s);
                        s
                    }
                }
            }
        };
        self.states[state].members.push(idx);
        self.flows.push(Flow {
            name: name.to_string(),
            weight,
            state,
            queue: VecDeque::new(),
            p: Pace {
                t: self.vtime,
                rem: 0,
            },
            g: Pace {
                t: self.states[state].gtime,
                rem: 0,
            },
            in_flight: 0,
            requests: 0,
            units: 0,
            bytes: 0,
            latency: LatencyHistogram::new(),
        });
        self.heads.push(NO_HEAD);
        Ok(FlowId(idx))
    }

    /// The number of flows.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Requests waiting in the scheduler.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Requests dispatched and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A policy's limits.
    pub fn limits(&self, policy: PolicyId) -> Result<Limits, Error> {
        self.policies
            .get(policy.0)
            .map(|p| p.limits)
            .ok_or(Error::UnknownPolicy(policy.0))
    }

    /// Changes a policy's limits at run time; every flow under it follows at once. Credit a
    /// maximum has banked is kept up to the new burst allowance.
    pub fn set_limits(&mut self, policy: PolicyId, limits: Limits) -> Result<(), Error> {
        limits.validate()?;
        let pol = self
            .policies
            .get_mut(policy.0)
            .ok_or(Error::UnknownPolicy(policy.0))?;
        pol.limits = limits;
        let states = pol.states.clone();
        for s in states {
            self.states[s].apply(&limits);
            for m in self.states[s].members.clone() {
                self.refresh(m);
            }
        }
        Ok(())
    }

    /// Changes a flow's weight at run time (0: the default).
    pub fn set_weight(&mut self, flow: FlowId, weight: u64) -> Result<(), Error> {
        let weight = check_weight(weight)?;
        let f = self.flow_mut(flow)?;
        f.weight = weight;
        f.p.rem = 0;
        Ok(())
    }

    fn flow_mut(&mut self, flow: FlowId) -> Result<&mut Flow, Error> {
        self.flows.get_mut(flow.0).ok_or(Error::UnknownFlow(flow.0))
    }

    /// Queues a request of `flow` costing `cost` (at least 1 unit), identified by `token`, at
    /// time `now`.
    pub fn enqueue(&mut self, flow: FlowId, cost: Cost, token: u64, now: u64) -> Result<(), Error> {
        self.tick(now);
        let vtime = self.vtime;
        let st = self
            .flows
            .get(flow.0)
            .ok_or(Error::UnknownFlow(flow.0))?
            .state;
        let gtime = self.states[st].gtime;
        let f = &mut self.flows[flow.0];
        let was_empty = f.queue.is_empty();
        if was_empty {
            // A flow that becomes busy joins at the current virtual times: no banked credit.
            f.p.raise_to(vtime);
            f.g.raise_to(gtime);
        }
        f.queue.push_back(Pending {
            cost: Cost {
                units: cost.units.max(1),
                bytes: cost.bytes,
            },
            arrival: now,
            token,
        });
        self.queued += 1;
        let s = &mut self.states[st];
        if s.outstanding == 0 {
            s.busy_since = now;
        }
        s.outstanding += 1;
        if was_empty {
            self.refresh(flow.0);
        }
        Ok(())
    }

    /// Recomputes the tags of flow `i`'s head request.
    fn refresh(&mut self, i: usize) {
        let f = &self.flows[i];
        self.heads[i] = match f.queue.front() {
            None => NO_HEAD,
            Some(h) => {
                let s = &self.states[f.state];
                let shared = s.members.len() > 1;
                Head {
                    r: if s.min_rate > 0 {
                        s.reserve.t.max(h.arrival)
                    } else {
                        u64::MAX
                    },
                    l: s.iops
                        .ready(h.cost.units, shared)
                        .max(s.bw.ready(h.cost.bytes, shared)),
                    p: f.p.t,
                    g: f.g.t,
                }
            }
        };
    }

    /// Picks the next request to send to the device at time `now`, if any.
    pub fn dispatch(&mut self, now: u64) -> Dispatch {
        self.tick(now);
        if self.queued == 0 {
            return Dispatch::Idle;
        }
        if self.config.max_in_flight != 0 && self.in_flight >= self.config.max_in_flight {
            return Dispatch::Busy;
        }
        let (mut best_r, mut best_g, mut r_at) = (u64::MAX, u64::MAX, usize::MAX);
        let (mut best_p, mut p_at) = (u64::MAX, usize::MAX);
        let mut next = u64::MAX;
        for (i, h) in self.heads.iter().enumerate() {
            if h.l <= now {
                if h.r <= now && (h.r < best_r || (h.r == best_r && h.g < best_g)) {
                    best_r = h.r;
                    best_g = h.g;
                    r_at = i;
                }
                if h.p < best_p || p_at == usize::MAX {
                    best_p = h.p;
                    p_at = i;
                }
            } else if h.l < next {
                next = h.l;
            }
        }
        let (i, phase) = if r_at != usize::MAX {
            (r_at, Phase::Reservation)
        } else if p_at != usize::MAX {
            (p_at, Phase::Weight)
        } else {
            return Dispatch::Wait(next);
        };
        Dispatch::Io(self.pop(i, phase, now))
    }

    fn pop(&mut self, i: usize, phase: Phase, now: u64) -> Dispatched {
        let f = &mut self.flows[i];
        let req = f.queue.pop_front().expect("a head was chosen");
        f.in_flight += 1;
        let st = f.state;
        match phase {
            Phase::Weight => {
                self.vtime = self.vtime.max(f.p.t);
                f.p.advance(req.cost.units, f.weight, P_SCALE);
            }
            Phase::Reservation => {
                let s = &mut self.states[st];
                s.gtime = s.gtime.max(f.g.t);
                f.g.advance(req.cost.units, f.weight, P_SCALE);
                s.reserve.raise_to(req.arrival);
                s.reserve.advance(req.cost.units, s.min_rate, NS);
            }
        }
        let s = &mut self.states[st];
        s.iops.take(req.cost.units, now);
        s.bw.take(req.cost.bytes, now);
        self.queued -= 1;
        self.in_flight += 1;
        if self.states[st].members.len() > 1 {
            for k in 0..self.states[st].members.len() {
                let m = self.states[st].members[k];
                self.refresh(m);
            }
        } else {
            self.refresh(i);
        }
        Dispatched {
            flow: FlowId(i),
            token: req.token,
            cost: req.cost,
            arrival_ns: req.arrival,
            phase,
        }
    }

    /// Records the completion at `now` of a dispatched request of `flow` that cost `cost`,
    /// `latency_ns` after it arrived.
    pub fn complete(
        &mut self,
        flow: FlowId,
        cost: Cost,
        latency_ns: u64,
        now: u64,
    ) -> Result<(), Error> {
        self.tick(now);
        let f = self.flow_mut(flow)?;
        if f.in_flight == 0 {
            return Err(Error::NotInFlight(flow.0));
        }
        let units = cost.units.max(1);
        f.in_flight -= 1;
        f.requests += 1;
        f.units += units;
        f.bytes += cost.bytes;
        f.latency.record(latency_ns);
        let st = f.state;
        self.in_flight -= 1;
        let s = &mut self.states[st];
        s.w_units += units;
        s.outstanding -= 1;
        if s.outstanding == 0 {
            s.w_busy += now.saturating_sub(s.busy_since);
        }
        Ok(())
    }

    /// When the head request of `flow` is held by its maximum past `now`: the time its maximum
    /// lets it go. `None` if the flow has nothing queued or its head may go now.
    pub fn held_until(&self, flow: FlowId, now: u64) -> Option<u64> {
        let h = self.heads.get(flow.0)?;
        (h.l != u64::MAX && h.l > now).then_some(h.l)
    }

    /// Takes the events raised so far.
    pub fn take_events(&mut self) -> Vec<QosEvent> {
        std::mem::take(&mut self.events)
    }

    /// Whether events are waiting to be taken.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Closes the alert window if it has run out at `now` (every other call does this too).
    pub fn poll(&mut self, now: u64) {
        self.tick(now);
    }

    fn tick(&mut self, now: u64) {
        let window = u64::try_from(self.config.window.as_nanos()).unwrap_or(u64::MAX);
        if window == 0 || now < self.window_start.saturating_add(window) {
            return;
        }
        let len = now - self.window_start;
        self.window_start = now;
        for si in 0..self.states.len() {
            let s = &mut self.states[si];
            let mut busy = s.w_busy;
            if s.outstanding > 0 {
                busy += now.saturating_sub(s.busy_since);
                s.busy_since = now;
            }
            let units = s.w_units;
            s.w_busy = 0;
            s.w_units = 0;
            if s.min_rate == 0 {
                s.status = FlowStatus::Ok;
                continue;
            }
            // What the minimum entitles it to for the time it had I/O outstanding.
            let entitled = u128::from(s.min_rate) * u128::from(busy) / u128::from(NS);
            let slack = (entitled / 20).max(2);
            let short = u128::from(units) + slack < entitled;
            let achieved = if busy == 0 {
                0.0
            } else {
                units as f64 * NS as f64 / busy as f64
            };
            let kind = match (s.status, short) {
                (FlowStatus::Ok, true) => QosEventKind::InsufficientThroughput,
                (FlowStatus::InsufficientThroughput, false) => QosEventKind::Recovered,
                _ => continue,
            };
            s.status = if short {
                FlowStatus::InsufficientThroughput
            } else {
                FlowStatus::Ok
            };
            let minimum_iops = s.min_rate;
            let flows: Vec<FlowId> = s.members.iter().map(|&m| FlowId(m)).collect();
            let name = match (s.policy, s.members.as_slice()) {
                (Some(p), _) if self.policies[p].kind == PolicyKind::Aggregated => {
                    self.policies[p].name.clone()
                }
                (_, [m]) => self.flows[*m].name.clone(),
                _ => String::new(),
            };
            self.events.push(QosEvent {
                kind,
                name,
                flows,
                minimum_iops,
                achieved_iops: achieved,
                window: Duration::from_nanos(len),
                at_ns: now,
            });
        }
    }

    /// A flow's counters at `now`.
    pub fn flow_stats(&self, flow: FlowId, now: u64) -> Result<FlowStats, Error> {
        let f = self.flows.get(flow.0).ok_or(Error::UnknownFlow(flow.0))?;
        let s = &self.states[f.state];
        let (limits, aggregated) = match s.policy {
            Some(p) => (
                self.policies[p].limits,
                self.policies[p].kind == PolicyKind::Aggregated,
            ),
            None => (Limits::default(), false),
        };
        Ok(FlowStats {
            flow,
            name: f.name.clone(),
            at_ns: now,
            limits,
            aggregated,
            weight: f.weight,
            requests: f.requests,
            units: f.units,
            bytes: f.bytes,
            latency: f.latency.clone(),
            queued: f.queue.len(),
            in_flight: f.in_flight,
            status: s.status,
        })
    }
}

fn check_weight(weight: u64) -> Result<u64, Error> {
    match weight {
        0 => Ok(DEFAULT_WEIGHT),
        w if w <= MAX_WEIGHT => Ok(w),
        w => Err(Error::InvalidConfig(format!(
            "weight {w} is above the largest weight {MAX_WEIGHT}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(units: u64) -> Cost {
        Cost { units, bytes: 0 }
    }

    #[test]
    fn pace_is_exact() {
        let mut p = Pace::default();
        for _ in 0..3 {
            p.advance(1, 3, NS);
        }
        assert_eq!(p.t, NS);
        assert_eq!(p.rem, 0);
    }

    #[test]
    fn bucket_lets_a_burst_go_then_paces() {
        let mut b = Bucket::new(1000, 10);
        let now = 5 * NS;
        for _ in 0..10 {
            assert!(b.ready(1, false) <= now);
            b.take(1, now);
        }
        assert_eq!(b.ready(1, false), now + 1_000_000);
        // A request larger than the burst goes when the bucket is full, into debt.
        let mut b = Bucket::new(100, 5);
        assert_eq!(b.ready(128, false), 0);
        b.take(128, now);
        assert_eq!(b.ready(1, false), now + span(128, 100) - span(4, 100));
        // A shared bucket lets anything go once it is out of debt.
        assert_eq!(b.ready(5, true), b.ready(1, false));
    }

    #[test]
    fn bad_configuration_is_refused() {
        let mut s = Scheduler::new(QosConfig::default());
        assert!(matches!(
            s.add_policy(
                "p",
                PolicyKind::Dedicated,
                Limits {
                    min_iops: 10,
                    max_iops: 5,
                    ..Default::default()
                }
            ),
            Err(Error::MinAboveMax { min: 10, max: 5 })
        ));
        assert!(matches!(
            s.add_flow("f", Some(PolicyId(3)), 0),
            Err(Error::UnknownPolicy(3))
        ));
        assert!(s.add_flow("f", None, MAX_WEIGHT + 1).is_err());
        let f = s.add_flow("f", None, 0).unwrap();
        assert!(matches!(
            s.complete(f, one(1), 0, 0),
            Err(Error::NotInFlight(0))
        ));
        assert!(matches!(
            s.enqueue(FlowId(9), one(1), 0, 0),
            Err(Error::UnknownFlow(9))
        ));
    }

    #[test]
    fn dispatch_answers() {
        let mut s = Scheduler::new(QosConfig {
            max_in_flight: 1,
            ..Default::default()
        });
        let p = s
            .add_policy(
                "cap",
                PolicyKind::Dedicated,
                Limits {
                    max_iops: 10,
                    burst: 1,
                    ..Default::default()
                },
            )
            .unwrap();
        let f = s.add_flow("f", Some(p), 0).unwrap();
        assert_eq!(s.dispatch(0), Dispatch::Idle);
        s.enqueue(f, one(1), 7, 0).unwrap();
        s.enqueue(f, one(1), 8, 0).unwrap();
        let Dispatch::Io(d) = s.dispatch(0) else {
            panic!("not dispatched")
        };
        assert_eq!((d.flow, d.token, d.phase), (f, 7, Phase::Weight));
        assert_eq!(s.dispatch(0), Dispatch::Busy);
        s.complete(f, d.cost, 10, 10).unwrap();
        assert_eq!(s.dispatch(10), Dispatch::Wait(NS / 10));
        assert_eq!(s.held_until(f, 10), Some(NS / 10));
        assert!(matches!(
            s.dispatch(NS / 10),
            Dispatch::Io(Dispatched { token: 8, .. })
        ));
        assert_eq!(s.held_until(f, NS / 10), None);
    }
}
