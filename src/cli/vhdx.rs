//! The VHDX side of `vstor disk create`, `info` and `check` (the New-VHD, Get-VHD and Test-VHD
//! of vstor).

use serde::Serialize;
use std::path::{Path, PathBuf};
use vstor::core::BlockDevice;
use vstor::format_size;
use vstor::vhdx::check::{self, CheckReport};
use vstor::vhdx::format::{bat_offset, bat_state, payload, MIB};
use vstor::vhdx::{CreateOptions, DiskKind, OpenOptions, Vhdx};
use vstor::Error;

/// What `disk create` asked for, for a VHDX.
pub struct CreateRequest<'a> {
    pub path: &'a Path,
    pub size: Option<u64>,
    pub fixed: bool,
    pub block_size: Option<u64>,
    pub logical: Option<u32>,
    pub physical: Option<u32>,
    pub parent: Option<&'a Path>,
    pub preallocate: bool,
}

pub fn create(r: CreateRequest<'_>) -> Result<(), Error> {
    let kind = match (r.parent, r.fixed) {
        (Some(p), _) => DiskKind::Differencing {
            parent: p.to_path_buf(),
        },
        (None, true) => DiskKind::Fixed,
        (None, false) => DiskKind::Dynamic,
    };
    if r.parent.is_some() && r.size.is_some() {
        return Err(Error::InvalidArgument(
            "--size does not apply with --parent: a differencing disk has its parent's size".into(),
        ));
    }
    if r.preallocate && kind != DiskKind::Fixed {
        return Err(Error::InvalidArgument(
            "--preallocate applies to fixed VHDX disks (add --fixed)".into(),
        ));
    }
    let block_size = match r.block_size {
        Some(b) if b > u32::MAX as u64 => {
            return Err(Error::InvalidArgument(format!(
                "block size {b} is larger than 256M"
            )))
        }
        b => b.map(|b| b as u32),
    };
    let opts = CreateOptions {
        size: r.size.unwrap_or(0),
        kind,
        block_size,
        logical_sector_size: r.logical,
        physical_sector_size: r.physical,
        log_size: None,
    };
    // The parent's chain is read to make the child: held shared meanwhile, so a writer of the
    // parent keeps the create out.
    let _locks = match r.parent {
        Some(p) => super::lifecycle::lock_as_parent(p)?,
        None => Vec::new(),
    };
    let disk = Vhdx::create(r.path, &opts)?;
    if r.preallocate {
        preallocate(&disk)?;
    }
    let g = disk.geometry();
    let mut line = format!(
        "Created {} (VHDX {}, {}, {} blocks, {}/{} sectors",
        r.path.display(),
        disk.kind(),
        format_size(g.virtual_size),
        format_size(g.block_size as u64),
        g.logical_sector,
        g.physical_sector
    );
    if let Some(p) = r.parent {
        line.push_str(&format!(", parent {}", p.display()));
    }
    println!("{line})");
    disk.close()?;
    Ok(())
}

