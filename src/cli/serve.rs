//! `vstor serve` (the storage daemon) and the commands that drive it over its control API
//! (`vstor export ...`, `vstor server ...`).

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vstor::target::{StackContext, TargetOptions, TargetSpec};
use vstor::Error;
use vstor_serve::daemon::{Daemon, DaemonConfig, ExportArg, NbdAddr, VhostArg};
use vstor_serve::export::ServeError;
use vstor_serve::jsonrpc::Client;
use vstor_serve::{Opened, Opener, QosControl};

/// Serve disks to VMMs and tools over NBD, iSCSI and vhost-user-blk, with a control API.
#[derive(Debug, Args)]
#[command(after_help = "\
Every --export is served under its name on every --nbd listener. Clients connect with
  qemu-img info 'nbd+unix:///NAME?socket=PATH'      (or nbd://HOST:PORT/NAME)
  nbdinfo --list 'nbd+unix:///?socket=PATH'
The control API (JSON-RPC 2.0 on the --control socket, mode 0600; schema: rpc.discover)
adds and removes exports, reports statistics and changes QoS while it runs:
  vstor export list --server SOCK
  vstor export add d1 /srv/d1.vhdx --server SOCK
  vstor export stats d1 --server SOCK
SIGTERM or SIGINT (or `vstor server shutdown`) shuts down gracefully: requests in flight are
answered, every export is flushed and its files closed (their image locks released).

NBD over TCP listens on the address given (127.0.0.1 is loopback only). Without --tls-creds,
a TCP address that is not loopback is refused unless --insecure-tcp is given: plain NBD
carries the disk in clear text.

TLS: --tls-creds DIR reads DIR/ca-cert.pem, DIR/server-cert.pem and
DIR/server-key.pem (the layout of QEMU's tls-creds-x509 object, endpoint=server).
Every TCP listener then requires TLS (FORCEDTLS: a client must send STARTTLS before
any other option; one that does not is told that TLS is required). Unix listeners
stay plain (guarded by the file permissions of the socket and its directory) unless
--tls-unix is given. --tls-verify-peer also requires each client to present a
certificate signed by ca-cert.pem (qemu's verify-peer=on). A QEMU client takes a
directory with ca-cert.pem (and client-cert.pem, client-key.pem for verify-peer):
  qemu-img info --object tls-creds-x509,id=tls0,dir=CLIENTDIR,endpoint=client \
    --image-opts driver=nbd,host=HOST,port=PORT,export=NAME,tls-creds=tls0
The server certificate must name the host that clients connect to (qemu checks it
against host=..., or against tls-hostname=... on a Unix socket).

A VMM attaches an export over vhost-user-blk (its guest memory must be shared):
  vstor serve --export vm1=/srv/vm1.vhdx --vhost-user-blk vm1=/run/vm1.sock,queues=2
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \\
      -numa node,memdev=mem -chardev socket,id=c0,path=/run/vm1.sock \\
      -device vhost-user-blk-pci,chardev=c0,num-queues=2
An online resize (vstor export resize) reaches the guest as a configuration change; a
restarted daemon serves again the requests the old one left in flight (INFLIGHT_SHMFD).

iSCSI (--iscsi HOST:PORT, repeatable; 3260 is iSCSI's port): every export is a target
named iqn.2026-12.io.vstor:NAME (NAME in lower case, '_' as '-') with LUN 0, backed by a
SCSI block device with SCSI-3 persistent reservations. Export options for iSCSI:
  ,iqn=IQN               another target name
  ,shared=on             admit several initiators at once (a guest cluster's shared disk,
                         arbitrated with persistent reservations); without it one initiator
                         name at a time may log in (another gets 'service unavailable')
  ,initiators=IQN1+IQN2  only these initiator names may log in (and see it in discovery)
  vstor serve --iscsi 127.0.0.1:3260 \\
      --export quorum=/srv/q.vhdx,shared=on,initiators=iqn.2026-01.node:a+iqn.2026-01.node:b
  iscsi-ls iscsi://127.0.0.1:3260       qemu-img info iscsi://127.0.0.1:3260/IQN/0
Reservations persist in a file beside the disk: its first file with .vstor-pr appended
(/srv/q.vhdx.vstor-pr). Like NBD, an iSCSI portal that is not loopback is refused unless
--insecure-tcp is given (iSCSI carries the disk in clear text). --iscsi-chap FILE makes every
login (discovery too) use CHAP with MD5; FILE has one entry a line ('#' comments):
  initiator NAME SECRET   a CHAP name and secret initiators may answer with (repeatable)
  target NAME SECRET      what the target answers an initiator that asks for mutual CHAP
Secrets have at least 12 bytes (0x... for hexadecimal); keep the file mode 0600.

Example:
  vstor serve --control /run/vstor.sock --nbd unix:/run/vstor-nbd.sock \\
      --export d0=/srv/d0.vhdx --export base=/srv/base.vhdx,readonly=on")]
pub struct ServeArgs {
    /// The control API's Unix socket (created, mode 0600).
    #[arg(long, value_name = "SOCK")]
    control: Option<PathBuf>,
    /// An NBD listener: unix:PATH or tcp:HOST:PORT (repeatable).
    #[arg(long, value_name = "ADDR")]
    nbd: Vec<String>,
    /// An export: NAME=TARGET (any target; add ,readonly=on to refuse writes; for iSCSI
    /// ,shared=on ,iqn=IQN ,initiators=IQN1+IQN2). Repeatable.
    #[arg(long, value_name = "NAME=TARGET")]
    export: Vec<String>,
    /// Serve an export to a VMM over vhost-user-blk: NAME=SOCKET[,queues=N] (QEMU's
    /// vhost-user-blk-pci with shared guest memory, cloud-hypervisor's vhost_user disks).
    /// Repeatable.
    #[arg(long, value_name = "NAME=SOCKET[,queues=N]")]
    vhost_user_blk: Vec<String>,
    /// An iSCSI portal: HOST:PORT (repeatable). Every export is a target with LUN 0.
    #[arg(long, value_name = "HOST:PORT")]
    iscsi: Vec<String>,
    /// CHAP credentials for iSCSI logins (see below for the file's format).
    #[arg(long, value_name = "FILE")]
    iscsi_chap: Option<PathBuf>,
    /// Serve Prometheus metrics on HOST:PORT (GET /metrics).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Allow NBD over TCP without TLS, and iSCSI, on an address that is not loopback.
    #[arg(long)]
    insecure_tcp: bool,
    /// TLS for NBD: DIR holds ca-cert.pem, server-cert.pem, server-key.pem; TCP listeners
    /// then require TLS.
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<PathBuf>,
    /// Require a client certificate signed by DIR/ca-cert.pem (needs --tls-creds).
    #[arg(long, requires = "tls_creds")]
    tls_verify_peer: bool,
    /// Require TLS on Unix NBD listeners too (needs --tls-creds).
    #[arg(long, requires = "tls_creds")]
    tls_unix: bool,
    /// Worker threads per NBD connection (each submits a batch of the requests waiting).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// The most NBD connections at once.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
}

/// Drive a running `vstor serve` over its control API.
#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// List the exports.
    List(ListArgs),
    /// Open a target and serve it under a name.
    #[command(
        after_help = "Example:\n  vstor export add d1 /srv/d1.vhdx --server /run/vstor.sock"
    )]
    Add(AddArgs),
    /// Stop serving an export: clients are disconnected, it is flushed and closed.
    Remove(NameArgs),
    /// Statistics: requests, bytes, IOPS (raw and 8 KiB-normalized), bandwidth, latency.
    Stats(StatsArgs),
    /// Change an export's QoS limits (normalized 8 KiB IOPS; 0 removes a limit).
    SetQos(SetQosArgs),
    /// Resize an export online (its clients see the new size).
    Resize(ResizeArgs),
    /// Freeze a served VHDX: a new differencing child takes the writes.
    Checkpoint(CheckpointArgs),
    /// Merge a served VHDX's checkpoint back into its parent, online.
    Merge(NameArgs),
    /// Copy a point-in-time image of a served VHDX while it stays in use.
    Clone(CloneArgs),
    /// Move a served VHDX to a new file while it stays in use (storage live migration).
    #[command(
        after_help = "Example:\n  vstor export move vm1 /fast/vm1.vhdx --server /run/vstor.sock\n\n\
        The disk (its whole chain, flattened) is copied while clients keep writing; what they\n\
        write meanwhile is copied again, in passes, and a last time with I/O paused, and the\n\
        export switches to the new file (clients do not reconnect). Until the switch the old\n\
        file is the disk: a failure or a crash before it leaves everything as it was. After\n\
        it the old top image is deleted (--keep-source keeps it; parents of a chain are never\n\
        touched). Restart the daemon with the new path: the export serves DEST from now on."
    )]
    Move(MoveArgs),
}

