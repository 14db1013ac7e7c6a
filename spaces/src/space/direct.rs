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
    /// Its range's index among the ranges of that request checksummed as it completed.
    range: usize,
}

/// What the direct path does with one request of a segment.
#[derive(Default)]
struct Fate {
    /// It goes by the direct path (not the parity path).
    direct: bool,
    /// It fails with this once the pass is over.
    error: Option<Error>,
    /// A member it touched failed, or a block it read is to be healed: it runs again.
    retry: bool,
}

/// The direct path's plan of a segment: one batch per member, and what to do once they are
/// done.
struct Plan<'a> {
    /// Per member, its requests.
    per: Vec<Vec<Request<'a>>>,
    /// Per member, for each of its requests the segment's request it serves (`usize::MAX`:
    /// a read of checksum pages).
    own: Vec<Vec<usize>>,
    /// Written pieces whose checksums go to (member, slab)s: targets, first block, data.
    crc_src: Vec<CrcSource<vstor_core::WriteBufs<'a>>>,
    /// Reads to verify once done.
    checks: Vec<ReadCheck>,
    /// Requests for the parity path.
    slow: Vec<usize>,
}

/// Checksum pages the reads need that are not cached: read in the same batches as the data.
#[derive(Default)]
struct PageLoads {
    /// Runs of adjacent pages: (member, first page, its offset on the member, pages).
    runs: Vec<(usize, u64, u64, u64)>,
    /// A buffer per run.
    bufs: Vec<AlignedBuf>,
    /// The cache's drop count before any of these pages is read.
    drops: Option<u64>,
}

impl PageLoads {
    /// The pages `checks` need that `csums` does not hold, adjacent pages of a member in one
    /// read each.
    fn plan(csums: &csum::Csums, checks: &[ReadCheck]) -> Self {
        let mut loads = PageLoads::default();
        let mut wanted = BTreeSet::new();
        let mut wanted_at: Vec<(usize, u64, u64)> = Vec::new();
        for ReadCheck {
            len,
            slot: s,
            in_slab,
            ..
        } in checks
        {
            let (missing, drops) =
                csums.missing(s.member, s.slab, in_slab / csum::BLOCK, len / csum::BLOCK);
            // The cache's drop count before any of these pages is read.
            loads.drops.get_or_insert(drops);
            for (page, off) in missing {
                if wanted.insert((s.member, page)) {
                    wanted_at.push((s.member, page, off));
                }
            }
        }
        wanted_at.sort_unstable();
        for (m, page, off) in wanted_at {
            match loads.runs.last_mut() {
                Some((lm, first, loff, n))
                    if *lm == m && *first + *n == page && *loff + *n * csum::PAGE == off =>
                {
                    *n += 1
                }
                _ => loads.runs.push((m, page, off, 1)),
            }
        }
        loads.bufs = loads
            .runs
            .iter()
            .map(|l| AlignedBuf::new((l.3 * csum::PAGE) as usize))
            .collect();
        loads
    }

