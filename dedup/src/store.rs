//! The chunk store: chunks in append-only container files, an index in redb.
//!
//! Layout of a store directory:
//! ```text
//! store          identity and settings (magic, store id, chunk sizes, compression, ...; CRC)
//! index.redb     the index: chunk -> container/offset/lengths/refcount/hotspot copy,
//!                stream -> name/size/chunk list, container -> committed length/state
//! c/NNNNNNNN     containers: a header, then chunk records (header + data), append-only,
//!                sealed once they reach the seal size
//! ```
//!
//! **Crash safety.** Chunk data is appended to containers past their committed length and
//! synced; only then does one redb transaction (ACID, synced at commit) record the chunks, the
//! new committed lengths and the stream. A cut before the commit leaves bytes past a committed
//! length (overwritten by the next writer) or a container file the index does not know (removed
//! by the next writer or GC); a cut after it leaves a complete stream. Nothing the index points
//! at is ever written again, except by a scrub repair, which writes the same bytes.

use crate::chunk::{chunk_id, hex, ChunkId, ChunkParams};
use crate::error::{DedupError, Result};
use crate::format::{
    store_hex, ChunkRef, ContainerHeader, RecordHeader, StoreId, CONTAINER_HEADER, FLAG_LZ4,
    RECORD_HEADER,
};
use crate::vfs::{OpenMode, VFile, Vfs};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
const STREAMS: TableDefinition<u64, &[u8]> = TableDefinition::new("streams");
const CONTAINERS: TableDefinition<u32, &[u8]> = TableDefinition::new("containers");

/// Settings of a store, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Chunk sizes.
    pub params: ChunkParams,
    /// Compress chunks with LZ4 (kept only where it saves at least 1/16).
    pub compress: bool,
    /// A container is sealed once it holds this many bytes.
    pub seal_size: u64,
    /// Chunks with at least this many references keep a second copy (0: never).
    pub hotspot_refs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            params: ChunkParams::default(),
            compress: true,
            seal_size: 1 << 30,
            hotspot_refs: 100,
        }
    }
}

const STORE_MAGIC: &[u8; 8] = b"VSTDSTOR";
const STORE_FILE_LEN: usize = 64;

fn encode_store_file(id: &StoreId, c: &StoreConfig) -> Vec<u8> {
    let mut b = vec![0u8; STORE_FILE_LEN];
    b[..8].copy_from_slice(STORE_MAGIC);
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..28].copy_from_slice(id);
    b[28..32].copy_from_slice(&c.params.min.to_le_bytes());
    b[32..36].copy_from_slice(&c.params.avg.to_le_bytes());
    b[36..40].copy_from_slice(&c.params.max.to_le_bytes());
    b[40] = u8::from(c.compress);
    b[41..49].copy_from_slice(&c.seal_size.to_le_bytes());
    b[49..57].copy_from_slice(&c.hotspot_refs.to_le_bytes());
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_store_file(b: &[u8], file: &str) -> Result<(StoreId, StoreConfig)> {
    if b.len() < STORE_FILE_LEN || &b[..8] != STORE_MAGIC {
        return Err(DedupError::corrupt(
            file,
            "not a dedup store file (bad magic)",
        ));
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
    if crc32c::crc32c(&b[..60]) != u32_at(60) {
        return Err(DedupError::corrupt(file, "store file checksum mismatch"));
    }
    if u32_at(8) != 1 {
        return Err(DedupError::corrupt(
            file,
            "store file of an unknown version",
        ));
    }
    let c = StoreConfig {
        params: ChunkParams {
            min: u32_at(28),
            avg: u32_at(32),
            max: u32_at(36),
        },
        compress: b[40] != 0,
        seal_size: u64_at(41),
        hotspot_refs: u64_at(49),
    };
    c.params
        .validate()
        .map_err(|e| DedupError::corrupt(file, e))?;
    Ok((b[12..28].try_into().expect("16"), c))
}

/// An index entry of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRec {
    /// Where the chunk lives.
    pub at: ChunkRef,
    /// References from streams (a stream that holds it twice counts twice).
    pub refs: u64,
    /// Its hotspot copy: container and record offset.
    pub hot: Option<(u32, u64)>,
}

impl ChunkRec {
    fn encode(&self) -> [u8; 52] {
        let mut b = [0u8; 52];
        b[..4].copy_from_slice(&self.at.container.to_le_bytes());
        b[4..12].copy_from_slice(&self.at.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.at.raw_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.at.stored_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.at.flags.to_le_bytes());
        b[24..32].copy_from_slice(&self.refs.to_le_bytes());
        let (hc, ho) = self.hot.unwrap_or((0, 0));
        b[32..36].copy_from_slice(&hc.to_le_bytes());
        b[36..44].copy_from_slice(&ho.to_le_bytes());
        b
    }
    fn decode(id: &[u8], b: &[u8]) -> Result<ChunkRec> {
        if id.len() != 32 || b.len() < 44 {
            return Err(DedupError::corrupt("index", "malformed chunk entry"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let hc = u32_at(32);
        Ok(ChunkRec {
            at: ChunkRef {
                id: id.try_into().expect("32"),
                container: u32_at(0),
                offset: u64_at(4),
                raw_len: u32_at(12),
                stored_len: u32_at(16),
                flags: u32_at(20),
            },
            refs: u64_at(24),
            hot: (hc != 0).then(|| (hc, u64_at(36))),
        })
    }
}

/// An index entry of a stream (an optimized file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRec {
    /// The file's name in its library (for reports).
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Its chunks, in order.
    pub chunks: Vec<ChunkId>,
}

impl StreamRec {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + self.name.len() + 32 * self.chunks.len());
        b.extend_from_slice(&(self.name.len() as u32).to_le_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            b.extend_from_slice(c);
        }
        b
    }
    fn decode(b: &[u8]) -> Result<StreamRec> {
        let bad = || DedupError::corrupt("index", "malformed stream entry");
        let nl = u32::from_le_bytes(b.get(..4).ok_or_else(bad)?.try_into().expect("4")) as usize;
        let name = String::from_utf8_lossy(b.get(4..4 + nl).ok_or_else(bad)?).into_owned();
        let rest = &b[4 + nl..];
        let size = u64::from_le_bytes(rest.get(..8).ok_or_else(bad)?.try_into().expect("8"));
        let n = u32::from_le_bytes(rest.get(8..12).ok_or_else(bad)?.try_into().expect("4"));
        let ids = rest.get(12..).ok_or_else(bad)?;
        if ids.len() != n as usize * 32 {
            return Err(bad());
        }
        Ok(StreamRec {
            name,
            size,
            chunks: ids
                .chunks_exact(32)
                .map(|c| c.try_into().expect("32"))
                .collect(),
        })
    }
}

