//! The kernel's NBD client driven over generic netlink (family "nbd"): connect a device to our
//! sockets, take it back after a restart, disconnect it, and ask for its state.
//!
//! Commands and attributes are from the Linux UAPI header `linux/nbd-netlink.h`; the attribute
//! types (u32 index, u64 sizes/flags/timeouts, nested socket list, string backend) from the
//! policies in `drivers/block/nbd.c`.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use super::error::{AttachError, DeviceName, Op};
use super::netlink::{self, parse_attrs, Attr, ExchangeError, GenlRequest, GenlSocket, OwnedMessage};

pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
pub const NBD_GENL_VERSION: u8 = 1;

pub mod cmd {
    pub const CONNECT: u8 = 1;
    pub const DISCONNECT: u8 = 2;
    pub const RECONFIGURE: u8 = 3;
    pub const LINK_DEAD: u8 = 4;
    pub const STATUS: u8 = 5;
}

pub mod attr {
    pub const INDEX: u16 = 1;
    pub const SIZE_BYTES: u16 = 2;
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    pub const TIMEOUT: u16 = 4;
    pub const SERVER_FLAGS: u16 = 5;
    pub const CLIENT_FLAGS: u16 = 6;
    pub const SOCKETS: u16 = 7;
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    pub const DEVICE_LIST: u16 = 9;
    pub const BACKEND_IDENTIFIER: u16 = 10;
}

/// Inside NBD_ATTR_SOCKETS: one NBD_SOCK_ITEM per connection, holding NBD_SOCK_FD (u32).
pub const NBD_SOCK_ITEM: u16 = 1;
pub const NBD_SOCK_FD: u16 = 1;
/// Inside NBD_ATTR_DEVICE_LIST: NBD_DEVICE_ITEM{NBD_DEVICE_INDEX u32, NBD_DEVICE_CONNECTED u8}.
pub const NBD_DEVICE_ITEM: u16 = 1;
pub const NBD_DEVICE_INDEX: u16 = 1;
pub const NBD_DEVICE_CONNECTED: u16 = 2;

/// NBD_ATTR_CLIENT_FLAGS bits.
pub mod client_flags {
    /// Delete the device when it is disconnected.
    pub const DESTROY_ON_DISCONNECT: u64 = 1 << 0;
    /// Disconnect when the last opener of /dev/nbdN closes it.
    pub const DISCONNECT_ON_CLOSE: u64 = 1 << 1;
}

/// What the kernel is told about the export when a device is connected (out of band: the
/// kernel's sockets see no handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// `/dev/nbdN` to use; `None` lets the kernel pick (or create) a free one.
    pub index: Option<u32>,
    pub size_bytes: u64,
    /// Logical block size: a power of two from 512 up to the page size (64 KiB on kernels
    /// with large block support). Changing it under a partition table truncates partitions.
    pub block_size: u32,
    /// The export's transmission flags (NBD_FLAG_*), as a handshake would have sent them.
    pub server_flags: u16,
    /// Per-request timeout; `None` keeps the kernel's default (30 s). With one socket, zero
    /// makes the kernel only warn about stuck requests.
    pub io_timeout: Option<Duration>,
    /// How long I/O waits for a RECONFIGURE once every socket is dead (a daemon restart),
    /// instead of failing at once.
    pub dead_conn_timeout: Option<Duration>,
    /// Shown in /sys/block/nbdN/backend; RECONFIGURE must present the same one.
    pub backend: String,
    /// NBD_ATTR_CLIENT_FLAGS ([`client_flags`]); 0 sends none.
    pub client_flags: u64,
}

impl DeviceConfig {
    /// The checks the kernel would make, done here so the error says which value is wrong.
    pub fn validate(&self) -> Result<(), AttachError> {
        let bs = self.block_size;
        if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
            return Err(AttachError::Geometry("the block size must be a power of two of at least 512"));
        }
        if self.size_bytes == 0 || self.size_bytes % u64::from(bs) != 0 {
            return Err(AttachError::Geometry("the size must be a non-zero multiple of the block size"));
        }
        Ok(())
    }
}