/// Writes zeros over the data of a fixed disk so that the file system allocates it.
fn preallocate(disk: &Vhdx) -> Result<(), Error> {
    let g = disk.geometry().clone();
    let bat = disk.bat_snapshot();
    let pb = super::progress_bar(g.data_blocks, "allocating blocks");
    let zeros = vec![0u8; MIB as usize];
    for b in 0..g.data_blocks {
        let off = bat_offset(bat[g.payload_index(b) as usize]);
        for m in 0..(g.block_size as u64 / MIB) {
            disk.file().write_at(off + m * MIB, &zeros)?;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    disk.file().flush()?;
    Ok(())
}

#[derive(Serialize)]
struct ChainLink {
    path: String,
    kind: String,
    data_write_guid: String,
}

#[derive(Serialize)]
pub struct VhdxInfo {
    target: String,
    format: &'static str,
    /// How the format was decided (prefix, extension checked against content, or content).
    format_decided: &'static str,
    #[serde(rename = "type")]
    kind: String,
    virtual_size: u64,
    file_size: u64,
    allocated_bytes: Option<u64>,
    block_size: u32,
    logical_sector_size: u32,
    physical_sector_size: u32,
    creator: String,
    file_write_guid: String,
    data_write_guid: String,
    log_guid: Option<String>,
    page83_id: String,
    parent: Option<String>,
    parent_locator: Vec<(String, String)>,
    chain: Vec<ChainLink>,
    blocks: u64,
    allocated_blocks: u64,
    zero_blocks: u64,
    unmapped_blocks: u64,
    fragmentation_percent: f64,
    notes: Vec<String>,
}

pub fn info(
    path: &Path,
    target: &str,
    decided: &'static str,
    locking: bool,
    json: bool,
) -> Result<(), Error> {
    // Shared image locks on the chain (unless the target says locking=off): a writer of the
    // image or of any parent elsewhere changes what this would report.
    let _locks = locking
        .then(|| super::lifecycle::lock_chain(path, 0))
        .transpose()?;
    let disk = Vhdx::open(path, &OpenOptions::read_only())?;
    let g = disk.geometry().clone();
    let h = disk.header();
    let bat = disk.bat_snapshot();
    let (mut allocated, mut zero, mut unmapped, mut breaks) = (0u64, 0u64, 0u64, 0u64);
    let mut prev_end: Option<u64> = None;
    for b in 0..g.data_blocks {
        let e = bat[g.payload_index(b) as usize];
        match bat_state(e) {
            payload::FULLY_PRESENT | payload::PARTIALLY_PRESENT => {
                allocated += 1;
                if prev_end.is_some_and(|p| p != bat_offset(e)) {
                    breaks += 1;
                }
                prev_end = Some(bat_offset(e) + g.block_size as u64);
            }
            payload::ZERO => zero += 1,
            payload::UNMAPPED | payload::UNMAPPED_LEGACY => unmapped += 1,
            _ => {}
        }
    }
    let link = |d: &Vhdx| ChainLink {
        path: d
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| d.name().to_string()),
        kind: d.kind().to_string(),
        data_write_guid: d.data_write_guid().to_string(),
    };
    let mut chain = vec![link(&disk)];
    let mut up = disk.parent().cloned();
    while let Some(d) = up {
        chain.push(link(&d));
        up = d.parent().cloned();
    }
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok();
    let r = VhdxInfo {
        target: target.to_string(),
        format: "vhdx",
        format_decided: decided,
        kind: disk.kind().to_string(),
        virtual_size: g.virtual_size,
        file_size: disk.file_size(),
        allocated_bytes: meta.map(|m| m.blocks() * 512),
        block_size: g.block_size,
        logical_sector_size: g.logical_sector,
        physical_sector_size: g.physical_sector,
        creator: disk.creator().to_string(),
        file_write_guid: h.file_write_guid.to_string(),
        data_write_guid: h.data_write_guid.to_string(),
        log_guid: (!h.log_guid.is_nil()).then(|| h.log_guid.to_string()),
        page83_id: disk.metadata().page83.to_string(),
        parent: chain.get(1).map(|c| c.path.clone()),
        parent_locator: disk
            .metadata()
            .parent
            .as_ref()
            .map(|l| l.entries.clone())
            .unwrap_or_default(),
        chain,
        blocks: g.data_blocks,
        allocated_blocks: allocated,
        zero_blocks: zero,
        unmapped_blocks: unmapped,
        fragmentation_percent: if allocated > 1 {
            breaks as f64 * 100.0 / (allocated - 1) as f64
        } else {
            0.0
        },
        notes: disk.notes(),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("serializable")
        );
        return Ok(());
    }
    println!("target:               {}", r.target);
    println!(
        "format:               vhdx ({}), {}",
        r.kind, r.format_decided
    );
    println!(
        "virtual size:         {} ({} bytes)",
        format_size(r.virtual_size),
        r.virtual_size
    );
    println!(
        "file size:            {} ({} bytes)",
        format_size(r.file_size),
        r.file_size
    );
    if let Some(a) = r.allocated_bytes {
        println!("allocated on disk:    {} ({} bytes)", format_size(a), a);
    }
    println!("block size:           {}", format_size(r.block_size as u64));
    println!("logical sector size:  {}", r.logical_sector_size);
    println!("physical sector size: {}", r.physical_sector_size);
    println!(
        "blocks:               {} allocated of {} ({} zero, {} unmapped), fragmentation {:.1}%",
        r.allocated_blocks, r.blocks, r.zero_blocks, r.unmapped_blocks, r.fragmentation_percent
    );
    println!("creator:              {}", r.creator);
    println!("file write guid:      {}", r.file_write_guid);
    println!("data write guid:      {}", r.data_write_guid);
    println!("page 83 id:           {}", r.page83_id);
    if let Some(l) = &r.log_guid {
        println!("log guid:             {l} (the log needs replay)");
    }
    if r.chain.len() > 1 {
        println!("parent:               {}", r.chain[1].path);
        for (k, v) in &r.parent_locator {
            println!("  {k:<20} {v}");
        }
        println!("chain:");
        for (i, c) in r.chain.iter().enumerate() {
            println!(
                "  {i}: {} ({}, data write guid {})",
                c.path, c.kind, c.data_write_guid
            );
        }
    }
    for n in &r.notes {
        println!("note:                 {n}");
    }
    Ok(())
}

#[derive(Serialize)]
struct CheckJson<'a> {
    file: &'a str,
    clean: bool,
    errors: Vec<String>,
    warnings: Vec<String>,
    allocated_blocks: u64,
    total_blocks: u64,
    leaked_bytes: u64,
    log_entries_pending: usize,
    file_size: u64,
}

pub fn check_cmd(path: &PathBuf, json: bool) -> Result<(), Error> {
    // The chain is read too (a parent in the middle of a merge is reported): held shared.
    // A check must see the image as it is, unchanged: no writer, even one that shares.
    let _locks = super::lifecycle::lock_as_parent(path)?;
    let r: CheckReport = match super::lifecycle::optimized_source(path)? {
        // An optimized (dedup) file: the VHDX its stub stands for, read through the stub.
        Some((dev, _)) => check::check_device(dev, &path.display().to_string()),
        None => check::check(path)?,
    };
    if json {
        let j = CheckJson {
            file: &r.file,
            clean: r.is_clean(),
            errors: r.errors.iter().map(|f| f.to_string()).collect(),
            warnings: r.warnings.iter().map(|f| f.to_string()).collect(),
            allocated_blocks: r.allocated_blocks,
            total_blocks: r.total_blocks,
            leaked_bytes: r.leaked_bytes,
            log_entries_pending: r.log_entries_pending,
            file_size: r.file_size,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&j).expect("serializable")
        );
    } else {
        for f in &r.errors {
            println!("ERROR   {f}");
        }
        for f in &r.warnings {
            println!("WARNING {f}");
        }
        println!(
            "{}: {} errors, {} warnings; {}/{} blocks allocated, {} leaked, {} log entries pending",
            r.file,
            r.errors.len(),
            r.warnings.len(),
            r.allocated_blocks,
            r.total_blocks,
            format_size(r.leaked_bytes),
            r.log_entries_pending
        );
    }
    if r.is_clean() {
        if !json {
            println!("No errors were found on the image.");
        }
        Ok(())
    } else {
        Err(Error::NotClean(format!(
            "{} is not clean: {} errors, {} warnings",
            r.file,
            r.errors.len(),
            r.warnings.len()
        )))
    }
}
