//! Formats told by content: the signatures of the image formats vstor meets, and a guard that
//! keeps a probed raw disk from being turned into another format by its guest.
//!
//! | format  | signature                                                        |
//! | ------- | ---------------------------------------------------------------- |
//! | VHDX    | `vhdxfile` at offset 0                                           |
//! | VHD     | the footer cookie `conectix` in the last 512 bytes, or at 0      |
//! | qcow2   | `QFI\xfb` at 0 (refused by name)                                 |
//! | VMDK    | `KDMV` at 0, or a text descriptor `# Disk DescriptorFile` (refused) |
//! | VDI     | `0xbeda107f` at 0x40 (refused)                                   |
//! | QED     | `QED\0` at 0 (refused)                                           |
//! | LUKS    | `LUKS\xba\xbe` at 0 (refused)                                    |
//!
//! Anything else is raw. A raw disk that was not named `raw:` explicitly is opened behind
//! [`ProbeGuard`], which refuses a write that would make the disk's first or last sector carry
//! one of these signatures: otherwise a guest could write a VHDX header onto its raw disk and
//! the host would open it as a VHDX next time (QEMU's rule for probed raw images).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::{Arc, Mutex};
use vstor_core::{BlockDevice, DeviceInfo, Error, Op, Request, Result};

/// What the content of a file says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// No signature vstor knows: raw data.
    Raw,
    /// A VHDX image.
    Vhdx,
    /// A legacy VHD image (Virtual PC, `qemu-img -f vpc`).
    Vhd,
    /// Another format vstor does not open (its name).
    Foreign(&'static str),
}

impl Detected {
    /// The format's name, as messages give it.
    pub fn name(self) -> &'static str {
        match self {
            Detected::Raw => "raw",
            Detected::Vhdx => "VHDX",
            Detected::Vhd => "VHD",
            Detected::Foreign(n) => n,
        }
    }
}

/// How many bytes at the start of a file the signatures need.
pub const HEAD: usize = 512;
/// The VHD footer's size (it sits in the last 512 bytes).
pub const TAIL: usize = 512;

/// Tells the format from the first [`HEAD`] bytes and the last [`TAIL`] bytes of a file (either
/// may be shorter when the file is).
pub fn detect(head: &[u8], tail: &[u8]) -> Detected {
    let at = |off: usize, sig: &[u8]| head.get(off..off + sig.len()) == Some(sig);
    if at(0, b"vhdxfile") {
        Detected::Vhdx
    } else if at(0, b"conectix") || tail.starts_with(b"conectix") {
        Detected::Vhd
    } else if at(0, b"QFI\xfb") {
        Detected::Foreign("qcow2")
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Detected::Foreign("VMDK")
    } else if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        Detected::Foreign("VDI")
    } else if at(0, b"QED\0") {
        Detected::Foreign("QED")
    } else if at(0, b"LUKS\xba\xbe") {
        Detected::Foreign("LUKS")
    } else {
        Detected::Raw
    }
}

/// Reads the start and the end of the file or block device at `path` and tells its format.
pub fn probe(path: &Path) -> Result<Detected> {
    let ctx = |what: &str| format!("cannot {what} {} to tell its format", path.display());
    // Look before opening: opening a FIFO would wait for a writer.
    let ft = std::fs::metadata(path)
        .map_err(|e| Error::io(ctx("open"), e))?
        .file_type();
    {
        use std::os::unix::fs::FileTypeExt;
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(Error::InvalidArgument(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
    }
    let mut f = File::open(path).map_err(|e| Error::io(ctx("open"), e))?;
    let len = f
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(ctx("size"), e))?;
    let mut head = vec![0u8; HEAD.min(len as usize)];
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.read_exact(&mut head))
        .map_err(|e| Error::io(ctx("read"), e))?;
    let mut tail = vec![0u8; TAIL.min(len as usize)];
    f.seek(SeekFrom::Start(len - tail.len() as u64))
        .and_then(|_| f.read_exact(&mut tail))
        .map_err(|e| Error::io(ctx("read"), e))?;
    Ok(detect(&head, &tail))
}

/// A raw disk that was probed (not named `raw:`): it refuses any write, write-zeroes or discard
/// that would leave another format's signature in its first or last sector, with an I/O error
/// naming the format. Everything else passes straight through.
pub struct ProbeGuard {
    inner: Arc<dyn BlockDevice>,
    name: String,
    /// The file behind the device, if it is a regular file: [`probe`] looks for the VHD footer
    /// in the file's last 512 bytes, wherever the file ends now (its length may not be whole
    /// sectors, and may change under the open).
    file: Option<File>,
    /// Held across the check and the write of a guarded sector, so that two writers cannot
    /// assemble a signature between them.
    guarded: Mutex<()>,
}

