//! An optimized file, opened: its chunks (read from the store's containers, each checked
//! against its hash) overlaid with the writes made since it was optimized, which go to a log
//! in the stub's own file.
//!
//! Reading needs no index: a stub names each chunk's container and offset, so any number of
//! processes read optimized files while a job runs on the store. A write appends a record to
//! the log (header with CRC-32C over header and data); a flush syncs the stub. At open the
//! log is replayed up to the first record that fails its checksum; a writable open cuts the
//! file there, so that a record from before a crash that was never flushed cannot come back.

use crate::chunk::hex;
use crate::error::{DedupError, Result};
use crate::format::{
    decode_log, decode_stub_entries, decode_stub_header, encode_log, is_stub, log_data_ok,
    store_hex, ChunkRef, ContainerHeader, LogRecord, StoreId, StubHeader, CONTAINER_HEADER,
    LOG_DATA, LOG_HEADER, LOG_RESIZE, STUB_HEADER,
};
use crate::store::{container_path, read_record};
use crate::vfs::{OpenMode, VFile, Vfs};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// The name of a library's store directory.
pub const STORE_DIR: &str = ".vstor-dedup";

/// Non-overlapping extents of the logical space that the log holds: start -> (len, position
/// of the data in the stub file).
#[derive(Debug, Default, Clone)]
pub struct ExtentMap(BTreeMap<u64, (u64, u64)>);

impl ExtentMap {
    /// Records that `[start, start+len)` now reads from file position `pos`.
    pub fn insert(&mut self, start: u64, len: u64, pos: u64) {
        if len == 0 {
            return;
        }
        self.cut(start, start + len);
        self.0.insert(start, (len, pos));
    }

    /// Forgets what the log holds in `[start, end)`.
    pub fn cut(&mut self, start: u64, end: u64) {
        let hit: Vec<(u64, (u64, u64))> = self
            .0
            .range(..end)
            .rev()
            .take_while(|(s, (l, _))| **s + *l > start)
            .map(|(s, v)| (*s, *v))
            .collect();
        for (s, (l, p)) in hit {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, (start - s, p));
            }
            if s + l > end {
                self.0.insert(end, (s + l - end, p + (end - s)));
            }
        }
    }

    /// The pieces of `[start, start+len)`: `(offset, len, Some(pos))` where the log holds
    /// it, `None` elsewhere.
    pub fn pieces(&self, start: u64, len: u64) -> Vec<(u64, u64, Option<u64>)> {
        let end = start + len;
        let mut out = Vec::new();
        let mut at = start;
        let first = self
            .0
            .range(..=start)
            .next_back()
            .filter(|(s, (l, _))| **s + *l > start)
            .map(|(s, _)| *s)
            .unwrap_or(start);
        for (s, (l, p)) in self.0.range(first..end) {
            let (s, l, p) = (*s, *l, *p);
            if s + l <= at {
                continue;
            }
            if s > at {
                out.push((at, s - at, None));
                at = s;
            }
            let e = (s + l).min(end);
            out.push((at, e - at, Some(p + (at - s))));
            at = e;
        }
        if at < end {
            out.push((at, end - at, None));
        }
        out
    }

    /// Bytes the log holds.
    pub fn bytes(&self) -> u64 {
        self.0.values().map(|(l, _)| l).sum()
    }
}

#[derive(Debug)]
struct LogState {
    map: ExtentMap,
    /// The logical size now.
    size: u64,
    /// Chunk data past this reads as zeroes (the file was shrunk below it once).
    chunk_limit: u64,
    /// Where the next record goes (file position).
    end: u64,
    seq: u32,
    records: u32,
}

/// Finds the store directory for a file in a library: the nearest `.vstor-dedup` with a store
/// in it, from the file's directory up.
pub fn find_store_dir(fs: &dyn Vfs, file: &Path) -> Option<PathBuf> {
    let mut dir = file.parent();
    while let Some(d) = dir {
        let s = d.join(STORE_DIR);
        if fs.exists(&s.join("store")) {
            return Some(s);
        }
        dir = d.parent();
    }
    None
}

/// Reads the store id from a store directory's identity file.
fn store_id_of(fs: &dyn Vfs, dir: &Path) -> Result<StoreId> {
    let p = dir.join("store");
    let f = fs
        .open(&p, OpenMode::Read)
        .map_err(|e| DedupError::io(format!("cannot open {}", p.display()), e))?;
    let mut b = [0u8; 28];
    f.read_at(0, &mut b)
        .map_err(|e| DedupError::io(format!("cannot read {}", p.display()), e))?;
    if &b[..8] != b"VSTDSTOR" {
        return Err(DedupError::corrupt(
            p.display().to_string(),
            "not a store file",
        ));
    }
    Ok(b[12..28].try_into().expect("16"))
}

