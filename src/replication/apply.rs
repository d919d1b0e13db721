//! The receiving side of replication: applies the peer's writes to the local device and
//! acknowledges them as each message asks (none, on receipt, or once on disk).
//!
//! Ordering: a write is started only when it overlaps no earlier write still in flight or
//! waiting, so overlapping writes land in the order they were sent whatever the protocol.
//! FLUSH is a barrier: every write received before it completes, then the device is made
//! durable (fdatasync), then FlushAck — so a FLUSH acknowledged means durable here too.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use rdbd_protocol::repl::{block_crc32c, AckMode, Message};
use slab::Slab;

use super::link::framed::{FrameError, Framed};
use crate::storage::{BlockDevice, BufPool, Completion, IoError, IoOp, IoQueue};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("data block at offset {offset} failed its CRC-32C check")]
    Integrity { offset: u64 },
    #[error("peer sent a write beyond the device ({offset} + {len} > {size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("peer sent an unexpected message (kind {0:#x}) on the data channel")]
    Unexpected(u16),
    #[error("cannot open a queue on the local device: {0}")]
    Queue(std::io::Error),
}

/// Counters of what was applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub writes: u64,
    pub bytes: u64,
    pub flushes: u64,
    pub failed: u64,
}

/// A request received and not yet acknowledged.
struct Received {
    seq: u64,
    ack: AckMode,
    /// Arrival order, for barriers.
    index: u64,
    /// Byte range written (empty for a flush).
    range: (u64, u64),
    op: Option<IoOp>,
    is_flush: bool,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Applies the peer's replication stream to a device.
pub struct Applier {
    device: Arc<dyn BlockDevice>,
    queue: Box<dyn IoQueue>,
    pool: BufPool,
    integrity: bool,
    size: u64,
    /// Started on the device; the key is the queue tag.
    running: Slab<Received>,
    /// Held back by an overlap or a barrier, in arrival order.
    waiting: VecDeque<Received>,
    /// Arrival indices of writes not yet complete (running or waiting).
    open_writes: BTreeSet<u64>,
    next_index: u64,
    acks: Vec<Message<'static>>,
    completions: Vec<Completion>,
    pub stats: ApplyStats,
}

impl Applier {
    pub fn new(device: Arc<dyn BlockDevice>, integrity: bool) -> Result<Self, ApplyError> {
        let queue = device.clone().open_queue().map_err(ApplyError::Queue)?;
        let size = device.info().size;
        Ok(Self {
            device,
            queue,
            pool: BufPool::new(),
            integrity,
            size,
            running: Slab::new(),
            waiting: VecDeque::new(),
            open_writes: BTreeSet::new(),
            next_index: 0,
            acks: Vec::new(),
            completions: Vec::new(),
            stats: ApplyStats::default(),
        })
    }

    /// Applies messages from `data` and acknowledges on `meta` until the peer closes the data
    /// channel; then finishes what is in flight.
    pub async fn run(&mut self, data: &mut Framed, meta: &mut Framed) -> Result<ApplyStats, ApplyError> {
        let mut open = true;
        let mut meta_open = true;
        while open || !self.running.is_empty() || !self.waiting.is_empty() {
            for ack in std::mem::take(&mut self.acks) {
                meta.send(&ack).await?;
            }
            let busy = self.queue.in_flight() > 0;
            tokio::select! {
                received = data.recv(), if open => match received {
                    Ok(message) => {
                        let accepted = self.accept(message);
                        accepted?;
                    }
                    Err(FrameError::Closed) => open = false,
                    Err(e) => return Err(e.into()),
                },
                // The primary's liveness pings arrive on the meta channel.
                received = meta.recv(), if meta_open => match received {
                    Ok(Message::Ping) => self.acks.push(Message::PingAck),
                    Ok(Message::PingAck) => {}
                    Ok(other) => return Err(ApplyError::Unexpected(other.kind())),
                    Err(FrameError::Closed) => meta_open = false,
                    Err(e) => return Err(e.into()),
                },
                () = std::future::poll_fn(|cx| self.queue.poll_complete(cx, &mut self.completions)), if busy => {
                    for c in std::mem::take(&mut self.completions) {
                        self.complete(c);
                    }
                }
            }
            self.start_ready();
            if !open && self.queue.in_flight() == 0 && !self.waiting.is_empty() && self.running.is_empty() {
                // Nothing can unblock what waits: cannot happen, but never spin.
                break;
            }
        }
        for ack in std::mem::take(&mut self.acks) {
            meta.send(&ack).await?;
        }
        Ok(self.stats)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(u64, u64), ApplyError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok((offset, end)),
            _ => Err(ApplyError::OutOfRange { offset, len, size: self.size }),
        }
    }