/// An index entry of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContainerRec {
    /// Committed length: records past it are not part of the store.
    pub len: u64,
    /// No more chunks go in.
    pub sealed: bool,
    /// It holds hotspot copies.
    pub hotspot: bool,
    /// Its chunks have moved (GC); it is deleted once no stub points into it.
    pub retired: bool,
}

impl ContainerRec {
    fn encode(&self) -> [u8; 11] {
        let mut b = [0u8; 11];
        b[..8].copy_from_slice(&self.len.to_le_bytes());
        b[8] = u8::from(self.sealed);
        b[9] = u8::from(self.hotspot);
        b[10] = u8::from(self.retired);
        b
    }
    fn decode(b: &[u8]) -> Result<ContainerRec> {
        if b.len() < 11 {
            return Err(DedupError::corrupt("index", "malformed container entry"));
        }
        Ok(ContainerRec {
            len: u64::from_le_bytes(b[..8].try_into().expect("8")),
            sealed: b[8] != 0,
            hotspot: b[9] != 0,
            retired: b[10] != 0,
        })
    }
}

/// The redb storage backend on a [`VFile`], so the index lives on the store's file system
/// (the host's, or the simulated one of crash tests).
#[derive(Debug)]
struct Backend(Arc<dyn VFile>);

impl redb::StorageBackend for Backend {
    fn len(&self) -> std::result::Result<u64, redb::BackendError> {
        Ok(self.0.len()?)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::result::Result<(), redb::BackendError> {
        Ok(self.0.read_at(offset, out)?)
    }
    fn set_len(&self, len: u64) -> std::result::Result<(), redb::BackendError> {
        Ok(self.0.set_len(len)?)
    }
    fn sync_data(&self) -> std::result::Result<(), redb::BackendError> {
        Ok(self.0.sync()?)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::result::Result<(), redb::BackendError> {
        Ok(self.0.write_at(offset, data)?)
    }
}

fn db_err(file: &Path) -> impl Fn(redb::Error) -> DedupError + '_ {
    move |e| {
        let what = e.to_string();
        if what.contains("No space left") || what.contains("os error 28") {
            return DedupError::NoSpace {
                context: format!("index {}", file.display()),
            };
        }
        DedupError::Index {
            file: file.display().to_string(),
            what,
        }
    }
}

macro_rules! db {
    ($self:expr, $e:expr) => {
        $e.map_err(|e| db_err(&$self.index_path)(e.into()))
    };
}

/// What a scrub found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Chunks checked.
    pub checked: u64,
    /// Chunks repaired from their hotspot copy (hex ids).
    pub repaired: Vec<String>,
    /// Hotspot copies rewritten from a good primary.
    pub hot_repaired: u64,
    /// Chunks that are bad with no good copy: hex id, the container, and the files that use
    /// them.
    pub bad: Vec<(String, String, Vec<String>)>,
}

/// Figures of a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Chunks in the index.
    pub chunks: u64,
    /// Bytes of those chunks uncompressed.
    pub chunk_bytes: u64,
    /// Bytes the store's files take (containers and index).
    pub stored_bytes: u64,
    /// Containers (not counting hotspot ones).
    pub containers: u64,
    /// Hotspot containers.
    pub hotspot_containers: u64,
    /// Chunks with a hotspot copy.
    pub hot_chunks: u64,
    /// Streams.
    pub streams: u64,
    /// Bytes of the streams.
    pub logical_bytes: u64,
}

/// A chunk store.
pub struct Store {
    fs: Arc<dyn Vfs>,
    dir: PathBuf,
    index_path: PathBuf,
    id: StoreId,
    cfg: StoreConfig,
    db: redb::Database,
    handles: Mutex<HashMap<u32, Arc<dyn VFile>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("id", &store_hex(&self.id))
            .finish()
    }
}

/// The path of container `id` in store directory `dir`.
pub fn container_path(dir: &Path, id: u32) -> PathBuf {
    dir.join("c").join(format!("{id:08}"))
}

/// Reads a chunk's record from an open container and checks it: header, length, hash.
pub fn read_record(file: &dyn VFile, r: &ChunkRef, name: &str) -> Result<Vec<u8>> {
    let bad = |what: String| DedupError::BadChunk {
        chunk: hex(&r.id),
        container: name.to_string(),
        offset: r.offset,
        what,
    };
    let mut buf = vec![0u8; RECORD_HEADER + r.stored_len as usize];
    file.read_at(r.offset, &mut buf)
        .map_err(|e| bad(format!("cannot read the record: {e}")))?;
    let h = RecordHeader::decode(&buf).map_err(bad)?;
    if h.id != r.id || h.stored_len != r.stored_len || h.raw_len != r.raw_len {
        return Err(bad("the record there is another chunk's".into()));
    }
    let data = &buf[RECORD_HEADER..];
    let raw = if h.flags & FLAG_LZ4 != 0 {
        let mut out = vec![0u8; h.raw_len as usize];
        match lz4_flex::block::decompress_into(data, &mut out) {
            Ok(n) if n == out.len() => out,
            Ok(n) => return Err(bad(format!("decompressed to {n} bytes"))),
            Err(e) => return Err(bad(format!("cannot decompress: {e}"))),
        }
    } else {
        data.to_vec()
    };
    if chunk_id(&raw) != r.id {
        return Err(bad("its data does not hash to its id (corrupt)".into()));
    }
    Ok(raw)
}

