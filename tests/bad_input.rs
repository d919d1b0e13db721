//! Hostile and malformed input, spoken by hand over raw unix sockets with the `rdbd_protocol`
//! encoders. After every abuse the server must still be running and a fresh, well-behaved client
//! must still be served. Every socket has read and write timeouts, so a server that stops
//! answering fails the test instead of hanging it.

mod common;
use common::*;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rdbd_protocol::nbd::{
    chunk, client_flags, cmd_flags, decode_greeting, decode_server_entry, handshake_flags, info, opt, rep,
    ChunkHeader, ErrorChunk, ErrorCode, InfoReply, InfoRequest, MetaContextReply, MetaContextRequest,
    OptionHeader, OptionReplyHeader, RequestHeader, SimpleReply, BASE_ALLOCATION, GREETING_LEN,
    STRUCTURED_REPLY_MAGIC,
};

/// Size of every export in this file.
const SIZE: u64 = 16 << 20;
/// How long any single socket read or write may block.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of the waits for the server to reach a state (generous: the machine may be loaded).
const STATE_TIMEOUT: Duration = Duration::from_secs(20);
/// The server's largest READ/WRITE payload.
const MAX_PAYLOAD: u32 = 32 << 20;
/// The server's largest option payload read into memory.
const MAX_OPTION_LEN: u32 = 64 * 1024;

const EINVAL: u32 = ErrorCode::Inval as u32;
const ENOSPC: u32 = ErrorCode::NoSpc as u32;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

/// An option number no NBD version defines.
const OPT_UNKNOWN: u32 = 0x7a7a;

/// (description, flags, command, offset, length, payload, expected error) of one request.
type Case<'a> = (&'a str, u16, u16, u64, u32, &'a [u8], u32);
/// (cookie, flags, command, offset, payload, expected error) of one pipelined request.
type Pipelined<'a> = (u64, u16, u16, u64, &'a [u8], u32);

// ---------------------------------------------------------------------------------------------
// A hand-driven NBD client.
// ---------------------------------------------------------------------------------------------

fn connect(server: &Server) -> UnixStream {
    let s = UnixStream::connect(&server.socket).expect("connect to the unix socket");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

fn read_n(s: &mut UnixStream, n: usize, what: &str) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).unwrap_or_else(|e| panic!("reading {what} ({n} bytes): {e}"));
    buf
}

/// Asserts that the peer closes `s` (EOF or reset) without sending anything more.
fn expect_closed(s: &mut UnixStream, what: &str) {
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: expected the connection to be closed, got {n} bytes: {:02x?}", &buf[..n]),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: the server kept the connection open ({e})"),
    }
}

/// One reply to a transmission request, simple or structured.
#[derive(Debug, Default)]
struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
    /// Whether it was a simple reply.
    simple: bool,
    /// Chunk types received (structured replies only).
    chunks: Vec<u16>,
    /// Payload of a BLOCK_STATUS chunk.
    block_status: Vec<u8>,
}

struct Conn {
    s: UnixStream,
    structured: bool,
    /// Cookie → length of the data a successful simple READ reply carries.
    reads: HashMap<u64, usize>,
}

impl Conn {
    /// Connects, reads the greeting and sends the client flags FIXED_NEWSTYLE | NO_ZEROES.
    fn handshake(server: &Server) -> Conn {
        Self::handshake_with_flags(server, client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES)
    }

    fn handshake_with_flags(server: &Server, flags: u32) -> Conn {
        let mut s = connect(server);
        let greeting = read_n(&mut s, GREETING_LEN, "greeting");
        let hflags = decode_greeting(&greeting).expect("a fixed-newstyle greeting");
        assert_ne!(hflags & handshake_flags::FIXED_NEWSTYLE, 0, "server must offer FIXED_NEWSTYLE");
        s.write_all(&flags.to_be_bytes()).expect("send client flags");
        Conn { s, structured: false, reads: HashMap::new() }
    }

    fn send_option(&mut self, option: u32, payload: &[u8]) {
        let header = OptionHeader { option, length: payload.len() as u32 }.encode();
        let mut msg = header.to_vec();
        msg.extend_from_slice(payload);
        self.s.write_all(&msg).unwrap_or_else(|e| panic!("send option {option}: {e}"));
    }

    fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let head = read_n(&mut self.s, OptionReplyHeader::LEN, "option reply header");
        let h = OptionReplyHeader::decode(&head).expect("option reply magic");
        assert_eq!(h.option, option, "option reply echoes the wrong option: {h:?}");
        assert!(h.length <= 1 << 20, "implausible option reply length {h:?}");
        let payload = read_n(&mut self.s, h.length as usize, "option reply payload");
        (h.reply_type, payload)
    }

    /// Sends `option` and asserts that the one reply is the error `expected`.
    fn expect_option_error(&mut self, option: u32, payload: &[u8], expected: u32, what: &str) {
        self.send_option(option, payload);
        let (reply_type, msg) = self.option_reply(option);
        assert_eq!(
            reply_type,
            expected,
            "{what}: reply type {reply_type:#x}, expected {expected:#x} (message {:?})",
            String::from_utf8_lossy(&msg)
        );
        assert!(rep::is_error(reply_type));
        assert!(std::str::from_utf8(&msg).is_ok(), "{what}: error message is not UTF-8");
    }

    /// Reads INFO replies up to the ACK; returns (size, transmission flags, other INFO payloads).
    fn info_replies(&mut self, option: u32) -> (u64, u16, Vec<Vec<u8>>) {
        let mut export = None;
        let mut others = Vec::new();
        loop {
            let (reply_type, payload) = self.option_reply(option);
            match reply_type {
                rep::ACK => {
                    assert!(payload.is_empty(), "ACK with a payload");
                    break;
                }
                rep::INFO => match InfoReply::decode(&payload).expect("well-formed NBD_REP_INFO") {
                    InfoReply::Export { size, flags } => {
                        assert!(export.replace((size, flags)).is_none(), "NBD_INFO_EXPORT sent twice");
                    }
                    _ => others.push(payload),
                },
                other => panic!(
                    "unexpected reply {other:#x} to option {option}: {:?}",
                    String::from_utf8_lossy(&payload)
                ),
            }
        }
        let (size, flags) = export.expect("NBD_INFO_EXPORT is mandatory");
        (size, flags, others)
    }

    fn structured_reply(&mut self) {
        self.send_option(opt::STRUCTURED_REPLY, &[]);
        let (reply_type, payload) = self.option_reply(opt::STRUCTURED_REPLY);
        assert_eq!((reply_type, payload.len()), (rep::ACK, 0), "STRUCTURED_REPLY not acknowledged");
        self.structured = true;
    }

    /// NBD_OPT_GO for `name`; asserts success and returns (size, flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.send_option(opt::GO, &InfoRequest::encode(name, &[]));
        let (size, flags, _) = self.info_replies(opt::GO);
        assert_eq!(size, SIZE, "export size");
        assert_ne!(flags & 1, 0, "HAS_FLAGS must be set");
        (size, flags)
    }

    fn request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        let mut msg = RequestHeader { flags, command, cookie, offset, length }.encode().to_vec();
        msg.extend_from_slice(payload);
        if command == CMD_READ {
            self.reads.insert(cookie, length as usize);
        }
        self.s.write_all(&msg).unwrap_or_else(|e| panic!("send request {command} cookie {cookie}: {e}"));
    }

    /// Reads one reply. With structured replies, READ must be answered with chunks; other
    /// commands may get a simple reply.
    fn reply(&mut self) -> Reply {
        let magic = read_n(&mut self.s, 4, "reply magic");
        if u32::from_be_bytes(magic[..].try_into().unwrap()) == STRUCTURED_REPLY_MAGIC {
            assert!(self.structured, "structured reply chunk without NBD_OPT_STRUCTURED_REPLY");
            return self.structured_reply_chunks(magic);
        }
        let mut head = magic;
        head.extend_from_slice(&read_n(&mut self.s, SimpleReply::LEN - 4, "simple reply"));
        let r = SimpleReply::decode(&head).expect("simple reply magic");
        let mut reply = Reply { cookie: r.cookie, error: r.error, simple: true, ..Reply::default() };
        let data_len = self.reads.remove(&r.cookie);
        if r.error == 0 {
            if let Some(len) = data_len {
                assert!(!self.structured, "simple reply to a successful READ despite structured replies");
                reply.data = read_n(&mut self.s, len, "read data");
            }
        }
        reply
    }

    /// Reads the chunks of one structured reply, up to the one flagged DONE; `magic` holds the
    /// first 4 bytes of the first chunk, already read.
    fn structured_reply_chunks(&mut self, magic: Vec<u8>) -> Reply {
        let mut reply = Reply::default();
        let mut head = magic;
        loop {
            let need = ChunkHeader::LEN - head.len();
            head.extend_from_slice(&read_n(&mut self.s, need, "structured reply chunk"));
            let h = ChunkHeader::decode(&head).expect("structured reply magic");
            head.clear();
            if reply.chunks.is_empty() {
                reply.cookie = h.cookie;
            }
            assert_eq!(h.cookie, reply.cookie, "chunks of different requests interleaved");
            assert!(h.length <= MAX_PAYLOAD + 64, "implausible chunk length {h:?}");
            let payload = read_n(&mut self.s, h.length as usize, "chunk payload");
            reply.chunks.push(h.chunk_type);
            match h.chunk_type {
                chunk::OFFSET_DATA => reply.data.extend_from_slice(&payload[8..]),
                chunk::ERROR | chunk::ERROR_OFFSET => {
                    let e = ErrorChunk::decode(&payload).expect("well-formed error chunk");
                    assert_ne!(e.error, 0, "error chunk with error 0");
                    reply.error = e.error;
                }
                chunk::BLOCK_STATUS => reply.block_status = payload,
                chunk::NONE => {}
                other => panic!("unexpected chunk type {other:#x}"),
            }
            if h.is_done() {
                self.reads.remove(&reply.cookie);
                return reply;
            }
        }
    }

    /// Sends one request and asserts its reply: the cookie and error `expected`.
    fn expect_error(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        expected: u32,
    ) -> Reply {
        let cookie = 0xc0_0000 + u64::from(command) * 0x1_0000 + u64::from(flags);
        self.request(flags, command, cookie, offset, length, payload);
        let r = self.reply();
        assert_eq!(r.cookie, cookie, "reply for the wrong request");
        assert_eq!(
            r.error, expected,
            "command {command} flags {flags:#x} offset {offset:#x} length {length:#x}: error {} instead of {expected}",
            r.error
        );
        r
    }

    fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let cookie = 0x5ead_0000_0000 + offset;
        self.request(0, CMD_READ, cookie, offset, length, &[]);
        let r = self.reply();
        assert_eq!((r.cookie, r.error), (cookie, 0), "READ at {offset} of {length} failed");
        assert_eq!(r.data.len(), length as usize, "READ returned a short buffer");
        r.data
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let cookie = 0x3717_0000_0000 + offset;
        self.request(0, CMD_WRITE, cookie, offset, data.len() as u32, data);
        let r = self.reply();
        assert_eq!((r.cookie, r.error), (cookie, 0), "WRITE at {offset} failed");
    }

    /// NBD_CMD_DISC, then the server must close the connection.
    fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0xd15c, 0, 0, &[]);
        expect_closed(&mut self.s, "after NBD_CMD_DISC");
    }
}

/// A well-behaved client in transmission with simple replies.
fn ready(server: &Server) -> Conn {
    let mut c = Conn::handshake(server);
    c.go("");
    c
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

/// Asserts that the server process is alive and that fresh clients are served normally: a raw
/// GO + READ + DISC, and `nbdinfo --size` when it is installed.
fn check_alive(server: &mut Server, after: &str) {
    assert!(server.is_running(), "rdbd died after {after}; log:\n{}", server.log());
    let mut c = ready(server);
    let data = c.read(SIZE - 8192, 8192);
    assert_eq!(data.len(), 8192);
    c.disconnect();
    static NBDINFO: OnceLock<bool> = OnceLock::new();
    if *NBDINFO.get_or_init(|| have_tool("nbdinfo")) {
        let out = run_ok(Command::new("nbdinfo").args(["--size", &server.unix_uri]));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), SIZE.to_string(), "nbdinfo after {after}");
    }
    assert!(server.is_running(), "rdbd died after {after}; log:\n{}", server.log());
}

/// Bytes queued on socket `s` by `request` (SIOCOUTQ: sent and not yet read by the server;
/// FIONREAD: sent by the server and not yet read by us).
fn queued(s: &UnixStream, request: libc::Ioctl) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one int to the pointer they are given.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), request, &mut n) };
    assert_eq!(rc, 0, "ioctl on the client socket: {}", std::io::Error::last_os_error());
    n as usize
}

/// Waits until the server has read everything sent on `s` (it is past what was sent).
fn wait_server_read_all(s: &UnixStream, what: &str) {
    let read = wait_until(STATE_TIMEOUT, || queued(s, libc::TIOCOUTQ) == 0);
    assert!(read, "the server did not read {what} within {STATE_TIMEOUT:?}");
}

/// Waits until `bytes` of the server's replies wait unread on `s`: it is answering a pipeline
/// that nobody reads.
fn wait_unread_replies(s: &UnixStream, bytes: usize, what: &str) {
    let piled = wait_until(STATE_TIMEOUT, || queued(s, libc::FIONREAD) >= bytes);
    assert!(piled, "no {bytes} bytes of replies to {what} within {STATE_TIMEOUT:?}");
}

/// A field of /proc/PID/status in KiB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().expect("a number of kB")
}

// ---------------------------------------------------------------------------------------------
// Handshake.
// ---------------------------------------------------------------------------------------------

#[test]
fn garbage_or_unknown_client_flags_close_the_connection() {
    let mut server = Server::start(SIZE);

    // Garbage where the client flags belong.
    let mut c = Conn::handshake_with_flags(&server, 0xdead_beef);
    expect_closed(&mut c.s, "garbage client flags");
    check_alive(&mut server, "garbage client flags");

    // A different protocol altogether.
    let mut s = connect(&server);
    read_n(&mut s, GREETING_LEN, "greeting");
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    expect_closed(&mut s, "an HTTP request instead of client flags");
    check_alive(&mut server, "an HTTP request");

    // Known bits plus one unknown bit.
    let mut c = Conn::handshake_with_flags(&server, client_flags::KNOWN | 1 << 5);
    expect_closed(&mut c.s, "unknown client flag bit 5");
    check_alive(&mut server, "unknown client flag bit");

    let mut c = Conn::handshake_with_flags(&server, client_flags::FIXED_NEWSTYLE | 1 << 31);
    expect_closed(&mut c.s, "unknown client flag bit 31");
    check_alive(&mut server, "unknown client flag bit 31");

    // Clients that vanish before or during the flags.
    drop(connect(&server));
    check_alive(&mut server, "a client that closed before reading the greeting");
    let mut s = connect(&server);
    read_n(&mut s, GREETING_LEN, "greeting");
    s.write_all(&[0, 0]).unwrap();
    drop(s);
    check_alive(&mut server, "a client that closed in the middle of its flags");
    assert!(server.stop().success());
}

