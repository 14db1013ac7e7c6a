//! The io_uring engine.
//!
//! A device owns a pool of rings, each with the device's file registered as fixed file 0. A
//! submitting thread takes a ring from the pool for the length of one batch (so each
//! concurrently submitting thread has its own ring and nothing is shared on the data path but
//! the pool's pop/push), pushes one SQE per request, keeps up to the ring's size in flight, and
//! reaps completions until every request of the batch has its result.
//!
//! [`run_group`] runs the batches of several files on one ring (a process-wide pool of rings
//! without registered files), so that one thread keeps all of them in flight and sees each
//! completion as it comes: [`crate::submit_group`].

use super::sync;
use super::FileCore;
use crate::buf::AlignedBuf;
use crate::error::{Error, OpKind, Result};
use crate::request::{copy_from_bufs, copy_into_bufs, Op, Request};
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

pub(crate) struct RingPool {
    fd: RawFd,
    entries: u32,
    rings: Mutex<Vec<IoUring>>,
}

impl RingPool {
    /// Creates the pool with one ring, which proves that io_uring works here.
    pub(crate) fn new(fd: RawFd, entries: u32) -> io::Result<Self> {
        let pool = RingPool {
            fd,
            entries: entries.clamp(1, 4096),
            rings: Mutex::new(Vec::new()),
        };
        let ring = pool.make_ring()?;
        pool.put(ring);
        Ok(pool)
    }

    fn make_ring(&self) -> io::Result<IoUring> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(self.entries)
            .or_else(|_| IoUring::new(self.entries))?;
        ring.submitter().register_files(&[self.fd])?;
        Ok(ring)
    }

    fn take(&self) -> io::Result<IoUring> {
        let popped = self.rings.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match popped {
            Some(r) => Ok(r),
            None => self.make_ring(),
        }
    }

    fn put(&self, ring: IoUring) {
        self.rings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ring);
    }

    /// Runs the requests of `batch` that are not complete yet (all of them validated).
    pub(crate) fn run(&self, core: &FileCore, batch: &mut [Request<'_>]) {
        let mut ring = match self.take() {
            Ok(r) => r,
            Err(e) => {
                // No ring for this thread (out of memory or of locked pages): stay correct.
                let _ = e;
                for req in batch.iter_mut().filter(|r| !r.is_complete()) {
                    let r = sync::run(core, req);
                    req.complete(r);
                }
                return;
            }
        };
        run_batch(
            &mut ring,
            &mut [Part { core, reqs: batch }],
            true,
            &mut |_, _, _| {},
        );
        self.put(ring);
    }
}

/// One file's batch in a ring's run: the file and its requests (validated).
pub(crate) struct Part<'c, 'b, 'a> {
    pub(crate) core: &'c FileCore,
    pub(crate) reqs: &'b mut [Request<'a>],
}

/// The rings [`run_group`] uses: shared by every file, none registered.
static GROUP_RINGS: Mutex<Vec<IoUring>> = Mutex::new(Vec::new());

