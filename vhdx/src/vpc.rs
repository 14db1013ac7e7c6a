//! Legacy VHD images (Microsoft Virtual Hard Disk, "vpc" in QEMU), read-only, as a
//! [`BlockDevice`], so that they can be converted to VHDX.
//!
//! # The format
//! Every VHD ends with a 512-byte [`Footer`] (cookie `conectix`). A *fixed* disk is the raw
//! data followed by the footer. A *dynamic* disk starts with a copy of the footer, then a
//! 1024-byte [`DynHeader`] (cookie `cxsparse`) that points at the block allocation table (BAT):
//! one big-endian `u32` per block, the sector number where the block starts in the file, or
//! `0xFFFF_FFFF` when the block is not allocated. An allocated block is a sector bitmap (one bit
//! per 512-byte sector, the most significant bit of the first byte for the first sector, padded
//! to a multiple of 512 bytes) followed by the block's data. A *differencing* disk is a dynamic
//! disk whose header also names its parent: the parent's unique id, its name and up to eight
//! [`ParentLocator`]s (file paths in several platform encodings).
//!
//! How each region reads:
//! - fixed: straight from the file;
//! - dynamic: an unallocated block, and a sector whose bitmap bit is 0, reads as zeros;
//! - differencing: an unallocated block, and a sector whose bitmap bit is 0, reads from the
//!   parent (zeros past the parent's end).
//!
//! QEMU ignores the sector bitmaps when it reads (it reads an allocated block whole from the
//! file, and sets every bit when it allocates one); this reader follows the specification and
//! honours them, which gives the same bytes for every image QEMU writes.
//!
//! # Capacity: `current_size`, not the CHS geometry
//! The footer states the size twice: `current_size` in bytes and a CHS geometry. Virtual PC
//! sized disks by the geometry, which can address less than `current_size`; Hyper-V, Disk2vhd,
//! XenServer and newer QEMU (creator `qem2`, `force_size=on`) use `current_size`. QEMU's
//! `block/vpc.c` picks by creator application: `current_size` for `win `, `qem2`, `d2v `,
//! `CTXS` and `tap\0`, and for any image whose geometry is the maximum (65535/16/255);
//! otherwise (`vpc `, `qemu`, anything unknown) the geometry. This reader always uses
//! `current_size` (rounded down to a whole sector), as Hyper-V does when it attaches the same
//! file: a conversion then keeps every byte the file can hold, and images QEMU creates without
//! `force_size` have `current_size` equal to their geometry anyway. [`Vpc::qemu_capacity`]
//! tells what QEMU would show, for callers that want to warn when the two differ.
//!
//! # Untrusted input
//! Every structure is checked before it is used: cookies, checksums, versions, the disk type,
//! sizes (at most [`MAX_VIRTUAL_SIZE`]), the block size (a power of two from
//! [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`]), the BAT (at most [`MAX_BAT_ENTRIES`] entries
//! read, inside the file), every allocated block (inside the file, clear of the metadata and of
//! the other blocks) and the parent locators. Each defect is a typed error naming the file, the
//! byte offset and the structure; memory is bounded by the file's size and these limits.
//!
//! # Parents
//! [`Vpc::open`] follows a differencing disk's locators: relative paths (`W2ru`, `Wi2r`)
//! against the child's directory first, then absolute ones (`W2ku`, `Wi2k`, and `MacX`/`Mac `
//! `file://` URLs), then the parent's file name (from the absolute locators and the header's
//! parent name) in the child's directory. The first candidate that exists is the parent; its
//! footer's unique id must be the one the child's header records ([`VpcError::ParentMismatch`]
//! otherwise). The parent timestamp is not compared (Windows compares it with the file's
//! modification time, which a copy changes). Cycles and chains of more than
//! [`MAX_CHAIN_DEPTH`] parents are refused. Windows paths are matched case-sensitively.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use smallvec::SmallVec;
use vstor_core::{
    carve_read_bufs, zero_bufs, BlockDevice, DeviceInfo, Error, FileDevice, FileOptions, Op,
    OpKind, Request, Result, Supports,
};
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::byteorder::little_endian;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The sector size of every VHD.
pub const SECTOR: u64 = 512;
/// The footer's cookie.
pub const FOOTER_COOKIE: [u8; 8] = *b"conectix";
/// The dynamic disk header's cookie.
pub const DYN_HEADER_COOKIE: [u8; 8] = *b"cxsparse";
/// Footer `disk_type` of a fixed disk.
pub const DISK_FIXED: u32 = 2;
/// Footer `disk_type` of a dynamic disk.
pub const DISK_DYNAMIC: u32 = 3;
/// Footer `disk_type` of a differencing disk.
pub const DISK_DIFFERENCING: u32 = 4;
/// The file format version every footer and dynamic header carries (1.0).
pub const VERSION_1_0: u32 = 0x0001_0000;
/// A BAT entry of an unallocated block.
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;
/// Parent locator platform code: absolute Windows path, UTF-16LE.
pub const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
/// Parent locator platform code: Windows path relative to the child, UTF-16LE.
pub const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
/// Parent locator platform code (deprecated): absolute Windows path, single-byte characters.
pub const PLATFORM_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
/// Parent locator platform code (deprecated): relative Windows path, single-byte characters.
pub const PLATFORM_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
/// Parent locator platform code: a Mac OS alias (read here only when it holds a `file://` URL).
pub const PLATFORM_MAC: u32 = u32::from_be_bytes(*b"Mac ");
/// Parent locator platform code: a `file://` URL, UTF-8.
pub const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");
/// The largest virtual size accepted: 2040 GiB, the format's documented limit (and QEMU's).
pub const MAX_VIRTUAL_SIZE: u64 = 2040 << 30;
/// The smallest block size accepted (QEMU's limit; Windows writes 2 MiB).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The largest block size accepted.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// The most BAT entries read (16 MiB of table): 2040 GiB in 512 KiB blocks.
pub const MAX_BAT_ENTRIES: u64 = 1 << 22;
/// The deepest differencing chain followed (parents below the disk opened).
pub const MAX_CHAIN_DEPTH: usize = 64;
/// The longest parent locator read, in bytes (a 32767-character UTF-16 path fits).
pub const MAX_LOCATOR_LEN: u32 = 64 << 10;

/// The footer's geometry when it is the maximum CHS (65535 cylinders, 16 heads, 255 sectors).
const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;

/// The hard disk footer: the last 512 bytes of every VHD (and, for dynamic and differencing
/// disks, also the first 512). All fields big-endian.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Footer {
    /// `conectix`.
    pub cookie: [u8; 8],
    /// Feature bits (bit 0: temporary disk; bit 1: reserved, always set).
    pub features: U32,
    /// File format version, [`VERSION_1_0`].
    pub format_version: U32,
    /// Byte offset of the dynamic disk header; all ones for a fixed disk.
    pub data_offset: U64,
    /// Creation time, seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp: U32,
    /// The application that created the image (`vpc `, `win `, `qemu`, `qem2`, `d2v `, ...).
    pub creator_app: [u8; 4],
    /// The creator application's version (major in the high 16 bits).
    pub creator_version: U32,
    /// The creator's host OS (`Wi2k`, `Mac `).
    pub creator_host_os: [u8; 4],
    /// The size at creation, in bytes.
    pub original_size: U64,
    /// The current virtual size, in bytes.
    pub current_size: U64,
    /// CHS geometry: cylinders.
    pub cylinders: U16,
    /// CHS geometry: heads.
    pub heads: u8,
    /// CHS geometry: sectors per track.
    pub sectors_per_track: u8,
    /// [`DISK_FIXED`], [`DISK_DYNAMIC`] or [`DISK_DIFFERENCING`].
    pub disk_type: U32,
    /// One's complement of the sum of the footer's bytes, this field counted as zero.
    pub checksum: U32,
    /// The disk's unique id (what a child's `parent_unique_id` names).
    pub unique_id: [u8; 16],
    /// 1 when the disk belongs to a saved virtual machine.
    pub saved_state: u8,
    /// Zero.
    pub reserved: [u8; 427],
}

