//! vstor's vhost-user-blk backend under a real VMM and a real Linux guest (issue 16): QEMU
//! (`qemu-system-x86_64` under TCG, no KVM) attaches a VHDX served by
//! [`vstor_serve::vhost_user::serve`] as `vhost-user-blk-pci`, with its RAM in a shared memfd,
//! and boots Debian's cloud kernel with a busybox initramfs (scripts/make-vhost-guest builds
//! both and unpacks QEMU, cached under the target dir). Each test appends its own `/test.sh` to
//! the initramfs and reads the guest's verdicts from its serial console; the host then checks
//! the image itself.
//!
//! Without QEMU (no apt-get, no package lists) the tests print `SKIPPED` and why.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vstor_core::{BlockDevice, FileOptions};
use vstor_serve::export::ServeError;
use vstor_serve::{Export, Opened, Opener, Registry};
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
/// The size of the test disks.
const DISK: u64 = 256 * MIB;
/// How long one guest run may take (TCG boots Debian's kernel in about 5 s here).
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

/// Opens a path as a writable VHDX (or read-only with `readonly`).
struct VhdxOpener;

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

/// QEMU, the kernel and the base initramfs.
#[derive(Clone)]
struct Guest {
    qemu: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Builds (or finds cached) the guest with scripts/make-vhost-guest; `None` after printing why
/// the test is skipped.
fn guest(test: &str) -> Option<Guest> {
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
fn cpio(files: &[(&str, &[u8])]) -> Vec<u8> {
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
fn gzip(data: &[u8]) -> Vec<u8> {
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
struct Backend {
    registry: Registry,
    export: Arc<Export>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
    image: PathBuf,
    dir: tempfile::TempDir,
}

impl Backend {
    fn new(queues: usize) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.vhdx");
        drop(Vhdx::create(&image, &CreateOptions::dynamic(DISK)).unwrap());
        let registry = Registry::new(Arc::new(VhdxOpener));
        let export = registry
            .add("disk", image.to_str().unwrap(), false)
            .unwrap();
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
    fn close(self) -> (PathBuf, tempfile::TempDir) {
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
struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every console line so far.
    log: Vec<String>,
    started: Instant,
}

impl Vm {
    /// Boots the guest with `script` as its /test.sh, attached to `socket`.
    fn boot(g: &Guest, dir: &Path, socket: &Path, queues: usize, cpus: usize, script: &str) -> Vm {
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
            .arg(format!("socket,id=vu0,path={}", socket.display()))
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
    fn next(&mut self) -> Option<String> {
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
    fn expect(&mut self, prefix: &str) -> String {
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
    fn finish(mut self) -> Vec<String> {
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

/// The pattern the guest writes at `MiB` offset `at` (1 MiB of it).
fn pattern(at: u64) -> Vec<u8> {
    let line = format!("vstor-vhost-user-{at:04}\n");
    line.as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(MIB as usize)
        .collect()
}

/// The guest script that writes and reads back the patterns with O_DIRECT.
fn pattern_script(offsets: &[u64]) -> String {
    let mut s = String::new();
    for at in offsets {
        s.push_str(&format!(
            "yes vstor-vhost-user-{at:04} | head -c 1048576 >/tmp/p{at}\n\
             dd if=/tmp/p{at} of=/dev/vda bs=65536 seek={} oflag=direct conv=fsync 2>/dev/null \
             || fail \"writing at {at} MiB\"\n",
            at * 16
        ));
    }
    s.push_str("echo 3 >/proc/sys/vm/drop_caches\n");
    for at in offsets {
        s.push_str(&format!(
            "dd if=/dev/vda of=/tmp/b{at} bs=65536 skip={} count=16 iflag=direct 2>/dev/null \
             || fail \"reading at {at} MiB\"\n\
             cmp /tmp/p{at} /tmp/b{at} || fail \"read back at {at} MiB differs\"\n\
             say \"pattern {at} $(md5sum </tmp/b{at} | cut -d' ' -f1)\"\n",
            at * 16
        ));
    }
    s
}

fn md5_hex(data: &[u8]) -> String {
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(data).unwrap();
    }
    let o = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn open_ro(image: &Path) -> Vhdx {
    Vhdx::open(image, &OpenOptions::read_only()).unwrap()
}

/// Direct writes and reads of patterns, then an ext4 file system made, filled, checked and
/// trimmed, all by the guest on a dynamic VHDX; the host finds the patterns and a clean file
/// system in the image, and the trims as discards in the export's statistics.
#[test]
fn guest_writes_patterns_and_an_ext4_file_system() {
    let test = "guest_writes_patterns_and_an_ext4_file_system";
    let Some(g) = guest(test) else { return };
    let b = Backend::new(1);
    let offsets = [100, 137, 200, 255];
    let mut script = pattern_script(&offsets);
    // The file system takes the first 64 MiB (the patterns lie past it).
    script.push_str(
        r#"
/sbin/mke2fs -q -t ext4 -b 4096 -E nodiscard -F /dev/vda 16384 || fail "mke2fs"
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || fail "mount"
for i in 1 2 3; do
  dd if=/dev/urandom of=/mnt/f$i bs=65536 count=$((i * 16)) 2>/dev/null || fail "writing f$i"
done
sums="$(cd /mnt && md5sum f1 f2 f3)"
umount /mnt || fail "umount"
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt || fail "mount again"
[ "$(cd /mnt && md5sum f1 f2 f3)" = "$sums" ] || fail "files differ after a remount"
rm /mnt/f2 /mnt/f3
sync
say "fstrim $(fstrim -v /mnt 2>&1)"
umount /mnt || fail "umount again"
/sbin/e2fsck -fn /dev/vda >/tmp/fsck 2>&1 || { cat /tmp/fsck; fail "e2fsck"; }
say "fsck clean"
say "queues $(ls /sys/block/vda/mq | wc -l)"
"#,
    );
    let vm = Vm::boot(&g, b.dir.path(), &b.socket, 1, 1, &script);
    let lines = vm.finish();
    // The guest's own checksums of what it read back are those of the patterns.
    for at in offsets {
        let want = format!("pattern {at} {}", md5_hex(&pattern(at)));
        assert!(lines.contains(&want), "{want} not in {lines:?}");
    }
    assert!(lines.contains(&"fsck clean".to_string()), "{lines:?}");
    assert!(lines.contains(&"queues 1".to_string()), "{lines:?}");
    let trim = lines.iter().find(|l| l.starts_with("fstrim")).unwrap();
    assert!(trim.contains("trimmed"), "{trim}");
    let stats = b.export.stats();
    println!(
        "export stats: {} reads, {} writes, {} flushes, {} discards, {} write-zeroes, {} errors",
        stats.reads, stats.writes, stats.flushes, stats.discards, stats.write_zeroes, stats.errors
    );
    assert_eq!(stats.errors, 0);
    assert!(stats.discards > 0, "fstrim reached the image as discards");
    assert!(stats.flushes > 0);
    let (image, _dir) = b.close();

    // The host reads the patterns back from the image itself.
    let disk = open_ro(&image);
    for at in offsets {
        let mut got = vec![0u8; MIB as usize];
        disk.read_at(at * MIB, &mut got).unwrap();
        assert!(got == pattern(at), "the pattern at {at} MiB in the image");
    }
    // And checks the guest's file system with its own e2fsck.
    let raw = image.with_extension("raw");
    let mut fs = vec![0u8; (64 * MIB) as usize];
    disk.read_at(0, &mut fs).unwrap();
    std::fs::write(&raw, &fs).unwrap();
    let o = Command::new("e2fsck").arg("-fn").arg(&raw).output();
    match o {
        Ok(o) => assert!(
            o.status.success(),
            "host e2fsck: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("the host has no e2fsck ({e}); ./scripts/test installs e2fsprogs"),
    }
}

/// Two request queues on two vCPUs: the guest's block layer maps one queue to each CPU and
/// writes from both; an online resize of the export reaches the guest as a configuration
/// change (its /sys/block/vda/size).
#[test]
fn two_queues_and_an_online_resize_seen_by_the_guest() {
    let test = "two_queues_and_an_online_resize_seen_by_the_guest";
    let Some(g) = guest(test) else { return };
    let b = Backend::new(2);
    let script = r#"
say "queues $(ls /sys/block/vda/mq | wc -l)"
for cpu in 0 1; do
  yes vstor-vhost-user-cpu$cpu | head -c 1048576 >/tmp/c$cpu
  taskset -c $cpu dd if=/tmp/c$cpu of=/dev/vda bs=4096 seek=$((cpu * 256 + 1024)) oflag=direct 2>/dev/null || fail "write from cpu $cpu" &
done
wait
mount -t debugfs none /sys/kernel/debug || fail "mounting debugfs"
for h in 0 1; do
  say "hctx$h runs $(cat /sys/kernel/debug/block/vda/hctx$h/run)"
done
say "resize please $(cat /sys/block/vda/size)"
i=0
while [ "$(cat /sys/block/vda/size)" = 524288 ]; do
  i=$((i + 1))
  [ "$i" -gt 300 ] && fail "no new size after 30 s"
  sleep 0.1
done
say "size $(cat /sys/block/vda/size)"
dd if=/dev/vda of=/dev/null bs=4096 skip=$((300 * 256)) count=1 iflag=direct 2>/dev/null || fail "reading past the old end"
say "read past the old end"
"#;
    let mut vm = Vm::boot(&g, b.dir.path(), &b.socket, 2, 2, script);
    assert_eq!(vm.expect("queues"), "queues 2");
    // The block layer ran both hardware queues (one per CPU), so both rings carried requests.
    for h in 0..2 {
        let l = vm.expect(&format!("hctx{h} runs "));
        let runs: u64 = l.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(runs > 0, "{l}");
    }
    let resize = vm.expect("resize please");
    assert_eq!(resize, "resize please 524288");
    b.export.resize(320 * MIB).unwrap();
    assert_eq!(vm.expect("size "), format!("size {}", 320 * MIB / 512));
    let lines = vm.finish();
    assert!(lines.contains(&"read past the old end".to_string()));
    let (image, _dir) = b.close();
    let disk = open_ro(&image);
    assert_eq!(disk.info().capacity, 320 * MIB);
    for cpu in 0..2u64 {
        let mut got = vec![0u8; MIB as usize];
        disk.read_at((cpu * 256 + 1024) * 4096, &mut got).unwrap();
        let line = format!("vstor-vhost-user-cpu{cpu}\n");
        let want: Vec<u8> = line.bytes().cycle().take(MIB as usize).collect();
        assert!(got == want, "the write from cpu {cpu} in the image");
    }
}
