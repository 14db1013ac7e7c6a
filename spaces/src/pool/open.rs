//! Creating and opening pools: on devices the caller gives, on new files in a directory, on
//! devices named in a directory; reading every disk's metadata, telling which pool the disks
//! belong to, refusing split brains, and bringing the pool up (journal replay, resync,
//! catch-up) before it is handed out.

use super::*;

/// Reads `len` bytes at `offset` (a multiple of 4096 bytes is read and trimmed).
pub(super) fn read_exact(dev: &dyn BlockDevice, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len.div_ceil(4096) * 4096];
    dev.read_at(offset, &mut buf)?;
    buf.truncate(len);
    Ok(buf)
}

/// Reads one metadata slot whose header is at `offset`; `expect_slot` requires the copy to
/// name that slot size (slot B must sit at offset `slot_size`).
pub(super) fn read_slot(
    disk: &PoolDisk,
    offset: u64,
    expect_slot: Option<u64>,
) -> Result<Option<(Meta, usize)>> {
    let cap = disk.device.capacity();
    if offset + 4096 > cap {
        return Ok(None);
    }
    let head = read_exact(&*disk.device, offset, 4096)?;
    let Some((slot, len)) = Meta::peek(&head) else {
        return Ok(None);
    };
    if expect_slot.is_some_and(|s| s != slot) || offset + slot > cap {
        return Ok(None);
    }
    let blob = if len <= 4096 {
        head
    } else {
        read_exact(&*disk.device, offset, len as usize)?
    };
    Ok(Meta::parse(&blob, &disk.name, offset).ok())
}

/// The newest valid metadata copy on a disk, if it has one. A read that fails is an error
/// naming the disk.
pub(crate) fn read_best(disk: &PoolDisk) -> Result<Option<(Meta, usize)>> {
    read_best_unnamed(disk).map_err(|e| on_disk(&disk.name, e))
}

/// `e`, which happened on the disk `name`, as an error naming it.
pub(crate) fn on_disk(name: &str, e: Error) -> Error {
    SpacesError::Disk {
        disk: name.to_string(),
        source: e,
    }
    .into()
}

pub(super) fn read_best_unnamed(disk: &PoolDisk) -> Result<Option<(Meta, usize)>> {
    let a = read_slot(disk, 0, None)?;
    let b = match &a {
        Some((m, _)) => read_slot(disk, m.slot_size, Some(m.slot_size))?,
        None => {
            // Slot A is unreadable: slot B sits at the slot size, a power of two.
            let mut found = None;
            let mut s = MIN_SLOT;
            while s <= MAX_SLOT && found.is_none() {
                found = read_slot(disk, s, Some(s))?;
                s *= 2;
            }
            found
        }
    };
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(if b.0.sequence > a.0.sequence { b } else { a }),
        (a, b) => a.or(b),
    })
}

/// Creates the file `path` of `size` bytes (never over an existing file) and opens it with
/// `file`; when either fails the file is removed again, so no empty or short file is left for
/// a later open to trip over.
pub(super) fn create_member_file(path: &Path, size: u64, file: &FileOptions) -> Result<FileDevice> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    let sized = f
        .set_len(size)
        .map_err(|e| Error::io(format!("cannot size {} to {size} bytes", path.display()), e));
    drop(f);
    let dev = sized.and_then(|()| FileDevice::open(path, file));
    if dev.is_err() {
        let _ = std::fs::remove_file(path);
    }
    dev
}

/// Why an open found no pool: no metadata at all, or metadata of another format version.
pub(super) fn no_pool_reason(old: &[(String, u32)]) -> String {
    match old.first() {
        None => "no disk holds valid pool metadata".into(),
        Some((disk, v)) => format!(
            "{disk} (and {} more disks) holds pool metadata of format version {v}; this vstor reads versions {} to {} (version 2 added block checksums, version 3 the parity journal): open the pool with the vstor that made it and copy its spaces out",
            old.len() - 1,
            crate::format::MIN_VERSION,
            crate::format::VERSION
        ),
    }
}

