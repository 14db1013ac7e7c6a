//! Repair: adding disks, retiring and removing them, and rebuilding the slabs of lost or retired
//! members onto healthy ones, online.
//!
//! A rebuild works an extent at a time. It takes a free slab on a healthy member that holds no
//! other slot of the extent, for every slot of the extent that is on a lost (missing or failed)
//! or retired member; from then on writes to the extent also go to the new slabs. It then copies
//! the extent's slot contents a window ([`WINDOW_CHUNKS`] chunks of [`CHUNK`] bytes, 32 MiB) at
//! a time with the space's I/O held off for that window only: from the retired member itself,
//! from another copy (mirror), or rebuilt from the rest of the row (parity). Each chunk of the
//! sources is read once (1 MiB requests in flight together), checked block by block against
//! its checksums and healed where bad; the verified buffers and their stored checksums are what
//! a second thread writes to the new slabs (data and checksum pages in one batch per member)
//! while the next chunk is read. At the end of the extent the new slabs replace the old ones in the
//! pool metadata (one metadata update per extent), so an interrupted repair resumes from the
//! first extent not yet switched.

use crate::bitmap::PIECE;
use crate::csum::{Csums, BLOCK};
use crate::error::{invalid, SpacesError};
use crate::format::{MemberMeta, MemberState, Slot, BITMAP_SIZE, MAX_MEMBERS};
use crate::layout::{Layout, Resiliency};
use crate::pool::{lock, read_best, Allocator, MemberRt, Pool, PoolDisk};
use crate::{code, Space};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use uuid::Uuid;
use vstor_core::{AlignedBuf, BlockDevice, Request, Result};

/// Bytes a rebuild reads (then verifies, then writes) as one step.
const CHUNK: u64 = 8 << 20;
/// Chunks a rebuild copies with the space's I/O held off: inside them the read of the next chunk
/// runs while the last one is written.
const WINDOW_CHUNKS: u64 = 4;

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