#[test]
fn bad_option_magic_and_truncated_options() {
    let mut server = Server::start(SIZE);

    // Garbage instead of IHAVEOPT.
    let mut c = Conn::handshake(&server);
    let mut h = OptionHeader { option: opt::GO, length: 0 }.encode();
    h[..8].copy_from_slice(b"NOTMAGIC");
    c.s.write_all(&h).unwrap();
    expect_closed(&mut c.s, "bad option magic");
    check_alive(&mut server, "bad option magic");

    // Bad magic after a successful option.
    let mut c = Conn::handshake(&server);
    c.send_option(opt::LIST, &[]);
    let (t, _) = c.option_reply(opt::LIST);
    assert_eq!(t, rep::SERVER);
    let (t, _) = c.option_reply(opt::LIST);
    assert_eq!(t, rep::ACK);
    c.s.write_all(&[0xff; OptionHeader::LEN]).unwrap();
    expect_closed(&mut c.s, "bad option magic after LIST");
    check_alive(&mut server, "bad option magic after LIST");

    // Half an option header, then close.
    let mut c = Conn::handshake(&server);
    c.s.write_all(&OptionHeader { option: opt::GO, length: 10 }.encode()[..9]).unwrap();
    drop(c);
    check_alive(&mut server, "a truncated option header");

    // GO announcing 100 bytes, 10 sent, then close.
    let mut c = Conn::handshake(&server);
    let mut msg = OptionHeader { option: opt::GO, length: 100 }.encode().to_vec();
    msg.extend_from_slice(&[0u8; 10]);
    c.s.write_all(&msg).unwrap();
    drop(c);
    check_alive(&mut server, "a GO option truncated in its payload");

    // Unknown option announcing 60 KiB, 1 KiB sent, then close.
    let mut c = Conn::handshake(&server);
    let mut msg = OptionHeader { option: OPT_UNKNOWN, length: 60 << 10 }.encode().to_vec();
    msg.extend_from_slice(&[0x41; 1024]);
    c.s.write_all(&msg).unwrap();
    drop(c);
    check_alive(&mut server, "an unknown option truncated in its payload");

    // A truncated option while the server is still writing its reply to the previous one.
    let mut c = Conn::handshake(&server);
    c.send_option(opt::LIST, &[]);
    c.s.write_all(&OptionHeader { option: opt::INFO, length: 4 }.encode()).unwrap();
    drop(c);
    check_alive(&mut server, "a client that closed without reading the LIST reply");
    assert!(server.stop().success());
}

#[test]
fn huge_option_lengths_are_not_allocated() {
    let mut server = Server::start(SIZE);
    let pid = server.pid();
    let peak_before = proc_status_kib(pid, "VmPeak:");

    for option in [OPT_UNKNOWN, opt::GO, opt::INFO, opt::LIST, opt::SET_META_CONTEXT] {
        let mut c = Conn::handshake(&server);
        let mut msg = OptionHeader { option, length: 0xffff_fff0 }.encode().to_vec();
        msg.extend_from_slice(&[0x5a; 8192]);
        c.s.write_all(&msg).unwrap();
        // Once it has read what was sent, the server is skipping the payload; it must not have
        // reserved 4 GiB for it.
        wait_server_read_all(&c.s, &format!("a 4 GiB option {option} header and 8 KiB"));
        let rss = proc_status_kib(pid, "VmRSS:");
        let size = proc_status_kib(pid, "VmSize:");
        assert!(rss < 200 << 10, "VmRSS {rss} kB after a 4 GiB option {option} header");
        assert!(server.is_running(), "rdbd died on a 4 GiB option {option}; log:\n{}", server.log());
        drop(c);
        check_alive(&mut server, &format!("option {option} with length 0xfffffff0 (VmSize {size} kB)"));
    }
    let peak_after = proc_status_kib(pid, "VmPeak:");
    assert!(
        peak_after < peak_before + (1 << 20),
        "VmPeak grew from {peak_before} kB to {peak_after} kB: a 4 GiB option length was allocated"
    );
    assert!(proc_status_kib(pid, "VmRSS:") < 200 << 10);

    // EXPORT_NAME cannot carry an error: a too-long one ends the connection at once, without
    // the server waiting for (or allocating) the payload.
    let mut c = Conn::handshake(&server);
    c.s.write_all(&OptionHeader { option: opt::EXPORT_NAME, length: 0xffff_fff0 }.encode()).unwrap();
    expect_closed(&mut c.s, "EXPORT_NAME of 4 GiB");
    check_alive(&mut server, "EXPORT_NAME of 4 GiB");

    // Real 100 KiB payloads are read, skipped and refused; negotiation continues.
    let mut c = Conn::handshake(&server);
    let mut big = InfoRequest::encode("", &[info::NAME]);
    big.resize(100 << 10, 0);
    assert!(big.len() as u32 > MAX_OPTION_LEN);
    c.expect_option_error(opt::GO, &big, rep::ERR_TOO_BIG, "GO with 100 KiB");
    c.expect_option_error(opt::INFO, &big, rep::ERR_TOO_BIG, "INFO with 100 KiB");
    c.expect_option_error(opt::LIST, &big, rep::ERR_TOO_BIG, "LIST with 100 KiB");
    c.expect_option_error(OPT_UNKNOWN, &big, rep::ERR_UNSUP, "unknown option with 100 KiB");
    c.expect_option_error(opt::EXTENDED_HEADERS, &big, rep::ERR_UNSUP, "EXTENDED_HEADERS with 100 KiB");
    c.go("");
    assert_eq!(c.read(0, 4096).len(), 4096);
    c.disconnect();
    assert!(proc_status_kib(pid, "VmRSS:") < 200 << 10);
    check_alive(&mut server, "100 KiB options");
    assert!(server.stop().success());
}

