//! A disk that forgets what was not flushed when its node loses power, and that can fail I/O.
//!
//! [`ForgetfulDisk`] is a block device built on the host from parts that each hold a cache a
//! real machine would lose:
//!
//! ```text
//! node (rdbd) -> /dev/loopN (page cache of the node) -> nbdfuse file (FUSE) -> unix socket
//!   -> nbdkit: log -> error -> cache (writeback, volatile) -> file plugin -> NAME.img (durable)
//! ```
//!
//! - The durable medium is the image file on the host; what reaches the `file` plugin survives.
//! - nbdkit's `cache` filter with `cache=writeback` keeps every write in a temporary file of
//!   nbdkit's until an NBD FLUSH writes it through; it is gone when nbdkit dies (the disk's
//!   volatile write cache).
//! - The loop device gives the node a page cache of its own (the FUSE file underneath is
//!   write-through). The loop device runs with `--direct-io=on`, so it reads and writes the FUSE
//!   file with O_DIRECT and FUSE keeps no page cache of its own: a read the node issues always
//!   reaches nbdkit (and an injected read error).
//! - A FLUSH of the loop device (fsync/fdatasync, `RWF_DSYNC`, a write with FUA) becomes an
//!   fsync of the FUSE file, which nbdfuse turns into an NBD FLUSH, which the cache filter writes
//!   through to the image. `tests/power_loss.rs` checks that this really happens.
//! - The `error` filter sits nearest the client, so an injected error hits the very request the
//!   node issued (below the cache filter a write would only fail at the next flush, and a read
//!   served from the cache would never fail).
//! - The `log` filter (outermost) records every request and its result in `NAME.nbdkit.log`.
//!
//! [`ForgetfulDisk::power_off`] SIGKILLs nbdkit (its cache is lost) and nbdfuse (which aborts the
//! FUSE connection: from then on every request of the loop device fails at once with ENOTCONN,
//! so nothing can hang on a dead server), unmounts lazily and detaches the loop device, whose
//! page cache is dropped with it. Kill the node's processes first: a block device's last close
//! writes its dirty pages back (`sync_blockdev`, without a flush), which puts them in nbdkit's
//! cache where they are lost like everything else not flushed. [`ForgetfulDisk::power_on`]
//! builds the stack again on the same image; the loop device's number may differ, so the node
//! is configured with [`ForgetfulDisk::path`], a symlink repointed at every power-on.
//!
//! Never open the FUSE file directly: FUSE sends FLUSH on every close(2) and nbdfuse turns that
//! into an NBD FLUSH (losetup's own open and close at power-on flushes an empty cache).
//!
//! How errors surface on the loop device (measured on Linux 6.18, see the self-test):
//! - `fail_writes`: a buffered write succeeds (it only fills the page cache); the following
//!   fsync/fdatasync fails with EIO once, the page is then clean in the page cache although the
//!   disk never got it ("lost async page write" in dmesg; reads keep returning the new data until
//!   the page cache drops it) and a second fsync succeeds. O_DIRECT writes and `RWF_DSYNC`
//!   writes fail with EIO at once. FLUSH itself cannot be failed (nbdkit 1.32's error filter has
//!   no flush injection).
//! - `fail_reads`: reads of pages in the node's page cache succeed; others (and every O_DIRECT
//!   read) fail with EIO.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::cluster::die_with_parent;
use super::{have_tool, is_root, output_within, wait_exit_within, wait_until};

/// How long nbdkit, nbdfuse and the loop device get to appear or go away.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether this machine can build a [`ForgetfulDisk`]: root, the tools, /dev/fuse and loop
/// devices. Prints a SKIP line when not (panics under RDBD_REQUIRE_TOOLS=1 for a missing tool).
pub fn forgetful_disks_available() -> bool {
    if !is_root() {
        return false;
    }
    for tool in ["nbdkit", "nbdfuse", "losetup", "umount"] {
        if !have_tool(tool) {
            return false;
        }
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            if std::env::var("RDBD_REQUIRE_TOOLS").as_deref() == Ok("1") {
                panic!("{dev} is required (RDBD_REQUIRE_TOOLS=1) but missing");
            }
            eprintln!("SKIP: {dev} is missing");
            return false;
        }
    }
    true
}

/// The processes and the loop device of a disk that has power.
struct Powered {
    nbdkit: Child,
    nbdfuse: Child,
    loop_dev: PathBuf,
}

