//! The parity path: parity writes and degraded parity reads, a row at a time under the row's
//! stripe lock: read what the row needs, verify it, rebuild lost shards, apply the writes,
//! recompute the parity from the whole data of the row, journal what the journal needs
//! ([`write_rows`](Space::write_rows)), write.

use super::heal::Heal;
use super::sums::{CrcSource, OVERLAP_MIN};
use super::*;

/// The parity of a row written from the callers' buffers, encoded on the checksum thread
/// while the data is in flight ([`Space::row_io`]), then written with its checksums.
pub(crate) struct LateParity<'a> {
    /// The row's data shards (the callers' buffers).
    pub(super) data: &'a [&'a [u8]],
    /// The parity shards, to encode.
    pub(super) parity: Vec<AlignedBuf>,
    /// Per parity shard: where it goes (member, offset, slab).
    pub(super) dests: Vec<Vec<(usize, u64, u32)>>,
    /// The first checksum block of the row's shards in their slabs.
    pub(super) block: u64,
}

/// One row of a parity extent touched by the parity path.
pub(crate) struct RowOp {
    pub extent: u64,
    pub row: u64,
    pub lo: u64,
    pub hi: u64,
    pub pieces: Vec<(usize, Piece, bool)>,
    pub shards: Vec<Option<AlignedBuf>>,
    pub rebuild: bool,
    /// Every data column of `[lo, hi)` is written: the parity depends on the new data only
    /// (the journal may skip the row).
    pub full: bool,
    /// A full-stripe write of single requests' contiguous buffers: the data shards are written
    /// and encoded from the callers' buffers, with no copy and no read. Never a row the journal
    /// must log (its record would need the data shards).
    pub direct: bool,
}

/// The `len` bytes at `at` of a write request's data, if they lie in one of its buffers.
pub(super) fn write_slice<'r>(req: &'r Request<'_>, at: u64, len: u64) -> Option<&'r [u8]> {
    let Op::Write { bufs, .. } = &req.op else {
        return None;
    };
    let (mut at, len) = (at as usize, len as usize);
    for b in bufs.iter() {
        if at < b.len() {
            return b.get(at..at + len);
        }
        at -= b.len();
    }
    None
}

/// Whether the write pieces of data column `col` cover `[lo, hi)`.
pub(super) fn covered(pieces: &[(usize, Piece, bool)], col: usize, lo: u64, hi: u64) -> bool {
    let mut iv: Vec<(u64, u64)> = pieces
        .iter()
        .filter(|(_, p, w)| *w && p.col == col)
        .map(|(_, p, _)| (p.in_unit, p.in_unit + p.len))
        .collect();
    iv.sort_unstable();
    let mut reach = lo;
    for (a, b) in iv {
        if a > reach {
            return false;
        }
        reach = reach.max(b);
    }
    reach >= hi
}

impl Space {
    pub(crate) fn shard_slot(&self, row: u64, shard: usize) -> usize {
        let l = &self.shared.layout;
        if shard < l.data_columns {
            l.data_slot(row, shard, 0)
        } else {
            l.parity_slot(row, shard - l.data_columns)
        }
    }

