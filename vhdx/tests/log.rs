//! Crafted logs (the shapes of `mk_evil_log.py`, built here): a read-only open replays them in
//! memory with bounded memory, and finding the active sequence is linear in the log's size;
//! the fuzz target `vhdx_log`'s oracles over fixed inputs and its saved inputs.

use std::path::Path;
use std::sync::Arc;

use vstor_core::{BlockDevice, MemoryDevice};
use vstor_vhdx::format::*;
use vstor_vhdx::log::{self, Overlay, ScanWork};
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};
use zerocopy::{FromBytes, IntoBytes};

mod log_shapes;

use log_shapes::GUID;

/// A fresh 1 GiB dynamic image whose header says its log (moved to `log_at` with `log_len`
/// bytes, when given) holds `log` and needs replay, as `mk_evil_log.py` rewrites one.
fn evil_image(log: &[u8], moved: Option<u64>) -> Arc<dyn BlockDevice> {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 * MIB).unwrap());
    let v = Vhdx::create_on(dev.clone(), &CreateOptions::dynamic(1 << 30), None).unwrap();
    v.close().unwrap();
    drop(v);
    let mut hs = Vec::new();
    for off in HEADER_OFFSETS {
        let mut b = vec![0u8; 4096];
        dev.read_at(off, &mut b).unwrap();
        hs.push(Header::read_from_bytes(&b).unwrap());
    }
    let mut h = hs
        .into_iter()
        .max_by_key(|h| h.sequence_number.get())
        .unwrap();
    h.log_guid = GUID;
    if let Some(at) = moved {
        let end = at + log.len() as u64;
        if dev.capacity() < end {
            dev.resize(end).unwrap();
        }
        h.log_offset = at.into();
        h.log_length = (log.len() as u32).into();
    }
    dev.write_at(h.log_offset.get(), log).unwrap();
    let seq = h.sequence_number.get();
    for (i, off) in HEADER_OFFSETS.into_iter().enumerate() {
        h.sequence_number = (seq + 1 + i as u64).into();
        let mut raw = h.as_bytes().to_vec();
        raw[4..8].fill(0);
        seal(&mut raw, 4);
        dev.write_at(off, &raw).unwrap();
    }
    dev
}

#[test]
fn a_log_of_huge_zero_descriptors_replays_in_memory_in_bounded_memory() {
    // zeros N: N descriptors of 256 MiB (the 4 MiB file took 2.1 GB to open for N = 8, and
    // aborted for N = 16), and as many as a 1 MiB log holds.
    for n in [8u64, 16, 4000] {
        let log = log_shapes::zeros_shape(MIB, n);
        let dev = evil_image(&log, None);
        // What `disk info` does: a read-only open, the log replayed in memory.
        let v = Vhdx::open_on(dev.clone(), "evil", &OpenOptions::read_only(), None);
        if let Ok(v) = &v {
            assert!(v.replay_note().unwrap().contains("in memory"), "{n}");
        }
        let (lo, ll) = (MIB, MIB);
        let (act, work) = log::find_active_counted(&*dev, "evil", lo, ll, GUID).unwrap();
        assert!(work.within(&ScanWork::bound(ll)), "{n}: {work:?}");
        let act = act.unwrap();
        assert_eq!(act.entries[0].writes.len() as u64, n);
        let o = Overlay::new(dev.clone(), "evil", &act).unwrap();
        assert!(
            o.memory_bytes() <= 5 * ll,
            "{n}: {} bytes",
            o.memory_bytes()
        );
        let mut b = vec![0xFFu8; 4096];
        o.read_at(4 * MIB + (n - 1) * (1 << 30) + 255 * MIB, &mut b)
            .unwrap();
        assert!(b.iter().all(|&x| x == 0));
        drop(v);
        // The writable open replays it into the file.
        let w = Vhdx::open_on(dev.clone(), "evil", &OpenOptions::default(), None);
        if let Ok(w) = w {
            assert!(w.replay_note().unwrap().contains("replayed"));
        }
    }
}

#[test]
fn a_log_with_an_entry_header_in_every_sector_is_searched_in_linear_work() {
    // scan 32 and scan 64: 34 s of CPU for 32 MiB, and more than 500 s for 64 MiB, before.
    for mib in [32u64, 64] {
        let len = mib * MIB;
        let log = log_shapes::scan_shape(len);
        let dev = evil_image(&log, Some(4 * MIB));
        let (act, work) = log::find_active_counted(&*dev, "evil", 4 * MIB, len, GUID).unwrap();
        assert!(act.is_none());
        assert!(work.within(&ScanWork::bound(len)), "{mib} MiB: {work:?}");
        assert!(work.checksummed <= len, "{work:?}");
        // The open itself (it finds nothing to replay; the log then overlaps the BAT).
        let _ = Vhdx::open_on(dev, "evil", &OpenOptions::read_only(), None);
    }
}

#[test]
fn crafted_logs_keep_the_search_linear_and_the_replay_bounded_and_right() {
    let mut rng = fastrand::Rng::with_seed(0x1096);
    let mut replayed = 0;
    for _ in 0..400 {
        let mut data = vec![0u8; rng.usize(0..2048)];
        rng.fill(&mut data);
        if log_shapes::check_log(&log_shapes::from_input(&mut log_shapes::Input::new(&data)))
            .1
            .is_some()
        {
            replayed += 1;
        }
    }
    assert!(replayed > 20, "only {replayed} inputs reached a replay");
    // The inputs the fuzz target saved.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/vhdx_log");
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd {
            let p = e.unwrap().path();
            log_shapes::run(&std::fs::read(&p).unwrap());
        }
    }
}