/// A block device whose unflushed writes are lost at [`Self::power_off`], with injectable I/O
/// errors. See the module documentation.
pub struct ForgetfulDisk {
    name: String,
    size: u64,
    image: PathBuf,
    link: PathBuf,
    socket: PathBuf,
    mountpoint: PathBuf,
    cache_dir: PathBuf,
    nbd_log: PathBuf,
    stderr_log: PathBuf,
    fail_writes_file: PathBuf,
    fail_reads_file: PathBuf,
    powered: Option<Powered>,
    power_cycles: u32,
}

impl ForgetfulDisk {
    /// A new disk `name` of `size` bytes (zeroes) in `dir`, powered on; `None` (after a SKIP
    /// line) when the machine cannot build one. Its files: `NAME.img` (the durable medium),
    /// `NAME-disk` (the symlink to the loop device), `NAME.nbdkit.log` (every request).
    pub fn new(dir: &Path, name: &str, size: u64) -> Option<ForgetfulDisk> {
        if !forgetful_disks_available() {
            return None;
        }
        let file = |suffix: &str| dir.join(format!("{name}{suffix}"));
        let disk = ForgetfulDisk {
            name: name.to_string(),
            size,
            image: file(".img"),
            link: file("-disk"),
            socket: file(".nbd.sock"),
            mountpoint: file(".fuse"),
            cache_dir: file(".cache"),
            nbd_log: file(".nbdkit.log"),
            stderr_log: file(".stderr.log"),
            fail_writes_file: file(".fail-writes"),
            fail_reads_file: file(".fail-reads"),
            powered: None,
            power_cycles: 0,
        };
        File::create(&disk.image).unwrap().set_len(size).unwrap();
        std::fs::create_dir_all(&disk.mountpoint).unwrap();
        std::fs::create_dir_all(&disk.cache_dir).unwrap();
        let mut disk = disk;
        disk.power_on();
        Some(disk)
    }

    /// The stable path of the block device (a symlink to the current loop device): the node's
    /// `disk =`.
    pub fn path(&self) -> &Path {
        &self.link
    }

    /// The durable medium: what survives a power loss.
    pub fn image(&self) -> &Path {
        &self.image
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The current loop device, while powered.
    pub fn loop_device(&self) -> Option<&Path> {
        self.powered.as_ref().map(|p| p.loop_dev.as_path())
    }

    pub fn is_on(&self) -> bool {
        self.powered.is_some()
    }

    /// How many times the disk lost power.
    pub fn power_cycles(&self) -> u32 {
        self.power_cycles
    }

    /// Makes writes, write-zeroes and trims fail with EIO (until `fail_writes(false)`).
    pub fn fail_writes(&self, on: bool) {
        set_trigger(&self.fail_writes_file, on);
    }

    /// Makes reads fail with EIO (until `fail_reads(false)`).
    pub fn fail_reads(&self, on: bool) {
        set_trigger(&self.fail_reads_file, on);
    }

    /// nbdkit's request log across power cycles (the `log` filter's lines).
    pub fn request_log(&self) -> String {
        std::fs::read_to_string(&self.nbd_log).unwrap_or_default()
    }

    /// NBD FLUSH requests that nbdkit completed successfully so far, across power cycles.
    pub fn flushes(&self) -> usize {
        self.request_log().lines().filter(|l| l.contains("...Flush id=") && l.contains("return=0")).count()
    }

    /// What nbdkit and nbdfuse printed (errors), across power cycles.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Starts nbdkit, nbdfuse and the loop device on the durable image and points
    /// [`Self::path`] at the loop device.
    pub fn power_on(&mut self) {
        assert!(self.powered.is_none(), "{} is already powered on", self.name);
        let _ = std::fs::remove_file(&self.socket);
        let nbdkit = self.start_nbdkit();
        // From here on `self.powered` is not set yet: a panic must not leak the processes.
        let mut guard = PartialStart { nbdkit: Some(nbdkit), nbdfuse: None, mountpoint: &self.mountpoint };
        let nbdfuse = self.start_nbdfuse(&mut guard);
        guard.nbdfuse = Some(nbdfuse);
        let loop_dev = self.attach_loop();
        let (nbdkit, nbdfuse) = (guard.nbdkit.take().unwrap(), guard.nbdfuse.take().unwrap());
        drop(guard);
        self.powered = Some(Powered { nbdkit, nbdfuse, loop_dev: loop_dev.clone() });
        // Repoint the symlink atomically.
        let tmp = self.link.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&loop_dev, &tmp).unwrap();
        std::fs::rename(&tmp, &self.link).unwrap();
    }

    /// Power loss: everything not flushed is gone. The node's processes must be gone first
    /// (see the module documentation); panics if the loop device stays attached.
    pub fn power_off(&mut self) {
        let powered = self.powered.take().unwrap_or_else(|| panic!("{} is not powered on", self.name));
        self.power_cycles += 1;
        if let Err(e) = self.tear_down(powered) {
            panic!("power_off of {}: {e}\nstderr:\n{}", self.name, self.stderr());
        }
    }

