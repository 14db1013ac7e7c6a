//! `vstor demo`: a small stack on temporary files, showing what the project does so far.

use clap::Args;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vstor::bench::{self, BenchParams};
use vstor::core::fault::Fate;
use vstor::core::{
    BlockDevice, CutPolicy, Engine, FaultDevice, FileDevice, FileOptions, MemoryDevice, Request,
};
use vstor::{format_size, Error};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the demo disk.
    #[arg(long, value_parser = super::size_arg, default_value = "64M")]
    size: u64,
}

pub fn run(a: DemoArgs) -> Result<(), Error> {
    let dir = tempfile::tempdir().map_err(super::io_err("cannot create a temporary directory"))?;
    let path = dir.path().join("demo.raw");
    println!(
        "1. A raw disk of {} at {}",
        format_size(a.size),
        path.display()
    );
    let opts = FileOptions {
        direct: true,
        ..Default::default()
    };
    if a.size < 1 << 20 || a.size % (1 << 20) != 0 {
        return Err(Error::InvalidArgument(format!(
            "--size {} must be a non-zero multiple of 1 MiB",
            a.size
        )));
    }
    let dev = FileDevice::create(&path, a.size, &opts)?;
    println!("   opened as: {}", dev.describe());
    // Fill the disk so that the benchmark below reads data, not holes.
    let fill = vstor::core::AlignedBuf::new(1 << 20);
    for chunk in (0..a.size).step_by(32 << 20) {
        let end = (chunk + (32 << 20)).min(a.size);
        let mut batch: Vec<Request<'_>> = (chunk..end)
            .step_by(1 << 20)
            .map(|o| Request::write(o, &fill))
            .collect();
        dev.submit_all(&mut batch)?;
    }
    for note in dev
        .direct_fallback()
        .into_iter()
        .chain(dev.engine_fallback())
    {
        println!("   note: {note}");
    }

    // One batch: 32 writes of 64 KiB with distinct patterns, then a flush (a barrier in the
    // batch), all in flight together on io_uring.
    let n = 32usize;
    let bufs: Vec<vstor::core::AlignedBuf> = (0..n)
        .map(|i| {
            let mut b = vstor::core::AlignedBuf::new(64 << 10);
            b.fill(i as u8 + 1);
            b
        })
        .collect();
    let mut batch: Vec<Request<'_>> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| Request::write(i as u64 * (64 << 10), b))
        .chain([Request::flush()])
        .collect();
    dev.submit_all(&mut batch)?;
    let mut back = vstor::core::AlignedBuf::new(n * (64 << 10));
    dev.read_at(0, &mut back)?;
    let ok = back
        .chunks(64 << 10)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == i as u8 + 1));
    if !ok {
        return Err(Error::Failed("read-back verification failed".into()));
    }
    println!("2. Wrote {n} x 64 KiB with distinct patterns and a flush in one batch; read back and verified: OK");

    println!(
        "3. 4 KiB random reads, 20000 requests, depth 32, O_DIRECT where the file system allows:"
    );
    let p = BenchParams {
        count: 20000,
        depth: 32,
        random: true,
        ..Default::default()
    };
    let mut iops = Vec::new();
    for engine in [Engine::IoUring, Engine::Sync] {
        let d = FileDevice::open(
            &path,
            &FileOptions {
                engine,
                ..opts.clone()
            },
        );
        let d = match d {
            Ok(d) => d,
            Err(e) => {
                println!("   {engine}: unavailable ({e})");
                continue;
            }
        };
        let r = bench::run(&d, &p, &mut |_| {})?;
        println!(
            "   {engine:<8} {:>9.0} IOPS  {:>7.1} MiB/s",
            r.iops, r.mib_per_s
        );
        iops.push(r.iops);
    }
    if let [u, s] = iops[..] {
        println!("   io_uring / sync = {:.2}x", u / s);
    }

    println!("4. A simulated power cut on the fault-injecting device:");
    let medium: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20)?);
    let fault = FaultDevice::new(medium);
    fault.write_at(0, &[0xaa; 4096])?;
    fault.flush()?;
    for i in 1..=4u64 {
        fault.write_at(i * 8192, &[0xbb; 8192])?;
    }
    let report = fault.power_cut(CutPolicy::Random {
        seed: 7,
        torn: true,
    })?;
    fault.power_on();
    let mut first = [0u8; 4096];
    fault.read_at(0, &mut first)?;
    println!(
        "   the flushed write survived: {}",
        if first.iter().all(|&b| b == 0xaa) {
            "yes"
        } else {
            "NO"
        }
    );
    for w in &report.writes {
        let fate = match w.fate {
            Fate::Kept => "reached the disk".to_string(),
            Fate::Dropped => "was lost".to_string(),
            Fate::Torn { sectors } => format!("was torn after {sectors} sector(s)"),
        };
        println!("   unflushed write at {:>5}: {fate}", w.offset);
    }
    vhdx_demo(dir.path())?;
    lifecycle_demo(dir.path())?;
    pool_demo(dir.path())?;
    qos_demo(dir.path())?;
    vmm_demo(dir.path())?;
    println!("Done; the temporary files are removed.");
    Ok(())
}

