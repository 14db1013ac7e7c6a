//! The parity journal: closes the RAID write hole.
//!
//! The hole: a partial-row parity update writes new data and new parity to two or more
//! members; a power cut can land some of those writes and not others, so the parity no longer
//! matches the data of the row. The write-intent bitmap resyncs such rows at the next open, but
//! if a member is lost before that (missing at the open, or dead), its shards are rebuilt from
//! the stale parity: data that was never being written comes back wrong, and its checksum is
//! on the lost member, so nothing notices.
//!
//! The journal (format version 3; [`JOURNAL_SIZE`] bytes on every member, see
//! [`format`](crate::format)):
//! - Before the in-place writes of a parity batch, every member that gets a shard of a
//!   journaled row gets one *block* in its journal holding the new contents of those shards
//!   (data and parity), with a CRC-32C over the block, and is flushed; only then do the
//!   in-place writes start. A batch of writes (one [`submit`](vstor_core::BlockDevice::submit))
//!   costs one journal write and one flush per member it touches, whatever the number of
//!   requests and rows.
//! - A block names the batch (sequence number), the journal generation, the member it is on,
//!   and the set of members that got a block of the batch (the participants). Its records are
//!   logical: space identity, extent, row, shard, offset in the row and the bytes.
//! - At a writable open, before anything else touches the slabs (the bitmap resync included),
//!   every usable member's journal is read. A batch is *committed* when every participant that
//!   is usable now holds a valid block of it; committed batches are replayed in sequence order
//!   (each record written to wherever its shard lives now, with its block checksums), the
//!   members flushed, and the journal started afresh in a new generation. A batch that is not
//!   committed is dropped: a usable participant lacks its block, so the journal flush had not
//!   completed, so no in-place write of it had started and its rows are as they were.
//!   A committed batch whose in-place writes were cut is redone whole on the members that are
//!   left: data and parity of the row agree again, and a lost member's shards are rebuilt
//!   right. (A participant lost with the crash does not matter: its shards are rebuilt from
//!   the others, which the replay made agree.)
//! - Full-row writes (every data column of the row range written, so the parity depends only
//!   on the new data) skip the journal: a cut one can only leave the range being written
//!   undefined, which is allowed for a write never acknowledged. They are journaled anyway when
//!   the row already has a record in the current generation, so that a replay never brings an
//!   older record back over a newer unjournaled write.
//! - A generation ends when a member's journal is full, at a clean close and after a replay:
//!   with no journaled batch in flight, every member is flushed (so every in-place write of the
//!   generation is durable) and a new header (generation + 1) is written and flushed on every
//!   member. Records of older generations are never replayed. A batch bigger than a journal is
//!   cut into parts (a row range at most 256 KiB a part), each journaled and written in turn.
//! - A read-only open writes nothing, so it replays committed batches in memory: every member
//!   is seen through an overlay (`overlay::RamOverlay`) that takes the replay's writes (data
//!   and checksum pages) and lays them over what the member reads, so its rows read, and
//!   rebuild with a member missing, as they will once applied. They are counted in the
//!   pool's notes and [`JournalStats::pending_batches`]; a writable open applies them.
//!
//! On disk (little-endian), at `2 * slot_size` of every member:
//! - a header page (4 KiB): magic `VSTJHDR1`, the generation (u64), the member's identity (16
//!   bytes), zeroes to byte 64, a CRC-32C of bytes 0..64 at byte 64;
//! - blocks, each starting on a 4 KiB boundary and a whole number of 4 KiB pages: a 64-byte
//!   header (magic `VSTJBLK1`, generation u64, batch sequence u64, participants u64 (bit `m`:
//!   member `m` got a block of the batch), the member's identity (16 bytes), length u32, record
//!   count u32, CRC-32C u32 of the whole block with this field zero, 4 reserved bytes), then
//!   the records: space identity (16 bytes), extent u64, row u64, shard u32 (data columns,
//!   then parities), 4 reserved bytes, offset in the row u64, length u64, and the bytes.
//!   A reader scans every 4 KiB boundary for a block whose magic, generation (the header's),
//!   identity, length and CRC are right, so a torn block costs only itself.
//!
//! Mirror and simple spaces need no journal: a mirror row has no parity computed from other
//! data, and the bitmap resync (or the surviving copy) holds the old or the new contents of a
//! cut write.