/// One device in a STATUS reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    pub connected: bool,
}

/// NBD_CMD_CONNECT: the device, then the sockets the kernel will use (our fd numbers: the
/// kernel looks them up in our descriptor table and takes its own references).
pub fn encode_connect(family: u16, seq: u32, config: &DeviceConfig, socket_fds: &[u32]) -> Vec<u8> {
    let mut req = GenlRequest::new(family, cmd::CONNECT, NBD_GENL_VERSION, seq);
    if let Some(index) = config.index {
        req.put_u32(attr::INDEX, index);
    }
    req.put_u64(attr::SIZE_BYTES, config.size_bytes);
    req.put_u64(attr::BLOCK_SIZE_BYTES, config.block_size.into());
    req.put_u64(attr::SERVER_FLAGS, config.server_flags.into());
    if let Some(t) = config.io_timeout {
        req.put_u64(attr::TIMEOUT, t.as_secs());
    }
    if let Some(t) = config.dead_conn_timeout {
        req.put_u64(attr::DEAD_CONN_TIMEOUT, t.as_secs());
    }
    if config.client_flags != 0 {
        req.put_u64(attr::CLIENT_FLAGS, config.client_flags);
    }
    req.put_str(attr::BACKEND_IDENTIFIER, &config.backend);
    put_sockets(&mut req, socket_fds);
    req.finish()
}

/// NBD_CMD_RECONFIGURE: new sockets take the place of dead ones.
pub fn encode_reconfigure(
    family: u16,
    seq: u32,
    index: u32,
    backend: &str,
    dead_conn_timeout: Option<Duration>,
    socket_fds: &[u32],
) -> Vec<u8> {
    let mut req = GenlRequest::new(family, cmd::RECONFIGURE, NBD_GENL_VERSION, seq);
    req.put_u32(attr::INDEX, index);
    if let Some(t) = dead_conn_timeout {
        req.put_u64(attr::DEAD_CONN_TIMEOUT, t.as_secs());
    }
    // A device connected with a backend identifier refuses a RECONFIGURE without it.
    req.put_str(attr::BACKEND_IDENTIFIER, backend);
    put_sockets(&mut req, socket_fds);
    req.finish()
}

pub fn encode_disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut req = GenlRequest::new(family, cmd::DISCONNECT, NBD_GENL_VERSION, seq);
    req.put_u32(attr::INDEX, index);
    req.finish()
}

/// NBD_CMD_STATUS of one device, or of all when `index` is `None`.
pub fn encode_status(family: u16, seq: u32, index: Option<u32>) -> Vec<u8> {
    let mut req = GenlRequest::new(family, cmd::STATUS, NBD_GENL_VERSION, seq);
    if let Some(index) = index {
        req.put_u32(attr::INDEX, index);
    }
    req.finish()
}

fn put_sockets(req: &mut GenlRequest, socket_fds: &[u32]) {
    req.begin_nested(attr::SOCKETS);
    for &fd in socket_fds {
        req.begin_nested(NBD_SOCK_ITEM);
        req.put_u32(NBD_SOCK_FD, fd);
        req.end_nested();
    }
    req.end_nested();
}

/// The device index in a CONNECT reply.
pub fn parse_connect_reply(messages: &[OwnedMessage]) -> Result<u32, netlink::Malformed> {
    for m in messages.iter().filter(|m| m.cmd == cmd::CONNECT) {
        if let Some(a) = parse_attrs(&m.attrs)?.iter().find(|a| a.ty == attr::INDEX) {
            return a.u32();
        }
    }
    Err(netlink::Malformed("no NBD_ATTR_INDEX in the CONNECT reply"))
}

/// The devices in a STATUS reply.
pub fn parse_status_reply(messages: &[OwnedMessage]) -> Result<Vec<DeviceStatus>, netlink::Malformed> {
    let mut devices = Vec::new();
    for m in messages.iter().filter(|m| m.cmd == cmd::STATUS) {
        for list in parse_attrs(&m.attrs)?.iter().filter(|a| a.ty == attr::DEVICE_LIST) {
            for item in list.nested()?.iter().filter(|a| a.ty == NBD_DEVICE_ITEM) {
                devices.push(parse_device_item(item)?);
            }
        }
    }
    Ok(devices)
}