/// Step 5: a VHDX chain, and a power cut in the middle of VHDX metadata updates.
fn vhdx_demo(dir: &Path) -> Result<(), Error> {
    use vstor::vhdx::{check, CreateOptions, OpenOptions, Src, Vhdx};
    let base_path = dir.join("base.vhdx");
    let child_path = dir.join("child.avhdx");
    let base = Vhdx::create(
        &base_path,
        &CreateOptions::dynamic(1 << 30).block_size(1 << 20),
    )?;
    base.write_at(0, &vec![0xb5; 3 << 20])?;
    base.close()?;
    drop(base);
    let child = Vhdx::create(&child_path, &CreateOptions::differencing(&base_path))?;
    child.write_at(1 << 20, &[0xc6; 4096])?;
    child.flush()?;
    println!(
        "5. A VHDX chain: {} (1 GiB dynamic, 3 MiB written) <- {} (4 KiB written)",
        base_path.display(),
        child_path.display()
    );
    for (off, len) in [(0u64, 4096u64), (1 << 20, 8192), (512 << 20, 4096)] {
        let place = child
            .locate(off, len)?
            .iter()
            .map(|(n, s)| match s {
                Src::File(o) => format!("{n} bytes in the child's file at {o}"),
                Src::Parent(_) => format!("{n} bytes from the parent"),
                Src::Zero => format!("{n} bytes of zeros (never written)"),
            })
            .collect::<Vec<_>>()
            .join(", then ");
        println!("   virtual [{off}, +{len}): {place}");
    }
    let mut b = [0u8; 512];
    child.read_at((1 << 20) + 4096, &mut b[..])?;
    println!(
        "   the sector after the child's write reads {:#04x} (from the parent)",
        b[0]
    );
    child.close()?;
    drop(child);
    let r = check::check(&child_path)?;
    println!(
        "   vstor disk check: {}",
        if r.is_clean() { "clean" } else { "NOT clean" }
    );

    // A power cut in the middle of allocating writes and a flush on a VHDX.
    let medium: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(8 << 20)?);
    let fault = Arc::new(FaultDevice::new(medium));
    fault.set_volatile_cache(true)?;
    let disk = Vhdx::create_on(
        fault.clone(),
        &CreateOptions::dynamic(1 << 30).block_size(1 << 20),
        None,
    )?;
    disk.write_at(0, &[0x11; 4096])?;
    disk.flush()?;
    disk.write_at(5 << 20, &[0x22; 4096])?;
    // The cut comes at the second write of the commit: after the log entry is durable, while
    // the BAT is being updated in place. Reopening replays the log.
    fault.arm_power_cut(
        2,
        CutPolicy::Random {
            seed: 3,
            torn: true,
        },
    );
    let flushed = disk.flush().is_ok();
    drop(disk);
    fault.power_on();
    let disk = Vhdx::open_on(fault.clone(), "crashed.vhdx", &OpenOptions::default(), None)?;
    let (mut x, mut y) = ([0u8; 512], [0u8; 512]);
    disk.read_at(0, &mut x)?;
    disk.read_at(5 << 20, &mut y)?;
    println!(
        "6. A VHDX losing power while its flush updates the BAT in place (the flush {}): on \
         reopen, {}; data flushed earlier {:#04x} (expected 0x11), data of the cut flush {:#04x} \
         (0x22: the log entry was durable)",
        if flushed { "completed" } else { "failed" },
        disk.replay_note().unwrap_or("no log replay needed"),
        x[0],
        y[0]
    );
    drop(disk);
    let r = check::check_device(fault, "crashed.vhdx");
    println!(
        "   check after reopening: {}",
        if r.is_clean() { "clean" } else { "NOT clean" }
    );
    Ok(())
}

