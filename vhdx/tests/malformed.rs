//! Bad input: each malformed structure gives a typed error naming the structure and its file
//! offset, and opening a hostile image never writes to it.

use std::sync::Arc;

use vstor_core::{BlockDevice, Error, MemoryDevice};
use vstor_vhdx::format::*;
use vstor_vhdx::meta::{region_table_bytes, Region};
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx, VhdxError};

const META: u64 = 2 * MIB;
const BAT: u64 = 3 * MIB;
const ITEMS: u64 = META + 64 * 1024;

/// A valid dynamic image (16 MiB, 1 MiB blocks, two blocks written) as bytes.
fn image() -> Vec<u8> {
    let mem = Arc::new(MemoryDevice::new(MIB).unwrap());
    let v = Vhdx::create_on(
        mem.clone(),
        &CreateOptions::dynamic(16 * MIB).block_size(MIB as u32),
        None,
    )
    .unwrap();
    v.write_at(0, &[1u8; 4096]).unwrap();
    v.write_at(3 * MIB, &[2u8; 4096]).unwrap();
    v.close().unwrap();
    drop(v);
    let mut b = vec![0u8; mem.capacity() as usize];
    mem.read_at(0, &mut b).unwrap();
    b
}

fn open(bytes: &[u8], read_only: bool) -> Result<Vhdx, Error> {
    let mem = Arc::new(MemoryDevice::new(bytes.len() as u64).unwrap());
    mem.write_at(0, bytes).unwrap();
    let opts = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::default()
    };
    let r = Vhdx::open_on(mem.clone(), "bad.vhdx", &opts, None);
    // Whatever happened, a failed open wrote nothing.
    if r.is_err() {
        let mut after = vec![0u8; bytes.len()];
        mem.read_at(0, &mut after).unwrap();
        assert!(after == bytes, "a failed open changed the image");
    }
    r
}

#[track_caller]
fn corrupt_at(bytes: &[u8], what: &str, at: u64) -> String {
    for ro in [true, false] {
        match open(bytes, ro) {
            Err(Error::Corrupt {
                file,
                offset,
                what: w,
                reason,
            }) => {
                assert_eq!(file, "bad.vhdx");
                assert!(
                    w.contains(what),
                    "structure {w:?} should name {what:?} ({reason})"
                );
                assert_eq!(offset, at, "{w}: {reason}");
                if ro {
                    continue;
                }
                return format!("{w}: {reason}");
            }
            Err(e) => panic!("expected a corrupt {what} at {at}, got {e}"),
            Ok(_) => panic!("expected a corrupt {what} at {at}, but it opened"),
        }
    }
    unreachable!()
}

fn put(b: &mut [u8], at: u64, v: &[u8]) {
    b[at as usize..at as usize + v.len()].copy_from_slice(v);
}

/// Rewrites both region tables with `regions` (valid checksums).
fn set_regions(b: &mut [u8], regions: &[Region]) {
    let rt = region_table_bytes(regions);
    put(b, REGION_TABLE_OFFSETS[0], &rt);
    put(b, REGION_TABLE_OFFSETS[1], &rt);
}

fn std_regions() -> Vec<Region> {
    vec![
        Region {
            guid: BAT_REGION,
            offset: BAT,
            length: MIB,
            required: true,
        },
        Region {
            guid: METADATA_REGION,
            offset: META,
            length: MIB,
            required: true,
        },
    ]
}

#[test]
fn the_valid_image_opens() {
    let v = open(&image(), false).unwrap();
    let mut b = vec![0u8; 4096];
    v.read_at(3 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 2));
}

#[test]
fn file_identifier_and_headers() {
    let good = image();
    let mut b = good.clone();
    put(&mut b, 0, b"notvhdx!");
    corrupt_at(&b, "file identifier", 0);

    let mut b = good.clone();
    b[HEADER_OFFSETS[0] as usize + 100] ^= 1;
    b[HEADER_OFFSETS[1] as usize + 100] ^= 1;
    let msg = corrupt_at(&b, "header", HEADER_OFFSETS[0]);
    assert!(msg.contains("checksum"), "{msg}");

    // One damaged header: the other is used.
    let mut b = good.clone();
    b[HEADER_OFFSETS[1] as usize + 100] ^= 1;
    open(&b, true).unwrap();

    // Two valid headers with one sequence number that differ: ambiguous.
    let mut b = good.clone();
    let mut h0 = b[HEADER_OFFSETS[0] as usize..HEADER_OFFSETS[0] as usize + 4096].to_vec();
    let mut h1 = b[HEADER_OFFSETS[1] as usize..HEADER_OFFSETS[1] as usize + 4096].to_vec();
    h0[8..16].copy_from_slice(&9u64.to_le_bytes());
    h1[8..16].copy_from_slice(&9u64.to_le_bytes());
    h1[200] = 1;
    seal(&mut h0, 4);
    seal(&mut h1, 4);
    put(&mut b, HEADER_OFFSETS[0], &h0);
    put(&mut b, HEADER_OFFSETS[1], &h1);
    corrupt_at(&b, "header", HEADER_OFFSETS[1]);

    // A log that is not 1 MiB aligned.
    let mut b = good.clone();
    for &off in &HEADER_OFFSETS {
        let mut h = b[off as usize..off as usize + 4096].to_vec();
        h[72..80].copy_from_slice(&(MIB + 4096).to_le_bytes());
        seal(&mut h, 4);
        put(&mut b, off, &h);
    }
    corrupt_at(&b, "header", HEADER_OFFSETS[0]);
}

