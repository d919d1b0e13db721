//! The glue between an export and a kernel device: the connections (socketpairs: one end for
//! the kernel, one for our server) and what the kernel is told about the export.

use std::io;
use std::os::fd::OwnedFd;

use rustix::net::{AddressFamily, SocketFlags, SocketType};

use super::nbd::DeviceConfig;
use crate::nbd::Export;

/// Both ends of one connection to a kernel device.
pub struct KernelConnection {
    /// Handed to the kernel (CONNECT / RECONFIGURE / NBD_SET_SOCK); may be closed afterwards.
    pub kernel: OwnedFd,
    /// Served by our NBD server in the transmission phase, without handshake.
    pub server: OwnedFd,
}

/// `count` connected unix stream socketpairs.
pub fn kernel_connections(count: usize) -> io::Result<Vec<KernelConnection>> {
    (0..count)
        .map(|_| {
            let (kernel, server) =
                rustix::net::socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
            Ok(KernelConnection { kernel, server })
        })
        .collect()
}

impl DeviceConfig {
    /// The device for `export`: its size, its flags as a handshake without structured replies
    /// would advertise them (the kernel reads simple replies only), and a logical block size
    /// of at least 512. Timeouts are left to the caller.
    pub fn for_export(export: &Export, index: Option<u32>, backend: String) -> Self {
        let (min_block, _, _) = export.block_sizes();
        DeviceConfig {
            index,
            size_bytes: export.size(),
            block_size: min_block.max(512),
            server_flags: export.transmission_flags(false),
            io_timeout: None,
            dead_conn_timeout: None,
            backend,
            client_flags: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rdbd_protocol::nbd::export_flags as ef;

    use crate::storage::{FileDevice, OpenOptions};

    #[test]
    fn socketpairs_are_connected() {
        let mut pairs = kernel_connections(2).unwrap();
        let p = pairs.pop().unwrap();
        let (mut k, mut s) = (std::fs::File::from(p.kernel), std::fs::File::from(p.server));
        k.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(pairs.len(), 1);
    }

    #[test]
    fn device_config_follows_the_export() {
        let dir = tempfile::tempdir().unwrap();
        let opts = OpenOptions { size: Some(16 << 20), ..Default::default() };
        let device = Arc::new(FileDevice::open_file(&dir.path().join("d.img"), &opts).unwrap());
        let export = Export { name: "r0".into(), description: String::new(), device };
        let config = DeviceConfig::for_export(&export, Some(2), "rdbd:r0".into());
        assert_eq!(config.size_bytes, 16 << 20);
        assert!(config.block_size >= 512);
        assert!(config.validate().is_ok());
        assert_ne!(config.server_flags & ef::SEND_FLUSH, 0);
        assert_ne!(config.server_flags & ef::CAN_MULTI_CONN, 0, "several sockets need it");
        assert_eq!(config.server_flags & ef::SEND_DF, 0, "the kernel reads simple replies only");
    }
}
