//! Running the `[handlers]` commands (split-brain, pri-lost-after-sb, pri-lost, out-of-sync,
//! local-io-error).
//!
//! A handler is an operator's shell command, run through `/bin/sh -c` with the resource, the
//! two node names and the event in its environment. Its output goes to the daemon's log and its
//! exit status to the caller; it can neither block the daemon (stdin is /dev/null, the run is
//! bounded by a timeout) nor outlive that timeout (it runs in its own process group, and the
//! whole group is killed, so a `sleep` the shell forked does not keep running either).

use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::event_stream::{EventKind, EventObject};
use super::Node;
use crate::config::HandlersConfig;

/// How long a handler may run unless the caller says otherwise.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes of each of stdout and stderr kept for the log; the rest is read and dropped, so a
/// chatty handler neither blocks on a full pipe nor fills the daemon's memory.
const CAPTURE_MAX: usize = 64 << 10;

/// After the handler exits, how long its output pipes may stay open (held by a process it left
/// in the background) before the daemon stops reading them.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Why a handler runs; its name is `RDBD_EVENT` and the `[handlers]` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandlerEvent {
    SplitBrain,
    PriLostAfterSb,
    PriLost,
    OutOfSync,
    LocalIoError,
}

impl HandlerEvent {
    pub const fn as_str(self) -> &'static str {
        match self {
            HandlerEvent::SplitBrain => "split-brain",
            HandlerEvent::PriLostAfterSb => "pri-lost-after-sb",
            HandlerEvent::PriLost => "pri-lost",
            HandlerEvent::OutOfSync => "out-of-sync",
            HandlerEvent::LocalIoError => "local-io-error",
        }
    }

    /// The command configured for this event, if any.
    pub fn command(self, handlers: &HandlersConfig) -> Option<&str> {
        match self {
            HandlerEvent::SplitBrain => handlers.split_brain.as_deref(),
            HandlerEvent::PriLostAfterSb => handlers.pri_lost_after_sb.as_deref(),
            HandlerEvent::PriLost => handlers.pri_lost.as_deref(),
            HandlerEvent::OutOfSync => handlers.out_of_sync.as_deref(),
            HandlerEvent::LocalIoError => handlers.local_io_error.as_deref(),
        }
    }
}

impl std::fmt::Display for HandlerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who the handler runs for: `RDBD_RESOURCE`, `RDBD_NODE` (this node) and `RDBD_PEER`.
#[derive(Clone, Copy, Debug)]
pub struct HandlerContext<'a> {
    pub resource: &'a str,
    pub node: &'a str,
    pub peer: &'a str,
}

/// A handler that ran to completion, whatever its exit status.
#[derive(Debug)]
pub struct HandlerRun {
    pub status: ExitStatus,
    /// Its output, at most [`CAPTURE_MAX`] bytes each, lossily decoded.
    pub stdout: String,
    pub stderr: String,
}

impl HandlerRun {
    /// Exited with status 0.
    pub fn succeeded(&self) -> bool {
        self.status.success()
    }
}

/// A handler that could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// An extra environment entry cannot be passed to a process.
    #[error("{event} handler: invalid environment entry {key:?}: {reason}")]
    Environment { event: HandlerEvent, key: String, reason: &'static str },
    #[error("{event} handler: cannot start /bin/sh: {source}")]
    Spawn { event: HandlerEvent, source: io::Error },
    #[error("{event} handler: waiting for it failed: {source}")]
    Wait { event: HandlerEvent, source: io::Error },
    /// Still running at the deadline; it was killed (with its process group).
    #[error("{event} handler did not finish within {timeout:?} and was killed")]
    TimedOut { event: HandlerEvent, timeout: Duration },
}

