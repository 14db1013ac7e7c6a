//! Threads writing disjoint blocks that share rows (so parity updates of one row race) and
//! readers beside them: every write lands, and the parity stays consistent with the data.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use vstor_core::{BlockDevice, FaultDevice};

const SPACE: u64 = 2 << 20;
const THREADS: usize = 4;

#[test]
fn racing_writers_in_shared_rows_keep_data_and_parity() {
    for (label, res, cols, n) in layouts() {
        // Members with a little latency, so that a row's read and its write are far apart.
        let devs: Vec<Arc<dyn BlockDevice>> = mem_disks(n, 16 << 20)
            .into_iter()
            .map(|d| {
                let f = FaultDevice::new(d);
                f.set_volatile_cache(false).unwrap();
                f.set_latency(Some(Duration::from_micros(50)));
                Arc::new(f) as Arc<dyn BlockDevice>
            })
            .collect();
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = Arc::new(pool.open_space("s").unwrap());
        // Thread t owns every interleave unit u (16 KiB) with u % THREADS == t: the units of a
        // row (its data columns) belong to different threads, which update the row's parity at
        // the same time.
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let space = space.clone();
                std::thread::spawn(move || {
                    for round in 0..2u64 {
                        for u in (t..(SPACE / INTERLEAVE) as usize).step_by(THREADS) {
                            let data = pattern(round * 1_000_000 + u as u64, INTERLEAVE as usize);
                            space.write_at(u as u64 * INTERLEAVE, &data).unwrap();
                        }
                        let mut back = vec![0u8; 65536];
                        space.read_at((t as u64) * 65536, &mut back).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        space.flush().unwrap();
        let want: Vec<u8> = (0..SPACE / INTERLEAVE)
            .flat_map(|u| pattern(1_000_000 + u, INTERLEAVE as usize))
            .collect();
        let mut got = vec![0u8; SPACE as usize];
        space.read_at(0, &mut got).unwrap();
        assert!(got == want, "{label}: a racing write was lost");
        drop(space);
        drop(pool);
        if res.tolerates() > 0 {
            for lost in 0..n {
                let p = open(&devs, &[lost], true);
                let mut back = vec![0u8; SPACE as usize];
                p.open_space("s").unwrap().read_at(0, &mut back).unwrap();
                assert!(
                    back == want,
                    "{label}: without member {lost}, parity or copies disagree"
                );
            }
        }
    }
}

/// Threads writing neighbouring 512-byte blocks (whose checksums share one checksum page) at
/// once: every checksum page on disk ends with every thread's entries, so a fresh open (no
/// cached pages) reads everything back with no checksum error.
#[test]
fn racing_writers_of_neighbouring_blocks_keep_every_checksum() {
    for (label, res, cols, n) in layouts() {
        let devs: Vec<Arc<dyn BlockDevice>> = mem_disks(n, 16 << 20)
            .into_iter()
            .map(|d| {
                let f = FaultDevice::new(d);
                f.set_volatile_cache(false).unwrap();
                f.set_latency(Some(Duration::from_micros(20)));
                Arc::new(f) as Arc<dyn BlockDevice>
            })
            .collect();
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = Arc::new(pool.open_space("s").unwrap());
        const SPAN: u64 = 256 << 10;
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let space = space.clone();
                std::thread::spawn(move || {
                    for b in (t..(SPAN / 512) as usize).step_by(THREADS) {
                        let data = pattern(7_000 + b as u64, 512);
                        space.write_at(b as u64 * 512, &data).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        space.flush().unwrap();
        drop((space, pool));
        let pool = open(&devs, &[], false);
        let space = pool.open_space("s").unwrap();
        let mut got = vec![0u8; SPAN as usize];
        space.read_at(0, &mut got).unwrap();
        for b in 0..(SPAN / 512) as usize {
            assert!(
                got[b * 512..(b + 1) * 512] == pattern(7_000 + b as u64, 512)[..],
                "{label}: block {b}"
            );
        }
        let s = pool.info().integrity;
        assert_eq!(s.checksum_errors, 0, "{label}: {s:?}");
        if res.tolerates() > 0 {
            let r = pool.scrub(None, &mut |_, _| {}).unwrap();
            assert_eq!(r.checksum_errors, 0, "{label}: {r:?}");
        }
    }
}
