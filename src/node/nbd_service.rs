//! The NBD server of a Primary: the replicated device exported under the resource's name on
//! the node's `nbd-listen` address. A Secondary runs none, so clients cannot reach data that
//! replication may change under them.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use super::{Node, NodeError};
use crate::nbd::{Export, Exports, Listener, Server, Shards};
use crate::storage::BlockDevice;

pub struct NbdService {
    server: Arc<Server>,
    serving: JoinHandle<()>,
}

impl NbdService {
    /// Starts serving on the node's `nbd-listen` address; `None` when it has none configured.
    pub fn start(node: &Node, shards: Arc<Shards>) -> Result<Option<Self>, NodeError> {
        let Some(addr) = node.me().nbd_listen.clone() else { return Ok(None) };
        let std_listener = std::net::TcpListener::bind(&addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|error| NodeError::NbdListen { addr: addr.clone(), error })?;
        let listener = TcpListener::from_std(std_listener)
            .map_err(|error| NodeError::NbdListen { addr: addr.clone(), error })?;
        let device: Arc<dyn BlockDevice> = node.device().clone();
        let name = node.config().name.clone();
        let description = format!("rdbd resource {name} on node {}", node.me().name);
        let server = Arc::new(Server::new(Exports::single(Export { name, description, device }), shards));
        let serving = tokio::spawn({
            let server = server.clone();
            async move { server.serve(vec![Listener::Tcp(listener)]).await }
        });
        info!(%addr, "serving NBD");
        Ok(Some(Self { server, serving }))
    }

    /// NBD clients connected now.
    pub fn clients(&self) -> usize {
        self.server.active_connections()
    }

    /// Stops accepting and waits for the connections to finish their requests.
    pub async fn stop(self) {
        self.server.shutdown_token().cancel();
        let _ = self.serving.await;
        info!("stopped serving NBD");
    }
}
