//! `rdbd demo`: the zero-setup main job. Two nodes of one resource on this machine, backed by
//! sparse files in a temporary directory: both come up, the first is promoted and fully syncs
//! the second, data is written through NBD on the Primary, both nodes show their status, the
//! replicas are compared byte for byte, and both nodes go down cleanly. Every step runs the
//! same `rdbd` command a user would type, and prints it.

mod nbd_client;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rdbd::node::control::{self, Request};
use rdbd::node::status::Status;
use rdbd::replication::states::{ConnState, DiskState, ReplState};

use nbd_client::NbdClient;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of each node's disk.
    #[arg(long, default_value = "256M", value_parser = super::parse_size)]
    pub size: u64,
    /// Data written through NBD on the Primary.
    #[arg(long, default_value = "64M", value_parser = super::parse_size)]
    pub write: u64,
    /// Leave both nodes running (and the directory in place) to explore with other clients.
    #[arg(long)]
    pub keep_running: bool,
}

const RESOURCE: &str = "demo";
const NODES: [&str; 2] = ["alpha", "beta"];

/// A free TCP port on loopback (bound and released; fine for a demo).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Demo {
    dir: PathBuf,
    nbd: [String; 2],
}

impl Demo {
    fn setup(size: u64) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("rdbd-demo-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc"))?;
        std::fs::create_dir_all(dir.join("run"))?;
        let mut nodes = String::new();
        let mut nbd = [String::new(), String::new()];
        for (i, name) in NODES.iter().enumerate() {
            let disk = dir.join(format!("{name}.img"));
            std::fs::File::create(&disk)?.set_len(size)?;
            nbd[i] = format!("127.0.0.1:{}", free_port()?);
            nodes.push_str(&format!(
                "\n[[node]]\nname = \"{name}\"\naddress = \"127.0.0.1:{}\"\ndisk = \"{}\"\nnbd-listen = \"{}\"\n",
                free_port()?,
                disk.display(),
                nbd[i]
            ));
        }
        let config = format!(
            "# Written by `rdbd demo`: two nodes on one machine.\nprotocol = \"C\"\n\n[net]\nshared-secret = \"demo-secret\"\ndata-integrity = true\n{nodes}"
        );
        std::fs::write(dir.join("etc").join(format!("{RESOURCE}.toml")), config)?;
        Ok(Self { dir, nbd })
    }

    /// Runs `rdbd <args>` as a user would (printing the command and its output).
    fn rdbd(&self, args: &[&str]) -> anyhow::Result<()> {
        println!("$ rdbd {}", args.join(" "));
        let output = Command::new(std::env::current_exe()?)
            .args(args)
            .env("RDBD_CONFIG_DIR", self.dir.join("etc"))
            .env("RDBD_RUN_DIR", self.dir.join("run"))
            .output()
            .context("running rdbd")?;
        print!("{}", String::from_utf8_lossy(&output.stdout));
        if !output.status.success() {
            bail!("`rdbd {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(())
    }

    async fn status(&self, node: &str) -> anyhow::Result<Status> {
        let socket = rdbd::node::control_socket(&self.dir.join("run"), RESOURCE, node);
        let response = control::request(&socket, &Request::Status, Duration::from_secs(5)).await?;
        response.status.context("no status in the daemon's answer")
    }

    /// Polls `node`'s status until `done` holds (at most `limit`), printing resync progress.
    async fn wait(
        &self,
        node: &str,
        limit: Duration,
        done: impl Fn(&Status) -> bool,
    ) -> anyhow::Result<Status> {
        let start = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let s = self.status(node).await?;
            if done(&s) {
                return Ok(s);
            }
            if let Some(r) = &s.resync {
                if last_print.elapsed() > Duration::from_millis(500) {
                    let rate = r.rate_bytes_per_sec / (1 << 20);
                    println!("  resync {:?}: {:.1}% done, {rate} MiB/s", s.replication, r.done_percent);
                    last_print = Instant::now();
                }
            }
            if start.elapsed() > limit {
                bail!("{node} did not reach the expected state within {limit:?}:\n{}", s.to_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn in_sync(s: &Status) -> bool {
    s.connection == ConnState::Connected
        && s.replication == ReplState::Established
        && s.disk == DiskState::UpToDate
        && s.peer.disk == DiskState::UpToDate
}

/// Compares the first `len` bytes of two files; returns the first differing offset.
fn first_difference(a: &Path, b: &Path, len: u64) -> anyhow::Result<Option<u64>> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    while offset < len {
        let n = ((len - offset) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(offset + i as u64));
        }
        offset += n as u64;
    }
    Ok(None)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let demo = Demo::setup(args.size)?;
    println!("rdbd demo: resource {RESOURCE:?} on nodes alpha and beta, disks in {}\n", demo.dir.display());
    let result = script(&demo, &args).await;
    if args.keep_running && result.is_ok() {
        let env = format!(
            "RDBD_CONFIG_DIR={} RDBD_RUN_DIR={}",
            demo.dir.join("etc").display(),
            demo.dir.join("run").display()
        );
        println!("\nBoth nodes keep running. Try:");
        println!("  nbdinfo nbd://{}/{RESOURCE}", demo.nbd[0]);
        println!("  {env} rdbd status {RESOURCE} --node beta");
        println!("Stop them with:");
        println!(
            "  {env} rdbd down {RESOURCE} --node alpha; {env} rdbd down {RESOURCE} --node beta; rm -r {}",
            demo.dir.display()
        );
        return Ok(());
    }
    for node in NODES {
        let _ = demo.rdbd(&["down", RESOURCE, "--node", node]);
    }
    std::fs::remove_dir_all(&demo.dir).ok();
    result
}

async fn script(demo: &Demo, args: &DemoArgs) -> anyhow::Result<()> {
    for node in NODES {
        demo.rdbd(&["create-md", RESOURCE, "--node", node])?;
    }
    for node in NODES {
        demo.rdbd(&["up", RESOURCE, "--node", node])?;
    }
    demo.wait("alpha", Duration::from_secs(20), |s| s.connection == ConnState::Connected).await?;
    println!("\nBoth nodes are connected; fresh disks are Inconsistent until one is declared the source:");
    demo.rdbd(&["status", RESOURCE, "--node", "alpha"])?;

    println!("\nPromote alpha; it becomes sync source of a full initial sync to beta:");
    let start = Instant::now();
    demo.rdbd(&["primary", RESOURCE, "--node", "alpha", "--force"])?;
    let s = demo.wait("alpha", Duration::from_secs(600), in_sync).await?;
    let synced = s.last_resync_bytes.unwrap_or(0);
    println!("  initial sync: {} in {:.2} s", super::human_size(synced), start.elapsed().as_secs_f64());

    println!(
        "\nWrite {} through NBD on the Primary (nbd://{}/{RESOURCE}), then FLUSH:",
        super::human_size(args.write),
        demo.nbd[0]
    );
    let nbd_addr = demo.nbd[0].clone();
    let write = args.write;
    let written = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, f64)> {
        let mut client = NbdClient::connect(&nbd_addr, RESOURCE)?;
        let total = write.min(client.size);
        let mut block = vec![0u8; 1 << 20];
        let start = Instant::now();
        let mut offset = 0;
        while offset < total {
            let n = ((total - offset) as usize).min(block.len());
            // A pattern that differs per MiB, so a misplaced block would show in the comparison.
            for (i, b) in block[..n].iter_mut().enumerate() {
                *b = ((offset >> 20) as u8).wrapping_mul(31).wrapping_add(i as u8);
            }
            client.write(offset, &block[..n])?;
            offset += n as u64;
        }
        client.flush()?;
        Ok((total, start.elapsed().as_secs_f64()))
    })
    .await??;
    println!(
        "  {} written and flushed in {:.2} s (protocol C: each write acknowledged after both disks have it)",
        super::human_size(written.0),
        written.1
    );

    println!("\nStatus of both nodes:");
    demo.rdbd(&["status", RESOURCE, "--node", "alpha"])?;
    demo.rdbd(&["status", RESOURCE, "--node", "beta"])?;

    let data_size = NbdClient::connect(&demo.nbd[0], RESOURCE)?.size;
    let (a, b) = (demo.dir.join("alpha.img"), demo.dir.join("beta.img"));
    match first_difference(&a, &b, data_size)? {
        None => {
            println!("\nThe two replicas are byte-identical ({} compared).", super::human_size(data_size))
        }
        Some(at) => bail!("the replicas differ at byte {at}"),
    }
    if !args.keep_running {
        println!("\nClean shutdown (the Primary demotes itself; metadata is written so the next start needs no resync):");
    }
    Ok(())
}
