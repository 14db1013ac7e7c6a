//! The on-disk pool metadata.
//!
//! Every member starts with two metadata slots of `slot_size` bytes (a power of two from 1 MiB
//! to 64 MiB): slot A at offset 0 and slot B at offset `slot_size`. The member's parity
//! journal follows ([`JOURNAL_SIZE`] bytes at `2 * slot_size`; format version 3, see
//! [`crate::journal`]), then its write-intent bitmap ([`BITMAP_SIZE`] bytes: bit
//! `slab * CHUNKS_PER_SLAB + chunk` set means a write to that chunk of that slab of this member
//! may be incomplete), and data slabs follow at
//! `data_start = 2 * slot_size + JOURNAL_SIZE + BITMAP_SIZE` (the bitmap is always the
//! [`BITMAP_SIZE`] bytes before `data_start`). A version 2 pool has no journal:
//! `data_start = 2 * slot_size + BITMAP_SIZE`; it opens and works as before (without the
//! journal's protection) and its metadata stays version 2. After a member's last slab
//! (`data_start + slab_count * slab_size`) comes its checksum area: a 4-byte CRC-32C for every
//! 512-byte block of each of its slabs, slab after slab, rounded up to 4 KiB (see
//! [`crate::csum`]; 0.78% of the member). An update writes the whole metadata, with the sequence number
//! one higher, to the slot `sequence % 2` of every usable member and flushes; so a torn update
//! leaves the other slot intact, and every member holds the whole pool's metadata (losing any
//! set of members that leaves one keeps it).
//!
//! Format version 4 (new pools) adds, with the same layout as version 3:
//! - the write epoch ([`MetaHeader::armed_epoch`]) and the clean flag ([`FLAG_CLEAN`]). A
//!   writable open (or, with a member missing, the first write, once the member is recorded
//!   failed) and a clean close move the epoch on in two updates: the first writes sequence
//!   `S` to every usable member, the second records `S` as the epoch. So every usable member
//!   held `S` before anything was written after it, and a member whose newest metadata is
//!   older than the epoch missed writes (a disk pulled and put back, an old copy of a member
//!   restored, a SAN path that flapped): it is stale, never read, and a writable open records
//!   it failed (`vstor space repair` takes the disk back and rebuilds it whole). This works for fixed spaces too, whose writes change no metadata, and for a
//!   crash between a data write and the next metadata update (the epoch moved before the
//!   write). A crash inside the first update leaves the old epoch (nobody is stale); inside
//!   the second, every member holds `S`. What it does not see: a copy of a member taken
//!   while the pool was open and put back after a crash (no clean close moved the epoch) is
//!   as new as the others by its metadata.
//! - catch-up of a member that was missing or failed while the pool was written (as Linux md
//!   re-adds a member with a write-intent bitmap): while any member is behind, the write-intent
//!   bits are kept instead of cleared, so the bitmaps name every chunk written since; the
//!   member's record says through which metadata sequence it got every write
//!   ([`MemberRecord::current_through`]). When it comes back holding exactly that sequence, a
//!   writable open copies or rebuilds only the chunks the bits name onto it (its own contents
//!   never a source) and takes it back. A member holding another sequence (an old copy put
//!   back) is rebuilt whole. A pool written this way (a member behind) is refused by a
//!   binary from before catch-up (its member record has a field that binary calls reserved).
//! - block checksums keyed by the pool's and member's identities and the block's position
//!   ([`crate::csum`]), so a zeroed member (data and checksum area) or a block moved with its
//!   checksum entry fails verification.
//!
//! Versions 3 and 2 still open, are read and written with the old checksum rule (a zeroed
//! block's entry is 0), keep their version and have no write epoch; the open says so in a
//! note. A pool is upgraded by copying each space into a space of a new pool: `vstor disk
//! read pool:OLD/NAME --length SIZE --output FILE`, then `vstor disk write pool:NEW/NAME
//! --input FILE`.
//!
//! A metadata copy is, in order, little-endian:
//! - a [`MetaHeader`] (256 bytes) with the magic, the sequence number, the pool and member
//!   identities, the counts of what follows and a CRC-32C of the whole copy;
//! - `member_count` [`MemberRecord`]s (64 bytes): identity, capacity, slab count, state, and
//!   (version 3) the sequence of the update that recorded the member failed;
//! - `space_count` [`SpaceRecord`]s (128 bytes): identity, name, size, resiliency, columns,
//!   interleave, provisioning, number of extents;
//! - `ref_count` [`SlabRef`]s (8 bytes): for each space in order, for each of its extents, one
//!   (member, slab) per slot of the extent; member `u32::MAX` marks a thin extent not allocated.
//!
//! Everything read is untrusted: the parser checks every count, range and cross-reference
//! and names the member, offset and field of the first thing wrong.

