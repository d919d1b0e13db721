//! Generic netlink framing: building a request, walking the replies, and one blocking
//! request/acknowledge exchange on an `AF_NETLINK`/`NETLINK_GENERIC` socket.
//!
//! Hand-written rather than on a crate: the nbd family needs a dozen fixed attributes, and the
//! candidates bring far more than that (neli 0.7: derive_builder, getset, proc macros, log,
//! parking_lot and a router thread; netlink-packet-generic: the whole rust-netlink packet
//! stack). Owning the bytes also makes the encoding testable byte for byte.
//!
//! Layouts and constants are from the Linux UAPI headers `linux/netlink.h` (nlmsghdr, nlattr,
//! NLM_F_*, NLMSG_*) and `linux/genetlink.h` (genlmsghdr, GENL_ID_CTRL, CTRL_*). Headers are
//! in host byte order.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::net::{netlink, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

pub const NLMSG_HDRLEN: usize = 16;
pub const GENL_HDRLEN: usize = 4;
pub const NLA_HDRLEN: usize = 4;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;

pub const NLMSG_NOOP: u16 = 0x1;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;

/// Set on nested attributes; the kernel's liberal parsing accepts it either way, strict parsing
/// requires it, so always setting it is the safe choice.
pub const NLA_F_NESTED: u16 = 1 << 15;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// The controller's own protocol version (genetlink.h's ctrl family).
const CTRL_VERSION: u8 = 2;

/// Largest reply datagram we accept; nbd's replies are a few hundred bytes.
const RECV_BUF: usize = 64 * 1024;
/// Generic netlink answers while `sendto` runs; the timeout only guards against a lost reply.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One generic netlink request under construction (header, then attributes).
pub struct GenlRequest {
    buf: Vec<u8>,
    open_nests: Vec<usize>,
}

impl GenlRequest {
    /// A request for command `cmd` of `family`, asking for an acknowledgement.
    pub fn new(family: u16, cmd: u8, version: u8, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in `finish`
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills in ours
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Self { buf, open_nests: Vec::new() }
    }

