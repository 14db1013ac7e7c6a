//! Virtio devices and their MMIO transport.

pub mod block;
pub mod mmio;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Virtio 1.x (feature bit 32), which every device here offers and requires.
pub const F_VERSION_1: u64 = 1 << 32;

/// What a virtio device model implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for a block device).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// The most descriptors each of its queues may have.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads from the device-specific configuration space (bytes past its end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver finished feature negotiation and set DRIVER_OK with these features.
    fn activate(&mut self, features: u64);
    /// The driver reset the device.
    fn reset(&mut self);
    /// Serves the available buffers of queue `index`; returns whether any buffer was returned
    /// through the used ring (so the driver should be interrupted).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
}
