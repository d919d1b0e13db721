//! The NBD service of a Primary: the replicated device exported under the resource's name, on
//! the node's `nbd-listen` address for userspace clients and, with `nbd-device`, to the kernel
//! as `/dev/nbdX`. A Secondary runs none, so nothing can reach data that replication may change
//! under it.
//!
//! The kernel path: socket pairs whose one end goes to the kernel's nbd driver (generic
//! netlink, or the ioctl interface where the netlink family is missing) and whose other end is
//! served like any NBD connection, but already in the transmission phase: the kernel speaks no
//! handshake and reads simple replies only.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{Node, NodeError};
use crate::config::NbdDevice;
use crate::kernel::{self, ioctl, AttachError, DeviceConfig, NbdNetlink, SystemRoots};
use crate::nbd::{Export, Exports, Listener, Negotiated, Server, Shards};
use crate::storage::BlockDevice;

/// Connections handed to the kernel: its requests spread over them (the export says
/// CAN_MULTI_CONN), and a second one lets reads go on while a flush is outstanding.
const KERNEL_CONNECTIONS: usize = 2;
/// How long the kernel keeps the device (and its I/O) waiting for a restarted daemon.
const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(60);

/// The kernel's device, attached.
enum KernelDevice {
    Netlink { index: u32 },
    Ioctl(ioctl::IoctlAttachment),
}

impl KernelDevice {
    fn path(&self) -> PathBuf {
        match self {
            KernelDevice::Netlink { index } => PathBuf::from(format!("/dev/nbd{index}")),
            KernelDevice::Ioctl(a) => a.path().to_owned(),
        }
    }

    /// The N of /dev/nbdN.
    fn index(&self) -> Option<u32> {
        match self {
            KernelDevice::Netlink { index } => Some(*index),
            KernelDevice::Ioctl(a) => device_index(a.path()),
        }
    }
}

/// N of a `/dev/nbdN` path.
fn device_index(path: &std::path::Path) -> Option<u32> {
    path.file_name()?.to_str()?.strip_prefix("nbd")?.parse().ok()
}

pub struct NbdService {
    server: Arc<Server>,
    serving: Option<JoinHandle<()>>,
    kernel: Option<KernelDevice>,
    /// Connections handed to the kernel (not clients in the sense of `secondary`'s check).
    kernel_sessions: usize,
}

impl NbdService {
    /// Starts serving on the node's `nbd-listen` address and attaches `nbd-device`; `None` when
    /// neither is configured.
    pub fn start(node: &Node, shards: Arc<Shards>) -> Result<Option<Self>, NodeError> {
        let me = node.me();
        if me.nbd_listen.is_none() && me.nbd_device.is_none() {
            return Ok(None);
        }
        let device: Arc<dyn BlockDevice> = node.device().clone();
        let name = node.config().name.clone();
        let description = format!("rdbd resource {name} on node {}", me.name);
        let export = Arc::new(Export { name, description, device });
        let server = Arc::new(Server::new(Exports::new(vec![export.clone()]), shards));
        let mut service = Self { server, serving: None, kernel: None, kernel_sessions: 0 };
        if let Some(addr) = me.nbd_listen.clone() {
            let std_listener = std::net::TcpListener::bind(&addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|error| NodeError::NbdListen { addr: addr.clone(), error })?;
            let listener = TcpListener::from_std(std_listener)
                .map_err(|error| NodeError::NbdListen { addr: addr.clone(), error })?;
            let server = service.server.clone();
            service.serving =
                Some(tokio::spawn(async move { server.serve(vec![Listener::Tcp(listener)]).await }));
            info!(%addr, "serving NBD");
        }
        if let Some(wanted) = &me.nbd_device {
            let backend = format!("rdbd:{}:{}", node.config().name, me.name);
            match attach_kernel(&service.server, &export, wanted, backend) {
                Ok((device, sessions)) => {
                    let interface =
                        if matches!(device, KernelDevice::Ioctl(_)) { "ioctl" } else { "netlink" };
                    info!(device = %device.path().display(), interface, "kernel device attached");
                    service.kernel = Some(device);
                    service.kernel_sessions = sessions;
                }
                Err(e) => {
                    service.server.shutdown_token().cancel();
                    return Err(NodeError::Refused(format!("cannot attach the kernel NBD device: {e}")));
                }
            }
        }
        Ok(Some(service))
    }

    /// NBD clients connected now, not counting the kernel's own connections (whether the
    /// kernel device is in use is [`NbdService::device_holders`]).
    pub fn clients(&self) -> usize {
        self.server.active_connections().saturating_sub(self.kernel_sessions)
    }

    /// The kernel device, as `/dev/nbdN`.
    pub fn kernel_device(&self) -> Option<String> {
        self.kernel.as_ref().map(|d| d.path().display().to_string())
    }

