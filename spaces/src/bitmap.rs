//! The write-intent bitmap, resync after an unclean shutdown, and scrub.
//!
//! Before a write reaches an extent, the bit of every (member, slab, chunk) it touches is set
//! in that member's bitmap on disk and flushed (only the first write to a clean chunk pays for
//! this). Bits are cleared when the pool is quiet (no write in flight) at a flush at least
//! [`CLEAR_DELAY`] after the last bit was set, and when the last handle of the pool is dropped.
//! So after a crash the bits name every chunk that may hold a write that reached some slots of
//! its extent and not others: opening the pool writable resyncs exactly those chunks (mirror:
//! the first copy whose block checksums match is copied over the others; parity: blocks that
//! fail their checksum are rebuilt from the row where that matches, then the parity is
//! recomputed from the data), so a later rebuild never uses a parity that disagrees with its
//! data. The bits also cover the block checksums written with the data: a block in a dirty
//! chunk whose data and checksum did not both land, and that nothing rebuilds, is taken as it
//! is with its checksum rewritten (no false checksum error after a crash).
//!
//! What this alone does not close is a crash together with the loss of a member holding a data
//! column of a dirty parity row (the parity cannot be checked then): the parity
//! [`journal`](crate::journal) (format version 3) closes it, replayed at the open before this
//! resync runs; such chunks are still named in the pool's notes (for a version 2 pool, which
//! has no journal, they may hold wrong data).

use crate::code;
use crate::csum::{self, Csums, BLOCK};
use crate::format::{MemberState, Slot, BITMAP_SIZE, CHUNKS_PER_SLAB};
use crate::layout::{Layout, Resiliency};
use crate::members::Devs;
use crate::pool::{lock, Inner};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vstor_core::{submit_group, AlignedBuf, BlockDevice, Error, Op, Request, Result};

/// How long after the last bit was set a quiet flush clears the bitmap.
pub const CLEAR_DELAY: Duration = Duration::from_secs(2);

/// The in-memory copy of every member's bitmap, as it is on disk.
#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    pub bits: Vec<Vec<u8>>,
    pub any: bool,
    pub last_mark: Option<Instant>,
}

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

/// Bytes of a member's bitmap that hold its slabs' bits, rounded up to 4 KiB.
pub(crate) fn bitmap_bytes(slab_count: u32) -> usize {
    ((u64::from(slab_count) * CHUNKS_PER_SLAB)
        .div_ceil(8)
        .div_ceil(4096)
        * 4096) as usize
}

impl Inner {
    fn bitmap_offset(&self) -> u64 {
        self.store.lock().data_start - BITMAP_SIZE
    }

    /// Sets on disk the bits of `chunks` (member, slab, chunk) not set yet, before the writes
    /// they cover. Returns the members that failed the bitmap write.
    pub fn mark_dirty(&self, chunks: &BTreeSet<(usize, u32, u64)>) -> Vec<(usize, Error)> {
        let base = self.bitmap_offset();
        let mut bm = lock(&self.bitmap);
        let mut sectors: BTreeSet<(usize, usize)> = BTreeSet::new();
        for &(m, slab, c) in chunks {
            let bit = u64::from(slab) * CHUNKS_PER_SLAB + c;
            let (byte, mask) = ((bit / 8) as usize, 1u8 << (bit % 8));
            if bm.bits.len() <= m {
                bm.bits.resize(m + 1, Vec::new());
            }
            let v = &mut bm.bits[m];
            if v.len() <= byte {
                v.resize((byte + 1).div_ceil(4096) * 4096, 0);
            }
            if v[byte] & mask == 0 {
                v[byte] |= mask;
                sectors.insert((m, byte / 4096));
            }
        }
        if sectors.is_empty() {
            return Vec::new();
        }
        bm.any = true;
        bm.last_mark = Some(Instant::now());
        let devs = self.members.snapshot();
        let mut failed = Vec::new();
        let mut by_member: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (m, s) in sectors {
            by_member.entry(m).or_default().push(s);
        }
        for (m, secs) in by_member {
            let Some(dev) = devs.get(m).and_then(Option::as_ref) else {
                continue;
            };
            let r = secs
                .iter()
                .try_for_each(|&s| {
                    dev.write_at(
                        base + s as u64 * 4096,
                        &bm.bits[m][s * 4096..(s + 1) * 4096],
                    )
                })
                .and_then(|()| dev.flush());
            if let Err(e) = r {
                failed.push((m, e));
            }
        }
        failed
    }

