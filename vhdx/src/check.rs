//! Checking an image, structure by structure, without writing to it (the Test-VHD and
//! `qemu-img check` of vstor).
//!
//! Errors are damage (a structure that is invalid, blocks that overlap); warnings are states a
//! healthy implementation can leave behind but that deserve attention (a log waiting for replay,
//! space that belongs to no structure, a damaged spare header). An image is clean when there
//! are neither.

use std::path::Path;
use std::sync::Arc;

use vstor_core::{BlockDevice, FileDevice, FileOptions, Result};

use crate::format::*;
use crate::log::{self, Overlay};
use crate::meta;

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The structure concerned (for example `BAT entry 17`).
    pub structure: String,
    /// Its file offset, when it has one.
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.offset {
            Some(o) => write!(f, "{} (offset {o}): {}", self.structure, self.message),
            None => write!(f, "{}: {}", self.structure, self.message),
        }
    }
}

/// What a check found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// The file checked.
    pub file: String,
    /// Damage.
    pub errors: Vec<Finding>,
    /// Attention.
    pub warnings: Vec<Finding>,
    /// Payload blocks mapped in the file.
    pub allocated_blocks: u64,
    /// Payload blocks in total.
    pub total_blocks: u64,
    /// Bytes of the file that belong to no structure.
    pub leaked_bytes: u64,
    /// Log entries waiting for replay.
    pub log_entries_pending: usize,
    /// The file's size.
    pub file_size: u64,
}

impl CheckReport {
    /// No errors and no warnings.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.warnings.is_empty()
    }

    fn error(
        &mut self,
        structure: impl Into<String>,
        offset: Option<u64>,
        message: impl Into<String>,
    ) {
        self.errors.push(Finding {
            structure: structure.into(),
            offset,
            message: message.into(),
        });
    }

    fn warn(
        &mut self,
        structure: impl Into<String>,
        offset: Option<u64>,
        message: impl Into<String>,
    ) {
        self.warnings.push(Finding {
            structure: structure.into(),
            offset,
            message: message.into(),
        });
    }

    fn fatal(&mut self, e: vstor_core::Error) {
        match e {
            vstor_core::Error::Corrupt {
                offset,
                what,
                reason,
                ..
            } => self.error(what, Some(offset), reason),
            other => self.error("image", None, other.to_string()),
        }
    }
}

