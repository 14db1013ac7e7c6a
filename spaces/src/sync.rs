//! Syncing a chunk of an extent: every block of every usable slot checked against its
//! checksum, bad blocks healed from a good copy or the rest of the row, copies and parity made
//! to agree with the data. The resync after a crash, the catch-up of a member, scrub and the
//! extent mover all use it; it takes the checksums, the layout and the devices as arguments.

use crate::code;
use crate::csum::{self, Csums, BLOCK};
use crate::format::{Meta, Slot, CHUNKS_PER_SLAB};
use crate::intent::Chunk;
use crate::layout::{Layout, Resiliency};
use crate::members::Devs;
use std::collections::{BTreeMap, BTreeSet};
use vstor_core::{submit_group, AlignedBuf, BlockDevice, Op, Request, Result};

/// What syncing one chunk of an extent found.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SyncOutcome {
    /// Copies, parity or checksums disagreed with the data and were rewritten.
    pub mismatched: bool,
    /// A data column is lost: the parity could not be checked, or (mirror, simple) no copy
    /// of the column was left to check.
    pub unverifiable: bool,
    /// Blocks whose checksum failed (not counted in a resync).
    pub bad_blocks: u64,
    /// Of those, blocks rewritten from a good source.
    pub healed: u64,
    /// Of those, blocks no good source was left for.
    pub lost: u64,
    /// Blocks whose copies (or parity row) pass their checksums but disagree, where nothing
    /// told which is right (not in a resync): left as they are.
    pub undecided: u64,
}

/// What [`sync_chunk`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncMode {
    /// A scrub or a rebuild: a block that fails its checksum is damage.
    Check,
    /// After an unclean shutdown, over chunks the write-intent bitmap names: a block may fail
    /// its checksum because its write and its checksum's did not both land.
    Resync,
    /// Catching up the member (by index) that missed the writes to the chunk: its contents
    /// are never a source; everything else is as in a resync.
    CatchUp(usize),
}

impl SyncMode {
    fn resync(self) -> bool {
        self != SyncMode::Check
    }

    fn behind(self) -> Option<usize> {
        match self {
            SyncMode::CatchUp(m) => Some(m),
            _ => None,
        }
    }
}

/// Of a parity row whose shards all pass their checksums but do not agree, the one shard
/// whose replacement by what the others give makes the whole row agree (dual parity can tell
/// one odd shard out; with single parity every shard would do, so none is named).
fn odd_shard_out(shards: &[Vec<u8>], d: usize, bs: usize) -> Option<usize> {
    let w = shards.len();
    let mut found = None;
    for j in 0..w {
        let mut row: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
        row[j] = None;
        if !code::reconstruct(&mut row, d, bs) {
            continue;
        }
        let row: Vec<Vec<u8>> = row.into_iter().map(|x| x.expect("rebuilt")).collect();
        let refs: Vec<&[u8]> = row[..d].iter().map(|v| &v[..]).collect();
        let mut parity = vec![vec![0u8; bs]; w - d];
        {
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
            code::encode(&refs, &mut p);
        }
        if parity.iter().zip(&row[d..]).all(|(a, b)| a == b) {
            if found.is_some() {
                return None;
            }
            found = Some(j);
        }
    }
    found
}

/// The extent chunks (space, extent, chunk) that dirty (member, slab, chunk) bits name, of the
/// extents `keep` takes.
pub(crate) fn extent_chunks(
    meta: &Meta,
    dirty: &BTreeSet<Chunk>,
    keep: impl Fn(&[Slot]) -> bool,
) -> BTreeSet<(usize, usize, u64)> {
    let mut owner: BTreeMap<(usize, u32), (usize, usize)> = BTreeMap::new();
    for (si, sp) in meta.spaces.iter().enumerate() {
        for (e, slots) in sp.extents.iter().enumerate() {
            let Some(slots) = slots.as_ref().filter(|s| keep(s)) else {
                continue;
            };
            for s in slots {
                owner.insert((s.member, s.slab), (si, e));
            }
        }
    }
    dirty
        .iter()
        .filter_map(|&(m, slab, c)| owner.get(&(m, slab)).map(|&(s, e)| (s, e, c)))
        .collect()
}

/// [`sync_chunk`] of chunk `c` of extent `e` of space `s` (an entry of [`extent_chunks`]).
pub(crate) fn sync_extent_chunk(
    csums: &Csums,
    meta: &Meta,
    devs: &Devs,
    (s, e, c): (usize, usize, u64),
    mode: SyncMode,
) -> Result<SyncOutcome> {
    let space = &meta.spaces[s];
    let chunk = meta.slab_size / CHUNKS_PER_SLAB;
    sync_chunk(
        csums,
        &space.layout,
        space.extents[e].as_ref().expect("allocated"),
        devs,
        (meta.data_start, meta.slab_size),
        (c * chunk, (c + 1) * chunk),
        mode,
    )
}

