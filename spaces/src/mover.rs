//! The extent mover: moves slots of one extent of a space to new slabs, online. Repair uses it
//! to rebuild the slabs of lost or retired members onto healthy ones; tiering will use it to
//! move slabs between media.
//!
//! A move takes a free slab on a healthy member that holds no other slot of the extent, for
//! every slot to move, and reserves it; from then on writes to the extent also go to the new
//! slabs. It then copies the extent's slot contents a window ([`WINDOW_CHUNKS`] chunks of
//! [`CHUNK`] bytes, 32 MiB) at a time with the space's I/O held off for that window only: from
//! the old slot itself (when its member is still readable), from another copy (mirror), or
//! rebuilt from the rest of the row (parity). Each chunk of the sources is read once (1 MiB
//! requests in flight together), checked block by block against its checksums and healed
//! where bad; the verified buffers and their stored checksums are what a second thread writes
//! to the new slabs (data and checksum pages in one batch per member) while the next chunk is
//! read. At the end of the extent the new slabs replace the old ones in the pool metadata (one
//! metadata update per extent), then in the space's map, so an interrupted move leaves the
//! extent as it was.

use crate::csum::{Csums, BLOCK};
use crate::error::{invalid, SpacesError};
use crate::format::{MemberState, Slot};
use crate::layout::{Layout, Resiliency};
use crate::pool::Inner;
use crate::sync::{read_slots, sync_bufs, SyncMode, PIECE};
use crate::{code, Space};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use uuid::Uuid;
use vstor_core::{AlignedBuf, BlockDevice, Request, Result};

/// Bytes a move reads (then verifies, then writes) as one step.
const CHUNK: u64 = 8 << 20;
/// Chunks a move copies with the space's I/O held off: inside them the read of the next chunk
/// runs while the last one is written.
const WINDOW_CHUNKS: u64 = 4;

/// One extent whose slots are to move.
pub(crate) struct ExtentMove {
    /// The space's name (for messages).
    pub space: String,
    /// The space's identity (a space deleted and created again under the name is another).
    pub id: Uuid,
    /// The extent.
    pub extent: u64,
    /// The slots (indexes into the extent's slots) to move.
    pub bad: Vec<usize>,
}

