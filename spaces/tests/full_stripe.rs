//! Parity full-stripe writes: written from the caller's buffers with the parity computed from
//! them, no member read (single and dual parity); the data, the parity and the block checksums
//! are right afterwards, whether the stripe came in one buffer or several.

mod common;

use common::*;
use std::sync::Arc;
use vstor_core::{BlockDevice, FaultDevice, MemoryDevice, Request};
use vstor_spaces::Resiliency;

const SPACE: u64 = 4 << 20;
const DISK: u64 = 24 << 20;

#[test]
fn full_stripe_writes_read_nothing_and_leave_parity_and_checksums_right() {
    for (label, res, cols) in [
        ("parity1", Resiliency::Parity { redundancy: 1 }, 4),
        ("parity2", Resiliency::Parity { redundancy: 2 }, 5),
    ] {
        let faults: Vec<Arc<FaultDevice>> = (0..cols)
            .map(|_| Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(DISK).unwrap()))))
            .collect();
        let devs: Vec<Arc<dyn BlockDevice>> = faults
            .iter()
            .map(|f| f.clone() as Arc<dyn BlockDevice>)
            .collect();
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let stripe = (cols - res.tolerates()) * INTERLEAVE as usize;
        // Allocate every extent and bring the checksum pages into the cache.
        let mut model = pattern(1, SPACE as usize);
        space.write_at(0, &model).unwrap();
        let reads = || faults.iter().map(|f| f.stats().reads).sum::<u64>();
        let before = reads();
        // Whole stripes: a batch of single buffers, then one request made of three buffers
        // whose boundaries fall inside columns.
        let new = pattern(2, 6 * stripe);
        let mut batch: Vec<Request<'_>> = new[..4 * stripe]
            .chunks(stripe)
            .enumerate()
            .map(|(i, b)| Request::write((8 + i * 3) as u64 * stripe as u64, b))
            .collect();
        space.submit_all(&mut batch).unwrap();
        let split = &new[4 * stripe..];
        let cut = [0, 1000 * 16, stripe + 512 * 7, 2 * stripe];
        let mut one = [Request::writev(
            30 * stripe as u64,
            cut.windows(2).map(|w| &split[w[0]..w[1]]),
        )];
        space.submit_all(&mut one).unwrap();
        assert_eq!(
            reads(),
            before,
            "{label}: a full-stripe write read a member"
        );
        for i in 0..4 {
            let at = (8 + i * 3) * stripe;
            model[at..at + stripe].copy_from_slice(&new[i * stripe..(i + 1) * stripe]);
        }
        model[30 * stripe..32 * stripe].copy_from_slice(split);
        // A partial row does read (what it does not overwrite): the counter works.
        space.write_at(40 * stripe as u64, &new[..4096]).unwrap();
        assert!(reads() > before, "{label}");
        model[40 * stripe..40 * stripe + 4096].copy_from_slice(&new[..4096]);
        space.flush().unwrap();
        drop((space, pool));
        // Fresh opens: every block matches its checksum, the parity matches the data, and
        // each data shard can be rebuilt from the others.
        let pool = open(&devs, &[], false);
        let scrub = pool.scrub(None, &mut |_, _| {}).unwrap();
        assert_eq!(
            (scrub.checksum_errors, scrub.repaired),
            (0, 0),
            "{label}: {scrub:?}"
        );
        assert!(contents(&pool.open_space("s").unwrap()) == model, "{label}");
        drop(pool);
        for lost in 0..cols {
            let p = open(&devs, &[lost], true);
            assert!(
                contents(&p.open_space("s").unwrap()) == model,
                "{label}: without member {lost}"
            );
        }
    }
}

/// A full-stripe write over a row that the parity journal logged earlier in its generation is
/// logged too (so it is not written from the caller's buffers): replaying the journal at the
/// next open must put the newest data in place, not the older partial write's.
#[test]
fn a_full_stripe_write_after_a_journaled_partial_write_survives_the_replay() {
    for (label, res, cols) in [
        ("parity1", Resiliency::Parity { redundancy: 1 }, 4),
        ("parity2", Resiliency::Parity { redundancy: 2 }, 5),
    ] {
        let devs: Vec<Arc<dyn BlockDevice>> = (0..cols)
            .map(|_| Arc::new(MemoryDevice::new(DISK).unwrap()) as Arc<dyn BlockDevice>)
            .collect();
        let pool = create(&devs);
        pool.create_space(&spec("s", SPACE, res, Some(cols)))
            .unwrap();
        let space = pool.open_space("s").unwrap();
        let stripe = (cols - res.tolerates()) * INTERLEAVE as usize;
        let mut model = pattern(1, SPACE as usize);
        space.write_at(0, &model).unwrap();
        space.flush().unwrap();
        // A partial write into row 5 (journaled), then the whole of row 5 from one buffer.
        let at = 5 * stripe;
        let partial = pattern(2, 4096);
        space.write_at(at as u64 + 8192, &partial).unwrap();
        space.flush().unwrap();
        let full = pattern(3, stripe);
        let mut one = [Request::write(at as u64, &full)];
        space.submit_all(&mut one).unwrap();
        space.flush().unwrap();
        model[at..at + stripe].copy_from_slice(&full);
        assert!(contents(&space) == model, "{label}: before reopening");
        drop((space, pool));
        // The open replays the journal's records in order.
        let pool = open(&devs, &[], false);
        assert!(
            contents(&pool.open_space("s").unwrap()) == model,
            "{label}: after the replay"
        );
        drop(pool);
        for lost in 0..cols {
            let p = open(&devs, &[lost], true);
            assert!(
                contents(&p.open_space("s").unwrap()) == model,
                "{label}: without member {lost}"
            );
        }
    }
}
