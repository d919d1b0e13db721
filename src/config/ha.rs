//! The `[ha]` table and the `[[service]]` chain: who may become Primary on its own, and what is
//! started on the Primary (in order) and stopped before it demotes (in reverse).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::raw::{choice, duration, Source};
use super::units::format_duration;
use super::{quote, ConfigError, NodeConfig};

/// What a Primary does when it has lost both its peer and quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnQuorumLoss {
    /// Hold writes (unanswered) until quorum returns (DRBD's suspend-io).
    #[default]
    Freeze,
    /// Stop the services, then become Secondary; held writes fail.
    Demote,
    /// Fail writes with EIO.
    FailIo,
}

/// Whether a node may promote itself after losing its peer when neither a witness nor a
/// fence-peer command can settle who is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoQuorumPolicy {
    /// Never: a cut link would let both nodes write.
    #[default]
    Stop,
    /// Promote anyway, accepting split brains (warned about at start and in status).
    Ignore,
}

/// Whether the resource moves back to a preferred node once it is UpToDate again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Failback {
    /// Only the first promotion prefers `preferred-nodes`.
    #[default]
    Never,
    Always,
}

/// What to do when stopping the services or demoting fails on the way to Secondary (the node
/// could otherwise go on writing while the peer takes over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDemoteFailure {
    /// Stay Primary, report it (no takeover by the peer is possible then).
    #[default]
    Stay,
    Reboot,
    Poweroff,
}

rdbd_protocol::option_spellings!(OnQuorumLoss { Freeze => "freeze", Demote => "demote", FailIo => "fail-io" });
rdbd_protocol::option_spellings!(NoQuorumPolicy { Stop => "stop", Ignore => "ignore" });
rdbd_protocol::option_spellings!(Failback { Never => "never", Always => "always" });
rdbd_protocol::option_spellings!(OnDemoteFailure { Stay => "stay", Reboot => "reboot", Poweroff => "poweroff" });

/// The quorum witness (`rdbd witness` on a third host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessConfig {
    pub address: String,
    pub secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaConfig {
    pub witness: Option<WitnessConfig>,
    /// Run when the peer is lost, with DRBD's exit codes (4 outdated, 5 unreachable, 7 fenced...).
    pub fence_peer: Option<String>,
    pub no_quorum_policy: NoQuorumPolicy,
    pub on_quorum_loss: OnQuorumLoss,
    /// Nodes that should be Primary when both are fine, best first.
    pub preferred_nodes: Vec<String>,
    pub failback: Failback,
    pub monitor_interval: Duration,
    /// Failed monitors (each followed by a restart) after which the resource moves to the peer.
    pub migration_threshold: u32,
    pub on_demote_failure: OnDemoteFailure,
    pub services: Vec<ServiceConfig>,
}

pub const DEFAULT_MONITOR_INTERVAL: Duration = Duration::from_secs(10);
/// `net.ping-interval` when an `[ha]` table is present and the key is not written: a silent
/// link is then declared dead after 1.5 s (two intervals and the ping timeout).
pub const HA_PING_INTERVAL: Duration = Duration::from_millis(500);
pub const DEFAULT_MIGRATION_THRESHOLD: u32 = 3;
const MONITOR_INTERVAL_RANGE: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(3600));

/// `grace-time` and `lease-time` of an nfs-server service.
const NFS_TIME_RANGE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(3600));

