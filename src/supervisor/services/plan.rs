//! What starting, stopping and monitoring each kind of service runs: shell scripts, pure (the
//! steps the ClusterLabs agents take, reduced to their core; see README "HA supervisor").
//! Daemons are looked for in this network namespace only (pgrep --ns), so that nodes sharing
//! one kernel, as in the VM test bed, keep to their own.

use std::collections::BTreeMap;

use crate::config::ServiceConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Stop,
    Monitor,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Monitor => "monitor",
        }
    }
}

/// One operation: a script for `/bin/sh -c` and the environment it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub script: String,
    pub env: BTreeMap<String, String>,
}

/// A word for the shell, single-quoted.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

const OCF_ROOT: &str = "/usr/lib/ocf";

/// The script for `op` on `service`; `None` when the operation has nothing to do (a monitor
/// of an `exec` service without one).
pub fn script(service: &ServiceConfig, op: Op) -> Option<Script> {
    let plain = |s: String| Some(Script { script: s, env: BTreeMap::new() });
    match service {
        ServiceConfig::Lvm { volume_group } => {
            let vg = quote(volume_group);
            plain(match op {
                Op::Start => format!("vgchange -ay {vg}"),
                Op::Stop => format!("vgchange -an {vg}"),
                // Every logical volume of the group active.
                Op::Monitor => format!("! lvs --noheadings -o lv_active {vg} | grep -qv active"),
            })
        }
        ServiceConfig::Mount { device, directory, fstype, options } => {
            let (dev, dir) = (quote(device), quote(directory));
            let opts = options.as_deref().map(|o| format!(" -o {}", quote(o))).unwrap_or_default();
            plain(match op {
                Op::Start => format!("mkdir -p {dir} && mount -t {}{opts} {dev} {dir}", quote(fstype)),
                // As the Filesystem agent does: users get TERM, then KILL, then the unmount.
                Op::Stop => format!(
                    "mountpoint -q {dir} || exit 0\n\
                     for sig in TERM KILL; do umount {dir} 2>/dev/null && exit 0; \
                     fuser -k -$sig -m {dir} >/dev/null 2>&1; sleep 1; done\n\
                     umount {dir}"
                ),
                Op::Monitor => format!("mountpoint -q {dir}"),
            })
        }
        ServiceConfig::NfsServer { state_dir, grace_time, lease_time } => {
            let bind = state_dir.as_deref().map(quote);
            plain(match op {
                Op::Start => {
                    let mut s = String::new();
                    if let Some(d) = &bind {
                        // The state (client list, locks) moves with the data, as nfsserver's
                        // nfs_shared_infodir does.
                        s += &format!(
                            "mkdir -p {d}/v4recovery {d}/sm {d}/sm.bak && touch {d}/etab {d}/rmtab && \
                             {{ [ \"$(stat -c %d:%i /var/lib/nfs)\" = \"$(stat -c %d:%i {d})\" ] || \
                             mount --bind {d} /var/lib/nfs; }} && "
                        );
                    }
                    s += "{ mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd; } && \
                          { pgrep --ns $$ --nslist net -x rpcbind >/dev/null || rpcbind -w; } && \
                          { pgrep --ns $$ --nslist net -x rpc.mountd >/dev/null || rpc.mountd; } && \
                          rpc.nfsd";
                    // Set before the threads start: nfsd takes them only while it is down.
                    if let Some(t) = grace_time {
                        s += &format!(" -G {}", t.as_secs());
                    }
                    if let Some(t) = lease_time {
                        s += &format!(" -L {}", t.as_secs());
                    }
                    s += " 8 && { sm-notify -f >/dev/null 2>&1 || true; }";
                    s
                }
                Op::Stop => {
                    let mut s = String::from(
                        "exportfs -au; exportfs -f; rpc.nfsd 0; pkill --ns $$ --nslist net -x rpc.mountd; \
                         for _ in 1 2 3 4 5 6 7 8 9 10; do pgrep --ns $$ --nslist net -x rpc.mountd >/dev/null || break; sleep 0.2; done; true",
                    );
                    if let Some(d) = &bind {
                        s += &format!(
                            "; [ \"$(stat -c %d:%i /var/lib/nfs)\" != \"$(stat -c %d:%i {d} 2>/dev/null)\" ] || umount /var/lib/nfs"
                        );
                    }
                    s
                }
                Op::Monitor => "test \"$(cat /proc/fs/nfsd/threads 2>/dev/null || echo 0)\" -gt 0".into(),
            })
        }
        ServiceConfig::NfsExport { directory, clients, options, fsid } => {
            let target = quote(&format!("{clients}:{directory}"));
            plain(match op {
                Op::Start => format!("exportfs -o {} {target}", quote(&format!("{options},fsid={fsid}"))),
                // Stops are idempotent: a chain is stopped whole, whatever had started.
                Op::Stop => {
                    format!("exportfs | grep -qF -- {} || exit 0; exportfs -u {target}", quote(directory))
                }
                Op::Monitor => format!("exportfs | grep -qF -- {}", quote(directory)),
            })
        }
        ServiceConfig::Ip { address, interface } => {
            let (addr, dev) = (quote(address), quote(interface));
            let ip = quote(address.split('/').next().unwrap_or(address));
            plain(match op {
                // Announced so that clients' ARP caches point here (IPaddr2 does the same).
                Op::Start => format!(
                    "ip addr add {addr} dev {dev} && \
                     {{ ! command -v arping >/dev/null || arping -q -U -c 2 -I {dev} {ip} || true; }}"
                ),
                Op::Stop => format!(
                    "! ip -o addr show dev {dev} | grep -qF \" {address} \" || ip addr del {addr} dev {dev}"
                ),
                Op::Monitor => format!("ip -o addr show dev {dev} | grep -qF \" {address} \""),
            })
        }
        ServiceConfig::Systemd { unit } => {
            let u = quote(unit);
            plain(match op {
                Op::Start => format!("systemctl start {u}"),
                Op::Stop => format!("systemctl stop {u}"),
                Op::Monitor => format!("systemctl is-active --quiet {u}"),
            })
        }
        ServiceConfig::Ocf { agent, params } => {
            let (provider, kind) = agent.split_once(':').unwrap_or(("heartbeat", agent));
            let mut env: BTreeMap<String, String> =
                params.iter().map(|(k, v)| (format!("OCF_RESKEY_{k}"), v.clone())).collect();
            env.insert("OCF_ROOT".into(), OCF_ROOT.into());
            env.insert("OCF_RESOURCE_INSTANCE".into(), format!("rdbd-{kind}"));
            let path = quote(&format!("{OCF_ROOT}/resource.d/{provider}/{kind}"));
            Some(Script { script: format!("{path} {}", op.as_str()), env })
        }
        ServiceConfig::Exec { start, stop, monitor, .. } => match op {
            Op::Start => plain(start.clone()),
            Op::Stop => plain(stop.clone()),
            Op::Monitor => monitor.clone().and_then(plain),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn each_kind_has_its_steps() {
        let mount = ServiceConfig::Mount {
            device: "/dev/vg0/lv0".into(),
            directory: "/srv/my export".into(),
            fstype: "xfs".into(),
            options: Some("noatime".into()),
        };
        let start = script(&mount, Op::Start).unwrap().script;
        assert_eq!(
            start,
            "mkdir -p '/srv/my export' && mount -t 'xfs' -o 'noatime' '/dev/vg0/lv0' '/srv/my export'"
        );
        assert!(script(&mount, Op::Stop).unwrap().script.contains("fuser -k -$sig -m '/srv/my export'"));
        let export = ServiceConfig::NfsExport {
            directory: "/srv".into(),
            clients: "10.0.0.0/24".into(),
            options: "rw,sync".into(),
            fsid: 7,
        };
        assert_eq!(
            script(&export, Op::Start).unwrap().script,
            "exportfs -o 'rw,sync,fsid=7' '10.0.0.0/24:/srv'"
        );
        let ocf = ServiceConfig::Ocf {
            agent: "heartbeat:IPaddr2".into(),
            params: BTreeMap::from([("ip".to_string(), "10.0.0.9".to_string())]),
        };
        let s = script(&ocf, Op::Monitor).unwrap();
        assert_eq!(s.script, "'/usr/lib/ocf/resource.d/heartbeat/IPaddr2' monitor");
        assert_eq!(s.env["OCF_RESKEY_ip"], "10.0.0.9");
        let exec = ServiceConfig::Exec {
            name: "a".into(),
            start: "true".into(),
            stop: "true".into(),
            monitor: None,
        };
        assert!(script(&exec, Op::Monitor).is_none());
        let ip = ServiceConfig::Ip { address: "10.0.0.100/24".into(), interface: "eth0".into() };
        assert!(script(&ip, Op::Start).unwrap().script.contains("arping -q -U -c 2 -I 'eth0' '10.0.0.100'"));
        let nfsd = ServiceConfig::NfsServer {
            state_dir: None,
            grace_time: Some(std::time::Duration::from_secs(15)),
            lease_time: Some(std::time::Duration::from_secs(10)),
        };
        assert!(script(&nfsd, Op::Start).unwrap().script.contains("rpc.nfsd -G 15 -L 10 8 &&"));
    }
}