    /// Parity writes and degraded parity reads, a row at a time under the row's stripe lock.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn slow(
        &self,
        seg: &mut [Request<'_>],
        parents: &[usize],
        devs: &Devs,
        ext: &[Option<Vec<Slot>>],
        rebuilding: Option<&Rebuild>,
        failures: &mut Vec<(usize, Error)>,
        heal: &mut Vec<Heal>,
    ) {
        let layout = self.shared.layout;
        let (d, w) = (layout.data_columns, layout.width);
        let mut rows: BTreeMap<(u64, u64), RowOp> = BTreeMap::new();
        let mut zero_reads: Vec<(usize, Piece)> = Vec::new();
        for &pi in parents {
            let req = &seg[pi];
            let is_write = matches!(req.op, Op::Write { .. });
            for p in layout.pieces(req.offset(), req.len()) {
                if ext[p.extent as usize].is_none() {
                    // Writes were allocated before; a read of a thin hole is zeroes.
                    zero_reads.push((pi, p));
                    continue;
                }
                let r = rows.entry((p.extent, p.row)).or_insert_with(|| RowOp {
                    extent: p.extent,
                    row: p.row,
                    lo: p.in_unit,
                    hi: p.in_unit + p.len,
                    pieces: Vec::new(),
                    shards: Vec::new(),
                    rebuild: false,
                    full: false,
                    direct: false,
                });
                r.lo = r.lo.min(p.in_unit);
                r.hi = r.hi.max(p.in_unit + p.len);
                r.pieces.push((pi, p, is_write));
            }
        }
        let mut stripe_ids: Vec<usize> = rows
            .keys()
            .map(|&(e, r)| {
                (e.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ r.wrapping_mul(0xc2b2_ae3d_27d4_eb4f))
                    as usize
                    % STRIPES
            })
            .collect();
        stripe_ids.sort_unstable();
        stripe_ids.dedup();
        let _locks: Vec<_> = stripe_ids
            .iter()
            .map(|&i| guard(&self.shared.stripes[i]))
            .collect();

        // Plan and issue the reads each row needs.
        for row in rows.values_mut() {
            let slots = ext[row.extent as usize].as_ref().expect("allocated");
            let usable =
                |shard: usize| devs[slots[self.shard_slot(row.row, shard)].member].is_some();
            let len = (row.hi - row.lo) as usize;
            let writes = row.pieces.iter().any(|x| x.2);
            let mut need = vec![false; d];
            if writes {
                for (c, n) in need.iter_mut().enumerate() {
                    *n = !covered(&row.pieces, c, row.lo, row.hi);
                }
            }
            for (_, p, wr) in &row.pieces {
                if !wr {
                    need[p.col] = true;
                }
            }
            row.shards = (0..w).map(|_| None).collect();
            row.full = writes && !need.iter().any(|&n| n);
            row.rebuild = (0..d).any(|c| need[c] && !usable(c));
            // A row the journal logs needs its data shards in buffers of its own.
            row.direct = writes
                && !self
                    .pool
                    .journal
                    .row_logged(self.shared.id, row.extent, row.row)
                && (0..d).all(|c| {
                    let mut of_col = row.pieces.iter().filter(|x| x.1.col == c);
                    match (of_col.next(), of_col.next()) {
                        (Some((pi, p, true)), None) => {
                            p.in_unit == row.lo
                                && p.in_unit + p.len == row.hi
                                && write_slice(&seg[*pi], p.at, p.len).is_some()
                        }
                        _ => false,
                    }
                });
            let rebuild = row.rebuild;
            for (s, shard) in row.shards.iter_mut().enumerate() {
                if (rebuild && usable(s)) || (!rebuild && s < d && need[s]) {
                    *shard = Some(self.take_buf(len));
                }
            }
        }
        if !self.row_io(
            &mut rows,
            &BTreeMap::new(),
            devs,
            ext,
            None,
            failures,
            false,
        ) {
            self.give_rows(rows);
            return;
        }
        // Verify every shard read: a bad block is healed first (by the caller, with the
        // space's I/O held off) and the rows run again, so a bad block is never carried into
        // a parity or a reconstruction.
        let before = (heal.len(), failures.len());
        for row in rows.values_mut() {
            let slots = ext[row.extent as usize].as_ref().expect("allocated");
            let in_slab = layout.slab_offset(row.row, row.lo);
            let n = (row.hi - row.lo) / csum::BLOCK;
            for (shard, buf) in row.shards.iter_mut().enumerate() {
                let Some(buf) = buf else { continue };
                let s = slots[self.shard_slot(row.row, shard)];
                let Some(dev) = devs[s.member].as_ref() else {
                    continue;
                };
                let want =
                    match self
                        .pool
                        .csums
                        .get(&**dev, s.member, s.slab, in_slab / csum::BLOCK, n)
                    {
                        Ok(w) => w,
                        Err(e) => {
                            failures.push((s.member, e));
                            continue;
                        }
                    };
                if csum::crc_iov(&[&buf[..]], 0, buf.len()) == csum::joined(&want) {
                    continue;
                }
                for (b, (g, w)) in csum::crcs(buf).iter().zip(&want).enumerate() {
                    if g != w {
                        let off = in_slab + b as u64 * csum::BLOCK;
                        if let Some(good) = self.pool.healed_block(s, off) {
                            let at = b * csum::BLOCK as usize;
                            buf[at..at + csum::BLOCK as usize].copy_from_slice(&good);
                            continue;
                        }
                        for (pi, _, _) in &row.pieces {
                            heal.push(Heal {
                                extent: row.extent,
                                window: off - off % csum::PAGE,
                                parent: *pi,
                            });
                        }
                    }
                }
            }
        }
        if (heal.len(), failures.len()) != before {
            self.give_rows(rows);
            return;
        }
        // Rebuild, apply the writes, recompute parity.
        for row in rows.values_mut().filter(|r| !r.direct) {
            let len = (row.hi - row.lo) as usize;
            if row.rebuild && !self.rebuild_row(&mut row.shards, d, len) {
                for (pi, _, _) in &row.pieces {
                    seg[*pi].complete(Err(self.failed(format!(
                        "extent {} row {} cannot be rebuilt",
                        row.extent, row.row
                    ))));
                }
                row.shards.iter_mut().for_each(|s| self.give_buf(s.take()));
                continue;
            }
            let writes = row.pieces.iter().any(|x| x.2);
            for (pi, p, wr) in &row.pieces {
                if *wr {
                    if row.shards[p.col].is_none() {
                        row.shards[p.col] = Some(self.take_buf(len));
                    }
                    let shard = row.shards[p.col].as_mut().expect("just set");
                    let at = (p.in_unit - row.lo) as usize;
                    if let Op::Write { bufs, .. } = &seg[*pi].op {
                        copy_from_bufs(bufs, p.at as usize, &mut shard[at..at + p.len as usize]);
                    }
                }
            }
            for (pi, p, wr) in &row.pieces {
                if !*wr {
                    let at = (p.in_unit - row.lo) as usize;
                    let src = row.shards[p.col].as_deref().expect("read or rebuilt");
                    if let Op::Read { bufs, .. } = &mut seg[*pi].op {
                        copy_into_bufs(bufs, p.at as usize, &src[at..at + p.len as usize]);
                    }
                }
            }
            if writes {
                for s in row.shards[d..].iter_mut().filter(|s| s.is_none()) {
                    *s = Some(self.take_buf(len));
                }
                let (data, par) = row.shards.split_at_mut(d);
                let data: Vec<&[u8]> = data.iter().map(|s| s.as_deref().expect("data")).collect();
                let mut par: Vec<&mut [u8]> = par
                    .iter_mut()
                    .map(|s| &mut s.as_mut().expect("just set")[..])
                    .collect();
                code::encode(&data, &mut par);
                // Keep only what is written: the written data columns and every parity.
                let written: Vec<bool> = (0..w)
                    .map(|s| s >= d || row.pieces.iter().any(|x| x.2 && x.1.col == s))
                    .collect();
                for (s, sh) in row.shards.iter_mut().enumerate() {
                    if !written[s] {
                        self.give_buf(sh.take());
                    }
                }
            } else {
                row.shards.iter_mut().for_each(|s| self.give_buf(s.take()));
            }
        }
        // Full-stripe rows: the parity straight from the callers' buffers.
        let direct: BTreeMap<(u64, u64), Vec<&[u8]>> = rows
            .iter()
            .filter(|(_, r)| r.direct)
            .map(|(k, r)| {
                let data = (0..d)
                    .map(|c| {
                        let (pi, p, _) = r.pieces.iter().find(|x| x.1.col == c).expect("planned");
                        write_slice(&seg[*pi], p.at, p.len).expect("checked")
                    })
                    .collect();
                (*k, data)
            })
            .collect();
        // Their parity buffers; `row_io` encodes them (beside the data's writes when it can).
        for k in direct.keys() {
            let row = rows.get_mut(k).expect("planned");
            let len = (row.hi - row.lo) as usize;
            for s in row.shards[d..].iter_mut() {
                *s = Some(self.take_buf(len));
            }
        }
        // The journal (if the pool has one) goes first; it gives the rows back.
        let wrote = self.write_rows(rows, &direct, devs, ext, rebuilding, failures);
        drop(direct);
        if !wrote {
            // Reads of the batch are done; the writes run again without the failed member.
            for &pi in parents {
                if matches!(seg[pi].op, Op::Read { .. }) && !seg[pi].is_complete() {
                    seg[pi].complete(Ok(()));
                }
            }
            return;
        }
        for (pi, p) in zero_reads {
            if let Op::Read { bufs, .. } = &mut seg[pi].op {
                copy_into_bufs(bufs, p.at as usize, &vec![0u8; p.len as usize]);
            }
        }
        for &pi in parents {
            if !seg[pi].is_complete() {
                seg[pi].complete(Ok(()));
            }
        }
    }

