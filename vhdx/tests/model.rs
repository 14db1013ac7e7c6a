//! A property test: random reads, writes, flushes, discards, write-zeroes, clean reopens,
//! power cuts, online resizes (to sizes that end inside a block too) and compactions against a
//! model of the expected contents, on dynamic and differencing disks.

mod tagmodel;

use std::sync::Arc;

use proptest::prelude::*;
use tagmodel::{fill, tag_of, Model, SECTOR, UNDEFINED};
use vstor_core::{BlockDevice, CutPolicy, FaultDevice, Job, MemoryDevice};
use vstor_vhdx::check::check_device;
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const BLOCKS: u64 = 6;
const SECTORS: u64 = BLOCKS * MIB / SECTOR;

#[derive(Clone, Debug)]
enum Op {
    Write(u64, u64),
    Read(u64, u64),
    Flush,
    Discard(u64, u64),
    Zero(u64, u64),
    Reopen,
    PowerCut(u64),
    /// Resize to the model's size plus this many sectors (never below the data).
    Resize(u64),
    /// Compact (with `--full` when true).
    Compact(bool),
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Mostly small, sometimes a block or more, often near block boundaries.
    (0..SECTORS, prop_oneof![3 => 1u64..64, 1 => 1u64..5000])
        .prop_map(|(s, n)| (s, n.min(SECTORS - s)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => range().prop_map(|(s, n)| Op::Write(s, n)),
        3 => range().prop_map(|(s, n)| Op::Read(s, n)),
        2 => Just(Op::Flush),
        1 => range().prop_map(|(s, n)| Op::Discard(s, n)),
        1 => range().prop_map(|(s, n)| Op::Zero(s, n)),
        1 => Just(Op::Reopen),
        1 => any::<u64>().prop_map(Op::PowerCut),
        1 => prop_oneof![Just(0u64), 1u64..8192].prop_map(Op::Resize),
        1 => any::<bool>().prop_map(Op::Compact),
    ]
}

/// The exact value a sector must read when no power cut intervened.
fn expected(m: &Model, s: u64) -> Option<u32> {
    let v = m
        .since
        .get(&s)
        .and_then(|t| t.last().copied())
        .unwrap_or_else(|| m.durable.get(&s).copied().unwrap_or(0));
    if v == UNDEFINED || (m.undefined.contains(&s) && !m.since.contains_key(&s)) {
        None
    } else {
        Some(v)
    }
}

struct World {
    fault: Arc<FaultDevice>,
    parent: Option<Arc<Vhdx>>,
    disk: Option<Vhdx>,
}

impl World {
    fn new(diff: bool) -> (World, Model) {
        let mut model = Model::default();
        let parent = diff.then(|| {
            let pm: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(MIB).unwrap());
            let p = Vhdx::create_on(
                pm,
                &CreateOptions::dynamic(BLOCKS * MIB).block_size(MIB as u32),
                None,
            )
            .unwrap();
            let mut b = vec![0u8; (3 * MIB) as usize];
            fill(&mut b, 0xFFFF_0001);
            p.write_at(MIB / 2, &b).unwrap();
            p.close().unwrap();
            for s in (MIB / 2) / SECTOR..(MIB / 2 + 3 * MIB) / SECTOR {
                model.durable.insert(s, 0xFFFF_0001);
            }
            Arc::new(p)
        });
        let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(MIB).unwrap());
        let fault = Arc::new(FaultDevice::new(mem));
        fault.set_volatile_cache(true).unwrap();
        let opts = CreateOptions::dynamic(BLOCKS * MIB).block_size(MIB as u32);
        let disk = match &parent {
            Some(p) => Vhdx::create_on(
                fault.clone(),
                &CreateOptions::differencing("p.vhdx"),
                Some((p.clone(), std::path::Path::new("p.vhdx"))),
            )
            .unwrap(),
            None => Vhdx::create_on(fault.clone(), &opts, None).unwrap(),
        };
        disk.flush().unwrap();
        (
            World {
                fault,
                parent,
                disk: Some(disk),
            },
            model,
        )
    }

    fn disk(&self) -> &Vhdx {
        self.disk.as_ref().unwrap()
    }

    fn reopen(&mut self) {
        self.disk = None;
        let dev: Arc<dyn BlockDevice> = self.fault.clone();
        self.disk = Some(
            Vhdx::open_on(dev, "model", &OpenOptions::default(), self.parent.clone()).unwrap(),
        );
    }
}

fn run_ops(diff: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let (mut w, mut m) = World::new(diff);
    for (i, op) in ops.iter().enumerate() {
        let tag = i as u32 + 1;
        match *op {
            Op::Write(s, n) => {
                let mut b = vec![0u8; (n * SECTOR) as usize];
                fill(&mut b, tag);
                w.disk().write_at(s * SECTOR, &b).unwrap();
                m.set(s * SECTOR, n * SECTOR, tag);
            }
            Op::Read(s, n) => {
                let mut b = vec![0u8; (n * SECTOR) as usize];
                w.disk().read_at(s * SECTOR, &mut b).unwrap();
                for (k, sec) in b.chunks_exact(SECTOR as usize).enumerate() {
                    let sn = s + k as u64;
                    if let Some(e) = expected(&m, sn) {
                        prop_assert_eq!(tag_of(sec), Some(e), "op {} sector {}", i, sn);
                    }
                }
            }
            Op::Flush => {
                w.disk().flush().unwrap();
                m.flushed();
            }
            Op::Discard(s, n) => {
                w.disk().discard(s * SECTOR, n * SECTOR).unwrap();
                m.set(s * SECTOR, n * SECTOR, UNDEFINED);
            }
            Op::Zero(s, n) => {
                w.disk().write_zeroes(s * SECTOR, n * SECTOR).unwrap();
                m.set(s * SECTOR, n * SECTOR, 0);
            }
            Op::Reopen => {
                w.reopen();
                m.flushed();
            }
            Op::Resize(extra) => {
                // A resize that changes the size commits what was written before it.
                let r = w
                    .disk()
                    .resize_with(BLOCKS * MIB + extra * SECTOR, &Job::new())
                    .unwrap();
                if r.old_size != r.new_size {
                    m.flushed();
                }
                prop_assert_eq!(w.disk().capacity(), BLOCKS * MIB + extra * SECTOR);
            }
            Op::Compact(full) => {
                w.disk().compact_with(full, &Job::new()).unwrap();
                m.flushed();
            }
            Op::PowerCut(seed) => {
                w.fault
                    .power_cut(CutPolicy::Random { seed, torn: true })
                    .unwrap();
                w.disk = None;
                w.fault.power_on();
                w.reopen();
                let mut b = vec![0u8; (BLOCKS * MIB) as usize];
                w.disk().read_at(0, &mut b).unwrap();
                for (sn, sec) in b.chunks_exact(SECTOR as usize).enumerate() {
                    let sn = sn as u64;
                    let t = tag_of(sec);
                    prop_assert!(
                        t.is_some_and(|t| m.allows(sn, t)),
                        "op {}: sector {} holds {:?} after the cut",
                        i,
                        sn,
                        t
                    );
                    m.settle(sn, t.unwrap());
                }
            }
        }
    }
    w.disk = None;
    let r = check_device(w.fault.clone(), "model");
    prop_assert!(r.is_clean(), "{:?} {:?}", r.errors, r.warnings);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn dynamic_disk_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        run_ops(false, &ops)?;
    }

    #[test]
    fn differencing_disk_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        run_ops(true, &ops)?;
    }
}