/// One service of the chain, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceConfig {
    /// Activate a volume group exclusively on this node.
    Lvm { volume_group: String },
    /// Mount a file system; stopping kills its users first.
    Mount { device: String, directory: String, fstype: String, options: Option<String> },
    /// The kernel NFS server; its state directory (`/var/lib/nfs`) on the replicated disk, and
    /// the NFSv4 grace and lease times (the kernel's default 90 s grace dominates a failover).
    NfsServer { state_dir: Option<String>, grace_time: Option<Duration>, lease_time: Option<Duration> },
    /// Export a directory to clients with a stable fsid.
    NfsExport { directory: String, clients: String, options: String, fsid: u32 },
    /// The service address, announced with gratuitous ARP.
    Ip { address: String, interface: String },
    /// A systemd unit.
    Systemd { unit: String },
    /// An OCF resource agent ("heartbeat:IPaddr2") with its parameters.
    Ocf { agent: String, params: BTreeMap<String, String> },
    /// Any commands (run through /bin/sh -c).
    Exec { name: String, start: String, stop: String, monitor: Option<String> },
}

impl ServiceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            ServiceConfig::Lvm { .. } => "lvm",
            ServiceConfig::Mount { .. } => "mount",
            ServiceConfig::NfsServer { .. } => "nfs-server",
            ServiceConfig::NfsExport { .. } => "nfs-export",
            ServiceConfig::Ip { .. } => "ip",
            ServiceConfig::Systemd { .. } => "systemd",
            ServiceConfig::Ocf { .. } => "ocf",
            ServiceConfig::Exec { .. } => "exec",
        }
    }

    /// A short name for status and logs: the kind and what it acts on.
    pub fn label(&self) -> String {
        let what = match self {
            ServiceConfig::Lvm { volume_group } => volume_group.as_str(),
            ServiceConfig::Mount { directory, .. } => directory.as_str(),
            ServiceConfig::NfsServer { .. } => "nfsd",
            ServiceConfig::NfsExport { directory, .. } => directory.as_str(),
            ServiceConfig::Ip { address, .. } => address.as_str(),
            ServiceConfig::Systemd { unit } => unit.as_str(),
            ServiceConfig::Ocf { agent, .. } => agent.as_str(),
            ServiceConfig::Exec { name, .. } => name.as_str(),
        };
        format!("{}:{what}", self.kind())
    }
}

const KINDS: &[&str] = &["lvm", "mount", "nfs-server", "nfs-export", "ip", "systemd", "ocf", "exec"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawHa {
    witness: Option<Spanned<String>>,
    witness_secret: Option<Spanned<String>>,
    fence_peer: Option<Spanned<String>>,
    no_quorum_policy: Option<Spanned<String>>,
    on_quorum_loss: Option<Spanned<String>>,
    preferred_nodes: Option<Spanned<Vec<String>>>,
    failback: Option<Spanned<String>>,
    monitor_interval: Option<Spanned<String>>,
    migration_threshold: Option<Spanned<i64>>,
    on_demote_failure: Option<Spanned<String>>,
}

/// Every key any kind takes; which ones a kind accepts is checked in [`build_service`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawService {
    kind: Option<Spanned<String>>,
    volume_group: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    directory: Option<Spanned<String>>,
    fstype: Option<Spanned<String>>,
    options: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    grace_time: Option<Spanned<String>>,
    lease_time: Option<Spanned<String>>,
    clients: Option<Spanned<String>>,
    fsid: Option<Spanned<i64>>,
    address: Option<Spanned<String>>,
    interface: Option<Spanned<String>>,
    unit: Option<Spanned<String>>,
    agent: Option<Spanned<String>>,
    params: Option<Spanned<BTreeMap<String, String>>>,
    name: Option<Spanned<String>>,
    start: Option<Spanned<String>>,
    stop: Option<Spanned<String>>,
    monitor: Option<Spanned<String>>,
}

fn text(src: &Source, value: Spanned<String>, key: &str) -> Result<String, ConfigError> {
    super::raw::text(src, value, key, "give a value or remove the key")
}

