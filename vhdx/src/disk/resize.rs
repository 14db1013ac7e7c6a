//! Online resize: grow and shrink while other threads keep doing I/O.
//!
//! A resize takes the table lock exclusively, so requests in flight finish first and new ones
//! wait for the new size; it holds it for the few writes below, which is why a resize that
//! moves no data takes milliseconds whatever the disk's size.
//!
//! Crash safety: everything the new size needs that nothing references yet is written in
//! place first (copies of blocks that must move out of the BAT's way, the new tail of the BAT,
//! new sector bitmap blocks); then one log entry carries every change to structures that are
//! referenced (the metadata page with the virtual disk size, both region tables when the BAT
//! region changes, the BAT pages of moved blocks). That entry is the commit point: a crash
//! before it leaves the old disk (with unreferenced tail space, given back at the next open),
//! a crash after it replays to the new one.

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

/// The end of the last block that holds data: the smallest size the disk can shrink to.
fn data_end(t: &Table) -> u64 {
    let g = &t.geo;
    for block in (0..g.data_blocks).rev() {
        let st = bat_state(t.bat[g.payload_index(block) as usize].load(Ordering::Acquire));
        let data = if g.has_parent {
            // Anything but "see the parent" differs from the parent.
            st != payload::NOT_PRESENT
        } else {
            matches!(st, payload::FULLY_PRESENT | payload::PARTIALLY_PRESENT)
        };
        if data {
            return ((block + 1) * g.block_size as u64).min(g.virtual_size);
        }
    }
    0
}

impl Vhdx {
    /// The smallest virtual size this disk can shrink to without cutting a block that holds
    /// data (at least one logical sector).
    pub fn minimum_size(&self) -> u64 {
        let t = self.table();
        data_end(&t).max(t.geo.logical_sector as u64)
    }

