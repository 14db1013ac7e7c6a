//! The fault-injecting device: the instrument of every crash and fault test in vstor.
//!
//! [`FaultDevice`] wraps a device (the "medium") and adds, under test control:
//! - a volatile write cache: writes are held until a flush, and a simulated power cut
//!   ([`FaultDevice::power_cut`]) decides, per unflushed write, whether it reached the medium
//!   whole, torn at a sector boundary (a prefix of its sectors), or not at all;
//! - a power cut armed to happen during the N-th write from now ([`FaultDevice::arm_power_cut`]),
//!   so a test can cut power at every write of an operation in turn;
//! - rules that fail requests, or corrupt what reads return, in a byte window, after skipping
//!   some matches, for a number of times ([`FaultRule`]);
//! - corruption of the stored bytes ([`FaultDevice::corrupt_stored`]) and added latency.
//!
//! It serializes requests behind one lock: it is a test instrument, not a data path.

use crate::device::{BlockDevice, CapacitySignal, DeviceInfo};
use crate::error::{Error, OpKind, Result};
use crate::request::{copy_into_bufs, Op, Request};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What a matching [`FaultRule`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fail the request with [`Error::Injected`]; nothing is written.
    Fail,
    /// Let a read succeed but flip bits in the bytes it returns (the medium is unchanged).
    CorruptRead,
}

/// A rule: requests of the given kinds that touch `range` are hit by `action`, after `skip`
/// matches have passed, at most `count` times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// Request kinds the rule applies to.
    pub ops: Vec<OpKind>,
    /// Byte window; a request matches if it overlaps it (a flush matches any window).
    pub range: Range<u64>,
    /// Matches to let through before acting.
    pub skip: u64,
    /// How many times to act (`None`: forever).
    pub count: Option<u64>,
    /// What to do.
    pub action: FaultAction,
}

impl FaultRule {
    /// Fail every request of kind `op`, anywhere, forever.
    pub fn fail(op: OpKind) -> Self {
        FaultRule {
            ops: vec![op],
            range: 0..u64::MAX,
            skip: 0,
            count: None,
            action: FaultAction::Fail,
        }
    }

    /// Corrupt the data of every read, anywhere, forever.
    pub fn corrupt_reads() -> Self {
        FaultRule {
            action: FaultAction::CorruptRead,
            ..Self::fail(OpKind::Read)
        }
    }

    /// Also apply to requests of kind `op`.
    pub fn and(mut self, op: OpKind) -> Self {
        self.ops.push(op);
        self
    }

    /// Only requests overlapping `range`.
    pub fn in_range(mut self, range: Range<u64>) -> Self {
        self.range = range;
        self
    }

    /// Let the first `n` matches through.
    pub fn after(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }

    /// Act `n` times, then stop.
    pub fn times(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }

    fn matches(&self, op: OpKind, offset: u64, len: u64) -> bool {
        self.ops.contains(&op)
            && (op == OpKind::Flush
                || (offset < self.range.end && offset + len.max(1) > self.range.start))
    }
}

/// Identifies a rule added with [`FaultDevice::add_rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleId(u64);

/// What happens to unflushed writes at a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutPolicy {
    /// Every unflushed write is lost.
    DropAll,
    /// Every unflushed write reached the medium.
    KeepAll,
    /// Each unflushed write independently: kept, lost, or (if `torn`) torn at a sector
    /// boundary, chosen by a generator seeded with `seed`.
    Random {
        /// Seed, so a failing case can be replayed.
        seed: u64,
        /// Whether writes of two or more sectors may be torn.
        torn: bool,
    },
}

/// The fate of one unflushed write at a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// All of it reached the medium.
    Kept,
    /// None of it did.
    Dropped,
    /// The first `sectors` sectors did, the rest did not.
    Torn {
        /// Sectors that reached the medium.
        sectors: u64,
    },
}

/// One unflushed write and its fate, in the order the writes completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutWrite {
    /// Kind of the write.
    pub op: OpKind,
    /// Its byte offset.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// What happened to it.
    pub fate: Fate,
}

/// What a power cut did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerCutReport {
    /// Every write that was not flushed, in completion order, with its fate.
    pub writes: Vec<CutWrite>,
}

/// Counters of a [`FaultDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Reads accepted.
    pub reads: u64,
    /// Write-type requests accepted (writes, discards, write-zeroes).
    pub writes: u64,
    /// Flushes accepted.
    pub flushes: u64,
    /// Requests failed or corrupted by rules.
    pub injected: u64,
    /// Writes held in the volatile cache now.
    pub unflushed: u64,
}

#[derive(Debug)]
struct Pending {
    op: OpKind,
    offset: u64,
    len: u64,
    data: Option<Vec<u8>>, // None: zeroes (discard, write-zeroes)
}

#[derive(Debug)]
struct State {
    pending: Vec<Pending>,
    volatile: bool,
    powered: bool,
    rules: Vec<(u64, FaultRule, u64)>, // (id, rule, matches seen)
    next_rule: u64,
    armed: Option<(u64, CutPolicy)>,
    stats: FaultStats,
    latency: Option<Duration>,
    last_cut: Option<PowerCutReport>,
}

