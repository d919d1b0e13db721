//! `rdbd create-md` and `rdbd show-md` against real files, through the real binary.

use std::path::Path;
use std::process::{Command, Output};

fn rdbd(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rdbd"))
        .args(args)
        .env("RDBD_CONFIG_DIR", dir)
        .env_remove("RDBD_NODE")
        .output()
        .expect("run rdbd")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A resource whose two nodes keep file-backed disks in `dir`; beta's metadata is external.
fn setup(dir: &Path) {
    for name in ["alpha.img", "beta.img", "beta.md"] {
        let size = if name.ends_with(".md") { 1 << 20 } else { 256 << 20 };
        std::fs::File::create(dir.join(name)).unwrap().set_len(size).unwrap();
    }
    let d = dir.display();
    std::fs::write(
        dir.join("res0.toml"),
        format!(
            r#"
[[node]]
name = "alpha"
address = "127.0.0.1:7789"
disk = "{d}/alpha.img"

[[node]]
name = "beta"
address = "127.0.0.1:7790"
disk = "{d}/beta.img"
meta-disk = "{d}/beta.md"
"#
        ),
    )
    .unwrap();
}

#[test]
fn create_md_then_show_md_on_both_nodes() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    for node in ["alpha", "beta"] {
        let out = rdbd(dir.path(), &["create-md", "res0", "--node", node]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert!(stdout.contains(&format!("created metadata for res0 on node {node}")), "{stdout}");

        let out = rdbd(dir.path(), &["show-md", "res0", "--node", node]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert!(stdout.contains("generations current 0000000000000004"), "just created: {stdout}");
        assert!(stdout.contains("flags al-clean"), "{stdout}");
        assert!(stdout.contains("out-of-sync 0 blocks"), "{stdout}");
        assert!(!stdout.contains("damaged"), "{stdout}");
    }
    // External metadata leaves beta's whole disk for data; internal takes a little of alpha's.
    let show = |node| text(&rdbd(dir.path(), &["show-md", "res0", "--node", node])).0;
    assert!(show("beta").contains("data-size 268435456 "), "{}", show("beta"));
    assert!(!show("alpha").contains("data-size 268435456 "));
}

#[test]
fn create_md_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    assert!(rdbd(dir.path(), &["create-md", "res0", "--node", "alpha"]).status.success());
    let out = rdbd(dir.path(), &["create-md", "res0", "--node", "alpha"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("already holds rdbd metadata") && stderr.contains("--force"), "{stderr}");
    assert!(rdbd(dir.path(), &["create-md", "res0", "--node", "alpha", "--force"]).status.success());
}

#[test]
fn metadata_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    // No metadata yet.
    let out = rdbd(dir.path(), &["show-md", "res0", "--node", "alpha"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("no rdbd metadata found") && stderr.contains("create-md"), "{stderr}");
    // A missing backing disk.
    std::fs::remove_file(dir.path().join("alpha.img")).unwrap();
    let out = rdbd(dir.path(), &["create-md", "res0", "--node", "alpha"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("alpha.img") && stderr.contains("No such file"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}
