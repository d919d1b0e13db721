use std::path::Path;
use std::time::Duration;

use super::*;

const FILE: &str = "/etc/rdbd/res0.toml";

const MINIMAL: &str = r#"
[[node]]
name = "alpha"
address = "192.168.10.1:7789"
disk = "/dev/vg/res0"

[[node]]
name = "beta"
address = "192.168.10.2:7789"
disk = "/dev/vg/res0"
"#;

const FULL: &str = r#"resource = "res0"
protocol = "A"

[net]
shared-secret = "s3cret"
ping-interval = "5s"
ping-timeout = "1s"
timeout = "3s"
connect-interval = "2m"
data-integrity = true
after-sb-0pri = "discard-node-beta"
after-sb-1pri = "consensus"
after-sb-2pri = "call-pri-lost-after-sb"
rr-conflict = "retry-connect"
csums-alg = "crc32c"
csums-after-crash-only = true
verify-alg = "crc32c"

[disk]
al-extents = 6007
bitmap-block = "64KiB"
resync-rate = "100MiB"
c-plan-ahead = "0s"
c-fill-target = 0
c-delay-target = "500ms"
c-max-rate = "1GiB/s"
c-min-rate = 0

[handlers]
split-brain = "/usr/lib/rdbd/notify split-brain"
pri-lost-after-sb = "echo b > /proc/sysrq-trigger"
pri-lost = "logger -t rdbd \"pri-lost on $RDBD_NODE\""
out-of-sync = "/usr/local/bin/page-oncall"

[[node]]
name = "alpha"
address = "[fd00::1]:7789"
disk = "/dev/sdb1"
meta-disk = "/dev/sdc1"
nbd-listen = "127.0.0.1:10809"
nbd-device = "/dev/nbd0"

[[node]]
name = "beta"
address = "beta.example.com:7790"
disk = "/var/lib/rdbd/res0.img"
meta-disk = "internal"
nbd-device = "auto"
"#;

