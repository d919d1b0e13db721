//! The HA supervisor in the VM test bed (see tests/common/vm.rs): a quorum witness, the chain
//! LVM -> XFS -> kernel NFS server -> export -> service address started on the Primary, an NFS
//! client on the service address that keeps writing; the Primary dies and the peer takes over
//! on its own, the client carries on with every acknowledged file intact; the old Primary
//! rejoins and the service fails back to it; a planned switchover to the peer and back
//! (tools/vm/ha_failover.sh).

mod common;

use std::time::Duration;

#[test]
fn the_nfs_chain_fails_over_on_its_own_fails_back_and_switches_over() {
    // Under emulation each move of the chain takes about a minute.
    common::vm::run_scenario("ha_failover.sh", Duration::from_secs(900), "ha failover passed");
}
