//! `vstor pool ...` and `vstor space ...`: storage pools and the spaces in them.

use super::{progress_bar, size_arg};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use std::path::{Path, PathBuf};
use vstor::core::FileOptions;
use vstor::spaces::{
    CreateOptions, MemberInfo, MemberState, OpenOptions, Pool, PoolInfo, Provisioning, Resiliency,
    SpaceHealth, SpaceInfo, SpaceSpec,
};
use vstor::{format_size, Error};

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a pool of new file-backed disks in DIR, or of existing devices (New-StoragePool).
    #[command(
        after_help = "Examples:\n  vstor pool create /srv/pool --disks 4 --disk-size 10G\n  \
        vstor pool create /tmp/p --disks 6 --disk-size 256M --slab-size 16M\n  \
        vstor pool create /srv/pool --device /dev/sdb --device /dev/sdc --device /dev/sdd"
    )]
    Create(PoolCreateArgs),
    /// Show a pool: members and their state, spaces and their health (Get-StoragePool).
    #[command(
        after_help = "Examples:\n  vstor pool info /srv/pool\n  vstor pool info /srv/pool --json"
    )]
    Info(PoolInfoArgs),
    /// Add a new file-backed disk to a pool (Add-PhysicalDisk).
    #[command(
        after_help = "Example:\n  vstor pool add-disk /srv/pool --disk-size 10G\n\
        Then `vstor space repair /srv/pool` rebuilds onto it what lost disks held."
    )]
    AddDisk(AddDiskArgs),
    /// Retire a disk: no new slabs go to it; `space repair` moves its slabs off.
    #[command(
        after_help = "Example:\n  vstor pool retire-disk /srv/pool disk2.raw\n  \
        vstor space repair /srv/pool\n  vstor pool remove-disk /srv/pool disk2.raw"
    )]
    RetireDisk(DiskRefArgs),
    /// Take back a failed disk that is present again as a fresh member (Reset-PhysicalDisk):
    /// its stale data is never read; `space repair` rebuilds onto it.
    #[command(
        after_help = "Example:\n  vstor pool reset-disk /srv/pool disk1.raw\n  \
        vstor space repair /srv/pool\n  vstor pool remove-disk /srv/pool 1    # the old record"
    )]
    ResetDisk(DiskRefArgs),
    /// Remove a disk that holds no slabs (retired and repaired, or failed and repaired).
    /// Its file in DIR is deleted (it holds nothing of the pool any more); a device listed in
    /// DIR/pool.devices is taken off that list and left as it is.
    #[command(
        after_help = "Example:\n  vstor pool retire-disk /srv/pool disk2.raw\n  \
        vstor space repair /srv/pool\n  \
        vstor pool remove-disk /srv/pool disk2.raw    # deletes /srv/pool/disk2.raw\n\
        A disk that still holds slabs is refused (retire it and repair first). A file of a\n\
        removed member that is still in DIR is skipped by every open with a note."
    )]
    RemoveDisk(DiskRefArgs),
}

