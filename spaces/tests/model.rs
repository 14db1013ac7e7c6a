//! Property test: random I/O (single requests and mixed batches, at 512-byte granularity),
//! random member failures within the redundancy, and reopens (with a member missing or not),
//! against a plain in-memory model of the space.

mod common;

use common::*;
use proptest::prelude::*;
use std::sync::Arc;
use vstor_core::{BlockDevice, Request};
use vstor_spaces::{MemberState, Pool};

const SIZE: u64 = 4 << 20;
const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
enum Step {
    Write { at: u64, len: u64, seed: u64 },
    Read { at: u64, len: u64 },
    Zero { at: u64, len: u64, discard: bool },
    Batch(Vec<(u64, u64, u64, bool)>),
    Flush,
    Fail(usize),
    Reopen { missing: Option<usize> },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE / SECTOR, 1..160u64).prop_map(|(s, n)| {
        let n = n.min(SIZE / SECTOR - s);
        (s * SECTOR, n * SECTOR)
    })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (range(), any::<u64>()).prop_map(|((at, len), seed)| Step::Write { at, len, seed }),
        3 => range().prop_map(|(at, len)| Step::Read { at, len }),
        1 => (range(), any::<bool>(), any::<bool>()).prop_map(|((at, len), big, discard)| {
            // Sometimes a large range that crosses extents, some of them never written.
            let len = if big { (SIZE - at).min(len * 64) } else { len };
            Step::Zero { at, len, discard }
        }),
        2 => proptest::collection::vec((range(), any::<u64>(), any::<bool>()), 1..8)
            .prop_map(|v| Step::Batch(v.into_iter().map(|((a, l), s, w)| (a, l, s, w)).collect())),
        1 => Just(Step::Flush),
        1 => (0..8usize).prop_map(Step::Fail),
        1 => proptest::option::of(0..8usize).prop_map(|missing| Step::Reopen { missing }),
    ]
}

fn lost(pool: &Pool) -> Vec<usize> {
    pool.info()
        .members
        .iter()
        .filter(|m| !m.usable)
        .map(|m| m.index)
        .collect()
}

fn run(layout: usize, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let (label, res, cols, _) = layouts()[layout];
    let width = match res {
        vstor_spaces::Resiliency::Mirror { copies } => cols * usize::from(copies),
        _ => cols,
    };
    let n = width + 2;
    let devs = mem_disks(n, 16 << 20);
    let mut pool = create(&devs);
    pool.create_space(&spec("s", SIZE, res, Some(cols)))
        .unwrap();
    let mut space = pool.open_space("s").unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let t = res.tolerates();
    for step in steps {
        match step {
            Step::Write { at, len, seed } => {
                let data = pattern(seed, len as usize);
                space.write_at(at, &data).unwrap();
                model[at as usize..(at + len) as usize].copy_from_slice(&data);
            }
            Step::Zero { at, len, discard } => {
                if discard {
                    space.discard(at, len).unwrap();
                } else {
                    space.write_zeroes(at, len).unwrap();
                }
                model[at as usize..(at + len) as usize].fill(0);
            }
            Step::Read { at, len } => {
                let mut back = vec![0u8; len as usize];
                space.read_at(at, &mut back).unwrap();
                prop_assert!(
                    back[..] == model[at as usize..(at + len) as usize],
                    "{label}: read {at}+{len} differs"
                );
            }
            Step::Batch(items) => {
                // Writes of one batch do not overlap each other or its reads (that is
                // unspecified); drop the items that would.
                let mut taken: Vec<(u64, u64)> = Vec::new();
                let items: Vec<_> = items
                    .into_iter()
                    .filter(|&(a, l, _, _)| {
                        let free = taken.iter().all(|&(b, m)| a + l <= b || b + m <= a);
                        if free {
                            taken.push((a, l));
                        }
                        free
                    })
                    .collect();
                let datas: Vec<Vec<u8>> = items
                    .iter()
                    .map(|&(_, l, s, w)| {
                        if w {
                            pattern(s, l as usize)
                        } else {
                            vec![0; l as usize]
                        }
                    })
                    .collect();
                let mut reads: Vec<Vec<u8>> = items
                    .iter()
                    .map(|&(_, l, _, _)| vec![0; l as usize])
                    .collect();
                {
                    let mut rd = reads.iter_mut();
                    let mut batch: Vec<Request> = items
                        .iter()
                        .zip(&datas)
                        .map(|(&(a, _, _, w), d)| {
                            let r = rd.next().unwrap();
                            if w {
                                Request::write(a, d)
                            } else {
                                Request::read(a, r)
                            }
                        })
                        .collect();
                    space.submit_all(&mut batch).unwrap();
                }
                for ((&(a, l, _, w), d), r) in items.iter().zip(&datas).zip(&reads) {
                    if w {
                        model[a as usize..(a + l) as usize].copy_from_slice(d);
                    } else {
                        prop_assert!(
                            r[..] == model[a as usize..(a + l) as usize],
                            "{label}: batch read {a}+{l}"
                        );
                    }
                }
            }
            Step::Flush => space.flush().unwrap(),
            Step::Fail(m) => {
                let m = m % n;
                let l = lost(&pool);
                if l.len() < t && !l.contains(&m) {
                    pool.fail_member(m).unwrap();
                }
            }
            Step::Reopen { missing } => {
                space.flush().unwrap();
                drop(space);
                let l = lost(&pool);
                let failed: Vec<usize> = pool
                    .info()
                    .members
                    .iter()
                    .filter(|m| m.state == MemberState::Failed)
                    .map(|m| m.index)
                    .collect();
                drop(pool);
                let skip: Vec<usize> = match missing {
                    Some(m) if l.len() < t && !l.contains(&(m % n)) => vec![m % n],
                    _ => vec![],
                };
                pool = open(&devs, &skip, false);
                let info = pool.info();
                for &f in &failed {
                    // A member recorded failed is never trusted again, unless the open caught
                    // it up from the write-intent bitmaps (the reads below check its data).
                    let caught_up = info
                        .notes
                        .iter()
                        .any(|n| n.starts_with(&format!("member {f} ")) && n.contains("caught up"));
                    prop_assert!(
                        info.members[f].state == MemberState::Failed
                            || skip.contains(&f)
                            || caught_up,
                        "{label}: member {f} came back trusted: {:?}",
                        info.notes
                    );
                }
                space = pool.open_space("s").unwrap();
            }
        }
    }
    let mut back = vec![0u8; SIZE as usize];
    space.read_at(0, &mut back).unwrap();
    prop_assert!(back == model, "{label}: final contents differ");
    // And after a reopen with every disk present.
    drop(space);
    drop(pool);
    let pool = open(&devs, &[], true);
    let space: Arc<dyn BlockDevice> = Arc::new(pool.open_space("s").unwrap());
    space.read_at(0, &mut back).unwrap();
    prop_assert!(back == model, "{label}: contents differ after reopen");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn space_matches_model(layout in 0..5usize, steps in proptest::collection::vec(step(), 1..30)) {
        run(layout, steps)?;
    }
}
