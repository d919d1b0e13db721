//! Power loss: nodes on disks that forget what was not flushed ([`ForgetfulDisk`]: nbdkit's
//! writeback cache under nbdfuse under a loop device), killed together with their daemon.
//!
//! First the disk itself: unflushed writes are gone after a power cycle, flushed ones survive,
//! a flush of the loop device reaches nbdkit as an NBD FLUSH, injected errors surface as EIO.
//! Then the real `rdbd` pair: the Primary writes without a client FLUSH, stays idle for a while
//! (long enough, or not, for the activity log to retire the extents), and the Primary, the
//! Secondary or both lose power. After they come back and resync, `verify` must find nothing
//! out of sync, both replicas must be identical, and a write covered by an acknowledged FLUSH
//! before must be intact.
//!
//! Needs root, nbdkit (cache, error and log filters), nbdfuse, losetup and python3-libnbd. The
//! tests share loop devices and take tens of seconds each: they run one at a time.
//! `cargo test --test power_loss -- --test-threads=1`

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::cluster::{str_at, Alpha, Beta, Node, Options, MIB};
use common::powerloss::{ForgetfulDisk, ForgetfulPair};
use common::*;

/// One test at a time: each builds two disks (loop devices, FUSE mounts) and a pair.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const BLOCK: usize = 4096;

