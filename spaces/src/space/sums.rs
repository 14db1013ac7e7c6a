//! Checksums on the I/O path: a batch's writes get their block checksums computed and their
//! checksum pages written beside the data (on a second thread for a large batch), and its
//! reads get a CRC-32C per range to verify as they complete.

use super::parity::LateParity;
use super::*;

/// Bytes of writes in one batch from which the checksums are computed while the data is in
/// flight (below it they are computed first and the pages go in the data's submissions).
pub(super) const OVERLAP_MIN: u64 = 1 << 20;

/// Written data whose checksums go to (member, slab)s: the targets, the first block in the
/// slabs, the data.
pub(super) type CrcSource<B> = (Vec<(usize, u32)>, u64, B);

impl Space {
    /// Runs each member's batch (as [`run_members`]) with the checksums `sums` computes of what
    /// the batches write: set in the checksum cache and their pages written, under the pages'
    /// locks. A batch writing [`OVERLAP_MIN`] bytes or more computes the checksums and writes
    /// the pages (every member's at once) on a second thread while this one drives the data; a
    /// smaller one computes them first and sends each member's pages in the same submission as
    /// its data (kept in `store`), as a thread would cost it more than the checksums. The
    /// ranges of reads in `verify` (per member, per request: offset and length in the request)
    /// get a CRC-32C each ([`csum::crc_iov`]) as the read completes,
    /// while the rest of the batch is in flight.
    /// Returns failures of the checksum updates, and those checksums (per member, per
    /// request).
    #[allow(clippy::type_complexity)]
    pub(super) fn run_with_sums<'a>(
        &self,
        devs: &Devs,
        per: &mut [Vec<Request<'a>>],
        store: &'a mut Vec<PageWrite>,
        verify: &[Vec<Vec<(u64, u64)>>],
        late: Vec<LateParity<'_>>,
        sums: impl FnOnce() -> Vec<csum::SumRun> + Send,
    ) -> (Vec<(usize, Error)>, Vec<Vec<Option<Vec<u32>>>>) {
        let write_bytes: u64 = per
            .iter()
            .flatten()
            .filter(|x| matches!(x.op, Op::Write { .. }))
            .map(Request::len)
            .sum();
        let overlap = write_bytes >= OVERLAP_MIN || !late.is_empty();
        let early = write_bytes > 0 && !overlap;
        let mut sums = Some(sums);
        let mut failures = Vec::new();
        let mut own_len: Vec<usize> = Vec::new();
        let _early_locks = if early {
            let sums = csum::join_runs(sums.take().expect("once")());
            let locks = self
                .pool
                .csums
                .lock_pages(sums.iter().map(|x| (x.0, x.1, x.2, x.3.len() as u64)));
            *store = self.set_sums(devs, &sums, &mut failures);
            let store: &'a Vec<PageWrite> = store;
            own_len = per.iter().map(Vec::len).collect();
            for (m, off, buf) in store {
                per[*m].push(Request::write(*off, &buf[..]));
            }
            locks
        } else {
            Vec::new()
        };
        let mut got: Vec<Vec<Option<Vec<u32>>>> =
            per.iter().map(|reqs| vec![None; reqs.len()]).collect();
        // Each read to verify is checksummed as soon as it completes, while the rest of the
        // batch is still in flight.
        let checksum = |m: usize, i: usize, r: &Request<'_>| {
            let ranges = verify
                .get(m)
                .and_then(|v| v.get(i))
                .map_or(&[][..], |v| &v[..]);
            if let (Op::Read { bufs, .. }, Ok(()), false) = (&r.op, r.result(), ranges.is_empty()) {
                got[m][i] = Some(
                    ranges
                        .iter()
                        .map(|&(at, len)| csum::crc_iov(bufs, at as usize, len as usize))
                        .collect(),
                );
            }
        };
        if !overlap {
            run_members_with(devs, per, checksum);
        } else {
            std::thread::scope(|sc| {
                // One thread computes the checksums and writes their pages (every member's
                // at once) while this one drives the data.
                let pages = sc.spawn(|| {
                    let mut failures = Vec::new();
                    let mut late = late;
                    let mut sums = sums.take().expect("once")();
                    for l in &mut late {
                        let mut par: Vec<&mut [u8]> =
                            l.parity.iter_mut().map(|b| &mut b[..]).collect();
                        code::encode(l.data, &mut par);
                        for (buf, dests) in l.parity.iter().zip(&l.dests) {
                            let crcs = csum::crcs(buf);
                            for &(m, _, slab) in dests {
                                sums.push((m, slab, l.block, crcs.clone()));
                            }
                        }
                    }
                    let sums = csum::join_runs(sums);
                    let _page_locks = self
                        .pool
                        .csums
                        .lock_pages(sums.iter().map(|x| (x.0, x.1, x.2, x.3.len() as u64)));
                    let pages = self.set_sums(devs, &sums, &mut failures);
                    let mut by_member: Vec<Vec<Request<'_>>> =
                        (0..devs.len()).map(|_| Vec::new()).collect();
                    for (m, off, buf) in &pages {
                        by_member[*m].push(Request::write(*off, &buf[..]));
                    }
                    for l in &late {
                        for (buf, dests) in l.parity.iter().zip(&l.dests) {
                            for &(m, at, _) in dests {
                                append_write(&mut by_member[m], at, &buf[..]);
                            }
                        }
                    }
                    run_members(devs, &mut by_member);
                    for (m, reqs) in by_member.iter().enumerate() {
                        if let Some(e) = reqs.iter().find_map(|r| r.result().err()) {
                            failures.push((m, e));
                        }
                    }
                    drop(by_member);
                    (failures, late)
                });
                run_members_with(devs, per, checksum);
                let (f, late) = pages.join().expect("the checksum thread does not panic");
                failures.extend(f);
                for l in late {
                    l.parity.into_iter().for_each(|b| self.give_buf(Some(b)));
                }
            });
        }
        // The page writes added to small batches: their failures, then out of the batches.
        for (m, &n) in own_len.iter().enumerate() {
            for r in &per[m][n..] {
                if let Err(e) = r.result() {
                    failures.push((m, e));
                }
            }
            per[m].truncate(n);
        }
        (failures, got)
    }

    /// Sets checksum updates in the cache (the caller holds their pages' locks) and returns
    /// the page writes that make them durable, adjacent pages merged; failures are added.
    pub(super) fn set_sums(
        &self,
        devs: &Devs,
        sums: &[csum::SumRun],
        failures: &mut Vec<(usize, Error)>,
    ) -> Vec<PageWrite> {
        let mut pages: Vec<PageWrite> = Vec::new();
        for (m, slab, block, crcs) in sums {
            let Some(dev) = devs[*m].as_ref() else {
                continue;
            };
            match self.pool.csums.set(&**dev, *m, *slab, *block, crcs) {
                Ok(w) => pages.extend(w),
                Err(e) => failures.push((*m, e)),
            }
        }
        csum::merge_pages(pages)
    }
}
