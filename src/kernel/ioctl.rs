//! The kernel's NBD client driven by ioctls on `/dev/nbdN`: the fallback for kernels whose nbd
//! driver has no netlink interface. One socket only, and a thread sits in NBD_DO_IT for as long
//! as the device is connected.
//!
//! Request numbers are `_IO(0xab, n)` from the Linux UAPI header `linux/nbd.h`; every argument
//! is passed by value. The order of calls follows nbd-client's setup.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use super::error::AttachError;
use super::nbd::DeviceConfig;

const fn nbd_io(n: u64) -> u64 {
    (0xab << 8) | n
}

pub const NBD_SET_SOCK: u64 = nbd_io(0);
pub const NBD_SET_BLKSIZE: u64 = nbd_io(1);
pub const NBD_DO_IT: u64 = nbd_io(3);
pub const NBD_CLEAR_SOCK: u64 = nbd_io(4);
pub const NBD_SET_SIZE_BLOCKS: u64 = nbd_io(7);
pub const NBD_DISCONNECT: u64 = nbd_io(8);
pub const NBD_SET_TIMEOUT: u64 = nbd_io(9);
pub const NBD_SET_FLAGS: u64 = nbd_io(10);

/// One step of the setup: the ioctl's name, request and argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub name: &'static str,
    pub request: u64,
    pub arg: u64,
}

/// The ioctls that configure a device for `socket_fd`, in order (NBD_DO_IT not included).
pub fn setup_calls(config: &DeviceConfig, socket_fd: u64) -> Vec<Call> {
    let call = |name, request, arg| Call { name, request, arg };
    let mut calls = vec![
        call("NBD_SET_BLKSIZE", NBD_SET_BLKSIZE, config.block_size.into()),
        call("NBD_SET_SIZE_BLOCKS", NBD_SET_SIZE_BLOCKS, config.size_bytes / u64::from(config.block_size)),
        // A device left half-configured by a crashed predecessor starts clean.
        call("NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0),
        call("NBD_SET_FLAGS", NBD_SET_FLAGS, config.server_flags.into()),
    ];
    if let Some(t) = config.io_timeout {
        calls.push(call("NBD_SET_TIMEOUT", NBD_SET_TIMEOUT, t.as_secs()));
    }
    calls.push(call("NBD_SET_SOCK", NBD_SET_SOCK, socket_fd));
    calls
}

fn ioctl(file: &File, request: u64, arg: u64) -> io::Result<()> {
    // SAFETY: nbd ioctls take their argument by value; none reads or writes user memory.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg as libc::c_ulong) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_error(call: &'static str, path: &Path, error: io::Error) -> AttachError {
    match error.raw_os_error() {
        Some(libc::EBUSY) => AttachError::Ioctl {
            call,
            path: path.to_owned(),
            error: io::Error::other("the device is in use"),
        },
        _ => AttachError::Ioctl { call, path: path.to_owned(), error },
    }
}

/// A device connected through ioctls; dropping it does not disconnect (call
/// [`IoctlAttachment::disconnect`]).
pub struct IoctlAttachment {
    path: PathBuf,
    device: Arc<File>,
    thread: Option<JoinHandle<Result<(), AttachError>>>,
}

/// Configures the device at `path` for `sockets` (exactly one) and starts the thread that
/// keeps it connected. Returns once the device is set up.
pub fn attach(
    path: &Path,
    sockets: Vec<OwnedFd>,
    config: &DeviceConfig,
) -> Result<IoctlAttachment, AttachError> {
    config.validate()?;
    let [socket]: [OwnedFd; 1] =
        sockets.try_into().map_err(|s: Vec<_>| AttachError::IoctlSocketCount(s.len()))?;
    let device = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| AttachError::OpenDevice { path: path.to_owned(), error })?;
    let device = Arc::new(device);
    let calls = setup_calls(config, socket.as_raw_fd() as u64);
    let (ready_tx, ready_rx) = mpsc::channel();
    // Setup and NBD_DO_IT must run in one task: the kernel refuses NBD_SET_SOCK from a task
    // other than the one that started the setup.
    let thread = std::thread::Builder::new()
        .name("rdbd-nbd-do-it".into())
        .spawn({
            let (device, path) = (device.clone(), path.to_owned());
            move || {
                for c in &calls {
                    if let Err(e) = ioctl(&device, c.request, c.arg) {
                        let e = ioctl_error(c.name, &path, e);
                        let _ = ready_tx.send(Err(e));
                        return Ok(());
                    }
                }
                let _ = ready_tx.send(Ok(()));
                let served = ioctl(&device, NBD_DO_IT, 0).map_err(|e| ioctl_error("NBD_DO_IT", &path, e));
                let _ = ioctl(&device, NBD_CLEAR_SOCK, 0);
                drop(socket);
                served
            }
        })
        .map_err(AttachError::SpawnThread)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(IoctlAttachment { path: path.to_owned(), device, thread: Some(thread) }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(AttachError::IoctlThread(path.to_owned())),
    }
}

impl IoctlAttachment {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// NBD_DISCONNECT: the kernel sends NBD_CMD_DISC and NBD_DO_IT returns.
    pub fn disconnect(&self) -> Result<(), AttachError> {
        ioctl(&self.device, NBD_DISCONNECT, 0).map_err(|e| ioctl_error("NBD_DISCONNECT", &self.path, e))
    }

