//! Resource configuration: one TOML file per resource, `<config-dir>/<resource>.toml`.
//!
//! The file describes the two nodes of a replicated device and the options both must agree on
//! (replication protocol, timers, authentication, metadata geometry). Option names and defaults
//! follow DRBD's so that a DRBD user can read a file without a manual. Loading validates
//! everything up front and reports each problem as `file:line: key: message`, because a daemon
//! that fails later with a vague error is much harder to fix than a file.
//!
//! ```toml
//! protocol = "C"
//! [net]
//! shared-secret = "s3cret"
//! [[node]]
//! name = "alpha"
//! address = "192.168.10.1:7789"
//! disk = "/dev/vg/res0"
//! [[node]]
//! name = "beta"
//! address = "192.168.10.2:7789"
//! disk = "/dev/vg/res0"
//! ```

mod error;
mod locate;
mod raw;
mod units;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::metadata::store::MetaLocation;
pub use crate::replication::resync::pace::{
    ResyncConfig, DEFAULT_C_DELAY_TARGET, DEFAULT_C_FILL_TARGET, DEFAULT_C_MAX_RATE, DEFAULT_C_MIN_RATE,
    DEFAULT_C_PLAN_AHEAD, DEFAULT_RESYNC_RATE,
};
pub use crate::replication::split_brain::{AfterSb0Pri, Policies, RrConflict};
pub use error::ConfigError;
pub use rdbd_protocol::repl::{AfterSb1, AfterSb2, DigestAlg, Protocol};
pub use units::{format_duration, format_size, parse_duration};

/// Where resource files live unless `--config-dir` or [`CONFIG_DIR_ENV`] says otherwise.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/rdbd";
/// Environment variable that overrides [`DEFAULT_CONFIG_DIR`] (`--config-dir` wins over it).
pub const CONFIG_DIR_ENV: &str = "RDBD_CONFIG_DIR";
/// Environment variable naming this machine's node when its hostname is not the node name.
pub const NODE_ENV: &str = "RDBD_NODE";

/// DRBD's defaults (drbd_limits.h), so a DRBD user's expectations carry over.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(6);
pub const DEFAULT_CONNECT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_AL_EXTENTS: u32 = 1237;
pub const DEFAULT_BITMAP_BLOCK: u64 = 4096;

/// The activity-log size range the DRBD kernel module accepts (drbd_limits.h; its man page's
/// lower bound of 7 is out of date).
pub const AL_EXTENTS_MIN: u32 = 67;
pub const AL_EXTENTS_MAX: u32 = 65534;
/// Bytes covered by one bitmap bit: DRBD 9.3 allows 4 KiB to 1 MiB, powers of two.
pub const BITMAP_BLOCK_MIN: u64 = 4 << 10;
pub const BITMAP_BLOCK_MAX: u64 = 1 << 20;
/// Resync rates: at least 1 KiB/s (`resync-rate`; 0 means "no bound" for the controller's
/// limits), at most 1 TiB/s, far above any disk yet small enough that no arithmetic on a rate
/// overflows.
pub const RATE_MIN: u64 = 1 << 10;
pub const RATE_MAX: u64 = 1 << 40;
/// `c-plan-ahead` up to DRBD's 30 s (0 turns the controller off).
pub const C_PLAN_AHEAD_MAX: Duration = Duration::from_secs(30);
/// `c-fill-target` up to 1 GiB in flight (0: aim at the delay target instead).
pub const C_FILL_TARGET_MAX: u64 = 1 << 30;
/// `c-delay-target` from 100 ms to 10 s.
pub const C_DELAY_TARGET_MIN: Duration = Duration::from_millis(100);
pub const C_DELAY_TARGET_MAX: Duration = Duration::from_secs(10);
/// DRBD's limit on `shared-secret`; longer secrets add nothing to an HMAC key anyway.
pub const SHARED_SECRET_MAX: usize = 64;

/// Everything about one replicated resource, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceConfig {
    /// The resource name: the file's stem (and the `resource` key when it is given).
    pub name: String,
    /// The file it was read from, for messages.
    pub file: PathBuf,
    pub protocol: Protocol,
    pub net: NetConfig,
    pub disk: DiskConfig,
    pub handlers: HandlersConfig,
    /// With an `[ha]` table the daemon chooses its role itself; without, roles are manual.
    pub ha: Option<HaConfig>,
    /// Exactly two nodes, in file order.
    pub nodes: [NodeConfig; 2],
}

