//! Creating new images: fixed, dynamic and differencing.

use std::path::{Path, PathBuf};

use vstor_core::{BlockDevice, Result};
use zerocopy::IntoBytes;

use crate::error::invalid;
use crate::format::*;
use crate::meta::{self, ParentLocator, Region};

/// What kind of disk to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// Every block allocated up front (LeaveBlockAllocated).
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// A child of `parent`: reads fall through to it until written.
    Differencing {
        /// The parent image.
        parent: PathBuf,
    },
}

/// Parameters of a new image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (ignored for differencing disks: the parent's size is used).
    pub size: u64,
    /// The kind.
    pub kind: DiskKind,
    /// Block size (None: 32 MiB, or the parent's for a differencing disk).
    pub block_size: Option<u32>,
    /// Logical sector size, 512 or 4096 (None: 512, or the parent's).
    pub logical_sector_size: Option<u32>,
    /// Physical sector size, 512 or 4096 (None: 4096, or the parent's).
    pub physical_sector_size: Option<u32>,
    /// Log size, a multiple of 1 MiB (None: 1 MiB).
    pub log_size: Option<u64>,
}

impl CreateOptions {
    /// A dynamic disk of `size` bytes with default parameters.
    pub fn dynamic(size: u64) -> Self {
        CreateOptions {
            size,
            kind: DiskKind::Dynamic,
            block_size: None,
            logical_sector_size: None,
            physical_sector_size: None,
            log_size: None,
        }
    }

    /// A fixed disk of `size` bytes.
    pub fn fixed(size: u64) -> Self {
        CreateOptions {
            kind: DiskKind::Fixed,
            ..Self::dynamic(size)
        }
    }

    /// A differencing disk over `parent`.
    pub fn differencing(parent: impl Into<PathBuf>) -> Self {
        CreateOptions {
            kind: DiskKind::Differencing {
                parent: parent.into(),
            },
            ..Self::dynamic(0)
        }
    }

    /// Sets the block size.
    pub fn block_size(mut self, b: u32) -> Self {
        self.block_size = Some(b);
        self
    }

    /// Sets the logical sector size.
    pub fn logical_sector_size(mut self, s: u32) -> Self {
        self.logical_sector_size = Some(s);
        self
    }

    /// Sets the physical sector size.
    pub fn physical_sector_size(mut self, s: u32) -> Self {
        self.physical_sector_size = Some(s);
        self
    }
}

/// The default block size of a dynamic disk (as Hyper-V uses).
pub const DEFAULT_BLOCK_SIZE: u32 = 32 * MIB as u32;

/// What a new differencing disk inherits from its parent.
#[derive(Clone, Debug)]
pub struct ParentFacts {
    /// The parent's virtual size.
    pub size: u64,
    /// Its block size.
    pub block_size: u32,
    /// Its logical sector size.
    pub logical: u32,
    /// Its physical sector size.
    pub physical: u32,
    /// Its DataWriteGuid.
    pub data_write_guid: Guid,
}

/// Validates parameters and derives the geometry.
pub fn plan(opts: &CreateOptions, parent: Option<&ParentFacts>) -> Result<Geometry> {
    let size = parent.map_or(opts.size, |p| p.size);
    let block = opts
        .block_size
        .or(parent.map(|p| p.block_size))
        .unwrap_or(DEFAULT_BLOCK_SIZE);
    let logical = opts
        .logical_sector_size
        .or(parent.map(|p| p.logical))
        .unwrap_or(512);
    let physical = opts
        .physical_sector_size
        .or(parent.map(|p| p.physical))
        .unwrap_or(4096);
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block) || !block.is_power_of_two() {
        return Err(invalid(format!(
            "block size {block} must be a power of two from 1 MiB to 256 MiB"
        )));
    }
    if logical != 512 && logical != 4096 {
        return Err(invalid(format!(
            "logical sector size {logical} must be 512 or 4096"
        )));
    }
    if physical != 512 && physical != 4096 {
        return Err(invalid(format!(
            "physical sector size {physical} must be 512 or 4096"
        )));
    }
    if let Some(p) = parent {
        if logical != p.logical {
            return Err(invalid(format!(
                "a differencing disk must have its parent's logical sector size ({})",
                p.logical
            )));
        }
    }
    if size == 0 || size > MAX_VIRTUAL_SIZE || size % logical as u64 != 0 {
        return Err(invalid(format!("size {size} must be a multiple of the {logical}-byte logical sector, from one sector to 64 TiB")));
    }
    if let Some(l) = opts.log_size {
        if l == 0 || l % MIB != 0 || l > 256 * MIB {
            return Err(invalid(format!(
                "log size {l} must be a multiple of 1 MiB up to 256 MiB"
            )));
        }
    }
    Ok(Geometry::new(
        size,
        block,
        logical,
        physical,
        parent.is_some(),
    ))
}

