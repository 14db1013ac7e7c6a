//! Crash, corruption and bad-input tests of the chunk store and library jobs, on the
//! simulated file system (power cut at every write of a job).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vstor_dedup::chunk::ChunkParams;
use vstor_dedup::library::{FileState, Library};
use vstor_dedup::store::{container_path, StoreConfig};
use vstor_dedup::vfs::{OpenMode, SimFs, Vfs};
use vstor_dedup::DedupError;

const ROOT: &str = "/lib";

fn cfg(hot: u64) -> StoreConfig {
    StoreConfig {
        params: ChunkParams {
            min: 2048,
            avg: 8192,
            max: 32768,
        },
        compress: true,
        seal_size: 96 << 10,
        hotspot_refs: hot,
    }
}

fn rand_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = fastrand::Rng::with_seed(seed);
    // Compressible-ish: runs of random bytes and of repeated ones.
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        if r.bool() {
            v.extend((0..r.usize(1..4000)).map(|_| r.u8(..)));
        } else {
            let b = r.u8(..);
            v.extend(std::iter::repeat_n(b, r.usize(1..4000)));
        }
    }
    v.truncate(n);
    v
}

/// Files sharing content: a base, a copy with an insertion, a copy with a changed middle.
fn library_files() -> BTreeMap<String, Vec<u8>> {
    let base = rand_bytes(300_000, 1);
    let mut a = base.clone();
    a.splice(1000..1000, rand_bytes(5000, 2));
    let mut b = base.clone();
    b[150_000..160_000].copy_from_slice(&rand_bytes(10_000, 3));
    let mut m = BTreeMap::new();
    m.insert("base.img".to_string(), base);
    m.insert("a.img".to_string(), a);
    m.insert("sub/b.img".to_string(), b);
    m.insert("other.img".to_string(), rand_bytes(200_000, 4));
    m
}

fn setup(files: &BTreeMap<String, Vec<u8>>, hot: u64) -> (SimFs, Arc<dyn Vfs>) {
    let sim = SimFs::new();
    let root = Path::new(ROOT);
    sim.create_dir_all(&root.join("sub")).unwrap();
    for (n, d) in files {
        let f = sim.open(&root.join(n), OpenMode::Create).unwrap();
        f.write_at(0, d).unwrap();
        f.sync().unwrap();
    }
    let fs: Arc<dyn Vfs> = Arc::new(sim.clone());
    Library::enable(fs.clone(), root, cfg(hot)).unwrap();
    (sim, fs)
}

/// Reads a library file's content, through its stub if it has one.
fn content(fs: &Arc<dyn Vfs>, lib: &Library, name: &str) -> Vec<u8> {
    let p = PathBuf::from(ROOT).join(name);
    if vstor_dedup::stub::file_is_stub(&**fs, &p) {
        let s = lib.open_stub(name, false).unwrap();
        let mut b = vec![0; s.size() as usize];
        s.read(0, &mut b).unwrap();
        b
    } else {
        let f = fs.open(&p, OpenMode::Read).unwrap();
        let mut b = vec![0; f.len().unwrap() as usize];
        f.read_at(0, &mut b).unwrap();
        b
    }
}

fn check_all(fs: &Arc<dyn Vfs>, files: &BTreeMap<String, Vec<u8>>, when: &str) -> Library {
    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
    lib.recover().unwrap();
    for (n, d) in files {
        assert!(content(fs, &lib, n) == *d, "{when}: {n} reads differently");
    }
    let problems = lib.store().verify_index().unwrap();
    assert!(problems.is_empty(), "{when}: {problems:?}");
    lib
}

fn optimize(lib: &Library) -> Result<vstor_dedup::library::OptimizeReport, DedupError> {
    lib.optimize(None, None, &mut |_, _, _| {})
}

#[test]
fn optimize_round_trip_dedups_and_reads_back() {
    let files = library_files();
    let (_sim, fs) = setup(&files, 2);
    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
    let rep = optimize(&lib).unwrap();
    assert_eq!(rep.optimized.len(), 4);
    let st = lib.stats().unwrap();
    let logical: u64 = files.values().map(|d| d.len() as u64).sum();
    assert_eq!(st.logical_bytes, logical);
    // Three files share most of their content: far less than the logical bytes are stored.
    assert!(
        st.chunk_bytes < logical * 6 / 10,
        "{} of {logical}",
        st.chunk_bytes
    );
    assert!(
        st.hot_chunks > 0,
        "chunks used by 3 files get hotspot copies"
    );
    for (n, d) in &files {
        assert_eq!(content(&fs, &lib, n), *d, "{n}");
    }
    // Resumable: a second run finds nothing to do.
    let again = optimize(&lib).unwrap();
    assert_eq!((again.optimized.len(), again.already), (0, 4));
    let (scrub, missing) = lib.scrub().unwrap();
    assert!(scrub.bad.is_empty() && scrub.repaired.is_empty() && missing.is_empty());
    // Unoptimize puts the bytes back as plain files; GC then frees the chunks.
    lib.unoptimize(None, &mut |_, _, _| {}).unwrap();
    for f in lib.files().unwrap() {
        assert_eq!(f.state, FileState::Plain, "{}", f.name);
    }
    for (n, d) in &files {
        assert_eq!(content(&fs, &lib, n), *d, "{n}");
    }
    let (gc, _) = lib.gc().unwrap();
    assert!(gc.chunks_dropped > 0);
    assert_eq!(lib.stats().unwrap().chunks, 0);
}

