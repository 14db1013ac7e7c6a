//! A member as a read-only open sees it after replaying the parity journal in memory: reads
//! come from the member with the replay's writes laid over them; writes (the replay's data and
//! checksum pages), flushes, discards and write-zeroes stay in memory. The member itself is
//! never written. What it holds is bounded by the journal: at most [`JOURNAL_SIZE`] of
//! records per member, and the checksum pages they change.
//!
//! [`JOURNAL_SIZE`]: crate::format::JOURNAL_SIZE

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use vstor_core::{copy_from_bufs, copy_into_bufs, BlockDevice, DeviceInfo, Op, Request};

/// Bytes of one block of the overlay.
const B: u64 = 512;

/// Fills part of a block: (offset of the part in the write, the part).
type Fill<'a> = &'a dyn Fn(usize, &mut [u8]);

pub(crate) struct RamOverlay {
    inner: Arc<dyn BlockDevice>,
    /// Blocks written, by index (`offset / B`).
    blocks: RwLock<BTreeMap<u64, Box<[u8]>>>,
}

impl RamOverlay {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        RamOverlay {
            inner,
            blocks: RwLock::new(BTreeMap::new()),
        }
    }

    /// Lays `src` (or zeroes) over `[offset, offset + len)`, whole blocks.
    fn put(&self, offset: u64, len: u64, src: Option<Fill<'_>>) {
        if len == 0 {
            return;
        }
        let mut blocks = self.blocks.write().unwrap_or_else(|p| p.into_inner());
        for b in offset / B..(offset + len).div_ceil(B) {
            let (lo, hi) = ((b * B).max(offset), ((b + 1) * B).min(offset + len));
            // Whole blocks only: `run` let through only requests aligned to the member's
            // sectors, which are whole blocks.
            debug_assert!(hi - lo == B);
            let block = blocks
                .entry(b)
                .or_insert_with(|| vec![0u8; B as usize].into_boxed_slice());
            let dst = &mut block[(lo - b * B) as usize..(hi - b * B) as usize];
            match src {
                Some(f) => f((lo - offset) as usize, dst),
                None => dst.fill(0),
            }
        }
    }

    /// Copies the overlay's blocks in `[offset, offset + len)` into a read's buffers.
    fn patch(&self, offset: u64, len: u64, bufs: &mut vstor_core::ReadBufs<'_>) {
        if len == 0 {
            return;
        }
        let blocks = self.blocks.read().unwrap_or_else(|p| p.into_inner());
        for (&b, block) in blocks.range(offset / B..(offset + len).div_ceil(B)) {
            let (lo, hi) = ((b * B).max(offset), ((b + 1) * B).min(offset + len));
            copy_into_bufs(
                bufs,
                (lo - offset) as usize,
                &block[(lo - b * B) as usize..(hi - b * B) as usize],
            );
        }
    }

    /// Whether nothing was written to the overlay.
    pub fn is_empty(&self) -> bool {
        self.blocks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn run(&self, req: &mut Request<'_>) {
        let offset = req.offset();
        let len = req.len();
        // The member's rules for a request (size, alignment), but for being read-only: the
        // overlay takes the writes.
        let mut info = self.inner.info();
        info.read_only = false;
        if let Err(e) = info.check(req) {
            req.complete(Err(e));
            return;
        }
        match &req.op {
            Op::Write { bufs, .. } => self.put(
                offset,
                len,
                Some(&|skip, dst: &mut [u8]| {
                    copy_from_bufs(bufs, skip, dst);
                }),
            ),
            Op::Discard { .. } | Op::WriteZeroes { .. } => self.put(offset, len, None),
            Op::Flush => {}
            Op::Read { .. } => {
                self.inner.submit(std::slice::from_mut(req));
                if req.result().is_ok() {
                    if let Op::Read { bufs, .. } = &mut req.op {
                        self.patch(offset, len, bufs);
                    }
                }
                return;
            }
        }
        req.complete(Ok(()));
    }
}

impl BlockDevice for RamOverlay {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        if batch.iter().all(|r| matches!(r.op, Op::Read { .. })) {
            // The usual batch of a read-only pool: the member reads it whole, then the overlay
            // is laid over what it read.
            self.inner.submit(batch);
            for req in batch.iter_mut() {
                let (offset, len) = (req.offset(), req.len());
                if req.result().is_ok() {
                    if let Op::Read { bufs, .. } = &mut req.op {
                        self.patch(offset, len, bufs);
                    }
                }
            }
            return;
        }
        for req in batch.iter_mut() {
            self.run(req);
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} (with a journal replay held in memory)",
            self.inner.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_core::MemoryDevice;

    #[test]
    fn reads_see_the_writes_and_the_member_never_changes() {
        let mem = Arc::new(MemoryDevice::new(64 << 10).unwrap());
        let base: Vec<u8> = (0..64u32 << 10).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_at(0, &base).unwrap();
        let o = RamOverlay::new(mem.clone());
        let mut want = base.clone();
        // Blocks alone and in runs, then zeroes.
        for (at, data) in [
            (4096u64, vec![1u8; 1024]),
            (512, vec![2u8; 512]),
            (7680, vec![3u8; 1536]),
        ] {
            o.write_at(at, &data).unwrap();
            want[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
        o.write_zeroes(19_968, 3072).unwrap();
        want[19_968..23_040].fill(0);
        // What the member would refuse, the overlay refuses.
        assert!(o.write_at(700, &[9u8; 100]).is_err());
        o.flush().unwrap();
        let mut got = vec![0u8; 64 << 10];
        o.read_at(0, &mut got).unwrap();
        assert!(got == want);
        // A read in two buffers that split inside a written block, in a batch of reads.
        let (mut a, mut b) = (vec![0u8; 333], vec![0u8; 2227]);
        {
            let mut batch = [Request::readv(512, [&mut a[..], &mut b[..]])];
            o.submit_all(&mut batch).unwrap();
        }
        assert!(a[..] == want[512..845] && b[..] == want[845..3072]);
        let mut under = vec![0u8; 64 << 10];
        mem.read_at(0, &mut under).unwrap();
        assert!(under == base, "the member was written");
    }
}
