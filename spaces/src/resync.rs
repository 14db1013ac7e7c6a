//! Settling what the write-intent log names, at a writable open: the resync after an unclean
//! shutdown and the catch-up of a member that comes back behind.
//!
//! After a crash the bits of the [write-intent log](crate::intent) name every chunk that may
//! hold a write that reached some slots of its extent and not others: opening the pool
//! writable resyncs exactly those chunks (mirror: the first copy whose block checksums match
//! is copied over the others; parity: blocks that fail their checksum are rebuilt from the row
//! where that matches, then the parity is recomputed from the data), so a later rebuild never
//! uses a parity that disagrees with its data. The bits also cover the block checksums
//! written with the data: a block in a dirty chunk whose data and checksum did not both land,
//! and that nothing rebuilds, is taken as it is with its checksum rewritten (no false checksum
//! error after a crash).
//!
//! What this alone does not close is a crash together with the loss of a member holding a data
//! column of a dirty parity row (the parity cannot be checked then): the parity
//! [`journal`](crate::journal) (format version 3) closes it, replayed at the open before this
//! resync runs; such chunks are still named in the pool's notes (for a version 2 pool, which
//! has no journal, they may hold wrong data).
//!
//! This is the pool's own work (it joins the metadata store, the members, the log, the
//! checksums and the journal), so it is written on [`Inner`].

use crate::format::{MemberState, Meta, CHUNKS_PER_SLAB};
use crate::intent::{add_bits, set_bit, Chunk};
use crate::journal::Recovery;
use crate::pool::Inner;
use crate::sync::{extent_chunks, sync_extent_chunk, SyncMode};
use std::collections::BTreeSet;
use vstor_core::Result;

/// The slab count of every member of `meta`, by index.
fn slab_counts(meta: &Meta) -> Vec<u32> {
    meta.members.iter().map(|m| m.slab_count).collect()
}

impl Inner {
    /// Clears the write-intent bits on disk (the caller holds the log's gate, so no write is
    /// in flight, and has flushed the members), unless they are kept for a member that is
    /// behind ([`Inner::keeps_bits`]). With `force` false, only if the last bit was set at
    /// least [`CLEAR_DELAY`](crate::intent::CLEAR_DELAY) ago.
    pub fn clear_bitmaps(&self, force: bool) {
        if self.keeps_bits() {
            return;
        }
        self.intent.clear(&self.members, force);
    }

    /// Whether the bits must stay (format version 4): a member is behind (missing, or failed
    /// while it was getting every write) and may come back to be caught up, so the bitmaps
    /// must go on naming every chunk written since. A member failed with nothing known of
    /// what it holds (`current_through` 0) is rebuilt whole and keeps nothing.
    pub(crate) fn keeps_bits(&self) -> bool {
        let meta = self.store.lock();
        if meta.version < crate::format::KEYED_VERSION {
            return false;
        }
        let rt = self.members.read();
        meta.members.iter().zip(rt.iter()).any(|(m, r)| {
            !r.usable
                && m.state != MemberState::Removed
                && (m.state != MemberState::Failed || m.current_through != 0)
        })
    }

    /// At open: reads every present member's bitmap and (unless read-only) resyncs the chunks
    /// it names, then clears the bitmaps (unless they are kept: [`Inner::keeps_bits`]). After
    /// a clean close (`clean`) the bits left are kept ones and nothing is resynced. Returns
    /// the number of chunks resynced and notes.
    pub fn resync_at_open(&self, clean: bool) -> Result<(u64, Vec<String>)> {
        let meta = self.store.lock().clone();
        let devs = self.members.snapshot();
        let dirty = self.intent.load(&slab_counts(&meta), &devs)?;
        if dirty.is_empty() || clean {
            return Ok((0, Vec::new()));
        }
        if self.read_only {
            return Ok((
                0,
                vec![format!(
                    "unclean shutdown: {} chunks of members may differ between copies or from their parity; open the pool writable to resync them",
                    dirty.len()
                )],
            ));
        }
        let work = extent_chunks(&meta, &dirty, |_| true);
        let mut notes = Vec::new();
        let mut done = 0;
        for &(s, e, c) in &work {
            let space = &meta.spaces[s];
            let out = sync_extent_chunk(&self.csums, &meta, &devs, (s, e, c), SyncMode::Resync)?;
            if out.unverifiable {
                notes.push(format!(
                    "space '{}' extent {e} chunk {c} was being written at an unclean shutdown and a data column is lost: its copies or parity could not be checked",
                    space.name
                ));
            }
            done += 1;
        }
        for d in devs.iter().flatten() {
            d.flush()?;
        }
        self.clear_bitmaps(true);
        self.intent.count_resynced(done);
        notes.insert(
            0,
            format!(
                "unclean shutdown: resynced {done} dirty chunks named by the write-intent bitmap"
            ),
        );
        Ok((done, notes))
    }