#[test]
fn option_edge_cases_are_refused_and_negotiation_continues() {
    let mut server = Server::start(SIZE);
    let mut c = Conn::handshake(&server);

    c.expect_option_error(OPT_UNKNOWN, b"some payload", rep::ERR_UNSUP, "unknown option with payload");
    c.expect_option_error(0xffff_ffff, &[], rep::ERR_UNSUP, "option 0xffffffff");
    c.expect_option_error(opt::STARTTLS, &[], rep::ERR_POLICY, "STARTTLS");
    c.expect_option_error(opt::STARTTLS, b"x", rep::ERR_INVALID, "STARTTLS with payload");
    c.expect_option_error(opt::EXTENDED_HEADERS, &[], rep::ERR_UNSUP, "EXTENDED_HEADERS");

    // INFO/GO payloads that do not parse.
    let mut beyond = InfoRequest::encode("", &[]);
    beyond[..4].copy_from_slice(&200u32.to_be_bytes());
    c.expect_option_error(opt::INFO, &beyond, rep::ERR_INVALID, "INFO with name length beyond payload");
    c.expect_option_error(opt::GO, &beyond, rep::ERR_INVALID, "GO with name length beyond payload");
    let mut huge_name = InfoRequest::encode("", &[]);
    huge_name[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    c.expect_option_error(opt::INFO, &huge_name, rep::ERR_INVALID, "INFO with name length 0xffffffff");
    let mut trailing = InfoRequest::encode("", &[info::NAME]);
    trailing.push(0);
    c.expect_option_error(opt::INFO, &trailing, rep::ERR_INVALID, "INFO with a trailing byte");
    let mut short_list = InfoRequest::encode("", &[info::NAME, info::BLOCK_SIZE]);
    short_list.truncate(short_list.len() - 1);
    c.expect_option_error(opt::GO, &short_list, rep::ERR_INVALID, "GO with a truncated request list");
    c.expect_option_error(opt::GO, &[], rep::ERR_INVALID, "GO without payload");
    c.expect_option_error(opt::INFO, &[0, 0], rep::ERR_INVALID, "INFO with a 2-byte payload");
    let mut bad = InfoRequest::encode("\u{fffd}", &[]);
    bad[4] = 0xff;
    c.expect_option_error(opt::GO, &bad, rep::ERR_INVALID, "GO with a non-UTF-8 name");

    // LIST takes no payload.
    c.expect_option_error(opt::LIST, b"\0\0\0\0", rep::ERR_INVALID, "LIST with payload");
    c.send_option(opt::LIST, &[]);
    let (t, entry) = c.option_reply(opt::LIST);
    assert_eq!(t, rep::SERVER, "LIST lists the export");
    let (name, _description) = decode_server_entry(&entry).expect("well-formed NBD_REP_SERVER");
    assert_eq!(name, "");
    let (t, _) = c.option_reply(opt::LIST);
    assert_eq!(t, rep::ACK);

    // Metadata contexts need structured replies first.
    let meta = MetaContextRequest::encode("", &[BASE_ALLOCATION]);
    c.expect_option_error(opt::SET_META_CONTEXT, &meta, rep::ERR_INVALID, "SET_META_CONTEXT before SR");
    c.expect_option_error(opt::LIST_META_CONTEXT, &meta, rep::ERR_INVALID, "LIST_META_CONTEXT before SR");
    c.expect_option_error(opt::STRUCTURED_REPLY, b"x", rep::ERR_INVALID, "STRUCTURED_REPLY with payload");

    // Unknown exports.
    c.expect_option_error(opt::GO, &InfoRequest::encode("nope", &[]), rep::ERR_UNKNOWN, "GO unknown export");
    c.expect_option_error(opt::INFO, &InfoRequest::encode("nope", &[]), rep::ERR_UNKNOWN, "INFO unknown");

    // A good INFO: unknown and repeated info requests are ignored, nothing is sent twice.
    c.send_option(opt::INFO, &InfoRequest::encode("", &[info::NAME, 0x7fff, info::BLOCK_SIZE, info::NAME]));
    let (size, _, others) = c.info_replies(opt::INFO);
    assert_eq!(size, SIZE);
    let decoded: Vec<InfoReply> = others.iter().map(|p| InfoReply::decode(p).unwrap()).collect();
    assert_eq!(decoded.iter().filter(|r| matches!(r, InfoReply::Name(_))).count(), 1, "{decoded:?}");
    let Some(InfoReply::BlockSize { minimum, preferred, maximum }) =
        decoded.iter().find(|r| matches!(r, InfoReply::BlockSize { .. })).cloned()
    else {
        panic!("no NBD_INFO_BLOCK_SIZE in {decoded:?}")
    };
    assert!(minimum.is_power_of_two() && preferred.is_power_of_two() && minimum <= preferred);
    assert!(maximum >= preferred, "block sizes {minimum}/{preferred}/{maximum}");

    // After all that, GO on the same connection works.
    c.go("");
    c.write(0, &pattern(4096, 7));
    assert_eq!(c.read(0, 4096), pattern(4096, 7));
    c.disconnect();
    check_alive(&mut server, "option edge cases");
    assert!(server.stop().success());
}

#[test]
fn meta_context_edge_cases_with_structured_replies() {
    let mut server = Server::start(SIZE);
    let mut c = Conn::handshake(&server);
    c.structured_reply();

    let mut bad_count = MetaContextRequest::encode("", &[]);
    bad_count[4..8].copy_from_slice(&5u32.to_be_bytes());
    c.expect_option_error(opt::SET_META_CONTEXT, &bad_count, rep::ERR_INVALID, "query count beyond payload");
    let mut bad_query = MetaContextRequest::encode("", &[BASE_ALLOCATION]);
    bad_query[8..12].copy_from_slice(&0xffff_0000u32.to_be_bytes());
    c.expect_option_error(opt::LIST_META_CONTEXT, &bad_query, rep::ERR_INVALID, "query length 0xffff0000");
    c.expect_option_error(opt::SET_META_CONTEXT, &[1, 2, 3], rep::ERR_INVALID, "3-byte meta context payload");
    let unknown = MetaContextRequest::encode("nope", &[BASE_ALLOCATION]);
    c.expect_option_error(
        opt::SET_META_CONTEXT,
        &unknown,
        rep::ERR_UNKNOWN,
        "meta context of unknown export",
    );

    // LIST with no query lists base:allocation.
    c.send_option(opt::LIST_META_CONTEXT, &MetaContextRequest::encode("", &[]));
    let (t, p) = c.option_reply(opt::LIST_META_CONTEXT);
    assert_eq!(t, rep::META_CONTEXT);
    assert_eq!(MetaContextReply::decode(&p).unwrap().name, BASE_ALLOCATION);
    assert_eq!(c.option_reply(opt::LIST_META_CONTEXT).0, rep::ACK);

    // Unknown namespaces select nothing.
    c.send_option(opt::SET_META_CONTEXT, &MetaContextRequest::encode("", &["qemu:dirty-bitmap:x", "nope:"]));
    assert_eq!(c.option_reply(opt::SET_META_CONTEXT).0, rep::ACK, "unknown contexts are ignored");

    // Select base:allocation, then GO and ask for block status.
    c.send_option(opt::SET_META_CONTEXT, &MetaContextRequest::encode("", &[BASE_ALLOCATION]));
    let (t, p) = c.option_reply(opt::SET_META_CONTEXT);
    assert_eq!(t, rep::META_CONTEXT);
    let selected = MetaContextReply::decode(&p).unwrap();
    assert_eq!(selected.name, BASE_ALLOCATION);
    let id = selected.id;
    assert_eq!(c.option_reply(opt::SET_META_CONTEXT).0, rep::ACK);
    c.go("");
    c.request(0, CMD_BLOCK_STATUS, 77, 0, 1 << 20, &[]);
    let r = c.reply();
    assert_eq!((r.cookie, r.error), (77, 0), "block status: {r:?}");
    assert_eq!(r.chunks, vec![chunk::BLOCK_STATUS]);
    assert_eq!(u32::from_be_bytes(r.block_status[..4].try_into().unwrap()), id, "context id");
    assert!(r.block_status.len() >= 12 && (r.block_status.len() - 4) % 8 == 0);
    c.disconnect();
    check_alive(&mut server, "meta context edge cases");
    assert!(server.stop().success());
}

#[test]
fn export_name_and_abort_options() {
    let mut server = Server::start(SIZE);

    // EXPORT_NAME cannot carry an error: an unknown name ends the connection.
    let mut c = Conn::handshake(&server);
    c.send_option(opt::EXPORT_NAME, b"nope");
    expect_closed(&mut c.s, "EXPORT_NAME of an unknown export");
    check_alive(&mut server, "EXPORT_NAME of an unknown export");

    let mut c = Conn::handshake(&server);
    c.send_option(opt::EXPORT_NAME, &[0xff, 0xfe]);
    expect_closed(&mut c.s, "EXPORT_NAME that is not UTF-8");
    check_alive(&mut server, "EXPORT_NAME that is not UTF-8");

    let mut c = Conn::handshake(&server);
    c.send_option(opt::EXPORT_NAME, &[b'a'; 8192]);
    expect_closed(&mut c.s, "EXPORT_NAME of 8 KiB");
    check_alive(&mut server, "EXPORT_NAME of 8 KiB");

    // EXPORT_NAME "" works; with NO_ZEROES the reply is 10 bytes, without it 134.
    for (flags, reply_len) in [(client_flags::KNOWN, 10), (client_flags::FIXED_NEWSTYLE, 134)] {
        let mut c = Conn::handshake_with_flags(&server, flags);
        c.send_option(OPT_UNKNOWN, &[]);
        assert_eq!(c.option_reply(OPT_UNKNOWN).0, rep::ERR_UNSUP);
        c.send_option(opt::EXPORT_NAME, b"");
        let reply = read_n(&mut c.s, reply_len, "EXPORT_NAME reply");
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
        assert_ne!(u16::from_be_bytes([reply[8], reply[9]]) & 1, 0, "HAS_FLAGS");
        assert!(reply[10..].iter().all(|&b| b == 0), "padding must be zeros");
        c.write(4096, &pattern(512, 3));
        assert_eq!(c.read(4096, 512), pattern(512, 3));
        c.disconnect();
    }

    // ABORT is acknowledged, then the server closes.
    let mut c = Conn::handshake(&server);
    c.send_option(opt::ABORT, &[]);
    assert_eq!(c.option_reply(opt::ABORT), (rep::ACK, vec![]));
    expect_closed(&mut c.s, "after ABORT");
    // ABORT without waiting for the ACK.
    let mut c = Conn::handshake(&server);
    c.send_option(opt::ABORT, &[]);
    drop(c);
    check_alive(&mut server, "ABORT");
    assert!(server.stop().success());
}

// ---------------------------------------------------------------------------------------------
// Transmission.
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_request_magic_drops_only_that_connection() {
    let mut server = Server::start(SIZE);

    let mut c = ready(&server);
    c.s.write_all(&[0x55; RequestHeader::LEN]).unwrap();
    expect_closed(&mut c.s, "bad request magic");
    check_alive(&mut server, "bad request magic");

    // Requests before the bad one are still answered, then the connection is dropped.
    let mut c = ready(&server);
    c.write(0, &pattern(4096, 1));
    c.request(0, CMD_READ, 1, 0, 4096, &[]);
    c.request(0, CMD_FLUSH, 2, 0, 0, &[]);
    let mut bad = RequestHeader { flags: 0, command: CMD_READ, cookie: 3, offset: 0, length: 4096 }.encode();
    bad[0] ^= 0x80;
    c.s.write_all(&bad).unwrap();
    let mut got = [c.reply(), c.reply()];
    got.sort_by_key(|r| r.cookie);
    assert_eq!((got[0].cookie, got[0].error), (1, 0));
    assert_eq!(got[0].data, pattern(4096, 1));
    assert_eq!((got[1].cookie, got[1].error), (2, 0));
    expect_closed(&mut c.s, "bad request magic after valid requests");
    check_alive(&mut server, "bad request magic after valid requests");

    // The simple reply magic sent back at the server.
    let mut c = ready(&server);
    let mut echo = Vec::new();
    SimpleReply { error: 0, cookie: 9 }.encode_into(&mut echo);
    echo.extend_from_slice(&[0; 12]);
    c.s.write_all(&echo).unwrap();
    expect_closed(&mut c.s, "a reply magic as request");
    check_alive(&mut server, "a reply magic as request");
    assert!(server.stop().success());
}

#[test]
fn invalid_requests_get_einval_and_the_connection_stays_usable() {
    let mut server = Server::start(SIZE);
    let mut c = ready(&server);
    c.write(0, &pattern(4096, 9));

    let cases: &[(&str, u16, u16, u64, u32, u32)] = &[
        ("unknown command 42", 0, 42, 0, 0, EINVAL),
        ("unknown command 42 with length", 0, 42, 0, 4096, EINVAL),
        ("unknown command 0xffff", 0, 0xffff, 0, 512, EINVAL),
        ("READ with unknown flag bit 7", 1 << 7, CMD_READ, 0, 4096, EINVAL),
        ("READ with unknown flag bit 15", 1 << 15, CMD_READ, 0, 4096, EINVAL),
        ("READ with DF without structured replies", cmd_flags::DF, CMD_READ, 0, 4096, EINVAL),
        ("READ with REQ_ONE", cmd_flags::REQ_ONE, CMD_READ, 0, 4096, EINVAL),
        ("READ past the end", 0, CMD_READ, SIZE - 512, 4096, EINVAL),
        ("READ at the end", 0, CMD_READ, SIZE, 1, EINVAL),
        ("READ far past the end", 0, CMD_READ, 1 << 62, 512, EINVAL),
        ("READ with offset+length overflowing u64", 0, CMD_READ, u64::MAX - 100, 4096, EINVAL),
        ("READ of length 0", 0, CMD_READ, 0, 0, EINVAL),
        ("READ of 64 MiB", 0, CMD_READ, 0, 64 << 20, EINVAL),
        ("READ of 4 GiB - 1", 0, CMD_READ, 0, u32::MAX, EINVAL),
        ("TRIM past the end", 0, CMD_TRIM, SIZE - 512, 4096, EINVAL),
        ("TRIM overflowing u64", 0, CMD_TRIM, u64::MAX, 2, EINVAL),
        ("TRIM of length 0", 0, CMD_TRIM, 0, 0, EINVAL),
        ("CACHE past the end", 0, CMD_CACHE, SIZE, 4096, EINVAL),
        ("FLUSH with unknown flag", 1 << 9, CMD_FLUSH, 0, 0, EINVAL),
        ("WRITE_ZEROES with DF", cmd_flags::DF, CMD_WRITE_ZEROES, 0, 4096, EINVAL),
        ("WRITE_ZEROES past the end", 0, CMD_WRITE_ZEROES, SIZE - 512, 4096, ENOSPC),
        ("BLOCK_STATUS without a meta context", 0, CMD_BLOCK_STATUS, 0, 4096, EINVAL),
        ("DISC with unknown flag", 1 << 6, CMD_DISC, 0, 0, EINVAL),
    ];
    for &(what, flags, command, offset, length, expected) in cases {
        c.expect_error(flags, command, offset, length, &[], expected);
        // The connection is still in sync: a good request right after gets its own answer.
        assert_eq!(c.read(0, 4096), pattern(4096, 9), "READ after {what}");
        assert!(server.is_running(), "rdbd died on {what}");
    }
    // A valid read right up to the end still works (the range checks are not off by one).
    assert_eq!(c.read(SIZE - 4096, 4096).len(), 4096);
    c.expect_error(cmd_flags::FUA, CMD_READ, SIZE - 1, 1, &[], 0);
    c.disconnect();
    check_alive(&mut server, "invalid requests");
    assert!(server.stop().success());
}

/// A WRITE payload made of well-formed WRITE requests to offset 0: if the server ever parsed a
/// refused payload as requests, offset 0 would be overwritten with "EVIL".
fn booby_trapped_payload(len: usize) -> Vec<u8> {
    let mut unit =
        RequestHeader { flags: 0, command: CMD_WRITE, cookie: 0xe71, offset: 0, length: 4 }.encode().to_vec();
    unit.extend_from_slice(b"EVIL");
    unit.iter().copied().cycle().take(len).collect()
}

#[test]
fn refused_writes_consume_their_payload() {
    let mut server = Server::start(SIZE);
    let mut c = ready(&server);
    let good = pattern(4096, 42);
    c.write(0, &good);

    let trap = booby_trapped_payload(4096);
    let cases: &[(&str, u16, u64, u32, u32)] = &[
        ("WRITE past the end", 0, SIZE - 512, 4096, ENOSPC),
        ("WRITE at the end", 0, SIZE, 4096, ENOSPC),
        // The protocol asks for ENOSPC on writes beyond the end; nbdkit does the same on overflow.
        ("WRITE with offset+length overflowing u64", 0, u64::MAX - 100, 4096, ENOSPC),
        ("WRITE with unknown flag bit 8", 1 << 8, 0, 4096, EINVAL),
        ("WRITE with DF", cmd_flags::DF, 0, 4096, EINVAL),
        ("WRITE with NO_HOLE", cmd_flags::NO_HOLE, 0, 4096, EINVAL),
        ("WRITE of length 0", 0, 0, 0, EINVAL),
    ];
    for &(what, flags, offset, length, expected) in cases {
        c.expect_error(flags, CMD_WRITE, offset, length, &trap[..length as usize], expected);
        assert_eq!(c.read(0, 4096), good, "data at 0 after {what}");
    }
    // Nothing was written partially at the end of the export.
    assert!(c.read(SIZE - 512, 512).iter().all(|&b| b == 0), "a refused WRITE wrote past-the-end data");

    // A 64 MiB WRITE (twice the maximum) with its whole payload: EINVAL, payload skipped.
    let big = booby_trapped_payload(64 << 20);
    c.expect_error(0, CMD_WRITE, 0, 64 << 20, &big, EINVAL);
    assert_eq!(c.read(0, 4096), good, "data at 0 after a 64 MiB WRITE");
    // And one just over the maximum, at the end of the export.
    let over = MAX_PAYLOAD + 1;
    c.expect_error(0, CMD_WRITE, SIZE - 4096, over, &big[..over as usize], EINVAL);
    assert_eq!(c.read(0, 4096), good);
    // A WRITE of the whole 16 MiB export in one request is accepted.
    let whole = pattern(SIZE as usize, 5);
    c.write(0, &whole);
    assert_eq!(c.read(SIZE - 4096, 4096), whole[whole.len() - 4096..]);
    c.disconnect();
    check_alive(&mut server, "refused writes");
    assert!(server.stop().success());
}

#[test]
fn structured_replies_carry_errors_as_chunks() {
    let mut server = Server::start(SIZE);
    let mut c = Conn::handshake(&server);
    c.structured_reply();
    let (_, flags) = c.go("");
    assert_ne!(flags & (1 << 7), 0, "SEND_DF with structured replies");
    c.write(8192, &pattern(4096, 11));

    let trap = booby_trapped_payload(4096);
    let cases: &[Case] = &[
        ("unknown command", 0, 42, 0, 0, &[], EINVAL),
        ("READ with unknown flag", 1 << 7, CMD_READ, 0, 4096, &[], EINVAL),
        ("READ past the end", 0, CMD_READ, SIZE - 512, 4096, &[], EINVAL),
        ("READ of length 0", 0, CMD_READ, 0, 0, &[], EINVAL),
        ("READ overflowing u64", 0, CMD_READ, u64::MAX - 1, 4, &[], EINVAL),
        ("DF on WRITE", cmd_flags::DF, CMD_WRITE, 0, 4096, &trap, EINVAL),
        ("WRITE past the end", 0, CMD_WRITE, SIZE - 512, 4096, &trap, ENOSPC),
        ("BLOCK_STATUS without a context", 0, CMD_BLOCK_STATUS, 0, 4096, &[], EINVAL),
    ];
    for &(what, flags, command, offset, length, payload, expected) in cases {
        let r = c.expect_error(flags, command, offset, length, payload, expected);
        assert!(!r.simple && r.chunks == [chunk::ERROR], "{what}: error not sent as one ERROR chunk: {r:?}");
        assert_eq!(c.read(8192, 4096), pattern(4096, 11), "READ after {what}");
    }

    // DF is allowed here and gives exactly one data chunk.
    c.request(cmd_flags::DF, CMD_READ, 5, 8192, 4096, &[]);
    let r = c.reply();
    assert_eq!((r.cookie, r.error), (5, 0));
    assert_eq!(r.chunks, vec![chunk::OFFSET_DATA]);
    assert_eq!(r.data, pattern(4096, 11));
    c.disconnect();
    check_alive(&mut server, "structured errors");
    assert!(server.stop().success());
}

#[test]
fn clients_vanishing_mid_request_are_survived() {
    let mut server = Server::start(SIZE);

    // In the middle of a request header.
    let mut c = ready(&server);
    c.s.write_all(
        &RequestHeader { flags: 0, command: CMD_READ, cookie: 1, offset: 0, length: 512 }.encode()[..10],
    )
    .unwrap();
    drop(c);
    check_alive(&mut server, "a client that closed mid-header");

    // In the middle of a WRITE payload (small and large).
    for (len, sent) in [(64 << 10, 1000usize), (MAX_PAYLOAD, 8 << 20)] {
        let mut c = ready(&server);
        let header = RequestHeader { flags: 0, command: CMD_WRITE, cookie: 2, offset: 0, length: len };
        c.s.write_all(&header.encode()).unwrap();
        c.s.write_all(&vec![0xab; sent]).unwrap();
        drop(c);
        check_alive(&mut server, &format!("a client that closed after {sent} of {len} payload bytes"));
    }

    // In the middle of the payload of a refused (oversized) WRITE.
    let mut c = ready(&server);
    c.s.write_all(
        &RequestHeader { flags: 0, command: CMD_WRITE, cookie: 3, offset: 0, length: 64 << 20 }.encode(),
    )
    .unwrap();
    c.s.write_all(&vec![0xcd; 1 << 20]).unwrap();
    drop(c);
    check_alive(&mut server, "a client that closed inside a refused WRITE payload");

    // Right after GO, and right after sending a READ (reply never read).
    drop(ready(&server));
    let mut c = ready(&server);
    c.request(0, CMD_READ, 4, 0, 1 << 20, &[]);
    drop(c);
    check_alive(&mut server, "a client that closed before its READ reply");

    // Half-close: the client shuts its sending side after a request; the reply still arrives.
    let mut c = ready(&server);
    c.request(0, CMD_READ, 5, 0, 4096, &[]);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    let r = c.reply();
    assert_eq!((r.cookie, r.error, r.data.len()), (5, 0, 4096), "reply after the client half-closed");
    expect_closed(&mut c.s, "after the client half-closed");
    check_alive(&mut server, "a half-closed client");
    assert!(server.stop().success());
}

/// Sends `count` pipelined requests (see `pipelined_request`) from a second thread.
fn pipeline(s: UnixStream, count: u64, data_base: u64) -> thread::JoinHandle<std::io::Result<()>> {
    thread::spawn(move || {
        let mut s = s;
        let mut batch = Vec::new();
        for cookie in 0..count {
            let (flags, command, offset, length, payload) = pipelined_request(cookie, data_base);
            batch.extend_from_slice(&RequestHeader { flags, command, cookie, offset, length }.encode());
            batch.extend_from_slice(&payload);
            if batch.len() > 64 << 10 {
                s.write_all(&batch)?;
                batch.clear();
            }
        }
        s.write_all(&batch)
    })
}

/// The request with `cookie` in a pipeline: a mix of reads, writes, flushes and invalid requests.
/// Returns (flags, command, offset, length, payload).
fn pipelined_request(cookie: u64, data_base: u64) -> (u16, u16, u64, u32, Vec<u8>) {
    match cookie % 6 {
        0 | 1 => (0, CMD_READ, (cookie % 256) * 4096, 4096, vec![]),
        2 => (0, CMD_WRITE, data_base + cookie * 512, 512, pattern(512, cookie as u8)),
        3 => (0, CMD_FLUSH, 0, 0, vec![]),
        4 => (0, 42, 0, 0, vec![]),
        _ => (0, CMD_READ, SIZE, 512, vec![]),
    }
}

#[test]
fn pipelined_requests_are_all_answered() {
    let mut server = Server::start(SIZE);
    let mut setup = ready(&server);
    let base = pattern(1 << 20, 77);
    setup.write(0, &base);
    setup.disconnect();

    // Far more requests than the server keeps in flight (512) and than its receive buffer holds.
    for count in [600u64, 3000, 20_000] {
        let mut c = ready(&server);
        let data_base = 4 << 20;
        let writer = pipeline(c.s.try_clone().unwrap(), count, data_base);
        for cookie in 0..count {
            if pipelined_request(cookie, data_base).1 == CMD_READ {
                c.reads.insert(cookie, pipelined_request(cookie, data_base).3 as usize);
            }
        }
        let mut seen = vec![false; count as usize];
        for n in 0..count {
            let head =
                read_n(&mut c.s, SimpleReply::LEN, &format!("reply {n} of {count} pipelined requests"));
            let r = SimpleReply::decode(&head).expect("simple reply magic");
            assert!(
                r.cookie < count && !seen[r.cookie as usize],
                "unexpected or repeated cookie {}",
                r.cookie
            );
            seen[r.cookie as usize] = true;
            let (_, command, offset, length, _) = pipelined_request(r.cookie, data_base);
            let expected = match (command, offset) {
                (42, _) => EINVAL,
                (CMD_READ, SIZE) => EINVAL,
                _ => 0,
            };
            assert_eq!(r.error, expected, "cookie {} (command {command} at {offset})", r.cookie);
            let len = c.reads.remove(&r.cookie);
            if r.error == 0 && command == CMD_READ {
                assert_eq!(len, Some(length as usize));
                let data = read_n(&mut c.s, length as usize, "pipelined read data");
                assert_eq!(
                    data,
                    base[offset as usize..offset as usize + length as usize],
                    "cookie {}",
                    r.cookie
                );
            }
        }
        writer.join().unwrap().expect("sending the pipeline");
        // Every pipelined WRITE landed where it should.
        for cookie in (0..count).filter(|c| c % 6 == 2).step_by(97) {
            assert_eq!(c.read(data_base + cookie * 512, 512), pattern(512, cookie as u8), "write {cookie}");
        }
        c.disconnect();
        check_alive(&mut server, &format!("{count} pipelined requests"));
    }
    assert!(server.stop().success());
}

/// Regression: requests left in the receive buffer when the server reached its in-flight limit
/// (512) were not parsed until more bytes arrived, so a client that sent 600 requests in one go
/// and waited for the replies hung after the 512th.
#[test]
fn requests_buffered_beyond_the_in_flight_limit_are_answered() {
    let mut server = Server::start(SIZE);
    let mut c = ready(&server);
    let mut batch = Vec::new();
    for cookie in 0..600 {
        batch.extend_from_slice(
            &RequestHeader { flags: 0, command: 42, cookie, offset: 0, length: 0 }.encode(),
        );
    }
    c.s.write_all(&batch).unwrap();
    let mut seen = vec![false; 600];
    for n in 0..600 {
        let r = c.reply();
        assert!(r.cookie < 600 && !seen[r.cookie as usize], "reply {n}: bad cookie {}", r.cookie);
        seen[r.cookie as usize] = true;
        assert_eq!(r.error, EINVAL);
    }
    // Nothing more than one reply per request.
    c.request(0, CMD_FLUSH, 1000, 0, 0, &[]);
    assert_eq!((c.reply().cookie, 0), (1000, 0));
    c.disconnect();
    check_alive(&mut server, "600 requests in one send");
    assert!(server.stop().success());
}

/// Regression: once the 256 KiB receive buffer filled up with unparsed requests, the server read
/// into an empty slice, took the 0 for end of stream and dropped the connection.
#[test]
fn a_full_receive_buffer_is_not_mistaken_for_end_of_stream() {
    let mut server = Server::start(SIZE);
    let mut c = ready(&server);
    let count = 20_000u64; // 560 KB of headers
    let mut tx = c.s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut batch = Vec::new();
        for cookie in 0..count {
            batch.extend_from_slice(
                &RequestHeader { flags: 0, command: 42, cookie, offset: 0, length: 0 }.encode(),
            );
        }
        tx.write_all(&batch)
    });
    for n in 0..count {
        let head = read_n(&mut c.s, SimpleReply::LEN, &format!("reply {n} of {count}"));
        let r = SimpleReply::decode(&head).unwrap();
        assert_eq!(r.error, EINVAL, "cookie {}", r.cookie);
    }
    writer.join().unwrap().expect("the server must keep reading all requests");
    assert_eq!(c.read(0, 4096).len(), 4096);
    c.disconnect();
    check_alive(&mut server, "20000 requests in one send");
    assert!(server.stop().success());
}

