//! Interoperability with real peers.
//!
//! - QEMU (`qemu-img`, `qemu-io`): images vstor writes (dynamic with 1, 32 and 256 MiB blocks,
//!   fixed, several sector-bitmap chunks) pass `qemu-img check` and compare equal to a raw
//!   model of the same writes, discards and write-zeroes; images QEMU creates and writes
//!   (dynamic, fixed, preallocated fixed) read identically through vstor, and what vstor then
//!   writes into them reads back identically through QEMU; QEMU replays the log a crashed
//!   vstor session leaves.
//! - libvhdi (`vhdiinfo`, `pyvhdi` under /usr/bin/python3): differencing chains written by
//!   vstor at every level (sector-granular and whole-block writes, several block sizes, disks
//!   of several sector-bitmap chunks) are described by `vhdiinfo` and read by libvhdi, level
//!   by level, exactly as vstor reads them.
//!
//! Every tool must be installed: a missing one fails the test (it does not skip it).

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{run, Md5};
use vstor_core::{BlockDevice, FaultDevice, FaultRule, FileDevice, FileOptions, OpKind};
use vstor_vhdx::format::{bat_state, payload};
use vstor_vhdx::{CreateOptions, ImageKind, OpenOptions, Vhdx, VhdxError};

const MIB: u64 = 1 << 20;

/// The system Python that has the libvhdi bindings (the `python3` on PATH may not).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

// ---------------------------------------------------------------------------------------------
// Peers

fn qemu_img() -> Command {
    Command::new("qemu-img")
}

/// `qemu-img check`: exit status 0 and no complaint.
fn qemu_check(img: &Path) {
    let out = run(qemu_img().args(["check", "-f", "vhdx"]).arg(img));
    assert!(
        out.contains("No errors were found on the image"),
        "qemu-img check {}: {out}",
        img.display()
    );
}

/// `qemu-img compare` of a VHDX with a raw file: exit status 0 means identical contents.
fn qemu_compare(img: &Path, raw: &Path) {
    let out = run(qemu_img()
        .args(["compare", "-f", "vhdx", "-F", "raw"])
        .arg(img)
        .arg(raw));
    assert!(out.contains("Images are identical"), "{out}");
}

/// `qemu-img info`: the virtual size, after checking the format. (The text form: its
/// top-level lines are not indented, the file node's are.)
fn qemu_virtual_size(img: &Path) -> u64 {
    let out = run(qemu_img().args(["info", "-f", "vhdx"]).arg(img));
    assert!(out.lines().any(|l| l == "file format: vhdx"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("virtual size:"))
        .unwrap_or_else(|| panic!("no virtual size in {out}"));
    let bytes = line
        .rsplit('(')
        .next()
        .and_then(|s| s.strip_suffix(" bytes)"))
        .unwrap_or_else(|| panic!("{line}"));
    bytes.parse().unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// Runs `qemu-io -f vhdx` with these commands (one `-c` each) on `img`.
fn qemu_io(img: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "vhdx"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(img);
    let out = run(&mut c);
    // qemu-io reports a failed command on stdout and may still exit 0.
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io on {}: {out}",
        img.display()
    );
}

/// `qemu-img convert` to a new raw file.
fn qemu_convert_to_raw(img: &Path, raw: &Path) {
    run(qemu_img()
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(img)
        .arg(raw));
}

/// vstor's own checker finds no error in an image a peer made or wrote.
fn vstor_check(img: &Path) {
    let r = vstor_vhdx::check::check(img).unwrap();
    assert!(
        r.errors.is_empty(),
        "vstor check of {}: {:?}",
        img.display(),
        r.errors.iter().map(|f| f.to_string()).collect::<Vec<_>>()
    );
}

fn vhdiinfo(img: &Path) -> String {
    run(Command::new("vhdiinfo").arg(img))
}

/// The value of a `\tName\t\t: value` line of vhdiinfo's output.
fn vhdiinfo_field(info: &str, name: &str) -> String {
    info.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| panic!("vhdiinfo gives no {name}: {info}"))
}

/// What libvhdi (through pyvhdi) reads of each image of a chain, base first: each is opened
/// with its predecessor as parent (`set_parent`). The first argument is `all` (the whole disk)
/// or `off:len,off:len,...` (those ranges, in order). One line per image:
/// `md5 media_size parent_identifier` (`-` for none).
const PYVHDI_SCRIPT: &str = r#"
import hashlib, sys
import pyvhdi

# Every file object stays referenced: pyvhdi does not keep a child's parent alive.
files = []
for path in sys.argv[2:]:
    f = pyvhdi.file()
    f.open(path)
    if files:
        f.set_parent(files[-1])
    files.append(f)
    size = f.get_media_size()
    if sys.argv[1] == "all":
        ranges = [(off, min(4 << 20, size - off)) for off in range(0, size, 4 << 20)]
    else:
        ranges = [tuple(map(int, r.split(":"))) for r in sys.argv[1].split(",")]
    h = hashlib.md5()
    for off, n in ranges:
        data = f.read_buffer_at_offset(n, off)
        if len(data) != n:
            raise SystemExit("%s: short read at %d: %d of %d" % (path, off, len(data), n))
        h.update(data)
    parent = f.get_parent_identifier() or "-"
    print(h.hexdigest(), size, parent)
"#;

struct LibvhdiView {
    md5: String,
    size: u64,
    parent_identifier: String,
}

/// Reads `chain` (base first) through libvhdi: the whole disk, or only `ranges`.
fn libvhdi_read_chain_ranges(chain: &[&Path], ranges: Option<&[(u64, u64)]>) -> Vec<LibvhdiView> {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("read_chain.py");
    std::fs::write(&script, PYVHDI_SCRIPT).unwrap();
    let spec = match ranges {
        None => "all".to_string(),
        Some(r) => r
            .iter()
            .map(|(o, l)| format!("{o}:{l}"))
            .collect::<Vec<_>>()
            .join(","),
    };
    let out = run(Command::new(SYSTEM_PYTHON)
        .arg(&script)
        .arg(spec)
        .args(chain));
    let views: Vec<LibvhdiView> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "{out}");
            LibvhdiView {
                md5: f[0].to_string(),
                size: f[1].parse().unwrap(),
                parent_identifier: f[2].to_string(),
            }
        })
        .collect();
    assert_eq!(views.len(), chain.len(), "{out}");
    views
}