fn parse_ok(text: &str) -> ResourceConfig {
    match parse(Path::new(FILE), text) {
        Ok(cfg) => cfg,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn parse_err(text: &str) -> ConfigError {
    match parse(Path::new(FILE), text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e,
    }
}

/// Asserts the error's line and key, and that the one-line message starts with
/// `file:line: key:` and contains `fragment`.
fn assert_error(text: &str, line: usize, key: &str, fragment: &str) {
    let e = parse_err(text);
    let message = e.to_string();
    assert_eq!(e.line(), Some(line), "{message}");
    assert_eq!(e.key(), Some(key), "{message}");
    let prefix = format!("{FILE}:{line}: {key}: ");
    assert!(message.starts_with(&prefix), "{message:?} should start with {prefix:?}");
    assert!(message.contains(fragment), "{message:?} should contain {fragment:?}");
    assert!(!message.contains('\n'), "{message:?} is not one line");
}

/// MINIMAL with `extra` added to the `[net]` table or at the top (before the nodes), so
/// the line numbers in the tests below are easy to count: `extra` starts at line 2.
fn with(extra: &str) -> String {
    format!("\n{extra}\n{MINIMAL}")
}

#[test]
fn minimal_file_gets_every_default() {
    let cfg = parse_ok(MINIMAL);
    assert_eq!(cfg.name, "res0");
    assert_eq!(cfg.file, Path::new(FILE));
    assert_eq!(cfg.protocol, Protocol::C);
    assert_eq!(
        cfg.net,
        NetConfig {
            shared_secret: None,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_millis(500),
            timeout: Duration::from_secs(6),
            connect_interval: Duration::from_secs(10),
            data_integrity: false,
            after_sb_0pri: AfterSb0Pri::Disconnect,
            after_sb_1pri: AfterSb1::Disconnect,
            after_sb_2pri: AfterSb2::Disconnect,
            rr_conflict: RrConflict::Disconnect,
            csums_alg: None,
            csums_after_crash_only: false,
            verify_alg: DigestAlg::Sha256,
        }
    );
    assert_eq!(
        cfg.disk,
        DiskConfig {
            al_extents: 1237,
            bitmap_block: 4096,
            resync: ResyncConfig {
                resync_rate: 250 << 10,
                c_plan_ahead: Duration::from_secs(2),
                c_fill_target: 16 << 20,
                c_delay_target: Duration::from_secs(1),
                c_max_rate: 0,
                c_min_rate: 16 << 20,
            },
            on_io_error: OnIoError::Detach,
        }
    );
    assert_eq!(cfg.handlers, HandlersConfig::default());
    let [a, b] = &cfg.nodes;
    assert_eq!(
        *a,
        NodeConfig {
            name: "alpha".into(),
            address: "192.168.10.1:7789".into(),
            disk: "/dev/vg/res0".into(),
            meta_disk: MetaLocation::Internal,
            nbd_listen: None,
            nbd_device: None,
            heartbeat_address: None,
        }
    );
    assert_eq!(b.name, "beta");
    assert_eq!(b.meta_disk, MetaLocation::Internal);
}

#[test]
fn empty_tables_get_defaults_too() {
    let cfg = parse_ok(&with("[net]\n[disk]\n[handlers]"));
    assert_eq!(cfg.net, NetConfig::default());
    assert_eq!(cfg.disk, DiskConfig::default());
    assert_eq!(cfg.handlers, HandlersConfig::default());
}

#[test]
fn full_file() {
    let cfg = parse_ok(FULL);
    assert_eq!(cfg.protocol, Protocol::A);
    assert_eq!(
        cfg.net,
        NetConfig {
            shared_secret: Some("s3cret".into()),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
            connect_interval: Duration::from_secs(120),
            data_integrity: true,
            after_sb_0pri: AfterSb0Pri::DiscardNode("beta".into()),
            after_sb_1pri: AfterSb1::Consensus,
            after_sb_2pri: AfterSb2::CallPriLostAfterSb,
            rr_conflict: RrConflict::RetryConnect,
            csums_alg: Some(DigestAlg::Crc32c),
            csums_after_crash_only: true,
            verify_alg: DigestAlg::Crc32c,
        }
    );
    assert_eq!(
        cfg.disk,
        DiskConfig {
            al_extents: 6007,
            bitmap_block: 64 << 10,
            resync: ResyncConfig {
                resync_rate: 100 << 20,
                c_plan_ahead: Duration::ZERO,
                c_fill_target: 0,
                c_delay_target: Duration::from_millis(500),
                c_max_rate: 1 << 30,
                c_min_rate: 0,
            },
            on_io_error: OnIoError::Detach,
        }
    );
    assert_eq!(
        cfg.handlers,
        HandlersConfig {
            split_brain: Some("/usr/lib/rdbd/notify split-brain".into()),
            pri_lost_after_sb: Some("echo b > /proc/sysrq-trigger".into()),
            pri_lost: Some("logger -t rdbd \"pri-lost on $RDBD_NODE\"".into()),
            out_of_sync: Some("/usr/local/bin/page-oncall".into()),
            local_io_error: None,
        }
    );
    let [a, b] = &cfg.nodes;
    assert_eq!(a.address, "[fd00::1]:7789");
    assert_eq!(a.meta_disk, MetaLocation::External("/dev/sdc1".into()));
    assert_eq!(a.nbd_listen.as_deref(), Some("127.0.0.1:10809"));
    assert_eq!(a.nbd_device, Some(NbdDevice::Path("/dev/nbd0".into())));
    assert_eq!(b.address, "beta.example.com:7790");
    assert_eq!(b.disk, Path::new("/var/lib/rdbd/res0.img"));
    assert_eq!(b.meta_disk, MetaLocation::Internal);
    assert_eq!(b.nbd_listen, None);
    assert_eq!(b.nbd_device, Some(NbdDevice::Auto));
    assert_eq!(cfg.node("beta"), Some(b));
    assert_eq!(cfg.node("gamma"), None);
}

#[test]
fn protocols_and_sizes_in_other_spellings() {
    for (p, want) in [("A", Protocol::A), ("B", Protocol::B), ("C", Protocol::C)] {
        assert_eq!(parse_ok(&with(&format!("protocol = \"{p}\""))).protocol, want);
    }
    let cfg = parse_ok(&with("[disk]\nbitmap-block = 1048576\nal-extents = 67"));
    assert_eq!((cfg.disk.al_extents, cfg.disk.bitmap_block), (67, 1 << 20));
    assert_eq!(parse_ok(&with("[disk]\nbitmap-block = \"8k\"")).disk.bitmap_block, 8192);
    assert_eq!(parse_ok(&with("[disk]\nal-extents = 65534")).disk.al_extents, 65534);
    // Inline tables and dotted keys are the same document to TOML.
    let cfg = parse_ok(&with("net.timeout = \"2s\""));
    assert_eq!(cfg.net.timeout, Duration::from_secs(2));
}

#[test]
fn dump_round_trips() {
    for text in [MINIMAL, FULL] {
        let cfg = parse_ok(text);
        let dumped = cfg.to_toml();
        assert_eq!(parse_ok(&dumped), cfg, "{dumped}");
    }
    let dumped = parse_ok(MINIMAL).to_toml();
    for line in [
        "resource = \"res0\"",
        "protocol = \"C\"",
        "ping-interval = \"10s\"",
        "ping-timeout = \"500ms\"",
        "timeout = \"6s\"",
        "connect-interval = \"10s\"",
        "data-integrity = false",
        "al-extents = 1237",
        "bitmap-block = \"4KiB\"",
        "meta-disk = \"internal\"",
        "after-sb-0pri = \"disconnect\"",
        "after-sb-1pri = \"disconnect\"",
        "after-sb-2pri = \"disconnect\"",
        "rr-conflict = \"disconnect\"",
        "csums-after-crash-only = false",
        "verify-alg = \"sha256\"",
        "resync-rate = \"250KiB\"",
        "c-plan-ahead = \"2s\"",
        "c-fill-target = \"16MiB\"",
        "c-delay-target = \"1s\"",
        "c-max-rate = 0",
        "c-min-rate = \"16MiB\"",
        "[handlers]",
    ] {
        assert!(dumped.lines().any(|l| l == line), "{line:?} missing from\n{dumped}");
    }
    assert!(!dumped.contains("shared-secret"));
    assert!(!dumped.contains("nbd-"));
    assert!(!dumped.lines().any(|l| l.starts_with("csums-alg")), "{dumped}");
    let dumped = parse_ok(FULL).to_toml();
    for line in [
        "after-sb-0pri = \"discard-node-beta\"",
        "csums-alg = \"crc32c\"",
        "c-plan-ahead = \"0s\"",
        "c-fill-target = 0",
        "c-max-rate = \"1GiB\"",
        "split-brain = \"/usr/lib/rdbd/notify split-brain\"",
    ] {
        assert!(dumped.lines().any(|l| l == line), "{line:?} missing from\n{dumped}");
    }
    // Every value of every policy, and rates no unit divides, read back unchanged.
    let values = [
        "after-sb-0pri = \"discard-younger-primary\"\nresync-rate = 1025",
        "after-sb-0pri = \"discard-older-primary\"\nc-min-rate = 1000000",
        "after-sb-0pri = \"discard-zero-changes\"\nafter-sb-1pri = \"discard-secondary\"",
        "after-sb-0pri = \"discard-least-changes\"\nafter-sb-1pri = \"call-pri-lost-after-sb\"",
        "after-sb-0pri = \"discard-node-alpha\"\nrr-conflict = \"call-pri-lost\"\ncsums-alg = \"sha256\"",
    ];
    for extra in values {
        let (net, disk): (Vec<&str>, Vec<&str>) =
            extra.lines().partition(|l| !l.contains("rate") && !l.starts_with("c-"));
        let text = with(&format!("[net]\n{}\n[disk]\n{}", net.join("\n"), disk.join("\n")));
        let cfg = parse_ok(&text);
        assert_eq!(parse_ok(&cfg.to_toml()), cfg, "{}", cfg.to_toml());
    }
}

#[test]
fn resource_key_must_match_the_file_name() {
    assert_eq!(parse_ok(&with("resource = \"res0\"")).name, "res0");
    assert_error(
        &with("resource = \"res1\""),
        2,
        "resource",
        "does not match the file name (expected \"res0\")",
    );
    assert_error(&with("resource = \"../x\""), 2, "resource", "invalid resource name");
    let e = parse(Path::new("/etc/rdbd/bad name.toml"), MINIMAL).unwrap_err();
    assert!(matches!(e, ConfigError::ResourceName { .. }), "{e}");
}

#[test]
fn syntax_errors_name_the_line() {
    let e = parse_err("protocol = \"C\"\n[net]\ntimeout = \"6s\n");
    assert_eq!(
        e.to_string(),
        format!("{FILE}:3: net.timeout: invalid TOML: invalid basic string, expected `\"`")
    );
    assert!(matches!(e, ConfigError::Syntax { line: 3, .. }));
    let e = parse_err("\n\n[net]\nping-timeout = 5s\n");
    assert_eq!(e.line(), Some(4));
    assert_eq!(e.key(), Some("net.ping-timeout"));
    // A duplicate key is found from the text since the parser drops it.
    let e = parse_err("[net]\ntimeout = \"1s\"\ntimeout = \"2s\"\n");
    assert_eq!((e.line(), e.key()), (Some(3), Some("net.timeout")), "{e}");
    assert!(e.to_string().contains("duplicate key"), "{e}");
}

#[test]
fn unknown_keys() {
    assert_error(&with("colour = \"blue\""), 2, "colour", "unknown key, expected one of `resource`");
    assert_error(
        &with("[net]\nping-int = \"10s\""),
        3,
        "net.ping-int",
        "unknown key, expected one of `shared-secret`",
    );
    assert_error(&with("[disk]\n\nresync-speed = 1"), 4, "disk.resync-speed", "unknown key");
    assert_error(&with("[handlers]\nbefore-resync = \"true\""), 3, "handlers.before-resync", "unknown key");
    assert_error(&with("[net]\nafter-sb-3pri = \"disconnect\""), 3, "net.after-sb-3pri", "unknown key");
    assert_error(&with("[nett]"), 2, "nett", "unknown key");
    let text = MINIMAL.replace("disk = \"/dev/vg/res0\"\n\n", "disk = \"/dev/vg/res0\"\nport = 1\n\n");
    assert_error(&text, 6, "node[0].port", "unknown key, expected one of `name`");
}

#[test]
fn wrong_types() {
    assert_error(&with("protocol = 3"), 2, "protocol", "invalid type: integer `3`, expected a string");
    assert_error(&with("[net]\ndata-integrity = \"yes\""), 3, "net.data-integrity", "expected a boolean");
    assert_error(&with("[net]\ntimeout = 6"), 3, "net.timeout", "expected a string");
    assert_error(&with("[disk]\nal-extents = \"many\""), 3, "disk.al-extents", "expected an integer");
    assert_error(
        &with("[disk]\nbitmap-block = true"),
        3,
        "disk.bitmap-block",
        "expected a size like \"4KiB\"",
    );
    assert_error(&with("net = 5"), 2, "net", "expected a table");
    assert_error("node = 5\n", 1, "node", "expected an array of tables ([[node]])");
    let text = MINIMAL.replace("name = \"beta\"", "name = [\"beta\"]");
    assert_error(&text, 8, "node[1].name", "expected a string");
}

#[test]
fn missing_keys() {
    assert_error("protocol = \"C\"\n", 1, "node", "missing; a resource has exactly two [[node]] tables");
    let text = MINIMAL.replace("address = \"192.168.10.2:7789\"\n", "");
    assert_error(&text, 7, "node[1].address", "missing; each node needs its replication address");
    let text = MINIMAL.replace("name = \"alpha\"\n", "");
    assert_error(&text, 2, "node[0].name", "missing; each node needs the name");
    let text = MINIMAL.replace("disk = \"/dev/vg/res0\"\n\n[[node]]", "\n[[node]]");
    assert_error(&text, 2, "node[0].disk", "missing; each node needs its backing disk");
}

#[test]
fn node_count() {
    let one = &MINIMAL[..MINIMAL.find("\n[[node]]\nname = \"beta\"").unwrap()];
    assert_error(one, 2, "node", "a resource has exactly two [[node]] tables, found 1");
    let three = format!("{MINIMAL}\n[[node]]\nname = \"gamma\"\naddress = \"10.0.0.3:1\"\ndisk = \"/d\"\n");
    assert_error(&three, 12, "node", "found 3");
    assert_error("node = []\n", 1, "node", "found 0");
}

#[test]
fn node_values() {
    let cases = [
        ("name = \"beta\"", "name = \"alpha\"", "node[1].name", "both nodes are named \"alpha\""),
        ("name = \"beta\"", "name = \"be ta\"", "node[1].name", "invalid node name"),
        ("name = \"beta\"", "name = \"\"", "node[1].name", "it is empty"),
        (
            "address = \"192.168.10.2:7789\"",
            "address = \"192.168.10.1:7789\"",
            "node[1].address",
            "both nodes have the address",
        ),
        ("address = \"192.168.10.2:7789\"", "address = \"beta\"", "node[1].address", "expected host:port"),
        ("address = \"192.168.10.2:7789\"", "address = \"beta:0\"", "node[1].address", "port 0"),
        (
            "address = \"192.168.10.2:7789\"",
            "address = \"fd00::2:7789\"",
            "node[1].address",
            "expected host:port",
        ),
    ];
    for (from, to, key, fragment) in cases {
        let text = MINIMAL.replace(from, to);
        let line = text.lines().collect::<Vec<_>>().iter().rposition(|l| *l == to).unwrap() + 1;
        assert_error(&text, line, key, fragment);
    }
    let at_line = |extra: &str| {
        let text =
            MINIMAL.replace("disk = \"/dev/vg/res0\"\n\n", &format!("disk = \"/dev/vg/res0\"\n{extra}\n\n"));
        (text, 6)
    };
    for (extra, key, fragment) in [
        ("meta-disk = \"md0\"", "node[0].meta-disk", "\"md0\" is not an absolute path"),
        ("meta-disk = \"/dev/vg/res0\"", "node[0].meta-disk", "is the backing disk itself"),
        ("nbd-listen = \"localhost\"", "node[0].nbd-listen", "expected host:port"),
        ("nbd-device = \"nbd0\"", "node[0].nbd-device", "not an absolute path"),
    ] {
        let (text, line) = at_line(extra);
        assert_error(&text, line, key, fragment);
    }
    let text = MINIMAL.replace("disk = \"/dev/vg/res0\"\n\n", "disk = \"res0.img\"\n\n");
    assert_error(&text, 5, "node[0].disk", "\"res0.img\" is not an absolute path");
}

#[test]
fn protocol_value() {
    assert_error(&with("protocol = \"D\""), 2, "protocol", "invalid protocol \"D\", expected A, B or C");
    assert_error(&with("protocol = \"c\""), 2, "protocol", "invalid protocol \"c\"");
}

#[test]
fn durations() {
    assert_error(
        &with("[net]\nping-timeout = \"5 parsecs\""),
        3,
        "net.ping-timeout",
        "invalid duration \"5 parsecs\"",
    );
    assert_error(&with("[net]\nping-interval = \"10\""), 3, "net.ping-interval", "invalid duration \"10\"");
    assert_error(
        &with("[net]\ntimeout = \"2m\""),
        3,
        "net.timeout",
        "2m is out of range: must be 100ms to 1m",
    );
    assert_error(&with("[net]\nconnect-interval = \"0s\""), 3, "net.connect-interval", "out of range");
    assert_error(&with("[net]\nping-timeout = \"31s\""), 3, "net.ping-timeout", "must be 100ms to 30s");
    // ping-timeout must be shorter than timeout; the message points at the key that was written.
    assert_error(
        &with("[net]\ntimeout = \"1s\"\nping-timeout = \"1s\""),
        4,
        "net.ping-timeout",
        "ping-timeout (1s) must be shorter than timeout (1s)",
    );
    assert_error(
        &with("[net]\n\ntimeout = \"400ms\""),
        4,
        "net.timeout",
        "ping-timeout (500ms) must be shorter",
    );
    assert_error(&with("[net]\nping-timeout = \"6s\""), 3, "net.ping-timeout", "shorter than timeout (6s)");
}

#[test]
fn shared_secret() {
    assert_eq!(
        parse_ok(&with(&format!("[net]\nshared-secret = \"{}\"", "x".repeat(64))))
            .net
            .shared_secret
            .unwrap()
            .len(),
        64
    );
    assert_error(
        &with(&format!("[net]\nshared-secret = \"{}\"", "x".repeat(65))),
        3,
        "net.shared-secret",
        "65 bytes long, at most 64 allowed",
    );
    assert_error(&with("[net]\nshared-secret = \"\""), 3, "net.shared-secret", "empty");
}

#[test]
fn disk_values() {
    assert_error(
        &with("[disk]\nal-extents = 66"),
        3,
        "disk.al-extents",
        "66 is out of range: must be 67 to 65534",
    );
    assert_error(&with("[disk]\nal-extents = 65535"), 3, "disk.al-extents", "out of range");
    assert_error(&with("[disk]\nal-extents = -1"), 3, "disk.al-extents", "-1 is out of range");
    assert_error(
        &with("[disk]\nbitmap-block = \"6KiB\""),
        3,
        "disk.bitmap-block",
        "6144 bytes: must be a power of two from 4KiB to 1MiB",
    );
    assert_error(&with("[disk]\nbitmap-block = \"2KiB\""), 3, "disk.bitmap-block", "power of two from 4KiB");
    assert_error(&with("[disk]\nbitmap-block = \"2MiB\""), 3, "disk.bitmap-block", "power of two");
    assert_error(&with("[disk]\nbitmap-block = -4096"), 3, "disk.bitmap-block", "power of two");
    assert_error(&with("[disk]\nbitmap-block = \"lots\""), 3, "disk.bitmap-block", "invalid size \"lots\"");
}

#[test]
fn load_reads_the_resource_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("res0.toml"), MINIMAL).unwrap();
    let cfg = load(dir.path(), "res0").unwrap();
    assert_eq!(cfg.name, "res0");
    assert_eq!(cfg.file, dir.path().join("res0.toml"));

    let e = load(dir.path(), "res1").unwrap_err();
    let path = dir.path().join("res1.toml");
    assert_eq!(e.to_string(), format!("cannot read {}: No such file or directory", path.display()));

    let e = load(dir.path(), "../res0").unwrap_err();
    assert!(matches!(e, ConfigError::ResourceName { .. }), "{e}");
    assert!(load(dir.path(), "").is_err());
    assert!(load(dir.path(), "-x").is_err());

    std::fs::write(dir.path().join("bin.toml"), b"# ok\n\xff\n").unwrap();
    let e = load(dir.path(), "bin").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}:2: the file is not valid UTF-8", dir.path().join("bin.toml").display())
    );

    std::fs::create_dir(dir.path().join("dir.toml")).unwrap();
    let e = load(dir.path(), "dir").unwrap_err();
    assert!(e.to_string().starts_with("cannot read "), "{e}");
}

