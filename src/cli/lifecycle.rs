//! `vstor disk resize|compact|convert|merge|checkpoint|clone|set`: the VHDX lifecycle
//! (Resize-VHD, Optimize-VHD, Convert-VHD, Merge-VHD, checkpoints, Set-VHD).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;
use vstor::core::{BlockDevice, FileOptions, ImageLock, Job, LockMode};
use vstor::probe::Detected;
use vstor::vhdx::convert::{self, ConvertOptions, Fill, Format};
use vstor::vhdx::lifecycle;
use vstor::vhdx::vpc::{ChainPlace, Vpc};
use vstor::vhdx::{OpenOptions, Vhdx};
use vstor::{format_size, Error, TargetKind, TargetSpec};

use super::{progress_bar, size_arg};

#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The VHDX file.
    path: PathBuf,
    /// The new virtual size (`10G`, `512M`).
    #[arg(long, value_parser = size_arg, conflicts_with = "to_minimum", required_unless_present = "to_minimum")]
    size: Option<u64>,
    /// Shrink to the smallest size that keeps every block holding data.
    #[arg(long)]
    to_minimum: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// The VHDX file.
    path: PathBuf,
    /// Also read every allocated block and release those that are all zeros.
    #[arg(long)]
    full: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutFormat {
    /// VHDX.
    Vhdx,
    /// Raw (sparse) file.
    Raw,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The source: a VHDX (with its chain, flattened), a legacy VHD (.vhd), or a raw file.
    src: PathBuf,
    /// The new file (must not exist).
    dst: PathBuf,
    /// The output format (by default from DST's extension: .vhdx/.avhdx is VHDX, else raw).
    #[arg(long, value_enum)]
    format: Option<OutFormat>,
    /// A fixed VHDX (every block allocated).
    #[arg(long)]
    fixed: bool,
    /// The VHDX block size (1M to 256M).
    #[arg(long, value_parser = size_arg)]
    block_size: Option<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The differencing disk to fold in (it is deleted afterwards, with any disks between it
    /// and the target).
    child: PathBuf,
    /// The ancestor to merge into (default: the parent).
    #[arg(long)]
    into: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// The disk to freeze.
    path: PathBuf,
    /// The new child (default: NAME_<GUID>.avhdx next to the disk).
    #[arg(long)]
    child: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The disk to copy (with its chain, flattened).
    src: PathBuf,
    /// The new independent VHDX (must not exist).
    dst: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The VHDX file.
    path: PathBuf,
    /// A new parent for a differencing disk (the same disk moved or renamed).
    #[arg(long)]
    parent: Option<PathBuf>,
    /// Link to --parent even if it is not the disk the child was made from.
    #[arg(long, requires = "parent")]
    ignore_linkage: bool,
    /// The physical sector size reported to guests.
    #[arg(long, value_parser = ["512", "4096"])]
    physical_sector_size: Option<String>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// A job with a progress bar (on a terminal) that Ctrl-C cancels at the next safe point.
fn job(what: &str) -> (Job, indicatif::ProgressBar) {
    let pb = progress_bar(0, what);
    let p2 = pb.clone();
    let job = Job::new().on_progress(move |done, total| {
        p2.set_length(total);
        p2.set_position(done);
    });
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let j2 = job.clone();
    std::thread::spawn(move || loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            j2.cancel();
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    });
    (job, pb)
}

fn print(json_out: bool, j: serde_json::Value, text: String) {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&j).expect("serializable")
        );
    } else {
        println!("{text}");
    }
}

fn open_rw(path: &Path, what: &str) -> Result<(Vhdx, Vec<ImageLock>), Error> {
    vhdx_only(path)?;
    refuse_optimized(path, what)?;
    let locks = lock_chain(path, 1)?;
    Ok((Vhdx::open(path, &OpenOptions::default())?, locks))
}

/// The target a PATH argument names: the file itself, its format told as for every target (a
/// known extension checked against the content, any other name by content), without the
/// target grammar. A PATH is a file name, in which a comma or a `raw:` is part of the name
/// (parsing it as a target string refused `my,disk.vhdx` and made `raw:q.vhdx` a raw file).
pub(super) fn path_spec(path: &Path) -> TargetSpec {
    TargetSpec::for_path(path)
}

