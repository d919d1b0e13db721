//! Just enough of an NBD client for the demo to write through the Primary like any client:
//! fixed-newstyle handshake with NBD_OPT_EXPORT_NAME, then WRITE and FLUSH with simple replies.

use std::io::{Read, Write};
use std::net::TcpStream;

use anyhow::{bail, Context};
use rdbd_protocol::nbd::handshake::{decode_greeting, OptionHeader, GREETING_LEN};
use rdbd_protocol::nbd::transmission::{Command, RequestHeader, SimpleReply};
use rdbd_protocol::nbd::{client_flags, opt};

pub struct NbdClient {
    stream: TcpStream,
    pub size: u64,
    cookie: u64,
}

impl NbdClient {
    pub fn connect(addr: &str, export: &str) -> anyhow::Result<Self> {
        let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut greeting = [0u8; GREETING_LEN];
        stream.read_exact(&mut greeting)?;
        decode_greeting(&greeting).context("not an NBD server")?;
        stream.write_all(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes())?;
        let header = OptionHeader { option: opt::EXPORT_NAME, length: export.len() as u32 };
        stream.write_all(&header.encode())?;
        stream.write_all(export.as_bytes())?;
        let mut reply = [0u8; 10];
        stream.read_exact(&mut reply).context("the server refused the export")?;
        let size = u64::from_be_bytes(reply[..8].try_into().expect("8 bytes"));
        Ok(Self { stream, size, cookie: 0 })
    }

    fn request(&mut self, command: Command, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.cookie += 1;
        let header = RequestHeader {
            flags: 0,
            command: command.to_wire(),
            cookie: self.cookie,
            offset,
            length: data.len() as u32,
        };
        self.stream.write_all(&header.encode())?;
        self.stream.write_all(data)?;
        let mut reply = [0u8; SimpleReply::LEN];
        self.stream.read_exact(&mut reply)?;
        let reply = SimpleReply::decode(&reply)?;
        if reply.error != 0 {
            bail!("{command:?} at {offset} failed with NBD error {}", reply.error);
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.request(Command::Write, offset, data)
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.request(Command::Flush, 0, &[])
    }
}
