//! `vstor disk ...`

use super::{byte_arg, io_err, progress_bar, size_arg};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use vstor::bench::{self, BenchParams};
use vstor::core::{BlockDevice, Engine};
use vstor::{format_size, open_target, Error, OpenedTarget, TargetKind, TargetOptions, TargetSpec};

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Create a virtual disk: VHDX (by the .vhdx/.avhdx extension) or a raw file.
    #[command(
        after_help = "Examples:\n  vstor disk create /tmp/d.vhdx --size 10G\n  \
        vstor disk create /tmp/f.vhdx --size 1G --fixed --block-size 1M\n  \
        vstor disk create /tmp/child.avhdx --parent /tmp/d.vhdx\n  \
        vstor disk create /tmp/d.raw --size 10G --preallocate"
    )]
    Create(CreateArgs),
    /// Show what a target is: format, type, sizes, identifiers, parent chain, allocation.
    #[command(
        after_help = "Examples:\n  vstor disk info /tmp/d.vhdx\n  vstor disk info /tmp/d.raw --json"
    )]
    Info(InfoArgs),
    /// Verify a VHDX file structure by structure (headers, region table, metadata, BAT,
    /// sector bitmaps, log, leaked space); exit status 0 only when clean. Writes nothing
    /// unless --repair is given.
    #[command(
        after_help = "Examples:\n  vstor disk check /tmp/d.vhdx --json\n  vstor disk check /tmp/d.vhdx --repair"
    )]
    Check(CheckArgs),
    /// Read bytes from a target: a hex dump (like xxd) or raw bytes into a file.
    #[command(
        after_help = "Examples:\n  vstor disk read /tmp/d.raw --offset 1M --length 64\n  \
        vstor disk read /tmp/d.raw --offset 0 --length 1M --output first.bin"
    )]
    Read(ReadArgs),
    /// Write a repeated byte or a file's contents into a target, then flush.
    #[command(
        after_help = "Examples:\n  vstor disk write /tmp/d.raw --offset 0 --length 64k --pattern 0xab\n  \
        vstor disk write /tmp/d.raw --offset 4k --input boot.bin"
    )]
    Write(WriteArgs),
    /// Benchmark a target with qemu-img bench's parameters.
    #[command(
        after_help = "Parameters mean what they mean to qemu-img bench, so both can run the same work:\n  \
        vstor disk bench d.raw -t none -d 32 -s 4k -c 100000\n  \
        qemu-img bench -f raw -t none -i io_uring -d 32 -s 4k -c 100000 d.raw\n\
        Add --random for uniformly random offsets, -w for writes, --engine sync for the portable engine."
    )]
    Bench(BenchArgs),
    /// Grow or shrink a VHDX (Resize-VHD); never cuts data: below the data it fails naming
    /// the smallest size, which --to-minimum picks.
    #[command(
        after_help = "Examples:\n  vstor disk resize /tmp/d.vhdx --size 20G\n  \
        vstor disk resize /tmp/d.vhdx --to-minimum --json"
    )]
    Resize(super::lifecycle::ResizeArgs),
    /// Give back the space of unmapped (and with --full, all-zero) blocks and shrink the file
    /// (Optimize-VHD).
    #[command(after_help = "Example:\n  vstor disk compact /tmp/d.vhdx --full")]
    Compact(super::lifecycle::CompactArgs),
    /// Copy a disk into a new VHDX or raw file: raw to VHDX and back, fixed to dynamic and
    /// back, a chain flattened, a legacy VHD to VHDX. Zero regions stay unallocated.
    #[command(
        after_help = "Examples:\n  vstor disk convert d.raw d.vhdx --block-size 1M\n  \
        vstor disk convert child.avhdx flat.raw\n  \
        vstor disk convert old.vhd new.vhdx --fixed"
    )]
    Convert(super::lifecycle::ConvertArgs),
    /// Fold a differencing disk into its parent or an ancestor (Merge-VHD); the merged disks
    /// are deleted.
    #[command(after_help = "Examples:\n  vstor disk merge child.avhdx\n  \
        vstor disk merge grandchild.avhdx --into base.vhdx")]
    Merge(super::lifecycle::MergeArgs),
    /// Freeze a disk: writes continue in a new differencing child (.avhdx).
    #[command(after_help = "Example:\n  vstor disk checkpoint vm.vhdx")]
    Checkpoint(super::lifecycle::CheckpointArgs),
    /// Copy a disk (its chain flattened) into a new independent VHDX.
    #[command(after_help = "Example:\n  vstor disk clone vm.avhdx copy.vhdx")]
    Clone(super::lifecycle::CloneArgs),
    /// Change a VHDX: its parent (a moved parent; linkage checked) or its physical sector
    /// size (Set-VHD).
    #[command(
        after_help = "Examples:\n  vstor disk set child.avhdx --parent /new/place/base.vhdx\n  \
        vstor disk set d.vhdx --physical-sector-size 4096"
    )]
    Set(super::lifecycle::SetArgs),
}