/// The pool the disks `found` (each with its newest metadata) belong to: the one most of them
/// belong to. Disks of another pool are an error that names them (the stray ones, not the
/// members); without a majority the error names every side.
pub(super) fn pool_of(found: &[(PoolDisk, Meta, usize)]) -> Result<Uuid> {
    let mut groups: Vec<(Uuid, Vec<&str>)> = Vec::new();
    for (d, m, _) in found {
        match groups.iter_mut().find(|(id, _)| *id == m.pool_id) {
            Some((_, names)) => names.push(&d.name),
            None => groups.push((m.pool_id, vec![&d.name])),
        }
    }
    groups.sort_by_key(|(_, names)| std::cmp::Reverse(names.len()));
    let (id, members) = &groups[0];
    let Some((_, second)) = groups.get(1) else {
        return Ok(*id);
    };
    if second.len() == members.len() {
        let sides: Vec<String> = groups
            .iter()
            .map(|(id, names)| format!("pool {id}: {}", names.join(", ")))
            .collect();
        return Err(SpacesError::NoPool(format!(
            "the disks belong to different pools and no pool has most of them ({}); take the disks that are not this pool's out",
            sides.join("; ")
        ))
        .into());
    }
    let stray: Vec<&str> = groups[1..]
        .iter()
        .flat_map(|(_, names)| names.iter().copied())
        .collect();
    let pools: Vec<String> = groups[1..].iter().map(|(id, _)| id.to_string()).collect();
    let one = stray.len() == 1;
    Err(SpacesError::ForeignMember {
        disk: stray.join(", "),
        reason: format!(
            "{} to pool {}, not to pool {id} of the other {} disks ({}); take {} out",
            if one { "belongs" } else { "belong" },
            pools.join(" and "),
            members.len(),
            members.join(", "),
            if one { "it" } else { "them" },
        ),
    }
    .into())
}

/// Pairs of members (disk name, its newest metadata, its index in it) that were written apart,
/// described for an error: a member that one member's metadata records failed at sequence `f`
/// but whose own metadata (which calls it healthy) reached `f`, or two copies of one sequence
/// that differ.
pub(super) fn divergence(views: &[(&str, &Meta, usize)]) -> Vec<String> {
    let mut out = Vec::new();
    for (a, (an, am, ai)) in views.iter().enumerate() {
        for (b, (bn, bm, bi)) in views.iter().enumerate() {
            if a == b {
                continue;
            }
            let b_id = bm.members[*bi].id;
            let Some(rec) = am.members.iter().position(|m| m.id == b_id) else {
                continue;
            };
            let r = &am.members[rec];
            let b_self = &bm.members[*bi];
            // Taken back (caught up) after it was failed, from this very metadata or a
            // later one: the update that took it back reached it and not `a`.
            let taken_back =
                b_self.returned_seq >= r.failed_seq && am.sequence >= b_self.returned_seq;
            // `b`'s side recorded `a` failed after `a`'s newest metadata: `a` stopped while
            // `b`'s side went on, so `a`'s view is an older part of `b`'s history (a member
            // that missed updates), not a side of its own.
            let a_id = am.members[*ai].id;
            let a_behind = bm.members.iter().any(|m| {
                m.id == a_id && m.state == MemberState::Failed && m.failed_seq > am.sequence
            });
            if r.state == MemberState::Failed
                && r.failed_seq > 0
                && bm.sequence >= r.failed_seq
                && b_self.state != MemberState::Failed
                && !taken_back
                && !a_behind
            {
                out.push(format!(
                    "{an} (member {ai}, metadata sequence {}) records member {rec} failed at sequence {}, but {bn} (member {bi}) went on to sequence {} as a healthy member",
                    am.sequence, r.failed_seq, bm.sequence
                ));
            }
            if a < b && am.sequence == bm.sequence && am != bm {
                out.push(format!(
                    "{an} (member {ai}) and {bn} (member {bi}) hold different metadata of the same sequence {}",
                    am.sequence
                ));
            }
        }
    }
    out
}

