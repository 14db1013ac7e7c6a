//! Online resize: grow and shrink while other threads keep doing I/O.
//!
//! A resize takes the table lock exclusively, so requests in flight finish first and new ones
//! wait for the new size; it holds it for the few writes below, which is why a resize that
//! moves no data takes milliseconds whatever the disk's size.
//!
//! Everything that can refuse a resize (the size, the minimum, the room the log has for its
//! entries) is checked before anything changes, in memory or on disk.
//!
//! Crash safety: a resize is a series of steps, each of which leaves a consistent disk, and
//! each step commits through one log entry of its own (so no step needs more room than one
//! entry has, however far the disk grows):
//! - when the BAT grows in place over blocks, those blocks are copied elsewhere in batches;
//!   each batch's entry points their BAT entries at the copies and grows the BAT region over
//!   the space they leave, in one go (the old size still holds; nothing is leaked);
//! - the new part of the BAT, which no entry of the old size refers to, is written in place
//!   directly (or the whole BAT at a new place at the end of the file);
//! - the last entry carries the metadata page with the new virtual size, the region tables
//!   when the BAT region changes then, and the BAT and sector bitmap pages that make the last
//!   block's new part read as zeros. That entry is the commit point: a crash before it leaves
//!   the old disk (with unreferenced tail space, given back at the next open), a crash after
//!   it replays to the new one.
//!
//! A failure before a step's commit point undoes that step in memory (its BAT entries point
//! at the old places again, the file's tail is given back). A failure at or after it leaves
//! the file's state unknown until a replay: the disk then refuses every further change until
//! it is opened again, so that no write can be acknowledged and later lost.
//!
//! The space a disk gains by growing reads as zeros, also in a differencing disk whose parent
//! has data there (after a shrink): its new blocks are marked ZERO where the parent reaches,
//! and the part of the old last block that becomes visible is zeroed.

use std::collections::BTreeSet;

use super::*;
use crate::log::max_pages_per_entry;
use vstor_core::Job;

/// What a resize did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResizeReport {
    /// The virtual size before.
    pub old_size: u64,
    /// The virtual size after.
    pub new_size: u64,
    /// Blocks copied out of the way of a growing BAT.
    pub moved_blocks: u64,
    /// The BAT region was moved to the end of the file (something other than blocks was in
    /// the way of growing it in place).
    pub bat_relocated: bool,
}

/// The most bytes [`Vhdx::minimum_size`] reads to find where the data ends inside the last
/// blocks that hold some; past that it answers the end of the block it got to.
const DATA_END_SCAN: u64 = 64 * MIB;

/// Pages of both region tables.
const REGION_PAGES: usize = 2 * REGION_TABLE_SIZE / 4096;

/// How a step of a resize failed.
enum StepError {
    /// Before its commit point: nothing on disk refers to what the step prepared.
    Before(Error),
    /// At or after it: the disk has been closed to changes (see [`Vhdx::poison`]).
    After(Error),
}

/// BAT entries a step changed (index, old value), and the file's tail before it.
struct Undo {
    entries: Vec<(u64, u64)>,
    alloc_ptr: u64,
    file_len: u64,
}

impl Undo {
    fn new(m: &Meta) -> Self {
        Undo {
            entries: Vec::new(),
            alloc_ptr: m.alloc_ptr,
            file_len: m.file_len,
        }
    }
}

impl Vhdx {
    /// The smallest virtual size this disk can shrink to without losing data: the end of the
    /// last non-zero logical sector this file holds (sectors that read from the parent, and
    /// blocks that read as zeros, are not data of this file: a disk grown again reads zeros
    /// there), at least one logical sector. It reads the last blocks that hold data to find
    /// that end (at most 64 MiB; past that, or when a read fails, it answers the end of the
    /// block it got to, which is never too small).
    pub fn minimum_size(&self) -> u64 {
        let t = self.table();
        self.data_end(&t).max(t.geo.logical_sector as u64)
    }