/// Reads the whole of each image of `chain` (base first) through libvhdi.
fn libvhdi_read_chain(chain: &[&Path]) -> Vec<LibvhdiView> {
    libvhdi_read_chain_ranges(chain, None)
}

// ---------------------------------------------------------------------------------------------
// The raw model

/// A sparse raw file holding what the virtual disk must read as.
struct Model {
    path: PathBuf,
    file: File,
    size: u64,
}

impl Model {
    fn create(path: PathBuf, size: u64) -> Model {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        Model { path, file, size }
    }

    /// Takes over an existing raw file (e.g. one `qemu-img convert` wrote).
    fn open(path: PathBuf) -> Model {
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let size = file.metadata().unwrap().len();
        Model { path, file, size }
    }

    fn write(&self, off: u64, data: &[u8]) {
        assert!(off + data.len() as u64 <= self.size);
        self.file.write_all_at(data, off).unwrap();
    }

    fn zero(&self, off: u64, len: u64) {
        let z = vec![0u8; len.min(8 * MIB) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(z.len() as u64);
            self.write(off + done, &z[..n as usize]);
            done += n;
        }
    }

    fn read(&self, off: u64, buf: &mut [u8]) {
        self.file.read_exact_at(buf, off).unwrap();
    }

    fn md5(&self) -> String {
        let mut h = Md5::new();
        let mut buf = vec![0u8; 8 * MIB as usize];
        let mut off = 0;
        while off < self.size {
            let n = (self.size - off).min(buf.len() as u64) as usize;
            self.read(off, &mut buf[..n]);
            h.update(&buf[..n]);
            off += n as u64;
        }
        h.hex()
    }
}

/// MD5 of the whole virtual disk as vstor reads it.
fn vstor_md5(d: &Vhdx) -> String {
    let size = d.geometry().virtual_size;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 8 * MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        d.read_at(off, &mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.hex()
}

/// The payload block states of the image's BAT, block by block.
fn payload_states(d: &Vhdx) -> Vec<u64> {
    let g = d.geometry().clone();
    let bat = d.bat_snapshot();
    (0..g.data_blocks)
        .map(|b| bat_state(bat[g.payload_index(b) as usize]))
        .collect()
}

/// vstor reads the whole virtual disk as the model holds it; a difference names its offset.
fn assert_reads_as_model(d: &Vhdx, m: &Model, what: &str) {
    assert_eq!(d.geometry().virtual_size, m.size, "{what}: virtual size");
    let mut a = vec![0u8; 4 * MIB as usize];
    let mut b = vec![0u8; 4 * MIB as usize];
    let mut off = 0;
    while off < m.size {
        let n = (m.size - off).min(a.len() as u64) as usize;
        d.read_at(off, &mut a[..n]).unwrap();
        m.read(off, &mut b[..n]);
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{what}: vstor reads {:#04x} at virtual offset {}, the model holds {:#04x}",
                a[i],
                off + i as u64,
                b[i]
            );
        }
        off += n as u64;
    }
}

// ---------------------------------------------------------------------------------------------
// Random workloads

fn random_data(rng: &mut fastrand::Rng, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    // Random words, repeated per 4 KiB page: cheap in a debug build, distinct per page.
    let word = rng.u64(..);
    for (i, c) in v.chunks_mut(8).enumerate() {
        let w = word ^ ((i as u64 / 512) << 17) ^ (i as u64 % 512);
        c.copy_from_slice(&w.to_le_bytes()[..c.len()]);
    }
    v
}

/// A random `[off, off+len)` inside the disk, `align`-aligned, `len` from 1 to `max` sectors
/// (clamped to the disk).
fn random_range(rng: &mut fastrand::Rng, size: u64, align: u64, max: u64) -> (u64, u64) {
    let len = rng.u64(1..=(max / align).max(1)) * align;
    let len = len.min(size);
    let off = rng.u64(0..=(size - len) / align) * align;
    (off, len)
}

/// A range that crosses a block boundary.
fn crossing_range(rng: &mut fastrand::Rng, size: u64, bs: u64, align: u64) -> (u64, u64) {
    let boundaries = (size - 1) / bs;
    if boundaries == 0 {
        return random_range(rng, size, align, 64 * align);
    }
    let k = rng.u64(1..=boundaries) * bs;
    let before = rng.u64(1..=64) * align;
    let after = (rng.u64(1..=64) * align).min(size - k);
    (k - before, before + after)
}