/// Encodes a chunk as a record: header and stored data.
fn encode_record(id: ChunkId, data: &[u8], compress: bool) -> (Vec<u8>, u32) {
    let mut flags = 0;
    let mut stored: Vec<u8> = Vec::new();
    if compress {
        let c = lz4_flex::block::compress(data);
        if c.len() + data.len() / 16 < data.len() {
            stored = c;
            flags = FLAG_LZ4;
        }
    }
    if flags == 0 {
        stored = data.to_vec();
    }
    let h = RecordHeader {
        id,
        raw_len: data.len() as u32,
        stored_len: stored.len() as u32,
        flags,
    };
    let mut rec = Vec::with_capacity(RECORD_HEADER + stored.len());
    rec.extend_from_slice(&h.encode());
    rec.extend_from_slice(&stored);
    (rec, flags)
}

/// Whether `dir` holds a chunk store (a library's or a store of volumes): its `store` file
/// and its index. Library jobs never take such a directory's files for a library's files.
pub fn is_store_dir(fs: &dyn Vfs, dir: &Path) -> bool {
    fs.is_file(&dir.join("store")) && fs.is_file(&dir.join("index.redb"))
}

impl Store {
    /// Creates a store in `dir` (which must not hold one).
    pub fn create(fs: Arc<dyn Vfs>, dir: &Path, cfg: StoreConfig) -> Result<Store> {
        cfg.params.validate().map_err(DedupError::Invalid)?;
        let sf = dir.join("store");
        if fs.exists(&sf) {
            return Err(DedupError::Invalid(format!(
                "{} already holds a dedup store",
                dir.display()
            )));
        }
        fs.create_dir_all(&dir.join("c"))
            .map_err(|e| DedupError::io(format!("cannot create {}", dir.display()), e))?;
        let mut id = [0u8; 16];
        let mut rng = fastrand::Rng::new();
        rng.fill(&mut id);
        // The index first, the identity file last: a store file means a complete store.
        let index_path = dir.join("index.redb");
        let f = fs
            .open(&index_path, OpenMode::Truncate)
            .map_err(|e| DedupError::io(format!("cannot create {}", index_path.display()), e))?;
        let db = redb::Builder::new()
            .create_with_backend(Backend(f))
            .map_err(|e| db_err(&index_path)(e.into()))?;
        let tx = db
            .begin_write()
            .map_err(|e| db_err(&index_path)(e.into()))?;
        {
            let mut m = tx
                .open_table(META)
                .map_err(|e| db_err(&index_path)(e.into()))?;
            m.insert("store_id", &id[..])
                .map_err(|e| db_err(&index_path)(e.into()))?;
            tx.open_table(CHUNKS)
                .map_err(|e| db_err(&index_path)(e.into()))?;
            tx.open_table(STREAMS)
                .map_err(|e| db_err(&index_path)(e.into()))?;
            tx.open_table(CONTAINERS)
                .map_err(|e| db_err(&index_path)(e.into()))?;
        }
        tx.commit().map_err(|e| db_err(&index_path)(e.into()))?;
        drop(db);
        let tmp = dir.join("store.tmp");
        let f = fs
            .open(&tmp, OpenMode::Truncate)
            .and_then(|f| {
                f.write_at(0, &encode_store_file(&id, &cfg))?;
                f.sync()
            })
            .and_then(|_| fs.rename(&tmp, &sf))
            .map_err(|e| DedupError::io(format!("cannot write {}", sf.display()), e));
        f?;
        Store::open(fs, dir)
    }

    /// Opens the store in `dir`.
    pub fn open(fs: Arc<dyn Vfs>, dir: &Path) -> Result<Store> {
        let sf = dir.join("store");
        let f = fs
            .open(&sf, OpenMode::Read)
            .map_err(|e| DedupError::io(format!("{} holds no dedup store", dir.display()), e))?;
        let mut b = vec![0u8; STORE_FILE_LEN];
        f.read_at(0, &mut b)
            .map_err(|e| DedupError::io(format!("cannot read {}", sf.display()), e))?;
        let (id, cfg) = decode_store_file(&b, &sf.display().to_string())?;
        let index_path = dir.join("index.redb");
        let f = fs
            .open(&index_path, OpenMode::Write)
            .map_err(|e| DedupError::io(format!("cannot open {}", index_path.display()), e))?;
        let db = redb::Builder::new()
            .create_with_backend(Backend(f))
            .map_err(|e| db_err(&index_path)(e.into()))?;
        let store = Store {
            fs,
            dir: dir.to_path_buf(),
            index_path,
            id,
            cfg,
            db,
            handles: Mutex::new(HashMap::new()),
        };
        let found = store.meta_id()?;
        if found != id {
            return Err(DedupError::ForeignStore {
                what: format!("index {}", store.index_path.display()),
                expected: store_hex(&id),
                found: store_hex(&found),
            });
        }
        Ok(store)
    }

    fn meta_id(&self) -> Result<StoreId> {
        let tx = db!(self, self.db.begin_read())?;
        let m = db!(self, tx.open_table(META))?;
        let v = db!(self, m.get("store_id"))?
            .ok_or_else(|| DedupError::corrupt(self.index_path.display().to_string(), "no id"))?;
        v.value()
            .try_into()
            .map_err(|_| DedupError::corrupt(self.index_path.display().to_string(), "bad id"))
    }

    /// The store's id.
    pub fn id(&self) -> StoreId {
        self.id
    }

