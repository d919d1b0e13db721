//! A real filesystem on the export: nbdfuse exposes it as a file, a loop device turns that into a
//! block device, and XFS lives on top. Files written in one session must come back intact after
//! unmounting, remounting, and even restarting the whole stack (server included).
//! Needs root, nbdfuse, fusermount3, losetup, mkfs.xfs and xfs_repair.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;
const SIZE: u64 = 512 * MIB;

/// Everything set up on the way, undone in reverse order when dropped (also on panic).
#[derive(Default)]
struct Stack {
    undo: Vec<Undo>,
}

enum Undo {
    Nbdfuse { child: Child, mountpoint: PathBuf },
    Loop(PathBuf),
    Mount(PathBuf),
}

impl Stack {
    /// Starts nbdfuse on `mountpoint` for `uri`; returns the path of the file it exposes.
    fn nbdfuse(&mut self, mountpoint: &Path, uri: &str, log: &Path) -> PathBuf {
        std::fs::create_dir_all(mountpoint).unwrap();
        let pidfile = mountpoint.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(mountpoint)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("spawn nbdfuse");
        self.undo.push(Undo::Nbdfuse { child, mountpoint: mountpoint.to_owned() });
        let file = mountpoint.join("nbd");
        let ready = wait_until(Duration::from_secs(15), || {
            if let Some(Undo::Nbdfuse { child, .. }) = self.undo.last_mut() {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "nbdfuse exited early ({status}): {}",
                        std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
                    );
                }
            }
            pidfile.exists() && std::fs::metadata(&file).is_ok_and(|m| m.len() == SIZE)
        });
        assert!(ready, "nbdfuse did not expose {} within 15 s", file.display());
        file
    }

    fn losetup(&mut self, file: &Path) -> PathBuf {
        let out = run_ok_within(Command::new("losetup").args(["-f", "--show"]).arg(file), TOOL_TIMEOUT);
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(name.starts_with("/dev/loop"), "losetup printed {name:?}");
        let dev = PathBuf::from(name);
        self.undo.push(Undo::Loop(dev.clone()));
        dev
    }

    fn mount(&mut self, dev: &Path, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        run_ok_within(Command::new("mount").args(["-t", "xfs"]).arg(dev).arg(dir), TOOL_TIMEOUT);
        self.undo.push(Undo::Mount(dir.to_owned()));
    }

    /// Undoes the most recent step, checking that it succeeds.
    fn pop(&mut self) {
        let step = self.undo.pop().expect("nothing to undo");
        undo(step, true);
    }

    fn teardown(&mut self) {
        while !self.undo.is_empty() {
            self.pop();
        }
    }
}