/// A page-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn filled(len: usize, byte: u8) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, BLOCK).unwrap();
        // SAFETY: non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        let mut buf = Aligned { ptr, layout };
        buf.as_mut().fill(byte);
        buf
    }

    fn as_ref(&self) -> &[u8] {
        // SAFETY: allocated with this length, initialised in `filled`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `filled` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn open_device(path: &Path, direct: bool) -> File {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// One 4 KiB write with `RWF_DSYNC` (what rdbd's metadata writes use).
fn pwrite_dsync(file: &File, data: &[u8], offset: u64) -> std::io::Result<usize> {
    let iov = [std::io::IoSlice::new(data)];
    rustix::io::pwritev2(file, &iov, offset, rustix::io::ReadWriteFlags::DSYNC).map_err(Into::into)
}

fn read_block(path: &Path, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// What a block holds: `'X'` for a block of that byte, "zeroes", or "other".
fn describe(block: &[u8]) -> String {
    if block.iter().all(|&b| b == 0) {
        "zeroes".into()
    } else if block.iter().all(|&b| b == block[0]) {
        format!("{:?}", block[0] as char)
    } else {
        "mixed data".into()
    }
}

#[test]
fn the_disk_forgets_unflushed_writes_and_keeps_flushed_ones() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let Some(mut disk) = ForgetfulDisk::new(dir.path(), "selftest", 64 * MIB) else { return };
    let dev = disk.path().to_owned();
    let flushes_at_start = disk.flushes();
    {
        let buffered = open_device(&dev, false);
        // Flushed by fdatasync: written back from the page cache, then an NBD FLUSH.
        buffered.write_all_at(&[b'B'; BLOCK], MIB).unwrap();
        buffered.sync_data().unwrap();
        assert!(disk.flushes() > flushes_at_start, "fdatasync sent no NBD FLUSH:\n{}", disk.request_log());
        // RWF_DSYNC: this block only, then a flush.
        let before = disk.flushes();
        assert_eq!(pwrite_dsync(&buffered, &[b'C'; BLOCK], 2 * MIB).unwrap(), BLOCK);
        assert!(disk.flushes() > before, "RWF_DSYNC sent no NBD FLUSH:\n{}", disk.request_log());
        // Not flushed: in the page cache until the last close writes it back (no flush).
        buffered.write_all_at(&[b'A'; BLOCK], 0).unwrap();
        // O_DIRECT, not flushed: straight to nbdkit's cache.
        let direct = open_device(&dev, true);
        let written = direct.write_at(Aligned::filled(BLOCK, b'D').as_ref(), 3 * MIB).unwrap();
        assert_eq!(written, BLOCK);
    }
    // The unflushed writes did reach nbdkit (the last close wrote the page cache back), and
    // they are still readable before the power loss.
    for (offset, byte) in [(0, b'A'), (MIB, b'B'), (2 * MIB, b'C'), (3 * MIB, b'D')] {
        assert_eq!(
            describe(&read_block(&dev, offset)),
            describe(&[byte]),
            "at {offset:#x} before the power loss"
        );
    }
    let log = disk.request_log();
    assert!(log.contains("Write id=") && log.contains("offset=0x0 count=0x1000"), "{log}");

    disk.power_off();
    assert!(!disk.is_on() && !dev.exists(), "the symlink must go with the power");
    // The durable medium holds exactly the flushed writes.
    let image = disk.image().to_owned();
    let on_image: Vec<String> = [0, MIB, 2 * MIB, 3 * MIB].map(|o| describe(&read_block(&image, o))).into();
    assert_eq!(on_image, ["zeroes", "'B'", "'C'", "zeroes"], "the image after the power loss");

    disk.power_on();
    assert!(disk.path().exists());
    let after: Vec<String> = [0, MIB, 2 * MIB, 3 * MIB].map(|o| describe(&read_block(&dev, o))).into();
    assert_eq!(after, ["zeroes", "'B'", "'C'", "zeroes"], "through the loop device after power-on");
    assert_eq!(disk.power_cycles(), 1);
}

#[test]
fn a_dirty_page_cache_is_lost_with_the_power() {
    // Dirty pages of a device nobody closes (a node that dies with the power, not before):
    // the power goes while they are dirty; closing the device afterwards writes them into the
    // void (the FUSE connection is aborted), and the next power-on does not see them.
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let Some(mut disk) = ForgetfulDisk::new(dir.path(), "dirty", 64 * MIB) else { return };
    let dev = disk.path().to_owned();
    let flushes = disk.flushes();
    let holder = open_device(&dev, false);
    holder.write_all_at(&[b'P'; BLOCK], 5 * MIB).unwrap();
    assert!(!disk.request_log().contains("offset=0x500000"), "the write must still be in the page cache");
    // Power off with the device still open: the loop device is only marked for autoclear...
    let loop_name = std::fs::canonicalize(&dev).unwrap().file_name().unwrap().to_string_lossy().into_owned();
    let autoclear = format!("/sys/block/{loop_name}/loop/autoclear");
    std::thread::scope(|s| {
        let closer = s.spawn(|| {
            // ...and detaches at the last close, here, which must not hang on the dead server.
            // power_off marks it once nbdkit and nbdfuse are gone: the close comes after the power.
            let marked = wait_until(Duration::from_secs(60), || {
                std::fs::read_to_string(&autoclear).is_ok_and(|v| v.trim() == "1")
            });
            drop(holder);
            assert!(marked, "{loop_name} was not marked for autoclear within 60 s");
        });
        disk.power_off();
        closer.join().unwrap();
    });
    assert_eq!(disk.flushes(), flushes, "nothing may have flushed the write");
    disk.power_on();
    assert_eq!(describe(&read_block(&dev, 5 * MIB)), "zeroes", "the dirty page survived the power loss");
}

#[test]
fn injected_errors_surface_as_eio_on_the_loop_device() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let Some(mut disk) = ForgetfulDisk::new(dir.path(), "errors", 64 * MIB) else { return };
    let dev = disk.path().to_owned();
    let eio = |r: std::io::Result<()>, what: &str| match r {
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
        other => panic!("{what}: expected EIO, got {other:?}"),
    };
    let buffered = open_device(&dev, false);
    let direct = open_device(&dev, true);
    // A durable block in the page cache, for the read errors below.
    buffered.write_all_at(&[b'K'; BLOCK], 8 * MIB).unwrap();
    buffered.sync_data().unwrap();

    disk.fail_writes(true);
    // A buffered write only fills the page cache: it succeeds; the fsync after it fails, once
    // (the page is then marked clean: "lost async page write"), and the next fsync succeeds.
    buffered.write_all_at(&[b'X'; BLOCK], 0).unwrap();
    eio(buffered.sync_data(), "fdatasync after a buffered write");
    buffered.sync_data().expect("the error is reported once");
    // The page cache still holds what the disk never got.
    assert_eq!(describe(&read_block(&dev, 0)), "'X'");
    // O_DIRECT and RWF_DSYNC writes fail at once.
    eio(direct.write_at(Aligned::filled(BLOCK, b'Y').as_ref(), 4096).map(drop), "O_DIRECT write");
    eio(pwrite_dsync(&buffered, &[b'Z'; BLOCK], 8192).map(drop), "RWF_DSYNC write");
    disk.fail_writes(false);
    buffered.write_all_at(&[b'W'; BLOCK], 12288).unwrap();
    buffered.sync_data().expect("writes work again");
    direct.write_at(Aligned::filled(BLOCK, b'V').as_ref(), 16384).expect("O_DIRECT writes work again");

    disk.fail_reads(true);
    let mut buf = Aligned::filled(BLOCK, 0);
    // Pages in the page cache are still read; anything else fails.
    let mut cached = vec![0u8; BLOCK];
    buffered.read_exact_at(&mut cached, 8 * MIB).expect("a cached page reads without the disk");
    eio(direct.read_exact_at(buf.as_mut(), 8 * MIB), "O_DIRECT read");
    eio(buffered.read_exact_at(&mut cached, 20 * MIB), "buffered read of an uncached page");
    disk.fail_reads(false);
    direct.read_exact_at(buf.as_mut(), 8 * MIB).expect("reads work again");
    assert_eq!(describe(buf.as_ref()), "'K'");
    drop((buffered, direct));

    // After a power cycle: what failed is not there, what succeeded and was flushed is.
    disk.power_off();
    disk.power_on();
    let blocks: Vec<String> = [0, 4096, 8192, 12288, 8 * MIB].map(|o| describe(&read_block(&dev, o))).into();
    assert_eq!(blocks, ["zeroes", "zeroes", "zeroes", "'W'", "'K'"]);
    assert!(disk.request_log().contains("error=EIO"), "{}", disk.request_log());
}