    fn data_end(&self, t: &Table) -> u64 {
        let g = &t.geo;
        let bs = g.block_size as u64;
        let ls = g.logical_sector as u64;
        let mut budget = DATA_END_SCAN;
        for block in (0..g.data_blocks).rev() {
            let st = bat_state(t.bat[g.payload_index(block) as usize].load(Ordering::Acquire));
            if !matches!(st, payload::FULLY_PRESENT | payload::PARTIALLY_PRESENT) {
                continue;
            }
            let start = block * bs;
            let end = ((block + 1) * bs).min(g.virtual_size);
            if budget < end - start {
                return end;
            }
            budget -= end - start;
            match self.last_nonzero(t, start, end) {
                Ok(Some(e)) => return e.next_multiple_of(ls),
                Ok(None) => {}
                Err(_) => return end,
            }
        }
        0
    }

    /// The end of the last non-zero byte of [start, end) (inside one block) that this file
    /// holds; `None` when it holds only zeros there.
    fn last_nonzero(&self, t: &Table, start: u64, end: u64) -> Result<Option<u64>> {
        let mut plan: ReadPlan = SmallVec::new();
        self.map_read(t, start, end - start, &mut plan)?;
        let mut buf = vec![0u8; MIB.min(end - start) as usize];
        let mut piece_end = end;
        for &(len, src) in plan.iter().rev() {
            let piece_start = piece_end - len;
            if let Src::File(off) = src {
                let mut hi = len;
                while hi > 0 {
                    let n = hi.min(buf.len() as u64);
                    let lo = hi - n;
                    self.file.read_at(off + lo, &mut buf[..n as usize])?;
                    if let Some(p) = buf[..n as usize].iter().rposition(|&b| b != 0) {
                        return Ok(Some(piece_start + lo + p as u64 + 1));
                    }
                    hi = lo;
                }
            }
            piece_end = piece_start;
        }
        Ok(None)
    }

    /// Changes the virtual size to `new_size`, online: other threads may keep doing I/O, and
    /// holders of [`capacity_signal`](BlockDevice::capacity_signal) are told. Shrinking below
    /// [`minimum_size`](Vhdx::minimum_size) fails with [`VhdxError::BelowMinimum`] and
    /// changes nothing. `job` reports moved blocks and can cancel between steps (a cancelled
    /// resize keeps the old size; blocks it moved stay moved). An I/O error at a commit point
    /// closes the disk to further changes until it is opened again (its log is replayed then).
    pub fn resize_with(&self, new_size: u64, job: &Job) -> Result<ResizeReport> {
        if self.read_only {
            return Err(Error::ReadOnly {
                op: vstor_core::OpKind::Write,
            });
        }
        let report = {
            let mut t = self.table_mut();
            let mut m = self.lock();
            self.resize_locked(&mut t, &mut m, new_size, job)?
        };
        if report.old_size != report.new_size {
            self.signal.publish(report.new_size);
        }
        Ok(report)
    }

