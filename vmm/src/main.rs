//! The `vstor-vmm` command line.
use clap::Parser;
use std::process::ExitCode;
use vstor_vmm::{DiskConfig, LinuxConfig, Vm, VmConfig};

/// The reference KVM VMM of vstor: serves vstor targets to a guest over virtio-blk.
#[derive(Debug, Parser)]
#[command(
    name = "vstor-vmm",
    version,
    after_help = "Examples:\n  vstor-vmm --disk /tmp/d.raw --memory 256M --test-guest\n  \
    vstor-vmm --disk /tmp/d.vhdx --test-guest verify\n  \
    vstor-vmm --disk /tmp/d.vhdx,readonly=on --test-guest readonly\n  \
    vstor-vmm --disk /tmp/d.vhdx --api-socket /tmp/vmm.sock --test-guest capacity\n  \
    vstor-vmm --disk /tmp/d.raw,queues=4 --test-guest mq\n  \
    vstor-vmm --disk /tmp/d.raw,cache=none,engine=io_uring --test-guest 'bench read 32 4096 100000'\n  \
    vstor-vmm --vcpus 2 --memory 512M --disk /tmp/d.raw --kernel vmlinuz --initrd initrd.gz\n\n\
    With --test-guest the exit status is the test guest's (0: passed); the VMM reports on stderr \
    when the guest entered its code and completed its first I/O (time since the process started). \
    A Linux guest's power off or reset ends the VMM with 0. 125 when the VMM itself fails.\n\n\
    Linux needs hardware KVM (not a software hypervisor such as PVM); it finds the disks through \
    the ACPI DSDT (LNRO0005 devices) and its console is ttyS0. scripts/make-initramfs builds a \
    Debian cloud kernel and a busybox initramfs that tests /dev/vda."
)]
struct Cli {
    /// A disk: any vstor target (disk.raw, disk.vhdx, raw:PATH, pool:DIR/NAME) with options
    /// after commas, e.g. readonly=on, cache=none, engine=io_uring; max-iops=N and min-iops=N
    /// serve it through storage QoS (IOPS in 8 KiB units: a 64 KiB request costs 8); queues=N
    /// (1 to 16) gives it N request queues (VIRTIO_BLK_F_MQ), each served by its own I/O thread.
    /// Repeat for more disks; the test guest uses the first.
    #[arg(
        long,
        value_name = "TARGET[,readonly=on][,max-iops=N][,min-iops=N][,queues=N]"
    )]
    disk: Vec<String>,
    /// Guest RAM (a multiple of 2 MiB, 32M to 3G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs, one thread each (the ACPI MADT and CPUID describe them). The test guest
    /// runs on the first; the others wait to be started, as a PC's application processors do.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Run the built-in test guest with a workload: pattern (default), verify, readonly,
    /// malformed, zeroes, zeroes-over, wce, event-idx, capacity, mq, bench. pattern, verify and
    /// mq take a seed XORed into the pattern ("pattern 90"); "bench read|write DEPTH SIZE COUNT"
    /// runs random I/O with DEPTH requests in flight over all the disk's queues and reports IOPS
    /// ("bench read 32 4096 100000").
    #[arg(long, value_name = "WORKLOAD", num_args = 0..=1, default_missing_value = "pattern",
          required_unless_present = "kernel", conflicts_with = "kernel", requires = "disk")]
    test_guest: Option<String>,
    /// Boot Linux: a bzImage or an ELF vmlinux with a 64-bit entry point (instead of
    /// --test-guest).
    #[arg(long, value_name = "PATH")]
    kernel: Option<std::path::PathBuf>,
    /// The initrd / initramfs of --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<std::path::PathBuf>,
    /// The kernel command line of --kernel [default: console=ttyS0 earlyprintk=ttyS0 panic=-1
    /// pci=off].
    #[arg(long, value_name = "CMDLINE", requires = "kernel")]
    cmdline: Option<String>,
    /// Serve the API on a Unix socket at this path: JSON-RPC 2.0, one object per line
    /// (methods disk.resize {disk,size}, disk.set-qos {disk,max_iops,min_iops}, vm.stats,
    /// vm.pause, vm.resume; rpc.discover returns the schema).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<std::path::PathBuf>,
    /// Print the API's statistics (requests, queue services, interrupts, vCPU exits) as one
    /// JSON line on stderr when the guest ends.
    #[arg(long)]
    print_stats: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    vstor::parse_size(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    vstor_vmm::timing::mark_process_start();
    let cli = Cli::parse();
    let disks = match cli
        .disk
        .iter()
        .map(|d| DiskConfig::parse(d))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(disks) => disks,
        Err(e) => {
            eprintln!("vstor-vmm: error: {e}");
            return ExitCode::from(125);
        }
    };
    let config = VmConfig {
        memory: cli.memory,
        vcpus: cli.vcpus,
        disks,
        workload: cli.test_guest.clone().unwrap_or_else(|| "pattern".into()),
        linux: cli.kernel.clone().map(|kernel| LinuxConfig {
            kernel,
            initrd: cli.initrd.clone(),
            cmdline: cli.cmdline.clone(),
        }),
    };
    let result = Vm::new(&config).and_then(|mut vm| {
        for note in &vm.notes {
            eprintln!("vstor-vmm: note: {note}");
        }
        if let Some(path) = &cli.api_socket {
            vstor_vmm::api::serve(vm.control(), path).map_err(|e| {
                vstor_vmm::Error::Config(format!("API socket {}: {e}", path.display()))
            })?;
        }
        let status = vm.run();
        if cli.print_stats {
            eprintln!("vstor-vmm: stats: {}", vm.control().stats());
        }
        if let Some(how) = vm.ended() {
            eprintln!("vstor-vmm: {how}");
        }
        status
    });
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("vstor-vmm: the guest reported status {status}");
            ExitCode::from(status.clamp(1, 124) as u8)
        }
        Err(e) => {
            eprintln!("vstor-vmm: error: {e}");
            ExitCode::from(125)
        }
    }
}