/// Large WRITEs (which the server may splice from the socket straight into the file) pipelined in
/// one send with small requests, refused writes and an unaligned length: every reply arrives, and
/// every byte lands where it belongs.
#[test]
fn large_writes_mixed_with_other_requests() {
    let mut server = Server::start(SIZE);
    for structured in [false, true] {
        let mut c = Conn::handshake(&server);
        if structured {
            c.structured_reply();
        }
        c.go("");
        for round in 0..2u8 {
            let p1 = pattern(1 << 20, 1 + round);
            let p2 = pattern((128 << 10) + 5, 2 + round);
            let p3 = pattern(64 << 10, 3 + round);
            let p4 = pattern(64 << 10, 4 + round);
            let p5 = pattern(300 << 10, 5 + round);
            let trap = booby_trapped_payload(256 << 10);
            let requests: Vec<Pipelined> = vec![
                (1, 0, CMD_WRITE, 0, &p1, 0),
                (2, 0, CMD_READ, 15 << 20, &[], 0),
                (3, 0, CMD_WRITE, (2 << 20) + 3, &p2, 0),
                (4, cmd_flags::FUA, CMD_WRITE, 4 << 20, &p3, 0),
                (5, 0, CMD_WRITE, SIZE - (128 << 10), &trap, ENOSPC),
                (6, 0, CMD_FLUSH, 0, &[], 0),
                (7, 0, CMD_WRITE, SIZE - (64 << 10), &p4, 0),
                (8, 0, 42, 0, &[], EINVAL),
                (9, 0, CMD_WRITE, 6 << 20, &p5, 0),
                (10, 1 << 12, CMD_WRITE, 8 << 20, &p5, EINVAL),
            ];
            let mut msg = Vec::new();
            for &(cookie, flags, command, offset, payload, _) in &requests {
                let length = if command == CMD_READ { 4096 } else { payload.len() as u32 };
                if command == CMD_READ {
                    c.reads.insert(cookie, 4096);
                }
                msg.extend_from_slice(&RequestHeader { flags, command, cookie, offset, length }.encode());
                msg.extend_from_slice(payload);
            }
            c.s.write_all(&msg).unwrap();
            let mut errors = HashMap::new();
            for _ in &requests {
                let r = c.reply();
                assert!(errors.insert(r.cookie, r.error).is_none(), "two replies for cookie {}", r.cookie);
            }
            for &(cookie, _, command, offset, _, expected) in &requests {
                assert_eq!(
                    errors.get(&cookie),
                    Some(&expected),
                    "cookie {cookie} (command {command} at {offset}), structured {structured}, round {round}"
                );
            }
            assert_eq!(c.read(0, 1 << 20), p1, "1 MiB write");
            assert_eq!(c.read((2 << 20) + 3, p2.len() as u32), p2, "unaligned 128 KiB write");
            assert_eq!(c.read(4 << 20, 64 << 10), p3, "FUA write");
            assert_eq!(c.read(SIZE - (64 << 10), 64 << 10), p4, "write up to the end");
            assert_eq!(c.read(6 << 20, 300 << 10), p5, "300 KiB write");
            assert!(c.read(SIZE - (128 << 10), 64 << 10).iter().all(|&b| b == 0), "refused write landed");
            assert!(c.read(8 << 20, 300 << 10).iter().all(|&b| b == 0), "refused write landed");
        }
        c.disconnect();
        check_alive(&mut server, &format!("large writes (structured: {structured})"));
    }
    assert!(server.stop().success());
}

