//! The control socket: one JSON request per line from the `rdbd` verbs, one JSON response per
//! line back. Requests are served one at a time, so role changes never interleave.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::status::Status;
use super::Node;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "verb", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Primary {
        force: bool,
    },
    Secondary,
    Connect {
        /// Manual split-brain recovery: this node's changes are discarded.
        #[serde(default)]
        discard_my_data: bool,
    },
    Disconnect,
    NewCurrentUuid {
        clear_bitmap: bool,
    },
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

/// Longest request line accepted (requests are a few dozen bytes).
const MAX_REQUEST: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no daemon for this resource is running (no answer on {path}): run `rdbd up` first")]
    NotRunning { path: PathBuf },
    #[error("control socket {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("the daemon sent a malformed response: {0}")]
    Malformed(String),
}

/// Sends one request to the daemon listening on `path` and returns its response.
pub async fn request(path: &Path, req: &Request, limit: Duration) -> Result<Response, ControlError> {
    let io = |error| ControlError::Io { path: path.to_owned(), error };
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            return Err(ControlError::NotRunning { path: path.to_owned() })
        }
        Err(e) => return Err(io(e)),
    };
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::Malformed(e.to_string()))?;
    line.push('\n');
    let exchange = async {
        stream.write_all(line.as_bytes()).await?;
        let mut reader = BufReader::new(&mut stream);
        let mut answer = String::new();
        reader.read_line(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| io(std::io::Error::new(std::io::ErrorKind::TimedOut, "the daemon did not answer")))?
        .map_err(io)?;
    if answer.is_empty() {
        return Err(ControlError::Malformed("the daemon closed the connection without answering".into()));
    }
    serde_json::from_str(&answer).map_err(|e| ControlError::Malformed(e.to_string()))
}

/// Binds the control socket (replacing a stale file nobody answers on).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

/// Serves requests until the node stops; removes the socket file at the end.
pub async fn serve(node: Arc<Node>, listener: UnixListener, path: PathBuf) {
    let shutdown = node.shutdown_token();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => handle(&node, stream).await,
            Err(e) => {
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn handle(node: &Arc<Node>, mut stream: UnixStream) {
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    let response = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => execute(node, req).await,
            Err(e) => failure(format!("malformed request: {e}")),
        },
        Ok(Err(e)) => failure(format!("cannot read the request: {e}")),
        Err(_) => failure("no request within 5 s".into()),
    };
    let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
}

fn failure(error: String) -> Response {
    Response { ok: false, error: Some(error), status: None }
}

async fn execute(node: &Arc<Node>, req: Request) -> Response {
    info!(?req, "control request");
    let result = match req {
        Request::Status => return Response { ok: true, error: None, status: Some(node.status().await) },
        Request::Primary { force } => node.promote(force).await,
        Request::Secondary => node.demote().await,
        Request::Connect { discard_my_data } => node.connect(discard_my_data),
        Request::Disconnect => {
            node.disconnect().await;
            Ok(())
        }
        Request::NewCurrentUuid { clear_bitmap } => node.new_current_uuid(clear_bitmap),
        Request::Down => node.down(false).await,
    };
    match result {
        Ok(()) => Response { ok: true, error: None, status: Some(node.status().await) },
        Err(e) => failure(e.to_string()),
    }
}