    fn accept(&mut self, message: Message<'_>) -> Result<(), ApplyError> {
        let index = self.next_index;
        self.next_index += 1;
        let (seq, ack, range, op, is_flush) = match message {
            Message::Data(d) => {
                if self.integrity && block_crc32c(d.data) != d.crc32c {
                    return Err(ApplyError::Integrity { offset: d.offset });
                }
                let range = self.check_range(d.offset, d.data.len() as u64)?;
                let mut buf = self.pool.take(d.data.len());
                buf.copy_from_slice(d.data);
                (d.seq, d.ack, range, IoOp::Write { offset: d.offset, buf, fua: d.fua }, false)
            }
            Message::Trim(t) => {
                let range = self.check_range(t.offset, t.len)?;
                (t.seq, t.ack, range, IoOp::Trim { offset: t.offset, len: t.len, fua: t.fua }, false)
            }
            Message::Zeroes(z) => {
                let range = self.check_range(z.offset, z.len)?;
                let op = IoOp::WriteZeroes {
                    offset: z.offset,
                    len: z.len,
                    may_punch: z.may_punch,
                    fast_only: false,
                    fua: z.fua,
                };
                (z.seq, z.ack, range, op, false)
            }
            Message::Flush { seq } => (seq, AckMode::Write, (0, 0), IoOp::Flush, true),
            other => return Err(ApplyError::Unexpected(other.kind())),
        };
        if ack == AckMode::Recv {
            self.acks.push(Message::RecvAck { seq });
        }
        if !is_flush {
            self.open_writes.insert(index);
        }
        self.waiting.push_back(Received { seq, ack, index, range, op: Some(op), is_flush });
        Ok(())
    }