/// Whether the file at `path` is a stub (its first bytes say so).
pub fn file_is_stub(fs: &dyn Vfs, path: &Path) -> bool {
    let Ok(f) = fs.open(path, OpenMode::Read) else {
        return false;
    };
    let mut b = [0u8; 8];
    f.read_at(0, &mut b).is_ok() && is_stub(&b)
}

/// An opened stub.
pub struct StubImage {
    fs: Arc<dyn Vfs>,
    file: Arc<dyn VFile>,
    name: String,
    store_dir: PathBuf,
    store: StoreId,
    header: StubHeader,
    refs: Vec<ChunkRef>,
    /// Logical start of each chunk.
    starts: Vec<u64>,
    writable: bool,
    log: RwLock<LogState>,
    containers: Mutex<HashMap<u32, Arc<dyn VFile>>>,
    cache: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
}

impl std::fmt::Debug for StubImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StubImage")
            .field("name", &self.name)
            .field("stream", &self.header.stream)
            .finish()
    }
}

const CACHE_CHUNKS: usize = 64;

impl StubImage {
    /// Opens the stub at `path`; its store is found from the file's directory up.
    pub fn open(fs: Arc<dyn Vfs>, path: &Path, writable: bool) -> Result<StubImage> {
        let name = path.display().to_string();
        let store_dir = find_store_dir(&*fs, path).ok_or_else(|| {
            DedupError::Missing(format!(
                "{name} is an optimized (dedup) file but no store ({STORE_DIR}) is found in \
                 its directory or above"
            ))
        })?;
        Self::open_in(fs, path, &store_dir, writable)
    }

    /// Opens the stub at `path` whose chunks live in the store at `store_dir`.
    pub fn open_in(
        fs: Arc<dyn Vfs>,
        path: &Path,
        store_dir: &Path,
        writable: bool,
    ) -> Result<StubImage> {
        let name = path.display().to_string();
        let mode = if writable {
            OpenMode::Write
        } else {
            OpenMode::Read
        };
        let file = fs
            .open(path, mode)
            .map_err(|e| DedupError::io(format!("cannot open {name}"), e))?;
        let file_len = file
            .len()
            .map_err(|e| DedupError::io(format!("cannot size {name}"), e))?;
        let mut hb = vec![0u8; STUB_HEADER.min(file_len as usize)];
        file.read_at(0, &mut hb)
            .map_err(|e| DedupError::io(format!("cannot read {name}"), e))?;
        let header = decode_stub_header(&hb, &name, file_len)?;
        let mut b = vec![0u8; header.log_start as usize];
        file.read_at(0, &mut b)
            .map_err(|e| DedupError::io(format!("cannot read {name}"), e))?;
        let refs = decode_stub_entries(&b, &header, &name)?;
        let store = store_id_of(&*fs, store_dir)?;
        if store != header.store {
            return Err(DedupError::ForeignStore {
                what: format!("stub {name}"),
                expected: store_hex(&store),
                found: store_hex(&header.store),
            });
        }
        let mut starts = Vec::with_capacity(refs.len());
        let mut at = 0u64;
        for r in &refs {
            starts.push(at);
            at += u64::from(r.raw_len);
        }
        let img = StubImage {
            fs,
            file,
            name,
            store_dir: store_dir.to_path_buf(),
            store,
            header,
            refs,
            starts,
            writable,
            log: RwLock::new(LogState {
                map: ExtentMap::default(),
                size: header.chunked_size,
                chunk_limit: header.chunked_size,
                end: header.log_start,
                seq: 0,
                records: 0,
            }),
            containers: Mutex::new(HashMap::new()),
            cache: Mutex::new(VecDeque::new()),
        };
        img.replay(file_len)?;
        Ok(img)
    }

    fn replay(&self, file_len: u64) -> Result<()> {
        let mut st = self.log.write().unwrap_or_else(|p| p.into_inner());
        let mut pos = self.header.log_start;
        let mut hb = [0u8; LOG_HEADER];
        while pos + LOG_HEADER as u64 <= file_len {
            if self.file.read_at(pos, &mut hb).is_err() {
                break;
            }
            let Some(rec) = decode_log(&hb, st.seq) else {
                break;
            };
            let data_pos = pos + LOG_HEADER as u64;
            if data_pos + u64::from(rec.len) > file_len {
                break;
            }
            let mut data = vec![0u8; rec.len as usize];
            if self.file.read_at(data_pos, &mut data).is_err() || !log_data_ok(&hb, &data) {
                break;
            }
            match rec.kind {
                LOG_DATA => {
                    if rec.offset.saturating_add(u64::from(rec.len)) > st.size {
                        break;
                    }
                    st.map.insert(rec.offset, u64::from(rec.len), data_pos);
                }
                _ => {
                    let new = rec.offset;
                    if new < st.size {
                        let old = st.size;
                        st.map.cut(new, old);
                        st.chunk_limit = st.chunk_limit.min(new);
                    }
                    st.size = new;
                }
            }
            st.seq += 1;
            st.records += 1;
            pos = data_pos + u64::from(rec.len);
        }
        st.end = pos;
        if self.writable && pos < file_len {
            // Whatever follows the last good record was never flushed: gone for good.
            self.file
                .set_len(pos)
                .and_then(|_| self.file.sync())
                .map_err(|e| DedupError::io(format!("cannot trim the log of {}", self.name), e))?;
        }
        Ok(())
    }