/// Makes the copies (mirror) or the parity (parity) of slab bytes `[a, b)` of an extent agree
/// with the data, using the block checksums to tell good from bad: every block of every usable
/// slot is checked; a mirror block is taken from a copy whose checksum matches; a parity
/// layout's bad blocks are rebuilt from the rest of the row when the result matches their
/// checksum, then the parity is recomputed from the data.
///
/// With `resync` (after an unclean shutdown, over chunks the write-intent bitmap names) a
/// block may fail its checksum because its write and its checksum's did not both land: such a
/// block that nothing can rebuild is taken as it is and its checksum rewritten (the write was
/// never acknowledged, so its old or its new contents are both right), and nothing is counted
/// as an error. Without it (scrub, rebuild) such a block is counted as lost and left alone.
pub(crate) fn sync_chunk(
    csums: &Csums,
    layout: &Layout,
    slots: &[Slot],
    devs: &Devs,
    geo: (u64, u64),
    range: (u64, u64),
    mode: SyncMode,
) -> Result<SyncOutcome> {
    let (mut bufs, got) = read_slots(slots, devs, geo, range, &mut Vec::new())?;
    Ok(sync_bufs(
        csums,
        layout,
        slots,
        devs,
        geo,
        range,
        mode,
        (&mut bufs, &got),
    )?
    .0)
}

/// What [`read_slots`] read: per slot of the extent, its buffer (none for a slot whose member
/// is missing) and the CRC-32C of each `PIECE` of it as read ([`csum::crc_iov`]).
pub(crate) type SlotBufs = (Vec<Option<AlignedBuf>>, Vec<Vec<u32>>);

/// Bytes per request of [`read_slots`] (a slot's requests are in flight together).
pub(crate) const PIECE: usize = 1 << 20;

