//! What the VHDX fuzz targets run, shared by `fuzz/fuzz_targets/vhdx_open.rs`,
//! `fuzz/fuzz_targets/vhdx_io.rs` (which include this file by path) and the regression replay
//! test `vhdx/tests/fuzz_regressions.rs`.
//!
//! # Input
//! Byte 0 is the mode:
//! - bits 0-1: the image: 0 raw (the input's bytes are the file), 1 dynamic, 2 fixed,
//!   3 differencing (with a parent). 1 to 3 start from a valid image made with
//!   [`Vhdx::create_on`] (built once per process and kept), patched by the input;
//! - bit 2: the image's log holds entries that must be replayed (a session that crashed after
//!   its commit point: the log is written, the metadata in place is not);
//! - bit 3: 4096-byte logical sectors (else 512); bit 4: 64 MiB blocks (else 1 MiB; with 512-byte
//!   sectors the image then has two sector bitmap chunks);
//! - bits 5, 6, 7: after patching, recompute the checksums of the headers, of the region tables,
//!   of the log entries (so that patches reach what lies behind them).
//!
//! Byte 1: bit 0 asks for a parent even for a non-differencing image; raw mode: bits 1-7 are the
//! minimum file size in MiB (mod 17).
//!
//! Raw mode: the file's bytes follow (all the rest for `vhdx_open`; a u16 length and that many
//! bytes for `vhdx_io`). Otherwise patches follow (until the input ends, at most 64, for
//! `vhdx_open`; a count byte, at most 7, for `vhdx_io`), each `sel: u8, offset: u32 (LE),
//! len: u8 (mod 65), bytes`; `sel & 7` picks where `offset` points (see [`Image::patch`]) and
//! `sel & 8` patches the parent instead. `vhdx_io` then reads operations until the input ends
//! (see [`run_io`]).
//!
//! # Oracles
//! Nothing may panic. Beyond that: the read-only open (log replayed in memory) and the writable
//! open (log replayed in place) show the same data; an image that opened writable and closed
//! without error reopens, showing what it showed before; and an unpatched image shows exactly
//! the data written into it, before and after any sequence of operations (a model of every
//! sector).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vstor_core::{BlockDevice, CapacitySignal, DeviceInfo, MemoryDevice, Op, Request, Result};
use vstor_vhdx::check::check_device;
use vstor_vhdx::format::{checksum, seal, Guid, HEADER_OFFSETS, REGION_TABLE_OFFSETS};
use vstor_vhdx::meta::{self, ParentLocator};
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Raw images are capped at this size.
pub const MAX_RAW: u64 = 16 * MIB;
/// Bytes the operations of one `vhdx_io` run may write (memory: the file is in memory).
const WRITE_BUDGET: u64 = 256 * MIB;
/// Most operations of one `vhdx_io` run.
const MAX_OPS: usize = 64;
/// Most patches of one input.
const MAX_PATCHES: usize = 64;

// ---------------------------------------------------------------------------------------------
// Input

/// Reads the input front to back; past its end every read gives zeros.
pub struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor(data)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.0.len())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dynamic,
    Fixed,
    Differencing,
}

// ---------------------------------------------------------------------------------------------
// Images as sparse pages

/// A file as sparse 4 KiB pages (shared until patched), with what is known about its layout.
#[derive(Clone)]
pub struct Image {
    capacity: u64,
    pages: BTreeMap<u64, Arc<[u8; PAGE as usize]>>,
    /// Where the structures of the base image lie (offset, length); zeros for raw images.
    log: (u64, u64),
    metadata: (u64, u64),
    bat: (u64, u64),
    bat_entries: u64,
    /// Geometry of the base image (virtual size, block size, logical sector).
    virtual_size: u64,
    block_size: u64,
    logical: u64,
    /// The data written into the base image (offset, length, tag), in order.
    expect: Vec<(u64, u64, u32)>,
}

impl Image {
    fn empty(capacity: u64) -> Self {
        Image {
            capacity,
            pages: BTreeMap::new(),
            log: (0, 0),
            metadata: (0, 0),
            bat: (0, 0),
            bat_entries: 0,
            virtual_size: 0,
            block_size: 0,
            logical: 512,
            expect: Vec::new(),
        }
    }

    fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let mut pos = off;
        while pos < off + len {
            let page = pos / PAGE * PAGE;
            let n = (page + PAGE - pos).min(off + len - pos);
            if let Some(p) = self.pages.get(&page) {
                let at = (pos - page) as usize;
                out[(pos - off) as usize..(pos - off + n) as usize]
                    .copy_from_slice(&p[at..at + n as usize]);
            }
            pos += n;
        }
        out
    }

    /// Writes `data` at `off`, clipped to the capacity.
    fn write(&mut self, off: u64, data: &[u8]) {
        let end = off.saturating_add(data.len() as u64).min(self.capacity);
        let mut pos = off;
        while pos < end {
            let page = pos / PAGE * PAGE;
            let n = (page + PAGE - pos).min(end - pos);
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| Arc::new([0; PAGE as usize]));
            let at = (pos - page) as usize;
            Arc::make_mut(p)[at..at + n as usize]
                .copy_from_slice(&data[(pos - off) as usize..(pos - off + n) as usize]);
            pos += n;
        }
    }

    fn prune(&mut self) {
        let cap = self.capacity;
        self.pages
            .retain(|&o, p| o < cap && p.iter().any(|&b| b != 0));
    }

    /// A fresh memory device holding the image.
    pub fn materialize(&self) -> MemoryDevice {
        let dev = MemoryDevice::new(self.capacity).expect("capacity is a multiple of 512");
        for (&off, p) in self.pages.range(..self.capacity) {
            let n = (self.capacity - off).min(PAGE) as usize;
            dev.write_at(off, &p[..n]).expect("inside the device");
        }
        dev
    }

    /// Applies one patch: `sel & 7` says what `offset` is relative to.
    fn patch(&mut self, sel: u8, offset: u32, bytes: &[u8]) {
        let o = offset as u64;
        let at = match sel & 7 {
            // Anywhere in the file.
            0 => o % self.capacity.max(1),
            // A header slot.
            1 => HEADER_OFFSETS[((sel >> 4) & 1) as usize] + o % PAGE,
            // A region table copy (its entries are at the start).
            2 => REGION_TABLE_OFFSETS[((sel >> 4) & 1) as usize] + o % PAGE,
            // The metadata table, or the items behind it.
            3 => {
                let base = self.metadata.0 + if sel & 0x10 != 0 { 64 * 1024 } else { 0 };
                base + o % 2048
            }
            // The BAT entries.
            4 => self.bat.0 + o % (self.bat_entries * 8 + 64),
            // The log.
            5 => self.log.0 + o % self.log.1.max(1),
            // The data area (blocks and sector bitmaps).
            6 => {
                let start = self.bat.0 + self.bat.1;
                start + o % self.capacity.saturating_sub(start).max(1)
            }
            // Change the file size: anything from 0 to 1 MiB more than it has.
            _ => {
                let sectors = o % (self.capacity / 512 + 2049);
                self.capacity = sectors * 512;
                return;
            }
        };
        self.write(at, bytes);
    }

    /// Recomputes the checksums the mode asks for.
    fn reseal(&mut self, headers: bool, regions: bool, log: bool) {
        if headers {
            for off in HEADER_OFFSETS {
                let mut raw = self.read(off, PAGE);
                seal(&mut raw, 4);
                self.write(off, &raw);
            }
        }
        if regions {
            for off in REGION_TABLE_OFFSETS {
                let mut raw = self.read(off, 64 * 1024);
                seal(&mut raw, 4);
                self.write(off, &raw);
            }
        }
        if log {
            let mut sealed = 0;
            for pos in (0..self.log.1).step_by(PAGE as usize) {
                if sealed == 8 {
                    break;
                }
                let at = self.log.0 + pos;
                if self.pages.contains_key(&at) && self.read(at, 4) == b"loge" {
                    self.seal_log_entry(pos);
                    sealed += 1;
                }
            }
        }
    }

    /// Recomputes the checksum of the log entry at `pos` in the log (which may wrap).
    fn seal_log_entry(&mut self, pos: u64) {
        let (lo, ll) = self.log;
        let at = lo + pos;
        let len = u32::from_le_bytes(self.read(at + 8, 4).try_into().unwrap()) as u64;
        if len == 0 || len % PAGE != 0 || len > ll {
            return;
        }
        let mut bytes = Vec::with_capacity(len as usize);
        let mut p = pos;
        while (bytes.len() as u64) < len {
            let n = (ll - p).min(len - bytes.len() as u64);
            bytes.extend_from_slice(&self.read(lo + p, n));
            p = (p + n) % ll;
        }
        let c = checksum(&bytes, 4);
        self.write(at + 4, &c.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Base images

/// Passes requests to a memory device, remembering every page written, and can drop writes:
/// those outside the log (a crash after the commit point), or all of them.
struct Gate {
    inner: MemoryDevice,
    touched: Mutex<BTreeSet<u64>>,
    /// 0: pass everything; 1: drop writes outside `log`; 2: drop every write.
    mode: AtomicU8,
    log: Mutex<(u64, u64)>,
}

impl Gate {
    fn new() -> Self {
        Gate {
            inner: MemoryDevice::new(0).unwrap(),
            touched: Mutex::new(BTreeSet::new()),
            mode: AtomicU8::new(0),
            log: Mutex::new((0, 0)),
        }
    }

    /// The device's content as an image.
    fn snapshot(&self) -> Image {
        let mut img = Image::empty(self.inner.capacity());
        let touched = self.touched.lock().unwrap().clone();
        let mut page = vec![0u8; PAGE as usize];
        for off in touched {
            if off + PAGE <= img.capacity {
                self.inner.read_at(off, &mut page).unwrap();
                img.write(off, &page);
            }
        }
        img.prune();
        img
    }
}

impl BlockDevice for Gate {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        let mode = self.mode.load(Ordering::SeqCst);
        let log = *self.log.lock().unwrap();
        for req in batch.iter_mut() {
            let writes = matches!(
                req.op,
                Op::Write { .. } | Op::Discard { .. } | Op::WriteZeroes { .. }
            );
            if writes {
                let (off, len) = (req.offset(), req.len());
                let in_log = off >= log.0 && off + len <= log.0 + log.1;
                if mode == 2 || (mode == 1 && !in_log) {
                    req.complete(Ok(()));
                    continue;
                }
                let mut t = self.touched.lock().unwrap();
                let mut p = off / PAGE * PAGE;
                while p < off + len {
                    t.insert(p);
                    p += PAGE;
                }
            }
            self.inner.submit(std::slice::from_mut(req));
        }
    }

    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn resize(&self, new_capacity: u64) -> Result<()> {
        if self.mode.load(Ordering::SeqCst) == 2 {
            return Ok(());
        }
        self.inner.resize(new_capacity)
    }

    fn capacity_signal(&self) -> Option<Arc<CapacitySignal>> {
        self.inner.capacity_signal()
    }

    fn describe(&self) -> String {
        "fuzz gate".into()
    }
}

/// Fixed GUIDs that replace the random ones, so that a base image is the same in every process
/// (and a saved input reproduces).
const FILE_WRITE_GUID: Guid = Guid([0x11; 16]);
const PARENT_DATA_WRITE_GUID: Guid = Guid([0x22; 16]);
const CHILD_DATA_WRITE_GUID: Guid = Guid([0x33; 16]);
const LOG_GUID: Guid = Guid([0x44; 16]);
const STALE_LOG_GUID: Guid = Guid([0x55; 16]);
const PAGE83: Guid = Guid([0x66; 16]);

fn blocks_for(block_size: u64) -> u64 {
    if block_size == MIB {
        17
    } else {
        65
    }
}

/// Fills `buf` sector by sector: each 4-byte word of sector `i` holds `tag + i`.
fn fill(buf: &mut [u8], logical: u64, tag: u32) {
    for (i, s) in buf.chunks_mut(logical as usize).enumerate() {
        let t = tag.wrapping_add(i as u32).to_le_bytes();
        for w in s.chunks_exact_mut(4) {
            w.copy_from_slice(&t);
        }
    }
}

fn filled(len: u64, logical: u64, tag: u32) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    fill(&mut b, logical, tag);
    b
}

