//! The guest-physical memory map of a vstor-vmm VM (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT (4 entries), then a null IDT at 0x520
//! 0x0000_6000  BootInfo for the test guest (the guest finds it in rdi)
//! 0x0000_9000  page tables: PML4, PDPT at 0xa000, four page directories at 0xb000..0xf000
//!              (identity map of the first 4 GiB with 2 MiB pages)
//! 0x0020_0000  the test guest's image (linked there; see vmm/guest/link.ld)
//! 0x0100_0000  the test guest's DMA window (16 MiB to 32 MiB)
//! ..mem_size   end of guest RAM (at most 3 GiB)
//! 0xd000_0000  virtio-mmio windows, 4 KiB each, one per disk
//! ```
//! Ports: 0x3f8-0x3ff 8250 serial (IRQ 4), 0xf4 the test guest's exit port (32-bit status),
//! 0xf5 the timing port (see [`crate::timing`]).

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
/// The timing port: marks written, a clock read ([`crate::timing`]).
pub const TIMING_PORT: u16 = 0xf5;
