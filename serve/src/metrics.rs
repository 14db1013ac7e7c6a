//! The Prometheus text endpoint (`--metrics ADDR`): `GET /metrics` over plain HTTP, one
//! series per export, as storage daemons are watched.

use crate::registry::Registry;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The exposition text of every export's statistics.
pub fn render(registry: &Registry) -> String {
    let stats: Vec<_> = registry.exports().iter().map(|e| e.stats()).collect();
    let mut out = String::new();
    let mut series =
        |name: &str, kind: &str, help: &str, value: &dyn Fn(&crate::export::ExportStats) -> f64| {
            let _ = writeln!(out, "# HELP vstor_export_{name} {help}");
            let _ = writeln!(out, "# TYPE vstor_export_{name} {kind}");
            for s in &stats {
                let _ = writeln!(
                    out,
                    "vstor_export_{name}{{export=\"{}\"}} {}",
                    s.name,
                    value(s)
                );
            }
        };
    series(
        "size_bytes",
        "gauge",
        "Size of the export in bytes.",
        &|s| s.size as f64,
    );
    series("reads_total", "counter", "Read requests.", &|s| {
        s.reads as f64
    });
    series("writes_total", "counter", "Write requests.", &|s| {
        s.writes as f64
    });
    series("flushes_total", "counter", "Flush requests.", &|s| {
        s.flushes as f64
    });
    series(
        "discards_total",
        "counter",
        "Discard (trim) requests.",
        &|s| s.discards as f64,
    );
    series(
        "write_zeroes_total",
        "counter",
        "Write-zeroes requests.",
        &|s| s.write_zeroes as f64,
    );
    series("read_bytes_total", "counter", "Bytes read.", &|s| {
        s.bytes_read as f64
    });
    series("written_bytes_total", "counter", "Bytes written.", &|s| {
        s.bytes_written as f64
    });
    series(
        "errors_total",
        "counter",
        "Requests answered with an error.",
        &|s| s.errors as f64,
    );
    series("in_flight", "gauge", "Requests in flight.", &|s| {
        s.in_flight as f64
    });
    series("connections", "gauge", "Connected clients.", &|s| {
        s.connections as f64
    });
    series(
        "iops",
        "gauge",
        "Requests per second over the last second.",
        &|s| s.iops,
    );
    series(
        "normalized_iops",
        "gauge",
        "8 KiB-normalized requests per second over the last second.",
        &|s| s.normalized_iops,
    );
    series(
        "bandwidth_bytes",
        "gauge",
        "Bytes per second over the last second.",
        &|s| s.bandwidth,
    );
    series(
        "latency_p50_seconds",
        "gauge",
        "Median latency over the last second.",
        &|s| s.latency.p50_us / 1e6,
    );
    series(
        "latency_p99_seconds",
        "gauge",
        "99th percentile latency over the last second.",
        &|s| s.latency.p99_us / 1e6,
    );
    series(
        "qos_max_iops",
        "gauge",
        "QoS cap in normalized IOPS (0: none).",
        &|s| s.max_iops as f64,
    );
    series(
        "qos_min_iops",
        "gauge",
        "QoS reservation in normalized IOPS (0: none).",
        &|s| s.min_iops as f64,
    );
    out
}

/// Serves `GET /metrics` on `listener` until `stop` is set.
pub fn listen(
    registry: Arc<Registry>,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for s in listener.incoming() {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let Ok(mut s) = s else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let Ok(r) = s.try_clone() else { continue };
                let mut r = BufReader::new(io::Read::take(r, 16 << 10));
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                // Skip the headers.
                let mut h = String::new();
                while r.read_line(&mut h).is_ok_and(|n| n > 2) {
                    h.clear();
                }
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if line.starts_with("GET ") && (path == "/metrics" || path == "/") {
                    ("200 OK", render(&registry))
                } else {
                    ("404 Not Found", "only GET /metrics is served here\n".to_string())
                };
                let _ = write!(
                    s,
                    "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
}