#[test]
fn local_node_by_name() {
    let cfg = parse_ok(MINIMAL);
    let (me, peer) = local_node(&cfg, Some("alpha")).unwrap();
    assert_eq!((me.name.as_str(), peer.name.as_str()), ("alpha", "beta"));
    let (me, peer) = local_node(&cfg, Some("beta")).unwrap();
    assert_eq!((me.name.as_str(), peer.name.as_str()), ("beta", "alpha"));
    let e = local_node(&cfg, Some("gamma")).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{FILE}: resource res0 has no node named \"gamma\" (nodes: alpha, beta)")
    );
    // An explicit name is matched exactly.
    assert!(local_node(&cfg, Some("ALPHA")).is_err());
}

#[test]
fn local_node_by_hostname() {
    let host = hostname();
    let short = host.split('.').next().unwrap_or_default().to_string();
    if raw::resource_name_problem(&short).is_some() {
        return; // a hostname that cannot be a node name (empty, say) has nothing to match
    }
    let peer = if short == "peer-x" { "peer-y" } else { "peer-x" };
    let text =
        MINIMAL.replace("\"alpha\"", &format!("\"{short}\"")).replace("\"beta\"", &format!("\"{peer}\""));
    let cfg = parse_ok(&text);
    let (me, other) = local_node(&cfg, None).unwrap();
    assert_eq!((me.name.as_str(), other.name.as_str()), (short.as_str(), peer));

    let cfg = parse_ok(&MINIMAL.replace("\"alpha\"", "\"peer-x\"").replace("\"beta\"", "\"peer-y\""));
    if host != "peer-x" && host != "peer-y" {
        let e = local_node(&cfg, None).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownNode { by_hostname: true, .. }));
        let message = e.to_string();
        assert!(message.contains(&format!("hostname {host:?} is not a node of resource res0")), "{message}");
        assert!(message.contains("(nodes: peer-x, peer-y)"), "{message}");
    }
}

