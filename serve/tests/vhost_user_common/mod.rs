//! What the vhost-user-blk tests with a real VMM share: QEMU and the guest
//! (scripts/make-vhost-guest), the guest's console protocol, a VHDX or a pool space served
//! in-process, with or without a QoS flow.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vstor_core::{BlockDevice, FileOptions};
use vstor_qos::{Limits, PolicyKind, Qos, QosConfig, QosDevice};
use vstor_serve::export::ServeError;
use vstor_serve::{Export, Opened, Opener, QosControl, Registry};
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

pub const MIB: u64 = 1 << 20;
/// The size of the test disks.
pub const DISK: u64 = 256 * MIB;
/// How long one guest run may take (TCG boots Debian's kernel in about 5 s here).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

/// Opens a path as a writable VHDX (or read-only with `readonly`).
pub struct VhdxOpener;

impl Opener for VhdxOpener {
    fn open(&self, _name: &str, target: &str, read_only: bool) -> Result<Opened, ServeError> {
        let opts = OpenOptions {
            read_only,
            file: FileOptions {
                direct: true,
                lock: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let device: Arc<dyn BlockDevice> = Arc::new(Vhdx::open(target, &opts)?);
        Ok(Opened {
            device,
            live: None,
            qos: None,
            notes: Vec::new(),
            format: "vhdx".into(),
        })
    }
}

/// Opens `pool:DIR/NAME` as the space NAME of the pool whose members are in DIR, as the
/// `vstor` stack builder does (src/target.rs): `Pool::open_dir` (which locks every member),
/// then `open_space`.
pub struct PoolOpener;

impl Opener for PoolOpener {
    fn open(&self, _name: &str, target: &str, read_only: bool) -> Result<Opened, ServeError> {
        let rest = target
            .strip_prefix("pool:")
            .ok_or_else(|| ServeError::invalid(format!("{target} is not pool:DIR/NAME")))?;
        let (dir, space) = rest
            .rsplit_once('/')
            .ok_or_else(|| ServeError::invalid(format!("{target} is not pool:DIR/NAME")))?;
        let pool = vstor_spaces::Pool::open_dir(
            Path::new(dir),
            &vstor_spaces::OpenOptions {
                read_only,
                ..Default::default()
            },
            &FileOptions {
                lock: true,
                ..Default::default()
            },
        )?;
        let device: Arc<dyn BlockDevice> = Arc::new(pool.open_space(space)?);
        Ok(Opened {
            device,
            live: None,
            qos: None,
            notes: pool.info().notes,
            format: "pool space".into(),
        })
    }
}

/// Puts every export `inner` opens on a QoS flow of one scheduler, as the daemon's stack
/// builder does (src/cli/serve.rs): a dedicated policy with no limits until
/// [`Export::set_qos`] sets some.
pub struct QosOpener<O> {
    pub inner: O,
    pub qos: Arc<Qos>,
}

impl<O: Opener> QosOpener<O> {
    pub fn new(inner: O) -> Self {
        QosOpener {
            inner,
            qos: Qos::new(QosConfig::default()),
        }
    }
}

impl<O: Opener> Opener for QosOpener<O> {
    fn open(&self, name: &str, target: &str, read_only: bool) -> Result<Opened, ServeError> {
        let qos_err = |e: vstor_qos::Error| ServeError::invalid(e.to_string());
        let mut o = self.inner.open(name, target, read_only)?;
        let policy = self
            .qos
            .add_policy(name, PolicyKind::Dedicated, Limits::default())
            .map_err(qos_err)?;
        let flow = self.qos.add_flow(name, Some(policy), 0).map_err(qos_err)?;
        o.device = Arc::new(QosDevice::new(self.qos.clone(), flow, o.device).map_err(qos_err)?);
        o.qos = Some(QosControl {
            qos: self.qos.clone(),
            policy,
            flow,
        });
        Ok(o)
    }
}

/// QEMU, the kernel and the base initramfs.
#[derive(Clone)]
pub struct Guest {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds (or finds cached) the guest with scripts/make-vhost-guest; `None` after printing why
/// the test is skipped.
pub fn guest(test: &str) -> Option<Guest> {
    static GUEST: OnceLock<Result<Guest, String>> = OnceLock::new();
    let g = GUEST.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("the target dir")
            .to_path_buf();
        let dir = target.join("vhost-guest");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-vhost-guest");
        let o = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !o.status.success() {
            return Err(format!(
                "scripts/make-vhost-guest failed (it fetches qemu-system-x86 and the kernel with \
                 apt-get download): {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Ok(Guest {
            qemu: dir.join("qemu-system-x86_64"),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
        })
    });
    match g {
        Ok(g) => Some(g.clone()),
        Err(e) => {
            println!("SKIPPED {test}: QEMU cannot be obtained: {e}");
            eprintln!("SKIPPED {test}: QEMU cannot be obtained: {e}");
            None
        }
    }
}

/// An uncompressed cpio archive (newc) of `files` (path, contents), for the kernel to unpack
/// over the base initramfs.
pub fn cpio(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |name: &str, mode: u32, data: &[u8], ino: u32| {
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (i, (name, data)) in files.iter().enumerate() {
        entry(name, 0o100755, data, 1000 + i as u32);
    }
    entry("TRAILER!!!", 0, &[], 0);
    out
}

/// `data` gzipped by the host's gzip (the kernel takes an uncompressed archive after a
/// compressed one for garbage).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut c = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = c.stdin.take().unwrap();
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let o = c.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    assert!(o.status.success());
    o.stdout
}

/// A served VHDX: its registry, export and backend thread.
pub struct Backend {
    pub registry: Registry,
    pub export: Arc<Export>,
    pub stop: Arc<AtomicBool>,
    pub thread: Option<JoinHandle<()>>,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Backend {
    /// A fresh dynamic VHDX of [`DISK`] bytes, served with `queues` queues.
    pub fn new(queues: usize) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.vhdx");
        drop(Vhdx::create(&image, &CreateOptions::dynamic(DISK)).unwrap());
        Self::serving(dir, image, queues)
    }

    /// A differencing child of a dynamic VHDX (`parent.vhdx` beside it, into which `prepare`
    /// writes first), served with `queues` queues.
    pub fn differencing(queues: usize, prepare: impl FnOnce(&Vhdx)) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("parent.vhdx");
        let p = Vhdx::create(&parent, &CreateOptions::dynamic(DISK)).unwrap();
        prepare(&p);
        p.flush().unwrap();
        drop(p);
        let image = dir.path().join("child.avhdx");
        drop(Vhdx::create(&image, &CreateOptions::differencing(&parent)).unwrap());
        Self::serving(dir, image, queues)
    }

    fn serving(dir: tempfile::TempDir, image: PathBuf, queues: usize) -> Backend {
        let target = image.to_str().unwrap().to_string();
        Self::with_opener(dir, Arc::new(VhdxOpener), &target, image, queues)
    }

    /// `target` opened by `opener` as the export `disk`, served with `queues` queues from a
    /// socket in `dir`; `image` is what [`close`](Backend::close) hands back.
    pub fn with_opener(
        dir: tempfile::TempDir,
        opener: Arc<dyn Opener>,
        target: &str,
        image: PathBuf,
        queues: usize,
    ) -> Backend {
        let registry = Registry::new(opener);
        let export = registry.add("disk", target, false).unwrap();
        let socket = dir.path().join("vu.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let thread =
            vstor_serve::vhost_user::serve(export.clone(), &socket, queues, stop.clone()).unwrap();
        Backend {
            registry,
            export,
            stop,
            thread: Some(thread),
            socket,
            image,
            dir,
        }
    }

    /// Stops the backend and closes the image; returns its path (and the directory that holds
    /// it).
    pub fn close(self) -> (PathBuf, tempfile::TempDir) {
        let Backend {
            registry,
            export,
            stop,
            thread,
            socket,
            image,
            dir,
        } = self;
        stop.store(true, Ordering::Release);
        thread.unwrap().join().unwrap();
        registry.remove("disk").unwrap();
        drop(export);
        assert!(!socket.exists(), "the socket file is removed");
        (image, dir)
    }
}

/// A running QEMU whose console lines arrive on a channel.
pub struct Vm {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    /// Every console line so far.
    pub log: Vec<String>,
    pub started: Instant,
}

impl Vm {
    /// Boots the guest with `script` as its /test.sh, attached to `socket` with `queues`
    /// request queues, on `cpus` vCPUs; with `reconnect` QEMU connects again (every second) when
    /// the backend goes away.
    pub fn boot(
        g: &Guest,
        dir: &Path,
        socket: &Path,
        queues: usize,
        cpus: usize,
        reconnect: bool,
        script: &str,
    ) -> Vm {
        let initrd = dir.join("initrd.img");
        let mut img = std::fs::read(&g.initrd).unwrap();
        img.extend_from_slice(&gzip(&cpio(&[("test.sh", script.as_bytes())])));
        std::fs::write(&initrd, img).unwrap();
        let mut child = Command::new(&g.qemu)
            .args(["-accel", "tcg", "-M", "q35", "-m", "256M", "-smp"])
            .arg(cpus.to_string())
            .args([
                "-object",
                "memory-backend-memfd,id=mem,size=256M,share=on",
                "-numa",
                "node,memdev=mem",
                "-chardev",
            ])
            .arg(format!(
                "socket,id=vu0,path={}{}",
                socket.display(),
                if reconnect { ",reconnect=1" } else { "" }
            ))
            .args(["-device"])
            .arg(format!(
                "vhost-user-blk-pci,chardev=vu0,num-queues={queues}"
            ))
            .arg("-kernel")
            .arg(&g.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args([
                "-append",
                "console=ttyS0 quiet panic=-1",
                "-nographic",
                "-no-reboot",
                "-net",
                "none",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).split(b'\n').map_while(Result::ok) {
                let _ = tx.send(String::from_utf8_lossy(&l).trim_end().to_string());
            }
        });
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(err).read_to_string(&mut s);
            for l in s.lines() {
                let _ = tx2.send(format!("qemu stderr: {l}"));
            }
        });
        Vm {
            child,
            lines,
            log: Vec::new(),
            started: Instant::now(),
        }
    }

