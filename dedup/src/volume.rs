//! Inline dedup: volumes for running VMs, in a store of their own (`vstor dedup create STORE`),
//! opened as `dedup:STORE/NAME`.
//!
//! As dm-vdo: a volume is an array of fixed 4 KiB blocks, each a chunk of the store (by its
//! BLAKE3 id) or nothing (it reads as zeroes). A block of zeroes is never stored: writing one
//! drops the block's reference, as a discard does. Identical blocks of any volumes of the store
//! are stored once, and two concurrent writes of the same new content append it once (the
//! store's writer is shared and looks up the chunks appended since the last commit).
//!
//! **Tables** (in the store's redb index, beside its chunks and streams):
//! ```text
//! volumes        name -> map id, size, the volume it was cloned from
//! volume_maps    map id -> parent map id, references (volumes and maps on it)
//! volume_blocks  (map id, block) -> chunk id, or empty: zeroes over the parent's block
//! volume_meta    version, next map id
//! ```
//! Every chunk id in `volume_blocks` holds one reference of its chunk's refcount.
//!
//! **Clones** are instant: cloning a volume freezes its map as a base that the volume and the
//! clone both stand on, each with a new, empty map of its own (one transaction, no block
//! copied). Reads look in the volume's map, then down the chain of bases. A volume whose map is
//! empty (nothing written since it was last cloned) is cloned onto its base directly, so
//! cloning a golden image many times keeps the chain one base deep.
//!
//! **Durability** follows the BlockDevice contract: a write appends its chunk (when new) to a
//! container and changes the block map in memory; a flush syncs the containers and commits
//! every block changed since the last flush, and the refcounts they move, in one redb
//! transaction. A power cut loses at most the writes not flushed; a flushed write is never lost.
//! A failed flush keeps the batch, and the next flush commits it.
//!
//! **Sharing.** A store is opened once per process ([`VolumeStore::shared`]) and locked
//! exclusively for it: several volumes of one store are served by one process (the daemon, or
//! the VMM), and a second process is refused with a clear error.

use crate::chunk::{chunk_id, hex, ChunkId};
use crate::error::{DedupError, Result};
use crate::format::ChunkRef;
use crate::store::{Store, StoreConfig, StoreStats, Writer};
use crate::vfs::{LockGuard, RealFs, Vfs};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use vstor_core::{
    copy_from_bufs, copy_into_bufs, BlockDevice, DeviceInfo, Extent, Op, Request,
    Result as CoreResult, Supports,
};

/// The block size of volumes.
pub const BLOCK: u64 = 4096;
/// The largest volume (64 TiB, as VHDX).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// The longest volume name.
pub const MAX_NAME: usize = 128;

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const MAPS: TableDefinition<u64, &[u8]> = TableDefinition::new("volume_maps");
const BLOCKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("volume_blocks");
const VMETA: TableDefinition<&str, u64> = TableDefinition::new("volume_meta");
const VERSION: u64 = 1;

/// A volume's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VolumeRec {
    map: u64,
    size: u64,
    origin: String,
}

impl VolumeRec {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(20 + self.origin.len());
        b.extend_from_slice(&self.map.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&(self.origin.len() as u32).to_le_bytes());
        b.extend_from_slice(self.origin.as_bytes());
        b
    }
    fn decode(name: &str, b: &[u8]) -> Result<VolumeRec> {
        let bad = || DedupError::corrupt("index", format!("volume {name}: malformed entry"));
        if b.len() < 20 {
            return Err(bad());
        }
        let n = u32::from_le_bytes(b[16..20].try_into().expect("4")) as usize;
        let origin = b.get(20..20 + n).ok_or_else(bad)?;
        Ok(VolumeRec {
            map: u64::from_le_bytes(b[..8].try_into().expect("8")),
            size: u64::from_le_bytes(b[8..16].try_into().expect("8")),
            origin: String::from_utf8_lossy(origin).into_owned(),
        })
    }
}

/// A block map's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapRec {
    /// The base it stands on (0: none).
    parent: u64,
    /// Volumes and maps that stand on it.
    refs: u64,
}

impl MapRec {
    fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.parent.to_le_bytes());
        b[8..].copy_from_slice(&self.refs.to_le_bytes());
        b
    }
    fn decode(id: u64, b: &[u8]) -> Result<MapRec> {
        if b.len() < 16 {
            return Err(DedupError::corrupt(
                "index",
                format!("block map {id}: malformed entry"),
            ));
        }
        Ok(MapRec {
            parent: u64::from_le_bytes(b[..8].try_into().expect("8")),
            refs: u64::from_le_bytes(b[8..16].try_into().expect("8")),
        })
    }
}

/// A block of a map as stored: a chunk, or zeroes over the parent's block.
fn decode_block(b: &[u8]) -> Result<Option<ChunkId>> {
    match b.len() {
        0 => Ok(None),
        32 => Ok(Some(b.try_into().expect("32"))),
        n => Err(DedupError::corrupt(
            "index",
            format!("a volume block entry of {n} bytes"),
        )),
    }
}

/// A block of a map in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// This chunk.
    Data(ChunkRef),
    /// Zeroes (over whatever a base holds).
    Zero,
}