pub(super) fn build_ha(
    src: &Source,
    raw: Option<RawHa>,
    services: Option<Spanned<Vec<Spanned<RawService>>>>,
    nodes: &[NodeConfig; 2],
) -> Result<Option<HaConfig>, ConfigError> {
    let Some(raw) = raw else {
        if let Some(list) = services {
            return Err(src.invalid(&list.span(), "service", "a service chain needs an [ha] table"));
        }
        return Ok(None);
    };
    let witness = match (raw.witness, raw.witness_secret) {
        (None, None) => None,
        (Some(address), Some(secret)) => {
            let address_span = address.span();
            let address = text(src, address, "ha.witness")?;
            if !address.contains(':') {
                return Err(src.invalid(
                    &address_span,
                    "ha.witness",
                    format!("{address:?} is not HOST:PORT"),
                ));
            }
            Some(WitnessConfig { address, secret: text(src, secret, "ha.witness-secret")? })
        }
        (Some(address), None) => {
            return Err(src.invalid(
                &address.span(),
                "ha.witness-secret",
                "missing; the witness needs its secret",
            ))
        }
        (None, Some(secret)) => {
            return Err(src.invalid(&secret.span(), "ha.witness", "missing; witness-secret is for a witness"))
        }
    };
    let fence_peer = raw.fence_peer.map(|v| text(src, v, "ha.fence-peer")).transpose()?;
    let preferred_nodes = match raw.preferred_nodes {
        None => Vec::new(),
        Some(list) => {
            let span = list.span();
            let list = list.into_inner();
            for name in &list {
                if !nodes.iter().any(|n| &n.name == name) {
                    let message = format!(
                        "{name:?} is not a node of this resource (nodes: {}, {})",
                        nodes[0].name, nodes[1].name
                    );
                    return Err(src.invalid(&span, "ha.preferred-nodes", message));
                }
            }
            list
        }
    };
    let migration_threshold = match raw.migration_threshold {
        None => DEFAULT_MIGRATION_THRESHOLD,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n @ 1..=100) => n,
            _ => return Err(src.invalid(&v.span(), "ha.migration-threshold", "must be 1 to 100")),
        },
    };
    let (monitor_interval, _) = duration(
        src,
        raw.monitor_interval,
        "ha.monitor-interval",
        DEFAULT_MONITOR_INTERVAL,
        MONITOR_INTERVAL_RANGE,
    )?;
    let services = match services {
        None => Vec::new(),
        Some(list) => list
            .into_inner()
            .into_iter()
            .enumerate()
            .map(|(i, s)| build_service(src, i, s))
            .collect::<Result<_, _>>()?,
    };
    Ok(Some(HaConfig {
        witness,
        fence_peer,
        no_quorum_policy: choice(
            src,
            raw.no_quorum_policy,
            "ha.no-quorum-policy",
            NoQuorumPolicy::ALL,
            NoQuorumPolicy::Stop,
        )?,
        on_quorum_loss: choice(
            src,
            raw.on_quorum_loss,
            "ha.on-quorum-loss",
            OnQuorumLoss::ALL,
            OnQuorumLoss::Freeze,
        )?,
        preferred_nodes,
        failback: choice(src, raw.failback, "ha.failback", Failback::ALL, Failback::Never)?,
        monitor_interval,
        migration_threshold,
        on_demote_failure: choice(
            src,
            raw.on_demote_failure,
            "ha.on-demote-failure",
            OnDemoteFailure::ALL,
            OnDemoteFailure::Stay,
        )?,
        services,
    }))
}