    /// At a writable open, after the resync: brings back member `x`, present again, that
    /// missed the writes after the sequence it holds (`current_through`), with the bits kept
    /// since ([`Inner::keeps_bits`]). Every chunk of an extent with a slot on `x` that a bit
    /// names (on any member, `x`'s own included) is copied or rebuilt onto `x` from the other
    /// slots, `x`'s own contents never a source ([`SyncMode::CatchUp`]), except in extents
    /// that were not written since it left (their other members had left before it: `x` holds
    /// their newest contents); a member that went on getting writes after `x` left and is
    /// missing now holds the only record of them, so `x` then waits for it. Then its journal
    /// starts afresh, its bitmap names what it holds that a member still behind may lack, and
    /// the metadata records it healthy (and it gets that metadata). Members are caught up
    /// newest first ([`Pool::open`](crate::Pool)).
    /// A crash on the way leaves it failed with the same sequence: the next open starts over.
    /// Returns the note for the open: what was done, or why the member stays failed (a
    /// `vstor space repair` then rebuilds it whole).
    pub(crate) fn catch_up(&self, x: usize) -> String {
        let name = self.members.read()[x].name.clone().unwrap_or_default();
        match self.try_catch_up(x) {
            Ok(Ok((chunks, bytes))) => format!(
                "member {x} ({name}) was behind: caught up from the write-intent bitmaps ({chunks} chunks, {} MiB), and is healthy again",
                bytes >> 20
            ),
            Ok(Err(why)) => format!(
                "member {x} ({name}) was behind and cannot be caught up ({why}); it is not read (vstor space repair takes the disk back and rebuilds it)"
            ),
            Err(e) => format!(
                "member {x} ({name}) was behind; catching it up failed ({e}); it is not read (vstor space repair takes the disk back and rebuilds it)"
            ),
        }
    }