impl Pool {
    /// Creates a pool on `disks`, which must not belong to a pool already. Every disk gets the
    /// pool's metadata in both slots; nothing is written if any disk is unfit.
    pub fn create(disks: Vec<PoolDisk>, opts: &CreateOptions) -> Result<Pool> {
        let slab = opts.slab_size;
        if !slab.is_power_of_two() || !(64 << 10..=64 << 30).contains(&slab) {
            return Err(invalid(format!(
                "slab size {slab} is not a power of two from 64 KiB to 64 GiB"
            )));
        }
        if disks.is_empty() || disks.len() > MAX_MEMBERS {
            return Err(invalid(format!(
                "a pool has 1 to {MAX_MEMBERS} disks, not {}",
                disks.len()
            )));
        }
        let mut est_slabs = 0u64;
        for d in &disks {
            let info = d.device.info();
            if info.read_only {
                return Err(invalid(format!("{} is read-only", d.name)));
            }
            if info.logical_sector_size > 4096 {
                return Err(invalid(format!(
                    "{} has {}-byte sectors; at most 4096",
                    d.name, info.logical_sector_size
                )));
            }
            if let Some((m, _)) = read_best(d)? {
                return Err(SpacesError::ForeignMember {
                    disk: d.name.clone(),
                    reason: format!("already a member of pool {}", m.pool_id),
                }
                .into());
            }
            est_slabs += info.capacity / slab;
        }
        for (i, a) in disks.iter().enumerate() {
            if disks[..i].iter().any(|b| Arc::ptr_eq(&a.device, &b.device)) {
                return Err(invalid(format!("{} is given twice", a.name)));
            }
        }
        // Room for every member and space, and for spaces four times the pool's slabs (thin).
        let need =
            256 + MAX_MEMBERS as u64 * 64 + MAX_SPACES as u64 * 128 + 8 * (4 * est_slabs + 4096);
        let slot_size = need.next_power_of_two().max(MIN_SLOT);
        if slot_size > MAX_SLOT {
            return Err(invalid(format!(
                "{est_slabs} slabs of {slab} bytes need more pool metadata than {MAX_SLOT} bytes; use a larger slab size"
            )));
        }
        let data_start = Meta::data_start_for(crate::format::VERSION, slot_size);
        let mut members = Vec::new();
        for d in &disks {
            let cap = d.device.capacity();
            let slabs = crate::csum::slabs_fitting(cap, data_start, slab);
            if slabs == 0 {
                return Err(SpacesError::DiskTooSmall {
                    disk: d.name.clone(),
                    size: cap,
                    needed: data_start + slab + crate::csum::area_bytes(1, slab),
                }
                .into());
            }
            members.push(MemberMeta {
                id: Uuid::new_v4(),
                capacity: cap,
                slab_count: slabs.min(MAX_SLABS) as u32,
                state: MemberState::Healthy,
                failed_seq: 0,
                current_through: 0,
                returned_seq: 0,
            });
        }
        let meta = Meta {
            version: crate::format::VERSION,
            pool_id: Uuid::new_v4(),
            sequence: 1,
            // Every member holds sequence 1 before any data is written.
            armed_epoch: 1,
            clean: false,
            slab_size: slab,
            slot_size,
            data_start,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            members,
            spaces: Vec::new(),
        };
        for (i, d) in disks.iter().enumerate() {
            let mut blob = meta.serialize(i);
            blob.resize(blob.len().div_ceil(4096) * 4096, 0);
            zero_range(&*d.device, data_start - BITMAP_SIZE, BITMAP_SIZE)?;
            if let Some(j) = meta.journal_offset() {
                let id = meta.members[i].id;
                d.device
                    .write_at(j, &crate::journal::Journal::initial_header(id))?;
            }
            d.device.write_at(0, &blob)?;
            d.device.write_at(slot_size, &blob)?;
            d.device.flush()?;
        }
        let rt = disks
            .into_iter()
            .map(|d| MemberRt {
                name: Some(d.name),
                device: Some(d.device),
                usable: true,
                seen_sequence: Some(1),
            })
            .collect();
        let pool = Pool::from_parts(meta, rt, false, Vec::new());
        // Every member holds the epoch (sequence 1): a clean close moves it on.
        pool.inner.armed.store(true, Ordering::Release);
        Ok(pool)
    }