#[test]
fn region_table() {
    let good = image();
    let mut b = good.clone();
    b[REGION_TABLE_OFFSETS[0] as usize + 40] ^= 1;
    b[REGION_TABLE_OFFSETS[1] as usize + 40] ^= 1;
    corrupt_at(&b, "region table", REGION_TABLE_OFFSETS[0]);

    // The first copy damaged: the second is used.
    let mut b = good.clone();
    b[REGION_TABLE_OFFSETS[0] as usize + 40] ^= 1;
    open(&b, true).unwrap();

    let mut b = good.clone();
    let mut r = std_regions();
    r[0].offset = 1 << 40;
    set_regions(&mut b, &r);
    let msg = corrupt_at(&b, "region table entry", REGION_TABLE_OFFSETS[0] + 16);
    assert!(msg.contains("past the end of the file"), "{msg}");

    let mut b = good.clone();
    let mut r = std_regions();
    r[1].offset = BAT;
    set_regions(&mut b, &r);
    let msg = corrupt_at(&b, "region table entry", REGION_TABLE_OFFSETS[0] + 48);
    assert!(msg.contains("overlaps"), "{msg}");

    let mut b = good.clone();
    let mut r = std_regions();
    r.push(Region {
        guid: Guid([7; 16]),
        offset: 5 * MIB,
        length: MIB,
        required: true,
    });
    set_regions(&mut b, &r);
    let e = open(&b, true).unwrap_err();
    let Error::Layer(inner) = &e else {
        panic!("{e}")
    };
    assert!(
        matches!(
            inner.downcast_ref::<VhdxError>(),
            Some(VhdxError::Unsupported { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("required region"), "{e}");

    // An unknown optional region is fine (past the data, in a file grown for it).
    let mut b = good.clone();
    let end = b.len() as u64;
    b.resize(b.len() + MIB as usize, 0);
    let mut r = std_regions();
    r.push(Region {
        guid: Guid([7; 16]),
        offset: end,
        length: MIB,
        required: false,
    });
    set_regions(&mut b, &r);
    open(&b, true).unwrap();

    let mut b = good.clone();
    set_regions(&mut b, &std_regions()[..1]);
    corrupt_at(&b, "region table", REGION_TABLE_OFFSETS[0]);
}

#[test]
fn metadata() {
    let good = image();
    let mut b = good.clone();
    put(&mut b, META, b"nodata!!");
    corrupt_at(&b, "metadata table", META);

    let mut b = good.clone();
    put(&mut b, ITEMS, &(3 * MIB as u32).to_le_bytes());
    let msg = corrupt_at(&b, "file parameters", ITEMS);
    assert!(msg.contains("block size"), "{msg}");

    let mut b = good.clone();
    put(&mut b, ITEMS + 8, &0u64.to_le_bytes());
    corrupt_at(&b, "virtual disk size", ITEMS + 8);

    let mut b = good.clone();
    put(&mut b, ITEMS + 8, &(MAX_VIRTUAL_SIZE + 512).to_le_bytes());
    corrupt_at(&b, "virtual disk size", ITEMS + 8);

    let mut b = good.clone();
    put(&mut b, ITEMS + 32, &1000u32.to_le_bytes());
    corrupt_at(&b, "logical sector size", ITEMS + 32);

    let mut b = good.clone();
    put(&mut b, ITEMS + 40, &520u32.to_le_bytes());
    corrupt_at(&b, "physical sector size", ITEMS + 40);

    // An item pointing outside the region (entry 1 of the table, at META + 32 + 32).
    let mut b = good.clone();
    put(&mut b, META + 64 + 16, &(2 * MIB as u32).to_le_bytes());
    corrupt_at(&b, "metadata table entry", META + 64);

    // HasParent without a parent locator.
    let mut b = good.clone();
    put(&mut b, ITEMS + 4, &FP_HAS_PARENT.to_le_bytes());
    corrupt_at(&b, "file parameters", ITEMS);

    // An unknown required item refuses to open; an unknown optional one is kept.
    let mut b = good.clone();
    let entry = META + 32 + 5 * 32;
    put(&mut b, META + 10, &6u16.to_le_bytes());
    put(&mut b, entry, &[9u8; 16]);
    put(&mut b, entry + 16, &(64 * 1024u32 + 4096).to_le_bytes());
    put(&mut b, entry + 20, &8u32.to_le_bytes());
    put(&mut b, entry + 24, &META_IS_REQUIRED.to_le_bytes());
    let e = open(&b, true).unwrap_err();
    assert!(e.to_string().contains("required metadata item"), "{e}");
    put(&mut b, entry + 24, &0u32.to_le_bytes());
    let v = open(&b, true).unwrap();
    assert_eq!(v.metadata().items.len(), 6);
}

#[test]
fn bat_entries() {
    let good = image();
    let entry = |b: &[u8], i: u64| {
        u64::from_le_bytes(
            b[(BAT + 8 * i) as usize..(BAT + 8 * i + 8) as usize]
                .try_into()
                .unwrap(),
        )
    };
    assert_eq!(bat_state(entry(&good, 0)), payload::FULLY_PRESENT);

    let mut b = good.clone();
    put(
        &mut b,
        BAT + 8,
        &bat_entry(payload::FULLY_PRESENT, 1 << 40).to_le_bytes(),
    );
    let msg = corrupt_at(&b, "BAT entry", BAT + 8);
    assert!(msg.contains("past the end of the file"), "{msg}");

    // A block mapped over the metadata region: writes to it would destroy the metadata.
    let mut b = good.clone();
    put(
        &mut b,
        BAT + 16,
        &bat_entry(payload::FULLY_PRESENT, META).to_le_bytes(),
    );
    let msg = corrupt_at(&b, "BAT entry", BAT + 16);
    assert!(msg.contains("overlaps"), "{msg}");

    let mut b = good.clone();
    put(
        &mut b,
        BAT + 16,
        &bat_entry(payload::FULLY_PRESENT, 0).to_le_bytes(),
    );
    corrupt_at(&b, "BAT entry", BAT + 16);

    let mut b = good.clone();
    put(&mut b, BAT + 24, &4u64.to_le_bytes());
    let msg = corrupt_at(&b, "BAT payload entry", BAT + 24);
    assert!(msg.contains("state 4"), "{msg}");

    let mut b = good.clone();
    put(&mut b, BAT + 24, &payload::PARTIALLY_PRESENT.to_le_bytes());
    corrupt_at(&b, "BAT payload entry", BAT + 24);

    // The legacy UNMAPPED value 5 reads as zeros.
    let mut b = good.clone();
    put(&mut b, BAT, &payload::UNMAPPED_LEGACY.to_le_bytes());
    let v = open(&b, true).unwrap();
    let mut r = vec![1u8; 4096];
    v.read_at(0, &mut r).unwrap();
    assert!(r.iter().all(|&x| x == 0));
}

/// Builds a log entry by hand (its checksum sealed) writing `target` with one data sector.
fn log_entry(guid: Guid, target: u64, flushed: u64, last: u64) -> Vec<u8> {
    let mut e = vec![0u8; 8192];
    put(&mut e, 0, b"loge");
    put(&mut e, 8, &8192u32.to_le_bytes());
    put(&mut e, 12, &0u32.to_le_bytes());
    put(&mut e, 16, &1u64.to_le_bytes());
    put(&mut e, 24, &1u32.to_le_bytes());
    put(&mut e, 32, &guid.0);
    put(&mut e, 48, &flushed.to_le_bytes());
    put(&mut e, 56, &last.to_le_bytes());
    put(&mut e, 64, b"desc");
    put(&mut e, 80, &target.to_le_bytes());
    put(&mut e, 88, &1u64.to_le_bytes());
    put(&mut e, 4096, b"data");
    put(&mut e, 4096 + 4092, &1u32.to_le_bytes());
    seal(&mut e, 4);
    e
}

fn with_log(good: &[u8], entry: &[u8], guid: Guid) -> Vec<u8> {
    let mut b = good.to_vec();
    put(&mut b, MIB, entry);
    for &off in &HEADER_OFFSETS {
        let mut h = b[off as usize..off as usize + 4096].to_vec();
        h[48..64].copy_from_slice(&guid.0);
        seal(&mut h, 4);
        put(&mut b, off, &h);
    }
    b
}

#[test]
fn hostile_logs() {
    let good = image();
    let size = good.len() as u64;
    let guid = Guid::random();
    // A well-formed entry replays (sanity check of the hand-built entry).
    let b = with_log(&good, &log_entry(guid, 6 * MIB, size, size), guid);
    let v = open(&b, true).unwrap();
    assert_eq!(
        v.replay_note(),
        Some("1 log entries replayed in memory (the file is unchanged)")
    );
    drop(v);
    // An entry that would overwrite a header.
    let b = with_log(&good, &log_entry(guid, HEADER_OFFSETS[0], size, size), guid);
    let msg = corrupt_at(&b, "log entry descriptor", MIB);
    assert!(msg.contains("headers or the log"), "{msg}");
    // One that writes into the log itself.
    let b = with_log(&good, &log_entry(guid, MIB + 4096, size, size), guid);
    corrupt_at(&b, "log entry descriptor", MIB);
    // The file is shorter than the log says was flushed: it was truncated.
    let b = with_log(
        &good,
        &log_entry(guid, 6 * MIB, size + MIB, size + MIB),
        guid,
    );
    let msg = corrupt_at(&b, "file size", 0);
    assert!(msg.contains("truncated"), "{msg}");
    // An absurd file extension.
    let b = with_log(&good, &log_entry(guid, 6 * MIB, size, 1 << 60), guid);
    corrupt_at(&b, "log entry", MIB);
    // A stale entry (another LogGuid) is ignored.
    let b = with_log(
        &good,
        &log_entry(Guid::random(), HEADER_OFFSETS[0], size, size),
        guid,
    );
    let v = open(&b, false).unwrap();
    assert!(v.replay_note().unwrap().contains("no valid entry"));
}

#[test]
fn differencing_chain_errors() {
    let pm: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(MIB).unwrap());
    let p = Arc::new(
        Vhdx::create_on(
            pm,
            &CreateOptions::dynamic(16 * MIB).block_size(MIB as u32),
            None,
        )
        .unwrap(),
    );
    let cm: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(MIB).unwrap());
    let c = Vhdx::create_on(
        cm.clone(),
        &CreateOptions::differencing("p.vhdx"),
        Some((p.clone(), std::path::Path::new("p.vhdx"))),
    )
    .unwrap();
    drop(c);
    // The parent changes (its DataWriteGuid is renewed by a write): the child refuses it.
    p.write_at(0, &[1u8; 512]).unwrap();
    let e = Vhdx::open_on(
        cm.clone(),
        "c.vhdx",
        &OpenOptions::default(),
        Some(p.clone()),
    )
    .unwrap_err();
    let Error::Layer(inner) = &e else {
        panic!("{e}")
    };
    assert!(
        matches!(
            inner.downcast_ref::<VhdxError>(),
            Some(VhdxError::LinkageMismatch { .. })
        ),
        "{e}"
    );
    // No parent at all.
    let e = Vhdx::open_on(cm, "c.vhdx", &OpenOptions::default(), None).unwrap_err();
    assert!(e.to_string().contains("parent of c.vhdx not found"), "{e}");
}

#[test]
fn chains_on_disk_refuse_cycles_and_depth() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.vhdx");
    let b = dir.path().join("b.avhdx");
    Vhdx::create(&a, &CreateOptions::dynamic(16 * MIB).block_size(MIB as u32)).unwrap();
    Vhdx::create(&b, &CreateOptions::differencing(&a)).unwrap();
    // Make a cycle: b becomes a's... replace a by a child of b.
    let c = dir.path().join("c.avhdx");
    Vhdx::create(&c, &CreateOptions::differencing(&b)).unwrap();
    std::fs::rename(&c, &a).unwrap();
    let e = Vhdx::open(&b, &OpenOptions::read_only()).unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    // Depth.
    let d0 = dir.path().join("d0.vhdx");
    Vhdx::create(
        &d0,
        &CreateOptions::dynamic(16 * MIB).block_size(MIB as u32),
    )
    .unwrap();
    let mut prev = d0;
    for i in 1..=4 {
        let next = dir.path().join(format!("d{i}.avhdx"));
        Vhdx::create(&next, &CreateOptions::differencing(&prev)).unwrap();
        prev = next;
    }
    let e = Vhdx::open(
        &prev,
        &OpenOptions {
            max_chain_depth: 2,
            ..OpenOptions::read_only()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("deeper than 2"), "{e}");
    Vhdx::open(&prev, &OpenOptions::read_only()).unwrap();
}
