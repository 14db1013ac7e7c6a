//! Linux boot (x86_64, the 64-bit boot protocol of Documentation/arch/x86/boot.rst): the kernel
//! (a bzImage or an ELF vmlinux) loaded through linux-loader, the initrd at the top of RAM, the
//! command line, and the boot_params "zero page" with its e820 map and the ACPI RSDP address.
//! The vCPU starts at the kernel's 64-bit entry in long mode on [`crate::boot`]'s identity page
//! tables, with `rsi` pointing at the zero page.

use crate::layout::{
    ACPI_ADDR, ACPI_END, CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START, LOW_RAM_END, ZERO_PAGE_ADDR,
};
use crate::Error;
use kvm_ioctls::VcpuFd;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, load_cmdline, Cmdline, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

/// The command line when none is given: the console on the 8250 (early prints too), reboot at
/// once on a panic (so the VMM ends), no PCI (the VM has none).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 panic=-1 pci=off";

/// A Linux guest to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxConfig {
    /// A bzImage or an ELF vmlinux.
    pub kernel: PathBuf,
    /// An initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line ([`DEFAULT_CMDLINE`] when `None`).
    pub cmdline: Option<String>,
}

/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// Reserved memory (here: the ACPI tables' area).
pub const E820_RESERVED: u32 = 2;

