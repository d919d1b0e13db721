//! Who is using `/dev/nbdN`: mounts, stacked devices (LVM, dm, md) and processes with it open.
//! A Secondary refuses to detach a device in use and says why, e.g. "/dev/nbd0 is mounted at
//! /srv/nfs (xfs)".
//!
//! Everything is read from sysfs and procfs under injectable roots, so tests use a fake tree.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// Where sysfs and procfs are mounted.
#[derive(Debug, Clone)]
pub struct SystemRoots {
    pub sys: PathBuf,
    pub proc: PathBuf,
    /// A process to leave out (our own, which may hold the device for NBD_DO_IT).
    pub ignore_pid: Option<u32>,
}

impl Default for SystemRoots {
    fn default() -> Self {
        Self { sys: "/sys".into(), proc: "/proc".into(), ignore_pid: Some(std::process::id()) }
    }
}

/// One user of the device (or of one of its partitions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Mount {
        device: String,
        mount_point: String,
        fs_type: String,
    },
    /// A device stacked on ours (dm-0 for LVM, md0, ...), with its dm name when it has one.
    Stacked {
        device: String,
        holder: String,
        name: Option<String>,
    },
    Process {
        device: String,
        pid: u32,
        command: String,
    },
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Mount { device, mount_point, fs_type } => {
                write!(f, "/dev/{device} is mounted at {mount_point} ({fs_type})")
            }
            Holder::Stacked { device, holder, name: Some(name) } => {
                write!(f, "/dev/{device} is held by {holder} ({name})")
            }
            Holder::Stacked { device, holder, name: None } => write!(f, "/dev/{device} is held by {holder}"),
            Holder::Process { device, pid, command } => {
                write!(f, "/dev/{device} is open in process {pid} ({command})")
            }
        }
    }
}

/// Everything holding `/dev/nbd{index}` or its partitions.
pub fn holders(index: u32, roots: &SystemRoots) -> Vec<Holder> {
    let disk = format!("nbd{index}");
    let mut devices = vec![disk.clone()];
    devices.extend(partitions(&roots.sys.join("block").join(&disk), &disk));
    let mounts = read_mountinfo(&roots.proc.join("self/mountinfo"));
    let mut found = Vec::new();
    for device in &devices {
        let dir = device_dir(&roots.sys, &disk, device);
        if let Some(dev) = read_trimmed(&dir.join("dev")) {
            for m in mounts.iter().filter(|m| m.dev == dev) {
                let (mount_point, fs_type) = (m.mount_point.clone(), m.fs_type.clone());
                found.push(Holder::Mount { device: device.clone(), mount_point, fs_type });
            }
        }
        for holder in dir_names(&dir.join("holders")) {
            let name = read_trimmed(&roots.sys.join("block").join(&holder).join("dm/name"));
            found.push(Holder::Stacked { device: device.clone(), holder, name });
        }
    }
    found.extend(processes(&devices, roots));
    found
}

/// One line for an operator, or `None` when nothing holds the device.
pub fn describe_holders(index: u32, roots: &SystemRoots) -> Option<String> {
    let found = holders(index, roots);
    if found.is_empty() {
        return None;
    }
    Some(found.iter().map(Holder::to_string).collect::<Vec<_>>().join("; "))
}

/// `nbd0p1`, ... : the partition directories inside the disk's sysfs directory.
fn partitions(disk_dir: &Path, disk: &str) -> Vec<String> {
    let prefix = format!("{disk}p");
    dir_names(disk_dir).into_iter().filter(|n| n.starts_with(&prefix)).collect()
}

