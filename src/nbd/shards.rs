//! Thread-per-core execution for connections.
//!
//! Each shard is one thread running a single-threaded tokio runtime. A connection lives on one
//! shard for its whole life, so its socket, its io_uring and its buffers are only ever touched
//! by one thread: no work stealing, no cross-core wakeups on the data path.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub struct Shards {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    next: AtomicUsize,
}

impl Shards {
    /// Starts `count` shard threads (at least one).
    pub fn start(count: usize) -> std::io::Result<Self> {
        let mut shards =
            Self { handles: Vec::new(), stops: Vec::new(), threads: Vec::new(), next: AtomicUsize::new(0) };
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            shards.handles.push(runtime.handle().clone());
            shards.stops.push(stop_tx);
            let thread = std::thread::Builder::new().name(format!("rdbd-shard-{i}")).spawn(move || {
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
            })?;
            shards.threads.push(thread);
        }
        Ok(shards)
    }

    /// One shard per available CPU.
    pub fn per_cpu() -> std::io::Result<Self> {
        Self::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Runs `future` on shard `index` (modulo the shard count).
    pub fn spawn_on<F>(&self, index: usize, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[index % self.handles.len()].spawn(future)
    }

    /// Runs `future` on the next shard (round robin).
    pub fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(future);
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