    fn from_parts(meta: Meta, members: Vec<MemberRt>, read_only: bool, notes: Vec<String>) -> Pool {
        let starts = meta
            .members
            .iter()
            .map(|m| {
                (
                    crate::csum::area_start(meta.data_start, meta.slab_size, m.slab_count),
                    meta.csum_seed(m),
                )
            })
            .collect();
        let csums = crate::csum::Csums::new(meta.slab_size, starts);
        let journal = crate::journal::Journal::new(&meta);
        let intent = WriteIntentLog::new(meta.data_start);
        let opened_at = meta.sequence;
        Pool {
            inner: Arc::new(Inner {
                store: MetaStore::new(meta, read_only),
                members: Members::new(members),
                open_spaces: Mutex::new(HashMap::new()),
                read_only,
                missing_unrecorded: AtomicBool::new(false),
                armed: AtomicBool::new(false),
                notes: Mutex::new(notes),
                intent,
                csums,
                integrity: Integrity::default(),
                journal,
                opened_at,
            }),
        }
    }

    /// Opens the pool whose members are among `disks`: picks the newest valid metadata, reports
    /// missing members and members with stale metadata (and, unless read-only, brings the
    /// latter up to date). Disks without pool metadata are skipped and named in the notes; a
    /// disk of another pool, an unknown member or a member given twice is an error.
    ///
    /// Members written apart are refused with [`SpacesError::SplitBrain`] unless
    /// [`OpenOptions::force_member`] names the side to keep (see the crate documentation).
    /// The parity journal is then replayed (see [`crate::journal`]; read-only: in memory) and,
    /// unless read-only, the chunks the write-intent bitmaps name are resynced, before the
    /// pool is handed out.
    pub fn open(disks: Vec<PoolDisk>, opts: &OpenOptions) -> Result<Pool> {
        let mut notes = Vec::new();
        let mut found: Vec<(PoolDisk, Meta, usize)> = Vec::new();
        let mut old_versions = Vec::new();
        for d in disks {
            match read_best(&d)? {
                Some((m, i)) => found.push((d, m, i)),
                None => {
                    // A disk smaller than a metadata header (an empty file, a README) holds
                    // no pool metadata of any version.
                    if d.device.capacity() >= 4096 {
                        let head =
                            read_exact(&*d.device, 0, 4096).map_err(|e| on_disk(&d.name, e))?;
                        if let Some(v) = Meta::other_version(&head) {
                            old_versions.push((d.name.clone(), v));
                        }
                    }
                    notes.push(format!("{}: no pool metadata; not a member", d.name))
                }
            }
        }
        if found.is_empty() {
            return Err(SpacesError::NoPool(no_pool_reason(&old_versions)).into());
        }
        // Which pool this is: the one most disks belong to, never the one with the highest
        // sequence (a disk of another pool may be further along); a disk of another pool is
        // refused by its own name, so that no good member is blamed.
        let pool_id = pool_of(&found)?;
        let newest = found
            .iter()
            .filter(|(_, m, _)| m.pool_id == pool_id)
            .max_by_key(|(_, m, _)| m.sequence)
            .expect("the pool has a disk");
        // The metadata quorum: every present member must agree with the metadata taken (hold
        // it, or an older copy of its history). Members written apart are refused, or, with
        // force_member, the named side is kept and the others are taken as failed.
        let views: Vec<(&str, &Meta, usize)> = found
            .iter()
            .filter(|(_, m, _)| m.pool_id == newest.1.pool_id)
            .map(|(d, m, i)| (d.name.as_str(), m, *i))
            .collect();
        let (chosen, diverged) = match &opts.force_member {
            None => {
                let conflicts = divergence(&views);
                if !conflicts.is_empty() {
                    return Err(SpacesError::SplitBrain {
                        detail: format!(
                            "{}; taking either side's metadata would silently lose what the other side wrote since: open with force_member naming the disk whose side to keep (vstor space repair DIR --force-member DISK); the others are then taken as failed",
                            conflicts.join("; ")
                        ),
                    }
                    .into());
                }
                (newest.1.clone(), Vec::new())
            }
            Some(name) => {
                let pick = views
                    .iter()
                    .find(|(d, _, _)| {
                        *d == name
                            || Path::new(d).file_name().and_then(|f| f.to_str()) == Some(name)
                    })
                    .ok_or_else(|| {
                        invalid(format!(
                            "force_member: no member disk named '{name}' was found"
                        ))
                    })?;
                let diverged: Vec<Uuid> = views
                    .iter()
                    .filter(|v| v.0 != pick.0 && !divergence(&[*pick, **v]).is_empty())
                    .map(|(_, m, i)| m.members[*i].id)
                    .collect();
                let mut meta = pick.1.clone();
                // Past every sequence seen, so the kept side's next update is the newest.
                meta.sequence = views.iter().map(|v| v.1.sequence).max().unwrap_or(0);
                for m in meta.members.iter_mut() {
                    if diverged.contains(&m.id) && m.state != MemberState::Failed {
                        m.state = MemberState::Failed;
                        m.failed_seq = 0;
                    }
                }
                if !diverged.is_empty() {
                    notes.push(format!(
                        "force_member {name}: kept its metadata (sequence {}); {} diverged members taken as failed",
                        pick.1.sequence,
                        diverged.len()
                    ));
                }
                (meta, diverged)
            }
        };
        let mut meta = chosen;
        let mut rt: Vec<MemberRt> = meta
            .members
            .iter()
            .map(|_| MemberRt {
                name: None,
                device: None,
                usable: false,
                seen_sequence: None,
            })
            .collect();
        for (d, m, i) in found {
            if m.pool_id != meta.pool_id {
                return Err(SpacesError::ForeignMember {
                    disk: d.name,
                    reason: format!(
                        "belongs to pool {}, not to pool {} of the other disks",
                        m.pool_id, meta.pool_id
                    ),
                }
                .into());
            }
            let id = m.members[i].id;
            let Some(idx) = meta.members.iter().position(|x| x.id == id) else {
                return Err(SpacesError::ForeignMember {
                    disk: d.name,
                    reason: format!("member {id} is no longer in pool {}", meta.pool_id),
                }
                .into());
            };
            if meta.members[idx].state == MemberState::Removed {
                // Its slabs were moved off before it was removed: nothing of the pool is on
                // it, so it is skipped (and not kept open) rather than blocking the pool.
                notes.push(format!(
                    "{}: member {idx} was removed from the pool (pool remove-disk); not a member, it holds nothing of the pool and can be deleted",
                    d.name
                ));
                continue;
            }
            if let Some(other) = &rt[idx].name {
                return Err(SpacesError::ForeignMember {
                    disk: d.name,
                    reason: format!("is the same member ({id}) as {other}"),
                }
                .into());
            }
            if d.device.capacity() < meta.members[idx].capacity {
                return Err(SpacesError::ForeignMember {
                    disk: d.name,
                    reason: format!(
                        "has {} bytes; member {idx} had {}",
                        d.device.capacity(),
                        meta.members[idx].capacity
                    ),
                }
                .into());
            }
            rt[idx] = MemberRt {
                name: Some(d.name),
                usable: meta.members[idx].state != MemberState::Failed,
                device: Some(d.device),
                seen_sequence: Some(m.sequence),
            };
        }
        // A member whose newest metadata is older than the write epoch did not hold the
        // metadata that every usable member held before data was last written: it missed
        // writes (a disk pulled and put back, an old copy restored). Its data is never read;
        // a writable open records it failed.
        let mut stale = false;
        let mut behind_epoch = Vec::new();
        for (i, r) in rt.iter_mut().enumerate() {
            let m = &mut meta.members[i];
            let (Some(n), Some(seen)) = (&r.name, r.seen_sequence) else {
                continue;
            };
            if meta.version >= crate::format::KEYED_VERSION
                && m.current_through != 0
                && seen == m.current_through
            {
                // Still what it was when it went away (for a member recorded healthy: a
                // take-back that reached the others and not it): not read, and caught up
                // below.
                r.usable = false;
                continue;
            }
            if m.state == MemberState::Failed || seen >= meta.armed_epoch {
                continue;
            }
            r.usable = false;
            stale = true;
            behind_epoch.push(i);
            notes.push(format!(
                "member {i} ({n}) is stale: its metadata is at sequence {seen}, but data was written after sequence {} that it did not get; it is not read{} (vstor space repair takes the disk back and rebuilds it)",
                meta.armed_epoch,
                if opts.read_only {
                    ""
                } else {
                    "; recorded failed"
                }
            ));
            if !opts.read_only {
                m.state = MemberState::Failed;
                m.failed_seq = 0;
            }
        }
        if meta.version >= crate::format::KEYED_VERSION && !meta.clean && meta.sequence > 1 {
            notes.push(format!(
                "the pool was not closed cleanly after the write epoch of sequence {} (a crash, or a process killed while it had the pool open)",
                meta.armed_epoch
            ));
        }
        if meta.version < crate::format::KEYED_VERSION {
            notes.push(format!(
                "format version {}: a member that missed writes is not told apart from a current one, and block checksums are not bound to their position (a new pool has both; copy the spaces into one to upgrade)",
                meta.version
            ));
        }
        let mut missing = false;
        let mut catch_up = Vec::new();
        for (i, (m, r)) in meta.members.iter().zip(&rt).enumerate() {
            match (&r.name, m.state) {
                (None, MemberState::Removed) => {}
                (None, MemberState::Failed) => notes.push(format!("member {i} is missing (failed)")),
                (None, _) => {
                    missing = true;
                    notes.push(format!("member {i} ({}) is missing", m.id));
                }
                (Some(_), _) if behind_epoch.contains(&i) => {}
                (Some(n), _)
                    if meta.version >= crate::format::KEYED_VERSION
                        && m.current_through != 0
                        && r.seen_sequence == Some(m.current_through) =>
                {
                    if opts.read_only {
                        notes.push(format!(
                            "member {i} ({n}) missed the writes after sequence {}: it is not read; a writable open catches it up from the write-intent bitmaps",
                            m.current_through
                        ));
                    } else {
                        catch_up.push(i);
                    }
                }
                (Some(n), MemberState::Failed) => notes.push(format!(
                    "member {i} ({n}) is stale: it failed or missed writes; it is not read (vstor space repair takes the disk back and rebuilds it)"
                )),
                (Some(n), _) if r.seen_sequence < Some(meta.sequence) => {
                    stale = true;
                    notes.push(format!(
                        "member {i} ({n}) had metadata sequence {}, the pool is at {}{}",
                        r.seen_sequence.unwrap_or(0),
                        meta.sequence,
                        if opts.read_only { "" } else { "; refreshed" }
                    ));
                }
                _ => {}
            }
        }
        // After a clean close the bits left are those kept for a member that is behind: no
        // write was in flight, so there is nothing to resync.
        let was_clean = meta.version >= crate::format::KEYED_VERSION && meta.clean;
        let pool = Pool::from_parts(meta, rt, opts.read_only, notes);
        pool.inner
            .missing_unrecorded
            .store(missing, Ordering::Release);
        if (stale || !diverged.is_empty()) && !opts.read_only {
            let mut meta = pool.inner.store.lock();
            pool.inner.persist(&mut meta)?;
            // The diverged members get the kept metadata in both slots (they are failed in
            // it), so their own history is gone and the next open agrees.
            let rt = pool.inner.members.read();
            for (i, m) in meta.members.iter().enumerate() {
                let Some(dev) = rt[i].device.as_ref().filter(|_| diverged.contains(&m.id)) else {
                    continue;
                };
                let mut blob = meta.serialize(i);
                blob.resize(blob.len().div_ceil(4096) * 4096, 0);
                dev.write_at(0, &blob)?;
                dev.write_at(meta.slot_size, &blob)?;
                dev.flush()?;
            }
        }
        // A new write epoch before anything is written (with a member missing, at the first
        // write, once it is recorded failed: see `Inner::record_missing`).
        if !opts.read_only && !missing {
            pool.inner.arm(false)?;
        }
        // The journal first: replayed parity updates make their rows agree before the
        // bitmap resync looks at them.
        let journal_notes = pool.inner.recover_journal()?;
        lock(&pool.inner.notes).extend(journal_notes);
        let (_, resync_notes) = pool.inner.resync_at_open(was_clean)?;
        lock(&pool.inner.notes).extend(resync_notes);
        // Newest first: a member that left later holds writes that one that left earlier
        // missed, and once caught up it is their source.
        {
            let meta = pool.inner.store.lock();
            catch_up.sort_by_key(|&i| std::cmp::Reverse(meta.members[i].current_through));
        }
        for i in catch_up {
            let note = pool.inner.catch_up(i);
            lock(&pool.inner.notes).push(note);
        }
        Ok(pool)
    }