/// Builds a base image: created, written, closed (or left with a log to replay), with its random
/// GUIDs replaced by fixed ones.
fn build(kind: Kind, dirty: bool, logical: u32, block_size: u32) -> Image {
    let (ls, bs) = (logical as u64, block_size as u64);
    let vsize = bs * blocks_for(bs) + 8192;
    let gate = Arc::new(Gate::new());
    let parent_img = (kind == Kind::Differencing).then(|| parent_base(logical, block_size));
    let parent = parent_img.as_ref().map(|p| {
        Arc::new(
            Vhdx::open_on(
                Arc::new(p.materialize()),
                "parent",
                &OpenOptions::read_only(),
                None,
            )
            .expect("the parent base opens"),
        )
    });
    let opts = match kind {
        Kind::Dynamic => CreateOptions::dynamic(vsize),
        Kind::Fixed => CreateOptions::fixed(vsize),
        Kind::Differencing => CreateOptions::differencing("parent.vhdx"),
    }
    .block_size(block_size)
    .logical_sector_size(logical);
    let v = Vhdx::create_on(
        gate.clone(),
        &opts,
        parent.map(|p| (p, Path::new("parent.vhdx"))),
    )
    .expect("the base image is created");
    let h = v.header();
    let log = (h.log_offset.get(), h.log_length.get() as u64);
    *gate.log.lock().unwrap() = log;
    let nb = blocks_for(bs);
    let writes = [
        (0, 8 * ls),
        (bs + bs / 2, 16 * ls),
        ((nb - 1) * bs + 3 * ls, 4 * ls),
        (vsize - 2 * ls, 2 * ls),
    ];
    let mut expect = parent_img.map(|p| p.expect).unwrap_or_default();
    for (k, &(off, len)) in writes.iter().enumerate() {
        let tag = 0x6000_0000 | ((k as u32) << 16);
        v.write_at(off, &filled(len, ls, tag)).unwrap();
        expect.push((off, len, tag));
    }
    if dirty {
        // Commit through the log, but let none of the in-place writes through; then drop the
        // image without letting its close write anything.
        gate.mode.store(1, Ordering::SeqCst);
        v.flush().unwrap();
        gate.mode.store(2, Ordering::SeqCst);
    }
    drop(v);
    let mut img = gate.snapshot();
    let data_write = if kind == Kind::Differencing {
        CHILD_DATA_WRITE_GUID
    } else {
        PARENT_DATA_WRITE_GUID
    };
    normalize(&gate.inner, &mut img, log, data_write);
    img.log = log;
    img.virtual_size = vsize;
    img.block_size = bs;
    img.logical = ls;
    img.expect = expect;
    img
}