/// Moves the slots of `w` that are still to move (on a lost or retired member) of one extent
/// to new slabs (see the module documentation). Returns the bytes written to the new slabs
/// (0 if nothing was left to move: the extent was given back or its slots moved already), or
/// `None` if the extent cannot be read (more is lost than its resiliency tolerates).
pub(crate) fn move_extent(
    inner: &Inner,
    space: &Space,
    w: &ExtentMove,
    spare: &mut Vec<AlignedBuf>,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<u64>> {
    let layout = space.shared.layout;
    let (slots, new, data_start, slab_size) = {
        let meta = inner.store.lock();
        let Some(Some(slots)) = meta
            .spaces
            .iter()
            .find(|s| s.id == w.id)
            .and_then(|s| s.extents.get(w.extent as usize))
            .cloned()
        else {
            return Ok(Some(0));
        };
        let rt = inner.members.read();
        let readable = layout.extent_readable(|s| rt[slots[s].member].usable);
        // The slots still to move: a discard may have given the extent back and a write
        // allocated it again (on healthy members) since the work was listed.
        let bad: Vec<usize> = w
            .bad
            .iter()
            .copied()
            .filter(|&si| {
                let m = slots[si].member;
                !rt[m].usable || meta.members[m].state == MemberState::Retired
            })
            .collect();
        drop(rt);
        if bad.is_empty() {
            return Ok(Some(0));
        }
        if !readable {
            return Ok(None);
        }
        let eligible = inner.members.eligible(&meta);
        let exclude: Vec<usize> = slots.iter().map(|s| s.member).collect();
        let got = inner
            .store
            .reserve_slabs(&meta, &eligible, bad.len(), &exclude)
            .ok_or_else(|| SpacesError::TooFewDisks {
                what: format!(
                    "rebuilding extent {} of '{}' ({}) onto a disk it does not use yet",
                    w.extent, w.space, layout.resiliency
                ),
                needed: layout.width + 1,
                available: eligible.iter().filter(|&&e| e).count(),
            })?;
        let new: Vec<(usize, Slot)> = bad.into_iter().zip(got).collect();
        (slots, new, meta.data_start, meta.slab_size)
    };
    let release = || {
        let taken: Vec<Slot> = new.iter().map(|x| x.1).collect();
        inner.store.unreserve(&taken);
    };
    // Gives up the extent: writes no longer go to the new slabs, which are free again.
    let abandon = || {
        space.shared.set_rebuilding(None);
        release();
    };
    space.shared.set_rebuilding(Some((w.extent, new.clone())));
    let chunk = CHUNK.max(layout.interleave).min(slab_size);
    let window = (chunk * WINDOW_CHUNKS).min(slab_size);
    let mut bytes = 0;
    let mut result = Ok(());
    // The sources' checksum pages in one read per slot, not a few pages per chunk.
    {
        let devs = inner.members.snapshot();
        for s in &slots {
            if let Some(d) = &devs[s.member] {
                // Only a cache warm-up: a failure shows again (and is handled) where a
                // chunk reads the pages.
                let _ = inner
                    .csums
                    .preload(&**d, s.member, s.slab, 0, slab_size / BLOCK);
            }
        }
    }
    let mut ws = 0;
    // The first chunk of the next window, read at the end of the last one (while its
    // last chunk was written), and the count of writes to the space then.
    let mut ahead: Option<(u64, Copied, u64)> = None;
    let writes = &space.shared.writes_while_rebuilding;
    'windows: while ws < slab_size {
        let io_held = space
            .shared
            .extents
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if io_held.get(w.extent as usize).and_then(Option::as_ref) != Some(&slots) {
            // A discard gave the extent back since the rebuild took its slots: nothing
            // of it is left to copy (and its old slabs may be another extent's now).
            drop(io_held);
            spare.extend(
                ahead
                    .take()
                    .into_iter()
                    .flat_map(|a| a.1.writes)
                    .map(|w| w.1),
            );
            abandon();
            return Ok(Some(0));
        }
        let devs = inner.members.snapshot();
        let geo = (data_start, slab_size);
        let we = (ws + window).min(slab_size);
        // It stands for the slab's bytes only if no write ran while the I/O was let
        // through (a write during a rebuild also reaches the new slab, and the copy read
        // before it must not land after it).
        let pre = match ahead.take() {
            Some((off, c, seen)) if off == ws && writes.load(Ordering::Acquire) == seen => Some(c),
            Some((_, c, _)) => {
                spare.extend(c.writes.into_iter().map(|w| w.1));
                None
            }
            None => None,
        };
        // Each chunk is read once and checked block by block (bad blocks of the sources
        // healed from another copy or the rest of the row first, so a bad block is never
        // copied with a fresh checksum); the verified buffers are what a second thread
        // writes, with their checksums, while this one reads the next chunk.
        let r: Result<u64> = std::thread::scope(|sc| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Copied>(1);
            let (back, returned) = std::sync::mpsc::channel::<AlignedBuf>();
            let devs = &devs;
            let writer = sc.spawn(move || -> Result<u64> {
                let mut n = 0;
                for c in rx {
                    write_copied(&inner.csums, devs, geo, &c)?;
                    n += c.writes.len() as u64 * chunk;
                    for (_, buf, _) in c.writes {
                        let _ = back.send(buf);
                    }
                }
                Ok(n)
            });
            let mut read = Ok(());
            let mut off = ws;
            if let Some(c) = pre {
                if tx.send(c).is_ok() {
                    off += chunk;
                } else {
                    off = we;
                }
            }
            while off < we {
                spare.extend(returned.try_iter());
                match prepare_chunk(
                    inner,
                    &layout,
                    &slots,
                    &new,
                    devs,
                    geo,
                    (off, off + chunk),
                    spare,
                ) {
                    // A failed send means the writer stopped on an error: it says which.
                    Ok(c) => {
                        if tx.send(c).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        read = Err(e);
                        break;
                    }
                }
                off += chunk;
            }
            // The next window's first chunk, read while the writer finishes this one
            // (a failure here shows again when the next window reads it).
            if read.is_ok() && we < slab_size {
                spare.extend(returned.try_iter());
                let next = (we, (we + chunk).min(slab_size));
                if let Ok(c) = prepare_chunk(inner, &layout, &slots, &new, devs, geo, next, spare) {
                    ahead = Some((we, c, writes.load(Ordering::Acquire)));
                }
            }
            drop(tx);
            let written = writer.join().expect("the write thread does not panic");
            spare.extend(returned.try_iter());
            read.and(written)
        });
        match r {
            Ok(n) => {
                bytes += n;
                progress(n);
            }
            Err(e) => {
                result = Err(e);
                break 'windows;
            }
        }
        let entered = space.shared.io_entered();
        drop(io_held);
        space.shared.let_waiting_io_in(entered);
        ws = we;
    }
    if result.is_ok() {
        // The copies must be durable before the metadata points at them.
        let devs = inner.members.snapshot();
        result = new.iter().try_for_each(|(_, n)| match &devs[n.member] {
            Some(d) => d.flush(),
            None => Err(invalid(format!(
                "member {} failed during the rebuild",
                n.member
            ))),
        });
    }
    if let Err(e) = result {
        abandon();
        return Err(e);
    }
    // Switch: the new slabs replace the old in the metadata, then in the map.
    let mut meta = inner.store.lock();
    let mut next = meta.clone();
    let Some(target) = next
        .spaces
        .iter_mut()
        .find(|s| s.id == w.id)
        .and_then(|s| s.extents.get_mut(w.extent as usize))
        .and_then(Option::as_mut)
        // Given back by a discard (and maybe allocated again elsewhere) meanwhile.
        .filter(|t| **t == slots)
    else {
        abandon();
        return Ok(Some(0));
    };
    for &(si, n) in &new {
        target[si] = n;
    }
    let switched = target.clone();
    let persisted = inner.persist(&mut next);
    if persisted.is_ok() {
        *meta = next;
    }
    {
        let mut ext = space
            .shared
            .extents
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if persisted.is_ok() {
            ext[w.extent as usize] = Some(switched);
            space.shared.map_version.fetch_add(1, Ordering::AcqRel);
        }
        space.shared.set_rebuilding(None);
    }
    drop(meta);
    release();
    inner.members.changed();
    persisted.map(|()| Some(bytes))
}