    /// Creates a pool of `count` new files of `disk_size` bytes each, `disk0.raw`,
    /// `disk1.raw`, ..., in `dir` (created if needed; existing files are never overwritten).
    /// The files are locked as [`open_dir`](Pool::open_dir) locks them.
    pub fn create_in_dir(
        dir: &Path,
        count: usize,
        disk_size: u64,
        opts: &CreateOptions,
        file: &FileOptions,
    ) -> Result<Pool> {
        if count == 0 || count > MAX_MEMBERS {
            return Err(invalid(format!(
                "a pool has 1 to {MAX_MEMBERS} disks, not {count}"
            )));
        }
        if disk_size % 4096 != 0 {
            return Err(invalid(format!(
                "disk size {disk_size} is not a multiple of 4096"
            )));
        }
        let min = Meta::data_start_for(crate::format::VERSION, MIN_SLOT)
            + opts.slab_size
            + crate::csum::area_bytes(1, opts.slab_size);
        if disk_size < min {
            return Err(SpacesError::DiskTooSmall {
                disk: dir.join("disk0.raw").display().to_string(),
                size: disk_size,
                needed: min,
            }
            .into());
        }
        let paths: Vec<PathBuf> = (0..count)
            .map(|i| dir.join(format!("disk{i}.raw")))
            .collect();
        if let Some(p) = paths.iter().find(|p| p.exists()) {
            return Err(invalid(format!("{} exists already", p.display())));
        }
        let new_dir = !dir.exists();
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut disks = Vec::new();
        let mut made = Vec::new();
        let file = &FileOptions {
            lock: true,
            ..file.clone()
        };
        let result = (|| {
            for p in &paths {
                let dev = create_member_file(p, disk_size, file)?;
                made.push(p.clone());
                disks.push(PoolDisk::new(p.display().to_string(), Arc::new(dev)));
            }
            Pool::create(disks, opts)
        })();
        if result.is_err() {
            // A failed create leaves nothing behind: no member file, no directory it made.
            for p in made {
                let _ = std::fs::remove_file(p);
            }
            if new_dir {
                let _ = std::fs::remove_dir(dir);
            }
        }
        result
    }

