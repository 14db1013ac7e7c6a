//! Starting a vCPU directly in 64-bit long mode: identity-mapped page tables, a flat GDT, and the
//! control registers (CR0, CR3, CR4, EFER) set by the VMM, so that the guest's first instruction
//! is already 64-bit code.

use crate::layout::{GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use crate::Error;
use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT entries: null, 64-bit code, data, TSS (the flat model every 64-bit VMM uses).
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_SELECTOR: u16 = 8;
const DATA_SELECTOR: u16 = 16;
const TSS_SELECTOR: u16 = 24;

/// A GDT entry from its flags (access byte and the flags nibble), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register a GDT entry describes.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

fn write(mem: &GuestMemoryMmap, addr: u64, v: u64) -> Result<(), Error> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|e| Error::boot_from(format!("writing boot structures at {addr:#x}"), e))
}

/// Writes the GDT, an empty IDT and page tables that identity-map the first 4 GiB with 2 MiB
/// pages (guest RAM and the MMIO windows alike).
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (i, e) in GDT.iter().enumerate() {
        write(mem, GDT_ADDR + 8 * i as u64, *e)?;
    }
    write(mem, IDT_ADDR, 0)?;
    const PRESENT_RW: u64 = 0b11;
    const HUGE: u64 = 1 << 7;
    write(mem, PML4_ADDR, PDPT_ADDR | PRESENT_RW)?;
    for dir in 0..4u64 {
        let pd = PD_ADDR + dir * 0x1000;
        write(mem, PDPT_ADDR + 8 * dir, pd | PRESENT_RW)?;
        for i in 0..512u64 {
            let frame = (dir * 512 + i) << 21;
            write(mem, pd + 8 * i, frame | PRESENT_RW | HUGE)?;
        }
    }
    Ok(())
}

/// Puts `vcpu` in 64-bit long mode, at `entry` with `rsp` = `stack` and `rdi` = `arg`.
pub fn setup_long_mode(vcpu: &VcpuFd, entry: u64, stack: u64, arg: u64) -> Result<(), Error> {
    let kvm = |what: &str, e: kvm_ioctls::Error| Error::kvm(format!("{what}: {e}"));
    let mut sregs = vcpu.get_sregs().map_err(|e| kvm("KVM_GET_SREGS", e))?;
    let code = segment(GDT[1], CODE_SELECTOR);
    let data = segment(GDT[2], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT[3], TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| kvm("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rip: entry,
        rsp: stack,
        rbp: stack,
        rdi: arg,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| kvm("KVM_SET_REGS", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_64_bit_segments() {
        let code = segment(GDT[1], CODE_SELECTOR);
        assert_eq!((code.base, code.limit), (0, 0xffff_ffff));
        assert_eq!(
            (code.l, code.db, code.present, code.s, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        let data = segment(GDT[2], DATA_SELECTOR);
        assert_eq!((data.l, data.db, data.type_, data.unusable), (0, 1, 3, 0));
        let tss = segment(GDT[3], TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        // The MMIO window at 0xd000_0000 is mapped to itself.
        let addr = crate::layout::MMIO_BASE;
        let pdpte: u64 = mem
            .read_obj(GuestAddress(PDPT_ADDR + 8 * (addr >> 30)))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + 8 * ((addr >> 21) & 511)))
            .unwrap();
        assert_eq!(pde & !0x1f_ffff, addr);
        assert_eq!(pde & 0x83, 0x83);
    }
}