/// The `[net]` table: how the two nodes talk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// When set, each side proves knowledge of it with an HMAC challenge-response.
    pub shared_secret: Option<String>,
    /// Idle time after which a ping checks that the peer is alive.
    pub ping_interval: Duration,
    /// How long a ping answer may take.
    pub ping_timeout: Duration,
    /// How long any other expected answer may take before the connection is dropped.
    pub timeout: Duration,
    /// Delay between attempts to (re)connect to the peer.
    pub connect_interval: Duration,
    /// Send a crc32c with every data block so corruption on the wire is caught.
    pub data_integrity: bool,
    /// Split brain with no Primary: which side's changes are discarded, if any.
    pub after_sb_0pri: AfterSb0Pri,
    /// Split brain with one Primary.
    pub after_sb_1pri: AfterSb1,
    /// Split brain with two Primaries.
    pub after_sb_2pri: AfterSb2,
    /// The sync decision would make a Primary the sync target.
    pub rr_conflict: RrConflict,
    /// Checksum-based resync: the target sends digests, the source sends only blocks that differ.
    pub csums_alg: Option<DigestAlg>,
    /// Only the first resync after a Primary crash uses checksums (the rest send everything).
    pub csums_after_crash_only: bool,
    /// Digest `rdbd verify` compares blocks with.
    pub verify_alg: DigestAlg,
}

/// `on-io-error`: what a node does when its backing disk fails a read, write or flush (DRBD's
/// `disk` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnIoError {
    /// The disk goes Failed, then Diskless: never trusted again until `rdbd attach`. A Primary
    /// keeps serving through the peer.
    #[default]
    Detach,
    /// The error is passed on (a read is retried on the peer) and the disk becomes
    /// Inconsistent; metadata errors still detach.
    PassOn,
    /// As `detach`, and the `local-io-error` handler runs.
    CallLocalIoError,
}

rdbd_protocol::option_spellings!(OnIoError { Detach => "detach", PassOn => "pass_on", CallLocalIoError => "call-local-io-error" });

mod ha;
pub use ha::{
    Failback, HaConfig, NoQuorumPolicy, OnDemoteFailure, OnQuorumLoss, ServiceConfig, WitnessConfig,
    DEFAULT_MIGRATION_THRESHOLD, DEFAULT_MONITOR_INTERVAL,
};

/// Commands the daemon runs on events, with `RDBD_RESOURCE`, `RDBD_NODE`, `RDBD_PEER` (and
/// `RDBD_EVENT`) in their environment; run through `/bin/sh -c`. None: nothing runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandlersConfig {
    /// A split brain was detected (whether or not a policy resolved it).
    pub split_brain: Option<String>,
    /// This Primary lost a split-brain resolution (after-sb-*pri call-pri-lost-after-sb).
    pub pri_lost_after_sb: Option<String>,
    /// This Primary would become sync target (rr-conflict call-pri-lost).
    pub pri_lost: Option<String>,
    /// Online verify found blocks out of sync.
    pub out_of_sync: Option<String>,
    /// The backing disk failed (on-io-error call-local-io-error).
    pub local_io_error: Option<String>,
}

impl NetConfig {
    /// The split-brain policies, as the recovery takes them.
    pub fn split_brain_policies(&self) -> Policies {
        Policies {
            after_sb_0pri: self.after_sb_0pri.clone(),
            after_sb_1pri: self.after_sb_1pri,
            after_sb_2pri: self.after_sb_2pri,
        }
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            shared_secret: None,
            ping_interval: DEFAULT_PING_INTERVAL,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
            connect_interval: DEFAULT_CONNECT_INTERVAL,
            data_integrity: false,
            after_sb_0pri: AfterSb0Pri::default(),
            after_sb_1pri: AfterSb1::default(),
            after_sb_2pri: AfterSb2::default(),
            rr_conflict: RrConflict::default(),
            csums_alg: None,
            csums_after_crash_only: false,
            verify_alg: DigestAlg::default(),
        }
    }
}

/// The `[disk]` table: metadata geometry, which both nodes must share, the resync's pace and
/// what a disk error does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Number of 4 MiB activity-log extents that may be hot (resynced after a primary crash).
    pub al_extents: u32,
    /// Bytes of data per bitmap bit.
    pub bitmap_block: u64,
    pub resync: ResyncConfig,
    pub on_io_error: OnIoError,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            al_extents: DEFAULT_AL_EXTENTS,
            bitmap_block: DEFAULT_BITMAP_BLOCK,
            resync: ResyncConfig::default(),
            on_io_error: OnIoError::default(),
        }
    }
}

