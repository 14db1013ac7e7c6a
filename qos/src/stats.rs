//! Flow statistics: counters, a latency histogram and reports like Get-StorageQosFlow.

use crate::sched::{FlowId, Limits};
use std::fmt;
use std::time::Duration;

const EXACT: usize = 32;
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = EXACT + (64 - 5) * SUB;

/// A latency histogram in nanoseconds: exact below 32 ns, then 16 buckets per power of two, so
/// a percentile read from it is within about 3% of the true value. Fixed size (no allocation
/// per sample).
#[derive(Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
}

impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("samples", &self.total)
            .field("mean_ns", &self.mean_ns())
            .field("p99_ns", &self.percentile_ns(99.0))
            .finish()
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < EXACT as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= 5
    let m = ((v >> (e - SUB_BITS)) as usize) & (SUB - 1);
    EXACT + (e as usize - 5) * SUB + m
}

/// The lowest and highest value of a bucket.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < EXACT {
        return (i as u64, i as u64);
    }
    let e = ((i - EXACT) / SUB + 5) as u32;
    let m = ((i - EXACT) % SUB) as u64;
    let shift = e - SUB_BITS;
    let low = (SUB as u64 + m) << shift;
    let high = low.saturating_add((1u64 << shift) - 1);
    (low, high)
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `n` samples of `ns` nanoseconds.
    pub fn record_n(&mut self, ns: u64, n: u64) {
        self.counts[bucket_of(ns)] += n;
        self.total += n;
        self.sum += u128::from(ns) * u128::from(n);
    }

    /// Records one sample.
    pub fn record(&mut self, ns: u64) {
        self.record_n(ns, 1);
    }

    /// The number of samples.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The exact mean in nanoseconds (0 without samples).
    pub fn mean_ns(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            (self.sum / u128::from(self.total)) as u64
        }
    }

    /// The `p`-th percentile (0 to 100) in nanoseconds: the middle of the bucket that holds it
    /// (0 without samples).
    pub fn percentile_ns(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p.clamp(0.0, 100.0) / 100.0) * self.total as f64).ceil() as u64;
        let rank = rank.clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = bucket_range(i);
                return lo + (hi - lo) / 2;
            }
        }
        0
    }

    /// The samples recorded since `earlier` (a previous copy of this histogram).
    pub fn since(&self, earlier: &LatencyHistogram) -> LatencyHistogram {
        let counts = self
            .counts
            .iter()
            .zip(earlier.counts.iter())
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        LatencyHistogram {
            counts,
            total: self.total.saturating_sub(earlier.total),
            sum: self.sum.saturating_sub(earlier.sum),
        }
    }
}

/// A flow's status, as Get-StorageQosFlow reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlowStatus {
    /// The flow gets its minimum, or asks for less than it, or has no minimum.
    #[default]
    Ok,
    /// Over the last evaluated window the flow asked for at least its minimum and did not get
    /// it.
    InsufficientThroughput,
}

impl fmt::Display for FlowStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlowStatus::Ok => "Ok",
            FlowStatus::InsufficientThroughput => "InsufficientThroughput",
        })
    }
}

/// A flow's cumulative counters at one moment: take two and compare them with
/// [`FlowReport::between`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowStats {
    /// The flow.
    pub flow: FlowId,
    /// Its name.
    pub name: String,
    /// When the snapshot was taken (nanoseconds on the scheduler's clock).
    pub at_ns: u64,
    /// The limits that apply to it (its policy's; for an aggregated policy, the group's).
    pub limits: Limits,
    /// Whether the limits are shared with other flows (an aggregated policy).
    pub aggregated: bool,
    /// Its weight.
    pub weight: u64,
    /// Requests completed (flushes not counted).
    pub requests: u64,
    /// Normalized units completed.
    pub units: u64,
    /// Data bytes completed.
    pub bytes: u64,
    /// Latency from arrival at the QoS layer to completion, queueing included.
    pub latency: LatencyHistogram,
    /// Requests waiting in the scheduler now.
    pub queued: usize,
    /// Requests dispatched and not yet completed now.
    pub in_flight: usize,
    /// The verdict of the last evaluated window.
    pub status: FlowStatus,
}

/// A flow's figures over an interval, like a row of Get-StorageQosFlow.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowReport {
    /// The flow.
    pub flow: FlowId,
    /// Its name.
    pub name: String,
    /// The interval's length.
    pub interval: Duration,
    /// Normalized IOPS (units per second).
    pub normalized_iops: f64,
    /// Requests per second.
    pub iops: f64,
    /// Bytes per second.
    pub bandwidth: f64,
    /// Mean latency.
    pub avg_latency: Duration,
    /// 99th-percentile latency.
    pub p99_latency: Duration,
    /// Requests completed in the interval.
    pub requests: u64,
    /// Units completed in the interval.
    pub units: u64,
    /// The limits in force at the end.
    pub limits: Limits,
    /// The flow's status at the end.
    pub status: FlowStatus,
}

impl FlowReport {
    /// The figures between two snapshots of the same flow (`before` taken first).
    pub fn between(before: &FlowStats, after: &FlowStats) -> FlowReport {
        let ns = after.at_ns.saturating_sub(before.at_ns);
        let secs = ns as f64 / 1e9;
        let per_s = |v: u64| if ns == 0 { 0.0 } else { v as f64 / secs };
        let requests = after.requests.saturating_sub(before.requests);
        let units = after.units.saturating_sub(before.units);
        let lat = after.latency.since(&before.latency);
        FlowReport {
            flow: after.flow,
            name: after.name.clone(),
            interval: Duration::from_nanos(ns),
            normalized_iops: per_s(units),
            iops: per_s(requests),
            bandwidth: per_s(after.bytes.saturating_sub(before.bytes)),
            avg_latency: Duration::from_nanos(lat.mean_ns()),
            p99_latency: Duration::from_nanos(lat.percentile_ns(99.0)),
            requests,
            units,
            limits: after.limits,
            status: after.status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_range(i);
            assert!(lo <= hi);
            if i > 0 {
                assert_eq!(lo, last + 1, "bucket {i}");
            }
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi), i);
            last = hi;
        }
        assert_eq!(last, u64::MAX);
    }

    #[test]
    fn percentiles_are_within_the_bucket_error() {
        let mut h = LatencyHistogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 10_000);
        assert_eq!(h.mean_ns(), 5_000_500);
        let p99 = h.percentile_ns(99.0) as f64;
        assert!((p99 / 9_900_000.0 - 1.0).abs() < 0.035, "{p99}");
        let p50 = h.percentile_ns(50.0) as f64;
        assert!((p50 / 5_000_000.0 - 1.0).abs() < 0.035, "{p50}");
        assert_eq!(LatencyHistogram::new().percentile_ns(99.0), 0);
    }

    #[test]
    fn since_subtracts() {
        let mut h = LatencyHistogram::new();
        h.record_n(100, 10);
        let early = h.clone();
        h.record_n(1_000_000, 5);
        let d = h.since(&early);
        assert_eq!(d.count(), 5);
        assert_eq!(d.mean_ns(), 1_000_000);
    }
}
