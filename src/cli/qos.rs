//! `vstor qos ...`: storage QoS from the command line.

use super::{progress_bar, size_arg};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use vstor::{Error, TargetOptions};
use vstor_core::{AlignedBuf, BlockDevice, Engine, Request};
use vstor_qos::{
    FlowReport, FlowStats, FlowStatus, LatencyHistogram, Limits, Normalization, PolicyId,
    PolicyKind, Qos, QosConfig,
};

#[derive(Debug, Subcommand)]
pub enum QosCommand {
    /// Drive flows with QoS policies against their targets and report each flow, like
    /// Get-StorageQosFlow.
    #[command(after_help = "\
Each --flow is TARGET[,TARGET-OPTIONS][,max=N][,min=M][,weight=W][,burst=B][,bw=SIZE]
[,name=NAME][,group=GROUP]: IOPS in normalized units (8 KiB by default: a 4 KiB or 8 KiB I/O
costs 1, 64 KiB costs 8), 0 meaning unset; bw= caps bytes per second. Flows with the same
group= share one aggregated policy given by --group GROUP,max=N[,min=M][,burst=B][,bw=SIZE].
All flows share one scheduler, which keeps at most --device-depth requests in flight.

Examples:
  vstor qos run --flow d.raw,max=1000 --seconds 10
  vstor qos run --flow a.raw,min=2000,name=gold --flow b.raw,max=500,name=bronze --seconds 5 --json
  vstor qos run --flow d.raw --flow d.raw,weight=300 --device-depth 8 --rw mixed --seconds 5
  vstor qos run --flow a.raw,group=t1 --flow b.raw,group=t1 --group t1,max=2000 --seconds 5")]
    Run(RunArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes, half each.
    Mixed,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A flow: TARGET with its QoS policy after commas (see below). Repeat for more flows.
    #[arg(long = "flow", required = true)]
    flows: Vec<String>,
    /// An aggregated policy shared by the flows that name it: NAME,max=N[,min=M][,burst=B][,bw=SIZE].
    #[arg(long = "group")]
    groups: Vec<String>,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Requests in flight per flow (the batch size).
    #[arg(short = 'd', long, default_value_t = 32)]
    depth: usize,
    /// Bytes per request.
    #[arg(short = 's', long, value_parser = size_arg, default_value = "4k")]
    size: u64,
    /// Workload.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// The most requests the scheduler keeps in flight on the backing storage, all flows
    /// together (0: no bound, so only maximums take effect).
    #[arg(long, default_value_t = 32)]
    device_depth: usize,
    /// Normalization unit.
    #[arg(long, value_parser = size_arg, default_value = "8k")]
    unit: u64,
    /// Run the same workload without the QoS layer (for comparison).
    #[arg(long)]
    bypass: bool,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
    /// I/O engine of file targets: auto, io_uring or sync.
    #[arg(long, default_value = "auto")]
    engine: String,
    /// Seed of the random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: QosCommand) -> Result<(), Error> {
    match cmd {
        QosCommand::Run(a) => run_cmd(a),
    }
}

/// A flow as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FlowArg {
    target: String,
    name: String,
    limits: Limits,
    weight: u64,
    group: Option<String>,
}

/// Splits at single commas; `,,` is a literal comma (as in target strings).
fn split_commas(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let last = parts.last_mut().expect("never empty");
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                last.push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            last.push(c);
        }
    }
    parts
}

fn number(input: &str, key: &str, v: &str) -> Result<u64, Error> {
    v.parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "invalid flow '{input}': {key}={v} is not a whole number"
        ))
    })
}

/// Takes the QoS keys out of `parts`, leaving the others (target options).
fn take_limits(
    input: &str,
    parts: &mut Vec<String>,
) -> Result<(Limits, HashMap<String, String>), Error> {
    let mut limits = Limits::default();
    let mut other = HashMap::new();
    let mut rest = Vec::new();
    for p in parts.drain(..) {
        match p.split_once('=') {
            Some(("max", v)) => limits.max_iops = number(input, "max", v)?,
            Some(("min", v)) => limits.min_iops = number(input, "min", v)?,
            Some(("burst", v)) => limits.burst = number(input, "burst", v)?,
            Some(("bw", v)) => {
                limits.max_bandwidth = vstor::parse_size(v).map_err(|e| {
                    Error::InvalidArgument(format!("invalid flow '{input}': bw={v}: {e}"))
                })?
            }
            Some((k @ ("weight" | "name" | "group"), v)) => {
                other.insert(k.to_string(), v.to_string());
            }
            _ => rest.push(p),
        }
    }
    *parts = rest;
    limits
        .validate()
        .map_err(|e| Error::InvalidArgument(format!("invalid flow '{input}': {e}")))?;
    Ok((limits, other))
}

