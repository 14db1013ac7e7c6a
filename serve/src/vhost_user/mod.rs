//! The vhost-user-blk backend: an export served to a VMM (QEMU's `vhost-user-blk-pci`,
//! cloud-hypervisor's `--disk vhost_user=true`) over a Unix socket.
//!
//! # Use
//!
//! [`serve`]`(export, socket, queues, stop)` binds `socket` (replacing a stale socket file left
//! there), and returns the thread that serves it. The thread accepts one frontend at a time,
//! serves it until it disconnects, then accepts the next one: a VMM that reconnects (QEMU's
//! `-chardev socket,...,reconnect-ms=N`) finds the backend again, and a backend restarted with
//! the same socket finds its VMM the same way. The thread ends, removing the socket file, when
//! `stop` is set (within about 200 ms) or the export is removed from its registry.
//!
//! ```no_run
//! # use std::sync::{Arc, atomic::AtomicBool};
//! # fn f(export: Arc<vstor_serve::Export>) -> std::io::Result<()> {
//! let stop = Arc::new(AtomicBool::new(false));
//! let thread = vstor_serve::vhost_user::serve(export, "/run/vm1-disk.sock".as_ref(), 2, stop.clone())?;
//! // ... stop.store(true, Ordering::Release); thread.join();
//! # Ok(()) }
//! ```
//!
//! # What the frontend gets
//!
//! - virtio features: VERSION_1, FLUSH, RO (read-only exports), BLK_SIZE, SEG_MAX, SIZE_MAX,
//!   DISCARD and WRITE_ZEROES (where the stack supports them), CONFIG_WCE, MQ, EVENT_IDX,
//!   INDIRECT_DESC; GET_ID answers the export's name (cut to 20 bytes). The request model is
//!   the one the reference VMM uses ([`crate::virtio_blk`]): the chains available on a queue go
//!   down to the stack as one batch, so the guest's queue depth reaches it.
//! - protocol features: MQ, REPLY_ACK, BACKEND_REQ, CONFIG, INFLIGHT_SHMFD, RESET_DEVICE,
//!   CONFIGURE_MEM_SLOTS. An online resize of the export's device (its `capacity_signal`)
//!   becomes a configuration-change message on the backend channel, and the guest sees the new
//!   size.
//! - one worker thread per queue: it sleeps on the queue's kick descriptor, serves everything
//!   available in batches, and interrupts the guest through the call descriptor (with EVENT_IDX
//!   only where the driver asked). `GET_VRING_BASE` waits for the worker's batch to complete,
//!   so a stopped ring has nothing in flight.
//! - inflight tracking (INFLIGHT_SHMFD, see [`inflight`]): a backend killed with requests in
//!   flight leaves them marked in the frontend's buffer; the next backend serves them again, in
//!   order, before anything new.
//!
//! # Hostile frontends
//!
//! Every request is parsed by hand from bounded little-endian bytes ([`wire`]). A malformed
//! message, a request out of order (a ring kicked before its memory), a memory table that does
//! not fit its files or overlaps ([`memory`]), rings outside guest memory, or any request the
//! backend does not serve gets a negative acknowledgement (where the frontend asked for one) and
//! the connection is closed; the backend then waits for the next frontend. Descriptors that
//! point outside guest memory complete with `VIRTIO_BLK_S_IOERR` and are never dereferenced: all
//! guest-memory access goes through `vm-memory`'s checked accessors. Nothing the frontend sends
//! can make the backend panic.

pub mod device;
pub mod inflight;
pub mod memory;
pub mod wire;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::export::Export;
use crate::virtio_blk::MAX_QUEUES;

/// Serves `export` to vhost-user-blk frontends on the Unix socket `socket` with `queues` request
/// queues (1 to [`MAX_QUEUES`]), one frontend at a time, until `stop` is set or the export is
/// removed. See the module documentation.
pub fn serve(
    export: Arc<Export>,
    socket: &Path,
    queues: usize,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    if queues == 0 || queues > MAX_QUEUES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{queues} queues (1 to {MAX_QUEUES})"),
        ));
    }
    // A socket file left by an earlier backend is replaced; a live one or anything else is not
    // touched.
    let listener = crate::sockpath::bind_unix(socket)?;
    listener.set_nonblocking(true)?;
    let path = socket.to_path_buf();
    std::thread::Builder::new()
        .name(format!("vhost-user-{}", export.name()))
        .spawn(move || accept_loop(listener, path, export, queues, stop))
}

fn log(export: &Export, what: &str) {
    eprintln!("vstor serve: vhost-user-blk {}: {what}", export.name());
}

fn accept_loop(
    listener: UnixListener,
    path: PathBuf,
    export: Arc<Export>,
    queues: usize,
    stop: Arc<AtomicBool>,
) {
    let stopping = || stop.load(Ordering::Acquire) || export.removed();
    while !stopping() {
        let sock = match listener.accept() {
            Ok((sock, _)) => sock,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [rustix::event::PollFd::new(
                    &listener,
                    rustix::event::PollFlags::IN,
                )];
                let timeout = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000_000,
                };
                let _ = rustix::event::poll(&mut fds, Some(&timeout));
                continue;
            }
            Err(e) => {
                log(&export, &format!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if let Err(e) = sock.set_nonblocking(false) {
            log(&export, &format!("frontend dropped: {e}"));
            continue;
        }
        // The export's removal closes the connection.
        let closer = match sock.try_clone() {
            Ok(c) => c,
            Err(e) => {
                log(&export, &format!("frontend dropped: {e}"));
                continue;
            }
        };
        let Some(conn) = export.connect(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }) else {
            break;
        };
        log(&export, "frontend connected");
        let why = match device::Session::new(sock, export.clone(), queues) {
            Ok(mut session) => session.run(&stop),
            Err(e) => format!("cannot start a session: {e}"),
        };
        drop(conn);
        log(&export, &format!("frontend gone: {why}"));
    }
    let _ = std::fs::remove_file(&path);
}