use crate::error::corrupt;
use crate::layout::{Layout, Resiliency};
use uuid::Uuid;
use vstor_core::Result;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The magic at the start of every metadata copy.
pub const MAGIC: [u8; 8] = *b"VSTPOOL1";
/// The format version of new pools: 4 since block checksums are bound to their member and
/// position and the metadata carries a write epoch (see [`MetaHeader::armed_epoch`]).
/// Version 3 (members carry a parity journal, checksums by the old rule) and version 2 (made
/// before the journal) still open, keep their version and the old checksum rule, and have no
/// stale-member detection (the open says so; copying the spaces into a new pool upgrades).
/// Version 1 had no block checksums and is refused with an error that says so.
pub const VERSION: u32 = 4;
/// The first format version whose block checksums are keyed by member and position and whose
/// metadata carries a write epoch.
pub const KEYED_VERSION: u32 = 4;
/// [`MetaHeader::flags`] bit: the pool was closed cleanly after its last write epoch.
pub const FLAG_CLEAN: u32 = 1;
/// The oldest format version this vstor opens.
pub const MIN_VERSION: u32 = 2;
/// Bytes of each member's parity journal (format version 3).
pub const JOURNAL_SIZE: u64 = 1 << 20;
/// Smallest metadata slot.
pub const MIN_SLOT: u64 = 1 << 20;
/// Largest metadata slot.
pub const MAX_SLOT: u64 = 64 << 20;
/// The most members a pool has.
pub const MAX_MEMBERS: usize = 64;
/// The most spaces a pool has.
pub const MAX_SPACES: usize = 64;
/// Longest space name, in bytes.
pub const MAX_NAME: usize = 64;
/// Slab member value of a thin extent not yet allocated.
pub const UNALLOCATED: u32 = u32::MAX;
/// Bytes of each member's write-intent bitmap.
pub const BITMAP_SIZE: u64 = 1 << 20;
/// Write-intent bitmap bits per slab: one per sixteenth of a slab.
pub const CHUNKS_PER_SLAB: u64 = 16;
/// The most slabs a member can have (its bitmap must hold them).
pub const MAX_SLABS: u64 = BITMAP_SIZE * 8 / CHUNKS_PER_SLAB;

/// The header of a metadata copy.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MetaHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`VERSION`] (or [`MIN_VERSION`] for a pool made before the journal).
    pub version: U32,
    /// Size of this header (256).
    pub header_size: U32,
    /// CRC-32C of the whole copy (`blob_len` bytes) with this field zero.
    pub checksum: U32,
    /// Version 4: [`FLAG_CLEAN`] or nothing; before: zero.
    pub flags: U32,
    /// Sequence number: the copy with the highest valid one is current.
    pub sequence: U64,
    /// Bytes of this copy (header and records).
    pub blob_len: U64,
    /// The pool's identity.
    pub pool_id: [u8; 16],
    /// The identity of the member this copy is written on.
    pub member_id: [u8; 16],
    /// Members that follow.
    pub member_count: U32,
    /// Spaces that follow.
    pub space_count: U32,
    /// Slab references that follow.
    pub ref_count: U64,
    /// Bytes per slab.
    pub slab_size: U64,
    /// Bytes per metadata slot.
    pub slot_size: U64,
    /// Offset of slab 0 on every member.
    pub data_start: U64,
    /// Creation time, seconds since the Unix epoch.
    pub created: U64,
    /// Version 4: the write epoch, the sequence of the last update that every usable member
    /// was known to hold before data was written (or the pool was closed) after it. A
    /// member whose own newest metadata is older than the epoch may have missed writes: it is
    /// stale and never read (see [`Pool::open`](crate::Pool::open)). Before version 4: zero.
    pub armed_epoch: U64,
    /// Reserved, zero.
    pub reserved: [u8; 128],
}