/// Reads slab bytes `[a, b)` of every usable slot of an extent (`None` for the others), the
/// slots' members side by side (one ring), each in `PIECE` requests, checksummed as they arrive, into
/// page-aligned buffers (taken from `spare` when one of the right size is there).
pub(crate) fn read_slots(
    slots: &[Slot],
    devs: &Devs,
    (data_start, slab_size): (u64, u64),
    (a, b): (u64, u64),
    spare: &mut Vec<AlignedBuf>,
) -> Result<SlotBufs> {
    let len = (b - a) as usize;
    let mut bufs: Vec<Option<AlignedBuf>> = slots
        .iter()
        .map(|s| {
            devs[s.member]
                .as_ref()
                .map(|_| match spare.iter().position(|x| x.len() == len) {
                    Some(i) => spare.swap_remove(i),
                    None => AlignedBuf::new(len),
                })
        })
        .collect();
    let mut batches: Vec<(usize, &dyn BlockDevice, Vec<Request<'_>>)> = Vec::new();
    for (si, (s, buf)) in slots.iter().zip(bufs.iter_mut()).enumerate() {
        let (Some(buf), Some(dev)) = (buf.as_mut(), devs[s.member].as_ref()) else {
            continue;
        };
        let at = data_start + u64::from(s.slab) * slab_size + a;
        let reqs = buf
            .chunks_mut(PIECE)
            .enumerate()
            .map(|(i, c)| Request::read(at + (i * PIECE) as u64, c))
            .collect();
        batches.push((si, &**dev, reqs));
    }
    // Each piece is checksummed as it arrives, while the rest are still in flight.
    let mut got: Vec<Vec<Vec<u32>>> = batches
        .iter()
        .map(|(_, _, reqs)| vec![Vec::new(); reqs.len()])
        .collect();
    {
        let mut jobs: Vec<(&dyn BlockDevice, &mut [Request<'_>])> = batches
            .iter_mut()
            .map(|(_, dev, reqs)| (*dev, &mut reqs[..]))
            .collect();
        submit_group(&mut jobs, |j, i, r| {
            if let (Op::Read { bufs, .. }, Ok(())) = (&r.op, r.result()) {
                got[j][i] = vec![csum::crc_iov(bufs, 0, r.len() as usize)];
            }
        });
    }
    let mut crcs: Vec<Vec<u32>> = vec![Vec::new(); slots.len()];
    for ((si, _, reqs), got) in batches.iter().zip(got) {
        if let Some(e) = reqs.iter().find_map(|r| r.result().err()) {
            return Err(e);
        }
        crcs[*si] = got.concat();
    }
    drop(batches);
    Ok((bufs, crcs))
}

/// [`sync_chunk`] on slab bytes `[a, b)` already read into `bufs` (by [`read_slots`]): checks,
/// repairs in place and writes back what it repaired. Returns what it found and, per slot, the
/// stored checksums of its blocks as they are now, and whether each block matches its
/// checksum (a rebuild copies verified buffers with these checksums instead of reading them
/// again).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn sync_bufs(
    csums: &Csums,
    layout: &Layout,
    slots: &[Slot],
    devs: &Devs,
    (data_start, slab_size): (u64, u64),
    (a, b): (u64, u64),
    mode: SyncMode,
    (bufs, got): (&mut [Option<AlignedBuf>], &[Vec<u32>]),
) -> Result<(SyncOutcome, Vec<Vec<u32>>, Vec<Vec<bool>>)> {
    let resync = mode.resync();
    let behind = |si: usize| mode.behind() == Some(slots[si].member);
    let at = |s: Slot| data_start + u64::from(s.slab) * slab_size + a;
    let dev = |si: usize| devs[slots[si].member].as_ref();
    let len = (b - a) as usize;
    let bs = BLOCK as usize;
    let nb = len / bs;
    let w = layout.width;
    let mut out = SyncOutcome::default();
    let mut want: Vec<Vec<u32>> = vec![Vec::new(); w];
    let mut ok: Vec<Vec<bool>> = vec![Vec::new(); w];
    for si in 0..w {
        let (Some(d), Some(v)) = (dev(si), bufs[si].as_ref()) else {
            continue;
        };
        let s = slots[si];
        want[si] = csums.get(&**d, s.member, s.slab, a / BLOCK, nb as u64)?;
        // A piece whose CRC matches its blocks' joined checksums is good throughout; only
        // the others are checked block by block.
        let per_piece = PIECE / bs;
        ok[si] = Vec::with_capacity(nb);
        for (p, blocks) in want[si].chunks(per_piece).enumerate() {
            let data = &v[p * PIECE..p * PIECE + blocks.len() * bs];
            let whole = got[si].get(p).copied();
            if whole.is_some_and(|c| c == csum::joined(blocks)) {
                ok[si].extend(std::iter::repeat_n(true, blocks.len()));
            } else {
                ok[si].extend(csum::crcs(data).iter().zip(blocks).map(|(g, w)| g == w));
            }
        }
        if behind(si) {
            // Whatever it holds may be older than its checksums can tell.
            ok[si].iter_mut().for_each(|b| *b = false);
        }
    }
    let mut data_dirty = vec![false; w];
    let mut crc_dirty = vec![false; w];
    let blk = |v: &Option<AlignedBuf>, i: usize| {
        v.as_ref().expect("present")[i * bs..(i + 1) * bs].to_vec()
    };
    match layout.resiliency {
        Resiliency::Simple | Resiliency::Mirror { .. } => {
            let k = layout.copies();
            for col in 0..layout.data_columns {
                let copies: Vec<usize> = (0..k)
                    .map(|c| layout.data_slot(0, col, c))
                    .filter(|&si| bufs[si].is_some())
                    .collect();
                if copies.is_empty() {
                    // Every copy of the column is on a lost member: nothing could be checked.
                    out.unverifiable = true;
                    continue;
                }
                for i in 0..nb {
                    let bad = copies.iter().filter(|&&si| !ok[si][i]).count() as u64;
                    // Good copies that disagree (outside a resync): the copy most of them
                    // hold, if most of the copies present hold it; else nothing is changed.
                    let good: Vec<usize> = copies.iter().copied().filter(|&si| ok[si][i]).collect();
                    let pick = if resync || good.len() < 2 {
                        good.first().copied()
                    } else {
                        let first = blk(&bufs[good[0]], i);
                        if good[1..].iter().all(|&si| {
                            bufs[si].as_ref().expect("present")[i * bs..(i + 1) * bs] == first[..]
                        }) {
                            Some(good[0])
                        } else {
                            let mut best = None;
                            for &g in &good {
                                let v = blk(&bufs[g], i);
                                let n = good
                                    .iter()
                                    .filter(|&&si| {
                                        bufs[si].as_ref().expect("present")[i * bs..(i + 1) * bs]
                                            == v[..]
                                    })
                                    .count();
                                if 2 * n > copies.len() {
                                    best = Some(g);
                                    break;
                                }
                            }
                            if best.is_none() {
                                out.bad_blocks += bad;
                                out.lost += bad;
                                out.undecided += 1;
                                continue;
                            }
                            best
                        }
                    };
                    let src = match pick {
                        Some(g) => {
                            if !resync {
                                out.bad_blocks += bad;
                                out.healed += bad;
                            }
                            g
                        }
                        None if resync => {
                            let Some(g) = copies.iter().copied().find(|&si| !behind(si)) else {
                                // The member being caught up holds the only copy present.
                                out.unverifiable = true;
                                continue;
                            };
                            want[g][i] = csum::block_crc(&blk(&bufs[g], i));
                            crc_dirty[g] = true;
                            g
                        }
                        None => {
                            out.bad_blocks += bad;
                            out.lost += bad;
                            continue;
                        }
                    };
                    if copies.len() == 1 {
                        continue;
                    }
                    let data = blk(&bufs[src], i);
                    for &si in copies.iter().filter(|&&si| si != src) {
                        let mine = &mut bufs[si].as_mut().expect("present")[i * bs..(i + 1) * bs];
                        if mine != &data[..] || want[si][i] != want[src][i] {
                            mine.copy_from_slice(&data);
                            want[si][i] = want[src][i];
                            data_dirty[si] = true;
                            crc_dirty[si] = true;
                            out.mismatched = true;
                        }
                    }
                }
            }
        }
        Resiliency::Parity { redundancy } => {
            let m = usize::from(redundancy);
            let d = layout.data_columns;
            let il = layout.interleave;
            for i in 0..nb {
                let pos = a + (i * bs) as u64;
                let row = pos / il;
                let slot_of = |shard: usize| {
                    if shard < d {
                        layout.data_slot(row, shard, 0)
                    } else {
                        layout.parity_slot(row, shard - d)
                    }
                };
                // A member being caught up: its shard of the row (data or parity) is what the
                // good shards of the others give, whichever others are absent (another member
                // still behind, say) as long as `d` good ones are left.
                if let Some(xs) = (0..w).find(|&sh| behind(slot_of(sh))) {
                    let si = slot_of(xs);
                    if bufs[si].is_none() {
                        continue;
                    }
                    let mut shards: Vec<Option<Vec<u8>>> = (0..w)
                        .map(|sh| {
                            let s2 = slot_of(sh);
                            (sh != xs && bufs[s2].is_some() && ok[s2][i]).then(|| blk(&bufs[s2], i))
                        })
                        .collect();
                    if !code::reconstruct(&mut shards, d, bs) {
                        out.unverifiable = true;
                        continue;
                    }
                    let rec = shards[xs].take().expect("rebuilt");
                    bufs[si].as_mut().expect("present")[i * bs..(i + 1) * bs].copy_from_slice(&rec);
                    want[si][i] = csum::block_crc(&rec);
                    ok[si][i] = true;
                    data_dirty[si] = true;
                    crc_dirty[si] = true;
                    continue;
                }
                let bad: Vec<usize> = (0..w)
                    .filter(|&sh| bufs[slot_of(sh)].is_some() && !ok[slot_of(sh)][i])
                    .collect();
                if !resync {
                    out.bad_blocks += bad.len() as u64;
                }
                let absent = (0..w).filter(|&sh| bufs[slot_of(sh)].is_none()).count();
                if !bad.is_empty() && bad.len() + absent <= m {
                    let mut shards: Vec<Option<Vec<u8>>> = (0..w)
                        .map(|sh| {
                            let si = slot_of(sh);
                            (bufs[si].is_some() && ok[si][i]).then(|| blk(&bufs[si], i))
                        })
                        .collect();
                    if code::reconstruct(&mut shards, d, bs) {
                        for &sh in &bad {
                            let si = slot_of(sh);
                            let rec = shards[sh].as_ref().expect("rebuilt");
                            let mine =
                                &mut bufs[si].as_mut().expect("present")[i * bs..(i + 1) * bs];
                            if csum::block_crc(rec) == want[si][i] {
                                mine.copy_from_slice(rec);
                                data_dirty[si] = true;
                            } else if mine == &rec[..] {
                                // The data is what the row says: the checksum entry was damaged.
                                want[si][i] = csum::block_crc(rec);
                                crc_dirty[si] = true;
                            } else if resync && !behind(si) {
                                // After a crash the rest of the row may mix old and new
                                // blocks: only what matches a checksum is taken (a member
                                // being caught up takes what the row gives: the row was
                                // resynced before, and its own block is not a source).
                                continue;
                            } else {
                                // Data and entry both gone (a wiped range): what the rest of
                                // the row, which passes its checksums, gives is the block.
                                mine.copy_from_slice(rec);
                                want[si][i] = csum::block_crc(rec);
                                data_dirty[si] = true;
                                crc_dirty[si] = true;
                            }
                            ok[si][i] = true;
                            if !resync {
                                out.healed += 1;
                            }
                        }
                    }
                }
                // Data blocks nothing could rebuild.
                let mut skip = false;
                for sh in 0..d {
                    let si = slot_of(sh);
                    if bufs[si].is_some() && !ok[si][i] {
                        if behind(si) {
                            // Nothing rebuilt the member's block: it cannot be caught up.
                            out.unverifiable = true;
                            skip = true;
                        } else if resync {
                            want[si][i] = csum::block_crc(&blk(&bufs[si], i));
                            ok[si][i] = true;
                            crc_dirty[si] = true;
                        } else {
                            out.lost += 1;
                            skip = true;
                        }
                    }
                }
                if (0..d).any(|sh| bufs[slot_of(sh)].is_none()) {
                    out.unverifiable = true;
                    skip = true;
                }
                if skip {
                    for sh in d..w {
                        let si = slot_of(sh);
                        if bufs[si].is_some() && !ok[si][i] && !resync {
                            out.lost += 1;
                        }
                    }
                    continue;
                }
                let mut data: Vec<Vec<u8>> = (0..d).map(|sh| blk(&bufs[slot_of(sh)], i)).collect();
                let mut parity = vec![vec![0u8; bs]; w - d];
                let encode = |data: &[Vec<u8>], parity: &mut [Vec<u8>]| {
                    let refs: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
                    let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
                    code::encode(&refs, &mut p);
                };
                encode(&data, &mut parity);
                // A parity that passes its checksum but disagrees with data that passes
                // theirs (outside a resync): something in the row is older or misplaced
                // and its checksum could not tell. Recomputing the parity from the data would
                // spread a stale data block; dual parity names the odd shard out, else the
                // row is left as it is and counted.
                let verified_mismatch = (d..w).any(|sh| {
                    let si = slot_of(sh);
                    bufs[si]
                        .as_ref()
                        .is_some_and(|b| ok[si][i] && b[i * bs..(i + 1) * bs] != parity[sh - d][..])
                });
                if verified_mismatch && !resync {
                    let all: Option<Vec<Vec<u8>>> = (0..w)
                        .map(|sh| {
                            let si = slot_of(sh);
                            (bufs[si].is_some() && ok[si][i]).then(|| blk(&bufs[si], i))
                        })
                        .collect();
                    match all.and_then(|all| odd_shard_out(&all, d, bs).map(|j| (all, j))) {
                        Some((all, j)) if j < d => {
                            // A data shard is the odd one out: rebuilt from the others.
                            let mut row: Vec<Option<Vec<u8>>> = all.into_iter().map(Some).collect();
                            row[j] = None;
                            code::reconstruct(&mut row, d, bs);
                            let rec = row[j].take().expect("rebuilt");
                            let si = slot_of(j);
                            bufs[si].as_mut().expect("present")[i * bs..(i + 1) * bs]
                                .copy_from_slice(&rec);
                            want[si][i] = csum::block_crc(&rec);
                            data_dirty[si] = true;
                            crc_dirty[si] = true;
                            data[j] = rec;
                            encode(&data, &mut parity);
                        }
                        // A parity is the odd one out: recomputed below.
                        Some(_) => {}
                        None => {
                            out.undecided += 1;
                            continue;
                        }
                    }
                }
                for (j, p) in parity.iter().enumerate() {
                    let si = slot_of(d + j);
                    let Some(buf) = bufs[si].as_mut() else {
                        continue;
                    };
                    let crc = csum::block_crc(p);
                    if buf[i * bs..(i + 1) * bs] != p[..] || want[si][i] != crc {
                        if !ok[si][i] && !resync {
                            out.healed += 1;
                        }
                        buf[i * bs..(i + 1) * bs].copy_from_slice(p);
                        want[si][i] = crc;
                        ok[si][i] = true;
                        data_dirty[si] = true;
                        crc_dirty[si] = true;
                        out.mismatched = true;
                    }
                }
            }
        }
    }
    for si in 0..w {
        let s = slots[si];
        if data_dirty[si] {
            out.mismatched = true;
            dev(si)
                .expect("usable")
                .write_at(at(s), bufs[si].as_ref().expect("read"))?;
        }
        if crc_dirty[si] {
            out.mismatched = true;
            csums.store(
                dev(si).expect("usable"),
                s.member,
                s.slab,
                a / BLOCK,
                &want[si],
            )?;
        }
    }
    Ok((out, want, ok))
}
