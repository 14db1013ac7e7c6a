//! Serving virtio queues off the vCPU thread: one I/O thread per queue, woken by an eventfd that
//! KVM signals when the guest writes the queue's index to the QueueNotify register (an
//! ioeventfd with the index as its data match, so the write never leaves the kernel), and
//! completions that interrupt the guest through a KVM irqfd.
//!
//! A queue's thread hands the queue's available chains to the device model as one batch (see
//! [`crate::virtio::block`]) and may be held there as long as the stack takes: a disk held back by
//! its QoS cap holds its own queue's thread, never the vCPU. A pause of the VM ([`PauseGate`])
//! stops the threads before their next batch; [`IoThreads::stop`] joins them (the batches in
//! flight finish first).

use super::mmio::{DeviceQueues, IrqLine, MmioTransport, Notifier};
use super::VirtioDevice;
use kvm_ioctls::{IoEventAddress, VmFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// The offset of QueueNotify in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x050;

/// How long a queue's thread keeps looking at the available ring after serving it before it
/// sleeps on its eventfd: a driver that refills the queue within this time is served without a
/// sleep and wake-up of the thread.
const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(50);

/// An interrupt line that is a KVM irqfd: raising it signals the eventfd, which KVM injects into
/// the in-kernel interrupt controller as an edge (the driver learns the cause from the interrupt
/// status register, as with Firecracker's virtio-mmio). Lowering it does nothing.
pub struct IrqFd(pub EventFd);

impl IrqLine for IrqFd {
    fn set_level(&self, high: bool) {
        if high {
            // A full counter (2^64 - 2 pending signals) is the only failure; KVM consumes them.
            let _ = self.0.write(1);
        }
    }
}

/// A line that goes nowhere (a VM without an in-kernel interrupt controller: the driver polls).
pub struct NoIrq;

impl IrqLine for NoIrq {
    fn set_level(&self, _high: bool) {}
}

#[derive(Default)]
struct GateState {
    paused: bool,
    stopping: bool,
}

/// Holds the I/O threads of a VM while it is paused (they finish the batch they are in, and
/// start no other until it resumes).
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl PauseGate {
    /// An open gate.
    pub fn new() -> Arc<PauseGate> {
        Arc::new(PauseGate::default())
    }

    fn set(&self, f: impl FnOnce(&mut GateState)) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        self.changed.notify_all();
    }

    /// Closes the gate (a pause).
    pub fn close(&self) {
        self.set(|s| s.paused = true);
    }

    /// Opens it (a resume).
    pub fn open(&self) {
        self.set(|s| s.paused = false);
    }

    /// Waits while the gate is closed; false once the threads are being stopped.
    fn pass(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.paused && !s.stopping {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        !s.stopping
    }
}

/// The queues of one virtio-mmio device and the eventfds their notifications arrive on.
pub struct QueueNotifications {
    queues: Arc<DeviceQueues>,
    events: Vec<Arc<EventFd>>,
    /// Whether KVM took the eventfds as ioeventfds (otherwise notifications come through the
    /// MMIO exit and the transport's notifier).
    pub in_kernel: bool,
}

impl QueueNotifications {
    /// One eventfd per queue of `queues`; with `vm`, each is registered as an ioeventfd on the
    /// QueueNotify register of the window at `window` with the queue's index as its data match.
    /// A failed registration is not fatal (`in_kernel` says): the transport's notifier, which
    /// [`QueueNotifications::notifier`] makes, signals the same eventfds from the MMIO exit.
    pub fn new(
        queues: Arc<DeviceQueues>,
        vm: Option<&VmFd>,
        window: u64,
    ) -> std::io::Result<QueueNotifications> {
        let events = (0..queues.queue_count())
            .map(|_| EventFd::new(0).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut in_kernel = vm.is_some();
        if let Some(vm) = vm {
            for (i, e) in events.iter().enumerate() {
                let addr = IoEventAddress::Mmio(window + QUEUE_NOTIFY);
                if vm.register_ioevent(e, &addr, i as u32).is_err() {
                    in_kernel = false;
                }
            }
        }
        Ok(QueueNotifications {
            queues,
            events,
            in_kernel,
        })
    }

    /// The transport's notifier: signals queue `i`'s eventfd.
    pub fn notifier(&self) -> Notifier {
        let events = self.events.clone();
        Box::new(move |i| {
            if let Some(e) = events.get(i) {
                let _ = e.write(1);
            }
        })
    }
}

/// A virtio-mmio device at `window` whose queues are served by I/O threads: its completions
/// interrupt line `gsi` through an irqfd (with an in-kernel interrupt controller; without one the
/// driver polls), its notifications arrive on ioeventfds ([`QueueNotifications::new`]), and a
/// notification that reaches the transport anyway goes to the same threads.
pub fn mmio_device(
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    vm: &VmFd,
    irqchip: bool,
    gsi: u32,
    window: u64,
) -> Result<(MmioTransport, QueueNotifications), String> {
    let irq: Box<dyn IrqLine> = if irqchip {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        vm.register_irqfd(&evt, gsi)
            .map_err(|e| format!("KVM_IRQFD: {e}"))?;
        Box::new(IrqFd(evt))
    } else {
        Box::new(NoIrq)
    };
    let mut transport = MmioTransport::new(device, mem, irq);
    let io = QueueNotifications::new(transport.queues(), Some(vm), window)
        .map_err(|e| format!("eventfd: {e}"))?;
    transport.set_notifier(io.notifier());
    Ok((transport, io))
}

/// The running I/O threads of a VM.
pub struct IoThreads {
    gate: Arc<PauseGate>,
    stop: Arc<AtomicBool>,
    events: Vec<Arc<EventFd>>,
    threads: Vec<JoinHandle<()>>,
}

impl IoThreads {
    /// Starts a thread per queue of each device (`vstor{d}-q{i}`), held by `gate` while the VM is
    /// paused.
    pub fn start(
        devices: &[QueueNotifications],
        gate: Arc<PauseGate>,
    ) -> std::io::Result<IoThreads> {
        let mut io = IoThreads {
            gate: gate.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            events: Vec::new(),
            threads: Vec::new(),
        };
        for (d, dev) in devices.iter().enumerate() {
            for (i, event) in dev.events.iter().enumerate() {
                let (queues, event2, stop, gate) = (
                    dev.queues.clone(),
                    event.clone(),
                    io.stop.clone(),
                    gate.clone(),
                );
                let spawned = std::thread::Builder::new()
                    .name(format!("vstor{d}-q{i}"))
                    .spawn(move || serve(&queues, i, &event2, &stop, &gate));
                match spawned {
                    Ok(t) => {
                        io.events.push(event.clone());
                        io.threads.push(t);
                    }
                    Err(e) => {
                        io.stop();
                        return Err(e);
                    }
                }
            }
        }
        Ok(io)
    }

    /// Stops the threads and joins them: each finishes the batch it is in (the caller lifts QoS
    /// caps first when it cannot wait for them).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.gate.set(|s| s.stopping = true);
        for e in &self.events {
            let _ = e.write(1);
        }
        for t in self.threads.drain(..) {
            // A thread that panicked has nothing left to clean up.
            let _ = t.join();
        }
    }
}

/// The loop of queue `i`'s thread: wait for a notification, serve the queue (again while the
/// driver refills it within [`POLL_BEFORE_SLEEP`]).
fn serve(queues: &DeviceQueues, i: usize, event: &EventFd, stop: &AtomicBool, gate: &PauseGate) {
    loop {
        match event.read() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        loop {
            if stop.load(Ordering::Acquire) || !gate.pass() {
                return;
            }
            queues.serve(i);
            let until = Instant::now() + POLL_BEFORE_SLEEP;
            while !queues.has_available(i) && Instant::now() < until {
                std::hint::spin_loop();
            }
            if !queues.has_available(i) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::{req, Block};
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::VirtioDevice;
    use std::time::{Duration, Instant};
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
    use vstor_core::{BlockDevice, MemoryDevice};

    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn reg(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// A driver's setup of `queues` queues of 16 descriptors, queue `q`'s rings at
    /// `q * 0x4000 + {DESC, AVAIL, USED}`.
    fn setup(t: &mut MmioTransport, features: u64, queues: u32) {
        reg(t, 0x70, 1);
        reg(t, 0x70, 3);
        reg(t, 0x24, 0);
        reg(t, 0x20, features as u32);
        reg(t, 0x24, 1);
        reg(t, 0x20, (features >> 32) as u32 | 1);
        reg(t, 0x70, 11);
        for q in 0..queues {
            let base = q * 0x4000;
            reg(t, 0x30, q);
            reg(t, 0x38, 16);
            reg(t, 0x80, base + DESC as u32);
            reg(t, 0x90, base + AVAIL as u32);
            reg(t, 0xa0, base + USED as u32);
            reg(t, 0x44, 1);
        }
        reg(t, 0x70, 15);
    }

    /// Publishes a one-sector write of sector `n` as chain `n` of queue `q` (header, data and
    /// status in the 0x10000.. area).
    fn write_request(mem: &GuestMemoryMmap, q: u64, n: u16) {
        let base = q * 0x4000;
        let at = 0x10000 + u64::from(n) * 0x400 + q * 0x8000;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&req::OUT.to_le_bytes());
        hdr[8..16].copy_from_slice(&u64::from(n).to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(at)).unwrap();
        mem.write_slice(&[n as u8 + 1; 512], GuestAddress(at + 0x10))
            .unwrap();
        let descs = [(at, 16u32, 1u16), (at + 0x10, 512, 1), (at + 0x3f0, 1, 2)];
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let d = GuestAddress(base + DESC + 16 * (3 * u64::from(n) + i as u64));
            mem.write_obj(addr, d).unwrap();
            mem.write_obj(len, d.unchecked_add(8)).unwrap();
            mem.write_obj(flags, d.unchecked_add(12)).unwrap();
            mem.write_obj(3 * n + i as u16 + 1, d.unchecked_add(14))
                .unwrap();
        }
        let idx: u16 = mem.read_obj(GuestAddress(base + AVAIL + 2)).unwrap();
        mem.write_obj(
            3 * n,
            GuestAddress(base + AVAIL + 4 + 2 * u64::from(idx % 16)),
        )
        .unwrap();
        mem.write_obj(idx + 1, GuestAddress(base + AVAIL + 2))
            .unwrap();
    }

    fn used_idx(mem: &GuestMemoryMmap, q: u64) -> u16 {
        mem.read_obj(GuestAddress(q * 0x4000 + USED + 2)).unwrap()
    }

    fn wait_used(mem: &GuestMemoryMmap, q: u64, want: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if used_idx(mem, q) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn threads_serve_each_queue_and_stop_for_a_pause() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let disk = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let block = Arc::new(Block::with_queues(disk.clone(), false, "io", 2));
        let features = block.features();
        assert_ne!(features & crate::virtio::block::feature::MQ, 0);
        let mut t = MmioTransport::new(Box::new(block.clone()), mem.clone(), Box::new(NoIrq));
        // No KVM: the notifications reach the transport, which hands them to the threads.
        let io = QueueNotifications::new(t.queues(), None, 0).unwrap();
        assert!(!io.in_kernel);
        t.set_notifier(io.notifier());
        let gate = PauseGate::new();
        let threads = IoThreads::start(std::slice::from_ref(&io), gate.clone()).unwrap();
        setup(&mut t, features, 2);
        write_request(&mem, 0, 0);
        write_request(&mem, 1, 1);
        reg(&mut t, 0x50, 0);
        reg(&mut t, 0x50, 1);
        assert!(wait_used(&mem, 0, 1) && wait_used(&mem, 1, 1));
        assert_eq!(block.queue_requests(), vec![1, 1]);
        // Paused: a notification is held until the resume.
        gate.close();
        write_request(&mem, 1, 2);
        reg(&mut t, 0x50, 1);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(used_idx(&mem, 1), 1, "served while paused");
        gate.open();
        assert!(wait_used(&mem, 1, 2));
        // A notification of a queue that does not exist goes nowhere.
        reg(&mut t, 0x50, 5);
        threads.stop();
        let mut back = [0u8; 512];
        for n in 0..3u8 {
            disk.read_at(u64::from(n) * 512, &mut back).unwrap();
            assert_eq!(back, [n + 1; 512]);
        }
        assert_eq!(block.stats().writes, 3);
    }
}
