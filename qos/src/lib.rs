//! vstor-qos: per-disk IOPS limits and reservations normalized to 8 KiB, mClock-family
//! scheduling and flow statistics, as a layer over any vstor block device.
//!
//! This is Hyper-V's Storage QoS as a library:
//!
//! - **Normalization** ([`Normalization`]): an I/O of `n` bytes costs `ceil(n / 8 KiB)` units,
//!   at least 1 (the unit is configurable); a flush costs nothing; a discard or a write-zeroes
//!   costs 1 unit.
//! - **Policies** ([`Limits`], [`PolicyKind`]): a minimum (a reservation), a maximum (a hard
//!   cap with a burst allowance), an optional bandwidth cap, 0 meaning unset; dedicated (each
//!   disk gets them) or aggregated (a group of disks shares them). Each flow also has a weight
//!   for sharing what is left. Limits and weights change at run time.
//! - **Scheduling** ([`Scheduler`]): mClock's reservation, limit and proportional-share tags
//!   over all flows of one backing device; under contention every flow gets its minimum, the
//!   rest goes by weight, and an idle flow's share goes to the others. The scheduler is pure
//!   (every call takes the time), so tests drive it with a [`VirtualClock`] and no sleeps.
//! - **The layer** ([`Qos`], [`QosDevice`]): a [`BlockDevice`](vstor_core::BlockDevice) per
//!   virtual disk over any device; batches stay batches.
//! - **Statistics and alerts** ([`FlowStats`], [`FlowReport`], [`QosEvent`]): normalized and
//!   raw IOPS, bandwidth, mean and 99th-percentile latency, and a status (Ok or
//!   InsufficientThroughput) per flow, as Get-StorageQosFlow reports them; an event when a flow
//!   that asks for at least its minimum does not get it over a window, and when it recovers.
//!
//! ```
//! use std::sync::Arc;
//! use vstor_core::{BlockDevice, MemoryDevice};
//! use vstor_qos::{FlowReport, Limits, PolicyKind, Qos, QosConfig, QosDevice, VirtualClock};
//!
//! // A virtual clock that jumps over waits: 300 capped I/Os take 2.95 virtual seconds, at once.
//! let clock = Arc::new(VirtualClock::auto_advance());
//! let qos = Qos::with_clock(QosConfig::default(), clock.clone());
//! let capped = qos.add_policy("capped", PolicyKind::Dedicated, Limits::max(100))?;
//! let flow = qos.add_flow("vm1", Some(capped), 0)?;
//! let disk = QosDevice::new(qos.clone(), flow, MemoryDevice::new(1 << 20)?)?;
//! let before = qos.flow_stats(flow)?;
//! let buf = vec![0u8; 4096];
//! for i in 0..300 {
//!     disk.write_at(i % 256 * 4096, &buf)?;
//! }
//! let report = FlowReport::between(&before, &qos.flow_stats(flow)?);
//! assert_eq!(report.requests, 300);
//! // The first 5 went at once (the default burst of 50 ms' worth), then one every 10 ms.
//! assert_eq!(report.interval.as_millis(), 2950);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod clock;
mod cost;
mod device;
mod sched;
mod stats;

pub use clock::{Clock, SystemClock, VirtualClock};
pub use cost::{Cost, Normalization, DEFAULT_UNIT};
pub use device::{Qos, QosDevice};
pub use sched::{
    Dispatch, Dispatched, FlowId, Limits, Phase, PolicyId, PolicyKind, QosConfig, QosEvent,
    QosEventKind, Scheduler, DEFAULT_BURST_DIVISOR, DEFAULT_WEIGHT, MAX_WEIGHT,
};
pub use stats::{FlowReport, FlowStats, FlowStatus, LatencyHistogram};

/// Errors of the QoS layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A minimum above the maximum.
    #[error("minimum IOPS {min} is above the maximum IOPS {max}")]
    MinAboveMax {
        /// The minimum.
        min: u64,
        /// The maximum.
        max: u64,
    },
    /// A setting out of range.
    #[error("invalid QoS setting: {0}")]
    InvalidConfig(String),
    /// A flow id this scheduler did not hand out.
    #[error("unknown QoS flow {0}")]
    UnknownFlow(usize),
    /// A policy id this scheduler did not hand out.
    #[error("unknown QoS policy {0}")]
    UnknownPolicy(usize),
    /// A completion for a flow with nothing in flight.
    #[error("QoS flow {0} has no request in flight to complete")]
    NotInFlight(usize),
}

impl From<Error> for vstor_core::Error {
    fn from(e: Error) -> Self {
        vstor_core::Error::InvalidArgument(e.to_string())
    }
}