/// Runs every part's requests that are not complete yet on one ring, calling
/// `on_done(part, index, request)` as each completes (the portable engine's way, one request
/// after another, if no ring can be made here).
pub(crate) fn run_group(
    parts: &mut [Part<'_, '_, '_>],
    on_done: &mut dyn FnMut(usize, usize, &Request<'_>),
) {
    let popped = GROUP_RINGS.lock().unwrap_or_else(|p| p.into_inner()).pop();
    let made = popped.map_or_else(
        || {
            IoUring::builder()
                .setup_coop_taskrun()
                .build(GROUP_RING_ENTRIES)
                .or_else(|_| IoUring::new(GROUP_RING_ENTRIES))
        },
        Ok,
    );
    let Ok(mut ring) = made else {
        for (p, part) in parts.iter_mut().enumerate() {
            for (i, req) in part.reqs.iter_mut().enumerate() {
                if !req.is_complete() {
                    let r = sync::run(part.core, req);
                    req.complete(r);
                }
                on_done(p, i, req);
            }
        }
        return;
    };
    run_batch(&mut ring, parts, false, on_done);
    GROUP_RINGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(ring);
}

/// The size of a shared ring: enough for several members' batches in flight.
const GROUP_RING_ENTRIES: u32 = 256;

struct Slot {
    part: usize,
    idx: usize,
    bounce: Option<AlignedBuf>,
}

/// Builds a request's SQE on the file target `$fd` (a macro: the io_uring crate's target
/// trait cannot be named in a generic bound).
macro_rules! sqe_on {
    ($fd:expr, $slot:expr, $req:expr) => {{
        let fd = $fd;
        let slot: &mut Slot = $slot;
        let req: &mut Request<'_> = $req;
        let offset = req.offset();
        match &mut req.op {
            Op::Read { bufs, .. } => match (&mut slot.bounce, bufs.len()) {
                (Some(b), _) => opcode::Read::new(fd, b.as_mut_ptr(), b.len() as u32)
                    .offset(offset)
                    .build(),
                (None, 1) if bufs[0].len() <= u32::MAX as usize => {
                    opcode::Read::new(fd, bufs[0].as_mut_ptr(), bufs[0].len() as u32)
                        .offset(offset)
                        .build()
                }
                // IoSliceMut is ABI-compatible with struct iovec on Unix.
                (None, n) => opcode::Readv::new(fd, bufs.as_ptr().cast::<libc::iovec>(), n as u32)
                    .offset(offset)
                    .build(),
            },
            Op::Write { bufs, .. } => match (&slot.bounce, bufs.len()) {
                (Some(b), _) => opcode::Write::new(fd, b.as_ptr(), b.len() as u32)
                    .offset(offset)
                    .build(),
                (None, 1) if bufs[0].len() <= u32::MAX as usize => {
                    opcode::Write::new(fd, bufs[0].as_ptr(), bufs[0].len() as u32)
                        .offset(offset)
                        .build()
                }
                (None, n) => opcode::Writev::new(fd, bufs.as_ptr().cast::<libc::iovec>(), n as u32)
                    .offset(offset)
                    .build(),
            },
            // Ordered by `run_batch`'s barrier (per file), not by IO_DRAIN (the whole ring).
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard { len, .. } => opcode::Fallocate::new(fd, *len)
                .offset(offset)
                .mode(sync::DISCARD_MODE)
                .build(),
            Op::WriteZeroes { len, .. } => opcode::Fallocate::new(fd, *len)
                .offset(offset)
                .mode(sync::ZERO_MODE)
                .build(),
        }
    }};
}

/// The SQE for a request, on fixed file 0 or on the file's own descriptor.
fn build_sqe(
    slot: &mut Slot,
    req: &mut Request<'_>,
    core: &FileCore,
    fixed: bool,
) -> squeue::Entry {
    if fixed {
        sqe_on!(types::Fixed(0), slot, req)
    } else {
        sqe_on!(types::Fd(core.file.as_raw_fd()), slot, req)
    }
}

/// Runs the parts' requests that are not complete yet, keeping up to the ring's size in
/// flight, and calls `on_done` for each as it completes.
fn run_batch(
    ring: &mut IoUring,
    parts: &mut [Part<'_, '_, '_>],
    fixed: bool,
    on_done: &mut dyn FnMut(usize, usize, &Request<'_>),
) {
    let mut slots: Vec<Slot> = Vec::with_capacity(parts.iter().map(|p| p.reqs.len()).sum());
    for (part, p) in parts.iter_mut().enumerate() {
        let core = p.core;
        for (idx, req) in p.reqs.iter_mut().enumerate() {
            if req.is_complete() {
                // Refused by the device's checks before it got here.
                on_done(part, idx, req);
                continue;
            }
            if matches!(
                req.op,
                Op::Discard { len: 0, .. } | Op::WriteZeroes { len: 0, .. }
            ) {
                // fallocate refuses a zero length (EINVAL); as in the portable engine, a no-op.
                req.complete(Ok(()));
                on_done(part, idx, req);
                continue;
            }
            // A vector longer than readv/writev take (UIO_MAXIOV) goes through one buffer too.
            let bounce = (core.needs_bounce(req) || too_many_bufs(req)).then(|| {
                let mut b = core.bounce(req.len() as usize);
                if let Op::Write { bufs, .. } = &req.op {
                    copy_from_bufs(bufs, 0, &mut b);
                }
                b
            });
            slots.push(Slot { part, idx, bounce });
        }
    }
    let capacity = ring.params().sq_entries() as usize;
    // Per part: its slots in order, the next to submit, how many are in flight, and whether
    // its flush is. A flush is a barrier inside its own part, kept here (not by IO_DRAIN,
    // which would hold back the other files on a shared ring too): `complete` finishes short
    // transfers and fallbacks (write-zeroes without FALLOC_FL_ZERO_RANGE, EAGAIN) after the
    // kernel has posted the CQE, so the flush starts only when nothing of its part is in
    // flight, and nothing of its part after it starts until it has completed.
    struct Queue {
        slots: Vec<usize>,
        next: usize,
        in_flight: usize,
        flush_in_flight: bool,
    }
    let mut queues: Vec<Queue> = (0..parts.len())
        .map(|_| Queue {
            slots: Vec::new(),
            next: 0,
            in_flight: 0,
            flush_in_flight: false,
        })
        .collect();
    for (i, slot) in slots.iter().enumerate() {
        queues[slot.part].slots.push(i);
    }
    let mut in_flight = 0usize;
    // A panic in `on_done` (the caller's code) or in completing a request is held until
    // nothing is in flight: unwinding earlier would free buffers the kernel still uses.
    let mut panicked: Option<Box<dyn std::any::Any + Send>> = None;
    let mut reaped: Vec<(usize, i32)> = Vec::with_capacity(capacity);
    loop {
        {
            let mut sq = ring.submission();
            for q in queues.iter_mut() {
                while q.next < q.slots.len()
                    && in_flight < capacity
                    && !sq.is_full()
                    && !q.flush_in_flight
                {
                    let s = q.slots[q.next];
                    let (part, idx) = (slots[s].part, slots[s].idx);
                    let is_flush = matches!(parts[part].reqs[idx].op, Op::Flush);
                    if is_flush && q.in_flight > 0 {
                        break;
                    }
                    q.flush_in_flight = is_flush;
                    let p = &mut parts[part];
                    let sqe = build_sqe(&mut slots[s], &mut p.reqs[idx], p.core, fixed)
                        .user_data(s as u64);
                    // SAFETY: every buffer the SQE points at (the request's buffers, its iovec
                    // array inside the request, or the slot's bounce buffer) is borrowed from
                    // `parts` or owned by `slots`, both of which outlive this function; and the
                    // function neither returns nor unwinds while any SQE is in flight (the loop
                    // runs until `in_flight` is 0, and panics are held until then).
                    unsafe { sq.push(&sqe) }.expect("queue has room: checked is_full");
                    q.next += 1;
                    q.in_flight += 1;
                    in_flight += 1;
                }
            }
        }
        if in_flight == 0 {
            break;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(_) => {
                // The kernel still owns in-flight buffers: never return before they complete.
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
        reaped.clear();
        reaped.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(s, res) in &reaped {
            in_flight -= 1;
            let slot = &mut slots[s];
            let q = &mut queues[slot.part];
            q.in_flight -= 1;
            let p = &mut parts[slot.part];
            let req = &mut p.reqs[slot.idx];
            if matches!(req.op, Op::Flush) {
                q.flush_in_flight = false;
            }
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let r = complete(p.core, req, slot.bounce.as_mut(), res);
                req.complete(r);
                if panicked.is_none() {
                    on_done(slot.part, slot.idx, req);
                }
            }));
            if let Err(e) = done {
                panicked.get_or_insert(e);
            }
        }
    }
    if let Some(e) = panicked {
        std::panic::resume_unwind(e);
    }
}

/// Whether a request has more buffers than the kernel takes in one readv/writev (EINVAL).
fn too_many_bufs(req: &Request<'_>) -> bool {
    let n = match &req.op {
        Op::Read { bufs, .. } => bufs.len(),
        Op::Write { bufs, .. } => bufs.len(),
        _ => 0,
    };
    n > libc::UIO_MAXIOV as usize
}

fn complete(
    core: &FileCore,
    req: &mut Request<'_>,
    bounce: Option<&mut AlignedBuf>,
    res: i32,
) -> Result<()> {
    let (offset, len, kind) = (req.offset(), req.len(), req.kind());
    if res < 0 {
        let errno = -res;
        return match (kind, errno) {
            // Transient: do it the portable way.
            (_, libc::EAGAIN | libc::EINTR) => sync::run(core, req),
            (OpKind::WriteZeroes, libc::EOPNOTSUPP | libc::EINVAL) => {
                sync::write_zero_buffers(core, offset, len)
            }
            _ => Err(Error::errno(core.context(kind, offset, len), errno)),
        };
    }
    let done = res as u64;
    match (&mut req.op, bounce) {
        (Op::Read { bufs, .. }, Some(b)) => {
            if done < len {
                finish_bounce_read(core, offset, b, done)?;
            }
            copy_into_bufs(bufs, 0, b);
            Ok(())
        }
        (Op::Read { .. }, None) if done == 0 && len > 0 => Err(Error::io(
            core.context(kind, offset, len),
            io::ErrorKind::UnexpectedEof.into(),
        )),
        (Op::Read { bufs, .. }, None) if done < len => {
            sync::read_rest(core, offset, bufs, done as usize)
        }
        (Op::Write { .. }, Some(b)) if done < len => {
            use std::os::unix::fs::FileExt;
            core.file
                .write_all_at(&b[done as usize..], offset + done)
                .map_err(|e| Error::io(core.context(kind, offset, len), e))
        }
        (Op::Write { bufs, .. }, None) if done < len => {
            sync::write_rest(core, offset, bufs, done as usize)
        }
        _ => Ok(()),
    }
}

fn finish_bounce_read(core: &FileCore, offset: u64, b: &mut AlignedBuf, done: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    core.file
        .read_exact_at(&mut b[done as usize..], offset + done)
        .map_err(|e| Error::io(core.context(OpKind::Read, offset, b.len() as u64), e))
}
