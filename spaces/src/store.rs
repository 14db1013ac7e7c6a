//! The metadata store: the pool metadata of an open pool (one lock), and the slabs a move in
//! progress has reserved (another): persisting an update to every usable member, handing out
//! free slabs ([`Allocator`], [`MetaStore::reserve_slabs`]) and zeroing new ones. It takes the
//! members and the checksums it works with as arguments; what changes an open space's map
//! with the metadata (allocate, release, grow) is the pool's, built on these.

use crate::csum::{Csums, BLOCK};
use crate::error::{invalid, SpacesError};
use crate::format::{MemberState, Meta, Slot};
use crate::members::Members;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use vstor_core::{BlockDevice, Result};

/// A lock that a panic elsewhere does not make unusable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The pool metadata of an open pool and the slabs reserved by moves in progress.
pub(crate) struct MetaStore {
    meta: Mutex<Meta>,
    /// Slabs a move in progress has taken but not yet recorded.
    reserved: Mutex<Vec<Slot>>,
    read_only: bool,
}

impl MetaStore {
    pub fn new(meta: Meta, read_only: bool) -> Self {
        MetaStore {
            meta: Mutex::new(meta),
            reserved: Mutex::new(Vec::new()),
            read_only,
        }
    }

    /// The metadata, locked: every change of it (and of an extent's slabs) is made holding it.
    pub fn lock(&self) -> MutexGuard<'_, Meta> {
        lock(&self.meta)
    }

    /// An allocator over the free slabs of `meta` on the members `eligible` names, less the
    /// reserved ones.
    pub fn allocator(&self, meta: &Meta, eligible: &[bool]) -> Allocator {
        Allocator::new(meta, &lock(&self.reserved), |m| eligible[m])
    }

    /// Takes and reserves one free slab for each of `count` slots, each on a member
    /// `eligible` names that is not in `exclude` nor holds another of them; `None` (nothing
    /// reserved) if there are not enough such members.
    pub fn reserve_slabs(
        &self,
        meta: &Meta,
        eligible: &[bool],
        count: usize,
        exclude: &[usize],
    ) -> Option<Vec<Slot>> {
        let mut reserved = lock(&self.reserved);
        let mut alloc = Allocator::new(meta, &reserved, |m| eligible[m]);
        let mut exclude = exclude.to_vec();
        let mut got = Vec::new();
        for _ in 0..count {
            let s = alloc.extent(1, &exclude)?[0];
            exclude.push(s.member);
            got.push(s);
        }
        reserved.extend_from_slice(&got);
        Some(got)
    }

    /// Gives reserved slabs back (recorded in the metadata now, or not wanted any more).
    pub fn unreserve(&self, slabs: &[Slot]) {
        lock(&self.reserved).retain(|s| !slabs.contains(s));
    }

    /// Zeroes the slabs of new extents and flushes them, so a new extent reads as zeroes.
    pub fn zero_new<'a>(
        meta: &Meta,
        extents: impl Iterator<Item = &'a Vec<Slot>>,
        members: &Members,
        csums: &Csums,
    ) -> Result<()> {
        let mut by_member: HashMap<usize, Vec<u32>> = HashMap::new();
        for slots in extents {
            for s in slots {
                by_member.entry(s.member).or_default().push(s.slab);
            }
        }
        let devs = members.snapshot();
        for (m, slabs) in by_member {
            let dev = devs[m]
                .as_ref()
                .ok_or_else(|| invalid(format!("member {m} is not usable")))?;
            zero_slabs(&**dev, meta, &slabs)?;
            let zero = vec![0u32; (meta.slab_size / BLOCK) as usize];
            for &slab in &slabs {
                csums.store(dev, m, slab, 0, &zero)?;
            }
            dev.flush()?;
        }
        Ok(())
    }

    /// Writes `meta` with the next sequence number to every usable member and flushes. A member
    /// that fails the write is marked failed and the update is written again without it.
    pub fn persist(
        &self,
        meta: &mut Meta,
        members: &Members,
        notes: &Mutex<Vec<String>>,
    ) -> Result<()> {
        if self.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        loop {
            meta.sequence += 1;
            let targets: Vec<(usize, Arc<dyn BlockDevice>)> = members
                .snapshot()
                .into_iter()
                .enumerate()
                .filter_map(|(i, d)| d.map(|d| (i, d)))
                .collect();
            if targets.is_empty() {
                return Err(SpacesError::NoPool(
                    "no usable member is left to hold the pool metadata".into(),
                )
                .into());
            }
            {
                let rt = members.read();
                for (i, m) in meta.members.iter_mut().enumerate() {
                    if m.state == MemberState::Failed && m.failed_seq == 0 {
                        m.failed_seq = meta.sequence;
                    }
                    // A member taken back (caught up) that holds the update before this one
                    // no longer needs what it was current through.
                    if m.state != MemberState::Failed
                        && m.current_through != 0
                        && rt.get(i).and_then(|r| r.seen_sequence) == Some(meta.sequence - 1)
                    {
                        m.current_through = 0;
                    }
                }
            }
            let offset = (meta.sequence % 2) * meta.slot_size;
            let mut failed = Vec::new();
            for (i, dev) in &targets {
                let mut blob = meta.serialize(*i);
                blob.resize(blob.len().div_ceil(4096) * 4096, 0);
                if let Err(e) = dev.write_at(offset, &blob).and_then(|()| dev.flush()) {
                    failed.push((*i, e));
                }
            }
            if failed.is_empty() {
                let mut rt = members.write();
                for (i, _) in &targets {
                    rt[*i].seen_sequence = Some(meta.sequence);
                }
                return Ok(());
            }
            let mut rt = members.write();
            let mut notes = lock(notes);
            for (i, e) in failed {
                rt[i].usable = false;
                behind(meta, i, rt[i].seen_sequence);
                meta.members[i].state = MemberState::Failed;
                notes.push(format!("member {i} failed writing pool metadata: {e}"));
            }
            members.changed();
        }
    }
}

