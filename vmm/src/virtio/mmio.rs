//! The virtio-mmio transport (virtio 1.x, "version 2" register layout, spec section 4.2.2).
//!
//! The transport owns the queues and the device status; the device model sees only queues to
//! serve and its configuration space. Accesses the spec does not allow (a register read with the
//! wrong width, a queue change while the queue is live, a write to a read-only register) are
//! ignored, never fatal: a guest cannot stop the VMM through this window.

use super::{VirtioDevice, F_EVENT_IDX, F_VERSION_1};
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
/// not zero).
pub trait IrqLine: Send {
    /// Sets the line's level.
    fn set_level(&self, high: bool);
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Box<dyn IrqLine>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, whose queues live in `mem`, interrupting through `irq`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: Box<dyn IrqLine>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes of device models are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// The device's status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn device_features(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.irq.set_level(false);
    }

    /// Raises interrupt status bits and the line.
    pub fn signal(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        self.irq.set_level(true);
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
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            0x000 => MAGIC_VALUE,
            0x004 => 2,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status,
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
                self.device
                    .write_config(self.driver_features, offset - 0x100, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue layout may change only while feature negotiation is done and the queue is off.
        let queue_setup = self.status & status::FEATURES_OK != 0
            && self.status & status::FAILED == 0
            && self.selected_queue().is_some_and(|q| !q.ready());
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
            0x038 if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    if v <= u32::from(q.max_size()) {
                        q.set_size(v as u16);
                    }
                }
            }
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    if v == 0 {
                        q.set_ready(false);
                    } else if queue_setup {
                        q.set_ready(true);
                    }
                }
            }
            0x050 => self.notify(v),
            0x064 => {
                self.interrupt_status &= !v;
                if self.interrupt_status == 0 {
                    self.irq.set_level(false);
                }
            }
            0x070 => self.set_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if queue_setup => {
                let q = self.selected_queue().expect("queue_setup implies a queue");
                let (lo, hi) = if offset % 8 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                match offset & !7 {
                    0x080 => q.set_desc_table_address(lo, hi),
                    0x090 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
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
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
            self.device.activate(self.driver_features);
        }
        self.status = v;
    }

    fn notify(&mut self, index: u32) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        let i = index as usize;
        let Some(q) = self.queues.get_mut(i) else {
            return;
        };
        if !q.ready() || !q.is_valid(&self.mem) {
            return;
        }
        if self.device.process_queue(i, q, &self.mem) {
            self.signal(INT_VRING);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;
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