fn parse_device_item(item: &Attr<'_>) -> Result<DeviceStatus, netlink::Malformed> {
    let (mut index, mut connected) = (None, false);
    for a in item.nested()? {
        match a.ty {
            NBD_DEVICE_INDEX => index = Some(a.u32()?),
            NBD_DEVICE_CONNECTED => connected = a.u8()? != 0,
            _ => {}
        }
    }
    let index = index.ok_or(netlink::Malformed("device item without an index"))?;
    Ok(DeviceStatus { index, connected })
}

/// A generic netlink socket with the nbd family resolved.
pub struct NbdNetlink {
    sock: GenlSocket,
    family: u16,
}

impl NbdNetlink {
    /// Opens a socket and resolves the family; [`AttachError::ModuleNotLoaded`] when the kernel
    /// has no nbd driver (then the ioctl path cannot work either).
    pub fn open() -> Result<Self, AttachError> {
        let mut sock = GenlSocket::open().map_err(AttachError::Socket)?;
        let seq = sock.next_seq();
        let request = netlink::encode_get_family(NBD_GENL_FAMILY_NAME, seq);
        let op = Op::ResolveFamily;
        let messages = sock.exchange(&request, seq).map_err(|e| exchange_error(op, None, e))?;
        let family =
            netlink::parse_family_id(&messages).map_err(|what| AttachError::BadReply { op, what })?;
        Ok(Self { sock, family })
    }

    /// Connects a device to `sockets` (more than one needs NBD_FLAG_CAN_MULTI_CONN in the
    /// server flags) and returns its index. Our descriptors may be closed afterwards.
    pub fn connect(&mut self, sockets: &[impl AsFd], config: &DeviceConfig) -> Result<u32, AttachError> {
        config.validate()?;
        let seq = self.sock.next_seq();
        let request = encode_connect(self.family, seq, config, &fd_numbers(sockets));
        let op = Op::Connect;
        let messages = self.sock.exchange(&request, seq).map_err(|e| exchange_error(op, config.index, e))?;
        parse_connect_reply(&messages).map_err(|what| AttachError::BadReply { op, what })
    }

    /// Gives a connected device new sockets in place of dead ones: how a restarted daemon takes
    /// its device back within the dead-connection timeout.
    pub fn reconfigure(
        &mut self,
        index: u32,
        sockets: &[impl AsFd],
        backend: &str,
        dead_conn_timeout: Option<Duration>,
    ) -> Result<(), AttachError> {
        let seq = self.sock.next_seq();
        let request =
            encode_reconfigure(self.family, seq, index, backend, dead_conn_timeout, &fd_numbers(sockets));
        self.sock.exchange(&request, seq).map_err(|e| exchange_error(Op::Reconfigure, Some(index), e))?;
        Ok(())
    }

    /// Disconnects the device: the kernel sends NBD_CMD_DISC on every socket and fails new I/O.
    pub fn disconnect(&mut self, index: u32) -> Result<(), AttachError> {
        let seq = self.sock.next_seq();
        let request = encode_disconnect(self.family, seq, index);
        self.sock.exchange(&request, seq).map_err(|e| exchange_error(Op::Disconnect, Some(index), e))?;
        Ok(())
    }

    /// The state of one device, or of every device when `index` is `None`.
    pub fn status(&mut self, index: Option<u32>) -> Result<Vec<DeviceStatus>, AttachError> {
        let seq = self.sock.next_seq();
        let request = encode_status(self.family, seq, index);
        let op = Op::Status;
        let messages = self.sock.exchange(&request, seq).map_err(|e| exchange_error(op, index, e))?;
        parse_status_reply(&messages).map_err(|what| AttachError::BadReply { op, what })
    }
}

fn fd_numbers(sockets: &[impl AsFd]) -> Vec<u32> {
    sockets.iter().map(|s| s.as_fd().as_raw_fd() as u32).collect()
}

