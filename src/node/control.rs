//! The control socket: one JSON request per line from the `rdbd` verbs, one JSON response per
//! line back. Requests are served one at a time, so role changes never interleave.
//!
//! The one exception is `events`: its response line is followed by one event per line until
//! the client goes away or the node goes down, on a task of its own so that it blocks no
//! other request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::event_stream::{Event, EventKind, EventObject};
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
    /// Stop using the backing disk (Diskless).
    Detach,
    /// Use the backing disk again after a failure or a detach.
    Attach,
    NewCurrentUuid {
        clear_bitmap: bool,
    },
    Down,
    /// This node's blocks are declared bad: pull them from the peer (all of them, or with
    /// `reset_bitmap` false only those already marked out of sync).
    Invalidate {
        reset_bitmap: bool,
    },
    /// The peer's blocks are declared bad: push this node's (all, or only the marked ones).
    InvalidateRemote {
        reset_bitmap: bool,
    },
    /// Compare both replicas by digests (from `start`, in bytes).
    Verify {
        #[serde(default)]
        start: u64,
    },
    /// HA: hand the Primary role over to the peer (`to`: its name, checked).
    Switchover {
        #[serde(default)]
        to: Option<String>,
    },
    /// Subscribe to the event stream; with `now`, the current state comes first.
    Events {
        #[serde(default)]
        now: bool,
    },
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
    let (response, _) = exchange(path, req, limit).await?;
    Ok(response)
}

/// Sends `req` and reads the response line; returns the connection too, positioned after it.
async fn exchange(
    path: &Path,
    req: &Request,
    limit: Duration,
) -> Result<(Response, BufReader<UnixStream>), ControlError> {
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
        let mut reader = BufReader::new(stream);
        let mut answer = String::new();
        reader.read_line(&mut answer).await?;
        Ok::<_, std::io::Error>((answer, reader))
    };
    let (answer, reader) = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| io(std::io::Error::new(std::io::ErrorKind::TimedOut, "the daemon did not answer")))?
        .map_err(io)?;
    if answer.is_empty() {
        return Err(ControlError::Malformed("the daemon closed the connection without answering".into()));
    }
    let response = serde_json::from_str(&answer).map_err(|e| ControlError::Malformed(e.to_string()))?;
    Ok((response, reader))
}

/// A subscription to a daemon's events, as the client sees it.
pub struct EventStream {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    line: String,
}

/// Subscribes to the events of the daemon on `path` (`now`: the current state first). A
/// refusal comes back as the response, with no stream.
pub async fn subscribe(
    path: &Path,
    now: bool,
    limit: Duration,
) -> Result<Result<EventStream, Response>, ControlError> {
    let (response, reader) = exchange(path, &Request::Events { now }, limit).await?;
    if !response.ok {
        return Ok(Err(response));
    }
    Ok(Ok(EventStream { path: path.to_owned(), reader, line: String::new() }))
}

impl EventStream {
    /// The next event line as the daemon sent it (without the newline); `None` once the daemon
    /// ended the stream or went away.
    pub async fn next_line(&mut self) -> Result<Option<&str>, ControlError> {
        self.line.clear();
        match self.reader.read_line(&mut self.line).await {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(self.line.trim_end())),
            // A daemon killed mid-stream resets the connection: that is the end too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
            Err(error) => Err(ControlError::Io { path: self.path.clone(), error }),
        }
    }

    /// The next event, parsed.
    pub async fn next(&mut self) -> Result<Option<Event>, ControlError> {
        match self.next_line().await? {
            None => Ok(None),
            Some(line) => {
                serde_json::from_str(line).map(Some).map_err(|e| ControlError::Malformed(e.to_string()))
            }
        }
    }
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

async fn handle(node: &Arc<Node>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    let response = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(Request::Events { now }) => {
                info!(now, "control request: events");
                tokio::spawn(stream_events(node.clone(), reader, write, now));
                return;
            }
            Ok(req) => execute(node, req).await,
            Err(e) => failure(format!("malformed request: {e}")),
        },
        Ok(Err(e)) => failure(format!("cannot read the request: {e}")),
        Err(_) => failure("no request within 5 s".into()),
    };
    let _ = write_line(&mut write, &response).await;
}

async fn write_line(write: &mut OwnedWriteHalf, value: &impl Serialize) -> std::io::Result<()> {
    let mut text = serde_json::to_string(value).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

/// How long a subscriber is served after the node stopped without the watcher's `destroy`.
const STREAM_DRAIN: Duration = Duration::from_secs(1);

/// Serves one `events` subscription: the response line, the `exists` block with `now`, then
/// every event until the client goes away or the node goes down (after `destroy`).
async fn stream_events(
    node: Arc<Node>,
    mut reader: BufReader<tokio::io::Take<OwnedReadHalf>>,
    mut write: OwnedWriteHalf,
    now: bool,
) {
    // Subscribed before anything is written, so no change is lost meanwhile.
    let subscription = node.subscribe_events();
    let mut events = subscription.events;
    let ok = Response { ok: true, error: None, status: None };
    if write_line(&mut write, &ok).await.is_err() {
        return;
    }
    if now {
        for event in &subscription.exists {
            if write_line(&mut write, event).await.is_err() {
                return;
            }
        }
    }
    let shutdown = node.shutdown_token();
    let mut ignored = [0u8; 64];
    loop {
        let received = tokio::select! {
            received = events.recv() => received,
            // The client sends nothing more: a read returning means it closed or broke.
            _ = reader.read(&mut ignored) => return,
            _ = shutdown.cancelled() => match tokio::time::timeout(STREAM_DRAIN, events.recv()).await {
                Ok(received) => received,
                Err(_) => return,
            },
        };
        let batch = match received {
            Ok(event) => vec![event],
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                // Subscribed afresh: the full state as changes, then what follows it.
                warn!(missed, "an events subscriber fell behind: sending the full state instead");
                let fresh = node.subscribe_events();
                events = fresh.events;
                let state = fresh.exists.into_iter().filter(|e| e.object != EventObject::EndOfExists);
                state.map(|e| Event { event: EventKind::Change, ..e }).collect()
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        for event in &batch {
            if write_line(&mut write, event).await.is_err() {
                return;
            }
            if event.event == EventKind::Destroy && matches!(event.object, EventObject::Resource { .. }) {
                return;
            }
        }
    }
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
        Request::Detach => node.detach().await,
        Request::Attach => node.attach_disk().await,
        Request::NewCurrentUuid { clear_bitmap } => node.new_current_uuid(clear_bitmap),
        Request::Down => node.down(false).await,
        Request::Invalidate { reset_bitmap } => node.invalidate(reset_bitmap),
        Request::Verify { start } => node.verify(start),
        Request::InvalidateRemote { reset_bitmap } => node.invalidate_remote(reset_bitmap),
        Request::Switchover { to } => node.switchover(to).await,
        // Served by `handle` on a task of its own.
        Request::Events { .. } => return failure("events: not a one-line request".into()),
    };
    match result {
        Ok(()) => Response { ok: true, error: None, status: Some(node.status().await) },
        Err(e) => failure(e.to_string()),
    }
}
