//! The whole stack on a real kernel in the VM test bed (see tests/common/vm.rs): two nodes in
//! network and mount namespaces, LVM -> XFS -> kernel NFS server on the Primary's /dev/nbdX, an
//! NFS client writing with fsync; failover after SIGKILL of the Primary's daemon and after a cut
//! link, every acknowledged file intact, resyncs of only what changed, failback, and a split
//! brain recovered by hand with verify reporting 0 (tools/vm/nfs_failover.sh).

mod common;

use std::time::Duration;

#[test]
fn lvm_xfs_nfs_fail_over_fail_back_and_recover_from_split_brain() {
    common::vm::run_scenario("nfs_failover.sh", Duration::from_secs(480), "nfs failover passed");
}
