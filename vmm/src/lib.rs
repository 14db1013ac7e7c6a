//! vstor-vmm: the reference KVM VMM that serves vstor stacks to a guest over virtio-blk.
//!
//! A small VMM on the rust-vmm crates (kvm-ioctls, kvm-bindings, vm-memory, linux-loader,
//! virtio-queue, vm-superio, vmm-sys-util) whose disks are any vstor target string
//! (`disk.raw`, `disk.vhdx`, `pool:DIR/NAME`, with options such as `readonly=on`).
//!
//! What exists:
//! - [`vm::Vm`]: guest memory, `--vcpus N` vCPUs on a thread each ([`vcpu`]: CPUID with each
//!   vCPU's APIC ID and the VM's topology, boot MSRs, FPU, LAPIC LINT pins; the first starts
//!   directly in 64-bit long mode ([`boot`]), the others wait in KVM to be started by the guest,
//!   as a PC's application processors do), an
//!   8250 serial console on stdout ([`serial`]), a virtio-mmio device per disk ([`virtio::mmio`])
//!   serving virtio-blk ([`virtio::block`]) with validated descriptor chains; the available
//!   chains of a queue go down to the stack as one batch. The device offers FLUSH, BLK_SIZE,
//!   SEG_MAX, SIZE_MAX, RO, GET_ID, DISCARD and WRITE_ZEROES (where the stack supports them),
//!   CONFIG_WCE (write-back/write-through switch), EVENT_IDX, and MQ with `queues=N`.
//! - I/O threads ([`virtio::io_thread`]): one per queue, woken by an ioeventfd on the queue's
//!   QueueNotify write (KVM_IOEVENTFD with the queue index as data match, so a notification never
//!   leaves the kernel), completing through an irqfd. A disk held back by its QoS cap holds its
//!   queue's thread, not the vCPU; pause holds the threads before their next batch; at the end
//!   QoS caps are lifted and the threads joined, so a guest that leaves requests in flight does
//!   not hang the VMM.
//! - The test guest (vmm/guest): a no_std virtio-blk driver built for `x86_64-unknown-none` by
//!   build.rs and embedded ([`vm::TEST_GUEST`]); it runs a workload (among them `mq` over every
//!   queue and `bench read|write DEPTH SIZE COUNT`, random I/O that keeps DEPTH requests in
//!   flight, halts for interrupts and reports IOPS) and reports its status on port 0xf4, which
//!   becomes the VMM's exit status. On port 0xf5 ([`timing`]) it marks its first instructions
//!   and its first completed I/O, which the VMM reports as times since its process started.
//! - [`api`]: the control plane and its Unix-socket API (`--api-socket`): resize a disk (the
//!   VMM follows the stack's capacity signal, so the guest gets a configuration-change interrupt
//!   and the new capacity; the `capacity` workload waits for it), per-disk statistics (requests,
//!   queue services, interrupts, per-queue requests, vCPU exits), pause and resume (every vCPU
//!   is kicked out of KVM_RUN with a signal, the I/O threads stop before their next batch), QoS
//!   limits changed at run time.
//! - Linux boot ([`linux`], `--kernel`/`--initrd`/`--cmdline`): a bzImage or an ELF vmlinux
//!   loaded through linux-loader and entered at its 64-bit entry with a boot_params zero page
//!   (e820 map, command line, initrd at the top of RAM, ACPI RSDP address); ACPI tables built
//!   with `acpi_tables` ([`acpi`]: RSDP, XSDT, a hardware-reduced FADT, a MADT with a local APIC
//!   per vCPU, a DSDT with an `LNRO0005` device per disk, which is how Debian's cloud kernel
//!   finds virtio-mmio devices). The guest's power off (the FADT's sleep control register with
//!   `_S5_`) and its resets (the FADT reset register, 0xcf9, the 8042's 0xfe, a triple fault)
//!   end the VMM. scripts/make-initramfs builds a Debian kernel and busybox initramfs that
//!   tests /dev/vda; booting it needs hardware KVM (PVM, a software hypervisor, gets a stock
//!   kernel through early boot and then stops on an emulation failure; see the README).
//! - Storage QoS per disk: `max-iops=N`/`min-iops=N` on `--disk` ([`DiskConfig::parse`]) serve
//!   the disk through vstor-qos (one scheduler per VM, a dedicated policy per disk).
//!
//! Not yet: an MP table (ACPI's MADT is the only description of the vCPUs), PCI, vCPU hotplug,
//! and a Linux boot proven on hardware KVM (the test that does it skips where there is none); a
//! batch's completions are published together (the stack completes a batch as a whole), so a
//! queue's requests are served in rounds rather than as each finishes.
//!
//! The device model and transport are fuzzed without KVM by fuzz/fuzz_targets/virtio_blk.rs
//! (logic in vmm/tests/fuzz_logic, replayed by the `fuzz_regressions` test).
#![deny(missing_docs)]

