//! Convert: copy any block device (a VHDX chain flattened, a raw file, a legacy VHD) into a
//! new VHDX (dynamic or fixed) or raw file, keeping zero regions unallocated.
//!
//! The copy reads in 1 MiB pieces, several per batch (so the file backend keeps them in
//! flight together), skips what the source's allocation map says holds no data without
//! reading it, and writes only the 64 KiB runs that are not all zeros: a dynamic VHDX gets no
//! block for a zero region and a raw file keeps a hole there.

use std::path::Path;
use std::sync::Arc;

use vstor_core::{BlockDevice, Error, FileDevice, FileOptions, Job, Request, Result};

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
pub type AllocationMap<'a> = &'a dyn Fn(u64, u64) -> Result<Vec<(u64, Fill)>>;

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
    let info = src.info();
    let size = info.capacity;
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
            f.set_len(size)
                .map_err(|e| Error::io(format!("cannot size {}", dst.display()), e))?;
            drop(f);
            Arc::new(FileDevice::open(dst, &FileOptions::default())?)
        }
    };
    let r = copy_all(src, map, &*out, true, job);
    let r = r.and_then(|rep| {
        out.flush()?;
        Ok(rep)
    });
    drop(out);
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r
}

/// Copies `src` into `dst` (same size or larger) as `map` says (everything when `None`).
/// With `dst_is_zero`, `dst` reads as zeros where nothing is written, so zero runs of data
/// are not written.
pub fn copy_all(
    src: &dyn BlockDevice,
    map: Option<AllocationMap<'_>>,
    dst: &dyn BlockDevice,
    dst_is_zero: bool,
    job: &Job,
) -> Result<ConvertReport> {
    let size = src.capacity();
    let mut rep = ConvertReport {
        size,
        ..Default::default()
    };
    let window = PIECE * DEPTH;
    let mut bufs: Vec<Vec<u8>> = (0..DEPTH).map(|_| vec![0u8; PIECE as usize]).collect();
    let mut pos = 0u64;
    while pos < size {
        job.check("convert")?;
        let len = window.min(size - pos);
        let pieces = match map {
            Some(m) => m(pos, len)?,
            None => vec![(len, Fill::Data)],
        };
        // The data ranges of this window, cut into pieces.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut at = pos;
        for (n, fill) in pieces {
            if fill == Fill::Zero {
                dst.write_zeroes(at, n)?;
                rep.written_bytes += n;
            }
            if fill == Fill::Data {
                let mut o = at;
                while o < at + n {
                    let l = (at + n - o).min(PIECE - (o - pos) % PIECE);
                    ranges.push((o, l));
                    o += l;
                }
            }
            at += n;
        }
        if !ranges.is_empty() {
            let mut reads: Vec<Request<'_>> = Vec::with_capacity(ranges.len());
            let mut rest: &mut [Vec<u8>] = &mut bufs;
            // Several ranges may share a piece's buffer: carve each buffer in order.
            let mut cur: Option<(&mut [u8], u64)> = None;
            for &(o, l) in &ranges {
                let piece = (o - pos) / PIECE;
                let need_new = cur.as_ref().is_none_or(|(_, p)| *p != piece);
                if need_new {
                    let (first, tail) = std::mem::take(&mut rest)
                        .split_first_mut()
                        .expect("one buffer per piece");
                    rest = tail;
                    let skip = ((o - pos) % PIECE) as usize;
                    cur = Some((&mut first[skip..], piece));
                }
                let (b, p) = cur.take().expect("set");
                let (head, tail) = b.split_at_mut(l as usize);
                reads.push(Request::read(o, head));
                cur = Some((tail, p));
            }
            src.submit_all(&mut reads)?;
            drop(reads);
            rep.read_bytes += ranges.iter().map(|r| r.1).sum::<u64>();
            // Non-zero runs, written together.
            let mut writes: Vec<(u64, usize, usize, usize)> = Vec::new();
            let mut bi = 0usize;
            let mut last_piece = u64::MAX;
            let mut boff = 0usize;
            for &(o, l) in &ranges {
                let piece = (o - pos) / PIECE;
                if piece != last_piece {
                    if last_piece != u64::MAX {
                        bi += 1;
                    }
                    last_piece = piece;
                    boff = ((o - pos) % PIECE) as usize;
                }
                let mut s = 0usize;
                while s < l as usize {
                    let e = (s + ZERO_RUN - (o as usize + s) % ZERO_RUN).min(l as usize);
                    if !dst_is_zero || !is_zero(&bufs[bi][boff + s..boff + e]) {
                        match writes.last_mut() {
                            Some(w) if w.1 == bi && w.0 + (w.3 - w.2) as u64 == o + s as u64 => {
                                w.3 = boff + e
                            }
                            _ => writes.push((o + s as u64, bi, boff + s, boff + e)),
                        }
                    }
                    s = e;
                }
                boff += l as usize;
            }
            if !writes.is_empty() {
                let mut reqs: Vec<Request<'_>> = writes
                    .iter()
                    .map(|&(o, b, s, e)| Request::write(o, &bufs[b][s..e]))
                    .collect();
                dst.submit_all(&mut reqs)?;
                rep.written_bytes += writes.iter().map(|w| (w.3 - w.2) as u64).sum::<u64>();
            }
        }
        pos += len;
        job.report(pos, size);
    }
    Ok(rep)
}
