//! Virtio devices and their MMIO transport.

pub mod block;
pub mod io_thread;
pub mod mmio;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub use vstor_serve::virtio_blk::{F_EVENT_IDX, F_VERSION_1};

/// What a virtio device model implements; the transport does the rest.
///
/// Every method takes `&self`: a device keeps its state in atomics so that its queues can be
/// served from their own threads while the vCPU thread reads its configuration.
pub trait VirtioDevice: Send + Sync {
    /// The virtio device ID (2 for a block device).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// The most descriptors each of its queues may have.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads from the device-specific configuration space (bytes past its end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific configuration space; `driver_features` are the features
    /// the driver has acknowledged so far. Fields that are not writable ignore the write.
    fn write_config(&self, driver_features: u64, offset: u64, data: &[u8]);
    /// The driver finished feature negotiation and set DRIVER_OK with these features.
    fn activate(&self, features: u64);
    /// The driver reset the device.
    fn reset(&self);
    /// Serves the available buffers of queue `index`; returns whether the driver should be
    /// interrupted (buffers were returned through the used ring and, with EVENT_IDX, the driver
    /// asked for an interrupt at this point).
    fn process_queue(&self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
}

/// A shared device serves as the device itself (the VMM keeps a handle for its control plane).
impl<T: VirtioDevice + ?Sized> VirtioDevice for std::sync::Arc<T> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&self, driver_features: u64, offset: u64, data: &[u8]) {
        (**self).write_config(driver_features, offset, data)
    }
    fn activate(&self, features: u64) {
        (**self).activate(features)
    }
    fn reset(&self) {
        (**self).reset()
    }
    fn process_queue(&self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        (**self).process_queue(index, queue, mem)
    }
}