/// A block change waiting for the next flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Data(ChunkId),
    /// Zeroes over the base's block.
    Zero,
    /// No entry (the map has no base).
    Gone,
}

/// A hasher for block numbers (a multiply and a rotation: block numbers are not chosen by an
/// adversary who could make them collide, and SipHash costs a read its time).
#[derive(Default, Clone, Copy)]
struct BlockHasher(u64);

impl std::hash::Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

type Layer = HashMap<u64, Slot, std::hash::BuildHasherDefault<BlockHasher>>;

/// What a volume list shows of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes of blocks that hold data (its own and those it shares with its bases).
    pub mapped: u64,
    /// Of those, bytes written since it was created or last cloned (its own map).
    pub written: u64,
    /// The volume it was cloned from ("" for none).
    pub origin: String,
}

/// Figures of a store of volumes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeStoreStats {
    /// The chunk store's figures.
    pub store: StoreStats,
    /// Volumes.
    pub volumes: u64,
    /// Bytes of blocks that hold data, over every volume.
    pub mapped: u64,
}

struct Inner {
    writer: Writer<'static>,
    /// Blocks changed since the last commit: (map, block) -> change.
    dirty: BTreeMap<(u64, u64), Change>,
    /// Volumes open in this process: name -> (readers, a writer).
    open: HashMap<String, (u32, bool)>,
}

/// A store of volumes, opened (and locked) once per process.
pub struct VolumeStore {
    store: Arc<Store>,
    inner: Mutex<Inner>,
    /// Bases loaded by open volumes, shared between their clones.
    frozen: Mutex<HashMap<u64, Weak<Layer>>>,
    _lock: Option<LockGuard>,
}

impl std::fmt::Debug for VolumeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeStore")
            .field("dir", &self.store.dir())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checks a volume name: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DedupError::Invalid(format!(
            "'{name}' is not a volume name (1 to {MAX_NAME} letters, digits, '.', '_' or '-', \
             not starting with '.')"
        )))
    }
}