/// A verified chunk of an extent ready to go to the new slabs: (new slab, data, checksums of
/// its blocks), at slab offset `off`.
struct Copied {
    off: u64,
    writes: Vec<(Slot, AlignedBuf, Vec<u32>)>,
}

/// Reads slab bytes `[a, b)` of every usable slot of the extent once, verifies and heals them
/// ([`sync_bufs`]), and makes from the verified buffers the contents
/// of each new slab: the retired slot's own buffer, a good copy (mirror), or the rest of the
/// row (parity). A copy keeps its source's stored checksums, so a block no good source was left
/// for still fails its checksum on the new slab; a block rebuilt from parity gets the checksum
/// of what was rebuilt, or one that fails where a source block of its row failed.
#[allow(clippy::too_many_arguments)]
fn prepare_chunk(
    inner: &crate::pool::Inner,
    layout: &Layout,
    slots: &[Slot],
    new: &[(usize, Slot)],
    devs: &[Option<Arc<dyn BlockDevice>>],
    geo: (u64, u64),
    (a, b): (u64, u64),
    spare: &mut Vec<AlignedBuf>,
) -> Result<Copied> {
    let (mut bufs, got) = read_slots(slots, devs, geo, (a, b), spare)?;
    let (out, want, ok) = sync_bufs(
        &inner.csums,
        layout,
        slots,
        devs,
        geo,
        (a, b),
        SyncMode::Check,
        (&mut bufs, &got),
    )?;
    inner.integrity.count(out.bad_blocks, out.healed, out.lost);
    let len = (b - a) as usize;
    let usable = |si: usize| devs[slots[si].member].is_some();
    let mut writes: Vec<(Slot, AlignedBuf, Vec<u32>)> = Vec::new();
    let lost: Vec<(usize, Slot)> = new.iter().copied().filter(|x| !usable(x.0)).collect();
    // (source slot, index in `writes`) of buffers moved to a new slab.
    let mut moved: Vec<(usize, usize)> = Vec::new();
    // The source's buffer moves to its first new slab; later ones copy it.
    let mut take = |src: usize,
                    bufs: &mut [Option<AlignedBuf>],
                    writes: &Vec<(Slot, AlignedBuf, Vec<u32>)>,
                    spare: &mut Vec<AlignedBuf>| {
        let data = match bufs[src].take() {
            Some(d) => d,
            None => {
                let i = moved
                    .iter()
                    .find(|x| x.0 == src)
                    .expect("moved to an earlier new slab")
                    .1;
                let mut d = take_spare(spare, len);
                d.copy_from_slice(&writes[i].1);
                d
            }
        };
        moved.push((src, writes.len()));
        data
    };
    if !lost.is_empty() {
        match layout.resiliency {
            Resiliency::Simple => return Err(invalid("a simple space has no other copy")),
            Resiliency::Mirror { copies } => {
                let k = usize::from(copies);
                for &(si, n) in &lost {
                    let col = si / k;
                    let src = (0..k)
                        .map(|c| col * k + c)
                        .find(|&s| usable(s))
                        .ok_or_else(|| invalid("no copy left"))?;
                    let data = take(src, &mut bufs, &writes, spare);
                    writes.push((n, data, want[src].clone()));
                }
            }
            Resiliency::Parity { .. } => {
                let w = layout.width;
                let d = layout.data_columns;
                let il = layout.interleave as usize;
                let mut out: Vec<AlignedBuf> =
                    lost.iter().map(|_| take_spare(spare, len)).collect();
                let first_row = a / layout.interleave;
                for r in 0..(len / il) {
                    let row = first_row + r as u64;
                    let rot = (row % w as u64) as usize;
                    let mut shards: Vec<Option<Vec<u8>>> = vec![None; w];
                    for (si, h) in bufs.iter().enumerate() {
                        if let Some(h) = h {
                            shards[(si + w - rot) % w] = Some(h[r * il..(r + 1) * il].to_vec());
                        }
                    }
                    if !code::reconstruct(&mut shards, d, il) {
                        return Err(invalid("too many shards lost"));
                    }
                    for (o, &(si, _)) in out.iter_mut().zip(&lost) {
                        let s = shards[(si + w - rot) % w].as_deref().expect("rebuilt");
                        o[r * il..(r + 1) * il].copy_from_slice(s);
                    }
                }
                for (o, &(_, n)) in out.into_iter().zip(&lost) {
                    let mut sums = crate::csum::crcs(&o);
                    // A block rebuilt from a source block that failed its checksum is no
                    // better: its checksum is made to fail too.
                    for (i, c) in sums.iter_mut().enumerate() {
                        if ok.iter().any(|v| v.get(i) == Some(&false)) {
                            *c = !*c;
                        }
                    }
                    writes.push((n, o, sums));
                }
            }
        }
    }
    // Retired (still readable) slots: their own verified contents.
    for &(si, n) in new.iter().filter(|x| usable(x.0)) {
        let data = take(si, &mut bufs, &writes, spare);
        writes.push((n, data, want[si].clone()));
    }
    spare.extend(bufs.into_iter().flatten());
    Ok(Copied { off: a, writes })
}