    /// Waits until the device is disconnected (by us, the kernel or an administrator).
    pub fn wait(mut self) -> Result<(), AttachError> {
        let thread = self.thread.take().expect("joined once");
        thread.join().map_err(|_| AttachError::IoctlThread(self.path.clone()))?
    }
}

/// The `nbdN` devices under `sys_block` (`/sys/block` outside of tests), as (N, sysfs dir).
fn nbd_devices(sys_block: &Path) -> io::Result<Vec<(u32, std::path::PathBuf)>> {
    let mut devices = Vec::new();
    for entry in std::fs::read_dir(sys_block)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(index) = name.to_str().and_then(|n| n.strip_prefix("nbd")).and_then(|n| n.parse().ok()) {
            devices.push((index, entry.path()));
        }
    }
    devices.sort_unstable();
    Ok(devices)
}

/// The first `/dev/nbdN` that no client has connected: sysfs shows `pid` only for a connected
/// device (the check nbd-client makes).
pub fn first_free_device(sys_block: &Path) -> io::Result<Option<u32>> {
    Ok(nbd_devices(sys_block)?.into_iter().find(|(_, dir)| !dir.join("pid").exists()).map(|(n, _)| n))
}

/// The configured device whose backend identifier is `backend`: one a daemon of ours left
/// behind when it died, which the kernel keeps (its I/O waiting) for the dead-connection timeout
/// and which a new daemon takes back with RECONFIGURE instead of attaching another.
pub fn device_with_backend(sys_block: &Path, backend: &str) -> io::Result<Option<u32>> {
    Ok(nbd_devices(sys_block)?
        .into_iter()
        .find(|(_, dir)| {
            dir.join("pid").exists()
                && std::fs::read_to_string(dir.join("backend")).is_ok_and(|b| b.trim_end() == backend)
        })
        .map(|(n, _)| n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_device_left_behind_is_found_by_its_backend() {
        let sys = tempfile::tempdir().unwrap();
        for (n, backend, connected) in
            [(0, "rdbd:r1:alpha", true), (1, "rdbd:r0:alpha", false), (2, "rdbd:r0:alpha", true)]
        {
            let dir = sys.path().join(format!("nbd{n}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("backend"), format!("{backend}\n")).unwrap();
            if connected {
                std::fs::write(dir.join("pid"), "42\n").unwrap();
            }
        }
        std::fs::create_dir_all(sys.path().join("loop0")).unwrap();
        assert_eq!(device_with_backend(sys.path(), "rdbd:r0:alpha").unwrap(), Some(2), "configured, ours");
        assert_eq!(device_with_backend(sys.path(), "rdbd:r9:alpha").unwrap(), None);
        assert_eq!(first_free_device(sys.path()).unwrap(), Some(1));
    }

    fn config() -> DeviceConfig {
        DeviceConfig {
            index: Some(0),
            size_bytes: 8 << 20,
            block_size: 4096,
            server_flags: 0x5,
            io_timeout: Some(Duration::from_secs(30)),
            dead_conn_timeout: None,
            backend: "rdbd:r0".into(),
            client_flags: 0,
        }
    }

    #[test]
    fn request_numbers_match_the_uapi_header() {
        assert_eq!(NBD_SET_SOCK, 0xab00);
        assert_eq!(NBD_DO_IT, 0xab03);
        assert_eq!(NBD_CLEAR_SOCK, 0xab04);
        assert_eq!(NBD_SET_SIZE_BLOCKS, 0xab07);
        assert_eq!(NBD_DISCONNECT, 0xab08);
        assert_eq!(NBD_SET_FLAGS, 0xab0a);
    }

    #[test]
    fn setup_sets_geometry_before_the_socket() {
        let calls = setup_calls(&config(), 9);
        let names: Vec<_> = calls.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "NBD_SET_BLKSIZE",
                "NBD_SET_SIZE_BLOCKS",
                "NBD_CLEAR_SOCK",
                "NBD_SET_FLAGS",
                "NBD_SET_TIMEOUT",
                "NBD_SET_SOCK"
            ]
        );
        assert_eq!(calls[1].arg, 2048, "size in blocks");
        assert_eq!(calls[5].arg, 9, "the socket's fd");
    }

    #[test]
    fn more_than_one_socket_is_refused() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = attach(Path::new("/nonexistent/nbd0"), vec![a.into(), b.into()], &config()).err().unwrap();
        assert!(matches!(err, AttachError::IoctlSocketCount(2)), "{err}");
    }

    #[test]
    fn a_missing_device_node_is_an_open_error() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = attach(Path::new("/nonexistent/nbd0"), vec![a.into()], &config()).err().unwrap();
        assert!(matches!(err, AttachError::OpenDevice { .. }), "{err}");
    }

    #[test]
    fn free_device_is_the_lowest_without_pid() {
        let sys = tempfile::tempdir().unwrap();
        for n in ["nbd0", "nbd1", "nbd10", "nbd2", "loop0"] {
            std::fs::create_dir(sys.path().join(n)).unwrap();
        }
        std::fs::write(sys.path().join("nbd0/pid"), "123\n").unwrap();
        std::fs::write(sys.path().join("nbd1/pid"), "124\n").unwrap();
        assert_eq!(first_free_device(sys.path()).unwrap(), Some(2));
        std::fs::write(sys.path().join("nbd2/pid"), "125\n").unwrap();
        assert_eq!(first_free_device(sys.path()).unwrap(), Some(10));
    }
}