#[derive(Debug, Subcommand)]
pub enum SpaceCommand {
    /// Create a space in a pool (New-VirtualDisk).
    #[command(
        after_help = "Examples:\n  vstor space create /srv/pool data --size 10G --resiliency mirror\n  \
        vstor space create /srv/pool logs --size 1G --resiliency mirror --copies 3\n  \
        vstor space create /srv/pool bulk --size 20G --resiliency parity --redundancy 2 --columns 6\n  \
        vstor space create /srv/pool fast --size 4G --resiliency simple --interleave 64k --provisioning fixed\n\
        The space is then the target pool:/srv/pool/data for disk read, write and bench."
    )]
    Create(SpaceCreateArgs),
    /// List the spaces of a pool (Get-VirtualDisk).
    #[command(after_help = "Example:\n  vstor space list /srv/pool --json")]
    List(SpaceListArgs),
    /// Show one space: layout, allocation, health.
    #[command(after_help = "Example:\n  vstor space info /srv/pool data --json")]
    Info(SpaceNameArgs),
    /// Delete a space; its slabs become free (Remove-VirtualDisk).
    #[command(after_help = "Example:\n  vstor space delete /srv/pool data")]
    Delete(SpaceDeleteArgs),
    /// Grow a space (Resize-VirtualDisk); a space never shrinks. A thin space takes slabs for
    /// the new bytes as they are written, a fixed one takes them now. The new bytes read as
    /// zeroes.
    #[command(
        after_help = "Example:\n  vstor space resize /srv/pool data --size 20G\n\
        A VM using the space sees the new size through the reference VMM's API\n\
        ({\"op\":\"resize\",\"disk\":N,\"size\":BYTES} on its control socket)."
    )]
    Resize(SpaceResizeArgs),
    /// Rebuild the copies and parity that lost or retired disks held onto healthy disks
    /// (Repair-VirtualDisk); all spaces unless NAME is given.
    #[command(
        after_help = "Examples:\n  vstor space repair /srv/pool\n  vstor space repair /srv/pool data --json\n\n\
        A failed disk that is present again (pulled and put back, an old copy restored, or one\n\
        the open could not catch up) is taken back as a fresh member first, so the rebuild goes\n\
        onto it (its old contents are never read), and its old record is dropped afterwards\n\
        (--keep-failed leaves it failed). A disk that was missing or failed while the pool was\n\
        written and comes back holding the metadata it last got needs no repair: the next\n\
        writable open catches it up from the write-intent bitmaps (only the chunks written\n\
        since)."
    )]
    Repair(RepairArgs),
    /// Check every allocated slab and make copies and parity agree with the data; reports
    /// what it found and rewrote.
    #[command(
        after_help = "Examples:\n  vstor space scrub /srv/pool\n  vstor space scrub /srv/pool data --json\n\
        Every 512-byte block has a CRC-32C, so a scrub knows which copy is right: a bad block\n\
        is rewritten from a copy or rebuilt from parity whose checksum matches; a block with\n\
        no good source is counted as lost. Copies that pass their checksums but differ are\n\
        made equal only where most copies agree (3-way mirror), and a parity row that passes\n\
        its checksums but does not add up only where dual parity names the one odd shard out;\n\
        the rest is reported as undecided and left as it is (never settled by slot order).\n\
        A parity whose checksum failed is recomputed from the data. Chunks that could not be\n\
        checked are those of a column whose every copy is on a lost disk, or of a parity\n\
        extent that lost a data column (its parity cannot be checked).\n\n\
        Exit status: 0 when every allocated chunk was checked and no block is lost (what was\n\
        repaired or healed is good now); 1 when blocks are lost or undecided or chunks could\n\
        not be checked (the report is printed first, the cause on stderr), or when the scrub failed;\n\
        2 for bad arguments or a pool that cannot be opened as given; 75 when the pool is in\n\
        use by another process."
    )]
    Scrub(SpaceRepairArgs),
}

#[derive(Debug, Args)]
pub struct AddDiskArgs {
    /// Directory of the member disks.
    dir: PathBuf,
    /// Size of the new disk.
    #[arg(long, value_parser = size_arg)]
    disk_size: u64,
    /// Report the pool as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct DiskRefArgs {
    /// Directory of the member disks.
    dir: PathBuf,
    /// The disk: its member index or its file name.
    disk: String,
}

#[derive(Debug, Args)]
pub struct SpaceRepairArgs {
    /// Directory of the member disks.
    dir: PathBuf,
    /// Only this space.
    name: Option<String>,
    /// Report as JSON.
    #[arg(long)]
    json: bool,
    /// After a split brain (members written apart, which opening refuses): keep the side of
    /// this disk (its file name in DIR, or a listed device's path); the members that diverged
    /// from it are taken as failed (`pool reset-disk` and `space repair` bring them back).
    #[arg(long, value_name = "DISK")]
    force_member: Option<String>,
}

#[derive(Debug, Args)]
pub struct RepairArgs {
    #[command(flatten)]
    common: SpaceRepairArgs,
    /// Do not take back failed disks that are present (by default a disk that missed writes
    /// and came back, or that failed and still answers, is taken back as a fresh member and
    /// rebuilt onto; its old contents are never read); rebuild onto the other disks only. Use
    /// it for a disk that failed with I/O errors.
    #[arg(long)]
    keep_failed: bool,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("members").required(true).args(["disks", "device"]))]
