//! The virtio-mmio transport (virtio 1.x, "version 2" register layout, spec section 4.2.2).
//!
//! The transport owns the queues and the device status; the device model sees only queues to
//! serve and its configuration space. Accesses the spec does not allow (a register read with the
//! wrong width, a queue change while the queue is live, a write to a read-only register) are
//! ignored, never fatal: a guest cannot stop the VMM through this window.

use super::{VirtioDevice, F_EVENT_IDX, F_VERSION_1};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VENDOR_ID: u32 = 0x7673_746f; // "vsto"

/// Device status bits (virtio spec 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// Interrupt status bit: a used buffer was returned.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// An interrupt line the transport drives (level-triggered: high while the interrupt status is
/// not zero; an edge-only line, such as a KVM irqfd, fires on `set_level(true)` and ignores the
/// rest).
pub trait IrqLine: Send + Sync {
    /// Sets the line's level.
    fn set_level(&self, high: bool);
}

/// The part of a virtio-mmio device that the threads serving its queues share with the vCPU
/// thread that drives its registers: the device model, the queues (each behind its own lock, so
/// queues are served in parallel), the interrupt status and the line.
pub struct DeviceQueues {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Box<dyn IrqLine>,
    queues: Vec<Mutex<Queue>>,
    max_sizes: Vec<u16>,
    interrupt_status: AtomicU32,
    /// DRIVER_OK is set (and no reset since).
    live: AtomicBool,
}

