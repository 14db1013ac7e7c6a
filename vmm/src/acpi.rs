//! ACPI tables for a Linux guest, built with the `acpi_tables` crate: RSDP, XSDT, a
//! hardware-reduced FADT, a MADT with a local APIC per vCPU and the IO-APIC, and a DSDT that
//! describes each virtio-mmio device as an `LNRO0005` device (the ACPI ID Linux's virtio_mmio
//! driver matches) with its MMIO window and interrupt, so a stock kernel finds the disks without
//! `virtio_mmio.device=` on its command line (Debian's cloud kernel is built without that option).
//!
//! Power: the FADT's sleep control/status registers and its reset register are the I/O port
//! [`ACPI_PM_PORT`]; the DSDT's `_S5_` object gives the sleep type of soft-off, so `poweroff`
//! in the guest writes `(5 << 2) | SLP_EN` there and a reboot writes [`ACPI_RESET_VALUE`].
//! [`power_event`] decodes those writes.

use crate::layout::{
    ACPI_ADDR, ACPI_END, ACPI_PM_PORT, ACPI_RESET_VALUE, ACPI_S5_TYPE, IOAPIC_ADDR, LAPIC_ADDR,
    SERIAL_IRQ, SERIAL_PORT,
};
use crate::Error;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const OEM_ID: [u8; 6] = *b"VSTOR ";
const OEM_TABLE_ID: [u8; 8] = *b"VSTORVMM";
const OEM_REVISION: u32 = 1;

/// The ACPI hardware ID of a virtio-mmio device (Linux: drivers/virtio/virtio_mmio.c).
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// The window's guest-physical address.
    pub base: u64,
    /// The window's size.
    pub size: u64,
    /// Its interrupt (a GSI of the IO-APIC; edge-triggered, active high).
    pub irq: u32,
}

/// The tables, each with its guest-physical address.
#[derive(Debug, Clone)]
pub struct Tables {
    /// Where the RSDP is (boot_params.acpi_rsdp_addr).
    pub rsdp_addr: u64,
    /// (address, bytes) of the RSDP and each table.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// Already-built AML bytes as an [`Aml`] object (so devices built in a loop can be children of
/// one scope).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// The DSDT: `\_SB_.VRnn` (an `LNRO0005` device per virtio-mmio window), `\_SB_.COM1` (the
/// 8250 serial port) and `\_S5_`.
pub fn dsdt(devices: &[MmioDevice]) -> Result<Vec<u8>, Error> {
    let mut children = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let (Ok(base), Ok(size)) = (u32::try_from(d.base), u32::try_from(d.size)) else {
            return Err(Error::boot(format!(
                "virtio-mmio window {:#x}+{:#x} is above 4 GiB",
                d.base, d.size
            )));
        };
        let name = format!("VR{i:02X}");
        if name.len() != 4 {
            return Err(Error::Config(format!("too many virtio-mmio devices ({i})")));
        }
        let uid = i as u32;
        let memory = aml::Memory32Fixed::new(true, base, size);
        // Edge-triggered, active high, exclusive: completions are signalled through a KVM irqfd,
        // which injects an edge (the driver reads the cause from the interrupt status register).
        let irq = aml::Interrupt::new(true, true, false, false, d.irq);
        let crs = aml::ResourceTemplate::new(vec![&memory, &irq]);
        // (Built and serialized in one statement: the children are temporaries.)
        children.push(Raw(bytes(&aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        ))));
    }
    let com_io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 0, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com_crs = aml::ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com1 = Raw(bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com_crs),
        ],
    )));
    let mut scope: Vec<&dyn Aml> = children.iter().map(|c| c as &dyn Aml).collect();
    scope.push(&com1);
    let sb = aml::Scope::new("_SB_".into(), scope);
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&ACPI_S5_TYPE]));

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&bytes(&sb));
    table.append_slice(&bytes(&s5));
    Ok(table.as_slice().to_vec())
}