    fn try_catch_up(&self, x: usize) -> Result<std::result::Result<(u64, u64), String>> {
        let meta = self.store.lock().clone();
        let dev = self.members.read()[x]
            .device
            .clone()
            .ok_or_else(|| crate::error::invalid("the member's disk is not present"))?;
        let since = meta.members[x].current_through;
        // When each member stopped getting writes (`u64::MAX`: it still gets them, or did when
        // the metadata was last written), and the disks of those present but not usable.
        let (left_at, behind_devs) = {
            let rt = self.members.read();
            let left_at: Vec<u64> = meta
                .members
                .iter()
                .zip(rt.iter())
                .map(|(m, r)| {
                    if r.usable {
                        u64::MAX
                    } else if m.state == MemberState::Removed {
                        0
                    } else if m.current_through != 0 {
                        m.current_through
                    } else if m.state == MemberState::Failed && m.failed_seq != 0 {
                        m.failed_seq
                    } else {
                        u64::MAX
                    }
                })
                .collect();
            let behind: Vec<(usize, std::sync::Arc<dyn vstor_core::BlockDevice>)> = rt
                .iter()
                .enumerate()
                .filter(|&(i, r)| i != x && !r.usable)
                .filter_map(|(i, r)| r.device.clone().map(|d| (i, d)))
                .collect();
            (left_at, behind)
        };
        // Which extents of `x` may have been written since it went away: those that stayed
        // readable without it, by the members that went on getting writes after it left. An
        // extent that did not (its other members had gone before it) was not written since:
        // `x` holds its newest contents and takes nothing (Linux md keeps the member with the
        // newest event count the same way). For one that may have been, every member that
        // went on getting its writes must be present: the bits naming what was written are
        // only on them.
        let mut untouched: BTreeSet<(usize, usize)> = BTreeSet::new();
        for (s, space) in meta.spaces.iter().enumerate() {
            for (e, slots) in space.extents.iter().enumerate() {
                let Some(slots) = slots.as_ref().filter(|sl| sl.iter().any(|v| v.member == x))
                else {
                    continue;
                };
                let after: BTreeSet<usize> = slots
                    .iter()
                    .map(|v| v.member)
                    .filter(|&m| m != x && left_at[m] > since)
                    .collect();
                let needed = slots.len() - space.layout.resiliency.tolerates();
                if after.len() < needed {
                    untouched.insert((s, e));
                    continue;
                }
                let rt = self.members.read();
                if let Some(&m) = after.iter().find(|&&m| rt[m].device.is_none()) {
                    return Ok(Err(format!(
                        "space '{}' may have been written after it went away, and what was written is named only on member {m}, which is missing; it is caught up when that disk is back",
                        space.name
                    )));
                }
            }
        }
        // The kept bits of the usable members (read at open, or set at their catch-up), those
        // of the members present but behind, and the member's own.
        let mut dirty: BTreeSet<Chunk> = BTreeSet::new();
        let own = self.intent.read_member(&*dev, meta.members[x].slab_count)?;
        self.intent.kept_except(x, &slab_counts(&meta), &mut dirty);
        for (m, d) in &behind_devs {
            let bits = self.intent.read_member(&**d, meta.members[*m].slab_count)?;
            add_bits(&mut dirty, *m, &bits, meta.members[*m].slab_count);
        }
        add_bits(&mut dirty, x, &own, meta.members[x].slab_count);
        let mut work = extent_chunks(&meta, &dirty, |slots| slots.iter().any(|s| s.member == x));
        work.retain(|&(s, e, _)| !untouched.contains(&(s, e)));
        let mut devs = self.members.snapshot();
        devs[x] = Some(dev.clone());
        let chunk = meta.slab_size / CHUNKS_PER_SLAB;
        // Its bitmap afterwards: its own bits and every chunk caught up, so that a member
        // still behind finds what it missed named here too.
        let mut bits = own;
        for &(s, e, c) in &work {
            let space = &meta.spaces[s];
            let out =
                sync_extent_chunk(&self.csums, &meta, &devs, (s, e, c), SyncMode::CatchUp(x))?;
            if out.unverifiable {
                return Ok(Err(format!(
                    "space '{}' extent {e} chunk {c} has no good source besides it",
                    space.name
                )));
            }
            let slots = space.extents[e].as_ref().expect("allocated");
            for v in slots.iter().filter(|v| v.member == x) {
                set_bit(&mut bits, v.slab, c);
            }
        }
        for d in devs.iter().flatten() {
            d.flush()?;
        }
        // Its journal starts afresh (what it named is settled); its bitmap keeps naming what
        // it holds (cleared with the others once no member is behind).
        self.intent.set_member(x, &*dev, bits)?;
        self.journal.init_member(&*dev, x, meta.members[x].id)?;
        let mut cur = self.store.lock();
        let mut next = cur.clone();
        let m = &mut next.members[x];
        m.state = MemberState::Healthy;
        m.failed_seq = 0;
        // `current_through` stays until the member holds this update (the next update
        // clears it: `Inner::persist`): an update that reached the others and not the member
        // leaves it as it was, to be caught up again, not found stale.
        m.returned_seq = cur.sequence;
        self.members.write()[x].usable = true;
        if let Err(e) = self.persist(&mut next) {
            self.members.write()[x].usable = false;
            return Err(e);
        }
        let back = next.members[x].state == MemberState::Healthy;
        if back {
            // Every member holds the take-back now: this clears `current_through`.
            self.persist(&mut next)?;
        }
        *cur = next;
        drop(cur);
        if !back {
            return Ok(Err("writing the pool metadata to it failed".into()));
        }
        self.members.changed();
        self.intent.count_resynced(work.len() as u64);
        // The bits kept for it can go now (unless another member is still behind).
        self.clear_bitmaps(true);
        Ok(Ok((work.len() as u64, work.len() as u64 * chunk)))
    }

    /// At an open, before the resync: the parity journal's recovery
    /// ([`Journal::recover`](crate::journal::Journal::recover)) with this pool's metadata,
    /// members and checksums.
    pub(crate) fn recover_journal(&self) -> Result<Vec<String>> {
        let meta = self.store.lock().clone();
        self.journal.recover(Recovery {
            meta,
            members: &self.members,
            csums: &self.csums,
            read_only: self.read_only,
            fail_member: &|m, why| self.fail_member(m, why),
            record_missing: &|| self.record_missing(),
        })
    }
}
