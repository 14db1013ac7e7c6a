//! Start-up timing: the process start as `main` records it, and the guest's timing port
//! ([`crate::layout::TIMING_PORT`]): a 32-bit write is a mark the VMM reports with the time since
//! the process started (1: the guest's first instructions ran, 2: its first I/O completed); a
//! 32-bit read returns the microseconds since the process started (the test guest's clock for
//! its benchmark).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static START: OnceLock<Instant> = OnceLock::new();

/// Records now as the process start (the first call wins; `main` makes it first thing).
pub fn mark_process_start() {
    START.get_or_init(Instant::now);
}

/// The time since the process start (since the first call, if `main` did not record it).
pub fn since_start() -> Duration {
    START.get_or_init(Instant::now).elapsed()
}

/// Mark 1: the guest entered its code.
pub const MARK_ENTRY: u32 = 1;
/// Mark 2: the guest's first I/O completed.
pub const MARK_FIRST_IO: u32 = 2;

/// The line the VMM prints (on stderr) for a guest mark.
pub fn mark_line(code: u32, at: Duration) -> String {
    let what = match code {
        MARK_ENTRY => "entered its code".to_string(),
        MARK_FIRST_IO => "completed its first I/O".to_string(),
        n => format!("mark {n}"),
    };
    format!(
        "vstor-vmm: timing: the guest {what} {:.3} ms after the process started",
        at.as_secs_f64() * 1e3
    )
}

/// The value a read of the timing port returns: microseconds since the process start (wrapping
/// at 2^32, about 71 minutes).
pub fn clock_us() -> u32 {
    since_start().as_micros() as u32
}
