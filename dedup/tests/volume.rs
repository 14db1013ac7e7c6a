//! Inline dedup volumes on the simulated file system: contents against a model under random
//! writes, discards, clones, deletes, flushes, reopens and power cuts (a property test), and a
//! power cut at every write of a run of volume writes and its flush.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use vstor_core::BlockDevice;
use vstor_dedup::vfs::{SimFs, Vfs};
use vstor_dedup::volume::{Volume, VolumeStore, BLOCK};
use vstor_dedup::DedupError;

const DIR: &str = "/vols";
const BLOCKS: u64 = 24;
const SIZE: u64 = BLOCKS * BLOCK;

/// Content of `len` bytes from `seed`: blocks from a small set (so that blocks repeat and
/// dedup), some of them zero.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut r = fastrand::Rng::with_seed(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let kind = r.u8(0..6);
        let n = (len - v.len()).min(BLOCK as usize);
        match kind {
            0 => v.extend(std::iter::repeat_n(0u8, n)),
            1..=3 => {
                // One of 4 shared blocks.
                let k = r.u8(0..4);
                v.extend((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(k)));
            }
            _ => v.extend((0..n).map(|_| r.u8(..))),
        }
    }
    v
}

fn open_store(fs: &Arc<dyn Vfs>) -> Arc<VolumeStore> {
    VolumeStore::open(fs.clone(), Path::new(DIR), true).unwrap()
}

fn read_all(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(0, &mut b).unwrap();
    b
}

fn verify(vs: &VolumeStore, what: &str) {
    let p = vs.verify().unwrap();
    assert!(p.is_empty(), "{what}: {p:?}");
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        vol: usize,
        sector: u64,
        sectors: u64,
        seed: u64,
    },
    Discard {
        vol: usize,
        block: u64,
        blocks: u64,
    },
    /// Write-zeroes of any sectors (parts of blocks are read, zeroed and written).
    Zero {
        vol: usize,
        sector: u64,
        sectors: u64,
    },
    Flush,
    Clone {
        src: usize,
        new: usize,
    },
    Delete(usize),
    Reopen,
    /// Power off with writes not flushed.
    Cut {
        seed: u64,
    },
    /// A flush with power cut at its `at`-th write.
    CutFlush {
        at: u64,
        seed: u64,
    },
}

const NAMES: [&str; 4] = ["gold", "vm1", "vm2", "vm3"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..4usize, 0..(SIZE / 512), 1..24u64, any::<u64>())
            .prop_map(|(vol, sector, sectors, seed)| Op::Write { vol, sector, sectors, seed }),
        2 => (0..4usize, 0..BLOCKS, 1..6u64)
            .prop_map(|(vol, block, blocks)| Op::Discard { vol, block, blocks }),
        1 => (0..4usize, 0..(SIZE / 512), 1..12u64)
            .prop_map(|(vol, sector, sectors)| Op::Zero { vol, sector, sectors }),
        3 => Just(Op::Flush),
        3 => (0..4usize, 0..4usize).prop_map(|(src, new)| Op::Clone { src, new }),
        1 => (0..4usize).prop_map(Op::Delete),
        1 => Just(Op::Reopen),
        2 => any::<u64>().prop_map(|seed| Op::Cut { seed }),
        3 => (1..8u64, any::<u64>()).prop_map(|(at, seed)| Op::CutFlush { at, seed }),
    ]
}

type Model = BTreeMap<&'static str, Vec<u8>>;

struct World {
    sim: SimFs,
    fs: Arc<dyn Vfs>,
    vs: Option<Arc<VolumeStore>>,
    open: BTreeMap<&'static str, Volume>,
    /// What each volume reads as now.
    cur: Model,
    /// What each volume reads as after a power cut (as of the last commit).
    durable: Model,
}

impl World {
    fn vs(&mut self) -> Arc<VolumeStore> {
        if self.vs.is_none() {
            self.vs = Some(open_store(&self.fs));
        }
        self.vs.clone().unwrap()
    }

    fn vol(&mut self, name: &'static str) -> &Volume {
        if !self.open.contains_key(name) {
            let v = self.vs().open_volume(name, false).unwrap();
            self.open.insert(name, v);
        }
        &self.open[name]
    }

