//! A RAM disk served over NBD: shows that anything implementing `BlockDevice` + `IoQueue` (as
//! the replicated device does) plugs under the same NBD server as a local file.
//!
//!     cargo run --example ram_disk -- /tmp/ram.sock 64
//!     nbdinfo 'nbd+unix:///?socket=/tmp/ram.sock'

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rdbd::nbd::{Export, Exports, Listener, Server, Shards};
use rdbd::storage::{BlockDevice, Completion, DeviceInfo, Extent, IoError, IoOp, IoQueue};

struct RamDisk {
    bytes: Mutex<Vec<u8>>,
}

impl BlockDevice for RamDisk {
    fn info(&self) -> DeviceInfo {
        let size = self.bytes.lock().unwrap().len() as u64;
        DeviceInfo { size, read_only: false, rotational: false, min_block: 1, can_trim: true }
    }

    fn open_queue(self: Arc<Self>) -> std::io::Result<Box<dyn IoQueue>> {
        Ok(Box::new(RamQueue { disk: self, done: Vec::new() }))
    }

    fn block_status(&self, _offset: u64, len: u64, _max: usize) -> Result<Vec<Extent>, IoError> {
        Ok(vec![Extent { len, hole: false }])
    }

    // Memory has nothing to make durable: a RAM disk is gone with the process either way.
    fn sync(&self) -> Result<(), IoError> {
        Ok(())
    }
}

/// Every operation completes as soon as it is submitted.
struct RamQueue {
    disk: Arc<RamDisk>,
    done: Vec<Completion>,
}

impl IoQueue for RamQueue {
    fn submit(&mut self, tag: u32, op: IoOp) {
        let mut bytes = self.disk.bytes.lock().unwrap();
        let range = |offset: u64, len: u64| offset as usize..(offset + len) as usize;
        match &op {
            IoOp::Read { .. } => {}
            IoOp::Write { offset, buf, .. } => bytes[range(*offset, buf.len() as u64)].copy_from_slice(buf),
            IoOp::Trim { offset, len, .. } | IoOp::WriteZeroes { offset, len, .. } => {
                bytes[range(*offset, *len)].fill(0)
            }
            IoOp::Flush | IoOp::Cache { .. } => {}
        }
        let buf = match op {
            IoOp::Read { offset, mut buf } => {
                let len = buf.len() as u64;
                buf.copy_from_slice(&bytes[range(offset, len)]);
                Some(buf)
            }
            other => other.into_buf(),
        };
        self.done.push(Completion { tag, result: Ok(()), buf });
    }

    fn poll_complete(&mut self, _cx: &mut Context<'_>, out: &mut Vec<Completion>) -> Poll<()> {
        out.append(&mut self.done);
        Poll::Ready(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().unwrap_or_else(|| "/tmp/rdbd-ram.sock".into());
    let mib: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let disk = Arc::new(RamDisk { bytes: Mutex::new(vec![0; mib << 20]) });
        let export = Export { name: "ram".into(), description: "RAM disk example".into(), device: disk };
        let server = Server::new(Exports::single(export), Arc::new(Shards::start(1)?));
        let _ = std::fs::remove_file(&socket);
        let listener = Listener::Unix(tokio::net::UnixListener::bind(&socket)?);
        println!("serving a {mib} MiB RAM disk at nbd+unix:///ram?socket={socket} (Ctrl-C to stop)");
        let stop = server.shutdown_token();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        server.serve(vec![listener]).await;
        Ok(())
    })
}
