//! Healing: a read that found a block failing its checksum leaves a [`Heal`]; the windows
//! named are checked in every slot of their extent and rewritten from a good copy or the rest
//! of the row, with the space's I/O held off ([`heal_window`]), and the requests run again.

use super::*;

/// A 4 KiB window of an extent's slabs (the same offset in every slot) that a read found a
/// bad block in, and the request that read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heal {
    pub extent: u64,
    /// Offset inside the slabs, a multiple of 4 KiB.
    pub window: u64,
    pub parent: usize,
}

impl Space {
    /// Heals the windows reads found bad blocks in, with the space's I/O held off; the
    /// requests that read them run again, or fail if a block has no good source left.
    pub(super) fn heal(&self, seg: &mut [Request<'_>], heal: &[Heal]) {
        let ext = self
            .shared
            .extents
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut windows: BTreeMap<(u64, u64), Vec<usize>> = BTreeMap::new();
        for h in heal {
            windows
                .entry((h.extent, h.window))
                .or_default()
                .push(h.parent);
        }
        let devs = self.pool.members.snapshot();
        for ((extent, window), parents) in windows {
            let Some(Some(slots)) = ext.get(extent as usize) else {
                continue;
            };
            let r = heal_window(
                &self.pool,
                &self.shared.layout,
                slots,
                &devs,
                (self.data_start, self.slab_size),
                window,
            );
            let err = match r {
                Ok(0) => continue,
                Ok(lost) => SpacesError::ChecksumMismatch {
                    space: self.shared.name.clone(),
                    detail: format!(
                        "extent {extent}: {lost} blocks of 512 bytes at slab offset {window} fail their checksum and no good copy or parity is left"
                    ),
                }
                .into(),
                Err(e) => e,
            };
            for pi in parents {
                if !seg[pi].is_complete() {
                    seg[pi].complete(Err(err.clone()));
                }
            }
        }
    }
}

impl Inner {
    /// The good contents of the block at `off` of a slot, where a read-only pool healed it.
    pub(super) fn healed_block(&self, s: Slot, off: u64) -> Option<Vec<u8>> {
        if !self.read_only {
            return None;
        }
        self.integrity.healed_block(s, off)
    }
}

/// Checks every slot of a 4 KiB window of an extent (the same slab offset `window` in every
/// slot) against its checksums and rewrites each bad block from a good copy (mirror) or from
/// the rest of its row (parity), if the result matches the block's checksum. The caller holds
/// the space's I/O off. Counts what it found in the pool's statistics and returns the blocks
/// left bad.
pub(crate) fn heal_window(
    pool: &Inner,
    layout: &Layout,
    slots: &[Slot],
    devs: &Devs,
    (data_start, slab_size): (u64, u64),
    window: u64,
) -> Result<u64> {
    let win = csum::PAGE as usize;
    let nb = win / csum::BLOCK as usize;
    let bs = csum::BLOCK as usize;
    let w = layout.width;
    let mut bufs: Vec<Option<Vec<u8>>> = vec![None; w];
    let mut want: Vec<Vec<u32>> = vec![Vec::new(); w];
    let mut ok: Vec<Vec<bool>> = vec![Vec::new(); w];
    for si in 0..w {
        let s = slots[si];
        let Some(dev) = devs[s.member].as_ref() else {
            continue;
        };
        let mut b = vec![0u8; win];
        dev.read_at(data_start + u64::from(s.slab) * slab_size + window, &mut b)?;
        want[si] = pool
            .csums
            .get(&**dev, s.member, s.slab, window / csum::BLOCK, nb as u64)?;
        ok[si] = csum::crcs(&b)
            .iter()
            .zip(&want[si])
            .map(|(g, w)| g == w)
            .collect();
        bufs[si] = Some(b);
    }
    let (mut found, mut fixed, mut lost) = (0u64, 0u64, 0u64);
    let mut dirty = vec![false; w];
    let mut sums_dirty = vec![false; w];
    let present_bad = |si: usize, b: usize, ok: &[Vec<bool>], bufs: &[Option<Vec<u8>>]| {
        bufs[si].is_some() && !ok[si][b]
    };
    match layout.resiliency {
        crate::Resiliency::Parity { redundancy } => {
            let d = layout.data_columns;
            let row = window / layout.interleave;
            let slot_of = |shard: usize| {
                if shard < d {
                    layout.data_slot(row, shard, 0)
                } else {
                    layout.parity_slot(row, shard - d)
                }
            };
            for b in 0..nb {
                let bad: Vec<usize> = (0..w)
                    .filter(|&sh| present_bad(slot_of(sh), b, &ok, &bufs))
                    .collect();
                if bad.is_empty() {
                    continue;
                }
                found += bad.len() as u64;
                let erased = (0..w)
                    .filter(|&sh| {
                        let si = slot_of(sh);
                        bufs[si].is_none() || !ok[si][b]
                    })
                    .count();
                if erased > usize::from(redundancy) {
                    lost += bad.len() as u64;
                    continue;
                }
                let mut shards: Vec<Option<Vec<u8>>> = (0..w)
                    .map(|sh| {
                        let si = slot_of(sh);
                        match &bufs[si] {
                            Some(v) if ok[si][b] => Some(v[b * bs..(b + 1) * bs].to_vec()),
                            _ => None,
                        }
                    })
                    .collect();
                if !code::reconstruct(&mut shards, d, bs) {
                    lost += bad.len() as u64;
                    continue;
                }
                for sh in bad {
                    let si = slot_of(sh);
                    let rec = shards[sh].as_ref().expect("rebuilt");
                    let mine = &mut bufs[si].as_mut().expect("present")[b * bs..(b + 1) * bs];
                    if csum::block_crc(rec) == want[si][b] {
                        mine.copy_from_slice(rec);
                        dirty[si] = true;
                    } else if mine == &rec[..] {
                        // The data is what the row says: the checksum entry was damaged.
                        want[si][b] = csum::block_crc(rec);
                        sums_dirty[si] = true;
                    } else {
                        // Data and entry both gone (a wiped range): what the rest of the row,
                        // which passes its checksums, gives is the block.
                        mine.copy_from_slice(rec);
                        want[si][b] = csum::block_crc(rec);
                        dirty[si] = true;
                        sums_dirty[si] = true;
                    }
                    fixed += 1;
                }
            }
        }
        _ => {
            let k = layout.copies();
            for col in 0..layout.data_columns {
                let copies: Vec<usize> = (0..k).map(|c| layout.data_slot(0, col, c)).collect();
                for b in 0..nb {
                    let bad: Vec<usize> = copies
                        .iter()
                        .copied()
                        .filter(|&si| present_bad(si, b, &ok, &bufs))
                        .collect();
                    if bad.is_empty() {
                        continue;
                    }
                    found += bad.len() as u64;
                    let good = copies
                        .iter()
                        .copied()
                        .find(|&si| bufs[si].is_some() && ok[si][b]);
                    let Some(g) = good else {
                        lost += bad.len() as u64;
                        continue;
                    };
                    let src = bufs[g].as_ref().expect("present")[b * bs..(b + 1) * bs].to_vec();
                    for si in bad {
                        let mine = &mut bufs[si].as_mut().expect("present")[b * bs..(b + 1) * bs];
                        if mine != &src[..] {
                            mine.copy_from_slice(&src);
                            dirty[si] = true;
                        }
                        if want[si][b] != want[g][b] {
                            want[si][b] = want[g][b];
                            sums_dirty[si] = true;
                        }
                        fixed += 1;
                    }
                }
            }
        }
    }
    for si in 0..w {
        let s = slots[si];
        let Some(dev) = devs[s.member].as_ref() else {
            continue;
        };
        if pool.read_only {
            if dirty[si] || sums_dirty[si] {
                pool.integrity.keep_healed(
                    (s.member, s.slab, window),
                    bufs[si].take().expect("present"),
                );
            }
            continue;
        }
        if dirty[si] {
            dev.write_at(
                data_start + u64::from(s.slab) * slab_size + window,
                bufs[si].as_ref().expect("present"),
            )?;
        }
        if sums_dirty[si] {
            pool.csums
                .store(dev, s.member, s.slab, window / csum::BLOCK, &want[si])?;
        }
    }
    pool.integrity.count(found, fixed, lost);
    Ok(lost)
}
