//! On-disk structures and constants of MS-VHDX.
//!
//! Every structure is a `#[repr(C)]` zerocopy type with little-endian fields, so parsing is a
//! checked cast of the bytes and serializing is a view of the struct: no hand-written byte
//! shuffling. GUIDs are stored in the Windows mixed-endian layout ([`Guid`]).

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// 1 KiB, 1 MiB: the units the format counts in.
pub const KIB: u64 = 1024;
/// One mebibyte: the alignment of regions, blocks and the log.
pub const MIB: u64 = 1024 * 1024;

/// "vhdxfile": the file type identifier at offset 0.
pub const FILE_SIGNATURE: [u8; 8] = *b"vhdxfile";
/// The two header slots.
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// The two region table copies.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// Size of a header as checksummed.
pub const HEADER_SIZE: usize = 4096;
/// Size of a region table as checksummed.
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// The end of the fixed header section: the first byte any region may use.
pub const HEADER_SECTION_END: u64 = MIB;
/// Most entries a region table may hold.
pub const MAX_REGION_ENTRIES: u32 = 2047;
/// Most entries a metadata table may hold.
pub const MAX_METADATA_ENTRIES: u16 = 2047;
/// Size of the metadata table at the start of the metadata region.
pub const METADATA_TABLE_SIZE: u64 = 64 * KIB;

/// "head"
pub const HEADER_SIGNATURE: [u8; 4] = *b"head";
/// "regi"
pub const REGION_SIGNATURE: [u8; 4] = *b"regi";
/// "metadata"
pub const METADATA_SIGNATURE: [u8; 8] = *b"metadata";
/// "loge"
pub const LOG_ENTRY_SIGNATURE: [u8; 4] = *b"loge";
/// "zero"
pub const ZERO_DESC_SIGNATURE: [u8; 4] = *b"zero";
/// "desc"
pub const DATA_DESC_SIGNATURE: [u8; 4] = *b"desc";
/// "data"
pub const DATA_SECTOR_SIGNATURE: [u8; 4] = *b"data";

/// The header's Version field.
pub const VERSION: u16 = 1;
/// The header's LogVersion field.
pub const LOG_VERSION: u16 = 0;
/// Log sectors are 4 KiB.
pub const LOG_SECTOR: u64 = 4096;

/// Smallest and largest block sizes.
pub const MIN_BLOCK_SIZE: u32 = MIB as u32;
/// Largest block size (256 MiB).
pub const MAX_BLOCK_SIZE: u32 = 256 * MIB as u32;
/// Largest virtual disk (64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;
/// A sector bitmap block is 1 MiB and describes 2^23 sectors.
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;

/// A GUID as stored on disk (Windows layout: the first three fields little-endian).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(transparent)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID.
    pub const NIL: Guid = Guid([0; 16]);

    /// From a [`Uuid`] (the usual textual form).
    pub fn from_uuid(u: Uuid) -> Self {
        Guid(u.to_bytes_le())
    }

    /// As a [`Uuid`].
    pub fn to_uuid(self) -> Uuid {
        Uuid::from_bytes_le(self.0)
    }

    /// A new random GUID.
    pub fn random() -> Self {
        Self::from_uuid(Uuid::new_v4())
    }

    /// Whether this is the nil GUID.
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    const fn parse(s: &str) -> Guid {
        match Uuid::try_parse(s) {
            Ok(u) => {
                let b = u.as_bytes();
                Guid([
                    b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11],
                    b[12], b[13], b[14], b[15],
                ])
            }
            Err(_) => panic!("bad GUID constant"),
        }
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_uuid())
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_uuid())
    }
}

/// Region: the block allocation table.
pub const BAT_REGION: Guid = Guid::parse("2DC27766-F623-4200-9D64-115E9BFD4A08");
/// Region: the metadata region.
pub const METADATA_REGION: Guid = Guid::parse("8B7CA206-4790-4B9A-B8FE-575F050F886E");