use crate::csum::{self, Csums};
use crate::format::{Meta, JOURNAL_SIZE};
use crate::members::{Devs, Members};
use crate::store::lock;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use uuid::Uuid;
use vstor_core::{BlockDevice, Error, Result};

pub(crate) const PAGE: u64 = 4096;
const HEAD_MAGIC: [u8; 8] = *b"VSTJHDR1";
const BLOCK_MAGIC: [u8; 8] = *b"VSTJBLK1";
const BLOCK_HEADER: u64 = 64;
pub(crate) const RECORD_HEADER: u64 = 56;
/// The longest row range one record holds when a batch has to be cut into parts.
pub(crate) const MAX_UNIT: u64 = 256 << 10;

/// Bytes of a block holding records of `payload` bytes (headers included).
pub(crate) fn block_bytes(payload: u64) -> u64 {
    (BLOCK_HEADER + payload).div_ceil(PAGE) * PAGE
}

/// What the journal did since the pool was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Batches journaled (each one block and one flush per member it touched).
    pub batches: u64,
    /// Blocks written (one per member per batch).
    pub blocks: u64,
    /// Generations started because a journal was full.
    pub wraps: u64,
    /// Batches replayed at the open.
    pub replayed_batches: u64,
    /// Records (a shard range of a row) replayed at the open.
    pub replayed_records: u64,
    /// A read-only open after an unclean shutdown: committed batches it replayed in memory
    /// only (nothing is written; a writable open applies them).
    pub pending_batches: u64,
}

struct State {
    gen: u64,
    next_seq: u64,
    /// Bytes used in each member's journal (the header page included).
    heads: Vec<u64>,
    /// Member identities, by index (blocks name the member they are on).
    ids: Vec<Uuid>,
    /// Batches whose blocks are written and whose in-place writes are not finished.
    in_flight: usize,
    resetting: bool,
    /// Callers of [`Journal::forget_extents`] waiting for a new generation: no new batch is
    /// let in meanwhile, so the ones in flight drain.
    turn_wanted: usize,
    /// Rows with a record in this generation: (space, extent, row).
    rows: HashSet<(Uuid, u64, u64)>,
}

/// The journal of an open pool.
pub(crate) struct Journal {
    /// Offset of the journal on every member; `None`: the pool has none (format version 2).
    offset: Option<u64>,
    state: Mutex<State>,
    cv: Condvar,
    batches: AtomicU64,
    blocks: AtomicU64,
    wraps: AtomicU64,
    replayed_batches: AtomicU64,
    replayed_records: AtomicU64,
    /// A read-only open: committed batches replayed in memory only.
    pending: AtomicU64,
}

/// Held from a batch's journal write until its in-place writes are done.
pub(crate) struct Ticket<'a>(&'a Journal);

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).in_flight -= 1;
        self.0.cv.notify_all();
    }
}

/// One shard range to journal.
pub(crate) struct Entry<'a> {
    pub member: usize,
    pub extent: u64,
    pub row: u64,
    pub shard: u32,
    pub lo: u64,
    pub data: &'a [u8],
}

/// A record read back from a journal.
struct Record {
    space: Uuid,
    extent: u64,
    row: u64,
    shard: usize,
    lo: u64,
    data: Vec<u8>,
}

/// A valid block read back from a member's journal.
struct Block {
    member: usize,
    gen: u64,
    seq: u64,
    participants: u64,
    records: Vec<Record>,
}

fn header_page(gen: u64, id: Uuid) -> Vec<u8> {
    let mut b = vec![0u8; PAGE as usize];
    b[..8].copy_from_slice(&HEAD_MAGIC);
    b[8..16].copy_from_slice(&gen.to_le_bytes());
    b[16..32].copy_from_slice(id.as_bytes());
    let crc = crc32c::crc32c(&b[..64]);
    b[64..68].copy_from_slice(&crc.to_le_bytes());
    b
}

