//! `rdbd verify RES`: starts an online verify and, unless `--no-wait`, waits for it, showing
//! progress, then reports what differed. The blocks found are marked out of sync on both nodes;
//! the report says how to resync them.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use rdbd::node::control::Request;
use rdbd::node::status::Status;

use super::resource::{Resource, ResourceArgs};
use super::verbs::send;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// Start at this byte offset (e.g. to continue an interrupted verify).
    #[arg(long, value_name = "OFFSET", default_value = "0", value_parser = super::parse_size)]
    pub start: u64,
    /// Return once the verify has started; `rdbd status` shows its progress and result.
    #[arg(long)]
    pub no_wait: bool,
}

const POLL: Duration = Duration::from_millis(200);
/// A plain progress line at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    let name = res.config.name.clone();
    let before = status(&res).await?.verifies_ended;
    send(&res, Request::Verify { start: args.start }).await?;
    if args.no_wait {
        println!("{name}: online verify started; `rdbd status {name}` shows its progress");
        return Ok(());
    }
    let mut last_line = tokio::time::Instant::now();
    let s = loop {
        tokio::time::sleep(POLL).await;
        let s = status(&res).await?;
        if s.verifies_ended > before {
            break s;
        }
        if let Some(v) = &s.verify {
            if last_line.elapsed() >= PROGRESS_EVERY {
                last_line = tokio::time::Instant::now();
                let p = &v.progress;
                println!(
                    "{name}: verify {:.1}% done, {} MiB/s, {} blocks out of sync so far",
                    p.done_percent,
                    p.rate_bytes_per_sec >> 20,
                    v.out_of_sync_blocks
                );
            }
        }
    };
    let Some(result) = s.last_verify else { bail!("{name}: the daemon reported no verify result") };
    let compared = super::human_size(result.checked_bytes);
    if !result.completed {
        bail!("{name}: verify interrupted after {compared}: the connection to the peer ended");
    }
    if result.out_of_sync_blocks == 0 {
        println!(
            "{name}: verify done: {compared} compared in {:.1} s, no blocks out of sync",
            result.seconds
        );
        return Ok(());
    }
    let block = res.config.disk.bitmap_block;
    println!(
        "{name}: verify done: {compared} compared in {:.1} s, {} blocks out of sync ({}), marked on both nodes:",
        result.seconds,
        result.out_of_sync_blocks,
        super::human_size(result.out_of_sync_blocks * block)
    );
    for (offset, len) in &result.out_of_sync_ranges {
        println!("  offset {offset:#014x} length {len}");
    }
    let listed: u64 = result.out_of_sync_ranges.iter().map(|(_, len)| len.div_ceil(block)).sum();
    if listed < result.out_of_sync_blocks {
        println!("  ... and more ({} blocks are listed)", listed);
    }
    println!(
        "{name}: resync them with `rdbd invalidate-remote {name} --reset-bitmap=no` on the node whose data is right"
    );
    Ok(())
}

async fn status(res: &Resource) -> anyhow::Result<Status> {
    let response = send(res, Request::Status).await?;
    response.status.ok_or_else(|| anyhow::anyhow!("the daemon sent no status"))
}
