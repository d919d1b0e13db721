//! A session started in the transmission phase, as the kernel's end of a socketpair sees it:
//! no greeting, simple replies only.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use rdbd_protocol::nbd::{cmd_flags, Command, RequestHeader, SimpleReply};
use tokio_util::sync::CancellationToken;

use super::{Session, SessionEnd};
use crate::nbd::{Export, Negotiated, Socket};
use crate::storage::{FileDevice, OpenOptions};

fn request(command: Command, flags: u16, cookie: u64, offset: u64, length: u32) -> [u8; RequestHeader::LEN] {
    RequestHeader { flags, command: command.to_wire(), cookie, offset, length }.encode()
}

fn read_reply(client: &mut UnixStream) -> SimpleReply {
    let mut buf = [0u8; SimpleReply::LEN];
    client.read_exact(&mut buf).unwrap();
    SimpleReply::decode(&buf).expect("a simple reply, not a greeting or a structured chunk")
}

#[tokio::test]
async fn kernel_style_session_writes_reads_flushes_and_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions { size: Some(1 << 20), ..Default::default() };
    let device = Arc::new(FileDevice::open_file(&dir.path().join("disk.img"), &opts).unwrap());
    let export = Arc::new(Export { name: "r0".into(), description: String::new(), device });

    let (ours, mut kernel) = UnixStream::pair().unwrap();
    let sock = Socket::new(ours.into()).unwrap();
    let session =
        Session::new(sock, Negotiated::without_handshake(export), CancellationToken::new()).unwrap();
    let serving = tokio::spawn(session.run());

    let client = tokio::task::spawn_blocking(move || {
        // The kernel's cookies are (cmd_cookie << 32) | tag: they must come back verbatim.
        let cookie = |tag: u64| (7 << 32) | tag;
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();

        kernel.write_all(&request(Command::Write, cmd_flags::FUA, cookie(1), 4096, 8192)).unwrap();
        kernel.write_all(&data).unwrap();
        assert_eq!(read_reply(&mut kernel), SimpleReply { error: 0, cookie: cookie(1) });

        kernel.write_all(&request(Command::Read, 0, cookie(2), 4096, 8192)).unwrap();
        assert_eq!(read_reply(&mut kernel), SimpleReply { error: 0, cookie: cookie(2) });
        let mut back = vec![0u8; 8192];
        kernel.read_exact(&mut back).unwrap();
        assert_eq!(back, data);

        kernel.write_all(&request(Command::Flush, 0, cookie(3), 0, 0)).unwrap();
        assert_eq!(read_reply(&mut kernel), SimpleReply { error: 0, cookie: cookie(3) });

        // Errors are simple replies too (the kernel turns any of them into EIO).
        kernel.write_all(&request(Command::Read, 0, cookie(4), 1 << 20, 512)).unwrap();
        assert_eq!(read_reply(&mut kernel).error, 22, "EINVAL past the end");

        kernel.write_all(&request(Command::Disc, 0, cookie(5), 0, 0)).unwrap();
        let mut rest = Vec::new();
        kernel.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "DISC has no reply: {rest:?}");
    });
    client.await.unwrap();
    let end = serving.await.unwrap();
    assert!(matches!(end, SessionEnd::Disconnect), "{end:?}");
}
