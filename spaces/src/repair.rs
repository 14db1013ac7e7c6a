//! Repair: adding disks, retiring and removing them, and rebuilding the slabs of lost or retired
//! members onto healthy ones, online, an extent at a time with the extent mover
//! ([`mover`](crate::mover)): one metadata update per extent, so an interrupted repair resumes
//! from the first extent not yet switched.

use crate::error::{invalid, SpacesError};
use crate::format::{MemberMeta, MemberState, BITMAP_SIZE, MAX_MEMBERS};
use crate::mover::{move_extent, ExtentMove};
use crate::pool::{read_best, MemberRt, Pool, PoolDisk};
use uuid::Uuid;
use vstor_core::{AlignedBuf, Result};

/// What a repair did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Extents whose lost or retired slabs were rebuilt.
    pub extents: u64,
    /// Slabs rebuilt.
    pub slabs: u64,
    /// Bytes written to new slabs.
    pub bytes: u64,
    /// Extents that lost more than their resiliency tolerates (their data is gone).
    pub unrecoverable: Vec<String>,
}

impl Pool {
    /// Adds a disk to the pool (it must not belong to a pool); returns its member index. New
    /// slabs may go to it at once, and a repair can rebuild onto it.
    pub fn add_disk(&self, disk: PoolDisk) -> Result<usize> {
        if self.inner.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        if let Some((m, _)) = read_best(&disk)? {
            return Err(SpacesError::ForeignMember {
                disk: disk.name,
                reason: format!("already a member of pool {}", m.pool_id),
            }
            .into());
        }
        let info = disk.device.info();
        if info.read_only || info.logical_sector_size > 4096 {
            return Err(invalid(format!(
                "{} is read-only or has sectors over 4096 bytes",
                disk.name
            )));
        }
        let mut meta = self.inner.store.lock();
        if meta.members.len() >= MAX_MEMBERS {
            return Err(invalid(format!("a pool has at most {MAX_MEMBERS} members")));
        }
        let cap = info.capacity;
        let slabs = crate::csum::slabs_fitting(cap, meta.data_start, meta.slab_size);
        if slabs == 0 {
            return Err(SpacesError::DiskTooSmall {
                disk: disk.name,
                size: cap,
                needed: meta.data_start
                    + meta.slab_size
                    + crate::csum::area_bytes(1, meta.slab_size),
            }
            .into());
        }
        let mut next = meta.clone();
        next.members.push(MemberMeta {
            id: Uuid::new_v4(),
            capacity: cap,
            slab_count: slabs.min(crate::format::MAX_SLABS) as u32,
            state: MemberState::Healthy,
            failed_seq: 0,
            current_through: 0,
            returned_seq: 0,
        });
        if next.blob_len() > next.slot_size {
            return Err(SpacesError::PoolFull("the pool metadata area is full".into()).into());
        }
        crate::store::zero_range(&*disk.device, meta.data_start - BITMAP_SIZE, BITMAP_SIZE)?;
        {
            let m = next.members.last().expect("pushed");
            self.inner
                .journal
                .init_member(&*disk.device, next.members.len() - 1, m.id)?;
        }
        self.inner.members.write().push(MemberRt {
            name: Some(disk.name),
            device: Some(disk.device),
            usable: true,
            seen_sequence: None,
        });
        {
            let m = next.members.last().expect("pushed");
            self.inner.csums.set_member(
                next.members.len() - 1,
                crate::csum::area_start(next.data_start, next.slab_size, m.slab_count),
                next.csum_seed(m),
            );
        }
        if let Err(e) = self.inner.persist(&mut next) {
            self.inner.members.write().pop();
            return Err(e);
        }
        *meta = next;
        self.inner.members.changed();
        Ok(meta.members.len() - 1)
    }

