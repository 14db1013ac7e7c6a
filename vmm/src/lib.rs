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

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed (or /dev/kvm is missing).
    #[error("KVM: {0}")]
    Kvm(String),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Loading the guest or writing its boot structures failed.
    #[error("boot: {0}")]
    Boot(String),
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