    /// Starts every waiting request that no earlier request blocks.
    fn start_ready(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            let r = &self.waiting[i];
            let blocked = if r.is_flush {
                // A barrier: every earlier write must be complete.
                self.open_writes.first().is_some_and(|&first| first < r.index)
            } else {
                let running = self.running.iter().any(|(_, o)| !o.is_flush && overlaps(o.range, r.range));
                let earlier = self.waiting.iter().take(i).any(|o| o.is_flush || overlaps(o.range, r.range));
                running || earlier
            };
            if blocked {
                i += 1;
                continue;
            }
            let mut r = self.waiting.remove(i).expect("index in range");
            let op = r.op.take().expect("waiting requests hold their operation");
            let tag = self.running.insert(r);
            self.queue.submit(tag as u32, op);
        }
    }

    fn complete(&mut self, c: Completion) {
        let Some(r) = self.running.try_remove(c.tag as usize) else { return };
        if let Some(buf) = c.buf {
            self.pool.give(buf);
        }
        if r.is_flush {
            self.stats.flushes += 1;
        } else {
            self.open_writes.remove(&r.index);
            self.stats.writes += 1;
            self.stats.bytes += r.range.1 - r.range.0;
        }
        match c.result {
            Ok(()) => {
                if r.is_flush {
                    self.acks.push(Message::FlushAck { seq: r.seq });
                } else if r.ack == AckMode::Write {
                    self.acks.push(Message::WriteAck { seq: r.seq });
                }
            }
            Err(e) => {
                // The peer marks the range out of sync (or fails the flush) on a NegAck.
                self.stats.failed += 1;
                let errno = match e {
                    IoError::Io(errno) => errno as u32,
                    IoError::NoSpace => libc::ENOSPC as u32,
                    IoError::ReadOnly => libc::EROFS as u32,
                    IoError::NotSupported => libc::EOPNOTSUPP as u32,
                    IoError::Shutdown => libc::ESHUTDOWN as u32,
                };
                self.acks.push(Message::NegAck { seq: r.seq, errno });
            }
        }
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FileDevice, OpenOptions};
    use rdbd_protocol::repl::Data;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (Framed, Framed) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Framed::new(a.unwrap()).unwrap(), Framed::new(b.unwrap().0).unwrap())
    }

    fn data(seq: u64, offset: u64, bytes: &[u8], ack: AckMode) -> Message<'_> {
        Message::Data(Data { seq, offset, fua: false, ack, crc32c: block_crc32c(bytes), data: bytes })
    }

    /// The primary's side of the test: sends `messages`, closes, collects every ack.
    async fn primary(mut data: Framed, mut meta: Framed, messages: Vec<Message<'_>>) -> Vec<String> {
        for m in &messages {
            data.send(m).await.unwrap();
        }
        drop(data);
        let mut acks = Vec::new();
        while let Ok(m) = meta.recv().await {
            acks.push(format!("{m:?}"));
        }
        acks
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_are_applied_in_order_and_acknowledged_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let opts = OpenOptions { size: Some(8 << 20), ..Default::default() };
        let device: Arc<dyn BlockDevice> = Arc::new(FileDevice::open_file(&path, &opts).unwrap());
        let ((pd, sd), (pm, sm)) = (pair().await, pair().await);

        // Overlapping writes without write acks (protocol A) must land in sending order;
        // the last one to the same bytes wins.
        let first = vec![1u8; 65536];
        let second = vec![2u8; 4096];
        let third = vec![3u8; 8192];
        let messages = vec![
            data(1, 0, &first, AckMode::None),
            data(2, 4096, &second, AckMode::None),
            data(3, 1 << 20, &third, AckMode::Recv),
            data(4, 2 << 20, &third, AckMode::Write),
            Message::Zeroes(rdbd_protocol::repl::Zeroes {
                seq: 5,
                offset: 6000,
                len: 100,
                may_punch: false,
                fua: false,
                ack: AckMode::Write,
            }),
            Message::Flush { seq: 6 },
        ];
        let mut applier = Applier::new(device, true).unwrap();
        let (mut sd, mut sm) = (sd, sm);
        let (acks, stats) = tokio::join!(primary(pd, pm, messages), async move {
            let stats = applier.run(&mut sd, &mut sm).await.unwrap();
            drop(sm);
            stats
        });
        assert_eq!(
            stats,
            ApplyStats { writes: 5, bytes: 65536 + 4096 + 8192 + 8192 + 100, flushes: 1, failed: 0 }
        );
        assert!(acks.contains(&"RecvAck { seq: 3 }".to_string()), "{acks:?}");
        assert!(acks.contains(&"WriteAck { seq: 4 }".to_string()), "{acks:?}");
        assert!(acks.contains(&"WriteAck { seq: 5 }".to_string()), "{acks:?}");
        assert_eq!(
            acks.last().map(String::as_str),
            Some("FlushAck { seq: 6 }"),
            "the barrier is acknowledged last"
        );
        assert!(!acks.iter().any(|a| a.contains("seq: 1 ") || a.contains("seq: 2 ")), "protocol A: no acks");

        let disk = std::fs::read(&path).unwrap();
        assert!(disk[..4096].iter().all(|&b| b == 1));
        assert!(disk[4096..6000].iter().all(|&b| b == 2), "the later overlapping write wins");
        assert!(disk[6000..6100].iter().all(|&b| b == 0), "zeroed");
        assert!(disk[6100..8192].iter().all(|&b| b == 2));
        assert!(disk[8192..65536].iter().all(|&b| b == 1));
        assert!(disk[1 << 20..(1 << 20) + 8192].iter().all(|&b| b == 3));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_corrupted_block_and_an_out_of_range_write_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = OpenOptions { size: Some(1 << 20), ..Default::default() };
        let device: Arc<dyn BlockDevice> =
            Arc::new(FileDevice::open_file(&dir.path().join("d.img"), &opts).unwrap());
        for (offset, crc_ok) in [(0u64, false), (1 << 20, true)] {
            let ((mut pd, mut sd), (_pm, mut sm)) = (pair().await, pair().await);
            let bytes = vec![7u8; 4096];
            let crc = if crc_ok { block_crc32c(&bytes) } else { 12345 };
            let m = Message::Data(Data {
                seq: 1,
                offset,
                fua: false,
                ack: AckMode::Write,
                crc32c: crc,
                data: &bytes,
            });
            pd.send(&m).await.unwrap();
            let mut applier = Applier::new(device.clone(), true).unwrap();
            let err = applier.run(&mut sd, &mut sm).await.unwrap_err();
            if crc_ok {
                assert!(matches!(err, ApplyError::OutOfRange { .. }), "{err}");
            } else {
                assert!(matches!(err, ApplyError::Integrity { offset: 0 }), "{err}");
            }
        }
    }
}