/// The daemon itself.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Version, API version, listeners, uptime.
    Info(Common),
    /// Shut the daemon down gracefully.
    Shutdown(Common),
}

/// Options every API command takes.
#[derive(Debug, Args)]
pub struct Common {
    /// The daemon's control socket (its --control).
    #[arg(long, value_name = "SOCK")]
    server: PathBuf,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

/// `export list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    c: Common,
}

/// `export add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The export's name.
    name: String,
    /// The target (any target string).
    target: String,
    /// Refuse writes.
    #[arg(long)]
    readonly: bool,
    #[command(flatten)]
    c: Common,
}

/// Commands that take one export name.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// The export's name.
    name: String,
    #[command(flatten)]
    c: Common,
}

/// `export stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The export (default: all).
    name: Option<String>,
    #[command(flatten)]
    c: Common,
}

/// `export set-qos`.
#[derive(Debug, Args)]
pub struct SetQosArgs {
    /// The export's name.
    name: String,
    /// Cap in 8 KiB-normalized IOPS (0: none).
    #[arg(long)]
    max_iops: Option<u64>,
    /// Reservation in 8 KiB-normalized IOPS (0: none).
    #[arg(long)]
    min_iops: Option<u64>,
    #[command(flatten)]
    c: Common,
}

/// `export resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The export's name.
    name: String,
    /// The new size (4G, 512M, ...).
    #[arg(value_parser = super::size_arg)]
    size: u64,
    #[command(flatten)]
    c: Common,
}