    fn put(&mut self, ty: u16, payload: &[u8]) {
        let len = NLA_HDRLEN + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    pub fn put_u32(&mut self, ty: u16, value: u32) {
        self.put(ty, &value.to_ne_bytes());
    }

    pub fn put_u64(&mut self, ty: u16, value: u64) {
        self.put(ty, &value.to_ne_bytes());
    }

    /// A NUL-terminated string (NLA_STRING / NLA_NUL_STRING both accept it).
    pub fn put_str(&mut self, ty: u16, value: &str) {
        let mut payload = Vec::with_capacity(value.len() + 1);
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        self.put(ty, &payload);
    }

    /// Opens a nested attribute; attributes put until [`Self::end_nested`] go inside it.
    pub fn begin_nested(&mut self, ty: u16) {
        self.open_nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    pub fn end_nested(&mut self) {
        let start = self.open_nests.pop().expect("end_nested without begin_nested");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// The finished message.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.open_nests.is_empty(), "unclosed nested attribute");
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// A reply that does not parse as netlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// One attribute of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    /// The type without the nested / byte-order flags.
    pub ty: u16,
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    pub fn u8(&self) -> Result<u8, Malformed> {
        self.payload.first().copied().ok_or(Malformed("attribute too short for u8"))
    }

    pub fn u16(&self) -> Result<u16, Malformed> {
        let b = self.payload.get(..2).ok_or(Malformed("attribute too short for u16"))?;
        Ok(u16::from_ne_bytes([b[0], b[1]]))
    }

    pub fn u32(&self) -> Result<u32, Malformed> {
        let b = self.payload.get(..4).ok_or(Malformed("attribute too short for u32"))?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The attributes nested inside this one.
    pub fn nested(&self) -> Result<Vec<Attr<'a>>, Malformed> {
        parse_attrs(self.payload)
    }
}

/// Splits a run of attributes.
pub fn parse_attrs(mut buf: &[u8]) -> Result<Vec<Attr<'_>>, Malformed> {
    let mut attrs = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return Err(Malformed("attribute length out of bounds"));
        }
        attrs.push(Attr { ty, payload: &buf[NLA_HDRLEN..len] });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(attrs)
}

/// One message of a reply datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A generic netlink message: its command and attribute bytes.
    Message { seq: u32, cmd: u8, attrs: &'a [u8] },
    /// The acknowledgement (NLMSG_ERROR with error 0).
    Ack { seq: u32 },
    /// A failed request: the positive errno.
    Error { seq: u32, errno: i32 },
    /// End of a dump, or a no-op.
    Done { seq: u32 },
}

/// Splits a datagram into its messages.
pub fn parse_replies(mut buf: &[u8]) -> Result<Vec<Reply<'_>>, Malformed> {
    let mut replies = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(Malformed("message length out of bounds"));
        }
        let body = &buf[NLMSG_HDRLEN..len];
        replies.push(match ty {
            NLMSG_ERROR => {
                let b = body.get(..4).ok_or(Malformed("truncated error message"))?;
                match i32::from_ne_bytes([b[0], b[1], b[2], b[3]]) {
                    0 => Reply::Ack { seq },
                    e => Reply::Error { seq, errno: -e },
                }
            }
            NLMSG_DONE | NLMSG_NOOP => Reply::Done { seq },
            _ => {
                if body.len() < GENL_HDRLEN {
                    return Err(Malformed("truncated generic netlink header"));
                }
                Reply::Message { seq, cmd: body[0], attrs: &body[GENL_HDRLEN..] }
            }
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(replies)
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel refused the request with this (positive) errno.
    #[error("kernel answered errno {0}")]
    Kernel(i32),
    #[error("malformed reply: {0}")]
    Malformed(#[from] Malformed),
}

/// A reply message kept past the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedMessage {
    pub cmd: u8,
    pub attrs: Vec<u8>,
}

/// A bound generic netlink socket that runs one request at a time.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    pub fn open() -> io::Result<Self> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(netlink::GENERIC),
        )?;
        rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, 0))?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(RECV_TIMEOUT),
        )?;
        Ok(Self { fd, seq: 0 })
    }

    /// The sequence number for the next request.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `request` (built with sequence number `seq`) and collects the messages the kernel
    /// answers with, up to its acknowledgement.
    pub fn exchange(&mut self, request: &[u8], seq: u32) -> Result<Vec<OwnedMessage>, ExchangeError> {
        let kernel = netlink::SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(&self.fd, request, SendFlags::empty(), &kernel).map_err(io::Error::from)?;
        let mut buf = vec![0u8; RECV_BUF];
        let mut messages = Vec::new();
        loop {
            let (_, len) =
                rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty()).map_err(io::Error::from)?;
            if len > buf.len() {
                return Err(Malformed("reply larger than the receive buffer").into());
            }
            for reply in parse_replies(&buf[..len])? {
                match reply {
                    Reply::Message { seq: s, cmd, attrs } if s == seq => {
                        messages.push(OwnedMessage { cmd, attrs: attrs.to_vec() })
                    }
                    Reply::Ack { seq: s } | Reply::Done { seq: s } if s == seq => return Ok(messages),
                    Reply::Error { seq: s, errno } if s == seq => return Err(ExchangeError::Kernel(errno)),
                    // A late answer to an earlier, abandoned request.
                    _ => {}
                }
            }
        }
    }
}

/// The CTRL_CMD_GETFAMILY request that resolves a family name to its id.
pub fn encode_get_family(name: &str, seq: u32) -> Vec<u8> {
    let mut req = GenlRequest::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_VERSION, seq);
    req.put_str(CTRL_ATTR_FAMILY_NAME, name);
    req.finish()
}