    fn resize_locked(
        &self,
        t: &mut Table,
        m: &mut Meta,
        new_size: u64,
        job: &Job,
    ) -> Result<ResizeReport> {
        let g = t.geo.clone();
        let ls = g.logical_sector as u64;
        if new_size == 0 || new_size > MAX_VIRTUAL_SIZE || new_size % ls != 0 {
            return Err(crate::error::invalid(format!(
                "{}: {new_size} bytes is not a valid size (a multiple of {ls} bytes, at most 64 TiB)",
                self.name
            )));
        }
        let mut report = ResizeReport {
            old_size: g.virtual_size,
            new_size,
            ..Default::default()
        };
        if new_size == g.virtual_size {
            return Ok(report);
        }
        // (Only a shrink reads where the data ends.)
        let minimum = if new_size < g.virtual_size {
            self.data_end(t).max(ls)
        } else {
            0
        };
        if new_size < minimum {
            return Err(VhdxError::BelowMinimum {
                file: self.name.clone(),
                requested: new_size,
                minimum,
            }
            .into());
        }
        let ng = Geometry::new(
            new_size,
            g.block_size,
            g.logical_sector,
            g.physical_sector,
            g.has_parent,
        );
        // The plan, and everything that could refuse it, before anything changes.
        let need = ng.bat_bytes();
        let grow_bat = need > t.bat_len;
        let (grow_from, grow_to) = (t.bat_offset + t.bat_len, t.bat_offset + need);
        let relocate = grow_bat && {
            let log_range = (m.log.log_offset, m.log.log_length);
            t.regions
                .all
                .iter()
                .filter(|r| r.guid != BAT_REGION)
                .map(|r| (r.offset, r.length))
                .chain([log_range])
                .any(|(o, l)| o < grow_to && grow_from < o + l)
        };
        // Blocks in the way of a BAT growing in place, by file offset.
        let mut in_way: Vec<(u64, u64, u64)> = Vec::new();
        if grow_bat && !relocate {
            for i in 0..g.bat_entries {
                let e = t.bat[i as usize].load(Ordering::Acquire);
                let off = bat_offset(e);
                let len = g.mapped_len(i);
                if off != 0 && off < grow_to && grow_from < off + len {
                    in_way.push((i, e, len));
                }
            }
            in_way.sort_by_key(|&(_, e, _)| bat_offset(e));
        }
        let max_pages = max_pages_per_entry(m.log.log_length);
        // The last entry: the metadata page, the region tables, the pages of the last block
        // (two BAT pages, its sector bitmap pages) and the BAT page where the new entries
        // begin.
        let last_block_pages = 3 + (g.sectors_per_block() / 8).div_ceil(4096) as usize;
        if max_pages < REGION_PAGES + 1 + last_block_pages {
            return Err(VhdxError::Unsupported {
                file: self.name.clone(),
                what: format!(
                    "a resize with a {}-byte log (a log entry must hold {} pages)",
                    m.log.log_length,
                    REGION_PAGES + 1 + last_block_pages
                ),
            }
            .into());
        }
        job.check("resize")?;
        // From here the in-memory tables equal the file's.
        self.commit_locked(t, m)?;
        self.start_data_session(m)?;
        m.reserved.clear();
        if grow_bat && !relocate && !in_way.is_empty() {
            report.moved_blocks = self.move_in_steps(t, m, &in_way, grow_to, max_pages, job)?;
        }
        job.check("resize")?;
        let mut undo = Undo::new(m);
        match self.last_step(t, m, &g, &ng, relocate, &mut undo, &mut report) {
            Ok(()) => {}
            Err(StepError::Before(e)) => {
                self.undo(t, m, undo);
                return Err(e);
            }
            Err(StepError::After(e)) => return Err(e),
        }
        if g.bat_entries > t.geo.bat_entries || ng.data_blocks < g.data_blocks {
            // Entries past the new end are meaningless now: clear them for tidiness (committed
            // with the next flush) and give back the space at the end of the file. Those of
            // blocks past it in the last chunk of a differencing disk keep their space
            // (unmapped, soft-anchored) so that it is not leaked.
            for b in ng.data_blocks..g.data_blocks {
                let i = ng.payload_index(b);
                if i >= ng.bat_entries {
                    break;
                }
                let e = t.bat[i as usize].load(Ordering::Acquire);
                let new = match bat_offset(e) {
                    0 => 0,
                    off => bat_entry(payload::UNMAPPED, off),
                };
                if new != e {
                    t.bat[i as usize].store(new, Ordering::Release);
                    self.mark_bat_dirty(t, m, i);
                }
            }
            if g.bat_entries > ng.bat_entries {
                let first_page = ng.bat_entries * 8 / 4096;
                let last_page = (g.bat_entries * 8 - 1) / 4096;
                for page in first_page..=last_page {
                    m.dirty
                        .insert(t.bat_offset + page * 4096, PageSrc::Bat(page));
                }
            }
            self.commit_locked(t, m)?;
            self.trim_tail(t, m)?;
        }
        Ok(report)
    }

