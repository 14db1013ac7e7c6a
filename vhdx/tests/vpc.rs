//! The legacy VHD reader (`vstor_vhdx::vpc`) against real peers and hostile input.
//!
//! - QEMU (`qemu-img`, `qemu-io`): fixed and dynamic images QEMU creates and writes (default
//!   CHS sizing, `force_size=on`) read byte for byte as `qemu-img convert -O raw` gives them,
//!   through batches of vectored reads; the allocation `locate` reports is the one `qemu-img
//!   map` reports; an image marked as made by Virtual PC whose `current_size` exceeds its
//!   geometry is sized by `current_size` (QEMU sizes it by the geometry; the bytes agree where
//!   both have them).
//! - libvhdi (`vhdiinfo`, `pyvhdi` under /usr/bin/python3): differencing chains, and a dynamic
//!   disk with partly set sector bitmaps, read exactly as libvhdi reads them. QEMU cannot make a
//!   differencing VHD (`qemu-img create -f vpc -b ...` answers "Backing file not supported for
//!   file format 'vpc'", and QEMU opens one as a plain dynamic disk, ignoring its parent and
//!   its sector bitmaps), so these images are built here from the module's zerocopy structures,
//!   laid out as Windows lays them out, with garbage in every sector whose bitmap bit is clear.
//! - Parent resolution: relative locators first, then absolute ones (`MacX` URLs with
//!   percent-escapes), then the parent's file name; unique-id mismatches, missing parents,
//!   cycles and chains deeper than 64 give typed errors.
//! - Malformed images: truncation, bad checksums (with the fallback to the footer copy),
//!   absurd sizes, bad block sizes, BAT entries past the end of the file or overlapping,
//!   locators past the end: each a typed error naming the structure and its offset.
//!
//! Every tool must be installed: a missing one fails the test (it does not skip it).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::run;
use vstor_core::{BlockDevice, Error, MemoryDevice, OpKind, Request};
use vstor_vhdx::vpc::*;
use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The system Python that has the libvhdi bindings (the `python3` on PATH may not).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

// ---------------------------------------------------------------------------------------------
// Peers

fn qemu_img() -> Command {
    Command::new("qemu-img")
}

/// `qemu-img create -f vpc` with these `-o` options.
fn qemu_create(path: &Path, size: u64, opts: &str) {
    let mut c = qemu_img();
    c.args(["create", "-q", "-f", "vpc"]);
    if !opts.is_empty() {
        c.args(["-o", opts]);
    }
    run(c.arg(path).arg(size.to_string()));
}

/// `qemu-io -f vpc`: writes `pattern` over each `(offset, len)`.
fn qemu_write(path: &Path, writes: &[(u8, u64, u64)]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "vpc"]);
    for (p, off, len) in writes {
        c.arg("-c").arg(format!("write -P {p:#x} {off} {len}"));
    }
    run(c.arg(path));
}

/// What QEMU reads: `qemu-img convert -O raw`.
fn qemu_raw(path: &Path) -> Vec<u8> {
    let out = path.with_extension("raw");
    run(qemu_img()
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(path)
        .arg(&out));
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// `qemu-img info`: the virtual size.
fn qemu_virtual_size(path: &Path) -> u64 {
    let out = run(qemu_img().args(["info", "-f", "vpc"]).arg(path));
    let line = out
        .lines()
        .find(|l| l.starts_with("virtual size:"))
        .unwrap_or_else(|| panic!("no virtual size in {out}"));
    line.rsplit('(')
        .next()
        .and_then(|s| s.strip_suffix(" bytes)"))
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap()
}

/// `qemu-img map --output=json`: per sector, whether QEMU says it holds data.
fn qemu_data_sectors(path: &Path, capacity: u64) -> Vec<bool> {
    let out = run(qemu_img()
        .args(["map", "--output=json", "-f", "vpc"])
        .arg(path));
    let num = |l: &str, key: &str| -> u64 {
        let at = l
            .find(&format!("\"{key}\": "))
            .unwrap_or_else(|| panic!("{l}"));
        l[at + key.len() + 4..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut v = vec![false; (capacity / 512) as usize];
    let mut covered = 0;
    for l in out.lines().filter(|l| l.contains("\"start\"")) {
        let (start, len) = (num(l, "start"), num(l, "length"));
        covered += len;
        if l.contains("\"data\": true") {
            v[(start / 512) as usize..((start + len) / 512) as usize].fill(true);
        }
    }
    assert_eq!(covered, capacity, "{out}");
    v
}

fn vhdiinfo(path: &Path) -> String {
    run(Command::new("vhdiinfo").arg(path))
}

/// The value of a `\tName\t\t: value` line of vhdiinfo's output.
fn vhdiinfo_field(info: &str, name: &str) -> String {
    info.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| panic!("vhdiinfo gives no {name}: {info}"))
}

/// Reads the last image of `chain` (base first, each opened with its predecessor as parent)
/// whole through libvhdi and writes it to `out`.
const PYVHDI_SCRIPT: &str = r#"
import sys
import pyvhdi

files = []
for path in sys.argv[2:]:
    f = pyvhdi.file()
    f.open(path)
    if files:
        f.set_parent(files[-1])
    files.append(f)
f = files[-1]
size = f.get_media_size()
with open(sys.argv[1], "wb") as out:
    off = 0
    while off < size:
        n = min(1 << 20, size - off)
        data = f.read_buffer_at_offset(n, off)
        if len(data) != n:
            raise SystemExit("short read at %d: %d of %d" % (off, len(data), n))
        out.write(data)
        off += n
"#;

fn libvhdi_read(chain: &[&Path]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("read.py");
    let out = dir.path().join("out.raw");
    std::fs::write(&script, PYVHDI_SCRIPT).unwrap();
    run(Command::new(SYSTEM_PYTHON)
        .arg(&script)
        .arg(&out)
        .args(chain));
    std::fs::read(&out).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Reading through vstor

/// The whole disk, read in batches of eight requests of 384 KiB, each request in two buffers
/// split at an odd byte, so that pieces cross buffers and blocks.
fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
    let cap = d.capacity() as usize;
    let mut out = vec![0x99u8; cap];
    let step = 384 * KIB as usize;
    let mut pos = 0;
    while pos < cap {
        let end = (pos + 8 * step).min(cap);
        let mut reqs = Vec::new();
        let mut o = pos as u64;
        for piece in out[pos..end].chunks_mut(step) {
            let n = piece.len() as u64;
            let (a, b) = piece.split_at_mut(piece.len() / 3 + 1);
            reqs.push(Request::readv(o, [a, b]));
            o += n;
        }
        d.submit_all(&mut reqs).unwrap();
        pos = end;
    }
    out
}

#[track_caller]
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (sector {}): {:#04x}, expected {:#04x}",
            i / 512,
            got[i],
            want[i]
        );
    }
}

