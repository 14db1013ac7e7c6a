//! Interrupts, for the workloads that wait for completions instead of spinning on the used
//! ring: an IDT whose vector 0x30 acknowledges the local APIC and returns, the local APIC
//! enabled, and the IOAPIC pin of the disk routed (edge-triggered: the VMM's irqfd signals
//! edges) to vector 0x30 on this CPU. A waiting vCPU halts: KVM keeps a halted vCPU in the kernel
//! until the interrupt, so the host thread sleeps instead of competing for a CPU.
//!
//! Interrupts stay disabled except inside [`wait`]'s `sti; hlt`, so nothing else ever runs in an
//! interrupt's context.

use core::ptr::write_volatile;

/// The vector of the disk's interrupt.
const VECTOR: usize = 0x30;
/// The local APIC's spurious vector (no EOI for it).
const SPURIOUS: usize = 0xff;
const LAPIC: u64 = 0xfee0_0000;
const LAPIC_TPR: u64 = LAPIC + 0x80;
const LAPIC_SVR: u64 = LAPIC + 0xf0;
const LAPIC_LVT_LINT0: u64 = LAPIC + 0x350;
const IOAPIC_SEL: u64 = 0xfec0_0000;
const IOAPIC_WIN: u64 = 0xfec0_0010;
const IA32_APIC_BASE: u32 = 0x1b;

core::arch::global_asm!(
    ".section .text.vstor_irq, \"ax\"",
    ".global vstor_irq_disk",
    "vstor_irq_disk:",
    "    push rax",
    "    movabs rax, 0xfee000b0",
    "    mov dword ptr [rax], 0",
    "    pop rax",
    "    iretq",
    ".global vstor_irq_spurious",
    "vstor_irq_spurious:",
    "    iretq",
);

extern "C" {
    fn vstor_irq_disk();
    fn vstor_irq_spurious();
}

/// 256 gates of 16 bytes.
#[repr(C, align(16))]
struct Idt([u64; 512]);
static mut IDT: Idt = Idt([0; 512]);

fn gate(handler: u64, cs: u16) -> (u64, u64) {
    let low = (handler & 0xffff)
        | u64::from(cs) << 16
        | 0x8e << 40 // present, DPL 0, 64-bit interrupt gate
        | ((handler >> 16) & 0xffff) << 48;
    (low, handler >> 32)
}

fn mmio_write(addr: u64, v: u32) {
    // SAFETY: `addr` is a register of the local APIC or the IOAPIC, identity-mapped.
    unsafe { write_volatile(addr as *mut u32, v) }
}

/// Sets up the IDT, the local APIC and IOAPIC pin `pin` (the disk's line).
pub fn init(pin: u32) {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    let idt = core::ptr::addr_of_mut!(IDT);
    // Every external vector acknowledges the local APIC and returns (only 0x30 is expected).
    for (vector, handler) in (32..256).map(|v| {
        let h = if v == SPURIOUS {
            vstor_irq_spurious as *const () as usize
        } else {
            vstor_irq_disk as *const () as usize
        };
        (v, h as u64)
    }) {
        let (low, high) = gate(handler, cs);
        // SAFETY: the IDT is ours, written before it is loaded, with interrupts disabled.
        unsafe {
            (*idt).0[2 * vector] = low;
            (*idt).0[2 * vector + 1] = high;
        }
    }
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer {
        limit: (256 * 16 - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the IDT lives for the whole program; its gates point at the handlers above, and
    // only vectors 0x30 and 0xff can be raised (no other source is unmasked).
    unsafe { core::arch::asm!("lidt [{0}]", in(reg) &pointer, options(readonly, nostack)) };
    // The local APIC: enabled in its base MSR and by its spurious vector register, no priority
    // threshold.
    let (lo, hi): (u32, u32);
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU with an APIC (KVM's in-kernel one).
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") IA32_APIC_BASE, out("eax") lo, out("edx") hi, options(nomem, nostack));
        core::arch::asm!("wrmsr", in("ecx") IA32_APIC_BASE, in("eax") lo | 1 << 11, in("edx") hi, options(nomem, nostack));
    }
    mmio_write(LAPIC_TPR, 0);
    mmio_write(LAPIC_SVR, 0x100 | SPURIOUS as u32);
    // The legacy PIC, which KVM also drives from the disk's and the serial port's lines, is
    // masked at both ends: in its mask registers and at LINT0 (which KVM resets to ExtINT).
    crate::outb(0x21, 0xff);
    crate::outb(0xa1, 0xff);
    mmio_write(LAPIC_LVT_LINT0, 1 << 16);
    // IOAPIC redirection entry of the pin: destination APIC 0 (high half first), then vector
    // 0x30, fixed delivery, physical destination, active high, edge, unmasked.
    mmio_write(IOAPIC_SEL, 0x11 + 2 * pin);
    mmio_write(IOAPIC_WIN, 0);
    mmio_write(IOAPIC_SEL, 0x10 + 2 * pin);
    mmio_write(IOAPIC_WIN, VECTOR as u32);
}

/// Halts until an interrupt (the caller has asked the device for one and checked, after asking,
/// that what it waits for has not happened yet). `sti` takes effect after `hlt` has begun, so an
/// interrupt that is already pending wakes it at once.
pub fn wait() {
    // SAFETY: the IDT handles the only unmasked vectors; interrupts are off again on return.
    unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
}