/// The byte device of an optimized (dedup) file and the format of what it holds.
pub(super) type OptimizedSource = vstor::target::StubSource;

/// An optimized (dedup) file opened read-only for a command that reads it as a whole (check,
/// convert, clone): the stub's byte device (its chunks from the library's store, the writes
/// made since), and whether those bytes are a VHDX. `None` for any other file. The caller
/// holds the file's image locks; the device takes none of its own.
pub(super) fn optimized_source(path: &Path) -> Result<Option<OptimizedSource>, Error> {
    vstor::target::open_stub_probed(path, true, false)
}

/// The VHDX an optimized (dedup) file holds, opened read-only on the stub's byte device.
fn open_optimized_vhdx(path: &Path, dev: Arc<dyn BlockDevice>) -> Result<Vhdx, Error> {
    Ok(Vhdx::open_on(
        dev,
        &path.display().to_string(),
        &OpenOptions::read_only(),
        None,
    )?)
}

/// Refuses an optimized (dedup) file for a command that rewrites a VHDX's structures in place:
/// its bytes are a stub that refers to chunks in the library's store, and the VHDX code of
/// these commands works on the file itself. Says how to put the file back.
pub(super) fn refuse_optimized(path: &Path, what: &str) -> Result<(), Error> {
    if !vstor::target::is_stub_file(path) {
        return Ok(());
    }
    let how = match vstor_dedup::stub::find_store_dir(&vstor_dedup::vfs::RealFs, path)
        .as_deref()
        .and_then(Path::parent)
    {
        Some(lib) => {
            let name = std::fs::canonicalize(path)
                .ok()
                .zip(std::fs::canonicalize(lib).ok())
                .and_then(|(p, l)| p.strip_prefix(l).ok().map(Path::to_path_buf))
                .unwrap_or_else(|| path.to_path_buf());
            format!(
                "vstor dedup unoptimize {} {}",
                lib.display(),
                name.display()
            )
        }
        None => "vstor dedup unoptimize LIBRARY FILE".to_string(),
    };
    Err(Error::Unsupported(format!(
        "{} is an optimized (dedup) file: {what} rewrites the VHDX in place, which an \
         optimized file does not allow (its data lives in the library's chunk store); put it \
         back as a plain file first ({how}). Reading it, `disk info`, `disk check`, \
         `disk convert` and `disk clone` work on it as it is",
        path.display()
    )))
}

/// Refuses anything but a VHDX, told by content as every target is (`disk.img` holding a VHDX
/// is one; `x.vhdx` holding raw bytes is refused by name).
fn vhdx_only(path: &Path) -> Result<(), Error> {
    let spec = path_spec(path);
    if !matches!(spec.resolve()?.kind, TargetKind::Vhdx(_)) {
        return Err(Error::Unsupported(format!(
            "{}: this command works on VHDX files",
            path.display()
        )));
    }
    Ok(())
}

/// The image locks a lifecycle command on the VHDX at `path` holds while it runs: the first
/// `writers` files of its chain (the image, then its parents, as far as the command writes)
/// exclusively, the rest shared, as every other open of those files would take them. The
/// commands' own opens take no locks of their own (they open some files twice).
pub(super) fn lock_chain(path: &Path, writers: usize) -> Result<Vec<ImageLock>, Error> {
    let chain = chain_paths(path);
    let mut locks = Vec::new();
    for (i, p) in chain.iter().enumerate() {
        // The files written alone; the parents of the first one read and kept unchanged; the
        // image itself (when nothing is written) read as any reader reads it.
        let mode = if i < writers {
            LockMode::Exclusive
        } else if i == 0 {
            LockMode::Shared
        } else {
            LockMode::SharedStrict
        };
        locks.push(ImageLock::acquire(p, mode)?);
    }
    Ok(locks)
}

/// The image locks of a disk read as a whole that must not change meanwhile (a disk about to
/// become a parent, the source of a copy, a disk being checked): the whole chain kept
/// unchanged, so that no writer, even one that shares, changes it under the command.
pub(super) fn lock_as_parent(path: &Path) -> Result<Vec<ImageLock>, Error> {
    chain_paths(path)
        .iter()
        .map(|p| Ok(ImageLock::acquire(p, LockMode::SharedStrict)?))
        .collect()
}