#[test]
fn files_open_elsewhere_are_skipped() {
    let files = library_files();
    let (sim, fs) = setup(&files, 0);
    sim.set_held(&Path::new(ROOT).join("a.img"), true);
    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
    let rep = optimize(&lib).unwrap();
    assert_eq!(rep.in_use, vec!["a.img".to_string()]);
    assert_eq!(rep.optimized.len(), 3);
    // A second job on the same library is refused while this one holds it.
    let e = Library::open(fs.clone(), Path::new(ROOT)).unwrap_err();
    assert!(matches!(e, DedupError::InUse(_)), "{e}");
}

/// Runs `job` once to count its writes, then again from the same start with a power cut at
/// every one of them; after each cut the library must read exactly as before (or after) and
/// the index must be consistent; a rerun of the job must then finish.
fn cut_everywhere(
    prepare: impl Fn() -> (SimFs, Arc<dyn Vfs>, BTreeMap<String, Vec<u8>>),
    job: impl Fn(&Library) -> Result<(), DedupError>,
    name: &str,
) -> u64 {
    let (sim, fs, files) = prepare();
    let w0 = sim.writes();
    {
        let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
        job(&lib).unwrap();
    }
    let total = sim.writes() - w0;
    assert!(total > 10, "{name}: only {total} writes");
    for n in 1..=total {
        let (sim, fs, files2) = prepare();
        assert_eq!(files, files2);
        sim.arm_cut(n, n * 7919);
        // The last writes are redb's at close, after the job returned.
        let _ = Library::open(fs.clone(), Path::new(ROOT)).and_then(|lib| job(&lib));
        assert!(sim.is_off(), "{name}: no cut at write {n} of {total}");
        sim.power_on();
        let lib = check_all(&fs, &files, &format!("{name}: after a cut at write {n}"));
        job(&lib).unwrap_or_else(|e| panic!("{name}: rerun after cut {n}: {e}"));
        drop(lib);
        let lib = check_all(&fs, &files, &format!("{name}: rerun after cut {n}"));
        let (scrub, missing) = lib.scrub().unwrap();
        assert!(
            scrub.bad.is_empty() && missing.is_empty(),
            "{name}: cut {n}: {scrub:?} {missing:?}"
        );
    }
    total
}

#[test]
fn power_cut_at_every_write_of_optimize() {
    let prepare = || {
        let files = library_files();
        let (sim, fs) = setup(&files, 2);
        // One file optimized already and written to since (re-optimized by the job).
        {
            let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
            lib.optimize(Some("base.img"), None, &mut |_, _, _| {})
                .unwrap();
        }
        let mut files = files;
        let stub =
            vstor_dedup::stub::StubImage::open(fs.clone(), &Path::new(ROOT).join("base.img"), true)
                .unwrap();
        let patch = rand_bytes(4096, 9);
        stub.write(8192, &patch).unwrap();
        stub.flush().unwrap();
        files.get_mut("base.img").unwrap()[8192..8192 + 4096].copy_from_slice(&patch);
        (sim, fs, files)
    };
    let n = cut_everywhere(prepare, |lib| optimize(lib).map(|_| ()), "optimize");
    eprintln!("optimize: cut at each of {n} writes");
}

#[test]
fn power_cut_at_every_write_of_gc_compaction() {
    let prepare = || {
        let files = library_files();
        let (sim, fs) = setup(&files, 0);
        let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
        optimize(&lib).unwrap();
        // other.img back to plain: its chunks die, its containers become garbage; a, b and
        // base keep theirs.
        lib.unoptimize(Some("other.img"), &mut |_, _, _| {})
            .unwrap();
        (sim, fs, files)
    };
    {
        let (_sim, fs, _) = prepare();
        let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
        let (rep, _) = lib.gc().unwrap();
        assert!(rep.chunks_dropped > 0, "{rep:?}");
        assert!(
            rep.containers_deleted + rep.containers_retired > 0,
            "{rep:?}"
        );
    }
    let n = cut_everywhere(prepare, |lib| lib.gc().map(|_| ()), "gc");
    eprintln!("gc: cut at each of {n} writes");
}