/// One entry of a dynamic header's parent locator table. All fields big-endian.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ParentLocator {
    /// How the data is encoded ([`PLATFORM_W2KU`], [`PLATFORM_W2RU`], ...; 0: unused entry).
    pub platform_code: U32,
    /// Space reserved for the data (sectors by the specification, bytes as Windows writes it).
    pub platform_data_space: U32,
    /// Length of the data in bytes.
    pub platform_data_length: U32,
    /// Zero.
    pub reserved: U32,
    /// Byte offset of the data in the file.
    pub platform_data_offset: U64,
}

/// The dynamic disk header of dynamic and differencing disks (1024 bytes, at the footer's
/// `data_offset`). All fields big-endian.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DynHeader {
    /// `cxsparse`.
    pub cookie: [u8; 8],
    /// Unused, all ones.
    pub data_offset: U64,
    /// Byte offset of the BAT.
    pub table_offset: U64,
    /// Header version, [`VERSION_1_0`].
    pub header_version: U32,
    /// Number of BAT entries.
    pub max_table_entries: U32,
    /// Bytes of data per block (a power of two; 2 MiB by default).
    pub block_size: U32,
    /// One's complement of the sum of the header's bytes, this field counted as zero.
    pub checksum: U32,
    /// The parent's unique id (differencing disks).
    pub parent_unique_id: [u8; 16],
    /// The parent's modification time, seconds since 2000-01-01 00:00:00 UTC.
    pub parent_timestamp: U32,
    /// Zero.
    pub reserved1: U32,
    /// The parent's file name, UTF-16 big-endian, NUL-padded.
    pub parent_unicode_name: [u8; 512],
    /// Where to find the parent.
    pub parent_locators: [ParentLocator; 8],
    /// Zero.
    pub reserved2: [u8; 256],
}

const _: () = assert!(std::mem::size_of::<Footer>() == 512);
const _: () = assert!(std::mem::size_of::<ParentLocator>() == 24);
const _: () = assert!(std::mem::size_of::<DynHeader>() == 1024);

/// The VHD checksum: the one's complement of the sum of `bytes`, the four bytes at
/// `checksum_at` counted as zero.
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(checksum_at..checksum_at + 4).contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(u32::from(b)));
    !sum
}

impl Footer {
    /// The checksum these bytes should carry.
    pub fn compute_checksum(&self) -> u32 {
        checksum(self.as_bytes(), std::mem::offset_of!(Footer, checksum))
    }

    /// Stores the checksum these bytes should carry.
    pub fn seal(&mut self) {
        self.checksum = U32::new(self.compute_checksum());
    }

    /// Sectors addressed by the CHS geometry.
    pub fn chs_sectors(&self) -> u64 {
        u64::from(self.cylinders.get()) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }
}

impl DynHeader {
    /// The checksum these bytes should carry.
    pub fn compute_checksum(&self) -> u32 {
        checksum(self.as_bytes(), std::mem::offset_of!(DynHeader, checksum))
    }

    /// Stores the checksum these bytes should carry.
    pub fn seal(&mut self) {
        self.checksum = U32::new(self.compute_checksum());
    }
}

/// Bytes of sector bitmap in front of each block of `block_size` bytes.
pub fn bitmap_size(block_size: u64) -> u64 {
    (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR)
}

/// What can go wrong that is particular to VHD.
///
/// [`VpcError::Corrupt`] converts into [`vstor_core::Error::Corrupt`] (as every malformed
/// structure of every format does); the others are carried in [`vstor_core::Error::Layer`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum VpcError {
    /// There is no footer cookie at the end of the file nor at its start.
    #[error("{file} is not a VHD: no footer cookie \"conectix\" at its end or at offset 0")]
    NotVhd {
        /// The file.
        file: String,
    },
    /// A malformed structure.
    #[error("corrupt {what} in {file} at offset {offset}: {reason}")]
    Corrupt {
        /// The file.
        file: String,
        /// The byte offset of the structure.
        offset: u64,
        /// The structure or field.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The image uses something this reader does not understand.
    #[error("{file}: {what} is not supported")]
    Unsupported {
        /// The file.
        file: String,
        /// What.
        what: String,
    },
    /// The parent of a differencing disk was not found at any path its locators name.
    #[error("parent of {child} not found; tried {}", if tried.is_empty() { "nothing (no usable parent locator)".to_string() } else { tried.join(", ") })]
    ParentNotFound {
        /// The differencing disk.
        child: String,
        /// Every path tried, in order.
        tried: Vec<String>,
    },
    /// The parent found is not the disk the child was made from.
    #[error("parent {parent} of {child} is not the disk it was made from (its unique id is {found}, the child expects {expected})")]
    ParentMismatch {
        /// The differencing disk.
        child: String,
        /// The parent found.
        parent: String,
        /// The unique id the child records.
        expected: String,
        /// The parent's unique id.
        found: String,
    },
    /// A differencing disk was opened without its parent, or a parent was given to a disk that
    /// has none.
    #[error("{0}")]
    InvalidParameter(String),
    /// The chain leads back to a disk already in it.
    #[error("differencing chain has a cycle: {0} appears twice")]
    ChainCycle(PathBuf),
    /// The chain is deeper than the limit.
    #[error("differencing chain is deeper than {0} levels")]
    ChainTooDeep(usize),
}

impl vstor_core::LayerError for VpcError {
    fn kind(&self) -> vstor_core::ErrorKind {
        use vstor_core::ErrorKind;
        match self {
            VpcError::NotVhd { .. } | VpcError::InvalidParameter(_) => ErrorKind::InvalidInput,
            VpcError::Corrupt { .. }
            | VpcError::ParentMismatch { .. }
            | VpcError::ChainCycle(_) => ErrorKind::Corrupt,
            VpcError::Unsupported { .. } | VpcError::ChainTooDeep(_) => ErrorKind::Unsupported,
            VpcError::ParentNotFound { .. } => ErrorKind::Unavailable,
        }
    }
}

impl From<VpcError> for Error {
    fn from(e: VpcError) -> Self {
        match e {
            VpcError::Corrupt {
                file,
                offset,
                what,
                reason,
            } => Error::Corrupt {
                file,
                offset,
                what,
                reason,
            },
            e => Error::Layer(Arc::new(e)),
        }
    }
}

fn corrupt(file: &str, offset: u64, what: impl Into<String>, reason: impl Into<String>) -> Error {
    VpcError::Corrupt {
        file: file.to_string(),
        offset,
        what: what.into(),
        reason: reason.into(),
    }
    .into()
}

/// The kind of a VHD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VpcKind {
    /// Raw data followed by the footer.
    Fixed,
    /// Blocks allocated on demand; unallocated ones read as zeros.
    Dynamic,
    /// A dynamic disk over a parent; unallocated sectors read from the parent.
    Differencing,
}

impl std::fmt::Display for VpcKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VpcKind::Fixed => "fixed",
            VpcKind::Dynamic => "dynamic",
            VpcKind::Differencing => "differencing",
        })
    }
}

/// Where a range of the virtual disk lives, in this file alone (see [`Vpc::locate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Allocated in this file, at this byte offset.
    File(u64),
    /// Not allocated, and reads as zeros.
    Zero,
    /// Not allocated here: it reads from the parent at this virtual offset.
    Parent(u64),
}

/// Where a range of the virtual disk lives, through the whole chain (see
/// [`Vpc::locate_chain`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainPlace {
    /// Allocated in the file `depth` levels down (0: this disk, 1: its parent, ...), at this
    /// byte offset of that file.
    File {
        /// 0 for this disk, 1 for its parent, and so on.
        depth: usize,
        /// The byte offset in that disk's file.
        offset: u64,
    },
    /// Allocated nowhere in the chain: reads as zeros.
    Zero,
    /// In a parent device that is not a VHD (given to [`Vpc::open_on`]), at this offset.
    Device(u64),
}

/// A parent locator, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    /// The platform code ([`PLATFORM_W2KU`], ...).
    pub platform: u32,
    /// Whether the path is relative to the child's directory.
    pub relative: bool,
    /// The path as stored (a Windows path keeps its backslashes; a URL is decoded to a path).
    pub path: String,
}

impl Locator {
    /// The platform code as text (`W2ku`, `MacX`, ...).
    pub fn platform_name(&self) -> String {
        String::from_utf8_lossy(&self.platform.to_be_bytes()).into_owned()
    }
}

