//! Batches for several devices at once: [`submit_group`].
//!
//! A layer that spreads one request over several devices (a mirror, a parity stripe) has a
//! batch per device and wants them all in flight together. Threads do that for any device, but
//! cost a spawn and a join per batch, and the layer sees each device's batch only when all of
//! it is done. [`submit_group`] puts the batches of every io_uring [`FileDevice`](crate::FileDevice)
//! on one ring driven by the calling thread, and reports each request as it completes, so the
//! caller can work on a finished request (checksum it) while the others are still in flight.
//! Devices of other kinds run their batches on threads beside it.

use crate::device::BlockDevice;
use crate::file::{run_group, Part};
use crate::request::Request;

/// Runs each job's batch (`(device, requests)`), every device at once, as
/// [`BlockDevice::submit`] would run it on its device alone, and returns when all requests
/// have completed.
///
/// `on_done(job, index, request)` is called on the calling thread once for every request of
/// every batch, with the request complete: for batches on the shared ring as each completes,
/// for the others when their batch is done. Ordering is per device as in
/// [`BlockDevice::submit`] (a flush is a barrier inside its own batch; here it also holds back
/// the other batches on the ring until it completes).
///
/// `on_done` must not do I/O on a file of the group (the group holds each file's resize lock
/// shared until it returns, and a second shared lock on one thread can deadlock behind a
/// waiting resize). If it panics, the panic is held until nothing is in flight on the ring,
/// then resumed, with no further calls.
///
/// ```
/// use vstor_core::{submit_group, BlockDevice, MemoryDevice, Request};
/// let (a, b) = (MemoryDevice::new(1 << 20)?, MemoryDevice::new(1 << 20)?);
/// let data = vec![7u8; 4096];
/// let mut ra = [Request::write(0, &data)];
/// let mut rb = [Request::write(4096, &data), Request::flush()];
/// let mut done = 0;
/// submit_group(
///     &mut [(&a as &dyn BlockDevice, &mut ra[..]), (&b, &mut rb[..])],
///     |_, _, r| {
///         assert!(r.result().is_ok());
///         done += 1;
///     },
/// );
/// assert_eq!(done, 3);
/// # Ok::<(), vstor_core::Error>(())
/// ```
pub fn submit_group(
    jobs: &mut [(&dyn BlockDevice, &mut [Request<'_>])],
    mut on_done: impl FnMut(usize, usize, &Request<'_>),
) {
    let mut guards = Vec::new();
    let mut parts: Vec<Part<'_, '_, '_>> = Vec::new();
    let mut part_job: Vec<usize> = Vec::new();
    let mut others: Vec<(usize, &dyn BlockDevice, &mut [Request<'_>])> = Vec::new();
    // Files already locked for a batch of this group (a device may come twice).
    let mut locked: Vec<*const crate::FileDevice> = Vec::new();
    for (j, (dev, reqs)) in jobs.iter_mut().enumerate() {
        let dev: &dyn BlockDevice = *dev;
        if reqs.is_empty() {
            continue;
        }
        let part = dev.as_file().and_then(|f| {
            let first = !locked.contains(&std::ptr::from_ref(f));
            locked.push(f);
            f.group_part(reqs, first)
        });
        match part {
            Some((guard, core)) => {
                guards.extend(guard);
                parts.push(Part { core, reqs });
                part_job.push(j);
            }
            None => others.push((j, dev, &mut **reqs)),
        }
    }
    std::thread::scope(|s| {
        // Without a ring to drive, this thread runs one of the other batches itself.
        let mine = if parts.is_empty() { others.pop() } else { None };
        let running: Vec<_> = others
            .into_iter()
            .map(|(j, dev, reqs)| {
                s.spawn(move || {
                    dev.submit(reqs);
                    (j, reqs)
                })
            })
            .collect();
        if !parts.is_empty() {
            run_group(&mut parts, &mut |p, i, r| on_done(part_job[p], i, r));
        }
        drop(guards);
        if let Some((j, dev, reqs)) = mine {
            dev.submit(reqs);
            for (i, r) in reqs.iter().enumerate() {
                on_done(j, i, r);
            }
        }
        for h in running {
            let (j, reqs) = h.join().expect("a device's submit does not panic");
            for (i, r) in reqs.iter().enumerate() {
                on_done(j, i, r);
            }
        }
    });
}