// ---- The pair on forgetful disks ----

/// Each node's disk: 256 MiB, the data area a little less (internal metadata at its end).
const DISK_SIZE: u64 = 256 * MIB;
/// Written and covered by an acknowledged FLUSH before the unflushed writes.
const ANCHOR: u64 = 8 * MIB;
const ANCHOR_LEN: u64 = MIB;
/// The unflushed writes: 1 MiB in one extent, and a block at the start of 8 more extents.
const UNFLUSHED: u64 = 40 * MIB;
const UNFLUSHED_EXTENTS: std::ops::Range<u64> = 20..28;

/// The pair on forgetful disks, one test at a time.
struct Rig {
    pair: ForgetfulPair,
    _serial: MutexGuard<'static, ()>,
}

impl std::ops::Deref for Rig {
    type Target = ForgetfulPair;
    fn deref(&self) -> &ForgetfulPair {
        &self.pair
    }
}

impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut ForgetfulPair {
        &mut self.pair
    }
}

impl Rig {
    /// Two forgetful disks, a pair on them, alpha Primary and the initial sync done.
    fn new() -> Option<Rig> {
        Rig::with(Options::default())
    }

    /// As [`Rig::new`], the cluster built with `opts`.
    fn with(opts: Options) -> Option<Rig> {
        let serial = serial();
        if !have_python_nbd() || !have_tool("nbdsh") {
            return None;
        }
        let mut pair = ForgetfulPair::new(DISK_SIZE, opts)?;
        let started = Instant::now();
        pair.cluster.start_primary_pair();
        eprintln!("pair up and in sync in {:.1?}", started.elapsed());
        Some(Rig { pair, _serial: serial })
    }

    /// The anchor (flushed), then the unflushed writes, through `node`'s export. libnbd sends
    /// no FLUSH of its own, not even when it disconnects.
    fn write_anchor_then_unflushed(&self, node: Node) {
        self.cluster.nbdsh(node, &format!("h.pwrite(b'F' * {ANCHOR_LEN}, {ANCHOR})\nh.flush()"));
        self.cluster.nbdsh(
            node,
            &format!(
                "h.pwrite(b'U' * {MIB}, {UNFLUSHED})\nfor e in range({}, {}):\n    h.pwrite(b'u' * 4096, e * 4 * {MIB})",
                UNFLUSHED_EXTENTS.start, UNFLUSHED_EXTENTS.end
            ),
        );
    }