    /// Takes back a member that failed (or missed writes) and is present again, as a fresh
    /// disk: the disk gets a new member identity with every slab free, the old member stays
    /// failed (its slabs are the lost ones), and [`repair`](Pool::repair) then rebuilds onto
    /// the disk, after which [`remove_member`](Pool::remove_member) drops the old record.
    /// Returns the new member index. This is how a pool with no spare disk heals after a
    /// disk came back: the disk's stale contents are never read.
    pub fn reuse_member(&self, index: usize) -> Result<usize> {
        if self.inner.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        let mut meta = self.inner.store.lock();
        let state = meta
            .members
            .get(index)
            .ok_or_else(|| invalid(format!("the pool has no member {index}")))?
            .state;
        let (name, device) = {
            let rt = self.inner.members.read();
            match (&rt[index].name, &rt[index].device) {
                (Some(n), Some(d)) if state == MemberState::Failed => (n.clone(), d.clone()),
                _ => {
                    return Err(invalid(format!(
                        "member {index} is {} and {}; only a failed member that is present can be reused",
                        state.name(),
                        if rt[index].device.is_some() { "present" } else { "missing" }
                    )))
                }
            }
        };
        if meta.members.len() >= MAX_MEMBERS {
            return Err(invalid(format!("a pool has at most {MAX_MEMBERS} members")));
        }
        let mut next = meta.clone();
        // Its disk is taken: nothing will come back to be caught up. The record says it was
        // taken back (after it failed), so that a repair run again after one that was
        // interrupted still drops it ([`forget_taken_back`](Pool::forget_taken_back)).
        next.members[index].current_through = 0;
        next.members[index].returned_seq =
            (meta.sequence + 1).max(meta.members[index].failed_seq + 1);
        let old = &meta.members[index];
        next.members.push(MemberMeta {
            id: Uuid::new_v4(),
            capacity: old.capacity,
            slab_count: old.slab_count,
            state: MemberState::Healthy,
            failed_seq: 0,
            current_through: 0,
            returned_seq: 0,
        });
        if next.blob_len() > next.slot_size {
            return Err(SpacesError::PoolFull("the pool metadata area is full".into()).into());
        }
        crate::store::zero_range(&*device, meta.data_start - BITMAP_SIZE, BITMAP_SIZE)?;
        {
            let m = next.members.last().expect("pushed");
            self.inner
                .journal
                .init_member(&*device, next.members.len() - 1, m.id)?;
        }
        {
            let mut rt = self.inner.members.write();
            rt[index].device = None;
            rt[index].name = None;
            rt.push(MemberRt {
                name: Some(name),
                device: Some(device),
                usable: true,
                seen_sequence: None,
            });
        }
        self.inner.csums.set_member(
            next.members.len() - 1,
            crate::csum::area_start(next.data_start, next.slab_size, old.slab_count),
            next.csum_seed(next.members.last().expect("pushed")),
        );
        if let Err(e) = self.inner.persist(&mut next) {
            let mut rt = self.inner.members.write();
            let back = rt.pop().expect("pushed");
            rt[index].device = back.device;
            rt[index].name = back.name;
            return Err(e);
        }
        *meta = next;
        self.inner.members.changed();
        Ok(meta.members.len() - 1)
    }

    /// Takes back, as fresh members ([`reuse_member`](Pool::reuse_member)), the failed
    /// members whose disks are present: disks that missed writes and came back (an old copy put
    /// back, a member the open could not catch up) or that failed and still answer. A
    /// [`repair`](Pool::repair) then rebuilds onto them, and
    /// [`forget_taken_back`](Pool::forget_taken_back) drops the old records. Returns, per
    /// such member, its index and the new index or why it could not be taken back (its
    /// disk refused the writes: it stays failed).
    pub fn take_back_present(&self) -> Result<Vec<(usize, std::result::Result<usize, String>)>> {
        if self.inner.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        let failed: Vec<usize> = {
            let meta = self.inner.store.lock();
            let rt = self.inner.members.read();
            meta.members
                .iter()
                .enumerate()
                .filter(|(i, m)| m.state == MemberState::Failed && rt[*i].device.is_some())
                .map(|(i, _)| i)
                .collect()
        };
        Ok(failed
            .into_iter()
            .map(|i| (i, self.reuse_member(i).map_err(|e| e.to_string())))
            .collect())
    }

    /// After a repair: removes the records of members taken back by
    /// [`take_back_present`](Pool::take_back_present) that hold no slab any more (their
    /// disks live on as the new members). Returns the indexes removed.
    pub fn forget_taken_back(&self, old: &[usize]) -> Result<Vec<usize>> {
        // Also those taken back by an earlier repair that was interrupted before it dropped
        // them: failed, their disk gone (it is the new member), taken back after they failed.
        let mut old = old.to_vec();
        {
            let meta = self.inner.store.lock();
            let rt = self.inner.members.read();
            for (i, m) in meta.members.iter().enumerate() {
                if m.state == MemberState::Failed
                    && m.returned_seq > m.failed_seq
                    && rt[i].device.is_none()
                    && !old.contains(&i)
                {
                    old.push(i);
                }
            }
        }
        let info = self.info();
        let mut done = Vec::new();
        for &i in &old {
            if info.members.get(i).is_some_and(|m| m.slabs_used == 0) {
                self.remove_member(i)?;
                done.push(i);
            }
        }
        Ok(done)
    }