#[test]
fn config_dir_resolution() {
    assert_eq!(config_dir(Some(Path::new("/x"))), Path::new("/x"));
    // The environment is process-wide, so only the explicit case is tested here; the CLI test
    // covers RDBD_CONFIG_DIR in a child process.
}

#[test]
fn split_brain_policies() {
    let net = |extra: &str| parse_ok(&with(&format!("[net]\n{extra}"))).net;
    let cases = [
        ("disconnect", AfterSb0Pri::Disconnect),
        ("discard-younger-primary", AfterSb0Pri::DiscardYoungerPrimary),
        ("discard-older-primary", AfterSb0Pri::DiscardOlderPrimary),
        ("discard-zero-changes", AfterSb0Pri::DiscardZeroChanges),
        ("discard-least-changes", AfterSb0Pri::DiscardLeastChanges),
        ("discard-node-alpha", AfterSb0Pri::DiscardNode("alpha".into())),
        ("discard-node-beta", AfterSb0Pri::DiscardNode("beta".into())),
    ];
    for (text, want) in cases {
        assert_eq!(net(&format!("after-sb-0pri = \"{text}\"")).after_sb_0pri, want, "{text}");
        assert_eq!(want.to_string(), text);
    }
    for &want in AfterSb1::ALL {
        assert_eq!(net(&format!("after-sb-1pri = \"{want}\"")).after_sb_1pri, want);
    }
    for &want in AfterSb2::ALL {
        assert_eq!(net(&format!("after-sb-2pri = \"{want}\"")).after_sb_2pri, want);
    }
    for &want in RrConflict::ALL {
        assert_eq!(net(&format!("rr-conflict = \"{want}\"")).rr_conflict, want);
    }
    assert_eq!(
        AfterSb1::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        ["disconnect", "consensus", "discard-secondary", "call-pri-lost-after-sb"]
    );
    assert_eq!(
        AfterSb2::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        ["disconnect", "call-pri-lost-after-sb"]
    );
    assert_eq!(
        RrConflict::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        ["disconnect", "call-pri-lost", "retry-connect"]
    );
}