    /// The stub's header.
    pub fn header(&self) -> &StubHeader {
        &self.header
    }

    /// The chunks of the file as it was optimized.
    pub fn refs(&self) -> &[ChunkRef] {
        &self.refs
    }

    /// The store the chunks live in.
    pub fn store_id(&self) -> StoreId {
        self.store
    }

    /// The content's size now.
    pub fn size(&self) -> u64 {
        self.log.read().unwrap_or_else(|p| p.into_inner()).size
    }

    /// Records in the write log (0: the file reads exactly as it was optimized).
    pub fn log_records(&self) -> u32 {
        self.log.read().unwrap_or_else(|p| p.into_inner()).records
    }

    /// Bytes of the stub file's write log.
    pub fn log_bytes(&self) -> u64 {
        let st = self.log.read().unwrap_or_else(|p| p.into_inner());
        st.end - self.header.log_start
    }

    /// The bytes of the stub file from its log on (to carry over into a rewritten stub).
    pub fn log_raw(&self) -> Result<Vec<u8>> {
        let n = self.log_bytes();
        let mut b = vec![0u8; n as usize];
        self.file
            .read_at(self.header.log_start, &mut b)
            .map_err(|e| DedupError::io(format!("cannot read {}", self.name), e))?;
        Ok(b)
    }

    fn container(&self, id: u32) -> Result<Arc<dyn VFile>> {
        let mut h = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = h.get(&id) {
            return Ok(f.clone());
        }
        let path = container_path(&self.store_dir, id);
        let f = self.fs.open(&path, OpenMode::Read).map_err(|e| {
            DedupError::Missing(format!(
                "{}: its chunks' container {} cannot be opened ({e})",
                self.name,
                path.display()
            ))
        })?;
        let mut hb = [0u8; CONTAINER_HEADER];
        f.read_at(0, &mut hb)
            .map_err(|e| DedupError::io(format!("cannot read {}", path.display()), e))?;
        let ch = ContainerHeader::decode(&hb, &path.display().to_string())?;
        if ch.store != self.store || ch.id != id {
            return Err(DedupError::ForeignStore {
                what: format!("container {}", path.display()),
                expected: store_hex(&self.store),
                found: store_hex(&ch.store),
            });
        }
        h.insert(id, f.clone());
        Ok(f)
    }

