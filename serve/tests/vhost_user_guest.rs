//! vstor's vhost-user-blk backend under a real VMM and a real Linux guest (issue 16): QEMU
//! (`qemu-system-x86_64` under TCG, no KVM) attaches a VHDX served by
//! [`vstor_serve::vhost_user::serve`] as `vhost-user-blk-pci`, with its RAM in a shared memfd,
//! and boots Debian's cloud kernel with a busybox initramfs (scripts/make-vhost-guest builds
//! both and unpacks QEMU, cached under the target dir). Each test appends its own `/test.sh` to
//! the initramfs and reads the guest's verdicts from its serial console; the host then checks
//! the image itself. The disks are dynamic VHDXs, a differencing child, and a mirrored pool
//! space (`pool:DIR/NAME`); one export has a QoS cap the guest times.
//!
//! Without QEMU (no apt-get, no package lists) the tests print `SKIPPED` and why.

mod vhost_user_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;
use vhost_user_common::{guest, Backend, PoolOpener, QosOpener, VhdxOpener, Vm, DISK, MIB};
use vstor_core::{BlockDevice, FileOptions};
use vstor_spaces::{Pool, Provisioning, Resiliency, SpaceHealth, SpaceSpec};
use vstor_vhdx::{CreateOptions, OpenOptions, Vhdx};

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
    let vm = Vm::boot(&g, b.dir.path(), &b.socket, 1, 1, false, &script);
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
    let mut vm = Vm::boot(&g, b.dir.path(), &b.socket, 2, 2, false, script);
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

/// A differencing child of a dynamic VHDX: the guest reads the parent's data through the child
/// and writes its patterns into the child; the host finds them in the child, the parent's data
/// beneath them, and the parent unchanged.
#[test]
fn guest_on_a_differencing_child_reads_its_parent_and_writes_the_child() {
    let test = "guest_on_a_differencing_child_reads_its_parent_and_writes_the_child";
    let Some(g) = guest(test) else { return };
    let parent_data = |at: u64| -> Vec<u8> {
        format!("vstor-parent-{at:04}\n")
            .into_bytes()
            .into_iter()
            .cycle()
            .take(MIB as usize)
            .collect()
    };
    let b = Backend::differencing(1, |p| {
        for at in [10, 100] {
            p.write_at(at * MIB, &parent_data(at)).unwrap();
        }
    });
    let offsets = [100, 200];
    let mut script = String::from(
        "dd if=/dev/vda of=/tmp/parent bs=65536 skip=160 count=16 iflag=direct 2>/dev/null \\
         || fail \"reading the parent's data\"\n\
         say \"parent $(md5sum </tmp/parent | cut -d' ' -f1)\"\n",
    );
    script.push_str(&pattern_script(&offsets));
    let vm = Vm::boot(&g, b.dir.path(), &b.socket, 1, 1, false, &script);
    let lines = vm.finish();
    let want = format!("parent {}", md5_hex(&parent_data(10)));
    assert!(lines.contains(&want), "{want} not in {lines:?}");
    for at in offsets {
        let want = format!("pattern {at} {}", md5_hex(&pattern(at)));
        assert!(lines.contains(&want), "{want} not in {lines:?}");
    }
    let (image, dir) = b.close();
    let child = open_ro(&image);
    let mut got = vec![0u8; MIB as usize];
    for at in offsets {
        child.read_at(at * MIB, &mut got).unwrap();
        assert!(got == pattern(at), "the pattern at {at} MiB in the child");
    }
    child.read_at(10 * MIB, &mut got).unwrap();
    assert!(
        got == parent_data(10),
        "the parent's data through the child"
    );
    drop(child);
    let parent = open_ro(&dir.path().join("parent.vhdx"));
    parent.read_at(100 * MIB, &mut got).unwrap();
    assert!(got == parent_data(100), "the parent is unchanged");
}