#[test]
fn pipelined_requests_then_close_without_reading() {
    let mut server = Server::start(SIZE);
    let pid = server.pid();
    for (structured, count) in [(false, 2000u64), (true, 2000), (false, 50_000)] {
        let mut c = Conn::handshake(&server);
        if structured {
            c.structured_reply();
        }
        c.go("");
        let s = c.s.try_clone().unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        // The writer may block once the server stops reading because nobody reads its replies;
        // that is expected, and shutting the socket down below unblocks it.
        let writer = pipeline(s, count, 8 << 20);
        wait_unread_replies(&c.s, 32 << 10, &format!("{count} pipelined requests"));
        c.s.shutdown(std::net::Shutdown::Both).unwrap();
        let _ = writer.join().unwrap();
        drop(c);
        check_alive(
            &mut server,
            &format!("{count} pipelined requests and a close (structured: {structured})"),
        );
    }
    let rss = proc_status_kib(pid, "VmRSS:");
    assert!(rss < 400 << 10, "VmRSS {rss} kB after abandoned pipelines");
    assert!(server.stop().success());
}

#[test]
fn many_idle_and_active_connections() {
    let mut server = Server::start(SIZE);
    // Idle connections at every stage of the handshake hold no one else up.
    let mut idle = Vec::new();
    for i in 0..60 {
        let s = match i % 3 {
            0 => connect(&server),
            1 => Conn::handshake(&server).s,
            _ => ready(&server).s,
        };
        idle.push(s);
    }
    check_alive(&mut server, "60 idle connections");

    // 32 connections in transmission at once, each reading.
    let mut conns: Vec<Conn> = (0..32).map(|_| ready(&server)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.request(0, CMD_READ, i as u64, (i as u64) * 4096, 4096, &[]);
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let r = c.reply();
        assert_eq!((r.cookie, r.error, r.data.len()), (i as u64, 0, 4096));
    }
    drop(conns);
    drop(idle);
    check_alive(&mut server, "many connections");
    assert!(server.stop().success());
}

