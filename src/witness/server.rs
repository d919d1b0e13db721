//! `rdbd witness`: accepts nodes' connections, answers each claim with a verdict from
//! [`super::votes`], and writes what must survive a restart before answering.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tracing::{info, warn};

use super::channel::Channel;
use super::store;
use super::votes::Votes;

/// A node that sends no claim for this long is dropped (it claims several times a second).
const IDLE_LIMIT: Duration = Duration::from_secs(30);

pub struct WitnessOptions {
    pub state: PathBuf,
    pub secret: Vec<u8>,
    pub lease: Duration,
}

struct Shared {
    votes: Mutex<Votes>,
    options: WitnessOptions,
}

/// Serves `listener` until the task is dropped. Fails only if the state file cannot be read.
pub async fn serve(listener: TcpListener, options: WitnessOptions) -> Result<(), store::StoreError> {
    let remembered = store::load(&options.state)?;
    if !remembered.is_empty() {
        info!(?remembered, "outdated nodes remembered from before the restart");
    }
    let votes = Votes::new(options.lease, remembered, Instant::now());
    info!(lease = ?options.lease, "no lease is granted during the first lease period after a start");
    let shared = Arc::new(Shared { votes: Mutex::new(votes), options });
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut channel = match Channel::accept(stream, &shared.options.secret).await {
                Ok(c) => c,
                Err(e) => return info!(%from, "connection refused: {e}"),
            };
            info!(%from, resource = %channel.resource, node = %channel.peer_name, "node connected");
            let why = serve_node(&mut channel, &shared).await;
            info!(resource = %channel.resource, node = %channel.peer_name, "node gone: {why}");
            channel.refuse(why).await;
        });
    }
}

/// Answers one node's claims until its connection ends; returns why it ended.
async fn serve_node(channel: &mut Channel, shared: &Shared) -> String {
    let mut last_seq = 0;
    loop {
        let claim = match tokio::time::timeout(IDLE_LIMIT, channel.read_claim()).await {
            Ok(Ok(claim)) => claim,
            Ok(Err(e)) => return e.to_string(),
            Err(_) => return format!("no claim for {IDLE_LIMIT:?}"),
        };
        if claim.seq <= last_seq {
            return format!("claim {} after claim {last_seq}: replayed or out of order", claim.seq);
        }
        last_seq = claim.seq;
        let verdict = {
            let mut votes = shared.votes.lock().expect("votes lock");
            let now = Instant::now();
            let before = votes.holder(&channel.resource, now).map(str::to_string);
            let (verdict, changed) = match votes.claim(&channel.resource, &channel.peer_name, &claim, now) {
                Ok(answer) => answer,
                Err(e) => return e.to_string(),
            };
            if changed {
                if let Err(e) = store::save(&shared.options.state, &votes.persistent()) {
                    // Unsaved, the outdated mark could be forgotten by a restart: grant nothing.
                    warn!("cannot save the witness state: {e}");
                    return format!("state not saved: {e}");
                }
                info!(resource = %channel.resource, outdated = ?votes.persistent().get(&channel.resource), "outdated nodes changed");
            }
            if before.as_deref().unwrap_or_default() != verdict.holder {
                info!(resource = %channel.resource, holder = %verdict.holder, "lease holder changed");
            }
            verdict
        };
        if let Err(e) = channel.send_verdict(verdict).await {
            return e.to_string();
        }
    }
}