/// Checks a volume size: a multiple of 4 KiB, from 4 KiB to 64 TiB.
pub fn check_size(size: u64) -> Result<()> {
    if size == 0 || size % BLOCK != 0 || size > MAX_VOLUME_SIZE {
        return Err(DedupError::Invalid(format!(
            "a volume size of {size} bytes: it must be a multiple of 4 KiB from 4 KiB to 64 TiB"
        )));
    }
    Ok(())
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<VolumeStore>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Weak<VolumeStore>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

impl VolumeStore {
    /// Makes a store of volumes in `dir` (a new or empty directory).
    pub fn create(fs: Arc<dyn Vfs>, dir: &Path) -> Result<()> {
        if fs.exists(&dir.join("store")) {
            return Err(DedupError::Invalid(format!(
                "{} already holds a dedup store",
                dir.display()
            )));
        }
        if fs.is_file(dir) {
            return Err(DedupError::Invalid(format!(
                "{} is a file, not a directory",
                dir.display()
            )));
        }
        if fs.exists(dir) {
            let entries = fs
                .list(dir)
                .map_err(|e| DedupError::io(format!("cannot list {}", dir.display()), e))?;
            if !entries.is_empty() {
                return Err(DedupError::Invalid(format!(
                    "{} is not empty: a store of volumes is made in a new or empty directory",
                    dir.display()
                )));
            }
        }
        let cfg = StoreConfig {
            hotspot_refs: 0,
            ..StoreConfig::default()
        };
        let store = Store::create(fs, dir, cfg)?;
        let tx = store.db().begin_write().map_err(|e| store.index_err(e))?;
        {
            let mut m = tx.open_table(VMETA).map_err(|e| store.index_err(e))?;
            m.insert("version", VERSION)
                .map_err(|e| store.index_err(e))?;
            m.insert("next_map", 1).map_err(|e| store.index_err(e))?;
            tx.open_table(VOLUMES).map_err(|e| store.index_err(e))?;
            tx.open_table(MAPS).map_err(|e| store.index_err(e))?;
            tx.open_table(BLOCKS).map_err(|e| store.index_err(e))?;
        }
        tx.commit().map_err(|e| store.index_err(e))?;
        Ok(())
    }

    /// Opens the store of volumes in `dir` of `fs`; with `lock`, takes its lock exclusively
    /// (refused while another process has it).
    pub fn open(fs: Arc<dyn Vfs>, dir: &Path, lock: bool) -> Result<Arc<VolumeStore>> {
        let sf = dir.join("store");
        if !fs.is_file(&sf) {
            return Err(DedupError::Invalid(format!(
                "{} is not a dedup store of volumes (make one with vstor dedup create {})",
                dir.display(),
                dir.display()
            )));
        }
        let guard = if lock {
            Some(
                fs.try_lock(&sf, true)
                    .map_err(|e| DedupError::io(format!("cannot lock {}", sf.display()), e))?
                    .ok_or_else(|| {
                        DedupError::InUse(format!(
                            "the dedup store {} is in use by another process (one process \
                             serves all volumes of a store)",
                            dir.display()
                        ))
                    })?,
            )
        } else {
            None
        };
        let store = Arc::new(Store::open(fs, dir)?);
        let version = {
            let tx = store.db().begin_read().map_err(|e| store.index_err(e))?;
            match tx.open_table(VMETA) {
                Ok(t) => t
                    .get("version")
                    .map_err(|e| store.index_err(e))?
                    .map(|v| v.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(store.index_err(e)),
            }
        };
        match version {
            Some(VERSION) => {}
            Some(v) => {
                return Err(DedupError::corrupt(
                    dir.join("index.redb").display().to_string(),
                    format!("volume tables of an unknown version {v}"),
                ))
            }
            None => {
                return Err(DedupError::Invalid(format!(
                    "{} is the chunk store of a dedup library, not a store of volumes (make \
                     one with vstor dedup create DIR)",
                    dir.display()
                )))
            }
        }
        let writer = store.shared_writer()?;
        Ok(Arc::new(VolumeStore {
            store,
            inner: Mutex::new(Inner {
                writer,
                dirty: BTreeMap::new(),
                open: HashMap::new(),
            }),
            frozen: Mutex::new(HashMap::new()),
            _lock: guard,
        }))
    }

    /// The store of volumes in `dir` on the host's file system, shared by everything in this
    /// process that opens it (the first opener takes its lock).
    pub fn shared(dir: &Path) -> Result<Arc<VolumeStore>> {
        let key = std::fs::canonicalize(dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DedupError::Invalid(format!(
                    "{} does not exist (make a store of volumes with vstor dedup create {})",
                    dir.display(),
                    dir.display()
                ))
            } else {
                DedupError::io(format!("cannot open {}", dir.display()), e)
            }
        })?;
        let mut reg = lock(registry());
        if let Some(vs) = reg.get(&key).and_then(Weak::upgrade) {
            return Ok(vs);
        }
        reg.retain(|_, w| w.strong_count() > 0);
        let vs = VolumeStore::open(Arc::new(RealFs), &key, true)?;
        reg.insert(key, Arc::downgrade(&vs));
        Ok(vs)
    }

    /// The chunk store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs `f` in one index transaction, committed with every block change waiting for a
    /// flush (so the index never has a volume's map and its refcounts out of step).
    fn transact<T>(
        &self,
        inner: &mut Inner,
        f: impl FnOnce(&redb::WriteTransaction, &mut BTreeMap<ChunkId, i64>) -> Result<T>,
    ) -> Result<T> {
        let dirty = std::mem::take(&mut inner.dirty);
        let store = self.store.clone();
        let r = inner.writer.commit_with(|tx, new| {
            let mut deltas = BTreeMap::new();
            apply_dirty(&store, tx, &dirty, &mut deltas)?;
            let out = f(tx, &mut deltas)?;
            store.adjust_refs(tx, &deltas, new)?;
            Ok(out)
        });
        if r.is_err() {
            // Nothing was committed: the batch waits for the next flush.
            inner.dirty = dirty;
        }
        r
    }

    /// Commits every block written since the last flush, of every volume of the store.
    pub fn flush(&self) -> Result<()> {
        let mut inner = lock(&self.inner);
        if inner.dirty.is_empty() && inner.writer.new_count() == 0 {
            return Ok(());
        }
        self.transact(&mut inner, |_, _| Ok(()))
    }

    /// Makes a volume of `size` bytes that reads as zeroes.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<()> {
        check_name(name)?;
        check_size(size)?;
        let mut inner = lock(&self.inner);
        let s = &self.store;
        self.transact(&mut inner, |tx, _| {
            let mut vt = tx.open_table(VOLUMES).map_err(|e| s.index_err(e))?;
            if vt.get(name).map_err(|e| s.index_err(e))?.is_some() {
                return Err(DedupError::Invalid(format!(
                    "volume {name} already exists in {}",
                    s.dir().display()
                )));
            }
            let map = new_map(s, tx, 0)?;
            let rec = VolumeRec {
                map,
                size,
                origin: String::new(),
            };
            vt.insert(name, &rec.encode()[..])
                .map_err(|e| s.index_err(e))?;
            Ok(())
        })
    }

    fn volume_rec(&self, name: &str) -> Result<VolumeRec> {
        let s = &self.store;
        let tx = s.db().begin_read().map_err(|e| s.index_err(e))?;
        let t = tx.open_table(VOLUMES).map_err(|e| s.index_err(e))?;
        let v = t.get(name).map_err(|e| s.index_err(e))?.ok_or_else(|| {
            DedupError::Missing(format!(
                "no volume {name} in the dedup store {}",
                s.dir().display()
            ))
        })?;
        VolumeRec::decode(name, v.value())
    }

    /// Whether the store has a volume `name`.
    pub fn has_volume(&self, name: &str) -> Result<bool> {
        match self.volume_rec(name) {
            Ok(_) => Ok(true),
            Err(DedupError::Missing(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes `new` an instant clone of `src`: it reads as `src` does now and shares every
    /// block with it until one of them writes the block. `src` must not be open.
    pub fn clone_volume(&self, src: &str, new: &str) -> Result<()> {
        check_name(new)?;
        let mut inner = lock(&self.inner);
        if inner.open.contains_key(src) {
            return Err(DedupError::InUse(format!(
                "volume {src} is open; clone it when it is closed"
            )));
        }
        let s = &self.store;
        self.transact(&mut inner, |tx, _| {
            let mut vt = tx.open_table(VOLUMES).map_err(|e| s.index_err(e))?;
            let mut rec = match vt.get(src).map_err(|e| s.index_err(e))? {
                Some(v) => VolumeRec::decode(src, v.value())?,
                None => {
                    return Err(DedupError::Missing(format!(
                        "no volume {src} in the dedup store {}",
                        s.dir().display()
                    )))
                }
            };
            if vt.get(new).map_err(|e| s.index_err(e))?.is_some() {
                return Err(DedupError::Invalid(format!(
                    "volume {new} already exists in {}",
                    s.dir().display()
                )));
            }
            let own_empty = {
                let bt = tx.open_table(BLOCKS).map_err(|e| s.index_err(e))?;
                let empty = bt
                    .range((rec.map, 0)..=(rec.map, u64::MAX))
                    .map_err(|e| s.index_err(e))?
                    .next()
                    .is_none();
                empty
            };
            let parent = map_rec(s, tx, rec.map)?.parent;
            let clone_map = if own_empty {
                // Nothing written since the last clone: stand on the same base.
                new_map(s, tx, parent)?
            } else {
                // Freeze the source's map as a base of both.
                let base = rec.map;
                rec.map = new_map(s, tx, base)?;
                let m = new_map(s, tx, base)?;
                // new_map counted both; the source volume no longer refers to the base itself.
                add_map_refs(s, tx, base, -1)?;
                vt.insert(src, &rec.encode()[..])
                    .map_err(|e| s.index_err(e))?;
                m
            };
            let nrec = VolumeRec {
                map: clone_map,
                size: rec.size,
                origin: src.to_string(),
            };
            vt.insert(new, &nrec.encode()[..])
                .map_err(|e| s.index_err(e))?;
            Ok(())
        })
    }

    /// Deletes a volume: its blocks' references are dropped (and its bases', where no other
    /// volume stands on them). `name` must not be open.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut inner = lock(&self.inner);
        if inner.open.contains_key(name) {
            return Err(DedupError::InUse(format!(
                "volume {name} is open; delete it when it is closed"
            )));
        }
        let s = &self.store;
        self.transact(&mut inner, |tx, deltas| {
            let rec = {
                let mut vt = tx.open_table(VOLUMES).map_err(|e| s.index_err(e))?;
                let rec = match vt.remove(name).map_err(|e| s.index_err(e))? {
                    Some(v) => VolumeRec::decode(name, v.value())?,
                    None => {
                        return Err(DedupError::Missing(format!(
                            "no volume {name} in the dedup store {}",
                            s.dir().display()
                        )))
                    }
                };
                rec
            };
            let mut m = rec.map;
            while m != 0 {
                if add_map_refs(s, tx, m, -1)? > 0 {
                    break;
                }
                let parent = map_rec(s, tx, m)?.parent;
                let mut bt = tx.open_table(BLOCKS).map_err(|e| s.index_err(e))?;
                let gone: Vec<((u64, u64), Option<ChunkId>)> = bt
                    .range((m, 0)..=(m, u64::MAX))
                    .map_err(|e| s.index_err(e))?
                    .map(|e| {
                        let (k, v) = e.map_err(|e| s.index_err(e))?;
                        Ok((k.value(), decode_block(v.value())?))
                    })
                    .collect::<Result<_>>()?;
                for (k, id) in gone {
                    bt.remove(k).map_err(|e| s.index_err(e))?;
                    if let Some(id) = id {
                        *deltas.entry(id).or_default() -= 1;
                    }
                }
                let mut mt = tx.open_table(MAPS).map_err(|e| s.index_err(e))?;
                mt.remove(m).map_err(|e| s.index_err(e))?;
                m = parent;
            }
            Ok(())
        })
    }

    /// The volumes, by name.
    pub fn list(&self) -> Result<Vec<VolumeInfo>> {
        let s = &self.store;
        let tx = s.db().begin_read().map_err(|e| s.index_err(e))?;
        let vt = tx.open_table(VOLUMES).map_err(|e| s.index_err(e))?;
        let mt = tx.open_table(MAPS).map_err(|e| s.index_err(e))?;
        let bt = tx.open_table(BLOCKS).map_err(|e| s.index_err(e))?;
        let mut out = Vec::new();
        for e in vt.iter().map_err(|e| s.index_err(e))? {
            let (k, v) = e.map_err(|e| s.index_err(e))?;
            let name = k.value().to_string();
            let rec = VolumeRec::decode(&name, v.value())?;
            // Top map first: the first map that has a block decides it.
            let mut seen: HashSet<u64> = HashSet::new();
            let (mut mapped, mut written) = (0u64, 0u64);
            let mut m = rec.map;
            let mut depth = 0;
            while m != 0 {
                for e in bt
                    .range((m, 0)..=(m, u64::MAX))
                    .map_err(|e| s.index_err(e))?
                {
                    let (k, v) = e.map_err(|e| s.index_err(e))?;
                    let (_, b) = k.value();
                    if seen.insert(b) && decode_block(v.value())?.is_some() {
                        mapped += BLOCK;
                        if depth == 0 {
                            written += BLOCK;
                        }
                    }
                }
                let mr = mt
                    .get(m)
                    .map_err(|e| s.index_err(e))?
                    .ok_or_else(|| missing_map(s, m))?;
                m = MapRec::decode(m, mr.value())?.parent;
                depth += 1;
                if depth > 1 << 20 {
                    return Err(DedupError::corrupt(
                        s.dir().display().to_string(),
                        format!("volume {name}: a cycle in its chain of bases"),
                    ));
                }
            }
            out.push(VolumeInfo {
                name,
                size: rec.size,
                mapped,
                written,
                origin: rec.origin,
            });
        }
        Ok(out)
    }

    /// Figures of the store.
    pub fn stats(&self) -> Result<VolumeStoreStats> {
        let vols = self.list()?;
        Ok(VolumeStoreStats {
            store: self.store.stats()?,
            volumes: vols.len() as u64,
            mapped: vols.iter().map(|v| v.mapped).sum(),
        })
    }

    /// Checks the index against itself: every chunk's refcount equals the references that
    /// block maps and streams hold, every referenced chunk is in the index, every map a volume
    /// or a map stands on exists with the right count. Returns the problems (empty: consistent).
    pub fn verify(&self) -> Result<Vec<String>> {
        let s = &self.store;
        let mut problems = Vec::new();
        let mut counts: HashMap<ChunkId, u64> = HashMap::new();
        for st in s.streams()?.values() {
            for c in &st.chunks {
                *counts.entry(*c).or_default() += 1;
            }
        }
        let tx = s.db().begin_read().map_err(|e| s.index_err(e))?;
        let vt = tx.open_table(VOLUMES).map_err(|e| s.index_err(e))?;
        let mt = tx.open_table(MAPS).map_err(|e| s.index_err(e))?;
        let bt = tx.open_table(BLOCKS).map_err(|e| s.index_err(e))?;
        let mut maps: BTreeMap<u64, MapRec> = BTreeMap::new();
        for e in mt.iter().map_err(|e| s.index_err(e))? {
            let (k, v) = e.map_err(|e| s.index_err(e))?;
            maps.insert(k.value(), MapRec::decode(k.value(), v.value())?);
        }
        let mut users: HashMap<u64, u64> = HashMap::new();
        for e in vt.iter().map_err(|e| s.index_err(e))? {
            let (k, v) = e.map_err(|e| s.index_err(e))?;
            *users
                .entry(VolumeRec::decode(k.value(), v.value())?.map)
                .or_default() += 1;
        }
        for m in maps.values() {
            if m.parent != 0 {
                *users.entry(m.parent).or_default() += 1;
            }
        }
        for (id, m) in &maps {
            let want = users.get(id).copied().unwrap_or(0);
            if m.refs != want || want == 0 {
                problems.push(format!(
                    "block map {id} counts {} users, {want} stand on it",
                    m.refs
                ));
            }
        }
        for id in users.keys() {
            if !maps.contains_key(id) {
                problems.push(format!("block map {id} is used but missing"));
            }
        }
        for e in bt.iter().map_err(|e| s.index_err(e))? {
            let (k, v) = e.map_err(|e| s.index_err(e))?;
            let (m, b) = k.value();
            if !maps.contains_key(&m) {
                problems.push(format!("block {b} of block map {m}, which does not exist"));
            }
            if let Some(id) = decode_block(v.value())? {
                *counts.entry(id).or_default() += 1;
            }
        }
        let chunks = s.chunks()?;
        let known: HashSet<ChunkId> = chunks.iter().map(|c| c.at.id).collect();
        for c in &chunks {
            let want = counts.get(&c.at.id).copied().unwrap_or(0);
            if c.refs != want {
                problems.push(format!(
                    "chunk {} has {} references, the maps and streams hold {want}",
                    hex(&c.at.id),
                    c.refs
                ));
            }
        }
        for id in counts.keys() {
            if !known.contains(id) {
                problems.push(format!("chunk {} is used but not in the index", hex(id)));
            }
        }
        Ok(problems)
    }

    /// Opens a volume.
    pub fn open_volume(self: &Arc<Self>, name: &str, read_only: bool) -> Result<Volume> {
        {
            let mut inner = lock(&self.inner);
            let e = inner.open.entry(name.to_string()).or_insert((0, false));
            if e.1 || (!read_only && e.0 > 0) {
                let (r, w) = *e;
                if (r, w) == (0, false) {
                    inner.open.remove(name);
                }
                return Err(DedupError::InUse(format!(
                    "volume {name} of {} is already open{}",
                    self.store.dir().display(),
                    if w { " for writing" } else { "" }
                )));
            }
            if read_only {
                e.0 += 1;
            } else {
                e.1 = true;
            }
        }
        let release = |vs: &VolumeStore| {
            let mut inner = lock(&vs.inner);
            if let Some(e) = inner.open.get_mut(name) {
                if read_only {
                    e.0 = e.0.saturating_sub(1);
                } else {
                    e.1 = false;
                }
                if *e == (0, false) {
                    inner.open.remove(name);
                }
            }
        };
        match self.load(name) {
            Ok((rec, own, parents)) => Ok(Volume {
                vs: self.clone(),
                name: name.to_string(),
                map: rec.map,
                size: rec.size,
                has_base: !parents.is_empty(),
                own: RwLock::new(own),
                parents,
                stripes: (0..64).map(|_| Mutex::new(())).collect(),
                read_only,
            }),
            Err(e) => {
                release(self);
                Err(e)
            }
        }
    }

    /// A volume's entry, its own map and its bases.
    fn load(&self, name: &str) -> Result<(VolumeRec, Layer, Vec<Arc<Layer>>)> {
        let rec = self.volume_rec(name)?;
        let s = &self.store;
        let tx = s.db().begin_read().map_err(|e| s.index_err(e))?;
        let mt = tx.open_table(MAPS).map_err(|e| s.index_err(e))?;
        let parent_of = |m: u64| -> Result<u64> {
            let v = mt
                .get(m)
                .map_err(|e| s.index_err(e))?
                .ok_or_else(|| missing_map(s, m))?;
            Ok(MapRec::decode(m, v.value())?.parent)
        };
        let own = self.load_layer(&tx, rec.map)?;
        let mut parents = Vec::new();
        let mut m = parent_of(rec.map)?;
        while m != 0 {
            if parents.len() > 1 << 16 {
                return Err(DedupError::corrupt(
                    s.dir().display().to_string(),
                    format!("volume {name}: a cycle in its chain of bases"),
                ));
            }
            let shared = lock(&self.frozen).get(&m).and_then(Weak::upgrade);
            let layer = match shared {
                Some(l) => l,
                None => {
                    let l = Arc::new(self.load_layer(&tx, m)?);
                    let mut fr = lock(&self.frozen);
                    fr.retain(|_, w| w.strong_count() > 0);
                    fr.insert(m, Arc::downgrade(&l));
                    l
                }
            };
            parents.push(layer);
            m = parent_of(m)?;
        }
        Ok((rec, own, parents))
    }

    fn load_layer(&self, tx: &redb::ReadTransaction, map: u64) -> Result<Layer> {
        let s = &self.store;
        let bt = tx.open_table(BLOCKS).map_err(|e| s.index_err(e))?;
        let mut ids: Vec<(u64, Option<ChunkId>)> = Vec::new();
        for e in bt
            .range((map, 0)..=(map, u64::MAX))
            .map_err(|e| s.index_err(e))?
        {
            let (k, v) = e.map_err(|e| s.index_err(e))?;
            ids.push((k.value().1, decode_block(v.value())?));
        }
        let mut at: HashMap<ChunkId, ChunkRef> = HashMap::new();
        let mut layer = Layer::with_capacity_and_hasher(ids.len(), Default::default());
        for (b, id) in ids {
            let slot = match id {
                None => Slot::Zero,
                Some(id) => {
                    let r = match at.get(&id) {
                        Some(r) => *r,
                        None => {
                            let r = s
                                .chunk(&id)?
                                .ok_or_else(|| {
                                    DedupError::Missing(format!(
                                        "block {b} of a volume names chunk {}, which is not in \
                                         the store {}",
                                        hex(&id),
                                        s.dir().display()
                                    ))
                                })?
                                .at;
                            at.insert(id, r);
                            r
                        }
                    };
                    Slot::Data(r)
                }
            };
            layer.insert(b, slot);
        }
        Ok(layer)
    }

    /// Puts a block's chunk (appending it unless the store has it, or a write since the last
    /// flush appended it), and records the block's change for the next flush.
    fn put_block(&self, map: u64, block: u64, id: ChunkId, data: &[u8]) -> Result<ChunkRef> {
        let mut inner = lock(&self.inner);
        let r = inner.writer.put_hashed(id, data)?;
        inner.dirty.insert((map, block), Change::Data(id));
        Ok(r)
    }

    fn drop_block(&self, map: u64, block: u64, change: Change) {
        lock(&self.inner).dirty.insert((map, block), change);
    }
}

impl Drop for VolumeStore {
    fn drop(&mut self) {
        // What was written and not flushed is committed when the store closes (as a file's
        // writes reach it when it is closed); a failure here is what a power cut would do.
        let _ = self.flush();
    }
}

fn missing_map(s: &Store, m: u64) -> DedupError {
    DedupError::corrupt(
        s.dir().join("index.redb").display().to_string(),
        format!("block map {m} is missing"),
    )
}

fn map_rec(s: &Store, tx: &redb::WriteTransaction, m: u64) -> Result<MapRec> {
    let mt = tx.open_table(MAPS).map_err(|e| s.index_err(e))?;
    let v = mt
        .get(m)
        .map_err(|e| s.index_err(e))?
        .ok_or_else(|| missing_map(s, m))?;
    MapRec::decode(m, v.value())
}

/// Adds `d` to a map's count of users; returns the new count.
fn add_map_refs(s: &Store, tx: &redb::WriteTransaction, m: u64, d: i64) -> Result<u64> {
    let mut rec = map_rec(s, tx, m)?;
    rec.refs = rec.refs.checked_add_signed(d).ok_or_else(|| {
        DedupError::corrupt(
            s.dir().join("index.redb").display().to_string(),
            format!("block map {m}: its count of users goes below 0"),
        )
    })?;
    let mut mt = tx.open_table(MAPS).map_err(|e| s.index_err(e))?;
    mt.insert(m, &rec.encode()[..])
        .map_err(|e| s.index_err(e))?;
    Ok(rec.refs)
}

/// A new empty map on `parent` (0: none), with one user; the parent gets one more.
fn new_map(s: &Store, tx: &redb::WriteTransaction, parent: u64) -> Result<u64> {
    let id = {
        let mut meta = tx.open_table(VMETA).map_err(|e| s.index_err(e))?;
        let id = meta
            .get("next_map")
            .map_err(|e| s.index_err(e))?
            .map_or(1, |v| v.value());
        meta.insert("next_map", id + 1)
            .map_err(|e| s.index_err(e))?;
        id
    };
    if parent != 0 {
        add_map_refs(s, tx, parent, 1)?;
    }
    let mut mt = tx.open_table(MAPS).map_err(|e| s.index_err(e))?;
    mt.insert(id, &MapRec { parent, refs: 1 }.encode()[..])
        .map_err(|e| s.index_err(e))?;
    Ok(id)
}

/// Writes the block changes into the maps and counts the references they move.
fn apply_dirty(
    s: &Store,
    tx: &redb::WriteTransaction,
    dirty: &BTreeMap<(u64, u64), Change>,
    deltas: &mut BTreeMap<ChunkId, i64>,
) -> Result<()> {
    if dirty.is_empty() {
        return Ok(());
    }
    let mut bt = tx.open_table(BLOCKS).map_err(|e| s.index_err(e))?;
    for (&k, c) in dirty {
        let old = bt
            .get(k)
            .map_err(|e| s.index_err(e))?
            .map(|v| decode_block(v.value()))
            .transpose()?;
        if let Some(Some(id)) = old {
            *deltas.entry(id).or_default() -= 1;
        }
        match c {
            Change::Data(id) => {
                bt.insert(k, &id[..]).map_err(|e| s.index_err(e))?;
                *deltas.entry(*id).or_default() += 1;
            }
            Change::Zero => {
                bt.insert(k, &[][..]).map_err(|e| s.index_err(e))?;
            }
            Change::Gone => {
                bt.remove(k).map_err(|e| s.index_err(e))?;
            }
        }
    }
    Ok(())
}

/// An open volume: a [`BlockDevice`] of 512-byte sectors over 4 KiB blocks.
pub struct Volume {
    vs: Arc<VolumeStore>,
    name: String,
    map: u64,
    size: u64,
    has_base: bool,
    /// Its own map, with the writes not yet flushed.
    own: RwLock<Layer>,
    /// Its bases, nearest first.
    parents: Vec<Arc<Layer>>,
    /// Serializes read-modify-writes of a block (writes of part of it).
    stripes: Vec<Mutex<()>>,
    read_only: bool,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish()
    }
}

fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    let rest = words.remainder();
    words
        .into_iter()
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8")) == 0)
        && rest.iter().all(|&x| x == 0)
}

