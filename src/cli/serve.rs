//! `rdbd serve`: one export over NBD until interrupted.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{ArgGroup, Args};
use rdbd::nbd::{Export, Exports, Server, Shards};
use rdbd::storage::{BlockDevice, FileDevice, OpenOptions};
use tracing::info;

use super::listen::{bind_tcp, bind_unix, Bound};

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("backing").required(true).args(["file", "device"])))]
#[command(group(ArgGroup::new("address").required(true).multiple(true).args(["listen", "unix"])))]
pub struct ServeArgs {
    /// Regular file to serve (created sparse if missing and --size is given).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Block device to serve.
    #[arg(long, value_name = "PATH")]
    pub device: Option<PathBuf>,
    /// Size of the export, e.g. 1G or 512MiB (a file must have this size or be new).
    #[arg(long, value_name = "SIZE", value_parser = super::parse_size)]
    pub size: Option<u64>,
    /// TCP address to listen on, e.g. 127.0.0.1:10809.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Unix socket path to listen on.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// Export name (clients asking for "" get this export too).
    #[arg(long, value_name = "NAME", default_value = "")]
    pub export: String,
    /// Export description shown by `nbdinfo --list`.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// Bypass the page cache (O_DIRECT) for aligned I/O.
    #[arg(long)]
    pub direct: bool,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let opts = OpenOptions { read_only: args.read_only, direct: args.direct, size: args.size, prefix: false };
    let device = match (&args.file, &args.device) {
        (Some(path), _) => FileDevice::open_file(path, &opts)?,
        (None, Some(path)) => FileDevice::open_block_device(path, &opts)?,
        (None, None) => unreachable!("clap requires --file or --device"),
    };
    let path = device.path().display().to_string();
    let device: Arc<dyn BlockDevice> = Arc::new(device);
    let info = device.info();
    let description = args.description.clone().unwrap_or_else(|| format!("rdbd export of {path}"));
    let export = Export { name: args.export.clone(), description, device };

    let mut bound: Vec<Bound> = Vec::new();
    if let Some(addr) = &args.listen {
        bound.push(bind_tcp(addr)?);
    }
    if let Some(path) = &args.unix {
        bound.push(bind_unix(path)?);
    }

    let shards = Arc::new(Shards::per_cpu().context("cannot start worker threads")?);
    let server = Server::new(Exports::single(export), shards);
    let stop_signal = super::stop_requested().context("cannot install signal handlers")?;
    let mode = if info.read_only { "read-only" } else { "read-write" };
    let cache = if args.direct { "O_DIRECT" } else { "page cache" };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "rdbd: serving {path} ({}, {mode}, {cache}) as export {:?}",
        super::human_size(info.size),
        args.export
    )?;
    for b in &bound {
        writeln!(out, "rdbd: listening on {}", b.uri)?;
    }
    out.flush()?;
    drop(out);

    let socket_paths: Vec<PathBuf> = bound.iter().filter_map(|b| b.socket_path.clone()).collect();
    let listeners = bound.into_iter().map(|b| b.listener).collect();
    let stop = server.shutdown_token();
    tokio::spawn(async move {
        stop_signal.await;
        info!("stopping: finishing in-flight requests");
        stop.cancel();
    });
    server.serve(listeners).await;
    for p in socket_paths {
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display())).ok();
    }
    info!("stopped");
    Ok(())
}