/// One member of the pool.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MemberRecord {
    /// The member's identity.
    pub id: [u8; 16],
    /// Its capacity when it joined.
    pub capacity: U64,
    /// Slabs it holds.
    pub slab_count: U32,
    /// 0 healthy, 1 failed (its data is stale), 2 retired (no new slabs), 3 removed.
    pub state: U32,
    /// The metadata sequence number of the update that first recorded the member failed (0:
    /// not failed, or failed before format version 3). A member whose own metadata reached
    /// that sequence while it still called itself healthy was written apart from the members
    /// that failed it (a split brain; see [`Pool::open`](crate::Pool::open)). Always 0 in
    /// version 2.
    pub failed_seq: U64,
    /// Format version 4: the metadata sequence through which a failed (or missing) member
    /// got every write, when every write since is named by the other members' write-intent
    /// bitmaps (they keep their bits while a member is behind); 0 when that is not known. A
    /// member that comes back holding exactly this sequence is caught up from the bitmaps
    /// instead of being rebuilt whole (see [`Pool::open`](crate::Pool::open)).
    pub current_through: U64,
    /// Format version 4: the sequence every usable member held when this member, failed,
    /// was caught up and taken back (0: never). The update that takes it back may reach it
    /// and not the others (a torn update): they then record it failed while it went on as
    /// healthy, which is a split brain unless it went on from their own sequence, through a
    /// take-back that started after it was failed.
    pub returned_seq: U64,
    /// Reserved, zero.
    pub reserved: [u8; 8],
}

/// One space of the pool.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SpaceRecord {
    /// The space's identity.
    pub id: [u8; 16],
    /// Its name, UTF-8, padded with zero bytes.
    pub name: [u8; 64],
    /// Size in bytes.
    pub size: U64,
    /// Extents (each `width` slab references follow for it).
    pub extent_count: U64,
    /// Interleave in bytes.
    pub interleave: U32,
    /// Columns (see the layout).
    pub columns: U16,
    /// 0 simple, 1 mirror, 2 parity.
    pub resiliency: u8,
    /// Copies (mirror) or redundancy (parity); 0 for simple.
    pub param: u8,
    /// 0 thin, 1 fixed.
    pub provisioning: u8,
    /// Reserved, zero.
    pub reserved: [u8; 23],
}

/// One slot of an extent: a slab of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SlabRef {
    /// Member index ([`UNALLOCATED`]: not allocated).
    pub member: U32,
    /// Slab index on the member.
    pub slab: U32,
}

const HEADER: usize = std::mem::size_of::<MetaHeader>();
const MEMBER: usize = std::mem::size_of::<MemberRecord>();
const SPACE: usize = std::mem::size_of::<SpaceRecord>();
const REF: usize = std::mem::size_of::<SlabRef>();

/// A member's state, as the metadata records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// In use.
    Healthy,
    /// Missed writes or failed I/O: its data is not trusted until repaired.
    Failed,
    /// Being retired: no new slabs are allocated on it.
    Retired,
    /// Removed from the pool (it held no slabs); its record stays as a tombstone.
    Removed,
}

impl MemberState {
    fn code(self) -> u32 {
        match self {
            MemberState::Healthy => 0,
            MemberState::Failed => 1,
            MemberState::Retired => 2,
            MemberState::Removed => 3,
        }
    }

    /// The name `pool info` prints.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Healthy => "healthy",
            MemberState::Failed => "failed",
            MemberState::Retired => "retired",
            MemberState::Removed => "removed",
        }
    }
}

/// How a space's slabs are provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    /// Slabs are allocated on first write.
    Thin,
    /// Every slab is allocated when the space is created.
    Fixed,
}

/// A member as the metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemberMeta {
    pub id: Uuid,
    pub capacity: u64,
    pub slab_count: u32,
    pub state: MemberState,
    /// The sequence of the update that recorded it failed (0: none known).
    pub failed_seq: u64,
    /// See [`MemberRecord::current_through`] (0: not known; a rebuild is needed).
    pub current_through: u64,
    /// See [`MemberRecord::returned_seq`] (0: never taken back).
    pub returned_seq: u64,
}

/// A slot of an allocated extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub member: usize,
    pub slab: u32,
}

/// A space as the metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpaceMeta {
    pub id: Uuid,
    pub name: String,
    pub size: u64,
    pub layout: Layout,
    pub provisioning: Provisioning,
    /// Per extent: its slots, or `None` while a thin extent is not allocated.
    pub extents: Vec<Option<Vec<Slot>>>,
}

/// The whole pool metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    /// The format version the pool was made with (2: no journal, 3: journal, 4: keyed
    /// checksums and write epochs).
    pub version: u32,
    pub pool_id: Uuid,
    pub sequence: u64,
    /// The write epoch ([`MetaHeader::armed_epoch`]; 0 before version 4).
    pub armed_epoch: u64,
    /// Closed cleanly since the last write epoch ([`FLAG_CLEAN`]; false before version 4).
    pub clean: bool,
    pub slab_size: u64,
    pub slot_size: u64,
    pub data_start: u64,
    pub created: u64,
    pub members: Vec<MemberMeta>,
    pub spaces: Vec<SpaceMeta>,
}