fn parse_flow(input: &str, index: usize) -> Result<FlowArg, Error> {
    let mut parts = split_commas(input);
    let (limits, other) = take_limits(input, &mut parts)?;
    let weight = match other.get("weight") {
        Some(v) => number(input, "weight", v)?,
        None => 0,
    };
    if weight > vstor_qos::MAX_WEIGHT {
        return Err(Error::InvalidArgument(format!(
            "invalid flow '{input}': weight {weight} is above {}",
            vstor_qos::MAX_WEIGHT
        )));
    }
    let group = other.get("group").cloned();
    if group.is_some() && limits != Limits::default() {
        return Err(Error::InvalidArgument(format!(
            "invalid flow '{input}': a flow in a group takes its limits from --group"
        )));
    }
    // The target keeps its own options; commas in its path stay escaped.
    let mut target = parts
        .first()
        .map(|p| p.replace(',', ",,"))
        .unwrap_or_default();
    for p in parts.iter().skip(1) {
        target.push(',');
        target.push_str(p);
    }
    if target.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "invalid flow '{input}': no target"
        )));
    }
    let name = other
        .get("name")
        .cloned()
        .unwrap_or_else(|| format!("flow{index}"));
    Ok(FlowArg {
        target,
        name,
        limits,
        weight,
        group,
    })
}

fn parse_group(input: &str) -> Result<(String, Limits), Error> {
    let mut parts = split_commas(input);
    let name = parts.remove(0);
    let (limits, other) = take_limits(input, &mut parts)?;
    if name.is_empty() || !parts.is_empty() || !other.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "invalid group '{input}': expected NAME,max=N[,min=M][,burst=B][,bw=SIZE]"
        )));
    }
    Ok((name, limits))
}

/// One flow's result.
#[derive(Debug, Serialize)]
struct FlowResult {
    name: String,
    target: String,
    group: Option<String>,
    min_iops: u64,
    max_iops: u64,
    burst: u64,
    max_bandwidth: u64,
    weight: u64,
    status: String,
    seconds: f64,
    requests: u64,
    units: u64,
    normalized_iops: f64,
    iops: f64,
    bytes_per_second: f64,
    mib_per_second: f64,
    avg_latency_us: f64,
    p99_latency_us: f64,
    /// Normalized IOPS over the maximum, when there is one.
    achieved_over_max: Option<f64>,
}

#[derive(Debug, Serialize)]
struct RunResult {
    qos: bool,
    seconds: f64,
    depth: usize,
    size: u64,
    rw: Rw,
    device_depth: usize,
    unit: u64,
    flows: Vec<FlowResult>,
    events: Vec<String>,
}

/// Counters of a flow run without the QoS layer, kept by its own thread.
struct BareCounters {
    requests: u64,
    units: u64,
    bytes: u64,
    latency: LatencyHistogram,
}

/// A flow's counters at the start and at the end of its run.
struct Measured {
    before: FlowStats,
    after: FlowStats,
    bare: Option<BareCounters>,
}

struct Worker {
    dev: Arc<dyn BlockDevice>,
    slots: u64,
    seed: u64,
}