    /// Changes the virtual size to `new_size`, online: other threads may keep doing I/O, and
    /// holders of [`capacity_signal`](BlockDevice::capacity_signal) are told. Shrinking below
    /// [`minimum_size`](Vhdx::minimum_size) fails with [`VhdxError::BelowMinimum`] and
    /// changes nothing. `job` reports moved blocks and can cancel before the commit.
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
        let minimum = data_end(t).max(ls);
        if new_size < minimum {
            return Err(VhdxError::BelowMinimum {
                file: self.name.clone(),
                requested: new_size,
                minimum,
            }
            .into());
        }
        job.check("resize")?;
        // From here the in-memory tables equal the file's.
        self.commit_locked(t, m)?;
        self.start_data_session(m)?;
        m.reserved.clear();
        let ng = Geometry::new(
            new_size,
            g.block_size,
            g.logical_sector,
            g.physical_sector,
            g.has_parent,
        );
        let mut bat_off = t.bat_offset;
        let mut bat_len = t.bat_len;
        // Pages of referenced structures that change: logged together.
        let mut logged: Vec<(u64, Vec<u8>)> = Vec::new();
        if ng.bat_bytes() > t.bat_len {
            let need = ng.bat_bytes();
            let (grow_from, grow_to) = (t.bat_offset + t.bat_len, t.bat_offset + need);
            let log_range = (m.log.log_offset, m.log.log_length);
            let blocked = t
                .regions
                .all
                .iter()
                .filter(|r| r.guid != BAT_REGION)
                .map(|r| (r.offset, r.length))
                .chain([log_range])
                .any(|(o, l)| o < grow_to && grow_from < o + l);
            if blocked {
                bat_off = self.allocate(m, need)?;
                report.bat_relocated = true;
            } else {
                // New blocks must land past the grown BAT.
                if m.alloc_ptr < grow_to {
                    m.alloc_ptr = grow_to;
                    if m.file_len < grow_to {
                        self.file.resize(grow_to)?;
                        m.file_len = grow_to;
                    }
                }
                report.moved_blocks = self.move_out_of(t, m, grow_from, grow_to, job)?;
            }
            bat_len = need;
        }
        let bs = g.block_size as u64;
        if new_size > g.virtual_size && g.virtual_size % bs != 0 {
            // The last block was short and may have only the space it needed, with another
            // block right after: it gets a whole block of its own.
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
                    copy_range(&*self.file, bat_offset(e), dst, g.mapped_len(idx))?;
                    report.moved_blocks += 1;
                    bat_entry(bat_state(e), dst)
                } else {
                    bat_entry(bat_state(e), 0)
                };
                t.bat[idx as usize].store(new, Ordering::Release);
                self.mark_bat_dirty(t, m, idx);
            }
        }
        for (off, src) in std::mem::take(&mut m.dirty) {
            logged.push((off, self.page_bytes(t, src)));
        }
        // The BAT as it will be.
        let old_entries = g.bat_entries.min(ng.bat_entries);
        let mut vals: Vec<u64> = (0..ng.bat_entries)
            .map(|i| {
                if i < old_entries {
                    t.bat[i as usize].load(Ordering::Acquire)
                } else {
                    0
                }
            })
            .collect();
        if ng.has_parent {
            // Every chunk of a differencing disk has its (sparse) sector bitmap block, as at
            // create: some readers read every bitmap.
            for chunk in g.bitmap_blocks..ng.bitmap_blocks {
                let off = self.allocate(m, MIB)?;
                vals[ng.bitmap_index(chunk) as usize] = bat_entry(bitmap::PRESENT, off);
            }
        }
        job.check("resize")?;
        let bytes_of = |from: u64, to: u64| -> Vec<u8> {
            let mut raw = vec![0u8; (to - from) as usize];
            let first = (from / 8) as usize;
            let last = ((to / 8) as usize).min(vals.len());
            for (i, v) in vals.iter().enumerate().take(last).skip(first) {
                let at = i * 8 - from as usize;
                raw[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            raw
        };
        let new_bytes = (ng.bat_entries * 8).next_multiple_of(4096);
        // Zeroed ranges that go into the log entry.
        let mut zeros: Vec<(u64, u64)> = Vec::new();
        if report.bat_relocated {
            // Nothing references the new place yet: write the whole BAT there.
            self.file.write_at(bat_off, &bytes_of(0, bat_len))?;
        } else if new_bytes > old_entries * 8 {
            // The slack of the old region is referenced by nothing: written directly. The
            // growth past it held blocks until this commit: zeroed (and filled where entries
            // are not zero) by the log entry itself.
            let first = old_entries * 8 / 512 * 512;
            let direct_end = new_bytes.min(t.bat_len);
            if direct_end > first {
                self.file
                    .write_at(bat_off + first, &bytes_of(first, direct_end))?;
            }
            if bat_len > t.bat_len {
                zeros.push((bat_off + t.bat_len, bat_len - t.bat_len));
                let mut p = t.bat_len;
                while p < new_bytes {
                    let page = bytes_of(p, p + 4096);
                    if page.iter().any(|&b| b != 0) {
                        logged.push((bat_off + p, page));
                    }
                    p += 4096;
                }
            }
        }
        // Then the referenced structures, through one log entry.
        let mut regions = t.regions.clone();
        if (bat_off, bat_len) != (t.bat_offset, t.bat_len) {
            for r in regions.all.iter_mut().filter(|r| r.guid == BAT_REGION) {
                r.offset = bat_off;
                r.length = bat_len;
            }
            regions.bat.offset = bat_off;
            regions.bat.length = bat_len;
            let table = meta::region_table_bytes(&regions.all);
            for base in REGION_TABLE_OFFSETS {
                for (i, page) in table.chunks(4096).enumerate() {
                    logged.push((base + i as u64 * 4096, page.to_vec()));
                }
            }
        }
        let mut metadata = t.metadata.clone();
        let item = metadata
            .items
            .iter_mut()
            .find(|i| i.id == VIRTUAL_DISK_SIZE)
            .ok_or_else(|| {
                corrupt(
                    &self.name,
                    t.regions.metadata.offset,
                    "metadata",
                    "no virtual disk size item",
                )
            })?;
        item.data = new_size.to_le_bytes().to_vec();
        let at = t.regions.metadata.offset + item.offset as u64;
        let page_off = at / 4096 * 4096;
        let mut page = vec![0u8; 4096];
        self.file.read_at(page_off, &mut page)?;
        let p = (at - page_off) as usize;
        page[p..p + 8].copy_from_slice(&new_size.to_le_bytes());
        logged.push((page_off, page));
        metadata.geometry = ng.clone();
        if logged.len() + zeros.len() > max_pages_per_entry(m.log.log_length) {
            return Err(VhdxError::Unsupported {
                file: self.name.clone(),
                what: format!(
                    "a resize that changes {} metadata pages at once with a {}-byte log",
                    logged.len(),
                    m.log.log_length
                ),
            }
            .into());
        }
        // Data copies and the new BAT bytes are durable before the commit point.
        self.file.flush()?;
        let refs: Vec<(u64, &[u8])> = logged.iter().map(|(o, p)| (*o, &p[..])).collect();
        let (fl, ap) = (m.file_len, m.alloc_ptr.max(m.file_len));
        m.log.write_entry(&*self.file, &zeros, &refs, fl, ap)?;
        self.file.flush()?;
        for &(o, l) in &zeros {
            log::write_zeros(&*self.file, o, l)?;
        }
        let mut reqs: Vec<Request<'_>> = refs.iter().map(|(o, p)| Request::write(*o, p)).collect();
        self.file.submit_all(&mut reqs)?;
        self.file.flush()?;
        // The new tables.
        let nbitmaps = if ng.has_parent { ng.bitmap_blocks } else { 0 } as usize;
        let mut bitmaps = std::mem::take(&mut t.bitmaps).into_vec();
        bitmaps.resize_with(nbitmaps, OnceLock::new);
        t.bitmaps = bitmaps.into_boxed_slice();
        t.bat = vals.into_iter().map(AtomicU64::new).collect();
        t.bat_offset = bat_off;
        t.bat_len = bat_len;
        t.info.capacity = new_size;
        t.regions = regions;
        t.metadata = metadata;
        t.geo = ng;
        if g.bat_entries > t.geo.bat_entries {
            // Entries past the new end are meaningless now; clear them on disk for tidiness
            // (committed with the next flush).
            let first_page = t.geo.bat_entries * 8 / 4096;
            let last_page = (g.bat_entries * 8 - 1) / 4096;
            for page in first_page..=last_page {
                m.dirty
                    .insert(t.bat_offset + page * 4096, PageSrc::Bat(page));
            }
            self.commit_locked(t, m)?;
            self.trim_tail(t, m)?;
        }
        Ok(report)
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

    /// Copies every block that lies in [from, to) of the file elsewhere and points its BAT
    /// entry there (marked dirty, not committed); blocks with no data there just lose their
    /// place. Returns how many blocks were copied.
    fn move_out_of(&self, t: &Table, m: &mut Meta, from: u64, to: u64, job: &Job) -> Result<u64> {
        let g = &t.geo;
        let mut todo = Vec::new();
        for i in 0..g.bat_entries {
            let e = t.bat[i as usize].load(Ordering::Acquire);
            let off = bat_offset(e);
            if off == 0 {
                continue;
            }
            let len = g.mapped_len(i);
            if off < to && from < off + len {
                todo.push((i, e, len));
            }
        }
        let total = todo.len() as u64;
        let mut moved = 0;
        for (n, (i, e, len)) in todo.into_iter().enumerate() {
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
                moved += 1;
                bat_entry(bat_state(e), dst)
            } else {
                bat_entry(bat_state(e), 0)
            };
            t.bat[i as usize].store(new, Ordering::Release);
            self.mark_bat_dirty(t, m, i);
            job.report(n as u64 + 1, total);
        }
        Ok(moved)
    }
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
