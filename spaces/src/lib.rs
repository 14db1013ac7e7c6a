//! vstor-spaces: Storage Spaces-style pools of disks cut into slabs, with simple, mirror and
//! parity spaces as block devices.
//!
//! What exists:
//! - [`Pool`]: create a pool on any [`BlockDevice`](vstor_core::BlockDevice)s ([`Pool::create`]) or on new files in a
//!   directory ([`Pool::create_in_dir`]) or on existing devices named in a directory
//!   ([`Pool::create_with_devices`]); open it again ([`Pool::open`], [`Pool::open_dir`]).
//!   The files and devices of a pool opened or created through a directory are locked
//!   (`flock`: exclusive when writable, shared when read-only) while it is open, so a second
//!   process opening it for writing fails with [`vstor_core::Error::Locked`], naming the member.
//!   Every member holds the whole pool metadata (identity, members, slab map, space
//!   definitions) in two slots with sequence numbers and CRC-32C; opening picks the newest
//!   valid copy, reports missing members and members with stale metadata, refreshes the
//!   latter. Disks that hold no pool metadata (an empty file, a README) and disks of members
//!   removed from the pool are skipped with a note; the pool is the one most of the disks
//!   belong to, and disks of another pool are refused by their own names. Every error reading
//!   a disk names it. See [`format`](mod@format) for the on-disk layout.
//! - Stale members (format version 4): a write epoch in the metadata, moved on before
//!   anything is written after a writable open and again at a clean close, so a member whose
//!   newest metadata is older than the epoch (an old copy put back, a disk pulled and
//!   returned) missed writes: it is never read, a writable open records it failed, and
//!   [`Pool::take_back_present`] (or [`Pool::reuse_member`]) with [`Pool::repair`] rebuild
//!   it whole (CLI: `space repair` alone). Fixed spaces included; see [`format`](mod@format)
//!   for what it does not see.
//! - Catch-up of a member that was missing or failed while the pool was written (format
//!   version 4), as Linux md re-adds a member with a write-intent bitmap: while a member is
//!   behind, the write-intent bits are kept, and its record says through which metadata
//!   sequence it got every write; when it comes back holding exactly that sequence, the next
//!   writable open copies or rebuilds onto it only the chunks the bits name (its own contents
//!   never a source) and takes it back healthy. Anything else (an old copy put back) is
//!   rebuilt whole.
//! - A metadata quorum: every member present at an open must agree with the metadata taken
//!   (hold it or an older copy of its history). Members written apart (a split brain: each
//!   took writes while the other was missing, so one's metadata records the other failed at a
//!   sequence the other reached as a healthy member, or two copies of one sequence differ)
//!   make the open fail with [`SpacesError::SplitBrain`], which names the disks, members and
//!   sequences; [`OpenOptions::force_member`] (CLI: `space repair --force-member DISK`) keeps
//!   one side and takes the others as failed (their metadata is overwritten so the next open
//!   agrees; [`Pool::reuse_member`] brings them back).
//! - Spaces ([`Pool::create_space`]): simple, 2-way and 3-way mirror (copies on distinct
//!   disks), single parity (XOR) and dual parity (P + Q over GF(2^8)), with rotating parity;
//!   columns and interleave as Storage Spaces has them; thin or fixed provisioning (a thin
//!   extent takes its slabs at its first write, and a discard that covers it whole gives them
//!   back: recorded in the metadata, read as zeroes, allocated afresh by a later write; a
//!   parity space's journal starts a new generation first if it holds records of the extent's
//!   rows, so that no replay can put them back; the rest of a discard, write-zeroes, and a
//!   discard on a fixed space write zeroes; a write runs only on the extent map its
//!   write-intent bits were set from, so a release or a rebuild's switch in between sends it
//!   round again). A space grows online ([`Pool::resize_space`], or
//!   [`BlockDevice::resize`](vstor_core::BlockDevice::resize) with its capacity signal, as the
//!   reference VMM's API does); it never shrinks. A [`Space`] is a [`BlockDevice`](vstor_core::BlockDevice): a batch in becomes one batch per member, run side by side
//!   ([`vstor_core::submit_group`]: the members that are files on one io_uring driven by the
//!   submitting thread, each read checksummed as it completes while the rest are in flight; a
//!   full-stripe parity write's parity is encoded and checksummed on a second thread while
//!   its data is already being written).
//! - Degraded operation: reads and writes go on with as many members lost as the resiliency
//!   tolerates (missing at open, or failed by an I/O error, which is recorded in the metadata
//!   before anything is acknowledged, so a member that comes back with stale data is not
//!   trusted); beyond that a space refuses I/O with [`SpacesError::SpaceFailed`], writes
//!   nothing, and other spaces go on.
//! - Repair ([`Pool::repair`]): rebuilds the slabs of lost or retired members onto healthy
//!   ones, online (writes during the rebuild also reach the new slabs), an extent at a time
//!   with one metadata update per extent, so an interrupted repair resumes; [`Pool::add_disk`]
//!   ([`Pool::add_disk_in_dir`]: a new file, removed again if adding fails),
//!   [`Pool::retire_member`], [`Pool::remove_member`] ([`Pool::remove_member_in_dir`] also
//!   deletes the member's file, or takes its device off `pool.devices`), and
//!   [`Pool::reuse_member`] to take a failed disk that came back as a fresh member (its stale
//!   data is never read).
//! - A write-intent bitmap on every member and resync of its dirty chunks when a pool is
//!   opened after an unclean shutdown (mirror copies made equal, parity recomputed from the
//!   data), so a parity update cut by a crash does not corrupt other data on a later rebuild.
//! - A parity [`journal`] on every member (the RAID write hole): the new data and parity of a
//!   partial-row parity update reach the journals of the members they go to, checksummed and
//!   flushed, before any in-place write, one journal write and flush per member per batch;
//!   after a crash the committed batches are replayed at the open before anything else, so a
//!   crash followed by the loss of a member (before any resync) never rebuilds data that was
//!   not being written from a stale parity. Full-row writes skip it. The metadata format is
//!   version 4; a version 3 pool opens with the old checksum rule and no write epoch, a
//!   version 2 pool also without a journal (each says so), and both keep their version.
//!   A read-only open writes nothing: it replays them in memory (each member seen through an
//!   overlay holding the replay's writes), and a writable open applies them.
//! - Per-block CRC-32C ([`csum`]): every 512-byte block of every slab has a checksum in its
//!   member's checksum area, keyed (format version 4) by the pool's and member's identities
//!   and the block's position, so a zeroed member or a moved block fails it; written while
//!   the data is in flight (the write-intent bitmap
//!   covers both; a resync after a crash settles blocks whose data and checksum did not both
//!   land). Every read is verified: a bad block is served from a copy whose checksum matches
//!   or rebuilt from the rest of its parity row (dual parity: up to two bad or missing shards
//!   per block), and rewritten (self-heal; a read-only pool keeps the healed 4 KiB windows in
//!   memory instead of writing); a block with no good source fails the read with
//!   [`SpacesError::ChecksumMismatch`]. A damaged checksum entry over good data is rewritten.
//!   [`PoolInfo::integrity`](PoolInfo) counts what was found, healed and lost. A read range
//!   is checked with one CRC over it against the stored checksums of its blocks joined
//!   ([`csum::joined`]), block by block only when they differ. The cache of checksum pages is
//!   bounded ([`Pool::set_checksum_cache_limit`], 64 MiB by default). A version 1
//!   pool (no checksums) is refused with an error that says so.
//! - [`Pool::scrub`]: checks every block of every allocated extent, online, heals bad blocks
//!   from a good source, and reports chunks rewritten and blocks found bad, healed, lost and
//!   undecided ([`ScrubReport`]). Copies or parity rows that pass their checksums but
//!   disagree are settled only by what can tell them apart (most of three copies; dual
//!   parity naming the one odd shard out), never by slot order; the rest is left and counted. A rebuild
//!   heals its sources the same way before copying (each chunk read once; the verified
//!   buffers are what it writes, with the sources' checksums, while the next chunk is read).
//!   Rebuild and scrub hold the space's I/O off a step at a time (scrub: a sixteenth of a
//!   slab; rebuild: 32 MiB, reading the next step's first chunk while its last is written,
//!   and keeping it only if no write got in between), and let waiting I/O in between steps.
//!
//! What does not exist yet: an incremental resync of an old copy of a member put back (it
//! is rebuilt whole: the bits were cleared while the member was getting the writes, so they
//! cannot say what the copy lacks); a per-block write
//! generation (a range of a member rolled back together with its checksum entries, the
//! member's metadata left current, verifies; scrub then finds copies or parity that disagree
//! and reports them undecided unless most copies or dual parity tell); shrinking a space (a space grows, online:
//! [`Pool::resize_space`]); table-free
//! GF(2^8) multiplication by arbitrary constants (decode still uses a product table per
//! coefficient; P+Q encode runs on 64-bit lanes without tables); locking of pools opened with [`Pool::open`] on devices the caller
//! opened (only [`Pool::open_dir`] and the `create_*` calls lock their files); a quorum of
//! members present at an open (a split brain is found only when members of both sides are
//! present: if only the side that missed the other's writes is there, its metadata is the
//! newest the pool can see and its data is served, as for any degraded open; and two sides
//! that changed only metadata, to different sequences, are not told apart from a stale
//! member); verifying data
//! against its checksum inside a resync's dirty chunks when no copy or parity can rebuild it
//! (after a crash such a block is taken as it is and its checksum rewritten, as dm-integrity's
//! bitmap mode does: its write was never acknowledged, but real damage there goes unseen).
//!
//! How the crate is built (each subsystem owns its state behind its own lock and takes the
//! others it works with as arguments; none of them imports the pool):
//! - [`format`](mod@format) (the on-disk layout), `layout` (extents, rows, columns), `code`
//!   (GF(2^8) parity), [`csum`] (the block checksums and their page cache), `overlay`.
//! - `members`: the members at run time (their disks, usability) and the epoch that moves on
//!   at every change of usability or allocation.
//! - `store`: the metadata store: the pool metadata under its lock, persisting an update to
//!   every usable member, the slab allocator and the slabs reserved by moves in progress.
//! - `intent`: the write-intent log (a bitmap on every member, the gate writes hold while in
//!   flight).
//! - [`journal`]: the parity journal; its recovery at an open takes the metadata, members,
//!   checksums and what the pool does on a failure as arguments.
//! - `integrity`: what the block checksums caught ([`IntegrityStats`]) and a read-only pool's
//!   healed windows.
//! - `sync`: syncing a chunk of an extent (checking every block of every slot, healing, making
//!   copies and parity agree), for the resync, the catch-up, scrub and the mover.
//! - `pool`: the [`Pool`] API and `pool::Inner`, a plain composition of the subsystems above
//!   with the few operations that join them (recording a member failed, arming the write
//!   epoch); `pool/open.rs` creates and opens pools, `pool/extents.rs` allocates, releases and
//!   grows spaces' extents (the store and the open spaces' maps together).
//! - `resync` (the resync after a crash, the catch-up of a member behind, the journal's
//!   recovery), `scrub`, `repair` (members added, retired, removed, taken back; the repair
//!   loop) and `mover` (the extent mover: moves slots of an extent to new slabs online; repair
//!   uses it, tiering will).
//! - `space`: a [`Space`] as a block device: `space/direct.rs` (simple and mirror I/O and
//!   healthy parity reads: planned into one batch per member, run, verified), `space/parity.rs`
//!   (parity rows under stripe locks, journaled), `space/sums.rs` (checksums written beside the
//!   data, reads checksummed as they complete), `space/heal.rs` (self-heal of bad blocks).
//!
//! ```
//! use std::sync::Arc;
//! use vstor_core::{BlockDevice, MemoryDevice};
//! use vstor_spaces::{CreateOptions, Pool, PoolDisk, Provisioning, Resiliency, SpaceSpec};
//!
//! let disks = (0..3)
//!     .map(|i| PoolDisk::new(format!("m{i}"), Arc::new(MemoryDevice::new(16 << 20).unwrap())))
//!     .collect();
//! let pool = Pool::create(disks, &CreateOptions { slab_size: 1 << 20 })?;
//! pool.create_space(&SpaceSpec {
//!     name: "data".into(),
//!     size: 4 << 20,
//!     resiliency: Resiliency::Parity { redundancy: 1 },
//!     columns: None,
//!     interleave: Some(64 << 10),
//!     provisioning: Provisioning::Thin,
//! })?;
//! let space = pool.open_space("data")?;
//! space.write_at(0, &[7u8; 8192])?;
//! pool.fail_member(1)?;
//! let mut back = [0u8; 8192];
//! space.read_at(0, &mut back)?;
//! assert_eq!(back, [7u8; 8192]);
//! # Ok::<(), vstor_core::Error>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod code;
pub mod csum;
mod error;
pub mod format;
mod integrity;
mod intent;
pub mod journal;
mod layout;
mod members;
mod mover;
mod overlay;
mod pool;
mod repair;
mod resync;
mod scrub;
mod space;
mod store;
mod sync;

pub use code::{encode as parity_encode, reconstruct as parity_reconstruct};
pub use error::SpacesError;
pub use format::{MemberState, Provisioning};
pub use integrity::IntegrityStats;
pub use intent::CLEAR_DELAY;
pub use journal::JournalStats;
pub use layout::Resiliency;
pub use pool::{
    CreateOptions, MemberInfo, OpenOptions, Pool, PoolDisk, PoolInfo, SpaceHealth, SpaceInfo,
    SpaceSpec, DEFAULT_INTERLEAVE, DEFAULT_SLAB_SIZE, DEVICES_FILE,
};
pub use repair::RepairReport;
pub use scrub::ScrubReport;
pub use space::{Location, Space};