fn device_dir(sys: &Path, disk: &str, device: &str) -> PathBuf {
    let disk_dir = sys.join("block").join(disk);
    if device == disk {
        disk_dir
    } else {
        disk_dir.join(device)
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    names
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

struct MountEntry {
    /// `major:minor` of the mounted device.
    dev: String,
    mount_point: String,
    fs_type: String,
}

/// Mounts by device number: mountinfo names the device as `major:minor`, which also catches
/// mounts made through /dev/disk/by-* links.
fn read_mountinfo(path: &Path) -> Vec<MountEntry> {
    let Ok(text) = fs::read_to_string(path) else { return Vec::new() };
    text.lines().filter_map(parse_mountinfo_line).collect()
}

/// `36 35 43:0 / /srv/nfs rw,noatime shared:1 - xfs /dev/nbd0 rw`
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let dev = fields.get(2)?.to_string();
    let mount_point = unescape_octal(fields.get(4)?);
    let fs_type = after.split(' ').next()?.to_string();
    Some(MountEntry { dev, mount_point, fs_type })
}

/// Undoes the kernel's `\040`-style escaping of spaces, tabs, newlines and backslashes.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Processes with a descriptor on one of `devices` (unreadable processes are skipped: without
/// privileges only our own are visible).
fn processes(devices: &[String], roots: &SystemRoots) -> Vec<Holder> {
    let targets: Vec<(PathBuf, &String)> = devices.iter().map(|d| (Path::new("/dev").join(d), d)).collect();
    let mut found = Vec::new();
    for pid in dir_names(&roots.proc).iter().filter_map(|n| n.parse::<u32>().ok()) {
        if Some(pid) == roots.ignore_pid {
            continue;
        }
        let proc_dir = roots.proc.join(pid.to_string());
        let mut open: Vec<&String> = dir_names(&proc_dir.join("fd"))
            .iter()
            .filter_map(|fd| fs::read_link(proc_dir.join("fd").join(fd)).ok())
            .filter_map(|target| targets.iter().find(|(path, _)| *path == target).map(|(_, d)| *d))
            .collect();
        open.sort();
        open.dedup();
        let command = read_trimmed(&proc_dir.join("comm")).unwrap_or_else(|| "?".into());
        for device in open {
            found.push(Holder::Process { device: device.clone(), pid, command: command.clone() });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Fake {
        dir: tempfile::TempDir,
    }

    impl Fake {
        fn new() -> Self {
            let fake = Self { dir: tempfile::tempdir().unwrap() };
            fake.file("sys/block/nbd0/dev", "43:0\n");
            fake.file("proc/self/mountinfo", "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n");
            fake
        }

        fn file(&self, rel: &str, contents: &str) {
            let path = self.dir.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }

        fn roots(&self) -> SystemRoots {
            SystemRoots {
                sys: self.dir.path().join("sys"),
                proc: self.dir.path().join("proc"),
                ignore_pid: Some(1),
            }
        }
    }

    #[test]
    fn an_idle_device_has_no_holders() {
        let fake = Fake::new();
        assert_eq!(describe_holders(0, &fake.roots()), None);
    }

    #[test]
    fn a_mount_is_found_by_device_number() {
        let fake = Fake::new();
        fake.file(
            "proc/self/mountinfo",
            "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
             40 22 43:0 / /srv/nfs rw,noatime shared:7 - xfs /dev/disk/by-id/x rw,attr2\n",
        );
        assert_eq!(describe_holders(0, &fake.roots()).unwrap(), "/dev/nbd0 is mounted at /srv/nfs (xfs)");
    }

    #[test]
    fn a_mounted_partition_with_a_space_in_its_path() {
        let fake = Fake::new();
        fake.file("sys/block/nbd0/nbd0p1/dev", "43:1\n");
        fake.file("proc/self/mountinfo", "40 22 43:1 / /mnt/my\\040data rw - ext4 /dev/nbd0p1 rw\n");
        let found = holders(0, &fake.roots());
        assert_eq!(
            found,
            [Holder::Mount {
                device: "nbd0p1".into(),
                mount_point: "/mnt/my data".into(),
                fs_type: "ext4".into()
            }]
        );
    }

    #[test]
    fn a_stacked_lvm_volume_is_named() {
        let fake = Fake::new();
        fs::create_dir_all(fake.dir.path().join("sys/block/nbd0/holders/dm-0")).unwrap();
        fake.file("sys/block/dm-0/dm/name", "vg0-data\n");
        assert_eq!(describe_holders(0, &fake.roots()).unwrap(), "/dev/nbd0 is held by dm-0 (vg0-data)");
    }

    #[test]
    fn processes_with_the_device_open_are_listed_except_ours() {
        let fake = Fake::new();
        for pid in ["1", "4242"] {
            let fd_dir = fake.dir.path().join(format!("proc/{pid}/fd"));
            fs::create_dir_all(&fd_dir).unwrap();
            symlink("/dev/nbd0", fd_dir.join("3")).unwrap();
            symlink("/dev/nbd0", fd_dir.join("4")).unwrap();
            symlink("/dev/null", fd_dir.join("0")).unwrap();
        }
        fake.file("proc/4242/comm", "qemu-system-x86\n");
        let found = holders(0, &fake.roots());
        assert_eq!(
            found,
            [Holder::Process { device: "nbd0".into(), pid: 4242, command: "qemu-system-x86".into() }]
        );
        assert_eq!(found[0].to_string(), "/dev/nbd0 is open in process 4242 (qemu-system-x86)");
    }

    #[test]
    fn several_holders_join_into_one_line() {
        let fake = Fake::new();
        fake.file("proc/self/mountinfo", "40 22 43:0 / /srv rw - xfs /dev/nbd0 rw\n");
        fs::create_dir_all(fake.dir.path().join("sys/block/nbd0/holders/md0")).unwrap();
        assert_eq!(
            describe_holders(0, &fake.roots()).unwrap(),
            "/dev/nbd0 is mounted at /srv (xfs); /dev/nbd0 is held by md0"
        );
    }
}