/// Replaces the random GUIDs of an image with fixed ones and rewrites its metadata region with
/// a fixed page 83 identifier and parent locator.
fn normalize(dev: &dyn BlockDevice, img: &mut Image, log: (u64, u64), data_write: Guid) {
    let regions = meta::read_regions(dev, "base").expect("base regions");
    let md = meta::read_metadata(dev, "base", &regions.metadata).expect("base metadata");
    img.metadata = (regions.metadata.offset, regions.metadata.length);
    img.bat = (regions.bat.offset, regions.bat.length);
    img.bat_entries = md.geometry.bat_entries;
    // Headers: the current one's LogGuid tells live log entries from stale ones.
    let seq = |img: &Image, off: u64| u64::from_le_bytes(img.read(off + 8, 8).try_into().unwrap());
    let current = if seq(img, HEADER_OFFSETS[1]) > seq(img, HEADER_OFFSETS[0]) {
        HEADER_OFFSETS[1]
    } else {
        HEADER_OFFSETS[0]
    };
    let live = img.read(current + 48, 16);
    for off in HEADER_OFFSETS {
        let mut raw = img.read(off, PAGE);
        raw[16..32].copy_from_slice(&FILE_WRITE_GUID.0);
        raw[32..48].copy_from_slice(&data_write.0);
        if raw[48..64] != [0; 16] {
            raw[48..64].copy_from_slice(&LOG_GUID.0);
        }
        seal(&mut raw, 4);
        img.write(off, &raw);
    }
    img.log = log;
    for pos in (0..log.1).step_by(PAGE as usize) {
        let at = log.0 + pos;
        if img.read(at, 4) == b"loge" {
            let g = if img.read(at + 32, 16) == live && live != [0; 16] {
                LOG_GUID
            } else {
                STALE_LOG_GUID
            };
            img.write(at + 32, &g.0);
            img.seal_log_entry(pos);
        }
    }
    let locator = md.parent.as_ref().map(|_| ParentLocator {
        entries: vec![
            (
                "parent_linkage".into(),
                format!("{{{}}}", PARENT_DATA_WRITE_GUID.to_uuid()),
            ),
            ("relative_path".into(), "parent.vhdx".into()),
            (
                "absolute_win32_path".into(),
                "\\\\?\\C:\\vstor-fuzz\\parent.vhdx".into(),
            ),
        ],
    });
    let items = meta::standard_items(&md.geometry, md.leave_allocated, PAGE83, locator.as_ref());
    img.write(
        regions.metadata.offset,
        &meta::metadata_region_bytes(&items, regions.metadata.length),
    );
    img.prune();
}

/// Builds every base image twice and checks that both builds are byte for byte the same (no
/// random GUID is left), so that a saved input means the same in every process.
pub fn check_bases_are_deterministic() {
    for kind in [Kind::Dynamic, Kind::Fixed, Kind::Differencing] {
        for dirty in [false, true] {
            for (ls4k, big) in [(false, false), (true, false), (false, true), (true, true)] {
                let (ls, bs) = params(ls4k, big);
                let (a, b) = (build(kind, dirty, ls, bs), build(kind, dirty, ls, bs));
                assert_eq!(a.capacity, b.capacity);
                assert!(
                    a.pages == b.pages,
                    "{kind:?} (dirty {dirty}, {ls}-byte sectors, {bs}-byte blocks) differs \
                     between two builds"
                );
            }
        }
    }
}

fn variant(kind: Kind, dirty: bool, ls4k: bool, big: bool) -> usize {
    let k = match kind {
        Kind::Dynamic => 0,
        Kind::Fixed => 1,
        Kind::Differencing => 2,
    };
    ((k * 2 + dirty as usize) * 2 + ls4k as usize) * 2 + big as usize
}

fn params(ls4k: bool, big: bool) -> (u32, u32) {
    (
        if ls4k { 4096 } else { 512 },
        if big { 64 << 20 } else { 1 << 20 },
    )
}

/// The base image of a kind, built once per process.
fn base(kind: Kind, dirty: bool, ls4k: bool, big: bool) -> &'static Image {
    static BASES: [OnceLock<Image>; 24] = [const { OnceLock::new() }; 24];
    BASES[variant(kind, dirty, ls4k, big)].get_or_init(|| {
        let (ls, bs) = params(ls4k, big);
        build(kind, dirty, ls, bs)
    })
}

