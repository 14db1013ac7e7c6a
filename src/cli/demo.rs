//! `vstor demo`: a small stack on temporary files, showing what the project does so far.

use clap::Args;
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
    println!("Done; the temporary files are removed.");
    Ok(())
}