    /// A page-aligned buffer of `len` bytes (so O_DIRECT members need no bounce copy),
    /// recycled when one of that size is at hand: a fresh large allocation faults every page
    /// in, which costs more than the parity arithmetic. Its contents are unspecified: every
    /// caller fills it whole (a read, writes that cover it, or the parity).
    pub(crate) fn take_buf(&self, len: usize) -> AlignedBuf {
        let mut pool = guard(&self.shared.bufs);
        match pool.iter().position(|b| b.len() == len) {
            Some(i) => pool.swap_remove(i),
            None => AlignedBuf::new(len),
        }
    }

    /// Rebuilds the lost shards of a row (the degraded path: copies through `Vec`s).
    pub(super) fn rebuild_row(
        &self,
        shards: &mut [Option<AlignedBuf>],
        d: usize,
        len: usize,
    ) -> bool {
        let mut v: Vec<Option<Vec<u8>>> = shards
            .iter()
            .map(|s| s.as_deref().map(<[u8]>::to_vec))
            .collect();
        if !code::reconstruct(&mut v, d, len) {
            return false;
        }
        for (s, r) in shards.iter_mut().zip(v) {
            if s.is_none() {
                let mut b = self.take_buf(len);
                b.copy_from_slice(&r.expect("rebuilt"));
                *s = Some(b);
            }
        }
        true
    }

