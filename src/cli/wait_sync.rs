//! `rdbd wait-sync RES [--timeout DURATION]`: wait until this node and its peer are both
//! UpToDate and Established, following the daemon's event stream; a progress bar on a
//! terminal, plain progress lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdbd::node::event_stream::{Event, EventKind, EventObject};
use rdbd::node::status::ResyncProgress;
use rdbd::replication::states::{ConnState, DiskState, ReplState};

use super::events::subscribe;
use super::human_size;
use super::resource::{Resource, ResourceArgs};

/// Plain output prints progress this often, or at each 10 % step, whichever comes first.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

#[derive(Args, Debug)]
pub struct WaitSyncArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// Give up after this long ("30s", "5m", "1h30m") [default: wait as long as it takes].
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    rdbd::config::parse_duration(text)
        .ok_or_else(|| format!("invalid duration {text:?} (e.g. 30s, 500ms, 5m, 1h30m)"))
}

/// What the events said so far about this node and its peer.
#[derive(Debug, Default, Clone, PartialEq)]
struct View {
    disk: Option<DiskState>,
    connection: Option<ConnState>,
    reason: Option<String>,
    replication: Option<ReplState>,
    peer_disk: Option<DiskState>,
    progress: Option<ResyncProgress>,
}

impl View {
    fn apply(&mut self, event: &Event) {
        match &event.object {
            EventObject::Device { disk, .. } => self.disk = Some(*disk),
            EventObject::Connection { connection, reason, .. } => {
                self.connection = Some(*connection);
                self.reason.clone_from(reason);
            }
            EventObject::PeerDevice { replication, peer_disk, progress, .. } => {
                self.replication = Some(*replication);
                self.peer_disk = Some(*peer_disk);
                self.progress.clone_from(progress);
            }
            _ => {}
        }
    }

    fn in_sync(&self) -> bool {
        self.connection == Some(ConnState::Connected)
            && self.replication == Some(ReplState::Established)
            && self.disk == Some(DiskState::UpToDate)
            && self.peer_disk == Some(DiskState::UpToDate)
    }

    /// "SyncTarget 42.2% done, 312 MiB/s, eta 3s", or the states while no resync runs.
    fn describe(&self) -> String {
        let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        let replication = or_unknown(self.replication.map(|r| r.to_string()));
        let Some(p) = &self.progress else {
            let connection = or_unknown(self.connection.map(|c| c.to_string()));
            let disks = format!(
                "{}/{}",
                or_unknown(self.disk.map(|d| d.to_string())),
                or_unknown(self.peer_disk.map(|d| d.to_string()))
            );
            return format!("{connection} {replication} {disks}");
        };
        let mut text = format!("{replication} {:.1}% done", p.done_percent);
        if p.rate_bytes_per_sec > 0 {
            text += &format!(", {}/s", human_size(p.rate_bytes_per_sec));
        }
        if let Some(eta) = p.eta_secs {
            text += &format!(", eta {eta}s");
        }
        text
    }
}

/// Shows progress: a bar on a terminal, lines otherwise.
enum Display {
    Bar(ProgressBar),
    Plain { last_line: Option<(Instant, String)>, last_decile: Option<u64> },
}

impl Display {
    fn new(name: &str) -> Self {
        if !std::io::stdout().is_terminal() {
            return Display::Plain { last_line: None, last_decile: None };
        }
        let bar = ProgressBar::with_draw_target(Some(1000), ProgressDrawTarget::stdout());
        let style = ProgressStyle::with_template("{prefix}: [{bar:40}] {msg}")
            .expect("a valid template")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(Duration::from_millis(250));
        Display::Bar(bar)
    }