/// Step 7: the lifecycle of a disk in use: online resize, checkpoint, merge back.
fn lifecycle_demo(dir: &Path) -> Result<(), Error> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use vstor::core::Job;
    use vstor::vhdx::live::LiveDisk;
    use vstor::vhdx::{check, CreateOptions, Vhdx};
    let path = dir.join("vm.vhdx");
    Vhdx::create(&path, &CreateOptions::dynamic(64 << 20).block_size(1 << 20))?.close()?;
    let disk = Arc::new(LiveDisk::open(&path)?);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    // A "guest" writing 64 KiB records with increasing numbers while the operator works.
    let guest = {
        let (disk, stop, written) = (disk.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || -> Result<(), Error> {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut rec = vec![0u8; 65536];
                rec[..8].copy_from_slice(&n.to_le_bytes());
                disk.write_at((n % 512) * 65536, &rec)?;
                n += 1;
                if n % 16 == 0 {
                    disk.flush()?;
                }
            }
            written.store(n, Ordering::Relaxed);
            Ok(())
        })
    };
    let t = std::time::Instant::now();
    let old_size = disk.capacity();
    // Through the device, as a VMM's API would: holders of its capacity signal are told.
    disk.resize(2 << 40)?;
    let new_size = disk.capacity();
    let resize_ms = t.elapsed().as_secs_f64() * 1e3;
    let (child, frozen) = disk.checkpoint(None)?;
    let frozen_size = frozen.capacity();
    drop(frozen);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let m = disk.merge_checkpoint(&Job::new())?;
    stop.store(true, Ordering::Relaxed);
    guest.join().expect("the guest thread")?;
    let n = written.load(Ordering::Relaxed);
    // The last record the guest wrote is on the disk.
    let last = n - 1;
    let mut rec = [0u8; 512];
    disk.read_at((last % 512) * 65536, &mut rec)?;
    println!(
        "7. A disk in use while a guest thread writes {n} records: resized online {} -> {} in \
         {resize_ms:.1} ms; checkpoint {} (parent frozen at {}); merged back ({} copied); the \
         last record reads {} (expected {last})",
        vstor::format_size(old_size),
        vstor::format_size(new_size),
        child.file_name().unwrap_or_default().to_string_lossy(),
        vstor::format_size(frozen_size),
        vstor::format_size(m.copied_bytes),
        u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"))
    );
    drop(disk);
    let c = check::check(&path)?;
    println!(
        "   vstor disk check: {}",
        if c.is_clean() { "clean" } else { "NOT clean" }
    );
    Ok(())
}

/// Opens a target string through the stack builder, as the CLI and the VMM do.
fn open(target: &str) -> Result<Arc<dyn BlockDevice>, Error> {
    Ok(vstor::open_target(target, &vstor::TargetOptions::default())?.device)
}

/// Writes `len` bytes of `byte` from offset 0 in 1 MiB requests, 16 in flight; MiB/s.
fn fill(dev: &dyn BlockDevice, len: u64, byte: u8) -> Result<f64, Error> {
    let buf = vec![byte; 1 << 20];
    let t = std::time::Instant::now();
    for chunk in (0..len).step_by(16 << 20) {
        let mut batch: Vec<Request<'_>> = (chunk..(chunk + (16 << 20)).min(len))
            .step_by(1 << 20)
            .map(|o| Request::write(o, &buf))
            .collect();
        dev.submit_all(&mut batch)?;
    }
    dev.flush()?;
    Ok(len as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64())
}