/// A device that injects faults into another. See the [module documentation](self).
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    state: Mutex<State>,
}

impl std::fmt::Debug for FaultDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultDevice")
            .field("inner", &self.inner.describe())
            .field("stats", &self.stats())
            .finish()
    }
}

impl FaultDevice {
    /// Wraps `inner` (the medium). The volatile write cache is on: writes reach the medium only
    /// at a flush or, as the cut policy decides, at a power cut.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        FaultDevice {
            inner,
            state: Mutex::new(State {
                pending: Vec::new(),
                volatile: true,
                powered: true,
                rules: Vec::new(),
                next_rule: 0,
                armed: None,
                stats: FaultStats::default(),
                latency: None,
                last_cut: None,
            }),
        }
    }

    /// Turns the volatile write cache on or off (off: writes go straight to the medium). Turning
    /// it off first writes what it holds.
    pub fn set_volatile_cache(&self, on: bool) -> Result<()> {
        let mut s = self.lock();
        if !on {
            self.write_back(&mut s)?;
        }
        s.volatile = on;
        Ok(())
    }

    /// The medium.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a rule; returns its id.
    pub fn add_rule(&self, rule: FaultRule) -> RuleId {
        let mut s = self.lock();
        let id = s.next_rule;
        s.next_rule += 1;
        s.rules.push((id, rule, 0));
        RuleId(id)
    }

    /// Removes a rule.
    pub fn remove_rule(&self, id: RuleId) {
        self.lock().rules.retain(|(i, _, _)| *i != id.0);
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.lock().rules.clear();
    }

    /// Adds `latency` to every batch (`None`: none).
    pub fn set_latency(&self, latency: Option<Duration>) {
        self.lock().latency = latency;
    }

    /// The counters.
    pub fn stats(&self) -> FaultStats {
        let s = self.lock();
        FaultStats {
            unflushed: s.pending.len() as u64,
            ..s.stats
        }
    }

    /// Whether the power is on.
    pub fn is_powered(&self) -> bool {
        self.lock().powered
    }

    /// Cuts the power now: unflushed writes meet `policy`, and every request fails with
    /// [`Error::PoweredOff`] until [`power_on`](FaultDevice::power_on).
    pub fn power_cut(&self, policy: CutPolicy) -> Result<PowerCutReport> {
        let mut s = self.lock();
        self.cut(&mut s, policy)
    }

    /// Arms a power cut during the `n`-th write-type request from now (1: the next one). That
    /// write is treated as in flight: it meets the policy like every unflushed write, and fails.
    pub fn arm_power_cut(&self, n: u64, policy: CutPolicy) {
        self.lock().armed = Some((n.max(1), policy));
    }

    /// Disarms an armed power cut.
    pub fn disarm_power_cut(&self) {
        self.lock().armed = None;
    }

    /// The report of the last power cut (armed or not).
    pub fn last_power_cut(&self) -> Option<PowerCutReport> {
        self.lock().last_cut.clone()
    }

    /// Turns the power back on. Rules stay; the volatile cache is empty.
    pub fn power_on(&self) {
        self.lock().powered = true;
    }

    /// Flips bits in `len` stored bytes at `offset` (on the medium, as a failing disk would),
    /// with a pattern from `seed`. Every byte changes.
    pub fn corrupt_stored(&self, offset: u64, len: u64, seed: u64) -> Result<()> {
        let _s = self.lock();
        let info = self.inner.info();
        let sector = u64::from(info.logical_sector_size);
        let start = offset - offset % sector;
        let end = (offset + len).div_ceil(sector) * sector;
        let mut buf = vec![0u8; (end - start) as usize];
        self.inner.read_at(start, &mut buf)?;
        let mut rng = fastrand::Rng::with_seed(seed);
        for b in &mut buf[(offset - start) as usize..(offset - start + len) as usize] {
            *b ^= rng.u8(1..=255);
        }
        self.inner.write_at(start, &buf)?;
        self.inner.flush()
    }

    fn cut(&self, s: &mut State, policy: CutPolicy) -> Result<PowerCutReport> {
        let sector = u64::from(self.inner.info().logical_sector_size);
        let mut rng = match policy {
            CutPolicy::Random { seed, .. } => fastrand::Rng::with_seed(seed),
            _ => fastrand::Rng::with_seed(0),
        };
        let mut report = PowerCutReport::default();
        let pending = std::mem::take(&mut s.pending);
        let mut result = Ok(());
        for p in pending {
            let sectors = p.len / sector;
            let fate = match policy {
                CutPolicy::DropAll => Fate::Dropped,
                CutPolicy::KeepAll => Fate::Kept,
                CutPolicy::Random { torn, .. } => match rng.u8(0..3) {
                    0 => Fate::Kept,
                    2 if torn && sectors >= 2 => Fate::Torn {
                        sectors: rng.u64(1..sectors),
                    },
                    _ => Fate::Dropped,
                },
            };
            let keep = match fate {
                Fate::Kept => p.len,
                Fate::Dropped => 0,
                Fate::Torn { sectors } => sectors * sector,
            };
            if keep > 0 && result.is_ok() {
                result = self.apply(&p, keep);
            }
            report.writes.push(CutWrite {
                op: p.op,
                offset: p.offset,
                len: p.len,
                fate,
            });
        }
        if result.is_ok() {
            result = self.inner.flush();
        }
        s.powered = false;
        s.armed = None;
        s.last_cut = Some(report.clone());
        result.map(|()| report)
    }

    /// Writes the first `len` bytes of a pending write to the medium.
    fn apply(&self, p: &Pending, len: u64) -> Result<()> {
        match (&p.data, p.op) {
            (Some(d), _) => self.inner.write_at(p.offset, &d[..len as usize]),
            (None, OpKind::Discard) if self.inner.info().discard_zeroes => {
                self.inner.discard(p.offset, len)
            }
            (None, _) => self.inner.write_zeroes(p.offset, len),
        }
    }

    fn write_back(&self, s: &mut State) -> Result<()> {
        let pending = std::mem::take(&mut s.pending);
        for (i, p) in pending.iter().enumerate() {
            if let Err(e) = self.apply(p, p.len) {
                s.pending = pending.into_iter().skip(i).collect();
                return Err(e);
            }
        }
        Ok(())
    }

    fn one(&self, s: &mut State, info: &DeviceInfo, req: &mut Request<'_>) -> Result<()> {
        if !s.powered {
            return Err(Error::PoweredOff);
        }
        info.check(req)?;
        let (op, offset, len) = (req.kind(), req.offset(), req.len());
        let mut corrupt = false;
        for (_, rule, seen) in s.rules.iter_mut() {
            if rule.count == Some(0) || !rule.matches(op, offset, len) {
                continue;
            }
            *seen += 1;
            if *seen <= rule.skip {
                continue;
            }
            if let Some(c) = rule.count.as_mut() {
                *c -= 1;
            }
            s.stats.injected += 1;
            match rule.action {
                FaultAction::Fail => return Err(Error::Injected { op, offset }),
                FaultAction::CorruptRead => corrupt = op == OpKind::Read,
            }
        }
        match op {
            OpKind::Read => {
                s.stats.reads += 1;
                self.inner.submit(std::slice::from_mut(req));
                req.take_result()?;
                let Op::Read { bufs, .. } = &mut req.op else {
                    unreachable!("kind is read")
                };
                for p in &s.pending {
                    let lo = p.offset.max(offset);
                    let hi = (p.offset + p.len).min(offset + len);
                    if lo >= hi {
                        continue;
                    }
                    let skip = (lo - offset) as usize;
                    let n = (hi - lo) as usize;
                    match &p.data {
                        Some(d) => {
                            let from = (lo - p.offset) as usize;
                            copy_into_bufs(bufs, skip, &d[from..from + n]);
                        }
                        None => {
                            copy_into_bufs(bufs, skip, &vec![0u8; n]);
                        }
                    }
                }
                if corrupt {
                    for b in bufs.iter_mut() {
                        for x in b.iter_mut() {
                            *x ^= 0x5a;
                        }
                    }
                }
                Ok(())
            }
            OpKind::Flush => {
                s.stats.flushes += 1;
                self.write_back(s)?;
                self.inner.flush()
            }
            _ => {
                s.stats.writes += 1;
                let data = match &req.op {
                    Op::Write { bufs, .. } => {
                        Some(bufs.iter().flat_map(|b| b.iter().copied()).collect())
                    }
                    _ => None,
                };
                let pending = Pending {
                    op,
                    offset,
                    len,
                    data,
                };
                if let Some((n, policy)) = s.armed {
                    if n <= 1 {
                        s.pending.push(pending);
                        self.cut(s, policy)?;
                        return Err(Error::PoweredOff);
                    }
                    s.armed = Some((n - 1, policy));
                }
                if s.volatile {
                    s.pending.push(pending);
                    Ok(())
                } else {
                    self.apply(&pending, len)
                }
            }
        }
    }
}

impl BlockDevice for FaultDevice {
    fn info(&self) -> DeviceInfo {
        let mut info = self.inner.info();
        info.supports.flush = true;
        info
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let latency = self.lock().latency;
        if let Some(d) = latency {
            std::thread::sleep(d);
        }
        let info = self.info();
        let mut s = self.lock();
        for req in batch.iter_mut() {
            let r = self.one(&mut s, &info, req);
            req.complete(r);
        }
    }

    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn resize(&self, new_capacity: u64) -> Result<()> {
        let mut s = self.lock();
        // Growing leaves cached writes where they are (like ftruncate, growth is no barrier);
        // shrinking writes them back first so none lands past the new end.
        if new_capacity < self.inner.capacity() {
            self.write_back(&mut s)?;
        }
        drop(s);
        // Unlocked: the medium tells listeners, and a listener may do I/O on this device.
        self.inner.resize(new_capacity)
    }

    fn capacity_signal(&self) -> Option<Arc<CapacitySignal>> {
        self.inner.capacity_signal()
    }

    fn describe(&self) -> String {
        format!("fault injector over {}", self.inner.describe())
    }
}