impl ProbeGuard {
    /// Guards `inner`, whose messages call it `name`.
    pub fn new(inner: Arc<dyn BlockDevice>, name: impl Into<String>) -> Self {
        ProbeGuard {
            inner,
            name: name.into(),
            file: None,
            guarded: Mutex::new(()),
        }
    }

    /// The device is the regular file at `path`: the footer window follows the file's end. The
    /// guard keeps a descriptor of its own on the file, so it follows the file it was opened
    /// on, whatever is renamed or put at `path` later.
    pub fn with_file(mut self, path: &Path) -> Self {
        self.file = File::open(path).ok();
        self
    }

    /// The first and the last sector of the device: a write that touches neither cannot make a
    /// signature (the file's last 512 bytes, where the footer is looked for, lie within the
    /// device's last sector whenever the file ends within a sector of the device's end). This
    /// is all a write costs when it touches neither: no system call.
    fn guarded_sectors(&self) -> [(u64, u64); 2] {
        let cap = self.inner.info().capacity;
        [
            (0, HEAD as u64),
            (cap.saturating_sub(TAIL as u64), TAIL as u64),
        ]
    }

    /// The ranges whose content decides the format: the first sector, the device's last 512
    /// bytes, and the file's last 512 bytes as the file is now (where [`probe`] reads them).
    fn sectors(&self) -> Vec<(u64, u64)> {
        let mut out = self.guarded_sectors().to_vec();
        if let Some(m) = self.file.as_ref().and_then(|f| f.metadata().ok()) {
            let at = m.len().saturating_sub(TAIL as u64);
            if at != out[1].0 {
                out.push((at, TAIL as u64));
            }
        }
        out
    }

    fn touches(&self, req: &Request<'_>) -> bool {
        if !req.kind().is_write() {
            return false;
        }
        let (o, l) = (req.offset(), req.len());
        self.guarded_sectors()
            .iter()
            .any(|&(s, n)| o < s + n && s < o.saturating_add(l))
    }

    /// What the guarded sectors would hold after `req`; an error if that is another format.
    fn check(&self, req: &Request<'_>) -> Result<()> {
        let windows = self.sectors();
        let cap = self.inner.info().capacity;
        // What the device serves of each window; bytes past its capacity cannot be written
        // through it and read as zeroes here (a file with such a tail was probed raw, so they
        // hold no cookie).
        let window = |at: u64, len: u64| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len as usize];
            let served = cap.saturating_sub(at).min(len);
            let sector = u64::from(self.inner.info().logical_sector_size.max(1));
            // Read whole sectors around the window and take what falls in it.
            let start = at - at % sector;
            let stop = (at + served).div_ceil(sector) * sector;
            if served > 0 && stop <= cap {
                let mut b = vec![0u8; (stop - start) as usize];
                self.inner.read_at(start, &mut b)?;
                let from = (at - start) as usize;
                buf[..served as usize].copy_from_slice(&b[from..from + served as usize]);
            }
            overlay(req, at, &mut buf);
            Ok(buf)
        };
        let (h, hl) = windows[0];
        let head = window(h, hl.min(cap))?;
        let mut found = detect(&head, &[]);
        for &(t, tl) in &windows[1..] {
            if found == Detected::Raw {
                found = detect(&head, &window(t, tl)?);
            }
        }
        match found {
            Detected::Raw => Ok(()),
            d => Err(Error::io(
                format!(
                    "{} of {} bytes at offset {} of {} refused: it would give this raw disk a {} \
                     signature, and a raw disk that was not named raw: must not turn into \
                     another format (open it as raw:PATH to allow such writes)",
                    req.kind(),
                    req.len(),
                    req.offset(),
                    self.name,
                    d.name()
                ),
                std::io::Error::from_raw_os_error(libc::EPERM),
            )),
        }
    }
}

