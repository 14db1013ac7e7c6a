//! Linux boot, end to end.
//!
//! - Tiny "kernels" (hand-assembled ELF images) go through the VMM's whole Linux path here, on
//!   any usable /dev/kvm: loading, the zero page in rsi, the ACPI RSDP it points to, long mode on
//!   the boot vCPU with the others created, and the power-off and reset paths that end the VMM.
//! - Debian's cloud kernel (scripts/make-initramfs builds it and a busybox initramfs, cached under
//!   the target dir) is loaded into guest memory without KVM: its bzImage header, the 64-bit
//!   entry, the initrd placement and the zero page.
//! - The real boot of that kernel, which writes a pattern to /dev/vda, prints PASS and powers
//!   off, needs hardware KVM: it skips, saying why, under a software hypervisor (PVM, where
//!   /sys/module/kvm_pvm exists; stock Linux does not boot there) or without /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vstor_vmm::layout::{ACPI_ADDR, CMDLINE_ADDR, HIMEM_START, ZERO_PAGE_ADDR};
use vstor_vmm::linux::{self, LinuxConfig};

fn kvm_or_skip(test: &str) -> bool {
    match vstor_vmm::kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            println!("SKIPPED {test}: /dev/kvm cannot run a VM here ({e})");
            false
        }
    }
}

/// A minimal 64-bit ELF executable with one PT_LOAD segment of `code` at physical 16 MiB (where
/// a vmlinux loads), its entry at the first byte.
fn tiny_kernel(code: &[u8]) -> Vec<u8> {
    let paddr: u64 = 0x100_0000;
    let mut e = vec![0u8; 64 + 56];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1; // ELF version
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
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
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
    e.extend_from_slice(code);
    e
}

/// Checks what a Linux boot loader hands over, then powers off through the FADT's sleep control
/// register (or resets through 0xcf9 when something is wrong):
/// ```text
///   mov eax, [rsi + 0x202]     ; boot_params.hdr.header
///   cmp eax, 0x53726448        ; "HdrS"
///   jne fail
///   mov rax, [rsi + 0x70]      ; boot_params.acpi_rsdp_addr
///   mov rax, [rax]
///   movabs rbx, "RSD PTR "
///   cmp rax, rbx
///   jne fail
///   mov dx, 0x3f8 ; "OK\n" on the serial port
///   mov al, 'O' ; out dx, al ; mov al, 'K' ; out dx, al ; mov al, 10 ; out dx, al
///   mov dx, 0x600 ; mov al, 0x34 ; out dx, al   ; SLP_TYP 5 (S5) | SLP_EN
///   hlt
/// fail:
///   mov dx, 0xcf9 ; mov al, 6 ; out dx, al      ; reset
///   hlt
/// ```
const CHECK_AND_POWER_OFF: [u8; 64] = [
    0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, 0x3d, 0x48, 0x64, 0x72, 0x53, 0x75, 0x2b, 0x48, 0x8b, 0x46,
    0x70, 0x48, 0x8b, 0x00, 0x48, 0xbb, 0x52, 0x53, 0x44, 0x20, 0x50, 0x54, 0x52, 0x20, 0x48, 0x39,
    0xd8, 0x75, 0x15, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4f, 0xee, 0xb0, 0x4b, 0xee, 0xb0, 0x0a, 0xee,
    0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0x66, 0xba, 0xf9, 0x0c, 0xb0, 0x06, 0xee, 0xf4,
];

/// `mov dx, 0xcf9 ; mov al, 6 ; out dx, al ; hlt`: a hard reset through the reset control
/// register.
const RESET: [u8; 8] = [0x66, 0xba, 0xf9, 0x0c, 0xb0, 0x06, 0xee, 0xf4];

/// `push 0 ; push 0 ; lidt [rsp] ; ud2`: an empty IDT and an exception, a triple fault.
const TRIPLE_FAULT: [u8; 10] = [0x6a, 0x00, 0x6a, 0x00, 0x0f, 0x01, 0x1c, 0x24, 0x0f, 0x0b];

