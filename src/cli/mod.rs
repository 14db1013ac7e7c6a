//! Argument definitions and dispatch.

mod dedup;
mod demo;
mod disk;
mod hexdump;
mod lifecycle;
mod pool;
mod qos;
mod serve;
mod vhdx;

use clap::{Parser, Subcommand};
use vstor::Error;

/// vstor: virtual disks, pools and QoS for VMMs, from the command line.
#[derive(Debug, Parser)]
#[command(name = "vstor", version, about, long_about = None, after_help = "\
Targets name a stack (the grammar: README.md, Targets; rustdoc of vstor::target):
  PATH               a file or block device; its content decides the format
  raw:PATH           a plain file or block device, whatever it holds
  vhdx:PATH          a VHDX image with its parent chain (disk.vhdx, disk.avhdx by name)
  vhd:PATH           a legacy VHD, read-only (disk.vhd by name)
  pool:DIR/NAME      a space of the storage pool whose member disks are in DIR
  dedup:STORE/NAME   a volume of a dedup store (vstor dedup create, vstor dedup volume)
Options follow after commas: readonly=on, direct=on, engine=auto|io_uring|sync,
locking=off, share-rw=on, max-iops=N, min-iops=N (QoS). A known extension whose content
disagrees is refused naming both; qcow2, VMDK and VDI are refused by name.

Image locks: a writer has its files alone, readers share (share-rw=on on a writer lets
readers in); a file in use is refused at once with the holder named.

Exit status: 0 done; 1 failed; 2 bad arguments or input; 75 the image is in use by another
process (try again once it is closed).

Examples:
  vstor demo
  vstor disk create /tmp/d.vhdx --size 1G
  vstor disk create /tmp/child.avhdx --parent /tmp/d.vhdx
  vstor disk write /tmp/child.avhdx --offset 0 --length 64k --pattern 0xab
  vstor disk read /tmp/child.avhdx --offset 0 --length 64
  vstor disk info /tmp/child.avhdx
  vstor disk check /tmp/d.vhdx
  vstor disk bench /tmp/d.vhdx --direct -d 32 -s 4k -c 100000
  vstor pool create /tmp/pool --disks 4 --disk-size 1G
  vstor space create /tmp/pool data --size 1G --resiliency mirror
  vstor disk bench pool:/tmp/pool/data -d 32 -s 64k -c 10000 -w")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a small stack on temporary files and show what it does.
    Demo(demo::DemoArgs),
    /// Virtual disks: create, inspect, check, read, write, benchmark.
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Storage QoS: IOPS limits and reservations per virtual disk, flow statistics.
    #[command(subcommand)]
    Qos(qos::QosCommand),
    /// Data deduplication: libraries of images (enable, optimize, status, gc, scrub,
    /// unoptimize) and stores of volumes for running VMs (create, volume).
    #[command(subcommand)]
    Dedup(dedup::DedupCommand),
    /// Storage pools: create a pool of disks, show it, add, retire, reset and remove disks.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Spaces (virtual disks of a pool): create, list, show, resize, delete, repair, scrub.
    #[command(subcommand)]
    Space(pool::SpaceCommand),
    /// The storage daemon: serve disks over NBD (and vhost-user-blk) with a control API.
    Serve(serve::ServeArgs),
    /// Exports of a running daemon: add, list, remove, statistics, QoS, resize, checkpoint.
    #[command(subcommand)]
    Export(serve::ExportCommand),
    /// A running daemon: info, graceful shutdown.
    #[command(subcommand)]
    Server(serve::ServerCommand),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Disk(c) => disk::run(c),
        Command::Qos(c) => qos::run(c),
        Command::Dedup(c) => dedup::run(c),
        Command::Pool(c) => pool::run_pool(c),
        Command::Space(c) => pool::run_space(c),
        Command::Serve(a) => serve::run_serve(a),
        Command::Export(c) => serve::run_export(c),
        Command::Server(c) => serve::run_server(c),
    }
}

/// Parses a size argument (`4k`, `1M`, `10G`).
pub(crate) fn size_arg(s: &str) -> Result<u64, String> {
    vstor::parse_size(s).map_err(|e| e.to_string())
}

/// Parses a byte value: `0xab`, `171`, `0o253`.
pub(crate) fn byte_arg(s: &str) -> Result<u8, String> {
    let parsed = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u8::from_str_radix(h, 16)
    } else if let Some(o) = s.strip_prefix("0o") {
        u8::from_str_radix(o, 8)
    } else {
        s.parse()
    };
    parsed.map_err(|_| format!("invalid byte '{s}': expected 0 to 255, like 171 or 0xab"))
}

/// A progress bar on stderr when it is a terminal; hidden otherwise.
pub(crate) fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