#[test]
fn power_cut_at_every_write_of_scrub_repair() {
    let prepare = || {
        let files = library_files();
        let (sim, fs) = setup(&files, 2);
        let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
        optimize(&lib).unwrap();
        // Damage every primary copy of the hotspot chunks.
        for c in lib.store().chunks().unwrap() {
            if c.hot.is_some() {
                let p = container_path(lib.store().dir(), c.at.container);
                let mut d = sim.read_all(&p).unwrap();
                d[c.at.offset as usize + 60] ^= 0xff;
                sim.write_all(&p, &d);
            }
        }
        (sim, fs, files)
    };
    let (_s, fs, files) = prepare();
    {
        let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
        let (rep, _) = lib.scrub().unwrap();
        assert!(!rep.repaired.is_empty() && rep.bad.is_empty(), "{rep:?}");
        for (n, d) in &files {
            assert_eq!(content(&fs, &lib, n), *d);
        }
    }
    // The job here is a scrub that must leave nothing bad (the rerun repairs what a cut
    // interrupted). Content checks run only once repaired, so the check is of the rerun.
    let (sim, fs, _) = prepare();
    let w0 = sim.writes();
    Library::open(fs.clone(), Path::new(ROOT))
        .unwrap()
        .scrub()
        .unwrap();
    let total = sim.writes() - w0;
    assert!(total > 0);
    for n in 1..=total {
        let (sim, fs, files) = prepare();
        sim.arm_cut(n, n);
        let _ = Library::open(fs.clone(), Path::new(ROOT)).and_then(|lib| lib.scrub());
        assert!(sim.is_off(), "no cut at write {n} of {total}");
        sim.power_on();
        let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
        let (rep, _) = lib.scrub().unwrap();
        assert!(rep.bad.is_empty(), "cut {n}: {rep:?}");
        for (name, d) in &files {
            assert_eq!(content(&fs, &lib, name), *d, "cut {n}: {name}");
        }
    }
}

