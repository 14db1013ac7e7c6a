//! Scrub: every block of every allocated extent checked against its checksum, online, a
//! chunk at a time ([`sync_chunk`] in [`SyncMode::Check`]).

use crate::format::CHUNKS_PER_SLAB;
use crate::sync::{sync_chunk, SyncMode};
use vstor_core::Result;

/// What a scrub found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Chunks (a sixteenth of a slab, in every slot of an extent) checked.
    pub chunks: u64,
    /// Chunks whose copies or parity disagreed with the data, and were rewritten.
    pub repaired: u64,
    /// Chunks that could not be checked: of degraded parity extents (a data column lost, so
    /// the parity cannot be checked), or of extents with a column on no usable member.
    pub unverifiable: u64,
    /// 512-byte blocks of members whose data did not match their checksum.
    pub checksum_errors: u64,
    /// Of those, blocks rewritten from a good copy or rebuilt from parity.
    pub healed: u64,
    /// Of those, blocks with no good source left (reads of them fail).
    pub lost: u64,
    /// Blocks whose copies, or whose parity row, pass their checksums but disagree, where
    /// nothing told which is right (two mirror copies; single parity; dual parity with no
    /// single odd shard out): left as they are, never settled by slot order.
    pub undecided: u64,
}

impl crate::Pool {
    /// Walks every allocated extent of the space `name` (all spaces if `None`), online, a chunk
    /// at a time with the space's I/O held off for that chunk, checks every 512-byte block of
    /// every slot against its checksum, and repairs: a bad mirror block is rewritten from a
    /// copy whose checksum matches, a bad parity-layout block is rebuilt from the rest of its
    /// row. Copies that pass their checksums but differ are made equal to the copy most of
    /// the copies hold (a 3-way mirror), and a parity row whose shards pass their checksums
    /// but disagree is settled only where dual parity names the one odd shard out (rebuilt
    /// from the others); anything else is left as it is and counted
    /// ([`ScrubReport::undecided`]), never decided by slot order. Parity is recomputed from
    /// the (verified) data where its checksum failed. Blocks with no good source are counted
    /// as lost and left alone. `progress` gets (chunks done, chunks to do).
    pub fn scrub(
        &self,
        name: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ScrubReport> {
        if self.inner.read_only {
            return Err(crate::SpacesError::ReadOnly.into());
        }
        let names: Vec<String> = {
            let meta = self.inner.store.lock();
            if let Some(n) = name {
                if !meta.spaces.iter().any(|s| s.name == n) {
                    return Err(crate::SpacesError::NoSuchSpace(n.into()).into());
                }
            }
            meta.spaces
                .iter()
                .filter(|s| name.is_none_or(|n| n == s.name))
                .map(|s| s.name.clone())
                .collect()
        };
        let spaces: Vec<crate::Space> = names
            .iter()
            .filter_map(|n| self.open_space(n).ok())
            .collect();
        let total: u64 = spaces
            .iter()
            .map(|s| {
                let ext = s.shared.extents.read().unwrap_or_else(|p| p.into_inner());
                ext.iter().flatten().count() as u64 * CHUNKS_PER_SLAB
            })
            .sum();
        let geo = {
            let m = self.inner.store.lock();
            (m.data_start, m.slab_size)
        };
        let mut report = ScrubReport::default();
        progress(0, total);
        for space in &spaces {
            let n = space
                .shared
                .extents
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .len();
            for e in 0..n {
                for c in 0..CHUNKS_PER_SLAB {
                    let ext = space
                        .shared
                        .extents
                        .write()
                        .unwrap_or_else(|p| p.into_inner());
                    let Some(slots) = ext[e].clone() else { break };
                    let (chunk, devs) = (geo.1 / CHUNKS_PER_SLAB, self.inner.members.snapshot());
                    let out = sync_chunk(
                        &self.inner.csums,
                        &space.shared.layout,
                        &slots,
                        &devs,
                        geo,
                        (c * chunk, (c + 1) * chunk),
                        SyncMode::Check,
                    )?;
                    let entered = space.shared.io_entered();
                    drop(ext);
                    space.shared.let_waiting_io_in(entered);
                    report.chunks += 1;
                    report.repaired += u64::from(out.mismatched);
                    report.unverifiable += u64::from(out.unverifiable);
                    report.checksum_errors += out.bad_blocks;
                    report.healed += out.healed;
                    report.lost += out.lost;
                    report.undecided += out.undecided;
                    self.inner
                        .integrity
                        .count(out.bad_blocks, out.healed, out.lost);
                    progress(report.chunks, total);
                }
            }
        }
        for d in self.inner.members.snapshot().iter().flatten() {
            d.flush()?;
        }
        Ok(report)
    }
}
