//! Crash tests through the fault device: a power cut at every single write of a sequence of
//! allocating writes, flushes, discards and write-zeroes. After reopening, every write that
//! completed before the last completed flush is intact, nothing reads as data that was never
//! written there, and the image checks clean.

use std::sync::Arc;

use vstor_core::{BlockDevice, CutPolicy, FaultDevice, MemoryDevice};
use vstor_vhdx::check::check_device;
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

mod tagmodel;

use tagmodel::{fill, tag_of, Model, SECTOR};

const MIB: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Step {
    Write { off: u64, len: u64 },
    Flush,
    Discard { off: u64, len: u64 },
    Zero { off: u64, len: u64 },
}

fn scenario(block: u32, logical: u32, diff: bool) -> Vec<Step> {
    let bs = block as u64;
    let mut rng = fastrand::Rng::with_seed(7 + bs + logical as u64 + diff as u64);
    let mut steps = Vec::new();
    for i in 0..24 {
        let kind = rng.u32(0..10);
        let align = logical as u64;
        let off = rng.u64(0..(8 * bs) / align) * align;
        let len = (rng.u64(1..=(bs / 2) / align) * align).min(8 * bs - off);
        steps.push(match kind {
            0..=5 => Step::Write { off, len },
            6 => Step::Discard {
                off: off / bs * bs,
                len: bs,
            },
            7 => Step::Zero { off, len },
            _ => Step::Flush,
        });
        if i % 6 == 5 {
            steps.push(Step::Flush);
        }
    }
    // Whole-block writes too.
    steps.push(Step::Write {
        off: 2 * bs,
        len: 2 * bs,
    });
    steps.push(Step::Flush);
    steps.push(Step::Write {
        off: 7 * bs,
        len: bs,
    });
    steps
}

struct Setup {
    fault: Arc<FaultDevice>,
    parent: Option<Arc<Vhdx>>,
}

fn setup(block: u32, logical: u32, diff: bool) -> (Setup, Vhdx) {
    let bs = block as u64;
    let parent = if diff {
        let pm: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 * MIB).unwrap());
        let p = Vhdx::create_on(
            pm,
            &CreateOptions::dynamic(8 * bs)
                .block_size(block)
                .logical_sector_size(logical),
            None,
        )
        .unwrap();
        // The parent holds tag 0xFFFF_0000 in its first half.
        let mut b = vec![0u8; (4 * bs) as usize];
        fill(&mut b, 0xFFFF_0000);
        p.write_at(0, &b).unwrap();
        p.flush().unwrap();
        p.close().unwrap();
        Some(Arc::new(p))
    } else {
        None
    };
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 * MIB).unwrap());
    let fault = Arc::new(FaultDevice::new(mem));
    fault.set_volatile_cache(true).unwrap();
    let opts = CreateOptions::dynamic(8 * bs)
        .block_size(block)
        .logical_sector_size(logical);
    let v = match &parent {
        Some(p) => Vhdx::create_on(
            fault.clone(),
            &CreateOptions::differencing("parent.vhdx").block_size(block),
            Some((p.clone(), std::path::Path::new("parent.vhdx"))),
        )
        .unwrap(),
        None => Vhdx::create_on(fault.clone(), &opts, None).unwrap(),
    };
    v.flush().unwrap();
    (Setup { fault, parent }, v)
}

fn base_model(diff: bool, bs: u64) -> Model {
    let mut m = Model::default();
    if diff {
        for s in 0..(4 * bs) / SECTOR {
            m.durable.insert(s, 0xFFFF_0000);
        }
    }
    m
}

/// Runs the steps until the first failure; returns the model and how many steps completed.
fn run(v: &Vhdx, steps: &[Step], model: &mut Model) -> usize {
    for (i, st) in steps.iter().enumerate() {
        let tag = i as u32 + 1;
        let r = match *st {
            Step::Write { off, len } => {
                let mut b = vec![0u8; len as usize];
                fill(&mut b, tag);
                // The write may land even if it reports failure: allow it before trying.
                model.set(off, len, tag);
                v.write_at(off, &b)
            }
            Step::Flush => v.flush().map(|_| model.flushed()),
            Step::Discard { off, len } => {
                model.set(off, len, tagmodel::UNDEFINED);
                v.discard(off, len)
            }
            Step::Zero { off, len } => {
                model.set(off, len, 0);
                v.write_zeroes(off, len)
            }
        };
        if r.is_err() {
            return i;
        }
    }
    steps.len()
}

