//! Hostile tries at the catch-up of returning pool members (issue 20): members that go away at
//! different times and come back, catch-ups and repairs killed at any moment, returning members
//! that were swapped, wiped or rolled back, and careless operators (two repairs at once, a
//! repair while `vstor serve` holds the pool, a disk of another pool in the directory).
//!
//! Each `#[ignore]`d test reproduces a defect found by trying, and fails until it is fixed; the
//! others pin down what was tried and found right, as Linux md with a write-intent bitmap would
//! do it (or better, where the pool has block checksums and md has none).

mod common;

use common::{fails, ok, s, vstor};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A pool of file-backed disks in a temporary directory.
struct Pool {
    _t: tempfile::TempDir,
    dir: PathBuf,
    tmp: PathBuf,
}

impl Pool {
    /// `disks` members of `disk_size`, slabs of `slab`.
    fn new(disks: usize, disk_size: &str, slab: &str) -> Pool {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("pool");
        let tmp = t.path().to_path_buf();
        ok(&[
            "pool",
            "create",
            s(&dir),
            "--disks",
            &disks.to_string(),
            "--disk-size",
            disk_size,
            "--slab-size",
            slab,
        ]);
        Pool { _t: t, dir, tmp }
    }

    fn d(&self) -> &str {
        s(&self.dir)
    }

    fn disk(&self, i: usize) -> PathBuf {
        self.dir.join(format!("disk{i}.raw"))
    }

    /// A fixed space `name` of `size` with `args` (`--resiliency ...`).
    fn space(&self, name: &str, size: &str, args: &[&str]) {
        let mut a = vec![
            "space",
            "create",
            self.d(),
            name,
            "--size",
            size,
            "--provisioning",
            "fixed",
        ];
        a.extend_from_slice(args);
        ok(&a);
    }

    fn target(&self, name: &str) -> String {
        format!("pool:{}/{name}", self.d())
    }

    /// Writes `data` at `off` of space `name` (through a file, flushed).
    fn write(&self, name: &str, off: usize, data: &[u8]) {
        let input = self.tmp.join("input.bin");
        std::fs::write(&input, data).unwrap();
        ok(&[
            "disk",
            "write",
            &self.target(name),
            "--offset",
            &off.to_string(),
            "--input",
            s(&input),
        ]);
    }

    /// Writes `len` bytes of `byte` at offset 0 of space `name`.
    fn fill(&self, name: &str, len: &str, byte: &str) {
        ok(&[
            "disk",
            "write",
            &self.target(name),
            "--length",
            len,
            "--pattern",
            byte,
        ]);
    }

    /// The first `len` bytes of space `name`, or the error.
    fn read(&self, name: &str, len: usize) -> Result<Vec<u8>, String> {
        let out = self.tmp.join("read.bin");
        let _ = std::fs::remove_file(&out);
        let o = vstor(&[
            "disk",
            "read",
            &self.target(name),
            "--length",
            &len.to_string(),
            "--output",
            s(&out),
        ]);
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        Ok(std::fs::read(&out).unwrap())
    }

    /// Takes member file `i` out of the directory.
    fn away(&self, i: usize) {
        std::fs::rename(self.disk(i), self.tmp.join(format!("away{i}.raw"))).unwrap();
    }

    /// Puts member file `i` back.
    fn back(&self, i: usize) {
        std::fs::rename(self.tmp.join(format!("away{i}.raw")), self.disk(i)).unwrap();
    }