/// One `[[node]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Matched against `--node`, `RDBD_NODE` or the hostname to find out which node we are.
    pub name: String,
    /// Replication address, `host:port` (IPv6 in brackets).
    pub address: String,
    /// Backing disk or file, an absolute path.
    pub disk: PathBuf,
    pub meta_disk: MetaLocation,
    /// Optional `host:port` where the primary serves the device over NBD to userspace clients.
    pub nbd_listen: Option<String>,
    /// Optional kernel NBD device to attach on the primary.
    pub nbd_device: Option<NbdDevice>,
    /// Optional `host:port` of the second heartbeat path (UDP, another address pair than the
    /// replication link), so that one broken interconnect is not taken for a dead peer.
    pub heartbeat_address: Option<String>,
}

/// The `nbd-device` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdDevice {
    /// The first free /dev/nbdN.
    Auto,
    Path(PathBuf),
}

/// The config directory: `explicit` (from `--config-dir`), else [`CONFIG_DIR_ENV`], else
/// [`DEFAULT_CONFIG_DIR`]. An empty environment variable counts as unset.
pub fn config_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    match std::env::var_os(CONFIG_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_CONFIG_DIR),
    }
}

/// Checks that a resource name can be used as a file name in the config directory: letters,
/// digits, `.`, `-`, `_`, not starting with `.` or `-` (so no `..`, no options, no hidden files).
pub fn check_resource_name(name: &str) -> Result<(), ConfigError> {
    raw::resource_name_problem(name)
        .map_or(Ok(()), |reason| Err(ConfigError::ResourceName { name: name.to_string(), reason }))
}

/// Reads and validates `<config_dir>/<resource>.toml`.
pub fn load(config_dir: &Path, resource: &str) -> Result<ResourceConfig, ConfigError> {
    check_resource_name(resource)?;
    let path = config_dir.join(format!("{resource}.toml"));
    let bytes = std::fs::read(&path).map_err(|error| ConfigError::Read { path: path.clone(), error })?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..valid].iter().filter(|&&b| b == b'\n').count() + 1;
            return Err(ConfigError::Syntax {
                file: path,
                line,
                key: None,
                message: "the file is not valid UTF-8".to_string(),
            });
        }
    };
    parse(&path, &text)
}

/// Parses and validates the text of a resource file. `path_for_messages` names the file in
/// errors, and its stem is the resource name.
pub fn parse(path_for_messages: &Path, text: &str) -> Result<ResourceConfig, ConfigError> {
    raw::parse(path_for_messages, text)
}

/// Which of the two nodes this machine is, as (this node, peer).
///
/// `override_name` (from `--node` or [`NODE_ENV`]) must equal a node name. Without it the
/// machine's hostname is used; a fully qualified hostname also matches by its first label, and
/// the comparison ignores ASCII case, as DNS does.
pub fn local_node<'a>(
    cfg: &'a ResourceConfig,
    override_name: Option<&str>,
) -> Result<(&'a NodeConfig, &'a NodeConfig), ConfigError> {
    let [a, b] = &cfg.nodes;
    let (wanted, by_hostname) = match override_name {
        Some(name) => (name.to_string(), false),
        None => (hostname(), true),
    };
    let matches = |node: &NodeConfig| {
        if by_hostname {
            let short = wanted.split('.').next().unwrap_or(&wanted);
            node.name.eq_ignore_ascii_case(&wanted) || node.name.eq_ignore_ascii_case(short)
        } else {
            node.name == wanted
        }
    };
    if matches(a) {
        Ok((a, b))
    } else if matches(b) {
        Ok((b, a))
    } else {
        Err(ConfigError::UnknownNode {
            file: cfg.file.clone(),
            resource: cfg.name.clone(),
            name: wanted,
            by_hostname,
            nodes: vec![a.name.clone(), b.name.clone()],
        })
    }
}

/// This machine's hostname (uname's nodename), which names its node by default, as in DRBD.
pub fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