/// A two-way mirrored space of a two-disk pool, served as `pool:DIR/NAME`: the guest writes its
/// patterns with O_DIRECT and reads them back; after it powers off the host reads them through
/// the space, a scrub of the space finds every copy matching its checksum and its twin, and
/// with either member failed the patterns still read from the other copy.
#[test]
fn guest_on_a_mirrored_pool_space() {
    let test = "guest_on_a_mirrored_pool_space";
    let Some(g) = guest(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    let file = FileOptions {
        lock: true,
        ..Default::default()
    };
    {
        // Sparse members: room for the whole space, its checksums and the metadata.
        let pool = Pool::create_in_dir(
            &pool_dir,
            2,
            DISK + 64 * MIB,
            &vstor_spaces::CreateOptions {
                slab_size: 16 * MIB,
            },
            &file,
        )
        .unwrap();
        pool.create_space(&SpaceSpec {
            name: "vm".into(),
            size: DISK,
            resiliency: Resiliency::Mirror { copies: 2 },
            columns: None,
            interleave: None,
            provisioning: Provisioning::Thin,
        })
        .unwrap();
    }
    let target = format!("pool:{}/vm", pool_dir.display());
    let b = Backend::with_opener(dir, Arc::new(PoolOpener), &target, pool_dir, 1);
    assert_eq!(b.export.info().format, "pool space");
    let offsets = [0, 17, 100, 255];
    let script = pattern_script(&offsets);
    let vm = Vm::boot(&g, b.dir.path(), &b.socket, 1, 1, false, &script);
    let lines = vm.finish();
    for at in offsets {
        let want = format!("pattern {at} {}", md5_hex(&pattern(at)));
        assert!(lines.contains(&want), "{want} not in {lines:?}");
    }
    let stats = b.export.stats();
    println!(
        "export stats: {} reads, {} writes, {} flushes, {} errors",
        stats.reads, stats.writes, stats.flushes, stats.errors
    );
    assert_eq!(stats.errors, 0);
    let (pool_dir, _dir) = b.close();

    // The host: the patterns through the space, and a scrub that finds nothing to mend.
    let pool = Pool::open_dir(&pool_dir, &Default::default(), &file).unwrap();
    let space = pool.open_space("vm").unwrap();
    assert_eq!(space.health(), SpaceHealth::Healthy);
    let mut got = vec![0u8; MIB as usize];
    for at in offsets {
        space.read_at(at * MIB, &mut got).unwrap();
        assert!(got == pattern(at), "the pattern at {at} MiB in the space");
    }
    let report = pool.scrub(Some("vm"), &mut |_, _| {}).unwrap();
    println!("scrub: {report:?}");
    // Four 1 MiB patterns in 16 MiB slabs: slabs 0, 1, 6 and 15 were written (the guest's
    // partition scan only reads), each in 16 chunks.
    assert_eq!(report.chunks, 4 * 16, "{report:?}");
    assert_eq!(
        report,
        vstor_spaces::ScrubReport {
            chunks: report.chunks,
            ..Default::default()
        },
        "a clean scrub"
    );
    drop(space);
    drop(pool);

    // Each member alone holds every pattern: both copies were written.
    for failed in 0..2 {
        let scratch = tempfile::tempdir().unwrap();
        let copy = scratch.path().join("pool");
        std::fs::create_dir(&copy).unwrap();
        for m in std::fs::read_dir(&pool_dir).unwrap() {
            let m = m.unwrap().path();
            let to = copy.join(m.file_name().unwrap());
            let o = Command::new("cp")
                .arg("--sparse=always")
                .arg(&m)
                .arg(&to)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "cp: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let pool = Pool::open_dir(&copy, &Default::default(), &file).unwrap();
        pool.fail_member(failed).unwrap();
        let space = pool.open_space("vm").unwrap();
        assert!(
            matches!(space.health(), SpaceHealth::Degraded { .. }),
            "{:?}",
            space.health()
        );
        for at in offsets {
            space.read_at(at * MIB, &mut got).unwrap();
            assert!(
                got == pattern(at),
                "the pattern at {at} MiB with member {failed} failed"
            );
        }
    }
}

/// The milliseconds in a guest verdict `"{prefix} {ms} ms"`.
fn millis(line: &str, prefix: &str) -> u64 {
    line.strip_prefix(prefix)
        .and_then(|r| r.trim().strip_suffix(" ms"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("not '{prefix} N ms': {line}"))
}

/// A QoS cap that the guest measures: with the export's flow capped at 50 normalized IOPS the
/// guest's 200 O_DIRECT 4 KiB reads (one 8 KiB unit each) take at least (200 - burst) / 50
/// seconds by its own clock; with the cap lifted (`set_qos(Some(0), None)`) while it runs, the
/// same reads take a fraction of that.
#[test]
fn qos_cap_measured_by_the_guest() {
    const CAP: u64 = 50;
    const N: u64 = 200;
    let test = "qos_cap_measured_by_the_guest";
    let Some(g) = guest(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.vhdx");
    drop(Vhdx::create(&image, &CreateOptions::dynamic(DISK)).unwrap());
    let target = image.to_str().unwrap().to_string();
    let b = Backend::with_opener(dir, Arc::new(QosOpener::new(VhdxOpener)), &target, image, 1);
    b.export.set_qos(Some(CAP), None).unwrap();
    assert_eq!(b.export.stats().max_iops, CAP);
    // The marker that tells the guest the cap is gone (it cannot see the limits).
    let marker: Vec<u8> = b"vstor-uncapped\n"
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect();
    // The guest's clock: /proc/uptime in hundredths of a second (busybox's date has no %N).
    let script = format!(
        r#"
cs() {{ cut -d' ' -f1 /proc/uptime | tr -d .; }}
reads() {{
  a=$(cs)
  dd if=/dev/vda of=/dev/null bs=4096 count={N} iflag=direct 2>/dev/null || fail "reading"
  b=$(cs)
  say "$1 $(((b - a) * 10)) ms"
}}
reads capped
say "lift the cap"
i=0
while [ "$(dd if=/dev/vda bs=4096 skip=4096 count=1 iflag=direct 2>/dev/null | head -c 14)" != vstor-uncapped ]; do
  i=$((i + 1))
  [ "$i" -gt 300 ] && fail "no marker after 30 s"
  sleep 0.1
done
reads uncapped
"#
    );
    let mut vm = Vm::boot(&g, b.dir.path(), &b.socket, 1, 1, false, &script);
    vm.expect("vda sectors");
    // The scheduler's counters around the capped run (the daemon samples every second).
    b.export.sample();
    let host_start = Instant::now();
    let capped = millis(&vm.expect("capped "), "capped");
    let host_capped = host_start.elapsed();
    b.export.sample();
    let held = b.export.stats();
    vm.expect("lift the cap");
    b.export.set_qos(Some(0), None).unwrap();
    assert_eq!(b.export.stats().max_iops, 0);
    b.export.device().write_at(16 * MIB, &marker).unwrap();
    let uncapped = millis(&vm.expect("uncapped "), "uncapped");
    vm.finish();
    let burst = vstor_qos::Limits::max(CAP).effective_burst();
    let floor_ms = (N - burst) * 1000 / CAP;
    println!(
        "guest: {N} reads of 4 KiB capped at {CAP} IOPS (burst {burst}): {capped} ms by the \
         guest's clock ({:.0} IOPS; floor {floor_ms} ms), {} ms seen by the host between the \
         boot line and the verdict; uncapped: {uncapped} ms ({:.0} IOPS); the export's \
         flow over those {:.2} s: {:.1} normalized IOPS",
        N as f64 * 1000.0 / capped as f64,
        host_capped.as_millis(),
        N as f64 * 1000.0 / uncapped.max(1) as f64,
        held.interval_s,
        held.normalized_iops,
    );
    // The host's view of the same: over any window the flow gets at most its burst and the
    // cap's worth (one more for a request admitted as the window opened).
    assert!(
        held.normalized_iops <= CAP as f64 + (burst + 1) as f64 / held.interval_s,
        "{:.1} normalized IOPS over {:.2} s under a cap of {CAP}",
        held.normalized_iops,
        held.interval_s
    );
    // /proc/uptime has 10 ms steps: the measured span may be up to 10 ms short of the real one.
    assert!(
        capped + 10 >= floor_ms,
        "{N} reads in {capped} ms under a cap of {CAP} IOPS (floor {floor_ms} ms)"
    );
    assert!(
        uncapped * 4 <= capped,
        "uncapped {uncapped} ms is not much faster than capped {capped} ms"
    );
    let st = b.export.stats();
    assert_eq!(st.errors, 0);
    assert!(st.reads >= 2 * N, "{} reads", st.reads);
    drop(b.close());
}