fn build_service(src: &Source, index: usize, raw: Spanned<RawService>) -> Result<ServiceConfig, ConfigError> {
    let span = raw.span();
    let mut raw = raw.into_inner();
    let key = |field: &str| format!("service[{index}].{field}");
    let Some(kind) = raw.kind.take() else {
        return Err(src.missing(&span, key("kind"), &format!("one of: {}", KINDS.join(", "))));
    };
    let kind_span = kind.span();
    let kind = kind.into_inner();
    // The keys this kind takes; any other key given is an error naming it.
    let mut strings: Vec<(&str, Option<Spanned<String>>)> = vec![
        ("volume-group", raw.volume_group.take()),
        ("device", raw.device.take()),
        ("directory", raw.directory.take()),
        ("fstype", raw.fstype.take()),
        ("options", raw.options.take()),
        ("state-dir", raw.state_dir.take()),
        ("grace-time", raw.grace_time.take()),
        ("lease-time", raw.lease_time.take()),
        ("clients", raw.clients.take()),
        ("address", raw.address.take()),
        ("interface", raw.interface.take()),
        ("unit", raw.unit.take()),
        ("agent", raw.agent.take()),
        ("name", raw.name.take()),
        ("start", raw.start.take()),
        ("stop", raw.stop.take()),
        ("monitor", raw.monitor.take()),
    ];
    let accepted: &[&str] = match kind.as_str() {
        "lvm" => &["volume-group"],
        "mount" => &["device", "directory", "fstype", "options"],
        "nfs-server" => &["state-dir", "grace-time", "lease-time"],
        "nfs-export" => &["directory", "clients", "options", "fsid"],
        "ip" => &["address", "interface"],
        "systemd" => &["unit"],
        "ocf" => &["agent", "params"],
        "exec" => &["name", "start", "stop", "monitor"],
        other => {
            let message = format!("invalid kind {other:?}, expected one of: {}", KINDS.join(", "));
            return Err(src.invalid(&kind_span, key("kind"), message));
        }
    };
    let stray = |field: &str, at: &Range<usize>| {
        src.invalid(
            at,
            key(field),
            format!("not a key of a {kind} service (it takes: {})", accepted.join(", ")),
        )
    };
    for (field, value) in &strings {
        if let Some(v) = value {
            if !accepted.contains(field) {
                return Err(stray(field, &v.span()));
            }
        }
    }
    if let Some(fsid) = &raw.fsid {
        if !accepted.contains(&"fsid") {
            return Err(stray("fsid", &fsid.span()));
        }
    }
    if let Some(params) = &raw.params {
        if !accepted.contains(&"params") {
            return Err(stray("params", &params.span()));
        }
    }
    let mut take = |field: &str| strings.iter_mut().find(|(f, _)| *f == field).and_then(|(_, v)| v.take());
    // The kernel takes 10 s to an hour for both (nfsd's nfsv4gracetime and nfsv4leasetime).
    let mut nfs_time = |field: &str| {
        take(field)
            .map(|v| duration(src, Some(v), &key(field), Duration::ZERO, NFS_TIME_RANGE).map(|(d, _)| d))
            .transpose()
    };
    let (grace_time, lease_time) = (nfs_time("grace-time")?, nfs_time("lease-time")?);
    let mut optional = |field: &str| take(field).map(|v| text(src, v, &key(field))).transpose();
    let mut fields = BTreeMap::new();
    for field in accepted {
        if let Some(v) = optional(field)? {
            fields.insert(*field, v);
        }
    }
    let mut required = |field: &str| {
        fields
            .remove(field)
            .ok_or_else(|| src.missing(&span, key(field), &format!("a {kind} service needs it")))
    };
    Ok(match kind.as_str() {
        "lvm" => ServiceConfig::Lvm { volume_group: required("volume-group")? },
        "mount" => ServiceConfig::Mount {
            device: required("device")?,
            directory: required("directory")?,
            fstype: required("fstype")?,
            options: fields.remove("options"),
        },
        "nfs-server" => {
            ServiceConfig::NfsServer { state_dir: fields.remove("state-dir"), grace_time, lease_time }
        }
        "nfs-export" => {
            let fsid = match raw.fsid {
                None => {
                    return Err(src.missing(&span, key("fsid"), "both nodes must export with the same fsid"))
                }
                Some(v) => u32::try_from(*v.get_ref())
                    .map_err(|_| src.invalid(&v.span(), key("fsid"), "must be 0 to 4294967295"))?,
            };
            ServiceConfig::NfsExport {
                directory: required("directory")?,
                clients: required("clients")?,
                options: fields.remove("options").unwrap_or_else(|| "rw,sync,no_subtree_check".into()),
                fsid,
            }
        }
        "ip" => ServiceConfig::Ip { address: required("address")?, interface: required("interface")? },
        "systemd" => ServiceConfig::Systemd { unit: required("unit")? },
        "ocf" => ServiceConfig::Ocf {
            agent: required("agent")?,
            params: raw.params.map(Spanned::into_inner).unwrap_or_default(),
        },
        _ => ServiceConfig::Exec {
            name: required("name")?,
            start: required("start")?,
            stop: required("stop")?,
            monitor: fields.remove("monitor"),
        },
    })
}