/// The locator key vstor adds when the parent's path relative to the child has a backslash in
/// a name: the path as it is on this system ('/' separators, every other byte kept), which the
/// Windows forms (where '\\' separates) cannot say. Other implementations ignore the key.
pub const POSIX_RELATIVE_PATH: &str = "vstor_posix_relative_path";

/// The parent locator a new child records: the parent's DataWriteGuid and its path relative to
/// the child's directory (Windows separators) and absolute, and where a name holds a
/// backslash, the relative path as it is here ([`POSIX_RELATIVE_PATH`]).
pub fn locator_for(child: &Path, parent: &Path, linkage: Guid) -> Result<ParentLocator> {
    let abs_parent = std::path::absolute(parent)
        .map_err(|e| vstor_core::Error::io(format!("cannot resolve {}", parent.display()), e))?;
    let abs_child = std::path::absolute(child)
        .map_err(|e| vstor_core::Error::io(format!("cannot resolve {}", child.display()), e))?;
    let child_dir = abs_child.parent().unwrap_or(Path::new("/"));
    let rel = relative(child_dir, &abs_parent);
    let win = |p: &str| p.replace('/', "\\");
    let abs = abs_parent.to_string_lossy().to_string();
    let mut entries = vec![
        (
            "parent_linkage".into(),
            format!("{{{}}}", linkage.to_uuid()),
        ),
        ("relative_path".into(), win(&rel)),
        (
            "absolute_win32_path".into(),
            format!("\\\\?\\{}", win(&abs)),
        ),
    ];
    if rel.contains('\\') {
        entries.push((POSIX_RELATIVE_PATH.into(), rel));
    }
    Ok(ParentLocator { entries })
}

fn relative(from_dir: &Path, to: &Path) -> String {
    let a: Vec<_> = from_dir.components().collect();
    let b: Vec<_> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    if common == a.len() {
        parts.push(".".into());
    }
    for _ in common..a.len() {
        parts.push("..".into());
    }
    for c in &b[common..] {
        parts.push(c.as_os_str().to_string_lossy().to_string());
    }
    parts.join("/")
}

/// The layout of a new file.
struct Layout {
    log: Region,
    metadata: Region,
    bat: Region,
    data_start: u64,
}

fn layout(g: &Geometry, log_size: u64) -> Layout {
    let log = Region {
        guid: Guid::NIL,
        offset: MIB,
        length: log_size,
        required: false,
    };
    let metadata = Region {
        guid: METADATA_REGION,
        offset: log.offset + log.length,
        length: MIB,
        required: true,
    };
    let bat = Region {
        guid: BAT_REGION,
        offset: metadata.offset + metadata.length,
        length: g.bat_bytes(),
        required: true,
    };
    let data_start = bat.offset + bat.length;
    Layout {
        log,
        metadata,
        bat,
        data_start,
    }
}

