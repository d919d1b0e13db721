//! `rdbd witness`: the quorum witness for two-node resources, on a third host.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use rdbd::witness::server::{serve, WitnessOptions};
use tracing::info;

/// Where the secret comes from when no --secret-file is given.
const SECRET_ENV: &str = "RDBD_WITNESS_SECRET";

#[derive(Args, Debug)]
pub struct WitnessArgs {
    /// TCP address to listen on, e.g. 0.0.0.0:7788.
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// The state file: which nodes are known to be outdated (kept across restarts).
    #[arg(long, value_name = "PATH", default_value = "/var/lib/rdbd/witness.json")]
    pub state: PathBuf,
    /// File holding the secret the nodes' `witness-secret` must match (else $RDBD_WITNESS_SECRET).
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
    /// How long a vote lasts without renewal, e.g. 2s.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = super::parse_duration)]
    pub lease: Duration,
}

pub async fn run(args: WitnessArgs) -> anyhow::Result<()> {
    let secret = match &args.secret_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            text.trim_end_matches(['\n', '\r']).as_bytes().to_vec()
        }
        None => match std::env::var(SECRET_ENV) {
            Ok(s) => s.into_bytes(),
            Err(_) => bail!("no secret: give --secret-file PATH or set {SECRET_ENV}"),
        },
    };
    if args.lease < Duration::from_millis(500) || args.lease > Duration::from_secs(60) {
        bail!("--lease must be between 500ms and 60s (it is {:?})", args.lease);
    }
    if let Some(dir) = args.state.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    info!(listen = %listener.local_addr()?, state = %args.state.display(), "witness up");
    eprintln!("rdbd: witness listening on {}", listener.local_addr()?);
    let options = WitnessOptions { state: args.state, secret, lease: args.lease };
    tokio::select! {
        r = serve(listener, options) => r.context("witness failed"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