#[test]
fn split_brain_policy_errors() {
    assert_error(
        &with("[net]\nafter-sb-0pri = \"discard-local\""),
        3,
        "net.after-sb-0pri",
        "invalid value \"discard-local\", expected one of: disconnect, discard-younger-primary, \
         discard-older-primary, discard-zero-changes, discard-least-changes, discard-node-NAME",
    );
    assert_error(
        &with("[net]\nafter-sb-0pri = \"discard-node-\""),
        3,
        "net.after-sb-0pri",
        "must be followed by a node name",
    );
    assert_error(
        &with("[net]\nafter-sb-1pri = \"violently-as0p\""),
        3,
        "net.after-sb-1pri",
        "invalid value \"violently-as0p\", expected one of: disconnect, consensus, discard-secondary, \
         call-pri-lost-after-sb",
    );
    assert_error(
        &with("[net]\nafter-sb-2pri = \"consensus\""),
        3,
        "net.after-sb-2pri",
        "expected one of: disconnect, call-pri-lost-after-sb",
    );
    assert_error(
        &with("[net]\n\nrr-conflict = \"violently\""),
        4,
        "net.rr-conflict",
        "expected one of: disconnect, call-pri-lost, retry-connect",
    );
    assert_error(&with("[net]\nafter-sb-1pri = \"Consensus\""), 3, "net.after-sb-1pri", "invalid value");
    assert_error(&with("[net]\nafter-sb-0pri = 0"), 3, "net.after-sb-0pri", "expected a string");
}

#[test]
fn discard_node_must_name_a_node() {
    // The line of the key, though the check needs the [[node]] tables further down.
    assert_error(
        &with("[net]\nping-interval = \"5s\"\nafter-sb-0pri = \"discard-node-gamma\""),
        4,
        "net.after-sb-0pri",
        "discard-node-gamma: \"gamma\" is not a node of this resource (nodes: alpha, beta)",
    );
    // Node names are matched exactly, as --node is.
    assert_error(&with("[net]\nafter-sb-0pri = \"discard-node-Alpha\""), 3, "net.after-sb-0pri", "\"Alpha\"");
    let text = MINIMAL.replace("\"beta\"", "\"gamma\"");
    let cfg = parse_ok(&format!("[net]\nafter-sb-0pri = \"discard-node-gamma\"\n{text}"));
    assert_eq!(cfg.net.after_sb_0pri, AfterSb0Pri::DiscardNode("gamma".into()));
}