/// A sector bitmap's state in the cache.
const BM_UNKNOWN: u8 = 0;
const BM_FULL: u8 = 1;
const BM_EMPTY: u8 = 2;
const BM_MIXED: u8 = 3;

enum Bitmap {
    Full,
    Empty,
    Mixed(Arc<[u8]>),
}

/// The BAT and sector bitmaps of a dynamic or differencing disk.
struct Sparse {
    block_size: u64,
    bitmap_size: u64,
    bat: Box<[u32]>,
    /// Per block: BM_UNKNOWN until its bitmap is read.
    state: Box<[AtomicU8]>,
    /// The bitmaps that are neither all ones nor all zeros.
    mixed: Mutex<HashMap<u64, Arc<[u8]>>>,
}

/// How a read maps: (length, place) pieces.
type Plan = SmallVec<[(u64, Place); 4]>;

/// Everything parsed from a file, before a parent is attached.
struct Loaded {
    footer: Footer,
    header: Option<Box<DynHeader>>,
    kind: VpcKind,
    capacity: u64,
    sparse: Option<Sparse>,
    locators: Vec<Locator>,
    parent_name: Option<String>,
    notes: Vec<String>,
}

/// An open VHD image (read-only).
pub struct Vpc {
    name: String,
    path: Option<PathBuf>,
    file: Arc<dyn BlockDevice>,
    parent: Option<Arc<dyn BlockDevice>>,
    parent_vpc: Option<Arc<Vpc>>,
    footer: Footer,
    header: Option<Box<DynHeader>>,
    kind: VpcKind,
    sparse: Option<Sparse>,
    locators: Vec<Locator>,
    parent_name: Option<String>,
    info: DeviceInfo,
    notes: Vec<String>,
}

impl std::fmt::Debug for Vpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vpc")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("capacity", &self.info.capacity)
            .finish_non_exhaustive()
    }
}

/// A unique id as text (the bytes in order, in the usual UUID grouping).
pub fn format_id(id: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*id).hyphenated().to_string()
}

/// Reads `len` bytes at any byte offset (the device needs 512-byte aligned requests). The
/// caller has checked that the range lies inside the device.
fn read_bytes(file: &dyn BlockDevice, offset: u64, len: usize) -> Result<Vec<u8>> {
    let start = offset - offset % SECTOR;
    let end = (offset + len as u64).next_multiple_of(SECTOR);
    let mut buf = vec![0u8; (end - start) as usize];
    file.read_at(start, &mut buf)?;
    let skip = (offset - start) as usize;
    buf.drain(..skip);
    buf.truncate(len);
    Ok(buf)
}

fn read_footer(file: &dyn BlockDevice, offset: u64) -> Result<Footer> {
    let b = read_bytes(file, offset, 512)?;
    Footer::read_from_bytes(&b)
        .map_err(|_| Error::InvalidArgument("short read of a VHD footer".into()))
}

/// Why a footer is unusable, if it is.
fn footer_defect(f: &Footer) -> Option<String> {
    if f.cookie != FOOTER_COOKIE {
        return Some(format!(
            "cookie is {:?}, not \"conectix\"",
            String::from_utf8_lossy(&f.cookie)
        ));
    }
    let want = f.compute_checksum();
    if f.checksum.get() != want {
        return Some(format!(
            "checksum is {:#010x}, the bytes sum to {want:#010x}",
            f.checksum.get()
        ));
    }
    None
}

fn utf16le(bytes: &[u8]) -> Option<String> {
    let units = <[little_endian::U16]>::ref_from_bytes(bytes).ok()?;
    let s: String = char::decode_utf16(units.iter().map(|u| u.get()))
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    Some(s.trim_end_matches('\0').to_string())
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            if !h.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The path of a `file://` URL (`file:///p`, `file://localhost/p`), percent-decoded.
fn file_url_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("file://")?;
    let path = if rest.starts_with('/') {
        rest
    } else {
        &rest[rest.find('/')?..]
    };
    percent_decode(path)
}