    fn info(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&["pool", "info", self.d(), "--json"])).unwrap()
    }

    /// Every member's state, by index.
    fn states(&self) -> Vec<String> {
        self.info()["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["state"].as_str().unwrap().to_string())
            .collect()
    }

    /// Waits (up to 30 s) until no killed process holds the members any more.
    fn wait_unlocked(&self) {
        let start = Instant::now();
        loop {
            let o = vstor(&["pool", "info", self.d()]);
            let err = String::from_utf8_lossy(&o.stderr);
            if o.status.success() || !err.contains("in use") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the members stay locked: {err}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The contents of every member file.
    fn save(&self, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| std::fs::read(self.disk(i)).unwrap())
            .collect()
    }

    fn restore(&self, files: &[Vec<u8>]) {
        for (i, f) in files.iter().enumerate() {
            std::fs::write(self.disk(i), f).unwrap();
        }
    }

    /// With each member file (of `n`) taken away in turn, space `name` reads `want`.
    fn every_member_holds(&self, n: usize, name: &str, want: &[u8], what: &str) {
        for i in 0..n {
            self.away(i);
            let got = self.read(name, want.len());
            self.back(i);
            assert!(
                got.as_deref() == Ok(want),
                "{what}: wrong data without disk{i}.raw: {:?}",
                got.err()
            );
        }
    }
}

/// `len` pseudo-random bytes (xorshift).
fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A 2-way mirror (one column: extents on disk0+disk1 and on disk2+disk3) is written with 0xbb
/// while disk0 is away. Then disk0 comes back as disk1 goes away (a cable moved, a SAN path
/// that flapped the other way). The extents on disk0+disk1 now have no current copy present:
/// a read-only open says so ("unavailable"), rightly. But a writable open "catches disk0 up"
/// from the bitmaps it can see, which do not name those extents (only the absent disk1 held
/// their bits): "caught up ... (0 chunks, 0 MiB), and is healthy again". From then on the
/// stale 0xaa is served and scrub finds nothing ("0 repaired ... 0 lost"); a write in that
/// session records disk1 failed, and when disk1 comes back its 0xbb is overwritten by the
/// catch-up from disk0, so the acknowledged, flushed write is gone for good.
///
/// A 3-way mirror whose two other copies are away does the same; single parity refuses (the
/// row cannot be checked) and is right once disk1 is back. Linux md does not start a RAID1
/// whose only present member is out of date (it needs --force, and then says so); a bitmap
/// re-add is only done from an in-sync member.
#[test]
fn a_member_back_while_the_only_holder_of_its_missed_writes_is_away_is_not_called_current() {
    let p = Pool::new(4, "40M", "4M");
    p.space("m", "16M", &["--resiliency", "mirror", "--columns", "1"]);
    p.fill("m", "16M", "0xaa");
    p.away(0);
    p.fill("m", "16M", "0xbb");
    p.back(0);
    p.away(1);
    // A writable open with a write to an extent on disk2+disk3 (offset 4M): disk0 is not
    // caught up (its missed writes are named only on disk1), so the extents on disk0+disk1
    // have no current copy and the space is refused whole, as md refuses to start.
    let o = vstor(&[
        "disk",
        "write",
        &p.target("m"),
        "--offset",
        "4M",
        "--length",
        "4k",
        "--pattern",
        "0xbb",
    ]);
    assert!(
        o.status.success() || stderr(&o).contains("unavailable"),
        "the write failed for another reason: {}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("caught up from"),
        "disk0 is called caught up: {}",
        stderr(&o)
    );
    let got = p.read("m", 16 << 20);
    if let Ok(g) = &got {
        let stale = g.iter().filter(|&&b| b == 0xaa).count();
        assert_eq!(stale, 0, "{stale} bytes of the overwritten 0xaa are served");
    }
    p.back(1);
    p.fill("m", "4k", "0xbb");
    let got = p.read("m", 16 << 20);
    assert!(
        got.as_deref().is_ok_and(|g| g.iter().all(|&b| b == 0xbb)),
        "with disk1 back, the 0xbb written is lost: {}",
        match &got {
            Ok(g) => format!(
                "{} bytes read 0xaa",
                g.iter().filter(|&&b| b == 0xaa).count()
            ),
            Err(e) => e.clone(),
        }
    );
}

/// Space `a` (a 2-way mirror extent on disk0 and disk1) is written with 0xbb while disk0 is
/// away; then disk1 goes away too ('a' is unavailable) while space `b` (on disk2 and disk3) is
/// written, so disk1 is behind as well, though it holds every write 'a' ever got. Both come
/// back and a writable open catches them up.
///
/// Linux md keeps the member with the newer event count (disk1) and re-adds the older one from
/// it. Today disk0 is caught up first from the bits of the usable members only: disk1's bits
/// (present, but behind) are never read, disk0 is declared caught up with "0 chunks", and
/// disk1's catch-up then copies disk0's stale 0xaa over the 0xbb that was written, acknowledged
/// and flushed. Scrub finds nothing; the write is silently gone.
#[test]
fn a_mirror_whose_two_members_came_back_from_different_outages_keeps_the_newer_data() {
    let p = Pool::new(4, "40M", "4M");
    let mirror = ["--resiliency", "mirror", "--columns", "1"];
    p.space("a", "4M", &mirror);
    p.space("b", "4M", &mirror);
    let states = p.info()["members"].clone();
    assert!(
        states
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["slabs_used"] == 1),
        "each space is expected on its own pair of disks: {states}"
    );
    p.fill("a", "4M", "0xaa");
    p.away(0);
    p.fill("a", "4M", "0xbb");
    p.away(1);
    let o = vstor(&["space", "info", p.d(), "a"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("failed"),
        "'a' is expected on disk0 and disk1: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    p.fill("b", "4k", "0xcc");
    p.back(0);
    p.back(1);
    // A writable open catches them up.
    p.fill("b", "4k", "0xcc");
    let got = p.read("a", 4 << 20);
    assert!(
        got.as_deref().is_ok_and(|g| g.iter().all(|&b| b == 0xbb)),
        "the 0xbb written to 'a' is lost: {}",
        match &got {
            Ok(g) => format!("reads {:#04x}...", g[0]),
            Err(e) => e.clone(),
        }
    );
    p.every_member_holds(4, "a", &vec![0xbb; 4 << 20], "after the catch-up");
}

/// The same with single parity (a 3-wide extent of 'a' on disk0, disk1, disk2; 'b' on the other
/// three): disk0 goes away, 'a' is written; disk1 goes away ('a' is unavailable), 'b' is
/// written. Neither can be caught up today ("has no good source besides it"), and the note
/// sends the operator to `vstor space repair`, which takes both back as fresh members: it
/// throws away disk1's data, which was current for every row of 'a', and 'a' is lost for good
/// ("1 extents could not be rebuilt"). md would assemble from the freshest members (disk1,
/// disk2) and re-add disk0 from its bitmap.
#[test]
fn a_parity_space_whose_members_came_back_from_different_outages_survives_the_advised_repair() {
    let p = Pool::new(6, "40M", "4M");
    let parity = ["--resiliency", "parity", "--columns", "3"];
    p.space("a", "8M", &parity);
    p.space("b", "8M", &parity);
    p.fill("a", "8M", "0xaa");
    p.away(0);
    p.fill("a", "8M", "0xbb");
    p.away(1);
    p.fill("b", "4k", "0xcc");
    p.back(0);
    p.back(1);
    p.fill("b", "4k", "0xcc");
    let o = vstor(&["space", "repair", p.d()]);
    let got = p.read("a", 8 << 20);
    assert!(
        got.as_deref().is_ok_and(|g| g.iter().all(|&b| b == 0xbb)),
        "'a' is lost (repair: {} {}): {}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o),
        match &got {
            Ok(g) => format!("reads {:#04x}...", g[0]),
            Err(e) => e.clone(),
        }
    );
}

/// A `space repair` killed (SIGKILL, or Ctrl-C: the repair has no SIGINT handler, so both end
/// it at once) after it took an old copy of a disk back as a fresh member, and run again: the
/// second run rebuilds onto the disk, but leaves the old member's record "missing (failed)"
/// with 0 slabs, and `pool info` says "member 0 is missing (failed)" until the operator
/// removes it by hand. A repair that is not interrupted removes it (`record_removed`); a
/// resumed one must end in the same state.
#[test]
fn a_repair_killed_after_a_take_back_ends_like_an_uninterrupted_one_when_run_again() {
    let p = Pool::new(4, "96M", "4M");
    p.space("m", "64M", &["--resiliency", "mirror"]);
    let mut want = random(1, 64 << 20);
    p.write("m", 0, &want);
    let old = std::fs::read(p.disk(0)).unwrap();
    let new = random(2, 32 << 20);
    p.write("m", 0, &new);
    want[..new.len()].copy_from_slice(&new);
    std::fs::write(p.disk(0), &old).unwrap();
    drop(old);

    let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args(["space", "repair", p.d()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vstor space repair");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the repair ended without taking the disk back"
        );
        if line.contains("taken back as member") {
            break;
        }
    }
    child.kill().unwrap();
    let st = child.wait().unwrap();
    assert!(
        !st.success(),
        "the repair finished before it was killed: the test needs a longer rebuild"
    );
    p.wait_unlocked();
    assert!(p.read("m", want.len()).as_deref() == Ok(&want[..]));

    ok(&["space", "repair", p.d()]);
    assert!(p.read("m", want.len()).as_deref() == Ok(&want[..]));
    let info = p.info();
    let states = p.states();
    assert!(
        states.iter().all(|s| s == "healthy" || s == "removed"),
        "after the resumed repair: {states:?}, notes {}",
        info["notes"]
    );
}

/// One member of a 2-way mirror went away, came back and was caught up, but meanwhile its
/// slabs and their checksum entries were rolled back to an older copy of the disk (a disk
/// or a LUN snapshot that dropped acknowledged writes: a lying write cache, a revert of the
/// data area). Its rolled-back blocks pass their checksums, which are bound to the member and
/// the position but not to when the block was written (issue 20 §2 asks for that too), and
/// after the catch-up they are served: about 4 MiB read wrong. Scrub does report them as
/// "undecided" (and exits 1), but every read before and after serves the stale copy. md has no
/// checksums and does the same; ZFS finds such a block by the birth time in its parent
/// pointer. Single parity serves them too; a 3-way mirror and dual parity outvote them.
#[test]
#[ignore = "defect: blocks of a member rolled back together with their checksums (lost writes) are served after the catch-up; checksums are not bound to when a block was written; fixed by the lead"]
fn blocks_of_a_returning_member_rolled_back_with_their_checksums_are_not_served() {
    let p = Pool::new(4, "40M", "4M");
    p.space("m", "16M", &["--resiliency", "mirror"]);
    let mut want = random(3, 16 << 20);
    p.write("m", 0, &want);
    let old = std::fs::read(p.disk(0)).unwrap();
    let v2 = random(4, 16 << 20);
    p.write("m", 0, &v2);
    want.copy_from_slice(&v2);
    p.away(0);
    let v3 = random(5, 1 << 20);
    p.write("m", 0, &v3);
    want[..v3.len()].copy_from_slice(&v3);
    p.back(0);
    // Roll back everything after the metadata, journal and bitmap (4 MiB): the slabs and
    // their checksum area.
    let mut disk = std::fs::read(p.disk(0)).unwrap();
    disk[4 << 20..].copy_from_slice(&old[4 << 20..]);
    std::fs::write(p.disk(0), &disk).unwrap();
    // A writable open catches it up.
    p.write("m", 0, &want[..4096]);
    let got = p.read("m", want.len()).unwrap();
    let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(wrong, 0, "{wrong} bytes served from the rolled-back member");
}

/// The writable open of `space scrub`, `space repair` and `space resize` catches a returning
/// member up (or finds it cannot), but none of them prints the open's notes, as `disk write`
/// does: the operator who runs `space repair` after putting a disk back reads "rebuilt 0
/// slabs" and no word of the catch-up, and when a catch-up fails (ENOSPC on the member, a
/// source missing) nothing says why the member stays failed while scrub exits 0.
#[test]
fn scrub_repair_and_resize_say_what_the_catch_up_at_their_open_did() {
    let p = Pool::new(4, "40M", "4M");
    p.space("m", "16M", &["--resiliency", "mirror"]);
    p.fill("m", "16M", "0xaa");
    p.away(0);
    p.fill("m", "4M", "0xbb");
    p.back(0);
    let saved = p.save(4);
    for args in [
        vec!["space", "scrub", p.d()],
        vec!["space", "repair", p.d()],
        vec!["space", "resize", p.d(), "m", "--size", "20M"],
    ] {
        p.restore(&saved);
        let o = vstor(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(
            p.states().iter().all(|s| s == "healthy"),
            "{args:?}: not caught up"
        );
        assert!(
            stderr(&o).contains("caught up"),
            "{args:?} does not say member 0 was caught up: stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        );
    }
}

/// A writable open that catches up members of a 3-way mirror, a single and a dual parity
/// space, killed (SIGKILL) at a spread of moments: every byte written before reads back, a
/// read-only open still reads right, the next writable open finishes the catch-up, scrub
/// loses and repairs nothing, and every member holds its data.
fn catch_up_killed_at_any_moment(res: &[&str], away: &[usize]) {
    let n = 5;
    let p = Pool::new(n, "24M", "2M");
    p.space("s", "8M", res);
    let mut want = random(6, 8 << 20);
    p.write("s", 0, &want);
    for &i in away {
        p.away(i);
    }
    let w = random(7, 5 << 20);
    p.write("s", 1 << 20, &w);
    want[1 << 20..6 << 20].copy_from_slice(&w);
    for &i in away {
        p.back(i);
    }
    let saved = p.save(n);
    let input = p.tmp.join("head.bin");
    std::fs::write(&input, &want[..4096]).unwrap();
    let mut killed = 0;
    for delay_ms in [0u64, 40, 100, 170] {
        p.restore(&saved);
        let mut child = Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(["disk", "write", &p.target("s"), "--input", s(&input)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        if !child.wait().unwrap().success() {
            killed += 1;
        }
        p.wait_unlocked();
        let what = format!("{res:?} killed after {delay_ms} ms");
        let got = p.read("s", want.len());
        assert!(got.as_deref() == Ok(&want[..]), "{what}: {:?}", got.err());
        let o = vstor(&["space", "scrub", p.d()]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains(" 0 lost") && out.contains(" 0 repaired"),
            "{what}: scrub: {out} {}",
            stderr(&o)
        );
        let states = p.states();
        assert!(
            states.iter().all(|s| s == "healthy"),
            "{what}: not caught up by the next open: {states:?}"
        );
        assert!(
            p.read("s", want.len()).as_deref() == Ok(&want[..]),
            "{what}"
        );
    }
    assert!(
        killed >= 2,
        "only {killed} runs were killed before they ended"
    );
    p.every_member_holds(n, "s", &want, &format!("{res:?}"));
}

#[test]
fn a_3way_mirror_catch_up_killed_at_any_moment_loses_nothing() {
    catch_up_killed_at_any_moment(&["--resiliency", "mirror", "--copies", "3"], &[0, 3]);
}

#[test]
fn a_parity_catch_up_killed_at_any_moment_loses_nothing() {
    catch_up_killed_at_any_moment(&["--resiliency", "parity"], &[2]);
}

#[test]
fn a_dual_parity_catch_up_killed_at_any_moment_loses_nothing() {
    catch_up_killed_at_any_moment(&["--resiliency", "parity", "--redundancy", "2"], &[1, 4]);
}

/// The two files of a member that is behind and of a current member swapped (renamed onto
/// each other) while the pool is closed: members are told by their metadata, not their names,
/// so the behind one is still caught up and every member holds the data.
#[test]
fn a_returning_member_swapped_with_another_members_file_is_caught_up() {
    let p = Pool::new(4, "40M", "4M");
    p.space("m", "16M", &["--resiliency", "mirror"]);
    let mut want = random(8, 16 << 20);
    p.write("m", 0, &want);
    p.away(0);
    let w = random(9, 6 << 20);
    p.write("m", 2 << 20, &w);
    want[2 << 20..8 << 20].copy_from_slice(&w);
    p.back(0);
    let t = p.tmp.join("swap.raw");
    std::fs::rename(p.disk(0), &t).unwrap();
    std::fs::rename(p.disk(1), p.disk(0)).unwrap();
    std::fs::rename(&t, p.disk(1)).unwrap();
    p.write("m", 0, &want[..4096]);
    let info = p.info();
    assert!(
        p.states().iter().all(|s| s == "healthy"),
        "{}",
        info["notes"]
    );
    assert!(p.read("m", want.len()).as_deref() == Ok(&want[..]));
    p.every_member_holds(4, "m", &want, "swapped");
}

/// A member that is behind comes back with everything after its metadata slots wiped (its
/// parity journal, write-intent bitmap, slabs and checksum area read as zeroes): it is caught
/// up, the zeroes fail their keyed checksums instead of being served, scrub heals them from
/// the others, and then every member holds the data (mirror and dual parity).
#[test]
fn a_returning_member_wiped_past_its_metadata_is_caught_up_and_healed() {
    for res in [
        &["--resiliency", "mirror"][..],
        &["--resiliency", "parity", "--redundancy", "2"][..],
    ] {
        let p = Pool::new(4, "40M", "4M");
        p.space("m", "16M", res);
        let mut want = random(10, 16 << 20);
        p.write("m", 0, &want);
        p.away(0);
        let w = random(11, 6 << 20);
        p.write("m", 0, &w);
        want[..w.len()].copy_from_slice(&w);
        p.back(0);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.disk(0))
            .unwrap();
        f.set_len(2 << 20).unwrap();
        f.set_len(40 << 20).unwrap();
        drop(f);
        assert!(
            p.read("m", want.len()).as_deref() == Ok(&want[..]),
            "{res:?}: read-only"
        );
        let out = ok(&["space", "scrub", p.d()]);
        assert!(out.contains(" 0 lost"), "{res:?}: {out}");
        assert!(
            p.states().iter().all(|s| s == "healthy"),
            "{res:?}: {}",
            p.info()["notes"]
        );
        p.every_member_holds(4, "m", &want, &format!("{res:?}"));
    }
}

/// A copy of a member taken while it was away in an earlier outage (so it holds the metadata
/// that outage's catch-up started from) put back during a later outage: it is older than
/// what the pool recorded for this outage, so it is not caught up (the bits kept since do not
/// cover what it missed in between), never read, and `space repair` rebuilds it whole.
#[test]
fn a_copy_from_an_earlier_outage_put_back_is_rebuilt_not_caught_up() {
    let p = Pool::new(4, "40M", "4M");
    p.space("m", "16M", &["--resiliency", "parity", "--redundancy", "2"]);
    let mut want = random(12, 16 << 20);
    p.write("m", 0, &want);
    let put = |want: &mut [u8], off: usize, len: usize, seed: u64| {
        let w = random(seed, len);
        p.write("m", off, &w);
        want[off..off + len].copy_from_slice(&w);
    };
    p.away(0);
    let first_outage = std::fs::read(p.tmp.join("away0.raw")).unwrap();
    put(&mut want, 0, 2 << 20, 13);
    p.back(0);
    put(&mut want, 2 << 20, 1 << 20, 14); // caught up here
    put(&mut want, 4 << 20, 2 << 20, 15);
    p.away(0);
    put(&mut want, 8 << 20, 2 << 20, 16);
    std::fs::write(p.disk(0), &first_outage).unwrap();
    assert!(p.read("m", want.len()).as_deref() == Ok(&want[..]));
    put(&mut want, 12 << 20, 1 << 20, 17);
    let states = p.states();
    assert_eq!(states[0], "failed", "{}", p.info()["notes"]);
    assert!(p.read("m", want.len()).as_deref() == Ok(&want[..]));
    let o = vstor(&["space", "repair", p.d()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("taken back as member"),
        "{}",
        stderr(&o)
    );
    assert!(p.read("m", want.len()).as_deref() == Ok(&want[..]));
    let states = p.states();
    assert!(
        states.iter().all(|s| s == "healthy" || s == "removed"),
        "{states:?}"
    );
    p.every_member_holds(4, "m", &want, "rebuilt");
}

/// Two `space repair` at once: one runs, the other is refused at once naming a member in use
/// (exit 75); the pool ends healthy with the data.
#[test]
fn two_repairs_at_once_one_is_refused_and_the_pool_ends_healthy() {
    let p = Pool::new(4, "40M", "4M");
    p.space("m", "16M", &["--resiliency", "mirror", "--copies", "3"]);
    let mut want = random(18, 16 << 20);
    p.write("m", 0, &want);
    let old = std::fs::read(p.disk(0)).unwrap();
    let w = random(19, 8 << 20);
    p.write("m", 0, &w);
    want[..w.len()].copy_from_slice(&w);
    std::fs::write(p.disk(0), &old).unwrap();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_vstor"))
            .args(["space", "repair", p.d()])
            .stdin(Stdio::null())
            .output()
    };
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(spawn);
        let b = sc.spawn(spawn);
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    let codes = [a.status.code(), b.status.code()];
    // Both may succeed if one ended before the other started.
    for o in [&a, &b] {
        assert!(
            o.status.success() || (o.status.code() == Some(75) && stderr(o).contains("in use")),
            "{codes:?}: {}",
            stderr(o)
        );
    }
    assert!(codes.contains(&Some(0)), "{codes:?}");
    let states = p.states();
    assert!(
        states.iter().all(|s| s == "healthy" || s == "removed"),
        "{states:?}"
    );
    assert!(p.read("m", want.len()).as_deref() == Ok(&want[..]));
    p.every_member_holds(4, "m", &want, "after two repairs");
}

/// A `vstor serve` that exports a space catches its returning member up at the export's open
/// and holds the pool: `space repair`, `space scrub` and `pool add-disk` are refused with one
/// line naming a member in use, and leave no file behind; after the daemon stops, the pool is
/// healthy with the data.
#[test]
fn a_pool_held_by_vstor_serve_refuses_repair_scrub_and_add_disk() {
    let p = Pool::new(4, "40M", "4M");
    p.space("m", "16M", &["--resiliency", "mirror"]);
    let mut want = random(20, 16 << 20);
    p.write("m", 0, &want);
    p.away(0);
    let w = random(21, 4 << 20);
    p.write("m", 0, &w);
    want[..w.len()].copy_from_slice(&w);
    p.back(0);
    let sock = p.tmp.join("nbd.sock");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_vstor"))
        .args([
            "serve",
            "--nbd",
            &format!("unix:{}", s(&sock)),
            "--export",
            &format!("e={}", p.target("m")),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vstor serve");
    let mut err = BufReader::new(serve.stderr.take().unwrap());
    let mut log = String::new();
    loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "vstor serve ended: {log}"
        );
        log.push_str(&line);
        if line.contains("ready") {
            break;
        }
    }
    assert!(log.contains("caught up"), "{log}");
    let before: Vec<_> = std::fs::read_dir(&p.dir).unwrap().collect();
    for args in [
        vec!["space", "repair", p.d()],
        vec!["space", "scrub", p.d()],
        vec!["pool", "add-disk", p.d(), "--disk-size", "40M"],
    ] {
        let e = fails(&args);
        assert!(e.contains("in use"), "{args:?}: {e}");
    }
    let after: Vec<_> = std::fs::read_dir(&p.dir).unwrap().collect();
    assert_eq!(before.len(), after.len(), "a refused command left a file");
    let st = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(serve.wait().unwrap().success());
    assert!(
        p.states().iter().all(|s| s == "healthy"),
        "{}",
        p.info()["notes"]
    );
    assert!(p.read("m", want.len()).as_deref() == Ok(&want[..]));
    p.every_member_holds(4, "m", &want, "after serve");
}

/// A member of another pool is never taken in: copied into the directory, every command names
/// it (not a good member) and writes nothing; given to `pool create --device`, it is refused.
#[test]
fn a_member_of_another_pool_is_not_taken_in() {
    let p = Pool::new(4, "40M", "4M");
    p.space("m", "16M", &["--resiliency", "mirror"]);
    let want = random(22, 16 << 20);
    p.write("m", 0, &want);
    let other = p.tmp.join("other");
    ok(&[
        "pool",
        "create",
        s(&other),
        "--disks",
        "2",
        "--disk-size",
        "40M",
        "--slab-size",
        "4M",
    ]);
    let stray = p.disk(4);
    std::fs::copy(other.join("disk0.raw"), &stray).unwrap();
    let members = p.save(4);
    for args in [
        vec!["pool", "add-disk", p.d(), "--disk-size", "40M"],
        vec!["space", "repair", p.d()],
        vec!["space", "scrub", p.d()],
    ] {
        let e = fails(&args);
        assert!(
            e.contains(s(&stray)),
            "{args:?} does not name the stray: {e}"
        );
    }
    assert!(!p.disk(5).exists(), "add-disk left a file");
    assert!(p.save(4) == members, "a refused command wrote to a member");
    std::fs::remove_file(&stray).unwrap();
    let e = fails(&[
        "pool",
        "create",
        s(&p.tmp.join("q")),
        "--device",
        s(&p.disk(1)),
        "--device",
        s(&other.join("disk1.raw")),
    ]);
    assert!(e.contains("already a member"), "{e}");
    assert!(p.read("m", want.len()).as_deref() == Ok(&want[..]));
}