/// Lays what `req` writes over `buf`, which holds the device's bytes from `at`.
fn overlay(req: &Request<'_>, at: u64, buf: &mut [u8]) {
    let end = at + buf.len() as u64;
    // Bytes [off, off+len) take `data` (zeroes where None).
    let mut put = |off: u64, len: u64, data: Option<&[u8]>| {
        for x in off.max(at)..(off + len).min(end) {
            buf[(x - at) as usize] = data.map_or(0, |d| d[(x - off) as usize]);
        }
    };
    match &req.op {
        Op::Write { offset, bufs } => {
            let mut off = *offset;
            for b in bufs.iter() {
                put(off, b.len() as u64, Some(b));
                off += b.len() as u64;
            }
        }
        Op::WriteZeroes { offset, len } | Op::Discard { offset, len } => put(*offset, *len, None),
        Op::Read { .. } | Op::Flush => {}
    }
}

impl BlockDevice for ProbeGuard {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn submit(&self, batch: &mut [Request<'_>]) {
        if !batch.iter().any(|r| self.touches(r)) {
            return self.inner.submit(batch);
        }
        let _g = self.guarded.lock().unwrap_or_else(|p| p.into_inner());
        let refused: Vec<Option<Error>> = batch
            .iter()
            .map(|r| {
                if self.touches(r) {
                    self.check(r).err()
                } else {
                    None
                }
            })
            .collect();
        if refused.iter().all(Option::is_none) {
            return self.inner.submit(batch);
        }
        for (r, e) in batch.iter_mut().zip(refused) {
            match e {
                Some(e) => r.complete(Err(e)),
                None => self.inner.submit(std::slice::from_mut(r)),
            }
        }
    }

    fn resize(&self, new_capacity: u64) -> Result<()> {
        self.inner.resize(new_capacity)
    }

    fn capacity_signal(&self) -> Option<Arc<vstor_core::CapacitySignal>> {
        self.inner.capacity_signal()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<vstor_core::Extent>> {
        self.inner.allocation(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        let mut h = vec![0u8; 512];
        assert_eq!(detect(&h, &h), Detected::Raw);
        h[..8].copy_from_slice(b"vhdxfile");
        assert_eq!(detect(&h, &[]), Detected::Vhdx);
        let mut t = vec![0u8; 512];
        t[..8].copy_from_slice(b"conectix");
        assert_eq!(detect(&[0; 512], &t), Detected::Vhd);
        assert_eq!(
            detect(b"QFI\xfb\0\0\0\x03", &[]),
            Detected::Foreign("qcow2")
        );
        assert_eq!(detect(b"KDMV", &[]), Detected::Foreign("VMDK"));
        let mut v = vec![0u8; 512];
        v[0x40..0x44].copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
        assert_eq!(detect(&v, &[]), Detected::Foreign("VDI"));
        assert_eq!(detect(b"vhdx", &[]), Detected::Raw, "a short file is raw");
    }

    #[test]
    fn the_guard_refuses_signatures_and_passes_the_rest() {
        let mem: Arc<dyn BlockDevice> = Arc::new(vstor_core::MemoryDevice::new(1 << 20).unwrap());
        let g = ProbeGuard::new(mem.clone(), "m");
        let sector = |sig: &[u8]| {
            let mut b = vec![0u8; 512];
            b[..sig.len()].copy_from_slice(sig);
            b
        };
        let e = g.write_at(0, &sector(b"vhdxfile")).unwrap_err();
        assert_eq!(e.kind(), vstor_core::ErrorKind::Io);
        assert!(e.to_string().contains("VHDX signature"), "{e}");
        // In a vectored write whose pieces each look harmless.
        let (a, b) = (sector(b"QFI"), sector(b"\xfb"));
        let mut r = [Request::writev(0, [&a[..3], &b[..509]])];
        g.submit(&mut r);
        assert!(r[0].result().is_err());
        // The VHD footer in the last sector.
        assert!(g.write_at((1 << 20) - 512, &sector(b"conectix")).is_err());
        // Zeroes never make one here; ordinary data passes.
        g.write_zeroes(0, 4096).unwrap();
        g.write_at(0, &sector(b"hello")).unwrap();
        // A batch that mixes them keeps the good ones and refuses only the bad one.
        let kdmv = sector(b"KDMV");
        let mut batch = [
            Request::write(4096, &[7u8; 512]),
            Request::write(0, &kdmv),
            Request::write(8192, &[8u8; 512]),
        ];
        g.submit(&mut batch);
        assert!(batch[0].result().is_ok() && batch[2].result().is_ok());
        assert!(batch[1].result().is_err());
        let mut first = [0u8; 512];
        mem.read_at(0, &mut first).unwrap();
        assert_eq!(
            first.to_vec(),
            sector(b"hello"),
            "a refused write reached the device"
        );
        mem.read_at(8192, &mut first).unwrap();
        assert_eq!(first, [8u8; 512]);
    }
}