fn exchange_error(op: Op, index: Option<u32>, e: ExchangeError) -> AttachError {
    match e {
        ExchangeError::Io(error) => AttachError::Socket(error),
        ExchangeError::Kernel(errno) => AttachError::from_errno(op, DeviceName(index), errno),
        ExchangeError::Malformed(what) => AttachError::BadReply { op, what },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netlink::{NLMSG_HDRLEN, NLM_F_ACK, NLM_F_REQUEST};

    fn config() -> DeviceConfig {
        DeviceConfig {
            index: Some(3),
            size_bytes: 1 << 30,
            block_size: 4096,
            server_flags: 0x0105,
            io_timeout: None,
            dead_conn_timeout: Some(Duration::from_secs(120)),
            backend: "rdbd:r0".into(),
            client_flags: 0,
        }
    }

    fn u32le(v: u32) -> [u8; 4] {
        v.to_le_bytes()
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn connect_with_two_sockets_is_byte_exact() {
        let bytes = encode_connect(0x1b, 9, &config(), &[5, 6]);
        let mut expected = Vec::new();
        expected.extend(u32le(116)); // nlmsg_len: 16 + 4 + 8 + 4 × 12 + 12 + 28
        expected.extend([0x1b, 0]); // family id
        expected.extend((NLM_F_REQUEST | NLM_F_ACK).to_le_bytes());
        expected.extend(u32le(9)); // seq
        expected.extend(u32le(0)); // port id
        expected.extend([cmd::CONNECT, 1, 0, 0]); // genlmsghdr
        expected.extend([8, 0, 1, 0]); // INDEX
        expected.extend(u32le(3));
        expected.extend([12, 0, 2, 0]); // SIZE_BYTES
        expected.extend((1u64 << 30).to_le_bytes());
        expected.extend([12, 0, 3, 0]); // BLOCK_SIZE_BYTES
        expected.extend(4096u64.to_le_bytes());
        expected.extend([12, 0, 5, 0]); // SERVER_FLAGS
        expected.extend(0x0105u64.to_le_bytes());
        expected.extend([12, 0, 8, 0]); // DEAD_CONN_TIMEOUT
        expected.extend(120u64.to_le_bytes());
        expected.extend([12, 0, 10, 0]); // BACKEND_IDENTIFIER "rdbd:r0\0"
        expected.extend(b"rdbd:r0\0");
        expected.extend([28, 0, 7, 0x80]); // SOCKETS, nested
        expected.extend([12, 0, 1, 0x80]); // SOCK_ITEM, nested
        expected.extend([8, 0, 1, 0]); // SOCK_FD
        expected.extend(u32le(5));
        expected.extend([12, 0, 1, 0x80]);
        expected.extend([8, 0, 1, 0]);
        expected.extend(u32le(6));
        assert_eq!(expected.len(), 116);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn connect_without_index_lets_the_kernel_choose() {
        let mut c = config();
        c.index = None;
        c.io_timeout = Some(Duration::from_secs(30));
        let bytes = encode_connect(0x1b, 1, &c, &[5]);
        let attrs = parse_attrs(&bytes[NLMSG_HDRLEN + 4..]).unwrap();
        let types: Vec<u16> = attrs.iter().map(|a| a.ty).collect();
        use attr::*;
        assert_eq!(
            types,
            [
                SIZE_BYTES,
                BLOCK_SIZE_BYTES,
                SERVER_FLAGS,
                TIMEOUT,
                DEAD_CONN_TIMEOUT,
                BACKEND_IDENTIFIER,
                SOCKETS
            ]
        );
        let sockets = attrs.last().unwrap().nested().unwrap();
        assert_eq!(sockets.len(), 1);
        assert_eq!(sockets[0].nested().unwrap()[0].u32(), Ok(5));
    }

    #[test]
    fn reconfigure_carries_index_backend_and_sockets() {
        let bytes = encode_reconfigure(0x1b, 2, 4, "rdbd:r0", None, &[7, 8]);
        assert_eq!(bytes[NLMSG_HDRLEN], cmd::RECONFIGURE);
        let attrs = parse_attrs(&bytes[NLMSG_HDRLEN + 4..]).unwrap();
        assert_eq!(attrs[0].ty, attr::INDEX);
        assert_eq!(attrs[0].u32(), Ok(4));
        assert_eq!(attrs[1].payload, b"rdbd:r0\0");
        assert_eq!(attrs[2].nested().unwrap().len(), 2);
    }

    fn attr_bytes(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        b.extend(ty.to_ne_bytes());
        b.extend(payload);
        b.resize((b.len() + 3) & !3, 0);
        b
    }

    #[test]
    fn connect_reply_gives_the_index() {
        let reply = OwnedMessage { cmd: cmd::CONNECT, attrs: attr_bytes(attr::INDEX, &11u32.to_ne_bytes()) };
        assert_eq!(parse_connect_reply(&[reply]), Ok(11));
        let empty = OwnedMessage { cmd: cmd::CONNECT, attrs: Vec::new() };
        assert!(parse_connect_reply(&[empty]).is_err());
    }

    #[test]
    fn status_reply_lists_devices() {
        let item = |index: u32, connected: u8| {
            let mut inner = attr_bytes(NBD_DEVICE_INDEX, &index.to_ne_bytes());
            inner.extend(attr_bytes(NBD_DEVICE_CONNECTED, &[connected]));
            attr_bytes(NBD_DEVICE_ITEM, &inner)
        };
        let mut list = item(0, 1);
        list.extend(item(1, 0));
        let reply = OwnedMessage { cmd: cmd::STATUS, attrs: attr_bytes(attr::DEVICE_LIST, &list) };
        assert_eq!(
            parse_status_reply(&[reply]).unwrap(),
            [DeviceStatus { index: 0, connected: true }, DeviceStatus { index: 1, connected: false }]
        );
    }

    #[test]
    fn kernel_errors_say_what_failed() {
        let dev = DeviceName(Some(0));
        let missing = AttachError::from_errno(Op::ResolveFamily, DeviceName(None), libc::ENOENT);
        assert!(matches!(missing, AttachError::ModuleNotLoaded));
        assert_eq!(missing.to_string(), "the nbd module is not loaded: modprobe nbd");
        let busy = AttachError::from_errno(Op::Connect, dev, libc::EBUSY);
        assert_eq!(busy.to_string(), "NBD_CMD_CONNECT: /dev/nbd0 is in use (already connected to a server)");
        let perm = AttachError::from_errno(Op::Connect, dev, libc::EPERM);
        assert!(perm.to_string().contains("CAP_SYS_ADMIN"), "{perm}");
        let again = AttachError::from_errno(Op::Reconfigure, dev, libc::EINVAL);
        assert!(again.to_string().contains("backend identifier"), "{again}");
        let full = AttachError::from_errno(Op::Reconfigure, dev, libc::ENOSPC);
        assert!(matches!(full, AttachError::NoDeadConnection { .. }));
        let other = AttachError::from_errno(Op::Disconnect, dev, libc::ENOMEM);
        assert!(matches!(other, AttachError::Kernel { .. }), "{other}");
    }

    #[test]
    fn geometry_is_checked_before_asking_the_kernel() {
        let mut c = config();
        assert!(c.validate().is_ok());
        c.block_size = 1000;
        assert!(matches!(c.validate(), Err(AttachError::Geometry(_))));
        c.block_size = 4096;
        c.size_bytes = 4097;
        assert!(matches!(c.validate(), Err(AttachError::Geometry(_))));
    }

    /// On a host without the nbd module this must fail with the module hint (and with a real
    /// driver it just resolves); either way it exercises the real socket path.
    #[test]
    fn open_reports_a_missing_module_clearly() {
        match NbdNetlink::open() {
            Ok(_) => eprintln!("nbd netlink family present"),
            Err(e @ (AttachError::ModuleNotLoaded | AttachError::Socket(_))) => eprintln!("{e}"),
            Err(e) => panic!("unexpected: {e}"),
        }
    }
}