/// I/O options shared by the commands that open a target.
#[derive(Debug, Args)]
pub struct OpenArgs {
    /// Bypass the host page cache (O_DIRECT); falls back to buffered I/O, with a note, where the
    /// file system refuses it.
    #[arg(long)]
    direct: bool,
    /// I/O engine of file targets.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    engine: EngineArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EngineArg {
    /// io_uring when the kernel allows it, otherwise sync.
    Auto,
    /// io_uring (fails if unavailable).
    #[value(name = "io_uring", alias = "io-uring")]
    IoUring,
    /// Portable pread/pwrite, one request at a time.
    Sync,
}

impl From<EngineArg> for Engine {
    fn from(e: EngineArg) -> Engine {
        match e {
            EngineArg::Auto => Engine::Auto,
            EngineArg::IoUring => Engine::IoUring,
            EngineArg::Sync => Engine::Sync,
        }
    }
}

impl OpenArgs {
    fn open(&self, target: &str, read_only: bool) -> Result<OpenedTarget, Error> {
        let defaults = TargetOptions {
            read_only: Some(read_only),
            direct: Some(self.direct),
            engine: Some(self.engine.into()),
            ..Default::default()
        };
        let opened = open_target(target, &defaults)?;
        for note in &opened.notes {
            eprintln!("vstor: note: {note}");
        }
        Ok(opened)
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Path of the new disk: .vhdx or .avhdx makes a VHDX, anything else a raw file. It must not
    /// exist.
    path: PathBuf,
    /// Virtual size (4k, 1M, 10G, ...); a differencing disk takes its parent's.
    #[arg(long, value_parser = size_arg, required_unless_present = "parent")]
    size: Option<u64>,
    /// VHDX: a fixed disk (every block allocated, LeaveBlockAllocated). Sparse on disk unless
    /// --preallocate is given too.
    #[arg(long, conflicts_with = "parent")]
    fixed: bool,
    /// VHDX: block size, a power of two from 1M to 256M (default 32M, or the parent's).
    #[arg(long, value_parser = size_arg)]
    block_size: Option<u64>,
    /// VHDX: logical sector size (default 512, or the parent's).
    #[arg(long, value_parser = ["512", "4096"])]
    logical_sector_size: Option<String>,
    /// VHDX: physical sector size (default 4096, or the parent's).
    #[arg(long, value_parser = ["512", "4096"])]
    physical_sector_size: Option<String>,
    /// VHDX: make a differencing disk over this parent (its size comes from the parent).
    #[arg(long)]
    parent: Option<PathBuf>,
    /// Write every byte now instead of leaving the file sparse (raw files and fixed VHDX).
    #[arg(long)]
    preallocate: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The VHDX file.
    path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Fix what can be fixed without guessing (a log left by a crash, a damaged header slot or
    /// region table copy, leaked space), then check again and report the rest.
    #[arg(long)]
    repair: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Target (see `vstor --help`).
    target: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Target (see `vstor --help`).
    target: String,
    /// Byte offset (any value; sizes like 1M are accepted).
    #[arg(long, value_parser = size_arg, default_value = "0")]
    offset: u64,
    /// Number of bytes.
    #[arg(long, value_parser = size_arg)]
    length: u64,
    /// Write the bytes to this file instead of printing a hex dump.
    #[arg(long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    open: OpenArgs,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["pattern", "input"]))]
pub struct WriteArgs {
    /// Target (see `vstor --help`).
    target: String,
    /// Byte offset.
    #[arg(long, value_parser = size_arg, default_value = "0")]
    offset: u64,
    /// Number of bytes (with --input: defaults to the file's size).
    #[arg(long, value_parser = size_arg)]
    length: Option<u64>,
    /// Byte to write, repeated (171 or 0xab), like qemu-io's write -P.
    #[arg(long, short = 'P', value_parser = byte_arg)]
    pattern: Option<u8>,
    /// File whose bytes to write.
    #[arg(long)]
    input: Option<PathBuf>,
    #[command(flatten)]
    open: OpenArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum CacheMode {
    /// O_DIRECT (as qemu-img bench -t none).
    None,
    /// The host page cache (qemu-img's default).
    Writeback,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Target (see `vstor --help`).
    target: String,
    /// Number of requests.
    #[arg(short = 'c', long, default_value_t = 75000)]
    count: u64,
    /// Requests in flight.
    #[arg(short = 'd', long, default_value_t = 64)]
    depth: usize,
    /// Bytes per request.
    #[arg(short = 's', long, value_parser = size_arg, default_value = "4k")]
    size: u64,
    /// Offset increment between requests (default: the request size).
    #[arg(short = 'S', long, value_parser = size_arg)]
    step: Option<u64>,
    /// Offset of the first request.
    #[arg(short = 'o', long, value_parser = size_arg, default_value = "0")]
    offset: u64,
    /// Write instead of read (the run ends with a flush, inside the timing).
    #[arg(short = 'w', long)]
    write: bool,
    /// Byte written by -w.
    #[arg(long, value_parser = byte_arg, default_value = "0")]
    pattern: u8,
    /// Flush after every N requests (0: never).
    #[arg(long, default_value_t = 0)]
    flush_interval: u64,
    /// With -w, content for dedup (fio's dedupe_percentage): N% of the requests write again
    /// what an earlier request wrote, the rest write blocks new to the run (the --pattern byte
    /// with a serial number in every 4 KiB). Without it every write is the --pattern byte.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=100))]
    dedupe_percentage: Option<u8>,
    /// Cache mode: none is O_DIRECT, as in qemu-img.
    #[arg(short = 't', long = "cache", value_enum)]
    cache: Option<CacheMode>,
    /// Uniformly random offsets aligned to the request size.
    #[arg(long)]
    random: bool,
    /// Seed of --random.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// With --random: how offsets are drawn, as fio's random_distribution: random (uniform,
    /// the default) or zipf:THETA (the most popular slots get most requests; THETA > 0, not 1;
    /// 1.2 is a common skew).
    #[arg(long, value_name = "DIST", value_parser = distribution_arg)]
    distribution: Option<Distribution>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    open: OpenArgs,
}

pub fn run(cmd: DiskCommand) -> Result<(), Error> {
    match cmd {
        DiskCommand::Create(a) => create(a),
        DiskCommand::Info(a) => info(a),
        DiskCommand::Check(a) => check(a),
        DiskCommand::Read(a) => read(a),
        DiskCommand::Write(a) => write(a),
        DiskCommand::Bench(a) => bench_cmd(a),
        DiskCommand::Resize(a) => super::lifecycle::resize(a),
        DiskCommand::Compact(a) => super::lifecycle::compact(a),
        DiskCommand::Convert(a) => super::lifecycle::convert(a),
        DiskCommand::Merge(a) => super::lifecycle::merge(a),
        DiskCommand::Checkpoint(a) => super::lifecycle::checkpoint(a),
        DiskCommand::Clone(a) => super::lifecycle::clone(a),
        DiskCommand::Set(a) => super::lifecycle::set(a),
    }
}

fn create(a: CreateArgs) -> Result<(), Error> {
    let spec = super::lifecycle::path_spec(&a.path);
    if let TargetKind::Vhdx(_) = spec.kind {
        let sector =
            |s: &Option<String>| s.as_deref().map(|v| v.parse::<u32>().expect("512 or 4096"));
        return super::vhdx::create(super::vhdx::CreateRequest {
            path: &a.path,
            size: a.size,
            fixed: a.fixed,
            block_size: a.block_size,
            logical: sector(&a.logical_sector_size),
            physical: sector(&a.physical_sector_size),
            parent: a.parent.as_deref(),
            preallocate: a.preallocate,
        });
    }
    let vhdx_only = [
        (a.fixed, "--fixed"),
        (a.block_size.is_some(), "--block-size"),
        (a.logical_sector_size.is_some(), "--logical-sector-size"),
        (a.physical_sector_size.is_some(), "--physical-sector-size"),
        (a.parent.is_some(), "--parent"),
    ];
    if let Some((_, flag)) = vhdx_only.iter().find(|(set, _)| *set) {
        return Err(Error::InvalidArgument(format!(
            "{flag} applies to VHDX files; {} is a raw file (name it .vhdx for a VHDX)",
            a.path.display()
        )));
    }
    let size = a.size.unwrap_or(0);
    if size == 0 || size % 512 != 0 {
        return Err(Error::InvalidArgument(format!(
            "size {} must be a non-zero multiple of 512 bytes",
            size
        )));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&a.path)
        .map_err(io_err(format!("cannot create {}", a.path.display())))?;
    let sized = if a.preallocate {
        preallocate(&file, size)
    } else {
        file.set_len(size)
    };
    if let Err(e) = sized {
        drop(file);
        let _ = std::fs::remove_file(&a.path);
        return Err(io_err(format!(
            "cannot size {} to {} bytes",
            a.path.display(),
            size
        ))(e));
    }
    println!(
        "Created {} (raw, {}, {})",
        a.path.display(),
        format_size(size),
        if a.preallocate {
            "preallocated"
        } else {
            "sparse"
        }
    );
    Ok(())
}

fn preallocate(file: &std::fs::File, size: u64) -> std::io::Result<()> {
    file.set_len(size)?;
    let chunk = vec![0u8; 1 << 20];
    let pb = progress_bar(size, "allocating");
    let mut pos = 0;
    use std::os::unix::fs::FileExt;
    while pos < size {
        let n = (size - pos).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], pos)?;
        pos += n as u64;
        pb.set_position(pos);
    }
    pb.finish_and_clear();
    file.sync_all()
}

#[derive(Serialize)]
struct InfoReport {
    target: String,
    format: &'static str,
    format_decided: String,
    description: String,
    virtual_size: u64,
    file_size: Option<u64>,
    allocated_bytes: Option<u64>,
    logical_sector_size: u32,
    physical_sector_size: u32,
    read_only: bool,
    discard: bool,
    write_zeroes: bool,
    resizable: bool,
    /// What the figures above do not say (a file whose last bytes are past the device's end).
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

fn check(a: CheckArgs) -> Result<(), Error> {
    // An optimized (dedup) file is checked as the image its stub stands for.
    let vhdx = match super::lifecycle::optimized_source(&a.path)? {
        Some((_, found)) => found == vstor::probe::Detected::Vhdx,
        None => matches!(
            super::lifecycle::path_spec(&a.path).resolve()?.kind,
            TargetKind::Vhdx(_)
        ),
    };
    if !vhdx {
        return Err(Error::Unsupported(format!(
            "{}: check verifies VHDX files (a raw file has no structure to check)",
            a.path.display()
        )));
    }
    if a.repair {
        super::lifecycle::repair(&a.path)?;
    }
    super::vhdx::check_cmd(&a.path, a.json)
}

fn info(a: InfoArgs) -> Result<(), Error> {
    let parsed: TargetSpec = a.target.parse()?;
    let spec = parsed.resolve()?;
    // An optimized (dedup) file shows its stack (the VHDX layer on the stub's bytes) below.
    let stub = vstor::target::is_stub_file(spec.path());
    if let TargetKind::Vhdx(p) = &spec.kind {
        if !stub {
            let locking = spec.options.locking.unwrap_or(true);
            return super::vhdx::info(p, &a.target, spec.format_decided(), locking, a.json);
        }
    }
    let opened = spec.open(&TargetOptions {
        read_only: Some(true),
        ..Default::default()
    })?;
    let dev = &opened.device;
    let i = dev.info();
    let meta = std::fs::metadata(spec.path()).ok().filter(|m| m.is_file());
    use std::os::unix::fs::MetadataExt;
    let r = InfoReport {
        target: a.target.clone(),
        format: match opened.format {
            vstor::probe::Detected::Vhd => "vhd",
            vstor::probe::Detected::Vhdx => "vhdx",
            _ if matches!(spec.kind, TargetKind::Pool { .. }) => "pool space",
            _ => "raw",
        },
        format_decided: opened.format_decided.clone(),
        description: dev.describe(),
        virtual_size: i.capacity,
        file_size: meta.as_ref().map(|m| m.len()),
        allocated_bytes: meta.as_ref().map(|m| m.blocks() * 512),
        logical_sector_size: i.logical_sector_size,
        physical_sector_size: i.physical_sector_size,
        read_only: i.read_only,
        discard: i.supports.discard,
        write_zeroes: i.supports.write_zeroes,
        // `info` opens read-only, which never resizes; a raw regular file can be resized.
        resizable: i.supports.resize || meta.is_some(),
        note: meta
            .as_ref()
            .map(|m| m.len())
            .filter(|&len| len > i.capacity && opened.format != vstor::probe::Detected::Vhd)
            .map(|len| {
                format!(
                    "the file's size ({len} bytes) is not a whole number of {}-byte sectors: as a \
                     device it ends at {} bytes and its last {} bytes are not served; `vstor disk \
                     convert` keeps them (rounding up to {} bytes, as qemu-img does)",
                    i.logical_sector_size,
                    i.capacity,
                    len - i.capacity,
                    len.next_multiple_of(u64::from(i.logical_sector_size))
                )
            }),
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("serializable")
        );
        return Ok(());
    }
    println!("target:               {}", r.target);
    println!("format:               {}, {}", r.format, r.format_decided);
    println!("device:               {}", r.description);
    println!(
        "virtual size:         {} ({} bytes)",
        format_size(r.virtual_size),
        r.virtual_size
    );
    if let (Some(f), Some(al)) = (r.file_size, r.allocated_bytes) {
        println!("file size:            {} ({} bytes)", format_size(f), f);
        println!("allocated on disk:    {} ({} bytes)", format_size(al), al);
    }
    println!("logical sector size:  {}", r.logical_sector_size);
    println!("physical sector size: {}", r.physical_sector_size);
    println!(
        "supports:             discard={} write-zeroes={} resize={}",
        r.discard, r.write_zeroes, r.resizable
    );
    if let Some(n) = &r.note {
        println!("note:                 {n}");
    }
    Ok(())
}

/// With --direct, the request itself must be aligned: the user asked for exact, uncached I/O.
fn check_direct_alignment(
    dev: &dyn BlockDevice,
    direct: bool,
    offset: u64,
    length: u64,
) -> Result<(), Error> {
    let sector = u64::from(dev.info().logical_sector_size);
    if direct && (offset % sector != 0 || length % sector != 0) {
        return Err(Error::InvalidArgument(format!(
            "unaligned direct I/O: offset {offset} and length {length} must be multiples of the \
             device's {sector}-byte logical sector size (drop --direct for byte-granular I/O)"
        )));
    }
    Ok(())
}

/// Where `disk read` puts its bytes. A regular output file is written as a temporary file in
/// the same directory and renamed over the destination only when every byte was read, so a
/// failed read leaves an existing file as it was.
enum ReadSink {
    Dump(std::io::BufWriter<std::io::StdoutLock<'static>>),
    Temp(std::io::BufWriter<tempfile::NamedTempFile>, PathBuf),
    Direct(std::io::BufWriter<std::fs::File>),
}

impl ReadSink {
    fn open(output: Option<&PathBuf>, target: &TargetSpec) -> Result<Self, Error> {
        let Some(out) = output else {
            return Ok(ReadSink::Dump(std::io::BufWriter::new(
                std::io::stdout().lock(),
            )));
        };
        use std::os::unix::fs::MetadataExt;
        let existing = std::fs::metadata(out).ok();
        if let (Some(o), Ok(t)) = (&existing, std::fs::metadata(target.path())) {
            if (o.dev(), o.ino()) == (t.dev(), t.ino()) {
                return Err(Error::InvalidArgument(format!(
                    "--output {} is the target itself",
                    out.display()
                )));
            }
        }
        if existing.as_ref().is_some_and(|m| !m.is_file()) {
            // A device or a pipe (/dev/stdout, a FIFO): write to it as it is.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(out)
                .map_err(io_err(format!("cannot open {}", out.display())))?;
            return Ok(ReadSink::Direct(std::io::BufWriter::new(f)));
        }
        let dir = match out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(io_err(format!("cannot create a file in {}", dir.display())))?;
        Ok(ReadSink::Temp(std::io::BufWriter::new(tmp), out.clone()))
    }

    fn put(&mut self, pos: u64, data: &[u8]) -> std::io::Result<()> {
        match self {
            ReadSink::Dump(w) => super::hexdump::hexdump(w, pos, data),
            ReadSink::Temp(w, _) => w.write_all(data),
            ReadSink::Direct(w) => w.write_all(data),
        }
    }

    fn finish(self) -> Result<(), Error> {
        let failed = io_err("cannot write the output");
        match self {
            ReadSink::Dump(mut w) => w.flush().map_err(failed),
            ReadSink::Direct(mut w) => w.flush().map_err(failed),
            ReadSink::Temp(w, dest) => {
                let tmp = w.into_inner().map_err(|e| failed(e.into_error()))?;
                use std::os::unix::fs::PermissionsExt;
                let _ = tmp
                    .as_file()
                    .set_permissions(std::fs::Permissions::from_mode(0o644));
                tmp.persist(&dest)
                    .map_err(|e| io_err(format!("cannot write {}", dest.display()))(e.error))?;
                Ok(())
            }
        }
    }
}

fn read(a: ReadArgs) -> Result<(), Error> {
    let spec: TargetSpec = a.target.parse()?;
    let opened = a.open.open(&a.target, true)?;
    let dev = opened.device.as_ref();
    check_direct_alignment(dev, a.open.direct, a.offset, a.length)?;
    if a.length > 1 << 30 && a.output.is_none() {
        return Err(Error::InvalidArgument(
            "a hex dump of more than 1 GiB is not useful; use --output FILE".into(),
        ));
    }
    // Check the whole range before anything is written out.
    let cap = dev.capacity();
    if a.offset.checked_add(a.length).is_none_or(|e| e > cap) {
        return Err(vstor::core::Error::OutOfRange {
            op: vstor::core::OpKind::Read,
            offset: a.offset,
            len: a.length,
            capacity: cap,
        }
        .into());
    }
    let mut sink = ReadSink::open(a.output.as_ref(), &spec)?;
    // Read in pieces so that large reads use bounded memory.
    const PIECE: u64 = 8 << 20;
    let pb = progress_bar(a.length, "reading");
    let mut pos = a.offset;
    let end = a.offset + a.length;
    while pos < end {
        let n = (end - pos).min(PIECE);
        let data = vstor::bytes::read_bytes(dev, pos, n)?;
        sink.put(pos, &data)
            .map_err(io_err("cannot write the output"))?;
        pos += n;
        pb.set_position(pos - a.offset);
    }
    pb.finish_and_clear();
    sink.finish()
}

fn write(a: WriteArgs) -> Result<(), Error> {
    // The source: a repeated byte; a regular file, read piece by piece (bounded memory); or a
    // pipe or device, read whole first (at most --length, or 1 GiB) so that nothing is written
    // unless all of it arrived.
    let mut input: Option<std::fs::File> = None;
    let mut buffered: Option<Vec<u8>> = None;
    let length = match (&a.input, a.pattern) {
        (Some(p), _) => {
            let f =
                std::fs::File::open(p).map_err(io_err(format!("cannot open {}", p.display())))?;
            let meta = f
                .metadata()
                .map_err(io_err(format!("cannot inspect {}", p.display())))?;
            if meta.is_file() {
                let size = meta.len();
                let l = match a.length {
                    Some(l) if l > size => {
                        return Err(Error::InvalidArgument(format!(
                            "--length {l} is more than the {size} bytes of {}",
                            p.display()
                        )))
                    }
                    Some(l) => l,
                    None => size,
                };
                input = Some(f);
                l
            } else {
                use std::io::Read;
                const LIMIT: u64 = 1 << 30;
                let want = a.length.unwrap_or(LIMIT + 1);
                if want > LIMIT + 1 {
                    return Err(Error::InvalidArgument(format!(
                        "--length {want} from a pipe or device is above the 1 GiB limit"
                    )));
                }
                let mut data = Vec::new();
                f.take(want)
                    .read_to_end(&mut data)
                    .map_err(io_err(format!("cannot read {}", p.display())))?;
                match a.length {
                    Some(l) if (data.len() as u64) < l => {
                        return Err(Error::InvalidArgument(format!(
                            "{} ended after {} bytes; --length asked for {l}",
                            p.display(),
                            data.len()
                        )))
                    }
                    None if data.len() as u64 > LIMIT => {
                        return Err(Error::InvalidArgument(format!(
                            "{} gives more than 1 GiB; say how much with --length",
                            p.display()
                        )))
                    }
                    _ => {}
                }
                let l = data.len() as u64;
                buffered = Some(data);
                l
            }
        }
        (None, _) => a
            .length
            .ok_or_else(|| Error::InvalidArgument("--pattern needs --length".into()))?,
    };
    let opened = a.open.open(&a.target, false)?;
    let dev = opened.device.as_ref();
    check_direct_alignment(dev, a.open.direct, a.offset, length)?;
    // Refuse a range that does not fit before writing anything.
    let cap = dev.capacity();
    if a.offset.checked_add(length).is_none_or(|e| e > cap) {
        return Err(vstor::core::Error::OutOfRange {
            op: vstor::core::OpKind::Write,
            offset: a.offset,
            len: length,
            capacity: cap,
        }
        .into());
    }
    const PIECE: u64 = 8 << 20;
    let mut piece = vec![a.pattern.unwrap_or(0); length.min(PIECE) as usize];
    let pb = progress_bar(length, "writing");
    let mut done = 0u64;
    while done < length {
        let n = (length - done).min(PIECE) as usize;
        if let Some(f) = input.as_mut() {
            use std::io::Read;
            f.read_exact(&mut piece[..n])
                .map_err(io_err("cannot read the input file"))?;
        } else if let Some(b) = &buffered {
            let at = done as usize;
            piece[..n].copy_from_slice(&b[at..at + n]);
        }
        vstor::bytes::write_bytes(dev, a.offset + done, &piece[..n])?;
        done += n as u64;
        pb.set_position(done);
    }
    pb.finish_and_clear();
    dev.flush()?;
    println!("wrote {length} bytes at offset {}", a.offset);
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> Result<(), Error> {
    let direct = a.open.direct || a.cache == Some(CacheMode::None);
    let open = OpenArgs {
        direct,
        engine: a.open.engine,
    };
    if a.distribution.is_some() && !a.random {
        return Err(Error::InvalidArgument(
            "--distribution draws random offsets: give --random too".into(),
        ));
    }
    let opened = open.open(&a.target, !a.write)?;
    let dev = opened.device.as_ref();
    let p = BenchParams {
        count: a.count,
        depth: a.depth,
        size: usize::try_from(a.size).unwrap_or(usize::MAX),
        step: a.step,
        offset: a.offset,
        write: a.write,
        pattern: a.pattern,
        random: a.random,
        seed: a.seed,
        zipf: a.distribution.and_then(|d| d.0),
        flush_interval: a.flush_interval,
        dedupe_percentage: a.dedupe_percentage,
    };
    if !a.json {
        println!("{}", p.banner());
    }
    let pb = progress_bar(p.count, "bench");
    let r = bench::run(dev, &p, &mut |n| pb.set_position(n))?;
    pb.finish_and_clear();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("serializable")
        );
    } else {
        println!("Run completed in {:.3} seconds.", r.seconds);
        println!(
            "IOPS: {:.0}, bandwidth: {:.1} MiB/s ({})",
            r.iops, r.mib_per_s, r.device
        );
    }
    Ok(())
}

/// A `--distribution`: uniform (`None`) or zipf with this exponent.
#[derive(Debug, Clone, Copy)]
pub struct Distribution(Option<f64>);

/// `--distribution`: `random` (uniform) or `zipf:THETA`.
fn distribution_arg(s: &str) -> Result<Distribution, String> {
    if s == "random" || s == "uniform" {
        return Ok(Distribution(None));
    }
    let t = s
        .strip_prefix("zipf:")
        .ok_or_else(|| format!("'{s}': expected random or zipf:THETA"))?;
    match t.parse::<f64>() {
        Ok(t) if t > 0.0 && t.is_finite() && (t - 1.0).abs() > 1e-9 => Ok(Distribution(Some(t))),
        _ => Err(format!(
            "zipf:{t}: THETA must be a number above 0 and not 1 (as fio)"
        )),
    }
}
