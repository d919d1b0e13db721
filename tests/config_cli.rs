//! `rdbd dump` through the real binary: the shipped NFS example, node selection by flag,
//! environment and hostname, and one-line errors with exit status 1 for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nfs-pair")
}

/// The binary with the environment variables it reads cleared, so the tests see only what
/// they set.
fn rdbd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rdbd"));
    cmd.env_remove("RDBD_NODE").env_remove("RDBD_CONFIG_DIR").env("RDBD_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("run rdbd");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Asserts a failure: exit status 1, no panic, and stderr exactly `rdbd: error: <message>\n`.
fn assert_fails_with(cmd: &mut Command, message: &str) {
    let (out, stdout, stderr) = run(cmd);
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr, format!("rdbd: error: {message}\n"));
    assert_eq!(stdout, "");
}

/// The dump minus its comment lines must be a valid resource file equal to the original.
fn assert_round_trips(stdout: &str) {
    let original = rdbd::config::load(&example_dir(), "res0").unwrap();
    let dumped = rdbd::config::parse(&example_dir().join("res0.toml"), stdout).unwrap();
    assert_eq!(dumped, original);
}

#[test]
fn dump_example_by_flag() {
    let (out, stdout, stderr) =
        run(rdbd().arg("dump").arg("res0").arg("--config-dir").arg(example_dir()).args(["--node", "alpha"]));
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[1], "# this machine is node alpha (by --node); its peer is beta");
    for line in [
        "resource = \"res0\"",
        "protocol = \"C\"",
        "ping-timeout = \"500ms\"",
        "al-extents = 1237",
        "name = \"beta\"",
    ] {
        assert!(lines.contains(&line), "{line:?} missing from\n{stdout}");
    }
    assert_round_trips(&stdout);
}

#[test]
fn dump_example_by_environment() {
    let (out, stdout, stderr) =
        run(rdbd().args(["dump", "res0"]).env("RDBD_CONFIG_DIR", example_dir()).env("RDBD_NODE", "beta"));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().nth(1), Some("# this machine is node beta (by RDBD_NODE); its peer is alpha"));
    assert_round_trips(&stdout);

    // --node wins over RDBD_NODE.
    let (out, stdout, _) = run(rdbd()
        .args(["dump", "res0", "--node", "alpha"])
        .env("RDBD_CONFIG_DIR", example_dir())
        .env("RDBD_NODE", "beta"));
    assert!(out.status.success());
    assert!(stdout.contains("# this machine is node alpha (by --node)"), "{stdout}");
}

#[test]
fn dump_by_hostname() {
    let host = rdbd::config::hostname();
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(example_dir().join("res0.toml")).unwrap();

    // A node named after this machine is found without --node.
    let short = host.split('.').next().unwrap();
    if short != "beta" && !short.is_empty() {
        std::fs::write(
            dir.path().join("mine.toml"),
            text.replace("resource = \"res0\"", "").replace("\"alpha\"", &format!("{short:?}")),
        )
        .unwrap();
        let (out, stdout, stderr) = run(rdbd().args(["dump", "mine"]).arg("--config-dir").arg(dir.path()));
        assert!(out.status.success(), "{stderr}");
        let want = format!("# this machine is node {short} (by hostname {host:?}); its peer is beta");
        assert_eq!(stdout.lines().nth(1), Some(want.as_str()));
    }

    // Otherwise the dump still succeeds and says it cannot tell.
    if host != "alpha" && host != "beta" {
        let (out, stdout, stderr) = run(rdbd().args(["dump", "res0"]).arg("--config-dir").arg(example_dir()));
        assert!(out.status.success(), "{stderr}");
        let line = stdout.lines().nth(1).unwrap();
        assert!(
            line.starts_with(&format!("# cannot tell which node this machine is: hostname {host:?}")),
            "{line}"
        );
        assert!(line.contains("--node NAME or RDBD_NODE"), "{line}");
    }
}

#[test]
fn file_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(example_dir().join("res0.toml")).unwrap();
    let text = text.replace("ping-timeout = \"500ms\"", "ping-timeout = \"5 parsecs\"");
    let line = text.lines().position(|l| l.starts_with("ping-timeout")).unwrap() + 1;
    let path = dir.path().join("res0.toml");
    std::fs::write(&path, text).unwrap();
    let message = format!(
        "{}:{line}: net.ping-timeout: invalid duration \"5 parsecs\": write a whole number and a unit \
         (ms, s, m, h), like \"500ms\" or \"10s\"",
        path.display()
    );
    assert_fails_with(
        rdbd().args(["dump", "res0", "--node", "alpha"]).arg("--config-dir").arg(dir.path()),
        &message,
    );

    // An unknown key, found on its own line.
    std::fs::write(&path, "protocol = \"C\"\n\n[net]\nping-int = \"10s\"\n").unwrap();
    let message = format!(
        "{}:4: net.ping-int: unknown key, expected one of `shared-secret`, `ping-interval`, `ping-timeout`, \
         `timeout`, `connect-interval`, `data-integrity`, `after-sb-0pri`, `after-sb-1pri`, `after-sb-2pri`, \
         `rr-conflict`, `csums-alg`, `csums-after-crash-only`, `verify-alg`",
        path.display()
    );
    assert_fails_with(rdbd().args(["dump", "res0"]).arg("--config-dir").arg(dir.path()), &message);

    // Broken TOML.
    std::fs::write(&path, "[[node]]\nname = \"alpha\nprotocol = \"C\"\n").unwrap();
    let (out, _, stderr) = run(rdbd().args(["dump", "res0"]).arg("--config-dir").arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.starts_with(&format!("rdbd: error: {}:2: node[0].name: invalid TOML", path.display())),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn missing_resource() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("res9.toml");
    assert_fails_with(
        rdbd().args(["dump", "res9"]).arg("--config-dir").arg(dir.path()),
        &format!("cannot read {}: No such file or directory", path.display()),
    );
    // The environment variable picks the directory when there is no flag.
    assert_fails_with(
        rdbd().args(["dump", "res9"]).env("RDBD_CONFIG_DIR", dir.path()),
        &format!("cannot read {}: No such file or directory", path.display()),
    );
    assert_fails_with(
        rdbd().args(["dump", "../res9"]).arg("--config-dir").arg(dir.path()),
        "invalid resource name \"../res9\": it must not start with '.' or '-'",
    );
}

#[test]
fn unknown_node() {
    let path = example_dir().join("res0.toml");
    let message =
        format!("{}: resource res0 has no node named \"gamma\" (nodes: alpha, beta)", path.display());
    assert_fails_with(
        rdbd().args(["dump", "res0", "--node", "gamma"]).arg("--config-dir").arg(example_dir()),
        &message,
    );
    assert_fails_with(
        rdbd().args(["dump", "res0"]).arg("--config-dir").arg(example_dir()).env("RDBD_NODE", "gamma"),
        &message,
    );
}

#[test]
fn the_ha_example_is_valid_and_round_trips() {
    let dir = example_dir().join("ha");
    let (out, stdout, stderr) =
        run(rdbd().arg("dump").arg("res0").arg("--config-dir").arg(&dir).args(["--node", "beta"]));
    assert!(out.status.success(), "{stderr}");
    for line in ["heartbeat-address = \"10.0.0.2:7790\"", "grace-time = \"10s\"", "failback = \"always\""] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} missing from\n{stdout}");
    }
    let original = rdbd::config::load(&dir, "res0").unwrap();
    assert_eq!(rdbd::config::parse(&dir.join("res0.toml"), &stdout).unwrap(), original);
    assert!(original.ha.is_some_and(|ha| ha.services.len() == 5));
}
