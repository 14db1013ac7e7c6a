//! Maintenance of an open image: compact, metadata changes (reparent, physical sector size).
//!
//! Both hold the table lock exclusively (I/O waits, as for a resize) and change referenced
//! structures only through the log, so a crash leaves the old or the new image.

use super::resize::copy_range;
use super::*;
use crate::format::META_IS_REQUIRED;
use crate::lifecycle::MergeMarker;
use crate::log::max_pages_per_entry;
use crate::meta::{MetaItem, ParentLocator};
use vstor_core::Job;

/// What a compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// The file size before.
    pub old_file_size: u64,
    /// The file size after.
    pub new_file_size: u64,
    /// Blocks whose space was given back (unmapped, or all zeros with `full`).
    pub released_blocks: u64,
    /// Blocks moved from the end of the file into holes.
    pub moved_blocks: u64,
}

impl Vhdx {
    /// Gives back the space of blocks that hold no data: unmapped and zero blocks keep no
    /// space, and with `full` every allocated block that reads as zeros is released too (a
    /// differencing disk marks it ZERO so that the parent stays hidden). Then blocks at the end
    /// of the file move into the holes and the file shrinks. Fixed disks are left as they are.
    pub fn compact_with(&self, full: bool, job: &Job) -> Result<CompactReport> {
        if self.read_only {
            return Err(Error::ReadOnly {
                op: vstor_core::OpKind::Write,
            });
        }
        let t = self.table_mut();
        let mut m = self.lock();
        let mut rep = CompactReport {
            old_file_size: m.file_len,
            ..Default::default()
        };
        if self.leave_allocated {
            rep.new_file_size = m.file_len;
            return Ok(rep);
        }
        self.commit_locked(&t, &mut m)?;
        self.start_session(&mut m)?;
        m.reserved.clear();
        let g = t.geo.clone();
        let bs = g.block_size as u64;
        // 1. Release what holds no data.
        let mut zero = vec![0u8; bs as usize];
        for block in 0..g.data_blocks {
            job.check("compact")?;
            let idx = g.payload_index(block);
            let e = t.bat[idx as usize].load(Ordering::Acquire);
            let st = bat_state(e);
            let release = match st {
                payload::ZERO
                | payload::UNMAPPED
                | payload::UNDEFINED
                | payload::UNMAPPED_LEGACY => bat_offset(e) != 0,
                payload::FULLY_PRESENT if full => {
                    let len = g.mapped_len(idx) as usize;
                    self.file.read_at(bat_offset(e), &mut zero[..len])?;
                    zero[..len].iter().all(|&b| b == 0)
                }
                _ => false,
            };
            if release {
                let state = match st {
                    payload::FULLY_PRESENT if g.has_parent => payload::ZERO,
                    payload::FULLY_PRESENT => payload::NOT_PRESENT,
                    payload::UNMAPPED_LEGACY => payload::UNMAPPED,
                    s => s,
                };
                t.bat[idx as usize].store(bat_entry(state, 0), Ordering::Release);
                self.mark_bat_dirty(&t, &mut m, idx);
                rep.released_blocks += 1;
            }
            job.report(block + 1, g.data_blocks * 2);
        }
        self.commit_locked(&t, &mut m)?;
        // 2. Move blocks from the end into holes, highest first, lowest hole first.
        let fixed_end = {
            let mut end = HEADER_SECTION_END.max(m.log.log_offset + m.log.log_length);
            for r in &t.regions.all {
                end = end.max(r.offset + r.length);
            }
            end.next_multiple_of(MIB)
        };
        let mut owned: Vec<(u64, u64, u64)> = Vec::new(); // (offset, len, bat index)
        for i in 0..g.bat_entries {
            let e = t.bat[i as usize].load(Ordering::Acquire);
            let off = bat_offset(e);
            if off >= fixed_end {
                owned.push((off, g.mapped_len(i).next_multiple_of(MIB), i));
            }
        }
        owned.sort_unstable();
        let mut holes: Vec<(u64, u64)> = Vec::new();
        let mut at = fixed_end;
        for &(o, l, _) in &owned {
            if o > at {
                holes.push((at, o - at));
            }
            at = at.max(o + l);
        }
        let total = owned.len() as u64;
        while let Some(&(o, l, i)) = owned.last() {
            job.check("compact")?;
            let Some(h) = holes.iter_mut().find(|h| h.1 >= l && h.0 + l <= o) else {
                break;
            };
            let dst = h.0;
            h.0 += l;
            h.1 -= l;
            let e = t.bat[i as usize].load(Ordering::Acquire);
            copy_range(&*self.file, o, dst, g.mapped_len(i))?;
            t.bat[i as usize].store(bat_entry(bat_state(e), dst), Ordering::Release);
            self.mark_bat_dirty(&t, &mut m, i);
            owned.pop();
            rep.moved_blocks += 1;
            job.report(g.data_blocks + rep.moved_blocks, g.data_blocks + total);
        }
        // The copies are flushed before the log entry that points at them (commit does it).
        self.commit_locked(&t, &mut m)?;
        self.trim_tail(&t, &mut m)?;
        self.file.flush()?;
        rep.new_file_size = m.file_len;
        job.report(1, 1);
        Ok(rep)
    }

