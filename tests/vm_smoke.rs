//! The kernel path, for real: `tools/vm/run.sh tools/vm/smoke.sh` boots a VM (software emulation,
//! Debian's kernel, the host's userland) in which rdbd serves a disk that the kernel's NBD client
//! attaches as /dev/nbd0, carrying an XFS and a short fio run (see tools/vm/smoke.sh).
//!
//! Skips: `run.sh` exits 77 when the VM cannot run (not installed, not x86_64). That is a skip
//! for a plain `cargo test`, and a failure under RDBD_REQUIRE_TOOLS=1 (tools/test.sh, so CI),
//! which installs the VM first (tools/install-test-deps.sh -> tools/vm/install.sh). A machine
//! that cannot host a VM at all opts out explicitly with RDBD_VM=0, a skip even there.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The scenario's own bound inside the guest (it takes about a minute under emulation).
const SCRIPT_TIMEOUT_S: u64 = 150;
/// run.sh adds its boot allowance (120 s) and a 10 s grace to the script's bound; this test waits
/// longer than that, so run.sh always ends (and stops qemu) before the test gives up on it.
const TEST_TIMEOUT: Duration = Duration::from_secs(SCRIPT_TIMEOUT_S + 120 + 40);
const SKIP: i32 = 77;

#[test]
fn kernel_nbd_client_carries_xfs_and_fio_on_rdbd_in_a_vm() {
    if std::env::var("RDBD_VM").as_deref() == Ok("0") {
        eprintln!("SKIP: RDBD_VM=0 (this machine does not run the VM test bed)");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let out = output_within(
        Command::new("bash")
            .arg(repo.join("tools/vm/run.sh"))
            .arg(repo.join("tools/vm/smoke.sh"))
            .current_dir(repo)
            // The debug binary cargo built for the tests, not whatever target/release holds.
            .env("RDBD_BIN", rdbd_bin())
            .env("RDBD_VM_TIMEOUT", SCRIPT_TIMEOUT_S.to_string()),
        TEST_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(SKIP) {
        if std::env::var("RDBD_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!(
                "the VM test bed is required (RDBD_REQUIRE_TOOLS=1) but cannot run; \
                 run tools/vm/install.sh, or set RDBD_VM=0 on a machine that cannot host a VM:\n{stderr}"
            );
        }
        eprintln!("{}", stderr.trim());
        return;
    }
    // Shown by cargo test only on failure (or with --nocapture): every step with its output.
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "tools/vm/run.sh tools/vm/smoke.sh failed ({}) after {:?}; its output is above",
        out.status,
        started.elapsed()
    );
    assert!(stdout.contains("== ") && stdout.contains("smoke passed"), "the scenario did not finish");
    eprintln!("VM smoke passed in {:.0?} (boot included)", started.elapsed());
}
