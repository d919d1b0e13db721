//! rdbd's own kernel attach in the VM test bed (see tests/common/vm.rs): `primary` gives the
//! node /dev/nbdX (generic netlink), XFS on it, `secondary` refused while it is mounted (naming
//! the mount) and taking the device away once unmounted, and the peer, promoted, mounting the
//! same file system with the same data (tools/vm/kernel_attach.sh).

mod common;

use std::time::Duration;

#[test]
fn primary_attaches_dev_nbd_and_a_switchover_keeps_the_file_system() {
    common::vm::run_scenario("kernel_attach.sh", Duration::from_secs(240), "kernel attach passed");
}