    /// Closes a volume (which flushes the store: everything written is committed).
    fn close(&mut self, name: &str) {
        if self.open.remove(name).is_some() {
            self.durable = self.cur.clone();
        }
    }

    fn close_all(&mut self) {
        let had = !self.open.is_empty();
        self.open.clear();
        if had || self.vs.is_some() {
            self.vs = None;
            self.durable = self.cur.clone();
        }
    }

    /// Drops every handle with the power off, powers on, and reopens.
    fn power_cycle(&mut self) {
        assert!(self.sim.is_off());
        self.open.clear();
        self.vs = None;
        self.sim.power_on();
    }

    fn check(&mut self, step: usize) {
        let names: Vec<&'static str> = self.cur.keys().copied().collect();
        for n in names {
            let want = self.cur[n].clone();
            let got = read_all(self.vol(n));
            assert!(
                got == want,
                "step {step}: volume {n} differs from the model"
            );
        }
        let vs = self.vs();
        let listed: Vec<String> = vs.list().unwrap().into_iter().map(|v| v.name).collect();
        let want: Vec<String> = self.cur.keys().map(|s| s.to_string()).collect();
        assert_eq!(listed, want, "step {step}");
        verify(&vs, &format!("step {step}"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn volumes_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let sim = SimFs::new();
        let fs: Arc<dyn Vfs> = Arc::new(sim.clone());
        VolumeStore::create(fs.clone(), Path::new(DIR)).unwrap();
        let mut w = World {
            sim,
            fs,
            vs: None,
            open: BTreeMap::new(),
            cur: Model::new(),
            durable: Model::new(),
        };
        w.vs().create_volume("gold", SIZE).unwrap();
        w.cur.insert("gold", vec![0; SIZE as usize]);
        w.durable = w.cur.clone();
        for (step, op) in ops.iter().enumerate() {
            match op.clone() {
                Op::Write { vol, sector, sectors, seed } => {
                    let name = NAMES[vol];
                    let (off, len) = (sector * 512, sectors * 512);
                    if !w.cur.contains_key(name) || off + len > SIZE {
                        continue;
                    }
                    let d = content(len as usize, seed);
                    w.vol(name).write_at(off, &d).unwrap();
                    w.cur.get_mut(name).unwrap()[off as usize..(off + len) as usize]
                        .copy_from_slice(&d);
                }
                Op::Discard { vol, block, blocks } | Op::Zero { vol, sector: block, sectors: blocks } => {
                    let name = NAMES[vol];
                    let unit = if matches!(op, Op::Discard { .. }) { BLOCK } else { 512 };
                    let (off, len) = (block * unit, blocks * unit);
                    if !w.cur.contains_key(name) || off + len > SIZE {
                        continue;
                    }
                    if unit == BLOCK {
                        w.vol(name).discard(off, len).unwrap();
                    } else {
                        w.vol(name).write_zeroes(off, len).unwrap();
                    }
                    w.cur.get_mut(name).unwrap()[off as usize..(off + len) as usize].fill(0);
                }
                Op::Flush => {
                    w.vs().flush().unwrap();
                    w.durable = w.cur.clone();
                }
                Op::Clone { src, new } => {
                    let (s, n) = (NAMES[src], NAMES[new]);
                    w.close(s);
                    let vs = w.vs();
                    let r = vs.clone_volume(s, n);
                    match (w.cur.contains_key(s), w.cur.contains_key(n)) {
                        (true, false) => {
                            r.unwrap();
                            let c = w.cur[s].clone();
                            w.cur.insert(n, c);
                            w.durable = w.cur.clone();
                        }
                        (false, _) => prop_assert!(matches!(r, Err(DedupError::Missing(_))), "{r:?}"),
                        (true, true) => prop_assert!(matches!(r, Err(DedupError::Invalid(_))), "{r:?}"),
                    }
                }
                Op::Delete(i) => {
                    let n = NAMES[i];
                    w.close(n);
                    let r = w.vs().delete_volume(n);
                    if w.cur.remove(n).is_some() {
                        r.unwrap();
                        w.durable = w.cur.clone();
                    } else {
                        prop_assert!(matches!(r, Err(DedupError::Missing(_))), "{r:?}");
                    }
                }
                Op::Reopen => w.close_all(),
                Op::Cut { seed } => {
                    w.sim.cut_now(seed);
                    w.power_cycle();
                    w.cur = w.durable.clone();
                }
                Op::CutFlush { at, seed } => {
                    w.vs();
                    w.sim.arm_cut(at, seed);
                    let r = w.vs().flush();
                    if w.sim.is_off() {
                        prop_assert!(r.is_err());
                        w.power_cycle();
                        // The flush committed, or it did not: every volume is as it was at one
                        // of the two.
                        let names: Vec<&'static str> = w.cur.keys().copied().collect();
                        let mut after = true;
                        let mut before = true;
                        for n in names {
                            let got = read_all(w.vol(n));
                            after &= got == w.cur[n];
                            before &= got == w.durable[n];
                        }
                        prop_assert!(after || before, "step {step}: neither before nor after the flush");
                        if !after {
                            w.cur = w.durable.clone();
                        }
                        w.durable = w.cur.clone();
                    } else {
                        r.unwrap();
                        // The flush wrote less than `at`: cut power now, nothing pending.
                        w.durable = w.cur.clone();
                        w.sim.cut_now(seed);
                        w.power_cycle();
                    }
                }
            }
            w.check(step);
        }
    }
}

/// A store with `gold` (written and flushed) and its clone `vm`, and the contents of both.
fn setup() -> (SimFs, Arc<dyn Vfs>, Model) {
    let sim = SimFs::new();
    let fs: Arc<dyn Vfs> = Arc::new(sim.clone());
    VolumeStore::create(fs.clone(), Path::new(DIR)).unwrap();
    let vs = open_store(&fs);
    vs.create_volume("gold", SIZE).unwrap();
    let g = content(SIZE as usize, 7);
    {
        let v = vs.open_volume("gold", false).unwrap();
        v.write_at(0, &g).unwrap();
        v.flush().unwrap();
    }
    vs.clone_volume("gold", "vm").unwrap();
    let mut m = Model::new();
    m.insert("gold", g.clone());
    m.insert("vm", g);
    (sim, fs, m)
}

/// The writes of the crash test: new blocks, duplicates of blocks of gold, zeroes, parts of
/// blocks, a discard, on both volumes.
fn workload(vs: &Arc<VolumeStore>, m: &mut Model) -> vstor_dedup::Result<()> {
    let gold = vs.open_volume("gold", false)?;
    let vm = vs.open_volume("vm", false)?;
    let dup = m["gold"][4 * BLOCK as usize..6 * BLOCK as usize].to_vec();
    let mut w = |v: &Volume, name: &'static str, off: u64, d: &[u8]| -> vstor_dedup::Result<()> {
        v.write(off, d)?;
        m.get_mut(name).unwrap()[off as usize..off as usize + d.len()].copy_from_slice(d);
        Ok(())
    };
    w(&vm, "vm", 0, &content(3 * BLOCK as usize, 100))?;
    w(&vm, "vm", 10 * BLOCK, &dup)?;
    w(&gold, "gold", 12 * BLOCK + 1024, &content(5000, 101))?;
    w(&vm, "vm", 3 * BLOCK, &vec![0u8; 2 * BLOCK as usize])?;
    w(&gold, "gold", 20 * BLOCK, &content(BLOCK as usize, 100))?;
    vm.zero(16 * BLOCK, 2 * BLOCK)?;
    m.get_mut("vm").unwrap()[16 * BLOCK as usize..18 * BLOCK as usize].fill(0);
    vs.flush()
}

#[test]
fn power_cut_at_every_write_of_volume_writes_and_flush_loses_nothing_flushed() {
    let mut n = 1;
    loop {
        let (sim, fs, before) = setup();
        let mut after = before.clone();
        let vs = open_store(&fs);
        sim.arm_cut(n, n * 7919);
        let r = workload(&vs, &mut after);
        if !sim.is_off() {
            r.unwrap();
            assert!(n > 5, "the workload writes only {n} times");
            break;
        }
        drop(vs);
        sim.power_on();
        let vs = open_store(&fs);
        let mut state = None;
        for (name, want) in &before {
            let got = read_all(&vs.open_volume(name, true).unwrap());
            let s = if got == *want {
                "before"
            } else if got == after[name] {
                "after"
            } else {
                panic!("cut at write {n}: volume {name} is neither as before nor as after");
            };
            assert!(
                state.is_none_or(|x| x == s),
                "cut at write {n}: volumes disagree"
            );
            state = Some(s);
        }
        verify(&vs, &format!("cut at write {n}"));
        // The store goes on: more writes after the cut land and survive a reopen.
        let extra = content(2 * BLOCK as usize, 555 + n);
        {
            let v = vs.open_volume("vm", false).unwrap();
            v.write_at(5 * BLOCK, &extra).unwrap();
            v.flush().unwrap();
        }
        drop(vs);
        let vs = open_store(&fs);
        let got = read_all(&vs.open_volume("vm", true).unwrap());
        assert_eq!(&got[5 * BLOCK as usize..7 * BLOCK as usize], &extra[..]);
        verify(&vs, &format!("after the cut at write {n}"));
        n += 1;
    }
}

#[test]
fn identical_blocks_are_stored_once_and_zero_blocks_never() {
    let sim = SimFs::new();
    let fs: Arc<dyn Vfs> = Arc::new(sim);
    VolumeStore::create(fs.clone(), Path::new(DIR)).unwrap();
    let vs = open_store(&fs);
    vs.create_volume("a", SIZE).unwrap();
    vs.create_volume("b", SIZE).unwrap();
    let a = vs.open_volume("a", false).unwrap();
    let b = vs.open_volume("b", false).unwrap();
    let blk = content(BLOCK as usize, 5);
    // Two threads write the same new content to two volumes at once.
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..BLOCKS {
                a.write_at(i * BLOCK, &blk).unwrap();
            }
        });
        s.spawn(|| {
            for i in 0..BLOCKS {
                b.write_at(i * BLOCK, &blk).unwrap();
            }
        });
    });
    b.write_at(0, &vec![0u8; BLOCK as usize]).unwrap();
    a.flush().unwrap();
    let st = vs.store().stats().unwrap();
    assert_eq!(
        st.chunks,
        1,
        "one chunk for {} identical blocks",
        2 * BLOCKS
    );
    let c = &vs.store().chunks().unwrap()[0];
    assert_eq!(c.refs, 2 * BLOCKS - 1, "the zero block holds no reference");
    // Discarding every block drops every reference: the chunk leaves the index.
    a.discard(0, SIZE).unwrap();
    b.discard(0, SIZE).unwrap();
    a.flush().unwrap();
    assert_eq!(vs.store().stats().unwrap().chunks, 0);
    verify(&vs, "after discards");
    assert!(read_all(&a).iter().all(|&x| x == 0));
}