/// Whether two paths name one file (hard links and symbolic links included).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The files of the chain of `path`, the image first. Where the chain cannot be opened (the
/// command will report why), the image alone.
fn chain_paths(path: &Path) -> Vec<PathBuf> {
    let Ok(v) = Vhdx::open(path, &OpenOptions::read_only()) else {
        return vec![path.to_path_buf()];
    };
    let mut out = vec![path.to_path_buf()];
    let mut cur = v.parent().cloned();
    while let Some(p) = cur {
        if let Some(pp) = p.path() {
            out.push(pp.to_path_buf());
        }
        cur = p.parent().cloned();
    }
    out
}

pub fn resize(a: ResizeArgs) -> Result<(), Error> {
    let (v, _locks) = open_rw(&a.path, "resize")?;
    let size = match a.size {
        Some(s) => s,
        None => v.minimum_size(),
    };
    let (job, pb) = job("resize");
    let t = Instant::now();
    let r = v.resize_with(size, &job)?;
    v.close()?;
    pb.finish_and_clear();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    print(
        a.json,
        json!({"path": a.path, "old_size": r.old_size, "new_size": r.new_size,
               "moved_blocks": r.moved_blocks, "bat_relocated": r.bat_relocated, "ms": ms}),
        format!(
            "{}: {} -> {} ({} blocks moved, {ms:.1} ms)",
            a.path.display(),
            format_size(r.old_size),
            format_size(r.new_size),
            r.moved_blocks
        ),
    );
    Ok(())
}

pub fn compact(a: CompactArgs) -> Result<(), Error> {
    let (v, _locks) = open_rw(&a.path, "compact")?;
    let (job, pb) = job("compact");
    let r = v.compact_with(a.full, &job)?;
    v.close()?;
    pb.finish_and_clear();
    print(
        a.json,
        json!({"path": a.path, "old_file_size": r.old_file_size, "new_file_size": r.new_file_size,
               "released_blocks": r.released_blocks, "moved_blocks": r.moved_blocks}),
        format!(
            "{}: file {} -> {} ({} blocks released, {} moved)",
            a.path.display(),
            format_size(r.old_file_size),
            format_size(r.new_file_size),
            r.released_blocks,
            r.moved_blocks
        ),
    );
    Ok(())
}

fn is_vhdx_name(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("vhdx" | "avhdx")
    )
}

