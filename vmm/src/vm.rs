//! The VM: guest memory, its vCPUs (one thread each; the first starts in long mode at the test
//! guest or at a Linux kernel's 64-bit entry, the others wait for the guest to start them), the
//! serial console, a virtio-blk device per disk, and the run loop that dispatches port I/O and
//! MMIO exits.

use crate::acpi::{self, PowerEvent};
use crate::api::{Control, DiskQos};
use crate::boot;
use crate::layout::*;
use crate::linux::{self, LinuxConfig};
use crate::serial::SerialPort;
use crate::timing;
use crate::vcpu;
use crate::virtio::block::{Block, MAX_QUEUES};
use crate::virtio::io_thread::{self, IoThreads, QueueNotifications};
use crate::virtio::mmio::MmioTransport;
use crate::Error;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vstor::qos::Limits;

/// The test guest's ELF image, built from vmm/guest by build.rs.
pub static TEST_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vstor-test-guest.elf"));

/// A disk of the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskConfig {
    /// A vstor target string (`disk.raw`, `disk.vhdx,readonly=on`, `pool:DIR/NAME`, ...).
    pub target: String,
    /// Storage QoS maximum in IOPS (8 KiB units; 0: none). With either limit set the disk is
    /// served through vstor-qos, and the API can change the limits.
    pub max_iops: u64,
    /// Storage QoS minimum (reservation) in IOPS (8 KiB units; 0: none).
    pub min_iops: u64,
    /// Request queues (`queues=N`; 0 counts as 1), each served by its own I/O thread; more
    /// than one offers VIRTIO_BLK_F_MQ.
    pub queues: usize,
}

impl DiskConfig {
    /// Parses `TARGET[,OPTION...]`: `max-iops=N`, `min-iops=N` and `queues=N` are the VMM's;
    /// every other option stays with the target string.
    pub fn parse(s: &str) -> Result<DiskConfig, Error> {
        let mut config = DiskConfig {
            queues: 1,
            ..DiskConfig::default()
        };
        let mut kept = Vec::new();
        for (i, part) in s.split(',').enumerate() {
            if let (true, Some(("queues", v))) = (i > 0, part.split_once('=')) {
                config.queues = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_QUEUES).contains(n))
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "--disk {s}: '{part}': queues must be from 1 to {MAX_QUEUES}"
                        ))
                    })?;
                continue;
            }
            let qos = match part.split_once('=') {
                Some(("max-iops", v)) if i > 0 => Some((&mut config.max_iops, v)),
                Some(("min-iops", v)) if i > 0 => Some((&mut config.min_iops, v)),
                _ => None,
            };
            match qos {
                Some((field, v)) => {
                    *field = v.parse().map_err(|_| {
                        Error::Config(format!("--disk {s}: '{part}' is not a whole number"))
                    })?;
                }
                None => kept.push(part),
            }
        }
        config.target = kept.join(",");
        if config.target.is_empty() {
            return Err(Error::Config(format!("--disk {s}: no target")));
        }
        if config.max_iops != 0 && config.min_iops > config.max_iops {
            return Err(Error::Config(format!(
                "--disk {s}: min-iops is above max-iops"
            )));
        }
        Ok(config)
    }

    /// Whether the disk is served through vstor-qos.
    pub fn has_qos(&self) -> bool {
        self.max_iops != 0 || self.min_iops != 0
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Bytes of guest RAM.
    pub memory: u64,
    /// Number of vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpus: u32,
    /// The disks, one virtio-mmio device each.
    pub disks: Vec<DiskConfig>,
    /// The test guest's workload (`pattern`, `verify`, `readonly`, `malformed`, ...); unused
    /// when `linux` is set.
    pub workload: String,
    /// Boot this Linux kernel instead of the test guest.
    pub linux: Option<LinuxConfig>,
}

/// The magic value at the start of the test guest's boot information ("VSTORGST").
const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"VSTORGST");

fn kvm_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> Error + '_ {
    move |e| Error::Kvm {
        what: what.to_string(),
        source: Some(Box::new(e)),
    }
}

