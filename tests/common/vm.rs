//! Scenarios that run inside the VM test bed (`tools/vm/run.sh SCRIPT`: software emulation,
//! Debian's kernel with nbd, dm-mod, xfs and nfsd, the host's userland, the test build of rdbd).
//!
//! Skips: `run.sh` exits 77 when the VM cannot run (not installed, not x86_64). That is a skip
//! for a plain `cargo test`, and a failure under RDBD_REQUIRE_TOOLS=1 (tools/test.sh, so CI),
//! which installs the VM first (tools/install-test-deps.sh -> tools/vm/install.sh). A machine
//! that cannot host a VM at all opts out explicitly with RDBD_VM=0, a skip even there.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{output_within, rdbd_bin};

const SKIP: i32 = 77;

/// Boots the VM and runs `tools/vm/<script>` in it, bounded by `script_timeout` inside the guest;
/// panics with the scenario's output unless it succeeds and prints `done_marker`. Returns
/// without running where the VM cannot run (see the module comment).
pub fn run_scenario(script: &str, script_timeout: Duration, done_marker: &str) {
    if std::env::var("RDBD_VM").as_deref() == Ok("0") {
        eprintln!("SKIP: RDBD_VM=0 (this machine does not run the VM test bed)");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    // run.sh adds its boot allowance (120 s) to the script's bound; waiting longer than that
    // makes run.sh, not this test, end (and stop qemu) first.
    let test_timeout = script_timeout + Duration::from_secs(160);
    let out = output_within(
        Command::new("bash")
            .arg(repo.join("tools/vm/run.sh"))
            .arg(repo.join("tools/vm").join(script))
            .current_dir(repo)
            // The debug binary cargo built for the tests, not whatever target/release holds.
            .env("RDBD_BIN", rdbd_bin())
            .env("RDBD_VM_TIMEOUT", script_timeout.as_secs().to_string()),
        test_timeout,
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
        "tools/vm/run.sh tools/vm/{script} failed ({}) after {:?}; its output is above",
        out.status,
        started.elapsed()
    );
    assert!(stdout.contains("== ") && stdout.contains(done_marker), "the scenario did not finish");
    eprintln!("VM scenario {script} passed in {:.0?} (boot included)", started.elapsed());
}