fn run_cmd(a: RunArgs) -> Result<(), Error> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if !(a.seconds > 0.0 && a.seconds <= 86_400.0) {
        return bad(format!(
            "--seconds {} is out of range (0 to 86400)",
            a.seconds
        ));
    }
    if a.depth == 0 || a.depth > 4096 {
        return bad(format!("--depth {} is out of range (1 to 4096)", a.depth));
    }
    if a.size == 0 || a.size % 512 != 0 || a.size > 64 << 20 {
        return bad(format!(
            "--size {} must be a multiple of 512 bytes up to 64 MiB",
            a.size
        ));
    }
    let engine: Engine = a
        .engine
        .parse()
        .map_err(|e: vstor_core::Error| Error::InvalidArgument(e.to_string()))?;
    let normalization =
        Normalization::new(a.unit).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let flows: Vec<FlowArg> = a
        .flows
        .iter()
        .enumerate()
        .map(|(i, f)| parse_flow(f, i))
        .collect::<Result<_, _>>()?;
    let mut groups: HashMap<String, Limits> = HashMap::new();
    for g in &a.groups {
        let (name, limits) = parse_group(g)?;
        if groups.insert(name.clone(), limits).is_some() {
            return bad(format!("group '{name}' is given twice"));
        }
    }
    for f in &flows {
        if let Some(g) = &f.group {
            if !groups.contains_key(g) {
                return bad(format!(
                    "flow '{}' names group '{g}', which no --group gives",
                    f.name
                ));
            }
        }
    }

    let qos = Qos::new(QosConfig {
        max_in_flight: a.device_depth,
        normalization,
        ..Default::default()
    });
    let events = Arc::new(Mutex::new(Vec::new()));
    {
        let events = events.clone();
        qos.subscribe(move |e| {
            eprintln!("{e}");
            events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.to_string());
        });
    }
    let mut group_ids: HashMap<String, PolicyId> = HashMap::new();
    let mut names: Vec<&str> = groups.keys().map(String::as_str).collect();
    names.sort();
    for name in names {
        let id = qos
            .add_policy(name, PolicyKind::Aggregated, groups[name])
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        group_ids.insert(name.to_string(), id);
    }

    let defaults = TargetOptions {
        read_only: Some(a.rw == Rw::Randread),
        direct: Some(a.direct),
        engine: Some(engine),
        ..Default::default()
    };
    let mut workers = Vec::new();
    let mut notes = Vec::new();
    let mut opened_paths = std::collections::HashSet::new();
    let mut ctx = vstor::StackContext {
        qos: Some(qos.clone()),
        ..Default::default()
    };
    for (i, f) in flows.iter().enumerate() {
        let policy = match &f.group {
            Some(g) => group_ids[g],
            None => qos
                .add_policy(&f.name, PolicyKind::Dedicated, f.limits)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?,
        };
        // The stack builder puts the QoS layer on, as a flow of this run's scheduler; with
        // --bypass the flow only counts (it is added here and the stack has no QoS layer).
        let mut spec: vstor::TargetSpec = f.target.parse()?;
        if a.bypass {
            qos.add_flow(&f.name, Some(policy), f.weight)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            spec.qos = None;
        } else {
            spec.qos = Some(vstor::QosLayer {
                policy: Some(policy),
                weight: f.weight,
                name: Some(f.name.clone()),
                ..Default::default()
            });
        }
        // Two flows on one file are two opens of it in this process: the first holds the
        // image lock for both. One file is known by its device and inode, whatever the
        // spelling (d.raw, ./d.raw, a link): a path compared as text would make the second
        // open conflict with the first.
        let file_id = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(spec.path())
                .map(|m| Ok((m.dev(), m.ino())))
                .unwrap_or_else(|_| Err(spec.path().to_path_buf()))
        };
        let first_open = opened_paths.insert(file_id);
        let defaults = TargetOptions {
            locking: if first_open { None } else { Some(false) },
            ..defaults.clone()
        };
        let opened = spec.open_in(&defaults, &mut ctx)?;
        notes.extend(opened.notes);
        let info = opened.device.info();
        if a.rw != Rw::Randread && info.read_only {
            return bad(format!("{}: cannot write to a read-only target", f.target));
        }
        if a.size % u64::from(info.logical_sector_size.max(1)) != 0 || info.capacity < a.size {
            return bad(format!(
                "{}: --size {} does not fit the target ({} bytes, {}-byte sectors)",
                f.target, a.size, info.capacity, info.logical_sector_size
            ));
        }
        let dev = opened.device;
        workers.push(Worker {
            dev,
            slots: info.capacity / a.size,
            seed: a.seed.wrapping_add(i as u64 * 0x9e37_79b9),
        });
    }
    for n in notes {
        eprintln!("note: {n}");
    }

    let flow_ids: Vec<_> = qos.all_stats().into_iter().map(|s| s.flow).collect();
    let duration = Duration::from_secs_f64(a.seconds);
    let barrier = Barrier::new(workers.len() + 1);
    let pb = progress_bar((a.seconds * 10.0).ceil() as u64, "qos run");
    let results: Vec<Result<Measured, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let (qos, barrier, flow) = (&qos, &barrier, flow_ids[i]);
                let (size, depth, rw, bypass) = (a.size, a.depth, a.rw, a.bypass);
                s.spawn(move || drive(w, qos, flow, barrier, duration, size, depth, rw, bypass))
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
            pb.set_position((start.elapsed().as_secs_f64() * 10.0) as u64);
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Failed("a flow's thread panicked".into())))
            })
            .collect()
    });
    pb.finish_and_clear();
    qos.poll();

    let mut out = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let Measured {
            before,
            after,
            bare,
        } = r?;
        let f = &flows[i];
        let after = match bare {
            None => after,
            Some(c) => FlowStats {
                requests: c.requests,
                units: c.units,
                bytes: c.bytes,
                latency: c.latency,
                ..after
            },
        };
        let rep = FlowReport::between(&before, &after);
        let limits = rep.limits;
        out.push(FlowResult {
            name: f.name.clone(),
            target: f.target.clone(),
            group: f.group.clone(),
            min_iops: limits.min_iops,
            max_iops: limits.max_iops,
            burst: limits.effective_burst(),
            max_bandwidth: limits.max_bandwidth,
            weight: after.weight,
            status: if a.bypass {
                "Bypassed".to_string()
            } else {
                rep.status.to_string()
            },
            seconds: rep.interval.as_secs_f64(),
            requests: rep.requests,
            units: rep.units,
            normalized_iops: rep.normalized_iops,
            iops: rep.iops,
            bytes_per_second: rep.bandwidth,
            mib_per_second: rep.bandwidth / f64::from(1 << 20),
            avg_latency_us: rep.avg_latency.as_secs_f64() * 1e6,
            p99_latency_us: rep.p99_latency.as_secs_f64() * 1e6,
            achieved_over_max: (limits.max_iops > 0)
                .then(|| rep.normalized_iops / limits.max_iops as f64),
        });
    }
    let result = RunResult {
        qos: !a.bypass,
        seconds: a.seconds,
        depth: a.depth,
        size: a.size,
        rw: a.rw,
        device_depth: a.device_depth,
        unit: a.unit,
        flows: out,
        events: events.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).expect("serializable")
        );
    } else {
        print_table(&result);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn drive(
    w: &Worker,
    qos: &Qos,
    flow: vstor_qos::FlowId,
    barrier: &Barrier,
    duration: Duration,
    size: u64,
    depth: usize,
    rw: Rw,
    bypass: bool,
) -> Result<Measured, Error> {
    let info = w.dev.info();
    let align = (info.mem_alignment as usize).max(4096);
    let len = usize::try_from(size).unwrap_or(usize::MAX);
    let mut bufs: Vec<AlignedBuf> = (0..depth)
        .map(|_| {
            let mut b = AlignedBuf::with_alignment(len, align);
            b.fill(0x5a);
            b
        })
        .collect();
    let mut rng = fastrand::Rng::with_seed(w.seed);
    let norm = qos.normalization();
    let mut bare = BareCounters {
        requests: 0,
        units: 0,
        bytes: 0,
        latency: LatencyHistogram::new(),
    };
    let mut offsets: Vec<(u64, bool)> = Vec::with_capacity(depth);
    let stats = || {
        qos.flow_stats(flow)
            .map_err(|e| Error::InvalidArgument(e.to_string()))
    };
    barrier.wait();
    let before = stats()?;
    let start = Instant::now();
    while start.elapsed() < duration {
        offsets.clear();
        for _ in 0..depth {
            let write = match rw {
                Rw::Randread => false,
                Rw::Randwrite => true,
                Rw::Mixed => rng.bool(),
            };
            offsets.push((rng.u64(0..w.slots) * size, write));
        }
        let t = Instant::now();
        let mut batch: Vec<Request<'_>> = bufs
            .iter_mut()
            .zip(&offsets)
            .map(|(b, &(o, write))| {
                if write {
                    Request::write(o, b)
                } else {
                    Request::read(o, b)
                }
            })
            .collect();
        w.dev.submit(&mut batch);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        for r in &batch {
            r.result()
                .map_err(|e| Error::Failed(format!("failed request: {e}")))?;
        }
        if bypass {
            bare.requests += depth as u64;
            bare.units += depth as u64 * norm.units(size);
            bare.bytes += depth as u64 * size;
            bare.latency.record_n(ns, depth as u64);
        }
    }
    Ok(Measured {
        before,
        after: stats()?,
        bare: bypass.then_some(bare),
    })
}

fn fmt_limit(v: u64) -> String {
    if v == 0 {
        "-".to_string()
    } else {
        v.to_string()
    }
}

fn print_table(r: &RunResult) {
    let header = [
        "Flow",
        "Target",
        "Min",
        "Max",
        "Weight",
        "Status",
        "NormIOPS",
        "IOPS",
        "MiB/s",
        "AvgLat(us)",
        "P99Lat(us)",
        "Max%",
    ];
    let rows: Vec<[String; 12]> = r
        .flows
        .iter()
        .map(|f| {
            [
                f.name.clone(),
                f.target.clone(),
                fmt_limit(f.min_iops),
                fmt_limit(f.max_iops),
                f.weight.to_string(),
                f.status.clone(),
                format!("{:.0}", f.normalized_iops),
                format!("{:.0}", f.iops),
                format!("{:.1}", f.mib_per_second),
                format!("{:.0}", f.avg_latency_us),
                format!("{:.0}", f.p99_latency_us),
                f.achieved_over_max
                    .map(|x| format!("{:.1}", x * 100.0))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < 2 || i == 5 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    println!(
        "{} for {:.1} s: {:?}, {} B requests, depth {} per flow, {} in flight on the device, {} B units",
        if r.qos { "QoS" } else { "No QoS (bypass)" },
        r.seconds,
        r.rw,
        r.size,
        r.depth,
        if r.device_depth == 0 {
            "no bound".to_string()
        } else {
            r.device_depth.to_string()
        },
        r.unit
    );
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    let short = r
        .flows
        .iter()
        .filter(|f| f.status == FlowStatus::InsufficientThroughput.to_string())
        .count();
    if short > 0 {
        println!("{short} flow(s) did not get their minimum (InsufficientThroughput)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_parse_with_their_target_options() {
        let f = parse_flow(
            "a,,b.raw,max=1000,min=200,weight=5,burst=50,bw=1M,direct=on,name=gold",
            0,
        )
        .unwrap();
        assert_eq!(f.target, "a,,b.raw,direct=on");
        assert_eq!(f.name, "gold");
        assert_eq!(f.weight, 5);
        assert_eq!(
            f.limits,
            Limits {
                min_iops: 200,
                max_iops: 1000,
                burst: 50,
                max_bandwidth: 1 << 20
            }
        );
        let f = parse_flow("d.raw", 3).unwrap();
        assert_eq!((f.target.as_str(), f.name.as_str()), ("d.raw", "flow3"));
        assert_eq!(f.limits, Limits::default());
        let f = parse_flow("d.raw,group=t1", 0).unwrap();
        assert_eq!(f.group.as_deref(), Some("t1"));
    }

    #[test]
    fn bad_flows_are_named() {
        for bad in [
            "d.raw,max=ten",
            "d.raw,min=100,max=10",
            "d.raw,weight=99999999",
            "d.raw,group=g,max=5",
            "max=5",
            "d.raw,bw=lots",
        ] {
            assert!(parse_flow(bad, 0).is_err(), "{bad}");
        }
        assert_eq!(
            parse_group("t1,max=100,min=10").unwrap(),
            (
                "t1".to_string(),
                Limits {
                    min_iops: 10,
                    max_iops: 100,
                    ..Default::default()
                }
            )
        );
        for bad in ["", "t1,weight=3", "t1,x=1", "t1,min=5,max=1"] {
            assert!(parse_group(bad).is_err(), "{bad}");
        }
    }
}