    fn update(&mut self, name: &str, view: &View) {
        let text = view.describe();
        match self {
            Display::Bar(bar) => {
                let done = view.progress.as_ref().map_or(0.0, |p| p.done_percent);
                bar.set_position((done * 10.0) as u64);
                bar.set_message(text);
            }
            Display::Plain { last_line, last_decile } => {
                let decile = view.progress.as_ref().map(|p| (p.done_percent / 10.0) as u64);
                let due = match last_line {
                    None => true,
                    Some((at, previous)) => {
                        let state_changed = previous.split(' ').next() != text.split(' ').next();
                        state_changed
                            || decile != *last_decile
                            || (view.progress.is_some() && at.elapsed() >= PLAIN_EVERY)
                    }
                };
                if due && last_line.as_ref().is_none_or(|(_, previous)| *previous != text) {
                    println!("{name}: {text}");
                    *last_line = Some((Instant::now(), text));
                    *last_decile = decile;
                }
            }
        }
    }

    /// Removes the bar before the final line or the error.
    fn clear(&self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

pub async fn run(args: WaitSyncArgs) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    let name = res.config.name.clone();
    let mut stream = subscribe(&res, true).await?;
    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut display = Display::new(&name);
    let mut view = View::default();
    let mut current = false;
    let result = loop {
        let next = match deadline {
            None => stream.next().await,
            Some(deadline) => match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let timeout = rdbd::config::format_duration(args.timeout.unwrap_or_default());
                    break Err(anyhow::anyhow!("{name}: not in sync after {timeout} ({})", view.describe()));
                }
            },
        };
        let event = match next.with_context(|| name.clone())? {
            Some(event) if event.event != EventKind::Destroy => event,
            _ => break Err(anyhow::anyhow!("{name}: the daemon went away before the resource was in sync")),
        };
        view.apply(&event);
        if event.object == EventObject::EndOfExists {
            current = true;
        }
        if !current {
            continue;
        }
        if view.in_sync() {
            break Ok(());
        }
        if view.connection == Some(ConnState::StandAlone) {
            let reason =
                view.reason.clone().unwrap_or_else(|| format!("disconnected; run `rdbd connect {name}`"));
            break Err(anyhow::anyhow!("{name}: StandAlone: {reason}"));
        }
        display.update(&name, &view);
    };
    display.clear();
    result?;
    println!("{name}: UpToDate/UpToDate");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdbd::replication::states::Role;

    fn event(object: EventObject) -> Event {
        Event {
            event: EventKind::Change,
            resource: "r0".into(),
            node: "alpha".into(),
            object,
            time: String::new(),
        }
    }

    fn peer_device(replication: ReplState, peer_disk: DiskState, progress: Option<ResyncProgress>) -> Event {
        event(EventObject::PeerDevice { peer: "beta".into(), replication, peer_disk, progress })
    }

    #[test]
    fn in_sync_needs_both_disks_up_to_date_and_established() {
        let mut view = View::default();
        view.apply(&event(EventObject::Device {
            disk: DiskState::UpToDate,
            out_of_sync_bytes: 0,
            error: None,
        }));
        view.apply(&event(EventObject::Connection {
            peer: "beta".into(),
            connection: ConnState::Connected,
            peer_role: Role::Secondary,
            reason: None,
        }));
        let progress = ResyncProgress {
            total_bytes: 1000 << 20,
            remaining_bytes: 578 << 20,
            done_percent: 42.2,
            rate_bytes_per_sec: 312 << 20,
            eta_secs: Some(3),
        };
        view.apply(&peer_device(ReplState::SyncSource, DiskState::Inconsistent, Some(progress)));
        assert!(!view.in_sync());
        assert_eq!(view.describe(), "SyncSource 42.2% done, 312 MiB/s, eta 3s");
        view.apply(&peer_device(ReplState::Established, DiskState::UpToDate, None));
        assert!(view.in_sync());
        assert_eq!(view.describe(), "Connected Established UpToDate/UpToDate");
    }

    #[test]
    fn standalone_keeps_its_reason() {
        let mut view = View::default();
        view.apply(&event(EventObject::Connection {
            peer: "beta".into(),
            connection: ConnState::StandAlone,
            peer_role: Role::Unknown,
            reason: Some("split brain detected".into()),
        }));
        assert_eq!(view.reason.as_deref(), Some("split brain detected"));
        assert!(!view.in_sync());
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_timeout("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_timeout("soon").is_err());
    }
}
