//! The virtio-blk device of the reference VMM: the shared device model of `vstor-serve`
//! ([`vstor_serve::virtio_blk`], which the daemon's vhost-user-blk backend serves as well) behind
//! this VMM's [`VirtioDevice`] interface. Request parsing, validation, batching, the
//! configuration space and the counters live there, once.

pub use vstor_serve::virtio_blk::*;

use super::VirtioDevice;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        Block::device_type(self)
    }
    fn features(&self) -> u64 {
        Block::features(self)
    }
    fn queue_max_sizes(&self) -> &[u16] {
        Block::queue_max_sizes(self)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        Block::read_config(self, offset, data)
    }
    fn write_config(&self, driver_features: u64, offset: u64, data: &[u8]) {
        Block::write_config(self, driver_features, offset, data)
    }
    fn activate(&self, features: u64) {
        Block::activate(self, features)
    }
    fn reset(&self) {
        Block::reset(self)
    }
    fn process_queue(&self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        Block::process_queue(self, index, queue, mem)
    }
}