/// Runs `command` for `event` through `/bin/sh -c`, with `RDBD_RESOURCE`, `RDBD_NODE`,
/// `RDBD_PEER`, `RDBD_EVENT` and `extra` added to the daemon's environment, and waits at most
/// `timeout` for it. Output and exit status are logged.
pub async fn run_handler(
    event: HandlerEvent,
    command: &str,
    ctx: &HandlerContext<'_>,
    extra: &[(&str, &str)],
    timeout: Duration,
) -> Result<HandlerRun, HandlerError> {
    for &(key, value) in extra {
        if let Some(reason) = env_problem(key, value) {
            return Err(HandlerError::Environment { event, key: key.to_string(), reason });
        }
    }
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env("RDBD_RESOURCE", ctx.resource)
        .env("RDBD_NODE", ctx.node)
        .env("RDBD_PEER", ctx.peer)
        .env("RDBD_EVENT", event.as_str())
        .envs(extra.iter().copied())
        // Not the daemon's working directory, which may be anything (or on a disk going away).
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that a timeout kills what the shell started too.
        .process_group(0)
        // If the caller stops waiting (daemon shutdown), the handler does not linger.
        .kill_on_drop(true);
    info!(event = event.as_str(), resource = ctx.resource, command, "running handler");
    let mut child = cmd.spawn().map_err(|source| HandlerError::Spawn { event, source })?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exited = Notify::new();

    let waiting = async {
        let result = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => status.map_err(|source| HandlerError::Wait { event, source }),
            Err(_) => {
                kill_group(&child);
                // Reap it; the group kill already did the work, this only covers an error there.
                let _ = child.kill().await;
                Err(HandlerError::TimedOut { event, timeout })
            }
        };
        exited.notify_one();
        result
    };
    let reading = async {
        let drain_both = async { tokio::join!(drain(stdout, &mut out), drain(stderr, &mut err)) };
        tokio::select! {
            _ = drain_both => {}
            _ = async { exited.notified().await; tokio::time::sleep(OUTPUT_GRACE).await } => {}
        }
    };
    let (status, ()) = tokio::join!(waiting, reading);

    let stdout = String::from_utf8_lossy(&out).into_owned();
    let stderr = String::from_utf8_lossy(&err).into_owned();
    log_output(event, "stdout", &stdout);
    log_output(event, "stderr", &stderr);
    match status {
        Ok(status) => {
            if status.success() {
                info!(event = event.as_str(), %status, "handler finished");
            } else {
                warn!(event = event.as_str(), %status, "handler failed");
            }
            Ok(HandlerRun { status, stdout, stderr })
        }
        Err(e) => {
            warn!("{e}");
            Err(e)
        }
    }
}

impl Node {
    /// Runs the handler for `event`, if one is configured, in the background (the caller, the
    /// sync handshake, must not wait for an operator's script), reported as `call` and
    /// `response` events. Returns whether one is configured.
    pub(super) fn spawn_handler(
        self: &Arc<Self>,
        event: HandlerEvent,
        extra: Vec<(&'static str, String)>,
    ) -> bool {
        let Some(command) = event.command(&self.config.handlers).map(str::to_string) else { return false };
        let node = self.clone();
        tokio::spawn(async move {
            let handler = event.as_str().to_string();
            node.emit_event(EventKind::Call, EventObject::Handler { handler: handler.clone(), status: None });
            let ctx = HandlerContext {
                resource: &node.config.name,
                node: &node.me().name,
                peer: &node.peer_config().name,
            };
            // The exit code; none when it could not run or was killed (run_handler logs why).
            let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let status = match run_handler(event, &command, &ctx, &extra, DEFAULT_HANDLER_TIMEOUT).await {
                Ok(run) => run.status.code(),
                Err(_) => None,
            };
            node.emit_event(EventKind::Response, EventObject::Handler { handler, status });
        });
        true
    }
}

/// Why an environment entry cannot be set, if it cannot.
fn env_problem(key: &str, value: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("the name is empty")
    } else if key.contains('=') {
        Some("the name contains '='")
    } else if key.contains('\0') || value.contains('\0') {
        Some("it contains a NUL character")
    } else {
        None
    }
}

/// SIGKILL to the handler's process group (its pid, see `process_group(0)`). The child is not
/// reaped yet, so the group id cannot have been reused.
fn kill_group(child: &tokio::process::Child) {
    let Some(pid) = child.id().and_then(|id| rustix::process::Pid::from_raw(id as i32)) else { return };
    if let Err(e) = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL) {
        warn!("cannot kill handler process group {}: {e}", pid.as_raw_nonzero());
    }
}

/// Reads a pipe to its end, keeping the first [`CAPTURE_MAX`] bytes in `buf`. Read errors end
/// the capture: the output is for the log only.
async fn drain(pipe: Option<impl AsyncRead + Unpin>, buf: &mut Vec<u8>) {
    let Some(mut pipe) = pipe else { return };
    let mut chunk = [0u8; 4096];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = CAPTURE_MAX.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
}