impl DeviceQueues {
    /// The number of queues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    fn lock(&self, i: usize) -> Option<MutexGuard<'_, Queue>> {
        self.queues
            .get(i)
            .map(|q| q.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Serves the available buffers of queue `i` (after a notification) and interrupts the driver
    /// if the device asks for it. Does nothing before DRIVER_OK, for a queue that is not ready or
    /// whose rings lie outside guest memory, or for a queue that does not exist.
    pub fn serve(&self, i: usize) {
        if !self.live.load(Ordering::Acquire) {
            return;
        }
        let Some(mut q) = self.lock(i) else { return };
        if !q.ready() || !q.is_valid(&self.mem) {
            return;
        }
        if self.device.process_queue(i, &mut q, &self.mem) {
            drop(q);
            self.signal(INT_VRING);
        }
    }

    /// Whether queue `i` is live and its driver has made chains available that the device has
    /// not taken yet (a cheap check for a thread that polls before it sleeps).
    pub fn has_available(&self, i: usize) -> bool {
        if !self.live.load(Ordering::Acquire) {
            return false;
        }
        let Some(q) = self.lock(i) else { return false };
        q.ready()
            && q.avail_idx(&self.mem, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != q.next_avail())
    }

    /// Raises interrupt status bits and the line.
    pub fn signal(&self, bits: u32) {
        self.interrupt_status.fetch_or(bits, Ordering::AcqRel);
        self.irq.set_level(true);
    }
}

/// Where the notifications of a transport go when threads serve its queues (the queue index).
pub type Notifier = Box<dyn Fn(usize) + Send>;

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    shared: Arc<DeviceQueues>,
    /// Set when threads serve the queues: a notification that reaches the transport (one that
    /// KVM did not turn into an ioeventfd signal) is handed to them. Without it the transport
    /// serves the queue itself, on the caller's thread.
    notifier: Option<Notifier>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, whose queues live in `mem`, interrupting through `irq`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: Box<dyn IrqLine>) -> Self {
        let max_sizes = device.queue_max_sizes().to_vec();
        let queues = max_sizes
            .iter()
            .map(|&max| {
                Mutex::new(Queue::new(max).expect("queue sizes of device models are powers of two"))
            })
            .collect();
        MmioTransport {
            shared: Arc::new(DeviceQueues {
                device,
                mem,
                irq,
                queues,
                max_sizes,
                interrupt_status: AtomicU32::new(0),
                live: AtomicBool::new(false),
            }),
            notifier: None,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
        }
    }

    /// What the threads serving the queues need.
    pub fn queues(&self) -> Arc<DeviceQueues> {
        self.shared.clone()
    }

    /// Hands notifications to `notifier` (the queues' threads) instead of serving them here.
    pub fn set_notifier(&mut self, notifier: Notifier) {
        self.notifier = Some(notifier);
    }

    /// The device's status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Runs `f` on the selected queue (under its lock).
    fn with_selected<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> Option<R> {
        self.shared
            .lock(self.queue_sel as usize)
            .map(|mut q| f(&mut q))
    }

    fn device_features(&self) -> u64 {
        self.shared.device.features() | F_VERSION_1
    }

    fn reset(&mut self) {
        self.shared.live.store(false, Ordering::Release);
        // A queue being served is reset once its thread lets go of it (its batch done); the
        // device's state after that, so no batch runs on a half-reset device.
        for i in 0..self.shared.queue_count() {
            if let Some(mut q) = self.shared.lock(i) {
                q.reset();
            }
        }
        self.shared.device.reset();
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.shared.interrupt_status.store(0, Ordering::Release);
        self.shared.irq.set_level(false);
    }

    /// Raises interrupt status bits and the line.
    pub fn signal(&mut self, bits: u32) {
        self.shared.signal(bits);
    }

    /// Tells the driver that the configuration space changed (a new capacity, say).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.signal(INT_CONFIG);
        }
    }

    /// A read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.shared.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            0x000 => MAGIC_VALUE,
            0x004 => 2,
            0x008 => self.shared.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self
                .shared
                .max_sizes
                .get(self.queue_sel as usize)
                .map_or(0, |&m| u32::from(m)),
            0x044 => self.with_selected(|q| u32::from(q.ready())).unwrap_or(0),
            0x060 => self.shared.interrupt_status.load(Ordering::Acquire),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            if self.status & status::FEATURES_OK != 0 {
                self.shared
                    .device
                    .write_config(self.driver_features, offset - 0x100, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue layout may change only while feature negotiation is done and the queue is off.
        let setup_phase =
            self.status & status::FEATURES_OK != 0 && self.status & status::FAILED == 0;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 if self.status & status::FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffff << shift)) | u64::from(v) << shift;
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if setup_phase => {
                self.with_selected(|q| {
                    if !q.ready() && v <= u32::from(q.max_size()) {
                        q.set_size(v as u16);
                    }
                });
            }
            0x044 => {
                self.with_selected(|q| {
                    if v == 0 {
                        q.set_ready(false);
                    } else if setup_phase && !q.ready() {
                        q.set_ready(true);
                    }
                });
            }
            0x050 => self.notify(v),
            0x064 => {
                let before = self.shared.interrupt_status.fetch_and(!v, Ordering::AcqRel);
                if before & !v == 0 {
                    self.shared.irq.set_level(false);
                }
            }
            0x070 => self.set_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if setup_phase => {
                let (lo, hi) = if offset % 8 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                self.with_selected(|q| {
                    if q.ready() {
                        return;
                    }
                    match offset & !7 {
                        0x080 => q.set_desc_table_address(lo, hi),
                        0x090 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                });
            }
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added (except through a reset).
        if v & self.status != self.status {
            return;
        }
        let mut v = v;
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let offered = self.device_features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                // The driver asked for something we did not offer: leave FEATURES_OK clear.
                v &= !status::FEATURES_OK;
            }
        }
        if newly & status::DRIVER_OK != 0 {
            if v & status::FEATURES_OK == 0 {
                return;
            }
            let event_idx = self.driver_features & F_EVENT_IDX != 0;
            for i in 0..self.shared.queue_count() {
                if let Some(mut q) = self.shared.lock(i) {
                    q.set_event_idx(event_idx);
                }
            }
            self.shared.device.activate(self.driver_features);
        }
        self.status = v;
        let live = v & status::DRIVER_OK != 0 && v & status::DEVICE_NEEDS_RESET == 0;
        self.shared.live.store(live, Ordering::Release);
    }

    fn notify(&mut self, index: u32) {
        let i = index as usize;
        if i >= self.shared.queue_count() {
            return;
        }
        match &self.notifier {
            Some(notify) => notify(i),
            None => self.shared.serve(i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize};
    use vm_memory::GuestAddress;

    struct Line(Arc<AtomicBool>);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.store(high, Ordering::SeqCst);
        }
    }

    struct Dummy {
        active: AtomicU64,
        served: AtomicUsize,
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&self, _: u64, _: u64, _: &[u8]) {}
        fn activate(&self, features: u64) {
            self.active.store(features, Ordering::SeqCst);
        }
        fn reset(&self) {
            self.active.store(0, Ordering::SeqCst);
        }
        fn process_queue(&self, _: usize, _: &mut Queue, _: &GuestMemoryMmap) -> bool {
            self.served.fetch_add(1, Ordering::SeqCst);
            true
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn negotiation_queue_setup_notify_and_interrupts() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let line = Arc::new(AtomicBool::new(false));
        let dev = Box::new(Dummy {
            active: AtomicU64::new(0),
            served: AtomicUsize::new(0),
        });
        let mut t = MmioTransport::new(dev, mem, Box::new(Line(line.clone())));
        assert_eq!(rd(&mut t, 0), MAGIC_VALUE);
        assert_eq!(rd(&mut t, 8), 42);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 is offered");
        wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        // Asking for an unoffered feature: FEATURES_OK does not stick.
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, 1 << 4);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, 1 << 3);
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        assert_eq!(rd(&mut t, 0x34), 8);
        wr(&mut t, 0x38, 8);
        wr(&mut t, 0x80, 0x1000);
        wr(&mut t, 0x90, 0x2000);
        wr(&mut t, 0xa0, 0x3000);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 1);
        // A notification before DRIVER_OK is ignored.
        wr(&mut t, 0x50, 0);
        assert!(!line.load(Ordering::SeqCst));
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        wr(&mut t, 0x50, 0);
        assert!(line.load(Ordering::SeqCst));
        assert_eq!(rd(&mut t, 0x60), INT_VRING);
        wr(&mut t, 0x64, INT_VRING);
        assert!(!line.load(Ordering::SeqCst));
        // A notification of a queue that does not exist, odd widths: ignored.
        wr(&mut t, 0x50, 7);
        t.write(0x70, &[0]);
        let mut two = [9u8; 2];
        t.read(0x0, &mut two);
        assert_eq!(two, [0, 0]);
        // Reset.
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(rd(&mut t, 0x44), 0);
    }
}
