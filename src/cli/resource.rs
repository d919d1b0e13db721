//! What every per-resource verb starts with: the resource file, and which of its nodes this
//! machine is (`--node`, else `RDBD_NODE`, else the hostname).

use std::path::PathBuf;

use clap::Args;
use rdbd::config::{self, NodeConfig, ResourceConfig};
use rdbd::metadata::store::MetaLocation;

/// Arguments shared by the per-resource verbs.
#[derive(Args, Debug, Clone)]
pub struct ResourceArgs {
    /// Resource name; its file is <config-dir>/<RES>.toml.
    #[arg(value_name = "RES")]
    pub resource: String,
    /// Directory of resource files [default: $RDBD_CONFIG_DIR, else /etc/rdbd].
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Which node this machine is [default: $RDBD_NODE, else the hostname].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

/// Arguments of the verbs that take one resource or, without a name, every resource that is up
/// (`status`, `events`).
#[derive(Args, Debug, Clone)]
pub struct SomeResourcesArgs {
    /// Resource name [default: every resource of the config directory that is up].
    #[arg(value_name = "RES")]
    pub resource: Option<String>,
    /// Directory of resource files [default: $RDBD_CONFIG_DIR, else /etc/rdbd].
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Which node this machine is [default: $RDBD_NODE, else the hostname].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

impl SomeResourcesArgs {
    /// The arguments naming resource `resource`, with the same directory and node.
    pub fn named(&self, resource: String) -> ResourceArgs {
        ResourceArgs { resource, config_dir: self.config_dir.clone(), node: self.node.clone() }
    }
}

/// A loaded resource seen from this node.
pub struct Resource {
    pub config: ResourceConfig,
    /// Index of this node in `config.nodes`.
    pub me: usize,
}

impl Resource {
    pub fn load(args: &ResourceArgs) -> anyhow::Result<Self> {
        let dir = config::config_dir(args.config_dir.as_deref());
        let config = config::load(&dir, &args.resource)?;
        let from_env = std::env::var(config::NODE_ENV).ok().filter(|n| !n.is_empty());
        let wanted = args.node.clone().or(from_env);
        let (me, _) = config::local_node(&config, wanted.as_deref())?;
        let me = config
            .nodes
            .iter()
            .position(|n| n.name == me.name)
            .expect("local_node returns a node of the config");
        Ok(Self { config, me })
    }

    pub fn me(&self) -> &NodeConfig {
        &self.config.nodes[self.me]
    }

    /// This node's control socket.
    pub fn control_socket(&self) -> std::path::PathBuf {
        rdbd::node::control_socket(&rdbd::node::run_dir(), &self.config.name, &self.me().name)
    }

    /// Where this node keeps its metadata.
    pub fn meta_location(&self) -> MetaLocation {
        self.me().meta_disk.clone()
    }
}
