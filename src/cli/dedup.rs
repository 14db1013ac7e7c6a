//! `vstor dedup ...`: offline deduplication of a library of images (Enable-DedupVolume,
//! Start-DedupJob, Get-DedupStatus of vstor).

use super::{progress_bar, size_arg};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use vstor::{format_size, Error};
use vstor_dedup::chunk::ChunkParams;
use vstor_dedup::library::{FileState, Library};
use vstor_dedup::store::StoreConfig;
use vstor_dedup::vfs::{RealFs, Vfs};

mod volume;

#[derive(Debug, Subcommand)]
pub enum DedupCommand {
    /// Make a dedup store of volumes (inline dedup for running VMs): volumes of 4 KiB blocks
    /// whose identical blocks, across every volume of the store, are stored once.
    #[command(after_help = "Examples:\n  vstor dedup create /srv/vols\n  \
        vstor dedup volume create /srv/vols gold --size 20G\n  \
        vstor dedup volume clone /srv/vols gold vm1\n  \
        vstor disk bench dedup:/srv/vols/vm1 --random -w -d 32 -s 4k -c 100000\n\
        A volume opens as dedup:STORE/NAME in every command, the VMM and vstor serve. One \
        process at a time opens a store (it serves all its volumes).")]
    Create(volume::CreateArgs),
    /// Volumes of a dedup store: create, list, clone, delete.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Mark DIR as a dedup library: make its chunk store (DIR/.vstor-dedup).
    #[command(after_help = "Examples:\n  vstor dedup enable /srv/images\n  \
        vstor dedup enable /srv/images --chunk-avg 32k --hotspot-refs 50 --no-compress")]
    Enable(EnableArgs),
    /// Optimize the files of a library that are not open: chunk them, store new chunks and
    /// replace each file, atomically, by a stub (Start-DedupJob -Type Optimization). An
    /// optimized file opens as before (vstor disk read/info, the VMM, the daemon).
    #[command(after_help = "Examples:\n  vstor dedup optimize /srv/images\n  \
        vstor dedup optimize /srv/images --throttle 200M --json\n\
        A file open in another process (its image lock) is skipped; a job cut short is resumed \
        by running it again.")]
    Optimize(OptimizeArgs),
    /// Show a library: logical and stored size, ratio, chunks, containers, and each file's
    /// state (Get-DedupStatus).
    #[command(after_help = "Example:\n  vstor dedup status /srv/images --json")]
    Status(DirArgs),
    /// Garbage collection: drop chunks no file uses, compact containers (Start-DedupJob -Type
    /// GarbageCollection).
    #[command(after_help = "Example:\n  vstor dedup gc /srv/images")]
    Gc(DirArgs),
    /// Verify every chunk's hash; repair from hotspot copies; name what cannot be repaired
    /// (Start-DedupJob -Type Scrubbing). Exits 1 when something is bad.
    #[command(after_help = "Example:\n  vstor dedup scrub /srv/images --json")]
    Scrub(DirArgs),
    /// Put optimized files back as plain files (all of the library, or FILE).
    #[command(
        after_help = "Examples:\n  vstor dedup unoptimize /srv/images disk1.vhdx\n  \
        vstor dedup unoptimize /srv/images"
    )]
    Unoptimize(UnoptimizeArgs),
    /// A read-only FUSE view of a library on MNT, in which every file reads as its original
    /// bytes, for tools that know nothing of vstor (qemu-img, cmp, md5sum). Serves until
    /// unmounted (`umount MNT`) or interrupted.
    #[command(
        after_help = "Example:\n  vstor dedup mount /srv/images /mnt/images &\n  \
        qemu-img compare /mnt/images/disk1.vhdx /backup/disk1.vhdx\n  umount /mnt/images"
    )]
    Mount(MountArgs),
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// The library directory.
    dir: PathBuf,
    /// The (empty) directory to mount the view on.
    mnt: PathBuf,
}

#[derive(Debug, Args)]
pub struct EnableArgs {
    /// The library directory.
    dir: PathBuf,
    /// Minimum chunk size.
    #[arg(long, value_parser = size_arg, default_value = "32k")]
    chunk_min: u64,
    /// Average chunk size.
    #[arg(long, value_parser = size_arg, default_value = "64k")]
    chunk_avg: u64,
    /// Maximum chunk size.
    #[arg(long, value_parser = size_arg, default_value = "128k")]
    chunk_max: u64,
    /// Store chunks uncompressed.
    #[arg(long)]
    no_compress: bool,
    /// Seal a container at this size.
    #[arg(long, value_parser = size_arg, default_value = "1G")]
    seal_size: u64,
    /// Chunks with at least this many references keep a second copy (0: none).
    #[arg(long, default_value_t = 100)]
    hotspot_refs: u64,
}

#[derive(Debug, Args)]
pub struct OptimizeArgs {
    /// The library directory.
    dir: PathBuf,
    /// Only this file (a path relative to DIR).
    #[arg(long)]
    file: Option<String>,
    /// Read at most this many bytes per second (e.g. 100M).
    #[arg(long, value_parser = size_arg)]
    throttle: Option<u64>,
    /// Report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct DirArgs {
    /// The library directory.
    dir: PathBuf,
    /// Report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct UnoptimizeArgs {
    /// The library directory.
    dir: PathBuf,
    /// Only this file (a path relative to DIR).
    file: Option<String>,
}