/// Metadata item: file parameters.
pub const FILE_PARAMETERS: Guid = Guid::parse("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
/// Metadata item: virtual disk size.
pub const VIRTUAL_DISK_SIZE: Guid = Guid::parse("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
/// Metadata item: SCSI page 83 data.
pub const PAGE83_DATA: Guid = Guid::parse("BECA12AB-B2E6-4523-93EF-C309E000C746");
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::parse("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::parse("CDA348C7-445D-4471-9CC9-E9885251C556");
/// Metadata item: parent locator.
pub const PARENT_LOCATOR: Guid = Guid::parse("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
/// vstor's own metadata item marking a disk that a merge is writing into; optional, so other
/// implementations keep it and ignore it. Holds the disk's DataWriteGuid from before the merge
/// and the merged disks ([`crate::lifecycle::MergeMarker`]).
pub const MERGE_MARKER: Guid = Guid::parse("5C6D2A0E-3B7F-4E8A-9D1C-0A7E5B3F9C21");
/// The only parent locator type: a VHDX parent.
pub const VHDX_PARENT_LOCATOR_TYPE: Guid = Guid::parse("B04AEFB7-D19E-4A81-B789-25B8E9445913");

/// The file type identifier (offset 0, 64 KiB reserved).
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FileIdentifier {
    /// "vhdxfile"
    pub signature: [u8; 8],
    /// The creator, UTF-16LE, NUL padded.
    pub creator: [U16; 256],
}

/// A header (one 4 KiB slot of a 64 KiB area).
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Header {
    /// "head"
    pub signature: [u8; 4],
    /// CRC-32C over the 4 KiB header with this field zero.
    pub checksum: U32,
    /// The newer valid header has the larger number.
    pub sequence_number: U64,
    /// Changed before the first modification of the file after each open.
    pub file_write_guid: Guid,
    /// Changed before the first modification of user-visible data after each open.
    pub data_write_guid: Guid,
    /// Non-nil when the log holds entries to replay.
    pub log_guid: Guid,
    /// 0
    pub log_version: U16,
    /// 1
    pub version: U16,
    /// Bytes, a multiple of 1 MiB.
    pub log_length: U32,
    /// Byte offset, a multiple of 1 MiB.
    pub log_offset: U64,
    /// Up to 4 KiB.
    pub reserved: [u8; 4016],
}

/// The region table header.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RegionTableHeader {
    /// "regi"
    pub signature: [u8; 4],
    /// CRC-32C over the 64 KiB table with this field zero.
    pub checksum: U32,
    /// Number of entries.
    pub entry_count: U32,
    /// 0
    pub reserved: U32,
}

/// A region table entry.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RegionTableEntry {
    /// Which region.
    pub guid: Guid,
    /// Byte offset, a multiple of 1 MiB.
    pub file_offset: U64,
    /// Bytes, a multiple of 1 MiB.
    pub length: U32,
    /// Bit 0: Required.
    pub flags: U32,
}

/// The metadata table header.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MetadataTableHeader {
    /// "metadata"
    pub signature: [u8; 8],
    /// 0
    pub reserved: U16,
    /// Number of entries.
    pub entry_count: U16,
    /// 0
    pub reserved2: [u8; 20],
}

/// A metadata table entry.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MetadataTableEntry {
    /// Which item.
    pub item_id: Guid,
    /// Offset from the start of the metadata region (0 when `length` is 0).
    pub offset: U32,
    /// Length in bytes.
    pub length: U32,
    /// Bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired.
    pub flags: U32,
    /// 0
    pub reserved: U32,
}

/// Metadata entry flag: a user item.
pub const META_IS_USER: u32 = 1;
/// Metadata entry flag: describes the virtual disk (not the file).
pub const META_IS_VIRTUAL_DISK: u32 = 2;
/// Metadata entry flag: an implementation must understand it to open the file.
pub const META_IS_REQUIRED: u32 = 4;

/// The file parameters item.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FileParameters {
    /// Block size in bytes.
    pub block_size: U32,
    /// Bit 0 LeaveBlockAllocated, bit 1 HasParent.
    pub flags: U32,
}

/// File parameters flag: blocks of a fixed disk stay allocated.
pub const FP_LEAVE_BLOCK_ALLOCATED: u32 = 1;
/// File parameters flag: a differencing disk.
pub const FP_HAS_PARENT: u32 = 2;

/// The parent locator item header.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ParentLocatorHeader {
    /// [`VHDX_PARENT_LOCATOR_TYPE`]
    pub locator_type: Guid,
    /// 0
    pub reserved: U16,
    /// Number of key/value entries.
    pub key_value_count: U16,
}

/// A parent locator key/value entry (offsets from the start of the locator item).
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ParentLocatorEntry {
    /// Offset of the UTF-16LE key.
    pub key_offset: U32,
    /// Offset of the UTF-16LE value.
    pub value_offset: U32,
    /// Key length in bytes.
    pub key_length: U16,
    /// Value length in bytes.
    pub value_length: U16,
}