#[test]
fn stub_writes_survive_flush_and_cut() {
    let files = library_files();
    let (sim, fs) = setup(&files, 0);
    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
    optimize(&lib).unwrap();
    drop(lib);
    let p = Path::new(ROOT).join("other.img");
    let mut model = files["other.img"].clone();
    for round in 0..20u64 {
        let stub = vstor_dedup::stub::StubImage::open(fs.clone(), &p, true).unwrap();
        let mut r = fastrand::Rng::with_seed(round);
        for _ in 0..5 {
            let off = r.u64(0..190) * 1024;
            let d = rand_bytes(r.usize(1..8) * 512, round * 100 + off);
            stub.write(off, &d).unwrap();
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
        stub.flush().unwrap();
        // Unflushed writes, then a cut.
        let mut unflushed = Vec::new();
        for _ in 0..3 {
            let off = r.u64(0..190) * 1024;
            let _ = stub.write(off, &rand_bytes(2048, off));
            unflushed.push(off as usize..off as usize + 2048);
        }
        sim.cut_now(round);
        sim.power_on();
        let stub = vstor_dedup::stub::StubImage::open(fs.clone(), &p, true).unwrap();
        let mut back = vec![0; stub.size() as usize];
        stub.read(0, &mut back).unwrap();
        // Flushed bytes hold wherever no unflushed write went.
        for (i, (a, b)) in back.iter().zip(model.iter()).enumerate() {
            if a != b {
                assert!(
                    unflushed.iter().any(|u| u.contains(&i)),
                    "round {round}: byte {i} changed"
                );
            }
        }
        model = back;
    }
    // The next optimize folds the log in.
    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
    optimize(&lib).unwrap();
    assert_eq!(content(&fs, &lib, "other.img"), model);
    match &lib
        .files()
        .unwrap()
        .iter()
        .find(|f| f.name == "other.img")
        .unwrap()
        .state
    {
        FileState::Optimized { log_bytes, .. } => assert_eq!(*log_bytes, 0),
        s => panic!("{s:?}"),
    }
}

#[test]
fn flushed_stub_writes_are_never_lost() {
    let files = library_files();
    let (sim, fs) = setup(&files, 0);
    optimize(&Library::open(fs.clone(), Path::new(ROOT)).unwrap()).unwrap();
    let p = Path::new(ROOT).join("a.img");
    let mut model = files["a.img"].clone();
    for round in 0..30u64 {
        let stub = vstor_dedup::stub::StubImage::open(fs.clone(), &p, true).unwrap();
        let off = (round * 7 % 250) * 1024;
        let d = rand_bytes(3072, round);
        stub.write(off, &d).unwrap();
        stub.flush().unwrap();
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        sim.cut_now(round);
        sim.power_on();
        let stub = vstor_dedup::stub::StubImage::open(fs.clone(), &p, false).unwrap();
        let mut back = vec![0; stub.size() as usize];
        stub.read(0, &mut back).unwrap();
        assert!(back == model, "round {round}: a flushed write was lost");
    }
}

#[test]
fn corrupt_chunk_is_detected_on_read_and_reported_by_scrub() {
    let files = library_files();
    let (sim, fs) = setup(&files, 0);
    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
    optimize(&lib).unwrap();
    let stub = lib.open_stub("other.img", false).unwrap();
    let r = stub.refs()[3];
    let p = container_path(lib.store().dir(), r.container);
    let mut d = sim.read_all(&p).unwrap();
    d[r.offset as usize + 100] ^= 1;
    sim.write_all(&p, &d);
    let stub = lib.open_stub("other.img", false).unwrap();
    let mut buf = vec![0; 4096];
    let e = stub.read(stub.header().chunked_size / 2 - 4096, &mut buf);
    let at: u64 = stub.refs()[..3].iter().map(|r| u64::from(r.raw_len)).sum();
    let e2 = stub.read(at, &mut buf).unwrap_err();
    assert!(
        matches!(&e2, DedupError::BadChunk { what, .. } if what.contains("hash")
            || what.contains("decompress") || what.contains("checksum")),
        "{e2}"
    );
    let _ = e;
    let (rep, _) = lib.scrub().unwrap();
    assert_eq!(rep.bad.len(), 1, "{rep:?}");
    assert_eq!(rep.bad[0].2, vec!["other.img".to_string()]);
    assert!(rep.repaired.is_empty());
}

#[test]
fn hotspot_chunk_is_repaired_by_scrub() {
    let files = library_files();
    let (sim, fs) = setup(&files, 3);
    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
    optimize(&lib).unwrap();
    let hot: Vec<_> = lib
        .store()
        .chunks()
        .unwrap()
        .into_iter()
        .filter(|c| c.hot.is_some())
        .collect();
    assert!(!hot.is_empty());
    let c = hot[0];
    let p = container_path(lib.store().dir(), c.at.container);
    let mut d = sim.read_all(&p).unwrap();
    d[c.at.offset as usize + 70] ^= 0x55;
    sim.write_all(&p, &d);
    assert!(lib.store().read_chunk(&c.at).is_err());
    let (rep, _) = lib.scrub().unwrap();
    assert_eq!(rep.repaired, vec![vstor_dedup::chunk::hex(&c.at.id)]);
    assert!(rep.bad.is_empty());
    assert!(lib.store().read_chunk(&c.at).is_ok());
    for (n, d) in &files {
        assert_eq!(content(&fs, &lib, n), *d);
    }
}

#[test]
fn missing_chunk_foreign_index_and_full_disk_are_clear_errors() {
    let files = library_files();
    // A stub whose container is gone.
    let (sim, fs) = setup(&files, 0);
    let lib = Library::open(fs.clone(), Path::new(ROOT)).unwrap();
    optimize(&lib).unwrap();
    let stub = lib.open_stub("other.img", false).unwrap();
    let c = stub.refs()[0].container;
    fs.remove(&container_path(lib.store().dir(), c)).unwrap();
    let stub = lib.open_stub("other.img", false).unwrap();
    let mut buf = vec![0; 512];
    let e = stub.read(0, &mut buf).unwrap_err();
    assert!(matches!(e, DedupError::Missing(_)), "{e}");
    assert!(e.to_string().contains("other.img"), "{e}");
    drop(lib);

    // An index from another store.
    let (sim2, fs2) = setup(&files, 0);
    let idx = Path::new(ROOT).join(".vstor-dedup/index.redb");
    let foreign = sim2.read_all(&idx).unwrap();
    sim.write_all(&idx, &foreign);
    let e = Library::open(fs.clone(), Path::new(ROOT)).unwrap_err();
    assert!(matches!(e, DedupError::ForeignStore { .. }), "{e}");
    drop(fs2);

    // A full disk: the optimize fails with NoSpace, and every file reads as before.
    let (sim3, fs3) = setup(&files, 0);
    sim3.set_capacity(Some(sim3.used() + 100_000));
    let lib = Library::open(fs3.clone(), Path::new(ROOT)).unwrap();
    let e = optimize(&lib).unwrap_err();
    assert!(
        matches!(e, DedupError::NoSpace { .. })
            || e.to_string().contains("No space")
            || e.to_string().contains("os error 28"),
        "{e}"
    );
    drop(lib);
    sim3.set_capacity(None);
    check_all(&fs3, &files, "after ENOSPC");
}