    /// Fixes what can be fixed without guessing and says what it did: a log left by a crash
    /// (replayed by the writable open that made `self`), a damaged header slot (both slots
    /// rewritten from the current header), a damaged region table copy (both rewritten from the
    /// good one), leaked space (given back by a compaction). Data is never touched.
    pub fn repair(&self, job: &Job) -> Result<Vec<String>> {
        if self.read_only {
            return Err(Error::ReadOnly {
                op: vstor_core::OpKind::Write,
            });
        }
        let mut done = Vec::new();
        if let Some(r) = &self.replayed {
            done.push(format!("log: {r}"));
        }
        if let Some(bad) = self.headers.slots.iter().position(|s| s.is_err()) {
            // A session writes the other slot; closing it writes this one.
            let mut m = self.lock();
            self.start_session(&mut m)?;
            drop(m);
            self.close()?;
            let mut m = self.lock();
            self.start_session(&mut m)?;
            drop(m);
            self.close()?;
            done.push(format!(
                "header slot {bad}: rewritten from the current header"
            ));
        }
        let regions = self.table().regions.clone();
        if !regions.problems.is_empty() {
            let t = self.table_mut();
            let mut m = self.lock();
            self.commit_locked(&t, &mut m)?;
            self.start_session(&mut m)?;
            let table = meta::region_table_bytes(&regions.all);
            let mut pages: Vec<(u64, &[u8])> = Vec::new();
            for base in REGION_TABLE_OFFSETS {
                for (i, page) in table.chunks(4096).enumerate() {
                    pages.push((base + i as u64 * 4096, page));
                }
            }
            let (fl, ap) = (m.file_len, m.alloc_ptr.max(m.file_len));
            m.log.write_entry(&*self.file, &[], &pages, fl, ap)?;
            self.file.flush()?;
            let mut reqs: Vec<Request<'_>> =
                pages.iter().map(|(o, p)| Request::write(*o, p)).collect();
            self.file.submit_all(&mut reqs)?;
            self.file.flush()?;
            done.push(format!(
                "region table: both copies rewritten ({})",
                regions.problems.join("; ")
            ));
        }
        let before = self.file.capacity();
        let c = self.compact_with(false, job)?;
        if c.new_file_size < before || c.moved_blocks > 0 {
            done.push(format!(
                "space: file {} -> {} bytes ({} blocks moved into holes)",
                before, c.new_file_size, c.moved_blocks
            ));
        }
        self.close()?;
        Ok(done)
    }