    /// The next guest verdict line ("VSTOR-GUEST: ..." without its prefix); `None` when QEMU
    /// ended.
    pub fn next(&mut self) -> Option<String> {
        loop {
            let left = GUEST_TIMEOUT.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if let Some(i) = l.find("VSTOR-GUEST: ") {
                        let v = l[i + 13..].to_string();
                        println!("guest: {v}");
                        return Some(v);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "the guest ran past {GUEST_TIMEOUT:?}; console:\n{}",
                        self.log.join("\n")
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits for a line starting with `prefix`; panics on a FAIL line or the end.
    pub fn expect(&mut self, prefix: &str) -> String {
        loop {
            match self.next() {
                Some(l) if l.starts_with(prefix) => return l,
                Some(l) if l.starts_with("FAIL") => {
                    panic!("guest: {l}; console:\n{}", self.log.join("\n"))
                }
                Some(_) => {}
                None => panic!(
                    "QEMU ended before '{prefix}'; console:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Waits for the guest to power off; returns every verdict line it printed after the last
    /// one read.
    pub fn finish(mut self) -> Vec<String> {
        let mut rest = Vec::new();
        while let Some(l) = self.next() {
            rest.push(l);
        }
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "QEMU exited with {status}; console:\n{}",
            self.log.join("\n")
        );
        assert!(
            rest.iter().any(|l| l == "DONE"),
            "the guest did not finish; console:\n{}",
            self.log.join("\n")
        );
        assert!(
            !rest.iter().any(|l| l.starts_with("FAIL")),
            "{rest:?}; console:\n{}",
            self.log.join("\n")
        );
        rest
    }
}