/// `export checkpoint`.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// The export's name.
    name: String,
    /// Path of the new child (default: NAME_GUID.avhdx beside the image).
    #[arg(long)]
    child: Option<PathBuf>,
    #[command(flatten)]
    c: Common,
}

/// `export clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The export's name.
    name: String,
    /// Where to write the copy (a new VHDX).
    dest: PathBuf,
    #[command(flatten)]
    c: Common,
}

/// `export move`.
#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The export's name.
    name: String,
    /// The new file (a VHDX that must not exist yet; its directory must).
    dest: PathBuf,
    /// Keep the old top image after the switch (default: deleted).
    #[arg(long)]
    keep_source: bool,
    #[command(flatten)]
    c: Common,
}

/// Opens targets with the stack builder for the daemon: every export gets a QoS flow of the
/// daemon's one scheduler (with no limits unless the target sets some), so limits can change
/// while it runs, and a writable VHDX is opened live (checkpoint, merge, clone).
struct StackOpener {
    ctx: Mutex<StackContext>,
}

fn serve_err(e: Error) -> ServeError {
    ServeError::new(e.kind(), e.to_string())
}

impl Opener for StackOpener {
    fn open(&self, name: &str, target: &str, read_only: bool) -> Result<Opened, ServeError> {
        let mut spec: TargetSpec = target.parse().map_err(serve_err)?;
        let mut layer = spec.qos.take().unwrap_or_default();
        layer.name = Some(name.to_string());
        spec.qos = Some(layer);
        let defaults = TargetOptions {
            read_only: read_only.then_some(true),
            ..Default::default()
        };
        let mut ctx = self.ctx.lock().unwrap_or_else(|p| p.into_inner());
        let o = spec.open_in(&defaults, &mut ctx).map_err(serve_err)?;
        Ok(Opened {
            device: o.device,
            live: o.live,
            qos: o.qos.map(|h| QosControl {
                qos: h.qos,
                policy: h.policy,
                flow: h.flow,
            }),
            notes: o.notes,
            format: o.format.name().to_string(),
        })
    }
}

