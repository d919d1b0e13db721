//! The verbs that talk to a running daemon: down, primary, secondary, status, connect,
//! disconnect, new-current-uuid.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use rdbd::node::control::{self, Request, Response};

use super::resource::{Resource, ResourceArgs, SomeResourcesArgs};

/// Role changes wait for in-flight writes and for the peer; give them time.
const VERB_LIMIT: Duration = Duration::from_secs(60);

#[derive(Args, Debug)]
pub struct PlainArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
}

#[derive(Args, Debug)]
pub struct PrimaryArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// Promote even if this node's data is not known to be UpToDate (it becomes the newest).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub which: SomeResourcesArgs,
    /// Print JSON instead of the drbdadm-like text (a list when no resource is named).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// After a split brain: give up this node's changes and take the peer's (this node must be
    /// Secondary); only the blocks changed on either side are resynced.
    #[arg(long)]
    pub discard_my_data: bool,
}

pub async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    send(&res, Request::Connect { discard_my_data: args.discard_my_data }).await?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct NewCurrentUuidArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// Both disks are known identical (e.g. freshly zeroed): skip the initial full sync.
    #[arg(long)]
    pub clear_bitmap: bool,
}

#[derive(Args, Debug)]
pub struct InvalidateArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// `no`: resync only the blocks already marked out of sync (by `verify`), not all of them.
    #[arg(long, value_name = "yes|no", default_value = "yes", value_parser = parse_yes_no, action = clap::ArgAction::Set)]
    pub reset_bitmap: bool,
}

fn parse_yes_no(text: &str) -> Result<bool, String> {
    match text {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => Err(format!("expected yes or no, not {other:?}")),
    }
}

pub async fn invalidate(args: InvalidateArgs, remote: bool) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    let reset_bitmap = args.reset_bitmap;
    let req = if remote {
        Request::InvalidateRemote { reset_bitmap }
    } else {
        Request::Invalidate { reset_bitmap }
    };
    send(&res, req).await?;
    Ok(())
}

/// Sends `req` to this node's daemon; a refusal becomes the error.
pub(super) async fn send(res: &Resource, req: Request) -> anyhow::Result<Response> {
    let response = control::request(&res.control_socket(), &req, VERB_LIMIT).await?;
    if !response.ok {
        bail!("{}: {}", res.config.name, response.error.unwrap_or_else(|| "refused".into()));
    }
    Ok(response)
}

pub async fn simple(args: PlainArgs, req: Request) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    send(&res, req).await?;
    Ok(())
}

pub async fn primary(args: PrimaryArgs) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    send(&res, Request::Primary { force: args.force }).await?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct SwitchoverArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// The node to move to (the peer; checked).
    #[arg(long, value_name = "NODE")]
    pub to: Option<String>,
}

/// `rdbd switchover res0 [--to NODE]`, on the Primary.
pub async fn switchover(args: SwitchoverArgs) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    send(&res, Request::Switchover { to: args.to }).await?;
    println!("rdbd: {} moved to {}", res.config.name, res.config.nodes[1 - res.me].name);
    Ok(())
}

pub async fn new_current_uuid(args: NewCurrentUuidArgs) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    send(&res, Request::NewCurrentUuid { clear_bitmap: args.clear_bitmap }).await?;
    Ok(())
}

pub async fn down(args: PlainArgs) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    let socket = res.control_socket();
    let pid = match control::request(&socket, &Request::Status, VERB_LIMIT).await {
        Err(control::ControlError::NotRunning { .. }) => {
            println!("rdbd: {} is not up on node {}", res.config.name, res.me().name);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
        Ok(r) => r.status.map(|s| s.pid),
    };
    send(&res, Request::Down).await?;
    // Done when the daemon has exited (its metadata is written by then).
    // A zombie (exited, not yet reaped by whoever started it) counts as gone.
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while pid.is_some_and(alive) || socket.exists() {
        if tokio::time::Instant::now() >= deadline {
            bail!("{}: the daemon did not exit within 20 s after going down", res.config.name);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let Some(name) = args.which.resource.clone() else {
        return status_of_all(&args).await;
    };
    let res = Resource::load(&args.which.named(name))?;
    let response = send(&res, Request::Status).await?;
    let Some(status) = response.status else { bail!("the daemon sent no status") };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.to_text());
    }
    Ok(())
}

/// The config directory and the resources it names (`<name>.toml`), sorted.
pub(super) fn resource_names(config_dir: Option<&Path>) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let dir = rdbd::config::config_dir(config_dir);
    let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".toml").map(str::to_owned))
        .collect();
    names.sort();
    Ok((dir, names))
}

/// `status` without a resource: every resource file whose daemon answers, as drbdadm does.
async fn status_of_all(args: &StatusArgs) -> anyhow::Result<()> {
    let (dir, names) = resource_names(args.which.config_dir.as_deref())?;
    let mut all = Vec::new();
    for name in names {
        let res = Resource::load(&args.which.named(name))?;
        match control::request(&res.control_socket(), &Request::Status, VERB_LIMIT).await {
            Ok(Response { status: Some(status), .. }) => all.push(status),
            Err(control::ControlError::NotRunning { .. }) => {}
            Ok(r) => bail!("{}: {}", res.config.name, r.error.unwrap_or_else(|| "no status".into())),
            Err(e) => return Err(e.into()),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        println!("no resource is up (config directory {})", dir.display());
    } else {
        let texts: Vec<String> = all.iter().map(|s| s.to_text()).collect();
        print!("{}", texts.join("\n"));
    }
    Ok(())
}