#[test]
fn digests() {
    let net = |extra: &str| parse_ok(&with(&format!("[net]\n{extra}"))).net;
    assert_eq!(net("csums-alg = \"crc32c\"").csums_alg, Some(DigestAlg::Crc32c));
    assert_eq!(net("csums-alg = \"sha256\"").csums_alg, Some(DigestAlg::Sha256));
    assert_eq!(net("verify-alg = \"crc32c\"").verify_alg, DigestAlg::Crc32c);
    assert_eq!(net("verify-alg = \"sha256\"").verify_alg, DigestAlg::Sha256);
    assert!(net("csums-after-crash-only = true").csums_after_crash_only);
    assert!(!net("csums-after-crash-only = false").csums_after_crash_only);
    assert_error(
        &with("[net]\ncsums-alg = \"md5\""),
        3,
        "net.csums-alg",
        "invalid value \"md5\", expected one of: crc32c, sha256",
    );
    assert_error(&with("[net]\nverify-alg = \"\""), 3, "net.verify-alg", "expected one of: crc32c, sha256");
    assert_error(
        &with("[net]\ncsums-after-crash-only = 1"),
        3,
        "net.csums-after-crash-only",
        "expected a boolean",
    );
}

#[test]
fn resync_pace() {
    let resync = |extra: &str| parse_ok(&with(&format!("[disk]\n{extra}"))).disk.resync;
    for (text, bytes) in [
        ("\"250KiB\"", 250 << 10),
        ("\"100MiB\"", 100 << 20),
        ("\"1GiB\"", 1 << 30),
        ("\"100MiB/s\"", 100 << 20),
        ("\"1K\"", 1024),
        ("1024", 1024),
        ("\"1TiB\"", 1 << 40),
    ] {
        assert_eq!(resync(&format!("resync-rate = {text}")).resync_rate, bytes, "{text}");
    }
    assert_eq!(resync("c-max-rate = 0").c_max_rate, 0);
    assert_eq!(resync("c-max-rate = \"2GiB\"").c_max_rate, 2 << 30);
    assert_eq!(resync("c-min-rate = 0").c_min_rate, 0);
    assert_eq!(resync("c-min-rate = \"4MiB\"").c_min_rate, 4 << 20);
    assert_eq!(resync("c-plan-ahead = \"0s\"").c_plan_ahead, Duration::ZERO);
    assert_eq!(resync("c-plan-ahead = \"30s\"").c_plan_ahead, Duration::from_secs(30));
    assert_eq!(resync("c-fill-target = 0").c_fill_target, 0);
    assert_eq!(resync("c-fill-target = \"1GiB\"").c_fill_target, 1 << 30);
    assert_eq!(resync("c-fill-target = \"100KiB\"").c_fill_target, 100 << 10);
    assert_eq!(resync("c-delay-target = \"100ms\"").c_delay_target, Duration::from_millis(100));
    assert_eq!(resync("c-delay-target = \"10s\"").c_delay_target, Duration::from_secs(10));
}

#[test]
fn resync_pace_errors() {
    let cases = [
        (
            "resync-rate = \"1000\"",
            "disk.resync-rate",
            "1000 is out of range: must be 1KiB to 1TiB per second",
        ),
        ("resync-rate = 0", "disk.resync-rate", "0 is out of range: must be 1KiB to 1TiB"),
        ("resync-rate = -1", "disk.resync-rate", "-1 is out of range"),
        ("resync-rate = \"2TiB\"", "disk.resync-rate", "2TiB is out of range"),
        ("resync-rate = \"fast\"", "disk.resync-rate", "invalid rate \"fast\", expected bytes per second"),
        ("resync-rate = \"100MiB/h\"", "disk.resync-rate", "invalid rate \"100MiB/h\""),
        ("resync-rate = true", "disk.resync-rate", "expected a rate like \"100MiB\" (per second)"),
        ("c-max-rate = 512", "disk.c-max-rate", "512 is out of range: must be 0 or 1KiB to 1TiB per second"),
        ("c-min-rate = \"-4MiB\"", "disk.c-min-rate", "invalid rate \"-4MiB\""),
        ("c-min-rate = 100", "disk.c-min-rate", "must be 0 or 1KiB to 1TiB"),
        ("c-plan-ahead = \"31s\"", "disk.c-plan-ahead", "31s is out of range: must be 0s to 30s"),
        ("c-plan-ahead = \"2\"", "disk.c-plan-ahead", "invalid duration \"2\""),
        ("c-plan-ahead = 2", "disk.c-plan-ahead", "expected a string"),
        ("c-fill-target = \"2GiB\"", "disk.c-fill-target", "2GiB is out of range: must be 0 to 1GiB"),
        ("c-fill-target = \"lots\"", "disk.c-fill-target", "invalid size \"lots\""),
        ("c-fill-target = \"100MiB/s\"", "disk.c-fill-target", "invalid size \"100MiB/s\""),
        ("c-fill-target = false", "disk.c-fill-target", "expected a size like \"4KiB\""),
        ("c-delay-target = \"0s\"", "disk.c-delay-target", "0s is out of range: must be 100ms to 10s"),
        ("c-delay-target = \"11s\"", "disk.c-delay-target", "must be 100ms to 10s"),
    ];
    for (extra, key, fragment) in cases {
        assert_error(&with(&format!("[disk]\nal-extents = 67\n{extra}")), 4, key, fragment);
    }
}

