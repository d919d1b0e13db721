//! A TCP relay on the replication link, between the dialer (alpha) and the listener (beta), that
//! can lose what the dialer sends from one kind of message on: a one-way cut placed at an exact
//! point of the protocol (e.g. a SyncUuid that never arrives), which a firewall rule or a reset
//! (`ss -K`) cannot time. The dialer's config names the relay as the listener's address.
//!
//! The relay reads the dialer's bytes frame by frame (12-byte header: magic, kind, flags,
//! length) and forwards whole frames; the listener's bytes are copied as they come. Once the
//! armed kind shows up, it and everything the dialer sends after it are dropped, on every
//! connection; a connection ends (both ways) when either side closes it; new connections are
//! closed at once until [`Relay::mend`].

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdbd_protocol::repl::{FrameHeader, MAGIC};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Forwarding until the dialer sends a frame of this kind.
    LoseFrom(u16),
    /// The dialer's bytes are dropped; no new connection goes through.
    Cut,
}

struct Shared {
    mode: Mutex<Mode>,
    /// The armed kind was seen (and dropped).
    lost: AtomicBool,
    stop: AtomicBool,
    /// Every stream opened, to end them when the relay is dropped.
    streams: Mutex<Vec<TcpStream>>,
}

pub struct Relay {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Relay {
    /// Listens on a free loopback port and relays each connection to `target`.
    pub fn start(target: String) -> Relay {
        let port = super::cluster::free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the relay");
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Forward),
            lost: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::spawn(move || accept(listener, &target, &s));
        Relay { port, shared }
    }

    /// From the next frame of `kind` the dialer sends, nothing it sends arrives.
    pub fn lose_from(&self, kind: u16) {
        *self.shared.mode.lock().unwrap() = Mode::LoseFrom(kind);
    }

    /// Whether the armed frame was lost.
    pub fn lost(&self) -> bool {
        self.shared.lost.load(Ordering::Acquire)
    }

    /// New connections go through again.
    pub fn mend(&self) {
        *self.shared.mode.lock().unwrap() = Mode::Forward;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for s in self.shared.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept(listener: TcpListener, target: &str, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::Acquire) {
        let dialer = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => return,
        };
        if *shared.mode.lock().unwrap() == Mode::Cut {
            let _ = dialer.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(listener_side) = TcpStream::connect(target) else {
            let _ = dialer.shutdown(Shutdown::Both);
            continue;
        };
        dialer.set_nonblocking(false).unwrap();
        for s in [&dialer, &listener_side] {
            let _ = s.set_nodelay(true);
            shared.streams.lock().unwrap().push(s.try_clone().unwrap());
        }
        let (d, l) = (dialer.try_clone().unwrap(), listener_side.try_clone().unwrap());
        let s = shared.clone();
        std::thread::spawn(move || {
            forward_frames(&d, &l, &s);
            end(&d, &l);
        });
        std::thread::spawn(move || {
            copy(&listener_side, &dialer);
            end(&dialer, &listener_side);
        });
    }
}

fn end(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

fn copy(mut from: &TcpStream, mut to: &TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// The dialer's side: whole frames, until the armed kind; then its bytes are read and dropped
/// until the connection ends. Bytes that are not frames are copied as they are.
fn forward_frames(mut from: &TcpStream, mut to: &TcpStream, shared: &Shared) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        loop {
            if *shared.mode.lock().unwrap() == Mode::Cut {
                pending.clear();
                break;
            }
            if pending.len() < FrameHeader::LEN {
                break;
            }
            let len = match FrameHeader::decode(&pending[..FrameHeader::LEN]) {
                Ok(h) => {
                    let mut mode = shared.mode.lock().unwrap();
                    if *mode == Mode::LoseFrom(h.kind) {
                        *mode = Mode::Cut;
                        shared.lost.store(true, Ordering::Release);
                        continue;
                    }
                    FrameHeader::LEN + h.length as usize
                }
                // Not a frame of ours (no magic): pass it on unread.
                Err(_) if pending[..4] != MAGIC.to_be_bytes() => pending.len(),
                Err(_) => return,
            };
            if pending.len() < len {
                break;
            }
            if to.write_all(&pending[..len]).is_err() {
                return;
            }
            pending.drain(..len);
        }
    }
}
