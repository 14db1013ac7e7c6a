//! The members of an open pool at run time: their disks, whether I/O may go to them, and the
//! epoch that moves on at every change of usability or allocation. One lock (the list) and
//! one atomic (the epoch); what is recorded of a member lives in the pool metadata
//! ([`store`](crate::store)).

use crate::format::{MemberState, Meta};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use vstor_core::BlockDevice;

/// The I/O may go to these devices, by member index (`None`: not usable now).
pub(crate) type Devs = [Option<Arc<dyn BlockDevice>>];

/// One member at run time.
pub(crate) struct MemberRt {
    /// The disk's name (a file name or device path), when present.
    pub name: Option<String>,
    /// The disk, when present.
    pub device: Option<Arc<dyn BlockDevice>>,
    /// I/O may go to it (present, not failed, not stale).
    pub usable: bool,
    /// The metadata sequence it holds (as read at the open, or as last written to it).
    pub seen_sequence: Option<u64>,
}

/// Every member of the pool at run time.
pub(crate) struct Members {
    list: RwLock<Vec<MemberRt>>,
    /// Bumped on every change of member usability or allocation (health caches key on it).
    epoch: AtomicU64,
}

impl Members {
    pub fn new(list: Vec<MemberRt>) -> Self {
        Members {
            list: RwLock::new(list),
            epoch: AtomicU64::new(0),
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Vec<MemberRt>> {
        self.list.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Vec<MemberRt>> {
        self.list.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The devices I/O may go to now, by member index.
    pub fn snapshot(&self) -> Vec<Option<Arc<dyn BlockDevice>>> {
        self.read()
            .iter()
            .map(|r| if r.usable { r.device.clone() } else { None })
            .collect()
    }

    /// Whether each member is usable now.
    pub fn usable(&self) -> Vec<bool> {
        self.read().iter().map(|r| r.usable).collect()
    }

    /// Members new slabs may go to: usable and healthy (not retired) in `meta`.
    pub fn eligible(&self, meta: &Meta) -> Vec<bool> {
        let rt = self.read();
        meta.members
            .iter()
            .zip(rt.iter())
            .map(|(m, r)| r.usable && m.state == MemberState::Healthy)
            .collect()
    }

    /// The epoch: it moves on at every change of member usability or allocation.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Moves the epoch on (a member's usability or the allocation changed).
    pub fn changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}