/// Runs the VMM with `args` and a time limit; returns (exit code, stdout, stderr).
fn vmm(args: &[&str], limit: Duration) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vstor-vmm"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vstor-vmm");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait for vstor-vmm").is_none() {
        if Instant::now() > deadline {
            child.kill().expect("kill vstor-vmm");
            let o = child.wait_with_output().expect("collect output");
            panic!(
                "vstor-vmm {args:?} ran past {limit:?}; it printed:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().expect("collect output");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    print!("--- vstor-vmm {args:?}:\n{out}{err}");
    (o.status.code().unwrap_or(-1), out, err)
}

fn run_tiny(dir: &Path, code: &[u8], vcpus: u32) -> (i32, String, String) {
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, tiny_kernel(code)).unwrap();
    let disk = dir.join("d.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    vmm(
        &[
            "--memory",
            "64M",
            "--vcpus",
            &vcpus.to_string(),
            "--disk",
            disk.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    )
}

#[test]
fn a_tiny_kernel_finds_the_zero_page_and_the_rsdp_then_powers_off() {
    if !kvm_or_skip("a_tiny_kernel_finds_the_zero_page_and_the_rsdp_then_powers_off") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for vcpus in [1, 2, 4] {
        let (code, out, err) = run_tiny(dir.path(), &CHECK_AND_POWER_OFF, vcpus);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(out, "OK\n", "the kernel's checks failed: {err}");
        assert!(err.contains("the guest powered off"), "{err}");
    }
}

#[test]
fn a_reset_or_a_triple_fault_of_a_linux_guest_ends_the_vmm() {
    if !kvm_or_skip("a_reset_or_a_triple_fault_of_a_linux_guest_ends_the_vmm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_tiny(dir.path(), &RESET, 2);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("the guest reset"), "{err}");
    let (code, out, err) = run_tiny(dir.path(), &TRIPLE_FAULT, 2);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("triple fault"), "{err}");
}

#[test]
fn kernel_and_test_guest_exclude_each_other() {
    let (code, _, err) = vmm(
        &["--disk", "x.raw", "--test-guest", "--kernel", "vmlinuz"],
        Duration::from_secs(30),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = vmm(&["--initrd", "i.gz"], Duration::from_secs(30));
    assert_eq!(code, 2, "{err}");
}

/// The Debian guest: (kernel, initramfs), built once per test process by
/// scripts/make-initramfs into `<target dir>/linux-guest` (the script caches it there).
fn debian_guest() -> Result<(PathBuf, PathBuf), String> {
    type Guest = Result<(PathBuf, PathBuf), String>;
    // OnceLock runs one initializer; the other tests of this process wait for it.
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .expect("the target dir")
                .to_path_buf();
            let dir = target.join("linux-guest");
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-initramfs");
            let o = Command::new("bash")
                .arg(&script)
                .arg(&dir)
                .output()
                .map_err(|e| format!("running {}: {e}", script.display()))?;
            if !o.status.success() {
                return Err(format!(
                    "scripts/make-initramfs failed (it needs apt-get and Debian's package \
                     lists): {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            Ok((dir.join("vmlinuz"), dir.join("initramfs.cpio.gz")))
        })
        .clone()
}

#[test]
fn debian_cloud_bzimage_and_initramfs_load_into_guest_memory() {
    let (kernel, initrd) = match debian_guest() {
        Ok(g) => g,
        Err(why) => {
            println!("SKIPPED debian_cloud_bzimage_and_initramfs_load_into_guest_memory: {why}");
            return;
        }
    };
    let image = std::fs::read(&kernel).unwrap();
    let initramfs = std::fs::read(&initrd).unwrap();
    let mem_size: u64 = 512 << 20;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();

    let loaded = linux::load_kernel(&mem, &mut std::io::Cursor::new(&image)).unwrap();
    assert!(loaded.bzimage);
    let hdr = loaded.header;
    let version = hdr.version;
    assert!(version >= 0x020c, "boot protocol {version:#x}");
    assert_eq!({ hdr.xloadflags } & 1, 1, "XLF_KERNEL_64");
    assert_eq!(loaded.entry, HIMEM_START + 0x200, "the 64-bit entry");
    // The protected-mode code is in guest memory at 1 MiB, as the file has it after the setup
    // sectors.
    let setup = (usize::from(hdr.setup_sects.max(4)) + 1) * 512;
    let mut head = vec![0u8; 4096];
    mem.read_slice(&mut head, GuestAddress(HIMEM_START))
        .unwrap();
    assert_eq!(head, image[setup..setup + 4096]);
    assert!(loaded.end >= 0x100_0000 + u64::from(hdr.init_size));

    // The whole load: kernel, initramfs, command line, zero page.
    let config = LinuxConfig {
        kernel: kernel.clone(),
        initrd: Some(initrd.clone()),
        cmdline: None,
    };
    let entry = linux::load(&mem, mem_size, &config, ACPI_ADDR).unwrap();
    assert_eq!(entry, loaded.entry);
    let params: linux_loader::loader::bootparam::boot_params =
        mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
    let hdr = params.hdr;
    assert_eq!(hdr.type_of_loader, linux::LOADER_TYPE_OTHER);
    assert_eq!(u64::from(hdr.cmd_line_ptr), CMDLINE_ADDR);
    let mut cmdline = vec![0u8; hdr.cmdline_size as usize];
    mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_ADDR))
        .unwrap();
    assert_eq!(cmdline, linux::DEFAULT_CMDLINE.as_bytes());
    let (addr, size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
    assert_eq!(size, initramfs.len() as u64);
    assert_eq!(addr % 4096, 0);
    assert!(addr >= loaded.end, "the initrd overlaps the kernel");
    assert!(addr + size <= mem_size.min(u64::from(hdr.initrd_addr_max) + 1));
    let mut back = vec![0u8; initramfs.len()];
    mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
    assert!(back == initramfs, "the initramfs in guest memory differs");
    let rsdp = params.acpi_rsdp_addr;
    assert_eq!(rsdp, ACPI_ADDR);
    assert_eq!(params.e820_entries, 3);
    println!(
        "{}: boot protocol {}.{:02}, entry {entry:#x}, initrd at {addr:#x} ({size} bytes)",
        kernel.display(),
        version >> 8,
        version & 0xff
    );
}

/// Why the real boot cannot run here, if it cannot.
fn hardware_kvm_missing() -> Option<String> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "/dev/kvm is PVM, a software hypervisor (/sys/module/kvm_pvm exists): stock Linux \
             does not boot under it"
                .into(),
        );
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("there is no /dev/kvm".into());
    }
    vstor_vmm::kvm_usable()
        .err()
        .map(|e| format!("/dev/kvm cannot run a VM ({e})"))
}