    pub(super) fn give_buf(&self, buf: Option<AlignedBuf>) {
        if let Some(b) = buf {
            let mut pool = guard(&self.shared.bufs);
            if pool.len() < 256 {
                pool.push(b);
            }
        }
    }

    pub(crate) fn give_rows(&self, rows: BTreeMap<(u64, u64), RowOp>) {
        for row in rows.into_values() {
            for s in row.shards {
                self.give_buf(s);
            }
        }
    }

    /// Reads into (or writes from) every shard buffer of the rows, skipping unusable members.
    /// Returns false (and adds the failures) if a member failed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn row_io(
        &self,
        rows: &mut BTreeMap<(u64, u64), RowOp>,
        direct: &BTreeMap<(u64, u64), Vec<&[u8]>>,
        devs: &Devs,
        ext: &[Option<Vec<Slot>>],
        rebuilding: Option<&Rebuild>,
        failures: &mut Vec<(usize, Error)>,
        write: bool,
    ) -> bool {
        let layout = self.shared.layout;
        let n = devs.len();
        // Written shards whose checksums go to (member, slab)s: targets, first block, data.
        let mut crc_src: Vec<CrcSource<&[u8]>> = Vec::new();
        // Checksum pages a small batch sends with its data.
        let mut page_store: Vec<PageWrite> = Vec::new();
        let mut per: Vec<Vec<Request<'_>>> = (0..n).map(|_| Vec::new()).collect();
        let d = layout.data_columns;
        // Rows written from the callers' buffers have their parity encoded here: beside the
        // data's writes (on the checksum thread) when the batch is large enough to overlap,
        // else now.
        let direct_bytes: u64 = rows
            .iter()
            .filter(|(k, _)| direct.contains_key(k))
            .map(|(_, r)| (r.hi - r.lo) * layout.width as u64)
            .sum();
        let overlap_parity = write && direct_bytes >= OVERLAP_MIN;
        let mut late: Vec<LateParity<'_>> = Vec::new();
        for (key, row) in rows.iter_mut() {
            let slots = ext[row.extent as usize].as_ref().expect("allocated");
            let off = layout.slab_offset(row.row, row.lo);
            if write {
                let shadows = match rebuilding {
                    Some((e, t)) if *e == row.extent => &t[..],
                    _ => &[],
                };
                let given = direct.get(key);
                if let Some(data) = given {
                    let mut parity: Vec<AlignedBuf> = row.shards[d..]
                        .iter_mut()
                        .map(|s| s.take().expect("allocated by the caller"))
                        .collect();
                    if overlap_parity {
                        let dests = (d..layout.width)
                            .map(|shard| {
                                let si = self.shard_slot(row.row, shard);
                                let mut t = Vec::new();
                                if let Some(&(_, new)) = shadows.iter().find(|x| x.0 == si) {
                                    t.push((new.member, self.phys(new, off), new.slab));
                                }
                                let s = slots[si];
                                if devs[s.member].is_some() {
                                    t.push((s.member, self.phys(s, off), s.slab));
                                }
                                t
                            })
                            .collect();
                        late.push(LateParity {
                            data,
                            parity,
                            dests,
                            block: off / csum::BLOCK,
                        });
                    } else {
                        let mut par: Vec<&mut [u8]> =
                            parity.iter_mut().map(|b| &mut b[..]).collect();
                        code::encode(data, &mut par);
                        for (s, b) in row.shards[d..].iter_mut().zip(parity) {
                            *s = Some(b);
                        }
                    }
                }
                for (shard, buf) in row.shards.iter().enumerate() {
                    let buf: &[u8] = match (given.and_then(|g| g.get(shard)), buf) {
                        (Some(g), _) => g,
                        (None, Some(b)) => b,
                        (None, None) => continue,
                    };
                    let si = self.shard_slot(row.row, shard);
                    let mut targets = Vec::new();
                    if let Some(&(_, new)) = shadows.iter().find(|x| x.0 == si) {
                        // The slab being rebuilt gets the write too.
                        append_write(&mut per[new.member], self.phys(new, off), buf);
                        targets.push((new.member, new.slab));
                    }
                    let s = slots[si];
                    if devs[s.member].is_some() {
                        append_write(&mut per[s.member], self.phys(s, off), buf);
                        targets.push((s.member, s.slab));
                    }
                    crc_src.push((targets, off / csum::BLOCK, buf));
                }
                continue;
            }
            for (shard, buf) in row.shards.iter_mut().enumerate() {
                let Some(buf) = buf else { continue };
                let s = slots[self.shard_slot(row.row, shard)];
                if devs[s.member].is_some() {
                    per[s.member].push(Request::read(self.phys(s, off), &mut buf[..]));
                }
            }
        }
        let before = failures.len();
        // The checksums of what is written are computed, and their pages written, while the
        // shards are in flight.
        let (f, _) = self.run_with_sums(devs, &mut per, &mut page_store, &[], late, || {
            let mut sums = Vec::new();
            for (targets, block, buf) in &crc_src {
                let crcs = csum::crcs(buf);
                for &(m, slab) in targets {
                    sums.push((m, slab, *block, crcs.clone()));
                }
            }
            sums
        });
        failures.extend(f);
        for (m, reqs) in per.iter().enumerate() {
            for r in reqs {
                if let Err(e) = r.result() {
                    failures.push((m, e));
                }
            }
        }
        failures.len() == before
    }
}

