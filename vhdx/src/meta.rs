//! Parsing and building the fixed structures: file identifier, headers, region table and the
//! metadata region (file parameters, sizes, page 83 data, parent locator).

use vstor_core::{BlockDevice, Result};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::{corrupt, VhdxError};
use crate::format::*;

/// A valid header and the slot it was read from.
#[derive(Clone, Debug)]
pub struct HeaderSlot {
    /// 0 or 1.
    pub slot: usize,
    /// The header.
    pub header: Header,
}

/// What the two header slots hold.
#[derive(Clone, Debug)]
pub struct Headers {
    /// The current (newest valid) header.
    pub current: HeaderSlot,
    /// Per slot: `Ok` when valid, or why not.
    pub slots: [std::result::Result<u64, String>; 2],
}

/// Reads the file identifier and returns the creator string.
pub fn read_identifier(file: &dyn BlockDevice, name: &str) -> Result<String> {
    if file.capacity() < 1024 * 1024 {
        // The file's own length where there is a file (the device serves whole sectors only).
        let len = file
            .as_file()
            .and_then(|f| std::fs::metadata(f.path()).ok())
            .map_or(file.capacity(), |m| m.len());
        return Err(corrupt(
            name,
            0,
            "file",
            format!("{len} bytes is too small for a VHDX file (at least 1 MiB)"),
        ));
    }
    let mut buf = vec![0u8; 4096];
    file.read_at(0, &mut buf)?;
    let id = FileIdentifier::read_from_prefix(&buf).expect("size").0;
    if id.signature != FILE_SIGNATURE {
        return Err(corrupt(
            name,
            0,
            "file identifier",
            "signature is not \"vhdxfile\": not a VHDX file",
        ));
    }
    let units: Vec<u16> = id
        .creator
        .iter()
        .map(|u| u.get())
        .take_while(|&u| u != 0)
        .collect();
    Ok(String::from_utf16_lossy(&units))
}

fn check_header(h: &Header, raw: &[u8], file_size: u64) -> std::result::Result<(), String> {
    if h.signature != HEADER_SIGNATURE {
        return Err("signature is not \"head\"".into());
    }
    let c = checksum(raw, 4);
    if c != h.checksum.get() {
        return Err(format!(
            "checksum {:#010x} does not match the stored {:#010x}",
            c,
            h.checksum.get()
        ));
    }
    if h.version.get() != VERSION {
        return Err(format!("version {} (only 1 is defined)", h.version.get()));
    }
    if h.log_version.get() != LOG_VERSION {
        return Err(format!(
            "log version {} (only 0 is defined)",
            h.log_version.get()
        ));
    }
    let (lo, ll) = (h.log_offset.get(), h.log_length.get() as u64);
    if lo % MIB != 0 || ll % MIB != 0 || ll == 0 || lo < HEADER_SECTION_END {
        return Err(format!(
            "log at {lo} of {ll} bytes is not a 1 MiB aligned region after the header section"
        ));
    }
    if lo.saturating_add(ll) > file_size {
        return Err(format!(
            "log at {lo} of {ll} bytes reaches past the end of the file ({file_size} bytes)"
        ));
    }
    Ok(())
}