    /// The checks after the pair is back: in sync, verify finds nothing, identical replicas,
    /// the anchor intact on both disks and through `server`'s export (promoted if needed).
    /// All problems are reported together, with both nodes' state.
    fn check_recovered(&mut self, server: Node) {
        self.cluster.wait_in_sync(Duration::from_secs(120));
        let statuses = Node::BOTH.map(|n| self.cluster.status(n));
        let resynced: Vec<String> = Node::BOTH
            .iter()
            .zip(&statuses)
            .map(|(n, s)| format!("{}: last_resync_bytes {:?}", n.name(), s.get("last_resync_bytes")))
            .collect();
        eprintln!("back in sync; {}", resynced.join(", "));
        let mut problems = Vec::new();
        let (out_of_sync, verify_text) = self.cluster.verify_blocks(Beta);
        eprintln!("verify: {}", verify_text.lines().find(|l| l.contains("verify done")).unwrap_or_default());
        if out_of_sync != 0 {
            problems.push(format!("verify found {out_of_sync} blocks out of sync:\n{verify_text}"));
        }
        if let Err(e) = self.cluster.compare_data() {
            problems.push(e);
        }
        for node in Node::BOTH {
            let anchor = self.cluster.read_disk(node, ANCHOR, ANCHOR_LEN as usize);
            if anchor.iter().any(|&b| b != b'F') {
                let bad = anchor.chunks(BLOCK).filter(|b| b.iter().any(|&x| x != b'F')).count();
                problems
                    .push(format!("the flushed anchor is damaged on {}'s disk: {bad} blocks", node.name()));
            }
        }
        if str_at(&self.cluster.status(server), &["role"]) != "Primary" {
            let out = self.cluster.rdbd(server, &["primary"]);
            if !out.status.success() {
                problems.push(format!(
                    "primary on {} failed: {}",
                    server.name(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        let read = output_within(
            nbdsh().args([
                "-u",
                &self.cluster.nbd_uri(server),
                "-c",
                &format!("assert h.pread({ANCHOR_LEN}, {ANCHOR}) == b'F' * {ANCHOR_LEN}, 'anchor differs'"),
            ]),
            Duration::from_secs(60),
        );
        if !read.status.success() {
            problems.push(format!(
                "reading the flushed anchor through {}'s export failed: {}",
                server.name(),
                String::from_utf8_lossy(&read.stderr).trim()
            ));
        }
        if !problems.is_empty() {
            panic!("{}\n{}", problems.join("\n"), self.cluster.diag());
        }
    }
}

/// The pair up, the Primary (alpha) writes without a FLUSH, stays idle for `idle`, then `node`
/// loses power, and its peer sees it gone.
fn unflushed_writes_then_power_loss(node: Node, idle: Duration) -> Option<Rig> {
    let mut rig = Rig::new()?;
    rig.write_anchor_then_unflushed(Alpha);
    // A window, not a wait: how long the pair stays idle is the scenario under test.
    std::thread::sleep(idle);
    rig.power_loss(node);
    rig.cluster.wait_for(node.peer(), "disconnected", Duration::from_secs(30), |s| {
        str_at(s, &["connection"]) != "Connected"
    });
    Some(rig)
}

/// (a) The Primary writes without a FLUSH, is idle for `idle`, loses power, comes back and
/// rejoins (as Secondary; the peer was not promoted).
fn primary_loses_power_after(idle: Duration) {
    let Some(mut rig) = unflushed_writes_then_power_loss(Alpha, idle) else { return };
    rig.power_on(Alpha);
    rig.check_recovered(Alpha);
}

/// (a') As (a), but the Secondary takes over while the Primary is away and serves from then on;
/// the former Primary comes back as its sync target.
fn primary_loses_power_and_the_secondary_takes_over_after(idle: Duration) {
    let Some(mut rig) = unflushed_writes_then_power_loss(Alpha, idle) else { return };
    rig.cluster.verb_ok(Beta, &["primary"]);
    rig.power_on(Alpha);
    rig.check_recovered(Beta);
}

/// (b) The Secondary loses power after the Primary wrote without a FLUSH and was idle for
/// `idle`; the Primary keeps serving; the Secondary comes back and resyncs.
fn secondary_loses_power_after(idle: Duration) {
    let Some(mut rig) = unflushed_writes_then_power_loss(Beta, idle) else { return };
    rig.power_on(Beta);
    rig.check_recovered(Alpha);
}

/// (c) Both lose power after the Primary wrote without a FLUSH and was idle for `idle`; both
/// come back (Secondary) and the former Primary serves again.
fn both_lose_power_after(idle: Duration) {
    let Some(mut rig) = Rig::new() else { return };
    rig.write_anchor_then_unflushed(Alpha);
    // A window, not a wait: how long the pair stays idle is the scenario under test.
    std::thread::sleep(idle);
    rig.power_loss(Alpha);
    rig.power_loss(Beta);
    rig.disk(Alpha).power_on();
    rig.disk(Beta).power_on();
    rig.cluster.start_both();
    rig.check_recovered(Alpha);
}

#[test]
fn primary_loses_power_right_after_unflushed_writes() {
    primary_loses_power_after(Duration::ZERO);
}

#[test]
fn primary_loses_power_6s_after_unflushed_writes() {
    primary_loses_power_after(Duration::from_secs(6));
}

#[test]
fn primary_loses_power_15s_after_unflushed_writes() {
    primary_loses_power_after(Duration::from_secs(15));
}

#[test]
fn primary_loses_power_40s_after_unflushed_writes() {
    primary_loses_power_after(Duration::from_secs(40));
}

#[test]
fn primary_loses_power_15s_after_unflushed_writes_and_the_secondary_takes_over() {
    primary_loses_power_and_the_secondary_takes_over_after(Duration::from_secs(15));
}

#[test]
fn secondary_loses_power_right_after_unflushed_writes() {
    secondary_loses_power_after(Duration::ZERO);
}

#[test]
fn secondary_loses_power_15s_after_unflushed_writes() {
    secondary_loses_power_after(Duration::from_secs(15));
}

#[test]
fn both_lose_power_right_after_unflushed_writes() {
    both_lose_power_after(Duration::ZERO);
}

#[test]
fn both_lose_power_15s_after_unflushed_writes() {
    both_lose_power_after(Duration::from_secs(15));
}

/// (d) The Primary writes without a FLUSH and is demoted at once (its writes may still sit in
/// the Secondary's volatile cache), then the Secondary loses power: the pair must resync to
/// identical replicas. The simulator found this shape lose the marks in the core (seed 40834).
/// The daemon's demotion makes every write stable on the peer first (one flush), so the
/// Secondary's power loss takes nothing and the pair reconnects in sync: no resync at all.
#[test]
fn the_secondary_loses_power_right_after_the_primary_was_demoted() {
    let Some(mut rig) = Rig::new() else { return };
    rig.write_anchor_then_unflushed(Alpha);
    rig.cluster.verb_ok(Alpha, &["secondary"]);
    let resyncs = rig.cluster.status(Alpha).field("resyncs_completed").as_u64();
    rig.power_loss(Beta);
    rig.cluster.wait_for(Alpha, "disconnected", Duration::from_secs(30), |s| {
        str_at(s, &["connection"]) != "Connected"
    });
    rig.power_on(Beta);
    rig.cluster.wait_in_sync(Duration::from_secs(120));
    let after = rig.cluster.status(Alpha).field("resyncs_completed").as_u64();
    assert_eq!(after, resyncs, "the demotion flushed the peer: nothing to resync after its power loss");
    rig.check_recovered(Alpha);
}

/// `down` makes the data durable before it marks the metadata clean (a clean log is trusted at
/// the next start): the power going right after loses nothing the peer holds.
#[test]
fn the_power_fails_right_after_a_clean_down() {
    let Some(mut rig) = Rig::new() else { return };
    rig.write_anchor_then_unflushed(Alpha);
    rig.cluster.down(Alpha);
    rig.disk(Alpha).power_off();
    rig.power_on(Alpha);
    rig.check_recovered(Alpha);
}

/// (f) A Secondary killed (SIGKILL: what it applied for its Primary, unflushed, stays in the page
/// cache and in its disk's volatile cache) comes back and becomes the sync source of those very
/// blocks, which its former Primary, killed too, marked from its activity log. The target clears
/// the marks once it holds the blocks; a power loss of the source afterwards must not take them
/// from the source's disk, or the replicas differ with nothing marked. The simulator found this
/// (seed 97588); a node flushes its disk when it opens it. The metadata lives in files of their
/// own here, so that no metadata write flushes the data disk on the way (an internal one would,
/// and hide the window).
#[test]
fn a_killed_secondary_makes_its_data_durable_before_it_is_sync_source() {
    let Some(mut rig) = Rig::with(Options { external_meta: true, ..Options::default() }) else { return };
    rig.write_anchor_then_unflushed(Alpha);
    // The Primary first, so that it takes no generation of its own for the Secondary's loss.
    rig.cluster.kill(Alpha);
    rig.cluster.kill(Beta);
    rig.cluster.start(Beta);
    rig.cluster.verb_ok(Beta, &["primary"]);
    rig.cluster.start(Alpha);
    rig.cluster.wait_in_sync(Duration::from_secs(120));
    let status = rig.cluster.status(Alpha);
    let resynced =
        status.get("last_resync_bytes").filter(|j| matches!(j, Json::Num(_))).map_or(0, Json::as_u64);
    assert!(resynced >= MIB, "alpha was to be sync target of its marked blocks; resynced {resynced} bytes");
    rig.power_loss(Beta);
    rig.power_on(Beta);
    rig.check_recovered(Beta);
}