    /// Who holds the kernel device open (a mount, LVM, a process), as one line; `None` when
    /// nobody does or there is no kernel device.
    pub fn device_holders(&self) -> Option<String> {
        let index = self.kernel.as_ref()?.index()?;
        kernel::describe_holders(index, &SystemRoots::default())
    }

    /// Detaches the kernel device, stops accepting, and waits for the connections to finish
    /// their requests.
    pub async fn stop(self) {
        if let Some(device) = &self.kernel {
            let path = device.path();
            let detached = match device {
                KernelDevice::Netlink { index } => {
                    NbdNetlink::open().and_then(|mut nl| nl.disconnect(*index))
                }
                KernelDevice::Ioctl(a) => a.disconnect(),
            };
            match detached {
                Ok(()) => info!(device = %path.display(), "kernel device detached"),
                Err(e) => warn!(device = %path.display(), "detaching the kernel device failed: {e}"),
            }
        }
        self.server.shutdown_token().cancel();
        if let Some(serving) = self.serving {
            let _ = serving.await;
        }
        self.server.wait_idle().await;
        if let Some(KernelDevice::Ioctl(a)) = self.kernel {
            // Its NBD_DO_IT thread returns once the kernel let go of the sockets.
            if let Err(e) = tokio::task::spawn_blocking(move || a.wait()).await.unwrap_or(Ok(())) {
                warn!("the kernel device's ioctl thread ended with an error: {e}");
            }
        }
        info!("stopped serving NBD");
    }
}

/// Hands socket pairs to the kernel's nbd driver and serves their other ends; the device and
/// how many connections it has.
/// Set to 0 to attach with the ioctl interface even where the netlink family exists.
const NETLINK_ENV: &str = "RDBD_NBD_NETLINK";

fn attach_kernel(
    server: &Server,
    export: &Arc<Export>,
    wanted: &NbdDevice,
    backend: String,
) -> Result<(KernelDevice, usize), AttachError> {
    let index = match wanted {
        NbdDevice::Auto => None,
        NbdDevice::Path(path) => device_index(path),
    };
    let config = DeviceConfig {
        dead_conn_timeout: Some(DEAD_CONN_TIMEOUT),
        ..DeviceConfig::for_export(export, index, backend)
    };
    let attach_netlink = || -> Result<u32, AttachError> {
        let pairs = kernel::kernel_connections(KERNEL_CONNECTIONS).map_err(AttachError::Socket)?;
        let mut netlink = NbdNetlink::open()?;
        let kernel_ends: Vec<_> = pairs.iter().map(|p| &p.kernel).collect();
        // A device our previous daemon left behind (killed, its I/O waiting in the kernel) is
        // taken back, so what was mounted on it stays mounted and its I/O goes on.
        let left_behind =
            ioctl::device_with_backend(std::path::Path::new("/sys/block"), &config.backend).ok().flatten();
        let index = match left_behind {
            Some(index) => {
                netlink.reconfigure(index, &kernel_ends, &config.backend, config.dead_conn_timeout)?;
                info!(device = index, "took back the kernel device a previous daemon left");
                index
            }
            None => netlink.connect(&kernel_ends, &config)?,
        };
        for pair in pairs {
            server.spawn_session(pair.server, Negotiated::without_handshake(export.clone()));
        }
        Ok(index)
    };
    // RDBD_NBD_NETLINK=0 asks for the ioctl interface, as nbd-client's -nonetlink does.
    let netlink = if std::env::var(NETLINK_ENV).as_deref() == Ok("0") {
        info!("{NETLINK_ENV}=0: attaching with the ioctl interface");
        Err(AttachError::ModuleNotLoaded)
    } else {
        attach_netlink()
    };
    match netlink {
        Ok(index) => Ok((KernelDevice::Netlink { index }, KERNEL_CONNECTIONS)),
        // Kernels without the netlink family still have the ioctl interface (one socket).
        Err(AttachError::ModuleNotLoaded) => {
            let path = match index {
                Some(n) => PathBuf::from(format!("/dev/nbd{n}")),
                None => match ioctl::first_free_device(std::path::Path::new("/sys/block")) {
                    Ok(Some(n)) => PathBuf::from(format!("/dev/nbd{n}")),
                    _ => return Err(AttachError::ModuleNotLoaded),
                },
            };
            if !path.exists() {
                return Err(AttachError::ModuleNotLoaded);
            }
            let mut pairs = kernel::kernel_connections(1).map_err(AttachError::Socket)?;
            let pair = pairs.pop().expect("one connection asked for");
            let attachment = ioctl::attach(&path, vec![pair.kernel], &config)?;
            server.spawn_session(pair.server, Negotiated::without_handshake(export.clone()));
            Ok((KernelDevice::Ioctl(attachment), 1))
        }
        Err(e) => Err(e),
    }
}