/// Reads both header slots and picks the current one: the valid header with the larger
/// sequence number. Two valid headers with equal numbers are accepted when identical (as
/// Disk2VHD writes them).
pub fn read_headers(file: &dyn BlockDevice, name: &str) -> Result<Headers> {
    let mut found: Vec<Option<Header>> = vec![None, None];
    let mut slots: [std::result::Result<u64, String>; 2] = [Err(String::new()), Err(String::new())];
    for (i, &off) in HEADER_OFFSETS.iter().enumerate() {
        let mut raw = vec![0u8; HEADER_SIZE];
        file.read_at(off, &mut raw)?;
        let h = Header::read_from_bytes(&raw).expect("size");
        match check_header(&h, &raw, file.capacity()) {
            Ok(()) => {
                slots[i] = Ok(h.sequence_number.get());
                found[i] = Some(h);
            }
            Err(why) => slots[i] = Err(why),
        }
    }
    let current = match (&found[0], &found[1]) {
        (None, None) => {
            let why = |s: &std::result::Result<u64, String>| {
                s.as_ref().err().cloned().unwrap_or_default()
            };
            return Err(corrupt(
                name,
                HEADER_OFFSETS[0],
                "header",
                format!(
                    "neither header is valid (first: {}; second: {})",
                    why(&slots[0]),
                    why(&slots[1])
                ),
            ));
        }
        (Some(a), None) => HeaderSlot {
            slot: 0,
            header: a.clone(),
        },
        (None, Some(b)) => HeaderSlot {
            slot: 1,
            header: b.clone(),
        },
        (Some(a), Some(b)) => {
            let (sa, sb) = (a.sequence_number.get(), b.sequence_number.get());
            if sa > sb {
                HeaderSlot {
                    slot: 0,
                    header: a.clone(),
                }
            } else if sb > sa {
                HeaderSlot {
                    slot: 1,
                    header: b.clone(),
                }
            } else if a.as_bytes() == b.as_bytes() {
                HeaderSlot {
                    slot: 0,
                    header: a.clone(),
                }
            } else {
                return Err(corrupt(
                    name,
                    HEADER_OFFSETS[1],
                    "header",
                    format!("both headers have sequence number {sa} but differ"),
                ));
            }
        }
    };
    Ok(Headers { current, slots })
}

/// Serializes a header with its checksum.
pub fn header_bytes(h: &Header) -> Vec<u8> {
    let mut raw = h.as_bytes().to_vec();
    raw[4..8].fill(0);
    seal(&mut raw, 4);
    raw
}

/// A region table entry, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Which region.
    pub guid: Guid,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// The Required bit.
    pub required: bool,
}

/// The parsed region table.
#[derive(Clone, Debug)]
pub struct Regions {
    /// Every entry.
    pub all: Vec<Region>,
    /// The BAT region.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
    /// Which copy was used (0 or 1), and why the other was not when it differs.
    pub copy: usize,
    /// Problems with the copies (for check).
    pub problems: Vec<String>,
}

fn parse_region_table(raw: &[u8], name: &str, off: u64, file_size: u64) -> Result<Vec<Region>> {
    let hdr = RegionTableHeader::read_from_prefix(raw).expect("size").0;
    if hdr.signature != REGION_SIGNATURE {
        return Err(corrupt(
            name,
            off,
            "region table",
            "signature is not \"regi\"",
        ));
    }
    let c = checksum(raw, 4);
    if c != hdr.checksum.get() {
        return Err(corrupt(
            name,
            off,
            "region table",
            format!(
                "checksum {c:#010x} does not match the stored {:#010x}",
                hdr.checksum.get()
            ),
        ));
    }
    let n = hdr.entry_count.get();
    if n > MAX_REGION_ENTRIES {
        return Err(corrupt(
            name,
            off + 8,
            "region table entry count",
            format!("{n} entries (at most {MAX_REGION_ENTRIES})"),
        ));
    }
    let mut out: Vec<Region> = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        let at = 16 + 32 * i;
        let e = RegionTableEntry::read_from_bytes(&raw[at..at + 32]).expect("size");
        let r = Region {
            guid: e.guid,
            offset: e.file_offset.get(),
            length: e.length.get() as u64,
            required: e.flags.get() & 1 != 0,
        };
        let eoff = off + at as u64;
        if r.offset % MIB != 0
            || r.length % MIB != 0
            || r.length == 0
            || r.offset < HEADER_SECTION_END
        {
            return Err(corrupt(
                name,
                eoff,
                "region table entry",
                format!(
                    "region {} at {} of {} bytes is not 1 MiB aligned after the header section",
                    r.guid, r.offset, r.length
                ),
            ));
        }
        if r.offset
            .checked_add(r.length)
            .is_none_or(|end| end > file_size)
        {
            return Err(corrupt(name, eoff, "region table entry", format!("region {} at {} of {} bytes reaches past the end of the file ({file_size} bytes)", r.guid, r.offset, r.length)));
        }
        if out.iter().any(|o| o.guid == r.guid) {
            return Err(corrupt(
                name,
                eoff,
                "region table entry",
                format!("region {} appears twice", r.guid),
            ));
        }
        if let Some(o) = out
            .iter()
            .find(|o| r.offset < o.offset + o.length && o.offset < r.offset + r.length)
        {
            return Err(corrupt(
                name,
                eoff,
                "region table entry",
                format!("region {} overlaps region {}", r.guid, o.guid),
            ));
        }
        if r.guid != BAT_REGION && r.guid != METADATA_REGION && r.required {
            return Err(VhdxError::Unsupported {
                file: name.to_string(),
                what: format!("required region {} (at offset {eoff})", r.guid),
            }
            .into());
        }
        out.push(r);
    }
    Ok(out)
}

