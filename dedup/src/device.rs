//! An optimized file as a [`BlockDevice`]: what the stack builder puts under the VHDX layer,
//! so that an optimized `disk.vhdx` opens like any other.

use crate::error::DedupError;
use crate::stub::StubImage;
use crate::vfs::{LockGuard, RealFs, Vfs};
use std::path::Path;
use std::sync::Arc;
use vstor_core::{
    copy_into_bufs, BlockDevice, DeviceInfo, Op, Request, Result as CoreResult, Supports,
};

/// The bytes of an optimized file: chunks from the store, overlaid with the stub's log.
pub struct StubDevice {
    img: StubImage,
    read_only: bool,
    _lock: Option<LockGuard>,
}

impl std::fmt::Debug for StubDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StubDevice")
            .field("img", &self.img)
            .finish()
    }
}

impl StubDevice {
    /// Opens the optimized file at `path` on the host file system. With `lock`, takes its
    /// image lock (exclusive for a writer, shared for a reader) as every vstor open does.
    pub fn open(path: &Path, read_only: bool, lock: bool) -> Result<StubDevice, DedupError> {
        let fs: Arc<dyn Vfs> = Arc::new(RealFs);
        let guard = if lock {
            Some(
                fs.try_lock(path, !read_only)
                    .map_err(|e| DedupError::io(format!("cannot lock {}", path.display()), e))?
                    .ok_or_else(|| {
                        DedupError::InUse(format!(
                            "{} is in use by another process",
                            path.display()
                        ))
                    })?,
            )
        } else {
            None
        };
        Self::on(fs, path, read_only, guard)
    }

    /// Opens the optimized file at `path` of `fs`, holding `lock` while open.
    pub fn on(
        fs: Arc<dyn Vfs>,
        path: &Path,
        read_only: bool,
        lock: Option<LockGuard>,
    ) -> Result<StubDevice, DedupError> {
        let img = StubImage::open(fs, path, !read_only)?;
        Ok(StubDevice {
            img,
            read_only,
            _lock: lock,
        })
    }

    /// The stub behind the device.
    pub fn image(&self) -> &StubImage {
        &self.img
    }

    fn run(&self, req: &mut Request<'_>) -> CoreResult<()> {
        self.info().check(req)?;
        match &mut req.op {
            Op::Read { offset, bufs } => {
                let len: usize = bufs.iter().map(|b| b.len()).sum();
                let mut tmp = vec![0u8; len];
                self.img.read(*offset, &mut tmp)?;
                copy_into_bufs(bufs, 0, &tmp);
                Ok(())
            }
            Op::Write { offset, bufs } => {
                let data: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
                self.img.write(*offset, &data)?;
                Ok(())
            }
            Op::Flush => Ok(self.img.flush()?),
            Op::Discard { .. } | Op::WriteZeroes { .. } => {
                Err(vstor_core::Error::Unsupported { op: req.kind() })
            }
        }
    }
}

impl BlockDevice for StubDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            capacity: self.img.size(),
            logical_sector_size: 512,
            physical_sector_size: 4096,
            mem_alignment: 1,
            read_only: self.read_only,
            discard_zeroes: false,
            supports: Supports {
                flush: true,
                discard: false,
                write_zeroes: false,
                resize: !self.read_only,
            },
        }
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        for req in batch.iter_mut() {
            let r = self.run(req);
            req.complete(r);
        }
    }

    fn resize(&self, new_capacity: u64) -> CoreResult<()> {
        if self.read_only {
            return Err(vstor_core::Error::ReadOnly {
                op: vstor_core::OpKind::Write,
            });
        }
        Ok(self.img.resize(new_capacity)?)
    }

    fn describe(&self) -> String {
        format!("dedup stub {}", self.img.name())
    }
}