    /// The store's settings.
    pub fn config(&self) -> StoreConfig {
        self.cfg
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn container(&self, id: u32) -> Result<Arc<dyn VFile>> {
        let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = h.get(&id) {
            return Ok(f.clone());
        }
        let path = container_path(&self.dir, id);
        let f = self
            .fs
            .open(&path, OpenMode::Write)
            .map_err(|e| DedupError::io(format!("cannot open container {}", path.display()), e))?;
        h.insert(id, f.clone());
        Ok(f)
    }

    /// Reads a chunk and checks its hash.
    pub fn read_chunk(&self, r: &ChunkRef) -> Result<Vec<u8>> {
        let f = self.container(r.container)?;
        read_record(
            &*f,
            r,
            &container_path(&self.dir, r.container).display().to_string(),
        )
    }

    /// The index entry of a chunk.
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkRec>> {
        let tx = db!(self, self.db.begin_read())?;
        let t = db!(self, tx.open_table(CHUNKS))?;
        let v = db!(self, t.get(&id[..]))?;
        v.map(|v| ChunkRec::decode(id, v.value())).transpose()
    }

    /// Every stream: id and entry.
    pub fn streams(&self) -> Result<BTreeMap<u64, StreamRec>> {
        let tx = db!(self, self.db.begin_read())?;
        let t = db!(self, tx.open_table(STREAMS))?;
        let mut out = BTreeMap::new();
        for e in db!(self, t.iter())? {
            let (k, v) = db!(self, e)?;
            out.insert(k.value(), StreamRec::decode(v.value())?);
        }
        Ok(out)
    }

    /// Every chunk's index entry.
    pub fn chunks(&self) -> Result<Vec<ChunkRec>> {
        let tx = db!(self, self.db.begin_read())?;
        let t = db!(self, tx.open_table(CHUNKS))?;
        let mut out = Vec::new();
        for e in db!(self, t.iter())? {
            let (k, v) = db!(self, e)?;
            out.push(ChunkRec::decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Every container's index entry.
    pub fn containers(&self) -> Result<BTreeMap<u32, ContainerRec>> {
        let tx = db!(self, self.db.begin_read())?;
        let t = db!(self, tx.open_table(CONTAINERS))?;
        let mut out = BTreeMap::new();
        for e in db!(self, t.iter())? {
            let (k, v) = db!(self, e)?;
            out.insert(k.value(), ContainerRec::decode(v.value())?);
        }
        Ok(out)
    }

    /// Starts adding chunks.
    pub fn writer(&self) -> Result<Writer<'_>> {
        Self::make_writer(StoreRef::Borrowed(self))
    }

    /// Starts adding chunks, with a writer that holds the store (so that it can live beside
    /// it: the inline volumes keep one open between flushes).
    pub fn shared_writer(self: &Arc<Self>) -> Result<Writer<'static>> {
        Self::make_writer(StoreRef::Shared(self.clone()))
    }

    fn make_writer(store: StoreRef<'_>) -> Result<Writer<'_>> {
        let containers = store.containers()?;
        let next = containers.keys().next_back().map_or(1, |k| k + 1);
        Ok(Writer {
            store,
            open: [None, None],
            next_id: next,
            touched: BTreeMap::new(),
            new: HashMap::new(),
            throttle: None,
        })
    }

    /// Deletes a stream and drops its references.
    pub fn delete_stream(&self, id: u64) -> Result<()> {
        let tx = db!(self, self.db.begin_write())?;
        {
            let mut st = db!(self, tx.open_table(STREAMS))?;
            let mut ch = db!(self, tx.open_table(CHUNKS))?;
            let rec = match db!(self, st.remove(id))? {
                Some(v) => StreamRec::decode(v.value())?,
                None => return Ok(()),
            };
            for c in &rec.chunks {
                let cur = db!(self, ch.get(&c[..]))?
                    .map(|v| ChunkRec::decode(c, v.value()))
                    .transpose()?;
                if let Some(mut r) = cur {
                    r.refs = r.refs.saturating_sub(1);
                    db!(self, ch.insert(&c[..], &r.encode()[..]))?;
                }
            }
        }
        db!(self, tx.commit())?;
        Ok(())
    }

    /// Figures of the store.
    pub fn stats(&self) -> Result<StoreStats> {
        let mut s = StoreStats::default();
        for c in self.chunks()? {
            s.chunks += 1;
            s.chunk_bytes += u64::from(c.at.raw_len);
            s.hot_chunks += u64::from(c.hot.is_some());
        }
        for (id, c) in self.containers()? {
            if c.hotspot {
                s.hotspot_containers += 1;
            } else {
                s.containers += 1;
            }
            let p = container_path(&self.dir, id);
            s.stored_bytes += self
                .fs
                .open(&p, OpenMode::Read)
                .and_then(|f| f.len())
                .unwrap_or(0);
        }
        s.stored_bytes += self
            .fs
            .open(&self.index_path, OpenMode::Read)
            .and_then(|f| f.len())
            .unwrap_or(0);
        for r in self.streams()?.values() {
            s.streams += 1;
            s.logical_bytes += r.size;
        }
        Ok(s)
    }

    /// Gives chunks with at least the configured number of references a second copy in a
    /// hotspot container. Returns how many copies were made.
    pub fn make_hotspots(&self) -> Result<u64> {
        if self.cfg.hotspot_refs == 0 {
            return Ok(0);
        }
        let want: Vec<ChunkRec> = self
            .chunks()?
            .into_iter()
            .filter(|c| c.hot.is_none() && c.refs >= self.cfg.hotspot_refs)
            .collect();
        if want.is_empty() {
            return Ok(0);
        }
        let mut w = self.writer()?;
        let mut placed = Vec::new();
        for c in &want {
            let data = self.read_chunk(&c.at)?;
            let at = w.append(&data, true)?;
            placed.push((c.at.id, (at.container, at.offset)));
        }
        w.sync()?;
        let tx = db!(self, self.db.begin_write())?;
        {
            let mut ch = db!(self, tx.open_table(CHUNKS))?;
            let mut ct = db!(self, tx.open_table(CONTAINERS))?;
            w.record_containers(&mut ct)?;
            for (id, hot) in &placed {
                let cur = db!(self, ch.get(&id[..]))?
                    .map(|v| ChunkRec::decode(id, v.value()))
                    .transpose()?;
                if let Some(mut r) = cur {
                    r.hot = Some(*hot);
                    db!(self, ch.insert(&id[..], &r.encode()[..]))?;
                }
            }
        }
        db!(self, tx.commit())?;
        Ok(placed.len() as u64)
    }

    /// Verifies every chunk (and hotspot copy); repairs a bad chunk from its good hotspot
    /// copy (and a bad copy from its good chunk) by writing the same record in place.
    pub fn scrub(&self) -> Result<ScrubReport> {
        let mut rep = ScrubReport::default();
        let streams = self.streams()?;
        for c in self.chunks()? {
            rep.checked += 1;
            let primary = self.read_chunk(&c.at);
            let hot_ref = c.hot.map(|(hc, ho)| ChunkRef {
                container: hc,
                offset: ho,
                ..c.at
            });
            let hot = hot_ref.map(|h| (h, self.read_chunk(&h)));
            match (&primary, &hot) {
                (Ok(_), None) | (Ok(_), Some((_, Ok(_)))) => {}
                (Ok(data), Some((h, Err(_)))) => {
                    self.rewrite_in_place(h, data)?;
                    rep.hot_repaired += 1;
                }
                (Err(_), Some((_, Ok(data)))) => {
                    self.rewrite_in_place(&c.at, data)?;
                    rep.repaired.push(hex(&c.at.id));
                }
                (Err(e), _) => {
                    let users: Vec<String> = streams
                        .values()
                        .filter(|s| s.chunks.contains(&c.at.id))
                        .map(|s| s.name.clone())
                        .collect();
                    let _ = e;
                    rep.bad.push((
                        hex(&c.at.id),
                        container_path(&self.dir, c.at.container)
                            .display()
                            .to_string(),
                        users,
                    ));
                }
            }
        }
        Ok(rep)
    }

    /// Writes a chunk's record again where `at` says (same id, same encoding), and syncs.
    fn rewrite_in_place(&self, at: &ChunkRef, data: &[u8]) -> Result<()> {
        let (rec, flags) = encode_record(at.id, data, at.flags & FLAG_LZ4 != 0);
        if flags != at.flags || rec.len() != RECORD_HEADER + at.stored_len as usize {
            return Err(DedupError::Invalid(format!(
                "chunk {}: its copy does not encode to the same record",
                hex(&at.id)
            )));
        }
        let f = self.container(at.container)?;
        let path = container_path(&self.dir, at.container);
        f.write_at(at.offset, &rec)
            .and_then(|_| f.sync())
            .map_err(|e| DedupError::io(format!("cannot repair {}", path.display()), e))
    }

    /// Garbage collection, step 1: forgets streams not in `live` (files whose optimize or
    /// unoptimize was cut short), drops chunks nobody references, deletes containers with no
    /// live chunk, and moves the live chunks of sealed containers that are mostly garbage into
    /// new containers, marking those retired. Returns the bytes of containers deleted.
    /// The library then rewrites the stubs that point into retired containers and calls
    /// [`Store::drop_retired`].
    pub fn gc(&self, live: &HashSet<u64>) -> Result<GcReport> {
        let mut rep = GcReport::default();
        for id in self.streams()?.keys() {
            if !live.contains(id) {
                self.delete_stream(*id)?;
                rep.streams_dropped += 1;
            }
        }
        // Dead chunks go.
        let chunks = self.chunks()?;
        let dead: Vec<&ChunkRec> = chunks.iter().filter(|c| c.refs == 0).collect();
        if !dead.is_empty() {
            let tx = db!(self, self.db.begin_write())?;
            {
                let mut ch = db!(self, tx.open_table(CHUNKS))?;
                for c in &dead {
                    db!(self, ch.remove(&c.at.id[..]))?;
                }
            }
            db!(self, tx.commit())?;
            rep.chunks_dropped = dead.len() as u64;
        }
        let live_chunks: Vec<ChunkRec> = chunks.into_iter().filter(|c| c.refs > 0).collect();
        let mut live_bytes: HashMap<u32, u64> = HashMap::new();
        for c in &live_chunks {
            *live_bytes.entry(c.at.container).or_default() +=
                (RECORD_HEADER as u64) + u64::from(c.at.stored_len);
            if let Some((hc, _)) = c.hot {
                *live_bytes.entry(hc).or_default() +=
                    (RECORD_HEADER as u64) + u64::from(c.at.stored_len);
            }
        }
        let containers = self.containers()?;
        // Containers with nothing live: deleted now (no stub can point into them, as every
        // chunk a stub names is referenced by its stream).
        let mut empty = Vec::new();
        let mut sparse = Vec::new();
        for (id, c) in &containers {
            let lb = live_bytes.get(id).copied().unwrap_or(0);
            if c.retired {
                continue;
            }
            if lb == 0 && (c.sealed || c.hotspot || c.len > CONTAINER_HEADER as u64) {
                empty.push(*id);
            } else if c.sealed && !c.hotspot && lb * 2 < c.len {
                sparse.push(*id);
            }
        }
        // Empty containers go before any compaction: its writer would fill an unsealed one.
        for id in empty {
            rep.bytes_freed += self.delete_container(id)?;
            rep.containers_deleted += 1;
        }
        if !sparse.is_empty() {
            let mut w = self.writer()?;
            let mut moved = Vec::new();
            for c in live_chunks
                .iter()
                .filter(|c| sparse.contains(&c.at.container))
            {
                let data = self.read_chunk(&c.at)?;
                let at = w.append(&data, false)?;
                moved.push((c.at.id, at));
                rep.bytes_moved += u64::from(c.at.stored_len);
            }
            w.sync()?;
            let tx = db!(self, self.db.begin_write())?;
            {
                let mut ch = db!(self, tx.open_table(CHUNKS))?;
                let mut ct = db!(self, tx.open_table(CONTAINERS))?;
                w.record_containers(&mut ct)?;
                for (id, at) in &moved {
                    let cur = db!(self, ch.get(&id[..]))?
                        .map(|v| ChunkRec::decode(id, v.value()))
                        .transpose()?;
                    if let Some(mut r) = cur {
                        r.at = *at;
                        db!(self, ch.insert(&id[..], &r.encode()[..]))?;
                    }
                }
                for id in &sparse {
                    let mut c = containers[id];
                    c.retired = true;
                    db!(self, ct.insert(*id, &c.encode()[..]))?;
                }
            }
            db!(self, tx.commit())?;
            rep.containers_retired = sparse.len() as u64;
        }
        rep.strays_deleted = self.delete_strays()?;
        Ok(rep)
    }

    /// Containers whose chunks have moved, waiting for the stubs that point into them.
    pub fn retired(&self) -> Result<Vec<u32>> {
        Ok(self
            .containers()?
            .into_iter()
            .filter(|(_, c)| c.retired)
            .map(|(id, _)| id)
            .collect())
    }

    /// Deletes a retired container (once no stub points into it). Returns its bytes.
    pub fn drop_retired(&self, id: u32) -> Result<u64> {
        self.delete_container(id)
    }

    fn delete_container(&self, id: u32) -> Result<u64> {
        // The index forgets it first: a cut between the two leaves a stray file, which the
        // next GC deletes.
        let tx = db!(self, self.db.begin_write())?;
        {
            let mut ct = db!(self, tx.open_table(CONTAINERS))?;
            db!(self, ct.remove(id))?;
        }
        db!(self, tx.commit())?;
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let p = container_path(&self.dir, id);
        let len = self
            .fs
            .open(&p, OpenMode::Read)
            .and_then(|f| f.len())
            .unwrap_or(0);
        match self.fs.remove(&p) {
            Ok(()) => Ok(len),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(DedupError::io(format!("cannot delete {}", p.display()), e)),
        }
    }

    /// Deletes container files the index does not know (left by a job cut short).
    fn delete_strays(&self) -> Result<u64> {
        let known = self.containers()?;
        let cdir = self.dir.join("c");
        let mut n = 0;
        let list = self
            .fs
            .list(&cdir)
            .map_err(|e| DedupError::io(format!("cannot list {}", cdir.display()), e))?;
        for (name, is_dir) in list {
            let Ok(id) = name.parse::<u32>() else {
                continue;
            };
            if is_dir || known.contains_key(&id) {
                continue;
            }
            self.handles
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            let p = cdir.join(&name);
            self.fs
                .remove(&p)
                .map_err(|e| DedupError::io(format!("cannot delete {}", p.display()), e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Checks the index against itself: every chunk's refcount equals the references the
    /// streams hold, every stream's chunk is in the index inside a committed container range.
    /// Returns the problems found (empty: consistent).
    pub fn verify_index(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let mut counts: HashMap<ChunkId, u64> = HashMap::new();
        for s in self.streams()?.values() {
            for c in &s.chunks {
                *counts.entry(*c).or_default() += 1;
            }
        }
        let containers = self.containers()?;
        let chunks = self.chunks()?;
        let known: HashSet<ChunkId> = chunks.iter().map(|c| c.at.id).collect();
        for c in &chunks {
            let want = counts.get(&c.at.id).copied().unwrap_or(0);
            if c.refs != want {
                problems.push(format!(
                    "chunk {} has {} references, the streams hold {want}",
                    hex(&c.at.id),
                    c.refs
                ));
            }
            match containers.get(&c.at.container) {
                Some(ct)
                    if c.at.offset + (RECORD_HEADER as u64) + u64::from(c.at.stored_len)
                        <= ct.len => {}
                _ => problems.push(format!(
                    "chunk {} lies outside committed container {}",
                    hex(&c.at.id),
                    c.at.container
                )),
            }
        }
        for id in counts.keys() {
            if !known.contains(id) {
                problems.push(format!(
                    "a stream names chunk {}, not in the index",
                    hex(id)
                ));
            }
        }
        Ok(problems)
    }

    /// Records a stream whose chunks `w` has put (or found), and commits everything `w`
    /// wrote. Returns the stream's id.
    pub fn commit_stream(&self, w: &mut Writer<'_>, name: &str, refs: &[ChunkRef]) -> Result<u64> {
        w.sync()?;
        let tx = db!(self, self.db.begin_write())?;
        let id;
        {
            let mut ch = db!(self, tx.open_table(CHUNKS))?;
            let mut ct = db!(self, tx.open_table(CONTAINERS))?;
            let mut st = db!(self, tx.open_table(STREAMS))?;
            let mut meta = db!(self, tx.open_table(META))?;
            w.record_containers(&mut ct)?;
            id = match db!(self, meta.get("next_stream"))? {
                Some(v) => u64::from_le_bytes(v.value().try_into().unwrap_or([0; 8])),
                None => 1,
            };
            db!(
                self,
                meta.insert("next_stream", &(id + 1).to_le_bytes()[..])
            )?;
            let mut counts: BTreeMap<ChunkId, (ChunkRef, u64)> = BTreeMap::new();
            for r in refs {
                counts.entry(r.id).or_insert((*r, 0)).1 += 1;
            }
            for (cid, (at, n)) in counts {
                let cur = db!(self, ch.get(&cid[..]))?
                    .map(|v| ChunkRec::decode(&cid, v.value()))
                    .transpose()?;
                let rec = match cur {
                    Some(mut r) => {
                        r.refs += n;
                        r
                    }
                    None => ChunkRec {
                        at,
                        refs: n,
                        hot: None,
                    },
                };
                db!(self, ch.insert(&cid[..], &rec.encode()[..]))?;
            }
            let rec = StreamRec {
                name: name.to_string(),
                size: refs.iter().map(|r| u64::from(r.raw_len)).sum(),
                chunks: refs.iter().map(|r| r.id).collect(),
            };
            db!(self, st.insert(id, &rec.encode()[..]))?;
        }
        db!(self, tx.commit())?;
        w.new.clear();
        w.touched.clear();
        Ok(id)
    }

    /// The index database (for the modules that keep tables of their own in it).
    pub(crate) fn db(&self) -> &redb::Database {
        &self.db
    }

    /// An index error, named after the index file.
    pub(crate) fn index_err(&self, e: impl Into<redb::Error>) -> DedupError {
        db_err(&self.index_path)(e.into())
    }

    /// Changes chunk refcounts by `deltas` inside `tx`. A chunk not in the index must be among
    /// `new` (appended since the last commit): it is recorded there with its count. A chunk
    /// whose count reaches 0 leaves the index (its record becomes garbage in its container,
    /// which GC compacts away).
    pub(crate) fn adjust_refs(
        &self,
        tx: &redb::WriteTransaction,
        deltas: &BTreeMap<ChunkId, i64>,
        new: &HashMap<ChunkId, ChunkRef>,
    ) -> Result<()> {
        let mut ch = db!(self, tx.open_table(CHUNKS))?;
        for (id, d) in deltas {
            if *d == 0 {
                continue;
            }
            let cur = db!(self, ch.get(&id[..]))?
                .map(|v| ChunkRec::decode(id, v.value()))
                .transpose()?;
            let (mut rec, have) = match (cur, new.get(id)) {
                (Some(r), _) => (r, r.refs as i64),
                (None, Some(at)) => (
                    ChunkRec {
                        at: *at,
                        refs: 0,
                        hot: None,
                    },
                    0,
                ),
                (None, None) => {
                    return Err(DedupError::corrupt(
                        self.index_path.display().to_string(),
                        format!(
                            "a reference to chunk {}, which is not in the index",
                            hex(id)
                        ),
                    ))
                }
            };
            let n = have + d;
            if n < 0 {
                return Err(DedupError::corrupt(
                    self.index_path.display().to_string(),
                    format!("chunk {} would have {n} references", hex(id)),
                ));
            }
            if n == 0 {
                db!(self, ch.remove(&id[..]))?;
            } else {
                rec.refs = n as u64;
                db!(self, ch.insert(&id[..], &rec.encode()[..]))?;
            }
        }
        Ok(())
    }

    /// Where the index says each chunk of `ids` is now (for stubs whose container retired).
    pub fn locate(&self, ids: &[ChunkId]) -> Result<Vec<ChunkRef>> {
        let tx = db!(self, self.db.begin_read())?;
        let t = db!(self, tx.open_table(CHUNKS))?;
        ids.iter()
            .map(|id| {
                let v = db!(self, t.get(&id[..]))?.ok_or_else(|| {
                    DedupError::Missing(format!("chunk {} is not in the store", hex(id)))
                })?;
                Ok(ChunkRec::decode(id, v.value())?.at)
            })
            .collect()
    }
}

/// What a GC did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Streams forgotten (their files were not optimized after all).
    pub streams_dropped: u64,
    /// Chunks dropped from the index.
    pub chunks_dropped: u64,
    /// Containers deleted.
    pub containers_deleted: u64,
    /// Containers whose live chunks moved (deleted once their stubs are rewritten).
    pub containers_retired: u64,
    /// Bytes of chunk data copied.
    pub bytes_moved: u64,
    /// Bytes of container files deleted.
    pub bytes_freed: u64,
    /// Container files no index entry named, deleted.
    pub strays_deleted: u64,
}

/// A container being filled: id, file, length so far.
type OpenContainer = (u32, Arc<dyn VFile>, u64);

/// The store a writer adds to: borrowed, or held.
enum StoreRef<'a> {
    Borrowed(&'a Store),
    Shared(Arc<Store>),
}

impl std::ops::Deref for StoreRef<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        match self {
            StoreRef::Borrowed(s) => s,
            StoreRef::Shared(s) => s,
        }
    }
}

/// Adds chunks to a store: appends records to containers; [`Store::commit_stream`] makes
/// them part of the store.
pub struct Writer<'a> {
    store: StoreRef<'a>,
    /// The container being filled: id, file, length so far.
    open: [Option<OpenContainer>; 2],
    next_id: u32,
    /// Containers written to: new length and state.
    touched: BTreeMap<u32, ContainerRec>,
    /// Chunks put since the last commit.
    new: HashMap<ChunkId, ChunkRef>,
    throttle: Option<Throttle>,
}

/// A rate limit on what a writer reads or writes.
#[derive(Debug, Clone, Copy)]
pub struct Throttle {
    /// Bytes per second.
    pub bytes_per_sec: u64,
    start: std::time::Instant,
    done: u64,
}

impl Throttle {
    /// A limit of `bytes_per_sec`.
    pub fn new(bytes_per_sec: u64) -> Throttle {
        Throttle {
            bytes_per_sec: bytes_per_sec.max(1),
            start: std::time::Instant::now(),
            done: 0,
        }
    }
    /// Counts `n` bytes and sleeps as long as the rate requires.
    pub fn take(&mut self, n: u64) {
        self.done += n;
        let due = std::time::Duration::from_secs_f64(self.done as f64 / self.bytes_per_sec as f64);
        let el = self.start.elapsed();
        if due > el {
            std::thread::sleep(due - el);
        }
    }
}

impl Writer<'_> {
    /// Limits the bytes per second this writer takes in.
    pub fn set_throttle(&mut self, t: Option<Throttle>) {
        self.throttle = t;
    }

    /// Chunks appended since the last commit.
    pub fn new_count(&self) -> u64 {
        self.new.len() as u64
    }

    /// Puts a chunk: finds it in the store (or among those put since the last commit), or
    /// appends it to a container.
    pub fn put(&mut self, data: &[u8]) -> Result<ChunkRef> {
        if let Some(t) = &mut self.throttle {
            t.take(data.len() as u64);
        }
        self.put_hashed(chunk_id(data), data)
    }

    /// [`Writer::put`] of a chunk whose id the caller has computed (`id` must be
    /// `chunk_id(data)`).
    pub(crate) fn put_hashed(&mut self, id: ChunkId, data: &[u8]) -> Result<ChunkRef> {
        if let Some(r) = self.new.get(&id) {
            return Ok(*r);
        }
        if let Some(r) = self.store.chunk(&id)? {
            return Ok(r.at);
        }
        let r = self.append_id(id, data, false)?;
        self.new.insert(id, r);
        Ok(r)
    }

    /// Syncs every container written to, then runs `f` in one index transaction that also
    /// records the containers' new lengths, and commits it. `f` is handed the chunks appended
    /// since the last commit, which it must record (with [`Store::adjust_refs`]) for those it
    /// keeps. On success the writer starts a new batch; on failure nothing was committed and
    /// the batch stays as it was, to be committed by a later call.
    pub(crate) fn commit_with<T>(
        &mut self,
        f: impl FnOnce(&redb::WriteTransaction, &HashMap<ChunkId, ChunkRef>) -> Result<T>,
    ) -> Result<T> {
        self.sync()?;
        let store = &*self.store;
        let tx = db!(store, store.db.begin_write())?;
        {
            let mut ct = db!(store, tx.open_table(CONTAINERS))?;
            self.record_containers(&mut ct)?;
        }
        let out = f(&tx, &self.new)?;
        db!(store, tx.commit())?;
        self.new.clear();
        self.touched.clear();
        Ok(out)
    }

    /// Appends a chunk's record to the open container of its kind.
    fn append(&mut self, data: &[u8], hotspot: bool) -> Result<ChunkRef> {
        self.append_id(chunk_id(data), data, hotspot)
    }

    /// [`Writer::append`] of a chunk whose id is known.
    fn append_id(&mut self, id: ChunkId, data: &[u8], hotspot: bool) -> Result<ChunkRef> {
        let (rec, flags) = encode_record(id, data, self.store.cfg.compress);
        let k = usize::from(hotspot);
        if self.open[k].is_none() {
            self.open[k] = self.find_unsealed(hotspot)?;
        }
        if let Some((cid, _, len)) = &self.open[k] {
            if *len + rec.len() as u64 > self.store.cfg.seal_size && *len > CONTAINER_HEADER as u64
            {
                // The entry may have gone with the last commit: it gets its length again.
                let e = self.touched.entry(*cid).or_default();
                e.len = *len;
                e.hotspot = hotspot;
                e.sealed = true;
                self.open[k] = None;
            }
        }
        if self.open[k].is_none() {
            self.open[k] = Some(self.create(hotspot)?);
        }
        let (cid, f, len) = self.open[k].as_mut().expect("a container is open");
        let path = container_path(&self.store.dir, *cid);
        f.write_at(*len, &rec)
            .map_err(|e| DedupError::io(format!("cannot append to {}", path.display()), e))?;
        let r = ChunkRef {
            id,
            container: *cid,
            offset: *len,
            raw_len: data.len() as u32,
            stored_len: (rec.len() - RECORD_HEADER) as u32,
            flags,
        };
        *len += rec.len() as u64;
        let e = self.touched.entry(*cid).or_default();
        e.len = *len;
        e.hotspot = hotspot;
        Ok(r)
    }

    /// An unsealed container of the kind from the index, to fill further from its committed
    /// length (bytes past it, from a job cut short, are overwritten).
    fn find_unsealed(&mut self, hotspot: bool) -> Result<Option<OpenContainer>> {
        let found = self.store.containers()?.into_iter().find(|(id, c)| {
            !c.sealed
                && !c.retired
                && c.hotspot == hotspot
                && self.touched.get(id).is_none_or(|t| !t.sealed)
        });
        let Some((id, c)) = found else {
            return Ok(None);
        };
        let len = self.touched.get(&id).map_or(c.len, |t| t.len);
        self.touched.entry(id).or_insert(c);
        Ok(Some((id, self.store.container(id)?, len)))
    }

    /// A new container file with its header.
    fn create(&mut self, hotspot: bool) -> Result<OpenContainer> {
        let id = self.next_id;
        self.next_id += 1;
        let path = container_path(&self.store.dir, id);
        let f = self
            .store
            .fs
            .open(&path, OpenMode::Truncate)
            .map_err(|e| DedupError::io(format!("cannot create {}", path.display()), e))?;
        let h = ContainerHeader {
            store: self.store.id,
            id,
        };
        f.write_at(0, &h.encode())
            .map_err(|e| DedupError::io(format!("cannot write {}", path.display()), e))?;
        self.store
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, f.clone());
        self.touched.insert(
            id,
            ContainerRec {
                len: CONTAINER_HEADER as u64,
                hotspot,
                ..Default::default()
            },
        );
        Ok((id, f, CONTAINER_HEADER as u64))
    }

    /// Syncs every container written to.
    fn sync(&self) -> Result<()> {
        for id in self.touched.keys() {
            let f = self.store.container(*id)?;
            f.sync().map_err(|e| {
                DedupError::io(
                    format!(
                        "cannot sync {}",
                        container_path(&self.store.dir, *id).display()
                    ),
                    e,
                )
            })?;
        }
        Ok(())
    }

    fn record_containers(&self, ct: &mut redb::Table<'_, u32, &'static [u8]>) -> Result<()> {
        for (id, c) in &self.touched {
            let mut rec = *c;
            if c.len >= self.store.cfg.seal_size {
                rec.sealed = true;
            }
            ct.insert(*id, &rec.encode()[..])
                .map_err(|e| db_err(&self.store.index_path)(e.into()))?;
        }
        Ok(())
    }
}