    fn start_nbdkit(&self) -> Child {
        let pidfile = self.mountpoint.with_extension("nbdkit.pid");
        let _ = std::fs::remove_file(&pidfile);
        let trigger = |op: &str, file: &Path| {
            [
                format!("error-{op}=EIO"),
                format!("error-{op}-rate=100%"),
                format!("error-{op}-file={}", file.display()),
            ]
        };
        let mut cmd = Command::new("nbdkit");
        cmd.arg("-f")
            .arg("-U")
            .arg(&self.socket)
            .arg("-P")
            .arg(&pidfile)
            // Nearest the client first.
            .args(["--filter=log", "--filter=error", "--filter=cache", "file"])
            .arg(format!("file={}", self.image.display()))
            .arg("cache=writeback")
            .arg(format!("logfile={}", self.nbd_log.display()))
            .arg("logappend=true")
            .args(trigger("pwrite", &self.fail_writes_file))
            .args(trigger("zero", &self.fail_writes_file))
            .args(trigger("trim", &self.fail_writes_file))
            .args(trigger("pread", &self.fail_reads_file))
            // The cache filter keeps its (volatile) blocks in a temporary file there.
            .env("TMPDIR", &self.cache_dir);
        let mut child = self.spawn(&mut cmd, "nbdkit");
        let ready = wait_until(STEP_TIMEOUT, || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("nbdkit for {} exited at start ({status}):\n{}", self.name, self.stderr());
            }
            pidfile.exists() && self.socket.exists()
        });
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nbdkit for {} not ready within {STEP_TIMEOUT:?}:\n{}", self.name, self.stderr());
        }
        child
    }

    fn start_nbdfuse(&self, guard: &mut PartialStart) -> Child {
        let pidfile = self.mountpoint.with_extension("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("nbdfuse");
        cmd.arg("-P")
            .arg(&pidfile)
            .arg(&self.mountpoint)
            .arg(format!("nbd+unix:///?socket={}", self.socket.display()));
        let mut child = self.spawn(&mut cmd, "nbdfuse");
        let file = self.mountpoint.join("nbd");
        // stat only: opening the file would send a FLUSH at close.
        let ready = wait_until(STEP_TIMEOUT, || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("nbdfuse for {} exited at start ({status}):\n{}", self.name, self.stderr());
            }
            pidfile.exists() && std::fs::metadata(&file).is_ok_and(|m| m.len() == self.size)
        });
        if !ready {
            guard.nbdfuse = Some(child);
            panic!("nbdfuse for {} did not expose {} within {STEP_TIMEOUT:?}", self.name, file.display());
        }
        child
    }

    fn attach_loop(&self) -> PathBuf {
        let file = self.mountpoint.join("nbd");
        let out = output_within(
            Command::new("losetup").args(["--direct-io=on", "-f", "--show"]).arg(&file),
            TOOL_TIMEOUT,
        );
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success() && name.starts_with("/dev/loop"),
            "losetup on {} failed ({}): {name}{}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(name);
        // Without direct I/O the loop device would read through FUSE's page cache, where an
        // injected read error cannot reach it (losing power is the same either way).
        let dio = std::fs::read_to_string(format!(
            "/sys/block/{}/loop/dio",
            dev.file_name().unwrap().to_string_lossy()
        ));
        if dio.as_deref().map(str::trim).ok() != Some("1") {
            eprintln!("warning: {} does not use direct I/O on {} ({dio:?})", dev.display(), file.display());
        }
        dev
    }

    fn spawn(&self, cmd: &mut Command, what: &str) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.stderr_log).unwrap();
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        die_with_parent(cmd).spawn().unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
    }

    /// Kills nbdkit and nbdfuse, unmounts, detaches the loop device; every step bounded, every
    /// step tried even when an earlier one failed.
    fn tear_down(&self, powered: Powered) -> Result<(), String> {
        let Powered { mut nbdkit, mut nbdfuse, loop_dev } = powered;
        let mut errors = Vec::new();
        for (what, child) in [("nbdkit", &mut nbdkit), ("nbdfuse", &mut nbdfuse)] {
            let _ = child.kill();
            if wait_exit_within(child, STEP_TIMEOUT).is_none() {
                errors.push(format!("{what} did not die"));
            }
        }
        kill_fuse_mount(&self.mountpoint, &mut errors);
        detach_loop(&loop_dev, &mut errors);
        let _ = std::fs::remove_file(&self.link);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Drop for ForgetfulDisk {
    fn drop(&mut self) {
        if let Some(powered) = self.powered.take() {
            // Best effort, never a panic while unwinding.
            if let Err(e) = self.tear_down(powered) {
                eprintln!("tearing down {}: {e}", self.name);
            }
        }
    }
}

/// What [`ForgetfulDisk::power_on`] started before it finished: undone if it panics.
struct PartialStart<'a> {
    nbdkit: Option<Child>,
    nbdfuse: Option<Child>,
    mountpoint: &'a Path,
}