impl Volume {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The store it is a volume of.
    pub fn store(&self) -> &Arc<VolumeStore> {
        &self.vs
    }

    /// Where block `b` comes from: its slot and the depth of the map that holds it (1: its
    /// own map), or `None` (it reads as zeroes).
    fn slot(&self, b: u64) -> Option<(Slot, u32)> {
        if let Some(s) = self.own.read().unwrap_or_else(|p| p.into_inner()).get(&b) {
            return Some((*s, 1));
        }
        self.parents
            .iter()
            .enumerate()
            .find_map(|(i, l)| l.get(&b).map(|s| (*s, i as u32 + 2)))
    }

    fn read_block(&self, b: u64, out: &mut [u8]) -> Result<()> {
        match self.slot(b) {
            Some((Slot::Data(r), _)) => {
                let data = self.vs.store.read_chunk(&r)?;
                if data.len() != BLOCK as usize {
                    return Err(DedupError::corrupt(
                        self.vs.store.dir().display().to_string(),
                        format!(
                            "volume {} block {b}: chunk {} holds {} bytes, not a block",
                            self.name,
                            hex(&r.id),
                            data.len()
                        ),
                    ));
                }
                out.copy_from_slice(&data);
            }
            _ => out.fill(0),
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (both within the volume).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        let mut tmp = vec![0u8; BLOCK as usize];
        while done < buf.len() {
            let pos = offset + done as u64;
            let (b, within) = (pos / BLOCK, (pos % BLOCK) as usize);
            let n = (BLOCK as usize - within).min(buf.len() - done);
            if n == BLOCK as usize {
                self.read_block(b, &mut buf[done..done + n])?;
            } else {
                self.read_block(b, &mut tmp)?;
                buf[done..done + n].copy_from_slice(&tmp[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// Writes a whole block.
    fn write_block(&self, b: u64, data: &[u8]) -> Result<()> {
        if is_zero(data) {
            return self.zero_block(b);
        }
        let id = chunk_id(data);
        let r = self.vs.put_block(self.map, b, id, data)?;
        self.own
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(b, Slot::Data(r));
        Ok(())
    }

    /// Drops a block's reference: it reads as zeroes.
    fn zero_block(&self, b: u64) -> Result<()> {
        let mut own = self.own.write().unwrap_or_else(|p| p.into_inner());
        if self.has_base {
            self.vs.drop_block(self.map, b, Change::Zero);
            own.insert(b, Slot::Zero);
        } else {
            if own.remove(&b).is_none() {
                // Nothing there: nothing to commit either (a discard of a hole).
                return Ok(());
            }
            self.vs.drop_block(self.map, b, Change::Gone);
        }
        Ok(())
    }

    /// Writes `data` at `offset` (both within the volume). Parts of blocks are read, changed
    /// and written whole.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.for_blocks(offset, data.len() as u64, |b, within, range| {
            let part = &data[range];
            if part.len() == BLOCK as usize {
                self.write_block(b, part)
            } else {
                let mut cur = vec![0u8; BLOCK as usize];
                self.read_block(b, &mut cur)?;
                cur[within..within + part.len()].copy_from_slice(part);
                self.write_block(b, &cur)
            }
        })
    }

    /// Makes `len` bytes at `offset` read as zeroes; whole blocks drop their references.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.for_blocks(offset, len, |b, within, range| {
            if range.len() == BLOCK as usize {
                self.zero_block(b)
            } else {
                let mut cur = vec![0u8; BLOCK as usize];
                self.read_block(b, &mut cur)?;
                cur[within..within + range.len()].fill(0);
                self.write_block(b, &cur)
            }
        })
    }