#[test]
fn handlers() {
    let cfg = parse_ok(&with(
        "[handlers]\nsplit-brain = \"/usr/lib/rdbd/notify.sh root\"\nout-of-sync = \"logger oos\"",
    ));
    assert_eq!(
        cfg.handlers,
        HandlersConfig {
            split_brain: Some("/usr/lib/rdbd/notify.sh root".into()),
            pri_lost_after_sb: None,
            pri_lost: None,
            out_of_sync: Some("logger oos".into()),
            local_io_error: None,
        }
    );
    let cfg = parse_ok(&with("[handlers]\npri-lost-after-sb = \"halt -f\"\npri-lost = \"true\""));
    assert_eq!(cfg.handlers.pri_lost_after_sb.as_deref(), Some("halt -f"));
    assert_eq!(cfg.handlers.pri_lost.as_deref(), Some("true"));
    assert_error(
        &with("[handlers]\nsplit-brain = \"\""),
        3,
        "handlers.split-brain",
        "empty; remove the key to run nothing",
    );
    assert_error(&with("[handlers]\n\npri-lost = \"  \""), 4, "handlers.pri-lost", "empty");
    assert_error(&with("[handlers]\nout-of-sync = \"a\\u0000b\""), 3, "handlers.out-of-sync", "NUL");
    assert_error(
        &with("[handlers]\npri-lost-after-sb = [\"halt\"]"),
        3,
        "handlers.pri-lost-after-sb",
        "expected a string",
    );
    assert_error(&with("handlers = \"x\""), 2, "handlers", "expected a table");
}

const HA: &str = r#"
[ha]
witness = "10.0.0.3:7788"
witness-secret = "w1tness"
fence-peer = "/usr/local/sbin/fence-peer"
on-quorum-loss = "demote"
preferred-nodes = ["alpha"]
failback = "always"
monitor-interval = "5s"
migration-threshold = 2
on-demote-failure = "reboot"

[[service]]
kind = "lvm"
volume-group = "vg0"

[[service]]
kind = "mount"
device = "/dev/vg0/lv0"
directory = "/srv/export"
fstype = "xfs"
options = "noatime"

[[service]]
kind = "nfs-server"
state-dir = "/srv/export/.nfs"
grace-time = "15s"
lease-time = "10s"

[[service]]
kind = "nfs-export"
directory = "/srv/export"
clients = "10.0.0.0/24"
fsid = 1

[[service]]
kind = "ip"
address = "10.0.0.100/24"
interface = "eth0"

[[service]]
kind = "ocf"
agent = "heartbeat:portblock"
params = { ip = "10.0.0.100", action = "unblock" }

[[service]]
kind = "exec"
name = "app"
start = "systemctl start app"
stop = "systemctl stop app"
"#;

#[test]
fn ha_table_and_service_chain() {
    let cfg = parse_ok(&with(HA));
    let ha = cfg.ha.as_ref().expect("[ha] parsed");
    assert_eq!(ha.witness, Some(WitnessConfig { address: "10.0.0.3:7788".into(), secret: "w1tness".into() }));
    assert_eq!(ha.on_quorum_loss, OnQuorumLoss::Demote);
    assert_eq!(ha.no_quorum_policy, NoQuorumPolicy::Stop);
    assert_eq!(ha.preferred_nodes, vec!["alpha".to_string()]);
    assert_eq!(ha.failback, Failback::Always);
    assert_eq!(ha.monitor_interval, Duration::from_secs(5));
    assert_eq!(ha.migration_threshold, 2);
    assert_eq!(ha.on_demote_failure, OnDemoteFailure::Reboot);
    let labels: Vec<String> = ha.services.iter().map(ServiceConfig::label).collect();
    assert_eq!(
        labels,
        [
            "lvm:vg0",
            "mount:/srv/export",
            "nfs-server:nfsd",
            "nfs-export:/srv/export",
            "ip:10.0.0.100/24",
            "ocf:heartbeat:portblock",
            "exec:app"
        ]
    );
    assert_eq!(
        ha.services[3],
        ServiceConfig::NfsExport {
            directory: "/srv/export".into(),
            clients: "10.0.0.0/24".into(),
            options: "rw,sync,no_subtree_check".into(),
            fsid: 1
        }
    );
    assert_eq!(
        ha.services[2],
        ServiceConfig::NfsServer {
            state_dir: Some("/srv/export/.nfs".into()),
            grace_time: Some(Duration::from_secs(15)),
            lease_time: Some(Duration::from_secs(10))
        }
    );
    // The effective configuration round-trips.
    assert_eq!(parse_ok(&cfg.to_toml()), cfg, "{}", cfg.to_toml());
    // Without [ha], roles are manual.
    assert_eq!(parse_ok(MINIMAL).ha, None);
    // With [ha] a silent link is noticed sooner, unless ping-interval is written.
    assert_eq!(parse_ok(&with("[ha]")).net.ping_interval, Duration::from_millis(500));
    assert_eq!(parse_ok(MINIMAL).net.ping_interval, Duration::from_secs(10));
    assert_eq!(
        parse_ok(&with("[net]\nping-interval = \"3s\"\n[ha]")).net.ping_interval,
        Duration::from_secs(3)
    );
    // An empty [ha]: defaults, no witness.
    let ha = parse_ok(&with("[ha]")).ha.unwrap();
    assert_eq!(
        (ha.witness, ha.no_quorum_policy, ha.on_quorum_loss),
        (None, NoQuorumPolicy::Stop, OnQuorumLoss::Freeze)
    );
}

