//! A discrete-event simulation of flows on a device of fixed throughput, on virtual time:
//! deterministic and instant.
#![allow(dead_code)]

use std::collections::VecDeque;
use vstor_qos::{Cost, Dispatch, Dispatched, FlowId, QosConfig, QosEvent, Scheduler};

pub const NS: u64 = 1_000_000_000;

/// A flow's load: closed-loop, `depth` requests outstanding while active.
#[derive(Debug, Clone)]
pub struct Load {
    pub flow: FlowId,
    pub depth: usize,
    pub cost: Cost,
    pub active: bool,
    outstanding: usize,
    next_token: u64,
    /// Completed units.
    pub units: u64,
    /// (dispatch time, units, token) of every dispatch.
    pub dispatches: Vec<(u64, u64, u64)>,
    /// (completion time, units).
    pub completions: Vec<(u64, u64)>,
}

pub struct Sim {
    pub s: Scheduler,
    pub now: u64,
    /// Device throughput in units per second (served one request at a time, FIFO).
    pub capacity: u64,
    device: VecDeque<Dispatched>,
    busy_until: Option<u64>,
    pub loads: Vec<Load>,
    pub events: Vec<QosEvent>,
    /// Every answer to dispatch, checked as it is given.
    pub max_in_flight_seen: usize,
}

impl Sim {
    pub fn new(config: QosConfig, capacity: u64) -> Self {
        Sim {
            s: Scheduler::new(config),
            now: 0,
            capacity,
            device: VecDeque::new(),
            busy_until: None,
            loads: Vec::new(),
            events: Vec::new(),
            max_in_flight_seen: 0,
        }
    }

    /// Adds a load for `flow` (already added to the scheduler).
    pub fn load(&mut self, flow: FlowId, depth: usize, bytes: u64) -> usize {
        let units = self.s.config().normalization.units(bytes);
        self.loads.push(Load {
            flow,
            depth,
            cost: Cost { units, bytes },
            active: true,
            outstanding: 0,
            next_token: 0,
            units: 0,
            dispatches: Vec::new(),
            completions: Vec::new(),
        });
        self.loads.len() - 1
    }

    fn service_ns(&self, units: u64) -> u64 {
        (u128::from(units) * u128::from(NS) / u128::from(self.capacity)) as u64
    }

    /// Runs until `until` (virtual nanoseconds).
    pub fn run_until(&mut self, until: u64) {
        loop {
            // Closed loops refill.
            for l in self.loads.iter_mut().filter(|l| l.active) {
                while l.outstanding < l.depth {
                    self.s
                        .enqueue(l.flow, l.cost, l.next_token, self.now)
                        .unwrap();
                    l.next_token += 1;
                    l.outstanding += 1;
                }
            }
            let mut wake = u64::MAX;
            loop {
                match self.s.dispatch(self.now) {
                    Dispatch::Io(d) => {
                        let l = self.loads.iter_mut().find(|l| l.flow == d.flow).unwrap();
                        l.dispatches.push((self.now, d.cost.units, d.token));
                        self.device.push_back(d);
                        self.max_in_flight_seen = self.max_in_flight_seen.max(self.s.in_flight());
                    }
                    Dispatch::Wait(t) => {
                        assert!(t > self.now, "wait until {t} at {}", self.now);
                        wake = t;
                        break;
                    }
                    Dispatch::Busy => {
                        assert_eq!(self.s.in_flight(), self.s.config().max_in_flight);
                        break;
                    }
                    Dispatch::Idle => {
                        assert_eq!(self.s.queued(), 0);
                        break;
                    }
                }
            }
            if self.busy_until.is_none() {
                if let Some(d) = self.device.front() {
                    self.busy_until = Some(self.now + self.service_ns(d.cost.units));
                }
            }
            let next = self.busy_until.unwrap_or(u64::MAX).min(wake);
            if next > until {
                self.now = until;
                self.s.poll(until);
                self.events.extend(self.s.take_events());
                return;
            }
            self.now = next;
            if self.busy_until == Some(next) {
                let d = self.device.pop_front().unwrap();
                self.busy_until = None;
                self.s
                    .complete(d.flow, d.cost, self.now - d.arrival_ns, self.now)
                    .unwrap();
                let l = self.loads.iter_mut().find(|l| l.flow == d.flow).unwrap();
                l.outstanding -= 1;
                l.units += d.cost.units;
                l.completions.push((self.now, d.cost.units));
            }
            self.events.extend(self.s.take_events());
        }
    }

    /// Units each load completed in [from, to).
    pub fn units_between(&self, from: u64, to: u64) -> Vec<u64> {
        self.loads
            .iter()
            .map(|l| {
                l.completions
                    .iter()
                    .filter(|(t, _)| *t >= from && *t < to)
                    .map(|(_, u)| u)
                    .sum()
            })
            .collect()
    }

    /// Runs until nothing is queued or in flight (loads stopped first).
    pub fn drain(&mut self) {
        for l in &mut self.loads {
            l.active = false;
        }
        let mut guard = 0;
        while self.s.queued() + self.s.in_flight() > 0 {
            let t = self.now + NS;
            self.run_until(t);
            guard += 1;
            assert!(guard < 100_000, "never drains");
        }
    }
}

/// Asserts `got` is within `pct` percent of `want`.
pub fn near(got: f64, want: f64, pct: f64, what: &str) {
    assert!(
        (got - want).abs() <= want * pct / 100.0,
        "{what}: got {got:.1}, want {want:.1} +-{pct}%"
    );
}