    /// Puts the pages read into the cache, but those of members that failed.
    fn install(self, csums: &csum::Csums, failures: &[(usize, Error)]) {
        let failed: BTreeSet<usize> = failures.iter().map(|f| f.0).collect();
        let pages: Vec<(usize, u64, Vec<u8>)> = self
            .runs
            .into_iter()
            .zip(self.bufs)
            .filter(|((m, ..), _)| !failed.contains(m))
            .flat_map(|((m, first, _, _), buf)| {
                buf.chunks_exact(csum::PAGE as usize)
                    .enumerate()
                    .map(|(k, page)| (m, first + k as u64, page.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
        if let Some(drops) = self.drops {
            csums.insert(pages, drops);
        }
    }
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
    /// One pass over the incomplete requests: the direct path is planned ([`Space::plan`]),
    /// run with its checksums ([`Space::execute`]) and its reads verified
    /// ([`Space::verify`]); the rest goes to the parity path. Completes what succeeded;
    /// leaves incomplete what a member failure touched; returns the failures. `None`, with
    /// nothing done, if writes are left and the extent map is no longer at `version`.
    pub(super) fn run_once(
        &self,
        seg: &mut [Request<'_>],
        devs: &Devs,
        heal: &mut Vec<Heal>,
        version: Option<u64>,
    ) -> Option<Vec<(usize, Error)>> {
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
        let mut fates: Vec<Fate> = (0..seg.len()).map(|_| Fate::default()).collect();
        let mut failures = Vec::new();
        let mut loads;
        // Checksum pages a small batch sends with its data.
        let mut page_store: Vec<PageWrite> = Vec::new();
        let (checks, slow, got_crcs) = {
            let mut plan = self.plan(seg, devs, &ext, rebuilding.as_ref(), &mut fates);
            loads = PageLoads::plan(&self.pool.csums, &plan.checks);
            for ((m, _, off, _), buf) in loads.runs.iter().zip(loads.bufs.iter_mut()) {
                plan.per[*m].push(Request::read(*off, &mut buf[..]));
                plan.own[*m].push(usize::MAX);
            }
            let got_crcs =
                self.execute(&mut plan, &mut page_store, devs, &mut fates, &mut failures);
            (plan.checks, plan.slow, got_crcs)
        };
        loads.install(&self.pool.csums, &failures);
        self.verify(
            seg,
            devs,
            checks,
            &got_crcs,
            &mut fates,
            &mut failures,
            heal,
        );
        for (req, fate) in seg.iter_mut().zip(&mut fates) {
            if fate.direct && !fate.retry {
                req.complete(fate.error.take().map_or(Ok(()), Err));
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

    /// Plans the direct path of the incomplete requests: a read from one usable copy
    /// (rotating by row), a write to every usable copy and to the slab being rebuilt, pieces
    /// next to each other on a member merged. Parity writes, and parity reads with a data
    /// member lost, are left to the parity path.
    fn plan<'a>(
        &self,
        seg: &'a mut [Request<'_>],
        devs: &Devs,
        ext: &[Option<Vec<Slot>>],
        rebuilding: Option<&Rebuild>,
        fates: &mut [Fate],
    ) -> Plan<'a> {
        let layout = self.shared.layout;
        let n = devs.len();
        let parity = layout.parities() > 0;
        let k = layout.copies();
        let mut plan = Plan {
            per: (0..n).map(|_| Vec::new()).collect(),
            own: (0..n).map(|_| Vec::new()).collect(),
            crc_src: Vec::new(),
            checks: Vec::new(),
            slow: Vec::new(),
        };
        let Plan {
            per,
            own,
            crc_src,
            checks,
            slow,
        } = &mut plan;
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
            fates[pi].direct = true;
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
                                let at =
                                    push_read(&mut per[s.member], &mut own[s.member], pi, off, b);
                                checks.push(ReadCheck {
                                    parent: pi,
                                    at: p.at,
                                    len: p.len,
                                    slot: s,
                                    in_slab,
                                    extent: p.extent,
                                    req: at,
                                    range: 0,
                                });
                            }
                            None => {
                                fates[pi].error = Some(self.failed(format!(
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
                            fates[pi].error =
                                Some(self.failed(format!("extent {} is not allocated", p.extent)));
                            continue;
                        };
                        let shadows = match rebuilding {
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
        plan
    }

    /// Runs the plan's batches with the checksums of what they write
    /// ([`Space::run_with_sums`]), each read checksummed as it completes; records the
    /// failures and the requests they touched. Returns those checksums (per member, per
    /// request).
    fn execute<'a>(
        &self,
        plan: &mut Plan<'a>,
        page_store: &'a mut Vec<PageWrite>,
        devs: &Devs,
        fates: &mut [Fate],
        failures: &mut Vec<(usize, Error)>,
    ) -> Vec<Vec<Option<Vec<u32>>>> {
        // The checksums of what is written are computed, and their pages written, while
        // the data is in flight. Each read is checksummed as it completes: one CRC per
        // range a check covers (its position kept in the check).
        let mut verify: Vec<Vec<Vec<(u64, u64)>>> = plan
            .per
            .iter()
            .map(|reqs| vec![Vec::new(); reqs.len()])
            .collect();
        for c in &mut plan.checks {
            let r = &mut verify[c.slot.member][c.req.0];
            c.range = r.len();
            r.push((c.req.1, c.len));
        }
        let crc_src = &plan.crc_src;
        let (f, crcs) =
            self.run_with_sums(devs, &mut plan.per, page_store, &verify, Vec::new(), || {
                let mut sums = Vec::new();
                for (targets, block, b) in crc_src {
                    let crcs = csum::crcs_iov(b, 0, b.iter().map(|x| x.len()).sum());
                    for &(m, slab) in targets {
                        sums.push((m, slab, *block, crcs.clone()));
                    }
                }
                sums
            });
        failures.extend(f);
        for (m, reqs) in plan.per.iter().enumerate() {
            for (r, &pi) in reqs.iter().zip(&plan.own[m]) {
                if let Err(e) = r.result() {
                    failures.push((m, e));
                    if pi != usize::MAX {
                        fates[pi].retry = true;
                    }
                }
            }
        }
        crcs
    }

    /// Verifies what the direct path read against the stored checksums; a block whose
    /// checksum fails is healed ([`heal`](super::heal)) and its request read again.
    #[allow(clippy::too_many_arguments)]
    fn verify(
        &self,
        seg: &mut [Request<'_>],
        devs: &Devs,
        checks: Vec<ReadCheck>,
        got_crcs: &[Vec<Option<Vec<u32>>>],
        fates: &mut [Fate],
        failures: &mut Vec<(usize, Error)>,
        heal: &mut Vec<Heal>,
    ) {
        for check in checks {
            let ReadCheck {
                parent: pi,
                at,
                len,
                slot: s,
                in_slab,
                extent,
                req: (ri, _),
                range: k,
            } = check;
            // Every piece of a request is checked, also after one failed: all its bad windows
            // are healed in one round (a member that lost its contents has one in every piece).
            if fates[pi].error.is_some() {
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
                    fates[pi].retry = true;
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
                    fates[pi].retry = true;
                }
            }
        }
    }
}