mod mount;

fn fs() -> Arc<dyn Vfs> {
    Arc::new(RealFs)
}

fn open(dir: &std::path::Path) -> Result<Library, Error> {
    Ok(Library::open(fs(), dir).map_err(vstor::core::Error::from)?)
}

fn de(e: vstor_dedup::DedupError) -> Error {
    vstor::core::Error::from(e).into()
}

fn json_out(v: &impl Serialize) -> Result<(), Error> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| Error::InvalidArgument(e.to_string()))?
    );
    Ok(())
}

/// Runs a `vstor dedup` command.
pub fn run(c: DedupCommand) -> Result<(), Error> {
    match c {
        DedupCommand::Create(a) => volume::create(a),
        DedupCommand::Volume(c) => volume::run(c),
        DedupCommand::Enable(a) => {
            let cfg = StoreConfig {
                params: ChunkParams {
                    min: a.chunk_min as u32,
                    avg: a.chunk_avg as u32,
                    max: a.chunk_max as u32,
                },
                compress: !a.no_compress,
                seal_size: a.seal_size,
                hotspot_refs: a.hotspot_refs,
            };
            Library::enable(fs(), &a.dir, cfg).map_err(de)?;
            println!("{} is a dedup library now", a.dir.display());
            Ok(())
        }
        DedupCommand::Optimize(a) => optimize(a),
        DedupCommand::Status(a) => status(a),
        DedupCommand::Gc(a) => {
            let lib = open(&a.dir)?;
            let (r, waiting) = lib.gc().map_err(de)?;
            #[derive(Serialize)]
            struct Out {
                streams_dropped: u64,
                chunks_dropped: u64,
                containers_deleted: u64,
                containers_compacted: u64,
                bytes_moved: u64,
                bytes_freed: u64,
                waiting_for_open_files: Vec<String>,
            }
            let out = Out {
                streams_dropped: r.streams_dropped,
                chunks_dropped: r.chunks_dropped,
                containers_deleted: r.containers_deleted,
                containers_compacted: r.containers_retired,
                bytes_moved: r.bytes_moved,
                bytes_freed: r.bytes_freed,
                waiting_for_open_files: waiting,
            };
            if a.json {
                return json_out(&out);
            }
            println!(
                "gc: {} chunks dropped, {} containers deleted, {} compacted ({} moved), {} freed",
                out.chunks_dropped,
                out.containers_deleted,
                out.containers_compacted,
                format_size(out.bytes_moved),
                format_size(out.bytes_freed)
            );
            if !out.waiting_for_open_files.is_empty() {
                println!(
                    "compaction waits for files open elsewhere: {}",
                    out.waiting_for_open_files.join(", ")
                );
            }
            Ok(())
        }
        DedupCommand::Scrub(a) => {
            let lib = open(&a.dir)?;
            let (r, missing) = lib.scrub().map_err(de)?;
            #[derive(Serialize)]
            struct Bad {
                chunk: String,
                container: String,
                files: Vec<String>,
            }
            #[derive(Serialize)]
            struct Out {
                checked: u64,
                repaired: Vec<String>,
                hotspot_copies_repaired: u64,
                bad: Vec<Bad>,
                stubs_with_missing_chunks: Vec<String>,
            }
            let out = Out {
                checked: r.checked,
                repaired: r.repaired,
                hotspot_copies_repaired: r.hot_repaired,
                bad: r
                    .bad
                    .into_iter()
                    .map(|(chunk, container, files)| Bad {
                        chunk,
                        container,
                        files,
                    })
                    .collect(),
                stubs_with_missing_chunks: missing,
            };
            let failed = !out.bad.is_empty() || !out.stubs_with_missing_chunks.is_empty();
            if a.json {
                json_out(&out)?;
            } else {
                println!(
                    "scrub: {} chunks checked, {} repaired from hotspot copies, {} bad",
                    out.checked,
                    out.repaired.len(),
                    out.bad.len()
                );
                for id in &out.repaired {
                    println!("repaired chunk {id}");
                }
                for b in &out.bad {
                    println!(
                        "bad chunk {} in {}, used by: {}",
                        b.chunk,
                        b.container,
                        b.files.join(", ")
                    );
                }
                for m in &out.stubs_with_missing_chunks {
                    println!("{m}");
                }
            }
            if failed {
                return Err(Error::NotClean(format!(
                    "scrub of {} found damage it could not repair",
                    a.dir.display()
                )));
            }
            Ok(())
        }
        DedupCommand::Mount(a) => mount::mount(&a.dir, &a.mnt),
        DedupCommand::Unoptimize(a) => {
            let lib = open(&a.dir)?;
            let pb = progress_bar(0, "unoptimize");
            let done = lib
                .unoptimize(a.file.as_deref(), &mut |name, at, size| {
                    pb.set_length(size);
                    pb.set_position(at);
                    pb.set_message(name.to_string());
                })
                .map_err(de)?;
            pb.finish_and_clear();
            for n in &done {
                println!("{n}: unoptimized");
            }
            if done.is_empty() {
                println!("nothing was optimized");
            }
            Ok(())
        }
    }
}

