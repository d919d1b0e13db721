//! What can go wrong attaching a socket to a kernel NBD device, worded for the operator.

use std::fmt;
use std::io;
use std::path::PathBuf;

use super::netlink::Malformed;

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    ResolveFamily,
    Connect,
    Disconnect,
    Reconfigure,
    Status,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::ResolveFamily => "resolving the nbd netlink family",
            Op::Connect => "NBD_CMD_CONNECT",
            Op::Disconnect => "NBD_CMD_DISCONNECT",
            Op::Reconfigure => "NBD_CMD_RECONFIGURE",
            Op::Status => "NBD_CMD_STATUS",
        })
    }
}

/// `/dev/nbdN`, or "an nbd device" when the kernel was to choose one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceName(pub Option<u32>);

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(i) => write!(f, "/dev/nbd{i}"),
            None => f.write_str("an nbd device"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the nbd module is not loaded: modprobe nbd")]
    ModuleNotLoaded,
    #[error("cannot open a generic netlink socket: {0}")]
    Socket(io::Error),
    #[error("{op}: permission denied (attaching an nbd device needs CAP_SYS_ADMIN)")]
    PermissionDenied { op: Op },
    #[error("{op}: {device} is in use (already connected to a server)")]
    Busy { op: Op, device: DeviceName },
    #[error("{op} on {device} refused as invalid: {hint}")]
    Invalid { op: Op, device: DeviceName, hint: &'static str },
    #[error("{op} on {device}: the device has no dead connection to replace")]
    NoDeadConnection { op: Op, device: DeviceName },
    #[error("{op} on {device} failed: {error}")]
    Kernel { op: Op, device: DeviceName, error: io::Error },
    #[error("{op}: malformed reply from the kernel: {what}")]
    BadReply { op: Op, what: Malformed },
    #[error("invalid geometry: {0}")]
    Geometry(&'static str),
    #[error("the ioctl interface takes exactly one socket, got {0}")]
    IoctlSocketCount(usize),
    #[error("cannot open {path}: {error}")]
    OpenDevice { path: PathBuf, error: io::Error },
    #[error("{call} on {path}: {error}")]
    Ioctl { call: &'static str, path: PathBuf, error: io::Error },
    #[error("the NBD_DO_IT thread of {0} died")]
    IoctlThread(PathBuf),
    #[error("cannot start the NBD_DO_IT thread: {0}")]
    SpawnThread(io::Error),
}

impl AttachError {
    /// Maps a kernel refusal (positive errno) of `op` on `device` to what it means there.
    pub fn from_errno(op: Op, device: DeviceName, errno: i32) -> Self {
        match (op, errno) {
            (Op::ResolveFamily, libc::ENOENT) => AttachError::ModuleNotLoaded,
            (_, libc::EPERM | libc::EACCES) => AttachError::PermissionDenied { op },
            (_, libc::EBUSY) => AttachError::Busy { op, device },
            (Op::Reconfigure, libc::ENOSPC) => AttachError::NoDeadConnection { op, device },
            (_, libc::EINVAL) => AttachError::Invalid { op, device, hint: invalid_hint(op) },
            _ => AttachError::Kernel { op, device, error: io::Error::from_raw_os_error(errno) },
        }
    }
}

/// What the kernel's nbd driver answers EINVAL for, per command (drivers/block/nbd.c).
fn invalid_hint(op: Op) -> &'static str {
    match op {
        Op::Connect => {
            "bad size or block size, a socket that is not a stream socket, or more than one \
             socket without NBD_FLAG_CAN_MULTI_CONN"
        }
        Op::Reconfigure => "the device is not connected, or the backend identifier differs from the original",
        Op::Disconnect | Op::Status => "no such device",
        Op::ResolveFamily => "bad family request",
    }
}