    /// The data of chunk `i`, checked against its hash.
    pub fn chunk(&self, i: usize) -> Result<Arc<Vec<u8>>> {
        {
            let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, d)) = c.iter().find(|(j, _)| *j == i) {
                return Ok(d.clone());
            }
        }
        let r = &self.refs[i];
        let f = self.container(r.container)?;
        let cpath = container_path(&self.store_dir, r.container);
        let data = read_record(&*f, r, &cpath.display().to_string()).map_err(|e| match e {
            DedupError::BadChunk { what, .. } if what.starts_with("cannot read") => {
                DedupError::Missing(format!(
                    "{}: chunk {} is missing from {} ({what})",
                    self.name,
                    hex(&r.id),
                    cpath.display()
                ))
            }
            e => e,
        })?;
        let data = Arc::new(data);
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= CACHE_CHUNKS {
            c.pop_front();
        }
        c.push_back((i, data.clone()));
        Ok(data)
    }

    /// Reads `buf.len()` bytes at `offset` (inside [`size`](Self::size)).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.log.read().unwrap_or_else(|p| p.into_inner());
        let end = offset + buf.len() as u64;
        if end > st.size {
            return Err(DedupError::Invalid(format!(
                "read of {} bytes at {offset} is past the end of {} ({} bytes)",
                buf.len(),
                self.name,
                st.size
            )));
        }
        for (at, len, pos) in st.map.pieces(offset, buf.len() as u64) {
            let dst = &mut buf[(at - offset) as usize..(at - offset + len) as usize];
            match pos {
                Some(p) => self
                    .file
                    .read_at(p, dst)
                    .map_err(|e| DedupError::io(format!("cannot read {}", self.name), e))?,
                None => self.read_chunks(at, dst, st.chunk_limit)?,
            }
        }
        Ok(())
    }

    fn read_chunks(&self, offset: u64, dst: &mut [u8], limit: u64) -> Result<()> {
        let mut at = offset;
        let mut done = 0usize;
        while done < dst.len() {
            if at >= limit {
                dst[done..].fill(0);
                return Ok(());
            }
            let i = self.starts.partition_point(|s| *s <= at) - 1;
            let data = self.chunk(i)?;
            let inner = (at - self.starts[i]) as usize;
            let n = (data.len() - inner)
                .min(dst.len() - done)
                .min((limit - at) as usize);
            dst[done..done + n].copy_from_slice(&data[inner..inner + n]);
            done += n;
            at += n as u64;
        }
        Ok(())
    }

    fn append(&self, st: &mut LogState, kind: u32, offset: u64, data: &[u8]) -> Result<u64> {
        if !self.writable {
            return Err(DedupError::Invalid(format!(
                "{} is open read-only",
                self.name
            )));
        }
        let rec = LogRecord {
            kind,
            offset,
            len: data.len() as u32,
            seq: st.seq,
        };
        let mut b = Vec::with_capacity(LOG_HEADER + data.len());
        b.extend_from_slice(&encode_log(&rec, data));
        b.extend_from_slice(data);
        self.file
            .write_at(st.end, &b)
            .map_err(|e| DedupError::io(format!("cannot write to {}", self.name), e))?;
        let data_pos = st.end + LOG_HEADER as u64;
        st.end += b.len() as u64;
        st.seq += 1;
        st.records += 1;
        Ok(data_pos)
    }

    /// Writes `data` at `offset` (inside the size): a record appended to the log.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.log.write().unwrap_or_else(|p| p.into_inner());
        if offset + data.len() as u64 > st.size {
            return Err(DedupError::Invalid(format!(
                "write past the end of {}",
                self.name
            )));
        }
        for piece in data.chunks(32 << 20) {
            let at = offset + (piece.as_ptr() as usize - data.as_ptr() as usize) as u64;
            let pos = self.append(&mut st, LOG_DATA, at, piece)?;
            st.map.insert(at, piece.len() as u64, pos);
        }
        Ok(())
    }

    /// Changes the size: a record in the log.
    pub fn resize(&self, new: u64) -> Result<()> {
        let mut st = self.log.write().unwrap_or_else(|p| p.into_inner());
        self.append(&mut st, LOG_RESIZE, new, &[])?;
        if new < st.size {
            let old = st.size;
            st.map.cut(new, old);
            st.chunk_limit = st.chunk_limit.min(new);
        }
        st.size = new;
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.file
            .sync()
            .map_err(|e| DedupError::io(format!("cannot sync {}", self.name), e))
    }

    /// The name the stub was opened by.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A [`std::io::Read`] over a stub's content, from the start.
pub struct StubReader<'a> {
    img: &'a StubImage,
    pos: u64,
    size: u64,
}

impl<'a> StubReader<'a> {
    /// Reads `img` from the start.
    pub fn new(img: &'a StubImage) -> Self {
        StubReader {
            img,
            pos: 0,
            size: img.size(),
        }
    }
}

impl std::io::Read for StubReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.size - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.img
            .read(self.pos, &mut buf[..n])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A [`std::io::Read`] over a plain file of a [`Vfs`].
pub struct FileReader {
    file: Arc<dyn VFile>,
    pos: u64,
    size: u64,
}

impl FileReader {
    /// Reads `file` from the start.
    pub fn new(file: Arc<dyn VFile>) -> std::io::Result<Self> {
        let size = file.len()?;
        Ok(FileReader { file, pos: 0, size })
    }
}

impl std::io::Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.size - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file.read_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_map_against_a_byte_model() {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut m = ExtentMap::default();
        let mut model = vec![None::<u64>; 200];
        for step in 0..2000u64 {
            let s = rng.u64(0..190);
            let l = rng.u64(1..=(200 - s).min(30));
            if rng.u8(0..5) == 0 {
                m.cut(s, s + l);
                for x in s..s + l {
                    model[x as usize] = None;
                }
            } else {
                let p = step * 1000;
                m.insert(s, l, p);
                for x in s..s + l {
                    model[x as usize] = Some(p + (x - s));
                }
            }
            let mut got = vec![None; 200];
            for (at, len, pos) in m.pieces(0, 200) {
                for x in at..at + len {
                    got[x as usize] = pos.map(|p| p + (x - at));
                }
            }
            assert_eq!(got, model, "step {step}");
        }
    }
}