    /// Adds a new member file of `disk_size` bytes to the pool, in `dir` under the first free
    /// name `disk0.raw`, `disk1.raw`, ... (the pool's directory, as
    /// [`open_dir`](Pool::open_dir) finds it), locked as `open_dir` locks members. Returns the
    /// new member's index and the file. When it fails, the file is gone again.
    pub fn add_disk_in_dir(
        &self,
        dir: &Path,
        disk_size: u64,
        file: &FileOptions,
    ) -> Result<(usize, PathBuf)> {
        if self.inner.read_only {
            return Err(SpacesError::ReadOnly.into());
        }
        if disk_size % 4096 != 0 {
            return Err(invalid(format!(
                "disk size {disk_size} is not a multiple of 4096"
            )));
        }
        let path = (0..MAX_MEMBERS * 4)
            .map(|i| dir.join(format!("disk{i}.raw")))
            .find(|p| !p.exists())
            .ok_or_else(|| invalid(format!("{} has no free disk name", dir.display())))?;
        let file = &FileOptions {
            lock: true,
            ..file.clone()
        };
        let dev = create_member_file(&path, disk_size, file)?;
        match self.add_disk(PoolDisk::new(path.display().to_string(), Arc::new(dev))) {
            Ok(i) => Ok((i, path)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// [`remove_member`](Pool::remove_member) for a pool opened with
    /// [`open_dir`](Pool::open_dir) from `dir`, which then takes the member's disk out of the
    /// pool's directory, so no later open meets it: a member file in `dir` is deleted (it holds
    /// nothing of the pool: a member with slabs is refused), a device listed in
    /// `dir`/[`DEVICES_FILE`] is taken off the list (the device itself is left as it is).
    /// Returns the disk taken out, if the member was present. A disk that cannot be taken out
    /// (the member is removed in the metadata already) is an error naming it; a later open
    /// skips it with a note.
    pub fn remove_member_in_dir(&self, dir: &Path, index: usize) -> Result<Option<PathBuf>> {
        let name = self
            .inner
            .members
            .read()
            .get(index)
            .and_then(|r| r.device.as_ref().and(r.name.clone()));
        self.remove_member(index)?;
        let Some(name) = name else {
            return Ok(None);
        };
        let path = PathBuf::from(&name);
        let list = dir.join(DEVICES_FILE);
        let listed = std::fs::read_to_string(&list)
            .ok()
            .filter(|text| text.lines().any(|l| l.trim() == name.as_str()));
        if let Some(text) = listed {
            let rest: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim().is_empty() && l.trim() != name.as_str())
                .collect();
            let tmp = dir.join(format!(".{DEVICES_FILE}.new"));
            std::fs::write(&tmp, rest.join("\n") + "\n")
                .and_then(|()| std::fs::rename(&tmp, &list))
                .map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    on_disk(
                        &name,
                        Error::io(format!("take it off {}", list.display()), e),
                    )
                })?;
        } else if path.parent() == Some(dir) {
            std::fs::remove_file(&path)
                .map_err(|e| on_disk(&name, Error::io("delete the removed member's file", e)))?;
        } else {
            return Ok(None);
        }
        Ok(Some(path))
    }

