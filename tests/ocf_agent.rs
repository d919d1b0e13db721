//! The Pacemaker resource agent (tools/ocf/rdbd) checked with ocf-tester from Debian's
//! resource-agents: meta-data against the DTD, validate-all, start, monitor (7 stopped, 0
//! Secondary, 8 Primary), promote, demote, stop, and each again on the state it leads to, on a
//! real rdbd node. And validate-all refuses a resource whose own HA supervisor would fight
//! Pacemaker over the roles.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::{Alpha, Beta, Cluster, Options};
use common::*;

const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/ocf/rdbd");

/// ocf-tester runs the agent's meta-data as user nobody too, who may not be able to reach it
/// inside the checkout: a copy in a directory anyone can enter, as /usr/lib/ocf would be.
fn installed_agent() -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = dir.path().join("rdbd");
    std::fs::copy(AGENT, &agent).unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, agent)
}

fn agent_env(cluster: &Cluster, cmd: &mut Command) {
    cmd.env("RDBD_BIN", rdbd_bin())
        .env("OCF_ROOT", "/usr/lib/ocf")
        .env("OCF_RESKEY_resource", "r0")
        .env("OCF_RESKEY_config_dir", &cluster.info(Alpha).config_dir)
        .env("OCF_RESKEY_node", "alpha")
        .env("OCF_RESKEY_run_dir", &cluster.run_dir);
}

/// Both nodes up on blank disks, UpToDate without an initial sync (so the agent may promote
/// alpha alone).
fn blank_pair_in_sync() -> Cluster {
    let mut cluster = Cluster::new(Options::default());
    cluster.start_both();
    cluster.wait_for(Alpha, "connected", Duration::from_secs(30), |s| {
        common::cluster::str_at(s, &["connection"]) == "Connected"
    });
    cluster.verb_ok(Alpha, &["new-current-uuid", "--clear-bitmap"]);
    cluster.wait_in_sync(Duration::from_secs(30));
    cluster
}

#[test]
fn ocf_tester_passes_the_agent_on_a_real_node() {
    if !have_tool("ocf-tester") || !have_tool("xmllint") {
        return;
    }
    let mut cluster = blank_pair_in_sync();
    cluster.down(Beta);
    cluster.down(Alpha);

    let info = cluster.info(Alpha);
    let (_agent_dir, agent) = installed_agent();
    let out = output_within(
        Command::new("ocf-tester")
            .args(["-n", "rdbd-test", "-o", "resource=r0", "-o", "node=alpha"])
            .arg("-o")
            .arg(format!("config_dir={}", info.config_dir.display()))
            .arg("-o")
            .arg(format!("run_dir={}", cluster.run_dir.display()))
            .arg(&agent)
            .env("RDBD_BIN", rdbd_bin()),
        Duration::from_secs(300),
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("passed all tests"), "ocf-tester:\n{text}");
    assert!(!cluster.is_running(Alpha));

    // monitor on the stopped node says "not running" (7), also with the binary found on PATH
    // under its plain name, as on a real host.
    let mut cmd = Command::new(AGENT);
    cmd.arg("monitor");
    agent_env(&cluster, &mut cmd);
    assert_eq!(output_within(&mut cmd, Duration::from_secs(30)).status.code(), Some(7));
    let bin_dir = std::path::Path::new(rdbd_bin()).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new(AGENT);
    cmd.arg("monitor");
    agent_env(&cluster, &mut cmd);
    cmd.env_remove("RDBD_BIN").env("PATH", path);
    assert_eq!(output_within(&mut cmd, Duration::from_secs(30)).status.code(), Some(7));
}

#[test]
fn validate_all_refuses_a_resource_with_its_own_supervisor() {
    if !have_tool("ocf-tester") {
        return;
    }
    let cluster = Cluster::new(Options { tables: "[ha]\n".into(), ..Options::default() });
    let mut cmd = Command::new(AGENT);
    cmd.arg("validate-all");
    agent_env(&cluster, &mut cmd);
    let out = output_within(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(6), "OCF_ERR_CONFIGURED: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[ha] table"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The promotion score follows the disk: an UpToDate Secondary gets 10000, a Diskless one (its
/// disk detached) none, so Pacemaker never promotes it.
#[test]
fn a_diskless_node_gets_no_promotion_score() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = blank_pair_in_sync();
    // crm_master, as the agent calls it, records its arguments.
    let bin = tempfile::tempdir().unwrap();
    let calls = bin.path().join("calls");
    let fake = bin.path().join("crm_master");
    std::fs::write(&fake, format!("#!/bin/sh\necho \"$*\" >> {}\n", calls.display())).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let monitor = |cluster: &Cluster| {
        let mut cmd = Command::new(AGENT);
        cmd.arg("monitor");
        agent_env(cluster, &mut cmd);
        let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
        cmd.env("PATH", path);
        let out = output_within(&mut cmd, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(0), "Secondary: {}", String::from_utf8_lossy(&out.stderr));
        let recorded = std::fs::read_to_string(&calls).unwrap_or_default();
        let _ = std::fs::remove_file(&calls);
        recorded
    };
    assert_eq!(monitor(&cluster).trim(), "-l reboot -v 10000");
    cluster.verb_ok(Alpha, &["detach"]);
    assert_eq!(monitor(&cluster).trim(), "-l reboot -D", "a Diskless node must not be promoted");
}