/// Checks that `/dev/kvm` can run a VM: it opens, speaks API version 12 and creates a VM with a
/// vCPU. The error says why not.
pub fn kvm_usable() -> Result<(), Error> {
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(Error::kvm(format!(
            "KVM API version {version}, expected 12"
        )));
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The devices behind the vCPUs' exits, shared by the vCPU threads.
struct Bus {
    serial: Mutex<SerialPort>,
    disks: Vec<Mutex<MmioTransport>>,
    control: Arc<Control>,
    /// The guest is Linux: a shutdown exit is its reset, not a crash of the test guest.
    linux: bool,
    /// How the guest ended, when it did so without a status (power off, reset).
    ended: Mutex<Option<String>>,
}

impl Bus {
    /// The device whose MMIO window holds `addr`, and the offset in the window.
    fn disk_at(&self, addr: u64) -> Option<(MutexGuard<'_, MmioTransport>, u64)> {
        let off = addr.checked_sub(MMIO_BASE)?;
        let i = usize::try_from(off / MMIO_SIZE).ok()?;
        self.disks.get(i).map(|d| (lock(d), off % MMIO_SIZE))
    }

    fn end(&self, how: &str) -> Option<Result<u32, Error>> {
        lock(&self.serial).flush();
        *lock(&self.ended) = Some(how.to_string());
        Some(Ok(0))
    }

    /// Runs `vcpu` (number `index`) until the guest ends (its result) or the VM is stopped
    /// (`None`).
    fn run_vcpu(&self, vcpu: &mut VcpuFd, index: u32) -> Option<Result<u32, Error>> {
        let rip = |vcpu: &VcpuFd| vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
        loop {
            // Work of the control plane first: configuration interrupts, a pause, the end.
            for i in self.control.service() {
                lock(&self.disks[i]).config_changed();
            }
            if self.control.stopping() {
                return None;
            }
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Some(Err(Error::kvm(format!("KVM_RUN (vCPU {index}): {e}")))),
            };
            self.control.count_exit();
            match exit {
                VcpuExit::IoOut(port, data) => {
                    if port == EXIT_PORT && !self.linux {
                        let mut v = [0u8; 4];
                        let n = data.len().min(4);
                        v[..n].copy_from_slice(&data[..n]);
                        lock(&self.serial).flush();
                        return Some(Ok(u32::from_le_bytes(v)));
                    }
                    if SerialPort::owns(port) {
                        lock(&self.serial).write(port, data);
                    } else if port == TIMING_PORT && !self.linux {
                        let mut v = [0u8; 4];
                        let n = data.len().min(4);
                        v[..n].copy_from_slice(&data[..n]);
                        let line = timing::mark_line(u32::from_le_bytes(v), timing::since_start());
                        eprintln!("{line}");
                    } else if let Some(event) = acpi::power_event(port, data) {
                        return self.end(match event {
                            PowerEvent::PowerOff => "the guest powered off",
                            PowerEvent::Reset => "the guest reset",
                        });
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    if SerialPort::owns(port) {
                        lock(&self.serial).read(port, data);
                    } else if port == TIMING_PORT && !self.linux {
                        let now = timing::clock_us().to_le_bytes();
                        let n = data.len().min(4);
                        data[..n].copy_from_slice(&now[..n]);
                    } else if port == ACPI_PM_PORT {
                        // The sleep status register: no wake event.
                        data.fill(0);
                    } else {
                        data.fill(0xff);
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    // Reads of unbacked addresses see all ones, as on a PC.
                    data.fill(0xff);
                    if let Some((mut disk, off)) = self.disk_at(addr) {
                        disk.read(off, data);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if let Some((mut disk, off)) = self.disk_at(addr) {
                        disk.write(off, data);
                    }
                }
                VcpuExit::Hlt => {
                    lock(&self.serial).flush();
                    return Some(Err(Error::Guest(format!(
                        "vCPU {index} halted without reporting a status"
                    ))));
                }
                VcpuExit::Shutdown if self.linux => {
                    return self.end("the guest reset (shutdown exit: a triple fault)");
                }
                VcpuExit::Shutdown => {
                    lock(&self.serial).flush();
                    return Some(Err(Error::Guest(format!(
                        "vCPU {index} shut down (triple fault?) near rip {:#x}",
                        rip(vcpu)
                    ))));
                }
                other => {
                    let what = format!("{other:?}");
                    lock(&self.serial).flush();
                    return Some(Err(Error::Guest(format!(
                        "unexpected exit {what} on vCPU {index} at rip {:#x}",
                        rip(vcpu)
                    ))));
                }
            }
        }
    }

    /// The body of a vCPU thread: runs `vcpu` and, when the guest ends there, records the result
    /// (the first one wins) and stops the other vCPUs.
    fn vcpu_thread(
        &self,
        vcpu: &mut VcpuFd,
        index: u32,
        result: &Mutex<Option<Result<u32, Error>>>,
    ) {
        let outcome = match self.control.enter() {
            Ok(()) => {
                let r = self.run_vcpu(vcpu, index);
                self.control.leave();
                r
            }
            Err(e) => Some(Err(e)),
        };
        if let Some(r) = outcome {
            lock(result).get_or_insert(r);
            self.control.stop();
        }
    }
}

/// A running VM.
pub struct Vm {
    /// Kept for the lifetime of the VM (KVM objects hold references to it).
    _kvm: Kvm,
    vm: Arc<VmFd>,
    /// The vCPUs, the boot vCPU first.
    vcpus: Vec<VcpuFd>,
    /// Whether the vCPUs after the first run (they wait in KVM for the guest to start them,
    /// which needs the in-kernel local APICs).
    run_aps: bool,
    mem: GuestMemoryMmap,
    bus: Bus,
    /// The queues of each disk and their notification eventfds (one I/O thread per queue while
    /// the guest runs: [`crate::virtio::io_thread`]).
    queue_io: Vec<QueueNotifications>,
    /// Notes for the user (how disks were opened, missing KVM features).
    pub notes: Vec<String>,
}

impl Vm {
    /// Creates the VM, loads the guest (the test guest or a Linux kernel) and opens the disks.
    pub fn new(config: &VmConfig) -> Result<Vm, Error> {
        if !(1..=MAX_VCPUS).contains(&config.vcpus) {
            return Err(Error::Config(format!(
                "{} vCPUs: give 1 to {MAX_VCPUS}",
                config.vcpus
            )));
        }
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&config.memory) || config.memory % (2 << 20) != 0 {
            return Err(Error::Config(format!(
                "memory {} MiB: it must be a multiple of 2 MiB from {} MiB to {} MiB",
                config.memory >> 20,
                MIN_MEMORY >> 20,
                MAX_MEMORY >> 20
            )));
        }
        if config.linux.is_none() {
            if config.disks.is_empty() {
                return Err(Error::Config(
                    "the test guest needs a disk (--disk TARGET)".into(),
                ));
            }
            if config.workload.len() > 64 {
                return Err(Error::Config("the workload is longer than 64 bytes".into()));
            }
        }
        let mut notes = Vec::new();
        // Disks first: a target that does not open needs no VM to be reported.
        let mut blocks = Vec::new();
        let mut qos_handles = Vec::new();
        // One scheduler for all the VM's disks with QoS, like a host's: each disk a flow with
        // its own (dedicated) policy. The stack builder puts the QoS layer on.
        let mut ctx = vstor::StackContext::default();
        for (i, d) in config.disks.iter().enumerate() {
            let disk_err = |source| Error::Disk {
                target: d.target.clone(),
                source,
            };
            let name = format!("vstor{i}");
            let mut spec: vstor::TargetSpec = d.target.parse().map_err(disk_err)?;
            if d.has_qos() {
                spec.qos = Some(vstor::QosLayer {
                    limits: Limits {
                        max_iops: d.max_iops,
                        min_iops: d.min_iops,
                        ..Default::default()
                    },
                    name: Some(name.clone()),
                    ..Default::default()
                });
            }
            let opened = spec
                .open_in(&vstor::TargetOptions::default(), &mut ctx)
                .map_err(disk_err)?;
            notes.extend(opened.notes.iter().map(|n| format!("{}: {n}", d.target)));
            let read_only = opened.device.info().read_only;
            let handle = opened.qos.map(|h| DiskQos {
                qos: h.qos,
                policy: h.policy,
                flow: h.flow,
            });
            let device = opened.device;
            qos_handles.push(handle);
            blocks.push(Arc::new(Block::with_queues(
                device, read_only, &name, d.queues,
            )));
        }
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), config.memory as usize)])
            .map_err(Error::memory)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(Error::memory)?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the Vm keeps for as long as
            // the VM exists (fields drop in declaration order: vcpus and vm before mem).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        if let Err(e) = vm.set_tss_address(0xfffb_d000) {
            notes.push(format!(
                "KVM_SET_TSS_ADDR failed ({e}); going on without it"
            ));
        }
        let irqchip = match vm.create_irq_chip() {
            Ok(()) => Some(vm.clone()),
            Err(e) => {
                notes.push(format!(
                    "no in-kernel interrupt controller ({e}): devices are polled, not interrupting"
                ));
                None
            }
        };

        let serial_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::kvm(format!("eventfd: {e}")))?;
        if irqchip.is_some() {
            vm.register_irqfd(&serial_evt, SERIAL_IRQ)
                .map_err(kvm_err("KVM_IRQFD"))?;
        }
        let serial = SerialPort::new(serial_evt);

        let control = Control::new(blocks.iter().cloned().zip(qos_handles).collect());
        let mut disks = Vec::new();
        let mut queue_io = Vec::new();
        for (i, block) in blocks.into_iter().enumerate() {
            let (transport, io) = io_thread::mmio_device(
                Box::new(block),
                mem.clone(),
                &vm,
                irqchip.is_some(),
                MMIO_IRQ + i as u32,
                MMIO_BASE + i as u64 * MMIO_SIZE,
            )
            .map_err(Error::kvm)?;
            if !io.in_kernel {
                notes.push(format!(
                    "disk {i}: KVM_IOEVENTFD failed; queue notifications exit to the VMM"
                ));
            }
            disks.push(Mutex::new(transport));
            queue_io.push(io);
        }

        boot::write_boot_structures(&mem)?;
        let entry = match &config.linux {
            Some(linux) => {
                let devices: Vec<acpi::MmioDevice> = (0..disks.len())
                    .map(|i| acpi::MmioDevice {
                        base: MMIO_BASE + i as u64 * MMIO_SIZE,
                        size: MMIO_SIZE,
                        irq: MMIO_IRQ + i as u32,
                    })
                    .collect();
                let tables = acpi::build(config.vcpus, &devices)?;
                acpi::write(&mem, &tables)?;
                if irqchip.is_none() {
                    notes.push(
                        "Linux without an in-kernel interrupt controller will not get far".into(),
                    );
                }
                linux::load(&mem, config.memory, linux, tables.rsdp_addr)?
            }
            None => Self::load_test_guest(&mem, config)?,
        };

        let supported = match kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
            Ok(cpuid) => Some(cpuid),
            Err(e) => {
                notes.push(format!(
                    "KVM_GET_SUPPORTED_CPUID failed ({e}); default CPUID"
                ));
                None
            }
        };
        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            notes.extend(vcpu::configure(
                &vcpu,
                supported.as_ref(),
                i,
                config.vcpus,
                irqchip.is_some(),
            )?);
            vcpus.push(vcpu);
        }
        if config.linux.is_some() {
            linux::setup_boot_vcpu(&vcpus[0], entry)?;
        } else {
            boot::setup_long_mode(&vcpus[0], entry, BOOT_STACK, BOOT_INFO_ADDR)?;
        }
        let run_aps = irqchip.is_some();
        if config.vcpus > 1 && !run_aps {
            notes.push(format!(
                "{} vCPUs created and configured, but without in-kernel local APICs only the \
                 first runs",
                config.vcpus
            ));
        }
        Ok(Vm {
            _kvm: kvm,
            vm,
            vcpus,
            run_aps,
            mem,
            bus: Bus {
                serial: Mutex::new(serial),
                disks,
                control,
                linux: config.linux.is_some(),
                ended: Mutex::new(None),
            },
            queue_io,
            notes,
        })
    }

    /// Loads the test guest and its boot information; returns its entry point.
    fn load_test_guest(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<u64, Error> {
        let loaded = Elf::load(
            mem,
            None,
            &mut std::io::Cursor::new(TEST_GUEST),
            Some(GuestAddress(GUEST_IMAGE_ADDR)),
        )
        .map_err(|e| Error::boot_from("loading the test guest", e))?;
        if loaded.kernel_end > 0x100_0000 {
            return Err(Error::boot(
                "the test guest's image reaches into its DMA window",
            ));
        }
        let mut info = Vec::with_capacity(96);
        info.extend_from_slice(&BOOT_MAGIC.to_le_bytes());
        info.extend_from_slice(&config.memory.to_le_bytes());
        info.extend_from_slice(&MMIO_BASE.to_le_bytes());
        info.extend_from_slice(&(config.workload.len() as u32).to_le_bytes());
        info.extend_from_slice(&MMIO_IRQ.to_le_bytes());
        let mut workload = [0u8; 64];
        workload[..config.workload.len()].copy_from_slice(config.workload.as_bytes());
        info.extend_from_slice(&workload);
        mem.write_slice(&info, GuestAddress(BOOT_INFO_ADDR))
            .map_err(|e| Error::boot_from("writing the boot information", e))?;
        Ok(loaded.kernel_load.0)
    }

    /// The guest memory (for diagnostics).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The VM's file descriptor.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The VM's control plane (resize, pause, statistics), which [`crate::api::serve`] serves.
    pub fn control(&self) -> Arc<Control> {
        self.bus.control.clone()
    }

    /// How the guest ended when [`Vm::run`] returned 0 without a status from the test guest:
    /// "the guest powered off", "the guest reset", ...
    pub fn ended(&self) -> Option<String> {
        lock(&self.bus.ended).clone()
    }

    /// Runs the vCPUs, the first on the calling thread and each other one on a thread of its
    /// own, and an I/O thread per disk queue, until the guest ends: the test guest's status on
    /// the exit port, or 0 when the guest powers off or resets ([`Vm::ended`] says which). The
    /// I/O threads are joined before it returns: QoS caps are lifted first, so that requests
    /// the guest left in flight finish at once. A VM runs once.
    pub fn run(&mut self) -> Result<u32, Error> {
        let io = IoThreads::start(&self.queue_io, self.bus.control.gate())
            .map_err(|e| Error::Config(format!("starting the I/O threads: {e}")))?;
        let result = self.run_vcpus();
        self.bus.control.lift_limits();
        io.stop();
        result
    }

    fn run_vcpus(&mut self) -> Result<u32, Error> {
        let result = Mutex::new(None);
        let bus = &self.bus;
        let (bsp, aps) = self
            .vcpus
            .split_first_mut()
            .ok_or_else(|| Error::Config("no vCPU".into()))?;
        let aps = if self.run_aps { aps } else { &mut [] };
        std::thread::scope(|scope| {
            let result = &result;
            for (i, vcpu) in aps.iter_mut().enumerate() {
                let index = i as u32 + 1;
                let spawned = std::thread::Builder::new()
                    .name(format!("vcpu{index}"))
                    .spawn_scoped(scope, move || bus.vcpu_thread(vcpu, index, result));
                if let Err(e) = spawned {
                    lock(result).get_or_insert(Err(Error::Config(format!(
                        "starting the thread of vCPU {index}: {e}"
                    ))));
                    bus.control.stop();
                }
            }
            bus.vcpu_thread(bsp, 0, result);
        });
        let outcome = lock(&result).take();
        outcome.unwrap_or_else(|| Err(Error::Guest("the VM stopped without an outcome".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::Msrs;

    #[test]
    fn every_vcpu_is_created_with_its_apic_id_cpuid_and_msrs() {
        if let Err(e) = kvm_usable() {
            eprintln!("SKIPPED every_vcpu_is_created_with_its_apic_id_cpuid_and_msrs: {e}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let vm = Vm::new(&VmConfig {
            memory: 64 << 20,
            vcpus: 3,
            disks: vec![DiskConfig::parse(disk.to_str().unwrap()).unwrap()],
            workload: "pattern".into(),
            linux: None,
        })
        .unwrap();
        assert_eq!(vm.vcpu_count(), 3);
        for (i, vcpu) in vm.vcpus.iter().enumerate() {
            if vm.run_aps {
                let lapic = vcpu.get_lapic().unwrap();
                let id: [u8; 4] = std::array::from_fn(|k| lapic.regs[0x20 + k] as u8);
                assert_eq!(
                    u32::from_le_bytes(id) >> 24,
                    i as u32,
                    "LAPIC ID of vCPU {i}"
                );
            }
            let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
            let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
            assert_eq!(leaf1.ebx >> 24, i as u32, "CPUID APIC ID of vCPU {i}");
            assert_eq!((leaf1.ebx >> 16) & 0xff, 3, "logical processors");
            let mut msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                index: 0x2ff,
                ..Default::default()
            }])
            .unwrap();
            if vcpu.get_msrs(&mut msrs).unwrap() == 1 {
                assert_eq!(
                    msrs.as_slice()[0].data,
                    (1 << 11) | 6,
                    "MTRRdefType of vCPU {i}"
                );
            }
        }
        // The boot vCPU starts at the test guest; the others are left in their reset state.
        let bsp = vm.vcpus[0].get_regs().unwrap();
        assert!(bsp.rip >= GUEST_IMAGE_ADDR, "{:#x}", bsp.rip);
        assert_eq!(
            vm.vcpus[1].get_sregs().unwrap().cr0 & 1,
            0,
            "an AP in real mode"
        );
    }

    #[test]
    fn disk_options_split_between_the_vmm_and_the_target() {
        let d = DiskConfig::parse("d.vhdx,readonly=on,max-iops=500,min-iops=100").unwrap();
        assert_eq!(d.target, "d.vhdx,readonly=on");
        assert_eq!((d.max_iops, d.min_iops), (500, 100));
        assert!(d.has_qos());
        let plain = DiskConfig::parse("d.raw").unwrap();
        assert_eq!(plain.target, "d.raw");
        assert!(!plain.has_qos());
        assert_eq!(plain.queues, 1);
        let mq = DiskConfig::parse("d.raw,queues=4,readonly=on").unwrap();
        assert_eq!((mq.target.as_str(), mq.queues), ("d.raw,readonly=on", 4));
        for bad in [
            "d.raw,max-iops=x",
            "d.raw,max-iops=10,min-iops=20",
            "",
            "d.raw,queues=0",
            "d.raw,queues=99",
        ] {
            assert!(DiskConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