/// The parent of the differencing base images: a clean dynamic image of the same geometry with
/// some data.
fn parent_base(logical: u32, block_size: u32) -> Image {
    static PARENTS: [OnceLock<Image>; 4] = [const { OnceLock::new() }; 4];
    let i = (logical == 4096) as usize * 2 + (block_size != 1 << 20) as usize;
    PARENTS[i]
        .get_or_init(|| {
            let (ls, bs) = (logical as u64, block_size as u64);
            let vsize = bs * blocks_for(bs) + 8192;
            let gate = Arc::new(Gate::new());
            let v = Vhdx::create_on(
                gate.clone(),
                &CreateOptions::dynamic(vsize)
                    .block_size(block_size)
                    .logical_sector_size(logical),
                None,
            )
            .expect("the parent base is created");
            let h = v.header();
            let log = (h.log_offset.get(), h.log_length.get() as u64);
            let writes = [(0, 64 * ls), (2 * bs, 8 * ls), (vsize - 8192, 8192)];
            let mut expect = Vec::new();
            for (k, &(off, len)) in writes.iter().enumerate() {
                let tag = 0x5000_0000 | ((k as u32) << 16);
                v.write_at(off, &filled(len, ls, tag)).unwrap();
                expect.push((off, len, tag));
            }
            drop(v);
            let mut img = gate.snapshot();
            normalize(&gate.inner, &mut img, log, PARENT_DATA_WRITE_GUID);
            img.virtual_size = vsize;
            img.block_size = bs;
            img.logical = ls;
            img.expect = expect;
            img
        })
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Decoding a case

/// An image (and maybe a parent) decoded from an input.
pub struct Case {
    pub image: Image,
    pub parent: Option<Image>,
    /// An unpatched base image: its content is known exactly.
    pub pristine: bool,
    /// The base image's log holds entries to replay.
    pub dirty: bool,
}

impl Case {
    /// Decodes the mode, the image and the patches. `open_target`: raw bytes and patches run to
    /// the end of the input (else a length and a count say where they end).
    pub fn decode(c: &mut Cursor<'_>, open_target: bool) -> Case {
        let m0 = c.u8();
        let m1 = c.u8();
        let (ls4k, big) = (m0 & 8 != 0, m0 & 16 != 0);
        let kind = match m0 & 3 {
            0 => None,
            1 => Some(Kind::Dynamic),
            2 => Some(Kind::Fixed),
            _ => Some(Kind::Differencing),
        };
        let want_parent = kind == Some(Kind::Differencing) || m1 & 1 != 0;
        let mut parent = want_parent.then(|| {
            let (ls, bs) = params(ls4k, big);
            parent_base(ls, bs)
        });
        let Some(kind) = kind else {
            let bytes = if open_target {
                c.rest()
            } else {
                let n = c.u16() as usize;
                c.bytes(n)
            };
            let bytes = &bytes[..bytes.len().min(MAX_RAW as usize)];
            let min = (m1 >> 1) as u64 % 17 * MIB;
            let cap = (bytes.len() as u64)
                .next_multiple_of(512)
                .max(min)
                .min(MAX_RAW);
            let mut image = Image::empty(cap);
            image.write(0, bytes);
            image.prune();
            return Case {
                image,
                parent,
                pristine: false,
                dirty: false,
            };
        };
        let mut image = base(kind, m0 & 4 != 0, ls4k, big).clone();
        let count = if open_target {
            MAX_PATCHES
        } else {
            (c.u8() % 8) as usize
        };
        let mut patched = (false, false);
        for _ in 0..count {
            if c.is_empty() {
                break;
            }
            let sel = c.u8();
            let offset = c.u32();
            let n = (c.u8() % 65) as usize;
            let bytes = c.bytes(n);
            match parent.as_mut() {
                Some(p) if sel & 8 != 0 => {
                    p.patch(sel, offset, bytes);
                    patched.1 = true;
                }
                _ => {
                    image.patch(sel, offset, bytes);
                    patched.0 = true;
                }
            }
        }
        let (h, r, l) = (m0 & 32 != 0, m0 & 64 != 0, m0 & 128 != 0);
        if patched.0 {
            image.reseal(h, r, l);
        }
        if let (true, Some(p)) = (patched.1, parent.as_mut()) {
            p.reseal(h, r, l);
        }
        Case {
            image,
            parent,
            pristine: !patched.0 && !patched.1,
            dirty: m0 & 4 != 0,
        }
    }

    /// Opens the parent (read-only), when there is one and it opens.
    pub fn open_parent(&self) -> Option<Arc<Vhdx>> {
        let p = self.parent.as_ref()?;
        let v = Vhdx::open_on(
            Arc::new(p.materialize().into_read_only()),
            "parent",
            &OpenOptions::read_only(),
            None,
        );
        if self.pristine {
            return Some(Arc::new(v.expect("the unpatched parent opens")));
        }
        v.ok().map(Arc::new)
    }
}

// ---------------------------------------------------------------------------------------------
// Looking at an open image

/// Calls every accessor (none may panic).
fn touch(v: &Vhdx) {
    let g = v.geometry().clone();
    let _ = (v.kind(), v.header(), v.regions(), v.metadata(), v.creator());
    let _ = (
        v.headers_at_open(),
        v.replay_note(),
        v.bat_region(),
        v.file_size(),
    );
    let _ = (
        v.info(),
        v.describe(),
        v.parent().is_some(),
        v.data_write_guid(),
    );
    assert_eq!(v.bat_snapshot().len() as u64, g.bat_entries);
    if g.has_parent && g.data_blocks > 0 {
        let _ = v.sector_bitmap(0);
        let _ = v.sector_bitmap(g.data_blocks - 1);
    }
}

/// Ranges of the virtual disk worth reading: the base image's writes, and the start and middle
/// of every block (at most 128 blocks).
fn sample_ranges(v: &Vhdx, img: &Image) -> Vec<(u64, u64)> {
    let g = v.geometry();
    let (vs, bs, ls) = (g.virtual_size, g.block_size as u64, g.logical_sector as u64);
    let mut out: Vec<(u64, u64)> = img
        .expect
        .iter()
        .map(|&(o, l, _)| (o, l))
        .filter(|&(o, l)| o % ls == 0 && l % ls == 0)
        .collect();
    for b in 0..g.data_blocks.min(128) {
        out.push((b * bs, 8192));
        out.push((b * bs + bs / 2, 8192));
    }
    out.into_iter()
        .filter(|&(o, _)| o < vs)
        .map(|(o, l)| (o, l.min(vs - o).min(MIB) / ls * ls))
        .filter(|&(_, l)| l > 0)
        .collect()
}

/// What the sample ranges read (an error reads as `None`).
fn sample(v: &Vhdx, ranges: &[(u64, u64)]) -> Vec<Option<Vec<u8>>> {
    ranges
        .iter()
        .map(|&(o, l)| {
            let mut b = vec![0u8; l as usize];
            v.read_at(o, &mut b).ok().map(|_| b)
        })
        .collect()
}

/// What a run of sectors is expected to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exp {
    /// Sector `s` holds tag `tag + (s - first)` in every 4-byte word.
    Tag {
        tag: u32,
        first: u64,
    },
    Zero,
    /// Anything (a discard, a failed write).
    Any,
}

