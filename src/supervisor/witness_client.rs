//! The node's end of the witness: one connection, a claim every heartbeat, the verdicts kept
//! in a [`LeaseView`]. Reconnects after any failure; while the witness is unreachable, a held
//! lease simply runs out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdbd_protocol::witness::Claim;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::lease::LeaseView;
use crate::config::WitnessConfig;
use crate::node::handle::NodeHandle;
use crate::replication::states::{ConnState, DiskState};
use crate::witness::channel::Channel;

/// How often a claim goes out: several times per lease.
pub const HEARTBEAT: Duration = Duration::from_millis(400);
/// A verdict later than this counts as silence (the lease runs from the claim anyway).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(1);
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Shared between the supervisor and the client.
#[derive(Default)]
pub struct WitnessShared {
    pub view: Mutex<LeaseView>,
    /// The supervisor wants the lease (Primary, or about to promote).
    pub want: AtomicBool,
    /// A verdict changed the view.
    pub changed: Notify,
}

/// `fail_io`: past a permission, lonely writes fail rather than wait (`on-quorum-loss`).
pub async fn run(node: NodeHandle, config: WitnessConfig, shared: Arc<WitnessShared>, fail_io: bool) {
    let resource = node.resource().to_string();
    let me = node.me().name.clone();
    let peer = node.peer().name.clone();
    let mut reported_failure = false;
    loop {
        let connected = async {
            let stream = tokio::net::TcpStream::connect(&config.address).await?;
            Channel::connect(stream, config.secret.as_bytes(), &resource, &me).await
        };
        let mut channel = match tokio::time::timeout(Duration::from_secs(3), connected).await {
            Ok(Ok(c)) => {
                info!(witness = %config.address, "witness connected");
                reported_failure = false;
                c
            }
            Ok(Err(e)) => {
                if !reported_failure {
                    warn!(witness = %config.address, "cannot reach the witness: {e}");
                    reported_failure = true;
                }
                silence(&shared);
                tokio::time::sleep(RECONNECT_DELAY).await;
                continue;
            }
            Err(_) => {
                silence(&shared);
                continue;
            }
        };
        let mut seq = 0;
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let status = node.status().await;
            seq += 1;
            let claim = Claim {
                seq,
                want_lease: shared.want.load(Ordering::Acquire),
                peer: peer.clone(),
                peer_connected: status.connection == ConnState::Connected,
                up_to_date: status.disk == DiskState::UpToDate,
                peer_up_to_date: status.peer.disk == DiskState::UpToDate,
                forced: false,
            };
            let claimed_connected = claim.peer_connected;
            // After the status: a link that died before it was read has bumped the epoch.
            let epoch = node.alone_gate().link_epoch();
            let sent = Instant::now();
            let answered = tokio::time::timeout(VERDICT_TIMEOUT, async {
                channel.send_claim(claim).await?;
                channel.read_verdict().await
            })
            .await;
            match answered {
                Ok(Ok(verdict)) if verdict.seq == seq => {
                    let mut view = shared.view.lock().expect("lease view lock");
                    let before = view.clone();
                    view.on_verdict(sent, claimed_connected, epoch, &verdict);
                    // Renewed here, not at the supervisor's next step, which may be busy
                    // starting services for longer than the lease lasts.
                    if let Some((until, epoch)) = view.alone_until().filter(|_| !view.outdated) {
                        node.alone_gate().allow_until(until, epoch, fail_io);
                        node.wake_parked();
                    }
                    let changed =
                        view.holder != before.holder || view.outdated != before.outdated || verdict.granted;
                    drop(view);
                    if changed {
                        shared.changed.notify_one();
                    }
                }
                Ok(Ok(verdict)) => {
                    warn!(expected = seq, got = verdict.seq, "witness answered out of order; reconnecting");
                    break;
                }
                Ok(Err(e)) => {
                    warn!("witness connection lost: {e}");
                    break;
                }
                Err(_) => {
                    warn!("witness did not answer within {VERDICT_TIMEOUT:?}; reconnecting");
                    break;
                }
            }
        }
        silence(&shared);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn silence(shared: &WitnessShared) {
    shared.view.lock().expect("lease view lock").on_silence();
    shared.changed.notify_one();
}
