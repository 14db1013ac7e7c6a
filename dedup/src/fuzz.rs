//! The body of the `dedup_stub` fuzz target, shared with the test that replays it on mutated
//! inputs: stubs (header, chunk list, write log) and container and record headers from
//! untrusted bytes. Oracles: no panic, no allocation beyond what the input justifies, and a
//! stub that opens reads back only bytes of its chunks, its log or zeroes.

use crate::format::{decode_stub_entries, decode_stub_header, ContainerHeader, RecordHeader};
use crate::store::{Store, StoreConfig};
use crate::stub::StubImage;
use crate::vfs::{OpenMode, SimFs, Vfs};
use std::path::Path;
use std::sync::Arc;

/// A small store with one optimized file, to open fuzzed stubs against: the store's
/// file system and the valid stub's bytes.
pub fn fixture() -> (SimFs, Vec<u8>) {
    let sim = SimFs::new();
    let root = Path::new("/l");
    sim.create_dir_all(root).expect("mem fs");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let f = sim
        .open(&root.join("f.img"), OpenMode::Create)
        .expect("mem fs");
    f.write_at(0, &data).expect("mem fs");
    let fs: Arc<dyn Vfs> = Arc::new(sim.clone());
    let cfg = StoreConfig {
        params: crate::chunk::ChunkParams {
            min: 1024,
            avg: 4096,
            max: 16384,
        },
        ..StoreConfig::default()
    };
    crate::library::Library::enable(fs.clone(), root, cfg).expect("enable");
    {
        let lib = crate::library::Library::open(fs.clone(), root).expect("open");
        lib.optimize(None, None, &mut |_, _, _| {})
            .expect("optimize");
        let stub = lib.open_stub("f.img", true).expect("stub");
        stub.write(4096, &[0x5a; 1024]).expect("write");
        stub.resize(300_000).expect("resize");
        stub.flush().expect("flush");
    }
    let stub = sim.read_all(&root.join("f.img")).expect("stub bytes");
    (sim, stub)
}

/// Runs one input: the parsers on its bytes, and the input as the stub of `sim`'s library.
pub fn run(sim: &SimFs, input: &[u8]) {
    let _ = ContainerHeader::decode(input, "fuzz");
    let _ = RecordHeader::decode(input);
    let len = input.len() as u64;
    if let Ok(h) = decode_stub_header(input, "fuzz", len) {
        let _ = decode_stub_entries(input, &h, "fuzz");
    }
    let p = Path::new("/l/fuzz.img");
    sim.write_all(p, input);
    let fs: Arc<dyn Vfs> = Arc::new(sim.clone());
    for writable in [false, true] {
        if let Ok(img) = StubImage::open(fs.clone(), p, writable) {
            let size = img.size();
            let n = size.min(1 << 20) as usize;
            let mut buf = vec![0u8; n];
            let _ = img.read(0, &mut buf);
            if size > n as u64 {
                let mut tail = vec![0u8; 4096.min(size as usize)];
                let _ = img.read(size - tail.len() as u64, &mut tail);
            }
            if writable && size >= 512 {
                let _ = img.write(0, &[1; 512]);
                let _ = img.resize(size / 2);
            }
        }
    }
    let _ = Store::open(fs, Path::new("/l/.vstor-dedup"));
}