fn undo(step: Undo, strict: bool) {
    match step {
        Undo::Mount(dir) => {
            let out = output_within(Command::new("umount").arg(&dir), TOOL_TIMEOUT);
            if !out.status.success() {
                let _ = Command::new("umount").arg("-l").arg(&dir).status();
                assert!(!strict, "umount {} failed: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
            }
        }
        Undo::Loop(dev) => {
            let mut ok = false;
            for _ in 0..50 {
                if Command::new("losetup").arg("-d").arg(&dev).status().is_ok_and(|s| s.success()) {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(ok || !strict, "losetup -d {} failed", dev.display());
        }
        Undo::Nbdfuse { mut child, mountpoint } => {
            let unmounted =
                Command::new("fusermount3").arg("-u").arg(&mountpoint).status().is_ok_and(|s| s.success());
            if !unmounted {
                let _ = Command::new("umount").arg("-l").arg(&mountpoint).status();
            }
            // nbdfuse exits by itself once unmounted.
            let exited = wait_until(Duration::from_secs(10), || child.try_wait().unwrap().is_some());
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
            assert!(
                (unmounted && exited) || !strict,
                "nbdfuse on {} did not shut down",
                mountpoint.display()
            );
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Best effort on the failure path: never panic while unwinding.
        while let Some(step) = self.undo.pop() {
            undo(step, false);
        }
    }
}

/// The files written: relative path → contents (deterministic).
fn test_files() -> Vec<(String, u64, u64)> {
    let mut files = vec![
        ("big.bin".to_string(), 20 * MIB + 12345, 1),
        ("medium.bin".to_string(), 3 * MIB + 7, 2),
        ("empty".to_string(), 0, 3),
        ("a/b/c/deep.bin".to_string(), 65537, 4),
    ];
    for d in 0..5 {
        for f in 0..8 {
            files.push((format!("tree/d{d}/f{f}.dat"), 1000 + 997 * (d * 8 + f), 100 + d * 8 + f));
        }
    }
    files
}

fn write_files(root: &Path) {
    for (rel, len, seed) in test_files() {
        let path = root.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        random_file(&path, len as usize, seed);
    }
}

/// sha256 of every regular file under `root`, by relative path.
fn checksums(root: &Path) -> BTreeMap<String, String> {
    let out = run_ok_within(
        Command::new("sh")
            .current_dir(root)
            .args(["-c", "find . -type f -print0 | sort -z | xargs -0 -r sha256sum"]),
        TOOL_TIMEOUT,
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (sum, path) = l.split_once("  ").unwrap_or_else(|| panic!("bad sha256sum line {l:?}"));
            (path.trim_start_matches("./").to_string(), sum.to_string())
        })
        .collect()
}

/// Checks the files under `root` against the recorded sums and against their generated contents.
fn verify_files(root: &Path, recorded: &BTreeMap<String, String>, when: &str) {
    let now = checksums(root);
    assert_eq!(&now, recorded, "checksums differ {when}");
    let scratch = tempfile::tempdir().unwrap();
    for (rel, len, seed) in test_files() {
        let expected = scratch.path().join("expected");
        random_file(&expected, len as usize, seed);
        let got = std::fs::read(root.join(&rel)).unwrap_or_else(|e| panic!("{rel} {when}: {e}"));
        assert!(got == std::fs::read(&expected).unwrap(), "{rel} has wrong contents {when}");
    }
}

#[test]
fn xfs_on_loop_over_nbdfuse_survives_remount_and_restart() {
    if !is_root()
        || !have_tool("nbdfuse")
        || !have_tool("fusermount3")
        || !have_tool("losetup")
        || !have_tool("mkfs.xfs")
        || !have_tool("xfs_repair")
        || !have_tool("sha256sum")
    {
        return;
    }
    // The disk lives in its own directory so that a second server can serve it later.
    let data = tempfile::tempdir().unwrap();
    let disk = data.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
    let work = tempfile::tempdir().unwrap();
    let (fuse_dir, mnt) = (work.path().join("fuse"), work.path().join("mnt"));
    let fuse_log = work.path().join("nbdfuse.log");

    // Session 1: mkfs, write, checksum, remount, verify.
    let recorded = {
        let mut server = Server::serve(tempfile::tempdir().unwrap(), disk.clone(), &[]);
        let mut stack = Stack::default();
        let file = stack.nbdfuse(&fuse_dir, &server.unix_uri, &fuse_log);
        let dev = stack.losetup(&file);
        run_ok_within(Command::new("mkfs.xfs").arg("-q").arg(&dev), TOOL_TIMEOUT);
        stack.mount(&dev, &mnt);
        write_files(&mnt);
        run_ok_within(Command::new("sync").arg("-f").arg(&mnt), TOOL_TIMEOUT);
        let recorded = checksums(&mnt);
        assert_eq!(recorded.len(), test_files().len(), "{recorded:?}");
        stack.pop(); // umount
        stack.mount(&dev, &mnt);
        verify_files(&mnt, &recorded, "after remount");
        stack.teardown(); // umount, losetup -d, fusermount3 -u
        assert!(server.stop().success(), "log:\n{}", server.log());
        recorded
    };

    // The filesystem reached the backing file: it has XFS's magic.
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        std::fs::File::open(&disk).unwrap().read_exact(&mut magic).unwrap();
    }
    assert_eq!(&magic, b"XFSB", "no XFS superblock in the backing file");

    // Session 2: a new server on the same file, a fresh nbdfuse and loop device, so nothing can
    // come from a cache; the filesystem must be consistent and the files intact.
    let mut server = Server::serve(tempfile::tempdir().unwrap(), disk.clone(), &[]);
    let mut stack = Stack::default();
    let file = stack.nbdfuse(&fuse_dir, &server.tcp_uri, &fuse_log);
    let dev = stack.losetup(&file);
    let out = output_within(Command::new("xfs_repair").arg("-n").arg(&dev), TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "xfs_repair -n found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    stack.mount(&dev, &mnt);
    verify_files(&mnt, &recorded, "after restarting the server");
    stack.teardown();
    assert!(server.stop().success(), "log:\n{}", server.log());
}
