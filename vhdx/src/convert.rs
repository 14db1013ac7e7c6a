//! Convert: copy any block device (a VHDX chain flattened, a raw file, a legacy VHD) into a
//! new VHDX (dynamic or fixed) or raw file, keeping zero regions unallocated.
//!
//! The copy reads in 1 MiB pieces, several per batch (so the file backend keeps them in
//! flight together), skips what the source's allocation map says holds no data without
//! reading it, and writes only the 64 KiB runs that are not all zeros: a dynamic VHDX gets no
//! block for a zero region and a raw file keeps a hole there.

use std::path::Path;
use std::sync::Arc;

use vstor_core::{
    BlockDevice, Error, FileDevice, FileOptions, ImageLock, Job, LockMode, Request, Result,
};

use crate::create::CreateOptions;
use crate::disk::{Src, Vhdx};
use crate::format::MIB;

/// What a copy does with a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Read it and write it (zero runs are skipped when the destination reads as zeros).
    Data,
    /// Write zeros there (write-zeroes, no read).
    Zero,
    /// Leave the destination as it is.
    Skip,
}

/// What to do with each part of a range: consecutive (length, fill) pieces.
pub type AllocationMap<'a> = &'a (dyn Fn(u64, u64) -> Result<Vec<(u64, Fill)>> + Sync);

/// The output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A VHDX file.
    Vhdx,
    /// A raw (sparse) file.
    Raw,
}

/// How to convert.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The output format.
    pub format: Format,
    /// A fixed VHDX (every block allocated) rather than a dynamic one.
    pub fixed: bool,
    /// The VHDX block size (the default when `None`).
    pub block_size: Option<u32>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: Format::Vhdx,
            fixed: false,
            block_size: None,
        }
    }
}

/// What a conversion did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConvertReport {
    /// The virtual size.
    pub size: u64,
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Bytes written to the output (zero runs are not written).
    pub written_bytes: u64,
}

/// The piece size of reads.
const PIECE: u64 = MIB;
/// Pieces per batch.
const DEPTH: u64 = 8;
/// The granularity of zero detection.
const ZERO_RUN: usize = 64 * 1024;

impl Vhdx {
    /// What a copy of [offset, offset+len) of this disk needs, as consecutive pieces.
    ///
    /// With `into: None` (a flattening copy onto zeros): what holds data anywhere in the chain
    /// is [`Fill::Data`], the rest [`Fill::Skip`]. With `into: Some(k)` (a merge into the
    /// ancestor `k` levels up): what this disk or the ones between hold is `Data`, or `Zero`
    /// where they say zeros over the ancestor's data; what the ancestor itself holds is `Skip`.
    pub fn fills(&self, offset: u64, len: u64, into: Option<usize>) -> Result<Vec<(u64, Fill)>> {
        let mut out: Vec<(u64, Fill)> = Vec::new();
        self.fills_into(offset, len, into, &mut out)?;
        Ok(out)
    }