pub fn convert(a: ConvertArgs) -> Result<(), Error> {
    let format = match a.format {
        Some(OutFormat::Vhdx) => Format::Vhdx,
        Some(OutFormat::Raw) => Format::Raw,
        None if is_vhdx_name(&a.dst) => Format::Vhdx,
        None => Format::Raw,
    };
    if format == Format::Raw && (a.fixed || a.block_size.is_some()) {
        return Err(Error::InvalidArgument(
            "--fixed and --block-size describe a VHDX output; the output here is raw".into(),
        ));
    }
    let block_size = a
        .block_size
        .map(|b| {
            u32::try_from(b)
                .map_err(|_| Error::InvalidArgument(format!("block size {b} is too large")))
        })
        .transpose()?;
    let opts = ConvertOptions {
        format,
        fixed: a.fixed,
        block_size,
    };
    // The source's format is told by its content, as for every target (a VHD made by
    // `qemu-img create -f vpc x.vpc` is a VHD, not 8 MiB of raw bytes).
    // A source named with an explicit prefix (raw:, vhdx:, vhd:) where no file has that
    // literal name takes the prefix's format: raw:PATH is the only way to convert a raw disk
    // whose guest wrote another format's signature into it.
    let src_spec = match a.src.to_str() {
        Some(t)
            if !a.src.exists() && ["raw:", "vhdx:", "vhd:"].iter().any(|p| t.starts_with(p)) =>
        {
            let spec: TargetSpec = t.parse()?;
            TargetSpec {
                options: Default::default(),
                qos: None,
                ..spec
            }
        }
        _ => path_spec(&a.src),
    };
    let src_kind = src_spec.resolve()?.kind;
    let src = src_spec.path().to_path_buf();
    let (job, pb) = job("convert");
    let t = Instant::now();
    let r = if let TargetKind::Pool { .. } = src_kind {
        return Err(Error::Unsupported(format!(
            "{}: convert reads VHDX, VHD and raw files",
            src.display()
        )));
    } else if let Some((dev, found)) = optimized_source(&src)? {
        // An optimized (dedup) file: read through its stub, as every target opens it.
        let _lock = ImageLock::acquire(&src, LockMode::SharedStrict)?;
        match found {
            Detected::Vhdx if !matches!(src_kind, TargetKind::Raw(_)) => {
                let v = open_optimized_vhdx(&src, dev)?;
                let map = |o: u64, l: u64| v.fills(o, l, None);
                convert::convert(&v, Some(&map), &a.dst, &opts, &job)?
            }
            Detected::Vhdx | Detected::Raw => convert::convert(&*dev, None, &a.dst, &opts, &job)?,
            other => {
                return Err(Error::Unsupported(format!(
                    "{} is an optimized (dedup) {} image, which convert reads only as VHDX or \
                     raw",
                    src.display(),
                    other.name()
                )))
            }
        }
    } else if let TargetKind::Vhdx(_) = src_kind {
        let _locks = lock_as_parent(&src)?;
        let v = Vhdx::open(&src, &OpenOptions::read_only())?;
        let map = |o: u64, l: u64| v.fills(o, l, None);
        convert::convert(&v, Some(&map), &a.dst, &opts, &job)?
    } else if let TargetKind::Vhd(_) = src_kind {
        let v = Vpc::open(&src)?;
        let map = |o: u64, l: u64| -> vstor::core::Result<Vec<(u64, Fill)>> {
            Ok(v.locate_chain(o, l)?
                .into_iter()
                .map(|(n, p)| {
                    (
                        n,
                        if p == ChainPlace::Zero {
                            Fill::Skip
                        } else {
                            Fill::Data
                        },
                    )
                })
                .collect())
        };
        convert::convert(&v, Some(&map), &a.dst, &opts, &job)?
    } else {
        // Holes are not read, and a size that is not a whole number of sectors is rounded up
        // keeping every byte, as qemu-img does.
        let src_opts = FileOptions {
            read_only: true,
            lock: true,
            // A copy must not change under it: refused beside any writer, even one that shares.
            keep_writers_out: true,
            ..Default::default()
        };
        convert::convert_file(&src, &src_opts, &a.dst, &opts, &job)?
    };
    pb.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    print(
        a.json,
        json!({"src": a.src, "dst": a.dst, "size": r.size, "read_bytes": r.read_bytes,
               "written_bytes": r.written_bytes, "seconds": secs}),
        format!(
            "{} -> {}: {} virtual, {} read, {} written in {secs:.2} s",
            a.src.display(),
            a.dst.display(),
            format_size(r.size),
            format_size(r.read_bytes),
            format_size(r.written_bytes)
        ),
    );
    Ok(())
}