/// Per sector, whether `locate` says this file holds it.
fn file_sectors(v: &Vpc) -> Vec<bool> {
    let mut out = Vec::new();
    for (n, p) in v.locate(0, v.capacity()).unwrap() {
        out.extend(std::iter::repeat_n(
            matches!(p, Place::File(_)),
            (n / 512) as usize,
        ));
    }
    out
}

fn layer_error(e: &Error) -> &VpcError {
    let Error::Layer(inner) = e else {
        panic!("expected a VHD error, got {e}")
    };
    inner
        .downcast_ref::<VpcError>()
        .unwrap_or_else(|| panic!("expected a VHD error, got {e}"))
}

// ---------------------------------------------------------------------------------------------
// Images QEMU makes

#[test]
fn fixed_images_qemu_writes_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fixed.vhd");
    qemu_create(&img, 10 * MIB, "subformat=fixed");
    let cap = qemu_virtual_size(&img);
    qemu_write(
        &img,
        &[
            (0xab, 0, 64 * KIB),
            (0xcd, MIB + 512, 3 * KIB),
            (0x5e, cap - 4 * KIB, 4 * KIB),
        ],
    );
    let v = Vpc::open(&img).unwrap();
    assert_eq!(v.kind(), VpcKind::Fixed);
    assert_eq!(v.capacity(), cap);
    assert_eq!(v.creator_app(), "qemu");
    assert_eq!(v.qemu_capacity(), cap);
    assert!(v.parent().is_none() && v.dyn_header().is_none() && v.block_size().is_none());
    assert!(v.notes().is_empty(), "{:?}", v.notes());
    assert_same("fixed", &read_all(&v), &qemu_raw(&img));
    assert_eq!(v.locate(0, cap).unwrap(), vec![(cap, Place::File(0))]);
    let info = vhdiinfo(&img);
    assert_eq!(vhdiinfo_field(&info, "Disk type"), "Fixed");
    assert_eq!(
        vhdiinfo_field(&info, "Identifier"),
        format_id(&v.unique_id())
    );
}

#[test]
fn dynamic_images_qemu_writes_read_identically_and_map_as_qemu_maps_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dynamic.vhd");
    qemu_create(&img, 20 * MIB, "");
    let cap = qemu_virtual_size(&img);
    qemu_write(
        &img,
        &[
            (0xab, 0, 64 * KIB),
            (0xcd, 2 * MIB - 4 * KIB, 8 * KIB),
            (0x11, 9 * MIB, 512),
            (0x22, cap - 512, 512),
        ],
    );
    let v = Vpc::open(&img).unwrap();
    assert_eq!(v.kind(), VpcKind::Dynamic);
    assert_eq!(v.capacity(), cap);
    assert_eq!(v.block_size(), Some(2 * MIB));
    assert!(v.notes().is_empty(), "{:?}", v.notes());
    assert_same("dynamic", &read_all(&v), &qemu_raw(&img));
    assert_eq!(file_sectors(&v), qemu_data_sectors(&img, cap));
    // What is not in the file is zeros, not the parent's: a dynamic disk has none.
    assert!(v
        .locate(0, cap)
        .unwrap()
        .iter()
        .all(|(_, p)| matches!(p, Place::File(_) | Place::Zero)));
    let chain = v.locate_chain(2 * MIB, 4 * MIB).unwrap();
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert!(matches!(chain[0], (n, ChainPlace::File { depth: 0, .. }) if n == 2 * MIB));
    assert_eq!(chain[1], (2 * MIB, ChainPlace::Zero));
    let info = vhdiinfo(&img);
    assert_eq!(vhdiinfo_field(&info, "Disk type"), "Dynamic");
    assert_eq!(
        vhdiinfo_field(&info, "Identifier"),
        format_id(&v.unique_id())
    );
}

#[test]
fn force_size_images_are_sized_by_current_size_as_qemu_sizes_them() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["dynamic", "fixed"] {
        let img = dir.path().join(format!("{sub}.vhd"));
        let size = 19_532 * 512; // Not a CHS size.
        qemu_create(&img, size, &format!("subformat={sub},force_size=on"));
        qemu_write(&img, &[(0x77, size - 8 * KIB, 8 * KIB), (0x78, 0, 512)]);
        let v = Vpc::open(&img).unwrap();
        assert_eq!(v.creator_app(), "qem2");
        assert_eq!(v.capacity(), size);
        assert_eq!(qemu_virtual_size(&img), size);
        assert_eq!(v.qemu_capacity(), size);
        assert_same(sub, &read_all(&v), &qemu_raw(&img));
    }
}

/// Rewrites both footers of a dynamic image (the copy at 0 and the one at the end).
fn patch_footers(img: &Path, f: impl Fn(&mut Footer)) {
    let mut b = std::fs::read(img).unwrap();
    let end = b.len() - 512;
    for at in [0, end] {
        let mut footer = Footer::read_from_bytes(&b[at..at + 512]).unwrap();
        f(&mut footer);
        footer.seal();
        b[at..at + 512].copy_from_slice(footer.as_bytes());
    }
    std::fs::write(img, b).unwrap();
}

#[test]
fn a_virtual_pc_image_is_sized_by_current_size_where_qemu_uses_its_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vpc.vhd");
    qemu_create(&img, 10 * MIB, "");
    let chs = qemu_virtual_size(&img);
    qemu_write(
        &img,
        &[(0x3c, chs - 64 * KIB, 64 * KIB), (0x3d, 0, 4 * KIB)],
    );
    // As Virtual PC writes it: creator "vpc ", current_size past the geometry (the table has
    // room: 6 blocks of 2 MiB for 10 MiB).
    let size = chs + MIB;
    patch_footers(&img, |f| {
        f.creator_app = *b"vpc ";
        f.current_size = U64::new(size);
    });
    let v = Vpc::open(&img).unwrap();
    assert_eq!(v.capacity(), size);
    assert_eq!(v.qemu_capacity(), chs);
    assert_eq!(qemu_virtual_size(&img), chs);
    let ours = read_all(&v);
    assert_same(
        "the geometry's part",
        &ours[..chs as usize],
        &qemu_raw(&img),
    );
    assert!(ours[chs as usize..].iter().all(|&b| b == 0));
    // Marked as made by Hyper-V instead, QEMU sizes it by current_size too.
    patch_footers(&img, |f| f.creator_app = *b"win ");
    assert_eq!(qemu_virtual_size(&img), size);
    let v = Vpc::open(&img).unwrap();
    assert_eq!(v.qemu_capacity(), size);
    assert_same("win", &read_all(&v), &qemu_raw(&img));
}