    /// Creates a pool on existing devices or files (`paths`), and records their paths in
    /// `dir`/[`DEVICES_FILE`] (one a line) so that [`open_dir`](Pool::open_dir) finds them:
    /// `dir` then only names the pool. The devices must not belong to a pool. They are locked
    /// as [`open_dir`](Pool::open_dir) locks them.
    pub fn create_with_devices(
        dir: &Path,
        paths: &[PathBuf],
        opts: &CreateOptions,
        file: &FileOptions,
    ) -> Result<Pool> {
        let list = dir.join(DEVICES_FILE);
        if list.exists() {
            return Err(invalid(format!("{} exists already", list.display())));
        }
        let mut disks = Vec::new();
        let mut names = Vec::new();
        let file = &FileOptions {
            lock: true,
            ..file.clone()
        };
        for p in paths {
            let abs = std::fs::canonicalize(p)
                .map_err(|e| Error::io(format!("find {}", p.display()), e))?;
            let dev = FileDevice::open(&abs, file)?;
            names.push(abs.display().to_string());
            disks.push(PoolDisk::new(abs.display().to_string(), Arc::new(dev)));
        }
        let pool = Pool::create(disks, opts)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        std::fs::write(&list, names.join("\n") + "\n")
            .map_err(|e| Error::io(format!("write {}", list.display()), e))?;
        Ok(pool)
    }