/// Applies a random sequence of writes, write-zeroes, discards and flushes to `d` and the
/// model: small writes, writes crossing block boundaries, large writes, whole-block writes,
/// write-zeroes and discards of whole and partial blocks (including one to the end of the
/// disk). A discarded range is undefined, so the model takes what vstor reads there.
fn random_workload(d: &Vhdx, m: &Model, seed: u64, steps: usize) {
    let g = d.geometry().clone();
    let (size, bs, align) = (g.virtual_size, g.block_size as u64, g.logical_sector as u64);
    let blocks = size.div_ceil(bs);
    let mut rng = fastrand::Rng::with_seed(seed);
    let large = (2 * bs + bs / 2).min(12 * MIB);
    let write = |rng: &mut fastrand::Rng, off: u64, len: u64| {
        let data = random_data(rng, len);
        d.write_at(off, &data).unwrap();
        m.write(off, &data);
    };
    let discard = |off: u64, len: u64| {
        d.discard(off, len).unwrap();
        let mut b = vec![0u8; len as usize];
        d.read_at(off, &mut b).unwrap();
        m.write(off, &b);
    };
    let whole_block = |rng: &mut fastrand::Rng, count: u64| {
        let b = rng.u64(0..blocks);
        let off = b * bs;
        (off, (count * bs).min(size - off))
    };
    for step in 0..steps {
        match rng.u32(0..24) {
            0..=7 => {
                let (off, len) = random_range(&mut rng, size, align, 64 * align);
                write(&mut rng, off, len);
            }
            8..=10 => {
                let (off, len) = crossing_range(&mut rng, size, bs, align);
                write(&mut rng, off, len);
            }
            11 | 12 => {
                let (off, len) = random_range(&mut rng, size, align, large);
                write(&mut rng, off, len);
            }
            13 => {
                // A whole block (the last may be short), when that stays cheap.
                if bs <= 32 * MIB {
                    let (off, len) = whole_block(&mut rng, 1);
                    write(&mut rng, off, len);
                }
            }
            14 => {
                let count = 1 + rng.u64(0..2);
                let (off, len) = whole_block(&mut rng, count);
                d.write_zeroes(off, len).unwrap();
                m.zero(off, len);
            }
            15 | 16 => {
                let (off, len) = if rng.bool() {
                    crossing_range(&mut rng, size, bs, align)
                } else {
                    random_range(&mut rng, size, align, bs.min(4 * MIB))
                };
                d.write_zeroes(off, len).unwrap();
                m.zero(off, len);
            }
            17 => {
                let count = 1 + rng.u64(0..2);
                let (off, len) = whole_block(&mut rng, count);
                discard(off, len);
            }
            18 => {
                let (off, len) = random_range(&mut rng, size, align, 2 * bs);
                discard(off, len);
            }
            19 => {
                // To the very end of the disk (the last block may be short).
                let off = rng.u64((size.saturating_sub(2 * bs)) / align..size / align) * align;
                discard(off, size - off);
            }
            _ => d.flush().unwrap(),
        }
        // Now and then the data path is checked against the model on the spot.
        if step % 16 == 15 {
            let (off, len) = random_range(&mut rng, size, align, 2 * bs.min(4 * MIB));
            let mut a = vec![0u8; len as usize];
            let mut b = vec![0u8; len as usize];
            d.read_at(off, &mut a).unwrap();
            m.read(off, &mut b);
            assert!(
                a == b,
                "step {step}: [{off}, +{len}) differs from the model"
            );
        }
    }
    // Make sure the interesting cases happened at least once, whatever the seed gave.
    let (off, len) = crossing_range(&mut rng, size, bs, align);
    write(&mut rng, off, len);
    if bs <= 32 * MIB {
        let (off, len) = whole_block(&mut rng, 1);
        write(&mut rng, off, len);
    }
    let (off, len) = whole_block(&mut rng, 1);
    d.write_zeroes(off, len).unwrap();
    m.zero(off, len);
    // A whole mapped block discarded: the peers then see whatever state that leaves.
    let states = payload_states(d);
    if let Some(b) = (0..blocks).find(|&b| states[b as usize] == payload::FULLY_PRESENT) {
        discard(b * bs, bs.min(size - b * bs));
        if d.kind() == ImageKind::Dynamic {
            let st = payload_states(d)[b as usize];
            assert_ne!(
                st,
                payload::FULLY_PRESENT,
                "a discarded whole block stays mapped"
            );
        }
    }
    d.flush().unwrap();
}

// ---------------------------------------------------------------------------------------------
// 1. Images vstor writes, read by QEMU (and libvhdi)

/// Creates an image with `opts`, runs the random workload on it, and checks that QEMU finds it
/// clean and reads it exactly as the model, and that libvhdi reads it the same. Returns the
/// directory, the image and the model for further rounds.
fn vstor_image_through_qemu(
    opts: &CreateOptions,
    seed: u64,
    steps: usize,
) -> (tempfile::TempDir, PathBuf, Model) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vstor.vhdx");
    let d = Vhdx::create(&img, opts).unwrap();
    let size = d.geometry().virtual_size;
    let m = Model::create(dir.path().join("model.raw"), size);
    random_workload(&d, &m, seed, steps);
    assert_reads_as_model(&d, &m, "vstor before close");
    d.close().unwrap();
    drop(d);
    assert_eq!(qemu_virtual_size(&img), size);
    qemu_check(&img);
    qemu_compare(&img, &m.path);
    let views = libvhdi_read_chain(&[&img]);
    assert_eq!(views[0].size, size);
    assert_eq!(views[0].md5, m.md5(), "libvhdi reads differ from the model");
    // And vstor itself, reopened.
    let d = Vhdx::open(&img, &OpenOptions::read_only()).unwrap();
    assert_reads_as_model(&d, &m, "vstor after reopen");
    drop(d);
    (dir, img, m)
}

#[test]
fn vstor_dynamic_1m_blocks_read_by_qemu_then_qemu_writes_read_by_vstor() {
    // 64 MiB and 7 sectors: the last block is short.
    let size = 64 * MIB + 7 * 512;
    let opts = CreateOptions::dynamic(size).block_size(MIB as u32);
    let (_dir, img, m) = vstor_image_through_qemu(&opts, 1, 160);
    // QEMU writes into vstor's image (into blocks vstor mapped and blocks it did not), and
    // vstor reads QEMU's writes back.
    let cmds = [
        (0u64, 4096u64, 0x11u8),
        (MIB - 512, 1024, 0x22),
        (5 * MIB + 512, 3 * MIB, 0x33),
        (40 * MIB, MIB, 0x44),
        (size - 3 * 512, 3 * 512, 0x55),
    ];
    let mut io = Vec::new();
    for &(off, len, pat) in &cmds {
        io.push(format!("write -P {pat:#04x} {off} {len}"));
        m.write(off, &vec![pat; len as usize]);
    }
    io.push(format!("write -z {} {}", 20 * MIB + 4096, 2 * MIB));
    m.zero(20 * MIB + 4096, 2 * MIB);
    qemu_io(&img, &io);
    qemu_check(&img);
    qemu_compare(&img, &m.path);
    vstor_check(&img);
    let d = Vhdx::open(&img, &OpenOptions::default()).unwrap();
    assert_reads_as_model(&d, &m, "vstor after QEMU's writes");
    // One more vstor round on top of QEMU's writes.
    random_workload(&d, &m, 11, 40);
    d.close().unwrap();
    drop(d);
    qemu_check(&img);
    qemu_compare(&img, &m.path);
}