    /// Clears every bit on disk (the caller holds the write gate, so no write is in flight,
    /// and has flushed the members). With `force` false, only if the last bit was set at least
    /// [`CLEAR_DELAY`] ago.
    pub fn clear_bitmaps(&self, force: bool) {
        if self.keeps_bits() {
            return;
        }
        let base = self.bitmap_offset();
        let mut bm = lock(&self.bitmap);
        if !bm.any || (!force && bm.last_mark.is_some_and(|t| t.elapsed() < CLEAR_DELAY)) {
            return;
        }
        let devs = self.members.snapshot();
        let mut all = true;
        for (m, v) in bm.bits.iter_mut().enumerate() {
            let dirty: Vec<usize> = (0..v.len() / 4096)
                .filter(|&s| v[s * 4096..(s + 1) * 4096].iter().any(|&b| b != 0))
                .collect();
            if dirty.is_empty() {
                continue;
            }
            let Some(dev) = devs.get(m).and_then(Option::as_ref) else {
                all = false;
                continue;
            };
            let zero = [0u8; 4096];
            let r = dirty
                .iter()
                .try_for_each(|&s| dev.write_at(base + s as u64 * 4096, &zero))
                .and_then(|()| dev.flush());
            match r {
                Ok(()) => v.iter_mut().for_each(|b| *b = 0),
                Err(_) => all = false,
            }
        }
        bm.any = !all;
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
        let base = meta.data_start - BITMAP_SIZE;
        let devs = self.members.snapshot();
        let mut dirty: BTreeSet<(usize, u32, u64)> = BTreeSet::new();
        let mut bm = lock(&self.bitmap);
        bm.bits = vec![Vec::new(); meta.members.len()];
        for (m, mm) in meta.members.iter().enumerate() {
            let Some(dev) = &devs[m] else { continue };
            let mut v = vec![0u8; bitmap_bytes(mm.slab_count)];
            dev.read_at(base, &mut v)?;
            add_bits(&mut dirty, m, &v, mm.slab_count);
            if v.iter().any(|&b| b != 0) {
                bm.any = true;
            }
            bm.bits[m] = v;
        }
        drop(bm);
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
        self.resynced.fetch_add(done, Ordering::AcqRel);
        notes.insert(
            0,
            format!(
                "unclean shutdown: resynced {done} dirty chunks named by the write-intent bitmap"
            ),
        );
        Ok((done, notes))
    }
}

/// Adds the (member, slab, chunk) of every bit set in member `m`'s bitmap `v` (of a member
/// with `slab_count` slabs) to `dirty`.
fn add_bits(dirty: &mut BTreeSet<(usize, u32, u64)>, m: usize, v: &[u8], slab_count: u32) {
    for (i, &b) in v.iter().enumerate().filter(|(_, &b)| b != 0) {
        for k in (0..8).filter(|k| b & (1 << k) != 0) {
            let bit = i as u64 * 8 + k;
            let slab = bit / CHUNKS_PER_SLAB;
            if slab < u64::from(slab_count) {
                dirty.insert((m, slab as u32, bit % CHUNKS_PER_SLAB));
            }
        }
    }
}

/// The extent chunks (space, extent, chunk) that dirty (member, slab, chunk) bits name, of the
/// extents `keep` takes.
fn extent_chunks(
    meta: &crate::format::Meta,
    dirty: &BTreeSet<(usize, u32, u64)>,
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
fn sync_extent_chunk(
    csums: &Csums,
    meta: &crate::format::Meta,
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

impl Inner {
    /// At a writable open, after the resync: brings back member `x`, present again, that
    /// missed the writes after the sequence it holds (`current_through`), with the bits kept
    /// since ([`Inner::keeps_bits`]). Every chunk of an extent with a slot on `x` that a bit
    /// names (on any member, `x`'s own included) is copied or rebuilt onto `x` from the other
    /// slots, `x`'s own contents never a source ([`SyncMode::CatchUp`]); then its bitmap and
    /// journal start afresh and the metadata records it healthy (and it gets that metadata).
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
        let base = meta.data_start - BITMAP_SIZE;
        // The kept bits of the usable members (read at open), and the member's own.
        let mut dirty: BTreeSet<(usize, u32, u64)> = BTreeSet::new();
        let mut own = vec![0u8; bitmap_bytes(meta.members[x].slab_count)];
        dev.read_at(base, &mut own)?;
        {
            let bm = lock(&self.bitmap);
            for (m, v) in bm.bits.iter().enumerate() {
                if m != x {
                    add_bits(&mut dirty, m, v, meta.members[m].slab_count);
                }
            }
            add_bits(&mut dirty, x, &own, meta.members[x].slab_count);
        }
        let work = extent_chunks(&meta, &dirty, |slots| slots.iter().any(|s| s.member == x));
        let mut devs = self.members.snapshot();
        devs[x] = Some(dev.clone());
        let chunk = meta.slab_size / CHUNKS_PER_SLAB;
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
        }
        for d in devs.iter().flatten() {
            d.flush()?;
        }
        // Its bitmap and journal start afresh: what they named is settled.
        crate::store::zero_range(&*dev, base, BITMAP_SIZE)?;
        self.journal.init_member(&*dev, x, meta.members[x].id)?;
        {
            let mut bm = lock(&self.bitmap);
            if let Some(v) = bm.bits.get_mut(x) {
                v.iter_mut().for_each(|b| *b = 0);
            }
        }
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
        self.resynced.fetch_add(work.len() as u64, Ordering::AcqRel);
        // The bits kept for it can go now (unless another member is still behind).
        self.clear_bitmaps(true);
        Ok(Ok((work.len() as u64, work.len() as u64 * chunk)))
    }
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

/// What a scrub found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Chunks (a sixteenth of a slab, in every slot of an extent) checked.
    pub chunks: u64,
    /// Chunks whose copies or parity disagreed with the data, and were rewritten.
    pub repaired: u64,
    /// Chunks that could not be checked: of degraded parity extents (a data column lost, so
    /// the parity cannot be checked), or of extents with a column on no usable member.
    pub unverifiable: u64,
    /// 512-byte blocks of members whose data did not match their checksum.
    pub checksum_errors: u64,
    /// Of those, blocks rewritten from a good copy or rebuilt from parity.
    pub healed: u64,
    /// Of those, blocks with no good source left (reads of them fail).
    pub lost: u64,
    /// Blocks whose copies, or whose parity row, pass their checksums but disagree, where
    /// nothing told which is right (two mirror copies; single parity; dual parity with no
    /// single odd shard out): left as they are, never settled by slot order.
    pub undecided: u64,
}

