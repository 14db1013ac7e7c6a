//! vstor's vhost-user-blk backend as a process of its own under QEMU (issue 16):
//!
//! - killed with SIGKILL while the guest writes, and started again on the same socket: QEMU
//!   reconnects (`reconnect=1`), the new backend serves again what the dead one left in flight
//!   (INFLIGHT_SHMFD), and the guest goes on without an I/O error; every block it wrote is in
//!   the image;
//! - the CPU time per request of the backend process against qemu-storage-daemon's
//!   vhost-user-blk export of the same VHDX, for the same guest workload (ignored in a normal
//!   run: `cargo test --release -p vstor-serve --test vhost_user_restart -- --ignored
//!   --nocapture bench_`).
//!
//! The backend process is this test binary run again as its `backend_process` helper (with
//! [`ENV`] set).

mod vhost_user_common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost_user_common::{guest, VhdxOpener, Vm, MIB};
use vstor_core::BlockDevice;
use vstor_serve::export::ServeError;
use vstor_serve::{Opened, Opener, Registry};
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

/// `IMAGE,SOCKET,QUEUES,LATENCY_MS` for the backend process.
const ENV: &str = "VSTOR_VU_BACKEND";

/// The backend as a process of its own, for the tests here that kill it and measure its CPU
/// time (they run this binary again with `--ignored --exact backend_process` and [`ENV`] set).
/// It serves until its standard input closes, then prints the export's statistics. Run without
/// [`ENV`] it says so and serves nothing.
#[test]
#[ignore = "the backend process of the other tests here (needs VSTOR_VU_BACKEND)"]
fn backend_process() {
    let Ok(spec) = std::env::var(ENV) else {
        println!("backend_process: a helper process of this file's tests; {ENV} is not set");
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let [image, socket, queues, latency] = parts[..] else {
        panic!("{ENV}={spec}: IMAGE,SOCKET,QUEUES,LATENCY_MS expected");
    };
    let registry = Registry::new(Arc::new(SlowOpener(Duration::from_millis(
        latency.parse().unwrap(),
    ))));
    let export = registry.add("disk", image, false).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = vstor_serve::vhost_user::serve(
        export.clone(),
        Path::new(socket),
        queues.parse().unwrap(),
        stop.clone(),
    )
    .unwrap();
    println!("VSTOR-BACKEND: ready {}", std::process::id());
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    stop.store(true, std::sync::atomic::Ordering::Release);
    thread.join().unwrap();
    let s = export.stats();
    println!(
        "VSTOR-BACKEND: stats reads={} writes={} flushes={} errors={}",
        s.reads, s.writes, s.flushes, s.errors
    );
}

/// Opens a VHDX as [`VhdxOpener`] does, behind [`Slow`] when the latency is not zero.
struct SlowOpener(Duration);

impl Opener for SlowOpener {
    fn open(&self, name: &str, target: &str, read_only: bool) -> Result<Opened, ServeError> {
        let mut o = VhdxOpener.open(name, target, read_only)?;
        if !self.0.is_zero() {
            o.device = Arc::new(Slow {
                inner: o.device,
                latency: self.0,
            });
        }
        Ok(o)
    }
}

/// A device that says on standard output that it took a batch with a write in it ("VSTOR-BACKEND:
/// busy"), then waits its latency before passing it on: a backend killed after that line dies
/// with requests in flight.
struct Slow {
    inner: Arc<dyn BlockDevice>,
    latency: Duration,
}

impl BlockDevice for Slow {
    fn info(&self) -> vstor_core::DeviceInfo {
        self.inner.info()
    }

    fn submit(&self, batch: &mut [vstor_core::Request<'_>]) {
        if batch.iter().any(|r| r.kind() == vstor_core::OpKind::Write) {
            println!("VSTOR-BACKEND: busy");
        }
        std::thread::sleep(self.latency);
        self.inner.submit(batch)
    }
}

/// A backend process.
struct BackendProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl BackendProcess {
    fn spawn(image: &Path, socket: &Path, queues: usize, latency_ms: u64) -> BackendProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "backend_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                ENV,
                format!(
                    "{},{},{queues},{latency_ms}",
                    image.display(),
                    socket.display()
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                println!("backend: {l}");
                let _ = tx2.send(l);
            }
        });
        let stdin = child.stdin.take();
        let p = BackendProcess {
            child,
            stdin,
            lines,
        };
        p.wait_for("VSTOR-BACKEND: ready");
        p
    }

    fn wait_for(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                // libtest may print "test backend_process ... " before it on the same line.
                Ok(l) if l.contains(prefix) => return l[l.find(prefix).unwrap()..].to_string(),
                Ok(_) => {}
                Err(e) => panic!("the backend process never said '{prefix}': {e}"),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it (its standard input closes); returns what it printed since the last line read,
    /// its statistics line last.
    fn stop(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let mut lines = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if l.contains("VSTOR-BACKEND: stats") => {
                    lines.push(l[l.find("VSTOR-BACKEND: stats").unwrap()..].to_string());
                    break;
                }
                Ok(l) => lines.push(l),
                Err(e) => panic!("the backend process printed no statistics: {e}"),
            }
        }
        assert!(self.child.wait().unwrap().success());
        lines
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// The 4 KiB block the guest writes at block `i`.
fn block(i: u64) -> Vec<u8> {
    format!("vstor-block-{i:06}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(4096)
        .collect()
}

/// Four guest writers, each over its own range of blocks, then a read-back of all of them;
/// the backend process is killed and started again while they write.
#[test]
fn the_backend_killed_and_restarted_under_guest_writes_loses_nothing() {
    let test = "the_backend_killed_and_restarted_under_guest_writes_loses_nothing";
    let Some(g) = guest(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.vhdx");
    drop(Vhdx::create(&image, &CreateOptions::dynamic(256 * MIB)).unwrap());
    let socket = dir.path().join("vu.sock");
    // The first backend takes 50 ms over each batch, and is killed in the middle of one.
    let first = BackendProcess::spawn(&image, &socket, 1, 50);
    const PER: u64 = 100;
    let script = format!(
        r#"
writer() {{
  i=$1
  while [ $i -lt $(($1 + {PER})) ]; do
    yes "$(printf 'vstor-block-%06d' $i)" | head -c 4096 >/tmp/w$1
    dd if=/tmp/w$1 of=/dev/vda bs=4096 seek=$i oflag=direct conv=fsync 2>/dev/null || fail "writing block $i"
    [ $((i % 10)) = 0 ] && say "progress $i"
    i=$((i + 1))
  done
}}
for w in 0 1 2 3; do writer $((w * {PER})) & done
wait
say "written"
i=0
while [ $i -lt $((4 * {PER})) ]; do
  yes "$(printf 'vstor-block-%06d' $i)" | head -c 4096 >/tmp/want
  dd if=/dev/vda of=/tmp/got bs=4096 skip=$i count=1 iflag=direct 2>/dev/null || fail "reading block $i"
  cmp /tmp/want /tmp/got >/dev/null || fail "block $i differs: $(head -c 19 /tmp/got | od -c | head -2 | tr -s " " | tr "\\n" " ")"
  i=$((i + 1))
done
say "verified $((4 * {PER}))"
"#
    );
    let mut vm = Vm::boot(&g, dir.path(), &socket, 1, 1, true, &script);
    // Well into the writing, the backend dies while it holds writes; a new one comes up on
    // the same socket.
    vm.expect("progress 30");
    while first.lines.try_recv().is_ok() {}
    first.wait_for("VSTOR-BACKEND: busy");
    first.kill();
    let killed = Instant::now();
    let second = BackendProcess::spawn(&image, &socket, 1, 0);
    println!("backend restarted in {:?}", killed.elapsed());
    vm.expect("written");
    let lines = vm.finish();
    assert!(
        lines.contains(&format!("verified {}", 4 * PER)),
        "{lines:?}"
    );
    let said = second.stop();
    println!("second backend: {}", said.last().unwrap());
    assert!(
        said.iter()
            .any(|l| l.contains("serving again") && l.contains("left in flight")),
        "the second backend served again what the first left in flight: {said:?}"
    );
    let disk = Vhdx::open(&image, &OpenOptions::read_only()).unwrap();
    for i in 0..4 * PER {
        let mut got = vec![0u8; 4096];
        disk.read_at(i * 4096, &mut got).unwrap();
        assert!(got == block(i), "block {i} in the image");
    }
}

/// utime + stime of a process, in clock ticks (threads that ended included).
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted after the command name (field 3 is f[0]).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> u64 {
    let o = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

/// The guest workload of the CPU benchmark: `jobs` writers, then `jobs` readers, each over its
/// own `per_job` 4 KiB blocks with O_DIRECT (one request per block).
fn bench_script(jobs: u64, per_job: u64) -> String {
    format!(
        r#"
say "bench start"
for j in $(seq 0 $(({jobs} - 1))); do
  dd if=/dev/zero of=/dev/vda bs=4096 seek=$((j * {per_job})) count={per_job} oflag=direct 2>/dev/null || fail "writer $j" &
done
wait
for j in $(seq 0 $(({jobs} - 1))); do
  dd if=/dev/vda of=/dev/null bs=4096 skip=$((j * {per_job})) count={per_job} iflag=direct 2>/dev/null || fail "reader $j" &
done
wait
say "bench end"
"#
    )
}

/// Runs the benchmark workload against the backend process `pid` listening on `socket`;
/// returns (CPU seconds of the backend during the workload, wall seconds).
fn bench_run(
    g: &vhost_user_common::Guest,
    dir: &Path,
    socket: &Path,
    pid: u32,
    script: &str,
) -> (f64, f64) {
    let hz = clock_ticks_per_second() as f64;
    let mut vm = Vm::boot(g, dir, socket, 1, 1, false, script);
    vm.expect("bench start");
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    vm.expect("bench end");
    let (wall, cpu) = (
        t0.elapsed().as_secs_f64(),
        (cpu_ticks(pid) - c0) as f64 / hz,
    );
    vm.finish();
    (cpu, wall)
}

/// Backend CPU time per request, vstor against qemu-storage-daemon (aio=threads, its default,
/// and aio=io_uring), serving the same preallocated dynamic VHDX with O_DIRECT to the same
/// guest workload. Under TCG the guest is the bottleneck, so the figure compared is the cost per
/// request, not IOPS.
#[test]
#[ignore = "a benchmark: run with --release --ignored --nocapture"]
fn bench_backend_cpu_per_request_against_qemu_storage_daemon() {
    let test = "bench_backend_cpu_per_request_against_qemu_storage_daemon";
    let Some(g) = guest(test) else { return };
    let (jobs, per_job) = (4u64, 4096u64);
    let requests = (2 * jobs * per_job) as f64;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("bench.vhdx");
    {
        // Every block the workload touches is allocated first, so no backend pays for it.
        let d = Vhdx::create(&image, &CreateOptions::dynamic(256 * MIB)).unwrap();
        let ones = vec![1u8; MIB as usize];
        for m in 0..(jobs * per_job * 4096).div_ceil(MIB) {
            d.write_at(m * MIB, &ones).unwrap();
        }
        d.flush().unwrap();
    }
    let script = bench_script(jobs, per_job);
    let socket = dir.path().join("vu.sock");
    let mut rows = Vec::new();
    for round in 0..2 {
        let b = BackendProcess::spawn(&image, &socket, 1, 0);
        let (cpu, wall) = bench_run(&g, dir.path(), &socket, b.pid(), &script);
        let stats = b.stop();
        println!("round {round} vstor: {}", stats.last().unwrap());
        rows.push(("vstor", cpu, wall));
        for aio in ["threads", "io_uring"] {
            let qsd = spawn_qsd(&image, &socket, aio);
            let (cpu, wall) = bench_run(&g, dir.path(), &socket, qsd.id(), &script);
            stop_qsd(qsd);
            rows.push((
                if aio == "threads" {
                    "qsd aio=threads"
                } else {
                    "qsd aio=io_uring"
                },
                cpu,
                wall,
            ));
        }
    }
    println!(
        "{} requests per run ({jobs} writers then {jobs} readers, {per_job} x 4 KiB O_DIRECT each)",
        requests
    );
    for (name, cpu, wall) in &rows {
        println!(
            "{name:18} backend CPU {:.3} s, {:.2} us/request, guest wall {:.2} s ({:.0} IOPS)",
            cpu,
            cpu / requests * 1e6,
            wall,
            requests / wall
        );
    }
    let avg = |n: &str| {
        let v: Vec<f64> = rows.iter().filter(|r| r.0 == n).map(|r| r.1).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let vstor = avg("vstor");
    for q in ["qsd aio=threads", "qsd aio=io_uring"] {
        println!("vstor / {q}: {:.2}x CPU per request", vstor / avg(q));
    }
}

fn spawn_qsd(image: &Path, socket: &PathBuf, aio: &str) -> Child {
    let _ = std::fs::remove_file(socket);
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},cache.direct=on,aio={aio}",
            image.display()
        ))
        .args(["--blockdev", "driver=vhdx,node-name=d0,file=f0"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            socket.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (qemu-utils)");
    let t = Instant::now();
    while !socket.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "qsd's socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn stop_qsd(mut c: Child) {
    let _ = Command::new("kill").arg(c.id().to_string()).status();
    c.wait().unwrap();
}
