//! The allocation of an open pool's spaces, where the metadata store meets the open spaces'
//! maps: allocating thin extents at their first write, releasing them at a discard that
//! covers them, growing a space. Each change of an extent's slabs is made with the metadata's
//! lock held, recorded, then put in the space's map.

use super::*;

impl Inner {
    /// [`Pool::resize_space`] of the space `id`.
    pub(crate) fn resize_space(&self, id: Uuid, new_size: u64) -> Result<SpaceInfo> {
        if self.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        if new_size == 0 || new_size % 4096 != 0 {
            return Err(invalid(format!(
                "space size {new_size} is not a positive multiple of 4096"
            )));
        }
        let mut meta = self.store.lock();
        let si = meta
            .spaces
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| SpacesError::NoSuchSpace(format!("{id} (deleted)")))?;
        let old = meta.spaces[si].size;
        if new_size == old {
            return Ok(space_info(&meta.spaces[si], &self.members.usable()));
        }
        if new_size < old {
            return Err(invalid(format!(
                "space '{}' is {old} bytes; a space grows but never shrinks (that would cut its data), so {new_size} is refused",
                meta.spaces[si].name
            )));
        }
        let layout = meta.spaces[si].layout;
        let have = meta.spaces[si].extents.len();
        let count = layout.extents_for(new_size);
        if !meta.room_for_refs((count - have as u64).saturating_mul(layout.width as u64)) {
            return Err(SpacesError::PoolFull(format!(
                "the pool metadata area ({} bytes) cannot describe {} more extents",
                meta.slot_size,
                count - have as u64
            ))
            .into());
        }
        let count = count as usize;
        let mut next = meta.clone();
        next.spaces[si].extents.resize(count, None);
        next.spaces[si].size = new_size;
        let mut fresh = Vec::new();
        if next.spaces[si].provisioning == Provisioning::Fixed {
            let eligible = self.members.eligible(&meta);
            let mut allocator = self.store.allocator(&meta, &eligible);
            for e in have..count {
                let slots = allocator.extent(layout.width, &[]).ok_or_else(|| {
                    SpacesError::PoolFull(format!(
                        "growing fixed space '{}' to {new_size} bytes needs {} more slabs on {} disks",
                        next.spaces[si].name,
                        (count - have) as u64 * layout.width as u64,
                        layout.width
                    ))
                })?;
                fresh.push(slots.clone());
                next.spaces[si].extents[e] = Some(slots);
            }
        }
        self.zero_new(&next, fresh.iter())?;
        // An open space: its map grows (held for writing, so no I/O of it is in flight) before
        // its size does.
        let shared = lock(&self.open_spaces).get(&id).and_then(Weak::upgrade);
        let mut map = shared
            .as_ref()
            .map(|sh| sh.extents.write().unwrap_or_else(|p| p.into_inner()));
        self.persist(&mut next)?;
        *meta = next;
        if let (Some(sh), Some(map)) = (&shared, map.as_mut()) {
            map.resize(count, None);
            for (e, slots) in meta.spaces[si].extents.iter().enumerate().skip(have) {
                map[e].clone_from(slots);
            }
            sh.set_size(new_size);
        }
        drop(map);
        self.members.changed();
        let info = space_info(&meta.spaces[si], &self.members.usable());
        drop(meta);
        if let Some(sh) = shared {
            // The size as it is now: a later grow may have published already.
            sh.signal.publish(sh.size());
        }
        Ok(info)
    }

    /// Gives the slabs of thin extents of a space back to the pool (a discard covers the
    /// extents whole): recorded in the pool metadata, then gone from the space's map, so they
    /// read as zeroes and a later write allocates (and zeroes) new slabs. Returns the extents
    /// released. It leaves to the caller (who zeroes them) the extents of a fixed space, those
    /// not allocated, the one being rebuilt, and those with parity journal records left in the
    /// current generation (see [`Journal::forget_extents`](crate::journal::Journal)).
    pub(crate) fn release(
        &self,
        space: &SpaceShared,
        extents: &[u64],
        end: u64,
    ) -> Result<Vec<u64>> {
        if self.read_only || extents.is_empty() {
            return Ok(Vec::new());
        }
        // What can be released at all (checked again under the locks below), so that a fixed
        // space or the extent being rebuilt costs no journal turn.
        let extents: Vec<u64> = {
            let meta = self.store.lock();
            let Some(s) = meta.spaces.iter().find(|s| s.id == space.id) else {
                return Ok(Vec::new());
            };
            if s.provisioning != Provisioning::Thin {
                return Ok(Vec::new());
            }
            let rebuilding = space.rebuilding_extent();
            extents
                .iter()
                .copied()
                .filter(|&e| {
                    Some(e) != rebuilding && s.extents.get(e as usize).is_some_and(Option::is_some)
                })
                .collect()
        };
        if extents.is_empty() {
            return Ok(Vec::new());
        }
        if space.layout.parities() > 0 {
            // Outside every lock: it may wait for journaled batches in flight.
            if let Err((m, e)) =
                self.journal
                    .forget_extents(&self.members.snapshot(), space.id, &extents)
            {
                self.fail_member(m, &format!("parity journal: {e}"));
                return Ok(Vec::new());
            }
        }
        // The order of the rebuild's switch: the metadata, then the space's map (held for
        // writing, so no I/O of the space is in flight).
        let mut meta = self.store.lock();
        let mut map = space.extents.write().unwrap_or_else(|p| p.into_inner());
        let rebuilding = space.rebuilding_extent();
        let Some(si) = meta.spaces.iter().position(|s| s.id == space.id) else {
            return Ok(Vec::new());
        };
        if meta.spaces[si].provisioning != Provisioning::Thin {
            return Ok(Vec::new());
        }
        let mut next = meta.clone();
        let mut gone = Vec::new();
        for &e in &extents {
            let Some(slot) = next.spaces[si].extents.get_mut(e as usize) else {
                continue;
            };
            // The discard covers `[.., end)`; an extent past it counted as covered because
            // it was the space's last: not if the space grew since (a write may be there).
            let reach = (e + 1) * space.layout.extent_bytes();
            if slot.is_none()
                || (reach > end && end < space.size())
                || rebuilding == Some(e)
                || (space.layout.parities() > 0 && self.journal.extent_logged(space.id, e))
            {
                continue;
            }
            *slot = None;
            gone.push(e);
        }
        if gone.is_empty() {
            return Ok(gone);
        }
        self.persist(&mut next)?;
        *meta = next;
        for &e in &gone {
            map[e as usize] = None;
        }
        space.map_version.fetch_add(1, Ordering::AcqRel);
        // A chunk a rebuild read ahead is stale now, as after a write.
        space.writes_while_rebuilding.fetch_add(1, Ordering::AcqRel);
        drop(map);
        drop(meta);
        self.members.changed();
        Ok(gone)
    }

    /// Allocates the thin extents `extents` of a space that are not allocated yet: zeroes
    /// their slabs, records them, and puts them in the space's map (with the metadata's lock
    /// held, as every change of an extent's slabs: a map taken from the metadata earlier and
    /// installed later could undo a rebuild's switch or a discard's release in between).
    pub fn allocate(&self, shared: &SpaceShared, extents: &[u64]) -> Result<()> {
        let id = shared.id;
        let mut meta = self.store.lock();
        let eligible = self.members.eligible(&meta);
        let mut next = meta.clone();
        let mut allocator = self.store.allocator(&next, &eligible);
        let si = next
            .spaces
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| SpacesError::NoSuchSpace(format!("{id} (deleted)")))?;
        let space = &mut next.spaces[si];
        let width = space.layout.width;
        let mut fresh = Vec::new();
        for &e in extents {
            let e = e as usize;
            if space.extents[e].is_none() {
                let slots = allocator.extent(width, &[]).ok_or_else(|| {
                    SpacesError::PoolFull(format!(
                        "space '{}' needs {width} slabs on distinct disks; only {} disks have room",
                        space.name,
                        allocator.members_with_room()
                    ))
                })?;
                fresh.push(slots.clone());
                space.extents[e] = Some(slots);
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        self.zero_new(&next, fresh.iter())?;
        let mut map = shared.extents.write().unwrap_or_else(|p| p.into_inner());
        self.persist(&mut next)?;
        *meta = next;
        for &e in extents {
            if let (Some(slot), Some(got)) = (
                map.get_mut(e as usize),
                meta.spaces[si].extents.get(e as usize),
            ) {
                if slot.is_none() {
                    slot.clone_from(got);
                }
            }
        }
        drop(map);
        self.members.changed();
        Ok(())
    }
}