#[test]
fn ha_mistakes_name_the_line_and_key() {
    assert_error(&with("[ha]\nwitness = \"10.0.0.3:7788\""), 3, "ha.witness-secret", "missing");
    assert_error(
        &with("[ha]\npreferred-nodes = [\"gamma\"]"),
        3,
        "ha.preferred-nodes",
        "\"gamma\" is not a node",
    );
    assert_error(
        &with("[ha]\non-quorum-loss = \"panic\""),
        3,
        "ha.on-quorum-loss",
        "freeze, demote, fail-io",
    );
    assert_error(&with("[ha]\nmigration-threshold = 0"), 3, "ha.migration-threshold", "1 to 100");
    assert_error(
        &with("[[service]]\nkind = \"lvm\"\nvolume-group = \"vg0\""),
        2,
        "service",
        "needs an [ha] table",
    );
    assert_error(&with("[ha]\n[[service]]\nkind = \"nfs\""), 4, "service[0].kind", "nfs-server, nfs-export");
    assert_error(
        &with("[ha]\n[[service]]\nkind = \"lvm\"\nvolume-group = \"vg0\"\ndirectory = \"/srv\""),
        6,
        "service[0].directory",
        "not a key of a lvm service",
    );
    assert_error(
        &with("[ha]\n[[service]]\nkind = \"mount\"\ndevice = \"/dev/x\""),
        3,
        "service[0].directory",
        "missing",
    );
    assert_error(
        &with("[ha]\n[[service]]\nkind = \"nfs-export\"\ndirectory = \"/srv\"\nclients = \"*\""),
        3,
        "service[0].fsid",
        "same fsid",
    );
    assert_error(&with("[ha]\n[[service]]\nvolume-group = \"vg0\""), 3, "service[0].kind", "one of: lvm");
    assert_error(
        &with("[ha]\n[[service]]\nkind = \"nfs-server\"\ngrace-time = \"5s\""),
        5,
        "service[0].grace-time",
        "must be 10s to 1h",
    );
    assert_error(
        &with("[ha]\n[[service]]\nkind = \"lvm\"\nvolume-group = \"vg0\"\nlease-time = \"10s\""),
        6,
        "service[0].lease-time",
        "not a key of a lvm service",
    );
}

/// `top`, then the two nodes given `alpha_hb` and `beta_hb` lines (with a 3-line `top`, line 10
/// is alpha's, line 16 beta's).
fn with_heartbeat(top: &str, alpha_hb: &str, beta_hb: &str) -> String {
    format!(
        "\n{top}\n\n[[node]]\nname = \"alpha\"\naddress = \"10.0.0.1:7789\"\ndisk = \"/dev/sdb\"\n{alpha_hb}\n\n\
         [[node]]\nname = \"beta\"\naddress = \"10.0.0.2:7789\"\ndisk = \"/dev/sdb\"\n{beta_hb}\n"
    )
}

#[test]
fn heartbeat_addresses_pair_up_and_need_ha_and_a_secret() {
    let top = "[net]\nshared-secret = \"s\"\n[ha]";
    let (a, b) = ("heartbeat-address = \"10.1.0.1:7790\"", "heartbeat-address = \"10.1.0.2:7790\"");
    let cfg = parse_ok(&with_heartbeat(top, a, b));
    assert_eq!(cfg.nodes[0].heartbeat_address.as_deref(), Some("10.1.0.1:7790"));
    assert_eq!(cfg.nodes[1].heartbeat_address.as_deref(), Some("10.1.0.2:7790"));
    assert_eq!(parse_ok(&cfg.to_toml()), cfg, "dump round trip");
    assert_eq!(parse_ok(&with_heartbeat(top, "", "")).nodes[0].heartbeat_address, None);
    assert_error(&with_heartbeat(top, a, ""), 12, "node[1].heartbeat-address", "node[0] has one");
    assert_error(&with_heartbeat(top, "", b), 6, "node[0].heartbeat-address", "node[1] has one");
    assert_error(&with_heartbeat(top, a, a), 16, "node[1].heartbeat-address", "same heartbeat address");
    assert_error(
        &with_heartbeat(top, "heartbeat-address = \"10.0.0.1:7789\"", b),
        10,
        "node[0].heartbeat-address",
        "is the replication address",
    );
    assert_error(
        &with_heartbeat(top, "heartbeat-address = \"nope\"", b),
        10,
        "node[0].heartbeat-address",
        "host:port",
    );
    assert_error(&with_heartbeat("[ha]", a, b), 8, "node[0].heartbeat-address", "needs net.shared-secret");
    assert_error(
        &with_heartbeat("[net]\nshared-secret = \"s\"", a, b),
        9,
        "node[0].heartbeat-address",
        "needs an [ha] table",
    );
}

#[test]
fn on_io_error_policies_and_the_handler_they_need() {
    assert_eq!(parse_ok(MINIMAL).disk.on_io_error, OnIoError::Detach, "DRBD's default");
    let pass_on = parse_ok(&with("[disk]\non-io-error = \"pass_on\""));
    assert_eq!(pass_on.disk.on_io_error, OnIoError::PassOn);
    let text =
        with("[disk]\non-io-error = \"call-local-io-error\"\n[handlers]\nlocal-io-error = \"halt -f\"");
    let call = parse_ok(&text);
    assert_eq!(call.disk.on_io_error, OnIoError::CallLocalIoError);
    assert_eq!(call.handlers.local_io_error.as_deref(), Some("halt -f"));
    assert_eq!(parse_ok(&call.to_toml()), call, "dump round-trips");
    assert_error(
        &with("[disk]\non-io-error = \"panic\""),
        3,
        "disk.on-io-error",
        "detach, pass_on, call-local-io-error",
    );
    assert_error(
        &with("[disk]\non-io-error = \"call-local-io-error\""),
        3,
        "disk.on-io-error",
        "needs a command in handlers.local-io-error",
    );
}

#[test]
fn policies_from_the_config() {
    let net = NetConfig {
        after_sb_0pri: AfterSb0Pri::DiscardNode("beta".into()),
        after_sb_1pri: AfterSb1::Consensus,
        after_sb_2pri: AfterSb2::CallPriLostAfterSb,
        ..NetConfig::default()
    };
    assert_eq!(
        net.split_brain_policies(),
        Policies {
            after_sb_0pri: AfterSb0Pri::DiscardNode("beta".into()),
            after_sb_1pri: AfterSb1::Consensus,
            after_sb_2pri: AfterSb2::CallPriLostAfterSb,
        }
    );
    assert_eq!(NetConfig::default().split_brain_policies(), Policies::default());
}