#[test]
fn concurrent_readers_see_what_qemu_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dynamic.vhd");
    qemu_create(&img, 16 * MIB, "");
    let mut writes = Vec::new();
    for i in 0..24u64 {
        writes.push(((i + 1) as u8, (i * 655_360) % (15 * MIB), 4 * KIB + 512 * i));
    }
    qemu_write(&img, &writes);
    let raw = Arc::new(qemu_raw(&img));
    let v = Arc::new(Vpc::open(&img).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (v, raw) = (v.clone(), raw.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t);
                for _ in 0..200 {
                    let len = rng.u64(1..=256) * 512;
                    let off = rng.u64(0..(v.capacity() - len) / 512) * 512;
                    let mut buf = vec![0u8; len as usize];
                    v.read_at(off, &mut buf).unwrap();
                    assert!(
                        buf[..] == raw[off as usize..(off + len) as usize],
                        "{off}+{len}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Images built here (differencing disks, partly set bitmaps, malformed structures)

/// An allocated block of a built image: which of its sectors are present and each present
/// sector's fill byte.
struct Block {
    index: u64,
    present: Vec<bool>,
    fill: u8,
}

struct Spec {
    capacity: u64,
    block_size: u64,
    /// `None`: dynamic; `Some`: differencing with this parent unique id and locators.
    parent: Option<Parent>,
    blocks: Vec<Block>,
    unique_id: [u8; 16],
}

struct Parent {
    id: [u8; 16],
    name: String,
    locators: Vec<(u32, Vec<u8>)>,
}

fn w2(path: &str) -> Vec<u8> {
    path.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id.iter_mut().for_each(|b| *b = fastrand::u8(..));
    id
}

/// Byte offsets of the structures of a built image.
struct Layout {
    bat: u64,
    locators: u64,
    blocks: u64,
}

/// Lays out an image as Windows does: footer copy, header, BAT, locator data, blocks, footer.
/// Sectors whose bit is clear hold garbage (0xEE), which a reader must not return.
fn build(spec: &Spec) -> (Vec<u8>, Layout) {
    let bs = spec.block_size;
    let entries = spec.capacity.div_ceil(bs);
    let bat = 1536;
    let locators = bat + (entries * 4).next_multiple_of(512);
    let nloc = spec.parent.as_ref().map_or(0, |p| p.locators.len() as u64);
    let blocks = locators + nloc * 512;
    let bm = bitmap_size(bs);
    let end = blocks + spec.blocks.len() as u64 * (bm + bs);
    let mut img = vec![0u8; (end + 512) as usize];

    let mut f = Footer::new_zeroed();
    f.cookie = FOOTER_COOKIE;
    f.features = U32::new(2);
    f.format_version = U32::new(VERSION_1_0);
    f.data_offset = U64::new(512);
    f.creator_app = *b"win ";
    f.creator_version = U32::new(0x000a_0000);
    f.creator_host_os = *b"Wi2k";
    f.original_size = U64::new(spec.capacity);
    f.current_size = U64::new(spec.capacity);
    f.cylinders = 65535.into();
    f.heads = 16;
    f.sectors_per_track = 255;
    f.disk_type = U32::new(if spec.parent.is_some() {
        DISK_DIFFERENCING
    } else {
        DISK_DYNAMIC
    });
    f.unique_id = spec.unique_id;
    f.seal();

    let mut h = DynHeader::new_zeroed();
    h.cookie = DYN_HEADER_COOKIE;
    h.data_offset = U64::new(u64::MAX);
    h.table_offset = U64::new(bat);
    h.header_version = U32::new(VERSION_1_0);
    h.max_table_entries = U32::new(entries as u32);
    h.block_size = U32::new(bs as u32);
    if let Some(p) = &spec.parent {
        h.parent_unique_id = p.id;
        let name: Vec<u8> = p.name.encode_utf16().flat_map(u16::to_be_bytes).collect();
        h.parent_unicode_name[..name.len()].copy_from_slice(&name);
        for (k, (code, data)) in p.locators.iter().enumerate() {
            assert!(data.len() <= 512);
            let at = locators + 512 * k as u64;
            let l = &mut h.parent_locators[k];
            l.platform_code = U32::new(*code);
            l.platform_data_space = U32::new(512);
            l.platform_data_length = U32::new(data.len() as u32);
            l.platform_data_offset = U64::new(at);
            img[at as usize..at as usize + data.len()].copy_from_slice(data);
        }
    }
    h.seal();

    let mut table = vec![BAT_UNUSED; entries as usize];
    for (k, b) in spec.blocks.iter().enumerate() {
        let at = blocks + k as u64 * (bm + bs);
        table[b.index as usize] = (at / 512) as u32;
        for (s, &p) in b.present.iter().enumerate() {
            if p {
                img[at as usize + s / 8] |= 0x80 >> (s % 8);
            }
            let d = (at + bm) as usize + s * 512;
            img[d..d + 512].fill(if p { b.fill } else { 0xEE });
        }
    }
    for (i, e) in table.iter().enumerate() {
        let at = bat as usize + 4 * i;
        img[at..at + 4].copy_from_slice(U32::new(*e).as_bytes());
    }
    img[..512].copy_from_slice(f.as_bytes());
    img[512..1536].copy_from_slice(h.as_bytes());
    img[end as usize..].copy_from_slice(f.as_bytes());
    (
        img,
        Layout {
            bat,
            locators,
            blocks,
        },
    )
}

/// What the built image reads as over `under` (the parent's contents, or zeros).
fn model(spec: &Spec, under: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; spec.capacity as usize];
    let n = under.len().min(m.len());
    m[..n].copy_from_slice(&under[..n]);
    for b in &spec.blocks {
        for (s, &p) in b.present.iter().enumerate() {
            let at = (b.index * spec.block_size) as usize + s * 512;
            if p && at < m.len() {
                m[at..at + 512].fill(b.fill);
            }
        }
    }
    m
}

/// The present bits of a block of `sectors` sectors: those in the `[start, end)` ranges.
fn bits(sectors: u64, ranges: &[(u64, u64)]) -> Vec<bool> {
    (0..sectors)
        .map(|s| ranges.iter().any(|&(a, b)| (a..b).contains(&s)))
        .collect()
}

fn on_memory(img: &[u8], parent: Option<Arc<dyn BlockDevice>>) -> vstor_core::Result<Vpc> {
    let mem = MemoryDevice::new(img.len() as u64).unwrap();
    mem.write_at(0, img).unwrap();
    Vpc::open_on(Arc::new(mem), "bad.vhd", parent)
}

#[test]
fn a_dynamic_disk_with_partly_set_bitmaps_reads_as_libvhdi_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.vhd");
    // Runs of present sectors start anywhere but end on a bitmap byte: libvhdi 20210425 reads
    // a run that ends inside a byte on to the end of that byte (below, vstor alone is checked
    // against the specification's reading for such runs).
    let mut spec = Spec {
        capacity: 6 * MIB,
        block_size: 512 * KIB,
        parent: None,
        blocks: vec![
            Block {
                index: 0,
                present: bits(1024, &[(0, 8), (100, 104), (1023, 1024)]),
                fill: 0x11,
            },
            Block {
                index: 5,
                present: bits(1024, &[(0, 1024)]),
                fill: 0x22,
            },
            Block {
                index: 7,
                present: bits(1024, &[]),
                fill: 0x33,
            },
        ],
        unique_id: random_id(),
    };
    std::fs::write(&img, build(&spec).0).unwrap();
    let want = model(&spec, &[]);
    let v = Vpc::open(&img).unwrap();
    assert_eq!(v.kind(), VpcKind::Dynamic);
    assert_same("vstor", &read_all(&v), &want);
    assert_same("libvhdi", &libvhdi_read(&[&img]), &want);
    let map = v.locate(0, 2 * MIB).unwrap();
    assert_eq!(map[0].0, 8 * 512);
    assert!(matches!(map[0].1, Place::File(_)));
    assert_eq!(map[1], (92 * 512, Place::Zero));
    assert!(matches!(map[2], (2048, Place::File(_))));
    // Block 7 is allocated but nothing in it is present.
    assert_eq!(
        v.locate(7 * 512 * KIB, 512 * KIB).unwrap(),
        vec![(512 * KIB, Place::Zero)]
    );

    // Single sectors inside a byte (the most significant bit is the first sector).
    spec.blocks[0].present = bits(1024, &[(100, 101), (203, 205), (1022, 1023)]);
    std::fs::write(&img, build(&spec).0).unwrap();
    let v = Vpc::open(&img).unwrap();
    assert_same("vstor", &read_all(&v), &model(&spec, &[]));
    let files: Vec<(u64, u64)> = v
        .locate(0, 512 * KIB)
        .unwrap()
        .into_iter()
        .scan(0, |pos, (n, p)| {
            let at = *pos;
            *pos += n;
            Some((at / 512, n / 512, p))
        })
        .filter(|(_, _, p)| matches!(p, Place::File(_)))
        .map(|(s, n, _)| (s, n))
        .collect();
    assert_eq!(files, vec![(100, 1), (203, 2), (1022, 1)]);
}

/// A differencing disk over `parent` (its unique id), with these locators and blocks.
fn child_spec(parent: &Vpc, locators: Vec<(u32, Vec<u8>)>, blocks: Vec<Block>) -> Spec {
    Spec {
        capacity: parent.capacity(),
        block_size: 512 * KIB,
        parent: Some(Parent {
            id: parent.unique_id(),
            name: "parent.vhd".into(),
            locators,
        }),
        blocks,
        unique_id: random_id(),
    }
}

#[test]
fn differencing_disks_read_through_their_parent_as_libvhdi_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    qemu_create(&parent, 8 * MIB, "");
    qemu_write(&parent, &[(0xab, 0, 4 * MIB), (0xcd, 6 * MIB, 64 * KIB)]);
    let p = Vpc::open(&parent).unwrap();
    let child = dir.path().join("child.vhd");
    let spec = child_spec(
        &p,
        vec![
            (PLATFORM_W2KU, w2(r"C:\Hyper-V\Disks\parent.vhd")),
            (PLATFORM_W2RU, w2(r".\parent.vhd")),
        ],
        vec![
            Block {
                index: 0,
                present: bits(1024, &[(0, 8), (100, 104)]),
                fill: 0x11,
            },
            Block {
                index: 2,
                present: bits(1024, &[(0, 1024)]),
                fill: 0x22,
            },
            // Allocated, nothing present: all from the parent.
            Block {
                index: 3,
                present: bits(1024, &[]),
                fill: 0x33,
            },
            Block {
                index: 12,
                present: bits(1024, &[(512, 1024)]),
                fill: 0x44,
            },
        ],
    );
    std::fs::write(&child, build(&spec).0).unwrap();
    let want = model(&spec, &qemu_raw(&parent));

    let v = Vpc::open(&child).unwrap();
    assert_eq!(v.kind(), VpcKind::Differencing);
    assert_eq!(v.parent_vpc().unwrap().kind(), VpcKind::Dynamic);
    assert_eq!(v.parent().unwrap().capacity(), p.capacity());
    assert_eq!(v.parent_name(), Some("parent.vhd"));
    let locs: Vec<(String, bool, &str)> = v
        .parent_locators()
        .iter()
        .map(|l| (l.platform_name(), l.relative, l.path.as_str()))
        .collect();
    assert_eq!(
        locs,
        vec![
            ("W2ku".into(), false, r"C:\Hyper-V\Disks\parent.vhd"),
            ("W2ru".into(), true, r".\parent.vhd"),
        ]
    );
    assert_same("vstor", &read_all(&v), &want);
    assert_same("libvhdi", &libvhdi_read(&[&parent, &child]), &want);

    let info = vhdiinfo(&child);
    assert_eq!(vhdiinfo_field(&info, "Disk type"), "Differential");
    assert_eq!(
        vhdiinfo_field(&info, "Parent identifier"),
        format_id(&p.unique_id())
    );

    // This file alone: block 0 sectors 0..8 here, the rest of it from the parent.
    let map = v.locate(0, 512 * KIB).unwrap();
    assert!(matches!(map[0], (4096, Place::File(_))));
    assert_eq!(map[1], (92 * 512, Place::Parent(4096)));
    // Through the chain: 4..6 MiB is allocated nowhere (the parent's block 2 is empty).
    let chain = v.locate_chain(4 * MIB, 2 * MIB).unwrap();
    assert_eq!(chain, vec![(2 * MIB, ChainPlace::Zero)]);
    // 6..6.5 MiB: the parent's first half, the child's second.
    let chain = v.locate_chain(6 * MIB, 512 * KIB).unwrap();
    assert!(
        matches!(
            chain[..],
            [
                (a, ChainPlace::File { depth: 1, .. }),
                (b, ChainPlace::File { depth: 0, .. })
            ] if a == 256 * KIB && b == 256 * KIB
        ),
        "{chain:?}"
    );
    let chain = v.locate_chain(2 * 512 * KIB, 512 * KIB).unwrap();
    assert!(
        matches!(chain[..], [(n, ChainPlace::File { depth: 0, .. })] if n == 512 * KIB),
        "{chain:?}"
    );

    // The same through open_on: an opaque parent device, or a VHD parent that is checked.
    let file: Arc<dyn BlockDevice> = Arc::new(
        vstor_core::FileDevice::open(
            &child,
            &vstor_core::FileOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let pv = Arc::new(Vpc::open(&parent).unwrap());
    let o = Vpc::open_on(
        file.clone(),
        "child",
        Some(pv.clone() as Arc<dyn BlockDevice>),
    )
    .unwrap();
    assert_same("open_on", &read_all(&o), &want);
    assert!(matches!(
        o.locate_chain(6 * MIB, 512 * KIB).unwrap()[..],
        [(_, ChainPlace::Device(o)), (_, ChainPlace::File { depth: 0, .. })] if o == 6 * MIB
    ));
    let o = Vpc::open_on_chain(file.clone(), "child", Some(pv)).unwrap();
    assert_same("open_on_chain", &read_all(&o), &want);
    let e = Vpc::open_on(file, "child", None).unwrap_err();
    assert!(
        matches!(layer_error(&e), VpcError::InvalidParameter(_)),
        "{e}"
    );
}

#[test]
fn a_three_level_chain_resolves_relative_and_url_locators_across_directories() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["base", "mid dir", "top"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let base = dir.path().join("base/base.vhd");
    qemu_create(&base, 4 * MIB, "");
    qemu_write(&base, &[(0x01, 0, 4 * MIB)]);
    let b = Vpc::open(&base).unwrap();

    let mid = dir.path().join("mid dir/mid.vhd");
    let mid_spec = child_spec(
        &b,
        vec![(PLATFORM_W2RU, w2(r"..\base\base.vhd"))],
        vec![Block {
            index: 1,
            present: bits(1024, &[(0, 512)]),
            fill: 0x02,
        }],
    );
    std::fs::write(&mid, build(&mid_spec).0).unwrap();
    let m = Vpc::open(&mid).unwrap();

    let top = dir.path().join("top/top.vhd");
    let url = format!(
        "file://localhost{}",
        mid.canonicalize()
            .unwrap()
            .display()
            .to_string()
            .replace(' ', "%20")
    );
    let mut top_spec = child_spec(
        &m,
        vec![
            (PLATFORM_W2KU, w2(r"C:\elsewhere\mid.vhd")),
            (PLATFORM_MACX, url.into_bytes()),
        ],
        vec![Block {
            index: 1,
            present: bits(1024, &[(256, 768)]),
            fill: 0x03,
        }],
    );
    top_spec.block_size = 2 * MIB;
    top_spec.blocks[0].index = 0;
    top_spec.blocks[0].present = bits(4096, &[(1280, 1792)]);
    std::fs::write(&top, build(&top_spec).0).unwrap();

    let want = model(&top_spec, &model(&mid_spec, &qemu_raw(&base)));
    let t = Vpc::open(&top).unwrap();
    assert_eq!(
        t.parent_vpc().unwrap().parent_vpc().unwrap().kind(),
        VpcKind::Dynamic
    );
    assert_eq!(
        t.parent_vpc()
            .unwrap()
            .path()
            .unwrap()
            .canonicalize()
            .unwrap(),
        mid.canonicalize().unwrap()
    );
    assert_same("vstor", &read_all(&t), &want);
    assert_same("libvhdi", &libvhdi_read(&[&base, &mid, &top]), &want);
    // 512..640 KiB: mid's sectors; 640..896 KiB: top's; 896 KiB..1 MiB: base's.
    let chain = t.locate_chain(512 * KIB, 512 * KIB).unwrap();
    let depths: Vec<(u64, usize)> = chain
        .iter()
        .map(|(n, p)| match p {
            ChainPlace::File { depth, .. } => (*n / KIB, *depth),
            p => panic!("{p:?}"),
        })
        .collect();
    assert_eq!(depths, vec![(128, 1), (256, 0), (128, 2)]);
}

#[test]
fn a_parent_is_found_by_its_file_name_beside_the_child_when_its_paths_fail() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    qemu_create(&parent, 2 * MIB, "");
    qemu_write(&parent, &[(0x61, 0, 2 * MIB)]);
    let p = Vpc::open(&parent).unwrap();
    let child = dir.path().join("child.vhd");
    let spec = child_spec(&p, vec![(PLATFORM_W2KU, w2(r"D:\VMs\parent.vhd"))], vec![]);
    std::fs::write(&child, build(&spec).0).unwrap();
    let v = Vpc::open(&child).unwrap();
    assert_same("by name", &read_all(&v), &qemu_raw(&parent));
}

#[test]
fn a_parent_that_is_missing_or_not_the_one_the_child_was_made_from_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    qemu_create(&parent, 2 * MIB, "");
    let p = Vpc::open(&parent).unwrap();

    // Missing: every path tried is named.
    let child = dir.path().join("lost.vhd");
    let mut spec = child_spec(&p, vec![(PLATFORM_W2RU, w2(r".\gone.vhd"))], vec![]);
    spec.parent.as_mut().unwrap().name = "gone.vhd".into();
    std::fs::write(&child, build(&spec).0).unwrap();
    let e = Vpc::open(&child).unwrap_err();
    let VpcError::ParentNotFound { tried, .. } = layer_error(&e) else {
        panic!("{e}")
    };
    assert!(tried.iter().any(|t| t.ends_with("/gone.vhd")), "{tried:?}");

    // Another disk of the same name: its unique id is not the one recorded.
    let child = dir.path().join("child.vhd");
    let mut spec = child_spec(&p, vec![(PLATFORM_W2RU, w2(r".\parent.vhd"))], vec![]);
    spec.parent.as_mut().unwrap().id = random_id();
    std::fs::write(&child, build(&spec).0).unwrap();
    let e = Vpc::open(&child).unwrap_err();
    let VpcError::ParentMismatch {
        expected, found, ..
    } = layer_error(&e)
    else {
        panic!("{e}")
    };
    assert_eq!(found, &format_id(&p.unique_id()));
    assert_eq!(expected, &format_id(&spec.parent.as_ref().unwrap().id));
    // open_on_chain checks the same.
    let mem = MemoryDevice::new(std::fs::metadata(&child).unwrap().len()).unwrap();
    mem.write_at(0, &std::fs::read(&child).unwrap()).unwrap();
    let e = Vpc::open_on_chain(Arc::new(mem), "child", Some(Arc::new(p))).unwrap_err();
    assert!(
        matches!(layer_error(&e), VpcError::ParentMismatch { .. }),
        "{e}"
    );
}

