//! Accepting connections: TCP and unix listeners, one task per connection, and a graceful
//! shutdown that lets every connection finish its in-flight requests.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::export::Exports;
use super::handshake::{negotiate, Negotiated};
use super::session::{Session, SessionEnd};
use super::shards::Shards;
use super::socket::Socket;

/// Where the server listens.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(OwnedFd, String)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                stream.set_nodelay(true)?;
                Ok((stream.into_std()?.into(), peer.to_string()))
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                Ok((stream.into_std()?.into(), "unix".to_string()))
            }
        }
    }
}

/// An NBD server: exports, the connections serving them, and the shutdown signal they share.
pub struct Server {
    exports: Arc<Exports>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    shards: Arc<Shards>,
}

impl Server {
    /// A server whose connections run on `shards`.
    pub fn new(exports: Exports, shards: Arc<Shards>) -> Self {
        Self {
            exports: Arc::new(exports),
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            shards,
        }
    }

    /// Client connections open now (including ones still negotiating).
    pub fn active_connections(&self) -> usize {
        self.connections.len()
    }

    /// A token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Accepts connections until shutdown, then waits for every connection to finish.
    pub async fn serve(&self, listeners: Vec<Listener>) {
        let mut accepting = tokio::task::JoinSet::new();
        for listener in listeners {
            let exports = self.exports.clone();
            let shutdown = self.shutdown.clone();
            let connections = self.connections.clone();
            let shards = self.shards.clone();
            accepting.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        accepted = listener.accept() => accepted,
                    };
                    match accepted {
                        Ok((fd, peer)) => {
                            let (exports, shutdown) = (exports.clone(), shutdown.clone());
                            shards.spawn(
                                connections.track_future(handle_connection(fd, peer, exports, shutdown)),
                            );
                        }
                        Err(e) => {
                            // Out of descriptors and the like: back off instead of spinning.
                            warn!("accept failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        while accepting.join_next().await.is_some() {}
        self.connections.close();
        self.connections.wait().await;
    }

    /// Waits until every connection has ended (after shutdown), also those started with
    /// [`Server::spawn_session`] when no listener runs.
    pub async fn wait_idle(&self) {
        self.connections.close();
        self.connections.wait().await;
    }

    /// Serves an already-negotiated socket (e.g. one handed to the kernel), without handshake.
    pub fn spawn_session(&self, fd: OwnedFd, negotiated: Negotiated) {
        let shutdown = self.shutdown.clone();
        self.shards.spawn(self.connections.track_future(async move {
            let session = Socket::new(fd).and_then(|sock| Session::new(sock, negotiated, shutdown));
            match session {
                Ok(session) => {
                    let end = session.run().await;
                    debug!(?end, "session ended");
                }
                Err(e) => warn!("cannot start session: {e}"),
            }
        }));
    }
}

async fn handle_connection(fd: OwnedFd, peer: String, exports: Arc<Exports>, shutdown: CancellationToken) {
    let sock = match Socket::new(fd) {
        Ok(s) => s,
        Err(e) => return warn!(%peer, "cannot set up connection: {e}"),
    };
    let negotiated = tokio::select! {
        _ = shutdown.cancelled() => return,
        result = negotiate(&sock, &exports) => result,
    };
    let negotiated = match negotiated {
        Ok(Some(n)) => n,
        Ok(None) => return debug!(%peer, "client ended the handshake"),
        Err(e) => return warn!(%peer, "handshake failed: {e}"),
    };
    info!(%peer, export = %negotiated.export.name, structured = negotiated.structured, "client connected");
    let session = match Session::new(sock, negotiated, shutdown) {
        Ok(s) => s,
        Err(e) => return warn!(%peer, "cannot open a device queue: {e}"),
    };
    match session.run().await {
        SessionEnd::ProtocolError(e) => warn!(%peer, "dropped connection: protocol error: {e}"),
        SessionEnd::Io(e) => debug!(%peer, "connection failed: {e}"),
        end => info!(%peer, ?end, "client disconnected"),
    }
}