    fn fills_into(
        &self,
        offset: u64,
        len: u64,
        into: Option<usize>,
        out: &mut Vec<(u64, Fill)>,
    ) -> Result<()> {
        let push = |out: &mut Vec<(u64, Fill)>, n: u64, f: Fill| match out.last_mut() {
            Some((l, pf)) if *pf == f => *l += n,
            _ => out.push((n, f)),
        };
        let zero = if into.is_some() {
            Fill::Zero
        } else {
            Fill::Skip
        };
        for (n, src) in self.locate(offset, len)? {
            match src {
                Src::File(_) => push(out, n, Fill::Data),
                Src::Zero => push(out, n, zero),
                Src::Parent(_) if into == Some(1) => push(out, n, Fill::Skip),
                Src::Parent(off) => match self.parent() {
                    Some(p) => {
                        let inside = p.capacity().saturating_sub(off).min(n);
                        if inside > 0 {
                            p.fills_into(off, inside, into.map(|k| k - 1), out)?;
                        }
                        if n > inside {
                            push(out, n - inside, zero);
                        }
                    }
                    None => push(out, n, zero),
                },
            }
        }
        Ok(())
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (words, rest) = b.split_at(b.len() / 16 * 16);
    words
        .chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16")) == 0)
        && rest.iter().all(|&x| x == 0)
}

/// Copies `src` into a new file at `dst` (which must not exist). `map` is the source's
/// allocation map, when it has one; without it every byte is read and zero runs are detected.
/// On failure or cancellation the partial output is removed.
pub fn convert(
    src: &dyn BlockDevice,
    map: Option<AllocationMap<'_>>,
    dst: &Path,
    opts: &ConvertOptions,
    job: &Job,
) -> Result<ConvertReport> {
    convert_with_tail(src, map, &[], dst, opts, job, &|_| Ok(0))
}

/// [`convert`], then `finish` on the new image before it is flushed and closed (a live clone
/// copies there, with I/O paused, what changed during the copy). `finish` returns the bytes it
/// wrote.
pub fn convert_finishing(
    src: &dyn BlockDevice,
    map: Option<AllocationMap<'_>>,
    dst: &Path,
    opts: &ConvertOptions,
    job: &Job,
    finish: &dyn Fn(&dyn BlockDevice) -> Result<u64>,
) -> Result<ConvertReport> {
    convert_with_tail(src, map, &[], dst, opts, job, finish)
}

/// Copies the raw file (or block device) at `src` into a new file at `dst`, as [`convert`]
/// does; holes are not read (SEEK_DATA/SEEK_HOLE). A file whose size is not a whole number of
/// sectors keeps every byte: the output is rounded up to the next sector and its last sector
/// holds the file's tail followed by zeros (as `qemu-img convert` does). The source is opened
/// read-only with `file` (its locking, engine).
pub fn convert_file(
    src: &Path,
    file: &FileOptions,
    dst: &Path,
    opts: &ConvertOptions,
    job: &Job,
) -> Result<ConvertReport> {
    let f = FileDevice::open(
        src,
        &FileOptions {
            read_only: true,
            ..file.clone()
        },
    )?;
    let whole = f.capacity();
    let meta = std::fs::metadata(src)
        .map_err(|e| Error::io(format!("cannot open {}", src.display()), e))?;
    let mut tail = Vec::new();
    if meta.is_file() && meta.len() > whole {
        use std::os::unix::fs::FileExt;
        // Less than one sector: the device ends at the last whole one.
        let n = (meta.len() - whole).min(u64::from(f.info().logical_sector_size) - 1);
        tail = vec![0u8; n as usize];
        std::fs::File::open(src)
            .and_then(|h| h.read_exact_at(&mut tail, whole))
            .map_err(|e| {
                Error::io(
                    format!("cannot read the last {n} bytes of {}", src.display()),
                    e,
                )
            })?;
    }
    let map = |o: u64, l: u64| -> Result<Vec<(u64, Fill)>> {
        Ok(f.data_ranges(o, l)?
            .into_iter()
            .map(|(n, d)| (n, if d { Fill::Data } else { Fill::Skip }))
            .collect())
    };
    convert_with_tail(&f, Some(&map), &tail, dst, opts, job, &|_| Ok(0))
}

/// [`convert`], and `tail` (shorter than a sector) goes after the end of `src`, in one more
/// sector padded with zeros.
fn convert_with_tail(
    src: &dyn BlockDevice,
    map: Option<AllocationMap<'_>>,
    tail: &[u8],
    dst: &Path,
    opts: &ConvertOptions,
    job: &Job,
    finish: &dyn Fn(&dyn BlockDevice) -> Result<u64>,
) -> Result<ConvertReport> {
    let info = src.info();
    let sector = u64::from(info.logical_sector_size);
    let size = if tail.is_empty() {
        info.capacity
    } else {
        info.capacity + sector
    };
    let out: Arc<dyn BlockDevice> = match opts.format {
        Format::Vhdx => {
            let mut c = if opts.fixed {
                CreateOptions::fixed(size)
            } else {
                CreateOptions::dynamic(size)
            }
            .logical_sector_size(info.logical_sector_size);
            if let Some(b) = opts.block_size {
                c = c.block_size(b);
            }
            Arc::new(Vhdx::create(dst, &c)?)
        }
        Format::Raw => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dst)
                .map_err(|e| Error::io(format!("cannot create {}", dst.display()), e))?;
            let opened = f
                .set_len(size)
                .map_err(|e| Error::io(format!("cannot size {}", dst.display()), e))
                .and_then(|()| {
                    drop(f);
                    FileDevice::open(dst, &FileOptions::default())
                });
            match opened {
                Ok(d) => Arc::new(d),
                Err(e) => {
                    let _ = std::fs::remove_file(dst);
                    return Err(e);
                }
            }
        }
    };
    // The output is this copy's alone while it is written: another process that opens it (a
    // writer, or a reader of a half-made image) is refused as in use, as for every writer.
    let lock = match ImageLock::acquire(dst, LockMode::Exclusive) {
        Ok(l) => l,
        Err(e) => {
            drop(out);
            let _ = std::fs::remove_file(dst);
            return Err(e);
        }
    };
    let r = copy_all(src, map, &*out, true, job);
    let r = r.and_then(|mut rep| {
        if !tail.is_empty() {
            let mut last = vec![0u8; sector as usize];
            last[..tail.len()].copy_from_slice(tail);
            rep.read_bytes += tail.len() as u64;
            if !is_zero(&last) {
                out.write_at(info.capacity, &last)?;
                rep.written_bytes += sector;
            }
            rep.size = size;
        }
        rep.written_bytes += finish(&*out)?;
        out.flush()?;
        Ok(rep)
    });
    drop(out);
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    drop(lock);
    r
}