/// One extent to rebuild.
struct Work {
    space: String,
    id: Uuid,
    extent: u64,
    bad: Vec<usize>,
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
        let mut meta = lock(&self.inner.meta);
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
        crate::pool::zero_range(&*disk.device, meta.data_start - BITMAP_SIZE, BITMAP_SIZE)?;
        {
            let m = next.members.last().expect("pushed");
            self.inner
                .journal
                .init_member(&*disk.device, next.members.len() - 1, m.id)?;
        }
        self.inner.members_write().push(MemberRt {
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
            self.inner.members_write().pop();
            return Err(e);
        }
        *meta = next;
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
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
        let mut meta = lock(&self.inner.meta);
        let state = meta
            .members
            .get(index)
            .ok_or_else(|| invalid(format!("the pool has no member {index}")))?
            .state;
        let (name, device) = {
            let rt = self.inner.members_read();
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
        // Its disk is taken: nothing will come back to be caught up.
        next.members[index].current_through = 0;
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
        crate::pool::zero_range(&*device, meta.data_start - BITMAP_SIZE, BITMAP_SIZE)?;
        {
            let m = next.members.last().expect("pushed");
            self.inner
                .journal
                .init_member(&*device, next.members.len() - 1, m.id)?;
        }
        {
            let mut rt = self.inner.members_write();
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
            let mut rt = self.inner.members_write();
            let back = rt.pop().expect("pushed");
            rt[index].device = back.device;
            rt[index].name = back.name;
            return Err(e);
        }
        *meta = next;
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
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
            let meta = lock(&self.inner.meta);
            let rt = self.inner.members_read();
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
        let info = self.info();
        let mut done = Vec::new();
        for &i in old {
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
                let mut rt = self.inner.members_write();
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
        let mut meta = lock(&self.inner.meta);
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
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
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
            let meta = lock(&self.inner.meta);
            if let Some(n) = name {
                if !meta.spaces.iter().any(|s| s.name == n) {
                    return Err(SpacesError::NoSuchSpace(n.into()).into());
                }
            }
            let rt = self.inner.members_read();
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
                        work.push(Work {
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
            match self.rebuild_extent(&space, &w, &mut spare, &mut |n| {
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

    /// Rebuilds one extent; `None` if it cannot be rebuilt (too much is lost).
    fn rebuild_extent(
        &self,
        space: &Space,
        w: &Work,
        spare: &mut Vec<AlignedBuf>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Option<u64>> {
        let inner = &self.inner;
        let layout = space.shared.layout;
        let (slots, new, data_start, slab_size) = {
            let meta = lock(&inner.meta);
            let Some(Some(slots)) = meta
                .spaces
                .iter()
                .find(|s| s.id == w.id)
                .and_then(|s| s.extents.get(w.extent as usize))
                .cloned()
            else {
                return Ok(Some(0));
            };
            let rt = inner.members_read();
            let readable = layout.extent_readable(|s| rt[slots[s].member].usable);
            // The slots still to move: a discard may have given the extent back and a write
            // allocated it again (on healthy members) since the work was listed.
            let bad: Vec<usize> = w
                .bad
                .iter()
                .copied()
                .filter(|&si| {
                    let m = slots[si].member;
                    !rt[m].usable || meta.members[m].state == MemberState::Retired
                })
                .collect();
            drop(rt);
            if bad.is_empty() {
                return Ok(Some(0));
            }
            if !readable {
                return Ok(None);
            }
            let eligible = inner.eligible(&meta);
            let mut reserved = lock(&inner.reserved);
            let mut alloc = Allocator::new(&meta, &reserved, |m| eligible[m]);
            let mut exclude: Vec<usize> = slots.iter().map(|s| s.member).collect();
            let mut new = Vec::new();
            for &si in &bad {
                let got = alloc
                    .extent(1, &exclude)
                    .ok_or_else(|| SpacesError::TooFewDisks {
                        what: format!(
                            "rebuilding extent {} of '{}' ({}) onto a disk it does not use yet",
                            w.extent, w.space, layout.resiliency
                        ),
                        needed: layout.width + 1,
                        available: eligible.iter().filter(|&&e| e).count(),
                    })?;
                exclude.push(got[0].member);
                reserved.push(got[0]);
                new.push((si, got[0]));
            }
            (slots, new, meta.data_start, meta.slab_size)
        };
        let release = || {
            let mut r = lock(&inner.reserved);
            r.retain(|s| !new.iter().any(|(_, n)| n == s));
        };
        // Gives up the extent: writes no longer go to the new slabs, which are free again.
        let abandon = || {
            space.shared.set_rebuilding(None);
            release();
        };
        space.shared.set_rebuilding(Some((w.extent, new.clone())));
        let chunk = CHUNK.max(layout.interleave).min(slab_size);
        let window = (chunk * WINDOW_CHUNKS).min(slab_size);
        let mut bytes = 0;
        let mut result = Ok(());
        // The sources' checksum pages in one read per slot, not a few pages per chunk.
        {
            let devs = inner.snapshot();
            for s in &slots {
                if let Some(d) = &devs[s.member] {
                    // Only a cache warm-up: a failure shows again (and is handled) where a
                    // chunk reads the pages.
                    let _ = inner
                        .csums
                        .preload(&**d, s.member, s.slab, 0, slab_size / BLOCK);
                }
            }
        }
        let mut ws = 0;
        // The first chunk of the next window, read at the end of the last one (while its
        // last chunk was written), and the count of writes to the space then.
        let mut ahead: Option<(u64, Copied, u64)> = None;
        let writes = &space.shared.writes_while_rebuilding;
        'windows: while ws < slab_size {
            let io_held = space
                .shared
                .extents
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if io_held.get(w.extent as usize).and_then(Option::as_ref) != Some(&slots) {
                // A discard gave the extent back since the rebuild took its slots: nothing
                // of it is left to copy (and its old slabs may be another extent's now).
                drop(io_held);
                spare.extend(
                    ahead
                        .take()
                        .into_iter()
                        .flat_map(|a| a.1.writes)
                        .map(|w| w.1),
                );
                abandon();
                return Ok(Some(0));
            }
            let devs = inner.snapshot();
            let geo = (data_start, slab_size);
            let we = (ws + window).min(slab_size);
            // It stands for the slab's bytes only if no write ran while the I/O was let
            // through (a write during a rebuild also reaches the new slab, and the copy read
            // before it must not land after it).
            let pre = match ahead.take() {
                Some((off, c, seen)) if off == ws && writes.load(Ordering::Acquire) == seen => {
                    Some(c)
                }
                Some((_, c, _)) => {
                    spare.extend(c.writes.into_iter().map(|w| w.1));
                    None
                }
                None => None,
            };
            // Each chunk is read once and checked block by block (bad blocks of the sources
            // healed from another copy or the rest of the row first, so a bad block is never
            // copied with a fresh checksum); the verified buffers are what a second thread
            // writes, with their checksums, while this one reads the next chunk.
            let r: Result<u64> = std::thread::scope(|sc| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Copied>(1);
                let (back, returned) = std::sync::mpsc::channel::<AlignedBuf>();
                let devs = &devs;
                let writer = sc.spawn(move || -> Result<u64> {
                    let mut n = 0;
                    for c in rx {
                        write_copied(&inner.csums, devs, geo, &c)?;
                        n += c.writes.len() as u64 * chunk;
                        for (_, buf, _) in c.writes {
                            let _ = back.send(buf);
                        }
                    }
                    Ok(n)
                });
                let mut read = Ok(());
                let mut off = ws;
                if let Some(c) = pre {
                    if tx.send(c).is_ok() {
                        off += chunk;
                    } else {
                        off = we;
                    }
                }
                while off < we {
                    spare.extend(returned.try_iter());
                    match prepare_chunk(
                        inner,
                        &layout,
                        &slots,
                        &new,
                        devs,
                        geo,
                        (off, off + chunk),
                        spare,
                    ) {
                        // A failed send means the writer stopped on an error: it says which.
                        Ok(c) => {
                            if tx.send(c).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            read = Err(e);
                            break;
                        }
                    }
                    off += chunk;
                }
                // The next window's first chunk, read while the writer finishes this one
                // (a failure here shows again when the next window reads it).
                if read.is_ok() && we < slab_size {
                    spare.extend(returned.try_iter());
                    let next = (we, (we + chunk).min(slab_size));
                    if let Ok(c) =
                        prepare_chunk(inner, &layout, &slots, &new, devs, geo, next, spare)
                    {
                        ahead = Some((we, c, writes.load(Ordering::Acquire)));
                    }
                }
                drop(tx);
                let written = writer.join().expect("the write thread does not panic");
                spare.extend(returned.try_iter());
                read.and(written)
            });
            match r {
                Ok(n) => {
                    bytes += n;
                    progress(n);
                }
                Err(e) => {
                    result = Err(e);
                    break 'windows;
                }
            }
            let entered = space.shared.io_entered();
            drop(io_held);
            space.shared.let_waiting_io_in(entered);
            ws = we;
        }
        if result.is_ok() {
            // The copies must be durable before the metadata points at them.
            let devs = inner.snapshot();
            result = new.iter().try_for_each(|(_, n)| match &devs[n.member] {
                Some(d) => d.flush(),
                None => Err(invalid(format!(
                    "member {} failed during the rebuild",
                    n.member
                ))),
            });
        }
        if let Err(e) = result {
            abandon();
            return Err(e);
        }
        // Switch: the new slabs replace the old in the metadata, then in the map.
        let mut meta = lock(&inner.meta);
        let mut next = meta.clone();
        let Some(target) = next
            .spaces
            .iter_mut()
            .find(|s| s.id == w.id)
            .and_then(|s| s.extents.get_mut(w.extent as usize))
            .and_then(Option::as_mut)
            // Given back by a discard (and maybe allocated again elsewhere) meanwhile.
            .filter(|t| **t == slots)
        else {
            abandon();
            return Ok(Some(0));
        };
        for &(si, n) in &new {
            target[si] = n;
        }
        let switched = target.clone();
        let persisted = inner.persist(&mut next);
        if persisted.is_ok() {
            *meta = next;
        }
        {
            let mut ext = space
                .shared
                .extents
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if persisted.is_ok() {
                ext[w.extent as usize] = Some(switched);
                space.shared.map_version.fetch_add(1, Ordering::AcqRel);
            }
            space.shared.set_rebuilding(None);
        }
        drop(meta);
        release();
        inner.epoch.fetch_add(1, Ordering::AcqRel);
        persisted.map(|()| Some(bytes))
    }
}

/// A verified chunk of an extent ready to go to the new slabs: (new slab, data, checksums of
/// its blocks), at slab offset `off`.
struct Copied {
    off: u64,
    writes: Vec<(Slot, AlignedBuf, Vec<u32>)>,
}

/// Reads slab bytes `[a, b)` of every usable slot of the extent once, verifies and heals them
/// ([`sync_bufs`](crate::bitmap::sync_bufs)), and makes from the verified buffers the contents
/// of each new slab: the retired slot's own buffer, a good copy (mirror), or the rest of the
/// row (parity). A copy keeps its source's stored checksums, so a block no good source was left
/// for still fails its checksum on the new slab; a block rebuilt from parity gets the checksum
/// of what was rebuilt, or one that fails where a source block of its row failed.
#[allow(clippy::too_many_arguments)]
fn prepare_chunk(
    inner: &crate::pool::Inner,
    layout: &Layout,
    slots: &[Slot],
    new: &[(usize, Slot)],
    devs: &[Option<Arc<dyn BlockDevice>>],
    geo: (u64, u64),
    (a, b): (u64, u64),
    spare: &mut Vec<AlignedBuf>,
) -> Result<Copied> {
    let (mut bufs, got) = crate::bitmap::read_slots(slots, devs, geo, (a, b), spare)?;
    let (out, want, ok) = crate::bitmap::sync_bufs(
        &inner.csums,
        layout,
        slots,
        devs,
        geo,
        (a, b),
        crate::bitmap::SyncMode::Check,
        (&mut bufs, &got),
    )?;
    inner.count(&out);
    let len = (b - a) as usize;
    let usable = |si: usize| devs[slots[si].member].is_some();
    let mut writes: Vec<(Slot, AlignedBuf, Vec<u32>)> = Vec::new();
    let lost: Vec<(usize, Slot)> = new.iter().copied().filter(|x| !usable(x.0)).collect();
    // (source slot, index in `writes`) of buffers moved to a new slab.
    let mut moved: Vec<(usize, usize)> = Vec::new();
    // The source's buffer moves to its first new slab; later ones copy it.
    let mut take = |src: usize,
                    bufs: &mut [Option<AlignedBuf>],
                    writes: &Vec<(Slot, AlignedBuf, Vec<u32>)>,
                    spare: &mut Vec<AlignedBuf>| {
        let data = match bufs[src].take() {
            Some(d) => d,
            None => {
                let i = moved
                    .iter()
                    .find(|x| x.0 == src)
                    .expect("moved to an earlier new slab")
                    .1;
                let mut d = take_spare(spare, len);
                d.copy_from_slice(&writes[i].1);
                d
            }
        };
        moved.push((src, writes.len()));
        data
    };
    if !lost.is_empty() {
        match layout.resiliency {
            Resiliency::Simple => return Err(invalid("a simple space has no other copy")),
            Resiliency::Mirror { copies } => {
                let k = usize::from(copies);
                for &(si, n) in &lost {
                    let col = si / k;
                    let src = (0..k)
                        .map(|c| col * k + c)
                        .find(|&s| usable(s))
                        .ok_or_else(|| invalid("no copy left"))?;
                    let data = take(src, &mut bufs, &writes, spare);
                    writes.push((n, data, want[src].clone()));
                }
            }
            Resiliency::Parity { .. } => {
                let w = layout.width;
                let d = layout.data_columns;
                let il = layout.interleave as usize;
                let mut out: Vec<AlignedBuf> =
                    lost.iter().map(|_| take_spare(spare, len)).collect();
                let first_row = a / layout.interleave;
                for r in 0..(len / il) {
                    let row = first_row + r as u64;
                    let rot = (row % w as u64) as usize;
                    let mut shards: Vec<Option<Vec<u8>>> = vec![None; w];
                    for (si, h) in bufs.iter().enumerate() {
                        if let Some(h) = h {
                            shards[(si + w - rot) % w] = Some(h[r * il..(r + 1) * il].to_vec());
                        }
                    }
                    if !code::reconstruct(&mut shards, d, il) {
                        return Err(invalid("too many shards lost"));
                    }
                    for (o, &(si, _)) in out.iter_mut().zip(&lost) {
                        let s = shards[(si + w - rot) % w].as_deref().expect("rebuilt");
                        o[r * il..(r + 1) * il].copy_from_slice(s);
                    }
                }
                for (o, &(_, n)) in out.into_iter().zip(&lost) {
                    let mut sums = crate::csum::crcs(&o);
                    // A block rebuilt from a source block that failed its checksum is no
                    // better: its checksum is made to fail too.
                    for (i, c) in sums.iter_mut().enumerate() {
                        if ok.iter().any(|v| v.get(i) == Some(&false)) {
                            *c = !*c;
                        }
                    }
                    writes.push((n, o, sums));
                }
            }
        }
    }
    // Retired (still readable) slots: their own verified contents.
    for &(si, n) in new.iter().filter(|x| usable(x.0)) {
        let data = take(si, &mut bufs, &writes, spare);
        writes.push((n, data, want[si].clone()));
    }
    spare.extend(bufs.into_iter().flatten());
    Ok(Copied { off: a, writes })
}

/// A buffer of `len` bytes from `spare`, or a new one.
fn take_spare(spare: &mut Vec<AlignedBuf>, len: usize) -> AlignedBuf {
    match spare.iter().position(|x| x.len() == len) {
        Some(i) => spare.swap_remove(i),
        None => AlignedBuf::new(len),
    }
}

/// Writes a verified chunk to its new slabs with their checksum pages, each new slab's data
/// and pages in one batch, the members side by side.
fn write_copied(
    csums: &Csums,
    devs: &[Option<Arc<dyn BlockDevice>>],
    (data_start, slab_size): (u64, u64),
    c: &Copied,
) -> Result<()> {
    let _page_locks = csums.lock_pages(
        c.writes
            .iter()
            .map(|(n, _, sums)| (n.member, n.slab, c.off / BLOCK, sums.len() as u64)),
    );
    let mut pages = Vec::new();
    for (n, _, sums) in &c.writes {
        let d = devs[n.member]
            .as_ref()
            .ok_or_else(|| invalid(format!("member {} is not usable", n.member)))?;
        pages.extend(csums.set(&**d, n.member, n.slab, c.off / BLOCK, sums)?);
    }
    let pages = crate::csum::merge_pages(pages);
    let mut per: Vec<(usize, Vec<Request<'_>>)> = Vec::new();
    for (n, data, _) in &c.writes {
        let at = data_start + u64::from(n.slab) * slab_size + c.off;
        let reqs = data
            .chunks(PIECE)
            .enumerate()
            .map(|(i, b)| Request::write(at + (i * PIECE) as u64, b));
        match per.iter_mut().find(|x| x.0 == n.member) {
            Some(x) => x.1.extend(reqs),
            None => per.push((n.member, reqs.collect())),
        }
    }
    for (m, off, buf) in &pages {
        match per.iter_mut().find(|x| x.0 == *m) {
            Some(x) => x.1.push(Request::write(*off, buf)),
            None => per.push((*m, vec![Request::write(*off, buf)])),
        }
    }
    let mut jobs: Vec<(&dyn BlockDevice, &mut [Request<'_>])> = Vec::new();
    for (m, reqs) in per.iter_mut() {
        let d = devs[*m]
            .as_ref()
            .ok_or_else(|| invalid(format!("member {m} is not usable")))?;
        jobs.push((&**d, &mut reqs[..]));
    }
    vstor_core::submit_group(&mut jobs, |_, _, _| {});
    drop(jobs);
    per.iter()
        .flat_map(|(_, reqs)| reqs.iter())
        .try_for_each(Request::result)
}