#[test]
fn vstor_dynamic_32m_blocks_read_by_qemu() {
    let size = 256 * MIB + 4096;
    let opts = CreateOptions::dynamic(size).block_size(32 * MIB as u32);
    vstor_image_through_qemu(&opts, 2, 90);
}

#[test]
fn vstor_dynamic_256m_blocks_read_by_qemu() {
    // Four blocks, the last one short (5 MiB of 256).
    let size = 3 * 256 * MIB + 5 * MIB;
    let opts = CreateOptions::dynamic(size).block_size(256 * MIB as u32);
    vstor_image_through_qemu(&opts, 3, 60);
}

#[test]
fn vstor_fixed_read_by_qemu() {
    let size = 48 * MIB + 4096;
    let opts = CreateOptions::fixed(size).block_size(8 * MIB as u32);
    let (_dir, img, _m) = vstor_image_through_qemu(&opts, 4, 80);
    let d = Vhdx::open(&img, &OpenOptions::read_only()).unwrap();
    assert_eq!(d.kind(), ImageKind::Fixed);
    let info = vhdiinfo(&img);
    assert_eq!(vhdiinfo_field(&info, "Disk type"), "Fixed", "{info}");
}

#[test]
fn vstor_4k_logical_sectors_read_by_itself_and_opened_by_qemu() {
    // QEMU mishandles 4096-byte logical sectors in VHDX, so the contents are checked through
    // vstor (against the model) and libvhdi; QEMU must still read the image's structure.
    let size = 96 * MIB;
    let opts = CreateOptions::dynamic(size)
        .block_size(2 * MIB as u32)
        .logical_sector_size(4096);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("4k.vhdx");
    let d = Vhdx::create(&img, &opts).unwrap();
    assert_eq!(d.info().logical_sector_size, 4096);
    let m = Model::create(dir.path().join("model.raw"), size);
    random_workload(&d, &m, 5, 120);
    d.close().unwrap();
    drop(d);
    let d = Vhdx::open(&img, &OpenOptions::read_only()).unwrap();
    assert_reads_as_model(&d, &m, "4K vstor after reopen");
    drop(d);
    // QEMU refuses every logical sector size but 512 with ENOTSUP, a check it makes only
    // after it has parsed the headers, the log, the region tables and the metadata items
    // (vhdx_parse_metadata): anything wrong before that point fails differently (EINVAL).
    let out = Command::new("qemu-img")
        .args(["info", "-f", "vhdx"])
        .arg(&img)
        .output()
        .expect("qemu-img runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("Operation not supported"),
        "qemu-img info on a 4K-sector image: {err}"
    );
    if out.status.success() {
        assert_eq!(qemu_virtual_size(&img), size);
    }
    let info = vhdiinfo(&img);
    assert_eq!(
        vhdiinfo_field(&info, "Bytes per sector"),
        "4096 bytes",
        "{info}"
    );
    let views = libvhdi_read_chain(&[&img]);
    assert_eq!(views[0].md5, m.md5(), "libvhdi reads differ from the model");
}

// ---------------------------------------------------------------------------------------------
// 2. Images QEMU writes, read and written by vstor, read back by QEMU

/// QEMU writes with distinct patterns: small, crossing block boundaries, whole blocks, zeroes.
fn qemu_writes(size: u64, bs: u64, seed: u64) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cmds = Vec::new();
    for i in 0..14u64 {
        let (off, len) = match i % 4 {
            0 => random_range(&mut rng, size, 512, 64 * 512),
            1 => crossing_range(&mut rng, size, bs, 512),
            2 => {
                let b = rng.u64(0..size / bs);
                (b * bs, bs.min(4 * MIB))
            }
            _ => random_range(&mut rng, size, 512, 3 * MIB),
        };
        if i == 7 {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            cmds.push(format!("write -P {:#04x} {off} {len}", 0x10 + i));
        }
    }
    cmds
}

/// An image QEMU made and wrote: vstor reads it as `qemu-img convert` does; then vstor writes
/// into blocks QEMU allocated and blocks it did not (and zeroes, and discards), and QEMU reads
/// vstor's writes back; and QEMU writes once more and vstor reads that.
fn qemu_image_through_vstor(create_opts: &str, size: u64, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("qemu.vhdx");
    run(qemu_img()
        .args(["create", "-q", "-f", "vhdx", "-o", create_opts])
        .arg(&img)
        .arg(size.to_string()));
    let d = Vhdx::open(&img, &OpenOptions::read_only()).unwrap();
    let bs = d.geometry().block_size as u64;
    drop(d);
    let first = qemu_writes(size, bs, seed);
    qemu_io(&img, &first);
    let raw = dir.path().join("qemu.raw");
    qemu_convert_to_raw(&img, &raw);
    let m = Model::open(raw);
    assert_eq!(m.size, size);
    vstor_check(&img);
    let d = Vhdx::open(&img, &OpenOptions::read_only()).unwrap();
    assert_eq!(d.geometry().virtual_size, size);
    assert!(
        d.creator().to_lowercase().contains("qemu"),
        "{}",
        d.creator()
    );
    assert_reads_as_model(&d, &m, "vstor reading QEMU's image");
    drop(d);

    // vstor writes: over QEMU's data (non-allocating), into fresh blocks (allocating), and
    // the random workload on top.
    let d = Vhdx::open(&img, &OpenOptions::default()).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed + 100);
    for c in &first {
        let w: Vec<&str> = c.split_whitespace().collect();
        let (off, len): (u64, u64) = (
            w[w.len() - 2].parse().unwrap(),
            w[w.len() - 1].parse().unwrap(),
        );
        // Inside what QEMU wrote, so the block is mapped.
        let sub = (len / 2 / 512).max(1) * 512;
        let data = random_data(&mut rng, sub);
        d.write_at(off + (len - sub) / 2 / 512 * 512, &data)
            .unwrap();
        m.write(off + (len - sub) / 2 / 512 * 512, &data);
    }
    random_workload(&d, &m, seed + 200, 60);
    assert_reads_as_model(&d, &m, "vstor after writing QEMU's image");
    d.close().unwrap();
    drop(d);
    qemu_check(&img);
    qemu_compare(&img, &m.path);

    // QEMU again, on top of vstor's writes; vstor reads it.
    let again = qemu_writes(size, bs, seed + 300);
    qemu_io(&img, &again);
    for c in &again {
        let w: Vec<&str> = c.split_whitespace().collect();
        let (off, len): (u64, u64) = (
            w[w.len() - 2].parse().unwrap(),
            w[w.len() - 1].parse().unwrap(),
        );
        if w[1] == "-z" {
            m.zero(off, len);
        } else {
            let pat = u8::from_str_radix(w[2].trim_start_matches("0x"), 16).unwrap();
            m.write(off, &vec![pat; len as usize]);
        }
    }
    qemu_check(&img);
    qemu_compare(&img, &m.path);
    let d = Vhdx::open(&img, &OpenOptions::read_only()).unwrap();
    assert_reads_as_model(&d, &m, "vstor reading QEMU's second round");
}