    /// Runs `f(block, offset in it, range of the request)` for each block of a range, under
    /// the block's stripe lock.
    fn for_blocks(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let (b, within) = (pos / BLOCK, pos % BLOCK);
            let n = (BLOCK - within).min(len - done);
            let range = done as usize..(done + n) as usize;
            // Every write of a block, whole or part, runs under the block's stripe lock: the
            // batch the next flush commits and the map reads use are updated by one writer of
            // the block at a time, in the same order (two racing writes of one block once left
            // the one read and the one committed different).
            let _g = lock(&self.stripes[(b % self.stripes.len() as u64) as usize]);
            f(b, within as usize, range)?;
            done += n;
        }
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.vs.flush()
    }

    fn run_all(&self, reqs: &mut [Request<'_>]) {
        for req in reqs {
            let r = self.run(req);
            req.complete(r);
        }
    }

    fn run(&self, req: &mut Request<'_>) -> CoreResult<()> {
        self.info().check(req)?;
        match &mut req.op {
            Op::Read { offset, bufs } => {
                if bufs.len() == 1 {
                    self.read(*offset, &mut bufs[0])?;
                } else {
                    let len: usize = bufs.iter().map(|b| b.len()).sum();
                    let mut tmp = vec![0u8; len];
                    self.read(*offset, &mut tmp)?;
                    copy_into_bufs(bufs, 0, &tmp);
                }
                Ok(())
            }
            Op::Write { offset, bufs } => {
                if bufs.len() == 1 {
                    self.write(*offset, &bufs[0])?;
                } else {
                    let len: usize = bufs.iter().map(|b| b.len()).sum();
                    let mut tmp = vec![0u8; len];
                    copy_from_bufs(bufs, 0, &mut tmp);
                    self.write(*offset, &tmp)?;
                }
                Ok(())
            }
            Op::Flush => Ok(self.flush()?),
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                Ok(self.zero(*offset, *len)?)
            }
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.vs.flush();
        }
        let mut inner = lock(&self.vs.inner);
        if let Some(e) = inner.open.get_mut(&self.name) {
            if self.read_only {
                e.0 = e.0.saturating_sub(1);
            } else {
                e.1 = false;
            }
            if *e == (0, false) {
                inner.open.remove(&self.name);
            }
        }
    }
}

impl BlockDevice for Volume {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            capacity: self.size,
            logical_sector_size: 512,
            physical_sector_size: BLOCK as u32,
            mem_alignment: 1,
            read_only: self.read_only,
            discard_zeroes: true,
            supports: Supports {
                flush: true,
                discard: true,
                write_zeroes: true,
                resize: false,
            },
        }
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        self.run_all(batch);
    }

    fn describe(&self) -> String {
        format!(
            "dedup volume {} of {}",
            self.name,
            self.vs.store.dir().display()
        )
    }

    fn allocation(&self, offset: u64, len: u64) -> CoreResult<Vec<Extent>> {
        vstor_core::check_range(self.size, offset, len)?;
        let mut out = Vec::new();
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let n = (BLOCK - pos % BLOCK).min(len - done);
            let e = match self.slot(pos / BLOCK) {
                Some((Slot::Data(_), depth)) => Extent::data(n, depth),
                _ => Extent::hole(n),
            };
            vstor_core::push_extent(&mut out, e);
            done += n;
        }
        Ok(out)
    }
}