/// Reads the region table (the first copy, or the second when the first is damaged).
pub fn read_regions(file: &dyn BlockDevice, name: &str) -> Result<Regions> {
    let size = file.capacity();
    let mut problems = Vec::new();
    let mut first_err = None;
    for (copy, &off) in REGION_TABLE_OFFSETS.iter().enumerate() {
        let mut raw = vec![0u8; REGION_TABLE_SIZE];
        file.read_at(off, &mut raw)?;
        match parse_region_table(&raw, name, off, size) {
            Ok(all) => {
                let find = |g: Guid, what: &str| {
                    all.iter().find(|r| r.guid == g).cloned().ok_or_else(|| {
                        corrupt(name, off, "region table", format!("has no {what} region"))
                    })
                };
                let bat = find(BAT_REGION, "BAT")?;
                let metadata = find(METADATA_REGION, "metadata")?;
                if copy == 0 {
                    // Compare with the second copy for check's benefit.
                    let mut raw2 = vec![0u8; REGION_TABLE_SIZE];
                    file.read_at(REGION_TABLE_OFFSETS[1], &mut raw2)?;
                    if raw2 != raw {
                        problems.push(
                            "the second region table copy differs from the first".to_string(),
                        );
                    }
                } else {
                    problems.push(format!(
                        "the first region table copy is damaged: {}",
                        first_err
                            .as_ref()
                            .map(|e: &vstor_core::Error| e.to_string())
                            .unwrap_or_default()
                    ));
                }
                return Ok(Regions {
                    all,
                    bat,
                    metadata,
                    copy,
                    problems,
                });
            }
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    Err(first_err.expect("an error"))
}

/// Builds a region table (64 KiB) with its checksum.
pub fn region_table_bytes(regions: &[Region]) -> Vec<u8> {
    let mut raw = vec![0u8; REGION_TABLE_SIZE];
    let hdr = RegionTableHeader {
        signature: REGION_SIGNATURE,
        checksum: 0.into(),
        entry_count: (regions.len() as u32).into(),
        reserved: 0.into(),
    };
    raw[..16].copy_from_slice(hdr.as_bytes());
    for (i, r) in regions.iter().enumerate() {
        let e = RegionTableEntry {
            guid: r.guid,
            file_offset: r.offset.into(),
            length: (r.length as u32).into(),
            flags: (r.required as u32).into(),
        };
        raw[16 + 32 * i..48 + 32 * i].copy_from_slice(e.as_bytes());
    }
    seal(&mut raw, 4);
    raw
}

/// A metadata item as found in the table.
#[derive(Clone, Debug)]
pub struct MetaItem {
    /// Its id.
    pub id: Guid,
    /// Offset from the region start.
    pub offset: u32,
    /// Length.
    pub length: u32,
    /// Flags (IsUser, IsVirtualDisk, IsRequired).
    pub flags: u32,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// The parent locator's key/value pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentLocator {
    /// In file order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Serializes the locator item.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.entries.len();
        let mut strings = Vec::new();
        let mut table = Vec::new();
        let base = 20 + 12 * n;
        for (k, v) in &self.entries {
            let kb = utf16le(k);
            let vb = utf16le(v);
            let ko = base + strings.len();
            strings.extend_from_slice(&kb);
            let vo = base + strings.len();
            strings.extend_from_slice(&vb);
            table.push(ParentLocatorEntry {
                key_offset: (ko as u32).into(),
                value_offset: (vo as u32).into(),
                key_length: (kb.len() as u16).into(),
                value_length: (vb.len() as u16).into(),
            });
        }
        let hdr = ParentLocatorHeader {
            locator_type: VHDX_PARENT_LOCATOR_TYPE,
            reserved: 0.into(),
            key_value_count: (n as u16).into(),
        };
        let mut out = hdr.as_bytes().to_vec();
        for e in &table {
            out.extend_from_slice(e.as_bytes());
        }
        out.extend_from_slice(&strings);
        out
    }

    /// Parses a locator item; `at` is its file offset (for errors).
    pub fn parse(data: &[u8], name: &str, at: u64) -> Result<Self> {
        let bad = |why: String| corrupt(name, at, "parent locator", why);
        let (hdr, _) = ParentLocatorHeader::read_from_prefix(data)
            .map_err(|_| bad("shorter than its header".into()))?;
        if hdr.locator_type != VHDX_PARENT_LOCATOR_TYPE {
            return Err(VhdxError::Unsupported {
                file: name.to_string(),
                what: format!("parent locator type {}", hdr.locator_type),
            }
            .into());
        }
        let n = hdr.key_value_count.get() as usize;
        if 20 + 12 * n > data.len() {
            return Err(bad(format!(
                "{n} entries do not fit in {} bytes",
                data.len()
            )));
        }
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let e =
                ParentLocatorEntry::read_from_bytes(&data[20 + 12 * i..32 + 12 * i]).expect("size");
            let s = |o: u32, l: u16, what: &str| -> Result<String> {
                let (o, l) = (o as usize, l as usize);
                if o < 20 + 12 * n || o + l > data.len() || l == 0 {
                    return Err(bad(format!(
                        "entry {i}: {what} at {o} of {l} bytes is outside the locator"
                    )));
                }
                from_utf16le(&data[o..o + l])
                    .ok_or_else(|| bad(format!("entry {i}: {what} is not UTF-16")))
            };
            let k = s(e.key_offset.get(), e.key_length.get(), "key")?;
            let v = s(e.value_offset.get(), e.value_length.get(), "value")?;
            if entries.iter().any(|(ek, _): &(String, String)| *ek == k) {
                return Err(bad(format!("key {k} appears twice")));
            }
            entries.push((k, v));
        }
        Ok(ParentLocator { entries })
    }
}