/// One window of the copy, read and ready to write.
struct Window {
    /// Data ranges with their bytes.
    data: Vec<(u64, Vec<u8>)>,
    /// Ranges to zero.
    zeros: Vec<(u64, u64)>,
    /// Where the window ends.
    end: u64,
}

/// Copies `src` into `dst` (same size or larger) as `map` says (everything when `None`).
/// With `dst_is_zero`, `dst` reads as zeros where nothing is written, so zero runs of data
/// are not written. Reading and writing overlap: one thread reads the next window while the
/// caller's thread writes the last one.
pub fn copy_all(
    src: &dyn BlockDevice,
    map: Option<AllocationMap<'_>>,
    dst: &dyn BlockDevice,
    dst_is_zero: bool,
    job: &Job,
) -> Result<ConvertReport> {
    copy_range(src, map, dst, dst_is_zero, 0..src.capacity(), job)
}

/// [`copy_all`] of the byte range `range` only (the report's `size` is the range's length).
pub fn copy_range(
    src: &dyn BlockDevice,
    map: Option<AllocationMap<'_>>,
    dst: &dyn BlockDevice,
    dst_is_zero: bool,
    range: std::ops::Range<u64>,
    job: &Job,
) -> Result<ConvertReport> {
    let (start, size) = (range.start, range.end);
    let window = PIECE * DEPTH;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Window>>(2);
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|sc| {
        // The writer owns the receiving end: whatever way it returns (an error, a
        // cancellation), the channel closes with it, so a reader blocked on a full channel
        // wakes up and stops instead of waiting for good (the scope joins it).
        let rx = rx;
        sc.spawn(move || {
            let read_one = |pos: u64| -> Result<Window> {
                let len = window.min(size - pos);
                let pieces = match map {
                    Some(m) => m(pos, len)?,
                    None => vec![(len, Fill::Data)],
                };
                let mut w = Window {
                    data: Vec::new(),
                    zeros: Vec::new(),
                    end: pos + len,
                };
                let mut at = pos;
                for (n, fill) in pieces {
                    match fill {
                        Fill::Zero => w.zeros.push((at, n)),
                        Fill::Skip => {}
                        Fill::Data => {
                            let mut o = at;
                            while o < at + n {
                                let l = (at + n - o).min(PIECE - (o - pos) % PIECE);
                                let mut b = back_rx
                                    .try_recv()
                                    .unwrap_or_else(|_| vec![0u8; PIECE as usize]);
                                b.truncate(l as usize);
                                w.data.push((o, b));
                                o += l;
                            }
                        }
                    }
                    at += n;
                }
                let mut reads: Vec<Request<'_>> = w
                    .data
                    .iter_mut()
                    .map(|(o, b)| Request::read(*o, b))
                    .collect();
                src.submit_all(&mut reads)?;
                drop(reads);
                Ok(w)
            };
            let mut pos = start;
            while pos < size {
                if job.is_cancelled() {
                    return;
                }
                let w = read_one(pos);
                if job.is_cancelled() {
                    return;
                }
                let stop = w.is_err();
                pos = w.as_ref().map(|w| w.end).unwrap_or(size);
                if tx.send(w).is_err() || stop {
                    return;
                }
            }
        });
        let mut rep = ConvertReport {
            size: size - start,
            ..Default::default()
        };
        let mut pos = start;
        while pos < size {
            job.check("convert")?;
            let w = rx
                .recv()
                .map_err(|_| Error::Cancelled("convert".into()))??;
            for &(o, n) in &w.zeros {
                dst.write_zeroes(o, n)?;
                rep.written_bytes += n;
            }
            let mut runs: Vec<(u64, &[u8])> = Vec::new();
            for (o, b) in &w.data {
                rep.read_bytes += b.len() as u64;
                let mut s = 0usize;
                while s < b.len() {
                    let e = (s + ZERO_RUN - (*o as usize + s) % ZERO_RUN).min(b.len());
                    let piece = &b[s..e];
                    if !dst_is_zero || !is_zero(piece) {
                        let at = *o + s as u64;
                        match runs.last_mut() {
                            Some((ro, rb)) if *ro + rb.len() as u64 == at && s > 0 => {
                                *rb = &b[(*ro - *o) as usize..e];
                            }
                            _ => runs.push((at, piece)),
                        }
                    }
                    s = e;
                }
            }
            if !runs.is_empty() {
                let mut reqs: Vec<Request<'_>> =
                    runs.iter().map(|&(o, b)| Request::write(o, b)).collect();
                dst.submit_all(&mut reqs)?;
                rep.written_bytes += runs.iter().map(|r| r.1.len() as u64).sum::<u64>();
            }
            drop(runs);
            for (_, mut b) in w.data {
                b.resize(PIECE as usize, 0);
                let _ = back_tx.send(b);
            }
            pos = w.end;
            job.report(pos - start, size - start);
        }
        Ok(rep)
    })
}