impl Meta {
    /// Slab references the metadata holds.
    /// Whether a copy with `extra` more slab references (extents times width) still fits a
    /// metadata slot (checked before anything that size is allocated).
    pub fn room_for_refs(&self, extra: u64) -> bool {
        extra
            .checked_mul(REF as u64)
            .and_then(|b| b.checked_add(self.blob_len()))
            .is_some_and(|n| n <= self.slot_size)
    }

    pub fn ref_count(&self) -> u64 {
        self.spaces
            .iter()
            .map(|s| s.extents.len() as u64 * s.layout.width as u64)
            .sum()
    }

    /// The key seed of `member`'s block checksums ([`crate::csum::member_seed`]; 0, the old
    /// unkeyed rule, before format version 4).
    pub fn csum_seed(&self, member: &MemberMeta) -> u64 {
        if self.version >= KEYED_VERSION {
            crate::csum::member_seed(&self.pool_id, &member.id)
        } else {
            0
        }
    }

    /// Where each member's parity journal starts, if the pool has one (format version 3).
    pub fn journal_offset(&self) -> Option<u64> {
        (self.version >= 3).then(|| 2 * self.slot_size)
    }

    /// Where data slabs start on a member of a pool of format `version`.
    pub fn data_start_for(version: u32, slot_size: u64) -> u64 {
        2 * slot_size + BITMAP_SIZE + if version >= 3 { JOURNAL_SIZE } else { 0 }
    }

    /// Bytes a copy of this metadata takes.
    pub fn blob_len(&self) -> u64 {
        (HEADER + self.members.len() * MEMBER + self.spaces.len() * SPACE) as u64
            + self.ref_count() * REF as u64
    }

    /// The copy written on member `member`.
    pub fn serialize(&self, member: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.blob_len() as usize);
        let header = MetaHeader {
            magic: MAGIC,
            version: self.version.into(),
            header_size: (HEADER as u32).into(),
            checksum: 0.into(),
            flags: if self.version >= KEYED_VERSION && self.clean {
                FLAG_CLEAN
            } else {
                0
            }
            .into(),
            sequence: self.sequence.into(),
            blob_len: self.blob_len().into(),
            pool_id: *self.pool_id.as_bytes(),
            member_id: *self.members[member].id.as_bytes(),
            member_count: (self.members.len() as u32).into(),
            space_count: (self.spaces.len() as u32).into(),
            ref_count: self.ref_count().into(),
            slab_size: self.slab_size.into(),
            slot_size: self.slot_size.into(),
            data_start: self.data_start.into(),
            created: self.created.into(),
            armed_epoch: if self.version >= KEYED_VERSION {
                self.armed_epoch
            } else {
                0
            }
            .into(),
            reserved: [0; 128],
        };
        out.extend_from_slice(header.as_bytes());
        for m in &self.members {
            let r = MemberRecord {
                id: *m.id.as_bytes(),
                capacity: m.capacity.into(),
                slab_count: m.slab_count.into(),
                state: m.state.code().into(),
                failed_seq: if self.version >= 3 { m.failed_seq } else { 0 }.into(),
                current_through: if self.version >= KEYED_VERSION {
                    m.current_through
                } else {
                    0
                }
                .into(),
                returned_seq: if self.version >= KEYED_VERSION {
                    m.returned_seq
                } else {
                    0
                }
                .into(),
                reserved: [0; 8],
            };
            out.extend_from_slice(r.as_bytes());
        }
        for s in &self.spaces {
            let mut name = [0u8; 64];
            name[..s.name.len()].copy_from_slice(s.name.as_bytes());
            let r = SpaceRecord {
                id: *s.id.as_bytes(),
                name,
                size: s.size.into(),
                extent_count: (s.extents.len() as u64).into(),
                interleave: (s.layout.interleave as u32).into(),
                columns: (s.layout.columns as u16).into(),
                resiliency: s.layout.resiliency.code(),
                param: s.layout.resiliency.param(),
                provisioning: u8::from(s.provisioning == Provisioning::Fixed),
                reserved: [0; 23],
            };
            out.extend_from_slice(r.as_bytes());
        }
        for s in &self.spaces {
            for e in &s.extents {
                for i in 0..s.layout.width {
                    let r = match e {
                        Some(slots) => SlabRef {
                            member: (slots[i].member as u32).into(),
                            slab: slots[i].slab.into(),
                        },
                        None => SlabRef {
                            member: UNALLOCATED.into(),
                            slab: 0.into(),
                        },
                    };
                    out.extend_from_slice(r.as_bytes());
                }
            }
        }
        let crc = crc32c::crc32c(&out);
        out[16..20].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads the header fields a reader needs before the rest: `(slot_size, blob_len)`, if
    /// `bytes` start like a metadata copy whose sizes are sane.
    pub fn peek(bytes: &[u8]) -> Option<(u64, u64)> {
        let (h, _) = MetaHeader::ref_from_prefix(bytes).ok()?;
        let slot = h.slot_size.get();
        let len = h.blob_len.get();
        (h.magic == MAGIC
            && slot.is_power_of_two()
            && (MIN_SLOT..=MAX_SLOT).contains(&slot)
            && (HEADER as u64..=slot).contains(&len))
        .then_some((slot, len))
    }

