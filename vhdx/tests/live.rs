//! Online checkpoint and merge of a disk that threads keep writing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vstor_core::{BlockDevice, Job};
use vstor_vhdx::check::check;
use vstor_vhdx::live::LiveDisk;
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

mod tagmodel;
use tagmodel::{fill, tag_of};

const MIB: u64 = 1 << 20;
const SLOT: u64 = 64 * 1024;
const SLOTS: u64 = 64;

/// Writers that each own 4 MiB and write increasing tags into its 64 KiB slots; each returns
/// the last tag of every slot.
fn writers(d: &Arc<LiveDisk>, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<Vec<u32>>> {
    (0..3u64)
        .map(|w| {
            let (d, stop) = (d.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(w + 10);
                let mut last = vec![0u32; SLOTS as usize];
                let mut tag = (w as u32 + 1) << 24;
                let mut b = vec![0u8; SLOT as usize];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) || n < 50 {
                    let s = rng.usize(0..SLOTS as usize);
                    tag += 1;
                    fill(&mut b, tag);
                    d.write_at(w * 4 * MIB + s as u64 * SLOT, &b).unwrap();
                    last[s] = tag;
                    n += 1;
                    if n % 8 == 0 {
                        d.flush().unwrap();
                    }
                }
                last
            })
        })
        .collect()
}

fn slot_tag(v: &dyn BlockDevice, off: u64) -> u32 {
    let mut b = vec![0u8; SLOT as usize];
    v.read_at(off, &mut b).unwrap();
    let t = tag_of(&b[..512]).expect("a whole write");
    for s in b.chunks_exact(512) {
        assert_eq!(tag_of(s), Some(t), "slot at {off} holds a mix of writes");
    }
    t
}

#[test]
fn checkpoint_and_merge_online_while_threads_write() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("vm.vhdx");
    Vhdx::create(&p, &CreateOptions::dynamic(16 * MIB).block_size(MIB as u32))
        .unwrap()
        .close()
        .unwrap();
    let disk = Arc::new(LiveDisk::open(&p).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let hs = writers(&disk, &stop);
    std::thread::sleep(std::time::Duration::from_millis(100));

    // The checkpoint: the frozen parent stays the same while writes go on.
    let (child, frozen) = disk.checkpoint(None).unwrap();
    assert!(child.exists());
    let mut first = vec![0u8; (12 * MIB) as usize];
    frozen.read_at(0, &mut first).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut second = vec![0u8; (12 * MIB) as usize];
    frozen.read_at(0, &mut second).unwrap();
    assert!(first == second, "the frozen parent changed");
    let frozen_tags: Vec<u32> = (0..3 * SLOTS)
        .map(|i| {
            let off = (i / SLOTS) * 4 * MIB + (i % SLOTS) * SLOT;
            let mut b = vec![0u8; SLOT as usize];
            b.copy_from_slice(&first[off as usize..(off + SLOT) as usize]);
            tag_of(&b[..512]).unwrap()
        })
        .collect();
    drop(frozen);

    // The merge, while the writers keep writing.
    let r = disk.merge_checkpoint(&Job::new()).unwrap();
    assert_eq!(r.into, p);
    assert!(!child.exists());
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let lasts: Vec<Vec<u32>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    disk.flush().unwrap();
    for (w, last) in lasts.iter().enumerate() {
        for (s, &t) in last.iter().enumerate() {
            let off = w as u64 * 4 * MIB + s as u64 * SLOT;
            assert_eq!(slot_tag(&*disk, off), t, "writer {w} slot {s}");
            let f = frozen_tags[w * SLOTS as usize + s];
            assert!(f <= t, "the checkpoint holds a tag from after it");
        }
    }
    assert_eq!(disk.current().path(), Some(p.as_path()));
    drop(disk);
    let c = check(&p).unwrap();
    assert!(c.is_clean(), "{c:?}");
    let v = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    for (w, last) in lasts.iter().enumerate() {
        for (s, &t) in last.iter().enumerate() {
            assert_eq!(slot_tag(&v, w as u64 * 4 * MIB + s as u64 * SLOT), t);
        }
    }
}