/// What every sector of an unpatched image holds, as runs of sectors `[start, end)`; sectors in
/// no run are zero.
struct Model {
    logical: u64,
    runs: BTreeMap<u64, (u64, Exp)>,
}

impl Model {
    fn new(img: &Image) -> Self {
        let mut m = Model {
            logical: img.logical,
            runs: BTreeMap::new(),
        };
        for &(off, len, tag) in &img.expect {
            m.set(
                off,
                len,
                Exp::Tag {
                    tag,
                    first: off / img.logical,
                },
            );
        }
        m
    }

    /// Cuts the run that spans sector `at`, if any, in two.
    fn split(&mut self, at: u64) {
        if let Some((&k, &(end, e))) = self.runs.range(..at).next_back() {
            if end > at {
                self.runs.insert(k, (at, e));
                self.runs.insert(at, (end, e));
            }
        }
    }

    /// Bytes `[off, off + len)` now hold `e`.
    fn set(&mut self, off: u64, len: u64, e: Exp) {
        let (s, end) = (off / self.logical, (off + len) / self.logical);
        if s >= end {
            return;
        }
        self.split(s);
        self.split(end);
        let inside: Vec<u64> = self.runs.range(s..end).map(|(&k, _)| k).collect();
        for k in inside {
            self.runs.remove(&k);
        }
        self.runs.insert(s, (end, e));
    }

    fn get(&self, sector: u64) -> Exp {
        match self.runs.range(..=sector).next_back() {
            Some((_, &(end, e))) if end > sector => e,
            _ => Exp::Zero,
        }
    }

    fn check(&self, off: u64, buf: &[u8], what: &str) {
        for (i, s) in buf.chunks(self.logical as usize).enumerate() {
            let sector = off / self.logical + i as u64;
            let exp = self.get(sector);
            let ok = match exp {
                Exp::Any => true,
                Exp::Zero => s.iter().all(|&b| b == 0),
                Exp::Tag { tag, first } => {
                    let t = tag.wrapping_add((sector - first) as u32).to_le_bytes();
                    s.chunks_exact(4).all(|w| w == t)
                }
            };
            assert!(
                ok,
                "{what}: sector {sector} (byte {}) should hold {exp:?}, reads {:02x?}...",
                sector * self.logical,
                &s[..16]
            );
        }
    }