/// A buffer of `len` bytes from `spare`, or a new one.
fn take_spare(spare: &mut Vec<AlignedBuf>, len: usize) -> AlignedBuf {
    match spare.iter().position(|x| x.len() == len) {
        Some(i) => spare.swap_remove(i),
        None => AlignedBuf::new(len),
    }
}

/// Writes a verified chunk to its new slabs with their checksum pages, each new slab's data
/// and pages in one batch, the members side by side.
fn write_copied(
    csums: &Csums,
    devs: &[Option<Arc<dyn BlockDevice>>],
    (data_start, slab_size): (u64, u64),
    c: &Copied,
) -> Result<()> {
    let _page_locks = csums.lock_pages(
        c.writes
            .iter()
            .map(|(n, _, sums)| (n.member, n.slab, c.off / BLOCK, sums.len() as u64)),
    );
    let mut pages = Vec::new();
    for (n, _, sums) in &c.writes {
        let d = devs[n.member]
            .as_ref()
            .ok_or_else(|| invalid(format!("member {} is not usable", n.member)))?;
        pages.extend(csums.set(&**d, n.member, n.slab, c.off / BLOCK, sums)?);
    }
    let pages = crate::csum::merge_pages(pages);
    let mut per: Vec<(usize, Vec<Request<'_>>)> = Vec::new();
    for (n, data, _) in &c.writes {
        let at = data_start + u64::from(n.slab) * slab_size + c.off;
        let reqs = data
            .chunks(PIECE)
            .enumerate()
            .map(|(i, b)| Request::write(at + (i * PIECE) as u64, b));
        match per.iter_mut().find(|x| x.0 == n.member) {
            Some(x) => x.1.extend(reqs),
            None => per.push((n.member, reqs.collect())),
        }
    }
    for (m, off, buf) in &pages {
        match per.iter_mut().find(|x| x.0 == *m) {
            Some(x) => x.1.push(Request::write(*off, buf)),
            None => per.push((*m, vec![Request::write(*off, buf)])),
        }
    }
    let mut jobs: Vec<(&dyn BlockDevice, &mut [Request<'_>])> = Vec::new();
    for (m, reqs) in per.iter_mut() {
        let d = devs[*m]
            .as_ref()
            .ok_or_else(|| invalid(format!("member {m} is not usable")))?;
        jobs.push((&**d, &mut reqs[..]));
    }
    vstor_core::submit_group(&mut jobs, |_, _, _| {});
    drop(jobs);
    per.iter()
        .flat_map(|(_, reqs)| reqs.iter())
        .try_for_each(Request::result)
}
