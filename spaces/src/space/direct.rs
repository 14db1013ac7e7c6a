//! The direct path: simple and mirror I/O, and parity reads whose data members are usable,
//! go straight to the members with the callers' buffers carved into pieces (no copy), one
//! batch per member, run side by side; every read is verified against its checksums as it
//! completes. Parity writes and degraded parity reads are handed to the
//! [parity path](super::parity).

use super::heal::Heal;
use super::sums::CrcSource;
use super::*;

/// A read of the direct path to verify once its batch is done.
pub(super) struct ReadCheck {
    /// The request it is part of (index in the segment).
    parent: usize,
    /// Offset of the read in that request.
    at: u64,
    /// Bytes read.
    len: u64,
    /// The slot it was read from.
    slot: Slot,
    /// Offset of the read in the slot's slab.
    in_slab: u64,
    /// The extent.
    extent: u64,
    /// The member request that read it (index in the member's batch) and the offset of the
    /// read in that request.
    req: (usize, u64),
}

/// Appends a read, merged into the member's previous request when it continues it. Returns
/// the request's index in `per` and the offset of the read inside it.
pub(super) fn push_read<'a>(
    per: &mut Vec<Request<'a>>,
    own: &mut Vec<usize>,
    parent: usize,
    offset: u64,
    bufs: ReadBufs<'a>,
) -> (usize, u64) {
    if let (Some(last), Some(&o)) = (per.last_mut(), own.last()) {
        if o == parent && last.offset() + last.len() == offset {
            let at = last.len();
            if let Op::Read { bufs: b, .. } = &mut last.op {
                b.extend(bufs);
                return (per.len() - 1, at);
            }
        }
    }
    per.push(Request::new(Op::Read { offset, bufs }));
    own.push(parent);
    (per.len() - 1, 0)
}

/// Appends a write, merged into the member's previous request when it continues it.
pub(super) fn push_write<'a>(
    per: &mut Vec<Request<'a>>,
    own: &mut Vec<usize>,
    parent: usize,
    offset: u64,
    bufs: vstor_core::WriteBufs<'a>,
) {
    if let (Some(last), Some(&o)) = (per.last_mut(), own.last()) {
        if o == parent && last.offset() + last.len() == offset {
            if let Op::Write { bufs: b, .. } = &mut last.op {
                b.extend(bufs);
                return;
            }
        }
    }
    per.push(Request::new(Op::Write { offset, bufs }));
    own.push(parent);
}