/// Checks the image at `path` (opened read-only; nothing is written).
pub fn check(path: impl AsRef<Path>) -> Result<CheckReport> {
    let path = path.as_ref();
    let file = FileDevice::open(
        path,
        &FileOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    let mut r = check_device(Arc::new(file), &path.display().to_string());
    // A differencing disk whose parent is in the middle of a merge of another disk does not
    // read as it did, though its own structures are sound: it cannot be opened until the merge
    // finishes.
    if r.errors.is_empty() {
        if let Err(e) = crate::Vhdx::open(path, &crate::OpenOptions::read_only()) {
            let pending = matches!(&e, vstor_core::Error::Layer(l)
                if matches!(l.downcast_ref::<crate::VhdxError>(), Some(crate::VhdxError::MergePending { .. })));
            if pending {
                r.warn("parent", None, e.to_string());
            }
        }
    }
    Ok(r)
}

/// Checks an image on any device.
pub fn check_device(file: Arc<dyn BlockDevice>, name: &str) -> CheckReport {
    let mut r = CheckReport {
        file: name.to_string(),
        file_size: file.capacity(),
        ..Default::default()
    };
    if let Err(e) = check_inner(file, name, &mut r) {
        r.fatal(e);
    }
    r
}

fn check_inner(file: Arc<dyn BlockDevice>, name: &str, r: &mut CheckReport) -> Result<()> {
    meta::read_identifier(&*file, name)?;
    let headers = meta::read_headers(&*file, name)?;
    for (i, s) in headers.slots.iter().enumerate() {
        if let Err(why) = s {
            r.warn(
                format!("header {}", i + 1),
                Some(HEADER_OFFSETS[i]),
                format!("damaged ({why}); the other header is in use"),
            );
        }
    }
    let h = headers.current.header.clone();
    let (lo, ll) = (h.log_offset.get(), h.log_length.get() as u64);
    let mut file = file;
    if !h.log_guid.is_nil() {
        match log::find_active(&*file, name, lo, ll, h.log_guid)? {
            Some(active) => {
                log::validate_targets(&active, name, lo, ll)?;
                r.log_entries_pending = active.entries.len();
                r.warn("log", Some(lo), format!("{} entries wait for replay (the image was not closed; a writable open replays them)", active.entries.len()));
                file = Arc::new(Overlay::new(file, name, &active)?);
            }
            None => r.warn(
                "header",
                Some(HEADER_OFFSETS[headers.current.slot]),
                "LogGuid is set but the log holds no valid entry",
            ),
        }
    }
    let regions = meta::read_regions(&*file, name)?;
    for p in &regions.problems {
        r.warn("region table", Some(REGION_TABLE_OFFSETS[0]), p.clone());
    }
    let md = meta::read_metadata(&*file, name, &regions.metadata)?;
    let g = md.geometry.clone();
    if g.bat_entries * 8 > regions.bat.length {
        r.error(
            "BAT region",
            Some(regions.bat.offset),
            format!(
                "{} bytes cannot hold {} entries",
                regions.bat.length, g.bat_entries
            ),
        );
        return Ok(());
    }
    if let Some(loc) = &md.parent {
        if loc.get("parent_linkage").is_none() {
            r.error("parent locator", None, "has no parent_linkage");
        }
        if loc.get("relative_path").is_none()
            && loc.get("absolute_win32_path").is_none()
            && loc.get("volume_path").is_none()
        {
            r.error("parent locator", None, "names no path to the parent");
        }
    }
    let size = file.capacity();
    r.file_size = size;
    let mut raw = vec![0u8; (g.bat_entries * 8).next_multiple_of(4096) as usize];
    file.read_at(regions.bat.offset, &mut raw)?;
    let bat: Vec<u64> = raw
        .chunks_exact(8)
        .take(g.bat_entries as usize)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
        .collect();
    r.total_blocks = g.data_blocks;
    // (start, end, what) of everything that owns space.
    let mut slack: Option<(u64, u64)> = None;
    let mut owned: Vec<(u64, u64, String)> = vec![
        (0, HEADER_SECTION_END, "header section".into()),
        (lo, lo + ll, "log".into()),
    ];
    for reg in &regions.all {
        owned.push((
            reg.offset,
            reg.offset + reg.length,
            format!("region {}", reg.guid),
        ));
    }
    let fixed_structures = owned.len();
    let mut partial_chunks = std::collections::BTreeSet::new();
    for (i, &e) in bat.iter().enumerate() {
        let i = i as u64;
        let at = Some(regions.bat.offset + i * 8);
        let is_bitmap = (i + 1) % (g.chunk_ratio + 1) == 0;
        let st = bat_state(e);
        let off = bat_offset(e);
        if e & 0xF_FFF8 != 0 {
            r.error(format!("BAT entry {i}"), at, "reserved bits are set");
        }
        let (mapped, len, what) = if is_bitmap {
            let chunk = i / (g.chunk_ratio + 1);
            match st {
                bitmap::NOT_PRESENT => (false, MIB, format!("sector bitmap {chunk}")),
                bitmap::PRESENT => {
                    if !g.has_parent {
                        r.error(
                            format!("BAT entry {i}"),
                            at,
                            "a sector bitmap block in a disk without a parent",
                        );
                    }
                    (true, MIB, format!("sector bitmap {chunk}"))
                }
                _ => {
                    r.error(
                        format!("BAT entry {i}"),
                        at,
                        format!("sector bitmap state {st} is not defined"),
                    );
                    continue;
                }
            }
        } else {
            let block = i - i / (g.chunk_ratio + 1);
            match st {
                payload::FULLY_PRESENT => (true, g.block_size as u64, format!("block {block}")),
                payload::PARTIALLY_PRESENT => {
                    if !g.has_parent {
                        r.error(
                            format!("BAT entry {i}"),
                            at,
                            "PARTIALLY_PRESENT in a disk without a parent",
                        );
                    }
                    if g.has_parent {
                        partial_chunks.insert(block / g.chunk_ratio);
                    }
                    (true, g.block_size as u64, format!("block {block}"))
                }
                payload::NOT_PRESENT
                | payload::UNDEFINED
                | payload::ZERO
                | payload::UNMAPPED
                | payload::UNMAPPED_LEGACY => {
                    (false, g.block_size as u64, format!("block {block}"))
                }
                _ => {
                    r.error(
                        format!("BAT entry {i}"),
                        at,
                        format!("payload state {st} is not defined"),
                    );
                    continue;
                }
            }
        };
        let len = len.min(g.mapped_len(i));
        if mapped && !is_bitmap {
            r.allocated_blocks += 1;
        }
        if off == 0 {
            if mapped {
                r.error(
                    format!("BAT entry {i}"),
                    at,
                    format!("{what} is mapped at file offset 0"),
                );
            }
            continue;
        }
        if off.saturating_add(len) > size {
            if mapped {
                r.error(
                    format!("BAT entry {i}"),
                    at,
                    format!("{what} at {off} reaches past the end of the file ({size} bytes)"),
                );
            }
            continue;
        }
        if !is_bitmap && len < g.block_size as u64 {
            // A short last block may have its whole block (vstor and Hyper-V allocate it so;
            // QEMU insists on it): the rest, up to the end of the file, is its slack.
            slack = Some((off + len, (off + g.block_size as u64).min(size)));
        }
        owned.push((off, off + len, what));
    }
    for chunk in partial_chunks {
        let e = bat[g.bitmap_index(chunk) as usize];
        if bat_state(e) != bitmap::PRESENT {
            r.error(
                format!("sector bitmap {chunk}"),
                Some(regions.bat.offset + g.bitmap_index(chunk) * 8),
                "partially present blocks use it, but it is not present",
            );
        }
    }
    // Overlaps between anything that owns space.
    let mut sorted: Vec<(u64, u64, String, bool)> = owned
        .iter()
        .enumerate()
        .map(|(i, (s, e, w))| (*s, *e, w.clone(), i < fixed_structures))
        .collect();
    sorted.sort_by_key(|x| (x.0, x.1));
    let mut reach: Option<(u64, String)> = None;
    let mut covered = 0u64;
    let mut last_end = 0u64;
    for (s, e, w, _) in &sorted {
        if let Some((end, ow)) = &reach {
            if *s < *end {
                r.error(w.clone(), Some(*s), format!("overlaps {ow}"));
            }
        }
        if reach.as_ref().is_none_or(|(end, _)| *e > *end) {
            reach = Some((*e, w.clone()));
        }
        let s2 = (*s).max(last_end);
        if *e > s2 {
            covered += e - s2;
            last_end = *e;
        }
    }
    if let Some((s0, e0)) = slack.filter(|(s0, e0)| e0 > s0) {
        let mut extra = e0 - s0;
        for (s, e, _) in &owned {
            let ov = (*e).min(e0).saturating_sub((*s).max(s0));
            extra -= ov.min(extra);
        }
        covered += extra;
    }
    let leaked = size.saturating_sub(covered.min(size));
    // Only whole unowned mebibytes count: sizes are multiples of 1 MiB in every writer known.
    let leaked = leaked - leaked % MIB;
    r.leaked_bytes = leaked;
    if leaked > 0 {
        r.warn(
            "file",
            None,
            format!(
                "{leaked} bytes belong to no structure (leaked space; compacting gives it back)"
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, Vhdx};
    use vstor_core::MemoryDevice;

    #[test]
    fn a_new_image_is_clean_and_damage_is_found() {
        let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(64 * MIB).unwrap());
        let v = Vhdx::create_on(
            mem.clone(),
            &CreateOptions::dynamic(256 * MIB).block_size(MIB as u32),
            None,
        )
        .unwrap();
        v.write_at(0, &[1u8; 4096]).unwrap();
        v.write_at(5 * MIB, &[2u8; 4096]).unwrap();
        drop(v);
        let r = check_device(mem.clone(), "t");
        assert!(r.is_clean(), "{r:?}");
        assert_eq!(r.allocated_blocks, 2);
        // Point block 5 at block 0's space: an overlap.
        let mut bat = vec![0u8; 4096];
        mem.read_at(3 * MIB, &mut bat).unwrap();
        let b0 = u64::from_le_bytes(bat[..8].try_into().unwrap());
        bat[40..48].copy_from_slice(&b0.to_le_bytes());
        mem.write_at(3 * MIB, &bat).unwrap();
        let r = check_device(mem.clone(), "t");
        assert!(
            r.errors.iter().any(|f| f.message.contains("overlaps")),
            "{r:?}"
        );
        // And the space block 5 had is now leaked.
        assert_eq!(r.leaked_bytes, MIB);
    }
}