    /// Copies the blocks in the way of the BAT growing to `grow_to` elsewhere, in batches that
    /// each commit with one log entry that also grows the BAT region over the space they
    /// leave. Returns how many blocks were copied.
    fn move_in_steps(
        &self,
        t: &mut Table,
        m: &mut Meta,
        in_way: &[(u64, u64, u64)],
        grow_to: u64,
        max_pages: usize,
        job: &Job,
    ) -> Result<u64> {
        let per = max_pages - REGION_PAGES;
        let total = in_way.len() as u64;
        let mut moved = 0;
        let mut i = 0;
        while i < in_way.len() {
            job.check("resize")?;
            let mut pages = BTreeSet::new();
            let mut j = i;
            while j < in_way.len() {
                let p = in_way[j].0 * 8 / 4096;
                if !pages.contains(&p) {
                    if pages.len() == per {
                        break;
                    }
                    pages.insert(p);
                }
                j += 1;
            }
            // The region grows up to the next block still in the way, or to its new end.
            let region_end = match in_way.get(j) {
                Some(&(_, e, _)) => bat_offset(e),
                None => grow_to,
            };
            let mut regions = t.regions.clone();
            set_bat_region(&mut regions, t.bat_offset, region_end - t.bat_offset);
            let mut undo = Undo::new(m);
            let r = self
                .move_batch(t, m, &in_way[i..j], grow_to, &mut undo, &mut moved)
                .map_err(StepError::Before)
                .and_then(|()| self.commit_entry(t, m, &region_pages(&regions)));
            match r {
                Ok(()) => {}
                Err(StepError::Before(e)) => {
                    self.undo(t, m, undo);
                    return Err(e);
                }
                Err(StepError::After(e)) => return Err(e),
            }
            t.bat_len = region_end - t.bat_offset;
            t.regions = regions;
            job.report(j as u64, total);
            i = j;
        }
        Ok(moved)
    }

    fn move_batch(
        &self,
        t: &Table,
        m: &mut Meta,
        batch: &[(u64, u64, u64)],
        grow_to: u64,
        undo: &mut Undo,
        moved: &mut u64,
    ) -> Result<()> {
        // New blocks land past the grown BAT.
        if m.file_len < grow_to {
            self.file.resize(grow_to)?;
            m.file_len = grow_to;
        }
        m.alloc_ptr = m.alloc_ptr.max(grow_to);
        let g = &t.geo;
        for &(i, e, len) in batch {
            let is_bitmap = (i + 1) % (g.chunk_ratio + 1) == 0;
            let holds_data = if is_bitmap {
                bat_state(e) == bitmap::PRESENT
            } else {
                matches!(
                    bat_state(e),
                    payload::FULLY_PRESENT | payload::PARTIALLY_PRESENT
                )
            };
            let new = if holds_data {
                let dst = self.allocate(m, if is_bitmap { MIB } else { g.block_size as u64 })?;
                copy_range(&*self.file, bat_offset(e), dst, len)?;
                *moved += 1;
                bat_entry(bat_state(e), dst)
            } else {
                bat_entry(bat_state(e), 0)
            };
            undo.entries.push((i, e));
            t.bat[i as usize].store(new, Ordering::Release);
            self.mark_bat_dirty(t, m, i);
        }
        Ok(())
    }