    /// The format version of bytes that start like a metadata copy of a version this vstor
    /// does not read (so an open can say why a disk is not taken).
    pub fn other_version(bytes: &[u8]) -> Option<u32> {
        let (h, _) = MetaHeader::ref_from_prefix(bytes).ok()?;
        let v = h.version.get();
        (h.magic == MAGIC && !(MIN_VERSION..=VERSION).contains(&v)).then_some(v)
    }

    /// Parses and checks a metadata copy read from `file` at `offset`. Returns the metadata and
    /// the index of the member the copy was written on.
    pub fn parse(bytes: &[u8], file: &str, offset: u64) -> Result<(Meta, usize)> {
        let bad = |at: usize, what: &str, reason: String| {
            corrupt(file, offset + at as u64, what.to_string(), reason)
        };
        let (h, _) = MetaHeader::ref_from_prefix(bytes)
            .map_err(|_| bad(0, "pool metadata header", "too short".into()))?;
        if h.magic != MAGIC {
            return Err(bad(0, "pool metadata magic", "not a pool member".into()));
        }
        if h.version.get() == 1 && h.header_size.get() as usize == HEADER {
            return Err(bad(
                8,
                "pool metadata version",
                "version 1 (a pool made before block checksums) is not supported by this vstor, \
                 which reads versions 2 to 4: copy the spaces' data out with the vstor that made it"
                    .into(),
            ));
        }
        let version = h.version.get();
        if !(MIN_VERSION..=VERSION).contains(&version) || h.header_size.get() as usize != HEADER {
            return Err(bad(
                8,
                "pool metadata version",
                format!(
                    "version {} with a {}-byte header is not supported",
                    h.version.get(),
                    h.header_size.get()
                ),
            ));
        }
        let blob_len = h.blob_len.get();
        if blob_len > bytes.len() as u64 || blob_len < HEADER as u64 {
            return Err(bad(
                32,
                "pool metadata length",
                format!("{blob_len} bytes, the slot has {}", bytes.len()),
            ));
        }
        let blob = &bytes[..blob_len as usize];
        let mut copy = blob.to_vec();
        copy[16..20].fill(0);
        let crc = crc32c::crc32c(&copy);
        if crc != h.checksum.get() {
            return Err(bad(
                16,
                "pool metadata checksum",
                format!("stored {:#010x}, computed {crc:#010x}", h.checksum.get()),
            ));
        }
        let flag_mask = if version >= KEYED_VERSION {
            FLAG_CLEAN
        } else {
            0
        };
        if h.flags.get() & !flag_mask != 0
            || h.reserved.iter().any(|&b| b != 0)
            || (version < KEYED_VERSION && h.armed_epoch.get() != 0)
        {
            return Err(bad(
                20,
                "pool metadata header",
                "reserved fields are not zero".into(),
            ));
        }
        if h.armed_epoch.get() > h.sequence.get() {
            return Err(bad(
                120,
                "pool metadata write epoch",
                format!(
                    "{} is past the copy's sequence {}",
                    h.armed_epoch.get(),
                    h.sequence.get()
                ),
            ));
        }
        let members = h.member_count.get() as usize;
        let spaces = h.space_count.get() as usize;
        let refs = h.ref_count.get();
        if members == 0 || members > MAX_MEMBERS || spaces > MAX_SPACES {
            return Err(bad(
                72,
                "pool metadata counts",
                format!("{members} members, {spaces} spaces"),
            ));
        }
        let expect = ((HEADER + members * MEMBER + spaces * SPACE) as u64)
            .saturating_add(refs.saturating_mul(REF as u64));
        if expect != blob_len {
            return Err(bad(
                32,
                "pool metadata length",
                format!("{blob_len} bytes, the counts need {expect}"),
            ));
        }
        let slab_size = h.slab_size.get();
        let slot_size = h.slot_size.get();
        let data_start = h.data_start.get();
        if !slab_size.is_power_of_two() || !(64 << 10..=64 << 30).contains(&slab_size) {
            return Err(bad(
                88,
                "slab size",
                format!("{slab_size} is not a power of two from 64 KiB to 64 GiB"),
            ));
        }
        if !slot_size.is_power_of_two()
            || !(MIN_SLOT..=MAX_SLOT).contains(&slot_size)
            || data_start != Meta::data_start_for(version, slot_size)
        {
            return Err(bad(
                96,
                "metadata slot size",
                format!("slot {slot_size}, data start {data_start}"),
            ));
        }
        let mut meta = Meta {
            version,
            pool_id: Uuid::from_bytes(h.pool_id),
            sequence: h.sequence.get(),
            armed_epoch: h.armed_epoch.get(),
            clean: h.flags.get() & FLAG_CLEAN != 0,
            slab_size,
            slot_size,
            data_start,
            created: h.created.get(),
            members: Vec::with_capacity(members),
            spaces: Vec::with_capacity(spaces),
        };
        let mut at = HEADER;
        for i in 0..members {
            let (r, _) = MemberRecord::ref_from_prefix(&blob[at..]).expect("length checked");
            let state = match r.state.get() {
                0 => MemberState::Healthy,
                1 => MemberState::Failed,
                2 => MemberState::Retired,
                3 => MemberState::Removed,
                s => return Err(bad(at + 28, "member state", format!("member {i}: {s}"))),
            };
            if r.reserved.iter().any(|&b| b != 0)
                || (version < 3 && r.failed_seq.get() != 0)
                || (version < KEYED_VERSION
                    && (r.current_through.get() != 0 || r.returned_seq.get() != 0))
            {
                return Err(bad(
                    at + 32,
                    "member record",
                    format!("member {i}: reserved bytes are not zero"),
                ));
            }
            let id = Uuid::from_bytes(r.id);
            if meta.members.iter().any(|m| m.id == id) {
                return Err(bad(
                    at,
                    "member identity",
                    format!("member {i}: {id} twice"),
                ));
            }
            let capacity = r.capacity.get();
            let slab_count = r.slab_count.get();
            if u64::from(slab_count) > MAX_SLABS
                || (u64::from(slab_count))
                    .checked_mul(slab_size)
                    .and_then(|b| b.checked_add(data_start))
                    .and_then(|b| {
                        b.checked_add(crate::csum::area_bytes(u64::from(slab_count), slab_size))
                    })
                    .is_none_or(|end| end > capacity)
            {
                return Err(bad(
                    at + 24,
                    "member slab count",
                    format!("member {i}: {slab_count} slabs do not fit in {capacity} bytes"),
                ));
            }
            meta.members.push(MemberMeta {
                id,
                capacity,
                slab_count,
                state,
                failed_seq: r.failed_seq.get(),
                current_through: r.current_through.get(),
                returned_seq: r.returned_seq.get(),
            });
            at += MEMBER;
        }
        let me = meta
            .members
            .iter()
            .position(|m| m.id.as_bytes() == &h.member_id)
            .ok_or_else(|| {
                bad(
                    56,
                    "member identity",
                    "the copy's member is not in its member table".into(),
                )
            })?;
        let mut records = Vec::with_capacity(spaces);
        for _ in 0..spaces {
            let (r, _) = SpaceRecord::ref_from_prefix(&blob[at..]).expect("length checked");
            records.push((at, r.clone()));
            at += SPACE;
        }
        let mut used: Vec<Vec<bool>> = meta
            .members
            .iter()
            .map(|m| vec![false; m.slab_count as usize])
            .collect();
        let mut ref_at = at;
        let mut total_refs = 0u64;
        for (i, (rat, r)) in records.into_iter().enumerate() {
            let sbad = |field: usize, what: &str, reason: String| {
                bad(rat + field, what, format!("space {i}: {reason}"))
            };
            if r.reserved.iter().any(|&b| b != 0) {
                return Err(sbad(
                    105,
                    "space record",
                    "reserved bytes are not zero".into(),
                ));
            }
            let nlen = r.name.iter().position(|&b| b == 0).unwrap_or(MAX_NAME);
            if r.name[nlen..].iter().any(|&b| b != 0) {
                return Err(sbad(
                    16,
                    "space name",
                    "bytes after the name are not zero".into(),
                ));
            }
            let name = std::str::from_utf8(&r.name[..nlen])
                .ok()
                .filter(|n| valid_name(n))
                .ok_or_else(|| sbad(16, "space name", "not a valid name".into()))?
                .to_string();
            if meta.spaces.iter().any(|s| s.name == name) {
                return Err(sbad(16, "space name", format!("'{name}' twice")));
            }
            let resiliency = Resiliency::from_code(r.resiliency, r.param).ok_or_else(|| {
                sbad(
                    102,
                    "space resiliency",
                    format!("kind {} with {}", r.resiliency, r.param),
                )
            })?;
            let layout = Layout::new(
                resiliency,
                usize::from(r.columns.get()),
                u64::from(r.interleave.get()),
                slab_size,
            )
            .map_err(|e| sbad(96, "space layout", e.to_string()))?;
            let size = r.size.get();
            let extents = r.extent_count.get();
            if size == 0 || size % 4096 != 0 || layout.extents_for(size) != extents {
                return Err(sbad(
                    80,
                    "space size",
                    format!("{size} bytes in {extents} extents"),
                ));
            }
            if layout.width > meta.members.len() {
                return Err(sbad(
                    100,
                    "space columns",
                    format!("{} disks wide, the pool has {}", layout.width, members),
                ));
            }
            let provisioning = match r.provisioning {
                0 => Provisioning::Thin,
                1 => Provisioning::Fixed,
                p => return Err(sbad(104, "space provisioning", format!("{p}"))),
            };
            total_refs = total_refs.saturating_add(extents.saturating_mul(layout.width as u64));
            if total_refs > refs {
                return Err(sbad(
                    88,
                    "space extent count",
                    format!("{extents} extents exceed the {refs} slab references"),
                ));
            }
            let mut ext = Vec::with_capacity(extents as usize);
            for e in 0..extents {
                let mut slots = Vec::with_capacity(layout.width);
                let mut unallocated = 0;
                for _ in 0..layout.width {
                    let (sr, _) = SlabRef::ref_from_prefix(&blob[ref_at..]).expect("length");
                    let (m, slab) = (sr.member.get(), sr.slab.get());
                    let rbad = |reason: String| {
                        bad(
                            ref_at,
                            "slab reference",
                            format!("space {i} extent {e}: {reason}"),
                        )
                    };
                    if m == UNALLOCATED {
                        if slab != 0 {
                            return Err(rbad("an unallocated slot names a slab".into()));
                        }
                        unallocated += 1;
                    } else {
                        let m = m as usize;
                        let u = used
                            .get_mut(m)
                            .and_then(|u| u.get_mut(slab as usize))
                            .ok_or_else(|| {
                                rbad(format!("member {m} slab {slab} does not exist"))
                            })?;
                        if *u {
                            return Err(rbad(format!("member {m} slab {slab} is used twice")));
                        }
                        *u = true;
                        if slots.iter().any(|s: &Slot| s.member == m) {
                            return Err(rbad(format!("member {m} holds two slots")));
                        }
                        slots.push(Slot { member: m, slab });
                    }
                    ref_at += REF;
                }
                ext.push(match unallocated {
                    0 => Some(slots),
                    n if n == layout.width && provisioning == Provisioning::Thin => None,
                    _ => {
                        return Err(bad(
                            ref_at,
                            "slab reference",
                            format!("space {i} extent {e}: partly allocated"),
                        ))
                    }
                });
            }
            meta.spaces.push(SpaceMeta {
                id: Uuid::from_bytes(r.id),
                name,
                size,
                layout,
                provisioning,
                extents: ext,
            });
        }
        if total_refs != refs {
            return Err(bad(
                80,
                "slab reference count",
                format!("{refs} stored, the spaces use {total_refs}"),
            ));
        }
        Ok((meta, me))
    }
}

