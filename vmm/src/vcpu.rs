//! Per-vCPU configuration: CPUID with the vCPU's APIC ID and the VM's topology (one socket, one
//! core per vCPU, one thread per core), the MSRs a kernel expects at boot, the FPU, and the local
//! APIC's LINT pins (LINT0 ExtINT, LINT1 NMI, as a PC's firmware leaves them).

use crate::Error;
use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

/// `kvm_cpuid_entry2.flags`: the entry depends on the subleaf index.
const CPUID_SIGNIFICANT_INDEX: u32 = 1;
/// CPUID.1:ECX: running under a hypervisor.
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX: the max-logical-processors field of EBX is valid.
const CPUID1_EDX_HTT: u32 = 1 << 28;
/// CPUID leaf 0 EBX of AMD processors ("Auth" of "AuthenticAMD").
const AMD_EBX: u32 = u32::from_le_bytes(*b"Auth");

/// Bits of an x2APIC ID that number `count` vCPUs (the shift of CPUID leaf 0xB's core level).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// The CPUID of vCPU `index` of `count`, from the entries KVM supports: APIC IDs are the vCPU
/// indexes, and leaves 1, 4, 0xB, 0x1F (and AMD's 0x80000008) describe one package of `count`
/// single-threaded cores.
pub fn cpuid_for(supported: &[kvm_cpuid_entry2], index: u32, count: u32) -> Vec<kvm_cpuid_entry2> {
    let max_basic = supported
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let amd = supported
        .iter()
        .any(|e| e.function == 0 && e.ebx == AMD_EBX);
    let bits = id_bits(count);
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| e.function != 0xb && e.function != 0x1f)
        .copied()
        .collect();
    for e in out.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, [23:16] addressable logical processor IDs.
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24);
                if count > 1 {
                    e.ebx |= count.min(255) << 16;
                    e.edx |= CPUID1_EDX_HTT;
                } else {
                    e.edx &= !CPUID1_EDX_HTT;
                }
                e.ecx |= CPUID1_ECX_HYPERVISOR;
            }
            4 if e.eax & 0x1f != 0 => {
                // EAX[31:26] cores per package - 1; [25:14] logical processors sharing this
                // cache - 1: the last level is shared by the package, the others per core.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (((count - 1) & 0x3f) << 26) | ((sharing & 0xfff) << 14);
            }
            0x8000_0008 if amd => {
                // ECX[7:0] cores - 1, [15:12] APIC ID bits of the core.
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (bits << 12);
            }
            _ => {}
        }
    }
    // Extended topology: level 0 the SMT level (1 thread, shift 0), level 1 the core level
    // (`count` cores, shift `bits`), then the terminating invalid level.
    let topology = |function: u32| {
        let levels = [(0u32, 1u32, 1u32), (bits, count, 2)];
        let mut v: Vec<kvm_cpuid_entry2> = levels
            .iter()
            .enumerate()
            .map(|(i, &(shift, n, kind))| kvm_cpuid_entry2 {
                function,
                index: i as u32,
                flags: CPUID_SIGNIFICANT_INDEX,
                eax: shift,
                ebx: n,
                ecx: (kind << 8) | i as u32,
                edx: index,
                ..Default::default()
            })
            .collect();
        v.push(kvm_cpuid_entry2 {
            function,
            index: 2,
            flags: CPUID_SIGNIFICANT_INDEX,
            ecx: 2,
            edx: index,
            ..Default::default()
        });
        v
    };
    if max_basic >= 0xb {
        out.extend(topology(0xb));
    }
    if max_basic >= 0x1f {
        out.extend(topology(0x1f));
    }
    out
}

/// The MSRs set on every vCPU before it runs: the SYSENTER/SYSCALL MSRs cleared, the TSC at
/// 0, fast string operations enabled and write-back as the default memory type (an OS that finds
/// MTRRs disabled maps all memory uncached).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_WRITE_BACK: u64 = 6;
    [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_WRITE_BACK),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

fn kvm(what: &str) -> impl Fn(kvm_ioctls::Error) -> Error + '_ {
    move |e| Error::Kvm {
        what: what.to_string(),
        source: Some(Box::new(e)),
    }
}

