//! Property test: the files of a library against a model (their bytes), under random writes
//! (to plain files and to optimized ones, flushed), optimize, unoptimize, GC, scrub, reopen and
//! power cuts in the middle of jobs. After every step every file reads as the model says and
//! the index is consistent (refcounts equal the references the streams hold).

use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vstor_dedup::chunk::ChunkParams;
use vstor_dedup::library::Library;
use vstor_dedup::store::StoreConfig;
use vstor_dedup::stub::{file_is_stub, StubImage};
use vstor_dedup::vfs::{OpenMode, SimFs, Vfs};

const ROOT: &str = "/m";
const NAMES: [&str; 3] = ["a.img", "b.img", "c.img"];

#[derive(Debug, Clone)]
enum Op {
    Write {
        file: usize,
        sector: u64,
        sectors: u64,
        seed: u64,
    },
    Optimize,
    Unoptimize(usize),
    Gc,
    Scrub,
    Reopen,
    CutOptimize {
        at: u64,
        seed: u64,
    },
    CutGc {
        at: u64,
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..300u64, 1..64u64, any::<u64>()).prop_map(|(file, sector, sectors, seed)| {
            Op::Write { file, sector, sectors, seed }
        }),
        2 => Just(Op::Optimize),
        1 => (0..3usize).prop_map(Op::Unoptimize),
        1 => Just(Op::Gc),
        1 => Just(Op::Scrub),
        1 => Just(Op::Reopen),
        2 => (1..80u64, any::<u64>()).prop_map(|(at, seed)| Op::CutOptimize { at, seed }),
        1 => (1..40u64, any::<u64>()).prop_map(|(at, seed)| Op::CutGc { at, seed }),
    ]
}

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = fastrand::Rng::with_seed(seed);
    let b = r.u8(..);
    (0..n)
        .map(|i| if i % 1024 < 512 { b } else { r.u8(..) })
        .collect()
}

fn path(i: usize) -> PathBuf {
    Path::new(ROOT).join(NAMES[i])
}

fn read(fs: &Arc<dyn Vfs>, i: usize) -> Vec<u8> {
    if file_is_stub(&**fs, &path(i)) {
        let s = StubImage::open(fs.clone(), &path(i), false).unwrap();
        let mut b = vec![0; s.size() as usize];
        s.read(0, &mut b).unwrap();
        b
    } else {
        let f = fs.open(&path(i), OpenMode::Read).unwrap();
        let mut b = vec![0; f.len().unwrap() as usize];
        f.read_at(0, &mut b).unwrap();
        b
    }
}

fn check(fs: &Arc<dyn Vfs>, model: &[Vec<u8>], step: usize) {
    for (i, m) in model.iter().enumerate() {
        assert!(read(fs, i) == *m, "step {step}: {} differs", NAMES[i]);
    }
    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
    lib.recover().unwrap();
    let p = lib.store().verify_index().unwrap();
    assert!(p.is_empty(), "step {step}: {p:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn library_matches_the_model(ops in proptest::collection::vec(op(), 1..24)) {
        let sim = SimFs::new();
        sim.create_dir_all(Path::new(ROOT)).unwrap();
        let base = bytes(160 * 1024, 1);
        let mut model: Vec<Vec<u8>> = Vec::new();
        for (i, _) in NAMES.iter().enumerate() {
            let mut d = base.clone();
            d[i * 20_000..i * 20_000 + 8192].copy_from_slice(&bytes(8192, 10 + i as u64));
            let f = sim.open(&path(i), OpenMode::Create).unwrap();
            f.write_at(0, &d).unwrap();
            f.sync().unwrap();
            model.push(d);
        }
        let fs: Arc<dyn Vfs> = Arc::new(sim.clone());
        let cfg = StoreConfig {
            params: ChunkParams { min: 2048, avg: 8192, max: 32768 },
            compress: true,
            seal_size: 64 << 10,
            hotspot_refs: 2,
        };
        Library::enable(fs.clone(), Path::new(ROOT), cfg).unwrap();
        for (step, op) in ops.iter().enumerate() {
            match op {
                Op::Write { file, sector, sectors, seed } => {
                    let (off, len) = (sector * 512, (sectors * 512) as usize);
                    let size = model[*file].len() as u64;
                    if off + len as u64 > size {
                        continue;
                    }
                    let d = bytes(len, *seed);
                    if file_is_stub(&*fs, &path(*file)) {
                        let s = StubImage::open(fs.clone(), &path(*file), true).unwrap();
                        s.write(off, &d).unwrap();
                        s.flush().unwrap();
                    } else {
                        let f = fs.open(&path(*file), OpenMode::Write).unwrap();
                        f.write_at(off, &d).unwrap();
                        f.sync().unwrap();
                    }
                    model[*file][off as usize..off as usize + len].copy_from_slice(&d);
                }
                Op::Optimize => {
                    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
                    lib.optimize(None, None, &mut |_, _, _| {}).unwrap();
                }
                Op::Unoptimize(i) => {
                    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
                    if file_is_stub(&*fs, &path(*i)) {
                        lib.unoptimize(Some(NAMES[*i]), &mut |_, _, _| {}).unwrap();
                    }
                }
                Op::Gc => {
                    Library::open(fs.clone(), Path::new(ROOT)).unwrap().gc().unwrap();
                }
                Op::Scrub => {
                    let (r, missing) = Library::open(fs.clone(), Path::new(ROOT))
                        .unwrap()
                        .scrub()
                        .unwrap();
                    prop_assert!(r.bad.is_empty() && missing.is_empty(), "{r:?} {missing:?}");
                }
                Op::Reopen => {}
                Op::CutOptimize { at, seed } | Op::CutGc { at, seed } => {
                    sim.arm_cut(*at, *seed);
                    let _ = Library::open(fs.clone(), Path::new(ROOT)).and_then(|lib| {
                        if matches!(op, Op::CutGc { .. }) {
                            lib.gc().map(|_| ())
                        } else {
                            lib.optimize(None, None, &mut |_, _, _| {}).map(|_| ())
                        }
                    });
                    // A job shorter than the cut point ends before it: power goes off at a
                    // later write of whatever comes next, so cut now instead.
                    if !sim.is_off() {
                        sim.cut_now(*seed);
                    }
                    sim.power_on();
                }
            }
            check(&fs, &model, step);
        }
    }
}