/// Writes a new image onto `file` (which must be empty or disposable, and resizable).
pub fn write_new(
    file: &dyn BlockDevice,
    g: &Geometry,
    fixed: bool,
    parent: Option<&ParentLocator>,
    log_size: Option<u64>,
) -> Result<()> {
    let l = layout(g, log_size.unwrap_or(MIB));
    // BAT entries: fixed disks get every block, differencing disks every sector bitmap block
    // (zero-filled, so sparse: libvhdi reads bitmaps of every differencing block).
    let mut bat = vec![0u64; g.bat_entries as usize];
    let mut end = l.data_start;
    if fixed {
        for b in 0..g.data_blocks {
            bat[g.payload_index(b) as usize] = bat_entry(payload::FULLY_PRESENT, end);
            end += g.block_size as u64;
        }
    }
    if parent.is_some() {
        for c in 0..g.bitmap_blocks {
            bat[g.bitmap_index(c) as usize] = bat_entry(bitmap::PRESENT, end);
            end += MIB;
        }
    }
    file.resize(end)?;
    let mut id = vec![0u8; 64 * 1024];
    let creator: Vec<u8> = utf16le(&format!("vstor {}", env!("CARGO_PKG_VERSION")));
    id[..8].copy_from_slice(&FILE_SIGNATURE);
    id[8..8 + creator.len()].copy_from_slice(&creator);
    file.write_at(0, &id)?;
    let h = Header {
        signature: HEADER_SIGNATURE,
        checksum: 0.into(),
        sequence_number: 1.into(),
        file_write_guid: Guid::random(),
        data_write_guid: Guid::random(),
        log_guid: Guid::NIL,
        log_version: LOG_VERSION.into(),
        version: VERSION.into(),
        log_length: (l.log.length as u32).into(),
        log_offset: l.log.offset.into(),
        reserved: [0; 4016],
    };
    let raw = meta::header_bytes(&h);
    file.write_at(HEADER_OFFSETS[0], &raw)?;
    let mut h2 = h.clone();
    h2.sequence_number = 2.into();
    file.write_at(HEADER_OFFSETS[1], &meta::header_bytes(&h2))?;
    let rt = meta::region_table_bytes(&[l.bat.clone(), l.metadata.clone()]);
    file.write_at(REGION_TABLE_OFFSETS[0], &rt)?;
    file.write_at(REGION_TABLE_OFFSETS[1], &rt)?;
    let items = meta::standard_items(g, fixed, Guid::random(), parent);
    file.write_at(
        l.metadata.offset,
        &meta::metadata_region_bytes(&items, l.metadata.length),
    )?;
    let mut bat_bytes = vec![0u8; l.bat.length as usize];
    bat_bytes[..bat.len() * 8].copy_from_slice(bat.as_bytes());
    file.write_at(l.bat.offset, &bat_bytes)?;
    // The log region gets its space now: a log write is what commits every later metadata
    // change, and one that first needs new space on a full file system fails the flush that
    // was to make the data written before it durable (a hole there did that).
    preallocate(file, l.log.offset, l.log.length)?;
    file.flush()
}

/// Gives `[offset, offset + len)` of `file` its space: write-zeroes, which allocates on file
/// systems that have FALLOC_FL_ZERO_RANGE and writes zeroes on the others, or zeroes written as
/// data where the device has no write-zeroes.
fn preallocate(file: &dyn BlockDevice, offset: u64, len: u64) -> Result<()> {
    if file.info().supports.write_zeroes {
        return file.write_zeroes(offset, len);
    }
    let chunk = vec![0u8; len.min(MIB) as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(chunk.len() as u64) as usize;
        file.write_at(offset + pos, &chunk[..n])?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative(Path::new("/a/b"), Path::new("/a/b/p.vhdx")),
            "./p.vhdx"
        );
        assert_eq!(
            relative(Path::new("/a/b"), Path::new("/a/c/p.vhdx")),
            "../c/p.vhdx"
        );
    }

    #[test]
    fn plan_refuses_bad_parameters() {
        assert!(plan(&CreateOptions::dynamic(1 << 30).block_size(3 << 20), None).is_err());
        assert!(plan(
            &CreateOptions::dynamic(1 << 30).logical_sector_size(1024),
            None
        )
        .is_err());
        assert!(plan(&CreateOptions::dynamic(1000), None).is_err());
        assert!(plan(&CreateOptions::dynamic(MAX_VIRTUAL_SIZE + 512), None).is_err());
        assert!(plan(&CreateOptions::dynamic(MAX_VIRTUAL_SIZE), None).is_ok());
    }
}
