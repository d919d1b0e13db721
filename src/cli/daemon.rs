//! `rdbd up`: start this node's daemon for a resource (detached unless `--foreground`), and the
//! daemon itself.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use rdbd::node::control::{self, Request};
use rdbd::node::{log_file, run_dir, Node};
use tracing::info;

use super::resource::{Resource, ResourceArgs};

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// Stay in the foreground and log to stderr instead of detaching.
    #[arg(long)]
    pub foreground: bool,
}

/// How long `up` waits for a detached daemon to answer.
const START_LIMIT: Duration = Duration::from_secs(20);

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    let socket = res.control_socket();
    if control::request(&socket, &Request::Status, Duration::from_secs(5)).await.is_ok() {
        println!("rdbd: {} is already up on node {}", res.config.name, res.me().name);
        return Ok(());
    }
    if args.foreground {
        return run_foreground(res).await;
    }
    detach(&res, &args.resource).await
}

/// Starts `rdbd up --foreground` in its own session, logging to the run directory, and waits
/// until it answers on its control socket (or reports why it could not start).
async fn detach(res: &Resource, args: &ResourceArgs) -> anyhow::Result<()> {
    let dir = run_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = log_file(&dir, &res.config.name, &res.me().name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the rdbd executable")?;
    let mut command = std::process::Command::new(exe);
    command.arg("up").arg(&res.config.name).arg("--foreground").arg("--node").arg(&res.me().name);
    if let Some(dir) = &args.config_dir {
        command.arg("--config-dir").arg(dir);
    }
    use std::os::unix::process::CommandExt;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("RDBD_RUN_DIR", &dir)
        .process_group(0);
    let mut child = command.spawn().context("cannot start the daemon")?;
    let socket = res.control_socket();
    let deadline = tokio::time::Instant::now() + START_LIMIT;
    loop {
        if control::request(&socket, &Request::Status, Duration::from_secs(2)).await.is_ok() {
            println!(
                "rdbd: {} is up on node {} (pid {}, log {})",
                res.config.name,
                res.me().name,
                child.id(),
                log_path.display()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no log output");
            bail!("the daemon exited ({status}): {}", last.trim_start_matches("rdbd: error: "));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the daemon did not answer within {START_LIMIT:?}; see {}", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_foreground(res: Resource) -> anyhow::Result<()> {
    let socket = res.control_socket();
    let name = res.config.name.clone();
    let node_name = res.me().name.clone();
    if res.me().nbd_device.is_some() {
        keep_serving_under_memory_pressure();
    }
    let node = Node::attach(res.config, res.me).context("cannot attach the disk")?;
    let listener =
        control::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    let stop = super::stop_requested().context("cannot install signal handlers")?;
    tokio::spawn(control::serve(node.clone(), listener, socket.clone()));
    {
        let node = node.clone();
        tokio::spawn(async move {
            stop.await;
            info!("signal received: going down");
            if let Err(e) = node.down(true).await {
                tracing::error!("clean shutdown failed: {e}");
            }
        });
    }
    info!(resource = %name, node = %node_name, "up");
    let mut out = std::io::stdout().lock();
    writeln!(out, "rdbd: {name} up on node {node_name}, control socket {}", socket.display())?;
    out.flush()?;
    drop(out);
    // The HA supervisor is a client of the node, as an operator is.
    let supervisor =
        node.config().ha.clone().map(|ha| tokio::spawn(rdbd::supervisor::run(node.handle(), ha)));
    node.run(supervisor.into_iter().collect()).await;
    // Give the control task a moment to answer the `down` that stopped us.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// A daemon behind a kernel block device must not wait for memory the kernel can only free by
/// writing to that very device: it is marked an I/O flusher (inherited by the threads started
/// after this), its memory locked, and kept off the OOM killer's list. Each is best effort,
/// logged when refused.
fn keep_serving_under_memory_pressure() {
    use rdbd::kernel::hygiene;
    if let Err(e) = hygiene::set_io_flusher() {
        tracing::warn!("{e}");
    }
    if let Err(e) = hygiene::lock_memory() {
        tracing::warn!("{e}");
    }
    if let Err(e) = hygiene::set_oom_score_adj(hygiene::OOM_SCORE_ADJ_MIN) {
        tracing::warn!("{e}");
    }
}