    /// Rewrites the metadata region with `change` applied, through one log entry. Items whose
    /// data grows move to free space in the region.
    fn rewrite_metadata(
        &self,
        what: &str,
        change: impl FnOnce(&mut Metadata) -> Result<()>,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                op: vstor_core::OpKind::Write,
            });
        }
        let mut t = self.table_mut();
        let mut m = self.lock();
        self.commit_locked(&t, &mut m)?;
        self.start_session(&mut m)?;
        let mut md = t.metadata.clone();
        change(&mut md)?;
        let region = t.regions.metadata.clone();
        // Lay out: items keep their place when they still fit; the others go after the rest.
        let old: Vec<MetaItem> = t.metadata.items.clone();
        let mut end = old
            .iter()
            .map(|i| i.offset as u64 + i.length as u64)
            .max()
            .unwrap_or(METADATA_TABLE_SIZE);
        for it in md.items.iter_mut() {
            let before = old.iter().find(|o| o.id == it.id);
            match before {
                Some(b) if it.data.len() as u64 <= b.length as u64 => {
                    it.offset = b.offset;
                }
                _ => {
                    let at = end.next_multiple_of(8);
                    it.offset = at as u32;
                    end = at + it.data.len() as u64;
                }
            }
            it.length = it.data.len() as u32;
        }
        if end > region.length {
            return Err(VhdxError::Unsupported {
                file: self.name.clone(),
                what: format!(
                    "{what}: the metadata does not fit its {}-byte region",
                    region.length
                ),
            }
            .into());
        }
        let new = meta::metadata_region_bytes(&md.items, region.length);
        let mut cur = vec![0u8; region.length as usize];
        self.file.read_at(region.offset, &mut cur)?;
        let pages: Vec<(u64, &[u8])> = new
            .chunks(4096)
            .zip(cur.chunks(4096))
            .enumerate()
            .filter(|(_, (n, c))| n != c)
            .map(|(i, (n, _))| (region.offset + i as u64 * 4096, n))
            .collect();
        if pages.len() > max_pages_per_entry(m.log.log_length) {
            return Err(VhdxError::Unsupported {
                file: self.name.clone(),
                what: format!("{what}: {} metadata pages change at once", pages.len()),
            }
            .into());
        }
        let (fl, ap) = (m.file_len, m.alloc_ptr.max(m.file_len));
        m.log.write_entry(&*self.file, &[], &pages, fl, ap)?;
        self.file.flush()?;
        let mut reqs: Vec<Request<'_>> = pages.iter().map(|(o, p)| Request::write(*o, p)).collect();
        self.file.submit_all(&mut reqs)?;
        self.file.flush()?;
        t.info.physical_sector_size = md.geometry.physical_sector;
        t.geo.physical_sector = md.geometry.physical_sector;
        t.metadata = md;
        Ok(())
    }

    /// The merge into this disk that has begun and not finished (see
    /// [`crate::lifecycle::merge`] and [`MergeMarker`]).
    pub fn merge_marker(&self) -> Option<MergeMarker> {
        self.table()
            .metadata
            .items
            .iter()
            .find(|i| i.id == MERGE_MARKER)
            .and_then(|i| MergeMarker::from_bytes(&i.data))
    }

    /// Sets (or with `None` removes) the merge marker: an optional metadata item, which other
    /// readers keep and ignore. A metadata-only change: the DataWriteGuid stays.
    pub fn set_merge_marker(&self, marker: Option<&MergeMarker>) -> Result<()> {
        self.rewrite_metadata("merge marker", |md| {
            md.items.retain(|i| i.id != MERGE_MARKER);
            if let Some(m) = marker {
                md.items.push(MetaItem {
                    id: MERGE_MARKER,
                    offset: 0,
                    length: 0,
                    flags: 0,
                    data: m.to_bytes(),
                });
            }
            Ok(())
        })
    }

    /// Changes the physical sector size the disk reports (512 or 4096).
    pub fn set_physical_sector_size(&self, size: u32) -> Result<()> {
        if size != 512 && size != 4096 {
            return Err(crate::error::invalid(format!(
                "physical sector size {size}: it must be 512 or 4096"
            )));
        }
        self.rewrite_metadata("set physical sector size", |md| {
            let it = md
                .items
                .iter_mut()
                .find(|i| i.id == PHYSICAL_SECTOR_SIZE)
                .ok_or_else(|| crate::error::invalid("no physical sector size item"))?;
            it.data = size.to_le_bytes().to_vec();
            md.geometry.physical_sector = size;
            Ok(())
        })
    }

    /// Replaces the parent locator of a differencing disk (the caller has checked the new
    /// parent: see [`crate::lifecycle::set_parent`]).
    pub fn set_parent_locator(&self, loc: &ParentLocator) -> Result<()> {
        if !self.table().geo.has_parent {
            return Err(crate::error::invalid(format!(
                "{} is not a differencing disk: it has no parent to change",
                self.name
            )));
        }
        let bytes = loc.to_bytes();
        self.rewrite_metadata("set parent", |md| {
            match md.items.iter_mut().find(|i| i.id == PARENT_LOCATOR) {
                Some(it) => it.data = bytes,
                None => md.items.push(MetaItem {
                    id: PARENT_LOCATOR,
                    offset: 0,
                    length: 0,
                    flags: META_IS_REQUIRED,
                    data: bytes,
                }),
            }
            md.parent = Some(loc.clone());
            Ok(())
        })
    }
}