    /// Reads and checks every written run (at most 1 MiB of each zero run's ends) and the
    /// samples.
    fn verify(&self, v: &Vhdx, img: &Image, what: &str) {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (&s, &(end, e)) in &self.runs {
            let (off, len) = (s * self.logical, (end - s) * self.logical);
            match e {
                Exp::Any => {}
                Exp::Tag { .. } => ranges.push((off, len)),
                Exp::Zero if len <= 2 * MIB => ranges.push((off, len)),
                Exp::Zero => {
                    ranges.push((off, MIB));
                    ranges.push((off + len - MIB, MIB));
                }
            }
        }
        ranges.extend(sample_ranges(v, img));
        for (o, l) in ranges {
            let mut done = 0;
            while done < l {
                let n = (l - done).min(4 * MIB);
                let mut b = vec![0u8; n as usize];
                v.read_at(o + done, &mut b)
                    .unwrap_or_else(|e| panic!("{what}: reading {n} bytes at {}: {e}", o + done));
                self.check(o + done, &b, what);
                done += n;
            }
        }
    }
}

fn ro_opts(replay_in_memory: bool) -> OpenOptions {
    OpenOptions {
        read_only: true,
        replay_in_memory,
        ..OpenOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// vhdx_open

/// Opens the decoded image every way: checked, read-only without and with replay in memory,
/// writable; then closes the writable one and reopens it.
pub fn run_open(data: &[u8]) {
    let mut c = Cursor::new(data);
    let case = Case::decode(&mut c, true);
    let parent = case.open_parent();
    let _ = check_device(Arc::new(case.image.materialize()), "fuzz");

    let ro_dev: Arc<dyn BlockDevice> = Arc::new(case.image.materialize().into_read_only());
    let strict = Vhdx::open_on(ro_dev.clone(), "fuzz", &ro_opts(false), parent.clone());
    if let Ok(v) = &strict {
        touch(v);
    }
    if case.pristine {
        assert_eq!(
            strict.is_err(),
            case.dirty,
            "only an image with a log to replay needs replay"
        );
    }
    drop(strict);
    let ro = Vhdx::open_on(ro_dev, "fuzz", &ro_opts(true), parent.clone());
    let rw_dev: Arc<dyn BlockDevice> = Arc::new(case.image.materialize());
    let rw = Vhdx::open_on(
        rw_dev.clone(),
        "fuzz",
        &OpenOptions::default(),
        parent.clone(),
    );
    if case.pristine {
        let model = Model::new(&case.image);
        let ro = ro.as_ref().expect("the unpatched image opens read-only");
        let rw = rw.as_ref().expect("the unpatched image opens writable");
        assert_eq!(ro.replay_note().is_some(), case.dirty);
        assert_eq!(rw.replay_note().is_some(), case.dirty);
        model.verify(ro, &case.image, "read-only open of the unpatched image");
        model.verify(rw, &case.image, "writable open of the unpatched image");
    }
    let ro_seen = ro.as_ref().ok().map(|v| {
        touch(v);
        sample(v, &sample_ranges(v, &case.image))
    });
    drop(ro);
    let Ok(rw) = rw else { return };
    touch(&rw);
    let ranges = sample_ranges(&rw, &case.image);
    let seen = sample(&rw, &ranges);
    if let Some(ro_seen) = ro_seen {
        assert!(
            ro_seen == seen,
            "the read-only open (log replayed in memory) and the writable open (log replayed \
             in place) read differently"
        );
    }
    if rw.close().is_err() {
        return;
    }
    drop(rw);
    let again = Vhdx::open_on(rw_dev.clone(), "fuzz", &ro_opts(false), parent.clone())
        .unwrap_or_else(|e| {
            panic!("an image that opened writable and closed cleanly does not reopen: {e}")
        });
    touch(&again);
    assert!(
        sample(&again, &ranges) == seen,
        "an image reads differently after a close and a reopen"
    );
}

// ---------------------------------------------------------------------------------------------
// vhdx_io

/// Opens the decoded image writable and runs the operations the rest of the input describes,
/// each `op: u8, sector: u32 (LE), count: u8`:
/// - `op % 8`: 0, 1 read (bit 3: vectored, in two buffers); 2, 3 write; 4 discard;
///   5 write-zeroes; 6 flush; 7 close and reopen (bit 3: look at it read-only first);
/// - `op & 0x40`: discard and write-zeroes count whole blocks (1 to 4) rather than sectors;
/// - `op & 0x80`: the offset and length are taken as they are (512-byte units, possibly
///   unaligned by one byte with `op & 0x20`, possibly past the end): a request the device cannot
///   do must fail, not panic.
///
/// Otherwise requests are aligned to the logical sector, inside the disk, at most 256 sectors.
/// At the end the image is closed and reopened; an unpatched image is checked against a model
/// of every sector throughout.
pub fn run_io(data: &[u8]) {
    let mut c = Cursor::new(data);
    let case = Case::decode(&mut c, false);
    let parent = case.open_parent();
    let dev: Arc<dyn BlockDevice> = Arc::new(case.image.materialize());
    let open = |opts: &OpenOptions| Vhdx::open_on(dev.clone(), "fuzz", opts, parent.clone());
    let v = match open(&OpenOptions::default()) {
        Ok(v) => v,
        Err(e) => {
            assert!(!case.pristine, "the unpatched image does not open: {e}");
            return;
        }
    };
    let mut model = case.pristine.then(|| Model::new(&case.image));
    let g = v.geometry().clone();
    let (vs, bs, ls) = (g.virtual_size, g.block_size as u64, g.logical_sector as u64);
    let mut v = Some(v);
    let mut budget = WRITE_BUDGET;
    for i in 0..MAX_OPS {
        if c.is_empty() {
            break;
        }
        let op = c.u8();
        let sector = c.u32() as u64;
        let count = c.u8() as u64 + 1;
        let img = v.as_ref().expect("open");
        let raw = op & 0x80 != 0;
        let (off, len) = if raw {
            let units = if op & 0x40 != 0 && matches!(op % 8, 4 | 5) {
                count * bs / 512
            } else {
                count
            };
            (
                sector * 512 + ((op >> 5) & 1) as u64,
                (units * 512).min(4 * MIB),
            )
        } else {
            let off = sector % (vs / ls) * ls;
            let len = if op & 0x40 != 0 && matches!(op % 8, 4 | 5) {
                (count % 4 + 1) * bs
            } else {
                count * ls
            };
            (off, len.min(vs - off))
        };
        let valid = off % ls == 0 && len % ls == 0 && off.checked_add(len).is_some_and(|e| e <= vs);
        let tag = 0x8000_0000 | ((i as u32) << 16);
        let r = match op % 8 {
            0 | 1 => {
                if len > 4 * MIB {
                    continue;
                }
                let mut b = vec![0u8; len as usize];
                let r = if op & 8 != 0 && len >= 2 * ls {
                    let (x, y) = b.split_at_mut((len / ls / 2 * ls) as usize);
                    img.submit_all(&mut [Request::readv(off, [x, y])])
                } else {
                    img.read_at(off, &mut b)
                };
                if let (Ok(()), Some(m)) = (&r, &model) {
                    m.check(off, &b, "read");
                }
                r
            }
            2 | 3 => {
                if len > budget {
                    continue;
                }
                budget -= len;
                let r = img.write_at(off, &filled(len, ls, tag));
                if let Some(m) = model.as_mut() {
                    if r.is_ok() {
                        m.set(
                            off,
                            len,
                            Exp::Tag {
                                tag,
                                first: off / ls,
                            },
                        );
                    } else if valid {
                        m.set(off, len, Exp::Any);
                    }
                }
                r
            }
            4 => {
                let r = img.discard(off, len);
                if let Some(m) = model.as_mut() {
                    if valid {
                        m.set(off, len, Exp::Any);
                    }
                }
                r
            }
            5 => {
                // A differencing disk writes zeros into partial blocks: count them.
                let cost = if g.has_parent { len.min(2 * bs) } else { 0 };
                if cost > budget {
                    continue;
                }
                budget -= cost;
                let r = img.write_zeroes(off, len);
                if let Some(m) = model.as_mut() {
                    let e = if r.is_ok() { Exp::Zero } else { Exp::Any };
                    if valid {
                        m.set(off, len, e);
                    }
                }
                r
            }
            6 if op & 0x40 != 0 => {
                // Compaction keeps every byte's value (and commits, like a flush).
                img.compact_with(op & 8 != 0, &vstor_core::Job::new())
                    .map(|_| ())
            }
            6 => img.flush(),
            _ => {
                let img = v.take().expect("open");
                let closed = img.close();
                drop(img);
                if op & 8 != 0 {
                    match open(&ro_opts(false)) {
                        Ok(ro) => {
                            touch(&ro);
                            if let Some(m) = &model {
                                m.verify(&ro, &case.image, "read-only reopen");
                            }
                        }
                        Err(e) => assert!(
                            closed.is_err(),
                            "closed cleanly, does not reopen read-only: {e}"
                        ),
                    }
                }
                match open(&OpenOptions::default()) {
                    Ok(again) => v = Some(again),
                    Err(e) => {
                        assert!(closed.is_err(), "closed cleanly, does not reopen: {e}");
                        return;
                    }
                }
                closed
            }
        };
        if !valid && matches!(op % 8, 0..=5) {
            assert!(r.is_err(), "a request at {off} of {len} bytes succeeded");
        }
        if case.pristine && valid {
            if let Err(e) = &r {
                panic!("operation {op} at {off} of {len} bytes failed on the unpatched image: {e}");
            }
        }
    }
    let img = v.take().expect("open");
    let closed = img.close();
    drop(img);
    if case.pristine {
        closed.as_ref().expect("the unpatched image closes");
    }
    match open(&ro_opts(false)) {
        Ok(again) => {
            touch(&again);
            assert!(
                again.replay_note().is_none(),
                "a cleanly closed image needs replay"
            );
            if let Some(m) = &model {
                m.verify(&again, &case.image, "final reopen");
            }
        }
        Err(e) => assert!(closed.is_err(), "closed cleanly, does not reopen: {e}"),
    }
}