fn api_err(e: vstor_serve::jsonrpc::CallError) -> Error {
    let kind = vstor_serve::export::kind_of_name(&e.kind);
    Error::Reported {
        kind,
        message: e.message,
    }
}

/// A target string with its path made absolute: the daemon runs in its own working directory,
/// so a relative path must mean what it means here, where the operator typed it.
fn absolute_target(t: &str) -> String {
    let end = vstor_serve::export::first_field_end(t);
    let (base, rest) = t.split_at(end);
    let (prefix, path) = match base.split_once(':') {
        Some((p, path)) if ["raw", "vhdx", "vhd", "pool"].contains(&p) => (&base[..=p.len()], path),
        _ => ("", base),
    };
    let path = path.replace(",,", ",");
    match std::path::absolute(&path) {
        Ok(abs) if !path.is_empty() && Path::new(&path).is_relative() => format!(
            "{prefix}{}{rest}",
            abs.display().to_string().replace(',', ",,")
        ),
        _ => t.to_string(),
    }
}

/// A path argument made absolute (see [`absolute_target`]).
fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

fn call(c: &Common, method: &str, params: Value) -> Result<Value, Error> {
    let mut client = Client::connect(&c.server).map_err(|e| Error::Reported {
        kind: vstor::ErrorKind::Unavailable,
        message: format!(
            "cannot reach the daemon at {}: {e} (is `vstor serve --control {}` running?)",
            c.server.display(),
            c.server.display()
        ),
    })?;
    client.call(method, params).map_err(api_err)
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Runs `vstor serve` until SIGTERM, SIGINT or `server.shutdown`.
pub fn run_serve(a: ServeArgs) -> Result<(), Error> {
    let parse = |e: ServeError| Error::InvalidArgument(e.message);
    if a.nbd.is_empty() && a.control.is_none() && a.vhost_user_blk.is_empty() && a.iscsi.is_empty()
    {
        return Err(Error::InvalidArgument(
            "give at least one --nbd listener, --iscsi portal, --vhost-user-blk socket or a \
             --control socket (see --help)"
                .into(),
        ));
    }
    let chap = match &a.iscsi_chap {
        Some(p) => {
            Some(vstor_serve::iscsi::chap::ChapConfig::load(p).map_err(Error::InvalidArgument)?)
        }
        None => None,
    };
    let config = DaemonConfig {
        control: a.control,
        nbd: a
            .nbd
            .iter()
            .map(|s| s.parse::<NbdAddr>())
            .collect::<Result<_, _>>()
            .map_err(parse)?,
        exports: a
            .export
            .iter()
            .map(|s| s.parse::<ExportArg>())
            .collect::<Result<_, _>>()
            .map_err(parse)?,
        vhost_user_blk: a
            .vhost_user_blk
            .iter()
            .map(|s| s.parse::<VhostArg>())
            .collect::<Result<_, _>>()
            .map_err(parse)?,
        metrics: a.metrics,
        insecure_tcp: a.insecure_tcp,
        tls: a.tls_creds.map(|dir| vstor_serve::daemon::TlsConfig {
            creds_dir: dir,
            verify_peer: a.tls_verify_peer,
            on_unix: a.tls_unix,
        }),
        nbd_config: vstor_serve::nbd::NbdConfig {
            workers: a.workers.max(1),
            max_connections: a.max_connections.max(1),
            ..Default::default()
        },
        iscsi: a.iscsi,
        iscsi_config: vstor_serve::iscsi::IscsiConfig {
            chap,
            ..Default::default()
        },
    };
    let opener = Arc::new(StackOpener {
        ctx: Mutex::new(StackContext {
            live_vhdx: true,
            ..Default::default()
        }),
    });
    let started = std::time::Instant::now();
    let daemon = Daemon::start(config, opener).map_err(|e| Error::Reported {
        kind: e.kind,
        message: e.message,
    })?;
    daemon.handle_signals().map_err(|e| Error::Reported {
        kind: e.kind,
        message: e.message,
    })?;
    for e in daemon.registry().list() {
        eprintln!(
            "vstor serve: export '{}': {} ({} bytes{})",
            e.name,
            e.describe,
            e.size,
            if e.read_only { ", read-only" } else { "" }
        );
        for n in &e.notes {
            eprintln!("vstor serve: export '{}': note: {n}", e.name);
        }
    }
    eprintln!(
        "vstor serve: ready in {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    daemon.wait();
    let failed = daemon.shutdown();
    for (name, e) in &failed {
        eprintln!("vstor serve: export '{name}': {e}");
    }
    if failed.is_empty() {
        eprintln!("vstor serve: stopped; every export flushed and closed");
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "{} export(s) could not be flushed or closed",
            failed.len()
        )))
    }
}