#[test]
fn clones_are_instant_and_share_until_written() {
    let sim = SimFs::new();
    let fs: Arc<dyn Vfs> = Arc::new(sim.clone());
    VolumeStore::create(fs.clone(), Path::new(DIR)).unwrap();
    let vs = open_store(&fs);
    vs.create_volume("gold", SIZE).unwrap();
    let g: Vec<u8> = (0..SIZE).map(|i| (i / 7) as u8 ^ (i >> 12) as u8).collect();
    {
        let v = vs.open_volume("gold", false).unwrap();
        v.write_at(0, &g).unwrap();
    }
    let chunks = vs.store().stats().unwrap().chunks;
    // Ten clones: each one index transaction, no block copied, no chunk added.
    for i in 0..10 {
        let before = sim.writes();
        vs.clone_volume("gold", &format!("vm{i}")).unwrap();
        assert!(
            sim.writes() - before < 40,
            "a clone wrote {} times",
            sim.writes() - before
        );
    }
    assert_eq!(vs.store().stats().unwrap().chunks, chunks);
    let list = vs.list().unwrap();
    assert_eq!(list.len(), 11);
    for v in &list {
        assert_eq!(v.mapped, SIZE, "{v:?}");
        if v.name != "gold" {
            assert_eq!((v.written, v.origin.as_str()), (0, "gold"), "{v:?}");
        }
    }
    let vm3 = vs.open_volume("vm3", false).unwrap();
    vm3.write_at(BLOCK, &content(BLOCK as usize, 9)).unwrap();
    vm3.discard(2 * BLOCK, BLOCK).unwrap();
    drop(vm3);
    let mut want = g.clone();
    want[BLOCK as usize..2 * BLOCK as usize].copy_from_slice(&content(BLOCK as usize, 9));
    want[2 * BLOCK as usize..3 * BLOCK as usize].fill(0);
    assert!(read_all(&vs.open_volume("vm3", true).unwrap()) == want);
    assert!(read_all(&vs.open_volume("vm4", true).unwrap()) == g);
    assert!(read_all(&vs.open_volume("gold", true).unwrap()) == g);
    // A clone of a clone, then deleting the gold image and every clone but that one.
    vs.clone_volume("vm3", "vm3b").unwrap();
    vs.delete_volume("gold").unwrap();
    for i in 0..10 {
        vs.delete_volume(&format!("vm{i}")).unwrap();
    }
    verify(&vs, "after deletes");
    assert!(read_all(&vs.open_volume("vm3b", true).unwrap()) == want);
    vs.delete_volume("vm3b").unwrap();
    assert_eq!(vs.store().stats().unwrap().chunks, 0);
    verify(&vs, "empty");
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let sim = SimFs::new();
    let fs: Arc<dyn Vfs> = Arc::new(sim.clone());
    let err = VolumeStore::open(fs.clone(), Path::new(DIR), true).unwrap_err();
    assert!(err.to_string().contains("not a dedup store"), "{err}");
    VolumeStore::create(fs.clone(), Path::new(DIR)).unwrap();
    let e = VolumeStore::create(fs.clone(), Path::new(DIR)).unwrap_err();
    assert!(e.to_string().contains("already holds"), "{e}");
    let vs = open_store(&fs);
    for size in [0, 1000, BLOCK + 512, 65 << 40, u64::MAX] {
        let e = vs.create_volume("v", size).unwrap_err();
        assert!(e.to_string().contains("multiple of 4 KiB"), "{size}: {e}");
    }
    for name in ["", ".x", "a/b", "a b", &"n".repeat(200)] {
        let e = vs.create_volume(name, SIZE).unwrap_err();
        assert!(
            e.to_string().contains("is not a volume name"),
            "{name}: {e}"
        );
    }
    vs.create_volume("v", SIZE).unwrap();
    let e = vs.create_volume("v", SIZE).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let e = vs.open_volume("nope", false).unwrap_err();
    assert!(e.to_string().contains("no volume nope"), "{e}");
    let w = vs.open_volume("v", false).unwrap();
    let e = vs.open_volume("v", true).unwrap_err();
    assert!(e.to_string().contains("already open"), "{e}");
    let e = vs.clone_volume("v", "c").unwrap_err();
    assert!(e.to_string().contains("is open"), "{e}");
    drop(w);
    // A second opener of the store (another process) is refused.
    let e = VolumeStore::open(fs.clone(), Path::new(DIR), true).unwrap_err();
    assert!(e.to_string().contains("in use by another process"), "{e}");
    drop(vs);
    // The index of another store is refused by its id.
    let other = Path::new("/other");
    VolumeStore::create(fs.clone(), other).unwrap();
    let theirs = sim.read_all(&other.join("index.redb")).unwrap();
    sim.write_all(&Path::new(DIR).join("index.redb"), &theirs);
    let e = VolumeStore::open(fs.clone(), Path::new(DIR), true).unwrap_err();
    assert!(e.to_string().contains("belongs to store"), "{e}");
    // A library's chunk store is not a store of volumes.
    let lib = Path::new("/lib");
    fs.create_dir_all(lib).unwrap();
    vstor_dedup::library::Library::enable(fs.clone(), lib, Default::default()).unwrap();
    let e = VolumeStore::open(fs.clone(), &lib.join(".vstor-dedup"), true).unwrap_err();
    assert!(e.to_string().contains("not a store of volumes"), "{e}");
}