#[test]
fn qemu_dynamic_1m_blocks_read_and_written_by_vstor() {
    qemu_image_through_vstor("subformat=dynamic,block_size=1M", 48 * MIB + 512, 21);
}

#[test]
fn qemu_dynamic_32m_blocks_read_and_written_by_vstor() {
    // A 4 MiB log, and blocks QEMU leaves NOT_PRESENT rather than ZERO.
    qemu_image_through_vstor(
        "subformat=dynamic,block_size=32M,log_size=4M,block_state_zero=off",
        160 * MIB,
        22,
    );
}

#[test]
fn qemu_fixed_read_and_written_by_vstor() {
    // QEMU's default fixed image: the data area is preallocated, but every BAT entry says ZERO.
    qemu_image_through_vstor("subformat=fixed,block_size=4M", 40 * MIB, 23);
}

#[test]
fn qemu_fixed_preallocated_read_and_written_by_vstor() {
    // Every block FULLY_PRESENT in the preallocated data area, as Hyper-V makes fixed disks.
    qemu_image_through_vstor(
        "subformat=fixed,block_size=8M,block_state_zero=off",
        40 * MIB,
        24,
    );
}

/// QEMU preallocates a fixed image's data area to exactly the virtual size, so when the size
/// is not a multiple of the block size the last block is stored short: only its in-disk part
/// lies inside the file. QEMU (`qemu-img check`, reads, writes) and libvhdi accept such an
/// image; vstor must open it, read and write its last block, and a writable open must not
/// trim that block's bytes away as space that belongs to nothing.
#[test]
fn qemu_fixed_image_with_short_last_block() {
    let size = 40 * MIB + 4096;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("short.vhdx");
    run(qemu_img()
        .args(["create", "-q", "-f", "vhdx"])
        .args(["-o", "subformat=fixed,block_size=8M,block_state_zero=off"])
        .arg(&img)
        .arg(size.to_string()));
    qemu_io(
        &img,
        &[
            format!("write -P 0x5a {} 4096", 40 * MIB),
            "write -P 0x3c 0 4096".to_string(),
        ],
    );
    qemu_check(&img);
    let libvhdi = libvhdi_read_chain_ranges(&[&img], Some(&[(40 * MIB, 4096)]));
    let mut want = Md5::new();
    want.update(&[0x5a; 4096]);
    assert_eq!(libvhdi[0].md5, want.hex(), "libvhdi reads the short block");
    let file_len = std::fs::metadata(&img).unwrap().len();

    let d = Vhdx::open(&img, &OpenOptions::read_only()).unwrap_or_else(|e| {
        panic!("vstor refuses a fixed image QEMU made, which QEMU and libvhdi read: {e}")
    });
    let mut b = vec![0u8; 4096];
    d.read_at(40 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a), "the short last block");
    drop(d);
    vstor_check(&img);

    let d = Vhdx::open(&img, &OpenOptions::default()).unwrap();
    d.write_at(40 * MIB + 1024, &[0x6b; 1024]).unwrap();
    d.write_at(8 * MIB - 512, &[0x7c; 1024]).unwrap();
    d.close().unwrap();
    drop(d);
    assert!(std::fs::metadata(&img).unwrap().len() >= file_len);
    qemu_check(&img);
    qemu_io(
        &img,
        &[
            format!("read -P 0x5a {} 1024", 40 * MIB),
            format!("read -P 0x6b {} 1024", 40 * MIB + 1024),
            format!("read -P 0x5a {} 2048", 40 * MIB + 2048),
            format!("read -P 0x7c {} 1024", 8 * MIB - 512),
            "read -P 0x3c 0 4096".to_string(),
        ],
    );
    // And the whole round trip, on such an image.
    qemu_image_through_vstor(
        "subformat=fixed,block_size=8M,block_state_zero=off",
        size,
        25,
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Differencing chains read by libvhdi

#[test]
fn differencing_chain_read_by_libvhdi() {
    const SIZE: u64 = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    // One directory for the whole chain: libvhdi finds a parent by its locator's file name.
    let names = ["base.vhdx", "child.vhdx", "grandchild.vhdx", "great.vhdx"];
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.path().join(n)).collect();
    // The chain's contents so far, one raw model carried down the levels.
    let m = Model::create(dir.path().join("model.raw"), SIZE);
    let mut md5s = Vec::new();
    let mut linkages = Vec::new();
    for (level, path) in paths.iter().enumerate() {
        let opts = match level {
            0 => CreateOptions::dynamic(SIZE).block_size(2 * MIB as u32),
            // A child with a smaller block size than its parent, and one with a larger one.
            2 => CreateOptions::differencing(&paths[1]).block_size(MIB as u32),
            3 => CreateOptions::differencing(&paths[2]).block_size(4 * MIB as u32),
            _ => CreateOptions::differencing(&paths[level - 1]),
        };
        let d = Vhdx::create(path, &opts).unwrap();
        if level > 0 {
            assert_eq!(d.kind(), ImageKind::Differencing);
            let p = d.parent().unwrap();
            linkages.push(p.data_write_guid().to_uuid().to_string());
        }
        let bs = d.geometry().block_size as u64;
        let mut rng = fastrand::Rng::with_seed(40 + level as u64);
        let mut write = |off: u64, len: u64| {
            let data = random_data(&mut rng, len);
            d.write_at(off, &data).unwrap();
            m.write(off, &data);
        };
        // Sector-granular writes: single sectors, odd runs, block boundaries; two into one
        // block with a gap between them, so its bitmap has holes that read the parent.
        let k = 3 + level as u64;
        write(k * bs + 512, 512);
        write(k * bs + 8 * 512, 3 * 512);
        write((k + 2) * bs - 1536, 4096);
        write((k + 6) * bs + 77 * 512, 1000 * 512);
        write(level as u64 * 512 * 9, 512);
        write(SIZE - 512, 512);
        // Whole blocks, and a range of two blocks and a half.
        write((k + 4) * bs, bs);
        write(10 * MIB + level as u64 * MIB, 2 * bs + bs / 2);
        // A partial block later made whole.
        write((k + 8) * bs + 4096, 4096);
        write((k + 8) * bs, bs);
        if level > 0 {
            // Zeroes over the parent's data: a whole block (ZERO state) and a partial range.
            d.write_zeroes(10 * MIB, bs).unwrap();
            m.zero(10 * MIB, bs);
            d.write_zeroes(((k + 1) * bs) + 512, 2048).unwrap();
            m.zero(((k + 1) * bs) + 512, 2048);
        }
        d.flush().unwrap();
        if level > 0 {
            // The sector-granular writes left partially present blocks whose bitmaps mix
            // this file's sectors and the parent's.
            let states = payload_states(&d);
            let partial: Vec<u64> = (0..states.len() as u64)
                .filter(|&b| states[b as usize] == payload::PARTIALLY_PRESENT)
                .collect();
            assert!(
                partial.contains(&k) && partial.contains(&(k + 6)),
                "level {level}: partially present blocks {partial:?}"
            );
            let bits = d.sector_bitmap(k).unwrap();
            assert_eq!(bits.iter().filter(|&&b| b).count(), 4, "level {level}");
            assert!(states.contains(&payload::FULLY_PRESENT), "level {level}");
        }
        assert_reads_as_model(&d, &m, &format!("vstor level {level}"));
        d.close().unwrap();
        drop(d);
        let d = Vhdx::open(path, &OpenOptions::read_only()).unwrap();
        let md5 = vstor_md5(&d);
        assert_eq!(md5, m.md5(), "vstor level {level} after reopen");
        md5s.push(md5);
        drop(d);
    }
    // vhdiinfo describes every level; a child's parent identifier is the locator's
    // parent_linkage, its parent's DataWriteGuid, which is also the identifier vhdiinfo gives
    // the parent; the parent file name comes from the locator.
    let mut identifiers: Vec<String> = Vec::new();
    for (level, path) in paths.iter().enumerate() {
        let info = vhdiinfo(path);
        let field = |name: &str| vhdiinfo_field(&info, name);
        assert_eq!(field("Format"), "VHDX (version 2)", "level {level}");
        assert_eq!(
            field("Media size"),
            format!("64 MiB ({SIZE} bytes)"),
            "level {level}"
        );
        assert_eq!(field("Bytes per sector"), "512 bytes", "level {level}");
        identifiers.push(field("Identifier").to_lowercase());
        if level == 0 {
            assert_eq!(field("Disk type"), "Dynamic", "level {level}");
            assert!(!info.contains("Parent identifier"), "{info}");
        } else {
            assert_eq!(field("Disk type"), "Differential", "level {level}");
            let parent_id = field("Parent identifier").to_lowercase();
            assert_eq!(parent_id, linkages[level - 1], "level {level}");
            assert_eq!(parent_id, identifiers[level - 1], "level {level}");
            let parent_name = field("Parent filename");
            assert!(
                parent_name.ends_with(&format!("\\{}", names[level - 1])),
                "level {level}: {parent_name}"
            );
        }
    }
    // libvhdi reads every level, with its parents attached, exactly as vstor does.
    let chain: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let views = libvhdi_read_chain(&chain);
    for (level, v) in views.iter().enumerate() {
        assert_eq!(v.size, SIZE, "level {level}");
        assert_eq!(
            v.md5, md5s[level],
            "libvhdi reads level {level} differently"
        );
        if level > 0 {
            assert_eq!(v.parent_identifier, linkages[level - 1], "level {level}");
        } else {
            assert_eq!(v.parent_identifier, "-");
        }
    }
    // The levels really differ (each wrote something the next one sees through).
    for w in md5s.windows(2) {
        assert_ne!(w[0], w[1]);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. QEMU replays the log vstor leaves behind

/// vstor commits BAT updates through the log; a crash after the log is durable but before the
/// BAT is written in place leaves an image that only a log replay makes whole. QEMU must find
/// vstor's log entries valid and replay them (`qemu-img check -r all`), and then read every
/// write.
#[test]
fn qemu_replays_the_log_of_a_crashed_vstor_image() {
    let size = 64 * MIB;
    let bs = MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crashed.vhdx");
    File::create(&img).unwrap();
    let file: std::sync::Arc<dyn BlockDevice> =
        std::sync::Arc::new(FileDevice::open(&img, &FileOptions::default()).unwrap());
    let fault = std::sync::Arc::new(FaultDevice::new(file));
    let d = Vhdx::create_on(
        fault.clone(),
        &CreateOptions::dynamic(size).block_size(bs as u32),
        None,
    )
    .unwrap();
    let m = Model::create(dir.path().join("model.raw"), size);
    let mut rng = fastrand::Rng::with_seed(60);
    let mut write = |off: u64, len: u64| {
        let data = random_data(&mut rng, len);
        d.write_at(off, &data).unwrap();
        m.write(off, &data);
    };
    // A first session's writes reach the BAT in place.
    write(0, 64 * 1024);
    write(3 * MIB - 4096, 8192);
    d.flush().unwrap();
    // From now on the BAT cannot be written in place: what follows lives only in the log.
    let bat = d.regions().bat.clone();
    fault.add_rule(FaultRule::fail(OpKind::Write).in_range(bat.offset..bat.offset + bat.length));
    let late = [
        (10 * MIB, MIB),
        (20 * MIB + 512, 3 * MIB),
        (size - 4096, 4096),
    ];
    for &(off, len) in &late {
        write(off, len);
    }
    assert!(
        d.flush().is_err(),
        "the in-place BAT write was to fail after the log write"
    );
    assert!(d.close().is_err());
    drop(d);
    drop(fault);

    // The image needs replay: vstor says so, QEMU refuses to open it read-only, and the BAT in
    // the file does not map the late blocks.
    let e = Vhdx::open(
        &img,
        &OpenOptions {
            replay_in_memory: false,
            ..OpenOptions::read_only()
        },
    )
    .unwrap_err();
    let vstor_core::Error::Layer(inner) = &e else {
        panic!("{e:?}")
    };
    assert!(
        matches!(
            inner.downcast_ref::<VhdxError>(),
            Some(VhdxError::ReplayNeeded(_))
        ),
        "{e}"
    );
    let out = qemu_img()
        .args(["info", "-f", "vhdx"])
        .arg(&img)
        .output()
        .expect("qemu-img runs");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("replay"),
        "qemu-img info opened an image that needs replay read-only: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = std::fs::read(&img).unwrap();
    let d = Vhdx::open(&img, &OpenOptions::read_only()).unwrap();
    assert!(d.replay_note().unwrap().contains("in memory"));
    let g = d.geometry().clone();
    for &(off, _) in &late {
        let i = g.payload_index(off / bs) as usize;
        let at = bat.offset as usize + i * 8;
        let in_place = u64::from_le_bytes(raw[at..at + 8].try_into().unwrap());
        assert_eq!(
            bat_state(in_place),
            payload::NOT_PRESENT,
            "block {} is mapped in place already",
            off / bs
        );
    }
    assert_reads_as_model(&d, &m, "vstor replaying its own log in memory");
    drop(d);

    // QEMU replays the log (a writable open) and then reads everything.
    run(qemu_img()
        .args(["check", "-r", "all", "-f", "vhdx"])
        .arg(&img));
    qemu_check(&img);
    qemu_compare(&img, &m.path);
    let d = Vhdx::open(
        &img,
        &OpenOptions {
            replay_in_memory: false,
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    assert!(d.replay_note().is_none(), "QEMU left the log dirty");
    assert_reads_as_model(&d, &m, "vstor after QEMU's replay");
}

// ---------------------------------------------------------------------------------------------
// 5. Disks of several sector-bitmap chunks: the BAT interleaves a sector bitmap entry after
//    every chunk ratio payload entries, and every peer must index it the same way.

/// The bytes one sector-bitmap block describes: 2^23 sectors.
fn chunk_bytes(logical: u64) -> u64 {
    (1 << 23) * logical
}

#[test]
fn vstor_multi_chunk_image_read_by_qemu_and_qemu_writes_read_by_vstor() {
    // 9 GiB and a sector, 32 MiB blocks: chunk ratio 128, three chunks, sparse files.
    let size = 9 * 1024 * MIB + 512;
    let bs = 32 * MIB;
    let chunk = chunk_bytes(512);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.vhdx");
    let d = Vhdx::create(&img, &CreateOptions::dynamic(size).block_size(bs as u32)).unwrap();
    // Pattern writes QEMU can verify with `read -P`: straddling each chunk boundary (the last
    // block of a chunk and the first of the next), the block before and after, the last sector.
    let mut writes: Vec<(u64, u64, u8)> = Vec::new();
    for c in 1..=2u64 {
        writes.push((c * chunk - 4096, 8192, 0x30 + c as u8));
        writes.push((c * chunk - bs - 1024, 1024, 0x40 + c as u8));
        writes.push((c * chunk + bs + 512, 1536, 0x50 + c as u8));
    }
    writes.push((size - 512, 512, 0x60));
    for &(off, len, pat) in &writes {
        d.write_at(off, &vec![pat; len as usize]).unwrap();
    }
    d.close().unwrap();
    drop(d);
    assert_eq!(qemu_virtual_size(&img), size);
    qemu_check(&img);
    // QEMU reads each pattern, and zeros on either side of it.
    let mut reads = Vec::new();
    for &(off, len, pat) in &writes {
        reads.push(format!("read -P {pat:#04x} {off} {len}"));
        reads.push(format!("read -P 0 {} 512", off - 512));
        if off + len < size {
            reads.push(format!("read -P 0 {} 512", off + len));
        }
    }
    qemu_io(&img, &reads);

    // QEMU writes around the boundaries of its own image and into vstor's; vstor reads them.
    let q = dir.path().join("qemu-big.vhdx");
    run(qemu_img()
        .args(["create", "-q", "-f", "vhdx"])
        .args(["-o", "subformat=dynamic,block_size=32M"])
        .arg(&q)
        .arg(size.to_string()));
    // Into both images: across a block boundary late in each chunk, and early in the next
    // chunk (clear of vstor's writes); into QEMU's image also exactly across each chunk
    // boundary.
    let mut both: Vec<(u64, u64, u8)> = Vec::new();
    let mut straddle: Vec<(u64, u64, u8)> = Vec::new();
    for c in 1..=2u64 {
        both.push((c * chunk - 2 * bs - 2048, 4096, 0x70 + c as u8));
        both.push((c * chunk + 3 * bs, 512, 0x80 + c as u8));
        straddle.push((c * chunk - 2048, 4096, 0x90 + c as u8));
    }
    let cmds = |w: &[(u64, u64, u8)]| -> Vec<String> {
        w.iter()
            .map(|(o, l, p)| format!("write -P {p:#04x} {o} {l}"))
            .collect()
    };
    let qwrites: Vec<(u64, u64, u8)> = both.iter().chain(&straddle).copied().collect();
    qemu_io(&q, &cmds(&qwrites));
    qemu_io(&img, &cmds(&both));
    for (path, expect) in [(&q, &qwrites), (&img, &both)] {
        let d = Vhdx::open(path, &OpenOptions::read_only()).unwrap();
        for &(off, len, pat) in expect {
            let mut b = vec![0xEEu8; len as usize + 1024];
            d.read_at(off - 512, &mut b).unwrap();
            let at = |s: &[u8], v: u8| s.iter().all(|&x| x == v);
            assert!(at(&b[..512], 0), "{}: before {off}", path.display());
            assert!(
                at(&b[512..512 + len as usize], pat),
                "{}: at {off}",
                path.display()
            );
            assert!(
                at(&b[512 + len as usize..], 0),
                "{}: after {off}",
                path.display()
            );
        }
    }
    // vstor's own patterns survived QEMU's writes.
    let d = Vhdx::open(&img, &OpenOptions::read_only()).unwrap();
    for &(off, len, pat) in &writes {
        let mut b = vec![0u8; len as usize];
        d.read_at(off, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == pat), "vstor's write at {off}");
    }
}

#[test]
fn differencing_chain_across_sector_bitmap_chunks_read_by_libvhdi() {
    // Sector-granular writes at every chunk boundary of a three-level chain: the sector bitmap
    // of each chunk lives in its own bitmap block, found through its own BAT entry.
    for (logical, bs, size) in [
        (512u64, 32 * MIB, 9 * 1024 * MIB),
        (512, MIB, 9 * 1024 * MIB + 512),
        (4096, 256 * MIB, 70 * 1024 * MIB),
    ] {
        let chunk = chunk_bytes(logical);
        let what = format!("{logical}-byte sectors, {} MiB blocks", bs / MIB);
        let dir = tempfile::tempdir().unwrap();
        let mut ranges: Vec<(u64, u64)> = vec![(0, 2 * MIB)];
        for c in 1..=(size - 1) / chunk {
            ranges.push((c * chunk - 2 * MIB, 4 * MIB));
        }
        ranges.push((size - 2 * MIB, 2 * MIB));
        let mut rng = fastrand::Rng::with_seed(70 + logical + bs);
        let mut paths: Vec<PathBuf> = Vec::new();
        for level in 0..3 {
            let p = dir.path().join(format!("level{level}.vhdx"));
            let opts = if level == 0 {
                CreateOptions::dynamic(size)
                    .block_size(bs as u32)
                    .logical_sector_size(logical as u32)
            } else {
                CreateOptions::differencing(&paths[level - 1])
            };
            let d = Vhdx::create(&p, &opts).unwrap();
            for &(o, l) in &ranges {
                for _ in 0..6 {
                    let n = rng.u64(1..=16) * logical;
                    let off = o + rng.u64(0..(l - n) / logical) * logical;
                    d.write_at(off, &random_data(&mut rng, n)).unwrap();
                }
            }
            // Exactly across each chunk boundary, wider at each level.
            for c in 1..=(size - 1) / chunk {
                let n = 2 * logical * (level as u64 + 1);
                d.write_at(c * chunk - n / 2, &random_data(&mut rng, n))
                    .unwrap();
            }
            d.close().unwrap();
            drop(d);
            paths.push(p);
        }
        let chain: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let views = libvhdi_read_chain_ranges(&chain, Some(&ranges));
        for (level, p) in paths.iter().enumerate() {
            let d = Vhdx::open(p, &OpenOptions::read_only()).unwrap();
            let mut h = Md5::new();
            for &(o, l) in &ranges {
                let mut b = vec![0u8; l as usize];
                d.read_at(o, &mut b).unwrap();
                h.update(&b);
            }
            assert_eq!(views[level].size, size, "{what}: level {level}");
            assert_eq!(
                views[level].md5,
                h.hex(),
                "{what}: libvhdi reads level {level} differently"
            );
        }
    }
}

/// A QEMU-made image of 100000K (its last 1 MiB block short, and short in the file), with data
/// up to its last byte, grown to 200G and shrunk back to 100000K: the smallest size is the end
/// of the data, not the end of its last block.
#[test]
fn qemu_image_of_100000k_grown_to_200g_shrinks_back_to_100000k() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhdx");
    let size = 100_000 * 1024;
    run(qemu_img()
        .args([
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=1M",
        ])
        .arg(&img)
        .arg("100000K"));
    qemu_io(
        &img,
        &[
            "write -P 0x5a 0 64k".to_string(),
            format!("write -P 0x6b {} 4096", size - 4096),
        ],
    );
    let raw = dir.path().join("q.raw");
    qemu_convert_to_raw(&img, &raw);
    let v = Vhdx::open(&img, &OpenOptions::default()).unwrap();
    assert_eq!(v.minimum_size(), size);
    v.resize_with(200 << 30, &vstor_core::Job::new()).unwrap();
    assert_eq!(v.minimum_size(), size, "growing adds no data");
    v.resize_with(size, &vstor_core::Job::new())
        .unwrap_or_else(|e| panic!("shrinking back to 100000K: {e}"));
    assert_eq!(v.capacity(), size);
    v.close().unwrap();
    drop(v);
    assert_eq!(qemu_virtual_size(&img), size);
    qemu_check(&img);
    qemu_compare(&img, &raw);
    vstor_check(&img);
}