// ---------------------------------------------------------------------------------------------
// Concurrency: abuse on one connection does not stall another.
// ---------------------------------------------------------------------------------------------

/// Sends `data` in `pieces`, sleeping `gap` between them (a slow client: the pace is the point).
fn drip(s: &mut UnixStream, data: &[u8], pieces: usize, gap: Duration) -> std::io::Result<()> {
    for piece in data.chunks(data.len().div_ceil(pieces)) {
        s.write_all(piece)?;
        thread::sleep(gap);
    }
    Ok(())
}

#[test]
fn abuse_on_one_connection_does_not_stall_another() {
    let mut server = Server::start(SIZE);
    let region = pattern(1 << 20, 123);
    let mut setup = ready(&server);
    setup.write(0, &region);
    setup.disconnect();

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, region) = (stop.clone(), reads.clone(), region.clone());
        let mut c = ready(&server);
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let offset = (i * 4096 * 7) % (1 << 20);
                let data = c.read(offset, 4096);
                assert_eq!(data, region[offset as usize..offset as usize + 4096], "read at {offset}");
                reads.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            c.disconnect();
        })
    };
    let progress_during = |what: &str, abuse: &mut dyn FnMut()| {
        let before = reads.load(Ordering::Relaxed);
        let start = Instant::now();
        abuse();
        let done = reads.load(Ordering::Relaxed) - before;
        assert!(
            done >= 20,
            "only {done} reads completed on another connection during {what} ({:?})",
            start.elapsed()
        );
    };

    // A slow 4 GiB option.
    progress_during("a slowly dripped 4 GiB option", &mut || {
        let mut c = Conn::handshake(&server);
        let mut msg = OptionHeader { option: opt::GO, length: 0xffff_fff0 }.encode().to_vec();
        msg.extend_from_slice(&[0; 64 << 10]);
        drip(&mut c.s, &msg, 50, Duration::from_millis(20)).unwrap();
    });
    // A slow, maximum-size WRITE payload.
    progress_during("a slowly dripped 32 MiB WRITE", &mut || {
        let mut c = ready(&server);
        let mut msg =
            RequestHeader { flags: 0, command: CMD_WRITE, cookie: 1, offset: 0, length: MAX_PAYLOAD }
                .encode()
                .to_vec();
        msg.extend_from_slice(&vec![0; 4 << 20]);
        drip(&mut c.s, &msg, 50, Duration::from_millis(20)).unwrap();
    });
    // A slow refused 64 MiB WRITE.
    progress_during("a slowly dripped refused 64 MiB WRITE", &mut || {
        let mut c = ready(&server);
        let mut msg = RequestHeader { flags: 0, command: CMD_WRITE, cookie: 1, offset: 0, length: 64 << 20 }
            .encode()
            .to_vec();
        msg.extend_from_slice(&booby_trapped_payload(8 << 20));
        drip(&mut c.s, &msg, 50, Duration::from_millis(20)).unwrap();
    });
    // A flood of invalid requests for one second, in batches of 256 whose replies are read
    // before the next batch (so that the flood stays within the server's in-flight limit).
    progress_during("a flood of invalid requests", &mut || {
        let mut c = ready(&server);
        let mut batch = Vec::new();
        for cookie in 0..256 {
            batch.extend_from_slice(
                &RequestHeader { flags: 1 << 9, command: 99, cookie, offset: 0, length: 0 }.encode(),
            );
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            c.s.write_all(&batch).unwrap();
            for _ in 0..256 {
                assert_eq!(c.reply().error, EINVAL);
            }
        }
        c.disconnect();
    });
    // Garbage connections opened and closed in a loop.
    progress_during("100 garbage connections", &mut || {
        for i in 0..100u32 {
            let mut c = Conn::handshake_with_flags(&server, 0xffff_0000 | i);
            expect_closed(&mut c.s, "garbage flags");
            // Paced, not waiting for anything: the abuse lasts long enough for the reader to
            // show progress during it.
            thread::sleep(Duration::from_millis(5));
        }
    });

    stop.store(true, Ordering::Relaxed);
    reader.join().expect("the reading connection failed during the abuse");
    assert!(reads.load(Ordering::Relaxed) > 100);
    check_alive(&mut server, "concurrent abuse");
    assert!(server.stop().success());
}

/// A client that keeps its connection open but never reads its replies must not hold up a
/// clean shutdown: in-flight requests finish, and unsent replies are abandoned after a grace
/// period instead of blocking the exit forever.
#[test]
fn shutdown_does_not_wait_forever_for_a_client_that_never_reads() {
    let mut server = Server::start(SIZE);
    let c = ready(&server);
    let s = c.s.try_clone().unwrap();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // Far more reply data than the socket buffers hold.
    let writer = pipeline(s, 5000, 8 << 20);
    wait_unread_replies(&c.s, 32 << 10, "5000 pipelined requests");
    let started = std::time::Instant::now();
    let status = server.stop();
    assert!(status.success(), "rdbd exited with {status}; log:\n{}", server.log());
    assert!(started.elapsed() < Duration::from_secs(25), "shutdown took {:?}", started.elapsed());
    let _ = writer.join().unwrap();
    c.s.shutdown(std::net::Shutdown::Both).ok();
}