pub mod acpi;
pub mod api;
pub mod boot;
pub mod layout;
pub mod linux;
pub mod serial;
pub mod timing;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use linux::LinuxConfig;
pub use vm::{kvm_usable, DiskConfig, Vm, VmConfig};

/// A lower error kept whole under a VMM error, so that callers reach it with `source()`.
pub type Source = Box<dyn std::error::Error + Send + Sync>;

fn with_source(what: &str, source: &Option<Source>) -> String {
    match source {
        Some(s) => format!("{what}: {s}"),
        None => what.to_string(),
    }
}

/// Errors of the VMM. Messages say what was being done; the lower error stays reachable through
/// `std::error::Error::source`, and [`Error::kind`] sorts them as vstor's own errors are.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed (or /dev/kvm is missing).
    #[error("KVM: {}", with_source(what, source))]
    Kvm {
        /// What was being done.
        what: String,
        /// The ioctl's error.
        #[source]
        source: Option<Source>,
    },
    /// Guest memory could not be set up.
    #[error("guest memory: {}", with_source(what, source))]
    Memory {
        /// What was being done.
        what: String,
        /// The memory layer's error.
        #[source]
        source: Option<Source>,
    },
    /// Loading the guest or writing its boot structures failed.
    #[error("boot: {}", with_source(what, source))]
    Boot {
        /// What was being done.
        what: String,
        /// The lower error, if any.
        #[source]
        source: Option<Source>,
    },
    /// A disk could not be opened.
    #[error("disk {target}: {source}")]
    Disk {
        /// The target string.
        target: String,
        /// Why.
        #[source]
        source: vstor::Error,
    },
    /// A configuration that cannot run.
    #[error("{0}")]
    Config(String),
    /// The guest stopped without reporting a status.
    #[error("the guest failed: {0}")]
    Guest(String),
}

impl Error {
    /// A KVM failure without a lower error.
    pub fn kvm(what: impl Into<String>) -> Error {
        Error::Kvm {
            what: what.into(),
            source: None,
        }
    }

    /// A boot failure without a lower error.
    pub fn boot(what: impl Into<String>) -> Error {
        Error::Boot {
            what: what.into(),
            source: None,
        }
    }

    /// A boot failure caused by `source`.
    pub fn boot_from(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Boot {
            what: what.into(),
            source: Some(Box::new(source)),
        }
    }

    /// A guest-memory failure caused by `source`.
    pub fn memory(source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Memory {
            what: "setting up guest memory".into(),
            source: Some(Box::new(source)),
        }
    }

    /// What sort of failure this is, as vstor's errors say it.
    pub fn kind(&self) -> vstor::ErrorKind {
        match self {
            Error::Kvm { .. } => vstor::ErrorKind::Unavailable,
            Error::Memory { .. } => vstor::ErrorKind::NoSpace,
            Error::Boot { .. } | Error::Config(_) => vstor::ErrorKind::InvalidInput,
            Error::Disk { source, .. } => source.kind(),
            Error::Guest(_) => vstor::ErrorKind::Io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn errors_keep_their_sources_and_kinds() {
        let io = std::io::Error::from_raw_os_error(libc::ENOMEM);
        let e = Error::boot_from("writing boot structures at 0x7000", io);
        assert!(
            e.to_string()
                .starts_with("boot: writing boot structures at 0x7000: "),
            "{e}"
        );
        let src = e.source().expect("the lower error is kept");
        assert_eq!(
            src.downcast_ref::<std::io::Error>()
                .and_then(|e| e.raw_os_error()),
            Some(libc::ENOMEM)
        );
        assert_eq!(e.kind(), vstor::ErrorKind::InvalidInput);
        assert!(Error::kvm("KVM API version 11").source().is_none());
        assert_eq!(Error::kvm("x").kind(), vstor::ErrorKind::Unavailable);
        let disk = Error::Disk {
            target: "d.raw".into(),
            source: vstor::Error::Core(vstor::core::Error::Locked {
                path: "d.raw".into(),
                exclusive: true,
                holder: None,
            }),
        };
        assert_eq!(disk.kind(), vstor::ErrorKind::InUse);
        assert!(disk.source().is_some());
    }
}
