//! The frontend's memory table: guest RAM regions mapped from the file descriptors the frontend
//! sends (SET_MEM_TABLE, or ADD_MEM_REG / REM_MEM_REG with CONFIGURE_MEM_SLOTS), checked before
//! anything is mapped.
//!
//! A region is refused (and the connection closed) when it is empty, wraps around, overlaps
//! another, is not backed by a regular or shared-memory file at least as long as its offset plus
//! its size (a mapping past the end of its file would fault on access), or when there are more
//! than [`MAX_REGIONS`]. Every access to guest memory goes through `vm-memory`, which checks it
//! against the mapped regions, so descriptors outside them fail as requests and are never
//! dereferenced.
//!
//! What no check at map time can rule out: a frontend that shrinks the file afterwards. QEMU's
//! `memory-backend-memfd` seals its memfd against that by default; a file-backed RAM that the
//! frontend truncates while the guest runs would fault in the backend as in every vhost-user
//! backend.

use std::fs::File;
use std::io;
use std::sync::Arc;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The most memory regions of one frontend (`GET_MAX_MEM_SLOTS`).
pub const MAX_REGIONS: usize = 64;

/// One mapped region and where the frontend has it in its own address space.
#[derive(Clone)]
struct Region {
    guest: u64,
    size: u64,
    user: u64,
    mapping: Arc<GuestRegionMmap>,
}

/// The memory table of a connection.
#[derive(Default, Clone)]
pub struct MemoryTable {
    regions: Vec<Region>,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.into())
}

impl MemoryTable {
    /// Maps one region after checking it (see the module documentation).
    fn map(guest: u64, size: u64, user: u64, offset: u64, file: File) -> io::Result<Region> {
        let end = |a: u64| a.checked_add(size).is_some_and(|e| e > a);
        if size == 0 || !end(guest) || !end(user) || !end(offset) {
            return Err(invalid(format!(
                "memory region at guest {guest:#x}, size {size:#x}, offset {offset:#x} is \
                 empty or wraps around"
            )));
        }
        let len = usize::try_from(size)
            .map_err(|_| invalid(format!("memory region of {size:#x} bytes is too large")))?;
        let meta = file.metadata()?;
        let kind = meta.file_type();
        if !kind.is_file() {
            return Err(invalid(
                "memory region's file is not a regular or shared-memory file",
            ));
        }
        if meta.len() < offset + size {
            return Err(invalid(format!(
                "memory region at guest {guest:#x} maps {size:#x} bytes at offset {offset:#x} of \
                 a file of {:#x} bytes",
                meta.len()
            )));
        }
        let mmap = MmapRegion::from_file(FileOffset::new(file, offset), len)
            .map_err(|e| io::Error::other(format!("cannot map a memory region: {e}")))?;
        let mapping = GuestRegionMmap::new(mmap, GuestAddress(guest))
            .ok_or_else(|| invalid("memory region wraps around"))?;
        Ok(Region {
            guest,
            size,
            user,
            mapping: Arc::new(mapping),
        })
    }

    /// A table of these regions `(guest address, size, frontend address, file offset, file)`
    /// (SET_MEM_TABLE).
    pub fn from_regions(regions: Vec<(u64, u64, u64, u64, File)>) -> io::Result<Self> {
        if regions.len() > MAX_REGIONS {
            return Err(invalid(format!(
                "{} memory regions (at most {MAX_REGIONS})",
                regions.len()
            )));
        }
        let mut t = MemoryTable::default();
        for (guest, size, user, offset, file) in regions {
            t.insert(Self::map(guest, size, user, offset, file)?)?;
        }
        Ok(t)
    }

    fn insert(&mut self, r: Region) -> io::Result<()> {
        if self.regions.len() >= MAX_REGIONS {
            return Err(invalid(format!("more than {MAX_REGIONS} memory regions")));
        }
        let overlaps = |a: u64, alen: u64, b: u64, blen: u64| a < b + blen && b < a + alen;
        if let Some(o) = self.regions.iter().find(|o| {
            overlaps(o.guest, o.size, r.guest, r.size) || overlaps(o.user, o.size, r.user, r.size)
        }) {
            return Err(invalid(format!(
                "memory region at guest {:#x} (+{:#x}) overlaps the region at {:#x} (+{:#x})",
                r.guest, r.size, o.guest, o.size
            )));
        }
        self.regions.push(r);
        self.regions.sort_by_key(|r| r.guest);
        Ok(())
    }

