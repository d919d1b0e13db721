//! A failing backing disk on a real kernel, in the VM test bed (see tests/common/vm.rs): each
//! node's disk is a device-mapper table over a loop device, swapped to `error` to fail it.
//! The Secondary's disk fails under a writer on the Primary's XFS (it goes Diskless, is never
//! promoted, and is attached and resynced once repaired); the Primary's disk fails (it serves
//! through its peer, the file system never notices); a bad region under a file fails a read on
//! the Primary, which the peer answers, and the resync after the repair restores what the
//! region lost. Verify finds 0 blocks out of sync after each resync
//! (tools/vm/disk_failure.sh, about 4 minutes).

mod common;

use std::time::Duration;

#[test]
fn failing_disks_detach_serve_through_the_peer_and_resync_once_repaired() {
    common::vm::run_scenario("disk_failure.sh", Duration::from_secs(900), "disk failure passed");
}