impl crate::Pool {
    /// Walks every allocated extent of the space `name` (all spaces if `None`), online, a chunk
    /// at a time with the space's I/O held off for that chunk, checks every 512-byte block of
    /// every slot against its checksum, and repairs: a bad mirror block is rewritten from a
    /// copy whose checksum matches, a bad parity-layout block is rebuilt from the rest of its
    /// row. Copies that pass their checksums but differ are made equal to the copy most of
    /// the copies hold (a 3-way mirror), and a parity row whose shards pass their checksums
    /// but disagree is settled only where dual parity names the one odd shard out (rebuilt
    /// from the others); anything else is left as it is and counted
    /// ([`ScrubReport::undecided`]), never decided by slot order. Parity is recomputed from
    /// the (verified) data where its checksum failed. Blocks with no good source are counted
    /// as lost and left alone. `progress` gets (chunks done, chunks to do).
    pub fn scrub(
        &self,
        name: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ScrubReport> {
        if self.inner.read_only {
            return Err(crate::SpacesError::ReadOnly.into());
        }
        let names: Vec<String> = {
            let meta = self.inner.store.lock();
            if let Some(n) = name {
                if !meta.spaces.iter().any(|s| s.name == n) {
                    return Err(crate::SpacesError::NoSuchSpace(n.into()).into());
                }
            }
            meta.spaces
                .iter()
                .filter(|s| name.is_none_or(|n| n == s.name))
                .map(|s| s.name.clone())
                .collect()
        };
        let spaces: Vec<crate::Space> = names
            .iter()
            .filter_map(|n| self.open_space(n).ok())
            .collect();
        let total: u64 = spaces
            .iter()
            .map(|s| {
                let ext = s.shared.extents.read().unwrap_or_else(|p| p.into_inner());
                ext.iter().flatten().count() as u64 * CHUNKS_PER_SLAB
            })
            .sum();
        let geo = {
            let m = self.inner.store.lock();
            (m.data_start, m.slab_size)
        };
        let mut report = ScrubReport::default();
        progress(0, total);
        for space in &spaces {
            let n = space
                .shared
                .extents
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .len();
            for e in 0..n {
                for c in 0..CHUNKS_PER_SLAB {
                    let ext = space
                        .shared
                        .extents
                        .write()
                        .unwrap_or_else(|p| p.into_inner());
                    let Some(slots) = ext[e].clone() else { break };
                    let (chunk, devs) = (geo.1 / CHUNKS_PER_SLAB, self.inner.members.snapshot());
                    let out = sync_chunk(
                        &self.inner.csums,
                        &space.shared.layout,
                        &slots,
                        &devs,
                        geo,
                        (c * chunk, (c + 1) * chunk),
                        SyncMode::Check,
                    )?;
                    let entered = space.shared.io_entered();
                    drop(ext);
                    space.shared.let_waiting_io_in(entered);
                    report.chunks += 1;
                    report.repaired += u64::from(out.mismatched);
                    report.unverifiable += u64::from(out.unverifiable);
                    report.checksum_errors += out.bad_blocks;
                    report.healed += out.healed;
                    report.lost += out.lost;
                    report.undecided += out.undecided;
                    self.inner
                        .integrity
                        .count(out.bad_blocks, out.healed, out.lost);
                    progress(report.chunks, total);
                }
            }
        }
        for d in self.inner.members.snapshot().iter().flatten() {
            d.flush()?;
        }
        Ok(report)
    }
}
