//! Command-line interface: argument parsing, logging, runtime, and one-line errors.

mod daemon;
mod demo;
mod dump;
mod events;
mod listen;
mod metadata;
mod resource;
mod serve;
mod verbs;
mod verify;
mod wait_sync;
mod witness;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rdbd::node::control::Request;

#[derive(Parser)]
#[command(name = "rdbd", version, about = "Replicated block device in userspace, served over NBD")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one file or block device over NBD until interrupted.
    Serve(serve::ServeArgs),
    /// Write fresh metadata (bitmap, activity log, generation identifiers) for this node's disk.
    CreateMd(metadata::CreateMdArgs),
    /// Print this node's metadata: generation identifiers, flags, out-of-sync blocks, activity log.
    ShowMd(metadata::ShowMdArgs),
    /// Serve a fresh sparse file in a temporary directory and print how to connect.
    Demo(demo::DemoArgs),
    /// Print a resource's effective configuration (defaults filled in) and which node this is.
    Dump(dump::DumpArgs),
    /// Start this node's daemon for a resource (detaches unless --foreground).
    Up(daemon::UpArgs),
    /// Stop this node's daemon: leave the peer cleanly and write the metadata.
    Down(verbs::PlainArgs),
    /// Make this node Primary: it serves the device over NBD.
    Primary(verbs::PrimaryArgs),
    /// Make this node Secondary (refused while NBD clients are connected).
    Secondary(verbs::PlainArgs),
    /// Show role, disk, connection and replication state, as drbdadm status does.
    Status(verbs::StatusArgs),
    /// Try to connect to the peer again (after disconnect or a refusal).
    Connect(verbs::ConnectArgs),
    /// Drop the connection to the peer and stay StandAlone.
    Disconnect(verbs::PlainArgs),
    /// Stop using the backing disk (Diskless); a Primary serves through its peer.
    Detach(verbs::PlainArgs),
    /// Use the backing disk again (after a failure or detach); the peer resyncs what it lacks.
    Attach(verbs::PlainArgs),
    /// Start a new data generation; with --clear-bitmap on blank disks, skip the initial sync.
    NewCurrentUuid(verbs::NewCurrentUuidArgs),
    /// Compare both replicas by digests while in use; mark and report the blocks that differ.
    Verify(verify::VerifyArgs),
    /// Declare this node's data bad and resync it from the peer (refused on a Primary).
    Invalidate(verbs::InvalidateArgs),
    /// Declare the peer's data bad and resync it from this node.
    InvalidateRemote(verbs::InvalidateArgs),
    /// Stream state changes as JSON lines, as drbdsetup events2 does (--now: current state first).
    Events(events::EventsArgs),
    /// Wait until this node and its peer are connected and both UpToDate, showing resync progress.
    WaitSync(wait_sync::WaitSyncArgs),
    /// HA: move the Primary role to the peer (services stopped here, started there).
    Switchover(verbs::SwitchoverArgs),
    /// Run the quorum witness for two-node resources (on a third host; stores no data).
    Witness(witness::WitnessArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow::anyhow!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Dump(args) => dump::run(args),
            Command::CreateMd(args) => metadata::create_md(args),
            Command::ShowMd(args) => metadata::show_md(args),
            Command::Up(args) => daemon::up(args).await,
            Command::Down(args) => verbs::down(args).await,
            Command::Primary(args) => verbs::primary(args).await,
            Command::Secondary(args) => verbs::simple(args, Request::Secondary).await,
            Command::Status(args) => verbs::status(args).await,
            Command::Connect(args) => verbs::connect(args).await,
            Command::Disconnect(args) => verbs::simple(args, Request::Disconnect).await,
            Command::Detach(args) => verbs::simple(args, Request::Detach).await,
            Command::Attach(args) => verbs::simple(args, Request::Attach).await,
            Command::NewCurrentUuid(args) => verbs::new_current_uuid(args).await,
            Command::Verify(args) => verify::run(args).await,
            Command::Invalidate(args) => verbs::invalidate(args, false).await,
            Command::InvalidateRemote(args) => verbs::invalidate(args, true).await,
            Command::Events(args) => events::run(args).await,
            Command::WaitSync(args) => wait_sync::run(args).await,
            Command::Witness(args) => witness::run(args).await,
            Command::Switchover(args) => verbs::switchover(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("rdbd: error: {e:#}");
    ExitCode::FAILURE
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RDBD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Installs SIGINT and SIGTERM handlers now (so a signal arriving at any later moment stops the
/// process cleanly instead of killing it) and returns a future that resolves at the first one.
fn stop_requested() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// "1 GiB", "512 MiB", "4096 bytes".
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = None;
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = Some(u);
    }
    match unit {
        None => format!("{bytes} bytes"),
        Some(u) if value.fract() == 0.0 => format!("{value} {u}"),
        Some(u) => format!("{value:.1} {u}"),
    }
}

/// Parses "2s", "500ms" into a duration.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    rdbd::config::parse_duration(text).ok_or_else(|| format!("invalid duration {text:?} (e.g. 2s, 500ms)"))
}

/// Parses "1G", "512MiB", "4096" into bytes (binary units).
fn parse_size(text: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(text)
        .map_err(|e| format!("invalid size {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
        assert_eq!(human_size(100), "100 bytes");
    }
}