/// The family id in a CTRL_CMD_GETFAMILY reply.
pub fn parse_family_id(messages: &[OwnedMessage]) -> Result<u16, Malformed> {
    for m in messages {
        for attr in parse_attrs(&m.attrs)? {
            if attr.ty == CTRL_ATTR_FAMILY_ID {
                return attr.u16();
            }
        }
    }
    Err(Malformed("no family id in the controller's reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn get_family_request_is_byte_exact() {
        let bytes = encode_get_family("nbd", 7);
        #[rustfmt::skip]
        let expected: &[u8] = &[
            28, 0, 0, 0,   0x10, 0,   5, 0,   7, 0, 0, 0,   0, 0, 0, 0, // nlmsghdr
            3, 2, 0, 0,                                                   // genlmsghdr
            8, 0, 2, 0,   b'n', b'b', b'd', 0,                            // FAMILY_NAME "nbd\0"
        ];
        assert_eq!(bytes, expected);
    }

    fn message(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(align4(m.len()), 0);
        m
    }

    fn error_body(error: i32) -> Vec<u8> {
        let mut b = error.to_ne_bytes().to_vec();
        b.extend_from_slice(&[0u8; NLMSG_HDRLEN]); // the echoed request header
        b
    }

    #[test]
    fn replies_split_into_message_ack_and_error() {
        let mut genl = vec![CTRL_CMD_GETFAMILY, 2, 0, 0];
        genl.extend_from_slice(&6u16.to_ne_bytes());
        genl.extend_from_slice(&CTRL_ATTR_FAMILY_ID.to_ne_bytes());
        genl.extend_from_slice(&0x25u16.to_ne_bytes());
        genl.extend_from_slice(&[0, 0]);
        let mut datagram = message(GENL_ID_CTRL, 3, &genl);
        datagram.extend(message(NLMSG_ERROR, 3, &error_body(0)));
        datagram.extend(message(NLMSG_ERROR, 4, &error_body(-libc::ENOENT)));
        let replies = parse_replies(&datagram).unwrap();
        assert_eq!(replies.len(), 3);
        let Reply::Message { seq: 3, cmd: CTRL_CMD_GETFAMILY, attrs } = replies[0] else {
            panic!("{replies:?}")
        };
        let owned = [OwnedMessage { cmd: CTRL_CMD_GETFAMILY, attrs: attrs.to_vec() }];
        assert_eq!(parse_family_id(&owned), Ok(0x25));
        assert_eq!(replies[1], Reply::Ack { seq: 3 });
        assert_eq!(replies[2], Reply::Error { seq: 4, errno: libc::ENOENT });
    }

    #[test]
    fn nested_attributes_round_trip_and_flags_are_masked() {
        let mut req = GenlRequest::new(0x20, 1, 1, 1);
        req.begin_nested(9);
        req.put_u32(1, 0xdead_beef);
        req.put_u32(2, 1);
        req.end_nested();
        let bytes = req.finish();
        let attrs = parse_attrs(&bytes[NLMSG_HDRLEN + GENL_HDRLEN..]).unwrap();
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].ty, 9, "NLA_F_NESTED is not part of the type");
        let inner = attrs[0].nested().unwrap();
        assert_eq!(inner[0].u32(), Ok(0xdead_beef));
        assert_eq!(inner[1].u32(), Ok(1));
    }

    #[test]
    fn truncated_input_is_malformed_not_a_panic() {
        assert!(parse_attrs(&[200, 0, 1, 0, 0]).is_err());
        let mut m = message(GENL_ID_CTRL, 1, &[1, 2, 0, 0]);
        m[0] = 200;
        assert!(parse_replies(&m).is_err());
        assert!(parse_replies(&message(NLMSG_ERROR, 1, &[])).is_err());
        assert!(Attr { ty: 1, payload: &[1, 2] }.u32().is_err());
    }
}