/// The parsed metadata region.
#[derive(Clone, Debug)]
pub struct Metadata {
    /// Geometry from the items.
    pub geometry: Geometry,
    /// LeaveBlockAllocated.
    pub leave_allocated: bool,
    /// The page 83 identifier.
    pub page83: Guid,
    /// The parent locator of a differencing disk.
    pub parent: Option<ParentLocator>,
    /// Every item, known or not (unknown optional items are kept as they are).
    pub items: Vec<MetaItem>,
}

/// Reads and validates the metadata region.
pub fn read_metadata(file: &dyn BlockDevice, name: &str, region: &Region) -> Result<Metadata> {
    if region.length > 64 * MIB {
        return Err(corrupt(
            name,
            region.offset,
            "metadata region",
            format!("{} bytes is implausibly large", region.length),
        ));
    }
    let mut whole = vec![0u8; region.length as usize];
    file.read_at(region.offset, &mut whole)?;
    let table = &whole[..METADATA_TABLE_SIZE as usize];
    let hdr = MetadataTableHeader::read_from_prefix(table)
        .expect("size")
        .0;
    if hdr.signature != METADATA_SIGNATURE {
        return Err(corrupt(
            name,
            region.offset,
            "metadata table",
            "signature is not \"metadata\"",
        ));
    }
    let n = hdr.entry_count.get();
    if n > MAX_METADATA_ENTRIES {
        return Err(corrupt(
            name,
            region.offset + 10,
            "metadata table entry count",
            format!("{n} entries (at most {MAX_METADATA_ENTRIES})"),
        ));
    }
    let mut items: Vec<MetaItem> = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        let at = 32 + 32 * i;
        let eoff = region.offset + at as u64;
        let e = MetadataTableEntry::read_from_bytes(&table[at..at + 32]).expect("size");
        let (o, l) = (e.offset.get(), e.length.get());
        if l > 0 && ((o as u64) < METADATA_TABLE_SIZE || o as u64 + l as u64 > region.length) {
            return Err(corrupt(
                name,
                eoff,
                "metadata table entry",
                format!(
                    "item {} at {o} of {l} bytes lies outside the metadata region's data area",
                    e.item_id
                ),
            ));
        }
        if items.iter().any(|x| {
            x.id == e.item_id && (x.flags & META_IS_USER) == (e.flags.get() & META_IS_USER)
        }) {
            return Err(corrupt(
                name,
                eoff,
                "metadata table entry",
                format!("item {} appears twice", e.item_id),
            ));
        }
        if let Some(x) = items
            .iter()
            .find(|x| x.length > 0 && l > 0 && o < x.offset + x.length && x.offset < o + l)
        {
            return Err(corrupt(
                name,
                eoff,
                "metadata table entry",
                format!("item {} overlaps item {}", e.item_id, x.id),
            ));
        }
        // An empty item's offset means nothing (the spec wants 0): never index with it.
        let data = if l == 0 {
            Vec::new()
        } else {
            whole[o as usize..(o as usize + l as usize)].to_vec()
        };
        items.push(MetaItem {
            id: e.item_id,
            offset: o,
            length: l,
            flags: e.flags.get(),
            data,
        });
    }
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        PAGE83_DATA,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ];
    for it in &items {
        if it.flags & META_IS_REQUIRED != 0
            && (it.flags & META_IS_USER != 0 || !known.contains(&it.id))
        {
            return Err(VhdxError::Unsupported {
                file: name.to_string(),
                what: format!("required metadata item {}", it.id),
            }
            .into());
        }
    }
    let get = |id: Guid, what: &str, len: usize| -> Result<&MetaItem> {
        let it = items
            .iter()
            .find(|x| x.id == id && x.flags & META_IS_USER == 0)
            .ok_or_else(|| {
                corrupt(
                    name,
                    region.offset,
                    "metadata table",
                    format!("has no {what} item"),
                )
            })?;
        if (it.length as usize) < len {
            return Err(corrupt(
                name,
                region.offset + it.offset as u64,
                what,
                format!("{} bytes, expected {len}", it.length),
            ));
        }
        Ok(it)
    };
    let fp_item = get(FILE_PARAMETERS, "file parameters", 8)?;
    let fp = FileParameters::read_from_prefix(&fp_item.data)
        .expect("size")
        .0;
    let fp_off = region.offset + fp_item.offset as u64;
    let block_size = fp.block_size.get();
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(corrupt(
            name,
            fp_off,
            "file parameters",
            format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    let has_parent = fp.flags.get() & FP_HAS_PARENT != 0;
    let leave_allocated = fp.flags.get() & FP_LEAVE_BLOCK_ALLOCATED != 0;
    let vs_item = get(VIRTUAL_DISK_SIZE, "virtual disk size", 8)?;
    let virtual_size = u64::from_le_bytes(vs_item.data[..8].try_into().expect("8"));
    let ls_item = get(LOGICAL_SECTOR_SIZE, "logical sector size", 4)?;
    let logical = u32::from_le_bytes(ls_item.data[..4].try_into().expect("4"));
    let ps_item = get(PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?;
    let physical = u32::from_le_bytes(ps_item.data[..4].try_into().expect("4"));
    if logical != 512 && logical != 4096 {
        return Err(corrupt(
            name,
            region.offset + ls_item.offset as u64,
            "logical sector size",
            format!("{logical} (must be 512 or 4096)"),
        ));
    }
    if physical != 512 && physical != 4096 {
        return Err(corrupt(
            name,
            region.offset + ps_item.offset as u64,
            "physical sector size",
            format!("{physical} (must be 512 or 4096)"),
        ));
    }
    if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE || virtual_size % logical as u64 != 0 {
        return Err(corrupt(name, region.offset + vs_item.offset as u64, "virtual disk size", format!("{virtual_size} is not a multiple of the {logical}-byte sector from 1 sector to 64 TiB")));
    }
    let page83 = items
        .iter()
        .find(|x| x.id == PAGE83_DATA && x.length >= 16)
        .map(|x| Guid(x.data[..16].try_into().expect("16")))
        .unwrap_or(Guid::NIL);
    let parent = if has_parent {
        let it = items
            .iter()
            .find(|x| x.id == PARENT_LOCATOR && x.flags & META_IS_USER == 0)
            .ok_or_else(|| {
                corrupt(
                    name,
                    fp_off,
                    "file parameters",
                    "HasParent is set but there is no parent locator",
                )
            })?;
        Some(ParentLocator::parse(
            &it.data,
            name,
            region.offset + it.offset as u64,
        )?)
    } else {
        None
    };
    Ok(Metadata {
        geometry: Geometry::new(virtual_size, block_size, logical, physical, has_parent),
        leave_allocated,
        page83,
        parent,
        items,
    })
}

/// Builds a metadata region's content (table plus items, `len` bytes).
pub fn metadata_region_bytes(items: &[MetaItem], len: u64) -> Vec<u8> {
    let mut raw = vec![0u8; len as usize];
    let hdr = MetadataTableHeader {
        signature: METADATA_SIGNATURE,
        reserved: 0.into(),
        entry_count: (items.len() as u16).into(),
        reserved2: [0; 20],
    };
    raw[..32].copy_from_slice(hdr.as_bytes());
    for (i, it) in items.iter().enumerate() {
        let e = MetadataTableEntry {
            item_id: it.id,
            offset: it.offset.into(),
            length: it.length.into(),
            flags: it.flags.into(),
            reserved: 0.into(),
        };
        raw[32 + 32 * i..64 + 32 * i].copy_from_slice(e.as_bytes());
        let o = it.offset as usize;
        raw[o..o + it.data.len()].copy_from_slice(&it.data);
    }
    raw
}

/// Lays out the standard items (plus `extra`, kept as they were) one after another from 64 KiB.
pub fn standard_items(
    geometry: &Geometry,
    leave_allocated: bool,
    page83: Guid,
    parent: Option<&ParentLocator>,
) -> Vec<MetaItem> {
    let mut flags = 0;
    if leave_allocated {
        flags |= FP_LEAVE_BLOCK_ALLOCATED;
    }
    if parent.is_some() {
        flags |= FP_HAS_PARENT;
    }
    let fp = FileParameters {
        block_size: geometry.block_size.into(),
        flags: flags.into(),
    };
    let mut list: Vec<(Guid, u32, Vec<u8>)> = vec![
        (FILE_PARAMETERS, META_IS_REQUIRED, fp.as_bytes().to_vec()),
        (
            VIRTUAL_DISK_SIZE,
            META_IS_REQUIRED | META_IS_VIRTUAL_DISK,
            geometry.virtual_size.to_le_bytes().to_vec(),
        ),
        (
            PAGE83_DATA,
            META_IS_REQUIRED | META_IS_VIRTUAL_DISK,
            page83.0.to_vec(),
        ),
        (
            LOGICAL_SECTOR_SIZE,
            META_IS_REQUIRED | META_IS_VIRTUAL_DISK,
            geometry.logical_sector.to_le_bytes().to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            META_IS_REQUIRED | META_IS_VIRTUAL_DISK,
            geometry.physical_sector.to_le_bytes().to_vec(),
        ),
    ];
    if let Some(p) = parent {
        list.push((PARENT_LOCATOR, META_IS_REQUIRED, p.to_bytes()));
    }
    let mut off = METADATA_TABLE_SIZE as u32;
    list.into_iter()
        .map(|(id, flags, data)| {
            let it = MetaItem {
                id,
                offset: off,
                length: data.len() as u32,
                flags,
                data,
            };
            off += it.length.next_multiple_of(8);
            it
        })
        .collect()
}