    /// The last step: the new BAT and the new size, committed by one log entry.
    #[allow(clippy::too_many_arguments)]
    fn last_step(
        &self,
        t: &mut Table,
        m: &mut Meta,
        g: &Geometry,
        ng: &Geometry,
        relocate: bool,
        undo: &mut Undo,
        report: &mut ResizeReport,
    ) -> std::result::Result<(), StepError> {
        let bs = g.block_size as u64;
        let need = ng.bat_bytes();
        let before = StepError::Before;
        if ng.bat_bytes() > t.bat_len && !relocate {
            // Grown in place with nothing in the way: new blocks land past the grown BAT.
            let grow_to = t.bat_offset + need;
            if m.file_len < grow_to {
                self.file.resize(grow_to).map_err(before)?;
                m.file_len = grow_to;
            }
            m.alloc_ptr = m.alloc_ptr.max(grow_to);
        }
        if ng.virtual_size > g.virtual_size {
            if g.virtual_size % bs != 0 {
                self.whole_last_block(t, m, undo, report).map_err(before)?;
            }
            self.zero_new_part_of_last_block(t, m, g, ng.virtual_size, undo)
                .map_err(before)?;
        }
        // The BAT as it will be.
        let old_entries = g.bat_entries.min(ng.bat_entries);
        let parent_end = self.parent.as_ref().map_or(0, |p| p.capacity());
        let fresh = |block: u64, old: u64| {
            // New space reads as zeros: where the parent reaches, it is hidden. An entry left
            // past the old end in the last chunk of a differencing disk keeps its space
            // (soft-anchored, for the next write there).
            let off = bat_offset(old);
            if ng.has_parent && block * bs < parent_end {
                bat_entry(payload::ZERO, off)
            } else if off != 0 {
                bat_entry(payload::UNMAPPED, off)
            } else {
                0
            }
        };
        let new_chunks = if ng.has_parent {
            ng.bitmap_blocks.saturating_sub(g.bitmap_blocks)
        } else {
            0
        };
        // Every chunk of a differencing disk has its (sparse) sector bitmap block, as at
        // create: some readers read every bitmap.
        let bitmaps_at = if new_chunks > 0 {
            self.allocate(m, new_chunks * MIB).map_err(before)?
        } else {
            0
        };
        let bat: Box<[AtomicU64]> = (0..ng.bat_entries)
            .map(|i| {
                let is_bitmap = (i + 1) % (ng.chunk_ratio + 1) == 0;
                let v = if is_bitmap {
                    let chunk = i / (ng.chunk_ratio + 1);
                    if chunk >= g.bitmap_blocks && ng.has_parent {
                        bat_entry(
                            bitmap::PRESENT,
                            bitmaps_at + (chunk - g.bitmap_blocks) * MIB,
                        )
                    } else if i < old_entries {
                        t.bat[i as usize].load(Ordering::Acquire)
                    } else {
                        0
                    }
                } else {
                    let block = i - i / (ng.chunk_ratio + 1);
                    if block >= g.data_blocks {
                        let old = if i < g.bat_entries {
                            t.bat[i as usize].load(Ordering::Acquire)
                        } else {
                            0
                        };
                        fresh(block, old)
                    } else {
                        t.bat[i as usize].load(Ordering::Acquire)
                    }
                };
                AtomicU64::new(v)
            })
            .collect();
        // Nothing of the old size refers to the new part of the BAT (or to a new place for all
        // of it): written directly.
        // In place, the page that holds the last old entries and the first new ones goes
        // through the log entry: the old ones are referenced and some may change (the last
        // block's), and nothing may point at what is not yet durable.
        let mut raw: Vec<(u64, Vec<u8>)> = Vec::new();
        let pages = (ng.bat_entries * 8).div_ceil(4096);
        let (bat_off, bat_len) = if relocate {
            report.bat_relocated = true;
            let off = self.allocate(m, need).map_err(before)?;
            write_bat_pages(&*self.file, &bat, off, 0, pages).map_err(before)?;
            (off, need)
        } else {
            if ng.data_blocks > g.data_blocks {
                // The entries of the old size end where the new ones begin (the entries after
                // the old last block in its chunk of a differencing disk are new too).
                let first_new = g.bat_entries.min(g.payload_index(g.data_blocks));
                let mut first = first_new * 8 / 4096;
                if first_new * 8 % 4096 != 0 {
                    let off = t.bat_offset + first * 4096;
                    m.dirty.remove(&off);
                    raw.push((off, bat_page(&bat, first)));
                    first += 1;
                }
                if pages > first {
                    write_bat_pages(&*self.file, &bat, t.bat_offset, first, pages)
                        .map_err(before)?;
                }
            }
            (t.bat_offset, t.bat_len.max(need))
        };
        // Then the referenced structures, through one log entry.
        let mut regions = t.regions.clone();
        if (bat_off, bat_len) != (t.bat_offset, t.bat_len) {
            set_bat_region(&mut regions, bat_off, bat_len);
            raw.extend(region_pages(&regions));
        }
        let mut metadata = t.metadata.clone();
        let item = metadata
            .items
            .iter_mut()
            .find(|i| i.id == VIRTUAL_DISK_SIZE)
            .ok_or_else(|| {
                before(corrupt(
                    &self.name,
                    t.regions.metadata.offset,
                    "metadata",
                    "no virtual disk size item",
                ))
            })?;
        item.data = ng.virtual_size.to_le_bytes().to_vec();
        let at = t.regions.metadata.offset + item.offset as u64;
        let page_off = at / 4096 * 4096;
        let mut page = vec![0u8; 4096];
        self.file.read_at(page_off, &mut page).map_err(before)?;
        let p = (at - page_off) as usize;
        page[p..p + 8].copy_from_slice(&ng.virtual_size.to_le_bytes());
        raw.push((page_off, page));
        metadata.geometry = ng.clone();
        self.commit_entry(t, m, &raw)?;
        // The new tables.
        let nbitmaps = if ng.has_parent { ng.bitmap_blocks } else { 0 } as usize;
        let mut bitmaps = std::mem::take(&mut t.bitmaps).into_vec();
        bitmaps.resize_with(nbitmaps, OnceLock::new);
        t.bitmaps = bitmaps.into_boxed_slice();
        t.bat = bat;
        t.bat_offset = bat_off;
        t.bat_len = bat_len;
        t.info.capacity = ng.virtual_size;
        t.regions = regions;
        t.metadata = metadata;
        t.geo = ng.clone();
        Ok(())
    }

