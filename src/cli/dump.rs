//! `rdbd dump`: the effective configuration of a resource, every default written out, so an
//! operator can see exactly what the daemon would use and which node this machine would be.

use std::io::Write;

use clap::Args;
use rdbd::config::{self, ConfigError, ResourceConfig};

use super::resource::ResourceArgs;

#[derive(Args, Debug)]
pub struct DumpArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
}

pub fn run(args: DumpArgs) -> anyhow::Result<()> {
    let args = args.resource;
    let dir = config::config_dir(args.config_dir.as_deref());
    let cfg = config::load(&dir, &args.resource)?;
    let identity = identity_line(&cfg, args.node)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "# effective configuration of resource {} from {}", cfg.name, cfg.file.display())?;
    writeln!(out, "{identity}")?;
    write!(out, "{}", cfg.to_toml())?;
    out.flush()?;
    Ok(())
}

/// The comment saying which node this machine is. A name given explicitly must exist (a typo
/// there is an error); a hostname that matches no node only means this machine cannot tell.
fn identity_line(cfg: &ResourceConfig, node_arg: Option<String>) -> anyhow::Result<String> {
    let from_env = std::env::var(config::NODE_ENV).ok().filter(|n| !n.is_empty());
    let (wanted, how) = match (node_arg, from_env) {
        (Some(name), _) => (Some(name), "--node".to_string()),
        (None, Some(name)) => (Some(name), config::NODE_ENV.to_string()),
        (None, None) => (None, format!("hostname {:?}", config::hostname())),
    };
    match config::local_node(cfg, wanted.as_deref()) {
        Ok((me, peer)) => {
            Ok(format!("# this machine is node {} (by {how}); its peer is {}", me.name, peer.name))
        }
        Err(ConfigError::UnknownNode { name, by_hostname: true, nodes, .. }) => Ok(format!(
            "# cannot tell which node this machine is: hostname {name:?} is none of {} \
             (name it with --node NAME or {})",
            nodes.join(", "),
            config::NODE_ENV
        )),
        Err(e) => Err(e.into()),
    }
}