/// The `[ha]` table and the chain, as `to_toml` writes them.
pub(super) fn write_ha(out: &mut String, ha: &HaConfig) -> std::fmt::Result {
    writeln!(out, "\n[ha]")?;
    if let Some(w) = &ha.witness {
        writeln!(out, "witness = {}", quote(&w.address))?;
        writeln!(out, "witness-secret = {}", quote(&w.secret))?;
    }
    if let Some(f) = &ha.fence_peer {
        writeln!(out, "fence-peer = {}", quote(f))?;
    }
    writeln!(out, "no-quorum-policy = {}", quote(ha.no_quorum_policy.as_str()))?;
    writeln!(out, "on-quorum-loss = {}", quote(ha.on_quorum_loss.as_str()))?;
    let preferred: Vec<String> = ha.preferred_nodes.iter().map(|n| quote(n)).collect();
    writeln!(out, "preferred-nodes = [{}]", preferred.join(", "))?;
    writeln!(out, "failback = {}", quote(ha.failback.as_str()))?;
    writeln!(out, "monitor-interval = {}", quote(&format_duration(ha.monitor_interval)))?;
    writeln!(out, "migration-threshold = {}", ha.migration_threshold)?;
    writeln!(out, "on-demote-failure = {}", quote(ha.on_demote_failure.as_str()))?;
    for s in &ha.services {
        writeln!(out, "\n[[service]]")?;
        writeln!(out, "kind = {}", quote(s.kind()))?;
        let mut pair = |k: &str, v: &str| writeln!(out, "{k} = {}", quote(v));
        match s {
            ServiceConfig::Lvm { volume_group } => pair("volume-group", volume_group)?,
            ServiceConfig::Mount { device, directory, fstype, options } => {
                pair("device", device)?;
                pair("directory", directory)?;
                pair("fstype", fstype)?;
                if let Some(o) = options {
                    pair("options", o)?;
                }
            }
            ServiceConfig::NfsServer { state_dir, grace_time, lease_time } => {
                if let Some(d) = state_dir {
                    pair("state-dir", d)?;
                }
                for (k, t) in [("grace-time", grace_time), ("lease-time", lease_time)] {
                    if let Some(t) = t {
                        pair(k, &format_duration(*t))?;
                    }
                }
            }
            ServiceConfig::NfsExport { directory, clients, options, fsid } => {
                pair("directory", directory)?;
                pair("clients", clients)?;
                pair("options", options)?;
                writeln!(out, "fsid = {fsid}")?;
            }
            ServiceConfig::Ip { address, interface } => {
                pair("address", address)?;
                pair("interface", interface)?;
            }
            ServiceConfig::Systemd { unit } => pair("unit", unit)?,
            ServiceConfig::Ocf { agent, params } => {
                pair("agent", agent)?;
                let params: Vec<String> =
                    params.iter().map(|(k, v)| format!("{} = {}", quote(k), quote(v))).collect();
                writeln!(out, "params = {{ {} }}", params.join(", "))?;
            }
            ServiceConfig::Exec { name, start, stop, monitor } => {
                pair("name", name)?;
                pair("start", start)?;
                pair("stop", stop)?;
                if let Some(m) = monitor {
                    pair("monitor", m)?;
                }
            }
        }
    }
    Ok(())
}