    /// The last block was short and may have only the space it needed, with another block
    /// right after: it gets a whole block of its own.
    fn whole_last_block(
        &self,
        t: &Table,
        m: &mut Meta,
        undo: &mut Undo,
        report: &mut ResizeReport,
    ) -> Result<()> {
        let g = &t.geo;
        let bs = g.block_size as u64;
        let idx = g.payload_index(g.data_blocks - 1);
        let e = t.bat[idx as usize].load(Ordering::Acquire);
        let off = bat_offset(e);
        let room = off + bs <= m.alloc_ptr
            && !(0..g.bat_entries).any(|i| {
                let o = bat_offset(t.bat[i as usize].load(Ordering::Acquire));
                i != idx && o != 0 && o < off + bs && off < o + g.mapped_len(i)
            })
            && self.soft_anchor_ok(t, off, bs);
        if off != 0 && !room {
            let holds = matches!(
                bat_state(e),
                payload::FULLY_PRESENT | payload::PARTIALLY_PRESENT
            );
            let new = if holds {
                let dst = self.allocate(m, bs)?;
                copy_range(&*self.file, off, dst, g.mapped_len(idx))?;
                report.moved_blocks += 1;
                bat_entry(bat_state(e), dst)
            } else {
                bat_entry(bat_state(e), 0)
            };
            undo.entries.push((idx, e));
            t.bat[idx as usize].store(new, Ordering::Release);
            self.mark_bat_dirty(t, m, idx);
        } else if off != 0 && m.file_len < off + bs {
            // The block keeps its place, and the file (which may end with its short part, as
            // QEMU sizes files) holds all of it.
            self.file.resize(off + bs)?;
            m.file_len = off + bs;
        }
        Ok(())
    }

