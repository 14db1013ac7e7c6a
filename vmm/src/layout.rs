//! The guest-physical memory map of a vstor-vmm VM (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT (4 entries), then a null IDT at 0x520
//! 0x0000_6000  BootInfo for the test guest (the guest finds it in rdi)
//! 0x0000_7000  Linux: the boot_params "zero page" (the kernel finds it in rsi)
//! 0x0000_9000  page tables: PML4, PDPT at 0xa000, four page directories at 0xb000..0xf000
//!              (identity map of the first 4 GiB with 2 MiB pages)
//! 0x0002_0000  Linux: the kernel command line (at most 4 KiB)
//! 0x0009_fc00  end of low RAM for Linux (the e820 map leaves 0x9_fc00..0x10_0000 out)
//! 0x000e_0000  ACPI tables: RSDP, then DSDT, FADT, MADT, XSDT (up to 0x10_0000)
//! 0x0010_0000  Linux: the kernel (a bzImage's protected-mode code; an ELF where it is linked)
//! 0x0020_0000  the test guest's image (linked there; see vmm/guest/link.ld)
//! 0x0100_0000  the test guest's DMA window (16 MiB to 32 MiB)
//! ..mem_size   end of guest RAM (at most 3 GiB); Linux's initrd at its top
//! 0xd000_0000  virtio-mmio windows, 4 KiB each, one per disk
//! 0xfec0_0000  IO-APIC, 0xfee0_0000 local APICs (KVM's in-kernel interrupt controller)
//! ```
//! Ports: 0x3f8-0x3ff 8250 serial (IRQ 4), 0xf4 the test guest's exit port (32-bit status),
//! 0x600 the ACPI sleep control/status and reset register (FADT), 0xcf9 the reset control
//! register, 0x64 the keyboard controller's command port (0xfe: reset), 0xf5 the timing port
//! (see [`crate::timing`]).

/// The GDT.
pub const GDT_ADDR: u64 = 0x500;
/// The (empty) IDT.
pub const IDT_ADDR: u64 = 0x520;
/// Where the test guest's boot information goes.
pub const BOOT_INFO_ADDR: u64 = 0x6000;
/// The top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// The first of four page directories.
pub const PD_ADDR: u64 = 0xb000;
/// The initial stack pointer (the test guest switches to its own stack at once).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Where the test guest is linked; guest images must not load below it.
pub const GUEST_IMAGE_ADDR: u64 = 0x20_0000;
/// The smallest guest RAM the test guest can run in (its DMA window ends at 32 MiB).
pub const MIN_MEMORY: u64 = 32 << 20;
/// The largest guest RAM (below the MMIO windows).
pub const MAX_MEMORY: u64 = 3 << 30;
/// The first virtio-mmio window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const MMIO_SIZE: u64 = 0x1000;
/// The interrupt line of the first virtio-mmio device (the next ones follow).
pub const MMIO_IRQ: u32 = 5;
/// The 8250 serial port's base.
pub const SERIAL_PORT: u16 = 0x3f8;
/// The serial port's interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// The test guest's exit port.
pub const EXIT_PORT: u16 = 0xf4;
/// Linux: the boot_params "zero page".
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Linux: the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Linux: the largest command line (with its terminating zero).
pub const CMDLINE_MAX: usize = 4096;
/// End of the low RAM that the e820 map gives Linux (the EBDA and BIOS area above it are not
/// RAM for the guest).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Where the ACPI tables start (the RSDP first; Linux also finds it by scanning 0xe0000..).
pub const ACPI_ADDR: u64 = 0xe_0000;
/// Where the ACPI tables must end.
pub const ACPI_END: u64 = 0x10_0000;
/// Start of high RAM (1 MiB): where a bzImage's protected-mode code loads.
pub const HIMEM_START: u64 = 0x10_0000;
/// The IO-APIC's MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs' MMIO address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The ACPI sleep control/status and reset register (hardware-reduced ACPI, in the FADT).
pub const ACPI_PM_PORT: u16 = 0x600;
/// The value written to [`ACPI_PM_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 1;
/// The sleep type of S5 (soft off) in the DSDT's `_S5_` package.
pub const ACPI_S5_TYPE: u8 = 5;
/// The reset control register of PC chipsets (bit 2 set: reset).
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// The keyboard controller's command port (command 0xfe pulses the reset line).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The most vCPUs (APIC IDs are one byte in the MADT's local APIC entries; KVM's limit is
/// higher).
pub const MAX_VCPUS: u32 = 254;
/// The timing port: marks written, a clock read ([`crate::timing`]).
pub const TIMING_PORT: u16 = 0xf5;
