//! Arbitrary VHD images opened by the legacy VHD reader (`vstor_vhdx::vpc`): raw bytes, or a
//! valid fixed, dynamic or differencing image (the latter over an opaque parent device or over
//! a VHD parent whose identity is checked) with patches over any of its bytes, the footers and
//! the dynamic header optionally re-sealed so the patches get past the checksums. Nothing may
//! panic; a failed open is a typed error (`Corrupt` or a `VpcError`); an image that opens reads
//! consistently with what `locate` and `locate_chain` say about it (zeros where they say zero,
//! the file's bytes where they say file, the parent's where they say parent), refuses writes,
//! and an unpatched image reads exactly its model.
//!
//! Input: byte 0 picks the image (0 raw, 1 fixed, 2 dynamic, 3 differencing over a device,
//! 4 differencing over a VHD), byte 1 holds flags (bit 0: re-seal the footers, bit 1: re-seal
//! the header), then patches: a little-endian u16 offset (modulo the image's length), a length
//! byte (at most 16) and that many bytes. In raw mode the rest is the image.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vstor_core::{BlockDevice, Error, MemoryDevice, Request};
use vstor_vhdx::vpc::*;
use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const CAP: u64 = 64 * 1024;
const BS: u64 = 8 * 1024;

fn fill(voff: u64, salt: u8) -> u8 {
    ((voff / 512) as u8).wrapping_mul(31).wrapping_add(salt) | 1
}

fn footer(kind: u32, data_offset: u64, id: u8) -> Footer {
    let mut f = Footer::new_zeroed();
    f.cookie = FOOTER_COOKIE;
    f.features = U32::new(2);
    f.format_version = U32::new(VERSION_1_0);
    f.data_offset = U64::new(data_offset);
    f.creator_app = *b"win ";
    f.current_size = U64::new(CAP);
    f.original_size = U64::new(CAP);
    f.disk_type = U32::new(kind);
    f.unique_id = [id; 16];
    f.seal();
    f
}

/// A fixed image of CAP bytes and its contents.
fn fixed() -> (Vec<u8>, Vec<u8>) {
    let model: Vec<u8> = (0..CAP).map(|o| fill(o, 3)).collect();
    let mut img = model.clone();
    img.extend_from_slice(footer(DISK_FIXED, u64::MAX, 1).as_bytes());
    (img, model)
}

/// A dynamic (or differencing, over a parent of unique id `parent`) image of CAP bytes in
/// 8 KiB blocks: block 1 whole, block 3 in part, block 5 allocated with nothing present.
/// Returns the image and what it reads as over `under`.
fn sparse(parent: Option<u8>, under: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let entries = CAP / BS;
    let bat = 1536u64;
    let loc = 2048u64;
    let blocks = 2560u64;
    let span = 512 + BS;
    // (block, [start, end) runs of present sectors).
    let alloc: [(u64, &[(u64, u64)]); 3] = [(1, &[(0, 16)]), (3, &[(1, 3), (7, 12)]), (5, &[])];
    let end = blocks + alloc.len() as u64 * span;
    let mut img = vec![0u8; (end + 512) as usize];
    let mut model = under.to_vec();
    model.resize(CAP as usize, 0);
    let kind = if parent.is_some() {
        DISK_DIFFERENCING
    } else {
        DISK_DYNAMIC
    };
    let f = footer(kind, 512, 2 + parent.unwrap_or(0));
    let mut h = DynHeader::new_zeroed();
    h.cookie = DYN_HEADER_COOKIE;
    h.data_offset = U64::new(u64::MAX);
    h.table_offset = U64::new(bat);
    h.header_version = U32::new(VERSION_1_0);
    h.max_table_entries = U32::new(entries as u32);
    h.block_size = U32::new(BS as u32);
    if let Some(p) = parent {
        h.parent_unique_id = [p; 16];
        let path: Vec<u8> = r".\p.vhd"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let l = &mut h.parent_locators[0];
        l.platform_code = U32::new(PLATFORM_W2RU);
        l.platform_data_space = U32::new(512);
        l.platform_data_length = U32::new(path.len() as u32);
        l.platform_data_offset = U64::new(loc);
        img[loc as usize..loc as usize + path.len()].copy_from_slice(&path);
    }
    h.seal();
    let mut table = vec![BAT_UNUSED; entries as usize];
    for (k, (index, ranges)) in alloc.iter().enumerate() {
        let at = blocks + k as u64 * span;
        table[*index as usize] = (at / 512) as u32;
        for s in 0..BS / 512 {
            let present = ranges.iter().any(|&(a, b)| (a..b).contains(&s));
            let voff = index * BS + s * 512;
            if present {
                img[(at + s / 8) as usize] |= 0x80 >> (s % 8);
                model[voff as usize..(voff + 512) as usize].fill(fill(voff, 7));
            } else if parent.is_none() {
                model[voff as usize..(voff + 512) as usize].fill(0);
            }
            let d = (at + 512 + s * 512) as usize;
            img[d..d + 512].fill(if present { fill(voff, 7) } else { 0xEE });
        }
    }
    for (i, e) in table.iter().enumerate() {
        let at = bat as usize + 4 * i;
        img[at..at + 4].copy_from_slice(U32::new(*e).as_bytes());
    }
    img[..512].copy_from_slice(f.as_bytes());
    img[512..1536].copy_from_slice(h.as_bytes());
    img[end as usize..].copy_from_slice(f.as_bytes());
    (img, model)
}