    /// Makes the part of the old last block between the old and the new size read as zeros:
    /// whatever a shrink left in the block's space there, and the parent's data there.
    fn zero_new_part_of_last_block(
        &self,
        t: &Table,
        m: &mut Meta,
        g: &Geometry,
        new_size: u64,
        undo: &mut Undo,
    ) -> Result<()> {
        let bs = g.block_size as u64;
        let ls = g.logical_sector as u64;
        let block = g.data_blocks - 1;
        let from = g.virtual_size;
        let to = ((block + 1) * bs).min(new_size);
        if to <= from {
            return Ok(());
        }
        let (inb, n) = (from - block * bs, to - from);
        let idx = g.payload_index(block);
        let e = t.bat[idx as usize].load(Ordering::Acquire);
        match bat_state(e) {
            payload::FULLY_PRESENT => log::write_zeros(&*self.file, bat_offset(e) + inb, n),
            payload::PARTIALLY_PRESENT | payload::NOT_PRESENT if g.has_parent => {
                let off = if bat_state(e) == payload::NOT_PRESENT {
                    let off = self.allocate(m, bs)?;
                    undo.entries.push((idx, e));
                    t.bat[idx as usize].store(
                        bat_entry(payload::PARTIALLY_PRESENT, off),
                        Ordering::Release,
                    );
                    self.mark_bat_dirty(t, m, idx);
                    off
                } else {
                    bat_offset(e)
                };
                log::write_zeros(&*self.file, off + inb, n)?;
                // The sectors read from this file from now on.
                let chunk = block / g.chunk_ratio;
                let bm = self.bitmap(t, chunk)?;
                let sb_idx = g.bitmap_index(chunk);
                let sb = t.bat[sb_idx as usize].load(Ordering::Acquire);
                let sb_off = if bat_state(sb) == bitmap::PRESENT {
                    bat_offset(sb)
                } else {
                    let o = self.allocate(m, MIB)?;
                    undo.entries.push((sb_idx, sb));
                    t.bat[sb_idx as usize].store(bat_entry(bitmap::PRESENT, o), Ordering::Release);
                    self.mark_bat_dirty(t, m, sb_idx);
                    o
                };
                let first = (block % g.chunk_ratio) * g.sectors_per_block() + inb / ls;
                for s in first..first + n / ls {
                    bm[(s / 64) as usize].fetch_or(1 << (s % 64), Ordering::AcqRel);
                    m.dirty.insert(
                        sb_off + s / 8 / 4096 * 4096,
                        PageSrc::Bitmap {
                            chunk,
                            page: s / 8 / 4096,
                        },
                    );
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Commits every dirty page and `raw` (pages of referenced structures) as one log entry,
    /// then writes them in place. A failure from the log write on closes the disk to changes.
    fn commit_entry(
        &self,
        t: &Table,
        m: &mut Meta,
        raw: &[(u64, Vec<u8>)],
    ) -> std::result::Result<(), StepError> {
        let mut pages: Vec<(u64, Vec<u8>)> = m
            .dirty
            .iter()
            .map(|(&o, &s)| (o, self.page_bytes(t, s)))
            .collect();
        pages.extend(raw.iter().cloned());
        if pages.len() > max_pages_per_entry(m.log.log_length) {
            // The plan is made so that this does not happen.
            return Err(StepError::Before(
                VhdxError::Unsupported {
                    file: self.name.clone(),
                    what: format!(
                        "a resize step that changes {} metadata pages with a {}-byte log",
                        pages.len(),
                        m.log.log_length
                    ),
                }
                .into(),
            ));
        }
        // Copies and directly written structures are durable before the commit point.
        self.file.flush().map_err(StepError::Before)?;
        let refs: Vec<(u64, &[u8])> = pages.iter().map(|(o, p)| (*o, &p[..])).collect();
        let (fl, ap) = (m.file_len, m.alloc_ptr.max(m.file_len));
        let r = (|| {
            m.log.write_entry(&*self.file, &[], &refs, fl, ap)?;
            self.file.flush()?;
            let mut reqs: Vec<Request<'_>> =
                refs.iter().map(|(o, p)| Request::write(*o, p)).collect();
            self.file.submit_all(&mut reqs)?;
            self.file.flush()
        })();
        if let Err(e) = r {
            self.poison(m);
            return Err(StepError::After(e));
        }
        m.dirty.clear();
        Ok(())
    }

    /// Undoes a step that failed before its commit point: its BAT entries point where they
    /// did (nothing on disk refers to the copies), and the file's tail is given back.
    fn undo(&self, t: &Table, m: &mut Meta, undo: Undo) {
        for &(i, e) in undo.entries.iter().rev() {
            t.bat[i as usize].store(e, Ordering::Release);
        }
        m.dirty.clear();
        m.alloc_ptr = undo.alloc_ptr;
        if m.file_len > undo.file_len && self.file.resize(undo.file_len).is_ok() {
            m.file_len = undo.file_len;
        }
    }

    /// After a failure at a commit point the file holds either side of it until a replay:
    /// the disk refuses every further change (writes, flushes that would commit, resizes)
    /// until it is opened again, and its log stays marked for replay.
    fn poison(&self, m: &mut Meta) {
        m.dirty.clear();
        m.reserved.clear();
        m.closed = true;
        m.started = false;
        m.data_renewed = false;
        self.started.store(false, Ordering::Release);
    }

    /// Gives back the file's tail past everything it holds (after a commit).
    pub(super) fn trim_tail(&self, t: &Table, m: &mut Meta) -> Result<()> {
        let end = used_end(
            &t.regions,
            (m.log.log_offset, m.log.log_length),
            &t.geo,
            t.bat.iter().map(|e| e.load(Ordering::Acquire)),
            m.file_len,
        );
        if end < m.file_len && m.reserved.is_empty() {
            // The active log entry records the file size it was written at, and a replay
            // refuses a file shorter than that (truncated). So first an empty entry that
            // records the new size (with every earlier entry retired by the flush), then the
            // truncation: a crash between the two leaves only unreferenced tail space.
            self.file.flush()?;
            m.log.write_sequence(&*self.file, &[], end, end)?;
            self.file.flush()?;
            self.file.resize(end)?;
            m.file_len = end;
            m.alloc_ptr = end;
        }
        Ok(())
    }
}

/// Points the BAT region of `regions` at (offset, length).
fn set_bat_region(regions: &mut Regions, offset: u64, length: u64) {
    for r in regions.all.iter_mut().filter(|r| r.guid == BAT_REGION) {
        r.offset = offset;
        r.length = length;
    }
    regions.bat.offset = offset;
    regions.bat.length = length;
}

/// The pages of both region tables for `regions`.
fn region_pages(regions: &Regions) -> Vec<(u64, Vec<u8>)> {
    let table = meta::region_table_bytes(&regions.all);
    let mut out = Vec::with_capacity(REGION_PAGES);
    for base in REGION_TABLE_OFFSETS {
        for (i, page) in table.chunks(4096).enumerate() {
            out.push((base + i as u64 * 4096, page.to_vec()));
        }
    }
    out
}

/// The BAT page `page` of `bat`.
fn bat_page(bat: &[AtomicU64], page: u64) -> Vec<u8> {
    let mut out = vec![0u8; 4096];
    for (k, chunk) in out.chunks_exact_mut(8).enumerate() {
        let v = bat
            .get((page * 512) as usize + k)
            .map_or(0, |e| e.load(Ordering::Acquire));
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes the BAT pages [first, end) of `bat` to a BAT at `base`, 1 MiB at a time (write-zeroes
/// for runs of empty entries).
fn write_bat_pages(
    file: &dyn BlockDevice,
    bat: &[AtomicU64],
    base: u64,
    first: u64,
    end: u64,
) -> Result<()> {
    const PER: u64 = MIB / 4096;
    let mut buf = vec![0u8; MIB as usize];
    let mut page = first;
    while page < end {
        let n = (end - page).min(PER);
        let bytes = &mut buf[..(n * 4096) as usize];
        let mut any = false;
        for (k, chunk) in bytes.chunks_exact_mut(8).enumerate() {
            let i = page * 512 + k as u64;
            let v = bat.get(i as usize).map_or(0, |e| e.load(Ordering::Acquire));
            any |= v != 0;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        if any {
            file.write_at(base + page * 4096, bytes)?;
        } else {
            log::write_zeros(file, base + page * 4096, n * 4096)?;
        }
        page += n;
    }
    Ok(())
}

/// Copies `len` bytes of `file` from `src` to `dst` (non-overlapping), in 4 MiB pieces.
pub(crate) fn copy_range(file: &dyn BlockDevice, src: u64, dst: u64, len: u64) -> Result<()> {
    let mut buf = vec![0u8; len.min(4 * MIB) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_at(src + done, &mut buf[..n])?;
        file.write_at(dst + done, &buf[..n])?;
        done += n as u64;
    }
    Ok(())
}