#[test]
fn debian_kernel_boots_finds_the_disk_through_acpi_and_writes_it() {
    const TEST: &str = "debian_kernel_boots_finds_the_disk_through_acpi_and_writes_it";
    if let Some(why) = hardware_kvm_missing() {
        eprintln!("SKIPPED {TEST}: {why}");
        return;
    }
    let (kernel, initrd) = debian_guest().unwrap_or_else(|why| panic!("{TEST}: {why}"));
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let disk_size: u64 = 64 << 20;
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(disk_size)
        .unwrap();
    let (code, out, err) = vmm(
        &[
            "--memory",
            "512M",
            "--vcpus",
            "2",
            "--disk",
            disk.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
        ],
        Duration::from_secs(300),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("VSTOR-LINUX-GUEST: PASS"), "{out}");
    assert!(
        out.contains("VSTOR-LINUX-GUEST: vda via ACPI LNRO0005"),
        "the disk did not come from the DSDT: {out}"
    );
    assert!(out.contains(", 2 CPUs"), "both vCPUs came up: {out}");
    assert!(
        out.contains(&format!(
            "VSTOR-LINUX-GUEST: vda sectors {}",
            disk_size / 512
        )),
        "{out}"
    );
    assert!(err.contains("the guest powered off"), "{err}");
    // The host reads what the guest wrote: 1 MiB of "vstor-linux-guest\n" at 1 MiB.
    let data = std::fs::read(&disk).unwrap();
    let want: Vec<u8> = b"vstor-linux-guest\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    assert!(
        data[1 << 20..2 << 20] == want[..],
        "the disk does not hold the guest's pattern"
    );
    assert!(data[..1 << 20].iter().all(|&b| b == 0));
}