/// Whether every byte of [0, len) reads `byte`.
fn holds(dev: &dyn BlockDevice, len: u64, byte: u8) -> Result<bool, Error> {
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..len).step_by(1 << 20) {
        dev.read_at(off, &mut buf)?;
        if buf.iter().any(|&b| b != byte) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Step 8: a pool of five member files with a mirrored and a parity space; one member lost,
/// the data still there; a new member added and the spaces repaired onto it.
fn pool_demo(dir: &Path) -> Result<(), Error> {
    use vstor::spaces::{
        CreateOptions, OpenOptions, Pool, Provisioning, Resiliency, SpaceHealth, SpaceSpec,
    };
    let pdir = dir.join("pool");
    let locked = FileOptions {
        lock: true,
        ..Default::default()
    };
    let pool = Pool::create_in_dir(
        &pdir,
        5,
        64 << 20,
        &CreateOptions { slab_size: 4 << 20 },
        &locked,
    )?;
    for (name, resiliency) in [
        ("mirror", Resiliency::Mirror { copies: 2 }),
        ("parity", Resiliency::Parity { redundancy: 1 }),
    ] {
        pool.create_space(&SpaceSpec {
            name: name.into(),
            size: 24 << 20,
            resiliency,
            columns: None,
            interleave: None,
            provisioning: Provisioning::Thin,
        })?;
    }
    drop(pool);
    let target = |name: &str| format!("pool:{}/{name}", pdir.display());
    let mirror_mib_s = fill(&*open(&target("mirror"))?, 24 << 20, 0xa1)?;
    let parity_mib_s = fill(&*open(&target("parity"))?, 24 << 20, 0xb2)?;
    println!(
        "8. A pool of 5 member files (64 MiB each, 4 MiB slabs) with a 2-way mirror and a single \
         parity space of 24 MiB: written at {mirror_mib_s:.0} MiB/s and {parity_mib_s:.0} MiB/s"
    );
    let lost = pdir.join("disk1.raw");
    std::fs::remove_file(&lost).map_err(super::io_err("cannot remove a member"))?;
    // Read-only opens share the members' locks, so both spaces open side by side.
    let ro = |name: &str| open(&format!("{},readonly=on", target(name)));
    let health = |pool: &Pool| -> Vec<String> {
        pool.spaces()
            .iter()
            .map(|s| match &s.health {
                SpaceHealth::Healthy => format!("{} healthy", s.name),
                SpaceHealth::Degraded { .. } => format!("{} degraded", s.name),
                _ => format!("{} FAILED", s.name),
            })
            .collect()
    };
    let seen = health(&Pool::open_dir(
        &pdir,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
        &locked,
    )?);
    let (m, p) = (ro("mirror")?, ro("parity")?);
    println!(
        "   {} deleted ({}): the mirror reads {}, the parity space reads {}",
        lost.display(),
        seen.join(", "),
        if holds(&*m, 24 << 20, 0xa1)? {
            "all its data"
        } else {
            "WRONG DATA"
        },
        if holds(&*p, 24 << 20, 0xb2)? {
            "all its data"
        } else {
            "WRONG DATA"
        },
    );
    drop((m, p));
    let pool = Pool::open_dir(&pdir, &OpenOptions::default(), &locked)?;
    pool.add_disk_in_dir(&pdir, 64 << 20, &locked)?;
    let t = std::time::Instant::now();
    let r = pool.repair(None, &mut |_, _| {})?;
    let secs = t.elapsed().as_secs_f64();
    let health = health(&pool);
    drop(pool);
    let (m, p) = (ro("mirror")?, ro("parity")?);
    let intact = holds(&*m, 24 << 20, 0xa1)? && holds(&*p, 24 << 20, 0xb2)?;
    println!(
        "   a new member added and both spaces repaired onto it: {} slabs ({}) in {:.0} ms; {}; \
         data {}",
        r.slabs,
        format_size(r.bytes),
        secs * 1e3,
        health.join(", "),
        if intact { "intact" } else { "WRONG" }
    );
    Ok(())
}

/// Step 9: the same 4 KiB random reads on one raw disk, without and with a QoS layer that
/// caps it at 400 IOPS (8 KiB-normalized: a 4 KiB read costs one unit).
fn qos_demo(dir: &Path) -> Result<(), Error> {
    let path = dir.join("qos.raw");
    FileDevice::create(&path, 64 << 20, &FileOptions::default())?;
    let p = path.display();
    let params = |count| BenchParams {
        count,
        depth: 8,
        size: 4096,
        random: true,
        ..Default::default()
    };
    let free = bench::run(&*open(&format!("{p}"))?, &params(20_000), &mut |_| {})?;
    let capped = bench::run(
        &*open(&format!("{p},max-iops=400"))?,
        &params(800),
        &mut |_| {},
    )?;
    println!(
        "9. QoS: 4 KiB random reads on {p}: {:.0} IOPS as it is; {:.0} IOPS through the target \
         {p},max-iops=400 ({} requests in {:.2} s)",
        free.iops, capped.iops, capped.count, capped.seconds
    );
    Ok(())
}

/// Step 10: the reference VMM's test guest on a VHDX, where this machine can run it.
fn vmm_demo(dir: &Path) -> Result<(), Error> {
    // First what no build can change: a machine without KVM is told so at once.
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        println!("10. VMM: skipped: /dev/kvm cannot be opened ({e})");
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(super::io_err("cannot find this binary"))?;
    // `cargo run` (and `cargo test`) set both at run time: then cargo can build the VMM.
    let cargo = std::env::var_os("CARGO").zip(std::env::var_os("CARGO_MANIFEST_DIR"));
    let vmm = match find_or_build_vmm(&exe, cargo) {
        Ok(vmm) => vmm,
        Err(why) => {
            println!("10. VMM: skipped: {why}");
            return Ok(());
        }
    };
    let disk = dir.join("guest.vhdx");
    vstor::vhdx::Vhdx::create(&disk, &vstor::vhdx::CreateOptions::dynamic(64 << 20))?.close()?;
    let t = std::time::Instant::now();
    let out = std::process::Command::new(&vmm)
        .arg("--disk")
        .arg(&disk)
        .arg("--test-guest")
        .output()
        .map_err(super::io_err("cannot run vstor-vmm"))?;
    let secs = t.elapsed().as_secs_f64();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && text.contains("PASS") {
        println!(
            "10. VMM: vstor-vmm ran its test guest on {} over virtio-blk (writes, reads back, \
             flush, device id, errors) in {secs:.1} s: PASS",
            disk.display()
        );
    } else {
        let last = text.lines().last().unwrap_or("no output");
        println!("10. VMM: the test guest could not run here: {last}");
    }
    Ok(())
}

/// The `vstor-vmm` binary beside `exe`. When it is not there and the demo runs under cargo
/// (`cargo`: the CARGO and CARGO_MANIFEST_DIR that cargo sets at run time), cargo builds it
/// now, in the profile of the directory `exe` is in, so that it lands beside `exe`. `Err` is
/// the one-line reason there is none.
fn find_or_build_vmm(exe: &Path, cargo: Option<(OsString, OsString)>) -> Result<PathBuf, String> {
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no directory", exe.display()))?;
    let vmm = dir.join("vstor-vmm");
    if vmm.is_file() {
        return Ok(vmm);
    }
    let Some((cargo, manifest_dir)) = cargo else {
        let how = "cargo build --release -p vstor-vmm, then run the demo again";
        return Err(format!("vstor-vmm is not built beside this binary ({how})"));
    };
    // Cargo puts a profile's binaries in target/<dir>, where <dir> is "debug" for `dev`.
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => return Err(format!("{} is no profile's directory", dir.display())),
    };
    let profile_args: Vec<&str> = match profile {
        "release" => vec!["--release"],
        "dev" => vec![],
        other => vec!["--profile", other],
    };
    let shown = ["cargo build"]
        .into_iter()
        .chain(profile_args.iter().copied())
        .chain(["-p vstor-vmm"])
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "   step 10 needs vstor-vmm, which is not built beside this binary: running `{shown}` \
         (a few minutes the first time; cargo's progress is on stderr)"
    );
    let t = std::time::Instant::now();
    let status = std::process::Command::new(&cargo)
        .arg("build")
        .args(&profile_args)
        .args(["-p", "vstor-vmm", "--manifest-path"])
        .arg(Path::new(&manifest_dir).join("Cargo.toml"))
        .stdin(std::process::Stdio::null())
        // This stdout is the demo's report; anything cargo prints goes with its progress.
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| format!("cannot run {} ({e})", Path::new(&cargo).display()))?;
    let secs = t.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("`{shown}` failed after {secs:.1} s ({status})"));
    }
    println!("   cargo built vstor-vmm in {secs:.1} s");
    if vmm.is_file() {
        Ok(vmm)
    } else {
        Err(format!(
            "`{shown}` succeeded but left no vstor-vmm beside this binary in {}",
            dir.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::find_or_build_vmm;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// Writes an executable shell script.
    fn script(path: &Path, body: &str) {
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    // One test, so that no other thread of this binary forks while a script is open for writing
    // (the child would hold it, and running the script would fail with ETXTBSY).
    #[test]
    fn the_vmm_is_found_beside_the_binary_or_built_by_cargo_or_a_reason_is_given() {
        let d = tempfile::tempdir().unwrap();
        let release = d.path().join("target/release");
        let debug = d.path().join("target/debug");
        std::fs::create_dir_all(&release).unwrap();
        std::fs::create_dir_all(&debug).unwrap();
        let log = d.path().join("cargo.log");
        // A cargo that notes its arguments and builds the VMM where a real one would.
        let builds = d.path().join("cargo-builds");
        script(
            &builds,
            &format!(
                "echo \"$@\" >> {log}\nprof=debug\n[ \"$2\" = --release ] && prof=release\n\
                 printf '#!/bin/sh\\n' > {t}/$prof/vstor-vmm\nchmod +x {t}/$prof/vstor-vmm",
                log = log.display(),
                t = d.path().join("target").display()
            ),
        );
        let fails = d.path().join("cargo-fails");
        script(
            &fails,
            &format!("echo \"$@\" >> {}\nexit 101", log.display()),
        );
        let idle = d.path().join("cargo-idle");
        script(&idle, &format!("echo \"$@\" >> {}", log.display()));
        let under = |cargo: &Path| Some((cargo.into(), "/src/vstor".into()));
        let calls = || std::fs::read_to_string(&log).unwrap_or_default();

        // Not built, not under cargo: the reason, and how to build it.
        let exe = release.join("vstor");
        let why = find_or_build_vmm(&exe, None).unwrap_err();
        assert!(
            why.starts_with("vstor-vmm is not built beside this binary (cargo build --release"),
            "{why}"
        );
        // Under cargo: cargo builds it in this binary's profile, and it is used.
        let vmm = find_or_build_vmm(&exe, under(&builds)).unwrap();
        assert_eq!(vmm, release.join("vstor-vmm"));
        assert_eq!(
            calls(),
            "build --release -p vstor-vmm --manifest-path /src/vstor/Cargo.toml\n"
        );
        // Once built, it is found without cargo.
        assert_eq!(find_or_build_vmm(&exe, under(&fails)).unwrap(), vmm);
        assert_eq!(calls().lines().count(), 1);
        // A debug binary gets a debug build.
        let vmm = find_or_build_vmm(&debug.join("vstor"), under(&builds)).unwrap();
        assert_eq!(vmm, debug.join("vstor-vmm"));
        assert_eq!(
            calls().lines().last().unwrap(),
            "build -p vstor-vmm --manifest-path /src/vstor/Cargo.toml"
        );
        // A custom profile is named.
        let bench = d.path().join("target/bench");
        std::fs::create_dir_all(&bench).unwrap();
        let why = find_or_build_vmm(&bench.join("vstor"), under(&idle)).unwrap_err();
        assert_eq!(
            calls().lines().last().unwrap(),
            "build --profile bench -p vstor-vmm --manifest-path /src/vstor/Cargo.toml"
        );
        // A build that leaves nothing beside the binary, one that fails, a cargo that cannot
        // run: one line each.
        assert!(
            why.starts_with("`cargo build --profile bench -p vstor-vmm` succeeded but left no"),
            "{why}"
        );
        std::fs::remove_file(release.join("vstor-vmm")).unwrap();
        let why = find_or_build_vmm(&exe, under(&fails)).unwrap_err();
        assert!(
            why.starts_with("`cargo build --release -p vstor-vmm` failed after ")
                && why.ends_with("(exit status: 101)"),
            "{why}"
        );
        let why = find_or_build_vmm(&exe, under(&d.path().join("no-cargo"))).unwrap_err();
        assert!(why.starts_with("cannot run "), "{why}");
        assert!(why.lines().count() == 1 && !release.join("vstor-vmm").exists());
    }
}