/// A log entry header (at the start of each entry, 4 KiB aligned in the log).
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct LogEntryHeader {
    /// "loge"
    pub signature: [u8; 4],
    /// CRC-32C over the whole entry (`entry_length` bytes) with this field zero.
    pub checksum: U32,
    /// Bytes, a multiple of 4 KiB.
    pub entry_length: U32,
    /// Offset in the log of the first entry of the active sequence.
    pub tail: U32,
    /// Consecutive entries of a sequence have consecutive numbers.
    pub sequence_number: U64,
    /// Number of descriptors after this header.
    pub descriptor_count: U32,
    /// 0
    pub reserved: U32,
    /// Must match the header's LogGuid.
    pub log_guid: Guid,
    /// File size when this entry was written, all of it flushed.
    pub flushed_file_offset: U64,
    /// File size every structure fits in; the file must be extended to at least this.
    pub last_file_offset: U64,
}

/// A zero descriptor or data descriptor (32 bytes; told apart by the signature).
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Descriptor {
    /// "zero" or "desc"
    pub signature: [u8; 4],
    /// zero: reserved; desc: the last 4 bytes of the sector.
    pub trailing_bytes: [u8; 4],
    /// zero: the length to zero (a multiple of 4 KiB); desc: the first 8 bytes of the sector.
    pub leading_or_length: [u8; 8],
    /// Target file offset, 4 KiB aligned.
    pub file_offset: U64,
    /// The entry's sequence number.
    pub sequence_number: U64,
}

/// A data sector (4 KiB) of a log entry: the middle 4084 bytes of the target sector.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DataSector {
    /// "data"
    pub signature: [u8; 4],
    /// The high 32 bits of the sequence number.
    pub sequence_high: U32,
    /// Bytes 8..4092 of the target sector.
    pub data: [u8; 4084],
    /// The low 32 bits of the sequence number.
    pub sequence_low: U32,
}

/// Payload block states (the low three bits of a BAT entry).
pub mod payload {
    /// Not present in this file (root: zeros; differencing: the parent's data).
    pub const NOT_PRESENT: u64 = 0;
    /// Contents undefined (read as zeros).
    pub const UNDEFINED: u64 = 1;
    /// Reads as zeros.
    pub const ZERO: u64 = 2;
    /// Unmapped by a discard (read as zeros).
    pub const UNMAPPED: u64 = 3;
    /// The legacy value of UNMAPPED some early writers used: accepted, never written.
    pub const UNMAPPED_LEGACY: u64 = 5;
    /// All sectors in this file.
    pub const FULLY_PRESENT: u64 = 6;
    /// Differencing only: the sector bitmap says which sectors are in this file.
    pub const PARTIALLY_PRESENT: u64 = 7;
}

/// Sector bitmap block states.
pub mod bitmap {
    /// No bitmap block: every bit reads as zero.
    pub const NOT_PRESENT: u64 = 0;
    /// The bitmap block is in the file.
    pub const PRESENT: u64 = 6;
}

/// A BAT entry's state.
pub fn bat_state(entry: u64) -> u64 {
    entry & 7
}

/// A BAT entry's file offset in bytes.
pub fn bat_offset(entry: u64) -> u64 {
    (entry >> 20) << 20
}

/// Builds a BAT entry.
pub fn bat_entry(state: u64, offset: u64) -> u64 {
    debug_assert_eq!(offset % MIB, 0);
    state | (offset & !(MIB - 1))
}

/// CRC-32C of `bytes` with the 4-byte checksum field at `field` taken as zero.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    let c = crc32c::crc32c(&bytes[..field]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &bytes[field + 4..])
}

/// Writes the checksum of `bytes` into its field at `field`.
pub fn seal(bytes: &mut [u8], field: usize) {
    let c = checksum(bytes, field);
    bytes[field..field + 4].copy_from_slice(&c.to_le_bytes());
}

/// Reads the stored checksum at `field`.
pub fn stored_checksum(bytes: &[u8], field: usize) -> u32 {
    u32::from_le_bytes(bytes[field..field + 4].try_into().expect("4 bytes"))
}

/// Encodes a string as UTF-16LE bytes.
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Decodes UTF-16LE bytes (an odd length or unpaired surrogates are errors).
pub fn from_utf16le(b: &[u8]) -> Option<String> {
    if b.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

/// The geometry of an image: everything derived from the metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Logical sector size.
    pub logical_sector: u32,
    /// Physical sector size.
    pub physical_sector: u32,
    /// A differencing disk.
    pub has_parent: bool,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Number of payload blocks.
    pub data_blocks: u64,
    /// Number of sector bitmap blocks (chunks).
    pub bitmap_blocks: u64,
    /// Number of BAT entries.
    pub bat_entries: u64,
}