    /// Adds a region (ADD_MEM_REG).
    pub fn add(
        &mut self,
        guest: u64,
        size: u64,
        user: u64,
        offset: u64,
        file: File,
    ) -> io::Result<()> {
        let r = Self::map(guest, size, user, offset, file)?;
        self.insert(r)
    }

    /// Removes the region at `guest` of `size` bytes (REM_MEM_REG).
    pub fn remove(&mut self, guest: u64, size: u64) -> io::Result<()> {
        let before = self.regions.len();
        self.regions
            .retain(|r| !(r.guest == guest && r.size == size));
        if self.regions.len() == before {
            return Err(invalid(format!(
                "no memory region at guest {guest:#x} of {size:#x} bytes"
            )));
        }
        Ok(())
    }

    /// The guest memory these regions make (`None` while there are none).
    pub fn guest_memory(&self) -> Option<GuestMemoryMmap> {
        GuestMemoryMmap::from_arc_regions(self.regions.iter().map(|r| r.mapping.clone()).collect())
            .ok()
    }

    /// The guest address of a frontend virtual address (vring addresses are given that way).
    pub fn user_to_guest(&self, user: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| user >= r.user && user - r.user < r.size)
            .map(|r| r.guest + (user - r.user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(len: u64) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn regions_map_and_translate() {
        let mut t =
            MemoryTable::from_regions(vec![(0, 1 << 20, 0x7f00_0000_0000, 0, file(2 << 20))])
                .unwrap();
        t.add(1 << 30, 1 << 20, 0x7f10_0000_0000, 1 << 20, file(2 << 20))
            .unwrap();
        assert_eq!(t.user_to_guest(0x7f00_0000_1000), Some(0x1000));
        assert_eq!(t.user_to_guest(0x7f10_0000_0010), Some((1 << 30) + 0x10));
        assert_eq!(t.user_to_guest(0x7f00_0010_0000), None);
        assert!(t.guest_memory().is_some());
        t.remove(0, 1 << 20).unwrap();
        assert!(t.remove(0, 1 << 20).is_err());
        assert_eq!(t.user_to_guest(0x7f00_0000_1000), None);
    }

    #[test]
    fn hostile_regions_are_refused() {
        // Past the end of its file: mapping it would fault on access.
        assert!(MemoryTable::from_regions(vec![(0, 2 << 20, 0, 0, file(1 << 20))]).is_err());
        assert!(MemoryTable::from_regions(vec![(0, 1 << 20, 0, 4096, file(1 << 20))]).is_err());
        // Empty, wrapping.
        assert!(MemoryTable::from_regions(vec![(0, 0, 0, 0, file(4096))]).is_err());
        assert!(
            MemoryTable::from_regions(vec![(u64::MAX - 4095, 8192, 0, 0, file(8192))]).is_err()
        );
        assert!(MemoryTable::from_regions(vec![(0, 4096, 0, u64::MAX, file(8192))]).is_err());
        // Overlapping in guest or frontend addresses.
        let r = MemoryTable::from_regions(vec![
            (0, 8192, 0, 0, file(8192)),
            (4096, 8192, 1 << 20, 0, file(8192)),
        ]);
        assert!(r.is_err());
        let r = MemoryTable::from_regions(vec![
            (0, 8192, 0, 0, file(8192)),
            (1 << 20, 8192, 4096, 0, file(8192)),
        ]);
        assert!(r.is_err());
        // Not a file.
        let dir = File::open("/").unwrap();
        assert!(MemoryTable::from_regions(vec![(0, 4096, 0, 0, dir)]).is_err());
        // Too many.
        let many = (0..=MAX_REGIONS as u64)
            .map(|i| (i << 20, 4096, i << 20, 0, file(4096)))
            .collect();
        assert!(MemoryTable::from_regions(many).is_err());
    }
}