#[test]
fn cycles_and_chains_deeper_than_64_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = |id: [u8; 16], parent_id: [u8; 16], parent_name: &str| Spec {
        capacity: 64 * KIB,
        block_size: 4 * KIB,
        parent: Some(Parent {
            id: parent_id,
            name: parent_name.into(),
            locators: vec![(PLATFORM_W2RU, w2(&format!(r".\{parent_name}")))],
        }),
        blocks: vec![],
        unique_id: id,
    };
    // a -> b -> a.
    let (ida, idb) = (random_id(), random_id());
    std::fs::write(dir.path().join("a.vhd"), build(&spec(ida, idb, "b.vhd")).0).unwrap();
    std::fs::write(dir.path().join("b.vhd"), build(&spec(idb, ida, "a.vhd")).0).unwrap();
    let e = Vpc::open(dir.path().join("a.vhd")).unwrap_err();
    let VpcError::ChainCycle(p) = layer_error(&e) else {
        panic!("{e}")
    };
    assert!(p.ends_with("a.vhd"), "{}", p.display());
    // Its own parent.
    let id = random_id();
    std::fs::write(
        dir.path().join("self.vhd"),
        build(&spec(id, id, "self.vhd")).0,
    )
    .unwrap();
    let e = Vpc::open(dir.path().join("self.vhd")).unwrap_err();
    assert!(matches!(layer_error(&e), VpcError::ChainCycle(_)), "{e}");

    // A dynamic base and 65 differencing disks above it: 64 parents open, 65 do not.
    let base = Spec {
        parent: None,
        ..spec(random_id(), [0; 16], "x")
    };
    std::fs::write(dir.path().join("d0.vhd"), build(&base).0).unwrap();
    let mut below = base.unique_id;
    for level in 1..=65 {
        let s = spec(random_id(), below, &format!("d{}.vhd", level - 1));
        std::fs::write(dir.path().join(format!("d{level}.vhd")), build(&s).0).unwrap();
        below = s.unique_id;
    }
    let v = Vpc::open(dir.path().join("d64.vhd")).unwrap();
    let mut depth = 0;
    let mut at = Some(&v);
    while let Some(x) = at {
        at = x.parent_vpc().map(|p| &**p);
        depth += 1;
    }
    assert_eq!(depth, 65);
    let e = Vpc::open(dir.path().join("d65.vhd")).unwrap_err();
    assert!(
        matches!(layer_error(&e), VpcError::ChainTooDeep(MAX_CHAIN_DEPTH)),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed images

/// A valid dynamic image of 4 MiB in 512 KiB blocks with two blocks allocated.
fn good() -> (Spec, Vec<u8>, Layout) {
    let spec = Spec {
        capacity: 4 * MIB,
        block_size: 512 * KIB,
        parent: None,
        blocks: vec![
            Block {
                index: 1,
                present: bits(1024, &[(0, 1024)]),
                fill: 0x41,
            },
            Block {
                index: 6,
                present: bits(1024, &[(3, 9)]),
                fill: 0x42,
            },
        ],
        unique_id: random_id(),
    };
    let (img, layout) = build(&spec);
    (spec, img, layout)
}

#[track_caller]
fn corrupt_at(img: &[u8], what: &str, at: u64) -> String {
    match on_memory(img, None) {
        Err(Error::Corrupt {
            file,
            offset,
            what: w,
            reason,
        }) => {
            assert_eq!(file, "bad.vhd");
            assert!(w.contains(what), "{w:?} should name {what:?} ({reason})");
            assert_eq!(offset, at, "{w}: {reason}");
            format!("{w}: {reason}")
        }
        Err(e) => panic!("expected a corrupt {what} at {at}, got {e}"),
        Ok(_) => panic!("expected a corrupt {what} at {at}, but it opened"),
    }
}

/// Edits the dynamic header of an image and reseals it.
fn with_header(img: &[u8], f: impl Fn(&mut DynHeader)) -> Vec<u8> {
    let mut b = img.to_vec();
    let mut h = DynHeader::read_from_bytes(&b[512..1536]).unwrap();
    f(&mut h);
    h.seal();
    b[512..1536].copy_from_slice(h.as_bytes());
    b
}

/// Edits both footers of an image and reseals them.
fn with_footers(img: &[u8], f: impl Fn(&mut Footer)) -> Vec<u8> {
    let mut b = img.to_vec();
    let end = b.len() - 512;
    for at in [0, end] {
        let mut footer = Footer::read_from_bytes(&b[at..at + 512]).unwrap();
        f(&mut footer);
        footer.seal();
        b[at..at + 512].copy_from_slice(footer.as_bytes());
    }
    b
}

fn set_bat(img: &mut [u8], layout: &Layout, index: usize, entry: u32) {
    let at = layout.bat as usize + 4 * index;
    img[at..at + 4].copy_from_slice(U32::new(entry).as_bytes());
}

#[test]
fn the_good_image_opens_and_reads_its_model() {
    let (spec, img, _) = good();
    let v = on_memory(&img, None).unwrap();
    assert_same("good", &read_all(&v), &model(&spec, &[]));
}

#[test]
fn bad_footers_fall_back_to_the_copy_or_fail_naming_the_footer() {
    let (spec, img, _) = good();
    let end = img.len() as u64 - 512;
    // The end's checksum is bad: the copy at offset 0 serves, with a note.
    let mut b = img.clone();
    b[end as usize + 64] ^= 1;
    let v = on_memory(&b, None).unwrap();
    assert!(
        v.notes().iter().any(|n| n.contains("copy at offset 0")),
        "{:?}",
        v.notes()
    );
    assert_same("fallback", &read_all(&v), &model(&spec, &[]));
    // The end is missing altogether (cut off): the same.
    let v = on_memory(&img[..end as usize], None).unwrap();
    assert_same("cut footer", &read_all(&v), &model(&spec, &[]));
    // Both bad.
    b[64] ^= 1;
    let r = corrupt_at(&b, "footer", end);
    assert!(r.contains("checksum"), "{r}");
    // The copy differs but the end is good: the end wins, with a note.
    let mut b = img.clone();
    b[100] = 1;
    let v = on_memory(&b, None).unwrap();
    assert!(
        v.notes().iter().any(|n| n.contains("differs")),
        "{:?}",
        v.notes()
    );
    // A fixed disk has no copy to fall back to.
    let mut fixed = vec![0u8; 64 * KIB as usize];
    let mut f = Footer::read_from_bytes(&img[..512]).unwrap();
    f.disk_type = U32::new(DISK_FIXED);
    f.data_offset = U64::new(u64::MAX);
    f.current_size = U64::new(64 * KIB - 512);
    f.seal();
    fixed[64 * KIB as usize - 512..].copy_from_slice(f.as_bytes());
    let v = on_memory(&fixed, None).unwrap();
    assert_eq!(v.kind(), VpcKind::Fixed);
    fixed[64 * KIB as usize - 1] ^= 1;
    let r = corrupt_at(&fixed, "footer", 64 * KIB - 512);
    assert!(r.contains("checksum"), "{r}");
    // Not a VHD at all.
    for junk in [vec![0u8; 4096], vec![0x5au8; 512]] {
        let e = on_memory(&junk, None).unwrap_err();
        assert!(matches!(layer_error(&e), VpcError::NotVhd { .. }), "{e}");
    }
}

#[test]
fn truncated_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A dynamic image cut inside its last block: the footer at the end is gone, the copy at 0
    // says where the blocks are, and the last one runs past the end.
    let img = dir.path().join("dyn.vhd");
    qemu_create(&img, 8 * MIB, "");
    qemu_write(&img, &[(0x10, 0, 64 * KIB), (0x20, 5 * MIB, 64 * KIB)]);
    let len = std::fs::metadata(&img).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(len - MIB).unwrap();
    let e = Vpc::open(&img).unwrap_err();
    let Error::Corrupt { what, offset, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(what, "BAT entry 2", "{e}");
    assert_eq!(*offset, 1536 + 8, "{e}");
    // A fixed image that lost its footer is not recognisable.
    let img = dir.path().join("fixed.vhd");
    qemu_create(&img, 4 * MIB, "subformat=fixed");
    let len = std::fs::metadata(&img).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(len - 4096).unwrap();
    let e = Vpc::open(&img).unwrap_err();
    assert!(matches!(layer_error(&e), VpcError::NotVhd { .. }), "{e}");
    // A file that is not a whole number of sectors.
    f.set_len(len - 1).unwrap();
    let e = Vpc::open(&img).unwrap_err();
    let Error::Corrupt { what, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(what, "file length", "{e}");
    // A fixed footer claiming more data than the file holds.
    let (_, good_img, _) = good();
    let mut b = vec![0u8; 8 * KIB as usize];
    let mut f = Footer::read_from_bytes(&good_img[..512]).unwrap();
    f.disk_type = U32::new(DISK_FIXED);
    f.current_size = U64::new(MIB);
    f.seal();
    b[8 * KIB as usize - 512..].copy_from_slice(f.as_bytes());
    let r = corrupt_at(&b, "fixed disk", 8 * KIB - 512);
    assert!(r.contains("truncated"), "{r}");
}

#[test]
fn bad_headers_sizes_and_block_sizes_are_named() {
    let (_, img, _) = good();
    let end = img.len() as u64 - 512;
    // The dynamic header's checksum.
    let mut b = img.clone();
    b[600] ^= 1;
    let r = corrupt_at(&b, "dynamic disk header", 512);
    assert!(r.contains("checksum"), "{r}");
    // Its cookie (resealed).
    let b = with_header(&img, |h| h.cookie = *b"cxsparsf");
    corrupt_at(&b, "dynamic disk header", 512);
    // Block sizes: not a power of two, zero, too small, too large.
    for bs in [3 * MIB as u32, 0, 256, 512 << 20] {
        let b = with_header(&img, |h| h.block_size = U32::new(bs));
        let r = corrupt_at(&b, "block size", 512 + 32);
        assert!(r.contains("power of two"), "{r}");
    }
    // A table too small for the disk.
    let b = with_header(&img, |h| h.max_table_entries = U32::new(7));
    let r = corrupt_at(&b, "max table entries", 512 + 28);
    assert!(r.contains("cannot hold"), "{r}");
    // A huge max_table_entries is harmless: only the entries the disk needs are read.
    let b = with_header(&img, |h| h.max_table_entries = U32::new(u32::MAX));
    on_memory(&b, None).unwrap();
    // A size past the VHD limit, and one that would need an absurd table.
    let b = with_footers(&img, |f| f.current_size = U64::new(4 << 40));
    corrupt_at(&b, "current size", end + 48);
    let b = with_footers(&img, |f| f.current_size = U64::new(MAX_VIRTUAL_SIZE));
    let b = with_header(&b, |h| {
        h.block_size = U32::new(4096);
        h.max_table_entries = U32::new(u32::MAX);
    });
    let r = corrupt_at(&b, "max table entries", 512 + 28);
    assert!(r.contains("more than"), "{r}");
    // A BAT whose table runs past the end of the file.
    let b = with_header(&img, |h| h.table_offset = U64::new(end - 8));
    corrupt_at(&b, "table offset", 512 + 16);
    let b = with_header(&img, |h| h.table_offset = U64::new(u64::MAX - 3));
    corrupt_at(&b, "table offset", 512 + 16);
    // The header itself past the end of the file.
    for off in [end, u64::MAX - 100, 0] {
        let b = with_footers(&img, |f| f.data_offset = U64::new(off));
        corrupt_at(&b, "footer data offset", end + 16);
    }
    // An unknown disk type.
    let b = with_footers(&img, |f| f.disk_type = U32::new(7));
    corrupt_at(&b, "disk type", end + 60);
    // A version this reader does not know.
    let b = with_footers(&img, |f| f.format_version = U32::new(0x0002_0000));
    let e = on_memory(&b, None).unwrap_err();
    assert!(
        matches!(layer_error(&e), VpcError::Unsupported { .. }),
        "{e}"
    );
}

#[test]
fn bat_entries_past_the_end_or_overlapping_are_named() {
    let (_, img, layout) = good();
    let len = img.len() as u64;
    // Block 3 past the end of the file.
    let mut b = img.clone();
    set_bat(&mut b, &layout, 3, (len / 512) as u32);
    let r = corrupt_at(&b, "BAT entry 3", layout.bat + 12);
    assert!(r.contains("past the end"), "{r}");
    // The largest entry (2 TiB into the file).
    let mut b = img.clone();
    set_bat(&mut b, &layout, 0, BAT_UNUSED - 1);
    corrupt_at(&b, "BAT entry 0", layout.bat);
    // A block over the footer at the end.
    let mut b = img.clone();
    set_bat(&mut b, &layout, 3, ((len - 512 - 512 * KIB) / 512) as u32);
    corrupt_at(&b, "BAT entry 3", layout.bat + 12);
    // A block over the header and the BAT.
    let mut b = img.clone();
    set_bat(&mut b, &layout, 2, 1);
    let r = corrupt_at(&b, "BAT entry 2", layout.bat + 8);
    assert!(r.contains("overlaps"), "{r}");
    // Two blocks in one place.
    let mut b = img.clone();
    set_bat(&mut b, &layout, 4, (layout.blocks / 512) as u32);
    let r = corrupt_at(&b, "BAT entry 4", layout.bat + 16);
    assert!(r.contains("overlap"), "{r}");
}

#[test]
fn bad_parent_locators_are_named() {
    let parent = Spec {
        capacity: 64 * KIB,
        block_size: 4 * KIB,
        parent: None,
        blocks: vec![],
        unique_id: random_id(),
    };
    let pimg = build(&parent).0;
    let pdev: Arc<dyn BlockDevice> = Arc::new(on_memory(&pimg, None).unwrap());
    let spec = Spec {
        capacity: 64 * KIB,
        block_size: 4 * KIB,
        parent: Some(Parent {
            id: parent.unique_id,
            name: "p.vhd".into(),
            locators: vec![(PLATFORM_W2RU, w2(r".\p.vhd"))],
        }),
        blocks: vec![],
        unique_id: random_id(),
    };
    let (img, layout) = build(&spec);
    let entry = 512 + 576;
    on_memory(&img, Some(pdev.clone())).unwrap();
    let locator = |f: &dyn Fn(&mut ParentLocator)| {
        let b = with_header(&img, |h| f(&mut h.parent_locators[0]));
        match on_memory(&b, Some(pdev.clone())) {
            Err(Error::Corrupt {
                what,
                offset,
                reason,
                ..
            }) => (what, offset, reason),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened"),
        }
    };
    let (what, at, _) = locator(&|l| l.platform_data_offset = U64::new(img.len() as u64));
    assert_eq!((what.as_str(), at), ("parent locator 0 (W2ru)", entry));
    let (_, at, _) = locator(&|l| l.platform_data_offset = U64::new(u64::MAX));
    assert_eq!(at, entry);
    let (_, _, reason) = locator(&|l| l.platform_data_length = U32::new(u32::MAX));
    assert!(reason.contains("longer"), "{reason}");
    // An odd length is not UTF-16.
    let (_, at, reason) = locator(&|l| l.platform_data_length = U32::new(7));
    assert_eq!(at, layout.locators);
    assert!(reason.contains("UTF-16"), "{reason}");
    // A MacX locator that is not a URL.
    let (_, _, reason) = locator(&|l| l.platform_code = U32::new(PLATFORM_MACX));
    assert!(reason.contains("URL"), "{reason}");
    // An unknown platform code is skipped with a note.
    let b = with_header(&img, |h| {
        h.parent_locators[0].platform_code = U32::new(0x1234_5678)
    });
    let v = on_memory(&b, Some(pdev.clone())).unwrap();
    assert!(v.parent_locators().is_empty());
    assert!(v.notes().iter().any(|n| n.contains("unknown platform")));
    // A parent given to a disk that has none.
    let e = on_memory(&pimg, Some(pdev)).unwrap_err();
    assert!(
        matches!(layer_error(&e), VpcError::InvalidParameter(_)),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// The device contract

#[test]
fn the_device_is_read_only_and_completes_each_request_of_a_batch_with_its_own_result() {
    let (spec, img, _) = good();
    let want = model(&spec, &[]);
    let v = on_memory(&img, None).unwrap();
    let info = v.info();
    assert!(info.read_only);
    assert_eq!(info.logical_sector_size, 512);
    assert_eq!(info.capacity, 4 * MIB);
    assert!(matches!(
        v.write_at(0, &[0; 512]),
        Err(Error::ReadOnly { op: OpKind::Write })
    ));
    assert!(matches!(
        v.discard(0, 512),
        Err(Error::ReadOnly {
            op: OpKind::Discard
        })
    ));
    assert!(matches!(
        v.write_zeroes(0, 512),
        Err(Error::ReadOnly {
            op: OpKind::WriteZeroes
        })
    ));
    v.flush().unwrap();

    let (mut a, mut b, mut c, mut d) = (
        vec![0u8; 2048],
        vec![0u8; 1024],
        vec![0u8; 512],
        vec![0u8; 700],
    );
    let w = [7u8; 512];
    let mut batch = [
        Request::read(512 * KIB - 1024, &mut a),
        Request::read(4 * MIB, &mut b),
        Request::write(0, &w),
        Request::flush(),
        Request::read(6 * 512 * KIB + 2048, &mut c),
        Request::read(0, &mut d),
    ];
    v.submit(&mut batch);
    batch[0].result().unwrap();
    assert!(matches!(batch[1].result(), Err(Error::OutOfRange { .. })));
    assert!(matches!(batch[2].result(), Err(Error::ReadOnly { .. })));
    batch[3].result().unwrap();
    batch[4].result().unwrap();
    assert!(matches!(batch[5].result(), Err(Error::Unaligned { .. })));
    drop(batch);
    let off = (512 * KIB - 1024) as usize;
    assert_eq!(a, want[off..off + 2048]);
    let off = (6 * 512 * KIB + 2048) as usize;
    assert_eq!(c, want[off..off + 512]);
    assert!(v.describe().contains("dynamic"), "{}", v.describe());
}