#[test]
fn a_live_clone_is_a_consistent_copy_while_threads_write() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("vm.vhdx");
    Vhdx::create(&p, &CreateOptions::dynamic(16 * MIB).block_size(MIB as u32))
        .unwrap()
        .close()
        .unwrap();
    let disk = Arc::new(LiveDisk::open(&p).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let hs = writers(&disk, &stop);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let copy = d.path().join("copy.vhdx");
    disk.clone_to(&copy, &Default::default(), &Job::new())
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let lasts: Vec<Vec<u32>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(disk.current().path(), Some(p.as_path()), "merged back");
    let c = Vhdx::open(&copy, &OpenOptions::read_only()).unwrap();
    assert!(c.parent().is_none());
    for (w, last) in lasts.iter().enumerate() {
        for (s, &t) in last.iter().enumerate() {
            let off = w as u64 * 4 * MIB + s as u64 * SLOT;
            assert!(slot_tag(&c, off) <= t);
            assert_eq!(slot_tag(&*disk, off), t);
        }
    }
    drop(disk);
    assert!(check(&p).unwrap().is_clean());
    assert!(check(&copy).unwrap().is_clean());
}

/// A storage live migration while threads write: the disk moves to a new file, every write
/// (before, during and after the move) is in it, the old image is deleted (the chain's parent
/// is kept), and the new file is a clean, standalone VHDX.
#[test]
fn a_live_move_switches_to_the_copy_while_threads_write() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("vm.vhdx");
    Vhdx::create(&p, &CreateOptions::dynamic(16 * MIB).block_size(MIB as u32))
        .unwrap()
        .close()
        .unwrap();
    let disk = Arc::new(LiveDisk::open(&p).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let hs = writers(&disk, &stop);
    std::thread::sleep(std::time::Duration::from_millis(100));
    // A checkpoint first: the move flattens the chain and leaves the parent alone.
    let (child, frozen) = disk.checkpoint(None).unwrap();
    drop(frozen);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let to = d.path().join("moved").join("vm2.vhdx");
    // Into a directory that does not exist: refused, nothing changes.
    let e = disk
        .move_to(&to, &Default::default(), false, &Job::new())
        .unwrap_err();
    assert!(e.to_string().contains("vm2.vhdx"), "{e}");
    assert_eq!(disk.current().path(), Some(child.as_path()));
    std::fs::create_dir(d.path().join("moved")).unwrap();
    // Onto an existing file: refused, the file untouched.
    std::fs::write(&to, b"keep me").unwrap();
    assert!(disk
        .move_to(&to, &Default::default(), false, &Job::new())
        .is_err());
    assert_eq!(std::fs::read(&to).unwrap(), b"keep me");
    std::fs::remove_file(&to).unwrap();

    let r = disk
        .move_to(&to, &Default::default(), false, &Job::new())
        .unwrap();
    assert_eq!(
        (r.from.as_path(), r.to.as_path()),
        (child.as_path(), to.as_path())
    );
    assert_eq!(r.deleted.as_deref(), Some(child.as_path()));
    assert!(
        !child.exists() && p.exists(),
        "the top image goes, its parent stays"
    );
    assert_eq!(disk.current().path(), Some(to.as_path()));
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let lasts: Vec<Vec<u32>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    disk.flush().unwrap();
    for (w, last) in lasts.iter().enumerate() {
        for (s, &t) in last.iter().enumerate() {
            assert_eq!(slot_tag(&*disk, w as u64 * 4 * MIB + s as u64 * SLOT), t);
        }
    }
    drop(disk);
    assert!(check(&to).unwrap().is_clean());
    let v = Vhdx::open(&to, &OpenOptions::read_only()).unwrap();
    assert!(v.parent().is_none(), "the moved disk stands alone");
    for (w, last) in lasts.iter().enumerate() {
        for (s, &t) in last.iter().enumerate() {
            assert_eq!(slot_tag(&v, w as u64 * 4 * MIB + s as u64 * SLOT), t);
        }
    }
    assert!(!d.path().join("moved").join(".vm2.vhdx.partial").exists());
}
