//! `rdbd events [RES] [--now]`: the daemon's state changes as JSON lines on stdout, like
//! `drbdsetup events2` (the line shape is documented in `rdbd::node::event_stream`).

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use rdbd::node::control::{self, ControlError, EventStream};

use super::resource::{Resource, SomeResourcesArgs};
use super::verbs::resource_names;

/// How long the daemon may take to accept the subscription.
const SUBSCRIBE_LIMIT: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    pub which: SomeResourcesArgs,
    /// First print every object's current state ("exists" lines, ended by object "-").
    #[arg(long)]
    pub now: bool,
}

/// Subscribes to `res`'s daemon; a daemon that is not running or refuses is the error.
pub(super) async fn subscribe(res: &Resource, now: bool) -> anyhow::Result<EventStream> {
    let name = &res.config.name;
    match control::subscribe(&res.control_socket(), now, SUBSCRIBE_LIMIT)
        .await
        .with_context(|| name.clone())?
    {
        Ok(stream) => Ok(stream),
        Err(refused) => bail!("{name}: {}", refused.error.unwrap_or_else(|| "events refused".into())),
    }
}

pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    let Some(name) = args.which.resource.clone() else {
        return run_all(&args).await;
    };
    let res = Resource::load(&args.which.named(name))?;
    let mut stream = subscribe(&res, args.now).await?;
    let mut out = std::io::stdout().lock();
    while let Some(line) = stream.next_line().await.with_context(|| res.config.name.clone())? {
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The reader went away (e.g. `| head`): nothing left to do.
            return Ok(());
        }
    }
    Ok(())
}

/// Every resource that is up, merged line by line; ends when every stream has ended.
async fn run_all(args: &EventsArgs) -> anyhow::Result<()> {
    let (dir, names) = resource_names(args.which.config_dir.as_deref())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut streams = 0;
    for name in names {
        let res = Resource::load(&args.which.named(name))?;
        let mut stream = match subscribe(&res, args.now).await {
            Ok(stream) => stream,
            Err(e) if matches!(e.downcast_ref::<ControlError>(), Some(ControlError::NotRunning { .. })) => {
                continue;
            }
            Err(e) => return Err(e),
        };
        streams += 1;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stream.next_line().await {
                if tx.send(line.to_owned()).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    if streams == 0 {
        bail!("no resource is up (config directory {})", dir.display());
    }
    let mut out = std::io::stdout().lock();
    while let Some(line) = rx.recv().await {
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