fn optimize(a: OptimizeArgs) -> Result<(), Error> {
    let lib = open(&a.dir)?;
    let pb = progress_bar(0, "optimize");
    let start = std::time::Instant::now();
    let mut last = String::new();
    let r = lib
        .optimize(a.file.as_deref(), a.throttle, &mut |name, at, size| {
            if name != last {
                last = name.to_string();
                pb.set_length(size);
                pb.set_message(name.to_string());
            }
            pb.set_position(at);
        })
        .map_err(de)?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let st = lib.stats().map_err(de)?;
    #[derive(Serialize)]
    struct Out {
        optimized: Vec<String>,
        in_use: Vec<String>,
        already_optimized: u64,
        too_small: u64,
        bytes_chunked: u64,
        chunks: u64,
        new_chunks: u64,
        seconds: f64,
        logical_bytes: u64,
        stored_bytes: u64,
    }
    let out = Out {
        optimized: r.optimized,
        in_use: r.in_use,
        already_optimized: r.already,
        too_small: r.small,
        bytes_chunked: r.bytes,
        chunks: r.chunks,
        new_chunks: r.new_chunks,
        seconds: secs,
        logical_bytes: st.logical_bytes,
        stored_bytes: st.stored_bytes,
    };
    if a.json {
        return json_out(&out);
    }
    for n in &out.optimized {
        println!("{n}: optimized");
    }
    for n in &out.in_use {
        println!("{n}: skipped, in use by another process");
    }
    println!(
        "{} files optimized ({} chunked in {:.1} s, {} chunks, {} new), {} already optimized; \
         library {} in {}",
        out.optimized.len(),
        format_size(out.bytes_chunked),
        secs,
        out.chunks,
        out.new_chunks,
        out.already_optimized,
        format_size(out.logical_bytes),
        format_size(out.stored_bytes)
    );
    Ok(())
}

fn status(a: DirArgs) -> Result<(), Error> {
    let lib = open(&a.dir)?;
    let st = lib.stats().map_err(de)?;
    let files = lib.files().map_err(de)?;
    #[derive(Serialize)]
    struct FileOut {
        name: String,
        size: u64,
        on_disk: u64,
        state: &'static str,
        written_since_optimize: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    }
    #[derive(Serialize)]
    struct Out {
        logical_bytes: u64,
        stored_bytes: u64,
        savings_percent: f64,
        ratio: f64,
        chunks: u64,
        chunk_bytes: u64,
        containers: u64,
        hotspot_containers: u64,
        hotspot_chunks: u64,
        optimized_files: usize,
        files: Vec<FileOut>,
    }
    let files: Vec<FileOut> = files
        .into_iter()
        .map(|f| {
            let (state, written, error) = match f.state {
                FileState::Plain => ("not optimized", 0, None),
                FileState::Optimized { log_bytes, .. } => ("optimized", log_bytes, None),
                FileState::Broken(e) => ("broken", 0, Some(e)),
            };
            FileOut {
                name: f.name,
                size: f.size,
                on_disk: f.on_disk,
                state,
                written_since_optimize: written,
                error,
            }
        })
        .collect();
    let logical = st.logical_bytes;
    let stored = st.stored_bytes;
    let out = Out {
        logical_bytes: logical,
        stored_bytes: stored,
        savings_percent: if logical > 0 {
            100.0 * (1.0 - stored as f64 / logical as f64)
        } else {
            0.0
        },
        ratio: if stored > 0 {
            logical as f64 / stored as f64
        } else {
            0.0
        },
        chunks: st.chunks,
        chunk_bytes: st.chunk_bytes,
        containers: st.containers,
        hotspot_containers: st.hotspot_containers,
        hotspot_chunks: st.hot_chunks,
        optimized_files: files.iter().filter(|f| f.state == "optimized").count(),
        files,
    };
    if a.json {
        return json_out(&out);
    }
    println!("library:     {}", a.dir.display());
    println!(
        "logical:     {} in {} optimized files",
        format_size(out.logical_bytes),
        out.optimized_files
    );
    println!(
        "stored:      {} (ratio {:.2}:1, {:.1}% saved)",
        format_size(out.stored_bytes),
        out.ratio,
        out.savings_percent
    );
    println!(
        "chunks:      {} ({} uncompressed), {} with hotspot copies",
        out.chunks,
        format_size(out.chunk_bytes),
        out.hotspot_chunks
    );
    println!(
        "containers:  {} (+{} hotspot)",
        out.containers, out.hotspot_containers
    );
    for f in &out.files {
        let extra = match (&f.error, f.written_since_optimize) {
            (Some(e), _) => format!(" ({e})"),
            (None, 0) => String::new(),
            (None, w) => format!(" ({} written since)", format_size(w)),
        };
        println!(
            "  {:<40} {:>10}  {}{}",
            f.name,
            format_size(f.size),
            f.state,
            extra
        );
    }
    Ok(())
}
