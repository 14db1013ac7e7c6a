//! The test guest of vstor-vmm: a small no_std program that the VMM starts directly in 64-bit long
//! mode, with a virtio-blk driver over virtio-mmio written as a readable example.
//!
//! Contract with the VMM (see `vmm/src/layout.rs`):
//! - it is loaded at 2 MiB and entered at `_start` with `rdi` pointing at a [`BootInfo`];
//! - guest RAM is identity-mapped (2 MiB pages, the first 4 GiB, MMIO included);
//! - text goes to the 8250 serial port at 0x3f8; the result is a 32-bit write to port 0xf4
//!   (0 = passed), after which the VMM exits with that status;
//! - port 0xf5 is the VMM's timing port: the guest writes mark 1 when it starts and mark 2 when
//!   its first I/O completes, and reads it as a microsecond clock (the benchmark workload).
//!
//! Interrupts stay disabled but while the benchmark waits for a completion (`irq`); the other
//! workloads poll the used ring.
#![no_std]
#![no_main]

mod irq;
mod virtio;
mod workload;

use core::fmt::Write;

/// The port the guest writes its status to; the VMM exits with it.
const EXIT_PORT: u16 = 0xf4;
/// The base of the 8250 UART.
const SERIAL_PORT: u16 = 0x3f8;
/// What `BootInfo::magic` holds ("VSTORGST").
const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"VSTORGST");

/// What the VMM tells the guest, written at the address passed in `rdi`.
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// Guest-physical address of the virtio-mmio window of the (first) disk.
    pub mmio_base: u64,
    /// Number of valid bytes in `workload`.
    pub workload_len: u32,
    /// The interrupt line (IOAPIC pin) of the disk (the benchmark waits for it; the other
    /// workloads poll).
    pub mmio_irq: u32,
    /// The workload name and its arguments, as given on the VMM's command line.
    pub workload: [u8; 64],
}

core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "    lea rsp, [rip + {stack} + {stack_size}]",
    "    call {main}",
    "2:  hlt",
    "    jmp 2b",
    stack = sym STACK,
    stack_size = const STACK_SIZE,
    main = sym guest_main,
);

const STACK_SIZE: usize = 64 * 1024;

/// The guest's stack (only touched through `rsp`, never through a Rust reference).
#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);
static mut STACK: Stack = Stack([0; STACK_SIZE]);

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects in this guest; the VMM emulates the ports used.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags))
    };
}

/// Reads a 32-bit value from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as in `outb`.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, preserves_flags))
    };
    v
}

/// The VMM's timing port: a write is a mark it timestamps, a read its clock in microseconds.
pub const TIMING_PORT: u16 = 0xf5;

/// Writes a 32-bit value to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

/// The serial console (the VMM's 8250 emulation is always ready to transmit).
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                outb(SERIAL_PORT, b'\r');
            }
            outb(SERIAL_PORT, b);
        }
        Ok(())
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::Serial, $($arg)*);
    }};
}

/// Reports `status` to the VMM, which ends the VM. Never returns.
pub fn exit(status: u32) -> ! {
    outl(EXIT_PORT, status);
    loop {
        // SAFETY: halting with interrupts disabled only stops this vCPU.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

extern "sysv64" fn guest_main(info: *const BootInfo) -> ! {
    // Mark 1: the guest runs (the VMM reports the time since its process started).
    outl(TIMING_PORT, 1);
    // SAFETY: the VMM passes the address of a BootInfo inside identity-mapped guest RAM.
    let info = unsafe { core::ptr::read_volatile(info) };
    if info.magic != BOOT_MAGIC {
        println!("vstor-test-guest: no boot information from the VMM");
        exit(2);
    }
    let len = (info.workload_len as usize).min(info.workload.len());
    let workload = core::str::from_utf8(&info.workload[..len]).unwrap_or("");
    println!(
        "vstor-test-guest: {} MiB of RAM, disk at {:#x}, workload '{}'",
        info.mem_size >> 20,
        info.mmio_base,
        workload
    );
    match workload::run(info.mmio_base, info.mmio_irq, workload) {
        Ok(()) => {
            println!("vstor-test-guest: PASS");
            exit(0)
        }
        Err(e) => {
            println!("vstor-test-guest: FAIL: {}", e);
            exit(1)
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("vstor-test-guest: panic: {}", info);
    exit(3)
}