/// Recomputes the CRC-32C of the metadata copy at the start of `slot` (as the header's length
/// says; nothing happens if the length does not fit), for fuzzers and tests that patch fields
/// and want the checks beyond the checksum to run.
pub fn reseal(slot: &mut [u8]) {
    if slot.len() < HEADER {
        return;
    }
    let len = u64::from_le_bytes(slot[32..40].try_into().expect("8 bytes"));
    let Some(len) = usize::try_from(len)
        .ok()
        .filter(|&l| (HEADER..=slot.len()).contains(&l))
    else {
        return;
    };
    slot[16..20].fill(0);
    let crc = crc32c::crc32c(&slot[..len]);
    slot[16..20].copy_from_slice(&crc.to_le_bytes());
}

/// Whether `name` is a valid space name: 1 to 64 bytes of letters, digits, `-`, `_` and `.`,
/// not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::tests_support::sample_meta as sample;
    use super::*;

    #[test]
    fn round_trip() {
        let m = sample();
        let b = m.serialize(1);
        assert_eq!(b.len() as u64, m.blob_len());
        let mut slot = b.clone();
        slot.resize(MIN_SLOT as usize, 0);
        assert_eq!(Meta::peek(&slot), Some((MIN_SLOT, b.len() as u64)));
        let (back, me) = Meta::parse(&slot, "d", 0).unwrap();
        assert_eq!(back, m);
        assert_eq!(me, 1);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let b = sample().serialize(0);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(Meta::parse(&c, "d", 0).is_err(), "byte {i}");
        }
    }

    #[test]
    fn cross_references_are_checked() {
        let mut m = sample();
        m.spaces[0].extents[2] = Some(vec![
            Slot { member: 0, slab: 0 },
            Slot { member: 1, slab: 1 },
        ]);
        let e = Meta::parse(&m.serialize(0), "d", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("used twice"), "{e}");
        let mut m = sample();
        m.spaces[0].extents[0] = Some(vec![
            Slot { member: 0, slab: 5 },
            Slot { member: 0, slab: 6 },
        ]);
        let e = Meta::parse(&m.serialize(0), "d", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("two slots"), "{e}");
        let mut m = sample();
        m.spaces[0].extents[0] = Some(vec![
            Slot {
                member: 0,
                slab: 99,
            },
            Slot { member: 1, slab: 6 },
        ]);
        let e = Meta::parse(&m.serialize(0), "d", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }
}