fn show_list(v: &Value) {
    let Some(list) = v.as_array() else { return };
    if list.is_empty() {
        println!("no exports");
        return;
    }
    for e in list {
        let g = |k: &str| e.get(k).cloned().unwrap_or(Value::Null);
        println!(
            "{:<20} {:>14} bytes  {:<3} {:>2} client(s)  {}",
            g("name").as_str().unwrap_or(""),
            g("size"),
            if g("read_only").as_bool() == Some(true) {
                "ro"
            } else {
                "rw"
            },
            g("connections"),
            g("describe").as_str().unwrap_or("")
        );
    }
}

fn show_stats(s: &Value) {
    let f = |k: &str| s.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    // Counters and limits are whole numbers: printed as such, never through f64.
    let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
    let lat = |k: &str, p: &str| {
        s.pointer(&format!("/{k}/{p}"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    };
    println!(
        "export {}:",
        s.get("name").and_then(Value::as_str).unwrap_or("")
    );
    println!(
        "  requests: {} reads, {} writes, {} flushes, {} discards, {} write-zeroes, {} errors",
        n("reads"),
        n("writes"),
        n("flushes"),
        n("discards"),
        n("write_zeroes"),
        n("errors")
    );
    println!(
        "  bytes: {} read, {} written; {} in flight, {} client(s)",
        n("bytes_read"),
        n("bytes_written"),
        n("in_flight"),
        n("connections")
    );
    println!(
        "  last {:.1} s: {:.0} IOPS, {:.0} normalized IOPS (8 KiB), {:.1} MiB/s, latency p50 {:.0} us p99 {:.0} us",
        f("interval_s"),
        f("iops"),
        f("normalized_iops"),
        f("bandwidth") / 1048576.0,
        lat("latency", "p50_us"),
        lat("latency", "p99_us")
    );
    println!(
        "  QoS: max {} min {} (normalized IOPS, 0: none)",
        n("max_iops"),
        n("min_iops")
    );
}

/// Runs a `vstor export` command.
pub fn run_export(cmd: ExportCommand) -> Result<(), Error> {
    let (c, v) = match &cmd {
        ExportCommand::List(a) => (&a.c, call(&a.c, "export.list", json!({}))?),
        ExportCommand::Add(a) => (
            &a.c,
            call(
                &a.c,
                "export.add",
                json!({"name": a.name, "target": absolute_target(&a.target), "readonly": a.readonly}),
            )?,
        ),
        ExportCommand::Remove(a) => (&a.c, call(&a.c, "export.remove", json!({"name": a.name}))?),
        ExportCommand::Stats(a) => (
            &a.c,
            call(
                &a.c,
                "export.stats",
                match &a.name {
                    Some(n) => json!({"name": n}),
                    None => json!({}),
                },
            )?,
        ),
        ExportCommand::SetQos(a) => (
            &a.c,
            call(
                &a.c,
                "export.set-qos",
                json!({"name": a.name, "max_iops": a.max_iops, "min_iops": a.min_iops}),
            )?,
        ),
        ExportCommand::Resize(a) => (
            &a.c,
            call(
                &a.c,
                "export.resize",
                json!({"name": a.name, "size": a.size}),
            )?,
        ),
        ExportCommand::Checkpoint(a) => (
            &a.c,
            call(
                &a.c,
                "export.checkpoint",
                json!({"name": a.name, "child": a.child.as_deref().map(absolute)}),
            )?,
        ),
        ExportCommand::Merge(a) => (&a.c, call(&a.c, "export.merge", json!({"name": a.name}))?),
        ExportCommand::Clone(a) => (
            &a.c,
            call(
                &a.c,
                "export.clone",
                json!({"name": a.name, "dest": absolute(&a.dest)}),
            )?,
        ),
        ExportCommand::Move(a) => (
            &a.c,
            call(
                &a.c,
                "export.move",
                json!({"name": a.name, "dest": absolute(&a.dest), "keep_source": a.keep_source}),
            )?,
        ),
    };
    if c.json {
        print_json(&v);
        return Ok(());
    }
    match &cmd {
        ExportCommand::List(_) => show_list(&v),
        ExportCommand::Add(a) => {
            println!("added export '{}'", a.name);
            show_list(&Value::Array(vec![v]));
        }
        ExportCommand::Remove(a) => println!("removed export '{}' (flushed and closed)", a.name),
        ExportCommand::Stats(_) | ExportCommand::SetQos(_) => match &v {
            Value::Array(all) if all.is_empty() => println!("no exports"),
            Value::Array(all) => all.iter().for_each(show_stats),
            one => show_stats(one),
        },
        ExportCommand::Resize(a) => println!(
            "export '{}' is now {} bytes",
            a.name,
            v.get("size").cloned().unwrap_or(Value::Null)
        ),
        ExportCommand::Checkpoint(a) => println!(
            "export '{}': checkpoint taken; writes now go to {}",
            a.name,
            v.get("child").and_then(Value::as_str).unwrap_or("?")
        ),
        ExportCommand::Merge(a) => println!(
            "export '{}': merged back into {}",
            a.name,
            v.get("into").and_then(Value::as_str).unwrap_or("?")
        ),
        ExportCommand::Clone(a) => println!(
            "export '{}': cloned to {} ({} bytes written)",
            a.name,
            a.dest.display(),
            v.get("bytes").cloned().unwrap_or(Value::Null)
        ),
        ExportCommand::Move(a) => {
            println!(
                "export '{}': moved to {} ({} bytes written; I/O paused {:.1} ms)",
                a.name,
                a.dest.display(),
                v.get("bytes").cloned().unwrap_or(Value::Null),
                v.get("paused_ms").and_then(Value::as_f64).unwrap_or(0.0)
            );
            if let Some(d) = v.get("deleted").and_then(Value::as_str) {
                println!("deleted {d}");
            }
        }
    }
    Ok(())
}

/// Runs a `vstor server` command.
pub fn run_server(cmd: ServerCommand) -> Result<(), Error> {
    match cmd {
        ServerCommand::Info(c) => {
            let v = call(&c, "server.info", json!({}))?;
            print_json(&v);
        }
        ServerCommand::Shutdown(c) => {
            let v = call(&c, "server.shutdown", json!({}))?;
            if c.json {
                print_json(&v);
            } else {
                println!("shutting down");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::absolute_target;

    #[test]
    fn relative_target_paths_become_absolute_and_the_rest_is_kept() {
        let cwd = std::env::current_dir().unwrap().display().to_string();
        assert_eq!(absolute_target("d.vhdx"), format!("{cwd}/d.vhdx"));
        assert_eq!(
            absolute_target("raw:x/d.img,readonly=on"),
            format!("raw:{cwd}/x/d.img,readonly=on")
        );
        assert_eq!(
            absolute_target("pool:p/s,max-iops=5"),
            format!("pool:{cwd}/p/s,max-iops=5")
        );
        assert_eq!(
            absolute_target("a,,b.raw,direct=on"),
            format!("{cwd}/a,,b.raw,direct=on")
        );
        assert_eq!(
            absolute_target("/abs/d.vhdx,readonly=on"),
            "/abs/d.vhdx,readonly=on"
        );
        assert_eq!(absolute_target("vhdx:/abs/d"), "vhdx:/abs/d");
    }
}