impl Space {
    /// The in-place writes of a parity batch's rows, journaled first (see the module
    /// documentation). Returns false (and adds the failures) if a member failed; the rows are
    /// given back either way.
    pub(crate) fn write_rows(
        &self,
        rows: BTreeMap<(u64, u64), RowOp>,
        direct: &BTreeMap<(u64, u64), Vec<&[u8]>>,
        devs: &Devs,
        ext: &[Option<Vec<crate::format::Slot>>],
        rebuilding: Option<&Rebuild>,
        failures: &mut Vec<(usize, Error)>,
    ) -> bool {
        let journal = &self.pool.journal;
        let mut rows = rows;
        if !journal.enabled() {
            let ok = self.row_io(&mut rows, direct, devs, ext, rebuilding, failures, true);
            self.give_rows(rows);
            return ok;
        }
        let id = self.shared.id;
        let width = self.shared.layout.width;
        // Which rows need records, and what each costs the members it touches.
        let logged: Vec<bool> = rows
            .values()
            .map(|r| {
                r.shards.iter().any(Option::is_some)
                    && (!r.full || journal.row_logged(id, r.extent, r.row))
            })
            .collect();
        debug_assert!(
            rows.values().zip(&logged).all(|(r, &l)| !(l && r.direct)),
            "a row written from the callers' buffers has no data shards to log"
        );
        let member_of = |r: &RowOp, shard: usize| {
            let slots = ext[r.extent as usize].as_ref().expect("allocated");
            let m = slots[self.shard_slot(r.row, shard)].member;
            devs[m].is_some().then_some(m)
        };
        let cap = JOURNAL_SIZE - journal::PAGE;
        let mut used: BTreeMap<usize, u64> = BTreeMap::new();
        let mut whole = true;
        for (r, &lg) in rows.values().zip(&logged) {
            if !lg {
                continue;
            }
            for shard in (0..width).filter(|&s| r.shards[s].is_some()) {
                if let Some(m) = member_of(r, shard) {
                    *used.entry(m).or_default() += journal::RECORD_HEADER + (r.hi - r.lo);
                }
            }
        }
        if used.values().any(|&p| journal::block_bytes(p) > cap) {
            whole = false;
        }
        // Parts: each journaled and written before the next. One part in the common case.
        let mut parts: Vec<BTreeMap<(u64, u64), RowOp>> = Vec::new();
        let mut part_logged: Vec<Vec<(u64, u64)>> = Vec::new();
        if whole {
            part_logged.push(
                rows.keys()
                    .zip(&logged)
                    .filter(|(_, &l)| l)
                    .map(|(k, _)| *k)
                    .collect(),
            );
            parts.push(rows);
        } else {
            let mut cur: BTreeMap<(u64, u64), RowOp> = BTreeMap::new();
            let mut cur_logged = Vec::new();
            let mut used: BTreeMap<usize, u64> = BTreeMap::new();
            for ((key, row), lg) in rows.into_iter().zip(logged) {
                let units: Vec<(u64, u64)> = if lg && row.hi - row.lo > journal::MAX_UNIT {
                    (row.lo..row.hi)
                        .step_by(journal::MAX_UNIT as usize)
                        .map(|a| (a, (a + journal::MAX_UNIT).min(row.hi)))
                        .collect()
                } else {
                    vec![(row.lo, row.hi)]
                };
                let single = units.len() == 1;
                let mut row = Some(row);
                for (a, b) in units {
                    let r = row.as_ref().expect("row");
                    let unit = if single {
                        row.take().expect("row")
                    } else {
                        RowOp {
                            extent: r.extent,
                            row: r.row,
                            lo: a,
                            hi: b,
                            pieces: Vec::new(),
                            shards: r
                                .shards
                                .iter()
                                .map(|s| {
                                    s.as_ref().map(|s| {
                                        let mut n = self.take_buf((b - a) as usize);
                                        n.copy_from_slice(
                                            &s[(a - r.lo) as usize..(b - r.lo) as usize],
                                        );
                                        n
                                    })
                                })
                                .collect(),
                            rebuild: r.rebuild,
                            full: r.full,
                            direct: false,
                        }
                    };
                    let mut cost: BTreeMap<usize, u64> = BTreeMap::new();
                    if lg {
                        for shard in (0..width).filter(|&s| unit.shards[s].is_some()) {
                            if let Some(m) = member_of(&unit, shard) {
                                *cost.entry(m).or_default() += journal::RECORD_HEADER + (b - a);
                            }
                        }
                    }
                    let over = cost.iter().any(|(m, c)| {
                        journal::block_bytes(used.get(m).copied().unwrap_or(0) + c) > cap
                    });
                    if !cur.is_empty() && (over || cur.contains_key(&key)) {
                        parts.push(std::mem::take(&mut cur));
                        part_logged.push(std::mem::take(&mut cur_logged));
                        used.clear();
                    }
                    for (m, c) in cost {
                        *used.entry(m).or_default() += c;
                    }
                    if lg {
                        cur_logged.push(key);
                    }
                    cur.insert(key, unit);
                }
                if let Some(r) = row {
                    self.give_rows(BTreeMap::from([(key, r)]));
                }
            }
            if !cur.is_empty() {
                parts.push(cur);
                part_logged.push(cur_logged);
            }
        }
        let mut ok = true;
        for (mut part, keys) in parts.into_iter().zip(part_logged) {
            if !ok {
                self.give_rows(part);
                continue;
            }
            let ticket = if keys.is_empty() {
                None
            } else {
                let mut entries = Vec::new();
                for k in &keys {
                    let r = &part[k];
                    for (shard, buf) in r.shards.iter().enumerate() {
                        let Some(buf) = buf else { continue };
                        if let Some(m) = member_of(r, shard) {
                            entries.push(journal::Entry {
                                member: m,
                                extent: r.extent,
                                row: r.row,
                                shard: shard as u32,
                                lo: r.lo,
                                data: &buf[..],
                            });
                        }
                    }
                }
                match journal.log(devs, id, &entries, &keys) {
                    Ok(t) => Some(t),
                    Err(f) => {
                        failures.push(f);
                        ok = false;
                        drop(entries);
                        self.give_rows(part);
                        continue;
                    }
                }
            };
            ok = self.row_io(&mut part, direct, devs, ext, rebuilding, failures, true);
            drop(ticket);
            self.give_rows(part);
        }
        ok
    }
}
