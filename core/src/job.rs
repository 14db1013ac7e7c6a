//! Progress reporting and cancellation for long operations (resize, merge, convert, rebuild).
//!
//! A [`Job`] is handed to a long operation by the caller. The operation reports progress
//! through it as `(done, total)` in units it names (bytes, blocks), and checks it for
//! cancellation at points where stopping leaves everything consistent. Clones share the same
//! cancellation flag, so one thread can cancel a job another thread is running.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use vstor_core::Job;
//! let seen = Arc::new(AtomicU64::new(0));
//! let s = seen.clone();
//! let job = Job::new().on_progress(move |done, _total| s.store(done, Ordering::Relaxed));
//! job.report(5, 10);
//! assert_eq!(seen.load(Ordering::Relaxed), 5);
//! job.cancel();
//! assert!(job.check("merge").is_err());
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{Error, Result};

type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// Progress callback and cancellation flag of one long operation.
#[derive(Clone, Default)]
pub struct Job {
    progress: Option<Arc<ProgressFn>>,
    cancelled: Arc<AtomicBool>,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("has_progress", &self.progress.is_some())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Job {
    /// A job with no progress callback that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `f(done, total)` whenever the operation makes progress.
    pub fn on_progress(mut self, f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Asks the operation to stop at its next consistent point.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Whether [`cancel`](Job::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Reports progress (operations call this).
    pub fn report(&self, done: u64, total: u64) {
        if let Some(f) = &self.progress {
            f(done, total);
        }
    }

    /// `Err(Error::Cancelled)` naming `what` if the job was cancelled (operations call this
    /// where stopping is safe).
    pub fn check(&self, what: &str) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled(what.to_string()))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_cancellation() {
        let a = Job::new();
        let b = a.clone();
        assert!(a.check("x").is_ok());
        b.cancel();
        assert!(a.is_cancelled());
        assert!(matches!(a.check("resize"), Err(Error::Cancelled(w)) if w == "resize"));
    }
}