fn log_output(event: HandlerEvent, stream: &'static str, text: &str) {
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        info!(event = event.as_str(), stream, "handler: {line}");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const CTX: HandlerContext<'static> = HandlerContext { resource: "res0", node: "alpha", peer: "beta" };

    #[tokio::test]
    async fn runs_with_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("env");
        let script = "printf '%s\\n' \"$RDBD_RESOURCE\" \"$RDBD_NODE\" \"$RDBD_PEER\" \"$RDBD_EVENT\" \
                      \"$RDBD_DIRTY\" \"$(pwd)\" > \"$OUT\"; \
                      if read line; then echo stdin-has-data; else echo stdin-empty; fi; \
                      echo oops >&2; exit 3";
        let out = file.to_str().unwrap();
        let run = run_handler(
            HandlerEvent::SplitBrain,
            script,
            &CTX,
            &[("OUT", out), ("RDBD_DIRTY", "42 blocks")],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert_eq!(run.status.code(), Some(3));
        assert!(!run.succeeded());
        assert_eq!(run.stdout, "stdin-empty\n");
        assert_eq!(run.stderr, "oops\n");
        let env = std::fs::read_to_string(&file).unwrap();
        assert_eq!(env, "res0\nalpha\nbeta\nsplit-brain\n42 blocks\n/\n");

        let run =
            run_handler(HandlerEvent::OutOfSync, "echo \"$RDBD_EVENT\"", &CTX, &[], Duration::from_secs(20))
                .await
                .unwrap();
        assert!(run.succeeded());
        assert_eq!(run.stdout, "out-of-sync\n");
    }

    #[tokio::test]
    async fn a_handler_past_its_timeout_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("survived");
        let start = Instant::now();
        // A subshell the shell waits for: killing the shell alone would leave it running, to
        // leave the mark a second later; the group kill stops it too.
        let e = run_handler(
            HandlerEvent::PriLost,
            "echo started; (sleep 1; touch \"$MARK\") & wait",
            &CTX,
            &[("MARK", mark.to_str().unwrap())],
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        let elapsed = start.elapsed();
        assert!(matches!(e, HandlerError::TimedOut { event: HandlerEvent::PriLost, .. }), "{e}");
        assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
        assert_eq!(e.to_string(), "pri-lost handler did not finish within 200ms and was killed");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!mark.exists(), "the handler kept running after the timeout");
    }

    #[tokio::test]
    async fn output_is_bounded_and_a_background_process_does_not_hold_the_run() {
        let start = Instant::now();
        // 1 MiB of output, then a background process that keeps stdout open after the shell exits.
        let run = run_handler(
            HandlerEvent::SplitBrain,
            "head -c 1048576 /dev/zero | tr '\\0' x; (sleep 3 &)",
            &CTX,
            &[],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert!(run.succeeded());
        assert_eq!(run.stdout.len(), CAPTURE_MAX);
        assert!(start.elapsed() < Duration::from_millis(2500), "took {:?}", start.elapsed());
    }

    #[tokio::test]
    async fn bad_environment_entries_are_refused() {
        for (key, value) in [("", "x"), ("A=B", "x"), ("A", "x\0y")] {
            let e = run_handler(
                HandlerEvent::PriLostAfterSb,
                "true",
                &CTX,
                &[(key, value)],
                DEFAULT_HANDLER_TIMEOUT,
            )
            .await
            .unwrap_err();
            assert!(matches!(e, HandlerError::Environment { .. }), "{e}");
        }
    }

    #[test]
    fn events_and_their_commands() {
        let handlers = HandlersConfig {
            split_brain: Some("a".into()),
            pri_lost_after_sb: Some("b".into()),
            pri_lost: None,
            out_of_sync: Some("d".into()),
            local_io_error: Some("e".into()),
        };
        let names: Vec<_> = [
            HandlerEvent::SplitBrain,
            HandlerEvent::PriLostAfterSb,
            HandlerEvent::PriLost,
            HandlerEvent::OutOfSync,
            HandlerEvent::LocalIoError,
        ]
        .iter()
        .map(|e| (e.as_str(), e.command(&handlers)))
        .collect();
        assert_eq!(
            names,
            [
                ("split-brain", Some("a")),
                ("pri-lost-after-sb", Some("b")),
                ("pri-lost", None),
                ("out-of-sync", Some("d")),
                ("local-io-error", Some("e"))
            ]
        );
    }
}
