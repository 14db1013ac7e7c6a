//! Concurrency: many threads making first writes into the same new blocks (each its own
//! sectors), with readers running beside them; every write is there afterwards, on dynamic and
//! differencing disks, and after a reopen.

use std::sync::Arc;

use vstor_core::{BlockDevice, MemoryDevice};
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const THREADS: u64 = 8;
const BLOCKS: u64 = 6;

fn hammer(disk: Arc<Vhdx>, parent_byte: u8) {
    // Thread t writes every THREADS-th 4 KiB piece starting at piece t, in every block, in
    // batches of 8, so that first writes of all threads race for the same blocks.
    let pieces = BLOCKS * MIB / 4096;
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let d = disk.clone();
            std::thread::spawn(move || {
                let buf = vec![t as u8 + 1; 4096];
                let mine: Vec<u64> = (t..pieces).step_by(THREADS as usize).collect();
                for chunk in mine.chunks(8) {
                    let mut batch: Vec<_> = chunk
                        .iter()
                        .map(|&p| vstor_core::Request::write(p * 4096, &buf))
                        .collect();
                    d.submit_all(&mut batch).unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let d = disk.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 4096];
            for i in 0..2000u64 {
                let p = (i * 7919) % pieces;
                d.read_at(p * 4096, &mut b).unwrap();
                // Either not yet written (parent data or zeros) or the owner's byte, never a mix.
                let owner = (p % THREADS) as u8 + 1;
                assert!(
                    b.iter().all(|&x| x == owner) || b.iter().all(|&x| x == parent_byte),
                    "piece {p} reads {:?}",
                    &b[..8]
                );
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    reader.join().unwrap();
    disk.flush().unwrap();
}

fn verify(disk: &Vhdx) {
    let mut all = vec![0u8; (BLOCKS * MIB) as usize];
    disk.read_at(0, &mut all).unwrap();
    for (p, piece) in all.chunks(4096).enumerate() {
        let owner = (p as u64 % THREADS) as u8 + 1;
        assert!(piece.iter().all(|&x| x == owner), "piece {p}");
    }
}

#[test]
fn concurrent_first_writes_into_the_same_blocks_dynamic() {
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(MIB).unwrap());
    let disk = Arc::new(
        Vhdx::create_on(
            mem.clone(),
            &CreateOptions::dynamic(BLOCKS * MIB).block_size(MIB as u32),
            None,
        )
        .unwrap(),
    );
    hammer(disk.clone(), 0);
    verify(&disk);
    drop(disk);
    let disk = Vhdx::open_on(mem.clone(), "c", &OpenOptions::default(), None).unwrap();
    verify(&disk);
    drop(disk);
    let r = vstor_vhdx::check::check_device(mem, "c");
    assert!(r.is_clean(), "{:?} {:?}", r.errors, r.warnings);
    assert_eq!(r.allocated_blocks, BLOCKS);
}

#[test]
fn concurrent_first_writes_into_the_same_blocks_differencing() {
    let pm: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(MIB).unwrap());
    let parent = Vhdx::create_on(
        pm,
        &CreateOptions::dynamic(BLOCKS * MIB).block_size(MIB as u32),
        None,
    )
    .unwrap();
    parent
        .write_at(0, &vec![0xEE; (BLOCKS * MIB) as usize])
        .unwrap();
    parent.close().unwrap();
    let parent = Arc::new(parent);
    let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(MIB).unwrap());
    let disk = Arc::new(
        Vhdx::create_on(
            mem.clone(),
            &CreateOptions::differencing("p.vhdx"),
            Some((parent.clone(), std::path::Path::new("p.vhdx"))),
        )
        .unwrap(),
    );
    hammer(disk.clone(), 0xEE);
    verify(&disk);
    drop(disk);
    let disk = Vhdx::open_on(mem.clone(), "c", &OpenOptions::default(), Some(parent)).unwrap();
    verify(&disk);
    drop(disk);
    let r = vstor_vhdx::check::check_device(mem, "c");
    assert!(r.is_clean(), "{:?} {:?}", r.errors, r.warnings);
}
