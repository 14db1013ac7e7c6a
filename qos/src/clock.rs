//! Clocks: real time for production, virtual time for deterministic tests.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A source of time in nanoseconds since the clock's own origin.
///
/// The scheduler never reads the system time directly; everything it does is a function of what
/// its clock says, so tests drive it with a [`VirtualClock`] and no sleeps.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Nanoseconds since the clock's origin. Never goes backwards.
    fn now(&self) -> u64;

    /// Called when a thread is about to wait until `deadline` (nanoseconds on this clock) for
    /// time to pass. A virtual clock may move its time there at once and return `true`, and the
    /// thread does not wait; a real clock returns `false` and the thread sleeps.
    fn advance_to(&self, deadline: u64) -> bool {
        let _ = deadline;
        false
    }
}

/// The monotonic system clock (`Instant`), counted from when it was created.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to: by [`advance`](VirtualClock::advance) and
/// [`set`](VirtualClock::set), and, when it was created with
/// [`auto_advance`](VirtualClock::auto_advance), by a thread that would otherwise sleep (the
/// clock jumps to that thread's deadline). Auto-advance makes a single submitting thread's run
/// deterministic and instant; with several submitting threads, time jumps whenever any of them
/// would sleep.
#[derive(Debug, Default)]
pub struct VirtualClock {
    now: AtomicU64,
    auto: bool,
}

impl VirtualClock {
    /// A clock at 0 that moves only when told to.
    pub fn new() -> Self {
        VirtualClock::default()
    }

    /// A clock at 0 that jumps to the deadline of any thread about to wait for time to pass.
    pub fn auto_advance() -> Self {
        VirtualClock {
            now: AtomicU64::new(0),
            auto: true,
        }
    }

    /// Moves the time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(ns))
            });
    }

    /// Sets the time to `ns` if that is later than the current time.
    pub fn set(&self, ns: u64) {
        self.now.fetch_max(ns, Ordering::SeqCst);
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn advance_to(&self, deadline: u64) -> bool {
        if self.auto {
            self.set(deadline);
        }
        self.auto
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_clock_moves_only_forward() {
        let c = VirtualClock::new();
        assert_eq!(c.now(), 0);
        c.advance(Duration::from_millis(3));
        assert_eq!(c.now(), 3_000_000);
        c.set(1);
        assert_eq!(c.now(), 3_000_000);
        assert!(!c.advance_to(10_000_000));
        assert_eq!(c.now(), 3_000_000);
        let a = VirtualClock::auto_advance();
        assert!(a.advance_to(42));
        assert_eq!(a.now(), 42);
    }

    #[test]
    fn system_clock_is_monotonic() {
        let c = SystemClock::new();
        let a = c.now();
        let b = c.now();
        assert!(b >= a);
        assert!(!c.advance_to(u64::MAX));
    }
}