impl Space {
    /// One pass over the incomplete requests. Completes what succeeded; leaves incomplete what a
    /// member failure touched; returns the failures. `None`, with nothing done, if writes are
    /// left and the extent map is no longer at `version`.
    pub(super) fn run_once(
        &self,
        seg: &mut [Request<'_>],
        devs: &Devs,
        heal: &mut Vec<Heal>,
        version: Option<u64>,
    ) -> Option<Vec<(usize, Error)>> {
        let layout = self.shared.layout;
        let ext = self
            .shared
            .extents
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if version.is_some_and(|v| v != self.shared.map_version.load(Ordering::Acquire)) {
            return None;
        }
        self.shared.io_entered.fetch_add(1, Ordering::AcqRel);
        let rebuilding = self
            .shared
            .rebuilding
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if rebuilding.is_some() && seg.iter().any(|r| !r.is_complete() && r.kind().is_write()) {
            self.shared
                .writes_while_rebuilding
                .fetch_add(1, Ordering::AcqRel);
        }
        let n = devs.len();
        let parity = layout.parities() > 0;
        let k = layout.copies();
        let mut slow = Vec::new();
        let mut direct = vec![false; seg.len()];
        let mut errors: Vec<Option<Error>> = vec![None; seg.len()];
        let mut retry = vec![false; seg.len()];
        let mut failures = Vec::new();
        // Reads to verify once done.
        let mut checks: Vec<ReadCheck> = Vec::new();
        // The stored checksums of what each member request read, computed by the member's
        // thread once its batch completed.
        let got_crcs: Vec<Vec<Option<Vec<u32>>>>;
        // Checksum pages the reads need that are not cached: read in the same batches.
        // Checksum pages to read: (member, first page, its offset on the member, pages).
        let mut loads: Vec<(usize, u64, u64, u64)> = Vec::new();
        let mut wanted_at: Vec<(usize, u64, u64)> = Vec::new();
        let mut load_bufs: Vec<AlignedBuf>;
        let mut loads_drops: Option<u64> = None;
        // Per check, the index of its range among its member request's ranges.
        let mut check_at: Vec<usize> = Vec::with_capacity(seg.len());
        {
            // Checksum pages a small batch sends with its data.
            let mut page_store: Vec<PageWrite> = Vec::new();
            let mut per: Vec<Vec<Request<'_>>> = (0..n).map(|_| Vec::new()).collect();
            let mut own: Vec<Vec<usize>> = (0..n).map(|_| Vec::new()).collect();
            // Written pieces whose checksums go to (member, slab)s: targets, first block, data.
            let mut crc_src: Vec<CrcSource<vstor_core::WriteBufs<'_>>> = Vec::new();
            for (pi, req) in seg.iter_mut().enumerate() {
                if req.is_complete() {
                    continue;
                }
                let pieces: Vec<Piece> = layout.pieces(req.offset(), req.len()).collect();
                let is_write = matches!(req.op, Op::Write { .. });
                let data_lost = |p: &Piece| match &ext[p.extent as usize] {
                    Some(s) => devs[s[layout.data_slot(p.row, p.col, 0)].member].is_none(),
                    None => false,
                };
                if parity && (is_write || pieces.iter().any(data_lost)) {
                    slow.push(pi);
                    continue;
                }
                direct[pi] = true;
                let lens = pieces.iter().map(|p| p.len as usize);
                match &mut req.op {
                    Op::Read { bufs, .. } => {
                        for (p, mut b) in pieces.iter().zip(carve_read_bufs(bufs, lens)) {
                            let Some(slots) = &ext[p.extent as usize] else {
                                zero_bufs(&mut b);
                                continue;
                            };
                            let first = p.row as usize % k;
                            let slot = (0..k)
                                .map(|c| slots[layout.data_slot(p.row, p.col, (first + c) % k)])
                                .find(|s| devs[s.member].is_some());
                            match slot {
                                Some(s) => {
                                    let in_slab = layout.slab_offset(p.row, p.in_unit);
                                    let off = self.phys(s, in_slab);
                                    let at = push_read(
                                        &mut per[s.member],
                                        &mut own[s.member],
                                        pi,
                                        off,
                                        b,
                                    );
                                    checks.push(ReadCheck {
                                        parent: pi,
                                        at: p.at,
                                        len: p.len,
                                        slot: s,
                                        in_slab,
                                        extent: p.extent,
                                        req: at,
                                    });
                                }
                                None => {
                                    errors[pi] = Some(self.failed(format!(
                                        "no usable copy of extent {} column {}",
                                        p.extent, p.col
                                    )))
                                }
                            }
                        }
                    }
                    Op::Write { bufs, .. } => {
                        for (p, b) in pieces.iter().zip(carve_write_bufs(bufs, lens)) {
                            let Some(slots) = &ext[p.extent as usize] else {
                                errors[pi] = Some(
                                    self.failed(format!("extent {} is not allocated", p.extent)),
                                );
                                continue;
                            };
                            let shadows = match &*rebuilding {
                                Some((e, t)) if *e == p.extent => &t[..],
                                _ => &[],
                            };
                            let block = layout.slab_offset(p.row, p.in_unit) / csum::BLOCK;
                            let mut targets = Vec::new();
                            for c in 0..k {
                                let si = layout.data_slot(p.row, p.col, c);
                                let s = slots[si];
                                if devs[s.member].is_some() {
                                    targets.push((s.member, s.slab));
                                }
                                if let Some(&(_, new)) = shadows.iter().find(|x| x.0 == si) {
                                    targets.push((new.member, new.slab));
                                    // The slab being rebuilt gets the write too.
                                    let off = self.phys(new, layout.slab_offset(p.row, p.in_unit));
                                    push_write(
                                        &mut per[new.member],
                                        &mut own[new.member],
                                        pi,
                                        off,
                                        b.clone(),
                                    );
                                }
                                if devs[s.member].is_some() {
                                    let off = self.phys(s, layout.slab_offset(p.row, p.in_unit));
                                    push_write(
                                        &mut per[s.member],
                                        &mut own[s.member],
                                        pi,
                                        off,
                                        b.clone(),
                                    );
                                }
                            }
                            crc_src.push((targets, block, b));
                        }
                    }
                    _ => {}
                }
            }
            let mut wanted = BTreeSet::new();
            for ReadCheck {
                len,
                slot: s,
                in_slab,
                ..
            } in &checks
            {
                let (missing, drops) = self.pool.csums.missing(
                    s.member,
                    s.slab,
                    in_slab / csum::BLOCK,
                    len / csum::BLOCK,
                );
                // The cache's drop count before any of these pages is read.
                loads_drops.get_or_insert(drops);
                for (page, off) in missing {
                    if wanted.insert((s.member, page)) {
                        wanted_at.push((s.member, page, off));
                    }
                }
            }
            // Adjacent pages of a member in one read each.
            wanted_at.sort_unstable();
            for (m, page, off) in wanted_at {
                match loads.last_mut() {
                    Some((lm, first, loff, n))
                        if *lm == m && *first + *n == page && *loff + *n * csum::PAGE == off =>
                    {
                        *n += 1
                    }
                    _ => loads.push((m, page, off, 1)),
                }
            }
            load_bufs = loads
                .iter()
                .map(|l| AlignedBuf::new((l.3 * csum::PAGE) as usize))
                .collect();
            for ((m, _, off, _), buf) in loads.iter().zip(load_bufs.iter_mut()) {
                per[*m].push(Request::read(*off, &mut buf[..]));
                own[*m].push(usize::MAX);
            }
            // The checksums of what is written are computed, and their pages written, while
            // the data is in flight. Each read is checksummed as it completes: one CRC per
            // range a check covers (its position kept in `check_at`).
            let mut verify: Vec<Vec<Vec<(u64, u64)>>> = per
                .iter()
                .map(|reqs| vec![Vec::new(); reqs.len()])
                .collect();
            for ReadCheck {
                len,
                slot: s,
                req: (ri, in_req),
                ..
            } in &checks
            {
                let r = &mut verify[s.member][*ri];
                check_at.push(r.len());
                r.push((*in_req, *len));
            }
            let (f, crcs) =
                self.run_with_sums(devs, &mut per, &mut page_store, &verify, Vec::new(), || {
                    let mut sums = Vec::new();
                    for (targets, block, b) in &crc_src {
                        let crcs = csum::crcs_iov(b, 0, b.iter().map(|x| x.len()).sum());
                        for &(m, slab) in targets {
                            sums.push((m, slab, *block, crcs.clone()));
                        }
                    }
                    sums
                });
            failures.extend(f);
            got_crcs = crcs;
            for (m, reqs) in per.iter().enumerate() {
                for (r, &pi) in reqs.iter().zip(&own[m]) {
                    if let Err(e) = r.result() {
                        failures.push((m, e));
                        if pi != usize::MAX {
                            retry[pi] = true;
                        }
                    }
                }
            }
        }
        let failed: BTreeSet<usize> = failures.iter().map(|f| f.0).collect();
        let pages: Vec<(usize, u64, Vec<u8>)> = loads
            .into_iter()
            .zip(load_bufs)
            .filter(|((m, ..), _)| !failed.contains(m))
            .flat_map(|((m, first, _, _), buf)| {
                buf.chunks_exact(csum::PAGE as usize)
                    .enumerate()
                    .map(|(k, page)| (m, first + k as u64, page.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
        if let Some(drops) = loads_drops {
            self.pool.csums.insert(pages, drops);
        }
        // Verify what was read; a block whose checksum fails is healed and read again.
        for (check, k) in checks.into_iter().zip(check_at) {
            let ReadCheck {
                parent: pi,
                at,
                len,
                slot: s,
                in_slab,
                extent,
                req: (ri, _),
            } = check;
            // Every piece of a request is checked, also after one failed: all its bad windows
            // are healed in one round (a member that lost its contents has one in every piece).
            if errors[pi].is_some() {
                continue;
            }
            let Op::Read { bufs, .. } = &seg[pi].op else {
                continue;
            };
            let Some(dev) = devs[s.member].as_ref() else {
                continue;
            };
            let want = match self.pool.csums.get(
                &**dev,
                s.member,
                s.slab,
                in_slab / csum::BLOCK,
                len / csum::BLOCK,
            ) {
                Ok(w) => w,
                Err(e) => {
                    failures.push((s.member, e));
                    retry[pi] = true;
                    continue;
                }
            };
            // One CRC over the range against the joined stored checksums; only a range that
            // differs is checked block by block.
            let whole = got_crcs
                .get(s.member)
                .and_then(|v| v.get(ri))
                .and_then(Option::as_ref)
                .and_then(|v| v.get(k).copied())
                .unwrap_or_else(|| csum::crc_iov(bufs, at as usize, len as usize));
            if whole == csum::joined(&want) {
                continue;
            }
            let got = csum::crcs_iov(bufs, at as usize, len as usize);
            for (b, (g, w)) in got.iter().zip(&want).enumerate() {
                if g != w {
                    let off = in_slab + b as u64 * csum::BLOCK;
                    if let Some(good) = self.pool.healed_block(s, off) {
                        if let Op::Read { bufs, .. } = &mut seg[pi].op {
                            copy_into_bufs(bufs, (at + b as u64 * csum::BLOCK) as usize, &good);
                        }
                        continue;
                    }
                    heal.push(Heal {
                        extent,
                        window: off - off % csum::PAGE,
                        parent: pi,
                    });
                    retry[pi] = true;
                }
            }
        }
        for (pi, req) in seg.iter_mut().enumerate() {
            if direct[pi] && !retry[pi] {
                req.complete(errors[pi].take().map_or(Ok(()), Err));
            }
        }
        if !slow.is_empty() {
            self.slow(
                seg,
                &slow,
                devs,
                &ext,
                rebuilding.as_ref(),
                &mut failures,
                heal,
            );
        }
        Some(failures)
    }
}