/// A Windows path with forward slashes and no `\\?\` prefix.
fn windows_path(s: &str) -> String {
    let s = s.strip_prefix(r"\\?\").unwrap_or(s);
    s.replace('\\', "/")
}

/// Whether a path (forward slashes) is absolute on Windows (`C:/...` or `//server/...`).
fn is_windows_absolute(s: &str) -> bool {
    let b = s.as_bytes();
    (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':') || s.starts_with("//")
}

/// The last component of a path (forward slashes), if it names a file.
fn file_name(s: &str) -> Option<&str> {
    let n = s.rsplit('/').next()?;
    (!n.is_empty() && n != "." && n != ".." && !n.contains(':')).then_some(n)
}

fn without_cur_dirs(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

impl Loaded {
    /// Where to look for the parent, in order, relative to the child's directory `dir`.
    fn parent_candidates(&self, dir: &Path) -> Vec<PathBuf> {
        let mut relative = Vec::new();
        let mut absolute = Vec::new();
        let mut names = Vec::new();
        for loc in &self.locators {
            let p = match loc.platform {
                PLATFORM_MAC | PLATFORM_MACX => loc.path.clone(),
                _ => windows_path(&loc.path),
            };
            if p.is_empty() || p.contains('\0') {
                continue;
            }
            if p.starts_with('/') && !p.starts_with("//") {
                absolute.push(PathBuf::from(&p));
            } else if loc.relative && !is_windows_absolute(&p) {
                relative.push(without_cur_dirs(&dir.join(&p)));
            }
            if let Some(n) = file_name(&p) {
                names.push(dir.join(n));
            }
        }
        if let Some(n) = self.parent_name.as_deref().map(windows_path) {
            if let Some(n) = file_name(&n) {
                if !n.contains('\0') {
                    names.push(dir.join(n));
                }
            }
        }
        let mut out: Vec<PathBuf> = Vec::new();
        for p in relative.into_iter().chain(absolute).chain(names) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// Parses and checks every structure of a VHD on `file`.
fn load(file: &dyn BlockDevice, name: &str) -> Result<Loaded> {
    let info = file.info();
    if info.logical_sector_size as u64 > SECTOR {
        return Err(VpcError::Unsupported {
            file: name.to_string(),
            what: format!(
                "a file device with {}-byte sectors (VHD needs 512-byte access)",
                info.logical_sector_size
            ),
        }
        .into());
    }
    let len = info.capacity;
    let mut notes = Vec::new();
    if len < 512 {
        return Err(VpcError::NotVhd {
            file: name.to_string(),
        }
        .into());
    }
    let end = len - 512;
    let tail = read_footer(file, end)?;
    // The footer, and whether it is the one at the end (then the data stops before it).
    let (footer, at_end) = match footer_defect(&tail) {
        None => (tail, true),
        Some(reason) => {
            let head = read_footer(file, 0)?;
            let head_ok = footer_defect(&head).is_none()
                && matches!(head.disk_type.get(), DISK_DYNAMIC | DISK_DIFFERENCING);
            if head_ok {
                notes.push(format!(
                    "{name}: the footer at the end (offset {end}) is unusable ({reason}); \
                     using its copy at offset 0"
                ));
                (head, false)
            } else if tail.cookie != FOOTER_COOKIE && head.cookie != FOOTER_COOKIE {
                return Err(VpcError::NotVhd {
                    file: name.to_string(),
                }
                .into());
            } else {
                return Err(corrupt(name, end, "footer", reason));
            }
        }
    };
    let foff = if at_end { end } else { 0 };
    // Where the data may lie: everything but the footer at the end.
    let data_end = if at_end { end } else { len };

    let version = footer.format_version.get();
    if version >> 16 != 1 {
        return Err(VpcError::Unsupported {
            file: name.to_string(),
            what: format!("file format version {}.{}", version >> 16, version & 0xffff),
        }
        .into());
    }
    let kind = match footer.disk_type.get() {
        DISK_FIXED => VpcKind::Fixed,
        DISK_DYNAMIC => VpcKind::Dynamic,
        DISK_DIFFERENCING => VpcKind::Differencing,
        t => {
            return Err(corrupt(
                name,
                foff + std::mem::offset_of!(Footer, disk_type) as u64,
                "footer disk type",
                format!("{t} is not 2 (fixed), 3 (dynamic) or 4 (differencing)"),
            ))
        }
    };
    let size = footer.current_size.get();
    if size > MAX_VIRTUAL_SIZE {
        return Err(corrupt(
            name,
            foff + std::mem::offset_of!(Footer, current_size) as u64,
            "footer current size",
            format!("{size} bytes is more than the VHD limit of {MAX_VIRTUAL_SIZE}"),
        ));
    }
    let capacity = size - size % SECTOR;
    if capacity != size {
        notes.push(format!(
            "{name}: current size {size} is not a whole number of sectors; using {capacity}"
        ));
    }
    if footer.saved_state != 0 {
        notes.push(format!(
            "{name}: the disk belongs to a saved virtual machine"
        ));
    }

    if kind == VpcKind::Fixed {
        if capacity > end {
            return Err(corrupt(
                name,
                end,
                "fixed disk",
                format!(
                    "the footer declares {capacity} bytes of data but the file holds {end} \
                     (truncated?)"
                ),
            ));
        }
        return Ok(Loaded {
            footer,
            header: None,
            kind,
            capacity,
            sparse: None,
            locators: Vec::new(),
            parent_name: None,
            notes,
        });
    }

    if at_end {
        // The copy at offset 0 should match; the one at the end wins.
        let head = read_footer(file, 0)?;
        if head.as_bytes() != footer.as_bytes() {
            notes.push(format!(
                "{name}: the footer copy at offset 0 differs from the footer at the end; \
                 using the one at the end"
            ));
        }
    }

    // The dynamic disk header.
    let hoff = footer.data_offset.get();
    let hfield = foff + std::mem::offset_of!(Footer, data_offset) as u64;
    if hoff < 512 || hoff.checked_add(1024).is_none_or(|e| e > data_end) {
        return Err(corrupt(
            name,
            hfield,
            "footer data offset",
            format!("the dynamic disk header at {hoff} does not lie inside the file ({len} bytes)"),
        ));
    }
    let hb = read_bytes(file, hoff, 1024)?;
    let header = DynHeader::read_from_bytes(&hb)
        .map_err(|_| Error::InvalidArgument("short read of a VHD header".into()))?;
    let field = |f: usize| hoff + f as u64;
    if header.cookie != DYN_HEADER_COOKIE {
        return Err(corrupt(
            name,
            hoff,
            "dynamic disk header",
            format!(
                "cookie is {:?}, not \"cxsparse\"",
                String::from_utf8_lossy(&header.cookie)
            ),
        ));
    }
    let want = header.compute_checksum();
    if header.checksum.get() != want {
        return Err(corrupt(
            name,
            hoff,
            "dynamic disk header",
            format!(
                "checksum is {:#010x}, the bytes sum to {want:#010x}",
                header.checksum.get()
            ),
        ));
    }
    let hv = header.header_version.get();
    if hv >> 16 != 1 {
        return Err(VpcError::Unsupported {
            file: name.to_string(),
            what: format!("dynamic disk header version {}.{}", hv >> 16, hv & 0xffff),
        }
        .into());
    }
    let bs = header.block_size.get();
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(corrupt(
            name,
            field(std::mem::offset_of!(DynHeader, block_size)),
            "dynamic disk header block size",
            format!("{bs} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} bytes"),
        ));
    }
    let bs = u64::from(bs);
    let bitmap = bitmap_size(bs);
    let needed = capacity.div_ceil(bs);
    let max_entries = u64::from(header.max_table_entries.get());
    let entries_field = field(std::mem::offset_of!(DynHeader, max_table_entries));
    if max_entries < needed {
        return Err(corrupt(
            name,
            entries_field,
            "dynamic disk header max table entries",
            format!("{max_entries} blocks of {bs} bytes cannot hold {capacity} bytes"),
        ));
    }
    if needed > MAX_BAT_ENTRIES {
        return Err(corrupt(
            name,
            entries_field,
            "dynamic disk header max table entries",
            format!(
                "{capacity} bytes in {bs}-byte blocks need {needed} BAT entries, more than \
                 the {MAX_BAT_ENTRIES} this reader accepts"
            ),
        ));
    }
    let toff = header.table_offset.get();
    let bat_len = needed * 4;
    if toff.checked_add(bat_len).is_none_or(|e| e > data_end) {
        return Err(corrupt(
            name,
            field(std::mem::offset_of!(DynHeader, table_offset)),
            "dynamic disk header table offset",
            format!(
                "the BAT ({bat_len} bytes at {toff}) does not lie inside the file ({len} bytes)"
            ),
        ));
    }
    let raw = read_bytes(file, toff, bat_len as usize)?;
    let bat: Box<[u32]> = <[U32]>::ref_from_bytes(&raw)
        .map_err(|_| Error::InvalidArgument("short read of a VHD BAT".into()))?
        .iter()
        .map(|e| e.get())
        .collect();
    drop(raw);

    // Every allocated block lies inside the data, clear of the metadata and of each other.
    let span = bitmap + bs;
    let mut meta: SmallVec<[(u64, u64, &str); 3]> = SmallVec::new();
    if at_end {
        meta.push((0, 512, "the footer copy"));
    }
    meta.push((hoff, hoff + 1024, "the dynamic disk header"));
    meta.push((toff, toff + bat_len, "the BAT"));
    let mut starts: Vec<(u64, usize)> = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        if e == BAT_UNUSED {
            continue;
        }
        let start = u64::from(e) * SECTOR;
        let stop = start + span;
        let what = || format!("BAT entry {i}");
        let at = toff + 4 * i as u64;
        if stop > data_end {
            return Err(corrupt(
                name,
                at,
                what(),
                format!(
                    "block {i} at bytes {start}..{stop} runs past the end of the data \
                     ({data_end} bytes)"
                ),
            ));
        }
        if let Some((_, _, m)) = meta.iter().find(|(a, b, _)| start < *b && *a < stop) {
            return Err(corrupt(
                name,
                at,
                what(),
                format!("block {i} at bytes {start}..{stop} overlaps {m}"),
            ));
        }
        starts.push((start, i));
    }
    starts.sort_unstable();
    for w in starts.windows(2) {
        if w[0].0 + span > w[1].0 {
            let (a, b) = (w[0].1, w[1].1);
            return Err(corrupt(
                name,
                toff + 4 * a.max(b) as u64,
                format!("BAT entry {}", a.max(b)),
                format!("blocks {a} and {b} overlap in the file"),
            ));
        }
    }
    drop(starts);

    let mut locators = Vec::new();
    let mut parent_name = None;
    if kind == VpcKind::Differencing {
        let units = <[U16]>::ref_from_bytes(&header.parent_unicode_name[..])
            .map_err(|_| Error::InvalidArgument("parent name".into()))?;
        let pn = String::from_utf16_lossy(&units.iter().map(|u| u.get()).collect::<Vec<_>>());
        let pn = pn.split('\0').next().unwrap_or("").to_string();
        if !pn.is_empty() {
            parent_name = Some(pn);
        }
        for (k, l) in header.parent_locators.iter().enumerate() {
            let code = l.platform_code.get();
            let dlen = l.platform_data_length.get();
            let doff = l.platform_data_offset.get();
            let entry = field(std::mem::offset_of!(DynHeader, parent_locators) + 24 * k);
            let relative = match code {
                0 => continue,
                PLATFORM_W2RU | PLATFORM_WI2R => true,
                PLATFORM_W2KU | PLATFORM_WI2K | PLATFORM_MAC | PLATFORM_MACX => false,
                _ => {
                    notes.push(format!(
                        "{name}: parent locator {k} has the unknown platform code {code:#010x}; \
                         ignored"
                    ));
                    continue;
                }
            };
            if dlen == 0 {
                continue;
            }
            let pname = String::from_utf8_lossy(&code.to_be_bytes()).into_owned();
            let what = format!("parent locator {k} ({pname})");
            if dlen > MAX_LOCATOR_LEN {
                return Err(corrupt(
                    name,
                    entry,
                    what,
                    format!("{dlen} bytes is longer than the {MAX_LOCATOR_LEN} accepted"),
                ));
            }
            if doff
                .checked_add(u64::from(dlen))
                .is_none_or(|e| e > data_end)
            {
                return Err(corrupt(
                    name,
                    entry,
                    what,
                    format!("its {dlen} bytes at {doff} do not lie inside the file ({len} bytes)"),
                ));
            }
            let data = read_bytes(file, doff, dlen as usize)?;
            let path = match code {
                PLATFORM_W2KU | PLATFORM_W2RU => utf16le(&data).ok_or_else(|| {
                    corrupt(name, doff, what.clone(), "the path is not valid UTF-16LE")
                })?,
                PLATFORM_WI2K | PLATFORM_WI2R => {
                    let s = String::from_utf8_lossy(&data);
                    s.trim_end_matches('\0').to_string()
                }
                _ => {
                    let text = std::str::from_utf8(&data).map(|s| s.trim_end_matches('\0'));
                    match text.ok().and_then(file_url_path) {
                        Some(p) => p,
                        None if code == PLATFORM_MAC => {
                            notes.push(format!(
                                "{name}: parent locator {k} is a Mac OS alias, which this \
                                 reader cannot follow; ignored"
                            ));
                            continue;
                        }
                        None => {
                            return Err(corrupt(
                                name,
                                doff,
                                what,
                                "the data is not a file:// URL in UTF-8",
                            ))
                        }
                    }
                }
            };
            locators.push(Locator {
                platform: code,
                relative,
                path,
            });
        }
    }

    let n = bat.len();
    Ok(Loaded {
        footer,
        header: Some(Box::new(header)),
        kind,
        capacity,
        sparse: Some(Sparse {
            block_size: bs,
            bitmap_size: bitmap,
            bat,
            state: (0..n).map(|_| AtomicU8::new(BM_UNKNOWN)).collect(),
            mixed: Mutex::new(HashMap::new()),
        }),
        locators,
        parent_name,
        notes,
    })
}

/// Whether sector `s` of a bitmap is set (most significant bit first).
fn bit(bm: &[u8], s: u64) -> bool {
    bm.get((s / 8) as usize)
        .is_some_and(|b| b >> (7 - s % 8) & 1 == 1)
}

/// The state of the first `bits` bits of a bitmap.
fn classify(bm: &[u8], bits: u64) -> u8 {
    let whole = ((bits / 8) as usize).min(bm.len());
    let rem = bits % 8;
    let mask = if rem == 0 { 0 } else { 0xFFu8 << (8 - rem) };
    let tail = if rem == 0 {
        0
    } else {
        bm.get(whole).copied().unwrap_or(0) & mask
    };
    let head = &bm[..whole];
    if head.iter().all(|&b| b == 0xFF) && tail == mask {
        BM_FULL
    } else if head.iter().all(|&b| b == 0) && tail == 0 {
        BM_EMPTY
    } else {
        BM_MIXED
    }
}

/// Appends a piece to a plan, merging it with the last one where they continue each other.
fn push(out: &mut Plan, n: u64, p: Place) {
    if n == 0 {
        return;
    }
    if let Some((pl, pp)) = out.last_mut() {
        let merge = match (*pp, p) {
            (Place::File(a), Place::File(b)) | (Place::Parent(a), Place::Parent(b)) => a + *pl == b,
            (Place::Zero, Place::Zero) => true,
            _ => false,
        };
        if merge {
            *pl += n;
            return;
        }
    }
    out.push((n, p));
}

fn push_chain(out: &mut Vec<(u64, ChainPlace)>, n: u64, p: ChainPlace) {
    if n == 0 {
        return;
    }
    if let Some((pl, pp)) = out.last_mut() {
        let merge = match (*pp, p) {
            (
                ChainPlace::File {
                    depth: d1,
                    offset: a,
                },
                ChainPlace::File {
                    depth: d2,
                    offset: b,
                },
            ) => d1 == d2 && a + *pl == b,
            (ChainPlace::Device(a), ChainPlace::Device(b)) => a + *pl == b,
            (ChainPlace::Zero, ChainPlace::Zero) => true,
            _ => false,
        };
        if merge {
            *pl += n;
            return;
        }
    }
    out.push((n, p));
}

impl Vpc {
    /// Opens the VHD at `path` read-only, with its whole parent chain.
    pub fn open(path: impl AsRef<Path>) -> Result<Vpc> {
        let mut seen = Vec::new();
        Self::open_chain(path.as_ref(), &mut seen)
    }

    fn open_chain(path: &Path, seen: &mut Vec<PathBuf>) -> Result<Vpc> {
        let canon = std::fs::canonicalize(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        if seen.contains(&canon) {
            return Err(VpcError::ChainCycle(canon).into());
        }
        if seen.len() > MAX_CHAIN_DEPTH {
            return Err(VpcError::ChainTooDeep(MAX_CHAIN_DEPTH).into());
        }
        seen.push(canon.clone());
        let name = path.display().to_string();
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        if meta.is_file() && meta.len() % SECTOR != 0 {
            return Err(corrupt(
                &name,
                meta.len(),
                "file length",
                format!(
                    "{} bytes is not a whole number of 512-byte sectors (a footer of an old \
                     511-byte kind, or a truncated file)",
                    meta.len()
                ),
            ));
        }
        // Read-only, under a shared image lock: a writer elsewhere (through `raw:`, say) and
        // this open exclude each other.
        let file = FileDevice::open(
            path,
            &FileOptions {
                read_only: true,
                lock: true,
                ..Default::default()
            },
        )?;
        let mut file_notes: Vec<String> = file
            .direct_fallback()
            .into_iter()
            .chain(file.engine_fallback())
            .map(|n| format!("{name}: {n}"))
            .collect();
        let file: Arc<dyn BlockDevice> = Arc::new(file);
        let loaded = load(&*file, &name)?;
        let parent = if loaded.kind == VpcKind::Differencing {
            let dir = canon.parent().unwrap_or(Path::new("/")).to_path_buf();
            let candidates = loaded.parent_candidates(&dir);
            let Some(ppath) = candidates.iter().find(|p| p.is_file()) else {
                return Err(VpcError::ParentNotFound {
                    child: name,
                    tried: candidates.iter().map(|p| p.display().to_string()).collect(),
                }
                .into());
            };
            Some(Arc::new(Self::open_chain(ppath, seen)?))
        } else {
            None
        };
        file_notes.extend(loaded.notes.iter().cloned());
        let mut v = Self::assemble(file, &name, loaded, parent)?;
        v.notes = file_notes;
        v.path = Some(path.to_path_buf());
        Ok(v)
    }

    /// Opens a VHD on any block device (read-only). A differencing disk needs its `parent`,
    /// any device of at least 512-byte addressability; its identity cannot be checked here (use
    /// [`Vpc::open_on_chain`] with a VHD parent for that). A disk without a parent refuses one.
    pub fn open_on(
        file: Arc<dyn BlockDevice>,
        name: &str,
        parent: Option<Arc<dyn BlockDevice>>,
    ) -> Result<Vpc> {
        let loaded = load(&*file, name)?;
        Self::attach(file, name, loaded, parent, None)
    }

    /// Opens a VHD on any block device (read-only) over a VHD parent, checking that the parent
    /// is the disk the child was made from ([`VpcError::ParentMismatch`] otherwise).
    pub fn open_on_chain(
        file: Arc<dyn BlockDevice>,
        name: &str,
        parent: Option<Arc<Vpc>>,
    ) -> Result<Vpc> {
        let loaded = load(&*file, name)?;
        Self::assemble(file, name, loaded, parent)
    }

    fn assemble(
        file: Arc<dyn BlockDevice>,
        name: &str,
        loaded: Loaded,
        parent: Option<Arc<Vpc>>,
    ) -> Result<Vpc> {
        if let (Some(p), Some(h)) = (&parent, &loaded.header) {
            if loaded.kind == VpcKind::Differencing && p.unique_id() != h.parent_unique_id {
                return Err(VpcError::ParentMismatch {
                    child: name.to_string(),
                    parent: p.name().to_string(),
                    expected: format_id(&h.parent_unique_id),
                    found: format_id(&p.unique_id()),
                }
                .into());
            }
        }
        let dev = parent.clone().map(|p| p as Arc<dyn BlockDevice>);
        Self::attach(file, name, loaded, dev, parent)
    }

    fn attach(
        file: Arc<dyn BlockDevice>,
        name: &str,
        loaded: Loaded,
        parent: Option<Arc<dyn BlockDevice>>,
        parent_vpc: Option<Arc<Vpc>>,
    ) -> Result<Vpc> {
        match (loaded.kind, &parent) {
            (VpcKind::Differencing, None) => {
                return Err(VpcError::InvalidParameter(format!(
                    "{name} is a differencing disk: it needs its parent"
                ))
                .into())
            }
            (VpcKind::Differencing, Some(p)) => {
                let ls = p.info().logical_sector_size;
                if u64::from(ls) > SECTOR {
                    return Err(VpcError::InvalidParameter(format!(
                        "the parent of {name} has {ls}-byte sectors; a VHD parent needs 512"
                    ))
                    .into());
                }
            }
            (k, Some(_)) => {
                return Err(VpcError::InvalidParameter(format!(
                    "{name} is a {k} disk: it has no parent"
                ))
                .into())
            }
            (_, None) => {}
        }
        let info = DeviceInfo {
            capacity: loaded.capacity,
            logical_sector_size: SECTOR as u32,
            physical_sector_size: SECTOR as u32,
            mem_alignment: file.info().mem_alignment,
            read_only: true,
            discard_zeroes: false,
            supports: Supports::default(),
        };
        Ok(Vpc {
            name: name.to_string(),
            path: None,
            file,
            parent,
            parent_vpc,
            footer: loaded.footer,
            header: loaded.header,
            kind: loaded.kind,
            sparse: loaded.sparse,
            locators: loaded.locators,
            parent_name: loaded.parent_name,
            info,
            notes: loaded.notes,
        })
    }

    /// The kind of disk.
    pub fn kind(&self) -> VpcKind {
        self.kind
    }

    /// The parent of a differencing disk.
    pub fn parent(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.parent.as_ref()
    }

    /// The parent of a differencing disk, when it is a VHD (always so after [`Vpc::open`]).
    pub fn parent_vpc(&self) -> Option<&Arc<Vpc>> {
        self.parent_vpc.as_ref()
    }

    /// The name used in messages (the path, when opened from one).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path, when opened from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The footer in use.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The dynamic disk header (dynamic and differencing disks).
    pub fn dyn_header(&self) -> Option<&DynHeader> {
        self.header.as_deref()
    }

    /// The disk's unique id (from the footer).
    pub fn unique_id(&self) -> [u8; 16] {
        self.footer.unique_id
    }

    /// The creator application of the footer (`vpc `, `win `, `qemu`, `qem2`, ...).
    pub fn creator_app(&self) -> String {
        String::from_utf8_lossy(&self.footer.creator_app).into_owned()
    }

    /// The block size of a dynamic or differencing disk.
    pub fn block_size(&self) -> Option<u64> {
        self.sparse.as_ref().map(|s| s.block_size)
    }

    /// The decoded parent locators of a differencing disk.
    pub fn parent_locators(&self) -> &[Locator] {
        &self.locators
    }

    /// The parent's name as the header records it.
    pub fn parent_name(&self) -> Option<&str> {
        self.parent_name.as_deref()
    }

    /// The size QEMU shows for this image: the CHS geometry unless the creator is one that
    /// sizes by `current_size` (`win `, `qem2`, `d2v `, `CTXS`, `tap\0`) or the geometry is
    /// the maximum. This device's capacity is always `current_size` (see the module docs).
    pub fn qemu_capacity(&self) -> u64 {
        let chs = self.footer.chs_sectors();
        let by_size = matches!(
            &self.footer.creator_app,
            b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0"
        );
        if by_size || chs == MAX_GEOMETRY_SECTORS {
            self.footer.current_size.get() / SECTOR * SECTOR
        } else {
            chs * SECTOR
        }
    }

    /// Notes for the operator (a footer fallback, a size rounded, I/O fallbacks), this disk's
    /// and its parents'.
    pub fn notes(&self) -> Vec<String> {
        let mut n = self.notes.clone();
        if let Some(p) = &self.parent_vpc {
            n.extend(p.notes());
        }
        n
    }

    /// Where `[offset, offset + len)` lives in this file: allocated here, zeros, or in the
    /// parent, as consecutive (length, place) pieces. Both must be multiples of 512.
    pub fn locate(&self, offset: u64, len: u64) -> Result<Vec<(u64, Place)>> {
        self.check_range(offset, len)?;
        let mut want = Vec::new();
        self.unknown_bitmaps(offset, len, &mut want);
        self.load_bitmaps(&want)?;
        let mut out = Plan::new();
        self.map(offset, len, &mut out)?;
        Ok(out.into_vec())
    }

    /// Where `[offset, offset + len)` lives through the whole chain: in which file, or zeros
    /// (allocated nowhere), or in a parent device that is not a VHD. Both must be multiples
    /// of 512. A converter that flattens a chain copies the `File` and `Device` pieces and
    /// leaves the `Zero` ones unallocated.
    pub fn locate_chain(&self, offset: u64, len: u64) -> Result<Vec<(u64, ChainPlace)>> {
        let mut out = Vec::new();
        self.chain_into(offset, len, 0, &mut out)?;
        Ok(out)
    }

    fn chain_into(
        &self,
        offset: u64,
        len: u64,
        depth: usize,
        out: &mut Vec<(u64, ChainPlace)>,
    ) -> Result<()> {
        for (n, p) in self.locate(offset, len)? {
            match p {
                Place::File(o) => push_chain(out, n, ChainPlace::File { depth, offset: o }),
                Place::Zero => push_chain(out, n, ChainPlace::Zero),
                Place::Parent(v) => {
                    let pcap = self.parent.as_ref().map_or(0, |p| p.capacity());
                    let inside = pcap.saturating_sub(v).min(n);
                    if inside > 0 {
                        match &self.parent_vpc {
                            Some(pv) => pv.chain_into(v, inside, depth + 1, out)?,
                            None => push_chain(out, inside, ChainPlace::Device(v)),
                        }
                    }
                    push_chain(out, n - inside, ChainPlace::Zero);
                }
            }
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset % SECTOR != 0 || len % SECTOR != 0 {
            return Err(Error::Unaligned {
                op: OpKind::Read,
                offset,
                len,
                alignment: SECTOR as u32,
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.info.capacity)
        {
            return Err(Error::OutOfRange {
                op: OpKind::Read,
                offset,
                len,
                capacity: self.info.capacity,
            });
        }
        Ok(())
    }

    /// Adds the allocated blocks of `[offset, offset + len)` whose bitmaps are not yet known.
    fn unknown_bitmaps(&self, offset: u64, len: u64, want: &mut Vec<u64>) {
        let Some(s) = &self.sparse else { return };
        if len == 0 {
            return;
        }
        for b in offset / s.block_size..=(offset + len - 1) / s.block_size {
            let Some(&e) = s.bat.get(b as usize) else {
                break;
            };
            if e != BAT_UNUSED && s.state[b as usize].load(Ordering::Acquire) == BM_UNKNOWN {
                want.push(b);
            }
        }
    }

    /// Reads the bitmaps of `blocks` (sorted or not, duplicates allowed) in batches.
    fn load_bitmaps(&self, blocks: &[u64]) -> Result<()> {
        let Some(s) = &self.sparse else {
            return Ok(());
        };
        let bits = s.block_size / SECTOR;
        let mut first_err = None;
        let mut blocks = blocks.to_vec();
        blocks.sort_unstable();
        blocks.dedup();
        // At most 16 MiB of bitmaps in flight.
        let per = ((16 << 20) / s.bitmap_size).max(1) as usize;
        for chunk in blocks.chunks(per) {
            let mut bufs: Vec<Vec<u8>> = chunk
                .iter()
                .map(|_| vec![0u8; s.bitmap_size as usize])
                .collect();
            let mut reqs: Vec<Request<'_>> = chunk
                .iter()
                .zip(bufs.iter_mut())
                .map(|(&b, buf)| Request::read(u64::from(s.bat[b as usize]) * SECTOR, buf))
                .collect();
            self.file.submit(&mut reqs);
            let results: Vec<Result<()>> = reqs.iter().map(Request::result).collect();
            drop(reqs);
            for ((&b, buf), r) in chunk.iter().zip(bufs).zip(results) {
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                    continue;
                }
                let st = classify(&buf, bits);
                if st == BM_MIXED {
                    let keep: Arc<[u8]> = buf[..bits.div_ceil(8) as usize].into();
                    s.mixed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(b, keep);
                }
                s.state[b as usize].store(st, Ordering::Release);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn bitmap(&self, s: &Sparse, block: u64) -> Result<Bitmap> {
        for _ in 0..2 {
            match s.state[block as usize].load(Ordering::Acquire) {
                BM_FULL => return Ok(Bitmap::Full),
                BM_EMPTY => return Ok(Bitmap::Empty),
                BM_MIXED => {
                    let m = s.mixed.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(bm) = m.get(&block) {
                        return Ok(Bitmap::Mixed(bm.clone()));
                    }
                }
                _ => {}
            }
            self.load_bitmaps(&[block])?;
        }
        Err(Error::InvalidArgument(format!(
            "{}: the sector bitmap of block {block} could not be cached",
            self.name
        )))
    }

    /// Maps `[voff, voff + len)` (sector-aligned, inside the disk) to pieces.
    fn map(&self, voff: u64, len: u64, out: &mut Plan) -> Result<()> {
        let Some(s) = &self.sparse else {
            push(out, len, Place::File(voff));
            return Ok(());
        };
        let diff = self.kind == VpcKind::Differencing;
        let hole = |pos: u64| {
            if diff {
                Place::Parent(pos)
            } else {
                Place::Zero
            }
        };
        let bs = s.block_size;
        let mut pos = voff;
        let end = voff + len;
        while pos < end {
            let block = pos / bs;
            let inb = pos % bs;
            let n = (bs - inb).min(end - pos);
            let e = s.bat[block as usize];
            if e == BAT_UNUSED {
                push(out, n, hole(pos));
            } else {
                let data = u64::from(e) * SECTOR + s.bitmap_size;
                match self.bitmap(s, block)? {
                    Bitmap::Full => push(out, n, Place::File(data + inb)),
                    Bitmap::Empty => push(out, n, hole(pos)),
                    Bitmap::Mixed(bm) => {
                        let mut sct = inb / SECTOR;
                        let last = (inb + n) / SECTOR;
                        while sct < last {
                            let v = bit(&bm, sct);
                            let mut t = sct + 1;
                            while t < last && bit(&bm, t) == v {
                                t += 1;
                            }
                            let (a, l) = (sct * SECTOR, (t - sct) * SECTOR);
                            push(
                                out,
                                l,
                                if v {
                                    Place::File(data + a)
                                } else {
                                    hole(block * bs + a)
                                },
                            );
                            sct = t;
                        }
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Reads from the parent, zero-filling what lies past its end.
    fn read_parent(&self, reqs: &mut [Request<'_>]) {
        let Some(p) = &self.parent else {
            for r in reqs.iter_mut() {
                if let Op::Read { bufs, .. } = &mut r.op {
                    zero_bufs(bufs);
                }
                r.complete(Ok(()));
            }
            return;
        };
        let cap = p.capacity();
        if reqs.iter().all(|r| r.offset() + r.len() <= cap) {
            p.submit(reqs);
            return;
        }
        let mut inner: Vec<Request<'_>> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        let mut results: Vec<Result<()>> = vec![Ok(()); reqs.len()];
        for (i, r) in reqs.iter_mut().enumerate() {
            let (off, len) = (r.offset(), r.len());
            if let Op::Read { bufs, .. } = &mut r.op {
                let inside = cap.saturating_sub(off).min(len) as usize;
                let mut pieces = carve_read_bufs(bufs, [inside, len as usize - inside]);
                let mut tail = pieces.pop().unwrap_or_default();
                zero_bufs(&mut tail);
                let head = pieces.pop().unwrap_or_default();
                if inside > 0 {
                    inner.push(Request::new(Op::Read {
                        offset: off,
                        bufs: head,
                    }));
                    owner.push(i);
                }
            }
        }
        p.submit(&mut inner);
        for (r, &o) in inner.iter().zip(&owner) {
            if let Err(e) = r.result() {
                results[o] = Err(e);
            }
        }
        drop(inner);
        for (r, res) in reqs.iter_mut().zip(results) {
            r.complete(res);
        }
    }
}

impl BlockDevice for Vpc {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        // Nothing is written, so flushes order nothing: the reads of the whole batch go down
        // together. First the sector bitmaps the batch needs, in one batch of their own.
        if self.sparse.is_some() {
            let mut want = Vec::new();
            for r in batch.iter() {
                if let Op::Read { offset, .. } = r.op {
                    let len = r.len();
                    if offset % SECTOR == 0
                        && offset
                            .checked_add(len)
                            .is_some_and(|e| e <= self.info.capacity)
                    {
                        self.unknown_bitmaps(offset, len, &mut want);
                    }
                }
            }
            // A failure here is reported by the request that needs the bitmap.
            let _ = self.load_bitmaps(&want);
        }
        let mut results: SmallVec<[Option<Result<()>>; 32]> = SmallVec::new();
        results.resize(batch.len(), None);
        let mut plans: Vec<Option<Plan>> = Vec::with_capacity(batch.len());
        for (i, req) in batch.iter().enumerate() {
            let mut plan = None;
            match self.info.check(req) {
                Err(e) => results[i] = Some(Err(e)),
                Ok(()) => match &req.op {
                    Op::Read { offset, .. } => {
                        let mut p = Plan::new();
                        match self.map(*offset, req.len(), &mut p) {
                            Ok(()) => plan = Some(p),
                            Err(e) => results[i] = Some(Err(e)),
                        }
                    }
                    Op::Flush => results[i] = Some(Ok(())),
                    _ => results[i] = Some(Err(Error::ReadOnly { op: req.kind() })),
                },
            }
            plans.push(plan);
        }
        let mut lower: Vec<Request<'_>> = Vec::with_capacity(batch.len());
        let mut lower_owner: SmallVec<[usize; 32]> = SmallVec::new();
        let mut up: Vec<Request<'_>> = Vec::new();
        let mut up_owner: SmallVec<[usize; 8]> = SmallVec::new();
        for ((i, req), plan) in batch.iter_mut().enumerate().zip(&plans) {
            let (Some(plan), Op::Read { bufs, .. }) = (plan, &mut req.op) else {
                continue;
            };
            let pieces = carve_read_bufs(bufs, plan.iter().map(|p| p.0 as usize));
            for (mut piece, &(_, place)) in pieces.into_iter().zip(plan.iter()) {
                match place {
                    Place::File(offset) => {
                        lower.push(Request::new(Op::Read {
                            offset,
                            bufs: piece,
                        }));
                        lower_owner.push(i);
                    }
                    Place::Zero => zero_bufs(&mut piece),
                    Place::Parent(offset) => {
                        up.push(Request::new(Op::Read {
                            offset,
                            bufs: piece,
                        }));
                        up_owner.push(i);
                    }
                }
            }
        }
        if !lower.is_empty() {
            self.file.submit(&mut lower);
        }
        if !up.is_empty() {
            self.read_parent(&mut up);
        }
        for (r, &o) in lower
            .iter_mut()
            .zip(lower_owner.iter())
            .chain(up.iter_mut().zip(up_owner.iter()))
        {
            if let Err(e) = r.take_result() {
                if results[o].is_none() {
                    results[o] = Some(Err(e));
                }
            }
        }
        drop(lower);
        drop(up);
        for (req, r) in batch.iter_mut().zip(results) {
            req.complete(r.unwrap_or(Ok(())));
        }
    }

    fn describe(&self) -> String {
        match self.block_size() {
            Some(bs) => format!(
                "VHD {} ({}, {} bytes, {} KiB blocks)",
                self.name,
                self.kind,
                self.info.capacity,
                bs / 1024
            ),
            None => format!(
                "VHD {} ({}, {} bytes)",
                self.name, self.kind, self.info.capacity
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_core::MemoryDevice;
    use zerocopy::FromZeros;

    #[test]
    fn structure_sizes_and_offsets_match_the_specification() {
        assert_eq!(std::mem::offset_of!(Footer, current_size), 48);
        assert_eq!(std::mem::offset_of!(Footer, disk_type), 60);
        assert_eq!(std::mem::offset_of!(Footer, checksum), 64);
        assert_eq!(std::mem::offset_of!(Footer, unique_id), 68);
        assert_eq!(std::mem::offset_of!(Footer, saved_state), 84);
        assert_eq!(std::mem::offset_of!(DynHeader, max_table_entries), 28);
        assert_eq!(std::mem::offset_of!(DynHeader, checksum), 36);
        assert_eq!(std::mem::offset_of!(DynHeader, parent_unicode_name), 64);
        assert_eq!(std::mem::offset_of!(DynHeader, parent_locators), 576);
        assert_eq!(std::mem::offset_of!(DynHeader, reserved2), 768);
    }

    #[test]
    fn checksum_skips_its_own_field_and_seal_makes_it_verify() {
        let mut f = Footer::new_zeroed();
        f.cookie = FOOTER_COOKIE;
        f.current_size = U64::new(1 << 20);
        f.checksum = U32::new(0xdead_beef);
        // Bytes: "conectix" and 0x10 (from 1 MiB at byte 53).
        let sum: u32 = b"conectix".iter().map(|&b| u32::from(b)).sum::<u32>() + 0x10;
        assert_eq!(f.compute_checksum(), !sum);
        f.seal();
        assert_eq!(f.checksum.get(), !sum);
        assert!(footer_defect(&f).is_none());
        f.heads = 1;
        assert!(footer_defect(&f).unwrap().contains("checksum"));
    }

    #[test]
    fn bitmap_size_is_a_whole_number_of_sectors() {
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(4 << 20), 1024);
        assert_eq!(bitmap_size(256 << 20), 64 << 10);
    }

    #[test]
    fn bitmaps_are_most_significant_bit_first_and_classified_on_their_used_bits() {
        let bm = [0b1000_0001u8, 0xFF];
        assert!(bit(&bm, 0));
        assert!(!bit(&bm, 1));
        assert!(bit(&bm, 7));
        assert!(bit(&bm, 8));
        assert!(!bit(&bm, 1000), "past the end reads as not present");
        assert_eq!(classify(&[0xFF, 0xFF], 16), BM_FULL);
        assert_eq!(classify(&[0, 0], 16), BM_EMPTY);
        assert_eq!(classify(&[0xFF, 0x7F], 16), BM_MIXED);
        // Only the used bits count: a 2-sector block uses the top two bits of byte 0.
        assert_eq!(classify(&[0b1100_0000, 0x12], 2), BM_FULL);
        assert_eq!(classify(&[0b0011_1111], 2), BM_EMPTY);
        assert_eq!(classify(&[0b0100_0000], 2), BM_MIXED);
    }

    #[test]
    fn locator_paths_decode_and_resolve_relative_first() {
        let w: Vec<u8> = "C:\\vms\\base.vhd\0"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(utf16le(&w).unwrap(), "C:\\vms\\base.vhd");
        assert!(utf16le(&[0x00, 0xD8]).is_none(), "a lone surrogate");
        assert!(utf16le(&[0x41]).is_none(), "an odd length");
        assert_eq!(
            file_url_path("file://localhost/Users/me/My%20Disk.vhd").unwrap(),
            "/Users/me/My Disk.vhd"
        );
        assert_eq!(file_url_path("file:///a/b.vhd").unwrap(), "/a/b.vhd");
        assert!(file_url_path("file:///a%zz").is_none());
        assert!(file_url_path("http://x/y").is_none());
        assert_eq!(windows_path(r"\\?\C:\a\b.vhd"), "C:/a/b.vhd");

        let loc = |platform, relative, path: &str| Locator {
            platform,
            relative,
            path: path.into(),
        };
        let l = Loaded {
            footer: Footer::new_zeroed(),
            header: None,
            kind: VpcKind::Differencing,
            capacity: 0,
            sparse: None,
            locators: vec![
                loc(PLATFORM_W2KU, false, r"C:\vms\base.vhd"),
                loc(PLATFORM_MACX, false, "/srv/images/base.vhd"),
                loc(PLATFORM_W2RU, true, r".\..\parents\base.vhd"),
            ],
            parent_name: Some("other.vhd".into()),
            notes: Vec::new(),
        };
        let dir = Path::new("/data/child");
        assert_eq!(
            l.parent_candidates(dir),
            vec![
                PathBuf::from("/data/child/../parents/base.vhd"),
                PathBuf::from("/srv/images/base.vhd"),
                PathBuf::from("/data/child/base.vhd"),
                PathBuf::from("/data/child/other.vhd"),
            ]
        );
    }

    /// A dynamic image of 4 blocks of 4 KiB: block 1 allocated with a mixed bitmap.
    fn tiny_dynamic() -> Vec<u8> {
        let bs = 4096u64;
        let mut f = Footer::new_zeroed();
        f.cookie = FOOTER_COOKIE;
        f.features = U32::new(2);
        f.format_version = U32::new(VERSION_1_0);
        f.data_offset = U64::new(512);
        f.current_size = U64::new(4 * bs);
        f.disk_type = U32::new(DISK_DYNAMIC);
        f.unique_id = [7; 16];
        f.seal();
        let mut h = DynHeader::new_zeroed();
        h.cookie = DYN_HEADER_COOKIE;
        h.data_offset = U64::new(u64::MAX);
        h.table_offset = U64::new(1536);
        h.header_version = U32::new(VERSION_1_0);
        h.max_table_entries = U32::new(4);
        h.block_size = U32::new(bs as u32);
        h.seal();
        let block_at = 2048u64;
        let mut img = vec![0u8; (block_at + 512 + bs + 512) as usize];
        img[..512].copy_from_slice(f.as_bytes());
        img[512..1536].copy_from_slice(h.as_bytes());
        let bat = [BAT_UNUSED, (block_at / 512) as u32, BAT_UNUSED, BAT_UNUSED];
        for (i, e) in bat.iter().enumerate() {
            img[1536 + 4 * i..1540 + 4 * i].copy_from_slice(U32::new(*e).as_bytes());
        }
        // Sectors 0 and 2 of block 1 present.
        img[block_at as usize] = 0b1010_0000;
        let data = (block_at + 512) as usize;
        img[data..data + bs as usize].fill(0x5A);
        let end = img.len() - 512;
        img[end..].copy_from_slice(f.as_bytes());
        img
    }

    fn on_memory(img: &[u8]) -> Result<Vpc> {
        let mem = MemoryDevice::new(img.len() as u64)?;
        mem.write_at(0, img)?;
        Vpc::open_on(Arc::new(mem), "tiny.vhd", None)
    }

    #[test]
    fn a_mixed_bitmap_maps_sector_by_sector_and_unset_sectors_read_as_zeros() {
        let v = on_memory(&tiny_dynamic()).unwrap();
        assert_eq!(v.kind(), VpcKind::Dynamic);
        assert_eq!(v.capacity(), 16384);
        let m = v.locate(0, 16384).unwrap();
        assert_eq!(
            m,
            vec![
                (4096, Place::Zero),
                (512, Place::File(2560)),
                (512, Place::Zero),
                (512, Place::File(3584)),
                (8192 + 2560, Place::Zero),
            ]
        );
        let mut buf = vec![1u8; 16384];
        v.read_at(0, &mut buf).unwrap();
        let mut want = vec![0u8; 16384];
        want[4096..4608].fill(0x5A);
        want[5120..5632].fill(0x5A);
        assert!(buf == want);
        assert!(matches!(
            v.locate(1, 512),
            Err(Error::Unaligned { offset: 1, .. })
        ));
        assert!(matches!(
            v.locate(16384, 512),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn a_bad_footer_at_the_end_falls_back_to_the_copy_with_a_note() {
        let mut img = tiny_dynamic();
        let n = img.len();
        img[n - 512 + 70] ^= 0xFF; // The unique id: the checksum no longer matches.
        let v = on_memory(&img).unwrap();
        assert!(
            v.notes().iter().any(|n| n.contains("copy at offset 0")),
            "{:?}",
            v.notes()
        );
        let mut buf = vec![0u8; 512];
        v.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, vec![0x5A; 512]);
    }
}