impl ResourceConfig {
    /// The node with this name, if any.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The effective configuration as a resource file, every default written out; parsing it
    /// gives back an equal configuration.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_toml(&mut out);
        out
    }

    fn write_toml(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out, "resource = {}", quote(&self.name))?;
        writeln!(out, "protocol = {}", quote(self.protocol.as_str()))?;
        let net = &self.net;
        writeln!(out, "\n[net]")?;
        if let Some(secret) = &net.shared_secret {
            writeln!(out, "shared-secret = {}", quote(secret))?;
        }
        writeln!(out, "ping-interval = {}", quote(&format_duration(net.ping_interval)))?;
        writeln!(out, "ping-timeout = {}", quote(&format_duration(net.ping_timeout)))?;
        writeln!(out, "timeout = {}", quote(&format_duration(net.timeout)))?;
        writeln!(out, "connect-interval = {}", quote(&format_duration(net.connect_interval)))?;
        writeln!(out, "data-integrity = {}", net.data_integrity)?;
        writeln!(out, "after-sb-0pri = {}", quote(&net.after_sb_0pri.to_string()))?;
        writeln!(out, "after-sb-1pri = {}", quote(net.after_sb_1pri.as_str()))?;
        writeln!(out, "after-sb-2pri = {}", quote(net.after_sb_2pri.as_str()))?;
        writeln!(out, "rr-conflict = {}", quote(net.rr_conflict.as_str()))?;
        match net.csums_alg {
            Some(alg) => writeln!(out, "csums-alg = {}", quote(alg.as_str()))?,
            // Absence is the value: there is no spelling for "off".
            None => writeln!(out, "# csums-alg not set: a resync sends every out-of-sync block")?,
        }
        writeln!(out, "csums-after-crash-only = {}", net.csums_after_crash_only)?;
        writeln!(out, "verify-alg = {}", quote(net.verify_alg.as_str()))?;
        let disk = &self.disk;
        writeln!(out, "\n[disk]")?;
        writeln!(out, "al-extents = {}", disk.al_extents)?;
        writeln!(out, "bitmap-block = {}", quote(&format_size(disk.bitmap_block)))?;
        let resync = &disk.resync;
        writeln!(out, "resync-rate = {}", size_literal(resync.resync_rate))?;
        writeln!(out, "c-plan-ahead = {}", quote(&format_duration(resync.c_plan_ahead)))?;
        writeln!(out, "c-fill-target = {}", size_literal(resync.c_fill_target))?;
        writeln!(out, "c-delay-target = {}", quote(&format_duration(resync.c_delay_target)))?;
        writeln!(out, "c-max-rate = {}", size_literal(resync.c_max_rate))?;
        writeln!(out, "c-min-rate = {}", size_literal(resync.c_min_rate))?;
        writeln!(out, "on-io-error = {}", quote(disk.on_io_error.as_str()))?;
        let handlers = &self.handlers;
        writeln!(out, "\n[handlers]")?;
        for (key, command) in [
            ("split-brain", &handlers.split_brain),
            ("pri-lost-after-sb", &handlers.pri_lost_after_sb),
            ("pri-lost", &handlers.pri_lost),
            ("out-of-sync", &handlers.out_of_sync),
            ("local-io-error", &handlers.local_io_error),
        ] {
            if let Some(command) = command {
                writeln!(out, "{key} = {}", quote(command))?;
            }
        }
        if let Some(ha) = &self.ha {
            ha::write_ha(out, ha)?;
        }
        for node in &self.nodes {
            writeln!(out, "\n[[node]]")?;
            writeln!(out, "name = {}", quote(&node.name))?;
            writeln!(out, "address = {}", quote(&node.address))?;
            writeln!(out, "disk = {}", quote(&node.disk.to_string_lossy()))?;
            let meta = match &node.meta_disk {
                MetaLocation::Internal => "internal".into(),
                MetaLocation::External(path) => path.to_string_lossy(),
            };
            writeln!(out, "meta-disk = {}", quote(&meta))?;
            if let Some(listen) = &node.nbd_listen {
                writeln!(out, "nbd-listen = {}", quote(listen))?;
            }
            match &node.nbd_device {
                Some(NbdDevice::Auto) => writeln!(out, "nbd-device = \"auto\"")?,
                Some(NbdDevice::Path(path)) => {
                    writeln!(out, "nbd-device = {}", quote(&path.to_string_lossy()))?
                }
                None => {}
            }
            if let Some(heartbeat) = &node.heartbeat_address {
                writeln!(out, "heartbeat-address = {}", quote(heartbeat))?;
            }
        }
        Ok(())
    }
}

/// A size or rate: "250KiB" when a binary unit divides it, else a bare integer (0, 1000).
fn size_literal(bytes: u64) -> String {
    let text = format_size(bytes);
    if text.bytes().all(|b| b.is_ascii_digit()) {
        text
    } else {
        quote(&text)
    }
}

/// A TOML string literal, escaped by the toml crate.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests;