/// The MADT: a local APIC per vCPU (processor UID and APIC ID = the vCPU's index), the IO-APIC
/// (GSIs from 0) and interrupt source overrides that give the serial port's IRQ (edge, active
/// high) and each virtio-mmio IRQ (edge, active high: an irqfd) their GSI of the same number.
pub fn madt(vcpus: u32, devices: &[MmioDevice]) -> Result<Vec<u8>, Error> {
    let mut table = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.write_u32(36, LAPIC_ADDR);
    // PCAT_COMPAT: KVM's in-kernel interrupt controller has the dual 8259 too.
    table.write_u32(40, 1);
    for i in 0..vcpus {
        let id = u8::try_from(i)
            .map_err(|_| Error::Config(format!("{vcpus} vCPUs: APIC IDs above 255")))?;
        table.append_slice(&bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    table.append_slice(&bytes(&IoApic::new(0, IOAPIC_ADDR, 0)));
    let mut overrides = vec![(SERIAL_IRQ, 0u16)];
    // MPS INTI flags: polarity active high (01), trigger edge (01 << 2).
    overrides.extend(devices.iter().map(|d| (d.irq, 0b0101u16)));
    for (irq, flags) in overrides {
        let source = u8::try_from(irq)
            .map_err(|_| Error::Config(format!("interrupt {irq} is not an ISA source")))?;
        let mut entry = vec![2u8, 10, 0, source];
        entry.extend_from_slice(&irq.to_le_bytes());
        entry.extend_from_slice(&flags.to_le_bytes());
        table.append_slice(&entry);
    }
    Ok(table.as_slice().to_vec())
}

/// The FADT of a hardware-reduced ACPI platform whose DSDT is at `dsdt_addr`, with the sleep
/// control/status and reset registers at [`ACPI_PM_PORT`].
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_PM_PORT),
    );
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.reset_reg = port;
    builder.reset_value = ACPI_RESET_VALUE;
    builder.sleep_control_reg = port;
    builder.sleep_status_reg = port;
    // IA-PC boot architecture flags: no VGA (bit 2), no CMOS RTC (bit 5); no 8042 (bit 1 clear).
    builder.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    let mut v = Vec::new();
    builder.finalize().to_aml_bytes(&mut v);
    v
}

/// Builds every table for `vcpus` vCPUs and these devices, laid out from [`ACPI_ADDR`]: RSDP,
/// DSDT, FADT, MADT, XSDT (each 16-byte aligned).
pub fn build(vcpus: u32, devices: &[MmioDevice]) -> Result<Tables, Error> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_ADDR;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(devices)?;
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus, devices)?;
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(Error::boot(format!(
            "the ACPI tables need {} bytes, more than the {} they have",
            end - ACPI_ADDR,
            ACPI_END - ACPI_ADDR
        )));
    }
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(Tables {
        rsdp_addr,
        blobs: vec![
            (rsdp_addr, rsdp),
            (dsdt_addr, dsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (xsdt_addr, xsdt),
        ],
    })
}

/// Writes the tables into guest memory.
pub fn write(mem: &GuestMemoryMmap, tables: &Tables) -> Result<(), Error> {
    for (addr, blob) in &tables.blobs {
        mem.write_slice(blob, GuestAddress(*addr))
            .map_err(|e| Error::boot_from(format!("writing ACPI tables at {addr:#x}"), e))?;
    }
    Ok(())
}

/// What a guest's write to a power-management port asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// Soft off (ACPI S5).
    PowerOff,
    /// Reset.
    Reset,
}