pub struct PoolCreateArgs {
    /// Directory for the member disks (created if needed; disk0.raw, disk1.raw, ...). With
    /// --device it only names the pool: it gets a pool.devices file listing the devices.
    dir: PathBuf,
    /// Number of new file-backed disks.
    #[arg(long, requires = "disk_size")]
    disks: Option<usize>,
    /// Size of each new disk (`10G`).
    #[arg(long, value_parser = size_arg)]
    disk_size: Option<u64>,
    /// An existing block device or file to use as a member (repeat for each).
    #[arg(long, conflicts_with_all = ["disks", "disk_size"])]
    device: Vec<PathBuf>,
    /// Slab size: the unit of allocation on each disk (a power of two, 64K to 64G).
    #[arg(long, value_parser = size_arg, default_value = "256M")]
    slab_size: u64,
    /// Report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct PoolInfoArgs {
    /// Directory of the member disks.
    dir: PathBuf,
    /// Report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ResiliencyArg {
    Simple,
    Mirror,
    Parity,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProvisioningArg {
    Thin,
    Fixed,
}

#[derive(Debug, Args)]
pub struct SpaceCreateArgs {
    /// Directory of the member disks.
    dir: PathBuf,
    /// Name of the space (letters, digits, '-', '_', '.').
    name: String,
    /// Size of the space (`10G`).
    #[arg(long, value_parser = size_arg)]
    size: u64,
    /// Resiliency.
    #[arg(long, value_enum)]
    resiliency: ResiliencyArg,
    /// Copies of a mirror.
    #[arg(long, value_parser = clap::value_parser!(u8).range(2..=3))]
    copies: Option<u8>,
    /// Parity columns of a parity space.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    redundancy: Option<u8>,
    /// Columns (simple, parity: disks per stripe; mirror: data columns). Default: as many as
    /// the healthy disks allow, up to 8 (mirror 4).
    #[arg(long)]
    columns: Option<usize>,
    /// Interleave (stripe unit), a power of two from 4K (default 256K).
    #[arg(long, value_parser = size_arg)]
    interleave: Option<u64>,
    /// Thin (slabs on first write) or fixed (all slabs now).
    #[arg(long, value_enum, default_value = "thin")]
    provisioning: ProvisioningArg,
    /// Report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct SpaceListArgs {
    /// Directory of the member disks.
    dir: PathBuf,
    /// Report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct SpaceNameArgs {
    /// Directory of the member disks.
    dir: PathBuf,
    /// Name of the space.
    name: String,
    /// Report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct SpaceResizeArgs {
    /// Directory of the member disks.
    dir: PathBuf,
    /// Name of the space.
    name: String,
    /// The new size (`20G`), at least the current one, a multiple of 4K.
    #[arg(long, value_parser = size_arg)]
    size: u64,
    /// Report the space as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct SpaceDeleteArgs {
    /// Directory of the member disks.
    dir: PathBuf,
    /// Name of the space.
    name: String,
}

pub fn run_pool(cmd: PoolCommand) -> Result<(), Error> {
    match cmd {
        PoolCommand::Create(a) => {
            let opts = CreateOptions {
                slab_size: a.slab_size,
            };
            let pool = match (a.disks, a.disk_size) {
                (Some(n), Some(size)) => {
                    Pool::create_in_dir(&a.dir, n, size, &opts, &FileOptions::default())?
                }
                _ => {
                    // A device that holds a disk image (told by its content, as every target
                    // is) is somebody's disk: never formatted without a word.
                    for d in &a.device {
                        match vstor::probe::probe(d) {
                            Ok(vstor::probe::Detected::Raw) | Err(_) => {}
                            Ok(found) => {
                                return Err(Error::InvalidArgument(format!(
                                    "{} holds a {} image; a pool member is formatted, which \
                                     would destroy it (wipe its first and last MiB first if \
                                     that is what you want)",
                                    d.display(),
                                    found.name()
                                )))
                            }
                        }
                    }
                    Pool::create_with_devices(&a.dir, &a.device, &opts, &FileOptions::default())?
                }
            };
            print_pool(&pool.info(), a.json);
            Ok(())
        }
        PoolCommand::Info(a) => {
            let pool = open(&a.dir, true)?;
            print_pool(&pool.info(), a.json);
            Ok(())
        }
        PoolCommand::AddDisk(a) => {
            let pool = open(&a.dir, false)?;
            pool.add_disk_in_dir(&a.dir, a.disk_size, &FileOptions::default())?;
            print_pool(&pool.info(), a.json);
            Ok(())
        }
        PoolCommand::RetireDisk(a) => {
            let pool = open(&a.dir, false)?;
            let i = member(&pool, &a.disk)?;
            pool.retire_member(i)?;
            println!("member {i} retired; `vstor space repair` moves its slabs off");
            Ok(())
        }
        PoolCommand::ResetDisk(a) => {
            let pool = open(&a.dir, false)?;
            let i = member(&pool, &a.disk)?;
            let new = pool.reuse_member(i)?;
            println!(
                "member {i} is back as member {new}; `vstor space repair` rebuilds onto it, then `vstor pool remove-disk {} {i}` drops the old record",
                a.dir.display()
            );
            Ok(())
        }
        PoolCommand::RemoveDisk(a) => {
            let pool = open(&a.dir, false)?;
            let i = member(&pool, &a.disk)?;
            match pool.remove_member_in_dir(&a.dir, i)? {
                Some(p) if p.parent() == Some(a.dir.as_path()) => {
                    println!("member {i} removed from the pool; deleted {}", p.display())
                }
                Some(p) => println!(
                    "member {i} removed from the pool; {} taken off {}",
                    p.display(),
                    a.dir.join(vstor::spaces::DEVICES_FILE).display()
                ),
                None => println!("member {i} removed from the pool"),
            }
            Ok(())
        }
    }
}

/// A member by index or file name.
fn member(pool: &Pool, disk: &str) -> Result<usize, Error> {
    let info = pool.info();
    if let Ok(i) = disk.parse::<usize>() {
        if i < info.members.len() {
            return Ok(i);
        }
    }
    info.members
        .iter()
        .find(|m| {
            m.disk
                .as_deref()
                .is_some_and(|d| d == disk || Path::new(d).file_name().is_some_and(|f| f == disk))
        })
        .map(|m| m.index)
        .ok_or_else(|| Error::InvalidArgument(format!("no member '{disk}' in the pool")))
}

pub fn run_space(cmd: SpaceCommand) -> Result<(), Error> {
    match cmd {
        SpaceCommand::Create(a) => {
            let resiliency = match a.resiliency {
                ResiliencyArg::Simple => {
                    if a.copies.is_some() || a.redundancy.is_some() {
                        return Err(Error::InvalidArgument(
                            "--copies and --redundancy do not apply to a simple space".into(),
                        ));
                    }
                    Resiliency::Simple
                }
                ResiliencyArg::Mirror => {
                    if a.redundancy.is_some() {
                        return Err(Error::InvalidArgument(
                            "--redundancy applies to parity; a mirror takes --copies".into(),
                        ));
                    }
                    Resiliency::Mirror {
                        copies: a.copies.unwrap_or(2),
                    }
                }
                ResiliencyArg::Parity => {
                    if a.copies.is_some() {
                        return Err(Error::InvalidArgument(
                            "--copies applies to a mirror; parity takes --redundancy".into(),
                        ));
                    }
                    Resiliency::Parity {
                        redundancy: a.redundancy.unwrap_or(1),
                    }
                }
            };
            let pool = open(&a.dir, false)?;
            let info = pool.create_space(&SpaceSpec {
                name: a.name,
                size: a.size,
                resiliency,
                columns: a.columns,
                interleave: a.interleave,
                provisioning: match a.provisioning {
                    ProvisioningArg::Thin => Provisioning::Thin,
                    ProvisioningArg::Fixed => Provisioning::Fixed,
                },
            })?;
            print_space(&info, a.json);
            Ok(())
        }
        SpaceCommand::List(a) => {
            let pool = open(&a.dir, true)?;
            let spaces = pool.spaces();
            if a.json {
                let v: Vec<SpaceJson> = spaces.iter().map(space_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serializable")
                );
            } else if spaces.is_empty() {
                println!("no spaces");
            } else {
                println!(
                    "{:<20} {:>10} {:<16} {:>7} {:<6} {:<9}",
                    "NAME", "SIZE", "RESILIENCY", "COLUMNS", "PROV", "HEALTH"
                );
                for s in &spaces {
                    println!(
                        "{:<20} {:>10} {:<16} {:>7} {:<6} {:<9}",
                        s.name,
                        format_size(s.size),
                        s.resiliency.to_string(),
                        s.columns,
                        prov_name(s.provisioning),
                        s.health.name()
                    );
                }
            }
            Ok(())
        }
        SpaceCommand::Info(a) => {
            let pool = open(&a.dir, true)?;
            print_space(&pool.space_info(&a.name)?, a.json);
            Ok(())
        }
        SpaceCommand::Repair(r) => {
            let a = &r.common;
            let pool = open_direct(&a.dir, a.force_member.clone())?;
            let taken = if r.keep_failed {
                Vec::new()
            } else {
                pool.take_back_present()?
            };
            let names: Vec<String> = pool
                .info()
                .members
                .iter()
                .map(|m| m.disk.clone().unwrap_or_default())
                .collect();
            let mut back = Vec::new();
            for (old, r) in &taken {
                match r {
                    Ok(new) => {
                        back.push(*old);
                        eprintln!(
                            "member {old} ({}) failed or missed writes and is present: taken back as member {new}, rebuilt below",
                            names.get(*new).map_or("", String::as_str)
                        );
                    }
                    Err(e) => {
                        eprintln!("member {old} stays failed: it could not be taken back: {e}")
                    }
                }
            }
            let pb = progress_bar(0, "repair");
            let report = pool.repair(a.name.as_deref(), &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            let forgotten = pool.forget_taken_back(&back)?;
            for i in forgotten.iter().filter(|i| !back.contains(i)) {
                eprintln!(
                    "member {i} was taken back by a repair that did not finish: its record is removed now"
                );
            }
            let health: Vec<(String, &'static str)> = pool
                .spaces()
                .iter()
                .map(|s| (s.name.clone(), s.health.name()))
                .collect();
            if a.json {
                #[derive(Serialize)]
                struct R<'a> {
                    extents: u64,
                    slabs: u64,
                    bytes: u64,
                    unrecoverable: &'a [String],
                    health: Vec<serde_json::Value>,
                    taken_back: Vec<serde_json::Value>,
                }
                let r = R {
                    taken_back: taken
                        .iter()
                        .map(|(old, r)| match r {
                            Ok(new) => serde_json::json!({"member": old, "new_member": new, "record_removed": forgotten.contains(old)}),
                            Err(e) => serde_json::json!({"member": old, "error": e}),
                        })
                        .collect(),
                    extents: report.extents,
                    slabs: report.slabs,
                    bytes: report.bytes,
                    unrecoverable: &report.unrecoverable,
                    health: health
                        .iter()
                        .map(|(n, h)| serde_json::json!({"space": n, "health": h}))
                        .collect(),
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("serializable")
                );
            } else {
                println!(
                    "rebuilt {} slabs in {} extents ({})",
                    report.slabs,
                    report.extents,
                    format_size(report.bytes)
                );
                for u in &report.unrecoverable {
                    println!("unrecoverable: {u}");
                }
                for (n, h) in &health {
                    println!("{n}: {h}");
                }
            }
            if report.unrecoverable.is_empty() {
                Ok(())
            } else {
                Err(Error::Failed(format!(
                    "{} extents could not be rebuilt",
                    report.unrecoverable.len()
                )))
            }
        }
        SpaceCommand::Scrub(a) => {
            let pool = say_notes(Pool::open_dir(
                &a.dir,
                &OpenOptions {
                    force_member: a.force_member.clone(),
                    ..OpenOptions::default()
                },
                &FileOptions::default(),
            )?);
            let pb = progress_bar(0, "scrub");
            let r = pool.scrub(a.name.as_deref(), &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            if a.json {
                let v = serde_json::json!({
                    "chunks": r.chunks,
                    "repaired": r.repaired,
                    "unverifiable": r.unverifiable,
                    "checksum_errors": r.checksum_errors,
                    "healed_blocks": r.healed,
                    "lost_blocks": r.lost,
                    "undecided_blocks": r.undecided,
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serializable")
                );
            } else {
                println!(
                    "checked {} chunks: {} repaired, {} could not be checked (lost disks)",
                    r.chunks, r.repaired, r.unverifiable
                );
                println!(
                    "block checksums: {} bad blocks of 512 bytes found, {} healed from a good copy or parity, {} lost",
                    r.checksum_errors, r.healed, r.lost
                );
                if r.undecided > 0 {
                    println!(
                        "undecided: {} blocks whose copies or parity pass their checksums but disagree, left as they are",
                        r.undecided
                    );
                }
            }
            // Monitoring relies on the status: anything lost or left unchecked is a failure.
            let mut causes = Vec::new();
            if r.lost > 0 {
                causes.push(format!(
                    "{} blocks fail their checksum with no good copy or parity left",
                    r.lost
                ));
            }
            if r.undecided > 0 {
                causes.push(format!(
                    "{} blocks have copies or parity that pass their checksums but disagree, and nothing told which is right",
                    r.undecided
                ));
            }
            if r.unverifiable > 0 {
                causes.push(format!(
                    "{} chunks could not be checked (their disks are lost; see pool info)",
                    r.unverifiable
                ));
            }
            if causes.is_empty() {
                Ok(())
            } else {
                Err(Error::Failed(causes.join("; ")))
            }
        }
        SpaceCommand::Delete(a) => {
            let pool = open(&a.dir, false)?;
            pool.delete_space(&a.name)?;
            println!("deleted space '{}'", a.name);
            Ok(())
        }
        SpaceCommand::Resize(a) => {
            let pool = open(&a.dir, false)?;
            print_space(&pool.resize_space(&a.name, a.size)?, a.json);
            Ok(())
        }
    }
}

/// Prints what a writable open did (a resync, a member caught up or left out, a member found
/// missing) to stderr, as `vstor disk` commands print a target's notes: the command's own
/// output does not say it, and an operator who put a disk back wants to know.
fn say_notes(pool: Pool) -> Pool {
    for note in &pool.info().notes {
        eprintln!("vstor: note: {note}");
    }
    pool
}

/// Opens the pool in `dir`; a writable open prints its notes ([`say_notes`]).
fn open(dir: &Path, read_only: bool) -> Result<Pool, Error> {
    let pool = open_quiet(dir, read_only)?;
    Ok(if read_only { pool } else { say_notes(pool) })
}

fn open_quiet(dir: &Path, read_only: bool) -> Result<Pool, Error> {
    Ok(Pool::open_dir(
        dir,
        &OpenOptions {
            read_only,
            ..Default::default()
        },
        &FileOptions {
            read_only,
            ..FileOptions::default()
        },
    )?)
}

/// Opens writable with O_DIRECT members (where the file system allows it): long copies
/// (repair) should not go through the page cache.
fn open_direct(dir: &Path, force_member: Option<String>) -> Result<Pool, Error> {
    Ok(say_notes(Pool::open_dir(
        dir,
        &OpenOptions {
            force_member,
            ..OpenOptions::default()
        },
        &FileOptions {
            direct: true,
            ..FileOptions::default()
        },
    )?))
}

fn prov_name(p: Provisioning) -> &'static str {
    match p {
        Provisioning::Thin => "thin",
        Provisioning::Fixed => "fixed",
    }
}

#[derive(Serialize)]
struct MemberJson {
    index: usize,
    id: String,
    disk: Option<String>,
    state: &'static str,
    usable: bool,
    capacity: u64,
    slabs: u64,
    slabs_used: u64,
    metadata_sequence: Option<u64>,
}

#[derive(Serialize)]
struct SpaceJson {
    id: String,
    name: String,
    size: u64,
    resiliency: &'static str,
    copies: Option<u8>,
    redundancy: Option<u8>,
    columns: usize,
    data_columns: usize,
    disks_per_extent: usize,
    interleave: u64,
    provisioning: &'static str,
    extents: u64,
    allocated_extents: u64,
    slabs: u64,
    health: &'static str,
    health_detail: Option<String>,
}

#[derive(Serialize)]
struct PoolJson {
    id: String,
    sequence: u64,
    format_version: u32,
    parity_journal: bool,
    slab_size: u64,
    /// Bytes of the slabs of the members not removed.
    capacity: u64,
    /// Bytes of those slabs in use.
    used: u64,
    members: Vec<MemberJson>,
    spaces: Vec<SpaceJson>,
    notes: Vec<String>,
}

fn space_json(s: &SpaceInfo) -> SpaceJson {
    SpaceJson {
        id: s.id.to_string(),
        name: s.name.clone(),
        size: s.size,
        resiliency: s.resiliency.kind_name(),
        copies: match s.resiliency {
            Resiliency::Mirror { copies } => Some(copies),
            _ => None,
        },
        redundancy: match s.resiliency {
            Resiliency::Parity { redundancy } => Some(redundancy),
            _ => None,
        },
        columns: s.columns,
        data_columns: s.data_columns,
        disks_per_extent: s.width,
        interleave: s.interleave,
        provisioning: prov_name(s.provisioning),
        extents: s.extents,
        allocated_extents: s.allocated_extents,
        slabs: s.slabs,
        health: s.health.name(),
        health_detail: match &s.health {
            SpaceHealth::Healthy => None,
            SpaceHealth::Degraded { lost_slabs } => {
                Some(format!("{lost_slabs} slabs on lost members"))
            }
            SpaceHealth::Failed { reason } => Some(reason.clone()),
        },
    }
}

/// What `pool info` calls a member's state: a member that is not present is `missing`,
/// unless it was removed (then nothing of the pool is on it and nobody misses it).
fn member_state(m: &MemberInfo) -> &'static str {
    match (m.state, &m.disk) {
        (MemberState::Removed, _) => "removed",
        (_, None) => "missing",
        (s, Some(_)) => s.name(),
    }
}

/// Slabs of the pool's capacity, and those in use: removed members count for nothing.
fn capacity_slabs(p: &PoolInfo) -> (u64, u64) {
    let live = p.members.iter().filter(|m| m.state != MemberState::Removed);
    let (mut total, mut used) = (0, 0);
    for m in live {
        total += m.slabs;
        used += m.slabs_used;
    }
    (total, used)
}

fn print_pool(p: &PoolInfo, json: bool) {
    if json {
        let (total, used) = capacity_slabs(p);
        let v = PoolJson {
            capacity: total * p.slab_size,
            used: used * p.slab_size,
            id: p.id.to_string(),
            sequence: p.sequence,
            format_version: p.format_version,
            parity_journal: p.format_version >= 3,
            slab_size: p.slab_size,
            members: p
                .members
                .iter()
                .map(|m| MemberJson {
                    index: m.index,
                    id: m.id.to_string(),
                    disk: m.disk.clone(),
                    state: member_state(m),
                    usable: m.usable,
                    capacity: m.capacity,
                    slabs: m.slabs,
                    slabs_used: m.slabs_used,
                    metadata_sequence: m.metadata_sequence,
                })
                .collect(),
            spaces: p.spaces.iter().map(space_json).collect(),
            notes: p.notes.clone(),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        );
        return;
    }
    println!("pool:        {}", p.id);
    println!("sequence:    {}", p.sequence);
    println!(
        "format:      version {}{}",
        p.format_version,
        if p.format_version >= 3 {
            " (parity journal)"
        } else {
            " (no parity journal)"
        }
    );
    println!("slab size:   {}", format_size(p.slab_size));
    let (total, used) = capacity_slabs(p);
    println!(
        "capacity:    {} in {total} slabs, {} used",
        format_size(total * p.slab_size),
        format_size(used * p.slab_size)
    );
    println!("members:");
    for m in &p.members {
        let state = member_state(m);
        println!(
            "  {:>2}  {:<8} {:>6}/{:<6} slabs  {}",
            m.index,
            state,
            m.slabs_used,
            m.slabs,
            m.disk.as_deref().unwrap_or("-")
        );
    }
    if p.spaces.is_empty() {
        println!("spaces:      none");
    } else {
        println!("spaces:");
        for s in &p.spaces {
            println!(
                "  {:<20} {:>10}  {:<16} {}",
                s.name,
                format_size(s.size),
                s.resiliency.to_string(),
                s.health.name()
            );
        }
    }
    for n in &p.notes {
        println!("note: {n}");
    }
}

fn print_space(s: &SpaceInfo, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&space_json(s)).expect("serializable")
        );
        return;
    }
    println!("space:        {}", s.name);
    println!("id:           {}", s.id);
    println!("size:         {}", format_size(s.size));
    println!("resiliency:   {}", s.resiliency);
    println!(
        "columns:      {} ({} data, {} disks per extent)",
        s.columns, s.data_columns, s.width
    );
    println!("interleave:   {}", format_size(s.interleave));
    println!("provisioning: {}", prov_name(s.provisioning));
    println!(
        "allocated:    {}/{} extents ({} slabs)",
        s.allocated_extents, s.extents, s.slabs
    );
    match &s.health {
        SpaceHealth::Healthy => println!("health:       healthy"),
        SpaceHealth::Degraded { lost_slabs } => {
            println!("health:       degraded ({lost_slabs} slabs on lost members)")
        }
        SpaceHealth::Failed { reason } => println!("health:       failed ({reason})"),
    }
}