/// A member that was getting every write stops getting them (it failed, or is missing at the
/// first write): from now on the write-intent bits are kept (see the write-intent log), so if it
/// comes back holding the metadata it last got (`seen`), it is caught up from the bitmaps
/// (format version 4).
pub(crate) fn behind(meta: &mut Meta, index: usize, seen: Option<u64>) {
    let m = &mut meta.members[index];
    if meta.version >= crate::format::KEYED_VERSION
        && m.state != MemberState::Failed
        && m.current_through == 0
    {
        m.current_through = seen.unwrap_or(0);
    }
}

/// Writes zeroes over `len` bytes at `off` (a multiple of 64 KiB).
pub(crate) fn zero_range(dev: &dyn BlockDevice, off: u64, len: u64) -> Result<()> {
    if dev.info().supports.write_zeroes {
        dev.write_zeroes(off, len)
    } else {
        let zero = vec![0u8; (1 << 20).min(len as usize)];
        let mut pos = 0;
        while pos < len {
            dev.write_at(off + pos, &zero)?;
            pos += zero.len() as u64;
        }
        Ok(())
    }
}

/// Writes zeroes over whole slabs.
fn zero_slabs(dev: &dyn BlockDevice, meta: &Meta, slabs: &[u32]) -> Result<()> {
    for &s in slabs {
        zero_range(
            dev,
            meta.data_start + u64::from(s) * meta.slab_size,
            meta.slab_size,
        )?;
    }
    Ok(())
}

/// Hands out free slabs: the members with the most free slabs first, so extents spread.
pub(crate) struct Allocator {
    free: Vec<Vec<u32>>,
}

impl Allocator {
    /// Free slabs of the members `eligible` allows, less the slabs `reserved` (held by a
    /// rebuild in progress).
    pub fn new(meta: &Meta, reserved: &[Slot], eligible: impl Fn(usize) -> bool) -> Self {
        let mut used: Vec<Vec<bool>> = meta
            .members
            .iter()
            .map(|m| vec![false; m.slab_count as usize])
            .collect();
        for s in &meta.spaces {
            for slots in s.extents.iter().flatten() {
                for sl in slots {
                    used[sl.member][sl.slab as usize] = true;
                }
            }
        }
        for sl in reserved {
            if let Some(u) = used
                .get_mut(sl.member)
                .and_then(|u| u.get_mut(sl.slab as usize))
            {
                *u = true;
            }
        }
        let free = used
            .iter()
            .enumerate()
            .map(|(m, u)| {
                if eligible(m) {
                    (0..u.len() as u32)
                        .rev()
                        .filter(|&s| !u[s as usize])
                        .collect()
                } else {
                    Vec::new()
                }
            })
            .collect();
        Allocator { free }
    }

    /// Members that can take a slab.
    pub fn members_with_room(&self) -> usize {
        self.free.iter().filter(|f| !f.is_empty()).count()
    }

    /// One slab on each of `width` distinct members, avoiding `exclude`.
    pub fn extent(&mut self, width: usize, exclude: &[usize]) -> Option<Vec<Slot>> {
        let mut order: Vec<usize> = (0..self.free.len())
            .filter(|&m| !self.free[m].is_empty() && !exclude.contains(&m))
            .collect();
        if order.len() < width {
            return None;
        }
        order.sort_by_key(|&m| std::cmp::Reverse(self.free[m].len()));
        Some(
            order[..width]
                .iter()
                .map(|&m| Slot {
                    member: m,
                    slab: self.free[m].pop().expect("non-empty"),
                })
                .collect(),
        )
    }
}
