//! vstor's vhost-user-blk backend under a real VMM and a real Linux guest (issue 16): QEMU
//! (`qemu-system-x86_64` under TCG, no KVM) attaches a VHDX served by
//! [`vstor_serve::vhost_user::serve`] as `vhost-user-blk-pci`, with its RAM in a shared memfd,
//! and boots Debian's cloud kernel with a busybox initramfs (scripts/make-vhost-guest builds
//! both and unpacks QEMU, cached under the target dir). Each test appends its own `/test.sh` to
//! the initramfs and reads the guest's verdicts from its serial console; the host then checks
//! the image itself.
//!
//! Without QEMU (no apt-get, no package lists) the tests print `SKIPPED` and why.

mod vhost_user_common;

use std::path::Path;
use std::process::{Command, Stdio};
use vhost_user_common::{guest, Backend, Vm, MIB};
use vstor_core::BlockDevice;
use vstor_vhdx::{OpenOptions, Vhdx};

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