impl Drop for PartialStart<'_> {
    fn drop(&mut self) {
        for child in [self.nbdkit.as_mut(), self.nbdfuse.as_mut()].into_iter().flatten() {
            let _ = child.kill();
            let _ = wait_exit_within(child, STEP_TIMEOUT);
        }
        if self.nbdfuse.is_some() {
            kill_fuse_mount(self.mountpoint, &mut Vec::new());
        }
    }
}

fn set_trigger(file: &Path, on: bool) {
    if on {
        File::create(file).unwrap();
    } else if let Err(e) = std::fs::remove_file(file) {
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{}: {e}", file.display());
    }
}

/// Whether `dir` is a mount point now (per /proc/self/mountinfo).
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(info) = File::open("/proc/self/mountinfo") else { return false };
    let dir = dir.to_string_lossy();
    BufReader::new(info)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.split(' ').nth(4).is_some_and(|m| unescape_mount_path(m) == dir))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// Lazy unmount of a FUSE mount whose server is dead (nothing can block on it).
fn kill_fuse_mount(mountpoint: &Path, errors: &mut Vec<String>) {
    if !is_mounted(mountpoint) {
        return;
    }
    let out = output_within(Command::new("umount").arg("-l").arg(mountpoint), TOOL_TIMEOUT);
    if !out.status.success() && is_mounted(mountpoint) {
        errors.push(format!(
            "umount -l {} failed: {}",
            mountpoint.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
}

/// The loop device's backing file as the kernel reports it; `None` once detached.
fn loop_backing_file(dev: &Path) -> Option<String> {
    let name = dev.file_name()?.to_string_lossy().into_owned();
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()
}

/// `losetup -d`, then waits until the kernel has really let go (a device still open is only
/// marked for autoclear and detaches at its last close). Another test may take the same loop
/// device at once: "gone" is "no longer this backing file".
fn detach_loop(dev: &Path, errors: &mut Vec<String>) {
    let Some(backing) = loop_backing_file(dev) else { return };
    let out = output_within(Command::new("losetup").arg("-d").arg(dev), TOOL_TIMEOUT);
    let gone = wait_until(STEP_TIMEOUT, || loop_backing_file(dev).is_none_or(|b| b != backing));
    if !gone {
        errors.push(format!(
            "{} still attached after losetup -d ({}; {}): is it still open? stop the node first",
            dev.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
}

/// A pair of rdbd nodes on forgetful disks. The cluster is dropped first, so the daemons die
/// before their disks lose power.
pub struct ForgetfulPair {
    pub cluster: super::cluster::Cluster,
    pub disks: [ForgetfulDisk; 2],
    _dir: tempfile::TempDir,
}

impl ForgetfulPair {
    /// Two forgetful disks of `size` bytes and a cluster on them (`create-md` done, nothing
    /// started); `None` (after a SKIP line) where the machine cannot build the disks.
    pub fn new(size: u64, opts: super::cluster::Options) -> Option<ForgetfulPair> {
        let dir = tempfile::tempdir().unwrap();
        let alpha = ForgetfulDisk::new(dir.path(), "alpha", size)?;
        let beta = ForgetfulDisk::new(dir.path(), "beta", size)?;
        let disks = Some([alpha.path().to_owned(), beta.path().to_owned()]);
        let cluster = super::cluster::Cluster::new(super::cluster::Options { disks, ..opts });
        Some(ForgetfulPair { cluster, disks: [alpha, beta], _dir: dir })
    }

    pub fn disk(&mut self, node: super::cluster::Node) -> &mut ForgetfulDisk {
        &mut self.disks[node as usize]
    }

    /// The node loses power: its daemon dies (SIGKILL) and its disk forgets what was not
    /// flushed.
    pub fn power_loss(&mut self, node: super::cluster::Node) {
        let activity = self.cluster.try_status(node).map(|s| s.field("activity_log_extents").as_u64());
        eprintln!("{} loses power (activity log extents: {activity:?})", node.name());
        self.cluster.kill(node);
        self.disk(node).power_off();
    }

    /// Power back on and the daemon started (`rdbd up`).
    pub fn power_on(&mut self, node: super::cluster::Node) {
        self.disk(node).power_on();
        self.cluster.start(node);
    }
}