/// Configures vCPU `index` of `count`: CPUID from `supported` (when KVM gave it), the boot MSRs,
/// the FPU and, with an in-kernel interrupt controller, the LINT pins. Returns notes about what
/// KVM refused.
pub fn configure(
    vcpu: &VcpuFd,
    supported: Option<&CpuId>,
    index: u32,
    count: u32,
    irqchip: bool,
) -> Result<Vec<String>, Error> {
    let mut notes = Vec::new();
    if let Some(supported) = supported {
        let entries = cpuid_for(supported.as_slice(), index, count);
        let cpuid =
            CpuId::from_entries(&entries).map_err(|e| Error::kvm(format!("CPUID: {e:?}")))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    }
    let msrs = boot_msrs();
    let wanted = msrs.len();
    let msrs = Msrs::from_entries(&msrs).map_err(|e| Error::kvm(format!("MSRs: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != wanted && index == 0 {
        let refused = msrs.as_slice()[set].index;
        notes.push(format!(
            "KVM set {set} of {wanted} boot MSRs (refused MSR {refused:#x})"
        ));
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    if irqchip {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DELIVERY_EXTINT: u32 = 7;
        const DELIVERY_NMI: u32 = 4;
        let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as libc::c_char;
            }
        }
        vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x1f, u32::from_le_bytes(*b"Genu"), 0, 0),
            // Brand index 0, CLFLUSH 8 (x8 bytes), host APIC ID 0x13 and 0x40 logical CPUs.
            entry(1, 0, 0x906ea, 0x1340_0800, 0x7ffa_fbff, 0xbfeb_fbff),
            // L1d (level 1, type 1) and L3 (level 3, type 3) with host sharing fields.
            entry(4, 0, 0x1c00_4121, 0, 0, 0),
            entry(4, 3, 0x1c03_c163, 0, 0, 0),
            entry(4, 4, 0, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 0x13),
            entry(0xb, 1, 4, 16, 0x201, 0x13),
            entry(0x8000_0008, 0, 0x3027, 0, 0, 0),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *v.iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_vm_topology() {
        for count in [1u32, 2, 3, 4, 8] {
            for index in 0..count {
                let v = cpuid_for(&host(), index, count);
                let l1 = find(&v, 1, 0);
                assert_eq!(l1.ebx >> 24, index, "initial APIC ID");
                assert_eq!(l1.ebx & 0xffff, 0x0800, "brand index and CLFLUSH kept");
                assert_ne!(l1.ecx & CPUID1_ECX_HYPERVISOR, 0);
                if count > 1 {
                    assert_eq!((l1.ebx >> 16) & 0xff, count);
                    assert_ne!(l1.edx & CPUID1_EDX_HTT, 0);
                }
                // Leaf 0xB and 0x1F: SMT level, core level, terminator; x2APIC ID = index.
                for f in [0xb, 0x1f] {
                    let smt = find(&v, f, 0);
                    let core = find(&v, f, 1);
                    let end = find(&v, f, 2);
                    assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8), (0, 1, 1));
                    assert_eq!((core.ebx, core.ecx >> 8, core.ecx & 0xff), (count, 2, 1));
                    assert!(1u32 << core.eax >= count, "the shift covers {count} IDs");
                    assert_eq!(end.ecx >> 8, 0, "level 2 is invalid");
                    for e in [smt, core, end] {
                        assert_eq!(e.edx, index);
                        assert_eq!(e.flags & CPUID_SIGNIFICANT_INDEX, 1);
                    }
                }
                // No stale host topology entries are left.
                assert_eq!(v.iter().filter(|e| e.function == 0xb).count(), 3);
                let l1d = find(&v, 4, 0);
                let l3 = find(&v, 4, 3);
                assert_eq!(l1d.eax >> 26, count - 1);
                assert_eq!((l1d.eax >> 14) & 0xfff, 0, "L1 is per core");
                assert_eq!((l3.eax >> 14) & 0xfff, count - 1, "L3 is shared");
                assert_eq!(l3.eax & 0x3fff, 0x0163, "cache type and level kept");
            }
        }
    }

    #[test]
    fn amd_core_count_is_in_leaf_80000008() {
        let mut h = host();
        h[0].ebx = AMD_EBX;
        let v = cpuid_for(&h, 1, 4);
        let e = find(&v, 0x8000_0008, 0);
        assert_eq!(e.ecx & 0xff, 3);
        assert_eq!((e.ecx >> 12) & 0xf, 2);
        // On Intel the leaf is left alone.
        let v = cpuid_for(&host(), 1, 4);
        assert_eq!(find(&v, 0x8000_0008, 0).ecx, 0);
    }

    #[test]
    fn topology_leaves_only_where_the_cpu_has_them() {
        let mut h = host();
        h[0].eax = 0xd;
        let v = cpuid_for(&h, 0, 2);
        assert_eq!(v.iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(v.iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn boot_msrs_enable_write_back_mtrrs() {
        let m = boot_msrs();
        let def = m.iter().find(|e| e.index == 0x2ff).unwrap();
        assert_eq!(def.data, (1 << 11) | 6);
        assert_eq!(m.iter().find(|e| e.index == 0x1a0).unwrap().data & 1, 1);
    }
}