/// `setup_header.header`: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `setup_header.boot_flag`.
const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` of a boot loader without an assigned ID.
pub const LOADER_TYPE_OTHER: u8 = 0xff;
/// `xloadflags`: the kernel has a 64-bit entry at 0x200 past its load address.
const XLF_KERNEL_64: u16 = 1;
/// `loadflags`: the heap_end_ptr is valid.
const CAN_USE_HEAP: u8 = 0x80;
/// The address a relocatable bzImage decompresses to when it does not randomize
/// (CONFIG_PHYSICAL_START, 16 MiB in every distribution kernel).
const LOAD_PHYSICAL_ADDR: u64 = 0x100_0000;

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct KernelImage {
    /// Where the 64-bit entry point is.
    pub entry: u64,
    /// The first byte past what the kernel needs before it takes over memory management: its
    /// image, and for a bzImage the area it decompresses into.
    pub end: u64,
    /// The setup header (a bzImage's own; a minimal one for an ELF vmlinux).
    pub header: setup_header,
    /// Whether it was a bzImage (else an ELF vmlinux).
    pub bzimage: bool,
}

fn boot_err(what: impl std::fmt::Display) -> Error {
    Error::boot(what.to_string())
}

/// Loads a bzImage or an ELF vmlinux (told apart by the ELF magic) into `mem`.
pub fn load_kernel<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    image: &mut F,
) -> Result<KernelImage, Error> {
    let mut magic = [0u8; 4];
    image
        .read_exact(&mut magic)
        .and_then(|_| image.seek(SeekFrom::Start(0)))
        .map_err(|e| boot_err(format!("reading the kernel: {e}")))?;
    if magic == *b"\x7fELF" {
        let loaded = Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| boot_err(format!("loading the ELF kernel: {e}")))?;
        let header = setup_header {
            boot_flag: BOOT_FLAG,
            header: HDRS_MAGIC,
            kernel_alignment: 0x100_0000,
            // A vmlinux takes an initrd anywhere below 4 GiB.
            initrd_addr_max: u32::MAX,
            ..Default::default()
        };
        return Ok(KernelImage {
            entry: loaded.kernel_load.0,
            end: loaded.kernel_end,
            header,
            bzimage: false,
        });
    }
    let loaded = BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| boot_err(format!("loading the bzImage: {e}")))?;
    let header = loaded
        .setup_header
        .ok_or_else(|| boot_err("the bzImage has no setup header"))?;
    if header.version < 0x020c || header.xloadflags & XLF_KERNEL_64 == 0 {
        let version = header.version;
        return Err(boot_err(format!(
            "the bzImage (boot protocol {}.{:02}) has no 64-bit entry point",
            version >> 8,
            version & 0xff
        )));
    }
    // The decompressor may run in place at 16 MiB: keep the initrd out of its way.
    let end = loaded
        .kernel_end
        .max(LOAD_PHYSICAL_ADDR + u64::from(header.init_size));
    Ok(KernelImage {
        entry: loaded.kernel_load.0 + 0x200,
        end,
        header,
        bzimage: true,
    })
}

/// Where an initrd of `size` bytes goes: page-aligned at the top of RAM, below the kernel's
/// `initrd_addr_max`, above `kernel_end`.
pub fn place_initrd(
    mem_size: u64,
    kernel_end: u64,
    initrd_addr_max: u32,
    size: u64,
) -> Result<u64, Error> {
    // Boot protocols before 2.03 leave initrd_addr_max 0, meaning 0x37ffffff.
    let max = match initrd_addr_max {
        0 => 0x37ff_ffff,
        m => u64::from(m),
    };
    let top = mem_size.min(max + 1);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| {
            boot_err(format!(
                "an initrd of {size} bytes does not fit between the kernel (up to {kernel_end:#x}) \
                 and {top:#x}; give the VM more memory"
            ))
        })?;
    Ok(addr)
}

/// The e820 map of a VM with `mem_size` bytes of RAM: low RAM below the EBDA, the ACPI tables'
/// area reserved, and RAM from 1 MiB to the end.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    vec![
        boot_e820_entry {
            addr: 0,
            size: LOW_RAM_END,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: ACPI_ADDR,
            size: ACPI_END - ACPI_ADDR,
            r#type: E820_RESERVED,
        },
        boot_e820_entry {
            addr: HIMEM_START,
            size: mem_size - HIMEM_START,
            r#type: E820_RAM,
        },
    ]
}

/// The zero page for `kernel` with a command line of `cmdline_len` bytes (without its NUL),
/// an initrd at (address, size), `mem_size` bytes of RAM and the RSDP at `rsdp_addr`.
pub fn boot_params(
    kernel: &KernelImage,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    mem_size: u64,
    rsdp_addr: u64,
) -> Result<boot_params, Error> {
    let mut params = boot_params {
        hdr: kernel.header,
        ..Default::default()
    };
    let hdr = &mut params.hdr;
    hdr.type_of_loader = LOADER_TYPE_OTHER;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS_MAGIC;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = u32::try_from(addr).map_err(|_| boot_err("initrd above 4 GiB"))?;
        hdr.ramdisk_size = u32::try_from(size).map_err(|_| boot_err("initrd of 4 GiB or more"))?;
    }
    params.acpi_rsdp_addr = rsdp_addr;
    let map = e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(boot_err("too many e820 entries"));
    }
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    Ok(params)
}

/// Loads `config`'s kernel, initrd and command line into `mem` (`mem_size` bytes of RAM),
/// writes the zero page at [`ZERO_PAGE_ADDR`] and returns the 64-bit entry point.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    config: &LinuxConfig,
    rsdp_addr: u64,
) -> Result<u64, Error> {
    let open =
        |p: &Path| File::open(p).map_err(|e| boot_err(format!("opening {}: {e}", p.display())));
    let kernel = load_kernel(mem, &mut open(&config.kernel)?)?;
    if kernel.end > mem_size {
        return Err(boot_err(format!(
            "the kernel needs memory up to {:#x}; the VM has {} MiB",
            kernel.end,
            mem_size >> 20
        )));
    }
    let initrd = match &config.initrd {
        None => None,
        Some(path) => {
            let mut f = open(path)?;
            let size = f
                .metadata()
                .map_err(|e| boot_err(format!("{}: {e}", path.display())))?
                .len();
            let addr = place_initrd(mem_size, kernel.end, kernel.header.initrd_addr_max, size)?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
                .map_err(|e| boot_err(format!("loading the initrd: {e}")))?;
            Some((addr, size))
        }
    };
    let text = config.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
    let cmdline = Cmdline::try_from(text, CMDLINE_MAX)
        .map_err(|e| boot_err(format!("the command line: {e}")))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| boot_err(format!("writing the command line: {e}")))?;
    let params = boot_params(&kernel, text.len(), initrd, mem_size, rsdp_addr)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| boot_err(format!("writing the zero page: {e}")))?;
    Ok(kernel.entry)
}

/// Puts the boot vCPU at the kernel's 64-bit `entry` with `rsi` = the zero page.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), Error> {
    crate::boot::setup_long_mode(vcpu, entry, crate::layout::BOOT_STACK, 0)?;
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| Error::kvm(format!("KVM_GET_REGS: {e}")))?;
    regs.rsi = ZERO_PAGE_ADDR;
    vcpu.set_regs(&regs)
        .map_err(|e| Error::kvm(format!("KVM_SET_REGS: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    /// A minimal 64-bit ELF executable with one PT_LOAD segment of `code` at physical
    /// `paddr`, entry at `paddr`.
    fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1; // version
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut e[64..120];
        ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn e820_covers_ram_minus_the_holes() {
        for size in [64u64 << 20, 256 << 20, 3 << 30] {
            let map = e820_map(size);
            let ram: u64 = map
                .iter()
                .filter(|e| e.r#type == E820_RAM)
                .map(|e| e.size)
                .sum();
            // RAM is everything but the 0x9fc00..0x100000 hole.
            assert_eq!(ram, size - (HIMEM_START - LOW_RAM_END));
            let last = map.iter().map(|e| e.addr + e.size).max().unwrap();
            assert_eq!(last, size);
            // Sorted, not overlapping, and the ACPI tables are not in RAM.
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr);
            }
            for e in map.iter().filter(|e| e.r#type == E820_RAM) {
                assert!(e.addr + e.size <= ACPI_ADDR || e.addr >= ACPI_END);
            }
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_ram_below_the_kernels_limit() {
        let mem_size = 512u64 << 20;
        let addr = place_initrd(mem_size, 0x400_0000, 0x7fff_ffff, 1_000_000).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 1_000_000 <= mem_size);
        assert!(mem_size - (addr + 1_000_000) < 4096);
        // A lower initrd_addr_max wins over the end of RAM.
        let addr = place_initrd(mem_size, 0x400_0000, 0x0fff_ffff, 4096).unwrap();
        assert_eq!(addr, 0x1000_0000 - 4096);
        // 0 means the old limit 0x37ffffff.
        let big = 2u64 << 30;
        assert_eq!(place_initrd(big, 0, 0, 4096).unwrap(), 0x3800_0000 - 4096);
        // It must not overlap the kernel.
        assert!(place_initrd(64 << 20, 60 << 20, u32::MAX, 8 << 20).is_err());
    }

    #[test]
    fn boot_params_point_at_the_cmdline_initrd_and_rsdp() {
        let m = mem(64 << 20);
        let elf = tiny_elf(0x100_0000, &[0xf4; 16]);
        let kernel = load_kernel(&m, &mut std::io::Cursor::new(elf)).unwrap();
        assert!(!kernel.bzimage);
        assert_eq!(kernel.entry, 0x100_0000);
        let initrd = (0x300_0000, 12345);
        let p = boot_params(&kernel, 42, Some(initrd), 64 << 20, ACPI_ADDR).unwrap();
        let hdr = p.hdr;
        assert_eq!(hdr.type_of_loader, LOADER_TYPE_OTHER);
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!(hdr.cmd_line_ptr as u64, CMDLINE_ADDR);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!(
            (hdr.ramdisk_image as u64, hdr.ramdisk_size as u64),
            (0x300_0000, 12345)
        );
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, ACPI_ADDR);
        assert_eq!(p.e820_entries, 3);
        let e820 = p.e820_table;
        assert_eq!(e820[..3], e820_map(64 << 20)[..]);
    }

    #[test]
    fn load_writes_the_zero_page_cmdline_and_initrd_into_guest_memory() {
        let dir = tempfile::tempdir().unwrap();
        let kernel_path = dir.path().join("vmlinux");
        std::fs::write(&kernel_path, tiny_elf(0x100_0000, &[0x90, 0xf4])).unwrap();
        let initrd_path = dir.path().join("initrd");
        let initrd: Vec<u8> = (0..20000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&initrd_path, &initrd).unwrap();
        let mem_size = 64u64 << 20;
        let m = mem(mem_size);
        let config = LinuxConfig {
            kernel: kernel_path,
            initrd: Some(initrd_path),
            cmdline: Some("console=ttyS0 quiet".into()),
        };
        let entry = load(&m, mem_size, &config, ACPI_ADDR).unwrap();
        assert_eq!(entry, 0x100_0000);
        let code: [u8; 2] = m.read_obj(GuestAddress(0x100_0000)).unwrap();
        assert_eq!(code, [0x90, 0xf4]);
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = p.hdr;
        let mut cmdline = vec![0u8; hdr.cmdline_size as usize + 1];
        m.read_slice(&mut cmdline, GuestAddress(hdr.cmd_line_ptr as u64))
            .unwrap();
        assert_eq!(cmdline, b"console=ttyS0 quiet\0");
        let (addr, size) = (hdr.ramdisk_image as u64, hdr.ramdisk_size as u64);
        assert_eq!(size, initrd.len() as u64);
        assert!(addr >= 0x100_0000 && addr + size <= mem_size, "{addr:#x}");
        let mut back = vec![0u8; initrd.len()];
        m.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, initrd);
    }

    #[test]
    fn not_a_kernel_is_refused() {
        let m = mem(64 << 20);
        let junk = vec![0u8; 8192];
        let e = load_kernel(&m, &mut std::io::Cursor::new(junk)).unwrap_err();
        assert!(e.to_string().contains("bzImage"), "{e}");
    }
}