fn parse_header(b: &[u8], id: Uuid) -> Option<u64> {
    if b.len() < 68 || b[..8] != HEAD_MAGIC || &b[16..32] != id.as_bytes() {
        return None;
    }
    let crc = u32::from_le_bytes(b[64..68].try_into().ok()?);
    (crc32c::crc32c(&b[..64]) == crc).then(|| u64::from_le_bytes(b[8..16].try_into().unwrap()))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Builds the block of one member: header, then each record's header and bytes.
fn build_block(
    gen: u64,
    seq: u64,
    participants: u64,
    id: Uuid,
    space: Uuid,
    entries: &[&Entry<'_>],
) -> Vec<u8> {
    let payload: u64 = entries
        .iter()
        .map(|e| RECORD_HEADER + e.data.len() as u64)
        .sum();
    let len = block_bytes(payload);
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(&BLOCK_MAGIC);
    b.extend_from_slice(&gen.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&participants.to_le_bytes());
    b.extend_from_slice(id.as_bytes());
    b.extend_from_slice(&(len as u32).to_le_bytes());
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    b.extend_from_slice(&[0u8; 8]); // checksum, reserved
    for e in entries {
        b.extend_from_slice(space.as_bytes());
        b.extend_from_slice(&e.extent.to_le_bytes());
        b.extend_from_slice(&e.row.to_le_bytes());
        b.extend_from_slice(&e.shard.to_le_bytes());
        b.extend_from_slice(&[0u8; 4]);
        b.extend_from_slice(&e.lo.to_le_bytes());
        b.extend_from_slice(&(e.data.len() as u64).to_le_bytes());
        b.extend_from_slice(e.data);
    }
    b.resize(len as usize, 0);
    let crc = crc32c::crc32c(&b);
    b[56..60].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Parses the block at the start of `b` if it is a valid block of generation `gen` on member
/// `id`; returns it and its length.
fn parse_block(b: &[u8], member: usize, gen: u64, id: Uuid) -> Option<(Block, u64)> {
    if b.len() < BLOCK_HEADER as usize
        || b[..8] != BLOCK_MAGIC
        || u64_at(b, 8) != gen
        || &b[32..48] != id.as_bytes()
    {
        return None;
    }
    let len = u64::from(u32_at(b, 48));
    let count = u32_at(b, 52) as usize;
    if len < PAGE || len % PAGE != 0 || len > b.len() as u64 {
        return None;
    }
    let mut copy = b[..len as usize].to_vec();
    copy[56..60].fill(0);
    if crc32c::crc32c(&copy) != u32_at(b, 56) {
        return None;
    }
    let mut records = Vec::with_capacity(count.min(4096));
    let mut at = BLOCK_HEADER as usize;
    for _ in 0..count {
        if at + RECORD_HEADER as usize > len as usize {
            return None;
        }
        let r = &b[at..];
        let n = u64_at(r, 48);
        let end = (at as u64 + RECORD_HEADER).checked_add(n)?;
        if end > len {
            return None;
        }
        records.push(Record {
            space: Uuid::from_bytes(r[..16].try_into().expect("16 bytes")),
            extent: u64_at(r, 16),
            row: u64_at(r, 24),
            shard: u32_at(r, 32) as usize,
            lo: u64_at(r, 40),
            data: b[at + RECORD_HEADER as usize..end as usize].to_vec(),
        });
        at = end as usize;
    }
    Some((
        Block {
            member,
            gen,
            seq: u64_at(b, 16),
            participants: u64_at(b, 24),
            records,
        },
        len,
    ))
}

/// Writes `(member, offset, bytes)` and flushes each member, the members side by side.
/// Returns the first member that failed.
fn write_flush(
    devs: &Devs,
    writes: Vec<(usize, u64, Vec<u8>)>,
) -> std::result::Result<(), (usize, Error)> {
    let run = |(m, off, buf): &(usize, u64, Vec<u8>)| -> std::result::Result<(), (usize, Error)> {
        let dev = devs
            .get(*m)
            .and_then(Option::as_ref)
            .ok_or_else(|| (*m, Error::InvalidArgument("member not usable".into())))?;
        dev.write_at(*off, buf)
            .and_then(|()| dev.flush())
            .map_err(|e| (*m, e))
    };
    if writes.len() <= 1 {
        return writes.iter().try_for_each(run);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = writes[1..]
            .iter()
            .map(|w| s.spawn(move || run(w)))
            .collect();
        let mut r = run(&writes[0]);
        for h in handles {
            let x = h.join().expect("journal writer panicked");
            if r.is_ok() {
                r = x;
            }
        }
        r
    })
}

impl Journal {
    /// The journal of a pool whose metadata is `meta` (empty: a created pool's generation 1, or
    /// set by [`recover`](Journal::recover) at an open).
    pub fn new(meta: &Meta) -> Self {
        Journal {
            offset: meta.journal_offset(),
            state: Mutex::new(State {
                gen: 1,
                next_seq: 1,
                heads: vec![PAGE; meta.members.len()],
                ids: meta.members.iter().map(|m| m.id).collect(),
                in_flight: 0,
                resetting: false,
                turn_wanted: 0,
                rows: HashSet::new(),
            }),
            cv: Condvar::new(),
            batches: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            wraps: AtomicU64::new(0),
            replayed_batches: AtomicU64::new(0),
            replayed_records: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        }
    }

    /// Whether the pool has a journal (format version 3 and later).
    pub fn enabled(&self) -> bool {
        self.offset.is_some()
    }

    pub fn stats(&self) -> JournalStats {
        JournalStats {
            batches: self.batches.load(Ordering::Acquire),
            blocks: self.blocks.load(Ordering::Acquire),
            wraps: self.wraps.load(Ordering::Acquire),
            replayed_batches: self.replayed_batches.load(Ordering::Acquire),
            replayed_records: self.replayed_records.load(Ordering::Acquire),
            pending_batches: self.pending.load(Ordering::Acquire),
        }
    }

    /// The header page a member of a new pool gets (generation 1).
    pub fn initial_header(id: Uuid) -> Vec<u8> {
        header_page(1, id)
    }

    /// A member joins (a new disk, or a disk taken back fresh): its journal gets the header of
    /// the current generation, so its blocks count from now on.
    pub fn init_member(&self, dev: &dyn BlockDevice, member: usize, id: Uuid) -> Result<()> {
        let Some(off) = self.offset else {
            return Ok(());
        };
        let mut st = lock(&self.state);
        dev.write_at(off, &header_page(st.gen, id))?;
        dev.flush()?;
        if st.heads.len() <= member {
            st.heads.resize(member + 1, PAGE);
            st.ids.resize(member + 1, Uuid::nil());
        }
        st.heads[member] = PAGE;
        st.ids[member] = id;
        Ok(())
    }

    /// Starts generation `gen` on every usable member: flushes them (every in-place write of
    /// the old generation becomes durable), then writes and flushes the new header.
    fn start_generation(
        &self,
        devs: &Devs,
        ids: &[Uuid],
        gen: u64,
    ) -> std::result::Result<(), (usize, Error)> {
        Self::flush_all(devs)?;
        self.write_headers(devs, ids, gen)
    }

    fn flush_all(devs: &Devs) -> std::result::Result<(), (usize, Error)> {
        for (m, d) in devs.iter().enumerate() {
            if let Some(d) = d {
                d.flush().map_err(|e| (m, e))?;
            }
        }
        Ok(())
    }

    fn write_headers(
        &self,
        devs: &Devs,
        ids: &[Uuid],
        gen: u64,
    ) -> std::result::Result<(), (usize, Error)> {
        let off = self.offset.expect("journal");
        let writes = devs
            .iter()
            .enumerate()
            .filter(|(m, d)| d.is_some() && *m < ids.len())
            .map(|(m, _)| (m, off, header_page(gen, ids[m])))
            .collect();
        write_flush(devs, writes)
    }

    /// At a clean close (nothing in flight, members flushed): a new generation, so the next
    /// open has nothing to replay.
    pub fn close(&self, devs: &Devs) {
        if self.offset.is_none() {
            return;
        }
        let mut st = lock(&self.state);
        if st.rows.is_empty() && st.heads.iter().all(|&h| h == PAGE) {
            return;
        }
        let gen = st.gen + 1;
        if self.start_generation(devs, &st.ids, gen).is_ok() {
            st.gen = gen;
        }
    }

    /// Writes the blocks of one batch (entries grouped by member) and flushes; the in-place
    /// writes may start once this returns, and must be done before the ticket is dropped.
    pub(crate) fn log(
        &self,
        devs: &Devs,
        space: Uuid,
        entries: &[Entry<'_>],
        rows: &[(u64, u64)],
    ) -> std::result::Result<Ticket<'_>, (usize, Error)> {
        let off = self.offset.expect("journal");
        let mut by_member: BTreeMap<usize, Vec<&Entry<'_>>> = BTreeMap::new();
        for e in entries {
            by_member.entry(e.member).or_default().push(e);
        }
        let sizes: Vec<(usize, u64)> = by_member
            .iter()
            .map(|(&m, es)| {
                let payload = es.iter().map(|e| RECORD_HEADER + e.data.len() as u64).sum();
                (m, block_bytes(payload))
            })
            .collect();
        // write_rows cuts batches into parts that fit an empty journal, so the wait ends.
        debug_assert!(sizes.iter().all(|&(_, n)| n <= JOURNAL_SIZE - PAGE));
        let mut st = lock(&self.state);
        let (gen, seq, places, ids) = loop {
            let fits = |st: &State| {
                sizes
                    .iter()
                    .all(|&(m, n)| st.heads.get(m).copied().unwrap_or(PAGE) + n <= JOURNAL_SIZE)
            };
            if !st.resetting && st.turn_wanted == 0 && fits(&st) {
                if st.heads.len() < devs.len() {
                    st.heads.resize(devs.len(), PAGE);
                }
                let places: Vec<u64> = sizes
                    .iter()
                    .map(|&(m, n)| {
                        let at = st.heads[m];
                        st.heads[m] += n;
                        at
                    })
                    .collect();
                let seq = st.next_seq;
                st.next_seq += 1;
                st.in_flight += 1;
                for &(e, r) in rows {
                    st.rows.insert((space, e, r));
                }
                break (st.gen, seq, places, st.ids.clone());
            }
            if !st.resetting && st.turn_wanted == 0 && st.in_flight == 0 {
                // Full: a new generation once nothing journaled is in flight.
                let r;
                (st, r) = self.turn(st, devs);
                if r.is_ok() {
                    self.wraps.fetch_add(1, Ordering::AcqRel);
                }
                r?;
                continue;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        };
        drop(st);
        let ticket = Ticket(self);
        let mask = by_member.keys().fold(0u64, |a, &m| a | 1 << m);
        let writes: Vec<(usize, u64, Vec<u8>)> = by_member
            .iter()
            .zip(&places)
            .map(|((&m, es), &at)| {
                let id = ids.get(m).copied().unwrap_or_default();
                (m, off + at, build_block(gen, seq, mask, id, space, es))
            })
            .collect();
        let n = writes.len() as u64;
        write_flush(devs, writes)?;
        self.batches.fetch_add(1, Ordering::AcqRel);
        self.blocks.fetch_add(n, Ordering::AcqRel);
        Ok(ticket)
    }

    /// Starts the next generation (the caller saw nothing journaled in flight and no other
    /// turn under way): the state's lock is let go meanwhile, and taken again.
    #[allow(clippy::type_complexity)]
    fn turn<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        devs: &Devs,
    ) -> (
        MutexGuard<'a, State>,
        std::result::Result<(), (usize, Error)>,
    ) {
        st.resetting = true;
        let gen = st.gen + 1;
        let ids = st.ids.clone();
        drop(st);
        let flushed = Self::flush_all(devs);
        let r = flushed
            .clone()
            .and_then(|()| self.write_headers(devs, &ids, gen));
        let mut st = lock(&self.state);
        st.resetting = false;
        // Once headers went out (to every member; one that failed is failed by the caller),
        // new blocks must carry the new generation; if the flush failed first, none did.
        if flushed.is_ok() {
            st.gen = gen;
        }
        if r.is_ok() {
            st.heads.iter_mut().for_each(|h| *h = PAGE);
            st.rows.clear();
        }
        self.cv.notify_all();
        (st, r)
    }

    /// Whether (space, extent, row) has a record in the current generation.
    pub(crate) fn row_logged(&self, space: Uuid, extent: u64, row: u64) -> bool {
        lock(&self.state).rows.contains(&(space, extent, row))
    }

    /// Whether a row of (space, extent) has a record in the current generation.
    pub(crate) fn extent_logged(&self, space: Uuid, extent: u64) -> bool {
        lock(&self.state)
            .rows
            .iter()
            .any(|&(s, e, _)| s == space && e == extent)
    }

    /// Before thin extents are given back to the pool: if rows of them have records in the
    /// current generation, starts the next one (once nothing journaled is in flight), so that
    /// no replay can put their old contents back into the extents once allocated again (a
    /// replay writes a record wherever its extent lives then). Waits for journaled batches in
    /// flight: the caller holds no lock those need. Err names the member that failed.
    pub(crate) fn forget_extents(
        &self,
        devs: &Devs,
        space: Uuid,
        extents: &[u64],
    ) -> std::result::Result<(), (usize, Error)> {
        if self.offset.is_none() {
            return Ok(());
        }
        let logged = |st: &State| {
            st.rows
                .iter()
                .any(|&(s, e, _)| s == space && extents.contains(&e))
        };
        let mut st = lock(&self.state);
        if !logged(&st) {
            return Ok(());
        }
        st.turn_wanted += 1;
        let r = loop {
            if !logged(&st) {
                break Ok(());
            }
            if !st.resetting && st.in_flight == 0 {
                let r;
                (st, r) = self.turn(st, devs);
                if r.is_err() {
                    break r;
                }
                continue;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        };
        st.turn_wanted -= 1;
        drop(st);
        self.cv.notify_all();
        r
    }
}

/// Where a record's shard lives now: its slot and the offset in the slab; `None` for a
/// record that does not fit the space as it is now (a deleted space, a bad range).
fn record_target(meta: &Meta, r: &Record) -> Option<(crate::format::Slot, u64)> {
    let space = meta.spaces.iter().find(|s| s.id == r.space)?;
    let l = &space.layout;
    let n = r.data.len() as u64;
    let slots = space.extents.get(r.extent as usize)?.as_ref()?;
    if r.shard >= l.width
        || r.row >= l.slab_size / l.interleave
        || n == 0
        || n % csum::BLOCK != 0
        || r.lo % csum::BLOCK != 0
        || r.lo.checked_add(n).is_none_or(|e| e > l.interleave)
    {
        return None;
    }
    let si = if r.shard < l.data_columns {
        l.data_slot(r.row, r.shard, 0)
    } else {
        l.parity_slot(r.row, r.shard - l.data_columns)
    };
    Some((slots[si], l.slab_offset(r.row, r.lo)))
}

/// What [`Journal::recover`] works with: the pool's metadata as the open took it, its
/// members and checksums, and what the pool does when a member fails or must be recorded
/// missing (the journal takes them as arguments; it owns none of them).
pub(crate) struct Recovery<'a> {
    pub meta: Meta,
    pub members: &'a Members,
    pub csums: &'a Csums,
    pub read_only: bool,
    /// Records member `m` failed, for the reason given.
    pub fail_member: &'a dyn Fn(usize, &str),
    /// Before anything is written with a member missing: records it failed.
    pub record_missing: &'a dyn Fn() -> Result<()>,
}

impl Journal {
    /// At an open, before the resync: reads every usable member's journal, replays the
    /// committed batches (read-only: in memory, see the module documentation) and starts a
    /// new generation (not read-only). Returns notes.
    pub(crate) fn recover(&self, with: Recovery<'_>) -> Result<Vec<String>> {
        let Some(off) = self.offset else {
            return Ok(vec![
                "format version 2: this pool has no parity journal (a crash together with the loss of a member can corrupt data of a parity space that was not being written); a new pool has one".into(),
            ]);
        };
        let meta = with.meta;
        let devs = with.members.snapshot();
        let mut blocks: Vec<Block> = Vec::new();
        let mut max_gen = 0u64;
        let mut max_seq = 0u64;
        let mut gens = Vec::new();
        for (m, d) in devs.iter().enumerate() {
            let Some(d) = d else { continue };
            let id = meta.members[m].id;
            let mut area = vec![0u8; JOURNAL_SIZE as usize];
            d.read_at(off, &mut area)?;
            let gen = parse_header(&area, id);
            gens.push(gen);
            let Some(gen) = gen else { continue };
            max_gen = max_gen.max(gen);
            let mut pos = PAGE;
            while pos < JOURNAL_SIZE {
                match parse_block(&area[pos as usize..], m, gen, id) {
                    Some((b, len)) => {
                        max_seq = max_seq.max(b.seq);
                        blocks.push(b);
                        pos += len;
                    }
                    None => pos += PAGE,
                }
            }
        }
        // A fresh generation is needed unless every journal is empty and of one generation.
        let one_gen = gens.iter().all(|&g| g == Some(max_gen));
        let fresh = blocks.is_empty() && one_gen;
        if !one_gen {
            // A new generation was being started (its header reached some members and not
            // others): that starts with every member flushed, so every in-place write of the
            // older generations is durable, and replaying some of their batches without the
            // others could bring older contents back. Nothing is replayed.
            blocks.clear();
        }
        // A batch is committed when every usable participant holds its block.
        let mut batches: BTreeMap<(u64, u64), Vec<Block>> = BTreeMap::new();
        for b in blocks {
            batches.entry((b.seq, b.gen)).or_default().push(b);
        }
        let usable = |m: usize| devs.get(m).is_some_and(Option::is_some);
        batches.retain(|_, bs| {
            let mask = bs[0].participants;
            bs.iter().all(|b| b.participants == mask)
                && (0..64usize)
                    .filter(|&m| mask & (1 << m) != 0)
                    .all(|m| !usable(m) || bs.iter().any(|b| b.member == m))
        });
        let mut notes = Vec::new();
        if with.read_only {
            if batches.is_empty() {
                return Ok(notes);
            }
            // Replayed in memory: every member is seen through an overlay that holds the
            // replay's writes (data and checksum pages), so rows read and rebuild as they will
            // once a writable open applies the batches; the members are not written.
            let mut overlays = Vec::new();
            {
                let mut rt = with.members.write();
                for (m, member) in rt.iter_mut().enumerate() {
                    if let Some(d) = member.device.take() {
                        let o = Arc::new(crate::overlay::RamOverlay::new(d.clone()));
                        member.device = Some(o.clone());
                        overlays.push((m, o, d));
                    }
                }
            }
            let mut devs = with.members.snapshot();
            let mut records = 0u64;
            for bs in batches.values() {
                for b in bs {
                    for r in &b.records {
                        match replay_record(with.csums, &meta, &devs, r) {
                            Ok(done) => records += u64::from(done),
                            Err(e) => {
                                // The member failed (in memory: a read-only open records
                                // nothing); its shards are rebuilt from the others, which the
                                // replay makes agree, as after any failure.
                                let Some((s, _)) = record_target(&meta, r) else {
                                    return Err(e);
                                };
                                (with.fail_member)(
                                    s.member,
                                    &format!("journal replay in memory: {e}"),
                                );
                                devs = with.members.snapshot();
                            }
                        }
                    }
                }
            }
            // Members the replay did not write are read directly again (on the shared ring).
            {
                let mut rt = with.members.write();
                for (m, o, d) in overlays {
                    if o.is_empty() && rt[m].device.is_some() {
                        rt[m].device = Some(d);
                    }
                }
            }
            self.pending.store(batches.len() as u64, Ordering::Release);
            notes.push(format!(
                "unclean shutdown: {} journaled parity updates ({records} records) replayed in memory only (a read-only open writes nothing); a writable open applies them",
                batches.len()
            ));
            return Ok(notes);
        }
        let mut records = 0u64;
        if !batches.is_empty() {
            // Members missing now must not be trusted when they come back: the replay writes.
            (with.record_missing)()?;
            for bs in batches.values() {
                for b in bs {
                    for r in &b.records {
                        records += u64::from(replay_record(with.csums, &meta, &devs, r)?);
                    }
                }
            }
            notes.push(format!(
                "unclean shutdown: replayed {} journaled parity updates ({records} records)",
                batches.len()
            ));
            self.replayed_batches
                .fetch_add(batches.len() as u64, Ordering::AcqRel);
            self.replayed_records.fetch_add(records, Ordering::AcqRel);
        }
        let mut st = lock(&self.state);
        if fresh {
            st.gen = max_gen;
            return Ok(notes);
        }
        let gen = max_gen.max(st.gen) + 1;
        self.start_generation(&devs, &st.ids, gen)
            .map_err(|(_, e)| e)?;
        st.gen = gen;
        st.next_seq = max_seq + 1;
        Ok(notes)
    }
}

/// Writes one record where its shard lives now, with its block checksums. Records that do
/// not fit the space as it is now (a deleted space, a bad range) are skipped: false.
fn replay_record(csums: &Csums, meta: &Meta, devs: &Devs, r: &Record) -> Result<bool> {
    let Some((s, in_slab)) = record_target(meta, r) else {
        return Ok(false);
    };
    let Some(dev) = devs.get(s.member).and_then(Option::as_ref) else {
        return Ok(false);
    };
    dev.write_at(
        meta.data_start + u64::from(s.slab) * meta.slab_size + in_slab,
        &r.data,
    )?;
    csums.store(
        dev,
        s.member,
        s.slab,
        in_slab / csum::BLOCK,
        &csum::crcs(&r.data),
    )?;
    Ok(true)
}