#[cfg(test)]
mod fuzz {
    use super::tests_support::sample_meta;
    use super::*;
    use proptest::prelude::*;

    fn with_crc(mut b: Vec<u8>) -> Vec<u8> {
        if b.len() >= 20 {
            b[16..20].fill(0);
            let crc = crc32c::crc32c(&b);
            b[16..20].copy_from_slice(&crc.to_le_bytes());
        }
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Hostile metadata with a valid checksum: every field mutated in turn gives a typed
        /// error or a metadata that serializes back to the same bytes; never a panic.
        #[test]
        fn mutated_metadata_with_a_valid_crc_never_panics(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let m = sample_meta();
            let mut b = m.serialize(1);
            for (i, v) in edits {
                let i = i.index(b.len());
                b[i] = v;
            }
            if let Some(c) = cut {
                b.truncate(c.index(b.len()));
            }
            let b = with_crc(b);
            if let Ok((back, me)) = Meta::parse(&b, "fuzz", 0) {
                prop_assert_eq!(back.serialize(me), b);
            }
        }
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;

    /// A metadata with three members and one thin mirror space.
    pub fn sample_meta() -> Meta {
        let layout = Layout::new(Resiliency::Mirror { copies: 2 }, 1, 65536, 1 << 20).unwrap();
        Meta {
            version: VERSION,
            pool_id: Uuid::from_u128(7),
            sequence: 7,
            armed_epoch: 5,
            clean: true,
            slab_size: 1 << 20,
            slot_size: MIN_SLOT,
            data_start: Meta::data_start_for(VERSION, MIN_SLOT),
            created: 1,
            members: (0..3)
                .map(|i| MemberMeta {
                    id: Uuid::from_u128(100 + i),
                    capacity: 16 << 20,
                    slab_count: 11,
                    state: MemberState::Healthy,
                    failed_seq: 0,
                    current_through: 0,
                    returned_seq: 0,
                })
                .collect(),
            spaces: vec![SpaceMeta {
                id: Uuid::from_u128(9),
                name: "data".into(),
                size: 3 << 20,
                layout,
                provisioning: Provisioning::Thin,
                extents: vec![
                    Some(vec![
                        Slot { member: 0, slab: 0 },
                        Slot { member: 2, slab: 0 },
                    ]),
                    None,
                    Some(vec![
                        Slot { member: 1, slab: 3 },
                        Slot { member: 0, slab: 1 },
                    ]),
                ],
            }],
        }
    }
}