    /// Retires a member: no new slabs go to it; [`repair`](Pool::repair) moves its slabs off.
    pub fn retire_member(&self, index: usize) -> Result<()> {
        self.set_state(index, MemberState::Retired, |s| {
            matches!(s, MemberState::Healthy | MemberState::Retired)
        })
    }

    /// Removes a member that holds no slab (after a repair moved them off). Its record stays as
    /// a tombstone; the disk is no longer part of the pool.
    pub fn remove_member(&self, index: usize) -> Result<()> {
        let used = self.info().members.get(index).map(|m| m.slabs_used);
        match used {
            None => Err(invalid(format!("the pool has no member {index}"))),
            Some(n) if n > 0 => Err(invalid(format!(
                "member {index} holds {n} slabs; retire it and repair first"
            ))),
            Some(_) => {
                self.set_state(index, MemberState::Removed, |_| true)?;
                let mut rt = self.inner.members.write();
                rt[index].usable = false;
                rt[index].device = None;
                Ok(())
            }
        }
    }

    fn set_state(
        &self,
        index: usize,
        state: MemberState,
        allowed: impl Fn(MemberState) -> bool,
    ) -> Result<()> {
        if self.inner.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        let mut meta = self.inner.store.lock();
        let cur = meta
            .members
            .get(index)
            .ok_or_else(|| invalid(format!("the pool has no member {index}")))?
            .state;
        if !allowed(cur) {
            return Err(invalid(format!(
                "member {index} is {}; it cannot become {}",
                cur.name(),
                state.name()
            )));
        }
        let mut next = meta.clone();
        next.members[index].state = state;
        self.inner.persist(&mut next)?;
        *meta = next;
        self.inner.members.changed();
        Ok(())
    }

    /// Rebuilds every slab of the space `name` (all spaces if `None`) that is on a lost or
    /// retired member onto healthy members, online. `progress` is called with (bytes done,
    /// bytes to do) after each chunk.
    pub fn repair(
        &self,
        name: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RepairReport> {
        if self.inner.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        let (work, slab_size) = {
            let meta = self.inner.store.lock();
            if let Some(n) = name {
                if !meta.spaces.iter().any(|s| s.name == n) {
                    return Err(SpacesError::NoSuchSpace(n.into()).into());
                }
            }
            let rt = self.inner.members.read();
            let bad = |m: usize| !rt[m].usable || meta.members[m].state == MemberState::Retired;
            let mut work = Vec::new();
            for s in meta
                .spaces
                .iter()
                .filter(|s| name.is_none_or(|n| n == s.name))
            {
                for (e, slots) in s.extents.iter().enumerate() {
                    let Some(slots) = slots else { continue };
                    let b: Vec<usize> =
                        (0..slots.len()).filter(|&i| bad(slots[i].member)).collect();
                    if !b.is_empty() {
                        work.push(ExtentMove {
                            space: s.name.clone(),
                            id: s.id,
                            extent: e as u64,
                            bad: b,
                        });
                    }
                }
            }
            (work, meta.slab_size)
        };
        let total: u64 = work.iter().map(|w| w.bad.len() as u64 * slab_size).sum();
        let mut report = RepairReport::default();
        let mut done = 0;
        progress(0, total);
        // Chunk buffers, kept from one extent to the next (a new one is new pages to fault in).
        let mut spare: Vec<AlignedBuf> = Vec::new();
        for w in work {
            // Where the progress stands once this extent is done, whatever it took (a space
            // deleted or an extent discarded meanwhile takes nothing).
            let next = done + w.bad.len() as u64 * slab_size;
            let space = match self.open_space(&w.space) {
                Ok(s) if s.shared.id == w.id => s,
                _ => {
                    done = next;
                    progress(done, total);
                    continue; // deleted meanwhile
                }
            };
            match move_extent(&self.inner, &space, &w, &mut spare, &mut |n| {
                done += n;
                progress(done, total);
            })? {
                Some(0) => {}
                Some(bytes) => {
                    report.extents += 1;
                    report.slabs += bytes / slab_size;
                    report.bytes += bytes;
                }
                None => report.unrecoverable.push(format!(
                    "space '{}' extent {}: more members lost than {} tolerates",
                    w.space, w.extent, space.shared.layout.resiliency
                )),
            }
            if done != next {
                done = next;
                progress(done, total);
            }
        }
        Ok(report)
    }
}