impl Geometry {
    /// Derives the geometry; the inputs must have been validated.
    pub fn new(
        virtual_size: u64,
        block_size: u32,
        logical: u32,
        physical: u32,
        has_parent: bool,
    ) -> Self {
        let chunk_ratio = (SECTORS_PER_BITMAP * logical as u64) / block_size as u64;
        let data_blocks = virtual_size.div_ceil(block_size as u64);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let bat_entries = if has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        Geometry {
            virtual_size,
            block_size,
            logical_sector: logical,
            physical_sector: physical,
            has_parent,
            chunk_ratio,
            data_blocks,
            bitmap_blocks,
            bat_entries,
        }
    }

    /// The BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// The BAT index of the sector bitmap entry of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// The BAT region's minimum size in bytes (rounded up to 1 MiB).
    pub fn bat_bytes(&self) -> u64 {
        (self.bat_entries * 8).div_ceil(MIB).max(1) * MIB
    }

    /// The bytes of the file the BAT entry at `index` needs when mapped: 1 MiB for a sector
    /// bitmap; for a payload block, the part of the block inside the virtual disk (the last
    /// block may be short, and writers such as QEMU size the file to match).
    pub fn mapped_len(&self, index: u64) -> u64 {
        if (index + 1) % (self.chunk_ratio + 1) == 0 {
            return MIB;
        }
        let block = index - index / (self.chunk_ratio + 1);
        let bs = self.block_size as u64;
        match self.virtual_size.saturating_sub(block * bs).min(bs) {
            0 => bs,
            n => n,
        }
    }

    /// Sectors per block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size as u64 / self.logical_sector as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_spec() {
        assert_eq!(size_of::<FileIdentifier>(), 520);
        assert_eq!(size_of::<Header>(), 4096);
        assert_eq!(size_of::<RegionTableHeader>(), 16);
        assert_eq!(size_of::<RegionTableEntry>(), 32);
        assert_eq!(size_of::<MetadataTableHeader>(), 32);
        assert_eq!(size_of::<MetadataTableEntry>(), 32);
        assert_eq!(size_of::<ParentLocatorHeader>(), 20);
        assert_eq!(size_of::<ParentLocatorEntry>(), 12);
        assert_eq!(size_of::<LogEntryHeader>(), 64);
        assert_eq!(size_of::<Descriptor>(), 32);
        assert_eq!(size_of::<DataSector>(), 4096);
    }

    #[test]
    fn guid_constants_use_the_windows_layout() {
        // The BAT GUID as it appears in a file written by Hyper-V.
        assert_eq!(
            BAT_REGION.0,
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        assert_eq!(
            BAT_REGION.to_string(),
            "2dc27766-f623-4200-9d64-115e9bfd4a08"
        );
    }

    #[test]
    fn geometry_follows_the_spec_formulas() {
        // 1 GiB, 32 MiB blocks, 512-byte sectors: chunk ratio 128, 32 blocks, one chunk.
        let g = Geometry::new(1 << 30, 32 << 20, 512, 4096, false);
        assert_eq!(
            (g.chunk_ratio, g.data_blocks, g.bitmap_blocks, g.bat_entries),
            (128, 32, 1, 32)
        );
        // Dynamic: a bitmap slot after every chunk_ratio payload entries, except after the last.
        let g = Geometry::new(10 << 30, 1 << 20, 512, 512, false);
        assert_eq!(g.chunk_ratio, 4096);
        assert_eq!(g.data_blocks, 10240);
        assert_eq!(g.bat_entries, 10240 + 2);
        assert_eq!(g.payload_index(4096), 4097);
        let d = Geometry::new(10 << 30, 1 << 20, 512, 512, true);
        assert_eq!(d.bat_entries, 3 * 4097);
        assert_eq!(d.bitmap_index(0), 4096);
        let g = Geometry::new(1 << 30, 1 << 20, 4096, 4096, false);
        assert_eq!(g.chunk_ratio, 32768);
    }

    #[test]
    fn checksum_ignores_its_own_field() {
        let mut b = vec![7u8; 64];
        seal(&mut b, 4);
        assert_eq!(checksum(&b, 4), stored_checksum(&b, 4));
        b[10] ^= 1;
        assert_ne!(checksum(&b, 4), stored_checksum(&b, 4));
    }
}