fn verify(v: &Vhdx, model: &Model, what: &str) {
    let cap = v.capacity();
    let mut buf = vec![0u8; cap as usize];
    v.read_at(0, &mut buf).unwrap();
    for (s, sector) in buf.chunks_exact(SECTOR as usize).enumerate() {
        let s = s as u64;
        let Some(tag) = tag_of(sector) else {
            panic!("{what}: sector {s} holds a mix of writes");
        };
        assert!(
            model.allows(s, tag),
            "{what}: sector {s} holds tag {tag:#x}, durable {:?}, since {:?}",
            model.durable.get(&s),
            model.since.get(&s)
        );
    }
}

fn power_cut_everywhere(block: u32, logical: u32, diff: bool) {
    let bs = block as u64;
    let steps = scenario(block, logical, diff);
    // Count the writes the whole sequence makes.
    let (s, v) = setup(block, logical, diff);
    let before = s.fault.stats().writes;
    let mut m = base_model(diff, bs);
    assert_eq!(run(&v, &steps, &mut m), steps.len());
    v.flush().unwrap();
    m.flushed();
    verify(&v, &m, "no cut");
    let total = s.fault.stats().writes - before;
    drop(v);
    assert!(total > 20, "{total}");
    for n in 1..=total {
        let policies = [
            CutPolicy::DropAll,
            CutPolicy::KeepAll,
            CutPolicy::Random {
                seed: n,
                torn: true,
            },
        ];
        for policy in policies {
            let (s, v) = setup(block, logical, diff);
            let mut m = base_model(diff, bs);
            s.fault.arm_power_cut(n, policy);
            let done = run(&v, &steps, &mut m);
            let _ = v.flush();
            drop(v);
            let what = format!("block {block} sector {logical} diff {diff}: cut at write {n} of {total} ({policy:?}), {done} steps done");
            s.fault.power_on();
            let dev: Arc<dyn BlockDevice> = s.fault.clone();
            let v = Vhdx::open_on(
                dev.clone(),
                "crashed",
                &OpenOptions::default(),
                s.parent.clone(),
            )
            .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
            verify(&v, &m, &what);
            drop(v);
            let r = check_device(dev, "crashed");
            assert!(
                r.is_clean(),
                "{what}: check is not clean: {:?} {:?}",
                r.errors,
                r.warnings
            );
        }
    }
}

#[test]
fn power_cut_at_every_write_dynamic() {
    power_cut_everywhere(MIB as u32, 512, false);
}

#[test]
fn power_cut_at_every_write_4k_sectors() {
    power_cut_everywhere(2 * MIB as u32, 4096, false);
}

#[test]
fn power_cut_at_every_write_differencing() {
    power_cut_everywhere(MIB as u32, 512, true);
}

#[test]
fn torn_log_entry_is_ignored_and_older_state_survives() {
    // Write, flush (commit 1), write more, then tear the commit-2 log write.
    let (s, v) = setup(MIB as u32, 512, false);
    let mut a = vec![0u8; 4096];
    fill(&mut a, 1);
    v.write_at(0, &a).unwrap();
    v.flush().unwrap();
    fill(&mut a, 2);
    v.write_at(3 * MIB, &a).unwrap();
    // Commit 2 = flush, then the log write (the first write from now), then flush.
    s.fault.arm_power_cut(
        2,
        CutPolicy::Random {
            seed: 9,
            torn: true,
        },
    );
    let _ = v.flush();
    drop(v);
    s.fault.power_on();
    let dev: Arc<dyn BlockDevice> = s.fault.clone();
    let v = Vhdx::open_on(dev.clone(), "torn", &OpenOptions::default(), None).unwrap();
    let mut r = vec![0u8; 4096];
    v.read_at(0, &mut r).unwrap();
    assert_eq!(tag_of(&r), Some(1));
    v.read_at(3 * MIB, &mut r).unwrap();
    assert!(matches!(tag_of(&r), Some(0) | Some(2)));
    drop(v);
    assert!(check_device(dev, "torn").is_clean());
}