/// Decodes a guest write of `data` to I/O `port`: the ACPI sleep control/reset register
/// ([`ACPI_PM_PORT`]: `SLP_EN` with the S5 sleep type, or the reset value), the reset control
/// register (0xcf9, bit 2) and the keyboard controller's reset command (0xfe to 0x64).
pub fn power_event(port: u16, data: &[u8]) -> Option<PowerEvent> {
    use crate::layout::{I8042_COMMAND_PORT, RESET_CONTROL_PORT};
    let &v = data.first()?;
    match port {
        ACPI_PM_PORT => {
            const SLP_EN: u8 = 1 << 5;
            if v == ACPI_RESET_VALUE {
                Some(PowerEvent::Reset)
            } else if v & SLP_EN != 0 && (v >> 2) & 7 == ACPI_S5_TYPE {
                Some(PowerEvent::PowerOff)
            } else {
                None
            }
        }
        RESET_CONTROL_PORT if data.len() == 1 && v & 4 != 0 => Some(PowerEvent::Reset),
        I8042_COMMAND_PORT if v == 0xfe => Some(PowerEvent::Reset),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_BASE, MMIO_IRQ, MMIO_SIZE};

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    fn devices(n: usize) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: MMIO_BASE + i as u64 * MMIO_SIZE,
                size: MMIO_SIZE,
                irq: MMIO_IRQ + i as u32,
            })
            .collect()
    }

    /// The tables as guest memory holds them, followed from the RSDP like an OS does.
    struct Walk {
        mem: GuestMemoryMmap,
    }

    impl Walk {
        fn table(&self, addr: u64) -> Vec<u8> {
            let len: u32 = self.mem.read_obj(GuestAddress(addr + 4)).unwrap();
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            assert_eq!(
                sum(&b),
                0,
                "checksum of {}",
                String::from_utf8_lossy(&b[..4])
            );
            b
        }
    }

    fn walk(vcpus: u32, n: usize) -> (Walk, Vec<u8>, Vec<u8>, Vec<u8>) {
        let tables = build(vcpus, &devices(n)).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, &tables).unwrap();
        let w = Walk { mem };
        assert_eq!(tables.rsdp_addr, ACPI_ADDR);
        let mut rsdp = [0u8; 36];
        w.mem
            .read_slice(&mut rsdp, GuestAddress(tables.rsdp_addr))
            .unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        let xsdt = w.table(le64(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| le64(&xsdt, o))
            .collect();
        let tables: Vec<Vec<u8>> = entries.iter().map(|&a| w.table(a)).collect();
        let find = |sig: &[u8]| {
            tables
                .iter()
                .find(|t| &t[..4] == sig)
                .unwrap_or_else(|| panic!("no {} in the XSDT", String::from_utf8_lossy(sig)))
                .clone()
        };
        let fadt = find(b"FACP");
        let madt = find(b"APIC");
        // FADT: X_DSDT at offset 140.
        let dsdt = w.table(le64(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        (w, fadt, madt, dsdt)
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let (_, fadt, _, _) = walk(2, 1);
        assert_eq!(fadt.len(), 276, "an ACPI 6 FADT");
        let flags = le32(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG (GAS at 116): system I/O, 8 bits, the PM port; RESET_VALUE at 128.
        assert_eq!(fadt[116], 1);
        assert_eq!(fadt[117], 8);
        assert_eq!(le64(&fadt, 120), u64::from(ACPI_PM_PORT));
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        // SLEEP_CONTROL_REG at 244 and SLEEP_STATUS_REG at 256: the same port.
        for at in [244, 256] {
            assert_eq!(fadt[at], 1);
            assert_eq!(le64(&fadt, at + 4), u64::from(ACPI_PM_PORT));
        }
    }

    #[test]
    fn madt_has_one_local_apic_per_vcpu_and_the_io_apic() {
        for vcpus in [1, 2, 4, 8] {
            let (_, _, madt, _) = walk(vcpus, 3);
            assert_eq!(le32(&madt, 36), LAPIC_ADDR);
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut overrides = Vec::new();
            let mut at = 44;
            while at < madt.len() {
                let (kind, len) = (madt[at], madt[at + 1] as usize);
                assert!(len >= 2 && at + len <= madt.len(), "entry at {at}");
                match kind {
                    0 => {
                        assert_eq!(le32(&madt, at + 4) & 1, 1, "enabled");
                        lapics.push((madt[at + 2], madt[at + 3]));
                    }
                    1 => ioapics.push((madt[at + 2], le32(&madt, at + 4), le32(&madt, at + 8))),
                    2 => overrides.push((
                        madt[at + 3],
                        le32(&madt, at + 4),
                        u16::from_le_bytes([madt[at + 8], madt[at + 9]]),
                    )),
                    other => panic!("unexpected MADT entry type {other}"),
                }
                at += len;
            }
            assert_eq!(at, madt.len());
            let want: Vec<(u8, u8)> = (0..vcpus as u8).map(|i| (i, i)).collect();
            assert_eq!(lapics, want, "{vcpus} vCPUs");
            assert_eq!(ioapics, vec![(0, IOAPIC_ADDR, 0)]);
            assert_eq!(
                overrides,
                vec![(4, 4, 0), (5, 5, 0b0101), (6, 6, 0b0101), (7, 7, 0b0101)]
            );
        }
    }

    /// The `Device` blocks of an AML byte string: (name, body) for each DeviceOp (0x5b 0x82).
    fn aml_devices(aml: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut found = Vec::new();
        let mut i = 0;
        while i + 2 < aml.len() {
            if aml[i] == 0x5b && aml[i + 1] == 0x82 {
                // PkgLength: the top two bits of the lead byte say how many bytes follow.
                let lead = aml[i + 2];
                let extra = (lead >> 6) as usize;
                let mut len = if extra == 0 {
                    (lead & 0x3f) as usize
                } else {
                    (lead & 0x0f) as usize
                };
                for k in 0..extra {
                    len |= (aml[i + 3 + k] as usize) << (4 + 8 * k);
                }
                let body_start = i + 3 + extra;
                let end = i + 2 + len;
                let name = String::from_utf8_lossy(&aml[body_start..body_start + 4]).into_owned();
                found.push((name, aml[body_start + 4..end].to_vec()));
                i = end;
            } else {
                i += 1;
            }
        }
        found
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_has_an_lnro0005_device_per_disk_with_its_window_and_interrupt() {
        let devs = devices(3);
        let (_, _, _, dsdt) = walk(1, devs.len());
        let found = aml_devices(&dsdt[36..]);
        let virtio: Vec<_> = found.iter().filter(|(n, _)| n.starts_with("VR")).collect();
        assert_eq!(virtio.len(), devs.len());
        for (i, ((name, body), d)) in virtio.iter().zip(&devs).enumerate() {
            assert_eq!(name, &format!("VR{i:02X}"));
            // Name(_HID, "LNRO0005"): NameOp, "_HID", StringPrefix, the string, NUL.
            assert!(contains(body, b"\x08_HID\x0dLNRO0005\x00"), "{name}: _HID");
            // Name(_UID, i): ZeroOp, OneOp or a ByteConst (BytePrefix 0x0a) for these values.
            let mut uid = b"\x08_UID".to_vec();
            match i {
                0 | 1 => uid.push(i as u8),
                _ => uid.extend_from_slice(&[0x0a, i as u8]),
            }
            assert!(contains(body, &uid), "{name}: _UID");
            // Memory32Fixed: tag 0x86, length 9, read-write, base, length.
            let mut mem = vec![0x86, 9, 0, 1];
            mem.extend_from_slice(&(d.base as u32).to_le_bytes());
            mem.extend_from_slice(&(d.size as u32).to_le_bytes());
            assert!(contains(body, &mem), "{name}: Memory32Fixed");
            // Extended interrupt: tag 0x89, length 6, consumer + edge + active high, 1 IRQ.
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend_from_slice(&d.irq.to_le_bytes());
            assert!(contains(body, &irq), "{name}: Interrupt {}", d.irq);
        }
        assert!(found.iter().any(|(n, _)| n == "COM1"));
        // Name(_S5_, Package(1) { 5 }): PackageOp, PkgLength 4, one element, ByteConst 5.
        assert!(contains(&dsdt, b"\x08_S5_\x12\x04\x01\x0a\x05"));
    }

    #[test]
    fn power_ports_decode() {
        let off = (ACPI_S5_TYPE << 2) | (1 << 5);
        assert_eq!(
            power_event(ACPI_PM_PORT, &[off]),
            Some(PowerEvent::PowerOff)
        );
        assert_eq!(
            power_event(ACPI_PM_PORT, &[ACPI_RESET_VALUE]),
            Some(PowerEvent::Reset)
        );
        // Sleep type 5 without SLP_EN, or another sleep state: nothing.
        assert_eq!(power_event(ACPI_PM_PORT, &[ACPI_S5_TYPE << 2]), None);
        assert_eq!(power_event(ACPI_PM_PORT, &[(3 << 2) | (1 << 5)]), None);
        assert_eq!(power_event(0xcf9, &[0x06]), Some(PowerEvent::Reset));
        assert_eq!(power_event(0xcf9, &[0x02]), None);
        assert_eq!(power_event(0x64, &[0xfe]), Some(PowerEvent::Reset));
        assert_eq!(power_event(0x64, &[0xad]), None);
        assert_eq!(power_event(0x3f8, &[0xfe]), None);
    }
}