fn device(bytes: &[u8]) -> Arc<MemoryDevice> {
    let mem = MemoryDevice::new(bytes.len().next_multiple_of(512) as u64).unwrap();
    mem.write_at(0, &{
        let mut b = bytes.to_vec();
        b.resize(bytes.len().next_multiple_of(512), 0);
        b
    })
    .unwrap();
    Arc::new(mem)
}

fn reseal(img: &mut [u8], footers: bool, header: bool) {
    let n = img.len();
    if footers {
        for at in [0, n - 512] {
            if let Ok(mut f) = Footer::read_from_bytes(&img[at..at + 512]) {
                if f.cookie != FOOTER_COOKIE {
                    continue;
                }
                f.seal();
                img[at..at + 512].copy_from_slice(f.as_bytes());
            }
        }
    }
    if header && n >= 1536 + 512 {
        if let Ok(mut h) = DynHeader::read_from_bytes(&img[512..1536]) {
            h.seal();
            img[512..1536].copy_from_slice(h.as_bytes());
        }
    }
}

/// Reads `[off, off + len)` of `dev`, zeros past its end.
fn read_clamped(dev: &dyn BlockDevice, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    let inside = dev.capacity().saturating_sub(off).min(len);
    if inside > 0 {
        dev.read_at(off, &mut b[..inside as usize]).unwrap();
    }
    b
}

fn check_range(v: &Vpc, file: &dyn BlockDevice, off: u64, len: u64) -> Vec<u8> {
    // The range in one batch of three requests, each in two buffers split at an odd byte.
    let mut whole = vec![0x99u8; len as usize];
    {
        let third = (len / 3) / 512 * 512;
        let (a, rest) = whole.split_at_mut(third as usize);
        let (b, c) = rest.split_at_mut(third as usize);
        let mut reqs = Vec::new();
        let mut o = off;
        for piece in [a, b, c] {
            if piece.is_empty() {
                continue;
            }
            let n = piece.len() as u64;
            let (x, y) = piece.split_at_mut(piece.len() / 2 + 1);
            reqs.push(Request::readv(o, [x, y]));
            o += n;
        }
        v.submit_all(&mut reqs).unwrap();
    }
    let mut pos = 0u64;
    for (n, p) in v.locate(off, len).unwrap() {
        let got = &whole[pos as usize..(pos + n) as usize];
        match p {
            Place::Zero => assert!(got.iter().all(|&b| b == 0), "zero at {}", off + pos),
            Place::File(o) => assert!(got == read_clamped(file, o, n), "file at {}", off + pos),
            Place::Parent(o) => {
                let p = v.parent().expect("a parent place without a parent");
                assert!(got == read_clamped(&**p, o, n), "parent at {}", off + pos);
            }
        }
        pos += n;
    }
    assert_eq!(pos, len);
    let mut pos = 0u64;
    for (n, p) in v.locate_chain(off, len).unwrap() {
        if p == ChainPlace::Zero {
            let got = &whole[pos as usize..(pos + n) as usize];
            assert!(got.iter().all(|&b| b == 0), "chain zero at {}", off + pos);
        }
        pos += n;
    }
    assert_eq!(pos, len);
    whole
}

fn run(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let (mode, flags, rest) = (data[0] % 5, data[1], &data[2..]);
    let parent_img = sparse(None, &[]);
    let (mut img, model) = match mode {
        0 => (rest[..rest.len().min(1 << 20)].to_vec(), Vec::new()),
        1 => fixed(),
        2 => sparse(None, &[]),
        _ => sparse(Some(2), &parent_img.1),
    };
    let original = img.clone();
    if mode != 0 {
        let mut p = rest;
        while p.len() >= 3 {
            let at = u16::from_le_bytes([p[0], p[1]]) as usize % img.len();
            let n = (p[2] as usize % 17).min(p.len() - 3).min(img.len() - at);
            img[at..at + n].copy_from_slice(&p[3..3 + n]);
            p = &p[3 + n..];
        }
        reseal(&mut img, flags & 1 != 0, flags & 2 != 0);
    }
    let patched = mode == 0 || img != original;
    let file = device(&img);
    let opened = match mode {
        3 => {
            let pdev: Arc<dyn BlockDevice> = device(&parent_img.1);
            Vpc::open_on(file.clone(), "fuzz.vhd", Some(pdev))
        }
        4 => {
            let pv = Vpc::open_on(device(&parent_img.0), "p.vhd", None).unwrap();
            Vpc::open_on_chain(file.clone(), "fuzz.vhd", Some(Arc::new(pv)))
        }
        _ => Vpc::open_on(file.clone(), "fuzz.vhd", None),
    };
    let v = match opened {
        Ok(v) => v,
        Err(e) => {
            assert!(
                matches!(e, Error::Corrupt { .. } | Error::Layer(_)),
                "untyped error: {e}"
            );
            assert!(patched, "the unpatched template failed to open: {e}");
            return;
        }
    };
    let cap = v.capacity();
    assert!(cap % 512 == 0 && cap <= MAX_VIRTUAL_SIZE);
    assert!(v.info().read_only);
    assert!(matches!(
        v.write_at(0, &[0u8; 512]),
        Err(Error::ReadOnly { .. }) | Err(Error::OutOfRange { .. })
    ));
    // The start and the end of the disk.
    let head = cap.min(256 * 1024);
    let got = check_range(&v, &*file, 0, head);
    if !patched {
        assert!(got == model, "the unpatched template misreads");
    }
    let tail = cap.min(64 * 1024);
    check_range(&v, &*file, cap - tail, tail);
    let _ = (
        v.describe(),
        v.notes(),
        v.qemu_capacity(),
        v.parent_locators(),
    );
}

fuzz_target!(|data: &[u8]| run(data));