pub fn merge(a: MergeArgs) -> Result<(), Error> {
    vhdx_only(&a.child)?;
    refuse_optimized(&a.child, "merge")?;
    // The child and every disk up to the target are written (or removed); siblings that hold
    // the target open (shared) keep the merge out.
    let chain = chain_paths(&a.child);
    let writers = match &a.into {
        None => 2,
        Some(into) => {
            let want = std::fs::canonicalize(into).ok();
            chain
                .iter()
                .position(|p| std::fs::canonicalize(p).ok() == want)
                .map_or(chain.len(), |i| i + 1)
        }
    };
    let _locks = lock_chain(&a.child, writers)?;
    let (job, pb) = job("merge");
    let t = Instant::now();
    let r = lifecycle::merge(&a.child, a.into.as_deref(), &job)?;
    pb.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    print(
        a.json,
        json!({"into": r.into, "removed": r.removed, "copied_bytes": r.copied_bytes,
               "size": r.size, "seconds": secs}),
        format!(
            "merged into {}: {} copied, removed {} ({secs:.2} s)",
            r.into.display(),
            format_size(r.copied_bytes),
            r.removed
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok(())
}

pub fn checkpoint(a: CheckpointArgs) -> Result<(), Error> {
    vhdx_only(&a.path)?;
    refuse_optimized(&a.path, "checkpoint")?;
    let _locks = lock_chain(&a.path, 1)?;
    let child = lifecycle::checkpoint(&a.path, a.child.as_deref())?;
    print(
        a.json,
        json!({"parent": a.path, "child": child}),
        format!(
            "{} is now read-only; write to {}",
            a.path.display(),
            child.display()
        ),
    );
    Ok(())
}

pub fn clone(a: CloneArgs) -> Result<(), Error> {
    vhdx_only(&a.src)?;
    // A copy must not change under it: the chain kept unchanged, even against a writer that
    // shares.
    let _locks = lock_as_parent(&a.src)?;
    let (job, pb) = job("clone");
    let r = match optimized_source(&a.src)? {
        // An optimized (dedup) file: the VHDX its stub stands for.
        Some((dev, Detected::Vhdx)) => {
            let v = open_optimized_vhdx(&a.src, dev)?;
            let map = |o: u64, l: u64| v.fills(o, l, None);
            convert::convert(&v, Some(&map), &a.dst, &ConvertOptions::default(), &job)?
        }
        Some((_, other)) => {
            return Err(Error::Unsupported(format!(
                "{} is an optimized (dedup) file holding a {} image; clone copies VHDX files",
                a.src.display(),
                other.name()
            )))
        }
        None => lifecycle::clone(&a.src, &a.dst, &ConvertOptions::default(), &job)?,
    };
    pb.finish_and_clear();
    print(
        a.json,
        json!({"src": a.src, "dst": a.dst, "size": r.size, "written_bytes": r.written_bytes}),
        format!(
            "{} -> {}: {} of data",
            a.src.display(),
            a.dst.display(),
            format_size(r.written_bytes)
        ),
    );
    Ok(())
}

pub fn set(a: SetArgs) -> Result<(), Error> {
    vhdx_only(&a.path)?;
    refuse_optimized(&a.path, "set")?;
    if a.parent.is_none() && a.physical_sector_size.is_none() {
        return Err(Error::InvalidArgument(
            "nothing to set: give --parent and/or --physical-sector-size".into(),
        ));
    }
    let mut _locks = lock_chain(&a.path, 1)?;
    if let Some(p) = &a.parent {
        // The new parent's chain is kept unchanged, except where it leads back to this disk
        // (a cycle, which set_parent refuses as bad input, not as a file in use).
        let chain = chain_paths(p);
        if chain.iter().any(|q| same_file(q, &a.path)) {
            return Err(Error::InvalidArgument(format!(
                "{} cannot be a parent of {}: it is {} or has it as a parent (a cycle)",
                p.display(),
                a.path.display(),
                a.path.display()
            )));
        }
        for q in chain {
            _locks.push(ImageLock::acquire(&q, LockMode::SharedStrict)?);
        }
        lifecycle::set_parent(&a.path, p, a.ignore_linkage)?;
        println!("{}: parent is now {}", a.path.display(), p.display());
    }
    if let Some(s) = &a.physical_sector_size {
        let v = Vhdx::open(&a.path, &OpenOptions::default())?;
        v.set_physical_sector_size(s.parse().expect("validated by clap"))?;
        v.close()?;
        println!("{}: physical sector size is now {s}", a.path.display());
    }
    Ok(())
}

/// `disk check --repair`: repairs (saying what on stderr), then the caller checks again.
pub fn repair(path: &Path) -> Result<(), Error> {
    refuse_optimized(path, "check --repair")?;
    let before = vstor::vhdx::check::check(path)?;
    if before.is_clean() {
        eprintln!("{}: clean; nothing to repair", path.display());
        return Ok(());
    }
    let _locks = lock_chain(path, 1)?;
    let v = Vhdx::open(path, &OpenOptions::default())?;
    let (job, pb) = job("repair");
    let done = v.repair(&job)?;
    drop(v);
    pb.finish_and_clear();
    for d in &done {
        eprintln!("repaired: {d}");
    }
    if done.is_empty() {
        eprintln!(
            "{}: nothing could be repaired without guessing",
            path.display()
        );
    }
    Ok(())
}