    /// Opens the pool whose member files are in `dir`: every regular file there is offered,
    /// and every device or file listed in `dir`/[`DEVICES_FILE`].
    ///
    /// Every file and device is locked while the pool is open (an advisory `flock`, see
    /// [`FileOptions::lock`]): exclusively for a writable open, shared for a read-only one, so
    /// several read-only opens may share a pool but a writer excludes every other open. An open
    /// that finds a member locked fails with [`vstor_core::Error::Locked`], which names it,
    /// before anything is written. ([`Pool::open`] on devices the caller opened takes no lock.)
    pub fn open_dir(dir: &Path, opts: &OpenOptions, file: &FileOptions) -> Result<Pool> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("read directory {}", dir.display()), e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()) && e.file_name() != DEVICES_FILE)
            .map(|e| e.path())
            .collect();
        paths.sort();
        let local = paths.len();
        let list = dir.join(DEVICES_FILE);
        if list.exists() {
            let text = std::fs::read_to_string(&list)
                .map_err(|e| Error::io(format!("read {}", list.display()), e))?;
            paths.extend(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(PathBuf::from),
            );
        }
        // Every member locked (flock: exclusive when writable, shared when read-only) while
        // the pool is open, so that two processes never write one pool.
        let fo = FileOptions {
            read_only: opts.read_only || file.read_only,
            lock: true,
            ..file.clone()
        };
        let mut disks = Vec::new();
        let mut unopened = Vec::new();
        for (i, p) in paths.into_iter().enumerate() {
            match FileDevice::open(&p, &fo) {
                Ok(dev) => disks.push(PoolDisk::new(p.display().to_string(), Arc::new(dev))),
                // A listed device that cannot be opened is a missing member, not a failure;
                // one that another process holds is a failure.
                Err(e) if i >= local && !matches!(e, Error::Locked { .. }) => {
                    unopened.push(format!("{} (listed in {DEVICES_FILE}): {e}", p.display()))
                }
                Err(e) => return Err(e),
            }
        }
        if disks.is_empty() {
            return Err(SpacesError::NoPool(format!("{} holds no files", dir.display())).into());
        }
        let pool = Pool::open(disks, opts)?;
        lock(&pool.inner.notes).extend(unopened);
        Ok(pool)
    }
}
